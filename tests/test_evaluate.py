"""pvae.evaluate against the linear-Gaussian model, whose log p(x) and posterior are exact.

The guides here are built from the model's exact posterior N(mean, Lambda^-1): the posterior itself
(full covariance), its diagonal, or a deliberately wrong copy (too wide, too narrow, shifted).
"""

import json
import math
import sys
import types

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from helpers import assert_close
from torch import nn

from pvae.cli import main
from pvae.evaluate import KHAT_FLAGS, Evaluation, evaluate, import_arviz, psis_khat, to_inference_data
from pvae.programs import Batch
from pvae.reports import evaluation_markdown
from pvae.models import LinearGaussian, mlp_vae
from pvae.programs import data_plate


class PosteriorGuide(nn.Module):
    """q(z|x) made from the exact posterior of a :class:`LinearGaussian`: with ``full`` its own
    covariance, else its marginal variances; ``scale`` multiplies the standard deviations and
    ``shift`` moves the mean by that many marginal standard deviations."""

    def __init__(self, model: LinearGaussian, full=True, scale=1.0, shift=0.0, noise=None):
        super().__init__()
        self.model, self.full, self.scale, self.shift, self.noise = model, full, scale, shift, noise

    def forward(self, x, idx=None, num_data=None):
        mean, precision = self.model.posterior(x)
        cov = torch.linalg.inv(precision)
        sd = cov.diagonal().sqrt()
        loc = mean + self.shift * sd
        with data_plate(x, idx, num_data):
            if self.full:
                pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=cov * self.scale**2))
            elif self.noise is None:
                pyro.sample("z", dist.Normal(loc, sd * self.scale).to_event(1))
            else:
                pyro.sample("z", ReplayNormal(loc, sd * self.scale, self.noise).to_event(1))


class Noise:
    """Standard normal draws ``(K, B, D)``, handed out in order, particles first."""

    def __init__(self, eps):
        self.eps, self.used = eps, 0

    def take(self, k):
        self.used += k
        return self.eps[self.used - k : self.used]


class ReplayNormal(dist.Normal):
    """A Normal whose vectorized draws ``(k, B, D)`` are ``loc + scale * eps`` with the next ``k``
    rows of a :class:`Noise`: the same samples however the particles are chunked."""

    def __init__(self, loc, scale, noise):
        super().__init__(loc, scale)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        return ReplayNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.noise)

    def rsample(self, sample_shape=torch.Size()):
        if len(self.batch_shape) < 3:  # the one-particle probe for the plate nesting
            return super().rsample(sample_shape)
        return self.loc + self.scale * self.noise.take(self.batch_shape[0])


def linear_gaussian(num_data=60, num_pixels=5, latent_dim=2, sigma=0.8, seed=0):
    """A model with a random W (correlated posterior) and data drawn from it."""
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian(num_pixels, latent_dim, sigma=sigma)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(num_pixels, latent_dim, generator=g))
    z = torch.randn(num_data, latent_dim, generator=g)
    x = model.linear.bias.detach() + z @ model.linear.weight.detach().T + sigma * torch.randn(num_data, num_pixels, generator=g)
    return model, x


# ----------------------------------------------------------------------------- log p(x)


def test_exact_posterior_guide_gives_exact_log_px_whatever_the_chunks():
    """With q(z|x) = p(z|x) every log-weight is log p(x): the bound, the ELBO and every chunking of
    K = 50 (7 chunks of 7 and one of 1) give it to float precision, the gap is 0 and PSIS finds
    constant ratios: no tail to fit, k̂ flagged rather than an infinity."""
    model, x = linear_gaussian()
    exact = model.log_prob(x)
    for chunk_size in (7, 50):
        ev = evaluate(model, PosteriorGuide(model), x, num_samples=50, chunk_size=chunk_size, batch_size=16)
        assert_close(ev.per_datapoint["log_px"], exact, atol=1e-4, msg=f"log p̂(x), chunks of {chunk_size}")
        assert_close(ev.per_datapoint["elbo"], exact, atol=1e-4, msg="ELBO")
        assert_close(ev.summary()["gap"].mean, 0.0, atol=1e-5)
        assert np.isnan(ev.per_datapoint["khat"]).all()
        assert ev.khat_flags() == {KHAT_FLAGS[1]: 60}
        assert "khat_above_0.5" not in ev.summary()


def test_log_px_converges_to_the_exact_log_px_as_k_grows():
    """A diagonal guide with its mean half a standard deviation off, whose ELBO is 0.27 nats below
    log p(x) on average: log p̂(x) closes that gap as K grows.

    Tolerance at K = 1000: 0.015 nats on the mean over 200 datapoints and 0.25 on any one; at K = 10
    the mean gap must be below the ELBO's. Over three seeds the errors were at most 0.0043 (mean),
    0.089 (any one) and 0.057 (K = 10): a fresh seed fails rarely (the mean's standard error at
    K = 1000 is about 0.003, so 0.015 is 5 of them)."""
    model, x = linear_gaussian(num_data=200)
    exact = model.log_prob(x).double().numpy()
    guide = PosteriorGuide(model, full=False, shift=0.5)
    mean, precision = model.posterior(x)
    sd = torch.linalg.inv(precision).diagonal().sqrt().expand_as(mean)
    elbo, _, _ = closed_form_elbo(model, x, mean + 0.5 * sd, sd)
    elbo_gap = (exact - elbo.double().numpy()).mean()
    assert 0.2 < elbo_gap < 0.4
    errors = {}
    for k in (10, 1000):
        ev = evaluate(model, guide, x, num_samples=k, chunk_size=500, batch_size=200, psis=False)
        errors[k] = exact - ev.per_datapoint["log_px"]
        assert (ev.per_datapoint["log_px"] >= ev.per_datapoint["elbo"] - 1e-5).all(), "Jensen on the same draws"
    assert errors[10].mean() < elbo_gap
    assert abs(errors[1000].mean()) < 0.015
    assert np.abs(errors[1000]).max() < 0.25


def closed_form_elbo(model: LinearGaussian, x, loc, scale):
    """E_q[log N(x; W z + b, sigma^2 I)] - KL(N(loc, scale^2) || N(0, I)) for a diagonal q."""
    W, b, s2 = model.linear.weight.detach(), model.linear.bias.detach(), model.sigma.detach() ** 2
    residual = ((x - loc @ W.T - b) ** 2).sum(-1) + (scale**2 * (W**2).sum(0)).sum(-1)
    recon = -0.5 * x.shape[1] * torch.log(2 * math.pi * s2) - residual / (2 * s2)
    kl = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum(-1)
    return recon - kl, recon, kl


def test_one_sample_bound_is_the_elbo_in_expectation():
    """K = 1: log p̂(x) is log w_1, the ELBO's one-sample estimate. Its mean over 4000 repeats of
    each of 10 datapoints against the closed-form ELBO, within 5 standard errors (a false alarm about
    once in 1.7 million runs per datapoint)."""
    model, x = linear_gaussian(num_data=10)
    guide = PosteriorGuide(model, full=False, scale=1.3, shift=0.5)
    repeats = 4000
    ev = evaluate(model, guide, x.repeat(repeats, 1), num_samples=1, batch_size=10_000)
    assert_close(ev.per_datapoint["log_px"], ev.per_datapoint["elbo"], atol=1e-5, msg="same draw")
    assert not ev.psis and "khat_above_0.7" not in ev.summary()
    mean, precision = model.posterior(x)
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    elbo, recon, kl = closed_form_elbo(model, x, mean + 0.5 * sd, (1.3 * sd).expand_as(mean))
    draws = torch.as_tensor(ev.per_datapoint["log_px"]).view(repeats, 10)
    se = draws.std(0) / math.sqrt(repeats)
    assert (((draws.mean(0) - elbo.double()).abs()) <= 5 * se).all()
    assert_close(ev.per_datapoint["kl_analytic"][:10], kl, atol=1e-5, msg="analytic KL")


# ----------------------------------------------------------------------------- PSIS


def test_khat_is_low_for_a_wide_guide_and_high_for_a_badly_mismatched_one():
    """A guide wider than the posterior has bounded ratios: every k̂ < 0.5 (over three seeds the
    largest was -0.56). One too narrow (0.3 sd) and shifted by one sd has heavy-tailed ratios: k̂ > 0.7
    for at least 80% of datapoints (observed 91-95%; the share's standard error is about 0.03, so
    80% is 4 of them below). K = 1000, 100 datapoints."""
    model, x = linear_gaussian(num_data=100)
    wide = evaluate(model, PosteriorGuide(model, scale=1.5), x, num_samples=1000, chunk_size=500)
    assert wide.per_datapoint["khat"].max() < 0.5
    assert wide.summary()["khat_above_0.5"].mean == 0.0
    bad = evaluate(model, PosteriorGuide(model, scale=0.3, shift=1.0), x, num_samples=1000, chunk_size=500)
    assert bad.summary()["khat_above_0.7"].mean >= 0.8
    assert bad.summary()["khat_above_0.5"].mean >= bad.summary()["khat_above_0.7"].mean


def generalized_pareto_log_ratios(shape, n, rows, seed=0):
    """log w for w drawn from a generalized Pareto distribution of the given shape (scale 1)."""
    u = np.random.default_rng(seed).uniform(size=(rows, n))
    return np.log((u ** (-shape) - 1) / shape)


def test_psis_khat_recovers_a_known_pareto_shape():
    """Ratios drawn from a generalized Pareto of shape 0.8: the mean k̂ over 20 rows of 4000 draws
    is 0.8 within 0.1 (about 3 standard errors); the samples lie on the last axis, or on ``dim``."""
    lr = generalized_pareto_log_ratios(0.8, 4000, 20)
    khat = psis_khat(lr)
    assert khat.shape == (20,)
    assert abs(khat.mean() - 0.8) < 0.1
    assert_close(psis_khat(torch.as_tensor(lr.T), dim=0), khat, atol=1e-12, msg="samples on dim 0")


def test_psis_khat_takes_arviz_1_sign_convention(monkeypatch):
    """arviz 1.x's ``arviz_stats`` smooths the negated input (a leave-one-out log-likelihood). A
    stand-in with that convention must give the same k̂ as arviz 0.x on the log-ratios: forgetting
    the sign would fit the left tail instead."""
    az = import_arviz()
    lr = generalized_pareto_log_ratios(0.8, 2000, 5)
    expected = psis_khat(lr)
    fake_az = types.SimpleNamespace(__version__="1.0.0")
    array_stats = types.SimpleNamespace(psislw=lambda ary, r_eff=1, axis=-1: az.psislw(-ary))
    base = types.ModuleType("arviz_stats.base")
    base.array_stats = array_stats
    monkeypatch.setitem(sys.modules, "arviz_stats", types.ModuleType("arviz_stats"))
    monkeypatch.setitem(sys.modules, "arviz_stats.base", base)
    monkeypatch.setattr("pvae.evaluate.import_arviz", lambda: fake_az)
    assert_close(psis_khat(lr), expected, atol=1e-12)


def test_psis_khat_with_the_real_arviz_stats_agrees_with_arviz_0():
    """Where arviz-stats is installed: its k̂ on the negated ratios and arviz 0.x's agree within
    0.05 (their tail lengths differ slightly)."""
    from arviz_stats.base import array_stats  # a test dependency (pyproject: test extras)
    az = import_arviz()
    lr = generalized_pareto_log_ratios(0.6, 4000, 5)
    assert_close(array_stats.psislw(-lr, axis=-1)[1], az.psislw(lr)[1], atol=0.05)


def test_psis_khat_flags_what_has_no_tail_rather_than_return_an_infinity():
    """Constant ratios (exact posterior), a discrete guide's few distinct ratios, NaN and +inf ratios:
    NaN with their reason. Zero ratios (-inf) are left out of a fit that still happens."""
    rng = np.random.default_rng(0)
    with_zeros = rng.normal(size=100)
    with_zeros[:10] = -np.inf
    lr = np.stack([np.full(100, -3.0), np.full(100, -3.0) + 1e-10 * np.arange(100), np.full(100, np.nan),
                   np.repeat([-1.0, -2.0, -3.0], [40, 30, 30]), np.r_[np.inf, rng.normal(size=99)], with_zeros])
    khat, flags = psis_khat(lr, return_flags=True)
    assert flags.tolist() == [1, 1, 3, 2, 3, 0]
    assert np.isnan(khat[:5]).all() and np.isfinite(khat[5])
    assert_close(khat[5], psis_khat(with_zeros[10:]), atol=1e-12, msg="zero ratios left out")


# ----------------------------------------------------------------------------- chunks


def test_chunked_and_unchunked_agree_to_float_precision_on_the_same_samples():
    """The guide replays one fixed set of 50 standard normal draws per datapoint, so K = 50 in one
    chunk or in chunks of 7 (7 x 7 + 1) sees the same samples: every per-datapoint figure agrees."""
    model, x = linear_gaussian(num_data=30)
    eps = torch.randn(50, 30, 2)
    results = [
        evaluate(model, PosteriorGuide(model, full=False, scale=0.7, noise=Noise(eps)), x,
                 num_samples=50, chunk_size=chunk_size, batch_size=30)
        for chunk_size in (50, 7)
    ]
    for key in ("log_px", "elbo", "recon", "kl", "kl_analytic", "khat"):
        assert_close(results[1].per_datapoint[key], results[0].per_datapoint[key], atol=1e-5, rtol=1e-6, msg=key)
    assert_close(results[1].kl_per_dim, results[0].kl_per_dim, atol=1e-6)
    assert_close(results[1].activity, results[0].activity, atol=1e-6)
    # and the draws were the ones given: the IWAE bound by hand from the same eps
    mean, precision = model.posterior(x)
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    z = mean + 0.7 * sd * eps  # (K, B, D)
    q = dist.Normal(mean, 0.7 * sd).to_event(1)
    lik = dist.Normal(model.linear(z), model.sigma).to_event(1).log_prob(x)
    log_w = lik + dist.Normal(0.0, 1.0).expand([2]).to_event(1).log_prob(z) - q.log_prob(z)
    assert_close(results[1].per_datapoint["log_px"], log_w.logsumexp(0) - math.log(50), atol=1e-4)


# ----------------------------------------------------------------------------- active units, KL per dimension


class CollapsedGuide(nn.Module):
    """q(z|x) = N(x A, 0.5^2) on the first ``active`` dimensions, the prior N(0, 1) on the rest."""

    def __init__(self, num_pixels, latent_dim, active, base=dist.Normal):
        super().__init__()
        self.A = torch.randn(num_pixels, active)
        self.latent_dim, self.active, self.base = latent_dim, active, base

    def params(self, x):
        loc = torch.cat([x @ self.A, x.new_zeros(x.shape[0], self.latent_dim - self.active)], -1)
        scale = torch.cat([x.new_full((x.shape[0], self.active), 0.5), x.new_ones(x.shape[0], self.latent_dim - self.active)], -1)
        return loc, scale

    def forward(self, x, idx=None, num_data=None):
        loc, scale = self.params(x)
        with data_plate(x, idx, num_data):
            pyro.sample("z", self.base(loc, scale).to_event(1))


def test_active_units_and_kl_per_dimension_show_posterior_collapse():
    """Two informative dimensions of five: their Cov_x(E_q[z_d]) is the variance of x A over the
    datapoints and their KL the closed form; the three collapsed ones have activity 0 and KL 0."""
    model = mlp_vae(12, 5, (16,))
    guide = CollapsedGuide(12, 5, active=2)
    x = torch.bernoulli(torch.full((80, 12), 0.4))
    ev = evaluate(model, guide, x, num_samples=30, chunk_size=8, batch_size=32)
    loc, scale = guide.params(x)
    assert ev.active_units == 2
    assert ev.latent_names == [f"z[{i}]" for i in range(5)]
    assert_close(ev.activity, loc.double().var(0), atol=1e-5, rtol=1e-5, msg="Cov_x(E_q[z_d])")
    kl = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1)
    assert_close(ev.kl_per_dim, kl.double().mean(0), atol=1e-5, msg="analytic KL per dimension")
    assert_close(ev.kl_per_dim[2:], 0.0, atol=1e-6)
    assert_close(ev.kl_per_dim.sum(), ev.summary()["kl_analytic"].mean, atol=1e-5)


def test_kl_per_dimension_falls_back_to_monte_carlo_without_a_closed_form():
    """A Student-t guide against the Normal prior has no registered KL: the per-dimension KL is the
    Monte Carlo one, and on the same draws it sums to the total Monte Carlo KL."""
    model = mlp_vae(12, 4, (16,))
    guide = CollapsedGuide(12, 4, active=2, base=lambda loc, scale: dist.StudentT(5.0, loc, scale))
    x = torch.bernoulli(torch.full((40, 12), 0.4))
    ev = evaluate(model, guide, x, num_samples=200, chunk_size=64, batch_size=40)
    assert "kl_analytic" not in ev.per_datapoint
    assert_close(ev.kl_per_dim.sum(), ev.summary()["kl"].mean, atol=1e-4)
    assert ev.kl_per_dim[:2].min() > 0.1  # informative dimensions carry KL
    assert ev.active_units == 2


# ----------------------------------------------------------------------------- results and export


def test_evaluation_summary_json_and_markdown():
    model, x = linear_gaussian(num_data=40)
    ev = evaluate(model, PosteriorGuide(model, full=False), x, num_samples=100, info={"split": "test"})
    s = ev.summary()
    log_px = ev.per_datapoint["log_px"]
    assert_close(s["log_px"].mean, log_px.mean(), atol=1e-12)
    assert_close(s["log_px"].se, log_px.std(ddof=1) / math.sqrt(40), atol=1e-12)
    assert_close(s["nll"].mean, -log_px.mean(), atol=1e-12)
    assert_close(s["bits_per_dim"].mean, -log_px.mean() / (5 * math.log(2)), atol=1e-12)
    assert_close(s["elbo_analytic"].mean, s["recon"].mean - s["kl_analytic"].mean, atol=1e-9)
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["info"] == {"split": "test"} and d["num_datapoints"] == 40 and d["num_samples"] == 100
    assert_close(d["log_px"], s["log_px"].mean, atol=1e-12)
    assert_close(d["nll_se"], s["nll"].se, atol=1e-12)
    back = Evaluation.from_dict(d)
    for name, est in back.summary().items():
        assert_close([est.mean, est.se], [s[name].mean, s[name].se], atol=1e-12, msg=name)
    md = evaluation_markdown(ev)
    assert f"| log p̂(x), importance-weighted bound | {s['log_px'].mean:.4f} | {s['log_px'].se:.4f} |" in md
    assert "Active units: 2 of 2" in md and "| z[1] |" in md


def test_to_inference_data_holds_the_guide_draws_of_the_chosen_datapoints():
    """2000 draws per datapoint: per-datapoint means within 5 standard errors of q's loc, standard
    deviations within 10% of q's scale; ``az.summary`` and ``az.plot_density`` take two guides."""
    az = import_arviz()
    model, x = linear_gaussian(num_data=10)
    chosen = torch.tensor([2, 5, 7])
    guide = PosteriorGuide(model, full=False)
    idata = to_inference_data(guide, Batch.of(x[chosen], chosen, 10), num_samples=2000)
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "datapoint", "z_dim_0") and z.shape == (1, 2000, 3, 2)
    assert z.coords["datapoint"].values.tolist() == [2, 5, 7]
    mean, precision = model.posterior(x[chosen])
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    draws = torch.as_tensor(z.values[0])  # (draw, datapoint, dim)
    assert ((draws.mean(0) - mean).abs() <= 5 * sd / math.sqrt(2000)).all()
    assert_close(draws.std(0), sd.expand(3, 2), rtol=0.1)
    table = az.summary(idata, kind="stats")
    assert_close(table.loc["z[5, 1]", "mean"], draws[:, 1, 1].mean(), atol=1e-3)
    other = to_inference_data(PosteriorGuide(model, full=False, scale=2.0), Batch.of(x[chosen], chosen, 10), num_samples=200)
    axes = az.plot_density([idata, other], data_labels=["posterior", "wide"], var_names=["z"])
    assert np.asarray(axes).size == 6  # one panel per datapoint and dimension
    import matplotlib.pyplot as plt

    plt.close("all")


def test_cli_evaluate_prints_and_writes_json_and_markdown(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--hidden", "16", "--out", str(run), "--no-progress", "--no-figures"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "40", "--split", "test", "--max-datapoints", "25",
                 "--chunk-size", "16", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    d = json.loads((run / "evaluation-test.json").read_text())
    assert d["num_datapoints"] == 25 and d["num_samples"] == 40 and d["info"]["split"] == "test"
    assert len(d["per_datapoint"]["log_px"]) == 25
    assert d["log_px"] >= d["elbo"]  # Jensen, on the same draws
    assert_close(d["bits_per_dim"], -d["log_px"] / (64 * math.log(2)), rtol=1e-9)
    md = (run / "evaluation-test.md").read_text()
    assert md in out
    assert f"{d['log_px']:.4f}" in md
