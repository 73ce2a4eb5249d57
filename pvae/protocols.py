"""What fitting, evaluation and the gap study rely on a guide to offer, declared once.

pvae's own guides implement these; a guide of your own may too, and gets what each one enables.
"""

from typing import Optional, Protocol, runtime_checkable

import torch

from .programs import Batch


@runtime_checkable
class LocalEncoder(Protocol):
    """A guide whose q(z | x) is a :class:`~pvae.guides.LocalFamily` with parameters the gap study can
    read for any batch: it starts q* there and refines it into q_K."""

    family: object

    def local_params(self, batch: Batch) -> dict: ...


@runtime_checkable
class PerDatapoint(Protocol):
    """A guide with free parameters for the rows of one split only (``split``, ``num_data``): it has no
    q for held-out data, and is evaluated on its own split."""

    num_data: Optional[int]
    split: str
    table: object


@runtime_checkable
class ShardedRows(Protocol):
    """A per-datapoint guide that a data-parallel fit can spread over its ranks: ``hold_rows(shard)``
    keeps the rows of the datapoints one rank owns (see :class:`~pvae.distributed.Shard`);
    ``row_tables()`` are the tensors whose rows are datapoints, which checkpoints gather whole."""

    def hold_rows(self, shard) -> None: ...

    def row_tables(self) -> list: ...


@runtime_checkable
class Refining(Protocol):
    """A guide that refines an encoder's q (semi-amortized): the study measures its ``encoder``."""

    encoder: object

    def refined_params(self, batch: Batch, steps: Optional[int] = None, lr: Optional[float] = None) -> dict: ...


@runtime_checkable
class AuxiliaryObjective(Protocol):
    """A guide with parameters the ELBO does not reach (a semi-amortized guide's encoder): ``fit`` adds
    ``auxiliary_loss(elbo, model, batch)`` to each step's loss (not to the recorded ``train_loss``)."""

    def auxiliary_loss(self, elbo, model, batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class GlobalMeans(Protocol):
    """A guide that can say where its global sites' q is centred: evaluation conditions on it."""

    def global_means(self) -> dict: ...


@runtime_checkable
class EpochMetrics(Protocol):
    """A training objective that measures something of the fit once an epoch (the beta-TCVAE: mutual
    information, total correlation, dimension-wise KL): ``fit`` records ``epoch_metrics(model, guide,
    batch)`` on its training rows as ``train_<name>``."""

    def epoch_metrics(self, model, guide, batch: Batch) -> dict: ...


@runtime_checkable
class StaticProgram(Protocol):
    """A program that runs the same tensor operations, in the same order, on every batch of a given
    shape: no Python branch on tensor values, no Python randomness, no state that changes between
    steps. ``static_structure`` says whether it does (pvae's own models and guides set it); ``fit``
    then records its objective once and replays it (:mod:`pvae.tape`)."""

    static_structure: bool


def is_static(program) -> bool:
    """Whether ``program`` (a :class:`~pvae.programs.Program`, a function, a module or a bound method of
    one) declares :class:`StaticProgram`."""
    fn = getattr(program, "fn", program)
    owner = getattr(fn, "__self__", None)  # a bound method (vae.model): its object's declaration
    return any(isinstance(o, StaticProgram) and bool(o.static_structure) for o in (fn, owner) if o is not None)


def has_q_for(guide, split: Optional[str]) -> bool:
    """Whether ``guide`` has a q for the datapoints of ``split``."""
    return not isinstance(guide, PerDatapoint) or split in (None, guide.split)


@runtime_checkable
class Codec(Protocol):
    """Anything that maps data to codes and back: a model with its guide
    (:class:`~pvae.codec.ProgramCodec`: a VAE's codes are the means of q(z | x), an autoencoder's its point
    mass), PCA (:class:`~pvae.autoencoding.PCA`). Reconstruction errors, code-space samples and the
    figures that put coders side by side (:mod:`pvae.autoencoding`, :mod:`pvae.figures`) take any of them."""

    latent_dim: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` data -> ``(B, latent_dim)`` codes."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim)`` codes -> ``(B, P)`` data as pictures show them (a likelihood's mean)."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` data -> ``(B, P)``: what the codec makes of them (``decode(encode(x))`` where the
        code is all the latent there is)."""


@runtime_checkable
class ExactPosterior(Protocol):
    """A model whose posterior over its continuous local latents is Gaussian and known in closed form
    (the linear-Gaussian models): figures draw it beside the guides' q."""

    def posterior(self, x: torch.Tensor) -> tuple:
        """``(mean (N, D), precision (D, D))`` of p(z | x), the local sites concatenated in the model's order."""
