"""Variational families q(z | x) as Pyro programs ``guide(x, idx=None, num_data=None)``."""

from .amortized import AmortizedGuide, conv_guide, mlp_guide

__all__ = ["AmortizedGuide", "conv_guide", "mlp_guide"]
