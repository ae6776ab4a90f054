"""Local score machines of Kamb & Ganguli: LS, ELS and bbELS (ALGORITHMS.md §6).

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

Patch size per timestep (static)
--------------------------------
``patch_size`` is an odd int, a callable ``ab -> odd int``, a :class:`SizeSchedule` (a table of
sizes on a grid of noise levels; the size at ``ab`` is the entry of the nearest grid point), a
list of 20 ints on Kamb & Ganguli's cosine-legacy grid, the name of a published schedule
(:data:`PUBLISHED_SCHEDULES`), or ``"file:PATH"`` (a JSON schedule written by
:func:`Calibration.to_json` / ``experiments/calibrate.py``).

k changes array shapes, so it must be static. ``den(x_t, ab)`` with a concrete ``ab`` picks k
in Python and runs a jitted program compiled once per distinct k (the compiled program does not
depend on the schedule, so ``den.with_patch_size(k)`` reuses it too). Under tracing (``ab`` is a
tracer, e.g. inside :func:`locality.sampling.ddim`'s ``lax.scan``) a fixed int k is used as is
and a tabulated schedule becomes a ``lax.switch`` over its distinct sizes, the branch picked from
``ab`` with the same nearest-grid-point rule (every branch is compiled once, only the selected
one runs). A callable schedule cannot be evaluated on a tracer: tabulate it first with
:meth:`SizeSchedule.from_callable`.

Published schedules and the off-by-one
--------------------------------------
:data:`PUBLISHED_SCHEDULES` are the ten schedules released by Kamb & Ganguli (their nets were
trained at 32 px). Entry ``i`` is used at ``t = i / 20`` of the cosine-legacy process
``ab(t) = cos^2(t / 1.008 * pi / 2)`` (index 0 = t 0, index 19 = t 0.95), which is how their
sampler reads them (``k = scales[i]`` at ``t = i / nsteps``). Their calibration script, however,
stores the size found at ``t = i / 20`` in entry ``i - 1``, so as *calibrated* entry ``i``
belongs to ``t = (i + 1) / 20``: the sampler uses every size at a t 0.05 lower (one step later
in sampling) than the t it was calibrated at. ``SizeSchedule.published(name, convention="use")`` (default; also the
``convention=`` argument of the factories) reproduces their sampling; ``convention="calibration"``
puts every size at the time it was measured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections import Counter
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from locality._io import atomic_path

from locality import schedules, streaming
from locality.denoisers.base import (HIGHEST, DenoiserBase, _is_tracer, as_train_array,
                                     check_query, resolve_mesh)
from locality.denoisers.registry import register

# ----------------------------------------------------------------------------------------------
# Published calibrated schedules (Kamb & Ganguli's released files; ALGORITHMS.md §6).
# Index 0 = t 0 ... index 19 = t 0.95 on the cosine-legacy 20-step grid.

KS_CIFAR10_RESNET_ZEROS_COND = (3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17)
KS_CIFAR10_RESNET_CIRCULAR_COND = (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15)
KS_CIFAR10_UNET_ZEROS_COND = (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25)
KS_CELEBA_RESNET_ZEROS = (3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19)
KS_CELEBA_UNET_ZEROS = (3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27)
KS_FASHIONMNIST_RESNET_ZEROS_COND = (3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15,
                                     17, 17)
KS_FASHIONMNIST_UNET_ZEROS_COND = (3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25,
                                   25, 25)
KS_MNIST_RESNET_ZEROS = (3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15)
KS_MNIST_RESNET_CIRCULAR = (3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3)
KS_MNIST_UNET_ZEROS = (3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27)

PUBLISHED_SCHEDULES: Dict[str, Tuple[int, ...]] = {
    "cifar10_resnet_zeros_cond": KS_CIFAR10_RESNET_ZEROS_COND,
    "cifar10_resnet_circular_cond": KS_CIFAR10_RESNET_CIRCULAR_COND,
    "cifar10_unet_zeros_cond": KS_CIFAR10_UNET_ZEROS_COND,
    "celeba_resnet_zeros": KS_CELEBA_RESNET_ZEROS,
    "celeba_unet_zeros": KS_CELEBA_UNET_ZEROS,
    "fashionmnist_resnet_zeros_cond": KS_FASHIONMNIST_RESNET_ZEROS_COND,
    "fashionmnist_unet_zeros_cond": KS_FASHIONMNIST_UNET_ZEROS_COND,
    "mnist_resnet_zeros": KS_MNIST_RESNET_ZEROS,
    "mnist_resnet_circular": KS_MNIST_RESNET_CIRCULAR,
    "mnist_unet_zeros": KS_MNIST_UNET_ZEROS,
}

COSINE_LEGACY_STEPS = 20
SCHEDULE_FORMAT = "locality.size_schedule/1"


def cosine_legacy_index_abs(num_steps: int = COSINE_LEGACY_STEPS,
                            convention: str = "use") -> np.ndarray:
    """ab of every index of a published schedule: ``ab(t_i)``, ``t_i = i / S`` ("use") or
    ``(i + 1) / S`` ("calibration"), on the cosine-legacy process. float64 [S], index 0 first."""
    t = np.asarray(schedules.cosine_legacy_grid(num_steps)[::-1], np.float64)  # 0, 1/S, ...
    if convention == "calibration":
        t = t + 1.0 / num_steps
    elif convention != "use":
        raise ValueError(f"convention must be 'use' or 'calibration', got {convention!r}")
    return schedules.cosine_legacy_ab(t)


@dataclasses.dataclass(frozen=True)
class SizeSchedule:
    """A piecewise-constant size (patch size k or square size s) per noise level.

    The size at a noise level is the entry of the nearest grid point: nearest in ``ab`` when
    ``key == "ab"``, nearest in ``log(sigma)`` (``sigma = sqrt((1 - ab) / ab)``) when
    ``key == "sigma"``. Distances are computed in float32 both eagerly and under tracing, so the
    eager choice and the ``lax.switch`` branch agree. Hashable (usable as a static field).

    Attributes:
      sizes: the size of every grid point.
      grid: the grid, as ``ab`` values (``key="ab"``) or sigmas (``key="sigma"``, all > 0).
      key: ``"ab"`` or ``"sigma"``.
      name: a label for logs.
    """

    sizes: Tuple[int, ...]
    grid: Tuple[float, ...]
    key: str = "ab"
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        object.__setattr__(self, "grid", tuple(float(g) for g in self.grid))
        if not self.sizes:
            raise ValueError("a size schedule needs at least one entry")
        if len(self.sizes) != len(self.grid):
            raise ValueError(f"size schedule {self.name!r} has {len(self.sizes)} sizes but a grid of "
                             f"{len(self.grid)} noise levels; give one size per grid point")
        if self.key not in ("ab", "sigma"):
            raise ValueError(f"key must be 'ab' or 'sigma', got {self.key!r}")
        g = np.asarray(self.grid)
        if self.key == "ab" and (np.any(g < 0) or np.any(g > 1)):
            raise ValueError(f"ab grid values must lie in [0, 1]; got {self.grid}")
        if self.key == "sigma" and np.any(g <= 0):
            raise ValueError(f"sigma grid values must be > 0; got {self.grid}")
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be >= 1; got {self.sizes}")

    # -- lookup
    def _coords(self) -> np.ndarray:
        g = np.asarray(self.grid, np.float32)
        if self.key == "ab":
            return g
        return np.log(g).astype(np.float32)

    def index(self, ab: float) -> int:
        """Grid index used at a concrete ``ab``."""
        ab32 = np.float32(ab)
        if self.key == "ab":
            c = ab32
        else:
            c = np.float32(0.5) * (np.log1p(-ab32) - np.log(ab32))
        return int(np.argmin(np.abs(self._coords() - c)))

    def size(self, ab: float) -> int:
        return self.sizes[self.index(ab)]

    def index_traced(self, ab) -> jax.Array:
        """Grid index for a (possibly traced) float32 ``ab``."""
        ab = jnp.asarray(ab, jnp.float32)
        c = ab if self.key == "ab" else 0.5 * (jnp.log1p(-ab) - jnp.log(ab))
        return jnp.argmin(jnp.abs(jnp.asarray(self._coords()) - c))

    @property
    def distinct(self) -> Tuple[int, ...]:
        """Sorted distinct sizes (one compiled program each)."""
        return tuple(sorted(set(self.sizes)))

    def branch_traced(self, ab) -> jax.Array:
        """Index into :attr:`distinct` of the size used at ``ab`` (traced-friendly)."""
        table = np.asarray([self.distinct.index(s) for s in self.sizes], np.int32)
        return jnp.asarray(table)[self.index_traced(ab)]

    # -- construction / IO
    @classmethod
    def published(cls, name: str, convention: str = "use") -> "SizeSchedule":
        """One of :data:`PUBLISHED_SCHEDULES` on the cosine-legacy 20-step grid (module docs)."""
        if name not in PUBLISHED_SCHEDULES:
            raise ValueError(f"unknown published schedule {name!r}; known: "
                             f"{', '.join(sorted(PUBLISHED_SCHEDULES))}")
        return cls(PUBLISHED_SCHEDULES[name], tuple(cosine_legacy_index_abs(convention=convention)),
                   "ab", name)

    @classmethod
    def from_callable(cls, fn: Callable[[float], int], abs_grid: Sequence[float],
                      name: str = "") -> "SizeSchedule":
        """Tabulate ``fn(ab)`` on ``abs_grid`` (e.g. the ab values of a sampler's steps)."""
        abs_grid = [float(a) for a in abs_grid]
        return cls(tuple(int(fn(a)) for a in abs_grid), tuple(abs_grid), "ab",
                   name or getattr(fn, "__name__", "callable"))

    def to_dict(self) -> dict:
        return {"format": SCHEDULE_FORMAT, "name": self.name, "key": self.key,
                "grid": list(self.grid), "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> "SizeSchedule":
        if d.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"{source} is not a size schedule (format {d.get('format')!r}; expected "
                             f"{SCHEDULE_FORMAT!r}); write schedules with SizeSchedule.to_json or "
                             "experiments/calibrate.py")
        for f in ("grid", "sizes"):
            if f not in d:
                raise ValueError(f"{source} lacks the field {f!r}")
        return cls(tuple(d["sizes"]), tuple(d["grid"]), d.get("key", "ab"), d.get("name", source))

    def to_json(self, path: str, **metadata) -> None:
        """Write atomically (temp file then rename); extra ``metadata`` is stored alongside."""
        d = dict(metadata)
        d.update(self.to_dict())
        _write_json_atomic(path, d)

    @classmethod
    def from_json(cls, path: str) -> "SizeSchedule":
        if not os.path.exists(path):
            raise FileNotFoundError(f"size schedule file {path!r} does not exist; create it with "
                                    "experiments/calibrate.py or SizeSchedule.to_json")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"size schedule file {path!r} is not valid JSON: {e}") from e
        return cls.from_dict(d, source=path)


def _write_json_atomic(path: str, obj) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


SizeSpec = Union[int, str, Sequence[int], SizeSchedule, Callable[[float], int]]


def resolve_size_spec(spec: SizeSpec, *, what: str = "patch_size", named=None,
                      grid_len: int = COSINE_LEGACY_STEPS,
                      default_grid: Optional[Callable[[], SizeSchedule]] = None):
    """Turn a user size spec into an int, a :class:`SizeSchedule` or a callable.

    Args:
      named: mapping name -> SizeSchedule factory for named schedules (default: the published
        local-score schedules).
      default_grid: how a bare list of sizes is placed on a grid (default: the cosine-legacy
        20-step grid of the published schedules).
    """
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, a schedule, a name or a callable; got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return int(spec)
    if isinstance(spec, SizeSchedule):
        return spec
    if isinstance(spec, str):
        if spec.startswith("file:"):
            return SizeSchedule.from_json(spec[len("file:"):])
        named = named if named is not None else {n: functools.partial(SizeSchedule.published, n)
                                                 for n in PUBLISHED_SCHEDULES}
        if spec in named:
            return named[spec]()
        raise ValueError(f"unknown {what} schedule {spec!r}; use an int, 'file:PATH', or one of "
                         f"{', '.join(sorted(named))}")
    if callable(spec):
        return spec
    if isinstance(spec, (list, tuple, np.ndarray)):
        sizes = [int(s) for s in np.asarray(spec).ravel()]
        if len(sizes) != grid_len:
            raise ValueError(f"{what} schedule has {len(sizes)} entries; a bare list must have "
                             f"{grid_len} (one per step of its grid, index 0 = lowest noise). For "
                             "another grid build SizeSchedule(sizes, grid)")
        base = default_grid() if default_grid is not None else SizeSchedule.published(
            "cifar10_unet_zeros_cond")
        return SizeSchedule(tuple(sizes), base.grid, base.key, "list")
    raise TypeError(f"{what} must be an int, a schedule, a name, a list or a callable; got "
                    f"{type(spec).__name__}")


# ----------------------------------------------------------------------------------------------
# Static-size dispatch shared by LS/ELS/bbELS and PSPC-square.

_TRACE_COUNTS: Counter = Counter()


def trace_count(name: str, size: int) -> int:
    """How many times the program of method ``name`` at size ``size`` was traced (tests)."""
    return _TRACE_COUNTS[(name, int(size))]


def _impl_counted(den, x_t, ab, *, size):
    _TRACE_COUNTS[(den.name, int(size))] += 1  # runs at trace time only
    return den._impl(x_t, ab, size)


_apply_sized = jax.jit(_impl_counted, static_argnames=("size",))


class SizedDenoiser(DenoiserBase):
    """Mixin for denoisers with a static per-step size in the field ``patch_size``.

    Subclasses implement ``_impl(x_t, ab, size)`` and ``_check_size(size)``.
    """

    def _size_for(self, ab: float) -> int:
        ps = self.patch_size
        if isinstance(ps, int):
            k = ps
        elif isinstance(ps, SizeSchedule):
            k = ps.size(ab)
        else:
            k = ps(float(ab))
            if isinstance(k, (jax.Array, np.ndarray)):
                k = np.asarray(k).item()
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
                raise TypeError(f"{self.name}: the patch_size callable returned {k!r} at ab = "
                                f"{float(ab):.6g}; it must return a Python int")
            k = int(k)
        self._check_size(k)
        return k

    def _stripped(self):
        """The same denoiser without its schedule, so compiled programs are shared per size."""
        return self.replace(patch_size=0)

    def __call__(self, x_t, ab):
        x_t, ab = check_query(x_t, ab, self.shape, self.name)
        if not _is_tracer(ab):
            k = self._size_for(float(ab))
            return _apply_sized(self._stripped(), x_t, ab, size=k)
        return self.apply(x_t, ab)

    def apply(self, x_t, ab):
        """Traced-``ab`` path: a fixed size, or ``lax.switch`` over a schedule's sizes."""
        ps = self.patch_size
        if isinstance(ps, int):
            return _impl_counted(self._stripped(), x_t, ab, size=ps)
        if isinstance(ps, SizeSchedule):
            sizes = ps.distinct
            core = self._stripped()
            if len(sizes) == 1:
                return _impl_counted(core, x_t, ab, size=sizes[0])
            branches = [functools.partial(_impl_counted, size=s) for s in sizes]
            return jax.lax.switch(ps.branch_traced(ab), branches, core, x_t, ab)
        raise ValueError(f"{self.name}: a callable patch_size needs a concrete ab; under jit/scan "
                         "tabulate it first: SizeSchedule.from_callable(fn, abs_grid)")

    def with_patch_size(self, size: SizeSpec):
        """This denoiser with another size spec (validated). Shares compiled programs per size."""
        return self._validated(self.replace(patch_size=self._resolve(size)))

    def size_at(self, ab: float) -> int:
        """The size used at a concrete ``ab``."""
        return self._size_for(float(ab))

    def _resolve(self, spec):
        return resolve_size_spec(spec)

    @classmethod
    def _validated(cls, den):
        ps = den.patch_size
        if isinstance(ps, int):
            den._check_size(ps)
        elif isinstance(ps, SizeSchedule):
            for s in ps.distinct:
                den._check_size(s)
        return den


# ----------------------------------------------------------------------------------------------
# Numerical building blocks.


def _box_same(a, k: int):
    """Zero-padded centred k x k window sums over the last two axes (separable)."""
    r = k // 2
    nd = a.ndim
    ones = (1,) * nd
    a = jax.lax.reduce_window(a, 0.0, jax.lax.add, (1,) * (nd - 2) + (k, 1), ones,
                              [(0, 0)] * (nd - 2) + [(r, r), (0, 0)])
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1,) * (nd - 1) + (k,), ones,
                                 [(0, 0)] * (nd - 1) + [(r, r)])


def _box_valid(a, s: int):
    """s x s window sums over the last two axes, windows fully inside (top-left anchored)."""
    nd = a.ndim
    ones = (1,) * nd
    a = jax.lax.reduce_window(a, 0.0, jax.lax.add, (1,) * (nd - 2) + (s, 1), ones, "VALID")
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1,) * (nd - 1) + (s,), ones, "VALID")


def _window_index(centres: np.ndarray, k: int, width: int, pad: int) -> np.ndarray:
    """Flat indices [Q, k*k] of the k x k windows centred at ``centres`` [Q, 2] (unpadded
    coordinates) in an image padded by ``pad`` on every side, of padded width ``width``."""
    r = k // 2
    di, dj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    offs = (di * width + dj).reshape(-1)
    top = (centres[:, 0] - r + pad) * width + (centres[:, 1] - r + pad)
    return (top[:, None] + offs[None, :]).astype(np.int32)


def _pad(x, r: int, mode: str):
    if r == 0:
        return x
    return jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="wrap" if mode == "wrap" else "constant")


def _scale(ab):
    return 1.0 / (2.0 * (1.0 - ab))


def _ls_flat(x_t, ab, chunked, k: int, softmax: str, mesh) -> jax.Array:
    """LS machine -> [B, H*W, C] (ALGORITHMS.md §6, LS)."""
    b, h, w, c = x_t.shape

    def chunk_fn(ctx, data):
        q, ab_, scale = ctx
        (x,) = data
        kk = x.shape[0]
        cross = _box_same(jnp.sum(q[:, None] * x[None], axis=-1), k)  # [B, K, H, W]
        sq = _box_same(jnp.sum(x * x, axis=-1), k)  # [K, H, W]
        logits = (2.0 * jnp.sqrt(ab_) * cross - ab_ * sq[None]) * scale
        return logits.reshape(b, kk, h * w), x.reshape(kk, h * w, c)

    return streaming.stream(chunk_fn, chunked, (x_t, ab, _scale(ab)), batch=b, m=h * w, d=c,
                            mode=softmax, mesh=mesh)


QUERY_BLOCK = 1024


def _patch_softmax(q_cols, ab, chunked, shape, *, k: int, item_idx: np.ndarray,
                   centre_idx: np.ndarray, train_pad: int, train_pad_mode: str, softmax: str,
                   mesh) -> jax.Array:
    """Softmax over a dictionary of training patches shared by all outputs, centre read out.

    Args:
      q_cols: [B, M, k*k*C] the query windows of the M output pixels (im2col).
      item_idx: [Q, k*k] flat window indices of the dictionary patches in every (padded)
        training image; ``centre_idx`` [Q] their centres.

    Returns [B, M, C]. The query windows form one softmax axis (``batch=1``, ``m`` = a block of
    the B*M windows), so the cross terms of a chunk are a single GEMM
    ``patches [K*Q, F] @ q_cols [block, F]^T`` that is already laid out as the stream's
    ``[1, K*Q, block]`` logits (no transposes).
    """
    b, m, f = q_cols.shape
    h, w, c = shape
    q = item_idx.shape[0]

    def chunk_fn(ctx, data):
        qc, ab_, scale = ctx
        (x,) = data
        kk = x.shape[0]
        flat = _pad(x, train_pad, train_pad_mode).reshape(kk, -1, c)
        patches = flat[:, item_idx].reshape(kk * q, f)  # [K*Q, k*k*C]
        centres = flat[:, centre_idx].reshape(kk * q, 1, c)
        cross = jnp.matmul(patches, qc.T, precision=HIGHEST)  # [K*Q, B*M]
        sq = jnp.sum(patches * patches, axis=-1)
        logits = (2.0 * jnp.sqrt(ab_) * cross - ab_ * sq[:, None]) * scale
        return logits[None], centres

    # one validity flag per dictionary item (every patch of a padding image is invalid)
    items = streaming.Chunked(chunked.data, jnp.repeat(chunked.valid, q, axis=1))
    scale = _scale(ab)
    flat_q = q_cols.reshape(b * m, f)
    # Query blocks keep the per-chunk logits [K*Q, block] cache-sized (about 2x faster on CPU
    # than one [K*Q, B*M] block); every block is an independent exact stream.
    qb = min(QUERY_BLOCK, b * m)
    nb = -(-(b * m) // qb)
    flat_q = jnp.pad(flat_q, ((0, nb * qb - b * m), (0, 0)))
    one = lambda blk: streaming.stream(chunk_fn, items, (blk, ab, scale), batch=1, m=qb, d=c,
                                       mode=softmax, mesh=mesh)[0]
    out = jax.lax.map(one, flat_q.reshape(nb, qb, f)) if nb > 1 else one(flat_q)[None]
    return out.reshape(nb * qb, c)[: b * m].reshape(b, m, c)


def _line_softmax(x_t, ab, chunked, *, k: int, lines: np.ndarray, positions: np.ndarray,
                  axis: int, softmax: str, mesh) -> jax.Array:
    """bbELS edge pixels on lines parallel to an edge -> [B, nlines * L, C].

    ``axis=0``: lines are rows ``lines`` [nl] and the outputs of a line are the pixels
    ``(line, positions[j])``; ``axis=1``: lines are columns. The dictionary of output
    ``(line, p_j)`` is the patches of the zero-padded training images centred at ``(line, p_a)``
    for every ``a`` (the same distance from the edge, any interior position along it), so each
    line is one small ``[L, L]`` block of cross terms -- a batched GEMM over lines.
    """
    b, h, w, c = x_t.shape
    r = k // 2
    nl, ll = len(lines), len(positions)
    ii, jj = np.meshgrid(lines, positions, indexing="ij")  # [nl, L]
    centres = np.stack([ii.ravel(), jj.ravel()], 1) if axis == 0 else np.stack(
        [jj.ravel(), ii.ravel()], 1)
    wp = w + 2 * r
    idx = _window_index(centres, k, wp, r)  # [nl*L, k*k]
    centre_idx = ((centres[:, 0] + r) * wp + centres[:, 1] + r).astype(np.int32)
    q_cols = _pad(x_t, r, "zeros").reshape(b, -1, c)[:, idx].reshape(b, nl, ll, -1)

    def chunk_fn(ctx, data):
        qc, ab_, scale = ctx
        (x,) = data
        kk = x.shape[0]
        flat = _pad(x, r, "zeros").reshape(kk, -1, c)
        patches = flat[:, idx].reshape(kk, nl, ll, -1)  # [K, nl, L(a), F]
        cross = jnp.einsum("klaf,bljf->bkalj", patches, qc, precision=HIGHEST)
        sq = jnp.sum(patches * patches, axis=-1)  # [K, nl, L(a)]
        logits = (2.0 * jnp.sqrt(ab_) * cross
                  - ab_ * jnp.transpose(sq, (0, 2, 1))[None, :, :, :, None]) * scale
        cen = flat[:, centre_idx].reshape(kk, nl, ll, c)  # value of item (k, a) for line l
        vals = jnp.broadcast_to(jnp.transpose(cen, (0, 2, 1, 3))[:, :, :, None, :],
                                (kk, ll, nl, ll, c))
        return logits.reshape(b, kk * ll, nl * ll), vals.reshape(kk * ll, nl * ll, c)

    items = streaming.Chunked(chunked.data, jnp.repeat(chunked.valid, ll, axis=1))
    return streaming.stream(chunk_fn, items, (q_cols, ab, _scale(ab)), batch=b, m=nl * ll, d=c,
                            mode=softmax, mesh=mesh)


def _query_cols(x_t, k: int, centres: np.ndarray, mode: str):
    b, h, w, c = x_t.shape
    r = k // 2
    xp = _pad(x_t, r, mode)
    idx = _window_index(centres, k, w + 2 * r, r)
    return xp.reshape(b, -1, c)[:, idx].reshape(b, centres.shape[0], -1)


def _grid(h: int, w: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([i.ravel(), j.ravel()], axis=1)


def _els_flat(x_t, ab, chunked, k, dictionary, softmax, mesh):
    """ELS machine -> [B, H*W, C] (ALGORITHMS.md §6, ELS)."""
    _, h, w, c = x_t.shape
    r = k // 2
    allpix = _grid(h, w)
    q_cols = _query_cols(x_t, k, allpix, "wrap")
    if dictionary == "wrapped":
        item_idx = _window_index(allpix, k, w + 2 * r, r)
        centre_idx = ((allpix[:, 0] + r) * (w + 2 * r) + allpix[:, 1] + r).astype(np.int32)
        pad = r
    else:
        inner = allpix[(allpix[:, 0] >= r) & (allpix[:, 0] <= h - 1 - r)
                       & (allpix[:, 1] >= r) & (allpix[:, 1] <= w - 1 - r)]
        item_idx = _window_index(inner, k, w, 0)
        centre_idx = (inner[:, 0] * w + inner[:, 1]).astype(np.int32)
        pad = 0
    return _patch_softmax(q_cols, ab, chunked, (h, w, c), k=k, item_idx=item_idx,
                          centre_idx=centre_idx, train_pad=pad, train_pad_mode="wrap",
                          softmax=softmax, mesh=mesh)


def bbels_classes(h: int, w: int, k: int) -> np.ndarray:
    """Pixel class for bbELS: 0 interior, 1 edge, 2 corner; int [H, W] (ALGORITHMS.md §6)."""
    r = k // 2
    rb = (np.arange(h) < r) | (np.arange(h) > h - 1 - r)
    cb = (np.arange(w) < r) | (np.arange(w) > w - 1 - r)
    return rb[:, None].astype(int) + cb[None, :].astype(int)


def _bbels_flat(x_t, ab, chunked, k, softmax, mesh):
    """bbELS machine -> [B, H*W, C] for k <= min(H, W) (ALGORITHMS.md §6, bbELS).

    Interior pixels: one stream over all interior (valid) patches. Edge pixels: one stream per
    orientation over lines parallel to the edge (:func:`_line_softmax`). Corner pixels: LS.
    """
    b, h, w, c = x_t.shape
    r = k // 2
    cls = bbels_classes(h, w, k).ravel()
    allpix = _grid(h, w)
    out = jnp.zeros((b, h * w, c), jnp.float32)
    inner = allpix[cls == 0]
    if len(inner):
        q_cols = _query_cols(x_t, k, inner, "zeros")
        vals = _patch_softmax(q_cols, ab, chunked, (h, w, c), k=k,
                              item_idx=_window_index(inner, k, w, 0),
                              centre_idx=(inner[:, 0] * w + inner[:, 1]).astype(np.int32),
                              train_pad=0, train_pad_mode="zeros", softmax=softmax, mesh=mesh)
        out = out.at[:, np.flatnonzero(cls == 0)].set(vals)
    if r > 0:
        edge_rows = np.concatenate([np.arange(r), np.arange(h - r, h)])
        edge_cols = np.concatenate([np.arange(r), np.arange(w - r, w)])
        for axis, lines, positions, width in ((0, edge_rows, np.arange(r, w - r), w),
                                              (1, edge_cols, np.arange(r, h - r), h)):
            vals = _line_softmax(x_t, ab, chunked, k=k, lines=lines, positions=positions,
                                 axis=axis, softmax=softmax, mesh=mesh)
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
    """LS / ELS / bbELS over a chunked training set (module docs; ALGORITHMS.md §6).

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
            raise ValueError(f"{self.name}: patch size k = {k} must be a positive odd integer "
                             "(the window is centred on the output pixel); use k - 1 or k + 1")
        if k > self.max_size():
            h, w, _ = self.shape
            why = ("valid ELS patches must fit inside the image" if self.method == "els"
                   and self.dictionary == "valid" else
                   "k = 2 max(H, W) - 1 already covers the whole image from every pixel (the "
                   "optimal denoiser)")
            raise ValueError(f"{self.name}: patch size k = {k} is too large for {h}x{w} images: "
                             f"the maximum is {self.max_size()} ({why})")

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
    named = {n: functools.partial(SizeSchedule.published, n, convention)
             for n in PUBLISHED_SCHEDULES}
    return resolve_size_spec(spec, named=named, default_grid=lambda: SizeSchedule.published(
        "cifar10_unet_zeros_cond", convention))


def _make(method: str, *, train, patch_size: SizeSpec = 3, dictionary: str = "wrapped",
          softmax: str = "exact", chunk_size: Optional[int] = None, mesh=None,
          shard: bool = False, convention: str = "use") -> LocalScoreMachine:
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
    den = LocalScoreMachine(chunked=chunked, shape=shape, patch_size=spec, method=method,
                            dictionary=dictionary, softmax=softmax, mesh=mesh,
                            convention=convention)
    return LocalScoreMachine._validated(den)


@register("ls")
def make_ls(*, train, patch_size: SizeSpec = 3, softmax: str = "exact",
            chunk_size: Optional[int] = None, mesh=None, shard: bool = False,
            convention: str = "use") -> LocalScoreMachine:
    """Kamb & Ganguli's local score (LS) machine over ``train`` [N, H, W, C].

    Args:
      patch_size: odd int, callable ``ab -> int``, :class:`SizeSchedule`, list of 20 sizes on the
        cosine-legacy grid, a name in :data:`PUBLISHED_SCHEDULES`, or ``"file:PATH"``.
      softmax: ``"exact"`` (default) or ``"chunk_mean"`` (per-chunk softmax, averaged).
      chunk_size: training images per streamed chunk (default 256).
      convention: how published schedules map index -> t (module docs): ``"use"``/``"calibration"``.
    """
    return _make("ls", train=train, patch_size=patch_size, softmax=softmax, chunk_size=chunk_size,
                 mesh=mesh, shard=shard, convention=convention)


@register("els")
def make_els(*, train, patch_size: SizeSpec = 3, dictionary: str = "wrapped",
             softmax: str = "exact", chunk_size: Optional[int] = None, mesh=None,
             shard: bool = False, convention: str = "use") -> LocalScoreMachine:
    """Kamb & Ganguli's equivariant local score (ELS) machine (circular query padding).

    ``dictionary="wrapped"`` (default): patches of the circularly padded training images at all
    H W centres; ``"valid"``: only patches fully inside (the released module). ``chunk_size``:
    training images per chunk (default: about 1024 patches per chunk, at least one image). Other
    arguments as :func:`make_ls`.
    """
    return _make("els", train=train, patch_size=patch_size, dictionary=dictionary,
                 softmax=softmax, chunk_size=chunk_size, mesh=mesh, shard=shard,
                 convention=convention)


@register("bbels")
def make_bbels(*, train, patch_size: SizeSpec = 3, softmax: str = "exact",
               chunk_size: Optional[int] = None, mesh=None, shard: bool = False,
               convention: str = "use") -> LocalScoreMachine:
    """Boundary-broken ELS (zero padding; interior / edge / corner rules; k > min(H, W) -> LS)."""
    return _make("bbels", train=train, patch_size=patch_size, softmax=softmax,
                 chunk_size=chunk_size, mesh=mesh, shard=shard, convention=convention)


# ----------------------------------------------------------------------------------------------
# Calibration against a reference (network) denoiser (ALGORITHMS.md §6).


class Calibration(NamedTuple):
    """Result of :func:`calibrate`.

    Attributes:
      sizes: int [S], the chosen size per sampling step (high noise first).
      abs: float32 [S], alpha-bar of every step; ``timesteps`` [S] the sampler's t.
      per_seed: int [S, B], the size each seed chose.
      candidates: the sizes tried (increasing).
      scores: float [S, B, len(candidates)]: cosine similarity of scores (criterion "cosine")
        or MSE to the reference x0 (criterion "greedy"; NaN where never evaluated).
      criterion: ``"cosine"`` or ``"greedy"``.
    """

    sizes: np.ndarray
    abs: np.ndarray
    timesteps: np.ndarray
    per_seed: np.ndarray
    candidates: Tuple[int, ...]
    scores: np.ndarray
    criterion: str

    def schedule(self, name: str = "calibrated") -> SizeSchedule:
        """The result as a :class:`SizeSchedule` keyed by the steps' ab (nearest grid point)."""
        return SizeSchedule(tuple(int(s) for s in self.sizes),
                            tuple(float(a) for a in self.abs), "ab", name)

    def to_json(self, path: str, name: str = "calibrated", **metadata) -> None:
        """Write the schedule (loadable with ``patch_size="file:PATH"``) and the raw results."""
        self.schedule(name).to_json(
            path, criterion=self.criterion, candidates=list(self.candidates),
            timesteps=[float(t) for t in self.timesteps], per_seed=self.per_seed.tolist(),
            scores=np.where(np.isnan(self.scores), None, self.scores).tolist(), **metadata)


def _lower_median(v: np.ndarray) -> int:
    s = np.sort(np.asarray(v))
    return int(s[(len(s) - 1) // 2])


def _cosine(a, b):
    a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
    b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.where(den == 0, 1.0, den)


def _mse(a, b):
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return np.mean(d.reshape(d.shape[0], -1) ** 2, axis=1)


def calibrate(reference, machine: SizedDenoiser, candidates: Sequence[int], x_T, *,
              sched: Optional[schedules.DiscreteSchedule] = None, num_steps: int = 10,
              timesteps=None, criterion: str = "cosine") -> Calibration:
    """Per-step size of ``machine`` that best matches ``reference`` along its own trajectory.

    The reference (e.g. ``denoisers.make("network", checkpoint=PATH)``) is sampled with
    deterministic DDIM (:func:`locality.sampling.ddim`) from ``x_T`` [B, H, W, C] (one seed per
    batch element); at every step the machine is evaluated at the reference's own ``(x_t, ab)``.

    * ``criterion="cosine"`` (Kamb & Ganguli): per seed, the candidate maximising the cosine
      similarity of the scores ``(sqrt(ab) x0_hat - x_t) / (1 - ab)`` (whole image); per step,
      the (lower) median over seeds.
    * ``criterion="greedy"``: per seed, start at the first candidate and move to the next while the
      MSE to the reference's ``x0_hat`` does not increase; per step, the lower median over seeds.

    Args:
      machine: an ``ls``/``els``/``bbels``/``pspc_square`` denoiser; only its training set and
        options are used (``machine.with_patch_size(k)`` for every candidate k).
      candidates: increasing sizes to try (e.g. 3, 5, ..., 27).
      sched, num_steps, timesteps: the DDIM grid (default: DDPM linear, 10 leading steps).
    """
    from locality import sampling

    cands = tuple(int(c) for c in candidates)
    if not cands:
        raise ValueError("calibrate needs at least one candidate size")
    if list(cands) != sorted(set(cands)):
        raise ValueError(f"candidates must be strictly increasing, got {cands}")
    if criterion not in ("cosine", "greedy"):
        raise ValueError(f"criterion must be 'cosine' or 'greedy', got {criterion!r}")
    for k in cands:
        machine._check_size(k)
    t_start = time.perf_counter()
    traj = sampling.ddim(reference, x_T, sched, num_steps, timesteps=timesteps)
    xts, x0s = np.asarray(traj.xts), np.asarray(traj.x0_hats)
    n_steps, b = xts.shape[:2]
    scores = np.full((n_steps, b, len(cands)), np.nan)
    per_seed = np.zeros((n_steps, b), np.int64)
    evaluate = lambda k, s: np.asarray(machine.with_patch_size(k)(xts[s], float(traj.abs[s])))
    for s in range(n_steps):
        ab = float(traj.abs[s])
        if criterion == "cosine":
            ref_score = np.asarray(schedules.score_from_x0(xts[s], x0s[s], ab))
            for j, k in enumerate(cands):
                score = np.asarray(schedules.score_from_x0(xts[s], evaluate(k, s), ab))
                scores[s, :, j] = _cosine(score, ref_score)
            per_seed[s] = np.asarray(cands)[np.argmax(scores[s], axis=1)]
        else:
            pos = np.zeros(b, np.int64)
            active = np.ones(b, bool)
            scores[s, :, 0] = _mse(evaluate(cands[0], s), x0s[s])
            for j in range(1, len(cands)):
                if not active.any():
                    break
                scores[s, :, j] = _mse(evaluate(cands[j], s), x0s[s])
                step = active & (scores[s, :, j] <= scores[s, :, j - 1])
                pos[step] = j
                active &= step
            per_seed[s] = np.asarray(cands)[pos]
        logging.getLogger(__name__).info(
            "calibrate %s step %d/%d (ab %.4g): sizes per seed %s [%.1fs elapsed]", criterion,
            s + 1, n_steps, ab, per_seed[s].tolist(), time.perf_counter() - t_start)
    sizes = np.asarray([_lower_median(per_seed[s]) for s in range(n_steps)], np.int64)
    return Calibration(sizes, np.asarray(traj.abs, np.float32), np.asarray(traj.timesteps),
                       per_seed, cands, scores, criterion)


def cosine_legacy_sampler(num_steps: int = COSINE_LEGACY_STEPS):
    """Kamb & Ganguli's grid as a DDIM grid: ``(schedule, timesteps)`` for :func:`sampling.ddim`.

    The schedule's entry ``i`` has ``ab = cos^2((i / S) / 1.008 * pi / 2)``; the timesteps are
    ``S - 1, ..., 1`` (t = 0.95 ... 0.05; entry 0 has ab = 1 and is only the final ``ab_prev``),
    as in their sampler.
    """
    ab = cosine_legacy_index_abs(num_steps).astype(np.float32)
    prev = np.concatenate([[1.0], ab[:-1]]).astype(np.float32)
    betas = (1.0 - ab / prev).astype(np.float32)
    sched = schedules.DiscreteSchedule(betas=betas, alphas_cumprod=ab, name="cosine_legacy")
    return sched, np.arange(num_steps - 1, 0, -1, dtype=np.int32)


__all__ = ["PUBLISHED_SCHEDULES", "SizeSchedule", "LocalScoreMachine", "make_ls", "make_els",
           "make_bbels", "calibrate", "Calibration", "cosine_legacy_sampler", "bbels_classes",
           "resolve_size_spec", "trace_count"]
