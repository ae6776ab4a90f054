import os

# Tests never touch the user's caches or the network.
os.environ.setdefault("LOCALITY_CACHE_DIR", "")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def softmax_average_np(logits, values):
    """float64 one-shot softmax over axis 1 of logits [B, K, M] against values [K, M, D]."""
    l = np.asarray(logits, np.float64)
    l = l - l.max(axis=1, keepdims=True)
    w = np.exp(l)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("bkm,kmd->bmd", w, np.asarray(values, np.float64))


def optimal_np(x_t, train, ab, tau=1.0):
    """Brute-force float64 posterior mean (docs/algorithms.md §3)."""
    q = np.asarray(x_t, np.float64).reshape(len(x_t), -1)
    x = np.asarray(train, np.float64).reshape(len(train), -1)
    d = ((q[:, None, :] - np.sqrt(ab) * x[None]) ** 2).sum(-1)
    l = -d / (2 * (1 - ab) * tau)
    l -= l.max(axis=1, keepdims=True)
    w = np.exp(l)
    w /= w.sum(axis=1, keepdims=True)
    return (w @ x).reshape(np.shape(x_t))


def noisy_uniform_data(n, shape, ab, seed=0, batch=2):
    """``n`` uniform [-1, 1] training images and ``batch`` noisy inputs at ``ab`` made from the
    first of them: ``(train [n, *shape], x_t [batch, *shape])`` float32."""
    rng = np.random.default_rng(seed)
    train = rng.uniform(-1, 1, (n,) + tuple(shape)).astype(np.float32)
    x_t = (
        np.sqrt(ab) * train[:batch] + np.sqrt(1 - ab) * rng.normal(size=(batch,) + tuple(shape))
    ).astype(np.float32)
    return train, x_t
