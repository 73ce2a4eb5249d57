"""Two stochastic layers (Burda et al. 2015) as a model of the registry, with pvae's generic guides:
trained, evaluated and compared by the same commands as the one-layer VAE, with no special case."""

import json

import torch
from helpers import assert_close
from torch import nn

import pvae
from pvae.cli import main
from pvae.guides import AmortizedGuide
from pvae.inference import iwae_bound, log_weights
from pvae.models import BottomUpEncoder, two_layer_vae
from pvae.programs import inspect_programs


def linear_shapes(module: nn.Module) -> list:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_the_default_architecture_is_burda_et_als():
    """784-200-200-100-100-50 in the encoder, 50-100-100-100 and 100-200-200-784 in the model, and a
    head giving q(z2 | x) and q(z1 | x) their locs and scales (2 x (50 + 100))."""
    model = two_layer_vae(784)
    assert linear_shapes(model.top) == [(50, 100), (100, 100), (100, 200)]
    assert linear_shapes(model.decoder) == [(100, 200), (200, 200), (200, 784)]
    guide = AmortizedGuide(model, body=BottomUpEncoder(784, (200, 100)), inputs=())
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    info = inspect_programs(model, guide, x)
    assert linear_shapes(guide.body) == [(784, 200), (200, 200), (200, 100), (100, 100)]
    assert linear_shapes(guide.head) == [(300, 300)]
    assert [s.name for s in guide.family.sites] == ["z2", "z1"] and info.local == ("z2", "z1")
    # q factorizes over the layers given x, so both closed-form KLs are exact
    assert info.analytic_kl == {"z1", "z2"}


def test_the_closed_form_kl_of_the_lower_layer_matches_monte_carlo():
    """KL(q(z1|x) || p(z1|z2)) at the sampled z2, summed with z2's, against log q - log p over 20,000
    draws, per datapoint within 5 standard errors."""
    model = two_layer_vae(20, (4, 3), (16, 8))
    guide = AmortizedGuide(model, body=BottomUpEncoder(20, (16, 8)), inputs=())
    x = torch.bernoulli(torch.full((6, 20), 0.4))
    lw = log_weights(model, guide, x, num_particles=20_000)
    sampled = lw.log_q - lw.log_prior
    se = sampled.std(0) / 20_000**0.5
    assert_close((sampled.mean(0) - lw.kl.mean(0)) / se, 0.0, atol=5.0)


def test_the_two_layer_model_trains_on_digits():
    """Four epochs raise the test bound (K = 100) by more than 10 nats over the untrained model's (-44.6;
    measured after training: -28.5)."""
    data = pvae.load_dataset("digits", binarize="static")
    test = data.batch("test", slice(0, 200))
    pvae.set_seed(0)
    model = two_layer_vae(64, (8, 4), (64, 32))
    guide = AmortizedGuide(model, body=BottomUpEncoder(64, (64, 32)), inputs=())
    guide.setup(data.batch("train", slice(0, 8)))
    before = iwae_bound(model, guide, test, num_samples=100).mean().item()
    pvae.fit(model, guide, data, pvae.FitConfig(epochs=4, elbo="analytic-kl", eval_every=0, progress=False))
    after = iwae_bound(model, guide, test, num_samples=100).mean().item()
    assert after > before + 10, (before, after)


def test_the_cli_trains_evaluates_and_compares_two_layers_and_flow_guides(tmp_path, capsys):
    """The registry's names through pvae train, and the same evaluate and compare as for any model."""
    runs = {
        "two-layer": ["--model", "two-layer", "--latent-dims", "6", "3", "--layer-hidden", "32", "16",
                      "--elbo", "iwae", "--particles", "3"],
        "planar": ["--guide", "planar", "--flow-steps", "2", "--latent-dim", "2", "--hidden", "32"],
    }
    for name, flags in runs.items():
        run = tmp_path / name
        assert main(["train", *flags, "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
        assert main(["evaluate", str(run), "--samples", "30", "--max-datapoints", "20", "--no-progress"]) == 0
        assert main(["compare", str(run), "--max-datapoints", "6", "--max-steps", "20",
                     "--particles", "4", "--refine-steps", "1", "--elbo-particles", "20", "--iwae-samples", "30",
                     "--no-progress", "--no-figures"]) == 0
        comparison = json.loads((run / "compare-test.json").read_text())
        assert comparison["elbo_q"]["mean"] < comparison["log_px"]["mean"]
    family = json.loads((tmp_path / "planar" / "compare-test.json").read_text())["settings"]["family"]
    assert family.startswith("planar")
    assert (tmp_path / "planar" / "manifold.png").is_file() and (tmp_path / "two-layer" / "samples.png").is_file()
    capsys.readouterr()
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("two-layer", "planar", "full-covariance", "iwae", "dreg", "tc", "--tc-beta", "--flow-steps"):
        assert name in text, name
