"""Score comparison: analytical denoisers against a trained network along DDIM trajectories.

    python -m experiments.compare --config configs/compare.py:fashion_mnist \
        --workdir workdirs/compare_fashion_mnist

For every method: S samples (default 64) from the same initial noise as the network, 10-step DDIM
of the paper's release; per step r2 / MSE / Pearson r of x0_hat, trajectory-vs-trajectory and
single-step (the network evaluated on the method's own states). Override the network with
``--config.checkpoint=PATH`` and the methods with ``--config.methods=pca_locality,wiener``.

The argument is ``<dataset>``, ``<dataset>,quick`` (8 samples, smaller subsets for the slow
peers, against the strong network of ``LONG_NETS`` where the dataset has one: the README's main
job) and/or ``<dataset>,long`` (against the network of the
``long`` training preset, every method on that network's own training set, with every option
below on); ``smoke`` is a seconds-long run of every option on a synthetic 28 px set against the
committed ``fashion_mnist_unet_cpu`` network. Methods whose cost
grows with N H^2 W^2 run on a fixed random
subset of the training set (``method_kwargs.<label>.limit``, or ``peer_limit`` for
``slow_methods``); the table reports the N each method used. ``linear`` needs GD-trained weights
at the sampler's ten timesteps (``experiments/linear_gd.py`` with
``configs/linear_gd.py:<dataset>,ddim``)
and is skipped, with the reason in ``metrics.json``, when they are missing. ``network`` is the
reference itself and ``wiener_dense`` the float64 oracle of ``wiener``; neither is a row.

Options for comparisons a referee accepts (experiments/compare.py; off by default, on in ``long``):

* ``hp_sigma`` (1.0 px): blur of the high-pass r2 recorded beside r2 for every row.
* ``common_subset`` (0 = off): re-run every row with every method on one common random subset of
  that many training images (``long``: the largest ``limit`` of any method, 100) and tabulate it
  separately.
* ``calibrate_peers``: add ``<label>_calibrated`` rows for LS / ELS / bbELS (LS's schedule
  calibrated against this network) and PSPC-Square (its own), settings in ``calibration``:
  ``num_probes`` probe trajectories, ``criterion`` (cosine, Kamb & Ganguli), ``candidates``
  (empty: odd 3, 5, ... up to the image side), ``limit`` (0: the published row's training set),
  ``pspc_square`` (calibrate PSPC-Square too). Cached by content, so a rerun costs nothing.
* ``scfdm_sigmas``: SCFDM smoothing scales, each its own row ``scfdm_s<sigma>``; the best on
  ``scfdm_probe_samples`` probe trajectories (0: ``calibration.num_probes``) is the row
  ``scfdm_best``, its choice in ``metrics.json["scfdm_selection"]``.
"""

import ml_collections

from configs.sample import PCA_THRESHOLD

LS_SCHEDULES = {
    "fashion_mnist": "fashionmnist_unet_zeros_cond",
    "mnist": "mnist_unet_zeros",
    "cifar10_catsdogs": "cifar10_unet_zeros_cond",
}


# The reference networks of the headline comparison ('long' preset of configs/train.py; the
# argument ',long' selects them) and the part of the training split they held out: each the
# export at which its held-out loss had flattened (less than 1 % improvement over the last 20 %
# of the run; `heldout_flatness` in the export's metrics.json). Fashion-MNIST (60k images,
# 1,875 steps per epoch) at 24 epochs, 1.44M images seen. Cats/dogs (2,000 images) has no
# `long` preset; its strongest network is the 1.5M-parameter UNet trained for 208 epochs with a
# cosine anneal (README, Trained networks).
LONG_NETS = {
    "fashion_mnist": "checkpoints/fashion_mnist_unet_long/epoch_24",
    "mnist": "checkpoints/mnist_unet_long/epoch_80",
    "cifar10_catsdogs": "checkpoints/cifar10_catsdogs_unet_cpu32_anneal",
}
LONG_HOLDOUT = {"mnist": 0.1}


def _ddim_abs(num_steps: int = 10):
    from locality import schedules

    sched = schedules.ddpm_linear()
    return tuple(float(sched.ab(int(t))) for t in schedules.ddim_timesteps(num_steps))


# SCFDM smoothing scales swept by the `long` preset (units of x_t; the published 0.1 included)
SCFDM_SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def get_config(arg: str = "fashion_mnist"):
    if arg.strip() == "smoke":
        return _smoke()
    parts = [p.strip() for p in arg.split(",")]
    dataset, quick, long_net = parts[0], "quick" in parts[1:], "long" in parts[1:]
    if set(parts[1:]) - {"quick", "long"}:
        raise ValueError(f"config arg must be '<dataset>[,quick][,long]', got {arg!r}")
    if long_net and dataset not in LONG_NETS:
        raise ValueError(f"',long' has networks for {sorted(LONG_NETS)}, not {dataset!r}")
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.split = "train"
    c.limit = ml_collections.config_dict.placeholder(int)
    # > 0: leave out the class-balanced part of the split that a network trained with the same
    # holdout never saw (configs/train.py 'long' preset on mnist), so every method uses the
    # network's own training set.
    c.holdout = 0.0
    c.holdout_seed = 0
    # ',quick' (the README's main job) and ',long' explain the strong network where one exists
    strong = (long_net or quick) and dataset in LONG_NETS
    c.checkpoint = LONG_NETS[dataset] if strong else f"checkpoints/{dataset}_unet_cpu"
    if strong:
        c.holdout = LONG_HOLDOUT.get(dataset, 0.0)
    c.methods = (
        "pca_locality,pca_locality_chunk_mean,wiener,optimal,nearest,linear,ls,els,bbels,"
        "pspc_square,pspc_flex,scfdm"
    )
    thr = PCA_THRESHOLD.get(dataset, 0.005)
    sched = LS_SCHEDULES.get(dataset, 3)
    c.method_kwargs = ml_collections.ConfigDict(
        {
            "pca_locality": {"threshold": thr, "softmax": "exact"},
            "pca_locality_chunk_mean": {
                "method": "pca_locality",
                "threshold": thr,
                "softmax": "chunk_mean",
                "chunk_size": 512,
            },
            "optimal": {},
            "nearest": {},
            "wiener": {},
            "ls": {"patch_size": sched},
            # ELS / bbELS cost O(B N H^2 W^2 k^2) per call: about 7 ms per (sample, training image)
            # and step on this CPU, so 32 samples x 10 steps x 100 images ~ 4 min.
            "els": {"patch_size": sched, "limit": 100},
            "bbels": {"patch_size": sched, "limit": 100},
            # Niedoba et al.'s published size schedule (CIFAR-10, 18-step EDM grid; sizes over
            # the image side mean the whole image); the `long` preset adds a calibrated row
            "pspc_square": {"patch_size": "cifar10_edm", "flip": True},
            # crops from the network's own gradient heat maps at the sampler's ten levels
            "pspc_flex": {
                "network": c.checkpoint,
                "abs": _ddim_abs(),
                "num_probes": 1,
                "flip": True,
            },
            "linear": {"weights": f"workdirs/linear_gd_ddim_{dataset}/linear_weights.npz"},
            "scfdm": {"num_samples": 10, "sigma_s": 0.1, "seed": 0},
        }
    )
    # methods too slow for the full set on a CPU run on a fixed random subset of `peer_limit` images
    c.peer_limit = 10000
    c.slow_methods = "els,bbels,pspc_square,pspc_flex,scfdm"
    c.num_samples = 32  # the paper uses 64; 32 keeps a full table within ~30 min on 2 CPU cores
    c.batch_size = 16
    c.num_steps = 10
    c.seed = 0
    c.hp_sigma = 1.0  # px: the blur removed before the high-pass r2
    c.common_subset = 0  # > 0: every method again on one common subset of this many images
    c.calibrate_peers = False
    c.calibration = ml_collections.ConfigDict(
        {
            "num_probes": 4,
            "criterion": "cosine",
            "candidates": (),
            "limit": 0,
            "pspc_square": True,
        }
    )
    c.scfdm_sigmas = ()
    c.scfdm_probe_samples = 0  # probes that pick the SCFDM scale; 0: calibration.num_probes
    if dataset == "cifar10_catsdogs":
        # 32x32x3: ELS / bbELS cost ~4x more per image than at 28x28x1
        c.method_kwargs.els.limit = 30
        c.method_kwargs.bbels.limit = 30
    if quick:
        c.num_samples = 8
        c.batch_size = 8
        c.peer_limit = 2000
        c.method_kwargs.els.limit = 50
        c.method_kwargs.bbels.limit = 50
    if long_net:
        c.num_samples = 64  # as the paper
        # pca_locality_chunk_mean (the released code's softmax approximation) is left out: it
        # doubles the cost of the longest row on 60k images and is not part of the headline.
        c.methods = ",".join(m for m in c.methods.split(",") if m != "pca_locality_chunk_mean")
        # PSPC-Square (about 4 min for 64 samples on 60k images) and the SCFDM sweep (about 30 s
        # per scale on 60k) run on the full set; PSPC-Flex (6x PSPC-Square's cost) stays on
        # `peer_limit`; ELS / bbELS on their `limit` (benchmarks/peers.py: one ELS call on 10k
        # images takes ~140 s, so the full set would take ~18 h). The common-subset table
        # compares all of them like with like.
        c.slow_methods = "els,bbels,pspc_flex"
        c.common_subset = max(
            int(kw.get("limit") or 0) for kw in c.method_kwargs.to_dict().values()
        )
        c.calibrate_peers = True
        c.scfdm_sigmas = SCFDM_SIGMAS
    return c


def _smoke():
    """Every option of experiments/compare.py in seconds: 40 synthetic 28 px images, the
    committed Fashion-MNIST CPU network, 2 samples, 3 DDIM steps."""
    c = get_config("fashion_mnist")
    c.dataset = "synthetic"
    c.methods = "wiener,pca_locality,ls,els,pspc_square,scfdm"
    c.method_kwargs.els.limit = 8
    c.method_kwargs.pspc_square.patch_size = "5"
    c.method_kwargs.scfdm.num_samples = 2
    c.num_samples = 2
    c.batch_size = 2
    c.num_steps = 3
    c.common_subset = 8
    c.calibrate_peers = True
    c.calibration.num_probes = 2
    c.calibration.candidates = (3, 5, 7)
    c.scfdm_sigmas = (0.1, 0.5)
    c.scfdm_probe_samples = 2
    return c
