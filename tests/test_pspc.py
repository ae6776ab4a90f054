"""PSPC-Square and PSPC-Flex: float64 brute-force oracles, known limits, exactness, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import noisy_uniform_data

from locality import sampling
from locality.denoisers import pspc
from locality.denoisers.optimal import make_optimal

AB = 0.6


def _data(n, shape, seed=0, batch=2):
    return noisy_uniform_data(n, shape, AB, seed, batch)


def _augment(train, flip):
    return np.concatenate([train, train[:, :, ::-1]], 0) if flip else train


def _weights(query, crops, ab):
    d = np.sum((query[None] - np.sqrt(ab) * crops) ** 2, axis=tuple(range(1, crops.ndim)))
    logit = -d / (2 * (1 - ab))
    w = np.exp(logit - logit.max())
    return w / w.sum()


def oracle_square(train, x, ab, s, flip):
    t = _augment(train, flip).astype(np.float64)
    x = x.astype(np.float64)
    b, h, w, c = x.shape
    total, count = np.zeros_like(x), np.zeros((h, w))
    for bi in range(b):
        for u in range(h - s + 1):
            for v in range(w - s + 1):
                crops = t[:, u : u + s, v : v + s]
                wts = _weights(x[bi, u : u + s, v : v + s], crops, ab)
                total[bi, u : u + s, v : v + s] += np.tensordot(wts, crops, axes=1)
                if bi == 0:
                    count[u : u + s, v : v + s] += 1
    return total / count[None, :, :, None]


def oracle_flex(train, x, ab, mask_cols, flip):
    t = _augment(train, flip).astype(np.float64)
    x = x.astype(np.float64)
    b, h, w, c = x.shape
    tf, xf = t.reshape(len(t), h * w, c), x.reshape(b, h * w, c)
    out = np.zeros_like(xf)
    for bi in range(b):
        for p in range(h * w):
            sel = np.flatnonzero(mask_cols[:, p])
            wts = _weights(xf[bi, sel], tf[:, sel], ab)
            out[bi, p] = wts @ tf[:, p]
    return out.reshape(x.shape)


def oracle_grow(heat, lam):
    n = heat.shape[0]
    cols = np.zeros((n, n))
    for p in range(n):
        order = sorted(range(n), key=lambda q: (-heat[p, q], q))
        total, acc = heat[p].sum(), 0.0
        for q in order:
            if acc >= lam * total:
                break
            cols[q, p] = 1
            acc += heat[p, q]
        cols[p, p] = 1
    return cols


@pytest.mark.parametrize(
    "shape,s,flip", [((6, 6, 1), 3, False), ((6, 6, 1), 3, True), ((5, 6, 3), 2, True)]
)
def test_square_matches_oracle(shape, s, flip):
    train, x = _data(9, shape)
    den = pspc.make_pspc_square(train=train, patch_size=s, flip=flip, chunk_size=4)
    np.testing.assert_allclose(
        np.asarray(den(x, AB)), oracle_square(train, x, AB, s, flip), atol=2e-5
    )


def test_square_full_size_equals_optimal():
    train, x = _data(9, (6, 6, 1), seed=1)
    for flip in (False, True):
        got = np.asarray(pspc.make_pspc_square(train=train, patch_size=6, flip=flip)(x, AB))
        opt = np.asarray(make_optimal(train=_augment(train, flip))(x, AB))
        np.testing.assert_allclose(got, opt, atol=2e-5)
    small = np.asarray(
        pspc.make_pspc_square(train=train, patch_size=3, flip=False, chunk_size=4)(x, AB)
    )
    assert np.abs(small - np.asarray(make_optimal(train=train)(x, AB))).max() > 1e-2


def test_square_chunk_size_independence():
    train, x = _data(9, (6, 6, 1), seed=2)
    outs = [
        np.asarray(
            pspc.make_pspc_square(train=train, patch_size=3, flip=True, chunk_size=cs)(x, AB)
        )
        for cs in (4, 7)
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)


def test_square_size_schedules():
    train, x = _data(4, (6, 6, 1))
    den = pspc.make_pspc_square(train=train)  # published CIFAR schedule, clipped to 6
    ab = lambda sig: 1.0 / (1.0 + sig**2)
    assert [den.size_at(ab(s)) for s in (80.0, 8.4, 5.32, 1.92, 0.585, 0.296, 0.01)] == [
        6,
        6,
        6,
        6,
        5,
        3,
        3,
    ]
    assert pspc.CIFAR10_EDM_SCHEDULE.size(ab(5.32)) == 23
    assert pspc.CIFAR10_EDM_SCHEDULE.size(ab(1.09)) == 7
    den = pspc.make_pspc_square(train=train, patch_size=lambda sigma: 2 if sigma > 1 else 4)
    assert den.size_at(ab(3.0)) == 2 and den.size_at(ab(0.5)) == 4
    den = pspc.make_pspc_square(train=train, patch_size=[3] * 18)
    assert den.size_at(0.3) == 3
    # a digit string is the fixed size (a config field holding schedule names takes it so)
    assert pspc.make_pspc_square(train=train, patch_size="4").size_at(0.3) == 4
    with pytest.raises(ValueError, match="18"):
        pspc.make_pspc_square(train=train, patch_size=[3, 4])
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        pspc.make_pspc_square(train=train, patch_size=7)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        pspc.make_pspc_square(train=train, patch_size=0)


def test_square_edm_sampler_switch_matches_eager():
    train, _ = _data(9, (6, 6, 1))
    sched = pspc.SizeSchedule((6, 3), (5.0, 0.5), "sigma")
    den = pspc.make_pspc_square(train=train, patch_size=sched, flip=False, chunk_size=4)
    z = 8.0 * jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
    res = sampling.edm(den, z, np.array([8.0, 1.5, 0.3, 0.0]))
    assert [den.size_at(a) for a in res.abs] == [6, 3, 3]
    for s in range(3):
        np.testing.assert_allclose(
            np.asarray(res.x0_hats[s]), np.asarray(den(res.xts[s], res.abs[s])), atol=1e-4
        )


def _linear_network(shape, seed=3):
    h, w, c = shape
    n = h * w * c
    a = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32) / np.sqrt(n)
    net = lambda x, ab: jnp.matmul(
        x.reshape(x.shape[0], -1), jnp.asarray(a).T, precision=jax.lax.Precision.HIGHEST
    ).reshape(x.shape)
    heat = np.abs(a.reshape(h * w, c, h * w, c)).sum(axis=(1, 3))  # [p, q]: sum |A|
    return net, heat


def test_gradient_heatmaps_and_mask_growth():
    shape = (4, 5, 3)
    _, heat = _linear_network(shape)
    a = np.random.default_rng(3).normal(size=(60, 60)).astype(np.float32) / np.sqrt(60)
    net = lambda x, ab: jnp.tanh(
        jnp.matmul(x.reshape(x.shape[0], -1), jnp.asarray(a).T, precision=jax.lax.Precision.HIGHEST)
    ).reshape(x.shape)
    x = np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32)
    # per-probe Jacobian diag(1 - tanh^2(A x)) A, |.| summed over channels, mean over probes
    jac = (1 - np.tanh(x.reshape(3, -1).astype(np.float64) @ a.T) ** 2)[:, :, None] * a[None]
    want = np.abs(jac.reshape(3, 20, 3, 20, 3)).sum(axis=(2, 4)).mean(0)
    np.testing.assert_allclose(
        pspc.gradient_heatmaps(net, x, 0.5, pixel_batch=7), want, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        pspc._own_heatmaps(net, x, 0.5, pixel_batch=7), want, rtol=1e-4, atol=1e-6
    )
    for lam in (0.3, 0.75, 1.0):
        np.testing.assert_array_equal(pspc.grow_masks(heat, lam), oracle_grow(heat, lam))
    zero = np.zeros((4, 4))
    zero[0, 2] = 1.0
    np.testing.assert_array_equal(pspc.grow_masks(zero, 1.0)[:, 0], [1, 0, 1, 0])
    np.testing.assert_array_equal(pspc.grow_masks(zero, 1.0)[:, 1], [0, 1, 0, 0])
    with pytest.raises(ValueError, match="lambda"):
        pspc.grow_masks(heat, 1.5)


def test_flex_matches_oracle():
    shape = (5, 5, 1)
    train, x = _data(8, shape, seed=4)
    net, heat = _linear_network(shape, seed=5)
    lam = lambda sigma: 0.4 if sigma > 1.0 else 0.8
    abs_grid = [0.3, 0.8]
    den = pspc.make_pspc_flex(
        train=train, network=net, abs=abs_grid, lam=lam, num_probes=2, chunk_size=5
    )
    for ab in abs_grid:
        sigma = np.sqrt((1 - ab) / ab)
        cols = oracle_grow(heat, lam(sigma))
        np.testing.assert_array_equal(np.asarray(den.masks[int(den.mask_index(ab))]), cols)
        np.testing.assert_allclose(
            np.asarray(den(x, ab)), oracle_flex(train, x, ab, cols, True), atol=2e-5
        )
    # a query between the grid points uses the masks of the nearest one in log sigma
    assert int(den.mask_index(0.7)) == 1 and int(den.mask_index(0.35)) == 0
    # chunk-size independence
    den1 = pspc.make_pspc_flex(train=train, masks=den.masks, abs=abs_grid, chunk_size=1)
    np.testing.assert_allclose(np.asarray(den1(x, 0.8)), np.asarray(den(x, 0.8)), atol=1e-5)


def test_flex_full_masks_equal_optimal_and_errors():
    train, x = _data(8, (5, 5, 1), seed=6)
    n = 25
    den = pspc.make_pspc_flex(train=train, masks=np.ones((n, n)), flip=False)
    np.testing.assert_allclose(
        np.asarray(den(x, AB)), np.asarray(make_optimal(train=train)(x, AB)), atol=2e-5
    )
    with pytest.raises(ValueError, match="network"):
        pspc.make_pspc_flex(train=train)
    with pytest.raises(ValueError, match="masks must be"):
        pspc.make_pspc_flex(train=train, masks=np.ones((3, 3)))
    with pytest.raises(ValueError, match="0/1"):
        pspc.make_pspc_flex(train=train, masks=0.5 * np.ones((n, n)))
