"""The one place where command-line names become objects: a run's :class:`RunConfig` builds its data,
model and guide; everything else in pvae takes objects."""

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .checkpoint import load_checkpoint
from .data import Dataset, load_dataset
from .train import FitConfig


@dataclass
class RunConfig:
    """A run of ``pvae train``: data, architecture and fitting; saved in its checkpoint."""

    dataset: str = "digits"  # a name in pvae.data.DATASETS, or a folder of IDX files
    data_dir: Optional[str] = None  # where the data set's files are (or are downloaded to)
    binarize: str = "dynamic"  # none, static, dynamic or threshold
    val_size: Optional[int] = None  # training images held out for validation; None: the default
    model: str = "mlp"  # a name in MODELS
    guide: str = "amortized"  # a name in GUIDES
    likelihood: str = "bernoulli"  # bernoulli, continuous-bernoulli or gaussian
    latent_dim: int = 2
    hidden: tuple = (400,)  # hidden layer widths of the MLP encoder and decoder
    activation: str = "relu"
    refine_steps: int = 5  # semi-amortized guide: gradient steps refining the encoder's q per batch
    refine_lr: float = 1e-2  # semi-amortized guide: the size of those steps
    device: str = "auto"  # "auto": CUDA when available, else CPU
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self):
        if isinstance(self.fit, dict):
            self.fit = FitConfig(**self.fit)
        self.hidden = tuple(self.hidden)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}: choose one of {', '.join(GUIDES)}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if self.refine_steps < 0 or not self.refine_lr > 0:
            raise ValueError(f"refine_steps must be >= 0 and refine_lr > 0, got {self.refine_steps}, {self.refine_lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _mlp_model(cfg: RunConfig, data: Dataset):
    from pvae.models import mlp_vae

    return mlp_vae(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.likelihood, cfg.activation)


def _conv_model(cfg: RunConfig, data: Dataset):
    from pvae.models import conv_vae

    return conv_vae(data.image_shape, cfg.latent_dim, cfg.likelihood)


def _amortized_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import conv_guide, mlp_guide

    if cfg.model == "conv":
        return conv_guide(data.image_shape, cfg.latent_dim)
    return mlp_guide(data.num_pixels, cfg.latent_dim, cfg.hidden, cfg.activation)


def _mean_field_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import MeanFieldGuide

    return MeanFieldGuide(data.train.shape[0], cfg.latent_dim)


def _semi_amortized_guide(cfg: RunConfig, data: Dataset, model):
    from pvae.guides import SemiAmortizedGuide

    return SemiAmortizedGuide(_amortized_guide(cfg, data, model), model, cfg.refine_steps, cfg.refine_lr)


MODELS = {"mlp": _mlp_model, "conv": _conv_model}
GUIDES = {
    "amortized": _amortized_guide,  # an encoder network q(z | x)
    "mean-field": _mean_field_guide,  # free (loc, scale) per training datapoint: variational EM
    "semi-amortized": _semi_amortized_guide,  # the encoder's q refined by refine_steps gradient steps
}


def load_data(cfg: RunConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.binarize, cfg.val_size)


def build(cfg: RunConfig, data: Dataset) -> tuple:
    """``(model, guide)`` for a run config and its data."""
    model = MODELS[cfg.model](cfg, data)
    guide = GUIDES[cfg.guide](cfg, data, model)
    return model, guide


@dataclass
class Run:
    """A trained run read back from its folder."""

    path: Path
    config: RunConfig
    data: Dataset
    model: object
    guide: object
    checkpoint: dict


def load_run(run_dir, device=None) -> Run:
    """Rebuild a run's data, model and guide from ``run_dir/checkpoint.pt`` and load their weights."""
    import torch

    state = load_checkpoint(run_dir, map_location="cpu")
    if state["config"].get("run") is None:
        raise ValueError(f"{run_dir} was not made by `pvae train`: its checkpoint names no model to rebuild")
    cfg = RunConfig.from_dict(state["config"]["run"])
    data = load_data(cfg)
    model, guide = build(cfg, data)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device).eval()
    guide.to(device).eval()
    return Run(Path(run_dir), cfg, data.to(device), model, guide, state)
