"""The paper's analytical denoiser, "pca_locality" (Lukoianov et al. 2025; ALGORITHMS.md §5).

Per noise level, a binary mask per output element is derived from the Wiener filter
``P_t = U diag(s_t) U^T`` (float64, on the host):

    d = diag(P); d[|d| < 1e-6] = 1;  Mc = P / d[:, None];  M = 1[|Mc| >= theta * max|Mc|]

and the denoiser is a masked empirical posterior mean with one softmax per output element:

    dist[b, k, m] = sum_j M[j, m] (x_t[b, j] - sqrt(ab) X[k, j])^2          (column m of M)
    x0_hat[b, m]  = sum_k softmax_k(-dist[b, k, m] / (2 (1 - ab) tau)) X[k, m].

``sum_j M[j, m] x_t[b, j]^2`` does not depend on k and cancels in the softmax, so the logits use
``ab (X^2) @ M - 2 sqrt(ab) ((x_b * X) @ M)`` -- GEMMs at HIGHEST precision, never the
``[B, chunk, n]`` residual tensor of the released code. Two exact evaluation paths compute
those masked distances; the cheaper one is chosen per noise level from the mask itself:

* ``dense``: the two GEMMs against the full ``n x n`` mask.
* ``tiles``: output elements are grouped into spatial tiles. A tile gathers only the union ``U``
  of its columns' supports and multiplies by that ``U x tile`` block of M (low noise: M is a
  local blob), or, where M is mostly 1 (high noise), uses ``dist = full distance - distance
  under (1 - M)`` and gathers the complement's support instead. Tiles of similar ``U`` are
  batched into a few groups of batched GEMMs; cost scales with ``U / n``.

Softmax modes: ``"exact"`` is the true posterior mean (global softmax over all N, streamed with
the exact log-sum-exp merge of :mod:`locality.streaming`); ``"chunk_mean"`` reproduces the
released code's equal-weight average of per-chunk posterior means (chunk size and order as given).

Masks depend on ``ab`` and are built in float64 on the host, so a denoiser holds a *plan table*:
the masks (and tiles) of a set of noise levels. Samplers call :meth:`PcaLocality.prepare` with
their grid before tracing, so one compiled program serves the whole run and the right entry is
selected in-graph from ``ab``; eager calls with a new ``ab`` build (and cache) a one-entry plan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.denoisers.base import (HIGHEST, DenoiserBase, as_train_array, check_query,
                                     chunk_train, resolve_mesh)
from locality.denoisers.registry import register
from locality.stats import GaussianStats

DIAG_GUARD = 1e-6


# --------------------------------------------------------------------------------------- masks


def wiener_projection(stats: GaussianStats, ab: float) -> np.ndarray:
    """``P_t = U diag(s) U^T`` in float64, ``s = ab lam / (ab lam + 1 - ab)`` (ALGORITHMS.md §4)."""
    lam = np.asarray(stats.eigvals, np.float64)
    s = ab * lam / (ab * lam + (1.0 - ab))
    u = np.asarray(stats.eigvecs, np.float64)
    return (u * s) @ u.T


def masks(stats: GaussianStats, ab: float, threshold: float, mode: str = "global"):
    """The mask of ALGORITHMS.md §5 at noise level ``ab``; returns ``(M [n, n], density)``.

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


# --------------------------------------------------------------------------------------- plans


def _tiles(shape, tile: int) -> np.ndarray:
    """Output element indices grouped by ``tile x tile`` spatial tiles, all channels: [T, tile*tile*C]
    (padded with -1 where the image size is not a multiple of ``tile``)."""
    h, w, c = shape
    idx = np.arange(h * w * c).reshape(h, w, c)
    out = []
    for i in range(0, h, tile):
        for j in range(0, w, tile):
            out.append(idx[i:i + tile, j:j + tile].reshape(-1))
    size = tile * tile * c
    return np.stack([np.pad(t, (0, size - len(t)), constant_values=-1) for t in out])


@dataclasses.dataclass(frozen=True)
class TileGroup:
    """Tiles evaluated together, padded to a common gathered width ``U``.

    ``tiles``: [T] tile ids; ``ins``: [T, U] gathered input indices (padding: index 0 with a zero
    block row); ``block``: [T, U, O] float32 signed mask block (``+M`` for direct tiles, ``-(1-M)``
    for complement tiles); ``base``: [T] 1.0 for complement tiles (add the full distance), else 0.
    """

    tiles: np.ndarray
    ins: np.ndarray
    block: np.ndarray
    base: np.ndarray


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """A sparse evaluation plan: output tiles (``outs`` [T, O], -1 = padding) in groups."""

    outs: np.ndarray
    groups: Tuple[TileGroup, ...]

    def cost(self) -> int:
        """Gathered inputs times outputs, summed over groups (dense costs ``n * n``)."""
        return int(sum(g.ins.shape[0] * g.ins.shape[1] * self.outs.shape[1] for g in self.groups))

    @property
    def union(self) -> int:
        return int(max(g.ins.shape[1] for g in self.groups))


def _group_sizes(costs: np.ndarray, max_groups: int) -> list:
    """Split ascending ``costs`` into <= max_groups contiguous groups minimising sum(count * max)."""
    t = len(costs)
    inf = float("inf")
    best = [[inf] * (t + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (t + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, t + 1):
            for i in range(g - 1, j):
                v = best[g - 1][i] + (j - i) * float(costs[j - 1])
                if v < best[g][j]:
                    best[g][j], cut[g][j] = v, i
    g = int(np.argmin([best[k][t] for k in range(max_groups + 1)]))
    bounds, j = [], t
    while g > 0:
        i = cut[g][j]
        bounds.append((i, j))
        j, g = i, g - 1
    return bounds[::-1]


def tile_plan(mask: np.ndarray, shape, tile: int, mode: str = "mixed", max_groups: int = 3) -> TilePlan:
    """Plan the masked distances of a binary ``mask`` by spatial tiles of outputs.

    ``mode``: "direct" (gather the support of M), "complement" (full distance minus the support of
    1 - M) or "mixed" (per tile, whichever gathers fewer inputs).
    """
    mask = np.asarray(mask).astype(bool)
    n = mask.shape[0]
    outs = _tiles(shape, tile)
    o = outs.shape[1]
    sel = []
    for t in outs:
        cols = t[t >= 0]
        sup = np.any(mask[:, cols], axis=1)
        comp = np.any(~mask[:, cols], axis=1)
        nd, nc = int(sup.sum()), int(comp.sum())
        use_c = mode == "complement" or (mode == "mixed" and nc < nd)
        sel.append((use_c, np.flatnonzero(comp if use_c else sup)))
    costs = np.array([max(1, len(s[1])) for s in sel])
    order = np.argsort(costs, kind="stable")
    groups = []
    for i, j in _group_sizes(costs[order], max_groups):
        ids = order[i:j]
        u = int(costs[ids].max())
        ins = np.zeros((len(ids), u), np.int32)
        block = np.zeros((len(ids), u, o), np.float32)
        base = np.zeros(len(ids), np.float32)
        for r, ti in enumerate(ids):
            use_c, support = sel[ti]
            t = outs[ti]
            valid = t >= 0
            ins[r, :len(support)] = support
            sub = (~mask if use_c else mask)[np.ix_(support, t[valid])].astype(np.float32)
            block[r, :len(support)][:, valid] = -sub if use_c else sub
            base[r] = 1.0 if use_c else 0.0
        groups.append(TileGroup(tiles=ids.astype(np.int32), ins=ins, block=block, base=base))
    return TilePlan(outs=outs.astype(np.int32), groups=tuple(groups))


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything needed to evaluate the masked distances at one noise level."""

    ab: float
    path: str            # "dense" | "tiles"
    density: float
    mask: np.ndarray     # [n, n] (bool, or float64 soft)
    tiles: Optional[TilePlan]

    @property
    def signature(self):
        if self.path == "dense":
            return ("dense",)
        return ("tiles", tuple(g.ins.shape for g in self.tiles.groups))


# Gathered (tile) GEMMs run at roughly this fraction of the dense GEMM's rate on CPU (measured
# with benchmarks/pca_locality.py); "auto" uses it to pick the cheaper exact path.
TILE_EFFICIENCY = 0.7


def _masked_dist_dense(q, x, ab, mask_t):
    """``dist[b, m, k] = sum_j M[j, m] (q[b, j] - sqrt(ab) X[k, j])^2`` -> [B, n, K].

    One GEMM of ``M^T`` (``mask_t`` [n, n]) against the squared residuals with the items as
    columns. (Expanding the square instead needs a second, batch-independent GEMM ``(X^2) @ M``;
    the residual form does the same single large GEMM and has no cancellation.)"""
    r = q[:, :, None] - jnp.sqrt(ab) * x.T[None]                                 # [B, n, K]
    return jnp.matmul(mask_t[None], r * r, precision=HIGHEST)


def _tile_dist(x, full, ab, groups):
    """Masked distances in tile layout -> [B, sum_g T_g * O, K].

    ``groups``: per group ``(ins [T, U], blockq_t [T, B*O, U], block_t [T, O, U], base [T])``
    with ``blockq_t[t, b*O + o, u] = q[b, ins[t, u]] * block[t, u, o]`` (built once per chunk
    from the queries). Per tile: ``ab block^T @ X_g^2 - 2 sqrt(ab) blockq^T @ X_g
    (+ the full distance for complement tiles)``, as batched GEMMs over tiles with the items as
    the last (contiguous) axis, so the result is laid out without transposing item axes.
    """
    b, k = full.shape
    xt = x.T                                                                     # [n, K]
    parts = []
    for ins, blockq_t, block_t, base in groups:
        t, o, _ = block_t.shape
        xg = xt[ins]                                                             # [T, U, K]
        g1 = jnp.matmul(block_t, xg * xg, precision=HIGHEST)                     # [T, O, K]
        g2 = jnp.matmul(blockq_t, xg, precision=HIGHEST).reshape(t, b, o, k)     # [T, B, O, K]
        d = ab * g1[:, None] - 2.0 * jnp.sqrt(ab) * g2
        d = d + base[:, None, None, None] * full[None, :, None, :]
        parts.append(jnp.swapaxes(d, 0, 1).reshape(b, t * o, k))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _full_dist(q, x, ab):
    """Unmasked ``ab ||X||^2 - 2 sqrt(ab) q . X`` -> [B, K] (the optimal denoiser's distance)."""
    return ab * jnp.sum(x * x, axis=1)[None] - 2.0 * jnp.sqrt(ab) * jnp.matmul(q, x.T, precision=HIGHEST)


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
    the float64 statistics and a cache of one-entry plans for eager calls."""

    def __init__(self, stats: GaussianStats):
        self.stats = stats
        self.cache: Dict[float, "PcaLocality"] = {}


def _layout(plan: StepPlan, outs: np.ndarray, n: int) -> np.ndarray:
    """Output element of every logit column; ``n`` marks padding columns.

    Dense entries keep the natural element order (padded at the end to the common width), tiled
    entries use their group-major tile order, so no branch has to permute its [B, K, n] logits;
    only the values (per chunk, [K, n]) and the final output (once per call) are permuted.
    """
    width = outs.size
    if plan.path == "dense":
        return np.concatenate([np.arange(n), np.full(width - n, n)]).astype(np.int32)
    perm = outs[np.concatenate([g.tiles for g in plan.tiles.groups])].reshape(-1)
    return np.where(perm >= 0, perm, n).astype(np.int32)


@flax.struct.dataclass
class PcaLocality(DenoiserBase):
    chunked: streaming.Chunked                # ((x [C, cs, n], ||x||^2 [C, cs]), valid)
    table_abs: jax.Array                      # [S] float32 noise levels of the plan table
    table_arrays: Tuple                       # per entry: (mask,) or ((ins, block, base), ...)
    table_perm: jax.Array                     # [S, T*O] output element of each logit column
    table_pos: jax.Array                      # [S, n] logit column of each output element
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    host: _Host = flax.struct.field(pytree_node=False)
    plans: _PlanTable = flax.struct.field(pytree_node=False)
    threshold: float = flax.struct.field(pytree_node=False, default=0.005)
    threshold_mode: str = flax.struct.field(pytree_node=False, default="global")
    temperature: float = flax.struct.field(pytree_node=False, default=1.0)
    softmax: str = flax.struct.field(pytree_node=False, default="exact")
    path: str = flax.struct.field(pytree_node=False, default="auto")
    tile: int = flax.struct.field(pytree_node=False, default=4)
    fixed_mask: bool = flax.struct.field(pytree_node=False, default=False)
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    progress: bool = flax.struct.field(pytree_node=False, default=False)
    name = "pca_locality"

    # ---- plans

    def plan(self, ab: float) -> StepPlan:
        """Build the plan (mask, density, path, tiles) for one noise level (host, float64)."""
        if self.fixed_mask:
            mask = self.host.fixed
            density = float(np.mean(mask != 0))
        else:
            mask, density = masks(self.host.stats, float(ab), self.threshold, self.threshold_mode)
        n = mask.shape[0]
        binary = mask.dtype == bool
        if self.path == "dense" or not binary:
            if self.path not in ("auto", "dense"):
                raise ValueError(f"path={self.path!r} needs a binary mask (threshold > 0)")
            return StepPlan(float(ab), "dense", density, mask, None)
        mode = {"auto": "mixed", "tiles": "mixed", "sparse": "direct",
                "complement": "complement"}[self.path]
        tp = tile_plan(mask, self.shape, self.tile, mode)
        if self.path == "auto" and tp.cost() / TILE_EFFICIENCY >= n * n:
            return StepPlan(float(ab), "dense", density, mask, None)
        return StepPlan(float(ab), "tiles", density, mask, tp)

    def prepare(self, abs_: Sequence[float]) -> "PcaLocality":
        """A copy whose plan table holds the noise levels ``abs_`` (e.g. a sampler's grid)."""
        abs_ = [float(a) for a in np.asarray(abs_, np.float64).reshape(-1)]
        return self._with_plans(tuple(self.plan(a) for a in abs_))

    def _with_plans(self, plans) -> "PcaLocality":
        n = int(np.prod(self.shape))
        outs = _tiles(self.shape, self.tile)
        arrays, perms, poss = [], [], []
        for p in plans:
            if p.path == "dense":
                m = np.ascontiguousarray(p.mask.T)
                arrays.append((jnp.asarray(m.astype(np.uint8) if m.dtype == bool else m.astype(np.float32)),))
            else:
                arrays.append(tuple((jnp.asarray(g.ins),
                                     jnp.asarray(np.ascontiguousarray(np.swapaxes(g.block, 1, 2))),
                                     jnp.asarray(g.base)) for g in p.tiles.groups))
            perm = _layout(p, outs, n)
            pos = np.zeros(n, np.int32)
            valid = perm < n
            pos[perm[valid]] = np.flatnonzero(valid)
            perms.append(perm)
            poss.append(pos)
        return self.replace(table_abs=jnp.asarray([p.ab for p in plans], jnp.float32),
                            table_arrays=tuple(arrays), table_perm=jnp.asarray(np.stack(perms)),
                            table_pos=jnp.asarray(np.stack(poss)), plans=_PlanTable(plans))

    def densities(self) -> Dict[float, float]:
        """{ab: mask density} of the plan table."""
        return {p.ab: p.density for p in self.plans.plans}

    # ---- evaluation

    def __call__(self, x_t, ab):
        x_t, ab = check_query(x_t, ab, self.shape, self.name)
        if isinstance(ab, jax.core.Tracer):
            if not self.plans.plans:
                raise ValueError("pca_locality called with a traced ab but no plan table; call "
                                 "denoiser.prepare(abs) with the noise levels first (samplers do)")
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
        perm = self.table_perm[idx]                                   # [T*O]
        width = perm.shape[0]

        def branch(path, arrays, q_, x, ab_, perm_):
            if path == "dense":
                d = _masked_dist_dense(q_, x, ab_, arrays[0].astype(jnp.float32))
                return d if width == n else jnp.pad(d, ((0, 0), (0, width - n), (0, 0)))
            full = _full_dist(q_, x, ab_)
            groups = []
            for ins, block_t, base in arrays:
                qg = q_[:, ins]                                        # [B, T, U]
                blockq_t = (qg[:, :, None, :] * block_t[None]).transpose(1, 0, 2, 3).reshape(
                    block_t.shape[0], b * block_t.shape[1], block_t.shape[2])
                groups.append((ins, blockq_t, block_t, base))
            return _tile_dist(x, full, ab_, groups)

        def chunk_fn(ctx, data):
            q_, ab_, scale_, idx_, perm_, tabs = ctx
            x, _ = data
            fns = [functools.partial(branch, pth, tab) for pth, tab in zip(paths, tabs)]
            if len(fns) == 1:
                dist = fns[0](q_, x, ab_, perm_)
            else:
                dist = jax.lax.switch(idx_, fns, q_, x, ab_, perm_)
            xv = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)[:, perm_]
            return -dist * scale_, xv[:, :, None]

        out = streaming.stream(chunk_fn, self.chunked,
                               (q, ab, scale, idx, perm, self.table_arrays),
                               batch=b, m=width, d=1, mode=self.softmax, mesh=self.mesh,
                               layout="bmk", progress="chunks" if self.progress else None)
        out = out[:, :, 0][:, self.table_pos[idx]]
        return out.reshape(x_t.shape)


@jax.jit
def _apply_pca(den, x_t, ab):
    return den.apply(x_t, ab)


@register("pca_locality")
def make_pca_locality(*, stats: GaussianStats, train, threshold: float = 0.005,
                      temperature: float = 1.0, softmax: str = "exact", chunk_size: int = 512,
                      mask=None, threshold_mode: str = "global", path: str = "auto",
                      tile: Optional[int] = None, abs=None, mesh=None,
                      shard: bool = False, progress: bool = False) -> PcaLocality:
    """The paper's analytical denoiser (ALGORITHMS.md §5).

    Args:
      stats: Gaussian statistics of the training set (``stats.gaussian_stats``).
      train: [N, H, W, C] float32 in [-1, 1].
      threshold: theta (released: 0.005 MNIST/Fashion-MNIST, 0.05 CIFAR-10, 0.02 64 px sets);
        0 uses the soft mask ``Mc``.
      temperature: tau.
      softmax: "exact" (posterior mean) or "chunk_mean" (released quirk; depends on chunk_size).
      chunk_size: training images per streamed chunk (released: 512; 256 at 64 px).
      mask: optional explicit [n, n] 0/1 (or real) mask used at every noise level instead of the
        Wiener-derived one; NHWC element order; column m = the inputs output m looks at.
      threshold_mode: "global" (released), "row" or "column" maxima.
      path: "auto" (cheapest per noise level), "dense", "tiles" (per tile: gather the support
        of M or of its complement, whichever is smaller), "sparse" (always M), "complement"
        (always 1 - M). All exact.
      tile: spatial tile size of the tiled paths (default ``min(8, ceil(H / 4))``: 7 at 28 px,
        8 at 32 px; larger tiles run the batched GEMMs closer to the dense rate).
      abs: optional noise levels to plan for up front (``prepare``).
      mesh / shard: shard the training set over devices (``shard=True``: all devices).
      progress: show a progress bar over the training-set chunks of every call.
    """
    if not isinstance(stats, GaussianStats):
        raise TypeError(f"pca_locality: stats must be a GaussianStats, got {type(stats).__name__}")
    arr = as_train_array(train)
    if tuple(arr.shape[1:]) != tuple(stats.shape):
        raise ValueError(f"pca_locality: training images have shape {arr.shape[1:]} but the "
                         f"statistics were computed on images of shape {stats.shape}; use "
                         "statistics of the same data and resolution")
    if softmax not in ("exact", "chunk_mean"):
        raise ValueError(f"softmax must be 'exact' or 'chunk_mean', got {softmax!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if path not in ("auto", "dense", "tiles", "sparse", "complement"):
        raise ValueError(f"path must be 'auto', 'dense', 'tiles', 'sparse' or 'complement', got {path!r}")
    if tile is None:
        tile = min(8, -(-int(arr.shape[1]) // 4))
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    n = int(np.prod(arr.shape[1:]))
    mesh = resolve_mesh(mesh, shard)
    chunked = chunk_train(arr.reshape(arr.shape[0], -1), chunk_size, mesh)
    fixed = mask is not None
    plans: Tuple[StepPlan, ...] = ()
    host = _Host(stats)
    den = PcaLocality(chunked=chunked, table_abs=jnp.zeros((0,), jnp.float32), table_arrays=(),
                      table_perm=jnp.zeros((0, 0), jnp.int32), table_pos=jnp.zeros((0, n), jnp.int32),
                      shape=tuple(arr.shape[1:]), host=host, plans=_PlanTable(plans),
                      threshold=float(threshold), threshold_mode=threshold_mode,
                      temperature=float(temperature), softmax=softmax, path=path, tile=int(tile),
                      fixed_mask=fixed, mesh=mesh, progress=bool(progress))
    if fixed:
        m = np.asarray(mask)
        if m.shape != (n, n):
            raise ValueError(f"mask must be [n, n] = [{n}, {n}] in NHWC element order; got {m.shape}")
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
