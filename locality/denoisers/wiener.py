"""Wiener filter = the optimal linear (affine) denoiser (docs/algorithms.md §4).

``W* = sqrt(ab) S (ab S + (1 - ab) I)^-1`` and ``b* = (I - sqrt(ab) W*) mu``. In the eigenbasis
``S = U diag(lam) U^T`` with shrinkage ``s_i = ab lam_i / (ab lam_i + 1 - ab)``:

    x0_hat = U (s * (U^T (x_t / sqrt(ab) - mu))) + mu.

Its Jacobian ``U diag(s) U^T / sqrt(ab)`` is constant in ``x_t``.
"""

from __future__ import annotations

from typing import Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality.denoisers.base import HIGHEST, DenoiserBase
from locality.denoisers.registry import register
from locality.stats import GaussianStats


def shrinkage(eigvals, ab):
    """``s_i = ab lam_i / (ab lam_i + 1 - ab)`` (docs/algorithms.md §4)."""
    return ab * eigvals / (ab * eigvals + (1.0 - ab))


def _check_stats(stats, name):
    if not isinstance(stats, GaussianStats):
        raise TypeError(
            f"{name}: stats must be a locality.stats.GaussianStats "
            f"(from stats.gaussian_stats(images)); got {type(stats).__name__}"
        )


@flax.struct.dataclass
class Wiener(DenoiserBase):
    mean: jax.Array  # [n] float32
    eigvals: jax.Array  # [n] float32
    eigvecs: jax.Array  # [n, n] float32
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    name = "wiener"

    def apply(self, x_t, ab):
        b = x_t.shape[0]
        z = x_t.reshape(b, -1) / jnp.sqrt(ab) - self.mean
        c = jnp.matmul(z, self.eigvecs, precision=HIGHEST)
        c = c * shrinkage(self.eigvals, ab)
        out = jnp.matmul(c, self.eigvecs.T, precision=HIGHEST) + self.mean
        return out.reshape(x_t.shape)

    def jacobian(self, ab) -> jax.Array:
        """Dense Jacobian ``U diag(s) U^T / sqrt(ab)`` [n, n]
        (for small n and sensitivity fields)."""
        ab = jnp.asarray(ab, jnp.float32)
        u = self.eigvecs
        return jnp.matmul(u * shrinkage(self.eigvals, ab), u.T, precision=HIGHEST) / jnp.sqrt(ab)


@register("wiener")
def make_wiener(*, stats: GaussianStats) -> Wiener:
    """Wiener filter applied in the eigenbasis of ``stats`` (never forms n x n per call)."""
    _check_stats(stats, "wiener")
    return Wiener(
        mean=jnp.asarray(stats.mean, jnp.float32),
        eigvals=jnp.asarray(stats.eigvals, jnp.float32),
        eigvecs=jnp.asarray(stats.eigvecs, jnp.float32),
        shape=tuple(stats.shape),
    )


def dense_wiener_matrices(cov: np.ndarray, mean: np.ndarray, ab: float):
    """float64 closed form ``W* = sqrt(ab) S (ab S + (1 - ab) I)^-1``,
    ``b* = (I - sqrt(ab) W*) mu``."""
    cov = np.asarray(cov, np.float64)
    n = cov.shape[0]
    a = ab * cov + (1.0 - ab) * np.eye(n)
    # S A^-1 = (A^-T S^T)^T = (A^-1 S)^T since A and S are symmetric.
    w = np.sqrt(ab) * np.linalg.solve(a, cov).T
    b = (np.eye(n) - np.sqrt(ab) * w) @ np.asarray(mean, np.float64)
    return w, b


class _HostArrays:
    """float64 arrays kept on the host; hashed by identity so they can be a static field."""

    def __init__(self, cov, mean):
        self.cov, self.mean = cov, mean


@flax.struct.dataclass
class WienerDense(DenoiserBase):
    """Dense closed-form Wiener in float64 on the host (an oracle for tiny n; O(n^3) per call)."""

    host: _HostArrays = flax.struct.field(pytree_node=False)
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    name = "wiener_dense"

    def apply(self, x_t, ab):
        def host(x, a):
            w, b = dense_wiener_matrices(self.host.cov, self.host.mean, float(a))
            flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
            return (flat @ w.T + b).astype(np.float32).reshape(x.shape)

        return jax.pure_callback(
            host, jax.ShapeDtypeStruct(x_t.shape, jnp.float32), x_t, ab, vmap_method="sequential"
        )


@register("wiener_dense")
def make_wiener_dense(*, stats: GaussianStats) -> WienerDense:
    """Closed-form ``W* x_t + b*`` in float64 (for tests and tiny images only)."""
    _check_stats(stats, "wiener_dense")
    if stats.n > 4096:
        raise ValueError(
            f"wiener_dense solves an n x n system per call; n = {stats.n} is too large "
            "(use 'wiener')"
        )
    return WienerDense(
        host=_HostArrays(stats.covariance(), np.asarray(stats.mean, np.float64)),
        shape=tuple(stats.shape),
    )
