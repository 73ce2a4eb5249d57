"""What works on any model/guide pair: the training objectives, and one stream of per-datapoint
log-weights from which the ELBO, the importance-weighted bound and every diagnostic are reductions.

Objectives (:func:`make_elbo`), chosen from what :func:`~pvae.programs.inspect_programs` found:

- a guide whose sites are all reparameterized: :class:`ReparamELBO`, the value and gradient of
  Pyro's ``Trace_ELBO`` without its per-site host synchronizations, with the closed-form KL of
  each site where it is exact (``analytic-kl``);
- a model with enumerated discrete sites (or ``enum``): Pyro's ``TraceEnum_ELBO``, which sums them
  out exactly;
- otherwise Pyro's ``Trace_ELBO``, with score-function terms for the guide's discrete sites.

The stream (:func:`log_weight_chunks`): K particles :math:`z_k \\sim q(z \\mid x)` per datapoint,
drawn in chunks under a vectorized plate, the model replayed on them, and per particle and datapoint
:math:`\\log w_k = \\log p(x, z_k) - \\log q(z_k \\mid x)` (:class:`LogWeights`), enumerated sites summed
out exactly. The ELBO is the mean over k and the importance-weighted bound (Burda et al. 2015)
:math:`\\log \\hat p(x) = \\log \\frac1K \\sum_k w_k`. Global latent sites (outside the data plate)
are kept apart: their terms are per particle, not per datapoint.

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
"""

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pyro
from pyro.infer.util import is_validation_enabled
import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from .programs import (
    DATA,
    PARTICLES,
    Batch,
    ProgramInfo,
    as_program,
    data_frame,
    inspect_programs,
    is_enumerated,
    latent_sites,
    sample_sites,
)

ELBOS = {
    "trace": "Monte Carlo estimate of every term (Trace_ELBO)",
    "analytic-kl": "the KL in closed form where it is exact, Monte Carlo elsewhere",
    "enum": "enumerated discrete sites summed out exactly (TraceEnum_ELBO)",
}


class PvaeWarning(UserWarning):
    """What pvae says once about a choice it made for the user (an objective's fallback, ...)."""


def make_elbo(name: str = "trace", num_particles: int = 1, info: Optional[ProgramInfo] = None):
    """The training objective ``name`` for programs described by ``info`` (see the module docstring).

    ``analytic-kl`` takes the closed-form KL of each site where it is exact and says once, as a
    :class:`PvaeWarning`, which sites take the Monte Carlo term instead. Particles are vectorized.
    """
    if name not in ELBOS:
        raise ValueError(f"unknown ELBO {name!r}: choose one of {', '.join(ELBOS)}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    if info is None:
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    if name == "analytic-kl":
        if info.enumerated:
            _say("analytic-kl: the model enumerates discrete sites, which TraceEnum_ELBO sums out; every KL "
                 "is estimated by Monte Carlo")
        elif not info.reparameterized:
            _say("analytic-kl: the guide samples discrete sites (score-function gradients): every KL is "
                 "estimated by Monte Carlo with Trace_ELBO")
        else:
            rest = [n for n in info.guide_latent if n not in info.analytic_kl]
            if rest:
                _say(f"analytic-kl: site(s) {', '.join(map(repr, rest))} have no exact closed-form KL with this "
                     "guide (no formula, or the guide samples a latent the model's density depends on after "
                     "them): those take the Monte Carlo term")
    return lean_elbo(info, num_particles, analytic=name == "analytic-kl", enumerate_=name == "enum")


def lean_elbo(info: ProgramInfo, num_particles: int = 1, analytic: bool = True, enumerate_: bool = False):
    """The leanest exact objective for the programs ``info`` describes, silently: ``TraceEnum_ELBO``
    for enumerated sites, :class:`ReparamELBO` (with the closed-form KL where exact, if ``analytic``)
    for reparameterized guides, ``Trace_ELBO`` otherwise."""
    nesting = max(info.plate_nesting, 1)
    vectorize = num_particles > 1
    if enumerate_ or info.enumerated:
        return TraceEnum_ELBO(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=nesting)
    if info.reparameterized:
        return ReparamELBO(num_particles, info.analytic_kl if analytic else frozenset(), nesting)
    return Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=nesting)


def _say(message: str) -> None:
    warnings.warn(message, PvaeWarning, stacklevel=3)


class KLWeight(Messenger):
    """Multiplies the log-density of every sampled latent site by ``weight``, in the model and in the
    guide alike, so the ELBO becomes E[log p(x|z)] - weight * KL: KL warm-up (Sønderby et al. 2016,
    arXiv 1602.02282) and the beta-VAE (Higgins et al. 2017). Enumerated sites, summed out rather
    than sampled, are left alone: they are part of the likelihood."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not is_enumerated(msg):
            msg["scale"] = msg["scale"] * self.weight


class ReparamELBO:
    """The ELBO of a guide whose latent sites are all reparameterized, as a differentiable loss:
    the value and gradient of Pyro's ``Trace_ELBO`` (and of ``TraceMeanField_ELBO`` on the sites in
    ``analytic``) without their bookkeeping for score-function terms and per-site ``.item()`` calls,
    each a host synchronization on a GPU.

    .. math:: -\\mathcal L = -\\frac1K \\sum_k \\Big[\\sum_{\\text{model sites}} s \\log p
        - \\sum_{\\text{guide sites}} s \\log q\\Big]

    with each site's scale ``s`` (the data plate's N / B, a :class:`KLWeight`); for a site in
    ``analytic`` the pair of terms is the closed-form ``-s KL(q || p)``.
    """

    def __init__(self, num_particles: int = 1, analytic=frozenset(), max_plate_nesting: int = 1):
        self.num_particles = num_particles
        self.analytic = frozenset(analytic)
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if self.num_particles > 1:
            with pyro.plate(PARTICLES, self.num_particles, dim=-(self.max_plate_nesting + 1)):
                guide_trace, model_trace = _traces(model, guide, args, kwargs)
        else:
            guide_trace, model_trace = _traces(model, guide, args, kwargs)
        q_sites = latent_sites(guide_trace)
        elbo, done = 0.0, set()
        for name, site in sample_sites(model_trace).items():
            if name in self.analytic and name in q_sites:
                q_site = q_sites[name]
                try:
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    elbo = elbo - scale_and_mask(kl, q_site["scale"], q_site["mask"]).sum()
                    done.add(name)
                    continue
            elbo = elbo + _scaled_log_prob(site)
        for name, site in q_sites.items():
            if name not in done:
                elbo = elbo - _scaled_log_prob(site)
        return -elbo / self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


def _traces(model, guide, args, kwargs):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def _scaled_log_prob(site) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()


# ----------------------------------------------------------------------------- the stream


@dataclass
class LogWeights:
    """Log-densities of one chunk of K particles for B datapoints (see the module docstring).

    :param log_p: ``(K, B)`` :math:`\\log p(x_b, z_{kb} \\mid g_k)`: the observed and local latent sites
        of the model, enumerated sites summed out.
    :param log_q: ``(K, B)`` :math:`\\log q(z_{kb} \\mid x_b)`: the guide's local sites.
    :param log_likelihood: ``(K, B)`` the observed sites alone, :math:`\\log p(x_b \\mid z_{kb}, g_k)`;
        None when enumerated sites join them to the latents.
    :param kl: ``(K, B)`` the closed-form KL of every local site, where each is exact (at the sampled
        parents, hence per particle); else None.
    :param global_log_p: ``(K,)`` the model's global latent sites, :math:`\\log p(g_k)`.
    :param global_log_q: ``(K,)`` the guide's global sites, :math:`\\log q(g_k)`.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    log_likelihood: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    global_log_p: torch.Tensor
    global_log_q: torch.Tensor
    traces: Optional[tuple] = None  # (guide trace, model trace), for the latents' own summaries

    @property
    def log_w(self) -> torch.Tensor:
        """``(K, B)`` the importance log-weights of the local sites."""
        return self.log_p - self.log_q

    @property
    def log_prior(self) -> Optional[torch.Tensor]:
        return None if self.log_likelihood is None else self.log_p - self.log_likelihood

    @property
    def elbo(self) -> torch.Tensor:
        """``(K, B)`` each particle's term of the ELBO of the local sites: the log-likelihood minus the
        closed-form KL where every local site's is exact, else the log-weight."""
        return self.log_w if self.kl is None else self.log_likelihood - self.kl


def particle_traces(model, guide, batch: Batch, num_particles: int, info: ProgramInfo) -> tuple:
    """The guide's and the replayed model's traces under a vectorized plate of ``num_particles``,
    enumerated model sites enumerated in parallel left of the particles; log-densities computed."""
    model, guide = as_program(model, "model"), as_program(guide, "guide")
    outer = -(info.plate_nesting + 1)
    with pyro.plate(PARTICLES, num_particles, dim=outer):
        guide_trace = poutine.trace(guide).get_trace(batch)
        if info.enumerated:  # inside the replay, as TraceEnum_ELBO has it: it marks the replayed sites' enum dims
            model = poutine.enum(model, first_available_dim=outer - 1)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return guide_trace, model_trace


def log_weights(model, guide, batch, num_particles: int = 1, info: Optional[ProgramInfo] = None,
                keep_traces: bool = False) -> LogWeights:
    """One chunk of the stream: :class:`LogWeights` of ``num_particles`` particles for ``batch``
    (a :class:`~pvae.programs.Batch` or a tensor of datapoints). Densities are unscaled: the data
    plate's N / B and any :class:`KLWeight` do not enter."""
    batch = Batch.of(batch)
    info = info or inspect_programs(model, guide, batch)
    guide_trace, model_trace = particle_traces(model, guide, batch, num_particles, info)
    outer, shape = -(info.plate_nesting + 1), (num_particles, len(batch))

    def per_datapoint(site):
        return _reduce_to_data(site["unscaled_log_prob"], site, outer, shape)

    def per_particle(site):
        value = site["unscaled_log_prob"]
        value = value.reshape((1,) * (-outer - value.dim()) + value.shape)
        return value.sum(list(range(1, value.dim()))).expand(num_particles)

    zeros, zero = batch.x.new_zeros(shape), batch.x.new_zeros(num_particles)
    log_q, global_log_q = zeros, zero
    q_sites = latent_sites(guide_trace)
    for site in q_sites.values():
        if data_frame(site) is None:
            global_log_q = global_log_q + per_particle(site)
        else:
            log_q = log_q + per_datapoint(site)

    log_likelihood, log_prior, global_log_p = zeros, zeros, zero
    kl = zeros if q_sites else None
    local = {}
    for name, site in sample_sites(model_trace).items():
        if data_frame(site) is None:
            if not site["is_observed"]:  # observed globals are conditioned values: constants here
                global_log_p = global_log_p + per_particle(site)
            continue
        local[name] = site
        if info.enumerated:
            continue
        if site["is_observed"]:
            log_likelihood = log_likelihood + per_datapoint(site)
            continue
        log_prior = log_prior + per_datapoint(site)
        if kl is not None and name in info.analytic_kl and name in q_sites:
            kl = kl + _reduce_to_data(kl_divergence(q_sites[name]["fn"], site["fn"]), site, outer, shape)
        else:
            kl = None
    if any(name not in info.analytic_kl for name, s in q_sites.items() if data_frame(s) is not None):
        kl = None
    if info.enumerated:
        log_p, log_likelihood, kl = _contract_enumerated(model_trace, local, outer, shape), None, None
    else:
        log_p = log_likelihood + log_prior
    traces = (guide_trace, model_trace) if keep_traces else None
    return LogWeights(log_p, log_q, log_likelihood, kl, global_log_p, global_log_q, traces)


def _reduce_to_data(value: torch.Tensor, site: dict, outer: int, shape: tuple) -> torch.Tensor:
    """Sum a site's per-element log-density over every batch dimension but the particles' and the
    datapoints', as ``(K, B)``."""
    data_dim = data_frame(site).dim
    width = -outer
    value = value.reshape((1,) * (width - value.dim()) + value.shape)
    other = [d for d in range(outer, 0) if d not in (outer, data_dim)]
    if other:
        value = value.sum(other, keepdim=True)
    return value.reshape(value.shape[0], -1).expand(shape)


def _contract_enumerated(model_trace, local: dict, outer: int, shape: tuple) -> torch.Tensor:
    """:math:`\\log p(x_b, z_{kb})` with the enumerated sites summed out exactly, ``(K, B)``: the local
    sites' log-factors contracted by Pyro's tensor-variable elimination, keeping the particle and
    data plates."""
    model_trace.pack_tensors()
    symbols = model_trace.plate_to_symbol
    tree = OrderedDict()
    for site in local.values():
        ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        tree.setdefault(ordinal, []).append(site["packed"]["unscaled_log_prob"])
    sum_dims = set(model_trace.symbol_to_dim) - set(symbols.values())
    present = {d for terms in tree.values() for t in terms for d in t._pyro_dims}  # packing drops size-1 dims
    target = frozenset(symbols[name] for name in (PARTICLES, DATA) if symbols[name] in present)
    with shared_intermediates():
        value = contract_to_tensor(tree, sum_dims, target_ordinal=target)
    value = packed.unpack(value, model_trace.symbol_to_dim)
    value = value.reshape((1,) * (-outer - value.dim()) + value.shape)
    return value.reshape(value.shape[0], -1).expand(shape)


def log_weight_chunks(model, guide, batch, num_samples: int, chunk_size: int, info: Optional[ProgramInfo] = None,
                      keep_traces: bool = False) -> Iterator[LogWeights]:
    """The stream: :class:`LogWeights` of ``num_samples`` particles in chunks of at most
    ``chunk_size``, so that memory does not grow with ``num_samples``. Pyro's validation, when on,
    checks the first chunk; the others see the same programs and data."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be at least 1, got {num_samples}, {chunk_size}")
    batch = Batch.of(batch)
    info = info or inspect_programs(model, guide, batch)
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        with pyro.validation_enabled(is_validation_enabled() and start == 0):
            yield log_weights(model, guide, batch, k, info, keep_traces)


# ----------------------------------------------------------------------------- reductions


@torch.no_grad()
def elbo_terms(model, guide, batch, num_particles: int = 1, chunk_size: int = 1000,
               info: Optional[ProgramInfo] = None) -> dict:
    """Per-datapoint ELBO of the local sites and its parts, each ``(B,)``.

    ``recon`` is :math:`E_q[\\log p(x \\mid z)]`; ``kl`` the closed-form KL where every local site's is
    exact, else the Monte Carlo :math:`E_q[\\log q - \\log p]`; ``elbo = recon - kl``. With enumerated
    sites the split does not exist and only ``elbo`` is returned. ``global_kl`` (a 0-dim tensor) is
    the Monte Carlo KL of the global sites, zero without them: the data set's ELBO is
    ``elbo.sum() - global_kl`` over all its datapoints.
    """
    terms = ElboTerms()
    for lw in log_weight_chunks(model, guide, batch, num_particles, chunk_size, info):
        terms.add(lw)
    return terms.value()


class ElboTerms:
    """The reduction of :func:`elbo_terms`, over chunks of the stream as they come."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, lw: LogWeights) -> None:
        parts = {"elbo": lw.log_w.sum(0), "global_kl": (lw.global_log_q - lw.global_log_p).sum()}
        if lw.log_likelihood is not None:
            parts["recon"] = lw.log_likelihood.sum(0)
            parts["kl"] = (lw.kl if lw.kl is not None else lw.log_q - lw.log_prior).sum(0)
        for key, value in parts.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.count += lw.log_w.shape[0]

    def value(self) -> dict:
        terms = {key: value / self.count for key, value in self.sums.items()}
        if "recon" in terms:
            terms["elbo"] = terms["recon"] - terms["kl"]
        return terms


class LogMeanExp:
    """:math:`\\log \\frac1K \\sum_k e^{v_k}` over values that come in chunks along their first axis, by a
    running log-sum-exp: the importance-weighted bound of a stream of log-weights."""

    def __init__(self):
        self.lse, self.count = None, 0

    def add(self, values: torch.Tensor) -> None:
        lse = torch.logsumexp(values, dim=0)
        self.lse = lse if self.lse is None else torch.logaddexp(self.lse, lse)
        self.count += values.shape[0]

    def value(self) -> torch.Tensor:
        return self.lse - math.log(self.count)


@torch.no_grad()
def iwae_bound(model, guide, batch, num_samples: int = 1000, chunk_size: int = 100,
               info: Optional[ProgramInfo] = None) -> torch.Tensor:
    """The importance-weighted bound :math:`\\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)` per
    datapoint ``(B,)`` (Burda et al. 2015), by a running log-sum-exp over chunks of particles."""
    bound = LogMeanExp()
    for lw in log_weight_chunks(model, guide, batch, num_samples, chunk_size, info):
        bound.add(lw.log_w)
    return bound.value()


@torch.no_grad()
def elbo_and_iwae_bound(model, guide, batch, num_samples: int = 1000, chunk_size: int = 100,
                        info: Optional[ProgramInfo] = None) -> tuple:
    """``(elbo, log_px)``, each ``(B,)``: :func:`elbo_terms`' ELBO and :func:`iwae_bound` from one pass
    over the same ``num_samples`` particles, half the work of the two calls."""
    terms, bound = ElboTerms(), LogMeanExp()
    for lw in log_weight_chunks(model, guide, batch, num_samples, chunk_size, info):
        terms.add(lw)
        bound.add(lw.log_w)
    return terms.value()["elbo"], bound.value()


def batched(fn: Callable, batch: Batch, batch_size: int):
    """Apply ``fn(sub_batch)`` over ``batch`` in sub-batches of ``batch_size`` rows and concatenate
    what it returns per datapoint: a ``(B,)`` tensor, or a dict of them (0-dim entries are averaged
    over the sub-batches)."""
    parts = [fn(b) for b in Batch.of(batch).split_rows(batch_size)]
    if isinstance(parts[0], dict):
        return {key: torch.cat([p[key] for p in parts]) if parts[0][key].dim() else torch.stack([p[key] for p in parts]).mean()
                for key in parts[0]}
    return torch.cat(parts)
