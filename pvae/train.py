"""Fitting any Pyro model/guide pair by stochastic variational inference.

:func:`fit` is a loop over epochs of seeded minibatches held on the training device; each batch is one
:class:`~pvae.svi.SVIStep`. What else happens during a fit plugs in as a :class:`Callback`: the
per-epoch evaluation of the train and test ELBO (:class:`EvaluateEpochs`), the run folder with its
config, metrics and checkpoints (:class:`pvae.run.RunFolder`), latent-space snapshots, your own. The
loop knows no file names.

Called on every rank of a ``torch.distributed`` process group, :func:`fit` trains data-parallel (see
:mod:`pvae.distributed`): each rank takes its share of every batch of R x ``batch_size`` rows, the
steps all-reduce the gradients, and rank 0 alone writes the run folder and prints.
"""

import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import pyro
import torch
from tqdm.auto import tqdm

from .data import Dataset, batches
from .distributed import GradientSync, RowTables, Shard, World, check_backend, current_world, next_fit_key
from .errors import ConfigError, Interrupted
from .inference import ELBOS, STREAM_OBJECTIVES, TC_ESTIMATORS, KLWeight, ReparamELBO, batched, elbo_terms, make_elbo
from .programs import Batch, Program, ProgramInfo, inspect_programs
from .protocols import AuxiliaryObjective, EpochMetrics, PerDatapoint, ShardedRows, has_q_for, is_static
from .svi import SVIStep, collect_params, make_optimizers, program_modules
from .utils import dataclass_from_dict, set_seed


TAPES = ("auto", "always", "never")


@dataclass
class FitConfig:
    """How to fit; saved in every run folder and checkpoint."""

    # the defaults are the demo's (pvae train on the 8x8 digits), chosen for its pictures in ten seconds
    epochs: int = 50  # passes over the training set
    batch_size: int = 64  # per rank: a data-parallel fit's batches have (ranks x batch_size) rows
    lr: float = 3e-3  # Adam's learning rate
    # SparseAdam's learning rate for per-datapoint parameters (a mean-field guide's tables): each row
    # takes one step per epoch, not one per batch, so it needs larger steps than the decoder's
    local_lr: float = 3e-2
    # a name in pvae.inference.ELBOS: auto, trace, analytic-kl, enum, iwae, dreg or tc. auto, the closed-form KL
    # where it is exact, learns as well as a hand-written loop; trace, every term by Monte Carlo, was 1.1 nats
    # short of one (README, Benchmarks: learning parity)
    elbo: str = "auto"
    num_particles: int = 1  # samples of z per datapoint and step, vectorized; the K of iwae and dreg
    beta: float = 1.0  # weight of the KL term once warmed up: 1 is the ELBO, > 1 a beta-VAE
    tc_beta: float = 1.0  # elbo "tc": the weight of the total correlation (beta-TCVAE); 1 is the ELBO
    tc_estimator: str = "mws"  # elbo "tc": q(z) from the minibatch, "mws" or "stratified"
    kl_warmup_epochs: float = 0.0  # raise the KL weight linearly from 0 to beta over these epochs
    seed: int = 0  # seeds Python, NumPy, torch, the guides' initial weights and the batch order
    eval_every: int = 1  # epochs between evaluations of the train and test ELBO terms; 0: never
    eval_train_size: int = 5000  # training datapoints those evaluations use
    eval_batch_size: int = 1000
    checkpoint_every: int = 1  # epochs between checkpoints (with a run folder); the last always
    progress: bool = True  # a progress bar per epoch and a line per epoch
    # Pyro's validation (argument, support, shape and NaN checks) in every training step too; off, only
    # the first step is checked (when validation is on, Pyro's default)
    validate: bool = False
    # record the objective once per batch shape and replay it (pvae.tape): "auto" for programs that declare
    # the same operations on every batch (pvae's own models and guides), "always" (yours, on your word), "never"
    tape: str = "auto"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_train_size", "checkpoint_every", "kl_warmup_epochs"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(name, f"must be >= 0 and finite, got {getattr(self, name)}")
        for name in ("lr", "local_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(name, f"must be positive and finite, got {getattr(self, name)}")
        if not 0 <= self.beta < math.inf:
            raise ConfigError("beta", f"must be >= 0 and finite, got {self.beta}")
        if self.elbo not in ELBOS:
            raise ConfigError("elbo", f"{self.elbo!r} is unknown: choose one of {', '.join(ELBOS)}")
        if not 0 <= self.tc_beta < math.inf:
            raise ConfigError("tc_beta", f"must be >= 0 and finite, got {self.tc_beta}")
        if self.tc_estimator not in TC_ESTIMATORS:
            raise ConfigError("tc_estimator", f"{self.tc_estimator!r} is unknown: choose one of {', '.join(TC_ESTIMATORS)}")
        if self.elbo in STREAM_OBJECTIVES and (self.beta != 1.0 or self.kl_warmup_epochs):
            raise ConfigError("elbo", f"{self.elbo!r} has no KL weight: drop beta (--beta) and kl_warmup_epochs "
                              "(--kl-warmup); the beta-TCVAE weights the total correlation by tc_beta (--tc-beta)")

        if self.tape not in TAPES:
            raise ConfigError("tape", f"{self.tape!r} is unknown: choose one of {', '.join(TAPES)}")

    @classmethod
    def from_dict(cls, d: dict, where: Optional[str] = None) -> "FitConfig":
        """The config a run folder saved, checked: unknown keys and wrong types are refused by name."""
        return dataclass_from_dict(cls, d, where, "fit")


@dataclass
class FitState:
    """Where a fit stands: what callbacks read, and what a resumed run restores."""

    model: Program
    guide: Program
    step: SVIStep
    data: Dataset
    config: FitConfig
    info: ProgramInfo
    generator: torch.Generator
    history: list = field(default_factory=list)
    epoch: int = 0  # epochs done
    steps: int = 0
    seconds: float = 0.0  # in training steps, evaluation excluded
    progress: Optional["EpochProgress"] = None  # the epoch under way, when a fit stopped inside it
    world: World = field(default_factory=World)  # the ranks of a data-parallel fit; one process by default
    shard: Optional[Shard] = None  # this rank's part of every batch; None: all of it
    tables: Optional[RowTables] = None  # per-datapoint tables spread over the ranks, gathered by checkpoints

    @property
    def num_data(self) -> int:
        return self.data.train.shape[0]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_data / (self.config.batch_size * self.world.size))


@dataclass
class EpochProgress:
    """How far an epoch went before a fit stopped inside it: enough to go on with the same batches, the
    same random draws and the same sums as a fit that never stopped."""

    batches: int  # batches done
    generator: torch.Tensor  # the batch generator's state when the epoch began
    losses: torch.Tensor  # (batches,) their losses
    seconds: float  # spent in them


class Callback:
    """Hooks of the fitting loop; each does nothing unless overridden."""

    def on_fit_start(self, state: FitState) -> None: ...

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        """After each epoch, in the order the callbacks were given: earlier ones may add to ``record``."""

    def on_fit_error(self, state: FitState, error: BaseException) -> None:
        """The fit stops with ``error``: a divergence, a failed write, an :class:`~pvae.errors.Interrupted`
        (whose ``state`` is consistent, at a step boundary, when ``error.resumable``). Save what is safe to
        save, and say what was saved with :func:`pvae.errors.add_note`. Before :meth:`on_fit_end`."""

    def on_fit_end(self, state: FitState) -> None: ...


class _EpochFunction(Callback):
    """A plain function ``callback(record, model, guide)`` after every epoch (on rank 0 only)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_epoch_end(self, state, record):
        if state.world.is_main:
            self.fn(record, state.model.fn, state.guide.fn)


@dataclass
class FitResult:
    """What :func:`fit` returns: the fitted programs, one metrics record per epoch, the run folder."""

    model: Callable
    guide: Callable
    history: list = field(default_factory=list)
    run_dir: Optional[Path] = None
    seconds: float = 0.0  # time spent in training steps, evaluation excluded
    steps: int = 0
    info: Optional[ProgramInfo] = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def fit(
    model: Callable,
    guide: Callable,
    data,
    config: Optional[FitConfig] = None,
    out_dir=None,
    resume: bool = False,
    device=None,
    callbacks: Sequence = (),
    run_config: Optional[dict] = None,
    factory=None,
) -> FitResult:
    """Fit ``model`` and ``guide`` to ``data`` by SVI.

    :param model: a Pyro program ``model(x, ...)`` whose datapoints are in a plate named ``"data"``
        (see :mod:`pvae.programs`); parameters: its own if it is an ``nn.Module`` (or a bound method of
        one), whatever it registers with ``pyro.module``, and any ``pyro.param``.
    :param guide: the matching program for q(z | x), with the model's arguments; or one of
        :mod:`pvae.guides`, built from the model.
    :param data: a :class:`~pvae.data.Dataset` (with side inputs, passed to the programs' parameters of
        their names), or an ``(N, ...)`` tensor of training data.
    :param out_dir: the run folder (:class:`pvae.run.RunFolder`): ``config.json``, ``metrics.jsonl``,
        ``metrics.csv``, ``checkpoint.pt``; None keeps everything in memory.
    :param resume: continue the run in ``out_dir`` from its checkpoint; it gives the same metrics as
        an uninterrupted run. ``config.epochs`` may be raised to train longer.
    :param device: where to train; by default the data's device. Data and parameters are moved there.
    :param callbacks: :class:`Callback` s (on every rank of a data-parallel fit; ``state.world`` says
        which), or functions ``callback(record, model, guide)`` called after every epoch (on rank 0).
    :param run_config: saved in the run folder's config beside the fit config (the command line saves
        its data and architecture choices here, from which ``pvae evaluate RUN`` rebuilds the run).
    :param factory: how to rebuild the programs, saved with the run so that ``pvae evaluate RUN`` and
        ``pvae compare RUN`` can: a function ``factory(data)`` returning the model or ``(model, guide)``,
        or its ``"module:function"`` / ``"path/to/file.py:function"``.

    Seeds every random generator from ``config.seed`` and clears Pyro's param store first; guides that
    build their parameters at the first call (:mod:`pvae.guides`) build them then, from that seed.

    Inside a ``torch.distributed`` process group of R ranks, call it on every rank with the same
    arguments (``device``: this rank's, e.g. ``cuda:LOCAL_RANK`` with NCCL): the fit is data-parallel
    (see :mod:`pvae.distributed`), its steps those of one process with batches of R x ``batch_size``
    rows; every rank starts from rank 0's weights and returns the same fitted programs (a mean-field
    guide holds its rank's rows), and rank 0 alone writes ``out_dir``.
    """
    from .run import RunFolder, run_config_for

    config = config or FitConfig()
    world = current_world()
    key = next_fit_key()
    with world.together():  # no collective inside: a failure on any rank stops every rank here
        data = as_dataset(data)
        device = torch.device(device) if device is not None else data.train.device
        if world.distributed:
            check_backend(device)
        _check_data_fits_likelihood(model, data)

        set_seed(config.seed)
        data = data.to(device)
        model, guide = Program(model, "model"), Program(guide, "guide")
        for program in (model, guide):
            for module in program_modules(program):
                module.to(device)
        shard = world.shard(by_row=isinstance(guide.fn, PerDatapoint))
        if shard is not None and shard.by_row:
            if not isinstance(guide.fn, ShardedRows):
                raise ValueError(f"the guide {type(guide.fn).__name__} has per-datapoint parameters but cannot hold one "
                                 "rank's rows of them (pvae.protocols.ShardedRows): fit it in one process")
            guide.fn.hold_rows(shard)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        probe = _probe(data, config, shard, device)
        # one run builds lazily set-up guides and checks the programs; it is the first step's validation too
        info = inspect_programs(model, guide, probe, dependency_rows=SETUP_ROWS)
        params = collect_params(model, guide, probe.rows(slice(0, SETUP_ROWS)))  # a few rows find every parameter
        modules = [m for p in (model, guide) for m in program_modules(p)]
        tables = RowTables(guide.fn.row_tables(), data.train.shape[0], shard) if shard is not None and shard.by_row else None
        weighted = config.beta != 1.0 or config.kl_warmup_epochs > 0
        elbo = make_elbo(config.elbo, config.num_particles, info, config.tc_beta, config.tc_estimator)
        step = SVIStep(
            model, guide, elbo, make_optimizers(params, modules, config.lr, config.local_lr), params,
            kl_weight=KLWeight(config.beta) if weighted else None, validate=config.validate,
            sync=GradientSync(params, [] if tables is None else guide.fn.row_tables()) if world.distributed else None,
            tape=_use_tape(config, model, guide, elbo),
        )
    if world.distributed:  # every rank starts from rank 0's weights, then draws noise of its own
        world.broadcast([p for p in params if p not in tables] if tables is not None else params)
        world.broadcast([b for m in modules for b in m.buffers()])
        world.seed(config.seed)
    state = FitState(model, guide, step, data, config, info, generator, world=world, shard=shard, tables=tables)

    hooks = [EvaluateEpochs(config)] if config.eval_every else []
    hooks += [c if isinstance(c, Callback) else _EpochFunction(c) for c in callbacks]
    if out_dir is not None:
        hooks.append(RunFolder(out_dir, resume, run_config if run_config is not None else run_config_for(data, factory)))
    elif resume:
        raise ValueError("resume needs out_dir, the run folder to continue")
    try:
        with world.together():
            for hook in hooks:
                hook.on_fit_start(state)
        with StopRequests() as stop:
            _loop(state, hooks, stop)
    except BaseException as error:
        for hook in hooks:
            hook.on_fit_error(state, error)
        stopped = world.failed(error, key) if isinstance(error, Exception) else None
        if stopped is not None:  # the ranks are out of step: name the one that stopped the others
            raise stopped from error
        raise
    finally:
        for hook in hooks:
            hook.on_fit_end(state)
    for module in modules:
        module.eval()
    return FitResult(model.fn, guide.fn, state.history, Path(out_dir) if out_dir is not None else None,
                     state.seconds, state.steps, info)


SETUP_ROWS = 8  # what the set-up reads that does not depend on the batch's size, it reads on this many rows


def _probe(data: Dataset, config: FitConfig, shard: Optional[Shard], device) -> Batch:
    """The first batch's worth of this rank's training rows: what lazily built guides are set up from."""
    rows = torch.arange(data.train.shape[0], device=device) if shard is None else shard.rows(data.train.shape[0], device)
    probe = data.batch("train", rows[: config.batch_size])
    if data.binarize == "dynamic":
        probe = Batch(torch.bernoulli(probe.x, generator=torch.Generator(device=device).manual_seed(config.seed + 1)),
                      probe.idx, probe.num_data, probe.inputs, probe.split)
    return probe


# a loss per datapoint beyond this many nats per observed value, either sign, is no model's: the fit
# diverged (a Bernoulli pixel costs that much only at logits of 1e4; float32 densities stay far below)
MAX_NATS_PER_VALUE = 1e4


def _loop(state: FitState, hooks: list, stop: "StopRequests") -> None:
    config, step = state.config, state.step
    device = state.data.train.device
    steps_per_epoch = state.steps_per_epoch
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    progress = config.progress and state.world.is_main
    modules = [m for p in (state.model, state.guide) for m in program_modules(p)]
    for epoch in range(state.epoch + 1, config.epochs + 1):
        for module in modules:
            module.train()
        # the steps' losses stay on the device until the epoch ends: no host synchronization per step
        losses = []
        done, seconds = 0, 0.0
        if state.progress is not None:  # resumed inside this epoch: the same batches from its start
            done, seconds = state.progress.batches, state.progress.seconds
            state.generator.set_state(state.progress.generator)
            losses = list(state.progress.losses.to(device).unbind())
            state.progress = None
        epoch_generator = state.generator.get_state()
        start = time.perf_counter()
        bar = tqdm(batches(state.data, config.batch_size, state.generator, shard=state.shard), total=steps_per_epoch,
                   desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        for i, batch in enumerate(bar):
            if i < done:  # drawn, as their random draws must be, and done already
                continue
            signum = state.world.stop_signal(stop.signum, state.steps)  # the ranks stop at the same step
            if signum is not None:  # between steps, where the state is whole
                if i > done:
                    state.progress = EpochProgress(i, epoch_generator, torch.stack(losses),
                                                   seconds + time.perf_counter() - start)
                raise Interrupted(signum, f"in epoch {epoch} after {i} of its {steps_per_epoch} steps "
                                  f"(step {state.steps})", resumable=True)
            if warmup_steps:
                step.kl_weight.weight = config.beta * min(1.0, (state.steps + 1) / warmup_steps)
            losses.append(step(batch))
            state.steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        bar.close()
        losses = torch.stack(losses).tolist()
        _check_divergence(state, losses, epoch)
        state.seconds += seconds
        state.epoch = epoch
        record = {
            "epoch": epoch,
            "step": state.steps,
            "seconds": seconds,
            "elapsed": state.seconds,
            "kl_weight": step.kl_weight.weight if step.kl_weight is not None else 1.0,
            # the training objective per datapoint (-ELBO at this KL weight), averaged over the epoch
            "train_loss": math.fsum(losses) / (steps_per_epoch * state.num_data),
        }
        for module in modules:
            module.eval()
        state.history.append(record)  # hooks add to the record in place
        for hook in hooks:
            hook.on_epoch_end(state, record)
        if progress:
            tqdm.write(_summary(record))
    if stop.signum is not None:  # asked to stop during the last epoch's evaluation or checkpoint
        raise Interrupted(stop.signum, f"after the last epoch, {state.epoch}", resumable=True, complete=True)


def _check_divergence(state: FitState, losses: list, epoch: int) -> None:
    """Stop a fit whose loss left the plausible range or turned NaN, or whose parameters did (a NaN
    gradient on a finite loss), naming the epoch and the step."""
    first_step = state.steps - len(losses) + 1
    values_per_datapoint = state.data.train[0].numel()
    bound = MAX_NATS_PER_VALUE * values_per_datapoint
    advice = (f"lower the learning rate (lr {state.config.lr}) or check the model's likelihood for values "
              "outside its support")
    for i, loss in enumerate(losses):
        per_datapoint = loss / state.num_data
        if abs(per_datapoint) <= bound:
            continue
        if math.isfinite(per_datapoint):
            what = (f"the loss per datapoint reached {per_datapoint:.3g}, beyond any plausible value "
                    f"({MAX_NATS_PER_VALUE:g} nats for each of its {values_per_datapoint} values)")
        else:
            what = f"the loss became {per_datapoint}"
        raise FloatingPointError(f"the fit diverged in epoch {epoch} at step {first_step + i}: {what}: {advice}")
    params = state.step.params
    finite = torch.stack([torch.isfinite(p.detach()).all().to(params[0].device) for p in params]).tolist()
    if not all(finite):
        name = _param_names(state).get(id(params[finite.index(False)]), "a parameter")
        raise FloatingPointError(
            f"the fit diverged in epoch {epoch} by step {state.steps}: {name} holds NaN or infinite values while "
            f"the loss stayed finite (a NaN gradient): {advice}")


def _param_names(state: FitState) -> dict:
    """``{id(tensor): name}`` of the trainable tensors, for messages."""
    names = {}
    for role, program in (("model", state.model), ("guide", state.guide)):
        for module in program_modules(program):
            names.update({id(p): f"{role} parameter {n!r}" for n, p in module.named_parameters()})
    names.update({id(p): f"pyro.param {n!r}" for n, p in pyro.get_param_store().named_parameters()})
    return names


class StopRequests:
    """SIGINT and SIGTERM while a fit runs: the first asks the loop to stop at the next step boundary
    (``signum`` is set), where the fit's state is whole and can be saved; a second stops at once, as
    Python would. Installed only in the main thread, and not over a signal set to be ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, "at once, by a second signal", resumable=False)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class EvaluateEpochs(Callback):
    """The ELBO and its parts on a fixed sample of training rows and on the test split, every
    ``eval_every`` epochs and after the last, added to the epoch's record as ``train_elbo``,
    ``test_recon``, ... (per datapoint; with global latent sites ``train_elbo`` includes the global KL's
    share, ``global_kl / N``, so that it is the negated training objective at KL weight 1). A guide with
    no q for held-out data (mean-field) gets the train terms only. An objective that measures more
    (:class:`~pvae.protocols.EpochMetrics`: the beta-TCVAE's mutual information, total correlation and
    dimension-wise KL) adds its figures on the training rows as ``train_<name>``. In a data-parallel fit
    each rank evaluates its share of the rows (:meth:`~pvae.distributed.Shard.rows`) and the terms are
    gathered."""

    def __init__(self, config: FitConfig):
        self.config = config

    def on_fit_start(self, state):
        config, device = self.config, state.data.train.device
        rows = torch.arange(min(config.eval_train_size, state.num_data), device=device)
        batch = state.data.batch("train", rows)
        if state.data.binarize == "dynamic":  # one fixed binary draw, so that epochs compare
            g = torch.Generator(device=device).manual_seed(config.seed + 1)
            batch = Batch(torch.bernoulli(batch.x, generator=g), batch.idx, batch.num_data, batch.inputs, batch.split)
        self.splits = {"train": batch}
        if state.data.test.shape[0] and has_q_for(state.guide.fn, "test"):
            self.splits["test"] = state.data.batch("test")
        if state.shard is not None:  # this rank's rows; the test split has no per-datapoint tables to follow
            self.splits = {split: b.rows(state.shard.rows(len(b), device) if split == "train" else
                                         replace(state.shard, by_row=False).rows(len(b), device))
                           for split, b in self.splits.items()}

    def on_epoch_end(self, state, record):
        epoch, every = record["epoch"], self.config.eval_every
        if epoch % every and epoch != self.config.epochs:
            return
        for split, batch in self.splits.items():
            terms = batched(lambda b: elbo_terms(state.model, state.guide, b, info=state.info), batch,
                            self.config.eval_batch_size) if len(batch) else {}
            terms = state.world.gather_rows(terms)
            global_kl = terms.pop("global_kl")
            for key, value in terms.items():
                record[f"{split}_{key}"] = value.mean().item()
            if state.info.global_:
                record[f"{split}_global_kl"] = global_kl.item()
                if split == "train":
                    record["train_elbo"] -= global_kl.item() / state.num_data
        objective = state.step.elbo
        if isinstance(objective, EpochMetrics):  # in a data-parallel fit, on each rank's own rows
            for key, value in objective.epoch_metrics(state.model, state.guide, self.splits["train"]).items():
                record[f"train_{key}"] = value


def as_dataset(data) -> Dataset:
    """A :class:`~pvae.data.Dataset` from ``data`` (or a tensor: its training split), checked."""
    if torch.is_tensor(data):
        if data.dim() < 2:
            raise ValueError(f"training data must have one row per datapoint, (N, ...), got shape {tuple(data.shape)}")
        data = Dataset.from_tensors(data)
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a pvae.data.Dataset or a tensor, not {type(data).__name__}")
    if data.train.shape[0] == 0:
        raise ValueError(f"data set {data.name!r} has no training datapoints")
    for split in ("train", "val", "test"):
        x = data.split(split)[0]
        # a finite sum proves every value finite (NaN and inf propagate); only an overflowing sum
        # needs the elementwise look, ten times slower
        if x.is_floating_point() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"the {split} split of {data.name!r} holds NaN or infinite values")
    return data


def _use_tape(config: FitConfig, model: Program, guide: Program, elbo) -> bool:
    """Whether the step records its objective and replays it: reparameterized guides (ReparamELBO), no
    validation in every step, no auxiliary objective (whose gradients are taken inside the guide), and
    programs that declare the same operations on every batch, or ``tape="always"``."""
    if config.tape == "never" or config.validate or not isinstance(elbo, ReparamELBO):
        return False
    if isinstance(guide.fn, AuxiliaryObjective):
        return False
    return config.tape == "always" or (is_static(model) and is_static(guide))


def _check_data_fits_likelihood(model, data: Dataset) -> None:
    likelihood = getattr(model, "likelihood", None)
    if not getattr(likelihood, "needs_binary_data", False) or data.is_binary:
        return
    if not bool(((data.train == 0) | (data.train == 1)).all()):
        raise ValueError(
            f"the {likelihood.name} likelihood needs binary data but {data.name!r} has grey levels: "
            "binarize it (static, dynamic or threshold) or use the continuous-bernoulli or gaussian likelihood"
        )


def _summary(record: dict) -> str:
    parts = [f"epoch {record['epoch']:4d}", f"loss {record['train_loss']:.3f}"]
    for key in ("train_elbo", "test_elbo", "test_kl", "train_tc"):
        if key in record:
            parts.append(f"{key} {record[key]:.3f}")
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)

