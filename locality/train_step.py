"""The training state and the compiled, data-parallel DDPM step (docs/algorithms.md §1 and §11,
"Training").

Objective: the DDPM "simple" loss (Ho et al. 2020, eq. 14 / Algorithm 1)

    L = E_{x0, t ~ U{0..T-1}, eps ~ N(0, I)}
            || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t) ||^2

(mean over pixels and batch) on the linear schedule :func:`locality.schedules.ddpm_linear`.

- :class:`TrainState` -- ``step``, ``params``, ``ema_params``, ``opt_state`` (a pytree);
  :func:`create_train_state` builds a fresh one.
- :func:`diffusion_loss` -- the loss above on one batch, with label dropout for
  class-conditional nets (Ho & Salimans 2022, Algorithm 1).
- :func:`make_mesh`, :func:`make_train_step` -- the jitted, buffer-donating
  ``train_step(state, batch, rng)``, data-parallel over a ``jax.sharding.Mesh`` of all devices
  (batch sharded, state replicated; docs/architecture.md, "Randomness" for its keys).

All of them are re-exported by :mod:`locality.train`, whose loop runs the step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from locality import schedules as schedules_lib
from locality.nets import init_params
from locality.train_config import (
    TrainConfig,
    ema_decay_at,
    ema_update,
    learning_rate_schedule,
    make_optimizer,
)

__all__ = [
    "TrainState",
    "create_train_state",
    "diffusion_loss",
    "make_mesh",
    "make_train_step",
]


@flax.struct.dataclass
class TrainState:
    """Everything that evolves during training (a pytree; checkpointed as a whole).

    ``step`` int32 scalar = number of optimiser updates applied; ``params`` / ``ema_params`` the
    network weights and their exponential moving average; ``opt_state`` the optax state.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def create_train_state(model, cfg: TrainConfig, image_shape) -> TrainState:
    """Fresh state: params from ``seed`` (:func:`locality.nets.init_params`), EMA = params,
    optimiser initialised."""
    tx = make_optimizer(cfg)
    params = init_params(model, tuple(image_shape), seed=cfg.seed)

    @jax.jit
    def fresh(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
        )

    return fresh(params)


# ----------------------------------------------------------------------------------------------
# Loss and train step


def diffusion_loss(
    params, apply_fn, x0, rng, alphas_cumprod, y=None, label_dropout=0.0, num_classes=0
):
    """DDPM eps-MSE on a batch ``x0`` [B, H, W, C] (Ho et al. 2020, Algorithm 1).

    ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``; the net gets
    ``t`` as float. With labels ``y`` [B] (class-conditional net with ``num_classes`` classes),
    each label is replaced by "no label" (``num_classes``) with probability ``label_dropout``
    (Ho & Salimans 2022, Algorithm 1), drawn from ``fold_in(rng, 1)`` so that ``t`` and ``eps``
    are the same as for an unconditional net. Returns the scalar mean squared error.
    """
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    ab = alphas_cumprod[t][:, None, None, None]
    x_t = schedules_lib.add_noise(x0, eps, ab)
    kwargs = {}
    if y is not None:
        drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), label_dropout, (b,))
        kwargs["y"] = jnp.where(drop, num_classes, jnp.asarray(y, jnp.int32))
    pred = apply_fn(
        {"params": params},
        x_t,
        t.astype(jnp.float32),
        train=True,
        rngs={"dropout": k_drop},
        **kwargs,
    )
    return jnp.mean(jnp.square(pred - eps))


def make_mesh(devices=None) -> Mesh:
    """1-D data-parallel mesh ``("data",)`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def make_train_step(
    model,
    cfg: TrainConfig,
    mesh: Optional[Mesh] = None,
    schedule: Optional[schedules_lib.DiscreteSchedule] = None,
) -> Callable:
    """The jitted ``train_step(state, batch, rng) -> (state, metrics)``.

    ``rng`` is the run's base key; the step's key is ``fold_in(rng, state.step)``. ``batch``
    [B, H, W, C] (or ``(images, labels [B])`` for a class-conditional net) is sharded over the
    mesh axis ``"data"``; the state is replicated; the state argument is donated. ``metrics``:
    ``loss``, ``grad_norm`` (before clipping), ``lr``. Identical requests (same model, config,
    mesh and schedule) share one jitted function, so a resumed run in the same process reuses
    the compiled program.
    """
    mesh = mesh or make_mesh()
    schedule = schedule or schedules_lib.ddpm_linear()
    irrelevant = _STEP_IRRELEVANT + (
        () if cfg.cosine_decay else ("num_steps", "min_lr_ratio", "decay_start")
    )
    step_cfg = dataclasses.replace(cfg, **{f: getattr(TrainConfig, f) for f in irrelevant})
    return _make_train_step(model, step_cfg, mesh, schedule.name, schedule.alphas_cumprod.tobytes())


# TrainConfig fields that do not enter the compiled step.
_STEP_IRRELEVANT = (
    "dataset",
    "resolution",
    "data_limit",
    "random_flip",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "num_samples",
    "sample_steps",
    "progress",
    "seed",
    "sample_guidance",
    "init_from",
    "export_steps",
    "holdout",
    "eval_every",
    "eval_count",
)


@functools.lru_cache(maxsize=8)
def _make_train_step(
    model, cfg: TrainConfig, mesh: Mesh, schedule_name: str, alphas_cumprod_bytes: bytes
) -> Callable:
    del schedule_name
    alphas_cumprod = jnp.asarray(np.frombuffer(alphas_cumprod_bytes, np.float32))
    tx = make_optimizer(cfg)
    lr_fn = learning_rate_schedule(cfg)

    def step_fn(state: TrainState, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        x0, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        num_classes = getattr(model, "num_classes", 0)
        if (y is None) != (num_classes == 0):
            raise ValueError(
                f"a net with num_classes={num_classes} needs "
                f"{'(images, labels)' if num_classes else 'images only'} batches"
            )
        loss, grads = jax.value_and_grad(diffusion_loss)(
            state.params, model.apply, x0, key, alphas_cumprod, y, cfg.label_dropout, num_classes
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup)
        ema = ema_update(state.ema_params, params, decay)
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new, metrics

    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return jax.jit(
        step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,)
    )
