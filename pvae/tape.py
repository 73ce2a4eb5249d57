"""The training objective of a static program, recorded once and replayed: Pyro's bookkeeping paid once.

Each step of SVI runs the model and the guide through Pyro's effect handlers (plates, scaling,
tracing, replay), which costs as much Python as a small network's whole forward pass. For programs
whose tensor operations are the same on every batch of a given shape, a :class:`Tape` records the
operations of one run of the objective at the level of torch functions (``F.linear``, ``softplus``,
``Tensor.sum``, the random ``normal_`` of a reparameterized draw, ...) and replays them on later
batches: the same operations in the same order on the new batch's tensors, with fresh random draws
and the parameters' current values (they are read by reference), hence the same value and gradient
as the objective itself, without running the programs.

What a program must do to be recorded (:class:`~pvae.protocols.StaticProgram`): the same operations
for every batch of a shape, i.e. no Python branch on tensor values, no Python randomness, no state
that changes from step to step. pvae's own models and guides declare this; a program of yours is
recorded only when you say so (``FitConfig(tape="always")``). A recording that meets what replaying
would get wrong falls back to the plain objective: a tensor value read into Python
(``.item()``, ``bool(t)``, ``.tolist()``), a computed tensor that did not come from a recorded
operation (one kept from an earlier step), a first replay whose value differs from a plain run's,
an operation that fails when replayed, a custom ``torch.autograd.Function`` (its forward is seen, its
backward is not).

A recording is simplified once, after it is made: a view that changes nothing (an ``expand`` or a
``reshape`` to the shape it had, ``broadcast_tensors`` of tensors of one shape) is its input, so is
``x + 0``, ``x - 0``, ``x * 1`` or ``x / 1`` on a constant (unless ``x`` or the result is written
into), and what is computed from constants alone (the prior's ``x.new_zeros(B, D)`` and ``1.0``, and the
log-density's terms in them) is kept as computed.

A tape is keyed by the batch's shapes, dtypes and devices, its size in the data set and its split,
and the KL weight: a new key is recorded the second time it is seen in a row (so that a weight that
changes every step, during KL warm-up, never is) and replayed after that.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

# functions whose non-tensor results depend on shapes, types and devices only, never on values
_METADATA = frozenset({
    "shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "dtype", "device", "layout",
    "requires_grad", "is_leaf", "grad_fn", "is_floating_point", "is_complex", "is_contiguous", "is_sparse",
    "is_cuda", "is_inference", "stride", "storage_offset", "element_size", "__len__", "__hash__", "names",
    "_version",
})
MAX_TAPES = 4  # keys kept at once (a full batch and the last, smaller one, per split)


def _name(func) -> str:
    owner = getattr(func, "__self__", None)  # a property's getter: Tensor.shape.__get__
    if getattr(func, "__name__", None) == "__get__" and owner is not None:
        return getattr(owner, "__name__", "")
    return getattr(func, "__name__", "")


@dataclass
class _Call:
    """One recorded torch function call. Arguments are kept as given, with None where a recorded tensor
    goes (``arg_slots``, ``kw_slots``); arguments that nest recorded tensors in containers are kept
    flattened (``spec``, a pytree spec of ``(args, kwargs)`` whose leaves are ``args``)."""

    func: Callable
    args: list
    kwargs: dict
    grad: bool  # whether autograd was on (a program may run parts under torch.no_grad)
    spec: object = None
    arg_slots: list = field(default_factory=list)  # (position, slot) of each recorded tensor argument
    kw_slots: list = field(default_factory=list)  # (name, slot)
    outputs: list = field(default_factory=list)  # slot of each tensor output, in tree order
    single: bool = False  # the output is one tensor


_FOLDED = frozenset({"tensor", "as_tensor", "scalar_tensor"})  # constants made from Python numbers
# views that may change nothing: such a call's output is its input when its shape, strides and storage are
_VIEWS = frozenset({"reshape", "reshape_as", "view", "view_as", "expand", "expand_as", "broadcast_to",
                    "broadcast_tensors", "contiguous", "flatten"})
# functions of their tensors' values alone (no randomness, no state): computed once where those are constants
_PURE = _VIEWS | frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "pow", "square", "sqrt", "rsqrt", "reciprocal", "exp",
    "expm1", "log", "log1p", "log2", "log10", "abs", "sign", "clamp", "clamp_min", "clamp_max", "lgamma", "digamma",
    "sum", "mean", "prod", "logsumexp", "squeeze", "unsqueeze", "transpose", "t", "permute", "__getitem__",
    "select", "narrow", "cat", "stack", "to", "float", "double", "type_as", "where", "minimum", "maximum",
})
# new tensors whose values are set by shapes, dtypes and devices only, whatever tensor they are made from
_LIKE = frozenset({"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "zeros", "ones", "full"})


def _holds_tensor(value) -> bool:
    return isinstance(value, (list, tuple, dict)) and any(isinstance(v, torch.Tensor) for v in tree_flatten(value)[0])


class _Recorder(TorchFunctionMode):
    def __init__(self, inputs: list):
        super().__init__()
        self.slot_of = {id(t): i for i, t in enumerate(inputs)}
        self.alive = list(inputs)  # holds every recorded tensor, so that ids are not reused
        self.folded = {}  # id -> constant tensors made from Python numbers, computed once
        self.calls = []
        self.problem = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.problem is None:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = _name(func)
        structured = any(_holds_tensor(a) for a in args) or any(_holds_tensor(v) for v in kwargs.values())
        if structured:
            leaves, spec = tree_flatten((args, kwargs))
            call = _Call(func, list(leaves), {}, torch.is_grad_enabled(), spec)
            places = [(i, leaf, call.arg_slots) for i, leaf in enumerate(leaves)]
        else:
            call = _Call(func, list(args), dict(kwargs), torch.is_grad_enabled())
            places = [(i, a, call.arg_slots) for i, a in enumerate(args)]
            places += [(k, v, call.kw_slots) for k, v in kwargs.items()]
        uses_tensors = False
        for where, value, slots in places:
            if not isinstance(value, torch.Tensor):
                continue
            uses_tensors = True
            slot = self.slot_of.get(id(value))
            if slot is not None:
                (call.args if slots is call.arg_slots else call.kwargs)[where] = None
                slots.append((where, slot))
            elif id(value) in self.folded and (name.endswith("_") or name == "__setitem__") and where == 0:
                self.problem = f"{name} writes into a constant tensor in place"
                return
            elif value.grad_fn is not None:
                self.problem = (f"{name} takes a tensor computed by an operation that was not recorded "
                                "(a tensor kept from an earlier step?)")
                return
        if name in _METADATA:
            return  # a function of shapes: the key fixes them
        out_leaves = [out] if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
        tensors = [t for t in out_leaves if isinstance(t, torch.Tensor)]
        if uses_tensors and not tensors and out is not None:
            self.problem = f"{name} reads a tensor's values into Python"
            return
        if not uses_tensors and name in _FOLDED and isinstance(out, torch.Tensor) and not out.requires_grad:
            self.folded[id(out)] = out  # the same constant every time: made once, used by reference
            return
        for t in tensors:
            if id(t) not in self.slot_of:
                self.slot_of[id(t)] = len(self.alive)
                self.alive.append(t)
            call.outputs.append(self.slot_of[id(t)])
        call.single = isinstance(out, torch.Tensor)
        self.calls.append(call)


def _tensor_args(call: _Call) -> list:
    """``(slot or None, tensor or None)`` of every tensor argument: a recorded one by its slot, another
    (a parameter, a constant) by itself."""
    found = [(slot, None) for _, slot in call.arg_slots + call.kw_slots]
    found += [(None, v) for v in list(call.args) + list(call.kwargs.values()) if isinstance(v, torch.Tensor)]
    return found


def _writes_in_place(call: _Call) -> bool:
    name = _name(call.func)
    return (name.endswith("_") and not name.startswith("__")) or name in ("__setitem__", "__iadd__", "__isub__",
                                                                          "__imul__", "__itruediv__") \
        or "out" in call.kwargs


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.requires_grad == b.requires_grad)


_NEUTRAL = {"add": (0.0, (0, 1)), "sub": (0.0, (1,)), "mul": (1.0, (0, 1)), "div": (1.0, (1,))}


def _identity_of(call: _Call, name: str, alive: list, constant: set) -> Optional[int]:
    """The slot ``call`` returns unchanged, where it adds or subtracts a constant zero, or multiplies or
    divides by a constant one (the prior's loc and scale), and changes neither shape nor type; else None."""
    if name not in _NEUTRAL or call.kwargs or call.kw_slots or len(call.arg_slots) != 2 or not call.single:
        return None
    neutral, positions = _NEUTRAL[name]
    slots = dict(call.arg_slots)
    out = alive[call.outputs[0]]
    for position in positions:
        other = slots.get(1 - position)
        if slots.get(position) in constant and other not in constant and other is not None:
            value, kept = alive[slots[position]], alive[other]
            if (kept.shape == out.shape and kept.dtype == out.dtype and kept.requires_grad == out.requires_grad
                    and bool((value == neutral).all())):
                return other
    return None


def simplify(calls: list, alive: list, folded: dict, result: int, fold: bool = True) -> tuple:
    """``(calls, constants, result)``: the recording without the views that change nothing (their outputs
    become their inputs) and, with ``fold``, without the calls on constants alone (their outputs, as
    recorded, become ``constants``, ``{slot: tensor}``). Nothing is folded in a recording that writes
    into a constant, and no ``x + 0`` is dropped where a write in place could tell ``x`` from the sum."""
    alias, constant, kept, identities = {}, set(), [], set()
    for call in calls:
        if alias:
            call = replace(call, arg_slots=[(i, alias.get(s, s)) for i, s in call.arg_slots],
                           kw_slots=[(k, alias.get(s, s)) for k, s in call.kw_slots])
        name = _name(call.func)
        if name in _VIEWS and len(call.arg_slots) == len(call.outputs) and not call.kw_slots:
            inputs = [s for _, s in sorted(call.arg_slots)]
            if all(_same_view(alive[o], alive[s]) for o, s in zip(call.outputs, inputs)):
                alias.update(zip(call.outputs, inputs))
                continue
        if fold and (other := _identity_of(call, name, alive, constant)) is not None:
            alias[call.outputs[0]] = other  # x + 0, x - 0, x * 1, x / 1: x
            identities.add(other)
            continue
        if fold and call.outputs and not any(alive[o].requires_grad for o in call.outputs) and (
                name in _LIKE or name in _PURE and all(s in constant if s is not None else id(t) in folded
                                                       for s, t in _tensor_args(call))):
            constant.update(call.outputs)
            continue
        kept.append(call)
    result = alias.get(result, result)
    written = {c.arg_slots[0][1] for c in kept if _writes_in_place(c) and c.arg_slots[:1]}
    if result in constant or written & (constant | identities):
        return simplify(calls, alive, folded, result, fold=False)  # a constant or an x + 0 written into
    return kept, {s: alive[s] for s in constant}, result


class _Recording:
    """A replayable list of calls: inputs in slots ``0..n-1``, constants in theirs, the result in slot
    ``result``. It is replayed as straight-line Python generated from the calls (``source``), one
    statement per call, which costs a fraction of interpreting the list."""

    def __init__(self, calls: list, num_inputs: int, result: int, constants: Optional[dict] = None):
        self.calls = calls
        self.source, self.replay = _compile(calls, num_inputs, result, constants or {})
        self.verified = False


def _tensor_leaves(out) -> list:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _structured(func, spec, leaves):
    args, kwargs = tree_unflatten(leaves, spec)
    return func(*args, **kwargs)


def _compile(calls: list, num_inputs: int, result: int, constants: dict) -> tuple:
    """``(source, replay)``: a function ``replay(inputs)`` running ``calls`` on ``inputs``, with every
    object the calls use other than recorded tensors (functions, parameters, constants, Python
    values) bound by name in its namespace."""
    namespace = {"_no_grad": torch.no_grad, "_leaves": _tensor_leaves, "_structured": _structured}

    def bind(value) -> str:
        hint = _name(value) if callable(value) else ""
        name = f"{hint if hint.isidentifier() else 'k'}_{len(namespace)}"
        namespace[name] = value
        return name

    lines = ["def replay(inputs):"]
    if num_inputs:
        lines.append(f"    {', '.join(f's{i}' for i in range(num_inputs))}, = inputs")
    lines += [f"    s{slot} = {bind(value)}" for slot, value in constants.items()]
    for call in calls:
        args = [bind(a) for a in call.args]
        for i, slot in call.arg_slots:
            args[i] = f"s{slot}"
        if call.spec is not None:
            expr = f"_structured({bind(call.func)}, {bind(call.spec)}, [{', '.join(args)}])"
        else:
            kwargs = {k: bind(v) for k, v in call.kwargs.items()}
            kwargs.update({k: f"s{slot}" for k, slot in call.kw_slots})
            named = [f"{k}={v}" if k.isidentifier() else f"**{{{k!r}: {v}}}" for k, v in kwargs.items()]
            expr = f"{bind(call.func)}({', '.join(args + named)})"
        if call.single:
            statement = f"s{call.outputs[0]} = {expr}"
        elif call.outputs:
            statement = f"{', '.join(f's{o}' for o in call.outputs)}, = _leaves({expr})"
        else:
            statement = expr
        lines += [f"    {statement}"] if call.grad else ["    with _no_grad():", f"        {statement}"]
    lines.append(f"    return s{result}")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<pvae.tape recording>", "exec"), namespace)  # noqa: S102 - code generated above
    return source, namespace["replay"]


def record(fn: Callable, inputs: list) -> tuple:
    """``(fn(*inputs), recording, problem)``: one run of ``fn`` with its torch operations recorded; the
    recording is None, and ``problem`` says why, where a replay would differ (see the module
    docstring). ``fn`` must return one tensor."""
    recorder = _Recorder(inputs)
    with recorder:
        result = fn(*inputs)
    problem = recorder.problem
    if problem is None and (not isinstance(result, torch.Tensor) or id(result) not in recorder.slot_of):
        problem = "the objective's value did not come from a recorded operation"
    if problem is None and any(not c.grad and recorder.alive[o].requires_grad for c in recorder.calls for o in c.outputs):
        problem = "it uses a custom torch.autograd.Function, whose backward a recording cannot see"
    if problem is not None:
        return result, None, problem
    calls, constants, slot = simplify(recorder.calls, recorder.alive, recorder.folded, recorder.slot_of[id(result)])
    return result, _Recording(calls, len(inputs), slot, constants), None


class Tape:
    """Runs an objective plainly, or replays its recording, per key (see the module docstring).

    The first replay of each recording is checked: the objective runs plainly (without gradients)
    from the same random state, and a value that differs turns the tape off.

    :param on_problem: called once with the reason when the tape turns off; from then on every call
        runs the objective.
    """

    def __init__(self, on_problem: Optional[Callable] = None):
        self.on_problem = on_problem
        self.recordings = {}  # key -> _Recording, most recently used last
        self.last_key = None
        self.off = False

    def __call__(self, fn: Callable, key, inputs: list) -> torch.Tensor:
        """``fn(*inputs)``, or its replay. ``fn`` reads tensors from ``inputs`` only; everything else
        it depends on must be in ``key``."""
        if self.off:
            return fn(*inputs)
        recording = self.recordings.get(key)
        if recording is None:
            if key != self.last_key:  # the first time in a row: run plainly, record if it comes again
                self.last_key = key
                return fn(*inputs)
            result, recording, problem = record(fn, inputs)
            if recording is None:
                self._turn_off(problem)
            else:
                self.recordings[key] = recording
                while len(self.recordings) > MAX_TAPES:
                    self.recordings.pop(next(iter(self.recordings)))
            return result
        self.recordings[key] = self.recordings.pop(key)  # most recently used
        self.last_key = key
        if recording.verified:
            return recording.replay(inputs)
        devices = [t.device for t in inputs if t.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            expected = fn(*inputs)
        try:
            result = recording.replay(inputs)
        except Exception as e:  # noqa: BLE001 - any failure of a replay means: run the programs instead
            self._turn_off(f"replaying it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return fn(*inputs)
        if not torch.allclose(result.detach(), expected, rtol=1e-5, atol=1e-6, equal_nan=True):
            self._turn_off(f"a replay gave {result.item():.6g} where the programs give {expected.item():.6g} "
                           "(do they branch on the data's values?)")
            return fn(*inputs)
        recording.verified = True
        return result

    def _turn_off(self, problem: str) -> None:
        self.off = True
        self.recordings.clear()
        if self.on_problem is not None:
            self.on_problem(problem)


def tensor_key(tensors) -> tuple:
    """The shapes, dtypes and devices of ``tensors``: what a recording depends on."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
