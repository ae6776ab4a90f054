"""Does a gradient-descent-trained linear denoiser converge to the Wiener filter? (§4)

    python -m experiments.linear_gd --config configs/linear_gd.py:fashion_mnist \
        --workdir workdirs/linear_gd_fmnist

At each ``t`` of ``config.timesteps`` (``ab = ddpm_linear().alphas_cumprod[t]``) trains
``D_t(x) = W_t x + b_t`` with :func:`locality.denoisers.linear_fit.train_linear` (fresh noise
every batch, optax, tail averaging) and measures it against the float64 Wiener filter ``W*, b*``
of the same training images (:func:`locality.denoisers.wiener.dense_wiener_matrices` of the
``gaussian_stats`` covariance). The predicted statistical error of an estimate averaged over the
same number of samples (:func:`locality.denoisers.linear_fit.asymptotic_error`) is reported
beside the measured one; the verdict, figures and summary lines are :mod:`locality.linear_gd`.
The training images come from :func:`experiments.common.load_images` (a dataset name,
``synthetic`` or ``npy:PATH``).

Writes to ``--workdir``: ``config.json``; ``linear_weights.npz`` (all levels; load with
``denoisers.make("linear", weights=PATH)``); ``rel_frob.png``, ``cosine.png``, ``excess.png``
(against steps, one curve per level); ``fields.png`` (centre-pixel fields, GD vs Wiener);
``metrics.json`` (histories and final errors, the verdict); ``summary.txt``.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from experiments import common
from locality import linear_gd, schedules, sensitivity, stats
from locality.denoisers import linear as linear_lib
from locality.denoisers import linear_fit
from locality.denoisers.wiener import dense_wiener_matrices


def run(config, workdir: str) -> dict:
    common.prepare_workdir(workdir, config)
    sched = schedules.ddpm_linear()
    ts = [int(t) for t in config.timesteps]
    train = common.load_images(config, config.split, config.limit)
    shape = tuple(int(s) for s in train.shape[1:])
    h, w, _ = shape
    pixel = tuple(config.pixel) if len(config.pixel) else sensitivity.centre_pixel(h, w)
    st = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    cov = st.covariance()
    cov_n = cov * ((st.count - 1) / st.count)
    logging.info("training set %s; levels t=%s", train.shape, ts)
    criteria = {k: config[k] for k in ("max_rel_frob", "min_cosine", "max_excess")}

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

        fit = linear_fit.train_linear(
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
        averaged = linear_gd.averaged_samples(config.steps, config.batch_size, config.tail)
        predicted = (
            linear_fit.asymptotic_error(cov_n, ab, averaged, w_star) if config.tail > 0 else None
        )
        weights[ab] = (fit.W, fit.b)
        results[str(t)] = linear_gd.level_result(fit, ab, predicted, criteria)
        wiener_fields.append(sensitivity.linear_field(w_star, shape, pixel))
        gd_fields.append(sensitivity.linear_field(fit.W, shape, pixel))
        final = results[str(t)]["final"]
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
    linear_gd.save_figures(
        workdir, results, ts, config.steps, config.tail, pixel, gd_fields, wiener_fields
    )
    converged = all(r["converged"] for r in results.values())
    metrics = {
        "timesteps": ts,
        "pixel": list(pixel),
        "num_train": int(train.shape[0]),
        "weights_file": path,
        "converged_all": converged,
        "criteria": criteria,
        "levels": results,
    }
    common.write_json(os.path.join(workdir, "metrics.json"), metrics)
    lines = [
        f"GD linear denoisers on {config.dataset} {shape}, {train.shape[0]} images, "
        f"{config.steps} steps x {config.batch_size} ({config.optimizer} lr {config.lr}, "
        f"{config.schedule}, tail average {config.tail})",
        *(linear_gd.level_line(t, results[str(t)]) for t in ts),
        linear_gd.verdict_line(converged, criteria),
    ]
    common.write_summary(workdir, lines)
    return metrics


if __name__ == "__main__":
    common.run_as_program(run, "configs/linear_gd.py:fashion_mnist")
