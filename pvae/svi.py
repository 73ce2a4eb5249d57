"""One step of stochastic variational inference, as Pyro's ``SVI``: a model, a guide, an objective and
torch optimizers joined; :class:`SVIStep` takes a batch and returns its loss.

The parameters are found by one traced run (:func:`collect_params`): the programs' own ``nn.Module``
parameters (of a module, or of the module a bound method belongs to), everything ``pyro.module``
registers and every ``pyro.param``. Dense parameters get ``torch.optim.Adam`` (fused: one kernel per
step rather than a pass per operation and parameter); sparse per-datapoint tables get
``torch.optim.SparseAdam``, which touches only the rows of the batch.

In a data-parallel fit each rank's step hands its gradients to a :class:`~pvae.distributed.GradientSync`
between the backward pass and the optimizers: one all-reduce makes them the gradients of the ranks'
batches together.
"""

import warnings
from typing import Optional, Sequence

import pyro
from pyro.infer.util import is_validation_enabled
import torch
from pyro import poutine
from torch import nn

from .inference import KLWeight, PvaeWarning
from .programs import Batch, Program
from .protocols import AuxiliaryObjective
from .tape import Tape, tensor_key


def program_modules(program) -> list:
    """The ``nn.Module`` s a program's parameters live in: the program itself, or the object a bound
    method belongs to (Pyro's tutorial VAE: ``vae.model``)."""
    fn = program.fn if isinstance(program, Program) else program
    owner = getattr(fn, "__self__", None)
    return [m for m in (fn, owner) if isinstance(m, nn.Module)]


def collect_params(model: Program, guide: Program, batch: Batch) -> list:
    """Every trainable tensor of the pair, in a fixed order: ``pyro.param`` and ``pyro.module``
    registrations as one run of guide and model meets them, then the programs' module parameters."""
    with poutine.trace(param_only=True) as capture, torch.no_grad(), poutine.block(hide_types=["sample"]):
        guide_trace = poutine.trace(guide).get_trace(batch)
        poutine.replay(model, trace=guide_trace)(batch)
    found = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    for program in (model, guide):
        for module in program_modules(program):
            found.extend(module.parameters())
    unique = {id(p): p for p in found if p.requires_grad}
    if not unique:
        raise ValueError("the model and guide have no trainable parameters")
    return list(unique.values())


def make_optimizers(params: Sequence[torch.Tensor], modules: Sequence[nn.Module], lr: float,
                    local_lr: Optional[float] = None) -> list:
    """Adam for dense parameters; SparseAdam for sparse embeddings (per-datapoint guides), whose
    steps touch only the rows of the batch and keep Adam moments per row."""
    sparse_ids = {id(m.weight) for module in modules for m in module.modules()
                  if isinstance(m, nn.Embedding) and m.sparse}
    dense = [p for p in params if id(p) not in sparse_ids]
    sparse = [p for p in params if id(p) in sparse_ids]
    optimizers = []
    if dense:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in dense) or None
        optimizers.append(torch.optim.Adam(dense, lr=lr, fused=fused))
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr if local_lr is None else local_lr))
    return optimizers


def _say_untaped(problem: str) -> None:
    warnings.warn(f"the training objective is not recorded, every step runs the programs: {problem}", PvaeWarning,
                  stacklevel=5)


class SVIStep:
    """Model, guide, objective and optimizers: ``step(batch)`` takes one gradient step on
    ``elbo.differentiable_loss`` and returns the loss (detached, on the device: no host synchronization).

    :param kl_weight: a :class:`~pvae.inference.KLWeight` around both programs, or None.
    :param params: the tensors the optimizers hold; gradients are formed for these only.
    :param validate: Pyro's validation checks in every step; otherwise only in the first (one traced
        run checks the programs and their data; the checks cost about 8% of a small VAE's step).
    :param sync: a :class:`~pvae.distributed.GradientSync` in a data-parallel fit: the step's gradients
        and loss become those of every rank's batch together (a rank may then have an empty batch).
    :param tape: record the objective once per batch shape and replay it (:mod:`pvae.tape`): only for
        programs that run the same operations on every batch (:class:`~pvae.protocols.StaticProgram`).
    """

    def __init__(self, model: Program, guide: Program, elbo, optimizers: list, params: list,
                 kl_weight: Optional[KLWeight] = None, validate: bool = False, sync=None, tape: bool = False):
        self.model, self.guide, self.elbo = model, guide, elbo
        self.optimizers, self.params = optimizers, params
        self.kl_weight = kl_weight
        self.validate = validate
        self.sync = sync
        # a guide may train parameters that the ELBO does not reach (a semi-amortized guide's encoder)
        self.auxiliary = guide.fn if isinstance(guide.fn, AuxiliaryObjective) else None
        self.tape = Tape(on_problem=_say_untaped) if tape else None
        self._checked = False

    def loss(self, batch: Batch) -> torch.Tensor:
        """The objective on ``batch``, scaled to the data set, with the KL weight: what a step descends.
        With ``tape``, its recording is replayed where one fits the batch (see :mod:`pvae.tape`)."""
        model, guide = self.model, self.guide
        if self.kl_weight is not None:
            model, guide = self.kl_weight(model), self.kl_weight(guide)
        if self.tape is None:
            return self.elbo.differentiable_loss(model, guide, batch)
        names = tuple(batch.inputs)

        def objective(x, idx, *values):
            rows = Batch(x, idx, batch.num_data, dict(zip(names, values)), batch.split)
            return self.elbo.differentiable_loss(model, guide, rows)

        inputs = [batch.x, batch.idx, *batch.inputs.values()]
        weight = None if self.kl_weight is None else self.kl_weight.weight
        key = (tensor_key(inputs), names, batch.num_data, batch.split, weight, torch.is_grad_enabled(),
               is_validation_enabled())
        return self.tape(objective, key, inputs)

    def step(self, batch: Batch) -> torch.Tensor:
        loss = grads = None
        if len(batch):  # only a rank of a data-parallel fit may have no rows in a step
            with pyro.validation_enabled(self.validate or (not self._checked and is_validation_enabled())):
                loss = self.loss(batch)
                total = loss if self.auxiliary is None else loss + self.auxiliary.auxiliary_loss(self.elbo, self.model, batch)
            self._checked = True
            grads = torch.autograd.grad(total, self.params, allow_unused=True)
        if self.sync is not None:
            loss, grads = self.sync(len(batch), loss, grads)
        for p, g in zip(self.params, grads):
            p.grad = g
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    __call__ = step

    def state_dict(self, tables=None) -> list:
        """The optimizers' states; with :class:`~pvae.distributed.RowTables`, the moments of per-datapoint
        tables gathered whole on rank 0 (every rank calls it)."""
        states = [opt.state_dict() for opt in self.optimizers]
        for state, table, index in _table_states(self.optimizers, states, tables):
            state["state"][index] = {k: tables.gather(v) if tables.is_rows(v, table) else v
                                     for k, v in state["state"][index].items()}
        return states

    def load_state_dict(self, states: list, tables=None) -> None:
        """Restore :meth:`state_dict`; with ``tables``, each rank takes its rows of the tables' moments."""
        if len(states) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizers do not match this model and guide")
        for state, table, index in _table_states(self.optimizers, states, tables):
            state["state"][index] = {k: tables.take(v) if torch.is_tensor(v) and v.dim() and v.shape[1:] == table.shape[1:]
                                     else v for k, v in state["state"][index].items()}
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


def _table_states(optimizers: list, states: list, tables) -> list:
    """``(state dict, table, index)`` of every per-datapoint table's entry in the optimizers' states."""
    if tables is None:
        return []
    found = []
    for opt, state in zip(optimizers, states):
        params = [p for group in opt.param_groups for p in group["params"]]
        found += [(state, p, i) for i, p in enumerate(params) if p in tables and i in state["state"]]
    return found
