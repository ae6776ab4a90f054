"""What a sensitivity run writes from its field statistics: per-pixel tables, text lines and
figures (docs/algorithms.md §9).

The statistics, their means and standard errors over the probe pixels and the agree / shrink
verdicts are :mod:`locality.field_summary`; this module only lays them out.
:func:`pixel_tables` gives the per-pixel ``radius`` / ``cosine`` / ``iou`` entries of
``experiments/sensitivity.py``'s metrics.json, :func:`summary_lines` the plain text of a summary
and :func:`save_figures` the field tables and the radius and similarity curves.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from locality import plotting
from locality.field_summary import cosine, iou, mass_key, pair_key


def pixel_tables(statistics: dict, fields_by_model, timesteps: Sequence[int]) -> dict:
    """The per-pixel statistics of :func:`locality.field_summary.field_statistics` as tables
    keyed ``"row,col"``.

    Returns ``{"radius": {model: {"r,c": {"0.5": [T], "0.9": [T]}}}, "cosine": {"t": {"r,c":
    [K, K]}}, "iou": {"0.5": {"t": {"r,c": [K, K]}}, "0.9": ...}}``: radii per level (``None``
    where a model has no field) and model-by-model matrices in the order of
    ``statistics["models"]`` (symmetric; the diagonal compares a field with itself; NaN where
    a model has no field). This is the layout of the ``radius``, ``cosine`` and ``iou`` entries
    of ``experiments/sensitivity.py``'s metrics.json before its ``summary`` block.
    """
    names, masses = statistics["models"], statistics["masses"]
    keys = [f"{p[0]},{p[1]}" for p in statistics["pixels"]]
    radius_table = {
        m: {
            key: {
                str(a): [None if np.isnan(v) else float(v) for v in r[mass_key(a)][:, i]]
                for a in masses
            }
            for i, key in enumerate(keys)
        }
        for m, r in statistics["radius"].items()
    }

    def table(stat, self_fn):
        out = {}
        for k, t in enumerate(timesteps):
            out[str(t)] = {}
            for i, key in enumerate(keys):
                mat = np.full((len(names), len(names)), np.nan)
                for a, ma in enumerate(names):
                    f = fields_by_model[ma][k]
                    if f is not None and f[i].any():  # NaN for an all-zero field
                        mat[a, a] = self_fn(f[i], f[i])
                    for b in range(a + 1, len(names)):
                        pair = statistics["pairs"][pair_key(ma, names[b])]
                        mat[a, b] = mat[b, a] = pair[stat][k, i]
                out[str(t)][key] = mat
        return out

    return {
        "radius": radius_table,
        "cosine": table("cosine", cosine),
        "iou": {
            str(a): table(f"iou{mass_key(a)}", lambda f, g, a=a: iou(f, g, mass=a)) for a in masses
        },
    }


def summary_lines(summary: dict) -> list:
    """Plain-text lines of a :func:`locality.field_summary.summarize_statistics` block: every
    statistic as ``mean+-SE`` per level, then the verdicts."""
    ts, ref = summary["timesteps"], summary["reference"]

    def row(block):
        return " ".join(
            "-" if v is None else f"{v:.2f}+-{'n/a' if s is None else f'{s:.2f}'}"
            for v, s in zip(block["mean"], block["se"])
        )

    lines = [f"mean+-SE over {len(summary['pixels'])} pixels at t = {ts}:"]
    for m, blocks in summary["per_model"].items():
        lines += [f"{m:8s} {name}: {row(b)}" for name, b in blocks.items()]
    for key, pair in summary["pairs"].items():
        lines += [f"{key} {name}: {row(b)}" for name, b in pair.items()]
    lines += [f"verdict {m} vs {ref}: {v['text']}" for m, v in summary["verdicts"].items()]
    return lines


def save_figures(out_dir: str, summary: dict, fields_by_model, abs_: Sequence[float]) -> None:
    """The figures of a sensitivity run in ``out_dir`` (docs/algorithms.md §9).

    ``summary`` is :func:`locality.field_summary.summarize_statistics` of ``fields_by_model``
    (``{model: [T levels] of [P, H, W] fields or None}``), ``abs_`` the levels' alpha-bars.
    Writes ``fields_r<row>_c<col>.png`` for the first probed pixel and the one nearest the centre
    (rows = models, columns = noise levels, each panel with its colour bar, clipped at the 99th
    percentile of the values off the output pixel, which is outlined in red); ``radius.png``
    (50 % and 90 % radius against t, mean +- SE over pixels); ``similarity_vs_t.png`` (IoU50,
    IoU90 and cosine of every model with the reference, mean +- SE over pixels; only when there
    is a model besides the reference).
    """
    ts, names, ref = summary["timesteps"], summary["models"], summary["reference"]
    pixels = [tuple(p) for p in summary["pixels"]]
    h, w = next(f for fs in fields_by_model.values() for f in fs if f is not None).shape[1:]
    centre = min(pixels, key=lambda p: (p[0] - (h - 1) / 2) ** 2 + (p[1] - (w - 1) / 2) ** 2)
    for p in dict.fromkeys([pixels[0], centre]):
        plotting.save_heatmap_table(
            [
                [None if f is None else f[pixels.index(p)] for f in fields_by_model[m]]
                for m in names
            ],
            os.path.join(out_dir, f"fields_r{p[0]}_c{p[1]}.png"),
            row_labels=names,
            col_labels=[f"t={t} ab={ab:.3f}" for t, ab in zip(ts, abs_)],
            marks=[[p] * len(ts) for _ in names],
            title=f"sensitivity field of pixel {p} (red): |dD_p/dx_t| summed over channels, "
            f"mean of {summary['num_inputs']} inputs\neach colour scale is clipped at the 99th "
            "percentile of the panel's values off the pixel",
            colorbar=True,
            clip_percentile=99.0,
            colorbar_label="|J|, clipped at p99 off-pixel",
        )

    def curve(block, label, m, style):  # mean +- SE against t; a missing value is skipped
        mean, se = (np.asarray(block[k], float) for k in ("mean", "se"))  # None -> nan
        c = plotting.method_color(m)
        return dict(x=ts, y=mean, yerr=np.nan_to_num(se), label=label, style=style, color=c)

    radius = [
        curve(summary["per_model"][m][f"radius{q}"], f"{m} {q}%", m, ls)
        for m in names
        for q, ls in (("50", "-"), ("90", "--"))
    ]
    keys = {m: pair_key(*sorted((m, ref), key=names.index)) for m in names if m != ref}
    similarity = [
        curve(summary["pairs"][key][k], f"{m} vs {ref} {k}", m, ls)
        for m, key in keys.items()
        for k, ls in (("iou50", "-"), ("iou90", "--"), ("cosine", ":"))
    ]
    over = f"(mean +- SE over {len(pixels)} pixels)"
    plotting.save_series(
        radius,
        os.path.join(out_dir, "radius.png"),
        xlabel="DDPM timestep t",
        ylabel="radius (pixels)",
        title=f"radius holding 50% / 90% of the field mass {over}",
    )
    if similarity:
        plotting.save_series(
            similarity,
            os.path.join(out_dir, "similarity_vs_t.png"),
            xlabel="DDPM timestep t",
            ylabel="similarity",
            title=f"IoU of the 50% / 90% supports and cosine, each model vs {ref} {over}",
        )
