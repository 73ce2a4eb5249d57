"""Variational families q(z | x) built from a model's trace, for any number of latent sites.

- :class:`AmortizedGuide`: an encoder network from x (and side inputs) to every local site's q;
- :class:`MeanFieldGuide`: free parameters per datapoint, sparse rows updated lazily;
- :class:`SemiAmortizedGuide`: the encoder's q refined by K gradient steps per batch.

Each takes the family of q as ``family=``: the diagonal Normal per site by default, or one of the
joint families of :mod:`pvae.guides.flows` (:class:`FullCovariance`, :class:`PlanarFlow`), which
correlate all continuous local sites.

Each gives the model's global sites (outside the ``"data"`` plate) a mean-field Normal in
unconstrained space (:class:`~pvae.guides.sites.GlobalGuide`) and its discrete sites, unless the
model enumerates them, a categorical q. ``mlp_guide``, ``conv_guide`` and ``mean_field_guide``
build them for the built-in VAE's one Gaussian site without tracing a model.
"""

from .amortized import AmortizedGuide, conv_guide, mlp_guide
from .flows import JOINT, FullCovariance, FullCovarianceFamily, JointFamily, PlanarFamily, PlanarFlow
from .mean_field import MeanFieldGuide, mean_field_guide
from .semi_amortized import ParamsGuide, SemiAmortizedGuide, refine
from .sites import SCALE_FLOOR, GlobalGuide, LatentSite, LocalFamily, gaussian_sites, inverse_softplus, model_sites

__all__ = [
    "JOINT",
    "SCALE_FLOOR",
    "AmortizedGuide",
    "FullCovariance",
    "FullCovarianceFamily",
    "GlobalGuide",
    "JointFamily",
    "LatentSite",
    "LocalFamily",
    "MeanFieldGuide",
    "ParamsGuide",
    "PlanarFamily",
    "PlanarFlow",
    "SemiAmortizedGuide",
    "conv_guide",
    "gaussian_sites",
    "inverse_softplus",
    "mean_field_guide",
    "mlp_guide",
    "model_sites",
    "refine",
]
