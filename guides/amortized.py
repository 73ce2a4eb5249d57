"""Amortized inference: one encoder network maps every x to the parameters of q(z | x), for every
local latent site of the model.

.. math:: q_\\phi(z \\mid x) = \\prod_{\\text{sites } s} T_s\\Big(\\mathcal N\\big(\\mu_{\\phi,s}(x),\\
    \\mathrm{diag}\\,\\sigma_{\\phi,s}(x)^2\\big)\\Big), \\qquad T_s = \\mathrm{biject\\_to}(\\mathrm{support}_s)

Samples are reparameterized, ``z = T(mu + sigma * eps)``, so the ELBO's gradient flows through them;
a discrete site the model does not enumerate gets logits from the same network (score-function
gradients). The network is a *body* (an MLP by default, or any ``nn.Module`` of the user's) from the
encoder's input to features, and a linear *head* sized to the model's sites. The input is x, flat,
beside the batch's side inputs (labels one-hot): a conditional VAE's q(z | x, y).

With ``family=point_mass`` q is a point mass at the encoder's output, :math:`\\delta(z - f_\\phi(x))`: the
autoencoder's encoder (:mod:`pvae.models.autoencoder`). With a ``corruption``
(:mod:`pvae.guides.corruption`) the encoder reads a corrupted x in training mode: a denoising
autoencoder (or VAE), the model still observing the clean x.
"""

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pvae.models.networks import ACTIVATIONS, ConvEncoder, mlp
from pvae.programs import Batch, ProgramError
from pvae.protocols import is_static

from .sites import LocalFamily, SiteGuide, gaussian_sites


class AmortizedGuide(SiteGuide):
    """q(z | x) for every local site of ``model`` from one encoder; global sites get a
    :class:`~pvae.guides.sites.GlobalGuide`.

    :param model: the Pyro model the guide is built from (its sites are read at the first call).
    :param sites: the sites, instead of a model (see :func:`mlp_guide`).
    :param body: a network from the encoder's input ``(B, F_in)`` to features ``(B, F)``; default an
        MLP through ``hidden`` with ``activation`` after each layer (``hidden=()``: a linear encoder).
    :param inputs: the side inputs the encoder reads beside x; None: every one the batch carries.
    :param classes: ``{name: K}`` for integer side inputs, one-hot encoded over K classes.
    :param in_features: the encoder's input size, to build it now rather than at the first call
        (with ``sites``).
    :param family: builds the family of q from the sites: the diagonal
        :class:`~pvae.guides.sites.LocalFamily` by default, or a joint one of :mod:`pvae.guides.flows`
        (``FullCovariance()``, ``PlanarFlow(steps)``), or :func:`~pvae.guides.sites.point_mass` (an
        autoencoder's code); the head outputs its parameters.
    :param corruption: ``corruption(x) -> x_tilde`` applied to x before the encoder reads it, in
        training mode only (a denoising autoencoder; :mod:`pvae.guides.corruption`).
    :param static_structure: the body runs the same operations on every batch of a shape, so that
        ``fit`` may record the objective once (:mod:`pvae.tape`); by default true for pvae's own
        bodies (the MLP, :class:`~pvae.models.networks.ConvEncoder`,
        :class:`~pvae.models.two_layer.BottomUpEncoder`) and for a body that declares it
        (``static_structure = True``), false for another body of yours.
    """

    def __init__(self, model=None, *, sites=None, body: Optional[nn.Module] = None, hidden: Sequence[int] = (400,),
                 activation: str = "relu", inputs: Optional[Sequence[str]] = None, classes: Optional[dict] = None,
                 in_features: Optional[int] = None, family=LocalFamily, corruption: Optional[Callable] = None,
                 static_structure: Optional[bool] = None):
        super().__init__(model, sites, family)
        self.corruption = corruption
        if static_structure is None:
            static_structure = body is None or is_static(body)
        self.static_structure = static_structure
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")
        self.hidden, self.activation = tuple(hidden), activation
        self.inputs = None if inputs is None else tuple(inputs)
        self.classes = dict(classes or {})
        self.body = body
        self.head = None
        if sites is not None and in_features is not None:
            self._build(in_features, None)
            self._ready = True

    def _setup_local(self, batch: Batch) -> None:
        if self.inputs is None:
            self.inputs = tuple(batch.inputs)
        features = self.features(batch)
        self._build(features.shape[-1], features)
        self.to(batch.x.device)

    def _build(self, in_features: int, example) -> None:
        if not self.family.size:
            return
        if self.body is None:
            layers = [mlp([in_features, *self.hidden], self.activation)] if self.hidden else []
            if self.hidden:
                layers.append(ACTIVATIONS[self.activation]())
            self.body = nn.Sequential(*layers)
        if example is None:  # on the body's own device: a body passed in stays where it is
            example = torch.zeros(2, in_features, device=next(self.body.parameters(), torch.empty(0)).device)
        with torch.no_grad():  # the body's output size, from one pass
            out_features = self.body.to(example.device)(example).shape[-1]
        self.head = nn.Linear(out_features, self.family.size)

    def features(self, batch: Batch) -> torch.Tensor:
        """The encoder's input: x flat (corrupted in training mode, with a corruption), then each side
        input it reads (integers one-hot)."""
        x = batch.x.reshape(len(batch), -1)
        parts = [self.corruption(x) if self.corruption is not None and self.training else x]
        for name in self.inputs or ():
            if name not in batch.inputs:
                raise ProgramError(f"the encoder reads the side input {name!r}, which this batch does not carry")
            value = batch.inputs[name]
            if not value.is_floating_point():
                if name not in self.classes:
                    raise ProgramError(
                        f"side input {name!r} holds integers: pass classes={{{name!r}: K}} to the guide so that its "
                        "encoder can one-hot encode them, or give it as floats"
                    )
                value = F.one_hot(value.long(), self.classes[name])
            parts.append(value.reshape(len(batch), -1).to(batch.x.dtype))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def local_params(self, batch: Batch) -> dict:
        """The parameters of q(z | x) for the rows of ``batch`` (see :class:`~pvae.guides.sites.LocalFamily`)."""
        if not self._ready:
            self.setup(batch)
        if not self.family.size:  # no local site to infer (every one enumerated)
            return {}
        return self.family.unpack(self.head(self.body(self.features(batch))))

    def encode(self, x: torch.Tensor) -> tuple:
        """``(loc, scale)`` of q(z | x) for a model with one continuous local site, ``(B, D)`` each (of a
        flow family, its base Gaussian's; the scale of a point mass is 0)."""
        (site,) = self.family.continuous
        return self.family.loc_scale(self.local_params(Batch.of(x)), site.name)


def mlp_guide(num_pixels: int, latent_dim: int = 20, hidden: Sequence[int] = (400,), activation: str = "relu",
              name: str = "z", family=LocalFamily, corruption: Optional[Callable] = None) -> AmortizedGuide:
    """The built-in VAE's encoder: an MLP ``num_pixels -> hidden... -> 2 * latent_dim`` for one
    Gaussian site ``name`` in R^latent_dim; ``hidden=()`` makes it linear; ``family`` and ``corruption``
    as for :class:`AmortizedGuide` (``family=point_mass``: an autoencoder's encoder
    ``num_pixels -> hidden... -> latent_dim``). For a model of your own, build ``AmortizedGuide(model)``."""
    return AmortizedGuide(sites=gaussian_sites(latent_dim, name), hidden=hidden, activation=activation,
                          in_features=num_pixels, inputs=(), family=family, corruption=corruption)


def conv_guide(image_shape, latent_dim: int = 20, name: str = "z", family=LocalFamily,
               corruption: Optional[Callable] = None) -> AmortizedGuide:
    """A convolutional encoder for 28x28 images and one Gaussian site (``family`` as for :class:`AmortizedGuide`)."""
    return AmortizedGuide(sites=gaussian_sites(latent_dim, name), body=ConvEncoder(image_shape),
                          in_features=image_shape[0] * image_shape[1] * image_shape[2], inputs=(), family=family,
                          corruption=corruption)
