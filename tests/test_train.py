"""Trainer: EMA and lr math, deterministic batches, overfitting, data parallelism, exact resume,
and checkpoint errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locality import schedules
from locality.checkpoints import CheckpointError, export_workdir, load_params
from locality.nets import build_model
from locality.run_logs import heldout_flatness, summary_from_log
from locality.train import (
    BatchSource,
    TrainConfig,
    batch_indices,
    create_train_state,
    diffusion_loss,
    ema_decay_at,
    ema_update,
    learning_rate_schedule,
    make_train_step,
    train,
    training_data,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.1)


def _images(n=32, hw=8, c=1, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, hw, hw, c)).astype(np.float32)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_ema_and_lr_math():
    rng = np.random.RandomState(0)
    ema = {"a": rng.randn(3, 2).astype(np.float32), "b": rng.randn(4).astype(np.float32)}
    new = {"a": rng.randn(3, 2).astype(np.float32), "b": rng.randn(4).astype(np.float32)}
    out = ema_update(ema, new, 0.9)
    for k in ema:
        np.testing.assert_allclose(out[k], 0.9 * ema[k] + 0.1 * new[k], rtol=1e-6)
    # Warmup decay min(d, (1 + s) / (10 + s)).
    for s in (0, 5, 100, 10_000):
        assert float(ema_decay_at(s, 0.999, True)) == pytest.approx(min(0.999, (1 + s) / (10 + s)))
        assert float(ema_decay_at(s, 0.999, False)) == pytest.approx(0.999)
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, num_steps=110, cosine_decay=True, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)  # cosine midpoint
    assert float(lr(110)) == pytest.approx(1e-4, rel=1e-5)
    # A decay starting at step 60: exactly the constant lr before, the cosine after.
    late = learning_rate_schedule(dataclasses.replace(cfg, decay_start=60, num_steps=160))
    const = learning_rate_schedule(dataclasses.replace(cfg, cosine_decay=False))
    steps = np.arange(61)
    assert np.array_equal(np.asarray(late(steps)), np.asarray(const(steps)))
    assert float(late(85)) == pytest.approx(
        1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4))), rel=1e-5
    )
    assert float(late(160)) == pytest.approx(1e-4, rel=1e-5)
    with pytest.raises(ValueError, match="cosine_decay=True"):
        TrainConfig(decay_start=5, warmup_steps=0)
    with pytest.raises(ValueError, match=r"decay_start=110 must lie in \[warmup_steps"):
        dataclasses.replace(cfg, decay_start=110)


def test_batches_are_deterministic_epoch_permutations():
    n, b = 10, 3
    epoch0 = np.concatenate([batch_indices(7, s, n, b) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # 3 full batches, no repeats, last partial dropped
    np.testing.assert_array_equal(batch_indices(7, 4, n, b), batch_indices(7, 4, n, b))
    assert not np.array_equal(batch_indices(7, 3, n, b), batch_indices(7, 0, n, b))  # new epoch
    assert not np.array_equal(batch_indices(8, 0, n, b), batch_indices(7, 0, n, b))
    imgs = _images(10, 4)
    src = BatchSource(imgs, b, seed=7)
    np.testing.assert_array_equal(src(5), imgs[batch_indices(7, 5, n, b)])
    flipped = BatchSource(imgs, b, seed=7, random_flip=True)
    ref = imgs[batch_indices(7, 5, n, b)]
    got = flipped(5)
    is_flip = [np.array_equal(g, r[:, ::-1]) for g, r in zip(got, ref)]
    assert all(f or np.array_equal(g, r) for f, g, r in zip(is_flip, got, ref))
    draws = np.concatenate(
        [
            [
                np.array_equal(g, r[:, ::-1])
                for g, r in zip(flipped(s), imgs[batch_indices(7, s, n, b)])
            ]
            for s in range(30)
        ]
    )
    assert 0.2 < draws.mean() < 0.8  # about half of the images are flipped
    np.testing.assert_array_equal(flipped(5), BatchSource(imgs, b, 7, True)(5))


def test_training_data_holds_out_a_class_balanced_part(monkeypatch):
    """training_data (locality.train_data) on a loaded dataset: with holdout 0.2 it keeps 8 and
    holds out 2 of each class's 10 images (counted here, image by image), labels follow their
    images for a conditional net and are dropped for an unconditional one."""
    from locality import data

    x, y = _images(n=40, hw=4, seed=5), np.arange(40) % 4
    calls = []

    def fake_load(name, split="train", *, resolution=None, limit=None, with_labels=False):
        calls.append((name, split, resolution, limit, with_labels))
        return (x, y) if with_labels else x

    monkeypatch.setattr(data, "load", fake_load)
    cfg = TrainConfig(dataset="mnist", data_limit=40, holdout=0.2, seed=3)
    index = {img.tobytes(): i for i, img in enumerate(x)}
    source = lambda arr: np.array([index[img.tobytes()] for img in arr])

    images, labels, held = training_data(cfg, 0)
    assert calls == [("mnist", "train", None, 40, True)] and labels is None
    kept, out = source(images), source(held)
    assert sorted(kept.tolist() + out.tolist()) == list(range(40))  # a partition of the set
    assert np.bincount(y[out], minlength=4).tolist() == [2, 2, 2, 2]
    images_c, labels_c, held_c = training_data(cfg, 4)
    np.testing.assert_array_equal(labels_c, y[source(images_c)])
    np.testing.assert_array_equal(held_c, held)  # the split depends on the seed only
    with pytest.raises(ValueError, match="holdout"):
        training_data(cfg, 0, images=x)
    with pytest.raises(ValueError, match="num_classes=4"):
        training_data(dataclasses.replace(cfg, holdout=0.0), 4, images=x, labels=y + 1)


def test_train_step_ema_and_overfitting_a_tiny_batch():
    model = build_model({**TINY, "dropout": 0.0})
    cfg = TrainConfig(
        batch_size=4, lr=3e-3, warmup_steps=10, grad_clip=1.0, ema_decay=0.5, ema_warmup=False
    )
    x0 = _images(4, 8, seed=1)
    state = create_train_state(model, cfg, (8, 8, 1))
    ab = jnp.asarray(schedules.ddpm_linear().alphas_cumprod)
    eval_keys = jax.random.split(jax.random.PRNGKey(123), 16)
    eval_loss = jax.jit(
        lambda p: jnp.mean(jax.vmap(lambda k: diffusion_loss(p, model.apply, x0, k, ab))(eval_keys))
    )
    before = float(eval_loss(state.params))
    step = make_train_step(model, cfg)
    key = jax.random.PRNGKey(0)

    state, m = step(state, x0, key)  # lr(0) = 0 during warmup: only the EMA bookkeeping runs
    assert int(state.step) == 1 and float(m["lr"]) == 0.0 and np.isfinite(float(m["loss"]))
    # Second step: EMA = d * ema1 + (1 - d) * params2 (numpy), with d = 0.5.
    ema0 = jax.tree.map(np.asarray, state.ema_params)
    state, m = step(state, x0, key)
    assert int(state.step) == 2
    moved = 0.0
    for e0, p1, e1 in zip(
        jax.tree.leaves(ema0), jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)
    ):
        np.testing.assert_allclose(
            np.asarray(e1), 0.5 * e0 + 0.5 * np.asarray(p1), rtol=1e-5, atol=1e-7
        )
        moved = max(moved, float(np.max(np.abs(np.asarray(p1) - e0))))
    assert moved > 1e-5  # the parameters did change

    for _ in range(248):
        state, _ = step(state, x0, key)
    after = float(eval_loss(state.params))
    assert before > 0.8  # eps-MSE of a near-zero initial prediction is about 1
    assert after < 0.3 * before, (before, after)


def test_data_parallel_step_equals_single_device():
    """One step on 8 simulated CPU devices (batch sharded) equals the 1-device step."""
    script = textwrap.dedent("""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        from locality.nets import build_model
        from locality.train import TrainConfig, create_train_state, make_mesh, make_train_step
        assert len(jax.devices()) == 8, jax.devices()
        model = build_model(dict(arch="unet", ch=8, ch_mult=(1,), num_res_blocks=1,
                                 num_groups=4, dropout=0.1))
        cfg = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=0)
        x = np.random.RandomState(0).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
        out = {}
        for n in (1, 8):
            mesh = make_mesh(jax.devices()[:n])
            state = create_train_state(model, cfg, (8, 8, 1))
            step = make_train_step(model, cfg, mesh)
            for _ in range(2):
                state, m = step(state, x, jax.random.PRNGKey(0))
            assert len(state.params["head"]["Conv_0"]["kernel"].sharding.device_set) == n
            out[n] = (jax.tree.map(np.asarray, state.params), float(m["loss"]))
        (p1, l1), (p8, l8) = out[1], out[8]
        assert abs(l1 - l8) < 1e-5 * abs(l1), (l1, l8)
        err = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p1))
        assert err < 1e-5 * scale, (err, scale)
        print("OK", l1, l8, err)
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Checkpointing: one uninterrupted reference run shared by the tests below.

CFG = TrainConfig(
    batch_size=8,
    num_steps=6,
    lr=1e-3,
    warmup_steps=2,
    checkpoint_every=3,
    keep_checkpoints=2,
    log_every=2,
    num_samples=4,
    sample_steps=2,
    progress=False,
    ema_decay=0.9,
    ema_warmup=True,
    random_flip=True,
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    state, summary = train(TINY, CFG, workdir, images=_images())
    return workdir, state, summary


def test_run_writes_artifacts(reference_run):
    workdir, state, summary = reference_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "metrics.json",
        "loss.png",
        "summary.txt",
        "samples_0000003.png",
        "samples_0000006.png",
        "checkpoints/config.json",
    ):
        assert (workdir / name).exists(), name
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert summary["steps"] == 6 and int(state.step) == 6
    meta = json.loads((workdir / "checkpoints" / "config.json").read_text())
    assert meta["model"]["ch"] == 8 and meta["image_shape"] == [8, 8, 1]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3",
        "6",
    ]
    _, ema, _ = load_params(workdir)
    assert _leaves_equal(ema, state.ema_params)


class _Killed(Exception):
    pass


def test_kill_and_resume_is_bit_identical(reference_run, tmp_path):
    _, ref_state, _ = reference_run

    def kill_at_4(step):
        if step == 4:  # after the step-3 checkpoint, before the step-6 one
            raise _Killed()

    with pytest.raises(_Killed):
        train(TINY, CFG, tmp_path, images=_images(), on_step=kill_at_4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    state, summary = train(TINY, CFG, tmp_path, images=_images())  # fresh manager, resumes
    assert summary["resumed_from"] == 3
    assert _leaves_equal(state.params, ref_state.params)
    assert _leaves_equal(state.ema_params, ref_state.ema_params)
    assert _leaves_equal(state.opt_state, ref_state.opt_state)


def test_time_limit_stops_with_a_checkpoint_and_resumes_bit_identical(reference_run, tmp_path):
    """time_limit_s=0 stops after the first step with a checkpoint there; the rerun continues and
    ends equal to the uninterrupted run; the stopped run equals a run of num_steps=1."""
    _, ref_state, _ = reference_run
    state1, summary1 = train(TINY, CFG, tmp_path / "a", images=_images(), time_limit_s=0.0)
    assert summary1["steps"] == 1 and summary1["stopped_early"] and int(state1.step) == 1
    assert sorted(
        p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["1"]
    assert (tmp_path / "a" / "samples_0000001.png").exists()
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["stopped_early"]
    one, _ = train(TINY, dataclasses.replace(CFG, num_steps=1), tmp_path / "b", images=_images())
    assert _leaves_equal(state1.params, one.params)
    assert _leaves_equal(state1.ema_params, one.ema_params)
    state, summary = train(TINY, CFG, tmp_path / "a", images=_images())
    assert summary["resumed_from"] == 1 and summary["steps"] == 6
    assert not summary["stopped_early"]
    assert _leaves_equal(state.params, ref_state.params)
    assert _leaves_equal(state.ema_params, ref_state.ema_params)
    with pytest.raises(ValueError, match="time_limit_s"):
        train(TINY, CFG, tmp_path / "c", images=_images(), time_limit_s=-1.0)


def _tree_snapshot(path):
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_corrupt_checkpoint_raises_and_keeps_last_good(reference_run, tmp_path):
    ref_dir, ref_state, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    step6 = workdir / "checkpoints" / "6"
    for f in step6.rglob("*"):
        if f.is_file() and f.parent.name == "d":  # truncate the array data files
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    good = _tree_snapshot(workdir / "checkpoints" / "3")
    with pytest.raises(CheckpointError) as err:
        train(TINY, dataclasses.replace(CFG, num_steps=9), workdir, images=_images())
    msg = str(err.value)
    assert str(step6) in msg and "resume from step 3" in msg
    with pytest.raises(CheckpointError, match="corrupt"):
        load_params(workdir, step=6)
    assert _tree_snapshot(workdir / "checkpoints" / "3") == good  # untouched
    # Following the fix in the message works: drop step 6, resume from step 3 exactly.
    shutil.rmtree(step6)
    state, summary = train(TINY, CFG, workdir, images=_images())
    assert summary["resumed_from"] == 3
    assert _leaves_equal(state.params, ref_state.params)


def test_mismatched_config_raises_without_touching_checkpoints(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    before = _tree_snapshot(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match="fresh --workdir") as err:
        train({**TINY, "ch": 16}, CFG, workdir, images=_images())
    assert "config.json" in str(err.value) and "model" in str(err.value)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(TINY, dataclasses.replace(CFG, batch_size=4), workdir, images=_images())
    assert _tree_snapshot(workdir / "checkpoints") == before
    # Weights that do not fit the stored config (edited config.json) -> clear error on load.
    cfg_path = workdir / "checkpoints" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model"]["ch"] = 16
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="other shapes"):
        load_params(workdir)


def test_resumes_a_run_stored_before_a_config_field_existed(reference_run, tmp_path):
    """A stored config without a field that TrainConfig gained later (here ``transform``) means
    that field's default: resuming with the default works, another value is refused."""
    ref_dir, ref_state, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    cfg_path = workdir / "checkpoints" / "config.json"
    meta = json.loads(cfg_path.read_text())
    del meta["train"]["transform"]
    cfg_path.write_text(json.dumps(meta))
    state, summary = train(TINY, dataclasses.replace(CFG, num_steps=7), workdir, images=_images())
    assert summary["resumed_from"] == 6 and int(state.step) == 7
    with pytest.raises(CheckpointError, match="transform"):
        train(
            TINY,
            dataclasses.replace(CFG, num_steps=8, random_flip=False, transform="permute:0"),
            workdir,
            images=_images(),
        )


def test_anneal_appended_to_a_constant_lr_run(reference_run, tmp_path):
    """Resuming the finished 6-step constant-lr run with a cosine decay from step 6 to step 9
    equals an uninterrupted 9-step run with that schedule, and the stored config records it; a
    schedule that would change the lr of a step already taken is refused, naming the fix."""
    ref_dir, _, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    before = _tree_snapshot(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match=r"learning rate of step 3 .*decay_start=6"):
        train(
            TINY,
            dataclasses.replace(CFG, num_steps=9, cosine_decay=True),
            workdir,
            images=_images(),
        )
    with pytest.raises(CheckpointError, match="lr"):
        train(TINY, dataclasses.replace(CFG, lr=2e-3), workdir, images=_images())
    assert _tree_snapshot(workdir / "checkpoints") == before
    anneal = dataclasses.replace(CFG, num_steps=9, cosine_decay=True, decay_start=6)
    state, summary = train(TINY, anneal, workdir, images=_images())
    assert summary["resumed_from"] == 6 and int(state.step) == 9
    stored = json.loads((workdir / "checkpoints" / "config.json").read_text())["train"]
    assert stored["cosine_decay"] and stored["decay_start"] == 6 and stored["num_steps"] == 9
    lrs = {
        r["step"]: r["lr"]
        for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    }
    assert lrs[8] < lrs[6] == pytest.approx(CFG.lr)
    straight, _ = train(TINY, anneal, tmp_path / "straight", images=_images())
    assert _leaves_equal(state.params, straight.params)
    assert _leaves_equal(state.ema_params, straight.ema_params)
    assert export_workdir(workdir, tmp_path / "out") == 9
    exported = json.loads((tmp_path / "out" / "metrics.json").read_text())
    first = max(
        json.loads(l)["wall_s"] for l in (ref_dir / "metrics.jsonl").read_text().splitlines()
    )
    assert exported["wall_s_all_invocations"] == pytest.approx(exported["wall_s"] + first)
    assert load_params(tmp_path / "out")[2]["train"]["decay_start"] == 6
    # Exporting the same step again replaces the weights and keeps other files there.
    (tmp_path / "out" / "extra.png").write_bytes(b"x")
    assert export_workdir(workdir, tmp_path / "out") == 9
    assert _leaves_equal(load_params(tmp_path / "out")[1], state.ema_params)
    assert (tmp_path / "out" / "extra.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.is_file()) == ["9"]


def test_export_workdir_latest_and_earlier_step(reference_run, tmp_path):
    """Exporting the latest step gives the run's final EMA weights; exporting step 3 of the
    6-step run gives the EMA weights of an independent 3-step run (constant lr), and records
    num_steps = 3."""
    ref_dir, ref_state, _ = reference_run
    assert export_workdir(ref_dir, tmp_path / "last") == 6
    _, ema, meta = load_params(tmp_path / "last")
    assert _leaves_equal(ema, ref_state.ema_params) and meta["train"]["num_steps"] == 6
    for name in ("loss.png", "samples_0000006.png", "metrics.json"):
        assert (tmp_path / "last" / name).exists(), name

    assert export_workdir(ref_dir, tmp_path / "s3", step=3) == 3
    three, _ = train(
        TINY, dataclasses.replace(CFG, num_steps=3), tmp_path / "run3", images=_images()
    )
    _, ema3, meta3 = load_params(tmp_path / "s3")
    assert _leaves_equal(ema3, three.ema_params) and meta3["train"]["num_steps"] == 3
    assert (tmp_path / "s3" / "samples_0000003.png").exists()
    # the workdir's metrics.json describes step 6: the export summarises the log up to step 3
    m3 = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    rows = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert m3["steps"] == 3 and m3["from_log"] and m3["final_loss_step"] == 2
    assert m3["final_loss"] == [r["loss"] for r in rows if r["step"] == 2][0]
    assert m3["num_params"] == json.loads((ref_dir / "metrics.json").read_text())["num_params"]
    with pytest.raises(CheckpointError, match="step 5 is not saved"):
        export_workdir(ref_dir, tmp_path / "s5", step=5)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        export_workdir(tmp_path / "empty", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_summary_from_log_adds_wall_time_over_resumes(tmp_path):
    """Two invocations (wall_s restarts), a line cut by a kill, rows after the step ignored."""
    log = tmp_path / "metrics.jsonl"
    rows = [
        (10, 0.5, 1.0),
        (20, 0.4, 2.0),
        (30, 0.3, 3.0),
        (20, 0.4, 0.5),
        (30, 0.3, 1.5),
        (40, 0.2, 2.5),
        (50, 0.1, 3.5),
    ]
    text = "\n".join(json.dumps({"step": a, "loss": b, "wall_s": c}) for a, b, c in rows)
    log.write_text(text + "\n" + '{"step": 60, "lo')  # the last line cut by a kill
    s = summary_from_log(log, 40)
    assert s["final_loss"] == 0.2 and s["final_loss_step"] == 40
    assert s["wall_s"] == 3.0 + 2.5
    assert summary_from_log(log, 25)["final_loss"] == 0.4
    assert np.isnan(summary_from_log(tmp_path / "missing.jsonl", 5)["final_loss"])


def test_heldout_flatness_over_the_last_fifth(tmp_path):
    log = tmp_path / "eval.jsonl"
    rows = [(0, 0.5), (40, 0.2), (79, 0.104), (81, 0.1), (100, 0.1005)]
    log.write_text(
        "\n".join(json.dumps({"step": s, "eps_mse_mean": v}) for s, v in rows) + "\n{cut"
    )
    f = heldout_flatness(log, 100)  # window starts at step 80: the evaluation at 79 opens it
    assert (f["start_step"], f["end_step"]) == (79, 100)
    np.testing.assert_allclose(f["improvement"], (0.104 - 0.1005) / 0.104)
    assert f["improvement"] > 0.01 and not f["flat"]
    g = heldout_flatness(log, 81, fraction=0.5)  # window from 40.5: start 40, end 81
    np.testing.assert_allclose(g["improvement"], 0.5)
    assert heldout_flatness(log, 100, fraction=0.01)["start_step"] == 81  # flat: +0.5 % rise
    assert heldout_flatness(log, 100, fraction=0.01)["flat"]
    assert heldout_flatness(log, 30) is None  # one evaluation in range
    with pytest.raises(ValueError, match="fraction=1.5"):
        heldout_flatness(log, 100, fraction=1.5)


def test_export_steps_and_heldout_eval_leave_the_run_unchanged(reference_run, tmp_path):
    """An export at step 3 holds the EMA weights of the step-3 checkpoint; eval.jsonl holds the
    EMA net's held-out eps-MSE (locality.quality, same noise each time); neither changes the
    trajectory of the reference run."""
    from locality import quality

    _, ref_state, _ = reference_run
    held = _images(n=5, seed=7)
    cfg = dataclasses.replace(CFG, export_steps=(3,), eval_every=4, eval_count=4)
    state, _ = train(TINY, cfg, tmp_path, images=_images(), eval_images=held)
    assert _leaves_equal(state.params, ref_state.params)
    _, exported, meta = load_params(tmp_path / "exports" / "step_3")
    _, at3, _ = load_params(tmp_path, step=3)
    assert _leaves_equal(exported, at3) and meta["train"]["num_steps"] == 3
    rows = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 6] and rows[-1]["n"] == 4
    model = build_model(TINY)
    want = quality.eps_mse(model.apply, state.ema_params, held[:4], seed=cfg.seed).mean(1)
    np.testing.assert_allclose(list(rows[-1]["eps_mse"].values()), want, rtol=1e-6)
    assert list(rows[-1]["eps_mse"]) == [str(t) for t in quality.HELDOUT_TIMESTEPS]
    with pytest.raises(ValueError, match="eval_images"):
        train(TINY, dataclasses.replace(cfg, eval_every=2), tmp_path / "x", images=_images())
    with pytest.raises(ValueError, match="holdout"):
        train(TINY, dataclasses.replace(CFG, holdout=0.1), tmp_path / "y", images=_images())


def test_snapshot_restores_on_a_fresh_workdir_bit_identical(reference_run, tmp_path):
    """A run stopped at step 3, snapshotted (latest step + optimiser state + logs), restored into
    an empty workdir elsewhere and continued to step 6 equals the uninterrupted run."""
    from locality.checkpoints import CheckpointError, restore_workdir, snapshot_workdir

    _, ref_state, _ = reference_run
    first = tmp_path / "first"
    train(TINY, dataclasses.replace(CFG, num_steps=3), first, images=_images())
    assert snapshot_workdir(first, tmp_path / "snap") == 3
    assert snapshot_workdir(first, tmp_path / "snap") == 3  # replaces an earlier snapshot
    snap_steps = [p.name for p in (tmp_path / "snap" / "checkpoints").iterdir()]
    assert sorted(snap_steps) == ["3", "config.json"]
    fresh = tmp_path / "elsewhere" / "w"
    assert restore_workdir(tmp_path / "snap", fresh) == 3
    assert restore_workdir(tmp_path / "snap", fresh) is None  # never overwrites a started run
    state, summary = train(TINY, CFG, fresh, images=_images())
    assert summary["resumed_from"] == 3
    assert _leaves_equal(state.params, ref_state.params)
    assert _leaves_equal(state.opt_state, ref_state.opt_state)
    with pytest.raises(CheckpointError, match="not a snapshot"):
        restore_workdir(tmp_path / "nothing", tmp_path / "w2")
    with pytest.raises(CheckpointError, match="not a training workdir"):
        snapshot_workdir(tmp_path / "nothing", tmp_path / "s2")
