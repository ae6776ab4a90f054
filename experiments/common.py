"""Helpers shared by the entry points: workdir, resolved config, atomic JSON, caches, logging,
the image loader and the config parsers that several entry points share."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from locality._io import (
    atomic_write_text,  # noqa: F401  (used by the entry points)
    jsonable,
)
from locality.comparison import subset  # noqa: F401  (the training subsets of the entry points)


def write_json(path: str, obj) -> str:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def prepare_workdir(workdir: str, config) -> str:
    """Create ``workdir`` and write the resolved config (``config.json``)."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return workdir


def synthetic_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """[n, size, size, 1] smooth random images in [-1, 1] (Gaussian-smoothed noise, tanh-squashed),
    locally correlated so that their fields are local; for smoke tests."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, size, size))
    k = np.exp(-0.5 * (np.arange(-2, 3) / 1.0) ** 2)
    for axis in (1, 2):
        z = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, z)
    return np.tanh(0.5 * z)[..., None].astype(np.float32)


def load_images(config, split: str, limit) -> np.ndarray:
    """Images [N, H, W, C] float32 in [-1, 1] named by ``config.dataset``: a dataset of
    :func:`locality.data.load` (at ``config.resolution``); ``"synthetic"`` (``limit`` or 256
    :func:`synthetic_images`, seed 0 for the ``train`` split and 1 for any other); or
    ``"npy:PATH"`` (an [N, H, W, C] array saved with ``np.save``, its first ``limit`` images)."""
    if config.dataset == "synthetic":
        n = int(limit or 256)
        return synthetic_images(n, seed=0 if split == "train" else 1)
    if config.dataset.startswith("npy:"):
        arr = np.load(config.dataset[len("npy:") :])
        return arr[:limit] if limit else arr
    from locality import data

    return data.load(config.dataset, split=split, resolution=config.resolution, limit=limit)


def load_inputs(config) -> np.ndarray:
    """The ``config.num_inputs`` clean inputs of a field experiment from ``config.test_split``:
    a random subset (:func:`subset`, seeded by ``config.seed``) when ``config.test_random`` (a
    source sorted by class), else the first ones."""
    if config.get("test_random", False):
        return subset(load_images(config, config.test_split, None), config.num_inputs, config.seed)
    return load_images(config, config.test_split, config.num_inputs)[: config.num_inputs]


def parse_networks(spec: str) -> dict:
    """``"a=path,b=path"`` -> ``{"a": path, "b": path}`` (labels and paths stripped, in order);
    a malformed item or a repeated label is an error naming the spec."""
    out = {}
    for item in spec.split(","):
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise ValueError(f"networks={spec!r}: use 'label=path,label=path'")
        if label.strip() in out:
            raise ValueError(f"networks={spec!r}: label {label.strip()!r} appears twice")
        out[label.strip()] = path.strip()
    return out


def as_dict(kwargs) -> dict:
    """A plain ``dict`` copy of keyword arguments given as a ``ConfigDict`` or a mapping."""
    return dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)


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
