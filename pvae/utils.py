"""Seeding, device choice and small file helpers shared by every part of pvae."""

import dataclasses
import errno
import json
import os
import random
import shutil
import stat
import tempfile
import time
import typing
from pathlib import Path
from typing import Optional

import numpy as np
import pyro
import torch

from .errors import ConfigError


def set_seed(seed: int, clear_param_store: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device), and clear Pyro's param store (not when
    the programs to measure are already trained: ``clear_param_store=False``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if clear_param_store:
        pyro.clear_param_store()


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"{name!r} is not a device: use auto, {', '.join(DEVICE_TYPES)} or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} was asked for, but CUDA is not available on this machine: use cpu or auto")
    return device


def rng_state() -> dict:
    """Every global random state, as plain tensors and lists that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# a hidden testing hook: seconds to pause between writing a file and renaming it into place, so that a
# test can kill a run in the middle of a checkpoint write
_PAUSE = "PVAE_TESTING_WRITE_PAUSE"
TEMPORARY = ".{name}.*.tmp"  # the temporary files of atomic_write(folder / name), as a glob


def atomic_write(path, write) -> None:
    """Write ``path`` through ``write(tmp_path)`` to a temporary file in the same folder, then rename it
    into place.

    A crash or a failed write leaves the old file intact: nothing is lost. A process killed mid-write
    leaves the temporary file (see :data:`TEMPORARY`), which the next run in the folder removes. An
    :class:`OSError` names ``path``. The file is not ``fsync``-ed: a killed process loses nothing
    written, and against a power cut the rename relies on the file system's ordering (ext4 flushes
    a file replaced by a rename first); an ``fsync`` per checkpoint waits on the whole disk's journal
    (20 epochs of the digits demo on a busy shared disk: 72 s with one, 53 s without).

    The file gets the mode a plain ``open(path, "w")`` would give it: that of the file it replaces, or
    for a new file ``0o666`` less the process's umask.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, _mode_for(path))  # mkstemp's 0600 would make every written file private
        write(tmp)
        if os.environ.get(_PAUSE):
            time.sleep(float(os.environ[_PAUSE]))
        os.replace(tmp, path)
    except BaseException as error:
        # torch.save reports some writes to a full disk as "RuntimeError: [enforce fail at
        # inline_container.cc] unexpected pos": judged while the temporary file still fills the disk
        full = isinstance(error, RuntimeError) and tmp is not None and _nearly_full(path.parent)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        if isinstance(error, OSError):
            error.filename = str(path)  # the file the user knows, not the temporary one
        raise


def _mode_for(path: Path) -> int:
    """The permission bits ``open(path, "w")`` leaves ``path`` with: its own if it exists, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the umask can only be read by setting it
        os.umask(umask)
        return 0o666 & ~umask


def _nearly_full(folder, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def remove_temporaries(folder, names) -> list:
    """Remove what writes of ``folder / name`` for each of ``names`` left when their process was killed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(TEMPORARY.format(name=name)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def dataclass_from_dict(cls, d, where: Optional[str] = None, section: str = ""):
    """``cls(**d)`` for a config dataclass read from a file, checked against its fields: an unknown key,
    a value of the wrong type or a bad value raises a :class:`~pvae.errors.ConfigError` that names the
    file ``where`` and the key (``fit.lr``). Keys left out take their defaults."""
    if not isinstance(d, dict):
        raise ConfigError(section or "the config", f"must be a JSON object of settings, got {_json_type(d)}", where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{section}." if section else ""
    for key, value in d.items():
        if key not in fields or not fields[key].init:
            raise ConfigError(f"{prefix}{key}", f"is not a setting: known are {', '.join(sorted(fields))}", where)
        expected = hints[key]
        if not _has_type(value, expected):
            raise ConfigError(f"{prefix}{key}", f"must be {_type_words(expected)}, got {value!r}", where)
    try:
        return cls(**d)
    except ConfigError as e:
        raise e.within(where, section) if where else ConfigError(f"{prefix}{e.key}", e.problem) from None


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _has_type(value, expected) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union:
        return any(_has_type(value, a) for a in args)
    if origin is tuple or expected is tuple:
        item = args[0] if args else object
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(expected):
        return isinstance(value, (dict, expected))
    return expected is object or isinstance(value, expected)


def _type_words(expected) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union:
        return " or ".join(_type_words(a) for a in args)
    if origin is tuple or expected is tuple:
        return f"a list of {_type_words(args[0]).replace('an ', '').replace('a ', '')}s" if args else "a list"
    if dataclasses.is_dataclass(expected):
        return "an object of settings"
    return _WORDS.get(expected, getattr(expected, "__name__", str(expected)))


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")
