"""Report section for class-conditional guidance runs (experiments/guidance.py)."""

from __future__ import annotations

import numpy as np

from experiments.report_parts.common import command, figures, fmt, overrides


def guidance_verdict(
    agreement: float, n: int, holdout_acc: float, holdout_n: int, num_classes: int
) -> str:
    """Where a label agreement ``agreement`` (``n`` samples) lies between chance and the
    classifier's held-out accuracy on real images (``holdout_n`` images), with two binomial
    standard errors of slack on each comparison."""
    se = lambda p, k: np.sqrt(max(p * (1 - p), 1e-12) / max(k, 1))
    chance = 1.0 / num_classes
    slack = 2 * np.hypot(se(agreement, n), se(holdout_acc, holdout_n))
    if agreement >= holdout_acc - slack:
        return "as recognisable to the classifier as real images"
    if agreement > chance + 2 * se(chance, n):
        return "above chance, below real images"
    return "not above chance"


def guidance_section(d, m, cfg, out_dir):
    ds = m.get("dataset", "?")
    cmd = command("guidance", ds, d, overrides("guidance", ds, cfg))
    clf = m["classifier"]
    k, n = m["num_classes"], m["num_samples"]
    lines = [
        f"### Class-conditional samples on {ds}",
        "",
        f"Reproduce: `{cmd}`",
        "",
        f"Network `{m['checkpoint']}`, {n} samples per setting from the same noise "
        f"({m['sampler']}, {m['num_steps']} steps). A small CNN trained on the data has "
        f"held-out accuracy {fmt(clf['holdout_accuracy'])} on {clf['holdout_size']} real "
        f"images (chance {fmt(1 / k)}).",
        "",
        "| setting | label agreement | per class | predicted fractions | median L2 to nearest "
        "training image |",
        "|---|---|---|---|---|",
    ]
    best = None
    for name, s in m["settings"].items():
        frac = ", ".join(f"{c}: {fmt(v, 2)}" for c, v in s["predicted_fractions"].items())
        if "agreement" in s:
            per = ", ".join(f"{c}: {fmt(v, 2)}" for c, v in s["per_class"].items())
            lines.append(
                f"| {name} | {fmt(s['agreement'])} | {per} | {frac} | "
                f"{fmt(s['nearest_train_l2_median'], 2)} |"
            )
            if best is None or s["agreement"] > best[1]["agreement"]:
                best = (name, s)
        else:
            lines.append(f"| {name} | - | - | {frac} | {fmt(s['nearest_train_l2_median'], 2)} |")
    lines += [""] + figures(d, ["guidance.png"], out_dir) + [""]
    readme = None
    if best is not None:
        name, s = best
        verdict = guidance_verdict(
            s["agreement"], n, clf["holdout_accuracy"], clf["holdout_size"], k
        )
        others = ", ".join(
            f"{k_}: {fmt(v['agreement'])}"
            for k_, v in m["settings"].items()
            if "agreement" in v and k_ != name
        )
        readme = (
            f"guided samples show the requested class ({ds}, `{m['checkpoint']}`)",
            f"label agreement {fmt(s['agreement'])} at {name} ({others}; real held-out "
            f"{fmt(clf['holdout_accuracy'])}, chance {fmt(1 / k)})",
            verdict,
            cmd,
        )
    return lines, readme
