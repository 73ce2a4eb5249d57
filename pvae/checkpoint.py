"""Checkpoints: state dicts, optimizer states, RNG states and the config, written atomically and read
back with ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects)."""

from pathlib import Path

import torch

from .utils import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename: a crash leaves the old one."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location=None) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train a run there first (pvae train --out ...)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable pvae checkpoint: {e}") from e
