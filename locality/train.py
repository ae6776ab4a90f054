"""Trainer for the eps-prediction networks (ALGORITHMS.md §1 and §11).

Objective: the DDPM "simple" loss (Ho et al. 2020, eq. 14 / Algorithm 1)

    L = E_{x0, t ~ U{0..T-1}, eps ~ N(0, I)} || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t) ||^2

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
- :class:`Checkpoints` -- orbax ``CheckpointManager`` (atomic saves, keep N) plus a
  ``config.json`` that makes the checkpoint directory self-describing; clear errors for corrupt or
  mismatched checkpoints; :func:`load_params` / :func:`export_params` for inference.
- :func:`train` -- the loop: resume from the latest checkpoint, log ``metrics.jsonl``, show a
  tqdm bar, write a DDIM-10 sample grid and the loss curve at every checkpoint.

Determinism: the step's key is ``fold_in(PRNGKey(seed), step)`` (inside ``train_step``) and the
data order is a function of ``(seed, epoch)``; therefore a run killed after any checkpoint and
restarted continues bit-identically to an uninterrupted run on the same device layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from locality import schedules as schedules_lib
from locality.nets import abstract_params, build_model, count_params, init_params

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
EXPORT_SUBDIR = "exports"
FORMAT_VERSION = 1
# TrainConfig fields that may change between a run and its resumption without affecting the
# trajectory of the steps already taken.
_RESUMABLE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every",
                     "num_samples", "sample_steps", "sample_guidance", "progress", "init_from",
                     "export_steps", "eval_every", "eval_count")
# TrainConfig fields that only shape the learning-rate schedule: they may change on resumption
# when the new schedule gives the same learning rate at every step already taken (e.g. extending
# a constant-lr run, or appending a cosine anneal with ``decay_start`` = the steps taken).
_SCHEDULE_FIELDS = ("num_steps", "lr", "warmup_steps", "cosine_decay", "min_lr_ratio",
                    "decay_start")


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used: corrupt, incomplete, or written for another model."""


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
        to ``workdir/exports/step_<S>`` (:func:`export_workdir`), kept whatever
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
            raise ValueError(f"TrainConfig.export_steps must be steps >= 1, got {self.export_steps}")
        for name in ("batch_size", "num_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"TrainConfig.holdout must be in [0, 1), got {self.holdout}")
        if self.eval_every < 0 or self.eval_count < 1:
            raise ValueError(f"need eval_every >= 0 and eval_count >= 1, got {self.eval_every}, "
                             f"{self.eval_count}")
        if not self.label_lr_mult > 0:
            raise ValueError(f"TrainConfig.label_lr_mult must be > 0, got {self.label_lr_mult}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"TrainConfig.label_dropout must be in [0, 1], got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        from locality.data import transforms

        transforms.parse(self.transform)  # a bad spec fails here, before any data is read
        if self.transform and self.random_flip:
            raise ValueError(f"transform={self.transform!r} fixes pixel positions, which random "
                             "flips would break; set random_flip=False")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"need lr > 0 and warmup_steps >= 0, got {self.lr}, {self.warmup_steps}")
        if self.decay_start is not None:
            if not self.cosine_decay:
                raise ValueError(f"decay_start={self.decay_start} needs cosine_decay=True")
            if not self.warmup_steps <= self.decay_start < self.num_steps:
                raise ValueError(
                    f"decay_start={self.decay_start} must lie in [warmup_steps, num_steps) = "
                    f"[{self.warmup_steps}, {self.num_steps}); raise num_steps to anneal after it")


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
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)

    adamw = make_adamw()
    if cfg.label_lr_mult != 1.0:
        group = lambda params: {k: jax.tree.map(lambda _: "label" if k == "label_embed" else "rest",
                                                v) for k, v in params.items()}
        adamw = optax.multi_transform({"label": make_adamw(cfg.label_lr_mult), "rest": adamw},
                                      group)
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
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

    return fresh(params)


# ----------------------------------------------------------------------------------------------
# Loss and train step


def diffusion_loss(params, apply_fn, x0, rng, alphas_cumprod, y=None, label_dropout=0.0,
                   num_classes=0):
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
    pred = apply_fn({"params": params}, x_t, t.astype(jnp.float32), train=True,
                    rngs={"dropout": k_drop}, **kwargs)
    return jnp.mean(jnp.square(pred - eps))


def make_mesh(devices=None) -> Mesh:
    """1-D data-parallel mesh ``("data",)`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def make_train_step(model, cfg: TrainConfig, mesh: Optional[Mesh] = None,
                    schedule: Optional[schedules_lib.DiscreteSchedule] = None) -> Callable:
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
    irrelevant = _STEP_IRRELEVANT + (() if cfg.cosine_decay
                                     else ("num_steps", "min_lr_ratio", "decay_start"))
    step_cfg = dataclasses.replace(cfg, **{f: getattr(TrainConfig, f) for f in irrelevant})
    return _make_train_step(model, step_cfg, mesh, schedule.name,
                            schedule.alphas_cumprod.tobytes())


# TrainConfig fields that do not enter the compiled step.
_STEP_IRRELEVANT = ("dataset", "resolution", "data_limit", "random_flip", "checkpoint_every",
                    "keep_checkpoints", "log_every", "num_samples", "sample_steps", "progress",
                    "seed", "sample_guidance", "init_from", "export_steps", "holdout",
                    "eval_every", "eval_count")


@functools.lru_cache(maxsize=8)
def _make_train_step(model, cfg: TrainConfig, mesh: Mesh, schedule_name: str,
                     alphas_cumprod_bytes: bytes) -> Callable:
    del schedule_name
    alphas_cumprod = jnp.asarray(np.frombuffer(alphas_cumprod_bytes, np.float32))
    tx = make_optimizer(cfg)
    lr_fn = learning_rate_schedule(cfg)

    def step_fn(state: TrainState, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        x0, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        num_classes = getattr(model, "num_classes", 0)
        if (y is None) != (num_classes == 0):
            raise ValueError(f"a net with num_classes={num_classes} needs "
                             f"{'(images, labels)' if num_classes else 'images only'} batches")
        loss, grads = jax.value_and_grad(diffusion_loss)(
            state.params, model.apply, x0, key, alphas_cumprod, y, cfg.label_dropout, num_classes)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup)
        ema = ema_update(state.ema_params, params, decay)
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new, metrics

    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))


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
    return epoch_permutation(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


class BatchSource:
    """``images`` [N, H, W, C] in memory -> the batch at any step (caches the current epoch's
    permutation). Flips (if enabled) are drawn from ``(seed, step)``. With ``labels`` [N],
    :meth:`labels_at` gives the labels of the same batch."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, random_flip: bool = False,
                 labels: Optional[np.ndarray] = None):
        self.images = np.asarray(images, np.float32)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape [N] = [{self.images.shape[0]}], got "
                             f"{self.labels.shape}")
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
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

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


def batch_at(images: np.ndarray, seed: int, step: int, batch_size: int,
             random_flip: bool = False) -> np.ndarray:
    """Functional form of :class:`BatchSource`: the batch [B, H, W, C] seen at ``step``."""
    return BatchSource(images, batch_size, seed, random_flip)(step)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def resolve_checkpoint_dir(path) -> Path:
    """A checkpoint directory is one holding ``config.json`` and step subdirectories; a workdir
    holding ``checkpoints/`` resolves to that subdirectory."""
    path = Path(path)
    if (path / CONFIG_FILE).exists() and any(p.name.isdigit() for p in path.iterdir()):
        return path
    if (path / CHECKPOINT_SUBDIR / CONFIG_FILE).exists():
        return path / CHECKPOINT_SUBDIR
    if (path / CONFIG_FILE).exists():
        return path
    raise CheckpointError(
        f"no checkpoint found at {path}: expected {path}/{CONFIG_FILE} with step directories "
        f"(or a workdir with {CHECKPOINT_SUBDIR}/). Fix: pass the --workdir of a training run or "
        f"a directory written by locality.train.export_params.")


def read_checkpoint_config(path) -> dict:
    """The ``config.json`` of a checkpoint directory: ``model``, ``image_shape``, ``train``, ..."""
    ckpt_dir = resolve_checkpoint_dir(path)
    cfg_path = ckpt_dir / CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
        meta["model"], meta["image_shape"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt or incomplete ({e!r}). Fix: restore it "
                              f"from the run's workdir/{CONFIG_FILE}, or retrain.") from e
    return meta


def _manager(directory: Path, keep: Optional[int] = None, read_only: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpoints:
    """Checkpoint directory of a training run (``workdir/checkpoints``).

    Layout: ``config.json`` (model config, image shape, schedule, train config) and one orbax
    step directory per saved step with items ``params``, ``ema_params``, ``opt_state``. Saves are
    atomic (orbax writes to a temporary directory and renames), only the newest
    ``keep`` are kept. :meth:`restore_latest` raises :class:`CheckpointError` (naming the path
    and the fix) for a corrupt checkpoint or one written for a different model, and never
    deletes or overwrites anything.
    """

    def __init__(self, directory, meta: Mapping[str, Any], keep: int = 3):
        self.directory = Path(directory)
        self.meta = _jsonable(dict(meta))
        cfg_path = self.directory / CONFIG_FILE
        if cfg_path.exists():
            old = read_checkpoint_config(self.directory)
            self._check_compatible(old)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager = _manager(self.directory, keep=keep)
        if not cfg_path.exists():
            _atomic_write_text(cfg_path, json.dumps(self.meta, indent=2, sort_keys=True))

    def _check_compatible(self, old: Mapping[str, Any]):
        path = self.directory / CONFIG_FILE
        for key in ("model", "image_shape", "schedule"):
            if old.get(key) != self.meta.get(key):
                raise CheckpointError(
                    f"{path} was written for {key}={old.get(key)!r} but this run asks for "
                    f"{key}={self.meta.get(key)!r}. Fix: use a fresh --workdir for the new "
                    f"configuration, or rerun with the configuration stored in {path}.")
        # A field missing from the stored settings was added to TrainConfig after that run was
        # written; the run used what is now its default.
        defaults = _jsonable({f.name: f.default for f in dataclasses.fields(TrainConfig)})
        old_train = {**defaults, **old.get("train", {})}
        new_train = {**defaults, **self.meta.get("train", {})}
        diff = sorted(k for k in set(old_train) | set(new_train)
                      if k not in _RESUMABLE_FIELDS + _SCHEDULE_FIELDS
                      and old_train.get(k) != new_train.get(k))
        if diff:
            raise CheckpointError(
                f"{path} was written with different training settings {diff} "
                f"(stored {[old_train.get(k) for k in diff]}, requested "
                f"{[new_train.get(k) for k in diff]}); resuming would not reproduce the run. "
                f"Fix: use a fresh --workdir, or rerun with the stored settings.")
        changed = sorted(k for k in _SCHEDULE_FIELDS if old_train.get(k) != new_train.get(k))
        if not changed:
            return
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        old_cfg = TrainConfig(**{k: v for k, v in old_train.items() if k in fields})
        new_cfg = TrainConfig(**{k: v for k, v in new_train.items() if k in fields})
        done = max([int(p.name) for p in self.directory.iterdir() if p.name.isdigit()],
                   default=0)
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
                f"--workdir.")
        if any(k != "num_steps" for k in changed) or new_cfg.cosine_decay:
            # The new schedule describes every stored step as well as the old one did, and the
            # steps to come: record it, so that exports carry the schedule that made them.
            self.meta = {**old, "train": self.meta["train"]}
            _atomic_write_text(path, json.dumps(self.meta, indent=2, sort_keys=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState):
        import orbax.checkpoint as ocp

        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            ema_params=ocp.args.StandardSave(state.ema_params),
            opt_state=ocp.args.StandardSave(state.opt_state)), force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, template: TrainState) -> Optional[TrainState]:
        """Restore the newest checkpoint into the structure/shardings of ``template``; ``None``
        when there is none."""
        import orbax.checkpoint as ocp

        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            template)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                ema_params=ocp.args.StandardRestore(abstract.ema_params),
                opt_state=ocp.args.StandardRestore(abstract.opt_state)))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise _restore_error(self.directory, step, self.all_steps(), e) from e
        return TrainState(step=jnp.asarray(step, jnp.int32), params=out["params"],
                          ema_params=out["ema_params"], opt_state=out["opt_state"])

    def close(self):
        self.manager.close()


def _restore_error(directory: Path, step: int, steps, err: Exception) -> CheckpointError:
    earlier = [s for s in steps if s < step]
    fix = (f"delete {directory / str(step)} to resume from step {earlier[-1]}"
           if earlier else f"delete {directory / str(step)} to start over")
    return CheckpointError(
        f"cannot restore checkpoint step {step} from {directory / str(step)}: it is corrupt, "
        f"incomplete or has other shapes than the model in {directory / CONFIG_FILE} "
        f"({type(err).__name__}: {str(err)[:300]}). Fix: {fix}, or use a fresh --workdir.")


def load_params(checkpoint, use_ema: bool = True, step: Optional[int] = None):
    """Load ``(model_config, params, meta)`` from a checkpoint directory (or a workdir).

    Args:
      checkpoint: a directory written by :func:`train` (``workdir`` or ``workdir/checkpoints``)
        or by :func:`export_params`.
      use_ema: EMA weights (default) or the raw training weights.
      step: a saved step; default the latest.
    Raises:
      CheckpointError: missing/corrupt files, or weights whose shapes do not match the config.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    meta = read_checkpoint_config(ckpt_dir)
    model = build_model(meta["model"])
    manager = _manager(ckpt_dir, read_only=True)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{ckpt_dir} holds a {CONFIG_FILE} but no saved step. Fix: "
                                  f"train longer (checkpoints are written every checkpoint_every "
                                  f"steps) or point to another directory.")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"step {step} is not saved in {ckpt_dir}; available: {steps}")
        item = "ema_params" if use_ema else "params"
        item_dir = ckpt_dir / str(step) / item
        if not item_dir.exists():
            raise CheckpointError(f"{item_dir} does not exist (exported checkpoints hold only "
                                  f"EMA weights). Fix: use_ema=True, or load the training workdir.")
        target = abstract_params(model, tuple(meta["image_shape"]))
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(target)}))
        except Exception as e:
            raise _restore_error(ckpt_dir, step, steps, e) from e
    finally:
        manager.close()
    return meta["model"], out[item], meta


def export_params(directory, meta: Mapping[str, Any], ema_params, step: int):
    """Write an inference-only checkpoint (``config.json`` + EMA weights of ``step``) that
    ``make("network", checkpoint=directory)`` loads.

    The weights are written to a temporary directory first and then moved into place, so
    exporting again (the same step or another) replaces the previous export only once the new
    one is complete; other files in ``directory`` (figures) are kept."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    manager = _manager(tmp, keep=1)
    manager.save(int(step), args=ocp.args.Composite(
        ema_params=ocp.args.StandardSave(jax.device_get(ema_params))), force=True)
    manager.wait_until_finished()
    manager.close()
    target, old = directory / str(int(step)), directory / f".old-{int(step)}-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp / str(int(step)), target)
    _atomic_write_text(directory / CONFIG_FILE, json.dumps(_jsonable(dict(meta)), indent=2,
                                                           sort_keys=True))
    for p in [old, tmp] + [p for p in directory.iterdir() if p.name.isdigit() and p != target]:
        shutil.rmtree(p, ignore_errors=True)


def export_workdir(workdir, out, step: Optional[int] = None) -> int:
    """Export the EMA weights of a training ``workdir`` at ``step`` (default: the latest saved) to
    ``out`` with :func:`export_params`, plus the run's loss curve, the sample grid of that step and
    a ``metrics.json``: the run's own when it describes that step (a finished or time-limited
    run; for a resumed one with ``wall_s_all_invocations`` added), else one summarised from
    ``metrics.jsonl`` (:func:`summary_from_log`). Returns the step.

    With a constant learning rate (``cosine_decay=False``) the weights at step S are those of the
    run with ``num_steps = S`` (also for a run stopped by ``time_limit_s``, killed, or extended
    from a shorter one), so the exported config records ``num_steps = S``.
    """
    workdir, out = Path(workdir), Path(out)
    if step is None:
        manager = _manager(resolve_checkpoint_dir(workdir), read_only=True)
        try:
            step = manager.latest_step()  # None without a saved step: load_params then explains
        finally:
            manager.close()
    _, ema_params, meta = load_params(workdir, use_ema=True, step=step)
    meta = json.loads(json.dumps(meta))
    if not meta["train"].get("cosine_decay"):
        meta["train"]["num_steps"] = int(step)
    export_params(out, meta, ema_params, int(step))
    for name in ("loss.png", f"samples_{int(step):07d}.png"):
        if (workdir / name).exists():
            shutil.copy(workdir / name, out / name)
    summary = None
    try:
        summary = json.loads((workdir / "metrics.json").read_text())
        if int(summary.get("steps", -1)) != int(step):
            summary = None
    except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError):
        summary = None
    if summary is not None and summary.get("resumed_from") is not None:
        # The run's own wall_s covers its last invocation only; add the earlier ones from the log.
        earlier = summary_from_log(workdir / "metrics.jsonl", int(summary["resumed_from"]))
        summary["wall_s_all_invocations"] = earlier["wall_s"] + float(summary["wall_s"])
    if summary is None:  # a killed run, or an earlier step: summarise the log up to ``step``
        summary = summary_from_log(workdir / "metrics.jsonl", int(step))
        summary.update(num_steps=int(meta["train"].get("num_steps", step)),
                       num_params=count_params(ema_params), image_shape=list(meta["image_shape"]),
                       checkpoint_dir=str(resolve_checkpoint_dir(workdir)))
    _atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    return int(step)


def summary_from_log(log_path, step: int) -> dict:
    """A ``metrics.json``-like summary of a run up to ``step`` from its ``metrics.jsonl``:
    ``final_loss`` is the logged loss of the last row at or before ``step``; ``wall_s`` adds up
    the wall time of every invocation (the log's ``wall_s`` restarts at 0 on each resume)."""
    rows = []
    if Path(log_path).exists():
        for line in Path(log_path).read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(r, dict) and "step" in r and r["step"] <= step:
                rows.append(r)
    wall, seg_max, prev = 0.0, 0.0, None
    for r in rows:
        w = float(r.get("wall_s", 0.0))
        if prev is not None and w < prev:  # a new invocation
            wall, seg_max = wall + seg_max, 0.0
        seg_max, prev = max(seg_max, w), w
    last = max(rows, key=lambda r: r["step"]) if rows else {}
    return {"steps": int(step), "num_steps": int(step), "stopped_early": False,
            "final_loss": last.get("loss", float("nan")), "final_loss_step": last.get("step"),
            "wall_s": wall + seg_max, "from_log": True}


# ----------------------------------------------------------------------------------------------
# Artifacts


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile ``images`` [N, H, W, C] in [-1, 1] into one [rows*(H+pad)+pad, ..., C] array in [0, 1]."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return grid


def save_image_grid(path, images, ncols=None, scale: int = 4):
    """Write an image grid PNG (nearest-neighbour upscaled by ``scale``); temp name then rename."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, ncols)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    if grid.shape[-1] == 1:
        plt.imsave(tmp, grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(tmp, grid)
    os.replace(tmp, path)


def save_loss_curve(metrics_path, png_path):
    """Plot ``loss`` against ``step`` from ``metrics.jsonl`` (log scale) to ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("eps-MSE (mean over log interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(png_path).with_name(Path(png_path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def sample_images(model, params, x_T, num_steps: int = 10,
                  schedule: Optional[schedules_lib.DiscreteSchedule] = None,
                  guidance: float = 0.0) -> np.ndarray:
    """Deterministic DDIM (ALGORITHMS.md §1, via :func:`locality.sampling.ddim`) with the network
    wrapped as a denoiser; returns the final images [B, H, W, C]. A class-conditional net samples
    image ``i`` from class ``i mod num_classes`` with guidance weight ``guidance``."""
    from locality import sampling
    from locality.denoisers.network import NetworkDenoiser

    schedule = schedule or schedules_lib.ddpm_linear()
    labels = "cycle" if getattr(model, "num_classes", 0) else None
    denoise = NetworkDenoiser.create(model, params, schedule, labels=labels,
                                     guidance=guidance if labels else 0.0)
    return np.asarray(sampling.ddim(denoise, x_T, schedule, num_steps=num_steps).images)


def merge_params(fresh, loaded, source: str = "the checkpoint"):
    """``fresh`` with every weight that ``loaded`` also holds replaced by the loaded one.

    Weights only in ``fresh`` keep their values (returned as ``(params, new_names)``); a weight
    only in ``loaded``, or one with another shape, raises :class:`CheckpointError` naming it.
    """
    flat_f = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep="/")
    flat_l = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep="/")
    extra = sorted(set(flat_l) - set(flat_f))
    if extra:
        raise CheckpointError(f"{source} holds weights this model lacks: {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}. Fix: init_from a checkpoint of "
                              f"the same architecture (only new weights such as the label "
                              f"embedding may be missing from it).")
    bad = [(k, tuple(flat_l[k].shape), tuple(flat_f[k].shape)) for k in flat_f
           if k in flat_l and tuple(flat_l[k].shape) != tuple(flat_f[k].shape)]
    if bad:
        k, got, want = bad[0]
        raise CheckpointError(f"{source}: weight {k} has shape {got} but this model needs {want} "
                              f"({len(bad)} mismatched). Fix: init_from a checkpoint of the same "
                              f"architecture and image size.")
    new = sorted(set(flat_f) - set(flat_l))
    merged = {k: jnp.asarray(flat_l[k], flat_f[k].dtype) if k in flat_l else flat_f[k]
              for k in flat_f}
    return flax.traverse_util.unflatten_dict(merged, sep="/"), new


def _init_from(state: TrainState, cfg: TrainConfig, checkpoint) -> TrainState:
    """A step-0 state whose params and EMA are the EMA weights of ``checkpoint`` merged into the
    fresh ``state`` (:func:`merge_params`), with a fresh optimiser state."""
    _, loaded, _ = load_params(checkpoint, use_ema=True)  # shapes as stored there
    params, new = merge_params(jax.device_get(state.params), loaded, f"init_from={checkpoint}")
    logging.info("initialised from %s; weights not in it (kept at init): %s", checkpoint, new)
    tx = make_optimizer(cfg)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


# ----------------------------------------------------------------------------------------------
# The loop


def train(model_config: Mapping[str, Any], cfg: TrainConfig, workdir, *,
          images: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
          eval_images: Optional[np.ndarray] = None,
          on_step: Optional[Callable[[int], None]] = None,
          time_limit_s: Optional[float] = None) -> tuple[TrainState, dict]:
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
    model_config = _jsonable(dict(model_config))
    if not model_config.get("num_classes"):
        # Unconditional: stored exactly as before the option existed, so old runs still resume.
        model_config.pop("num_classes", None)
    num_classes = int(model_config.get("num_classes", 0))
    if labels is not None and not num_classes:
        raise ValueError("labels were given for an unconditional model; set the model's "
                         "num_classes to make it class-conditional, or drop the labels")
    workdir.mkdir(parents=True, exist_ok=True)
    if images is None:
        from locality import data

        need_labels = bool(num_classes) or cfg.holdout > 0
        loaded = data.load(cfg.dataset, split="train", resolution=cfg.resolution,
                           limit=cfg.data_limit, with_labels=need_labels)
        images, labels = loaded if need_labels else (loaded, None)
        if cfg.holdout > 0:
            from locality.classify import balanced_split

            keep, held = balanced_split(labels, cfg.holdout, cfg.seed)
            if eval_images is None:
                eval_images = images[held]
            images, labels = images[keep], labels[keep]
        if not num_classes:
            labels = None
        if cfg.eval_every and eval_images is None:
            if "test" not in data.info(cfg.dataset).get("splits", {}):
                raise ValueError(f"{cfg.dataset} has no test split for the held-out loss "
                                 f"(eval_every={cfg.eval_every}); set holdout=0.1 to hold out a "
                                 "class-balanced part of the training split, or eval_every=0")
            eval_images = data.load(cfg.dataset, split="test", resolution=cfg.resolution,
                                    limit=cfg.eval_count)
    elif cfg.holdout > 0:
        raise ValueError("holdout applies to the dataset train() loads; with explicit images, "
                         "pass eval_images instead and set holdout=0")
    elif num_classes and labels is None:
        raise ValueError(f"a class-conditional model (num_classes={num_classes}) needs the labels "
                         "of the given images: pass labels=[N] ints")
    if num_classes:
        labels = np.asarray(labels)
        ok = (labels.shape == (len(images),) and labels.size > 0
              and np.issubdtype(labels.dtype, np.integer)
              and labels.min() >= 0 and labels.max() < num_classes)
        if not ok:
            span = f", range [{labels.min()}, {labels.max()}]" if labels.size else ""
            raise ValueError(f"labels must be {len(images)} ints in [0, num_classes={num_classes}); "
                             f"got {labels.dtype} shape {labels.shape}{span}. Fix: set the "
                             f"model's num_classes to the number of classes.")
    images = np.asarray(images, np.float32)
    if cfg.transform:
        from locality.data import transforms

        images = transforms.apply(images, cfg.transform)
    if images.ndim != 4 or not np.all(np.isfinite(images)):
        raise ValueError(f"training images must be finite [N, H, W, C]; got shape {images.shape}")
    image_shape = tuple(int(s) for s in images.shape[1:])
    model = build_model(model_config)
    schedule = schedules_lib.ddpm_linear()

    mesh = make_mesh()
    ndev = mesh.devices.size
    if cfg.batch_size % ndev:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {ndev} devices; "
                         f"choose a multiple of {ndev}")
    meta = {"format": FORMAT_VERSION, "model": model_config, "image_shape": list(image_shape),
            "schedule": schedule.name, "train": dataclasses.asdict(cfg)}
    _atomic_write_text(workdir / CONFIG_FILE, json.dumps(_jsonable(meta), indent=2, sort_keys=True))
    ckpts = Checkpoints(workdir / CHECKPOINT_SUBDIR, meta, keep=cfg.keep_checkpoints)

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
    sample_noise = jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.num_samples, *image_shape)) \
        if cfg.num_samples else None
    metrics_path = workdir / "metrics.jsonl"
    if cfg.eval_every:
        if eval_images is None:
            raise ValueError(f"eval_every={cfg.eval_every} needs held-out images: pass "
                             "eval_images, or set eval_every=0")
        from locality import quality

        eval_images = np.asarray(eval_images, np.float32)[:cfg.eval_count]

    def evaluate(state, done):
        if not cfg.eval_every:
            return  # a class-conditional net is evaluated in its unconditional mode (no label)
        per = quality.eps_mse(model.apply, state.ema_params, eval_images, seed=cfg.seed,
                              schedule=schedule)
        row = {"step": done, "n": int(per.shape[1]),
               "eps_mse": {str(t): float(v) for t, v in zip(quality.HELDOUT_TIMESTEPS,
                                                              per.mean(1))},
               "eps_mse_mean": float(per.mean())}
        with open(workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_artifacts(state):
        step = int(jax.device_get(state.step))
        if metrics_path.exists():
            save_loss_curve(metrics_path, workdir / "loss.png")
        if sample_noise is not None:
            imgs = sample_images(model, state.ema_params, sample_noise, cfg.sample_steps, schedule,
                                 guidance=cfg.sample_guidance)
            save_image_grid(workdir / f"samples_{step:07d}.png", imgs)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_steps, initial=start, disable=not cfg.progress, desc="train",
               dynamic_ncols=True)
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
            out_of_time = (time_limit_s is not None and done < cfg.num_steps
                           and time.perf_counter() - t0 > time_limit_s)
            if compile_s is None:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                t_log, s_log = time.perf_counter(), done
                pending = pending[-1:]
            if done % cfg.log_every == 0 or done == cfg.num_steps or out_of_time:
                ms = jax.device_get(pending)
                now = time.perf_counter()
                rate = (done - s_log) / max(now - t_log, 1e-9) if done > s_log else float("nan")
                row = {"step": done,
                       "loss": float(np.mean([x["loss"] for x in ms])),
                       "grad_norm": float(np.mean([x["grad_norm"] for x in ms])),
                       "lr": float(ms[-1]["lr"]),
                       "steps_per_s": rate, "images_per_s": rate * cfg.batch_size,
                       "eta_s": (cfg.num_steps - done) / rate if rate > 0 else None,
                       "wall_s": now - t0}
                last_loss = row["loss"]
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{rate:.2f}")
                pending, t_log, s_log = [], now, done
            bar.update(1)
            export_now = done in cfg.export_steps
            if (done % cfg.checkpoint_every == 0 or done == cfg.num_steps or out_of_time
                    or export_now):
                ckpts.save(state)
                write_artifacts(state)
            if export_now:
                export_workdir(workdir, workdir / EXPORT_SUBDIR / f"step_{done}", step=done)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.num_steps
                                   or out_of_time):
                evaluate(state, done)
            if on_step is not None:
                on_step(done)
            if out_of_time:
                logging.info("time limit of %.0f s reached at step %d of %d; rerun with the same "
                             "workdir to continue", time_limit_s, done, cfg.num_steps)
                break
    bar.close()
    ckpts.close()

    total_s = time.perf_counter() - t0
    stopped_early = done < cfg.num_steps
    summary = {"steps": done, "num_steps": cfg.num_steps, "stopped_early": stopped_early,
               "resumed_from": start, "final_loss": last_loss,
               "num_params": n_params, "compile_s": compile_s, "wall_s": total_s,
               "devices": ndev, "image_shape": list(image_shape),
               "checkpoint_dir": str(workdir / CHECKPOINT_SUBDIR)}
    # Also when stopped early (a rerun then has start < num_steps and trains on), so that an
    # export never carries the summary of an earlier, shorter run of the same workdir.
    _atomic_write_text(workdir / "metrics.json", json.dumps(summary, indent=2))
    _atomic_write_text(workdir / "summary.txt",
                       f"trained {model_config.get('arch')} ({n_params:,} params) on {cfg.dataset} "
                       f"{image_shape} for {done} of {cfg.num_steps} steps (resumed from {start}); "
                       f"final loss {last_loss:.4f}; {total_s / 60:.1f} min on {ndev} device(s).\n"
                       f"samples: {workdir}/samples_{done:07d}.png, curve: loss.png\n")
    return state, summary
