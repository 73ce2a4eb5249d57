"""Mean-field and semi-amortized guides: the sparse, lazy update of per-datapoint parameters,
variational EM on digits, and the refinement of an encoder's q."""

import math

import pytest
import torch
from helpers import assert_close

from pvae import cli
from pvae.data import load_dataset
from pvae.guides import ParamsGuide, SemiAmortizedGuide, mean_field_guide, mlp_guide, refine
from pvae.inference import elbo_terms, log_weights, make_elbo
from pvae.metrics import read_metrics
from pvae.models import mlp_vae
from pvae.programs import Batch, Program, ProgramError
from pvae.svi import make_optimizers
from pvae.train import FitConfig, fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="static")


def rows(idx, num_data=10):
    return Batch.of(torch.zeros(len(idx), 5), idx, num_data)


def test_local_params_are_set_and_read_back():
    guide = mean_field_guide(10, 3, init_scale=0.5)
    idx = torch.tensor([7, 2])

    def read(idx):
        p = guide.local_params(rows(idx))["z"]
        return p["loc"], p["scale"]

    loc, scale = read(idx)
    assert_close(loc, 0.0, msg="initial means")
    assert_close(scale, 0.5, atol=1e-6, msg="initial scales")
    guide.set_local_params({"z": {"loc": torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 0.1]]),
                                  "scale": torch.tensor([[0.2, 1.0, 3.0], [1e-3, 0.7, 2.0]])}}, idx)
    loc, scale = read(idx)
    assert_close(loc, [[1.0, -2.0, 3.0], [0.5, 0.0, 0.1]], rtol=1e-6, msg="float32 means")
    assert_close(scale, [[0.2, 1.0, 3.0], [1e-3, 0.7, 2.0]], rtol=1e-5)
    assert_close(read(torch.tensor([0]))[1], 0.5, atol=1e-6, msg="other rows untouched")


def test_a_batch_of_another_split_or_size_is_refused():
    guide = mean_field_guide(10, 2)
    with pytest.raises(ProgramError, match="holds 10 datapoints but got rows of a split of 4"):
        guide(torch.zeros(4, 5))
    with pytest.raises(ProgramError, match="for the train rows only and has none for the test split"):
        guide(Batch.of(torch.zeros(4, 5), torch.tensor([0, 3, 5, 9]), 10, split="test"))
    guide(torch.zeros(4, 5), idx=torch.tensor([0, 3, 5, 9]), num_data=10)  # with its rows it runs


def test_a_step_updates_only_the_batch_rows_with_lazy_adam_moments():
    """Two steps of fit's optimizers on disjoint batches A then B. Rows outside each batch must stay
    bit for bit: in particular A's rows in step 2, whose Adam moments are not zero. A dense Adam
    would move them (its moments decay and still push), and so would any weight decay."""
    num_data, latent_dim = 40, 3
    model, guide = mlp_vae(8, latent_dim, (16,)), mean_field_guide(num_data, latent_dim)
    x = torch.bernoulli(torch.full((num_data, 8), 0.4))
    params = [*model.parameters(), *guide.parameters()]
    optimizers = make_optimizers(params, [model, guide], lr=1e-3, local_lr=0.05)
    sparse_adam = optimizers[-1]
    assert isinstance(sparse_adam, torch.optim.SparseAdam)
    elbo = make_elbo("trace", 1)
    tables = (guide.table.weight,)

    def step(idx):
        loss = elbo.differentiable_loss(Program(model), Program(guide), Batch.of(x[idx], idx, num_data))
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    a, b, rest = torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 40)
    before = [t.detach().clone() for t in tables]
    step(a)
    after_a = [t.detach().clone() for t in tables]
    moments_a = [sparse_adam.state[t]["exp_avg"].clone() for t in tables]
    for old, new in zip(before, after_a):
        assert torch.equal(new[b], old[b]) and torch.equal(new[rest], old[rest])
        assert (new[a] != old[a]).any(dim=1).all(), "every row of the batch should move"
    step(b)
    for old, new, moment in zip(after_a, tables, moments_a):
        assert (moment[a] != 0).any(dim=1).all()
        assert torch.equal(new[a], old[a]), "a row outside the batch moved"
        assert torch.equal(new[rest], old[rest])
        assert (new[b] != old[b]).any(dim=1).all()
    for table, moment in zip(tables, moments_a):
        # lazy: A's first moments did not decay during step 2
        assert torch.equal(sparse_adam.state[table]["exp_avg"][a], moment[a])


def test_a_million_rows_of_50_dimensions_take_one_step_in_o_nd_memory():
    """A million rows: one table of (loc, raw scale) per row and SparseAdam's two moments of it are
    6 N D floats (1.1 GiB) and no other state of size N is kept; one step moves the batch's rows only."""
    num_data, latent_dim, batch = 1_000_000, 50, 128
    model, guide = mlp_vae(8, latent_dim, (16,)), mean_field_guide(num_data, latent_dim)
    optimizers = make_optimizers([*model.parameters(), *guide.parameters()], [model, guide], lr=1e-3)
    idx = torch.randperm(num_data)[:batch]
    x = torch.bernoulli(torch.full((batch, 8), 0.5))
    table = guide.table.weight
    before = table.detach().clone()
    make_elbo("trace", 1).differentiable_loss(Program(model), Program(guide), Batch.of(x, idx, num_data)).backward()
    assert table.grad.is_sparse and table.grad._nnz() == batch
    for opt in optimizers:
        opt.step()
    state = optimizers[-1].state
    floats = table.numel() + sum(state[table][k].numel() for k in ("exp_avg", "exp_avg_sq"))
    assert floats == 6 * num_data * latent_dim
    moved = (table.detach() != before).any(dim=1)
    assert torch.equal(moved.nonzero().flatten().sort().values, idx.sort().values)


def test_mean_field_training_on_digits_improves_the_elbo(digits):
    """Variational EM: after 12 epochs the ELBO on the training rows has risen by more than 10 nats
    (measured: from about -46 to -31)."""
    torch.manual_seed(0)
    model = mlp_vae(digits.num_pixels, 2, (64,))
    guide = mean_field_guide(digits.train.shape[0], 2)
    result = fit(model, guide, digits, FitConfig(epochs=12, progress=False, eval_every=1))
    elbos = [r["train_elbo"] for r in result.history]
    assert "test_elbo" not in result.final, "a mean-field guide has no q for held-out data"
    assert elbos[-1] > elbos[0] + 10, elbos
    # what fit recorded is the ELBO of the fitted guide on the first training rows
    torch.manual_seed(1)
    again = elbo_terms(model, guide, digits.batch("train", slice(0, 1000)), num_particles=100)["elbo"].mean()
    assert_close(again, elbos[-1], atol=0.5, msg="recorded train ELBO")


def test_semi_amortized_guide_with_no_steps_is_its_encoder():
    model, encoder = mlp_vae(8, 2, (16,)), mlp_guide(8, 2, (16,))
    guide = SemiAmortizedGuide(encoder, model, steps=0)
    x = torch.bernoulli(torch.full((5, 8), 0.5))
    torch.manual_seed(3)
    expected = log_weights(model, encoder, x, num_particles=4).log_w
    torch.manual_seed(3)
    assert_close(log_weights(model, guide, x, num_particles=4).log_w, expected, atol=1e-5)


@pytest.mark.parametrize("lr", [0.02, 0.05])
def test_refinement_raises_the_bound(digits, lr):
    """K natural-gradient steps from the encoder's q, of the default size and below it, raise each
    datapoint's ELBO on average. The bounds before and after share their random draws (common random
    numbers), so the mean gain is checked at 4 standard errors over datapoints (a chance failure about once in 30,000 runs)."""
    torch.manual_seed(0)
    model, encoder = mlp_vae(digits.num_pixels, 4, (64,)), mlp_guide(digits.num_pixels, 4, (64,))
    fit(model, encoder, digits, FitConfig(epochs=3, progress=False, eval_every=0))
    x = digits.test[:200]
    start = encoder.local_params(Batch.of(x))
    torch.manual_seed(1)
    before = elbo_terms(model, encoder, x, num_particles=200)["elbo"]
    for steps in (1, 5):
        refined = ParamsGuide(encoder.family, refine(model, x, start, encoder.family, steps, lr))
        torch.manual_seed(1)
        gain = elbo_terms(model, refined, x, num_particles=200)["elbo"] - before
        se = gain.std().item() / math.sqrt(len(gain))
        assert gain.mean() > 4 * se, f"K={steps}: gain {gain.mean():.4f} ± {se:.4f}"


def test_encoder_objective_reaches_the_encoder_only():
    """auxiliary_loss is -L[q_0] (the encoder's own ELBO, scaled as fit's loss) and its gradient
    is the encoder's gradient of that ELBO; the decoder gets none from it."""
    model, encoder = mlp_vae(8, 2, (16,)), mlp_guide(8, 2, (16,))
    guide = SemiAmortizedGuide(encoder, model, steps=2)
    batch = Batch.of(torch.bernoulli(torch.full((6, 8), 0.5)), torch.arange(6), 30)
    elbo = make_elbo("trace", 1)
    torch.manual_seed(5)
    expected = elbo.differentiable_loss(Program(model), Program(encoder), batch)
    expected_grads = torch.autograd.grad(expected, list(encoder.parameters()))
    torch.manual_seed(5)
    loss = guide.auxiliary_loss(elbo, Program(model), batch)
    loss.backward()
    assert_close(loss, expected, rtol=1e-6, msg="value")
    for p, g in zip(encoder.parameters(), expected_grads):
        assert_close(p.grad, g, atol=1e-6, msg="encoder gradient")
    assert all(p.grad is None for p in model.parameters())


def test_pvae_train_fits_the_three_guides(tmp_path):
    """The one command, three ways; every run records the training-row ELBO, which the curves draw."""
    common = ["--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--no-progress"]
    for guide, extra in [("mean-field", ["--local-lr", "0.05"]),
                         ("semi-amortized", ["--refine-steps", "2", "--refine-lr", "0.02"])]:
        out = tmp_path / guide
        assert cli.main(["train", "--guide", guide, *extra, *common, "--out", str(out)]) == 0
        history = read_metrics(out)
        assert len(history) == 2 and all(math.isfinite(r["train_elbo"]) for r in history)
        assert (out / "curves.png").is_file()
    config = (tmp_path / "semi-amortized" / "config.json").read_text()
    assert '"refine_steps": 2' in config and '"refine_lr": 0.02' in config
    assert '"local_lr": 0.05' in (tmp_path / "mean-field" / "config.json").read_text()
    history = read_metrics(tmp_path / "semi-amortized")
    assert "test_elbo" in history[-1], "a semi-amortized guide has a q for held-out data"
