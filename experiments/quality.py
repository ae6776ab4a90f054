"""Measured sample quality of trained networks (see configs/quality.py for the commands).

For each network: ``num_samples`` images from the same initial noise (the paper's 10-step DDIM
by default), their Frechet distance to real held-out images in the feature space of a classifier
trained on the training split (:mod:`locality.quality`, :mod:`locality.classify`), the fraction
of samples that classifier labels with confidence above ``confidence``, and the held-out eps-MSE
at t = 100, 300, 500, 700, 900 with per-image standard errors (the same noise for every net).
The distance between two sets of *real* images of the same sizes (training vs held-out) is
reported as the floor a perfect generator would reach with these sample sizes.

Writes to ``--workdir``: ``metrics.json``, ``table.md``, ``samples_<label>.png`` (the first 64
samples), ``quality.png`` (distance and eps-MSE per network) and ``summary.txt``. The measures
are :mod:`locality.quality` and :mod:`locality.evaluation`, the sampling
:mod:`locality.generation`.
"""

from __future__ import annotations

import glob
import os
import re

import jax
import numpy as np
from absl import logging

from experiments import common
from locality import classify, data, denoisers, evaluation, generation, plotting, quality


def parse_networks(spec: str, dataset: str) -> dict:
    """``"a=path,b=path"`` -> ``{"a": path, ...}`` (:func:`experiments.common.parse_networks`);
    ``""`` -> the committed CPU UNet of ``dataset`` and the exports
    ``checkpoints/<dataset>_unet_long/epoch_*`` that exist."""
    if spec.strip():
        return common.parse_networks(spec)
    out = {}
    if os.path.isdir(f"checkpoints/{dataset}_unet_cpu"):
        out["cpu (committed)"] = f"checkpoints/{dataset}_unet_cpu"
    for path in sorted(glob.glob(f"checkpoints/{dataset}_unet_long/epoch_*")):
        out[f"long {os.path.basename(path).replace('_', ' ')}"] = path
    if not out:
        raise ValueError(f"no networks found for {dataset}; pass --config.networks='label=path'")
    return out


def heldout_split(config):
    """``(train images, train labels, held-out images, held-out labels)``: the test split, or
    for ``holdout > 0`` the class-balanced part of the training split that training held out."""
    train, labels = data.load(config.dataset, split="train", with_labels=True)
    if config.holdout > 0:
        keep, held = classify.balanced_split(labels, config.holdout, config.holdout_seed)
        return train[keep], labels[keep], train[held], labels[held]
    test, test_labels = data.load(config.dataset, split="test", with_labels=True)
    return train, labels, test, test_labels


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    nets = parse_networks(config.networks, config.dataset)
    train, train_labels, held, held_labels = heldout_split(config)
    rng = np.random.default_rng(config.seed)
    real = held[np.sort(rng.permutation(len(held))[: config.num_real])]
    real_train = train[np.sort(rng.permutation(len(train))[: len(real)])]
    with common.Timer() as t_clf:
        clf = classify.cached_classifier(
            train,
            train_labels,
            os.path.join(os.path.dirname(common.stats_cache_dir()), "classifiers"),
            holdout=config.classifier_holdout,
            epochs=config.classifier_epochs,
            seed=config.classifier_seed,
            flip=config.classifier_flip,
            progress=config.progress,
        )
    test_acc = float(np.mean(clf.predict(held) == held_labels))
    feats_real = clf.features(real)
    floor = quality.frechet_distance_of(clf.features(real_train), feats_real)
    logging.info(
        "classifier: accuracy %.4f on %d held-out images (%.0fs); real-vs-real FD %.3f",
        test_acc,
        len(held),
        t_clf.seconds,
        floor,
    )

    x_T = np.asarray(
        jax.random.normal(jax.random.key(config.seed), (config.num_samples,) + train.shape[1:])
    )
    eval_images = held[: config.eval_count]
    out = {
        "dataset": config.dataset,
        "sampler": config.sampler,
        "num_steps": config.num_steps,
        "num_samples": config.num_samples,
        "num_real": len(real),
        "heldout": "test split"
        if config.holdout <= 0
        else f"class-balanced {config.holdout:.0%} of train (seed {config.holdout_seed})",
        "classifier": {
            "heldout_accuracy": test_acc,
            "heldout_size": len(held),
            "internal_holdout_accuracy": clf.holdout_accuracy,
            "train_size": len(train),
            "epochs": config.classifier_epochs,
        },
        "real_vs_real_fd": floor,
        "timesteps": list(quality.HELDOUT_TIMESTEPS),
        "networks": {},
    }
    table = evaluation.quality_header(config.confidence)
    for label, path in nets.items():
        den = denoisers.make("network", checkpoint=path)
        with common.Timer() as t:
            imgs = generation.sample_in_batches(
                den, x_T, config.sampler, config.num_steps, config.seed
            )
            per = quality.eps_mse(den.model.apply, den.params, eval_images, seed=config.seed)
            rec = evaluation.network_quality(clf, imgs, feats_real, per, config.confidence)
        rec = {
            "checkpoint": path,
            **evaluation.describe(path, len(train), config.holdout, config.holdout_seed),
            **rec,
            "seconds": t.seconds,
        }
        out["networks"][label] = rec
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
        plotting.save_image_grid(
            imgs[:64],
            os.path.join(workdir, f"samples_{safe}.png"),
            ncols=8,
            title=f"{label}: {config.sampler} {config.num_steps} steps, FD {rec['fd']:.2f}",
        )
        table.append(evaluation.quality_row(label, rec))
        logging.info(
            "%s: FD %.3f, confident %.3f, eps-MSE %.5f (%.0fs)",
            label,
            rec["fd"],
            rec["confident_fraction"],
            rec["eps_mse_mean"],
            t.seconds,
        )
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    common.atomic_write_text(os.path.join(workdir, "table.md"), "\n".join(table) + "\n")
    plotting.save_bars(
        {label: r["fd"] for label, r in out["networks"].items()},
        os.path.join(workdir, "quality.png"),
        ylabel="Frechet distance (classifier features)",
        reference=(floor, "real vs real (floor)"),
        title=f"{config.dataset}: {config.num_samples} samples vs {len(real)} "
        f"real held-out images (lower is better)",
    )
    lines = [
        f"{config.dataset}: {len(nets)} networks, {config.num_samples} samples each "
        f"({config.sampler}, {config.num_steps} steps) vs {len(real)} real held-out images",
        f"classifier accuracy {test_acc:.4f} on {len(held)} held-out images; real-vs-real "
        f"FD {floor:.3f}",
        *table,
    ]
    return common.write_summary(workdir, lines)


if __name__ == "__main__":
    common.run_as_program(run, "configs/quality.py:<dataset>")
