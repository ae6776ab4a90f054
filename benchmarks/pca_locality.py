"""Speed and memory of pca_locality against a straightforward port of the released formulation.

    python benchmarks/pca_locality.py [--out benchmarks/results/pca_locality.json] [--quick]

Full Fashion-MNIST (N = 60,000, n = 784), B = 8 queries (test images + noise) at t = 700, 300, 100:
time per denoiser call (median of repeats), achieved GFLOP/s of the dense-equivalent work, and
the machine's float32 matmul rate measured in the same run. The baseline is the released dense
formulation ported to JAX: per chunk of 512 images the residual tensor
``r = x_b - sqrt(ab) X`` [B, 512, n], ``dist = einsum('bkj,jm->bkm', r^2, M)``, then the softmax
(exactly merged across chunks so that both compute the same posterior mean). Both run the same
float64 mask. Also: max |ours - baseline|, max |ours - float64 oracle| on a subset, a whole 10-step
DDIM run of each, a CIFAR-like case (cats/dogs, n = 3072) and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from locality import data, denoisers, sampling, schedules, stats  # noqa: E402
from locality._io import atomic_write_text  # noqa: E402
from locality.denoisers import pca_locality as pl  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST


def median_time(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def matmul_rate(n=2048, repeats=5):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=HIGHEST))
    t, _ = median_time(lambda: f(a, a), repeats)
    return 2 * n ** 3 / t / 1e9


@jax.jit
def _released_chunk(q, x, m, ab):
    """Released formulation for one chunk: residual tensor + einsum against the mask."""
    r = q[:, None, :] - jnp.sqrt(ab) * x[None]                       # [B, K, n]
    dist = jnp.einsum("bkj,jm->bkm", r * r, m, precision=HIGHEST)    # [B, K, n]
    logits = -dist / (2.0 * (1.0 - ab))
    mx = jnp.max(logits, axis=1)
    w = jnp.exp(logits - mx[:, None])
    return mx, jnp.einsum("bkm,km->bm", w, x, precision=HIGHEST), jnp.sum(w, axis=1)


def released_denoise(x_t, ab, train_flat, mask, chunk=512):
    """Straightforward port: Python loop over chunks of 512, exact log-sum-exp merge."""
    b = x_t.shape[0]
    q = jnp.asarray(x_t.reshape(b, -1))
    m = jnp.asarray(mask, jnp.float32)
    ab = jnp.float32(ab)
    gmax = num = den = None
    for s in range(0, train_flat.shape[0], chunk):
        mx, nu, de = _released_chunk(q, train_flat[s:s + chunk], m, ab)
        if gmax is None:
            gmax, num, den = mx, nu, de
        else:
            new = jnp.maximum(gmax, mx)
            a, c = jnp.exp(gmax - new), jnp.exp(mx - new)
            num, den, gmax = num * a + nu * c, den * a + de * c, new
    return (num / den).reshape(x_t.shape)


def oracle64(x_t, train_flat, mask, ab):
    q = np.asarray(x_t, np.float64).reshape(len(x_t), -1)
    x = np.asarray(train_flat, np.float64)
    m = np.asarray(mask, np.float64)
    out = np.zeros_like(q)
    for b in range(len(q)):
        dist = ((q[b][None] - np.sqrt(ab) * x) ** 2) @ m
        l = -dist / (2 * (1 - ab))
        l -= l.max(0, keepdims=True)
        w = np.exp(l)
        w /= w.sum(0, keepdims=True)
        out[b] = (w * x).sum(0)
    return out.reshape(np.shape(x_t))


def dense_flops(b, n_train, n):
    return 2.0 * (b + 1) * n_train * n * n


def bench_dataset(name, train, test, ts, thr, b, repeats, oracle_n, run_sampling, out,
                  sampling_repeats=2):
    sched = schedules.ddpm_linear()
    st = stats.gaussian_stats(train)
    flat = jnp.asarray(train.reshape(len(train), -1))
    n_train, n = flat.shape
    ours = denoisers.make("pca_locality", stats=st, train=train, threshold=thr)
    dense = denoisers.make("pca_locality", stats=st, train=train, threshold=thr, path="dense")
    key = jax.random.key(0)
    res = {"N": int(n_train), "n": int(n), "B": b, "threshold": thr, "per_t": {}}
    for t in ts:
        ab = float(sched.alphas_cumprod[t])
        x0 = test[:b]
        eps = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape))
        x_t = (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps).astype(np.float32)
        plan = ours.plan(ab)
        den_t = ours.prepare([ab])
        dense_t = dense.prepare([ab])
        t_ours, _ = median_time(lambda: den_t(x_t, ab), repeats)
        t_dense, _ = median_time(lambda: dense_t(x_t, ab), repeats)
        t_base, _ = median_time(lambda: released_denoise(x_t, ab, flat, plan.mask), repeats)
        y_ours = np.asarray(den_t(x_t, ab))
        y_base = np.asarray(released_denoise(x_t, ab, flat, plan.mask))
        sub = slice(0, oracle_n)
        small = denoisers.make("pca_locality", stats=st, train=train[sub], mask=plan.mask)
        y_small = np.asarray(small(x_t[:2], ab))
        y_orc = oracle64(x_t[:2], np.asarray(flat[sub]), plan.mask, ab)
        fl = dense_flops(b, n_train, n)
        res["per_t"][int(t)] = {
            "ab": ab, "mask_density": plan.density, "path": plan.path,
            "tile_cost_over_dense": (plan.tiles.cost() / n ** 2) if plan.tiles is not None else None,
            "seconds_ours_auto": t_ours, "seconds_ours_dense": t_dense,
            "seconds_released_port": t_base,
            "speedup_auto_vs_released": t_base / t_ours, "speedup_dense_vs_released": t_base / t_dense,
            "gflops_dense_equivalent_ours_dense": fl / t_dense / 1e9,
            "gflops_dense_equivalent_released": fl / t_base / 1e9,
            "gflops_dense_equivalent_ours_auto": fl / t_ours / 1e9,
            "max_abs_diff_ours_vs_released": float(np.abs(y_ours - y_base).max()),
            "max_abs_diff_exact_vs_float64_oracle_subset": float(np.abs(y_small - y_orc).max()),
            "oracle_subset_N": int(oracle_n),
        }
        print(name, t, json.dumps(res["per_t"][int(t)]), flush=True)
    if run_sampling:
        x_T = jax.random.normal(jax.random.key(1), (b,) + train.shape[1:])
        timesteps = schedules.ddim_timesteps(10)

        def run_ours():
            r = sampling.ddim(ours, x_T, sched, 10)
            return jax.block_until_ready(r.images), r

        def run_port():
            # released port of the whole run: same DDIM semantics, baseline denoiser per step
            x = x_T
            for i, t in enumerate(timesteps):
                ab = float(sched.alphas_cumprod[t])
                ab_prev = float(sched.alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
                mask, _ = pl.masks(st, ab, thr)
                x0 = released_denoise(x, ab, flat, mask)
                eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab + 1e-8)
                x0c = jnp.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
                x = np.sqrt(ab_prev) * x0c + np.sqrt(1 - ab_prev) * eps
            return jax.block_until_ready(x0)

        run_ours()  # compile once; the port's per-chunk function is compiled by the per-t calls
        t_o, t_p = [], []
        for _ in range(sampling_repeats):  # interleaved, so load changes hit both alike
            t0 = time.perf_counter(); img_o, r_ours = run_ours(); t_o.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); img_p = run_port(); t_p.append(time.perf_counter() - t0)
        res["sampling_10_steps"] = {
            "seconds_ours": t_o, "seconds_released_port": t_p,
            "speedup_median": float(np.median(t_p) / np.median(t_o)),
            "max_abs_diff_final_images": float(np.abs(np.asarray(img_o) - np.asarray(img_p)).max()),
            "paths": [p.path for p in ours.prepare(r_ours.abs).plans.plans],
            "densities": list(ours.prepare(r_ours.abs).densities().values()),
        }
        print(name, "sampling", json.dumps(res["sampling_10_steps"]), flush=True)
    out[name] = res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/pca_locality.json")
    ap.add_argument("--quick", action="store_true", help="small N for a smoke run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__,
           "matmul_gflops_f32_highest": matmul_rate()}
    print("matmul GFLOP/s", out["matmul_gflops_f32_highest"], flush=True)
    lim = 3000 if args.quick else None
    fm = data.load("fashion_mnist", limit=lim)
    fm_test = data.load("fashion_mnist", split="test", limit=64)
    bench_dataset("fashion_mnist", fm, fm_test, (700, 300, 100), 0.005, 8, args.repeats,
                  500 if args.quick else 2000, True, out)
    cd = data.load("cifar10_catsdogs")
    bench_dataset("cifar10_catsdogs", cd[:1800], cd[1800:], (300,), 0.05, 8, args.repeats,
                  300, False, out)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
