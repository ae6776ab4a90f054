"""Paired verdicts for two methods scored on the same samples (docs/algorithms.md §13).

The statistics are :func:`locality.metrics.paired_comparison` (mean difference with its paired
standard error, median difference, wins, the exact two-sided sign test of Dixon & Mood 1946).
The report's rule reads each test on its own:

| paired mean test | sign test | verdict for A |
|---|---|---|
| mean_diff > 2 SE | p < 0.05, wins > losses | ``better`` |
| mean_diff < -2 SE | p < 0.05, losses > wins | ``worse`` |
| \\|mean_diff\\| <= 2 SE | p >= 0.05 | ``tie`` |
| anything else | | ``mixed (mean: ..., sign test: ...)`` |

so a mean inside two standard errors that hides a consistent per-sample win or loss is not a
tie, and a mean carried by a few large differences is not a win.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

NO_DATA = "no per-sample data"
ALPHA = 0.05


def paired_stats(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> Optional[dict]:
    """``locality.metrics.paired_comparison(a, b)``, or None when a per-sample list is missing,
    has fewer than two entries, or the two lists differ in length (not the same samples)."""
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    from locality import metrics  # imported here: the report reads JSON, it needs no JAX to start

    return metrics.paired_comparison(np.asarray(a, np.float64), np.asarray(b, np.float64))


def verdict(stats: Optional[dict]) -> str:
    """The verdict for A against B (:func:`locality.metrics.paired_verdict`, the module
    docstring's table); ``no per-sample data`` for None."""
    if stats is None:
        return NO_DATA
    from locality import metrics  # imported here: the report reads JSON, it needs no JAX to start

    return metrics.paired_verdict(stats, ALPHA)


def cells(stats: Optional[dict]) -> list:
    """Table cells: paired mean diff ± SE, median diff, wins/N, sign-test p, verdict."""
    if stats is None:
        return ["-", "-", "-", "-", NO_DATA]
    return [
        f"{stats['mean_diff']:+.3f} ± {stats['se']:.3f}",
        f"{stats['median_diff']:+.3f}",
        f"{stats['wins']}/{stats['n']}",
        f"{stats['sign_p']:.2g}",
        verdict(stats),
    ]


def summary(stats: Optional[dict]) -> str:
    """One phrase: ``paired +0.041 ± 0.017, median +0.050, 43/64 wins, sign p = 0.0081``."""
    if stats is None:
        return NO_DATA
    return (
        f"paired {stats['mean_diff']:+.3f} ± {stats['se']:.3f}, median "
        f"{stats['median_diff']:+.3f}, {stats['wins']}/{stats['n']} wins, sign p = "
        f"{stats['sign_p']:.2g}"
    )
