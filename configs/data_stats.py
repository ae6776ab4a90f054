"""Data-statistics experiments (``experiments/data_stats.py``): injected long-range links,
permuted pixels, and Wiener fields against principal components of aligned faces.

    python -m experiments.data_stats --config configs/data_stats.py:fashion_mnist \
        --workdir workdirs/data_stats_fmnist

The networks trained on transformed data come from (about 20 min each on one CPU core)::

    python -m experiments.train --config configs/train.py:fashion_mnist,cpu,unet \
        --config.train.transform=link:18,10,0,0,5 --workdir workdirs/fashion_mnist_unet_cpu_link \
        --export_to checkpoints/fashion_mnist_unet_cpu_link
    python -m experiments.train --config configs/train.py:fashion_mnist,cpu,unet \
        --config.train.transform=permute:0 --workdir workdirs/fashion_mnist_unet_cpu_permute \
        --export_to checkpoints/fashion_mnist_unet_cpu_permute
    python -m experiments.train --config configs/train.py:fashion_mnist,cpu,dit \
        --config.train.transform=permute:0 --workdir workdirs/fashion_mnist_dit_cpu_permute \
        --export_to checkpoints/fashion_mnist_dit_cpu_permute

Any dataset name works the same way (``configs/data_stats.py:mnist`` reads
``checkpoints/mnist_unet_cpu_link`` and so on; missing networks are skipped). ``"smoke"`` is a
seconds-long variant on synthetic 8x8 images without networks, for tests.
"""

import ml_collections

from configs.sensitivity import NO_TEST_SPLIT


def get_config(arg: str = "fashion_mnist"):
    c = ml_collections.ConfigDict()
    c.parts = ("link", "permute", "pcs")
    c.dataset = arg
    c.resolution = ml_collections.config_dict.placeholder(int)
    c.stats_split = "train"
    c.stats_limit = ml_collections.config_dict.placeholder(int)
    c.test_split = "test"
    c.num_inputs = 16
    c.test_random = False
    if arg in NO_TEST_SPLIT:  # inputs: a random (seeded) choice of training images
        c.test_split = "train"
        c.test_random = True
    c.timesteps = (50, 100, 200, 300, 500, 700)
    c.seed = 0

    # (a) copy the 5x5 block at (18, 10) (garment, high variance) over the top-left corner block
    # (background, near-zero variance): the block centres (20, 12) and (2, 2) are 20.6 px apart.
    c.link = ml_collections.ConfigDict()
    c.link.spec = "link:18,10,0,0,5"
    c.link.networks = ml_collections.ConfigDict(
        {
            "unet_original": f"checkpoints/{arg}_unet_cpu",
            "unet_linked": f"checkpoints/{arg}_unet_cpu_link",
        }
    )

    # (b) one fixed permutation of the 784 pixel positions.
    c.permute = ml_collections.ConfigDict()
    c.permute.spec = "permute:0"
    c.permute.pixels = ((14, 14), (7, 14), (14, 5), (21, 21))
    c.permute.num_samples = 16
    c.permute.networks = ml_collections.ConfigDict(
        {
            "unet_original": f"checkpoints/{arg}_unet_cpu",
            "dit_original": f"checkpoints/{arg}_dit_cpu",
            "unet_permuted": f"checkpoints/{arg}_unet_cpu_permute",
            "dit_permuted": f"checkpoints/{arg}_dit_cpu_permute",
        }
    )

    # (c) aligned faces: Wiener rows against the top principal components.
    c.pcs = ml_collections.ConfigDict()
    c.pcs.dataset = "lfw_faces"
    c.pcs.resolution = ml_collections.config_dict.placeholder(int)
    c.pcs.limit = ml_collections.config_dict.placeholder(int)
    c.pcs.pixels = ((12, 12), (8, 8), (16, 12))  # centre, left eye region, mouth region
    c.pcs.top_k = (1, 4, 16, 64)

    if arg == "smoke":
        c.dataset = "synthetic"
        c.stats_limit = 256
        c.num_inputs = 4
        c.timesteps = (100, 600)
        c.link.spec = "link:5,5,0,0,2"
        c.link.networks = ml_collections.ConfigDict({})
        c.permute.pixels = ((4, 4), (1, 6))
        c.permute.num_samples = 0
        c.permute.networks = ml_collections.ConfigDict({})
        c.pcs.dataset = "synthetic"
        c.pcs.limit = 64
        c.pcs.pixels = ((4, 4),)
        c.pcs.top_k = (1, 4, 16)
    return c
