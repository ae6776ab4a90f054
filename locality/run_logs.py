"""A training run's logs: ``metrics.jsonl`` (one row per logged step: loss, gradient norm,
learning rate, wall time) and ``eval.jsonl`` (the held-out eps-MSE of :mod:`locality.train`),
read back for summaries and the stopping rule of the long runs (docs/algorithms.md §11).
Lines cut by a kill are skipped; nothing here needs JAX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def read_log(log_path) -> list:
    """The rows (dicts with a ``step``) of a run's ``metrics.jsonl``, in order; lines cut by a
    kill are skipped; ``[]`` when there is no log."""
    rows = []
    if Path(log_path).exists():
        for line in Path(log_path).read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(r, dict) and "step" in r:
                rows.append(r)
    return rows


def summary_from_log(log_path, step: int) -> dict:
    """A ``metrics.json``-like summary of a run up to ``step`` from its ``metrics.jsonl``:
    ``final_loss`` is the logged loss of the last row at or before ``step``; ``wall_s`` adds up
    the wall time of every invocation (the log's ``wall_s`` restarts at 0 on each resume)."""
    rows = [r for r in read_log(log_path) if r["step"] <= step]
    wall, seg_max, prev = 0.0, 0.0, None
    for r in rows:
        w = float(r.get("wall_s", 0.0))
        if prev is not None and w < prev:  # a new invocation
            wall, seg_max = wall + seg_max, 0.0
        seg_max, prev = max(seg_max, w), w
    last = max(rows, key=lambda r: r["step"]) if rows else {}
    return {
        "steps": int(step),
        "num_steps": int(step),
        "stopped_early": False,
        "final_loss": last.get("loss", float("nan")),
        "final_loss_step": last.get("step"),
        "wall_s": wall + seg_max,
        "from_log": True,
    }


def heldout_flatness(eval_log, step: int, fraction: float = 0.2) -> Optional[dict]:
    """How much the held-out loss still fell over the last ``fraction`` of a run up to ``step``.

    Reads ``eval.jsonl`` (rows ``{"step", "eps_mse_mean"}``, written by the trainer's held-out
    evaluation). ``start`` is the last evaluation at or before ``(1 - fraction) * step``, ``end``
    the last at or before ``step``; ``improvement = (L_start - L_end) / L_start``. The issue's
    stopping rule calls a run flat when this is below 1 % (``flat``). None when the log has fewer
    than two evaluations in range.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}: use a number in (0, 1), e.g. 0.2")
    rows = [
        r for r in read_log(eval_log) if r["step"] <= step and r.get("eps_mse_mean") is not None
    ]
    before = [r for r in rows if r["step"] <= (1.0 - fraction) * step]
    if not before or rows[-1]["step"] == before[-1]["step"]:
        return None
    a, b = before[-1], rows[-1]
    improvement = (float(a["eps_mse_mean"]) - float(b["eps_mse_mean"])) / float(a["eps_mse_mean"])
    return {
        "fraction": fraction,
        "start_step": int(a["step"]),
        "end_step": int(b["step"]),
        "start_loss": float(a["eps_mse_mean"]),
        "end_loss": float(b["eps_mse_mean"]),
        "improvement": improvement,
        "flat": bool(improvement < 0.01),
    }
