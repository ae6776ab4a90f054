"""experiments/report.py and experiments/report_parts/ on hand-made run directories (numbers
chosen here, verdict words checked against hand-decided cases and a numpy / scipy oracle)."""

import json

import numpy as np
import pytest
from scipy import stats as sps

from experiments import report
from experiments.report_parts import common, compare, paired, paper

# ------------------------------------------------------------------ hand-made run directories


def _method(per_sample, train_size=40, hp=None, method=None):
    per_sample = np.asarray(per_sample, np.float64)
    r = {
        "final_trajectory_r2_mean": float(per_sample.mean()),
        "final_trajectory_r2_median": float(np.median(per_sample)),
        "final_trajectory_r2_per_sample": per_sample.tolist(),
        "train_size": train_size,
        "seconds": 1.0,
        "timesteps": [900, 0],
        "trajectory": {"r2": [0.1, float(per_sample.mean())]},
        "single_step": {"r2": [0.2, float(per_sample.mean())]},
    }
    if hp is not None:
        r["final_trajectory_hp_r2_mean"] = hp
    if method is not None:
        r["method"] = method
    return r


def _compare_run(d, methods, checkpoint="ckpt", cfg=None, **extra):
    d.mkdir(parents=True)
    n = len(next(iter(methods.values()))["final_trajectory_r2_per_sample"])
    m = {
        "dataset": "toy",
        "checkpoint": checkpoint,
        "methods": methods,
        "num_samples": n,
        "command": f"python -m experiments.compare --config configs/compare.py:toy --workdir {d}",
        **extra,
    }
    (d / "metrics.json").write_text(json.dumps(m))
    if cfg is not None:
        (d / "config.json").write_text(json.dumps(cfg))


def _checkpoint(d, steps, batch, holdout=None):
    """A fake network export: the files the report reads for the epoch count."""
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"steps": steps}))
    (d / "config.json").write_text(json.dumps({"train": {"batch_size": batch, "holdout": holdout}}))
    return str(d)


def _build(tmp_path):
    res = tmp_path / "results"
    return report.build_report(str(res), str(res / "REPORT.md"), str(tmp_path / "none"))


# diffs d = ours - peer of four hand-decided cases (n = 32 unless noted)
CATS_DOGS = [-0.02] * 24 + [0.05] * 8  # mean -0.0025 (0.5 SE), peer wins 24/32: sign p = 0.007
ONE_SIDED_MEAN = [0.5] * 12 + [-0.01] * 10  # mean 0.27 (4.8 SE), 12 wins of 22: sign p = 0.83
BALANCED = [0.01, -0.01] * 16  # mean 0, 16 wins of 32: a tie by both tests
CASES = {
    "better": (np.full(32, 0.2) + np.linspace(-0.01, 0.01, 32), "better"),
    "worse": (np.full(32, -0.2) + np.linspace(-0.01, 0.01, 32), "worse"),
    "tie": (np.asarray(BALANCED), "tie"),
    "cats_dogs": (np.asarray(CATS_DOGS), "mixed (mean: tie, sign test: worse)"),
    "one_sided_mean": (np.asarray(ONE_SIDED_MEAN), "mixed (mean: better, sign test: tie)"),
}


def _oracle(d):
    """The verdict rule written out with numpy and scipy.stats.binomtest."""
    d = np.asarray(d, np.float64)
    se = d.std(ddof=1) / np.sqrt(d.size)
    by_mean = "tie" if abs(d.mean()) <= 2 * se else ("better" if d.mean() > 0 else "worse")
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = sps.binomtest(wins, wins + losses, 0.5).pvalue
    by_sign = "tie" if p >= 0.05 else ("better" if wins > losses else "worse")
    return by_mean if by_mean == by_sign else f"mixed (mean: {by_mean}, sign test: {by_sign})"


# ------------------------------------------------------------------ the paired verdict rule


@pytest.mark.parametrize("case", sorted(CASES))
def test_paired_verdict_rule(case):
    d, want = CASES[case]
    b = np.linspace(0.3, 0.6, d.size)  # the peer's per-sample r2; ours = b + d
    stats = paired.paired_stats((b + d).tolist(), b.tolist())
    assert paired.verdict(stats) == want == _oracle(d)
    assert stats["wins"] == int((d > 0).sum()) and stats["n"] == d.size
    np.testing.assert_allclose(stats["mean_diff"], d.mean(), atol=1e-12)
    np.testing.assert_allclose(stats["se"], d.std(ddof=1) / np.sqrt(d.size), rtol=1e-9)


def test_cats_dogs_like_case_is_not_a_tie():
    """Mean inside 2 paired SE but the peer wins 24 of 32 samples: the sign test separates."""
    d = np.asarray(CATS_DOGS)
    stats = paired.paired_stats((0.5 + d).tolist(), [0.5] * 32)
    assert abs(stats["mean_diff"]) < 2 * stats["se"]
    assert stats["sign_p"] == pytest.approx(sps.binomtest(8, 32, 0.5).pvalue)
    assert stats["sign_p"] < 0.05
    assert paired.verdict(stats) != "tie"
    assert paired.cells(stats)[2:4] == ["8/32", "0.007"]


def test_missing_per_sample_data_gives_no_verdict():
    assert paired.paired_stats(None, [0.1, 0.2]) is None
    assert paired.paired_stats([0.1, 0.2, 0.3], [0.1, 0.2]) is None  # not the same samples
    assert paired.verdict(None) == paired.NO_DATA == "no per-sample data"
    assert paired.cells(None)[-1] == "no per-sample data"


def test_readme_verdict_words():
    assert compare.readme_verdict({"wiener": "better", "ls": "better"}) == (
        "matches the network better than every peer"
    )
    assert compare.readme_verdict({"wiener": "worse", "ls": "tie", "els": "better"}) == (
        "beaten by wiener; tied with ls"
    )
    assert compare.readme_verdict({"wiener": "tie", "ls": "better"}) == (
        "no peer is better; tied with wiener"
    )
    mixed = "mixed (mean: tie, sign test: worse)"
    assert compare.readme_verdict({"wiener": mixed, "ls": "better"}) == (
        "mixed vs wiener (mean: tie, sign test: worse)"
    )
    assert compare.readme_verdict({"optimal": paired.NO_DATA, "ls": "better"}) == (
        "no per-sample data for optimal"
    )


# ------------------------------------------------------------------ comparison sections


def test_compare_sections_verdicts_titles_and_readme(tmp_path):
    res = tmp_path / "results"
    b = np.linspace(0.3, 0.6, 32)
    ours = b + np.asarray(CATS_DOGS)
    ck_a = _checkpoint(tmp_path / "ck_a", steps=100, batch=4)  # 100 * 4 / 40 = 10 epochs
    ck_b = _checkpoint(tmp_path / "ck_b", steps=30, batch=4)  # 3 epochs
    _compare_run(
        res / "compare_a",
        {
            "pca_locality": _method(ours),
            "wiener": _method(b),  # the cats/dogs-like peer
            "optimal": _method(ours - 0.3),  # clearly worse than ours
            "els": _method(ours + 0.2, train_size=10),  # clearly better, on a subset
        },
        checkpoint=ck_a,
        cfg={"method_kwargs": {"els": {"limit": 10}}, "slow_methods": "els"},
    )
    _compare_run(res / "compare_b", {"pca_locality": _method(ours), "wiener": _method(b)}, ck_b)
    # a second run against network a (no pca_locality): same section as compare_a
    _compare_run(res / "compare_c", {"wiener": _method(b), "linear": _method(b - 0.1)}, ck_a)
    text, rows = _build(tmp_path)
    titles = [line for line in text.splitlines() if line.startswith("### Score comparison")]
    assert titles == [
        f"### Score comparison: toy, network `{ck_a}` (10 epochs)",
        f"### Score comparison: toy, network `{ck_b}` (3.0 epochs)",
    ]
    sec_a = text.split(titles[0])[1].split(titles[1])[0]
    assert f"**Run `{res / 'compare_c'}`**" in sec_a and "No pca_locality in this run" in sec_a
    line = [l for l in sec_a.splitlines() if l.startswith("- pca_locality vs wiener")][0]
    assert "**mixed (mean: tie, sign test: worse)**" in line and "8/32 wins" in line
    assert "a tie" not in text and "**tie**" not in line
    assert "- pca_locality vs optimal: **better**" in sec_a
    assert "- pca_locality vs els: **worse**" in sec_a
    # N per method, and the subset line names els, its N and the config field that set it
    row_els = [l for l in sec_a.splitlines() if l.startswith("| els | 10 |")][0]
    assert row_els.endswith("| worse |")
    assert "els on 10 (`method_kwargs.els.limit`)" in sec_a and "of the 40 training" in sec_a
    assert "final traj high-pass r2" not in sec_a  # no hp field in these runs: no column
    assert "Protocol: peers at their published patch sizes only" in sec_a
    (claim, measured, verdict, cmd), (claim_b, _, verdict_b, _) = rows
    assert verdict == "beaten by els; mixed vs wiener (mean: tie, sign test: worse)"
    assert verdict_b == "mixed vs wiener (mean: tie, sign test: worse)"
    assert claim == "pca_locality vs network, final r2 (toy, network `ck_a`)"
    assert cmd.startswith("python -m experiments.compare")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    report.update_readme(str(readme), rows)
    body = readme.read_text()
    assert "old" not in body and "beaten by els" in body and body.endswith("after\n")
    bad = tmp_path / "BAD.md"
    bad.write_text("no block")
    with pytest.raises(ValueError, match="results:begin"):
        report.update_readme(str(bad), rows)


def test_compare_hp_column_subset_table_and_missing_per_sample(tmp_path):
    res = tmp_path / "results"
    b = np.linspace(0.3, 0.6, 16)
    old = _method(b - 0.3)
    del old["final_trajectory_r2_per_sample"]  # a run written before per-sample lists
    sub = {
        "pca_locality": _method(b + 0.05, train_size=20, hp=0.41),
        "wiener": _method(b, train_size=20, hp=0.37),
        "ls": _method(b + 0.3, train_size=20, hp=0.52),
    }
    _compare_run(
        res / "compare_t",
        {
            "pca_locality": _method(b + 0.1, hp=0.456),
            "wiener": _method(b, hp=0.321),
            "optimal": old,
            "pca_locality_chunk_mean": _method(b + 0.1, method="pca_locality"),
        },
        subset={"size": 20, "seed": 3, "methods": sub, "skipped": {"linear": "no weights"}},
    )
    text, (row,) = _build(tmp_path)
    head = [l for l in text.splitlines() if l.startswith("| method | N |")]
    assert len(head) == 2 and all("final traj high-pass r2" in h for h in head)
    assert "| pca_locality | 40 | " in text and "| 0.456 |" in text  # hp value in its column
    assert "| pca_locality_chunk_mean | 40 |" in text and "n/a" in text  # it has no hp field
    assert "- pca_locality vs optimal: **no per-sample data**" in text
    assert row[2] == "no per-sample data for optimal"  # wiener: better; no flattering summary
    part = text.split("**All methods on the same 20 training images** (subset seed 3")[1]
    assert [l for l in part.splitlines() if l.startswith("| ls | 20 |")][0].endswith("| worse |")
    assert [l for l in part.splitlines() if l.startswith("| wiener | 20 |")][0].endswith(
        "| better |"
    )
    assert "- skipped `linear` on the subset: no weights" in part


def test_subset_reason_of_derived_rows():
    cfg = {"method_kwargs": {"els": {"limit": 8}}, "slow_methods": "scfdm"}
    assert compare.subset_reason("els_calibrated", {"method": "els"}, cfg) == (
        "`method_kwargs.els.limit`"
    )
    assert compare.subset_reason("scfdm_s0.5", {"method": "scfdm"}, cfg) == (
        "`peer_limit` of the `slow_methods`"
    )
    assert compare.subset_reason("ls", {"method": "ls"}, {}) == "reason not recorded in config.json"


def test_network_epochs_need_the_same_training_set(tmp_path):
    ck = _checkpoint(tmp_path / "ck", steps=11240, batch=32, holdout=0.1)
    assert common.network_epochs(ck, 9001, holdout=0.1) == pytest.approx(11240 * 32 / 9001)
    assert common.network_epochs(ck, 10000, holdout=0.0) is None  # other data: no epoch count
    assert common.network_epochs(str(tmp_path / "missing"), 100) is None
    (tmp_path / "ck" / "config.json").write_text(
        json.dumps({"train": {"batch_size": 32, "holdout": 0.1, "dataset": "mnist"}})
    )
    assert common.network_epochs(ck, 9001, 0.1, dataset="mnist") == pytest.approx(39.96, 1e-3)
    assert common.network_epochs(ck, 9001, 0.1, dataset="synthetic") is None  # other data
    assert common.network_label(ck, 9001, 0.1) == f"network `{ck}` (40 epochs)"
    assert (
        common.network_name("checkpoints/mnist_unet_long/epoch_40/") == "mnist_unet_long/epoch_40"
    )


def test_report_claim_names_only_a_non_default_network(tmp_path):
    res = tmp_path / "results"
    methods = {"pca_locality": _method([0.5, 0.6]), "wiener": _method([0.1, 0.2])}
    _compare_run(res / "compare_toy", methods, checkpoint="checkpoints/toy_unet_cpu")
    _, ((claim, *_),) = _build(tmp_path)
    assert claim == "pca_locality vs network, final r2 (toy)"


def test_report_needs_results_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiments"):
        report.build_report(str(tmp_path / "nope"), str(tmp_path / "R.md"))


# ------------------------------------------------------------------ sensitivity sections


def _block(mean, se):
    return {"mean": list(mean), "se": list(se)}


SUMMARY = {
    "pixels": [[4, 4], [2, 5]],
    "num_inputs": 8,
    "timesteps": [50, 700],
    "models": ["wiener", "linear", "unet"],
    "reference": "wiener",
    "per_model": {
        "wiener": {"radius50": _block([1.5, 4.0], [0.1, 0.2]), "radius90": _block([3, 7], [0, 1])},
        "linear": {"radius50": _block([1.6, 4.1], [0.1, 0.2]), "radius90": _block([3, 7], [0, 1])},
        "unet": {"radius50": _block([2.0, 5.0], [0.1, 0.3]), "radius90": _block([4, 9], [0, 1])},
    },
    "pairs": {
        "wiener|unet": {
            "cosine": _block([0.95, 0.85], [0.01, 0.02]),
            "iou50": _block([0.6, 0.55], [0.05, 0.05]),
            "iou90": _block([0.7, 0.65], [0.05, 0.05]),
        },
        "wiener|linear": {
            "cosine": _block([0.99, 0.98], [0.01, 0.01]),
            "iou50": _block([0.9, 0.8], [0.05, 0.05]),
            "iou90": _block([0.9, 0.9], [0.05, 0.05]),
        },
    },
    "verdicts": {
        "linear": {"agree": True, "shrink": True, "reference_shrinks": True, "text": "lin text"},
        "unet": {"agree": True, "shrink": True, "reference_shrinks": True, "text": "unet text"},
    },
}


def _sensitivity_run(d, summary=None, legacy=False):
    d.mkdir(parents=True)
    models = {
        "wiener": {"status": "ok"},
        "linear": {"status": "ok", "path": "w.npz"},
        "unet": {"status": "ok", "checkpoint": "checkpoints/toy_unet_other"},
    }
    m = {"models": models, "radius": {}, "cosine": {}, "timesteps": [50, 700]}
    if summary is not None:
        m["summary"] = summary
    if legacy:  # the per-pixel dictionaries of runs written before the summary
        m["pixels"] = [[4, 4]]
        m["model_order"] = ["wiener", "unet"]
        m["radius"] = {"wiener": {"4,4": {"0.5": [1.5, 4.0]}}, "unet": {"4,4": {"0.5": [2, 5]}}}
        m["cosine"] = {str(t): {"4,4": [[1.0, 0.9], [0.9, 1.0]]} for t in (50, 700)}
    (d / "metrics.json").write_text(json.dumps(m))
    cfg = {"dataset": "toy", "networks": {"unet": "checkpoints/toy_unet_other"}}
    (d / "config.json").write_text(json.dumps(cfg))


def test_sensitivity_summary_tables_and_readme(tmp_path):
    _sensitivity_run(tmp_path / "results" / "sensitivity_toy", summary=SUMMARY)
    text, ((claim, measured, verdict, _),) = _build(tmp_path)
    assert "### Sensitivity fields: toy, unet `toy_unet_other`" in text
    assert "**t = 50**" in text and "**t = 700**" in text
    assert (
        "| wiener | 1.50 ± 0.10 | 3.00 ± 0.00 | (reference) | (reference) | (reference) |" in text
    )
    assert (
        "| unet | 5.00 ± 0.30 | 9.00 ± 1.00 | 0.850 ± 0.020 | 0.550 ± 0.050 | 0.650 ± 0.050 |"
        in (text)
    )
    assert "| linear | 1.60 ± 0.10 | 3.00 ± 0.00 | 0.990 ± 0.010 |" in text
    assert "- unet: unet text" in text and "- linear: lin text" in text  # the run's verdicts
    assert claim == "network fields vs Wiener (toy, unet `toy_unet_other`)"
    assert "cosine" not in measured  # radius and IoU, not the centre cosine
    assert measured == (
        "unet: r50 2.0 px at t=50 -> 5.0 px at t=700 (wiener 1.5 -> 4.0), IoU50 0.55-0.60, "
        "IoU90 0.65-0.70"
    )
    assert verdict == "agree and shrink with decreasing noise"


def test_sensitivity_summary_verdict_partly_and_bad_lengths(tmp_path):
    s = json.loads(json.dumps(SUMMARY))
    s["verdicts"]["unet"] = {"agree": False, "shrink": True, "reference_shrinks": True, "text": "x"}
    _sensitivity_run(tmp_path / "results" / "sensitivity_toy", summary=s)
    _, ((_, _, verdict, _),) = _build(tmp_path)
    assert verdict == "partly: unet does not agree, shrinks"  # linear is not a network
    s["pairs"]["wiener|unet"]["iou50"]["mean"] = [0.6]  # one value for two timesteps
    bad = tmp_path / "bad"
    _sensitivity_run(bad / "results" / "sensitivity_toy", summary=s)
    with pytest.raises(ValueError, match=r"iou50\.mean has 1 values for 2 timesteps; rerun"):
        _build(bad)


def test_sensitivity_without_summary_keeps_the_old_table(tmp_path):
    _sensitivity_run(tmp_path / "results" / "sensitivity_toy", legacy=True)
    text, ((claim, measured, verdict, _),) = _build(tmp_path)
    assert "### Sensitivity fields: toy, unet `toy_unet_other`" in text
    assert "| model | 50% radius at t = 50, 700 | cosine to Wiener |" in text
    assert "| unet | 2.00 5.00 | 0.900 0.900 |" in text
    assert measured == "cosine 0.90-0.90 (unet) over t = 50-700"
    assert verdict == "agree and shrink with decreasing noise"


# ------------------------------------------------------------------ the paper's numbers


def test_paper_section_from_the_data_file(tmp_path):
    data = paper.load_paper_numbers()  # the committed file: no value without its table
    assert data["found_offline"] is False
    assert all(v["value"] is None for q in data["quantities"] for v in q["values"].values())
    runs = [
        (
            "results/compare_x",
            {
                "dataset": "mnist",
                "checkpoint": "none",
                "methods": {
                    "pca_locality": _method([0.5, 0.7], train_size=10),
                    "els": _method([0.1, 0.2], 5),
                },
            },
            {},
        )
    ]
    lines = paper.paper_section(runs, "results")
    text = "\n".join(lines)
    assert data["lookup"] in text  # the reason the values are missing, shown to the reader
    assert "no copy of the paper's tables" in text
    row = [l for l in lines if "analytical denoiser | MNIST |" in l][0]
    assert "| paper value not available offline | 0.600 (`results/compare_x`, network `none`)" in (
        row
    )
    els = [l for l in lines if "ELS (Kamb & Ganguli) | MNIST |" in l][0]
    assert "on 5 of 10 images" in els
    assert "not obtained: dataset not available offline" in text  # CelebA-HQ, AFHQ
    assert "not obtained: no comparison run on `fashion_mnist` under `results`" in text


def test_paper_numbers_need_their_table(tmp_path):
    data = json.loads(open(paper.DEFAULT_PATH).read())
    data["found_offline"] = True
    data["quantities"][0]["values"]["MNIST"] = {"value": 0.9, "where": "Table 1"}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(data))
    lines = paper.paper_section([], "results", str(good))
    assert [l for l in lines if "| MNIST | 0.9 (Table 1) |" in l]
    data["quantities"][0]["values"]["MNIST"]["where"] = None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="give the paper's table or figure"):
        paper.load_paper_numbers(str(bad))


# ------------------------------------------------------------------ other sections


def test_printed_commands_carry_overrides():
    from configs import linear_gd as lgd_cfg

    cfg = lgd_cfg.get_config("mnist,ddim").to_dict()
    assert common.overrides("linear_gd", "mnist,ddim", cfg) == ""
    cfg["steps"] = 500
    cfg["lr"] = 0.01
    assert (
        common.overrides("linear_gd", "mnist,ddim", cfg) == " --config.lr=0.01 --config.steps=500"
    )
    # tuples (stored as JSON lists) print as Python tuple literals that ml_collections parses
    from configs import data_stats as ds_cfg

    d = json.loads(json.dumps(ds_cfg.get_config("mnist").to_dict()))
    assert common.overrides("data_stats", "mnist", d) == ""
    d["parts"] = ["link", "permute"]
    d["timesteps"] = [50]
    assert (
        common.overrides("data_stats", "mnist", d)
        == " --config.parts='(\"link\", \"permute\")' --config.timesteps='(50,)'"
    )
    # nested fields (a network path) print with their full dotted name
    from configs import sensitivity as sens_cfg

    s = json.loads(json.dumps(sens_cfg.get_config("cifar10_catsdogs").to_dict()))
    assert common.overrides("sensitivity", "cifar10_catsdogs", s) == ""
    s["networks"]["unet"] = "checkpoints/other"
    assert (
        common.overrides("sensitivity", "cifar10_catsdogs", s)
        == " --config.networks.unet=checkpoints/other"
    )


def test_guidance_section_and_verdicts(tmp_path):
    from experiments.report_parts import guidance

    res = tmp_path / "results"
    d = res / "guidance_toy"
    d.mkdir(parents=True)
    settings = {
        "no_label": {"predicted_fractions": {"0": 0.4, "1": 0.6}, "nearest_train_l2_median": 20.0},
        "w0": {
            "agreement": 0.55,
            "per_class": {"0": 0.5, "1": 0.6},
            "predicted_fractions": {"0": 0.45, "1": 0.55},
            "nearest_train_l2_median": 20.5,
        },
        "w3": {
            "agreement": 0.70,
            "per_class": {"0": 0.7, "1": 0.7},
            "predicted_fractions": {"0": 0.5, "1": 0.5},
            "nearest_train_l2_median": 21.0,
        },
    }
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "toy",
                "checkpoint": "ck",
                "num_classes": 2,
                "num_samples": 128,
                "sampler": "ddpm",
                "num_steps": 250,
                "settings": settings,
                "classifier": {"holdout_accuracy": 0.72, "holdout_size": 200},
            }
        )
    )
    text, ((claim, measured, verdict, cmd),) = _build(tmp_path)
    assert "Class-conditional samples on toy" in text and "| w3 | 0.700 |" in text
    assert claim == "guided samples show the requested class (toy, `ck`)"
    assert measured.startswith("label agreement 0.700 at w3 (w0: 0.550;")
    # 0.70 vs 0.72: within two standard errors (n = 128 and 200) -> like real images
    assert verdict == "as recognisable to the classifier as real images"
    assert cmd.startswith("python -m experiments.guidance --config configs/guidance.py:toy")
    # hand-computed limits: se(0.5, 128) = 0.0442, so 0.60 is above chance + 2 se = 0.588
    assert guidance.guidance_verdict(0.60, 128, 0.9, 200, 2) == "above chance, below real images"
    assert guidance.guidance_verdict(0.58, 128, 0.9, 200, 2) == "not above chance"


def test_quality_and_training_path_sections(tmp_path):
    """Hand-made quality and training-path runs: the FD verdict and the closest-method verdict
    follow the numbers (paired statistics from locality.metrics, verdict words by the report's
    rule)."""
    from locality import metrics

    res = tmp_path / "results"
    q = res / "quality_toy"
    q.mkdir(parents=True)
    eps = {str(t): {"mean": 0.02, "se": 0.001} for t in (100, 900)}
    net = lambda fd, ep, conf: {  # noqa: E731
        "checkpoint": f"ck{ep}",
        "epochs": ep,
        "step": 1,
        "fd": fd,
        "confident_fraction": conf,
        "eps_mse": eps,
        "eps_mse_mean": 0.02,
        "trained_on_heldout": False,
    }
    (q / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "mnist",
                "sampler": "ddim",
                "num_steps": 10,
                "num_samples": 20,
                "num_real": 10,
                "heldout": "test split",
                "classifier": {"heldout_accuracy": 0.9, "heldout_size": 10},
                "real_vs_real_fd": 0.05,
                "timesteps": [100, 900],
                "networks": {
                    "cpu (committed)": net(9.0, 8.5, 0.1),
                    "long epoch 20": net(2.0, 20, 0.6),
                },
            }
        )
    )
    t = res / "training_path_toy"
    t.mkdir()
    rng = np.random.default_rng(0)
    one_sided = np.asarray([0.5] * 6 + [-0.01] * 6)  # mean 4.8 SE above, sign test p = 1
    per = {
        "early": {
            "wiener": 0.6 + 0.01 * rng.normal(size=12),
            "pca_locality": 0.5 + 0.01 * rng.normal(size=12),
        },
        "mid": {"wiener": 0.4 + one_sided, "pca_locality": np.full(12, 0.4)},
        "late": {
            "wiener": 0.5 + 0.01 * rng.normal(size=12),
            "pca_locality": 0.7 + 0.01 * rng.normal(size=12),
        },
    }
    nets = {}
    for i, (label, r) in enumerate(per.items()):
        best = max(r, key=lambda k: r[k].mean())
        nets[label] = {
            "epochs": [1, 5, 20][i],
            "best": best,
            "final_trajectory_r2": {
                k: {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(12))}
                for k, v in r.items()
            },
            "paired_vs_best": {
                k: metrics.paired_comparison(r[best], v) for k, v in r.items() if k != best
            },
        }
    (t / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "mnist",
                "train_size": 40,
                "num_samples": 12,
                "methods": ["pca_locality", "wiener"],
                "method_seconds": {},
                "networks": nets,
            }
        )
    )
    text, rows = _build(tmp_path)
    assert (
        "Sample quality of the mnist networks" in text and "| long epoch 20 | 20.0 | 2.000" in text
    )
    (qc, qm, qv, _), (tc, tm, tv, _) = rows
    assert qv == "better samples: FD 4.5x lower" and "floor 0.05" in qm
    assert tv == ("after 20 epochs the network is closest to pca_locality, separated from wiener")
    first, last = (per[k]["pca_locality"].mean() for k in ("early", "late"))
    assert f"pca_locality {first:.2f} -> {last:.2f}" in tm and "wiener 0.60 -> 0.50" in tm
    mid = [l for l in text.splitlines() if l.startswith("| mid | 5.0 |")][0]
    assert "(mixed (mean: better, sign test: tie))" in mid  # not "separated"


def test_protocol_note_names_what_a_run_lacks():
    full = {"ls": {"x": 1}, "ls_calibrated": {"calibrated_from": "ls"}, "scfdm": {}}
    for r in full.values():
        r[compare.HP_R2] = 0.1
    m = {"subset": {}, "scfdm_selection": {}}
    assert compare.protocol_note(full, m, {}) == ""
    older = {"ls": {"train_size": 100}, "scfdm": {"train_size": 9000}, "wiener": {}}
    note = compare.protocol_note(older, {}, {})
    for part in ("no calibrated rows", "no common-subset table", "no high-pass r2", "SCFDM"):
        assert part in note
    # nothing to calibrate, no SCFDM row: only the parts that apply
    assert compare.protocol_note({"wiener": {compare.HP_R2: 0.1}, "linear": {}}, m, {}) == ""
    # every method on the same images: no common-subset table is owed
    same = {k: {compare.HP_R2: 0.1, "train_size": 9000} for k in ("wiener", "linear")}
    assert compare.protocol_note(same, {}, {}) == ""


def test_rerun_command_adds_the_overrides_a_changed_default_needs():
    from configs.compare import get_config

    cfg = get_config("mnist,long").to_dict()
    cfg["method_kwargs"]["pspc_square"]["patch_size"] = "5"  # the run predates today's default
    cfg["common_subset"] = 0
    base = "python -m experiments.compare --config configs/compare.py:mnist,long --workdir d"
    m = {"dataset": "mnist", "command": base + " --config.common_subset=0"}
    cmd = compare.rerun_command(m, cfg, "d")
    assert cmd.startswith(m["command"])
    assert cmd.count("--config.common_subset=") == 1  # recorded once, not repeated
    assert cmd.endswith(" --config.method_kwargs.pspc_square.patch_size=5")
    # a run made with today's defaults keeps its command as recorded
    m["command"] = base
    assert compare.rerun_command(m, get_config("mnist,long").to_dict(), "d") == base
