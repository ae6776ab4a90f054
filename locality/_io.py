"""Atomic file writes shared by the whole package: nothing half-written is ever left behind;
and :func:`jsonable`, the one converter of values to JSON data."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is renamed to ``path``.

    If the body raises, the temporary file is removed and ``path`` is left untouched. The file
    is created 0644 (``mkstemp`` would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return str(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return str(path)


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON data, for ``json.dumps`` (a new object; ``x`` is not changed).

    Mappings become dicts with ``str`` keys, lists and tuples become lists, numpy and JAX arrays
    become nested lists and their scalars Python numbers; ``None``, bools, ints, floats and
    strings are kept (NaN and infinities too, written as ``json.dumps`` writes them); anything
    else becomes its ``str``. The one converter of the package: the trainer's configs (tuples
    such as ``ch_mult``; the stored ``config.json`` compares equal after a round trip) and the
    entry points' metrics (numpy values).
    """
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return jsonable(np.asarray(x).tolist())
    return str(x)
