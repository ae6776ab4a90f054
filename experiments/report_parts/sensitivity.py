"""Report section for sensitivity runs (experiments/sensitivity.py, docs/algorithms.md §9).

The title names the networks whose fields were measured. Runs with a ``summary`` block in their
``metrics.json`` (schema below) get one table per noise level: the 50 % / 90 % radii of every
model (mean ± SE) and, for each model against the reference field, the cosine and the IoU of
the 50 % / 90 % supports (mean ± SE), followed by the run's own verdict text; their README row
reads the radii and IoUs. Runs without it (written before the block existed) keep the table of
the 50 % radius and the cosine to Wiener at the first pixel.

    "summary": {"pixels": [[r, c], ...], "num_inputs": int, "timesteps": [t, ...] (ascending),
      "models": [...], "reference": "wiener",
      "per_model": {model: {"radius50": {"mean": [per t], "se": [per t]}, "radius90": {...}}},
      "pairs": {"a|b": {"cosine": {"mean": [...], "se": [...]}, "iou50": {...}, "iou90": {...}}},
      "verdicts": {network_model: {"agree": bool, "shrink": bool, "reference_shrinks": bool,
                                   "text": str}}}
"""

from __future__ import annotations

import os

from experiments.report_parts.common import command, figures, fmt, network_name, overrides

PAIR_STATS = (("cosine", "cosine"), ("iou50", "IoU50"), ("iou90", "IoU90"))


def title(m: dict, cfg: dict, ds: str) -> str:
    """``### Sensitivity fields: <ds>, unet `<network>`, ...`` (the networks of the run)."""
    nets = {k: v["checkpoint"] for k, v in m.get("models", {}).items() if v.get("checkpoint")}
    nets = nets or dict(cfg.get("networks") or {})
    names = ", ".join(f"{k} `{network_name(p)}`" for k, p in sorted(nets.items()))
    return f"### Sensitivity fields: {ds}, {names}" if names else f"### Sensitivity fields: {ds}"


def network_suffix(cfg: dict, ds: str, nets) -> str:
    """``, unet `<name>``` for each network of ``nets`` that is not the default
    ``checkpoints/<ds>_<model>_cpu`` (the README claim names only those)."""
    other = [
        f"{k} `{os.path.basename(str(p).rstrip('/'))}`"
        for k, p in sorted((cfg.get("networks") or {}).items())
        if k in nets and str(p).rstrip("/") != f"checkpoints/{ds}_{k}_cpu"
    ]
    return ", " + ", ".join(other) if other else ""


def sensitivity_section(d, m, cfg, out_dir):
    """Lines and README row of one sensitivity run (the summary form when it has one)."""
    if "summary" in m:
        return summary_section(d, m, cfg, out_dir)
    return legacy_section(d, m, cfg, out_dir)


def legacy_section(d, m, cfg, out_dir):
    """Runs without a ``summary``: 50 % radius and cosine to Wiener at the first pixel."""
    ds = cfg.get("dataset", "?")
    ts = m["timesteps"]
    cmd = command("sensitivity", ds, d, overrides("sensitivity", ds, cfg))
    first = ",".join(str(v) for v in m["pixels"][0])
    ok = [k for k, v in m["models"].items() if v["status"] == "ok"]
    # matrix order; runs written before "model_order" existed used wiener, linear, then networks
    # in sorted order
    names = m.get("model_order") or (
        ["wiener"]
        + (["linear"] if "linear" in ok else [])
        + sorted(k for k in ok if k not in ("wiener", "linear"))
    )
    lines = [
        title(m, cfg, ds),
        "",
        f"Reproduce: `{cmd}`",
        "",
        "| model | 50% radius at t = " + ", ".join(map(str, ts)) + " | cosine to Wiener |",
        "|---|---|---|",
    ]
    shrink = {}
    for k in names:
        r = m["radius"][k][first]["0.5"]
        idx = names.index(k)
        cos = [m["cosine"][str(t)][first][0][idx] for t in ts]
        lines.append(
            f"| {k} | "
            + " ".join(fmt(v, 2) for v in r)
            + " | "
            + " ".join(fmt(v) for v in cos)
            + " |"
        )
        vals = [v for v in r if v is not None]
        shrink[k] = bool(vals) and vals[0] < vals[-1]
    nets = [k for k in names if k not in ("wiener", "linear")]
    cos_nets = {k: [m["cosine"][str(t)][first][0][names.index(k)] for t in ts] for k in nets}
    lines += [
        "",
        "Fields shrink with decreasing noise (50% radius at the lowest t < at the highest): "
        + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in shrink.items())
        + ".",
        "",
    ]
    lines += figures(
        d,
        (
            f"fields_r{m['pixels'][0][0]}_c{m['pixels'][0][1]}.png",
            "radius.png",
            "similarity_vs_t.png",
        ),
        out_dir,
    )
    lines.append("")
    readme = None
    if nets:
        lo = min(min(v) for v in cos_nets.values())
        hi = max(max(v) for v in cos_nets.values())
        readme = (
            f"network fields vs Wiener ({ds}{network_suffix(cfg, ds, nets)})",
            f"cosine {lo:.2f}-{hi:.2f} ({', '.join(nets)}) over t = {ts[0]}-{ts[-1]}",
            "agree and shrink with decreasing noise"
            if all(shrink.values()) and lo > 0.8
            else "partly: " + ", ".join(f"{k} shrinks: {v}" for k, v in shrink.items()),
            cmd,
        )
    return lines, readme


def _stat(block: dict, i: int, nd: int) -> str:
    """``mean ± se`` of entry ``i`` of a ``{"mean": [...], "se": [...]}`` block."""
    return f"{fmt(block['mean'][i], nd)} ± {fmt(block['se'][i], nd)}"


def pair(summary: dict, a: str, b: str):
    """The ``pairs`` entry of models ``a`` and ``b`` in either order (None when absent)."""
    pairs = summary.get("pairs") or {}
    return pairs.get(f"{a}|{b}") or pairs.get(f"{b}|{a}")


def check_summary(where: str, s: dict) -> None:
    """Every per-t list of ``summary`` has one value per timestep (else a clear error)."""
    n = len(s["timesteps"])
    blocks = [(f"per_model.{k}.{r}", v[r]) for k, v in s["per_model"].items() for r in v] + [
        (f"pairs.{k}.{q}", v[q]) for k, v in (s.get("pairs") or {}).items() for q in v
    ]
    for name, block in blocks:
        for part in ("mean", "se"):
            if len(block[part]) != n:
                raise ValueError(
                    f"{where}: summary.{name}.{part} has {len(block[part])} values for {n} "
                    "timesteps; rerun experiments.sensitivity to rewrite its metrics.json"
                )


def level_table(s: dict, i: int) -> list:
    """Table at noise level ``s["timesteps"][i]``: radii per model, pair statistics against
    the reference."""
    ref = s["reference"]
    out = [
        f"**t = {s['timesteps'][i]}**",
        "",
        "| model | radius50 (px) | radius90 (px) | "
        + " | ".join(f"{h} to {ref}" for _, h in PAIR_STATS)
        + " |",
        "|---|---|---|---|---|---|",
    ]
    for k in s.get("models") or list(s["per_model"]):
        pm, pr = s["per_model"].get(k, {}), pair(s, k, ref)
        radii = [_stat(pm[r], i, 2) if r in pm else "n/a" for r in ("radius50", "radius90")]
        sims = (
            ["(reference)"] * 3
            if k == ref
            else [_stat(pr[q], i, 3) if pr and q in pr else "-" for q, _ in PAIR_STATS]
        )
        out.append(f"| {k} | " + " | ".join(radii + sims) + " |")
    return out + [""]


def networks(m: dict, s: dict) -> list:
    """The networks among the summary's models: those with a checkpoint in the run's
    ``models`` (else every model but the reference and ``linear``)."""
    status = m.get("models") or {}
    nets = [k for k in s["models"] if (status.get(k) or {}).get("checkpoint")]
    return nets or [k for k in s["models"] if k not in (s["reference"], "linear")]


def _span(values) -> str:
    vals = [v for v in values if v is not None]
    return f"{min(vals):.2f}-{max(vals):.2f}" if vals else "n/a"


def summary_readme(m: dict, s: dict, ds: str, cfg: dict, cmd: str):
    """README row from the summary: radii and IoUs of each network against the reference, the
    verdict from the run's own ``verdicts`` of the networks."""
    ref, ts, nets = s["reference"], s["timesteps"], networks(m, s)
    if not nets:
        return None
    r_ref = s["per_model"][ref]["radius50"]["mean"]
    parts = []
    for k in nets:
        r50, pr = s["per_model"][k]["radius50"]["mean"], pair(s, k, ref) or {}
        ious = [f"{h} {_span(pr[q]['mean'])}" for q, h in PAIR_STATS[1:] if q in pr]
        parts.append(
            f"{k}: r50 {fmt(r50[0], 1)} px at t={ts[0]} -> {fmt(r50[-1], 1)} px at t={ts[-1]} "
            f"({ref} {fmt(r_ref[0], 1)} -> {fmt(r_ref[-1], 1)})" + "".join(f", {x}" for x in ious)
        )
    verdicts = {k: v for k, v in (s.get("verdicts") or {}).items() if k in nets}
    if verdicts and all(v["agree"] and v["shrink"] for v in verdicts.values()):
        verdict = "agree and shrink with decreasing noise"
    elif verdicts:
        verdict = "partly: " + "; ".join(
            f"{k} {'agrees' if v['agree'] else 'does not agree'}, "
            f"{'shrinks' if v['shrink'] else 'does not shrink'}"
            for k, v in verdicts.items()
        )
    else:
        verdict = "no verdict recorded in the run's summary"
    claim = "Wiener" if ref == "wiener" else ref
    label = network_suffix(cfg, ds, nets)
    return (f"network fields vs {claim} ({ds}{label})", "; ".join(parts), verdict, cmd)


def summary_section(d, m, cfg, out_dir):
    """Runs with a ``summary`` block: one table per noise level, the run's verdicts quoted."""
    ds = cfg.get("dataset", "?")
    s = m["summary"]
    check_summary(os.path.join(d, "metrics.json"), s)
    cmd = command("sensitivity", ds, d, overrides("sensitivity", ds, cfg))
    pixels = ", ".join(f"({r}, {c})" for r, c in s["pixels"])
    lines = [
        title(m, cfg, ds),
        "",
        f"Reproduce: `{cmd}`",
        "",
        f"Mean ± SE over the {len(s['pixels'])} probed output pixels ({pixels}); each pixel's "
        f"field is the mean over {s['num_inputs']} noisy inputs, so the SE measures how the "
        f"statistic varies across image positions. Reference field: `{s['reference']}`. "
        "radius50 / radius90: radius around the output pixel holding 50 % / 90 % of the "
        "field's mass; IoU50 / IoU90: overlap of the supports holding 50 % / 90 % of the mass "
        "(docs/algorithms.md §9).",
        "",
    ]
    for i in range(len(s["timesteps"])):
        lines += level_table(s, i)
    verdicts = s.get("verdicts") or {}
    if verdicts:
        lines += ["**Verdicts** (the run's own):", ""]
        lines += [f"- {k}: {v['text']}" for k, v in verdicts.items()] + [""]
    p0 = s["pixels"][0]
    lines += figures(
        d, (f"fields_r{p0[0]}_c{p0[1]}.png", "radius.png", "similarity_vs_t.png"), out_dir
    )
    lines.append("")
    return lines, summary_readme(m, s, ds, cfg, cmd)
