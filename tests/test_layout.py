"""Repository structure rules, read from the source (nothing is imported or run):

- a module of ``locality/`` over ``MAX_MODULE_LINES`` lines ends its docstring with a ``Size:``
  paragraph saying why it stays one file;
- an entry point ``experiments/*.py`` has at most ``MAX_ENTRY_LOGIC_LINES`` logic lines (not
  blank, comment, docstring or import lines): reusable logic belongs in the library;
- no function in ``locality/`` imports a ``locality`` module (the one lazy import that keeps
  TensorFlow Datasets out of ``import locality`` excepted): a cycle is not dodged that way;
- every ``docs/<file>.md §N`` (and ``docs/<file>.md, "Heading"``) cited in a docstring of
  ``locality/`` or ``experiments/`` names a file and a heading that exist;
- docs/architecture.md's module map lists exactly the modules of ``locality/``, and its layer
  table places every top-level module and package.

The import graph itself has no cycle: tests/test_imports.py.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "locality"
EXPERIMENTS = ROOT / "experiments"
DOCS = ROOT / "docs"

MAX_MODULE_LINES = 500
MAX_ENTRY_LOGIC_LINES = 130
# (module, imported locality module) pairs allowed inside a function: the store builds a dataset
# with locality.data.builders, which imports tensorflow_datasets (~0.4 s), only when one is built.
LOCAL_IMPORT_ALLOW_LIST = {("data/store.py", "locality.data.builders")}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _locality_modules():
    return sorted(PKG.rglob("*.py"))


def _entry_points():
    """``experiments/*.py`` files run as programs (they hold ``if __name__ == "__main__"``)."""
    return sorted(p for p in EXPERIMENTS.glob("*.py") if "__main__" in p.read_text())


def _docstring_nodes(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                yield body[0]


# ----------------------------------------------------------------------------- measures


def logic_lines(source: str) -> int:
    """Lines that are not blank, a comment, part of a docstring or part of an import."""
    tree = ast.parse(source)
    skip = set()
    for expr in _docstring_nodes(tree):
        skip.update(range(expr.lineno, expr.end_lineno + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    count = 0
    for i, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#") and i not in skip:
            count += 1
    return count


def has_size_reason(source: str) -> bool:
    """Whether the module docstring's last paragraph starts with ``Size:``."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    return bool(paragraphs) and paragraphs[-1].startswith("Size:")


def local_locality_imports(source: str) -> list:
    """``[(line, module)]``: ``locality`` modules imported inside a function (or method)."""
    out = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the package by definition
                    names = [f"{'.' * node.level}{node.module or ''}"]
                else:
                    names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            out += [(node.lineno, n) for n in names if n.startswith(("locality", "."))]
    return sorted(set(out))


_CITE = re.compile(r"docs/([\w./-]+\.md)((?:[\s,(]*(?:and\s+)?§\d+)*)")
_CITE_HEADING = re.compile(r"docs/([\w./-]+\.md),\s*\"([^\"]+)\"")


def doc_citations(source: str) -> list:
    """``[(line, doc file, section number or quoted heading or None)]`` cited in docstrings."""
    out = []
    for expr in _docstring_nodes(ast.parse(source)):
        text = expr.value.value
        for m in _CITE.finditer(text):
            line = expr.lineno + text[: m.start()].count("\n")
            sections = re.findall(r"§(\d+)", m.group(2))
            out += [(line, m.group(1), s) for s in sections] or [(line, m.group(1), None)]
        for m in _CITE_HEADING.finditer(text):
            line = expr.lineno + text[: m.start()].count("\n")
            out.append((line, m.group(1), " ".join(m.group(2).split())))
    return out


def doc_headings(text: str) -> tuple:
    """``(section numbers, heading texts)`` of a markdown file: ``## §9. Title`` gives ``"9"``;
    every heading's text (backticks removed) is a heading text."""
    numbers, titles = set(), set()
    for m in re.finditer(r"^#+\s+(.*?)\s*$", text, re.M):
        title = m.group(1).replace("`", "")
        titles.add(title)
        n = re.match(r"§(\d+)\.", title)
        if n:
            numbers.add(n.group(1))
    return numbers, titles


def _architecture_section(title: str) -> str:
    text = (DOCS / "architecture.md").read_text()
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start : end if end >= 0 else None]


def module_map() -> set:
    """First-column entries of the ``locality/`` table of docs/architecture.md's module map."""
    section = _architecture_section("### `locality/`")
    return set(re.findall(r"^\|\s*`([^`]+)`\s*\|", section, re.M))


def layer_table_names() -> set:
    """Names in the modules column of docs/architecture.md's layer table (``denoisers/*`` ->
    ``denoisers``)."""
    section = _architecture_section("## Layers")
    names = set()
    for row in re.findall(r"^\|([^|\n]*)\|([^|\n]*)\|", section, re.M):
        names.update(n.split("/")[0] for n in re.findall(r"`([^`]+)`", row[1]))
    return names


# ----------------------------------------------------------------------------- the rules


def test_large_modules_state_why_they_stay_one_file():
    missing = [
        f"{_rel(p)} ({n} lines)"
        for p in _locality_modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
        and not has_size_reason(p.read_text())
    ]
    assert not missing, (
        f"modules over {MAX_MODULE_LINES} lines without a reason: {missing}. Split each by "
        "concept, or end its module docstring with a paragraph starting 'Size:' that says why it "
        "is one concept and what splitting would lose."
    )


def test_entry_points_are_thin():
    points = _entry_points()
    assert {"sensitivity.py", "report.py"} <= {p.name for p in points}
    too_long = [
        f"{_rel(p)} ({n} logic lines)"
        for p in points
        if (n := logic_lines(p.read_text())) > MAX_ENTRY_LOGIC_LINES
    ]
    assert not too_long, (
        f"entry points over {MAX_ENTRY_LOGIC_LINES} logic lines: {too_long}. Move reusable "
        "logic (measures, summaries, tables, figures) into a locality module and call it."
    )


def test_no_function_local_imports_of_locality_modules():
    found = []
    for p in _locality_modules():
        rel = p.relative_to(PKG).as_posix()
        for line, name in local_locality_imports(p.read_text()):
            if (rel, name) not in LOCAL_IMPORT_ALLOW_LIST:
                found.append(f"{_rel(p)}:{line} imports {name}")
    assert not found, (
        f"imports of locality modules inside functions: {found}. Import at module level; if "
        "that makes a cycle, move the shared code to a lower module (docs/architecture.md, "
        '"Layers") instead of hiding the import in a function.'
    )


def test_docstring_citations_of_docs_exist():
    headings = {p.name: doc_headings(p.read_text()) for p in DOCS.glob("*.md")}
    files = sorted(PKG.rglob("*.py")) + sorted(EXPERIMENTS.rglob("*.py"))
    bad, count = [], 0
    for p in files:
        for line, doc, section in doc_citations(p.read_text()):
            count += 1
            where = f"{_rel(p)}:{line} cites docs/{doc}"
            if doc not in headings:
                bad.append(f"{where}, which does not exist (docs/ has {sorted(headings)})")
            elif section is None:
                continue
            elif section.isdigit() and section not in headings[doc][0]:
                bad.append(f"{where} §{section}, which has no heading '§{section}.'")
            elif not section.isdigit() and section not in headings[doc][1]:
                bad.append(f'{where}, "{section}", which has no such heading')
    assert count > 50  # the scan finds the citations at all
    assert not bad, f"citations of missing docs: {bad}. Fix the citation or add the section."


def test_module_map_matches_the_tree():
    modules = {p.relative_to(PKG).as_posix() for p in _locality_modules()}
    listed = module_map()
    assert not modules - listed, (
        f"modules missing from docs/architecture.md's module map: {sorted(modules - listed)}. "
        "Add a row '| `path/in/locality.py` | contents |' to the `locality/` table."
    )
    assert not listed - modules, (
        f"docs/architecture.md's module map lists modules that do not exist: "
        f"{sorted(listed - modules)}. Remove or rename the rows."
    )


def test_layer_table_places_every_module():
    top = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    top |= {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    missing = top - layer_table_names()
    assert not missing, (
        f"top-level modules or packages missing from docs/architecture.md's layer table: "
        f"{sorted(missing)}. Add each to the row of the lowest level whose modules it imports."
    )


# ----------------------------------------------------------------------------- the checkers


def test_logic_lines_counts_only_logic():
    src = '''"""Module
docstring."""
import os
from typing import (
    Optional,
)

# a comment
X = 1


def f(a):
    """Doc."""
    # inner comment
    return a  # trailing comment counts as code
'''
    assert logic_lines(src) == 3  # X = 1, def f, return


def test_size_reason_must_close_the_docstring():
    assert has_size_reason('"""Title.\n\nBody.\n\nSize: one concept.\n"""\n')
    assert not has_size_reason('"""Title.\n\nSize: one concept.\n\nMore text.\n"""\n')
    assert not has_size_reason("X = 1\n")


def test_local_import_finder():
    src = (
        "import locality.stats\n"
        "def f():\n"
        "    from locality import sensitivity\n"
        "    import numpy\n"
        "    class A:\n"
        "        def g(self):\n"
        "            from . import plotting\n"
    )
    assert local_locality_imports(src) == [(3, "locality.sensitivity"), (7, ".")]


def test_citation_finder_and_headings():
    src = (
        '"""See docs/algorithms.md §9 and docs/algorithms.md\n'
        '    §4, §5; docs/architecture.md, "Denoiser"; docs/extending.md."""\n'
    )
    assert doc_citations(src) == [
        (1, "algorithms.md", "9"),
        (1, "algorithms.md", "4"),
        (1, "algorithms.md", "5"),
        (2, "architecture.md", None),
        (2, "extending.md", None),
        (2, "architecture.md", "Denoiser"),
    ]
    numbers, titles = doc_headings("# A\n## §9. Fields\n### `x.py` and y\n")
    assert numbers == {"9"} and titles == {"A", "§9. Fields", "x.py and y"}


@pytest.mark.parametrize("table", [module_map, layer_table_names])
def test_architecture_tables_are_parsed(table):
    names = table()
    assert "sensitivity.py" in names or "sensitivity" in names
