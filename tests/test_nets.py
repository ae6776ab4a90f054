"""Networks: shapes, parameter counts against hand counts, init, and the circular-shift symmetry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locality.nets import build_model, count_params, init_params
from locality.nets.unet import timestep_embedding

TINY_UNET = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)


def _undo_output_gain(params):
    """Scale the gain-1e-5 output layers back to unit gain so outputs are O(1) and tests of
    the inner layers are sensitive."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (
            p * 1e5
            if any(getattr(k, "key", "") in ("tail", "Conv3x3_1", "proj_out") for k in path)
            and p.ndim > 1
            else p
        ),
        params,
    )


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train",))


def _hand_count_tiny_unet(c_in=1):
    """Independent count for TINY_UNET (ch 8, mult (1, 2), 1 ResBlock/level, mid attention)."""
    ch, temb = 8, 32
    dense = lambda i, o: i * o + o
    conv3 = lambda i, o: 9 * i * o + o
    gn = lambda c: 2 * c

    def rb(i, o):
        n = gn(i) + conv3(i, o) + dense(temb, o) + gn(o) + conv3(o, o)
        return n + (dense(i, o) if i != o else 0)  # 1x1 shortcut conv == dense

    attn = lambda c: gn(c) + 4 * dense(c, c)
    total = dense(ch, temb) + dense(temb, temb)  # time embedding MLP
    total += conv3(c_in, ch)  # head
    total += rb(8, 8) + conv3(8, 8)  # level 0 + downsample
    total += rb(8, 16)  # level 1
    total += rb(16, 16) + attn(16) + rb(16, 16)  # middle
    total += rb(16 + 16, 16) + rb(16 + 8, 16) + conv3(16, 16)  # up level 1 (+ upsample)
    total += rb(16 + 8, 8) + rb(8 + 8, 8)  # up level 0
    total += gn(8) + conv3(8, c_in)  # tail
    return total


def _hand_count_dit(d, depth, p, c):
    dense = lambda i, o: i * o + o
    total = dense(p * p * c, d) + dense(256, d) + dense(d, d)
    block = dense(d, 6 * d) + 4 * dense(d, d) + dense(d, 4 * d) + dense(4 * d, d)
    return total + depth * block + dense(d, 2 * d) + dense(d, p * p * c)


@pytest.mark.parametrize("c_in", [1, 3])
def test_unet_shapes_and_param_count(c_in):
    model = build_model(TINY_UNET)
    params = init_params(model, (16, 16, c_in))
    assert count_params(params) == _hand_count_tiny_unet(c_in)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, c_in))
    out = _jit_apply(model)({"params": params}, x, jnp.array([0.0, 10.5, 999.0]), train=False)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Output layers start at gain 1e-5: the initial prediction is tiny but not exactly zero.
    assert 0 < float(jnp.max(jnp.abs(out))) < 1e-3


def test_unet_odd_size_and_dropout_rng():
    model = build_model({**TINY_UNET, "ch_mult": (1, 2, 2), "dropout": 0.5})
    params = _undo_output_gain(init_params(model, (14, 14, 1)))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 14, 14, 1))  # 14 -> 7 -> 4 -> 8 (cropped 7)
    t = jnp.array([5.0, 500.0])
    apply = _jit_apply(model)
    a = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    b = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    c = apply({"params": params}, x, t, train=False)
    assert a.shape == x.shape
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2 * float(jnp.std(a))  # dropout active
    np.testing.assert_array_equal(c, apply({"params": params}, x, t, train=False))


def test_dit_shapes_and_param_count():
    model = build_model(dict(arch="dit", hidden=32, depth=2, num_heads=4, patch_size=2))
    params = init_params(model, (8, 8, 3))
    assert count_params(params) == _hand_count_dit(32, 2, 2, 3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    out = _jit_apply(model)({"params": params}, x, jnp.array([1.0, 700.0]), train=False)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, 0.0)  # adaLN-zero: final linear starts at zero
    with pytest.raises(ValueError, match="patch_size"):
        build_model(dict(arch="dit", size="tiny", patch_size=3)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
        )


def test_dit_patchify_roundtrip_and_tokens_are_local():
    """With trained-looking (random) final weights the output patch (i, j) depends on input patch
    (i, j) through the token; check the unpatchify order by perturbing one final-linear unit."""
    model = build_model(dict(arch="dit", hidden=16, depth=1, num_heads=2, patch_size=2))
    params = init_params(model, (4, 4, 1))
    bias = np.zeros(4, np.float32)
    bias[3] = 1.0  # position (1, 1) inside every patch, channel 0
    params["final_linear"]["bias"] = jnp.asarray(bias)
    out = np.asarray(
        _jit_apply(model)({"params": params}, jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)))
    )
    expected = np.zeros((4, 4))
    expected[1::2, 1::2] = 1.0
    np.testing.assert_array_equal(out[0, :, :, 0], expected)


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown unet option"):
        build_model({**TINY_UNET, "chanels": 3})
    with pytest.raises(ValueError, match="arch"):
        build_model({"arch": "resnet"})
    with pytest.raises(ValueError, match="num_groups"):
        m = build_model({**TINY_UNET, "num_groups": 3})
        init_params(m, (8, 8, 1))


def test_timestep_embedding_formula():
    t = jnp.array([0.0, 3.5])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    ref = np.concatenate([np.sin(np.outer([0, 3.5], freqs)), np.cos(np.outer([0, 3.5], freqs))], 1)
    np.testing.assert_allclose(emb, ref, rtol=1e-6, atol=1e-6)


def _shift_errors(padding, shifts):
    model = build_model({**TINY_UNET, "ch_mult": (1, 2, 2), "padding": padding})
    assert model.downsample_factor == 4
    params = _undo_output_gain(init_params(model, (16, 16, 1), seed=3))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
    t = jnp.array([100.0, 600.0])
    f = jax.jit(lambda z: model.apply({"params": params}, z, t, train=False))
    out = f(x)
    assert float(jnp.std(out)) > 0.1
    errs = []
    for shift in shifts:
        out_shift = f(jnp.roll(x, shift, axis=(1, 2)))
        errs.append(
            float(jnp.max(jnp.abs(out_shift - jnp.roll(out, shift, axis=(1, 2)))) / jnp.std(out))
        )
    return errs


def test_circular_padding_is_shift_equivariant():
    # Shifts by multiples of the total downsampling factor (4) commute with the net ...
    e_a, e_b, e_off = _shift_errors("circular", [(4, 8), (-12, 4), (1, 0)])
    assert e_a < 1e-4 and e_b < 1e-4, (e_a, e_b)
    # ... and the symmetry is real: a shift off the stride grid breaks it, so does zero padding.
    assert e_off > 1e-2, e_off
    (e_zero,) = _shift_errors("zeros", [(4, 8)])
    assert e_zero > 1e-2, e_zero
