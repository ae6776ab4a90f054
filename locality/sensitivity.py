"""Sensitivity fields: Jacobian rows of a denoiser and summaries of their locality.

docs/algorithms.md §9. The sensitivity field of output pixel ``p`` at noise level ``ab`` is the row
``d D(x_t)_p / d x_t`` of the denoiser's Jacobian, computed with one vector-Jacobian product
(VJP) per output pixel and output channel, its absolute value summed over input channels (and
over the output channels of ``p``), averaged over M noisy inputs and shown as an H x W heat map.
For an affine denoiser ``D(x) = W x + b`` the Jacobian is ``W`` everywhere, so the field of pixel
``p`` is ``|row p of W|``; for the Wiener filter (docs/algorithms.md §4) that is ``|row p of
P_t / sqrt(ab)|``.

Everything here works with any ``denoise(x_t [B, H, W, C], ab) -> x0_hat [B, H, W, C]``: a
registered denoiser (a pytree dataclass; passed through ``jit`` as an argument, so a new ``ab``
or a new denoiser state of the same structure never recompiles) or a plain Python function
(treated as a static argument, compiled once per function object).

Summaries (numpy, float64, on [H, W] fields that are >= 0):

- :func:`cosine`: ``<f, g> / (||f|| ||g||)`` over all pixels.
- :func:`support` / :func:`iou`: the binarised support of a field is the smallest set of pixels,
  taken in decreasing order of value, whose values sum to at least ``mass`` of the field's total
  (default 90 %); ``iou = |A & B| / |A | B|``. With ``threshold=tau`` instead, the support is
  ``{q : f(q) >= tau * max f}``.
- :func:`radius`: the smallest Euclidean radius ``r`` (pixel units, centre-to-centre) such that
  the pixels within distance ``r`` of ``p`` hold at least ``mass`` of the field's total.

Over many pixels and models (docs/algorithms.md §9): :func:`spread_pixels` (a regular grid of
probe pixels), :func:`fields_at_levels` (fields of several models on shared noisy inputs),
:func:`field_statistics` (radii, cosines and IoUs per pixel), :func:`summarize_statistics` (their
mean and standard error over pixels, the ``summary`` block of ``experiments/sensitivity.py``) and
:func:`field_verdict` (agree / shrink, decided on those statistics and stated in words).
"""

from __future__ import annotations

import logging
import math
import time
from fractions import Fraction
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Pixel = Tuple[int, int]


# ----------------------------------------------------------------------------- validation


def _check_inputs(x_t, ab):
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 4:
        raise ValueError(
            f"x_t must have rank 4 [B, H, W, C]; got shape {x_t.shape}. "
            "Add a batch axis with x[None]."
        )
    if x_t.shape[0] < 1:
        raise ValueError(f"x_t has an empty batch (shape {x_t.shape}); need at least one input")
    if not jnp.issubdtype(x_t.dtype, jnp.floating):
        raise TypeError(f"x_t has dtype {x_t.dtype}; expected float32")
    x_t = x_t.astype(jnp.float32)
    ab = jnp.asarray(ab, jnp.float32)
    if ab.ndim != 0:
        raise ValueError(f"ab must be a scalar; got shape {ab.shape}")
    if not isinstance(ab, jax.core.Tracer):
        v = float(ab)
        if not 0.0 < v < 1.0:
            raise ValueError(f"ab = {v} is outside (0, 1)")
    if not isinstance(x_t, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x_t))):
        raise ValueError("x_t contains NaN or inf")
    return x_t, ab


def check_pixels(pixels, height: int, width: int) -> Tuple[Pixel, ...]:
    """Validate output pixels ``[(i, j), ...]`` (row, column) against an H x W image."""
    arr = np.asarray(pixels)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(
            f"pixels must be a non-empty list of (row, col) pairs, shape [P, 2]; got "
            f"shape {np.shape(pixels)}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise TypeError(f"pixels must be integers (row, col); got {arr.tolist()}")
        arr = arr.astype(np.int64)
    for i, j in arr.tolist():
        if not (0 <= i < height and 0 <= j < width):
            raise ValueError(
                f"pixel ({i}, {j}) is outside the {height} x {width} image; rows must "
                f"be in [0, {height - 1}] and columns in [0, {width - 1}]"
            )
    return tuple((int(i), int(j)) for i, j in arr.tolist())


def centre_pixel(height: int, width: int) -> Pixel:
    """The centre pixel ``(H // 2, W // 2)`` (for even sizes, the lower-right of the central 4)."""
    return (height // 2, width // 2)


# ----------------------------------------------------------------------------- Jacobian rows


def _rows_impl(denoise, x_t, ab, pixels: Tuple[Pixel, ...], pixel_batch: Optional[int]):
    """[P, B, C_out, H, W, C_in] Jacobian rows (see :func:`jacobian_rows`)."""
    _, h, w, c = x_t.shape
    rows = jnp.asarray([p[0] for p in pixels], jnp.int32)
    cols = jnp.asarray([p[1] for p in pixels], jnp.int32)
    # One cotangent per (pixel, output channel): a one-hot image [H, W, C].
    pi = jnp.repeat(rows, c)
    pj = jnp.repeat(cols, c)
    pc = jnp.tile(jnp.arange(c, dtype=jnp.int32), len(pixels))
    onehots = (
        jnp.zeros((len(pixels) * c, h, w, c), jnp.float32)
        .at[jnp.arange(len(pixels) * c), pi, pj, pc]
        .set(1.0)
    )

    def one_sample(x):
        # Exact per-sample Jacobian (no assumption that samples of a batch are independent):
        # linearise once at x, then pull back every cotangent with the same linearisation.
        _, vjp = jax.vjp(lambda y: denoise(y[None], ab)[0], x)
        pull = lambda e: vjp(e)[0]  # noqa: E731
        if pixel_batch is None:
            return jax.vmap(pull)(onehots)  # [P*C, H, W, C]
        return jax.lax.map(pull, onehots, batch_size=pixel_batch)

    out = jax.vmap(one_sample)(x_t)  # [B, P*C_out, H, W, C_in]
    out = out.reshape((x_t.shape[0], len(pixels), c, h, w, c))
    return jnp.swapaxes(out, 0, 1)  # [P, B, C_out, H, W, C_in]


_rows_dynamic = jax.jit(_rows_impl, static_argnames=("pixels", "pixel_batch"))
_rows_static = jax.jit(_rows_impl, static_argnums=(0,), static_argnames=("pixels", "pixel_batch"))


def _is_pytree_denoiser(denoise) -> bool:
    leaves = jax.tree_util.tree_leaves(denoise)
    if len(leaves) == 1 and leaves[0] is denoise:
        return False  # a plain callable is its own (non-array) leaf
    return all(isinstance(l, (jax.Array, np.ndarray, np.generic, float, int)) for l in leaves)


def jacobian_rows(
    denoise: Callable, x_t, ab, pixels: Sequence[Pixel], *, pixel_batch: Optional[int] = None
) -> jax.Array:
    """Jacobian rows of output pixels, one VJP per (pixel, output channel) (docs/algorithms.md §9).

    Args:
      denoise: ``denoise(x_t [B, H, W, C], ab) -> x0_hat [B, H, W, C]``.
      x_t: [B, H, W, C] noisy inputs at which the Jacobian is taken.
      ab: scalar alpha-bar in (0, 1).
      pixels: [P] output pixels ``(row, col)``.
      pixel_batch: if set, the P * C cotangents are pulled back ``pixel_batch`` at a time
        (``lax.map``) instead of all at once (``vmap``); lowers peak memory for networks.

    Returns:
      float32 ``[P, B, C_out, H, W, C_in]`` with
      ``rows[k, b, c] = d D(x_t)[b, i_k, j_k, c] / d x_t[b]`` (an [H, W, C_in] image). Only the
      requested rows of the [H, W, C, H, W, C] Jacobian are formed. Each sample's row is exact:
      the denoiser is linearised once per sample (as a batch of one, vmapped over the B
      samples) and all P * C cotangents are pulled back through that one linearisation, never
      through a batch-summed cotangent. Cost: B linearisations and B * P * C pull-backs.
    """
    x_t, ab = _check_inputs(x_t, ab)
    pix = check_pixels(pixels, x_t.shape[1], x_t.shape[2])
    if pixel_batch is not None and int(pixel_batch) < 1:
        raise ValueError(f"pixel_batch must be >= 1 or None; got {pixel_batch}")
    pb = None if pixel_batch is None else int(pixel_batch)
    fn = _rows_dynamic if _is_pytree_denoiser(denoise) else _rows_static
    return fn(denoise, x_t, ab, pixels=pix, pixel_batch=pb)


def fields(
    denoise: Callable, x_t, ab, pixels: Sequence[Pixel], *, pixel_batch: Optional[int] = None
) -> jax.Array:
    """Sensitivity fields [P, H, W] of ``pixels`` (docs/algorithms.md §9).

    ``field[k] = mean_b sum_{c_out, c_in} |d D(x_t)[b, p_k, c_out] / d x_t[b, :, :, c_in]|``.
    """
    rows = jacobian_rows(denoise, x_t, ab, pixels, pixel_batch=pixel_batch)
    return jnp.mean(jnp.sum(jnp.abs(rows), axis=(2, 5)), axis=1)


def field(
    denoise: Callable, x_t, ab, pixel: Optional[Pixel] = None, *, pixel_batch: Optional[int] = None
) -> jax.Array:
    """Sensitivity field [H, W] of one output pixel (the centre pixel by default)."""
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 4:
        raise ValueError(f"x_t must have rank 4 [B, H, W, C]; got shape {x_t.shape}")
    if pixel is None:
        pixel = centre_pixel(x_t.shape[1], x_t.shape[2])
    return fields(denoise, x_t, ab, [pixel], pixel_batch=pixel_batch)[0]


def linear_field(jacobian, shape: Tuple[int, int, int], pixel: Optional[Pixel] = None):
    """Field [H, W] of an affine map with a constant Jacobian ``[n, n]`` (NHWC order).

    ``|row p of J|`` summed over input channels and over the output channels of ``p``: what
    :func:`field` returns for ``D(x) = J x + b`` (for the Wiener filter, ``J = P_t / sqrt(ab)``).
    Works with numpy or jax arrays (and inside ``jit``).
    """
    h, w, c = shape
    if pixel is None:
        pixel = centre_pixel(h, w)
    ((i, j),) = check_pixels([pixel], h, w)
    xp = jnp if isinstance(jacobian, jax.Array) else np
    jm = xp.reshape(jacobian, (h, w, c, h, w, c))[i, j]  # [C_out, H, W, C_in]
    return xp.sum(xp.abs(jm), axis=(0, 3))


def fields_at_levels(
    models: dict,
    x0,
    timesteps: Sequence[int],
    abs_: Sequence[float],
    pixels: Sequence[Pixel],
    *,
    key,
    skip: Optional[Callable] = None,
    pixel_batch: Optional[int] = None,
):
    """Fields (:func:`fields`) of several denoisers on shared noisy inputs at several levels
    (docs/algorithms.md §9).

    At level ``k`` every model sees the same inputs ``x_t = sqrt(ab_k) x0 + sqrt(1 - ab_k) eps``
    with ``eps ~ N(0, I)`` drawn from ``jax.random.fold_in(key, timesteps[k])``.

    Args:
      models: ``{name: denoise}``.
      x0: [B, H, W, C] clean images.
      timesteps, abs_: the levels' timesteps (they seed the noise) and alpha-bars.
      pixels: the probed output pixels.
      key: a ``jax.random.PRNGKey``.
      skip: ``skip(name, ab) -> bool``; a skipped model gets ``None`` at that level (e.g. a
        linear denoiser without weights for ``ab``).
      pixel_batch: as in :func:`fields`.

    Returns:
      ``({name: [T] of float32 numpy [P, H, W] fields or None}, {name: [seconds per evaluated
      level]})``.
    """
    if len(timesteps) != len(abs_):
        raise ValueError(f"{len(timesteps)} timesteps but {len(abs_)} alpha-bars; pass one each")
    x0 = jnp.asarray(x0)
    out = {m: [None] * len(abs_) for m in models}
    seconds = {m: [] for m in models}
    for k, (t, ab) in enumerate(zip(timesteps, abs_)):
        eps = jax.random.normal(jax.random.fold_in(key, int(t)), x0.shape, jnp.float32)
        x_t = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps
        for m, den in models.items():
            if skip is not None and skip(m, ab):
                continue
            t0 = time.perf_counter()
            f = fields(den, x_t, ab, pixels, pixel_batch=pixel_batch)
            out[m][k] = np.asarray(jax.block_until_ready(f))
            seconds[m].append(time.perf_counter() - t0)
            logging.info("t=%d ab=%.4f %-7s fields %.2fs", int(t), ab, m, seconds[m][-1])
    return out, seconds


def affine_field_error(fields_p, jacobian, shape: Tuple[int, int, int], pixels) -> float:
    """Largest error of fields [P, H, W] against :func:`linear_field` of an affine map's
    Jacobian ``[n, n]``, relative to the largest exact value (a check of the VJP path)."""
    exact = np.stack([linear_field(np.asarray(jacobian, np.float64), shape, p) for p in pixels])
    return float(np.max(np.abs(np.asarray(fields_p) - exact)) / np.max(exact))


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


# ----------------------------------------------------------------------------- probe pixels


def _band_centres(n: int, k: int) -> Tuple[int, ...]:
    """Index of the pixel nearest the centre of each of ``k`` equal bands of ``n`` pixels.

    The exact centre of band ``i`` is ``(i + 1/2) n / k - 1/2``; a tie (a centre halfway between
    two pixels) is rounded toward the middle of the image, and at the middle itself up (the
    convention of :func:`centre_pixel`), so the result is mirror-symmetric.
    """
    mid = Fraction(n - 1, 2)
    out = []
    for i in range(k):
        c = Fraction((2 * i + 1) * n - k, 2 * k)
        out.append(math.floor(c + Fraction(1, 2)) if c <= mid else math.ceil(c - Fraction(1, 2)))
    return tuple(out)


def spread_pixels(height: int, width: int, count: int = 16) -> Tuple[Pixel, ...]:
    """``k * k >= count`` probe pixels ``(row, col)`` spread evenly over an H x W image
    (docs/algorithms.md §9).

    ``k = ceil(sqrt(count))``. The rows are cut into ``k`` equal bands and the pixel nearest the
    centre of each band, ``(i + 1/2) H / k - 1/2``, is taken (a tie rounds toward the middle of
    the image); likewise the columns; the pixels are every (row, column) combination, in
    row-major order. The grid is deterministic and mirror-symmetric, neighbours are ``H / k``
    apart to within one pixel, and it is inset from the border by about half that spacing, so
    pixels near the edges and in the interior are both probed. Examples: ``spread_pixels(28,
    28)`` uses rows and columns (3, 10, 17, 24); ``spread_pixels(32, 32)`` (4, 12, 19, 27);
    ``count=1`` gives the centre pixel.
    """
    for name, v in (("height", height), ("width", width), ("count", count)):
        if isinstance(v, bool) or not float(v).is_integer() or int(v) < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    height, width, count = int(height), int(width), int(count)
    k = math.isqrt(count - 1) + 1  # ceil(sqrt(count))
    if k > min(height, width):
        raise ValueError(
            f"count={count} needs a {k} x {k} grid, more rows or columns than the {height} x "
            f"{width} image has; use count <= {min(height, width) ** 2} or list the pixels"
        )
    rows, cols = _band_centres(height, k), _band_centres(width, k)
    return tuple((r, c) for r in rows for c in cols)


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


def field_statistics(
    fields_by_model, pixels: Sequence[Pixel], masses: Sequence[float] = (0.5, 0.9)
) -> dict:
    """Per-pixel locality statistics of sensitivity fields (docs/algorithms.md §9).

    Args:
      fields_by_model: ``{model: [T levels] of [P, H, W] fields, or None}`` (None where the
        model was not evaluated at a level). Field ``k`` of a level is that of ``pixels[k]``,
        as returned by :func:`fields` (already the mean over the noisy inputs).
      pixels: the P probed pixels ``(row, col)``.
      masses: the mass fractions of the radii and of the supports (50 % and 90 %).

    Returns:
      ``{"models": [...], "pixels": [...], "masses": [...], "radius": {model: {"50": [T, P],
      ...}}, "pairs": {"a|b": {"cosine": [T, P], "iou50": [T, P], ...}}}`` float64 arrays, NaN
      where a model has no field. ``radius[m]["50"][t, k]`` is :func:`radius` of ``m``'s field
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

    def per_pixel(fn, *ms):
        out = np.full((num_t, len(pix)), np.nan)
        for k in range(num_t):
            fs = [stacks[m][k] for m in ms]
            if all(f is not None for f in fs):
                out[k] = [fn(p, *(f[i] for f in fs)) for i, p in enumerate(pix)]
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


# ----------------------------------------------------------------------------- tables and text


def pixel_tables(statistics: dict, fields_by_model, timesteps: Sequence[int]) -> dict:
    """The per-pixel statistics of :func:`field_statistics` as tables keyed ``"row,col"``.

    Returns ``{"radius": {model: {"r,c": {"0.5": [T], "0.9": [T]}}}, "cosine": {"t": {"r,c":
    [K, K]}}, "iou": {"0.5": {"t": {"r,c": [K, K]}}, "0.9": ...}}``: radii per level (``None``
    where a model has no field) and model-by-model matrices in the order of
    ``statistics["models"]`` (symmetric; the diagonal compares a field with itself; NaN where
    a model has no field). This is the layout of the ``radius``, ``cosine`` and ``iou`` entries
    of ``experiments/sensitivity.py``'s metrics.json before its ``summary`` block.
    """
    names, masses = statistics["models"], statistics["masses"]
    keys = [f"{p[0]},{p[1]}" for p in statistics["pixels"]]
    radius_table = {
        m: {
            key: {
                str(a): [None if np.isnan(v) else float(v) for v in r[mass_key(a)][:, i]]
                for a in masses
            }
            for i, key in enumerate(keys)
        }
        for m, r in statistics["radius"].items()
    }

    def table(stat, self_fn):
        out = {}
        for k, t in enumerate(timesteps):
            out[str(t)] = {}
            for i, key in enumerate(keys):
                mat = np.full((len(names), len(names)), np.nan)
                for a, ma in enumerate(names):
                    f = fields_by_model[ma][k]
                    if f is not None:
                        mat[a, a] = self_fn(f[i], f[i])
                    for b in range(a + 1, len(names)):
                        pair = statistics["pairs"][pair_key(ma, names[b])]
                        mat[a, b] = mat[b, a] = pair[stat][k, i]
                out[str(t)][key] = mat
        return out

    return {
        "radius": radius_table,
        "cosine": table("cosine", cosine),
        "iou": {
            str(a): table(f"iou{mass_key(a)}", lambda f, g, a=a: iou(f, g, mass=a)) for a in masses
        },
    }


def summary_lines(summary: dict) -> list:
    """Plain-text lines of a :func:`summarize_statistics` block: every statistic as ``mean+-SE``
    per level, then the verdicts."""
    ts, ref = summary["timesteps"], summary["reference"]

    def row(block):
        return " ".join(
            "-" if v is None else f"{v:.2f}+-{'n/a' if s is None else f'{s:.2f}'}"
            for v, s in zip(block["mean"], block["se"])
        )

    lines = [f"mean+-SE over {len(summary['pixels'])} pixels at t = {ts}:"]
    for m, blocks in summary["per_model"].items():
        lines += [f"{m:8s} {name}: {row(b)}" for name, b in blocks.items()]
    for key, pair in summary["pairs"].items():
        lines += [f"{key} {name}: {row(b)}" for name, b in pair.items()]
    lines += [f"verdict {m} vs {ref}: {v['text']}" for m, v in summary["verdicts"].items()]
    return lines
