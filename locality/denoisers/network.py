"""A trained eps-prediction network wrapped as a denoiser ``D(x_t, ab) -> x0_hat``.

The network was trained on integer timesteps of a discrete schedule (default
:func:`locality.schedules.ddpm_linear`), but denoisers receive ``ab``
(docs/architecture.md, "Denoiser").
The wrapper maps ``ab`` to a continuous timestep by piecewise-linear interpolation of the
schedule's ``(ab_t, t)`` table: ``t(ab) = t_k + (ab_k - ab) / (ab_k - ab_{k+1})`` for
``ab_{k+1} <= ab <= ab_k``. When ``ab`` equals a schedule value ``ab_k`` the result is exactly the
integer ``k`` (the interpolation is exact at the nodes), so on the schedule's own grid the net is
called exactly as during training. ``ab`` above ``ab_0`` maps to ``t = 0`` and below ``ab_{T-1}``
to ``t = T - 1`` (clamped; the net never saw other times). The eps prediction is converted with
``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` (docs/algorithms.md §1, :func:`schedules.x0_from_eps`),
using the requested ``ab`` itself.

Queries are checked at the boundary like every other denoiser's (docs/architecture.md,
"Denoiser"; :func:`locality.denoisers.base.check_query`): rank 4, the image shape the net was
trained on (a checkpoint's ``image_shape``, or ``shape=`` for an in-memory net; an in-memory net
without ``shape`` accepts any H, W, C its layers accept), a floating dtype (cast to float32), a
scalar ``ab`` in ``(0, 1)`` and finite values (value checks only on concrete inputs, so the call
still works under ``jit`` / ``vmap``); an empty batch returns float32 zeros without running the
net.

Class-conditional nets (``num_classes > 0``, see :mod:`locality.nets.unet`) are called with "no
label" unless ``labels`` are given; with ``guidance = w != 0`` the eps is classifier-free guided,
``eps = (1 + w) eps(x, y) - w eps(x, no label)`` (Ho & Salimans 2022, eq. 6), both terms from one
forward pass over the doubled batch.

:func:`sample_images` draws DDIM samples from a net (the trainer's sample grids). Importing this
module registers the factory and reads nothing; checkpoints are read by
:func:`locality.checkpoints.load_params` when ``checkpoint=`` is given.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import sampling
from locality import schedules as schedules_lib
from locality.checkpoints import load_params
from locality.denoisers.base import check_query, empty_result
from locality.denoisers.registry import register
from locality.nets import build_model


def timestep_from_ab(ab, alphas_cumprod):
    """Continuous timestep for ``ab`` by linear interpolation of the schedule (module docstring).

    Args:
      ab: scalar or array of alpha-bar values.
      alphas_cumprod: [T] strictly decreasing schedule.
    Returns:
      float32 timesteps, same shape as ``ab``, in [0, T - 1].
    """
    abs_ = jnp.asarray(alphas_cumprod, jnp.float32)
    ts = jnp.arange(abs_.shape[0], dtype=jnp.float32)
    # jnp.interp needs increasing xp: reverse the (decreasing) schedule.
    return jnp.interp(jnp.asarray(ab, jnp.float32), abs_[::-1], ts[::-1])


@flax.struct.dataclass
class NetworkDenoiser:
    """Pytree denoiser: ``params`` and the schedule table are leaves (so samplers can pass it
    into ``jit`` as an argument), the flax module is static.

    ``denoise(x_t [B, H, W, C], ab scalar) -> x0_hat [B, H, W, C]``.

    ``labels`` (int32, scalar or [B]; a leaf) or ``cycle_labels`` (image ``i`` gets label
    ``i mod num_classes``) select the class of a conditional net; ``guidance`` is the
    classifier-free guidance weight (module docstring). ``shape`` (static): the image shape
    (H, W, C) queries must have, or ``None`` for any.
    """

    params: Any
    alphas_cumprod: jax.Array
    labels: Optional[jax.Array] = None
    model: Any = flax.struct.field(pytree_node=False, default=None)
    guidance: float = flax.struct.field(pytree_node=False, default=0.0)
    cycle_labels: bool = flax.struct.field(pytree_node=False, default=False)
    shape: Optional[Tuple[int, int, int]] = flax.struct.field(pytree_node=False, default=None)
    name = "network"

    @classmethod
    def create(
        cls,
        model,
        params,
        schedule: Optional[schedules_lib.DiscreteSchedule] = None,
        labels=None,
        guidance: float = 0.0,
        shape=None,
    ):
        """``labels``: ``None`` (no label), an int, a sequence of ints (one per image) or
        ``"cycle"``; ``guidance``: the guidance weight ``w`` (needs labels); ``shape``: the image
        shape (H, W, C) of the queries, or ``None`` for any."""
        schedule = schedule or schedules_lib.ddpm_linear()
        shape = _image_shape(shape)
        num_classes = int(getattr(model, "num_classes", 0))
        guidance = float(guidance)
        if not np.isfinite(guidance):
            raise ValueError(f"guidance must be finite, got {guidance}")
        cycle = isinstance(labels, str)
        if cycle and labels != "cycle":
            raise ValueError(
                f"labels must be None, an int, a list of ints or 'cycle', got {labels!r}"
            )
        if labels is not None and num_classes == 0:
            raise ValueError(
                f"labels={labels!r} were given for an unconditional network "
                "(num_classes=0); drop labels, or load a class-conditional checkpoint"
            )
        if labels is None and guidance != 0.0:
            raise ValueError(
                f"guidance={guidance} needs labels (an int, a list, or 'cycle'): it "
                "extrapolates from the unconditional towards the conditional eps"
            )
        if labels is not None and not cycle:
            arr = np.asarray(labels)
            if (
                arr.ndim > 1
                or not np.issubdtype(arr.dtype, np.integer)
                or (arr.size and (arr.min() < 0 or arr.max() >= num_classes))
            ):
                raise ValueError(
                    f"labels must be ints in [0, {num_classes}) (scalar or one per "
                    f"image), got {labels!r}"
                )
            labels = jnp.asarray(arr, jnp.int32)
        else:
            labels = None
        return cls(
            params=params,
            alphas_cumprod=jnp.asarray(schedule.alphas_cumprod, jnp.float32),
            labels=labels,
            model=model,
            guidance=guidance,
            cycle_labels=cycle,
            shape=shape,
        )

    def timestep(self, ab):
        return timestep_from_ab(ab, self.alphas_cumprod)

    def eps(self, x_t, ab):
        """The network's (guided) eps prediction at noise level ``ab``: [B, H, W, C]."""
        b = x_t.shape[0]
        t = jnp.broadcast_to(self.timestep(ab), (b,))
        apply = lambda x, t, **kw: self.model.apply(
            {"params": self.params}, x, t, train=False, **kw
        )
        if self.labels is None and not self.cycle_labels:
            return apply(x_t, t)
        num_classes = self.model.num_classes
        y = (
            jnp.arange(b, dtype=jnp.int32) % num_classes
            if self.cycle_labels
            else jnp.broadcast_to(self.labels, (b,))
        )
        if self.guidance == 0.0:
            return apply(x_t, t, y=y)
        both = apply(
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            y=jnp.concatenate([y, jnp.full((b,), num_classes, jnp.int32)]),
        )
        eps_c, eps_u = both[:b], both[b:]
        return (1.0 + self.guidance) * eps_c - self.guidance * eps_u

    def __call__(self, x_t, ab):
        """``x0_hat`` [B, H, W, C] float32 after the boundary checks (module docstring)."""
        x_t = jnp.asarray(x_t)
        shape = self.shape if self.shape is not None else tuple(x_t.shape[1:])
        x_t, ab = check_query(x_t, ab, shape, self.name)
        if x_t.shape[0] == 0:
            return empty_result(x_t)
        return schedules_lib.x0_from_eps(x_t, self.eps(x_t, ab), ab)


def _image_shape(shape) -> Optional[Tuple[int, int, int]]:
    """``None`` or ``(H, W, C)`` as a tuple of three positive ints."""
    if shape is None:
        return None
    try:
        out = tuple(int(s) for s in shape)
        ok = len(out) == 3 and all(s >= 1 and s == v for s, v in zip(out, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"network: shape must be the image shape (H, W, C), three positive ints, got "
            f"{shape!r}; e.g. shape=(28, 28, 1)"
        )
    return out


@register("network")
def make_network(
    *,
    checkpoint=None,
    use_ema: bool = True,
    step: Optional[int] = None,
    schedule: Optional[schedules_lib.DiscreteSchedule] = None,
    model=None,
    params=None,
    labels=None,
    guidance: float = 0.0,
    shape=None,
) -> NetworkDenoiser:
    """A trained eps-network as a denoiser.

    Either ``checkpoint`` (a training workdir, its ``checkpoints/`` directory, or a directory
    written by :func:`locality.checkpoints.export_params`; the saved ``config.json`` rebuilds the
    model) with ``use_ema`` / ``step`` (default: latest), or an in-memory ``model`` (a flax module
    or a model-config dict) with its ``params``. ``schedule``: the discrete schedule the net was
    trained on (default ``ddpm_linear()``), used to map ``ab`` to a timestep. ``labels`` /
    ``guidance``: class and classifier-free guidance weight for a class-conditional net
    (``labels``: an int, a list with one int per image, or ``"cycle"`` for image ``i`` -> class
    ``i mod num_classes``; see :class:`NetworkDenoiser`). ``shape``: the image shape (H, W, C)
    that queries must have; a checkpoint's own ``image_shape`` by default (another value is an
    error), for ``model=`` no check of H, W, C unless given.
    """
    if (checkpoint is None) == (model is None):
        raise ValueError(
            "make('network', ...) needs exactly one of checkpoint=... or "
            "model=... (with params=...)"
        )
    if checkpoint is not None:
        if params is not None:
            raise ValueError("params=... is only used with model=...; a checkpoint holds its own")
        model_config, params, meta = load_params(checkpoint, use_ema=use_ema, step=step)
        model = build_model(model_config)
        trained = _image_shape(meta["image_shape"])
        if shape is not None and _image_shape(shape) != trained:
            raise ValueError(
                f"network: shape={tuple(shape)} but the checkpoint {checkpoint} was trained on "
                f"images of shape {trained}; drop shape=... (the checkpoint's is used)"
            )
        shape = trained
    else:
        if params is None:
            raise ValueError("make('network', model=...) also needs params=...")
        if isinstance(model, dict):
            model = build_model(model)
        params = (
            params["params"] if isinstance(params, dict) and set(params) == {"params"} else params
        )
    params = jax.tree.map(jnp.asarray, params)
    return NetworkDenoiser.create(
        model, params, schedule, labels=labels, guidance=guidance, shape=shape
    )


def sample_images(
    model,
    params,
    x_T,
    num_steps: int = 10,
    schedule: Optional[schedules_lib.DiscreteSchedule] = None,
    guidance: float = 0.0,
) -> np.ndarray:
    """Deterministic DDIM (docs/algorithms.md §1, via :func:`locality.sampling.ddim`) with the
    network wrapped as a denoiser; returns the final images [B, H, W, C]. A class-conditional
    net samples image ``i`` from class ``i mod num_classes`` with guidance weight ``guidance``."""
    schedule = schedule or schedules_lib.ddpm_linear()
    labels = "cycle" if getattr(model, "num_classes", 0) else None
    denoise = NetworkDenoiser.create(
        model, params, schedule, labels=labels, guidance=guidance if labels else 0.0
    )
    return np.asarray(sampling.ddim(denoise, x_T, schedule, num_steps=num_steps).images)
