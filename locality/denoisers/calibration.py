"""Calibration of a per-step patch / square size against a reference denoiser
(docs/algorithms.md §6).

Kamb & Ganguli fit the patch size k of their local score machines (:mod:`locality.denoisers.
local_score`) per noise level by comparing the machine with a trained network along the
network's own sampling trajectory; the same procedure sizes PSPC-Square
(:mod:`locality.denoisers.pspc`). :func:`calibrate` returns a :class:`Calibration` whose
:meth:`Calibration.to_json` writes a :class:`~locality.denoisers.patch_schedules.SizeSchedule`
that the machines load with ``patch_size="file:PATH"``; :func:`cosine_legacy_sampler` is Kamb &
Ganguli's 20-step cosine-legacy grid as a DDIM grid; :func:`default_candidates` the sizes tried
when none are given. Driven by ``experiments/calibrate.py``.

:func:`cached_calibrate` runs :func:`calibrate` once per content and keeps the result in a cache
directory: the file is keyed by a sha256 of the reference's arrays and static options (a
network's parameters), the machine's training set and options, the probe noise and the
calibration settings (:func:`calibration_key`), never by a name alone; :mod:`locality.comparison`
uses it for the calibrated peer rows of ``experiments/compare.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from locality import sampling, schedules
from locality.denoisers.patch_schedules import (
    COSINE_LEGACY_STEPS,
    SizedDenoiser,
    SizeSchedule,
    cosine_legacy_index_abs,
)


class Calibration(NamedTuple):
    """Result of :func:`calibrate`.

    Attributes:
      sizes: int [S], the chosen size per sampling step (high noise first).
      abs: float32 [S], alpha-bar of every step; ``timesteps`` [S] the sampler's t.
      per_seed: int [S, B], the size each seed chose.
      candidates: the sizes tried (increasing).
      scores: float [S, B, len(candidates)]: cosine similarity of scores (criterion "cosine")
        or MSE to the reference x0 (criterion "greedy"; NaN where never evaluated).
      criterion: ``"cosine"`` or ``"greedy"``.
    """

    sizes: np.ndarray
    abs: np.ndarray
    timesteps: np.ndarray
    per_seed: np.ndarray
    candidates: Tuple[int, ...]
    scores: np.ndarray
    criterion: str

    def schedule(self, name: str = "calibrated") -> SizeSchedule:
        """The result as a :class:`SizeSchedule` keyed by the steps' ab (nearest grid point)."""
        return SizeSchedule(
            tuple(int(s) for s in self.sizes), tuple(float(a) for a in self.abs), "ab", name
        )

    def to_json(self, path: str, name: str = "calibrated", **metadata) -> None:
        """Write the schedule (loadable with ``patch_size="file:PATH"``) and the raw results."""
        self.schedule(name).to_json(
            path,
            criterion=self.criterion,
            candidates=list(self.candidates),
            timesteps=[float(t) for t in self.timesteps],
            per_seed=self.per_seed.tolist(),
            scores=np.where(np.isnan(self.scores), None, self.scores).tolist(),
            **metadata,
        )


def _lower_median(v: np.ndarray) -> int:
    s = np.sort(np.asarray(v))
    return int(s[(len(s) - 1) // 2])


def _cosine(a, b):
    a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
    b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.where(den == 0, 1.0, den)


def _mse(a, b):
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return np.mean(d.reshape(d.shape[0], -1) ** 2, axis=1)


def calibrate(
    reference,
    machine: SizedDenoiser,
    candidates: Sequence[int],
    x_T,
    *,
    sched: Optional[schedules.DiscreteSchedule] = None,
    num_steps: int = 10,
    timesteps=None,
    criterion: str = "cosine",
) -> Calibration:
    """Per-step size of ``machine`` that best matches ``reference`` along its own trajectory.

    The reference (e.g. ``denoisers.make("network", checkpoint=PATH)``) is sampled with
    deterministic DDIM (:func:`locality.sampling.ddim`) from ``x_T`` [B, H, W, C] (one seed per
    batch element); at every step the machine is evaluated at the reference's own ``(x_t, ab)``.

    * ``criterion="cosine"`` (Kamb & Ganguli): per seed, the candidate maximising the cosine
      similarity of the scores ``(sqrt(ab) x0_hat - x_t) / (1 - ab)`` (whole image); per step,
      the (lower) median over seeds.
    * ``criterion="greedy"``: per seed, start at the first candidate and move to the next while the
      MSE to the reference's ``x0_hat`` does not increase; per step, the lower median over seeds.

    Args:
      machine: an ``ls``/``els``/``bbels``/``pspc_square`` denoiser; only its training set and
        options are used (``machine.with_patch_size(k)`` for every candidate k).
      candidates: increasing sizes to try (e.g. 3, 5, ..., 27).
      sched, num_steps, timesteps: the DDIM grid (default: DDPM linear, 10 leading steps).
    """
    cands = tuple(int(c) for c in candidates)
    if not cands:
        raise ValueError("calibrate needs at least one candidate size")
    if list(cands) != sorted(set(cands)):
        raise ValueError(f"candidates must be strictly increasing, got {cands}")
    if criterion not in ("cosine", "greedy"):
        raise ValueError(f"criterion must be 'cosine' or 'greedy', got {criterion!r}")
    for k in cands:
        machine._check_size(k)
    t_start = time.perf_counter()
    traj = sampling.ddim(reference, x_T, sched, num_steps, timesteps=timesteps)
    xts, x0s = np.asarray(traj.xts), np.asarray(traj.x0_hats)
    n_steps, b = xts.shape[:2]
    scores = np.full((n_steps, b, len(cands)), np.nan)
    per_seed = np.zeros((n_steps, b), np.int64)
    evaluate = lambda k, s: np.asarray(machine.with_patch_size(k)(xts[s], float(traj.abs[s])))
    for s in range(n_steps):
        ab = float(traj.abs[s])
        if criterion == "cosine":
            ref_score = np.asarray(schedules.score_from_x0(xts[s], x0s[s], ab))
            for j, k in enumerate(cands):
                score = np.asarray(schedules.score_from_x0(xts[s], evaluate(k, s), ab))
                scores[s, :, j] = _cosine(score, ref_score)
            per_seed[s] = np.asarray(cands)[np.argmax(scores[s], axis=1)]
        else:
            pos = np.zeros(b, np.int64)
            active = np.ones(b, bool)
            scores[s, :, 0] = _mse(evaluate(cands[0], s), x0s[s])
            for j in range(1, len(cands)):
                if not active.any():
                    break
                scores[s, :, j] = _mse(evaluate(cands[j], s), x0s[s])
                step = active & (scores[s, :, j] <= scores[s, :, j - 1])
                pos[step] = j
                active &= step
            per_seed[s] = np.asarray(cands)[pos]
        logging.getLogger(__name__).info(
            "calibrate %s step %d/%d (ab %.4g): sizes per seed %s [%.1fs elapsed]",
            criterion,
            s + 1,
            n_steps,
            ab,
            per_seed[s].tolist(),
            time.perf_counter() - t_start,
        )
    sizes = np.asarray([_lower_median(per_seed[s]) for s in range(n_steps)], np.int64)
    return Calibration(
        sizes,
        np.asarray(traj.abs, np.float32),
        np.asarray(traj.timesteps),
        per_seed,
        cands,
        scores,
        criterion,
    )


def cosine_legacy_sampler(num_steps: int = COSINE_LEGACY_STEPS):
    """Kamb & Ganguli's grid as a DDIM grid: ``(schedule, timesteps)`` for :func:`sampling.ddim`.

    The schedule's entry ``i`` has ``ab = cos^2((i / S) / 1.008 * pi / 2)``; the timesteps are
    ``S - 1, ..., 1`` (t = 0.95 ... 0.05; entry 0 has ab = 1 and is only the final ``ab_prev``),
    as in their sampler.
    """
    ab = cosine_legacy_index_abs(num_steps).astype(np.float32)
    prev = np.concatenate([[1.0], ab[:-1]]).astype(np.float32)
    betas = (1.0 - ab / prev).astype(np.float32)
    sched = schedules.DiscreteSchedule(betas=betas, alphas_cumprod=ab, name="cosine_legacy")
    return sched, np.arange(num_steps - 1, 0, -1, dtype=np.int32)


def default_candidates(method: str, shape) -> list:
    """Odd sizes 3, 5, ... up to the image side (and the side itself for PSPC squares)."""
    side = min(shape[0], shape[1])
    odd = list(range(3, side + 1, 2))
    if method == "pspc_square" and side not in odd:
        odd.append(side)
    return odd


# ----------------------------------------------------------------------------------------------
# Content-keyed cache of calibrations.

CACHE_FORMAT = "locality.calibration_cache/1"


def _static_token(v) -> str:
    """A deterministic text for a static (non-array) field: reprs without memory addresses;
    device meshes are left out (they do not change the numbers, docs/architecture.md)."""
    if isinstance(v, jax.sharding.Mesh):
        return "<mesh>"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))


def _digest(h, obj) -> None:
    """Feed ``obj`` (a pytree of arrays, dataclass fields, containers and scalars) into ``h``:
    array leaves by dtype, shape and bytes; flax static fields by :func:`_static_token`."""
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):  # typed keys: their bits
            obj = jax.random.key_data(obj)
        a = np.ascontiguousarray(np.asarray(obj))
        h.update(f"array {a.dtype.str} {a.shape};".encode())
        h.update(a.tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"{type(obj).__module__}.{type(obj).__qualname__}(".encode())
        for f in dataclasses.fields(obj):
            h.update(f"{f.name}=".encode())
            v = getattr(obj, f.name)
            if f.metadata.get("pytree_node", True) and not isinstance(v, str):
                _digest(h, v)
            else:
                h.update(_static_token(v).encode())
            h.update(b";")
        h.update(b")")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(f"{k!s}:".encode())
            _digest(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__qualname__}[".encode())
        for v in obj:
            _digest(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__qualname__} {_static_token(obj)};".encode())


def content_hash(obj) -> str:
    """sha256 hex digest of ``obj``'s content (:func:`_digest`): equal for equal arrays and
    options, different when any parameter, training image or static option differs."""
    h = hashlib.sha256()
    _digest(h, obj)
    return h.hexdigest()


def calibration_key(
    reference,
    machine: SizedDenoiser,
    candidates: Sequence[int],
    x_T,
    *,
    sched: Optional[schedules.DiscreteSchedule] = None,
    num_steps: int = 10,
    timesteps=None,
    criterion: str = "cosine",
) -> dict:
    """The content hashes that key a cached calibration: ``{"reference", "machine", "settings",
    "key"}``. ``reference``: every array leaf (a network's parameters, its schedule table) and
    static option (architecture, guidance); ``machine``: its training set as stored and its options
    except the patch size; ``settings``: candidates, criterion, the DDIM grid (schedule and
    timesteps) and the probe noise ``x_T``; ``key``: the hash of the three and the format."""
    sched = sched or schedules.ddpm_linear()
    if timesteps is None:
        timesteps = schedules.ddim_timesteps(num_steps, sched.num_timesteps)
    parts = {
        "reference": content_hash(reference),
        "machine": content_hash(machine._stripped()),
        "settings": content_hash(
            {
                "candidates": [int(c) for c in candidates],
                "criterion": str(criterion),
                "alphas_cumprod": np.asarray(sched.alphas_cumprod),
                "timesteps": np.asarray(timesteps, np.int64),
                "x_T": np.asarray(x_T, np.float32),
            }
        ),
    }
    parts["key"] = hashlib.sha256(
        (
            CACHE_FORMAT + "|" + "|".join(parts[k] for k in ("reference", "machine", "settings"))
        ).encode()
    ).hexdigest()
    return parts


class CachedCalibration(NamedTuple):
    """Result of :func:`cached_calibrate`: the calibration, the cache file, whether it was read
    from the cache (``hit``), the content hashes (:func:`calibration_key`) and the seconds the
    calibration took when it was computed."""

    calibration: Calibration
    path: str
    hit: bool
    key: dict
    seconds: float


def _load_cached(path: str, key: str) -> Tuple[Calibration, float]:
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("cache_format") != CACHE_FORMAT or d.get("cache_key") != key:
            raise ValueError(f"its key {d.get('cache_key')!r} is not {key!r}")
        scores = np.asarray(
            [[[np.nan if v is None else v for v in row] for row in seed] for seed in d["scores"]],
            np.float64,
        )
        cal = Calibration(
            np.asarray(d["sizes"], np.int64),
            np.asarray(d["grid"], np.float32),
            np.rint(np.asarray(d["timesteps"], np.float64)).astype(np.int32),
            np.asarray(d["per_seed"], np.int64),
            tuple(int(c) for c in d["candidates"]),
            scores,
            str(d["criterion"]),
        )
        return cal, float(d.get("seconds", float("nan")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"calibration cache file {path!r} is unreadable or for other content ({e}); "
            "delete it and run again to recompute"
        ) from e


def cached_calibrate(
    reference,
    machine: SizedDenoiser,
    candidates: Sequence[int],
    x_T,
    *,
    cache_dir: str,
    sched: Optional[schedules.DiscreteSchedule] = None,
    num_steps: int = 10,
    timesteps=None,
    criterion: str = "cosine",
    name: str = "calibrated",
) -> CachedCalibration:
    """:func:`calibrate`, computed once per content and cached under ``cache_dir``.

    The file ``<cache_dir>/calibration/<name>-<key>.json`` (``key`` from
    :func:`calibration_key`; ``name`` is only a readable prefix) holds the schedule
    (``patch_size="file:PATH"`` loads it), the raw results of :meth:`Calibration.to_json`, the
    content hashes and the seconds the calibration took. A file whose stored key differs or that
    cannot be read is an error (delete it to recompute). Written atomically.
    """
    parts = calibration_key(
        reference,
        machine,
        candidates,
        x_T,
        sched=sched,
        num_steps=num_steps,
        timesteps=timesteps,
        criterion=criterion,
    )
    if not cache_dir:
        raise ValueError("cached_calibrate needs a cache directory; got an empty cache_dir")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "calibrated"
    path = os.path.join(cache_dir, "calibration", f"{safe}-{parts['key'][:32]}.json")
    if os.path.exists(path):
        cal, seconds = _load_cached(path, parts["key"])
        logging.getLogger(__name__).info("calibration cache hit: %s", path)
        return CachedCalibration(cal, path, True, parts, seconds)
    t0 = time.perf_counter()
    cal = calibrate(
        reference,
        machine,
        candidates,
        x_T,
        sched=sched,
        num_steps=num_steps,
        timesteps=timesteps,
        criterion=criterion,
    )
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cal.to_json(
        path,
        name=name,
        cache_format=CACHE_FORMAT,
        cache_key=parts["key"],
        content=parts,
        seconds=seconds,
        num_probes=int(np.shape(x_T)[0]),
    )
    logging.getLogger(__name__).info("calibration computed in %.1fs: %s", seconds, path)
    return CachedCalibration(cal, path, False, parts, seconds)


__all__ = [
    "CACHE_FORMAT",
    "CachedCalibration",
    "Calibration",
    "cached_calibrate",
    "calibrate",
    "calibration_key",
    "content_hash",
    "cosine_legacy_sampler",
    "default_candidates",
]
