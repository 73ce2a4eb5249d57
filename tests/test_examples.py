"""Every script in ``examples/`` runs here with tiny arguments, and the test fails when one is missing.

Each example is imported by path and its ``main(argv)`` called in-process; ``{out}`` in an argv is
replaced by a fresh temporary folder, so nothing is written elsewhere. Every example prints its
results as ``... ELBO <value> ...`` lines in nats; those values must be finite and at most 0 (these
data are binary, so every ELBO is a lower bound on a log-probability). An example may add its own
check in :data:`CHECKS`.
"""

import importlib.util
import math
import re
import sys
from pathlib import Path

import matplotlib.image
import pytest

from helpers import assert_close

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

# example file -> tiny argv; add a line per new example
EXAMPLES = {
    "amortized_vs_mean_field.py": ["--epochs", "1", "--hidden", "16", "--datapoints", "8", "--study-refine-steps", "1", "5",
                                   "--quick", "--quiet", "--out", "{out}"],
    "custom_model.py": ["--epochs", "2", "--hidden", "32", "--components", "3", "--quiet", "--out", "{out}"],
    "latent_sizes.py": ["--sizes", "2", "5", "--epochs", "1", "--hidden", "32", "--samples", "16", "--quiet", "--out", "{out}"],
}

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


CHECKS = {
    "amortized_vs_mean_field.py": check_amortized_vs_mean_field,
    "custom_model.py": check_custom_model,
    "latent_sizes.py": check_latent_sizes,
}


def load_example(name: str):
    path = EXAMPLES_DIR / name
    spec = importlib.util.spec_from_file_location(f"pvae_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, and be caught below
    out = tmp_path / "out"
    argv = [arg.replace("{out}", str(out)) for arg in EXAMPLES[name]]
    result = load_example(name).main(argv)
    printed = capsys.readouterr().out
    elbos = [float(v) for v in ELBO_LINE.findall(printed)]
    assert elbos, f"{name} printed no 'ELBO <value>' line:\n{printed}"
    for value in elbos:
        assert math.isfinite(value) and value <= 0, f"{name} printed an impossible ELBO {value}:\n{printed}"
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
