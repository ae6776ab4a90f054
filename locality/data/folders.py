"""Image-folder datasets (`celeb_a_hq`, `afhq`): find the user's directory and list its images.

Layout rules (documented in `registry.py`):

* image files: extensions .png .jpg .jpeg .bmp .webp (any case), hidden files/folders skipped;
  symlinked sub-folders are not followed;
* if the root has sub-folders named train / test / val / validation holding images, each is a
  split (images anywhere else are an error); otherwise every image is in split 'train';
* within a split, if every image sits in a sub-folder, the first sub-folder name is its class;
  class names are sorted, label = index. Otherwise the set is unlabelled;
* order: relative paths sorted as strings.

The fingerprint covers every (relative path, size, mtime) so adding, removing or touching a file
gives a new cache key; contents are not hashed (CelebA-HQ is gigabytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Optional

from locality.data import registry
from locality.data.errors import DataSourceError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
SPLIT_DIRS = ("train", "test", "val", "validation")


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    root: Path
    splits: dict  # split -> tuple of (relative path, label or None), in order
    class_names: Optional[tuple[str, ...]]
    fingerprint: str

    @property
    def split_sizes(self) -> dict:
        return {s: len(v) for s, v in self.splits.items()}


def folder_root(name: str, cache_root: Path) -> Path:
    env = os.environ.get(registry.folder_env_var(name))
    if env:
        return Path(env).expanduser()
    return cache_root / "manual" / name


def _list_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(found)


def scan_folder(name: str, root: Path) -> FolderLayout:
    """Lists the images of the image-folder dataset `name` stored under `root`."""
    spec = registry.SPECS[name]
    if not root.is_dir():
        raise DataSourceError(
            f"{name}: image directory {root} does not exist. "
            f"Put the image files in a directory and set "
            f"{registry.folder_env_var(name)}=/that/dir, or place them under "
            f"{root}/. ({spec.source})"
        )
    files = _list_images(root)
    if not files:
        raise DataSourceError(
            f"{name}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}."
        )
    by_split: dict[str, list[str]] = {}
    if any(f.split("/", 1)[0] in SPLIT_DIRS and "/" in f for f in files):
        stray = [f for f in files if f.split("/", 1)[0] not in SPLIT_DIRS or "/" not in f]
        if stray:
            raise DataSourceError(
                f"{name}: {root} has split folders ({', '.join(SPLIT_DIRS)}) but also images "
                f"outside them, e.g. {stray[0]!r}; move or delete those."
            )
        for f in files:
            split, rest = f.split("/", 1)
            by_split.setdefault(split, []).append(rest)
        prefix = {s: s + "/" for s in by_split}
    else:
        by_split = {"train": files}
        prefix = {"train": ""}
    labelled = all("/" in rel for rels in by_split.values() for rel in rels)
    class_names = None
    if labelled:
        class_names = tuple(
            sorted({rel.split("/", 1)[0] for rels in by_split.values() for rel in rels})
        )
    index = {c: i for i, c in enumerate(class_names or ())}
    splits = {}
    for split in sorted(by_split):
        splits[split] = tuple(
            (prefix[split] + rel, index[rel.split("/", 1)[0]] if labelled else None)
            for rel in by_split[split]
        )
    digest = hashlib.sha256()
    for f in files:
        st = (root / f).stat()
        digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return FolderLayout(
        root=root, splits=splits, class_names=class_names, fingerprint=digest.hexdigest()
    )
