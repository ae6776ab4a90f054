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
"""

from __future__ import annotations

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
