"""Linear (affine) denoisers ``D_t(x) = W_t x + b_t`` (docs/algorithms.md §4): their registry
entry and weight files.

``W_t`` [n, n], ``b_t`` [n] act on NHWC-flattened images, one pair per trained noise level. The
pairs come from :mod:`locality.denoisers.linear_fit` (gradient descent on the denoising loss,
or its exact least-squares minimiser) and are stored with :func:`save_linear`.

Registry: ``make("linear", weights={ab: (W, b), ...} | "path.npz", shape=(H, W, C))`` returns
a :class:`Linear` pytree denoiser; a call with ``ab`` uses the stored pair whose ``ab`` is
nearest to it (``argmin |ab_k - ab|``; ties go to the smaller ``ab_k``), optionally refusing
levels farther than ``tolerance``.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality._io import atomic_path
from locality.denoisers.base import HIGHEST, DenoiserBase
from locality.denoisers.registry import register

FORMAT_VERSION = 1
Weights = Mapping[float, Tuple[np.ndarray, np.ndarray]]


def check_ab(ab) -> float:
    """``float(ab)``, refused unless it lies in (0, 1) (a level of a weight file or of a fit)."""
    v = float(ab)
    if not 0.0 < v < 1.0:
        raise ValueError(f"ab = {v} is outside (0, 1)")
    return v


# ----------------------------------------------------------------------------- denoiser


@flax.struct.dataclass
class Linear(DenoiserBase):
    """Affine denoisers ``W_k x + b_k`` at noise levels ``ab_k``; a call uses the nearest level.

    Attributes:
      ab_values: [T] float32, ascending.
      weights: [T, n, n] float32; biases: [T, n] float32 (flattened NHWC order).
      shape: (H, W, C); tolerance: if set, a concrete ``ab`` farther than this from every
        ``ab_k`` raises ``ValueError`` (under ``jit`` the nearest level is used silently).
    """

    ab_values: jax.Array
    weights: jax.Array
    biases: jax.Array
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    tolerance: Optional[float] = flax.struct.field(pytree_node=False, default=None)
    name = "linear"

    def index(self, ab):
        """Index of the stored level nearest to ``ab`` (ties: the smaller ``ab_k``)."""
        return jnp.argmin(jnp.abs(self.ab_values - jnp.asarray(ab, jnp.float32)))

    def jacobian(self, ab) -> jax.Array:
        """The constant Jacobian [n, n] used at ``ab`` (the stored ``W`` of the nearest level)."""
        return self.weights[self.index(ab)]

    def apply(self, x_t, ab):
        k = self.index(ab)
        flat = x_t.reshape(x_t.shape[0], -1)
        out = jnp.matmul(flat, self.weights[k].T, precision=HIGHEST) + self.biases[k]
        return out.reshape(x_t.shape)

    def __call__(self, x_t, ab):
        if self.tolerance is not None and not isinstance(ab, jax.core.Tracer):
            gap = float(np.min(np.abs(np.asarray(self.ab_values, np.float64) - float(ab))))
            if gap > self.tolerance:
                raise ValueError(
                    f"linear: ab = {float(ab):.6g} is {gap:.3g} away from the nearest trained "
                    f"level (levels {np.asarray(self.ab_values).tolist()}); tolerance is "
                    f"{self.tolerance}. Train a linear denoiser at this level or raise tolerance."
                )
        return super().__call__(x_t, ab)


def save_linear(path: str, weights: Weights, shape: Tuple[int, int, int]) -> str:
    """Write ``{ab: (W, b)}`` and the image shape to an ``.npz`` atomically (temp file + rename)."""
    ab, w, b, shape = _stack(weights, shape)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                ab=ab,
                W=w,
                b=b,
                shape=np.asarray(shape, np.int64),
                version=np.int64(FORMAT_VERSION),
            )
    return path


def load_linear(
    path: str,
) -> Tuple[Dict[float, Tuple[np.ndarray, np.ndarray]], Tuple[int, int, int]]:
    """Read a file written by :func:`save_linear`: ``({ab: (W, b)}, (H, W, C))``."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"linear weights file {path} does not exist; train one with "
            "experiments/linear_gd.py (it writes linear_weights.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(
            f"linear weights file {path} is unreadable ({type(e).__name__}: {e}); "
            "delete it and retrain"
        ) from e
    need = {"ab", "W", "b", "shape", "version"}
    if not need <= set(arrays):
        raise ValueError(f"linear weights file {path} lacks {sorted(need - set(arrays))}")
    if int(arrays["version"]) != FORMAT_VERSION:
        raise ValueError(
            f"linear weights file {path} has format version {int(arrays['version'])}; "
            f"expected {FORMAT_VERSION}"
        )
    shape = tuple(int(s) for s in arrays["shape"])
    weights = {float(a): (arrays["W"][k], arrays["b"][k]) for k, a in enumerate(arrays["ab"])}
    return weights, shape


def _stack(weights: Weights, shape):
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(
            "weights must be a non-empty mapping {ab: (W, b)} or a path to an .npz "
            "written by save_linear"
        )
    items = sorted((check_ab(a), wb) for a, wb in weights.items())
    abs_ = [a for a, _ in items]
    if len(set(np.float32(abs_).tolist())) != len(abs_):
        raise ValueError(f"weights has duplicate noise levels (in float32): {abs_}")
    ws, bs = [], []
    n = None
    for a, wb in items:
        if not isinstance(wb, (tuple, list)) or len(wb) != 2:
            raise TypeError(f"weights[{a}] must be a pair (W, b)")
        wm, b = np.asarray(wb[0], np.float32), np.asarray(wb[1], np.float32)
        n = wm.shape[0] if n is None else n
        if wm.shape != (n, n) or b.shape != (n,):
            raise ValueError(
                f"weights[{a}] has W {wm.shape} and b {b.shape}; expected W [n, n] "
                f"and b [n] with the same n = {n} at every level"
            )
        if not (np.all(np.isfinite(wm)) and np.all(np.isfinite(b))):
            raise ValueError(f"weights[{a}] contains NaN or inf")
        ws.append(wm)
        bs.append(b)
    if shape is None:
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise ValueError(f"cannot infer the image shape from n = {n}; pass shape=(H, W, C)")
        shape = (side, side, 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or int(np.prod(shape)) != n:
        raise ValueError(
            f"shape {shape} has {int(np.prod(shape))} elements but W is {n} x {n}; "
            "pass shape=(H, W, C) with H * W * C = n"
        )
    return (np.asarray(abs_, np.float32), np.stack(ws), np.stack(bs), shape)


@register("linear")
def make_linear(
    *, weights: Union[Weights, str, os.PathLike], shape=None, tolerance: Optional[float] = None
) -> Linear:
    """Affine denoisers from ``{ab: (W [n, n], b [n])}`` or a :func:`save_linear` file.

    ``shape`` (H, W, C) is read from a file; for a mapping it is required unless
    ``n`` is a perfect square, in which case ``(sqrt(n), sqrt(n), 1)`` is assumed.
    A call with ``ab`` uses the level nearest to it (module docstring).
    """
    if isinstance(weights, (str, os.PathLike)):
        weights, file_shape = load_linear(os.fspath(weights))
        if shape is not None and tuple(shape) != file_shape:
            raise ValueError(f"shape {tuple(shape)} disagrees with the file's {file_shape}")
        shape = file_shape
    ab, w, b, shape = _stack(weights, shape)
    if tolerance is not None and not float(tolerance) >= 0:
        raise ValueError(f"tolerance must be >= 0 or None; got {tolerance}")
    return Linear(
        ab_values=jnp.asarray(ab),
        weights=jnp.asarray(w),
        biases=jnp.asarray(b),
        shape=shape,
        tolerance=None if tolerance is None else float(tolerance),
    )
