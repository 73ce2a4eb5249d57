"""Evaluation and diagnostics of any model/guide pair: reductions of the stream of per-datapoint
log-weights (:func:`pvae.inference.log_weight_chunks`).

For every datapoint, :func:`evaluate` draws K particles :math:`z_k \\sim q(z \\mid x)` in chunks and
gets from that one pass:

- the importance-weighted bound [2]
  :math:`\\log \\hat p(x) = \\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)`, by a running
  log-sum-exp over the chunks (enumerated discrete sites summed out exactly), and from it the negative
  log-likelihood in nats and in bits per dimension;
- the Monte Carlo ELBO :math:`\\frac1K \\sum_k \\log w_k` and its parts: the reconstruction
  :math:`E_q[\\log p(x \\mid z)]` and the KL :math:`E_q[\\log q(z \\mid x) - \\log p(z)]`, with the
  closed-form KL beside it where every local site's is exact [1];
- per dimension of the continuous local sites, the posterior means :math:`E_q[z_d]`, whose variance
  over datapoints :math:`\\mathrm{Cov}_x(E_q[z_d])` marks the active units (above 0.01, [2]), and the
  KL per dimension: together they show posterior collapse;
- the PSIS diagnostic [3, 4]: the Pareto :math:`\\hat k` of the K importance ratios
  :math:`p(x, z_k) / q(z_k \\mid x)` (:func:`psis_khat`, through arviz). Above 0.7 the importance
  sampling estimate of :math:`p(x)`, and the guide as a proposal, cannot be trusted; below 0.5 the
  ratios have a finite variance. Where no tail can be fitted (ratios all equal: q is the posterior;
  too few distinct ratios: a discrete guide; NaN or infinite ratios) k̂ is NaN and the reason is
  counted, never a silent infinity.

A point-mass guide (an autoencoder's) has no density and an improper prior no normalized p(x): such
programs are refused with a one-line error (:func:`~pvae.programs.check_bounds_defined`);
:mod:`pvae.autoencoding` measures them by their reconstructions.

A model with global latent sites (outside the data plate) is evaluated conditionally on them, at the
global guide's mean: log p(x | g), the ELBO of the local sites, ...; the output says so. With
``marginal=True`` the joint evidence of the evaluated datapoints is estimated too,
:math:`\\frac1N \\log \\frac1S \\sum_s \\frac{p(g_s)}{q(g_s)} \\prod_n \\hat p(x_n \\mid g_s)`, with S
draws of the global sites.

Memory. The model's activations for one chunk, ``chunk_size x batch_size`` particles, set the peak;
what grows with K is the ``K x batch_size`` log-weights that PSIS needs, kept on the CPU in the
data's dtype (2 MB for K = 5000 and 100 datapoints in float32). ``benchmarks/iwae_memory.py``
measures both.

Every figure is a mean over datapoints with its standard error; :class:`Evaluation` holds the
per-datapoint values. :func:`to_inference_data` exports draws from the guide for chosen datapoints to
arviz, to compare guides with ``az.summary`` and ``az.plot_density``.

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
3. Yao, Vehtari, Simpson & Gelman, *Yes, but Did It Work?: Evaluating Variational Inference*,
   arXiv 1802.02538.
4. Vehtari, Simpson, Gelman, Yao & Gabry, *Pareto Smoothed Importance Sampling*, arXiv 1507.02646.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from .estimate import Estimate
from .inference import LogMeanExp, factorized, iwae_bound, log_weight_chunks
from .programs import (
    PARTICLES,
    Batch,
    ProgramInfo,
    as_program,
    check_bounds_defined,
    data_frame,
    inspect_programs,
    latent_sites,
    plate_nesting,
)
from .protocols import GlobalMeans

ACTIVE_THRESHOLD = 0.01  # Cov_x(E_q[z_d]) above which a latent dimension is active (Burda et al.)
KHAT_THRESHOLDS = (0.7, 0.5)  # unreliable above 0.7; infinite variance of the ratios above 0.5
MIN_PSIS_SAMPLES = 25  # fewer than 5 ratios in the Pareto tail make no fit (arviz takes K / 5 of them)
PSIS_ROWS = 16  # datapoints handed to arviz at once
# why k̂ is NaN for a datapoint: no tail to fit
KHAT_FLAGS = {
    1: "the ratios are all equal (q is the posterior)",
    2: "too few distinct ratios for a tail (a discrete guide)",
    3: "NaN or infinite ratios",
    4: "the Pareto fit failed",
}
GLOBAL_MEAN_DRAWS = 100  # draws of a guide's global sites whose mean conditions the evaluation


# ----------------------------------------------------------------------------- results


@dataclass
class Evaluation:
    """What :func:`evaluate` found: per-datapoint values, and per-latent-dimension summaries.

    :param per_datapoint: ``(N,)`` float64 arrays: ``log_px`` (the importance-weighted bound with
        ``num_samples`` particles), ``elbo``, ``recon`` and ``kl`` (Monte Carlo over the same particles;
        no ``recon``/``kl`` when enumerated sites join likelihood and prior), ``kl_analytic`` where every
        local site's closed-form KL is exact, ``khat`` (NaN where PSIS was not run or no tail could be
        fitted) and ``khat_flag`` (0, or the reason in :data:`KHAT_FLAGS`).
    :param latent_names: one name per continuous local latent dimension, ``"z[3]"``.
    :param activity: ``(L,)`` :math:`\\mathrm{Cov}_x(E_q[z_d])`, and ``activity_se`` its standard error.
    :param kl_per_dim: ``(L,)`` mean over datapoints of :math:`KL(q(z_d \\mid x) \\| p(z_d))` (closed
        form where exact, else Monte Carlo), and ``kl_per_dim_se``; NaN for the dimensions of a site
        whose q or p does not factorize over dimensions.
    :param num_dims: dimensions of one datapoint, for bits per dimension.
    :param psis: whether k̂ was computed.
    :param marginal: the joint evidence per datapoint with the global sites integrated out, where asked.
    :param info: context written with the results (run folder, split, seed, how global sites were treated).
    """

    num_samples: int
    num_dims: int
    per_datapoint: dict
    latent_names: list
    activity: np.ndarray
    activity_se: np.ndarray
    kl_per_dim: np.ndarray
    kl_per_dim_se: np.ndarray
    psis: bool = True
    active_threshold: float = ACTIVE_THRESHOLD
    marginal: Optional[float] = None
    info: dict = field(default_factory=dict)

    @property
    def num_datapoints(self) -> int:
        return len(self.per_datapoint["log_px"])

    @property
    def active_units(self) -> int:
        return int((self.activity > self.active_threshold).sum())

    @property
    def collapsed(self) -> bool:
        """Whether the posterior has collapsed: fewer than half of the latent units are active, q(z_d | x)
        left at the prior in the others (a partial collapse, e.g. 5 of 20, counts; 1 of 2 does not)."""
        return bool(self.latent_names) and 2 * self.active_units < len(self.latent_names)

    def collapse_note(self) -> str:
        """One line of facts on the collapse: active units of D, and the KL of q(z | x) from the prior."""
        d = len(self.latent_names)
        kl = self.summary().get("kl_analytic", self.summary().get("kl"))
        kl = f", KL(q(z|x) || p(z)) {kl.mean:.3g} nats ({kl.mean / d:.2g} per dimension)" if kl is not None and d else ""
        return (f"the posterior has collapsed: {self.active_units} of {d} latent units active "
                f"(Cov_x(E_q[z_d]) > {self.active_threshold:g}){kl}")

    def khat_flags(self) -> dict:
        """``{reason: number of datapoints}`` for the datapoints whose k̂ is NaN for a reason."""
        flags = self.per_datapoint.get("khat_flag", np.zeros(0))
        return {KHAT_FLAGS[int(c)]: int((flags == c).sum()) for c in np.unique(flags) if int(c) in KHAT_FLAGS}

    def summary(self) -> dict:
        """``{name: Estimate}``: log p̂(x), NLL, bits per dimension, the ELBO and its parts, the gap and
        (where PSIS ran) the shares of datapoints whose k̂ exceeds each threshold, among those with a k̂."""
        d = self.per_datapoint
        out = {
            "log_px": Estimate.of(d["log_px"]),
            "nll": Estimate.of(-d["log_px"]),
            "bits_per_dim": Estimate.of(-d["log_px"] / (self.num_dims * math.log(2))),
            "elbo": Estimate.of(d["elbo"]),
        }
        if "recon" in d:
            out["recon"] = Estimate.of(d["recon"])
            out["kl"] = Estimate.of(d["kl"])
        if "kl_analytic" in d:
            out["kl_analytic"] = Estimate.of(d["kl_analytic"])
            out["elbo_analytic"] = Estimate.of(d["recon"] - d["kl_analytic"])
        out["gap"] = Estimate.of(d["log_px"] - d["elbo"])
        khat = d["khat"][np.isfinite(d["khat"])]
        if self.psis and khat.size:
            for t in KHAT_THRESHOLDS:
                out[f"khat_above_{t}"] = Estimate.of(khat > t)
        return out

    def to_dict(self, per_datapoint: bool = True) -> dict:
        """Plain JSON types: each summary figure as ``name`` and ``name_se``, the per-dimension
        values under ``per_dim``, and (``per_datapoint=True``) every per-datapoint value.
        Non-finite numbers become None."""
        out = {
            "info": self.info,
            "num_datapoints": self.num_datapoints,
            "num_samples": self.num_samples,
            "num_dims": self.num_dims,
            "psis": self.psis,
            "khat_flags": self.khat_flags(),
            "active_units": self.active_units,
            "active_threshold": self.active_threshold,
            "latent_dims": len(self.latent_names),
            "log_px_marginal": self.marginal,
        }
        for name, est in self.summary().items():
            out[name], out[f"{name}_se"] = est.mean, est.se
        out["per_dim"] = {
            "name": list(self.latent_names),
            "activity": self.activity.tolist(),
            "activity_se": self.activity_se.tolist(),
            "kl": self.kl_per_dim.tolist(),
            "kl_se": self.kl_per_dim_se.tolist(),
        }
        if per_datapoint:
            out["per_datapoint"] = {k: v.tolist() for k, v in self.per_datapoint.items()}
        return finite_or_none(out)

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        """Read back what :meth:`to_dict` wrote with ``per_datapoint=True``."""
        if "per_datapoint" not in d:
            raise ValueError("this evaluation was saved without its per-datapoint values: nothing to rebuild")
        array = lambda values: np.array([math.nan if v is None else v for v in values], dtype=np.float64)  # noqa: E731
        per_dim = d["per_dim"]
        return cls(
            num_samples=d["num_samples"],
            num_dims=d["num_dims"],
            per_datapoint={k: array(v) for k, v in d["per_datapoint"].items()},
            latent_names=list(per_dim["name"]),
            activity=array(per_dim["activity"]),
            activity_se=array(per_dim["activity_se"]),
            kl_per_dim=array(per_dim["kl"]),
            kl_per_dim_se=array(per_dim["kl_se"]),
            psis=d["psis"],
            active_threshold=d.get("active_threshold", ACTIVE_THRESHOLD),
            marginal=d.get("log_px_marginal"),
            info=d.get("info", {}),
        )


COLLAPSE_CHECK = {"max_datapoints": 1000, "num_samples": 10}  # what collapse_check evaluates


def collapse_check(model: Callable, guide: Callable, batch, seed: int = 0) -> Optional[Evaluation]:
    """The :class:`Evaluation` of the first :data:`COLLAPSE_CHECK` datapoints of ``batch`` (no PSIS), when
    its posterior has collapsed (:attr:`Evaluation.collapsed`); None when it has not, or when no bound is
    defined (a point-mass guide, an improper prior) or the model has no continuous local latent site.
    Seeded by ``seed``; torch's global generator is left as it was."""
    batch = Batch.of(batch)
    batch = batch.rows(slice(0, min(COLLAPSE_CHECK["max_datapoints"], len(batch))))
    info = inspect_programs(model, guide, batch.rows(slice(0, 100)), check=False)
    if info.point_mass or info.improper:
        return None
    devices = [batch.x.device.index or 0] if batch.x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        evaluation = evaluate(model, guide, batch, num_samples=COLLAPSE_CHECK["num_samples"], psis=False)
    return evaluation if evaluation.collapsed else None


def finite_or_none(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- global sites


@torch.no_grad()
def global_means(guide, batch: Batch, info: ProgramInfo) -> dict:
    """Where the guide's q of each global site is centred: its own ``global_means()``, else the mean of
    :data:`GLOBAL_MEAN_DRAWS` draws."""
    if not info.global_:
        return {}
    fn = guide.fn if hasattr(guide, "fn") else guide
    if isinstance(fn, GlobalMeans) and fn.global_means():
        return fn.global_means()
    with poutine.block():
        traces = [poutine.trace(as_program(guide, "guide")).get_trace(batch) for _ in range(GLOBAL_MEAN_DRAWS)]
    return {name: torch.stack([t.nodes[name]["value"] for t in traces]).mean(0) for name in info.global_}


def condition_on(values: dict, *programs) -> tuple:
    """The programs (None stays None) with the global sites fixed at ``values``: observed, so that the
    stream leaves them out of every per-datapoint term."""
    return tuple(None if p is None else as_program(p).conditioned(values) for p in programs)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    psis: bool = True,
    marginal: bool = False,
    global_samples: int = 10,
    progress: bool = False,
    info: Optional[dict] = None,
) -> Evaluation:
    """Every measure of the module docstring for the datapoints ``data``, in one pass over K particles.

    Randomness comes from torch's global generator: seed it (:func:`pvae.set_seed`) to repeat.

    :param model: a Pyro model whose datapoints are in a ``"data"`` plate (see :mod:`pvae.programs`).
    :param guide: the matching guide.
    :param data: ``(N, ...)`` datapoints, or a :class:`~pvae.programs.Batch` (rows of a split, their
        positions and side inputs: ``Dataset.batch("test")``).
    :param num_samples: K, particles per datapoint for the bound, the ELBO and PSIS.
    :param chunk_size: particles traced at once: with ``batch_size`` it sets the peak memory.
    :param batch_size: datapoints traced at once.
    :param psis: compute k̂ (needs ``num_samples >= 25``; otherwise k̂ is NaN).
    :param marginal: for a model with global sites, also the joint evidence with them integrated out,
        from ``global_samples`` draws of the global guide (each one a full pass of K particles).
    :param progress: show a progress bar over datapoint-samples.
    :param info: context stored in the result (run folder, split, ...).
    """
    if num_samples < 1 or chunk_size < 1 or batch_size < 1:
        raise ValueError(f"num_samples, chunk_size and batch_size must be at least 1, got "
                         f"{num_samples}, {chunk_size}, {batch_size}")
    batch = Batch.of(data)
    if len(batch) == 0:
        raise ValueError("no datapoints to evaluate")
    program_info = inspect_programs(model, guide, batch.rows(slice(0, batch_size)))
    check_bounds_defined("evaluate", program_info.point_mass, program_info.improper)
    info = dict(info or {})
    means = global_means(guide, batch.rows(slice(0, batch_size)), program_info)
    if means:
        info["global sites"] = f"{', '.join(means)}: conditioned on the global guide's mean"
    cond_model, cond_guide = condition_on(means, model, guide)
    cond_info = inspect_programs(cond_model, cond_guide, batch.rows(slice(0, batch_size)), check=False)
    psis = psis and num_samples >= MIN_PSIS_SAMPLES
    parts = []
    with tqdm(total=len(batch) * num_samples, unit="sample", unit_scale=True, desc="evaluate",
              disable=not progress, leave=False) as bar:
        for sub in batch.split_rows(batch_size):
            parts.append(_evaluate_batch(cond_model, cond_guide, sub, num_samples, chunk_size, cond_info, psis,
                                         bar.update))
    names = parts[0]["names"]
    latent_means = torch.cat([p["mean"] for p in parts]).double().cpu().numpy()  # (N, L)
    kl_dims = torch.cat([p["kl_dims"] for p in parts]).double().cpu().numpy()  # (N, L)
    per_datapoint = {
        key: torch.cat([p[key] for p in parts]).double().cpu().numpy()
        for key in ("log_px", "elbo", "recon", "kl", "kl_analytic")
        if parts[0][key] is not None
    }
    per_datapoint["khat"] = np.concatenate([p["khat"] for p in parts])
    per_datapoint["khat_flag"] = np.concatenate([p["khat_flag"] for p in parts]).astype(np.float64)
    activity, activity_se = _variance_with_se(latent_means)
    kl_est = [Estimate.of(kl_dims[:, j]) for j in range(kl_dims.shape[1])]
    result = Evaluation(
        num_samples=num_samples,
        num_dims=batch.x[0].numel(),
        per_datapoint=per_datapoint,
        latent_names=names,
        activity=activity,
        activity_se=activity_se,
        kl_per_dim=np.array([e.mean for e in kl_est]),
        kl_per_dim_se=np.array([e.se for e in kl_est]),
        psis=psis,
        info=info,
    )
    if marginal and program_info.global_:
        result.marginal = _marginal(model, guide, batch, num_samples, chunk_size, batch_size, global_samples,
                                    program_info)
        result.info["marginal"] = f"log p(x) with the global sites integrated out, {global_samples} draws"
    return result


def _evaluate_batch(model, guide, batch, num_samples, chunk_size, info, psis, on_chunk) -> dict:
    """Chunks of particles for one batch, reduced as they come: a running log-sum-exp of the
    log-weights, running sums of every other per-particle quantity, and the log-weights on the CPU
    for PSIS."""
    bound = LogMeanExp()  # the importance-weighted bound over the particles so far, (B,)
    sums = {}  # name -> sum over the particles so far, (B,) or (B, L)
    kept = torch.empty((num_samples, len(batch)), dtype=batch.x.dtype) if psis else None
    names, start = None, 0
    for lw in log_weight_chunks(model, guide, batch, num_samples, chunk_size, info, keep_traces=True):
        k = lw.log_w.shape[0]
        bound.add(lw.log_w)
        chunk = {"log_w": lw.log_w.sum(0)}
        if lw.log_likelihood is not None:
            chunk["log_likelihood"] = lw.log_likelihood.sum(0)
            chunk["log_q_minus_prior"] = (lw.log_q - lw.log_prior).sum(0)
        if lw.kl is not None:
            chunk["kl_analytic"] = lw.kl.sum(0)
        names, chunk["mean"], chunk["kl_dims"] = _latent_sums(lw.traces, info, (k, len(batch)))
        for key, value in chunk.items():
            sums[key] = value if key not in sums else sums[key] + value
        if psis:
            kept[start : start + k].copy_(lw.log_w)
        start += k
        on_chunk(k * len(batch))
        del lw, chunk  # free this chunk's traces (the model's outputs) before the next is traced
    mean = {key: value / num_samples for key, value in sums.items()}
    if psis:
        khat, flags = psis_khat(kept, dim=0, return_flags=True)
    else:
        khat, flags = np.full(len(batch), math.nan), np.zeros(len(batch))
    recon = mean.get("log_likelihood")
    kl = mean.get("log_q_minus_prior")
    return {
        "log_px": bound.value(),
        "elbo": mean["log_w"] if recon is None else recon - kl,
        "recon": recon,
        "kl": kl,
        "kl_analytic": mean.get("kl_analytic"),
        "khat": khat,
        "khat_flag": flags,
        "names": names,
        "mean": mean["mean"],
        "kl_dims": mean["kl_dims"],
    }


def _marginal(model, guide, batch, num_samples, chunk_size, batch_size, global_samples, info) -> float:
    """The joint evidence per datapoint with the global sites integrated out (module docstring)."""
    joint = LogMeanExp()
    for _ in range(global_samples):
        with poutine.block():
            trace = poutine.trace(as_program(guide, "guide")).get_trace(batch.rows(slice(0, 1)))
        values = {name: trace.nodes[name]["value"] for name in info.global_}
        log_q = sum(trace.nodes[n]["fn"].log_prob(values[n]).sum() for n in info.global_)
        cond_model, cond_guide = condition_on(values, model, guide)
        with poutine.block():
            model_trace = poutine.trace(cond_model).get_trace(batch.rows(slice(0, 1)))
        log_p = sum(model_trace.nodes[n]["fn"].log_prob(values[n]).sum() for n in info.global_)
        cond_info = inspect_programs(cond_model, cond_guide, batch.rows(slice(0, batch_size)), check=False)
        local = torch.cat([iwae_bound(cond_model, cond_guide, sub, num_samples, chunk_size, cond_info)
                           for sub in batch.split_rows(batch_size)])
        joint.add((log_p - log_q + local.sum()).reshape(1))
    return joint.value().item() / len(batch)


def _latent_sums(traces: tuple, info: ProgramInfo, shape: tuple) -> tuple:
    """Per dimension of the continuous local sites, sums over this chunk's particles of E_q[z_d] and of
    KL(q(z_d|x) || p(z_d)): ``(names, (B, L), (B, L))``. The closed forms (mean, KL where exact) are
    summed over particles as the samples are, so that the mean over every chunk is theirs; otherwise
    the particles' values enter, and the mean is a Monte Carlo estimate."""
    guide_trace, model_trace = traces
    k, b = shape
    particle_dim = -(info.plate_nesting + 1)
    names, means, kls = [], [], []

    def per_dim(value, site, event_dim):
        return _per_dim(value, site, event_dim, particle_dim, shape)

    for name, site in latent_sites(guide_trace).items():
        p_site = model_trace.nodes.get(name)
        if (data_frame(site) is None or p_site is None or getattr(site["fn"].support, "is_discrete", False)
                or p_site["is_observed"]):
            continue  # global, auxiliary, discrete or conditioned sites have no per-datapoint dimensions
        q, p = site["fn"], p_site["fn"]
        value = per_dim(site["value"], site, q.event_dim)  # (k, B, L)
        size = value.shape[-1]
        names += [name] if q.event_dim == 0 else [f"{name}[{i}]" for i in range(size)]
        try:
            means.append(per_dim(q.mean, site, q.event_dim).sum(0))
        except NotImplementedError:
            means.append(value.sum(0))
        q1, p1 = factorized(q), factorized(p)
        if q1 is None or p1 is None or len(p.batch_shape) > len(q.batch_shape):
            # no KL per dimension of a joint distribution, nor of a prior over enumerated values
            kls.append(value.new_full((b, size), math.nan))
            continue
        try:
            if name not in info.analytic_kl:
                raise NotImplementedError
            kls.append(per_dim(kl_divergence(q1, p1), site, q.event_dim).sum(0))
        except NotImplementedError:
            elementwise = q1.log_prob(site["value"]) - p1.log_prob(site["value"])
            kls.append(per_dim(elementwise, site, q.event_dim).sum(0))
    if not names:
        empty = torch.zeros(b, 0)
        return names, empty, empty
    return names, torch.cat(means, -1), torch.cat(kls, -1)


def _per_dim(value: torch.Tensor, site: dict, event_dim: int, particle_dim: int, shape: tuple) -> torch.Tensor:
    """A site's per-element tensor (batch shape, then ``event_dim`` event dimensions) as
    ``(k, B, L)``: particles, datapoints, everything else of one datapoint flattened."""
    width = -particle_dim
    value = value.reshape((1,) * (width + event_dim - value.dim()) + value.shape)
    data_axis = width + data_frame(site).dim
    value = value.movedim(data_axis, 1)
    return value.reshape(value.shape[0], value.shape[1], -1).expand(*shape, -1)


def _variance_with_se(values: np.ndarray) -> tuple:
    """Per column: the variance over rows (ddof 1) and its standard error,
    sqrt(Var[(v - mean)^2] / N), the delta method's for the sample variance."""
    n = values.shape[0]
    if n < 2:
        nan = np.full(values.shape[1], math.nan)
        return nan, nan
    squares = (values - values.mean(0)) ** 2
    return values.var(0, ddof=1), squares.std(0, ddof=1) / math.sqrt(n)


# ----------------------------------------------------------------------------- PSIS


def psis_khat(log_ratios, dim: int = -1, atol: Optional[float] = None, return_flags: bool = False):
    """The Pareto :math:`\\hat k` of importance ratios (Vehtari et al. [4]; as a diagnostic of
    variational inference, Yao et al. [3]), through arviz.

    arviz 0.x takes the log-ratios in ``az.psislw``; arviz 1.x moved it to ``arviz_stats``, whose
    ``psislw`` takes the log-likelihoods of leave-one-out, the negated log-ratios; both are
    supported and give the :math:`\\hat k` of the right tail of the ratios.

    Where no tail can be fitted, :math:`\\hat k` is NaN and a flag (:data:`KHAT_FLAGS`) says why:
    ratios all equal (the guide is the exact posterior; arviz has no answer for them), fewer distinct
    ratios than the tail's length (a discrete guide), NaN or ``+inf`` ratios, or a fit that failed.
    Zero ratios (``-inf`` log-ratios: a draw the model rules out) are left out of the fit.

    :param log_ratios: :math:`\\log p(x, z_k) - \\log q(z_k \\mid x)`, a tensor or array with the
        samples along ``dim``; any other dimensions are datapoints.
    :param atol: log-ratios whose spread (max - min) is at most this are taken as constant; the
        default, :math:`\\sqrt{\\epsilon}\\, \\max(1, |\\log r|_{\\max})` for the input's float type,
        is the size of the rounding noise in a sum of log-densities of that magnitude.
    :returns: :math:`\\hat k` per datapoint, float64, the shape of ``log_ratios`` without ``dim``; with
        ``return_flags``, also the flags (0 where k̂ was fitted).
    """
    if isinstance(log_ratios, torch.Tensor):
        eps = torch.finfo(log_ratios.dtype).eps
        log_ratios = log_ratios.detach().cpu().numpy()  # no copy on the CPU
    else:
        log_ratios = np.asarray(log_ratios)
        eps = np.finfo(log_ratios.dtype if np.issubdtype(log_ratios.dtype, np.floating) else float).eps
    lr = np.moveaxis(log_ratios, dim, -1)
    shape, n = lr.shape[:-1], lr.shape[-1]
    lr = lr.reshape(-1, n)  # (M, K), a view where the layout allows
    khat, flags = np.full(lr.shape[0], math.nan), np.zeros(lr.shape[0], dtype=np.int64)
    tail = math.ceil(min(0.2 * n, 3 * math.sqrt(n)))  # the tail arviz fits
    backend = None
    # a few rows at a time in float64: arviz copies its input, and memory stays bounded
    for rows in np.array_split(np.arange(lr.shape[0]), max(1, math.ceil(lr.shape[0] / PSIS_ROWS))):
        part = np.asarray(lr[rows], dtype=np.float64)
        for i, row in zip(rows, part):
            if np.isnan(row).any() or (row == math.inf).any():
                flags[i] = 3
                continue
            finite = row[np.isfinite(row)]
            tol = atol if atol is not None else math.sqrt(eps) * max(1.0, np.abs(finite).max(initial=0.0))
            if finite.size == 0 or finite.max() - finite.min() <= tol:
                flags[i] = 1
            elif np.unique(finite).size < max(tail, 5):
                flags[i] = 2
        whole = [j for j, i in enumerate(rows) if not flags[i] and np.isfinite(part[j]).all()]
        if whole:
            backend = backend or _psis_backend()
            khat[rows[whole]] = backend(part[whole])
        for j, i in enumerate(rows):  # rows with zero ratios: their finite ratios alone
            if not flags[i] and not np.isfinite(part[j]).all():
                backend = backend or _psis_backend()
                khat[i] = backend(part[j][np.isfinite(part[j])][None])[0]
    failed = (flags == 0) & ~np.isfinite(khat)
    flags[failed], khat[failed] = 4, math.nan
    khat, flags = khat.reshape(shape), flags.reshape(shape)
    return (khat, flags) if return_flags else khat


def _psis_backend() -> Callable:
    """``log_ratios (M, K) -> khat (M,)`` by the installed arviz."""
    az = import_arviz()
    if _major(az.__version__) < 1:
        return lambda lr: np.asarray(az.psislw(lr)[1], dtype=np.float64)
    from arviz_stats.base import array_stats

    # arviz-stats smooths -ary: its input is a log-likelihood, the negated log-ratio
    return lambda lr: np.asarray(array_stats.psislw(-lr, axis=-1)[1], dtype=np.float64)


def import_arviz():
    """``import arviz``, without the FutureWarning with which arviz 0.23 announces 1.0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def _major(version: str) -> int:
    return int(version.split(".")[0])


# ----------------------------------------------------------------------------- arviz export


@torch.no_grad()
def to_inference_data(guide: Callable, data, num_samples: int = 1000):
    """Draws from the guide q(z | x) for the datapoints ``data`` (a tensor or a
    :class:`~pvae.programs.Batch`), as arviz's posterior group: an ``InferenceData`` with arviz 0.x, a
    ``DataTree`` with 1.x.

    Each local latent site is one variable with dimensions ``(chain, draw, datapoint, <site>_dim_0,
    ...)``: one chain of ``num_samples`` independent draws; the ``datapoint`` coordinate is the rows'
    ``idx``. Two guides' exports of the same datapoints compare side by side with
    ``az.plot_density([a, b], data_labels=[...])`` and ``az.summary``.
    """
    batch = Batch.of(data)
    guide = as_program(guide, "guide")
    with poutine.block():
        nesting = plate_nesting(poutine.trace(guide).get_trace(batch))
    with poutine.block(), pyro.plate(PARTICLES, num_samples, dim=-(nesting + 1)):
        trace = poutine.trace(guide).get_trace(batch)
    draws = {}
    for name, site in latent_sites(trace).items():
        if data_frame(site) is None:
            continue
        event_shape = site["fn"].event_shape
        value = _per_dim(site["value"], site, len(event_shape), -(nesting + 1), (num_samples, len(batch)))
        draws[name] = value.reshape(num_samples, len(batch), *event_shape)
    return draws_inference_data(draws, batch.idx)


def draws_inference_data(draws: dict, idx):
    """Draws ``{site: (S, N, *event_shape)}`` of N datapoints (positions ``idx``) as arviz's posterior
    group, laid out as :func:`to_inference_data` lays out a guide's: one chain of S draws, dimensions
    ``(chain, draw, datapoint, <site>_dim_0, ...)``."""
    posterior = {name: value.reshape(1, *value.shape).cpu().numpy() for name, value in draws.items()}
    dims = {name: ["datapoint"] + [f"{name}_dim_{i}" for i in range(value.dim() - 2)] for name, value in draws.items()}
    coords = {"datapoint": torch.as_tensor(idx).cpu().tolist()}
    az = import_arviz()
    if _major(az.__version__) < 1:
        return az.from_dict(posterior=posterior, coords=coords, dims=dims)
    return az.from_dict({"posterior": posterior}, coords=coords, dims=dims)
