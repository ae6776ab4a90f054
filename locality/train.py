"""Trainer for the eps-prediction networks (docs/algorithms.md §1 and §11).

Objective: the DDPM "simple" loss (Ho et al. 2020, eq. 14 / Algorithm 1)

    L = E_{x0, t ~ U{0..T-1}, eps ~ N(0, I)}
            || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t) ||^2

(mean over pixels and batch) on the linear schedule :func:`locality.schedules.ddpm_linear`.

Pieces:

- :class:`TrainConfig` -- typed hyper-parameters (the entry point converts its ConfigDict).
- :class:`TrainState` -- ``step``, ``params``, ``ema_params``, ``opt_state`` (a pytree).
- :func:`make_optimizer` -- grad-norm clipping + AdamW (Loshchilov & Hutter 2019) with linear
  warmup and optional cosine decay.
- :func:`make_train_step` -- the jitted, buffer-donating ``train_step(state, batch, rng)``,
  data-parallel over a ``jax.sharding.Mesh`` of all devices (batch sharded, state replicated).
- :func:`batch_at` -- the deterministic input pipeline: the batch at step ``s`` is a pure function
  of ``(seed, s)`` (epoch permutation from ``(seed, epoch)``), so a resumed run sees exactly the
  batches an uninterrupted one would.
- :func:`check_resumable` -- which changes of the training settings a resumed run may make.
- :func:`train` -- the loop: resume from the latest checkpoint, log ``metrics.jsonl``, show a
  tqdm bar, write a DDIM-10 sample grid (:func:`locality.denoisers.network.sample_images`) and
  the loss curve (:mod:`locality.plotting`) at every checkpoint.

Checkpoints (:class:`locality.checkpoints.Checkpoints`: orbax ``CheckpointManager`` plus a
self-describing ``config.json``; :func:`~locality.checkpoints.load_params` /
:func:`~locality.checkpoints.export_params` for inference) live in :mod:`locality.checkpoints`;
their names are re-exported here.

Determinism: the step's key is ``fold_in(PRNGKey(seed), step)`` (inside ``train_step``) and the
data order is a function of ``(seed, epoch)``; therefore a run killed after any checkpoint and
restarted continues bit-identically to an uninterrupted run on the same device layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from locality import data, plotting, quality
from locality import schedules as schedules_lib
from locality._io import atomic_write_text, jsonable
from locality.checkpoints import (
    CHECKPOINT_SUBDIR,
    CONFIG_FILE,
    EXPORT_SUBDIR,
    FORMAT_VERSION,
    CheckpointError,
    Checkpoints,
    export_workdir,
    load_params,
    merge_params,
    read_log,
)

# Re-exported (``X as X``) so that ``from locality.train import ...`` keeps working after the move
# to locality.checkpoints; ``sample_images`` now lives in locality.denoisers.network.
from locality.checkpoints import export_params as export_params
from locality.checkpoints import read_checkpoint_config as read_checkpoint_config
from locality.checkpoints import resolve_checkpoint_dir as resolve_checkpoint_dir
from locality.checkpoints import summary_from_log as summary_from_log
from locality.classify import balanced_split
from locality.data import transforms
from locality.denoisers.network import sample_images
from locality.nets import build_model, count_params, init_params

# TrainConfig fields that may change between a run and its resumption without affecting the
# trajectory of the steps already taken.
_RESUMABLE_FIELDS = (
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "num_samples",
    "sample_steps",
    "sample_guidance",
    "progress",
    "init_from",
    "export_steps",
    "eval_every",
    "eval_count",
)
# TrainConfig fields that only shape the learning-rate schedule: they may change on resumption
# when the new schedule gives the same learning rate at every step already taken (e.g. extending
# a constant-lr run, or appending a cosine anneal with ``decay_start`` = the steps taken).
_SCHEDULE_FIELDS = (
    "num_steps",
    "lr",
    "warmup_steps",
    "cosine_decay",
    "min_lr_ratio",
    "decay_start",
)


# ----------------------------------------------------------------------------------------------
# Configuration and state


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the model is described separately by a dict, see
    :func:`locality.nets.build_model`).

    Attributes:
      dataset / resolution / data_limit: arguments of ``locality.data.load``.
      batch_size: global batch (split over devices; must be divisible by the device count).
      num_steps: total optimiser steps.
      lr, warmup_steps, cosine_decay, min_lr_ratio: peak learning rate, linear warmup from 0, and
        optionally cosine decay from the end of warmup to ``min_lr_ratio * lr`` at ``num_steps``.
      decay_start: with ``cosine_decay``, the step where the decay starts (default: the end of
        warmup); setting it to the step count of a constant-lr run appends an annealing phase
        that resumes that run (the learning rate of every step already taken is unchanged).
      weight_decay: decoupled AdamW decay on weights with ndim > 1 (not biases / norms).
      b1, b2, adam_eps: Adam moments.
      grad_clip: global-norm clipping threshold (``<= 0`` disables).
      ema_decay: EMA decay ``d``; with ``ema_warmup`` the decay at step ``s`` is
        ``min(d, (1 + s) / (10 + s))`` (the warmup of Tarvainen & Valpola 2017 / tf.train EMA).
      seed: the one seed (init, per-step keys, data order, flips, sample noise).
      random_flip: random horizontal flips (per image, from ``(seed, step)``).
      transform: a :mod:`locality.data.transforms` spec applied to the training images once,
        before training (``"link:SR,SC,DR,DC,K"``, ``"permute:SEED"``; ``""`` = none).
      checkpoint_every, keep_checkpoints: save every K steps (and at the end), keep N.
      log_every: steps between ``metrics.jsonl`` lines.
      export_steps: steps at which the run also writes a checkpoint and exports its EMA weights
        to ``workdir/exports/step_<S>`` (:func:`locality.checkpoints.export_workdir`), kept whatever
        ``keep_checkpoints`` deletes later: the intermediate networks of a long run (e.g. after
        1, 5, 10 and 20 epochs) for studies of how a net changes as it learns.
      num_samples, sample_steps: the DDIM sample grid written at every checkpoint (0 disables).
      sample_guidance: for a class-conditional net, the classifier-free guidance weight ``w`` of
        that grid (its labels cycle through the classes; 0 = plain conditional sampling).
      label_dropout: for a class-conditional net (model ``num_classes > 0``), the probability that
        a training label is replaced by "no label", so that one net learns the conditional and
        the unconditional eps (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1,
        their ``p_uncond``; 0.1-0.2 there). Unused for unconditional nets.
      label_lr_mult: learning-rate multiplier for the label embedding alone. A label table added
        to a trained unconditional net (``init_from``) learns slowly at the net's rate: the
        class signal in each gradient is weak against the noise of the eps targets, so a new
        layer gets a larger rate, as usual when fine-tuning with a new head.
      init_from: start a fresh run from the EMA weights of another checkpoint (a training workdir
        or an export) instead of random weights: every weight of this model that the checkpoint
        holds must have the same shape there; weights it lacks (e.g. the label embedding when an
        unconditional net is made conditional) keep their initial values. Ignored when resuming.
      holdout: a class-balanced fraction of the training split held out of training (by
        :func:`locality.classify.balanced_split` with ``seed``) for the held-out loss, for
        datasets without a test split (``mnist``); 0 = train on all of it.
      eval_every, eval_count: every ``eval_every`` steps (and at the end; 0 = never) the EMA
        net's eps-MSE on ``eval_count`` held-out images (the held-out part, else the test
        split) at the timesteps of :data:`locality.quality.HELDOUT_TIMESTEPS`, with the same
        noise each time, is appended to ``eval.jsonl``: the curve that says when training has
        flattened.
      progress: show a tqdm bar.
    """

    dataset: str = "fashion_mnist"
    resolution: Optional[int] = None
    data_limit: Optional[int] = None
    batch_size: int = 128
    num_steps: int = 10_000
    lr: float = 2e-4
    warmup_steps: int = 1000
    cosine_decay: bool = False
    min_lr_ratio: float = 0.0
    decay_start: Optional[int] = None
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    seed: int = 0
    random_flip: bool = False
    transform: str = ""
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    num_samples: int = 64
    sample_steps: int = 10
    sample_guidance: float = 0.0
    label_dropout: float = 0.1
    label_lr_mult: float = 1.0
    init_from: Optional[str] = None
    export_steps: tuple = ()
    holdout: float = 0.0
    eval_every: int = 0
    eval_count: int = 1000
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "export_steps", tuple(int(s) for s in self.export_steps))
        if any(s < 1 for s in self.export_steps):
            raise ValueError(
                f"TrainConfig.export_steps must be steps >= 1, got {self.export_steps}"
            )
        for name in (
            "batch_size",
            "num_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"TrainConfig.holdout must be in [0, 1), got {self.holdout}")
        if self.eval_every < 0 or self.eval_count < 1:
            raise ValueError(
                f"need eval_every >= 0 and eval_count >= 1, got {self.eval_every}, "
                f"{self.eval_count}"
            )
        if not self.label_lr_mult > 0:
            raise ValueError(f"TrainConfig.label_lr_mult must be > 0, got {self.label_lr_mult}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(
                f"TrainConfig.label_dropout must be in [0, 1], got {self.label_dropout}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        transforms.parse(self.transform)  # a bad spec fails here, before any data is read
        if self.transform and self.random_flip:
            raise ValueError(
                f"transform={self.transform!r} fixes pixel positions, which random "
                "flips would break; set random_flip=False"
            )
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(
                f"need lr > 0 and warmup_steps >= 0, got {self.lr}, {self.warmup_steps}"
            )
        if self.decay_start is not None:
            if not self.cosine_decay:
                raise ValueError(f"decay_start={self.decay_start} needs cosine_decay=True")
            if not self.warmup_steps <= self.decay_start < self.num_steps:
                raise ValueError(
                    f"decay_start={self.decay_start} must lie in [warmup_steps, num_steps) = "
                    f"[{self.warmup_steps}, {self.num_steps}); raise num_steps to anneal after it"
                )


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


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup ``lr * s / warmup``, then constant or a cosine decay from ``decay_start``
    (default: the end of warmup) to ``min_lr_ratio * lr`` at ``num_steps`` (Loshchilov & Hutter
    2017, SGDR, without restarts). The ratio is written ``1 - (1 - m) (1 - cos(pi f)) / 2`` so that
    it is exactly 1 before the decay starts: an annealing phase appended to a constant-lr run
    leaves the learning rate of the steps already taken bit-identical."""
    warm = max(cfg.warmup_steps, 1)
    start = cfg.warmup_steps if cfg.decay_start is None else cfg.decay_start

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = cfg.lr * jnp.minimum(step / warm, 1.0) if cfg.warmup_steps else cfg.lr
        if not cfg.cosine_decay:
            return jnp.asarray(warmup, jnp.float32)
        span = max(cfg.num_steps - start, 1)
        frac = jnp.clip((step - start) / span, 0.0, 1.0)
        ratio = 1.0 - (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 - jnp.cos(jnp.pi * frac))
        return jnp.where(step < cfg.warmup_steps, warmup, cfg.lr * ratio).astype(jnp.float32)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` then AdamW with :func:`learning_rate_schedule`; with
    ``label_lr_mult != 1`` the label embedding (top-level ``label_embed``) gets its own AdamW at
    that multiple of the schedule (``optax.multi_transform``)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    schedule = learning_rate_schedule(cfg)

    def make_adamw(mult=1.0):
        lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
        return optax.adamw(
            lr,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )

    adamw = make_adamw()
    if cfg.label_lr_mult != 1.0:
        group = lambda params: {
            k: jax.tree.map(lambda _: "label" if k == "label_embed" else "rest", v)  # noqa: B023
            for k, v in params.items()
        }
        adamw = optax.multi_transform(
            {"label": make_adamw(cfg.label_lr_mult), "rest": adamw}, group
        )
    if cfg.grad_clip and cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def ema_decay_at(step, decay: float, warmup: bool):
    """EMA decay used for the update that produces step ``step + 1`` (see :class:`TrainConfig`)."""
    if not warmup:
        return jnp.float32(decay)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    """``ema <- decay * ema + (1 - decay) * params``, leaf-wise."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


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


# ----------------------------------------------------------------------------------------------
# Deterministic input pipeline


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training images in ``epoch``: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs of ``n // batch_size`` full batches (the last
    partial batch of an epoch is dropped), each epoch a fresh permutation."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the number of training images {n}")
    epoch, i = divmod(int(step), per_epoch)
    return epoch_permutation(seed, epoch, n)[i * batch_size : (i + 1) * batch_size]


class BatchSource:
    """``images`` [N, H, W, C] in memory -> the batch at any step (caches the current epoch's
    permutation). Flips (if enabled) are drawn from ``(seed, step)``. With ``labels`` [N],
    :meth:`labels_at` gives the labels of the same batch."""

    def __init__(
        self,
        images: np.ndarray,
        batch_size: int,
        seed: int,
        random_flip: bool = False,
        labels: Optional[np.ndarray] = None,
    ):
        self.images = np.asarray(images, np.float32)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape [N] = [{self.images.shape[0]}], got {self.labels.shape}"
            )
        self.batch_size, self.seed, self.random_flip = batch_size, seed, random_flip
        self.n = self.images.shape[0]
        self.per_epoch = self.n // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"batch_size={batch_size} exceeds the number of images {self.n}")
        self._epoch, self._perm = None, None

    def _indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.n)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def labels_at(self, step: int) -> np.ndarray:
        """int32 [B]: the labels of the images of ``self(step)``."""
        if self.labels is None:
            raise ValueError("this BatchSource was built without labels")
        return self.labels[self._indices(step)]

    def __call__(self, step: int) -> np.ndarray:
        idx = self._indices(step)
        batch = self.images[idx]
        if self.random_flip:
            flip = np.random.default_rng([int(self.seed), int(step), 0xF11F]).random(len(idx)) < 0.5
            batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        return batch


def batch_at(
    images: np.ndarray, seed: int, step: int, batch_size: int, random_flip: bool = False
) -> np.ndarray:
    """Functional form of :class:`BatchSource`: the batch [B, H, W, C] seen at ``step``."""
    return BatchSource(images, batch_size, seed, random_flip)(step)


# ----------------------------------------------------------------------------------------------
# Resuming and initialising from checkpoints


def check_resumable(path: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a run stored with the ``config.json`` ``old`` (at ``path``) may resume with the
    training settings of ``new`` (the ``check_train`` of :class:`locality.checkpoints.Checkpoints`).

    Raises :class:`CheckpointError` when a field outside ``_RESUMABLE_FIELDS`` and
    ``_SCHEDULE_FIELDS`` differs, or when the new learning-rate schedule changes the rate of a
    step already taken. Returns True when the stored settings are to be replaced by the new ones
    (a changed schedule other than a longer constant-lr run).
    """
    # A field missing from the stored settings was added to TrainConfig after that run was
    # written; the run used what is now its default.
    defaults = jsonable({f.name: f.default for f in dataclasses.fields(TrainConfig)})
    old_train = {**defaults, **old.get("train", {})}
    new_train = {**defaults, **new.get("train", {})}
    diff = sorted(
        k
        for k in set(old_train) | set(new_train)
        if k not in _RESUMABLE_FIELDS + _SCHEDULE_FIELDS and old_train.get(k) != new_train.get(k)
    )
    if diff:
        raise CheckpointError(
            f"{path} was written with different training settings {diff} "
            f"(stored {[old_train.get(k) for k in diff]}, requested "
            f"{[new_train.get(k) for k in diff]}); resuming would not reproduce the run. "
            f"Fix: use a fresh --workdir, or rerun with the stored settings."
        )
    changed = sorted(k for k in _SCHEDULE_FIELDS if old_train.get(k) != new_train.get(k))
    if not changed:
        return False
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    old_cfg = TrainConfig(**{k: v for k, v in old_train.items() if k in fields})
    new_cfg = TrainConfig(**{k: v for k, v in new_train.items() if k in fields})
    done = max([int(p.name) for p in Path(path).parent.iterdir() if p.name.isdigit()], default=0)
    steps = jnp.arange(done)
    lr_old = np.asarray(learning_rate_schedule(old_cfg)(steps))
    lr_new = np.asarray(learning_rate_schedule(new_cfg)(steps))
    bad = np.flatnonzero(lr_old != lr_new)
    if bad.size:
        s = int(bad[0])
        raise CheckpointError(
            f"{path} was written with learning-rate settings {changed} = "
            f"{[old_train.get(k) for k in changed]}; the requested "
            f"{[new_train.get(k) for k in changed]} change the learning rate of step {s} "
            f"({lr_old[s]:.6g} -> {lr_new[s]:.6g}), one of the {done} steps already taken, "
            f"so resuming would not reproduce the run. Fix: keep the stored settings, or "
            f"anneal from here with --config.train.cosine_decay=True "
            f"--config.train.decay_start={done} and a larger num_steps, or use a fresh "
            f"--workdir."
        )
    return any(k != "num_steps" for k in changed) or new_cfg.cosine_decay


def _init_from(state: TrainState, cfg: TrainConfig, checkpoint) -> TrainState:
    """A step-0 state whose params and EMA are the EMA weights of ``checkpoint`` merged into the
    fresh ``state`` (:func:`locality.checkpoints.merge_params`), with a fresh optimiser state."""
    _, loaded, _ = load_params(checkpoint, use_ema=True)  # shapes as stored there
    params, new = merge_params(jax.device_get(state.params), loaded, f"init_from={checkpoint}")
    logging.info("initialised from %s; weights not in it (kept at init): %s", checkpoint, new)
    tx = make_optimizer(cfg)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
    )


# ----------------------------------------------------------------------------------------------
# The loop


def train(
    model_config: Mapping[str, Any],
    cfg: TrainConfig,
    workdir,
    *,
    images: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    eval_images: Optional[np.ndarray] = None,
    on_step: Optional[Callable[[int], None]] = None,
    time_limit_s: Optional[float] = None,
) -> tuple[TrainState, dict]:
    """Train (or resume training) the network ``model_config`` with ``cfg`` in ``workdir``.

    Args:
      model_config: ``{"arch": ..., ...}`` (see :func:`locality.nets.build_model`).
      cfg: hyper-parameters.
      workdir: run directory: ``config.json`` (resolved), ``checkpoints/``, ``metrics.jsonl``,
        ``metrics.json`` (final summary), ``loss.png``, ``samples_<step>.png``, ``summary.txt``.
      images: training images [N, H, W, C] in [-1, 1]; default ``locality.data.load(cfg.dataset,
        "train", resolution=cfg.resolution, limit=cfg.data_limit)``.
      labels: int labels [N] of ``images``, for a class-conditional net (model ``num_classes >
        0``) only; default: the dataset's labels.
      eval_images: held-out images for ``cfg.eval_every`` (default: the ``cfg.holdout`` part of
        the training split, else the dataset's test split).
      on_step: called with the completed step count after every step (and after any checkpoint
        of that step was written).
      time_limit_s: stop after the first step that ends more than this many seconds after the
        loop started (compilation included), writing a checkpoint, a log line and the sample grid
        at that step; ``summary["steps"]`` is then the step reached, and rerunning with the same
        ``workdir`` continues towards ``cfg.num_steps``. With the constant learning rate
        (``cosine_decay=False``) nothing else depends on ``num_steps``, so the stopped run equals a
        run with ``num_steps`` set to the step reached. ``None``: no limit.
    Returns:
      ``(state, summary)``.
    """
    if time_limit_s is not None and time_limit_s < 0:
        raise ValueError(f"time_limit_s must be >= 0 or None, got {time_limit_s}")
    workdir = Path(workdir)
    model_config = jsonable(dict(model_config))
    if not model_config.get("num_classes"):
        # Unconditional: stored exactly as before the option existed, so old runs still resume.
        model_config.pop("num_classes", None)
    num_classes = int(model_config.get("num_classes", 0))
    if labels is not None and not num_classes:
        raise ValueError(
            "labels were given for an unconditional model; set the model's "
            "num_classes to make it class-conditional, or drop the labels"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if images is None:
        need_labels = bool(num_classes) or cfg.holdout > 0
        loaded = data.load(
            cfg.dataset,
            split="train",
            resolution=cfg.resolution,
            limit=cfg.data_limit,
            with_labels=need_labels,
        )
        images, labels = loaded if need_labels else (loaded, None)
        if cfg.holdout > 0:
            keep, held = balanced_split(labels, cfg.holdout, cfg.seed)
            if eval_images is None:
                eval_images = images[held]
            images, labels = images[keep], labels[keep]
        if not num_classes:
            labels = None
        if cfg.eval_every and eval_images is None:
            if "test" not in data.info(cfg.dataset).get("splits", {}):
                raise ValueError(
                    f"{cfg.dataset} has no test split for the held-out loss "
                    f"(eval_every={cfg.eval_every}); set holdout=0.1 to hold out a "
                    "class-balanced part of the training split, or eval_every=0"
                )
            eval_images = data.load(
                cfg.dataset, split="test", resolution=cfg.resolution, limit=cfg.eval_count
            )
    elif cfg.holdout > 0:
        raise ValueError(
            "holdout applies to the dataset train() loads; with explicit images, "
            "pass eval_images instead and set holdout=0"
        )
    elif num_classes and labels is None:
        raise ValueError(
            f"a class-conditional model (num_classes={num_classes}) needs the labels "
            "of the given images: pass labels=[N] ints"
        )
    if num_classes:
        labels = np.asarray(labels)
        ok = (
            labels.shape == (len(images),)
            and labels.size > 0
            and np.issubdtype(labels.dtype, np.integer)
            and labels.min() >= 0
            and labels.max() < num_classes
        )
        if not ok:
            span = f", range [{labels.min()}, {labels.max()}]" if labels.size else ""
            raise ValueError(
                f"labels must be {len(images)} ints in [0, num_classes={num_classes}); "
                f"got {labels.dtype} shape {labels.shape}{span}. Fix: set the "
                f"model's num_classes to the number of classes."
            )
    images = np.asarray(images, np.float32)
    if cfg.transform:
        images = transforms.apply(images, cfg.transform)
    if images.ndim != 4 or not np.all(np.isfinite(images)):
        raise ValueError(f"training images must be finite [N, H, W, C]; got shape {images.shape}")
    image_shape = tuple(int(s) for s in images.shape[1:])
    model = build_model(model_config)
    schedule = schedules_lib.ddpm_linear()

    mesh = make_mesh()
    ndev = mesh.devices.size
    if cfg.batch_size % ndev:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by the {ndev} devices; "
            f"choose a multiple of {ndev}"
        )
    meta = {
        "format": FORMAT_VERSION,
        "model": model_config,
        "image_shape": list(image_shape),
        "schedule": schedule.name,
        "train": dataclasses.asdict(cfg),
    }
    atomic_write_text(workdir / CONFIG_FILE, json.dumps(jsonable(meta), indent=2, sort_keys=True))
    ckpts = Checkpoints(
        workdir / CHECKPOINT_SUBDIR, meta, keep=cfg.keep_checkpoints, check_train=check_resumable
    )

    repl = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(create_train_state(model, cfg, image_shape), repl)
    restored = ckpts.restore_latest(state)
    if restored is not None:
        state = jax.device_put(restored, repl)
    elif cfg.init_from:
        state = jax.device_put(_init_from(state, cfg, cfg.init_from), repl)
    start = int(jax.device_get(state.step))
    n_params = count_params(state.params)
    if start >= cfg.num_steps and (workdir / "metrics.json").exists():
        ckpts.close()  # already finished: keep the summary of the run that did the work
        return state, json.loads((workdir / "metrics.json").read_text())

    train_step = make_train_step(model, cfg, mesh, schedule)
    base_key = jax.device_put(jax.random.PRNGKey(cfg.seed), repl)
    source = BatchSource(images, cfg.batch_size, cfg.seed, cfg.random_flip, labels=labels)
    sample_noise = (
        jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.num_samples, *image_shape))
        if cfg.num_samples
        else None
    )
    metrics_path = workdir / "metrics.jsonl"
    if cfg.eval_every:
        if eval_images is None:
            raise ValueError(
                f"eval_every={cfg.eval_every} needs held-out images: pass "
                "eval_images, or set eval_every=0"
            )
        eval_images = np.asarray(eval_images, np.float32)[: cfg.eval_count]

    def evaluate(state, done):
        if not cfg.eval_every:
            return  # a class-conditional net is evaluated in its unconditional mode (no label)
        per = quality.eps_mse(
            model.apply, state.ema_params, eval_images, seed=cfg.seed, schedule=schedule
        )
        row = {
            "step": done,
            "n": int(per.shape[1]),
            "eps_mse": {str(t): float(v) for t, v in zip(quality.HELDOUT_TIMESTEPS, per.mean(1))},
            "eps_mse_mean": float(per.mean()),
        }
        with open(workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_artifacts(state):
        step = int(jax.device_get(state.step))
        rows = [r for r in read_log(metrics_path) if "loss" in r]
        if rows:
            plotting.save_loss_curve(
                [r["step"] for r in rows], [r["loss"] for r in rows], str(workdir / "loss.png")
            )
        if sample_noise is not None:
            imgs = sample_images(
                model,
                state.ema_params,
                sample_noise,
                cfg.sample_steps,
                schedule,
                guidance=cfg.sample_guidance,
            )
            plotting.save_image_grid(imgs, str(workdir / f"samples_{step:07d}.png"), scale=4)

    bar = tqdm(
        total=cfg.num_steps,
        initial=start,
        disable=not cfg.progress,
        desc="train",
        dynamic_ncols=True,
    )
    pending, t_log, s_log, t0 = [], time.perf_counter(), start, time.perf_counter()
    compile_s = None
    last_loss = float("nan")
    done = start
    with open(metrics_path, "a") as mf:
        for step in range(start, cfg.num_steps):
            batch = source(step) if labels is None else (source(step), source.labels_at(step))
            batch = jax.device_put(batch, data_sharding)
            state, m = train_step(state, batch, base_key)
            pending.append(m)
            done = step + 1
            out_of_time = (
                time_limit_s is not None
                and done < cfg.num_steps
                and time.perf_counter() - t0 > time_limit_s
            )
            if compile_s is None:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                t_log, s_log = time.perf_counter(), done
                pending = pending[-1:]
            if done % cfg.log_every == 0 or done == cfg.num_steps or out_of_time:
                ms = jax.device_get(pending)
                now = time.perf_counter()
                rate = (done - s_log) / max(now - t_log, 1e-9) if done > s_log else float("nan")
                row = {
                    "step": done,
                    "loss": float(np.mean([x["loss"] for x in ms])),
                    "grad_norm": float(np.mean([x["grad_norm"] for x in ms])),
                    "lr": float(ms[-1]["lr"]),
                    "steps_per_s": rate,
                    "images_per_s": rate * cfg.batch_size,
                    "eta_s": (cfg.num_steps - done) / rate if rate > 0 else None,
                    "wall_s": now - t0,
                }
                last_loss = row["loss"]
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{rate:.2f}")
                pending, t_log, s_log = [], now, done
            bar.update(1)
            export_now = done in cfg.export_steps
            if (
                done % cfg.checkpoint_every == 0
                or done == cfg.num_steps
                or out_of_time
                or export_now
            ):
                ckpts.save(state)
                write_artifacts(state)
            if export_now:
                export_workdir(workdir, workdir / EXPORT_SUBDIR / f"step_{done}", step=done)
            if cfg.eval_every and (
                done % cfg.eval_every == 0 or done == cfg.num_steps or out_of_time
            ):
                evaluate(state, done)
            if on_step is not None:
                on_step(done)
            if out_of_time:
                logging.info(
                    "time limit of %.0f s reached at step %d of %d; rerun with the same "
                    "workdir to continue",
                    time_limit_s,
                    done,
                    cfg.num_steps,
                )
                break
    bar.close()
    ckpts.close()

    total_s = time.perf_counter() - t0
    stopped_early = done < cfg.num_steps
    summary = {
        "steps": done,
        "num_steps": cfg.num_steps,
        "stopped_early": stopped_early,
        "resumed_from": start,
        "final_loss": last_loss,
        "num_params": n_params,
        "compile_s": compile_s,
        "wall_s": total_s,
        "devices": ndev,
        "image_shape": list(image_shape),
        "checkpoint_dir": str(workdir / CHECKPOINT_SUBDIR),
    }
    # Also when stopped early (a rerun then has start < num_steps and trains on), so that an
    # export never carries the summary of an earlier, shorter run of the same workdir.
    atomic_write_text(workdir / "metrics.json", json.dumps(summary, indent=2))
    atomic_write_text(
        workdir / "summary.txt",
        f"trained {model_config.get('arch')} ({n_params:,} params) on {cfg.dataset} "
        f"{image_shape} for {done} of {cfg.num_steps} steps (resumed from {start}); "
        f"final loss {last_loss:.4f}; {total_s / 60:.1f} min on {ndev} device(s).\n"
        f"samples: {workdir}/samples_{done:07d}.png, curve: loss.png\n",
    )
    return state, summary
