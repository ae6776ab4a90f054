"""Samplers over any denoiser ``D(x_t, ab) -> x0_hat``, with full trajectories recorded.

* :func:`ddim` -- deterministic DDIM (eta = 0) with exactly the released semantics of
  docs/algorithms.md §1, or stochastic DDIM (eta > 0); ``eta = 1`` on all T steps is DDPM ancestral
  sampling (Song et al. 2021, eq. 16 with sigma_t = eta * sqrt((1-ab_prev)/(1-ab_t)) *
  sqrt(1 - ab_t/ab_prev)), exposed as :func:`ddpm`.
* :func:`edm` -- Euler or Heun on the probability-flow ODE of the VE process
  ``z = x0 + sigma eps`` (Karras et al. 2022, Alg. 1), calling the same VP denoiser through
  ``x_t = z sqrt(ab)``, ``ab = 1 / (1 + sigma^2)``.

The step loop is a ``lax.scan`` inside one ``jit``; the denoiser is passed as a jit *argument*
(its arrays are leaves), so training sets are not embedded into the compiled program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from locality import schedules as schedules_lib


class SampleResult(NamedTuple):
    """``images`` [B, H, W, C]: the unclipped last ``x0_hat``; ``xts``/``x0_hats`` [S, B, H, W, C]:
    the state fed to the denoiser and its output at every step; ``timesteps`` [S]: integer t (DDPM
    grids) or sigma (EDM); ``abs`` [S]: alpha-bar of every step."""

    images: jax.Array
    x0_hats: jax.Array
    xts: jax.Array
    timesteps: np.ndarray
    abs: np.ndarray


def _split(denoiser):
    """Split a denoiser into (array leaves, hashable static rest)
    so jit can take it as an argument."""
    leaves, treedef = jax.tree_util.tree_flatten(denoiser)
    is_arr = tuple(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)
    dyn = [l if a else None for l, a in zip(leaves, is_arr)]
    static = tuple(None if a else l for l, a in zip(leaves, is_arr))
    return dyn, (treedef, static, is_arr)


def _join(dyn, meta):
    treedef, static, is_arr = meta
    leaves = [d if a else s for d, s, a in zip(dyn, static, is_arr)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _progress_callback(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, leave=False)

    def cb(i):
        bar.update(1)
        if int(i) + 1 >= total:
            bar.close()

    return cb


def _prepared(denoiser, abs_):
    """Let a denoiser that plans per noise level (``prepare(abs)``) build its plans for the grid."""
    prepare = getattr(denoiser, "prepare", None)
    return prepare(np.asarray(abs_, np.float64)) if callable(prepare) else denoiser


def _validate_start(x_T, name):
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim != 4:
        raise ValueError(f"{name}: x_T must be [B, H, W, C]; got shape {x_T.shape}")
    if not bool(jnp.all(jnp.isfinite(x_T))):
        raise ValueError(f"{name}: x_T contains NaN or inf")
    return x_T


@functools.partial(jax.jit, static_argnames=("meta", "eta", "has_cb", "cb_token"))
def _ddim_scan(dyn, x_T, abs_, abs_prev, noise, *, meta, eta, has_cb, cb_token=None):
    denoise = _join(dyn, meta)

    def step(x_t, xs):
        i, ab, ab_prev, z = xs
        x0_hat = denoise(x_t, ab)
        eps_hat = (x_t - jnp.sqrt(ab) * x0_hat) / jnp.sqrt(1.0 - ab + 1e-8)
        x0c = jnp.clip((x_t - jnp.sqrt(1.0 - ab) * eps_hat) / jnp.sqrt(ab), -1.0, 1.0)
        if eta == 0.0:
            x_prev = jnp.sqrt(ab_prev) * x0c + jnp.sqrt(1.0 - ab_prev) * eps_hat
        else:
            sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
            dir_coef = jnp.sqrt(jnp.clip(1.0 - ab_prev - sigma**2, 0.0, None))
            x_prev = jnp.sqrt(ab_prev) * x0c + dir_coef * eps_hat + sigma * z
        if has_cb:
            jax.debug.callback(_CALLBACKS[cb_token], i, ordered=True)
        return x_prev, (x_t, x0_hat)

    idx = jnp.arange(abs_.shape[0])
    _, (xts, x0_hats) = jax.lax.scan(step, x_T, (idx, abs_, abs_prev, noise))
    return x0_hats[-1], x0_hats, xts


_CALLBACKS = {}


def ddim(
    denoiser,
    x_T,
    sched: Optional[schedules_lib.DiscreteSchedule] = None,
    num_steps: int = 10,
    *,
    eta: float = 0.0,
    key: Optional[jax.Array] = None,
    timesteps=None,
    progress: bool = False,
) -> SampleResult:
    """DDIM sampling from ``x_T`` [B, H, W, C] with ``denoiser(x_t, ab) -> x0_hat``.

    docs/algorithms.md §1: leading timesteps (900, 800, ..., 0 for 10 steps), ``ab_prev = 1`` after
    the last step; ``eps_hat = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab + 1e-8)``; the update uses
    ``x0c = clip((x_t - sqrt(1-ab) eps_hat) / sqrt(ab), -1, 1)`` and
    ``x_prev = sqrt(ab_prev) x0c + sqrt(1-ab_prev) eps_hat`` (eps not recomputed after clipping);
    the returned image is the unclipped ``x0_hat`` of the last step.

    Args:
      timesteps: optional explicit integer timesteps (high to low) instead of the leading grid.
      eta: 0 = deterministic DDIM; > 0 adds noise (needs ``key``).
      progress: show a progress bar over steps.
    """
    sched = sched or schedules_lib.ddpm_linear()
    x_T = _validate_start(x_T, "ddim")
    if timesteps is None:
        timesteps = schedules_lib.ddim_timesteps(num_steps, sched.num_timesteps)
    timesteps = np.asarray(timesteps, np.int32)
    if timesteps.ndim != 1 or timesteps.size == 0 or np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"timesteps must be a non-empty strictly decreasing 1-D sequence; got {timesteps}"
        )
    abs_ = sched.ab(timesteps).astype(np.float32)
    abs_prev = np.concatenate([abs_[1:], np.ones(1, np.float32)])
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0:
        if key is None:
            raise ValueError(
                "stochastic sampling (eta > 0) needs an explicit PRNG key: key=jax.random.key(0)"
            )
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x_T.shape))(
            jnp.arange(len(timesteps))
        )
    else:
        noise = jnp.zeros((len(timesteps),) + (1,) * x_T.ndim, jnp.float32)
    dyn, meta = _split(_prepared(denoiser, abs_))
    token = None
    if progress:
        token = len(_CALLBACKS)
        desc = "ddim" if eta == 0 else f"ddim eta={eta:g}"  # eta = 1: DDPM ancestral
        _CALLBACKS[token] = _progress_callback(len(timesteps), desc)
    try:
        images, x0_hats, xts = _ddim_scan(
            dyn,
            x_T,
            jnp.asarray(abs_),
            jnp.asarray(abs_prev),
            noise,
            meta=meta,
            eta=float(eta),
            has_cb=progress,
            cb_token=token,
        )
        jax.block_until_ready(images)
    finally:
        if token is not None:
            _CALLBACKS.pop(token, None)
    return SampleResult(images, x0_hats, xts, timesteps, abs_)


def ddpm(
    denoiser,
    x_T,
    sched: Optional[schedules_lib.DiscreteSchedule] = None,
    *,
    key: jax.Array,
    num_steps: Optional[int] = None,
    progress: bool = False,
) -> SampleResult:
    """DDPM ancestral sampling = DDIM with eta = 1 (on all T steps by default)."""
    sched = sched or schedules_lib.ddpm_linear()
    return ddim(
        denoiser, x_T, sched, num_steps or sched.num_timesteps, eta=1.0, key=key, progress=progress
    )


@functools.partial(jax.jit, static_argnames=("meta", "heun"))
def _edm_scan(dyn, z_T, sigmas, *, meta, heun):
    denoise = _join(dyn, meta)

    def d_ve(z, sigma):
        ab = 1.0 / (1.0 + sigma**2)
        return denoise(z * jnp.sqrt(ab), ab)

    def step(z, xs):
        s, s_next = xs
        x0 = d_ve(z, s)
        d = (z - x0) / s
        z_next = z + (s_next - s) * d
        if heun:

            def corr(zn):
                x0n = d_ve(zn, s_next)
                return z + (s_next - s) * 0.5 * (d + (zn - x0n) / s_next)

            z_next = jax.lax.cond(s_next > 0, corr, lambda zn: zn, z_next)
        return z_next, (z * jnp.sqrt(1.0 / (1.0 + s**2)), x0)

    _, (xts, x0s) = jax.lax.scan(step, z_T, (sigmas[:-1], sigmas[1:]))
    return x0s[-1], x0s, xts


def edm(denoiser, z_T, sigmas=None, *, heun: bool = False) -> SampleResult:
    """Euler (or Heun) on the VE PF-ODE ``dz/dsigma = (z - D(z, sigma)) / sigma``.

    ``z_T`` is VE noise (``sigma_max * N(0, I)``); ``sigmas`` high to low ending with 0 (default
    :func:`locality.schedules.edm_sigmas`). The returned image is ``D`` at the last nonzero sigma;
    ``xts`` hold the equivalent VP states ``z sqrt(ab)``.
    """
    sigmas = schedules_lib.edm_sigmas() if sigmas is None else np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or sigmas.size < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
        raise ValueError("sigmas must be strictly decreasing and end with 0")
    z_T = _validate_start(z_T, "edm")
    s32 = jnp.asarray(sigmas, jnp.float32)
    ab_grid = 1.0 / (1.0 + np.asarray(s32, np.float64)[:-1] ** 2)
    if heun:
        ab_grid = np.concatenate([ab_grid, 1.0 / (1.0 + np.asarray(s32, np.float64)[1:-1] ** 2)])
    dyn, meta = _split(_prepared(denoiser, np.unique(ab_grid.astype(np.float32))))
    images, x0s, xts = _edm_scan(dyn, z_T, s32, meta=meta, heun=heun)
    ab = (1.0 / (1.0 + sigmas[:-1] ** 2)).astype(np.float32)
    return SampleResult(images, x0s, xts, sigmas[:-1], ab)
