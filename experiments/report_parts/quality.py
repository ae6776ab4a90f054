"""Report section for sample-quality runs (experiments/quality.py)."""

from __future__ import annotations

import os

from experiments.report_parts.common import command, figures, overrides, rel


def quality_section(d, m, cfg, out_dir):
    """Measured sample quality per network (experiments/quality.py), and a README row comparing
    the best-trained network with the committed CPU one."""
    ds = m["dataset"]
    cmd = command("quality", ds, d) + overrides("quality", ds, cfg)
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
    lines += [""] + figures(d, ["quality.png"], out_dir)
    grids = sorted(f for f in os.listdir(d) if f.startswith("samples_"))
    lines += [f"![{g}]({rel(os.path.join(d, g), out_dir)})" for g in grids] + [""]
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
