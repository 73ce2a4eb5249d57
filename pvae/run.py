"""The run folder: one layer owns what a fit leaves on disk, and reads it back.

:class:`RunFolder` plugs into :func:`pvae.fit` as a callback: it writes ``config.json`` once, the
metrics after every epoch, and the checkpoint (whose layout, the *schema*, is defined here and
nowhere else); on resume it restores the fit's state from the checkpoint before the first epoch.
:func:`load_run` rebuilds a run's data and programs from its folder (through the command line's
:mod:`pvae.registry`, or from programs you pass) and loads every trained tensor into them.

The checkpoint holds every trainable tensor: the state dicts of the programs' modules (a program that
is an ``nn.Module``, or a bound method of one), the whole Pyro param store (``pyro.param`` and
``pyro.module`` registrations, unconstrained, with their constraints' names), the optimizers' states,
every random generator's state, the history and the config. It is written atomically and read with
``torch.load(weights_only=True)``: nothing in it is unpickled.

In a data-parallel fit rank 0 alone writes the folder. Its checkpoint is the one a single process would
write: per-datapoint tables and their optimizer moments are gathered whole from the ranks that hold
their rows, so that a run saved with N ranks resumes with M; it adds each rank's random state, which a
rank resuming with the same number restores. Every rank reads the checkpoint to resume (the run folder
must be on a filesystem every node sees).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pyro
import torch

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .data import Dataset
from .distributed import RowTables
from .errors import ConfigError, Interrupted, add_note, message
from .metrics import CSV, JSONL, MetricsWriter, read_metrics
from .programs import Batch, Program, ProgramInfo, inspect_programs
from .svi import program_modules
from .train import Callback, EpochProgress, FitConfig, FitState
from .utils import remove_temporaries, rng_state, set_rng_state, write_json

CONFIG_JSON = "config.json"
FORMAT = 2


def run_config_for(data: Dataset, factory=None) -> Optional[dict]:
    """What a run fitted from Python records to be rebuilt: the data set's source and the programs'
    factory, where both are known."""
    from .registry import factory_spec

    spec = factory_spec(factory) if factory is not None else None
    if data.source is None and spec is None:
        return None
    return {**(data.source or {"dataset": None}), "labels_as": (data.source or {}).get("labels_as"),
            "model": spec, "guide": None}


# ----------------------------------------------------------------------------- the checkpoint schema


def program_state(model: Program, guide: Program, tables: Optional[RowTables] = None) -> dict:
    """Every trainable tensor of the programs, as plain tensors and strings; per-datapoint ``tables``
    spread over ranks are gathered whole on rank 0 (every rank calls it then)."""
    whole = (lambda t: t.detach()) if tables is None else (lambda t: (tables.gather(t) if t in tables else t).detach())
    store = pyro.get_param_store().get_state()
    return {
        "modules": {role: [{k: whole(v) for k, v in m.state_dict(keep_vars=True).items()} for m in program_modules(p)]
                    for role, p in (("model", model), ("guide", guide))},
        "param_store": {name: whole(value) for name, value in store["params"].items()},
        "constraints": {name: str(c) for name, c in store["constraints"].items()},
    }


def restore_programs(model: Program, guide: Program, saved: dict, where: str = "the checkpoint",
                     tables: Optional[RowTables] = None) -> None:
    """Load what :func:`program_state` saved into programs that have run once (so that lazily built
    guides and every ``pyro.param`` exist); tensors are copied in place, keeping optimizers' references.
    With ``tables``, each per-datapoint table takes this rank's rows of the saved whole one."""
    mine = (lambda now, value: value) if tables is None else (
        lambda now, value: tables.take(value) if now in tables else value)
    for role, program in (("model", model), ("guide", guide)):
        modules, states = program_modules(program), saved["modules"][role]
        if len(modules) != len(states):
            raise ValueError(f"{where} holds {len(states)} {role} module(s), but this {role} has {len(modules)}")
        for module, state in zip(modules, states):
            now = module.state_dict(keep_vars=True)
            state = {k: mine(now[k], v) if k in now else v for k, v in state.items()}
            try:
                module.load_state_dict(state)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise ValueError(f"{where} does not fit this {role}'s weights ({first}): was it trained with "
                                 "another architecture?") from None
    store = pyro.get_param_store()
    params = store.get_state()["params"]
    missing = [name for name in saved["param_store"] if name not in params]
    if missing:
        raise ValueError(f"{where} holds pyro.param(s) {', '.join(missing)} that these programs do not declare")
    with torch.no_grad():
        for name, value in saved["param_store"].items():
            value = mine(params[name], value)
            if params[name].shape != value.shape:
                raise ValueError(f"pyro.param {name!r} has shape {tuple(params[name].shape)} here but "
                                 f"{tuple(value.shape)} in {where}")
            params[name].copy_(value)


class RunFolder(Callback):
    """The run folder of a fit: ``config.json`` (once), ``checkpoint.pt`` (every ``checkpoint_every``
    epochs and after the last) and then ``metrics.jsonl`` and ``metrics.csv`` (every epoch).

    When the fit stops, it says which checkpoint the folder keeps, or that there is none; a fit
    interrupted between two steps (SIGINT, SIGTERM) is saved at that step, and resumes there; a run that
    stopped before its first checkpoint (it has its ``config.json``) resumes from its first step. A
    checkpoint is written only from finite tensors, so a diverged fit keeps the last good one. The
    temporary files of writes that a killed run left are removed when the next fit starts.
    In a data-parallel fit it runs on every rank, since checkpoints gather the per-datapoint tables,
    and rank 0 writes.
    """

    def __init__(self, path, resume: bool = False, run_config: Optional[dict] = None):
        self.path = Path(path)
        self.resume = resume
        self.run_config = run_config
        self.checkpoint = self.path / CHECKPOINT
        self.writer = None
        self.saved = None  # (epochs done, step) of the checkpoint on disk, once the fit has started
        self.in_epoch = None  # steps into the next epoch of that checkpoint, when it stopped inside one
        self.started = False  # on_fit_start ran to its end

    def on_fit_start(self, state: FitState) -> None:
        main = state.world.is_main
        if main and self.path.is_dir():
            remove_temporaries(self.path, (CHECKPOINT, CONFIG_JSON, JSONL, CSV))
        if self.resume and not self.checkpoint.is_file() and not (self.path / CONFIG_JSON).is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {self.path}: is it the run folder?")
        if self.resume and self.checkpoint.is_file():  # else it stopped before its first checkpoint: from step 0
            self._restore(state, load_checkpoint(self.checkpoint, map_location="cpu"))
            if state.config.epochs <= state.epoch:
                if main and len(_metrics_or_none(self.path)) < len(state.history):  # killed after its last checkpoint
                    MetricsWriter(self.path, tensorboard=False).write(state.history)
                raise ConfigError("epochs", f"is {state.config.epochs}, but the run in {self.path} has done "
                                  f"{state.epoch} epochs: to train on, ask for more")
            self.saved = (state.epoch, state.steps)
        elif main and self.checkpoint.exists():
            raise FileExistsError(
                f"{self.path} already holds a run; resume it, or choose another folder (nothing was overwritten)"
            )
        self.started = True
        if not main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG_JSON, {"format": FORMAT, "fit": asdict(state.config), "run": self.run_config})
        self.writer = MetricsWriter(self.path)
        if state.history:
            self.writer.write(state.history)

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        every = state.config.checkpoint_every
        if record["epoch"] == state.config.epochs or (every and record["epoch"] % every == 0):
            self._save(state)  # before the metrics: they never show an epoch that a first checkpoint lacks
        if self.writer is not None:
            self.writer.write(state.history)

    def on_fit_error(self, state: FitState, error: BaseException) -> None:
        if not self.started:  # stopped before it started: nothing of this fit to save or tell
            return
        # every rank of a data-parallel fit is interrupted at the same step (World.stop_signal): the
        # save, a collective, runs on all of them
        if isinstance(error, Interrupted) and error.resumable and self.saved != (state.epoch, state.steps):
            try:
                self._save(state)
            except (OSError, FloatingPointError) as e:
                add_note(error, f"could not save it: {message(e)}")
            else:
                add_note(error, f"saved {self._where()}")
                return
        add_note(error, f"{self.checkpoint} keeps {self._where()}" if self.saved else "no checkpoint was written")

    def on_fit_end(self, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()

    def _where(self) -> str:
        epoch, steps = self.saved
        return f"epoch {epoch} (step {steps})" if self.in_epoch is None else \
            f"step {steps}, {self.in_epoch} steps into epoch {epoch + 1}"

    def _save(self, state: FitState) -> None:
        progress, world = state.progress, state.world
        checkpoint = {  # gathering the tables and random states is a collective: every rank takes part
            "format": FORMAT,
            "epoch": state.epoch,
            "step": state.steps,
            "seconds": state.seconds,
            "history": state.history,
            "config": {"fit": asdict(state.config), "run": self.run_config},
            "programs": program_state(state.model, state.guide, state.tables),
            "optimizers": state.step.state_dict(state.tables),
            "rng": rng_state(),
            "generator": state.generator.get_state(),
            "world_size": world.size,
            # inside an epoch: where it stopped, from which the same epoch goes on
            **({"progress": {"batches": progress.batches, "generator": progress.generator,
                             "losses": progress.losses.cpu(), "seconds": progress.seconds}} if progress else {}),
        }
        if world.distributed:
            checkpoint["rngs"] = world.gather_objects(rng_state())
        if world.is_main:
            save_checkpoint(self.checkpoint, checkpoint)
        self.saved, self.in_epoch = (state.epoch, state.steps), progress.batches if progress else None

    def _restore(self, state: FitState, saved: dict) -> None:
        _check_format(saved, self.checkpoint)
        _check_same_config(FitConfig.from_dict(saved["config"]["fit"], str(self.checkpoint)), state.config)
        restore_programs(state.model, state.guide, saved["programs"], str(self.checkpoint), state.tables)
        state.step.load_state_dict(saved["optimizers"], state.tables)
        rank, rngs = state.world.rank, saved.get("rngs", [saved["rng"]])
        if rank < len(rngs):  # each rank's own stream where the run had this rank, else a new one
            set_rng_state(rngs[rank])
        else:
            state.world.seed(state.config.seed, saved["epoch"])
        state.generator.set_state(saved["generator"])
        state.history, state.epoch, state.steps, state.seconds = (
            saved["history"], saved["epoch"], saved["step"], saved["seconds"])
        if "progress" in saved:
            p = saved["progress"]
            state.progress = EpochProgress(p["batches"], p["generator"], p["losses"], p["seconds"])
            self.in_epoch = p["batches"]
        if self.run_config is None:
            self.run_config = saved["config"].get("run")


def _metrics_or_none(path) -> list:
    try:
        return read_metrics(path)
    except (OSError, ValueError):
        return []


# what RunFolder writes in every checkpoint
KEYS = ("format", "epoch", "step", "seconds", "history", "config", "programs", "optimizers", "rng", "generator")


def _check_format(saved: dict, path) -> None:
    if not isinstance(saved, dict) or "programs" not in saved:
        raise ValueError(f"{path} is not a pvae checkpoint (a torch file of another program?): give the run "
                         "folder that pvae train or pvae.fit wrote")
    if saved.get("format") != FORMAT:
        raise ValueError(f"{path} is a pvae checkpoint of format {saved.get('format')}, not {FORMAT}: "
                         "this version of pvae cannot read it")
    missing = [k for k in KEYS if k not in saved]
    config = saved.get("config")
    if not missing and not (isinstance(config, dict) and "fit" in config and "run" in config):
        missing = ["config.fit", "config.run"]
    if missing:
        raise ValueError(f"{path} is an incomplete pvae checkpoint (no {', '.join(missing)}): was it edited?")


def _check_same_config(saved: FitConfig, config: FitConfig) -> None:
    before, now = asdict(saved), asdict(config)
    # settings of speed and output only: a resumed run gives the same numbers whatever they are
    differ = [k for k in now if k not in ("epochs", "progress", "validate", "tape") and before[k] != now[k]]
    if differ:
        pairs = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in differ)
        raise ValueError(f"cannot resume with a different fit config ({pairs}); only epochs may change")


# ----------------------------------------------------------------------------- reading a run back


@dataclass
class Run:
    """A trained run read back from its folder."""

    path: Path
    config: object  # the registry's RunConfig, or None for a run fitted from Python without a factory
    fit: FitConfig
    data: Dataset
    model: object
    guide: object
    checkpoint: dict
    info: ProgramInfo

    def label(self) -> str:
        guide = getattr(self.config, "guide", None) or type(self.guide).__name__
        return f"{guide} ({self.path.name})"


def read_config(run_dir) -> dict:
    """A run folder's ``config.json``, checked: valid JSON, with its ``fit`` section a valid
    :class:`FitConfig` and a ``run`` section (the command line's settings; null for a fit from Python
    without a factory). An error names the file and the key."""
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_JSON} in {run_dir}: is it a run folder written by pvae?")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix it, or copy it back from the checkpoint's "
                         "config") from None
    if not isinstance(saved, dict):
        raise ConfigError("the file", "must hold a JSON object with the sections fit and run", str(path))
    for section in ("fit", "run"):
        if section not in saved:
            raise ConfigError(section, "section is missing", str(path))
    FitConfig.from_dict(saved["fit"], str(path))
    if saved["run"] is not None and not isinstance(saved["run"], dict):
        raise ConfigError("run", "must be a JSON object of settings, or null", str(path))
    return saved


def run_config_from(saved: dict, where: str):
    """The :class:`~pvae.registry.RunConfig` of a saved config (``config.json``, or a checkpoint's), checked
    key by key; None for a fit from Python that recorded none."""
    from .registry import RunConfig

    fit = FitConfig.from_dict(saved["fit"], where)
    return RunConfig.from_dict({**saved["run"], "fit": fit}, where) if saved["run"] else None


def load_run(run_dir, device=None, model=None, guide=None, data: Optional[Dataset] = None) -> Run:
    """Rebuild a run from its folder and load every trained tensor into it.

    The data and programs are rebuilt from the run's config (the command line's names, or the factory a
    Python fit recorded); or pass them: ``load_run(RUN, model=m, guide=g, data=d)``.
    """
    from .registry import build, load_data

    where = str(Path(run_dir) / CHECKPOINT) if Path(run_dir).is_dir() else str(run_dir)
    state = load_checkpoint(run_dir, map_location="cpu")
    _check_format(state, where)
    fit_config = FitConfig.from_dict(state["config"]["fit"], where)
    try:
        cfg = run_config_from(state["config"], where)
    except ConfigError:
        if data is None or model is None or guide is None:
            raise
        cfg = None  # programs and data given: the saved settings are the caller's own record
    if data is None:
        if cfg is None or cfg.dataset is None:
            raise ValueError(f"{run_dir} was fitted from Python on data given as tensors: pass them, "
                             "pvae.run.load_run(RUN, model=..., guide=..., data=...)")
        data = load_data(cfg)
    if model is None or guide is None:
        if cfg is None or cfg.model is None:
            raise ValueError(
                f"{run_dir} records no way to rebuild its programs: fit it with pvae.fit(..., factory=...), or pass "
                "them, pvae.run.load_run(RUN, model=..., guide=...)"
            )
        built_model, built_guide = build(cfg, data)
        model, guide = model or built_model, guide or built_guide
    device = torch.device(device) if device is not None else torch.device("cpu")
    data = data.to(device)
    model, guide = Program(model, "model"), Program(guide, "guide")
    for program in (model, guide):
        for module in program_modules(program):
            module.to(device)
    pyro.clear_param_store()
    probe = data.batch("train", torch.arange(min(8, data.train.shape[0]), device=device))
    if data.binarize == "dynamic":
        probe = Batch(torch.bernoulli(probe.x), probe.idx, probe.num_data, probe.inputs, probe.split)
    info = inspect_programs(model, guide, probe)  # builds lazily set-up guides, declares every pyro.param
    restore_programs(model, guide, state["programs"], where)
    for program in (model, guide):
        for module in program_modules(program):
            module.to(device).eval()
    return Run(Path(run_dir), cfg, fit_config, data, model.fn, guide.fn, state, info)


# ----------------------------------------------------------------------------- results in the run folder


def write_evaluation(folder, evaluation, stem: str = "evaluation") -> tuple:
    """``folder/stem.json`` (with the per-datapoint values) and ``folder/stem.md``, each atomically."""
    from .reports import evaluation_markdown
    from .utils import atomic_write

    folder = Path(folder)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(json_path, evaluation.to_dict(per_datapoint=True))
    text = evaluation_markdown(evaluation)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(text))
    return json_path, md_path


def write_comparison(folder, comparison, stem: str = "compare", figure: bool = True, reference=None) -> list:
    """``stem.json``, ``stem.md`` and (with ``figure``) the bar chart ``stem.png`` in ``folder``."""
    from .reports import comparison_markdown
    from .utils import atomic_write

    folder = Path(folder)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    write_json(paths[0], comparison.to_dict())
    text = comparison_markdown(comparison, reference)
    atomic_write(paths[1], lambda tmp: Path(tmp).write_text(text))
    if figure:
        from .plots import plot_comparison

        paths.append(plot_comparison(comparison, folder / f"{stem}.png", reference))
    return paths
