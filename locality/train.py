"""Trainer for the eps-prediction networks (docs/algorithms.md §1 and §11, "Training").

Objective: the DDPM "simple" loss (Ho et al. 2020, eq. 14 / Algorithm 1) on the linear schedule
:func:`locality.schedules.ddpm_linear`. The trainer is split by concept; this module holds the
run and re-exports the rest, so ``from locality.train import ...`` gives every name:

- :mod:`locality.train_config` -- :class:`TrainConfig` (typed hyper-parameters; the entry point
  converts its ConfigDict), :func:`learning_rate_schedule`, :func:`make_optimizer` (grad-norm
  clipping + AdamW, Loshchilov & Hutter 2019, with linear warmup and optional cosine decay),
  the EMA helpers :func:`ema_decay_at` and :func:`ema_update`.
- :mod:`locality.train_step` -- :class:`TrainState` (``step``, ``params``, ``ema_params``,
  ``opt_state``; a pytree), :func:`create_train_state`, :func:`diffusion_loss`,
  :func:`make_mesh` and :func:`make_train_step`: the jitted, buffer-donating
  ``train_step(state, batch, rng)``, data-parallel over a ``jax.sharding.Mesh`` of all devices
  (batch sharded, state replicated).
- :mod:`locality.train_data` -- :func:`training_data` (train split, class-balanced holdout,
  held-out images) and the deterministic input pipeline (:func:`batch_at`,
  :class:`BatchSource`): the batch at step ``s`` is a pure function of ``(seed, s)`` (epoch
  permutation from ``(seed, epoch)``), so a resumed run sees exactly the batches an
  uninterrupted one would.
- here: :func:`check_resumable` -- which changes of the training settings a resumed run may
  make; :func:`train` -- the loop: resume from the latest checkpoint, log ``metrics.jsonl``,
  show a tqdm bar, write a DDIM-10 sample grid (:func:`locality.denoisers.network.sample_images`)
  and the loss curve (:mod:`locality.plotting`) at every checkpoint.

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
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from locality import plotting, quality
from locality import schedules as schedules_lib
from locality._io import atomic_write_text, jsonable
from locality.checkpoints import (
    CHECKPOINT_SUBDIR,
    CONFIG_FILE,
    EXPORT_SUBDIR,
    FORMAT_VERSION,
    CheckpointError,
    Checkpoints,
    export_params,
    export_workdir,
    load_params,
    merge_params,
    read_checkpoint_config,
    resolve_checkpoint_dir,
)
from locality.denoisers.network import sample_images
from locality.nets import build_model, count_params
from locality.run_logs import read_log, summary_from_log
from locality.train_config import (
    TrainConfig,
    ema_decay_at,
    ema_update,
    learning_rate_schedule,
    make_optimizer,
)
from locality.train_data import (
    BatchSource,
    batch_at,
    batch_indices,
    epoch_permutation,
    training_data,
)
from locality.train_step import (
    TrainState,
    create_train_state,
    diffusion_loss,
    make_mesh,
    make_train_step,
)

# The public names of the trainer, wherever they are defined: experiments, configs and tests
# import them from here. The checkpoint names moved to locality.checkpoints and
# ``sample_images`` to locality.denoisers.network; they stay importable from here too.
__all__ = [
    # locality.train_config
    "TrainConfig",
    "ema_decay_at",
    "ema_update",
    "learning_rate_schedule",
    "make_optimizer",
    # locality.train_step
    "TrainState",
    "create_train_state",
    "diffusion_loss",
    "make_mesh",
    "make_train_step",
    # locality.train_data
    "BatchSource",
    "batch_at",
    "batch_indices",
    "epoch_permutation",
    "training_data",
    # this module
    "check_resumable",
    "train",
    # locality.checkpoints
    "CHECKPOINT_SUBDIR",
    "CONFIG_FILE",
    "EXPORT_SUBDIR",
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpoints",
    "export_params",
    "export_workdir",
    "load_params",
    "merge_params",
    "read_checkpoint_config",
    "read_log",
    "resolve_checkpoint_dir",
    "summary_from_log",
    # locality.denoisers.network
    "sample_images",
]

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
    images, labels, eval_images = training_data(cfg, num_classes, images, labels, eval_images)
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
