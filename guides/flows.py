"""Joint families over all continuous local sites: a full-covariance Gaussian, and a Gaussian followed by
planar flows, with every parameter per datapoint.

The diagonal :class:`~pvae.guides.sites.LocalFamily` gives each site its own Normal; these families
give one distribution to the vector :math:`u \\in \\mathbb R^D` of all continuous local sites in
unconstrained space (D their dimensions together), so that q can correlate them:

.. math::
    u \\sim q_\\lambda(u), \\qquad z_s = T_s(u_s), \\quad T_s = \\mathrm{biject\\_to}(\\mathrm{support}_s),

    \\log q(z) = \\log q_\\lambda(u) - \\sum_s \\log \\lvert \\det \\partial T_s / \\partial u_s \\rvert.

In a guide, u is an auxiliary site (``infer={"is_auxiliary": True}``, named :data:`JOINT`) and each
model site a ``Delta`` at :math:`T_s(u_s)` whose log-density is the Jacobian's term, as Pyro's
``AutoContinuous`` guides have it: the ELBO, the importance-weighted bound, evaluation and the gap study
read them as any guide's sites. Every parameter of :math:`q_\\lambda` comes from one flat vector per
datapoint, as for the diagonal family, so the same four sources serve them: an encoder's head
(:class:`~pvae.guides.AmortizedGuide` with ``family=...``), a per-datapoint table, the refinement of
semi-amortized inference, and the per-datapoint optimum q* of the gap study (``pvae compare``
optimizes q* within the guide's own family, so its approximation gap is the family's).

- :class:`FullCovariance`: :math:`q_\\lambda(u) = \\mathcal N(\\mu, L L^\\top)`, L lower-triangular
  with a positive diagonal (the "linear IAF" of Kingma et al. 2016): exact for a Gaussian posterior.
- :class:`PlanarFlow`: a diagonal Gaussian pushed through K planar maps (Rezende & Mohamed 2015),
  :math:`u \\mapsto u + \\hat a \\tanh(w^\\top u + b)`, through Pyro's ``ConditionedPlanar`` with the
  maps' parameters per datapoint. The planar map has no inverse in closed form: its density is known
  at its own draws only (enough for the ELBO and the bound), not at given values (``--elbo dreg``
  needs those, and refuses it).

References:

1. Rezende & Mohamed, *Variational Inference with Normalizing Flows*, arXiv 1505.05770.
2. Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, *Improved Variational Inference with
   Inverse Autoregressive Flow*, arXiv 1606.04934.
3. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

import math
from dataclasses import dataclass
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.util import sum_rightmost
from torch.distributions import biject_to

from pvae.programs import DATA, Batch, ProgramError

from .sites import SCALE_FLOOR, _is_real, _LatentValues, inverse_softplus

JOINT = "_pvae_joint"  # the auxiliary site of the joint families: all continuous local sites, unconstrained
_LOG_E_MINUS_1 = math.log(math.e - 1)  # softplus of it is 1


class JointFamily:
    """q of every continuous local site jointly, from one flat vector of ``size`` numbers per datapoint
    (see the module docstring); the interface of :class:`~pvae.guides.sites.LocalFamily`.

    Parameters are ``{JOINT: {"loc": (B, D), "scale": (B, D), ...}}``: the base Gaussian's location and
    (positive) scales, then the family's own entries (:meth:`_extra`), each ``(B, n)``.
    """

    name = "joint"

    def __init__(self, sites):
        self.sites = tuple(s for s in sites if s.is_local)
        discrete = [s.name for s in self.sites if s.kind != "continuous"]
        if discrete:
            raise ProgramError(
                f"the {self.name} family is joint over continuous sites, and site(s) {', '.join(map(repr, discrete))} "
                "are discrete: mark them `infer={'enumerate': 'parallel'}` in the model, or use the diagonal family"
            )
        self.dim = sum(s.numel for s in self.sites)
        self.slices, offset = {}, 0
        for key, width in (("loc", self.dim), ("scale", self.dim), *self._extra()):
            self.slices[key] = slice(offset, offset + width)
            offset += width
        self.size = offset if self.sites else 0

    def _extra(self) -> tuple:
        """``(key, width)`` of the family's parameters beyond the base Gaussian's."""
        return ()

    @property
    def continuous(self) -> tuple:
        return self.sites

    @property
    def latent_size(self) -> int:
        return self.dim

    def init_raw(self, rows: int, init_scale: float = 1.0, device=None) -> torch.Tensor:
        """``(rows, size)``: loc 0, every scale ``init_scale``, the family's extras at the identity."""
        raw = torch.zeros(rows, self.size, device=device)
        raw[:, self.slices["scale"]] = inverse_softplus(init_scale - SCALE_FLOOR)
        return raw

    def unpack(self, raw: torch.Tensor) -> dict:
        params = {key: raw[:, s] for key, s in self.slices.items()}
        params["scale"] = F.softplus(params["scale"]) + SCALE_FLOOR
        return {JOINT: params} if self.sites else {}

    def pack(self, params: dict) -> torch.Tensor:
        p = params[JOINT]
        scale = inverse_softplus((p["scale"] - SCALE_FLOOR).clamp(min=SCALE_FLOOR))
        return torch.cat([scale if key == "scale" else p[key] for key in self.slices], -1)

    def joint(self, params: dict):
        """q(u) for each datapoint: a distribution of event shape ``(D,)`` whose batch shape is the
        parameters' leading shape, ``(B,)``."""
        raise NotImplementedError

    def loc_scale(self, params: dict, name: str) -> tuple:
        """``(loc, scale)`` per dimension of site ``name`` in unconstrained space, ``(B, n)`` each: the
        base Gaussian's (before any flow)."""
        s = self._site_slice(name)
        return params[JOINT]["loc"][:, s], params[JOINT]["scale"][:, s]

    def _site_slice(self, name: str) -> slice:
        offset = 0
        for site in self.sites:
            if site.name == name:
                return slice(offset, offset + site.numel)
            offset += site.numel
        raise KeyError(name)

    def loc_units(self, raw: torch.Tensor) -> torch.Tensor:
        """``(rows, size)``: the natural unit of each parameter at ``raw``, the base scales for the locs
        and 1 for the rest (q*'s optimizer moves the locs in these units)."""
        units = torch.ones_like(raw)
        units[:, self.slices["loc"]] = self.unpack(raw)[JOINT]["scale"]
        return units

    def inverse_fisher(self, params: dict) -> dict:
        """The diagonal of the inverse Fisher information in refine's coordinates (see
        :meth:`~pvae.guides.sites.LocalFamily.inverse_fisher`): the base Gaussian's, ``scale**2`` for its
        locs and 1/2 for its log-scales, and 1 (a plain step) for the family's own parameters unless
        :meth:`_extra_inverse_fisher` says otherwise."""
        p = params[JOINT]
        out = {"loc": p["scale"].square(), "scale": torch.full_like(p["scale"], 0.5)}
        for key, _ in self._extra():
            out[key] = self._extra_inverse_fisher(key, p)
        return {JOINT: out} if self.sites else {}

    def _extra_inverse_fisher(self, key: str, p: dict) -> torch.Tensor:
        return torch.ones_like(p[key])

    def sample(self, params: dict, batch: Batch, noise: Optional[torch.Tensor] = None) -> dict:
        """``pyro.sample`` the auxiliary u in the data plate, then each site as a Delta at its value.

        :param noise: ``(B, D)`` standard normal draws from which u is made, the base Gaussian's and then
            the family's maps, instead of fresh ones (common random numbers, as for
            :meth:`~pvae.guides.sites.LocalFamily.sample`); u stays differentiable in ``params``.
        """
        values = {}
        if not self.sites:
            return values
        data_dim = self.sites[0].data_dim
        ones = (1,) * (-data_dim - 1)  # u's batch shape has the data axis where the plate has it
        shaped = {JOINT: {k: v.reshape(v.shape[0], *ones, v.shape[-1]) for k, v in params[JOINT].items()}}
        with pyro.plate(DATA, batch.num_data, subsample=batch.idx, dim=data_dim):
            q = self.joint(shaped)
            if noise is None:
                u = pyro.sample(JOINT, q, infer={"is_auxiliary": True})
            else:
                with _LatentValues({JOINT: _transform_noise(q, noise.reshape(noise.shape[0], *ones, self.dim))}):
                    u = pyro.sample(JOINT, q, infer={"is_auxiliary": True})
            lead = u.shape[: u.dim() - 1 + data_dim]
            flat = u.reshape(*lead, len(batch), self.dim)  # (..., B, D)
            offset = 0
            for site in self.sites:
                part = flat[..., offset : offset + site.numel].reshape(*lead, len(batch), *site.shape)
                offset += site.numel
                part = part.movedim(len(lead), len(lead) + site.data_axis)
                with site.plate_stack():
                    values[site.name] = pyro.sample(site.name, _delta(site, part))
        return values

    def describe(self) -> str:
        names = ", ".join(f"{s.name} {tuple(s.shape)}" for s in self.sites)
        return f"{self.name} over {names}" if names else "no local sites"


def _transform_noise(q, eps: torch.Tensor) -> torch.Tensor:
    """The draw of ``q`` (a Normal, a multivariate Normal, or a transformed one of them) that its
    reparameterization makes of the standard normal ``eps``; a transformed draw passes through ``q``'s
    own maps, whose caches then give its log-density as for ``rsample``."""
    if isinstance(q, dist.TransformedDistribution):
        value = _transform_noise(q.base_dist, eps)
        for transform in q.transforms:
            value = transform(value)
        return value
    if isinstance(q, dist.Independent):
        return _transform_noise(q.base_dist, eps)
    if isinstance(q, dist.Normal):
        return q.loc + q.scale * eps
    if isinstance(q, torch.distributions.MultivariateNormal):
        return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    raise NotImplementedError(f"no reparameterization of {type(q).__name__} from standard normal draws")


def _delta(site, unconstrained: torch.Tensor):
    """The site at ``biject_to(support)(u_s)``, its log-density the Jacobian's term of log q(z)."""
    if _is_real(site.support):
        return dist.Delta(unconstrained, event_dim=site.event_dim)
    transform = biject_to(site.support)
    value = transform(unconstrained)
    log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
    log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site.event_dim)
    return dist.Delta(value, log_density=log_density, event_dim=site.event_dim)


class FullCovarianceFamily(JointFamily):
    """:math:`q(u) = \\mathcal N(\\mu, L L^\\top)` with :math:`L = \\mathrm{diag}(\\sigma) + \\text{strictly
    lower part}`: ``scale`` is L's diagonal and ``tril`` its D(D-1)/2 entries below it, row by row."""

    name = "full-covariance"

    def _extra(self) -> tuple:
        return (("tril", self.dim * (self.dim - 1) // 2),)

    def scale_tril(self, params: dict) -> torch.Tensor:
        p = params[JOINT]
        rows, cols = torch.tril_indices(self.dim, self.dim, -1, device=p["loc"].device)
        below = p["scale"].new_zeros(*p["scale"].shape, self.dim)
        below[..., rows, cols] = p["tril"]
        return below + torch.diag_embed(p["scale"])

    def _extra_inverse_fisher(self, key: str, p: dict) -> torch.Tensor:
        """``scale[i]**2`` for each entry of row i below L's diagonal: where L is diagonal, the Fisher of
        :math:`L_{ij}` is :math:`1 / \\sigma_i^2`, as for the loc of dimension i (a shear of u_i by u_j
        moves the draws in units of u_i)."""
        rows, _ = torch.tril_indices(self.dim, self.dim, -1, device=p["scale"].device)
        return p["scale"][:, rows].square()

    def joint(self, params: dict):
        return dist.MultivariateNormal(params[JOINT]["loc"], scale_tril=self.scale_tril(params))

    def loc_scale(self, params: dict, name: str) -> tuple:
        """The exact marginal means and standard deviations of the site's dimensions."""
        s = self._site_slice(name)
        return params[JOINT]["loc"][:, s], self.scale_tril(params).square().sum(-1).sqrt()[:, s]


class PlanarStep(ConditionedPlanar):
    """Pyro's conditioned planar map, with the invertibility constraint :math:`w^\\top \\hat a > -1` met by
    :math:`\\hat a = a + (m(w^\\top a) - w^\\top a)\\, w / \\lVert w \\rVert^2`, where
    :math:`m(\\alpha) = \\mathrm{softplus}(\\alpha + \\log(e - 1)) - 1`: Rezende & Mohamed's m shifted so
    that :math:`m(0) = 0`, which makes ``a = 0`` the identity map (Pyro's ``m(0)`` is :math:`\\log 2 - 1`)."""

    def u_hat(self, u, w):
        alpha = (u * w).sum(-1, keepdim=True)
        shifted = F.softplus(alpha + _LOG_E_MINUS_1) - 1
        return u + (shifted - alpha) * w / (w.square().sum(-1, keepdim=True) + 1e-12)


class PlanarFamily(JointFamily):
    """A diagonal Gaussian followed by ``steps`` planar maps, each with its own per-datapoint
    ``(a, w, b)``: ``flow`` holds them, ``2 D + 1`` numbers a step."""

    name = "planar"
    affine = False  # its draws bend the noise: q*'s objective takes more fixed draws (pvae.compare)

    def __init__(self, sites, steps: int = 4):
        if steps < 1:
            raise ValueError(f"a planar flow needs at least one step, got {steps}")
        self.steps = steps
        super().__init__(sites)
        self.name = f"planar ({steps} steps)"

    def _extra(self) -> tuple:
        return (("flow", self.steps * (2 * self.dim + 1)),)

    def init_raw(self, rows: int, init_scale: float = 1.0, device=None) -> torch.Tensor:
        raw = super().init_raw(rows, init_scale, device)
        flow = raw[:, self.slices["flow"]].view(rows, self.steps, 2 * self.dim + 1)
        flow[:, :, self.dim : 2 * self.dim] = 1.0 / math.sqrt(self.dim)  # w: any direction; a = 0 is the identity
        return raw

    def _extra_inverse_fisher(self, key: str, p: dict) -> torch.Tensor:
        """``scale**2`` for each map's displacement a (a step of a moves the draws in u's units, as a loc
        does; at a = 0 its Fisher is :math:`E[\\tanh^2]/\\sigma^2`, at most the loc's), 1 for w and b,
        whose Fisher vanishes at the identity map."""
        units = torch.ones_like(p[key]).view(p[key].shape[0], self.steps, 2 * self.dim + 1)
        units[..., : self.dim] = p["scale"].square().unsqueeze(-2)
        return units.reshape(p[key].shape)

    def joint(self, params: dict):
        p = params[JOINT]
        base = dist.Normal(p["loc"], p["scale"]).to_event(1)
        steps = p["flow"].reshape(*p["flow"].shape[:-1], self.steps, 2 * self.dim + 1)
        maps = [PlanarStep((step[..., -1:], step[..., : self.dim], step[..., self.dim : 2 * self.dim]))
                for step in steps.unbind(-2)]
        return dist.TransformedDistribution(base, maps)


@dataclass(frozen=True)
class FullCovariance:
    """The full-covariance Gaussian family, as ``family=`` of a guide built from a model."""

    def __call__(self, sites) -> FullCovarianceFamily:
        return FullCovarianceFamily(sites)


@dataclass(frozen=True)
class PlanarFlow:
    """The planar-flow family with ``steps`` maps, as ``family=`` of a guide built from a model."""

    steps: int = 4

    def __call__(self, sites) -> PlanarFamily:
        return PlanarFamily(sites, self.steps)
