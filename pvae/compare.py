"""Inference suboptimality on a fixed model: how far amortized, semi-amortized and mean-field q fall
from the posterior (Cremer, Li & Duvenaud 2018), for any model with local latent sites.

For a trained model and datapoints :func:`compare_inference` measures, per datapoint,

- :math:`\\mathcal L[q]`, the ELBO of the amortized guide (a semi-amortized guide's encoder);
- :math:`\\mathcal L[q^*]`, the ELBO of the best q of the guide's family over *all* continuous local
  sites (a diagonal Normal in unconstrained space per site, :class:`~pvae.guides.LocalFamily`; for a
  guide with a joint family, :mod:`pvae.guides.flows`, the best full-covariance Gaussian or planar
  flow), optimized for each datapoint on the frozen model (:func:`optimize_local`: the ELBO over a
  fixed set of antithetic, moment-matched draws per datapoint, a deterministic function that L-BFGS
  climbs for all datapoints of a batch at once in tens of iterations), then estimated afresh on new
  draws;
- :math:`\\mathcal L[q_K]`, the encoder's q after K steps of gradient ascent over all local sites
  jointly (:func:`pvae.guides.refine`, the refinement of semi-amortized inference, Kim et al. 2018);
- :math:`\\log \\hat p(x)`, the importance-weighted bound with many samples (Burda et al. 2015),
  with q* as the proposal (the closest q of the family to each posterior), from the same pass over
  its samples as :math:`\\mathcal L[q^*]`. (Not the larger of the bounds under q* and under q: a
  poor proposal's heavy-tailed weights now and then put its estimate above log p(x), and the maximum
  would keep those.)

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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from pvae.guides import LocalFamily, ParamsGuide, model_sites, refine

from .estimate import Estimate
from .evaluate import condition_on, global_means
from .inference import elbo_and_iwae_bound, elbo_terms, log_weights
from .optim import minimize_rows
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
from .utils import set_seed

INITS = ("encoder", "prior")


# the fewest fixed draws q*'s objective takes for a family whose draws are not affine in the noise
FLEXIBLE_DRAWS = 512


@dataclass
class CompareConfig:
    """How :func:`compare_inference` measures; saved with its results."""

    batch_size: int = 100  # datapoints whose q* are optimized at once, vectorized
    init: str = "encoder"  # where q* starts: "encoder" (when there is one) or "prior"
    particles: int = 128  # fixed draws of z per datapoint in q*'s objective (common random numbers)
    max_steps: int = 200  # L-BFGS iterations per datapoint at most
    tol: float = 1e-6  # q* has converged when a full L-BFGS step gains less than tol * |ELBO|
    refine_steps: tuple = (1, 5, 20)  # K of the semi-amortized bounds L[q_K]
    refine_lr: float = 0.05  # step size of the refinement's natural-gradient steps (guides.semi_amortized)
    elbo_particles: int = 1000  # samples per datapoint of each ELBO estimate of L[q] and L[q_K]
    # samples per datapoint of log p(x)'s importance-weighted estimate under q*, and of L[q*] on the same draws
    iwae_samples: int = 5000
    chunk_size: int = 100  # particles evaluated at once, which bounds memory (smaller chunks stay in cache)
    seed: int = 0

    def __post_init__(self):
        self.refine_steps = tuple(sorted(set(int(k) for k in self.refine_steps)))
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}")
        for name in ("batch_size", "particles", "max_steps", "elbo_particles", "iwae_samples", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if any(k < 1 for k in self.refine_steps):
            raise ValueError("every refine step count must be >= 1")
        if not (0 < self.tol < 1 and 0 < self.refine_lr < math.inf):
            raise ValueError(f"tol must be in (0, 1) and refine_lr positive and finite, got {self.tol}, {self.refine_lr}")


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
    q_star_steps: float = 0.0  # L-BFGS iterations per datapoint, on average, before q* converged
    settings: dict = field(default_factory=dict)  # the CompareConfig, and what was measured
    seconds: dict = field(default_factory=dict)  # wall-clock seconds per stage of the study

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


def common_noise(num_draws: int, rows: int, dim: int, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None) -> torch.Tensor:
    """``(S, rows, dim)`` standard normal draws for q*'s objective, S = ``num_draws`` rounded up to
    an even number: per row, antithetic pairs :math:`\\pm\\epsilon_s` (every odd sample moment is 0)
    whose second moments are matched to the identity, :math:`\\frac1S \\sum_s \\epsilon_s
    \\epsilon_s^\\top = I` (whitened by the Cholesky factor of their own; per dimension where
    ``S / 2 <= dim``). On a Gaussian posterior the objective is then the exact ELBO, whose optimum q*
    is; elsewhere the draws' errors enter from the third order of log p on."""
    half = max(1, math.ceil(num_draws / 2))
    eps = torch.randn(half, rows, dim, generator=generator, device=device, dtype=dtype)
    if half > dim:
        second = torch.einsum("sbi,sbj->bij", eps, eps) / half  # (rows, dim, dim)
        factor = torch.linalg.cholesky(second)
        eps = torch.linalg.solve_triangular(factor, eps.permute(1, 2, 0), upper=False).permute(2, 0, 1)
    else:
        eps = eps / eps.pow(2).mean(0).sqrt()
    return torch.cat([eps, -eps])


class _DrawnGuide:
    """The local family at raw parameters ``raw`` (rows of the batch it is called with), its continuous
    sites at the fixed standard normal draws ``noise`` (one row per datapoint)."""

    def __init__(self, family: LocalFamily, raw: torch.Tensor, noise: torch.Tensor):
        self.family, self.raw, self.noise = family, raw, noise

    def call_batch(self, batch: Batch):
        return self.family.sample(self.family.unpack(self.raw), batch, self.noise)


def optimize_local(
    model: Callable,
    batch,
    family: LocalFamily,
    start: Optional[dict] = None,
    num_particles: int = 128,
    max_steps: int = 200,
    tol: float = 1e-6,
    generator: Optional[torch.Generator] = None,
) -> tuple:
    """The best q of ``family`` for each datapoint of ``batch`` under ``model``, whose parameters stay
    as they are.

    Each datapoint's ELBO is taken over a fixed set of ``num_particles`` draws (:func:`common_noise`,
    common random numbers; at least ``2 (D + 1)`` for D latent dimensions, so that they can be
    whitened): a deterministic, smooth function of its parameters, which L-BFGS
    minimizes for all datapoints at once, each with its own curvature and line search
    (:func:`pvae.optim.minimize_rows`), until a full quasi-Newton step gains less than
    ``tol * |ELBO|``. The ELBO takes the closed-form KL where it is exact; the S draws of a batch of
    B datapoints are one pass of the model over S * B rows. The locs are optimized in units of the
    starting scales, which makes the problem well conditioned when the start is an encoder's q.

    The bound reported for q* must not be this objective (optimized on these draws, it is biased
    upwards): estimate it with fresh draws, as :func:`compare_inference` does.

    :param start: the starting parameters (an encoder's :meth:`local_params`); None: every loc 0 and
        every scale 1 in unconstrained space (the prior, for a standard normal one).
    :param generator: draws the fixed noise (default: torch's global generator).
    :returns: ``(params, iterations)``: q*'s parameters (detached) and, per datapoint, the
        objective's evaluations before it converged, ``(B,)``.
    """
    batch = Batch.of(batch)
    # each datapoint's own ELBO, unscaled
    batch = Batch.of(batch.x, inputs=batch.inputs, split=batch.split)
    device = batch.x.device
    if start is None:
        raw0 = family.init_raw(len(batch), 1.0, device)
    else:
        raw0 = family.pack({n: {k: v.detach() for k, v in p.items()} for n, p in start.items()})
    raw0 = raw0.detach().to(batch.x.dtype)
    precondition = family.loc_units(raw0)  # locs in units of the starting scale
    # whitening needs more pairs of draws than dimensions; fewer leave a bias of tenths of a nat (measured)
    draws = max(num_particles, 2 * (family.latent_size + 1))
    if not getattr(family, "affine", True):
        # a family that bends its draws (a flow) can fit itself to a few fixed ones: on the tests'
        # correlated Gaussian, two planar maps over 32 draws left a gap of 0.36 nats, over 512 of 0.0008
        draws = max(draws, FLEXIBLE_DRAWS)
    noise = common_noise(draws, len(batch), family.latent_size, generator, device, batch.x.dtype)
    draws = noise.shape[0]
    model = Program(model, "model")

    def program_at(rows, u):
        raw = raw0[rows] + u * precondition[rows]
        guide = _DrawnGuide(family, raw.repeat(draws, 1), noise[:, rows].reshape(draws * len(rows), -1))
        return Program(guide, "guide"), batch.rows(rows.repeat(draws))  # particle s of row i: row s * n + i

    everything = torch.arange(len(batch), device=device)
    info = inspect_programs(model, *program_at(everything[:1], raw0.new_zeros(1, family.size)), check=False)
    first = [True]

    def negative_elbo(u, rows):
        guide, rows_batch = program_at(rows, u)
        with pyro.validation_enabled(is_validation_enabled() and first[0]):
            lw = log_weights(model, guide, rows_batch, 1, info)
        first[0] = False
        return -lw.elbo.reshape(draws, len(rows)).mean(0)

    result = minimize_rows(negative_elbo, raw0.new_zeros(raw0.shape), max_iter=max_steps, ftol=tol)
    raw = raw0 + result.x * precondition
    return family.unpack(raw.detach()), result.iterations


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
    :param progress: show a progress bar on stderr: the datapoints done, a batch of ``config.batch_size``
        at a time, and an estimate of the time left.
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
    clock = _StageClock(batch.x.device)
    starts, refined = None, {}
    # the bar counts datapoints done, one batch at a time (every batch shown: each takes seconds), and
    # its estimate of the time left is taken over the batches alone
    with tqdm(total=len(batch), unit="datapoint", desc="pvae compare", disable=not progress, leave=False,
              mininterval=0) as bar:
        if readable:
            # the encoder's q and its refinements for every datapoint at once: each step is one pass over them all
            bar.set_postfix_str(f"L[q_K], K = {', '.join(map(str, config.refine_steps))}, for all {len(batch)} at once")
            with torch.no_grad():
                starts = encoder.local_params(batch)
            with clock("L[q_K]"):
                params, done = starts, 0
                for k in config.refine_steps:  # gradient steps are memoryless: go on from the last K
                    params = refine(model, batch, params, encoder.family, k - done, config.refine_lr)
                    refined[k], done = params, k
            bar.unpause()  # the batches' clock starts now
        bar.set_postfix_str(f"q*, L[q*] and log p(x) by batches of {config.batch_size}")
        infos = {}  # one look at each pair's structure serves every batch
        noise = torch.Generator(device=batch.x.device).manual_seed(config.seed)  # q*'s fixed draws
        for rows in _row_blocks(len(batch), config.batch_size, batch.x.device):
            sub = batch.rows(rows)
            unscaled = Batch.of(sub.x, inputs=sub.inputs, split=sub.split)
            start = None
            if encoder is not None:
                with clock("L[q]"):
                    values["elbo_q"].append(_elbo(model, encoder_program, unscaled, config, infos, "q"))
            if readable:
                start = _params_rows(starts, rows)
                for k in config.refine_steps:
                    with clock("L[q_K]"):
                        guide_k = ParamsGuide(encoder.family, _params_rows(refined[k], rows))
                        values[f"q_{k}"].append(_elbo(model, guide_k, unscaled, config, infos, "q_K"))
            with clock("q*"):
                q_star, n = optimize_local(model, sub, family, start if init == "encoder" else None, config.particles,
                                           config.max_steps, config.tol, noise)
                steps.append(n)
            with clock("L[q*], log p(x)"):
                # fresh draws: the bound at q*, not the optimized objective (biased upwards by the optimization)
                proposal = Program(ParamsGuide(family, q_star), "guide")
                elbo, log_px = elbo_and_iwae_bound(model, proposal, unscaled, config.iwae_samples, config.chunk_size,
                                                   _info(model, proposal, unscaled, infos, "q*"))
                values["elbo_q_star"].append(elbo)
                values["log_px"].append(log_px)
            bar.update(len(rows))
    v = {key: torch.cat(parts) for key, parts in values.items() if parts}
    result = Comparison(
        datapoints=len(batch),
        log_px=Estimate.of(v["log_px"]),
        elbo_q_star=Estimate.of(v["elbo_q_star"]),
        approximation_gap=Estimate.of(v["log_px"] - v["elbo_q_star"]),
        q_star_steps=torch.cat(steps).float().mean().item(),
        settings={**asdict(config), "init": init, "family": family.describe(), **(settings or {})},
        seconds=clock.seconds,
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


class _StageClock:
    """Wall-clock seconds per stage, summed over batches (the device synchronized at each stage's ends)."""

    def __init__(self, device):
        self.device, self.seconds = torch.device(device), {}

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _elbo(model, guide, batch, config, infos: dict, key: str) -> torch.Tensor:
    """L of ``guide`` per datapoint of ``batch``, with the structure of the pair looked at once (``infos``)."""
    return elbo_terms(model, guide, batch, config.elbo_particles, config.chunk_size,
                      _info(model, guide, batch, infos, key))["elbo"]


def _info(model, guide, batch, infos: dict, key: str):
    if key not in infos:
        infos[key] = inspect_programs(model, guide, batch, check=False)
    return infos[key]


def _row_blocks(n: int, size: int, device) -> list:
    return list(torch.arange(n, device=device).split(size))


def _params_rows(params: dict, rows: torch.Tensor) -> dict:
    """The rows ``rows`` of local parameters ``{site: {name: (B, n)}}``."""
    return {site: {k: v[rows] for k, v in p.items()} for site, p in params.items()}
