"""Sensitivity fields (docs/algorithms.md §9): Jacobian rows, fields, locality summaries."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locality import denoisers, stats
from locality import sensitivity as sens
from locality.denoisers import linear as linear_lib  # noqa: F401  (registers "linear")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nonlinear(x, ab):
    """A nonlinear map coupling pixels (a shift), channels (a channel mix) and noise level."""
    mix = jnp.asarray([[1.0, -0.5], [0.25, 2.0]], jnp.float32)
    y = jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, mix)) * jnp.sqrt(ab)
    return y + 0.3 * jnp.roll(x, 1, axis=2) ** 2 - 0.1 * x * jnp.roll(x, -1, axis=1)


def test_rows_match_dense_jacfwd_of_nonlinear_map():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    pixels = [(0, 0), (2, 3), (3, 1)]
    rows = sens.jacobian_rows(_nonlinear, x, 0.7, pixels)
    assert rows.shape == (3, 3, 2, 4, 4, 2)
    for b in range(3):
        dense = jax.jacfwd(lambda y: _nonlinear(y[None], 0.7)[0])(x[b])  # [H, W, C, H, W, C]
        for k, (i, j) in enumerate(pixels):
            np.testing.assert_allclose(rows[k, b], dense[i, j], atol=1e-6)
    # Chunked pull-backs (lax.map) give the same rows.
    chunked = sens.jacobian_rows(_nonlinear, x, 0.7, pixels, pixel_batch=2)
    np.testing.assert_allclose(chunked, rows, atol=1e-7)


def test_rows_match_finite_differences_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 4, 2))
    rows = np.asarray(sens.jacobian_rows(_nonlinear, jnp.asarray(x, jnp.float32), 0.5, [(1, 2)]))
    f = lambda y: np.asarray(_nonlinear(jnp.asarray(y, jnp.float32), 0.5), np.float64)  # noqa: E731
    h = 1e-2
    fd = np.zeros((2, 4, 4, 2))
    for q in np.ndindex(4, 4, 2):
        e = np.zeros_like(x)
        e[(0,) + q] = h
        fd[(slice(None),) + q] = (f(x + e) - f(x - e))[0, 1, 2] / (2 * h)  # [C_out]
    np.testing.assert_allclose(rows[0, 0], fd, atol=2e-3)


def test_rows_of_linear_map_are_matrix_rows():
    rng = np.random.default_rng(2)
    shape = (4, 4, 2)
    n = 32
    a = rng.normal(size=(n, n)).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(2,) + shape), jnp.float32)
    plain = lambda y, ab: (y.reshape(y.shape[0], -1) @ a.T + b).reshape(y.shape)  # noqa: E731
    lin = denoisers.make("linear", weights={0.5: (a, b)}, shape=shape)
    for fn in (plain, lin):  # a plain callable (static) and a pytree denoiser (traced)
        rows = np.asarray(sens.jacobian_rows(fn, x, 0.5, [(1, 3)]))
        a4 = a.reshape(shape + shape)
        for bb in range(2):
            np.testing.assert_allclose(rows[0, bb], a4[1, 3], rtol=1e-5, atol=1e-5)


def _wiener_setup():
    rng = np.random.default_rng(3)
    x = np.clip(rng.normal(0.0, 0.35, size=(300, 5, 5, 2)), -1, 1)
    x[..., 1] = np.clip(0.5 * x[..., 0] + 0.2 * np.roll(x[..., 0], 1, axis=1), -1, 1)
    st = stats.gaussian_stats(x.astype(np.float32), use_cache=False)
    return st, denoisers.make("wiener", stats=st)


def test_wiener_field_is_abs_row_of_shrinkage_projector():
    st, wiener = _wiener_setup()
    ab = 0.3
    s = ab * st.eigvals / (ab * st.eigvals + 1.0 - ab)
    p64 = (st.eigvecs * s) @ st.eigvecs.T / np.sqrt(ab)  # float64 P_t / sqrt(ab)
    p6 = np.abs(p64).reshape(5, 5, 2, 5, 5, 2)
    rng = np.random.default_rng(4)
    x_t = jnp.asarray(rng.normal(size=(4, 5, 5, 2)), jnp.float32)
    pixels = [(2, 2), (0, 4), (4, 0)]
    got = np.asarray(sens.fields(wiener, x_t, ab, pixels))
    for k, (i, j) in enumerate(pixels):
        want = p6[i, j].sum(axis=(0, 3))  # sum over C_out and C_in
        np.testing.assert_allclose(got[k], want, rtol=2e-4, atol=2e-5 * want.max())
        np.testing.assert_allclose(sens.linear_field(p64, (5, 5, 2), (i, j)), want, rtol=1e-12)
    # The default pixel is the centre, and Wiener.jacobian agrees with the float64 projector.
    np.testing.assert_allclose(sens.field(wiener, x_t, ab), got[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(wiener.jacobian(ab)), p64, atol=2e-5 * np.abs(p64).max())


def test_pytree_denoiser_does_not_recompile_for_new_ab():
    _, wiener = _wiener_setup()
    x_t = jnp.zeros((2, 5, 5, 2), jnp.float32)
    sens.fields(wiener, x_t, 0.2, [(1, 1)])
    size = sens._rows_dynamic._cache_size()
    sens.fields(wiener, x_t, 0.9, [(1, 1)])
    assert sens._rows_dynamic._cache_size() == size


def test_radius_hand_built_fields():
    f = np.zeros((5, 5))
    f[2, 2] = 1.0
    assert sens.radius(f, (2, 2), 0.5) == 0.0
    assert sens.radius(f, (2, 2), 1.0) == 0.0
    assert sens.radius(f, (0, 0), 0.5) == pytest.approx(np.sqrt(8))
    f[2, 4] = 1.0  # equal mass 2 pixels away
    assert sens.radius(f, (2, 2), 0.5) == 0.0  # the centre alone holds exactly half
    assert sens.radius(f, (2, 2), 0.9) == 2.0
    g = np.zeros((5, 5))
    g[2, 2], g[3, 3] = 1.0, 3.0
    assert sens.radius(g, (2, 2), 0.5) == pytest.approx(np.sqrt(2))
    # Uniform 5x5 around the centre: cumulative counts by radius 1, 5, 9, 13, 21, 25.
    u = np.ones((5, 5))
    assert sens.radius(u, mass=0.5) == 2.0  # 12.5 pixels needed -> 13 within r = 2
    assert sens.radius(u, mass=0.2) == 1.0  # 5 pixels
    assert sens.radius(u, mass=0.84) == pytest.approx(np.sqrt(5))  # 21 pixels


def test_cosine_and_iou_hand_built_fields():
    f = np.array([[1.0, 0.0], [0.0, 0.0]])
    g = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert sens.cosine(f, 2 * f) == pytest.approx(1.0)
    assert sens.cosine(f, np.array([[0.0, 1.0], [0.0, 0.0]])) == 0.0
    assert sens.cosine(f, g) == pytest.approx(1 / np.sqrt(2))
    a = np.zeros((3, 3))
    a[0, 0] = a[0, 1] = 1.0
    b = np.zeros((3, 3))
    b[0, 1] = b[0, 2] = 1.0
    assert sens.iou(a, b, mass=0.9) == pytest.approx(1 / 3)  # both pixels needed
    assert sens.iou(a, a, mass=0.9) == 1.0
    c = np.array([[0.5, 0.3, 0.2]])
    np.testing.assert_array_equal(sens.support(c, mass=0.5), [[True, False, False]])
    np.testing.assert_array_equal(sens.support(c, mass=0.8), [[True, True, False]])
    np.testing.assert_array_equal(sens.support(c, threshold=0.5), [[True, True, False]])
    d = np.array([[0.2, 0.3, 0.5]])
    assert sens.iou(c, d, mass=0.5) == 0.0
    assert sens.iou(c, d, threshold=0.5) == pytest.approx(1 / 3)  # {0, 1} vs {1, 2}
    assert sens.iou(c, d, threshold=0.3) == 1.0  # >= 0.15: all three


def test_bad_inputs_raise():
    x = jnp.zeros((2, 4, 4, 1), jnp.float32)
    ident = lambda y, ab: y  # noqa: E731
    with pytest.raises(ValueError, match="outside the 4 x 4 image"):
        sens.field(ident, x, 0.5, (4, 0))
    with pytest.raises(ValueError, match="outside"):
        sens.fields(ident, x, 0.5, [(0, 0), (-1, 2)])
    with pytest.raises(ValueError, match="rank 4"):
        sens.field(ident, x[0], 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        sens.field(ident, x, 1.5)
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        sens.fields(ident, x, 0.5, [(1, 2, 3)])
    with pytest.raises(ValueError, match="different shapes"):
        sens.cosine(np.ones((3, 3)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="negative"):
        sens.radius(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="mass"):
        sens.iou(np.ones((3, 3)), np.ones((3, 3)), mass=0.0)
    with pytest.raises(ValueError, match="all-zero"):
        sens.radius(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        sens.cosine(np.ones(9), np.ones(9))


def _load_experiment(name):
    spec = importlib.util.spec_from_file_location(
        f"exp_{name}", os.path.join(ROOT, "experiments", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sensitivity_experiment_smoke(tmp_path):
    from configs import sensitivity as cfg_mod

    exp = _load_experiment("sensitivity")
    config = cfg_mod.get_config("smoke")
    # A linear model equal to the Wiener filter at one of the two levels: its row must match.
    train = exp.synthetic_images(int(config.stats_limit))
    st = stats.gaussian_stats(train, use_cache=False)
    from locality import schedules
    from locality.denoisers.wiener import dense_wiener_matrices

    ab = float(schedules.ddpm_linear().ab(config.timesteps[0]))
    w, b = dense_wiener_matrices(st.covariance(), st.mean, ab)
    config.linear_weights = linear_lib.save_linear(
        str(tmp_path / "lin.npz"), {ab: (w, b)}, st.shape
    )
    config.networks = {"unet": str(tmp_path / "missing")}
    m = exp.run(config, str(tmp_path / "out"))
    for f in (
        "config.json",
        "metrics.json",
        "summary.txt",
        "radius.png",
        "cosine.png",
        "iou_50.png",
        "iou_90.png",
        "fields_r4_c4.png",
        "fields_r1_c6.png",
        "similarity_vs_t.png",
    ):
        assert (tmp_path / "out" / f).exists(), f
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["models"]["unet"]["status"] == "skipped"
    assert saved["models"]["linear"]["status"] == "ok"
    t0, t1 = (str(t) for t in config.timesteps)
    assert m["cosine"][t0]["4,4"][0, 1] == pytest.approx(1.0, abs=1e-5)  # linear == Wiener
    assert np.isnan(m["cosine"][t1]["4,4"][0, 1])  # not trained at t1
    r50 = m["radius"]["wiener"]["4,4"]["0.5"]
    assert r50[0] <= r50[1]  # the field widens with noise on this data
