"""Evaluation and diagnostics of any model/guide pair with a ``"data"`` plate.

For every datapoint, :func:`evaluate` draws K particles :math:`z_k \\sim q(z \\mid x)` in chunks (a
vectorized particle plate around the guide, the model replayed on its samples; see
:func:`pvae.inference.particle_traces`) and gets from that one pass:

- the importance-weighted bound [2]
  :math:`\\log \\hat p(x) = \\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)`, by a running
  log-sum-exp over the chunks, and from it the negative log-likelihood in nats and in bits per
  dimension;
- the Monte Carlo ELBO :math:`\\frac1K \\sum_k \\log w_k` and its parts: the reconstruction
  :math:`E_q[\\log p(x \\mid z)]` and the KL :math:`E_q[\\log q(z \\mid x) - \\log p(z)]`, with the
  analytic KL beside it where every latent site has one [1];
- the posterior means :math:`E_q[z_d]`, whose variance over datapoints
  :math:`\\mathrm{Cov}_x(E_q[z_d])` marks the active units (above 0.01, [2]), and the KL per latent
  dimension: together they show posterior collapse;
- the PSIS diagnostic [3, 4]: the Pareto :math:`\\hat k` of the K importance ratios
  :math:`p(x, z_k) / q(z_k \\mid x)` (:func:`psis_khat`, through arviz). Above 0.7 the importance
  sampling estimate of :math:`p(x)`, and the guide as a proposal, cannot be trusted; below 0.5 the
  ratios have a finite variance.

Memory. The model's activations for one chunk, ``chunk_size x batch_size`` particles, set the peak;
what grows with K is the ``K x batch_size`` log-weights that PSIS needs, kept on the CPU in the
data's dtype (2 MB for K = 5000 and 100 datapoints in float32), a small fraction of one chunk's
activations for any decoder of images. ``benchmarks/iwae_memory.py`` measures both.

Every figure is a mean over datapoints with its standard error; :class:`Evaluation` holds the
per-datapoint values and writes JSON and Markdown. :func:`to_inference_data` exports draws from
the guide for chosen datapoints to arviz, to compare guides with ``az.summary`` and
``az.plot_density``.

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
3. Yao, Vehtari, Simpson & Gelman, *Yes, but Did It Work?: Evaluating Variational Inference*,
   arXiv 1802.02538.
4. Vehtari, Simpson, Gelman, Yao & Gabry, *Pareto Smoothed Importance Sampling*, arXiv 1507.02646.
"""

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, kl_divergence
from tqdm.auto import tqdm

from .inference import PARTICLES, ParticleTraces, max_plate_nesting, particle_traces, traces_log_weights
from .plate import DATA
from .utils import atomic_write, write_json

ACTIVE_THRESHOLD = 0.01  # Cov_x(E_q[z_d]) above which a latent dimension is active (Burda et al.)
KHAT_THRESHOLDS = (0.7, 0.5)  # unreliable above 0.7; infinite variance of the ratios above 0.5
MIN_PSIS_SAMPLES = 25  # fewer than 5 ratios in the Pareto tail make no fit (arviz takes K / 5 of them)
PSIS_ROWS = 16  # datapoints handed to arviz at once


# ----------------------------------------------------------------------------- results


@dataclass
class Estimate:
    """A mean over datapoints and its standard error (NaN with a single datapoint)."""

    mean: float
    se: float

    @classmethod
    def of(cls, values) -> "Estimate":
        values = np.asarray(values, dtype=np.float64)
        se = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else math.nan
        return cls(float(values.mean()), float(se))


LABELS = {
    "log_px": "log p̂(x), importance-weighted bound",
    "nll": "negative log-likelihood (nats)",
    "bits_per_dim": "bits per dimension",
    "elbo": "ELBO (Monte Carlo)",
    "recon": "reconstruction E_q[log p(x|z)]",
    "kl": "KL(q(z|x) ‖ p(z)), Monte Carlo",
    "kl_analytic": "KL(q(z|x) ‖ p(z)), analytic",
    "elbo_analytic": "ELBO with the analytic KL",
    "gap": "log p̂(x) − ELBO",
    **{f"khat_above_{t}": f"share of datapoints with k̂ > {t}" for t in KHAT_THRESHOLDS},
}


@dataclass
class Evaluation:
    """What :func:`evaluate` found: per-datapoint values, and per-latent-dimension summaries.

    :param per_datapoint: ``(N,)`` float64 arrays: ``log_px`` (the importance-weighted bound with
        ``num_samples`` particles), ``elbo``, ``recon``, ``kl`` (Monte Carlo over the same particles),
        ``kl_analytic`` where every latent site has a closed-form KL, and ``khat`` (NaN where PSIS was
        not run; ``-inf`` where the ratios were constant, see :func:`psis_khat`).
    :param latent_names: one name per latent dimension, ``"z[3]"``: each latent site's event
        dimensions, flattened.
    :param activity: ``(L,)`` :math:`\\mathrm{Cov}_x(E_q[z_d])`, the variance over datapoints of
        the posterior mean, and ``activity_se`` its standard error.
    :param kl_per_dim: ``(L,)`` mean over datapoints of :math:`KL(q(z_d \\mid x) \\| p(z_d))`
        (analytic where known, else Monte Carlo), and ``kl_per_dim_se``; NaN for the dimensions of a
        site whose q or p does not factorize over dimensions.
    :param num_dims: dimensions of one datapoint, for bits per dimension.
    :param psis: whether k̂ was computed.
    :param info: free-form context written with the results (run folder, split, seed, ...).
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
    info: dict = field(default_factory=dict)

    @property
    def num_datapoints(self) -> int:
        return len(self.per_datapoint["log_px"])

    @property
    def active_units(self) -> int:
        return int((self.activity > self.active_threshold).sum())

    def summary(self) -> dict:
        """``{name: Estimate}``, in the order of :data:`LABELS`; k̂ shares only where PSIS ran."""
        d = self.per_datapoint
        out = {
            "log_px": Estimate.of(d["log_px"]),
            "nll": Estimate.of(-d["log_px"]),
            "bits_per_dim": Estimate.of(-d["log_px"] / (self.num_dims * math.log(2))),
            "elbo": Estimate.of(d["elbo"]),
            "recon": Estimate.of(d["recon"]),
            "kl": Estimate.of(d["kl"]),
        }
        if "kl_analytic" in d:
            out["kl_analytic"] = Estimate.of(d["kl_analytic"])
            out["elbo_analytic"] = Estimate.of(d["recon"] - d["kl_analytic"])
        out["gap"] = Estimate.of(d["log_px"] - d["elbo"])
        if self.psis:
            for t in KHAT_THRESHOLDS:  # NaN and -inf are below every threshold
                out[f"khat_above_{t}"] = Estimate.of(d["khat"] > t)
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
            "active_units": self.active_units,
            "active_threshold": self.active_threshold,
            "latent_dims": len(self.latent_names),
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
        return _finite_or_none(out)

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
            # k̂ = -inf (constant ratios) comes back as NaN: both are below every threshold
            per_datapoint={k: array(v) for k, v in d["per_datapoint"].items()},
            latent_names=list(per_dim["name"]),
            activity=array(per_dim["activity"]),
            activity_se=array(per_dim["activity_se"]),
            kl_per_dim=array(per_dim["kl"]),
            kl_per_dim_se=array(per_dim["kl_se"]),
            psis=d["psis"],
            active_threshold=d.get("active_threshold", ACTIVE_THRESHOLD),
            info=d.get("info", {}),
        )

    def to_json(self, per_datapoint: bool = True) -> str:
        return json.dumps(self.to_dict(per_datapoint), indent=2)

    def to_markdown(self) -> str:
        """The summary table, the active units and the per-dimension table."""
        context = ", ".join(f"{k} {v}" for k, v in self.info.items())
        lines = [
            "## Evaluation" + (f": {context}" if context else ""),
            "",
            f"{self.num_datapoints} datapoints of {self.num_dims} dimensions, K = {self.num_samples} samples "
            "of q(z|x) each; means over datapoints with their standard errors.",
            "",
            "| measure | mean | s.e. |",
            "| --- | ---: | ---: |",
        ]
        for name, est in self.summary().items():
            lines.append(f"| {LABELS[name]} | {est.mean:.4f} | {_fmt(est.se)} |")
        lines += [
            "",
            f"Active units: {self.active_units} of {len(self.latent_names)} "
            f"(Cov_x(E_q[z_d]) > {self.active_threshold}).",
            "",
            "| latent | Cov_x(E_q[z_d]) | s.e. | KL | s.e. |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for i, name in enumerate(self.latent_names):
            lines.append(
                f"| {name} | {_fmt(self.activity[i])} | {_fmt(self.activity_se[i])} | "
                f"{_fmt(self.kl_per_dim[i])} | {_fmt(self.kl_per_dim_se[i])} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, folder, stem: str = "evaluation") -> tuple:
        """Write ``folder/stem.json`` (with the per-datapoint values) and ``folder/stem.md``, each
        atomically; return their paths."""
        folder = Path(folder)
        json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
        write_json(json_path, self.to_dict(per_datapoint=True))
        text = self.to_markdown()
        atomic_write(md_path, lambda tmp: Path(tmp).write_text(text))
        return json_path, md_path


def _fmt(v) -> str:
    return "—" if not math.isfinite(v) else f"{v:.4f}"


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx=None,
    num_data=None,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    psis: bool = True,
    progress: bool = False,
    info: Optional[dict] = None,
) -> Evaluation:
    """Every measure of the module docstring for the datapoints ``x``, in one pass over K particles.

    Randomness comes from torch's global generator: seed it (:func:`pvae.set_seed`) to repeat.

    :param model: a Pyro program ``model(x, idx, num_data)`` with every site in the ``"data"`` plate.
    :param guide: the matching ``guide(x, idx, num_data)``.
    :param x: ``(N, ...)`` datapoints.
    :param idx: their rows in the data set (a per-datapoint guide looks its parameters up by them);
        default ``0..N-1``.
    :param num_data: the data set's size, passed to the programs.
    :param num_samples: K, particles per datapoint for the bound, the ELBO and PSIS.
    :param chunk_size: particles traced at once: with ``batch_size`` it sets the peak memory.
    :param batch_size: datapoints traced at once.
    :param psis: compute k̂ (needs ``num_samples >= 25``; otherwise k̂ is NaN).
    :param progress: show a progress bar over datapoint-samples.
    :param info: context stored in the result (run folder, split, ...).
    """
    if num_samples < 1 or chunk_size < 1 or batch_size < 1:
        raise ValueError(f"num_samples, chunk_size and batch_size must be at least 1, got "
                         f"{num_samples}, {chunk_size}, {batch_size}")
    if x.shape[0] == 0:
        raise ValueError("no datapoints to evaluate")
    if idx is None:
        idx = torch.arange(x.shape[0], device=x.device)
    nesting = max_plate_nesting(model, guide, x[:batch_size], idx[:batch_size], num_data)
    psis = psis and num_samples >= MIN_PSIS_SAMPLES
    parts = []
    with tqdm(total=x.shape[0] * num_samples, unit="sample", unit_scale=True, desc="evaluate",
              disable=not progress, leave=False) as bar:
        for xb, ib in zip(x.split(batch_size), idx.split(batch_size)):
            parts.append(_evaluate_batch(model, guide, xb, ib, num_data, num_samples, chunk_size, nesting,
                                         psis, bar.update))
    names = parts[0]["names"]
    means = torch.cat([p["mean"] for p in parts]).double().cpu().numpy()  # (N, L)
    kl_dims = torch.cat([p["kl_dims"] for p in parts]).double().cpu().numpy()  # (N, L)
    per_datapoint = {
        key: torch.cat([p[key] for p in parts]).double().cpu().numpy()
        for key in ("log_px", "elbo", "recon", "kl", "kl_analytic")
        if parts[0][key] is not None
    }
    per_datapoint["khat"] = np.concatenate([p["khat"] for p in parts])
    activity, activity_se = _variance_with_se(means)
    kl_est = [Estimate.of(kl_dims[:, j]) for j in range(kl_dims.shape[1])]
    return Evaluation(
        num_samples=num_samples,
        num_dims=x[0].numel(),
        per_datapoint=per_datapoint,
        latent_names=names,
        activity=activity,
        activity_se=activity_se,
        kl_per_dim=np.array([e.mean for e in kl_est]),
        kl_per_dim_se=np.array([e.se for e in kl_est]),
        psis=psis,
        info=dict(info or {}),
    )


def _evaluate_batch(model, guide, x, idx, num_data, num_samples, chunk_size, nesting, psis, on_chunk) -> dict:
    """Chunks of particles for one batch, reduced as they come: a running log-sum-exp of the
    log-weights, running sums of every other per-particle quantity, and the log-weights on the CPU
    for PSIS."""
    running = None  # log sum_k w_k over the particles so far, (B,)
    sums = {}  # name -> sum over the particles so far, (B,) or (B, L)
    kept = None  # (K, B) log-weights on the CPU, for PSIS
    names = None
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        # Pyro's validation, when on, checks the batch's data and the first chunk's parameters; the
        # other chunks see the same data and skip it (about a tenth of the time of a small VAE)
        with contextlib.nullcontext() if start == 0 else pyro.validation_enabled(False):
            traces = particle_traces(model, guide, x, idx, num_data, k, nesting)
            lw = traces_log_weights(traces)
        log_w = lw.log_w  # (k, B)
        lse = torch.logsumexp(log_w, dim=0)
        running = lse if running is None else torch.logaddexp(running, lse)
        chunk = {
            "log_likelihood": lw.log_likelihood.sum(0),
            "log_prior": lw.log_prior.sum(0),
            "log_q": lw.log_q.sum(0),
        }
        if lw.kl is not None:
            chunk["kl_analytic"] = k * lw.kl
        names, chunk["mean"], chunk["kl_dims"] = _latent_sums(traces)
        for key, value in chunk.items():
            sums[key] = value if key not in sums else sums[key] + value
        if psis:
            if kept is None:
                kept = torch.empty((num_samples, x.shape[0]), dtype=log_w.dtype)
            kept[start : start + k].copy_(log_w)
        on_chunk(k * x.shape[0])
        # free this chunk's traces (the decoder's outputs) before the next chunk is traced
        del traces, lw, log_w, chunk
    mean = {key: value / num_samples for key, value in sums.items()}
    if psis:
        khat = psis_khat(kept, dim=0)
    else:
        khat = np.full(x.shape[0], math.nan)
    recon = mean["log_likelihood"]
    kl = mean["log_q"] - mean["log_prior"]
    return {
        "log_px": running - math.log(num_samples),
        "elbo": recon - kl,
        "recon": recon,
        "kl": kl,
        # the analytic KL of every chunk is the same: the mean of k * KL over the chunks is KL
        "kl_analytic": mean.get("kl_analytic"),
        "khat": khat,
        "names": names,
        "mean": mean["mean"],
        "kl_dims": mean["kl_dims"],
    }


def _latent_sums(traces: ParticleTraces) -> tuple:
    """Per latent dimension, sums over this chunk's particles of E_q[z_d] and of KL(q(z_d|x) || p(z_d)):
    ``(names, (B, L), (B, L))``. Closed forms count k times, so that the mean over every chunk is
    the closed form itself; otherwise the particles' values enter (their mean is a Monte Carlo
    estimate)."""
    k, b = traces.shape
    names, means, kls = [], [], []

    def per_dim(value, site, event_dim):
        return _per_dim(value, site, event_dim, traces.particle_dim, traces.shape)

    for name, site in traces.guide.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        q = site["fn"]
        p = traces.model.nodes[name]["fn"]
        value = per_dim(site["value"], site, q.event_dim)  # (k, B, L)
        size = value.shape[-1]
        names += [name] if q.event_dim == 0 else [f"{name}[{i}]" for i in range(size)]
        try:
            means.append(k * per_dim(q.mean, site, q.event_dim)[0])
        except NotImplementedError:
            means.append(value.sum(0))
        q1, p1 = _univariate(q), _univariate(p)
        if q1 is None or p1 is None:  # no KL per dimension of a joint distribution
            kls.append(value.new_full((b, size), math.nan))
            continue
        try:
            kls.append(k * per_dim(kl_divergence(q1, p1), site, q.event_dim)[0])
        except NotImplementedError:
            elementwise = q1.log_prob(site["value"]) - p1.log_prob(site["value"])
            kls.append(per_dim(elementwise, site, q.event_dim).sum(0))
    if not names:
        raise ValueError("the guide has no latent sample site")
    return names, torch.cat(means, -1), torch.cat(kls, -1)


def _univariate(fn):
    """The elementwise distribution under ``.to_event``, or None if ``fn`` does not factorize."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if fn.event_shape == () else None


def _per_dim(value: torch.Tensor, site: dict, event_dim: int, particle_dim: int, shape: tuple) -> torch.Tensor:
    """A site's per-element tensor (batch shape, then ``event_dim`` event dimensions) as
    ``(k, B, L)``: particles, datapoints, the flattened event dimensions."""
    width = -particle_dim
    value = value.reshape((1,) * (width + event_dim - value.dim()) + value.shape)
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == DATA]
    if not data_dims:
        raise ValueError(f"latent site {site['name']!r} is outside the {DATA!r} plate")
    data_axis = width + data_dims[0]
    others = [a for a in range(1, width) if a != data_axis and value.shape[a] != 1]
    if others:
        raise ValueError(
            f"latent site {site['name']!r} sits in a plate nested in {DATA!r}: pvae reports latent "
            "dimensions of sites whose only batch dimensions are the particles and the datapoints"
        )
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


def psis_khat(log_ratios, dim: int = -1, atol: Optional[float] = None) -> np.ndarray:
    """The Pareto :math:`\\hat k` of importance ratios (Vehtari et al. [4]; as a diagnostic of
    variational inference, Yao et al. [3]), through arviz.

    arviz 0.x takes the log-ratios in ``az.psislw``; arviz 1.x moved it to ``arviz_stats``, whose
    ``psislw`` takes the log-likelihoods of leave-one-out, the negated log-ratios; both are
    supported and give the :math:`\\hat k` of the right tail of the ratios.

    Ratios that are all equal (the guide is the exact posterior) have no tail, and arviz has no
    answer for them (0.x returns inf, 1.x raises); they get :math:`\\hat k = -\\infty`.

    :param log_ratios: :math:`\\log p(x, z_k) - \\log q(z_k \\mid x)`, a tensor or array with the
        samples along ``dim``; any other dimensions are datapoints.
    :param atol: log-ratios whose spread (max - min) is at most this are taken as constant; the
        default, :math:`\\sqrt{\\epsilon}\\, \\max(1, |\\log r|_{\\max})` for the input's float type,
        is the size of the rounding noise in a sum of log-densities of that magnitude.
    :returns: :math:`\\hat k` per datapoint, float64, the shape of ``log_ratios`` without ``dim``;
        NaN where a log-ratio is NaN or ``+inf``.
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
    khat = np.empty(lr.shape[0])
    backend = None
    # a few rows at a time in float64: arviz copies its input, and memory stays bounded
    for rows in np.array_split(np.arange(lr.shape[0]), max(1, math.ceil(lr.shape[0] / PSIS_ROWS))):
        part = np.asarray(lr[rows], dtype=np.float64)
        top = part.max(-1)
        tol = atol if atol is not None else math.sqrt(eps) * np.maximum(1.0, np.abs(part).max(-1))
        bad = np.isnan(part).any(-1) | (top == math.inf)
        fit = ~bad & (top - part.min(-1) > tol)
        khat[rows] = np.where(bad, math.nan, -math.inf)
        if fit.any():
            backend = backend or _psis_backend()
            khat[rows[fit]] = backend(part[fit])
    return khat.reshape(shape)


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
def to_inference_data(guide: Callable, x: torch.Tensor, idx=None, num_data=None, num_samples: int = 1000):
    """Draws from the guide q(z | x) for the datapoints ``x``, as arviz's posterior group: an
    ``InferenceData`` with arviz 0.x, a ``DataTree`` with 1.x.

    Each latent site is one variable with dimensions ``(chain, draw, datapoint, <site>_dim_0, ...)``:
    one chain of ``num_samples`` independent draws; the ``datapoint`` coordinate is ``idx``. Two
    guides' exports of the same datapoints compare side by side with
    ``az.plot_density([a, b], data_labels=[...])`` and ``az.summary``.
    """
    if idx is None:
        idx = torch.arange(x.shape[0], device=x.device)
    with poutine.block():
        probe = poutine.trace(guide).get_trace(x, idx, num_data)
    nesting = max(
        [-f.dim for s in probe.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized],
        default=0,
    )
    with poutine.block(), pyro.plate(PARTICLES, num_samples, dim=-(nesting + 1)):
        trace = poutine.trace(guide).get_trace(x, idx, num_data)
    posterior, dims = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        event_shape = site["fn"].event_shape
        value = _per_dim(site["value"], site, len(event_shape), -(nesting + 1), (num_samples, x.shape[0]))
        value = value.reshape(1, num_samples, x.shape[0], *event_shape)
        posterior[name] = value.cpu().numpy()
        dims[name] = ["datapoint"] + [f"{name}_dim_{i}" for i in range(len(event_shape))]
    coords = {"datapoint": idx.cpu().tolist()}
    az = import_arviz()
    if _major(az.__version__) < 1:
        return az.from_dict(posterior=posterior, coords=coords, dims=dims)
    return az.from_dict({"posterior": posterior}, coords=coords, dims=dims)
