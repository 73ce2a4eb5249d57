"""What the ranks of tests/test_distributed.py run: two gloo processes on 127.0.0.1, spawned by the test.

Each rank runs :data:`SCENARIOS` in order in one process group and saves what it ends with to
``<folder>/<scenario>-<rank>.pt``, which the test compares with one process. The programs are here, so
that the test and the ranks build the same ones.
"""

import datetime
import os
import signal
import traceback
from contextlib import contextmanager
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to

import pvae
from pvae.guides import MeanFieldGuide, mlp_guide
from pvae.models import mlp_vae

N, P = 37, 4  # an odd N: the ranks own 19 and 18 rows, and their batches differ in size
NOISE = torch.randn(N, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
GLOBAL_NOISE = 0.3


class Tiny(torch.nn.Module):
    """A global noise scale s, a local z per datapoint and a linear decoder: every kind of parameter."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(2, P)

    def forward(self, x):
        s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), s).to_event(1), obs=x)


class FixedNoise(Messenger):
    """Reparameterized draws whose noise is fixed per datapoint (``NOISE[idx]``) and for the global site:
    the ELBO becomes a deterministic function of the parameters, whichever rank computes it."""

    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in ("z", "s"):
            return
        normal = msg["fn"]
        while not isinstance(normal, dist.Normal):
            normal = normal.base_dist
        eps = NOISE[self.idx] if msg["name"] == "z" else GLOBAL_NOISE
        msg["value"] = biject_to(msg["fn"].support)(normal.loc + normal.scale * eps)


class FixedNoiseMeanField(MeanFieldGuide):
    def call_batch(self, batch):
        with FixedNoise(batch.idx):
            return super().call_batch(batch)


def tiny_data() -> torch.Tensor:
    return torch.randn(N, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@contextmanager
def float64():
    """Float64 throughout (the guide's tables too), so that sums in another order agree to 1e-12."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def fit_tiny(batch_size: int, epochs: int, out=None, resume: bool = False, model_class=None, init_seed: int = 0,
             callbacks=()):
    """The deterministic fit: the tiny model, its mean-field guide with fixed noise, in float64; the
    decoder's initial weights from ``init_seed``."""
    with float64():
        pvae.set_seed(init_seed)
        model = (model_class or Tiny)()
        guide = FixedNoiseMeanField(model)
        config = pvae.FitConfig(epochs=epochs, batch_size=batch_size, lr=0.05, local_lr=0.1, eval_every=0, progress=False)
        result = pvae.fit(model, guide, tiny_data(), config, out_dir=out, resume=resume, callbacks=callbacks)
    return model, guide, result.history


def tiny_state(model, guide, history) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "globals": {k: v.detach().clone() for k, v in guide.globals_.state_dict().items()},
            "table": guide.table.weight.detach().clone(), "train_loss": [r["train_loss"] for r in history]}


def digits():
    return pvae.load_dataset("digits", binarize="static")


class FirstNoise(pvae.Callback):
    """The first numbers the steps' noise will come from (the random state is put back), and whether the
    steps replayed a recorded objective (pvae.tape)."""

    def on_fit_start(self, state):
        before = torch.get_rng_state()
        self.noise = torch.randn(4)
        torch.set_rng_state(before)

    def on_fit_end(self, state):
        tape = state.step.tape
        self.recorded = tape is not None and not tape.off and any(r.verified for r in tape.recordings.values())


def fit_vae(batch_size: int, epochs: int, seed: int = 0, callbacks=()):
    """A small VAE on the digits with its usual Monte Carlo objective, evaluated every epoch."""
    pvae.set_seed(seed)
    model, guide = mlp_vae(64, 2, (32,)), mlp_guide(64, 2, (32,))
    config = pvae.FitConfig(epochs=epochs, batch_size=batch_size, lr=3e-3, seed=seed, eval_train_size=500, progress=False)
    result = pvae.fit(model, guide, digits(), config, callbacks=callbacks)
    return model, guide, result.history


class Failing(Tiny):
    """Raises in the step whose batch holds datapoint 35, which rank 1 owns (and does not probe)."""

    def forward(self, x):
        if bool((x == tiny_data()[35]).all(-1).any()):
            raise ValueError("the model broke on datapoint 35")
        return super().forward(x)


def scenario_equal(folder: Path, rank: int) -> dict:
    """Rank 1 builds its decoder from another seed: the fit starts every rank from rank 0's weights."""
    return tiny_state(*fit_tiny(3, 2, out=folder / "two-ranks", init_seed=rank))


def scenario_resume(folder: Path, rank: int) -> dict:
    """One epoch with two ranks, then a second after resuming with two ranks."""
    fit_tiny(3, 1, out=folder / "resumed")
    return tiny_state(*fit_tiny(3, 2, out=folder / "resumed", resume=True))


def restored_tiny(out, epochs: int) -> tuple:
    """``(model, guide, why)``: the tiny programs with the checkpoint in ``out`` restored into them by a
    resume that asks for the ``epochs`` the run has done, which the fit then refuses (``why``)."""
    with float64():
        pvae.set_seed(0)
        model = Tiny()
        guide = FixedNoiseMeanField(model)
        config = pvae.FitConfig(epochs=epochs, batch_size=3, lr=0.05, local_lr=0.1, eval_every=0, progress=False)
        try:
            pvae.fit(model, guide, tiny_data(), config, out_dir=out, resume=True)
        except ValueError as e:
            return model, guide, str(e)
    return model, guide, None


def scenario_from_one(folder: Path, rank: int) -> dict:
    """Restore the one-process run the test saved in ``one-rank`` on two ranks."""
    model, guide, refused = restored_tiny(folder / "one-rank", 1)
    return {**tiny_state(model, guide, []), "refused": refused}


def scenario_vae(folder: Path, rank: int) -> dict:
    first = FirstNoise()
    model, guide, history = fit_vae(32, 3, callbacks=[first])
    return {"history": history, "model": model.state_dict(), "guide": guide.state_dict(), "noise": first.noise,
            "recorded": first.recorded}


class TermAfterFirstEpoch(pvae.Callback):
    """Sends this process SIGTERM at the end of the first epoch, as a scheduler stopping one rank would."""

    def on_epoch_end(self, state, record):
        if record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def scenario_stop(folder: Path, rank: int) -> dict:
    """SIGTERM reaches rank 1 alone, after epoch 1: both ranks stop at the same step, the checkpoint is
    saved there, and the resumed run ends where an uninterrupted one does."""
    try:
        fit_tiny(3, 3, out=folder / "stopped", callbacks=[TermAfterFirstEpoch()] if rank == 1 else [])
    except KeyboardInterrupt as e:
        stopped = str(e)
    else:
        stopped = None
    resumed = tiny_state(*fit_tiny(3, 3, out=folder / "stopped", resume=True))
    straight = tiny_state(*fit_tiny(3, 3, out=folder / "straight"))
    return {"stopped": stopped, "resumed": resumed, "straight": straight}


def scenario_fail(folder: Path, rank: int) -> dict:
    try:
        fit_tiny(3, 2, model_class=Failing)
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


SCENARIOS = {  # in this order; "fail" leaves the process group broken, so it comes last
    "equal": scenario_equal, "resume": scenario_resume, "from_one": scenario_from_one, "vae": scenario_vae,
    "stop": scenario_stop, "fail": scenario_fail,
}


def run_rank(rank: int, size: int, port: int, folder: str) -> None:
    """One rank: join the group on 127.0.0.1, run every scenario, save each one's result."""
    folder = Path(folder)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        with pyro.validation_enabled(True):
            for name, scenario in SCENARIOS.items():
                try:
                    result = scenario(folder, rank)
                except Exception:
                    result = {"crashed": traceback.format_exc()}
                torch.save(result, folder / f"{name}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
