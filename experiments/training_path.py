"""r2 of every analytical denoiser against a network, as a function of the network's training.

    python -m experiments.training_path --config configs/training_path.py:fashion_mnist \
        --workdir results/training_path_fashion_mnist

Does a diffusion network move toward ``pca_locality``, toward the Wiener filter or toward the
optimal (memorising) denoiser as it learns? Each method's DDIM trajectories are sampled once
from the shared noise (they do not depend on the network); each network samples its own from the
same noise. Per (network, method): the final-step trajectory r2 (mean, standard error over
samples, median) and the single-step r2 averaged over steps (the network evaluated on the
method's own states). Per network: every method against the best one, paired over samples
(:func:`locality.metrics.paired_comparison`: mean difference with paired SE, wins, sign test).

Writes ``r2_vs_epochs.png`` (one line per method, error bars = 1 SE), ``table.md``,
``metrics.json`` (with the per-sample r2) and ``summary.txt`` to ``--workdir``. The per-network
records are :mod:`locality.evaluation`.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from locality import classify, data, denoisers, evaluation, metrics, plotting, schedules, stats
from locality.comparison import build, sample_batches


def parse_networks(spec: str, dataset: str) -> dict:
    """``"a=path,..."`` -> ``{"a": path}`` (:func:`experiments.common.parse_networks`);
    ``""`` -> the long run's exports ``epoch_*``."""
    if spec.strip():
        return common.parse_networks(spec)
    found = sorted(glob.glob(f"checkpoints/{dataset}_unet_long/epoch_*"))
    if not found:
        raise ValueError(
            f"no exports under checkpoints/{dataset}_unet_long/; train the long run "
            f"(configs/train.py:{dataset},long) or pass --config.networks"
        )
    return {os.path.basename(p): p for p in found}


def training_set(config):
    """The networks' training images: the train split, minus the class-balanced held-out part
    when ``holdout > 0`` (the split of the long preset, same seed)."""
    if config.holdout > 0:
        train, labels = data.load(config.dataset, split="train", with_labels=True)
        keep, _ = classify.balanced_split(labels, config.holdout, config.holdout_seed)
        return train[keep]
    return data.load(config.dataset, split="train")


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    nets = parse_networks(config.networks, config.dataset)
    train = training_set(config)
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    sched = schedules.ddpm_linear()
    x_T = np.asarray(
        jax.random.normal(
            jax.random.key(config.seed), (config.num_samples,) + train.shape[1:], jnp.float32
        )
    )
    methods = [m for m in config.methods.split(",") if m]
    if not methods:
        raise ValueError("methods is empty; e.g. --config.methods=pca_locality,wiener,optimal")

    net_runs, info = {}, {}
    for label, path in nets.items():
        den = denoisers.make("network", checkpoint=path)
        x0, _, abs_, ts = sample_batches(den, x_T, sched, config.num_steps, config.batch_size)
        net_runs[label] = (den, x0)
        info[label] = evaluation.describe(path, len(train), config.holdout, config.holdout_seed)
    order = sorted(nets, key=lambda l: info[l]["epochs"])

    per_sample = {l: {} for l in order}  # network -> method -> final trajectory r2 [N]
    single = {l: {} for l in order}  # network -> method -> single-step r2, step mean
    seconds = {}
    for m in methods:
        kw = config.method_kwargs[m].to_dict() if m in config.method_kwargs else {}
        with common.Timer() as t:
            _, den = build(m, kw, train, st)
            x0, xt, abs_, ts = sample_batches(den, x_T, sched, config.num_steps, config.batch_size)
        seconds[m] = t.seconds
        for label in order:
            net, net_x0 = net_runs[label]
            per_sample[label][m] = metrics.per_step(x0, net_x0, reduce="none")["r2"][-1]
            r2 = evaluation.single_step_r2(net, x0, xt, abs_, config.batch_size)
            single[label][m] = r2.mean(0)
        logging.info(
            "%s sampled in %.0fs; final r2 vs %s: %.3f",
            m,
            t.seconds,
            order[-1],
            per_sample[order[-1]][m].mean(),
        )

    n = config.num_samples
    out = {
        "dataset": config.dataset,
        "train_size": len(train),
        "num_samples": n,
        "methods": methods,
        "method_seconds": seconds,
        "networks": {},
    }
    md = [
        f"{config.dataset}: final-step trajectory r2 against the network (mean ± SE over {n} "
        f"samples; all methods on the same {len(train)} training images)",
        "",
        "| network | epochs | " + " | ".join(methods) + " | best | paired verdicts vs best |",
        "|---|---|" + "---|" * len(methods) + "---|---|",
    ]
    for label in order:
        r = {m: per_sample[label][m] for m in methods}
        rec = evaluation.path_record(r, single[label], n)
        out["networks"][label] = {**info[label], "checkpoint": nets[label], **rec}
        md.append(evaluation.path_row(label, info[label]["epochs"], r, rec, n))
    epochs = [info[l]["epochs"] for l in order]
    plotting.save_series(
        [
            {
                "label": m,
                "x": epochs,
                "y": [per_sample[l][m].mean() for l in order],
                "yerr": [per_sample[l][m].std(ddof=1) / np.sqrt(n) for l in order],
                "color": plotting.method_color(m),
                "marker": "o",
            }
            for m in methods
        ],
        os.path.join(workdir, "r2_vs_epochs.png"),
        xlabel="network training (epochs)",
        ylabel="final-step r2 vs network",
        logx=min(epochs) > 0,
        title=f"{config.dataset}: which denoiser does the network approach as it trains?",
    )
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    common.atomic_write_text(os.path.join(workdir, "table.md"), "\n".join(md) + "\n")
    return common.write_summary(workdir, md)


if __name__ == "__main__":
    common.run_as_program(run, "configs/training_path.py:<dataset>[,quick]")
