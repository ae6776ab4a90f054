"""Fitting linear (affine) denoisers: the exact least-squares ``(W, b)`` and gradient descent.

docs/algorithms.md §4: a denoiser ``D_t(x) = W_t x + b_t`` (``W_t`` [n, n], ``b_t`` [n], NHWC
flattening) trained with optax on

    L(W, b) = E_{x0 ~ train, eps ~ N(0, I)} || W (sqrt(ab) x0 + sqrt(1 - ab) eps) + b - x0 ||^2

with fresh noise every batch must converge to the Wiener filter
``W* = sqrt(ab) S (ab S + (1 - ab) I)^-1``, ``b* = (I - sqrt(ab) W*) mu``. The exact minimiser
of ``L`` under the *empirical* training distribution is that formula with the biased covariance
``S_N = (N - 1) / N * S`` (normal equations ``W E[x_t x_t^T] + b E[x_t]^T = E[x0 x_t^T]``,
``W E[x_t] + b = E[x0]``; :func:`least_squares_linear`); for N = 60,000 the two differ by
about 1/N relative.

Optimisation (:func:`train_linear`). With ``center=True`` (default) the model is written as
``D(x) = W (x - sqrt(ab) mu) + c`` with ``mu`` the training mean, an exact reparameterisation
(``b = c - sqrt(ab) W mu``) that removes the rank-one ``ab mu mu^T`` term from the Hessian
``2 E[x_t x_t^T]`` (on Fashion-MNIST ``||mu||^2 = 262``, above the largest data eigenvalue 79)
and decouples ``c``, whose optimum is ``mu`` for every ``W`` (its init). ``W`` starts at 0 (the
target ``W*`` is near 0 in every low-variance direction) or, with ``init="isotropic"``, at the
Wiener filter of an isotropic Gaussian of the same total variance, ``g I`` with
``g = sqrt(ab) s2 / (ab s2 + 1 - ab)`` and ``s2 = tr(S_N) / n``: near ``I`` as ``ab -> 1``, where
``W*`` is near ``I`` in every direction of non-negligible variance and a zero start has to travel
the whole way on gradients that scale with ``1 - ab``. The loss is the per-image squared error
``||D(x_t) - x0||^2`` averaged over the batch. Default: Adam at a constant learning rate with
*tail averaging*: the returned ``(W, b)`` is the uniform average of the iterates over the last
``tail`` fraction of the steps (Polyak & Juditsky 1992; for least squares, Jain et al. 2018,
"Parallelizing stochastic gradient descent for least squares regression"). Once the bias has
decayed the error is set by the gradient noise, and averaging brings it down at the statistical
rate ``E||W - W*||_F^2 ~ L* tr(Sc^-1) / M`` (``M`` samples averaged over, ``L*`` the optimal loss,
``Sc`` the covariance of ``x_t``) instead of stalling at a learning-rate-dependent floor. A cosine
decay (``schedule="cosine"``, ``tail=0``) is offered as the alternative.

Steps run in chunks of ``log_every`` inside one jitted ``lax.scan`` (parameters, optimiser
state and running average donated). The chunk and the metrics are module-level jitted functions
that take ``ab`` (as ``sqrt(ab)``, ``sqrt(1 - ab)``) as a traced argument, so one compilation per
image size, batch size, chunk length and optimiser setting serves every noise level
(docs/architecture.md, "Denoiser": a new ``ab`` does not recompile). After each chunk the
history records the chunk's mean training loss and, for the current estimate (the tail average
once averaging has begun), the relative Frobenius error ``||W - W*||_F / ||W*||_F``, the
relative error of ``b``, the relative excess loss ``(L(W, b) - L*) / L*`` (exact, from the
moments) and the cosine between the sensitivity fields (docs/algorithms.md §9) of ``W`` and ``W*``
at one pixel.

The fitted ``{ab: (W, b)}`` are served as a denoiser and saved to weight files by
:mod:`locality.denoisers.linear`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from locality.denoisers.base import HIGHEST, as_train_array
from locality.denoisers.linear import check_ab
from locality.denoisers.wiener import dense_wiener_matrices
from locality.sensitivity import check_pixels
from locality.stats import moments

# ----------------------------------------------------------------------------- closed form


def least_squares_linear(images, ab: float) -> Tuple[np.ndarray, np.ndarray]:
    """float64 ``(W, b)`` minimising the training objective exactly (docs/algorithms.md §4).

    The expectation over the empirical distribution of ``images`` [N, H, W, C] and Gaussian
    noise in closed form: ``W = sqrt(ab) S_N (ab S_N + (1 - ab) I)^-1``, ``b = (I - sqrt(ab) W) mu``
    with the biased (1/N) covariance ``S_N``; i.e. the Wiener filter of the empirical moments.
    """
    arr = as_train_array(images, "images")
    ab = check_ab(ab)
    mean, cov, count = moments(arr)
    return dense_wiener_matrices(cov * ((count - 1) / count), mean, ab)


def asymptotic_error(cov_n, ab: float, samples: float, w_ref=None) -> float:
    """Predicted root-mean-square ``||W - W*||_F`` of an estimate averaged over ``samples`` draws.

    Ordinary-least-squares asymptotics: ``Cov(vec W_hat) ~ Sigma_res (x) Sc^-1 / M`` with ``Sc``
    the covariance of ``x_t`` and ``Sigma_res`` that of the optimal residual, so
    ``E||W_hat - W*||_F^2 ~ L* tr(Sc^-1) / M`` with ``L* = tr(Sigma_res)``. Tail-averaged SGD
    attains this rate (Jain et al. 2018; module docstring). Exact for Gaussian data with a residual
    independent of ``x_t``; an approximation otherwise. Returns the error relative to
    ``||w_ref||_F`` when ``w_ref`` is given.

    Args:
      cov_n: [n, n] covariance of the data under the sampling law (biased, 1/N).
      ab: noise level; samples: ``M`` = batch size x number of averaged steps.
    """
    lam = np.clip(np.linalg.eigvalsh(np.asarray(cov_n, np.float64)), 0.0, None)
    ab = check_ab(ab)
    sc = ab * lam + (1.0 - ab)
    loss_opt = float(np.sum(lam * (1.0 - ab) / sc))
    err = float(np.sqrt(loss_opt * np.sum(1.0 / sc) / float(samples)))
    if w_ref is not None:
        err /= float(np.linalg.norm(np.asarray(w_ref, np.float64)))
    return err


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class LinearFit:
    """Result of :func:`train_linear`.

    Attributes:
      W: [n, n] float32; b: [n] float32 (``D(x) = W x + b`` on flattened NHWC inputs).
      ab: the noise level trained for.
      shape: image shape (H, W, C).
      history: ``step``, ``loss`` (mean training loss over the chunk ending at ``step``),
        ``rel_frob`` (``||W - W*||_F / ||W*||_F``), ``bias_rel`` (``||b - b*|| / ||b*||``),
        ``cosine`` (field cosine vs ``W*`` at ``pixel``) and ``excess`` (``(L(W, b) - L*) / L*``
        against the exact least-squares optimum), each a float64 numpy array; row 0 is the
        initialisation (no loss measured yet: NaN). Rows after the start of tail averaging
        describe the running average.
      seconds: wall time of the optimisation (compilation included).
      loss_opt: ``L*``, the optimal expected per-image loss.
    """

    W: np.ndarray
    b: np.ndarray
    ab: float
    shape: Tuple[int, int, int]
    history: Dict[str, np.ndarray]
    seconds: float
    loss_opt: float


def _make_optimizer(name: str, lr: float, steps: int, schedule: str):
    if schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.0)
    elif schedule == "constant":
        sched = optax.constant_schedule(lr)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}")
    if name == "adam":
        return optax.adam(sched)
    if name == "sgd":
        return optax.sgd(sched, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {name!r}")


def _abs_row(w, shape, pixel):
    h, wd, c = shape
    i, j = pixel
    return jnp.sum(jnp.abs(w.reshape(h, wd, c, h, wd, c)[i, j]), axis=(0, 3))


def train_linear(
    images,
    ab: float,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    key,
    optimizer: str = "adam",
    schedule: str = "constant",
    tail: float = 0.5,
    log_every: int = 100,
    center: bool = True,
    init: str = "zeros",
    reference: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    pixel: Optional[Tuple[int, int]] = None,
    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> LinearFit:
    """Train ``D(x) = W x + b`` on ``E||D(x_t) - x0||^2``, fresh noise every batch (§4).

    Args:
      images: [N, H, W, C] float32 in [-1, 1] (the training set; sampled with replacement).
      ab: alpha-bar of the noise level, in (0, 1).
      steps: optimisation steps; batch_size: images (and noise draws) per step; lr: peak
        learning rate.
      key: a ``jax.random`` key; step ``s`` uses ``fold_in(key, s)`` for its images and noise.
      optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9); schedule: ``"constant"`` or ``"cosine"``
        (decay to 0 over ``steps``).
      tail: fraction of the final steps whose iterates are averaged into the result (0: return
        the last iterate).
      log_every: steps per jitted chunk and per history record.
      center: train ``W (x - sqrt(ab) mu) + c`` (an exact reparameterisation; module docstring).
      init: ``"zeros"`` (``W = 0``) or ``"isotropic"`` (``W = g I``, module docstring).
      reference: ``(W*, b*)`` for the history; default :func:`least_squares_linear`.
      pixel: pixel of the field cosine; default the centre.
      callback: called as ``callback(step, record)`` after every chunk (progress logging).

    Returns:
      a :class:`LinearFit`.
    """
    arr = as_train_array(images, "images")
    ab = check_ab(ab)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1; got {v}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if init not in ("zeros", "isotropic"):
        raise ValueError(f"init must be 'zeros' or 'isotropic'; got {init!r}")
    shape = tuple(int(s) for s in arr.shape[1:])
    h, w, c = shape
    n = h * w * c
    if pixel is None:
        pixel = (h // 2, w // 2)
    (pixel,) = check_pixels([pixel], h, w)
    mu64, cov, count = moments(arr)
    cov_n = cov * ((count - 1) / count)  # biased: the empirical law
    w_ls, b_ls = dense_wiener_matrices(cov_n, mu64, ab)  # exact minimiser of the loss
    # Excess loss L(W, b) - L(W_ls, b_ls) = tr(D Sc D^T) + ||D m + b - b_ls||^2 with D = W - W_ls,
    # Sc = ab S_N + (1 - ab) I the covariance and m = sqrt(ab) mu the mean of x_t; the optimum
    # L(W_ls, b_ls) = sum_i lam_i (1 - ab) / (ab lam_i + 1 - ab).
    lam = np.clip(np.linalg.eigvalsh(cov_n), 0.0, None)
    loss_opt = float(np.sum(lam * (1.0 - ab) / (ab * lam + (1.0 - ab))))
    if reference is None:
        reference = (w_ls, b_ls)
    w_ref = np.asarray(reference[0], np.float64)
    b_ref = np.asarray(reference[1], np.float64)
    if w_ref.shape != (n, n) or b_ref.shape != (n,):
        raise ValueError(
            f"reference must be (W [{n}, {n}], b [{n}]); got {w_ref.shape}, {b_ref.shape}"
        )

    data = jnp.asarray(arr.reshape(arr.shape[0], n))
    mu = jnp.asarray(mu64, jnp.float32)
    sa, sn = float(np.sqrt(ab)), float(np.sqrt(1.0 - ab))
    shift = sa * mu if center else jnp.zeros_like(mu)
    # The optimiser's settings are static arguments of the jitted chunk (a level-independent
    # key: the step count only shapes a cosine schedule); built here to validate them and to
    # initialise its state.
    opt_spec = (optimizer, float(lr), int(steps) if schedule == "cosine" else 0, schedule)
    opt = _make_optimizer(*opt_spec)
    if not 0.0 <= float(tail) < 1.0:
        raise ValueError(f"tail must be in [0, 1); got {tail}")
    tail_start = int(round(int(steps) * (1.0 - float(tail)))) if tail > 0 else int(steps)
    if init == "zeros":
        w0 = jnp.zeros((n, n), jnp.float32)
    else:
        s2 = float(np.trace(cov_n)) / n
        w0 = jnp.eye(n, dtype=jnp.float32) * (sa * s2 / (ab * s2 + 1.0 - ab))
    params = {"W": w0, "c": jnp.array(mu, copy=True)}
    opt_state = opt.init(params)

    # Everything that depends on the noise level enters the compiled functions as an array.
    level = (jnp.float32(sa), jnp.float32(sn), jnp.int32(tail_start))
    ref = (jnp.asarray(w_ref, jnp.float32), jnp.asarray(b_ref, jnp.float32))
    ls = tuple(
        jnp.asarray(a, jnp.float32)
        for a in (w_ls, b_ls, ab * cov_n + (1.0 - ab) * np.eye(n), np.sqrt(ab) * mu64)
    )

    def measure(p):
        return _measure(p, shift, ref, ls, shape, pixel)

    hist = {k: [] for k in ("step", "loss", "rel_frob", "bias_rel", "cosine", "excess")}

    def record(step, loss, p):
        rel, brel, cos, excess, _ = measure(p)
        rec = {
            "step": int(step),
            "loss": float(loss),
            "rel_frob": float(rel),
            "bias_rel": float(brel),
            "cosine": float(cos),
            "excess": float(excess) / loss_opt if loss_opt > 0 else float(excess),
        }
        for k_, v in rec.items():
            hist[k_].append(v)
        if callback is not None:
            callback(int(step), rec)

    t0 = time.perf_counter()
    avg = jax.tree_util.tree_map(jnp.copy, params)
    record(0, float("nan"), params)
    done = 0
    while done < steps:
        length = min(int(log_every), int(steps) - done)
        params, opt_state, avg, loss = _train_chunk(
            params,
            opt_state,
            avg,
            jnp.int32(done),
            data,
            shift,
            key,
            level,
            opt_spec,
            int(batch_size),
            length,
        )
        done += length
        record(done, loss, avg if done > tail_start else params)
    final = avg if steps > tail_start else params
    b_final = measure(final)[-1]
    w_final = np.asarray(final["W"])
    seconds = time.perf_counter() - t0
    return LinearFit(
        W=w_final,
        b=np.asarray(b_final),
        ab=ab,
        shape=shape,
        history={k: np.asarray(v, np.float64) for k, v in hist.items()},
        seconds=seconds,
        loss_opt=loss_opt,
    )


def _run_chunk(
    params, opt_state, avg, start, data, shift, key, level, opt_spec, batch_size, length
):
    """``length`` optimisation steps from step ``start`` (one ``lax.scan``; jitted as
    :data:`_train_chunk`).

    ``level = (sqrt(ab), sqrt(1 - ab), tail_start)`` are traced scalars, so one compiled program
    serves every noise level; ``opt_spec`` (:func:`_make_optimizer`'s arguments), ``batch_size``
    and ``length`` are static. Step ``s`` draws its images and noise from ``fold_in(key, s)``.
    Returns the updated ``(params, opt_state, avg)`` and the mean training loss of the chunk.
    """
    sa, sn, tail_start = level
    opt = _make_optimizer(*opt_spec)

    def loss_fn(p, x0, eps):
        x_t = sa * x0 + sn * eps
        pred = jnp.matmul(x_t - shift, p["W"].T, precision=HIGHEST) + p["c"]
        return jnp.mean(jnp.sum(jnp.square(pred - x0), axis=-1))

    def one_step(carry, step):
        p, s, avg = carry
        k_idx, k_eps = jax.random.split(jax.random.fold_in(key, step))
        x0 = data[jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(p, x0, eps)
        upd, s = opt.update(g, s, p)
        p = optax.apply_updates(p, upd)
        # Running uniform average of the iterates after step `tail_start` (step is 0-based;
        # the iterate after it is number step + 1).
        wgt = jnp.where(step + 1 > tail_start, 1.0 / (step + 1 - tail_start), 0.0)
        avg = jax.tree_util.tree_map(lambda a, q: a + wgt * (q - a), avg, p)
        return (p, s, avg), loss

    (params, opt_state, avg), losses = jax.lax.scan(
        one_step, (params, opt_state, avg), start + jnp.arange(length)
    )
    return params, opt_state, avg, jnp.mean(losses)


# Compiled once per (image size, batch size, chunk length, optimiser settings); the parameters,
# optimiser state and running average are donated.
_train_chunk = jax.jit(_run_chunk, static_argnums=(8, 9, 10), donate_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _measure(p, shift, ref, ls, shape, pixel):
    """The history's metrics of the estimate ``p`` (module docstring): relative errors of ``W``
    and ``b`` against ``ref = (W*, b*)``, the field cosine at ``pixel`` (docs/algorithms.md §9),
    the excess loss from the moments ``ls = (W_ls, b_ls, Sc, m)``, and ``b`` itself."""
    w_ref_d, b_ref_d = ref
    wm = p["W"]
    b = p["c"] - jnp.matmul(wm, shift, precision=HIGHEST)
    w_ls_d, b_ls_d, sc, m = ls
    d = wm - w_ls_d
    excess = jnp.sum(jnp.matmul(d, sc, precision=HIGHEST) * d) + jnp.sum(
        jnp.square(jnp.matmul(d, m, precision=HIGHEST) + b - b_ls_d)
    )
    rel = jnp.linalg.norm(wm - w_ref_d) / jnp.linalg.norm(w_ref_d)
    brel = jnp.linalg.norm(b - b_ref_d) / jnp.maximum(jnp.linalg.norm(b_ref_d), 1e-30)
    f, f_ref = _abs_row(wm, shape, pixel), _abs_row(w_ref_d, shape, pixel)
    cos = jnp.sum(f * f_ref) / jnp.maximum(jnp.linalg.norm(f) * jnp.linalg.norm(f_ref), 1e-30)
    return rel, brel, cos, excess, b
