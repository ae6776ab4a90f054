"""Statistics, streaming primitive, Wiener, optimal, nearest, samplers and metrics
vs float64 oracles."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optimal_np, softmax_average_np

from locality import denoisers, metrics, sampling, schedules, stats, streaming


def _data(rng, n=37, shape=(4, 3, 2)):
    return rng.uniform(-1, 1, (n,) + shape).astype(np.float32)


# ---------------------------------------------------------------------------- schedules


def test_ddpm_linear_and_leading_timesteps():
    s = schedules.ddpm_linear()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    assert s.alphas_cumprod.dtype == np.float32
    np.testing.assert_array_equal(
        schedules.ddim_timesteps(10), [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    )
    np.testing.assert_array_equal(schedules.ddim_timesteps(4, 10), [6, 4, 2, 0])
    with pytest.raises(ValueError, match="num_steps"):
        schedules.ddim_timesteps(0)


def test_conversions_roundtrip_and_grids(rng):
    x0 = rng.normal(size=(5,))
    eps = rng.normal(size=(5,))
    ab = 0.3
    xt = schedules.add_noise(x0, eps, ab)
    np.testing.assert_allclose(schedules.x0_from_eps(xt, eps, ab), x0, atol=1e-6)
    np.testing.assert_allclose(schedules.eps_from_x0(xt, x0, ab), eps, atol=1e-6)
    # score of N(sqrt(ab) x0, (1-ab) I) at x_t is -eps / sqrt(1-ab)
    np.testing.assert_allclose(
        schedules.score_from_x0(xt, x0, ab), -eps / np.sqrt(1 - ab), atol=1e-6
    )
    np.testing.assert_allclose(
        schedules.ab_from_sigma(schedules.sigma_from_ab(0.3)), 0.3, atol=1e-7
    )
    sig = schedules.edm_sigmas(18)
    assert sig[0] == pytest.approx(80.0) and sig[-2] == pytest.approx(2e-3) and sig[-1] == 0
    assert np.all(np.diff(sig) < 0)
    np.testing.assert_allclose(schedules.cosine_legacy_ab(0.0), 1.0)
    np.testing.assert_allclose(schedules.cosine_legacy_ab(1.0), np.cos(np.pi / 2 / 1.008) ** 2)
    g = schedules.cosine_legacy_grid(20)
    assert g[0] == pytest.approx(0.95) and g[-1] == 0 and len(g) == 20


# ---------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_moments_match_numpy(rng, chunk):
    x = _data(rng) * 0.5 + 0.3  # offset mean exercises the shift
    mean, cov, n = stats.moments(x, chunk_size=chunk)
    flat = x.reshape(len(x), -1).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), atol=1e-13)
    np.testing.assert_allclose(cov, np.cov(flat.T), atol=1e-13)
    assert n == len(x)


def test_gaussian_stats_eig_and_singular(rng):
    x = _data(rng, n=6)  # N < n = 24: singular covariance
    st = stats.gaussian_stats(x)
    assert st.shape == (4, 3, 2) and st.count == 6 and st.n == 24
    np.testing.assert_allclose(
        st.covariance(), np.cov(x.reshape(6, -1).T.astype(np.float64)), atol=1e-12
    )
    assert np.all(st.eigvals >= 0) and np.all(np.diff(st.eigvals) <= 0)
    assert np.sum(st.eigvals > 1e-10) == 5  # rank N - 1
    np.testing.assert_allclose(st.eigvecs.T @ st.eigvecs, np.eye(24), atol=1e-10)


def test_fingerprint_is_content_based(rng):
    x = _data(rng)
    y = x.copy()
    y[3, 1, 1, 0] += 1e-3
    assert stats.fingerprint(x) == stats.fingerprint(x.copy())
    assert stats.fingerprint(x) != stats.fingerprint(y)
    assert stats.fingerprint(x) != stats.fingerprint(x.reshape(37, 3, 4, 2))


def test_stats_cache_roundtrip_corrupt_and_stale(rng, tmp_path):
    x = _data(rng)
    st = stats.gaussian_stats(x, cache_dir=str(tmp_path))
    files = [f for f in os.listdir(tmp_path)]
    assert files == [f"stats-{st.fingerprint}.npz"]  # nothing half-written left behind
    st2 = stats.gaussian_stats(x, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(st2.eigvecs, st.eigvecs)
    # A different dataset gets its own file, never the first one's statistics.
    y = _data(np.random.default_rng(1))
    st3 = stats.gaussian_stats(y, cache_dir=str(tmp_path))
    assert st3.fingerprint != st.fingerprint and not np.allclose(st3.mean, st.mean)
    # Stale: a file whose content belongs to other data.
    path = tmp_path / f"stats-{st.fingerprint}.npz"
    other = tmp_path / f"stats-{st3.fingerprint}.npz"
    os.replace(other, path)
    with pytest.raises(stats.StaleCacheError, match="other data"):
        stats.gaussian_stats(x, cache_dir=str(tmp_path))
    # Corrupt: truncated bytes.
    path.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(stats.StaleCacheError, match="corrupt"):
        stats.gaussian_stats(x, cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (np.zeros((4, 4, 1), np.float32), ValueError, "rank 4"),
        (np.zeros((0, 4, 4, 1), np.float32), ValueError, "empty"),
        (np.zeros((2, 1, 8, 8), np.float32), ValueError, "NCHW"),
        (np.full((2, 4, 4, 1), np.nan, np.float32), ValueError, "NaN"),
        (np.full((2, 4, 4, 1), 2.0, np.float32), ValueError, r"\[-1, 1\]"),
        (np.zeros((2, 4, 4, 1), np.uint8), TypeError, "uint8"),
    ],
)
def test_bad_images_are_rejected(bad, err, match):
    with pytest.raises(err, match=match):
        stats.gaussian_stats(bad)
    with pytest.raises(err, match=match):
        denoisers.make("optimal", train=bad)


# ---------------------------------------------------------------------------- streaming


def _stream_np_case(rng, b=3, k=23, m=4, d=2):
    logits = rng.normal(size=(b, k, m)) * 30  # large spread: exercises the running max
    values = rng.normal(size=(k, m, d))
    return logits.astype(np.float32), values.astype(np.float32)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 7, 23, 50])
def test_stream_exact_for_every_chunk_size(rng, chunk_size):
    logits, values = _stream_np_case(rng)
    ref = softmax_average_np(logits, values)
    ch = streaming.chunk((jnp.asarray(np.swapaxes(logits, 0, 1)), jnp.asarray(values)), chunk_size)
    fn = lambda ctx, data: (jnp.swapaxes(data[0], 0, 1), data[1])
    out = streaming.stream(fn, ch, (), batch=3, m=4, d=2)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_stream_exact_for_every_order(rng):
    logits, values = _stream_np_case(rng)
    ref = softmax_average_np(logits, values)
    fn = lambda ctx, data: (jnp.swapaxes(data[0], 0, 1), data[1])
    for seed in range(4):
        perm = np.random.default_rng(seed).permutation(logits.shape[1])
        ch = streaming.chunk(
            (jnp.asarray(np.swapaxes(logits[:, perm], 0, 1)), jnp.asarray(values[perm])), 6
        )
        np.testing.assert_allclose(streaming.stream(fn, ch, (), batch=3, m=4, d=2), ref, atol=1e-6)


def test_stream_shared_values_and_chunk_mean_quirk(rng):
    logits, values = _stream_np_case(rng, m=3)
    shared = values[:, :1, :]
    ref = softmax_average_np(logits, np.broadcast_to(shared, (23, 3, 2)))
    fn = lambda ctx, data: (jnp.swapaxes(data[0], 0, 1), data[1])
    ch = streaming.chunk((jnp.asarray(np.swapaxes(logits, 0, 1)), jnp.asarray(shared)), 5)
    np.testing.assert_allclose(streaming.stream(fn, ch, (), batch=3, m=3, d=2), ref, atol=1e-6)
    # chunk_mean: mean over the 5 chunks (sizes 5,5,5,5,3) of per-chunk posterior means.
    full = np.broadcast_to(shared, (23, 3, 2))
    parts = [softmax_average_np(logits[:, s : s + 5], full[s : s + 5]) for s in range(0, 23, 5)]
    out = streaming.stream(fn, ch, (), batch=3, m=3, d=2, mode="chunk_mean")
    np.testing.assert_allclose(out, np.mean(parts, axis=0), atol=1e-6)
    assert not np.allclose(out, ref, atol=1e-3)  # the quirk is not the posterior mean


def test_merge_is_exact_for_disjoint_parts(rng):
    logits, values = _stream_np_case(rng)
    a = streaming.from_chunk(jnp.asarray(logits[:, :10]), jnp.asarray(values[:10]))
    b = streaming.from_chunk(jnp.asarray(logits[:, 10:]), jnp.asarray(values[10:]))
    e = streaming.empty(3, 4, 2)
    for acc in (
        streaming.merge(a, b),
        streaming.merge(b, a),
        streaming.merge(streaming.merge(e, a), b),
    ):
        np.testing.assert_allclose(
            streaming.finalize(acc), softmax_average_np(logits, values), atol=1e-6
        )


# ---------------------------------------------------------------------------- denoisers


def test_wiener_matches_dense_float64_closed_form(rng):
    x = _data(rng, n=60, shape=(3, 3, 2)) * 0.8
    st = stats.gaussian_stats(x)
    w = denoisers.make("wiener", stats=st)
    cov = np.cov(x.reshape(60, -1).T.astype(np.float64))
    mu = x.reshape(60, -1).mean(0)
    xt = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    for ab in (0.02, 0.5, 0.995):
        W = np.sqrt(ab) * cov @ np.linalg.inv(ab * cov + (1 - ab) * np.eye(18))
        b = (np.eye(18) - np.sqrt(ab) * W) @ mu
        ref = (xt.reshape(4, -1) @ W.T + b).reshape(xt.shape)
        np.testing.assert_allclose(w(xt, ab), ref, atol=2e-5)
        np.testing.assert_allclose(denoisers.make("wiener_dense", stats=st)(xt, ab), ref, atol=1e-5)
        np.testing.assert_allclose(w.jacobian(ab), W, atol=2e-5)


def test_optimal_matches_oracle_and_limits(rng):
    x = _data(rng)
    xt = rng.normal(size=(3, 4, 3, 2)).astype(np.float32)
    for cs in (1, 4, 37, 100):
        o = denoisers.make("optimal", train=x, chunk_size=cs)
        for ab in (0.01, 0.4, 0.97):
            np.testing.assert_allclose(o(xt, ab), optimal_np(xt, x, ab), atol=1e-5)
    o = denoisers.make("optimal", train=x, temperature=3.0)
    np.testing.assert_allclose(o(xt, 0.4), optimal_np(xt, x, 0.4, tau=3.0), atol=1e-5)
    # low noise: the query at a training image returns that image
    q = np.sqrt(0.9999) * x[:2]
    np.testing.assert_allclose(denoisers.make("optimal", train=x)(q, 0.9999), x[:2], atol=1e-5)


def test_optimal_top_k(rng):
    x = _data(rng)
    xt = rng.normal(size=(3, 4, 3, 2)).astype(np.float32)
    ab = 0.3
    ok = denoisers.make("optimal", train=x, top_k=5, chunk_size=4)
    q = xt.reshape(3, -1).astype(np.float64)
    X = x.reshape(37, -1).astype(np.float64)
    d = ((q[:, None] - np.sqrt(ab) * X[None]) ** 2).sum(-1)
    ref = []
    for bi in range(3):
        idx = np.argsort(d[bi])[:5]
        ref.append(optimal_np(xt[bi : bi + 1], x[idx], ab)[0])
    np.testing.assert_allclose(ok(xt, ab), np.stack(ref), atol=1e-5)
    np.testing.assert_allclose(
        denoisers.make("optimal", train=x, top_k=37)(xt, ab), optimal_np(xt, x, ab), atol=1e-5
    )
    with pytest.raises(ValueError, match="top_k"):
        denoisers.make("optimal", train=x, top_k=0)


def test_nearest_uses_unscaled_query(rng):
    x = _data(rng)
    xt = rng.normal(size=(5, 4, 3, 2)).astype(np.float32)
    d = ((xt.reshape(5, 1, -1) - x.reshape(1, 37, -1)) ** 2).sum(-1)
    np.testing.assert_array_equal(
        denoisers.make("nearest", train=x, chunk_size=6)(xt, 0.1), x[d.argmin(1)]
    )


# Every registered denoiser on tiny data (image shape TINY), for the query checks below. A newly
# registered method fails these tests until it has an entry here.
TINY = (4, 4, 2)
_UNET = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_data():
    x = np.random.default_rng(7).uniform(-1, 1, (9,) + TINY).astype(np.float32)
    return x, stats.gaussian_stats(x)


def _tiny_denoiser(name, x, st):
    n, hw = int(np.prod(TINY)), TINY[0] * TINY[1]
    kwargs = {
        "wiener": lambda: dict(stats=st),
        "wiener_dense": lambda: dict(stats=st),
        "optimal": lambda: dict(train=x),
        "nearest": lambda: dict(train=x),
        "pca_locality": lambda: dict(stats=st, train=x, threshold=0.05),
        "linear": lambda: dict(weights={0.5: (np.eye(n), np.zeros(n))}, shape=TINY),
        "ls": lambda: dict(train=x),
        "els": lambda: dict(train=x),
        "bbels": lambda: dict(train=x),
        "pspc_square": lambda: dict(train=x, patch_size=3),
        "pspc_flex": lambda: dict(train=x, masks=np.ones((hw, hw))),
        "scfdm": lambda: dict(train=x, num_samples=2),
        "network": lambda: dict(model=_UNET, params=_tiny_unet_params(), shape=TINY),
    }
    assert name in kwargs, f"add a tiny case for the new denoiser {name!r} to tests/test_core.py"
    return denoisers.make(name, **kwargs[name]())


def _tiny_unet_params():
    from locality.nets import build_model, init_params

    return init_params(build_model(_UNET), TINY, seed=0)


@pytest.mark.parametrize("name", denoisers.names())
def test_empty_batch_gives_empty_result(name, tiny_data):
    den = _tiny_denoiser(name, *tiny_data)
    out = den(np.zeros((0,) + TINY, np.float32), 0.5)
    assert out.shape == (0,) + TINY and out.dtype == jnp.float32


@pytest.mark.parametrize("name", denoisers.names())
def test_query_errors(name, tiny_data):
    den = _tiny_denoiser(name, *tiny_data)
    xt = np.zeros((2,) + TINY, np.float32)
    with pytest.raises(ValueError, match="image shape"):
        den(np.zeros((2, 5) + TINY[1:], np.float32), 0.5)
    with pytest.raises(ValueError, match="rank 4"):
        den(xt[0], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        den(np.full_like(xt, np.nan), 0.5)
    for ab in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="outside"):
            den(xt, ab)
        with pytest.raises(ValueError, match="outside"):  # checked before the empty-batch rule
            den(xt[:0], ab)


def test_unknown_denoiser_name():
    with pytest.raises(KeyError, match="registered"):
        denoisers.make("no_such_method")


def test_no_retrace_across_noise_levels(rng):
    from locality.denoisers import base

    x = _data(rng, n=13)
    o = denoisers.make("optimal", train=x)
    xt = jnp.zeros((2, 4, 3, 2))
    o(xt, 0.05)
    before = base._apply._cache_size()
    for ab in (0.1, 0.2, np.float32(0.4), jnp.float32(0.7), np.float64(0.9)):
        o(xt, ab)
    assert base._apply._cache_size() == before  # no new compilation for any new ab

    traces = []

    @chex.assert_max_traces(n=1)
    def f(d, xt, ab):
        traces.append(1)
        return d(xt, ab)

    jf = jax.jit(f)
    for ab in (0.1, 0.2, 0.3):
        jf(o, xt, jnp.float32(ab))
    assert len(traces) == 1


def test_vmap_and_jit_of_denoiser(rng):
    x = _data(rng)
    o = denoisers.make("optimal", train=x)
    xt = rng.normal(size=(3, 4, 3, 2)).astype(np.float32)
    abs_ = jnp.array([0.1, 0.5, 0.9])
    out = jax.vmap(lambda a: o(xt, a))(abs_)
    for i, a in enumerate([0.1, 0.5, 0.9]):
        np.testing.assert_allclose(out[i], optimal_np(xt, x, a), atol=1e-5)


# ---------------------------------------------------------------------------- samplers


def _ddim_np(denoise, x_T, sched, num_steps):
    ts = schedules.ddim_timesteps(num_steps, sched.num_timesteps)
    x = np.asarray(x_T, np.float64)
    x0s = []
    for i, t in enumerate(ts):
        ab = float(sched.alphas_cumprod[t])
        ab_prev = float(sched.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0 = np.asarray(denoise(x.astype(np.float32), ab), np.float64)
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab + 1e-8)
        x0c = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
        x = np.sqrt(ab_prev) * x0c + np.sqrt(1 - ab_prev) * eps
        x0s.append(x0)
    return x0s[-1], np.stack(x0s)


def test_ddim_matches_numpy_loop(rng):
    x = _data(rng)
    st = stats.gaussian_stats(x)
    sched = schedules.ddpm_linear()
    x_T = rng.normal(size=(3, 4, 3, 2)).astype(np.float32)
    for name, den in (
        ("optimal", denoisers.make("optimal", train=x)),
        ("wiener", denoisers.make("wiener", stats=st)),
    ):
        res = sampling.ddim(den, x_T, sched, num_steps=10)
        ref_img, ref_x0s = _ddim_np(den, x_T, sched, 10)
        np.testing.assert_allclose(res.x0_hats, ref_x0s, atol=2e-4, err_msg=name)
        np.testing.assert_allclose(res.images, ref_img, atol=2e-4)
        np.testing.assert_array_equal(
            res.timesteps, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        )
        np.testing.assert_allclose(res.xts[0], x_T)
    # Wiener output is unclipped (values may exceed [-1, 1]) -- the released semantics.
    res = sampling.ddim(denoisers.make("wiener", stats=st), 5 * x_T, sched, num_steps=3)
    assert res.images.shape == x_T.shape


def test_ddpm_with_gaussian_data_reaches_the_data_distribution(rng):
    # For Gaussian data the Wiener filter is the exact posterior mean, so ancestral sampling draws
    # from N(mu, S): check mean and variance of many samples (a statistical, independent limit).
    n = 4000
    cov = np.array([[0.09, 0.05], [0.05, 0.06]])
    mu = np.array([0.2, -0.1])
    x = rng.multivariate_normal(mu, cov, size=n).clip(-1, 1).astype(np.float32).reshape(n, 1, 2, 1)
    st = stats.gaussian_stats(x)
    w = denoisers.make("wiener", stats=st)
    x_T = jax.random.normal(jax.random.key(1), (3000, 1, 2, 1))
    res = sampling.ddpm(w, x_T, key=jax.random.key(2))  # all 1000 steps
    s = np.asarray(res.images).reshape(-1, 2)
    np.testing.assert_allclose(s.mean(0), st.mean, atol=0.02)
    np.testing.assert_allclose(np.cov(s.T), st.covariance(), atol=0.012)


def test_edm_euler_wiener_gaussian_is_exact_flow(rng):
    # PF-ODE of a 1-D Gaussian N(0, v): z(sigma) = z_T * sqrt(v + sigma^2) / sqrt(v + sigma_T^2).
    v = 0.04
    x = np.linspace(-0.6, 0.6, 2001)[:, None, None, None].astype(np.float32)
    x = (x - x.mean()) * np.sqrt(v / x.var())
    st = stats.gaussian_stats(x.clip(-1, 1))
    v = float(st.eigvals[0])
    m = float(st.mean[0])
    w = denoisers.make("wiener", stats=st)
    sig = schedules.edm_sigmas(200, sigma_min=1e-3, sigma_max=5.0)
    z_T = np.array([[[[1.0]]], [[[-2.0]]]], np.float32) * 5.0
    res = sampling.edm(w, z_T, sig, heun=True)
    expect = m + (z_T - m) * np.sqrt(v + 1e-3**2) / np.sqrt(v + 25.0)
    np.testing.assert_allclose(res.images, expect * 1.0, rtol=0.02, atol=2e-3)


def test_sampler_errors(rng):
    x = _data(rng)
    o = denoisers.make("optimal", train=x)
    with pytest.raises(ValueError, match="PRNG key"):
        sampling.ddim(o, np.zeros((1, 4, 3, 2)), eta=1.0)
    with pytest.raises(ValueError, match="decreasing"):
        sampling.ddim(o, np.zeros((1, 4, 3, 2)), timesteps=[0, 100])
    with pytest.raises(ValueError, match="image shape"):
        sampling.ddim(o, np.zeros((1, 5, 3, 2)))


# ---------------------------------------------------------------------------- metrics


def test_metrics_by_hand():
    y = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    x = np.array([[1.0, 2.0, 3.0, 5.0]], np.float32)
    # var_unbiased(y) = 5/3; D = 4 -> r2 = 1 - 1 / (4 * 5/3) = 0.85
    assert float(metrics.r2(x, y)) == pytest.approx(0.85, abs=1e-6)
    assert float(metrics.mse(x, y)) == pytest.approx(0.25)
    r = np.corrcoef(x[0], y[0])[0, 1]
    assert float(metrics.pearson(x, y)) == pytest.approx(r, abs=1e-6)
    const = np.zeros((1, 4), np.float32)
    assert float(metrics.r2(x, const)) == pytest.approx(
        1 - (1 + 4 + 9 + 25) / 4, abs=1e-6
    )  # var 0 -> 1
    xb = np.stack([x[0], y[0]])
    yb = np.stack([y[0], y[0]])
    np.testing.assert_allclose(metrics.r2(xb, yb, "none"), [0.85, 1.0], atol=1e-6)
    assert float(metrics.r2(xb, yb, "median")) == pytest.approx(0.925, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.r2(x, y[:, :3])


def test_per_step_and_single_step(rng):
    x = _data(rng)
    a = denoisers.make("optimal", train=x)
    w = denoisers.make("wiener", stats=stats.gaussian_stats(x))
    x_T = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
    ra, rw = sampling.ddim(a, x_T, num_steps=4), sampling.ddim(w, x_T, num_steps=4)
    ps = metrics.per_step(ra.x0_hats, rw.x0_hats)
    for s in range(4):
        assert ps["r2"][s] == pytest.approx(
            float(metrics.r2(ra.x0_hats[s], rw.x0_hats[s])), abs=1e-6
        )
    ss, ref = metrics.single_step(w, ra)
    np.testing.assert_allclose(ref[1], w(ra.xts[1], ra.abs[1]), atol=1e-6)
    assert ss["mse"][1] == pytest.approx(float(metrics.mse(ra.x0_hats[1], ref[1])), abs=1e-7)
