"""Class-conditional nets and classifier-free guidance: the zero-initialised label embedding,
label dropout in the loss, labels that follow their images through the input pipeline, the
guided eps against the hand formula, starting from an unconditional checkpoint, exact resume,
and data parallelism with labelled batches."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locality import schedules
from locality.checkpoints import CheckpointError, load_params, merge_params
from locality.denoisers.registry import make
from locality.nets import build_model, count_params, init_params
from locality.train import (
    BatchSource,
    TrainConfig,
    diffusion_loss,
    learning_rate_schedule,
    make_optimizer,
    train,
)

REPO = Path(__file__).resolve().parents[1]
UNC = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)
COND = dict(UNC, num_classes=3)
DIT_UNC = dict(arch="dit", hidden=16, depth=1, num_heads=2, patch_size=2)
DIT_COND = dict(DIT_UNC, num_classes=3)


def _unit_gain(params):
    """Undo the 1e-5 output gains so that outputs are O(1) and differences visible."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (
            p * 1e5
            if any(getattr(k, "key", "") in ("tail", "Conv3x3_1", "proj_out") for k in path)
            and p.ndim > 1
            else p
        ),
        params,
    )


def _with_random_labels(params, seed=0, scale=1.0):
    """Replace the (zero-initialised) label table by random values."""
    table = params["label_embed"]["embedding"]
    rnd = scale * jax.random.normal(jax.random.PRNGKey(seed), table.shape)
    return {**params, "label_embed": {"embedding": rnd}}


def _randomise_zero_leaves(params, seed=0):
    """Give DiT's zero-initialised (adaLN-Zero) layers random values, so the label matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [
        0.3 * jax.random.normal(k, p.shape) if not np.any(np.asarray(p)) else p
        for k, p in zip(keys, leaves)
    ]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("unc,cond,width", [(UNC, COND, 32), (DIT_UNC, DIT_COND, 16)])
def test_label_embedding_starts_as_the_unconditional_net(unc, cond, width):
    m_u, m_c = build_model(unc), build_model(cond)
    shape = (8, 8, 1)
    p_u = init_params(m_u, shape, seed=3)
    p_c = init_params(m_c, shape, seed=3)
    # one table of (K + 1) rows, the extra row meaning "no label"
    assert count_params(p_c) - count_params(p_u) == (3 + 1) * width
    assert p_c["label_embed"]["embedding"].shape == (4, width)
    assert not np.any(np.asarray(p_c["label_embed"]["embedding"]))
    if cond["arch"] == "dit":
        p_u = _randomise_zero_leaves(p_u)
    else:
        p_u = _unit_gain(p_u)
    merged, new = merge_params(p_c, p_u)
    assert new == ["label_embed/embedding"]
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *shape))
    t = jnp.array([0.0, 10.0, 500.0, 999.0])
    ref = np.asarray(m_u.apply({"params": p_u}, x, t))
    for y in (None, jnp.array([0, 1, 2, 3])):
        out = np.asarray(m_c.apply({"params": merged}, x, t, y=y))
        np.testing.assert_array_equal(out, ref)
    # with a trained (here random) table the label matters, and None means "no label" (row K)
    rnd = _with_random_labels(merged)
    outs = [np.asarray(m_c.apply({"params": rnd}, x, t, y=jnp.full((4,), k))) for k in range(4)]
    assert min(np.abs(outs[0] - outs[1]).max(), np.abs(outs[1] - outs[3]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(m_c.apply({"params": rnd}, x, t)), outs[3])
    with pytest.raises(ValueError, match="unconditional network"):
        m_u.apply({"params": p_u}, x, t, y=jnp.zeros((4,), jnp.int32))


def test_label_dropout_limits_and_rate():
    model = build_model(COND)
    params = _with_random_labels(_unit_gain(init_params(model, (8, 8, 1))))
    ab = jnp.asarray(schedules.ddpm_linear().alphas_cumprod)
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1), minval=-1, maxval=1)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    key = jax.random.PRNGKey(5)
    loss = lambda **kw: float(diffusion_loss(params, model.apply, x0, key, ab, num_classes=3, **kw))
    forced = lambda labels: lambda v, x, t, **kw: model.apply(v, x, t, **{**kw, "y": labels})
    # p = 0: every image keeps its label; p = 1: every image gets "no label" (= y None)
    keep = float(diffusion_loss(params, forced(y), x0, key, ab))
    none = float(diffusion_loss(params, model.apply, x0, key, ab))
    assert keep != pytest.approx(none, rel=1e-4)
    assert loss(y=y, label_dropout=0.0) == pytest.approx(keep, rel=1e-6)
    assert loss(y=y, label_dropout=1.0) == pytest.approx(none, rel=1e-6)
    assert float(diffusion_loss(params, forced(jnp.full((6,), 3)), x0, key, ab)) == pytest.approx(
        none, rel=1e-6
    )

    # the dropped fraction: a spy network records the labels it is called with
    seen = []

    def spy(v, x, t, y=None, **kw):
        seen.append(y)
        return jnp.zeros_like(x)

    n = 20_000
    ys = jnp.arange(n) % 3
    diffusion_loss(
        None, spy, jnp.zeros((n, 1, 1, 1)), key, ab, y=ys, label_dropout=0.3, num_classes=3
    )
    got = np.asarray(seen[0])
    dropped = got == 3
    assert abs(dropped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_array_equal(got[~dropped], np.asarray(ys)[~dropped])


def test_batch_source_labels_follow_their_images():
    n = 50
    images = np.broadcast_to(
        (np.arange(n, dtype=np.float32) / n)[:, None, None, None], (n, 4, 4, 1)
    ).copy()
    images[:, :, 0] = -1.0  # flips move this column, identity stays readable from column 2
    labels = (np.arange(n) * 7) % 5
    src = BatchSource(images, 8, seed=3, random_flip=True, labels=labels)
    for step in (0, 1, 5, 6, 7, 30):
        idx = np.rint(src(step)[:, 0, 2, 0] * n).astype(int)
        assert len(set(idx)) == 8
        np.testing.assert_array_equal(src.labels_at(step), labels[idx])
    with pytest.raises(ValueError, match="shape"):
        BatchSource(images, 8, seed=0, labels=labels[:10])
    with pytest.raises(ValueError, match="without labels"):
        BatchSource(images, 8, seed=0).labels_at(0)


def test_guided_eps_matches_the_hand_formula():
    model = build_model(COND)
    params = _with_random_labels(_unit_gain(init_params(model, (8, 8, 1), seed=2)))
    sched = schedules.ddpm_linear()
    ab = float(sched.alphas_cumprod[300])
    x = np.random.RandomState(0).randn(4, 8, 8, 1).astype(np.float32)
    t = jnp.full((4,), 300.0)
    eps_of = lambda y: np.asarray(
        model.apply({"params": params}, jnp.asarray(x), t, y=jnp.asarray(y)), np.float64
    )
    labels, w = [2, 0, 1, 1], 2.5
    want = (1 + w) * eps_of(labels) - w * eps_of([3, 3, 3, 3])
    den = make("network", model=model, params=params, labels=labels, guidance=w)
    np.testing.assert_allclose(np.asarray(den.eps(jnp.asarray(x), ab)), want, rtol=1e-4, atol=1e-4)
    x0 = (x.astype(np.float64) - np.sqrt(1 - ab) * want) / np.sqrt(ab)
    np.testing.assert_allclose(np.asarray(den(x, ab)), x0, rtol=1e-4, atol=1e-4)
    # w = 0: the conditional eps; "cycle": image i -> class i mod 3; no labels: "no label"
    den0 = make("network", model=model, params=params, labels=labels)
    np.testing.assert_allclose(
        np.asarray(den0.eps(jnp.asarray(x), ab)), eps_of(labels), rtol=1e-5, atol=1e-5
    )
    cyc = make("network", model=model, params=params, labels="cycle", guidance=w)
    want_cyc = (1 + w) * eps_of([0, 1, 2, 0]) - w * eps_of([3, 3, 3, 3])
    np.testing.assert_allclose(
        np.asarray(cyc.eps(jnp.asarray(x), ab)), want_cyc, rtol=1e-4, atol=1e-4
    )
    plain = make("network", model=model, params=params)
    np.testing.assert_allclose(
        np.asarray(plain.eps(jnp.asarray(x), ab)), eps_of([3, 3, 3, 3]), rtol=1e-5, atol=1e-5
    )
    # the denoiser stays a pytree usable under jit with the labels as a leaf
    jitted = jax.jit(lambda d, x: d(x, ab))
    np.testing.assert_allclose(
        np.asarray(jitted(den, x)), np.asarray(den(x, ab)), rtol=1e-5, atol=1e-5
    )

    unc = build_model(UNC)
    p_unc = init_params(unc, (8, 8, 1))
    with pytest.raises(ValueError, match="unconditional"):
        make("network", model=unc, params=p_unc, labels=1)
    with pytest.raises(ValueError, match="needs labels"):
        make("network", model=model, params=params, guidance=1.0)
    with pytest.raises(ValueError, match=r"ints in \[0, 3\)"):
        make("network", model=model, params=params, labels=[0, 3])
    with pytest.raises(ValueError, match="'cycle'"):
        make("network", model=model, params=params, labels="cats")


def test_label_lr_mult_scales_only_the_label_embedding():
    params = init_params(build_model(COND), (8, 8, 1))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    lr = 1e-3
    for mult in (1.0, 30.0):
        cfg = TrainConfig(lr=lr, warmup_steps=0, grad_clip=0.0, label_lr_mult=mult)
        tx = make_optimizer(cfg)
        updates, _ = tx.update(grads, tx.init(params), params)
        # Adam's first step with bias correction is -lr * g / (|g| + eps) = -lr (up to eps)
        for path, u in jax.tree_util.tree_leaves_with_path(updates):
            want = -lr * (mult if path[0].key == "label_embed" else 1.0)
            np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5)
    # the default keeps the plain optimiser state, so runs stored before the option resume
    plain = TrainConfig(lr=lr, warmup_steps=0)
    import optax

    ref = optax.chain(
        optax.clip_by_global_norm(plain.grad_clip),
        optax.adamw(
            learning_rate_schedule(plain), mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
    )
    assert jax.tree.structure(make_optimizer(plain).init(params)) == jax.tree.structure(
        ref.init(params)
    )
    with pytest.raises(ValueError, match="label_lr_mult"):
        TrainConfig(label_lr_mult=0.0)


def _images(n=32, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)


CFG = TrainConfig(
    batch_size=8,
    num_steps=4,
    lr=1e-3,
    warmup_steps=1,
    checkpoint_every=2,
    keep_checkpoints=2,
    log_every=2,
    num_samples=4,
    sample_steps=2,
    progress=False,
    ema_decay=0.9,
    ema_warmup=True,
    sample_guidance=2.0,
    label_dropout=0.2,
)


class _Killed(Exception):
    pass


def test_conditional_run_from_an_unconditional_checkpoint_and_exact_resume(tmp_path):
    images, labels = _images(), np.arange(32) % 3
    unc_dir = tmp_path / "unc"
    # num_classes=0 is stored as before the option existed (old workdirs keep resuming)
    train(dict(UNC, num_classes=0), dataclasses.replace(CFG, num_steps=2), unc_dir, images=images)
    assert "num_classes" not in json.loads((unc_dir / "config.json").read_text())["model"]
    _, p_unc, _ = load_params(unc_dir)

    cfg = dataclasses.replace(CFG, init_from=str(unc_dir))
    ref_state, summary = train(COND, cfg, tmp_path / "ref", images=images, labels=labels)
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert (tmp_path / "ref" / "samples_0000004.png").exists()
    assert np.any(np.asarray(ref_state.params["label_embed"]["embedding"]))  # it learned

    # the conditional run starts from the unconditional EMA weights plus a zero label table: its
    # first step has learning rate 0 (linear warmup), so after it the weights are exactly those
    one = train(
        COND,
        dataclasses.replace(cfg, num_steps=1, num_samples=0),
        tmp_path / "one",
        images=images,
        labels=labels,
    )[0]
    fresh = init_params(build_model(COND), (8, 8, 1), seed=cfg.seed)
    merged, _ = merge_params(fresh, p_unc)
    assert jax.tree.structure(one.params) == jax.tree.structure(merged)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.any(np.asarray(one.params["label_embed"]["embedding"]))

    # kill after step 3 (checkpoint at 2), rerun: bit-identical to the uninterrupted run
    work = tmp_path / "killed"

    def kill(step):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(COND, cfg, work, images=images, labels=labels, on_step=kill)
    state, summary = train(COND, cfg, work, images=images, labels=labels)
    assert summary["resumed_from"] == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the conditional checkpoint samples with labels and guidance through the registry
    den = make("network", checkpoint=tmp_path / "ref", labels="cycle", guidance=3.0)
    assert np.all(np.isfinite(np.asarray(den(_images(4), 0.5))))


def test_conditional_errors(tmp_path):
    images = _images()
    with pytest.raises(ValueError, match="needs the labels"):
        train(COND, CFG, tmp_path / "a", images=images)
    with pytest.raises(ValueError, match="num_classes=3"):
        train(COND, CFG, tmp_path / "b", images=images, labels=np.arange(32) % 4)
    with pytest.raises(ValueError, match="unconditional model"):
        train(UNC, CFG, tmp_path / "c", images=images, labels=np.arange(32) % 3)
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(label_dropout=1.5)
    # init_from a checkpoint of another architecture: clear error, nothing written over it
    other = tmp_path / "other"
    train(
        dict(UNC, ch=4), dataclasses.replace(CFG, num_steps=2, num_samples=0), other, images=images
    )
    before = sorted(str(p) for p in other.rglob("*"))
    with pytest.raises(CheckpointError, match="shape"):
        train(
            COND,
            dataclasses.replace(CFG, init_from=str(other)),
            tmp_path / "d",
            images=images,
            labels=np.arange(32) % 3,
        )
    assert sorted(str(p) for p in other.rglob("*")) == before
    fresh = init_params(build_model(UNC), (8, 8, 1))
    extra = {**fresh, "bogus": {"kernel": jnp.zeros((2, 2))}}
    with pytest.raises(CheckpointError, match="bogus"):
        merge_params(fresh, extra)


def test_parse_labels():
    from locality.generation import parse_labels

    assert parse_labels("") is None and parse_labels(None) is None
    assert parse_labels("cycle") == "cycle"
    assert parse_labels("1") == 1 and parse_labels("0,1,1") == [0, 1, 1]
    with pytest.raises(ValueError, match="comma"):
        parse_labels("dogs")


def test_data_parallel_conditional_step_equals_single_device():
    """One labelled step on 8 simulated CPU devices equals the 1-device step."""
    script = textwrap.dedent("""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        from locality.nets import build_model
        from locality.train import TrainConfig, create_train_state, make_mesh, make_train_step
        model = build_model(dict(arch="unet", ch=8, ch_mult=(1,), num_res_blocks=1,
                                 num_groups=4, dropout=0.0, num_classes=2))
        cfg = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=0, label_dropout=0.5)
        x = np.random.RandomState(0).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
        y = (np.arange(16) % 2).astype(np.int32)
        out = {}
        for n in (1, 8):
            state = create_train_state(model, cfg, (8, 8, 1))
            step = make_train_step(model, cfg, make_mesh(jax.devices()[:n]))
            for _ in range(2):
                state, m = step(state, (x, y), jax.random.PRNGKey(0))
            out[n] = (jax.tree.map(np.asarray, state.params), float(m["loss"]))
        (p1, l1), (p8, l8) = out[1], out[8]
        assert abs(l1 - l8) < 1e-5 * abs(l1), (l1, l8)
        assert np.any(p1["label_embed"]["embedding"])
        err = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p1))
        assert err < 1e-5 * scale, (err, scale)
        try:
            step(state, x, jax.random.PRNGKey(0))
        except ValueError as e:
            assert "(images, labels)" in str(e), e
        else:
            raise AssertionError("an unlabelled batch for a conditional net must fail")
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
