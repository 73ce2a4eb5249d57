"""The variational autoencoder's generative model (Kingma & Welling 2013, arXiv 1312.6114).

.. math:: p(z) = \\mathcal N(0, I), \\qquad p(x \\mid z) = \\prod_i p(x_i \\mid \\mathrm{decoder}(z))
"""

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .likelihoods import make_likelihood
from .networks import ConvDecoder, mlp


class VAE(nn.Module):
    """p(z) p(x | z) as a Pyro program, with a standard normal prior over ``latent_dim`` dimensions.

    :param decoder: maps z ``(..., latent_dim)`` to the likelihood's parameters ``(..., k * P)``.
    :param likelihood: one of :mod:`pvae.models.likelihoods`.
    :param static_structure: the decoder runs the same operations on every batch of a shape (no
        branch on values), so that ``fit`` may record the objective once (:mod:`pvae.tape`); true for
        the decoders of :func:`mlp_vae` and :func:`conv_vae`.
    """

    def __init__(self, decoder: nn.Module, likelihood, latent_dim: int, static_structure: bool = False):
        super().__init__()
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self.static_structure = static_structure

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def prior(self, x: torch.Tensor) -> dist.Distribution:
        """p(z) for each datapoint of ``x``: N(0, I), batch shape ``(B,)``."""
        return dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image for each z, ``(..., P)``: what pictures show."""
        return self.likelihood.mean(self.decoder(z))


def mlp_vae(
    num_pixels: int,
    latent_dim: int = 20,
    hidden: Sequence[int] = (400,),
    likelihood="bernoulli",
    activation: str = "relu",
) -> VAE:
    """An MLP decoder ``latent_dim -> hidden... -> k * num_pixels``; ``likelihood`` is a name in
    :data:`~pvae.models.likelihoods.LIKELIHOODS` or a likelihood (``FixedGaussian(scale=0.1)``)."""
    lik = make_likelihood(likelihood)
    decoder = mlp([latent_dim, *hidden, lik.params_per_pixel * num_pixels], activation)
    return VAE(decoder, lik, latent_dim, static_structure=True)


def conv_vae(image_shape, latent_dim: int = 20, likelihood="bernoulli") -> VAE:
    """A convolutional decoder for 28x28 images."""
    lik = make_likelihood(likelihood)
    return VAE(ConvDecoder(latent_dim, image_shape, lik.params_per_pixel), lik, latent_dim, static_structure=True)
