"""LS / ELS / bbELS: float64 brute-force oracles, known limits, symmetry, exactness, dispatch."""

import json

import jax
import numpy as np
import pytest
from conftest import noisy_uniform_data

from locality import sampling, schedules
from locality.denoisers import local_score as L
from locality.denoisers import patch_schedules as ps
from locality.denoisers.optimal import make_optimal

AB = 0.6
STD = dict(n=12, shape=(6, 6, 1), seed=0)  # shared by several tests so compiled programs are reused
CS = 4


def _data(n, shape, seed=0, batch=2):
    return noisy_uniform_data(n, shape, AB, seed, batch)


def _softmax_read(query, patches, centres, ab):
    """sum_P softmax(-||q - sqrt(ab) P||^2 / (2 (1 - ab))) * centre(P), float64."""
    d = np.sum((query[None] - np.sqrt(ab) * patches) ** 2, axis=tuple(range(1, patches.ndim)))
    logit = -d / (2 * (1 - ab))
    w = np.exp(logit - logit.max())
    return (w[:, None] * centres).sum(0) / w.sum()


def oracle_ls(train, x, ab, k):
    x, train = x.astype(np.float64), train.astype(np.float64)
    r = k // 2
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    tp = np.pad(train, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.zeros_like(x)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                out[bi, i, j] = _softmax_read(
                    xp[bi, i : i + k, j : j + k], tp[:, i : i + k, j : j + k], train[:, i, j], ab
                )
    return out


def oracle_els(train, x, ab, k, dictionary):
    x, train = x.astype(np.float64), train.astype(np.float64)
    r = k // 2
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="wrap")
    patches, centres = [], []
    if dictionary == "wrapped":
        tp = np.pad(train, ((0, 0), (r, r), (r, r), (0, 0)), mode="wrap")
        for n in range(len(train)):
            for i in range(h):
                for j in range(w):
                    patches.append(tp[n, i : i + k, j : j + k])
                    centres.append(train[n, i, j])
    else:
        for n in range(len(train)):
            for i in range(r, h - r):
                for j in range(r, w - r):
                    patches.append(train[n, i - r : i + r + 1, j - r : j + r + 1])
                    centres.append(train[n, i, j])
    patches, centres = np.stack(patches), np.stack(centres)
    out = np.zeros_like(x)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                out[bi, i, j] = _softmax_read(xp[bi, i : i + k, j : j + k], patches, centres, ab)
    return out


def oracle_bbels(train, x, ab, k):
    """Interior: all interior patches; edge: same row/column, any interior position along the
    edge; corner: the same location. Zero padding."""
    x, train = x.astype(np.float64), train.astype(np.float64)
    r = k // 2
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    tp = np.pad(train, ((0, 0), (r, r), (r, r), (0, 0)))
    inner_rows, inner_cols = range(r, h - r), range(r, w - r)
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            row_edge = i < r or i > h - 1 - r
            col_edge = j < r or j > w - 1 - r
            if not row_edge and not col_edge:
                locs = [(a, bb) for a in inner_rows for bb in inner_cols]
            elif row_edge and not col_edge:
                locs = [(i, bb) for bb in inner_cols]
            elif col_edge and not row_edge:
                locs = [(a, j) for a in inner_rows]
            else:
                locs = [(i, j)]
            patches = np.stack(
                [tp[n, a : a + k, bb : bb + k] for n in range(len(train)) for (a, bb) in locs]
            )
            centres = np.stack([train[n, a, bb] for n in range(len(train)) for (a, bb) in locs])
            for bi in range(b):
                out[bi, i, j] = _softmax_read(xp[bi, i : i + k, j : j + k], patches, centres, ab)
    return out


@pytest.mark.parametrize("shape,k", [((6, 6, 1), 3), ((5, 7, 3), 5)])
def test_ls_matches_oracle(shape, k):
    train, x = _data(12, shape)
    den = L.make_ls(train=train, patch_size=k, chunk_size=CS)
    np.testing.assert_allclose(np.asarray(den(x, AB)), oracle_ls(train, x, AB, k), atol=2e-5)


@pytest.mark.parametrize(
    "dictionary,shape,k",
    [("wrapped", (6, 6, 1), 3), ("valid", (6, 7, 3), 3), ("wrapped", (5, 5, 1), 5)],
)
def test_els_matches_oracle(dictionary, shape, k):
    train, x = _data(12, shape)
    den = L.make_els(train=train, patch_size=k, dictionary=dictionary, chunk_size=CS)
    np.testing.assert_allclose(
        np.asarray(den(x, AB)), oracle_els(train, x, AB, k, dictionary), atol=2e-5
    )


@pytest.mark.parametrize("shape,k", [((6, 6, 1), 3), ((8, 8, 1), 5), ((7, 6, 3), 3)])
def test_bbels_matches_oracle_per_pixel_class(shape, k):
    train, x = _data(12, shape)
    den = L.make_bbels(train=train, patch_size=k, chunk_size=CS)
    got = np.asarray(den(x, AB))
    want = oracle_bbels(train, x, AB, k)
    cls = L.bbels_classes(shape[0], shape[1], k)
    for c, label in enumerate(["interior", "edge", "corner"]):
        assert (cls == c).any(), label
        np.testing.assert_allclose(
            got[:, cls == c], want[:, cls == c], atol=2e-5, err_msg=f"{label} pixels"
        )
    # the three rules really differ from LS and from ELS on this data
    ls = oracle_ls(train, x, AB, k)
    assert np.abs(want[:, cls == 0] - ls[:, cls == 0]).max() > 1e-2
    assert np.abs(want[:, cls == 1] - ls[:, cls == 1]).max() > 1e-2
    np.testing.assert_allclose(want[:, cls == 2], ls[:, cls == 2], atol=1e-12)


def test_ls_window_covering_image_equals_optimal():
    train, x = _data(12, (5, 5, 1), seed=3)
    opt = np.asarray(make_optimal(train=train)(x, AB))
    ls = np.asarray(L.make_ls(train=train, patch_size=9)(x, AB))  # 2H - 1
    np.testing.assert_allclose(ls, opt, atol=2e-5)
    small = np.asarray(L.make_ls(train=train, patch_size=3)(x, AB))
    assert np.abs(small - opt).max() > 1e-2


def test_bbels_k_at_least_h_equals_ls():
    train, x = _data(12, (5, 5, 1), seed=4)
    for k in (5, 7):  # k == H goes through the interior/edge/corner rule; k > H falls back
        ls = np.asarray(L.make_ls(train=train, patch_size=k)(x, AB))
        bb = np.asarray(L.make_bbels(train=train, patch_size=k)(x, AB))
        np.testing.assert_allclose(bb, ls, atol=2e-5)


def test_els_commutes_with_circular_shifts_ls_does_not():
    train, x = _data(**STD)
    shift = (2, -1)
    roll = lambda a: np.roll(a, shift, axis=(1, 2))
    for dictionary in ("wrapped", "valid"):
        den = L.make_els(train=train, patch_size=3, dictionary=dictionary, chunk_size=CS)
        np.testing.assert_allclose(
            np.asarray(den(roll(x), AB)), roll(np.asarray(den(x, AB))), atol=2e-5
        )
    ls = L.make_ls(train=train, patch_size=3, chunk_size=CS)
    assert np.abs(np.asarray(ls(roll(x), AB)) - roll(np.asarray(ls(x, AB)))).max() > 1e-2


@pytest.mark.parametrize("method", ["ls", "els", "bbels"])
def test_chunk_size_independence(method):
    train, x = _data(**STD)
    make = getattr(L, "make_" + method)
    outs = [np.asarray(make(train=train, patch_size=3, chunk_size=cs)(x, AB)) for cs in (CS, 5)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)


def test_one_compile_per_distinct_k_along_a_schedule():
    train, x = _data(7, (6, 5, 1), seed=7)  # a shape no other test compiles
    abs_grid = (0.2, 0.4, 0.6, 0.8, 0.95)
    sched = ps.SizeSchedule((7, 5, 5, 3, 3), abs_grid, "ab", "test")
    den = L.make_ls(train=train, patch_size=sched)
    before = {k: ps.trace_count("ls", k) for k in (3, 5, 7)}
    for _ in range(2):
        for ab in abs_grid + (0.21, 0.79):
            den(x, ab)
    den.with_patch_size(5)(x, 0.5)  # another schedule, same k: shares the compiled program
    after = {k: ps.trace_count("ls", k) for k in (3, 5, 7)}
    assert {k: after[k] - before[k] for k in after} == {3: 1, 5: 1, 7: 1}
    assert [den.size_at(a) for a in abs_grid] == [7, 5, 5, 3, 3]


@pytest.mark.parametrize("method", ["ls", "els", "bbels"])
def test_samplers_switch_matches_eager_choice(method):
    train, _ = _data(**STD)
    # ab of the 3 DDIM steps below: ~0.19, 0.66, 0.90 -> k = 5, 3, 3 by nearest ab
    sched = ps.SizeSchedule((5, 3, 3), (0.2, 0.7, 0.99), "ab")
    den = getattr(L, "make_" + method)(train=train, patch_size=sched, chunk_size=CS)
    x_T = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    res = sampling.ddim(den, x_T, num_steps=3, timesteps=[400, 200, 100])
    assert [den.size_at(a) for a in res.abs] == [5, 3, 3]
    for s in range(len(res.abs)):
        np.testing.assert_allclose(
            np.asarray(res.x0_hats[s]), np.asarray(den(res.xts[s], res.abs[s])), atol=1e-4
        )
    if method != "ls":
        return
    sig = np.array([10.0, 2.0, 0.5, 0.0])
    res = sampling.edm(den, 10.0 * x_T, sig)
    assert np.all(np.isfinite(np.asarray(res.images)))
    for s in range(3):
        np.testing.assert_allclose(
            np.asarray(res.x0_hats[s]), np.asarray(den(res.xts[s], res.abs[s])), atol=1e-4
        )


def test_published_schedules_and_index_convention():
    assert len(ps.PUBLISHED_SCHEDULES) == 10
    assert all(len(v) == 20 and all(k % 2 for k in v) for v in ps.PUBLISHED_SCHEDULES.values())
    use = ps.SizeSchedule.published("fashionmnist_unet_zeros_cond")
    cal = ps.SizeSchedule.published("fashionmnist_unet_zeros_cond", convention="calibration")
    ab_half = float(schedules.cosine_legacy_ab(0.5))
    assert use.index(ab_half) == 10 and use.size(ab_half) == 11
    assert cal.index(ab_half) == 9 and cal.size(ab_half) == 11
    assert use.index(float(schedules.cosine_legacy_ab(0.95))) == 19
    assert use.size(0.9999) == 3 and use.size(1e-4) == 25
    train, _ = _data(3, (28, 28, 1))
    den = L.make_ls(train=train, patch_size="mnist_unet_zeros")
    assert den.size_at(float(schedules.cosine_legacy_ab(0.95))) == 27


def test_schedule_file_roundtrip(tmp_path):
    train, x = _data(6, (5, 5, 1), seed=9)
    path = str(tmp_path / "sched.json")
    ps.SizeSchedule((5, 3), (0.3, 0.9), "ab", "mine").to_json(path, note="x")
    assert json.load(open(path))["note"] == "x"
    den = L.make_ls(train=train, patch_size="file:" + path)
    assert den.size_at(0.25) == 5 and den.size_at(0.8) == 3
    np.testing.assert_allclose(
        np.asarray(den(x, 0.25)),
        np.asarray(L.make_ls(train=train, patch_size=5)(x, 0.25)),
        atol=1e-6,
    )


def test_bad_inputs_raise_clear_errors(tmp_path):
    train, x = _data(4, (5, 5, 1))
    with pytest.raises(ValueError, match="odd"):
        L.make_ls(train=train, patch_size=4)
    with pytest.raises(ValueError, match="too large"):
        L.make_ls(train=train, patch_size=11)  # > 2H - 1 = 9
    with pytest.raises(ValueError, match="too large"):
        L.make_els(train=train, patch_size=7, dictionary="valid")
    with pytest.raises(ValueError, match="20"):
        L.make_ls(train=train, patch_size=[3, 5, 7])
    with pytest.raises(ValueError, match="unknown"):
        L.make_ls(train=train, patch_size="no_such_schedule")
    with pytest.raises(FileNotFoundError):
        L.make_ls(train=train, patch_size="file:" + str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="dictionary"):
        L.make_els(train=train, dictionary="reflect")
    with pytest.raises(ValueError, match="too large"):  # a published schedule on tiny images
        L.make_ls(train=train, patch_size="mnist_unet_zeros")
    with pytest.raises(ValueError, match="sizes but a grid"):
        ps.SizeSchedule((3, 5), (0.5,))
    den = L.make_ls(train=train, patch_size=lambda ab: 4)
    with pytest.raises(ValueError, match="odd"):
        den(x, 0.5)
    den = L.make_ls(train=train, patch_size=lambda ab: 3 if ab > 0.5 else 5)
    assert den.size_at(0.7) == 3
    with pytest.raises(ValueError, match="from_callable"):
        jax.jit(lambda a: den(x, a))(0.7)
    with pytest.raises(ValueError, match="image shape"):
        den(x[:, :4], 0.5)


SHARD_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
assert len(jax.devices()) == 8, jax.devices()
from locality import streaming
from locality.denoisers import local_score as L, pspc, scfdm
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (21, 6, 6, 1)).astype(np.float32)
xt = rng.normal(size=(2, 6, 6, 1)).astype(np.float32)
mesh = streaming.data_mesh()
for make, kw in [(L.make_els, dict(patch_size=3)), (L.make_bbels, dict(patch_size=3)),
                 (pspc.make_pspc_square, dict(patch_size=3)),
                 (scfdm.make_scfdm, dict(smoothing="train", num_samples=2))]:
    one = make(train=x, chunk_size=2, **kw)
    many = make(train=x, chunk_size=2, mesh=mesh, **kw)
    d = float(np.abs(np.asarray(one(xt, 0.6)) - np.asarray(many(xt, 0.6))).max())
    assert d <= 1e-5, (make.__name__, kw, d)
print("OK")
"""


def test_sharded_over_eight_devices_equals_one_device():
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
