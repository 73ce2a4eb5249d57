"""What a fitted model and its guide say of data, read from their traces: codes, decoded means, prior
draws. Pictures need nothing more, so any Pyro model that pvae fits gets them, without a ``decode``
method.

- **The code of x** (:meth:`ProgramCodec.encode`): the guide run under :class:`AtCentre`, every
  latent site at the centre of its q (:func:`centre`: the mean of a continuous distribution, the
  image of the base's mean for one pushed through a bijection, the mode of a discrete one); the
  guide's continuous local sites (those the model has), mapped to unconstrained space
  (``biject_to`` of the guide's support, inverted) and flattened, one row of D numbers per datapoint.
- **The decoded mean of a code** (:meth:`ProgramCodec.decode`): the model run with its local sites
  fixed at the code's values (``poutine.condition``) and its global sites at the guide's centre; the
  mean of the observed site's distribution, read from the trace: :math:`E[x \\mid z]`, what pictures
  of a VAE show. Local sites that the code does not hold (discrete, enumerated) are drawn by the model.
- **A reconstruction** (:meth:`ProgramCodec.reconstruct`): the model run with *every* latent site at
  the guide's centre for x, and the observed site's mean.
- **A prior sample** (:meth:`ProgramCodec.sample`): the model run alone, its local sites drawn from
  the prior, its global sites at the guide's centre; the observed site's mean, or a draw from it.

The programs' modules are read in evaluation mode (``module.eval()``, as :func:`pvae.fit` leaves them;
their modes are restored after each reading): a denoising autoencoder's encoder sees x uncorrupted.

The observed site is the model's one observed site in the ``"data"`` plate, or, when it observes
several (a label beside the image), the one whose value is the data x. Decoding runs the model on
rows of a *context* batch (cycled to the number of codes): their side inputs (a conditional model's
labels) and the shape of x come from there; the value x takes at the observed site does not enter
the mean of its distribution.

A :class:`ProgramCodec` is a :class:`~pvae.protocols.Codec` (``latent_dim``, ``encode``, ``decode``,
``reconstruct``), the interface that :mod:`pvae.autoencoding` and the figures that put coders side by
side ask of a VAE, an autoencoder and PCA alike.
"""

from contextlib import contextmanager
from typing import Optional

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, TransformedDistribution, biject_to

from .programs import Batch, ProgramError, as_program, data_frame, inspect_programs, run_traced, sample_sites

MC_CENTRE_DRAWS = 100  # draws whose mean is the centre of a distribution with no closed-form mean
ENCODE_ROWS = 1000  # datapoints traced at once


def centre(fn) -> torch.Tensor:
    """Where a distribution is centred: the mean of a continuous one (of :data:`MC_CENTRE_DRAWS` draws
    when it has no closed form), its transforms applied to the base's centre for a transformed one (the
    median, for the monotone maps ``biject_to`` gives), the mode of a discrete one."""
    if isinstance(fn, Independent):
        return centre(fn.base_dist)
    if isinstance(fn, TransformedDistribution):
        value = centre(fn.base_dist)
        for transform in fn.transforms:
            value = transform(value)
        return value
    if getattr(fn.support, "is_discrete", False):
        return fn.mode
    try:
        mean = fn.mean
    except NotImplementedError:
        return fn.sample((MC_CENTRE_DRAWS,)).mean(0)
    return mean if bool(torch.isfinite(mean).all()) else fn.sample((MC_CENTRE_DRAWS,)).mean(0)


class AtCentre(Messenger):
    """Every latent sample site takes the :func:`centre` of its distribution instead of a draw."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        msg["value"] = centre(msg["fn"])


def observed_site(trace, x: Optional[torch.Tensor] = None, name: Optional[str] = None) -> str:
    """The name of the model's observed site in the ``"data"`` plate (see the module docstring)."""
    observed = {n: s for n, s in sample_sites(trace).items() if s["is_observed"] and data_frame(s) is not None}
    if name is not None:
        if name not in observed:
            raise ProgramError(f"the model has no observed site {name!r} in the 'data' plate "
                               f"(it observes {', '.join(map(repr, observed)) or 'none'})")
        return name
    if len(observed) == 1:
        return next(iter(observed))
    data = [n for n, s in observed.items() if x is not None and s["value"] is x]
    if len(data) == 1:
        return data[0]
    raise ProgramError(f"the model observes {', '.join(map(repr, observed)) or 'no site'} in the 'data' plate: "
                       "name the one that pictures show (observed='x')")


def per_row(value: torch.Tensor, site: dict, event_dim: int) -> torch.Tensor:
    """A site's tensor (batch shape, then ``event_dim`` event dimensions) as ``(B, -1)``: one flat row
    per datapoint, the data axis first."""
    axis = value.dim() - event_dim + data_frame(site).dim
    return value.movedim(axis, 0).reshape(value.shape[axis], -1)


@contextmanager
def evaluation_mode(*programs):
    """The programs' modules (and their submodules) in evaluation mode, their modes restored after."""
    from .svi import program_modules

    modes = [(m, m.training) for p in programs for top in program_modules(p) for m in top.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def cycle_rows(batch: Batch, n: int) -> Batch:
    """``n`` rows of ``batch``, taken in turn: the context of ``n`` decoded codes."""
    return batch.rows(torch.arange(n, device=batch.x.device) % len(batch))


class ProgramCodec:
    """Codes, decoded means, reconstructions and prior samples of any model/guide pair (module docstring).

    :param model: a Pyro model with its datapoints in the ``"data"`` plate.
    :param guide: its guide (one of :mod:`pvae.guides` or your own).
    :param context: rows of the data, as a :class:`~pvae.programs.Batch`: the model is traced on them
        once here, and decoding and sampling reuse their side inputs.
    :param observed: the observed site to show, when the model observes several.
    """

    def __init__(self, model, guide, context, observed: Optional[str] = None):
        from pvae.guides.sites import trace_sites

        from .evaluate import global_means

        self.model, self.guide = as_program(model, "model"), as_program(guide, "guide")
        self.context = Batch.of(context)
        probe = self.context.rows(slice(0, 8))
        info = inspect_programs(self.model, self.guide, probe)  # checks the pair, sets up lazy guides
        # the model replayed on the guide: its prior may not sample
        with torch.no_grad(), poutine.block(), evaluation_mode(self.model, self.guide):
            guide_trace = run_traced(self.guide, probe, "guide")
            trace = run_traced(poutine.replay(self.model, trace=guide_trace), probe, "model")
        self.observed = observed_site(trace, probe.x, observed)
        # the code is where q lives: the guide's continuous local sites that the model has
        self.sites = tuple(s for s in trace_sites(guide_trace)
                           if s.is_local and s.kind == "continuous" and s.name in info.local)
        self.global_values = global_means(self.guide, probe, info)

    @property
    def latent_dim(self) -> int:
        """D, numbers per code: the continuous local sites' sizes in unconstrained space."""
        return sum(s.numel for s in self.sites)

    @property
    def latent_names(self) -> list:
        """One name per code dimension, ``"z[0]"``, or the site's own name for a scalar site."""
        return [s.name if s.numel == 1 else f"{s.name}[{i}]" for s in self.sites for i in range(s.numel)]

    def guide_values(self, batch) -> dict:
        """Every latent site of the guide at its centre for the rows of ``batch``."""
        batch = Batch.of(batch)
        with torch.no_grad(), poutine.block(), evaluation_mode(self.guide):
            trace = run_traced(AtCentre()(self.guide), batch, "guide")
        return {n: s["value"] for n, s in sample_sites(trace).items() if not s["is_observed"]}

    @torch.no_grad()
    def encode(self, batch) -> torch.Tensor:
        """``(B, D)`` codes of the rows of ``batch`` (a :class:`~pvae.programs.Batch`, or a tensor of x
        for a guide with a q for any x)."""
        batch = Batch.of(batch)
        parts = []
        for rows in batch.split_rows(ENCODE_ROWS):
            values = self.guide_values(rows)
            parts.append(torch.cat([self.flatten(s, values[s.name]) for s in self.sites], -1)
                         if self.sites else rows.x.new_zeros(len(rows), 0))
        return torch.cat(parts)

    def flatten(self, site, value: torch.Tensor) -> torch.Tensor:
        """A site's value, the data axis where the model has it, as ``(B, numel)`` in unconstrained space."""
        unconstrained = biject_to(site.support).inv(value)
        unconstrained = unconstrained.movedim(site.data_axis, 0) if site.data_axis else unconstrained
        return unconstrained.reshape(unconstrained.shape[0], -1)

    def code_values(self, z: torch.Tensor) -> dict:
        """``{site: value}`` of codes ``(n, D)``, each site's slice mapped back to its support."""
        values, start = {}, 0
        for site in self.sites:
            flat = z[:, start : start + site.numel]
            values[site.name] = biject_to(site.support)(site.unflatten(flat))
            start += site.numel
        return values

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch=None) -> torch.Tensor:
        """``(n, P)`` means of the observed site given codes ``z`` ``(n, D)``; the model runs on rows of
        ``batch`` (default: the context), cycled."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"codes of this model have {self.latent_dim} numbers, got {z.shape[-1]}")
        rows = cycle_rows(Batch.of(batch) if batch is not None else self.context, z.shape[0])
        z = z.to(rows.x.device, rows.x.dtype)
        return self.observed_mean(rows, {**self.global_values, **self.code_values(z)})

    @torch.no_grad()
    def reconstruct(self, batch) -> torch.Tensor:
        """``(B, P)`` means of the observed site with every latent site at the guide's centre for x."""
        batch = Batch.of(batch)
        return torch.cat([self.observed_mean(rows, self.guide_values(rows)) for rows in batch.split_rows(ENCODE_ROWS)])

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``(n, P)``: the observed site's mean (or, with ``draw``, a draw from it) for ``n`` runs of the
        model with its local sites drawn from the prior. Seed torch's generator to repeat."""
        return self.observed_mean(cycle_rows(self.context, n), self.global_values, draw)

    def observed_mean(self, batch: Batch, values: dict, draw: bool = False) -> torch.Tensor:
        """``(B, P)``: the observed site's mean (or a draw) when the model runs on ``batch`` with the
        sites ``values`` fixed."""
        model = poutine.condition(self.model, data=values)
        with poutine.block(), evaluation_mode(self.model):
            trace = run_traced(model, batch, "model")
        site = trace.nodes[self.observed]
        fn = site["fn"]
        if draw:
            value = fn.sample()
        else:
            try:
                value = fn.mean
            except NotImplementedError:
                raise ProgramError(f"the distribution of the observed site {self.observed!r} "
                                   f"({type(fn).__name__}) has no mean to draw") from None
        return per_row(value, site, fn.event_dim)
