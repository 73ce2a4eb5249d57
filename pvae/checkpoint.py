"""Checkpoints: state dicts, optimizer states, RNG states and the config, written atomically and read
back with ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects).

A checkpoint is written only when every floating-point tensor in it is finite: a run whose parameters
or optimizer moments turned NaN keeps its previous checkpoint."""

from pathlib import Path

import torch

from .utils import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename: a crash, a full disk or a
    non-finite tensor leaves the old one.

    :raises FloatingPointError: a floating-point tensor in ``state`` holds NaN or infinity; the
        message names it.
    """
    bad = first_non_finite(state)
    if bad is not None:
        raise FloatingPointError(f"{bad} holds NaN or infinite values: {path} was not written")

    def write(tmp):
        # through a Python file, whose writes raise OSError(ENOSPC) on a full disk; torch.save to a path
        # reports it as "[enforce fail at inline_container.cc] unexpected pos"
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)


def first_non_finite(state, prefix: str = "") -> str:
    """The key path (``programs.modules.model[0].fc.weight``) of the first floating-point tensor in a
    nest of dicts and lists that is not finite everywhere, or None."""
    paths, tensors = [], []

    def walk(obj, where):
        if torch.is_tensor(obj):
            if obj.is_floating_point() or obj.is_complex():
                paths.append(where)
                tensors.append(torch.isfinite(obj.detach()).all())
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")

    walk(state, prefix)
    if not tensors:
        return None
    device = tensors[0].device
    finite = torch.stack([t.to(device) for t in tensors]).tolist()
    return next((p for p, ok in zip(paths, finite) if not ok), None)


def load_checkpoint(path, map_location=None) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train a run there first (pvae train --out ...)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable pvae checkpoint ({first})") from e
