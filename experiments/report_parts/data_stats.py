"""Report section for data-statistics runs (experiments/data_stats.py, docs/algorithms.md §9):
one part per experiment the run holds (link injection, permuted pixels, faces' PCs)."""

from __future__ import annotations

import numpy as np

from experiments.report_parts.common import command, figures, fmt, overrides


def link_part(m, ds, ts, cmd, d, out_dir) -> tuple:
    """Injected long-range link: field mass on the linked block per model."""
    lines, readme = [], []
    lk = m["link"]
    p = ",".join(map(str, lk["pixels"][0]))
    lines += [
        f"**Injected long-range link** `{lk['spec']}`: fraction of the field of the "
        f"destination-block pixel ({p}) that lies in the distant source block, at t = "
        f"{', '.join(map(str, ts))}.",
        "",
        "| model | linked mass |",
        "|---|---|",
    ]
    for k, st in lk["models"].items():
        if st["status"] == "ok":
            lines.append(f"| {k} | " + " ".join(fmt(v) for v in lk["linked_mass"][k][p]) + " |")
        else:
            lines.append(f"| {k} | skipped: {st['reason']} |")
    lines.append("")
    mass = {k: float(np.mean(v[p])) for k, v in lk["linked_mass"].items()}
    if "unet_linked" in mass and "unet_original" in mass:
        ratio = mass["unet_linked"] / max(mass["unet_original"], 1e-12)
        share = mass["unet_linked"] / max(mass["wiener_linked"], 1e-12)
        verdict = (
            "the field follows the injected correlation"
            if ratio >= 2 and share >= 0.5
            else f"moves toward the link ({ratio:.1f}x), {share:.0%} of the Wiener "
            "filter's linked mass"
            if ratio >= 2
            else "no clear transfer"
        )
        readme.append(
            (
                f"link injection: UNet field mass on the linked block ({ds})",
                f"{mass['unet_linked']:.3f} trained on linked data vs "
                f"{mass['unet_original']:.3f} on original (Wiener {mass['wiener_linked']:.3f}"
                f" vs {mass['wiener_original']:.3f}); mean over t",
                verdict,
                cmd,
            )
        )
    p0 = lk["pixels"][0]
    lines += figures(d, (f"link_fields_r{p0[0]}_c{p0[1]}.png", "link_mass.png"), out_dir)
    lines.append("")
    return lines, readme


def permute_part(m, ds, ts, cmd, d, out_dir) -> tuple:
    """Permuted pixels: radii on the data grid and the permuted grid, cosine to Wiener."""
    lines, readme = [], []
    pm = m["permute"]
    lines += [
        f"**Permuted pixels** `{pm['spec']}` (Wiener equivariance error "
        f"{max(pm['wiener_equivariance_max_rel_err']):.1e}): 50% radius of the fields "
        "on the data grid and on the permuted grid, and cosine to the Wiener field of "
        "the original data (mean over pixels), at t = " + ", ".join(map(str, ts)) + ".",
        "",
        "| model | r50 data grid | r50 permuted grid | cosine to Wiener |",
        "|---|---|---|---|",
    ]
    for k, st in pm["models"].items():
        if st["status"] != "ok":
            lines.append(f"| {k} | skipped: {st['reason']} | | |")
            continue
        s = pm["summary"][k]
        lines.append(
            f"| {k} | "
            + " ".join(fmt(v, 2) for v in s["radius50_data_grid"])
            + " | "
            + " ".join(fmt(v, 2) for v in s["radius50_permuted_grid"])
            + " | "
            + " ".join(fmt(v) for v in s["cosine_to_wiener_original"])
            + " |"
        )
    lines.append("")
    rw = float(np.mean(pm["summary"]["wiener_original"]["radius50_data_grid"]))
    for k in ("unet_permuted", "dit_permuted"):
        if k in pm["summary"]:
            s = pm["summary"][k]
            rd, rp = np.mean(s["radius50_data_grid"]), np.mean(s["radius50_permuted_grid"])
            cos = float(np.mean(s["cosine_to_wiener_original"]))
            tighter = sum(
                a < b for a, b in zip(s["radius50_data_grid"], s["radius50_permuted_grid"])
            )
            follows = rd <= 1.5 * rw and cos >= 0.8
            readme.append(
                (
                    f"{'DiT' if k.startswith('dit') else 'UNet'} trained on permuted pixels ({ds})",
                    f"r50 {rd:.1f} px on the data grid (Wiener {rw:.1f}), {rp:.1f} px on "
                    f"its own grid; cosine to Wiener {cos:.2f}; tighter on the data grid "
                    f"at {tighter}/{len(ts)} levels",
                    "its fields follow the data's correlations"
                    if follows
                    else "does not recover the data's locality at this training budget",
                    cmd,
                )
            )
    lines += figures(
        d,
        ("permute_fields_data_grid.png", "permute_radius.png", *pm.get("samples", {}).values()),
        out_dir,
    )
    lines.append("")
    return lines, readme


def pcs_part(m, ds, ts, cmd, d, out_dir) -> tuple:
    """Aligned faces: energy of the Wiener rows in the top-k principal components."""
    lines, readme = [], []
    pc = m["pcs"]
    lines += [
        f"**Aligned faces** ({pc['dataset']}, {pc['images']} images): fraction of the "
        "energy of the Wiener rows in the span of the top-k principal components (mean "
        "over all pixels), at t = " + ", ".join(map(str, ts)) + ".",
        "",
        "| top k | variance explained | energy of W_t rows |",
        "|---|---|---|",
    ]
    ks = sorted(pc["energy_all_pixels"], key=int)
    for k in ks:
        lines.append(
            f"| {k} | {pc['explained_variance_top_k'][k]:.3f} | "
            + " ".join(fmt(x) for x in pc["energy_all_pixels"][k])
            + " |"
        )
    k0 = ks[1] if len(ks) > 1 else ks[0]
    e = pc["energy_all_pixels"][k0]
    readme.append(
        (
            f"faces: Wiener rows in the top-{k0} PCs ({pc['dataset']})",
            f"{e[-1]:.2f} at t={ts[-1]} vs {e[0]:.2f} at t={ts[0]}",
            "high-noise fields are built from the top PCs"
            if e[-1] > e[0]
            else "no concentration on the top PCs",
            cmd,
        )
    )
    lines.append("")
    lines += figures(d, ("pcs_top.png", "pcs_fields.png", "pcs_energy.png"), out_dir)
    lines.append("")
    return lines, readme


PARTS = (("link", link_part), ("permute", permute_part), ("pcs", pcs_part))


def data_stats_section(d, m, cfg, out_dir):
    """The parts of one data-statistics run and their README rows."""
    ds = m.get("dataset", cfg.get("dataset", "?"))
    cmd = command("data_stats", ds, d, overrides("data_stats", ds, cfg))
    ts = m["timesteps"]
    lines = [f"### Data-statistics experiments ({ds})", "", f"Reproduce: `{cmd}`", ""]
    readme = []
    for key, part in PARTS:
        if key in m:
            more, rows = part(m, ds, ts, cmd, d, out_dir)
            lines += more
            readme += rows
    return lines, readme
