"""The beta-TCVAE (Chen et al. 2018) and the beta-VAE's KL weight.

The KL term splits into mutual information, total correlation (TC) and dimension-wise KL, each
estimated with the aggregate posterior q(z) = (1/N) sum_n q(z | x_n) taken from a minibatch. The
estimators are held to brute-force sums over a tiny data set: exact when the minibatch is the whole
data set, and (stratified) unbiased for q(z) over every minibatch of a smaller size.
"""

import itertools
import math

import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close

import pvae
from pvae.guides import LocalFamily, ParamsGuide, gaussian_sites, mlp_guide
from pvae.inference import (
    KLWeight,
    ReparamELBO,
    TotalCorrelationELBO,
    aggregate_log_q,
    kl_decomposition,
    log_weights,
    make_elbo,
)
from pvae.models import LinearGaussian, mlp_vae
from pvae.programs import Batch, Program, ProgramError, inspect_programs
from pvae.svi import SVIStep

N, D = 5, 2


def tiny_guide(n=N, d=D, seed=1):
    """q(z | x_n) = N(loc_n, diag scale_n^2) with free parameters per datapoint."""
    g = torch.Generator().manual_seed(seed)
    loc, scale = torch.randn(n, d, generator=g), 0.5 + torch.rand(n, d, generator=g)
    return ParamsGuide(LocalFamily(gaussian_sites(d)), {"z": {"loc": loc, "scale": scale}}), loc, scale


def brute_force(z, loc, scale):
    """log q(z) and sum_d log q(z_d) by summing over all N datapoints: z (..., D) -> (...,) each."""
    per_dim = dist.Normal(loc, scale).log_prob(z[..., None, :])  # (..., N, D)
    log_qz = torch.logsumexp(per_dim.sum(-1), -1) - math.log(loc.shape[0])
    log_qz_dims = (torch.logsumexp(per_dim, -2) - math.log(loc.shape[0])).sum(-1)
    return log_qz, log_qz_dims


@pytest.mark.parametrize("estimator", ["mws", "stratified"])
def test_the_decomposition_matches_brute_force_sums_when_the_batch_is_the_data_set(estimator):
    """With all N datapoints in the batch, q(z) is known exactly: mi, tc and dim_kl per draw equal the
    brute-force sums, and together they are the KL term log q(z|x) - log p(z). (Chen et al.'s
    constant log(NM) instead of log M shifts tc by (D - 1) log N and fails here.)"""
    guide, loc, scale = tiny_guide()
    x = torch.randn(N, 3)
    lw = log_weights(LinearGaussian(3, D), guide, x, num_particles=4, keep_traces=True)
    parts = kl_decomposition(lw, num_data=N, estimator=estimator)
    z = lw.traces[0].nodes["z"]["value"]  # (K, N, D)
    log_qz, log_qz_dims = brute_force(z, loc, scale)
    log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
    log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert_close(parts.mi, log_q - log_qz, atol=1e-5, msg="mutual information")
    assert_close(parts.tc, log_qz - log_qz_dims, atol=1e-5, msg="total correlation")
    assert_close(parts.dim_kl, log_qz_dims - log_p, atol=1e-5, msg="dimension-wise KL")
    assert_close(parts.mi + parts.tc + parts.dim_kl, lw.log_q - lw.log_prior, atol=1e-5)


def test_stratified_sampling_is_unbiased_for_q_z_over_every_minibatch():
    """For draws z_i ~ q(z | x_i), the stratified estimate of q(z_i) from a minibatch of M = 3 of the
    N = 5 datapoints, averaged over the 6 minibatches that contain i, is q(z_i) itself, and so is each
    dimension's marginal; minibatch weighted sampling (weights 1/M) is not, for M < N."""
    _, loc, scale = tiny_guide()
    z = dist.Normal(loc, scale).sample()  # (N, D): z_i from q(z | x_i)
    exact, _ = brute_force(z, loc, scale)
    exact_dims = (torch.logsumexp(dist.Normal(loc, scale).log_prob(z[:, None, :]), 1) - math.log(N)).exp()
    sums = {"stratified": torch.zeros(N), "mws": torch.zeros(N)}
    dims, count = torch.zeros(N, D), torch.zeros(N)
    for subset in itertools.combinations(range(N), 3):
        rows = torch.tensor(subset)
        cross = dist.Normal(loc[rows], scale[rows]).log_prob(z[rows][:, None, :])[None]  # (1, I, B, D)
        for estimator in sums:
            log_qz, _ = aggregate_log_q(cross, torch.arange(3), N, estimator)
            sums[estimator][rows] += log_qz[0].exp()
        # each dimension's marginal, through the same weights one dimension at a time
        for d in range(D):
            dims[rows, d] += aggregate_log_q(cross[..., d : d + 1], torch.arange(3), N, "stratified")[1][0].exp()
        count[rows] += 1
    assert_close(sums["stratified"] / count, exact.exp(), rtol=1e-5, msg="stratified E[q(z)]")
    assert_close(dims / count[:, None], exact_dims, rtol=1e-5, msg="stratified E[q(z_d)]")
    assert not torch.allclose(sums["mws"] / count, exact.exp(), rtol=1e-2)


@pytest.mark.parametrize("estimator", ["mws", "stratified"])
def test_the_total_correlation_is_near_zero_for_independent_dimensions_and_not_for_correlated(estimator):
    """q(z | x_n) = N(mu_n, I) for 2000 datapoints. With the mu_n's dimensions independent standard
    normals the aggregate posterior is (up to the finite mixture) a product of its marginals, and the
    TC estimated from minibatches of 500 is within 0.03 nats of zero (measured: 0.006 by minibatch
    weighted sampling, 0.001 stratified; 0.001 from all 2000); with mu_n near the diagonal the
    dimensions are strongly dependent and the TC is above 0.5 nats (measured: 1.17)."""
    g = torch.Generator().manual_seed(0)
    n, m, d = 2000, 500, 3
    independent = torch.randn(n, d, generator=g)
    correlated = 2 * torch.randn(n, 1, generator=g).expand(n, d) + 0.1 * torch.randn(n, d, generator=g)
    tcs = []
    for mu in (independent, correlated):
        z = mu + torch.randn(n, d, generator=g)
        tc = []
        for rows in torch.arange(n).split(m):
            cross = dist.Normal(mu[rows], 1.0).log_prob(z[rows][:, None, :])[None]  # (1, M, M, d)
            log_qz, log_qz_dims = aggregate_log_q(cross, torch.arange(len(rows)), n, estimator)
            tc.append(log_qz - log_qz_dims)
        tcs.append(torch.cat(tc, 1).mean().item())
    assert abs(tcs[0]) < 0.03, tcs
    assert tcs[1] > 0.5, tcs


def test_the_tc_objective_is_the_elbo_minus_beta_minus_one_times_the_total_correlation():
    """On the same draws, with a minibatch of 10 of 100 datapoints: the loss at tc_beta = 1 is the
    ELBO's (Pyro's Trace_ELBO value, through pvae's ReparamELBO), and at tc_beta = 4 it adds
    3 x (N / B) x the batch's summed TC estimate."""
    model, guide = mlp_vae(12, 3, (8,)), mlp_guide(12, 3, (8,))
    batch = Batch.of(torch.bernoulli(torch.full((10, 12), 0.4)), torch.arange(10, 20), 100)
    info = inspect_programs(model, guide, batch)
    losses = {}
    for name, objective in (("elbo", ReparamELBO(1, max_plate_nesting=1)), ("tc1", make_elbo("tc", 1, info)),
                            ("tc4", make_elbo("tc", 1, info, tc_beta=4.0, tc_estimator="stratified"))):
        torch.manual_seed(3)
        losses[name] = objective.differentiable_loss(Program(model), Program(guide), batch)
    torch.manual_seed(3)
    lw = log_weights(model, guide, batch, 1, info, keep_traces=True)
    tc = kl_decomposition(lw, 100, "stratified").tc.sum()
    assert_close(losses["tc1"], losses["elbo"], rtol=1e-6)
    assert_close(losses["tc4"], losses["tc1"] + 3 * 10 * tc, rtol=1e-6)
    assert abs(tc.item()) > 1e-3, "the test needs a non-zero TC to see its weight"


def test_tc_needs_factorized_local_sites_and_no_kl_weight():
    from pvae.guides import FullCovariance

    model, x = LinearGaussian(3, 2), torch.randn(6, 3)
    guide = mlp_guide(3, 2, (), family=FullCovariance())
    with pytest.raises(ProgramError, match="does not factorize"):
        make_elbo("tc", 1, inspect_programs(model, guide, x), tc_beta=2.0).differentiable_loss(
            Program(model), Program(guide), Batch.of(x))
    with pytest.raises(ValueError, match="no KL weight"):
        pvae.FitConfig(elbo="tc", beta=2.0)
    with pytest.raises(ValueError, match="tc_estimator"):
        pvae.FitConfig(elbo="tc", tc_estimator="exact")


def test_a_tc_fit_records_mutual_information_total_correlation_and_dimension_wise_kl():
    """Per epoch, on the training rows: the three terms, which add up to the Monte Carlo KL (within its
    noise: one draw per row, 1000 rows, so a few hundredths of a nat), and a TC that the heavier weight
    keeps lower, on the same seed."""
    data = pvae.load_dataset("digits", binarize="static")
    records = {}
    for beta in (1.0, 8.0):
        pvae.set_seed(0)
        config = pvae.FitConfig(epochs=6, elbo="tc", tc_beta=beta, eval_train_size=1000, progress=False)
        records[beta] = pvae.fit(mlp_vae(64, 4, (64,)), mlp_guide(64, 4, (64,)), data, config).history
    last = records[1.0][-1]
    assert {"train_mi", "train_tc", "train_dim_kl"} <= set(last)
    assert_close(last["train_mi"] + last["train_tc"] + last["train_dim_kl"], last["train_kl"], atol=0.15)
    assert records[8.0][-1]["train_tc"] < records[1.0][-1]["train_tc"], (records[8.0][-1], last)


def test_a_kl_weight_of_one_is_the_plain_elbo_exactly_and_beta_weights_the_kl():
    """beta = 1 reproduces the plain VAE's loss and gradients bit for bit on the same seed; beta = 3
    gives -E[log p(x|z)] + 3 KL on the same draws (the Monte Carlo KL, whose parts elbo_terms splits)."""
    model, guide = mlp_vae(12, 3, (8,)), mlp_guide(12, 3, (8,))
    batch = Batch.of(torch.bernoulli(torch.full((10, 12), 0.4)))
    info = inspect_programs(model, guide, batch)
    params = [*model.parameters(), *guide.parameters()]
    results = {}
    for beta in (None, 1.0, 3.0):
        step = SVIStep(Program(model), Program(guide), make_elbo("trace", 1, info), [], params,
                       kl_weight=None if beta is None else KLWeight(beta))
        torch.manual_seed(5)
        loss = step.loss(batch)
        results[beta] = (loss, torch.autograd.grad(loss, params))
    assert torch.equal(results[1.0][0], results[None][0])
    assert all(torch.equal(a, b) for a, b in zip(results[1.0][1], results[None][1]))
    torch.manual_seed(5)
    lw = log_weights(model, guide, batch, 1, info)
    recon, kl = lw.log_likelihood.sum(), (lw.log_q - lw.log_prior).sum()
    assert_close(results[3.0][0], -recon + 3 * kl, rtol=1e-5)
    assert_close(results[None][0], -recon + kl, rtol=1e-5)


def test_the_tc_objective_refuses_enumerated_models():
    with pytest.raises(ProgramError, match="enumerates"):
        TotalCorrelationELBO._checked(pvae.programs.ProgramInfo(1, -1, ("z",), (), ("z",), (), True))
