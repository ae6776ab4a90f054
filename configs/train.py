"""Training configs for the reference networks (docs/algorithms.md §11).

``get_config("<dataset>,<preset>[,<arch>]")``; dataset one of ``fashion_mnist``, ``mnist``,
``cifar10_catsdogs``, ``lfw_faces``, ``natural_patches``; preset ``paper`` (the paper's network
sizes), ``gpu`` (the paper's 28 px UNet, 6.1M parameters, at any resolution: minutes on one
accelerator, and its exported weights stay under 30 MB) or ``cpu`` (a small net that reaches
recognisable samples in well under an hour on one CPU core); arch ``unet`` (default) or ``dit``.

Commands (run from the repository root)::

    # Fashion-MNIST, small UNet, CPU (about 40 min on one core):
    taskset -c 1 python -m experiments.train --config configs/train.py:fashion_mnist,cpu,unet \
        --workdir workdirs/fashion_mnist_unet_cpu
    # Fashion-MNIST, tiny DiT, CPU:
    python -m experiments.train --config configs/train.py:fashion_mnist,cpu,dit \
        --workdir workdirs/fashion_mnist_dit_cpu
    # The paper's 28 px UNet (ch 64, mult 1,2,2; 200 epochs; accelerator recommended):
    python -m experiments.train --config configs/train.py:fashion_mnist,paper,unet \
        --workdir workdirs/fashion_mnist_unet_paper
    # Cats/dogs 32 px on one accelerator, stopped after 10 minutes (resumable):
    python -m experiments.train --config configs/train.py:cifar10_catsdogs,gpu,unet \
        --workdir workdirs/cifar10_catsdogs_unet_gpu --time_limit_s 600 \
        --export_to checkpoints/cifar10_catsdogs_unet_gpu
    # Cats/dogs 32 px, paper UNet (ch 128, mult 1,2,3,4) or the CPU-sized one:
    python -m experiments.train --config configs/train.py:cifar10_catsdogs,paper,unet \
        --workdir workdirs/catsdogs_unet_paper
    python -m experiments.train --config configs/train.py:cifar10_catsdogs,cpu,unet \
        --workdir workdirs/catsdogs_unet_cpu

    # Class-conditional cats/dogs net, started from the unconditional CPU one (label dropout 0.1
    # for classifier-free guidance; grids at guidance weight 3):
    python -m experiments.train --config configs/train.py:cifar10_catsdogs,cpu,unet \
        --workdir workdirs/catsdogs_unet_cpu32_cond --config.model.ch=32 \
        --config.model.ch_mult='(1,2,2,2)' --config.model.num_classes=2 --config.train.lr=3e-4 \
        --config.train.num_steps=5000 --config.train.cosine_decay=True \
        --config.train.sample_guidance=3 --config.train.checkpoint_every=500 \
        --config.train.label_lr_mult=30 \
        --config.train.init_from=checkpoints/cifar10_catsdogs_unet_cpu32_anneal

    # Append a cosine anneal (steps 8,000 -> 13,000, lr to 0) to a finished constant-lr run:
    python -m experiments.train --config configs/train.py:cifar10_catsdogs,cpu,unet \
        --workdir workdirs/catsdogs_unet_cpu --config.train.num_steps=13000 \
        --config.train.cosine_decay=True --config.train.decay_start=8000

    # The reference networks of the comparisons ('long': the cpu UNet for 40 epochs, exports
    # after 1, 5, 10, 20, 40 epochs, the held-out loss in eval.jsonl). They take hours on a CPU,
    # so run them in pieces: stop with --time_limit_s, keep what resuming needs with
    # --snapshot_to, and continue on any machine with --resume_from (one core per run; the
    # first sitting has no snapshot to resume from, so it leaves --resume_from out). The lr is
    # constant, so --config.train.num_steps=N extends a run until its held-out loss is flat:
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    taskset -c 0 python -m experiments.train --config configs/train.py:fashion_mnist,long \
        --workdir workdirs/fashion_mnist_unet_long --time_limit_s 9000 \
        --resume_from checkpoints/fashion_mnist_unet_long/resume \
        --snapshot_to checkpoints/fashion_mnist_unet_long/resume

Any field can be overridden, e.g. ``--config.train.num_steps=200 --config.model.ch=16``.
Rerunning a command with the same ``--workdir`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import ml_collections

# name -> (training-set size, native resolution, channels) of the project's offline sources.
DATASETS = {
    "fashion_mnist": (60_000, 28, 1),
    "mnist": (10_000, 28, 1),
    "cifar10_catsdogs": (2_000, 32, 3),
    "lfw_faces": (100, 25, 1),
    "natural_patches": (10_000, 32, 3),
}
PRESETS = ("paper", "gpu", "cpu", "long")
# Datasets without a test split hold out a class-balanced part of the training split for the
# held-out loss of the 'long' preset.
HOLDOUT = {"mnist": 0.1, "cifar10_catsdogs": 0.1}
FLIP = {"cifar10_catsdogs": True, "lfw_faces": True, "natural_patches": True}


def _patch_size(res: int) -> int:
    for p in (2, 4, 5, 1):
        if res % p == 0:
            return p
    return 1


def get_config(arg: str = "fashion_mnist,cpu,unet") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"config arg must be '<dataset>,<preset>[,<arch>]', got {arg!r}")
    dataset, preset = parts[0], parts[1]
    arch = parts[2] if len(parts) == 3 else "unet"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if preset == "long" and arch != "unet":
        raise ValueError("the 'long' preset trains the CPU UNet; use 'cpu' for a DiT")
    if arch not in ("unet", "dit"):
        raise ValueError(f"unknown arch {arch!r}; choose 'unet' or 'dit'")
    n, res, _ = DATASETS[dataset]

    config = ml_collections.ConfigDict()
    config.name = f"{dataset}_{arch}_{preset}"

    if arch == "unet":
        if preset == "gpu":  # the paper's 28 px UNet, at any resolution
            model = dict(
                arch="unet",
                ch=64,
                ch_mult=(1, 2, 2),
                num_res_blocks=2,
                attn_resolutions=(),
                mid_attn=True,
                dropout=0.1,
                num_groups=32,
                padding="zeros",
                use_norm=True,
            )
        elif preset == "paper":
            big = res > 28
            model = dict(
                arch="unet",
                ch=128 if big else 64,
                ch_mult=(1, 2, 3, 4) if big else (1, 2, 2),
                num_res_blocks=2,
                attn_resolutions=(),
                mid_attn=True,
                dropout=0.15,
                num_groups=32,
                padding="zeros",
                use_norm=True,
            )
        else:  # cpu, long
            model = dict(
                arch="unet",
                ch=16,
                ch_mult=(1, 2, 2),
                num_res_blocks=1,
                attn_resolutions=(),
                mid_attn=True,
                dropout=0.0,
                num_groups=8,
                padding="zeros",
                use_norm=True,
            )
    else:
        model = dict(
            arch="dit",
            size="tiny" if preset == "cpu" else "small",
            patch_size=_patch_size(res),
            dropout=0.0,
        )
    model["num_classes"] = 0  # > 0: class-conditional (labels of the dataset; see nets/unet.py)
    config.model = model

    t = ml_collections.ConfigDict()
    t.dataset = dataset
    t.resolution = ml_collections.config_dict.placeholder(int)
    t.data_limit = ml_collections.config_dict.placeholder(int)
    t.seed = 0
    t.random_flip = FLIP.get(dataset, False)
    t.transform = ""  # e.g. "link:10,4,0,20,6" or "permute:0" (locality.data.transforms)
    t.grad_clip = 1.0
    t.weight_decay = 0.0
    t.b1, t.b2, t.adam_eps = 0.9, 0.999, 1e-8
    t.num_samples = 64
    t.sample_steps = 10
    t.progress = True
    if preset == "paper":
        # 200 epochs at batch 128 (the released checkpoints are "epoch 200"), DDPM optimiser.
        t.batch_size = 128
        t.num_steps = 200 * max(n // 128, 1)
        t.lr = 2e-4
        t.warmup_steps = min(5000, t.num_steps // 10)
        t.cosine_decay = False
        t.min_lr_ratio = 0.0
        t.ema_decay = 0.9999
        t.ema_warmup = True
        t.checkpoint_every = 5000 if t.num_steps > 20_000 else 1000
        t.keep_checkpoints = 3
        t.log_every = 100
    elif preset == "gpu":
        # The DDPM optimiser at batch 128 with a shorter EMA horizon (2k steps), sized for minutes
        # on one accelerator: stop it with --time_limit_s (constant lr, so the stopped run equals
        # the run of that many steps) or let it run 100k steps.
        t.batch_size = 128
        t.num_steps = 100_000
        t.lr = 2e-4
        t.warmup_steps = 1000
        t.cosine_decay = False
        t.min_lr_ratio = 0.0
        t.ema_decay = 0.9995
        t.ema_warmup = True
        t.checkpoint_every = 2500
        t.keep_checkpoints = 2
        t.log_every = 100
    elif preset == "long":
        # The reference nets of the comparisons: the cpu UNet trained for 40 epochs at batch 32
        # (the best images/s on a CPU core, benchmarks/results/train_step.json), constant lr so
        # the run can be stopped, resumed and extended, an EMA horizon of 2,000 steps, the
        # held-out loss every half epoch, and exports after 1, 5, 10, 20 and 40 epochs.
        t.holdout = HOLDOUT.get(dataset, 0.0)
        n_train = n - int(round(n * t.holdout))
        epoch = max(n_train // 32, 1)
        t.batch_size = 32
        t.num_steps = 40 * epoch
        t.lr = 1e-3
        t.warmup_steps = 100
        t.cosine_decay = False
        t.min_lr_ratio = 0.0
        t.ema_decay = 0.9995
        t.ema_warmup = True
        t.checkpoint_every = 500
        t.keep_checkpoints = 2
        t.log_every = 50
        t.eval_every = max(epoch // 2, 1)
        t.export_steps = tuple(e * epoch for e in (1, 5, 10, 20, 40))
    else:
        # Sized for ~40 min on one (shared) CPU core: ~1 s per step of 32 images at 28 px.
        t.batch_size = 32
        t.num_steps = 2400
        t.lr = 1e-3
        t.warmup_steps = 100
        t.cosine_decay = False  # constant lr: the run can be stopped or extended at any step
        t.min_lr_ratio = 0.0
        t.ema_decay = 0.999
        t.ema_warmup = True
        t.checkpoint_every = 200
        t.keep_checkpoints = 2
        t.log_every = 25
    # With cosine_decay: the step where the decay starts (None: end of warmup). Resuming a finished
    # constant-lr run of S steps with cosine_decay=True, decay_start=S and a larger num_steps
    # appends an annealing phase to it.
    t.decay_start = ml_collections.config_dict.placeholder(int)
    # Class-conditional nets (--config.model.num_classes=K): the probability of training with "no
    # label", the guidance weight of the checkpoint sample grids, and optionally the checkpoint of
    # an unconditional net to start from (its weights; the label embedding starts at zero).
    t.label_dropout = 0.1
    t.label_lr_mult = 1.0  # learning-rate multiple for the label embedding (see TrainConfig)
    t.sample_guidance = 0.0
    t.init_from = ml_collections.config_dict.placeholder(str)
    # Intermediate exports (workdir/exports/step_<S>) and the held-out loss curve (eval.jsonl).
    if preset != "long":
        t.export_steps = ()
        t.holdout = 0.0
        t.eval_every = 0
    t.eval_count = 1000
    config.train = t
    return config
