"""Any Pyro model: programs as users write them, scaled to the data set, saved whole, with guides built
from them, objectives that are right or refuse, and evaluation and the gap study for every model.

Exact where the maths allows: an enumerated Gaussian mixture against its closed-form marginal, a
two-layer linear-Gaussian hierarchy against its exact evidence and posterior, factor analysis with
global loadings against a hand computation of the minibatch ELBO.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO, config_enumerate
from torch import nn

import pvae
from pvae import cli
from pvae.compare import CompareConfig, compare_inference, optimize_local
from pvae.evaluate import evaluate
from pvae.guides import AmortizedGuide, LocalFamily, MeanFieldGuide, SemiAmortizedGuide, mlp_guide, model_sites
from pvae.inference import KLWeight, PvaeWarning, elbo_terms, make_elbo
from pvae.models import LinearGaussianHierarchy, mlp_vae
from pvae.programs import Batch, Program, ProgramError, inspect_programs
from pvae.run import load_run

QUIET = dict(progress=False)


def history_without_times(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in history]


# ----------------------------------------------------------------------------- programs as users write them


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial, unchanged but for its size: ``model(x)`` and ``guide(x)``, ``pyro.module``,
    a plate named "data" over the batch with no subsample arguments."""

    def __init__(self, pixels=64, z_dim=3, hidden=32):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, pixels), nn.Sigmoid())
        self.encoder_body = nn.Sequential(nn.Linear(pixels, hidden), nn.Softplus())
        self.fc_loc, self.fc_scale = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 64))

    def guide(self, x):
        pyro.module("encoder_body", self.encoder_body)
        pyro.module("fc_loc", self.fc_loc)
        pyro.module("fc_scale", self.fc_scale)
        with pyro.plate("data", x.shape[0]):
            h = self.encoder_body(x)
            pyro.sample("latent", dist.Normal(self.fc_loc(h), torch.exp(self.fc_scale(h))).to_event(1))


@pytest.fixture(scope="module")
def digits():
    return pvae.load_dataset("digits", binarize="static")


def test_a_tutorial_program_is_fitted_unchanged_and_its_train_loss_is_minus_the_elbo_per_datapoint(digits):
    """One epoch at a negligible learning rate: the mean training loss over the epoch is the negated
    ELBO per datapoint of the whole training set, which elbo_terms estimates independently. Without
    the N/B scale of the unscaled tutorial plate the loss would be B/N = 0.1 of it. Tolerance: 5
    standard errors of the epoch's Monte Carlo mean (per-datapoint spread of the 20-particle ELBO,
    measured: about 0.6 nats, over 1294 datapoints) plus the batches' tiny parameter drift."""
    pvae.set_seed(0)
    vae = TutorialVAE()
    result = pvae.fit(vae.model, vae.guide, digits, pvae.FitConfig(epochs=1, lr=1e-9, num_particles=20,
                                                                   eval_every=0, **QUIET))
    torch.manual_seed(1)
    terms = elbo_terms(vae.model, vae.guide, digits.batch("train"), num_particles=200)
    assert_close(result.final["train_loss"], -terms["elbo"].mean(), atol=0.1)
    assert math.isfinite(result.final["train_loss"]) and result.info.local == ("latent",)


def test_a_tutorial_program_resumes_with_its_pyro_module_state(digits, tmp_path):
    def run(out, epochs, resume=False):
        pvae.set_seed(0)
        vae = TutorialVAE()
        return pvae.fit(vae.model, vae.guide, digits, pvae.FitConfig(epochs=epochs, **QUIET), out_dir=out, resume=resume)

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "split", 1)
    resumed = run(tmp_path / "split", 3, resume=True)
    assert history_without_times(resumed.history) == history_without_times(whole.history)


def test_side_inputs_travel_with_their_split():
    """A conditional model p(x | z, y): test rows are scored with the test labels. A model that reads y
    through the likelihood's mean makes the pairing visible: with the test labels the test ELBO is as
    good as the train ELBO; paired with the training rows' labels it would be far worse."""
    torch.manual_seed(0)
    y_train, y_test = torch.randint(0, 3, (300,)), torch.randint(0, 3, (100,))
    centres = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    x_train, x_test = centres[y_train] + 0.3 * torch.randn(300, 2), centres[y_test] + 0.3 * torch.randn(100, 2)
    data = pvae.Dataset.from_tensors(x_train, test=x_test, inputs={"y": {"train": y_train, "test": y_test}})

    def model(x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(centres[y] + 0.1 * z, 0.3).to_event(1), obs=x)

    guide = AmortizedGuide(model, hidden=(16,), classes={"y": 3})
    result = pvae.fit(model, guide, data, pvae.FitConfig(epochs=20, batch_size=50, lr=1e-2, **QUIET))
    assert result.final["test_elbo"] > result.final["train_elbo"] - 1.0
    assert result.final["test_elbo"] > -3.0  # with y of the wrong rows it is about -60
    swapped = data.batch("test")
    swapped = Batch(swapped.x, swapped.idx, swapped.num_data, {"y": y_train[:100]}, "test")
    assert elbo_terms(model, guide, swapped, num_particles=10)["elbo"].mean() < -20


def test_programs_that_cannot_be_served_get_one_line_errors_naming_the_site():
    x = torch.randn(10, 3)

    def no_plate(x):
        pyro.sample("z", dist.Normal(x.new_zeros(10, 2), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([10, 3]).to_event(2), obs=x)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).expand([x.shape[0], 3]).to_event(1), obs=x)

    def wrong_batch(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(5, 2), 1.0).to_event(1))

    def no_event(x):  # the commonest slip: a vector site without .to_event
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).expand([x.shape[0], 3]).to_event(1), obs=x)

    def other_name(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))

    def needs_y(x, y):
        return model(x)

    cases = [
        (no_plate, mlp_guide(3, 2), "no plate named 'data'"),
        (model, wrong_batch, "guide site 'z' has 5 where plate 'data' has 10"),
        (no_event, mlp_guide(3, 2), "model site 'z' has 2 where plate 'data' has 10 .* `.to_event`"),
        (model, other_name, "latent site 'z' of the model has no site in the guide"),
        (needs_y, AmortizedGuide(model), "needs 'y', which the data do not carry"),
    ]
    for m, g, message in cases:
        with pytest.raises(ProgramError, match=message) as caught:
            pvae.fit(m, g, x, pvae.FitConfig(epochs=1, **QUIET))
        assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- scaled to the data set


def test_the_minibatch_loss_is_the_hand_computed_elbo_scaled_to_the_data_set_with_the_kl_weight():
    """On the same draws: -(N/B sum_b [log p(x_b|z_b) + beta (log p(z_b) - log q(z_b|x_b))]) for the
    built-in VAE, through the step fit takes. Catches a data plate that ignores N, and a KL weight
    that is never applied."""
    model, guide = mlp_vae(12, 3, (8,)), mlp_guide(12, 3, (8,))
    batch = Batch.of(torch.bernoulli(torch.full((10, 12), 0.4)), torch.arange(10, 20), 250)
    elbo = make_elbo("trace", 1, inspect_programs(model, guide, batch))
    for beta in (1.0, 2.5):
        torch.manual_seed(3)
        loss = elbo.differentiable_loss(KLWeight(beta)(Program(model)), KLWeight(beta)(Program(guide)), batch)
        torch.manual_seed(3)
        z = poutine.trace(Program(guide)).get_trace(batch).nodes["z"]["value"]
        loc, scale = guide.encode(batch.x)
        log_lik = dist.Bernoulli(logits=model.decoder(z)).log_prob(batch.x).sum(-1)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
        by_hand = -(250 / 10) * (log_lik + beta * (log_prior - log_q)).sum()
        assert_close(loss, by_hand, rtol=1e-5, msg=f"beta {beta}")


def factor_analysis(P=5, D=2):
    def model(x):
        mu = pyro.param("mu", torch.zeros(P))
        sigma = pyro.param("sigma", torch.ones(P), constraint=dist.constraints.positive)
        W = pyro.sample("W", dist.Normal(torch.zeros(P, D), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mu + (W @ z.unsqueeze(-1)).squeeze(-1), sigma).to_event(1), obs=x)

    return model


def fa_data(N=300, P=5, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(P, D, generator=g)
    return torch.randn(N, D, generator=g) @ W.T + 0.3 * torch.randn(N, P, generator=g)


@pytest.mark.parametrize("elbo", ["trace", "analytic-kl"])
def test_factor_analysis_elbo_counts_the_global_kl_once_and_the_local_terms_n_over_b_times(elbo):
    model = factor_analysis()
    x = fa_data()
    guide = AmortizedGuide(model, hidden=(8,))
    batch = Batch.of(x[:20], torch.arange(20), 300)
    info = inspect_programs(model, guide, batch)
    assert info.global_ == ("W",) and info.local == ("z",)
    assert info.analytic_kl == {"W", "z"}
    torch.manual_seed(7)
    loss = make_elbo(elbo, 1, info).differentiable_loss(Program(model), Program(guide), batch)
    torch.manual_seed(7)
    trace = poutine.trace(Program(guide)).get_trace(batch)
    q_W, q_z = trace.nodes["W"]["fn"], trace.nodes["z"]["fn"]
    W, z = trace.nodes["W"]["value"], trace.nodes["z"]["value"]
    mu, sigma = pyro.param("mu"), pyro.param("sigma")
    p_W, p_z = dist.Normal(torch.zeros(5, 2), 1.0).to_event(2), dist.Normal(torch.zeros(20, 2), 1.0).to_event(1)
    log_lik = dist.Normal(mu + z @ W.T, sigma).to_event(1).log_prob(batch.x)
    if elbo == "trace":
        local = log_lik + p_z.log_prob(z) - q_z.log_prob(z)
        global_ = p_W.log_prob(W) - q_W.log_prob(W)
    else:
        local = log_lik - torch.distributions.kl_divergence(q_z, p_z)
        global_ = -torch.distributions.kl_divergence(q_W, p_W)
    assert_close(loss, -(300 / 20 * local.sum() + global_), rtol=1e-5)


def test_factor_analysis_resumes_with_its_param_store_and_global_guide(tmp_path):
    data = pvae.Dataset.from_tensors(fa_data(200), test=fa_data(50, seed=1))

    def run(out, epochs, resume=False):
        model = factor_analysis()
        return pvae.fit(model, AmortizedGuide(model, hidden=(8,)), data,
                        pvae.FitConfig(epochs=epochs, batch_size=50, lr=0.02, **QUIET), out_dir=out, resume=resume)

    whole = run(tmp_path / "whole", 4)
    mu_whole = pyro.param("mu").detach().clone()
    run(tmp_path / "split", 2)
    pyro.clear_param_store()
    resumed = run(tmp_path / "split", 4, resume=True)
    assert history_without_times(resumed.history) == history_without_times(whole.history)
    assert torch.equal(pyro.param("mu").detach(), mu_whole)
    record = whole.final
    assert record["train_global_kl"] > 0 and "test_elbo" in record
    # train_elbo holds the global KL's share, so that it is minus the training objective per datapoint
    assert record["train_elbo"] < record["train_recon"] - record["train_kl"] + 1e-6


# ----------------------------------------------------------------------------- objectives that are right or refuse


def reversed_posterior_guide(model: LinearGaussianHierarchy):
    """The exact posterior of (z1, z2) | x, one dimension each, factored the other way round:
    q(z2 | x) q(z1 | z2, x). Every log-weight is log p(x), yet the guide samples z1 after z2, on which
    p(z2 | z1) depends."""

    def guide(x):
        mean, precision = model.posterior(x)
        cov = torch.linalg.inv(precision)
        s11, s12, s22 = cov[0, 0], cov[0, 1], cov[1, 1]
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(mean[:, 1:], s22.sqrt()).to_event(1))
            loc1 = mean[:, :1] + s12 / s22 * (z2 - mean[:, 1:])
            pyro.sample("z1", dist.Normal(loc1, (s11 - s12**2 / s22).sqrt()).to_event(1))

    return guide


def test_analytic_kl_with_a_guide_whose_sites_depend_falls_back_where_it_is_not_exact():
    """With the exact posterior as guide, the ELBO is log p(x). The closed-form KL of z2 is not exact
    here (z1, which p(z2 | z1) depends on, is drawn after z2): pvae says so and takes the Monte Carlo
    term for z2, and its estimate is log p(x) within Monte Carlo error; Pyro's TraceMeanField_ELBO,
    which takes every closed form, is off by nats."""
    torch.manual_seed(0)
    model = LinearGaussianHierarchy(4, 1, 1, s=0.3, sigma=0.4)
    with torch.no_grad():
        model.top.weight.fill_(2.0)
    x = torch.randn(30, 4) * 1.5
    guide = reversed_posterior_guide(model)
    info = inspect_programs(model, guide, x)
    assert info.analytic_kl == {"z1"}, "z1's KL is exact (its p has no parents); z2's is not"
    with pytest.warns(PvaeWarning, match="site\\(s\\) 'z2' have no exact closed-form KL"):
        elbo = make_elbo("analytic-kl", 2000, info)
    exact = model.log_prob(x).sum()
    with torch.no_grad():
        ours = -elbo.differentiable_loss(Program(model), Program(guide), Batch.of(x))
        with warnings.catch_warnings():  # Pyro warns that it cannot verify the mean-field restriction, and goes on
            warnings.simplefilter("ignore", UserWarning)
            wrong = -TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1) \
                .differentiable_loss(Program(model), Program(guide), Batch.of(x))
    assert_close(ours, exact, atol=0.5, msg="analytic-kl where exact, Monte Carlo for z2")
    assert (wrong - exact).abs() > 5, "the test's guide must make a blind closed form visibly wrong"


# ----------------------------------------------------------------------------- exact ground truths


def test_two_layer_hierarchy_q_star_and_its_approximation_gap_have_closed_forms():
    """The mean-field family over both sites: q*'s means are the posterior means of (z1, z2), its scales
    1 / sqrt(Lambda_dd) of the joint posterior precision, and the approximation gap is
    1/2 (sum_d log Lambda_dd - log det Lambda). Tolerances as in test_compare (4 standard errors and
    the optimization's slack)."""
    torch.manual_seed(1)
    model = LinearGaussianHierarchy(6, 2, 3, s=0.6, sigma=0.5)
    with torch.no_grad():
        z1 = torch.randn(24, 2)
        z2 = model.top(z1) + 0.6 * torch.randn(24, 3)
        x = model.linear(z2) + 0.5 * torch.randn(24, 6)
    mean, precision = model.posterior(x)
    family = LocalFamily(model_sites(model, x))
    assert [s.name for s in family.sites] == ["z1", "z2"]
    q_star, _ = optimize_local(model, x, family, num_particles=16)
    loc = torch.cat([q_star["z1"]["loc"], q_star["z2"]["loc"]], -1)
    scale = torch.cat([q_star["z1"]["scale"], q_star["z2"]["scale"]], -1)
    optimal_scale = precision.diag().rsqrt().expand_as(scale)
    assert_close(loc, mean, atol=0.06 * optimal_scale.min().item(), msg="q* means")
    assert_close(scale, optimal_scale, rtol=0.06, msg="q* scales")
    gap = 0.5 * (precision.diag().log().sum() - torch.logdet(precision))
    assert gap > 0.1, "the hierarchy's posterior should be correlated enough to have a gap"
    config = CompareConfig(init="prior", batch_size=24, particles=16, elbo_particles=2000, iwae_samples=2000,
                           chunk_size=1000)
    result = compare_inference(model, x, None, config)
    measured = result.approximation_gap
    assert_close(measured.mean, gap, atol=4 * measured.se + 0.01, msg="approximation gap")
    assert_close(result.log_px.mean, model.log_prob(x).mean(), atol=4 * measured.se + 0.01, msg="log p(x)")
    # evaluate with q* as the guide, against the exact evidence datapoint by datapoint: 4 standard errors
    # of the Monte Carlo error, plus the bound's bias (below 0.01 nats at K = 1000 for this gap, measured)
    ev = evaluate(model, pvae.compare.ParamsGuide(family, q_star), x, num_samples=1000, chunk_size=500)
    error = torch.as_tensor(ev.per_datapoint["log_px"]) - model.log_prob(x).double()
    assert_close(error.mean(), 0.0, atol=4 * error.std().item() / math.sqrt(24) + 0.01, msg="evaluate's log p(x)")


def gmm_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    return centres[c] + torch.tensor([0.5, 0.8]) * torch.randn(n, 2, generator=g)


@config_enumerate
def gmm(x):
    weights = pyro.param("weights", torch.ones(3) / 3, constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[c], scale).to_event(1), obs=x)


def gmm_log_lik(x):
    """The closed-form marginal log p(x) of the fitted mixture, per datapoint."""
    w, locs, scale = pyro.param("weights"), pyro.param("locs"), pyro.param("scale")
    comp = dist.Normal(locs, scale).to_event(1).log_prob(x.unsqueeze(-2))  # (N, 3)
    return torch.logsumexp(w.log() + comp, -1)


@pytest.mark.slow
def test_an_enumerated_mixture_reaches_the_maximum_likelihood_and_evaluate_sums_it_out_exactly():
    """TraceEnum_ELBO is chosen by itself; with nothing left to sample the ELBO is the marginal
    likelihood, so the fit is maximum likelihood: it reaches the EM optimum (scikit-learn's
    GaussianMixture, diagonal covariances tied across components as here) within 0.02 nats per test
    datapoint; evaluate's log p(x) equals the closed-form marginal to float precision."""
    from sklearn.mixture import GaussianMixture

    train, test = gmm_data(1500, 0), gmm_data(500, 1)
    data = pvae.Dataset.from_tensors(train, test=test)
    guide = AmortizedGuide(gmm)
    result = pvae.fit(gmm, guide, data, pvae.FitConfig(epochs=60, batch_size=250, lr=0.05, **QUIET))
    assert result.info.enumerated == ("c",)
    fitted = gmm_log_lik(test).mean().item()
    em = GaussianMixture(3, covariance_type="tied", random_state=0, n_init=3).fit(train.numpy())
    # tied full covariance is a superset of tied diagonal: its test log-likelihood bounds ours from above
    best = em.score(test.numpy())
    assert fitted > best - 0.05, (fitted, best)
    ev = evaluate(gmm, guide, test, num_samples=30)
    assert_close(ev.per_datapoint["log_px"], gmm_log_lik(test), atol=1e-4, msg="evaluate's log p(x)")
    assert_close(ev.per_datapoint["elbo"], gmm_log_lik(test), atol=1e-4, msg="the ELBO with nothing sampled")
    assert "recon" not in ev.per_datapoint and ev.latent_names == []


def test_an_enumerated_site_inside_a_vae_is_summed_out_in_the_bound():
    """A mixture prior with an enumerated component: log p(x, z) = log sum_c p(c) p(z|c) p(x|z). With
    the encoder's q the stream's log-weights equal the hand computation on the same z."""
    class MixtureVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.locs = nn.Parameter(torch.randn(3, 2))
            self.decoder = nn.Linear(2, 6)

        @config_enumerate
        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(3)))
                z = pyro.sample("z", dist.Normal(self.locs[c], 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    model = MixtureVAE()
    guide = AmortizedGuide(model, hidden=(8,))
    x = torch.bernoulli(torch.full((7, 6), 0.5))
    info = inspect_programs(model, guide, x)
    assert info.enumerated == ("c",) and info.local == ("c", "z")
    torch.manual_seed(2)
    lw = pvae.log_weights(model, guide, x, num_particles=5, info=info)
    torch.manual_seed(2)
    with pyro.plate("particles", 5, dim=-2):
        z = poutine.trace(Program(guide)).get_trace(Batch.of(x)).nodes["z"]["value"]  # (5, 7, 2)
    log_pz = torch.logsumexp(math.log(1 / 3) + dist.Normal(model.locs, 1.0).to_event(1).log_prob(z.unsqueeze(-2)), -1)
    log_px_z = dist.Bernoulli(logits=model.decoder(z)).to_event(1).log_prob(x)
    assert_close(lw.log_p, log_pz + log_px_z, atol=1e-4)
    assert lw.log_likelihood is None  # no split of an enumerated joint into likelihood and prior


# ----------------------------------------------------------------------------- three guides from any model


def test_the_three_guides_built_from_a_hierarchical_model_fit_and_compare(digits):
    class Hierarchical(nn.Module):
        def __init__(self):
            super().__init__()
            self.top = nn.Linear(2, 4)
            self.decoder = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 64))

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                z1 = pyro.sample("top", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                z2 = pyro.sample("bottom", dist.Normal(self.top(z1), 0.5).to_event(1))
                pyro.sample("pixels", dist.Bernoulli(logits=self.decoder(z2)).to_event(1), obs=x)

    model = Hierarchical()
    guides = {"amortized": AmortizedGuide(model, hidden=(32,)), "mean-field": MeanFieldGuide(model)}
    guides["semi-amortized"] = SemiAmortizedGuide(AmortizedGuide(model, hidden=(32,)), model, steps=2)
    for name, guide in guides.items():
        result = pvae.fit(model, guide, digits, pvae.FitConfig(epochs=3, batch_size=128, lr=1e-3, **QUIET))
        elbos = [r["train_elbo"] for r in result.history]
        assert elbos[-1] > elbos[0] + 1, (name, elbos)
        assert result.info.local == ("top", "bottom")
    assert elbos[-1] > -64 * math.log(2), "the semi-amortized fit should beat coin flips"
    tiny = CompareConfig(batch_size=10, particles=8, max_steps=20, elbo_particles=16, iwae_samples=32,
                         refine_steps=(1, 3))
    result = compare_inference(model, digits.batch("test", slice(0, 10)), guides["amortized"], tiny)
    assert sorted(result.elbo_q_k) == [1, 3] and "top continuous (2,), bottom continuous (4,)" in result.settings["family"]
    assert_close(result.amortization_gap.mean, result.elbo_q_star.mean - result.elbo_q.mean, atol=1e-4)
    mean_field = compare_inference(model, digits.batch("train", slice(0, 10)), guides["mean-field"], tiny)
    assert mean_field.elbo_q is None


def test_a_guide_for_constrained_and_discrete_sites():
    """A positive site (LogNormal-like through exp), a simplex site and a sampled Bernoulli: the guide
    maps each from unconstrained space and the values it draws lie in their supports."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(x.new_full((x.shape[0],), 2.0), 1.0))
            mix = pyro.sample("mix", dist.Dirichlet(x.new_ones(x.shape[0], 3)))
            flip = pyro.sample("flip", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            loc = rate + mix[..., 0] + flip
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x[:, 0])

    guide = AmortizedGuide(model, hidden=(8,))
    x = torch.randn(12, 1)
    trace = poutine.trace(Program(guide)).get_trace(Batch.of(x))
    assert (trace.nodes["rate"]["value"] > 0).all()
    assert_close(trace.nodes["mix"]["value"].sum(-1), 1.0, atol=1e-5)
    assert set(trace.nodes["flip"]["value"].unique().tolist()) <= {0.0, 1.0}
    info = inspect_programs(model, guide, x)
    assert info.discrete == ("flip",) and not info.reparameterized
    result = pvae.fit(model, guide, x, pvae.FitConfig(epochs=3, batch_size=4, **QUIET))
    assert math.isfinite(result.final["train_elbo"])


# ----------------------------------------------------------------------------- run folders written from Python


FACTORY = '''
import pyro, pyro.distributions as dist, torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 64)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


def build(data):
    return Model()
'''


def test_pvae_evaluate_and_compare_read_run_folders_written_by_fit(tmp_path, capsys):
    """The run records the data set's source and the factory that rebuilds the model; its guide family
    is rebuilt from the model. A run fitted on tensors without a factory says what to pass."""
    factory = tmp_path / "mymodels.py"
    factory.write_text(FACTORY)
    data = pvae.load_dataset("digits", binarize="static")
    from pvae.registry import load_factory

    model = load_factory(f"{factory}:build")(data)
    run = tmp_path / "run"
    pvae.fit(model, AmortizedGuide(model, hidden=(400,)), data, pvae.FitConfig(epochs=1, **QUIET), out_dir=run,
             factory=f"{factory}:build")
    assert cli.main(["evaluate", str(run), "--samples", "30", "--max-datapoints", "20", "--no-progress"]) == 0
    assert cli.main(["compare", str(run), "--max-datapoints", "6", "--batch-size", "6", "--particles", "4",
                     "--max-steps", "10", "--refine-steps", "1", "--elbo-particles", "8",
                     "--iwae-samples", "8", "--no-progress", "--no-figures"]) == 0
    assert (run / "evaluation-test.json").is_file() and (run / "compare-test.json").is_file()
    loaded = load_run(run)
    assert torch.equal(loaded.model.decoder.weight, model.decoder.weight)

    bare = tmp_path / "bare"
    pvae.fit(mlp_vae(64, 2, (8,)), mlp_guide(64, 2, (8,)), data.train, pvae.FitConfig(epochs=1, **QUIET), out_dir=bare)
    capsys.readouterr()
    assert cli.main(["evaluate", str(bare), "--no-progress"]) == 2
    assert "fitted from Python on data given as tensors: pass them" in capsys.readouterr().err
    ev = evaluate(*(lambda r: (r.model, r.guide))(load_run(bare, model=mlp_vae(64, 2, (8,)), guide=mlp_guide(64, 2, (8,)),
                                                           data=pvae.Dataset.from_tensors(data.train))),
                  data.test[:10], num_samples=10)
    assert np.isfinite(ev.per_datapoint["log_px"]).all()


def test_the_gap_study_keeps_a_models_pyro_params_and_serves_global_sites():
    """The study seeds its draws without clearing the param store (the fitted pyro.params are the model),
    and holds global sites at the guide's mean."""
    torch.manual_seed(0)
    x = torch.randn(200, 2) * 0.5 + 5.0

    def model(x):
        shift = pyro.param("shift", torch.zeros(2))
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(shift + 0.3 * w * z, 0.5).to_event(1), obs=x)

    guide = AmortizedGuide(model, hidden=(8,))
    pvae.fit(model, guide, x, pvae.FitConfig(epochs=40, batch_size=50, lr=0.2, **QUIET))
    fitted = pyro.param("shift").detach().clone()
    assert_close(fitted, 5.0, atol=0.5)
    tiny = CompareConfig(batch_size=20, particles=8, max_steps=20, elbo_particles=16, iwae_samples=32,
                         refine_steps=(1,))
    result = compare_inference(model, x[:20], guide, tiny)
    assert torch.equal(pyro.param("shift").detach(), fitted)
    assert result.log_px.mean > -5.0, "with the fitted shift the data are likely; with a cleared one they are not"
    assert "w: held at the guide's mean" == result.settings["global sites"]
