"""Dataset statistics: streaming mean and covariance in float64, eigendecomposition, cache.

docs/algorithms.md §2. The covariance ``S = sum_k (x_k - mu)(x_k - mu)^T / (N - 1)`` over all
``n = H*W*C`` elements (row-major NHWC flattening) is accumulated in float64 over chunks of
images, never materialising ``N x n`` in float64; memory is O(chunk * n + n^2) whatever N is.
To avoid cancellation, sums are taken about a shift (the first chunk's mean), which leaves the
covariance unchanged: ``S = (sum d d^T - N dbar dbar^T) / (N - 1)`` with ``d = x - shift``.
The eigendecomposition ``S = U diag(lam) U^T`` uses float64 ``eigh``; tiny negative eigenvalues
(round-off; a covariance of fewer images than elements is singular) are clipped to 0.

Results are cached on disk keyed by a content fingerprint of the images actually used
(sha256 of the float32 bytes and the shape), never by a dataset name.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Tuple

import flax
import numpy as np

from locality._io import atomic_path

CACHE_VERSION = 1


@flax.struct.dataclass
class GaussianStats:
    """Gaussian statistics of a dataset (a pytree; arrays are float64 numpy).

    Attributes:
      mean: [n] float64.
      eigvals: [n] float64, descending, >= 0.
      eigvecs: [n, n] float64, column i is the eigenvector of ``eigvals[i]``.
      count: number of images N.
      shape: image shape (H, W, C); ``n = H * W * C``.
      fingerprint: content hash of the images the statistics were computed from.
    """

    mean: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray
    count: int = flax.struct.field(pytree_node=False)
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    fingerprint: str = flax.struct.field(pytree_node=False)

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    def covariance(self) -> np.ndarray:
        """Dense covariance ``U diag(lam) U^T`` (float64, n x n)."""
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T


def validate_images(images, what: str = "images", allow_empty: bool = False) -> np.ndarray:
    """Check the array contract (float32-convertible, NHWC, finite, in [-1, 1]) at the boundary."""
    if isinstance(images, (list, tuple)):
        raise TypeError(f"{what} must be an array [N, H, W, C], got a {type(images).__name__}")
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(
            f"{what} must have rank 4 [N, H, W, C] (NHWC); got shape {arr.shape}. "
            "Add a channel axis for grey images: x[..., None]."
        )
    if arr.shape[-1] > 4 and arr.shape[1] in (1, 3, 4):
        raise ValueError(
            f"{what} has shape {arr.shape}, which looks like NCHW ({arr.shape[-1]} "
            "channels?); the project uses NHWC: transpose with x.transpose(0, 2, 3, 1)"
        )
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what} is empty (shape {arr.shape}); need at least one image")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{what} has dtype {arr.dtype}; expected float32 in [-1, 1] "
            "(for uint8 pixels use x / 127.5 - 1)"
        )
    if arr.size:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{what} contains NaN or inf")
        if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
            raise ValueError(
                f"{what} has values in [{lo:.4g}, {hi:.4g}]; expected [-1, 1] "
                "(for [0, 1] data use 2 * x - 1)"
            )
    return arr.astype(np.float32, copy=False)


def fingerprint(images: np.ndarray) -> str:
    """sha256 (hex, 32 chars) of the float32 C-order bytes of ``images`` and their shape."""
    arr = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    h = hashlib.sha256()
    h.update(repr(arr.shape).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()[:32]


def moments(images: np.ndarray, chunk_size: int = 4096) -> Tuple[np.ndarray, np.ndarray, int]:
    """Streaming float64 mean [n] and unbiased covariance [n, n] of ``images`` [N, H, W, C].

    docs/algorithms.md §2. With N == 1 the covariance is all zeros (no spread observed).
    """
    images = np.asarray(images)
    n_img = int(images.shape[0])
    if n_img == 0:
        raise ValueError("cannot compute statistics of an empty dataset (0 images)")
    flat = images.reshape(n_img, -1)
    n = flat.shape[1]
    shift = flat[: min(chunk_size, n_img)].astype(np.float64).mean(axis=0)
    s1 = np.zeros(n, np.float64)
    s2 = np.zeros((n, n), np.float64)
    for start in range(0, n_img, chunk_size):
        d = flat[start : start + chunk_size].astype(np.float64)
        d -= shift
        s1 += d.sum(axis=0)
        s2 += d.T @ d
    dbar = s1 / n_img
    mean = shift + dbar
    if n_img > 1:
        cov = (s2 - n_img * np.outer(dbar, dbar)) / (n_img - 1)
    else:
        cov = np.zeros((n, n), np.float64)
    cov = 0.5 * (cov + cov.T)
    return mean, cov, n_img


def eig(cov: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float64 ``eigh`` of a covariance, eigenvalues descending and clipped at 0."""
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), np.ascontiguousarray(u[:, order])


def _default_cache_dir() -> Optional[str]:
    return os.environ.get("LOCALITY_CACHE_DIR") or None


def _atomic_savez(path: str, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


class StaleCacheError(RuntimeError):
    """A cache file does not match the data it is supposed to describe, or is unreadable."""


def _load_cached(path: str, fp: str, shape) -> GaussianStats:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {k: z[k] for k in z.files}
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise StaleCacheError(
            f"statistics cache file {path} is corrupt ({type(e).__name__}: {e}); "
            "delete it and recompute"
        ) from e
    need = {"mean", "eigvals", "eigvecs", "count", "shape", "fingerprint", "version"}
    if not need <= set(meta):
        raise StaleCacheError(
            f"statistics cache file {path} lacks {sorted(need - set(meta))}; "
            "delete it and recompute"
        )
    if (
        int(meta["version"]) != CACHE_VERSION
        or str(meta["fingerprint"]) != fp
        or tuple(int(s) for s in meta["shape"]) != tuple(shape)
    ):
        raise StaleCacheError(
            f"statistics cache file {path} was written for other data (fingerprint "
            f"{meta['fingerprint']}, shape {tuple(meta['shape'])}, version {int(meta['version'])}) "
            f"but is named for {fp}, shape {tuple(shape)}; delete it and recompute"
        )
    n = int(np.prod(shape))
    if (
        meta["mean"].shape != (n,)
        or meta["eigvecs"].shape != (n, n)
        or not np.all(np.isfinite(meta["eigvals"]))
    ):
        raise StaleCacheError(f"statistics cache file {path} has inconsistent arrays; delete it")
    return GaussianStats(
        mean=meta["mean"],
        eigvals=meta["eigvals"],
        eigvecs=meta["eigvecs"],
        count=int(meta["count"]),
        shape=tuple(int(s) for s in shape),
        fingerprint=fp,
    )


def gaussian_stats(
    images, *, chunk_size: int = 4096, cache_dir: Optional[str] = None, use_cache: bool = True
) -> GaussianStats:
    """Mean, eigendecomposition of the covariance, count and fingerprint of ``images``.

    Args:
      images: [N, H, W, C] float32 in [-1, 1].
      chunk_size: images per float64 accumulation step (memory O(chunk * n + n^2)).
      cache_dir: directory of ``stats-<fingerprint>.npz`` files; default ``$LOCALITY_CACHE_DIR``
        (no caching when neither is set).
      use_cache: set False to bypass the cache.
    """
    arr = validate_images(images)
    shape = tuple(int(s) for s in arr.shape[1:])
    fp = fingerprint(arr)
    cache_dir = cache_dir or _default_cache_dir()
    path = os.path.join(cache_dir, f"stats-{fp}.npz") if (cache_dir and use_cache) else None
    if path and os.path.exists(path):
        return _load_cached(path, fp, shape)
    mean, cov, count = moments(arr, chunk_size=chunk_size)
    lam, u = eig(cov)
    st = GaussianStats(mean=mean, eigvals=lam, eigvecs=u, count=count, shape=shape, fingerprint=fp)
    if path:
        _atomic_savez(
            path,
            mean=mean,
            eigvals=lam,
            eigvecs=u,
            count=np.int64(count),
            shape=np.asarray(shape, np.int64),
            fingerprint=np.str_(fp),
            version=np.int64(CACHE_VERSION),
        )
    return st
