"""The package's imports form no cycle (issue #18), neither at module level nor counting the
imports inside functions (so none of those dodges one): read from the source, nothing is
imported."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "locality"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph(everywhere: bool = False) -> dict:
    """``{module: {locality modules it imports at module level}}`` (with ``everywhere``, also
    the imports inside functions). Importing ``a.b.c`` also imports the packages ``a.b`` and
    ``a``, except the packages that hold the importer itself (those are already being imported
    when it runs)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own.add(name)
        deps = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if everywhere else tree.body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep not in own and dep != name:
                        deps.add(dep)
        graph[name] = deps
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


# The trainer's modules below the loop in locality.train (docs/architecture.md, "Layers").
TRAIN_PARTS = ("locality.train_config", "locality.train_data", "locality.train_step")
# The public names of locality.train before it was split into TRAIN_PARTS and the loop.
TRAIN_NAMES = (
    "TrainConfig",
    "TrainState",
    "learning_rate_schedule",
    "make_optimizer",
    "ema_decay_at",
    "ema_update",
    "create_train_state",
    "diffusion_loss",
    "make_mesh",
    "make_train_step",
    "epoch_permutation",
    "batch_indices",
    "BatchSource",
    "batch_at",
    "check_resumable",
    "train",
)


@pytest.mark.parametrize("everywhere", [False, True], ids=["module_level", "with_local"])
def test_imports_form_no_cycle(everywhere):
    graph = _module_graph(everywhere)
    assert {"locality.train", "locality.checkpoints", "locality.denoisers.network"} <= set(graph)
    assert set(TRAIN_PARTS) <= set(graph)
    assert "locality.checkpoints" in graph["locality.train"]
    assert "locality.checkpoints" in graph["locality.denoisers.network"]
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "name",
    [
        "load_params",
        "export_params",
        "export_workdir",
        "merge_params",
        "summary_from_log",
        "resolve_checkpoint_dir",
        "read_checkpoint_config",
        "CheckpointError",
        "Checkpoints",
        "CONFIG_FILE",
        "CHECKPOINT_SUBDIR",
        "EXPORT_SUBDIR",
    ],
)
def test_moved_checkpoint_names_are_still_importable_from_train(name):
    from locality import checkpoints, train

    assert getattr(train, name) is getattr(checkpoints, name)


def test_sample_images_is_still_importable_from_train():
    from locality import train
    from locality.denoisers import network

    assert train.sample_images is network.sample_images


@pytest.mark.parametrize("everywhere", [False, True], ids=["module_level", "with_local"])
def test_trainer_parts_sit_below_the_loop(everywhere):
    """locality.train imports its parts; no part imports the loop; train_config, the base of
    the parts, imports neither of the other two."""
    graph = _module_graph(everywhere)
    assert set(TRAIN_PARTS) <= graph["locality.train"]
    for part in TRAIN_PARTS:
        assert "locality.train" not in graph[part], part
    assert graph["locality.train_config"].isdisjoint(TRAIN_PARTS)
    assert "locality.train_config" in graph["locality.train_data"]
    assert "locality.train_config" in graph["locality.train_step"]


@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_trainer_names_are_still_importable_from_train(name):
    from locality import train

    assert name in train.__all__
    assert getattr(train, name) is not None


def test_train_reexports_every_public_name_of_its_parts():
    import importlib

    from locality import train

    assert len(set(train.__all__)) == len(train.__all__)
    for name in train.__all__:
        assert hasattr(train, name), name
    for part in TRAIN_PARTS:
        module = importlib.import_module(part)
        for name in module.__all__:
            assert name in train.__all__, (part, name)
            assert getattr(train, name) is getattr(module, name), (part, name)
