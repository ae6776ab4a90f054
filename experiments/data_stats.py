"""Data-statistics experiments: does a denoiser's locality follow the data's pixel correlations?

    python -m experiments.data_stats --config configs/data_stats.py:fashion_mnist \
        --workdir workdirs/data_stats_fmnist

Three parts (issue #6, item 4), each switched on by ``config.parts``:

``link``  A long-range correlation is injected by copying the ``K x K`` block at ``src`` of every
    image over the block at ``dst`` (:func:`locality.data.transforms.link`). For the centre pixel
    of each block we measure the *linked mass*: the fraction of the sensitivity field
    (docs/algorithms.md §9) that lies inside the partner block, for the Wiener filter of the
    original and of the linked data, and for networks trained on the original data and on the
    linked data (trained with
    ``--config.train.transform=<spec>``, see ``configs/data_stats.py``). If locality comes from
    the data, the linked-data models move mass to the partner block; a convolution prior alone
    would not.
``permute`` One fixed random permutation of the pixel positions (``permute:seed``). The Wiener
    filter is exactly permutation-equivariant (``W_perm = P W P^T``, checked numerically). For
    networks trained on permuted data we take the field of the pixel that the permutation sends
    original pixel ``p`` to, map it back to the original grid and measure its 50 % radius there
    (data geometry) and on the permuted grid (the network's own grid), and its cosine with the
    Wiener field of the original data at ``p``.
``pcs``   Aligned faces (``lfw_faces``): the fraction of the energy of each Wiener row
    (``W_t = U diag(s_t) U^T / sqrt(ab)``) in the span of the top-k principal components, per
    noise level, and the fields next to the top components.

The measurements and figures are :mod:`locality.data_stats`. Writes ``metrics.json``,
``summary.txt`` and figures to ``--workdir``. Networks whose checkpoint is
missing, or was trained with another transform, are listed as skipped with the reason and the
command that trains them.
"""

from __future__ import annotations

import os

import jax

from experiments import common
from locality import data_stats, schedules, sensitivity, stats
from locality.data import transforms


def train_command(config, arch: str, spec: str, ckpt: str, workdir: str) -> str:
    """The command that trains ``ckpt`` on ``config.dataset`` with transform ``spec``."""
    transform = f" --config.train.transform={spec}" if spec else ""
    return (
        f"python -m experiments.train --config configs/train.py:{config.dataset},cpu,{arch}"
        f"{transform} --workdir workdirs/{workdir} --export_to {ckpt}"
    )


def load_networks(config, networks: dict, spec: str, suffix: str, workdir_name) -> tuple:
    """:func:`locality.data_stats.load_networks`; a name ending in ``suffix`` needs a net trained
    with ``spec``; the training command of another uses the workdir ``workdir_name(ckpt)``."""

    def command(arch, want, ckpt):
        wd = os.path.basename(ckpt.rstrip("/")) if want else workdir_name(ckpt)
        return train_command(config, arch, want, ckpt, wd)

    return data_stats.load_networks(networks, spec, suffix, command)


def run_link(config, workdir, train, test, ts, abs_, key) -> dict:
    spec = config.link.spec
    lk = transforms.parse(spec)
    if not isinstance(lk, transforms.Link):
        raise ValueError(f"config.link.spec must be a 'link:...' spec, got {spec!r}")
    h, w, _ = train.shape[1:]
    transforms.check_link(lk, h, w)
    pixels, partner, own = data_stats.link_geometry(lk.src, lk.dst, lk.size, h, w)
    test_l = transforms.apply(test, spec)
    st0 = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    st1 = stats.gaussian_stats(transforms.apply(train, spec), cache_dir=common.stats_cache_dir())
    nets = {m: config.link.networks.get(m, "") for m in ("unet_original", "unet_linked")}
    models, status = load_networks(config, nets, spec, "_linked", lambda ckpt: "x")
    status = {"wiener_original": {"status": "ok"}, "wiener_linked": {"status": "ok"}, **status}
    fields = data_stats.link_fields(st0, st1, models, test_l, pixels, ts, abs_, key)
    linked = data_stats.block_mass(fields, partner, pixels)
    data_stats.save_link_figures(workdir, fields, linked, pixels, ts, spec, test_l)
    return {
        "spec": spec,
        "pixels": [list(p) for p in pixels],
        "models": status,
        "linked_mass": linked,
        "own_block_mass": data_stats.block_mass(fields, own, pixels),
        "stats_images": int(st0.count),
    }


def run_permute(config, workdir, train, test, ts, abs_, key) -> dict:
    spec = config.permute.spec
    kind = transforms.parse(spec)
    if not (isinstance(kind, tuple) and kind[0] == "permute"):
        raise ValueError(f"config.permute.spec must be 'permute:SEED', got {spec!r}")
    seed = kind[1]
    h, w, _ = train.shape[1:]
    pixels = sensitivity.check_pixels(config.permute.pixels, h, w)
    moved = data_stats.moved_pixels(transforms.permutation(seed, h, w), pixels, w)
    st0 = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    st1 = stats.gaussian_stats(transforms.apply(train, spec), cache_dir=common.stats_cache_dir())
    nets = dict(config.permute.networks.items())
    loaded, status = load_networks(config, nets, spec, "_permuted", os.path.basename)
    status = {"wiener_original": {"status": "ok"}, "wiener_permuted": {"status": "ok"}, **status}
    permuted = {m for m in loaded if m.endswith("_permuted")} | {"wiener_permuted"}
    test_p = transforms.apply(test, spec)
    models = {m: (n, m in permuted, test_p if m in permuted else test) for m, n in loaded.items()}
    to_data = lambda f: transforms.unpermute(f, seed)  # noqa: E731
    to_model = lambda f: transforms.permute(f[..., None], seed)[..., 0]  # noqa: E731
    orig, grid, equivariance = data_stats.permute_fields(
        st0, st1, models, pixels, moved, ts, abs_, key, to_data
    )
    res = data_stats.permute_summary(orig, grid, permuted, pixels, moved, to_model)
    data_stats.save_permute_figures(workdir, orig, grid, res, permuted, pixels, moved, ts, spec)
    samples = {}
    if config.permute.num_samples:
        shape = (int(config.permute.num_samples),) + tuple(train.shape[1:])
        x_T = jax.random.normal(jax.random.PRNGKey(config.seed), shape)
        nets_p = {m: n for m, n in loaded.items() if m in permuted}
        samples = data_stats.save_permuted_samples(workdir, nets_p, x_T, to_data)
    return {
        "spec": spec,
        "pixels": [list(p) for p in pixels],
        "permuted_pixels": [list(q) for q in moved],
        "models": status,
        "summary": res,
        "wiener_equivariance_max_rel_err": equivariance,
        "samples": samples,
    }


def run_pcs(config, workdir, ts, abs_) -> dict:
    faces = common.load_images(config.pcs, "train", config.pcs.limit)
    st = stats.gaussian_stats(faces, cache_dir=common.stats_cache_dir())
    h, w, c = st.shape
    pixels = sensitivity.check_pixels(config.pcs.pixels, h, w)
    ks = [int(k) for k in config.pcs.top_k if int(k) <= st.eigvecs.shape[1]]
    energy, energy_all, fields = data_stats.pc_energy(st, abs_, pixels, ks)
    data_stats.save_pcs_figures(
        workdir, st, faces, fields, energy_all, pixels, ts, config.pcs.dataset
    )
    return {
        "dataset": config.pcs.dataset,
        "images": int(st.count),
        "pixels": [list(p) for p in pixels],
        "top_k": ks,
        "energy_at_pixels": energy,
        "energy_all_pixels": energy_all,
        "explained_variance_top_k": {
            str(k): float(st.eigvals[:k].sum() / st.eigvals.sum()) for k in ks
        },
    }


def run(config, workdir: str) -> dict:
    common.prepare_workdir(workdir, config)
    sched = schedules.ddpm_linear()
    ts = [int(t) for t in config.timesteps]
    abs_ = [float(sched.ab(t)) for t in ts]
    key = jax.random.PRNGKey(config.seed)
    parts = list(config.parts)
    unknown = set(parts) - {"link", "permute", "pcs"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from link, permute, pcs")
    metrics = {"timesteps": ts, "ab": abs_, "parts": parts}
    if {"link", "permute"} & set(parts):
        train = common.load_images(config, config.stats_split, config.stats_limit)
        test = common.load_inputs(config)
        metrics["dataset"] = config.dataset
        metrics["num_inputs"] = int(test.shape[0])
        if "link" in parts:
            metrics["link"] = run_link(config, workdir, train, test, ts, abs_, key)
        if "permute" in parts:
            metrics["permute"] = run_permute(config, workdir, train, test, ts, abs_, key)
    if "pcs" in parts:
        metrics["pcs"] = run_pcs(config, workdir, ts, abs_)
    common.write_json(os.path.join(workdir, "metrics.json"), metrics)
    common.write_summary(workdir, data_stats.summary_lines(metrics))
    return metrics


if __name__ == "__main__":
    common.run_as_program(run, "configs/data_stats.py:fashion_mnist")
