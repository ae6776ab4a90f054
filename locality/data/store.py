"""Prepared TFDS data and decoded-array caches, keyed by the content of the source files.

Layout under the cache root (`acquire.cache_root`):

    raw/<name>/...                                  raw files (acquire.py)
    prepared/<name>-<key>/locality_<name>/<ver>/    TFDS array_record files + dataset_info.json
        images-<split>.npy, labels-<split>.npy      decoded uint8 / int32 arrays of a whole split
        images-<split>-<R>px.npy                    the same split resized to R x R (on demand)

`key` is the first 16 hex digits of sha256 over the dataset name, the builder version and the
sha256 of every raw file (for image folders: every file's path, size and mtime). Changing any
source file therefore selects a new directory; nothing stale is ever read. After a successful
build, directories of the same dataset with other keys are deleted.

A cache hit costs one `np.load` per array (no TFDS import, no decoding); a miss builds the TFDS
dataset once, reads it back through `builder.as_data_source()` and writes the .npy files
atomically under a per-dataset lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from locality.data import formats, registry
from locality.data._files import atomic_save_npy, file_lock
from locality.data.errors import CorruptDataError

log = logging.getLogger(__name__)

_READ_CHUNK = 4096


def content_key(name: str, entries: Mapping[str, str]) -> str:
    """16-hex-digit key of a dataset's sources: name, builder version and per-file digests."""
    payload = json.dumps(
        {
            "name": name,
            "builder_version": registry.BUILDER_VERSION,
            "entries": sorted(entries.items()),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PreparedSet:
    """One dataset's prepared TFDS builder and decoded caches for one content key.

    Attributes:
      name: dataset name (a key of `builders.BUILDERS`).
      root: cache root.
      key: `content_key` of the sources.
      builder_kwargs: source arguments of the builder (`raw_files=` or `layout=`).
      shape: image shape (H, W, C); None for variable-size images (natural photos).
      split_sizes: expected number of examples per split.
      has_labels: whether examples carry a 'label'.
    """

    name: str
    root: Path
    key: str
    builder_kwargs: Mapping[str, Any] = dataclasses.field(compare=False)
    shape: Optional[tuple[int, int, int]]
    split_sizes: Mapping[str, int]
    has_labels: bool

    @property
    def base_dir(self) -> Path:
        return self.root / "prepared" / f"{self.name}-{self.key}"

    @property
    def version_dir(self) -> Path:
        return self.base_dir / registry.builder_name(self.name) / registry.BUILDER_VERSION

    def _lock(self):
        return file_lock(self.root / "prepared" / f".{self.name}.lock")

    def _paths(self, split: str, size: Optional[int] = None) -> tuple[Path, Path]:
        suffix = "" if size is None else f"-{size}px"
        return (
            self.version_dir / f"images-{split}{suffix}.npy",
            self.version_dir / f"labels-{split}.npy",
        )

    # ------------------------------------------------------------------------------ building

    def builder(self):
        """The TFDS builder over this key's directory (constructing it does not build data)."""
        # Lazy: builders imports tensorflow_datasets (~0.4 s), needed only to build a dataset.
        from locality.data import builders  # pylint: disable=g-import-not-at-top

        cls = builders.BUILDERS[self.name]
        return cls(data_dir=str(self.base_dir), file_format="array_record", **self.builder_kwargs)

    def _built_builder(self):
        # Lazy: builders imports tensorflow_datasets (see builder()).
        from locality.data import builders  # pylint: disable=g-import-not-at-top

        builder = self.builder()
        if not builder.is_prepared():
            log.warning("%s: building TFDS array_record data in %s", self.name, self.base_dir)
            builder.download_and_prepare(download_config=builders.NO_NETWORK)
            self._remove_stale()
        return builder

    def _remove_stale(self) -> None:
        pattern = re.compile(re.escape(self.name) + r"-[0-9a-f]{16}")
        for other in (self.root / "prepared").iterdir():
            if other != self.base_dir and other.is_dir() and pattern.fullmatch(other.name):
                log.info("%s: removing cache of older sources %s", self.name, other)
                shutil.rmtree(other, ignore_errors=True)

    def prepare(self, force: bool = False) -> None:
        """Builds the TFDS data and the decoded arrays of every split (idempotent)."""
        if force and self.base_dir.exists():
            with self._lock():
                shutil.rmtree(self.base_dir)
        if self.shape is None:
            self.photos()
            return
        for split in self.split_sizes:
            self.arrays(split)

    # ------------------------------------------------------------------------------- reading

    def _load_cached(self, split: str, size: Optional[int] = None):
        images_path, labels_path = self._paths(split, size)
        if not images_path.is_file() or (self.has_labels and not labels_path.is_file()):
            return None
        h, w, c = self.shape
        if size is not None:
            h = w = size
        try:
            images = np.load(images_path, allow_pickle=False)
            labels = np.load(labels_path, allow_pickle=False) if self.has_labels else None
        except (ValueError, OSError) as e:
            log.warning("%s: unreadable cache %s (%s); rebuilding", self.name, images_path, e)
            return None
        n = self.split_sizes[split]
        if (
            images.dtype != np.uint8
            or images.shape != (n, h, w, c)
            or (labels is not None and (labels.dtype != np.int32 or labels.shape != (n,)))
        ):
            log.warning(
                "%s: cache %s has unexpected shape %s; rebuilding",
                self.name,
                images_path,
                images.shape,
            )
            return None
        return images, labels

    def arrays(self, split: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(uint8 [N, H, W, C], int32 [N] or None) of a whole split, decoded once and cached."""
        cached = self._load_cached(split)
        if cached is not None:
            return cached
        with self._lock():
            cached = self._load_cached(split)  # Another process may have just written it.
            if cached is not None:
                return cached
            source = self._built_builder().as_data_source(split=split)
            images, labels = self._read_all(source, split)
            images_path, labels_path = self._paths(split)
            if labels is not None:
                atomic_save_npy(labels_path, labels)
            atomic_save_npy(images_path, images)
            return images, labels

    def _read_all(self, source, split: str):
        n = self.split_sizes[split]
        if len(source) != n:
            raise CorruptDataError(
                f"{self.name} {split}: prepared data in {self.version_dir} has {len(source)} "
                f"examples, expected {n}; rebuild with `python -m locality.data.fetch "
                f"{self.name} --force`."
            )
        images = np.empty((n, *self.shape), np.uint8)
        labels = np.empty((n,), np.int32) if self.has_labels else None
        for start in range(0, n, _READ_CHUNK):
            indices = list(range(start, min(n, start + _READ_CHUNK)))
            for i, example in zip(indices, source.__getitems__(indices)):
                images[i] = example["image"]
                if labels is not None:
                    labels[i] = example["label"]
        return images, labels

    def has_resized(self, split: str, size: int) -> bool:
        return self._paths(split, size)[0].is_file()

    def resized(self, split: str, size: int) -> np.ndarray:
        """uint8 [N, size, size, C]: `arrays(split)` resized (formats.resize_images), cached."""
        cached = self._load_cached(split, size)
        if cached is not None:
            return cached[0]
        images, _ = self.arrays(split)
        out = formats.resize_images(images, size)
        atomic_save_npy(self._paths(split, size)[0], out)
        return out

    def photos(self) -> list[tuple[str, np.ndarray]]:
        """For variable-size sets (natural photos): [(name, uint8 [H, W, 3]), ...] in order."""
        with self._lock():
            source = self._built_builder().as_data_source(split="train")
            return [
                (str(ex["name"]), np.asarray(ex["image"], np.uint8))
                for ex in source.__getitems__(list(range(len(source))))
            ]
