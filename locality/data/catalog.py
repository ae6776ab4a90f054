"""Standard TFDS catalogue datasets (`tfds:<name>`), behind an explicit `download=True`.

The builder lives in `<data_dir>/tfds/` and is prepared in array_record format, then read with
`builder.as_data_source()` (no TensorFlow needed for reading). Preparing from the network runs
the catalogue's own generation code, which for mnist / fashion_mnist / cifar10 in
tensorflow-datasets 4.9.10 reads the downloaded files with `tf.io.gfile`, so the first
`download=True` call needs TensorFlow installed; the error says so. GCS copies of prepared data
are never used (they are TFRecord, not array_record).

Only the requested examples are decoded (`limit` reads just the first K); nothing is cached
beyond TFDS's own files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from locality.data.errors import DataSourceError

log = logging.getLogger(__name__)


def _tfds():
    # Lazy: tensorflow_datasets takes ~0.4 s to import and only tfds: datasets need it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


class CatalogSet:
    """A TFDS catalogue dataset, prepared (downloading only if `download`)."""

    def __init__(self, tfds_name: str, root: Path, *, download: bool):
        self.display_name = "tfds:" + tfds_name
        if ":" in tfds_name and not download:
            # Namespaced names (e.g. huggingface:...) are resolved over the network.
            raise DataSourceError(
                f"{self.display_name}: namespaced TFDS datasets are looked up "
                "over the network; pass download=True."
            )
        tfds = _tfds()
        data_dir = root / "tfds"
        try:
            self.builder = tfds.builder(
                tfds_name, data_dir=str(data_dir), file_format="array_record"
            )
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(
                f"{self.display_name!r} is not a TFDS catalogue dataset ({str(e).splitlines()[0]})."
            ) from e
        if not self.builder.is_prepared():
            if not download:
                raise DataSourceError(
                    f"{self.display_name} is not prepared under {data_dir}. Pass download=True "
                    "(or --download to python -m locality.data.fetch) to download and prepare "
                    "it from the network (the first time only; "
                    "preparing needs TensorFlow), or use an offline dataset from "
                    "locality.data.names(offline=True)."
                )
            log.warning("%s: downloading and preparing into %s", self.display_name, data_dir)
            try:
                self.builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
            except ImportError as e:
                if "tensorflow" not in str(e).lower():
                    raise
                raise DataSourceError(
                    f"{self.display_name}: TFDS prepares this catalogue dataset with TensorFlow "
                    f"({e}). Install it once (`pip install tensorflow-cpu`) and repeat the call; "
                    "the downloaded files are kept in "
                    f"{data_dir / 'downloads'}, and reading the prepared data afterwards does "
                    "not need TensorFlow."
                ) from e
        features = self.builder.info.features
        if "image" not in features:
            raise ValueError(
                f"{self.display_name} has no 'image' feature (features: {list(features)})."
            )
        self.has_labels = "label" in features
        self._sources = {}

    def source(self, split: str):
        if split not in self._sources:
            try:
                self._sources[split] = self.builder.as_data_source(split=split)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{self.display_name}: unknown split {split!r} ({e}).") from e
        return self._sources[split]

    def split_size(self, split: str) -> int:
        return len(self.source(split))

    def read(self, split: str, indices: Sequence[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(uint8 [K, H, W, C], int32 [K] or None) of the examples `indices` of `split`."""
        source = self.source(split)
        images, labels = [], []
        for i in indices:
            example = source[int(i)]
            image = np.asarray(example["image"])
            if image.ndim == 2:
                image = image[..., None]
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(
                    f"{self.display_name}: images must be uint8 [H, W, C], got "
                    f"{image.dtype} {image.shape}."
                )
            images.append(image)
            if self.has_labels:
                labels.append(int(example["label"]))
        if not images:
            raise ValueError(f"{self.display_name} {split}: no examples selected.")
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise ValueError(
                f"{self.display_name}: images of different shapes {sorted(shapes)}; "
                "only fixed-size image datasets are supported."
            )
        return (np.stack(images), np.asarray(labels, np.int32) if self.has_labels else None)
