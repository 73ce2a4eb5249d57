"""Corruptions of an encoder's input, for denoising autoencoders (Vincent et al. 2008).

An amortized guide given a ``corruption`` encodes :math:`\\tilde x \\sim C(\\tilde x \\mid x)` instead
of x while it is in training mode (``module.train()``, as :func:`pvae.fit` sets it for its steps); the
model still observes the clean x, so the objective is to restore x from :math:`\\tilde x`. In
evaluation mode the encoder sees x as it is. A corruption is a callable ``corruption(x) -> x_tilde``
drawing from torch's global generator, or from ``generator`` where given.

References:

1. Vincent, Larochelle, Bengio & Manzagol, *Extracting and Composing Robust Features with Denoising
   Autoencoders*, ICML 2008.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class MaskingNoise:
    """Each input value set to 0 with probability ``p``, independently."""

    p: float

    def __post_init__(self):
        if not 0 <= self.p < 1:
            raise ValueError(f"the masking probability must be in [0, 1), got {self.p}")

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep


@dataclass(frozen=True)
class GaussianNoise:
    """N(0, ``sigma``^2) noise added to each input value, independently."""

    sigma: float

    def __post_init__(self):
        if not self.sigma >= 0:
            raise ValueError(f"the noise scale sigma must be >= 0, got {self.sigma}")

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class Compose:
    """Several corruptions, applied in order."""

    corruptions: tuple

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for corrupt in self.corruptions:
            x = corrupt(x, generator)
        return x


def make_corruption(masking: float = 0.0, noise: float = 0.0):
    """The corruption of ``masking`` probability and then ``noise`` scale; None when both are 0."""
    parts = ([MaskingNoise(masking)] if masking else []) + ([GaussianNoise(noise)] if noise else [])
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Compose(tuple(parts))
