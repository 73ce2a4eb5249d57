"""Two stochastic layers (Burda et al. 2015): a VAE whose prior is itself a latent-variable model.

.. math::
    z_2 \\sim \\mathcal N(0, I), \\qquad z_1 \\mid z_2 \\sim \\mathcal N\\big(\\mu(z_2), \\mathrm{diag}\\,
    \\sigma(z_2)^2\\big), \\qquad x \\mid z_1 \\sim p(x \\mid \\mathrm{decoder}(z_1)),

with Burda et al.'s sizes by default: :math:`z_1 \\in \\mathbb R^{100}`, :math:`z_2 \\in \\mathbb R^{50}`,
:math:`z_2 \\to 100 \\to 100 \\to z_1` and :math:`z_1 \\to 200 \\to 200 \\to x`, tanh units. Its guide is
pvae's amortized guide built from the model's trace, with the encoder body :class:`BottomUpEncoder`
(:math:`x \\to 200 \\to 200`, then :math:`\\to 100 \\to 100`): q of both layers from the data.

References:

1. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
"""

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .likelihoods import make_likelihood
from .networks import ACTIVATIONS, mlp

SCALE_FLOOR = 1e-4  # under softplus, the scale of p(z1 | z2)


class TwoLayerVAE(nn.Module):
    """p(z2) p(z1 | z2) p(x | z1) as a Pyro program (see the module docstring).

    :param top: maps z2 ``(..., D2)`` to the loc and the softplus-scale of p(z1 | z2), ``(..., 2 D1)``.
    :param decoder: maps z1 ``(..., D1)`` to the likelihood's parameters.
    :param static_structure: ``top`` and ``decoder`` run the same operations on every batch of a shape,
        so that ``fit`` may record the objective once (:mod:`pvae.tape`); true for :func:`two_layer_vae`'s.
    """

    def __init__(self, top: nn.Module, decoder: nn.Module, likelihood, latent_dims: tuple,
                 static_structure: bool = False):
        super().__init__()
        self.static_structure = static_structure
        self.top, self.decoder, self.likelihood = top, decoder, likelihood
        self.latent_dims = tuple(latent_dims)
        self.latent_dim = self.latent_dims[1]  # of the prior p(z2): what samples are drawn from

    def bottom_prior(self, z2: torch.Tensor) -> dist.Distribution:
        loc, raw = self.top(z2).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + SCALE_FLOOR).to_event(1)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(x.shape[0], self.latent_dims[1]), 1.0).to_event(1))
            z1 = pyro.sample("z1", self.bottom_prior(z2))
            pyro.sample("x", self.likelihood(self.decoder(z1)), obs=x)

    def decode(self, z2: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image for each top-layer z2, through the mean of p(z1 | z2), ``(..., P)``."""
        return self.likelihood.mean(self.decoder(self.bottom_prior(z2).mean))


class BottomUpEncoder(nn.Module):
    """The encoder's body for two stochastic layers: :math:`h_1 = f_1(x)` (``x -> hidden[0] -> hidden[0]``),
    :math:`h_2 = f_2(h_1)` (``-> hidden[1] -> hidden[1]``), and the features ``[h_1, h_2]`` from which
    the guide's head gives q(z1 | x) and q(z2 | x).

    Burda et al.'s encoder reads z2 from a *draw* of z1; this one reads it from z1's features, the same
    widths a layer up, so that q factorizes over the layers given x. Then q is pvae's amortized family
    (one flat parameter vector per datapoint), which the gap study optimizes and refines per datapoint.
    """

    static_structure = True  # the same operations on every batch (pvae.protocols.StaticProgram)

    def __init__(self, in_features: int, hidden: Sequence[int] = (200, 100), activation: str = "tanh"):
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(f"the bottom-up encoder has two layers' widths, got {tuple(hidden)}")
        act = ACTIVATIONS[activation]
        self.lower = nn.Sequential(mlp([in_features, hidden[0], hidden[0]], activation), act())
        self.upper = nn.Sequential(mlp([hidden[0], hidden[1], hidden[1]], activation), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.lower(x)
        return torch.cat([h1, self.upper(h1)], -1)


def two_layer_vae(
    num_pixels: int,
    latent_dims: Sequence[int] = (100, 50),
    hidden: Sequence[int] = (200, 100),
    likelihood: str = "bernoulli",
    activation: str = "tanh",
) -> TwoLayerVAE:
    """Burda et al.'s two-layer model: ``latent_dims = (D1, D2)``, ``hidden = (H1, H2)`` for
    ``z2 -> H2 -> H2 -> z1`` and ``z1 -> H1 -> H1 -> x``."""
    if len(latent_dims) != 2 or len(hidden) != 2 or min(*latent_dims, *hidden) < 1:
        raise ValueError(f"two layers need two latent sizes and two widths, got {tuple(latent_dims)}, {tuple(hidden)}")
    d1, d2 = latent_dims
    lik = make_likelihood(likelihood)
    top = mlp([d2, hidden[1], hidden[1], 2 * d1], activation)
    decoder = mlp([d1, hidden[0], hidden[0], lik.params_per_pixel * num_pixels], activation)
    return TwoLayerVAE(top, decoder, lik, (d1, d2), static_structure=True)
