"""Host-side evaluation plans of ``pca_locality`` (docs/algorithms.md §5): tiles, clusters, the
cost model and the choice of a path per noise level, all numpy on the host (plans are cached and
turned into arrays by :class:`locality.denoisers.pca_locality.PcaLocality`). The masked distances
``dist[b, k, m] = sum_j M[j, m] (x_t[b, j] - sqrt(ab) X[k, j])^2`` of a binary mask have three
exact paths; ``path="auto"`` picks per noise level the one with the lowest modelled time
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

Size: about 530 lines, one concept: choosing how to evaluate the masked distances of one noise
level. Tiles, clusters and the dense path are alternative layouts of the same sum;
:class:`StepPlan` carries any of them, :func:`step_plan` compares their modelled costs with
constants (``TILE_EFFICIENCY``, ``CLUSTER_OVERHEAD``) calibrated against each other, and
:func:`logit_layout` orders the outputs of each. Splitting the tile or the cluster planner into a
file of its own would leave these three reading both files, while the cost model and the layouts
it compares are meant to be read, and recalibrated, together.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

PATHS = ("auto", "dense", "tiles", "sparse", "complement", "clusters")


# --------------------------------------------------------------------------------------- tiles


def output_tiles(shape, tile: int) -> np.ndarray:
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
    outs = output_tiles(shape, tile)
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


def _cluster_candidates(mask, num_centroids: Optional[int], cluster_size: Optional[int]) -> list:
    ks = CENTROID_COUNTS if num_centroids is None else (num_centroids,)
    sizes = CLUSTER_SIZES if cluster_size is None else (cluster_size,)
    out = []
    for k in ks:
        out.extend(cluster_plans(mask, k, sizes).values())
    return out


def step_plan(
    ab: float,
    mask: np.ndarray,
    density: float,
    shape,
    *,
    path: str = "auto",
    tile: int,
    num_centroids: Optional[int] = None,
    cluster_size: Optional[int] = None,
) -> StepPlan:
    """The plan of one noise level for ``mask`` [n, n] (bool, or float64 soft): the path asked
    for, or (``path="auto"``) the candidate with the lowest modelled time, dense on ties.

    ``shape``: the image shape (H, W, C); ``tile``: spatial tile size of the tiled paths;
    ``num_centroids`` / ``cluster_size``: fixed clusters-path parameters (``None``: every
    candidate of ``CENTROID_COUNTS`` x ``CLUSTER_SIZES``). A soft mask is always dense.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(repr(p) for p in PATHS)}, got {path!r}")
    n = mask.shape[0]
    binary = mask.dtype == bool
    if path == "dense" or not binary:
        if path not in ("auto", "dense"):
            raise ValueError(f"path={path!r} needs a binary mask (threshold > 0)")
        return StepPlan(ab, "dense", density, mask, None)
    # (modelled time in dense multiply-adds, plan); dense first so that ties stay dense
    cands = [(float(n * n), StepPlan(ab, "dense", density, mask, None))] if path == "auto" else []
    if path in ("auto", "tiles", "sparse", "complement"):
        mode = {
            "auto": "mixed",
            "tiles": "mixed",
            "sparse": "direct",
            "complement": "complement",
        }[path]
        tp = tile_plan(mask, shape, tile, mode)
        cands.append((tp.cost() / TILE_EFFICIENCY, StepPlan(ab, "tiles", density, mask, tp)))
    if path in ("auto", "clusters"):
        for cp in _cluster_candidates(mask, num_centroids, cluster_size):
            bases = n * cp.bases.shape[1]
            time = bases + (cp.cost() - bases) / cluster_efficiency(cp.cluster_size)
            cands.append((time, StepPlan(ab, "clusters", density, mask, None, cp)))
    best = min(range(len(cands)), key=lambda i: (cands[i][0], i))
    return cands[best][1]


def logit_layout(plan: StepPlan, outs: np.ndarray, n: int, width: int) -> np.ndarray:
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
