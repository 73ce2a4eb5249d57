"""Results as people read them: terminal tables and Markdown for an :class:`~pvae.evaluate.Evaluation`
and a :class:`~pvae.compare.Comparison`, and the published figures they are set beside, only where the
run's setting matches the paper's."""

import math
from typing import Optional

from .compare import Comparison
from .evaluate import KHAT_THRESHOLDS, Evaluation

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
# their setting, as `pvae train` flags (CREMER_2018_COMMAND); a run matches when these agree
CREMER_2018_SETTING = {"binarize": "threshold", "latent_dim": 50, "hidden": [200, 200], "activation": "elu",
                       "likelihood": "bernoulli", "model": "mlp"}
CREMER_2018_COMMAND = (
    "pvae train --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --binarize threshold "
    "--val-size 5000 --latent-dim 50 --hidden 200 200 --activation elu --likelihood bernoulli "
    "--batch-size 100 --lr 1e-4 --epochs 3280 --out runs/cremer-ffg && "
    "pvae compare runs/cremer-ffg --split train --init prior --max-datapoints 1000 --iwae-samples 5000"
)


def cremer_reference(run_config: Optional[dict]) -> Optional[dict]:
    """Cremer et al.'s figures when ``run_config`` (a run's config, as a dict) is their setting, else None."""
    if not run_config or "fashion" not in str(run_config.get("dataset", "")).lower():
        return None
    for key, value in CREMER_2018_SETTING.items():
        have = run_config.get(key)
        if (list(have) if isinstance(have, (list, tuple)) else have) != value:
            return None
    return CREMER_2018


# ----------------------------------------------------------------------------- evaluation

EVALUATION_LABELS = {
    "log_px": "log p̂(x), importance-weighted bound",
    "nll": "negative log-likelihood (nats)",
    "bits_per_dim": "bits per dimension",
    "elbo": "ELBO (Monte Carlo)",
    "recon": "reconstruction E_q[log p(x|z)]",
    "kl": "KL(q(z|x) ‖ p(z)), Monte Carlo",
    "kl_analytic": "KL(q(z|x) ‖ p(z)), closed form",
    "elbo_analytic": "ELBO with the closed-form KL",
    "gap": "log p̂(x) − ELBO",
    **{f"khat_above_{t}": f"share of datapoints with k̂ > {t}" for t in KHAT_THRESHOLDS},
}


def evaluation_markdown(ev: Evaluation) -> str:
    """The summary table, the active units and the per-dimension table."""
    context = ", ".join(f"{k} {v}" for k, v in ev.info.items())
    lines = [
        "## Evaluation" + (f": {context}" if context else ""),
        "",
        f"{ev.num_datapoints} datapoints of {ev.num_dims} dimensions, K = {ev.num_samples} samples "
        "of q(z|x) each; means over datapoints with their standard errors.",
        "",
        "| measure | mean | s.e. |",
        "| --- | ---: | ---: |",
    ]
    for name, est in ev.summary().items():
        lines.append(f"| {EVALUATION_LABELS[name]} | {est.mean:.4f} | {_fmt(est.se)} |")
    if ev.marginal is not None:
        lines.append(f"| log p̂(x), global sites integrated out | {ev.marginal:.4f} | — |")
    for reason, count in ev.khat_flags().items():
        lines.append(f"\nk̂ not fitted for {count} datapoint(s): {reason}.")
    lines += [
        "",
        f"Active units: {ev.active_units} of {len(ev.latent_names)} "
        f"(Cov_x(E_q[z_d]) > {ev.active_threshold}).",
        "",
        "| latent | Cov_x(E_q[z_d]) | s.e. | KL | s.e. |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for i, name in enumerate(ev.latent_names):
        lines.append(f"| {name} | {_fmt(ev.activity[i])} | {_fmt(ev.activity_se[i])} | "
                     f"{_fmt(ev.kl_per_dim[i])} | {_fmt(ev.kl_per_dim_se[i])} |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4f}"


# ----------------------------------------------------------------------------- comparison


def comparison_rows(c: Comparison, reference: Optional[dict] = None) -> list:
    """``(label, Estimate or None, reference value or None)`` in the order of the table."""
    ref = reference or {}
    rows = [("log p̂(x)", c.log_px, ref.get("log_px")), ("L[q*]", c.elbo_q_star, ref.get("elbo_q_star"))]
    rows += [(f"L[q_K], K={k}", est, None) for k, est in sorted(c.elbo_q_k.items(), reverse=True)]
    rows += [
        ("L[q]", c.elbo_q, ref.get("elbo_q")),
        ("approximation gap", c.approximation_gap, ref.get("approximation_gap")),
        ("amortization gap", c.amortization_gap, ref.get("amortization_gap")),
        ("inference gap", c.inference_gap, ref.get("inference_gap")),
    ]
    return rows


def comparison_table(c: Comparison, reference: Optional[dict] = None) -> str:
    """A plain-text table for the terminal."""
    head = ("", "ours (nats)") + (("Cremer et al. 2018",) if reference else ())
    body = [(label, "-" if est is None else str(est)) + ((("" if ref is None else f"{ref:.2f}"),) if reference else ())
            for label, est, ref in comparison_rows(c, reference)]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(col.ljust(w) if i == 0 else col.rjust(w) for i, (col, w) in enumerate(zip(r, widths)))
             for r in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def comparison_markdown(c: Comparison, reference: Optional[dict] = None) -> str:
    s = c.settings
    lines = [
        "# Inference suboptimality",
        "",
        f"{c.datapoints} datapoints ({s.get('split', 'given data')}); mean ± standard error over "
        "datapoints, in nats; gaps are paired datapoint by datapoint. "
        f"q* (the mean-field family over {s.get('family', 'the local sites')}) optimized by L-BFGS from the "
        f"{s.get('init', '?')} on {s.get('particles', '?')} fixed draws per datapoint ({c.q_star_steps:.0f} "
        f"iterations on average); ELBOs of q and q_K with {s.get('elbo_particles', '?')} samples, log p̂(x) by the "
        f"importance-weighted bound and L[q*] with {s.get('iwae_samples', '?')} fresh samples of q*; q_K: K "
        f"gradient steps of size "
        f"{s.get('refine_lr', '?')} from the encoder's q." + (f" Global sites: {s['global sites']}." if "global sites" in s else ""),
        "",
        "| | ours |" + (" Cremer et al. 2018 |" if reference else ""),
        "|---|---:|" + ("---:|" if reference else ""),
    ]
    for label, est, ref in comparison_rows(c, reference):
        row = f"| {label} | {'-' if est is None else est} |"
        lines.append(row + (f" {'' if ref is None else f'{ref:.2f}'} |" if reference else ""))
    lines += ["", f"Cremer et al.'s setting with pvae: `{CREMER_2018_COMMAND}`", ""]
    if reference:
        lines.insert(-2, f"Reference: {reference['source']}.")
    return "\n".join(lines)
