"""The trained-network wrapper: ab -> t mapping, eps -> x0 conversion, jit/vmap/no-retrace,
loading from an exported checkpoint, and the boundary checks of its queries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locality import schedules
from locality.checkpoints import CheckpointError, export_params
from locality.denoisers.network import make_network, timestep_from_ab
from locality.denoisers.registry import make, names
from locality.nets import build_model, init_params

MODEL = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)


def _unit_gain(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (
            p * 1e5
            if any(getattr(k, "key", "") in ("tail", "Conv3x3_1", "proj_out") for k in path)
            and p.ndim > 1
            else p
        ),
        params,
    )


@pytest.fixture(scope="module")
def net():
    model = build_model(MODEL)
    return model, _unit_gain(init_params(model, (8, 8, 1), seed=1))


def test_timestep_from_ab_is_exact_on_the_schedule():
    sched = schedules.ddpm_linear()
    ab = sched.alphas_cumprod
    t = np.asarray(timestep_from_ab(jnp.asarray(ab), ab))
    np.testing.assert_array_equal(t, np.arange(1000, dtype=np.float32))
    mid = 0.5 * (ab[100] + ab[101])
    assert float(timestep_from_ab(mid, ab)) == pytest.approx(100.5, abs=1e-3)
    assert float(timestep_from_ab(1.0, ab)) == 0.0  # clamped above ab_0
    assert float(timestep_from_ab(0.0, ab)) == 999.0  # clamped below ab_999


def test_wrapper_matches_hand_written_conversion(net):
    model, params = net
    assert "network" in names()
    den = make("network", model=model, params=params)
    ab_tab = schedules.ddpm_linear().alphas_cumprod
    x = np.random.RandomState(0).randn(3, 8, 8, 1).astype(np.float32)
    for t in (0, 250, 999):
        ab = ab_tab[t]
        eps = np.asarray(
            model.apply({"params": params}, jnp.asarray(x), jnp.full((3,), float(t)), train=False),
            np.float64,
        )
        assert np.std(eps) > 0.1  # a non-trivial prediction
        ref = (x.astype(np.float64) - np.sqrt(1.0 - ab) * eps) / np.sqrt(ab)
        np.testing.assert_allclose(np.asarray(den(x, ab)), ref, rtol=1e-4, atol=1e-4)


def test_jit_vmap_and_no_retrace(net):
    model, params = net
    den = make_network(model=MODEL, params={"params": params})  # dict config + wrapped params
    traces = []

    @jax.jit
    def f(x, ab):
        traces.append(1)
        return den(x, ab)

    x = jnp.asarray(np.random.RandomState(1).randn(2, 8, 8, 1), jnp.float32)
    a = f(x, 0.5)
    b = f(x, 0.3)
    assert len(traces) == 1 and not np.allclose(a, b)
    # vmap over (image, ab) pairs equals one call per pair.
    abs_ = jnp.asarray([0.9, 0.2])
    v = jax.vmap(lambda xi, ai: den(xi[None], ai)[0])(x, abs_)
    for i in range(2):
        np.testing.assert_allclose(v[i], den(x[i : i + 1], abs_[i])[0], rtol=1e-5, atol=1e-5)


def test_load_exported_checkpoint(net, tmp_path):
    model, params = net
    meta = {"model": MODEL, "image_shape": [8, 8, 1], "schedule": "ddpm_linear"}
    export_params(tmp_path / "ckpt", meta, params, step=7)
    den = make("network", checkpoint=tmp_path / "ckpt")
    ref = make("network", model=model, params=params)
    x = jnp.asarray(np.random.RandomState(2).randn(2, 8, 8, 1), jnp.float32)
    np.testing.assert_array_equal(den(x, 0.4), ref(x, 0.4))
    with pytest.raises(CheckpointError, match="use_ema=True"):
        make("network", checkpoint=tmp_path / "ckpt", use_ema=False)
    with pytest.raises(CheckpointError, match="step 3 is not saved"):
        make("network", checkpoint=tmp_path / "ckpt", step=3)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        make("network", checkpoint=tmp_path / "nothing")
    with pytest.raises(ValueError, match="exactly one"):
        make("network")


def test_queries_are_checked_like_every_denoiser(net, tmp_path):
    """check_query's rules (docs/architecture.md, "Denoiser"): the image shape from the
    checkpoint or ``shape=``, rank, dtype, finite values, ``ab`` in (0, 1), empty batches."""
    model, params = net
    meta = {"model": MODEL, "image_shape": [8, 8, 1], "schedule": "ddpm_linear"}
    export_params(tmp_path / "ckpt", meta, params, step=7)
    loaded = make("network", checkpoint=tmp_path / "ckpt")
    given = make("network", model=model, params=params, shape=(8, 8, 1))
    free = make("network", model=model, params=params)
    assert loaded.shape == given.shape == (8, 8, 1) and free.shape is None
    x = np.random.RandomState(3).randn(2, 8, 8, 1)  # float64
    for den in (loaded, given):
        with pytest.raises(ValueError, match=r"image shape \(16, 8, 1\)"):
            den(np.zeros((2, 16, 8, 1), np.float32), 0.5)
    assert free(np.zeros((1, 16, 8, 1), np.float32), 0.5).shape == (1, 16, 8, 1)  # no H, W, C
    for den in (loaded, given, free):
        with pytest.raises(ValueError, match="rank 4"):
            den(x[0], 0.5)
        with pytest.raises(TypeError, match="int32"):
            den(x.astype(np.int32), 0.5)
        with pytest.raises(ValueError, match="NaN"):
            den(np.full_like(x, np.nan), 0.5)
        for ab in (0.0, 1.0, -0.1, 1.5):
            with pytest.raises(ValueError, match="outside"):
                den(x, ab)
            with pytest.raises(ValueError, match="outside"):  # before the empty-batch rule
                den(x[:0], ab)
        with pytest.raises(ValueError, match="scalar"):
            den(x, np.array([0.5, 0.6]))
        out = den(x, 0.5)  # float64 queries are cast to float32 first
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out, den(x.astype(np.float32), 0.5))
        empty = den(np.zeros((0, 8, 8, 1), np.float32), 0.5)
        assert empty.shape == (0, 8, 8, 1) and empty.dtype == jnp.float32
    with pytest.raises(ValueError, match="trained on images of shape"):
        make("network", checkpoint=tmp_path / "ckpt", shape=(16, 16, 1))
    for bad in ((8, 8), (8, 0, 1), "881", (8.5, 8, 1)):
        with pytest.raises(ValueError, match="three positive ints"):
            make("network", model=model, params=params, shape=bad)
