"""Generative models p(z) p(x | z) as Pyro programs ``model(x)`` (the VAE, the autoencoder under a
flat prior, the linear-Gaussian models), written as Pyro's tutorials write them: the datapoints in
``pyro.plate("data", x.shape[0])``, which pvae scales to the data set.

Their parameters are ``nn.Module`` parameters, trained as Pyro's ``elbo(model, guide)`` module idiom
trains them (:func:`pvae.fit` collects them): the programs do not call ``pyro.module`` on every
step. To train one with ``pyro.infer.SVI`` and a ``pyro.optim`` optimizer instead, call
``pyro.module("decoder", model)`` in a program that wraps it.
"""

from .autoencoder import Autoencoder, mlp_autoencoder
from .likelihoods import LIKELIHOODS, Bernoulli, ContinuousBernoulli, FixedGaussian, Gaussian, make_likelihood
from .linear_gaussian import LinearGaussian, LinearGaussianHierarchy
from .two_layer import BottomUpEncoder, TwoLayerVAE, two_layer_vae
from .vae import VAE, conv_vae, mlp_vae

__all__ = [
    "LIKELIHOODS",
    "Autoencoder",
    "Bernoulli",
    "BottomUpEncoder",
    "ContinuousBernoulli",
    "FixedGaussian",
    "Gaussian",
    "LinearGaussian",
    "LinearGaussianHierarchy",
    "TwoLayerVAE",
    "VAE",
    "conv_vae",
    "make_likelihood",
    "mlp_autoencoder",
    "mlp_vae",
    "two_layer_vae",
]
