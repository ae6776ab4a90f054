"""Sensitivity fields (Jacobian rows) of several denoisers across noise levels
(docs/algorithms.md §9).

    python -m experiments.sensitivity --config configs/sensitivity.py:fashion_mnist \
        --workdir workdirs/sensitivity_fmnist

Models: the Wiener filter of the training set (always); the gradient-descent linear denoisers of
``config.linear_weights`` (written by ``experiments/linear_gd.py``) when that file exists; and each
trained network in ``config.networks`` (name -> checkpoint directory, built with
``denoisers.make("network", checkpoint=...)``; ``unet`` / ``dit``: the short ``cpu``-preset nets,
``unet_long``: the strong net of ``configs/compare.py``'s ``LONG_NETS``) when its directory
exists; and, with ``pca_mask_threshold > 0``, the masks of the paper's denoiser for the probed
pixels at every level (model ``pca_locality_mask``, docs/algorithms.md §5). Missing ones are
skipped and listed in ``metrics.json``. Overrides, e.g. ``--config.num_inputs=32
--config.networks.unet=checkpoints/other --config.pixels='((14, 14), (5, 5))'``
(``pixels`` unset: a 4 x 4 grid of pixels spread over the image, ``num_pixels=16``).
``"<dataset>,quick"`` uses 4 noisy inputs (the README's main job); ``"smoke"`` is a seconds-long
variant on a synthetic 8x8 set for tests.
"""

import ml_collections

from configs.compare import LONG_NETS
from configs.sample import PCA_THRESHOLD

# Offline sources with a training split only (locality.data.info(name)["splits"]).
NO_TEST_SPLIT = ("mnist", "cifar10_catsdogs", "lfw_faces", "natural_patches")


def get_config(arg: str = "fashion_mnist"):
    parts = [p.strip() for p in arg.split(",")]
    if set(parts[1:]) - {"quick"}:
        raise ValueError(f"config arg must be '<dataset>[,quick]', got {arg!r}")
    arg = parts[0]
    c = ml_collections.ConfigDict()
    c.dataset = arg
    c.stats_split = "train"
    c.stats_limit = ml_collections.config_dict.placeholder(int)  # images for the Wiener statistics
    c.test_split = "test"
    c.num_inputs = 16  # M clean test images, one noisy input each per level
    c.test_random = False  # True: M images at random (seed) instead of the first M
    if arg in NO_TEST_SPLIT:  # inputs from the training split, a random (seeded) choice
        c.test_split = "train"
        c.test_random = True
    c.resolution = ml_collections.config_dict.placeholder(int)
    c.timesteps = (50, 100, 200, 300, 500, 700)  # DDPM linear schedule, ab = alphas_cumprod[t]
    # Probed output pixels (row, col): None = sensitivity.spread_pixels(H, W, num_pixels), a
    # regular grid over the image (4 x 4 for 16); an explicit tuple of pairs is used as given.
    c.pixels = ml_collections.config_dict.placeholder(tuple)
    c.num_pixels = 16
    c.seed = 0
    c.linear_weights = (
        "workdirs/linear_gd_fmnist/linear_weights.npz"
        if arg == "fashion_mnist"
        else f"workdirs/linear_gd_{arg}/linear_weights.npz"
    )
    c.linear_tolerance = 1e-5  # use a linear W only at levels it was trained for
    c.networks = ml_collections.ConfigDict(
        {
            "unet": f"checkpoints/{arg}_unet_cpu",
            "dit": f"checkpoints/{arg}_dit_cpu",
        }
    )
    # the strong network of the headline comparison (cats/dogs' strong nets have runs of their
    # own: results/sensitivity_cifar10_catsdogs_cpu32*)
    if arg in LONG_NETS and arg != "cifar10_catsdogs":
        c.networks.unet_long = LONG_NETS[arg]
    # > 0: the pca_locality masks (this threshold) of the probed pixels at every level, as a
    # model "pca_locality_mask" beside the fields (0 = off)
    c.pca_mask_threshold = PCA_THRESHOLD.get(arg, 0.005)
    c.pixel_batch = 0  # >0: pull back this many cotangents at a time (less memory)
    # Radii and IoUs are taken at 50 % and 90 % of a field's mass (the metrics.json schema).
    c.reference = "wiener"  # the model every other one is judged against (summary verdicts)
    if "quick" in parts[1:]:
        c.num_inputs = 4
    if arg == "smoke":
        c.dataset = "synthetic"
        c.stats_limit = 256
        c.num_inputs = 4
        c.timesteps = (100, 600)
        c.linear_weights = ""
        c.networks = ml_collections.ConfigDict({})
        c.pca_mask_threshold = 0.005
    return c
