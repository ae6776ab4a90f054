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

Writes ``metrics.json``, ``summary.txt`` and figures to ``--workdir``. Networks whose checkpoint is
missing, or was trained with another transform, are listed as skipped with the reason and the
command that trains them.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from experiments import common
from experiments.sensitivity import load_images
from locality import denoisers, plotting, schedules, sensitivity, stats
from locality.data import transforms

# ----------------------------------------------------------------------------- helpers


def wiener_fields(st, ab: float, pixels) -> np.ndarray:
    """Exact Wiener fields [P, H, W] (float64 from the float32 Jacobian)."""
    jac = np.asarray(denoisers.make("wiener", stats=st).jacobian(ab), np.float64)
    return np.stack([sensitivity.linear_field(jac, st.shape, p) for p in pixels])


def load_network(ckpt: str, want_transform: str, train_cmd: str):
    """(denoiser, None) or (None, reason) for a checkpoint that must have been trained with
    ``want_transform``."""
    if not ckpt:
        return None, "not configured"
    if not os.path.exists(ckpt):
        return None, f"checkpoint {ckpt} does not exist; train it with: {train_cmd}"
    from locality.checkpoints import read_checkpoint_config

    try:
        meta = read_checkpoint_config(ckpt)
        got = (meta.get("train") or {}).get("transform", "") or ""
        if got != want_transform:
            return None, (
                f"{ckpt} was trained with transform {got!r}, this part needs "
                f"{want_transform!r}; train it with: {train_cmd}"
            )
        return denoisers.make("network", checkpoint=ckpt), None
    except Exception as e:  # half-written or incompatible: report and continue
        return None, f"{type(e).__name__}: {e}"


def noisy(x0: np.ndarray, ab: float, key, t: int) -> np.ndarray:
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape, np.float32))
    return (np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps).astype(np.float32)


def train_command(config, arch: str, spec: str, ckpt: str) -> str:
    name = os.path.basename(ckpt.rstrip("/"))
    return (
        f"python -m experiments.train --config configs/train.py:{config.dataset},cpu,{arch} "
        f"--config.train.transform={spec} --workdir workdirs/{name} --export_to {ckpt}"
    )


def block_mask(shape, corner, size) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[corner[0] : corner[0] + size, corner[1] : corner[1] + size] = True
    return m


# ----------------------------------------------------------------------------- parts


def run_link(config, workdir, train, test, ts, abs_, key) -> dict:
    spec = config.link.spec
    lk = transforms.parse(spec)
    if not isinstance(lk, transforms.Link):
        raise ValueError(f"config.link.spec must be a 'link:...' spec, got {spec!r}")
    h, w, _ = train.shape[1:]
    transforms.check_link(lk, h, w)
    half = lk.size // 2
    p_dst = (lk.dst[0] + half, lk.dst[1] + half)
    p_src = (lk.src[0] + half, lk.src[1] + half)
    pixels = (p_dst, p_src)
    partner = {
        p_dst: block_mask((h, w), lk.src, lk.size),
        p_src: block_mask((h, w), lk.dst, lk.size),
    }
    own = {p_dst: block_mask((h, w), lk.dst, lk.size), p_src: block_mask((h, w), lk.src, lk.size)}
    train_l = transforms.apply(train, spec)
    test_l = transforms.apply(test, spec)
    st0 = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    st1 = stats.gaussian_stats(train_l, cache_dir=common.stats_cache_dir())

    models, status = {}, {"wiener_original": {"status": "ok"}, "wiener_linked": {"status": "ok"}}
    for name, (ckpt, want, arch) in {
        "unet_original": (config.link.networks.get("unet_original", ""), "", "unet"),
        "unet_linked": (config.link.networks.get("unet_linked", ""), spec, "unet"),
    }.items():
        net, why = load_network(
            ckpt,
            want,
            train_command(config, arch, want, ckpt)
            if want
            else f"python -m experiments.train --config configs/train.py:"
            f"{config.dataset},cpu,{arch} --workdir workdirs/x --export_to {ckpt}",
        )
        if net is None:
            status[name] = {"status": "skipped", "reason": why}
        else:
            models[name] = net
            status[name] = {"status": "ok", "checkpoint": ckpt}
    names = ["wiener_original", "wiener_linked"] + list(models)
    fields = {m: [] for m in names}
    for t, ab in zip(ts, abs_):
        fields["wiener_original"].append(wiener_fields(st0, ab, pixels))
        fields["wiener_linked"].append(wiener_fields(st1, ab, pixels))
        x_t = noisy(test_l, ab, key, t)
        for m, net in models.items():
            fields[m].append(np.asarray(sensitivity.fields(net, x_t, ab, pixels), np.float64))

    def frac(f, mask):
        return float(f[mask].sum() / f.sum())

    linked = {
        m: {
            f"{p[0]},{p[1]}": [frac(fields[m][k][i], partner[p]) for k in range(len(ts))]
            for i, p in enumerate(pixels)
        }
        for m in names
    }
    own_mass = {
        m: {
            f"{p[0]},{p[1]}": [frac(fields[m][k][i], own[p]) for k in range(len(ts))]
            for i, p in enumerate(pixels)
        }
        for m in names
    }
    for i, p in enumerate(pixels):
        plotting.save_heatmap_table(
            [[fields[m][k][i] for k in range(len(ts))] for m in names],
            os.path.join(workdir, f"link_fields_r{p[0]}_c{p[1]}.png"),
            row_labels=names,
            col_labels=[f"t={t}" for t in ts],
            marks=[[p] * len(ts) for _ in names],
            title=f"{spec}: field of pixel {p} (partner block centre "
            f"{p_src if p == p_dst else p_dst})",
        )
    series = [
        {
            "x": ts,
            "y": linked[m][f"{p_dst[0]},{p_dst[1]}"],
            "label": m,
            "color": f"C{c}",
            "marker": "o",
            "style": "-",
        }
        for c, m in enumerate(names)
    ]
    series += [
        {
            "x": ts,
            "y": linked[m][f"{p_src[0]},{p_src[1]}"],
            "label": f"{m} (src pixel)",
            "color": f"C{c}",
            "marker": "s",
            "style": "--",
        }
        for c, m in enumerate(names)
    ]
    plotting.save_series(
        series,
        os.path.join(workdir, "link_mass.png"),
        xlabel="DDPM timestep t",
        ylabel="field mass in the partner block",
        title=f"linked mass, {spec} (solid: dst pixel {p_dst}, dashed: src {p_src})",
    )
    plotting.save_image_grid(
        test_l[:16],
        os.path.join(workdir, "link_examples.png"),
        ncols=8,
        title=f"test images with {spec}",
    )
    return {
        "spec": spec,
        "pixels": [list(p) for p in pixels],
        "models": status,
        "linked_mass": linked,
        "own_block_mass": own_mass,
        "stats_images": int(st0.count),
    }


def run_permute(config, workdir, train, test, ts, abs_, key) -> dict:
    spec = config.permute.spec
    kind = transforms.parse(spec)
    if not (isinstance(kind, tuple) and kind[0] == "permute"):
        raise ValueError(f"config.permute.spec must be 'permute:SEED', got {spec!r}")
    seed = kind[1]
    h, w, _ = train.shape[1:]
    perm = transforms.permutation(seed, h, w)
    inv = np.argsort(perm)
    pixels = sensitivity.check_pixels(config.permute.pixels, h, w)
    q_pixels = tuple(divmod(int(inv[p[0] * w + p[1]]), w) for p in pixels)  # where p went
    train_p = transforms.apply(train, spec)
    test_p = transforms.apply(test, spec)
    st0 = stats.gaussian_stats(train, cache_dir=common.stats_cache_dir())
    st1 = stats.gaussian_stats(train_p, cache_dir=common.stats_cache_dir())

    status = {"wiener_original": {"status": "ok"}, "wiener_permuted": {"status": "ok"}}
    models = {}  # name -> (net, permuted?)
    for name, ckpt in config.permute.networks.items():
        permuted = name.endswith("_permuted")
        arch = name.split("_")[0]
        want = spec if permuted else ""
        cmd = (
            train_command(config, arch, spec, ckpt)
            if permuted
            else f"python -m experiments.train --config configs/train.py:{config.dataset},cpu,"
            f"{arch} --workdir workdirs/{os.path.basename(ckpt)} --export_to {ckpt}"
        )
        net, why = load_network(ckpt, want, cmd)
        if net is None:
            status[name] = {"status": "skipped", "reason": why}
        else:
            models[name] = (net, permuted)
            status[name] = {"status": "ok", "checkpoint": ckpt}
    names = ["wiener_original", "wiener_permuted"] + list(models)
    orig = {m: [] for m in names}  # fields on the original grid, [P, H, W] per level
    grid = {m: [] for m in names}  # fields on the grid the model works on
    equivariance = []
    for t, ab in zip(ts, abs_):
        f0 = wiener_fields(st0, ab, pixels)
        f1 = wiener_fields(st1, ab, q_pixels)
        orig["wiener_original"].append(f0)
        grid["wiener_original"].append(f0)
        orig["wiener_permuted"].append(transforms.unpermute(f1, seed))
        grid["wiener_permuted"].append(f1)
        equivariance.append(float(np.max(np.abs(orig["wiener_permuted"][-1] - f0)) / np.max(f0)))
        for m, (net, permuted) in models.items():
            x0 = test_p if permuted else test
            f = np.asarray(
                sensitivity.fields(
                    net, noisy(x0, ab, key, t), ab, q_pixels if permuted else pixels
                ),
                np.float64,
            )
            grid[m].append(f)
            orig[m].append(transforms.unpermute(f, seed) if permuted else f)

    res = {m: {} for m in names}
    for m in names:
        permuted = m == "wiener_permuted" or (m in models and models[m][1])
        r_data, r_grid, cos = [], [], []
        for k in range(len(ts)):
            r_data.append([sensitivity.radius(orig[m][k][i], p, 0.5) for i, p in enumerate(pixels)])
            # radius on the grid the model computes on (for original models: the permuted grid)
            g = grid[m][k] if permuted else transforms.permute(orig[m][k][..., None], seed)[..., 0]
            r_grid.append([sensitivity.radius(g[i], q, 0.5) for i, q in enumerate(q_pixels)])
            cos.append(
                [
                    sensitivity.cosine(orig[m][k][i], orig["wiener_original"][k][i])
                    for i in range(len(pixels))
                ]
            )
        res[m] = {
            "radius50_data_grid": np.mean(r_data, axis=1).tolist(),
            "radius50_permuted_grid": np.mean(r_grid, axis=1).tolist(),
            "cosine_to_wiener_original": np.mean(cos, axis=1).tolist(),
        }
    i0 = 0
    plotting.save_heatmap_table(
        [[orig[m][k][i0] for k in range(len(ts))] for m in names],
        os.path.join(workdir, "permute_fields_data_grid.png"),
        row_labels=names,
        col_labels=[f"t={t}" for t in ts],
        marks=[[pixels[i0]] * len(ts) for _ in names],
        title=f"{spec}: fields of original pixel {pixels[i0]}, mapped back to the data grid",
    )
    plotting.save_heatmap_table(
        [
            [grid[m][k][i0] for k in range(len(ts))]
            for m in names
            if m == "wiener_permuted" or (m in models and models[m][1])
        ],
        os.path.join(workdir, "permute_fields_model_grid.png"),
        row_labels=[m for m in names if m == "wiener_permuted" or (m in models and models[m][1])],
        col_labels=[f"t={t}" for t in ts],
        marks=[
            [q_pixels[i0]] * len(ts)
            for m in names
            if m == "wiener_permuted" or (m in models and models[m][1])
        ],
        title=f"{spec}: the same fields on the permuted grid the models see (pixel {q_pixels[i0]})",
    )
    series = []
    for c, m in enumerate(names):
        series.append(
            {
                "x": ts,
                "y": res[m]["radius50_data_grid"],
                "label": f"{m} data grid",
                "color": f"C{c}",
                "marker": "o",
                "style": "-",
            }
        )
        series.append(
            {
                "x": ts,
                "y": res[m]["radius50_permuted_grid"],
                "label": f"{m} permuted grid",
                "color": f"C{c}",
                "marker": "s",
                "style": "--",
            }
        )
    plotting.save_series(
        series,
        os.path.join(workdir, "permute_radius.png"),
        xlabel="DDPM timestep t",
        ylabel="50% radius (pixels)",
        title=f"{spec}: locality on the data grid vs the permuted grid",
    )
    samples = {}
    if config.permute.num_samples:
        from locality import sampling

        x_T = jax.random.normal(
            jax.random.PRNGKey(config.seed),
            (int(config.permute.num_samples),) + tuple(train.shape[1:]),
        )
        for m, (net, permuted) in models.items():
            if not permuted:
                continue
            imgs = np.asarray(sampling.ddim(net, x_T, num_steps=10).images)
            plotting.save_image_grid(
                transforms.unpermute(imgs, seed),
                os.path.join(workdir, f"permute_samples_{m}.png"),
                ncols=8,
                title=f"{m}: DDIM samples mapped back to the data grid",
            )
            samples[m] = f"permute_samples_{m}.png"
    return {
        "spec": spec,
        "pixels": [list(p) for p in pixels],
        "permuted_pixels": [list(q) for q in q_pixels],
        "models": status,
        "summary": res,
        "wiener_equivariance_max_rel_err": equivariance,
        "samples": samples,
    }


def run_pcs(config, workdir, ts, abs_) -> dict:
    faces = load_images(config.pcs, "train", config.pcs.limit)
    st = stats.gaussian_stats(faces, cache_dir=common.stats_cache_dir())
    h, w, c = st.shape
    pixels = sensitivity.check_pixels(config.pcs.pixels, h, w)
    u = np.asarray(st.eigvecs, np.float64)
    ks = [int(k) for k in config.pcs.top_k if int(k) <= u.shape[1]]
    energy = {str(k): [] for k in ks}
    energy_all = {str(k): [] for k in ks}
    fields = []
    for ab in abs_:
        jac = np.asarray(denoisers.make("wiener", stats=st).jacobian(ab), np.float64)
        rows = np.stack([jac[(p[0] * w + p[1]) * c] for p in pixels])  # channel 0 rows
        proj = rows @ u  # [P, n]
        allproj = jac @ u
        for k in ks:
            energy[str(k)].append(float(np.mean(np.sum(proj[:, :k] ** 2, 1) / np.sum(rows**2, 1))))
            energy_all[str(k)].append(
                float(np.mean(np.sum(allproj[:, :k] ** 2, 1) / np.sum(jac**2, 1)))
            )
        fields.append([sensitivity.linear_field(jac, st.shape, p) for p in pixels])
    n_pc = min(8, u.shape[1])
    pcs = [np.abs(u[:, i].reshape(h, w, c).sum(-1)) for i in range(n_pc)]
    table = [[fields[k][i] for k in range(len(ts))] for i in range(len(pixels))]
    plotting.save_heatmap_table(
        table,
        os.path.join(workdir, "pcs_fields.png"),
        row_labels=[f"pixel {p}" for p in pixels],
        col_labels=[f"t={t}" for t in ts],
        marks=[[p] * len(ts) for p in pixels],
        title=f"Wiener fields on {config.pcs.dataset} ({st.count} images)",
    )
    plotting.save_heatmap_table(
        [pcs],
        os.path.join(workdir, "pcs_top.png"),
        row_labels=["|PC|"],
        col_labels=[f"PC {i + 1} ({st.eigvals[i] / st.eigvals.sum():.1%})" for i in range(n_pc)],
        title=f"top principal components of {config.pcs.dataset} (absolute values)",
    )
    series = [
        {"x": ts, "y": energy_all[str(k)], "label": f"top {k} PCs", "color": f"C{i}", "marker": "o"}
        for i, k in enumerate(ks)
    ]
    plotting.save_series(
        series,
        os.path.join(workdir, "pcs_energy.png"),
        xlabel="DDPM timestep t",
        ylabel="fraction of Wiener-row energy",
        title=f"{config.pcs.dataset}: Wiener rows in the span of the top PCs (mean over pixels)",
    )
    mean_img = st.mean.reshape(h, w, c)
    plotting.save_image_grid(
        np.concatenate([faces[:15], mean_img[None]]),
        os.path.join(workdir, "pcs_examples.png"),
        ncols=8,
        title="faces (last: mean)",
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


# ----------------------------------------------------------------------------- driver


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
        train = load_images(config, config.stats_split, config.stats_limit)
        if config.get("test_random", False):  # a source sorted by class: no prefix
            test = common.subset(
                load_images(config, config.test_split, None), config.num_inputs, config.seed
            )
        else:
            test = load_images(config, config.test_split, config.num_inputs)[: config.num_inputs]
        metrics["dataset"] = config.dataset
        metrics["num_inputs"] = int(test.shape[0])
        if "link" in parts:
            metrics["link"] = run_link(config, workdir, train, test, ts, abs_, key)
        if "permute" in parts:
            metrics["permute"] = run_permute(config, workdir, train, test, ts, abs_, key)
    if "pcs" in parts:
        metrics["pcs"] = run_pcs(config, workdir, ts, abs_)
    common.write_json(os.path.join(workdir, "metrics.json"), metrics)
    lines = summary_lines(metrics)
    common.write_summary(workdir, lines)
    return metrics


def _fmt(vals) -> str:
    return " ".join(f"{v:.3f}" for v in vals)


def summary_lines(m: dict) -> list:
    ts = m["timesteps"]
    lines = [f"timesteps {ts}"]
    if "link" in m:
        lk = m["link"]
        lines.append(f"[link] {lk['spec']} on {m['dataset']}: field mass in the partner block")
        for name, st in lk["models"].items():
            if st["status"] != "ok":
                lines.append(f"  {name}: skipped ({st['reason']})")
                continue
            for p, v in lk["linked_mass"][name].items():
                lines.append(f"  {name:16s} pixel ({p}): {_fmt(v)}")
    if "permute" in m:
        pm = m["permute"]
        lines.append(
            f"[permute] {pm['spec']} on {m['dataset']}; Wiener equivariance max rel err "
            f"{max(pm['wiener_equivariance_max_rel_err']):.2e}"
        )
        for name, st in pm["models"].items():
            if st["status"] != "ok":
                lines.append(f"  {name}: skipped ({st['reason']})")
                continue
            s = pm["summary"][name]
            lines.append(
                f"  {name:16s} r50 data grid {_fmt(s['radius50_data_grid'])} | permuted "
                f"grid {_fmt(s['radius50_permuted_grid'])} | cos to Wiener "
                f"{_fmt(s['cosine_to_wiener_original'])}"
            )
    if "pcs" in m:
        pc = m["pcs"]
        lines.append(
            f"[pcs] {pc['dataset']} ({pc['images']} images): Wiener-row energy in the "
            "top-k PCs (mean over all pixels)"
        )
        for k, v in pc["energy_all_pixels"].items():
            lines.append(
                f"  top {k:>3s} (explains {pc['explained_variance_top_k'][k]:.1%} of the "
                f"variance): {_fmt(v)}"
            )
    return lines


if __name__ == "__main__":
    common.run_as_program(run, "configs/data_stats.py:fashion_mnist")
