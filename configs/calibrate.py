"""Calibrating a peer machine's patch size per step against a trained network.

    python -m experiments.calibrate --config configs/calibrate.py:ls,fashion_mnist \
        --workdir workdirs/calibrate_ls_fmnist

The argument is "<method>,<dataset>" with method in ls | els | bbels | pspc_square. The reference
is ``denoisers.make("network", checkpoint=config.reference_kwargs.checkpoint)``; any registered
denoiser can stand in (``--config.reference=ls --config.reference_kwargs.patch_size=5``).
Overrides, e.g. ``--config.criterion=both --config.limit=10000 --config.grid=cosine_legacy
--config.output=schedules/ls_fashion_mnist.json``. The patch machines (els, bbels) cost
O(N H^2 W^2 k^2) per call: use ``--config.limit`` on a CPU.
"""

import os

import ml_collections


def default_checkpoint(dataset: str) -> str:
    """``checkpoints/<dataset>_unet_cpu`` (the released location), else the training workdir
    ``workdirs/<dataset>_unet_cpu`` if only that exists."""
    released, workdir = f"checkpoints/{dataset}_unet_cpu", f"workdirs/{dataset}_unet_cpu"
    return workdir if not os.path.exists(released) and os.path.exists(workdir) else released


def get_config(arg: str = "ls,fashion_mnist"):
    try:
        method, dataset = arg.split(",")
    except ValueError:
        raise ValueError(f"config argument must be '<method>,<dataset>'; got {arg!r}") from None
    c = ml_collections.ConfigDict()
    c.method = method
    c.dataset = dataset
    c.split = "train"
    c.limit = ml_collections.config_dict.placeholder(int)  # first K training images
    c.resolution = ml_collections.config_dict.placeholder(int)
    c.method_kwargs = ml_collections.ConfigDict({"flip": True} if method == "pspc_square" else {})
    c.reference = "network"
    c.reference_kwargs = ml_collections.ConfigDict({"checkpoint": default_checkpoint(dataset)})
    c.criterion = "cosine"  # cosine (Kamb & Ganguli) | greedy | both
    c.candidates = ()  # empty: odd 3, 5, ... up to the image side
    c.grid = "ddpm"  # ddpm (DDIM on the net's training schedule) | cosine_legacy
    c.num_steps = 10
    c.timesteps = ()  # ddpm grid: explicit timesteps (high to low) instead of leading
    c.num_seeds = 8
    c.seed = 0
    c.output = ""  # optional extra path for the schedule JSON
    return c
