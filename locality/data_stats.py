"""Measurements of the data-statistics experiments: does a denoiser's locality follow the data?

The three parts of ``experiments/data_stats.py`` (docs/algorithms.md §9, last paragraph), as
functions over arrays, statistics and loaded denoisers:

- *link*: the sensitivity fields (docs/algorithms.md §9) of the centre pixels of two linked
  blocks, and the fraction of each field's mass inside a block (:func:`link_geometry`,
  :func:`link_fields`, :func:`block_mass`);
- *permute*: fields of the original and the permuted data's models on both grids, their 50 %
  radius and their cosine with the Wiener field of the original data (:func:`permute_fields`,
  :func:`permute_summary`); the Wiener filter is exactly permutation-equivariant,
  ``W_perm = P W P^T`` (docs/algorithms.md §4);
- *pcs*: the fraction of the energy of each Wiener row ``W_t = U diag(s_t) U^T / sqrt(ab)``
  (docs/algorithms.md §4; Lukoianov et al., NeurIPS 2025) in the span of the top-k principal
  components (:func:`pc_energy`).

The pixel permutation is passed in as functions on ``[..., H, W]`` fields (from
:mod:`locality.data.transforms`), so this module reads no dataset. Fields are float64 numpy.
The ``save_*`` functions draw each part's figures (:mod:`locality.plotting`, atomic writes).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from locality import denoisers, field_summary, plotting, sampling, sensitivity
from locality.checkpoints import read_checkpoint_config

WIENER_LINK = ("wiener_original", "wiener_linked")
WIENER_PERMUTE = ("wiener_original", "wiener_permuted")


def wiener_fields(st, ab: float, pixels) -> np.ndarray:
    """Exact Wiener fields [P, H, W] (float64 from the float32 Jacobian)."""
    jac = np.asarray(denoisers.make("wiener", stats=st).jacobian(ab), np.float64)
    return np.stack([sensitivity.linear_field(jac, st.shape, p) for p in pixels])


def noisy(x0: np.ndarray, ab: float, key, t: int) -> np.ndarray:
    """``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` with ``eps`` from ``fold_in(key, t)``
    (docs/algorithms.md §1), the same for every model at level ``t``."""
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape, np.float32))
    return (np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps).astype(np.float32)


def block_mask(shape, corner, size) -> np.ndarray:
    """Boolean [H, W] mask of the ``size x size`` block whose top-left corner is ``corner``."""
    m = np.zeros(shape, bool)
    m[corner[0] : corner[0] + size, corner[1] : corner[1] + size] = True
    return m


def load_network(ckpt: str, want_transform: str, train_cmd: str):
    """(denoiser, None) or (None, reason) for a checkpoint that must have been trained with
    ``want_transform``; the reason names ``train_cmd``, the command that trains it."""
    if not ckpt:
        return None, "not configured"
    if not os.path.exists(ckpt):
        return None, f"checkpoint {ckpt} does not exist; train it with: {train_cmd}"
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


def load_networks(networks: dict, spec: str, suffix: str, command) -> tuple:
    """``({name: denoiser}, {name: {"status": "ok" | "skipped", ...}})`` for ``networks``
    (``{"<arch>_...": checkpoint}``, in order): a name ending in ``suffix`` needs a net trained
    with transform ``spec``, any other one a net trained without; a skipped net's reason names
    ``command(arch, transform, checkpoint)``, the command that trains it."""
    models, status = {}, {}
    for name, ckpt in networks.items():
        arch, want = name.split("_")[0], spec if name.endswith(suffix) else ""
        net, why = load_network(ckpt, want, command(arch, want, ckpt))
        if net is None:
            status[name] = {"status": "skipped", "reason": why}
        else:
            models[name] = net
            status[name] = {"status": "ok", "checkpoint": ckpt}
    return models, status


def link_geometry(src, dst, size: int, height: int, width: int):
    """``(pixels, partner, own)`` of a link of the ``size`` block at ``src`` over the one at
    ``dst``: the centre pixels ``(p_dst, p_src)`` of the two blocks and, for each, the [H, W]
    mask of the other block and of its own block."""
    half = size // 2
    p_dst, p_src = (dst[0] + half, dst[1] + half), (src[0] + half, src[1] + half)
    hw = (height, width)
    partner = {p_dst: block_mask(hw, src, size), p_src: block_mask(hw, dst, size)}
    own = {p_dst: block_mask(hw, dst, size), p_src: block_mask(hw, src, size)}
    return (p_dst, p_src), partner, own


def link_fields(st_original, st_linked, models: dict, x0_linked, pixels, ts, abs_, key) -> dict:
    """``{model: [per level, [P, H, W]]}`` for the Wiener filters of the original and the linked
    data and for ``models`` (evaluated on the noised linked images ``x0_linked``)."""
    names = list(WIENER_LINK) + list(models)
    fields = {m: [] for m in names}
    for t, ab in zip(ts, abs_):
        fields["wiener_original"].append(wiener_fields(st_original, ab, pixels))
        fields["wiener_linked"].append(wiener_fields(st_linked, ab, pixels))
        x_t = noisy(x0_linked, ab, key, t)
        for m, net in models.items():
            fields[m].append(np.asarray(sensitivity.fields(net, x_t, ab, pixels), np.float64))
    return fields


def block_mass(fields: dict, masks: dict, pixels) -> dict:
    """``{model: {"r,c": [per level, fraction of the field of pixel (r, c) inside masks[p]]}}``."""

    def frac(f, mask):
        return float(f[mask].sum() / f.sum())

    return {
        m: {
            f"{p[0]},{p[1]}": [frac(levels[k][i], masks[p]) for k in range(len(levels))]
            for i, p in enumerate(pixels)
        }
        for m, levels in fields.items()
    }


def save_link_figures(workdir, fields, linked, pixels, ts, spec, x0_linked) -> None:
    """``link_fields_r<row>_c<col>.png`` (one per pixel), ``link_mass.png`` (mass in the partner
    block against t) and ``link_examples.png`` (linked images)."""
    names = list(fields)
    p_dst, p_src = pixels
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
            "y": linked[m][f"{p[0]},{p[1]}"],
            "label": m if p == p_dst else f"{m} (src pixel)",
            "color": f"C{c}",
            "marker": "o" if p == p_dst else "s",
            "style": "-" if p == p_dst else "--",
        }
        for p in pixels
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
        x0_linked[:16],
        os.path.join(workdir, "link_examples.png"),
        ncols=8,
        title=f"test images with {spec}",
    )


def moved_pixels(perm: np.ndarray, pixels, width: int):
    """Where a pixel permutation (output flat position ``q`` takes input ``perm[q]``) sends each
    original pixel ``p``."""
    inv = np.argsort(perm)
    return tuple(divmod(int(inv[p[0] * width + p[1]]), width) for p in pixels)


def permute_fields(st_original, st_permuted, models, pixels, moved, ts, abs_, key, to_data):
    """Fields of the Wiener filters of the original and the permuted data and of ``models``
    (``{name: (denoiser, permuted?, its clean inputs)}``), per level ``[P, H, W]``:
    ``(on the original grid, on the grid the model works on, Wiener equivariance error per
    level)``. A permuted model gives the field of the moved pixel, mapped back by ``to_data``."""
    names = list(WIENER_PERMUTE) + list(models)
    orig = {m: [] for m in names}  # fields on the original grid, [P, H, W] per level
    grid = {m: [] for m in names}  # fields on the grid the model works on
    equivariance = []
    for t, ab in zip(ts, abs_):
        f0 = wiener_fields(st_original, ab, pixels)
        f1 = wiener_fields(st_permuted, ab, moved)
        orig["wiener_original"].append(f0)
        grid["wiener_original"].append(f0)
        orig["wiener_permuted"].append(to_data(f1))
        grid["wiener_permuted"].append(f1)
        equivariance.append(float(np.max(np.abs(orig["wiener_permuted"][-1] - f0)) / np.max(f0)))
        for m, (net, permuted, x0_m) in models.items():
            f = np.asarray(
                sensitivity.fields(net, noisy(x0_m, ab, key, t), ab, moved if permuted else pixels),
                np.float64,
            )
            grid[m].append(f)
            orig[m].append(to_data(f) if permuted else f)
    return orig, grid, equivariance


def permute_summary(orig, grid, permuted, pixels, moved, to_model) -> dict:
    """Per model (``permuted``: the names of models of the permuted data), per level, the mean
    over pixels of the 50 % radius on the data grid and on the permuted grid and the cosine with
    the Wiener field of the original data (docs/algorithms.md §9)."""
    res = {}
    for m in orig:
        r_data, r_grid, cos = [], [], []
        for k in range(len(orig[m])):
            r_data.append(
                [field_summary.radius(orig[m][k][i], p, 0.5) for i, p in enumerate(pixels)]
            )
            # radius on the grid the model computes on (for original models: the permuted grid)
            g = grid[m][k] if m in permuted else to_model(orig[m][k])
            r_grid.append([field_summary.radius(g[i], q, 0.5) for i, q in enumerate(moved)])
            cos.append(
                [
                    field_summary.cosine(orig[m][k][i], orig["wiener_original"][k][i])
                    for i in range(len(pixels))
                ]
            )
        res[m] = {
            "radius50_data_grid": np.mean(r_data, axis=1).tolist(),
            "radius50_permuted_grid": np.mean(r_grid, axis=1).tolist(),
            "cosine_to_wiener_original": np.mean(cos, axis=1).tolist(),
        }
    return res


def save_permute_figures(workdir, orig, grid, res, permuted, pixels, moved, ts, spec) -> None:
    """``permute_fields_data_grid.png``, ``permute_fields_model_grid.png`` (first pixel) and
    ``permute_radius.png`` (50 % radius on both grids against t)."""
    names = list(orig)
    on_grid = [m for m in names if m in permuted]
    cols = [f"t={t}" for t in ts]
    plotting.save_heatmap_table(
        [[orig[m][k][0] for k in range(len(ts))] for m in names],
        os.path.join(workdir, "permute_fields_data_grid.png"),
        row_labels=names,
        col_labels=cols,
        marks=[[pixels[0]] * len(ts) for _ in names],
        title=f"{spec}: fields of original pixel {pixels[0]}, mapped back to the data grid",
    )
    plotting.save_heatmap_table(
        [[grid[m][k][0] for k in range(len(ts))] for m in on_grid],
        os.path.join(workdir, "permute_fields_model_grid.png"),
        row_labels=on_grid,
        col_labels=cols,
        marks=[[moved[0]] * len(ts) for _ in on_grid],
        title=f"{spec}: the same fields on the permuted grid the models see (pixel {moved[0]})",
    )
    series = []
    for c, m in enumerate(names):
        for key, where, marker, style in (
            ("radius50_data_grid", "data grid", "o", "-"),
            ("radius50_permuted_grid", "permuted grid", "s", "--"),
        ):
            series.append(
                {
                    "x": ts,
                    "y": res[m][key],
                    "label": f"{m} {where}",
                    "color": f"C{c}",
                    "marker": marker,
                    "style": style,
                }
            )
    plotting.save_series(
        series,
        os.path.join(workdir, "permute_radius.png"),
        xlabel="DDPM timestep t",
        ylabel="50% radius (pixels)",
        title=f"{spec}: locality on the data grid vs the permuted grid",
    )


def save_permuted_samples(workdir, models: dict, x_T, to_data) -> dict:
    """10-step DDIM samples of every model of the permuted data, mapped back to the data grid by
    ``to_data``: ``{name: "permute_samples_<name>.png"}``."""
    samples = {}
    for m, net in models.items():
        imgs = np.asarray(sampling.ddim(net, x_T, num_steps=10).images)
        plotting.save_image_grid(
            to_data(imgs),
            os.path.join(workdir, f"permute_samples_{m}.png"),
            ncols=8,
            title=f"{m}: DDIM samples mapped back to the data grid",
        )
        samples[m] = f"permute_samples_{m}.png"
    return samples


def pc_energy(st, abs_, pixels, top_k):
    """Energy fraction of the Wiener rows in the span of the top-k principal components, per
    level (float64): ``(at the channel-0 rows of pixels, mean over all rows, fields)`` with
    ``{str(k): [per level]}`` for each ``k`` of ``top_k`` and the fields ``[level][pixel]``."""
    h, w, c = st.shape
    u = np.asarray(st.eigvecs, np.float64)
    energy = {str(k): [] for k in top_k}
    energy_all = {str(k): [] for k in top_k}
    fields = []
    for ab in abs_:
        jac = np.asarray(denoisers.make("wiener", stats=st).jacobian(ab), np.float64)
        rows = np.stack([jac[(p[0] * w + p[1]) * c] for p in pixels])  # channel 0 rows
        proj = rows @ u  # [P, n]
        allproj = jac @ u
        for k in top_k:
            energy[str(k)].append(float(np.mean(np.sum(proj[:, :k] ** 2, 1) / np.sum(rows**2, 1))))
            energy_all[str(k)].append(
                float(np.mean(np.sum(allproj[:, :k] ** 2, 1) / np.sum(jac**2, 1)))
            )
        fields.append([sensitivity.linear_field(jac, st.shape, p) for p in pixels])
    return energy, energy_all, fields


def save_pcs_figures(workdir, st, images, fields, energy_all, pixels, ts, dataset) -> None:
    """``pcs_fields.png``, ``pcs_top.png`` (the top 8 components), ``pcs_energy.png`` and
    ``pcs_examples.png`` (images and the mean)."""
    h, w, c = st.shape
    u = np.asarray(st.eigvecs, np.float64)
    n_pc = min(8, u.shape[1])
    pcs = [np.abs(u[:, i].reshape(h, w, c).sum(-1)) for i in range(n_pc)]
    plotting.save_heatmap_table(
        [[fields[k][i] for k in range(len(ts))] for i in range(len(pixels))],
        os.path.join(workdir, "pcs_fields.png"),
        row_labels=[f"pixel {p}" for p in pixels],
        col_labels=[f"t={t}" for t in ts],
        marks=[[p] * len(ts) for p in pixels],
        title=f"Wiener fields on {dataset} ({st.count} images)",
    )
    plotting.save_heatmap_table(
        [pcs],
        os.path.join(workdir, "pcs_top.png"),
        row_labels=["|PC|"],
        col_labels=[f"PC {i + 1} ({st.eigvals[i] / st.eigvals.sum():.1%})" for i in range(n_pc)],
        title=f"top principal components of {dataset} (absolute values)",
    )
    series = [
        {"x": ts, "y": v, "label": f"top {k} PCs", "color": f"C{i}", "marker": "o"}
        for i, (k, v) in enumerate(energy_all.items())
    ]
    plotting.save_series(
        series,
        os.path.join(workdir, "pcs_energy.png"),
        xlabel="DDPM timestep t",
        ylabel="fraction of Wiener-row energy",
        title=f"{dataset}: Wiener rows in the span of the top PCs (mean over pixels)",
    )
    plotting.save_image_grid(
        np.concatenate([images[:15], st.mean.reshape(h, w, c)[None]]),
        os.path.join(workdir, "pcs_examples.png"),
        ncols=8,
        title="faces (last: mean)",
    )


def _fmt(vals) -> str:
    return " ".join(f"{v:.3f}" for v in vals)


def summary_lines(m: dict) -> list:
    """The lines of ``summary.txt`` for a ``metrics.json`` of ``experiments/data_stats.py``."""
    lines = [f"timesteps {m['timesteps']}"]
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
