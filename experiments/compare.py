"""Compare analytical denoisers with a trained network along DDIM trajectories
(docs/algorithms.md §10).

    python -m experiments.compare --config configs/compare.py:fashion_mnist \
        --workdir workdirs/compare_fashion_mnist

Writes ``table.md`` / ``table.csv`` (final-step mean and median r2, high-pass r2, MSE, Pearson r;
trajectory and single-step; the training-set size N of every row), ``r2_vs_t.png``,
``hp_r2_vs_t.png``, ``mse_vs_t.png``, ``grid.png`` (network, each method and the training image
nearest to the network's sample), ``metrics.json`` and ``config.json``.
A method label maps to the registered method of the same name, or to
``method_kwargs.<label>.method``. The rows are computed by :mod:`locality.comparison`, the
options below by :mod:`locality.comparison_options`, tables and curves drawn by
:mod:`locality.comparison_tables`.

Options that make the rows comparable (configs/compare.py):

* ``hp_sigma``: every row also gets the high-pass r2 (:func:`locality.metrics.hp_r2`), the r2 of
  ``x - G_sigma * x``, which does not reward blur.
* ``common_subset = N > 0``: after the main table every row is run again with every method on
  one common random subset of N training images (:func:`locality.comparison.subset`, the run's
  seed; statistics of pca_locality / Wiener from that subset too) and stored under
  ``metrics.json["subset"]`` and a second table (``table_subset.csv``). ``linear`` (weights fitted
  to the full set elsewhere) is skipped there, with the reason.
* ``calibrate_peers``: LS's per-step patch size is calibrated against the network being explained
  (:func:`locality.denoisers.calibration.cached_calibrate`, Kamb & Ganguli's cosine criterion on
  ``calibration.num_probes`` probe trajectories from noise independent of the evaluation noise,
  on this run's DDIM grid) and used for LS, ELS and bbELS as Kamb & Ganguli do; PSPC-Square
  (whose only published schedule is Niedoba et al.'s CIFAR-10 EDM table) is calibrated with its
  own machine. Rows ``<label>_calibrated`` appear beside the published ones; the schedules are
  copied to ``schedule_<family>_calibrated.json`` and summarised in ``metrics.json["calibration"]``;
  the cache lives in ``experiments.common.stats_cache_dir()/calibration``, keyed by content.
* ``scfdm_sigmas``: SCFDM's smoothing scale ``sigma_s`` swept; every scale is its own row
  (``scfdm_s<sigma>``, the configured scale keeps the label ``scfdm``), listed in
  ``metrics.json["scfdm_sweep"]``. The scale is picked on probe trajectories, never on the
  evaluation samples (:func:`locality.comparison_options.select_scfdm`): every swept scale is
  sampled from ``scfdm_probe_samples`` probe noises (0: ``calibration.num_probes``; drawn from
  ``fold_in(key(seed), 2)``, independent of the evaluation noise and of the calibration probes)
  and compared with the network sampled from the same probes; the scale with the best mean
  final-step trajectory r2 (the first on a tie) is stored in ``metrics.json["scfdm_selection"]``
  (``sigmas``, ``probe_r2``, ``best_sigma``, ``num_probes``) and evaluated like any other row as
  ``scfdm_best``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from experiments import common
from locality import comparison, data, denoisers, plotting, schedules, stats
from locality import comparison_options as options
from locality import comparison_tables as tables_lib
from locality.comparison import subset  # noqa: F401  (re-exported: the per-method subsets)


def synthetic_images(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """``n`` locally correlated [size, size, 1] images in (-1, 1) (float32): a smoke-test set at
    the resolution of the committed 28 px networks."""
    z = np.random.default_rng(seed).normal(size=(n, size + 2, size + 2, 1))
    return np.tanh((z[:, :-2, :-2] + z[:, 1:-1, 1:-1] + z[:, 2:, 2:]) / 2).astype(np.float32)


def load_train(config) -> np.ndarray:
    """The training set: ``config.dataset`` via :func:`locality.data.load` (minus the
    ``holdout``), ``synthetic`` (:func:`synthetic_images`, 40 images) or ``npy:PATH``."""
    if config.dataset == "synthetic":
        return synthetic_images(config.limit or 40)
    if config.dataset.startswith("npy:"):
        arr = np.load(config.dataset[len("npy:") :])
        return arr[: config.limit] if config.limit else arr
    train = data.load(config.dataset, split=config.split, limit=config.limit)
    if config.get("holdout", 0.0) > 0:  # the network's own training set (configs/train.py long)
        from locality import classify

        _, labels = data.load(
            config.dataset, split=config.split, limit=config.limit, with_labels=True
        )
        keep, _ = classify.balanced_split(labels, config.holdout, config.get("holdout_seed", 0))
        train = train[keep]
    return train


def protocol(config) -> comparison.Protocol:
    """The config's fields of :class:`locality.comparison.Protocol` (checked when built)."""
    names = {f.name for f in dataclasses.fields(comparison.Protocol)} - {"calibration"}
    kw = {k: v for k, v in config.to_dict().items() if k in names}
    cal = comparison.CalibrationSettings(**config.get("calibration", {}))
    return comparison.Protocol(**kw, calibration=cal, cache_dir=common.stats_cache_dir())


def command(config, workdir: str) -> str:
    """The command line that reproduces this run."""
    if sys.argv and sys.argv[0].endswith("compare.py"):
        return "python -m experiments.compare " + " ".join(sys.argv[1:])
    return (
        f"python -m experiments.compare --config configs/compare.py:{config.dataset} "
        f"--workdir {workdir}"
    )


def run(config, workdir: str) -> str:
    proto = protocol(config)
    common.prepare_workdir(workdir, config)
    train = load_train(config)
    st = stats.gaussian_stats(train, cache_dir=proto.cache_dir)
    sched = schedules.ddpm_linear()
    net = denoisers.make("network", checkpoint=config.checkpoint)
    ref = comparison.reference_run(net, train.shape[1:], proto, sched)
    kwargs = config.method_kwargs.to_dict()
    specs = comparison.row_specs(
        config.methods, kwargs, config.slow_methods, config.peer_limit, proto.scfdm_sigmas
    )
    specs, skipped = comparison.drop_missing(specs, config.dataset)
    calib, calibrated = {}, {}
    if proto.calibrate_peers:
        calib, specs, calibrated = options.calibrate_peers(
            proto, specs, train, ref, kwargs, workdir
        )
    selection = None
    if proto.scfdm_sigmas:
        selection, specs = options.select_scfdm(proto, specs, train, ref)
    results, finals, used = comparison.evaluate_rows(proto, specs, train, st, ref, calibrated)
    cmd = command(config, workdir)
    out = {
        "dataset": config.dataset,
        "checkpoint": config.checkpoint,
        "network_seconds": ref.seconds,
        "methods": results,
        "command": cmd,
        "skipped": skipped,
        "num_samples": int(config.num_samples),
        "hp_sigma": proto.hp_sigma,
    }
    if calib:
        out["calibration"] = calib
    sweep = options.scfdm_sweep(specs, results, selection) if proto.scfdm_sigmas else None
    if sweep:
        out["scfdm_sweep"] = sweep
    if selection:
        out["scfdm_selection"] = selection
    common.atomic_write_text(os.path.join(workdir, "table.csv"), tables_lib.tables(results)[1])
    if proto.common_subset:
        out["subset"] = options.subset_rows(proto, specs, results, used, train, st, ref)
        sub_csv = tables_lib.tables(out["subset"]["methods"])[1]
        common.atomic_write_text(os.path.join(workdir, "table_subset.csv"), sub_csv)
    header = (
        f"{config.dataset}: {config.num_samples} samples, DDIM {config.num_steps} steps, "
        f"network {config.checkpoint}. Reproduce: `{cmd}`\n\n"
    )
    md = header + tables_lib.markdown(results, skipped, out.get("subset"), bool(calib))
    common.atomic_write_text(os.path.join(workdir, "table.md"), md + "\n")
    tables_lib.plot_curves(results, ref.timesteps, workdir, config.dataset, config.checkpoint)
    grid = comparison.final_grid(ref, finals, train)
    plotting.save_rows(grid, os.path.join(workdir, "grid.png"), title="final samples, shared noise")
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    return md


if __name__ == "__main__":
    common.run_as_program(run, "configs/compare.py:<dataset>")
