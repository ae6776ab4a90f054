"""Smoothed closed-form denoiser (docs/algorithms.md §8).

Source: C. Scarvelis, H. Sáez de Ocáriz Borde, J. Solomon, "Closed-form diffusion models"
(arXiv:2310.12395, 2023; TMLR 2025). The closed-form (optimal, empirical) score memorises the
training set; the paper smooths it explicitly so that sampling produces new points (barycenters
of nearby training points) without training.

``smoothing="input"`` (default) -- the form used by the analytical-diffusion comparisons
(docs/algorithms.md §8): the optimal denoiser :mod:`locality.denoisers.optimal` averaged over ``R``
Gaussian perturbations of its input,

    x0_hat(x_t) = (1/R) sum_r D*(x_t + sigma_s xi_r),   xi_r ~ N(0, I)   (R = 10, sigma_s = 0.1).

Relation to the score: with ``score = (sqrt(ab) x0_hat - x_t) / (1 - ab)`` (docs/algorithms.md §1),
this is ``(1/R) sum_r s*(x_t + sigma_s xi_r) + sigma_s mean_r(xi_r) / (1 - ab)``, i.e. the
Monte-Carlo estimate of the Gaussian-smoothed closed-form score ``E_xi[s*(x_t + sigma_s xi)]``
(the second term has mean zero). ``sigma_s`` is in units of ``x_t`` (the VP state), at every
noise level.

``smoothing="train"`` -- smoothing in the space of training points, the paper's own kind of
parameterisation as docs/algorithms.md §8 describes it (its sigma perturbs the training points
rather than the query; this is our reading of that description -- check it against the paper's
definitions before relying on the exact form): the closed-form posterior mean of a training set
whose points are perturbed, averaged over ``R`` perturbations,

    x0_hat(x_t) = (1/R) sum_r sum_k softmax_k(-||x_t - sqrt(ab) y_rk||^2 / (2 (1 - ab))) y_rk,
    y_rk = x^(k) + sigma_s xi_rk,

streamed exactly over all N (the perturbation of item k in sample r is drawn from
``fold_in(fold_in(call_key, r), k)``, so it does not depend on chunking). The paper samples with
few steps from an intermediate time and evaluates the score with nearest neighbours; pass
``top_k`` (input smoothing) for a nearest-neighbour approximation in that spirit.

Randomness: an explicit key is stored in the denoiser. Every call draws its perturbations from
``call_key = fold_in(key, bits(float32 ab))`` (``fold_in_ab=True``, default): the denoiser is a
deterministic function of ``(x_t, ab)`` for a given key and batch shape, and different noise levels
get independent perturbations. ``fold_in_ab=False`` reuses the same perturbations at every level.
:func:`smoothing_noise` exposes the exact draw.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.denoisers.base import HIGHEST, DenoiserBase, as_train_array, resolve_mesh
from locality.denoisers.optimal import Optimal, make_optimal
from locality.denoisers.registry import register


def _key_data(key) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError(
            f"key must be a jax.random key or an int seed; got dtype {key.dtype}, shape {key.shape}"
        )
    return key


def call_key(key_data, ab, fold_in_ab: bool = True) -> jax.Array:
    """The key of one call: ``fold_in(key, bits of float32 ab)`` (or the key itself)."""
    key = jax.random.wrap_key_data(jnp.asarray(key_data))
    if not fold_in_ab:
        return key
    bits = jax.lax.bitcast_convert_type(jnp.asarray(ab, jnp.float32), jnp.uint32)
    return jax.random.fold_in(key, bits)


@functools.partial(jax.jit, static_argnames=("shape", "num_samples", "fold_in_ab"))
def _smoothing_noise(key_data, ab, *, shape, num_samples, fold_in_ab):
    return jax.random.normal(call_key(key_data, ab, fold_in_ab), (num_samples,) + shape)


def smoothing_noise(key_data, ab, shape, num_samples: int, fold_in_ab: bool = True) -> jax.Array:
    """The input perturbations ``xi`` [R, B, H, W, C] of one call (``smoothing="input"``)."""
    return _smoothing_noise(
        jnp.asarray(key_data),
        jnp.asarray(ab, jnp.float32),
        shape=tuple(int(s) for s in shape),
        num_samples=int(num_samples),
        fold_in_ab=bool(fold_in_ab),
    )


@functools.partial(jax.jit, static_argnames=("n", "fold_in_ab"))
def _train_noise(key_data, ab, r, index, *, n, fold_in_ab):
    k = jax.random.fold_in(jax.random.fold_in(call_key(key_data, ab, fold_in_ab), r), index)
    return jax.random.normal(k, (n,))


def train_noise(key_data, ab, r: int, index, n: int, fold_in_ab: bool = True) -> jax.Array:
    """Perturbation [n] of training item ``index`` in sample ``r`` (``smoothing="train"``)."""
    return _train_noise(
        jnp.asarray(key_data),
        jnp.asarray(ab, jnp.float32),
        jnp.asarray(r, jnp.uint32),
        jnp.asarray(index, jnp.uint32),
        n=int(n),
        fold_in_ab=bool(fold_in_ab),
    )


@flax.struct.dataclass
class SCFDM(DenoiserBase):
    """Smoothed closed-form denoiser (module docs).

    Attributes:
      optimal: the optimal denoiser over the training set (input smoothing; else None).
      indexed: ``(x [C, cs, n], index [C, cs])`` chunks (train smoothing; else None).
      key: uint32 [2] key data.
      sigma_s: float32 scalar (a leaf: changing it never recompiles).
    """

    optimal: Optional[Optimal]
    indexed: Optional[streaming.Chunked]
    key: jax.Array
    sigma_s: jax.Array
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    num_samples: int = flax.struct.field(pytree_node=False, default=10)
    smoothing: str = flax.struct.field(pytree_node=False, default="input")
    fold_in_ab: bool = flax.struct.field(pytree_node=False, default=True)
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    name = "scfdm"

    def with_key(self, key) -> "SCFDM":
        """The same denoiser drawing its perturbations from another key."""
        return self.replace(key=_key_data(key))

    def apply(self, x_t, ab):
        r = self.num_samples
        if self.smoothing == "input":
            xi = smoothing_noise(self.key, ab, x_t.shape, r, self.fold_in_ab)
            xr = (x_t[None] + self.sigma_s * xi).reshape((-1,) + x_t.shape[1:])
            out = self.optimal.apply(xr, ab)
            return jnp.mean(out.reshape((r,) + x_t.shape), axis=0)
        return self._apply_train(x_t, ab)

    def _apply_train(self, x_t, ab):
        b = x_t.shape[0]
        q = x_t.reshape(b, -1)
        n = q.shape[1]
        r = self.num_samples
        ckey = call_key(self.key, ab, self.fold_in_ab)

        def chunk_fn(ctx, data):
            q_, ab_, scale, kd, sigma_s = ctx
            x, idx = data
            k = jax.random.wrap_key_data(kd)
            noise = jax.vmap(
                lambda rr: jax.vmap(
                    lambda i: jax.random.normal(
                        jax.random.fold_in(jax.random.fold_in(k, rr), i), (n,)
                    )
                )(idx)
            )(jnp.arange(r))  # [R, K, n]
            y = x[None] + sigma_s * noise  # [R, K, n]
            cross = jnp.einsum("bn,rkn->bkr", q_, y, precision=HIGHEST)
            sq = jnp.sum(y * y, axis=-1).T  # [K, R]
            logits = (2.0 * jnp.sqrt(ab_) * cross - ab_ * sq[None]) * scale
            return logits, jnp.transpose(y, (1, 0, 2))  # values [K, R, n]

        out = streaming.stream(
            chunk_fn,
            self.indexed,
            (q, ab, 1.0 / (2.0 * (1.0 - ab)), jax.random.key_data(ckey), self.sigma_s),
            batch=b,
            m=r,
            d=n,
            mesh=self.mesh,
        )
        return jnp.mean(out, axis=1).reshape(x_t.shape)


@register("scfdm")
def make_scfdm(
    *,
    train,
    num_samples: int = 10,
    sigma_s: float = 0.1,
    key=None,
    seed: int = 0,
    smoothing: str = "input",
    fold_in_ab: bool = True,
    top_k: Optional[int] = None,
    chunk_size: int = 512,
    mesh=None,
    shard: bool = False,
) -> SCFDM:
    """Smoothed closed-form denoiser over ``train`` [N, H, W, C] (module docs).

    Args:
      num_samples: R perturbations per call (default 10).
      sigma_s: perturbation scale (default 0.1).
      key: a ``jax.random`` key; default ``jax.random.key(seed)``.
      smoothing: ``"input"`` (default, docs/algorithms.md §8) or ``"train"`` (training points).
      top_k: nearest-neighbour approximation of the optimal denoiser (input smoothing only).
    """
    arr = as_train_array(train)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not sigma_s >= 0:
        raise ValueError(f"sigma_s must be >= 0, got {sigma_s}")
    if smoothing not in ("input", "train"):
        raise ValueError(f"smoothing must be 'input' or 'train', got {smoothing!r}")
    if smoothing == "train" and top_k is not None:
        raise ValueError("top_k applies to smoothing='input' only")
    mesh = resolve_mesh(mesh, shard)
    optimal, indexed = None, None
    if smoothing == "input":
        optimal = make_optimal(train=arr, top_k=top_k, chunk_size=chunk_size, mesh=mesh)
    else:
        n_shards = 1 if mesh is None else mesh.shape[streaming.DATA_AXIS]
        flat = jnp.asarray(arr.reshape(arr.shape[0], -1))
        cs = max(1, min(chunk_size, (1 << 22) // max(1, int(num_samples) * flat.shape[1])))
        indexed = streaming.chunk(
            (flat, jnp.arange(arr.shape[0], dtype=jnp.uint32)), cs, num_shards=n_shards
        )
        if mesh is not None:
            indexed = streaming.shard_chunked(indexed, mesh)
    return SCFDM(
        optimal=optimal,
        indexed=indexed,
        key=_key_data(jax.random.key(seed) if key is None else key),
        sigma_s=jnp.asarray(sigma_s, jnp.float32),
        shape=tuple(int(s) for s in arr.shape[1:]),
        num_samples=int(num_samples),
        smoothing=smoothing,
        fold_in_ab=bool(fold_in_ab),
        mesh=mesh,
    )


__all__ = ["SCFDM", "make_scfdm", "smoothing_noise", "train_noise", "call_key"]
