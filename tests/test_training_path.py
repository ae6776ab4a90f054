"""experiments/training_path.py on a tiny case: r2 of each method against networks at two
training lengths, checked against a direct recomputation (same noise, same sampler)."""

import json

import jax
import numpy as np
import pytest

from configs import training_path as tp_cfg
from experiments import training_path
from locality import data, denoisers, metrics, sampling, schedules, stats
from locality.train import TrainConfig, train


def test_training_path_entry_point(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(24, 10, 10, 1))
    x = np.tanh((z[:, :-2, :-2] + z[:, 2:, 2:]) / 2).astype(np.float32)
    labels = np.arange(24) % 2

    def fake_load(name, split="train", *, with_labels=False, **kw):
        return (x, labels) if with_labels else x

    monkeypatch.setattr(data, "load", fake_load)
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "stats"))
    net = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)
    cfg = TrainConfig(
        batch_size=4, num_steps=3, warmup_steps=0, num_samples=0, progress=False, export_steps=(1,)
    )
    train(net, cfg, tmp_path / "run", images=x)
    c = tp_cfg.get_config("mnist,quick")
    c.holdout = 0.0  # all 24 images (the nets above trained on all of them)
    c.networks = f"late={tmp_path / 'run'},early={tmp_path / 'run' / 'exports' / 'step_1'}"
    c.methods = "wiener,optimal"
    c.num_samples, c.batch_size, c.num_steps = 4, 4, 3
    summary = training_path.run(c, str(tmp_path / "w"))
    assert "optimal" in summary
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert list(m["networks"]) == ["early", "late"]  # ordered by epochs
    assert m["networks"]["early"]["epochs"] == pytest.approx(4 / 24)
    assert m["networks"]["late"]["epochs"] == pytest.approx(12 / 24)
    assert (tmp_path / "w" / "r2_vs_epochs.png").exists()

    sched = schedules.ddpm_linear()
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (4, 8, 8, 1)))
    st = stats.gaussian_stats(x)
    wiener = denoisers.make("wiener", stats=st)
    for label, path in (
        ("late", tmp_path / "run"),
        ("early", tmp_path / "run" / "exports" / "step_1"),
    ):
        net_x0 = sampling.ddim(
            denoisers.make("network", checkpoint=str(path)), x_T, sched, 3
        ).x0_hats[-1]
        w_x0 = sampling.ddim(wiener, x_T, sched, 3).x0_hats[-1]
        want = np.asarray(metrics.r2(w_x0, net_x0, reduce="none"))
        got = m["networks"][label]["final_trajectory_r2"]["wiener"]
        np.testing.assert_allclose(got["per_sample"], want, rtol=1e-4, atol=1e-5)
        assert got["se"] == pytest.approx(want.std(ddof=1) / 2, rel=1e-4)
        pair = m["networks"][label]["paired_vs_best"]
        assert len(pair) == 1 and pair[next(iter(pair))]["n"] == 4


def test_compare_with_holdout_uses_the_networks_training_set(tmp_path, monkeypatch):
    """compare.py with holdout > 0 gives every method the class-balanced 90 % the network
    trained on; oracle: the Wiener row equals a Wiener filter fitted on exactly those images."""
    from configs import compare as compare_cfg
    from experiments import compare
    from locality.classify import balanced_split

    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 10, 10, 1))
    x = np.tanh((z[:, :-2, :-2] + z[:, 2:, 2:]) / 2).astype(np.float32)
    labels = np.arange(40) % 4

    def fake_load(name, split="train", *, limit=None, with_labels=False, **kw):
        return (x, labels) if with_labels else x

    monkeypatch.setattr(data, "load", fake_load)
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "stats"))
    net = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)
    train(
        net,
        TrainConfig(batch_size=4, num_steps=1, warmup_steps=0, num_samples=0, progress=False),
        tmp_path / "net",
        images=x,
    )
    c = compare_cfg.get_config("mnist,long")
    assert c.holdout == 0.1
    c.checkpoint, c.methods = str(tmp_path / "net"), "wiener"
    c.num_samples, c.batch_size, c.num_steps = 3, 3, 2
    compare.run(c, str(tmp_path / "w"))
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    keep, held = balanced_split(labels, 0.1, 0)
    assert m["methods"]["wiener"]["train_size"] == len(keep) == 36
    sched = schedules.ddpm_linear()
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (3, 8, 8, 1)))
    net_x0 = sampling.ddim(
        denoisers.make("network", checkpoint=c.checkpoint), x_T, sched, 2
    ).x0_hats[-1]
    w_x0 = sampling.ddim(
        denoisers.make("wiener", stats=stats.gaussian_stats(x[keep])), x_T, sched, 2
    ).x0_hats[-1]
    assert m["methods"]["wiener"]["final_trajectory_r2_mean"] == pytest.approx(
        float(metrics.r2(w_x0, net_x0)), rel=1e-4, abs=1e-5
    )
