"""Evaluating trained networks: how long they trained, how good their samples are, and which
analytical denoiser they are closest to.

What ``experiments/quality.py``, ``experiments/training_path.py`` and ``experiments/guidance.py``
compute per network, as functions over arrays, records and loaded denoisers:

- :func:`describe` -- a checkpoint's step, epochs and whether it trained on the images an
  evaluation holds out (docs/algorithms.md §11, "Training");
- :func:`network_quality` / :func:`quality_row` -- the Frechet distance in a classifier's
  features, the confident fraction and the held-out eps-MSE with its standard errors
  (docs/algorithms.md §12);
- :func:`agreement_summary` -- the classifier's view of a guided sample set
  (docs/algorithms.md §11, "Class conditioning and classifier-free guidance");
- :func:`single_step_r2`, :func:`path_record` / :func:`path_row` -- r2 of each method against a
  network (docs/algorithms.md §10) and every method against the best one, paired over samples
  (docs/algorithms.md §13).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from locality import metrics, quality
from locality.checkpoints import read_checkpoint_config, resolve_checkpoint_dir


def describe(checkpoint: str, n_train: int, holdout: float, holdout_seed: int) -> dict:
    """Step, epochs (steps x batch / ``n_train`` training images) and whether the net trained on
    the held-out images (a net trained on all of a split that the evaluation, with ``holdout >
    0``, holds a part of: another ``holdout`` fraction or ``holdout_seed``)."""
    meta = read_checkpoint_config(checkpoint)
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    steps = [int(p) for p in os.listdir(ckpt_dir) if p.isdigit()] or [
        int(meta["train"].get("num_steps", 0))
    ]
    tr = meta["train"]
    seen = holdout > 0 and not (
        float(tr.get("holdout", 0.0)) == holdout and int(tr.get("seed", 0)) == holdout_seed
    )
    return {
        "step": max(steps),
        "epochs": max(steps) * int(tr["batch_size"]) / n_train,
        "trained_on_heldout": bool(seen),
    }


def network_quality(clf, imgs, feats_real, per, confidence: float) -> dict:
    """The quality record of a network's samples ``imgs``: Frechet distance of the classifier
    features (clipped to [-1, 1]) to ``feats_real``, fraction labelled with probability above
    ``confidence``, predicted class fractions, and the held-out eps-MSE ``per`` [T, N] of
    :func:`locality.quality.eps_mse` per timestep of ``quality.HELDOUT_TIMESTEPS`` (mean and
    per-image standard error) and overall."""
    probs = clf.probs(np.clip(imgs, -1, 1))
    fd = quality.frechet_distance_of(clf.features(np.clip(imgs, -1, 1)), feats_real)
    se = per.std(1, ddof=1) / np.sqrt(per.shape[1])
    return {
        "fd": fd,
        "confident_fraction": float(np.mean(probs.max(-1) > confidence)),
        "predicted_fractions": np.bincount(probs.argmax(-1), minlength=clf.num_classes)
        / len(probs),
        "eps_mse": {
            str(t): {"mean": float(m), "se": float(e)}
            for t, m, e in zip(quality.HELDOUT_TIMESTEPS, per.mean(1), se)
        },
        "eps_mse_mean": float(per.mean()),
        "eps_mse_n": int(per.shape[1]),
    }


def quality_header(confidence: float) -> list:
    """The header lines of the markdown table of :func:`quality_row`."""
    ts = quality.HELDOUT_TIMESTEPS
    return [
        "| network | epochs | FD (classifier) | confident > %.1f | eps-MSE mean | " % confidence
        + " | ".join(f"t={t}" for t in ts)
        + " |",
        "|" + "---|" * (5 + len(ts)),
    ]


def quality_row(label: str, rec: dict) -> str:
    """One markdown row for the record of a network (:func:`describe` and
    :func:`network_quality` merged)."""
    mark = " (trained on the held-out images)" if rec["trained_on_heldout"] else ""
    return (
        f"| {label}{mark} | {rec['epochs']:.1f} | {rec['fd']:.3f} | "
        f"{rec['confident_fraction']:.3f} | {rec['eps_mse_mean']:.5f} | "
        + " | ".join(f"{e['mean']:.5f} ± {e['se']:.5f}" for e in rec["eps_mse"].values())
        + " |"
    )


def agreement_summary(agree: dict, labelled: bool):
    """``(record, description)`` of :func:`locality.classify.label_agreement` for one guidance
    setting: the full agreement for a labelled setting, the predicted fractions otherwise."""
    if not labelled:
        desc = "predicted " + ", ".join(
            f"class {c}: {f:.2f}" for c, f in agree["predicted_fractions"].items()
        )
        return {"predicted_fractions": agree["predicted_fractions"]}, desc
    desc = (
        f"label agreement {agree['agreement']:.3f} (per class "
        + ", ".join(f"{c}: {a:.2f}" for c, a in agree["per_class"].items())
        + ")"
    )
    return dict(agree), desc


def single_step_r2(net, x0, xt, abs_, batch):
    """r2 of a method's x0_hat [S, N, ...] against the network evaluated on the method's own
    states xt [S, N, ...], per step and sample: [S, N]."""
    ref = np.stack(
        [
            np.concatenate(
                [
                    np.asarray(net(jnp.asarray(xt[s, i : i + batch]), float(abs_[s])))
                    for i in range(0, xt.shape[1], batch)
                ]
            )
            for s in range(xt.shape[0])
        ]
    )
    return metrics.per_step(x0, ref, reduce="none")["r2"]


def _mean_se(v, n: int) -> dict:
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(n))}


def path_record(r: dict, single: dict, n: int) -> dict:
    """The record of one network from the final-step trajectory r2 ``r`` (``{method: [n]}``)
    and the step-mean single-step r2 ``single`` (``{method: [n]}``): the best method (highest
    mean), per method mean, standard error, median and the per-sample values, and every other
    method against the best, paired (:func:`locality.metrics.paired_comparison`)."""
    best = max(r, key=lambda m: r[m].mean())
    return {
        "best": best,
        "final_trajectory_r2": {
            m: {**_mean_se(v, n), "median": float(np.median(v)), "per_sample": v}
            for m, v in r.items()
        },
        "single_step_r2_stepmean": {m: _mean_se(v, n) for m, v in single.items()},
        "paired_vs_best": {m: metrics.paired_comparison(r[best], r[m]) for m in r if m != best},
    }


def path_row(label: str, epochs: float, r: dict, rec: dict, n: int) -> str:
    """One markdown row: per method the mean ± SE of ``r``, the best, the paired verdicts."""
    verdicts = "; ".join(
        f"{m}: {p['mean_diff']:+.3f} ± {p['se']:.3f}, {p['wins']}/{n} wins, "
        f"p = {p['sign_p']:.2g} ({rec['best']} {metrics.paired_verdict(p)})"
        for m, p in rec["paired_vs_best"].items()
    )
    return (
        f"| {label} | {epochs:.1f} | "
        + " | ".join(f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(n):.3f}" for v in r.values())
        + f" | {rec['best']} | {verdicts} |"
    )
