"""Pixel likelihoods p(x | z): each maps a decoder's output to a distribution over a flat image.

A decoder for a likelihood with ``params_per_pixel = k`` outputs ``k * P`` numbers per image.
"""


import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions.utils import broadcast_all


class BernoulliImage(dist.Independent):
    """``Bernoulli(logits).to_event(1)``, whose log-density sums the pixels' cross-entropies before
    negating the sum: the same value and gradient with one pass over the image fewer, which at batch
    1024 is about a twentieth of a 784-400-20 VAE's training step (benchmarks/fit_speed.py)."""

    def log_prob(self, value):
        if self._validate_args:
            self.base_dist._validate_sample(value)
        logits, value = broadcast_all(self.base_dist.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


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
