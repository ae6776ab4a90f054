"""Dataset transforms and the data-statistics experiment (experiments/data_stats.py)."""

import json

import numpy as np
import pytest

from configs import data_stats as ds_cfg
from experiments import data_stats
from locality import denoisers, sensitivity, stats
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
        f = data_stats.wiener_fields(st, ab, [(0, 0), (5, 5), (1, 1), (6, 6)])
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
    from experiments.sensitivity import synthetic_images

    x = synthetic_images(64).reshape(64, -1).astype(np.float64)
    lam, u = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    lam, u = np.clip(lam[::-1], 0, None), u[:, ::-1]
    sched = data_stats.schedules.ddpm_linear()
    for t_idx, t in enumerate(cfg.timesteps):
        ab = float(sched.ab(t))
        w = (u * (ab * lam / (ab * lam + 1 - ab))) @ u.T / np.sqrt(ab)
        proj = w @ u
        for k in (1, 4, 16):
            want = np.mean(np.sum(proj[:, :k] ** 2, 1) / np.sum(w**2, 1))
            assert abs(m["energy_all_pixels"][str(k)][t_idx] - want) < 2e-3, (k, ab)
    assert sensitivity.check_pixels(m["pixels"], 8, 8)
