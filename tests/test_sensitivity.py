"""Sensitivity fields (docs/algorithms.md §9): Jacobian rows, fields, locality summaries."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locality import denoisers, field_report, stats
from locality import field_summary as fsum
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
    assert fsum.radius(f, (2, 2), 0.5) == 0.0
    assert fsum.radius(f, (2, 2), 1.0) == 0.0
    assert fsum.radius(f, (0, 0), 0.5) == pytest.approx(np.sqrt(8))
    f[2, 4] = 1.0  # equal mass 2 pixels away
    assert fsum.radius(f, (2, 2), 0.5) == 0.0  # the centre alone holds exactly half
    assert fsum.radius(f, (2, 2), 0.9) == 2.0
    g = np.zeros((5, 5))
    g[2, 2], g[3, 3] = 1.0, 3.0
    assert fsum.radius(g, (2, 2), 0.5) == pytest.approx(np.sqrt(2))
    # Uniform 5x5 around the centre: cumulative counts by radius 1, 5, 9, 13, 21, 25.
    u = np.ones((5, 5))
    assert fsum.radius(u, mass=0.5) == 2.0  # 12.5 pixels needed -> 13 within r = 2
    assert fsum.radius(u, mass=0.2) == 1.0  # 5 pixels
    assert fsum.radius(u, mass=0.84) == pytest.approx(np.sqrt(5))  # 21 pixels


def test_cosine_and_iou_hand_built_fields():
    f = np.array([[1.0, 0.0], [0.0, 0.0]])
    g = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert fsum.cosine(f, 2 * f) == pytest.approx(1.0)
    assert fsum.cosine(f, np.array([[0.0, 1.0], [0.0, 0.0]])) == 0.0
    assert fsum.cosine(f, g) == pytest.approx(1 / np.sqrt(2))
    a = np.zeros((3, 3))
    a[0, 0] = a[0, 1] = 1.0
    b = np.zeros((3, 3))
    b[0, 1] = b[0, 2] = 1.0
    assert fsum.iou(a, b, mass=0.9) == pytest.approx(1 / 3)  # both pixels needed
    assert fsum.iou(a, a, mass=0.9) == 1.0
    c = np.array([[0.5, 0.3, 0.2]])
    np.testing.assert_array_equal(fsum.support(c, mass=0.5), [[True, False, False]])
    np.testing.assert_array_equal(fsum.support(c, mass=0.8), [[True, True, False]])
    np.testing.assert_array_equal(fsum.support(c, threshold=0.5), [[True, True, False]])
    d = np.array([[0.2, 0.3, 0.5]])
    assert fsum.iou(c, d, mass=0.5) == 0.0
    assert fsum.iou(c, d, threshold=0.5) == pytest.approx(1 / 3)  # {0, 1} vs {1, 2}
    assert fsum.iou(c, d, threshold=0.3) == 1.0  # >= 0.15: all three


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
        fsum.cosine(np.ones((3, 3)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="negative"):
        fsum.radius(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="mass"):
        fsum.iou(np.ones((3, 3)), np.ones((3, 3)), mass=0.0)
    with pytest.raises(ValueError, match="all-zero"):
        fsum.radius(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        fsum.cosine(np.ones(9), np.ones(9))


# ----------------------------------------------------------------------------- spread pixels


def test_spread_pixels_count_bounds_and_spacing():
    for h, w in ((28, 28), (32, 32), (30, 22), (8, 8)):
        pix = sens.spread_pixels(h, w)
        assert len(pix) == 16 and len(set(pix)) == 16, (h, w)
        rows = sorted({r for r, _ in pix})
        cols = sorted({c for _, c in pix})
        assert len(rows) == len(cols) == 4
        assert pix == tuple((r, c) for r in rows for c in cols)  # a row-major grid
        assert all(0 <= r < h and 0 <= c < w for r, c in pix)
        for axis, n in ((rows, h), (cols, w)):
            gaps = np.diff(axis)
            assert np.all(np.abs(gaps - n / 4) <= 1), (h, w, axis)  # regular to within a pixel
            assert axis == sorted(n - 1 - v for v in axis)  # mirror-symmetric
            assert min(axis[0], n - 1 - axis[-1]) >= n // 8 - 1  # inset from the border
    # Band centres (i + 1/2) n / k - 1/2 without ties are the plain nearest pixel.
    for n in (28, 30, 22):
        want = np.rint((np.arange(4) + 0.5) * n / 4 - 0.5).astype(int).tolist()
        assert [r for r, c in sens.spread_pixels(n, n)[::4]] == want, n
    assert sens.spread_pixels(28, 28)[:4] == ((3, 3), (3, 10), (3, 17), (3, 24))
    assert [c for _, c in sens.spread_pixels(32, 32)[:4]] == [4, 12, 19, 27]  # ties inward
    assert sens.spread_pixels(28, 28, 1) == (sens.centre_pixel(28, 28),)
    assert sens.spread_pixels(29, 29, 9)[4] == (14, 14)  # an odd grid holds the centre
    assert len(sens.spread_pixels(28, 28, 17)) == 25  # rounded up to a square grid
    with pytest.raises(ValueError, match="count=17 needs a 5 x 5 grid"):
        sens.spread_pixels(4, 8, 17)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        sens.spread_pixels(8, 8, 0)


# ----------------------------------------------------------------------------- summaries


def _tiny_fields():
    """Two pixels of a 5 x 5 image, three models, two levels; radii, IoUs and cosines worked
    out by hand in :func:`test_summaries_of_hand_built_fields`."""
    pixels = [(2, 2), (1, 1)]
    a = np.zeros((2, 5, 5))
    a[0, 2, 2] = a[1, 1, 1] = 1.0  # "a": all mass on the pixel itself
    b = np.zeros((2, 5, 5))
    b[0, 2, 2], b[0, 2, 3], b[0, 1, 2], b[0, 3, 2] = 4.0, 3.0, 2.0, 1.0  # total 10, all at r <= 1
    b[1, 1, 1], b[1, 3, 3] = 3.0, 1.0  # total 4, the 1 at distance sqrt(8)
    fields = {"a": [a, 0.5 * a], "b": [b, None], "c": [2.0 * a, a]}  # "b" has no level-1 field
    return fields, pixels


def test_summaries_of_hand_built_fields():
    fields, pixels = _tiny_fields()
    st = fsum.field_statistics(fields, pixels)
    # Radii of b at level 0: pixel (2, 2) needs the ring at distance 1 for 50 % (4 < 5) and
    # 90 %; pixel (1, 1) holds 3 / 4 >= 50 % alone and needs the far pixel for 90 %.
    np.testing.assert_array_equal(st["radius"]["b"]["50"][0], [1.0, 0.0])
    np.testing.assert_array_equal(st["radius"]["b"]["90"][0], [1.0, np.sqrt(8)])
    assert np.isnan(st["radius"]["b"]["50"][1]).all()
    np.testing.assert_array_equal(st["radius"]["a"]["90"], np.zeros((2, 2)))
    # a vs b: 50 % supports {(2,2)} vs {(2,2), (2,3)} and {(1,1)} vs {(1,1)}; 90 % supports
    # add (1, 2) at the first pixel (4 + 3 + 2 = 9 >= 9) and (3, 3) at the second.
    ab = st["pairs"]["a|b"]
    np.testing.assert_allclose(ab["iou50"][0], [1 / 2, 1.0], rtol=1e-15)
    np.testing.assert_allclose(ab["iou90"][0], [1 / 3, 1 / 2], rtol=1e-15)
    np.testing.assert_allclose(ab["cosine"][0], [4 / np.sqrt(30), 3 / np.sqrt(10)], rtol=1e-14)
    assert list(st["pairs"]) == ["a|b", "a|c", "b|c"]
    np.testing.assert_allclose(st["pairs"]["a|c"]["cosine"], 1.0, rtol=1e-15)

    s = fsum.summarize_statistics(st, [50, 700], num_inputs=3, reference="a")
    assert (s["pixels"], s["num_inputs"], s["timesteps"]) == ([[2, 2], [1, 1]], 3, [50, 700])
    assert (s["models"], s["reference"]) == (["a", "b", "c"], "a")
    # Two pixels: mean (x + y) / 2 and SE = std(ddof=1) / sqrt(2) = |x - y| / 2.
    r50, r90 = s["per_model"]["b"]["radius50"], s["per_model"]["b"]["radius90"]
    assert r50 == {"mean": [0.5, None], "se": [0.5, None]}
    assert r90["mean"][0] == pytest.approx((1 + np.sqrt(8)) / 2, rel=1e-15)
    assert r90["se"][0] == pytest.approx((np.sqrt(8) - 1) / 2, rel=1e-14)
    i90 = s["pairs"]["a|b"]["iou90"]
    assert i90["mean"] == [pytest.approx(5 / 12), None]
    assert i90["se"] == [pytest.approx(1 / 12), None]
    cos = s["pairs"]["a|b"]["cosine"]
    assert cos["mean"][0] == pytest.approx((4 / np.sqrt(30) + 3 / np.sqrt(10)) / 2)
    assert s["per_model"]["a"]["radius50"] == {"mean": [0.0, 0.0], "se": [0.0, 0.0]}
    assert set(s["verdicts"]) == {"b", "c"}
    # The one-call form gives the same block; JSON keeps it (no NaN, None for missing values).
    assert fsum.summarize_fields(fields, pixels, [50, 700], num_inputs=3, reference="a") == s
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    # The tables of earlier runs: symmetric matrices in model order, NaN without a field.
    tab = field_report.pixel_tables(st, fields, [50, 700])
    assert tab["radius"]["b"]["1,1"]["0.9"] == [pytest.approx(np.sqrt(8)), None]
    m = tab["iou"]["0.9"]["50"]["2,2"]
    np.testing.assert_allclose(m, [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])
    assert np.isnan(tab["cosine"]["700"]["1,1"][1]).all()
    assert tab["cosine"]["700"]["1,1"][0, 2] == pytest.approx(1.0)


def test_all_zero_fields_are_left_out_of_the_pixel_means():
    """A pixel whose output depends on no input (an all-zero field) gets NaN statistics and the
    means and SEs are those of the other pixels."""
    pixels = [(1, 1), (2, 2), (3, 3)]
    a = np.zeros((3, 5, 5))
    a[0, 1, 1], a[0, 1, 2] = 1.0, 1.0  # radius50 0 (the pixel holds half), radius90 1
    a[2, 3, 3], a[2, 3, 1] = 1.0, 3.0  # radius50 = radius90 = 2 (the far pixel holds 3/4)
    a[1, 0, 0] = 1e-14  # round-off of an exactly-zero row counts as zero
    b = np.ones((3, 5, 5))
    st = fsum.field_statistics({"a": [a], "b": [b]}, pixels)
    r50 = st["radius"]["a"]["50"][0]
    assert r50[0] == 0.0 and np.isnan(r50[1]) and r50[2] == 2.0
    assert np.isnan(st["pairs"]["a|b"]["cosine"][0, 1])
    means, ses = fsum.mean_se(st["radius"]["a"]["50"])
    assert means == [1.0] and ses[0] == pytest.approx(np.std([0.0, 2.0], ddof=1) / np.sqrt(2))
    a[1, 0, 0] = 0.0
    tab = field_report.pixel_tables(st, {"a": [a], "b": [b]}, [50])
    assert np.isnan(tab["cosine"]["50"]["2,2"]).sum() == 3  # a's diagonal and the a|b pair
    assert tab["cosine"]["50"]["1,1"][0, 0] == pytest.approx(1.0)


def test_summary_bad_inputs_raise():
    fields, pixels = _tiny_fields()
    st = fsum.field_statistics(fields, pixels)
    with pytest.raises(ValueError, match="strictly ascending"):
        fsum.summarize_statistics(st, [700, 50], num_inputs=1, reference="a")
    with pytest.raises(ValueError, match="reference 'wiener' is not among"):
        fsum.summarize_statistics(st, [50, 700], num_inputs=1)
    with pytest.raises(ValueError, match="timesteps has 3"):
        fsum.summarize_statistics(st, [1, 2, 3], num_inputs=1, reference="a")
    with pytest.raises(ValueError, match="different numbers of levels"):
        fsum.field_statistics({"a": fields["a"], "b": fields["b"][:1]}, pixels)
    with pytest.raises(ValueError, match=r"expected \(2, 5, 5\)"):
        fsum.field_statistics({"a": fields["a"], "b": [np.ones((3, 5, 5)), None]}, pixels)
    with pytest.raises(ValueError, match="every entry is None"):
        fsum.field_statistics({"a": [None]}, pixels)


def _summary(unet_r50, wiener_r50, iou50, ts=(50, 700)):
    """A hand-made two-model summary: radius50 and IoU50 as (mean, se) per level."""

    def block(pairs):
        return {"mean": [m for m, _ in pairs], "se": [s for _, s in pairs]}

    return {
        "timesteps": list(ts),
        "models": ["wiener", "unet"],
        "reference": "wiener",
        "per_model": {
            "unet": {"radius50": block(unet_r50)},
            "wiener": {"radius50": block(wiener_r50)},
        },
        "pairs": {"wiener|unet": {"iou50": block(iou50)}},
    }


def test_verdict_agree_rule():
    # IoU50 >= 0.5 and radius ratio in [1/1.5, 1.5] at every level: agree.
    s = _summary([(3.0, 0.2), (6.0, 0.3)], [(2.5, 0.2), (5.0, 0.3)], [(0.6, 0.05), (0.7, 0.05)])
    v = fsum.field_verdict(s, "unet", "wiener")
    assert v["agree"] and "agree at every level (t = 50, 700)" in v["text"]
    # The boundaries are inclusive: ratio exactly 1.5 and IoU exactly 0.5 still agree.
    s = _summary([(3.0, 0.2), (7.5, 0.3)], [(2.0, 0.2), (5.0, 0.3)], [(0.5, 0.05), (0.7, 0.05)])
    assert fsum.field_verdict(s, "unet")["agree"]
    # A ratio just outside, or an IoU just under, at one level: no agreement.
    s = _summary([(3.0, 0.2), (7.6, 0.3)], [(2.0, 0.2), (5.0, 0.3)], [(0.6, 0.05), (0.7, 0.05)])
    v = fsum.field_verdict(s, "unet")
    assert not v["agree"] and "do not agree at t = 700" in v["text"]
    assert "they agree at t = 50" in v["text"]
    s = _summary([(3.0, 0.2), (6.0, 0.3)], [(2.5, 0.2), (5.0, 0.3)], [(0.49, 0.05), (0.7, 0.05)])
    assert not fsum.field_verdict(s, "unet")["agree"]
    # The cats/dogs case: high similarity of |J| at the centre would hide this.
    s = _summary([(2.1, 0.3), (10.2, 0.5)], [(9.5, 0.8), (7.1, 0.6)], [(0.08, 0.02), (0.46, 0.04)])
    v = fsum.field_verdict(s, "unet")
    assert not v["agree"]
    assert (
        "at t=50 the unet's 50 % radius is 2.10 +- 0.30 px vs 9.50 +- 0.80 px for wiener "
        "(ratio 0.22" in v["text"]
    )
    assert "IoU50 is 0.08 +- 0.02" in v["text"] and "they agree at no level" in v["text"]
    # Zero radii: both zero count as equal, a zero reference against a non-zero one does not.
    s = _summary([(0.0, 0.0), (1.0, 0.1)], [(0.0, 0.0), (1.0, 0.1)], [(0.9, 0.0), (0.9, 0.0)])
    assert fsum.field_verdict(s, "unet")["agree"]
    s = _summary([(0.5, 0.1), (1.0, 0.1)], [(0.0, 0.0), (1.0, 0.1)], [(0.9, 0.0), (0.9, 0.0)])
    assert not fsum.field_verdict(s, "unet")["agree"]
    # Levels without a value of one of the two models are not judged; none at all: no verdict.
    s = _summary([(3.0, 0.2), (None, None)], [(3.0, 0.2), (9.0, 0.3)], [(0.8, 0.0), (None, None)])
    assert fsum.field_verdict(s, "unet")["agree"]
    s = _summary([(None, None)] * 2, [(3.0, 0.2), (9.0, 0.3)], [(None, None)] * 2)
    v = fsum.field_verdict(s, "unet")
    assert not v["agree"] and "cannot be compared" in v["text"]


def test_verdict_shrink_rule():
    # unet: 6.0 -> 2.0, a fall of 4.0 > 2 sqrt(0.3^2 + 0.4^2) = 1.0; wiener rises.
    s = _summary([(2.0, 0.3), (6.0, 0.4)], [(9.5, 0.8), (7.0, 0.5)], [(0.1, 0.0), (0.5, 0.0)])
    v = fsum.field_verdict(s, "unet")
    assert v["shrink"] and not v["reference_shrinks"]
    assert (
        "The unet field shrinks as noise decreases (radius50 falls from 6.00 +- 0.40 px at "
        in v["text"]
    )
    assert "the wiener field does not" in v["text"]
    # Both fall by more than 2 SE.
    s = _summary([(2.0, 0.3), (6.0, 0.4)], [(5.0, 0.3), (9.0, 0.4)], [(0.6, 0.0), (0.6, 0.0)])
    v = fsum.field_verdict(s, "unet")
    assert v["shrink"] and v["reference_shrinks"] and v["text"].count("falls from") == 2
    assert "Both shrink as noise decreases" in v["text"]
    # A fall of exactly 2 SE is not enough (strict), one just above is.
    s = _summary([(5.0, 0.3), (6.0, 0.4)], [(5.0, 0.3), (6.01, 0.4)], [(0.6, 0.0), (0.6, 0.0)])
    v = fsum.field_verdict(s, "unet")
    assert not v["shrink"] and v["reference_shrinks"]
    # One level only, or no SE: cannot shrink.
    s = _summary([(2.0, 0.3), (None, None)], [(2.0, None), (6.0, None)], [(0.6, 0.0), (None, None)])
    v = fsum.field_verdict(s, "unet")
    assert not v["shrink"] and not v["reference_shrinks"]
    assert "Neither shrinks" in v["text"] and "1 level(s) only" in v["text"]
    with pytest.raises(ValueError, match="model 'dit' is not in the summary"):
        fsum.field_verdict(s, "dit")
    with pytest.raises(ValueError, match="both 'wiener'"):
        fsum.field_verdict(s, "wiener")


def test_field_table_colour_scale_clips_off_pixel_values(tmp_path, monkeypatch):
    """The colour scale of a field panel tops out at the 99th percentile of the values other
    than the marked pixel, and every panel has a colour bar."""
    from locality import plotting

    captured = []
    monkeypatch.setattr(plotting, "atomic_savefig", lambda fig, path, dpi=100: captured.append(fig))
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 1, (7, 7))
    f[3, 3] = 50.0  # the spike at the output pixel
    g = rng.uniform(0, 2, (7, 7))
    plotting.save_heatmap_table(
        [[f, g]],
        str(tmp_path / "x.png"),
        row_labels=["m"],
        col_labels=["t1", "t2"],
        marks=[[(3, 3), (0, 0)]],
        colorbar=True,
        clip_percentile=99.0,
        colorbar_label="clipped",
    )
    (fig,) = captured
    images = [ax.images[0] for ax in fig.axes if ax.images]
    off_f = np.delete(f.ravel(), 3 * 7 + 3)
    off_g = np.delete(g.ravel(), 0)
    assert images[0].get_clim() == (0.0, pytest.approx(np.percentile(off_f, 99)))
    assert images[1].get_clim() == (0.0, pytest.approx(np.percentile(off_g, 99)))
    assert len(fig.axes) == 4  # two panels and their two colour bars
    with pytest.raises(ValueError, match="clip_percentile"):
        plotting.save_heatmap_table(
            [[f]], str(tmp_path / "y.png"), row_labels=["m"], col_labels=["t"], clip_percentile=0
        )


# ----------------------------------------------------------------------------- entry point


def _load_experiment(name):
    spec = importlib.util.spec_from_file_location(
        f"exp_{name}", os.path.join(ROOT, "experiments", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sensitivity_experiment_smoke(tmp_path):
    from configs import sensitivity as cfg_mod
    from experiments import common
    from locality import schedules
    from locality.denoisers import pca_locality
    from locality.denoisers.wiener import dense_wiener_matrices

    exp = _load_experiment("sensitivity")
    config = cfg_mod.get_config("smoke")
    assert config.pixels is None  # the default: pixels spread over the image
    # A linear model equal to the Wiener filter at one of the two levels: its row must match.
    train = common.load_images(config, config.stats_split, config.stats_limit)
    st = stats.gaussian_stats(train, use_cache=False)
    ab = float(schedules.ddpm_linear().ab(config.timesteps[0]))
    w, b = dense_wiener_matrices(st.covariance(), st.mean, ab)
    config.linear_weights = linear_lib.save_linear(
        str(tmp_path / "lin.npz"), {ab: (w, b)}, st.shape
    )
    config.networks = {"unet": str(tmp_path / "missing")}
    m = exp.run(config, str(tmp_path / "out"))
    out = tmp_path / "out"
    for f in ("config.json", "metrics.json", "summary.txt", "radius.png", "similarity_vs_t.png"):
        assert (out / f).exists(), f
    pixels = sens.spread_pixels(8, 8, 16)
    # field tables of the first pixel and of the one nearest the centre
    assert sorted(p.name for p in out.glob("fields_*.png")) == [
        "fields_r1_c1.png",
        "fields_r3_c3.png",
    ]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["models"]["unet"]["status"] == "skipped"
    assert saved["models"]["linear"]["status"] == "ok"
    s = saved["summary"]
    assert set(s) == {
        "pixels",
        "num_inputs",
        "timesteps",
        "models",
        "reference",
        "per_model",
        "pairs",
        "verdicts",
    }
    assert s["pixels"] == [list(p) for p in pixels] and s["num_inputs"] == 4
    assert s["timesteps"] == [100, 600]
    assert s["models"] == ["wiener", "linear", "pca_locality_mask"]
    assert s["reference"] == "wiener" and "wiener|linear" in s["pairs"]
    # the paper's masks of the probed pixels join as a binary field: the mass at the output
    # pixel is 1 / (the number of inputs that pixel's mask keeps)
    for k, t in enumerate(config.timesteps):
        ab_t = float(schedules.ddpm_linear().ab(t))
        mask, _ = pca_locality.masks(st, ab_t, config.pca_mask_threshold)
        r, c = pixels[0]
        want = 1.0 / mask[:, r * 8 + c].sum()
        assert saved["field_mass_at_centre"]["pca_locality_mask"][k] == pytest.approx(want)
    assert set(s["per_model"]["linear"]) == {"radius50", "radius90"}
    assert set(s["pairs"]["wiener|linear"]) == {"cosine", "iou50", "iou90"}
    assert set(s["verdicts"]["linear"]) == {"agree", "shrink", "reference_shrinks", "text"}
    # linear == Wiener at t0 (and has no field at t1): identical statistics there.
    pair = s["pairs"]["wiener|linear"]
    assert pair["cosine"]["mean"][0] == pytest.approx(1.0, abs=1e-5)
    assert pair["iou50"]["mean"] == [1.0, None] and pair["iou50"]["se"] == [0.0, None]
    r_lin, r_w = s["per_model"]["linear"]["radius50"], s["per_model"]["wiener"]["radius50"]
    assert r_lin["mean"] == [r_w["mean"][0], None]
    assert s["verdicts"]["linear"]["agree"] and not s["verdicts"]["linear"]["shrink"]
    # The summary is the mean and SE over the per-pixel radii of the earlier keys.
    per_pixel = [saved["radius"]["wiener"][f"{p[0]},{p[1]}"]["0.5"] for p in pixels]
    np.testing.assert_allclose(r_w["mean"], np.mean(per_pixel, axis=0), rtol=1e-12)
    np.testing.assert_allclose(r_w["se"], np.std(per_pixel, axis=0, ddof=1) / 4, rtol=1e-12)
    assert r_w["mean"][0] <= r_w["mean"][1]  # the field widens with noise on this data
    # Earlier keys are kept: the model-by-model matrices of every pixel.
    t0, t1 = (str(t) for t in config.timesteps)
    assert m["cosine"][t0]["1,1"][0, 1] == pytest.approx(1.0, abs=1e-5)  # linear == Wiener
    assert np.isnan(m["cosine"][t1]["1,1"][0, 1])  # not trained at t1
    assert max(m["check_linear_field_rel_err"]["wiener"]) < 1e-4
    text = (out / "summary.txt").read_text()
    assert "verdict linear vs wiener: The linear and wiener fields agree" in text

    # An explicit list of pixels is still used as given.
    config.pixels = ((4, 4), (1, 6))
    m = exp.run(config, str(tmp_path / "out2"))
    assert m["summary"]["pixels"] == [[4, 4], [1, 6]] and set(m["radius"]["wiener"]) == {
        "4,4",
        "1,6",
    }
