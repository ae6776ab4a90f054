"""Noise processes, sampling grids and the x0 <-> eps <-> score conversions.

Notation used throughout the project: ``ab`` is alpha-bar, the signal fraction of the
variance-preserving (VP) forward process

    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,   eps ~ N(0, I)          (docs/algorithms.md §1)

Denoisers receive ``ab`` (a float), never a schedule-specific integer timestep, so every method
runs under every process. The variance-exploding (VE / EDM) view of the same process is
``z = x_t / sqrt(ab) = x0 + sigma eps`` with ``sigma = sqrt((1 - ab) / ab)``; use
:func:`ab_from_sigma` to run a VP denoiser on an EDM grid.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete VP schedule with ``num_timesteps`` steps.

    Attributes:
      betas: float32 [T].
      alphas_cumprod: float32 [T], ``ab_t = prod_{s <= t} (1 - beta_s)``.
      name: a short label for logs.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    name: str = "ddpm_linear"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def ab(self, t) -> np.ndarray:
        """Alpha-bar at integer timestep(s) ``t`` (float32)."""
        t = np.asarray(t)
        if np.any(t < 0) or np.any(t >= self.num_timesteps):
            raise ValueError(
                f"timestep(s) {t} outside [0, {self.num_timesteps - 1}] of schedule {self.name!r}"
            )
        return self.alphas_cumprod[t]


def ddpm_linear(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteSchedule:
    """The DDPM linear schedule (Ho et al. 2020), as used by the paper's released code.

    ``betas = linspace(beta_start, beta_end, T)`` in float32 and ``ab = cumprod(1 - betas)``
    accumulated in float32 (docs/algorithms.md §1).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64).astype(np.float32)
    alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32)
    return DiscreteSchedule(betas=betas, alphas_cumprod=alphas_cumprod, name="ddpm_linear")


def ddim_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """ "Leading" DDIM timesteps, high to low: ``(arange(S) * (T // S))[::-1]``.

    For S = 10, T = 1000 this is ``900, 800, ..., 100, 0`` (docs/algorithms.md §1).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    return (np.arange(num_steps, dtype=np.int32) * (num_timesteps // num_steps))[::-1].copy()


def cosine_legacy_ab(t) -> np.ndarray:
    """Kamb & Ganguli's "cosine-legacy" process: ``ab(t) = cos^2(t / 1.008 * pi / 2)``, t in [0, 1].

    No +0.008 offset on t (docs/algorithms.md §1). Returns float64 numpy values.
    """
    t = np.asarray(t, dtype=np.float64)
    if np.any(t < 0) or np.any(t > 1):
        raise ValueError(f"cosine-legacy time must lie in [0, 1], got {t}")
    return np.cos(t / 1.008 * math.pi / 2) ** 2


def cosine_legacy_grid(num_steps: int = 20) -> np.ndarray:
    """Kamb & Ganguli's 20-step grid ``t = linspace(0, 1, S+1)[:-1]`` reversed (0.95 ... 0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return np.linspace(0.0, 1.0, num_steps + 1)[:-1][::-1].copy()


def edm_sigmas(
    num_steps: int = 18, sigma_min: float = 2e-3, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """EDM (Karras et al. 2022, eq. 5) sigma grid, high to low, with a final 0 appended.

    ``sigma_i = (sigma_max^(1/rho) + i/(S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    Returns float64 [S + 1].
    """
    if num_steps < 2:
        raise ValueError(f"EDM grid needs num_steps >= 2, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = np.arange(num_steps, dtype=np.float64)
    inv = 1.0 / rho
    s = (sigma_max**inv + i / (num_steps - 1) * (sigma_min**inv - sigma_max**inv)) ** rho
    return np.concatenate([s, [0.0]])


# ----------------------------------------------------------------------------------------------
# Conversions (docs/algorithms.md §1). They work on numpy or jax arrays; ``ab`` broadcasts.


def sigma_from_ab(ab):
    """VE noise level of a VP state: ``sigma = sqrt((1 - ab) / ab)``."""
    return jnp.sqrt((1.0 - ab) / ab)


def ab_from_sigma(sigma):
    """Inverse of :func:`sigma_from_ab`: ``ab = 1 / (1 + sigma^2)``."""
    return 1.0 / (1.0 + jnp.square(sigma))


def x0_from_eps(x_t, eps, ab):
    """``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)``."""
    return (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)


def eps_from_x0(x_t, x0, ab):
    """``eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)``."""
    return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def score_from_x0(x_t, x0, ab):
    """Score of the noisy marginal from a posterior-mean estimate:
    ``(sqrt(ab) x0 - x_t) / (1 - ab)``."""
    return (jnp.sqrt(ab) * x0 - x_t) / (1.0 - ab)


def add_noise(x0, eps, ab):
    """Forward process ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``."""
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
