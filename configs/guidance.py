"""Class-conditional sampling with classifier-free guidance, judged by a held-out classifier.

``get_config("<dataset>")``. Samples the same initial noise with no label and with labels cycling
through the classes (image i -> class i mod K) at every guidance weight ``w`` in ``guidance``,
then reports how often a small CNN trained on the dataset (its accuracy on a held-out 10 % is
reported alongside) assigns each sample its requested class::

    python -m experiments.guidance --config configs/guidance.py:cifar10_catsdogs \
        --workdir results/guidance_cifar10_catsdogs
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str = "cifar10_catsdogs"):
    c = ml_collections.ConfigDict()
    c.dataset = arg
    c.checkpoint = f"checkpoints/{arg}_unet_cpu32_cond"
    c.guidance = "0,1,3"  # comma-separated guidance weights w
    c.unconditional = True  # also sample with no label
    c.sampler = "ddpm"  # ddpm (ancestral) | ddim
    c.num_steps = 250
    c.num_samples = 128
    c.seed = 0
    c.classifier_epochs = 30
    c.classifier_holdout = 0.1
    c.classifier_seed = 0
    c.progress = True
    return c
