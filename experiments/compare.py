"""Compare analytical denoisers with a trained network along DDIM trajectories
(docs/algorithms.md §10).

    python -m experiments.compare --config configs/compare.py:fashion_mnist \
        --workdir workdirs/compare_fashion_mnist

Writes ``table.md`` / ``table.csv`` (final-step mean and median r2, high-pass r2, MSE, Pearson r;
trajectory and single-step; the training-set size N of every row), ``r2_vs_t.png``,
``hp_r2_vs_t.png``, ``mse_vs_t.png``, ``grid.png`` (network, each method and the training image
nearest to the network's sample), ``metrics.json`` and ``config.json``.
A method label maps to the registered method of the same name, or to
``method_kwargs.<label>.method``.

Options that make the rows comparable (configs/compare.py):

* ``hp_sigma``: every row also gets the high-pass r2 (:func:`locality.metrics.hp_r2`), the r2 of
  ``x - G_sigma * x``, which does not reward blur.
* ``common_subset = N > 0``: after the main table every row is run again with every method on
  one common random subset of N training images (:func:`experiments.common.subset`, the run's
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
  ``metrics.json["scfdm_sweep"]``. No scale is picked: choosing the best row of the table would
  pick on the evaluation samples.
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
from locality.denoisers import calibration as calibration_lib

NEEDS_STATS = {"wiener", "wiener_dense", "pca_locality"}
NO_TRAIN = {"wiener", "wiener_dense", "linear"}  # closed forms / fitted weights, no training set
# Methods with a patch / square size and the machine whose calibrated schedule each one uses:
# LS, ELS and bbELS share LS's (Kamb & Ganguli), PSPC-Square is calibrated by itself.
CALIBRATED_BY = {"ls": "ls", "els": "ls", "bbels": "ls", "pspc_square": "pspc_square"}
# fold_in tags of the run's key for noise that must differ from the evaluation noise
PROBE_TAG = 1


def build(label: str, kwargs: dict, train, st):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", label)
    if method in NEEDS_STATS:
        kwargs["stats"] = st
    if method not in NO_TRAIN:
        kwargs["train"] = train
    return method, denoisers.make(method, **kwargs)


subset = common.subset  # re-exported: the per-method training subsets


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


def _hp_per_step(x0, ref, sigma: float) -> np.ndarray:
    """High-pass r2 of every step and sample: [S, N] (:func:`locality.metrics.hp_r2`)."""
    f = jax.jit(jax.vmap(lambda u, v: metrics.hp_r2(u, v, sigma, "none")))
    return np.asarray(f(jnp.asarray(x0), jnp.asarray(ref)))


def _se(v: np.ndarray) -> list:
    """Standard error over samples of every step of ``v`` [S, N]."""
    return [float(a) for a in v.std(1, ddof=1) / np.sqrt(v.shape[1])]


def evaluate(label, kw, tr, st, net, x_T, sched, abs_, ts, net_x0, config, hp_sigma):
    """One row: the method of ``label`` (kwargs ``kw``) on training set ``tr`` sampled from
    ``x_T`` and compared with the network (trajectory and single-step, docs/algorithms.md §10).
    Returns (the row's dict, its final x0_hat [N, H, W, C])."""
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
    hp = _hp_per_step(x0, net_x0, hp_sigma)
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
            res[f"{kind}_{name}_per_step_se"] = _se(m[name])
    res["trajectory"]["hp_r2"] = hp.mean(1)
    res["trajectory_hp_r2_per_step_se"] = _se(hp)
    res["final_trajectory_hp_r2_mean"] = float(hp[-1].mean())
    res["final_trajectory_hp_r2_median"] = float(np.median(hp[-1]))
    res["final_trajectory_hp_r2_per_sample"] = [float(a) for a in hp[-1]]
    res["stepmean_trajectory_hp_r2"] = float(hp.mean())
    logging.info(
        "%s (N %d): final trajectory r2 %.3f (median %.3f), high-pass r2 %.3f, single-step r2 "
        "%.3f, %.1fs",
        label,
        len(tr),
        res["final_trajectory_r2_mean"],
        res["final_trajectory_r2_median"],
        res["final_trajectory_hp_r2_mean"],
        res["final_single_step_r2_mean"],
        t.seconds,
    )
    return res, x0[-1]


def plot_curves(results: dict, ts, workdir: str, dataset: str, network: str = "") -> None:
    """``r2_vs_t.png``, ``mse_vs_t.png`` and (where stored) ``hp_r2_vs_t.png`` (trajectory
    metrics per step, shaded 1 SE where the per-step SE is stored) from ``results`` (the
    ``methods`` of a ``metrics.json``), so figures can be redrawn without resampling. One fixed
    colour per method (:func:`locality.plotting.method_color`; calibrated and swept variants
    dashed); the r2 axes are set by the methods that matter and methods far below them are named
    in a note instead of stretching them."""
    t_axis = [int(t) for t in ts]
    where = f" vs {network}" if network else ""
    names = ["r2", "mse"]
    if results and all("hp_r2" in r["trajectory"] for r in results.values()):
        names.append("hp_r2")
    for metric in names:
        series = []
        for label, r in sorted(results.items(), key=lambda kv: -kv[1]["trajectory"][metric][-1]):
            se = r.get(f"trajectory_{metric}_per_step_se")
            variant = "calibrated_from" in r or (r.get("method") == "scfdm" and label != "scfdm")
            series.append(
                {
                    "label": label,
                    "x": t_axis,
                    "y": r["trajectory"][metric],
                    "band": se,
                    "color": plotting.method_color(label),
                    "marker": "o",
                    "style": "--" if variant else "-",
                }
            )
        plotting.save_series(
            series,
            os.path.join(workdir, f"{metric}_vs_t.png"),
            xlabel="timestep t (sampling runs right to left)",
            ylabel=f"{metric} vs network (trajectory)",
            invert_x=True,
            logy=(metric == "mse"),
            ylim=plotting.focus_ylim(series) if metric != "mse" else None,
            title=f"{dataset}: {metric} per step{where}",
        )


TABLE_COLS = [
    "final_trajectory_r2_mean",
    "final_trajectory_r2_median",
    "final_trajectory_hp_r2_mean",
    "final_trajectory_mse_mean",
    "final_trajectory_pearson_mean",
    "stepmean_trajectory_r2",
    "stepmean_single_step_r2",
    "stepmean_single_step_mse",
]


def tables(results: dict):
    """(markdown lines, csv text) of ``results``, best final trajectory r2 first; every row
    states its training-set size N."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "train_size"] + TABLE_COLS + ["seconds"])
    # At the last step (t = 0) every denoiser is close to the identity, so single-step agreement
    # is reported as the mean over all steps; the trajectory comparison at the last step.
    md = [
        "| method | N | final traj r2 mean | final traj r2 median | final traj high-pass r2 "
        "| final traj MSE | final traj Pearson "
        "| traj r2 (mean over steps) | single-step r2 (mean over steps) "
        "| single-step MSE (mean over steps) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in sorted(results, key=lambda l: -results[l]["final_trajectory_r2_mean"]):
        r = results[label]
        w.writerow(
            [label, r["train_size"]] + [f"{r[c]:.4f}" for c in TABLE_COLS] + [f"{r['seconds']:.1f}"]
        )
        md.append(
            f"| {label} | {r['train_size']} | "
            + " | ".join(f"{r[c]:.3f}" for c in TABLE_COLS)
            + f" | {r['seconds']:.0f} |"
        )
    return md, buf.getvalue()


def _check_options(config) -> None:
    """Bad options fail before any work, naming the value and the fix."""
    n = config.get("common_subset", 0)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(
            f"config.common_subset must be an int >= 0 (0 = off), got {n!r}; e.g. "
            "--config.common_subset=100"
        )
    metrics.gaussian_kernel1d(config.get("hp_sigma", 1.0))  # raises for sigma <= 0
    for s in config.get("scfdm_sigmas", ()):
        if isinstance(s, bool) or not np.isfinite(float(s)) or float(s) < 0:
            raise ValueError(
                f"config.scfdm_sigmas holds {s!r}; every smoothing scale must be a finite "
                "number >= 0 (units of x_t), e.g. --config.scfdm_sigmas='(0.05, 0.1, 0.5)'"
            )
    if config.get("calibrate_peers", False):
        cal = config.calibration
        if int(cal.num_probes) < 1:
            raise ValueError(f"config.calibration.num_probes must be >= 1, got {cal.num_probes}")
        if cal.criterion not in ("cosine", "greedy"):
            raise ValueError(
                f"config.calibration.criterion must be 'cosine' or 'greedy', got {cal.criterion!r}"
            )


def _row_specs(config, train):
    """``[(label, kwargs, limit)]`` of the main table before calibration: the configured methods,
    then the SCFDM sweep after each SCFDM row."""
    slow = set(filter(None, config.slow_methods.split(",")))
    specs = []
    for label in [m for m in config.methods.split(",") if m]:
        kw = config.method_kwargs[label].to_dict() if label in config.method_kwargs else {}
        limit = kw.pop("limit", None) or (config.peer_limit if label in slow else None)
        specs.append((label, kw, limit))
        if kw.get("method", label) == "scfdm":
            base = float(kw.get("sigma_s", 0.1))
            for sig in config.get("scfdm_sigmas", ()):
                if float(sig) == base:
                    continue
                kw_s = dict(kw, method="scfdm", sigma_s=float(sig))
                specs.append((f"{label}_s{float(sig):g}", kw_s, limit))
    return specs


def _missing_file(label, kw, dataset):
    missing = [
        v
        for k, v in kw.items()
        if k in ("weights", "network", "checkpoint")
        and isinstance(v, str)
        and not os.path.exists(v)
    ]
    if not missing:
        return None
    return f"{missing[0]} does not exist" + (
        "; train it with python -m experiments.linear_gd --config "
        f"configs/linear_gd.py:{dataset},ddim --workdir "
        f"{os.path.dirname(missing[0])}"
        if label == "linear"
        else ""
    )


def calibrate_peers(config, specs, train, net, sched, workdir):
    """Calibrated schedules of the patch-size peers in ``specs`` and their extra rows.

    Returns (summary per calibrated machine for ``metrics.json["calibration"]``,
    ``{label: calibrated label}``, ``{calibrated label: (kwargs, limit)}``). Each machine is
    calibrated once against ``net`` on the training set of its own published row, with
    ``calibration.num_probes`` probe trajectories whose noise is drawn from
    ``fold_in(key(seed), PROBE_TAG)`` (never the evaluation noise), on this run's DDIM grid;
    the result is cached by content (:func:`locality.denoisers.calibration.cached_calibrate`).
    """
    from experiments.calibrate import default_candidates

    cal_cfg = config.calibration
    by_label = {label: (kw, limit) for label, kw, limit in specs}
    families = {}
    for label, kw, _ in specs:
        method = kw.get("method", label)
        fam = CALIBRATED_BY.get(method)
        if fam == "pspc_square" and not cal_cfg.get("pspc_square", True):
            continue
        if fam is not None:
            families.setdefault(fam, []).append(label)
    summary, extra, new_rows = {}, {}, {}
    shape = train.shape[1:]
    x_probe = jax.random.normal(
        jax.random.fold_in(jax.random.key(config.seed), PROBE_TAG),
        (int(cal_cfg.num_probes),) + shape,
        jnp.float32,
    )
    timesteps = schedules.ddim_timesteps(config.num_steps, sched.num_timesteps)
    for fam, users in families.items():
        # the machine of the family on the training set of its own published row
        if fam in by_label:
            kw, limit = by_label[fam]
        else:  # e.g. els without ls: LS on the whole training set, as Kamb & Ganguli
            kw = config.method_kwargs[fam].to_dict() if fam in config.method_kwargs else {}
            limit = kw.pop("limit", None)
        limit = cal_cfg.get("limit", 0) or limit
        tr = subset(train, limit, config.seed)
        mkw = {k: v for k, v in kw.items() if k not in ("method", "patch_size")}
        machine = denoisers.make(fam, train=tr, patch_size=3, **mkw)
        cands = list(cal_cfg.candidates) or default_candidates(fam, shape)
        res = calibration_lib.cached_calibrate(
            net,
            machine,
            cands,
            x_probe,
            cache_dir=common.stats_cache_dir(),
            sched=sched,
            num_steps=config.num_steps,
            timesteps=timesteps,
            criterion=cal_cfg.criterion,
            name=f"{fam}_{config.dataset}",
        )
        cal = res.calibration
        path = os.path.join(workdir, f"schedule_{fam}_calibrated.json")
        cal.to_json(
            path,
            name=f"{fam}_{config.dataset}_calibrated",
            method=fam,
            dataset=config.dataset,
            reference=config.checkpoint,
            cache=res.path,
            content=res.key,
        )
        summary[fam] = {
            "method": fam,
            "used_by": [f"{u}_calibrated" for u in users],
            "sizes": cal.sizes,
            "abs": cal.abs,
            "timesteps": cal.timesteps,
            "per_seed": cal.per_seed,
            "candidates": list(cal.candidates),
            "criterion": cal.criterion,
            "num_probes": int(cal_cfg.num_probes),
            "probe_noise": f"normal(fold_in(key({config.seed}), {PROBE_TAG}))",
            "train_size": int(len(tr)),
            "schedule": path,
            "cache": res.path,
            "cache_hit": bool(res.hit),
            "seconds": float(res.seconds),
            "content": res.key,
        }
        logging.info(
            "%s calibrated (%s, %.1fs%s): sizes %s",
            fam,
            cal.criterion,
            res.seconds,
            ", from the cache" if res.hit else "",
            cal.sizes.tolist(),
        )
        for u in users:
            ukw, ulimit = by_label[u]
            new = f"{u}_calibrated"
            extra[u] = new
            new_rows[new] = (
                dict(ukw, method=ukw.get("method", u), patch_size="file:" + path),
                ulimit,
            )
    return summary, extra, new_rows


def run(config, workdir: str) -> str:
    _check_options(config)
    common.prepare_workdir(workdir, config)
    train = load_train(config)
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    sched = schedules.ddpm_linear()
    hp_sigma = float(config.get("hp_sigma", 1.0))
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
    specs = _row_specs(config, train)
    skipped = {}
    for label, kw, _ in specs:
        why = _missing_file(label, kw, config.dataset)
        if why:
            skipped[label] = why
            logging.warning("skipping %s: %s", label, why)
    specs = [sp for sp in specs if sp[0] not in skipped]
    calib, new_rows = {}, {}
    if config.get("calibrate_peers", False):
        calib, extra, new_rows = calibrate_peers(config, specs, train, net, sched, workdir)
        ordered = []
        for label, kw, limit in specs:
            ordered.append((label, kw, limit))
            if label in extra:
                ordered.append((extra[label],) + new_rows[extra[label]])
        specs = ordered
    results, finals, used = {}, {"network": net_x0[-1]}, {}
    args = (net, x_T, sched, abs_, ts, net_x0, config, hp_sigma)
    for label, kw, limit in specs:
        tr = subset(train, limit, config.seed)
        results[label], finals[label] = evaluate(label, kw, tr, st, *args)
        if label in new_rows:
            results[label]["calibrated_from"] = CALIBRATED_BY[results[label]["method"]]
        used[label] = tr
    md, csv_text = tables(results)
    common.atomic_write_text(os.path.join(workdir, "table.csv"), csv_text)
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
    out = {
        "dataset": config.dataset,
        "checkpoint": config.checkpoint,
        "network_seconds": t_net.seconds,
        "methods": results,
        "command": cmd,
        "skipped": skipped,
        "num_samples": int(config.num_samples),
        "hp_sigma": hp_sigma,
    }
    if calib:
        out["calibration"] = calib
    sweep = [label for label, kw, _ in specs if kw.get("method", label) == "scfdm"]
    if config.get("scfdm_sigmas", ()) and sweep:
        out["scfdm_sweep"] = {
            "sigmas": {
                label: float(results[label]["kwargs"].get("sigma_s", 0.1)) for label in sweep
            },
            "selected": None,
            "note": "every smoothing scale is its own row; none is selected (picking the best "
            "row would pick on the evaluation samples)",
        }
    n_common = int(config.get("common_subset", 0))
    if n_common:
        common_tr = subset(train, n_common, config.seed)
        st_common = (
            st
            if common_tr is train
            else stats.gaussian_stats(common_tr, cache_dir=common.stats_cache_dir())
        )
        sub_results, sub_skipped = {}, {}
        for label, kw, _ in specs:
            method = kw.get("method", label)
            if method == "linear":
                sub_skipped[label] = (
                    "GD-trained weights are fitted to the full training set elsewhere "
                    "(experiments/linear_gd.py); not re-fitted on the subset"
                )
                continue
            if np.array_equal(used[label], common_tr) and (
                method not in NEEDS_STATS or common_tr is train
            ):
                sub_results[label] = dict(results[label])  # same inputs: the same row
                continue
            kw_sub = dict(kw)
            sub_results[label], _ = evaluate(label, kw_sub, common_tr, st_common, *args)
            if "calibrated_from" in results[label]:
                sub_results[label]["calibrated_from"] = results[label]["calibrated_from"]
        out["subset"] = {
            "size": int(len(common_tr)),
            "seed": int(config.seed),
            "methods": sub_results,
            "skipped": sub_skipped,
        }
        sub_md, sub_csv = tables(sub_results)
        common.atomic_write_text(os.path.join(workdir, "table_subset.csv"), sub_csv)
        md += [
            "",
            f"Like with like: every method on the same {len(common_tr)} training images (random "
            f"subset, seed {config.seed}; pca_locality / Wiener statistics from the subset too"
            + ("; calibrated rows keep the schedule calibrated above" if calib else "")
            + ").",
            "",
        ] + sub_md
        md += [f"\nskipped {label} on the subset: {why}" for label, why in sub_skipped.items()]
    common.atomic_write_text(os.path.join(workdir, "table.md"), header + "\n".join(md) + "\n")
    plot_curves(results, ts, workdir, config.dataset, config.checkpoint)
    k = min(8, config.num_samples)
    nn = denoisers.make("nearest", train=train)
    grid = {"network": net_x0[-1][:k]}
    grid.update({l: finals[l][:k] for l in results})
    grid["nearest train"] = np.asarray(nn(jnp.asarray(net_x0[-1][:k]), 0.5))
    plotting.save_rows(grid, os.path.join(workdir, "grid.png"), title="final samples, shared noise")
    common.write_json(os.path.join(workdir, "metrics.json"), out)
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
