"""The held-out classifier (locality.classify) and experiments/guidance.py on tiny data."""

import json

import jax
import numpy as np
import pytest

from configs import guidance as guidance_cfg
from experiments import guidance
from locality import data, denoisers, sampling
from locality.classify import balanced_split, label_agreement, train_classifier
from locality.train import TrainConfig, train


def _bars(n=120, hw=8, seed=0):
    """Class 0: a bright horizontal bar, class 1: a vertical one, at random positions, + noise."""
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.standard_normal((n, hw, hw, 1)).astype(np.float32) - 0.5
    y = np.arange(n) % 2
    pos = rng.integers(1, hw - 1, n)
    for i in range(n):
        if y[i] == 0:
            x[i, pos[i], :, 0] = 1.0
        else:
            x[i, :, pos[i], 0] = 1.0
    return np.clip(x, -1, 1), y


def test_balanced_split():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 20)
    tr, ho = balanced_split(labels, 0.1, seed=3)
    assert not set(tr) & set(ho) and sorted(np.concatenate([tr, ho])) == list(range(60))
    assert [int(np.sum(labels[ho] == c)) for c in range(3)] == [3, 1, 2]
    tr2, ho2 = balanced_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(ho, ho2)
    assert not np.array_equal(ho, balanced_split(labels, 0.1, seed=4)[1])
    with pytest.raises(ValueError, match="holdout"):
        balanced_split(labels, 1.0, 0)


def test_classifier_learns_a_separable_rule_and_agreement_counts():
    x, y = _bars()
    clf = train_classifier(x, y, epochs=15, batch_size=16, width=8, flip=False, seed=0)
    assert clf.holdout_size == 12 and clf.holdout_accuracy >= 0.9
    fresh, fy = _bars(n=40, seed=1)
    pred = clf.predict(fresh)
    acc = float(np.mean(pred == fy))
    assert acc >= 0.9
    a = label_agreement(clf, fresh, fy)
    assert a["agreement"] == pytest.approx(acc)
    assert label_agreement(clf, fresh, 1 - fy)["agreement"] == pytest.approx(1 - acc)
    assert a["per_class"][0] == pytest.approx(float(np.mean(pred[fy == 0] == 0)))
    assert sum(a["predicted_fractions"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        train_classifier(x, y + 5, num_classes=2)


def test_parse_weights():
    from locality.generation import parse_weights

    assert parse_weights("0, 1,3") == [0.0, 1.0, 3.0]
    assert parse_weights("") == []
    for bad in ("a,b", "1,1", "nan"):
        with pytest.raises(ValueError, match="guidance"):
            parse_weights(bad)


@pytest.fixture
def bars_data(monkeypatch):
    x, y = _bars(n=64)

    def fake_load(name, split="train", *, with_labels=False, **kw):
        return (x, y) if with_labels else x

    monkeypatch.setattr(data, "load", fake_load)
    return x, y


def test_guidance_entry_point(bars_data, tmp_path):
    x, y = bars_data
    net = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)
    cfg = TrainConfig(
        batch_size=8,
        num_steps=3,
        lr=1e-2,
        warmup_steps=0,
        num_samples=0,
        progress=False,
        label_lr_mult=100.0,
        ema_decay=0.0,
    )  # label visibly matters
    train(dict(net, num_classes=2), cfg, tmp_path / "cond", images=x, labels=y)
    train(net, cfg, tmp_path / "unc", images=x)

    c = guidance_cfg.get_config("bars")
    c.checkpoint = str(tmp_path / "cond")
    c.guidance, c.num_samples, c.num_steps = "0,2", 4, 3
    c.classifier_epochs, c.progress = 1, False
    summary = guidance.run(c, str(tmp_path / "w"))
    assert "label agreement" in summary
    w = tmp_path / "w"
    for f in (
        "samples_no_label.png",
        "samples_w0.png",
        "samples_w2.png",
        "guidance.png",
        "samples.npz",
        "metrics.json",
        "summary.txt",
        "config.json",
    ):
        assert (w / f).exists(), f
    m = json.loads((w / "metrics.json").read_text())
    assert set(m["settings"]) == {"no_label", "w0", "w2"}
    assert 0.0 <= m["settings"]["w2"]["agreement"] <= 1.0
    assert m["classifier"]["holdout_size"] == 6
    # oracle: the w = 2 samples are the checkpoint sampled directly with the same noise and key
    got = np.load(w / "samples.npz")
    np.testing.assert_array_equal(got["requested"], [0, 1, 0, 1])
    key = jax.random.key(c.seed)
    for name, lab, g in (("w2", "cycle", 2.0), ("no_label", None, 0.0)):
        den = denoisers.make("network", checkpoint=c.checkpoint, labels=lab, guidance=g)
        ref = sampling.ddpm(den, got["x_T"], key=jax.random.fold_in(key, 1), num_steps=3)
        np.testing.assert_allclose(got[name], np.asarray(ref.images), atol=1e-5)
    assert np.abs(got["w2"] - got["no_label"]).max() > 1e-4

    c.checkpoint = str(tmp_path / "unc")
    with pytest.raises(ValueError, match="not class-conditional"):
        guidance.run(c, str(tmp_path / "w2"))


def test_agreement_summary():
    from locality.evaluation import agreement_summary

    agree = {
        "agreement": 0.75,
        "per_class": {0: 1.0, 1: 0.5},
        "mean_prob_requested": 0.6,
        "predicted_fractions": {0: 0.625, 1: 0.375},
    }
    rec, desc = agreement_summary(agree, labelled=True)
    assert rec == agree and rec is not agree
    assert desc == "label agreement 0.750 (per class 0: 1.00, 1: 0.50)"
    rec, desc = agreement_summary(agree, labelled=False)
    assert rec == {"predicted_fractions": {0: 0.625, 1: 0.375}}
    assert desc == "predicted class 0: 0.62, class 1: 0.38"
