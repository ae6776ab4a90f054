"""Sample from registered denoisers on a dataset from shared initial noise; write grids and metrics.

    python -m experiments.sample --config configs/sample.py:quickstart --workdir workdirs/quickstart

Writes to ``--workdir``: ``config.json`` (resolved), ``samples_<method>.png`` (final samples),
``x0_steps_<method>.png`` (x0_hat at every step for the first samples), ``nearest_<method>.png``
(every sample beside its nearest training image, closest first: copy detection), ``samples.npz``,
``metrics.json`` (timings, mask densities, distances to the nearest training image, pairwise r2
between methods) and ``summary.txt``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from locality import data, denoisers, metrics, plotting, sampling, schedules, stats

_CONFIG = _WORKDIR = None  # defined when run as a program (tests import several entry points)

NEEDS_STATS = {"wiener", "wiener_dense", "pca_locality"}


def build(method: str, kwargs: dict, train, st, shard: bool, progress: bool = False):
    """Build a registered denoiser with the arguments its factory takes."""
    kwargs = dict(kwargs)
    if method in NEEDS_STATS:
        kwargs["stats"] = st
    if method not in ("wiener", "wiener_dense") and "checkpoint" not in kwargs:
        kwargs["train"] = train
    if shard and method in ("optimal", "pca_locality"):
        kwargs["shard"] = True
    if progress and method == "pca_locality":
        kwargs.setdefault("progress", True)
    if method == "network":
        kwargs["labels"] = parse_labels(kwargs.get("labels"))
    return denoisers.make(method, **kwargs)


def parse_labels(spec):
    """Command-line labels of a class-conditional net: ``""``/None -> None (no label), ``"cycle"``,
    ``"3"`` -> 3, ``"0,1,1"`` -> [0, 1, 1]; anything else passes through unchanged."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str) and spec.strip() != "cycle":
        try:
            vals = [int(v) for v in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"labels={spec!r}: use '' (no label), 'cycle', an int or a comma list of ints"
            ) from None
        return vals[0] if len(vals) == 1 else vals
    return spec.strip() if isinstance(spec, str) else spec


def nearest_distance(samples, train):
    """L2 distance from each sample to its nearest training image (copy detection)."""
    nn = denoisers.make("nearest", train=train)
    near = np.asarray(nn(jnp.asarray(samples), 0.5))
    return np.sqrt(((np.asarray(samples) - near) ** 2).reshape(len(samples), -1).sum(1)), near


def save_nearest_pairs(samples, near, dist, path: str, title: str) -> str:
    """Each sample beside its nearest training image, sorted by their L2 distance (closest first,
    eight pairs per row): the copies a memorising denoiser makes are the first pairs."""
    order = np.argsort(dist, kind="stable")
    pairs = np.stack([np.asarray(samples)[order], np.asarray(near)[order]], 1)
    return plotting.save_image_grid(
        pairs.reshape((-1,) + pairs.shape[2:]), path, ncols=2 * min(8, len(order)), title=title
    )


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    if "methods" not in config and "method" in config:  # single-method configs (configs/peers.py)
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.methods = config.method
            config.method_kwargs = {config.method: config.method_kwargs.to_dict()}
    methods = [m for m in config.methods.split(",") if m]
    if not methods:
        raise ValueError("config.methods is empty; e.g. --config.methods=wiener,optimal")
    unknown = [m for m in methods if m not in denoisers.names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {denoisers.names()}")
    logging.info("loading %s[%s] limit=%s", config.dataset, config.split, config.limit)
    with common.Timer() as t_load:
        train = data.load(
            config.dataset, split=config.split, resolution=config.resolution, limit=config.limit
        )
    with common.Timer() as t_stats:
        st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    logging.info(
        "data %s in %.1fs; statistics in %.1fs (fingerprint %s)",
        train.shape,
        t_load.seconds,
        t_stats.seconds,
        st.fingerprint,
    )
    sched = schedules.ddpm_linear()
    key = jax.random.key(config.seed)
    x_T = jax.random.normal(key, (config.num_samples,) + train.shape[1:], jnp.float32)
    out = {
        "dataset": config.dataset,
        "num_train": int(train.shape[0]),
        "shape": train.shape[1:],
        "stats_fingerprint": st.fingerprint,
        "load_seconds": t_load.seconds,
        "stats_seconds": t_stats.seconds,
        "methods": {},
    }
    finals = {}
    lines = [
        f"dataset {config.dataset} ({train.shape[0]} images {train.shape[1:]}), "
        f"{config.num_samples} samples, {config.sampler} {config.num_steps} steps, "
        f"seed {config.seed}"
    ]
    for method in methods:
        kwargs = config.method_kwargs.get(method, {}) if method in config.method_kwargs else {}
        kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
        den = build(
            method, kwargs, train, st, config.get("shard", False), config.get("progress", True)
        )
        logging.info("sampling %s %s", method, kwargs)
        with common.Timer() as t:
            if config.sampler == "ddim":
                res = sampling.ddim(
                    den, x_T, sched, config.num_steps, progress=config.get("progress", True)
                )
            elif config.sampler == "ddpm":
                res = sampling.ddpm(
                    den,
                    x_T,
                    sched,
                    key=jax.random.fold_in(key, 1),
                    num_steps=config.num_steps,
                    progress=config.get("progress", True),
                )
            elif config.sampler == "edm":
                sig = schedules.edm_sigmas(config.num_steps)
                res = sampling.edm(den, x_T * sig[0], sig)
            else:
                raise ValueError(f"sampler must be ddim, ddpm or edm; got {config.sampler!r}")
        imgs = np.asarray(res.images)
        finals[method] = imgs
        dist, near = nearest_distance(imgs, train)
        info = {
            "seconds": t.seconds,
            "kwargs": kwargs,
            "nearest_train_l2_median": float(np.median(dist)),
            "nearest_train_l2_min": float(np.min(dist)),
            "nearest_train_l2": [float(v) for v in dist],
            "pixel_mean": float(imgs.mean()),
            "pixel_std": float(imgs.std()),
            "fraction_outside_unit_range": float(np.mean(np.abs(imgs) > 1.0)),
        }
        if hasattr(den, "prepare"):
            info["mask_density_per_step"] = {
                int(t_): d
                for t_, d in zip(res.timesteps, den.prepare(res.abs).densities().values())
            }
            paths = [p.path for p in den.prepare(res.abs).plans.plans]
            info["path_per_step"] = {int(t_): p for t_, p in zip(res.timesteps, paths)}
            logging.info("%s mask density per step: %s", method, info["mask_density_per_step"])
        out["methods"][method] = info
        plotting.save_image_grid(
            imgs,
            os.path.join(workdir, f"samples_{method}.png"),
            title=f"{method} ({config.sampler}, {config.num_steps} steps)",
        )
        k = min(8, len(imgs))
        rows = {
            f"t={int(t_)}": np.asarray(res.x0_hats[s, :k]) for s, t_ in enumerate(res.timesteps)
        }
        rows["nearest train"] = near[:k]
        plotting.save_rows(
            rows,
            os.path.join(workdir, f"x0_steps_{method}.png"),
            title=f"{method}: x0_hat per step (columns = samples)",
        )
        save_nearest_pairs(
            imgs,
            near,
            dist,
            os.path.join(workdir, f"nearest_{method}.png"),
            f"{method}: sample | nearest of the {len(train)} training images, "
            "by L2 (closest first)",
        )
        lines.append(
            f"  {method:14s} {t.seconds:7.1f}s  median L2 to nearest training image "
            f"{np.median(dist):.3f}  -> samples_{method}.png, x0_steps_{method}.png, "
            f"nearest_{method}.png"
        )
    pair = {}
    for a in methods:
        for b in methods:
            if a < b:
                pair[f"{a}_vs_{b}"] = {
                    "r2": float(metrics.r2(finals[a], finals[b])),
                    "mse": float(metrics.mse(finals[a], finals[b])),
                }
    out["pairwise_final"] = pair
    np.savez(os.path.join(workdir, "samples.npz"), x_T=np.asarray(x_T), **finals)
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    lines.append(f"metrics: {os.path.join(workdir, 'metrics.json')}")
    summary = "\n".join(lines)
    common.atomic_write_text(os.path.join(workdir, "summary.txt"), summary + "\n")
    return summary


if __name__ == "__main__":
    common.run_as_program(run, "configs/sample.py:<method>,<dataset>")
