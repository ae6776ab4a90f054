"""Comparison metrics, as the paper's released code defines them (ALGORITHMS.md §10).

Per image, with ``x`` the analytical output and ``y`` the reference (network) output flattened to
D values: ``r2 = 1 - sum (x - y)^2 / (D * var_unbiased(y))`` (a variance of 0 is replaced by 1),
then the mean over the batch. ``mse`` is the mean squared difference; ``pearson`` is Kamb &
Ganguli's r (mean-centred, L2-normalised dot product). ``reduce="none"`` returns per-image values.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np


def _flat(x, y, name):
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ: {x.shape} vs {y.shape}")
    if x.ndim < 2:
        raise ValueError(f"{name}: need a batch axis [B, ...]; got shape {x.shape}")
    return x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)


def _reduce(v, reduce):
    if reduce == "mean":
        return jnp.mean(v)
    if reduce == "median":
        return jnp.median(v)
    if reduce == "none":
        return v
    raise ValueError(f"reduce must be 'mean', 'median' or 'none', got {reduce!r}")


def r2(x, y, reduce: str = "mean"):
    """Paper's r2 of ``x`` against reference ``y`` ([B, ...] each)."""
    x, y = _flat(x, y, "r2")
    d = x.shape[1]
    var = jnp.var(y, axis=1, ddof=1) if d > 1 else jnp.zeros(x.shape[0])
    var = jnp.where(var == 0, 1.0, var)
    return _reduce(1.0 - jnp.sum(jnp.square(x - y), axis=1) / (d * var), reduce)


def mse(x, y, reduce: str = "mean"):
    """Mean squared difference per image (in [-1, 1] units)."""
    x, y = _flat(x, y, "mse")
    return _reduce(jnp.mean(jnp.square(x - y), axis=1), reduce)


def pearson(x, y, reduce: str = "mean"):
    """Pearson correlation per image (0 where either image is constant)."""
    x, y = _flat(x, y, "pearson")
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = jnp.linalg.norm(xc, axis=1) * jnp.linalg.norm(yc, axis=1)
    return _reduce(jnp.where(den > 0, jnp.sum(xc * yc, axis=1) / jnp.where(den > 0, den, 1.0), 0.0),
                   reduce)


METRICS = {"r2": r2, "mse": mse, "pearson": pearson}


def per_step(x0_hats_a, x0_hats_b, reduce: str = "mean") -> Dict[str, np.ndarray]:
    """Trajectory-vs-trajectory comparison: every metric at every step.

    Args:
      x0_hats_a: [S, B, H, W, C] (e.g. the analytical model along its own path).
      x0_hats_b: [S, B, H, W, C] (the reference along its own path, same initial noise).
    Returns: {metric: [S]} (or [S, B] with reduce="none").
    """
    a, b = jnp.asarray(x0_hats_a), jnp.asarray(x0_hats_b)
    if a.shape != b.shape:
        raise ValueError(f"per_step: trajectories differ in shape: {a.shape} vs {b.shape}")
    return {k: np.asarray(jax.vmap(lambda u, v, f=f: f(u, v, reduce))(a, b))
            for k, f in METRICS.items()}


def single_step(reference: Callable, result, reduce: str = "mean") -> Dict[str, np.ndarray]:
    """Single-step comparison: ``reference`` evaluated on the states ``result.xts`` of another
    model's trajectory, compared with that model's ``result.x0_hats`` at every step.

    Returns ({metric: [S]}, reference outputs [S, B, H, W, C]).
    """
    ref = jnp.stack([reference(xt, ab) for xt, ab in zip(result.xts, result.abs)])
    return per_step(result.x0_hats, ref, reduce), ref
