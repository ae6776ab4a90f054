"""Does a gradient-descent-trained linear denoiser converge to the Wiener filter? (§4)

    python -m experiments.linear_gd --config configs/linear_gd.py:fashion_mnist \
        --workdir workdirs/linear_gd_fmnist

At each ``t`` of ``config.timesteps`` (``ab = ddpm_linear().alphas_cumprod[t]``) trains
``D_t(x) = W_t x + b_t`` with :func:`locality.denoisers.linear.train_linear` (fresh noise every
batch, optax, tail averaging) and measures it against the float64 Wiener filter ``W*, b*`` of the
same training images (:func:`locality.denoisers.wiener.dense_wiener_matrices` of the
``gaussian_stats`` covariance). The predicted statistical error of an estimate averaged over the
same number of samples (:func:`locality.denoisers.linear.asymptotic_error`) is reported beside the
measured one.

Writes to ``--workdir``: ``config.json``; ``linear_weights.npz`` (all levels; load with
``denoisers.make("linear", weights=PATH)``); ``rel_frob.png``, ``cosine.png``, ``excess.png``
(against steps, one curve per level); ``fields.png`` (centre-pixel fields, GD vs Wiener);
``metrics.json`` (histories and final errors, the verdict); ``summary.txt``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from experiments import common
from locality import plotting, schedules, sensitivity, stats
from locality.denoisers import linear as linear_lib
from locality.denoisers.wiener import dense_wiener_matrices


def synthetic_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """[n, size, size, 1] smooth random images in [-1, 1] (Gaussian-smoothed noise, tanh-squashed);
    for smoke tests."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, size, size))
    k = np.exp(-0.5 * (np.arange(-2, 3) / 1.0) ** 2)
    for axis in (1, 2):
        z = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, z)
    return np.tanh(0.5 * z)[..., None].astype(np.float32)


def load_train(config) -> np.ndarray:
    """``config.dataset`` via :func:`locality.data.load`; ``synthetic``; or ``npy:PATH``."""
    if config.dataset == "synthetic":
        return synthetic_images(int(config.limit or 256))
    if config.dataset.startswith("npy:"):
        arr = np.load(config.dataset[len("npy:") :])
        return arr[: config.limit] if config.limit else arr
    from locality import data

    return data.load(
        config.dataset, split=config.split, resolution=config.resolution, limit=config.limit
    )


def run(config, workdir: str) -> dict:
    common.prepare_workdir(workdir, config)
    sched = schedules.ddpm_linear()
    ts = [int(t) for t in config.timesteps]
    train = load_train(config)
    shape = tuple(int(s) for s in train.shape[1:])
    h, w, _ = shape
    pixel = tuple(config.pixel) if len(config.pixel) else sensitivity.centre_pixel(h, w)
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    cov = st.covariance()
    cov_n = cov * ((st.count - 1) / st.count)
    logging.info("training set %s; levels t=%s", train.shape, ts)

    key = jax.random.PRNGKey(config.seed)
    weights, results, wiener_fields, gd_fields = {}, {}, [], []
    for t in ts:
        ab = float(sched.ab(t))
        w_star, b_star = dense_wiener_matrices(cov, st.mean, ab)

        def progress(step, rec, t=t):
            logging.info(
                "t=%d step %d/%d loss %.4f rel_frob %.4f excess %.2e cosine %.4f",
                t,
                step,
                config.steps,
                rec["loss"],
                rec["rel_frob"],
                rec["excess"],
                rec["cosine"],
            )

        fit = linear_lib.train_linear(
            train,
            ab,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            key=jax.random.fold_in(key, t),
            optimizer=config.optimizer,
            schedule=config.schedule,
            tail=config.tail,
            log_every=config.log_every,
            center=config.center,
            init=config.get("init", "zeros"),
            reference=(w_star, b_star),
            pixel=pixel,
            callback=progress,
        )
        averaged = config.batch_size * (config.steps - int(round(config.steps * (1 - config.tail))))
        predicted = (
            linear_lib.asymptotic_error(cov_n, ab, averaged, w_star) if config.tail > 0 else None
        )
        weights[ab] = (fit.W, fit.b)
        hist = fit.history
        final = {k: float(v[-1]) for k, v in hist.items() if k != "step"}
        ok = (
            final["rel_frob"] <= config.max_rel_frob
            and final["cosine"] >= config.min_cosine
            and final["excess"] <= config.max_excess
        )
        results[str(t)] = {
            "ab": ab,
            "final": final,
            "predicted_rel_frob": predicted,
            "loss_opt": fit.loss_opt,
            "seconds": fit.seconds,
            "converged": bool(ok),
            "history": {k: v.tolist() for k, v in hist.items()},
        }
        wiener_fields.append(sensitivity.linear_field(w_star, shape, pixel))
        gd_fields.append(sensitivity.linear_field(fit.W, shape, pixel))
        logging.info(
            "t=%d done in %.1fs: rel_frob %.4f (statistical rate %s), excess %.2e, cosine %.4f",
            t,
            fit.seconds,
            final["rel_frob"],
            "n/a" if predicted is None else f"{predicted:.4f}",
            final["excess"],
            final["cosine"],
        )

    path = linear_lib.save_linear(os.path.join(workdir, "linear_weights.npz"), weights, shape)

    # ---- figures
    tail_start = (
        int(round(config.steps * (1 - config.tail))) if config.tail > 0 else int(config.steps)
    )
    for name, key_, ylabel, logy in (
        ("rel_frob", "rel_frob", "||W - W*||_F / ||W*||_F", True),
        ("cosine", "cosine", f"field cosine vs Wiener at {pixel}", False),
        ("excess", "excess", "(L(W,b) - L*) / L*", True),
    ):
        series = []
        for ci, t in enumerate(ts):
            hst = results[str(t)]["history"]
            series.append({"x": hst["step"], "y": hst[key_], "label": f"t={t}", "color": f"C{ci}"})
            pred = results[str(t)]["predicted_rel_frob"]
            if key_ == "rel_frob" and pred is not None:
                series.append(
                    {
                        "x": [config.steps],
                        "y": [pred],
                        "style": "none",
                        "marker": "*",
                        "color": f"C{ci}",
                    }
                )
        title = {
            "rel_frob": "GD linear denoiser vs Wiener (stars: statistical rate)",
            "cosine": "field cosine, GD vs Wiener",
            "excess": "relative excess loss over the optimal linear denoiser",
        }[name]
        if tail_start < config.steps:
            title += f"\niterates averaged from step {tail_start} (dotted line)"
        plotting.save_series(
            series,
            os.path.join(workdir, f"{name}.png"),
            xlabel="step",
            ylabel=ylabel,
            title=title,
            logx=True,
            logy=logy,
            vlines=[tail_start] if tail_start < config.steps else [],
        )
    plotting.save_heatmap_table(
        [gd_fields, wiener_fields],
        os.path.join(workdir, "fields.png"),
        row_labels=["GD linear", "Wiener"],
        col_labels=[f"t={t}" for t in ts],
        marks=[[pixel] * len(ts)] * 2,
        title=f"|row of W| at pixel {pixel}: GD-trained vs Wiener",
    )

    converged = all(r["converged"] for r in results.values())
    metrics = {
        "timesteps": ts,
        "pixel": list(pixel),
        "num_train": int(train.shape[0]),
        "weights_file": path,
        "converged_all": converged,
        "criteria": {
            "max_rel_frob": config.max_rel_frob,
            "min_cosine": config.min_cosine,
            "max_excess": config.max_excess,
        },
        "levels": results,
    }
    common.write_json(os.path.join(workdir, "metrics.json"), metrics)
    lines = [
        f"GD linear denoisers on {config.dataset} {shape}, {train.shape[0]} images, "
        f"{config.steps} steps x {config.batch_size} ({config.optimizer} lr {config.lr}, "
        f"{config.schedule}, tail average {config.tail})"
    ]
    for t in ts:
        r = results[str(t)]
        f = r["final"]
        pred = r["predicted_rel_frob"]
        lines.append(
            f"t={t:4d} ab={r['ab']:.4f}: rel_frob {f['rel_frob']:.4f} "
            f"(statistical rate {'n/a' if pred is None else f'{pred:.4f}'}), "
            f"bias_rel {f['bias_rel']:.4f}, excess {f['excess']:.2e}, "
            f"field cosine {f['cosine']:.4f}, {r['seconds']:.0f}s -> "
            f"{'converged' if r['converged'] else 'NOT converged'}"
        )
    lines.append(
        "verdict: GD "
        + ("converges" if converged else "does not (yet) converge")
        + f" to the Wiener filter at every level (criteria rel_frob <= "
        f"{config.max_rel_frob}, field cosine >= {config.min_cosine}, excess <= "
        f"{config.max_excess})"
    )
    common.write_summary(workdir, lines)
    return metrics


if __name__ == "__main__":
    common.run_as_program(run, "configs/linear_gd.py:fashion_mnist")
