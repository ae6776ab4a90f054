"""Window sums, window indices and exact softmaxes over dictionaries of training patches: the
numerical building blocks of the local score machines (:mod:`locality.denoisers.local_score`,
docs/algorithms.md §6) and of PSPC-Square (:mod:`locality.denoisers.pspc`, §7).

Source of the machines: M. Kamb and S. Ganguli, "An analytic theory of creativity in
convolutional diffusion models" (2024/2025). For a query window ``x_{O_p}`` and a dictionary of
k x k patches ``P`` the posterior mean reads the patch centres out,

    x0_hat[p] = sum_P softmax_P((2 sqrt(ab) <x_{O_p}, P> - ab ||P||^2) / (2 (1 - ab))) P(0)

(``||x_{O_p}||^2`` cancels). :func:`patch_softmax` evaluates it when every output shares one
dictionary (ELS, interior bbELS pixels) as one GEMM per chunk, :func:`line_softmax` for bbELS
edge pixels whose dictionary is their own line parallel to the edge. Every sum is exact over the
whole training set through :func:`locality.streaming.stream` (running log-sum-exp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.denoisers.base import HIGHEST


def box_same(a, k: int):
    """Zero-padded centred k x k window sums over the last two axes (separable)."""
    r = k // 2
    nd = a.ndim
    ones = (1,) * nd
    a = jax.lax.reduce_window(
        a, 0.0, jax.lax.add, (1,) * (nd - 2) + (k, 1), ones, [(0, 0)] * (nd - 2) + [(r, r), (0, 0)]
    )
    return jax.lax.reduce_window(
        a, 0.0, jax.lax.add, (1,) * (nd - 1) + (k,), ones, [(0, 0)] * (nd - 1) + [(r, r)]
    )


def box_valid(a, s: int):
    """s x s window sums over the last two axes, windows fully inside (top-left anchored).

    ``a`` [..., H, W] -> [..., H - s + 1, W - s + 1]; entry ``(u, v)`` is the sum of the window
    with upper-left corner ``(u, v)`` (separable ``lax.reduce_window``). Shared with PSPC-Square,
    whose squares are exactly these windows (:mod:`locality.denoisers.pspc`).
    """
    nd = a.ndim
    ones = (1,) * nd
    a = jax.lax.reduce_window(a, 0.0, jax.lax.add, (1,) * (nd - 2) + (s, 1), ones, "VALID")
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1,) * (nd - 1) + (s,), ones, "VALID")


def window_index(centres: np.ndarray, k: int, width: int, pad: int) -> np.ndarray:
    """Flat indices [Q, k*k] of the k x k windows centred at ``centres`` [Q, 2] (unpadded
    coordinates) in an image padded by ``pad`` on every side, of padded width ``width``."""
    r = k // 2
    di, dj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    offs = (di * width + dj).reshape(-1)
    top = (centres[:, 0] - r + pad) * width + (centres[:, 1] - r + pad)
    return (top[:, None] + offs[None, :]).astype(np.int32)


def pad_image(x, r: int, mode: str):
    """Pad images [B, H, W, C] by ``r`` on both spatial sides: ``mode="wrap"`` circularly,
    anything else with zeros."""
    if r == 0:
        return x
    return jnp.pad(
        x, ((0, 0), (r, r), (r, r), (0, 0)), mode="wrap" if mode == "wrap" else "constant"
    )


def logit_scale(ab):
    """``1 / (2 (1 - ab))``: the factor of the softmax logits of a posterior mean under ``x_t =
    sqrt(ab) x0 + sqrt(1 - ab) eps`` (module docs); shared with :mod:`locality.denoisers.pspc`."""
    return 1.0 / (2.0 * (1.0 - ab))


QUERY_BLOCK = 1024


def patch_softmax(
    q_cols,
    ab,
    chunked,
    shape,
    *,
    k: int,
    item_idx: np.ndarray,
    centre_idx: np.ndarray,
    train_pad: int,
    train_pad_mode: str,
    softmax: str,
    mesh,
) -> jax.Array:
    """Softmax over a dictionary of training patches shared by all outputs, centre read out.

    Args:
      q_cols: [B, M, k*k*C] the query windows of the M output pixels (im2col).
      item_idx: [Q, k*k] flat window indices of the dictionary patches in every (padded)
        training image; ``centre_idx`` [Q] their centres.

    Returns [B, M, C]. The query windows form one softmax axis (``batch=1``, ``m`` = a block of
    the B*M windows), so the cross terms of a chunk are a single GEMM
    ``patches [K*Q, F] @ q_cols [block, F]^T`` that is already laid out as the stream's
    ``[1, K*Q, block]`` logits (no transposes).
    """
    b, m, f = q_cols.shape
    h, w, c = shape
    q = item_idx.shape[0]

    def chunk_fn(ctx, data):
        qc, ab_, scale = ctx
        (x,) = data
        kk = x.shape[0]
        flat = pad_image(x, train_pad, train_pad_mode).reshape(kk, -1, c)
        patches = flat[:, item_idx].reshape(kk * q, f)  # [K*Q, k*k*C]
        centres = flat[:, centre_idx].reshape(kk * q, 1, c)
        cross = jnp.matmul(patches, qc.T, precision=HIGHEST)  # [K*Q, B*M]
        sq = jnp.sum(patches * patches, axis=-1)
        logits = (2.0 * jnp.sqrt(ab_) * cross - ab_ * sq[:, None]) * scale
        return logits[None], centres

    # one validity flag per dictionary item (every patch of a padding image is invalid)
    items = streaming.Chunked(chunked.data, jnp.repeat(chunked.valid, q, axis=1))
    scale = logit_scale(ab)
    flat_q = q_cols.reshape(b * m, f)
    # Query blocks keep the per-chunk logits [K*Q, block] cache-sized (about 2x faster on CPU
    # than one [K*Q, B*M] block); every block is an independent exact stream.
    qb = min(QUERY_BLOCK, b * m)
    nb = -(-(b * m) // qb)
    flat_q = jnp.pad(flat_q, ((0, nb * qb - b * m), (0, 0)))
    one = lambda blk: streaming.stream(
        chunk_fn, items, (blk, ab, scale), batch=1, m=qb, d=c, mode=softmax, mesh=mesh
    )[0]
    out = jax.lax.map(one, flat_q.reshape(nb, qb, f)) if nb > 1 else one(flat_q)[None]
    return out.reshape(nb * qb, c)[: b * m].reshape(b, m, c)


def line_softmax(
    x_t,
    ab,
    chunked,
    *,
    k: int,
    lines: np.ndarray,
    positions: np.ndarray,
    axis: int,
    softmax: str,
    mesh,
) -> jax.Array:
    """bbELS edge pixels on lines parallel to an edge -> [B, nlines * L, C].

    ``axis=0``: lines are rows ``lines`` [nl] and the outputs of a line are the pixels
    ``(line, positions[j])``; ``axis=1``: lines are columns. The dictionary of output
    ``(line, p_j)`` is the patches of the zero-padded training images centred at ``(line, p_a)``
    for every ``a`` (the same distance from the edge, any interior position along it), so each
    line is one small ``[L, L]`` block of cross terms -- a batched GEMM over lines.
    """
    b, h, w, c = x_t.shape
    r = k // 2
    nl, ll = len(lines), len(positions)
    ii, jj = np.meshgrid(lines, positions, indexing="ij")  # [nl, L]
    centres = (
        np.stack([ii.ravel(), jj.ravel()], 1)
        if axis == 0
        else np.stack([jj.ravel(), ii.ravel()], 1)
    )
    wp = w + 2 * r
    idx = window_index(centres, k, wp, r)  # [nl*L, k*k]
    centre_idx = ((centres[:, 0] + r) * wp + centres[:, 1] + r).astype(np.int32)
    q_cols = pad_image(x_t, r, "zeros").reshape(b, -1, c)[:, idx].reshape(b, nl, ll, -1)

    def chunk_fn(ctx, data):
        qc, ab_, scale = ctx
        (x,) = data
        kk = x.shape[0]
        flat = pad_image(x, r, "zeros").reshape(kk, -1, c)
        patches = flat[:, idx].reshape(kk, nl, ll, -1)  # [K, nl, L(a), F]
        cross = jnp.einsum("klaf,bljf->bkalj", patches, qc, precision=HIGHEST)
        sq = jnp.sum(patches * patches, axis=-1)  # [K, nl, L(a)]
        logits = (
            2.0 * jnp.sqrt(ab_) * cross - ab_ * jnp.transpose(sq, (0, 2, 1))[None, :, :, :, None]
        ) * scale
        cen = flat[:, centre_idx].reshape(kk, nl, ll, c)  # value of item (k, a) for line l
        vals = jnp.broadcast_to(
            jnp.transpose(cen, (0, 2, 1, 3))[:, :, :, None, :], (kk, ll, nl, ll, c)
        )
        return logits.reshape(b, kk * ll, nl * ll), vals.reshape(kk * ll, nl * ll, c)

    items = streaming.Chunked(chunked.data, jnp.repeat(chunked.valid, ll, axis=1))
    return streaming.stream(
        chunk_fn,
        items,
        (q_cols, ab, logit_scale(ab)),
        batch=b,
        m=nl * ll,
        d=c,
        mode=softmax,
        mesh=mesh,
    )


def query_cols(x_t, k: int, centres: np.ndarray, mode: str):
    """The k x k query windows centred at ``centres`` [Q, 2] of ``x_t`` [B, H, W, C] padded as
    ``mode`` (:func:`pad_image`), flattened (im2col) -> [B, Q, k*k*C]."""
    b, h, w, c = x_t.shape
    r = k // 2
    xp = pad_image(x_t, r, mode)
    idx = window_index(centres, k, w + 2 * r, r)
    return xp.reshape(b, -1, c)[:, idx].reshape(b, centres.shape[0], -1)


def pixel_grid(h: int, w: int) -> np.ndarray:
    """Row-major ``(i, j)`` coordinates of every pixel of an H x W image -> int [H*W, 2]."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([i.ravel(), j.ravel()], axis=1)
