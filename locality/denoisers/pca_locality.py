"""The paper's analytical denoiser, "pca_locality" (Lukoianov et al. 2025; ALGORITHMS.md §5).

Per noise level, a binary mask per output element is derived from the Wiener filter
``P_t = U diag(s_t) U^T`` (float64, on the host):

    d = diag(P); d[|d| < 1e-6] = 1;  Mc = P / d[:, None];  M = 1[|Mc| >= theta * max|Mc|]

and the denoiser is a masked empirical posterior mean with one softmax per output element:

    dist[b, k, m] = sum_j M[j, m] (x_t[b, j] - sqrt(ab) X[k, j])^2          (column m of M)
    x0_hat[b, m]  = sum_k softmax_k(-dist[b, k, m] / (2 (1 - ab) tau)) X[k, m].

``sum_j M[j, m] x_t[b, j]^2`` does not depend on k and cancels in the softmax, so the logits use
``ab (X^2) @ M - 2 sqrt(ab) ((x_b * X) @ M)`` -- GEMMs at HIGHEST precision, never the
``[B, chunk, n]`` residual tensor of the released code. Three exact evaluation paths compute
those masked distances; the path is chosen per noise level from the mask itself:

* ``dense``: the two GEMMs against the full ``n x n`` mask.
* ``sparse``: output elements are grouped into spatial tiles; each tile gathers only the union of
  its columns' supports (``U`` inputs) and multiplies by that ``U x tile`` block of M. Cost scales
  with ``U / n`` -- the mask density at low noise.
* ``complement``: at high noise most of M is 1, so ``dist = full distance - masked distance with
  (1 - M)``, the second term evaluated with the sparse path on the complement.

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
class SparsePlan:
    """Gather plan for a sparse mask ``S`` (either M or 1 - M).

    ``outs``: [T, O] output indices per tile (-1 = padding); ``ins``: [T, U] gathered input indices
    (padding repeats index 0 with a zero block row); ``block``: [T, U, O] float32 ``S[ins, outs]``.
    """

    outs: np.ndarray
    ins: np.ndarray
    block: np.ndarray

    @property
    def union(self) -> int:
        return int(self.ins.shape[1])


def sparse_plan(mask: np.ndarray, shape, tile: int) -> SparsePlan:
    tiles = _tiles(shape, tile)
    mask = np.asarray(mask)
    supports = []
    for t in tiles:
        cols = t[t >= 0]
        supports.append(np.flatnonzero(np.any(mask[:, cols] != 0, axis=1)))
    u = max(1, max(len(s) for s in supports))
    ins = np.zeros((len(tiles), u), np.int32)
    block = np.zeros((len(tiles), u, tiles.shape[1]), np.float32)
    for ti, (t, s) in enumerate(zip(tiles, supports)):
        ins[ti, :len(s)] = s
        valid = t >= 0
        sub = mask[np.ix_(s, t[valid])].astype(np.float32)
        block[ti, :len(s)][:, valid] = sub
    return SparsePlan(outs=tiles.astype(np.int32), ins=ins, block=block)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything needed to evaluate the masked distances at one noise level."""

    ab: float
    path: str            # "dense" | "sparse" | "complement"
    density: float
    mask: np.ndarray     # [n, n] (bool, or float64 soft)
    sparse: Optional[SparsePlan]


def choose_path(density: float, union_direct: int, union_compl: int, n: int,
                sparse_efficiency: float = 0.5) -> str:
    """Cheapest exact path by estimated work: the gathered GEMMs run at roughly
    ``sparse_efficiency`` of the dense GEMM's rate (measured by ``benchmarks/pca_locality.py``)."""
    dense = float(n)
    direct = union_direct / sparse_efficiency
    compl = union_compl / sparse_efficiency + 0.1 * n  # + the full-distance GEMV-like term
    best = min(dense, direct, compl)
    if best == dense:
        return "dense"
    return "sparse" if best == direct else "complement"


# --------------------------------------------------------------------------------------- kernels


def _masked_dist_dense(q, x, ab, mask):
    """``ab (X^2) @ M - 2 sqrt(ab) (q * X) @ M`` -> [B, K, n]."""
    b, n = q.shape
    k = x.shape[0]
    g1 = jnp.matmul(x * x, mask, precision=HIGHEST)                              # [K, n]
    g2 = jnp.matmul((q[:, None, :] * x[None]).reshape(b * k, n), mask, precision=HIGHEST)
    return ab * g1[None] - 2.0 * jnp.sqrt(ab) * g2.reshape(b, k, n)


def _masked_dist_sparse(q, x, ab, ins, outs, block, n):
    """Same quantity for a sparse mask given as tiles (see :class:`SparsePlan`) -> [B, K, n]."""
    b = q.shape[0]
    k = x.shape[0]
    xg = x[:, ins]                                                               # [K, T, U]
    qg = q[:, ins]                                                               # [B, T, U]
    g1 = jnp.einsum("ktu,tuo->kto", xg * xg, block, precision=HIGHEST)           # [K, T, O]
    qb = qg[..., None] * block[None]                                             # [B, T, U, O]
    g2 = jnp.einsum("ktu,btuo->bkto", xg, qb, precision=HIGHEST)                 # [B, K, T, O]
    d = ab * g1[None] - 2.0 * jnp.sqrt(ab) * g2
    t, o = outs.shape
    flat_out = jnp.where(outs >= 0, outs, n).reshape(-1)                         # padding -> n
    res = jnp.zeros((b, k, n + 1), d.dtype).at[:, :, flat_out].set(d.reshape(b, k, t * o))
    return res[:, :, :n]


def _full_dist(q, x, ab):
    """Unmasked ``ab ||X||^2 - 2 sqrt(ab) q . X`` -> [B, K] (the optimal denoiser's distance)."""
    return ab * jnp.sum(x * x, axis=1)[None] - 2.0 * jnp.sqrt(ab) * jnp.matmul(q, x.T, precision=HIGHEST)


class _PlanTable:
    """Host-side plans (a static pytree field). Equality and hash use only what the compiled
    program depends on -- the path of every entry -- so re-planning for new noise levels with the
    same paths reuses the compiled program (the masks themselves are array leaves)."""

    def __init__(self, plans: Tuple[StepPlan, ...]):
        self.plans = plans
        self.abs = np.array([p.ab for p in plans], np.float64)
        self.signature = tuple(p.path for p in plans)

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


@flax.struct.dataclass
class PcaLocality(DenoiserBase):
    chunked: streaming.Chunked                # ((x [C, cs, n], ||x||^2 [C, cs]), valid)
    table_abs: jax.Array                      # [S] float32 noise levels of the plan table
    table_masks: Tuple[jax.Array, ...]        # per entry: [n, n] (uint8/float32) or sparse arrays
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
    name = "pca_locality"

    # ---- plans

    def plan(self, ab: float) -> StepPlan:
        """Build the plan (mask, density, path, tiles) for one noise level (host, float64)."""
        if self.fixed_mask:
            mask = self.plans.plans[0].mask
            density = float(np.mean(mask != 0))
        else:
            mask, density = masks(self.host.stats, float(ab), self.threshold, self.threshold_mode)
        n = mask.shape[0]
        path = self.path
        sp = None
        if path == "auto":
            binary = mask.dtype == bool
            if not binary:
                path = "dense"
            else:
                direct = sparse_plan(mask, self.shape, self.tile)
                compl = sparse_plan(~mask, self.shape, self.tile)
                path = choose_path(density, direct.union, compl.union, n)
                sp = direct if path == "sparse" else compl if path == "complement" else None
        elif path == "sparse":
            sp = sparse_plan(mask, self.shape, self.tile)
        elif path == "complement":
            if mask.dtype != bool:
                raise ValueError("path='complement' needs a binary mask (threshold > 0)")
            sp = sparse_plan(~mask, self.shape, self.tile)
        return StepPlan(ab=float(ab), path=path, density=density, mask=mask, sparse=sp)

    def prepare(self, abs_: Sequence[float]) -> "PcaLocality":
        """A copy whose plan table holds the noise levels ``abs_`` (e.g. a sampler's grid)."""
        abs_ = [float(a) for a in np.asarray(abs_, np.float64).reshape(-1)]
        plans = tuple(self.plan(a) for a in abs_)
        return self._with_plans(plans)

    def _with_plans(self, plans) -> "PcaLocality":
        arrays = []
        for p in plans:
            if p.path == "dense":
                m = p.mask
                arrays.append((jnp.asarray(m.astype(np.uint8) if m.dtype == bool else m.astype(np.float32)),))
            else:
                arrays.append((jnp.asarray(p.sparse.ins), jnp.asarray(p.sparse.outs),
                               jnp.asarray(p.sparse.block)))
        return self.replace(table_abs=jnp.asarray([p.ab for p in plans], jnp.float32),
                            table_masks=tuple(arrays), plans=_PlanTable(plans))

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
        plans = self.plans.plans
        branches = []
        for p, arrays in zip(plans, self.table_masks):
            branches.append(functools.partial(self._dist_fn, p.path, n))
        idx = jnp.argmin(jnp.abs(self.table_abs - ab))

        def chunk_fn(ctx, data):
            q_, ab_, scale_, idx_, tabs = ctx
            x, _ = data
            if len(branches) == 1:
                dist = branches[0](q_, x, ab_, tabs[0])
            else:
                dist = jax.lax.switch(idx_, [functools.partial(br, tab=t) for br, t in
                                             zip(branches, tabs)], q_, x, ab_)
            return -dist * scale_, x[:, :, None]

        out = streaming.stream(chunk_fn, self.chunked, (q, ab, scale, idx, self.table_masks),
                               batch=b, m=n, d=1, mode=self.softmax, mesh=self.mesh)
        return out.reshape(x_t.shape)

    @staticmethod
    def _dist_fn(path, n, q, x, ab, tab):
        if path == "dense":
            return _masked_dist_dense(q, x, ab, tab[0].astype(jnp.float32))
        ins, outs, block = tab
        d = _masked_dist_sparse(q, x, ab, ins, outs, block, n)
        if path == "sparse":
            return d
        return _full_dist(q, x, ab)[:, :, None] - d


@jax.jit
def _apply_pca(den, x_t, ab):
    return den.apply(x_t, ab)


@register("pca_locality")
def make_pca_locality(*, stats: GaussianStats, train, threshold: float = 0.005,
                      temperature: float = 1.0, softmax: str = "exact", chunk_size: int = 512,
                      mask=None, threshold_mode: str = "global", path: str = "auto",
                      tile: int = 4, abs=None, mesh=None, shard: bool = False) -> PcaLocality:
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
      path: "auto" (choose per noise level), "dense", "sparse" or "complement" (all exact).
      tile: spatial tile size of the sparse paths.
      abs: optional noise levels to plan for up front (``prepare``).
      mesh / shard: shard the training set over devices (``shard=True``: all devices).
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
    if path not in ("auto", "dense", "sparse", "complement"):
        raise ValueError(f"path must be 'auto', 'dense', 'sparse' or 'complement', got {path!r}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    n = int(np.prod(arr.shape[1:]))
    mesh = resolve_mesh(mesh, shard)
    chunked = chunk_train(arr.reshape(arr.shape[0], -1), chunk_size, mesh)
    fixed = mask is not None
    plans: Tuple[StepPlan, ...] = ()
    den = PcaLocality(chunked=chunked, table_abs=jnp.zeros((0,), jnp.float32), table_masks=(),
                      shape=tuple(arr.shape[1:]), host=_Host(stats), plans=_PlanTable(plans),
                      threshold=float(threshold), threshold_mode=threshold_mode,
                      temperature=float(temperature), softmax=softmax, path=path, tile=int(tile),
                      fixed_mask=fixed, mesh=mesh)
    if fixed:
        m = np.asarray(mask)
        if m.shape != (n, n):
            raise ValueError(f"mask must be [n, n] = [{n}, {n}] in NHWC element order; got {m.shape}")
        if not np.all(np.isfinite(m.astype(np.float64))):
            raise ValueError("mask contains NaN or inf")
        if m.dtype != bool and np.all((m == 0) | (m == 1)):
            m = m.astype(bool)
        base = StepPlan(ab=0.5, path="dense", density=float(np.mean(m != 0)), mask=m, sparse=None)
        den = den.replace(plans=_PlanTable((base,)))
        den = den._with_plans((den.plan(0.5),))
    else:
        masks(stats, 0.5, threshold, threshold_mode)  # validate threshold/mode early
    if abs is not None:
        den = den.prepare(abs)
    return den
