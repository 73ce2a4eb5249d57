"""A model's latent sites as a guide built from one traced run sees them, and the two pieces every
guide family here is made of.

:func:`model_sites` reads a model's trace (as Pyro's autoguides do in ``_setup_prototype``): each
latent site's support, shapes and plates, mapped to unconstrained space by
``torch.distributions.biject_to``. A site in the ``"data"`` plate is *local* (one value per
datapoint), any other is *global*.

- :class:`LocalFamily`: q for every local site, as one flat parameter vector per datapoint. Per
  continuous site a diagonal Normal in unconstrained space (its ``loc`` and ``scale``), pushed
  through ``biject_to(support)``, or with ``point=True`` a point mass there (its ``loc`` alone: an
  autoencoder's code); per discrete site that the model does not enumerate, a Bernoulli,
  categorical or one-hot categorical over its values (``logits``). The amortized guide computes the
  vector with an encoder, the mean-field guide looks it up in a per-datapoint table, the
  semi-amortized guide refines the encoder's, the gap study optimizes it: one family, four sources.
- :class:`GlobalGuide`: a mean-field Normal in unconstrained space for every global site, as Pyro's
  ``AutoNormal``; each of the three guides holds one when the model has global sites.
"""

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import biject_to

from pvae.programs import DATA, Batch, ProgramError, as_program, data_frame, is_enumerated, latent_sites, trace_model

SCALE_FLOOR = 1e-6  # added to every softplus scale: keeps it positive in float32


def inverse_softplus(y):
    """:math:`\\log(e^y - 1)`, the inverse of softplus, for ``y > 0`` (a float or a tensor)."""
    if torch.is_tensor(y):
        return y + torch.log(-torch.expm1(-y))
    return y + math.log(-math.expm1(-y))


@dataclass(frozen=True)
class LatentSite:
    """One latent site of a model.

    :param kind: ``continuous``, or for discrete sites ``bernoulli``, ``categorical`` or ``one_hot``.
    :param shape: the shape of one datapoint's value (local) or of the whole value (global): for a
        continuous site in unconstrained space, for a discrete site as sampled; the data axis removed.
    :param event_dim: how many of ``shape``'s rightmost dimensions are event dimensions.
    :param data_axis: where the data axis sits in the site's value; None for a global site.
    :param plates: ``(name, size, dim)`` of the site's vectorized plates other than ``"data"``.
    :param num_categories: K of a categorical site.
    """

    name: str
    support: constraints.Constraint
    kind: str
    shape: tuple
    event_dim: int
    data_axis: Optional[int]
    data_dim: int = -1
    plates: tuple = ()
    num_categories: int = 0

    @property
    def is_local(self) -> bool:
        return self.data_axis is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_params(self) -> int:
        """Flat parameters per datapoint: loc and scale, or the logits."""
        if self.kind == "continuous":
            return 2 * self.numel
        return self.numel * (self.num_categories if self.kind == "categorical" else 1)

    def unflatten(self, flat: torch.Tensor, extra: tuple = ()) -> torch.Tensor:
        """``(B, numel * prod(extra))`` -> the site's batch layout, the data axis where the model has it."""
        value = flat.reshape(flat.shape[0], *self.shape, *extra)
        return value.movedim(0, self.data_axis) if self.data_axis else value

    def plate_stack(self) -> ExitStack:
        """The site's plates other than ``"data"``, entered."""
        stack = ExitStack()
        for name, size, dim in self.plates:
            stack.enter_context(pyro.plate(name, size, dim=dim))
        return stack


def gaussian_sites(latent_dim: int, name: str = "z") -> tuple:
    """The one site of the built-in VAE: ``name`` real-valued in R^latent_dim, per datapoint."""
    return (LatentSite(name, constraints.real, "continuous", (latent_dim,), 1, data_axis=0),)


def model_sites(model, batch: Batch) -> tuple:
    """Every latent site of ``model`` that a guide must sample (enumerated ones are the model's), in
    the model's order, from one run on ``batch``."""
    return trace_sites(trace_model(model, batch))


def trace_sites(trace) -> tuple:
    """Every latent site of a trace, enumerated ones left out, as :class:`LatentSite` s in its order."""
    return tuple(_latent_site(name, site) for name, site in latent_sites(trace).items() if not is_enumerated(site))


def _latent_site(name: str, site: dict) -> LatentSite:
    fn, value = site["fn"], site["value"]
    frame = data_frame(site)
    batch_shape = tuple(fn.batch_shape)
    plates = tuple((f.name, f.size, f.dim) for f in site["cond_indep_stack"] if f.vectorized and f.name != DATA)
    if frame is not None and len(batch_shape) + frame.dim < 0:
        raise ProgramError(f"latent site {name!r} is in the {DATA!r} plate but has no batch dimension for it")
    data_dim = frame.dim if frame is not None else -1
    axis = None if frame is None else len(batch_shape) + frame.dim
    support = fn.support
    if getattr(support, "is_discrete", False):
        kind, k = _discrete_kind(name, support, value)
        shape = list(value.shape)
        event_dim = fn.event_dim
    else:
        try:
            unconstrained = biject_to(support).inv(value)
        except NotImplementedError as e:
            raise ProgramError(f"latent site {name!r} has a support ({support}) that pvae cannot map to R^n: {e}") from e
        kind, k = "continuous", 0
        shape = list(unconstrained.shape)
        event_dim = unconstrained.dim() - len(batch_shape)
    if axis is not None:
        del shape[axis]
    return LatentSite(name, support, kind, tuple(shape), event_dim, axis, data_dim, plates, k)


def _base(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _is_real(support) -> bool:
    return _base(support) is constraints.real


def _discrete_kind(name, support, value) -> tuple:
    base = _base(support)
    if base is constraints.boolean:
        return "bernoulli", 0
    if isinstance(base, constraints.integer_interval) and base.lower_bound == 0:
        return "categorical", int(base.upper_bound) + 1
    if base is constraints.one_hot:
        return "one_hot", value.shape[-1]
    raise ProgramError(
        f"discrete latent site {name!r} has support {support}: pvae's guides sample Bernoulli, categorical and "
        "one-hot sites; mark it `infer={'enumerate': 'parallel'}` in the model to sum it out, or write its guide"
    )


def _distribution(site: LatentSite, params: dict):
    """q of one site from its parameters in the site's batch layout: no ``scale`` makes a point mass."""
    if site.kind == "continuous" and "scale" not in params:
        return dist.Delta(biject_to(site.support)(params["loc"]), event_dim=site.event_dim)
    if site.kind == "continuous":
        base = dist.Normal(params["loc"], params["scale"]).to_event(site.event_dim)
        if _is_real(site.support):
            return base
        return dist.TransformedDistribution(base, biject_to(site.support))
    logits = params["logits"]
    if site.kind == "bernoulli":
        return dist.Bernoulli(logits=logits).to_event(site.event_dim)
    if site.kind == "categorical":
        return dist.Categorical(logits=logits).to_event(site.event_dim)
    return dist.OneHotCategorical(logits=logits).to_event(max(site.event_dim - 1, 0))


class LocalFamily:
    """q of every local site, from one flat vector of ``size`` numbers per datapoint (see the module
    docstring). ``unpack`` turns the vector into per-site parameters (softplus on the scales),
    ``pack`` goes back, ``sample`` draws the sites inside their plates.

    Parameters are dicts ``{site: {"loc": (B, n), "scale": (B, n)}}`` (continuous; ``{"loc": (B, n)}``
    for a point mass) or ``{site: {"logits": (B, n * K)}}`` (discrete), one row per datapoint, flat
    over the site's shape.

    :param point: every continuous site a point mass :math:`\\delta(z - \\mathrm{loc})` rather than a
        Normal: q has no density, and the ELBO's estimate is :math:`\\log p(x, z)` at z = loc.
    """

    def __init__(self, sites, point: bool = False):
        self.sites = tuple(s for s in sites if s.is_local)
        self.point = point
        self.slices, offset = {}, 0
        for site in self.sites:
            if site.kind == "continuous":
                self.slices[site.name] = {"loc": slice(offset, offset + site.numel)}
                if not point:
                    self.slices[site.name]["scale"] = slice(offset + site.numel, offset + 2 * site.numel)
                offset += site.numel * len(self.slices[site.name])
            else:
                self.slices[site.name] = {"logits": slice(offset, offset + site.num_params)}
                offset += site.num_params
        self.size = offset

    @property
    def continuous(self) -> tuple:
        return tuple(s for s in self.sites if s.kind == "continuous")

    @property
    def latent_size(self) -> int:
        """Continuous dimensions per datapoint, all local sites together."""
        return sum(s.numel for s in self.continuous)

    def init_raw(self, rows: int, init_scale: float = 1.0, device=None) -> torch.Tensor:
        """``(rows, size)``: every loc 0, every scale ``init_scale``, every logit 0 (uniform)."""
        raw = torch.zeros(rows, self.size, device=device)
        for site in self.continuous if not self.point else ():
            raw[:, self.slices[site.name]["scale"]] = inverse_softplus(init_scale - SCALE_FLOOR)
        return raw

    def unpack(self, raw: torch.Tensor) -> dict:
        params = {}
        for site in self.sites:
            s = self.slices[site.name]
            if site.kind == "continuous":
                params[site.name] = {"loc": raw[:, s["loc"]]}
                if not self.point:
                    params[site.name]["scale"] = F.softplus(raw[:, s["scale"]]) + SCALE_FLOOR
            else:
                params[site.name] = {"logits": raw[:, s["logits"]]}
        return params

    def pack(self, params: dict) -> torch.Tensor:
        parts = []
        for site in self.sites:
            p = params[site.name]
            if site.kind == "continuous":
                parts.append(p["loc"])
                if not self.point:
                    parts.append(inverse_softplus((p["scale"] - SCALE_FLOOR).clamp(min=SCALE_FLOOR)))
            else:
                parts.append(p["logits"])
        return torch.cat(parts, -1)

    def distributions(self, params: dict) -> dict:
        out = {}
        for site in self.sites:
            p = params[site.name]
            if site.kind == "continuous":
                shaped = {k: site.unflatten(v) for k, v in p.items()}
            else:
                extra = (site.num_categories,) if site.kind == "categorical" else ()
                shaped = {"logits": site.unflatten(p["logits"], extra)}
            out[site.name] = _distribution(site, shaped)
        return out

    def sample(self, params: dict, batch: Batch, noise: Optional[torch.Tensor] = None) -> dict:
        """``pyro.sample`` every local site from ``params`` (rows of ``batch``) in its plates.

        :param noise: ``(B, latent_size)`` standard normal draws, one row per datapoint, from which the
            continuous sites take their values, :math:`z = T(\\mu + \\sigma \\epsilon)`, instead of fresh
            ones (common random numbers: the draws of an objective held fixed while its parameters
            move). The values stay differentiable in ``params``; discrete sites are drawn afresh.
        """
        values = {}
        if not self.sites:
            return values
        fixed = {} if noise is None else self.reparameterize(params, noise)
        with ExitStack() as stack:
            stack.enter_context(pyro.plate(DATA, batch.num_data, subsample=batch.idx, dim=self.sites[0].data_dim))
            if fixed:
                stack.enter_context(_LatentValues(fixed))
            for site, fn in zip(self.sites, self.distributions(params).values()):
                with site.plate_stack():
                    values[site.name] = pyro.sample(site.name, fn)
        return values

    def loc_scale(self, params: dict, name: str) -> tuple:
        """``(loc, scale)`` per dimension of the continuous site ``name`` in unconstrained space, ``(B, n)``
        (the scale of a point mass is 0)."""
        loc = params[name]["loc"]
        return loc, params[name]["scale"] if "scale" in params[name] else torch.zeros_like(loc)

    def loc_units(self, raw: torch.Tensor) -> torch.Tensor:
        """``(rows, size)``: the natural unit of each parameter at ``raw``, the site's scales for the
        locs and 1 for the rest (q*'s optimizer moves the locs in these units)."""
        units, params = torch.ones_like(raw), self.unpack(raw)
        for site in self.continuous:
            units[:, self.slices[site.name]["loc"]] = params[site.name]["scale"]
        return units

    def inverse_fisher(self, params: dict) -> dict:
        """The diagonal of the inverse Fisher information of q in the coordinates that
        :func:`~pvae.guides.semi_amortized.refine` steps in, at ``params``: a Normal's Fisher in
        :math:`(\\mu, \\log\\sigma)` is :math:`\\mathrm{diag}(1 / \\sigma^2, 2)`, so ``scale**2`` for each loc
        and 1/2 for each log-scale; a point mass has no Fisher, and its locs take 1 (a plain step).
        ``{site: {key: (B, n)}}`` for the continuous sites."""
        out = {}
        for site in self.continuous:
            p = params[site.name]
            if self.point:
                out[site.name] = {"loc": torch.ones_like(p["loc"])}
            else:
                out[site.name] = {"loc": p["scale"].square(), "scale": torch.full_like(p["scale"], 0.5)}
        return out

    def reparameterize(self, params: dict, noise: torch.Tensor) -> dict:
        """The continuous sites' values :math:`T(\\mu + \\sigma \\epsilon)` at the draws ``noise``,
        ``(B, latent_size)`` with the sites' dimensions in order, each in its site's batch layout."""
        values, offset = {}, 0
        for site in self.continuous:
            eps = noise[:, offset:offset + site.numel]
            offset += site.numel
            p = params[site.name]
            value = site.unflatten(p["loc"] + p["scale"] * eps)
            values[site.name] = value if _is_real(site.support) else biject_to(site.support)(value)
        return values

    def describe(self) -> str:
        kind = lambda s: "point mass" if self.point and s.kind == "continuous" else s.kind  # noqa: E731
        return ", ".join(f"{s.name} {kind(s)} {tuple(s.shape)}" for s in self.sites) or "no local sites"


def point_mass(sites) -> LocalFamily:
    """The family of an autoencoder's code: every continuous local site a point mass at its ``loc``
    (``AmortizedGuide(model, family=point_mass)``, ``mlp_guide(..., family=point_mass)``)."""
    return LocalFamily(sites, point=True)


class _LatentValues(Messenger):
    """Gives latent sites the values ``values`` in place of a draw: like ``poutine.replay``, the sites
    stay latent (their log-density counts in the ELBO), but the values are computed by the caller."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


class GlobalGuide(nn.Module):
    """A mean-field Normal in unconstrained space for every global (continuous) site, as Pyro's
    ``AutoNormal``: ``loc`` starts at the prior's mean mapped to unconstrained space (or the traced
    value where the prior has none), the scale at ``init_scale``."""

    def __init__(self, sites, prototype: dict, init_scale: float = 0.1):
        super().__init__()
        self.sites = tuple(s for s in sites if not s.is_local)
        self.locs, self.raw_scales = nn.ParameterDict(), nn.ParameterDict()
        for site in self.sites:
            if site.kind != "continuous":
                raise ProgramError(
                    f"global latent site {site.name!r} is discrete: mark it `infer={{'enumerate': 'parallel'}}` in "
                    "the model, or write its guide"
                )
            init = biject_to(site.support).inv(prototype[site.name]).detach().reshape(site.shape)
            self.locs[_key(site.name)] = nn.Parameter(init.clone())
            self.raw_scales[_key(site.name)] = nn.Parameter(torch.full_like(init, inverse_softplus(init_scale - SCALE_FLOOR)))

    def forward(self) -> dict:
        values = {}
        for site in self.sites:
            key = _key(site.name)
            fn = _distribution(site, {"loc": self.locs[key], "scale": F.softplus(self.raw_scales[key]) + SCALE_FLOOR})
            with site.plate_stack():
                values[site.name] = pyro.sample(site.name, fn)
        return values

    @torch.no_grad()
    def global_means(self) -> dict:
        """Each global site at its guide's median: the unconstrained mean mapped to the support."""
        return {s.name: biject_to(s.support)(self.locs[_key(s.name)]) for s in self.sites}


def _key(name: str) -> str:
    return name.replace(".", "_")


def prototype_values(model, batch: Batch, names) -> dict:
    """The prior's mean (else a traced draw) of the sites ``names``: where a global guide starts."""
    trace = trace_model(model, batch)
    values = {}
    for name in names:
        site = trace.nodes[name]
        try:
            mean = site["fn"].mean
            values[name] = mean if torch.isfinite(mean).all() and site["fn"].support.check(mean).all() else site["value"]
        except (NotImplementedError, AttributeError):
            values[name] = site["value"]
        values[name] = values[name].expand_as(site["value"]).detach()
    return values


class SiteGuide(nn.Module):
    """What the three guides share: the sites found in the model (lazily, at the first call, as Pyro's
    autoguides do), a family of q over the local ones (by default the diagonal :class:`LocalFamily`;
    ``family`` builds another from the sites, :mod:`pvae.guides.flows`), a :class:`GlobalGuide` over the
    global ones, and Pyro's calling conventions. Subclasses set up their parameters in
    :meth:`_setup_local` and give each batch's parameters in :meth:`local_params`."""

    def __init__(self, model=None, sites=None, family=LocalFamily):
        super().__init__()
        if model is None and sites is None:
            raise ValueError("give the model the guide is built from, or its sites")
        object.__setattr__(self, "model", model)  # by reference: the model's weights are its own
        self.make_family = family
        self.sites = tuple(sites) if sites is not None else None
        self.family = family(self.sites) if sites is not None else None
        self.globals_ = None
        self._ready = False

    def setup(self, batch) -> "SiteGuide":
        """Build the guide's parameters from one traced run of the model on ``batch`` (done by the first
        call; call it yourself to have the parameters before that)."""
        batch = Batch.of(batch)
        if self.sites is None:
            self.sites = model_sites(self.model, batch)
            self.family = self.make_family(self.sites)
        global_sites = [s for s in self.sites if not s.is_local]
        if global_sites:
            prototype = prototype_values(self.model, batch, [s.name for s in global_sites])
            self.globals_ = GlobalGuide(global_sites, prototype).to(batch.x.device)
        self._setup_local(batch)
        self._ready = True
        return self

    def _setup_local(self, batch: Batch) -> None:
        raise NotImplementedError

    def local_params(self, batch: Batch) -> dict:
        raise NotImplementedError

    def call_batch(self, batch: Batch):
        if not self._ready:
            self.setup(batch)
        values = self.globals_() if self.globals_ is not None else {}
        values.update(self.family.sample(self.local_params(batch), batch))
        return values

    def forward(self, *args, **kwargs):
        """Called as the model is (``guide(x, y)``, ``guide(x, idx=..., num_data=...)``) or with a Batch."""
        return self.call_batch(batch_from_call(self.model, args, kwargs))

    def global_means(self) -> dict:
        return self.globals_.global_means() if self.globals_ is not None else {}


def batch_from_call(model, args: tuple, kwargs: dict) -> Batch:
    """A :class:`Batch` from a program's call arguments: x first, then what the model's signature names."""
    if args and isinstance(args[0], Batch):
        return args[0]
    if not args:
        raise TypeError("a guide is called with the data x first")
    kwargs = dict(kwargs)
    idx, num_data = kwargs.pop("idx", None), kwargs.pop("num_data", None)
    if len(args) > 1:
        program = as_program(model) if model is not None else None
        names = [n for n in getattr(program, "named", []) if n not in ("idx", "num_data")]
        if len(names) < len(args) - 1:
            raise TypeError(f"the guide got {len(args)} positional arguments; pass side inputs by name")
        kwargs.update(dict(zip(names, args[1:])))
    inputs = {k: v for k, v in kwargs.items() if torch.is_tensor(v) and v.dim() and v.shape[0] == args[0].shape[0]}
    return Batch.of(args[0], idx, num_data, inputs)
