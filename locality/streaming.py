"""The one streaming softmax-weighted average every training-set method is built on.

Every method that averages over training items (optimal, pca_locality, LS/ELS/bbELS, PSPC,
SCFDM) computes, for each query ``b`` and each of ``M`` independent softmaxes ``m``,

    out[b, m, :] = sum_k softmax_k(logits[b, k, m]) * values[k, m, :]

over ``K`` items that never all fit in memory at once. The items are streamed in chunks and
combined with the log-sum-exp algebra (running maximum; numerator and denominator rescaled
when the maximum grows), so the result is exact -- identical up to float round-off for every
chunk size and every order of the items (docs/architecture.md, "Streaming over the training set").

The same merge combines partial results from different devices: :func:`stream` accepts a
``jax.sharding.Mesh`` and then shards the chunk axis over the mesh axis ``"data"`` with
``shard_map``; each device streams its own chunks and the partial accumulators are merged with
``pmax`` / ``psum`` (exactly the merge below, written as collectives).

``mode="chunk_mean"`` reproduces the released implementation's quirk (docs/algorithms.md §5): each
chunk's softmax is normalised within the chunk and the per-chunk posterior means are averaged
with equal weight. It depends on chunk size and order and is *not* the posterior mean.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

DATA_AXIS = "data"


class SoftmaxAcc(NamedTuple):
    """Partial softmax average. ``max``: [B, M]; ``num``: [B, M, D]; ``den``: [B, M].

    Represents ``num / den`` where ``num = sum_k exp(l_k - max) v_k`` and
    ``den = sum_k exp(l_k - max)`` over the items seen so far. ``max = -inf`` means "no item".
    """

    max: jax.Array
    num: jax.Array
    den: jax.Array


class ChunkMeanAcc(NamedTuple):
    """Released-code accumulator: sum of per-chunk posterior means [B, M, D] and chunk count."""

    total: jax.Array
    count: jax.Array


def empty(batch: int, m: int, d: int, dtype=jnp.float32) -> SoftmaxAcc:
    return SoftmaxAcc(
        jnp.full((batch, m), -jnp.inf, dtype),
        jnp.zeros((batch, m, d), dtype),
        jnp.zeros((batch, m), dtype),
    )


def _contract(weights, values, precision):
    """``sum_k weights[b, k, m] * values[k, m or 1, d]`` -> [B, M, D]."""
    if values.shape[1] == 1 and weights.shape[2] != 1:
        return jnp.einsum("bkm,kd->bmd", weights, values[:, 0, :], precision=precision)
    return jnp.einsum("bkm,kmd->bmd", weights, values, precision=precision)


def from_chunk(
    logits, values, valid=None, precision=jax.lax.Precision.HIGHEST, layout: str = "bkm"
) -> SoftmaxAcc:
    """Accumulator of one chunk.

    Args:
      logits: [B, K, M] float32 (``layout="bkm"``) or [B, M, K] (``layout="bmk"``: the items on
        the last, contiguous axis, which is what GEMMs with items as columns produce).
      values: [K, M, D] or [K, 1, D] (shared across the M softmaxes).
      valid: optional bool [K]; False rows (padding) get zero weight.
    """
    if layout == "bmk":
        if valid is not None:
            logits = jnp.where(valid[None, None, :], logits, -jnp.inf)
        m = jnp.max(logits, axis=2)
        m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
        w = jnp.exp(logits - m_safe[:, :, None])
        if values.shape[1] == 1 and w.shape[1] != 1:
            num = jnp.einsum("bmk,kd->bmd", w, values[:, 0, :], precision=precision)
        else:
            num = jnp.einsum("bmk,kmd->bmd", w, values, precision=precision)
        return SoftmaxAcc(m, num, jnp.sum(w, axis=2))
    if valid is not None:
        logits = jnp.where(valid[None, :, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=1)  # [B, M]
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    w = jnp.exp(logits - m_safe[:, None, :])  # exp(-inf) = 0 for padded rows
    return SoftmaxAcc(m, _contract(w, values, precision), jnp.sum(w, axis=1))


def merge(a: SoftmaxAcc, b: SoftmaxAcc) -> SoftmaxAcc:
    """Exact log-sum-exp merge of two partial averages (associative and commutative)."""
    m = jnp.maximum(a.max, b.max)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    sa = jnp.where(jnp.isneginf(a.max), 0.0, jnp.exp(a.max - m_safe))
    sb = jnp.where(jnp.isneginf(b.max), 0.0, jnp.exp(b.max - m_safe))
    return SoftmaxAcc(m, a.num * sa[..., None] + b.num * sb[..., None], a.den * sa + b.den * sb)


def finalize(acc: SoftmaxAcc) -> jax.Array:
    """``num / den`` -> [B, M, D]."""
    return acc.num / acc.den[..., None]


def _chunk_mean_from_chunk(logits, values, valid, precision, layout="bkm") -> ChunkMeanAcc:
    acc = from_chunk(logits, values, valid, precision, layout)
    any_valid = jnp.any(valid) if valid is not None else jnp.array(True)
    mean = jnp.where(any_valid, finalize(acc), 0.0)
    return ChunkMeanAcc(mean, any_valid.astype(jnp.float32))


def _psum_merge(acc: SoftmaxAcc, axis_name: str) -> SoftmaxAcc:
    """Merge per-device accumulators across ``axis_name`` (collective form of :func:`merge`)."""
    m = jax.lax.pmax(acc.max, axis_name)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    s = jnp.where(jnp.isneginf(acc.max), 0.0, jnp.exp(acc.max - m_safe))
    return SoftmaxAcc(
        m, jax.lax.psum(acc.num * s[..., None], axis_name), jax.lax.psum(acc.den * s, axis_name)
    )


class Chunked(NamedTuple):
    """Training items laid out as chunks. ``data``: pytree, leaves [C, chunk, ...];
    ``valid``: [C, chunk]."""

    data: object
    valid: jax.Array

    @property
    def num_chunks(self) -> int:
        return int(self.valid.shape[0])

    @property
    def chunk_size(self) -> int:
        return int(self.valid.shape[1])


def chunk(data, chunk_size: int, num_shards: int = 1) -> Chunked:
    """Pad and reshape ``data`` (pytree, leaves [N, ...]) into ``[C, chunk_size, ...]`` chunks.

    Padding rows are zeros and marked invalid. ``C`` is rounded up to a multiple of
    ``num_shards`` (whole invalid chunks) so the chunk axis can be split over devices. The
    order of items is preserved: item ``i`` sits at chunk ``i // chunk_size``.
    Done once when a denoiser is built, not per call.
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("chunk() got no arrays")
    n = int(leaves[0].shape[0])
    if n == 0:
        raise ValueError("the training set is empty (0 items); pass at least one image")
    if any(int(l.shape[0]) != n for l in leaves):
        raise ValueError(f"all arrays must share the leading axis; got {[l.shape for l in leaves]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = min(int(chunk_size), n)
    c = -(-n // chunk_size)
    c = -(-c // num_shards) * num_shards
    pad = c * chunk_size - n

    def lay(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
        return x.reshape((c, chunk_size) + x.shape[1:])

    valid = (jnp.arange(c * chunk_size) < n).reshape(c, chunk_size)
    return Chunked(jax.tree_util.tree_map(lay, data), valid)


def stream(
    chunk_fn: Callable,
    chunked: Chunked,
    ctx=(),
    *,
    batch: int,
    m: int,
    d: int,
    mode: str = "exact",
    mesh: Optional[Mesh] = None,
    precision=jax.lax.Precision.HIGHEST,
    layout: str = "bkm",
    progress: Optional[str] = None,
) -> jax.Array:
    """Softmax-weighted average over all chunks -> [B, M, D].

    Args:
      chunk_fn: ``chunk_fn(ctx, data_chunk) -> (logits [B, K, M], values [K, M or 1, D])``,
        traced once inside ``lax.scan``.
      chunked: the items, from :func:`chunk`.
      ctx: pytree of arrays every chunk needs (queries, masks, ab); replicated over devices.
      batch, m, d: output sizes B, M, D.
      mode: ``"exact"`` (the true softmax over all items) or ``"chunk_mean"`` (released quirk).
      mesh: optional ``Mesh`` with an axis named ``"data"``: chunks are sharded over it.
      layout: ``"bkm"`` (logits [B, K, M]) or ``"bmk"`` (logits [B, M, K]).
      progress: a label to show a progress bar over chunks (host callback per chunk; ignored
        when sharded).
    """
    if mode not in ("exact", "chunk_mean"):
        raise ValueError(f"mode must be 'exact' or 'chunk_mean', got {mode!r}")

    total = chunked.num_chunks
    show = progress is not None and mesh is None

    def local(ctx, data, valid):
        def body(acc, xs):
            data_c, valid_c, i = xs
            if show:
                jax.debug.callback(functools.partial(_chunk_progress, progress, total), i)
            logits, values = chunk_fn(ctx, data_c)
            if mode == "exact":
                return merge(acc, from_chunk(logits, values, valid_c, precision, layout)), None
            part = _chunk_mean_from_chunk(logits, values, valid_c, precision, layout)
            return ChunkMeanAcc(acc.total + part.total, acc.count + part.count), None

        init = (
            empty(batch, m, d)
            if mode == "exact"
            else ChunkMeanAcc(jnp.zeros((batch, m, d), jnp.float32), jnp.zeros((), jnp.float32))
        )
        idx = jnp.arange(valid.shape[0], dtype=jnp.int32)
        acc, _ = jax.lax.scan(body, init, (data, valid, idx))
        return acc

    if mesh is None:
        acc = local(ctx, chunked.data, chunked.valid)
    else:
        n_dev = mesh.shape[DATA_AXIS]
        if chunked.num_chunks % n_dev:
            raise ValueError(
                f"{chunked.num_chunks} chunks do not split over {n_dev} devices; "
                f"build the chunks with chunk(..., num_shards={n_dev})"
            )

        def sharded(ctx, data, valid):
            acc = local(ctx, data, valid)
            if mode == "exact":
                return _psum_merge(acc, DATA_AXIS)
            return ChunkMeanAcc(
                jax.lax.psum(acc.total, DATA_AXIS), jax.lax.psum(acc.count, DATA_AXIS)
            )

        data_spec = jax.tree_util.tree_map(lambda _: P(DATA_AXIS), chunked.data)
        ctx_spec = jax.tree_util.tree_map(lambda _: P(), ctx)
        acc = jax.shard_map(
            sharded,
            mesh=mesh,
            in_specs=(ctx_spec, data_spec, P(DATA_AXIS)),
            out_specs=P(),
            check_vma=False,
        )(ctx, chunked.data, chunked.valid)
    if mode == "exact":
        return finalize(acc)
    return acc.total / acc.count


_BARS = {}


def _chunk_progress(label: str, total: int, i) -> None:
    """Host side of the per-chunk progress bar (one bar per label, reopened every pass)."""
    i = int(i)
    bar = _BARS.get(label)
    if i == 0 or bar is None:
        if bar is not None:
            bar.close()
        bar = _BARS[label] = tqdm(total=total, desc=label, leave=False, position=1)
    bar.update(1)
    if i + 1 >= total:
        bar.close()
        _BARS.pop(label, None)


def data_mesh(devices=None) -> Mesh:
    """A 1-D ``Mesh`` named ``"data"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def shard_chunked(chunked: Chunked, mesh: Mesh) -> Chunked:
    """Place the chunk axis of ``chunked`` on the mesh's ``"data"`` axis (no copy per call)."""
    sharding = jax.sharding.NamedSharding(mesh, P(DATA_AXIS))
    return Chunked(
        jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), chunked.data),
        jax.device_put(chunked.valid, sharding),
    )
