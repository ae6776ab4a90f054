"""Measured sample quality of trained networks (see configs/quality.py for the commands).

For each network: ``num_samples`` images from the same initial noise (the paper's 10-step DDIM
by default), their Frechet distance to real held-out images in the feature space of a classifier
trained on the training split (:mod:`locality.quality`, :mod:`locality.classify`), the fraction
of samples that classifier labels with confidence above ``confidence``, and the held-out eps-MSE
at t = 100, 300, 500, 700, 900 with per-image standard errors (the same noise for every net).
The distance between two sets of *real* images of the same sizes (training vs held-out) is
reported as the floor a perfect generator would reach with these sample sizes.

Writes to ``--workdir``: ``metrics.json``, ``table.md``, ``samples_<label>.png`` (the first 64
samples), ``quality.png`` (distance and eps-MSE per network) and ``summary.txt``.
"""

from __future__ import annotations

import glob
import os
import re

import jax
import numpy as np
from absl import logging

from experiments import common
from locality import classify, data, denoisers, plotting, quality, sampling, schedules
from locality.train import read_checkpoint_config, resolve_checkpoint_dir


def parse_networks(spec: str, dataset: str) -> dict:
    """``"a=path,b=path"`` -> ``{"a": path, ...}``; ``""`` -> the committed CPU UNet of
    ``dataset`` and the exports ``checkpoints/<dataset>_unet_long/epoch_*`` that exist."""
    if spec.strip():
        out = {}
        for item in spec.split(","):
            label, sep, path = item.partition("=")
            if not sep or not label.strip() or not path.strip():
                raise ValueError(f"networks={spec!r}: use 'label=path,label=path'")
            if label.strip() in out:
                raise ValueError(f"networks={spec!r}: label {label.strip()!r} appears twice")
            out[label.strip()] = path.strip()
        return out
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


def sample_network(den, x_T, config, batch: int = 250) -> np.ndarray:
    sched = schedules.ddpm_linear()
    outs = []
    for s in range(0, len(x_T), batch):
        xb = x_T[s : s + batch]
        if config.sampler == "ddim":
            res = sampling.ddim(den, xb, sched, config.num_steps, progress=False)
        elif config.sampler == "ddpm":
            res = sampling.ddpm(
                den,
                xb,
                sched,
                key=jax.random.fold_in(jax.random.key(config.seed), s),
                num_steps=config.num_steps,
                progress=False,
            )
        else:
            raise ValueError(f"sampler must be ddim or ddpm; got {config.sampler!r}")
        outs.append(np.asarray(res.images))
    return np.concatenate(outs)


def describe(checkpoint: str, n_train: int, config) -> dict:
    """Step, epochs (steps x batch / training images) and whether the net trained on the
    held-out images (a net trained on all of a split that the evaluation holds a part of)."""
    meta = read_checkpoint_config(checkpoint)
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    steps = [int(p) for p in os.listdir(ckpt_dir) if p.isdigit()] or [
        int(meta["train"].get("num_steps", 0))
    ]
    tr = meta["train"]
    seen = config.holdout > 0 and not (
        float(tr.get("holdout", 0.0)) == config.holdout
        and int(tr.get("seed", 0)) == config.holdout_seed
    )
    return {
        "step": max(steps),
        "epochs": max(steps) * int(tr["batch_size"]) / n_train,
        "trained_on_heldout": bool(seen),
    }


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
    header = (
        "| network | epochs | FD (classifier) | confident > %.1f | eps-MSE mean | "
        % config.confidence
        + " | ".join(f"t={t}" for t in quality.HELDOUT_TIMESTEPS)
        + " |"
    )
    table = [header, "|" + "---|" * (5 + len(quality.HELDOUT_TIMESTEPS))]
    fds, labels = [], []
    for label, path in nets.items():
        den = denoisers.make("network", checkpoint=path)
        with common.Timer() as t:
            imgs = sample_network(den, x_T, config)
            probs = clf.probs(np.clip(imgs, -1, 1))
            fd = quality.frechet_distance_of(clf.features(np.clip(imgs, -1, 1)), feats_real)
            per = quality.eps_mse(den.model.apply, den.params, eval_images, seed=config.seed)
        info = describe(path, len(train), config)
        epochs = info["epochs"]
        conf = float(np.mean(probs.max(-1) > config.confidence))
        se = per.std(1, ddof=1) / np.sqrt(per.shape[1])
        out["networks"][label] = {
            "checkpoint": path,
            **info,
            "fd": fd,
            "confident_fraction": conf,
            "predicted_fractions": np.bincount(probs.argmax(-1), minlength=clf.num_classes)
            / len(probs),
            "eps_mse": {
                str(t): {"mean": float(m), "se": float(e)}
                for t, m, e in zip(quality.HELDOUT_TIMESTEPS, per.mean(1), se)
            },
            "eps_mse_mean": float(per.mean()),
            "eps_mse_n": int(per.shape[1]),
            "seconds": t.seconds,
        }
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
        plotting.save_image_grid(
            imgs[:64],
            os.path.join(workdir, f"samples_{safe}.png"),
            ncols=8,
            title=f"{label}: {config.sampler} {config.num_steps} steps, FD {fd:.2f}",
        )
        mark = " (trained on the held-out images)" if info["trained_on_heldout"] else ""
        table.append(
            f"| {label}{mark} | {epochs:.1f} | {fd:.3f} | {conf:.3f} | {per.mean():.5f} | "
            + " | ".join(f"{m:.5f} ± {e:.5f}" for m, e in zip(per.mean(1), se))
            + " |"
        )
        fds.append(fd)
        labels.append(label)
        logging.info(
            "%s: FD %.3f, confident %.3f, eps-MSE %.5f (%.0fs)",
            label,
            fd,
            conf,
            per.mean(),
            t.seconds,
        )
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    common.atomic_write_text(os.path.join(workdir, "table.md"), "\n".join(table) + "\n")
    plotting.save_bars(
        dict(zip(labels, fds)),
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
