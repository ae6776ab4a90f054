"""A small CNN classifier trained on a labelled dataset, to measure whether class-conditional
samples show the class they were asked for ("label agreement").

Samples of a class-conditional diffusion model are usually judged by a pretrained classifier
(e.g. the Inception accuracy behind the Inception Score, Salimans et al. 2016); nothing
pretrained is available offline here, so :func:`train_classifier` fits one on the training set
itself and reports its accuracy on a held-out, class-balanced part of it. The agreement of
samples is only meaningful next to that held-out accuracy (real images score at most that).

Network: three 3x3 conv layers (32, 64, 128 channels, ReLU, 2x2 average pooling after the first
two), global average pooling, a dense layer to the classes; AdamW with a cosine decay, random
horizontal flips. Everything is a function of ``seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import serialization

from locality._io import atomic_write_bytes, atomic_write_text


class SmallCNN(nn.Module):
    num_classes: int
    width: int = 32

    @nn.compact
    def __call__(self, x, features: bool = False):
        """Logits [B, num_classes], or with ``features=True`` the globally pooled activations
        of the last conv layer [B, 4 * width] that the head reads (the feature space of the
        Frechet distance in :mod:`locality.quality`)."""
        for i, mult in enumerate((1, 2, 4)):
            x = nn.relu(nn.Conv(self.width * mult, (3, 3), name=f"conv{i}")(x))
            if i < 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        pooled = x.mean(axis=(1, 2))
        if features:
            return pooled
        return nn.Dense(self.num_classes, name="head")(pooled)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """``predict(images [B, H, W, C]) -> int labels [B]`` and ``probs``; ``holdout_accuracy`` on
    the held-out images, ``holdout_size`` their number."""

    params: dict
    num_classes: int
    width: int
    holdout_accuracy: float
    holdout_size: int
    train_accuracy: float

    def _apply(self, images, batch: int, features: bool) -> np.ndarray:
        model = SmallCNN(self.num_classes, self.width)
        fn = jax.jit(lambda x: model.apply({"params": self.params}, x, features=features))
        images = np.asarray(images, np.float32)
        width = 4 * self.width if features else self.num_classes
        return (
            np.concatenate(
                [np.asarray(fn(images[i : i + batch])) for i in range(0, len(images), batch)]
            )
            if len(images)
            else np.zeros((0, width), np.float32)
        )

    def logits(self, images, batch: int = 512) -> np.ndarray:
        return self._apply(images, batch, features=False)

    def features(self, images, batch: int = 512) -> np.ndarray:
        """Pooled last-conv features [B, 4 * width] (see :class:`SmallCNN`)."""
        return self._apply(images, batch, features=True)

    def predict(self, images) -> np.ndarray:
        return self.logits(images).argmax(-1)

    def probs(self, images) -> np.ndarray:
        return np.asarray(jax.nn.softmax(self.logits(images), -1))


def balanced_split(labels, holdout: float, seed: int):
    """Indices ``(train, held_out)``: a fraction ``holdout`` of every class is held out, chosen by
    a permutation from ``seed``."""
    labels = np.asarray(labels)
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    rng = np.random.default_rng([int(seed), 0xC1A5])
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(holdout * len(idx))))
        if k >= len(idx):
            raise ValueError(f"class {c} has {len(idx)} images; too few to hold out {holdout:.0%}")
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train_classifier(
    images,
    labels,
    *,
    num_classes: int | None = None,
    holdout: float = 0.1,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    flip: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> Classifier:
    """Fit :class:`SmallCNN` on ``images`` [N, H, W, C] in [-1, 1] with int ``labels`` [N],
    holding out a class-balanced ``holdout`` fraction (:func:`balanced_split`) for the reported
    accuracy."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (len(images),):
        raise ValueError(
            f"need images [N, H, W, C] and labels [N]; got {images.shape}, {labels.shape}"
        )
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    tr, ho = balanced_split(labels, holdout, seed)
    x_tr, y_tr = images[tr], labels[tr].astype(np.int32)
    steps_per_epoch = max(len(tr) // batch_size, 1)
    total = epochs * steps_per_epoch
    model = SmallCNN(num_classes, width)
    params = model.init(jax.random.PRNGKey(seed), images[:1])["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(lr, total), weight_decay=weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([int(seed), 0xBA7C])
    from tqdm.auto import tqdm

    for _ in tqdm(range(epochs), desc="classifier", disable=not progress, leave=False):
        perm = rng.permutation(len(tr))
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = x_tr[idx]
            if flip:
                f = rng.random(len(idx)) < 0.5
                x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
            params, opt_state, _ = step(params, opt_state, x, y_tr[idx])
    clf = Classifier(
        params=params,
        num_classes=num_classes,
        width=width,
        holdout_accuracy=0.0,
        holdout_size=len(ho),
        train_accuracy=0.0,
    )
    acc = lambda idx: float(np.mean(clf.predict(images[idx]) == labels[idx]))
    return dataclasses.replace(clf, holdout_accuracy=acc(ho), train_accuracy=acc(tr))


def label_agreement(clf: Classifier, images, requested) -> dict:
    """How often the classifier assigns ``images`` the ``requested`` labels: overall and per
    class, plus the mean probability of the requested class."""
    requested = np.asarray(requested)
    pred = clf.predict(images)
    p = clf.probs(images)[np.arange(len(requested)), requested]
    per_class = {int(c): float(np.mean(pred[requested == c] == c)) for c in np.unique(requested)}
    return {
        "agreement": float(np.mean(pred == requested)),
        "per_class": per_class,
        "mean_prob_requested": float(p.mean()),
        "predicted_fractions": {int(c): float(np.mean(pred == c)) for c in range(clf.num_classes)},
    }


def cached_classifier(images, labels, cache_dir, **kwargs) -> Classifier:
    """:func:`train_classifier` on ``(images, labels, **kwargs)``, cached on disk under
    ``cache_dir`` by a SHA-256 of the images' and labels' bytes and of every keyword, so a
    changed dataset or setting trains anew and a stale entry is never read. The entry is written
    atomically (weights with ``flax.serialization``, the accuracies in a JSON sidecar)."""
    images = np.ascontiguousarray(images, np.float32)
    labels = np.ascontiguousarray(labels, np.int64)
    h = hashlib.sha256()
    for a in (images, labels):
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    h.update(
        json.dumps(
            {k: kwargs[k] for k in sorted(kwargs) if k != "progress"}, sort_keys=True, default=str
        ).encode()
    )
    key = h.hexdigest()[:24]
    weights, meta = (
        os.path.join(cache_dir, f"classifier-{key}{ext}") for ext in (".msgpack", ".json")
    )
    if os.path.exists(weights) and os.path.exists(meta):
        info = json.loads(open(meta).read())
        model = SmallCNN(info["num_classes"], info["width"])
        template = model.init(jax.random.PRNGKey(0), images[:1])["params"]
        params = serialization.from_bytes(template, open(weights, "rb").read())
        return Classifier(params=params, **info)
    clf = train_classifier(images, labels, **kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write_bytes(weights, serialization.to_bytes(clf.params))
    info = {f.name: getattr(clf, f.name) for f in dataclasses.fields(clf) if f.name != "params"}
    atomic_write_text(meta, json.dumps(info, indent=2))
    return clf


__all__ = [
    "SmallCNN",
    "Classifier",
    "balanced_split",
    "train_classifier",
    "cached_classifier",
    "label_agreement",
]
