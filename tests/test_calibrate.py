"""Patch-size calibration: a machine with known locality calibrates back to its own size."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from locality.denoisers import calibration as C
from locality.denoisers import local_score as L
from locality.denoisers import pspc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(n=12, shape=(6, 6, 1), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + shape).astype(np.float32)


def _x_T(b, shape):
    return jax.random.normal(jax.random.key(0), (b,) + shape)


@pytest.mark.parametrize("criterion", ["cosine", "greedy"])
def test_ls_reference_calibrates_back_to_its_k(criterion):
    train = _train()
    reference = L.make_ls(train=train, patch_size=5, chunk_size=4)
    machine = L.make_ls(train=train, patch_size=3, chunk_size=4)
    cal = C.calibrate(
        reference,
        machine,
        (3, 5, 7),
        _x_T(3, (6, 6, 1)),
        timesteps=[700, 400, 200],
        criterion=criterion,
    )
    assert cal.sizes.tolist() == [5, 5, 5]
    assert (cal.per_seed == 5).all()
    assert cal.schedule().size(float(cal.abs[1])) == 5
    if criterion == "cosine":
        assert np.allclose(cal.scores[:, :, 1], 1.0) and (cal.scores[:, :, 0] < 1 - 1e-6).all()


def test_pspc_reference_calibrates_back_to_its_size():
    train = _train(seed=1)
    reference = pspc.make_pspc_square(train=train, patch_size=4, flip=False, chunk_size=4)
    machine = pspc.make_pspc_square(train=train, patch_size=3, flip=False, chunk_size=4)
    cal = C.calibrate(
        reference, machine, (3, 4, 5), _x_T(2, (6, 6, 1)), timesteps=[600, 250], criterion="greedy"
    )
    assert cal.sizes.tolist() == [4, 4]


def test_calibrate_errors_and_median():
    train = _train()
    den = L.make_ls(train=train)
    with pytest.raises(ValueError, match="increasing"):
        C.calibrate(den, den, (5, 3), _x_T(1, (6, 6, 1)))
    with pytest.raises(ValueError, match="odd"):
        C.calibrate(den, den, (3, 4), _x_T(1, (6, 6, 1)))
    with pytest.raises(ValueError, match="criterion"):
        C.calibrate(den, den, (3, 5), _x_T(1, (6, 6, 1)), criterion="l1")
    assert C._lower_median(np.array([7, 3, 5, 5])) == 5
    assert C._lower_median(np.array([5, 3])) == 3


def _load_entry_point():
    spec = importlib.util.spec_from_file_location(
        "calibrate_entry", os.path.join(ROOT, "experiments", "calibrate.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_entry_point_smoke(tmp_path):
    mod = _load_entry_point()
    config_spec = importlib.util.spec_from_file_location(
        "calibrate_config", os.path.join(ROOT, "configs", "calibrate.py")
    )
    cfg_mod = importlib.util.module_from_spec(config_spec)
    config_spec.loader.exec_module(cfg_mod)
    config = cfg_mod.get_config("ls,fashion_mnist")
    npy = str(tmp_path / "train.npy")
    np.save(npy, _train())
    config.dataset = "npy:" + npy
    config.method_kwargs = ml_collections.ConfigDict({"chunk_size": 4})
    config.reference = "ls"
    config.reference_kwargs = ml_collections.ConfigDict({"patch_size": 5, "chunk_size": 4})
    config.criterion = "both"
    config.candidates = (3, 5, 7)
    config.timesteps = (700, 400, 200)
    config.num_seeds = 3
    config.output = str(tmp_path / "copy.json")
    workdir = str(tmp_path / "run")
    summary = mod.run(config, workdir)
    assert "cosine" in summary and "greedy" in summary
    for name in (
        "config.json",
        "metrics.json",
        "summary.txt",
        "schedule_ls.png",
        "schedule_ls_cosine.json",
        "schedule_ls_greedy.json",
    ):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    sched = json.load(open(os.path.join(workdir, "schedule_ls_greedy.json")))
    assert sched["sizes"] == [5, 5, 5] and sched["criterion"] == "greedy"
    den = L.make_ls(train=_train(), patch_size="file:" + config.output)
    assert den.size_at(sched["grid"][0]) == 5


def test_peer_configs_build_every_method():
    from locality import denoisers
    from locality.denoisers import scfdm  # noqa: F401  (registration)

    spec = importlib.util.spec_from_file_location(
        "peers_config", os.path.join(ROOT, "configs", "peers.py")
    )
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    shapes = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1), "cifar10_catsdogs": (32, 32, 3)}
    for method in cfg.METHODS:
        for dataset in cfg.DATASETS:
            c = cfg.get_config(f"{method},{dataset}")
            assert (c.method, c.dataset) == (method, dataset)
            assert c.sampler == ("edm" if method.startswith("pspc") else "ddim")
            kw = c.method_kwargs.to_dict()
            h, w, ch = shapes[dataset]
            if method == "pspc_flex":  # the network's heat maps replaced by given crops
                kw.pop("network")
                kw["masks"] = np.eye(h * w)
            den = denoisers.make(method, train=np.zeros((2, h, w, ch), np.float32), **kw)
            assert den.shape == (h, w, ch)
    with pytest.raises(ValueError, match="unknown method"):
        cfg.get_config("optimal,mnist")
