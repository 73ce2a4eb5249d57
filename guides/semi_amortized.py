"""Semi-amortized inference (Kim et al. 2018): the encoder proposes q, a few gradient steps refine it.

For each batch the encoder gives :math:`\\lambda_0`, the locs and log-scales of every continuous local
site, and :math:`K` natural-gradient steps of ascent on each datapoint's own ELBO, with the model held
fixed,

.. math:: \\lambda_{k+1} = \\lambda_k + \\eta\\, F(\\lambda_k)^{-1} \\nabla_\\lambda \\mathcal L(x; \\theta, \\lambda_k),

give :math:`q_K(z \\mid x)`, the guide's distribution: all local sites are refined jointly. F is the
Fisher information of q, diagonal for a Normal in :math:`(\\mu, \\log\\sigma)`,
:math:`\\mathrm{diag}(1/\\sigma^2, 2)`, so that :math:`\\mu \\mathrel{+}= \\eta\\, \\sigma^2\\, \\partial\\mathcal L/\\partial\\mu`
and :math:`\\log\\sigma \\mathrel{+}= \\tfrac\\eta2\\, \\partial\\mathcal L/\\partial\\log\\sigma` (a joint family's
:meth:`inverse_fisher` says its own). On a Gaussian posterior with q's scale at the posterior's, a step
takes :math:`\\mu` the fraction :math:`\\eta` of the way to the posterior mean, whatever the posterior's
precision: one step size suits wide and sharp posteriors alike, where plain gradient steps climb only
for :math:`\\eta` below 2 / (the largest posterior precision) and made q worse on a trained
Fashion-MNIST VAE. Each step uses ``num_particles`` reparameterized samples and the closed-form KL
where it is exact. Discrete sites keep the encoder's logits; global sites are drawn from the
encoder's global guide and held there during the steps.

How the two networks learn (:func:`pvae.fit`):

- the model takes its gradient from the ELBO of the refined :math:`q_K`, the guide's own
  distribution; :math:`\\lambda_K` enters it as a constant;
- the encoder is trained on its own ELBO :math:`\\mathcal L[q_0]`, with the model held fixed, through
  :meth:`SemiAmortizedGuide.auxiliary_loss`, which ``fit`` adds to the loss. Kim et al. instead
  backpropagate :math:`\\mathcal L[q_K]` through the K steps to the encoder, which needs
  Hessian-vector products (twice the cost per step, and their paper clips gradients to keep it
  stable). Training the encoder on :math:`\\mathcal L[q_0]` costs one more pass, makes it the best
  starting point it can be for the refinement, and keeps its bound comparable with an amortized run's.

References:

1. Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, arXiv 1802.02550.
2. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

from typing import Optional

import torch
from pyro import poutine
from torch import nn

from pvae.inference import lean_elbo
from pvae.programs import Batch, Program, inspect_programs

from .amortized import AmortizedGuide
from .sites import LocalFamily


class ParamsGuide:
    """The guide whose local sites are drawn from the given parameters, one row per datapoint of the
    batch it is called with (see :class:`~pvae.guides.sites.LocalFamily`), and whose global sites, if
    any, from ``globals_``: how refined or optimized local parameters are run by :mod:`pvae.inference`."""

    def __init__(self, family: LocalFamily, params: dict, globals_: Optional[nn.Module] = None):
        self.family, self.params, self.globals_ = family, params, globals_

    def call_batch(self, batch: Batch):
        rows = next(iter(next(iter(self.params.values())).values())).shape[0] if self.params else len(batch)
        if rows != len(batch):
            raise ValueError(f"these local parameters are for {rows} datapoints, not {len(batch)}")
        values = self.globals_() if self.globals_ is not None else {}
        values.update(self.family.sample(self.params, batch))
        return values


def refine(model, batch, params: dict, family: LocalFamily, steps: int, lr: float, num_particles: int = 1,
           globals_: Optional[nn.Module] = None, elbo=None) -> dict:
    """``steps`` natural-gradient steps of size ``lr`` up each datapoint's ELBO under ``model``, whose
    parameters stay as they are, in the locs and log-scales of every continuous local site (and a joint
    family's other parameters, :mod:`pvae.guides.flows`): each coordinate's gradient is multiplied by
    ``family.inverse_fisher`` at the step's start, ``scale**2`` for a loc, 1/2 for a log-scale (module
    docstring). ``lr`` is then a fraction of the way to a Gaussian posterior's mean, whatever its
    precision; 0.05 (the default of ``pvae train`` and ``pvae compare``) climbed for K = 1, 5 and 20 on
    Fashion-MNIST VAEs, 0.2 diverged there on single-particle noise. A step that diverges raises a
    ``ValueError``.

    :param batch: the datapoints (a :class:`~pvae.programs.Batch` or a tensor).
    :param params: where to start (an encoder's :meth:`local_params`); detached here.
    :param elbo: the objective of one particle (default: from one traced run, see
        :func:`pvae.inference.lean_elbo`).
    :returns: the refined parameters, detached.

    Runs in its own Pyro context (``poutine.block``), so that it can be called from inside a guide
    that is being traced, and with gradients on, so that it can be called under ``torch.no_grad``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    batch = Batch.of(batch)
    # each datapoint's own ELBO, unscaled: the gradient in its parameters is its own
    batch = Batch.of(batch.x, inputs=batch.inputs, split=batch.split)
    # the continuous sites' parameters (a joint family's base and flow too), scales as log-scales
    names = [n for n, p in params.items() if "logits" not in p]
    coords = {(n, k): (v.detach().log() if k == "scale" else v.detach()) for n in names for k, v in params[n].items()}
    fixed = {n: {k: v.detach() for k, v in p.items()} for n, p in params.items() if n not in names}

    def current():
        natural = {n: {} for n in names}
        for (n, k), v in coords.items():
            natural[n][k] = v.exp() if k == "scale" else v
        return {**fixed, **natural}

    model = Program(model)
    with torch.enable_grad(), poutine.block():
        if elbo is None and steps:
            elbo = lean_elbo(inspect_programs(model, ParamsGuide(family, current(), globals_), batch, check=False), 1)
        for _ in range(steps):
            leaves = [t.requires_grad_(True) for t in coords.values()]
            # one particle at a time, not vectorized: a particle plate here would collide with the one the
            # guide itself may be run under (training with particles, evaluation)
            guide = Program(ParamsGuide(family, current(), globals_), "guide")
            try:
                loss = sum(elbo.differentiable_loss(model, guide, batch) for _ in range(num_particles)) / num_particles
            except ValueError:  # Pyro's validation meets a scale that the last step made 0, inf or NaN
                _check_finite(current(), lr)
                raise
            with torch.no_grad():
                metric = family.inverse_fisher(current())  # at this step's start, not differentiated
            for (n, k), grad in zip(list(coords), torch.autograd.grad(loss, leaves)):
                coords[n, k] = (coords[n, k] - lr * metric[n][k] * grad).detach()
    # checked once (no host synchronization per step): a step that diverges leaves inf, NaN or a zero scale
    # behind, which every later step keeps, or which the next step's distributions refuse
    refined = current()
    _check_finite(refined, lr)
    return refined


def _check_finite(params: dict, lr: float) -> None:
    """Raise where a refinement step left a parameter inf or NaN, or a scale 0."""
    if not all(torch.isfinite(v).all() and (k != "scale" or (v > 0).all()) for p in params.values() for k, v in p.items()):
        raise ValueError(f"the refinement diverged: its step size {lr} is too large for this posterior "
                         "and its Monte Carlo noise; take a smaller one")


class SemiAmortizedGuide(nn.Module):
    """q_K(z | x): an amortized guide's q refined by ``steps`` gradient steps on each datapoint.

    :param encoder: the :class:`~pvae.guides.AmortizedGuide` whose q(z | x) starts the refinement.
    :param model: the model whose ELBO the steps climb, held by reference: its weights are its own.
    :param steps: K, refinement steps per batch; 0 makes this the amortized guide.
    :param lr: the natural-gradient steps' size (see :func:`refine`).
    :param num_particles: samples of z per datapoint and refinement step.
    """

    def __init__(self, encoder: AmortizedGuide, model, steps: int = 5, lr: float = 0.05, num_particles: int = 1):
        super().__init__()
        if steps < 0 or num_particles < 1:
            raise ValueError(f"steps must be >= 0 and num_particles >= 1, got {steps}, {num_particles}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.encoder = encoder
        object.__setattr__(self, "model", model)  # bypasses nn.Module's registration of submodules
        self.steps, self.lr, self.num_particles = steps, lr, num_particles
        self._elbo = None

    @property
    def family(self) -> LocalFamily:
        return self.encoder.family

    def local_params(self, batch: Batch) -> dict:
        """The encoder's parameters, before refinement (what the gap study starts q_K from)."""
        return self.encoder.local_params(Batch.of(batch))

    def refined_params(self, batch, steps: Optional[int] = None, lr: Optional[float] = None) -> dict:
        """The parameters of q_K(z | x) for the rows of ``batch``, detached."""
        batch = Batch.of(batch)
        with torch.no_grad():
            start = self.encoder.local_params(batch)
        steps = self.steps if steps is None else steps
        if self._elbo is None and steps:
            unscaled = Batch.of(batch.x, inputs=batch.inputs, split=batch.split)
            with torch.enable_grad(), poutine.block():
                info = inspect_programs(self.model, ParamsGuide(self.family, start, self.encoder.globals_), unscaled,
                                        check=False)
            self._elbo = lean_elbo(info, 1)
        return refine(self.model, batch, start, self.family, steps, self.lr if lr is None else lr,
                      self.num_particles, self.encoder.globals_, self._elbo)

    def call_batch(self, batch: Batch):
        params = self.refined_params(batch)  # sets the encoder up at the first call
        return ParamsGuide(self.family, params, self.encoder.globals_).call_batch(batch)

    def forward(self, *args, **kwargs):
        from .sites import batch_from_call

        return self.call_batch(batch_from_call(self.model, args, kwargs))

    def global_means(self) -> dict:
        return self.encoder.global_means()

    def auxiliary_loss(self, elbo, model, batch: Batch) -> torch.Tensor:
        """The encoder's objective, which :func:`pvae.fit` adds to the loss of each step: its value is
        :math:`-\\mathcal L[q_0]` (scaled to the data set as the training loss), and its gradient reaches
        the encoder's network only, never the model (nor the global guide, which the main loss trains).

        :param elbo: the fit's objective, so that the encoder's bound is estimated the same way.
        """
        loss = elbo.differentiable_loss(model, Program(self.encoder, "guide"), batch)
        params = [p for m in (self.encoder.body, self.encoder.head) for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        # zero-valued, with gradient exactly d(loss)/d(encoder) and nothing towards the model
        surrogate = sum((p * g).sum() for p, g in zip(params, grads))
        return loss.detach() + surrogate - surrogate.detach()
