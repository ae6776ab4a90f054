"""Report section "The paper's numbers vs ours".

The paper's numbers (Lukoianov, Yuan, Solomon & Sitzmann, NeurIPS 2025, arXiv:2509.09672) live
in ``experiments/paper_numbers.json``, each with the table or figure it was read from; a value
that could not be read is ``null`` and prints as "paper value not available offline" (nothing is
estimated). Our value of each quantity is read from every comparison run on the matching dataset
(``experiments/compare.py``, docs/algorithms.md §10), with its run directory and network; a
dataset without a run says why ("not obtained: ...").

Schema of the data file::

    {"paper": str, "source": url, "found_offline": bool, "lookup": str (why values are missing),
     "datasets": {paper dataset: {"ours": our dataset name, "note": str}
                                 | {"ours": name, "why_not": str}},
     "quantities": [{"quantity": str, "method": compare label, "metric": per-method key,
                     "values": {paper dataset: {"value": number | null,
                                                "where": "Table N" | "Figure N" | null}}}]}
"""

from __future__ import annotations

import json
import os
import re

from experiments.report_parts.common import fmt, network_label

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "paper_numbers.json")
NOT_AVAILABLE = "paper value not available offline"
WHERE = re.compile(r"^(Table|Figure|Fig\.) [A-Za-z0-9.]+")


def load_paper_numbers(path: str = DEFAULT_PATH) -> dict:
    """The data file, checked: every value names its table or figure, every dataset of a value
    is described. Raises ValueError naming the entry and the fix."""
    with open(path) as f:
        data = json.load(f)
    for key in ("paper", "source", "found_offline", "datasets", "quantities"):
        if key not in data:
            raise ValueError(
                f"{path}: missing top-level field {key!r}; see the schema in {__file__}"
            )
    for q in data["quantities"]:
        for ds, v in q["values"].items():
            if ds not in data["datasets"]:
                raise ValueError(
                    f"{path}: {q['quantity']!r} has dataset {ds!r}; add it to 'datasets'"
                )
            if v["value"] is not None and not WHERE.match(str(v.get("where") or "")):
                raise ValueError(
                    f"{path}: {q['quantity']!r} on {ds} has value {v['value']!r} but 'where' is "
                    f"{v.get('where')!r}; give the paper's table or figure ('Table 1', 'Figure 3')"
                )
    return data


def our_values(runs, dataset: str, method: str, metric: str) -> list:
    """``0.686 (`results/compare_mnist_long`, network `...` (40 epochs))`` for every comparison
    run on ``dataset`` that has ``method``; the training-set size when the method used a
    subset."""
    out = []
    for d, m, cfg in runs:
        res = m["methods"]
        if m.get("dataset") != dataset or method not in res or metric not in res[method]:
            continue
        sizes = [v.get("train_size", 0) for v in res.values()]
        n = res[method].get("train_size")
        sub = f", on {n} of {max(sizes)} images" if n and n < max(sizes) else ""
        net = network_label(m["checkpoint"], max(sizes), cfg.get("holdout", 0.0), dataset)
        out.append(f"{fmt(res[method][metric])} (`{d}`, {net}{sub})")
    return out


def our_cell(runs, info: dict, q: dict, results: str) -> str:
    vals = our_values(runs, info["ours"], q["method"], q["metric"])
    if vals:
        return "; ".join(vals) + (f"; {info['note']}" if info.get("note") else "")
    why = info.get("why_not") or f"no comparison run on `{info['ours']}` under `{results}`"
    return f"not obtained: {why}"


def caption(data: dict) -> str:
    if data["found_offline"]:
        return f"The paper's values are read from {data['source']} ({data['paper']})."
    return (
        f"The paper's numbers are not recorded here: {data['lookup']} Every "
        f'comparable quantity is listed with "{NOT_AVAILABLE}". Source: {data["paper"]}, '
        f"{data['source']}."
    )


def paper_section(runs, results: str, path: str = DEFAULT_PATH) -> list:
    """Markdown lines of the section, from the data file and the comparison ``runs``."""
    data = load_paper_numbers(path)
    lines = [
        "### The paper's numbers vs ours",
        "",
        caption(data),
        "",
        "Our values: from each comparison run on the dataset (mean over its samples), with the "
        "run directory and the network with its training epochs; our networks are trained on a "
        "2-core CPU, the paper's released checkpoints are named epoch 200 (docs/algorithms.md "
        "§11).",
        "",
        "| paper quantity | dataset | paper value | our value |",
        "|---|---|---|---|",
    ]
    for q in data["quantities"]:
        for ds, v in q["values"].items():
            paper = NOT_AVAILABLE if v["value"] is None else f"{v['value']} ({v['where']})"
            ours = our_cell(runs, data["datasets"][ds], q, results)
            lines.append(f"| {q['quantity']} | {ds} | {paper} | {ours} |")
    return lines + [""]
