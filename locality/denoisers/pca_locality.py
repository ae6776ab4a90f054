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
GEMM has the items as its last axis. Three exact evaluation paths compute the masked distances;
``path="auto"`` picks per noise level the one with the lowest modelled time
(``TILE_EFFICIENCY``, ``CLUSTER_OVERHEAD``, calibrated with benchmarks/pca_locality.py):

* ``dense``: one GEMM of the full ``n x n`` mask against the squared residuals.
* ``tiles``: output elements are grouped into spatial tiles. A tile gathers only the union ``U``
  of its columns' supports and multiplies by that ``U x tile`` block of M (low noise: M is a
  local blob), or, where M is mostly 1 (high noise), uses ``dist = full distance - distance
  under (1 - M)`` and gathers the complement's support instead. Tiles of similar ``U`` are
  batched into a few groups of batched GEMMs; cost scales with ``U / n``.
* ``clusters``: every column m gets a base column c -- none, all ones (the full distance) or a
  Hamming k-means centroid of the mask's columns -- and, exactly,
  ``dist[:, m] = dist_c + sum_{i in M_m \\ c} r_i - sum_{i in c \\ M_m} r_i``; the base
  distances are a few dense columns, and columns sharing a base are merged into clusters of at
  most ``O`` (greedy pairing by overlap of their correction sets, not by position), each gathering
  the union of its corrections into one dense ``[U, O]`` block of -1/0/+1, batched like tiles.
  Cost: ``n`` per base column plus the padded ``U O`` of every cluster. On full Fashion-MNIST
  (theta = 0.005, O = 16-32) the planned cost is 0.33-0.53 of dense at t = 700-900 and
  0.30-0.59 at t = 100-200, where 7 x 7 spatial tiles plan 0.67-0.78 and 0.42-0.62: the
  corrections of nearby columns are scattered, so clusters grouped by overlap gather less. Small
  clusters run further below the GEMM rate (each gathered row feeds only (B + 1) O
  multiply-adds), and at t = 300-600 no exact block form is much below dense: the per-column
  corrections are 10-40 % of n and scattered, and on a CPU only dense blocks run near GEMM speed.

Softmax modes: ``"exact"`` is the true posterior mean (global softmax over all N, streamed with
the exact log-sum-exp merge of :mod:`locality.streaming`); ``"chunk_mean"`` reproduces the
released code's equal-weight average of per-chunk posterior means (chunk size and order as given).

Masks depend on ``ab`` and are built in float64 on the host, so a denoiser holds a *plan table*:
the masks (and tiles or clusters) of a set of noise levels, each plan cached on the host.
Samplers call :meth:`PcaLocality.prepare` with their grid before tracing, so one compiled program
serves the whole run and the right entry is selected in-graph from ``ab``; eager calls with a
new ``ab`` build (and cache) a one-entry plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.denoisers.base import HIGHEST, DenoiserBase, as_train_array, resolve_mesh
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


# --------------------------------------------------------------------------------------- plans


def _tiles(shape, tile: int) -> np.ndarray:
    """Output element indices grouped by ``tile x tile`` spatial tiles, all channels:
    [T, tile*tile*C] (padded with -1 where the image size is not a multiple of ``tile``)."""
    h, w, c = shape
    idx = np.arange(h * w * c).reshape(h, w, c)
    out = []
    for i in range(0, h, tile):
        for j in range(0, w, tile):
            out.append(idx[i : i + tile, j : j + tile].reshape(-1))
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
    """Split ascending ``costs`` into <= max_groups contiguous groups
    minimising sum(count * max)."""
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


def tile_plan(
    mask: np.ndarray, shape, tile: int, mode: str = "mixed", max_groups: int = 3
) -> TilePlan:
    """Plan the masked distances of a binary ``mask`` by spatial tiles of outputs.

    ``mode``: "direct" (gather the support of M), "complement" (full distance minus the support of
    1 - M) or "mixed" (per tile, whichever gathers fewer inputs).
    """
    mask = np.asarray(mask).astype(bool)
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
            ins[r, : len(support)] = support
            sub = (~mask if use_c else mask)[np.ix_(support, t[valid])].astype(np.float32)
            block[r, : len(support)][:, valid] = -sub if use_c else sub
            base[r] = 1.0 if use_c else 0.0
        groups.append(TileGroup(tiles=ids.astype(np.int32), ins=ins, block=block, base=base))
    return TilePlan(outs=outs.astype(np.int32), groups=tuple(groups))


# ------------------------------------------- clusters: base column + clustered signed corrections


@dataclasses.dataclass(frozen=True)
class ClusterGroup:
    """Clusters of output columns evaluated together, padded to a common gathered width ``U``.

    ``clusters``: [T] cluster ids (rows of :attr:`ClusterPlan.outs`); ``ins``: [T, U] gathered input
    indices (padding: index 0 with a zero block row); ``block``: [T, U, O] float32 correction
    ``M[ins, cols] - base[ins]`` with entries in {-1, 0, +1}; ``base``: [T] int32, 0 = no base
    (the correction is the whole column), ``i >= 1`` = column ``i - 1`` of ``ClusterPlan.bases``.
    """

    clusters: np.ndarray
    ins: np.ndarray
    block: np.ndarray
    base: np.ndarray


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """Masked distances as a few dense base columns plus gathered signed corrections.

    Every output column ``m`` has a base ``c`` (none, all ones, or a Hamming k-means centroid of
    the mask's columns) and, exactly,

        dist[:, m] = dist_c + sum_{i in M_m \\ c} r_i - sum_{i in c \\ M_m} r_i   (r_i = residual^2)

    Columns sharing a base are merged into clusters of at most ``O`` columns (greedy pairing by
    overlap of their correction sets), and a cluster gathers the union of its columns' correction
    inputs into one dense ``[U, O]`` block, so the corrections run as batched GEMMs like tiles.

    ``bases``: [n, Kb] bool base columns in use; ``outs``: [C, O] int32 output columns of every
    cluster (-1 = padding); ``groups``: clusters batched by similar ``U`` (padded).
    """

    bases: np.ndarray
    outs: np.ndarray
    groups: Tuple[ClusterGroup, ...]
    num_centroids: int

    @property
    def cluster_size(self) -> int:
        return int(self.outs.shape[1])

    def cost(self) -> int:
        """Multiply-adds per item and query: ``n`` per base column plus gathered inputs times
        columns of every (padded) group; dense costs ``n * n``."""
        n = self.bases.shape[0]
        return int(
            n * self.bases.shape[1]
            + sum(g.ins.shape[0] * g.ins.shape[1] * self.cluster_size for g in self.groups)
        )

    def correction_density(self) -> float:
        """Fraction of nonzero correction entries over ``n * n`` (without padding)."""
        n = self.bases.shape[0]
        return float(sum(np.count_nonzero(g.block) for g in self.groups)) / (n * n)


def kmeans_columns(mask: np.ndarray, k: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Hamming k-means of the columns of a binary ``mask`` (k-means++ start, majority-vote
    centroids); returns the distinct centroids of non-empty clusters as bool [n, k'], k' <= k."""
    cols = np.asarray(mask, bool).T.astype(np.float32)  # [c, n]
    c = cols.shape[0]
    k = int(min(k, c))
    if k <= 0:
        return np.zeros((cols.shape[1], 0), bool)
    norms = cols.sum(1)

    def hamming(cents):  # [c, k] = |a| + |b| - 2 a.b
        return norms[:, None] + cents.sum(1)[None, :] - 2.0 * (cols @ cents.T)

    rng = np.random.default_rng(seed)
    cents = [cols[int(rng.integers(c))]]
    d = hamming(cents[0][None])[:, 0]
    for _ in range(1, k):
        if d.sum() <= 0:
            break
        i = int(rng.choice(c, p=d / d.sum()))
        cents.append(cols[i])
        d = np.minimum(d, hamming(cols[i][None])[:, 0])
    cent = np.stack(cents)
    for _ in range(iters):
        assign = np.argmin(hamming(cent), axis=1)
        new = cent.copy()
        for j in range(len(cent)):
            sel = assign == j
            if sel.any():
                new[j] = cols[sel].mean(0) >= 0.5
        if np.array_equal(new, cent):
            break
        cent = new
    used = np.unique(np.argmin(hamming(cent), axis=1))
    return np.unique(cent[used].astype(bool), axis=0).T


def _match(w: np.ndarray) -> list:
    """Greedy maximum-weight matching of a symmetric weight matrix (entries < 0: not allowed):
    repeatedly pair mutual best partners, falling back to the single best pair on ties."""
    w = w.copy()
    k = w.shape[0]
    np.fill_diagonal(w, -1.0)
    free = np.ones(k, bool)
    pairs = []
    idx = np.arange(k)
    while True:
        w[~free] = -1.0
        w[:, ~free] = -1.0
        best = np.argmax(w, axis=1)
        val = w[idx, best]
        ok = free & (val >= 0)
        if not ok.any():
            return pairs
        mutual = ok & (best[best] == idx) & (idx < best)
        if mutual.any():
            new = [(int(i), int(best[i])) for i in np.flatnonzero(mutual)]
        else:
            f = int(np.argmax(w))
            new = [divmod(f, k)]
        for i, j in new:
            pairs.append((i, j))
            free[i] = free[j] = False


def merge_clusters(diff: np.ndarray, sizes: Sequence[int], window: int = 1024) -> Dict[int, list]:
    """Merge columns into clusters by rounds of pairing (cluster sizes double each round),
    pairing the clusters whose correction sets overlap most (the overlap is what a shared gathered
    block saves). ``diff``: bool [n, c] correction set of each column; ``sizes``: powers of two.
    While there are more than ``window`` clusters, partners are sought only within consecutive
    windows of that many (element order), which bounds the planning cost for large images.
    Returns {size: list of index arrays into the c columns} after the round reaching each size."""
    sets = np.asarray(diff, bool).T.astype(np.float32)  # [c, n]
    clusters = [np.array([i]) for i in range(sets.shape[0])]
    out, size = {}, 1
    for target in sorted(sizes):
        while size < target:
            if len(clusters) > 1:
                pairs = []
                for lo in range(0, len(clusters), window):
                    w = sets[lo : lo + window]
                    pairs += [(lo + i, lo + j) for i, j in _match(w @ w.T)]
                paired = np.zeros(len(clusters), bool)
                new_c, new_s = [], []
                for i, j in pairs:
                    paired[i] = paired[j] = True
                    new_c.append(np.concatenate([clusters[i], clusters[j]]))
                    new_s.append(np.maximum(sets[i], sets[j]))
                for i in np.flatnonzero(~paired):
                    new_c.append(clusters[i])
                    new_s.append(sets[i])
                clusters, sets = new_c, np.stack(new_s)
            size *= 2
        out[target] = list(clusters)
    return out


def _cluster_groups(mask, bases, base_of, clusters, size, max_groups):
    """Pack clusters (column index arrays, each with one base) into padded groups."""
    n = mask.shape[0]
    full = np.concatenate([np.zeros((n, 1), bool), bases], axis=1)  # column 0: no base
    rows = []
    for cols in clusters:
        b = base_of[cols[0]]
        rows.append(np.flatnonzero((mask[:, cols] != full[:, b : b + 1]).any(axis=1)))
    outs = np.full((len(clusters), size), -1, np.int32)
    for i, cols in enumerate(clusters):
        outs[i, : len(cols)] = cols
    costs = np.array([max(1, len(r)) for r in rows])
    order = np.argsort(costs, kind="stable")
    groups = []
    for i, j in _group_sizes(costs[order], max_groups):
        ids = order[i:j]
        u = int(costs[ids].max())
        ins = np.zeros((len(ids), u), np.int32)
        block = np.zeros((len(ids), u, size), np.float32)
        base = np.zeros(len(ids), np.int32)
        for r, ci in enumerate(ids):
            cols, sup = clusters[ci], rows[ci]
            b = base_of[cols[0]]
            ins[r, : len(sup)] = sup
            block[r, : len(sup), : len(cols)] = mask[np.ix_(sup, cols)].astype(np.float32) - full[
                sup, b : b + 1
            ].astype(np.float32)
            base[r] = b
        groups.append(ClusterGroup(clusters=ids.astype(np.int32), ins=ins, block=block, base=base))
    return outs, tuple(groups)


def cluster_plans(
    mask: np.ndarray,
    num_centroids: int,
    cluster_sizes: Sequence[int] = (8, 16, 32, 64),
    max_groups: int = 3,
    seed: int = 0,
) -> Dict[int, ClusterPlan]:
    """Plans of the ``clusters`` path for one binary ``mask`` and every cluster size.

    Bases: all ones (the unmasked distance) and ``num_centroids`` Hamming k-means centroids; every
    column takes the base nearest in Hamming distance, or none when that is nearest (then its
    correction is its own support). Columns with the same base are merged into clusters
    (:func:`merge_clusters`), clusters are padded into ``max_groups`` groups of similar ``U``.
    Returns {cluster size: ClusterPlan}; base columns no cluster uses are dropped.
    """
    mask = np.asarray(mask).astype(bool)
    n, c = mask.shape
    cands = [np.ones((n, 1), bool)]
    if num_centroids > 0:
        cands.append(kmeans_columns(mask, num_centroids, seed=seed))
    cand = np.concatenate(cands, axis=1)
    cand = cand[:, cand.any(axis=0)]  # an all-zero centroid = no base
    cand = np.unique(cand, axis=1) if cand.shape[1] > 1 else cand
    colsf = mask.T.astype(np.float32)
    candf = cand.T.astype(np.float32)
    norms = colsf.sum(1, keepdims=True)
    ham = np.concatenate([norms, norms + candf.sum(1)[None] - 2.0 * (colsf @ candf.T)], axis=1)
    choice = np.argmin(ham, axis=1)  # 0: none, i: cand[:, i - 1]
    used = np.unique(choice[choice > 0])
    bases = cand[:, used - 1]
    remap = np.zeros(cand.shape[1] + 1, np.int64)
    remap[used] = np.arange(1, len(used) + 1)
    base_of = remap[choice]  # per column, into [none, bases]
    full = np.concatenate([np.zeros((n, 1), bool), bases], axis=1)
    sizes = sorted({int(s) for s in cluster_sizes})
    per_size = {s: [] for s in sizes}
    for b in np.unique(base_of):
        cols = np.flatnonzero(base_of == b)
        diff = mask[:, cols] != full[:, b : b + 1]
        for s, cl in merge_clusters(diff, sizes).items():
            per_size[s].extend(cols[x] for x in cl)
    plans = {}
    for s in sizes:
        outs, groups = _cluster_groups(mask, bases, base_of, per_size[s], s, max_groups)
        plans[s] = ClusterPlan(
            bases=bases, outs=outs, groups=groups, num_centroids=int(num_centroids)
        )
    return plans


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything needed to evaluate the masked distances at one noise level."""

    ab: float
    path: str  # "dense" | "tiles" | "clusters"
    density: float
    mask: np.ndarray  # [n, n] (bool, or float64 soft)
    tiles: Optional[TilePlan]
    clusters: Optional[ClusterPlan] = None

    @property
    def signature(self):
        if self.path == "dense":
            return ("dense",)
        if self.path == "clusters":
            c = self.clusters
            return ("clusters", c.bases.shape, c.outs.shape, tuple(g.block.shape for g in c.groups))
        return ("tiles", tuple(g.ins.shape for g in self.tiles.groups))

    @property
    def width(self) -> int:
        """Number of logit columns this entry produces (before padding to the table width)."""
        if self.path == "dense":
            return int(self.mask.shape[0])
        if self.path == "clusters":
            return int(self.clusters.outs.size)
        return int(sum(g.tiles.shape[0] for g in self.tiles.groups) * self.tiles.outs.shape[1])

    def cost(self) -> int:
        """Multiply-adds per item and query of the chosen path (dense: ``n * n``)."""
        if self.path == "dense":
            return int(self.mask.shape[0]) ** 2
        return (self.clusters if self.path == "clusters" else self.tiles).cost()


# Cost model of path="auto": modelled time in dense multiply-adds (dense: n * n per item and
# query). Calibrate with benchmarks/pca_locality.py, which prints the measured values under
# "calibration" (per path: modelled cost / measured time ratio to the dense path).
# Gathered (tile) GEMMs run at roughly this fraction of the dense GEMM's rate on CPU.
TILE_EFFICIENCY = 0.7
# A gathered correction block of O output columns runs at O / (O + CLUSTER_OVERHEAD) of the dense
# rate: every gathered input row is copied (gather, GEMM packing) and feeds only (B + 1) O
# multiply-adds per item, and the batch-independent X^2 term only O, so small clusters pay the
# copies. Measured by benchmarks/pca_locality.py on a quiet 2-core machine (load 1.0, full
# Fashion-MNIST, B = 8, the calibration section of benchmarks/results/pca_locality.json): 33
# columns (a provisional busy-machine estimate was 27).
CLUSTER_OVERHEAD = 33.0
# Candidates of path="auto"/"clusters" when num_centroids / cluster_size are not given. On the
# Fashion-MNIST masks k-means centroid bases do not pay for their dense columns (padded plan cost
# at t = 900 / 500 / 100 with O = 32: 0.42 / 0.84 / 0.39 of dense without centroids, 0.44 / 0.88 /
# 0.49 with 4, 0.56 / 1.05 / 0.58 with 16), so by default only the bases none / all ones are
# planned (pass num_centroids to plan centroids).
CENTROID_COUNTS = (0,)
CLUSTER_SIZES = (8, 16, 32, 64)


def cluster_efficiency(cluster_size: int) -> float:
    """Modelled fraction of the dense GEMM rate reached by the corrections of a cluster plan."""
    return cluster_size / (cluster_size + CLUSTER_OVERHEAD)


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


def _layout(plan: StepPlan, outs: np.ndarray, n: int, width: int) -> np.ndarray:
    """Output element of every logit column; ``n`` marks padding columns.

    Dense entries keep the natural element order, tiled and clustered entries their group-major
    tile (cluster) order; all are padded at the end to the table's common ``width``. So no branch
    has to permute its [B, K, n] logits; only the values (per chunk, [n, K]) and the final output
    (once per call) are permuted.
    """
    if plan.path == "dense":
        perm = np.arange(n)
    elif plan.path == "clusters":
        c = plan.clusters
        perm = c.outs[np.concatenate([g.clusters for g in c.groups])].reshape(-1)
    else:
        perm = outs[np.concatenate([g.tiles for g in plan.tiles.groups])].reshape(-1)
    perm = np.where(perm >= 0, perm, n)
    return np.concatenate([perm, np.full(width - len(perm), n)]).astype(np.int32)


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

    def _cluster_candidates(self, mask) -> list:
        ks = CENTROID_COUNTS if self.num_centroids is None else (self.num_centroids,)
        sizes = CLUSTER_SIZES if self.cluster_size is None else (self.cluster_size,)
        out = []
        for k in ks:
            out.extend(cluster_plans(mask, k, sizes).values())
        return out

    def _build_plan(self, ab: float) -> StepPlan:
        if self.path not in PATHS:
            raise ValueError(
                f"path must be one of {', '.join(repr(p) for p in PATHS)}, got {self.path!r}"
            )
        if self.fixed_mask:
            mask = self.host.fixed
            density = float(np.mean(mask != 0))
        else:
            mask, density = masks(self.host.stats, ab, self.threshold, self.threshold_mode)
        n = mask.shape[0]
        binary = mask.dtype == bool
        if self.path == "dense" or not binary:
            if self.path not in ("auto", "dense"):
                raise ValueError(f"path={self.path!r} needs a binary mask (threshold > 0)")
            return StepPlan(ab, "dense", density, mask, None)
        # (modelled time in dense multiply-adds, plan); dense first so that ties stay dense
        cands = (
            [(float(n * n), StepPlan(ab, "dense", density, mask, None))]
            if self.path == "auto"
            else []
        )
        if self.path in ("auto", "tiles", "sparse", "complement"):
            mode = {
                "auto": "mixed",
                "tiles": "mixed",
                "sparse": "direct",
                "complement": "complement",
            }[self.path]
            tp = tile_plan(mask, self.shape, self.tile, mode)
            cands.append((tp.cost() / TILE_EFFICIENCY, StepPlan(ab, "tiles", density, mask, tp)))
        if self.path in ("auto", "clusters"):
            for cp in self._cluster_candidates(mask):
                bases = n * cp.bases.shape[1]
                time = bases + (cp.cost() - bases) / cluster_efficiency(cp.cluster_size)
                cands.append((time, StepPlan(ab, "clusters", density, mask, None, cp)))
        best = min(range(len(cands)), key=lambda i: (cands[i][0], i))
        return cands[best][1]

    def prepare(self, abs_: Sequence[float]) -> "PcaLocality":
        """A copy whose plan table holds the noise levels ``abs_`` (e.g. a sampler's grid)."""
        abs_ = [float(a) for a in np.asarray(abs_, np.float64).reshape(-1)]
        return self._with_plans(tuple(self.plan(a) for a in abs_))

    def _with_plans(self, plans) -> "PcaLocality":
        n = int(np.prod(self.shape))
        outs = _tiles(self.shape, self.tile)
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
            perm = _layout(p, outs, n, width)
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


PATHS = ("auto", "dense", "tiles", "sparse", "complement", "clusters")


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
