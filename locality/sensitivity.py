"""Sensitivity fields: Jacobian rows of a denoiser and the fields of denoisers and linear maps.

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

Pixels: :func:`check_pixels` validates ``(row, col)`` pairs, :func:`centre_pixel` is the default
pixel and :func:`spread_pixels` a regular grid of probe pixels. Fields: :func:`jacobian_rows`,
:func:`fields` / :func:`field` (any denoiser), :func:`linear_field` (an affine map's constant
Jacobian), :func:`fields_at_levels` (several models on shared noisy inputs at several levels)
and :func:`affine_field_error` (the VJP path against an affine map's exact rows). Summaries of
the fields (cosine, supports, IoU, radii, their means and standard errors over pixels, the
agree / shrink verdicts) are :mod:`locality.field_summary`.
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
