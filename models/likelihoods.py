"""Pixel likelihoods p(x | z): each maps a decoder's output to a distribution over a flat image.

A decoder for a likelihood with ``params_per_pixel = k`` outputs ``k * P`` numbers per image.
"""


import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions.utils import broadcast_all


def bernoulli_log_density(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``log Bernoulli(value | logits)`` summed over the last dimension: ``sum(value * l - softplus(l))``,
    the value and gradient of ``-F.binary_cross_entropy_with_logits(l, value).sum(-1)``.

    On the CPU it is written with ``exp`` and ``log``, as ``softplus(l) = (l + |l|) / 2 + log(1 + exp(-|l|))``:
    torch's CPU kernels of the cross-entropy (and of ``softplus``, ``logsigmoid``, ``log1p``) compute
    ``log1p`` one element at a time, at 12 times the cost of a vectorized ``log`` (torch 2.14, x86 with
    AVX-512), which made the cross-entropy a fifth of a 784-400-20 VAE's training step at batch 1024;
    this form takes 0.6 of its time, forward and backward. At ``l = 0``, where ``|l|`` has gradient 0,
    the gradient of ``(l + |l|) / 2`` is the 1/2 that softplus has. ``1 + exp(-|l|)`` drops what of
    ``exp(-|l|)`` is below 6e-8: the error per value, below the float32 sum's own rounding. Without
    gradients it works in place. On other devices the fused cross-entropy (one kernel) is kept.
    """
    if logits.device.type != "cpu":
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)
    magnitude = logits.abs()
    if torch.is_grad_enabled() and (logits.requires_grad or value.requires_grad):
        return (value * logits).sum(-1) - (0.5 * (logits + magnitude) + torch.log(1 + torch.exp(-magnitude))).sum(-1)
    # without gradients (evaluation, the gap study), in place: three temporaries of the values' size, not eight
    softplus = magnitude.neg().exp_().add_(1).log_()
    softplus.add_(magnitude.add_(logits), alpha=0.5)
    return (value * logits).sum(-1) - softplus.sum(-1)


class BernoulliImage(dist.Independent):
    """``Bernoulli(logits).to_event(1)``, whose log-density is :func:`bernoulli_log_density`: the same
    value and gradient as Pyro's, in fewer and vectorized passes over the image."""

    def log_prob(self, value):
        if self._validate_args:
            self.base_dist._validate_sample(value)
        logits, value = broadcast_all(self.base_dist.logits, value)
        return bernoulli_log_density(logits, value)


class Bernoulli:
    """Bernoulli pixels, for binary images; the decoder outputs logits."""

    name = "bernoulli"
    params_per_pixel = 1
    needs_binary_data = True

    def __call__(self, out: torch.Tensor) -> dist.Distribution:
        return BernoulliImage(dist.Bernoulli(logits=out), 1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class ContinuousBernoulli:
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019, arXiv 1907.06845): a normalized
    density on [0, 1], for grey-level images; the decoder outputs logits."""

    name = "continuous-bernoulli"
    params_per_pixel = 1
    needs_binary_data = False

    def __call__(self, out: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=out).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=out).mean


class Gaussian:
    """Gaussian pixels with a learned per-pixel variance: the decoder outputs mu and log sigma^2.

    The scale is floored softly at ``min_scale`` (``sigma = min_scale + exp(log sigma^2 / 2)``):
    on images with constant pixels (MNIST's background) the density is otherwise unbounded.
    """

    name = "gaussian"
    params_per_pixel = 2
    needs_binary_data = False

    def __init__(self, min_scale: float = 1e-2):
        if not min_scale >= 0:
            raise ValueError(f"min_scale must be >= 0, got {min_scale}")
        self.min_scale = min_scale

    def __call__(self, out: torch.Tensor) -> dist.Distribution:
        loc, log_var = out.chunk(2, dim=-1)
        return dist.Normal(loc, self.min_scale + torch.exp(0.5 * log_var)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.chunk(2, dim=-1)[0]


class FixedGaussian:
    """Gaussian pixels of one fixed scale ``sigma``: the decoder outputs the mean only. Then

    .. math:: \\log p(x \\mid z) = -\\frac{\\lVert x - \\mathrm{decoder}(z) \\rVert^2}{2 \\sigma^2}
        - \\frac P2 \\log (2 \\pi \\sigma^2),

    the squared error up to a scale and a constant: an autoencoder's MSE loss.
    """

    name = "gaussian-fixed"
    params_per_pixel = 1
    needs_binary_data = False

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def __call__(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Normal(out, self.scale).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, ContinuousBernoulli, Gaussian, FixedGaussian)}


def make_likelihood(likelihood):
    """The likelihood of that name (with its default options), or ``likelihood`` itself when it is one
    already (``FixedGaussian(scale=0.1)``)."""
    if not isinstance(likelihood, str):
        return likelihood
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[likelihood]()
