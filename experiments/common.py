"""Helpers shared by the entry points: workdir, resolved config, atomic JSON, caches, logging."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from locality._io import (
    atomic_write_text,  # noqa: F401  (used by the entry points)
    jsonable,
)


def write_json(path: str, obj) -> str:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def prepare_workdir(workdir: str, config) -> str:
    """Create ``workdir`` and write the resolved config (``config.json``)."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return workdir


def subset(train, limit, seed: int):
    """``limit`` training images drawn without replacement (fixed by ``seed``, kept in dataset
    order), or all of them. A random subset, not a prefix: some sources are sorted by class."""
    if not limit or limit >= len(train):
        return train
    if limit < 1:
        raise ValueError(f"a method's training-set limit must be >= 1, got {limit}")
    idx = np.sort(np.random.default_rng(seed).choice(len(train), int(limit), replace=False))
    return train[idx]


def stats_cache_dir() -> str:
    """Statistics cache: ``$LOCALITY_CACHE_DIR`` or ``~/.cache/locality/stats``."""
    return os.environ.get("LOCALITY_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "locality", "stats"
    )


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def write_summary(workdir: str, lines) -> str:
    """Write ``summary.txt`` (atomically) and log it; returns the text."""
    text = "\n".join(lines)
    atomic_write_text(os.path.join(workdir, "summary.txt"), text + "\n")
    from absl import logging

    logging.info("\n%s", text)
    return text


def run_as_program(run, config_help: str) -> None:
    """absl entry point for ``run(config, workdir)``: defines ``--config`` and ``--workdir`` and
    runs. Called only under ``if __name__ == "__main__"``, so tests can import several entry
    points without their flags colliding."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, config_help)
    workdir = flags.DEFINE_string("workdir", None, "output directory")

    def main(argv):
        del argv
        if workdir.value is None or config.value is None:
            raise app.UsageError("--config and --workdir are required")
        out = run(config.value, workdir.value)
        if isinstance(out, str):
            print(out)

    app.run(main)
