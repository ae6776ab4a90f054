"""Patch-size schedules shared by the local score machines and PSPC-Square
(docs/algorithms.md §6, §7).

A per-step size -- the patch size k of Kamb & Ganguli's LS / ELS / bbELS machines
(:mod:`locality.denoisers.local_score`) or the square size s of Niedoba et al.'s PSPC-Square
(:mod:`locality.denoisers.pspc`) -- given as an int, a callable, a :class:`SizeSchedule` or a
published table, and the static-size dispatch (:class:`SizedDenoiser`) that runs one compiled
program per distinct size. Per-step sizes are fitted against a network by
:mod:`locality.denoisers.calibration`.

Patch size per timestep (static)
--------------------------------
``patch_size`` is an odd int, a callable ``ab -> odd int``, a :class:`SizeSchedule` (a table of
sizes on a grid of noise levels; the size at ``ab`` is the entry of the nearest grid point), a
list of 20 ints on Kamb & Ganguli's cosine-legacy grid, the name of a published schedule
(:data:`PUBLISHED_SCHEDULES`), a string of digits (``"5"``, the int: a config field that holds
schedule names takes a fixed size this way, e.g. ``--config.method_kwargs.ls.patch_size=5``), or
``"file:PATH"`` (a JSON schedule written by
:meth:`locality.denoisers.calibration.Calibration.to_json` /
``experiments/calibrate.py``).

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
in sampling) than the t it was calibrated at.
``SizeSchedule.published(name, convention="use")`` (default; also the
``convention=`` argument of the factories) reproduces their sampling; ``convention="calibration"``
puts every size at the time it was measured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from locality import schedules
from locality._io import atomic_path
from locality.denoisers.base import DenoiserBase, _is_tracer

# ----------------------------------------------------------------------------------------------
# Published calibrated schedules (Kamb & Ganguli's released files; docs/algorithms.md §6).
# Index 0 = t 0 ... index 19 = t 0.95 on the cosine-legacy 20-step grid.

KS_CIFAR10_RESNET_ZEROS_COND = (3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17)
KS_CIFAR10_RESNET_CIRCULAR_COND = (
    3,
    3,
    3,
    3,
    5,
    5,
    5,
    5,
    7,
    7,
    7,
    9,
    9,
    11,
    11,
    13,
    13,
    15,
    15,
    15,
)
KS_CIFAR10_UNET_ZEROS_COND = (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25)
KS_CELEBA_RESNET_ZEROS = (3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19)
KS_CELEBA_UNET_ZEROS = (3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27)
KS_FASHIONMNIST_RESNET_ZEROS_COND = (
    3,
    3,
    5,
    5,
    7,
    7,
    9,
    9,
    9,
    11,
    11,
    11,
    13,
    13,
    13,
    15,
    15,
    15,
    17,
    17,
)
KS_FASHIONMNIST_UNET_ZEROS_COND = (
    3,
    3,
    5,
    5,
    7,
    7,
    7,
    9,
    11,
    11,
    11,
    13,
    15,
    15,
    21,
    23,
    25,
    25,
    25,
    25,
)
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


def cosine_legacy_index_abs(
    num_steps: int = COSINE_LEGACY_STEPS, convention: str = "use"
) -> np.ndarray:
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
            raise ValueError(
                f"size schedule {self.name!r} has {len(self.sizes)} sizes but a grid of "
                f"{len(self.grid)} noise levels; give one size per grid point"
            )
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
            raise ValueError(
                f"unknown published schedule {name!r}; known: "
                f"{', '.join(sorted(PUBLISHED_SCHEDULES))}"
            )
        return cls(
            PUBLISHED_SCHEDULES[name],
            tuple(cosine_legacy_index_abs(convention=convention)),
            "ab",
            name,
        )

    @classmethod
    def from_callable(
        cls, fn: Callable[[float], int], abs_grid: Sequence[float], name: str = ""
    ) -> "SizeSchedule":
        """Tabulate ``fn(ab)`` on ``abs_grid`` (e.g. the ab values of a sampler's steps)."""
        abs_grid = [float(a) for a in abs_grid]
        return cls(
            tuple(int(fn(a)) for a in abs_grid),
            tuple(abs_grid),
            "ab",
            name or getattr(fn, "__name__", "callable"),
        )

    def to_dict(self) -> dict:
        return {
            "format": SCHEDULE_FORMAT,
            "name": self.name,
            "key": self.key,
            "grid": list(self.grid),
            "sizes": list(self.sizes),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> "SizeSchedule":
        if d.get("format") != SCHEDULE_FORMAT:
            raise ValueError(
                f"{source} is not a size schedule (format {d.get('format')!r}; expected "
                f"{SCHEDULE_FORMAT!r}); write schedules with SizeSchedule.to_json or "
                "experiments/calibrate.py"
            )
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
            raise FileNotFoundError(
                f"size schedule file {path!r} does not exist; create it with "
                "experiments/calibrate.py or SizeSchedule.to_json"
            )
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


def resolve_size_spec(
    spec: SizeSpec,
    *,
    what: str = "patch_size",
    named=None,
    grid_len: int = COSINE_LEGACY_STEPS,
    default_grid: Optional[Callable[[], SizeSchedule]] = None,
):
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
        if spec.strip().isdigit():  # "5": a fixed size given where a config field holds names
            return int(spec)
        if spec.startswith("file:"):
            return SizeSchedule.from_json(spec[len("file:") :])
        named = (
            named
            if named is not None
            else {n: functools.partial(SizeSchedule.published, n) for n in PUBLISHED_SCHEDULES}
        )
        if spec in named:
            return named[spec]()
        raise ValueError(
            f"unknown {what} schedule {spec!r}; use an int, 'file:PATH', or one of "
            f"{', '.join(sorted(named))}"
        )
    if callable(spec):
        return spec
    if isinstance(spec, (list, tuple, np.ndarray)):
        sizes = [int(s) for s in np.asarray(spec).ravel()]
        if len(sizes) != grid_len:
            raise ValueError(
                f"{what} schedule has {len(sizes)} entries; a bare list must have "
                f"{grid_len} (one per step of its grid, index 0 = lowest noise). For "
                "another grid build SizeSchedule(sizes, grid)"
            )
        base = (
            default_grid()
            if default_grid is not None
            else SizeSchedule.published("cifar10_unet_zeros_cond")
        )
        return SizeSchedule(tuple(sizes), base.grid, base.key, "list")
    raise TypeError(
        f"{what} must be an int, a schedule, a name, a list or a callable; got "
        f"{type(spec).__name__}"
    )


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
                raise TypeError(
                    f"{self.name}: the patch_size callable returned {k!r} at ab = "
                    f"{float(ab):.6g}; it must return a Python int"
                )
            k = int(k)
        self._check_size(k)
        return k

    def _stripped(self):
        """The same denoiser without its schedule, so compiled programs are shared per size."""
        return self.replace(patch_size=0)

    def _dispatch(self, x_t, ab):
        """Concrete ``ab``: the size is picked in Python and its jitted program runs; traced
        ``ab``: :meth:`apply`. Called by ``DenoiserBase.__call__`` after the query checks."""
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
        raise ValueError(
            f"{self.name}: a callable patch_size needs a concrete ab; under jit/scan "
            "tabulate it first: SizeSchedule.from_callable(fn, abs_grid)"
        )

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


__all__ = [
    "PUBLISHED_SCHEDULES",
    "COSINE_LEGACY_STEPS",
    "SCHEDULE_FORMAT",
    "SizeSchedule",
    "SizeSpec",
    "SizedDenoiser",
    "cosine_legacy_index_abs",
    "resolve_size_spec",
    "trace_count",
]
