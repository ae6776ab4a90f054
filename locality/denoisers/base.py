"""Shared pieces of every denoiser: the callable pytree base class and boundary checks.

A denoiser is a ``flax.struct.dataclass`` whose array fields are its fitted state (pytree leaves)
and whose static fields are hyper-parameters. Calling it, ``den(x_t, ab)``, runs one jitted
function; because the denoiser is a pytree *argument* of that function (not a closure), large
training sets are never baked into compiled programs as constants, a sampler can pass the whole
denoiser through ``jax.jit``/``lax.scan``, and a new ``ab`` never retraces (``ab`` is a traced
float32 scalar).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.stats import validate_images

HIGHEST = jax.lax.Precision.HIGHEST


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_query(x_t, ab, shape: Tuple[int, int, int], name: str):
    """Validate ``x_t`` [B, H, W, C] and ``ab`` at the boundary; returns float32 arrays.

    Checks that need values (NaN/inf, the range of ``ab``) run only on concrete inputs, so the
    same function still works under ``jit`` and ``vmap``.
    """
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 4:
        raise ValueError(
            f"{name}: x_t must have rank 4 [B, H, W, C]; got shape {x_t.shape}. "
            "Add a batch axis with x[None]."
        )
    if tuple(x_t.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name}: x_t has image shape {tuple(x_t.shape[1:])} but the denoiser was "
            f"fitted on images of shape {tuple(shape)}; resize the queries or refit "
            "on data of this resolution"
        )
    if x_t.dtype != jnp.float32:
        if not jnp.issubdtype(x_t.dtype, jnp.floating):
            raise TypeError(f"{name}: x_t has dtype {x_t.dtype}; expected float32")
        x_t = x_t.astype(jnp.float32)
    ab = jnp.asarray(ab, jnp.float32)
    if ab.ndim != 0:
        raise ValueError(
            f"{name}: ab must be a scalar (one noise level per call); got shape "
            f"{ab.shape}. vmap over the call for several levels."
        )
    if not _is_tracer(ab):
        v = float(ab)
        if not 0.0 < v < 1.0:
            raise ValueError(
                f"{name}: ab = {v} is outside (0, 1); alpha-bar of a noisy state must "
                "satisfy 0 < ab < 1"
            )
    if not _is_tracer(x_t):
        if not bool(jnp.all(jnp.isfinite(x_t))):
            raise ValueError(f"{name}: x_t contains NaN or inf")
    return x_t, ab


def empty_result(x_t):
    """The estimate for an empty batch ``x_t`` [0, H, W, C]: float32 zeros of the same shape."""
    return jnp.zeros(x_t.shape, jnp.float32)


@jax.jit
def _apply(den, x_t, ab):
    return den.apply(x_t, ab)


class DenoiserBase:
    """Mixin: ``__call__`` validates and dispatches to the jitted ``apply(x_t, ab)``.

    Subclasses are ``flax.struct.dataclass``es with a static ``shape`` field (H, W, C).
    ``__call__`` is the shared boundary: :func:`check_query`, then an empty batch
    ``[0, H, W, C]`` returns an empty float32 result (:func:`empty_result`) without running the
    method (the batch size is static, so this holds under ``jit`` and ``vmap`` too), else
    ``_dispatch``. A subclass that runs differently overrides ``_dispatch`` (``SizedDenoiser``);
    one that adds checks overrides ``__call__`` and ends in ``super().__call__`` (``Linear``).
    """

    name = "denoiser"

    def __call__(self, x_t, ab):
        x_t, ab = check_query(x_t, ab, self.shape, self.name)
        if x_t.shape[0] == 0:
            return empty_result(x_t)
        return self._dispatch(x_t, ab)

    def _dispatch(self, x_t, ab):
        """Run the method on a validated, non-empty batch (default: the jitted ``apply``)."""
        return _apply(self, x_t, ab)

    def apply(self, x_t, ab):  # pragma: no cover - abstract
        raise NotImplementedError


def as_train_array(train, what: str = "train") -> np.ndarray:
    """Validate a training set [N, H, W, C] in [-1, 1] and return it as float32 numpy."""
    return validate_images(train, what=what)


def resolve_mesh(mesh=None, shard: bool = False) -> Optional[jax.sharding.Mesh]:
    """``mesh`` if given; a mesh over all devices if ``shard``; else None (no sharding)."""
    if mesh is not None:
        if streaming.DATA_AXIS not in mesh.axis_names:
            raise ValueError(
                f"mesh axes {mesh.axis_names} lack the axis {streaming.DATA_AXIS!r}; "
                "build it with locality.streaming.data_mesh()"
            )
        return mesh
    if shard:
        return streaming.data_mesh()
    return None


def chunk_train(train_flat, chunk_size: int, mesh, extra=None):
    """Chunk (and shard) ``(train_flat [N, n], ||x||^2 [N])`` for streaming."""
    x = jnp.asarray(train_flat, jnp.float32)
    data = (x, jnp.sum(jnp.square(x), axis=1)) if extra is None else (x,) + tuple(extra)
    n_shards = 1 if mesh is None else mesh.shape[streaming.DATA_AXIS]
    chunked = streaming.chunk(data, chunk_size, num_shards=n_shards)
    if mesh is not None:
        chunked = streaming.shard_chunked(chunked, mesh)
    return chunked
