"""Training hyper-parameters and the optimiser they define (docs/algorithms.md §11, "Training").

- :class:`TrainConfig` -- typed hyper-parameters (the entry point converts its ConfigDict;
  docs/architecture.md, "Configs"), validated when built.
- :func:`learning_rate_schedule` -- linear warmup, then constant or a cosine decay (Loshchilov &
  Hutter 2017, SGDR, without restarts).
- :func:`make_optimizer` -- grad-norm clipping + AdamW (Loshchilov & Hutter 2019) on that
  schedule, optionally with its own rate for the label embedding.
- :func:`ema_decay_at`, :func:`ema_update` -- the exponential moving average of the weights
  (with the warmup of Tarvainen & Valpola 2017).

All of them are re-exported by :mod:`locality.train`, which uses them in its step and loop.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from locality.data import transforms

__all__ = [
    "TrainConfig",
    "ema_decay_at",
    "ema_update",
    "learning_rate_schedule",
    "make_optimizer",
]


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
