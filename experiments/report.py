"""Gather every run's ``metrics.json`` into one report with verdicts on the paper's claims.

    python -m experiments.report                      # results/ -> results/REPORT.md + README table
    python -m experiments.report --results workdirs/quickstart \
        --out workdirs/quickstart/REPORT.md --readme=

Scans the sub-directories of ``--results`` and recognises each run by its ``metrics.json``:
comparisons (``experiments/compare.py``), sensitivity fields (``experiments/sensitivity.py``),
GD-trained linear denoisers (``experiments/linear_gd.py``) and data-statistics experiments
(``experiments/data_stats.py``), guided class-conditional samples (``experiments/guidance.py``);
trained networks are read from ``--checkpoints``. Every number
in the report is read from those files and printed next to the command that regenerates it; the
verdicts are computed from the numbers, whatever they say. The README's results table is the
block between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np
from absl import app, flags

from locality._io import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PEERS = (
    "wiener",
    "optimal",
    "ls",
    "els",
    "bbels",
    "pspc_square",
    "pspc_flex",
    "scfdm",
    "linear",
    "nearest",
)
OURS = "pca_locality"


def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def discover(results: str) -> Dict[str, List[tuple]]:
    """{kind: [(run dir, metrics, config)]} for every run under ``results``."""
    runs = {
        "quality": [],
        "training_path": [],
        "compare": [],
        "sensitivity": [],
        "linear_gd": [],
        "data_stats": [],
        "guidance": [],
    }
    if not os.path.isdir(results):
        raise FileNotFoundError(
            f"--results {results!r} is not a directory; run the experiments first (see the README)"
        )
    for name in sorted(os.listdir(results)):
        d = os.path.join(results, name)
        m = _load(os.path.join(d, "metrics.json"))
        if not isinstance(m, dict):
            continue
        cfg = _load(os.path.join(d, "config.json")) or {}
        if "real_vs_real_fd" in m:
            runs["quality"].append((d, m, cfg))
        elif "method_seconds" in m and "networks" in m:
            runs["training_path"].append((d, m, cfg))
        elif "methods" in m and "checkpoint" in m:
            runs["compare"].append((d, m, cfg))
        elif "radius" in m and "cosine" in m:
            runs["sensitivity"].append((d, m, cfg))
        elif "converged_all" in m:
            runs["linear_gd"].append((d, m, cfg))
        elif "parts" in m:
            runs["data_stats"].append((d, m, cfg))
        elif "settings" in m and "classifier" in m:
            runs["guidance"].append((d, m, cfg))
    return runs


def _cmd(exp: str, arg: str, d: str, extra: str = "") -> str:
    return f"python -m experiments.{exp} --config configs/{exp}.py:{arg} --workdir {d}{extra}"


def _overrides(exp: str, arg: str, cfg: dict) -> str:
    """`` --config.K=V`` for the top-level scalar fields of a run's config.json that differ from
    ``configs/<exp>.py:<arg>`` (so the printed command reproduces the run)."""
    import importlib

    try:
        default = importlib.import_module(f"configs.{exp}").get_config(arg).to_dict()
    except Exception:  # an unknown arg: print the plain command
        return ""
    return "".join(_diff_fields(cfg, default, "config"))


def _diff_fields(cfg: dict, default: dict, prefix: str) -> list:
    """`` --<prefix>.K=V`` for scalar and tuple fields of ``cfg`` that differ from ``default``,
    descending into nested dicts present in both (e.g. ``networks.unet``)."""
    out = []
    scalar = (int, float, str, bool)
    for k, v in sorted(cfg.items()):
        if isinstance(v, scalar) and k in default and default[k] != v:
            out.append(f" --{prefix}.{k}={v}")
        elif (
            isinstance(v, list)
            and all(isinstance(x, scalar) for x in v)
            and isinstance(default.get(k), (list, tuple))
            and list(default[k]) != v
        ):
            items = ", ".join(json.dumps(x) for x in v) + ("," if len(v) == 1 else "")
            out.append(f" --{prefix}.{k}='({items})'")
        elif isinstance(v, dict) and isinstance(default.get(k), dict):
            out += _diff_fields(v, default[k], f"{prefix}.{k}")
    return out


def _f(x, nd=3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _rel(path: str, out_dir: str) -> str:
    return os.path.relpath(path, out_dir)


def _figures(d: str, names, out_dir: str) -> List[str]:
    """Markdown image lines for the files of ``names`` that exist in run directory ``d``."""
    return [
        f"![{f}]({_rel(os.path.join(d, f), out_dir)})"
        for f in names
        if os.path.exists(os.path.join(d, f))
    ]


# ----------------------------------------------------------------------------- sections


def compare_section(d, m, out_dir):
    ds = m["dataset"]
    res = m["methods"]
    cmd = m.get("command") or _cmd("compare", ds, d)
    r2 = {k: v["final_trajectory_r2_mean"] for k, v in res.items()}
    lines = [
        f"### Score comparison on {ds}",
        "",
        f"Network `{m['checkpoint']}`, {m.get('num_samples', '?')} samples, 10-step DDIM from "
        f"shared noise. Reproduce: `{cmd}`",
        "",
    ]
    table = os.path.join(d, "table.md")
    if os.path.exists(table):
        body = open(table).read().split("\n\n", 1)[-1]
        lines += [body.strip(), ""]
    rows = []
    if OURS in res:
        ours = res[OURS]
        a = np.asarray(ours.get("final_trajectory_r2_per_sample", []), np.float64)
        verdicts = []
        for peer in PEERS:
            if peer not in res:
                continue
            b = np.asarray(res[peer].get("final_trajectory_r2_per_sample", []), np.float64)
            diff = r2[OURS] - r2[peer]
            se = (
                (np.std(a - b, ddof=1) / np.sqrt(len(a)))
                if len(a) > 1 and len(a) == len(b)
                else float("nan")
            )
            sig = (
                ""
                if not np.isfinite(se)
                else (
                    " (within 2 paired SE: a tie)"
                    if abs(diff) < 2 * se
                    else f" (paired SE {se:.3f})"
                )
            )
            word = "better" if diff > 0 else "worse"
            verdicts.append(
                f"- {OURS} vs {peer}: final r2 {r2[OURS]:.3f} vs {r2[peer]:.3f}, "
                f"{word} by {abs(diff):.3f}{sig}"
            )
            rows.append((peer, diff, se))
        best = max(r2, key=r2.get)
        lines += (
            [f"**Final step:** best method `{best}` (r2 {r2[best]:.3f}).", ""] + verdicts + [""]
        )
        # per noise level
        ts = ours["timesteps"]
        hdr = "| t | " + " | ".join(str(t) for t in ts) + " |"
        per = [
            "| best (trajectory r2) |",
            "| best (single-step r2) |",
            f"| {OURS} rank (single-step) |",
        ]
        for i in range(len(ts)):
            tr = {k: v["trajectory"]["r2"][i] for k, v in res.items()}
            ss = {k: v["single_step"]["r2"][i] for k, v in res.items()}
            order = sorted(ss, key=ss.get, reverse=True)
            per[0] += f" {max(tr, key=tr.get)} |"
            per[1] += f" {order[0]} |"
            per[2] += f" {order.index(OURS) + 1}/{len(order)} |"
        lines += (
            [
                (
                    "**Per noise level** (which method agrees best with the network "
                    "at each DDIM step):"
                ),
                "",
                hdr,
                "|---" * (len(ts) + 1) + "|",
            ]
            + per
            + [""]
        )
    lines += _figures(d, ("r2_vs_t.png", "grid.png"), out_dir)
    lines.append("")
    if not any(line.startswith("skipped ") for line in lines):  # tables before skip lines
        lines += [f"- skipped `{k}`: {why}" for k, why in (m.get("skipped") or {}).items()]
    readme = None
    if OURS in r2:
        beaten = [
            p for p, diff, se in rows if diff < 0 and not (np.isfinite(se) and abs(diff) < 2 * se)
        ]
        ties = [p for p, diff, se in rows if np.isfinite(se) and abs(diff) < 2 * se]
        verdict = (
            "matches the network better than every peer"
            if not beaten and not ties
            else (f"beaten by {', '.join(beaten)}" if beaten else "no peer is better")
            + (f"; tied with {', '.join(ties)}" if ties else "")
        )
        net = str(m.get("checkpoint", "")).rstrip("/")
        other = (
            f", network `{os.path.basename(net)}`"
            if net and net != f"checkpoints/{ds}_unet_cpu"
            else ""
        )
        readme = (
            f"pca_locality vs network, final r2 ({ds}{other})",
            f"{r2[OURS]:.3f} (Wiener {_f(r2.get('wiener'))}, optimal "
            f"{_f(r2.get('optimal'))}, LS {_f(r2.get('ls'))}, best `{max(r2, key=r2.get)}`)",
            verdict,
            cmd,
        )
    return lines, readme


def sensitivity_section(d, m, cfg, out_dir):
    ds = cfg.get("dataset", "?")
    ts = m["timesteps"]
    cmd = _cmd("sensitivity", ds, d, _overrides("sensitivity", ds, cfg))
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
        f"### Sensitivity fields on {ds}",
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
            + " ".join(_f(v, 2) for v in r)
            + " | "
            + " ".join(_f(v) for v in cos)
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
    lines += _figures(
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
        nets_cfg = cfg.get("networks") or {}
        other = [
            f"{k} `{os.path.basename(str(p).rstrip('/'))}`"
            for k, p in sorted(nets_cfg.items())
            if k in nets and str(p).rstrip("/") != f"checkpoints/{ds}_{k}_cpu"
        ]
        readme = (
            f"network fields vs Wiener ({ds}{', ' + ', '.join(other) if other else ''})",
            f"cosine {lo:.2f}-{hi:.2f} ({', '.join(nets)}) over t = {ts[0]}-{ts[-1]}",
            "agree and shrink with decreasing noise"
            if all(shrink.values()) and lo > 0.8
            else "partly: " + ", ".join(f"{k} shrinks: {v}" for k, v in shrink.items()),
            cmd,
        )
    return lines, readme


def linear_section(d, m, cfg, out_dir):
    ds = cfg.get("dataset", "?")
    ddim = tuple(m["timesteps"]) == (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)
    # the run's own workdir (where its weights live; results/ keeps a copy without the weights)
    run_dir = os.path.dirname(m.get("weights_file") or "") or d
    arg = f"{ds},ddim" if ddim else ds
    cmd = _cmd("linear_gd", arg, run_dir, _overrides("linear_gd", arg, cfg))
    lines = [
        f"### Gradient-descent linear denoisers on {ds}",
        "",
        f"Reproduce: `{cmd}`",
        "",
        "| t | rel. Frobenius error to W* | its statistical floor | field cosine | "
        "excess loss | converged |",
        "|---|---|---|---|---|---|",
    ]
    ts = m["timesteps"]
    at_floor = []
    for t in ts:
        lv = m["levels"][str(t)]
        f = lv["final"]
        floor = lv.get("predicted_rel_frob")
        # within 10 % of the error the sampling noise of a finite training run predicts
        near = floor is not None and f["rel_frob"] <= 1.1 * floor
        at_floor.append(bool(lv["converged"] or near))
        lines.append(
            f"| {t} | {f['rel_frob']:.4f} | {_f(floor, 4)} | {f['cosine']:.4f} | "
            f"{f['excess']:.2e} | {lv['converged']}"
            f"{' (at floor)' if near and not lv['converged'] else ''} |"
        )
    lines.append("")
    lines += _figures(d, ("rel_frob.png", "cosine.png"), out_dir)
    lines.append("")
    bad = [t for t, ok in zip(ts, at_floor) if not ok]
    misses = "; ".join(
        f"t = {t}: rel. error {m['levels'][str(t)]['final']['rel_frob']:.3f} vs "
        f"floor {_f(m['levels'][str(t)].get('predicted_rel_frob'))}"
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


def data_stats_section(d, m, cfg, out_dir):
    ds = m.get("dataset", cfg.get("dataset", "?"))
    cmd = _cmd("data_stats", ds, d, _overrides("data_stats", ds, cfg))
    ts = m["timesteps"]
    lines = [f"### Data-statistics experiments ({ds})", "", f"Reproduce: `{cmd}`", ""]
    readme = []
    if "link" in m:
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
                lines.append(f"| {k} | " + " ".join(_f(v) for v in lk["linked_mass"][k][p]) + " |")
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
        lines += _figures(d, (f"link_fields_r{p0[0]}_c{p0[1]}.png", "link_mass.png"), out_dir)
        lines.append("")
    if "permute" in m:
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
                + " ".join(_f(v, 2) for v in s["radius50_data_grid"])
                + " | "
                + " ".join(_f(v, 2) for v in s["radius50_permuted_grid"])
                + " | "
                + " ".join(_f(v) for v in s["cosine_to_wiener_original"])
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
                        f"{'DiT' if k.startswith('dit') else 'UNet'} trained on permuted "
                        f"pixels ({ds})",
                        f"r50 {rd:.1f} px on the data grid (Wiener {rw:.1f}), {rp:.1f} px on "
                        f"its own grid; cosine to Wiener {cos:.2f}; tighter on the data grid "
                        f"at {tighter}/{len(ts)} levels",
                        "its fields follow the data's correlations"
                        if follows
                        else "does not recover the data's locality at this training budget",
                        cmd,
                    )
                )
        lines += _figures(
            d,
            ("permute_fields_data_grid.png", "permute_radius.png", *pm.get("samples", {}).values()),
            out_dir,
        )
        lines.append("")
    if "pcs" in m:
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
                + " ".join(_f(x) for x in pc["energy_all_pixels"][k])
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
        lines += _figures(d, ("pcs_top.png", "pcs_fields.png", "pcs_energy.png"), out_dir)
        lines.append("")
    return lines, readme


def guidance_verdict(
    agreement: float, n: int, holdout_acc: float, holdout_n: int, num_classes: int
) -> str:
    """Where a label agreement ``agreement`` (``n`` samples) lies between chance and the
    classifier's held-out accuracy on real images (``holdout_n`` images), with two binomial
    standard errors of slack on each comparison."""
    se = lambda p, k: np.sqrt(max(p * (1 - p), 1e-12) / max(k, 1))
    chance = 1.0 / num_classes
    slack = 2 * np.hypot(se(agreement, n), se(holdout_acc, holdout_n))
    if agreement >= holdout_acc - slack:
        return "as recognisable to the classifier as real images"
    if agreement > chance + 2 * se(chance, n):
        return "above chance, below real images"
    return "not above chance"


def guidance_section(d, m, cfg, out_dir):
    ds = m.get("dataset", "?")
    cmd = _cmd("guidance", ds, d, _overrides("guidance", ds, cfg))
    clf = m["classifier"]
    k, n = m["num_classes"], m["num_samples"]
    lines = [
        f"### Class-conditional samples on {ds}",
        "",
        f"Reproduce: `{cmd}`",
        "",
        f"Network `{m['checkpoint']}`, {n} samples per setting from the same noise "
        f"({m['sampler']}, {m['num_steps']} steps). A small CNN trained on the data has "
        f"held-out accuracy {_f(clf['holdout_accuracy'])} on {clf['holdout_size']} real "
        f"images (chance {_f(1 / k)}).",
        "",
        "| setting | label agreement | per class | predicted fractions | median L2 to nearest "
        "training image |",
        "|---|---|---|---|---|",
    ]
    best = None
    for name, s in m["settings"].items():
        frac = ", ".join(f"{c}: {_f(v, 2)}" for c, v in s["predicted_fractions"].items())
        if "agreement" in s:
            per = ", ".join(f"{c}: {_f(v, 2)}" for c, v in s["per_class"].items())
            lines.append(
                f"| {name} | {_f(s['agreement'])} | {per} | {frac} | "
                f"{_f(s['nearest_train_l2_median'], 2)} |"
            )
            if best is None or s["agreement"] > best[1]["agreement"]:
                best = (name, s)
        else:
            lines.append(f"| {name} | - | - | {frac} | {_f(s['nearest_train_l2_median'], 2)} |")
    lines += [""] + _figures(d, ["guidance.png"], out_dir) + [""]
    readme = None
    if best is not None:
        name, s = best
        verdict = guidance_verdict(
            s["agreement"], n, clf["holdout_accuracy"], clf["holdout_size"], k
        )
        others = ", ".join(
            f"{k_}: {_f(v['agreement'])}"
            for k_, v in m["settings"].items()
            if "agreement" in v and k_ != name
        )
        readme = (
            f"guided samples show the requested class ({ds}, `{m['checkpoint']}`)",
            f"label agreement {_f(s['agreement'])} at {name} ({others}; real held-out "
            f"{_f(clf['holdout_accuracy'])}, chance {_f(1 / k)})",
            verdict,
            cmd,
        )
    return lines, readme


def quality_section(d, m, cfg, out_dir):
    """Measured sample quality per network (experiments/quality.py), and a README row comparing
    the best-trained network with the committed CPU one."""
    ds = m["dataset"]
    cmd = _cmd("quality", ds, d) + _overrides("quality", ds, cfg)
    nets = m["networks"]
    ts = m["timesteps"]
    lines = [
        f"### Sample quality of the {ds} networks",
        "",
        f"{m['num_samples']} samples per network ({m['sampler']}, {m['num_steps']} steps, "
        f"shared noise) against {m['num_real']} real held-out images ({m['heldout']}), in "
        f"the features of a classifier trained on the training split (accuracy "
        f"{m['classifier']['heldout_accuracy']:.4f} on {m['classifier']['heldout_size']} "
        f"held-out images). Real training vs real held-out images of the same sizes: FD "
        f"{m['real_vs_real_fd']:.3f} (the floor). Reproduce: `{cmd}`",
        "",
        "| network | epochs | FD | confident > 0.9 | held-out eps-MSE | "
        + " | ".join(f"t={t}" for t in ts)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(ts),
    ]
    for label, r in nets.items():
        seen = " (trained on the held-out images)" if r.get("trained_on_heldout") else ""
        lines.append(
            f"| {label}{seen} | {r['epochs']:.1f} | {r['fd']:.3f} | "
            f"{r['confident_fraction']:.3f} | {r['eps_mse_mean']:.5f} | "
            + " | ".join(
                f"{r['eps_mse'][str(t)]['mean']:.5f} ± {r['eps_mse'][str(t)]['se']:.5f}" for t in ts
            )
            + " |"
        )
    lines += [""] + _figures(d, ["quality.png"], out_dir)
    grids = sorted(f for f in os.listdir(d) if f.startswith("samples_"))
    lines += [f"![{g}]({_rel(os.path.join(d, g), out_dir)})" for g in grids] + [""]
    committed = [l for l in nets if "committed" in l]
    trained = [l for l in nets if l not in committed]
    row = None
    if committed and trained:
        c, best = nets[committed[0]], max(trained, key=lambda l: nets[l]["epochs"])
        b = nets[best]
        ratio = c["fd"] / b["fd"] if b["fd"] > 0 else float("inf")
        verdict = (
            f"better samples: FD {ratio:.1f}x lower"
            if ratio > 1.5
            else "no clear improvement in FD"
        )
        row = (
            f"sample quality of the reference net ({ds})",
            f"FD {b['fd']:.2f} for `{b['checkpoint']}` ({b['epochs']:.0f} epochs) vs "
            f"{c['fd']:.2f} for `{c['checkpoint']}`; "
            f"confident labels {b['confident_fraction']:.2f} "
            f"vs {c['confident_fraction']:.2f}; real-vs-real floor {m['real_vs_real_fd']:.2f}",
            verdict,
            cmd,
        )
    return lines, row


def training_path_section(d, m, cfg, out_dir):
    """r2 of every method against the network as it trains (experiments/training_path.py)."""
    ds = m["dataset"]
    arg = ds + (",quick" if m["num_samples"] <= 8 else "")
    cmd = _cmd("training_path", arg, d) + _overrides("training_path", arg, cfg)
    table = open(os.path.join(d, "table.md")).read().strip().splitlines()
    nets = m["networks"]
    order = list(nets)
    first, last = nets[order[0]], nets[order[-1]]
    lines = (
        [
            f"### Which denoiser does the {ds} network approach as it trains?",
            "",
            f"Every method samples once from the shared noise; every export of the network "
            f"samples its own trajectories from the same noise ({m['num_samples']} samples, all "
            f"methods on the same {m['train_size']} training images). Reproduce: `{cmd}`",
            "",
            *table,
            "",
        ]
        + _figures(d, ["r2_vs_epochs.png"], out_dir)
        + [""]
    )
    moves = []
    for meth in m["methods"]:
        a = first["final_trajectory_r2"][meth]["mean"]
        b = last["final_trajectory_r2"][meth]["mean"]
        moves.append(f"{meth} {a:.2f} -> {b:.2f}")
    best = last["best"]
    sep = [k for k, p in last["paired_vs_best"].items() if p["verdict"] == "A"]
    tied = [k for k, p in last["paired_vs_best"].items() if p["verdict"] != "A"]
    verdict = (
        f"after {last['epochs']:.0f} epochs the network is closest to {best}"
        + (f", separated from {', '.join(sep)}" if sep else "")
        + (f"; not separated from {', '.join(tied)}" if tied else "")
    )
    lines += [
        f"**Verdict:** {verdict}. Final r2 from the first to the last export: "
        + "; ".join(moves)
        + ".",
        "",
    ]
    row = (
        f"network vs methods as it trains ({ds}, {first['epochs']:.0f} -> "
        f"{last['epochs']:.0f} epochs)",
        "final r2 " + "; ".join(moves),
        verdict,
        cmd,
    )
    return lines, row


def training_section(checkpoints: str, out_dir: str):
    lines = [
        "### Trained networks",
        "",
        "| checkpoint | params | steps | final loss | samples |",
        "|---|---|---|---|---|",
    ]
    if not os.path.isdir(checkpoints):
        return []
    for name in sorted(os.listdir(checkpoints)):
        d = os.path.join(checkpoints, name)
        m = _load(os.path.join(d, "metrics.json"))
        if not m:
            continue
        grid = [f for f in sorted(os.listdir(d)) if f.startswith("samples_")]
        link = f"![]({_rel(os.path.join(d, grid[-1]), out_dir)})" if grid else ""
        lines.append(
            f"| `{d}` | {m['num_params']:,} | {m['steps']} | {m['final_loss']:.4f} | {link} |"
        )
    return lines + [""]


# ----------------------------------------------------------------------------- driver


def build_report(results: str, out: str, checkpoints: str = "checkpoints"):
    """Returns (markdown text, README rows)."""
    out_dir = os.path.dirname(os.path.abspath(out))
    runs = discover(results)
    md = [
        "# Results",
        "",
        "Generated by `python -m experiments.report` from the `metrics.json` of every run under "
        f"`{results}`; each section names the command that regenerates it. Measured on a 2-core "
        "CPU unless a section says otherwise.",
        "",
    ]
    rows = []
    for kind, section in (("quality", quality_section), ("training_path", training_path_section)):
        for d, m, cfg in runs[kind]:
            lines, row = section(d, m, cfg, out_dir)
            md += lines
            rows += [row] if row else []
    for d, m, _ in runs["compare"]:
        lines, row = compare_section(d, m, out_dir)
        md += lines
        rows += [row] if row else []
    for d, m, cfg in runs["sensitivity"]:
        lines, row = sensitivity_section(d, m, cfg, out_dir)
        md += lines
        rows += [row] if row else []
    for d, m, cfg in runs["linear_gd"]:
        lines, row = linear_section(d, m, cfg, out_dir)
        md += lines
        rows += [row] if row else []
    for d, m, cfg in runs["data_stats"]:
        lines, rs = data_stats_section(d, m, cfg, out_dir)
        md += lines
        rows += rs
    for d, m, cfg in runs["guidance"]:
        lines, row = guidance_section(d, m, cfg, out_dir)
        md += lines
        rows += [row] if row else []
    md += training_section(checkpoints, out_dir)
    if not any(runs.values()):
        md.append(f"No runs found under `{results}`.")
    return "\n".join(md) + "\n", rows


def readme_table(rows) -> str:
    out = [BEGIN, "| claim | measured | verdict | command |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | `{d}` |" for a, b, c, d in rows]
    return "\n".join(out + [END])


def update_readme(path: str, rows) -> bool:
    text = open(path).read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block; add one where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(path, head + readme_table(rows) + tail)
    return True


def main(argv):
    del argv
    text, rows = build_report(FLAGS.results, FLAGS.out, FLAGS.checkpoints)
    atomic_write_text(FLAGS.out, text)
    print(f"wrote {FLAGS.out} ({len(rows)} headline rows)")
    if FLAGS.readme:
        update_readme(FLAGS.readme, rows)
        print(f"updated the results table in {FLAGS.readme}")


if __name__ == "__main__":
    flags.DEFINE_string("results", "results", "directory whose sub-directories are runs")
    flags.DEFINE_string("out", "results/REPORT.md", "report path")
    flags.DEFINE_string("readme", "README.md", "README whose results block to update ('' = none)")
    flags.DEFINE_string("checkpoints", "checkpoints", "directory of trained networks")
    FLAGS = flags.FLAGS
    app.run(main)
