"""The protocol options of a score comparison (docs/algorithms.md §10), on the rows of
:mod:`locality.comparison`: what makes the rows comparable for a referee.

- :func:`calibrate_peers` -- the patch-size peers' schedules calibrated against the network
  (:func:`locality.denoisers.calibration.cached_calibrate`) and their ``<label>_calibrated`` rows.
- :func:`subset_rows` -- every row again on one common random subset of the training set.
- :func:`select_scfdm` -- SCFDM's smoothing scale picked on probe trajectories (never on the
  evaluation samples) and its row ``<label>_best``; :func:`scfdm_sweep` -- the summary of the
  sweep for ``metrics.json``.

Probe noise comes from ``fold_in(key(seed), tag)`` with the tags below, so it never equals the
evaluation noise ``normal(key(seed))``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from locality import denoisers, metrics, schedules, stats
from locality.comparison import (
    NEEDS_STATS,
    Protocol,
    Reference,
    build,
    evaluate,
    noise,
    reference_run,
    sample_batches,
    subset,
)
from locality.denoisers import calibration as calibration_lib

# Methods with a patch / square size and the machine whose calibrated schedule each one uses:
# LS, ELS and bbELS share LS's (Kamb & Ganguli), PSPC-Square is calibrated by itself.
CALIBRATED_BY = {"ls": "ls", "els": "ls", "bbels": "ls", "pspc_square": "pspc_square"}
# fold_in tags of the run's key for noise that must differ from the evaluation noise: the
# calibration probes and the probes that pick SCFDM's smoothing scale
PROBE_TAG = 1
SCFDM_PROBE_TAG = 2

log = logging.getLogger(__name__)


def calibrate_peers(protocol: Protocol, specs, train, ref: Reference, method_kwargs, out_dir):
    """Calibrated schedules of the patch-size peers in ``specs`` and their extra rows.

    Returns (summary per calibrated machine for ``metrics.json["calibration"]``, ``specs`` with
    every ``<label>_calibrated`` row after its published one, ``{calibrated label: family}``).
    Each machine is calibrated once against ``ref.net`` on the training set of its own published
    row (or ``method_kwargs`` of the family's machine when it has no row), with
    ``calibration.num_probes`` probe trajectories whose noise is drawn from
    ``fold_in(key(seed), PROBE_TAG)`` (never the evaluation noise), on this run's DDIM grid;
    the result is cached by content (:func:`locality.denoisers.calibration.cached_calibrate`)
    and its schedule copied to ``out_dir/schedule_<family>_calibrated.json``.
    """
    cal_cfg, seed, sched = protocol.calibration, protocol.seed, ref.sched
    by_label = {label: (kw, limit) for label, kw, limit in specs}
    families = {}
    for label, kw, _ in specs:
        method = kw.get("method", label)
        fam = CALIBRATED_BY.get(method)
        if fam == "pspc_square" and not cal_cfg.pspc_square:
            continue
        if fam is not None:
            families.setdefault(fam, []).append(label)
    summary, extra, new_rows = {}, {}, {}
    shape = train.shape[1:]
    x_probe = noise(seed, cal_cfg.num_probes, shape, PROBE_TAG)
    timesteps = schedules.ddim_timesteps(protocol.num_steps, sched.num_timesteps)
    for fam, users in families.items():
        # the machine of the family on the training set of its own published row
        if fam in by_label:
            kw, limit = by_label[fam]
        else:  # e.g. els without ls: LS on the whole training set, as Kamb & Ganguli
            kw = dict(method_kwargs.get(fam, {}))
            limit = kw.pop("limit", None)
        limit = cal_cfg.limit or limit
        tr = subset(train, limit, seed)
        mkw = {k: v for k, v in kw.items() if k not in ("method", "patch_size")}
        machine = denoisers.make(fam, train=tr, patch_size=3, **mkw)
        cands = list(cal_cfg.candidates) or calibration_lib.default_candidates(fam, shape)
        res = calibration_lib.cached_calibrate(
            ref.net,
            machine,
            cands,
            x_probe,
            cache_dir=protocol.cache_dir,
            sched=sched,
            num_steps=protocol.num_steps,
            timesteps=timesteps,
            criterion=cal_cfg.criterion,
            name=f"{fam}_{protocol.dataset}",
        )
        cal = res.calibration
        path = os.path.join(out_dir, f"schedule_{fam}_calibrated.json")
        cal.to_json(
            path,
            name=f"{fam}_{protocol.dataset}_calibrated",
            method=fam,
            dataset=protocol.dataset,
            reference=protocol.checkpoint,
            cache=res.path,
            content=res.key,
        )
        summary[fam] = {
            "method": fam,
            "used_by": [f"{u}_calibrated" for u in users],
            "sizes": cal.sizes,
            "abs": cal.abs,
            "timesteps": cal.timesteps,
            "per_seed": cal.per_seed,
            "candidates": list(cal.candidates),
            "criterion": cal.criterion,
            "num_probes": int(cal_cfg.num_probes),
            "probe_noise": f"normal(fold_in(key({seed}), {PROBE_TAG}))",
            "train_size": int(len(tr)),
            "schedule": path,
            "cache": res.path,
            "cache_hit": bool(res.hit),
            "seconds": float(res.seconds),
            "content": res.key,
        }
        log.info(
            "%s calibrated (%s, %.1fs%s): sizes %s",
            fam,
            cal.criterion,
            res.seconds,
            ", from the cache" if res.hit else "",
            cal.sizes.tolist(),
        )
        for u in users:
            ukw, ulimit = by_label[u]
            new = f"{u}_calibrated"
            extra[u] = new
            new_rows[new] = (
                dict(ukw, method=ukw.get("method", u), patch_size="file:" + path),
                ulimit,
            )
    ordered = []
    for label, kw, limit in specs:
        ordered.append((label, kw, limit))
        if label in extra:
            ordered.append((extra[label],) + new_rows[extra[label]])
    calibrated = {new: CALIBRATED_BY[kw.get("method")] for new, (kw, _) in new_rows.items()}
    return summary, ordered, calibrated


def subset_rows(protocol: Protocol, specs, results, used, train, st, ref: Reference) -> dict:
    """``metrics.json["subset"]``: every row of ``specs`` again on one common random subset of
    ``protocol.common_subset`` training images (statistics of pca_locality / Wiener from that
    subset too; a row whose inputs are unchanged is copied from ``results``; ``linear``, whose
    weights were fitted to the full set elsewhere, skipped with the reason)."""
    common_tr = subset(train, protocol.common_subset, protocol.seed)
    st_common = (
        st if common_tr is train else stats.gaussian_stats(common_tr, cache_dir=protocol.cache_dir)
    )
    sub_results, sub_skipped = {}, {}
    for label, kw, _ in specs:
        method = kw.get("method", label)
        if method == "linear":
            sub_skipped[label] = (
                "GD-trained weights are fitted to the full training set elsewhere "
                "(experiments/linear_gd.py); not re-fitted on the subset"
            )
            continue
        if np.array_equal(used[label], common_tr) and (
            method not in NEEDS_STATS or common_tr is train
        ):
            sub_results[label] = dict(results[label])  # same inputs: the same row
            continue
        kw_sub = dict(kw)
        sub_results[label], _ = evaluate(
            label, kw_sub, common_tr, st_common, ref, protocol.hp_sigma
        )
        if "calibrated_from" in results[label]:
            sub_results[label]["calibrated_from"] = results[label]["calibrated_from"]
    return {
        "size": int(len(common_tr)),
        "seed": int(protocol.seed),
        "methods": sub_results,
        "skipped": sub_skipped,
    }


def _scfdm_group(specs) -> list:
    """The first SCFDM row of ``specs`` and the rows ``<label>_s<sigma>`` of its sweep, which
    :func:`row_specs` puts right after it."""
    first = next((i for i, (l, kw, _) in enumerate(specs) if kw.get("method", l) == "scfdm"), None)
    if first is None:
        return []
    group = [specs[first]]
    for label, kw, limit in specs[first + 1 :]:
        if kw.get("method") != "scfdm" or not label.startswith(group[0][0] + "_s"):
            break
        group.append((label, kw, limit))
    return group


def select_scfdm(protocol: Protocol, specs, train, ref: Reference):
    """SCFDM's smoothing scale picked on probe trajectories (docs/algorithms.md §10).

    Every row of the first SCFDM sweep in ``specs`` (:func:`row_specs`) is sampled by DDIM from
    probe noise ``fold_in(key(seed), SCFDM_PROBE_TAG)`` (``scfdm_probe_samples``, or
    ``calibration.num_probes``, trajectories; independent of the evaluation noise and of the
    calibration probes) on its own training subset, and compared with ``ref.net`` sampled from
    the same probes; the scale with the best mean final-step trajectory r2 wins (the first on a
    tie). Returns (``metrics.json["scfdm_selection"]``: ``sigmas``, ``probe_r2``,
    ``best_sigma``, ``num_probes``, ...; ``specs`` with the row ``<label>_best``, SCFDM at that
    scale, after the sweep), or (None, ``specs``) without an SCFDM row.
    """
    group = _scfdm_group(specs)
    if not group:
        return None, specs
    n = protocol.scfdm_probe_samples or protocol.calibration.num_probes
    probes = reference_run(ref.net, train.shape[1:], protocol, ref.sched, n, SCFDM_PROBE_TAG)
    sigmas, r2 = [], []
    for label, kw, limit in group:
        _, den = build(label, kw, subset(train, limit, protocol.seed), None)
        x0 = sample_batches(den, probes.x_T, ref.sched, protocol.num_steps, protocol.batch_size)[0]
        sigmas.append(float(kw.get("sigma_s", 0.1)))
        r2.append(float(metrics.per_step(x0, probes.x0, reduce="none")["r2"][-1].mean()))
    i = int(np.argmax(np.where(np.isfinite(r2), r2, -np.inf)))
    best_label, kw, limit = group[i]
    row = f"{group[0][0]}_best"
    selection = {
        "rows": [label for label, _, _ in group],
        "sigmas": sigmas,
        "probe_r2": r2,
        "best_sigma": sigmas[i],
        "best_row": best_label,
        "row": row,
        "num_probes": int(n),
        "probe_noise": f"normal(fold_in(key({protocol.seed}), {SCFDM_PROBE_TAG}))",
        "criterion": "mean over the probes of the final-step trajectory r2 against the network",
    }
    log.info("SCFDM scale on %d probes: r2 %s -> sigma_s %g", n, r2, sigmas[i])
    at = specs.index(group[-1]) + 1
    best = (row, dict(kw, method="scfdm", sigma_s=sigmas[i]), limit)
    return selection, specs[:at] + [best] + specs[at:]


def scfdm_sweep(specs, results, selection: Optional[dict] = None) -> Optional[dict]:
    """``metrics.json["scfdm_sweep"]``: the smoothing scale of every SCFDM row of the sweep
    (None without one) and the row picked on probe trajectories (``selection`` of
    :func:`select_scfdm`), never on the evaluation samples."""
    chosen = selection["row"] if selection else None
    sweep = [l for l, kw, _ in specs if kw.get("method", l) == "scfdm" and l != chosen]
    if not sweep:
        return None
    if selection:
        note = (
            f"the selected one is picked on probe trajectories (scfdm_selection, row {chosen}), "
            "never on the evaluation samples"
        )
    else:
        note = "none is selected (picking the best row would pick on the evaluation samples)"
    return {
        "sigmas": {label: float(results[label]["kwargs"].get("sigma_s", 0.1)) for label in sweep},
        "selected": selection["best_row"] if selection else None,
        "note": "every smoothing scale is its own row; " + note,
    }
