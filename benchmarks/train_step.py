"""Training throughput of the reference UNets on this machine: images/s of one jitted train step.

For every (model, batch size) of the grid, measures compile time (first call, separately), then
the median over ``--repeats`` timed runs of consecutive steps (about ``--repeat_s`` seconds
each), reported as steps/s and images/s, and the ratio to the first grid point measured in the
same run. Models: ``cpu`` (``configs/train.py`` cpu preset, ch 16), ``cpu24`` / ``cpu32`` (the
same net at ch 24 / 32), ``paper28`` (the paper's 28 px UNet, ch 64, 6.1M parameters).

The JSON records what the numbers depend on: load average before and after, CPU affinity, the
thread settings (``XLA_FLAGS``, ``OMP_NUM_THREADS``), jax version, and a ``busy`` flag (load
average above the CPUs in the affinity mask) so that a figure from a loaded machine is never
read as the machine's rate. ``--torch`` also times the same step in PyTorch on the CPU (an
optional reference, see ``benchmarks/torch_unet.py``), or records why it could not.

    python -m benchmarks.train_step [--models cpu,cpu32] [--batch_sizes 32,64,128,256] \
        [--repeats 3] [--repeat_s 3] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("batch_sizes", "32,64,128,256", "Comma list of global batch sizes.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
flags.DEFINE_float("repeat_s", 3.0, "Approximate seconds per timed repeat.")
flags.DEFINE_string("models", "cpu,cpu24,cpu32", "Comma list of: cpu, cpu24, cpu32, paper28.")
flags.DEFINE_bool("torch", False, "Also time the same UNet step in PyTorch (CPU), if installed.")
flags.DEFINE_string("out", "benchmarks/results/train_step.json", "Output JSON path.")
FLAGS = flags.FLAGS


def model_configs():
    from configs.train import get_config

    cpu = get_config("fashion_mnist,cpu,unet").model.to_dict()
    return {
        "cpu": cpu,
        "cpu24": {**cpu, "ch": 24},
        "cpu32": {**cpu, "ch": 32},
        "paper28": get_config("fashion_mnist,paper,unet").model.to_dict(),
    }


def machine_context() -> dict:
    """What a CPU timing depends on, read now."""
    affinity = sorted(os.sched_getaffinity(0))
    load = os.getloadavg()
    # The load average counts the whole machine, so it is compared with all its CPUs (a run
    # pinned to one core of an otherwise idle machine is quiet at a load of 1).
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "load_avg": list(load),
        "busy": load[0] > (os.cpu_count() or 1),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
    }


def bench(model_config, batch_size: int, repeats: int, repeat_s: float, image_shape=(28, 28, 1)):
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
    t0 = time.perf_counter()
    state, m = step(state, x, key)  # one warm step, also sizes the repeats
    jax.block_until_ready(m)
    n = max(1, int(round(repeat_s / (time.perf_counter() - t0))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            state, m = step(state, x, key)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / n)
    med = statistics.median(times)
    return {
        "model": model_config,
        "num_params": count_params(state.params),
        "batch_size": batch_size,
        "steps_per_repeat": n,
        "compile_plus_first_step_s": first,
        "step_s_median": med,
        "step_s_all": times,
        "steps_per_s": 1.0 / med,
        "images_per_s": batch_size / med,
    }


def main(argv):
    del argv
    import jax

    configs = model_configs()
    names = [n.strip() for n in FLAGS.models.split(",") if n.strip()]
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(configs)}")
    batch_sizes = [int(b) for b in FLAGS.batch_sizes.split(",") if b.strip()]
    before = machine_context()
    if before["busy"]:
        print(
            f"WARNING: load average {before['load_avg'][0]:.2f} exceeds the machine's "
            f"{before['cpu_count']} CPUs: timings are not the machine's rate",
            flush=True,
        )
    results = []
    for name in names:
        for b in batch_sizes:
            r = {"name": name, **bench(configs[name], b, FLAGS.repeats, FLAGS.repeat_s)}
            results.append(r)
            print(
                f"{name:8s} b{b:<4d} params {r['num_params']:>10,d}  compile+1 "
                f"{r['compile_plus_first_step_s']:.1f}s  step {r['step_s_median'] * 1e3:.0f} ms"
                f"  {r['images_per_s']:.1f} img/s",
                flush=True,
            )
    base = results[0]["images_per_s"]
    for r in results:
        r["images_per_s_ratio_to_first"] = r["images_per_s"] / base
    out = {
        "benchmark": "train_step",
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "before": before,
        "repeats": FLAGS.repeats,
        "baseline": f"{results[0]['name']} b{results[0]['batch_size']}",
        "results": results,
    }
    if FLAGS.torch:
        from benchmarks import torch_unet

        out["torch"] = torch_unet.run(configs, names, batch_sizes, FLAGS.repeats, FLAGS.repeat_s)
    out["after"] = machine_context()
    path = Path(FLAGS.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
