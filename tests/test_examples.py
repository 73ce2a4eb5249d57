"""Every script in ``examples/`` runs here with tiny arguments, and the test fails when one is missing.

Each example is imported by path and its ``main(argv)`` called in-process; ``{out}`` in an argv is
replaced by a fresh temporary folder, so nothing is written elsewhere. Every example prints its
results as ``... ELBO <value> ...`` lines in nats; those values must be finite and at most 0 (these
data are binary, so every ELBO is a lower bound on a log-probability). Examples on continuous data
(:data:`CONTINUOUS`), whose densities and bounds may have either sign, print no ELBO line: their
bounds are checked by their own check. The examples of :data:`DENSITIES` print ELBOs on grey levels,
which bound a log-density. An example may add its own check in :data:`CHECKS`.
"""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

import pvae

from helpers import assert_close

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

# example file -> tiny argv; add a line per new example
EXAMPLES = {
    "amortized_vs_mean_field.py": ["--epochs", "1", "--hidden", "16", "--datapoints", "8", "--study-refine-steps", "1", "5",
                                   "--quick", "--quiet", "--out", "{out}"],
    "autoencoders.py": ["--sizes", "2", "4", "--epochs", "2", "--hidden", "16", "--denoising-size", "4", "--sample-sizes",
                        "2", "4", "--quiet", "--out", "{out}"],
    "custom_model.py": ["--epochs", "2", "--hidden", "32", "--components", "3", "--quiet", "--out", "{out}"],
    "latent_sizes.py": ["--sizes", "2", "5", "--epochs", "1", "--hidden", "32", "--samples", "16", "--quiet", "--out", "{out}"],
    "tutorial_vae.py": ["--epochs", "2", "--hidden", "64", "--datapoints", "20", "--quick", "--quiet",
                        "--out", "{out}"],
    "hierarchical_vae.py": ["--epochs", "4", "--hidden", "32", "--local-lr", "0.1", "--refine-steps", "1",
                            "--datapoints", "20", "--study-refine-steps", "1", "3", "--quick", "--quiet",
                            "--out", "{out}"],
    "mixture_vae.py": ["--epochs", "2", "--hidden", "64", "--components", "4", "--datapoints", "20",
                       "--study-refine-steps", "2", "--quick", "--quiet", "--out", "{out}"],
    "factor_analysis.py": ["--epochs", "30", "--datapoints", "50", "--study-refine-steps", "1", "5", "--quick",
                           "--quiet", "--out", "{out}"],
}
# examples on continuous data: they print "bound", not "ELBO" (a density's bound may be positive)
CONTINUOUS = {"factor_analysis.py"}

# examples on grey levels: their ELBOs bound a log-density, which may be positive
DENSITIES = {"autoencoders.py"}

ELBO_LINE = re.compile(r"ELBO\s+(-?(?:\d+\.\d*|inf|nan))", re.IGNORECASE)
COIN_FLIPS = -64 * math.log(2)  # log p(x) of an 8x8 binary image under independent fair coins


def check_custom_model(result, printed, out):
    # an untrained decoder is near the coin flips; two epochs of the ELBO's ascent must get past them
    for name in ("mixture prior", "normal prior"):
        record = result[name]
        assert record["test_elbo"] > COIN_FLIPS, f"{name}: test ELBO {record['test_elbo']:.3f} is no better than coin flips"
        assert_close(record["test_elbo"], record["test_recon"] - record["test_kl"], atol=1e-4, msg=f"{name}: elbo = recon - kl")
    printed_elbos = [float(v) for v in ELBO_LINE.findall(printed)]
    assert_close(printed_elbos, [result[n]["test_elbo"] for n in ("mixture prior", "normal prior")], atol=1e-3,
                 msg="printed test ELBOs")
    assert sorted(p.name for p in out.iterdir()) == ["samples_mixture_prior.png", "samples_normal_prior.png"]


def check_latent_sizes(result, printed, out):
    assert sorted(result) == [2, 5]
    for size, r in result.items():
        image = matplotlib.image.imread(r["samples"])
        assert image.ndim == 3 and min(image.shape[:2]) > 50, f"latent size {size}: a {image.shape} picture"
        assert image.std() > 0.01, f"latent size {size}: a blank picture"
    assert sorted(p.name for p in out.iterdir()) == ["samples_by_size.png", "samples_z2.png", "samples_z5.png"]
    panel, one = (matplotlib.image.imread(out / name) for name in ("samples_by_size.png", "samples_z2.png"))
    assert panel.shape[1] > 1.8 * one.shape[1] and panel.std() > 0.01, "two sizes side by side"
    assert len(ELBO_LINE.findall(printed)) == 2


def check_amortized_vs_mean_field(result, printed, out):
    histories, comparison = result["histories"], result["comparison"]
    assert sorted(histories) == ["amortized", "mean-field", "semi-amortized"]
    printed_elbos = [float(v) for v in re.findall(r"train ELBO\s+(-?\d+\.\d*)", printed)]
    assert_close(printed_elbos, [histories[g][-1]["train_elbo"] for g in ("amortized", "mean-field", "semi-amortized")],
                 atol=1e-3, msg="printed train ELBOs")
    assert comparison.datapoints == 8 and sorted(comparison.elbo_q_k) == [1, 5]
    assert_close(comparison.amortization_gap.mean, comparison.elbo_q_star.mean - comparison.elbo_q.mean, atol=1e-4,
                 msg="amortization gap = L[q*] - L[q]")
    assert "amortization gap" in printed and "approximation gap" in printed
    names = {p.name for p in out.iterdir()}
    assert {"curves.png", "compare.json", "compare.md", "compare.png", "amortized", "mean-field", "semi-amortized"} <= names


def check_gap_identities(comparison, datapoints):
    """The gaps are differences of the bounds, datapoint by datapoint (so their means are the means'
    differences), and the study measured the datapoints asked for."""
    assert comparison.datapoints == datapoints
    assert_close(comparison.amortization_gap.mean, comparison.elbo_q_star.mean - comparison.elbo_q.mean, atol=1e-4,
                 msg="amortization gap = L[q*] - L[q]")
    assert_close(comparison.approximation_gap.mean, comparison.log_px.mean - comparison.elbo_q_star.mean, atol=1e-4,
                 msg="approximation gap = log p(x) - L[q*]")
    assert_close(comparison.inference_gap.mean, comparison.log_px.mean - comparison.elbo_q.mean, atol=1e-4,
                 msg="inference gap = log p(x) - L[q]")
    for k, gap in comparison.gap_q_k.items():
        assert_close(gap.mean, comparison.log_px.mean - comparison.elbo_q_k[k].mean, atol=1e-4, msg=f"gap of q_{k}")
    # the importance-weighted bound with q* as proposal is above q*'s ELBO, up to Monte Carlo noise
    noise = 3 * comparison.approximation_gap.se + 0.02
    assert comparison.approximation_gap.mean > -noise, f"log p(x) below L[q*]: {comparison.approximation_gap}"


def check_binary_study(result, printed, out, guides, datapoints, refine_steps):
    """What the three examples on binary digits share: their printed train ELBOs are their histories',
    better than coin flips; the study's figures are log-probabilities and its gaps add up; the files."""
    histories, comparison = result["histories"], result["comparison"]
    assert list(histories) == list(guides)
    printed_elbos = [float(v) for v in re.findall(r"train ELBO\s+(-?\d+\.\d*)", printed)]
    assert_close(printed_elbos, [histories[g][-1]["train_elbo"] for g in guides], atol=1e-3, msg="printed train ELBOs")
    for guide in guides:
        record = histories[guide][-1]
        assert record["train_elbo"] > COIN_FLIPS, \
            f"{guide}: train ELBO {record['train_elbo']:.3f} is no better than coin flips"
    assert histories[guides[0]][-1]["test_elbo"] > COIN_FLIPS
    assert "test_elbo" not in histories["mean-field"][-1], "a mean-field guide has no q for test images"
    check_gap_identities(comparison, datapoints)
    assert comparison.log_px.mean < 0 and comparison.elbo_q.mean < 0
    assert sorted(comparison.elbo_q_k) == sorted(refine_steps)
    for label in ("log p̂(x)", "L[q*]", "L[q] ", "approximation gap", "amortization gap", "inference gap"):
        assert label in printed, f"the comparison table has no row {label!r}"
    assert ("L[q_K]" in printed) == bool(refine_steps)
    saved = json.loads((out / "compare.json").read_text())
    assert_close(saved["amortization_gap"]["mean"], comparison.amortization_gap.mean, atol=1e-9, msg="compare.json")
    names = {p.name for p in out.iterdir()}
    assert {"curves.png", "compare.json", "compare.md", "compare.png", *guides} <= names, names
    for guide in guides:
        assert (out / guide / "metrics.jsonl").is_file() and (out / guide / "checkpoint.pt").is_file()


def check_tutorial_vae(result, printed, out):
    check_binary_study(result, printed, out, ("amortized", "mean-field"), 20, ())
    # the tutorial's guide does not expose its (loc, scale): q* starts from the prior, no L[q_K]
    assert result["comparison"].settings["init"] == "prior"
    assert result["comparison"].settings["family"] == "latent continuous (5,)"


def check_hierarchical_vae(result, printed, out):
    check_binary_study(result, printed, out, ("amortized", "mean-field", "semi-amortized"), 20, (1, 3))
    comparison = result["comparison"]
    assert comparison.settings["init"] == "encoder"
    assert comparison.settings["family"] == "z1 continuous (2,), z2 continuous (8,)"
    # q* starts at the encoder's q and climbs: no worse than it, up to Monte Carlo noise
    assert comparison.amortization_gap.mean > -(3 * comparison.amortization_gap.se + 0.02), comparison.amortization_gap


def check_mixture_vae(result, printed, out):
    check_binary_study(result, printed, out, ("amortized", "mean-field"), 20, (2,))
    assert result["enumerated"] == {"amortized": ("c",), "mean-field": ("c",)}
    comparison = result["comparison"]
    assert comparison.settings["family"] == "z continuous (2,)", "q* is over z alone, c is summed out"
    weights = result["weights"]
    assert weights.shape == (4,) and abs(float(weights.sum()) - 1) < 1e-5 and bool((weights > 0).all())
    clusters, labels = result["clusters"], result["labels"]
    assert clusters.shape == labels.shape and int(clusters.min()) >= 0 and int(clusters.max()) < 4
    largest_class = int(torch.bincount(labels).max()) / len(labels)
    assert largest_class <= result["purity"] <= 1.0, result["purity"]
    # c summed out exactly: the study's L[q] is the ELBO with log p(z) = logsumexp_c log pi_c N(z; mu_c, sigma_c),
    # computed here by hand with many samples
    model, guide, x = result["model"], result["guide"], result["x_study"]
    with torch.no_grad():
        torch.manual_seed(0)
        q = guide.local_params(pvae.Batch.of(x))["z"]
        z = torch.distributions.Normal(q["loc"], q["scale"]).rsample((2000,))  # (S, B, D)
        log_q = torch.distributions.Normal(q["loc"], q["scale"]).log_prob(z).sum(-1)
        scale = torch.nn.functional.softplus(model.component_raw_scale)
        log_pz_c = torch.distributions.Normal(model.component_loc, scale).log_prob(z.unsqueeze(-2)).sum(-1)  # (S, B, K)
        log_pz = torch.logsumexp(log_pz_c + model.mixture_logits.log_softmax(-1), -1)
        log_px_z = torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
        elbo = (log_px_z + log_pz - log_q).mean(0).mean()
    assert_close(comparison.elbo_q.mean, elbo, atol=0.25, msg="L[q] with c summed out, by hand")


def check_factor_analysis(result, printed, out):
    histories, comparison, closed = result["histories"], result["comparison"], result["closed_form"]
    guides = ("amortized", "mean-field")
    bounds = [float(v) for v in re.findall(r"train bound\s+(-?\d+\.\d*)", printed)]
    assert_close(bounds, [histories[g][-1]["train_elbo"] for g in guides], atol=1e-3, msg="printed train bounds")
    assert all(math.isfinite(b) for b in bounds)
    for guide in guides:
        record = histories[guide][-1]
        assert record["train_global_kl"] > 0, "q(W) is a proper posterior: its KL from the prior is positive"
        # the per-row bound's gain over the first epoch: training worked
        assert record["train_elbo"] > histories[guide][0]["train_elbo"], f"{guide}: the bound did not improve"
    # the subspace of each guide's mean loadings, against the truth: the largest principal angle, by the
    # projections (sin of the largest angle = spectral norm of the projections' difference), within 10 degrees
    truth = result["truth"]["W"].double()
    projection = lambda A: A @ torch.linalg.pinv(A)  # noqa: E731
    for name, fitted in result["fitted"].items():
        distance = float(torch.linalg.matrix_norm(projection(fitted["W"].double()) - projection(truth), 2))
        largest = math.degrees(math.asin(min(1.0, distance)))
        assert_close(result["subspace"][name]["angles"][0], largest, atol=1e-3, msg=f"{name}: largest principal angle")
        assert largest < 10.0, f"{name}: the loadings' subspace is {largest:.1f} degrees from the truth"
        assert result["subspace"][name]["outside"] < 0.1
    # given the fitted W, mu, sigma the model is linear-Gaussian: log p(x) and the diagonal family's gap in closed form
    fit, x = result["fitted"]["amortized"], result["x_study"].double()
    W, mu, sigma = fit["W"].double(), fit["mu"].double(), fit["sigma"].double()
    log_px = torch.distributions.MultivariateNormal(mu, W @ W.T + torch.diag(sigma ** 2)).log_prob(x).mean()
    precision = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ torch.diag(sigma ** -2) @ W
    gap = 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))
    assert_close(closed["log_px"], log_px, atol=1e-6, msg="closed-form log p(x)")
    assert_close(closed["approximation_gap"], gap, atol=1e-6, msg="closed-form approximation gap")
    assert_close(comparison.log_px.mean, log_px, atol=0.05, msg="the study's log p(x) against the closed form")
    # L[q*] cannot beat the family's optimum (up to noise); with few steps it may fall short of it
    assert gap - 0.03 < comparison.approximation_gap.mean < gap + 0.15, (comparison.approximation_gap, gap)
    check_gap_identities(comparison, 50)
    assert "W held at the amortized guide's mean" in comparison.settings["global sites"]
    assert "ELBO" not in printed and "train bound" in printed
    assert {p.name for p in out.iterdir()} == {"curves.png", "compare.json", "compare.md", "compare.png",
                                               "loadings.json"}
    saved = json.loads((out / "loadings.json").read_text())
    assert_close(saved["true"], result["truth"]["W"], atol=1e-6, msg="loadings.json")


def check_autoencoders(result, printed, out):
    import pvae
    from pvae.autoencoding import PCA, reconstruction_error

    errors = result["reconstruction"].errors
    assert sorted(errors) == ["ae", "pca", "vae"] and all(sorted(e) == [2, 4] for e in errors.values())
    data = pvae.load_dataset("digits")
    for d in (2, 4):  # PCA's errors, computed again here, are the ones printed
        again = reconstruction_error(PCA(d).fit(data.train), data.test)
        assert_close(errors["pca"][d].mean, again.mean, rtol=1e-6, msg=f"PCA, d = {d}")
        assert f"| PCA | {errors['pca'][2]} | {errors['pca'][4]} |" in printed
    assert_close([float(v) for v in ELBO_LINE.findall(printed)], [result["vae_elbo"][d] for d in (2, 4)], atol=1e-2,
                 msg="printed VAE ELBOs")
    assert sorted(result["denoising"]) == ["Gaussian noise σ = 0.5", "masking p = 0.5", "masking p = 0.9"]
    from PIL import Image

    names = ["reconstructions.png", "interpolation.png", "generation-failures.png", "denoising.png"]
    assert [p.name for p in result["figures"]] == names and all(p.parent == out for p in result["figures"])
    for path in result["figures"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 8, f"{path.name} is blank"
    for label, e in result["denoising"].items():
        assert f"| {label} | {e['ae']} | {e['dae']} |" in printed


CHECKS = {
    "amortized_vs_mean_field.py": check_amortized_vs_mean_field,
    "autoencoders.py": check_autoencoders,
    "custom_model.py": check_custom_model,
    "latent_sizes.py": check_latent_sizes,
    "tutorial_vae.py": check_tutorial_vae,
    "hierarchical_vae.py": check_hierarchical_vae,
    "mixture_vae.py": check_mixture_vae,
    "factor_analysis.py": check_factor_analysis,
}


def load_example(name: str):
    path = EXAMPLES_DIR / name
    spec = importlib.util.spec_from_file_location(f"pvae_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up here
    sys.path.insert(0, str(EXAMPLES_DIR))  # as running the script does: its folder's _study.py
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(EXAMPLES_DIR))
    return module


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, and be caught below
    out = tmp_path / "out"
    argv = [arg.replace("{out}", str(out)) for arg in EXAMPLES[name]]
    result = load_example(name).main(argv)
    printed = capsys.readouterr().out
    elbos = [float(v) for v in ELBO_LINE.findall(printed)]
    if name in CONTINUOUS:
        assert not elbos, f"{name} is on continuous data: print its bounds as 'bound', not 'ELBO':\n{printed}"
    else:
        assert elbos, f"{name} printed no 'ELBO <value>' line:\n{printed}"
    for value in elbos:
        assert math.isfinite(value) and (value <= 0 or name in DENSITIES), f"{name} printed an impossible ELBO {value}:\n{printed}"
    if name in CHECKS:
        CHECKS[name](result, printed, out)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(out in p.parents for p in written), f"{name} wrote outside --out: {written}"


def test_every_example_is_listed():
    on_disk = {p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_")}
    missing = sorted(on_disk - set(EXAMPLES))
    assert not missing, f"examples not run by tests/test_examples.py (add them to EXAMPLES): {missing}"
    gone = sorted(set(EXAMPLES) - on_disk)
    assert not gone, f"EXAMPLES lists files that are not in examples/: {gone}"
