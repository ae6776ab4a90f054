"""Figures: image grids, heat maps and curves (matplotlib Agg; every write is atomic).

Size: about 575 lines, one concept: every figure the package writes. The module is a flat list of
independent writers (image grids and rows, heat maps and tables of them, matrices, curves and
series, bars; 20-110 lines each) that share only three helpers: the lazy matplotlib import
(``_plt``), the atomic save (:func:`atomic_savefig`) and the fixed method colours
(:func:`method_color`). A writer is read on its own, so the length costs a reader little. Split
into image, heat-map and curve modules, the helpers would need a fourth; the one place every
figure passes through (tests replace ``plotting.atomic_savefig`` to capture figures) would become
several; and the ``plotting.save_*`` calls of the entry points would spread over three modules.
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from locality._io import atomic_path

# One colour per method in every figure, so a method is recognised across figures.
METHOD_COLORS = {
    "network": "black",
    "pca_locality": "tab:red",
    "pca_locality_chunk_mean": "lightcoral",
    "wiener": "tab:blue",
    "wiener_dense": "tab:blue",
    "linear": "tab:cyan",
    "optimal": "tab:green",
    "nearest": "tab:olive",
    "ls": "tab:purple",
    "els": "tab:pink",
    "bbels": "tab:brown",
    "pspc_square": "tab:orange",
    "pspc_flex": "gold",
    "scfdm": "tab:gray",
}


def method_color(name: str) -> str:
    """The fixed colour of a method (by registry name, or a label starting with one); unknown
    names get a stable colour from their text."""
    for key in sorted(METHOD_COLORS, key=len, reverse=True):
        if name == key or name.startswith(key + "_") or name.startswith(key + " "):
            return METHOD_COLORS[key]
    spare = ("darkviolet", "teal", "sienna", "navy", "darkgoldenrod", "crimson", "slategray")
    return spare[zlib.crc32(name.encode()) % len(spare)]


def _plt():
    # Lazy: matplotlib takes ~0.5 s to import and only the figure writers need it.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def atomic_savefig(fig, path: str, dpi: int = 100) -> str:
    """Save ``fig`` to ``path`` through a temporary file in the same directory, then rename."""
    with atomic_path(path, suffix=os.path.splitext(path)[1] or ".png") as tmp:
        fig.savefig(
            tmp, dpi=dpi, bbox_inches="tight", format=(os.path.splitext(path)[1][1:] or "png")
        )
    return path


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 (values outside are clipped)."""
    x = np.asarray(images, np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def grid_array(images, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile [N, H, W, C] images in [-1, 1] into one uint8 [rows*(H+pad)+pad, ..., C] array."""
    x = to_uint8(images)
    if x.ndim != 4:
        raise ValueError(f"grid_array needs [N, H, W, C]; got shape {x.shape}")
    n, h, w, c = x.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = x[i]
    return out


def save_image_grid(
    images, path: str, ncols: Optional[int] = None, title: Optional[str] = None, scale: int = 3
) -> str:
    """Write a PNG grid of [N, H, W, C] images in [-1, 1]
    (nearest-neighbour upscaled x ``scale``)."""
    plt = _plt()
    g = grid_array(images, ncols)
    fig = plt.figure(
        figsize=(g.shape[1] * scale / 100, g.shape[0] * scale / 100 + (0.3 if title else 0))
    )
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(
        g[..., 0] if g.shape[-1] == 1 else g,
        cmap="gray" if g.shape[-1] == 1 else None,
        interpolation="nearest",
        vmin=0,
        vmax=255,
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_rows(rows: Dict[str, np.ndarray], path: str, title: Optional[str] = None) -> str:
    """One labelled row per entry ({label: [N, H, W, C] in [-1, 1]}),
    e.g. x0_hat per step or method."""
    plt = _plt()
    labels = list(rows)
    n = max(len(v) for v in rows.values())
    # square cells of `cell` inches with a `gap` between them, a label column on the left and a
    # title band on top sized in inches, so no row count leaves an empty band
    cell, gap, left, top = 0.8, 0.06, 1.5, (0.35 if title else 0.05)
    width = left + n * cell + (n - 1) * gap + 0.05
    height = top + len(labels) * cell + (len(labels) - 1) * gap + 0.05
    fig, axes = plt.subplots(len(labels), n, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - 0.05 / width,
        top=1 - top / height,
        bottom=0.05 / height,
        wspace=gap / cell,
        hspace=gap / cell,
    )
    for r, lab in enumerate(labels):
        imgs = to_uint8(rows[lab])
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                im = imgs[c]
                ax.imshow(
                    im[..., 0] if im.shape[-1] == 1 else im,
                    cmap="gray" if im.shape[-1] == 1 else None,
                    vmin=0,
                    vmax=255,
                    interpolation="nearest",
                )
        axes[r, 0].set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_heatmaps(
    maps: Dict[str, np.ndarray],
    path: str,
    title: Optional[str] = None,
    cmap: str = "viridis",
    ncols: Optional[int] = None,
) -> str:
    """Heat maps ({label: [H, W]}), each with its own colour scale."""
    plt = _plt()
    labels = list(maps)
    ncols = ncols or len(labels)
    nrows = int(np.ceil(len(labels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.8 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < len(labels):
            ax.imshow(np.asarray(maps[labels[i]]), cmap=cmap, interpolation="nearest")
            ax.set_title(labels[i], fontsize=7)
        else:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_curves(
    x: Sequence[float],
    curves: Dict[str, Sequence[float]],
    path: str,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: Optional[str] = None,
    logy: bool = False,
    invert_x: bool = False,
) -> str:
    """Line plot of several named curves over a shared x axis (20 distinct colours, then the
    line style changes, so no two curves look alike); the legend sits outside the axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colours = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    for i, (lab, y) in enumerate(curves.items()):
        ax.plot(
            list(x),
            list(y),
            marker="o",
            ms=3,
            label=lab,
            color=colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
            ls=styles[(i // 20) % len(styles)],
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if invert_x:
        ax.invert_xaxis()
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str,
    *,
    ylabel: str = "eps-MSE (mean over log interval)",
    title: Optional[str] = None,
) -> str:
    """A training curve: ``losses`` against ``steps`` on a log y axis (e.g. the ``loss`` column
    of a run's ``metrics.jsonl``, which :func:`locality.train.train` plots to ``loss.png``)."""
    return save_series(
        [{"x": steps, "y": losses, "style": "-"}],
        path,
        xlabel="step",
        ylabel=ylabel,
        title=title,
        logy=True,
    )


def save_heatmap_table(
    maps,
    path: str,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: Optional[str] = None,
    marks=None,
    cmap: str = "viridis",
    shared_scale: str = "panel",
    colorbar: bool = False,
    clip_percentile: Optional[float] = None,
    colorbar_label: Optional[str] = None,
) -> str:
    """Table of heat maps: ``maps[r][c]`` is an [H, W] array (or None for an empty panel).

    Rows and columns are labelled on the left and on top. ``marks[r][c]`` (optional) is a
    (row, col) pixel outlined by a thin red square, e.g. the output pixel of a sensitivity field.
    ``shared_scale``: "panel" (each panel its own colour scale, default), "row" or "all".

    ``colorbar``: a colour bar beside every panel (``colorbar_label`` under those of the last
    column). ``clip_percentile=q`` (for sensitivity fields, docs/algorithms.md §9): the colour
    scale runs from 0 to the ``q``-th percentile of the panel's values *other than its marked
    pixel* (the maximum of those over the row or table with ``shared_scale``), so the spike at
    a field's own pixel does not flatten the rest; brighter values saturate, and the colour
    bar's arrow marks the clipping. Without it the scale spans the values as before.
    """
    plt = _plt()
    nrows, ncols = len(row_labels), len(col_labels)
    if len(maps) != nrows or any(len(r) != ncols for r in maps):
        raise ValueError(f"maps must be {nrows} rows of {ncols} panels")
    if shared_scale not in ("panel", "row", "all"):
        raise ValueError(f"shared_scale must be 'panel', 'row' or 'all'; got {shared_scale!r}")
    if clip_percentile is not None and not 0.0 < float(clip_percentile) <= 100.0:
        raise ValueError(f"clip_percentile must be in (0, 100]; got {clip_percentile}")

    def top(r, c):  # the value at the top of the colour scale of panel (r, c)
        m = np.asarray(maps[r][c])
        if clip_percentile is None:
            return float(np.max(m))
        keep = np.ones(m.shape, bool)
        if marks is not None and marks[r][c] is not None:
            keep[tuple(marks[r][c])] = False
        vals = m[keep] if keep.any() else m.ravel()
        q = float(np.percentile(vals, float(clip_percentile)))
        return q if q > 0 else float(np.max(m))  # an all-zero remainder: the full range

    tops = [[None if maps[r][c] is None else top(r, c) for c in range(ncols)] for r in range(nrows)]
    vmax_all = max((v for row in tops for v in row if v is not None), default=1.0)
    panel_w = 1.95 if colorbar else 1.5
    fig_h = 1.5 * nrows + 0.5
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 0.9, fig_h), squeeze=False)
    # the panels reach up to the column labels, so the title above them leaves no empty band
    fig.subplots_adjust(top=1.0 - 0.3 / fig_h, bottom=0.15 / fig_h)
    for r in range(nrows):
        vmax_row = max((v for v in tops[r] if v is not None), default=1.0)
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            m = maps[r][c]
            if m is None:
                ax.text(
                    0.5,
                    0.5,
                    "n/a",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="0.5",
                    transform=ax.transAxes,
                )
            else:
                vmax = {"panel": None, "row": vmax_row, "all": vmax_all}[shared_scale]
                if vmax is None and clip_percentile is not None:
                    vmax = tops[r][c]
                im = ax.imshow(
                    np.asarray(m),
                    cmap=cmap,
                    interpolation="nearest",
                    vmin=0 if vmax else None,
                    vmax=vmax,
                )
                if colorbar:
                    clipped = vmax is not None and float(np.max(m)) > vmax
                    cb = fig.colorbar(
                        im, ax=ax, fraction=0.046, pad=0.03, extend="max" if clipped else "neither"
                    )
                    cb.ax.tick_params(labelsize=5)
                    cb.ax.yaxis.get_offset_text().set_fontsize(5)
                    if colorbar_label and c == ncols - 1:
                        cb.set_label(colorbar_label, fontsize=5)
                if marks is not None and marks[r][c] is not None:
                    from matplotlib.patches import Rectangle  # lazy like matplotlib (_plt)

                    i, j = marks[r][c]
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=0.6)
                    )
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7)
    if title:  # above the column labels (the saved figure's tight box includes it)
        fig.suptitle(title, fontsize=9, y=1.0, va="bottom")
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_matrices(
    matrices: Dict[str, np.ndarray],
    labels: Sequence[str],
    path: str,
    *,
    title: Optional[str] = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> str:
    """Annotated square matrices side by side ({panel title: [K, K]});
    rows/cols named ``labels``."""
    plt = _plt()
    k = len(labels)
    names = list(matrices)
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=((0.45 * k + 1.0) * len(names), 0.45 * k + 1.3),
        squeeze=False,
        layout="constrained",
    )
    for ax, name in zip(axes[0], names):
        m = np.asarray(matrices[name], np.float64)
        if m.shape != (k, k):
            raise ValueError(f"matrix {name!r} has shape {m.shape}; expected ({k}, {k})")
        ax.imshow(m, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        for a in range(k):
            for b in range(k):
                if np.isfinite(m[a, b]):
                    ax.text(
                        b,
                        a,
                        f"{m[a, b]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if m[a, b] < 0.5 * (vmin + vmax) else "black",
                    )
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=6)
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def focus_ylim(
    series: Sequence[Dict], margin: float = 0.08, keep_fraction: float = 0.75
) -> Optional[Tuple[float, float]]:
    """A y range for :func:`save_series` set by the series that matter: when a few series lie
    far below the rest (e.g. a method with r2 far under 0), the range covers the best
    ``keep_fraction`` of the series (ranked by their maximum) and the others are annotated as
    off the axis instead of stretching it. ``None`` when every series fits without stretching
    the range more than twofold."""
    tops = sorted(
        (
            (float(np.nanmax(s["y"])), i)
            for i, s in enumerate(series)
            if np.isfinite(np.asarray(s["y"], np.float64)).any()
        ),
        reverse=True,
    )
    if len(tops) < 3:
        return None
    kept = [series[i] for _, i in tops[: max(2, int(np.ceil(keep_fraction * len(tops))))]]
    lo = min(
        float(
            np.nanmin(
                np.asarray(s["y"], np.float64)
                - np.asarray(s.get("yerr", 0.0) if s.get("yerr") is not None else 0.0)
            )
        )
        for s in kept
    )
    hi = max(
        float(
            np.nanmax(
                np.asarray(s["y"], np.float64)
                + np.asarray(s.get("yerr", 0.0) if s.get("yerr") is not None else 0.0)
            )
        )
        for s in kept
    )
    all_lo = min(float(np.nanmin(s["y"])) for s in series)
    if hi - all_lo <= 2 * (hi - lo):
        return None
    pad = margin * (hi - lo or 1.0)
    return lo - pad, hi + pad


def save_series(
    series: Sequence[Dict],
    path: str,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: Optional[str] = None,
    logx: bool = False,
    logy: bool = False,
    vlines: Sequence[float] = (),
    ylim: Optional[Tuple[float, float]] = None,
    invert_x: bool = False,
) -> str:
    """Line plot of series with their own x values and styles.

    Each entry is ``{"x": [...], "y": [...], "label": str, "style": "-"|"--"|":"|..., "color":
    optional matplotlib colour, "marker": optional, "yerr": optional error bars, "band":
    optional half-width of a shaded band around the line (e.g. 1 standard error)}``.
    Non-positive values are dropped on log axes. ``vlines``: x positions of thin dotted grey
    vertical lines (e.g. where something starts). ``ylim``: the y range (e.g. from
    :func:`focus_ylim`); series that leave it are named in a note under the axes with their
    minimum. The legend sits outside the axes, right of the data.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    off_axis = []
    for s in series:
        x = np.asarray(s["x"], np.float64)
        y = np.asarray(s["y"], np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        if logx:
            keep &= x > 0
        if logy:
            keep &= y > 0
        if s.get("yerr") is not None:
            err = np.asarray(s["yerr"], np.float64)[keep]
            ax.errorbar(
                x[keep],
                y[keep],
                yerr=err,
                fmt=s.get("style", "-"),
                color=s.get("color"),
                marker=s.get("marker"),
                ms=3,
                capsize=3,
                label=s.get("label"),
            )
        else:
            (line,) = ax.plot(
                x[keep],
                y[keep],
                s.get("style", "-"),
                color=s.get("color"),
                marker=s.get("marker"),
                ms=3,
                label=s.get("label"),
            )
            if s.get("band") is not None:
                band = np.asarray(s["band"], np.float64)[keep]
                ax.fill_between(
                    x[keep],
                    y[keep] - band,
                    y[keep] + band,
                    alpha=0.18,
                    lw=0,
                    color=line.get_color(),
                )
        if ylim is not None and keep.any() and (y[keep].min() < ylim[0] or y[keep].max() > ylim[1]):
            off_axis.append(f"{s.get('label', '?')} (min {y[keep].min():.2f})")
    for v in vlines:
        ax.axvline(v, color="0.4", ls=":", lw=1)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if invert_x:
        ax.invert_xaxis()
    if ylim is not None:
        ax.set_ylim(*ylim)
    if off_axis:
        ax.annotate(
            "off the axis: " + ", ".join(off_axis),
            xy=(0, -0.22),
            xycoords="axes fraction",
            fontsize=6,
            va="top",
            color="0.3",
        )
    if any(s.get("label") for s in series):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_bars(
    values: Dict[str, float],
    path: str,
    *,
    errors: Optional[Dict[str, float]] = None,
    ylabel: str = "",
    title: Optional[str] = None,
    reference: Optional[Tuple[float, str]] = None,
) -> str:
    """Bar chart of named values (in the given order), optional error bars, and an optional
    horizontal reference line ``(value, label)`` (e.g. the floor a perfect model reaches)."""
    plt = _plt()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6))
    err = [errors.get(k, 0.0) for k in labels] if errors else None
    ax.bar(range(len(labels)), [values[k] for k in labels], yerr=err, color="tab:blue", capsize=3)
    if reference is not None:
        ax.axhline(reference[0], color="tab:red", ls="--", lw=1, label=reference[1])
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
