"""Name -> factory registry shared by every denoiser (docs/architecture.md, "Denoiser" contract).

A factory binds fitted state and static hyper-parameters and returns a pure function
``denoise(x_t [B, H, W, C], ab) -> x0_hat [B, H, W, C]``. Register one with::

    @register("wiener")
    def make_wiener(*, stats, ...) -> Denoiser: ...

and build any method with ``make(name, **kwargs)``. Modules register on import;
``locality.denoisers`` imports them all.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Protocol


class Denoiser(Protocol):
    def __call__(self, x_t, ab):  # x_t: [B, H, W, C] float32, ab: scalar -> [B, H, W, C]
        ...


_REGISTRY: Dict[str, Callable[..., Denoiser]] = {}


def register(name: str):
    """Decorator registering ``factory`` under ``name`` (a name may be registered once)."""

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"denoiser {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> List[str]:
    """Sorted names of every registered method."""
    return sorted(_REGISTRY)


def make(name: str, **kwargs) -> Denoiser:
    """Build the registered denoiser ``name`` with factory keyword arguments ``kwargs``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown denoiser {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name](**kwargs)
