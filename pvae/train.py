"""Fitting any Pyro model/guide pair by stochastic variational inference.

:func:`fit` is a loop over epochs of seeded minibatches held on the training device; each batch is one
:class:`~pvae.svi.SVIStep`. What else happens during a fit plugs in as a :class:`Callback`: the
per-epoch evaluation of the train and test ELBO (:class:`EvaluateEpochs`), the run folder with its
config, metrics and checkpoints (:class:`pvae.run.RunFolder`), latent-space snapshots, your own. The
loop knows no file names.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data import Dataset, batches
from .inference import ELBOS, KLWeight, ReparamELBO, batched, elbo_terms, make_elbo
from .programs import Batch, Program, ProgramInfo, inspect_programs
from .protocols import AuxiliaryObjective, has_q_for, is_static
from .svi import SVIStep, collect_params, make_optimizers, program_modules
from .utils import set_seed


TAPES = ("auto", "always", "never")


@dataclass
class FitConfig:
    """How to fit; saved in every run folder and checkpoint."""

    epochs: int = 100  # passes over the training set
    batch_size: int = 128
    lr: float = 1e-3  # Adam's learning rate
    # SparseAdam's learning rate for per-datapoint parameters (a mean-field guide's tables): each row
    # takes one step per epoch, not one per batch, so it needs larger steps than the decoder's
    local_lr: float = 3e-2
    elbo: str = "trace"  # "trace", "analytic-kl" or "enum" (see pvae.inference.make_elbo)
    num_particles: int = 1  # samples of z per datapoint and step, vectorized
    beta: float = 1.0  # weight of the KL term once warmed up: 1 is the ELBO, > 1 a beta-VAE
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
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_train_size", "checkpoint_every", "kl_warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "local_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if not 0 <= self.beta < math.inf:
            raise ValueError(f"beta must be >= 0 and finite, got {self.beta}")
        if self.elbo not in ELBOS:
            raise ValueError(f"unknown ELBO {self.elbo!r}: choose one of {', '.join(ELBOS)}")
        if self.tape not in TAPES:
            raise ValueError(f"unknown tape {self.tape!r}: choose one of {', '.join(TAPES)}")


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

    @property
    def num_data(self) -> int:
        return self.data.train.shape[0]


class Callback:
    """Hooks of the fitting loop; each does nothing unless overridden."""

    def on_fit_start(self, state: FitState) -> None: ...

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        """After each epoch, in the order the callbacks were given: earlier ones may add to ``record``."""

    def on_fit_end(self, state: FitState) -> None: ...


class _EpochFunction(Callback):
    """A plain function ``callback(record, model, guide)`` after every epoch."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_epoch_end(self, state, record):
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
    :param callbacks: :class:`Callback` s, or functions ``callback(record, model, guide)`` called after
        every epoch.
    :param run_config: saved in the run folder's config beside the fit config (the command line saves
        its data and architecture choices here, from which ``pvae evaluate RUN`` rebuilds the run).
    :param factory: how to rebuild the programs, saved with the run so that ``pvae evaluate RUN`` and
        ``pvae compare RUN`` can: a function ``factory(data)`` returning the model or ``(model, guide)``,
        or its ``"module:function"`` / ``"path/to/file.py:function"``.

    Seeds every random generator from ``config.seed`` and clears Pyro's param store first; guides that
    build their parameters at the first call (:mod:`pvae.guides`) build them then, from that seed.
    """
    from .run import RunFolder, run_config_for

    config = config or FitConfig()
    data = as_dataset(data)
    device = torch.device(device) if device is not None else data.train.device
    _check_data_fits_likelihood(model, data)

    set_seed(config.seed)
    data = data.to(device)
    model, guide = Program(model, "model"), Program(guide, "guide")
    for program in (model, guide):
        for module in program_modules(program):
            module.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    probe = data.batch("train", torch.arange(min(config.batch_size, data.train.shape[0]), device=device))
    if data.binarize == "dynamic":
        probe = Batch(torch.bernoulli(probe.x, generator=torch.Generator(device=device).manual_seed(config.seed + 1)),
                      probe.idx, probe.num_data, probe.inputs, probe.split)
    # one run builds lazily set-up guides and checks the programs; it is the first step's validation too
    info = inspect_programs(model, guide, probe)
    params = collect_params(model, guide, probe)
    modules = [m for p in (model, guide) for m in program_modules(p)]
    weighted = config.beta != 1.0 or config.kl_warmup_epochs > 0
    elbo = make_elbo(config.elbo, config.num_particles, info)
    step = SVIStep(
        model, guide, elbo, make_optimizers(params, modules, config.lr, config.local_lr), params,
        kl_weight=KLWeight(config.beta) if weighted else None, validate=config.validate,
        tape=_use_tape(config, model, guide, elbo),
    )
    state = FitState(model, guide, step, data, config, info, generator)

    hooks = [EvaluateEpochs(config)] if config.eval_every else []
    hooks += [c if isinstance(c, Callback) else _EpochFunction(c) for c in callbacks]
    if out_dir is not None:
        hooks.append(RunFolder(out_dir, resume, run_config if run_config is not None else run_config_for(data, factory)))
    elif resume:
        raise ValueError("resume needs out_dir, the run folder to continue")
    for hook in hooks:
        hook.on_fit_start(state)
    try:
        _loop(state, hooks)
    finally:
        for hook in hooks:
            hook.on_fit_end(state)
    for module in modules:
        module.eval()
    return FitResult(model.fn, guide.fn, state.history, Path(out_dir) if out_dir is not None else None,
                     state.seconds, state.steps, info)


def _loop(state: FitState, hooks: list) -> None:
    config, step = state.config, state.step
    device = state.data.train.device
    steps_per_epoch = math.ceil(state.num_data / config.batch_size)
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    modules = [m for p in (state.model, state.guide) for m in program_modules(p)]
    for epoch in range(state.epoch + 1, config.epochs + 1):
        for module in modules:
            module.train()
        loss_sum = torch.zeros((), device=device)
        start = time.perf_counter()
        bar = tqdm(batches(state.data, config.batch_size, state.generator), total=steps_per_epoch,
                   desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False)
        for batch in bar:
            if warmup_steps:
                step.kl_weight.weight = config.beta * min(1.0, (state.steps + 1) / warmup_steps)
            loss_sum += step(batch)
            state.steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        state.seconds += seconds
        state.epoch = epoch
        record = {
            "epoch": epoch,
            "step": state.steps,
            "seconds": seconds,
            "elapsed": state.seconds,
            "kl_weight": step.kl_weight.weight if step.kl_weight is not None else 1.0,
            # the training objective per datapoint (-ELBO at this KL weight), averaged over the epoch
            "train_loss": loss_sum.item() / (steps_per_epoch * state.num_data),
        }
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(
                f"the training loss became {record['train_loss']} in epoch {epoch}: lower the learning rate "
                f"(lr {config.lr}) or check the model's likelihood for values outside its support"
            )
        for module in modules:
            module.eval()
        state.history.append(record)  # hooks add to the record in place
        for hook in hooks:
            hook.on_epoch_end(state, record)
        if config.progress:
            tqdm.write(_summary(record))


class EvaluateEpochs(Callback):
    """The ELBO and its parts on a fixed sample of training rows and on the test split, every
    ``eval_every`` epochs and after the last, added to the epoch's record as ``train_elbo``,
    ``test_recon``, ... (per datapoint; with global latent sites ``train_elbo`` includes the global KL's
    share, ``global_kl / N``, so that it is the negated training objective at KL weight 1). A guide with
    no q for held-out data (mean-field) gets the train terms only."""

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

    def on_epoch_end(self, state, record):
        epoch, every = record["epoch"], self.config.eval_every
        if epoch % every and epoch != self.config.epochs:
            return
        for split, batch in self.splits.items():
            terms = batched(lambda b: elbo_terms(state.model, state.guide, b, info=state.info), batch,
                            self.config.eval_batch_size)
            global_kl = terms.pop("global_kl")
            for key, value in terms.items():
                record[f"{split}_{key}"] = value.mean().item()
            if state.info.global_:
                record[f"{split}_global_kl"] = global_kl.item()
                if split == "train":
                    record["train_elbo"] -= global_kl.item() / state.num_data


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
    for key in ("train_elbo", "test_elbo", "test_kl"):
        if key in record:
            parts.append(f"{key} {record[key]:.3f}")
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)

