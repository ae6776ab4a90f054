"""Report section for training-path runs (experiments/training_path.py): r2 of every method
against each export of a network as it trains, with paired verdicts of the best method against
each other one (docs/algorithms.md §13, the rule in ``experiments/report_parts/paired.py``; the
statistics are the run's own ``paired_vs_best``, from ``locality.metrics.paired_comparison``)."""

from __future__ import annotations

from experiments.report_parts import paired
from experiments.report_parts.common import command, figures, fmt, overrides


def word(stats: dict) -> str:
    """The paired verdict of the best method against another one: ``separated`` (better by both
    tests), ``tie`` or ``mixed (...)``."""
    v = paired.verdict(stats)
    return "separated" if v == "better" else v


def path_table(m: dict) -> list:
    """Final-step r2 (mean ± SE) of every method against every export, the best one and the
    paired verdicts against it (the layout of the run's table.md, verdicts by the report's
    rule)."""
    n, methods = m["num_samples"], m["methods"]
    out = [
        f"{m['dataset']}: final-step trajectory r2 against the network (mean ± SE over {n} "
        f"samples; all methods on the same {m['train_size']} training images)",
        "",
        "| network | epochs | " + " | ".join(methods) + " | best | paired verdicts vs best |",
        "|---|---|" + "---|" * len(methods) + "---|---|",
    ]
    for label, net in m["networks"].items():
        r2 = net["final_trajectory_r2"]
        pairs = net["paired_vs_best"]
        verdicts = "; ".join(
            f"{k}: {pairs[k]['mean_diff']:+.3f} ± {pairs[k]['se']:.3f}, {pairs[k]['wins']}/{n} "
            f"wins, p = {pairs[k]['sign_p']:.2g} ({word(pairs[k])})"
            for k in methods
            if k in pairs
        )
        out.append(
            f"| {label} | {net['epochs']:.1f} | "
            + " | ".join(f"{fmt(r2[k]['mean'])} ± {fmt(r2[k].get('se'))}" for k in methods)
            + f" | {net['best']} | {verdicts} |"
        )
    return out


def training_path_section(d, m, cfg, out_dir):
    """r2 of every method against the network as it trains (experiments/training_path.py)."""
    ds = m["dataset"]
    arg = ds + (",quick" if m["num_samples"] <= 8 else "")
    cmd = command("training_path", arg, d) + overrides("training_path", arg, cfg)
    table = path_table(m)
    nets = m["networks"]
    order = list(nets)
    first, last = nets[order[0]], nets[order[-1]]
    lines = (
        [
            f"### Which denoiser does the {ds} network approach as it trains?",
            "",
            f"Every method samples once from the shared noise; every export of the network "
            f"samples its own trajectories from the same noise ({m['num_samples']} samples, all "
            f"methods on the same {m['train_size']} training images). Reproduce: `{cmd}`",
            "",
            *table,
            "",
        ]
        + figures(d, ["r2_vs_epochs.png"], out_dir)
        + [""]
    )
    moves = []
    for meth in m["methods"]:
        a = first["final_trajectory_r2"][meth]["mean"]
        b = last["final_trajectory_r2"][meth]["mean"]
        moves.append(f"{meth} {a:.2f} -> {b:.2f}")
    best = last["best"]
    words = {k: word(p) for k, p in last["paired_vs_best"].items()}
    sep = [k for k, w in words.items() if w == "separated"]
    tied = [k for k, w in words.items() if w == "tie"]
    mixed = [f"{k} {w}" for k, w in words.items() if w not in ("separated", "tie")]
    verdict = (
        f"after {last['epochs']:.0f} epochs the network is closest to {best}"
        + (f", separated from {', '.join(sep)}" if sep else "")
        + (f"; not separated from {', '.join(tied)}" if tied else "")
        + (f"; mixed vs {'; '.join(mixed)}" if mixed else "")
    )
    lines += [
        f"**Verdict:** {verdict}. Final r2 from the first to the last export: "
        + "; ".join(moves)
        + ".",
        "",
    ]
    row = (
        f"network vs methods as it trains ({ds}, {first['epochs']:.0f} -> "
        f"{last['epochs']:.0f} epochs)",
        "final r2 " + "; ".join(moves),
        verdict,
        cmd,
    )
    return lines, row
