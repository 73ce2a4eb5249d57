"""The one place where command-line names become objects: a run's :class:`RunConfig` builds its data,
model and guide; everything else in pvae takes objects.

Models are a name in :data:`MODELS` or a factory of your own, ``"module:function"`` or
``"path/to/file.py:function"``: ``function(data)`` returns a Pyro model, or a ``(model, guide)`` pair.
Guides are a family in :data:`GUIDES`, built from whichever model by tracing it (:mod:`pvae.guides`).
"""

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pvae.models.likelihoods import LIKELIHOODS
from pvae.models.networks import ACTIVATIONS

from .data import BINARIZE, Dataset, default_binarize, load_dataset
from .errors import ConfigError
from .train import FitConfig
from .utils import dataclass_from_dict


SAVED_HIDDEN = (400,)  # the widths of a saved config that records none: AmortizedGuide's default


@dataclass
class RunConfig:
    """A run of ``pvae train``: data, architecture and fitting; saved in its run folder."""

    dataset: Optional[str] = "digits"  # a name in pvae.data.DATASETS, or a folder of IDX files
    data_dir: Optional[str] = None  # where the data set's files are (or are downloaded to)
    binarize: Optional[str] = None  # none, static, dynamic or threshold; None: the data set's (none for digits, else dynamic)
    val_size: Optional[int] = None  # training images held out for validation; None: the default
    seed_data: int = 0  # seeds the static binarization and the split of sets with no test set
    labels_as: Optional[str] = None  # also pass the labels to the programs as this side input
    model: Optional[str] = "mlp"  # a name in MODELS, or a factory "module:function" / "file.py:function"
    guide: Optional[str] = "amortized"  # a name in GUIDES; None: the guide the model's factory returns
    # bernoulli, continuous-bernoulli, gaussian or gaussian-fixed; None: bernoulli for binarized data, else the
    # continuous Bernoulli, a density on [0, 1] for grey levels (Loaiza-Ganem & Cunningham 2019)
    likelihood: Optional[str] = None
    latent_dim: int = 2
    hidden: tuple[int, ...] = (256, 256)  # hidden layer widths of the MLP encoder and decoder
    activation: str = "relu"
    latent_dims: tuple = (100, 50)  # two-layer model: the sizes of z1 and z2 (Burda et al.)
    layer_hidden: tuple = (200, 100)  # two-layer model: widths H1 (z1 -> H1 -> H1 -> x), H2 (z2 -> H2 -> H2 -> z1)
    flow_steps: int = 4  # planar guide: planar maps after the Gaussian
    refine_steps: int = 5  # semi-amortized guide: gradient steps refining the encoder's q per batch
    refine_lr: float = 0.05  # semi-amortized guide: the size of those natural-gradient steps (guides.semi_amortized)
    masking: float = 0.0  # denoising: probability that each input value of the encoder is zeroed in training
    input_noise: float = 0.0  # denoising: sigma of the Gaussian noise added to the encoder's input in training
    device: str = "auto"  # "auto": CUDA when available, else CPU
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self):
        if isinstance(self.fit, dict):
            self.fit = FitConfig.from_dict(self.fit)
        self.hidden = tuple(self.hidden)
        self.latent_dims, self.layer_hidden = tuple(self.latent_dims), tuple(self.layer_hidden)
        if len(self.latent_dims) != 2 or len(self.layer_hidden) != 2 or min(*self.latent_dims, *self.layer_hidden) < 1:
            raise ValueError(f"latent_dims and layer_hidden are two positive sizes each, got {self.latent_dims}, "
                             f"{self.layer_hidden}")
        if self.binarize is None:
            self.binarize = default_binarize(self.dataset)
        if self.likelihood is None:
            self.likelihood = "continuous-bernoulli" if self.binarize == "none" else "bernoulli"
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps must be at least 1, got {self.flow_steps}")
        if self.model is not None and self.model not in MODELS and ":" not in self.model:
            raise ConfigError("model", f"{self.model!r} is unknown: choose one of {', '.join(MODELS)}, or a factory "
                              "'module:function'")
        if self.guide is not None and self.guide not in GUIDES:
            raise ConfigError("guide", f"{self.guide!r} is unknown: choose one of {', '.join(GUIDES)}")
        for name, choices in (("binarize", BINARIZE), ("likelihood", LIKELIHOODS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"{getattr(self, name)!r} is unknown: choose one of {', '.join(choices)}")
        if self.latent_dim < 1:
            raise ConfigError("latent_dim", f"must be at least 1, got {self.latent_dim}")
        if any(width < 1 for width in self.hidden):
            raise ConfigError("hidden", f"widths must be at least 1, got {' '.join(map(str, self.hidden))}")
        if self.val_size is not None and self.val_size < 0:
            raise ConfigError("val_size", f"must be >= 0, got {self.val_size}")
        if self.refine_steps < 0:
            raise ConfigError("refine_steps", f"must be >= 0, got {self.refine_steps}")
        if not 0 < self.refine_lr < math.inf:
            raise ConfigError("refine_lr", f"must be positive and finite, got {self.refine_lr}")
        if not 0 <= self.masking < 1:
            raise ConfigError("masking", f"is a probability in [0, 1), got {self.masking}")
        if not 0 <= self.input_noise < math.inf:
            raise ConfigError("input_noise", f"must be >= 0 and finite, got {self.input_noise}")

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
    def from_dict(cls, d: dict, where: Optional[str] = None) -> "RunConfig":
        """A saved run's config, checked: an unknown key, a wrong type or a bad value is refused by name
        (and file, ``where``)."""
        if not isinstance(d, dict):
            raise ConfigError("run", "must be a JSON object of settings", where)
        aliases = {"seed": "seed_data"}  # a Dataset's source names its seed "seed"
        # a config without hidden widths is a Python fit's (or predates the demo's defaults): its amortized
        # guide had AmortizedGuide's own default widths
        d = {"hidden": SAVED_HIDDEN, **d}
        return dataclass_from_dict(cls, {aliases.get(k, k): v for k, v in d.items()}, where, "run")


# ----------------------------------------------------------------------------- models


def _mlp_model(cfg: RunConfig, data: Dataset):
    from pvae.models import mlp_vae

    return mlp_vae(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.likelihood, cfg.activation)


def _conv_model(cfg: RunConfig, data: Dataset):
    from pvae.models import conv_vae

    return conv_vae(data.image_shape, cfg.latent_dim, cfg.likelihood)


def _two_layer_model(cfg: RunConfig, data: Dataset):
    from pvae.models import two_layer_vae

    return two_layer_vae(data.num_pixels, cfg.latent_dims, cfg.layer_hidden, cfg.likelihood, cfg.activation)


def _ae_model(cfg: RunConfig, data: Dataset):
    from pvae.models import mlp_autoencoder

    return mlp_autoencoder(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.likelihood, cfg.activation)


MODELS = {
    "mlp": _mlp_model,  # the VAE with MLP decoder (Kingma & Welling 2013)
    "conv": _conv_model,  # the VAE with a convolutional decoder, 28x28 images
    "two-layer": _two_layer_model,  # two stochastic layers z2 -> z1 -> x (Burda et al. 2015)
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


def _amortized_guide(cfg: RunConfig, data: Dataset, model, family=None):
    from pvae.guides import AmortizedGuide, LocalFamily, conv_guide, mlp_guide
    from pvae.models import BottomUpEncoder

    family, corruption = family or LocalFamily, cfg.corruption()
    if cfg.model == "conv":
        return conv_guide(data.image_shape, cfg.latent_dim, family=family, corruption=corruption)
    if cfg.model in ("mlp", "ae") and not data.split_inputs("train"):
        return mlp_guide(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.activation, family=family,
                         corruption=corruption)
    if cfg.model == "two-layer":
        body = BottomUpEncoder(data.num_pixels, cfg.layer_hidden, cfg.activation)
        return AmortizedGuide(model, body=body, inputs=(), family=family, corruption=corruption)
    return AmortizedGuide(model, hidden=cfg.hidden, activation=cfg.activation, classes=integer_classes(data),
                          family=family, corruption=corruption)


def _full_covariance_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import FullCovariance

    return _amortized_guide(cfg, data, model, FullCovariance())


def _planar_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import PlanarFlow

    return _amortized_guide(cfg, data, model, PlanarFlow(cfg.flow_steps))


def _point_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import point_mass

    return _amortized_guide(cfg, data, model, point_mass)


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
    "full-covariance": _full_covariance_guide,  # the encoder's q a Gaussian over all local sites jointly
    "planar": _planar_guide,  # the encoder's Gaussian followed by flow_steps planar flows (per datapoint)
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

