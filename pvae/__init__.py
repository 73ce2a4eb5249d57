"""pvae: variational inference and VAEs as Pyro programs.

Write a model as Pyro's tutorials do (its datapoints in ``pyro.plate("data", x.shape[0])``), pick a
guide (your own, or one built from the model: :mod:`pvae.guides`); :func:`fit` trains them by SVI,
:mod:`pvae.evaluate` and :mod:`pvae.compare` tell how good the inference is.
"""

import importlib
import pkgutil

from .data import Dataset, load_dataset
from .estimate import Estimate
from .inference import elbo_terms, iwae_bound, log_weights, make_elbo
from .programs import Batch, Program, ProgramError, data_plate, inspect_programs
from .run import load_run
from .train import Callback, FitConfig, FitResult, fit
from .utils import resolve_device, set_seed

__version__ = "0.1.0"

# every submodule is reached as pvae.<name> after `import pvae`, imported on first use (plots loads
# matplotlib): the modules of this folder and the two installed beside it (pyproject's package-dir)
_SUBMODULES = frozenset({m.name for m in pkgutil.iter_modules(__path__)} - {"__main__"} | {"guides", "models"})


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pvae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES)


__all__ = [
    "Batch",
    "Callback",
    "Dataset",
    "Estimate",
    "FitConfig",
    "FitResult",
    "Program",
    "ProgramError",
    "data_plate",
    "elbo_terms",
    "fit",
    "inspect_programs",
    "iwae_bound",
    "load_dataset",
    "load_run",
    "log_weights",
    "make_elbo",
    "resolve_device",
    "set_seed",
]
