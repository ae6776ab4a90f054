"""The comparison protocol of experiments/compare.py (docs/algorithms.md §10): the high-pass r2
against a float64 scipy oracle, the common-subset block, calibrated peer rows and their
content-keyed cache, the SCFDM sweep and its scale picked on probe trajectories."""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest
from scipy import ndimage

from configs import compare as compare_cfg
from experiments import common, compare
from locality import comparison, data, denoisers, metrics, sampling, schedules
from locality import comparison_options as options
from locality.denoisers import calibration as C
from locality.denoisers import local_score as L
from locality.denoisers import patch_schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "fashion_mnist_unet_cpu")  # a 28 px network


# ----------------------------------------------------------------------------------------------
# high-pass r2


def _highpass_np(x, sigma):
    x = np.asarray(x, np.float64)
    return x - ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="reflect", truncate=4.0)


def _r2_np(x, y):
    x, y = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (x, y))
    var = y.var(axis=1, ddof=1)
    var = np.where(var == 0, 1.0, var)
    return 1.0 - ((x - y) ** 2).sum(1) / (x.shape[1] * var)


@pytest.mark.parametrize(
    "shape,sigma",
    [((2, 5, 4, 2), 1.0), ((1, 3, 3, 1), 1.0), ((2, 6, 7, 1), 0.6), ((1, 2, 9, 3), 2.3)],
)
def test_highpass_and_hp_r2_match_scipy(shape, sigma):
    """Radius 4 sigma exceeds the image side in most cases: the reflection repeats as scipy's."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(metrics.highpass(x, sigma), _highpass_np(x, sigma), atol=1e-6)
    jitted = jax.jit(functools.partial(metrics.highpass, sigma=sigma))
    np.testing.assert_allclose(jitted(x), _highpass_np(x, sigma), atol=1e-6)
    want = _r2_np(_highpass_np(x, sigma), _highpass_np(y, sigma))
    np.testing.assert_allclose(metrics.hp_r2(x, y, sigma, reduce="none"), want, rtol=1e-5)
    assert float(metrics.hp_r2(x, y, sigma)) == pytest.approx(want.mean(), rel=1e-5)
    assert float(metrics.hp_r2(x, y, sigma, reduce="median")) == pytest.approx(
        np.median(want), rel=1e-5
    )


def test_hp_r2_does_not_reward_blur():
    """A smooth image plus fine detail as the reference, its blur as the method: r2 stays high
    (the blur keeps the smooth part) while the high-pass r2 drops to about 0."""
    rng = np.random.default_rng(1)
    s = ndimage.gaussian_filter(rng.normal(size=(3, 16, 16, 1)), (0, 3, 3, 0), mode="reflect")
    y = (s / s.std() + 0.3 * rng.normal(size=s.shape)).astype(np.float32)
    blurred = ndimage.gaussian_filter(y, (0, 1.5, 1.5, 0), mode="reflect").astype(np.float32)
    assert float(metrics.r2(blurred, y)) > 0.8
    assert float(metrics.hp_r2(blurred, y)) < 0.2
    assert float(metrics.hp_r2(y, y)) == pytest.approx(1.0)


def test_hp_r2_bad_input():
    x = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="sigma"):
        metrics.hp_r2(x, x, sigma=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.hp_r2(x, x[:, :3])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        metrics.hp_r2(x[0], x[0])
    with pytest.raises(ValueError, match="reduce"):
        metrics.hp_r2(x, x, reduce="max")


# ----------------------------------------------------------------------------------------------
# the calibration cache


def _train(n=12, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 28, 28, 1)).astype(np.float32)


def _probes(b=2):
    return jax.random.normal(jax.random.key(5), (b, 28, 28, 1))


def test_calibration_cache_hits_and_misses(tmp_path, monkeypatch):
    net = denoisers.make("network", checkpoint=CKPT)
    machine = L.make_ls(train=_train(), patch_size=3)
    kw = dict(cache_dir=str(tmp_path), timesteps=[600, 200], name="ls_test")
    first = C.cached_calibrate(net, machine, (3, 5), _probes(), **kw)
    assert not first.hit and os.path.exists(first.path)
    direct = C.calibrate(net, machine, (3, 5), _probes(), timesteps=[600, 200])
    np.testing.assert_array_equal(first.calibration.sizes, direct.sizes)

    def no_recompute(*a, **k):
        raise AssertionError("the cached calibration was recomputed")

    monkeypatch.setattr(C, "calibrate", no_recompute)
    # the same content, objects built again (network reloaded, machine rebuilt): a hit
    again = C.cached_calibrate(
        denoisers.make("network", checkpoint=CKPT),
        L.make_ls(train=_train(), patch_size=7),  # the machine's own size is not part of the key
        (3, 5),
        _probes(),
        **kw,
    )
    assert again.hit and again.path == first.path and again.key == first.key
    for f in ("sizes", "abs", "timesteps", "per_seed"):
        np.testing.assert_array_equal(getattr(again.calibration, f), getattr(first.calibration, f))
    np.testing.assert_array_equal(again.calibration.scores, first.calibration.scores)
    assert again.calibration.candidates == (3, 5)
    # different network parameters: a miss (recomputes), with only the reference hash changed
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(C, "calibrate", lambda *a, **k: calls.append(1) or direct)
    leaves, treedef = jax.tree_util.tree_flatten(net.params)
    leaves[0] = leaves[0] + 1e-3
    net2 = net.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))
    changed = C.cached_calibrate(net2, machine, (3, 5), _probes(), **kw)
    assert not changed.hit and calls == [1] and changed.path != first.path
    assert changed.key["reference"] != first.key["reference"]
    assert changed.key["machine"] == first.key["machine"]
    assert changed.key["settings"] == first.key["settings"]
    # another training image or other settings: misses too
    other_train = _train()
    other_train[3, 4, 5, 0] += 0.5
    m2 = C.cached_calibrate(net, L.make_ls(train=other_train), (3, 5), _probes(), **kw)
    assert not m2.hit and m2.key["machine"] != first.key["machine"]
    m3 = C.cached_calibrate(net, machine, (3, 5, 7), _probes(), **kw)
    assert not m3.hit and m3.key["settings"] != first.key["settings"]
    assert len(calls) == 3


def test_calibration_cache_file_for_other_content_is_an_error(tmp_path):
    train = _train(6)
    ref = L.make_ls(train=train, patch_size=5)
    machine = L.make_ls(train=train)
    kw = dict(cache_dir=str(tmp_path), timesteps=[500], name="x")
    res = C.cached_calibrate(ref, machine, (3, 5), _probes(1), **kw)
    d = json.load(open(res.path))
    d["cache_key"] = "0" * 64
    with open(res.path, "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match="delete it"):
        C.cached_calibrate(ref, machine, (3, 5), _probes(1), **kw)
    with pytest.raises(ValueError, match="cache directory"):
        C.cached_calibrate(ref, machine, (3, 5), _probes(1), cache_dir="", timesteps=[500])


# ----------------------------------------------------------------------------------------------
# the entry point


@pytest.fixture
def tiny_data(monkeypatch, tmp_path):
    x = compare.synthetic_images(40)

    def fake_load(name, split="train", *, resolution=None, limit=None, **kw):
        return x[:limit] if limit else x

    monkeypatch.setattr(data, "load", fake_load)
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "cache"))
    return x


def _cfg(methods):
    cfg = compare_cfg.get_config("fashion_mnist")
    cfg.checkpoint = CKPT
    cfg.methods = methods
    cfg.num_samples = 2
    cfg.batch_size = 2
    cfg.num_steps = 2
    return cfg


def test_common_subset_block(tiny_data, tmp_path):
    cfg = _cfg("wiener,els,linear")
    cfg.method_kwargs.els.limit = 5
    cfg.method_kwargs.linear.weights = str(tmp_path / "missing.npz")
    cfg.common_subset = 6
    cfg.seed = 3
    compare.run(cfg, str(tmp_path / "w"))
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    sub = m["subset"]
    assert sub["size"] == 6 and sub["seed"] == 3
    assert set(sub["methods"]) == set(m["methods"]) == {"wiener", "els"}
    assert {r["train_size"] for r in sub["methods"].values()} == {6}
    assert m["methods"]["wiener"]["train_size"] == 40 and m["methods"]["els"]["train_size"] == 5
    # oracle: the Wiener filter of the subset's own statistics, sampled from the run's noise
    from locality import schedules, stats

    common_tr = common.subset(tiny_data, 6, 3)
    x_T = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
    net = denoisers.make("network", checkpoint=CKPT)
    wien = denoisers.make("wiener", stats=stats.gaussian_stats(common_tr))
    sched = schedules.ddpm_linear()
    a = np.asarray(sampling.ddim(wien, x_T, sched, 2).x0_hats)[-1]
    b = np.asarray(sampling.ddim(net, x_T, sched, 2).x0_hats)[-1]
    w = sub["methods"]["wiener"]
    np.testing.assert_allclose(w["final_trajectory_r2_per_sample"], _r2_np(a, b), atol=2e-4)
    hp = _r2_np(_highpass_np(a, 1.0), _highpass_np(b, 1.0))
    np.testing.assert_allclose(w["final_trajectory_hp_r2_per_sample"], hp, rtol=1e-3, atol=1e-3)
    assert w["final_trajectory_hp_r2_mean"] == pytest.approx(hp.mean(), rel=1e-3, abs=1e-3)
    # the main-table hp r2 keys and the second table
    r = m["methods"]["els"]
    assert len(r["trajectory"]["hp_r2"]) == 2 and len(r["trajectory_hp_r2_per_step_se"]) == 2
    assert r["final_trajectory_hp_r2_median"] == pytest.approx(
        np.median(r["final_trajectory_hp_r2_per_sample"])
    )
    assert "linear" in m["skipped"] and m["hp_sigma"] == 1.0
    table = (tmp_path / "w" / "table.md").read_text()
    assert "same 6 training images" in table and "| els | 6 |" in table and "| els | 5 |" in table
    assert "high-pass r2" in table
    assert (tmp_path / "w" / "table_subset.csv").exists()
    assert (tmp_path / "w" / "hp_r2_vs_t.png").exists()


def test_calibrated_rows_and_cache_reuse(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg("ls,els,scfdm")
    cfg.method_kwargs.els.limit = 4
    cfg.method_kwargs.scfdm.num_samples = 2
    cfg.calibrate_peers = True
    cfg.calibration.num_probes = 1
    cfg.calibration.candidates = (3, 5)
    cfg.scfdm_sigmas = (0.1, 0.5)
    compare.run(cfg, str(tmp_path / "a"))
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(m["methods"]) == {
        "ls",
        "ls_calibrated",
        "els",
        "els_calibrated",
        "scfdm",
        "scfdm_s0.5",
        "scfdm_best",
    }
    cal = m["calibration"]["ls"]
    assert not cal["cache_hit"] and set(cal["used_by"]) == {"ls_calibrated", "els_calibrated"}
    assert cal["train_size"] == 40 and len(cal["sizes"]) == 2
    assert set(cal["sizes"]) <= {3, 5}
    path = os.path.join(str(tmp_path / "a"), "schedule_ls_calibrated.json")
    for label, n in (("ls_calibrated", 40), ("els_calibrated", 4)):
        row = m["methods"][label]
        assert row["kwargs"]["patch_size"] == "file:" + path and row["train_size"] == n
        assert row["calibrated_from"] == "ls"
    sched = patch_schedules.SizeSchedule.from_json(path)
    assert [sched.size(a) for a in cal["abs"]] == cal["sizes"]
    assert m["methods"]["scfdm_s0.5"]["kwargs"]["sigma_s"] == 0.5
    assert m["scfdm_sweep"]["sigmas"] == {"scfdm": 0.1, "scfdm_s0.5": 0.5}
    # the scale picked on probes is a row of its own, the same as the swept row it repeats
    sel = m["scfdm_selection"]
    assert sel["sigmas"] == [0.1, 0.5] and sel["num_probes"] == 1 and len(sel["probe_r2"]) == 2
    assert m["scfdm_sweep"]["selected"] == sel["best_row"] and "scfdm_best" not in m["scfdm_sweep"]
    best = m["methods"]["scfdm_best"]
    assert best["kwargs"]["sigma_s"] == sel["best_sigma"]
    assert best["final_trajectory_r2_per_sample"] == pytest.approx(
        m["methods"][sel["best_row"]]["final_trajectory_r2_per_sample"], abs=1e-6
    )

    # a second run of the same content reads the cache and does not recompute
    def no_recompute(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(C, "calibrate", no_recompute)
    cfg.methods = "ls"
    compare.run(cfg, str(tmp_path / "b"))
    m2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m2["calibration"]["ls"]["cache_hit"]
    assert m2["calibration"]["ls"]["sizes"] == cal["sizes"]
    assert m2["methods"]["ls_calibrated"]["final_trajectory_r2_mean"] == pytest.approx(
        m["methods"]["ls_calibrated"]["final_trajectory_r2_mean"], abs=1e-6
    )


def test_bad_options_fail_before_work(tmp_path):
    cfg = _cfg("wiener")
    for field, value, match in (
        ("common_subset", -1, "common_subset"),
        ("hp_sigma", 0.0, "sigma"),
        ("scfdm_sigmas", (0.1, -0.5), "scfdm_sigmas"),
        ("scfdm_probe_samples", -1, "scfdm_probe_samples"),
    ):
        bad = _cfg("wiener")
        bad[field] = value
        with pytest.raises(ValueError, match=match):
            compare.run(bad, str(tmp_path / field))
        assert not (tmp_path / field).exists()
    cfg.calibrate_peers = True
    cfg.calibration.criterion = "l1"
    with pytest.raises(ValueError, match="criterion"):
        compare.run(cfg, str(tmp_path / "c"))


def test_long_and_smoke_presets():
    long = compare_cfg.get_config("mnist,long")
    assert long.common_subset == 100 == long.method_kwargs.els.limit
    assert long.calibrate_peers and 0.1 in long.scfdm_sigmas and len(long.scfdm_sigmas) > 2
    plain = compare_cfg.get_config("mnist")
    assert plain.common_subset == 0 and not plain.calibrate_peers and plain.scfdm_sigmas == ()
    smoke = compare_cfg.get_config("smoke")
    assert smoke.dataset == "synthetic" and smoke.common_subset and smoke.calibrate_peers


def test_scfdm_scale_picked_on_probes_not_on_evaluation_samples():
    """The reference is SCFDM itself at sigma 0.5: the probe r2 of every swept scale equals a
    float64 oracle on probe noise ``fold_in(key(seed), SCFDM_PROBE_TAG)`` (not on the evaluation
    noise, whose r2 differ), 0.5 wins with r2 1, and evaluation samples set to NaN change
    nothing."""
    train = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
    kw = {"num_samples": 2, "sigma_s": 0.05, "seed": 0}
    sigmas = (0.05, 0.5, 2.0)
    proto = comparison.Protocol(
        "synthetic",
        "",
        num_samples=2,
        num_steps=2,
        batch_size=4,
        scfdm_sigmas=sigmas,
        scfdm_probe_samples=3,
    )
    specs = comparison.row_specs("scfdm", {"scfdm": kw}, "", None, sigmas)
    ref_den = denoisers.make("scfdm", train=train, **dict(kw, sigma_s=0.5))
    sched = schedules.ddpm_linear()
    ref = comparison.reference_run(ref_den, (8, 8, 1), proto, sched)
    sel, rows = options.select_scfdm(proto, specs, train, ref)

    def r2_on(x_T):
        want = np.asarray(sampling.ddim(ref_den, x_T, sched, 2).x0_hats)[-1]
        out = []
        for s in sigmas:
            den = denoisers.make("scfdm", train=train, **dict(kw, sigma_s=s))
            out.append(_r2_np(np.asarray(sampling.ddim(den, x_T, sched, 2).x0_hats)[-1], want))
        return np.array([v.mean() for v in out])

    key = jax.random.fold_in(jax.random.key(0), options.SCFDM_PROBE_TAG)
    probe = r2_on(jax.random.normal(key, (3, 8, 8, 1)))
    np.testing.assert_allclose(sel["probe_r2"], probe, atol=1e-5)
    assert sel["sigmas"] == list(sigmas) and sel["num_probes"] == 3
    assert sel["best_sigma"] == sigmas[int(np.argmax(probe))] == 0.5
    assert sel["probe_r2"][1] == pytest.approx(1.0) and max(sel["probe_r2"][::2]) < 0.999
    on_eval = r2_on(jax.random.normal(jax.random.key(0), (3, 8, 8, 1)))
    assert np.abs(on_eval - probe).max() > 1e-3  # the probes are not the evaluation noise
    assert [r[0] for r in rows] == ["scfdm", "scfdm_s0.5", "scfdm_s2", "scfdm_best"]
    assert rows[-1][1] == dict(kw, method="scfdm", sigma_s=0.5)
    blind = dataclasses.replace(ref, x_T=ref.x_T * np.nan, x0=ref.x0 * np.nan)
    assert options.select_scfdm(proto, specs, train, blind)[0] == sel


def test_curves_leave_the_scfdm_sweep_out_once_a_scale_is_chosen(tmp_path, monkeypatch):
    """The figures show the published and the probe-chosen SCFDM scale; the sweep rows (still in
    the tables) stay out, and without a chosen row every row is drawn."""
    from locality import comparison_tables, plotting

    drawn = []
    monkeypatch.setattr(plotting, "save_series", lambda s, path, **kw: drawn.append(s))

    def row(method, y):
        return {"method": method, "trajectory": {"r2": [y, y], "mse": [1.0, 1.0]}}

    results = {
        "wiener": row("wiener", 0.5),
        "scfdm": row("scfdm", 0.1),
        "scfdm_s0.5": row("scfdm", 0.2),
        "scfdm_s1": row("scfdm", 0.3),
        "scfdm_best": row("scfdm", 0.3),
    }
    comparison_tables.plot_curves(results, [900, 0], str(tmp_path), "toy")
    assert [sorted(s["label"] for s in fig) for fig in drawn] == [
        ["scfdm", "scfdm_best", "wiener"]
    ] * 2
    drawn.clear()
    del results["scfdm_best"]
    comparison_tables.plot_curves(results, [900, 0], str(tmp_path), "toy")
    assert sorted(s["label"] for s in drawn[0]) == sorted(results)
