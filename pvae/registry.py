"""The one place where command-line names become objects: a run's :class:`RunConfig` builds its data,
model and guide; everything else in pvae takes objects.

Models are a name in :data:`MODELS` or a factory of your own, ``"module:function"`` or
``"path/to/file.py:function"``: ``function(data)`` returns a Pyro model, or a ``(model, guide)`` pair.
Guides are a family in :data:`GUIDES`, built from whichever model by tracing it (:mod:`pvae.guides`).
"""

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .data import Dataset, load_dataset
from .train import FitConfig


@dataclass
class RunConfig:
    """A run of ``pvae train``: data, architecture and fitting; saved in its run folder."""

    dataset: Optional[str] = "digits"  # a name in pvae.data.DATASETS, or a folder of IDX files
    data_dir: Optional[str] = None  # where the data set's files are (or are downloaded to)
    binarize: str = "dynamic"  # none, static, dynamic or threshold
    val_size: Optional[int] = None  # training images held out for validation; None: the default
    seed_data: int = 0  # seeds the static binarization and the split of sets with no test set
    labels_as: Optional[str] = None  # also pass the labels to the programs as this side input
    model: Optional[str] = "mlp"  # a name in MODELS, or a factory "module:function" / "file.py:function"
    guide: Optional[str] = "amortized"  # a name in GUIDES; None: the guide the model's factory returns
    likelihood: str = "bernoulli"  # bernoulli, continuous-bernoulli or gaussian
    latent_dim: int = 2
    hidden: tuple = (400,)  # hidden layer widths of the MLP encoder and decoder
    activation: str = "relu"
    refine_steps: int = 5  # semi-amortized guide: gradient steps refining the encoder's q per batch
    refine_lr: float = 1e-2  # semi-amortized guide: the size of those steps
    masking: float = 0.0  # denoising: probability that each input value of the encoder is zeroed in training
    input_noise: float = 0.0  # denoising: sigma of the Gaussian noise added to the encoder's input in training
    device: str = "auto"  # "auto": CUDA when available, else CPU
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self):
        if isinstance(self.fit, dict):
            self.fit = FitConfig(**self.fit)
        self.hidden = tuple(self.hidden)
        if self.model is not None and self.model not in MODELS and ":" not in self.model:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}, or a factory "
                             "'module:function'")
        if self.guide is not None and self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}: choose one of {', '.join(GUIDES)}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if self.refine_steps < 0 or not self.refine_lr > 0:
            raise ValueError(f"refine_steps must be >= 0 and refine_lr > 0, got {self.refine_steps}, {self.refine_lr}")
        self.corruption()  # refuses bad values now

    def corruption(self):
        """The encoder's input corruption of a denoising run (:mod:`pvae.guides.corruption`), or None."""
        from pvae.guides import make_corruption

        return make_corruption(self.masking, self.input_noise)

    def to_dict(self) -> dict:
        """Everything but the fit config, which the run folder keeps beside it."""
        d = asdict(self)
        del d["fit"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        aliases = {"seed": "seed_data"}  # a Dataset's source names its seed "seed"
        return cls(**{aliases.get(k, k): v for k, v in d.items() if aliases.get(k, k) in known})


# ----------------------------------------------------------------------------- models


def _mlp_model(cfg: RunConfig, data: Dataset):
    from pvae.models import mlp_vae

    return mlp_vae(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.likelihood, cfg.activation)


def _conv_model(cfg: RunConfig, data: Dataset):
    from pvae.models import conv_vae

    return conv_vae(data.image_shape, cfg.latent_dim, cfg.likelihood)


def _ae_model(cfg: RunConfig, data: Dataset):
    from pvae.models import mlp_autoencoder

    return mlp_autoencoder(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.likelihood, cfg.activation)


MODELS = {
    "mlp": _mlp_model,  # the VAE with MLP decoder (Kingma & Welling 2013)
    "conv": _conv_model,  # the VAE with a convolutional decoder, 28x28 images
    "ae": _ae_model,  # the autoencoder: an MLP decoder under a flat prior; no hidden layers: linear
}


def factory_spec(factory) -> str:
    """``"module:function"`` (or ``"file.py:function"`` for a script's function) of a factory."""
    if isinstance(factory, str):
        load_factory(factory)  # fails now, with the reason, rather than when the run is read back
        return factory
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", "")
    if not callable(factory) or not module or "<" in name:
        raise ValueError(f"factory must be a module-level function, or its 'module:function', not {factory!r}")
    if module == "__main__" or module not in sys.modules or not _importable(module):
        path = inspect.getsourcefile(factory)
        return f"{Path(path).resolve()}:{name}"
    return f"{module}:{name}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def load_factory(spec: str) -> Callable:
    """The function a factory spec names."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"a factory is 'module:function' or 'path/to/file.py:function', not {spec!r}")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"factory file {path} not found")
            module_spec = importlib.util.spec_from_file_location(f"pvae_factory_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ValueError(f"cannot import the factory's module {where!r}: {e}") from e
    target = module
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"{where} has no {name!r} (factory {spec!r})")
    return target


# ----------------------------------------------------------------------------- guides


def integer_classes(data: Dataset) -> dict:
    """``{side input: K}`` for every integer side input: one more than its largest value."""
    classes = {}
    for split_inputs in data.inputs.values():
        for name, value in split_inputs.items():
            if not value.is_floating_point() and value.numel():
                classes[name] = max(classes.get(name, 0), int(value.max()) + 1)
    return classes


def _amortized_guide(cfg: RunConfig, data: Dataset, model, point: bool = False):
    from pvae.guides import AmortizedGuide, conv_guide, mlp_guide

    corruption = cfg.corruption()
    if cfg.model == "conv":
        return conv_guide(data.image_shape, cfg.latent_dim, point=point, corruption=corruption)
    if cfg.model in ("mlp", "ae") and not data.split_inputs("train"):
        return mlp_guide(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.activation, point=point, corruption=corruption)
    return AmortizedGuide(model, hidden=cfg.hidden, activation=cfg.activation, classes=integer_classes(data),
                          point=point, corruption=corruption)


def _point_guide(cfg: RunConfig, data: Dataset, model):
    return _amortized_guide(cfg, data, model, point=True)


def _mean_field_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import MeanFieldGuide

    if cfg.corruption() is not None:
        raise ValueError("--masking and --input-noise corrupt an encoder's input, and the mean-field guide has no "
                         "encoder: use the amortized or point guide")
    return MeanFieldGuide(model, num_data=data.train.shape[0])


def _semi_amortized_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import SemiAmortizedGuide

    return SemiAmortizedGuide(_amortized_guide(cfg, data, model), model, cfg.refine_steps, cfg.refine_lr)


GUIDES = {
    "amortized": _amortized_guide,  # an encoder network q(z | x) for every local site
    "mean-field": _mean_field_guide,  # free parameters per training datapoint: variational EM
    "semi-amortized": _semi_amortized_guide,  # the encoder's q refined by refine_steps gradient steps
    "point": _point_guide,  # a point mass at an encoder's output, z = f(x): the autoencoder's code
}
# the guide of a model whose runs name none on the command line
DEFAULT_GUIDES = {"ae": "point"}


def load_data(cfg: RunConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.binarize, cfg.val_size, seed=cfg.seed_data,
                        labels_as=cfg.labels_as)


def build(cfg: RunConfig, data: Dataset) -> tuple:
    """``(model, guide)`` for a run config and its data."""
    if cfg.model in MODELS:
        model, guide = MODELS[cfg.model](cfg, data), None
    else:
        made = load_factory(cfg.model)(data)
        model, guide = made if isinstance(made, tuple) else (made, None)
    if cfg.guide is not None or guide is None:
        guide = GUIDES[cfg.guide or "amortized"](cfg, data, model)
    return model, guide

