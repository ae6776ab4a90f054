"""The empirical optimal denoiser and the nearest-neighbour baseline (docs/algorithms.md §3).

Optimal (posterior mean under the empirical training distribution):

    D*(x_t) = sum_k w_k x^(k),  w = softmax_k(-||x_t - sqrt(ab) x^(k)||^2 / (2 (1 - ab) tau)).

``||x_t||^2`` is the same for every k and cancels in the softmax, so the logits are
``-(ab ||x^(k)||^2 - 2 sqrt(ab) x_t . x^(k)) / (2 (1 - ab) tau)``: one HIGHEST-precision GEMM
per chunk, streamed exactly over all N with :mod:`locality.streaming`.

``top_k=K`` restricts the softmax to the K training images nearest to ``x_t / sqrt(ab)`` (the
released code's FAISS top-200 approximation); the default ``None`` is exact.

Nearest (released semantics): the training image nearest to the *unscaled* ``x_t``,
``argmin_k ||x_t - x^(k)||^2``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax
import jax
import jax.numpy as jnp

from locality import streaming
from locality.denoisers.base import HIGHEST, DenoiserBase, as_train_array, chunk_train, resolve_mesh
from locality.denoisers.registry import register


def _optimal_chunk(ctx, data):
    q, ab, scale = ctx
    x, sq = data
    cross = jnp.matmul(q, x.T, precision=HIGHEST)  # [B, K]
    logits = -(ab * sq[None, :] - 2.0 * jnp.sqrt(ab) * cross) * scale
    return logits[..., None], x[:, None, :]


def _topk_scan(chunked: streaming.Chunked, score_fn, k: int, batch: int):
    """Running top-k of ``score_fn(x, sq) -> [B, K]`` over all chunks; returns (scores, indices)."""
    cs = chunked.chunk_size

    def body(carry, xs):
        best, idx = carry
        (x, sq), valid, c = xs
        s = jnp.where(valid[None, :], score_fn(x, sq), -jnp.inf)
        gidx = c * cs + jnp.arange(cs, dtype=jnp.int32)
        cand = jnp.concatenate([best, s], axis=1)
        cidx = jnp.concatenate([idx, jnp.broadcast_to(gidx, s.shape)], axis=1)
        best, pos = jax.lax.top_k(cand, k)
        return (best, jnp.take_along_axis(cidx, pos, axis=1)), None

    init = (jnp.full((batch, k), -jnp.inf), jnp.zeros((batch, k), jnp.int32))
    cids = jnp.arange(chunked.num_chunks, dtype=jnp.int32)
    (best, idx), _ = jax.lax.scan(body, init, (chunked.data, chunked.valid, cids))
    return best, idx


@flax.struct.dataclass
class Optimal(DenoiserBase):
    chunked: streaming.Chunked  # ((x [C, cs, n], ||x||^2 [C, cs]), valid [C, cs])
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    temperature: float = flax.struct.field(pytree_node=False, default=1.0)
    top_k: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    name = "optimal"

    def apply(self, x_t, ab):
        b = x_t.shape[0]
        q = x_t.reshape(b, -1)
        scale = 1.0 / (2.0 * (1.0 - ab) * self.temperature)
        if self.top_k is None:
            out = streaming.stream(
                _optimal_chunk,
                self.chunked,
                (q, ab, scale),
                batch=b,
                m=1,
                d=q.shape[1],
                mesh=self.mesh,
            )
            return out.reshape(x_t.shape)
        score = lambda x, sq: (
            -(ab * sq[None, :] - 2.0 * jnp.sqrt(ab) * jnp.matmul(q, x.T, precision=HIGHEST)) * scale
        )
        logits, idx = _topk_scan(self.chunked, score, self.top_k, b)
        w = jax.nn.softmax(logits, axis=1)  # [B, k]
        flat = self.chunked.data[0].reshape(-1, q.shape[1])
        out = jnp.einsum("bk,bkn->bn", w, flat[idx], precision=HIGHEST)
        return out.reshape(x_t.shape)


@register("optimal")
def make_optimal(
    *,
    train,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    chunk_size: int = 512,
    mesh=None,
    shard: bool = False,
) -> Optimal:
    """Exact posterior mean over ``train`` [N, H, W, C] (``top_k=None``) or over its top-k.

    ``mesh``/``shard=True`` shard the training set over devices (exact merge).
    """
    arr = as_train_array(train)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None:
        if not 1 <= int(top_k) <= arr.shape[0]:
            raise ValueError(f"top_k must be in [1, N={arr.shape[0]}], got {top_k}")
        if mesh is not None or shard:
            raise ValueError("top_k is not supported with sharding; use top_k=None")
        top_k = int(top_k)
    mesh = resolve_mesh(mesh, shard)
    chunked = chunk_train(arr.reshape(arr.shape[0], -1), chunk_size, mesh)
    return Optimal(
        chunked=chunked,
        shape=tuple(arr.shape[1:]),
        temperature=float(temperature),
        top_k=top_k,
        mesh=mesh,
    )


@flax.struct.dataclass
class Nearest(DenoiserBase):
    chunked: streaming.Chunked
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    name = "nearest"

    def apply(self, x_t, ab):
        del ab  # released semantics: nearest to the unscaled x_t
        b = x_t.shape[0]
        q = x_t.reshape(b, -1)
        score = lambda x, sq: 2.0 * jnp.matmul(q, x.T, precision=HIGHEST) - sq[None, :]
        _, idx = _topk_scan(self.chunked, score, 1, b)
        flat = self.chunked.data[0].reshape(-1, q.shape[1])
        return flat[idx[:, 0]].reshape(x_t.shape)


@register("nearest")
def make_nearest(*, train, chunk_size: int = 512) -> Nearest:
    """The training image nearest (L2) to the unscaled ``x_t``."""
    arr = as_train_array(train)
    chunked = chunk_train(arr.reshape(arr.shape[0], -1), chunk_size, None)
    return Nearest(chunked=chunked, shape=tuple(arr.shape[1:]))
