"""locality: analytical diffusion denoisers, trained networks and the data statistics behind
locality.

Importing the package has no side effects: no data is read, nothing is downloaded, and JAX
keeps its defaults (x64 stays off). Submodules are imported lazily on first attribute access.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "data",
    "schedules",
    "stats",
    "streaming",
    "denoisers",
    "sampling",
    "metrics",
    "sensitivity",
    "field_summary",
    "field_report",
    "plotting",
    "train",
    "train_config",
    "train_data",
    "train_step",
    "checkpoints",
    "run_logs",
    "nets",
    "classify",
    "quality",
    "data_stats",
    "evaluation",
    "comparison",
    "comparison_options",
    "comparison_tables",
    "generation",
    "linear_gd",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"locality.{name}")
    raise AttributeError(f"module 'locality' has no attribute {name!r}")
