"""Calibration of a per-step patch / square size against a reference denoiser
(docs/algorithms.md §6).

Kamb & Ganguli fit the patch size k of their local score machines (:mod:`locality.denoisers.
local_score`) per noise level by comparing the machine with a trained network along the
network's own sampling trajectory; the same procedure sizes PSPC-Square
(:mod:`locality.denoisers.pspc`). :func:`calibrate` returns a :class:`Calibration` whose
:meth:`Calibration.to_json` writes a :class:`~locality.denoisers.patch_schedules.SizeSchedule`
that the machines load with ``patch_size="file:PATH"``; :func:`cosine_legacy_sampler` is Kamb &
Ganguli's 20-step cosine-legacy grid as a DDIM grid. Driven by ``experiments/calibrate.py``.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from locality import schedules
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
    from locality import sampling

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


__all__ = ["Calibration", "calibrate", "cosine_legacy_sampler"]
