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


class LinearGaussian(nn.Module):
    """The linear-Gaussian model with parameters ``W = linear.weight`` ``(P, D)``, ``b = linear.bias``
    and a learned noise scale ``sigma``."""

    static_structure = True  # the same operations on every batch (pvae.protocols.StaticProgram)

    def __init__(self, num_pixels: int, latent_dim: int, sigma: float = 1.0):
        super().__init__()
        self.latent_dim = latent_dim
        self.linear = nn.Linear(latent_dim, num_pixels)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
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


class LinearGaussianHierarchy(nn.Module):
    """Two stochastic layers, all linear-Gaussian, whose evidence and posterior are exact:

    .. math::
        z_1 \\sim \\mathcal N(0, I_{D_1}), \\quad z_2 \\mid z_1 \\sim \\mathcal N(A z_1 + c, s^2 I_{D_2}), \\quad
        x \\mid z_2 \\sim \\mathcal N(W z_2 + b, \\sigma^2 I_P).

    With :math:`u = (z_1, z_2)` and :math:`H = [0, W]`, the prior precision of u is
    :math:`\\begin{pmatrix} I + A^\\top A / s^2 & -A^\\top / s^2 \\\\ -A / s^2 & I / s^2 \\end{pmatrix}`, the
    posterior precision :math:`\\Lambda` adds :math:`H^\\top H / \\sigma^2`, and
    :math:`p(x) = \\mathcal N(x;\\ W c + b,\\ W (A A^\\top + s^2 I) W^\\top + \\sigma^2 I)`. The best
    mean-field Gaussian over both sites has the posterior means and variances :math:`1 / \\Lambda_{dd}`:
    the gap study's q* and approximation gap over two sites have closed forms.
    """

    static_structure = True  # the same operations on every batch (pvae.protocols.StaticProgram)

    def __init__(self, num_pixels: int, top_dim: int, bottom_dim: int, s: float = 0.5, sigma: float = 0.5):
        super().__init__()
        self.top_dim, self.bottom_dim = top_dim, bottom_dim
        self.top = nn.Linear(top_dim, bottom_dim)  # A, c
        self.linear = nn.Linear(bottom_dim, num_pixels)  # W, b
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(x.shape[0], self.top_dim), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(self.top(z1), self.log_s.exp()).to_event(1))
            pyro.sample("x", dist.Normal(self.linear(z2), self.log_sigma.exp()).to_event(1), obs=x)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per datapoint, ``(N,)``."""
        A, c, W, b = self.top.weight, self.top.bias, self.linear.weight, self.linear.bias
        eye = lambda n: torch.eye(n, dtype=W.dtype, device=W.device)  # noqa: E731
        cov_z2 = A @ A.T + self.log_s.exp() ** 2 * eye(self.bottom_dim)
        cov = W @ cov_z2 @ W.T + self.log_sigma.exp() ** 2 * eye(W.shape[0])
        return dist.MultivariateNormal(W @ c + b, covariance_matrix=cov).log_prob(x)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple:
        """The exact posterior of u = (z1, z2): means ``(N, D1 + D2)`` and the shared precision ``(D1 + D2,) * 2``."""
        A, c, W, b = self.top.weight, self.top.bias, self.linear.weight, self.linear.bias
        s2, sigma2 = self.log_s.exp() ** 2, self.log_sigma.exp() ** 2
        d1, d2 = self.top_dim, self.bottom_dim
        eye = lambda n: torch.eye(n, dtype=W.dtype, device=W.device)  # noqa: E731
        prior_precision = torch.cat([
            torch.cat([eye(d1) + A.T @ A / s2, -A.T / s2], 1),
            torch.cat([-A / s2, eye(d2) / s2], 1),
        ])
        H = torch.cat([W.new_zeros(W.shape[0], d1), W], 1)
        precision = prior_precision + H.T @ H / sigma2
        prior_mean = torch.cat([W.new_zeros(d1), c])
        rhs = (prior_precision @ prior_mean)[:, None] + H.T @ (x - b).T / sigma2
        return torch.linalg.solve(precision, rhs).T, precision
