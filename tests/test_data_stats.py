"""Dataset transforms and the data-statistics experiment (experiments/data_stats.py)."""

import json

import numpy as np
import pytest

from configs import data_stats as ds_cfg
from experiments import common, data_stats
from locality import data_stats as data_stats_lib
from locality import denoisers, schedules, sensitivity, stats
from locality.data import transforms
from locality.train import TrainConfig


def _images(n=200, h=8, w=8, c=1, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, h + 2, w + 2, c))
    return np.tanh((z[:, :-2, :-2] + z[:, 1:-1, 1:-1] + z[:, 2:, 2:]) / 2).astype(np.float32)


def test_link_matches_explicit_loop():
    x = _images(5, 9, 7, 2)
    y = transforms.apply(x, "link:5,4,0,1,3")
    ref = x.copy()
    for n in range(x.shape[0]):
        for i in range(3):
            for j in range(3):
                ref[n, 0 + i, 1 + j] = x[n, 5 + i, 4 + j]
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(x, _images(5, 9, 7, 2))  # input untouched


@pytest.mark.parametrize(
    "spec, match",
    [
        ("link:0,0,1,1,3", "overlap"),
        ("link:0,0,6,6,3", "does not fit"),
        ("link:1,2,3", "5 comma-separated"),
        ("perm:0", "unknown transform"),
        ("permute:x", "1 comma-separated"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        transforms.apply(_images(2), spec)


def test_permute_roundtrip_and_definition():
    x = _images(3, 5, 6, 2)
    y = transforms.permute(x, 7)
    perm = transforms.permutation(7, 5, 6)
    for q in range(30):
        np.testing.assert_array_equal(y[:, q // 6, q % 6], x[:, perm[q] // 6, perm[q] % 6])
    np.testing.assert_array_equal(transforms.unpermute(y, 7), x)
    f = np.abs(x[:, :, :, 0])  # [..., H, W] fields
    np.testing.assert_array_equal(
        transforms.unpermute(transforms.permute(f[..., None], 7)[..., 0], 7), f
    )


def test_wiener_is_permutation_equivariant():
    """W of permuted data == P W P^T (a symmetry of the closed form, docs/algorithms.md §4)."""
    x = _images(300, 6, 6)
    perm = transforms.permutation(3, 6, 6)
    st0 = stats.gaussian_stats(x)
    st1 = stats.gaussian_stats(transforms.permute(x, 3))
    for ab in (0.9, 0.3, 0.02):
        w0 = np.asarray(denoisers.make("wiener", stats=st0).jacobian(ab), np.float64)
        w1 = np.asarray(denoisers.make("wiener", stats=st1).jacobian(ab), np.float64)
        np.testing.assert_allclose(w1, w0[np.ix_(perm, perm)], atol=2e-5 * np.abs(w0).max())


def test_linked_pixels_have_identical_wiener_rows():
    """If x_dst == x_src exactly, the posterior means of both pixels coincide: equal W rows."""
    x = transforms.apply(_images(300, 8, 8), "link:5,5,0,0,2")
    st = stats.gaussian_stats(x)
    for ab in (0.8, 0.1):
        f = data_stats_lib.wiener_fields(st, ab, [(0, 0), (5, 5), (1, 1), (6, 6)])
        np.testing.assert_allclose(f[0], f[1], atol=1e-4 * f.max())
        np.testing.assert_allclose(f[2], f[3], atol=1e-4 * f.max())
        # and the field of a linked pixel puts real mass on its partner
        assert f[0][5, 5] > 0.2 * f[0].max()


def test_train_config_transform_validation():
    assert TrainConfig(transform="permute:0").transform == "permute:0"
    with pytest.raises(ValueError, match="unknown transform"):
        TrainConfig(transform="shuffle")
    with pytest.raises(ValueError, match="random_flip=False"):
        TrainConfig(transform="permute:0", random_flip=True)


def test_data_stats_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "cache"))
    cfg = ds_cfg.get_config("smoke")
    m = data_stats.run(cfg, str(tmp_path / "w"))
    saved = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert saved["parts"] == ["link", "permute", "pcs"]
    lk = m["link"]["linked_mass"]
    # linking moves mass to the partner block (the original data has no such link)
    for p in ("1,1", "6,6"):
        assert min(lk["wiener_linked"][p]) > 0.15 > max(lk["wiener_original"][p])
    pm = m["permute"]
    assert max(pm["wiener_equivariance_max_rel_err"]) < 1e-4
    s = pm["summary"]
    np.testing.assert_allclose(s["wiener_permuted"]["cosine_to_wiener_original"], 1.0, atol=1e-5)
    # Wiener fields are local on the data grid and scattered on the permuted grid
    assert all(
        a < b
        for a, b in zip(
            s["wiener_original"]["radius50_data_grid"],
            s["wiener_original"]["radius50_permuted_grid"],
        )
    )
    pc = m["pcs"]["energy_all_pixels"]
    # energy in the top-k PCs grows with k and with the noise level (later t = more noise)
    assert all(pc["1"][i] <= pc["4"][i] <= pc["16"][i] + 1e-12 for i in range(2))
    assert pc["1"][1] > pc["1"][0]
    for f in ("link_mass.png", "permute_radius.png", "pcs_energy.png", "summary.txt"):
        assert (tmp_path / "w" / f).exists()
    # the report reads the run back: tables for every part, a headline row for the faces part
    from experiments import report

    text, rows = report.build_report(
        str(tmp_path), str(tmp_path / "REPORT.md"), str(tmp_path / "no-checkpoints")
    )
    assert "Injected long-range link" in text and "Permuted pixels" in text
    assert "| wiener_linked | " + " ".join(f"{v:.3f}" for v in lk["wiener_linked"]["1,1"]) in text
    assert [r for r in rows if r[0].startswith("faces: Wiener rows in the top-4 PCs")]


def test_pc_energy_matches_numpy(tmp_path, monkeypatch):
    """Energy of the Wiener rows in the top-k PCs vs a float64 numpy oracle (np.cov + eigh)."""
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "cache"))
    cfg = ds_cfg.get_config("smoke")
    cfg.parts = ("pcs",)
    m = data_stats.run(cfg, str(tmp_path / "w"))["pcs"]
    x = common.synthetic_images(64).reshape(64, -1).astype(np.float64)
    lam, u = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    lam, u = np.clip(lam[::-1], 0, None), u[:, ::-1]
    sched = schedules.ddpm_linear()
    for t_idx, t in enumerate(cfg.timesteps):
        ab = float(sched.ab(t))
        w = (u * (ab * lam / (ab * lam + 1 - ab))) @ u.T / np.sqrt(ab)
        proj = w @ u
        for k in (1, 4, 16):
            want = np.mean(np.sum(proj[:, :k] ** 2, 1) / np.sum(w**2, 1))
            assert abs(m["energy_all_pixels"][str(k)][t_idx] - want) < 2e-3, (k, ab)
    assert sensitivity.check_pixels(m["pixels"], 8, 8)


def test_synthetic_images_match_a_scipy_oracle():
    """Separable 5-tap Gaussian smoothing with zero padding (scipy.ndimage.correlate1d),
    tanh-squashed, float32 [n, size, size, 1]; the seed fixes the draw."""
    import scipy.ndimage

    z = np.random.default_rng(3).normal(size=(4, 6, 6))
    k = np.exp(-0.5 * np.arange(-2, 3) ** 2.0)
    for axis in (1, 2):
        z = scipy.ndimage.correlate1d(z, k, axis=axis, mode="constant")
    got = common.synthetic_images(4, size=6, seed=3)
    assert got.shape == (4, 6, 6, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got[..., 0], np.tanh(0.5 * z), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(common.synthetic_images(4, 6, 0), got)


def test_load_images_sources(tmp_path, monkeypatch):
    """``synthetic`` (seed 0 for train, 1 otherwise), ``npy:PATH`` (first ``limit`` images) and a
    dataset name (passed to locality.data.load with the split, resolution and limit)."""
    import ml_collections

    from locality import data

    cfg = ml_collections.ConfigDict({"dataset": "synthetic", "resolution": None})
    np.testing.assert_array_equal(
        common.load_images(cfg, "train", 5), common.synthetic_images(5, seed=0)
    )
    np.testing.assert_array_equal(
        common.load_images(cfg, "test", None), common.synthetic_images(256, seed=1)
    )
    x = _images(7)
    np.save(tmp_path / "x.npy", x)
    cfg.dataset = f"npy:{tmp_path / 'x.npy'}"
    np.testing.assert_array_equal(common.load_images(cfg, "test", 3), x[:3])
    np.testing.assert_array_equal(common.load_images(cfg, "train", None), x)
    seen = {}

    def fake_load(name, split="train", *, resolution=None, limit=None):
        seen.update(name=name, split=split, resolution=resolution, limit=limit)
        return x

    monkeypatch.setattr(data, "load", fake_load)
    cfg.dataset, cfg.resolution = "mnist", 14
    assert common.load_images(cfg, "test", 4) is x
    assert seen == {"name": "mnist", "split": "test", "resolution": 14, "limit": 4}


def test_load_inputs_prefix_or_seeded_subset(tmp_path):
    import ml_collections

    x = _images(20)
    np.save(tmp_path / "x.npy", x)
    cfg = ml_collections.ConfigDict(
        {
            "dataset": f"npy:{tmp_path / 'x.npy'}",
            "resolution": None,
            "test_split": "test",
            "num_inputs": 4,
            "seed": 5,
        }
    )
    np.testing.assert_array_equal(common.load_inputs(cfg), x[:4])
    cfg.test_random = True
    idx = np.sort(np.random.default_rng(5).choice(20, 4, replace=False))
    np.testing.assert_array_equal(common.load_inputs(cfg), x[idx])


def test_link_geometry_and_block_mass_on_a_hand_case():
    pixels, partner, own = data_stats_lib.link_geometry((5, 4), (0, 1), 3, 9, 8)
    assert pixels == ((1, 2), (6, 5))  # block centres: dst first
    want = np.zeros((9, 8), bool)
    want[5:8, 4:7] = True
    np.testing.assert_array_equal(partner[(1, 2)], want)
    np.testing.assert_array_equal(own[(6, 5)], want)
    assert own[(1, 2)].sum() == 9 and own[(1, 2)][0:3, 1:4].all()
    # a uniform field puts 9/72 of its mass in each block; a field on one pixel all or nothing
    spike = np.zeros((9, 8))
    spike[6, 5] = 2.0
    fields = {"flat": [np.ones((2, 9, 8))], "spike": [np.stack([spike, spike])]}
    mass = data_stats_lib.block_mass(fields, partner, pixels)
    assert mass["flat"] == {"1,2": [9 / 72], "6,5": [9 / 72]}
    assert mass["spike"] == {"1,2": [1.0], "6,5": [0.0]}


def test_moved_pixels_follow_the_permuted_images():
    """Oracle: permute an image holding one bright pixel and find where it went."""
    h, w = 5, 7
    perm = transforms.permutation(4, h, w)
    pixels = ((0, 0), (2, 3), (4, 6))
    moved = data_stats_lib.moved_pixels(perm, pixels, w)
    for p, q in zip(pixels, moved):
        x = np.zeros((1, h, w, 1), np.float32)
        x[0, p[0], p[1], 0] = 1.0
        y = transforms.permute(x, 4)[0, :, :, 0]
        assert np.unravel_index(np.argmax(y), (h, w)) == q
