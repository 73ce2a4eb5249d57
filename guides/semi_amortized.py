"""Semi-amortized inference (Kim et al. 2018): the encoder proposes q, a few gradient steps refine it.

For each batch the encoder gives :math:`\\lambda_0 = (\\mu_\\phi(x), \\log \\sigma_\\phi(x))`, and
:math:`K` steps of gradient ascent on each datapoint's own ELBO, with the decoder held fixed,

.. math:: \\lambda_{k+1} = \\lambda_k + \\eta\\, \\nabla_\\lambda \\mathcal L(x; \\theta, \\lambda_k),

give :math:`q_K(z \\mid x) = \\mathcal N(\\mu_K, \\mathrm{diag}\\,\\sigma_K^2)`, the guide's
distribution. The steps are on the mean and the log-scale (a step in log-scale is relative, so one
step size suits wide and narrow posteriors alike); each uses ``num_particles`` reparameterized
samples and the analytic KL where the model's prior has one (``TraceMeanField_ELBO``).

How the two networks learn (:func:`pvae.fit`):

- the decoder takes its gradient from the ELBO of the refined :math:`q_K`, the guide's own
  distribution; :math:`\\lambda_K` enters it as a constant;
- the encoder is trained on its own ELBO :math:`\\mathcal L[q_0]`, with the decoder held fixed, through
  :meth:`SemiAmortizedGuide.auxiliary_loss`, which ``fit`` adds to the loss. Kim et al. instead
  backpropagate :math:`\\mathcal L[q_K]` through the K steps to the encoder, which needs
  Hessian-vector products (twice the cost per step, and their paper clips gradients to keep it
  stable). Training the encoder on :math:`\\mathcal L[q_0]` costs one more pass, makes it the best
  starting point it can be for the refinement, and keeps its bound comparable with an amortized run's.

References:

1. Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, arXiv 1802.02550.
2. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

from typing import Callable

import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

from pvae.inference import ReparamELBO

from .amortized import AmortizedGuide
from .mean_field import gaussian_guide


def refine(
    model: Callable,
    x: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    steps: int,
    lr: float,
    num_particles: int = 1,
) -> tuple:
    """``steps`` steps of gradient ascent with step size ``lr`` on each datapoint's ELBO
    :math:`\\mathcal L(x_b; \\mu_b, \\log \\sigma_b)` under ``model``, whose parameters stay as they are.
    Plain gradient steps climb for ``lr`` below 2 / (the bound's largest curvature, about the
    largest posterior precision) and diverge above it, which raises a ``ValueError``.

    :param x: the batch ``(B, P)``.
    :param loc, scale: the starting q, ``(B, D)`` each (an encoder's output).
    :returns: the refined ``(loc, scale)``, detached.

    Runs in its own Pyro context (``poutine.block``), so that it can be called from inside a guide
    that is being traced, and with gradients on, so that it can be called under ``torch.no_grad``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    loc, log_scale = loc.detach(), scale.detach().log()
    # one particle at a time, not vectorized: a vectorized particle plate here would collide with
    # the one the guide itself may be run under (training with particles, evaluation)
    # one particle: the lean ELBO (no host synchronization per step); more: Pyro's loop over them
    elbo = ReparamELBO(analytic_kl=True) if num_particles == 1 else TraceMeanField_ELBO(num_particles=num_particles)
    with torch.enable_grad(), poutine.block():
        for _ in range(steps):
            loc.requires_grad_(True)
            log_scale.requires_grad_(True)
            # the unscaled sum over the batch: its gradient in (loc_b, log_scale_b) is datapoint b's own
            loss = elbo.differentiable_loss(model, gaussian_guide(loc, log_scale.exp()), x)
            grad_loc, grad_log_scale = torch.autograd.grad(loss, (loc, log_scale))
            loc = (loc - lr * grad_loc).detach()
            log_scale = (log_scale - lr * grad_log_scale).detach()
    # checked once: a step that diverges leaves inf or NaN behind, which every later step keeps
    if not (torch.isfinite(loc).all() and torch.isfinite(log_scale).all()):
        raise ValueError(f"the refinement diverged: its step size {lr} is too large for this model's "
                         "posterior curvature; take a smaller one")
    return loc, log_scale.exp()


class SemiAmortizedGuide(nn.Module):
    """q_K(z | x): an amortized guide's q refined by ``steps`` gradient steps on each datapoint.

    :param encoder: the amortized guide whose q(z | x) starts the refinement, an
        :class:`~pvae.guides.AmortizedGuide`.
    :param model: the generative model whose ELBO the steps climb. It is held by reference, not as a
        submodule: its weights belong to the model (saved, moved and optimized with it).
    :param steps: K, refinement steps per batch; 0 makes this the amortized guide.
    :param lr: the steps' size.
    :param num_particles: samples of z per datapoint and refinement step.
    """

    amortized = True  # it has a q(z | x) for any x, held-out data included

    def __init__(self, encoder: AmortizedGuide, model: Callable, steps: int = 5, lr: float = 1e-2,
                 num_particles: int = 1):
        super().__init__()
        if steps < 0 or num_particles < 1:
            raise ValueError(f"steps must be >= 0 and num_particles >= 1, got {steps}, {num_particles}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.encoder = encoder
        object.__setattr__(self, "model", model)  # bypasses nn.Module's registration of submodules
        self.latent_dim = encoder.latent_dim
        self.steps = steps
        self.lr = lr
        self.num_particles = num_particles

    def encode(self, x: torch.Tensor) -> tuple:
        """The encoder's ``(loc, scale)``, before refinement (what plots of the latent space show)."""
        return self.encoder.encode(x)

    def refine(self, x: torch.Tensor, steps=None, lr=None) -> tuple:
        """The refined ``(loc, scale)`` of q_K(z | x), each ``(B, D)``, detached."""
        with torch.no_grad():
            loc, scale = self.encoder.encode(x)
        steps = self.steps if steps is None else steps
        return refine(self.model, x, loc, scale, steps, self.lr if lr is None else lr, self.num_particles)

    def forward(self, x: torch.Tensor, idx=None, num_data=None) -> None:
        gaussian_guide(*self.refine(x))(x, idx, num_data)

    def auxiliary_loss(self, elbo, x: torch.Tensor, idx=None, num_data=None) -> torch.Tensor:
        """The encoder's objective, which :func:`pvae.fit` adds to the loss of each step: its value is
        :math:`-\\mathcal L[q_0]` (scaled to the data set as the training loss), and its gradient reaches
        the encoder only, never the decoder.

        :param elbo: the fit's Pyro ELBO, so that the encoder's bound is estimated the same way.
        """
        loss = elbo.differentiable_loss(self.model, self.encoder, x, idx, num_data)
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        # zero-valued, with gradient exactly d(loss)/d(encoder) and nothing towards the decoder
        surrogate = sum((p * g).sum() for p, g in zip(params, grads))
        return loss.detach() + surrogate - surrogate.detach()
