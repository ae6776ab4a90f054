"""Tables and figures of the rows of :mod:`locality.comparison` (docs/algorithms.md §10).

- :func:`tables` -- markdown lines and csv text of rows, best final trajectory r2 first, every
  row with its training-set size N.
- :func:`markdown` -- the body of ``table.md``: the main table, skipped rows, and the table of
  the common subset with its caption.
- :func:`plot_curves` -- ``r2_vs_t.png``, ``mse_vs_t.png``, ``hp_r2_vs_t.png`` from the rows of
  a ``metrics.json``, so figures can be redrawn without resampling.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Optional

from locality import plotting

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


def markdown(results: dict, skipped: dict, block: Optional[dict] = None, calibrated=False) -> str:
    """The body of ``table.md``: :func:`tables` of ``results``, a line per skipped row, then (with
    ``block``, a ``metrics.json["subset"]``) the like-with-like table of the common subset, whose
    caption notes that ``calibrated`` rows keep the schedule calibrated on the main table's
    training sets."""
    md = tables(results)[0]
    md += [f"\nskipped {label}: {why}" for label, why in skipped.items()]
    if block is not None:
        md += [
            "",
            f"Like with like: every method on the same {block['size']} training images (random "
            f"subset, seed {block['seed']}; pca_locality / Wiener statistics from the subset too"
            + ("; calibrated rows keep the schedule calibrated above" if calibrated else "")
            + ").",
            "",
        ] + tables(block["methods"])[0]
        md += [f"\nskipped {label} on the subset: {why}" for label, why in block["skipped"].items()]
    return "\n".join(md)


def plot_curves(results: dict, ts, workdir: str, dataset: str, network: str = "") -> None:
    """``r2_vs_t.png``, ``mse_vs_t.png`` and (where stored) ``hp_r2_vs_t.png`` (trajectory
    metrics per step, shaded 1 SE where the per-step SE is stored) from ``results`` (the
    ``methods`` of a ``metrics.json``), so figures can be redrawn without resampling. One fixed
    colour per method (:func:`locality.plotting.method_color`; calibrated and swept variants
    dashed); the r2 axes are set by the methods that matter and methods far below them are named
    in a note instead of stretching them. Where an SCFDM scale was chosen on probes (a
    ``<label>_best`` row) the sweep rows ``<label>_s<sigma>`` are left out of the figures (they
    stay in the tables)."""
    t_axis = [int(t) for t in ts]
    where = f" vs {network}" if network else ""
    names = ["r2", "mse"]
    if results and all("hp_r2" in r["trajectory"] for r in results.values()):
        names.append("hp_r2")
    if any(r.get("method") == "scfdm" and l.endswith("_best") for l, r in results.items()):
        # the sweep's rows stay in the tables; the figure shows the published and the chosen scale
        results = {
            l: r
            for l, r in results.items()
            if not (r.get("method") == "scfdm" and "_s" in l and not l.endswith("_best"))
        }
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
