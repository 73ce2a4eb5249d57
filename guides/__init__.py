"""Variational families q(z | x) built from a model's trace, for any number of latent sites.

- :class:`AmortizedGuide`: an encoder network from x (and side inputs) to every local site's q, or
  (``family=point_mass``) to a point mass, the autoencoder's code, optionally from a corrupted x
  (:mod:`~pvae.guides.corruption`, the denoising autoencoder);
- :class:`MeanFieldGuide`: free parameters per datapoint, sparse rows updated lazily;
- :class:`SemiAmortizedGuide`: the encoder's q refined by K gradient steps per batch.

Each takes the family of q as ``family=``: the diagonal Normal per site by default, or one of the
joint families of :mod:`pvae.guides.flows` (:class:`FullCovariance`, :class:`PlanarFlow`), which
correlate all continuous local sites, or :func:`point_mass`, an autoencoder's code.

Each gives the model's global sites (outside the ``"data"`` plate) a mean-field Normal in
unconstrained space (:class:`~pvae.guides.sites.GlobalGuide`) and its discrete sites, unless the
model enumerates them, a categorical q. ``mlp_guide``, ``conv_guide`` and ``mean_field_guide``
build them for the built-in VAE's one Gaussian site without tracing a model.
"""

from .amortized import AmortizedGuide, conv_guide, mlp_guide
from .corruption import GaussianNoise, MaskingNoise, make_corruption
from .flows import JOINT, FullCovariance, FullCovarianceFamily, JointFamily, PlanarFamily, PlanarFlow
from .mean_field import MeanFieldGuide, mean_field_guide
from .semi_amortized import ParamsGuide, SemiAmortizedGuide, refine
from .sites import (SCALE_FLOOR, GlobalGuide, LatentSite, LocalFamily, gaussian_sites, inverse_softplus, model_sites,
                    point_mass)

__all__ = [
    "JOINT",
    "SCALE_FLOOR",
    "AmortizedGuide",
    "FullCovariance",
    "FullCovarianceFamily",
    "GaussianNoise",
    "GlobalGuide",
    "JointFamily",
    "LatentSite",
    "LocalFamily",
    "MaskingNoise",
    "MeanFieldGuide",
    "ParamsGuide",
    "PlanarFamily",
    "PlanarFlow",
    "SemiAmortizedGuide",
    "conv_guide",
    "gaussian_sites",
    "inverse_softplus",
    "make_corruption",
    "mean_field_guide",
    "mlp_guide",
    "model_sites",
    "point_mass",
    "refine",
]
