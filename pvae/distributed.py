"""Data-parallel fitting over the ranks of a ``torch.distributed`` process group.

``torchrun --nproc_per_node=R -m pvae train ...`` (or :func:`pvae.fit` called on every rank of a process
group) trains one model on R processes. Each step, every rank takes its own part of the batch: the
seeded permutation is the same on every rank, cut into chunks of R x ``batch_size`` rows, and rank r
keeps its share of each chunk (:class:`Shard`), so no two ranks see the same datapoint and the chunk is
the batch one process would take with ``batch_size`` R x B. Each rank's loss is the ELBO of its rows
scaled to the data set; the step all-reduces, in one call, the gradients of the dense parameters and
the loss, each rank's weighted by its rows (:class:`GradientSync`). The result is the gradient of the
chunk's ELBO scaled to the data set, the global sites' KL counted once: R processes with batch B take
the steps of one process with batch R x B.

A guide with per-datapoint parameters (a mean-field table) keeps on rank r only the rows of the
datapoints it owns, n mod R = r, and every rank takes its owned rows of each chunk; those rows' sparse
gradients stay on their rank, so a step sends only the dense parameters. A checkpoint gathers the
tables (:class:`RowTables`) into the layout of a one-process run, so that a run saved with N ranks
resumes with M.

The backend follows the device: NCCL for CUDA, gloo for the CPU (:func:`backend_for`). Rank 0 alone
writes the run folder and prints; every rank raises its own errors; a failure before training is
shared by every rank (:meth:`World.together`), and one during it is left in the process group's store
for the ranks it stops (:meth:`World.failed`).
"""

import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

_started_here = False  # whether join() initialized the process group (and leave() should end it)
_fits = 0  # fits started in this process: every rank runs the same fits, in the same order


class RankFailed(RuntimeError):
    """Raised on a rank that another rank's failure stopped; the message names the failed rank."""


def _describe(error: BaseException) -> str:
    """``Type: first line of the message`` (Pyro adds the trace's shapes below it)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


# steps between two exchanges of stop requests in a data-parallel fit (a small all-reduce each)
STOP_EVERY = 16


@dataclass(frozen=True)
class World:
    """The processes a fit runs on: this one's ``rank`` among ``size``. One process is ``World()``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def shard(self, by_row: bool) -> Optional["Shard"]:
        """This rank's part of every batch; None in one process (every row)."""
        return Shard(self.rank, self.size, by_row) if self.distributed else None

    # ------------------------------------------------------------------------- agreeing on failures

    @contextmanager
    def together(self):
        """Run a block that holds no collective on every rank, then raise on every rank if it failed on
        any: the rank that failed raises its own error, the others :class:`RankFailed` naming it."""
        if not self.distributed:
            yield
            return
        error = None
        try:
            yield
        except Exception as e:
            error = e
        messages = [None] * self.size
        dist.all_gather_object(messages, None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"stopped because rank {rank} failed: {message}")

    def failed(self, error: BaseException, key: str) -> Optional[RankFailed]:
        """A failure during training, where the ranks are out of step. A collective cut short (a
        ``RuntimeError``, as gloo and NCCL raise when a peer stops) on this rank is most likely another
        rank's doing: when one left its error in the process group's store under ``key``, return the
        :class:`RankFailed` naming it, to raise instead. Otherwise leave this rank's error there for the
        others and return None: the rank raises its own error."""
        if not self.distributed or isinstance(error, RankFailed):
            return None
        try:
            store = dist.distributed_c10d._get_default_store()
            if isinstance(error, RuntimeError):
                for rank in range(self.size):
                    name = f"{key}/{rank}"
                    if rank != self.rank and store.check([name]):
                        return RankFailed(f"stopped because rank {rank} failed: {store.get(name).decode()}")
            store.set(f"{key}/{self.rank}", _describe(error))
        except Exception:  # no store, or it went with the rank that hosted it: this rank's error stands
            return None
        return None

    def stop_signal(self, signum: Optional[int], step: int) -> Optional[int]:
        """The signal that stops the fit before ``step``, agreed by every rank: ``signum`` (this rank's
        SIGINT or SIGTERM, None if none came) in one process; in a data-parallel fit the largest any
        rank received, exchanged every :data:`STOP_EVERY` steps so that all ranks stop at the same step
        (a rank that stopped alone would leave the others waiting in their next all-reduce)."""
        if not self.distributed:
            return signum
        if step % STOP_EVERY:
            return None
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    # ------------------------------------------------------------------------- collectives

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's, in place (the initial weights every rank starts from)."""
        if self.distributed:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t, src=0)

    def main_first(self, fn):
        """``fn()`` on rank 0, then on the others (a download that only one rank should make)."""
        if not self.distributed:
            return fn()
        with self.together():
            value = fn() if self.is_main else None
        with self.together():
            if not self.is_main:
                value = fn()
        return value

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank: small objects of tensors, numbers,
        strings, lists, tuples and dicts, sent as ``torch.save`` writes them and read back with
        ``weights_only=True``."""
        if not self.distributed:
            return [value]
        buffer = io.BytesIO()
        torch.save(value, buffer)
        values = [None] * self.size
        dist.all_gather_object(values, buffer.getvalue())
        return [torch.load(io.BytesIO(v), weights_only=True) for v in values]

    def gather_rows(self, rows: dict) -> dict:
        """Per-datapoint results ``{name: (B_r,) tensor}`` of every rank, concatenated in rank order, on the
        CPU; 0-dim entries are averaged over the ranks that had rows."""
        if not self.distributed:
            return rows
        parts = [p for p in self.gather_objects({k: v.detach().cpu() for k, v in rows.items()}) if p]
        return {key: torch.cat([p[key] for p in parts]) if parts[0][key].dim() else torch.stack([p[key] for p in parts]).mean()
                for key in parts[0]}

    def seed(self, seed: int, *keys) -> None:
        """Give this rank random streams of its own: Python, NumPy and torch seeded from ``(seed, rank,
        *keys)``, so that ranks draw independent noise (one process keeps its streams)."""
        if not self.distributed:
            return
        import random

        value = int(np.random.SeedSequence([seed, self.rank, *keys]).generate_state(1)[0])
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


def current_world() -> World:
    """The default process group's rank and size, or one process when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def next_fit_key() -> str:
    """A store key prefix of its own for each fit this process starts (the same on every rank)."""
    global _fits
    _fits += 1
    return f"pvae/fit{_fits}/failed"


def launched_ranks() -> int:
    """How many ranks torchrun (or another launcher setting ``WORLD_SIZE``) started; 1 when none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its node: ``auto`` and ``cuda`` take the node's
    GPU number ``local_rank`` when CUDA is available; ``cpu`` is the CPU."""
    from .utils import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--device {name} puts every rank of this node on one GPU: use --device cuda (or auto), "
                         "and each rank takes the GPU of its LOCAL_RANK")
    return torch.device("cuda", local_rank if device.index is None else device.index)


def join(device_name: str = "auto") -> tuple:
    """``(world, device)`` for the command line. Launched by torchrun with more than one rank, join its
    process group with the backend of this rank's device (:func:`rank_device`): NCCL for CUDA, gloo
    for the CPU; otherwise one process on ``device_name``."""
    global _started_here
    from .utils import resolve_device

    if launched_ranks() == 1 and not dist.is_initialized():
        return World(), resolve_device(device_name)
    device = rank_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
        _started_here = True
    return current_world(), device


def leave() -> None:
    """End the process group :func:`join` started (the command line's, at exit)."""
    global _started_here
    if _started_here and dist.is_initialized():
        dist.destroy_process_group()
    _started_here = False


def check_backend(device: torch.device) -> None:
    """Refuse a process group whose backend cannot reduce tensors on ``device`` (NCCL and the CPU)."""
    if dist.get_backend() == "nccl" and torch.device(device).type != "cuda":
        raise ValueError(f"the process group uses NCCL, which reduces CUDA tensors only, but the fit runs on {device}: "
                         "pass device=torch.device('cuda', LOCAL_RANK) or start the group with the gloo backend")


# ----------------------------------------------------------------------------- who takes which rows


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size``: its share of each chunk of ``size`` x ``batch_size`` rows of the
    permutation, and of a split's rows.

    :param by_row: row n belongs to rank ``n % size`` (a per-datapoint guide keeps its parameters
        there), and each rank takes its own rows of every chunk: about ``batch_size`` of them. Otherwise
        each chunk is cut into ``size`` consecutive parts as equal as can be.
    """

    rank: int
    size: int
    by_row: bool = False

    def count(self, num_rows: int, rank: Optional[int] = None) -> int:
        """How many of ``num_rows`` rows rank ``rank`` (this one by default) owns."""
        rank = self.rank if rank is None else rank
        return len(range(rank, num_rows, self.size))

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions of this rank's rows ``idx`` in its table of owned rows."""
        return torch.div(idx, self.size, rounding_mode="floor")

    def owns(self, idx: torch.Tensor) -> torch.Tensor:
        return idx % self.size == self.rank

    def rows(self, num_rows: int, device=None) -> torch.Tensor:
        """This rank's rows among ``0 .. num_rows - 1`` (its rows to evaluate)."""
        if self.by_row:
            return torch.arange(self.rank, num_rows, self.size, device=device)
        return torch.arange(num_rows, device=device)[self._part(num_rows)]

    def _part(self, length: int) -> slice:
        base, extra = divmod(length, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def chunks(self, perm: torch.Tensor, batch_size: int) -> Iterator[tuple]:
        """``(chunk, mine)`` per step: a chunk of the permutation and the positions in it of this rank's
        rows (a slice, or an index tensor when ``by_row``); every rank gets as many steps."""
        width = batch_size * self.size
        chunks = perm.split(width)
        if not self.by_row:
            return ((chunk, self._part(chunk.shape[0])) for chunk in chunks)
        # one mask and one count per epoch (host synchronizations), none per step
        positions = torch.arange(perm.shape[0], device=perm.device)[self.owns(perm)]
        counts = torch.bincount(torch.div(positions, width, rounding_mode="floor"), minlength=len(chunks)).tolist()
        return ((chunk, pos - i * width) for i, (chunk, pos) in enumerate(zip(chunks, positions.split(counts))))


# ----------------------------------------------------------------------------- the step's all-reduce


class GradientSync:
    """The all-reduce of a data-parallel step: rank r, with B_r rows and loss L_r (its rows' ELBO scaled to
    the data set by N / B_r), contributes B_r times its gradients and loss; one all-reduce sums them with
    the rows, and the result divided by :math:`B = \\sum_r B_r` is

    .. math:: \\sum_r \\frac{B_r}{B} \\nabla L_r = \\nabla\\Big[\\frac{N}{B}\\sum_{n \\in \\text{chunk}} \\ell_n + \\text{global terms}\\Big],

    the gradient one process takes on the whole chunk. Row tables (``local``: a mean-field guide's rows
    of this rank) keep their sparse gradients, scaled by B_r / B, and send nothing. A dense parameter no
    rank reached gets a zero gradient (Adam leaves it in place while its moments are zero), so that
    every rank's optimizers step alike.

    :param params: the step's parameters, in the step's order.
    :param local: the row tables among them.
    """

    def __init__(self, params: Sequence[torch.Tensor], local: Sequence[torch.Tensor] = ()):
        local_ids = {id(t) for t in local}
        self.params = list(params)
        self.dense = [i for i, p in enumerate(self.params) if id(p) not in local_ids]
        self.local = [i for i, p in enumerate(self.params) if id(p) in local_ids]

    def __call__(self, size: int, loss: Optional[torch.Tensor], grads: Sequence) -> tuple:
        """``(loss, grads)`` of the chunk from this rank's ``size`` rows, ``loss`` and ``grads`` (None
        for a rank with no rows this step)."""
        grads = list(grads) if grads is not None else [None] * len(self.params)
        first = self.params[self.dense[0]] if self.dense else self.params[0]
        parts = []
        for i in self.dense:
            g, p = grads[i], self.params[i]
            if g is not None and g.is_sparse:
                raise ValueError("a sparse embedding outside a per-datapoint guide's table cannot be all-reduced "
                                 "across ranks: build it with sparse=False")
            parts.append(p.new_zeros(p.numel()) if g is None else g.reshape(-1).to(p.dtype) * size)
        rows = first.new_full((1,), size)
        weighted_loss = rows * loss.detach().to(first.dtype) if loss is not None else first.new_zeros(1)
        offsets = np.cumsum([0] + [len(part) for part in parts])
        flat = torch.cat([*parts, weighted_loss.reshape(1), rows])
        dist.all_reduce(flat)
        total = flat[-1]
        out = list(grads)
        for k, i in enumerate(self.dense):
            out[i] = (flat[offsets[k]:offsets[k + 1]] / total).view_as(self.params[i])
        for i in self.local:
            p = self.params[i]
            if out[i] is None:  # no rows here this step: an empty gradient, so SparseAdam still counts the step
                out[i] = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=p.device),
                                                 p.new_empty(0, *p.shape[1:]), p.shape, check_invariants=True)
            else:
                out[i] = out[i] * (size / total)
        return (flat[-2] / total).to(loss.dtype if loss is not None else first.dtype), out


# ----------------------------------------------------------------------------- tables in checkpoints


class RowTables:
    """The per-datapoint tables of a data-parallel fit: row n of each lives on rank ``n % size``. A
    checkpoint holds them whole, as one process would (:meth:`gather`); a rank takes its rows back out
    of one (:meth:`take`), whatever number of ranks saved it.

    :param tensors: the tables (and nothing else), ``(owned rows, ...)`` each on this rank.
    :param num_rows: the rows of a whole table, N.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], num_rows: int, shard: Shard):
        self.ids = {id(t) for t in tensors}
        self.num_rows, self.shard = num_rows, shard

    def __contains__(self, tensor) -> bool:
        return id(tensor) in self.ids

    def is_rows(self, value, table) -> bool:
        """Whether ``value`` (a table, or its optimizer state) holds this rank's rows of ``table``."""
        return table in self and torch.is_tensor(value) and value.dim() > 0 and value.shape == table.shape

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole table on rank 0 (a collective: every rank calls it, in the same order); the other
        ranks get their own rows back."""
        shard = self.shard
        counts = [shard.count(self.num_rows, r) for r in range(shard.size)]
        padded = local.new_zeros(max(counts), *local.shape[1:])
        padded[: local.shape[0]] = local.detach()
        parts = [torch.empty_like(padded) for _ in counts] if shard.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if shard.rank != 0:
            return local.detach()
        whole = local.new_empty(self.num_rows, *local.shape[1:])
        for rank, (part, count) in enumerate(zip(parts, counts)):
            whole[rank::shard.size] = part[:count]
        return whole

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole table (or of its optimizer state)."""
        if whole.shape[0] != self.num_rows:
            raise ValueError(f"a per-datapoint table of {whole.shape[0]} rows cannot be shared out as one of "
                             f"{self.num_rows}")
        return whole[self.shard.rank::self.shard.size].clone()
