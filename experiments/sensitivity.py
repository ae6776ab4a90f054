"""Sensitivity fields of denoisers across noise levels (docs/algorithms.md §9).

    python -m experiments.sensitivity --config configs/sensitivity.py:fashion_mnist \
        --workdir workdirs/sensitivity_fmnist

For every model (Wiener filter; trained linear denoisers; trained networks, when available), every
noise level ``ab = ddpm_linear().alphas_cumprod[t]`` of ``config.timesteps`` (ascending) and every
probed pixel, the field ``mean_b sum_c |d D(x_t)[b, p, c] / d x_t[b]|`` over
``config.num_inputs`` noisy test images (``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``, ``eps`` from
``fold_in(PRNGKey(seed), t)``, the same for every model) via one VJP per output pixel
(:mod:`locality.sensitivity`). The probed pixels are ``config.pixels``, or when unset the
``config.num_pixels`` pixels of :func:`locality.sensitivity.spread_pixels` (a 4 x 4 grid).

With ``config.pca_mask_threshold > 0`` the masks of the paper's denoiser for the same pixels
and levels (:func:`locality.denoisers.pca_locality.mask_fields`) join as the model
``pca_locality_mask``: a binary field, so its radii and supports are those of a uniform field on
the mask.

Every field is summarised by its 50 % and 90 % radii, and every pair of models by the cosine and
the IoU of the 50 % and 90 % supports of their fields of the same pixel;
:func:`locality.field_summary.summarize_statistics` gives the mean and standard error of each over
the probed pixels, and :func:`locality.field_summary.field_verdict` decides, for every model
against ``config.reference``, whether the fields agree and whether they shrink as the noise
decreases (rules in docs/algorithms.md §9).

Writes to ``--workdir``: ``config.json``; ``metrics.json`` (the ``summary`` block, and the per-pixel
``radius`` / ``cosine`` / ``iou`` dictionaries keyed ``"row,col"`` of earlier runs);
``summary.txt``; and the figures of :func:`locality.field_report.save_figures`:
``fields_r<row>_c<col>.png`` for the first probed pixel and the one nearest the centre (rows =
models, columns = noise levels, each panel with its colour bar, clipped at the 99th percentile of
the values off the output pixel, which is outlined in red); ``radius.png`` (50 % and 90 % radius
against t, mean +- SE over pixels); ``similarity_vs_t.png`` (IoU50, IoU90 and cosine of every
model with the reference, mean +- SE over pixels).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from locality import denoisers, field_report, field_summary, schedules, sensitivity, stats
from locality.denoisers import pca_locality

MASSES = (0.5, 0.9)  # radii and supports at 50 % and 90 % of a field's mass


def build_models(config, st, shape):
    """{name: denoiser} and {name: {"status": ..., ...}} for every configured model."""
    models, status = {"wiener": denoisers.make("wiener", stats=st)}, {"wiener": {"status": "ok"}}
    path = config.linear_weights
    if path and os.path.exists(path):
        lin = denoisers.make("linear", weights=path, tolerance=config.linear_tolerance)
        if tuple(lin.shape) == tuple(shape):
            models["linear"] = lin
            levels = np.asarray(lin.ab_values).tolist()
            status["linear"] = {"status": "ok", "path": path, "levels": levels}
        else:
            reason = f"trained on images of shape {lin.shape}, data has {shape}"
            status["linear"] = {"status": "skipped", "reason": reason}
    elif path:
        reason = f"{path} does not exist; run experiments/linear_gd.py first"
        status["linear"] = {"status": "skipped", "reason": reason}
    for name, ckpt in ((k, v) for k, v in config.networks.items() if v):
        try:
            if not os.path.exists(ckpt):
                raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
            net = denoisers.make("network", checkpoint=ckpt)
            out = net(jnp.zeros((1,) + tuple(shape), jnp.float32), 0.5).shape[1:]
            if tuple(out) != tuple(shape):
                raise ValueError(f"output shape {out} != data shape {shape}")
        except Exception as e:  # missing, half-written or incompatible: report, continue
            missing = isinstance(e, FileNotFoundError)
            status[name] = {
                "status": "skipped",
                "reason": f"{'' if missing else type(e).__name__ + ': '}{e}",
            }
            logging.warning("skipping %s: %s", name, e)
            continue
        models[name], status[name] = net, {"status": "ok", "checkpoint": ckpt}
    return models, status


def _usable(model, name, ab, config) -> bool:
    """A linear model is evaluated only at the levels it was trained for."""
    if name != "linear":
        return True
    gaps = np.abs(np.asarray(model.ab_values, np.float64) - float(ab))
    return bool(np.min(gaps) <= config.linear_tolerance)


def run(config, workdir: str) -> dict:
    common.prepare_workdir(workdir, config)
    sched = schedules.ddpm_linear()
    ts = sorted(int(t) for t in config.timesteps)
    abs_ = [float(sched.ab(t)) for t in ts]
    train = common.load_images(config, config.stats_split, config.stats_limit)
    test = common.load_inputs(config)  # a random subset for a source sorted by class
    shape = tuple(int(s) for s in train.shape[1:])
    if tuple(test.shape[1:]) != shape:
        raise ValueError(f"test images {test.shape[1:]} and training images {shape} differ")
    h, w, _ = shape
    if config.pixels is None:
        pixels = sensitivity.spread_pixels(h, w, config.num_pixels)
    else:
        pixels = sensitivity.check_pixels(config.pixels, h, w)
    logging.info("%d images %s; %d inputs; pixels %s", len(train), shape, len(test), pixels)
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    models, status = build_models(config, st, shape)
    names = list(models)
    skip = lambda m, ab: not _usable(models[m], m, ab, config)  # noqa: E731
    key, pb = jax.random.PRNGKey(config.seed), int(config.pixel_batch) or None
    fields, timings = sensitivity.fields_at_levels(
        models, test, ts, abs_, pixels, key=key, skip=skip, pixel_batch=pb
    )
    if config.pca_mask_threshold > 0:  # the paper's masks of the same pixels, as fields
        thr = float(config.pca_mask_threshold)
        fields["pca_locality_mask"] = [
            pca_locality.mask_fields(st, ab, thr, pixels, shape) for ab in abs_
        ]
        status["pca_locality_mask"] = {"status": "ok", "threshold": thr}
        names.append("pca_locality_mask")
    checks = {  # the VJP fields of the affine models against |row of their Jacobian|
        m: [
            sensitivity.affine_field_error(f, models[m].jacobian(ab), shape, pixels)
            for f, ab in zip(fields[m], abs_)
            if f is not None
        ]
        for m in ("wiener", "linear")
        if m in models
    }
    per_pixel = field_summary.field_statistics(fields, pixels, MASSES)
    summary = field_summary.summarize_statistics(
        per_pixel, ts, num_inputs=len(test), reference=config.reference
    )
    field_report.save_figures(workdir, summary, fields, abs_)
    metrics = {
        "summary": summary,
        **field_report.pixel_tables(per_pixel, fields, ts),  # radius, cosine, iou per pixel
        "timesteps": ts,
        "ab": abs_,
        "pixels": [list(p) for p in pixels],
        "model_order": names,  # row/column order of the cosine and IoU matrices
        "num_inputs": int(test.shape[0]),
        "stats_images": int(st.count),
        "models": status,
        "seconds_per_level": {m: float(np.mean(v)) if v else None for m, v in timings.items()},
        "check_linear_field_rel_err": checks,
        "field_mass_at_centre": {
            m: [None if f is None else float(f[0].max() / f[0].sum()) for f in fields[m]]
            for m in names
        },
    }
    common.write_json(os.path.join(workdir, "metrics.json"), metrics)
    lines = [
        f"sensitivity fields on {config.dataset} {shape}; {len(test)} noisy inputs; pixels "
        f"{list(pixels)}",
        "models: "
        + ", ".join(
            f"{k} ({v['status']}{': ' + v['reason'] if 'reason' in v else ''})"
            for k, v in status.items()
        ),
        *field_report.summary_lines(summary),
        *(
            f"check: VJP field of {m} vs |row of its Jacobian|, max rel err {max(v):.2e}"
            for m, v in checks.items()
        ),
    ]
    common.write_summary(workdir, lines)
    return metrics


if __name__ == "__main__":
    common.run_as_program(run, "configs/sensitivity.py:fashion_mnist")
