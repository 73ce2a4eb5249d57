"""Inference suboptimality on a fixed model: how far amortized, semi-amortized and mean-field q fall
from the posterior (Cremer, Li & Duvenaud 2018), for any model with local latent sites.

For a trained model and datapoints :func:`compare_inference` measures, per datapoint,

- :math:`\\mathcal L[q]`, the ELBO of the amortized guide (a semi-amortized guide's encoder);
- :math:`\\mathcal L[q^*]`, the ELBO of the best q of the guide's family over *all* continuous local
  sites (a diagonal Normal in unconstrained space per site, :class:`~pvae.guides.LocalFamily`; for a
  guide with a joint family, :mod:`pvae.guides.flows`, the best full-covariance Gaussian or planar
  flow), optimized for each datapoint on the frozen model (:func:`optimize_local`: all datapoints of
  a batch at once, Adam, many particles per step, until the batch's bound stops improving);
- :math:`\\mathcal L[q_K]`, the encoder's q after K steps of gradient ascent over all local sites
  jointly (:func:`pvae.guides.refine`, the refinement of semi-amortized inference, Kim et al. 2018);
- :math:`\\log \\hat p(x)`, the importance-weighted bound with many samples (Burda et al. 2015),
  with q* as the proposal: the closest q of the family to each posterior. (Not the larger of the bounds
  under q* and under q: a poor proposal's heavy-tailed weights now and then put its estimate above
  log p(x), and the maximum would keep those.)

and the gaps that split the inference gap :math:`\\log p(x) - \\mathcal L[q]` in two:

.. math::
    \\underbrace{\\log \\hat p(x) - \\mathcal L[q^*]}_{\\text{approximation gap}}
    + \\underbrace{\\mathcal L[q^*] - \\mathcal L[q]}_{\\text{amortization gap}}.

The first is the price of the family, the second that of sharing one encoder across the data. Every
figure is a mean over datapoints with its standard error (gaps are paired, datapoint by datapoint).
Enumerated discrete sites are summed out exactly in every bound; global sites are held at the guide's
mean (the study is conditional on them). On the linear-Gaussian models the approximation gap has the
closed form :math:`\\frac12 (\\sum_d \\log \\Lambda_{dd} - \\log\\det\\Lambda)` with :math:`\\Lambda` the
posterior precision of all local latents, which the tests hold it to.

The study returns numbers (:class:`Comparison`); :mod:`pvae.reports` renders them and
:mod:`pvae.run` writes them into a run folder.

References:

1. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
2. Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, arXiv 1802.02550.
3. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from pvae.guides import LocalFamily, ParamsGuide, model_sites, refine

from .estimate import Estimate
from .evaluate import condition_on, global_means
from .inference import elbo_terms, iwae_bound, lean_elbo
from .programs import (
    Batch,
    Program,
    ProgramError,
    check_bounds_defined,
    inspect_programs,
    is_improper,
    latent_sites,
    trace_model,
)
from .protocols import LocalEncoder, PerDatapoint, Refining
from .svi import SVIStep
from .utils import set_seed

INITS = ("encoder", "prior")


@dataclass
class CompareConfig:
    """How :func:`compare_inference` measures; saved with its results."""

    batch_size: int = 100  # datapoints whose q* are optimized at once, vectorized
    init: str = "encoder"  # where q* starts: "encoder" (when there is one) or "prior"
    particles: int = 100  # samples of z per datapoint and Adam step of q*
    lr: float = 5e-2  # Adam's first learning rate for q*'s parameters
    max_steps: int = 3000  # Adam steps per batch at most
    window: int = 100  # Adam steps whose mean bound is compared with the previous window's
    lr_decays: int = 3  # times the lr is divided by 10 on a plateau before q* counts as converged
    refine_steps: tuple = (1, 5, 20)  # K of the semi-amortized bounds L[q_K]
    refine_lr: float = 1e-2  # step size of the refinement
    elbo_particles: int = 1000  # samples per datapoint of each final ELBO estimate
    iwae_samples: int = 5000  # samples per datapoint of log p(x)'s importance-weighted estimate
    chunk_size: int = 500  # particles evaluated at once, which bounds memory
    seed: int = 0

    def __post_init__(self):
        self.refine_steps = tuple(sorted(set(int(k) for k in self.refine_steps)))
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}")
        for name in ("batch_size", "particles", "max_steps", "window", "elbo_particles", "iwae_samples",
                     "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr_decays < 0 or any(k < 1 for k in self.refine_steps):
            raise ValueError("lr_decays must be >= 0 and every refine step count >= 1")
        if not (0 < self.lr < math.inf and 0 < self.refine_lr < math.inf):
            raise ValueError(f"lr and refine_lr must be positive and finite, got {self.lr}, {self.refine_lr}")


ESTIMATES = ("log_px", "elbo_q_star", "approximation_gap", "elbo_q", "amortization_gap", "inference_gap")


@dataclass
class Comparison:
    """The figures of :func:`compare_inference`, in nats per datapoint.

    ``elbo_q``, ``amortization_gap`` and ``inference_gap`` are None without an encoder (a mean-field
    run); ``elbo_q_k`` and ``gap_q_k`` map K to L[q_K] and to log p̂(x) - L[q_K].
    """

    datapoints: int
    log_px: Estimate
    elbo_q_star: Estimate
    approximation_gap: Estimate
    elbo_q: Optional[Estimate] = None
    amortization_gap: Optional[Estimate] = None
    inference_gap: Optional[Estimate] = None
    elbo_q_k: dict = field(default_factory=dict)
    gap_q_k: dict = field(default_factory=dict)
    q_star_steps: float = 0.0  # Adam steps per batch, on average, before q* converged
    settings: dict = field(default_factory=dict)  # the CompareConfig, and what was measured

    def to_dict(self) -> dict:
        from .evaluate import finite_or_none

        d = asdict(self)
        for key in ("elbo_q_k", "gap_q_k"):  # JSON keys are strings
            d[key] = {str(k): v for k, v in d[key].items()}
        return finite_or_none(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        d = dict(d)
        for key in ESTIMATES:
            if d.get(key) is not None:
                d[key] = Estimate.from_dict(d[key])
        for key in ("elbo_q_k", "gap_q_k"):
            d[key] = {int(k): Estimate.from_dict(v) for k, v in d.get(key, {}).items()}
        return cls(**d)


# ----------------------------------------------------------------------------- q*


class _RawGuide:
    """The local family drawn from a flat ``(B, size)`` tensor of raw parameters (q*'s, optimized)."""

    def __init__(self, family: LocalFamily, raw: torch.Tensor):
        self.family, self.raw = family, raw

    def call_batch(self, batch: Batch):
        return ParamsGuide(self.family, self.family.unpack(self.raw)).call_batch(batch)


def optimize_local(
    model: Callable,
    batch,
    family: LocalFamily,
    start: Optional[dict] = None,
    num_particles: int = 100,
    lr: float = 5e-2,
    max_steps: int = 3000,
    window: int = 100,
    lr_decays: int = 3,
) -> tuple:
    """The best q of ``family`` for each datapoint of ``batch`` under ``model``, whose parameters stay
    as they are.

    A dense ``(B, size)`` tensor of the family's parameters is optimized by Adam on the sum of the
    datapoints' ELBOs (one :class:`~pvae.svi.SVIStep` a step), so every datapoint climbs its own
    bound and all move together; the ELBO uses ``num_particles`` vectorized samples per datapoint and
    the closed-form KL where exact. The batch's mean bound is averaged over windows of ``window``
    steps; when a window's average is no better than the previous one's, the bound has stopped
    improving at this learning rate, which is divided by 10, ``lr_decays`` times, and then the
    optimization stops (or after ``max_steps``). Averaging over a window sees through the Monte Carlo
    noise of single steps, and the smaller rates let q* settle on its optimum.

    :param start: the starting parameters (an encoder's :meth:`local_params`); None: every loc 0 and
        every scale 1 in unconstrained space (the prior, for a standard normal one).
    :returns: ``(params, steps)``: q*'s parameters (detached) and the number of Adam steps taken.
    """
    batch = Batch.of(batch)
    # each datapoint's own ELBO, unscaled
    batch = Batch.of(batch.x, inputs=batch.inputs, split=batch.split)
    if start is None:
        raw = family.init_raw(len(batch), 1.0, batch.x.device)
    else:
        raw = family.pack({n: {k: v.detach() for k, v in p.items()} for n, p in start.items()})
    raw = raw.detach().clone().requires_grad_(True)
    model, guide = Program(model, "model"), Program(_RawGuide(family, raw), "guide")
    info = inspect_programs(model, guide, batch, check=False)
    optimizer = torch.optim.Adam([raw], lr=lr)
    step = SVIStep(model, guide, lean_elbo(info, num_particles), [optimizer], [raw])
    last, total, decays, n = -math.inf, 0.0, 0, 0
    for n in range(1, max_steps + 1):
        total = total - step(batch)  # the sum over datapoints of their ELBOs, on the device
        if n % window:
            continue
        mean = total.item() / (window * len(batch))  # the batch's mean bound over the window
        total = 0.0
        if mean > last:
            last = mean
            continue
        if decays == lr_decays:
            break
        decays += 1
        for group in optimizer.param_groups:
            group["lr"] /= 10
    return family.unpack(raw.detach()), n


# ----------------------------------------------------------------------------- the study


def study_encoder(guide) -> Optional[Callable]:
    """The amortized guide whose q the study measures: a semi-amortized guide's encoder, the guide
    itself if it has a q for any x, None for a mean-field guide (or no guide)."""
    if guide is None or isinstance(guide, PerDatapoint):
        return None
    return guide.encoder if isinstance(guide, Refining) else guide


def compare_inference(
    model: Callable,
    data,
    guide: Optional[Callable] = None,
    config: Optional[CompareConfig] = None,
    progress: bool = False,
    settings: Optional[dict] = None,
) -> Comparison:
    """Measure L[q], L[q*], L[q_K], log p̂(x) and the gaps on the datapoints ``data``.

    :param model: a trained Pyro model; it is not changed.
    :param data: ``(N, ...)`` datapoints, or a :class:`~pvae.programs.Batch` with their side inputs.
    :param guide: the run's guide: an amortized guide gives L[q] (and, if it offers its local parameters,
        :class:`~pvae.protocols.LocalEncoder`, the start of q* and L[q_K]); a semi-amortized guide its
        encoder's; a mean-field guide or None gives q* (from the prior) and log p̂(x) only. A model with
        global sites needs a guide: the study holds them at its mean.
    :param settings: extra entries for the result's ``settings`` (the run, the split, ...).
    """
    config = config or CompareConfig()
    batch = Batch.of(data)
    if len(batch) == 0:
        raise ValueError("no datapoints to compare on")
    probe = batch.rows(slice(0, config.batch_size))
    if guide is not None:
        info = inspect_programs(model, guide, probe)
        check_bounds_defined("compare", info.point_mass, info.improper)
    else:
        check_bounds_defined("compare", improper=[n for n, s in latent_sites(trace_model(model, probe)).items()
                                                  if is_improper(s["fn"])])
    # after the check's traced runs, so that the study's draws do not depend on it; the model's
    # pyro.params are trained and stay
    set_seed(config.seed, clear_param_store=False)
    encoder = study_encoder(guide)
    # q* within the encoder's own family (a flow guide's flows), else the diagonal one
    family = encoder.family if isinstance(encoder, LocalEncoder) else LocalFamily(model_sites(model, probe))
    discrete = [s.name for s in family.sites if s.kind != "continuous"]
    if discrete:
        raise ProgramError(f"the gap study optimizes q* over continuous sites, and site(s) {', '.join(discrete)} "
                           "are discrete: mark them `infer={'enumerate': 'parallel'}` in the model to sum them out")
    if not family.sites:
        raise ProgramError("the model has no continuous local latent site: there is no q to compare")
    means = {}
    if guide is not None:
        means = global_means(guide, probe, inspect_programs(model, guide, probe))
    elif any(not s.is_local for s in model_sites(model, probe)):
        raise ProgramError("the model has global latent sites: pass its guide, whose mean the study holds them at")
    model, encoder_program = condition_on(means, model, encoder)
    readable = isinstance(encoder, LocalEncoder) and all(s.kind == "continuous" for s in encoder.family.sites)
    init = config.init if readable else "prior"
    values = {key: [] for key in ("log_px", "elbo_q_star", "elbo_q", *(f"q_{k}" for k in config.refine_steps))}
    steps = []
    for sub in tqdm(batch.split_rows(config.batch_size), desc="q*", disable=not progress, leave=False):
        unscaled = Batch.of(sub.x, inputs=sub.inputs, split=sub.split)
        start = None
        if encoder is not None:
            values["elbo_q"].append(_elbo(model, encoder_program, unscaled, config))
        if readable:
            with torch.no_grad():
                start = encoder.local_params(sub)
            params, done = start, 0
            for k in config.refine_steps:  # gradient steps are memoryless: go on from the last K
                params = refine(model, sub, params, encoder.family, k - done, config.refine_lr)
                done = k
                values[f"q_{k}"].append(_elbo(model, ParamsGuide(encoder.family, params), unscaled, config))
        q_star, n = optimize_local(model, sub, family, start if init == "encoder" else None, config.particles,
                                   config.lr, config.max_steps, config.window, config.lr_decays)
        steps.append(n)
        proposal = Program(ParamsGuide(family, q_star), "guide")
        values["elbo_q_star"].append(_elbo(model, proposal, unscaled, config))
        values["log_px"].append(iwae_bound(model, proposal, unscaled, config.iwae_samples, config.chunk_size))
    v = {key: torch.cat(parts) for key, parts in values.items() if parts}
    result = Comparison(
        datapoints=len(batch),
        log_px=Estimate.of(v["log_px"]),
        elbo_q_star=Estimate.of(v["elbo_q_star"]),
        approximation_gap=Estimate.of(v["log_px"] - v["elbo_q_star"]),
        q_star_steps=sum(steps) / len(steps),
        settings={**asdict(config), "init": init, "family": family.describe(), **(settings or {})},
    )
    if means:
        result.settings["global sites"] = f"{', '.join(means)}: held at the guide's mean"
    if encoder is not None:
        result.elbo_q = Estimate.of(v["elbo_q"])
        result.amortization_gap = Estimate.of(v["elbo_q_star"] - v["elbo_q"])
        result.inference_gap = Estimate.of(v["log_px"] - v["elbo_q"])
    if readable:
        result.elbo_q_k = {k: Estimate.of(v[f"q_{k}"]) for k in config.refine_steps}
        result.gap_q_k = {k: Estimate.of(v["log_px"] - v[f"q_{k}"]) for k in config.refine_steps}
    return result


def _elbo(model, guide, batch, config) -> torch.Tensor:
    return elbo_terms(model, guide, batch, config.elbo_particles, config.chunk_size)["elbo"]
