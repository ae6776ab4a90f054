"""Sample-quality measures: the Frechet distance against float64 oracles (scipy's sqrtm and the
isotropic closed form) and the held-out eps-MSE against nets whose error is known."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from locality import quality, schedules


def _random_gaussian(rng, d):
    a = rng.normal(size=(d, 3 * d))
    return rng.normal(size=d), a @ a.T / (3 * d)


def _fd_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("d", [1, 4, 7])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, d), _random_gaussian(rng, d)
    got = quality.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9, abs=1e-12)
    assert quality.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_isotropic_closed_form_and_rank_deficient():
    d, a, b = 5, 0.3, 2.0
    mu1, mu2 = np.arange(d, dtype=float), np.ones(d)
    expect = np.sum((mu1 - mu2) ** 2) + d * (np.sqrt(a) - np.sqrt(b)) ** 2
    got = quality.frechet_distance(mu1, a * np.eye(d), mu2, b * np.eye(d))
    assert got == pytest.approx(expect, rel=1e-12)
    # Singular covariances (fewer samples than features): still finite and symmetric.
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(3, 6)), rng.normal(size=(4, 6)) + 1.0
    ab, ba = quality.frechet_distance_of(fa, fb), quality.frechet_distance_of(fb, fa)
    assert np.isfinite(ab) and ab == pytest.approx(ba, rel=1e-6)  # round-off of zero eigenvalues
    assert ab == pytest.approx(
        _fd_scipy(*quality.gaussian_fit(fa), *quality.gaussian_fit(fb)), rel=1e-6
    )


def test_gaussian_fit_is_unbiased_float64():
    f = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    mu, cov = quality.gaussian_fit(f)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    np.testing.assert_allclose(cov, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        quality.gaussian_fit(f[:1])


def test_eps_mse_of_an_oracle_net_and_of_the_zero_net():
    sched = schedules.ddpm_linear()
    x0 = np.random.default_rng(0).uniform(-1, 1, (6, 4, 4, 1)).astype(np.float32)
    x0_dev = jnp.asarray(x0)

    def oracle(params, x_t, t, train=False):  # knows x0: inverts the forward process exactly
        ab = jnp.asarray(sched.alphas_cumprod)[t.astype(jnp.int32)][:, None, None, None]
        return (x_t - jnp.sqrt(ab) * x0_dev) / jnp.sqrt(1 - ab)

    ts = (10, 500, 990)
    err = quality.eps_mse(oracle, {}, x0, ts, batch_size=6, schedule=sched)
    assert err.shape == (3, 6) and err.dtype == np.float64
    assert err.max() < 1e-8

    # The zero net's error is the mean square of the noise, drawn as documented.
    zero = lambda params, x_t, t, train=False: jnp.zeros_like(x_t)
    got = quality.eps_mse(zero, {}, x0, ts, seed=3, batch_size=4, schedule=sched)
    for i, t in enumerate(ts):
        key_t = jax.random.fold_in(jax.random.PRNGKey(3), t)
        eps = np.concatenate(
            [
                np.asarray(jax.random.normal(jax.random.fold_in(key_t, j), x0[s : s + 4].shape))
                for j, s in enumerate(range(0, 6, 4))
            ]
        )
        np.testing.assert_allclose(
            got[i], np.mean(eps.astype(np.float64) ** 2, (1, 2, 3)), rtol=1e-6
        )
    with pytest.raises(ValueError, match="outside"):
        quality.eps_mse(zero, {}, x0, (1000,), schedule=sched)


def _bars(n=60, hw=8, seed=0):
    """The two-class bar images of tests/test_guidance.py."""
    from test_guidance import _bars as bars

    return bars(n=n, hw=hw, seed=seed)


def test_cached_classifier_is_keyed_by_content(tmp_path, monkeypatch):
    from locality import classify

    x, y = _bars()
    first = classify.cached_classifier(x, y, tmp_path, epochs=1, seed=0)
    monkeypatch.setattr(
        classify,
        "train_classifier",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("trained again")),
    )
    again = classify.cached_classifier(x, y, tmp_path, epochs=1, seed=0, progress=True)
    np.testing.assert_array_equal(first.features(x), again.features(x))
    assert again.holdout_accuracy == first.holdout_accuracy
    assert again.features(x).shape == (60, 4 * first.width)
    for changed in (dict(images=x[::-1].copy(), labels=y), dict(images=x, labels=1 - y)):
        with pytest.raises(RuntimeError, match="trained again"):
            classify.cached_classifier(
                changed["images"], changed["labels"], tmp_path, epochs=1, seed=0
            )
    with pytest.raises(RuntimeError, match="trained again"):
        classify.cached_classifier(x, y, tmp_path, epochs=2, seed=0)


def test_quality_entry_point(tmp_path, monkeypatch):
    """experiments/quality.py on a tiny labelled set with a held-out part; oracle: the reported
    distance and eps-MSE recomputed from the cached classifier, the checkpoint and the same
    noise."""
    from configs import quality as quality_cfg
    from experiments import quality as quality_exp
    from locality import classify, data, denoisers, sampling
    from locality.train import TrainConfig, train

    x, y = _bars(n=80)

    def fake_load(name, split="train", *, resolution=None, limit=None, with_labels=False, **kw):
        assert split == "train"
        return (x, y) if with_labels else x

    monkeypatch.setattr(data, "load", fake_load)
    monkeypatch.setenv("LOCALITY_CACHE_DIR", str(tmp_path / "cache" / "stats"))
    net = dict(arch="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dropout=0.0)
    train(
        net,
        TrainConfig(batch_size=8, num_steps=2, warmup_steps=0, num_samples=0, progress=False),
        tmp_path / "net",
        images=x,
    )
    c = quality_cfg.get_config("mnist")
    c.networks = f"tiny={tmp_path / 'net'}"
    c.num_samples, c.num_real, c.eval_count, c.num_steps = 12, 6, 5, 2
    c.classifier_epochs, c.progress = 1, False
    summary = quality_exp.run(c, str(tmp_path / "w"))
    assert "tiny" in summary
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    r = m["networks"]["tiny"]
    assert r["step"] == 2 and r["eps_mse_n"] == 5 and m["num_real"] == 6
    assert r["epochs"] == pytest.approx(2 * 8 / 72)
    for f in ("quality.png", "table.md", "samples_tiny.png", "summary.txt"):
        assert (tmp_path / "w" / f).exists(), f

    keep, held = classify.balanced_split(y, 0.1, 0)
    clf = classify.cached_classifier(
        x[keep],
        y[keep],
        str(tmp_path / "cache" / "classifiers"),
        holdout=0.1,
        epochs=1,
        seed=0,
        flip=False,
    )
    real = x[held][np.sort(np.random.default_rng(0).permutation(len(held))[:6])]
    den = denoisers.make("network", checkpoint=str(tmp_path / "net"))
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (12, 8, 8, 1)))
    imgs = np.clip(np.asarray(sampling.ddim(den, x_T, schedules.ddpm_linear(), 2).images), -1, 1)
    want = quality.frechet_distance_of(clf.features(imgs), clf.features(real))
    assert r["fd"] == pytest.approx(want, rel=1e-5)
    per = quality.eps_mse(den.model.apply, den.params, x[held][:5], seed=0)
    assert r["eps_mse_mean"] == pytest.approx(per.mean(), rel=1e-6)


def test_paired_comparison_against_scipy():
    from scipy import stats as sps

    from locality import metrics

    rng = np.random.default_rng(0)
    b = rng.normal(size=32)
    a = b + 0.02 + 0.2 * rng.normal(size=32)
    a[:3] = b[:3]  # three ties
    r = metrics.paired_comparison(a, b)
    d = a - b
    assert r["se"] == pytest.approx(sps.sem(d), rel=1e-12)
    assert r["z"] == pytest.approx(sps.ttest_rel(a, b).statistic, rel=1e-12)
    assert r["ties"] == 3 and r["wins"] + r["losses"] == 29
    assert r["sign_p"] == pytest.approx(sps.binomtest(r["wins"], 29).pvalue, rel=1e-12)
    assert r["median_diff"] == pytest.approx(np.median(d))
    # A consistent small win (24 of 32) is not a tie even where the mean is noisy.
    b = np.zeros(32)
    a = np.where(np.arange(32) < 24, 0.01, -0.2)
    r = metrics.paired_comparison(a, b)
    assert r["wins"] == 24 and r["sign_p"] == pytest.approx(sps.binomtest(24, 32).pvalue)
    assert r["sign_p"] < 0.05 and r["z"] < -1.96 and r["verdict"] == "disagree"
    a = np.r_[np.full(24, 0.01), -0.3, np.full(7, -0.01)]  # one large loss hides 24 wins
    r = metrics.paired_comparison(a, b)
    assert abs(r["z"]) < 1.96 and r["sign_p"] < 0.05 and r["verdict"] == "A"
    assert metrics.paired_comparison(b, b)["verdict"] == "tie"
    assert metrics.paired_comparison(b + 1, b)["verdict"] == "A"
    with pytest.raises(ValueError, match="equal length"):
        metrics.paired_comparison(a, b[:3])


def test_parse_networks():
    from experiments import common
    from experiments import quality as quality_exp

    want = {"a": "ckpt/x", "long run": "ckpt/y"}
    assert common.parse_networks("a=ckpt/x, long run = ckpt/y") == want
    assert quality_exp.parse_networks("a=ckpt/x,long run=ckpt/y", "mnist") == want
    for bad, match in (("a=x,b", "label=path"), ("=x", "label=path"), ("a=x,a=y", "twice")):
        with pytest.raises(ValueError, match=match):
            common.parse_networks(bad)


def test_quality_row_formats_a_record_by_hand():
    from locality import evaluation

    eps = {str(t): {"mean": 0.1 * (i + 1), "se": 0.001} for i, t in enumerate((1, 2, 3, 4, 5))}
    rec = dict(
        trained_on_heldout=True,
        epochs=2.25,
        fd=1.23456,
        confident_fraction=0.5,
        eps_mse_mean=0.3,
        eps_mse=eps,
    )
    assert evaluation.quality_row("net", rec) == (
        "| net (trained on the held-out images) | 2.2 | 1.235 | 0.500 | 0.30000 | "
        "0.10000 ± 0.00100 | 0.20000 ± 0.00100 | 0.30000 ± 0.00100 | 0.40000 ± 0.00100 | "
        "0.50000 ± 0.00100 |"
    )
    head = evaluation.quality_header(0.9)
    assert head[0].count("|") == head[1].count("|") == evaluation.quality_row("x", rec).count("|")


def test_path_record_against_numpy():
    """Best method, mean, standard error (scipy.stats.sem), median and the paired comparison of
    every other method against the best."""
    from scipy import stats as sps

    from locality import evaluation, metrics

    rng = np.random.default_rng(2)
    r = {"a": rng.normal(0.5, 0.1, 9), "b": rng.normal(0.7, 0.1, 9), "c": rng.normal(0, 1, 9)}
    single = {m: v - 0.1 for m, v in r.items()}
    rec = evaluation.path_record(r, single, 9)
    assert rec["best"] == max(r, key=lambda m: float(np.mean(r[m])))
    for m, v in r.items():
        got = rec["final_trajectory_r2"][m]
        assert got["mean"] == pytest.approx(np.mean(v), rel=1e-12)
        assert got["se"] == pytest.approx(sps.sem(v), rel=1e-12)
        assert got["median"] == pytest.approx(np.median(v)) and got["per_sample"] is v
        assert rec["single_step_r2_stepmean"][m]["se"] == pytest.approx(sps.sem(v), rel=1e-9)
    best = rec["best"]
    assert set(rec["paired_vs_best"]) == set(r) - {best}
    for m, p in rec["paired_vs_best"].items():
        assert p == metrics.paired_comparison(r[best], r[m])
    row = evaluation.path_row("n1", 1.5, r, rec, 9)
    assert row.startswith(f"| n1 | 1.5 | {np.mean(r['a']):.3f} ± {sps.sem(r['a']):.3f} | ")
    assert f"| {best} | " in row and row.count(" wins, ") == 2
