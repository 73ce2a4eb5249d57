"""Fitting any Pyro model/guide pair by stochastic variational inference.

:func:`fit` maximizes the ELBO of ``model(x, idx, num_data)`` and ``guide(x, idx, num_data)`` (see
:mod:`pvae.plate`) over a :class:`~pvae.data.Dataset` held on the training device. It drives Pyro's
ELBO as a differentiable loss with torch's own optimizers: as fast as a hand-written loop (see
``benchmarks/fit_speed.py``), and the parameters of sparse embeddings (per-datapoint guides) get
``torch.optim.SparseAdam``, which touches only the rows of the batch.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pyro
import torch
from pyro import poutine
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .data import Dataset, batches
from .inference import KLWeight, batched, elbo_terms, inspect_programs, make_elbo
from .metrics import MetricsWriter
from .utils import rng_state, set_rng_state, set_seed, write_json

CONFIG_JSON = "config.json"


@dataclass
class FitConfig:
    """How to fit; saved in every run folder and checkpoint."""

    epochs: int = 100  # passes over the training set
    batch_size: int = 128
    lr: float = 1e-3  # Adam's learning rate
    # SparseAdam's learning rate for per-datapoint parameters (a mean-field guide's tables): each row
    # takes one step per epoch, not one per batch, so it needs larger steps than the decoder's
    local_lr: float = 3e-2
    elbo: str = "trace"  # "trace" (Trace_ELBO) or "analytic-kl" (TraceMeanField_ELBO)
    num_particles: int = 1  # samples of z per datapoint and step, vectorized
    beta: float = 1.0  # weight of the KL term once warmed up: 1 is the ELBO, > 1 a beta-VAE
    kl_warmup_epochs: float = 0.0  # raise the KL weight linearly from 0 to beta over these epochs
    seed: int = 0  # seeds Python, NumPy, torch and the batch order
    eval_every: int = 1  # epochs between evaluations of the train and test ELBO terms; 0: never
    eval_train_size: int = 5000  # training datapoints those evaluations use
    eval_batch_size: int = 1000
    checkpoint_every: int = 1  # epochs between checkpoints (with a run folder); the last always
    progress: bool = True  # a progress bar per epoch and a line per epoch
    # Pyro's validation (argument, support, shape and NaN checks) in every training step too; off, only
    # the first batch is checked (when validation is on, Pyro's default): the checks cost ~8% of a step
    validate: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_train_size", "checkpoint_every", "kl_warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.local_lr > 0:
            raise ValueError(f"local_lr must be positive, got {self.local_lr}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        make_elbo(self.elbo)  # names the choices if this one is unknown


@dataclass
class FitResult:
    """What :func:`fit` returns: the fitted programs, one metrics record per epoch, the run folder."""

    model: Callable
    guide: Callable
    history: list = field(default_factory=list)
    run_dir: Optional[Path] = None
    seconds: float = 0.0  # time spent in training steps, evaluation excluded
    steps: int = 0

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
    run_config: Optional[dict] = None,
    callbacks: Sequence[Callable] = (),
) -> FitResult:
    """Fit ``model`` and ``guide`` to ``data`` by SVI.

    :param model: a Pyro program ``model(x, idx=None, num_data=None)`` with a ``"data"`` plate
        (:func:`pvae.plate.data_plate`); its parameters are its own if it is an ``nn.Module``, and
        any ``pyro.param`` it declares.
    :param guide: the matching program for q(z | x). A guide with an attribute ``amortized = False``
        (per-datapoint parameters) is evaluated on training rows only. A guide with a method
        ``auxiliary_loss(elbo, x, idx, num_data)`` has the tensor it returns added to each step's
        loss (not to the recorded ``train_loss``): the objective of parameters the ELBO does not
        reach, such as a semi-amortized guide's encoder.
    :param data: a :class:`~pvae.data.Dataset`, or an ``(N, P)`` tensor of training data.
    :param out_dir: the run folder: ``config.json``, ``metrics.jsonl``, ``metrics.csv``,
        ``checkpoint.pt``; None keeps everything in memory.
    :param resume: continue the run in ``out_dir`` from its checkpoint; it gives the same metrics as
        an uninterrupted run. ``config.epochs`` may be raised to train longer.
    :param device: where to train; by default the data's device. Data and parameters are moved there.
    :param run_config: saved beside the fit config, so that a checkpoint can rebuild its own model
        (the command line stores its data and architecture choices here).
    :param callbacks: each called as ``callback(record, model, guide)`` after every epoch.

    Seeds every random generator from ``config.seed`` and clears Pyro's param store first; the
    initial weights are the programs' own, so seed (:func:`pvae.set_seed`) before building them for
    a run that repeats exactly.
    """
    config = config or FitConfig()
    data = _as_dataset(data)
    device = torch.device(device) if device is not None else data.train.device
    run_dir = Path(out_dir) if out_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT if run_dir is not None else None
    if resume and (checkpoint_path is None or not checkpoint_path.is_file()):
        raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    if not resume and checkpoint_path is not None and checkpoint_path.exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; resume it, or choose another folder (nothing was overwritten)"
        )
    _check_data_fits_likelihood(model, data)

    set_seed(config.seed)
    data = data.to(device)
    for program in (model, guide):
        if isinstance(program, nn.Module):
            program.to(device)
    num_data = data.train.shape[0]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dynamic = data.binarize == "dynamic"

    # A fixed, binarized sample of training rows for the per-epoch train metrics.
    eval_idx = torch.arange(min(config.eval_train_size, num_data), device=device)
    eval_x = data.train[eval_idx]
    if dynamic:
        eval_x = torch.bernoulli(eval_x, generator=torch.Generator(device=device).manual_seed(config.seed + 1))

    probe_x, probe_idx = eval_x[: config.batch_size], eval_idx[: config.batch_size]
    programs = inspect_programs(model, guide, probe_x, probe_idx, num_data)
    nesting = programs.plate_nesting
    # Pyro's own ELBO where the guide needs score-function terms; the same objective, leaner, where not
    elbo = make_elbo(config.elbo, config.num_particles, max(nesting, 1), reparameterized=programs.reparameterized)
    kl_weight = KLWeight(config.beta)
    weighted = config.beta != 1.0 or config.kl_warmup_epochs > 0
    model_fn, guide_fn = (kl_weight(model), kl_weight(guide)) if weighted else (model, guide)

    def loss_fn(xb, idx):
        return elbo.differentiable_loss(model_fn, guide_fn, xb, idx, num_data)

    # one step's loss on the first batch, under Pyro's global validation: the check FitConfig.validate keeps
    params = _collect_params(model, guide, loss_fn, probe_x, probe_idx)
    optimizers = _make_optimizers(model, guide, params, config.lr, config.local_lr)
    # a guide may train parameters that the ELBO does not reach (a semi-amortized guide's encoder)
    auxiliary_loss = getattr(guide, "auxiliary_loss", None)

    history, epoch0, step, seconds = [], 0, 0, 0.0
    if resume:
        state = load_checkpoint(checkpoint_path, map_location="cpu")
        _check_same_config(state["config"]["fit"], config)
        _load_state(state, model, guide, optimizers, generator)
        history, epoch0, step, seconds = state["history"], state["epoch"], state["step"], state["seconds"]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_JSON, {"fit": asdict(config), "run": run_config})
        writer = MetricsWriter(run_dir)

    steps_per_epoch = math.ceil(num_data / config.batch_size)
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    test_x = data.test if getattr(guide, "amortized", True) and data.test.shape[0] else None
    try:
        for epoch in range(epoch0 + 1, config.epochs + 1):
            _set_training(True, model, guide)
            loss_sum = torch.zeros((), device=device)
            start = time.perf_counter()
            bar = tqdm(
                batches(data.train, config.batch_size, generator, dynamic),
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{config.epochs}",
                disable=not config.progress,
                leave=False,
            )
            for idx, xb in bar:
                if warmup_steps:
                    kl_weight.weight = config.beta * min(1.0, (step + 1) / warmup_steps)
                with pyro.validation_enabled(config.validate):
                    loss = loss_fn(xb, idx)
                    if auxiliary_loss is None:
                        loss.backward()
                    else:
                        (loss + auxiliary_loss(elbo, xb, idx, num_data)).backward()
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - start
            seconds += epoch_seconds
            record = {
                "epoch": epoch,
                "step": step,
                "seconds": epoch_seconds,
                "elapsed": seconds,
                "kl_weight": kl_weight.weight if weighted else 1.0,
                # the training objective per datapoint (-ELBO at KL weight 1), averaged over the epoch
                "train_loss": loss_sum.item() / (steps_per_epoch * num_data),
            }
            if not math.isfinite(record["train_loss"]):
                kept = f"; {checkpoint_path} keeps the last finite epoch" if checkpoint_path is not None else ""
                raise FloatingPointError(
                    f"the training loss became {record['train_loss']} in epoch {epoch}: lower the learning rate "
                    f"(lr {config.lr}) or check the model's likelihood for values outside its support{kept}"
                )
            if config.eval_every and (epoch % config.eval_every == 0 or epoch == config.epochs):
                _set_training(False, model, guide)
                terms = {"train": (eval_x, eval_idx), "test": (test_x, None)}
                for split, (x, idx) in terms.items():
                    if x is not None:
                        values = batched(
                            lambda xb, ib: elbo_terms(model, guide, xb, ib, plate_nesting=nesting),
                            x, config.eval_batch_size, idx,
                        )
                        record.update({f"{split}_{k}": v.mean().item() for k, v in values.items()})
            history.append(record)
            if config.progress:
                tqdm.write(_summary(record))
            for callback in callbacks:
                callback(record, model, guide)
            if run_dir is not None:
                writer.write(history)
                if epoch == config.epochs or (config.checkpoint_every and epoch % config.checkpoint_every == 0):
                    save_checkpoint(checkpoint_path, {
                        "format": 1,
                        "epoch": epoch,
                        "step": step,
                        "seconds": seconds,
                        "history": history,
                        "config": {"fit": asdict(config), "run": run_config},
                        "model": _state_dict(model),
                        "guide": _state_dict(guide),
                        "optimizers": [opt.state_dict() for opt in optimizers],
                        "rng": rng_state(),
                        "generator": generator.get_state(),
                    })
    finally:
        if run_dir is not None:
            writer.close()
    _set_training(False, model, guide)
    return FitResult(model, guide, history, run_dir, seconds, step)


def _as_dataset(data) -> Dataset:
    if torch.is_tensor(data):
        if data.dim() != 2:
            raise ValueError(f"training data must be (N, P), got shape {tuple(data.shape)}")
        empty = data[:0]
        data = Dataset("tensor", (data.shape[1],), data, empty, empty)
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a pvae.data.Dataset or a tensor, not {type(data).__name__}")
    if data.train.shape[0] == 0:
        raise ValueError(f"data set {data.name!r} has no training datapoints")
    for split in ("train", "val", "test"):
        x = getattr(data, split)
        # a finite sum proves every value finite (NaN and inf propagate); only an overflowing sum
        # needs the elementwise look, ten times slower
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"the {split} split of {data.name!r} holds NaN or infinite values")
    return data


def _check_data_fits_likelihood(model, data: Dataset) -> None:
    likelihood = getattr(model, "likelihood", None)
    if not getattr(likelihood, "needs_binary_data", False) or data.is_binary:
        return
    if not bool(((data.train == 0) | (data.train == 1)).all()):
        raise ValueError(
            f"the {likelihood.name} likelihood needs binary data but {data.name!r} has grey levels: "
            "binarize it (static, dynamic or threshold) or use the continuous-bernoulli or gaussian likelihood"
        )


def _collect_params(model, guide, loss_fn, x, idx) -> list:
    """Every trainable tensor: the programs' own ``nn.Module`` parameters and every ``pyro.param``."""
    with poutine.trace(param_only=True) as capture, torch.no_grad():
        loss_fn(x, idx)
    found = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    for program in (model, guide):
        if isinstance(program, nn.Module):
            found.extend(program.parameters())
    unique = {id(p): p for p in found if p.requires_grad}
    if not unique:
        raise ValueError("the model and guide have no trainable parameters")
    return list(unique.values())


def _make_optimizers(model, guide, params, lr, local_lr=None) -> list:
    """Adam for dense parameters; SparseAdam for sparse embeddings (per-datapoint guides), whose
    steps touch only the rows of the batch and keep Adam moments per row."""
    sparse_ids = {
        id(m.weight)
        for program in (model, guide)
        if isinstance(program, nn.Module)
        for m in program.modules()
        if isinstance(m, nn.Embedding) and m.sparse
    }
    dense = [p for p in params if id(p) not in sparse_ids]
    sparse = [p for p in params if id(p) in sparse_ids]
    optimizers = []
    if dense:
        # fused: one kernel per step instead of a pass per Adam operation and parameter (~3x faster on CPU)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in dense) or None
        optimizers.append(torch.optim.Adam(dense, lr=lr, fused=fused))
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr if local_lr is None else local_lr))
    return optimizers


def _set_training(mode: bool, *programs) -> None:
    for program in programs:
        if isinstance(program, nn.Module):
            program.train(mode)


def _state_dict(program) -> dict:
    return program.state_dict() if isinstance(program, nn.Module) else {}


def _load_state(state, model, guide, optimizers, generator) -> None:
    for program, key in ((model, "model"), (guide, "guide")):
        if isinstance(program, nn.Module):
            program.load_state_dict(state[key])
    if len(state["optimizers"]) != len(optimizers):
        raise ValueError("the checkpoint's optimizers do not match this model and guide")
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    set_rng_state(state["rng"])
    generator.set_state(state["generator"])


def _check_same_config(saved: dict, config: FitConfig) -> None:
    now = asdict(config)
    differ = [k for k in now if k not in ("epochs", "progress", "validate") and saved.get(k) != now[k]]
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
        raise ValueError(f"cannot resume with a different fit config ({pairs}); only epochs may change")


def _summary(record: dict) -> str:
    parts = [f"epoch {record['epoch']:4d}", f"loss {record['train_loss']:.3f}"]
    for key in ("train_elbo", "test_elbo", "test_kl"):
        if key in record:
            parts.append(f"{key} {record[key]:.3f}")
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)
