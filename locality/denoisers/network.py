"""A trained eps-prediction network wrapped as a denoiser ``D(x_t, ab) -> x0_hat``.

The network was trained on integer timesteps of a discrete schedule (default
:func:`locality.schedules.ddpm_linear`), but denoisers receive ``ab`` (DESIGN.md, "Denoiser").
The wrapper maps ``ab`` to a continuous timestep by piecewise-linear interpolation of the
schedule's ``(ab_t, t)`` table: ``t(ab) = t_k + (ab_k - ab) / (ab_k - ab_{k+1})`` for
``ab_{k+1} <= ab <= ab_k``. When ``ab`` equals a schedule value ``ab_k`` the result is exactly the
integer ``k`` (the interpolation is exact at the nodes), so on the schedule's own grid the net is
called exactly as during training. ``ab`` above ``ab_0`` maps to ``t = 0`` and below ``ab_{T-1}``
to ``t = T - 1`` (clamped; the net never saw other times). The eps prediction is converted with
``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` (ALGORITHMS.md §1, :func:`schedules.x0_from_eps`),
using the requested ``ab`` itself.

Importing this module only registers the factory; orbax and the trainer are imported when a
checkpoint is actually loaded.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import schedules as schedules_lib
from locality.denoisers.registry import register


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
    """

    params: Any
    alphas_cumprod: jax.Array
    model: Any = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, model, params, schedule: Optional[schedules_lib.DiscreteSchedule] = None):
        schedule = schedule or schedules_lib.ddpm_linear()
        return cls(params=params, alphas_cumprod=jnp.asarray(schedule.alphas_cumprod, jnp.float32),
                   model=model)

    def timestep(self, ab):
        return timestep_from_ab(ab, self.alphas_cumprod)

    def eps(self, x_t, ab):
        """The network's eps prediction at noise level ``ab``: [B, H, W, C]."""
        t = jnp.broadcast_to(self.timestep(ab), (x_t.shape[0],))
        return self.model.apply({"params": self.params}, x_t, t, train=False)

    def __call__(self, x_t, ab):
        x_t = jnp.asarray(x_t, jnp.float32)
        ab = jnp.asarray(ab, jnp.float32)
        return schedules_lib.x0_from_eps(x_t, self.eps(x_t, ab), ab)


@register("network")
def make_network(*, checkpoint=None, use_ema: bool = True, step: Optional[int] = None,
                 schedule: Optional[schedules_lib.DiscreteSchedule] = None, model=None,
                 params=None) -> NetworkDenoiser:
    """A trained eps-network as a denoiser.

    Either ``checkpoint`` (a training workdir, its ``checkpoints/`` directory, or a directory
    written by :func:`locality.train.export_params`; the saved ``config.json`` rebuilds the model)
    with ``use_ema`` / ``step`` (default: latest), or an in-memory ``model`` (a flax module or a
    model-config dict) with its ``params``. ``schedule``: the discrete schedule the net was trained
    on (default ``ddpm_linear()``), used to map ``ab`` to a timestep.
    """
    from locality.nets import build_model

    if (checkpoint is None) == (model is None):
        raise ValueError("make('network', ...) needs exactly one of checkpoint=... or "
                         "model=... (with params=...)")
    if checkpoint is not None:
        if params is not None:
            raise ValueError("params=... is only used with model=...; a checkpoint holds its own")
        from locality.train import load_params

        model_config, params, _ = load_params(checkpoint, use_ema=use_ema, step=step)
        model = build_model(model_config)
    else:
        if params is None:
            raise ValueError("make('network', model=...) also needs params=...")
        if isinstance(model, dict):
            model = build_model(model)
        params = params["params"] if isinstance(params, dict) and set(params) == {"params"} \
            else params
    params = jax.tree.map(jnp.asarray, params)
    return NetworkDenoiser.create(model, params, schedule)
