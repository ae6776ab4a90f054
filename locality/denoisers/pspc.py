"""Patch-based posterior means of Niedoba et al.: PSPC-Square and PSPC-Flex (docs/algorithms.md §7).

Source: M. Niedoba, B. Zwartsenberg, K. Murphy, F. Wood, "Towards a mechanistic explanation of
diffusion model generalization" (2024/2025). Process: EDM VE, ``z = x + t eps``. For a 0/1 crop
``C`` (spatial, all channels) the patch posterior mean over the training set is

    E[x_C | z_C] = sum_k softmax_k(-||C z - C x^(k)||^2 / (2 t^2)) C x^(k).

With ``z = x_t / sqrt(ab)`` and ``t^2 = (1 - ab) / ab`` the logit equals
``-||C x_t - sqrt(ab) C x^(k)||^2 / (2 (1 - ab))``, so the VP denoiser signature ``(x_t, ab)`` is
used as everywhere else; ``||C x_t||^2`` cancels and each crop's softmax is streamed exactly over
all training images (:func:`locality.streaming.stream`).

PSPC-Square (``pspc_square``)
    All ``s x s`` squares fully inside the image (upper-left corner ``(u, v)``,
    ``0 <= u <= H - s``, ``0 <= v <= W - s``; no padding). Each square has its own softmax over the
    training set (co-located crops, not equivariant); each pixel is the average, over all squares
    covering it, of the whole-square posterior mean at that pixel. ``s = H`` (square images) is the
    optimal denoiser. The cross terms of all squares are s x s box sums of the pixelwise product
    (separable ``reduce_window``), the square posterior means come out of one stream with the
    square's pixels as values, and the overlap average is a static scatter-add.
    ``s`` per step: int, callable ``sigma -> int``, :class:`~locality.denoisers.patch_schedules.
    SizeSchedule`, a list of 18 sizes on the 18-step EDM grid, ``"file:PATH"``, or the published
    CIFAR-10 schedule :data:`CIFAR10_EDM_SCHEDULE` (name ``"cifar10_edm"``); sizes of a *named*
    schedule larger than the image are clipped to ``min(H, W)`` ("the whole image"), explicit
    sizes larger than the image are an error. Static-size dispatch and ``lax.switch`` under tracing
    work as for the local score machines (see :mod:`locality.denoisers.patch_schedules`).

PSPC-Flex (``pspc_flex``)
    Crops grown from a network denoiser's gradient heat maps. Parameterisation used here: at every
    noise level of a grid (the sampler's steps), for output pixel ``p`` the heat map is

        h_p(q) = mean over probes of  sum_{c_out, c_in} | d D(x_t)[p, c_out] / d x_t[q, c_in] |

    (the sensitivity fields of docs/algorithms.md §9 for all output pixels,
    :func:`gradient_heatmaps`, also summed over the output channels of ``p``; probes are noisy
    training images). The
    crop of ``p`` holds the pixels of largest ``h_p``, taken in decreasing order until their mass
    reaches a fraction ``lambda(t)`` of ``sum_q h_p(q)`` (the pixel crossing the threshold is
    included), plus ``p`` itself (:func:`grow_masks`). Output pixel ``p`` is the posterior mean
    of ``x_p`` under its own crop -- the per-pixel masked empirical denoiser, i.e. the PCA-locality
    machine of docs/algorithms.md §5 with the crop masks in place of the Wiener-derived ones.
    At call time the mask set of the grid point nearest in ``log(sigma)`` is used (traced-friendly).
    ``lambda`` is a float or a callable ``sigma -> fraction``; masks can also be given directly.

Both use the training set with horizontal flips appended (``flip=True``, the default, as in
Niedoba et al.); ``flip=False`` uses the training set as given.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import schedules, streaming
from locality.denoisers.base import HIGHEST, DenoiserBase, as_train_array, resolve_mesh
from locality.denoisers.patch_kernels import box_valid, logit_scale
from locality.denoisers.patch_schedules import (
    SizedDenoiser,
    SizeSchedule,
    SizeSpec,
    resolve_size_spec,
)
from locality.denoisers.registry import make, register
from locality.sensitivity import fields

EDM_STEPS = 18

# Published CIFAR-10 schedule on the 18-step EDM grid (docs/algorithms.md §7): (lowest sigma of the
# band on the grid, square size), high to low noise; below 0.585 the size is 3.
CIFAR10_EDM_BANDS = (
    (8.40, 32),
    (5.32, 23),
    (3.26, 15),
    (1.92, 11),
    (1.09, 7),
    (0.585, 5),
    (0.0, 3),
)


def _cifar10_edm_sizes(sigmas: np.ndarray) -> Tuple[int, ...]:
    out = []
    for s in sigmas:
        for lo, size in CIFAR10_EDM_BANDS:
            if s >= lo - 5e-3:  # grid values are quoted to 3 significant digits
                out.append(size)
                break
    return tuple(out)


def edm_grid_sigmas(num_steps: int = EDM_STEPS) -> np.ndarray:
    """The nonzero sigmas of the EDM grid (high to low)."""
    return schedules.edm_sigmas(num_steps)[:-1]


CIFAR10_EDM_SCHEDULE = SizeSchedule(
    _cifar10_edm_sizes(edm_grid_sigmas()), tuple(edm_grid_sigmas()), "sigma", "cifar10_edm"
)
"""Sizes 32 x 7 (sigma >= 8.40), 23, 15, 11, 7, 5, then 3 (sigma <= 0.296) on the 18-step grid."""

NAMED_SCHEDULES = {"cifar10_edm": CIFAR10_EDM_SCHEDULE}


@dataclasses.dataclass(frozen=True)
class SigmaCallable:
    """Adapts a user ``sigma -> size`` callable to the ``ab -> size`` convention (hashable)."""

    fn: Callable[[float], int]

    def __call__(self, ab: float):
        return self.fn(float(np.sqrt((1.0 - ab) / ab)))


def _flip_augment(arr: np.ndarray, flip: bool) -> np.ndarray:
    return np.concatenate([arr, arr[:, :, ::-1, :]], axis=0) if flip else arr


def _chunk(arr: np.ndarray, chunk_size: int, mesh) -> streaming.Chunked:
    n_shards = 1 if mesh is None else mesh.shape[streaming.DATA_AXIS]
    chunked = streaming.chunk((jnp.asarray(arr),), chunk_size, num_shards=n_shards)
    if mesh is not None:
        chunked = streaming.shard_chunked(chunked, mesh)
    return chunked


def square_index(h: int, w: int, s: int) -> np.ndarray:
    """Flat pixel indices [M, s*s] of every s x s square fully inside an H x W image
    (row-major over upper-left corners)."""
    u, v = np.meshgrid(np.arange(h - s + 1), np.arange(w - s + 1), indexing="ij")
    di, dj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    top = (u.ravel() * w + v.ravel())[:, None]
    return (top + (di * w + dj).ravel()[None, :]).astype(np.int32)


@flax.struct.dataclass
class PSPCSquare(SizedDenoiser):
    """PSPC-Square (module docs). ``chunked``: ``(images [C, cs, H, W, Ch],)``, flips included."""

    chunked: streaming.Chunked
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    patch_size: object = flax.struct.field(pytree_node=False, default=3)
    softmax: str = flax.struct.field(pytree_node=False, default="exact")
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    name = "pspc_square"

    def _check_size(self, s: int) -> None:
        h, w, _ = self.shape
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"pspc_square: square size must be an int, got {s!r}")
        if not 1 <= s <= min(h, w):
            raise ValueError(
                f"pspc_square: square size s = {s} must lie in [1, {min(h, w)}] for "
                f"{h}x{w} images (squares lie fully inside the image)"
            )

    def _resolve(self, spec):
        return _resolve_pspc_spec(spec, self.shape)

    def _impl(self, x_t, ab, s: int):
        b, h, w, c = x_t.shape
        idx = square_index(h, w, s)
        m = idx.shape[0]

        def chunk_fn(ctx, data):
            q, ab_, scale = ctx
            (x,) = data
            kk = x.shape[0]
            cross = box_valid(jnp.sum(q[:, None] * x[None], axis=-1), s)  # [B, K, H-s+1, W-s+1]
            sq = box_valid(jnp.sum(x * x, axis=-1), s)
            logits = (2.0 * jnp.sqrt(ab_) * cross - ab_ * sq[None]) * scale
            vals = x.reshape(kk, h * w, c)[:, idx].reshape(kk, m, s * s * c)
            return logits.reshape(b, kk, m), vals

        means = streaming.stream(
            chunk_fn,
            self.chunked,
            (x_t, ab, logit_scale(ab)),
            batch=b,
            m=m,
            d=s * s * c,
            mode=self.softmax,
            mesh=self.mesh,
        )
        counts = np.bincount(idx.ravel(), minlength=h * w).astype(np.float32)
        out = (
            jnp.zeros((b, h * w, c), jnp.float32)
            .at[:, idx.ravel()]
            .add(means.reshape(b, m * s * s, c))
        )
        return (out / counts[None, :, None]).reshape(x_t.shape)


def _resolve_pspc_spec(spec, shape):
    h, w, _ = shape
    if isinstance(spec, str) and spec in NAMED_SCHEDULES:
        base = NAMED_SCHEDULES[spec]
        return dataclasses.replace(base, sizes=tuple(min(s, h, w) for s in base.sizes))
    if callable(spec) and not isinstance(spec, (SizeSchedule, SigmaCallable)):
        return SigmaCallable(spec)
    return resolve_size_spec(
        spec,
        what="square size",
        named={},
        grid_len=EDM_STEPS,
        default_grid=lambda: CIFAR10_EDM_SCHEDULE,
    )


@register("pspc_square")
def make_pspc_square(
    *,
    train,
    patch_size: SizeSpec = "cifar10_edm",
    flip: bool = True,
    softmax: str = "exact",
    chunk_size: int = 64,
    mesh=None,
    shard: bool = False,
) -> PSPCSquare:
    """PSPC-Square over ``train`` [N, H, W, C] (module docs; docs/algorithms.md §7).

    Args:
      patch_size: square size s: int, callable ``sigma -> int``, SizeSchedule, list of 18 sizes
        on the EDM grid, ``"file:PATH"``, or ``"cifar10_edm"`` (default; sizes clipped to the
        image).
      flip: append horizontally flipped training images (default True, as published).
      chunk_size: training images per streamed chunk.
    """
    arr = as_train_array(train)
    if softmax not in ("exact", "chunk_mean"):
        raise ValueError(f"softmax must be 'exact' or 'chunk_mean', got {softmax!r}")
    shape = tuple(int(s) for s in arr.shape[1:])
    spec = _resolve_pspc_spec(patch_size, shape)
    mesh = resolve_mesh(mesh, shard)
    den = PSPCSquare(
        chunked=_chunk(_flip_augment(arr, flip), chunk_size, mesh),
        shape=shape,
        patch_size=spec,
        softmax=softmax,
        mesh=mesh,
    )
    return PSPCSquare._validated(den)


# ----------------------------------------------------------------------------------------------
# PSPC-Flex.


def gradient_heatmaps(denoise, x_t, ab: float, *, pixel_batch: Optional[int] = 64) -> np.ndarray:
    """Gradient heat maps of a denoiser: float32 [H*W, H*W], row p = heat map of output pixel p.

    ``h[p, q] = mean_b sum_{c_out, c_in} |d D(x_t)[b, p, c_out] / d x_t[b, q, c_in]|`` -- the
    sensitivity field of docs/algorithms.md §9 for every output pixel (the batch elements of ``x_t``
    [B, H, W, C] are the probes). Computed with :func:`locality.sensitivity.fields` (one VJP per
    output pixel and channel, ``pixel_batch`` cotangents at a time); :func:`_own_heatmaps` is
    an independent plain-``jax.vjp`` version the tests check it against.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    _, h, w, _ = x_t.shape
    pix = [(i, j) for i in range(h) for j in range(w)]
    return np.asarray(
        fields(denoise, x_t, float(ab), pix, pixel_batch=pixel_batch), np.float32
    ).reshape(h * w, h * w)


def _own_heatmaps(denoise, x_t, ab: float, *, pixel_batch: int = 64) -> np.ndarray:
    """Same as :func:`gradient_heatmaps` with plain ``jax.vjp`` (per probe, vmapped cotangents)."""
    x_t = jnp.asarray(x_t, jnp.float32)
    b, h, w, c = x_t.shape
    n = h * w
    onehots = jnp.eye(n * c, dtype=jnp.float32).reshape(n * c, h, w, c)  # (pixel, c_out) rows

    def per_probe(x):
        _, vjp_fn = jax.vjp(lambda y: denoise(y[None], float(ab))[0], x)
        rows = [
            jax.vmap(lambda e: vjp_fn(e)[0])(onehots[i : i + pixel_batch * c])
            for i in range(0, n * c, pixel_batch * c)
        ]
        g = jnp.concatenate(rows, axis=0).reshape(n, c, n, c)
        return jnp.sum(jnp.abs(g), axis=(1, 3))  # [p, q]

    return np.mean(np.stack([np.asarray(per_probe(x)) for x in x_t]), axis=0).astype(np.float32)


def grow_masks(heat, lam: float) -> np.ndarray:
    """Crop masks from heat maps [P, Q] (row p = output pixel p; P = Q = H*W).

    Returns float32 [Q, P] in the column convention of docs/algorithms.md §5 (column p = the inputs
    output p looks at): the pixels of largest heat in decreasing order (ties by index) until
    their mass reaches ``lam`` times the row's total (the crossing pixel included), plus p.
    """
    heat = np.asarray(heat, np.float64)
    if heat.ndim != 2 or heat.shape[0] != heat.shape[1]:
        raise ValueError(f"heat maps must be square [H*W, H*W]; got shape {heat.shape}")
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lambda (mass fraction) must lie in (0, 1], got {lam}")
    if np.any(heat < 0) or not np.all(np.isfinite(heat)):
        raise ValueError("heat maps must be finite and non-negative")
    n = heat.shape[0]
    order = np.argsort(-heat, axis=1, kind="stable")
    srt = np.take_along_axis(heat, order, axis=1)
    before = np.cumsum(srt, axis=1) - srt  # mass of the pixels ranked above
    keep = before < lam * srt.sum(axis=1, keepdims=True)
    mask = np.zeros((n, n), bool)
    np.put_along_axis(mask, order, keep, axis=1)
    mask[np.arange(n), np.arange(n)] = True
    return mask.T.astype(np.float32)


@flax.struct.dataclass
class PSPCFlex(DenoiserBase):
    """PSPC-Flex (module docs).

    Attributes:
      chunked: ``(images [C, cs, H, W, Ch],)`` (flips included).
      masks: float32 [G, H*W, H*W], column p = the crop of output pixel p at grid point g.
      log_sigmas: float32 [G], the grid (masks of the nearest grid point in log sigma are used).
    """

    chunked: streaming.Chunked
    masks: jax.Array
    log_sigmas: jax.Array
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    softmax: str = flax.struct.field(pytree_node=False, default="exact")
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    name = "pspc_flex"

    def mask_index(self, ab) -> jax.Array:
        ab = jnp.asarray(ab, jnp.float32)
        ls = 0.5 * (jnp.log1p(-ab) - jnp.log(ab))
        return jnp.argmin(jnp.abs(self.log_sigmas - ls))

    def apply(self, x_t, ab):
        b, h, w, c = x_t.shape
        n = h * w
        mask = self.masks[self.mask_index(ab)]  # [HW(j), HW(p)]

        def chunk_fn(ctx, data):
            q, ab_, scale, mk = ctx
            (x,) = data
            kk = x.shape[0]
            xf = x.reshape(kk, n, c)
            cross = jnp.sum(q[:, None] * xf[None], axis=-1)  # [B, K, HW]
            sq = jnp.sum(xf * xf, axis=-1)  # [K, HW]
            d = (
                2.0 * jnp.sqrt(ab_) * jnp.matmul(cross, mk, precision=HIGHEST)
                - ab_ * jnp.matmul(sq, mk, precision=HIGHEST)[None]
            )
            return d * scale, xf

        out = streaming.stream(
            chunk_fn,
            self.chunked,
            (x_t.reshape(b, n, c), ab, logit_scale(ab), mask),
            batch=b,
            m=n,
            d=c,
            mode=self.softmax,
            mesh=self.mesh,
        )
        return out.reshape(x_t.shape)


def _grid_sigmas(abs_, sigmas) -> np.ndarray:
    if abs_ is not None and sigmas is not None:
        raise ValueError("give the noise grid as abs= or sigmas=, not both")
    if sigmas is not None:
        s = np.asarray(sigmas, np.float64).ravel()
        s = s[s > 0]
    else:
        if abs_ is None:
            sched = schedules.ddpm_linear()
            abs_ = sched.ab(schedules.ddim_timesteps(10))
        a = np.asarray(abs_, np.float64).ravel()
        if np.any(a <= 0) or np.any(a >= 1):
            raise ValueError(f"grid ab values must lie in (0, 1); got {a}")
        s = np.sqrt((1.0 - a) / a)
    if s.size == 0:
        raise ValueError("the noise grid is empty")
    return s


@register("pspc_flex")
def make_pspc_flex(
    *,
    train,
    network=None,
    masks=None,
    abs=None,
    sigmas=None,
    lam: Union[float, Callable[[float], float]] = 0.9,
    num_probes: int = 8,
    seed: int = 0,
    flip: bool = True,
    softmax: str = "exact",
    chunk_size: int = 256,
    pixel_batch: Optional[int] = 64,
    mesh=None,
    shard: bool = False,
) -> PSPCFlex:
    """PSPC-Flex over ``train`` [N, H, W, C] (module docs; docs/algorithms.md §7).

    Args:
      network: the denoiser whose heat maps define the crops (any ``D(x_t, ab)``, e.g.
        ``denoisers.make("network", checkpoint=PATH)``), or a checkpoint path (built with
        ``denoisers.make("network", checkpoint=network)``).
      masks: instead of ``network``: float/bool [H*W, H*W] (one mask set for every level) or
        [G, H*W, H*W] (one per grid point), column p = the inputs output p looks at.
      abs, sigmas: the noise grid at which heat maps are computed (default: the ab values of the
        10-step DDIM grid of the DDPM linear schedule; pass the sampler's grid).
      lam: mass fraction lambda, a float or callable ``sigma -> fraction`` in (0, 1].
      num_probes: noisy training images (first ``num_probes`` after a seeded shuffle) averaged
        per heat map; ``seed``: seed of the probe choice and their noise.
    """
    arr = as_train_array(train)
    h, w, c = (int(s) for s in arr.shape[1:])
    n = h * w
    sig = _grid_sigmas(abs, sigmas)
    if masks is not None:
        mk = np.asarray(masks, np.float32)
        if mk.shape == (n, n):
            mk = np.broadcast_to(mk, (len(sig), n, n))
        if mk.shape != (len(sig), n, n):
            raise ValueError(
                f"masks must be [H*W, H*W] = [{n}, {n}] or [G, {n}, {n}] with G = "
                f"{len(sig)} grid points; got {np.shape(masks)}"
            )
        if not np.all((mk == 0) | (mk == 1)):
            raise ValueError("masks must be 0/1")
    else:
        if network is None:
            raise ValueError("pspc_flex needs network= (a denoiser or a checkpoint path) or masks=")
        if isinstance(network, str):
            network = make("network", checkpoint=network)
        rng = np.random.default_rng(seed)
        probes = arr[rng.permutation(len(arr))[:num_probes]]
        key = jax.random.key(seed)
        mk = []
        for g, s in enumerate(sig):
            ab = float(1.0 / (1.0 + s * s))
            frac = float(lam(float(s))) if callable(lam) else float(lam)
            eps = jax.random.normal(jax.random.fold_in(key, g), probes.shape)
            x_t = np.sqrt(ab) * probes + np.sqrt(1.0 - ab) * np.asarray(eps)
            heat = gradient_heatmaps(network, x_t.astype(np.float32), ab, pixel_batch=pixel_batch)
            mk.append(grow_masks(heat, frac))
        mk = np.stack(mk)
    if softmax not in ("exact", "chunk_mean"):
        raise ValueError(f"softmax must be 'exact' or 'chunk_mean', got {softmax!r}")
    mesh = resolve_mesh(mesh, shard)
    return PSPCFlex(
        chunked=_chunk(_flip_augment(arr, flip), chunk_size, mesh),
        masks=jnp.asarray(mk, jnp.float32),
        log_sigmas=jnp.asarray(np.log(sig), jnp.float32),
        shape=(h, w, c),
        softmax=softmax,
        mesh=mesh,
    )


__all__ = [
    "PSPCSquare",
    "PSPCFlex",
    "make_pspc_square",
    "make_pspc_flex",
    "gradient_heatmaps",
    "grow_masks",
    "square_index",
    "CIFAR10_EDM_SCHEDULE",
    "CIFAR10_EDM_BANDS",
    "SigmaCallable",
]
