"""The Cremer et al. study held to the linear-Gaussian model, whose posterior is exact:

p(z | x) = N(mu(x), Lambda^-1), Lambda = I + W^T W / sigma^2. The best diagonal Gaussian has means
mu(x) and variances 1 / Lambda_dd, so for every x

    approximation gap = KL(q* || p(z|x)) = 1/2 (sum_d log Lambda_dd - log det Lambda),

zero when W's columns are orthogonal (Lambda is diagonal), positive when they are not; and for any
Gaussian encoder q(z|x) = N(m, diag s^2) the amortization gap is KL(q || p(z|x)) - KL(q* || p(z|x)),
KL(q || p(z|x)) = 1/2 (tr(Lambda S) + (m - mu)^T Lambda (m - mu) - D - log det Lambda - sum log s^2).
"""

import json
import math
import re

import pytest
import torch
from helpers import assert_close

from pvae import cli
from pvae.compare import CompareConfig, Comparison, common_noise, compare_inference, optimize_local
from pvae.estimate import Estimate
from pvae.guides import LocalFamily, inverse_softplus, mlp_guide, model_sites, refine
from pvae.models import LinearGaussian
from pvae.reports import CREMER_2018, comparison_markdown, comparison_table, cremer_reference
from pvae.run import write_comparison

P, D, SIGMA = 6, 3, 0.5
# q* stops when a full L-BFGS step gains less than 1e-6 of the bound: within about 1e-4 nats of its
# optimum, a bias the Monte Carlo standard errors do not include
OPTIMIZATION_SLACK = 0.01


def linear_gaussian(W: torch.Tensor, n: int):
    model = LinearGaussian(P, D, sigma=SIGMA)
    with torch.no_grad():
        model.linear.weight.copy_(W)
        model.linear.bias.zero_()
        x = model.linear(torch.randn(n, D)) + SIGMA * torch.randn(n, P)
    return model.eval(), x


def orthogonal_W() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(P, D))
    return q * torch.tensor([2.0, 1.5, 1.0])  # orthogonal columns of different lengths


def correlated_W() -> torch.Tensor:
    return torch.randn(P, D) + 0.8  # a shared component makes the columns far from orthogonal


def closed_form_approximation_gap(model) -> torch.Tensor:
    _, precision = model.posterior(torch.zeros(1, P))
    return 0.5 * (precision.diag().log().sum() - torch.logdet(precision))


def linear_encoder(model, perturbation: float = 0.0):
    """The linear encoder whose q(z|x) is the mean-field optimum (exact posterior means, variances
    1 / Lambda_dd), with the weights of its means perturbed by Gaussian noise of the given size."""
    guide = mlp_guide(P, D, ())
    W, s2 = model.linear.weight, model.sigma**2
    _, precision = model.posterior(torch.zeros(1, P))
    with torch.no_grad():
        layer = guide.head
        layer.weight[:D] = torch.linalg.solve(precision, W.T / s2)  # mu(x) = Lambda^-1 W^T x / sigma^2
        layer.weight[D:] = 0.0
        layer.bias[:D] = 0.0
        layer.bias[D:] = inverse_softplus(precision.diag().rsqrt() - 1e-6)
        layer.weight[:D] += perturbation * torch.randn(D, P)
    return guide.eval()


def closed_form_kl_to_posterior(model, encoder, x) -> torch.Tensor:
    mean, precision = model.posterior(x)
    loc, scale = encoder.encode(x)
    diff = loc - mean
    quad = torch.einsum("bi,ij,bj->b", diff, precision, diff)
    trace = (precision.diag() * scale**2).sum(-1)
    return 0.5 * (trace + quad - D - torch.logdet(precision) - (scale**2).log().sum(-1))


FAST = dict(batch_size=30, particles=16, elbo_particles=2000, iwae_samples=2000, chunk_size=1000,
            refine_steps=(1, 20))  # the default refine_lr: natural-gradient steps, whatever the posterior precision


def test_q_star_reaches_the_exact_mean_field_optimum():
    """From the prior, q*'s means reach the posterior means and its scales 1 / sqrt(Lambda_dd) within
    1% of each posterior standard deviation (measured: 0.6% and 0.3%, float32 and the stopping rule),
    from only 8 draws per datapoint: on a Gaussian posterior the ELBO over antithetic, moment-matched
    draws is the exact ELBO."""
    model, x = linear_gaussian(correlated_W(), 20)
    mean, precision = model.posterior(x)
    q_star, iterations = optimize_local(model, x, LocalFamily(model_sites(model, x)), num_particles=8)
    loc, scale = q_star["z"]["loc"], q_star["z"]["scale"]
    optimal_scale = precision.diag().rsqrt().expand_as(scale)
    assert iterations.shape == (20,) and iterations.max() < 60, "L-BFGS should converge in tens of iterations"
    assert_close(loc, mean, atol=0.01 * optimal_scale.min().item(), msg="q* means")
    assert_close(scale, optimal_scale, rtol=0.01, msg="q* scales")


def test_common_noise_matches_the_standard_normal_moments_exactly():
    """Per datapoint: mean 0, second moments the identity, third moments 0 (antithetic pairs)."""
    noise = common_noise(12, 5, 3, torch.Generator().manual_seed(1))  # 6 pairs > 3 dimensions: whitened
    assert noise.shape == (12, 5, 3)
    assert_close(noise.mean(0), 0.0, atol=1e-6, msg="means")
    assert_close(torch.einsum("sbi,sbj->bij", noise, noise) / 12, torch.eye(3).expand(5, 3, 3), atol=1e-5,
                 msg="second moments")
    assert_close(noise.pow(3).mean(0), 0.0, atol=1e-6, msg="third moments")
    few = common_noise(4, 5, 3)  # 2 pairs, fewer than the dimensions: per dimension only
    assert_close(few.pow(2).mean(0), 1.0, atol=1e-6, msg="variances")
    assert common_noise(5, 2, 1).shape[0] == 6, "rounded up to pairs"


@pytest.mark.parametrize("make_W, gap_is_zero", [(orthogonal_W, True), (correlated_W, False)], ids=["orthogonal", "correlated"])
def test_gaps_match_the_closed_form_on_the_linear_gaussian_model(make_W, gap_is_zero):
    """Tolerances: 4 standard errors over datapoints (a chance failure about once in 16,000 runs per
    check) plus the optimization slack above; and, below log p(x), the importance-weighted bound's own
    bias. With orthogonal columns q* is the posterior and the weights are constant: no bias. With
    correlated ones q*'s variances, 1 / Lambda_dd, are 2.5 to 4 times below the posterior's marginal
    variances, the weights have no finite variance, and at K = 2000 log p̂(x) falls 0.03 to 0.12 nats
    below log p(x) (6 repeats with the exact q*, measured): the measured approximation gap is short by
    as much, and only L[q*], which needs no importance sampling, is held to the closed form tightly."""
    model, x = linear_gaussian(make_W(), 30)
    encoder = linear_encoder(model, perturbation=0.05)
    expected_approximation = closed_form_approximation_gap(model)
    kl_encoder = closed_form_kl_to_posterior(model, encoder, x)
    result = compare_inference(model, x, encoder, CompareConfig(init="prior", **FAST))
    iwae_bias = 0.0 if gap_is_zero else 0.2

    if gap_is_zero:
        assert_close(expected_approximation, 0.0, atol=1e-5, msg="orthogonal columns: Lambda is diagonal")
    else:
        assert expected_approximation > 0.05, "the correlated case should have a gap worth measuring"
    gap = result.approximation_gap
    tolerance = 4 * gap.se + OPTIMIZATION_SLACK
    assert expected_approximation - tolerance - iwae_bias <= gap.mean <= expected_approximation + tolerance, (
        f"approximation gap {gap} against {expected_approximation:.3f}")
    # L[q*] against the exact evidence, which needs no importance sampling
    exact_log_px = model.log_prob(x).mean()
    # the Monte Carlo noise of L[q*] and log p(x) is what the gap's standard error measures
    assert_close(result.elbo_q_star.mean, exact_log_px - expected_approximation, atol=tolerance, msg="L[q*]")
    assert exact_log_px - tolerance - iwae_bias <= result.log_px.mean <= exact_log_px + tolerance, (
        f"log p(x) {result.log_px} against {exact_log_px:.3f}")

    amortization = result.amortization_gap
    expected_amortization = (kl_encoder - expected_approximation).mean()
    assert expected_amortization > 0.1, "the perturbed encoder should be measurably worse than q*"
    assert amortization.mean >= -4 * amortization.se - OPTIMIZATION_SLACK, "negative amortization gap"
    assert_close(amortization.mean, expected_amortization, atol=4 * amortization.se + OPTIMIZATION_SLACK,
                 msg="amortization gap")
    # refinement climbs from L[q] towards L[q*]
    assert result.elbo_q.mean < result.elbo_q_k[1].mean < result.elbo_q_k[20].mean <= result.elbo_q_star.mean


def test_comparison_round_trips_and_writes_its_table(tmp_path):
    est = Estimate(-24.5, 0.25)
    result = Comparison(datapoints=10, log_px=Estimate(-24.0, 0.2), elbo_q_star=Estimate(-24.2, 0.2),
                        approximation_gap=Estimate(0.2, 0.01), elbo_q=est, amortization_gap=Estimate(0.3, 0.02),
                        inference_gap=Estimate(0.5, 0.02), elbo_q_k={5: Estimate(-24.4, 0.2)},
                        gap_q_k={5: Estimate(0.4, 0.02)}, settings={"split": "test"})
    again = Comparison.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    table, markdown = comparison_table(result, CREMER_2018), comparison_markdown(result, CREMER_2018)
    for text in (table, markdown):
        assert "-24.50 ± 0.25" in text and "L[q_K], K=5" in text
        assert f"{CREMER_2018['approximation_gap']:.2f}" in text and f"{CREMER_2018['amortization_gap']:.2f}" in text
    assert "pvae train" in markdown  # the command that reproduces Cremer et al.'s setting
    # their figures stand beside ours only where the setting is theirs
    assert "Cremer" not in comparison_table(result, None)
    assert cremer_reference({"dataset": "digits", "binarize": "dynamic"}) is None
    assert cremer_reference({"dataset": "/usr/share/datasets/fashion-mnist", "binarize": "threshold", "latent_dim": 50,
                             "hidden": [200, 200], "activation": "elu", "likelihood": "bernoulli", "model": "mlp"})
    paths = write_comparison(tmp_path, result, "compare-test", reference=None)
    assert [p.name for p in paths] == ["compare-test.json", "compare-test.md", "compare-test.png"]
    assert json.loads(paths[0].read_text())["amortization_gap"] == {"mean": 0.3, "se": 0.02}


def test_progress_moves_batch_by_batch_with_the_time_left(capsys):
    """The bar shows the datapoints done after every batch of ``batch_size`` (not once at the end), with
    tqdm's estimate of the time left, and says what stage it is in."""
    model, x = linear_gaussian(orthogonal_W(), 30)
    config = CompareConfig(batch_size=10, particles=8, refine_steps=(1,), elbo_particles=4, iwae_samples=8)
    compare_inference(model, x, linear_encoder(model), config, progress=True)
    bar = capsys.readouterr().err
    done = [int(n) for n in re.findall(r"(\d+)/30 ", bar)]
    assert sorted(set(done)) == [0, 10, 20, 30], bar
    assert re.search(r"10/30 \[[0-9:]+<[0-9:]+", bar), f"no estimate of the time left after the first batch: {bar}"
    assert "L[q_K], K = 1, for all 30 at once" in bar and "q*, L[q*] and log p(x) by batches of 10" in bar
    compare_inference(model, x, linear_encoder(model), config)
    assert capsys.readouterr().err == "", "no bar unless asked for"


def test_one_datapoint_has_no_standard_error():
    est = Estimate.of(torch.tensor([1.5]))
    assert est.mean == 1.5 and math.isnan(est.se) and str(est) == "1.50"
    assert Estimate.from_dict(json.loads(json.dumps({"mean": 1.5, "se": None}))).mean == 1.5


def test_pvae_compare_on_trained_runs(tmp_path, capsys):
    """End to end with tiny settings: an amortized run gets every row; a mean-field run, which has no
    encoder, gets q* and log p(x) only."""
    runs = {}
    for guide in ("amortized", "mean-field"):
        runs[guide] = tmp_path / guide
        code = cli.main(["train", "--guide", guide, "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
                         "--out", str(runs[guide]), "--no-progress", "--no-figures"])
        assert code == 0
    tiny = ["--max-datapoints", "12", "--batch-size", "6", "--particles", "8", "--max-steps", "30",
            "--refine-steps", "1", "3", "--elbo-particles", "16", "--iwae-samples", "32", "--no-progress"]
    assert cli.main(["compare", str(runs["amortized"]), *tiny, "--curves", str(runs["mean-field"])]) == 0
    out = capsys.readouterr().out
    assert "amortization gap" in out and "L[q_K], K=3" in out
    saved = json.loads((runs["amortized"] / "compare-test.json").read_text())
    assert saved["datapoints"] == 12 and set(saved["elbo_q_k"]) == {"1", "3"}
    assert_close(saved["amortization_gap"]["mean"], saved["elbo_q_star"]["mean"] - saved["elbo_q"]["mean"], atol=1e-4)
    for name in ("compare-test.md", "compare-test.png", "curves-compared.png"):
        assert (runs["amortized"] / name).is_file()

    assert cli.main(["compare", str(runs["mean-field"]), *tiny, "--split", "train", "--no-figures"]) == 0
    saved = json.loads((runs["mean-field"] / "compare-train.json").read_text())
    assert saved["elbo_q"] is None and saved["amortization_gap"] is None
    assert saved["approximation_gap"]["mean"] > -1.0  # log p(x) >= L[q*] up to tiny-sample noise


def sharp_linear_gaussian(n: int):
    """Orthogonal columns of lengths 20, 2, 1: a diagonal posterior whose precisions are 1601, 17 and 5."""
    q, _ = torch.linalg.qr(torch.randn(P, D))
    model, x = linear_gaussian(q * torch.tensor([20.0, 2.0, 1.0]), n)
    mean, precision = model.posterior(x)
    return model, x, mean, precision.diag().rsqrt().expand_as(mean)


def test_refinement_steps_are_natural_gradient_steps_whatever_the_posterior_scale():
    """On a Gaussian posterior N(m, diag 1/Lambda) a natural-gradient step in (loc, log-scale) is, in
    expectation, loc - m -> (1 - lr)(loc - m) when scale = 1/sqrt(Lambda), and for the log-scale's
    error d (loc = m) d -> d + lr/2 (1 - exp 2d), whatever Lambda: the default step size, at which
    plain steps (lr * gradient) would diverge on this posterior's sharp dimension (lr * Lambda > 2),
    takes them monotonically toward the exact posterior. The errors are means over 40 x 3 entries; the
    tolerances are twice the largest Monte Carlo deviation over 20 seeds (0.022 and 0.017)."""
    model, x, mean, std = sharp_linear_gaussian(40)
    family, lr, steps = LocalFamily(model_sites(model, x)), CompareConfig().refine_lr, 12
    assert lr * std.min().item() ** -2 > 2, "plain steps of this size would diverge on the sharp dimension"
    # the locs 3 posterior standard deviations off, the scales exact
    params, errors = {"z": {"loc": mean + 3 * std, "scale": std.clone()}}, []
    for _ in range(steps):
        params = refine(model, x, params, family, 1, lr, num_particles=4)
        errors.append(((params["z"]["loc"] - mean) / std).mean().item())
    expected = [3 * (1 - lr) ** k for k in range(1, steps + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])), f"not monotone: {errors}"
    assert_close(torch.tensor(errors), torch.tensor(expected), atol=0.05, msg="loc error, in posterior sds")
    # the locs exact, the log-scales 0.5 too large
    params, errors, d, expected = {"z": {"loc": mean.clone(), "scale": std * math.exp(0.5)}}, [], 0.5, []
    for _ in range(steps):
        params = refine(model, x, params, family, 1, lr, num_particles=4)
        errors.append((params["z"]["scale"] / std).log().mean().item())
        d = d + lr / 2 * (1 - math.exp(2 * d))
        expected.append(d)
    assert all(a > b for a, b in zip(errors, errors[1:])), f"not monotone: {errors}"
    assert_close(torch.tensor(errors), torch.tensor(expected), atol=0.04, msg="log-scale error")


def test_a_diverging_refinement_says_so_in_one_line():
    """A step far too large leaves a scale of 0 or inf; the next step's Normal refuses it in Pyro's words
    unless the refinement says what happened first."""
    torch.manual_seed(0)
    model, x, mean, std = sharp_linear_gaussian(8)
    family = LocalFamily(model_sites(model, x))
    with pytest.raises(ValueError, match=r"^the refinement diverged: its step size 50.0 is too large"):
        refine(model, x, {"z": {"loc": mean + 3 * std, "scale": 20 * std}}, family, 10, 50.0)
