"""What works on any model/guide pair with a ``"data"`` plate: ELBO objectives for training, and
per-datapoint log-weights, ELBO terms and the importance-weighted bound for evaluation.

Evaluation traces the guide under a vectorized particle plate and replays the model on its samples,
so one pass gives, for K particles and B datapoints, the ``(K, B)`` log-weights

.. math:: \\log w_k = \\log p(x, z_k) - \\log q(z_k \\mid x), \\qquad z_k \\sim q(z \\mid x),

from which the ELBO is the mean over k and the importance-weighted bound (Burda et al. 2015)
:math:`\\log \\hat p(x) = \\log \\frac1K \\sum_k w_k`. No model-specific code: any Pyro model whose
latent and observed sites sit in the ``"data"`` plate can be evaluated.

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from torch.distributions import kl_divergence
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .plate import DATA

ELBOS = {
    "trace": Trace_ELBO,  # Monte Carlo estimate of every term
    "analytic-kl": TraceMeanField_ELBO,  # KL(q || p) in closed form where it is known
}
PARTICLES = "particles"


def make_elbo(
    name: str = "trace", num_particles: int = 1, max_plate_nesting: int = 1, reparameterized: bool = False
):
    """The training objective by name: ``trace`` (:class:`~pyro.infer.Trace_ELBO`) or ``analytic-kl``
    (:class:`~pyro.infer.TraceMeanField_ELBO`, whose Gaussian KL is
    :math:`\\frac12 \\sum_d (\\mu_d^2 + \\sigma_d^2 - \\log \\sigma_d^2 - 1)` against N(0, I)).
    Particles are vectorized. With ``reparameterized`` (see :func:`reparameterized`) the same
    objective comes as :class:`ReparamELBO`, which is leaner and never synchronizes with the host."""
    if name not in ELBOS:
        raise ValueError(f"unknown ELBO {name!r}: choose one of {', '.join(ELBOS)}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    if reparameterized:
        return ReparamELBO(num_particles, analytic_kl=name == "analytic-kl", max_plate_nesting=max_plate_nesting)
    return ELBOS[name](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )


class KLWeight(Messenger):
    """Multiplies the log-density of every latent (unobserved) sample site by ``weight``, in the model
    and in the guide alike, so the ELBO becomes E[log p(x|z)] - weight * KL: KL warm-up
    (Sønderby et al. 2016, arXiv 1602.02282) and the beta-VAE (Higgins et al. 2017)."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.weight


@dataclass
class Programs:
    """What one traced run tells of a model/guide pair."""

    plate_nesting: int  # batch dimensions their plates use
    reparameterized: bool  # every latent site of the guide has rsample, and the model's are the guide's


def inspect_programs(model: Callable, guide: Callable, *args) -> Programs:
    """Trace ``guide`` and the model replayed on it once, without gradients or outer effects."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]

    def latent(trace):
        return {
            name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        }

    q_sites, p_sites = latent(guide_trace), latent(model_trace)
    reparam = q_sites.keys() == p_sites.keys() and all(
        getattr(site["fn"], "has_rsample", False) and site["infer"].get("enumerate") is None
        for site in q_sites.values()
    )
    return Programs(max(dims, default=0), reparam)


def max_plate_nesting(model: Callable, guide: Callable, *args) -> int:
    """How many batch dimensions the plates of ``model`` and ``guide`` use, from one traced run."""
    return inspect_programs(model, guide, *args).plate_nesting


def reparameterized(model: Callable, guide: Callable, *args) -> bool:
    """Whether every latent site of ``guide`` is reparameterized and the model's latent sites are the
    guide's: the programs :class:`ReparamELBO` serves."""
    return inspect_programs(model, guide, *args).reparameterized


@dataclass
class LogWeights:
    """Per-particle, per-datapoint log-densities, each ``(K, B)``.

    ``kl`` is the analytic KL(q(z|x) || p(z)) per datapoint ``(B,)`` where every latent site's pair of
    distributions has a closed form, else None.
    """

    log_likelihood: torch.Tensor  # log p(x | z_k)
    log_prior: torch.Tensor  # log p(z_k)
    log_q: torch.Tensor  # log q(z_k | x)
    kl: Optional[torch.Tensor] = None

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_likelihood + self.log_prior - self.log_q


@dataclass
class ParticleTraces:
    """The guide's and the replayed model's traces under a vectorized plate of particles, with
    log-densities computed, for the batch ``x``. ``particle_dim`` is the particles' (negative) batch
    dimension."""

    guide: poutine.Trace
    model: poutine.Trace
    particle_dim: int
    x: torch.Tensor
    num_particles: int

    @property
    def shape(self) -> tuple:
        """``(K, B)``: particles by datapoints."""
        return (self.num_particles, self.x.shape[0])


def particle_traces(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx=None,
    num_data=None,
    num_particles: int = 1,
    plate_nesting: Optional[int] = None,
) -> ParticleTraces:
    """Trace ``guide`` under a vectorized plate of ``num_particles`` and replay ``model`` on its samples."""
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, x, idx, num_data)
    outer = -(plate_nesting + 1)
    with pyro.plate(PARTICLES, num_particles, dim=outer):
        guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, idx, num_data)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return ParticleTraces(guide_trace, model_trace, outer, x, num_particles)


def log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx=None,
    num_data=None,
    num_particles: int = 1,
    plate_nesting: Optional[int] = None,
) -> LogWeights:
    """Trace ``guide`` under a vectorized plate of ``num_particles`` and replay ``model`` on its samples.

    Densities are unscaled: the data plate's subsampling scale and any :class:`KLWeight` do not enter.
    """
    traces = particle_traces(model, guide, x, idx, num_data, num_particles, plate_nesting)
    return traces_log_weights(traces)


def traces_log_weights(traces: ParticleTraces) -> LogWeights:
    """The per-particle, per-datapoint log-densities of traces made by :func:`particle_traces`."""
    guide_trace, model_trace, outer, shape = traces.guide, traces.model, traces.particle_dim, traces.shape
    x = traces.x

    def per_datapoint(site):
        return _reduce_to_data(site["unscaled_log_prob"], site, outer, shape)

    zero = x.new_zeros(shape)
    log_likelihood, log_prior, log_q, kl = zero, zero, zero, x.new_zeros(x.shape[0])
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            log_likelihood = log_likelihood + per_datapoint(site)
            continue
        if name not in guide_trace.nodes:
            raise ValueError(f"latent site {name!r} of the model has no counterpart in the guide")
        log_prior = log_prior + per_datapoint(site)
        if kl is not None:
            kl = _add_analytic_kl(kl, guide_trace.nodes[name], site, outer, shape)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            if name not in model_trace.nodes:
                raise ValueError(f"guide site {name!r} does not appear in the model")
            log_q = log_q + per_datapoint(site)
    return LogWeights(log_likelihood, log_prior, log_q, kl)


def _add_analytic_kl(kl, guide_site, model_site, outer, shape):
    try:
        site_kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    # (K, B): identical across particles; keep one row
    return kl + _reduce_to_data(site_kl, guide_site, outer, shape)[0]


def _reduce_to_data(value: torch.Tensor, site: dict, outer: int, shape: tuple) -> torch.Tensor:
    """Sum a site's log-density over every batch dimension but the particles' and the datapoints'."""
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == DATA]
    if not data_dims:
        raise ValueError(
            f"site {site['name']!r} is outside the {DATA!r} plate: pvae evaluates models whose "
            "latent and observed sites are all per datapoint"
        )
    (data_dim,) = data_dims
    width = -outer
    value = value.reshape((1,) * (width - value.dim()) + value.shape)
    other = [d for d in range(outer, 0) if d not in (outer, data_dim)]
    if other:
        value = value.sum(other, keepdim=True)
    return value.reshape(value.shape[0], -1).expand(shape)


# ----------------------------------------------------------------------------- estimates


@torch.no_grad()
def elbo_terms(
    model: Callable, guide: Callable, x: torch.Tensor, idx=None, num_data=None, num_particles: int = 1,
    plate_nesting: Optional[int] = None,
) -> dict:
    """Per-datapoint ELBO and its parts, each ``(B,)``.

    ``recon`` is E_q[log p(x|z)]; ``kl`` is the analytic KL where every latent site has one, else the
    Monte Carlo E_q[log q - log p]; ``elbo = recon - kl``.
    """
    lw = log_weights(model, guide, x, idx, num_data, num_particles, plate_nesting)
    recon = lw.log_likelihood.mean(0)
    kl = lw.kl if lw.kl is not None else (lw.log_q - lw.log_prior).mean(0)
    return {"elbo": recon - kl, "recon": recon, "kl": kl}


@torch.no_grad()
def iwae_bound(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx=None,
    num_data=None,
    num_samples: int = 1000,
    chunk_size: int = 100,
    plate_nesting: Optional[int] = None,
) -> torch.Tensor:
    """The importance-weighted bound :math:`\\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)` per
    datapoint ``(B,)`` (Burda et al. 2015), in chunks of ``chunk_size`` particles with a running
    log-sum-exp, so that peak memory does not grow with ``num_samples``."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be at least 1, got {num_samples}, {chunk_size}")
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, x, idx, num_data)
    running = x.new_full((x.shape[0],), -math.inf)
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        lw = log_weights(model, guide, x, idx, num_data, k, plate_nesting).log_w
        running = torch.logaddexp(running, torch.logsumexp(lw, dim=0))
    return running - math.log(num_samples)


def batched(fn: Callable, x: torch.Tensor, batch_size: int, idx=None):
    """Apply ``fn(x_batch, idx_batch)`` over ``x`` in batches and concatenate what it returns per
    datapoint: a ``(B,)`` tensor, or a dict of them. ``idx`` defaults to the rows of ``x``."""
    if idx is None:
        idx = torch.arange(x.shape[0], device=x.device)
    parts = [fn(xb, ib) for xb, ib in zip(x.split(batch_size), idx.split(batch_size))]
    if isinstance(parts[0], dict):
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return torch.cat(parts)


# ----------------------------------------------------------------------------- training objective


class ReparamELBO:
    """The ELBO of a guide whose latent sites are all reparameterized, as a differentiable loss:
    the value and gradient of :class:`~pyro.infer.Trace_ELBO` (``analytic_kl=False``) or
    :class:`~pyro.infer.TraceMeanField_ELBO` (``analytic_kl=True``), without their bookkeeping for
    score-function terms, trace copies and per-site ``.item()`` calls, each a host synchronization
    on a GPU. :func:`make_elbo` picks it when the guide allows, Pyro's ELBO otherwise.

    .. math:: -\\mathcal L = -\\frac1K \\sum_k \\Big[\\sum_{\\text{observed}} s \\log p(x \\mid z_k)
        + \\sum_{\\text{latent}} s \\big(\\log p(z_k) - \\log q(z_k \\mid x)\\big)\\Big]

    with each site's scale ``s`` (the data plate's ``num_data / B``, a :class:`KLWeight`); the
    latent terms are the closed-form ``-s KL(q || p)`` where ``analytic_kl`` and one is known.
    """

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False, max_plate_nesting: int = 1):
        self.num_particles = num_particles
        self.analytic_kl = analytic_kl
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if self.num_particles > 1:
            with pyro.plate(PARTICLES, self.num_particles, dim=-(self.max_plate_nesting + 1)):
                guide_trace, model_trace = self._traces(model, guide, args, kwargs)
        else:
            guide_trace, model_trace = self._traces(model, guide, args, kwargs)
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                elbo = elbo + _scaled_log_prob(site)
                continue
            q_site = guide_trace.nodes[name]
            if self.analytic_kl:
                try:
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    elbo = elbo - scale_and_mask(kl, q_site["scale"], q_site["mask"]).sum()
                    continue
            elbo = elbo + _scaled_log_prob(site) - _scaled_log_prob(q_site)
        return -elbo / self.num_particles

    @staticmethod
    def _traces(model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return guide_trace, model_trace


def _scaled_log_prob(site) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()
