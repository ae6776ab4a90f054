"""Figures: image grids, heat maps and curves (matplotlib Agg; every write is atomic)."""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def atomic_savefig(fig, path: str, dpi: int = 100) -> str:
    """Save ``fig`` to ``path`` through a temporary file in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".png",
                               dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
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
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return out


def save_image_grid(images, path: str, ncols: Optional[int] = None, title: Optional[str] = None,
                    scale: int = 3) -> str:
    """Write a PNG grid of [N, H, W, C] images in [-1, 1] (nearest-neighbour upscaled x ``scale``)."""
    plt = _plt()
    g = grid_array(images, ncols)
    fig = plt.figure(figsize=(g.shape[1] * scale / 100, g.shape[0] * scale / 100 + (0.3 if title else 0)))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray" if g.shape[-1] == 1 else None,
              interpolation="nearest", vmin=0, vmax=255)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_rows(rows: Dict[str, np.ndarray], path: str, title: Optional[str] = None) -> str:
    """One labelled row per entry ({label: [N, H, W, C] in [-1, 1]}), e.g. x0_hat per step or method."""
    plt = _plt()
    labels = list(rows)
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(labels), n, figsize=(0.9 * n + 1.2, 0.9 * len(labels) + 0.4),
                             squeeze=False)
    for r, lab in enumerate(labels):
        imgs = to_uint8(rows[lab])
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]); ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                im = imgs[c]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im,
                          cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=255,
                          interpolation="nearest")
        axes[r, 0].set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def save_heatmaps(maps: Dict[str, np.ndarray], path: str, title: Optional[str] = None,
                  cmap: str = "viridis", ncols: Optional[int] = None) -> str:
    """Heat maps ({label: [H, W]}), each with its own colour scale."""
    plt = _plt()
    labels = list(maps)
    ncols = ncols or len(labels)
    nrows = int(np.ceil(len(labels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.8 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]); ax.set_yticks([])
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


def save_curves(x: Sequence[float], curves: Dict[str, Sequence[float]], path: str, *,
                xlabel: str = "", ylabel: str = "", title: Optional[str] = None,
                logy: bool = False, invert_x: bool = False) -> str:
    """Line plot of several named curves over a shared x axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for lab, y in curves.items():
        ax.plot(list(x), list(y), marker="o", ms=3, label=lab)
    ax.set_xlabel(xlabel); ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if invert_x:
        ax.invert_xaxis()
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
