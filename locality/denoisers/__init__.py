"""Denoisers by name: ``make(name, **kwargs) -> denoise(x_t, ab)``; ``names()`` lists them.

Every module below registers its factories on import (cheap: no data, no checkpoints read).
"""

from locality.denoisers import (  # noqa: F401  (registration)
    linear,
    local_score,
    network,
    optimal,
    pca_locality,
    pspc,
    scfdm,
    wiener,
)
from locality.denoisers.registry import Denoiser, make, names, register  # noqa: F401
