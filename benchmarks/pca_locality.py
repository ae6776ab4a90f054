"""Speed and memory of pca_locality against a straightforward port of the released formulation.

    python -m benchmarks.pca_locality [--out benchmarks/results/pca_locality.json]
    python -m benchmarks.pca_locality --quick             # smoke run -> pca_locality_quick.json
    python -m benchmarks.pca_locality --readme README.md  # README section from the JSON, no timing

Full Fashion-MNIST (N = 60,000, n = 784), B = 8 queries, threshold 0.005. The baseline is the
released dense formulation ported to JAX: per chunk of 512 images the residual tensor
``r = x_b - sqrt(ab) X`` [B, 512, n], ``dist = einsum('bkj,jm->bkm', r^2, M)``, then the softmax
(exactly merged across chunks so that both compute the same posterior mean). Both use the same
float64 masks. Recorded, in one run:

* the machine: load averages (before, during, after), CPU affinity, thread settings; a warning
  when it was busy (1-minute load average above the core count before the run, or above 1.5x the
  core count while it ran -- the benchmark itself keeps the cores busy);
* the float32 matmul rate of numpy and of JAX for a [784, 784] x [784, 4096] product (and the
  2048^3 JAX rate of earlier versions);
* a whole 10-step DDIM run of ours (path "auto") and of the port, interleaved (ABAB...), medians;
  the planning time (masks + plans, once per denoiser and noise grid) is reported separately;
* a per-step table: every step's denoiser call at the run's own x_t, ours (auto; and dense) and
  the port interleaved: t, mask density, path, seconds, ratio, GFLOP/s of the multiply-adds each
  path performs, agreement with the port and with a float64 oracle on a subset;
* calibration of the cost model (on a subset): every path forced at a few noise levels against
  the dense path, with the ``TILE_EFFICIENCY`` and ``CLUSTER_OVERHEAD`` values the times imply;
* a CIFAR-like case (cats/dogs, n = 3072, one call at t = 300) and the peak resident memory.

``--quick`` runs the same on a 3,000-image subset (well under a minute on 2 quiet cores); the full
run takes about 10 minutes there. ``--readme`` rewrites the performance section of the README
between its ``pca_locality-benchmark`` markers from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from locality import data, denoisers, sampling, schedules, stats
from locality._io import atomic_write_text
from locality.denoisers import pca_locality as pl
from locality.denoisers import pca_plans as pp

HIGHEST = jax.lax.Precision.HIGHEST
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


# --------------------------------------------------------------------------------- machine


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cores_in_affinity": n_cores(),
        "load_average_before": list(os.getloadavg()),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "jax": jax.__version__,
        "numpy": np.__version__,
        "device": str(jax.devices()[0]),
        "device_count": jax.device_count(),
    }
    try:
        info["affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    try:
        from threadpoolctl import threadpool_info

        info["native_thread_pools"] = [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version")}
            for p in threadpool_info()
        ]
    except Exception:  # pragma: no cover - optional
        pass
    return info


_LOADS = []
_T0 = time.perf_counter()


def note_load(where: str) -> None:
    """Record the load average (and the elapsed seconds) at the end of a section."""
    _LOADS.append(
        {
            "where": where,
            "load_average": list(os.getloadavg()),
            "elapsed_seconds": time.perf_counter() - _T0,
        }
    )


def busy_warnings(info: dict) -> list:
    cores = info["cores_in_affinity"]
    out = []
    before = info["load_average_before"][0]
    if before > cores:
        out.append(
            f"WARNING: busy machine: 1-minute load average {before:.2f} before the run "
            f"exceeds the {cores} cores in the affinity mask; the figures are not "
            "representative"
        )
    worst = max([l["load_average"][0] for l in _LOADS] + [0.0])
    if worst > 1.5 * cores:
        out.append(
            f"WARNING: busy machine: 1-minute load average reached {worst:.2f} during the "
            f"run (the benchmark alone accounts for about {cores}); the figures are not "
            "representative"
        )
    return out


# ------------------------------------------------------------------------------- timing


def block(x):
    return jax.block_until_ready(x)


def interleaved(fns: dict, repeats: int, warmup=True) -> dict:
    """Medians of ``repeats`` rounds, each calling every function once in turn (ABAB...), so
    load changes hit all alike. ``warmup``: True (all), False or a set of names called once
    before timing (to compile). Returns {name: (median, [times], last output)}."""
    names = set(fns) if warmup is True else set(warmup or ())
    last = {}
    for k in names:
        last[k] = block(fns[k]())
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            last[k] = block(f())
            ts[k].append(time.perf_counter() - t0)
    return {k: (float(np.median(v)), v, last[k]) for k, v in ts.items()}


def matmul_rates(repeats=7) -> dict:
    """float32 [784, 784] x [784, 4096] in numpy and JAX (interleaved), and JAX 2048^3."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(784, 784)).astype(np.float32)
    b = rng.normal(size=(784, 4096)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=HIGHEST))
    big = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    res = interleaved(
        {"numpy": lambda: a @ b, "jax": lambda: f(ja, jb), "jax_2048": lambda: f(big, big)}, repeats
    )
    fl = 2.0 * 784 * 784 * 4096
    return {
        "shape": "[784, 784] x [784, 4096] float32",
        "numpy_gflops": fl / res["numpy"][0] / 1e9,
        "jax_gflops": fl / res["jax"][0] / 1e9,
        "jax_2048_gflops": 2.0 * 2048**3 / res["jax_2048"][0] / 1e9,
        "numpy_seconds": res["numpy"][1],
        "jax_seconds": res["jax"][1],
    }


# ----------------------------------------------------------------------- released port


@jax.jit
def _released_chunk(q, x, m, ab):
    """Released formulation for one chunk: residual tensor + einsum against the mask."""
    r = q[:, None, :] - jnp.sqrt(ab) * x[None]  # [B, K, n]
    dist = jnp.einsum("bkj,jm->bkm", r * r, m, precision=HIGHEST)  # [B, K, n]
    logits = -dist / (2.0 * (1.0 - ab))
    mx = jnp.max(logits, axis=1)
    w = jnp.exp(logits - mx[:, None])
    return mx, jnp.einsum("bkm,km->bm", w, x, precision=HIGHEST), jnp.sum(w, axis=1)


def released_denoise(x_t, ab, train_flat, mask, chunk=512):
    """Straightforward port: Python loop over chunks of 512, exact log-sum-exp merge."""
    b = x_t.shape[0]
    q = jnp.asarray(x_t).reshape(b, -1)
    m = jnp.asarray(mask, jnp.float32)
    ab = jnp.float32(ab)
    gmax = num = den = None
    for s in range(0, train_flat.shape[0], chunk):
        mx, nu, de = _released_chunk(q, train_flat[s : s + chunk], m, ab)
        if gmax is None:
            gmax, num, den = mx, nu, de
        else:
            new = jnp.maximum(gmax, mx)
            a, c = jnp.exp(gmax - new), jnp.exp(mx - new)
            num, den, gmax = num * a + nu * c, den * a + de * c, new
    return (num / den).reshape(x_t.shape)


def released_ddim(x_T, sched, timesteps, flat, step_masks):
    """The port's whole run: the same DDIM semantics, the baseline denoiser per step."""
    x = x_T
    for i, t in enumerate(timesteps):
        ab = float(sched.alphas_cumprod[t])
        ab_prev = float(sched.alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x0 = released_denoise(x, ab, flat, step_masks[i])
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab + 1e-8)
        x0c = jnp.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
        x = np.sqrt(ab_prev) * x0c + np.sqrt(1 - ab_prev) * eps
    return x0


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


# ------------------------------------------------------------------------- work counts


def gemm_macs(plan: pp.StepPlan, b: int) -> int:
    """Multiply-adds per training item that a path's GEMMs perform (padding included)."""
    n = plan.mask.shape[0]
    if plan.path == "dense":
        return b * n * n
    if plan.path == "tiles":
        return (b + 1) * plan.tiles.cost() + (b + 1) * n  # + the full distance
    c = plan.clusters
    nb = n * c.bases.shape[1]
    return b * nb + (b + 1) * (c.cost() - nb)


def plan_summary(plan: pp.StepPlan) -> dict:
    n = plan.mask.shape[0]
    out = {"path": plan.path, "mask_density": plan.density, "cost_over_dense": plan.cost() / n**2}
    if plan.path == "tiles":
        out["groups"] = [list(g.ins.shape) for g in plan.tiles.groups]
    if plan.path == "clusters":
        c = plan.clusters
        out.update(
            cluster_size=c.cluster_size,
            num_centroids=c.num_centroids,
            base_columns=int(c.bases.shape[1]),
            correction_density=c.correction_density(),
            groups=[list(g.ins.shape) for g in c.groups],
        )
    return out


def modelled_time(plan: pp.StepPlan) -> float:
    """The cost model of path="auto" (dense multiply-adds; dense = n * n)."""
    n = plan.mask.shape[0]
    if plan.path == "dense":
        return float(n * n)
    if plan.path == "tiles":
        return plan.tiles.cost() / pp.TILE_EFFICIENCY
    c = plan.clusters
    nb = n * c.bases.shape[1]
    return nb + (c.cost() - nb) / pp.cluster_efficiency(c.cluster_size)


# ----------------------------------------------------------------------------- sections


def whole_run(ours, st, flat, x_T, sched, thr, repeats) -> dict:
    timesteps = schedules.ddim_timesteps(10)
    t0 = time.perf_counter()
    fresh = ours.replace(host=pl._Host(st))  # empty plan cache: the one-off planning cost
    fresh.prepare(sched.ab(timesteps).astype(np.float32))
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_masks = [pl.masks(st, float(sched.alphas_cumprod[t]), thr)[0] for t in timesteps]
    t_masks = time.perf_counter() - t0

    def run_ours():
        return sampling.ddim(ours, x_T, sched, 10).images

    def run_port():
        return released_ddim(x_T, sched, timesteps, flat, step_masks)

    t0 = time.perf_counter()
    r = sampling.ddim(ours, x_T, sched, 10)  # plans + compile (not timed below)
    block(r.images)
    t_first = time.perf_counter() - t0
    block(released_denoise(x_T, float(sched.alphas_cumprod[timesteps[0]]), flat, step_masks[0]))
    res = interleaved({"ours": run_ours, "port": run_port}, repeats, warmup=False)
    img_o, img_p = np.asarray(res["ours"][2]), np.asarray(res["port"][2])
    prepared = ours.prepare(r.abs)
    out = {
        "seconds_ours": res["ours"][1],
        "seconds_released_port": res["port"][1],
        "median_seconds_ours": res["ours"][0],
        "median_seconds_released_port": res["port"][0],
        "speedup_median": res["port"][0] / res["ours"][0],
        "planning_seconds_ours": t_plan,
        "mask_seconds_port": t_masks,
        "speedup_including_planning": (res["port"][0] + t_masks) / (res["ours"][0] + t_plan),
        "first_run_seconds_ours_with_planning_and_compile": t_first,
        "max_abs_diff_final_images": float(np.abs(img_o - img_p).max()),
        "timesteps": [int(t) for t in r.timesteps],
        "paths": [p.path for p in prepared.plans.plans],
        "densities": [p.density for p in prepared.plans.plans],
    }
    return out, r


def per_step(ours, dense, st, flat, train, r, thr, repeats, oracle_n) -> dict:
    """Every step's call at the run's own x_t: ours (auto, one-entry plan table), ours dense and
    the port, interleaved."""
    b = r.xts.shape[1]
    n_train, n = flat.shape
    rows = {}
    warmed = set()
    sub = slice(0, oracle_n)
    for i, t in enumerate(r.timesteps):
        ab = float(r.abs[i])
        x_t = np.asarray(r.xts[i])
        den_t = ours.prepare([ab])
        dense_t = dense.prepare([ab])
        plan = den_t.plans.plans[0]
        fns = {
            "ours": lambda: den_t(x_t, ab),
            "dense": lambda: dense_t(x_t, ab),
            "port": lambda: released_denoise(x_t, ab, flat, plan.mask),
        }
        if plan.path == "dense":
            fns.pop("dense")
        warm = {"ours"} | ({"dense"} & set(fns) - warmed)  # each program compiles once
        warmed |= warm
        res = interleaved(fns, repeats, warmup=warm)
        t_o, t_p = res["ours"][0], res["port"][0]
        t_d = res["dense"][0] if "dense" in res else t_o
        y_o, y_p = np.asarray(res["ours"][2]), np.asarray(res["port"][2])
        c = plan.clusters
        small = denoisers.make(
            "pca_locality",
            stats=st,
            train=train[sub],
            mask=plan.mask,
            path=plan.path,
            num_centroids=c.num_centroids if c else None,
            cluster_size=c.cluster_size if c else None,
        )
        y_s = np.asarray(small(x_t[:2], ab))
        y_orc = oracle64(x_t[:2], np.asarray(flat[sub]), plan.mask, ab)
        macs = gemm_macs(plan, b)
        row = dict(
            plan_summary(plan),
            ab=ab,
            seconds_ours=t_o,
            seconds_ours_dense=t_d,
            seconds_released_port=t_p,
            ratio_port_over_ours=t_p / t_o,
            ratio_dense_over_ours=t_d / t_o,
            gflops_ours=2.0 * n_train * macs / t_o / 1e9,
            gflops_ours_dense=2.0 * n_train * b * n * n / t_d / 1e9,
            gflops_released_port=2.0 * n_train * b * n * n / t_p / 1e9,
            gflops_dense_equivalent_ours=2.0 * n_train * b * n * n / t_o / 1e9,
            modelled_over_dense=modelled_time(plan) / n**2,
            max_abs_diff_ours_vs_released=float(np.abs(y_o - y_p).max()),
            max_abs_diff_vs_float64_oracle_subset=float(np.abs(y_s - y_orc).max()),
            oracle_subset_N=int(oracle_n),
            times={k: v[1] for k, v in res.items()},
        )
        rows[int(t)] = row
        print(
            f"  t={int(t):4d} density {plan.density:.3f} {plan.path:9s} ours {t_o:7.3f}s "
            f"dense {t_d:7.3f}s port {t_p:7.3f}s  port/ours {t_p / t_o:5.2f}x  "
            f"oracle {row['max_abs_diff_vs_float64_oracle_subset']:.1e}",
            flush=True,
        )
        note_load(f"per_step t={int(t)}")
    return rows


def calibrate(st, train, ts, sched, thr, b, repeats) -> dict:
    """Every path forced at a few noise levels against the dense path (same inputs, interleaved),
    and the constants the times imply. Every call also pays work no path avoids (softmax, value
    contraction, layout): measured as the time of an all-zero mask (no GEMM work) and taken out
    before comparing GEMM work, so efficiency = (cost / dense cost) / ((t - t_fixed) / (t_dense -
    t_fixed)). The fixed part is the same for every path, so it does not change which path
    "auto" picks; it only makes the constants describe the GEMM work they model."""
    n = int(np.prod(train.shape[1:]))
    base = denoisers.make("pca_locality", stats=st, train=train, threshold=thr)
    empty = denoisers.make(
        "pca_locality",
        stats=st,
        train=train,
        mask=np.zeros((n, n)),
        path="clusters",
        num_centroids=0,
        cluster_size=max(pp.CLUSTER_SIZES),
    )
    key = jax.random.key(7)
    out = {"N": int(len(train)), "levels": {}}
    tile_eff, overhead = [], {}
    for t in ts:
        ab = float(sched.alphas_cumprod[t])
        x_t = np.asarray(jax.random.normal(jax.random.fold_in(key, t), (b,) + train.shape[1:]))
        variants = {"dense": base.replace(path="dense"), "tiles": base.replace(path="tiles")}
        for o in pp.CLUSTER_SIZES:
            variants[f"clusters_O{o}"] = base.replace(
                path="clusters", num_centroids=0, cluster_size=o
            )
        dens = {k: v.prepare([ab]) for k, v in variants.items()}
        dens["fixed"] = empty
        res = interleaved({k: (lambda d=d: d(x_t, ab)) for k, d in dens.items()}, repeats)
        t_d = res["dense"][0]
        g = min(res["fixed"][0] / t_d, 0.9)
        lvl = {"fixed": dict(seconds=res["fixed"][0], time_over_dense=g)}
        for k, d in dens.items():
            if k == "fixed":
                continue
            p = d.plans.plans[0]
            ratio = res[k][0] / t_d
            gemm = max((ratio - g) / (1.0 - g), 1e-9)  # GEMM time relative to dense's
            e = dict(
                seconds=res[k][0],
                time_over_dense=ratio,
                cost_over_dense=p.cost() / n**2,
                gemm_time_over_dense=gemm,
                gflops=2.0 * len(train) * gemm_macs(p, b) / res[k][0] / 1e9,
            )
            if k == "tiles":
                e["efficiency"] = (p.cost() / n**2) / gemm
                tile_eff.append(e["efficiency"])
            elif k.startswith("clusters"):
                c = p.clusters
                nb = c.bases.shape[1] / n
                corr = p.cost() / n**2 - nb
                eff = corr / max(gemm - nb, 1e-9)
                e.update(
                    efficiency=eff,
                    modelled_efficiency=pp.cluster_efficiency(c.cluster_size),
                    implied_overhead=c.cluster_size * (1.0 / eff - 1.0),
                )
                overhead.setdefault(c.cluster_size, []).append(e["implied_overhead"])
            lvl[k] = e
        out["levels"][int(t)] = lvl
        print(
            "  calibration t=%d: fixed %.2fx  " % (t, g)
            + "  ".join(
                f"{k} {v['time_over_dense']:.2f}x (cost {v['cost_over_dense']:.2f})"
                for k, v in lvl.items()
                if k != "fixed"
            ),
            flush=True,
        )
        note_load(f"calibration t={int(t)}")
    out["suggested"] = {
        "TILE_EFFICIENCY": float(np.median(tile_eff)),
        "CLUSTER_OVERHEAD": float(np.median([v for vs in overhead.values() for v in vs])),
        "CLUSTER_OVERHEAD_per_size": {int(k): float(np.median(v)) for k, v in overhead.items()},
        "current": {"TILE_EFFICIENCY": pp.TILE_EFFICIENCY, "CLUSTER_OVERHEAD": pp.CLUSTER_OVERHEAD},
    }
    return out


def cifar_case(repeats, quick) -> dict:
    cd = data.load("cifar10_catsdogs")
    train, test = cd[: 600 if quick else 1800], cd[1800:]
    st = stats.gaussian_stats(train)
    flat = jnp.asarray(train.reshape(len(train), -1))
    sched = schedules.ddpm_linear()
    ab = float(sched.alphas_cumprod[300])
    b = 8
    eps = np.asarray(jax.random.normal(jax.random.key(3), test[:b].shape))
    x_t = (np.sqrt(ab) * test[:b] + np.sqrt(1 - ab) * eps).astype(np.float32)
    ours = denoisers.make("pca_locality", stats=st, train=train, threshold=0.05).prepare([ab])
    dense = denoisers.make(
        "pca_locality", stats=st, train=train, threshold=0.05, path="dense"
    ).prepare([ab])
    plan = ours.plans.plans[0]
    res = interleaved(
        {
            "ours": lambda: ours(x_t, ab),
            "dense": lambda: dense(x_t, ab),
            "port": lambda: released_denoise(x_t, ab, flat, plan.mask),
        },
        repeats,
    )
    y_o, y_p = np.asarray(res["ours"][2]), np.asarray(res["port"][2])
    row = dict(
        plan_summary(plan),
        ab=ab,
        seconds_ours=res["ours"][0],
        seconds_ours_dense=res["dense"][0],
        seconds_released_port=res["port"][0],
        max_abs_diff_ours_vs_released=float(np.abs(y_o - y_p).max()),
    )
    n_train, n = flat.shape
    return dict(
        row,
        N=int(n_train),
        n=int(n),
        B=b,
        threshold=0.05,
        t=300,
        ratio_port_over_ours=res["port"][0] / res["ours"][0],
        per_t={300: legacy_entry(row, int(n), int(n_train), b)},
    )


# --------------------------------------------------------------------------------- README

START, END = "<!-- pca_locality-benchmark:start -->", "<!-- pca_locality-benchmark:end -->"


def legacy_entry(r: dict, n: int, n_train: int, b: int) -> dict:
    """A per-step row under the keys of earlier versions of this benchmark (``per_t``)."""
    fl = 2.0 * b * n_train * n * n
    return {
        "ab": r["ab"],
        "mask_density": r["mask_density"],
        "path": r["path"],
        "tile_cost_over_dense": r["cost_over_dense"] if r["path"] == "tiles" else None,
        "seconds_ours_auto": r["seconds_ours"],
        "seconds_ours_dense": r["seconds_ours_dense"],
        "seconds_released_port": r["seconds_released_port"],
        "speedup_auto_vs_released": r["seconds_released_port"] / r["seconds_ours"],
        "speedup_dense_vs_released": r["seconds_released_port"] / r["seconds_ours_dense"],
        "gflops_dense_equivalent_ours_dense": fl / r["seconds_ours_dense"] / 1e9,
        "gflops_dense_equivalent_released": fl / r["seconds_released_port"] / 1e9,
        "gflops_dense_equivalent_ours_auto": fl / r["seconds_ours"] / 1e9,
        "max_abs_diff_ours_vs_released": r["max_abs_diff_ours_vs_released"],
        "max_abs_diff_exact_vs_float64_oracle_subset": r.get(
            "max_abs_diff_vs_float64_oracle_subset"
        ),
        "oracle_subset_N": r.get("oracle_subset_N"),
    }


def readme_section(res: dict) -> str:
    fm = res["fashion_mnist"]
    m = res["machine"]
    mm = res["matmul"]
    run = fm["sampling_10_steps"]
    lines = [
        f"`python -m benchmarks.pca_locality` (writes `benchmarks/results/pca_locality.json`; this "
        f"section: `python -m benchmarks.pca_locality --readme README.md`): Fashion-MNIST "
        f"(N = {fm['N']:,}, n = {fm['n']}), B = {fm['B']}, threshold {fm['threshold']}, against a "
        "straightforward JAX port of the released dense formulation (residual tensor + einsum per "
        "chunk of 512, exact merge), interleaved, medians. Machine: "
        f"{m['cores_in_affinity']} cores, load average {m['load_average_before'][0]:.2f} before "
        f"the run; float32 [784, 784] x [784, 4096] matmul {mm['numpy_gflops']:.0f} GFLOP/s in "
        f"numpy, {mm['jax_gflops']:.0f} GFLOP/s in JAX.",
        "",
    ]
    for w in res.get("warnings", []):
        lines += [f"**{w}**", ""]
    lines += [
        (
            "| t | mask density | path | cost / dense | ours | released port | ratio "
            "| GFLOP/s (ours / port) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, r in sorted(fm["per_step"].items(), key=lambda kv: -int(kv[0])):
        lines.append(
            f"| {t} | {r['mask_density']:.3f} | {r['path']} | {r['cost_over_dense']:.2f} | "
            f"{r['seconds_ours']:.2f} s | {r['seconds_released_port']:.2f} s | "
            f"{r['ratio_port_over_ours']:.2f}x | {r['gflops_ours']:.0f} / "
            f"{r['gflops_released_port']:.0f} |"
        )
    so, sp = (
        sum(r["seconds_ours"] for r in fm["per_step"].values()),
        sum(r["seconds_released_port"] for r in fm["per_step"].values()),
    )
    lines.append(f"| sum of the calls | | | | {so:.1f} s | {sp:.1f} s | {sp / so:.2f}x | |")
    lines.append(
        f"| **whole 10-step DDIM run** | | auto | | {run['median_seconds_ours']:.1f} s | "
        f"{run['median_seconds_released_port']:.1f} s | **{run['speedup_median']:.2f}x** | |"
    )
    worst = max(r["max_abs_diff_vs_float64_oracle_subset"] for r in fm["per_step"].values())
    port = max(r["max_abs_diff_ours_vs_released"] for r in fm["per_step"].values())
    cal = fm.get("calibration", {}).get("suggested", {})
    lines += [
        "",
        f"Planning (masks and plans of the 10 levels, once per denoiser and grid, cached): "
        f"{run['planning_seconds_ours']:.1f} s "
        f"(the port's masks: {run['mask_seconds_port']:.1f} s); "
        f"with it the run is {run['speedup_including_planning']:.2f}x. Outputs agree with the port "
        f"to {port:.0e} per call and {run['max_abs_diff_final_images']:.0e} on the final images, "
        f"with a float64 oracle ({fm['per_step'][max(fm['per_step'])]['oracle_subset_N']:,}-image "
        f"subset) to {worst:.0e}; peak RSS {res['peak_rss_gib']:.2f} GiB.",
    ]
    if cal:
        lines += [
            "",
            f"Cost model measured in the same run: TILE_EFFICIENCY {cal['TILE_EFFICIENCY']:.2f} "
            f"(set: {cal['current']['TILE_EFFICIENCY']}), CLUSTER_OVERHEAD "
            f"{cal['CLUSTER_OVERHEAD']:.0f} (set: {cal['current']['CLUSTER_OVERHEAD']:g}).",
        ]
    if "cifar10_catsdogs" in res:
        c = res["cifar10_catsdogs"]
        lines += [
            "",
            f"Cats/dogs (n = {c['n']}, N = {c['N']:,}), t = 300: density "
            f"{c['mask_density']:.3f}, path {c['path']}, {c['seconds_ours']:.2f} s vs "
            f"{c['seconds_released_port']:.2f} s ({c['ratio_port_over_ours']:.2f}x).",
        ]
    return "\n".join(lines)


def write_readme(json_path: str, readme: str) -> None:
    with open(json_path) as f:
        res = json.load(f)
    text = open(readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    new = re.sub(
        re.escape(START) + ".*?" + re.escape(END),
        lambda _: START + "\n" + readme_section(res) + "\n" + END,
        text,
        flags=re.S,
    )
    atomic_write_text(readme, new)
    print(f"wrote the pca_locality section of {readme} from {json_path}")


# ----------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/pca_locality.json; with --quick "
        "benchmarks/results/pca_locality_quick.json, so a smoke run never "
        "replaces the recorded figures)",
    )
    ap.add_argument("--quick", action="store_true", help="3,000-image subset, fewer repeats")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds (default 3 for the whole run, 2 per step; quick: 2, 1)",
    )
    ap.add_argument(
        "--readme",
        default=None,
        help="only rewrite this README's benchmark section from --out and exit",
    )
    ap.add_argument("--no-cifar", action="store_true")
    args = ap.parse_args()
    if args.out is None:
        args.out = "benchmarks/results/pca_locality%s.json" % ("_quick" if args.quick else "")
    if args.readme:
        write_readme(args.out, args.readme)
        return
    t_start = time.perf_counter()
    info = machine_info()
    print("machine", json.dumps(info), flush=True)
    if info["load_average_before"][0] > info["cores_in_affinity"]:
        print(busy_warnings(info)[0], flush=True)
    run_rep = args.repeats or (2 if args.quick else 3)
    step_rep = args.repeats or (1 if args.quick else 2)
    out = {"machine": info, "jax": jax.__version__, "device": str(jax.devices()[0])}
    mm = matmul_rates()
    out["matmul"] = mm
    out["matmul_gflops_f32_highest"] = mm["jax_2048_gflops"]
    print(
        "matmul GFLOP/s numpy %.1f  jax %.1f  (jax 2048^3 %.1f)"
        % (mm["numpy_gflops"], mm["jax_gflops"], mm["jax_2048_gflops"]),
        flush=True,
    )
    note_load("matmul")

    thr, b = 0.005, 8
    lim = 3000 if args.quick else None
    fm = data.load("fashion_mnist", limit=lim)
    st = stats.gaussian_stats(fm)
    flat = jnp.asarray(fm.reshape(len(fm), -1))
    sched = schedules.ddpm_linear()
    ours = denoisers.make("pca_locality", stats=st, train=fm, threshold=thr)
    dense = denoisers.make("pca_locality", stats=st, train=fm, threshold=thr, path="dense")
    res = {"N": int(len(fm)), "n": int(flat.shape[1]), "B": b, "threshold": thr}
    x_T = jax.random.normal(jax.random.key(1), (b,) + fm.shape[1:])

    print("whole 10-step DDIM run (ours auto vs released port, interleaved)", flush=True)
    run, r = whole_run(ours, st, flat, x_T, sched, thr, run_rep)
    res["sampling_10_steps"] = run
    print(
        "  ours %.2f s  port %.2f s  -> %.2fx (median of %d); planning %.2f s"
        % (
            run["median_seconds_ours"],
            run["median_seconds_released_port"],
            run["speedup_median"],
            run_rep,
            run["planning_seconds_ours"],
        ),
        flush=True,
    )
    note_load("whole run")

    print("per step (ours auto / ours dense / port at the run's own x_t)", flush=True)
    res["per_step"] = per_step(
        ours, dense, st, flat, fm, r, thr, step_rep, 500 if args.quick else 2000
    )
    res["per_t"] = {
        t: legacy_entry(res["per_step"][t], res["n"], res["N"], b)  # earlier keys
        for t in (700, 300, 100)
    }

    print("calibration of the cost model", flush=True)
    cal_n = 3000 if args.quick else 16384
    cal_ts = (900,) if args.quick else (900, 700, 500, 200, 100)
    res["calibration"] = calibrate(st, fm[:cal_n], cal_ts, sched, thr, b, step_rep)
    print("  suggested", json.dumps(res["calibration"]["suggested"]), flush=True)
    out["fashion_mnist"] = res
    out["peak_rss_gib_fashion_mnist"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    if not args.no_cifar:
        print("cats/dogs, t = 300", flush=True)
        out["cifar10_catsdogs"] = cifar_case(run_rep, args.quick)
        print("  " + json.dumps(out["cifar10_catsdogs"]), flush=True)
        note_load("cifar")
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    info["load_average_after"] = list(os.getloadavg())
    out["load_samples"] = _LOADS
    out["warnings"] = busy_warnings(info)
    out["wall_seconds"] = time.perf_counter() - t_start
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(readme_section(out))
    for w in out["warnings"]:
        print(w)
    print(f"wrote {args.out} in {out['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
