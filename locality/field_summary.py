"""Summaries of sensitivity fields: similarity, support, radius, their spread over probe
pixels and the agree / shrink verdicts (docs/algorithms.md §9).

The fields themselves (Jacobian rows of a denoiser, the rows of an affine map) are
:mod:`locality.sensitivity`; everything here takes them as arrays.

Summaries (numpy, float64, on [H, W] fields that are >= 0):

- :func:`cosine`: ``<f, g> / (||f|| ||g||)`` over all pixels.
- :func:`support` / :func:`iou`: the binarised support of a field is the smallest set of pixels,
  taken in decreasing order of value, whose values sum to at least ``mass`` of the field's total
  (default 90 %); ``iou = |A & B| / |A | B|``. With ``threshold=tau`` instead, the support is
  ``{q : f(q) >= tau * max f}``.
- :func:`radius`: the smallest Euclidean radius ``r`` (pixel units, centre-to-centre) such that
  the pixels within distance ``r`` of ``p`` hold at least ``mass`` of the field's total.

Over many pixels and models (docs/algorithms.md §9), given fields at the probe pixels of
:func:`locality.sensitivity.spread_pixels` (e.g. from
:func:`locality.sensitivity.fields_at_levels`): :func:`field_statistics` (radii, cosines and IoUs
per pixel), :func:`summarize_statistics` (their mean and standard error over pixels, the
``summary`` block of ``experiments/sensitivity.py``) and :func:`field_verdict` (agree / shrink,
decided on those statistics and stated in words). The tables, text and figures a sensitivity run
writes from them are :mod:`locality.field_report`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from locality.sensitivity import Pixel, centre_pixel, check_pixels

# ----------------------------------------------------------------------------- summaries


def _as_field(f, what: str) -> np.ndarray:
    a = np.asarray(f, np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be an [H, W] field; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or inf")
    if np.any(a < 0):
        raise ValueError(
            f"{what} has negative values (min {a.min():.3g}); sensitivity fields are "
            "absolute values, pass |J| summed over channels"
        )
    return a


def _check_mass(mass: float):
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"mass must be in (0, 1]; got {mass}")


def cosine(f, g) -> float:
    """Cosine similarity ``<f, g> / (||f|| ||g||)`` of two [H, W] fields (docs/algorithms.md §9)."""
    a, b = _as_field(f, "f"), _as_field(g, "g")
    if a.shape != b.shape:
        raise ValueError(f"fields have different shapes {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise ValueError("cosine of an all-zero field is undefined")
    return float(np.sum(a * b) / (na * nb))


def support(f, mass: float = 0.9, threshold: Optional[float] = None) -> np.ndarray:
    """Binarised support [H, W] bool of a field.

    By default the smallest set of pixels, taken in decreasing order of value (ties in row-major
    order), whose values sum to at least ``mass`` of the total. With ``threshold=tau`` it is
    ``{q : f(q) >= tau * max f}`` and ``mass`` is ignored.
    """
    a = _as_field(f, "f")
    total = a.sum()
    if total == 0:
        raise ValueError("the support of an all-zero field is undefined")
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
        return a >= float(threshold) * a.max()
    _check_mass(mass)
    flat = a.ravel()
    order = np.argsort(-flat, kind="stable")
    csum = np.cumsum(flat[order])
    k = int(np.searchsorted(csum, mass * total * (1.0 - 1e-12), side="left")) + 1
    out = np.zeros(flat.shape, bool)
    out[order[: min(k, flat.size)]] = True
    return out.reshape(a.shape)


def iou(f, g, mass: float = 0.9, threshold: Optional[float] = None) -> float:
    """Intersection over union of the :func:`support` of two fields (docs/algorithms.md §9)."""
    a = support(f, mass, threshold)
    b = support(g, mass, threshold)
    if a.shape != b.shape:
        raise ValueError(f"fields have different shapes {a.shape} and {b.shape}")
    return float(np.sum(a & b) / np.sum(a | b))


def radius(f, pixel: Optional[Pixel] = None, mass: float = 0.5) -> float:
    """Smallest Euclidean radius around ``pixel`` holding ``mass`` of the field
    (docs/algorithms.md §9).

    ``r = min { r : sum_{|q - p| <= r} f(q) >= mass * sum_q f(q) }`` with distances between
    pixel centres; ``r = 0`` when ``p`` alone holds that fraction. ``pixel`` defaults to the
    centre. Radii take the discrete values ``sqrt(di^2 + dj^2)``.
    """
    a = _as_field(f, "f")
    _check_mass(mass)
    h, w = a.shape
    if pixel is None:
        pixel = centre_pixel(h, w)
    ((i, j),) = check_pixels([pixel], h, w)
    total = a.sum()
    if total == 0:
        raise ValueError("the radius of an all-zero field is undefined")
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    dist = np.sqrt((ii - i) ** 2 + (jj - j) ** 2).ravel()
    order = np.argsort(dist, kind="stable")
    csum = np.cumsum(a.ravel()[order])
    k = int(np.searchsorted(csum, mass * total * (1.0 - 1e-12), side="left"))
    return float(dist[order[min(k, dist.size - 1)]])


# ----------------------------------------------------------------------------- pixel statistics

# The decision rules of field_verdict (docs/algorithms.md §9).
AGREE_MIN_IOU50 = 0.5  # agree: mean IoU of the 50 % supports at least this, and
AGREE_RATIO = (1.0 / 1.5, 1.5)  # the ratio of the mean 50 % radii inside this range, at every t
SHRINK_SE = 2.0  # shrink: radius50 falls from the highest t to the lowest by more than 2 SE


def mass_key(mass: float) -> str:
    """Key of a mass fraction in the statistics: ``0.5 -> "50"``, ``0.125 -> "12.5"``."""
    return f"{100.0 * float(mass):g}"


def pair_key(a: str, b: str) -> str:
    """Key ``"a|b"`` of the pair of models ``a``, ``b`` (``a`` first in the models order)."""
    return f"{a}|{b}"


# A field counts as zero when its mass is at most this fraction of the largest field mass of the
# same model and level (float64 round-off of an exactly-zero row is ~1e-13 of it).
ZERO_FIELD_RTOL = 1e-8


def _zero_fields(f: np.ndarray) -> np.ndarray:
    """[P] bool: which of the [P, H, W] fields of one model and level are zero
    (mass <= ZERO_FIELD_RTOL x the largest mass among them)."""
    mass = np.abs(f).reshape(len(f), -1).sum(axis=1)
    return mass <= ZERO_FIELD_RTOL * mass.max()


def field_statistics(
    fields_by_model, pixels: Sequence[Pixel], masses: Sequence[float] = (0.5, 0.9)
) -> dict:
    """Per-pixel locality statistics of sensitivity fields (docs/algorithms.md §9).

    Args:
      fields_by_model: ``{model: [T levels] of [P, H, W] fields, or None}`` (None where the
        model was not evaluated at a level). Field ``k`` of a level is that of ``pixels[k]``,
        as returned by :func:`locality.sensitivity.fields` (already the mean over the noisy inputs).
      pixels: the P probed pixels ``(row, col)``.
      masses: the mass fractions of the radii and of the supports (50 % and 90 %).

    Returns:
      ``{"models": [...], "pixels": [...], "masses": [...], "radius": {model: {"50": [T, P],
      ...}}, "pairs": {"a|b": {"cosine": [T, P], "iou50": [T, P], ...}}}`` float64 arrays, NaN
      where a model has no field or its field of that pixel is zero (mass at most
      ``ZERO_FIELD_RTOL`` of the model's largest at that level: the output does not depend on
      the input there), so :func:`mean_se` leaves those pixels out.
      ``radius[m]["50"][t, k]`` is :func:`radius` of ``m``'s field
      of pixel ``k`` around that pixel; ``cosine`` and ``iou<pct>`` (:func:`cosine`,
      :func:`iou`) compare two models' fields of the same pixel and level. ``pairs`` holds every
      unordered pair, ``a`` before ``b`` in the order of ``fields_by_model``.
    """
    models = list(fields_by_model)
    if not models:
        raise ValueError("fields_by_model is empty; pass {model: [fields per level]}")
    counts = {m: len(fields_by_model[m]) for m in models}
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"models have fields at different numbers of levels {counts}; pass None for a "
            "level a model was not evaluated at"
        )
    num_t = counts[models[0]]
    for a in masses:
        _check_mass(a)
    stacks = {
        m: [None if f is None else np.asarray(f, np.float64) for f in fields_by_model[m]]
        for m in models
    }
    present = [f for m in models for f in stacks[m] if f is not None]
    if not present:
        raise ValueError("no model has a field at any level (every entry is None)")
    shape = present[0].shape
    if len(shape) != 3:
        raise ValueError(f"fields must be [P, H, W] per level; got shape {shape}")
    pix = check_pixels(pixels, shape[1], shape[2])
    for m in models:
        for k, f in enumerate(stacks[m]):
            if f is not None and f.shape != (len(pix),) + shape[1:]:
                raise ValueError(
                    f"fields of {m!r} at level {k} have shape {f.shape}; expected "
                    f"{(len(pix),) + shape[1:]} (one [H, W] field per probed pixel, one image "
                    "size for every model and level)"
                )

    # A zero field (an output that depends on no input, e.g. a pixel constant over the training
    # set under the Wiener filter, whose computed row is round-off) has no radius, cosine or
    # support: its statistics are NaN and left out of the means over pixels.
    dead = {m: [None if f is None else _zero_fields(f) for f in stacks[m]] for m in models}

    def per_pixel(fn, *ms):
        out = np.full((num_t, len(pix)), np.nan)
        for k in range(num_t):
            fs = [stacks[m][k] for m in ms]
            if all(f is not None for f in fs):
                out[k] = [
                    np.nan if any(dead[m][k][i] for m in ms) else fn(p, *(f[i] for f in fs))
                    for i, p in enumerate(pix)
                ]
        return out

    radii = {
        m: {mass_key(a): per_pixel(lambda p, f, a=a: radius(f, p, a), m) for a in masses}
        for m in models
    }
    pairs = {}
    for x, a in enumerate(models):
        for b in models[x + 1 :]:
            entry = {"cosine": per_pixel(lambda p, f, g: cosine(f, g), a, b)}
            for s in masses:
                entry[f"iou{mass_key(s)}"] = per_pixel(lambda p, f, g, s=s: iou(f, g, mass=s), a, b)
            pairs[pair_key(a, b)] = entry
    return {
        "models": models,
        "pixels": [list(p) for p in pix],
        "masses": [float(a) for a in masses],
        "radius": radii,
        "pairs": pairs,
    }


def mean_se(values) -> Tuple[list, list]:
    """Mean and standard error of each row of a [T, P] array, ignoring NaN.

    ``se = std(ddof=1) / sqrt(n)`` over the ``n`` finite values of a row. ``None`` for the mean
    of a row without finite values and for the SE of a row with fewer than two.
    """
    means, ses = [], []
    for row in np.atleast_2d(np.asarray(values, np.float64)):
        ok = row[np.isfinite(row)]
        means.append(float(np.mean(ok)) if ok.size else None)
        ses.append(float(np.std(ok, ddof=1) / np.sqrt(ok.size)) if ok.size >= 2 else None)
    return means, ses


def summarize_statistics(
    statistics: dict, timesteps: Sequence[int], *, num_inputs: int, reference: str = "wiener"
) -> dict:
    """The ``summary`` block of a sensitivity run from :func:`field_statistics`
    (docs/algorithms.md §9).

    Every statistic is summarised at each level by its mean and standard error over the P
    probed pixels: one value per pixel, the statistic of that pixel's field, which is itself the
    mean over the ``num_inputs`` noisy inputs. The SE therefore measures how much the statistic
    varies across image positions (not across noise draws). ``None`` where a model has no field
    at a level (and for an SE over fewer than two pixels). ``verdicts`` holds
    :func:`field_verdict` of every model other than ``reference``.

    Returns ``{"pixels", "num_inputs", "timesteps", "models", "reference", "per_model": {model:
    {"radius50": {"mean": [T], "se": [T]}, "radius90": ...}}, "pairs": {"a|b": {"cosine":
    {"mean", "se"}, "iou50": ..., "iou90": ...}}, "verdicts": {model: {"agree", "shrink",
    "reference_shrinks", "text"}}}``.
    """
    ts = [int(t) for t in timesteps]
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly ascending; got {ts} (sort them)")
    models = list(statistics["models"])
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among the models {models}")
    num_t = {v.shape[0] for r in statistics["radius"].values() for v in r.values()}
    if num_t != {len(ts)}:
        raise ValueError(f"the statistics have {num_t} levels; timesteps has {len(ts)}: {ts}")

    def block(v):
        mean, se = mean_se(v)
        return {"mean": mean, "se": se}

    summary = {
        "pixels": [list(p) for p in statistics["pixels"]],
        "num_inputs": int(num_inputs),
        "timesteps": ts,
        "models": models,
        "reference": reference,
        "per_model": {
            m: {f"radius{k}": block(v) for k, v in statistics["radius"][m].items()} for m in models
        },
        "pairs": {
            key: {name: block(v) for name, v in entry.items()}
            for key, entry in statistics["pairs"].items()
        },
    }
    summary["verdicts"] = {
        m: field_verdict(summary, m, reference) for m in models if m != reference
    }
    return summary


def summarize_fields(
    fields_by_model,
    pixels: Sequence[Pixel],
    timesteps: Sequence[int],
    *,
    num_inputs: int,
    reference: str = "wiener",
    masses: Sequence[float] = (0.5, 0.9),
) -> dict:
    """:func:`summarize_statistics` of :func:`field_statistics` (docs/algorithms.md §9)."""
    stats = field_statistics(fields_by_model, pixels, masses)
    return summarize_statistics(stats, timesteps, num_inputs=num_inputs, reference=reference)


# ----------------------------------------------------------------------------- verdicts


def _pm(mean, se, digits: int = 2, unit: str = "") -> str:
    se_text = "n/a" if se is None else f"{se:.{digits}f}"
    return f"{mean:.{digits}f} +- {se_text}{unit}"


def _ts(ts, ks) -> str:
    return ", ".join(str(ts[k]) for k in ks)


def _shrinks(block, ts) -> Tuple[bool, str]:
    """The shrink rule of :func:`field_verdict` on one model's ``radius50`` block, and why."""
    mean, se = block["mean"], block["se"]
    ks = [k for k, v in enumerate(mean) if v is not None]
    if len(ks) < 2:
        return False, f"it has fields at {len(ks)} level(s) only, so a trend cannot be judged"
    lo, hi = ks[0], ks[-1]
    span = (
        f"radius50 {_pm(mean[hi], se[hi], unit=' px')} at t={ts[hi]} and "
        f"{_pm(mean[lo], se[lo], unit=' px')} at t={ts[lo]}"
    )
    if se[lo] is None or se[hi] is None:
        return False, f"{span}, with no standard error (fewer than two pixels)"
    drop = mean[hi] - mean[lo]
    tol = SHRINK_SE * math.hypot(se[lo], se[hi])
    if drop > tol:
        return True, (
            f"radius50 falls from {_pm(mean[hi], se[hi], unit=' px')} at t={ts[hi]} to "
            f"{_pm(mean[lo], se[lo], unit=' px')} at t={ts[lo]} (by {drop:.2f} px, more than "
            f"{SHRINK_SE:g} SE = {tol:.2f} px)"
        )
    return (
        False,
        f"{span}: a change of {-drop:+.2f} px, not a fall of more than {SHRINK_SE:g} SE = "
        f"{tol:.2f} px",
    )


def field_verdict(summary: dict, network: str, reference: Optional[str] = None) -> dict:
    """Whether ``network``'s fields agree with ``reference``'s, and whether each shrinks as the
    noise decreases, decided on the statistics of a ``summary`` (docs/algorithms.md §9).

    Rules (means and SEs over the probed pixels, from :func:`summarize_statistics`):

    - **agree** at a level when the mean IoU of the 50 % supports is at least 0.5
      (``AGREE_MIN_IOU50``) and the ratio of the mean 50 % radii, network / reference, lies in
      ``[1/1.5, 1.5]`` = [0.67, 1.5] (``AGREE_RATIO``; two zero radii count as ratio 1, a zero
      reference radius with a non-zero network radius as infinite). ``agree`` is True when
      they agree at every level where both models have fields (and there is at least one).
    - **shrink**: the mean 50 % radius at the lowest noise level (smallest t with a field) is
      smaller than at the highest (largest t) by more than 2 standard errors of that
      difference, ``mean(t_max) - mean(t_min) > 2 sqrt(se(t_max)^2 + se(t_min)^2)``
      (``SHRINK_SE``; the SEs combined as if independent, which is conservative when the same
      pixels are used at both levels). False with fewer than two levels or without SEs.
      ``reference_shrinks`` is the same rule applied to the reference.

    Returns ``{"agree": bool, "shrink": bool, "reference_shrinks": bool, "text": str}``, the
    text stating the decisive numbers in plain words.
    """
    models = summary["models"]
    ref = summary["reference"] if reference is None else reference
    for m in (network, ref):
        if m not in models:
            raise ValueError(f"model {m!r} is not in the summary; it has {models}")
    if network == ref:
        raise ValueError(f"network and reference are both {ref!r}; compare two different models")
    ts = summary["timesteps"]
    rn = summary["per_model"][network]["radius50"]
    rr = summary["per_model"][ref]["radius50"]
    first, second = sorted((network, ref), key=models.index)
    io = summary["pairs"][pair_key(first, second)]["iou50"]
    levels = [
        k for k in range(len(ts)) if None not in (rn["mean"][k], rr["mean"][k], io["mean"][k])
    ]
    good, bad, ratios = [], [], {}
    for k in levels:
        a, b = rn["mean"][k], rr["mean"][k]
        ratios[k] = (1.0 if a == 0 else math.inf) if b == 0 else a / b
        ok = io["mean"][k] >= AGREE_MIN_IOU50 and AGREE_RATIO[0] <= ratios[k] <= AGREE_RATIO[1]
        (good if ok else bad).append(k)
    agree = bool(levels) and not bad
    lo_r, hi_r = AGREE_RATIO
    if not levels:
        agree_text = f"The {network} and {ref} fields cannot be compared: no level has both."
    elif agree:
        ious = [io["mean"][k] for k in levels]
        rs = [ratios[k] for k in levels]
        agree_text = (
            f"The {network} and {ref} fields agree at every level (t = {_ts(ts, levels)}): "
            f"IoU50 {min(ious):.2f} to {max(ious):.2f} (each >= {AGREE_MIN_IOU50:g}) and "
            f"radius50 ratio {network}/{ref} {min(rs):.2f} to {max(rs):.2f} (each within "
            f"[{lo_r:.2f}, {hi_r:.2f}])."
        )
    else:
        k = bad[0]
        agree_text = (
            f"The {network} and {ref} fields do not agree at t = {_ts(ts, bad)}: at t={ts[k]} "
            f"the {network}'s 50 % radius is {_pm(rn['mean'][k], rn['se'][k], unit=' px')} vs "
            f"{_pm(rr['mean'][k], rr['se'][k], unit=' px')} for {ref} (ratio {ratios[k]:.2f}; "
            f"agreement needs {lo_r:.2f} to {hi_r:.2f}) and their IoU50 is "
            f"{_pm(io['mean'][k], io['se'][k])} (agreement needs >= {AGREE_MIN_IOU50:g})"
            + (f"; they agree at t = {_ts(ts, good)}." if good else "; they agree at no level.")
        )
    shrink, why_n = _shrinks(rn, ts)
    ref_shrinks, why_r = _shrinks(rr, ts)
    if shrink and ref_shrinks:
        shrink_text = f"Both shrink as noise decreases: {network}: {why_n}; {ref}: {why_r}."
    elif not shrink and not ref_shrinks:
        shrink_text = f"Neither shrinks as noise decreases: {network}: {why_n}; {ref}: {why_r}."
    else:
        yes, no = (network, ref) if shrink else (ref, network)
        why_yes, why_no = (why_n, why_r) if shrink else (why_r, why_n)
        shrink_text = (
            f"The {yes} field shrinks as noise decreases ({why_yes}); the {no} field does "
            f"not ({why_no})."
        )
    return {
        "agree": bool(agree),
        "shrink": bool(shrink),
        "reference_shrinks": bool(ref_shrinks),
        "text": f"{agree_text} {shrink_text}",
    }
