"""Sample-quality measures: the Frechet distance against float64 oracles (scipy's sqrtm and the
isotropic closed form) and the held-out eps-MSE against nets whose error is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from locality import quality, schedules


def _random_gaussian(rng, d):
    a = rng.normal(size=(d, 3 * d))
    return rng.normal(size=d), a @ a.T / (3 * d)


def _fd_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("d", [1, 4, 7])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, d), _random_gaussian(rng, d)
    got = quality.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9, abs=1e-12)
    assert quality.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_isotropic_closed_form_and_rank_deficient():
    d, a, b = 5, 0.3, 2.0
    mu1, mu2 = np.arange(d, dtype=float), np.ones(d)
    expect = np.sum((mu1 - mu2) ** 2) + d * (np.sqrt(a) - np.sqrt(b)) ** 2
    got = quality.frechet_distance(mu1, a * np.eye(d), mu2, b * np.eye(d))
    assert got == pytest.approx(expect, rel=1e-12)
    # Singular covariances (fewer samples than features): still finite and symmetric.
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(3, 6)), rng.normal(size=(4, 6)) + 1.0
    ab, ba = quality.frechet_distance_of(fa, fb), quality.frechet_distance_of(fb, fa)
    assert np.isfinite(ab) and ab == pytest.approx(ba, rel=1e-6)  # round-off of zero eigenvalues
    assert ab == pytest.approx(_fd_scipy(*quality.gaussian_fit(fa), *quality.gaussian_fit(fb)),
                               rel=1e-6)


def test_gaussian_fit_is_unbiased_float64():
    f = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    mu, cov = quality.gaussian_fit(f)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    np.testing.assert_allclose(cov, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        quality.gaussian_fit(f[:1])


def test_eps_mse_of_an_oracle_net_and_of_the_zero_net():
    sched = schedules.ddpm_linear()
    x0 = np.random.default_rng(0).uniform(-1, 1, (6, 4, 4, 1)).astype(np.float32)
    x0_dev = jnp.asarray(x0)

    def oracle(params, x_t, t, train=False):  # knows x0: inverts the forward process exactly
        ab = jnp.asarray(sched.alphas_cumprod)[t.astype(jnp.int32)][:, None, None, None]
        return (x_t - jnp.sqrt(ab) * x0_dev) / jnp.sqrt(1 - ab)

    ts = (10, 500, 990)
    err = quality.eps_mse(oracle, {}, x0, ts, batch_size=6, schedule=sched)
    assert err.shape == (3, 6) and err.dtype == np.float64
    assert err.max() < 1e-8

    # The zero net's error is the mean square of the noise, drawn as documented.
    zero = lambda params, x_t, t, train=False: jnp.zeros_like(x_t)
    got = quality.eps_mse(zero, {}, x0, ts, seed=3, batch_size=4, schedule=sched)
    for i, t in enumerate(ts):
        key_t = jax.random.fold_in(jax.random.PRNGKey(3), t)
        eps = np.concatenate([np.asarray(jax.random.normal(jax.random.fold_in(key_t, j),
                                                           x0[s:s + 4].shape))
                              for j, s in enumerate(range(0, 6, 4))])
        np.testing.assert_allclose(got[i], np.mean(eps.astype(np.float64) ** 2, (1, 2, 3)),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        quality.eps_mse(zero, {}, x0, (1000,), schedule=sched)
