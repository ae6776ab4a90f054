"""Sample quality of a trained diffusion network, as numbers.

Two measures, so that "a better network" is a number and not only a grid:

- :func:`eps_mse` -- the held-out denoising loss: the DDPM eps-MSE (Ho et al. 2020, eq. 14,
  the training objective) on images the net never saw, at fixed timesteps, with the noise drawn
  once from a seed so that two checkpoints (or two evaluations of one run) are compared on the
  same noisy inputs (common random numbers: the difference of two nets has far less variance
  than either value).
- :func:`frechet_distance` -- the Frechet distance between two Gaussians fitted to features of
  generated and of real images, ``|mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))``
  (Dowson & Landau 1982; used as FID by Heusel et al. 2017 with Inception features). No
  pretrained Inception net is available offline, so the features are those of a classifier
  trained on the same dataset (:mod:`locality.classify`), the usual recipe for MNIST-like sets.
  The trace of the matrix square root is computed in float64 from the eigenvalues of
  ``S_r^(1/2) S_g S_r^(1/2)``, which is symmetric positive semi-definite and has the same
  eigenvalues as ``S_g S_r``, so no non-symmetric ``sqrtm`` and no complex round-off are needed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from locality import schedules as schedules_lib

HELDOUT_TIMESTEPS = (100, 300, 500, 700, 900)


@functools.partial(jax.jit, static_argnums=(0,))
def _eps_sq_err(apply_fn, params, x0, t, eps, ab):
    """Per-image mean squared eps error [B] of ``apply_fn`` at integer timestep ``t``."""
    x_t = schedules_lib.add_noise(x0, eps, ab)
    tt = jnp.full((x0.shape[0],), t, jnp.float32)
    pred = apply_fn({"params": params}, x_t, tt, train=False)
    return jnp.mean(jnp.square(pred - eps), axis=(1, 2, 3))


def eps_mse(
    apply_fn,
    params,
    images,
    timesteps: Sequence[int] = HELDOUT_TIMESTEPS,
    *,
    seed: int = 0,
    batch_size: int = 250,
    schedule: schedules_lib.DiscreteSchedule | None = None,
) -> np.ndarray:
    """Per-image eps-MSE of an eps-prediction network at fixed timesteps.

    Args:
      apply_fn: ``model.apply`` of an unconditional eps network (``apply_fn({"params": p}, x_t,
        t [B] float, train=False) -> eps_hat``).
      params: its parameters (usually the EMA weights).
      images: held-out images [N, H, W, C] in [-1, 1].
      timesteps: integer timesteps of ``schedule`` (default the DDPM linear one).
      seed: the noise of image ``i`` at timestep ``t`` is drawn from
        ``fold_in(fold_in(PRNGKey(seed), t), i // batch_size)``, so it depends on the seed, the
        timestep and the batch only, never on the network.
      batch_size: images per forward pass (part of the noise's definition, see ``seed``).
    Returns:
      float64 [len(timesteps), N]: ``mean((eps_hat - eps)^2)`` of every image at every timestep;
      its mean over images is the held-out loss at that timestep.
    """
    schedule = schedule or schedules_lib.ddpm_linear()
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"need held-out images [N, H, W, C] with N >= 1, got {images.shape}")
    T = schedule.alphas_cumprod.shape[0]
    out = np.zeros((len(timesteps), len(images)), np.float64)
    for i, t in enumerate(timesteps):
        if not 0 <= int(t) < T:
            raise ValueError(f"timestep {t} outside [0, {T}) of schedule {schedule.name!r}")
        ab = jnp.float32(schedule.alphas_cumprod[int(t)])
        key_t = jax.random.fold_in(jax.random.PRNGKey(seed), int(t))
        for j, s in enumerate(range(0, len(images), batch_size)):
            x0 = images[s : s + batch_size]
            eps = jax.random.normal(jax.random.fold_in(key_t, j), x0.shape, jnp.float32)
            out[i, s : s + len(x0)] = np.asarray(_eps_sq_err(apply_fn, params, x0, int(t), eps, ab))
    return out


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] (``N - 1``) of ``features`` [N, d], in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N, d] with N >= 2, got shape {f.shape}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (len(f) - 1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Frechet distance between ``N(mu1, s1)`` and ``N(mu2, s2)`` in float64.

    ``|mu1 - mu2|^2 + Tr(s1) + Tr(s2) - 2 Tr((s1 s2)^(1/2))``, with
    ``Tr((s1 s2)^(1/2)) = sum_i sqrt(lambda_i(s2^(1/2) s1 s2^(1/2)))`` (the two products are
    similar matrices; the second is symmetric PSD). Non-negative up to round-off; 0 iff the two
    Gaussians are equal.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes disagree: mu {mu1.shape} / {mu2.shape}, cov {s1.shape} / {s2.shape}"
        )
    r = _psd_sqrt(s2)
    lam = np.linalg.eigvalsh((r @ s1 @ r + (r @ s1 @ r).T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance_of(features_a, features_b) -> float:
    """:func:`frechet_distance` of Gaussians fitted to two feature sets [N_a, d] and [N_b, d]."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))
