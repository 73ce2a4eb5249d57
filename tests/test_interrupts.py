"""A run never loses good work: SIGINT and SIGTERM save the step they reached and resume from it; a run
killed at any moment (SIGKILL, in a checkpoint write too) resumes to the metrics of a run never
stopped; a diverged run keeps its last finite checkpoint and says which."""

import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pvae
from pvae.checkpoint import CHECKPOINT, load_checkpoint
from pvae.cli import main
from pvae.errors import Interrupted
from pvae.guides import mlp_guide
from pvae.metrics import read_metrics
from pvae.models import mlp_vae

QUIET = dict(progress=False)
RUN = ["--hidden", "16", "--batch-size", "256", "--binarize", "dynamic", "--no-progress", "--no-figures"]  # 6 steps an epoch


def without_times(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in history]


@pytest.fixture(autouse=True)
def sigint_as_python_sets_it():
    """SIGINT with Python's own handler, as in a terminal: a shell that starts the suite in the
    background (``make test &``) leaves SIGINT ignored, and a fit rightly leaves an ignored signal alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_default() -> None:  # in a child process before it runs: SIGINT as a terminal gives it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def signal_at(signum: int, n: int, twice: bool = False):
    """Send ``signum`` to this process as the ``n``-th optimizer step begins (the n-th training step of
    a fit with one optimizer): the step runs to its end. With ``twice``, send it twice at once."""
    steps = []

    def hook(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == n:
            signal.raise_signal(signum)
            if twice:
                signal.raise_signal(signum)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def digits():
    return pvae.load_dataset("digits", binarize="dynamic")


def fit_digits(data, out, epochs=3, resume=False):
    pvae.set_seed(0)  # the initial weights
    model, guide = mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,))
    config = pvae.FitConfig(epochs=epochs, batch_size=256, kl_warmup_epochs=2, **QUIET)
    return pvae.fit(model, guide, data, config, out_dir=out, resume=resume)


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return fit_digits(digits, out), load_checkpoint(out)


def test_sigint_inside_an_epoch_saves_that_step_and_resumes_to_the_uninterrupted_run(digits, uninterrupted, tmp_path):
    whole, whole_state = uninterrupted
    # the signal comes during step 9, the third of epoch 2: the step ends, the fit stops and saves
    with pytest.raises(Interrupted, match=r"interrupted by SIGINT in epoch 2 after 3 of its 6 steps \(step 9\)") as e, \
            signal_at(signal.SIGINT, 9):
        fit_digits(digits, tmp_path)
    assert e.value.__notes__ == ["saved step 9, 3 steps into epoch 2"] and e.value.exit_code == 130
    saved = load_checkpoint(tmp_path)
    assert (saved["epoch"], saved["step"], saved["progress"]["batches"]) == (1, 9, 3)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]

    resumed = fit_digits(digits, tmp_path, resume=True)
    assert without_times(resumed.history) == without_times(whole.history)
    after = load_checkpoint(tmp_path)
    for name, value in whole_state["programs"]["modules"]["guide"][0].items():
        assert torch.equal(after["programs"]["modules"]["guide"][0][name], value), name
    assert "progress" not in after
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the fit gives the handler back"


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(digits, tmp_path):
    fit_digits(digits, tmp_path, epochs=1)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(Interrupted, match="interrupted by SIGTERM at once, by a second signal") as e, \
            signal_at(signal.SIGTERM, 2, twice=True):
        fit_digits(digits, tmp_path, epochs=3, resume=True)
    assert e.value.__notes__ == [f"{tmp_path / CHECKPOINT} keeps epoch 1 (step 6)"]
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_a_nan_gradient_on_an_epochs_last_step_keeps_the_previous_checkpoint(tmp_path):
    """The loss stays finite while a gradient turns NaN, on the last step of epoch 2 (evaluation off):
    the fit stops naming the parameter, and the checkpoint of epoch 1 is left as it was."""
    x = torch.randn(50, 3)
    poison = {"on": False}

    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        # d sqrt(u)/du is infinite at u = 0 and du/dloc = 0: the gradient is inf * 0 = NaN, the value 0
        bad = torch.sqrt(loc.sum() - loc.sum()) if poison["on"] and x.shape[0] == 10 else 0.0
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(loc + z + bad, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))

    def arm(record, model, guide):
        poison["on"] = record["epoch"] == 1

    config = pvae.FitConfig(epochs=3, batch_size=20, eval_every=0, **QUIET)  # batches of 20, 20, 10
    with pytest.raises(FloatingPointError, match=r"diverged in epoch 2 by step 6: pyro.param 'loc' holds NaN .* "
                                                 r"while the loss stayed finite \(a NaN gradient\)") as e:
        pvae.fit(model, guide, x, config, out_dir=tmp_path, callbacks=[arm])
    assert e.value.__notes__ == [f"{tmp_path / CHECKPOINT} keeps epoch 1 (step 3)"]
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1 and torch.isfinite(saved["programs"]["param_store"]["loc"]).all()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]


def test_a_loss_beyond_any_plausible_value_stops_the_fit_naming_epoch_and_step(tmp_path):
    x = torch.randn(40, 3)
    blow_up = {"on": False}

    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(loc + z, 1.0).to_event(1), obs=x)
            if blow_up["on"]:  # a finite loss of 1e9 nats per datapoint of 3 values: no model's
                pyro.factor("far", x.new_full((len(x),), -1e9))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))

    def arm(record, model, guide):
        blow_up["on"] = True

    with pytest.raises(FloatingPointError, match=r"diverged in epoch 2 at step 3: the loss per datapoint reached "
                                                 r"1e\+09, beyond any plausible value") as e:
        pvae.fit(model, guide, x, pvae.FitConfig(epochs=3, batch_size=20, **QUIET), out_dir=tmp_path, callbacks=[arm])
    assert e.value.__notes__ == [f"{tmp_path / CHECKPOINT} keeps epoch 1 (step 2)"]


# ----------------------------------------------------------------------------- the command line

FACTORY = """
import os, signal
from torch.optim.optimizer import register_optimizer_step_pre_hook
from pvae.guides import mlp_guide
from pvae.models import mlp_vae


def build(data):
    model, guide = mlp_vae(64, 2, (16,)), mlp_guide(64, 2, (16,))
    if os.environ.get("SIGNAL_AT"):  # "signum@n": sent as this fit's n-th optimizer step begins
        signum, n = map(int, os.environ.pop("SIGNAL_AT").split("@"))
        steps = []

        mine = {id(p) for p in model.parameters()}

        def hook(optimizer, args, kwargs):  # this fit's optimizer only: the hook outlives the fit
            if any(id(p) in mine for p in optimizer.param_groups[0]["params"]):
                steps.append(1)
                if len(steps) == n:
                    signal.raise_signal(signum)

        register_optimizer_step_pre_hook(hook)
    return model, guide
"""


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    """The uninterrupted command-line run of a factory whose guide can send a signal during a step."""
    folder = tmp_path_factory.mktemp("factory")
    (folder / "signalling.py").write_text(FACTORY)
    argv = ["train", "--model", f"{folder / 'signalling.py'}:build", "--epochs", "3", *RUN]
    start = time.perf_counter()
    assert main([*argv, "--out", str(folder / "whole")]) == 0
    return argv, read_metrics(folder / "whole"), time.perf_counter() - start


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_pvae_train_interrupted_saves_says_how_to_resume_and_resumes(signum, code, factory_run, tmp_path, monkeypatch, capsys):
    argv, whole, _ = factory_run
    run = tmp_path / "run"
    monkeypatch.setenv("SIGNAL_AT", f"{int(signum)}@10")
    assert main([*argv, "--out", str(run)]) == code
    (line,) = capsys.readouterr().err.strip().splitlines()
    name = signal.Signals(signum).name
    assert line == (f"pvae train: interrupted by {name} in epoch 2 after 4 of its 6 steps (step 10); saved step 10, "
                    f"4 steps into epoch 2; continue with: pvae train --resume --out {run}")
    assert main(["train", "--resume", "--out", str(run), "--no-progress", "--no-figures"]) == 0
    assert without_times(read_metrics(run)) == without_times(whole)


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_metrics(factory_run, tmp_path):
    """Child ``pvae train`` processes, killed by SIGKILL at seeded random moments and in the middle of a
    checkpoint write (each write pauses 50 ms between the data and the rename, a testing hook), or
    stopped by SIGINT; each is then resumed (from its first step, when it was killed before its first
    checkpoint)."""
    argv, whole, seconds = factory_run
    env = {**os.environ, "PVAE_TESTING_WRITE_PAUSE": "0.05"}
    rng = random.Random(0)
    span = seconds + 9 * 0.05  # the run, and the pauses of its 9 writes after config.json
    trials = [("kill", rng.uniform(0, span)), ("kill", rng.uniform(0, span)), ("kill", "in a write"),
              ("sigint", rng.uniform(0, span))]
    for i, (how, when) in enumerate(trials):
        run = tmp_path / f"run{i}"
        child = subprocess.Popen([sys.executable, "-m", "pvae", *argv, "--out", str(run)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=_sigint_default)
        deadline = time.monotonic() + 120
        while not (run / "config.json").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the child has imported torch and is about to train
        if when == "in a write":
            while not list(run.glob(f".{CHECKPOINT}.*.tmp")) and child.poll() is None:
                time.sleep(0.005)
            assert child.poll() is None, "the child finished before a checkpoint write was seen"
        else:
            time.sleep(when)
        child.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        err = child.communicate(timeout=120)[1]
        if how == "sigint":  # saved and said so; or it had finished (a signal after main() returned ends Python)
            assert child.returncode in (130, 0, -signal.SIGINT), err
            assert child.returncode != 130 or "continue with: pvae train --resume --out" in err, err
        else:
            assert child.returncode == -signal.SIGKILL
        if when == "in a write":
            assert list(run.glob(f".{CHECKPOINT}.*.tmp")), "killed in the middle of a checkpoint write"
        done = load_checkpoint(run)["epoch"] if (run / CHECKPOINT).exists() else 0  # 0: killed before the first
        metrics = read_metrics(run) if (run / "metrics.jsonl").exists() else []
        assert all(r["epoch"] <= done for r in metrics), "metrics never run ahead of the checkpoint"
        # a finished run is refused (nothing to do), and its metrics caught up with its checkpoint
        code = main(["train", "--resume", "--out", str(run), "--no-progress", "--no-figures"])
        assert code == (2 if done == 3 else 0), f"trial {i} ({how} at {when})"
        assert without_times(read_metrics(run)) == without_times(whole), f"trial {i} ({how} at {when})"
        assert not list(run.glob(".*.tmp")), "what the killed writes left is cleaned up"
