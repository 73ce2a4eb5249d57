"""Variational families q(z | x) as Pyro programs ``guide(x, idx=None, num_data=None)``.

Like the models, they hold their parameters as ``nn.Module`` parameters and do not call
``pyro.module`` on every step; :func:`pvae.fit` collects and optimizes them.
"""

from .amortized import AmortizedGuide, conv_guide, mlp_guide
from .mean_field import MeanFieldGuide, gaussian_guide
from .semi_amortized import SemiAmortizedGuide, refine

__all__ = [
    "AmortizedGuide",
    "MeanFieldGuide",
    "SemiAmortizedGuide",
    "conv_guide",
    "gaussian_guide",
    "mlp_guide",
    "refine",
]
