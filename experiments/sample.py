"""Sample from registered denoisers on a dataset from shared initial noise; write grids and metrics.

    python -m experiments.sample --config configs/sample.py:quickstart --workdir workdirs/quickstart

Writes to ``--workdir``: ``config.json`` (resolved), ``samples_<method>.png`` (final samples),
``x0_steps_<method>.png`` (x0_hat at every step for the first samples), ``nearest_<method>.png``
(every sample beside its nearest training image, closest first: copy detection), ``samples.npz``,
``metrics.json`` (timings, mask densities, distances to the nearest training image, pairwise r2
between methods) and ``summary.txt``. Building, sampling and the copy detection are
:mod:`locality.generation`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from locality import data, denoisers, generation, plotting, stats


def single_method_config(config):
    """A config of ``configs/peers.py`` (one ``method``) as one with ``methods``."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.methods = config.method
        config.method_kwargs = {config.method: config.method_kwargs.to_dict()}
    return config


def save_figures(workdir, method, imgs, res, near, dist, config, num_train) -> None:
    """``samples_<method>.png``, ``x0_steps_<method>.png`` and ``nearest_<method>.png``."""
    plotting.save_image_grid(
        imgs,
        os.path.join(workdir, f"samples_{method}.png"),
        title=f"{method} ({config.sampler}, {config.num_steps} steps)",
    )
    k = min(8, len(imgs))
    rows = {f"t={int(t_)}": np.asarray(res.x0_hats[s, :k]) for s, t_ in enumerate(res.timesteps)}
    rows["nearest train"] = near[:k]
    plotting.save_rows(
        rows,
        os.path.join(workdir, f"x0_steps_{method}.png"),
        title=f"{method}: x0_hat per step (columns = samples)",
    )
    generation.save_nearest_pairs(
        imgs,
        near,
        dist,
        os.path.join(workdir, f"nearest_{method}.png"),
        f"{method}: sample | nearest of the {num_train} training images, by L2 (closest first)",
    )


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    if "methods" not in config and "method" in config:  # single-method configs (configs/peers.py)
        config = single_method_config(config)
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
    progress = config.get("progress", True)
    for method in methods:
        kwargs = common.as_dict(config.method_kwargs.get(method, {}))
        den = generation.build(method, kwargs, train, st, config.get("shard", False), progress)
        logging.info("sampling %s %s", method, kwargs)
        with common.Timer() as t:
            res = generation.sample(
                den,
                x_T,
                config.sampler,
                config.num_steps,
                key=jax.random.fold_in(key, 1),
                progress=progress,
            )
        imgs = finals[method] = np.asarray(res.images)
        dist, near = generation.nearest_distance(imgs, train)
        info = {"seconds": t.seconds, "kwargs": kwargs, **generation.sample_summary(imgs, dist)}
        if hasattr(den, "prepare"):
            info.update(generation.plan_summary(den, res))
            logging.info("%s mask density per step: %s", method, info["mask_density_per_step"])
        out["methods"][method] = info
        save_figures(workdir, method, imgs, res, near, dist, config, len(train))
        lines.append(
            f"  {method:14s} {t.seconds:7.1f}s  median L2 to nearest training image "
            f"{np.median(dist):.3f}  -> samples_{method}.png, x0_steps_{method}.png, "
            f"nearest_{method}.png"
        )
    out["pairwise_final"] = generation.pairwise_final(finals)
    np.savez(os.path.join(workdir, "samples.npz"), x_T=np.asarray(x_T), **finals)
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    lines.append(f"metrics: {os.path.join(workdir, 'metrics.json')}")
    return common.write_summary(workdir, lines)


if __name__ == "__main__":
    common.run_as_program(run, "configs/sample.py:<method>,<dataset>")
