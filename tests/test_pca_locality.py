"""pca_locality (docs/algorithms.md §5) against a literal float64 numpy oracle on tiny images."""

import numpy as np
import pytest
from conftest import optimal_np

from locality import denoisers, sampling, schedules, stats
from locality.denoisers import pca_locality as pl
from locality.denoisers import pca_plans as pp


def _smooth_data(rng, n=40, h=5, w=4, c=1):
    """Correlated images (blurred noise) so masks are local and non-trivial."""
    z = rng.normal(size=(n, h + 2, w + 2, c))
    x = (z[:, :-2, :-2] + z[:, 1:-1, 1:-1] + z[:, 2:, 2:] + z[:, 1:-1, :-2] + z[:, :-2, 1:-1]) / 5
    return np.tanh(x).astype(np.float32)


def mask_np(x, ab, theta, mode="global"):
    flat = x.reshape(len(x), -1).astype(np.float64)
    cov = np.cov(flat.T)
    lam, u = np.linalg.eigh(cov)
    lam = np.clip(lam, 0, None)
    s = ab * lam / (ab * lam + 1 - ab)
    p = u @ np.diag(s) @ u.T
    n = p.shape[0]
    mc = np.zeros_like(p)
    for j in range(n):
        dj = p[j, j] if abs(p[j, j]) >= 1e-6 else 1.0
        for m in range(n):
            mc[j, m] = p[j, m] / dj
    if theta == 0:
        return mc
    a = np.abs(mc)
    thr = {
        "global": theta * a.max(),
        "row": theta * a.max(1, keepdims=True),
        "column": theta * a.max(0, keepdims=True),
    }[mode]
    return (a >= thr).astype(np.float64)


def denoise_np(xt, x, mask, ab, tau=1.0):
    q = xt.reshape(len(xt), -1).astype(np.float64)
    X = x.reshape(len(x), -1).astype(np.float64)
    b, n = q.shape
    out = np.zeros((b, n))
    for bi in range(b):
        r2 = (q[bi][None, :] - np.sqrt(ab) * X) ** 2  # [K, n]
        dist = r2 @ mask  # dist[k, m] = sum_j M[j, m] r2[k, j]
        l = -dist / (2 * (1 - ab) * tau)
        l -= l.max(0, keepdims=True)
        w = np.exp(l)
        w /= w.sum(0, keepdims=True)
        out[bi] = (w * X).sum(0)
    return out.reshape(xt.shape)


def chunk_mean_np(xt, x, mask, ab, cs):
    parts = [denoise_np(xt, x[s : s + cs], mask, ab) for s in range(0, len(x), cs)]
    return np.mean(parts, axis=0)


@pytest.fixture
def setup(rng):
    x = _smooth_data(rng)
    st = stats.gaussian_stats(x)
    xt = rng.normal(size=(3,) + x.shape[1:]).astype(np.float32)
    return x, st, xt


@pytest.mark.parametrize("mode", ["global", "row", "column"])
def test_masks_match_oracle(setup, mode):
    x, st, _ = setup
    for ab in (0.05, 0.5, 0.99):
        m, dens = pl.masks(st, ab, 0.05, mode)
        ref = mask_np(x, ab, 0.05, mode)
        np.testing.assert_array_equal(m, ref.astype(bool))
        assert dens == pytest.approx(ref.mean())
    soft, _ = pl.masks(st, 0.5, 0.0)
    np.testing.assert_allclose(soft, mask_np(x, 0.5, 0.0), atol=1e-10)


@pytest.mark.parametrize("c", [1, 2])
def test_mask_fields_are_the_mask_columns_as_images(rng, c):
    x = _smooth_data(rng, h=4, w=3, c=c)
    st = stats.gaussian_stats(x)
    pixels = ((0, 0), (2, 1), (3, 2))
    got = pl.mask_fields(st, 0.4, 0.05, pixels, x.shape[1:])
    ref = mask_np(x, 0.4, 0.05)  # [n, n], column = output element, flat (r, c, ch) order
    assert got.shape == (3, 4, 3)
    for i, (r, col) in enumerate(pixels):
        want = np.zeros((4, 3))
        for oc in range(c):
            m = (r * 3 + col) * c + oc
            for j in range(4 * 3 * c):
                want[j // (3 * c), (j // c) % 3] += ref[j, m]
        np.testing.assert_array_equal(got[i], want)
    with pytest.raises(ValueError, match="do not fit images"):
        pl.mask_fields(st, 0.4, 0.05, pixels, (4, 4, c))


@pytest.mark.parametrize("path", ["auto", "dense", "tiles", "sparse", "complement", "clusters"])
@pytest.mark.parametrize("cs", [7, 40])
def test_exact_matches_oracle_on_every_path(setup, path, cs):
    x, st, xt = setup
    den = denoisers.make(
        "pca_locality", stats=st, train=x, threshold=0.1, chunk_size=cs, path=path, tile=2
    )
    for ab in (0.02, 0.3, 0.9, 0.999):
        ref = denoise_np(xt, x, mask_np(x, ab, 0.1), ab)
        np.testing.assert_allclose(den(xt, ab), ref, atol=1e-5, err_msg=f"ab={ab}")


@pytest.mark.parametrize("cs", [6, 13, 40])
def test_chunk_mean_reproduces_released_quirk(setup, cs):
    x, st, xt = setup
    den = denoisers.make(
        "pca_locality", stats=st, train=x, threshold=0.1, softmax="chunk_mean", chunk_size=cs
    )
    ab = 0.3
    m = mask_np(x, ab, 0.1)
    out = np.asarray(den(xt, ab))
    np.testing.assert_allclose(out, chunk_mean_np(xt, x, m, ab, cs), atol=1e-5)
    if cs < len(x):  # several chunks: not the posterior mean
        assert np.abs(out - denoise_np(xt, x, m, ab)).max() > 1e-3


def test_exact_is_chunk_size_and_order_invariant(setup):
    x, st, xt = setup
    outs = []
    for cs, perm_seed in ((3, 0), (11, 1), (40, 2)):
        perm = np.random.default_rng(perm_seed).permutation(len(x))
        den = denoisers.make("pca_locality", stats=st, train=x[perm], threshold=0.05, chunk_size=cs)
        outs.append(np.asarray(den(xt, 0.4)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-6)


def test_limits_theta_to_zero_is_optimal_and_identity_mask(setup):
    x, st, xt = setup
    ab = 0.5
    tiny = denoisers.make("pca_locality", stats=st, train=x, threshold=1e-12)
    np.testing.assert_allclose(tiny(xt, ab), optimal_np(xt, x, ab), atol=1e-5)
    n = int(np.prod(x.shape[1:]))
    ident = denoisers.make("pca_locality", stats=st, train=x, mask=np.eye(n))
    # per-element machine: each output is a 1-D posterior mean over that element alone
    q = xt.reshape(3, -1).astype(np.float64)
    X = x.reshape(len(x), -1).astype(np.float64)
    ref = np.zeros_like(q)
    for b in range(3):
        for m in range(n):
            l = -((q[b, m] - np.sqrt(ab) * X[:, m]) ** 2) / (2 * (1 - ab))
            w = np.exp(l - l.max())
            w /= w.sum()
            ref[b, m] = w @ X[:, m]
    np.testing.assert_allclose(ident(xt, ab), ref.reshape(xt.shape), atol=1e-5)
    soft = denoisers.make("pca_locality", stats=st, train=x, threshold=0.0)
    np.testing.assert_allclose(soft(xt, ab), denoise_np(xt, x, mask_np(x, ab, 0.0), ab), atol=1e-4)


def test_pixel_permutation_equivariance(setup):
    x, st, xt = setup
    n = int(np.prod(x.shape[1:]))
    perm = np.random.default_rng(5).permutation(n)
    xp = x.reshape(len(x), -1)[:, perm].reshape(x.shape)
    xtp = xt.reshape(3, -1)[:, perm].reshape(xt.shape)
    a = denoisers.make("pca_locality", stats=st, train=x, threshold=0.05, path="dense")
    b = denoisers.make(
        "pca_locality", stats=stats.gaussian_stats(xp), train=xp, threshold=0.05, path="dense"
    )
    out_a = np.asarray(a(xt, 0.3)).reshape(3, -1)[:, perm]
    np.testing.assert_allclose(b(xtp, 0.3).reshape(3, -1), out_a, atol=1e-5)


def test_constant_pixel_guard_and_empty_column(rng):
    x = _smooth_data(rng, n=30)
    x[:, 0, 0, 0] = -1.0  # a constant border pixel: P[j, j] = 0 -> guard
    st = stats.gaussian_stats(x)
    m, _ = pl.masks(st, 0.5, 0.05)
    assert np.isfinite(pl.masks(st, 0.5, 0.0)[0]).all()
    np.testing.assert_array_equal(m, mask_np(x, 0.5, 0.05).astype(bool))
    assert not m[:, 0].any()  # its column is empty
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.05)
    xt = rng.normal(size=(2,) + x.shape[1:]).astype(np.float32)
    out = np.asarray(den(xt, 0.5))
    # empty column -> equal weights -> the training mean of that element
    np.testing.assert_allclose(out[:, 0, 0, 0], x[:, 0, 0, 0].mean(), atol=1e-6)
    # an explicit mask with an empty column for an element that varies
    n = int(np.prod(x.shape[1:]))
    mm = np.ones((n, n))
    mm[:, 7] = 0
    out = np.asarray(denoisers.make("pca_locality", stats=st, train=x, mask=mm)(xt, 0.5))
    np.testing.assert_allclose(
        out.reshape(2, -1)[:, 7], x.reshape(len(x), -1)[:, 7].mean(), atol=1e-6
    )


def test_no_retrace_across_timesteps_and_sampling(setup):
    x, st, xt = setup
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.05, path="dense")
    den(xt, 0.11)
    before = pl._apply_pca._cache_size()
    for ab in (0.2, 0.35, 0.6, 0.95):
        den(xt, ab)
    assert pl._apply_pca._cache_size() == before
    res = sampling.ddim(den, xt, num_steps=5)
    ref = den(np.asarray(res.xts[2]), float(res.abs[2]))
    np.testing.assert_allclose(res.x0_hats[2], ref, atol=1e-5)
    assert set(den.prepare(res.abs).densities()) == set(float(a) for a in res.abs)


def test_errors(setup):
    x, st, xt = setup
    with pytest.raises(ValueError, match="softmax"):
        denoisers.make("pca_locality", stats=st, train=x, softmax="chunk")
    with pytest.raises(ValueError, match="statistics were computed"):
        denoisers.make("pca_locality", stats=st, train=x[:, :4])
    with pytest.raises(ValueError, match="mask must be"):
        denoisers.make("pca_locality", stats=st, train=x, mask=np.eye(3))
    with pytest.raises(ValueError, match="threshold"):
        denoisers.make("pca_locality", stats=st, train=x, threshold=-1)
    with pytest.raises(ValueError, match="path must be"):
        denoisers.make("pca_locality", stats=st, train=x, path="centroid")
    with pytest.raises(ValueError, match="num_centroids"):
        denoisers.make("pca_locality", stats=st, train=x, path="clusters", num_centroids=-1)
    with pytest.raises(ValueError, match="cluster_size"):
        denoisers.make("pca_locality", stats=st, train=x, path="clusters", cluster_size=6)
    with pytest.raises(ValueError, match="needs a binary mask"):
        denoisers.make("pca_locality", stats=st, train=x, threshold=0.0, path="clusters")(xt, 0.5)
    with pytest.raises(ValueError, match="mode"):
        denoisers.make("pca_locality", stats=st, train=x, threshold_mode="max")
    den = denoisers.make("pca_locality", stats=st, train=x)
    with pytest.raises(ValueError, match="image shape"):
        den(np.zeros((1, 4, 4, 1), np.float32), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        den(np.full_like(xt, np.nan), 0.5)


def test_threshold_above_one_is_rejected(setup):
    """theta > 1 keeps no entry of any mask (the denoiser would silently return the training
    mean): rejected with the value and the valid range (issue #18)."""
    x, st, _ = setup
    for bad in (1.5, 2.0):
        with pytest.raises(ValueError, match=rf"threshold must be <= 1, got {bad}.*\[0, 1\]"):
            denoisers.make("pca_locality", stats=st, train=x, threshold=bad)
        with pytest.raises(ValueError, match="training mean"):
            pl.masks(st, 0.5, bad)
    m, dens = pl.masks(st, 0.5, 1.0)  # theta = 1 is valid: only the maxima
    assert 0 < dens < 0.5 and m.any()


# -------------------------------------------------------------------------- clusters path


def _reconstruct(cp, n):
    """Rebuild the [n, n] mask from a ClusterPlan: base column + signed correction."""
    full = np.concatenate([np.zeros((n, 1)), cp.bases.astype(np.float64)], axis=1)
    out = np.full((n, n), np.nan)
    seen = np.zeros(n, int)
    for g in cp.groups:
        for r, ci in enumerate(g.clusters):
            for o, col in enumerate(cp.outs[ci]):
                if col < 0:
                    assert not g.block[r, :, o].any()  # padding columns carry nothing
                    continue
                v = full[:, g.base[r]].copy()
                np.add.at(v, g.ins[r], g.block[r, :, o])
                out[:, col] = v
                seen[col] += 1
    np.testing.assert_array_equal(seen, 1)  # every column exactly once
    return out


def _family_mask(rng, n, patterns, flips, singles=0):
    """Columns drawn from a few random patterns, each with ``flips`` random bit flips, plus
    ``singles`` unrelated random columns: uneven clusters around a few centroids."""
    pats = rng.random((patterns, n)) < 0.6
    m = pats[rng.integers(patterns, size=n)].copy()
    for col in range(n):
        if flips:
            m[rng.choice(n, flips, replace=False), col] ^= True
    for col in rng.choice(n, singles, replace=False):
        m[:, col] = rng.random(n) < 0.3
    return m.T.copy()  # [n inputs, n columns]


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_cluster_plan_reconstructs_the_mask(rng, k):
    n = 30
    masks_ = [
        _family_mask(rng, n, 3, 2, singles=4),
        _family_mask(rng, n, 2, 0),
        rng.random((n, n)) < 0.5,
        np.ones((n, n), bool),
        np.zeros((n, n), bool),
        np.eye(n, dtype=bool),
    ]
    for m in masks_:
        plans = pp.cluster_plans(m, k, (1, 2, 4, 8))
        for size, cp in plans.items():
            assert cp.cluster_size == size
            assert set(np.unique(np.concatenate([g.block.ravel() for g in cp.groups]))) <= {
                -1.0,
                0.0,
                1.0,
            }
            assert cp.bases.shape[1] <= k + 1
            np.testing.assert_array_equal(_reconstruct(cp, n), m.astype(np.float64))


def test_cluster_plan_edge_cases(rng):
    n = 24
    # every column equals one of three patterns: with k >= 3 each column is its centroid, the
    # corrections are empty and the cost is the base columns alone
    m = _family_mask(rng, n, 3, 0)
    cp = pp.cluster_plans(m, 3, (4,))[4]
    assert all(not g.block.any() for g in cp.groups)
    assert cp.correction_density() == 0.0
    assert cp.cost() == n * cp.bases.shape[1] + sum(g.ins.shape[0] * 4 for g in cp.groups)
    # all ones: the only base is the all-ones column, no corrections
    cp = pp.cluster_plans(np.ones((n, n), bool), 0, (8,))[8]
    assert cp.bases.shape[1] == 1 and cp.bases.all() and cp.correction_density() == 0.0
    # all zeros: no base at all, no corrections
    cp = pp.cluster_plans(np.zeros((n, n), bool), 4, (8,))[8]
    assert cp.bases.shape[1] == 0 and cp.correction_density() == 0.0
    # k-means: distinct centroids of non-empty clusters, no more than asked
    c = pp.kmeans_columns(_family_mask(rng, n, 5, 1), 8)
    assert c.shape[0] == n and 1 <= c.shape[1] <= 8
    assert len(np.unique(c, axis=1).T) == c.shape[1]
    # merging: clusters partition the columns and never exceed the size
    diff = rng.random((n, 13)) < 0.2
    for window in (1024, 4):  # partners sought within windows of 4 columns
        for size, cl in pp.merge_clusters(diff, (1, 2, 4, 8), window=window).items():
            assert max(len(c) for c in cl) <= size
            np.testing.assert_array_equal(np.sort(np.concatenate(cl)), np.arange(13))


@pytest.mark.parametrize("k,size", [(0, 2), (1, 4), (3, 1), (5, 8), (16, 4)])
def test_clusters_path_matches_oracle(setup, k, size):
    """Several k and cluster widths (uneven clusters, padded groups) against the float64 oracle."""
    x, st, xt = setup
    den = denoisers.make(
        "pca_locality",
        stats=st,
        train=x,
        threshold=0.1,
        chunk_size=9,
        path="clusters",
        num_centroids=k,
        cluster_size=size,
    )
    for ab in (0.02, 0.3, 0.9, 0.999):
        p = den.plan(ab)
        assert p.path == "clusters" and p.clusters.cluster_size == size
        ref = denoise_np(xt, x, mask_np(x, ab, 0.1), ab)
        np.testing.assert_allclose(den(xt, ab), ref, atol=1e-5, err_msg=f"ab={ab}")


def test_clusters_path_explicit_masks_match_oracle(setup, rng):
    """Explicit masks with the structure the path exploits and its edge cases: columns equal to
    their centroid (empty corrections), uneven families with singletons, an empty column and an
    all-ones column."""
    x, st, xt = setup
    n = int(np.prod(x.shape[1:]))
    fam = _family_mask(rng, n, 3, 1, singles=3)
    exact = _family_mask(rng, n, 2, 0)
    edge = fam.copy()
    edge[:, 0] = False
    edge[:, 1] = True
    for m, k, size in ((fam, 3, 4), (exact, 2, 8), (edge, 4, 2), (edge, 0, 16)):
        den = denoisers.make(
            "pca_locality",
            stats=st,
            train=x,
            mask=m,
            path="clusters",
            num_centroids=k,
            cluster_size=size,
            chunk_size=16,
        )
        cp = den.plans.plans[0].clusters
        if m is exact:
            assert cp.correction_density() == 0.0
        ref = denoise_np(xt, x, m.astype(np.float64), 0.4)
        np.testing.assert_allclose(den(xt, 0.4), ref, atol=1e-5)
    out = np.asarray(
        denoisers.make(
            "pca_locality",
            stats=st,
            train=x,
            mask=edge,
            path="clusters",
            num_centroids=2,
            cluster_size=4,
        )(xt, 0.4)
    )
    np.testing.assert_allclose(
        out.reshape(3, -1)[:, 0], x.reshape(len(x), -1)[:, 0].mean(), atol=1e-6
    )


def test_clusters_path_chunk_mean(setup):
    x, st, xt = setup
    den = denoisers.make(
        "pca_locality",
        stats=st,
        train=x,
        threshold=0.1,
        softmax="chunk_mean",
        chunk_size=13,
        path="clusters",
        num_centroids=3,
        cluster_size=4,
    )
    ab = 0.3
    np.testing.assert_allclose(
        den(xt, ab), chunk_mean_np(xt, x, mask_np(x, ab, 0.1), ab, 13), atol=1e-5
    )


def test_auto_mixes_paths_in_one_sampling_run_with_one_compile(setup):
    """A plan table mixing dense, tiles and clusters entries compiles once per sampling run;
    a second run with the same grid reuses the cached plans and the compiled program."""
    x, st, xt = setup
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.1, tile=2)
    abs_ = schedules.ddpm_linear().ab(schedules.ddim_timesteps(6))
    plans = []
    for i, a in enumerate(abs_):
        kind = ("dense", "clusters", "tiles")[i % 3]
        plans.append(den.replace(path=kind, num_centroids=2, cluster_size=4).plan(float(a)))
    mixed = den._with_plans(tuple(plans))
    assert {p.path for p in mixed.plans.plans} == {"dense", "clusters", "tiles"}
    before = pl._apply_pca._cache_size()
    for p in mixed.plans.plans:
        ref = denoise_np(xt, x, mask_np(x, p.ab, 0.1), p.ab)
        np.testing.assert_allclose(mixed(xt, p.ab), ref, atol=1e-5, err_msg=f"{p.path} ab={p.ab}")
    assert pl._apply_pca._cache_size() == before + 1
    cpath = den.replace(path="clusters")
    r1 = sampling.ddim(cpath, xt, num_steps=6)
    n_compiled = sampling._ddim_scan._cache_size()
    p1 = cpath.prepare(r1.abs).plans.plans
    r2 = sampling.ddim(cpath, xt, num_steps=6)
    assert sampling._ddim_scan._cache_size() == n_compiled  # no recompilation
    assert all(a is b for a, b in zip(p1, cpath.prepare(r2.abs).plans.plans))  # cached plans
    np.testing.assert_array_equal(r1.images, r2.images)
    ref = cpath(np.asarray(r1.xts[3]), float(r1.abs[3]))
    np.testing.assert_allclose(r1.x0_hats[3], ref, atol=1e-5)


def test_auto_cost_model_picks_the_cheapest_modelled_path(setup):
    x, st, _ = setup
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.1, tile=2)
    n = int(np.prod(x.shape[1:]))
    for ab in (0.02, 0.3, 0.9, 0.999):
        p = den.plan(ab)
        if p.path == "dense":
            model = n * n
        elif p.path == "tiles":
            model = p.tiles.cost() / pp.TILE_EFFICIENCY
        else:
            cp = p.clusters
            nb = n * cp.bases.shape[1]
            model = nb + (cp.cost() - nb) / pp.cluster_efficiency(cp.cluster_size)
        assert model <= n * n
        tp = den.replace(path="tiles").plan(ab)
        assert model <= tp.tiles.cost() / pp.TILE_EFFICIENCY + 1e-9


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
assert len(jax.devices()) == 8, jax.devices()
from locality import denoisers, stats, sampling, streaming
rng = np.random.default_rng(0)
z = rng.normal(size=(45, 7, 6, 1))
x = np.tanh((z[:, :-2, :-2] + z[:, 1:-1, 1:-1] + z[:, 2:, 2:]) / 2).astype(np.float32)
st = stats.gaussian_stats(x)
xt = rng.normal(size=(3,) + x.shape[1:]).astype(np.float32)
mesh = streaming.data_mesh()
for softmax in ("exact", "chunk_mean"):
    kw = dict(threshold=0.05, chunk_size=4, softmax=softmax, path="clusters", num_centroids=3,
              cluster_size=4)
    one = denoisers.make("pca_locality", stats=st, train=x, **kw)
    many = denoisers.make("pca_locality", stats=st, train=x, mesh=mesh, **kw)
    assert many.chunked.valid.sharding.num_devices == 8
    for ab in (0.05, 0.5, 0.98):
        assert one.plan(ab).path == "clusters"
        d = float(np.abs(np.asarray(one(xt, ab)) - np.asarray(many(xt, ab))).max())
        assert d <= 1e-6, (softmax, ab, d)
kw = dict(threshold=0.05, chunk_size=4, path="clusters")
r1 = sampling.ddim(denoisers.make("pca_locality", stats=st, train=x, **kw), xt, num_steps=4)
sharded = denoisers.make("pca_locality", stats=st, train=x, shard=True, **kw)
r8 = sampling.ddim(sharded, xt, num_steps=4)
d = float(np.abs(np.asarray(r1.images) - np.asarray(r8.images)).max())
assert d <= 1e-5, d
print("OK")
"""


def test_clusters_path_on_eight_devices_equals_one_device():
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
