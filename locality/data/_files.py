"""File helpers for the data cache: content hashes, atomic writes, a process lock.

Every file the data layer writes goes through `atomic_path`: the content is written to a
temporary name in the destination directory and moved into place with `os.replace`, so a reader
never sees a half-written file and an interrupted write leaves nothing behind under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from locality._io import atomic_path  # noqa: F401  (re-exported for the data modules)

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the bytes of `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` through a temporary file (no pickles)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if needed) for the duration of the block.

    Serialises concurrent preparation of the same dataset by several processes. On platforms
    without `fcntl` the block runs unlocked (writes are still atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # here, not at the top: fcntl exists on POSIX only (see the docstring)
        import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
