"""How a network's agreement with each analytical denoiser changes as it trains.

``get_config("<dataset>[,quick]")``. Every method samples ``num_samples`` trajectories once (the
paper's 10-step DDIM from the same noise as the networks); every network of ``networks``
(default: the exports of the long run, ``checkpoints/<dataset>_unet_long/epoch_*``, after 1, 5,
10, 20 and 40 epochs) samples its own; the final-step r2 of every method against every network,
with standard errors over samples and paired differences between methods, is plotted against the
network's epochs::

    python -m experiments.training_path --config configs/training_path.py:fashion_mnist \
        --workdir results/training_path_fashion_mnist

Every method uses the network's own training set: for ``mnist`` the 90 % of the training split
the long run trained on (``holdout``, as in configs/train.py).
"""

from __future__ import annotations

import ml_collections

from configs.sample import PCA_THRESHOLD

HOLDOUT = {"mnist": 0.1}


def get_config(arg: str = "fashion_mnist"):
    parts = [p.strip() for p in arg.split(",")]
    dataset, quick = parts[0], "quick" in parts[1:]
    if set(parts[1:]) - {"quick"}:
        raise ValueError(f"config arg must be '<dataset>[,quick]', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.holdout = HOLDOUT.get(dataset, 0.0)
    c.holdout_seed = 0
    c.networks = ""  # "label=path,..."; "" = the long run's exports
    c.methods = "pca_locality,wiener,optimal,nearest"
    thr = PCA_THRESHOLD.get(dataset, 0.005)
    c.method_kwargs = ml_collections.ConfigDict(
        {
            "pca_locality": {"threshold": thr, "softmax": "exact"},
            "wiener": {},
            "optimal": {},
            "nearest": {},
        }
    )
    c.num_samples = 8 if quick else 64
    c.batch_size = 8 if quick else 32
    c.num_steps = 10
    c.seed = 0
    return c
