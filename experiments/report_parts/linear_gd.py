"""Report section for GD-trained linear denoisers (experiments/linear_gd.py)."""

from __future__ import annotations

import os

from experiments.report_parts.common import command, figures, fmt, overrides


def linear_section(d, m, cfg, out_dir):
    """Distance of the GD-trained linear denoisers to the Wiener filter per noise level, and
    whether each converged or reached its statistical floor (titled with the levels, since a
    dataset can have runs at several)."""
    ds = cfg.get("dataset", "?")
    ts = m["timesteps"]
    ddim = tuple(m["timesteps"]) == (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)
    # the run's own workdir (where its weights live; results/ keeps a copy without the weights)
    run_dir = os.path.dirname(m.get("weights_file") or "") or d
    arg = f"{ds},ddim" if ddim else ds
    cmd = command("linear_gd", arg, run_dir, overrides("linear_gd", arg, cfg))
    lines = [
        f"### Gradient-descent linear denoisers on {ds}, t = {ts[0]}..{ts[-1]}",
        "",
        f"Reproduce: `{cmd}`",
        "",
        "| t | rel. Frobenius error to W* | its statistical floor | field cosine | "
        "excess loss | converged |",
        "|---|---|---|---|---|---|",
    ]
    at_floor = []
    for t in ts:
        lv = m["levels"][str(t)]
        f = lv["final"]
        floor = lv.get("predicted_rel_frob")
        # within 10 % of the error the sampling noise of a finite training run predicts
        near = floor is not None and f["rel_frob"] <= 1.1 * floor
        at_floor.append(bool(lv["converged"] or near))
        lines.append(
            f"| {t} | {f['rel_frob']:.4f} | {fmt(floor, 4)} | {f['cosine']:.4f} | "
            f"{f['excess']:.2e} | {lv['converged']}"
            f"{' (at floor)' if near and not lv['converged'] else ''} |"
        )
    lines.append("")
    lines += figures(d, ("rel_frob.png", "cosine.png"), out_dir)
    lines.append("")
    bad = [t for t, ok in zip(ts, at_floor) if not ok]
    misses = "; ".join(
        f"t = {t}: rel. error {m['levels'][str(t)]['final']['rel_frob']:.3f} vs "
        f"floor {fmt(m['levels'][str(t)].get('predicted_rel_frob'))}"
        for t in bad
    )
    readme = (
        f"GD linear denoisers -> Wiener ({ds}, t = {ts[0]}..{ts[-1]})",
        f"converged or within 10 % of the statistical floor at {len(ts) - len(bad)}/{len(ts)} "
        "levels" + (f" ({misses})" if misses else ""),
        "converge to the Wiener filter"
        if not bad
        else f"converge except at t = {', '.join(map(str, bad))}",
        cmd,
    )
    return lines, readme
