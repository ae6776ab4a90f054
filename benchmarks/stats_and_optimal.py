"""Statistics of full Fashion-MNIST and one exact optimal-denoiser call, against numpy baselines.

    python -m benchmarks.stats_and_optimal [--out benchmarks/results/stats_and_optimal.json]

* statistics: ``locality.stats.moments`` + ``eig`` (streamed float64) vs a straightforward numpy
  ``np.cov(X.T)`` + ``np.linalg.eigh`` in float64, and vs the time to read the arrays once
  (``data.load`` from the prepared cache, and one float64 pass over them);
* optimal denoiser: one exact call (B = 8, N = 60,000) vs a straightforward numpy float32
  implementation (full distance matrix, stable softmax, weighted sum).
Medians of repeats and ratios measured in the same run; JSON output.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from locality import data, denoisers, stats
from locality._io import atomic_write_text


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = fn()
        jax.block_until_ready(r)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def numpy_optimal(x_t, train_flat, ab):
    q = x_t.reshape(len(x_t), -1)
    d = (
        (q * q).sum(1)[:, None]
        - 2 * np.sqrt(ab) * q @ train_flat.T
        + ab * (train_flat**2).sum(1)[None]
    )
    l = -d / (2 * (1 - ab))
    l -= l.max(1, keepdims=True)
    w = np.exp(l)
    w /= w.sum(1, keepdims=True)
    return (w @ train_flat).reshape(x_t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/stats_and_optimal.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = {"device": str(jax.devices()[0])}
    x = data.load("fashion_mnist")
    out["read_seconds"] = median_time(lambda: data.load("fashion_mnist"), args.repeats)
    flat = x.reshape(len(x), -1)
    out["float64_pass_seconds"] = median_time(lambda: flat.astype(np.float64).sum(0), args.repeats)

    def ours():
        mean, cov, _ = stats.moments(x)
        return stats.eig(cov)

    def baseline():
        f = flat.astype(np.float64)
        return np.linalg.eigh(np.cov(f.T))

    out["stats_seconds_ours"] = median_time(ours, args.repeats)
    out["stats_seconds_numpy"] = median_time(baseline, args.repeats)
    out["moments_seconds_ours"] = median_time(lambda: stats.moments(x), args.repeats)
    out["stats_speedup_vs_numpy"] = out["stats_seconds_numpy"] / out["stats_seconds_ours"]
    out["moments_over_read"] = out["moments_seconds_ours"] / out["read_seconds"]
    mean, cov, _ = stats.moments(x)
    out["cov_max_abs_diff_vs_numpy"] = float(np.abs(cov - np.cov(flat.astype(np.float64).T)).max())

    test = data.load("fashion_mnist", split="test", limit=8)
    ab = 0.3940109610557556  # t = 300 of the DDPM linear schedule
    rng = np.random.default_rng(0)
    x_t = (np.sqrt(ab) * test + np.sqrt(1 - ab) * rng.normal(size=test.shape)).astype(np.float32)
    opt = denoisers.make("optimal", train=x)
    opt(x_t, ab)  # compile
    out["optimal_seconds_ours"] = median_time(lambda: opt(x_t, ab), args.repeats)
    out["optimal_seconds_numpy"] = median_time(lambda: numpy_optimal(x_t, flat, ab), args.repeats)
    out["optimal_speedup_vs_numpy"] = out["optimal_seconds_numpy"] / out["optimal_seconds_ours"]
    out["optimal_max_abs_diff_vs_numpy"] = float(
        np.abs(
            np.asarray(opt(x_t, ab))
            - numpy_optimal(x_t.astype(np.float64), flat.astype(np.float64), ab)
        ).max()
    )
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
