"""Score comparison: analytical denoisers against a trained network along DDIM trajectories.

    python experiments/compare.py --config configs/compare.py:fashion_mnist --workdir workdirs/compare_fashion_mnist

For every method: S samples (default 64) from the same initial noise as the network, 10-step DDIM
of the paper's release; per step r2 / MSE / Pearson r of x0_hat, trajectory-vs-trajectory and
single-step (the network evaluated on the method's own states). Override the network with
``--config.checkpoint=PATH`` and the methods with ``--config.methods=pca_locality,wiener``.
"""

import ml_collections

from configs.sample import PCA_THRESHOLD

LS_SCHEDULES = {"fashion_mnist": "fashionmnist_unet_zeros_cond", "mnist": "mnist_unet_zeros",
                "cifar10_catsdogs": "cifar10_unet_zeros_cond"}


def get_config(arg: str = "fashion_mnist"):
    dataset = arg
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.split = "train"
    c.limit = ml_collections.config_dict.placeholder(int)
    c.checkpoint = f"checkpoints/{dataset}_unet_cpu"
    c.methods = "pca_locality,pca_locality_chunk_mean,wiener,optimal,nearest,ls,els,bbels,pspc_square,scfdm"
    thr = PCA_THRESHOLD.get(dataset, 0.005)
    sched = LS_SCHEDULES.get(dataset, 3)
    c.method_kwargs = ml_collections.ConfigDict({
        "pca_locality": {"threshold": thr, "softmax": "exact"},
        "pca_locality_chunk_mean": {"method": "pca_locality", "threshold": thr,
                                    "softmax": "chunk_mean", "chunk_size": 512},
        "optimal": {}, "nearest": {}, "wiener": {},
        "ls": {"patch_size": sched}, "els": {"patch_size": sched}, "bbels": {"patch_size": sched},
        "pspc_square": {"patch_size": 5, "flip": True},
        "scfdm": {"num_samples": 10, "sigma_s": 0.1, "seed": 0},
    })
    # methods that are too slow on the full set on a CPU run on the first `peer_limit` images
    c.peer_limit = 10000
    c.slow_methods = "els,bbels,pspc_square,scfdm"
    c.num_samples = 64
    c.batch_size = 16
    c.num_steps = 10
    c.seed = 0
    return c
