"""Denoisers by name: ``make(name, **kwargs) -> denoise(x_t, ab)``; ``names()`` lists them.

Every module below registers its factories on import.
"""

from locality.denoisers.registry import Denoiser, make, names, register  # noqa: F401
from locality.denoisers import linear, optimal, pca_locality, wiener  # noqa: F401  (registration)
