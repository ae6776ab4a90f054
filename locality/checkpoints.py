"""Checkpoints of the trainer on disk: save, resume, load, export (docs/algorithms.md §11).

Layout of a checkpoint directory (``workdir/checkpoints`` of a run of :func:`locality.train.train`,
or an export): ``config.json`` (format version, model config, image shape, schedule name and the
run's :class:`locality.train.TrainConfig` as a dict) and one orbax step directory per saved step
with the items ``params``, ``ema_params`` and ``opt_state`` (an export holds ``ema_params`` only).

Pieces:

- :class:`Checkpoints` -- orbax ``CheckpointManager`` (atomic saves, keep N) plus the
  ``config.json`` that makes the checkpoint directory self-describing; clear errors
  (:class:`CheckpointError`) for corrupt or mismatched checkpoints.
- :func:`resolve_checkpoint_dir` / :func:`read_checkpoint_config` -- find and read that
  ``config.json``.
- :func:`load_params` / :func:`export_params` / :func:`export_workdir` -- the weights for
  inference (``make("network", checkpoint=...)``) and inference-only exports.
- :func:`merge_params` -- the weights of a checkpoint merged into a fresh model (``init_from``).

The run's logs (``metrics.jsonl``, ``eval.jsonl``) are read by :mod:`locality.run_logs`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from locality._io import atomic_write_text, jsonable
from locality.nets import abstract_params, build_model, count_params
from locality.run_logs import heldout_flatness, summary_from_log

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
EXPORT_SUBDIR = "exports"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used: corrupt, incomplete, or written for another model."""


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
        f"a directory written by locality.checkpoints.export_params."
    )


def read_checkpoint_config(path) -> dict:
    """The ``config.json`` of a checkpoint directory: ``model``, ``image_shape``, ``train``, ..."""
    ckpt_dir = resolve_checkpoint_dir(path)
    cfg_path = ckpt_dir / CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
        meta["model"], meta["image_shape"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{cfg_path} is corrupt or incomplete ({e!r}). Fix: restore it "
            f"from the run's workdir/{CONFIG_FILE}, or retrain."
        ) from e
    return meta


def _manager(directory: Path, keep: Optional[int] = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpoints:
    """Checkpoint directory of a training run (``workdir/checkpoints``).

    Layout: ``config.json`` (model config, image shape, schedule, train config) and one orbax
    step directory per saved step with items ``params``, ``ema_params``, ``opt_state``. Saves are
    atomic (orbax writes to a temporary directory and renames), only the newest
    ``keep`` are kept. :meth:`restore_latest` raises :class:`CheckpointError` (naming the path
    and the fix) for a corrupt checkpoint or one written for a different model, and never
    deletes or overwrites anything.

    ``check_train(path, old_meta, new_meta) -> bool`` (the trainer passes
    :func:`locality.train.check_resumable`) judges the training settings of a directory that
    already holds a ``config.json`` for the same model: it raises :class:`CheckpointError` when
    resuming with ``new_meta["train"]`` would not reproduce the run, and returns True when the
    stored settings are to be replaced by the new ones.
    """

    def __init__(
        self,
        directory,
        meta: Mapping[str, Any],
        keep: int = 3,
        check_train: Optional[Callable[[Path, dict, dict], bool]] = None,
    ):
        self.directory = Path(directory)
        self.meta = jsonable(dict(meta))
        self._check_train = check_train
        cfg_path = self.directory / CONFIG_FILE
        if cfg_path.exists():
            old = read_checkpoint_config(self.directory)
            self._check_compatible(old)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager = _manager(self.directory, keep=keep)
        if not cfg_path.exists():
            atomic_write_text(cfg_path, json.dumps(self.meta, indent=2, sort_keys=True))

    def _check_compatible(self, old: Mapping[str, Any]):
        path = self.directory / CONFIG_FILE
        for key in ("model", "image_shape", "schedule"):
            if old.get(key) != self.meta.get(key):
                raise CheckpointError(
                    f"{path} was written for {key}={old.get(key)!r} but this run asks for "
                    f"{key}={self.meta.get(key)!r}. Fix: use a fresh --workdir for the new "
                    f"configuration, or rerun with the configuration stored in {path}."
                )
        if self._check_train is not None and self._check_train(path, old, self.meta):
            # The new schedule describes every stored step as well as the old one did, and the
            # steps to come: record it, so that exports carry the schedule that made them.
            self.meta = {**old, "train": self.meta["train"]}
            atomic_write_text(path, json.dumps(self.meta, indent=2, sort_keys=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, state):
        """Save ``state`` (a :class:`locality.train.TrainState`) as the step ``state.step``."""
        step = int(jax.device_get(state.step))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                ema_params=ocp.args.StandardSave(state.ema_params),
                opt_state=ocp.args.StandardSave(state.opt_state),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore_latest(self, template):
        """Restore the newest checkpoint into the structure/shardings of ``template`` (a
        :class:`locality.train.TrainState`); ``None`` when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            template,
        )
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract.params),
                    ema_params=ocp.args.StandardRestore(abstract.ema_params),
                    opt_state=ocp.args.StandardRestore(abstract.opt_state),
                ),
            )
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise _restore_error(self.directory, step, self.all_steps(), e) from e
        return template.replace(
            step=jnp.asarray(step, jnp.int32),
            params=out["params"],
            ema_params=out["ema_params"],
            opt_state=out["opt_state"],
        )

    def close(self):
        self.manager.close()


def _restore_error(directory: Path, step: int, steps, err: Exception) -> CheckpointError:
    earlier = [s for s in steps if s < step]
    fix = (
        f"delete {directory / str(step)} to resume from step {earlier[-1]}"
        if earlier
        else f"delete {directory / str(step)} to start over"
    )
    return CheckpointError(
        f"cannot restore checkpoint step {step} from {directory / str(step)}: it is corrupt, "
        f"incomplete or has other shapes than the model in {directory / CONFIG_FILE} "
        f"({type(err).__name__}: {str(err)[:300]}). Fix: {fix}, or use a fresh --workdir."
    )


def load_params(checkpoint, use_ema: bool = True, step: Optional[int] = None):
    """Load ``(model_config, params, meta)`` from a checkpoint directory (or a workdir).

    Args:
      checkpoint: a directory written by :func:`locality.train.train` (``workdir`` or
        ``workdir/checkpoints``) or by :func:`export_params`.
      use_ema: EMA weights (default) or the raw training weights.
      step: a saved step; default the latest.
    Raises:
      CheckpointError: missing/corrupt files, or weights whose shapes do not match the config.
    """
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    meta = read_checkpoint_config(ckpt_dir)
    model = build_model(meta["model"])
    manager = _manager(ckpt_dir, read_only=True)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(
                f"{ckpt_dir} holds a {CONFIG_FILE} but no saved step. Fix: "
                f"train longer (checkpoints are written every checkpoint_every "
                f"steps) or point to another directory."
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"step {step} is not saved in {ckpt_dir}; available: {steps}")
        item = "ema_params" if use_ema else "params"
        item_dir = ckpt_dir / str(step) / item
        if not item_dir.exists():
            raise CheckpointError(
                f"{item_dir} does not exist (exported checkpoints hold only "
                f"EMA weights). Fix: use_ema=True, or load the training workdir."
            )
        target = abstract_params(model, tuple(meta["image_shape"]))
        try:
            out = manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
            )
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    manager = _manager(tmp, keep=1)
    manager.save(
        int(step),
        args=ocp.args.Composite(ema_params=ocp.args.StandardSave(jax.device_get(ema_params))),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    target, old = directory / str(int(step)), directory / f".old-{int(step)}-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp / str(int(step)), target)
    atomic_write_text(
        directory / CONFIG_FILE, json.dumps(jsonable(dict(meta)), indent=2, sort_keys=True)
    )
    for p in [old, tmp] + [p for p in directory.iterdir() if p.name.isdigit() and p != target]:
        shutil.rmtree(p, ignore_errors=True)


def export_workdir(workdir, out, step: Optional[int] = None) -> int:
    """Export the EMA weights of a training ``workdir`` at ``step`` (default: the latest saved) to
    ``out`` with :func:`export_params`, plus the run's loss curve, the sample grid of that step and
    a ``metrics.json``: the run's own when it describes that step (a finished or time-limited
    run; for a resumed one with ``wall_s_all_invocations`` added), else one summarised from
    ``metrics.jsonl`` (:func:`summary_from_log`), with the held-out loss's
    :func:`heldout_flatness` when the run logged evaluations. Returns the step.

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
        summary.update(
            num_steps=int(meta["train"].get("num_steps", step)),
            num_params=count_params(ema_params),
            image_shape=list(meta["image_shape"]),
            checkpoint_dir=str(resolve_checkpoint_dir(workdir)),
        )
    flat = heldout_flatness(workdir / "eval.jsonl", int(step))
    if flat is not None:
        summary["heldout_flatness"] = flat
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    return int(step)


def merge_params(fresh, loaded, source: str = "the checkpoint"):
    """``fresh`` with every weight that ``loaded`` also holds replaced by the loaded one.

    Weights only in ``fresh`` keep their values (returned as ``(params, new_names)``); a weight
    only in ``loaded``, or one with another shape, raises :class:`CheckpointError` naming it.
    """
    flat_f = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep="/")
    flat_l = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep="/")
    extra = sorted(set(flat_l) - set(flat_f))
    if extra:
        raise CheckpointError(
            f"{source} holds weights this model lacks: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}. Fix: init_from a checkpoint of "
            f"the same architecture (only new weights such as the label "
            f"embedding may be missing from it)."
        )
    bad = [
        (k, tuple(flat_l[k].shape), tuple(flat_f[k].shape))
        for k in flat_f
        if k in flat_l and tuple(flat_l[k].shape) != tuple(flat_f[k].shape)
    ]
    if bad:
        k, got, want = bad[0]
        raise CheckpointError(
            f"{source}: weight {k} has shape {got} but this model needs {want} "
            f"({len(bad)} mismatched). Fix: init_from a checkpoint of the same "
            f"architecture and image size."
        )
    new = sorted(set(flat_f) - set(flat_l))
    merged = {
        k: jnp.asarray(flat_l[k], flat_f[k].dtype) if k in flat_l else flat_f[k] for k in flat_f
    }
    return flax.traverse_util.unflatten_dict(merged, sep="/"), new


# Files of a training workdir that resuming it needs, beside the latest checkpoint step.
RESUME_FILES = (CONFIG_FILE, "metrics.jsonl", "eval.jsonl")


def _latest_step_dir(ckpt_dir: Path) -> Path:
    steps = sorted((int(p.name), p) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())
    if not steps:
        raise CheckpointError(
            f"{ckpt_dir} holds no saved step to snapshot. Fix: train until a "
            "checkpoint is written (checkpoint_every, or --time_limit_s)"
        )
    return steps[-1][1]


def snapshot_workdir(workdir, dest) -> int:
    """Copy what resuming the training run in ``workdir`` needs to ``dest``: its ``config.json``,
    ``checkpoints/config.json``, the latest saved step (parameters, EMA and optimiser state) and
    the logs (``metrics.jsonl``, ``eval.jsonl``) -- a few MB for the CPU nets, small enough to
    keep in version control, so that a run interrupted on one machine continues on another
    (:func:`restore_workdir`). Written to a temporary directory and swapped in, so an
    interrupted snapshot never replaces a good one. Returns the step."""
    workdir, dest = Path(workdir), Path(dest)
    ckpt_dir = workdir / CHECKPOINT_SUBDIR
    if not (ckpt_dir / CONFIG_FILE).exists():
        raise CheckpointError(
            f"{workdir} is not a training workdir (no {CHECKPOINT_SUBDIR}/"
            f"{CONFIG_FILE}). Fix: pass the --workdir of a training run"
        )
    step_dir = _latest_step_dir(ckpt_dir)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / CHECKPOINT_SUBDIR).mkdir(parents=True)
    for name in RESUME_FILES:
        if (workdir / name).exists():
            shutil.copy2(workdir / name, tmp / name)
    shutil.copy2(ckpt_dir / CONFIG_FILE, tmp / CHECKPOINT_SUBDIR / CONFIG_FILE)
    shutil.copytree(step_dir, tmp / CHECKPOINT_SUBDIR / step_dir.name)
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return int(step_dir.name)


def restore_workdir(snapshot, workdir) -> Optional[int]:
    """Seed ``workdir`` from a :func:`snapshot_workdir` snapshot when it has no checkpoint yet;
    a workdir that already holds checkpoints is left alone (it is at least as far along, or
    another run). Returns the snapshot's step, or ``None`` when nothing was copied."""
    snapshot, workdir = Path(snapshot), Path(workdir)
    if (workdir / CHECKPOINT_SUBDIR).exists() and any(
        p.name.isdigit() for p in (workdir / CHECKPOINT_SUBDIR).iterdir()
    ):
        return None
    if not (snapshot / CHECKPOINT_SUBDIR / CONFIG_FILE).exists():
        raise CheckpointError(
            f"{snapshot} is not a snapshot written by snapshot_workdir (no "
            f"{CHECKPOINT_SUBDIR}/{CONFIG_FILE}). Fix: pass the directory that "
            "--snapshot_to wrote"
        )
    step_dir = _latest_step_dir(snapshot / CHECKPOINT_SUBDIR)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in RESUME_FILES:
        if (snapshot / name).exists():
            shutil.copy2(snapshot / name, workdir / name)
    (workdir / CHECKPOINT_SUBDIR).mkdir(exist_ok=True)
    shutil.copy2(
        snapshot / CHECKPOINT_SUBDIR / CONFIG_FILE, workdir / CHECKPOINT_SUBDIR / CONFIG_FILE
    )
    shutil.copytree(step_dir, workdir / CHECKPOINT_SUBDIR / step_dir.name)
    return int(step_dir.name)
