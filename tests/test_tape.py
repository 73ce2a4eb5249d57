"""The recorded objective (pvae.tape): the value and gradient of Pyro's ELBO, and the plain path for
programs it cannot serve."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_close
from pyro.infer import Trace_ELBO
from torch import nn

import pvae
from pvae.guides import AmortizedGuide, MeanFieldGuide, SemiAmortizedGuide, mlp_guide
from pvae.inference import KLWeight, PvaeWarning, make_elbo
from pvae.models import mlp_vae
from pvae.programs import Batch, Program, inspect_programs
from pvae.protocols import is_static
from pvae.svi import SVIStep, collect_params
from pvae.tape import Tape, record

QUIET = dict(progress=False, eval_every=0)


class TwoSites(nn.Module):
    """A user's model with two latent sites, a side input y, a pyro.param and a positive site."""

    static_structure = True

    def __init__(self):
        super().__init__()
        self.top = nn.Linear(2 + 3, 4)
        self.decoder = nn.Linear(4 + 1, 12)

    def forward(self, x, y):
        shift = pyro.param("shift", torch.zeros(12))
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(self.top(torch.cat([z1, y], -1)), 0.5).to_event(1))
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(len(x), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(torch.cat([z2, s], -1)) + shift).to_event(1), obs=x)


def batches(n=4, rows=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.bernoulli(torch.full((rows, 12), 0.4), generator=g), torch.arange(i * rows, (i + 1) * rows),
                  100, {"y": torch.randn(rows, 3, generator=g)}, "train") for i in range(n)]


def test_a_replayed_step_has_the_value_and_gradient_of_pyros_elbo():
    """Recorded on one batch, replayed on another: the loss and every gradient equal Trace_ELBO's on the
    same draws, with the data plate's N/B and a KL weight."""
    model = TwoSites()
    guide = AmortizedGuide(model, hidden=(8,))
    first, *others = batches()
    m, g = Program(model), Program(guide, "guide")
    info = inspect_programs(m, g, first)
    params = collect_params(m, g, first)
    step = SVIStep(m, g, make_elbo("trace", 1, info), [], params, kl_weight=KLWeight(0.7), tape=True)
    with pyro.validation_enabled(False):
        for batch in (first, first):  # the key's second run records it
            step.loss(batch)
        assert len(step.tape.recordings) == 1
        for batch in others:  # the first replay is checked against a plain run, the others are not
            torch.manual_seed(5)
            ours = step.loss(batch)
            our_grads = torch.autograd.grad(ours, params)
            torch.manual_seed(5)
            weight = KLWeight(0.7)
            theirs = Trace_ELBO(max_plate_nesting=1).differentiable_loss(weight(m), weight(g), batch)
            their_grads = torch.autograd.grad(theirs, params)
            assert_close(ours, theirs, rtol=1e-6, msg="loss")
            for a, b in zip(our_grads, their_grads):
                assert_close(a, b, rtol=1e-5, atol=1e-6, msg="gradient")
    assert step.tape.recordings[next(iter(step.tape.recordings))].verified and not step.tape.off


@pytest.mark.parametrize("guide_name", ["amortized", "mean-field", "planar", "full-covariance", "two-layer"])
def test_fit_with_the_tape_gives_the_same_run_as_without(guide_name):
    """Bit for bit: the same draws, the same steps, the same weights; through KL warm-up (a weight that
    changes every step is never recorded) and the last, smaller batch of each epoch; for guides of
    every family and a model with two stochastic layers."""
    from pvae.guides.flows import FullCovariance, PlanarFlow
    from pvae.models.two_layer import two_layer_vae

    data = pvae.load_dataset("digits", binarize="static")
    runs = {}
    for tape in ("never", "auto"):
        pvae.set_seed(0)
        model = two_layer_vae(64, (3, 2), (16, 8)) if guide_name == "two-layer" else mlp_vae(64, 2, (16,))
        guide = {"amortized": lambda: mlp_guide(64, 2, (16,)), "mean-field": lambda: MeanFieldGuide(model),
                 "planar": lambda: mlp_guide(64, 2, (16,), family=PlanarFlow(2)),
                 "full-covariance": lambda: mlp_guide(64, 2, (16,), family=FullCovariance()),
                 "two-layer": lambda: AmortizedGuide(model, hidden=(16,))}[guide_name]()
        config = pvae.FitConfig(epochs=3, batch_size=256, kl_warmup_epochs=1, tape=tape, **QUIET)
        result = pvae.fit(model, guide, data, config)
        runs[tape] = ([r["train_loss"] for r in result.history], [p.detach() for p in guide.parameters()])
    assert is_static(model) and is_static(guide)
    assert runs["never"][0] == runs["auto"][0]
    for a, b in zip(runs["never"][1], runs["auto"][1]):
        assert torch.equal(a, b)


class Branching(nn.Module):
    """A program whose operations depend on the data's values: no recording may serve it."""

    def __init__(self, how: str):
        super().__init__()
        self.decoder = nn.Linear(2, 12)
        self.how, self.calls = how, 0

    def forward(self, x):
        self.calls += 1
        logits = self.decoder
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            out = logits(z)
            if self.how == "reads values" and x.mean() > 0.4:  # bool(tensor): a value read into Python
                out = out + 1.0
            if self.how == "counts calls":  # Python state that changes between steps
                out = out * (1.0 + self.calls % 2)
            pyro.sample("x", dist.Bernoulli(logits=out).to_event(1), obs=x)


@pytest.mark.parametrize("how", ["reads values", "counts calls"])
def test_programs_a_recording_cannot_serve_run_plainly(how):
    """Recorded on the user's word (tape="always"): the recording refuses a value read into Python, the
    check of the first replay catches a computation that changed; either way a PvaeWarning says so and
    the fit goes on as without the tape (for the program that counts its calls, the check's own call
    is one more, so its run differs)."""
    data = pvae.Dataset.from_tensors(torch.bernoulli(torch.full((60, 12), 0.45)))
    runs = {}
    for tape in ("never", "always"):
        pvae.set_seed(0)
        model = Branching(how)
        guide = AmortizedGuide(model, hidden=(8,))
        config = pvae.FitConfig(epochs=2, batch_size=10, tape=tape, **QUIET)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pvae.fit(model, guide, data, config)
        runs[tape] = [r["train_loss"] for r in result.history]
        said = [str(w.message) for w in caught if issubclass(w.category, PvaeWarning)]
        assert bool(said) == (tape == "always"), said
    assert "not recorded" in said[0] and ("reads a tensor's values" in said[0]) == (how == "reads values")
    if how == "reads values":
        assert runs["never"] == runs["always"]


def test_which_programs_are_recorded():
    model = mlp_vae(64, 2, (8,))
    assert is_static(model) and is_static(mlp_guide(64, 2, (8,))) and is_static(MeanFieldGuide(model))
    assert not is_static(pvae.models.VAE(nn.Linear(2, 64), pvae.models.likelihoods.Bernoulli(), 2))
    assert not is_static(AmortizedGuide(model, body=nn.Linear(64, 8)))
    assert not is_static(SemiAmortizedGuide(mlp_guide(64, 2, (8,)), model))
    assert not is_static(Branching("reads values"))
    with pytest.raises(ValueError, match="tape 'sometimes' is unknown"):
        pvae.FitConfig(tape="sometimes")


def test_record_refuses_unrecorded_tensors_and_values_read_into_python():
    w = torch.ones(3, requires_grad=True)
    cached = 2 * w  # computed from a parameter before the recording: a replay would use a stale value

    def uses_cache(x):
        return (cached * x).sum()

    def autograd_inside(x):  # torch.autograd.grad is itself a recorded torch function
        (g,) = torch.autograd.grad((w**2 * x).sum(), w, create_graph=True)
        return (g * x).sum()

    def item_inside(x):
        return x * float(x.sum())

    x = torch.randn(3)
    for fn, says in ((uses_cache, "not recorded"), (item_inside, "reads a tensor's values")):
        result, recording, problem = record(fn, [x])
        assert recording is None and says in problem
    _, recording, _ = record(autograd_inside, [x])
    assert_close(recording.replay([2 * x]), autograd_inside(2 * x), atol=1e-6, msg="a replayed autograd call")
    tape = Tape()
    for _ in range(2):
        tape(lambda t: (w * t).sum(), "key", [x])
    assert_close(tape(lambda t: (w * t).sum(), "key", [2 * x]), (2 * x).sum(), atol=1e-6)


class Twice(torch.autograd.Function):
    """A custom autograd function: a recording sees the operations of its forward, without gradients."""

    @staticmethod
    def forward(ctx, t):
        return 2 * t

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_record_refuses_a_custom_autograd_function():
    """Its forward runs without gradients inside the recording: replayed, the objective would have no
    gradient through it."""
    w = torch.ones(3, requires_grad=True)
    _, recording, problem = record(lambda x: Twice.apply(w * x).sum(), [torch.randn(3)])
    assert recording is None and "torch.autograd.Function" in problem


def test_a_recording_drops_views_that_change_nothing_and_keeps_constants_as_computed():
    """A VAE's recording has no same-shape expand/reshape/broadcast and no call on the prior's zeros and
    ones, and its replay keeps the value and gradient (on another batch, other draws alike)."""
    model, guide = mlp_vae(12, 2, (8,)), mlp_guide(12, 2, (8,))
    first, second = (Batch(b.x, b.idx, 100, {}, "train") for b in batches(2))
    m, g = Program(model), Program(guide, "guide")
    info = inspect_programs(m, g, first)
    params = collect_params(m, g, first)
    elbo = make_elbo("trace", 1, info)
    fn = lambda x, idx: elbo.differentiable_loss(m, g, Batch(x, idx, 100, {}, "train"))  # noqa: E731
    with pyro.validation_enabled(False):
        _, recording, problem = record(fn, [first.x, first.idx])
        assert problem is None
        names = [c.func.__name__ for c in recording.calls]
        assert not {"expand", "reshape", "broadcast_tensors", "new_zeros"} & set(names), names
        assert "linear" in names and "normal_" in names
        torch.manual_seed(3)
        ours = recording.replay([second.x, second.idx])
        torch.manual_seed(3)
        theirs = fn(second.x, second.idx)
    assert_close(ours, theirs, rtol=1e-6, msg="loss")
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        assert_close(a, b, rtol=1e-5, atol=1e-6, msg="gradient")


def test_what_is_not_a_constant_is_not_kept():
    """``x.new_zeros`` is a constant until a program adds into it in place (each replay must start from
    zeros again); a tensor the program reads but did not make (a buffer set between steps) is read
    afresh; a reshape that changes the shape stays; ``y = x - 0`` stays where ``y`` is written into."""
    w = torch.ones(3, requires_grad=True)
    temperature = torch.tensor(1.0)

    def accumulates(x):
        total = x.new_zeros(3)
        total += x
        return (w * total).sum()

    def reads_a_buffer(x):
        return (w * x * (temperature * 2)).sum()

    def reshapes(x):
        return (w * x.reshape(2, 3)).sum()

    def writes_into_a_difference(x):  # y = base - 0 is not base when y is written into
        base = w * x
        y = base - x.new_zeros(3)
        y.mul_(2)
        return (base + y).sum()

    x = torch.randn(3)
    for fn, data in ((accumulates, x), (reads_a_buffer, x), (reshapes, torch.randn(6)), (writes_into_a_difference, x)):
        _, recording, problem = record(fn, [data])
        assert problem is None
        for scale in (2.0, 3.0):
            temperature.fill_(scale)
            assert_close(recording.replay([scale * data]), fn(scale * data), atol=1e-6, msg=fn.__name__)


def test_adding_a_constant_zero_or_multiplying_by_a_constant_one_is_dropped():
    """x - 0 and x * 1 are x (a standard normal prior's loc and scale); 0 - x and x * 2 stay."""
    w = torch.ones(3, requires_grad=True)

    def neutral(x):
        return ((w * x - x.new_zeros(3)) * x.new_ones(3)).sum()

    def not_neutral(x):
        return ((x.new_zeros(3) - w * x) * x.new_full((3,), 2.0)).sum()

    x = torch.randn(3)
    for fn, left in ((neutral, {"mul", "sum"}), (not_neutral, {"mul", "sub", "mul", "sum"})):
        _, recording, problem = record(fn, [x])
        assert problem is None and {c.func.__name__ for c in recording.calls} == left, recording.source
        ours = recording.replay([2 * x])
        (grad,) = torch.autograd.grad(ours, w)
        theirs = fn(2 * x)
        assert_close(ours, theirs, atol=1e-6, msg=fn.__name__)
        assert_close(grad, torch.autograd.grad(theirs, w)[0], atol=1e-6, msg=fn.__name__)
