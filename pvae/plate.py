"""The one plate every pvae model and guide puts its datapoints in.

Models and guides are Pyro programs called as ``program(x, idx=None, num_data=None)``: ``x`` is a
batch, ``idx`` its rows' positions in the data set and ``num_data`` the data set's size. Both sides
open :func:`data_plate`, so the ELBO is scaled to the whole data set (``num_data / len(idx)``) and a
guide with per-datapoint parameters finds its rows through the plate's subsample.
"""

import pyro
import torch

DATA = "data"


def data_plate(x: torch.Tensor, idx=None, num_data=None, dim: int = -1) -> pyro.plate:
    """``pyro.plate("data", num_data, subsample=idx)`` over the first axis of ``x``, on ``x``'s device.

    With ``idx=None`` the batch is the whole data set (rows ``0..len(x)-1``); with ``num_data=None``
    the plate is not scaled.
    """
    if idx is None:
        idx = torch.arange(x.shape[0], device=x.device)
    elif idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx has {idx.shape[0]} rows but the batch x has {x.shape[0]}")
    size = idx.shape[0] if num_data is None else int(num_data)
    return pyro.plate(DATA, size, subsample=idx, dim=dim, device=x.device)
