"""What works on any model/guide pair: the training objectives, and one stream of per-datapoint
log-weights from which the ELBO, the importance-weighted bound and every diagnostic are reductions.

Objectives (:func:`make_elbo`), chosen from what :func:`~pvae.programs.inspect_programs` found:

- a guide whose sites are all reparameterized: :class:`ReparamELBO`, the value and gradient of
  Pyro's ``Trace_ELBO`` without its per-site host synchronizations, with the closed-form KL of
  each site where it is exact (``auto``, the default, and ``analytic-kl``, which says where it is
  not), or with every term by Monte Carlo (``trace``);
- a model with enumerated discrete sites (or ``enum``): Pyro's ``TraceEnum_ELBO``, which sums them
  out exactly;
- otherwise Pyro's ``Trace_ELBO``, with score-function terms for the guide's discrete sites;
- ``iwae`` and ``dreg``: the importance-weighted bound (:class:`ImportanceWeightedELBO`) as the
  training objective, its encoder gradient plain or doubly reparameterized;
- ``tc``: the beta-TCVAE, the ELBO with its total correlation weighted (:class:`TotalCorrelationELBO`).

The last three are reductions of the stream below, as the evaluation's measures are.

The stream (:func:`log_weight_chunks`): K particles :math:`z_k \\sim q(z \\mid x)` per datapoint,
drawn in chunks under a vectorized plate, the model replayed on them, and per particle and datapoint
:math:`\\log w_k = \\log p(x, z_k) - \\log q(z_k \\mid x)` (:class:`LogWeights`), enumerated sites summed
out exactly. The ELBO is the mean over k and the importance-weighted bound (Burda et al. 2015)
:math:`\\log \\hat p(x) = \\log \\frac1K \\sum_k w_k`. Global latent sites (outside the data plate)
are kept apart: their terms are per particle, not per datapoint.

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
3. Tucker, Lawson, Gu & Maddison, *Doubly Reparameterized Gradient Estimators for Monte Carlo
   Objectives*, arXiv 1810.04152.
4. Chen, Li, Grosse & Duvenaud, *Isolating Sources of Disentanglement in Variational Autoencoders*,
   arXiv 1802.04942.
"""

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
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
from torch.distributions import Independent, kl_divergence

from .programs import (
    DATA,
    PARTICLES,
    Batch,
    ProgramError,
    ProgramInfo,
    as_program,
    data_frame,
    inspect_programs,
    is_enumerated,
    latent_sites,
    sample_sites,
)

ELBOS = {
    "auto": "the KL in closed form where it is exact, Monte Carlo elsewhere, enumerated sites summed out: "
            "the lowest-variance ELBO the programs allow",
    "trace": "Monte Carlo estimate of every term (Trace_ELBO)",
    "analytic-kl": "the KL in closed form where it is exact, Monte Carlo elsewhere",
    "enum": "enumerated discrete sites summed out exactly (TraceEnum_ELBO)",
    "iwae": "the importance-weighted bound over --particles K samples (Burda et al. 2015)",
    "dreg": "the importance-weighted bound, its encoder gradient doubly reparameterized (Tucker et al. 2018)",
    "tc": "the beta-TCVAE: the ELBO minus (--tc-beta - 1) x the total correlation (Chen et al. 2018)",
}
TC_ESTIMATORS = ("mws", "stratified")  # how the beta-TCVAE estimates q(z) from a minibatch
# objectives that are reductions of the stream: they read unscaled densities, so no KL weight enters
STREAM_OBJECTIVES = ("iwae", "dreg", "tc")


class PvaeWarning(UserWarning):
    """What pvae says once about a choice it made for the user (an objective's fallback, ...)."""


def make_elbo(name: str = "auto", num_particles: int = 1, info: Optional[ProgramInfo] = None,
              tc_beta: float = 1.0, tc_estimator: str = "mws"):
    """The training objective ``name`` for programs described by ``info`` (see the module docstring).

    ``auto`` takes the closed-form KL of each site where it is exact and the Monte Carlo term
    elsewhere, silently; ``analytic-kl`` does the same and says once, as a :class:`PvaeWarning`, which
    sites take the Monte Carlo term; ``trace`` estimates every term by Monte Carlo. Particles are vectorized.
    ``iwae`` and ``dreg`` take ``num_particles`` as the bound's K; ``tc`` weights the total correlation
    by ``tc_beta``, estimated by ``tc_estimator`` (see :func:`kl_decomposition`).
    """
    if name not in ELBOS:
        raise ValueError(f"unknown ELBO {name!r}: choose one of {', '.join(ELBOS)}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    if name in ("iwae", "dreg"):
        return ImportanceWeightedELBO(num_particles, info, doubly_reparameterized=name == "dreg")
    if name == "tc":
        return TotalCorrelationELBO(tc_beta, tc_estimator, num_particles, info)
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
    return lean_elbo(info, num_particles, analytic=name in ("auto", "analytic-kl"), enumerate_=name == "enum")


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
        terms, done = [], set()  # (sign, log-density, scale, mask) of the ELBO's terms
        for name, site in sample_sites(model_trace).items():
            if name in self.analytic and name in q_sites:
                q_site = q_sites[name]
                try:
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    terms.append((-1, kl, q_site["scale"], q_site["mask"]))
                    done.add(name)
                    continue
            terms.append((1, site["fn"].log_prob(site["value"]), site["scale"], site["mask"]))
        for name, site in q_sites.items():
            if name not in done:
                terms.append((-1, site["fn"].log_prob(site["value"]), site["scale"], site["mask"]))
        return _scaled_sum(terms, -1.0 / self.num_particles)

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


def _traces(model, guide, args, kwargs):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def _scaled_sum(terms: list, factor: float) -> torch.Tensor:
    """``factor * sum_i sign_i * sum(scale_i * mask_i * t_i)`` over ``terms``, ``(sign, t, scale, mask)``:
    the unmasked terms of one shape and scale (every local site of a VAE: the data plate's N / B) are
    added first, then summed and scaled once, which saves the backward pass a node per term."""
    groups = {}  # (scale, shape) -> [scale, signed sum]
    for sign, value, scale, mask in terms:
        if not torch.is_tensor(value):  # a log-density that is identically zero
            continue
        if mask is not None and mask is not True:
            value, scale = scale_and_mask(value, scale, mask), 1.0
        key = (scale if isinstance(scale, (int, float)) else id(scale), tuple(value.shape))
        if key not in groups:
            groups[key] = [scale, value if sign > 0 else -value]
        else:
            groups[key][1] = groups[key][1] + value if sign > 0 else groups[key][1] - value
    total = None
    for scale, value in groups.values():
        term = value.sum() * (scale * factor) if isinstance(scale, (int, float)) else (value * scale).sum() * factor
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the ELBO has no terms: the model and guide sample nothing and observe nothing")
    return total


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
                keep_traces: bool = False, dreg: Optional["DoublyReparameterized"] = None) -> LogWeights:
    """One chunk of the stream: :class:`LogWeights` of ``num_particles`` particles for ``batch``
    (a :class:`~pvae.programs.Batch` or a tensor of datapoints). Densities are unscaled: the data
    plate's N / B and any :class:`KLWeight` do not enter.

    :param dreg: the guide's gradients doubly reparameterized (:class:`DoublyReparameterized`): the
        values are the same, ``log_q`` has no score term and the gradient reaching the latents is
        scaled by the weights the objective sets.
    """
    batch = Batch.of(batch)
    info = info or inspect_programs(model, guide, batch, check=False)
    if dreg is None:
        guide_trace, model_trace = particle_traces(model, guide, batch, num_particles, info)
    else:
        guide_trace, model_trace, live, stopped = dreg.traces(model, guide, batch, num_particles, info)
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
    for name, site in q_sites.items():
        if data_frame(site) is None:
            global_log_q = global_log_q + per_particle(site)
        elif dreg is None:
            log_q = log_q + per_datapoint(site)
        else:  # the same value; its gradient only through the latents, as if q's parameters were constants
            at_stopped = per_datapoint(stopped.nodes[name])
            log_q = log_q + per_datapoint(live.nodes[name]) - at_stopped + at_stopped.detach()

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


class DoublyReparameterized:
    """The doubly reparameterized gradient of the importance-weighted bound (Tucker et al. 2018).

    With :math:`z_k = z(\\epsilon_k, \\phi)` reparameterized and :math:`\\tilde w_k` the normalized
    weights, the bound's gradient in the guide's parameters :math:`\\phi` is, in expectation,

    .. math:: \\nabla_\\phi \\log \\frac1K \\sum_k w_k \\;\\to\\; \\sum_k \\tilde w_k^2\\,
        \\frac{\\partial \\log w_k}{\\partial z_k} \\frac{\\partial z_k}{\\partial \\phi},

    with :math:`\\log w_k = \\log p(x, z_k) - \\log q(z_k)` and q's parameters held constant in the
    partial derivative: the score term :math:`\\partial_\\phi \\log q(z_k; \\phi)`, whose expectation is
    zero and whose variance grows with K, is gone. The model's gradient stays the IWAE's,
    :math:`\\sum_k \\tilde w_k \\nabla_\\theta \\log p(x, z_k)`.

    :meth:`traces` gets this from any guide whose density can be evaluated at given values, in one
    model pass: the model is replayed on the latents ``z'``, equal to the guide's ``z`` but with
    their gradient multiplied by :math:`\\tilde w_k` on its way back (:attr:`weights`, which the
    objective sets from the log-weights before the backward pass), and the guide is replayed twice,
    at ``z'`` and at ``z`` detached: :math:`\\log q(z'; \\phi) - \\log q(\\bar z; \\phi)` carries the path
    through the latents and no score term, since the two score terms cancel. Scaling at the points
    where the densities read the latents, rather than on the latents themselves, keeps the factor
    :math:`\\tilde w_k` single where one latent is computed from another in the guide (a flow's
    sites from its base, ``z2`` from ``z1``).
    """

    def __init__(self):
        self.weights = None  # (K, B): the normalized importance weights, detached

    def traces(self, model, guide, batch: Batch, num_particles: int, info: ProgramInfo) -> tuple:
        """``(guide trace, model trace, guide at z', guide at z detached)``, log-densities computed."""
        model, guide = as_program(model, "model"), as_program(guide, "guide")
        outer = -(info.plate_nesting + 1)
        with pyro.plate(PARTICLES, num_particles, dim=outer):
            guide_trace = poutine.trace(guide).get_trace(batch)
            q_sites = latent_sites(guide_trace)
            scaled = {name: self._scaled(site, outer) for name, site in q_sites.items()}
            replayed = guide_trace.copy()
            for name, value in scaled.items():
                replayed.nodes[name] = {**replayed.nodes[name], "value": value}
            if info.enumerated:
                model = poutine.enum(model, first_available_dim=outer - 1)
            model_trace = poutine.trace(poutine.replay(model, trace=replayed)).get_trace(batch)
            stopped = {name: site["value"].detach() for name, site in q_sites.items()}
            try:
                live = poutine.trace(poutine.condition(guide, data=scaled)).get_trace(batch)
                at_stopped = poutine.trace(poutine.condition(guide, data=stopped)).get_trace(batch)
                live.compute_log_prob()
                at_stopped.compute_log_prob()
            except (KeyError, NotImplementedError) as e:
                raise ProgramError(
                    "dreg evaluates log q(z) at the guide's own draws with its parameters held constant, and "
                    f"this guide cannot evaluate its density at a given value ({type(e).__name__}: "
                    f"{str(e).strip()[:80]}; a planar flow has no inverse): use --elbo iwae"
                ) from None
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        return guide_trace, model_trace, live, at_stopped

    def _scaled(self, site: dict, outer: int) -> torch.Tensor:
        """The site's value, its gradient multiplied by the particle's and datapoint's weight (global
        sites, which the importance-weighted objectives refuse, are left as they are)."""
        value = site["value"]
        frame = data_frame(site)
        if not value.requires_grad or frame is None:
            return value
        batch_dims = value.dim() - site["fn"].event_dim
        k_axis, b_axis = batch_dims + outer, batch_dims + frame.dim
        scaled = value.view_as(value)

        def scale(grad):
            view = [1] * grad.dim()
            view[k_axis], view[b_axis] = self.weights.shape
            return grad * self.weights.reshape(view)

        scaled.register_hook(scale)
        return scaled


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
    info = info or inspect_programs(model, guide, batch, check=False)  # conditioned globals are observed
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


# ----------------------------------------------------------------------------- objectives on the stream


class ImportanceWeightedELBO:
    """The importance-weighted bound (Burda et al. 2015) as the training objective, scaled to the data
    set as the ELBO is:

    .. math:: -\\mathcal L_K = -\\frac{N}{B} \\sum_{b=1}^{B} \\log \\frac1K \\sum_{k=1}^{K}
        \\frac{p(x_b, z_{kb})}{q(z_{kb} \\mid x_b)}, \\qquad z_{kb} \\sim q(z \\mid x_b),

    a reduction of the stream (:func:`log_weights`); K = 1 is the ELBO. Its gradient in the model's
    parameters is :math:`\\sum_k \\tilde w_k \\nabla \\log p(x, z_k)`; in the guide's, the
    reparameterized gradient of the bound, or with ``doubly_reparameterized`` the DReG estimator of
    Tucker et al. (:class:`DoublyReparameterized`), which has the same expectation and, for large K,
    far less variance. The guide's sites must be reparameterized; models with global latent sites are
    refused (a bound per datapoint has no place for their KL, which the ELBO counts once).
    """

    def __init__(self, num_particles: int = 1, info: Optional[ProgramInfo] = None,
                 doubly_reparameterized: bool = False):
        self.num_particles = num_particles
        self.doubly_reparameterized = doubly_reparameterized
        self.info = None if info is None else self._checked(info)

    @property
    def name(self) -> str:
        return "dreg" if self.doubly_reparameterized else "iwae"

    def _checked(self, info: ProgramInfo) -> ProgramInfo:
        _check_stream_objective(self.name, info)
        return replace(info, analytic_kl=frozenset())  # the bound has no use for closed-form KLs

    def differentiable_loss(self, model, guide, batch) -> torch.Tensor:
        batch = Batch.of(batch)
        if self.info is None:
            self.info = self._checked(inspect_programs(model, guide, batch))
        dreg = DoublyReparameterized() if self.doubly_reparameterized else None
        log_w = log_weights(model, guide, batch, self.num_particles, self.info, dreg=dreg).log_w  # (K, B)
        if dreg is not None:
            dreg.weights = torch.softmax(log_w.detach(), 0)
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)  # (B,)
        return -bound.sum() * (batch.num_data / len(batch))

    def loss(self, model, guide, batch) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, batch).item()


def _check_stream_objective(name: str, info: ProgramInfo) -> None:
    if info.global_:
        raise ProgramError(
            f"--elbo {name}: the model has global latent site(s) {', '.join(map(repr, info.global_))}, whose KL this "
            "per-datapoint objective has no place for: fit it with --elbo auto, trace or analytic-kl"
        )
    if not info.reparameterized:
        raise ProgramError(
            f"--elbo {name} needs a guide whose sites are all reparameterized, and this one samples discrete sites: "
            "enumerate them in the model (infer={'enumerate': 'parallel'}) or use --elbo trace"
        )


class TotalCorrelationELBO:
    """The beta-TCVAE (Chen et al. 2018): the ELBO with the total correlation of the aggregate posterior
    weighted by ``tc_beta``,

    .. math:: -\\frac{N}{B} \\sum_b \\frac1K \\sum_k \\big[\\log w_{kb} - (\\beta - 1)\\, \\widehat{TC}_{kb}\\big],

    since the KL term splits into mutual information, total correlation and dimension-wise KL
    (:func:`kl_decomposition`), of which the beta-TCVAE weights the second by :math:`\\beta`.
    :math:`\\beta = 1` is the ELBO. A reduction of the stream; the guide's local sites must be
    reparameterized and factorize over their dimensions (as pvae's diagonal guides do).
    Once an epoch, :meth:`epoch_metrics` gives the three terms on the training rows.
    """

    def __init__(self, tc_beta: float = 1.0, estimator: str = "mws", num_particles: int = 1,
                 info: Optional[ProgramInfo] = None):
        if estimator not in TC_ESTIMATORS:
            raise ValueError(f"unknown TC estimator {estimator!r}: choose one of {', '.join(TC_ESTIMATORS)}")
        if not 0 <= tc_beta < math.inf:
            raise ValueError(f"tc_beta must be >= 0 and finite, got {tc_beta}")
        self.tc_beta, self.estimator, self.num_particles = tc_beta, estimator, num_particles
        self.info = None if info is None else self._checked(info)

    @staticmethod
    def _checked(info: ProgramInfo) -> ProgramInfo:
        _check_stream_objective("tc", info)
        if info.enumerated:
            raise ProgramError("--elbo tc: the model enumerates discrete sites, which leave no prior of the latents "
                               "apart: use --elbo enum")
        return replace(info, analytic_kl=frozenset())

    def _stream(self, model, guide, batch: Batch, num_particles: int) -> LogWeights:
        if self.info is None:
            self.info = self._checked(inspect_programs(model, guide, batch))
        return log_weights(model, guide, batch, num_particles, self.info, keep_traces=True)

    def differentiable_loss(self, model, guide, batch) -> torch.Tensor:
        batch = Batch.of(batch)
        lw = self._stream(model, guide, batch, self.num_particles)
        objective = lw.log_w  # (K, B)
        if self.tc_beta != 1.0:
            objective = objective - (self.tc_beta - 1.0) * kl_decomposition(lw, batch.num_data, self.estimator).tc
        return -objective.mean(0).sum() * (batch.num_data / len(batch))

    def loss(self, model, guide, batch) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, batch).item()

    @torch.no_grad()
    def epoch_metrics(self, model, guide, batch) -> dict:
        """The means over the rows of ``batch`` of the mutual information, total correlation and
        dimension-wise KL (one particle each; ``q(z)`` estimated from all rows of the batch, which are
        ``len(batch)`` of the split's ``batch.num_data``)."""
        batch = Batch.of(batch)
        parts = kl_decomposition(self._stream(model, guide, batch, 1), batch.num_data, self.estimator)
        return {name: getattr(parts, name).mean().item() for name in ("mi", "tc", "dim_kl")}


@dataclass
class KLDecomposition:
    """Each particle's KL term split in three (Chen et al. 2018), ``(K, B)`` each:

    .. math:: \\log q(z \\mid x) - \\log p(z) = \\underbrace{\\log q(z \\mid x) - \\log \\hat q(z)}_{\\text{mi}}
        + \\underbrace{\\log \\hat q(z) - \\textstyle\\sum_d \\log \\hat q(z_d)}_{\\text{tc}}
        + \\underbrace{\\textstyle\\sum_d \\log \\hat q(z_d) - \\log p(z)}_{\\text{dim\\_kl}}

    whose means over the data estimate the index-code mutual information, the total correlation of
    the aggregate posterior :math:`q(z) = \\frac1N \\sum_n q(z \\mid x_n)` and the dimension-wise KL.
    """

    mi: torch.Tensor
    tc: torch.Tensor
    dim_kl: torch.Tensor


def kl_decomposition(lw: LogWeights, num_data: int, estimator: str = "mws", chunk_size: int = 256) -> KLDecomposition:
    """Chen et al.'s split of the KL (:class:`KLDecomposition`) for a chunk of the stream kept with its
    traces (``log_weights(..., keep_traces=True)``), its B datapoints a minibatch of a data set of
    ``num_data``.

    The aggregate posterior at each draw :math:`z_i \\sim q(z \\mid x_i)` is estimated from the
    minibatch, :math:`\\hat q(z_i) = \\sum_j a_{ij}\\, q(z_i \\mid x_j)`, and each dimension's marginal
    :math:`\\hat q(z_{id})` with the same weights:

    - ``mws``, minibatch weighted sampling: :math:`a_{ij} = 1/B`, the minibatch taken as B draws from
      the data. (Chen et al. write :math:`1/(NB)`, which shifts the estimated total correlation by
      :math:`(D - 1)\\log N`: it would not vanish for a factorized q. The gradient is the same.)
    - ``stratified``: :math:`a_{ii} = 1/N` for the datapoint's own q and
      :math:`a_{ij} = (N - 1)/(N (B - 1))` for the others, so that
      :math:`E[\\hat q(z_i)] = q(z_i)` exactly over minibatches of B distinct rows that contain i.

    Either way each row of weights sums to 1 and the estimate is exact when the minibatch is the whole
    data set. Every local guide site must factorize over its dimensions (an ``Independent`` of a
    univariate distribution); rows are taken ``chunk_size`` at a time, so memory is
    ``K x chunk_size x B x D``.
    """
    if estimator not in TC_ESTIMATORS:
        raise ValueError(f"unknown TC estimator {estimator!r}: choose one of {', '.join(TC_ESTIMATORS)}")
    if lw.traces is None:
        raise ValueError("kl_decomposition reads the guide's sites: take the stream with keep_traces=True")
    if lw.log_prior is None:
        raise ProgramError("the KL decomposition needs the latents' prior apart from the likelihood, which "
                           "enumerated sites join")
    guide_trace = lw.traces[0]
    sites = [s for s in latent_sites(guide_trace).values() if data_frame(s) is not None]
    if not sites:
        raise ProgramError("the guide has no local latent site: there is no KL to decompose")
    size = lw.log_w.shape[1]
    mi, tc, dim_kl = [], [], []
    for rows in torch.arange(size, device=lw.log_w.device).split(chunk_size):
        cross = torch.cat([_cross_log_q(site, rows) for site in sites], -1)  # (K, I, B, L)
        log_qz, log_qz_dims = aggregate_log_q(cross, rows, num_data, estimator)
        mi.append(lw.log_q[:, rows] - log_qz)
        tc.append(log_qz - log_qz_dims)
        dim_kl.append(log_qz_dims - lw.log_prior[:, rows])
    return KLDecomposition(torch.cat(mi, 1), torch.cat(tc, 1), torch.cat(dim_kl, 1))


def aggregate_log_q(cross: torch.Tensor, rows: torch.Tensor, num_data: int, estimator: str = "mws") -> tuple:
    """The minibatch estimates of :func:`kl_decomposition`: :math:`\\log \\hat q(z_i)` and
    :math:`\\sum_d \\log \\hat q(z_{id})`, ``(K, I)`` each, from the per-dimension log-densities
    ``cross`` ``(K, I, B, L)`` of the draws of the minibatch's rows ``rows`` (I of its B) under the q of
    each of its B rows, a minibatch of a data set of ``num_data``."""
    if estimator not in TC_ESTIMATORS:
        raise ValueError(f"unknown TC estimator {estimator!r}: choose one of {', '.join(TC_ESTIMATORS)}")
    size = cross.shape[2]
    if estimator == "mws" or size == 1:
        log_a = cross.new_full((len(rows), size), -math.log(size))
    else:
        log_a = cross.new_full((len(rows), size), math.log((num_data - 1) / (num_data * (size - 1))))
        log_a[torch.arange(len(rows), device=rows.device), rows] = -math.log(num_data)
    log_qz = torch.logsumexp(log_a + cross.sum(-1), -1)
    log_qz_dims = torch.logsumexp(log_a[..., None] + cross, -2).sum(-1)
    return log_qz, log_qz_dims


def _cross_log_q(site: dict, rows: torch.Tensor) -> torch.Tensor:
    """``(K, I, B, L)``: :math:`\\log q(z_{k i l} \\mid x_j)` per dimension l of the site, for the draws of
    datapoints ``rows`` under the q of every datapoint j of the batch."""
    fn, value = site["fn"], site["value"]
    univariate = factorized(fn)
    if univariate is None:
        raise ProgramError(
            f"guide site {site['name']!r} has a q that does not factorize over its dimensions "
            f"({type(fn).__name__}): the total correlation is estimated from per-dimension densities, which "
            "pvae's diagonal guides have"
        )
    dims = {f.name: f.dim for f in site["cond_indep_stack"] if f.vectorized}
    batch_dims = value.dim() - fn.event_dim
    b_axis = batch_dims + dims[DATA]
    draws = value.index_select(b_axis, rows).movedim(b_axis, 0).unsqueeze(b_axis + 1)
    cross = univariate.log_prob(draws).movedim(b_axis + 1, 1)  # (I, B, the rest of the value's shape)
    if PARTICLES in dims:
        k_axis = batch_dims + dims[PARTICLES]
        cross = cross.movedim(2 + k_axis - (k_axis > b_axis), 0)
    else:
        cross = cross.unsqueeze(0)
    return cross.reshape(cross.shape[0], cross.shape[1], cross.shape[2], -1)


def factorized(fn):
    """The elementwise distribution under ``.to_event``, or None if ``fn`` does not factorize over its
    dimensions."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if fn.event_shape == () else None


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
