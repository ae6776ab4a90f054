"""The trainer's data: training and held-out images, and the deterministic batch order
(docs/algorithms.md §11, "Training"; docs/architecture.md, "Randomness").

- :func:`training_data` -- the images (and labels) a run trains on and the held-out images of
  its eval curve: the dataset's train split, less a class-balanced ``holdout`` part
  (:func:`locality.classify.balanced_split`), or images given by the caller; validated and
  transformed (:mod:`locality.data.transforms`) before any step.
- :func:`epoch_permutation`, :func:`batch_indices`, :class:`BatchSource`, :func:`batch_at` --
  the input pipeline: the batch at step ``s`` is a pure function of ``(seed, s)`` (epoch
  permutation from ``(seed, epoch)``, flips from ``(seed, step)``), so a resumed run sees exactly
  the batches an uninterrupted one would.

All of them are re-exported by :mod:`locality.train`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from locality import data
from locality.classify import balanced_split
from locality.data import transforms
from locality.train_config import TrainConfig

__all__ = [
    "BatchSource",
    "batch_at",
    "batch_indices",
    "epoch_permutation",
    "training_data",
]


def training_data(
    cfg: TrainConfig,
    num_classes: int,
    images: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    eval_images: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """The ``(images, labels, eval_images)`` a run of :func:`locality.train.train` uses.

    Args:
      cfg: the run's settings (``dataset``, ``resolution``, ``data_limit``, ``holdout``,
        ``seed``, ``eval_every``, ``eval_count``, ``transform``).
      num_classes: the model's number of classes (0: unconditional, no labels are returned).
      images, labels, eval_images: as in :func:`locality.train.train`; ``images=None`` loads
        ``cfg.dataset``'s train split, holds out ``cfg.holdout`` of it (class-balanced, by
        ``cfg.seed``) as the default ``eval_images``, else loads the test split when
        ``cfg.eval_every`` needs held-out images.
    Returns:
      float32 ``images`` [N, H, W, C] (transformed by ``cfg.transform``), int ``labels`` [N]
      for a class-conditional model (else ``None``), and ``eval_images`` (``None`` when none
      were given or needed).
    Raises:
      ValueError: labels missing or outside ``[0, num_classes)``, ``holdout`` with explicit
      images, no test split for the eval curve, or non-finite / non-4-D images.
    """
    if images is None:
        need_labels = bool(num_classes) or cfg.holdout > 0
        loaded = data.load(
            cfg.dataset,
            split="train",
            resolution=cfg.resolution,
            limit=cfg.data_limit,
            with_labels=need_labels,
        )
        images, labels = loaded if need_labels else (loaded, None)
        if cfg.holdout > 0:
            keep, held = balanced_split(labels, cfg.holdout, cfg.seed)
            if eval_images is None:
                eval_images = images[held]
            images, labels = images[keep], labels[keep]
        if not num_classes:
            labels = None
        if cfg.eval_every and eval_images is None:
            if "test" not in data.info(cfg.dataset).get("splits", {}):
                raise ValueError(
                    f"{cfg.dataset} has no test split for the held-out loss "
                    f"(eval_every={cfg.eval_every}); set holdout=0.1 to hold out a "
                    "class-balanced part of the training split, or eval_every=0"
                )
            eval_images = data.load(
                cfg.dataset, split="test", resolution=cfg.resolution, limit=cfg.eval_count
            )
    elif cfg.holdout > 0:
        raise ValueError(
            "holdout applies to the dataset train() loads; with explicit images, "
            "pass eval_images instead and set holdout=0"
        )
    elif num_classes and labels is None:
        raise ValueError(
            f"a class-conditional model (num_classes={num_classes}) needs the labels "
            "of the given images: pass labels=[N] ints"
        )
    if num_classes:
        labels = np.asarray(labels)
        ok = (
            labels.shape == (len(images),)
            and labels.size > 0
            and np.issubdtype(labels.dtype, np.integer)
            and labels.min() >= 0
            and labels.max() < num_classes
        )
        if not ok:
            span = f", range [{labels.min()}, {labels.max()}]" if labels.size else ""
            raise ValueError(
                f"labels must be {len(images)} ints in [0, num_classes={num_classes}); "
                f"got {labels.dtype} shape {labels.shape}{span}. Fix: set the "
                f"model's num_classes to the number of classes."
            )
    images = np.asarray(images, np.float32)
    if cfg.transform:
        images = transforms.apply(images, cfg.transform)
    if images.ndim != 4 or not np.all(np.isfinite(images)):
        raise ValueError(f"training images must be finite [N, H, W, C]; got shape {images.shape}")
    return images, labels, eval_images


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training images in ``epoch``: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs of ``n // batch_size`` full batches (the last
    partial batch of an epoch is dropped), each epoch a fresh permutation."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the number of training images {n}")
    epoch, i = divmod(int(step), per_epoch)
    return epoch_permutation(seed, epoch, n)[i * batch_size : (i + 1) * batch_size]


class BatchSource:
    """``images`` [N, H, W, C] in memory -> the batch at any step (caches the current epoch's
    permutation). Flips (if enabled) are drawn from ``(seed, step)``. With ``labels`` [N],
    :meth:`labels_at` gives the labels of the same batch."""

    def __init__(
        self,
        images: np.ndarray,
        batch_size: int,
        seed: int,
        random_flip: bool = False,
        labels: Optional[np.ndarray] = None,
    ):
        self.images = np.asarray(images, np.float32)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape [N] = [{self.images.shape[0]}], got {self.labels.shape}"
            )
        self.batch_size, self.seed, self.random_flip = batch_size, seed, random_flip
        self.n = self.images.shape[0]
        self.per_epoch = self.n // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"batch_size={batch_size} exceeds the number of images {self.n}")
        self._epoch, self._perm = None, None

    def _indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.n)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def labels_at(self, step: int) -> np.ndarray:
        """int32 [B]: the labels of the images of ``self(step)``."""
        if self.labels is None:
            raise ValueError("this BatchSource was built without labels")
        return self.labels[self._indices(step)]

    def __call__(self, step: int) -> np.ndarray:
        idx = self._indices(step)
        batch = self.images[idx]
        if self.random_flip:
            flip = np.random.default_rng([int(self.seed), int(step), 0xF11F]).random(len(idx)) < 0.5
            batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        return batch


def batch_at(
    images: np.ndarray, seed: int, step: int, batch_size: int, random_flip: bool = False
) -> np.ndarray:
    """Functional form of :class:`BatchSource`: the batch [B, H, W, C] seen at ``step``."""
    return BatchSource(images, batch_size, seed, random_flip)(step)
