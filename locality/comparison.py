"""Analytical denoisers against a trained network along shared DDIM trajectories: the rows of
``experiments/compare.py`` (docs/algorithms.md §10).

- :class:`Protocol` (with :class:`CalibrationSettings`) -- the sampling grid and the options of a
  comparison, validated when built (the entry point converts its ConfigDict).
- :func:`reference_run` -- the network's own DDIM trajectories from the run's noise (or from
  probe noise, :func:`noise` with a ``fold_in`` tag, never the evaluation noise).
- :func:`row_specs`, :func:`drop_missing` -- the rows ``(label, kwargs, limit)`` of a table: the
  configured methods, the SCFDM sweep (§8), rows whose files are missing left out with the reason.
- :func:`evaluate`, :func:`evaluate_rows` -- one row / every row on its training subset
  (:func:`subset`): trajectory and single-step r2 / MSE / Pearson per step, the high-pass r2
  (:func:`locality.metrics.hp_r2`), final-step means, medians and per-step standard errors.
- :func:`final_grid` -- the final samples of every row beside the network's.

The protocol options (calibrated peers, the common subset, SCFDM's scale picked on probes) are
:mod:`locality.comparison_options`; tables and figures :mod:`locality.comparison_tables`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from locality import denoisers, metrics, sampling

NEEDS_STATS = {"wiener", "wiener_dense", "pca_locality"}
NO_TRAIN = {"wiener", "wiener_dense", "linear"}  # closed forms / fitted weights, no training set
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How the peers are calibrated (:func:`calibrate_peers`).

    Attributes:
      num_probes: probe trajectories (noise independent of the evaluation noise).
      criterion: ``"cosine"`` (Kamb & Ganguli) or ``"greedy"``.
      candidates: sizes tried; empty: :func:`locality.denoisers.calibration.default_candidates`.
      limit: training images of the calibrated machine; 0: those of the published row.
      pspc_square: calibrate PSPC-Square too.
    """

    num_probes: int = 4
    criterion: str = "cosine"
    candidates: Tuple[int, ...] = ()
    limit: int = 0
    pspc_square: bool = True


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The sampling grid and options of a comparison (docs/algorithms.md §10), checked when built:
    a bad option fails before any work, naming the value and the fix.

    Attributes:
      dataset, checkpoint: names recorded with the results (the calibration cache's file names).
      num_samples, num_steps, batch_size, seed: evaluation samples from ``normal(key(seed))``,
        DDIM steps, samples per call.
      hp_sigma: blur (px) removed before the high-pass r2.
      common_subset: > 0: every row again on one common random subset of that many images.
      calibrate_peers, calibration: calibrated rows of the patch-size peers and their settings.
      scfdm_sigmas: SCFDM smoothing scales swept, each its own row; the best on probe
        trajectories is also the row ``<label>_best``
        (:func:`locality.comparison_options.select_scfdm`).
      scfdm_probe_samples: probe trajectories of that choice; 0: ``calibration.num_probes``.
      cache_dir: the statistics and calibration cache.
    """

    dataset: str
    checkpoint: str
    num_samples: int = 32
    num_steps: int = 10
    batch_size: int = 16
    seed: int = 0
    hp_sigma: float = 1.0
    common_subset: int = 0
    calibrate_peers: bool = False
    calibration: CalibrationSettings = dataclasses.field(default_factory=CalibrationSettings)
    scfdm_sigmas: Tuple[float, ...] = ()
    scfdm_probe_samples: int = 0
    cache_dir: str = ""

    def __post_init__(self):
        n = self.common_subset
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(
                f"config.common_subset must be an int >= 0 (0 = off), got {n!r}; e.g. "
                "--config.common_subset=100"
            )
        metrics.gaussian_kernel1d(self.hp_sigma)  # raises for sigma <= 0
        for s in self.scfdm_sigmas:
            if isinstance(s, bool) or not np.isfinite(float(s)) or float(s) < 0:
                raise ValueError(
                    f"config.scfdm_sigmas holds {s!r}; every smoothing scale must be a finite "
                    "number >= 0 (units of x_t), e.g. --config.scfdm_sigmas='(0.05, 0.1, 0.5)'"
                )
        object.__setattr__(self, "hp_sigma", float(self.hp_sigma))
        p = self.scfdm_probe_samples
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0:
            raise ValueError(
                f"config.scfdm_probe_samples must be an int >= 0 (0 = calibration.num_probes), "
                f"got {p!r}; e.g. --config.scfdm_probe_samples=8"
            )
        if self.scfdm_sigmas and not p and int(self.calibration.num_probes) < 1:
            raise ValueError(
                "the SCFDM scale is picked on probe trajectories: set "
                f"config.scfdm_probe_samples >= 1 or config.calibration.num_probes >= 1 (got "
                f"{self.calibration.num_probes})"
            )
        if self.calibrate_peers:
            cal = self.calibration
            if int(cal.num_probes) < 1:
                raise ValueError(
                    f"config.calibration.num_probes must be >= 1, got {cal.num_probes}"
                )
            if cal.criterion not in ("cosine", "greedy"):
                raise ValueError(
                    "config.calibration.criterion must be 'cosine' or 'greedy', got "
                    f"{cal.criterion!r}"
                )


def subset(train, limit, seed: int):
    """``limit`` training images drawn without replacement (fixed by ``seed``, kept in dataset
    order), or all of them. A random subset, not a prefix: some sources are sorted by class."""
    if not limit or limit >= len(train):
        return train
    if limit < 1:
        raise ValueError(f"a method's training-set limit must be >= 1, got {limit}")
    idx = np.sort(np.random.default_rng(seed).choice(len(train), int(limit), replace=False))
    return train[idx]


def build(label: str, kwargs: dict, train, st):
    """(registered method, denoiser) of a row: ``kwargs.method`` or the label itself, given the
    statistics ``st`` and / or the training images where its factory takes them."""
    kwargs = dict(kwargs)
    method = kwargs.pop("method", label)
    if method in NEEDS_STATS:
        kwargs["stats"] = st
    if method not in NO_TRAIN:
        kwargs["train"] = train
    return method, denoisers.make(method, **kwargs)


def sample_batches(den, x_T, sched, num_steps, batch):
    """DDIM over ``x_T`` in batches; returns stacked x0_hats [S, N, ...], xts, abs, timesteps."""
    outs = [
        sampling.ddim(den, x_T[i : i + batch], sched, num_steps) for i in range(0, len(x_T), batch)
    ]
    return (
        np.concatenate([np.asarray(o.x0_hats) for o in outs], axis=1),
        np.concatenate([np.asarray(o.xts) for o in outs], axis=1),
        outs[0].abs,
        outs[0].timesteps,
    )


def noise(seed: int, num: int, shape, tag: Optional[int] = None):
    """float32 ``normal(key(seed))`` of shape ``[num, *shape]``; with ``tag``, from
    ``fold_in(key(seed), tag)`` (probe noise, independent of the evaluation noise)."""
    key = jax.random.key(seed)
    if tag is not None:
        key = jax.random.fold_in(key, tag)
    return jax.random.normal(key, (int(num),) + tuple(shape), jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """The network's trajectories that every row is compared with.

    Attributes:
      net: the network denoiser; x_T: [N, H, W, C] initial noise.
      sched, num_steps, batch_size: the DDIM grid and samples per call.
      x0: [S, N, H, W, C] the network's x0_hat per step; abs, timesteps: [S] of the grid.
      seconds: time the network's sampling took.
    """

    net: object
    x_T: np.ndarray
    sched: object
    num_steps: int
    batch_size: int
    x0: np.ndarray
    abs: np.ndarray
    timesteps: np.ndarray
    seconds: float


def reference_run(net, shape, protocol: Protocol, sched, num=None, tag=None) -> Reference:
    """The network sampled by DDIM from :func:`noise` (``num`` samples, default
    ``protocol.num_samples``; ``tag`` for probe noise)."""
    x_T = np.asarray(noise(protocol.seed, protocol.num_samples if num is None else num, shape, tag))
    t0 = time.perf_counter()
    x0, _, abs_, ts = sample_batches(net, x_T, sched, protocol.num_steps, protocol.batch_size)
    seconds = time.perf_counter() - t0
    log.info("network sampled in %.1fs", seconds)
    num_steps, batch = protocol.num_steps, protocol.batch_size
    return Reference(net, x_T, sched, num_steps, batch, x0, abs_, ts, seconds)


def _hp_per_step(x0, ref, sigma: float) -> np.ndarray:
    """High-pass r2 of every step and sample: [S, N] (:func:`locality.metrics.hp_r2`)."""
    f = jax.jit(jax.vmap(lambda u, v: metrics.hp_r2(u, v, sigma, "none")))
    return np.asarray(f(jnp.asarray(x0), jnp.asarray(ref)))


def _se(v: np.ndarray) -> list:
    """Standard error over samples of every step of ``v`` [S, N]."""
    return [float(a) for a in v.std(1, ddof=1) / np.sqrt(v.shape[1])]


def evaluate(label, kw, tr, st, ref: Reference, hp_sigma: float):
    """One row: the method of ``label`` (kwargs ``kw``) on training set ``tr`` sampled from
    ``ref.x_T`` and compared with the network (trajectory and single-step, docs/algorithms.md
    §10). Returns (the row's dict, its final x0_hat [N, H, W, C])."""
    method, den = build(label, kw, tr, st)
    b, net, abs_, ts = ref.batch_size, ref.net, ref.abs, ref.timesteps
    t0 = time.perf_counter()
    x0, xt, _, _ = sample_batches(den, ref.x_T, ref.sched, ref.num_steps, b)
    single = np.stack(
        [
            np.concatenate(
                [
                    np.asarray(net(jnp.asarray(xt[s, i : i + b]), float(abs_[s])))
                    for i in range(0, len(ref.x_T), b)
                ]
            )
            for s in range(len(ts))
        ]
    )
    seconds = time.perf_counter() - t0
    traj = metrics.per_step(x0, ref.x0, reduce="none")  # {metric: [S, N]}
    one = metrics.per_step(x0, single, reduce="none")
    hp = _hp_per_step(x0, ref.x0, hp_sigma)
    res = {
        "method": method,
        "kwargs": kw,
        "train_size": int(len(tr)),
        "seconds": seconds,
        "timesteps": ts,
        "trajectory": {k: v.mean(1) for k, v in traj.items()},
        "single_step": {k: v.mean(1) for k, v in one.items()},
    }
    for kind, m in (("trajectory", traj), ("single_step", one)):
        for name, v in m.items():
            res[f"final_{kind}_{name}_mean"] = float(v[-1].mean())
            res[f"final_{kind}_{name}_median"] = float(np.median(v[-1]))
            res[f"stepmean_{kind}_{name}"] = float(v.mean())
        res[f"final_{kind}_r2_per_sample"] = [float(a) for a in m["r2"][-1]]
        for name in ("r2", "mse"):
            res[f"{kind}_{name}_per_step_se"] = _se(m[name])
    res["trajectory"]["hp_r2"] = hp.mean(1)
    res["trajectory_hp_r2_per_step_se"] = _se(hp)
    res["final_trajectory_hp_r2_mean"] = float(hp[-1].mean())
    res["final_trajectory_hp_r2_median"] = float(np.median(hp[-1]))
    res["final_trajectory_hp_r2_per_sample"] = [float(a) for a in hp[-1]]
    res["stepmean_trajectory_hp_r2"] = float(hp.mean())
    log.info(
        "%s (N %d): final trajectory r2 %.3f (median %.3f), high-pass r2 %.3f, single-step r2 "
        "%.3f, %.1fs",
        label,
        len(tr),
        res["final_trajectory_r2_mean"],
        res["final_trajectory_r2_median"],
        res["final_trajectory_hp_r2_mean"],
        res["final_single_step_r2_mean"],
        seconds,
    )
    return res, x0[-1]


def row_specs(methods: str, method_kwargs: dict, slow_methods: str, peer_limit, scfdm_sigmas=()):
    """``[(label, kwargs, limit)]`` of the main table before calibration: the methods of the
    comma list ``methods`` (kwargs from ``method_kwargs[label]``, training-set ``limit`` from
    its ``limit`` or ``peer_limit`` for ``slow_methods``), each SCFDM row followed by the rows
    ``<label>_s<sigma>`` of its sweep over ``scfdm_sigmas`` (the configured scale keeps the
    label)."""
    slow = set(filter(None, slow_methods.split(",")))
    specs = []
    for label in [m for m in methods.split(",") if m]:
        kw = dict(method_kwargs.get(label, {}))
        limit = kw.pop("limit", None) or (peer_limit if label in slow else None)
        specs.append((label, kw, limit))
        if kw.get("method", label) == "scfdm":
            base = float(kw.get("sigma_s", 0.1))
            for sig in scfdm_sigmas:
                if float(sig) == base:
                    continue
                kw_s = dict(kw, method="scfdm", sigma_s=float(sig))
                specs.append((f"{label}_s{float(sig):g}", kw_s, limit))
    return specs


def _missing_file(label, kw, dataset):
    missing = [
        v
        for k, v in kw.items()
        if k in ("weights", "network", "checkpoint")
        and isinstance(v, str)
        and not os.path.exists(v)
    ]
    if not missing:
        return None
    return f"{missing[0]} does not exist" + (
        "; train it with python -m experiments.linear_gd --config "
        f"configs/linear_gd.py:{dataset},ddim --workdir "
        f"{os.path.dirname(missing[0])}"
        if label == "linear"
        else ""
    )


def drop_missing(specs, dataset: str):
    """(``specs`` without the rows whose weights / network / checkpoint file is missing,
    ``{label: why}`` of those, with the command that makes the file where there is one)."""
    skipped = {}
    for label, kw, _ in specs:
        why = _missing_file(label, kw, dataset)
        if why:
            skipped[label] = why
            log.warning("skipping %s: %s", label, why)
    return [sp for sp in specs if sp[0] not in skipped], skipped


def evaluate_rows(protocol: Protocol, specs, train, st, ref: Reference, calibrated=None):
    """Every row of ``specs`` (:func:`evaluate`) on its training subset (:func:`subset`, the
    run's seed). Returns ``{label: row}`` (rows of ``calibrated``, ``{label: family}`` from
    :func:`locality.comparison_options.calibrate_peers`, marked ``calibrated_from``),
    ``{label: final x0_hat}`` and ``{label: training images used}``."""
    calibrated = calibrated or {}
    results, finals, used = {}, {}, {}
    for label, kw, limit in specs:
        tr = subset(train, limit, protocol.seed)
        results[label], finals[label] = evaluate(label, kw, tr, st, ref, protocol.hp_sigma)
        if label in calibrated:
            results[label]["calibrated_from"] = calibrated[label]
        used[label] = tr
    return results, finals, used


def final_grid(ref: Reference, finals: dict, train, k: int = 8) -> dict:
    """Rows of ``grid.png``: the network's final samples, every row's (``finals``, in order) and
    the training image nearest to each network sample (the ``nearest`` denoiser), ``k`` each."""
    k = min(k, len(ref.x_T))
    nn = denoisers.make("nearest", train=train)
    grid = {"network": ref.x0[-1][:k]}
    grid.update({label: x[:k] for label, x in finals.items()})
    grid["nearest train"] = np.asarray(nn(jnp.asarray(ref.x0[-1][:k]), 0.5))
    return grid
