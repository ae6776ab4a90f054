"""experiments/report.py on hand-made run directories (numbers chosen here, verdicts checked)."""

import json

import numpy as np
import pytest

from experiments import report


def _compare_run(d, r2_ours, r2_peers, checkpoint="ckpt"):
    d.mkdir(parents=True)
    ts = [900, 0]
    methods = {}
    for name, per_sample in [("pca_locality", r2_ours)] + list(r2_peers.items()):
        per_sample = np.asarray(per_sample, np.float64)
        methods[name] = {
            "final_trajectory_r2_mean": float(per_sample.mean()),
            "final_trajectory_r2_per_sample": per_sample.tolist(),
            "timesteps": ts,
            "trajectory": {"r2": [0.1, float(per_sample.mean())]},
            "single_step": {"r2": [0.2, float(per_sample.mean())]},
        }
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "toy",
                "checkpoint": checkpoint,
                "methods": methods,
                "num_samples": len(r2_ours),
                "command": "python -m experiments.compare --config configs/compare.py:toy",
            }
        )
    )


def test_report_verdicts_and_readme(tmp_path):
    res = tmp_path / "results"
    rng = np.random.default_rng(0)
    ours = 0.5 + 0.01 * rng.normal(size=16)
    _compare_run(
        res / "compare_toy",
        ours,
        {
            "wiener": ours - 0.2,  # clearly worse than ours
            "optimal": ours + 0.3,  # clearly better
            "ls": ours + 0.001 * rng.normal(size=16),
        },
    )  # a tie
    text, rows = report.build_report(str(res), str(res / "REPORT.md"), str(tmp_path / "none"))
    assert "pca_locality vs wiener: final r2" in text and "better by 0.200" in text
    assert "pca_locality vs optimal" in text and "worse by 0.300" in text
    line = [l for l in text.splitlines() if l.startswith("- pca_locality vs ls")][0]
    assert "a tie" in line
    ((claim, measured, verdict, cmd),) = rows
    assert verdict == "beaten by optimal; tied with ls"
    assert claim == "pca_locality vs network, final r2 (toy, network `ckpt`)"  # not the default
    assert cmd.startswith("python -m experiments.compare")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    report.update_readme(str(readme), rows)
    body = readme.read_text()
    assert "old" not in body and "beaten by optimal" in body and body.endswith("after\n")
    bad = tmp_path / "BAD.md"
    bad.write_text("no block")
    with pytest.raises(ValueError, match="results:begin"):
        report.update_readme(str(bad), rows)


def test_report_claim_names_only_a_non_default_network(tmp_path):
    res = tmp_path / "results"
    _compare_run(
        res / "compare_toy",
        [0.5, 0.6],
        {"wiener": [0.1, 0.2]},
        checkpoint="checkpoints/toy_unet_cpu",
    )
    _, ((claim, *_),) = report.build_report(str(res), str(res / "R.md"), str(tmp_path / "none"))
    assert claim == "pca_locality vs network, final r2 (toy)"


def test_report_needs_results_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiments"):
        report.build_report(str(tmp_path / "nope"), str(tmp_path / "R.md"))


def test_printed_commands_carry_overrides():
    from configs import linear_gd as lgd_cfg

    cfg = lgd_cfg.get_config("mnist,ddim").to_dict()
    assert report._overrides("linear_gd", "mnist,ddim", cfg) == ""
    cfg["steps"] = 500
    cfg["lr"] = 0.01
    assert (
        report._overrides("linear_gd", "mnist,ddim", cfg) == " --config.lr=0.01 --config.steps=500"
    )
    # tuples (stored as JSON lists) print as Python tuple literals that ml_collections parses
    from configs import data_stats as ds_cfg

    d = json.loads(json.dumps(ds_cfg.get_config("mnist").to_dict()))
    assert report._overrides("data_stats", "mnist", d) == ""
    d["parts"] = ["link", "permute"]
    d["timesteps"] = [50]
    assert (
        report._overrides("data_stats", "mnist", d)
        == " --config.parts='(\"link\", \"permute\")' --config.timesteps='(50,)'"
    )
    # nested fields (a network path) print with their full dotted name
    from configs import sensitivity as sens_cfg

    s = json.loads(json.dumps(sens_cfg.get_config("cifar10_catsdogs").to_dict()))
    assert report._overrides("sensitivity", "cifar10_catsdogs", s) == ""
    s["networks"]["unet"] = "checkpoints/other"
    assert (
        report._overrides("sensitivity", "cifar10_catsdogs", s)
        == " --config.networks.unet=checkpoints/other"
    )


def test_guidance_section_and_verdicts(tmp_path):
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
    text, ((claim, measured, verdict, cmd),) = report.build_report(
        str(res), str(res / "R.md"), str(tmp_path / "none")
    )
    assert "Class-conditional samples on toy" in text and "| w3 | 0.700 |" in text
    assert claim == "guided samples show the requested class (toy, `ck`)"
    assert measured.startswith("label agreement 0.700 at w3 (w0: 0.550;")
    # 0.70 vs 0.72: within two standard errors (n = 128 and 200) -> like real images
    assert verdict == "as recognisable to the classifier as real images"
    assert cmd.startswith("python -m experiments.guidance --config configs/guidance.py:toy")
    # hand-computed limits: se(0.5, 128) = 0.0442, so 0.60 is above chance + 2 se = 0.588
    assert report.guidance_verdict(0.60, 128, 0.9, 200, 2) == "above chance, below real images"
    assert report.guidance_verdict(0.58, 128, 0.9, 200, 2) == "not above chance"


def test_quality_and_training_path_sections(tmp_path):
    """Hand-made quality and training-path runs: the FD verdict and the closest-method verdict
    follow the numbers (paired statistics from locality.metrics)."""
    from locality import metrics

    res = tmp_path / "results"
    q = res / "quality_toy"
    q.mkdir(parents=True)
    eps = {str(t): {"mean": 0.02, "se": 0.001} for t in (100, 900)}
    net = lambda fd, ep, conf: {
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
    per = {
        "early": {
            "wiener": 0.6 + 0.01 * rng.normal(size=12),
            "pca_locality": 0.5 + 0.01 * rng.normal(size=12),
        },
        "late": {
            "wiener": 0.5 + 0.01 * rng.normal(size=12),
            "pca_locality": 0.7 + 0.01 * rng.normal(size=12),
        },
    }
    nets = {}
    for i, (label, r) in enumerate(per.items()):
        best = max(r, key=lambda k: r[k].mean())
        nets[label] = {
            "epochs": [1, 20][i],
            "best": best,
            "final_trajectory_r2": {k: {"mean": float(v.mean())} for k, v in r.items()},
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
    (t / "table.md").write_text("| network | epochs |\n|---|---|\n")
    text, rows = report.build_report(str(res), str(res / "REPORT.md"), str(tmp_path / "none"))
    assert (
        "Sample quality of the mnist networks" in text and "| long epoch 20 | 20.0 | 2.000" in text
    )
    (qc, qm, qv, _), (tc, tm, tv, _) = rows
    assert qv == "better samples: FD 4.5x lower" and "floor 0.05" in qm
    assert tv == ("after 20 epochs the network is closest to pca_locality, separated from wiener")
    first, last = (per[k]["pca_locality"].mean() for k in ("early", "late"))
    assert f"pca_locality {first:.2f} -> {last:.2f}" in tm and "wiener 0.60 -> 0.50" in tm
