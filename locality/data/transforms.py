"""Deterministic dataset transforms for the data-statistics experiments (issue #6, item 4).

The paper's argument is that a denoiser's sensitivity field follows the pixel correlations of the
data. These transforms change the correlations while keeping the images' marginal statistics:

- :func:`link` copies a square region of every image to a distant location, so that two far-apart
  regions become perfectly correlated (a long-range dependency that no convolution prior
  favours);
- :func:`permute` applies one fixed random permutation of the pixel positions to every image, so
  that neighbours in the data are scattered across the grid (the optimal *linear* denoiser is
  exactly permutation-equivariant: ``W_perm = P W P^T``).

Transforms are named by a spec string so that configs, checkpoints and caches record them:
``""`` (identity), ``"link:SR,SC,DR,DC,K"`` (copy the ``K x K`` block whose top-left corner is
``(SR, SC)`` onto the block at ``(DR, DC)``) and ``"permute:SEED"``. :func:`apply` parses a spec
and validates it against the image shape; everything is numpy and pure.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np


class Link(NamedTuple):
    src: Tuple[int, int]
    dst: Tuple[int, int]
    size: int


def _ints(text: str, n: int, spec: str) -> Tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise ValueError(
            f"transform spec {spec!r} needs {n} comma-separated integers after the "
            f"colon, e.g. 'link:10,4,0,20,6' or 'permute:0'"
        )
    return vals


def parse(spec: str):
    """``""`` -> None; ``"link:..."`` -> :class:`Link`;
    ``"permute:SEED"`` -> ``("permute", seed)``."""
    spec = (spec or "").strip()
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "link":
        sr, sc, dr, dc, k = _ints(rest, 5, spec)
        if k < 1:
            raise ValueError(f"transform {spec!r}: block size must be >= 1, got {k}")
        return Link((sr, sc), (dr, dc), k)
    if kind == "permute":
        (seed,) = _ints(rest, 1, spec)
        return ("permute", seed)
    raise ValueError(f"unknown transform {spec!r}; use '', 'link:SR,SC,DR,DC,K' or 'permute:SEED'")


def check_link(lk: Link, height: int, width: int) -> None:
    for name, (r, c) in (("source", lk.src), ("destination", lk.dst)):
        if r < 0 or c < 0 or r + lk.size > height or c + lk.size > width:
            raise ValueError(
                f"link {name} block at {(r, c)} of size {lk.size} does not fit in "
                f"{height}x{width} images; move it inside the image"
            )
    rows = abs(lk.src[0] - lk.dst[0]) < lk.size
    cols = abs(lk.src[1] - lk.dst[1]) < lk.size
    if rows and cols:
        raise ValueError(
            f"link source {lk.src} and destination {lk.dst} blocks of size {lk.size} "
            "overlap; choose distant blocks"
        )


def link(images: np.ndarray, src, dst, size: int) -> np.ndarray:
    """Copy of ``images`` [N, H, W, C] with block ``src`` (top-left corner, ``size`` square)
    written over block ``dst``."""
    x = np.array(images, copy=True)
    lk = Link(tuple(src), tuple(dst), int(size))
    check_link(lk, x.shape[1], x.shape[2])
    (sr, sc), (dr, dc), k = lk
    x[:, dr : dr + k, dc : dc + k] = x[:, sr : sr + k, sc : sc + k]
    return x


def permutation(seed: int, height: int, width: int) -> np.ndarray:
    """The fixed permutation of ``height * width`` flat pixel positions used by ``permute:seed``:
    output flat position ``q`` takes input position ``perm[q]``."""
    return np.random.default_rng(seed).permutation(height * width)


def permute(images: np.ndarray, seed: int) -> np.ndarray:
    """``images`` [N, H, W, C] with pixel positions permuted by :func:`permutation`."""
    x = np.asarray(images)
    n, h, w, c = x.shape
    perm = permutation(seed, h, w)
    return x.reshape(n, h * w, c)[:, perm].reshape(n, h, w, c)


def unpermute(images: np.ndarray, seed: int) -> np.ndarray:
    """Inverse of :func:`permute` (works on [..., H, W] fields too, last two axes = grid)."""
    x = np.asarray(images)
    channels = x.ndim == 4
    if not channels:
        x = x[..., None]
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    perm = permutation(seed, h, w)
    out = np.empty_like(x.reshape(*lead, h * w, c))
    out[..., perm, :] = x.reshape(*lead, h * w, c)
    out = out.reshape(*lead, h, w, c)
    return out if channels else out[..., 0]


def apply(images: np.ndarray, spec: str) -> np.ndarray:
    """Apply the transform named by ``spec`` (see the module docstring) to [N, H, W, C] images."""
    t = parse(spec)
    if t is None:
        return images
    if isinstance(t, Link):
        return link(images, t.src, t.dst, t.size)
    return permute(images, t[1])
