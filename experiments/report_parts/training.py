"""Report section listing the trained networks under ``checkpoints/``."""

from __future__ import annotations

import os

from experiments.report_parts.common import load_json, rel


def training_section(checkpoints: str, out_dir: str):
    lines = [
        "### Trained networks",
        "",
        "| checkpoint | params | steps | final loss | samples |",
        "|---|---|---|---|---|",
    ]
    if not os.path.isdir(checkpoints):
        return []
    for name in sorted(os.listdir(checkpoints)):
        d = os.path.join(checkpoints, name)
        m = load_json(os.path.join(d, "metrics.json"))
        if not m:
            continue
        grid = [f for f in sorted(os.listdir(d)) if f.startswith("samples_")]
        link = f"![]({rel(os.path.join(d, grid[-1]), out_dir)})" if grid else ""
        lines.append(
            f"| `{d}` | {m['num_params']:,} | {m['steps']} | {m['final_loss']:.4f} | {link} |"
        )
    return lines + [""]
