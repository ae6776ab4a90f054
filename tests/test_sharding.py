"""The training-set axis sharded over 8 simulated CPU devices gives the single-device result."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from locality import denoisers, stats, sampling, streaming
    rng = np.random.default_rng(0)
    z = rng.normal(size=(45, 7, 6, 1))
    x = np.tanh((z[:, :-2, :-2] + z[:, 1:-1, 1:-1] + z[:, 2:, 2:]) / 2).astype(np.float32)
    st = stats.gaussian_stats(x)
    xt = rng.normal(size=(3,) + x.shape[1:]).astype(np.float32)
    mesh = streaming.data_mesh()
    worst = 0.0
    for kw in (dict(softmax="exact"), dict(softmax="exact", path="sparse", tile=2),
               dict(softmax="exact", path="complement", tile=2), dict(softmax="chunk_mean")):
        one = denoisers.make("pca_locality", stats=st, train=x, threshold=0.05, chunk_size=4, **kw)
        many = denoisers.make("pca_locality", stats=st, train=x, threshold=0.05, chunk_size=4,
                              mesh=mesh, **kw)
        assert many.chunked.valid.sharding.num_devices == 8
        for ab in (0.05, 0.5, 0.98):
            d = float(np.abs(np.asarray(one(xt, ab)) - np.asarray(many(xt, ab))).max())
            worst = max(worst, d)
            assert d <= 1e-6, (kw, ab, d)
    o1 = denoisers.make("optimal", train=x, chunk_size=4)
    o8 = denoisers.make("optimal", train=x, chunk_size=4, shard=True)
    d = float(np.abs(np.asarray(o1(xt, 0.3)) - np.asarray(o8(xt, 0.3))).max())
    assert d <= 1e-6, d
    single = denoisers.make("pca_locality", stats=st, train=x, chunk_size=4)
    r1 = sampling.ddim(single, xt, num_steps=4)
    sharded = denoisers.make("pca_locality", stats=st, train=x, chunk_size=4, shard=True)
    r8 = sampling.ddim(sharded, xt, num_steps=4)
    d = float(np.abs(np.asarray(r1.images) - np.asarray(r8.images)).max())
    assert d <= 1e-5, d
    print("OK", worst)
""")


def test_eight_devices_equal_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
