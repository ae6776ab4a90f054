"""Sampling with the peer analytical machines: LS, ELS, bbELS, PSPC-Square, PSPC-Flex, SCFDM.

    python -m experiments.sample --config configs/peers.py:ls,fashion_mnist \
        --workdir workdirs/peers_ls_fashion_mnist
    python -m experiments.sample --config configs/peers.py:pspc_square,cifar10_catsdogs \
        --workdir workdirs/peers_pspc_square_cifar10_catsdogs

The argument is "<method>,<dataset>" with method in ls | els | bbels | pspc_square | pspc_flex |
scfdm and dataset in fashion_mnist | mnist | cifar10_catsdogs. The denoiser is built as
``denoisers.make(config.method, train=<training set>, **config.method_kwargs)``.

Defaults: ls/els/bbels use Kamb & Ganguli's published UNet schedule for the dataset (calibrated on
their 32 px nets; replace it by a schedule calibrated against our network with
``--config.method_kwargs.patch_size=file:workdirs/calibrate_ls_fmnist/schedule_ls_cosine.json``,
see configs/calibrate.py) and DDIM, 10 steps. pspc_square uses Niedoba et al.'s CIFAR-10 EDM
schedule (sizes clipped to the image) with horizontal flips and the 18-step EDM sampler;
pspc_flex grows its crops from the network checkpoint's gradient heat maps at every other sigma of
that EDM grid (2 probes each; about H*W network VJPs per sigma and probe -- roughly 30 s each for
the 28 px CPU UNet on a busy 2-core machine).
scfdm: R = 10 input perturbations of scale 0.1, DDIM 10 steps. ELS / bbELS cost
O(N H^2 W^2 k^2) per call: on a CPU use ``--config.limit=10000`` (or fewer).
"""

import ml_collections

METHODS = ("ls", "els", "bbels", "pspc_square", "pspc_flex", "scfdm")
DATASETS = ("fashion_mnist", "mnist", "cifar10_catsdogs")
LS_SCHEDULES = {
    "fashion_mnist": "fashionmnist_unet_zeros_cond",
    "mnist": "mnist_unet_zeros",
    "cifar10_catsdogs": "cifar10_unet_zeros_cond",
}
EDM_STEPS = 18


def _edm_sigmas(num_steps: int):
    """Nonzero sigmas of the EDM grid the sampler uses (kept here so the config is pure data)."""
    from locality import schedules

    return [float(s) for s in schedules.edm_sigmas(num_steps)[:-1]]


def method_kwargs(method: str, dataset: str) -> dict:
    if method in ("ls", "els", "bbels"):
        kw = {"patch_size": LS_SCHEDULES[dataset]}
        if method == "els":
            kw["dictionary"] = "wrapped"
        return kw
    if method == "pspc_square":
        return {"patch_size": "cifar10_edm", "flip": True}
    if method == "pspc_flex":
        # heat maps at every other sigma of the sampler's grid (the nearest one in log sigma is
        # used in between), 2 probes each: H*W network VJPs per (sigma, probe)
        return {
            "network": f"checkpoints/{dataset}_unet_cpu",
            "sigmas": _edm_sigmas(EDM_STEPS)[::2],
            "lam": 0.9,
            "num_probes": 2,
            "flip": True,
        }
    return {"num_samples": 10, "sigma_s": 0.1, "seed": 0, "smoothing": "input"}


def get_config(arg: str = "ls,fashion_mnist"):
    try:
        method, dataset = arg.split(",")
    except ValueError:
        raise ValueError(f"config argument must be '<method>,<dataset>'; got {arg!r}") from None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; one of {DATASETS}")
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.split = "train"
    c.limit = ml_collections.config_dict.placeholder(int)  # first K training images
    c.resolution = ml_collections.config_dict.placeholder(int)  # resize to R x R (None = native)
    c.method = method
    c.method_kwargs = ml_collections.ConfigDict(method_kwargs(method, dataset))
    edm = method.startswith("pspc")
    c.sampler = "edm" if edm else "ddim"
    c.num_steps = EDM_STEPS if edm else 10
    c.num_samples = 16
    c.seed = 0
    c.shard = False  # read by experiments/sample.py (sharding of optimal / pca_locality)
    c.progress = True
    return c
