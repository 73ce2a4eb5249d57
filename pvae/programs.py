"""Programs as users write them, and what one traced run tells of them.

A model and a guide are Pyro programs written the way Pyro's tutorials write them::

    def model(x):                                   # or model(x, y), a bound method, an nn.Module
        pyro.module("decoder", decoder)             # optional
        with pyro.plate("data", x.shape[0]):        # the datapoints' plate, named "data"
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

pvae calls them on a :class:`Batch`: a minibatch of rows of one split of the data, their positions
``idx`` in it, the split's size ``num_data`` and the rows' side inputs (labels, covariates).
:class:`Program` passes ``x`` first, each side input to the parameter of its name, and ``idx`` /
``num_data`` to programs that take them (the :func:`data_plate` convention), and runs the program
under :class:`ScaleToData`, which scales every site in the ``"data"`` plate by
``num_data / plate size``: the minibatch ELBO is then an unbiased estimate of the data set's, as
with a subsampled plate, whichever way the program wrote its plate.

:func:`inspect_programs` traces a model/guide pair once and says what the objectives, the guides
and the diagnostics need to know (:class:`ProgramInfo`): the plate nesting, the data plate's
dimension, which latent sites are local (in the data plate) or global, discrete, enumerated, and
where a closed-form KL is exact. A program that cannot be served gets a :class:`ProgramError`
that names the site and what to change.
"""

import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.distributions import Delta
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, biject_to, kl_divergence

DATA = "data"  # the name of the datapoints' plate
PARTICLES = "particles"  # the vectorized plate of Monte Carlo samples pvae puts around programs


class ProgramError(ValueError):
    """A model or guide that pvae cannot serve as written; the message names the site and the fix."""


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """Rows of one split of a data set, as programs are called with them.

    :param x: ``(B, ...)`` the observed data.
    :param idx: ``(B,)`` the rows' positions in their split (a per-datapoint guide's rows).
    :param num_data: the split's size N; sites in the ``"data"`` plate are scaled by N / B.
    :param inputs: side inputs by name, each ``(B, ...)`` with the rows of ``x``.
    :param split: the split's name (``"train"``, ``"test"``, ...), None when unknown.
    """

    x: torch.Tensor
    idx: torch.Tensor
    num_data: int
    inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    split: Optional[str] = None

    @classmethod
    def of(cls, x, idx=None, num_data=None, inputs=None, split=None) -> "Batch":
        """A batch from tensors; ``idx`` defaults to rows ``0..B-1`` and ``num_data`` to B."""
        if isinstance(x, Batch):
            return x
        if not torch.is_tensor(x):
            raise TypeError(f"the data must be a tensor or a pvae Batch, not {type(x).__name__}")
        if idx is None:
            idx = torch.arange(x.shape[0], device=x.device)
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"idx has {idx.shape[0]} rows but x has {x.shape[0]}")
        inputs = dict(inputs or {})
        for name, value in inputs.items():
            if not torch.is_tensor(value) or value.shape[:1] != x.shape[:1]:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"side input {name!r} must have one row per datapoint ({x.shape[0]}), got {shape}")
        return cls(x, idx, int(x.shape[0] if num_data is None else num_data), inputs, split)

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, rows) -> "Batch":
        """The sub-batch of the rows ``rows`` (a slice or an index tensor), with the same ``num_data``."""
        return replace(self, x=self.x[rows], idx=self.idx[rows], inputs={k: v[rows] for k, v in self.inputs.items()})

    def split_rows(self, size: int) -> list:
        """Consecutive sub-batches of at most ``size`` rows."""
        return [self.rows(slice(start, start + size)) for start in range(0, len(self), size)]

    def to(self, device) -> "Batch":
        return replace(self, x=self.x.to(device), idx=self.idx.to(device),
                       inputs={k: v.to(device) for k, v in self.inputs.items()})


# ----------------------------------------------------------------------------- calling programs


class ScaleToData(Messenger):
    """Scale every sample site in the ``"data"`` plate by ``num_data / (the plate's full size)``.

    A plate written as ``pyro.plate("data", x.shape[0])`` over a minibatch gets N / B; one written
    with ``subsample=idx`` and size N (:func:`data_plate`) already scales itself, and gets 1.
    """

    def __init__(self, num_data: int):
        super().__init__()
        self.num_data = num_data

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == DATA:
                full = frame.full_size or frame.size
                if full != self.num_data:
                    msg["scale"] = msg["scale"] * (self.num_data / full)
                return


@runtime_checkable
class BatchProgram(Protocol):
    """A program that takes a :class:`Batch` whole (pvae's own guides): :class:`Program` hands it the
    batch instead of unpacking it into arguments."""

    def call_batch(self, batch: Batch): ...


_RESERVED = ("idx", "num_data")


class Program:
    """A user's Pyro program, called on :class:`Batch` es.

    The program's first parameter receives ``x``; a parameter named like a side input receives it;
    ``idx`` and ``num_data`` are passed to programs that declare them; ``**kwargs`` receives the side
    inputs no other parameter took. A required parameter that the batch cannot fill is an error
    that names it.
    """

    def __init__(self, fn: Callable, role: str = "model", conditions: Optional[dict] = None):
        if isinstance(fn, Program):
            conditions = {**fn.conditions, **(conditions or {})}
            fn = fn.fn
        self.conditions = dict(conditions or {})
        self.fn, self.role = fn, role
        self.takes_batch = isinstance(fn, BatchProgram)
        if self.takes_batch:
            return
        if not callable(fn):
            raise ProgramError(f"the {role} must be a callable Pyro program, not {type(fn).__name__}")
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # builtins and C callables: x only
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise ProgramError(f"the {role} {self.name} takes no arguments: it must take the data x as its first one")
        self.x_name = positional[0].name if positional else None
        rest = [p for p in params if p.name != self.x_name and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        self.named = [p.name for p in rest]
        self.required = [p.name for p in rest if p.default is p.empty and p.name not in _RESERVED]
        self.var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__

    def arguments(self, batch: Batch) -> tuple:
        """``(args, kwargs)`` with which the program is called on ``batch``."""
        missing = [n for n in self.required if n not in batch.inputs]
        if missing:
            have = ", ".join(batch.inputs) or "none"
            raise ProgramError(
                f"the {self.role} {self.name} needs {', '.join(repr(m) for m in missing)}, which the data do not "
                f"carry (side inputs: {have}): give the data set side inputs of those names "
                "(pvae.Dataset.from_tensors(..., inputs=...) or Dataset.with_inputs)"
            )
        kwargs = {n: batch.inputs[n] for n in self.named if n in batch.inputs and n not in _RESERVED}
        if "idx" in self.named:
            kwargs["idx"] = batch.idx
        if "num_data" in self.named:
            kwargs["num_data"] = batch.num_data
        if self.var_keyword:
            kwargs.update({n: v for n, v in batch.inputs.items() if n not in kwargs and n != self.x_name})
        return (batch.x,), kwargs

    def conditioned(self, values: dict) -> "Program":
        """The program with the sites ``values`` fixed (observed) at those values."""
        return Program(self, self.role, values)

    def __call__(self, batch: Batch):
        batch = Batch.of(batch)
        with ScaleToData(batch.num_data), poutine.condition(data=self.conditions):
            if self.takes_batch:
                return self.fn.call_batch(batch)
            args, kwargs = self.arguments(batch)
            return self.fn(*args, **kwargs)


def as_program(fn, role: str = "model") -> Program:
    return fn if isinstance(fn, Program) else Program(fn, role)


def data_plate(x: torch.Tensor, idx=None, num_data=None, dim: int = -1) -> pyro.plate:
    """``pyro.plate("data", num_data, subsample=idx)`` over the first axis of ``x``, on ``x``'s device:
    the plate of programs written ``program(x, idx=None, num_data=None)``. Programs may as well open
    ``pyro.plate("data", x.shape[0])``: pvae scales either to the data set."""
    if idx is None:
        idx = torch.arange(x.shape[0], device=x.device)
    elif idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx has {idx.shape[0]} rows but the batch x has {x.shape[0]}")
    size = idx.shape[0] if num_data is None else int(num_data)
    return pyro.plate(DATA, size, subsample=idx, dim=dim, device=x.device)


# ----------------------------------------------------------------------------- sites


def sample_sites(trace) -> dict:
    """The trace's sample sites, without plates' subsample sites."""
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def latent_sites(trace) -> dict:
    return {n: s for n, s in sample_sites(trace).items() if not s["is_observed"]}


def is_enumerated(site) -> bool:
    return site["infer"].get("enumerate") == "parallel"


def is_auxiliary(site) -> bool:
    return bool(site["infer"].get("is_auxiliary"))


def data_frame(site):
    """The site's ``"data"`` plate frame, or None for a global site."""
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA:
            return frame
    return None


def is_discrete(site) -> bool:
    return bool(getattr(site["fn"].support, "is_discrete", False))


def plate_nesting(*traces) -> int:
    """How many batch dimensions the traces' vectorized plates use."""
    return max((-f.dim for t in traces for s in sample_sites(t).values() for f in s["cond_indep_stack"]
                if f.vectorized), default=0)


# ----------------------------------------------------------------------------- one traced run


@dataclass(frozen=True)
class ProgramInfo:
    """What one traced run of a model and its guide tells.

    :param plate_nesting: batch dimensions their plates use (the particles go left of them).
    :param data_dim: the ``"data"`` plate's (negative) dimension.
    :param local: latent sites of the model in the data plate, in order (enumerated ones included).
    :param global_: latent sites of the model outside it.
    :param enumerated: model sites summed out by enumeration (``infer={"enumerate": "parallel"}``).
    :param guide_latent: latent sites of the guide, auxiliary ones included.
    :param reparameterized: every guide site has ``rsample``: :class:`~pvae.inference.ReparamELBO`
        serves the pair.
    :param analytic_kl: the sites whose closed-form KL(q || p) is exact in the ELBO (see
        :func:`inspect_programs`).
    :param point_mass: guide sites whose q is a point mass (``dist.Delta``: an autoencoder's code, a
        MAP estimate), which has no density.
    :param improper: model sites whose prior is improper (``dist.ImproperUniform``, a flat prior).
    """

    plate_nesting: int
    data_dim: int
    local: tuple
    global_: tuple
    enumerated: tuple
    guide_latent: tuple
    reparameterized: bool
    analytic_kl: frozenset = frozenset()
    discrete: tuple = ()
    point_mass: tuple = ()
    improper: tuple = ()

    @property
    def continuous_local(self) -> tuple:
        return tuple(n for n in self.local if n not in self.enumerated and n not in self.discrete)


def check_bounds_defined(what: str, point_mass=(), improper=()) -> None:
    """Refuse, in one line, to bound log p(x) (``what``: the caller) where no bound means anything: a
    point-mass q (``point_mass``, its sites) has no density, and under an improper prior (``improper``)
    p(x) is not normalized. Their training objective, the ELBO's estimate log p(x, z = f(x)), is still
    what a fit records."""
    if point_mass:
        raise ProgramError(
            f"{what}: the guide's q of site(s) {', '.join(map(repr, point_mass))} is a point mass (an autoencoder's "
            "code, or MAP), which has no density: log p(x), the ELBO's KL and PSIS are not defined for it. Its "
            "objective, log p(x, z = f(x)), is the fit's train/test_elbo; compare reconstructions with "
            "pvae.autoencoding.reconstruction_error"
        )
    if improper:
        raise ProgramError(
            f"{what}: the model's prior of site(s) {', '.join(map(repr, improper))} is improper (a flat prior): p(x) "
            "is not normalized, so no bound on log p(x) means anything; give the site a proper prior to measure "
            "the evidence"
        )


def base_distribution(fn):
    """``fn`` without its ``Independent`` (``.to_event``) and masking (``.mask``) wrappers."""
    while isinstance(fn, (Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def is_improper(fn) -> bool:
    return isinstance(base_distribution(fn), dist.ImproperUniform)


class _FeasibleImproper(Messenger):
    """A model run alone draws every latent from its prior, and an improper prior has nothing to draw: its
    sites get a feasible value instead (the image of 0 in unconstrained space), as Pyro's autoguides
    initialize them."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["value"] is not None or msg["is_observed"] or not is_improper(fn):
            return
        transform = biject_to(fn.support)
        shape = transform.inv.forward_shape(fn.batch_shape + fn.event_shape)
        msg["value"] = transform(torch.zeros(shape, device=self.device))
        msg["done"] = True


def trace_model(model, batch: Batch):
    """One run of the model alone, hidden from any outer handler (particles, KL weights)."""
    batch = Batch.of(batch)
    with torch.no_grad(), poutine.block(), _FeasibleImproper(batch.x.device):
        return run_traced(as_program(model), batch, "model")


_SHAPE_MISMATCH = re.compile(r"Shape mismatch inside plate\('(?P<plate>[^']*)'\) at site (?P<site>\S+) dim (?P<dim>-?\d+), "
                             r"(?P<size>\d+) vs (?P<got>\d+)")


def run_traced(program, batch: Batch, role: Optional[str] = None):
    """The trace of one run of ``program`` on ``batch``; Pyro's shape errors become one line that names the
    site and the fix."""
    role = role or getattr(program, "role", "program")
    try:
        return poutine.trace(program).get_trace(batch)
    except ProgramError as e:  # raised inside the trace, which appends its shapes: the first line says it
        raise ProgramError(str(e).splitlines()[0]) from None
    except ValueError as e:
        found = _SHAPE_MISMATCH.search(str(e))
        if found is None:
            raise
        raise ProgramError(
            f"{role} site {found['site']!r} has {found['got']} where plate {found['plate']!r} has {found['size']} "
            f"(dimension {found['dim']}): give the site one row per datapoint (e.g. `x.new_zeros(len(x), D)`), "
            "with its other dimensions declared by `.to_event`"
        ) from None


def inspect_programs(model, guide, batch: Batch, check: bool = True, dependency_rows: Optional[int] = None) -> ProgramInfo:
    """Trace ``guide`` and the model replayed on it once, and check that pvae can serve them.

    The closed-form KL of a site ``z`` is exact when the latents that the model's density of ``z``
    depends on are not descendants of ``z`` in the guide: then, given them, ``z`` is distributed as
    its guide site says, and :math:`E_q[\\log q(z) - \\log p(z \\mid \\cdot)]` is the KL between the
    two densities at the sampled parents. A guide that samples ``z2`` first and ``z1 | z2`` after
    breaks this for ``p(z2 | z1)``; such sites take the Monte Carlo term. The dependencies are read
    from autograd: which latent values each site's log-density is a function of.

    :param dependency_rows: read those dependencies on the batch's first rows only (they do not depend
        on the batch's size): for programs that run on any rows, as a fit's do. A guide bound to the
        batch's rows (:class:`~pvae.guides.ParamsGuide`) needs the default, the whole batch.
    """
    model, guide = as_program(model, "model"), as_program(guide, "guide")
    batch = Batch.of(batch)
    with torch.no_grad(), poutine.block():
        guide_trace = run_traced(guide, batch)
        try:
            model_trace = run_traced(poutine.replay(model, trace=guide_trace), batch, "model")
        except (RuntimeError, ValueError) as e:
            _explain_shapes(model, batch, guide_trace, e)
            raise
    q_sites, p_sites = latent_sites(guide_trace), sample_sites(model_trace)
    frames = [f for t in (guide_trace, model_trace) for s in sample_sites(t).values()
              for f in s["cond_indep_stack"] if f.vectorized]
    nesting = plate_nesting(guide_trace, model_trace)
    data_dims = {f.dim for f in frames if f.name == DATA}
    if check and not any(data_frame(site) for site in p_sites.values()):
        raise ProgramError(
            f"the model has no plate named {DATA!r}: put its datapoints in "
            f"`with pyro.plate({DATA!r}, x.shape[0]):` (pvae scales that plate to the data set)"
        )
    if len(data_dims) > 1:
        raise ProgramError(f"the {DATA!r} plate appears at several dimensions {sorted(data_dims)}: give it one `dim`")
    data_dim = data_dims.pop() if data_dims else -1

    local, global_, enumerated, discrete = [], [], [], []
    for name, site in p_sites.items():
        frame = data_frame(site)
        if check:
            _check_batch_dim(name, site, frame, data_dim, len(batch), "model")
        if site["is_observed"]:
            if check and frame is None:
                raise ProgramError(
                    f"observed site {name!r} of the model is outside the {DATA!r} plate: observe the data "
                    f"inside `with pyro.plate({DATA!r}, x.shape[0]):`, so that the ELBO is scaled to the data set"
                )
            continue
        (local if frame is not None else global_).append(name)
        if is_enumerated(site):
            enumerated.append(name)
        elif is_discrete(site):
            discrete.append(name)
        if check and name not in q_sites and not is_enumerated(site):
            raise ProgramError(
                f"latent site {name!r} of the model has no site in the guide: sample it in the guide, or mark it "
                "`infer={'enumerate': 'parallel'}` in the model to sum it out"
            )
    for name, site in q_sites.items():
        if check:
            _check_batch_dim(name, site, data_frame(site), data_dim, len(batch), "guide")
            if name not in p_sites and not is_auxiliary(site):
                raise ProgramError(
                    f"guide site {name!r} does not appear in the model: name the guide's sites as the model's "
                    "(mark helper sites `infer={'is_auxiliary': True}`)"
                )
            if name in p_sites and p_sites[name]["is_observed"]:
                raise ProgramError(f"site {name!r} is observed in the model but sampled in the guide")
            if name in enumerated:
                raise ProgramError(f"site {name!r} is enumerated in the model and sampled in the guide: do one")
    reparam = all(getattr(s["fn"], "has_rsample", False) and not is_enumerated(s) for s in q_sites.values())
    analytic = _exact_kl_sites(model, guide, batch, q_sites, p_sites, enumerated, dependency_rows) if reparam \
        else frozenset()
    # a Delta beside an auxiliary site is a transform of that site's draw (a flow guide, Pyro's
    # AutoContinuous), its log-density the Jacobian's term: q has a density then
    views = any(is_auxiliary(s) for s in q_sites.values())
    point_mass = tuple(n for n, s in q_sites.items()
                       if not views and isinstance(base_distribution(s["fn"]), dist.Delta))
    improper = tuple(n for n, s in p_sites.items() if not s["is_observed"] and is_improper(s["fn"]))
    return ProgramInfo(
        plate_nesting=nesting,
        data_dim=data_dim,
        local=tuple(local),
        global_=tuple(global_),
        enumerated=tuple(enumerated),
        guide_latent=tuple(q_sites),
        reparameterized=reparam,
        analytic_kl=analytic,
        discrete=tuple(discrete),
        point_mass=point_mass,
        improper=improper,
    )


def _explain_shapes(model, batch: Batch, guide_trace, error: Exception) -> None:
    """The model failed on the guide's values: if a guide site's shape differs from the model's own
    draw of that site (a latent of the wrong size), say so, rather than the decoder's shape error."""
    try:
        prior_trace = poutine.trace(model).get_trace(batch)
    except Exception:  # the model fails alone too: its own error says more
        return
    p_sites = sample_sites(prior_trace)
    for name, site in latent_sites(guide_trace).items():
        if name in p_sites and site["value"].shape != p_sites[name]["value"].shape:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ProgramError(
                f"guide site {name!r} has shape {tuple(site['value'].shape)} where the model's has "
                f"{tuple(p_sites[name]['value'].shape)}: give the guide's {name!r} the model's size (the model "
                f"failed on the guide's value: {first})") from None


def _check_batch_dim(name, site, frame, data_dim, batch_size, role) -> None:
    if frame is None:
        return
    shape = site["fn"].batch_shape
    position = len(shape) + data_dim
    size = shape[position] if position >= 0 else 1
    if size != batch_size:
        raise ProgramError(
            f"{role} site {name!r} is in the {DATA!r} plate but its batch shape {tuple(shape)} has {size}, not the "
            f"batch's {batch_size}, at the plate's dimension {data_dim}: give the site one row per datapoint "
            "(e.g. `x.new_zeros(len(x), D)`), with its event dimensions declared by `.to_event`"
        )


def _exact_kl_sites(model, guide, batch, q_sites, p_sites, enumerated, rows: Optional[int] = None) -> frozenset:
    """The latent sites with a closed-form KL(q || p) that is exact in the ELBO (see
    :func:`inspect_programs`)."""
    names = [n for n in q_sites if n in p_sites and n not in enumerated]
    candidates = []
    for name in names:
        if isinstance(q_sites[name]["fn"], Delta):
            continue  # a point mass whose density lives in an auxiliary site (a joint family): no KL of its own
        try:
            kl_divergence(q_sites[name]["fn"], p_sites[name]["fn"])
        except NotImplementedError:
            continue
        candidates.append(name)
    if not candidates:
        return frozenset()
    if rows is not None and rows < len(batch):  # a few rows tell the same: traced afresh on them
        batch = batch.rows(slice(0, rows))
        with torch.no_grad(), poutine.block():
            guide_trace = run_traced(guide, batch)
            model_trace = run_traced(poutine.replay(model, trace=guide_trace), batch, "model")
        q_sites, p_sites = latent_sites(guide_trace), sample_sites(model_trace)
    latent_names = list(q_sites)
    q_parents = _parents(guide, batch, q_sites, latent_names)
    p_parents = _parents(model, batch, {n: p_sites[n] for n in names}, latent_names)
    children = {n: {m for m, ps in q_parents.items() if n in ps} for n in latent_names}

    def descendants(name):
        seen, todo = set(), [name]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    return frozenset(n for n in candidates if not (p_parents.get(n, set()) & descendants(n)))


def _parents(program, batch, sites, latent_names) -> dict:
    """For each site in ``sites``: the latents (of ``latent_names``) its log-density depends on, when
    the program is run with every latent it samples fixed to a leaf tensor at its traced value."""
    values = {n: sites[n]["value"].detach().clone().requires_grad_(True) for n in latent_names if n in sites}
    with torch.enable_grad(), poutine.block():
        trace = poutine.trace(poutine.condition(program, data=values)).get_trace(batch)
        parents = {}
        for name in sites:
            others = [n for n in values if n != name]
            try:
                log_p = trace.nodes[name]["fn"].log_prob(values[name])
            except (KeyError, NotImplementedError):  # no density at a given value (a planar flow): any parent
                parents[name] = set(others)
                continue
            if not others or not log_p.requires_grad:
                parents[name] = set()
                continue
            grads = torch.autograd.grad(log_p.sum(), [values[n] for n in others], allow_unused=True,
                                        retain_graph=True)
            parents[name] = {n for n, g in zip(others, grads) if g is not None}
    return parents
