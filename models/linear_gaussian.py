"""Probabilistic PCA as a VAE: the linear-Gaussian model whose evidence and posterior are exact.

.. math::
    z \\sim \\mathcal N(0, I_D), \\qquad x \\mid z \\sim \\mathcal N(W z + b, \\sigma^2 I_P),

    p(x) = \\mathcal N(x; b, W W^\\top + \\sigma^2 I), \\qquad
    p(z \\mid x) = \\mathcal N(\\Lambda^{-1} W^\\top (x - b) / \\sigma^2, \\Lambda^{-1}),
    \\quad \\Lambda = I + W^\\top W / \\sigma^2.

It is the ground truth that the tests hold the ELBO, the importance-weighted bound and the
gaps against.

References:

1. Tipping & Bishop, *Probabilistic Principal Component Analysis*, JRSS B 61 (1999).
2. Lucas, Tucker, Grosse & Norouzi, *Don't Blame the ELBO! A Linear VAE Perspective on Posterior
   Collapse*, arXiv 1911.02469.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pvae.plate import data_plate


class LinearGaussian(nn.Module):
    """The linear-Gaussian model with parameters ``W = linear.weight`` ``(P, D)``, ``b = linear.bias``
    and a learned noise scale ``sigma``."""

    def __init__(self, num_pixels: int, latent_dim: int, sigma: float = 1.0):
        super().__init__()
        self.latent_dim = latent_dim
        self.linear = nn.Linear(latent_dim, num_pixels)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, x: torch.Tensor, idx=None, num_data=None) -> None:
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.linear(z), self.sigma).to_event(1), obs=x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per datapoint, ``(N,)``."""
        W, b = self.linear.weight, self.linear.bias
        cov = W @ W.T + self.sigma**2 * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple:
        """The exact posterior p(z | x): means ``(N, D)`` and the shared precision ``Lambda`` ``(D, D)``."""
        W, b, s2 = self.linear.weight, self.linear.bias, self.sigma**2
        precision = torch.eye(self.latent_dim, dtype=W.dtype, device=W.device) + W.T @ W / s2
        mean = torch.linalg.solve(precision, (W.T @ (x - b).T) / s2).T
        return mean, precision

    @staticmethod
    @torch.no_grad()
    def max_likelihood(x: torch.Tensor, latent_dim: int) -> tuple:
        """Tipping & Bishop's closed-form maximum-likelihood fit to ``x`` ``(N, P)``.

        :returns: ``(W, b, sigma, mean_log_px)``, the last being the maximal mean log p(x) per datapoint.
        """
        n, p = x.shape
        if not 0 < latent_dim < p:
            raise ValueError(f"latent_dim must be in (0, {p}), got {latent_dim}")
        b = x.mean(0)
        cov = (x - b).T @ (x - b) / n
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        s2 = eigvals[latent_dim:].mean()
        W = eigvecs[:, :latent_dim] * (eigvals[:latent_dim] - s2).clamp(min=0).sqrt()
        model_cov = W @ W.T + s2 * torch.eye(p, dtype=x.dtype, device=x.device)
        log_px = dist.MultivariateNormal(b, covariance_matrix=model_cov).log_prob(x).mean()
        return W, b, s2.sqrt(), log_px
