"""Flax networks: the paper's DDPM UNet (``unet.py``) and a DiT (``dit.py``).

Both predict eps with the call ``model.apply(params, x [B,H,W,C], t [B], train=bool, rngs=...)``;
with ``num_classes=K > 0`` they are class-conditional and also take ``y=[B] int labels`` (``K`` or
``None`` = no label).
A network is described by a plain JSON-able dict (saved next to checkpoints)::

    {"arch": "unet", "ch": 64, "ch_mult": [1, 2, 2], ...}     # any UNet attribute
    {"arch": "dit", "size": "tiny", "patch_size": 2, ...}     # a DiT size plus overrides

and built with :func:`build_model`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from locality.nets.dit import SIZES as DIT_SIZES
from locality.nets.dit import DiT
from locality.nets.unet import UNet

ARCHS = ("unet", "dit")


def _tuplify(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def build_model(model_config: Mapping[str, Any]):
    """Build a network from a dict ``{"arch": "unet" | "dit", **attributes}``.

    For ``dit`` the key ``size`` (``tiny`` | ``mini`` | ``small``) fills ``hidden``, ``depth``,
    ``num_heads``; explicit keys override it. Unknown keys raise ``ValueError``.
    """
    cfg = dict(model_config)
    arch = cfg.pop("arch", None)
    if arch == "unet":
        cls = UNet
    elif arch == "dit":
        cls = DiT
        size = cfg.pop("size", None)
        if size is not None:
            if size not in DIT_SIZES:
                raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
            cfg = {**DIT_SIZES[size], **cfg}
    else:
        raise ValueError(f"model arch must be one of {ARCHS}, got {arch!r}")
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"unknown {arch} option(s) {unknown}; valid: {sorted(fields)}")
    return cls(**{k: _tuplify(v) for k, v in cfg.items()})


def init_params(model, image_shape, seed: int = 0):
    """Initialise ``params`` for images of shape ``(H, W, C)`` (batch of 1, t = 0).

    The initialisers draw from ``jax.random.key(seed, impl="rbg")`` (XLA's RngBitGenerator):
    deterministic for a seed, and the init program compiles about 4x faster on CPU than with the
    default threefry keys (one threefry expansion per weight tensor dominates otherwise).
    """
    x = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
    t = jax.numpy.zeros((1,), jax.numpy.float32)
    init = jax.jit(lambda key: model.init({"params": key}, x, t, train=False)["params"])
    return init(jax.random.key(seed, impl="rbg"))


def abstract_params(model, image_shape):
    """Shapes/dtypes of ``params`` (``jax.ShapeDtypeStruct`` pytree) without computing them."""
    return jax.eval_shape(lambda: init_params(model, image_shape))


def count_params(params) -> int:
    """Total number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


__all__ = [
    "UNet",
    "DiT",
    "DIT_SIZES",
    "ARCHS",
    "build_model",
    "init_params",
    "abstract_params",
    "count_params",
]
