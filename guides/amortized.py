"""Amortized inference: one encoder network maps every x to the parameters of q(z | x).

.. math:: q_\\phi(z \\mid x) = \\mathcal N\\big(z;\\ \\mu_\\phi(x),\\ \\mathrm{diag}\\,\\sigma_\\phi(x)^2\\big)

Samples are reparameterized, ``z = mu + sigma * eps``, so the ELBO's gradient flows through them.
"""

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pvae.models.networks import ConvEncoder, mlp
from pvae.plate import data_plate


SCALE_FLOOR = 1e-6  # added to every softplus scale: keeps it positive in float32


class AmortizedGuide(nn.Module):
    """A diagonal-Gaussian q(z | x) whose ``loc`` and ``scale`` come from ``encoder(x)``.

    :param encoder: maps x ``(..., P)`` to ``(..., 2 * latent_dim)``: loc, then the scale before a
        softplus.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int):
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> tuple:
        """``(loc, scale)`` of q(z | x), each ``(..., latent_dim)``."""
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + SCALE_FLOOR

    def forward(self, x: torch.Tensor, idx=None, num_data=None) -> None:
        with data_plate(x, idx, num_data):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def mlp_guide(
    num_pixels: int, latent_dim: int = 20, hidden: Sequence[int] = (400,), activation: str = "relu"
) -> AmortizedGuide:
    """An MLP encoder ``num_pixels -> hidden... -> 2 * latent_dim``; ``hidden=()`` makes it linear."""
    return AmortizedGuide(mlp([num_pixels, *hidden, 2 * latent_dim], activation), latent_dim)


def conv_guide(image_shape, latent_dim: int = 20) -> AmortizedGuide:
    """A convolutional encoder for 28x28 images."""
    return AmortizedGuide(ConvEncoder(image_shape, 2 * latent_dim), latent_dim)
