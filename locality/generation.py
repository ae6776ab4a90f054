"""Sample sets from any registered denoiser, and how they sit against the training set.

What ``experiments/sample.py``, ``experiments/guidance.py`` and ``experiments/quality.py``
share: building a registered method from a training set and its statistics (:func:`build`),
sampling by sampler name (:func:`sample`: DDIM, DDPM ancestral or EDM, docs/algorithms.md §1;
:func:`sample_in_batches`), copy detection by the L2 distance from each sample to its nearest
training image (:func:`nearest_distance`, the ``nearest`` denoiser of docs/algorithms.md §3;
:func:`save_nearest_pairs`), summaries of a sample set (:func:`sample_summary`,
:func:`plan_summary`, :func:`pairwise_final` with the metrics of docs/algorithms.md §10) and
the parsers of the label and guidance options of class-conditional nets (docs/algorithms.md
§11, "Class conditioning and classifier-free guidance").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from locality import denoisers, metrics, plotting, sampling, schedules

NEEDS_STATS = {"wiener", "wiener_dense", "pca_locality"}
SAMPLERS = ("ddim", "ddpm", "edm")


def parse_labels(spec):
    """Command-line labels of a class-conditional net: ``""``/None -> None (no label), ``"cycle"``,
    ``"3"`` -> 3, ``"0,1,1"`` -> [0, 1, 1]; anything else passes through unchanged."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str) and spec.strip() != "cycle":
        try:
            vals = [int(v) for v in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"labels={spec!r}: use '' (no label), 'cycle', an int or a comma list of ints"
            ) from None
        return vals[0] if len(vals) == 1 else vals
    return spec.strip() if isinstance(spec, str) else spec


def parse_weights(spec) -> list:
    """Guidance weights: ``"0,1,3"`` -> ``[0.0, 1.0, 3.0]`` (finite, no duplicates)."""
    try:
        ws = [float(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"guidance={spec!r}: use comma-separated numbers, e.g. '0,1,3'") from None
    if not all(np.isfinite(ws)) or len(set(ws)) != len(ws):
        raise ValueError(f"guidance={spec!r}: weights must be finite and distinct")
    return ws


def build(method: str, kwargs: dict, train, st, shard: bool = False, progress: bool = False):
    """Build a registered denoiser with the arguments its factory takes: the statistics ``st``
    for the methods of :data:`NEEDS_STATS`, the training images for every method but the Wiener
    filters and a checkpoint, ``shard`` for ``optimal`` / ``pca_locality``, parsed labels for
    ``network``."""
    kwargs = dict(kwargs)
    if method in NEEDS_STATS:
        kwargs["stats"] = st
    if method not in ("wiener", "wiener_dense") and "checkpoint" not in kwargs:
        kwargs["train"] = train
    if shard and method in ("optimal", "pca_locality"):
        kwargs["shard"] = True
    if progress and method == "pca_locality":
        kwargs.setdefault("progress", True)
    if method == "network":
        kwargs["labels"] = parse_labels(kwargs.get("labels"))
    return denoisers.make(method, **kwargs)


def sample(den, x_T, sampler: str, num_steps: int, *, key=None, progress: bool = False):
    """A :class:`locality.sampling.SampleResult` from ``x_T`` on the DDPM linear schedule:
    ``"ddim"`` (deterministic), ``"ddpm"`` (ancestral, its noise from ``key``) or ``"edm"``
    (Euler on the EDM sigmas, starting from ``x_T * sigma_max``)."""
    sched = schedules.ddpm_linear()
    if sampler == "ddim":
        return sampling.ddim(den, x_T, sched, num_steps, progress=progress)
    if sampler == "ddpm":
        return sampling.ddpm(den, x_T, sched, key=key, num_steps=num_steps, progress=progress)
    if sampler == "edm":
        sig = schedules.edm_sigmas(num_steps)
        return sampling.edm(den, x_T * sig[0], sig)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")


def sample_in_batches(den, x_T, sampler: str, num_steps: int, seed: int, batch: int = 250):
    """Final images of :func:`sample` over ``x_T`` in batches of ``batch``; the DDPM noise of
    the batch starting at ``s`` comes from ``fold_in(key(seed), s)``."""
    outs = []
    for s in range(0, len(x_T), batch):
        key = jax.random.fold_in(jax.random.key(seed), s)
        outs.append(np.asarray(sample(den, x_T[s : s + batch], sampler, num_steps, key=key).images))
    return np.concatenate(outs)


def nearest_distance(samples, train):
    """L2 distance from each sample to its nearest training image (copy detection), and those
    nearest images."""
    nn = denoisers.make("nearest", train=train)
    near = np.asarray(nn(jnp.asarray(samples), 0.5))
    return np.sqrt(((np.asarray(samples) - near) ** 2).reshape(len(samples), -1).sum(1)), near


def save_nearest_pairs(samples, near, dist, path: str, title: str) -> str:
    """Each sample beside its nearest training image, sorted by their L2 distance (closest first,
    eight pairs per row): the copies a memorising denoiser makes are the first pairs."""
    order = np.argsort(dist, kind="stable")
    pairs = np.stack([np.asarray(samples)[order], np.asarray(near)[order]], 1)
    return plotting.save_image_grid(
        pairs.reshape((-1,) + pairs.shape[2:]), path, ncols=2 * min(8, len(order)), title=title
    )


def sample_summary(imgs, dist) -> dict:
    """Distances to the nearest training image (median, minimum, all) and the pixel statistics
    of a sample set (mean, standard deviation, fraction outside [-1, 1])."""
    return {
        "nearest_train_l2_median": float(np.median(dist)),
        "nearest_train_l2_min": float(np.min(dist)),
        "nearest_train_l2": [float(v) for v in dist],
        "pixel_mean": float(imgs.mean()),
        "pixel_std": float(imgs.std()),
        "fraction_outside_unit_range": float(np.mean(np.abs(imgs) > 1.0)),
    }


def plan_summary(den, res) -> dict:
    """For a denoiser that plans per noise level (``prepare``, ``pca_locality``): the mask
    density and the evaluation path of every step of the sampling run ``res``."""
    prepared = den.prepare(res.abs)
    return {
        "mask_density_per_step": {
            int(t_): d for t_, d in zip(res.timesteps, prepared.densities().values())
        },
        "path_per_step": {int(t_): p.path for t_, p in zip(res.timesteps, prepared.plans.plans)},
    }


def pairwise_final(finals: dict) -> dict:
    """``{"a_vs_b": {"r2", "mse"}}`` between the final samples of every pair of methods
    (``a < b``)."""
    pair = {}
    for a in finals:
        for b in finals:
            if a < b:
                pair[f"{a}_vs_{b}"] = {
                    "r2": float(metrics.r2(finals[a], finals[b])),
                    "mse": float(metrics.mse(finals[a], finals[b])),
                }
    return pair
