"""pca_locality (ALGORITHMS.md §5) against a literal float64 numpy oracle on tiny images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import optimal_np
from locality import denoisers, sampling, stats
from locality.denoisers import pca_locality as pl


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
    thr = {"global": theta * a.max(), "row": theta * a.max(1, keepdims=True),
           "column": theta * a.max(0, keepdims=True)}[mode]
    return (a >= thr).astype(np.float64)


def denoise_np(xt, x, mask, ab, tau=1.0):
    q = xt.reshape(len(xt), -1).astype(np.float64)
    X = x.reshape(len(x), -1).astype(np.float64)
    b, n = q.shape
    out = np.zeros((b, n))
    for bi in range(b):
        r2 = (q[bi][None, :] - np.sqrt(ab) * X) ** 2                    # [K, n]
        dist = r2 @ mask                                                # dist[k, m] = sum_j M[j, m] r2[k, j]
        l = -dist / (2 * (1 - ab) * tau)
        l -= l.max(0, keepdims=True)
        w = np.exp(l); w /= w.sum(0, keepdims=True)
        out[bi] = (w * X).sum(0)
    return out.reshape(xt.shape)


def chunk_mean_np(xt, x, mask, ab, cs):
    parts = [denoise_np(xt, x[s:s + cs], mask, ab) for s in range(0, len(x), cs)]
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


@pytest.mark.parametrize("path", ["auto", "dense", "tiles", "sparse", "complement"])
@pytest.mark.parametrize("cs", [7, 40])
def test_exact_matches_oracle_on_every_path(setup, path, cs):
    x, st, xt = setup
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.1, chunk_size=cs, path=path,
                         tile=2)
    for ab in (0.02, 0.3, 0.9, 0.999):
        ref = denoise_np(xt, x, mask_np(x, ab, 0.1), ab)
        np.testing.assert_allclose(den(xt, ab), ref, atol=1e-5, err_msg=f"ab={ab}")


@pytest.mark.parametrize("cs", [6, 13, 40])
def test_chunk_mean_reproduces_released_quirk(setup, cs):
    x, st, xt = setup
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.1, softmax="chunk_mean",
                         chunk_size=cs)
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
    q = xt.reshape(3, -1).astype(np.float64); X = x.reshape(len(x), -1).astype(np.float64)
    ref = np.zeros_like(q)
    for b in range(3):
        for m in range(n):
            l = -(q[b, m] - np.sqrt(ab) * X[:, m]) ** 2 / (2 * (1 - ab))
            w = np.exp(l - l.max()); w /= w.sum()
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
    b = denoisers.make("pca_locality", stats=stats.gaussian_stats(xp), train=xp, threshold=0.05,
                       path="dense")
    out_a = np.asarray(a(xt, 0.3)).reshape(3, -1)[:, perm]
    np.testing.assert_allclose(b(xtp, 0.3).reshape(3, -1), out_a, atol=1e-5)


def test_constant_pixel_guard_and_empty_column(rng):
    x = _smooth_data(rng, n=30)
    x[:, 0, 0, 0] = -1.0          # a constant border pixel: P[j, j] = 0 -> guard
    st = stats.gaussian_stats(x)
    m, _ = pl.masks(st, 0.5, 0.05)
    assert np.isfinite(pl.masks(st, 0.5, 0.0)[0]).all()
    np.testing.assert_array_equal(m, mask_np(x, 0.5, 0.05).astype(bool))
    assert not m[:, 0].any()      # its column is empty
    den = denoisers.make("pca_locality", stats=st, train=x, threshold=0.05)
    xt = rng.normal(size=(2,) + x.shape[1:]).astype(np.float32)
    out = np.asarray(den(xt, 0.5))
    # empty column -> equal weights -> the training mean of that element
    np.testing.assert_allclose(out[:, 0, 0, 0], x[:, 0, 0, 0].mean(), atol=1e-6)
    # an explicit mask with an empty column for an element that varies
    n = int(np.prod(x.shape[1:]))
    mm = np.ones((n, n)); mm[:, 7] = 0
    out = np.asarray(denoisers.make("pca_locality", stats=st, train=x, mask=mm)(xt, 0.5))
    np.testing.assert_allclose(out.reshape(2, -1)[:, 7], x.reshape(len(x), -1)[:, 7].mean(), atol=1e-6)


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
    with pytest.raises(ValueError, match="mode"):
        denoisers.make("pca_locality", stats=st, train=x, threshold_mode="max")
    den = denoisers.make("pca_locality", stats=st, train=x)
    with pytest.raises(ValueError, match="image shape"):
        den(np.zeros((1, 4, 4, 1), np.float32), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        den(np.full_like(xt, np.nan), 0.5)
