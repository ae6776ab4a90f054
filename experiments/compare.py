"""Compare analytical denoisers with a trained network along DDIM trajectories
(docs/algorithms.md §10).

    python -m experiments.compare --config configs/compare.py:fashion_mnist \
        --workdir workdirs/compare_fashion_mnist

Writes ``table.md`` / ``table.csv`` (final-step mean and median r2, MSE, Pearson r; trajectory and
single-step), ``r2_vs_t.png``, ``mse_vs_t.png``, ``grid.png`` (network, each method and the
training image nearest to the network's sample), ``metrics.json`` and ``config.json``.
A method label maps to the registered method of the same name, or to
``method_kwargs.<label>.method``.
"""

from __future__ import annotations

import csv
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from locality import data, denoisers, metrics, plotting, sampling, schedules, stats

NEEDS_STATS = {"wiener", "wiener_dense", "pca_locality"}
NO_TRAIN = {"wiener", "wiener_dense", "linear"}  # closed forms / fitted weights, no training set


def build(label: str, kwargs: dict, train, st):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", label)
    if method in NEEDS_STATS:
        kwargs["stats"] = st
    if method not in NO_TRAIN:
        kwargs["train"] = train
    return method, denoisers.make(method, **kwargs)


subset = common.subset  # re-exported: the per-method training subsets


def sample_batches(den, x_T, sched, num_steps, batch):
    """DDIM over ``x_T`` in batches; returns stacked x0_hats [S, N, ...], xts, abs, timesteps."""
    outs = [
        sampling.ddim(den, x_T[i : i + batch], sched, num_steps) for i in range(0, len(x_T), batch)
    ]
    return (
        np.concatenate([np.asarray(o.x0_hats) for o in outs], axis=1),
        np.concatenate([np.asarray(o.xts) for o in outs], axis=1),
        outs[0].abs,
        outs[0].timesteps,
    )


def plot_curves(results: dict, ts, workdir: str, dataset: str, network: str = "") -> None:
    """``r2_vs_t.png`` and ``mse_vs_t.png`` (trajectory metrics per step, shaded 1 SE where the
    per-step SE is stored) from ``results`` (the ``methods`` of a ``metrics.json``), so figures
    can be redrawn without resampling. One fixed colour per method
    (:func:`locality.plotting.method_color`); the r2 axis is set by the methods that matter and
    methods far below it are named in a note instead of stretching it."""
    t_axis = [int(t) for t in ts]
    where = f" vs {network}" if network else ""
    for metric in ("r2", "mse"):
        series = []
        for label, r in sorted(results.items(), key=lambda kv: -kv[1]["trajectory"]["r2"][-1]):
            se = r.get(f"trajectory_{metric}_per_step_se")
            series.append(
                {
                    "label": label,
                    "x": t_axis,
                    "y": r["trajectory"][metric],
                    "band": se,
                    "color": plotting.method_color(label),
                    "marker": "o",
                }
            )
        plotting.save_series(
            series,
            os.path.join(workdir, f"{metric}_vs_t.png"),
            xlabel="timestep t (sampling runs right to left)",
            ylabel=f"{metric} vs network (trajectory)",
            invert_x=True,
            logy=(metric == "mse"),
            ylim=plotting.focus_ylim(series) if metric == "r2" else None,
            title=f"{dataset}: {metric} per step{where}",
        )


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    train = data.load(config.dataset, split=config.split, limit=config.limit)
    if config.get("holdout", 0.0) > 0:  # the network's own training set (configs/train.py long)
        from locality import classify

        _, labels = data.load(
            config.dataset, split=config.split, limit=config.limit, with_labels=True
        )
        keep, _ = classify.balanced_split(labels, config.holdout, config.get("holdout_seed", 0))
        train = train[keep]
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    sched = schedules.ddpm_linear()
    x_T = np.asarray(
        jax.random.normal(
            jax.random.key(config.seed), (config.num_samples,) + train.shape[1:], jnp.float32
        )
    )
    net = denoisers.make("network", checkpoint=config.checkpoint)
    with common.Timer() as t_net:
        net_x0, net_xt, abs_, ts = sample_batches(
            net, x_T, sched, config.num_steps, config.batch_size
        )
    logging.info("network sampled in %.1fs", t_net.seconds)
    slow = set(filter(None, config.slow_methods.split(",")))
    results, finals, rows, skipped = {}, {"network": net_x0[-1]}, [], {}
    labels = [m for m in config.methods.split(",") if m]
    for label in labels:
        kw = config.method_kwargs[label].to_dict() if label in config.method_kwargs else {}
        limit = kw.pop("limit", None) or (config.peer_limit if label in slow else None)
        tr = subset(train, limit, config.seed)
        missing = [
            v
            for k, v in kw.items()
            if k in ("weights", "network", "checkpoint")
            and isinstance(v, str)
            and not os.path.exists(v)
        ]
        if missing:
            skipped[label] = f"{missing[0]} does not exist" + (
                "; train it with python -m experiments.linear_gd --config "
                f"configs/linear_gd.py:{config.dataset},ddim --workdir "
                f"{os.path.dirname(missing[0])}"
                if label == "linear"
                else ""
            )
            logging.warning("skipping %s: %s", label, skipped[label])
            continue
        method, den = build(label, kw, tr, st)
        with common.Timer() as t:
            x0, xt, _, _ = sample_batches(den, x_T, sched, config.num_steps, config.batch_size)
            single = np.stack(
                [
                    np.concatenate(
                        [
                            np.asarray(
                                net(jnp.asarray(xt[s, i : i + config.batch_size]), float(abs_[s]))
                            )
                            for i in range(0, len(x_T), config.batch_size)
                        ]
                    )
                    for s in range(len(ts))
                ]
            )
        traj = metrics.per_step(x0, net_x0, reduce="none")  # {metric: [S, N]}
        one = metrics.per_step(x0, single, reduce="none")
        res = {
            "method": method,
            "kwargs": kw,
            "train_size": int(len(tr)),
            "seconds": t.seconds,
            "timesteps": ts,
            "trajectory": {k: v.mean(1) for k, v in traj.items()},
            "single_step": {k: v.mean(1) for k, v in one.items()},
        }
        for kind, m in (("trajectory", traj), ("single_step", one)):
            for name, v in m.items():
                res[f"final_{kind}_{name}_mean"] = float(v[-1].mean())
                res[f"final_{kind}_{name}_median"] = float(np.median(v[-1]))
                res[f"stepmean_{kind}_{name}"] = float(v.mean())
            res[f"final_{kind}_r2_per_sample"] = [float(a) for a in m["r2"][-1]]
            for name in ("r2", "mse"):
                res[f"{kind}_{name}_per_step_se"] = [
                    float(a) for a in m[name].std(1, ddof=1) / np.sqrt(m[name].shape[1])
                ]
        results[label] = res
        finals[label] = x0[-1]
        rows.append(res)
        logging.info(
            "%s: final trajectory r2 %.3f (median %.3f), single-step r2 %.3f, %.1fs",
            label,
            res["final_trajectory_r2_mean"],
            res["final_trajectory_r2_median"],
            res["final_single_step_r2_mean"],
            t.seconds,
        )
    # table
    # At the last step (t = 0) every denoiser is close to the identity, so single-step agreement is
    # reported as the mean over all steps; the trajectory comparison is reported at the last step.
    cols = [
        "final_trajectory_r2_mean",
        "final_trajectory_r2_median",
        "final_trajectory_mse_mean",
        "final_trajectory_pearson_mean",
        "stepmean_trajectory_r2",
        "stepmean_single_step_r2",
        "stepmean_single_step_mse",
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "train_size"] + cols + ["seconds"])
    md = [
        "| method | N | final traj r2 mean | final traj r2 median | final traj MSE "
        "| final traj Pearson "
        "| traj r2 (mean over steps) | single-step r2 (mean over steps) "
        "| single-step MSE (mean over steps) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in sorted(results, key=lambda l: -results[l]["final_trajectory_r2_mean"]):
        r = results[label]
        w.writerow(
            [label, r["train_size"]] + [f"{r[c]:.4f}" for c in cols] + [f"{r['seconds']:.1f}"]
        )
        md.append(
            f"| {label} | {r['train_size']} | "
            + " | ".join(f"{r[c]:.3f}" for c in cols)
            + f" | {r['seconds']:.0f} |"
        )
    common.atomic_write_text(os.path.join(workdir, "table.csv"), buf.getvalue())
    cmd = (
        "python -m experiments.compare " + " ".join(sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("compare.py")
        else f"python -m experiments.compare --config configs/compare.py:{config.dataset} "
        f"--workdir {workdir}"
    )
    header = (
        f"{config.dataset}: {config.num_samples} samples, DDIM {config.num_steps} steps, "
        f"network {config.checkpoint}. Reproduce: `{cmd}`\n\n"
    )
    md += [f"\nskipped {label}: {why}" for label, why in skipped.items()]
    common.atomic_write_text(os.path.join(workdir, "table.md"), header + "\n".join(md) + "\n")
    plot_curves(results, ts, workdir, config.dataset, config.checkpoint)
    k = min(8, config.num_samples)
    nn = denoisers.make("nearest", train=train)
    grid = {"network": net_x0[-1][:k]}
    grid.update({l: finals[l][:k] for l in results})
    grid["nearest train"] = np.asarray(nn(jnp.asarray(net_x0[-1][:k]), 0.5))
    plotting.save_rows(grid, os.path.join(workdir, "grid.png"), title="final samples, shared noise")
    common.write_json(
        os.path.join(workdir, "metrics.json"),
        {
            "dataset": config.dataset,
            "checkpoint": config.checkpoint,
            "network_seconds": t_net.seconds,
            "methods": results,
            "command": cmd,
            "skipped": skipped,
            "num_samples": int(config.num_samples),
        },
    )
    return header + "\n".join(md)


_CONFIG = None


def main(argv):
    del argv
    print(run(_CONFIG.value, flags.FLAGS.workdir))


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/compare.py:<dataset>")
    flags.DEFINE_string("workdir", None, "output directory")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
