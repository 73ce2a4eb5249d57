"""A model of your own: a VAE whose prior is a learned mixture of Gaussians, fitted by ``pvae.fit``.

.. math:: p(z) = \\sum_{k=1}^K \\pi_k\\, \\mathcal N(z;\\ \\mu_k,\\ \\mathrm{diag}\\,\\sigma_k^2), \\qquad
          p(x \\mid z) = \\prod_i \\mathrm{Bernoulli}(x_i;\\ \\mathrm{decoder}(z)_i)

The mixture's weights, means and scales are learned with the decoder (Dilokthanakul et al. 2016;
Tomczak & Welling 2018 learn richer priors the same way). Nothing in pvae knows this model: it is a
Pyro program ``model(x)`` with its datapoints in ``pyro.plate("data", ...)``, paired with the
amortized Gaussian guide, and ``pvae.fit`` trains it by SVI. There is no closed-form KL between q
and a mixture, so Trace_ELBO and the evaluation both use the Monte Carlo estimate of
:math:`\\mathbb E_q[\\log q(z \\mid x) - \\log p(z)]`. The script fits it on scikit-learn's digits and
compares its test ELBO with the standard-normal-prior VAE of the same size::

    python examples/custom_model.py --epochs 50
    python examples/custom_model.py --epochs 2 --hidden 32 --out runs/mixture   # quick, with pictures

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Dilokthanakul et al., *Deep Unsupervised Clustering with Gaussian Mixture Variational
   Autoencoders*, arXiv 1611.02648.
3. Tomczak & Welling, *VAE with a VampPrior*, arXiv 1705.07120.
"""

import argparse
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae import figures
from pvae.data import BINARIZE
from pvae.guides import mlp_guide
from pvae.models import Bernoulli, mlp_vae
from pvae.models.networks import mlp


class MixturePriorVAE(nn.Module):
    """p(z) p(x | z) with a learned ``num_components``-Gaussian mixture prior and an MLP decoder.

    :param num_pixels: P, the size of a flat image.
    :param latent_dim: D, the size of z.
    :param num_components: K, the mixture's components.
    :param hidden: hidden widths of the decoder.
    """

    def __init__(self, num_pixels: int, latent_dim: int = 2, num_components: int = 10, hidden=(400,)):
        super().__init__()
        self.latent_dim = latent_dim
        self.likelihood = Bernoulli()
        self.decoder = mlp([latent_dim, *hidden, num_pixels])
        self.mixture_logits = nn.Parameter(torch.zeros(num_components))  # (K,) uniform weights at first
        # spread the means so that components do not start identical (K, D); unit scales
        self.component_loc = nn.Parameter(2.0 * torch.randn(num_components, latent_dim))
        self.component_raw_scale = nn.Parameter(torch.full((num_components, latent_dim), math.log(math.e - 1)))

    def prior(self) -> dist.MixtureSameFamily:
        """p(z): batch shape ``()``, event shape ``(D,)``."""
        weights = dist.Categorical(logits=self.mixture_logits)
        components = dist.Normal(self.component_loc, F.softplus(self.component_raw_scale)).to_event(1)
        return dist.MixtureSameFamily(weights, components)

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("mixture_vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior().expand([x.shape[0]]))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A VAE with a learned mixture-of-Gaussians prior, against the standard normal prior.")
    p.add_argument("--epochs", type=int, default=50, help="default: 50")
    p.add_argument("--latent-dim", type=int, default=2, help="size of z (default: 2)")
    p.add_argument("--components", type=int, default=10, help="Gaussians in the prior (default: 10, as digits' classes)")
    p.add_argument("--hidden", type=int, nargs="*", default=[400], help="hidden widths of encoder and decoder (default: 400)")
    p.add_argument("--batch-size", type=int, default=128, help="default: 128")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: 0.001)")
    p.add_argument("--binarize", choices=BINARIZE[1:], default="dynamic", help="default: dynamic")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--out", type=Path, default=None, help="folder for prior-sample pictures (default: write nothing)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines (default: off)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Fit both models; return ``{name: final metrics record}`` (``test_elbo``, ``test_recon``, ``test_kl``, ...)."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    data = pvae.load_dataset("digits", binarize=args.binarize)
    config = pvae.FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        eval_every=args.epochs, progress=not args.quiet,
    )
    builders = {
        "mixture prior": lambda: MixturePriorVAE(data.num_pixels, args.latent_dim, args.components, args.hidden),
        "normal prior": lambda: mlp_vae(data.num_pixels, args.latent_dim, args.hidden),
    }
    results = {}
    for name, build in builders.items():
        pvae.set_seed(args.seed)  # both models start from the same random state
        model, guide = build(), mlp_guide(data.num_pixels, args.latent_dim, args.hidden)
        result = pvae.fit(model, guide, data, config, device=device)
        results[name] = result.final
        if args.out is not None:
            # the model's own prior, drawn by running the model: the mixture's for the first
            figures.prior_samples(model, guide, data.to(device), args.out / f"samples_{name.replace(' ', '_')}.png",
                                  n=64, seed=args.seed, title=f"64 samples from the {name}: E[x | z], z ~ p(z)")

    print(f"digits ({data.test.shape[0]} test images), {args.latent_dim}-D latent, {args.epochs} epochs:")
    for name, record in results.items():
        print(f"  {name:14s} test ELBO {record['test_elbo']:9.3f} nats  "
              f"(recon {record['test_recon']:9.3f}, KL {record['test_kl']:7.3f})")
    gain = results["mixture prior"]["test_elbo"] - results["normal prior"]["test_elbo"]
    print(f"  the mixture prior's test ELBO is {gain:+.3f} nats per image against the normal prior's")
    return results


if __name__ == "__main__":
    main()
