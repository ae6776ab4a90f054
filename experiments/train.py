"""Train a reference eps-network (UNet or DiT) on one of the project's datasets.

    python -m experiments.train --config configs/train.py:fashion_mnist,cpu,unet \
        --workdir workdirs/fashion_mnist_unet_cpu [--config.train.num_steps=...]
    # afterwards, optionally copy the EMA weights for inference only:
    python -m experiments.train ... --export_to checkpoints/fashion_mnist_unet_cpu
    # or export the latest checkpoint of a stopped run without training further:
    python -m experiments.train ... --export_to checkpoints/fashion_mnist_unet_cpu --export_only

Rerunning with the same ``--workdir`` resumes from the latest checkpoint; ``--time_limit_s`` stops
a run early (with a checkpoint) so it fits a wall-clock budget. The workdir receives the
resolved ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``metrics.json``, ``loss.png``,
``samples_<step>.png`` and ``summary.txt`` (see :func:`locality.train.train`).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "configs/train.py:<dataset>,<preset>[,<arch>]", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds checkpoints).")
flags.DEFINE_float(
    "time_limit_s",
    None,
    "Stop (with a checkpoint) after the first step that ends "
    "this many seconds into the run; rerun with the same --workdir to continue.",
)
flags.DEFINE_string(
    "export_to",
    None,
    "After training, write the final EMA weights, config, "
    "loss curve and sample grid to this directory (inference-only checkpoint).",
)
flags.DEFINE_bool(
    "export_only",
    False,
    "Do not train: export the latest checkpoint of --workdir "
    "to --export_to (e.g. a run stopped by --time_limit_s or killed).",
)
flags.DEFINE_string(
    "snapshot_to",
    None,
    "After training (or with --export_only, instead of "
    "it), copy what resuming needs -- the latest checkpoint with its optimiser "
    "state, config and logs -- to this directory (e.g. to commit a long run "
    "between machines).",
)
flags.DEFINE_string(
    "resume_from",
    None,
    "Seed an empty --workdir from a --snapshot_to directory "
    "before training, so a run continues on a new machine.",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from locality import checkpoints
    from locality import train as train_lib

    config = FLAGS.config
    model_config = (
        config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    )
    cfg = train_lib.TrainConfig(**config.train.to_dict())
    workdir = Path(FLAGS.workdir)
    if FLAGS.resume_from:
        step = checkpoints.restore_workdir(FLAGS.resume_from, workdir)
        if step is not None:
            print(f"seeded {workdir} from the step-{step} snapshot {FLAGS.resume_from}")
    if FLAGS.export_only:
        if not FLAGS.export_to and not FLAGS.snapshot_to:
            raise app.UsageError(
                "--export_only needs --export_to DIR (where to write the "
                "weights) or --snapshot_to DIR"
            )
        if FLAGS.export_to:
            step = checkpoints.export_workdir(workdir, FLAGS.export_to)
            print(f"exported the EMA weights of step {step} of {workdir} to {FLAGS.export_to}")
        if FLAGS.snapshot_to:
            step = checkpoints.snapshot_workdir(workdir, FLAGS.snapshot_to)
            print(f"snapshot of step {step} written to {FLAGS.snapshot_to}")
        return
    logging.info("training %s in %s", config.name, workdir)
    _, summary = train_lib.train(model_config, cfg, workdir, time_limit_s=FLAGS.time_limit_s)
    logging.info("done: %s", json.dumps(summary))
    print(json.dumps(summary, indent=2))

    if FLAGS.export_to:
        step = checkpoints.export_workdir(workdir, FLAGS.export_to, step=int(summary["steps"]))
        print(f"exported the EMA weights of step {step} to {FLAGS.export_to}")
    if FLAGS.snapshot_to:
        step = checkpoints.snapshot_workdir(workdir, FLAGS.snapshot_to)
        print(f"snapshot of step {step} written to {FLAGS.snapshot_to}")


if __name__ == "__main__":
    app.run(main)
