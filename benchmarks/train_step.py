"""Training throughput of the reference networks: images/s of one jitted train step.

Measures, for the paper's 28 px UNet (ch 64, mult 1,2,2; ALGORITHMS.md §11) and the ``cpu``
preset of ``configs/train.py``: compile time (first call, separately), then the median over
``--repeats`` timed runs of ``--steps`` consecutive steps each, reported as steps/s and images/s,
plus the ratio of each model's throughput to the cpu preset measured in the same run.
Writes JSON (default ``benchmarks/results/train_step.json``).

    python benchmarks/train_step.py [--batch_size 32] [--steps 5] [--repeats 3] \
        [--models paper28,cpu] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("steps", 5, "Steps per timed repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
flags.DEFINE_string("models", "paper28,cpu", "Comma list of: paper28, cpu, cpu_dit.")
flags.DEFINE_string("out", "benchmarks/results/train_step.json", "Output JSON path.")
FLAGS = flags.FLAGS


def _model_configs():
    from configs.train import get_config

    return {
        "paper28": get_config("fashion_mnist,paper,unet").model.to_dict(),
        "cpu": get_config("fashion_mnist,cpu,unet").model.to_dict(),
        "cpu_dit": get_config("fashion_mnist,cpu,dit").model.to_dict(),
    }


def bench(model_config, batch_size: int, steps: int, repeats: int, image_shape=(28, 28, 1)):
    import jax
    import numpy as np

    from locality.nets import build_model, count_params
    from locality.train import TrainConfig, create_train_state, make_train_step

    model = build_model(model_config)
    cfg = TrainConfig(batch_size=batch_size, warmup_steps=10)
    state = create_train_state(model, cfg, image_shape)
    step = make_train_step(model, cfg)
    x = np.random.RandomState(0).uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    state, m = step(state, x, key)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    state, m = step(state, x, key)  # one warm step (allocations)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, x, key)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / steps)
    med = statistics.median(times)
    return {"model": model_config, "num_params": count_params(state.params),
            "batch_size": batch_size, "compile_plus_first_step_s": first,
            "step_s_median": med, "step_s_all": times, "steps_per_s": 1.0 / med,
            "images_per_s": batch_size / med}


def main(argv):
    del argv
    import jax

    configs = _model_configs()
    names = [n.strip() for n in FLAGS.models.split(",") if n.strip()]
    results = {}
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(configs)}")
        results[name] = bench(configs[name], FLAGS.batch_size, FLAGS.steps, FLAGS.repeats)
        r = results[name]
        print(f"{name:8s} params {r['num_params']:>10,d}  compile+1 {r['compile_plus_first_step_s']:.1f}s"
              f"  step {r['step_s_median'] * 1e3:.0f} ms  {r['images_per_s']:.1f} img/s", flush=True)
    if "cpu" in results:
        for r in results.values():
            r["images_per_s_ratio_to_cpu_preset"] = r["images_per_s"] / results["cpu"]["images_per_s"]
    out = {"benchmark": "train_step", "devices": [str(d) for d in jax.devices()],
           "jax": jax.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
           "load_avg_1m": os.getloadavg()[0], "steps": FLAGS.steps, "repeats": FLAGS.repeats,
           "results": results}
    path = Path(FLAGS.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
