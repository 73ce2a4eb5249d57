"""Autoencoders as Pyro programs, PCA, denoising, sampling a code space (issue 8, part A)."""

import json
import math

import matplotlib.image
import numpy as np
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close
from scipy.linalg import subspace_angles

import pvae
from pvae import Estimate
from pvae.cli import main
from pvae.autoencoding import (
    PCA,
    CodeGaussian,
    CoderConfig,
    fit_autoencoder,
    perturbed_codes,
    reconstruction_error,
    sample_code_space,
)
from pvae.evaluate import evaluate
from pvae.guides import AmortizedGuide, GaussianNoise, MaskingNoise, mlp_guide, point_mass
from pvae.inference import ReparamELBO, elbo_terms
from pvae.models import FixedGaussian, mlp_autoencoder, mlp_vae
from pvae.programs import Batch, Program, ProgramError, inspect_programs
from pvae.codec import ProgramCodec
from pvae.protocols import Codec

QUIET = dict(progress=False)


def low_rank_data(n=600, p=10, d=3, seed=0):
    """Points near a d-dimensional subspace of R^p with well separated variances (9, 4, 1 against 0.01)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(p, p, generator=g))
    spread = torch.tensor([3.0, 2.0, 1.0, *[0.1] * (p - d)])
    return (torch.randn(n, p, generator=g) * spread) @ basis.T + 2.0


# ----------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("prior", ["flat", "normal"])
def test_the_autoencoders_elbo_is_the_squared_error_of_its_code(prior):
    """A point-mass q and a flat prior make the ELBO's estimate exactly log p(x | z = f(x)), which the
    fixed-variance Gaussian makes the squared error up to a scale and a constant; the VAE's N(0, I)
    prior adds log N(f(x); 0, I), the MAP penalty, and nothing else. On a minibatch of 10 of 250
    datapoints every term is scaled by 250 / 10."""
    sigma = 0.3
    make = mlp_autoencoder if prior == "flat" else mlp_vae
    model, guide = make(6, 2, (8,), FixedGaussian(sigma)), mlp_guide(6, 2, (8,), family=point_mass)
    x = torch.rand(10, 6)
    batch = Batch.of(x, num_data=250)
    info = inspect_programs(model, guide, batch)
    loss = ReparamELBO(1, info.analytic_kl).differentiable_loss(Program(model), Program(guide), batch)
    code, scale = guide.encode(x)
    assert_close(scale, 0.0, msg="a point mass has no spread")
    squared_error = ((x - model.decoder(code)) ** 2).sum(-1)
    log_lik = -squared_error / (2 * sigma**2) - 6 / 2 * math.log(2 * math.pi * sigma**2)
    penalty = 0.0 if prior == "flat" else dist.Normal(0.0, 1.0).log_prob(code).sum(-1)
    assert_close(loss, -(250 / 10) * (log_lik + penalty).sum(), rtol=1e-5)
    assert info.point_mass == ("z",) and info.improper == (("z",) if prior == "flat" else ())


def test_the_guide_built_from_an_autoencoder_s_trace_is_a_point_mass_of_the_right_size():
    """AmortizedGuide(model, family=point_mass) reads the flat prior's site from a trace (an improper prior has
    nothing to sample: the trace gets a feasible value) and its head has one output per code dimension."""
    model = mlp_autoencoder(6, 3, (8,))
    guide = AmortizedGuide(model, hidden=(8,), family=point_mass).eval()
    x = torch.rand(5, 6)
    terms = elbo_terms(model, guide, x)
    assert guide.head.out_features == 3
    assert_close(terms["kl"], 0.0, msg="flat prior and point mass: no KL term")
    code, _ = guide.encode(x)
    assert_close(terms["elbo"], model.likelihood(model.decoder(code)).log_prob(x), rtol=1e-6)


# ----------------------------------------------------------------------------- PCA and the linear autoencoder


def test_pca_reconstruction_error_is_the_variance_outside_its_axes():
    x = low_rank_data()
    centred = x - x.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T.double() @ centred.double() / x.shape[0]).flip(0)
    for d in (1, 3, 5):
        pca = PCA(d).fit(x)
        assert isinstance(pca, Codec)
        assert_close(reconstruction_error(pca, x).mean, eigenvalues[d:].sum(), rtol=1e-4, msg=f"d = {d}")
        assert_close(pca.decode(pca.encode(x)), pca.reconstruct(x))
    with pytest.raises(ValueError, match="latent_dim 11 exceeds"):
        PCA(11).fit(x)


def test_the_linear_autoencoder_spans_the_pca_subspace():
    """Baldi & Hornik 1989: the squared error of a linear autoencoder is least when its decoder's
    columns span the top principal subspace. Trained by pvae.fit (720 Adam steps; the largest angle is
    about 0.01 rad after them, 1.2 rad before), the principal angles between that span and PCA's are
    below 0.05 rad. Its squared error is no less than PCA's, the least of any rank-3 linear map, and
    within 20% of it (0.069, the variance off the subspace; missing one of its axes would add 1)."""
    x = low_rank_data()
    model, guide = mlp_autoencoder(10, 3, ()), mlp_guide(10, 3, (), family=point_mass)
    pvae.fit(model, guide, x, pvae.FitConfig(epochs=120, batch_size=100, lr=5e-2, eval_every=0, **QUIET))
    decoder = model.decoder[0].weight.detach()  # (10, 3)
    pca = PCA(3).fit(x)
    angles = subspace_angles(decoder.double().numpy(), pca.components.T.double().numpy())
    assert angles.max() < 0.05, angles
    ae_error, pca_error = (reconstruction_error(c, x).mean for c in (ProgramCodec(model, guide, x[:64]), pca))
    assert pca_error <= ae_error < 1.2 * pca_error, (ae_error, pca_error)


# ----------------------------------------------------------------------------- trained on the digits


@pytest.fixture(scope="module")
def digits():
    return pvae.load_dataset("digits")  # grey levels


@pytest.fixture(scope="module")
def coders(digits):
    """An autoencoder and a denoising one (masking, p = 0.5) at latent size 8, and PCA, on the digits."""
    pvae.set_seed(0)
    config = CoderConfig(hidden=(64,), epochs=30, lr=1e-2)
    return {
        "ae": fit_autoencoder(digits, 8, config),
        "dae": fit_autoencoder(digits, 8, config, MaskingNoise(0.5)),
        "pca": PCA(8).fit(digits.train),
    }


def test_the_autoencoder_reconstructs_the_test_digits_better_than_pca(coders, digits):
    """Squared error per test image: 4.7 for the mean training image (no code at all), 1.5 for PCA with
    8 components; 30 epochs of the MLP autoencoder reach about 1.15. An untrained one, or one whose
    decoder ignores its code, does no better than the mean image."""
    test = digits.test
    mean_image = Estimate.of(((test - digits.train.mean(0)) ** 2).sum(-1)).mean
    pca, ae = (reconstruction_error(coders[k], test).mean for k in ("pca", "ae"))
    assert ae < 0.85 * pca < 0.5 * mean_image, (ae, pca, mean_image)


def test_denoising_restores_masked_digits_better_than_the_plain_autoencoder(coders, digits):
    """Half the pixels of each test image zeroed (the same draws for both): the autoencoder trained on
    such inputs restores the clean digits with at most 60% of the plain autoencoder's squared error, and
    on clean inputs it is no match for it (it was not trained for them)."""
    masking = MaskingNoise(0.5)
    errors = {k: reconstruction_error(coders[k], digits.test, masking, torch.Generator().manual_seed(1)).mean
              for k in ("ae", "dae")}
    assert errors["dae"] < 0.6 * errors["ae"], errors


def test_an_autoencoder_is_refused_by_evaluate_and_compare(coders, digits):
    coder = coders["ae"]
    with pytest.raises(ProgramError, match="point mass .* has no density"):
        evaluate(coder.model, coder.guide, digits.test[:20], num_samples=10)
    with pytest.raises(ProgramError, match="improper"):
        evaluate(coder.model, mlp_guide(64, 8, (16,)), digits.test[:20], num_samples=10)
    with pytest.raises(ProgramError, match="improper"):
        pvae.compare.compare_inference(coder.model, digits.test[:20])


# ----------------------------------------------------------------------------- the interface, the noise, the codes


def test_a_vae_codes_with_its_guides_mean_and_a_denoising_encoder_sees_clean_inputs():
    """A model with its guide as a Codec: a VAE's code is the mean of q, decoded to the Gaussian's mean;
    a denoising encoder left in training mode is read in evaluation mode (the clean x), and its mode
    is given back."""
    model, guide = mlp_vae(6, 2, (8,), "gaussian"), mlp_guide(6, 2, (8,), corruption=MaskingNoise(0.9))
    x = torch.rand(4, 6) + 0.5
    coder = ProgramCodec(model.train(), guide.train(), x)
    assert isinstance(coder, Codec) and coder.latent_dim == 2
    with torch.no_grad():
        loc, _ = guide.eval().encode(x)
    guide.train()
    assert_close(coder.encode(x), loc, msg="the code of the clean x")
    assert_close(coder.reconstruct(x), model.decoder(loc)[:, :6], msg="the Gaussian's mean is the first half")
    assert guide.training and model.training and all(m.training for m in guide.modules())


def test_corruption_reaches_the_encoders_input_in_training_only():
    x = torch.rand(200, 64) + 0.5  # no zeros of its own
    guide = mlp_guide(64, 2, (8,), family=point_mass, corruption=MaskingNoise(0.3))
    torch.manual_seed(5)
    seen = guide.features(Batch.of(x))
    torch.manual_seed(5)
    assert_close(seen, MaskingNoise(0.3)(x), msg="the encoder reads the masked x")
    # 12,800 pixels, each zeroed with p = 0.3: the share lies within 5 standard errors but once in 1.7 million
    share = (seen == 0).double().mean()
    assert_close(share, 0.3, atol=5 * math.sqrt(0.3 * 0.7 / x.numel()))
    assert_close(guide.eval().features(Batch.of(x)), x, msg="evaluation mode: the clean x")
    noisy = GaussianNoise(0.5)(x, torch.Generator().manual_seed(0)) - x
    # mean and standard deviation of 12,800 N(0, 0.25) draws within 5 standard errors
    assert_close(noisy.mean(), 0.0, atol=5 * 0.5 / math.sqrt(x.numel()))
    assert_close(noisy.std(), 0.5, atol=5 * 0.5 / math.sqrt(2 * x.numel()))
    with pytest.raises(ValueError, match="masking probability"):
        MaskingNoise(1.0)


def test_sampling_a_code_space(coders, digits):
    """Codes perturbed by N(0, s^2) noise, and codes drawn from the diagonal Gaussian fitted to the
    training codes: checked against their distributions (each mean within 5 standard errors, failure
    rate below 1e-5 for the 8 dimensions), and decoded by the decoder itself."""
    coder = coders["ae"]
    codes = coder.encode(digits.train)
    fitted = CodeGaussian.fit(codes)
    assert_close(fitted.loc, codes.mean(0), atol=1e-6)
    assert_close(fitted.scale, codes.std(0, correction=0), atol=1e-6)
    n = 20000
    drawn = sample_code_space(coder, digits.train, n, torch.Generator().manual_seed(0))
    # in standard errors: of a mean, sigma / sqrt(n); of a standard deviation, sigma / sqrt(2 n)
    assert_close((drawn.codes.mean(0) - fitted.loc) / (fitted.scale / math.sqrt(n)), 0.0, atol=5)
    assert_close((drawn.codes.std(0) - fitted.scale) / (fitted.scale / math.sqrt(2 * n)), 0.0, atol=5)
    assert_close(drawn.images, coder.decode(drawn.codes))
    x = digits.train[:500]
    perturbed = perturbed_codes(coder, x, 0.5, torch.Generator().manual_seed(1))
    noise = (perturbed.codes - coder.encode(x)) / 0.5  # 4,000 N(0, 1) draws
    assert_close(noise.mean(), 0.0, atol=5 / math.sqrt(noise.numel()))
    assert_close(noise.std(), 1.0, atol=5 / math.sqrt(2 * noise.numel()))
    assert_close(perturbed.images, coder.decode(perturbed.codes))


# ----------------------------------------------------------------------------- from the command line


def test_pvae_train_fits_a_denoising_autoencoder_by_name_and_the_other_commands_say_what_it_lacks(tmp_path, capsys):
    run = tmp_path / "dae"
    assert main(["train", "--model", "ae", "--likelihood", "gaussian-fixed", "--binarize", "none", "--masking", "0.5",
                 "--hidden", "32", "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())["run"]
    assert (saved["model"], saved["guide"], saved["masking"]) == ("ae", "point", 0.5)
    for record in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        # a point mass under a flat prior: the ELBO's estimate is the reconstruction term, with no KL
        assert_close(record["test_elbo"], record["test_recon"], atol=1e-4)
        assert_close(record["test_kl"], 0.0)
    names = {p.name for p in run.iterdir()}
    assert {"reconstructions.png", "latent.png", "manifold.png"} <= names and "samples.png" not in names
    loaded = pvae.load_run(run)
    assert loaded.guide.family.point and loaded.guide.corruption == MaskingNoise(0.5)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--max-datapoints", "20"]) == 2
    assert "point mass" in capsys.readouterr().err
    assert main(["compare", str(run), "--max-datapoints", "20", "--no-figures"]) == 2
    assert "point mass" in capsys.readouterr().err
    assert main(["sample", str(run)]) == 2
    assert "is flat" in capsys.readouterr().err
    assert main(["train", "--model", "ae", "--masking", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--masking is a probability in [0, 1)" in capsys.readouterr().err
    assert main(["train", "--guide", "mean-field", "--input-noise", "0.1", "--out", str(tmp_path / "bad")]) == 2
    assert "no encoder" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(name in help_text for name in ("ae is an autoencoder", "point:", "gaussian-fixed", "--masking"))


def frey_faces(n=400, seed=0):
    """Stand-ins for frey_rawface.mat, (560, n) uint8 with a face per column: a bright blob on a grey
    ground whose position moves with two uniform factors, so that a 2-D latent space can explain it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:20]
    u, v = rng.uniform(size=(2, n, 1, 1))
    image = 40 + 180 * np.exp(-((rows - (6 + 16 * u)) ** 2 + (cols - (5 + 10 * v)) ** 2) / (2 * 3.0**2))
    return image.reshape(n, 560).T.round().astype(np.uint8)


def test_frey_faces_train_a_2d_vae_and_draw_its_manifold(tmp_path):
    """A 2-D VAE with the learned-variance Gaussian likelihood, 40 epochs on 288 faces: its test ELBO
    (about 738 nats) beats by 50 nats the exact log-likelihood of the best model that ignores z, a
    Gaussian per pixel fitted to the training faces (626); an untrained VAE starts near -500."""
    from scipy.io import savemat

    savemat(tmp_path / "frey_rawface.mat", {"ff": frey_faces()})
    run = tmp_path / "frey"
    assert main(["train", "--dataset", "frey", "--data-dir", str(tmp_path), "--likelihood", "gaussian", "--binarize",
                 "none", "--latent-dim", "2", "--hidden", "64", "--lr", "3e-3", "--epochs", "40", "--out", str(run),
                 "--no-progress"]) == 0
    data = pvae.load_dataset("frey", data_dir=str(tmp_path))
    per_pixel = dist.Normal(data.train.mean(0), data.train.std(0, correction=0))
    baseline = per_pixel.log_prob(data.test).sum(-1).mean().item()
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["test_elbo"] > baseline + 50, (final["test_elbo"], baseline)
    manifold = matplotlib.image.imread(run / "manifold.png")
    assert manifold.std() > 0.05, "a blank manifold"
    with pytest.raises(ValueError, match="https://cs.nyu.edu/~roweis/data.html"):
        pvae.load_dataset("frey", data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="https://cs.nyu.edu/~roweis/data.html"):
        pvae.load_dataset("frey", data_dir=str(tmp_path / "empty"))


def test_fitted_coders_start_from_their_configs_seed_whatever_the_random_state():
    """fit_autoencoder and fit_vae seed the initial weights from CoderConfig.seed: torch seeds itself
    differently in every process, so a coder built from the ambient random state made the README's
    autoencoder figures change from run to run."""
    from pvae.autoencoding import CoderConfig, fit_autoencoder, fit_vae, reconstruction_error

    data = pvae.load_dataset("digits")
    config = CoderConfig(hidden=(16,), epochs=2)
    for fit_coder in (fit_autoencoder, fit_vae):
        errors = []
        for ambient in (1, 2):
            torch.manual_seed(ambient)
            errors.append(reconstruction_error(fit_coder(data, 2, config), data.test).mean)
        assert errors[0] == errors[1], (fit_coder.__name__, errors)
