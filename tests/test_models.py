import math

import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close

from pvae.guides import conv_guide, mlp_guide
from pvae.inference import log_weights
from pvae.models import ContinuousBernoulli, Gaussian, conv_vae, mlp_vae


def test_conv_vae_passes_vectorized_particles_through_unchanged():
    model, guide = conv_vae((1, 28, 28), latent_dim=3), conv_guide((1, 28, 28), latent_dim=3)
    z = torch.randn(4, 5, 3)
    per_particle = torch.stack([model.decoder(z[k]) for k in range(4)])
    assert_close(model.decoder(z), per_particle, atol=1e-6)
    x = torch.bernoulli(torch.full((5, 784), 0.2))
    lw = log_weights(model, guide, x, num_particles=4)
    assert lw.log_w.shape == (4, 5)
    # an untrained decoder: log p(x|z) is near 784 * E[log Bernoulli] and finite
    assert torch.isfinite(lw.log_w).all() and (lw.log_likelihood < 0).all()


def test_conv_networks_refuse_other_image_sizes():
    with pytest.raises(ValueError, match="28x28"):
        conv_vae((1, 8, 8))


def test_gaussian_likelihood_is_a_normal_with_the_decoders_mean_and_log_variance():
    out = torch.tensor([[0.2, -0.1, math.log(0.25), math.log(4.0)]])
    x = torch.tensor([[0.5, 0.3]])
    lik = Gaussian(min_scale=0.0)
    expected = dist.Normal(torch.tensor([0.2, -0.1]), torch.tensor([0.5, 2.0])).log_prob(x).sum(-1)
    assert_close(lik(out).log_prob(x), expected, atol=1e-6)
    assert_close(lik.mean(out), out[:, :2])


def test_continuous_bernoulli_is_a_normalized_density_on_the_unit_interval():
    lik = ContinuousBernoulli()
    grid = torch.linspace(0, 1, 20001)[:, None]
    for logit in (-3.0, 0.0, 0.01, 2.5):
        density = lik(torch.full((1, 1), logit)).log_prob(grid).exp()
        assert_close(torch.trapezoid(density, grid[:, 0]), 1.0, atol=1e-4, msg=f"logit {logit}")


def test_mlp_vae_log_likelihood_matches_a_hand_computed_bernoulli():
    model = mlp_vae(6, 2, (4,))
    z = torch.randn(3, 2)
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    p = torch.sigmoid(model.decoder(z))
    by_hand = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert_close(model.likelihood(model.decoder(z)).log_prob(x), by_hand, atol=1e-5)


def test_unknown_likelihood_names_the_choices():
    with pytest.raises(ValueError, match="continuous-bernoulli"):
        mlp_vae(4, 2, likelihood="poisson")


def test_amortized_guide_scale_is_positive_and_reparameterized():
    guide = mlp_guide(6, 2, (8,))
    x = torch.rand(5, 6)
    loc, scale = guide.encode(x)
    assert (scale > 0).all()
    lw = log_weights(mlp_vae(6, 2, (8,), likelihood="continuous-bernoulli"), guide, x, num_particles=3)
    lw.log_w.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())


def test_the_bernoulli_image_has_the_value_and_gradient_of_pyros_bernoulli_to_event():
    """BernoulliImage (exp and log on the CPU, not the cross-entropy's log1p): against
    Bernoulli(logits).to_event(1), the same log-density and gradient in the logits, broadcast over a
    particle dimension, at logits of 0 (where |l| has no gradient) and of +-20 and +-200 (where exp
    overflows if written carelessly), and the same mean and support."""
    from pvae.models.likelihoods import Bernoulli, BernoulliImage

    logits = 4 * torch.randn(3, 5, 7)  # (particles, datapoints, pixels)
    logits[0, :, :5] = torch.tensor([0.0, 20.0, -20.0, 200.0, -200.0])
    logits.requires_grad_(True)
    x = torch.bernoulli(torch.full((5, 7), 0.4))
    ours = Bernoulli()(logits)
    assert isinstance(ours, BernoulliImage) and ours.event_shape == (7,) and ours.batch_shape == (3, 5)
    reference = dist.Bernoulli(logits=logits).to_event(1)
    value, expected = ours.log_prob(x), reference.log_prob(x)
    assert value.shape == (3, 5)
    assert_close(value, expected, atol=1e-5)
    weights = torch.randn(3, 5)
    (grad,) = torch.autograd.grad((value * weights).sum(), logits)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert_close(grad, grad_expected, atol=1e-6)
    assert_close(ours.mean, reference.mean)
    with torch.no_grad():  # written in place where no gradient is needed: the same value, the logits untouched
        before = logits.detach().clone()
        assert_close(ours.log_prob(x), expected, atol=1e-5, msg="without gradients")
        assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        ours.log_prob(torch.full((5, 7), 0.5))  # validation is on in the tests: not a binary value
