"""Comparison metrics, as the paper's released code defines them (docs/algorithms.md §10).

Per image, with ``x`` the analytical output and ``y`` the reference (network) output flattened to
D values: ``r2 = 1 - sum (x - y)^2 / (D * var_unbiased(y))`` (a variance of 0 is replaced by 1),
then the mean over the batch. ``mse`` is the mean squared difference; ``pearson`` is Kamb &
Ganguli's r (mean-centred, L2-normalised dot product). ``reduce="none"`` returns per-image values.

``hp_r2`` is the same r2 on the high-pass parts ``x - G_sigma * x`` of both images
(:func:`highpass`; a Gaussian blur over the two spatial axes, reflect padding). r2 alone rewards a
blurred output that matches the network's low frequencies; the high-pass r2 scores only the detail
left after removing them.
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
    return _reduce(
        jnp.where(den > 0, jnp.sum(xc * yc, axis=1) / jnp.where(den > 0, den, 1.0), 0.0), reduce
    )


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian weights ``exp(-j^2 / (2 sigma^2))``, ``j = -r .. r`` with
    ``r = int(truncate * sigma + 0.5)`` -- the radius and weights of
    ``scipy.ndimage.gaussian_filter`` (float64, [2r + 1])."""
    sigma, truncate = float(sigma), float(truncate)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"the blur sigma must be a finite number > 0 (pixels), got {sigma}")
    if not (np.isfinite(truncate) and truncate > 0):
        raise ValueError(f"truncate must be a finite number > 0 (in sigmas), got {truncate}")
    r = int(truncate * sigma + 0.5)
    j = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (j / sigma) ** 2)
    return w / w.sum()


def _blur_axis(x, w: np.ndarray, axis: int):
    r = (len(w) - 1) // 2
    if r == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    # numpy / jnp "symmetric" (d c b a | a b c d | d c b a) is scipy.ndimage's "reflect",
    # repeated for radii longer than the axis.
    xp = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = jnp.zeros_like(x)
    for j, wj in enumerate(w):
        out = out + jnp.float32(wj) * jax.lax.slice_in_dim(xp, j, j + n, axis=axis)
    return out


def highpass(x, sigma: float = 1.0, truncate: float = 4.0):
    """High-pass part ``x - G_sigma * x`` of images ``x`` [..., H, W, C] (docs/algorithms.md §10).

    ``G_sigma *`` is a separable Gaussian blur over the two spatial axes (H, W; channels and
    leading axes separately), ``sigma`` in pixels, truncated at ``truncate`` sigmas and reflect
    padded exactly as ``scipy.ndimage.gaussian_filter(x, (0, .., sigma, sigma, 0), mode="reflect",
    truncate=truncate)``. Pure and jittable (``sigma`` and ``truncate`` are Python floats fixed at
    trace time); float32 out.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"highpass: need images [..., H, W, C]; got shape {x.shape}")
    w = gaussian_kernel1d(sigma, truncate)
    blurred = _blur_axis(_blur_axis(x, w, x.ndim - 3), w, x.ndim - 2)
    return x - blurred


def hp_r2(x, y, sigma: float = 1.0, reduce: str = "mean", truncate: float = 4.0):
    """High-pass r2: :func:`r2` of ``highpass(x, sigma)`` against ``highpass(y, sigma)``
    (``x``, ``y`` [B, H, W, C]; ``y`` the reference). Does not reward a blurred ``x`` that matches
    only the low frequencies of ``y`` (docs/algorithms.md §10)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"hp_r2: shapes differ: {x.shape} vs {y.shape}")
    if x.ndim != 4:
        raise ValueError(f"hp_r2: need image batches [B, H, W, C]; got shape {x.shape}")
    return r2(highpass(x, sigma, truncate), highpass(y, sigma, truncate), reduce)


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
    return {
        k: np.asarray(jax.vmap(lambda u, v, f=f: f(u, v, reduce))(a, b)) for k, f in METRICS.items()
    }


def single_step(reference: Callable, result, reduce: str = "mean") -> Dict[str, np.ndarray]:
    """Single-step comparison: ``reference`` evaluated on the states ``result.xts`` of another
    model's trajectory, compared with that model's ``result.x0_hats`` at every step.

    Returns ({metric: [S]}, reference outputs [S, B, H, W, C]).
    """
    ref = jnp.stack([reference(xt, ab) for xt, ab in zip(result.xts, result.abs)])
    return per_step(result.x0_hats, ref, reduce), ref


def paired_verdict(stats: dict, alpha: float = 0.05) -> str:
    """The verdict for A against B that the report prints (docs/algorithms.md §13), from a
    :func:`paired_comparison` dict: each test read on its own,

    * ``better`` / ``worse``: the paired mean lies more than 2 SE from 0 *and* the sign test
      separates (p < alpha) in the same direction;
    * ``tie``: neither separates;
    * ``mixed (mean: ..., sign test: ...)``: anything else, so neither a mean inside two standard
      errors that hides a consistent per-sample win, nor a mean carried by a few large
      differences, reads as a tie or a win.

    Stricter than the ``verdict`` field of :func:`paired_comparison` (which takes either test).
    """
    d, se = stats["mean_diff"], stats["se"]
    by_mean = ("better" if d > 0 else "worse") if abs(d) > 2 * se else "tie"
    by_sign = "tie"
    if stats["sign_p"] < alpha and stats["wins"] != stats["losses"]:
        by_sign = "better" if stats["wins"] > stats["losses"] else "worse"
    if by_mean == by_sign:
        return by_mean
    return f"mixed (mean: {by_mean}, sign test: {by_sign})"


def paired_comparison(a, b, alpha: float = 0.05) -> dict:
    """Paired comparison of two methods scored on the same samples (e.g. per-sample r2).

    Args:
      a, b: [n] per-sample scores of methods A and B on the same n samples (higher = better).
      alpha: level of both tests.
    Returns a dict of float64 numbers:
      ``mean_diff`` = mean(a - b); ``se`` = its paired standard error std(a - b, ddof=1)/sqrt(n);
      ``z`` = mean_diff / se; ``median_diff``; ``wins`` (a > b), ``losses``, ``ties``;
      ``sign_p``: the exact two-sided sign test (binomial test of wins among the n - ties
      non-tied pairs against 1/2; Dixon & Mood 1946), the p-value scipy.stats.binomtest gives;
      ``verdict``: "A" or "B" when the better one is separated by the paired z (|z| > 1.96 for
      alpha 0.05, a normal approximation) or by the sign test (p < alpha), and "tie" only when
      neither test separates them (so a mean that hides a consistent per-sample win cannot
      read as a tie); ``disagree`` when the two tests point in opposite directions. Reports
      print the stricter :func:`paired_verdict`.
    """
    from scipy import stats as sps

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(
            f"need two [n] score vectors of equal length n >= 2, got {a.shape}, {b.shape}"
        )
    d = a - b
    n = d.size
    se = float(d.std(ddof=1) / np.sqrt(n))
    mean = float(d.mean())
    z = mean / se if se > 0 else (0.0 if mean == 0 else np.copysign(np.inf, mean))
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    p = float(sps.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    zcrit = float(sps.norm.ppf(1 - alpha / 2))
    by_z = ("A" if z > 0 else "B") if abs(z) > zcrit else None
    by_sign = ("A" if wins > losses else "B") if p < alpha else None
    if by_z and by_sign and by_z != by_sign:
        verdict = "disagree"
    else:
        verdict = by_z or by_sign or "tie"
    return {
        "n": n,
        "mean_diff": mean,
        "se": se,
        "z": float(z),
        "median_diff": float(np.median(d)),
        "wins": wins,
        "losses": losses,
        "ties": int(n - wins - losses),
        "sign_p": p,
        "verdict": verdict,
    }
