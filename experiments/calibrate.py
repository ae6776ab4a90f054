"""Calibrate the per-step patch size of a peer machine against a trained network.

    python -m experiments.calibrate --config configs/calibrate.py:ls,fashion_mnist \
        --workdir workdirs/calibrate_ls_fmnist

Along the reference network's own deterministic DDIM trajectory (``config.num_seeds`` seeds), at
every step the machine (``ls``, ``els``, ``bbels`` or ``pspc_square``) is evaluated at every
candidate size on the network's ``(x_t, ab)`` and the size is chosen by Kamb & Ganguli's cosine
criterion (median over seeds) and/or the greedy MSE criterion
(:func:`locality.denoisers.calibration.calibrate`). The training images come from
:func:`experiments.common.load_images` (a dataset name, ``synthetic`` or ``npy:PATH``).

Writes to ``--workdir``: ``config.json``, ``schedule_<method>_<criterion>.json`` (a size schedule:
use it with ``patch_size="file:PATH"``), ``schedule_<method>.png`` (size against the step's t),
``metrics.json`` (per-step, per-seed choices and scores) and ``summary.txt``. ``config.output``
additionally copies the (first) schedule to that path.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from locality import denoisers, plotting, schedules
from locality.denoisers.calibration import calibrate, cosine_legacy_sampler, default_candidates
from locality.denoisers.patch_schedules import SizeSchedule

METHODS = ("ls", "els", "bbels", "pspc_square")


def grid(config):
    """(schedule, timesteps, t-for-plots, x-label) of the calibration trajectory."""
    if config.grid == "ddpm":
        sched = schedules.ddpm_linear()
        ts = (
            np.asarray(config.timesteps, np.int32)
            if len(config.timesteps)
            else schedules.ddim_timesteps(config.num_steps, sched.num_timesteps)
        )
        return sched, ts, ts.astype(float), "DDPM timestep t"
    if config.grid == "cosine_legacy":
        sched, ts = cosine_legacy_sampler(config.num_steps)
        return sched, ts, ts / float(config.num_steps), "cosine-legacy t"
    raise ValueError(f"config.grid must be 'ddpm' or 'cosine_legacy'; got {config.grid!r}")


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    if config.method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}; got {config.method!r}")
    criteria = ["cosine", "greedy"] if config.criterion == "both" else [config.criterion]
    train = common.load_images(config, config.split, config.limit)
    logging.info("training set %s", train.shape)
    machine = denoisers.make(config.method, train=train, **common.as_dict(config.method_kwargs))
    ref_kwargs = common.as_dict(config.reference_kwargs)
    if config.reference != "network":
        ref_kwargs.setdefault("train", train)
    reference = denoisers.make(config.reference, **ref_kwargs)
    cands = list(config.candidates) or default_candidates(config.method, train.shape[1:])
    sched, ts, t_plot, xlabel = grid(config)
    x_T = jax.random.normal(
        jax.random.key(config.seed), (config.num_seeds,) + train.shape[1:], jnp.float32
    )
    out = {
        "method": config.method,
        "dataset": config.dataset,
        "num_train": int(train.shape[0]),
        "reference": config.reference,
        "candidates": cands,
        "grid": config.grid,
        "timesteps": ts.tolist(),
        "results": {},
    }
    lines = [
        f"{config.method} on {config.dataset} ({train.shape[0]} images) vs "
        f"{config.reference}; {config.grid} grid, {len(ts)} steps, {config.num_seeds} seeds"
    ]
    curves, paths = {}, []
    for crit in criteria:
        with common.Timer() as timer:
            cal = calibrate(
                reference,
                machine,
                cands,
                x_T,
                sched=sched,
                num_steps=len(ts),
                timesteps=ts,
                criterion=crit,
            )
        name = f"{config.method}_{config.dataset}_{crit}"
        path = os.path.join(workdir, f"schedule_{config.method}_{crit}.json")
        cal.to_json(
            path,
            name=name,
            method=config.method,
            dataset=config.dataset,
            reference=config.reference,
            grid=config.grid,
        )
        paths.append(path)
        curves[f"{crit} (median over seeds)"] = [int(k) for k in cal.sizes]
        out["results"][crit] = {
            "sizes": cal.sizes,
            "abs": cal.abs,
            "per_seed": cal.per_seed,
            "scores": np.where(np.isnan(cal.scores), -1.0, cal.scores),
            "seconds": timer.seconds,
            "schedule": path,
        }
        lines.append(
            f"  {crit:7s} sizes (high -> low noise): {' '.join(map(str, cal.sizes))}  "
            f"[{timer.seconds:.1f}s] -> {path}"
        )
        logging.info("%s: %s", crit, cal.sizes)
    if config.output:
        SizeSchedule.from_json(paths[0]).to_json(config.output)
        lines.append(f"  copied {paths[0]} -> {config.output}")
    png = os.path.join(workdir, f"schedule_{config.method}.png")
    plotting.save_curves(
        t_plot,
        curves,
        png,
        xlabel=xlabel,
        ylabel="patch size",
        title=f"{config.method} calibrated against {config.reference}",
    )
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    lines.append(f"plot: {png}")
    return common.write_summary(workdir, lines)


if __name__ == "__main__":
    common.run_as_program(run, "configs/calibrate.py:<method>,<dataset>")
