"""pvae: variational inference and VAEs as Pyro programs.

Write a ``model(x, idx=None, num_data=None)`` and a ``guide`` with the same signature, both opening
:func:`data_plate`; :func:`fit` trains them by SVI; :mod:`pvae.inference` evaluates them.
"""

from .data import Dataset, load_dataset
from .inference import elbo_terms, iwae_bound, log_weights, make_elbo
from .plate import data_plate
from .train import FitConfig, FitResult, fit
from .utils import resolve_device, set_seed

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "FitConfig",
    "FitResult",
    "data_plate",
    "elbo_terms",
    "fit",
    "iwae_bound",
    "load_dataset",
    "log_weights",
    "make_elbo",
    "resolve_device",
    "set_seed",
]
