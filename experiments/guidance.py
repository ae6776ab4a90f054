"""Sample a class-conditional network with and without classifier-free guidance and measure how
often a held-out-validated classifier sees the requested class in each sample.

    python -m experiments.guidance --config configs/guidance.py:cifar10_catsdogs \
        --workdir results/guidance_cifar10_catsdogs

Every setting starts from the same initial noise (and, for DDPM, the same per-step noise):
"no label" (the net's unconditional mode) and labels ``i mod K`` at each guidance weight ``w``
(``eps = (1 + w) eps(x, y) - w eps(x, no label)``, Ho & Salimans 2022). Writes to ``--workdir``:
``samples_<setting>.png`` (the first 64 samples, 8 per row, so columns alternate between the
classes when K = 2), ``guidance.png`` (the first 16 samples of every setting, one row each),
``samples.npz``, ``metrics.json`` (classifier held-out accuracy; per setting the label agreement,
the predicted class fractions, the median L2 distance to the nearest training image) and
``summary.txt``. Sampling and the nearest-image distance are :mod:`locality.generation`, the
classifier :mod:`locality.classify`, the agreement summary :mod:`locality.evaluation`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from experiments import common
from locality import classify, data, denoisers, evaluation, generation, plotting


def run(config, workdir: str) -> str:
    common.prepare_workdir(workdir, config)
    weights = generation.parse_weights(config.guidance)
    if not weights and not config.unconditional:
        raise ValueError("nothing to sample: set guidance (e.g. '0,1,3') or unconditional=True")
    train, labels = data.load(config.dataset, split="train", with_labels=True)
    probe = denoisers.make("network", checkpoint=config.checkpoint)
    k = int(getattr(probe.model, "num_classes", 0))
    if k < 2:
        raise ValueError(
            f"{config.checkpoint} is not class-conditional (num_classes={k}); train "
            f"one with --config.model.num_classes=K (configs/train.py)"
        )
    if labels.max() >= k:
        raise ValueError(
            f"{config.dataset} has labels up to {labels.max()} but the network knows {k} classes"
        )

    with common.Timer() as t_clf:
        clf = classify.train_classifier(
            train,
            labels,
            num_classes=k,
            holdout=config.classifier_holdout,
            epochs=config.classifier_epochs,
            seed=config.classifier_seed,
            progress=config.progress,
        )
    logging.info(
        "classifier: held-out accuracy %.3f on %d images (%.0fs)",
        clf.holdout_accuracy,
        clf.holdout_size,
        t_clf.seconds,
    )

    key = jax.random.key(config.seed)
    x_T = jax.random.normal(key, (config.num_samples,) + train.shape[1:], jax.numpy.float32)
    requested = np.arange(config.num_samples) % k
    settings = ([("no_label", None, 0.0)] if config.unconditional else []) + [
        (f"w{w:g}", "cycle", w) for w in weights
    ]
    out = {
        "dataset": config.dataset,
        "checkpoint": config.checkpoint,
        "num_classes": k,
        "sampler": config.sampler,
        "num_steps": config.num_steps,
        "num_samples": config.num_samples,
        "classifier": {
            "holdout_accuracy": clf.holdout_accuracy,
            "holdout_size": clf.holdout_size,
            "train_accuracy": clf.train_accuracy,
            "real_predicted_fractions": classify.label_agreement(clf, train, labels)[
                "predicted_fractions"
            ],
            "seconds": t_clf.seconds,
        },
        "settings": {},
    }
    lines = [
        f"{config.checkpoint} on {config.dataset}: {config.num_samples} samples per setting, "
        f"{config.sampler} {config.num_steps} steps, seed {config.seed}",
        f"classifier held-out accuracy {clf.holdout_accuracy:.3f} "
        f"({clf.holdout_size} real images; chance {1 / k:.3f})",
    ]
    finals, rows = {}, {}
    for name, lab, w in settings:
        den = denoisers.make(
            "network", model=probe.model, params=probe.params, labels=lab, guidance=w
        )  # the weights loaded once above
        with common.Timer() as t:
            res = generation.sample(
                den,
                x_T,
                config.sampler,
                config.num_steps,
                key=jax.random.fold_in(key, 1),
                progress=config.progress,
            )
            imgs = np.asarray(res.images)
        finals[name] = imgs
        dist, _ = generation.nearest_distance(imgs, train)
        info = {
            "labels": lab,
            "guidance": w,
            "seconds": t.seconds,
            "nearest_train_l2_median": float(np.median(dist)),
            "fraction_outside_unit_range": float(np.mean(np.abs(imgs) > 1.0)),
        }
        agree = classify.label_agreement(clf, np.clip(imgs, -1, 1), requested)
        record, desc = evaluation.agreement_summary(agree, labelled=lab is not None)
        info.update(record)
        out["settings"][name] = info
        title = "no label" if lab is None else f"labels i mod {k}, guidance w = {w:g}"
        plotting.save_image_grid(
            imgs[:64],
            os.path.join(workdir, f"samples_{name}.png"),
            ncols=8,
            title=f"{title} ({config.sampler}, {config.num_steps} steps)",
        )
        rows[title] = imgs[:16]
        lines.append(
            f"  {name:9s} {t.seconds:6.1f}s  {desc}; median L2 to nearest training "
            f"image {np.median(dist):.2f}"
        )
    plotting.save_rows(
        rows,
        os.path.join(workdir, "guidance.png"),
        title=f"{config.dataset}: same noise per column; requested class = column mod {k}",
    )
    np.savez(
        os.path.join(workdir, "samples.npz"), x_T=np.asarray(x_T), requested=requested, **finals
    )
    common.write_json(os.path.join(workdir, "metrics.json"), out)
    lines.append(f"metrics: {os.path.join(workdir, 'metrics.json')}")
    return common.write_summary(workdir, lines)


if __name__ == "__main__":
    common.run_as_program(run, "configs/guidance.py:<dataset>")
