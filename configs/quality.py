"""Measured sample quality of trained networks: held-out eps-MSE and a classifier Frechet distance.

``get_config("<dataset>")`` for ``fashion_mnist`` or ``mnist``. For every network in
``networks`` (default: the committed CPU UNet of the dataset and every export of its long run,
``checkpoints/<dataset>_unet_long/epoch_*``), samples ``num_samples`` images with the paper's
10-step DDIM from the same noise and reports the Frechet distance to ``num_real`` real held-out
images in the feature space of a classifier trained on the training split, the fraction of
samples the classifier labels with confidence above ``confidence``, and the eps-MSE on the
held-out images at t = 100, 300, 500, 700, 900::

    python -m experiments.quality --config configs/quality.py:fashion_mnist \
        --workdir results/quality_fashion_mnist
    python -m experiments.quality --config configs/quality.py:mnist \
        --workdir results/quality_mnist \
        --config.networks='cpu=checkpoints/mnist_unet_cpu,e20=checkpoints/mnist_unet_long/epoch_20'

Held-out images: the test split, or for ``mnist`` (no test split) the class-balanced 10 % that
the ``long`` training preset holds out (``configs/train.py``; same seed, so the nets never saw
them). The classifier is cached by content (``$LOCALITY_CACHE_DIR/../classifiers``).
"""

from __future__ import annotations

import ml_collections

HOLDOUT = {"mnist": 0.1}
CLASSIFIER_EPOCHS = {"fashion_mnist": 8, "mnist": 15}


def get_config(arg: str = "fashion_mnist"):
    dataset = arg.strip()
    if dataset not in ("fashion_mnist", "mnist"):
        raise ValueError(
            f"quality needs a labelled 28 px set, 'fashion_mnist' or 'mnist'; got {dataset!r}"
        )
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    # "label=path,label=path"; "" = the committed CPU UNet and the exports of the long run.
    c.networks = ""
    c.holdout = HOLDOUT.get(dataset, 0.0)  # > 0: held-out part of train (as configs/train.py)
    c.holdout_seed = 0
    c.num_samples = 2000
    c.num_real = 2000  # real held-out images for the distance (at most all)
    c.sampler = "ddim"  # ddim (eta = 0) | ddpm (ancestral)
    c.num_steps = 10
    c.seed = 0
    c.eval_count = 1000  # held-out images for the eps-MSE table
    c.confidence = 0.9
    c.classifier_epochs = CLASSIFIER_EPOCHS.get(dataset, 10)
    c.classifier_holdout = 0.1
    c.classifier_seed = 0
    c.classifier_flip = False  # mirrored digits are not digits
    c.progress = True
    return c
