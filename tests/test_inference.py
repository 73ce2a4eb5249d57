import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close

from pvae.guides import mlp_guide
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pvae.inference import KLWeight, ReparamELBO, elbo_terms, iwae_bound, log_weights, make_elbo
from pvae.models import LinearGaussian, mlp_vae
from pvae.programs import Batch, Program, data_plate, inspect_programs


def test_analytic_gaussian_kl_matches_monte_carlo():
    """1/2 sum_d (mu^2 + sigma^2 - log sigma^2 - 1) against the mean of log q - log p over 200k draws."""
    loc = torch.tensor([0.5, -1.0, 2.0])
    scale = torch.tensor([0.3, 1.5, 0.8])
    closed_form = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum()
    q, p = dist.Normal(loc, scale).to_event(1), dist.Normal(torch.zeros(3), 1.0).to_event(1)
    assert_close(torch.distributions.kl_divergence(q, p), closed_form, atol=1e-5, msg="pyro's KL")
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z))
    # 5 standard errors: fails by chance about once in 3.5 million runs
    assert_close(mc.mean(), closed_form, atol=5 * mc.std().item() / math.sqrt(len(mc)), msg="Monte Carlo KL")


def test_analytic_kl_in_elbo_terms_matches_sampled_kl():
    model, guide = mlp_vae(12, 3, (16,)), mlp_guide(12, 3, (16,))
    x = torch.bernoulli(torch.full((20, 12), 0.3))
    lw = log_weights(model, guide, x, num_particles=20_000)
    sampled = (lw.log_q - lw.log_prior).mean(0)
    se = (lw.log_q - lw.log_prior).std(0) / math.sqrt(20_000)
    assert lw.kl is not None
    assert ((sampled - lw.kl).abs() <= 5 * se).all()


def test_iwae_with_one_sample_is_the_elbo_on_the_same_draws():
    model = LinearGaussian(5, 2)
    guide = mlp_guide(5, 2, ())
    x = torch.randn(30, 5)
    torch.manual_seed(1)
    lw = log_weights(model, guide, x, num_particles=1).log_w[0]
    torch.manual_seed(1)
    assert_close(iwae_bound(model, guide, x, num_samples=1), lw, atol=1e-5)


def test_elbo_never_exceeds_exact_log_px_of_the_linear_gaussian_model():
    torch.manual_seed(2)
    model = LinearGaussian(6, 2, sigma=0.7)
    guide = mlp_guide(6, 2, ())
    x = torch.randn(50, 6) * 2
    exact = model.log_prob(x)
    terms = elbo_terms(model, guide, x, num_particles=2000)
    assert (terms["elbo"] <= exact + 1e-3).all()
    assert_close(terms["elbo"], terms["recon"] - terms["kl"], atol=1e-4)


@pytest.mark.parametrize("name", ["trace", "analytic-kl"])
@pytest.mark.parametrize("num_particles", [1, 4])
def test_reparam_elbo_equals_pyros_elbo_in_value_and_gradient(name, num_particles):
    """The lean objective fit uses against Trace_ELBO / TraceMeanField_ELBO on the same draws, with
    a subsampled, scaled plate and a KL weight."""
    model, guide = mlp_vae(12, 3, (8,)), mlp_guide(12, 3, (8,))
    batch = Batch.of(torch.bernoulli(torch.full((10, 12), 0.4)), torch.arange(10, 20), 100)
    weight = KLWeight(0.3)
    params = [*model.parameters(), *guide.parameters()]
    info = inspect_programs(model, guide, batch)
    pyro_elbo = {"trace": Trace_ELBO, "analytic-kl": TraceMeanField_ELBO}[name]
    results = []
    for elbo in (pyro_elbo(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1),
                 make_elbo(name, num_particles, info)):
        torch.manual_seed(3)
        loss = elbo.differentiable_loss(weight(Program(model)), weight(Program(guide)), batch)
        results.append((loss, torch.autograd.grad(loss, params)))
    (pyro_loss, pyro_grads), (ours, our_grads) = results
    assert isinstance(make_elbo(name, num_particles, info), ReparamELBO)
    assert_close(ours, pyro_loss, rtol=1e-6)
    for ours_g, pyro_g in zip(our_grads, pyro_grads):
        assert_close(ours_g, pyro_g, atol=1e-5, rtol=1e-5)


def test_guides_with_discrete_latents_are_not_served_by_the_reparam_elbo():
    def model(x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            c = pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            pyro.sample("x", dist.Normal(c[:, None].expand_as(x), 1.0).to_event(1), obs=x)

    def guide(x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.3)))

    x = torch.randn(5, 2)
    assert not inspect_programs(model, guide, x).reparameterized
    assert not isinstance(make_elbo("trace", 1, inspect_programs(model, guide, x)), ReparamELBO)
    assert inspect_programs(mlp_vae(2, 1, (4,), likelihood="gaussian"), mlp_guide(2, 1, (4,)), x).reparameterized
