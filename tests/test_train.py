import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close

import pvae
from pvae.checkpoint import CHECKPOINT, load_checkpoint
from pvae.guides import mlp_guide
from pvae.data import batches
from pvae.inference import KLWeight, elbo_terms, make_elbo
from pvae.models import LinearGaussian, mlp_vae
from pvae.programs import Program, data_plate, inspect_programs
from pvae.svi import SVIStep, collect_params, make_optimizers

QUIET = dict(progress=False)


def ppca_data(n=500, p=5, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(p, d, generator=g)
    return torch.randn(n, d, generator=g) @ W.T + 0.5 * torch.randn(n, p, generator=g) + 1.0


def test_linear_vae_reaches_the_exact_maximum_likelihood_of_ppca():
    """Lucas et al. 2019: a linear VAE with a diagonal Gaussian guide can attain PPCA's maximum
    likelihood, where the ELBO is tight. After training, its ELBO is within 0.1 nats per datapoint of
    Tipping & Bishop's closed-form maximum, and never above the fitted model's exact log p(x)."""
    x = ppca_data()
    _, _, _, best_log_px = LinearGaussian.max_likelihood(x, 2)
    model, guide = LinearGaussian(5, 2), mlp_guide(5, 2, ())
    config = pvae.FitConfig(epochs=150, batch_size=50, lr=0.01, elbo="analytic-kl", eval_every=0, **QUIET)
    pvae.fit(model, guide, x, config)
    elbo = elbo_terms(model, guide, x, num_particles=2000)["elbo"]
    exact = model.log_prob(x)
    # Monte Carlo error of the mean ELBO over 500 x 2000 draws is below 0.005 nats
    assert abs(elbo.mean().item() - best_log_px.item()) < 0.1
    assert elbo.mean() <= exact.mean() + 0.005
    assert exact.mean() <= best_log_px + 1e-3, "no fit may beat the maximum likelihood"


def test_training_on_digits_improves_the_test_elbo_by_15_nats():
    data = pvae.load_dataset("digits", binarize="dynamic")
    model, guide = mlp_vae(64, 5, (200,)), mlp_guide(64, 5, (200,))
    before = elbo_terms(model, guide, data.test)["elbo"].mean().item()
    result = pvae.fit(model, guide, data, pvae.FitConfig(epochs=15, **QUIET))
    after = result.final["test_elbo"]
    # an untrained decoder is near 64 log 2 = 44.4 nats; 15 epochs reach about -26
    assert after > before + 15, (before, after)
    assert result.history[0]["test_elbo"] < after


def history_without_times(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in history]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    data = pvae.load_dataset("digits", binarize="dynamic")

    def run(out, epochs, resume=False):
        pvae.set_seed(0)  # the initial weights
        model, guide = mlp_vae(64, 2, (32,)), mlp_guide(64, 2, (32,))
        config = pvae.FitConfig(epochs=epochs, kl_warmup_epochs=2, num_particles=2, **QUIET)
        return pvae.fit(model, guide, data, config, out_dir=out, resume=resume)

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4, resume=True)
    assert len(resumed.history) == 4
    assert history_without_times(resumed.history) == history_without_times(whole.history)
    a = load_checkpoint(tmp_path / "whole")["programs"]["modules"]["model"][0]
    b = load_checkpoint(tmp_path / "split")["programs"]["modules"]["model"][0]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_seeded_runs_are_reproducible_on_cpu():
    data = pvae.load_dataset("digits", binarize="static")

    def run():
        pvae.set_seed(0)  # fit seeds the training; the initial weights come from here
        return pvae.fit(mlp_vae(64, 2, (32,)), mlp_guide(64, 2, (32,)), data, pvae.FitConfig(epochs=2, **QUIET))

    assert history_without_times(run().history) == history_without_times(run().history)


def test_run_folder_holds_config_metrics_and_an_atomic_weights_only_checkpoint(tmp_path):
    data = pvae.load_dataset("digits", binarize="static")
    pvae.fit(mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,)), data, pvae.FitConfig(epochs=2, **QUIET),
             out_dir=tmp_path, run_config={"note": "kept"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl"]
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 2 and state["config"]["run"] == {"note": "kept"}
    assert "fit" not in state["config"]["run"], "the fit config is saved once"
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "test_elbo" in rows[0]
    # refuses to overwrite the run, and leaves it as it was
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        pvae.fit(mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,)), data, pvae.FitConfig(epochs=1, **QUIET), out_dir=tmp_path)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_checkpoints_that_need_unpickling_are_refused(tmp_path):
    torch.save({"payload": torch.nn.ReLU()}, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="not a readable pvae checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_refuses_a_changed_fit_config(tmp_path):
    data = pvae.load_dataset("digits", binarize="static")
    pvae.fit(mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,)), data, pvae.FitConfig(epochs=1, **QUIET), out_dir=tmp_path)
    with pytest.raises(ValueError, match="lr"):
        pvae.fit(mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,)), data,
                 pvae.FitConfig(epochs=2, lr=0.1, **QUIET), out_dir=tmp_path, resume=True)


def test_bernoulli_likelihood_refuses_grey_levels():
    data = pvae.load_dataset("digits")
    with pytest.raises(ValueError, match="binarize"):
        pvae.fit(mlp_vae(64, 2), mlp_guide(64, 2), data, pvae.FitConfig(epochs=1, **QUIET))


def test_kl_warmup_raises_the_weight_linearly_to_beta():
    data = pvae.load_dataset("digits", binarize="static")
    config = pvae.FitConfig(epochs=4, kl_warmup_epochs=2, beta=2.0, eval_every=0, **QUIET)
    result = pvae.fit(mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,)), data, config)
    weights = [r["kl_weight"] for r in result.history]
    assert_close(weights, [1.0, 2.0, 2.0, 2.0], atol=1e-9)


def test_beta_one_reproduces_the_plain_vae_loss_exactly():
    """A beta-VAE with beta = 1 is the VAE: the KL-weight handler at weight 1 gives, on the same seed,
    the same losses and the same trained weights as the plain ELBO, to the bit, over 30 steps."""
    data = pvae.load_dataset("digits", binarize="static")

    def train(kl_weight):
        pvae.set_seed(0)
        model, guide = Program(mlp_vae(64, 2, (16,))), Program(mlp_guide(64, 2, (16,)))
        probe = data.batch("train", slice(0, 64))
        params = collect_params(model, guide, probe)
        step = SVIStep(model, guide, make_elbo("trace", 1, inspect_programs(model, guide, probe)),
                       make_optimizers(params, [model.fn, guide.fn], 1e-2), params, kl_weight=kl_weight)
        g = torch.Generator().manual_seed(0)
        losses = torch.stack([step(batch) for _ in range(3) for batch in batches(data, 128, g)])
        return losses, torch.cat([p.detach().reshape(-1) for p in params])

    plain, weighted = train(None), train(KLWeight(1.0))
    assert_close(weighted[0], plain[0], msg="losses")
    assert_close(weighted[1], plain[1], msg="trained weights")


@pytest.mark.parametrize("field,value", [("epochs", 0), ("lr", 0.0), ("elbo", "renyi"), ("num_particles", 0), ("beta", -1.0)])
def test_fit_config_names_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        pvae.FitConfig(**{field: value})


def test_fit_trains_pyro_params_of_a_users_own_program():
    """A program with no nn.Module at all: x ~ N(mu + z, 1), z ~ N(0, 1); mu is a pyro.param."""
    x = torch.randn(400, 3) + torch.tensor([2.0, -1.0, 0.5])

    def model(x, idx=None, num_data=None):
        mu = pyro.param("mu", torch.zeros(3))
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mu + 0.1 * z, 1.0).to_event(1), obs=x)

    def guide(x, idx=None, num_data=None):
        scale = pyro.param("q_scale", torch.ones(1), constraint=dist.constraints.positive)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), scale).to_event(1))

    pvae.fit(model, guide, x, pvae.FitConfig(epochs=60, batch_size=100, lr=0.05, eval_every=0, **QUIET))
    # the ML estimate of mu is the sample mean; its standard error is 1/sqrt(400) = 0.05
    assert_close(pyro.param("mu").detach(), x.mean(0), atol=0.1)


def test_cuda_device_is_refused_clearly_when_absent():
    if torch.cuda.is_available():
        return  # the CUDA test in test_cuda.py covers machines that have one
    with pytest.raises(ValueError, match="CUDA is not available"):
        pvae.resolve_device("cuda")
    assert pvae.resolve_device("auto") == torch.device("cpu")


def test_a_diverging_fit_stops_with_a_clear_error_and_saves_no_nan_checkpoint(tmp_path):
    x = torch.randn(200, 4)
    config = pvae.FitConfig(epochs=2, lr=1e30, eval_every=0, **QUIET)
    with pytest.raises(FloatingPointError, match="diverged in epoch 1 at step 2: the loss became nan: lower the learning rate") as e:
        pvae.fit(LinearGaussian(4, 2), mlp_guide(4, 2, ()), x, config, out_dir=tmp_path)
    assert e.value.__notes__ == ["no checkpoint was written"]
    assert not (tmp_path / CHECKPOINT).exists()


def test_non_finite_data_are_refused():
    x = torch.randn(20, 3)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        pvae.fit(LinearGaussian(3, 1), mlp_guide(3, 1, ()), x, pvae.FitConfig(epochs=1, **QUIET))


def test_the_default_objective_takes_the_closed_form_kl_where_it_is_exact_and_monte_carlo_elsewhere():
    """FitConfig's default elbo, auto: the VAE's Gaussian q and N(0, I) prior get their KL in closed form
    (a Monte Carlo KL learned 1.2 nats worse than a hand-written loop: README, learning parity); a
    learned mixture prior, which has no closed form, gets the Monte Carlo term, silently."""
    assert pvae.FitConfig().elbo == "auto"
    seen = {}

    class Objective(pvae.Callback):
        def on_fit_start(self, state):
            seen["analytic"] = state.step.elbo.analytic

    data = pvae.load_dataset("digits", binarize="static")
    config = pvae.FitConfig(epochs=1, eval_every=0, **QUIET)
    pvae.fit(mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,)), data, config, callbacks=[Objective()])
    assert seen["analytic"] == frozenset({"z"})

    decoder = torch.nn.Linear(2, 64)

    def student_prior(x):  # KL(Normal || StudentT) has no closed form: the Monte Carlo term, with no warning
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.StudentT(3.0, x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    pvae.fit(student_prior, pvae.guides.AmortizedGuide(student_prior, hidden=(8,)), data, config,
             callbacks=[Objective()])
    assert seen["analytic"] == frozenset()
