"""Generative models p(z) p(x | z) as Pyro programs ``model(x, idx=None, num_data=None)``."""

from .likelihoods import LIKELIHOODS, Bernoulli, ContinuousBernoulli, Gaussian, make_likelihood
from .linear_gaussian import LinearGaussian
from .vae import VAE, conv_vae, mlp_vae

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "ContinuousBernoulli",
    "Gaussian",
    "LinearGaussian",
    "VAE",
    "conv_vae",
    "make_likelihood",
    "mlp_vae",
]
