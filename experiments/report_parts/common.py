"""Helpers shared by the report's sections: reading run files, printing commands and numbers,
naming networks."""

from __future__ import annotations

import importlib
import json
import os
from typing import List, Optional

import numpy as np


def load_json(path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when the file is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def command(exp: str, arg: str, d: str, extra: str = "") -> str:
    """The command line that reruns experiment ``exp`` with config argument ``arg`` into ``d``."""
    return f"python -m experiments.{exp} --config configs/{exp}.py:{arg} --workdir {d}{extra}"


def overrides(exp: str, arg: str, cfg: dict) -> str:
    """`` --config.K=V`` for the top-level scalar fields of a run's config.json that differ from
    ``configs/<exp>.py:<arg>`` (so the printed command reproduces the run)."""
    try:
        default = importlib.import_module(f"configs.{exp}").get_config(arg).to_dict()
    except Exception:  # an unknown arg: print the plain command
        return ""
    return "".join(diff_fields(cfg, default, "config"))


def diff_fields(cfg: dict, default: dict, prefix: str) -> list:
    """`` --<prefix>.K=V`` for scalar and tuple fields of ``cfg`` that differ from ``default``,
    descending into nested dicts present in both (e.g. ``networks.unet``)."""
    out = []
    scalar = (int, float, str, bool)
    for k, v in sorted(cfg.items()):
        if isinstance(v, scalar) and k in default and default[k] != v:
            out.append(f" --{prefix}.{k}={v}")
        elif (
            isinstance(v, list)
            and all(isinstance(x, scalar) for x in v)
            and isinstance(default.get(k), (list, tuple))
            and list(default[k]) != v
        ):
            items = ", ".join(json.dumps(x) for x in v) + ("," if len(v) == 1 else "")
            out.append(f" --{prefix}.{k}='({items})'")
        elif isinstance(v, dict) and isinstance(default.get(k), dict):
            out += diff_fields(v, default[k], f"{prefix}.{k}")
    return out


def fmt(x, nd=3) -> str:
    """``x`` with ``nd`` decimals, or ``n/a`` for None and non-finite values."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def rel(path: str, out_dir: str) -> str:
    return os.path.relpath(path, out_dir)


def figures(d: str, names, out_dir: str) -> List[str]:
    """Markdown image lines for the files of ``names`` that exist in run directory ``d``."""
    return [
        f"![{f}]({rel(os.path.join(d, f), out_dir)})"
        for f in names
        if os.path.exists(os.path.join(d, f))
    ]


def network_name(checkpoint: str) -> str:
    """``checkpoints/mnist_unet_long/epoch_40/`` -> ``mnist_unet_long/epoch_40``."""
    name = str(checkpoint).rstrip("/")
    return name[len("checkpoints/") :] if name.startswith("checkpoints/") else name


def network_epochs(
    checkpoint: str, n_train: int, holdout: float = 0.0, dataset: Optional[str] = None
) -> Optional[float]:
    """Epochs a network trained for: steps x batch / training images, read from the export's
    ``metrics.json`` (``steps``) and ``config.json`` (``train.batch_size``). ``n_train`` is the
    size of the training set the run used; None when the export's files are missing or the
    network trained on other data than the run: another ``train.dataset`` than ``dataset``, or
    another held-out part (``train.holdout`` vs ``holdout``), so that ``n_train`` is not the
    size of its training set."""
    m = load_json(os.path.join(str(checkpoint), "metrics.json")) or {}
    tr = (load_json(os.path.join(str(checkpoint), "config.json")) or {}).get("train") or {}
    steps, batch = m.get("steps"), tr.get("batch_size")
    if not steps or not batch or not n_train:
        return None
    if dataset and tr.get("dataset") and tr["dataset"] != dataset:
        return None
    if float(tr.get("holdout") or 0.0) != float(holdout or 0.0):
        return None
    n = min(n_train, tr["data_limit"]) if tr.get("data_limit") else n_train
    return steps * batch / n


def network_label(
    checkpoint: str, n_train: int, holdout: float = 0.0, dataset: Optional[str] = None
) -> str:
    """``network `mnist_unet_long/epoch_40` (40 epochs)`` (no epochs when unknown)."""
    ep = network_epochs(checkpoint, n_train, holdout, dataset)
    epochs = "" if ep is None else f" ({ep:.1f} epochs)" if ep < 10 else f" ({ep:.0f} epochs)"
    return f"network `{network_name(checkpoint)}`{epochs}"
