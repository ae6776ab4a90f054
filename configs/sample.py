"""Sampling from analytical denoisers (and trained networks) from shared initial noise.

    python -m experiments.sample --config configs/sample.py:quickstart --workdir workdirs/quickstart
    python -m experiments.sample --config configs/sample.py:pca_locality,fashion_mnist \
        --workdir workdirs/pca_fmnist
    python -m experiments.sample --config configs/sample.py:wiener,cifar10_catsdogs \
        --workdir workdirs/wiener_cats
    # a trained network, e.g. with 250 ancestral (DDPM) steps:
    python -m experiments.sample --config configs/sample.py:network,cifar10_catsdogs --workdir W \
        --config.method_kwargs.network.checkpoint=checkpoints/cifar10_catsdogs_unet_cpu \
        --config.sampler=ddpm --config.num_steps=250 --config.num_samples=64

The argument is "<method>[+<method>...],<dataset>" or a preset ("quickstart"). Any field can be
overridden, e.g. ``--config.num_samples=16 --config.limit=10000``.
"""

import ml_collections

# Released per-dataset thresholds (docs/algorithms.md §5).
PCA_THRESHOLD = {
    "mnist": 0.005,
    "fashion_mnist": 0.005,
    "cifar10_catsdogs": 0.05,
    "cifar10": 0.05,
    "celeb_a_hq": 0.02,
    "afhq": 0.02,
    "lfw_faces": 0.02,
    "natural_patches": 0.05,
}
DATASETS = ("fashion_mnist", "mnist", "cifar10_catsdogs", "lfw_faces", "natural_patches")


def method_defaults(method: str, dataset: str) -> dict:
    if method == "pca_locality":
        return {
            "threshold": PCA_THRESHOLD.get(dataset, 0.005),
            "temperature": 1.0,
            "softmax": "exact",
            "chunk_size": 512,
        }
    if method == "optimal":
        return {"chunk_size": 512}
    if method == "network":  # the committed CPU UNet; any checkpoint or training workdir works
        # labels / guidance only for class-conditional nets: labels "" (none), "cycle" (image i
        # gets class i mod K), "1" or "0,1,..." (one per image); guidance = the CFG weight w.
        return {
            "checkpoint": f"checkpoints/{dataset}_unet_cpu",
            "use_ema": True,
            "labels": "",
            "guidance": 0.0,
        }
    return {}


def get_config(arg: str = "quickstart"):
    if arg == "quickstart":
        methods, dataset = ["wiener", "optimal", "pca_locality"], "fashion_mnist"
    else:
        try:
            m, dataset = arg.split(",")
        except ValueError:
            raise ValueError(
                f"config argument must be '<method>[+<method>...],<dataset>' or "
                f"'quickstart'; got {arg!r}"
            ) from None
        methods = m.split("+")
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.split = "train"
    c.limit = ml_collections.config_dict.placeholder(int)  # first K training images (None = all)
    c.resolution = ml_collections.config_dict.placeholder(int)  # resize to R x R (None = native)
    c.methods = ",".join(methods)
    c.method_kwargs = ml_collections.ConfigDict({m: method_defaults(m, dataset) for m in methods})
    c.sampler = "ddim"  # ddim | ddpm | edm
    c.num_steps = 10
    c.num_samples = 16
    c.seed = 0
    c.shard = False  # shard the training set over all devices
    c.progress = True
    return c
