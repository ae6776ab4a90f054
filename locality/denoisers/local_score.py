"""Local score machines of Kamb & Ganguli: LS, ELS and bbELS (docs/algorithms.md §6).

Source: M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
models" (2024/2025), the LS / ELS machines and their boundary-broken variant. All three are a
softmax over a dictionary of k x k patches with the centre read out. For output pixel ``p`` with
window ``O_p`` (k odd, ``r = k // 2``; all channels):

    x0_hat[p] = sum_P softmax_P(-||x_{O_p} - sqrt(ab) P||^2 / (2 (1 - ab))) P(0).

``||x_{O_p}||^2`` is the same for every patch of the dictionary of ``p`` and cancels, so the logit
is ``(2 sqrt(ab) <x_{O_p}, P> - ab ||P||^2) / (2 (1 - ab))``; every sum is exact over the whole
training set through :func:`locality.streaming.stream` (running log-sum-exp; never a mean of
per-batch softmaxes).

* ``ls``   -- dictionary of ``p``: the co-located window of every training image; query and
  training images zero padded. The cross term ``<x_{O_p}, X_{O_p}>`` is a box filter (a depthwise
  convolution with a k x k window of ones) of the pixelwise product ``sum_c x X``; it is
  computed with separable ``lax.reduce_window`` sums. Cost O(N H W C) per call plus the box sums.
  Limit: k >= 2 max(H, W) - 1 covers the whole image from every pixel, i.e. the optimal denoiser.
* ``els``  -- dictionary: every k x k patch of every training image; the query is padded
  circularly. ``dictionary="wrapped"`` (default) takes the patches of the circularly padded
  training images centred at all H W pixels (the patch distribution of the training set on the
  torus, which is what a circular-padding equivariant network sees); ``dictionary="valid"``
  takes only the (H - k + 1)(W - k + 1) patches fully inside each image (Kamb & Ganguli's
  released ELS module). Either way the machine commutes with circular shifts of the query.
  Cross terms ``<x_{O_p}, P>`` for all output pixels and all patches are one HIGHEST-precision
  GEMM per chunk between the training patches and the im2col'ed query windows -- the same
  arithmetic as ``lax.conv_general_dilated`` with the patches as filters, but with the B*H*W query
  windows as one softmax axis, so the GEMM output is already the stream's logits layout.
* ``bbels`` -- query zero padded. A pixel's window crosses the top/bottom boundary when its row is
  ``< r`` or ``> H - 1 - r`` (likewise columns). Interior pixels (no crossing) use every interior
  ("valid") patch; edge pixels (one direction crosses) use the patches of the zero-padded training
  images at the *same* row (top/bottom edge) or column (left/right edge) and any interior position
  along the edge; corner pixels (both cross) use the exact same location, i.e. LS. Computed as
  exact streams: interior pixels against all interior patches; edge pixels line by line (each
  line parallel to an edge is one small block of cross terms, batched over lines, so only the
  allowed pairs are formed); LS for the corners. For ``k == H`` (square images) every dictionary
  is a single co-located patch, so the rule itself gives LS; ``k > min(H, W)`` falls back to LS
  explicitly.

Patch size per timestep
-----------------------
``patch_size`` is static (it changes array shapes): an odd int, a callable ``ab -> odd int``, a
:class:`~locality.denoisers.patch_schedules.SizeSchedule`, a list of 20 ints on Kamb & Ganguli's
cosine-legacy grid, the name of a published schedule
(:data:`~locality.denoisers.patch_schedules.PUBLISHED_SCHEDULES`), or ``"file:PATH"``. The
schedules, the published tables with their index -> t off-by-one (``convention=``) and the
static-size dispatch under ``jit`` / ``lax.scan`` are documented in
:mod:`locality.denoisers.patch_schedules`; fitting a schedule against a network is
:mod:`locality.denoisers.calibration`.

The window sums, window indices and the patch / line softmax kernels the machines share with
PSPC-Square are in :mod:`locality.denoisers.patch_kernels`.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality import streaming
from locality.denoisers.base import as_train_array, resolve_mesh
from locality.denoisers.patch_kernels import (
    box_same,
    line_softmax,
    logit_scale,
    patch_softmax,
    pixel_grid,
    query_cols,
    window_index,
)
from locality.denoisers.patch_schedules import (
    PUBLISHED_SCHEDULES,
    SizedDenoiser,
    SizeSchedule,
    SizeSpec,
    resolve_size_spec,
)
from locality.denoisers.registry import register

# ----------------------------------------------------------------------------------------------
# The machines (window kernels: locality.denoisers.patch_kernels).


def _ls_flat(x_t, ab, chunked, k: int, softmax: str, mesh) -> jax.Array:
    """LS machine -> [B, H*W, C] (docs/algorithms.md §6, LS)."""
    b, h, w, c = x_t.shape

    def chunk_fn(ctx, data):
        q, ab_, scale = ctx
        (x,) = data
        kk = x.shape[0]
        cross = box_same(jnp.sum(q[:, None] * x[None], axis=-1), k)  # [B, K, H, W]
        sq = box_same(jnp.sum(x * x, axis=-1), k)  # [K, H, W]
        logits = (2.0 * jnp.sqrt(ab_) * cross - ab_ * sq[None]) * scale
        return logits.reshape(b, kk, h * w), x.reshape(kk, h * w, c)

    return streaming.stream(
        chunk_fn,
        chunked,
        (x_t, ab, logit_scale(ab)),
        batch=b,
        m=h * w,
        d=c,
        mode=softmax,
        mesh=mesh,
    )


def _els_flat(x_t, ab, chunked, k, dictionary, softmax, mesh):
    """ELS machine -> [B, H*W, C] (docs/algorithms.md §6, ELS)."""
    _, h, w, c = x_t.shape
    r = k // 2
    allpix = pixel_grid(h, w)
    q_cols = query_cols(x_t, k, allpix, "wrap")
    if dictionary == "wrapped":
        item_idx = window_index(allpix, k, w + 2 * r, r)
        centre_idx = ((allpix[:, 0] + r) * (w + 2 * r) + allpix[:, 1] + r).astype(np.int32)
        pad = r
    else:
        inner = allpix[
            (allpix[:, 0] >= r)
            & (allpix[:, 0] <= h - 1 - r)
            & (allpix[:, 1] >= r)
            & (allpix[:, 1] <= w - 1 - r)
        ]
        item_idx = window_index(inner, k, w, 0)
        centre_idx = (inner[:, 0] * w + inner[:, 1]).astype(np.int32)
        pad = 0
    return patch_softmax(
        q_cols,
        ab,
        chunked,
        (h, w, c),
        k=k,
        item_idx=item_idx,
        centre_idx=centre_idx,
        train_pad=pad,
        train_pad_mode="wrap",
        softmax=softmax,
        mesh=mesh,
    )


def bbels_classes(h: int, w: int, k: int) -> np.ndarray:
    """Pixel class for bbELS: 0 interior, 1 edge, 2 corner; int [H, W] (docs/algorithms.md §6)."""
    r = k // 2
    rb = (np.arange(h) < r) | (np.arange(h) > h - 1 - r)
    cb = (np.arange(w) < r) | (np.arange(w) > w - 1 - r)
    return rb[:, None].astype(int) + cb[None, :].astype(int)


def _bbels_flat(x_t, ab, chunked, k, softmax, mesh):
    """bbELS machine -> [B, H*W, C] for k <= min(H, W) (docs/algorithms.md §6, bbELS).

    Interior pixels: one stream over all interior (valid) patches. Edge pixels: one stream per
    orientation over lines parallel to the edge (:func:`line_softmax`). Corner pixels: LS.
    """
    b, h, w, c = x_t.shape
    r = k // 2
    cls = bbels_classes(h, w, k).ravel()
    allpix = pixel_grid(h, w)
    out = jnp.zeros((b, h * w, c), jnp.float32)
    inner = allpix[cls == 0]
    if len(inner):
        q_cols = query_cols(x_t, k, inner, "zeros")
        vals = patch_softmax(
            q_cols,
            ab,
            chunked,
            (h, w, c),
            k=k,
            item_idx=window_index(inner, k, w, 0),
            centre_idx=(inner[:, 0] * w + inner[:, 1]).astype(np.int32),
            train_pad=0,
            train_pad_mode="zeros",
            softmax=softmax,
            mesh=mesh,
        )
        out = out.at[:, np.flatnonzero(cls == 0)].set(vals)
    if r > 0:
        edge_rows = np.concatenate([np.arange(r), np.arange(h - r, h)])
        edge_cols = np.concatenate([np.arange(r), np.arange(w - r, w)])
        for axis, lines, positions, _width in (
            (0, edge_rows, np.arange(r, w - r), w),
            (1, edge_cols, np.arange(r, h - r), h),
        ):
            vals = line_softmax(
                x_t,
                ab,
                chunked,
                k=k,
                lines=lines,
                positions=positions,
                axis=axis,
                softmax=softmax,
                mesh=mesh,
            )
            ii, jj = np.meshgrid(lines, positions, indexing="ij")
            flat = (ii * w + jj) if axis == 0 else (jj * w + ii)
            out = out.at[:, flat.ravel()].set(vals)
        corner = np.flatnonzero(cls == 2)
        out = out.at[:, corner].set(_ls_flat(x_t, ab, chunked, k, softmax, mesh)[:, corner])
    return out


# ----------------------------------------------------------------------------------------------
# The denoiser.

METHODS = ("ls", "els", "bbels")
DICTIONARIES = ("wrapped", "valid")


@flax.struct.dataclass
class LocalScoreMachine(SizedDenoiser):
    """LS / ELS / bbELS over a chunked training set (module docs; docs/algorithms.md §6).

    Attributes:
      chunked: ``(images [C, cs, H, W, Ch],)`` and ``valid [C, cs]``.
      shape: image shape (H, W, Ch).
      patch_size: int, :class:`SizeSchedule` or callable ``ab -> int`` (static).
      method: ``"ls"``, ``"els"`` or ``"bbels"``.
      dictionary: ELS training patches, ``"wrapped"`` (default) or ``"valid"``.
      softmax: ``"exact"`` or ``"chunk_mean"`` (released per-batch quirk, chunk = ``chunk_size``
        training images).
      convention: index -> t mapping of published schedules (``"use"`` or ``"calibration"``).
    """

    chunked: streaming.Chunked
    shape: Tuple[int, int, int] = flax.struct.field(pytree_node=False)
    patch_size: object = flax.struct.field(pytree_node=False, default=3)
    method: str = flax.struct.field(pytree_node=False, default="ls")
    dictionary: str = flax.struct.field(pytree_node=False, default="wrapped")
    softmax: str = flax.struct.field(pytree_node=False, default="exact")
    mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False, default=None)
    convention: str = flax.struct.field(pytree_node=False, default="use")

    @property
    def name(self) -> str:
        return self.method

    def _resolve(self, spec):
        return _resolve_ls_spec(spec, self.convention)

    def max_size(self) -> int:
        h, w, _ = self.shape
        if self.method == "els" and self.dictionary == "valid":
            return min(h, w)
        return 2 * max(h, w) - 1

    def _check_size(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"{self.name}: patch size must be an int, got {k!r}")
        if k < 1 or k % 2 == 0:
            raise ValueError(
                f"{self.name}: patch size k = {k} must be a positive odd integer "
                "(the window is centred on the output pixel); use k - 1 or k + 1"
            )
        if k > self.max_size():
            h, w, _ = self.shape
            why = (
                "valid ELS patches must fit inside the image"
                if self.method == "els" and self.dictionary == "valid"
                else "k = 2 max(H, W) - 1 already covers the whole image from every pixel (the "
                "optimal denoiser)"
            )
            raise ValueError(
                f"{self.name}: patch size k = {k} is too large for {h}x{w} images: "
                f"the maximum is {self.max_size()} ({why})"
            )

    def _impl(self, x_t, ab, k: int):
        b, h, w, c = x_t.shape
        if self.method == "ls" or (self.method == "bbels" and k > min(h, w)):
            out = _ls_flat(x_t, ab, self.chunked, k, self.softmax, self.mesh)
        elif self.method == "els":
            out = _els_flat(x_t, ab, self.chunked, k, self.dictionary, self.softmax, self.mesh)
        else:
            out = _bbels_flat(x_t, ab, self.chunked, k, self.softmax, self.mesh)
        return out.reshape(x_t.shape)


def _default_chunk(method: str, shape) -> int:
    h, w, _ = shape
    if method == "ls":
        return 256
    return max(1, 1024 // (h * w))  # patch machines: ~1k dictionary patches per chunk


def _resolve_ls_spec(spec, convention: str):
    named = {
        n: functools.partial(SizeSchedule.published, n, convention) for n in PUBLISHED_SCHEDULES
    }
    return resolve_size_spec(
        spec,
        named=named,
        default_grid=lambda: SizeSchedule.published("cifar10_unet_zeros_cond", convention),
    )


def _make(
    method: str,
    *,
    train,
    patch_size: SizeSpec = 3,
    dictionary: str = "wrapped",
    softmax: str = "exact",
    chunk_size: Optional[int] = None,
    mesh=None,
    shard: bool = False,
    convention: str = "use",
) -> LocalScoreMachine:
    arr = as_train_array(train)
    if dictionary not in DICTIONARIES:
        raise ValueError(f"dictionary must be one of {DICTIONARIES}, got {dictionary!r}")
    if softmax not in ("exact", "chunk_mean"):
        raise ValueError(f"softmax must be 'exact' or 'chunk_mean', got {softmax!r}")
    if convention not in ("use", "calibration"):
        raise ValueError(f"convention must be 'use' or 'calibration', got {convention!r}")
    spec = _resolve_ls_spec(patch_size, convention)
    shape = tuple(int(s) for s in arr.shape[1:])
    mesh = resolve_mesh(mesh, shard)
    cs = _default_chunk(method, shape) if chunk_size is None else int(chunk_size)
    n_shards = 1 if mesh is None else mesh.shape[streaming.DATA_AXIS]
    chunked = streaming.chunk((jnp.asarray(arr),), cs, num_shards=n_shards)
    if mesh is not None:
        chunked = streaming.shard_chunked(chunked, mesh)
    den = LocalScoreMachine(
        chunked=chunked,
        shape=shape,
        patch_size=spec,
        method=method,
        dictionary=dictionary,
        softmax=softmax,
        mesh=mesh,
        convention=convention,
    )
    return LocalScoreMachine._validated(den)


@register("ls")
def make_ls(
    *,
    train,
    patch_size: SizeSpec = 3,
    softmax: str = "exact",
    chunk_size: Optional[int] = None,
    mesh=None,
    shard: bool = False,
    convention: str = "use",
) -> LocalScoreMachine:
    """Kamb & Ganguli's local score (LS) machine over ``train`` [N, H, W, C].

    Args:
      patch_size: odd int, callable ``ab -> int``, :class:`SizeSchedule`, list of 20 sizes on the
        cosine-legacy grid, a name in :data:`PUBLISHED_SCHEDULES`, or ``"file:PATH"``.
      softmax: ``"exact"`` (default) or ``"chunk_mean"`` (per-chunk softmax, averaged).
      chunk_size: training images per streamed chunk (default 256).
      convention: how published schedules map index -> t (module docs): ``"use"``/``"calibration"``.
    """
    return _make(
        "ls",
        train=train,
        patch_size=patch_size,
        softmax=softmax,
        chunk_size=chunk_size,
        mesh=mesh,
        shard=shard,
        convention=convention,
    )


@register("els")
def make_els(
    *,
    train,
    patch_size: SizeSpec = 3,
    dictionary: str = "wrapped",
    softmax: str = "exact",
    chunk_size: Optional[int] = None,
    mesh=None,
    shard: bool = False,
    convention: str = "use",
) -> LocalScoreMachine:
    """Kamb & Ganguli's equivariant local score (ELS) machine (circular query padding).

    ``dictionary="wrapped"`` (default): patches of the circularly padded training images at all
    H W centres; ``"valid"``: only patches fully inside (the released module). ``chunk_size``:
    training images per chunk (default: about 1024 patches per chunk, at least one image). Other
    arguments as :func:`make_ls`.
    """
    return _make(
        "els",
        train=train,
        patch_size=patch_size,
        dictionary=dictionary,
        softmax=softmax,
        chunk_size=chunk_size,
        mesh=mesh,
        shard=shard,
        convention=convention,
    )


@register("bbels")
def make_bbels(
    *,
    train,
    patch_size: SizeSpec = 3,
    softmax: str = "exact",
    chunk_size: Optional[int] = None,
    mesh=None,
    shard: bool = False,
    convention: str = "use",
) -> LocalScoreMachine:
    """Boundary-broken ELS (zero padding; interior / edge / corner rules; k > min(H, W) -> LS)."""
    return _make(
        "bbels",
        train=train,
        patch_size=patch_size,
        softmax=softmax,
        chunk_size=chunk_size,
        mesh=mesh,
        shard=shard,
        convention=convention,
    )


__all__ = [
    "METHODS",
    "DICTIONARIES",
    "LocalScoreMachine",
    "make_ls",
    "make_els",
    "make_bbels",
    "bbels_classes",
]
