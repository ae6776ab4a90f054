"""Gradient-descent-trained linear denoisers against the Wiener filter, level by level.

The verdict, figures and summary of ``experiments/linear_gd.py`` (docs/algorithms.md §4,
"Gradient-descent linear denoisers"): one claim of Lukoianov et al. (NeurIPS 2025) is that a
linear denoiser trained by gradient descent converges to the Wiener filter. A level's record
holds the final diagnostics of :func:`locality.denoisers.linear_fit.train_linear` (relative
Frobenius error ``||W - W*||_F / ||W*||_F``, bias error, relative excess loss, field cosine at
one pixel), the predicted statistical error of
:func:`locality.denoisers.linear_fit.asymptotic_error` and whether the level meets the criteria.
"""

from __future__ import annotations

import os

from locality import plotting


def tail_start(steps: int, tail: float) -> int:
    """The step after which iterates are averaged (``steps`` when ``tail`` is 0)."""
    return int(round(steps * (1 - tail))) if tail > 0 else int(steps)


def averaged_samples(steps: int, batch_size: int, tail: float) -> int:
    """Training samples the tail average runs over (``M`` of ``asymptotic_error``)."""
    return batch_size * (steps - int(round(steps * (1 - tail))))


def level_result(fit, ab: float, predicted, criteria: dict) -> dict:
    """The record of one level: ``ab``, ``final`` diagnostics, ``predicted_rel_frob``,
    ``loss_opt``, ``seconds``, ``converged`` (``rel_frob <= max_rel_frob``, ``cosine >=
    min_cosine`` and ``excess <= max_excess`` of ``criteria``) and the ``history``."""
    hist = fit.history
    final = {k: float(v[-1]) for k, v in hist.items() if k != "step"}
    ok = (
        final["rel_frob"] <= criteria["max_rel_frob"]
        and final["cosine"] >= criteria["min_cosine"]
        and final["excess"] <= criteria["max_excess"]
    )
    return {
        "ab": ab,
        "final": final,
        "predicted_rel_frob": predicted,
        "loss_opt": fit.loss_opt,
        "seconds": fit.seconds,
        "converged": bool(ok),
        "history": {k: v.tolist() for k, v in hist.items()},
    }


def save_figures(workdir, results, ts, steps, tail, pixel, gd_fields, wiener_fields) -> None:
    """``rel_frob.png`` (stars: the predicted statistical error), ``cosine.png``, ``excess.png``
    (against steps, one curve per level; the start of the tail average dotted) and
    ``fields.png`` (the fields at ``pixel``, GD against Wiener)."""
    start = tail_start(steps, tail)
    for name, ylabel, logy in (
        ("rel_frob", "||W - W*||_F / ||W*||_F", True),
        ("cosine", f"field cosine vs Wiener at {pixel}", False),
        ("excess", "(L(W,b) - L*) / L*", True),
    ):
        series = []
        for ci, t in enumerate(ts):
            hst = results[str(t)]["history"]
            series.append({"x": hst["step"], "y": hst[name], "label": f"t={t}", "color": f"C{ci}"})
            pred = results[str(t)]["predicted_rel_frob"]
            if name == "rel_frob" and pred is not None:
                series.append(
                    {"x": [steps], "y": [pred], "style": "none", "marker": "*", "color": f"C{ci}"}
                )
        title = {
            "rel_frob": "GD linear denoiser vs Wiener (stars: statistical rate)",
            "cosine": "field cosine, GD vs Wiener",
            "excess": "relative excess loss over the optimal linear denoiser",
        }[name]
        if start < steps:
            title += f"\niterates averaged from step {start} (dotted line)"
        plotting.save_series(
            series,
            os.path.join(workdir, f"{name}.png"),
            xlabel="step",
            ylabel=ylabel,
            title=title,
            logx=True,
            logy=logy,
            vlines=[start] if start < steps else [],
        )
    plotting.save_heatmap_table(
        [gd_fields, wiener_fields],
        os.path.join(workdir, "fields.png"),
        row_labels=["GD linear", "Wiener"],
        col_labels=[f"t={t}" for t in ts],
        marks=[[pixel] * len(ts)] * 2,
        title=f"|row of W| at pixel {pixel}: GD-trained vs Wiener",
    )


def level_line(t: int, r: dict) -> str:
    """One line of the summary for the record ``r`` of level ``t``."""
    f, pred = r["final"], r["predicted_rel_frob"]
    return (
        f"t={t:4d} ab={r['ab']:.4f}: rel_frob {f['rel_frob']:.4f} "
        f"(statistical rate {'n/a' if pred is None else f'{pred:.4f}'}), "
        f"bias_rel {f['bias_rel']:.4f}, excess {f['excess']:.2e}, "
        f"field cosine {f['cosine']:.4f}, {r['seconds']:.0f}s -> "
        f"{'converged' if r['converged'] else 'NOT converged'}"
    )


def verdict_line(converged: bool, criteria: dict) -> str:
    """The last line of the summary: does GD reach the Wiener filter at every level?"""
    return (
        "verdict: GD "
        + ("converges" if converged else "does not (yet) converge")
        + f" to the Wiener filter at every level (criteria rel_frob <= "
        f"{criteria['max_rel_frob']}, field cosine >= {criteria['min_cosine']}, excess <= "
        f"{criteria['max_excess']})"
    )
