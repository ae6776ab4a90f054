"""SCFDM: float64 oracles with the same perturbations, limits, exactness, reproducibility."""

import jax
import numpy as np
import pytest

from locality import sampling
from locality.denoisers import scfdm
from locality.denoisers.optimal import make_optimal

AB = 0.7
SHAPE = (5, 5, 1)


def _data(n=10, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    train = rng.uniform(-1, 1, (n,) + SHAPE).astype(np.float32)
    x_t = (
        np.sqrt(AB) * train[:batch] + np.sqrt(1 - AB) * rng.normal(size=(batch,) + SHAPE)
    ).astype(np.float32)
    return train, x_t


def _posterior_mean(points, q, ab):
    """sum_k softmax(-||q - sqrt(ab) y_k||^2 / (2 (1 - ab))) y_k in float64; points [K, n]."""
    d = np.sum((q[None] - np.sqrt(ab) * points) ** 2, axis=1)
    logit = -d / (2 * (1 - ab))
    w = np.exp(logit - logit.max())
    return (w / w.sum()) @ points


def oracle_input(train, x, ab, xi, sigma_s):
    t = train.reshape(len(train), -1).astype(np.float64)
    out = np.zeros(x.reshape(len(x), -1).shape)
    for r in range(xi.shape[0]):
        q = (x.astype(np.float64) + sigma_s * xi[r]).reshape(len(x), -1)
        for b in range(len(x)):
            out[b] += _posterior_mean(t, q[b], ab)
    return (out / xi.shape[0]).reshape(x.shape)


def oracle_train(train, x, ab, noise, sigma_s):
    t = train.reshape(len(train), -1).astype(np.float64)
    q = x.reshape(len(x), -1).astype(np.float64)
    out = np.zeros(q.shape)
    for r in range(noise.shape[0]):
        y = t + sigma_s * noise[r]
        for b in range(len(x)):
            out[b] += _posterior_mean(y, q[b], ab)
    return (out / noise.shape[0]).reshape(x.shape)


def test_input_smoothing_matches_oracle_with_same_noise():
    train, x = _data()
    den = scfdm.make_scfdm(
        train=train, num_samples=4, sigma_s=0.3, key=jax.random.key(3), chunk_size=4
    )
    xi = np.asarray(scfdm.smoothing_noise(den.key, AB, x.shape, 4), np.float64)
    np.testing.assert_allclose(
        np.asarray(den(x, AB)), oracle_input(train, x, AB, xi, 0.3), atol=2e-5
    )
    # reproducible, key-dependent, noise-level dependent
    np.testing.assert_array_equal(np.asarray(den(x, AB)), np.asarray(den(x, AB)))
    assert np.abs(np.asarray(den.with_key(4)(x, AB)) - np.asarray(den(x, AB))).max() > 1e-4
    n2 = scfdm.smoothing_noise(den.key, 0.6, x.shape, 4)
    assert np.abs(np.asarray(n2) - xi).max() > 0.1
    kd = lambda ab, fold: np.asarray(jax.random.key_data(scfdm.call_key(den.key, ab, fold)))
    np.testing.assert_array_equal(kd(0.5, False), kd(0.6, False))
    assert (kd(0.5, True) != kd(0.6, True)).any()


def test_train_smoothing_matches_oracle_and_is_chunk_independent():
    train, x = _data(seed=1)
    n = int(np.prod(SHAPE))
    outs = []
    for cs in (3, 10):
        den = scfdm.make_scfdm(
            train=train, num_samples=3, sigma_s=0.2, seed=5, smoothing="train", chunk_size=cs
        )
        outs.append(np.asarray(den(x, AB)))
    noise = np.stack(
        [
            np.stack(
                [np.asarray(scfdm.train_noise(den.key, AB, r, k, n)) for k in range(len(train))]
            )
            for r in range(3)
        ]
    ).astype(np.float64)
    np.testing.assert_allclose(outs[0], oracle_train(train, x, AB, noise, 0.2), atol=2e-5)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_zero_smoothing_is_optimal():
    train, x = _data(seed=2)
    opt = np.asarray(make_optimal(train=train)(x, AB))
    for smoothing in ("input", "train"):
        den = scfdm.make_scfdm(train=train, sigma_s=0.0, num_samples=2, smoothing=smoothing)
        np.testing.assert_allclose(np.asarray(den(x, AB)), opt, atol=2e-5)
    den = scfdm.make_scfdm(train=train, sigma_s=0.5, num_samples=2)
    assert np.abs(np.asarray(den(x, AB)) - opt).max() > 1e-3


def test_ddim_under_tracing_matches_eager_calls():
    train, _ = _data(seed=3)
    den = scfdm.make_scfdm(train=train, num_samples=3, sigma_s=0.1)
    x_T = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
    res = sampling.ddim(den, x_T, num_steps=3, timesteps=[500, 200, 50])
    for s in range(3):
        np.testing.assert_allclose(
            np.asarray(res.x0_hats[s]), np.asarray(den(res.xts[s], res.abs[s])), atol=1e-5
        )


def test_bad_arguments():
    train, _ = _data()
    with pytest.raises(ValueError, match="smoothing"):
        scfdm.make_scfdm(train=train, smoothing="both")
    with pytest.raises(ValueError, match="num_samples"):
        scfdm.make_scfdm(train=train, num_samples=0)
    with pytest.raises(ValueError, match="top_k"):
        scfdm.make_scfdm(train=train, smoothing="train", top_k=3)
    with pytest.raises(TypeError, match="key"):
        scfdm.make_scfdm(train=train, key=np.zeros(3, np.float32))
