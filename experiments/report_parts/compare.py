"""Report sections for score comparisons (experiments/compare.py, docs/algorithms.md §10).

One section per (dataset, network), titled with the network and its training epochs; each run
against that network gets its table of every method (N = the training images the method used),
paired columns against ``pca_locality`` on the same samples (docs/algorithms.md §13, the rule in
``experiments/report_parts/paired.py``), the verdict per peer, a line naming the methods that ran
on subsets of the training set and why, the best method per noise level and the run's figures.

Optional fields, shown when a run has them: per method ``final_trajectory_hp_r2_mean`` (r2 after
removing a Gaussian blur; a "high-pass r2" column) and a top-level ``subset`` block
``{"size": N, "seed": s, "methods": {label: <per-method dict>}}`` (every method re-run on one
common subset; a second table with the same paired columns).
"""

from __future__ import annotations

import os
import re

from experiments.report_parts import paired
from experiments.report_parts.common import (
    command,
    figures,
    fmt,
    network_label,
    network_name,
    overrides,
)

PEERS = (
    "wiener",
    "optimal",
    "ls",
    "els",
    "bbels",
    "pspc_square",
    "pspc_flex",
    "scfdm",
    "linear",
    "nearest",
)
OURS = "pca_locality"
R2 = "final_trajectory_r2_mean"
PER_SAMPLE = "final_trajectory_r2_per_sample"
HP_R2 = "final_trajectory_hp_r2_mean"
# (metrics key, column header) of experiments/compare.py's table.md, then the run time
COLUMNS = (
    (R2, "final traj r2 mean"),
    ("final_trajectory_r2_median", "final traj r2 median"),
    ("final_trajectory_mse_mean", "final traj MSE"),
    ("final_trajectory_pearson_mean", "final traj Pearson"),
    ("stepmean_trajectory_r2", "traj r2 (mean over steps)"),
    ("stepmean_single_step_r2", "single-step r2 (mean over steps)"),
    ("stepmean_single_step_mse", "single-step MSE (mean over steps)"),
)
TABLE_NOTE = (
    f"N: training images the method used. Paired columns: {OURS} minus the method in final-step "
    "trajectory r2 on the same samples; better / worse only when the paired mean (beyond 2 SE) "
    "and the sign test (p < 0.05) agree, tie only when neither separates (docs/algorithms.md §13)."
)
PAIRED_HEADERS = (
    f"{OURS} − method: paired mean ± SE",
    "median diff",
    f"{OURS} wins / samples",
    "sign-test p",
    f"verdict for {OURS}",
)


def pair_stats(res: dict) -> dict:
    """{label: paired statistics of pca_locality minus label (None without per-sample data)}
    for every method of ``res`` but pca_locality; {} when the run has no pca_locality."""
    if OURS not in res:
        return {}
    ours = res[OURS].get(PER_SAMPLE)
    return {k: paired.paired_stats(ours, v.get(PER_SAMPLE)) for k, v in res.items() if k != OURS}


def method_table(res: dict) -> list:
    """Markdown table of every method in ``res`` (sorted by final r2), with N, the columns of
    compare.py's table, a high-pass r2 column when any method has one, and paired columns."""
    cols = list(COLUMNS)
    if any(HP_R2 in v for v in res.values()):  # beside the plain r2, as in compare.py's table
        cols.insert(2, (HP_R2, "final traj high-pass r2"))
    stats = pair_stats(res)
    heads = ["method", "N"] + [h for _, h in cols] + ["s"]
    heads += list(PAIRED_HEADERS) if stats else []
    out = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for label in sorted(res, key=lambda k: -res[k].get(R2, float("-inf"))):
        r = res[label]
        row = [label, str(r.get("train_size", "?"))] + [fmt(r.get(k)) for k, _ in cols]
        row += [fmt(r.get("seconds"), 0)]
        if stats:
            row += ["-"] * 4 + ["(reference)"] if label == OURS else paired.cells(stats[label])
        out.append("| " + " | ".join(row) + " |")
    return out


def subset_reason(label: str, r: dict, cfg: dict) -> str:
    """The config field that put ``label`` on a subset: its ``method_kwargs.<label>.limit``
    (for a calibrated row or a swept scale, that of the row it derives from) or the
    ``peer_limit`` of the ``slow_methods``."""
    kw, slow = cfg.get("method_kwargs") or {}, str(cfg.get("slow_methods", "")).split(",")
    base = label[: -len("_calibrated")] if label.endswith("_calibrated") else label
    for name in dict.fromkeys((label, base, r.get("method", label))):
        if (kw.get(name) or {}).get("limit"):
            return f"`method_kwargs.{name}.limit`"
        if name in slow:
            return "`peer_limit` of the `slow_methods`"
    return "reason not recorded in config.json"


def subset_note(res: dict, cfg: dict) -> str:
    """One line: which methods ran on a subset of the training set (train_size below the
    largest) and why (the config's ``method_kwargs.<label>.limit`` or ``peer_limit``)."""
    sizes = {k: v["train_size"] for k, v in res.items() if "train_size" in v}
    if not sizes:
        return "Training-set size per method: not recorded in this run."
    full = max(sizes.values())
    small = sorted((k for k, n in sizes.items() if n < full), key=lambda k: (sizes[k], k))
    if not small:
        return f"Every method used all {full} training images."
    parts = [f"{k} on {sizes[k]} ({subset_reason(k, res[k], cfg)})" for k in small]
    return (
        f"Subsets of the {full} training images: " + "; ".join(parts) + ". Their cost grows "
        "with N H^2 W^2, so they run on a fixed random subset to fit the CPU budget "
        "(configs/compare.py); every other method used all of them."
    )


CALIBRATED = ("ls", "els", "bbels", "pspc_square")


def protocol_note(res: dict, m: dict, cfg: dict) -> str:
    """One line: which parts of the full protocol (configs/compare.py ``long``) a run lacks --
    calibrated peer rows, the common-subset table (owed only when the methods' ``train_size``
    differ), the high-pass r2, an SCFDM scale chosen on probes -- so a run made before them is
    read as such. Empty when it lacks none that apply."""
    missing = []
    if any(k in res for k in CALIBRATED) and not any("calibrated_from" in r for r in res.values()):
        missing.append("peers at their published patch sizes only (no calibrated rows)")
    sizes = {v["train_size"] for v in res.values() if "train_size" in v}
    if "subset" not in m and len(sizes) > 1:  # only owed when some method saw fewer images
        missing.append("no common-subset table")
    if res and not any(HP_R2 in r for r in res.values()):
        missing.append("no high-pass r2")
    if "scfdm" in res and "scfdm_selection" not in m:
        missing.append("SCFDM at its published scale (no sweep chosen on probes)")
    if not missing:
        return ""
    return (
        "Protocol: " + "; ".join(missing) + ". `configs/compare.py:<dataset>,long` runs all of "
        "them; read this run's peer verdicts with that in mind."
    )


def peers(res: dict) -> list:
    """The methods pca_locality is judged against: every row that is not a pca_locality variant
    (``method`` other than pca_locality), those of PEERS first in its order, then the others
    (calibrated schedules, swept scales) in table order."""
    others = [k for k in res if k != OURS and res[k].get("method", k) != OURS]
    return [p for p in PEERS if p in others] + [
        k for k in sorted(others, key=lambda k: -res[k].get(R2, float("-inf"))) if k not in PEERS
    ]


def verdict_lines(res: dict) -> tuple:
    """(bullets, {peer: verdict}) for pca_locality against each peer (:func:`peers`)."""
    stats = pair_stats(res)
    bullets, words = [], {}
    for peer in peers(res):
        words[peer] = paired.verdict(stats[peer])
        bullets.append(
            f"- {OURS} vs {peer}: **{words[peer]}**; final r2 {res[OURS][R2]:.3f} vs "
            f"{res[peer][R2]:.3f}, {paired.summary(stats[peer])}"
        )
    return bullets, words


def per_level_table(res: dict) -> list:
    """Which method agrees best with the network at each DDIM step, and pca_locality's rank."""
    ts = res[OURS]["timesteps"]
    per = [
        "| best (trajectory r2) |",
        "| best (single-step r2) |",
        f"| {OURS} rank (single-step) |",
    ]
    for i in range(len(ts)):
        tr = {k: v["trajectory"]["r2"][i] for k, v in res.items()}
        ss = {k: v["single_step"]["r2"][i] for k, v in res.items()}
        order = sorted(ss, key=ss.get, reverse=True)
        per[0] += f" {max(tr, key=tr.get)} |"
        per[1] += f" {order[0]} |"
        per[2] += f" {order.index(OURS) + 1}/{len(order)} |"
    return [
        "**Per noise level** (which method agrees best with the network at each DDIM step):",
        "",
        "| t | " + " | ".join(str(t) for t in ts) + " |",
        "|---" * (len(ts) + 1) + "|",
        *per,
        "",
    ]


def subset_table(m: dict) -> list:
    """The optional ``subset`` block: every method on the same training images."""
    sub = m.get("subset")
    if not sub:
        return []
    skipped = [f"- skipped `{k}` on the subset: {why}" for k, why in sub.get("skipped", {}).items()]
    return [
        f"**All methods on the same {sub['size']} training images** (subset seed "
        f"{sub.get('seed', '?')}; paired columns against {OURS} on this subset):",
        "",
        *method_table(sub["methods"]),
        "",
        *skipped,
        *([""] if skipped else []),
    ]


def readme_verdict(words: dict) -> str:
    """README verdict from {peer: paired verdict} (the same rule as the section)."""
    if words and all(w == "better" for w in words.values()):
        return "matches the network better than every peer"
    group = {k: [p for p, w in words.items() if w == k] for k in ("worse", "tie", paired.NO_DATA)}
    mixed = [f"{p} {w[len('mixed ') :]}" for p, w in words.items() if w.startswith("mixed")]
    nodata = group[paired.NO_DATA]
    parts = [f"beaten by {', '.join(group['worse'])}"] if group["worse"] else []
    parts += [] if group["worse"] or mixed or nodata else ["no peer is better"]
    parts += [f"mixed vs {'; '.join(mixed)}"] if mixed else []
    parts += [f"tied with {', '.join(group['tie'])}"] if group["tie"] else []
    parts += [f"no per-sample data for {', '.join(nodata)}"] if nodata else []
    return "; ".join(parts)


def readme_row(m: dict, words: dict, cmd: str) -> tuple:
    ds, res = m["dataset"], m["methods"]
    r2 = {k: v[R2] for k, v in res.items()}
    net = str(m.get("checkpoint", "")).rstrip("/")
    other = (
        f", network `{os.path.basename(net)}`"
        if net and net != f"checkpoints/{ds}_unet_cpu"
        else ""
    )
    return (
        f"pca_locality vs network, final r2 ({ds}{other})",
        f"{r2[OURS]:.3f} (Wiener {fmt(r2.get('wiener'))}, optimal "
        f"{fmt(r2.get('optimal'))}, LS {fmt(r2.get('ls'))}, best `{max(r2, key=r2.get)}`)",
        readme_verdict(words),
        cmd,
    )


def rerun_command(m: dict, cfg: dict, d: str) -> str:
    """The run's recorded command plus the ``--config.K=V`` overrides it needs today: a default
    of configs/compare.py changed after the run (e.g. a published schedule) would otherwise make
    the recorded command reproduce something else."""
    cmd = m.get("command") or command("compare", m["dataset"], d)
    match = re.search(r"configs/compare\.py:(\S+)", cmd)
    if not match or not cfg:
        return cmd
    extra = [
        o
        for o in overrides("compare", match.group(1), cfg).split(" --")
        if o.strip() and f"--{o.split('=')[0]}=" not in cmd
    ]
    return cmd + "".join(f" --{o}" for o in extra)


def compare_run(d, m, cfg, out_dir) -> tuple:
    """Lines and README row (None without pca_locality) of one comparison run."""
    res = m["methods"]
    cmd = rerun_command(m, cfg, d)
    steps = len(next(iter(res.values()), {}).get("timesteps") or []) or "?"
    lines = [
        f"**Run `{d}`**: {m.get('num_samples', '?')} samples, {steps}-step DDIM from shared noise. "
        f"Reproduce: `{cmd}`",
        "",
        subset_note(res, cfg),
        "",
        *([note, ""] if (note := protocol_note(res, m, cfg)) else []),
        TABLE_NOTE if OURS in res else "N: training images the method used.",
        "",
        *method_table(res),
        "",
    ]
    lines += [f"- skipped `{k}`: {why}" for k, why in (m.get("skipped") or {}).items()]
    lines += [""] if m.get("skipped") else []
    figs = figures(d, ("r2_vs_t.png", "grid.png"), out_dir) + [""]
    if OURS not in res:
        return lines + [f"No {OURS} in this run, so no paired verdicts.", "", *figs], None
    best = max(res, key=lambda k: res[k][R2])
    bullets, words = verdict_lines(res)
    lines += [f"**Final step:** best method `{best}` (r2 {res[best][R2]:.3f}).", "", *bullets, ""]
    lines += subset_table(m) + per_level_table(res) + figs
    return lines, readme_row(m, words, cmd)


def compare_sections(runs, out_dir) -> tuple:
    """(lines, README rows) for every comparison run, one section per (dataset, network)."""
    groups = {}
    for d, m, cfg in runs:
        groups.setdefault((m["dataset"], network_name(m["checkpoint"])), []).append((d, m, cfg))
    lines, rows = [], []
    for (ds, _), members in groups.items():
        d, m, cfg = members[0]
        n_train = max((v.get("train_size", 0) for v in m["methods"].values()), default=0)
        title = network_label(m["checkpoint"], n_train, cfg.get("holdout", 0.0), ds)
        lines += [f"### Score comparison: {ds}, {title}", ""]
        for d, m, cfg in members:
            part, row = compare_run(d, m, cfg, out_dir)
            lines += part
            rows += [row] if row else []
    return lines, rows
