"""Autoencoders, PCA and VAEs side by side, through one interface (:class:`~pvae.protocols.Codec`:
``latent_dim``, ``encode``, ``decode``, ``reconstruct``).

- :class:`PCA`: the baseline (scikit-learn's), whose codes are the projections of the centred data on
  the top principal axes; the optimum of the linear autoencoder spans the same subspace.
- :class:`~pvae.codec.ProgramCodec`: any model with its guide, read from their traces: a VAE's code is
  the mean of q(z | x), an autoencoder's the point mass (:mod:`pvae.models.autoencoder`), decoded to
  the mean of the likelihood; :func:`fit_autoencoder` and :func:`fit_vae` return one.
- :func:`reconstruction_error`: the squared error per image, summed over its pixels, of
  ``reconstruct(x)`` (or of a corrupted x's reconstruction, for denoising) against the clean x;
  :func:`reconstruction_errors` fits PCA, an autoencoder and a VAE at several latent sizes and
  measures each, and :func:`denoising_errors` an autoencoder against denoising ones.
- Sampling an autoencoder's code space: :func:`perturbed_codes` (a datapoint's code plus
  N(0, s^2 I) noise) and :class:`CodeGaussian` (the diagonal Gaussian
  :math:`q(z) = \\mathcal N(\\hat\\mu, \\hat\\Sigma)` fitted to the training codes) with
  :func:`sample_code_space`: codes and the images they decode to.

An autoencoder's point-mass q has no density and its flat prior no normalized p(x): it is measured
here by its reconstructions, not by :func:`pvae.evaluate.evaluate`, which refuses it.

References:

1. Baldi & Hornik, *Neural networks and principal component analysis: Learning from examples without
   local minima*, Neural Networks 2 (1989).
2. Vincent, Larochelle, Bengio & Manzagol, *Extracting and Composing Robust Features with Denoising
   Autoencoders*, ICML 2008.
3. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
"""

from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .data import Dataset
from .estimate import Estimate
from .codec import ProgramCodec
from .protocols import Codec
from .train import FitConfig, fit
from .utils import set_seed

# ----------------------------------------------------------------------------- the coders


class PCA:
    """Principal component analysis by scikit-learn, as a :class:`~pvae.protocols.Codec`:
    ``encode(x) = (x - mean) U``, ``decode(z) = z U^T + mean`` with U the top ``latent_dim`` principal
    axes of the data it was fitted to. Its reconstruction error on those data is the variance they
    keep outside the axes, the least any rank-``latent_dim`` linear map achieves."""

    def __init__(self, latent_dim: int):
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
        self.latent_dim = latent_dim
        self.components = None  # (latent_dim, P), orthonormal rows
        self.mean = None  # (P,)

    def fit(self, x: torch.Tensor) -> "PCA":
        from sklearn.decomposition import PCA as SklearnPCA

        flat = x.reshape(x.shape[0], -1)
        if not self.latent_dim <= min(flat.shape):
            raise ValueError(f"PCA: latent_dim {self.latent_dim} exceeds what {flat.shape[0]} datapoints of "
                             f"{flat.shape[1]} dimensions allow ({min(flat.shape)})")
        pca = SklearnPCA(n_components=self.latent_dim, svd_solver="full").fit(flat.detach().cpu().double().numpy())
        self.components = torch.as_tensor(pca.components_, dtype=x.dtype, device=x.device)
        self.mean = torch.as_tensor(pca.mean_, dtype=x.dtype, device=x.device)
        return self

    def _check_fitted(self) -> None:
        if self.components is None:
            raise ValueError("PCA: fit it to data first, PCA(d).fit(x)")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return (x.reshape(x.shape[0], -1) - self.mean) @ self.components.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return z @ self.components + self.mean

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ----------------------------------------------------------------------------- reconstruction errors


@torch.no_grad()
def reconstruction_error(coder: Codec, x: torch.Tensor, corruption: Optional[Callable] = None,
                         generator: Optional[torch.Generator] = None) -> Estimate:
    """The squared error per image, :math:`\\lVert x - h(\\tilde x) \\rVert^2` summed over its pixels, mean
    over the datapoints ``x`` with its standard error; :math:`\\tilde x` is ``corruption(x, generator)``
    (a denoising test) or x itself."""
    flat = x.reshape(x.shape[0], -1)
    seen = flat if corruption is None else corruption(flat, generator)
    return Estimate.of(((coder.reconstruct(seen) - flat) ** 2).sum(-1))


@dataclass
class CoderConfig:
    """How :func:`reconstruction_errors` and :func:`denoising_errors` fit their autoencoders and VAEs:
    MLPs with the fixed-variance Gaussian likelihood, whose log-density is the squared error up to a
    scale and a constant (:class:`~pvae.models.likelihoods.FixedGaussian`)."""

    hidden: tuple = (200,)  # hidden widths of encoder and decoder
    scale: float = 0.1  # sigma of the Gaussian pixels: the VAE's KL weighs 2 sigma^2 per unit squared error
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    progress: bool = False

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                         eval_every=0, progress=self.progress)


def fit_autoencoder(data: Dataset, latent_dim: int, config: Optional[CoderConfig] = None,
                    corruption: Optional[Callable] = None) -> ProgramCodec:
    """An MLP autoencoder (flat prior, point-mass encoder) fitted to ``data``'s training split; with a
    ``corruption``, a denoising one."""
    from pvae.guides import mlp_guide, point_mass
    from pvae.models import FixedGaussian, mlp_autoencoder

    config = config or CoderConfig()
    set_seed(config.seed)  # the initial weights: torch seeds itself differently in every process
    model = mlp_autoencoder(data.num_pixels, latent_dim, config.hidden, FixedGaussian(config.scale))
    guide = mlp_guide(data.num_pixels, latent_dim, config.hidden, family=point_mass, corruption=corruption)
    return _fitted(model, guide, data, config)


def fit_vae(data: Dataset, latent_dim: int, config: Optional[CoderConfig] = None) -> ProgramCodec:
    """An MLP VAE (N(0, I) prior, Gaussian encoder) fitted to ``data``'s training split."""
    from pvae.guides import mlp_guide
    from pvae.models import FixedGaussian, mlp_vae

    config = config or CoderConfig()
    set_seed(config.seed)  # the initial weights
    model = mlp_vae(data.num_pixels, latent_dim, config.hidden, FixedGaussian(config.scale))
    return _fitted(model, mlp_guide(data.num_pixels, latent_dim, config.hidden), data, config)


CONTEXT_ROWS = 64  # training rows a fitted coder traces its programs on (side inputs, the shape of x)


def _fitted(model, guide, data: Dataset, config: CoderConfig) -> ProgramCodec:
    fit(model, guide, data, config.fit_config())
    return ProgramCodec(model, guide, data.batch("train", slice(0, CONTEXT_ROWS)))


@dataclass
class ReconstructionErrors:
    """What :func:`reconstruction_errors` measured: ``errors[method][latent_dim]``, the squared error per
    image of the ``split``'s datapoints, and the fitted ``coders`` by the same keys."""

    errors: dict
    coders: dict = field(default_factory=dict, repr=False)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"errors": {m: {str(d): asdict(e) for d, e in by_dim.items()} for m, by_dim in self.errors.items()},
                "settings": self.settings}


def reconstruction_errors(data: Dataset, latent_dims: Sequence[int] = (2, 8, 32), config: Optional[CoderConfig] = None,
                          split: str = "test") -> ReconstructionErrors:
    """PCA, an autoencoder and a VAE at each latent size, fitted to the training split, and the squared
    error per image of their reconstructions of ``split`` (:func:`reconstruction_error`)."""
    config = config or CoderConfig()
    x, _ = data.split(split)
    if x.shape[0] == 0:
        raise ValueError(f"the {split} split of {data.name} is empty")
    builders = {
        "pca": lambda d: PCA(d).fit(data.train),
        "ae": lambda d: fit_autoencoder(data, d, config),
        "vae": lambda d: fit_vae(data, d, config),
    }
    errors, coders = {m: {} for m in builders}, {m: {} for m in builders}
    for d in latent_dims:
        for method, build in builders.items():
            coders[method][d] = build(d)
            errors[method][d] = reconstruction_error(coders[method][d], x)
    settings = {**asdict(config), "data": data.name, "split": split, "datapoints": x.shape[0]}
    return ReconstructionErrors(errors, coders, settings)


@dataclass
class DenoisingErrors:
    """What :func:`denoising_errors` measured: ``errors[label]``, ``{"ae": Estimate, "dae": Estimate}``
    for each corruption, and the fitted ``coders``: ``"ae"``, the plain autoencoder, and each
    corruption's label, its denoising autoencoder."""

    errors: dict
    coders: dict = field(default_factory=dict, repr=False)


def denoising_errors(data: Dataset, corruptions: dict, latent_dim: int = 8, config: Optional[CoderConfig] = None,
                     split: str = "test") -> DenoisingErrors:
    """For each ``{label: corruption}``: the squared error per image with which a plain autoencoder and a
    denoising one, trained with that corruption, restore the clean ``split`` images from corrupted ones.
    The corrupted images are the same draws for both (a generator seeded by ``config.seed + i`` for the
    i-th corruption)."""
    config = config or CoderConfig()
    x, _ = data.split(split)
    plain = fit_autoencoder(data, latent_dim, config)
    errors, coders = {}, {"ae": plain}
    for i, (label, corruption) in enumerate(corruptions.items()):
        coders[label] = denoising = fit_autoencoder(data, latent_dim, config, corruption)
        errors[label] = {
            name: reconstruction_error(coder, x, corruption, torch.Generator(x.device).manual_seed(config.seed + i))
            for name, coder in (("ae", plain), ("dae", denoising))
        }
    return DenoisingErrors(errors, coders)


# ----------------------------------------------------------------------------- sampling a code space


class Decoded(NamedTuple):
    """Codes ``(N, D)`` and the images they decode to ``(N, P)``."""

    codes: torch.Tensor
    images: torch.Tensor


@torch.no_grad()
def perturbed_codes(coder: Codec, x: torch.Tensor, scale: float,
                    generator: Optional[torch.Generator] = None) -> Decoded:
    """The codes of ``x`` plus N(0, ``scale``^2 I) noise, and their images: how far from its data an
    autoencoder's decoder still draws digits."""
    codes = coder.encode(x)
    codes = codes + scale * torch.randn(codes.shape, generator=generator, device=codes.device, dtype=codes.dtype)
    return Decoded(codes, coder.decode(codes))


@dataclass
class CodeGaussian:
    """A diagonal Gaussian over a code space, :math:`q(z) = \\mathcal N(\\hat\\mu, \\mathrm{diag}\\,\\hat\\sigma^2)`,
    fitted by maximum likelihood to codes: the simplest density model of an autoencoder's codes."""

    loc: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,)

    @classmethod
    def fit(cls, codes: torch.Tensor) -> "CodeGaussian":
        if codes.shape[0] < 2:
            raise ValueError(f"fitting a Gaussian needs at least 2 codes, got {codes.shape[0]}")
        return cls(codes.mean(0), codes.std(0, correction=0))

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        eps = torch.randn((n, *self.loc.shape), generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + self.scale * eps


@torch.no_grad()
def sample_code_space(coder: Codec, x: torch.Tensor, n: int,
                      generator: Optional[torch.Generator] = None) -> Decoded:
    """``n`` codes drawn from the :class:`CodeGaussian` fitted to the codes of ``x`` (the training data),
    and their images."""
    codes = CodeGaussian.fit(coder.encode(x)).sample(n, generator)
    return Decoded(codes, coder.decode(codes))
