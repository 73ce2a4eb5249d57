"""Results as people read them: terminal tables and Markdown for an :class:`~pvae.evaluate.Evaluation`
and a :class:`~pvae.compare.Comparison`, the published figures they are set beside, only where the
run's setting matches the paper's, and a run folder as one self-contained HTML page
(:func:`write_report`)."""

import math
from pathlib import Path
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


# ----------------------------------------------------------------------------- reconstruction errors

CODER_LABELS = {"pca": "PCA", "ae": "autoencoder", "vae": "VAE (mean of q)"}


def reconstruction_table(result) -> str:
    """A Markdown table of a :class:`~pvae.autoencoding.ReconstructionErrors`: one row per method, one
    column per latent size, the squared error per image (mean ± standard error)."""
    dims = sorted({d for by_dim in result.errors.values() for d in by_dim})
    lines = ["| | " + " | ".join(f"d = {d}" for d in dims) + " |", "| --- |" + " ---: |" * len(dims)]
    for method, by_dim in result.errors.items():
        cells = [str(by_dim[d]) if d in by_dim else "—" for d in dims]
        lines.append(f"| {CODER_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the HTML report

REPORT = "report.html"
IMAGE_TYPES = {".png": "image/png", ".gif": "image/gif"}
METRIC_COLUMNS = ("epoch", "train_loss", "train_elbo", "train_recon", "train_kl", "test_elbo", "test_recon", "test_kl",
                  "kl_weight", "seconds", "elapsed")
STYLE = """
body { font-family: sans-serif; max-width: 1180px; margin: 1.5em auto; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.sub { color: #666; margin-top: 0; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } details { margin: 0.6em 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
figure { margin: 0; max-width: 100%; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; } code { background: #f5f5f5; padding: 0 0.2em; }
"""


def write_report(run_dir, out=None) -> Path:
    """One self-contained HTML page of a run folder, ``RUN/report.html`` (or ``out``): the config, the
    final metrics and every epoch's, the evaluation and comparison results found in the folder, and
    every figure in it (PNG and GIF, embedded as base64 ``data:`` URIs). No script, no stylesheet or
    font from elsewhere: it opens from the file system, without a server or a network."""
    from .metrics import read_metrics
    from .run import read_config
    from .utils import atomic_write

    folder = Path(run_dir)
    config = read_config(folder)
    try:
        history = read_metrics(folder)
    except FileNotFoundError:
        history = []
    body = [f"<h1>pvae run {_e(folder.resolve().name)}</h1>",
            f"<p class=\"sub\">{_e(str(folder.resolve()))}</p>"]
    images = report_images(folder)
    placed = set()

    def beside(html: str, *names: str) -> str:
        """``html`` with the figures ``names`` of the folder that exist, next to it."""
        found = [p for p in images if p.name in names]
        placed.update(found)
        return "<div class=\"row\"><div>" + html + "</div>" + "".join(_figure_html(folder, p) for p in found) + "</div>"

    sections = []
    if history:
        sections.append(("metrics", "Metrics", beside(_metrics_html(history), "curves.png")))
    sections.append(("config", "Configuration", _config_html(config)))
    for path in sorted(folder.glob("evaluation-*.json")):
        split = path.stem.split("-", 1)[1]
        sections.append((path.stem, f"Evaluation ({split} split)",
                         beside(_evaluation_html(path), f"psis-{split}.png", f"kl-per-dim-{split}.png")))
    for path in sorted(folder.glob("compare-*.json")):
        split = path.stem.split("-", 1)[1]
        sections.append((path.stem, f"Inference gaps ({split} split)",
                         beside(_comparison_html(path, config, split), f"compare-{split}.png")))
    rest = [p for p in images if p not in placed]
    if rest:
        sections.append(("figures", "Figures", "<div class=\"figures\">\n" + "\n".join(_figure_html(folder, p) for p in rest)
                         + "\n</div>"))
    body.append("<nav>" + "".join(f"<a href=\"#{_e(key)}\">{_e(title)}</a>" for key, title, _ in sections) + "</nav>")
    body += [f"<section id=\"{_e(key)}\"><h2>{_e(title)}</h2>\n{html}</section>" for key, title, html in sections]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>pvae run {_e(folder.resolve().name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    out = Path(out) if out is not None else folder / REPORT
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out


def report_images(folder) -> list:
    """Every figure in a run folder and its subfolders: first those of :data:`pvae.figures.FIGURES`, in
    its order, then the rest by name."""
    from .figures import FIGURES, figure_for_file

    folder = Path(folder)
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_TYPES and p.is_file()
             and "tensorboard" not in p.relative_to(folder).parts]
    order = {name: i for i, name in enumerate(FIGURES)}

    def rank(path):
        figure = figure_for_file(path.relative_to(folder).as_posix())
        return (order[figure.name] if figure else len(order), path.relative_to(folder).as_posix())

    return sorted(found, key=rank)


def _figure_html(folder, path) -> str:
    import base64

    from .figures import figure_for_file

    name = path.relative_to(folder).as_posix()
    figure = figure_for_file(name)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = f": {_e(figure.caption)}" if figure else ""
    return (f"<figure><img src=\"data:{IMAGE_TYPES[path.suffix.lower()]};base64,{data}\" alt=\"{_e(name)}\" "
            f"data-file=\"{_e(name)}\"><figcaption><code>{_e(name)}</code>{caption}</figcaption></figure>")


def _metrics_html(history: list) -> str:
    columns = [c for c in METRIC_COLUMNS if any(c in r for r in history)]
    final = history[-1]
    summary = _table(["measure", "after the last epoch"],
                     [[c.replace("_", " "), _num(final[c])] for c in columns if c in final])
    every = _table(columns, [[_num(r.get(c)) for c in columns] for r in history])
    return (f"<p>{len(history)} epochs, {final.get('step', '?')} steps, {_num(final.get('elapsed'))} s of training. "
            "ELBOs in nats per datapoint (higher is better).</p>" + summary +
            f"<details><summary>every epoch</summary>{every}</details>")


def _config_html(config: dict) -> str:
    parts = []
    for key, title in (("run", "data, model and guide"), ("fit", "fitting")):
        block = config.get(key) or {}
        if block:
            parts.append(f"<div><h3>{title}</h3>" + _table(["setting", "value"], [[k, _value(v)] for k, v in sorted(block.items())])
                         + "</div>")
    if not config.get("run"):
        parts.append("<p>Fitted from Python without a factory: the data and programs are not recorded.</p>")
    return "<div class=\"row\">" + "\n".join(parts) + "</div>"


def _evaluation_html(path) -> str:
    import json

    ev = Evaluation.from_dict(json.loads(path.read_text()))
    context = ", ".join(f"{k} {v}" for k, v in ev.info.items())
    rows = [[EVALUATION_LABELS[name], _num(est.mean), _num(est.se)] for name, est in ev.summary().items()]
    dims = [[name, _num(ev.activity[i]), _num(ev.kl_per_dim[i]), _num(ev.kl_per_dim_se[i])]
            for i, name in enumerate(ev.latent_names)]
    return (f"<p>{ev.num_datapoints} datapoints, K = {ev.num_samples} samples of q(z|x) each"
            + (f"; {_e(context)}" if context else "") + ". Means over datapoints with their standard errors.</p>"
            + _table(["measure", "mean", "s.e."], rows)
            + f"<p>Active units: {ev.active_units} of {len(ev.latent_names)} (Cov_x(E_q[z_d]) &gt; {ev.active_threshold}).</p>"
            + _table(["latent", "Cov_x(E_q[z_d])", "KL", "s.e."], dims))


def _comparison_html(path, config: dict, split: str) -> str:
    import json

    c = Comparison.from_dict(json.loads(path.read_text()))
    reference = cremer_reference({**(config.get("run") or {}), "split": split})
    head = ["", "ours (nats)"] + (["Cremer et al. 2018"] if reference else [])
    rows = [[label, "-" if est is None else str(est)] + ([_num(ref)] if reference else [])
            for label, est, ref in comparison_rows(c, reference)]
    note = f"<p>Reference: {_e(reference['source'])}.</p>" if reference else ""
    return f"<p>{c.datapoints} datapoints; mean ± standard error, gaps paired by datapoint.</p>" + _table(head, rows) + note


def _table(head, rows) -> str:
    lines = ["<table><thead><tr>" + "".join(f"<th>{_e(str(h))}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(f"<td class=\"num\">{_e(v)}</td>" if _numeric(v) else f"<td>{_e(str(v))}</td>" for v in row)
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join(lines) + "</tbody></table>"


def _numeric(v) -> bool:
    try:
        float(str(v).replace("−", "-").split(" ")[0])
    except ValueError:
        return False
    return True


def _num(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"


def _value(v) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _e(text: str) -> str:
    import html

    return html.escape(str(text), quote=True)
