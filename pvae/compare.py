"""Inference suboptimality on a fixed decoder: how far amortized, semi-amortized and mean-field q
fall from the posterior (Cremer, Li & Duvenaud 2018).

For a trained model and held-out data :func:`compare_inference` measures, per datapoint,

- :math:`\\mathcal L[q]`, the ELBO of the amortized encoder;
- :math:`\\mathcal L[q^*]`, the ELBO of the best diagonal Gaussian, optimized for each datapoint on
  the frozen decoder (:func:`optimize_mean_field`: all datapoints of a batch at once, Adam, many
  particles per step, until the batch's bound stops improving);
- :math:`\\mathcal L[q_K]`, the encoder's q after K steps of gradient ascent
  (:func:`pvae.guides.refine`, the refinement of semi-amortized inference, Kim et al. 2018);
- :math:`\\log \\hat p(x)`, the importance-weighted bound with many samples (Burda et al. 2015),
  with q* as the proposal: the closest Gaussian to each posterior. (Not the larger of the bounds
  under q* and under q: a poor proposal's heavy-tailed weights now and then put its estimate above
  log p(x), and the maximum would keep those.)

and the gaps that split the inference gap :math:`\\log p(x) - \\mathcal L[q]` in two:

.. math::
    \\underbrace{\\log \\hat p(x) - \\mathcal L[q^*]}_{\\text{approximation gap}}
    + \\underbrace{\\mathcal L[q^*] - \\mathcal L[q]}_{\\text{amortization gap}}.

The first is the price of the Gaussian family, the second that of sharing one encoder across the
data. Every figure is a mean over datapoints with its standard error (gaps are paired, datapoint by
datapoint). On the linear-Gaussian model the approximation gap has the closed form
:math:`\\frac12 (\\sum_d \\log \\Lambda_{dd} - \\log\\det\\Lambda)`, which the tests hold it to.

References:

1. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
2. Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, arXiv 1802.02550.
3. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyro
import torch
from tqdm.auto import tqdm

from pvae.guides import MeanFieldGuide, SemiAmortizedGuide, gaussian_guide, refine

from .inference import elbo_terms, iwae_bound, make_elbo, max_plate_nesting
from .utils import atomic_write, set_seed

INITS = ("encoder", "prior")

# Cremer, Li & Duvenaud 2018, Table 2, fully factorized Gaussian q, Fashion-MNIST (thresholded at 0.5,
# 55,000 training images), 784-200-200-50 ELU MLPs, Bernoulli pixels, 3,280 epochs, on training data.
CREMER_2018 = {
    "source": "Cremer, Li & Duvenaud 2018 (arXiv 1801.03558), Table 2, factorized Gaussian, Fashion-MNIST, "
              "training datapoints",
    "log_px": -97.47,
    "elbo_q_star": -100.53,
    "elbo_q": -101.60,
    "approximation_gap": 3.06,
    "amortization_gap": 1.07,
    "inference_gap": 4.13,
}
# the commands that train and measure their setting with pvae (3,280 epochs: days on one CPU, hours on a GPU)
CREMER_2018_COMMAND = (
    "pvae train --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --binarize threshold "
    "--val-size 5000 --latent-dim 50 --hidden 200 200 --activation elu --likelihood bernoulli "
    "--batch-size 100 --lr 1e-4 --epochs 3280 --out runs/cremer-ffg && "
    "pvae compare runs/cremer-ffg --split train --init prior --max-datapoints 1000 --iwae-samples 5000"
)


@dataclass
class CompareConfig:
    """How :func:`compare_inference` measures; saved with its results."""

    batch_size: int = 100  # datapoints whose q* are optimized at once, vectorized
    init: str = "encoder"  # where q* starts: "encoder" (when there is one) or "prior"
    particles: int = 100  # samples of z per datapoint and Adam step of q*
    lr: float = 5e-2  # Adam's first learning rate for q*'s means and scales
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
        if not (self.lr > 0 and self.refine_lr > 0):
            raise ValueError(f"lr and refine_lr must be positive, got {self.lr}, {self.refine_lr}")


@dataclass
class Estimate:
    """A mean over datapoints and its standard error."""

    mean: float
    se: float

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        n = values.numel()
        se = (values.std() / math.sqrt(n)).item() if n > 1 else 0.0
        return cls(values.mean().item(), se)

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.se:.2f}"


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
    reference: dict = field(default_factory=lambda: dict(CREMER_2018))

    def rows(self) -> list:
        """``(label, Estimate or None, reference value or None)`` in the order of the table."""
        ref = self.reference
        rows = [("log p̂(x)", self.log_px, ref.get("log_px")), ("L[q*]", self.elbo_q_star, ref.get("elbo_q_star"))]
        rows += [(f"L[q_K], K={k}", est, None) for k, est in sorted(self.elbo_q_k.items(), reverse=True)]
        rows += [
            ("L[q]", self.elbo_q, ref.get("elbo_q")),
            ("approximation gap", self.approximation_gap, ref.get("approximation_gap")),
            ("amortization gap", self.amortization_gap, ref.get("amortization_gap")),
            ("inference gap", self.inference_gap, ref.get("inference_gap")),
        ]
        return rows

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("elbo_q_k", "gap_q_k"):  # JSON keys are strings
            d[key] = {str(k): v for k, v in d[key].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        d = dict(d)
        for key in ("log_px", "elbo_q_star", "approximation_gap", "elbo_q", "amortization_gap", "inference_gap"):
            if d.get(key) is not None:
                d[key] = Estimate(**d[key])
        for key in ("elbo_q_k", "gap_q_k"):
            d[key] = {int(k): Estimate(**v) for k, v in d.get(key, {}).items()}
        return cls(**d)

    def table(self) -> str:
        """A plain-text table for the terminal."""
        head = ("", "ours (nats)", "Cremer et al. 2018")
        body = [(label, "-" if est is None else str(est), "" if ref is None else f"{ref:.2f}")
                for label, est, ref in self.rows()]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(3)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [head, *body]]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        s = self.settings
        lines = [
            "# Inference suboptimality",
            "",
            f"{self.datapoints} datapoints ({s.get('split', 'given data')}); mean ± standard error over "
            "datapoints, in nats; gaps are paired datapoint by datapoint. "
            f"q* optimized by Adam from the {s.get('init', '?')} with {s.get('particles', '?')} particles "
            f"per step ({self.q_star_steps:.0f} steps per batch on average); ELBOs with "
            f"{s.get('elbo_particles', '?')} samples, log p̂(x) by the importance-weighted bound with "
            f"{s.get('iwae_samples', '?')} samples; q_K: K gradient steps of size {s.get('refine_lr', '?')} "
            "from the encoder's q.",
            "",
            "| | ours | Cremer et al. 2018 |",
            "|---|---:|---:|",
        ]
        for label, est, ref in self.rows():
            lines.append(f"| {label} | {'-' if est is None else est} | {'' if ref is None else f'{ref:.2f}'} |")
        lines += [
            "",
            f"Reference: {self.reference.get('source', '')}. Their setting with pvae:",
            "",
            f"    {CREMER_2018_COMMAND}",
            "",
        ]
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """A bar chart: each q's gap to log p̂(x), and the two gaps beside Cremer et al.'s."""
        from . import plots

        plt = plots.plt
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        bars = [("q*", self.approximation_gap)]
        bars += [(f"q_K, K={k}", self.gap_q_k[k]) for k in sorted(self.gap_q_k, reverse=True)]
        if self.inference_gap is not None:
            bars.append(("q (encoder)", self.inference_gap))
        left.bar(range(len(bars)), [b.mean for _, b in bars], yerr=[b.se for _, b in bars], capsize=4,
                 color="tab:blue")
        left.set_xticks(range(len(bars)), [label for label, _ in bars])
        left.set_ylabel("log p̂(x) - L[q]  (nats)")
        left.set_title("inference gap of each q")
        gaps = [("approximation", self.approximation_gap, self.reference.get("approximation_gap")),
                ("amortization", self.amortization_gap, self.reference.get("amortization_gap"))]
        gaps = [g for g in gaps if g[1] is not None]
        pos = torch.arange(len(gaps), dtype=torch.float64)
        right.bar(pos - 0.2, [g[1].mean for g in gaps], 0.4, yerr=[g[1].se for g in gaps], capsize=4, label="ours")
        refs = [g[2] if g[2] is not None else 0.0 for g in gaps]
        right.bar(pos + 0.2, refs, 0.4, hatch="//", color="white", edgecolor="tab:gray",
                  label="Cremer et al. 2018 (Fashion-MNIST)")
        right.set_xticks(pos.tolist(), [g[0] + " gap" for g in gaps])
        right.set_ylabel("nats")
        right.set_title(f"gaps, {self.datapoints} datapoints")
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small")
        return plots._save(fig, path)

    def write(self, folder, stem: str = "compare", figure: bool = True) -> list:
        """``stem.json``, ``stem.md`` and (with ``figure``) the bar chart ``stem.png`` in ``folder``;
        returns their paths."""
        folder = Path(folder)
        paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
        atomic_write(paths[0], lambda tmp: Path(tmp).write_text(self.to_json() + "\n"))
        atomic_write(paths[1], lambda tmp: Path(tmp).write_text(self.to_markdown()))
        if figure:
            paths.append(self.plot(folder / f"{stem}.png"))
        return paths


# ----------------------------------------------------------------------------- measuring


def optimize_mean_field(
    model: Callable,
    x: torch.Tensor,
    loc: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    num_particles: int = 100,
    lr: float = 5e-2,
    max_steps: int = 3000,
    window: int = 100,
    lr_decays: int = 3,
    plate_nesting: Optional[int] = None,
) -> tuple:
    """The best diagonal Gaussian q*(z_b) for each row of ``x`` under ``model``, whose parameters
    stay as they are.

    A fresh :class:`~pvae.guides.MeanFieldGuide` over the ``B`` rows (dense gradients) is optimized
    by Adam on the sum of the rows' ELBOs, so every datapoint climbs its own bound and the ``(B, D)``
    parameters move together; the ELBO uses ``num_particles`` vectorized samples per row and the
    analytic KL where there is one. The batch's mean bound is averaged over windows of ``window``
    steps; when a window's average is no better than the previous one's, the bound has stopped
    improving at this learning rate, which is divided by 10, ``lr_decays`` times, and then the
    optimization stops (or after ``max_steps``). Averaging over a window sees through the Monte Carlo
    noise of single steps, and the smaller rates let q* settle on its optimum, about which Adam at a
    fixed rate would keep jittering.

    :param loc, scale: the start ``(B, D)`` each, e.g. an encoder's output; None: the prior N(0, I).
    :returns: ``(guide, steps)``: the optimized guide, to be called with ``x`` and no ``idx``, and the
        number of Adam steps taken.
    """
    if loc is None:
        latent_dim = getattr(model, "latent_dim", None)
        if latent_dim is None:
            raise ValueError("starting from the prior needs model.latent_dim; pass loc and scale instead")
        guide = MeanFieldGuide(x.shape[0], latent_dim, init_scale=1.0, sparse=False).to(x.device)
    else:
        guide = MeanFieldGuide(x.shape[0], loc.shape[-1], sparse=False).to(x.device)
        guide.set_local_params(loc, scale if scale is not None else torch.ones_like(loc))
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, x)
    # a Gaussian guide: the lean ELBO, with no host synchronization in these many steps
    elbo = make_elbo("analytic-kl", num_particles, max(plate_nesting, 1), reparameterized=True)
    params = list(guide.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    last, total, decays, step = -math.inf, 0.0, 0, 0
    # a param store of its own: these rows' tables must not meet a trained guide's of the same name
    with pyro.get_param_store().scope():
        for step in range(1, max_steps + 1):
            loss = elbo.differentiable_loss(model, guide, x)  # -sum_b ELBO_b, averaged over particles
            # gradients of the local parameters only: the decoder's are never formed
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            optimizer.step()
            total -= loss.detach()
            if step % window:
                continue
            mean = total.item() / (window * x.shape[0])  # the batch's mean bound over the window
            total = 0.0
            if mean > last:
                last = mean
                continue
            if decays == lr_decays:
                break
            decays += 1
            for group in optimizer.param_groups:
                group["lr"] /= 10
    guide.requires_grad_(False).eval()
    return guide, step


@torch.no_grad()
def _mean_elbo(model, guide, x, num_particles, chunk_size, plate_nesting) -> torch.Tensor:
    """The per-datapoint ELBO ``(B,)`` from ``num_particles`` samples, in chunks."""
    total = x.new_zeros(x.shape[0])
    for start in range(0, num_particles, chunk_size):
        k = min(chunk_size, num_particles - start)
        total += k * elbo_terms(model, guide, x, num_particles=k, plate_nesting=plate_nesting)["elbo"]
    return total / num_particles


def compare_inference(
    model: Callable,
    x: torch.Tensor,
    encoder: Optional[Callable] = None,
    config: Optional[CompareConfig] = None,
    progress: bool = False,
    settings: Optional[dict] = None,
) -> Comparison:
    """Measure L[q], L[q*], L[q_K], log p̂(x) and the gaps on the datapoints ``x`` ``(N, P)``.

    :param model: a trained Pyro model ``model(x, idx=None, num_data=None)``; it is not changed.
    :param encoder: an amortized guide with ``encode(x) -> (loc, scale)`` (for a semi-amortized
        guide, its ``encoder``: :func:`encoder_of`); None measures q* (from the prior) and log p̂(x) only.
    :param settings: extra entries for the result's ``settings`` (the run, the split, ...).
    """
    config = config or CompareConfig()
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (N, P) batch of datapoints, got shape {tuple(x.shape)}")
    set_seed(config.seed)
    init = config.init if encoder is not None else "prior"
    values = {key: [] for key in ("log_px", "elbo_q_star", "elbo_q", *(f"q_{k}" for k in config.refine_steps))}
    steps = []
    nesting = None
    for xb in tqdm(x.split(config.batch_size), desc="q*", disable=not progress, leave=False):
        with torch.no_grad():
            loc0, scale0 = encoder.encode(xb) if encoder is not None else (None, None)
        if encoder is not None:  # first, so that a step size too large fails before the long part
            values["elbo_q"].append(_mean_elbo(model, encoder, xb, config.elbo_particles, config.chunk_size, nesting))
            loc, scale, done = loc0, scale0, 0
            for k in config.refine_steps:  # gradient steps are memoryless: go on from the last K
                loc, scale = refine(model, xb, loc, scale, k - done, config.refine_lr)
                done = k
                q_k = gaussian_guide(loc, scale)
                values[f"q_{k}"].append(_mean_elbo(model, q_k, xb, config.elbo_particles, config.chunk_size, nesting))
        start = (loc0, scale0) if init == "encoder" else (None, None)
        q_star, n = optimize_mean_field(
            model, xb, *start, num_particles=config.particles, lr=config.lr, max_steps=config.max_steps,
            window=config.window, lr_decays=config.lr_decays, plate_nesting=nesting,
        )
        if nesting is None:
            nesting = max(max_plate_nesting(model, q_star, xb), 1)
        steps.append(n)
        values["elbo_q_star"].append(_mean_elbo(model, q_star, xb, config.elbo_particles, config.chunk_size, nesting))
        values["log_px"].append(iwae_bound(model, q_star, xb, num_samples=config.iwae_samples,
                                           chunk_size=config.chunk_size, plate_nesting=nesting))
    v = {key: torch.cat(parts) for key, parts in values.items() if parts}
    result = Comparison(
        datapoints=x.shape[0],
        log_px=Estimate.of(v["log_px"]),
        elbo_q_star=Estimate.of(v["elbo_q_star"]),
        approximation_gap=Estimate.of(v["log_px"] - v["elbo_q_star"]),
        q_star_steps=sum(steps) / len(steps),
        settings={**asdict(config), "init": init, **(settings or {})},
    )
    if encoder is not None:
        result.elbo_q = Estimate.of(v["elbo_q"])
        result.amortization_gap = Estimate.of(v["elbo_q_star"] - v["elbo_q"])
        result.inference_gap = Estimate.of(v["log_px"] - v["elbo_q"])
        result.elbo_q_k = {k: Estimate.of(v[f"q_{k}"]) for k in config.refine_steps}
        result.gap_q_k = {k: Estimate.of(v["log_px"] - v[f"q_{k}"]) for k in config.refine_steps}
    return result


def encoder_of(guide) -> Optional[Callable]:
    """The amortized encoder of a trained guide: a semi-amortized guide's ``encoder``, the guide itself
    if it has ``encode`` and is amortized, None for a mean-field guide."""
    if isinstance(guide, SemiAmortizedGuide):
        return guide.encoder
    if hasattr(guide, "encode") and getattr(guide, "amortized", True):
        return guide
    return None


def plot_training_curves(runs: dict, path, key: str = "train_elbo") -> Path:
    """ELBO against epoch and against training seconds for several runs on one figure.

    :param runs: ``{label: run folder}`` or ``{label: history}``. The default key, the ELBO on
        training rows, is the one every guide records (a mean-field guide has no test ELBO).
    """
    from . import plots
    from .metrics import read_metrics

    histories = {label: read_metrics(r) if isinstance(r, (str, Path)) else r for label, r in runs.items()}
    return plots.plot_curves(histories, path, key=key)
