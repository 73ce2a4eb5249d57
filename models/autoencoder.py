"""The autoencoder as a Pyro program: the VAE's decoder under a flat prior, paired with a point-mass
guide :math:`q(z \\mid x) = \\delta(z - f(x))` from an encoder network f
(:func:`pvae.guides.mlp_guide` with ``family=point_mass``).

The single-particle ELBO estimate is then exact and equals the reconstruction log-likelihood,

.. math::
    \\log p(x \\mid z) + \\log p(z) - \\log q(z \\mid x) \\big|_{z = f(x)} = \\log p(x \\mid g(f(x))),

because the flat prior (``dist.ImproperUniform``) and the point mass each contribute a log-density
of 0 at z = f(x). With the fixed-variance Gaussian likelihood
(:class:`~pvae.models.likelihoods.FixedGaussian`, scale sigma), the loss -ELBO is
:math:`\\lVert x - g(f(x)) \\rVert^2 / 2\\sigma^2 + \\frac P2 \\log 2\\pi\\sigma^2`: the squared error of the
autoencoder up to a scale and a constant; with the Bernoulli likelihood, the binary cross-entropy.
Without hidden layers, encoder and decoder are linear and the optimum of the squared error spans the
principal subspace of the data (Baldi & Hornik 1989): the **linear autoencoder** is PCA.

Nothing regularizes the codes. Pairing the point-mass guide with the VAE's N(0, I) prior instead
(``pvae train --model mlp --guide point``) adds :math:`\\log \\mathcal N(f(x); 0, I)`: a MAP
estimate of z, an L2 penalty on the codes. The flat prior is improper, so p(x) is not normalized and
a point mass has no density: :func:`pvae.evaluate.evaluate` and :func:`pvae.compare.compare_inference`
refuse these programs, and :mod:`pvae.autoencoding` measures them by their reconstructions.

References:

1. Baldi & Hornik, *Neural networks and principal component analysis: Learning from examples without
   local minima*, Neural Networks 2 (1989).
2. Vincent, Larochelle, Bengio & Manzagol, *Extracting and Composing Robust Features with Denoising
   Autoencoders*, ICML 2008 (the denoising autoencoder: :mod:`pvae.guides.corruption`).
"""

from typing import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .vae import VAE, mlp_vae


class Autoencoder(VAE):
    """p(x | z) under a flat prior over z in R^latent_dim (see the module docstring).

    :param decoder: maps z ``(..., latent_dim)`` to the likelihood's parameters ``(..., k * P)``.
    :param likelihood: one of :mod:`pvae.models.likelihoods`; a fixed variance for the MSE loss.
    """

    def prior(self, x: torch.Tensor) -> dist.Distribution:
        """The flat (improper) prior: log-density 0 everywhere, nothing to sample."""
        return dist.ImproperUniform(constraints.real, (x.shape[0],), (self.latent_dim,))


def mlp_autoencoder(
    num_pixels: int,
    latent_dim: int = 2,
    hidden: Sequence[int] = (400,),
    likelihood="gaussian-fixed",
    activation: str = "relu",
) -> Autoencoder:
    """An MLP decoder ``latent_dim -> hidden... -> k * num_pixels`` under a flat prior; ``hidden=()``
    makes it linear (the linear autoencoder, with ``mlp_guide(..., hidden=(), family=point_mass)``)."""
    vae = mlp_vae(num_pixels, latent_dim, hidden, likelihood, activation)
    return Autoencoder(vae.decoder, vae.likelihood, latent_dim)
