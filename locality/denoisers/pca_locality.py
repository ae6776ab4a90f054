"""The paper's analytical denoiser, "pca_locality" (Lukoianov et al. 2025; docs/algorithms.md §5).

Per noise level, a binary mask per output element is derived from the Wiener filter
``P_t = U diag(s_t) U^T`` (float64, on the host):

    d = diag(P); d[|d| < 1e-6] = 1;  Mc = P / d[:, None];  M = 1[|Mc| >= theta * max|Mc|]

and the denoiser is a masked empirical posterior mean with one softmax per output element:

    dist[b, k, m] = sum_j M[j, m] (x_t[b, j] - sqrt(ab) X[k, j])^2          (column m of M)
    x0_hat[b, m]  = sum_k softmax_k(-dist[b, k, m] / (2 (1 - ab) tau)) X[k, m].

``sum_j M[j, m] x_t[b, j]^2`` does not depend on k and cancels in the softmax, so gathered
paths use ``ab (X^2) @ M - 2 sqrt(ab) ((x_b * X) @ M)`` -- GEMMs at HIGHEST precision, never the
``[B, chunk, n]`` residual tensor of the released code. The training set is stored in chunks
with the items as columns (``x^T`` [n, chunk]), so input rows are gathered contiguously and every
GEMM has the items as its last axis. Three exact evaluation paths compute the masked distances:
``dense`` (one GEMM of the full ``n x n`` mask against the squared residuals), ``tiles``
(spatial tiles of outputs, each gathering the support of M or of its complement) and
``clusters`` (a base column per output plus clustered signed corrections); ``path="auto"`` picks
per noise level the one with the lowest modelled time. The plans of the tiled and clustered paths
and the cost model are built on the host by :mod:`locality.denoisers.pca_plans` (their
description and costs are there); this module builds the masks, holds the plan table and
evaluates it.

Softmax modes: ``"exact"`` is the true posterior mean (global softmax over all N, streamed with
the exact log-sum-exp merge of :mod:`locality.streaming`); ``"chunk_mean"`` reproduces the
released code's equal-weight average of per-chunk posterior means (chunk size and order as given).

Masks depend on ``ab`` and are built in float64 on the host, so a denoiser holds a *plan table*:
the masks (and tiles or clusters) of a set of noise levels, each plan cached on the host.
Samplers call :meth:`PcaLocality.prepare` with their grid before tracing, so one compiled program
serves the whole run and the right entry is selected in-graph from ``ab``; eager calls with a
new ``ab`` build (and cache) a one-entry plan.

Size: about 560 lines, one concept: the denoiser of §5 from its masks to its output. The host
plans and their cost model already live in :mod:`locality.denoisers.pca_plans`; what remains is
the masks, the in-graph distance kernels of the three paths and the class that lays out the plan
table for them. The kernels read exactly the arrays ``PcaLocality._with_plans`` builds (gathered
inputs, signed blocks, base rows, logit permutation), so splitting them off would put the
producer and the only consumer of that layout in different files and make every change to it a
two-file edit.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.denoisers.base import HIGHEST, DenoiserBase, as_train_array, resolve_mesh
from locality.denoisers.pca_plans import PATHS, StepPlan, logit_layout, output_tiles, step_plan
from locality.denoisers.registry import register
from locality.stats import GaussianStats

DIAG_GUARD = 1e-6


# --------------------------------------------------------------------------------------- masks


def wiener_projection(stats: GaussianStats, ab: float) -> np.ndarray:
    """``P_t = U diag(s) U^T`` in float64, ``s = ab lam / (ab lam + 1 - ab)``
    (docs/algorithms.md §4)."""
    lam = np.asarray(stats.eigvals, np.float64)
    s = ab * lam / (ab * lam + (1.0 - ab))
    u = np.asarray(stats.eigvecs, np.float64)
    return (u * s) @ u.T


def masks(stats: GaussianStats, ab: float, threshold: float, mode: str = "global"):
    """The mask of docs/algorithms.md §5 at noise level ``ab``; returns ``(M [n, n], density)``.

    Args:
      threshold: theta. ``0`` returns the soft (unbinarised) mask ``Mc`` itself (float64).
      mode: ``"global"`` (released: one max over the whole matrix), ``"row"`` (max of each row
        of ``Mc``) or ``"column"`` (max of each column, i.e. per output element).
    Returns:
      ``M``: bool [n, n] (float64 for ``threshold=0``), column m = the inputs output m uses;
      ``density``: fraction of nonzero entries.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if threshold > 1:
        raise ValueError(
            f"threshold must be <= 1, got {threshold}: theta is a fraction of the largest |Mc| "
            "(of the whole matrix, a row or a column), so theta > 1 keeps no entry, every mask is "
            "empty and the denoiser returns the training mean; use a value in [0, 1] (released: "
            "0.005 for MNIST / Fashion-MNIST, 0.05 for CIFAR-10, 0.02 for 64 px sets)"
        )
    p = wiener_projection(stats, float(ab))
    d = np.diag(p).copy()
    d[np.abs(d) < DIAG_GUARD] = 1.0
    mc = p / d[:, None]
    if threshold == 0:
        return mc, float(np.mean(mc != 0))
    a = np.abs(mc)
    if mode == "global":
        thr = threshold * a.max()
    elif mode == "row":
        thr = threshold * a.max(axis=1, keepdims=True)
    elif mode == "column":
        thr = threshold * a.max(axis=0, keepdims=True)
    else:
        raise ValueError(f"mode must be 'global', 'row' or 'column', got {mode!r}")
    m = a >= thr
    return m, float(m.mean())


def mask_fields(
    stats: GaussianStats,
    ab: float,
    threshold: float,
    pixels: Sequence[Tuple[int, int]],
    shape: Tuple[int, int, int],
    mode: str = "global",
) -> np.ndarray:
    """The masks of output pixels as images, to set beside sensitivity fields (§5, §9).

    For every pixel ``(r, c)`` of ``pixels``: the inputs that the output elements ``(r, c, ch)``
    use (columns of :func:`masks` at ``ab``), counted over output and input channels, as an
    ``[H, W]`` map -- the binary mask itself for one channel. Returns float64 ``[P, H, W]``.
    """
    h, w, ch = (int(v) for v in shape)
    if stats.n != h * w * ch:
        raise ValueError(f"stats of dimension {stats.n} do not fit images of shape {shape}")
    m, _ = masks(stats, float(ab), threshold, mode)
    cols = np.asarray(m, np.float64).reshape(h, w, ch, h, w, ch)  # [in..., out...]
    return np.stack([cols[:, :, :, r, c, :].sum(axis=(2, 3)) for r, c in pixels])


def _masked_dist_dense(q, xt, ab, mask_t):
    """``dist[b, m, k] = sum_j M[j, m] (q[b, j] - sqrt(ab) X[k, j])^2`` -> [B, n, K].

    ``xt``: the chunk with items as columns, [n, K]. One GEMM of ``M^T`` (``mask_t`` [n, n])
    against the squared residuals. (Expanding the square instead needs a second,
    batch-independent GEMM ``(X^2) @ M``; the residual form does the same single large GEMM and
    has no cancellation.)"""
    r = q[:, :, None] - jnp.sqrt(ab) * xt[None]  # [B, n, K]
    return jnp.matmul(mask_t[None], r * r, precision=HIGHEST)


def _gathered_corrections(q, xt, ab, ins, block_t):
    """``sum_u block[t, u, o] (ab X[k, ins[t, u]]^2 - 2 sqrt(ab) q[b, ins[t, u]] X[k, ins[t, u]])``
    -> [T, B, O, K]: the signed masked distance over the gathered inputs of every tile/cluster,
    up to ``sum_u block q^2`` (constant over items, so it cancels in the softmax).

    Two batched GEMMs with the items as the last (contiguous) axis: ``block^T @ X_g^2`` and
    ``blockq^T @ X_g`` with ``blockq[t, u, (b, o)] = q[b, ins[t, u]] block[t, u, o]``, so every
    gathered input row of ``X_g`` serves ``(B + 1) O`` multiply-adds per item."""
    b = q.shape[0]
    t, o, u = block_t.shape
    k = xt.shape[1]
    xg = xt[ins]  # [T, U, K]
    qg = q[:, ins]  # [B, T, U]
    blockq_t = (qg[:, :, None, :] * block_t[None]).transpose(1, 0, 2, 3).reshape(t, b * o, u)
    g1 = jnp.matmul(block_t, xg * xg, precision=HIGHEST)  # [T, O, K]
    g2 = jnp.matmul(blockq_t, xg, precision=HIGHEST).reshape(t, b, o, k)  # [T, B, O, K]
    return ab * g1[:, None] - 2.0 * jnp.sqrt(ab) * g2


def _tile_dist(q, xt, ab, groups):
    """Masked distances in tile layout -> [B, sum_g T_g * O, K].

    ``groups``: per group ``(ins [T, U], block_t [T, O, U], base [T])``. Per tile: the gathered
    signed corrections (:func:`_gathered_corrections`), plus the full distance for complement
    tiles (``base = 1``), so the result is laid out without transposing item axes.
    """
    full = _full_dist(q, xt, ab)  # [B, K]
    b, k = full.shape
    parts = []
    for ins, block_t, base in groups:
        t, o, _ = block_t.shape
        d = _gathered_corrections(q, xt, ab, ins, block_t)
        d = d + base[:, None, None, None] * full[None, :, None, :]
        parts.append(jnp.swapaxes(d, 0, 1).reshape(b, t * o, k))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _cluster_dist(q, xt, ab, bases_t, groups):
    """Masked distances in cluster layout -> [B, sum_g T_g * O, K] (:class:`ClusterPlan`).

    ``bases_t``: [Kb, n] float32 base columns (``None`` when no cluster has one). Their distances
    take the expanded form of the corrections (the same per-(b, m) constant dropped):
    ``ab bases^T @ X^2 - 2 sqrt(ab) (q_b * bases)^T @ X``, two GEMMs with Kb (B Kb) rows, so no
    [B, n, K] residual tensor is formed for a handful of columns.
    ``groups``: per group ``(ins [T, U], block_t [T, O, U], base [T])``; every cluster adds its
    base's distance (row ``base - 1``; 0 = none) to its gathered signed corrections.
    """
    b = q.shape[0]
    k = xt.shape[1]
    bd = None
    if bases_t is not None:
        kb = bases_t.shape[0]
        bq = (q[:, None, :] * bases_t[None]).reshape(b * kb, -1)  # [B Kb, n]
        bd = ab * jnp.matmul(bases_t, xt * xt, precision=HIGHEST)[None] - 2.0 * jnp.sqrt(
            ab
        ) * jnp.matmul(bq, xt, precision=HIGHEST).reshape(b, kb, k)
        bd = jnp.concatenate([jnp.zeros((b, 1, k), bd.dtype), bd], axis=1)  # row 0: no base
    parts = []
    for ins, block_t, base in groups:
        t, o, _ = block_t.shape
        d = _gathered_corrections(q, xt, ab, ins, block_t)  # [T, B, O, K]
        if bd is not None:
            d = d + jnp.swapaxes(bd[:, base], 0, 1)[:, :, None, :]
        parts.append(jnp.swapaxes(d, 0, 1).reshape(b, t * o, k))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _full_dist(q, xt, ab):
    """Unmasked ``ab ||X||^2 - 2 sqrt(ab) q . X`` -> [B, K] (the optimal denoiser's distance)."""
    return ab * jnp.sum(xt * xt, axis=0)[None] - 2.0 * jnp.sqrt(ab) * jnp.matmul(
        q, xt, precision=HIGHEST
    )


class _PlanTable:
    """Host-side plans (a static pytree field). Equality and hash use only what the compiled
    program depends on -- the path and array shapes of every entry -- so re-planning for new noise
    levels with the same structure reuses the compiled program (masks are array leaves)."""

    def __init__(self, plans: Tuple[StepPlan, ...]):
        self.plans = plans
        self.abs = np.array([p.ab for p in plans], np.float64)
        self.signature = tuple(p.signature for p in plans)

    def __hash__(self):
        return hash(self.signature)

    def __eq__(self, other):
        return isinstance(other, _PlanTable) and other.signature == self.signature


class _Host:
    """Host-side state shared by a denoiser and its re-planned copies (identity-hashed):
    the float64 statistics, a cache of one-entry plans for eager calls and a cache of step plans
    (planning the clusters path takes tens of milliseconds per noise level, so a sampler that
    re-prepares the same grid reuses them)."""

    def __init__(self, stats: GaussianStats):
        self.stats = stats
        self.cache: Dict[float, "PcaLocality"] = {}
        self.plans: Dict[tuple, StepPlan] = {}


@flax.struct.dataclass
class PcaLocality(DenoiserBase):
    chunked: streaming.Chunked  # ((x^T [C, n, cs],), valid): items as columns
    table_abs: jax.Array  # [S] float32 noise levels of the plan table
    table_arrays: Tuple  # per entry: (mask,), ((ins, block, base), ...) or
    # (bases, ((ins, block, base), ...))
    table_perm: jax.Array  # [S, W] output element of each logit column
    table_pos: jax.Array  # [S, n] logit column of each output element
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    host: _Host = flax.struct.field(pytree_node=False)
    plans: _PlanTable = flax.struct.field(pytree_node=False)
    threshold: float = flax.struct.field(pytree_node=False, default=0.005)
    threshold_mode: str = flax.struct.field(pytree_node=False, default="global")
    temperature: float = flax.struct.field(pytree_node=False, default=1.0)
    softmax: str = flax.struct.field(pytree_node=False, default="exact")
    path: str = flax.struct.field(pytree_node=False, default="auto")
    tile: int = flax.struct.field(pytree_node=False, default=4)
    num_centroids: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    cluster_size: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    fixed_mask: bool = flax.struct.field(pytree_node=False, default=False)
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    progress: bool = flax.struct.field(pytree_node=False, default=False)
    name = "pca_locality"

    # ---- plans

    def plan(self, ab: float) -> StepPlan:
        """Build (or fetch from the host cache) the plan of one noise level: mask (float64, on
        the host), density and the path with the lowest modelled cost (``auto``) or the path
        asked for, with its tiles or clusters."""
        key = (
            float(ab),
            self.threshold,
            self.threshold_mode,
            self.path,
            self.tile,
            self.num_centroids,
            self.cluster_size,
        )
        cached = self.host.plans.get(key)
        if cached is None:
            cached = self._build_plan(float(ab))
            if len(self.host.plans) >= 32:  # a few grids' worth; plans hold [n, n] masks
                self.host.plans.clear()
            self.host.plans[key] = cached
        return cached

    def _build_plan(self, ab: float) -> StepPlan:
        if self.fixed_mask:
            mask = self.host.fixed
            density = float(np.mean(mask != 0))
        else:
            mask, density = masks(self.host.stats, ab, self.threshold, self.threshold_mode)
        return step_plan(
            ab,
            mask,
            density,
            self.shape,
            path=self.path,
            tile=self.tile,
            num_centroids=self.num_centroids,
            cluster_size=self.cluster_size,
        )

    def prepare(self, abs_: Sequence[float]) -> "PcaLocality":
        """A copy whose plan table holds the noise levels ``abs_`` (e.g. a sampler's grid)."""
        abs_ = [float(a) for a in np.asarray(abs_, np.float64).reshape(-1)]
        return self._with_plans(tuple(self.plan(a) for a in abs_))

    def _with_plans(self, plans) -> "PcaLocality":
        n = int(np.prod(self.shape))
        outs = output_tiles(self.shape, self.tile)
        width = max(p.width for p in plans)
        arrays, perms, poss = [], [], []
        for p in plans:
            if p.path == "dense":
                m = np.ascontiguousarray(p.mask.T)
                arrays.append(
                    (jnp.asarray(m.astype(np.uint8) if m.dtype == bool else m.astype(np.float32)),)
                )
            else:
                groups = p.clusters.groups if p.path == "clusters" else p.tiles.groups
                g_arrays = tuple(
                    (
                        jnp.asarray(g.ins),
                        jnp.asarray(np.ascontiguousarray(np.swapaxes(g.block, 1, 2))),
                        jnp.asarray(g.base),
                    )
                    for g in groups
                )
                if p.path == "clusters":
                    b = p.clusters.bases
                    bases_t = (
                        jnp.asarray(np.ascontiguousarray(b.T).astype(np.uint8))
                        if b.shape[1]
                        else None
                    )
                    arrays.append((bases_t, g_arrays))
                else:
                    arrays.append(g_arrays)
            perm = logit_layout(p, outs, n, width)
            pos = np.zeros(n, np.int32)
            valid = perm < n
            pos[perm[valid]] = np.flatnonzero(valid)
            perms.append(perm)
            poss.append(pos)
        return self.replace(
            table_abs=jnp.asarray([p.ab for p in plans], jnp.float32),
            table_arrays=tuple(arrays),
            table_perm=jnp.asarray(np.stack(perms)),
            table_pos=jnp.asarray(np.stack(poss)),
            plans=_PlanTable(plans),
        )

    def densities(self) -> Dict[float, float]:
        """{ab: mask density} of the plan table."""
        return {p.ab: p.density for p in self.plans.plans}

    def paths(self) -> Dict[float, str]:
        """{ab: evaluation path} of the plan table."""
        return {p.ab: p.path for p in self.plans.plans}

    # ---- evaluation

    def _dispatch(self, x_t, ab):
        """A validated, non-empty batch (``DenoiserBase.__call__``): run with this plan table if
        it holds ``ab`` (always when traced: samplers prepare their grid), else with a cached
        one-entry plan for ``ab``."""
        if isinstance(ab, jax.core.Tracer):
            if not self.plans.plans:
                raise ValueError(
                    "pca_locality called with a traced ab but no plan table; call "
                    "denoiser.prepare(abs) with the noise levels first (samplers do)"
                )
            return _apply_pca(self, x_t, ab)
        a = float(ab)
        if self.plans.plans and np.min(np.abs(self.plans.abs - a)) <= 1e-7 * max(a, 1e-3):
            return _apply_pca(self, x_t, ab)
        key = float(np.float32(a))
        den = self.host.cache.get(key)
        if den is None:
            den = self.prepare([a])
            if len(self.host.cache) > 64:
                self.host.cache.clear()
            self.host.cache[key] = den
        return _apply_pca(den, x_t, ab)

    def apply(self, x_t, ab):
        b = x_t.shape[0]
        n = int(np.prod(self.shape))
        q = x_t.reshape(b, n)
        scale = 1.0 / (2.0 * (1.0 - ab) * self.temperature)
        paths = [p.path for p in self.plans.plans]
        idx = jnp.argmin(jnp.abs(self.table_abs - ab))
        perm = self.table_perm[idx]  # [W]
        width = perm.shape[0]

        def branch(path, arrays, q_, xt, ab_):
            if path == "dense":
                d = _masked_dist_dense(q_, xt, ab_, arrays[0].astype(jnp.float32))
            elif path == "clusters":
                bases_t, groups = arrays
                bases_t = None if bases_t is None else bases_t.astype(jnp.float32)
                d = _cluster_dist(q_, xt, ab_, bases_t, groups)
            else:
                d = _tile_dist(q_, xt, ab_, arrays)
            pad = width - d.shape[1]
            return d if pad == 0 else jnp.pad(d, ((0, 0), (0, pad), (0, 0)))

        def chunk_fn(ctx, data):
            q_, ab_, scale_, idx_, perm_, tabs = ctx
            (xt,) = data  # [n, K]
            fns = [functools.partial(branch, pth, tab) for pth, tab in zip(paths, tabs)]
            if len(fns) == 1:
                dist = fns[0](q_, xt, ab_)
            else:
                dist = jax.lax.switch(idx_, fns, q_, xt, ab_)
            xv = jnp.concatenate([xt, jnp.zeros((1, xt.shape[1]), xt.dtype)], axis=0)[perm_]
            return -dist * scale_, xv.T[:, :, None]

        out = streaming.stream(
            chunk_fn,
            self.chunked,
            (q, ab, scale, idx, perm, self.table_arrays),
            batch=b,
            m=width,
            d=1,
            mode=self.softmax,
            mesh=self.mesh,
            layout="bmk",
            progress="chunks" if self.progress else None,
        )
        out = out[:, :, 0][:, self.table_pos[idx]]
        return out.reshape(x_t.shape)


@jax.jit
def _apply_pca(den, x_t, ab):
    return den.apply(x_t, ab)


def _chunk_transposed(train_flat: np.ndarray, chunk_size: int, mesh) -> streaming.Chunked:
    """The training set as chunks with the items as columns, ``((x^T [C, n, cs],), valid)``
    (sharded over ``mesh``): every path gathers input rows (``x^T[ins]``, contiguous) and
    contracts over inputs with the items as the last axis."""
    n_shards = 1 if mesh is None else mesh.shape[streaming.DATA_AXIS]
    chunked = streaming.chunk(
        (np.asarray(train_flat, np.float32),), chunk_size, num_shards=n_shards
    )
    chunked = streaming.Chunked((jnp.swapaxes(chunked.data[0], 1, 2),), chunked.valid)
    if mesh is not None:
        chunked = streaming.shard_chunked(chunked, mesh)
    return chunked


@register("pca_locality")
def make_pca_locality(
    *,
    stats: GaussianStats,
    train,
    threshold: float = 0.005,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 512,
    mask=None,
    threshold_mode: str = "global",
    path: str = "auto",
    tile: Optional[int] = None,
    num_centroids: Optional[int] = None,
    cluster_size: Optional[int] = None,
    abs=None,
    mesh=None,
    shard: bool = False,
    progress: bool = False,
) -> PcaLocality:
    """The paper's analytical denoiser (docs/algorithms.md §5).

    Args:
      stats: Gaussian statistics of the training set (``stats.gaussian_stats``).
      train: [N, H, W, C] float32 in [-1, 1].
      threshold: theta in [0, 1] (released: 0.005 MNIST/Fashion-MNIST, 0.05 CIFAR-10, 0.02 64 px
        sets); 0 uses the soft mask ``Mc``.
      temperature: tau.
      softmax: "exact" (posterior mean) or "chunk_mean" (released quirk; depends on chunk_size).
      chunk_size: training images per streamed chunk (released: 512; 256 at 64 px).
      mask: optional explicit [n, n] 0/1 (or real) mask used at every noise level instead of the
        Wiener-derived one; NHWC element order; column m = the inputs output m looks at.
      threshold_mode: "global" (released), "row" or "column" maxima.
      path: "auto" (cheapest per noise level by the cost model), "dense", "tiles" (per tile: gather
        the support of M or of its complement, whichever is smaller), "sparse" (always M),
        "complement" (always 1 - M), "clusters" (per output a base column -- none, all ones or a
        k-means centroid of the mask's columns -- plus signed corrections, with outputs clustered
        so that a cluster gathers the union of its corrections into one dense block). All exact.
      tile: spatial tile size of the tiled paths (default ``min(8, ceil(H / 4))``: 7 at 28 px,
        8 at 32 px; larger tiles run the batched GEMMs closer to the dense rate).
      num_centroids / cluster_size: fix the number of k-means centroid bases (0: bases none / all
        ones only) and the cluster width (a power of two) of the clusters path; default: the
        cheapest of ``CENTROID_COUNTS`` x ``CLUSTER_SIZES`` by the cost model.
      abs: optional noise levels to plan for up front (``prepare``).
      mesh / shard: shard the training set over devices (``shard=True``: all devices).
      progress: show a progress bar over the training-set chunks of every call.
    """
    if not isinstance(stats, GaussianStats):
        raise TypeError(f"pca_locality: stats must be a GaussianStats, got {type(stats).__name__}")
    arr = as_train_array(train)
    if tuple(arr.shape[1:]) != tuple(stats.shape):
        raise ValueError(
            f"pca_locality: training images have shape {arr.shape[1:]} but the "
            f"statistics were computed on images of shape {stats.shape}; use "
            "statistics of the same data and resolution"
        )
    if softmax not in ("exact", "chunk_mean"):
        raise ValueError(f"softmax must be 'exact' or 'chunk_mean', got {softmax!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(repr(p) for p in PATHS)}, got {path!r}")
    if tile is None:
        tile = min(8, -(-int(arr.shape[1]) // 4))
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if num_centroids is not None and (int(num_centroids) != num_centroids or num_centroids < 0):
        raise ValueError(f"num_centroids must be an integer >= 0 (or None), got {num_centroids}")
    if cluster_size is not None and (
        int(cluster_size) != cluster_size
        or cluster_size < 1
        or int(cluster_size) & (int(cluster_size) - 1)
    ):
        raise ValueError(f"cluster_size must be a power of two >= 1 (or None), got {cluster_size}")
    n = int(np.prod(arr.shape[1:]))
    mesh = resolve_mesh(mesh, shard)
    chunked = _chunk_transposed(arr.reshape(arr.shape[0], -1), chunk_size, mesh)
    fixed = mask is not None
    plans: Tuple[StepPlan, ...] = ()
    host = _Host(stats)
    den = PcaLocality(
        chunked=chunked,
        table_abs=jnp.zeros((0,), jnp.float32),
        table_arrays=(),
        table_perm=jnp.zeros((0, 0), jnp.int32),
        table_pos=jnp.zeros((0, n), jnp.int32),
        shape=tuple(arr.shape[1:]),
        host=host,
        plans=_PlanTable(plans),
        threshold=float(threshold),
        threshold_mode=threshold_mode,
        temperature=float(temperature),
        softmax=softmax,
        path=path,
        tile=int(tile),
        num_centroids=None if num_centroids is None else int(num_centroids),
        cluster_size=None if cluster_size is None else int(cluster_size),
        fixed_mask=fixed,
        mesh=mesh,
        progress=bool(progress),
    )
    if fixed:
        m = np.asarray(mask)
        if m.shape != (n, n):
            raise ValueError(
                f"mask must be [n, n] = [{n}, {n}] in NHWC element order; got {m.shape}"
            )
        if not np.all(np.isfinite(m.astype(np.float64))):
            raise ValueError("mask contains NaN or inf")
        if m.dtype != bool and np.all((m == 0) | (m == 1)):
            m = m.astype(bool)
        host.fixed = m
        den = den._with_plans((den.plan(0.5),))
    else:
        masks(stats, 0.5, threshold, threshold_mode)  # validate threshold/mode early
    if abs is not None:
        den = den.prepare(abs)
    return den
