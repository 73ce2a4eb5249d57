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
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pyro
import torch

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .data import Dataset
from .metrics import MetricsWriter
from .programs import Batch, Program, ProgramInfo, inspect_programs
from .svi import program_modules
from .train import Callback, FitConfig, FitState
from .utils import rng_state, set_rng_state, write_json

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


def program_state(model: Program, guide: Program) -> dict:
    """Every trainable tensor of the programs, as plain tensors and strings."""
    store = pyro.get_param_store().get_state()
    return {
        "modules": {role: [m.state_dict() for m in program_modules(p)] for role, p in (("model", model), ("guide", guide))},
        "param_store": {name: value.detach() for name, value in store["params"].items()},
        "constraints": {name: str(c) for name, c in store["constraints"].items()},
    }


def restore_programs(model: Program, guide: Program, saved: dict, where: str = "the checkpoint") -> None:
    """Load what :func:`program_state` saved into programs that have run once (so that lazily built
    guides and every ``pyro.param`` exist); tensors are copied in place, keeping optimizers' references."""
    for role, program in (("model", model), ("guide", guide)):
        modules, states = program_modules(program), saved["modules"][role]
        if len(modules) != len(states):
            raise ValueError(f"{where} holds {len(states)} {role} module(s), but this {role} has {len(modules)}")
        for module, state in zip(modules, states):
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
            if params[name].shape != value.shape:
                raise ValueError(f"pyro.param {name!r} has shape {tuple(params[name].shape)} here but "
                                 f"{tuple(value.shape)} in {where}")
            params[name].copy_(value)


class RunFolder(Callback):
    """The run folder of a fit: ``config.json`` (once), ``metrics.jsonl`` and ``metrics.csv`` (every
    epoch), ``checkpoint.pt`` (every ``checkpoint_every`` epochs and after the last)."""

    def __init__(self, path, resume: bool = False, run_config: Optional[dict] = None):
        self.path = Path(path)
        self.resume = resume
        self.run_config = run_config
        self.checkpoint = self.path / CHECKPOINT
        self.writer = None

    def on_fit_start(self, state: FitState) -> None:
        if self.resume:
            if not self.checkpoint.is_file():
                raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {self.path}")
            self._restore(state, load_checkpoint(self.checkpoint, map_location="cpu"))
        elif self.checkpoint.exists():
            raise FileExistsError(
                f"{self.path} already holds a run; resume it, or choose another folder (nothing was overwritten)"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG_JSON, {"format": FORMAT, "fit": asdict(state.config), "run": self.run_config})
        self.writer = MetricsWriter(self.path)
        if state.history:
            self.writer.write(state.history)

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        self.writer.write(state.history)
        every = state.config.checkpoint_every
        if record["epoch"] == state.config.epochs or (every and record["epoch"] % every == 0):
            save_checkpoint(self.checkpoint, {
                "format": FORMAT,
                "epoch": state.epoch,
                "step": state.steps,
                "seconds": state.seconds,
                "history": state.history,
                "config": {"fit": asdict(state.config), "run": self.run_config},
                "programs": program_state(state.model, state.guide),
                "optimizers": state.step.state_dict(),
                "rng": rng_state(),
                "generator": state.generator.get_state(),
            })

    def on_fit_end(self, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()

    def _restore(self, state: FitState, saved: dict) -> None:
        _check_format(saved, self.checkpoint)
        _check_same_config(saved["config"]["fit"], state.config)
        restore_programs(state.model, state.guide, saved["programs"], str(self.checkpoint))
        state.step.load_state_dict(saved["optimizers"])
        set_rng_state(saved["rng"])
        state.generator.set_state(saved["generator"])
        state.history, state.epoch, state.steps, state.seconds = (
            saved["history"], saved["epoch"], saved["step"], saved["seconds"])
        if self.run_config is None:
            self.run_config = saved["config"].get("run")


def _check_format(saved: dict, path) -> None:
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or "programs" not in saved:
        raise ValueError(f"{path} is not a pvae checkpoint of format {FORMAT}")


def _check_same_config(saved: dict, config: FitConfig) -> None:
    now = asdict(config)
    # settings of speed and output only: a resumed run gives the same numbers whatever they are
    differ = [k for k in now if k not in ("epochs", "progress", "validate", "tape") and saved.get(k) != now[k]]
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
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
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_JSON} in {run_dir}: is it a run folder written by pvae?")
    return json.loads(path.read_text())


def load_run(run_dir, device=None, model=None, guide=None, data: Optional[Dataset] = None) -> Run:
    """Rebuild a run from its folder and load every trained tensor into it.

    The data and programs are rebuilt from the run's config (the command line's names, or the factory a
    Python fit recorded); or pass them: ``load_run(RUN, model=m, guide=g, data=d)``.
    """
    from .registry import RunConfig, build, load_data

    state = load_checkpoint(run_dir, map_location="cpu")
    _check_format(state, Path(run_dir) / CHECKPOINT)
    saved_run = state["config"].get("run")
    fit_config = FitConfig(**state["config"]["fit"])
    cfg = RunConfig.from_dict({**saved_run, "fit": state["config"]["fit"]}) if saved_run else None
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
    restore_programs(model, guide, state["programs"], str(Path(run_dir) / CHECKPOINT))
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
