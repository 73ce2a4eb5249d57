"""A VAE whose prior is a mixture with an explicit, enumerated component: Pyro sums the discrete
latent out exactly, and the guides built by pvae infer the continuous one only.

The generative model draws a component, then a code from that component's Gaussian, then the pixels
(the Gaussian-mixture VAE of Dilokthanakul et al. 2016 and Jiang et al. 2017, here on 8x8 digits):

.. math::
    c \\sim \\mathrm{Categorical}(\\pi), \\qquad
    z \\mid c \\sim \\mathcal N\\big(\\mu_c,\\ \\mathrm{diag}\\,\\sigma_c^2\\big), \\qquad
    x \\mid z \\sim \\prod_{i=1}^{64} \\mathrm{Bernoulli}\\big(x_i;\\ \\mathrm{sigmoid}(f_\\theta(z)_i)\\big),

with :math:`\\pi, \\mu_{1..K}, \\sigma_{1..K}` learned with the decoder :math:`f_\\theta`. The site
``c`` is marked ``infer={"enumerate": "parallel"}``, so pvae trains with ``TraceEnum_ELBO``, which
sums it out in every bound: the guide's q is over z alone,

.. math:: \\mathcal L(x) = \\mathbb E_{q(z \\mid x)}\\Big[\\log p(x \\mid z)
          + \\log \\sum_{c=1}^K \\pi_c\\, \\mathcal N(z;\\ \\mu_c, \\mathrm{diag}\\,\\sigma_c^2)
          - \\log q(z \\mid x)\\Big],

and no score-function gradient for c is needed. The script fits it twice from the same initial
model, with an ``AmortizedGuide`` (an encoder for z) and a ``MeanFieldGuide`` (a free Gaussian per
training image), prints each one's final ELBO on training images, and runs the gap study of Cremer
et al. (2018) on the amortized run (q* over z, c summed out exactly throughout). The components'
posterior :math:`p(c \\mid z) \\propto \\pi_c \\mathcal N(z; \\mu_c, \\sigma_c^2)` at the encoder's mean
clusters the held-out digits; the script reports the clusters' purity against the digits' labels
(the share of images whose cluster's most common label is their own)::

    python examples/mixture_vae.py                                       # a minute or two on a CPU
    python examples/mixture_vae.py --epochs 2 --quick --out /tmp/mixture_vae

References:

1. Dilokthanakul et al., *Deep Unsupervised Clustering with Gaussian Mixture Variational
   Autoencoders*, arXiv 1611.02648.
2. Jiang, Zheng, Tan, Tang & Zhou, *Variational Deep Embedding*, arXiv 1611.05148.
3. Obermeyer et al., *Tensor Variable Elimination for Plated Factor Graphs* (Pyro's enumeration),
   arXiv 1902.03210.
4. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.compare import compare_inference
from pvae.guides import AmortizedGuide, MeanFieldGuide
from pvae.models.networks import mlp
from pvae.reports import comparison_table

from _study import add_study_arguments, print_training, study_config, write_study  # examples/_study.py

GUIDES = ("amortized", "mean-field")


class MixtureVAE(nn.Module):
    """p(c) p(z | c) p(x | z) with K Gaussian components and an MLP decoder.

    :param num_pixels: P, the size of a flat image.
    :param latent_dim: D, the size of z.
    :param num_components: K.
    :param hidden: hidden widths of the decoder.
    """

    def __init__(self, num_pixels: int = 64, latent_dim: int = 2, num_components: int = 10, hidden=(200,)):
        super().__init__()
        self.decoder = mlp([latent_dim, *hidden, num_pixels])
        self.mixture_logits = nn.Parameter(torch.zeros(num_components))  # uniform weights at first
        # spread the means so that the components do not start identical; unit scales
        self.component_loc = nn.Parameter(2.0 * torch.randn(num_components, latent_dim))
        self.component_raw_scale = nn.Parameter(torch.full((num_components, latent_dim), math.log(math.e - 1)))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            # enumerated: c has shape (K, 1) here, so every component's loc and scale come out at once
            c = pyro.sample("c", dist.Categorical(logits=self.mixture_logits), infer={"enumerate": "parallel"})
            scale = F.softplus(self.component_raw_scale[c])
            z = pyro.sample("z", dist.Normal(self.component_loc[c], scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @torch.no_grad()
    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """p(c | z) for ``(B, D)`` codes, ``(B, K)``."""
        components = dist.Normal(self.component_loc, F.softplus(self.component_raw_scale)).to_event(1)
        joint = F.log_softmax(self.mixture_logits, -1) + components.log_prob(z.unsqueeze(-2))
        return joint.softmax(-1)


def purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of datapoints whose cluster's most common label is their own."""
    hits = sum(int(torch.bincount(labels[clusters == k]).max()) for k in clusters.unique())
    return hits / len(labels)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A VAE with an enumerated mixture prior on 8x8 digits: amortized against "
                                            "mean-field q(z), then the inference gaps.")
    p.add_argument("--latent-dim", type=int, default=2, help="D, the size of z (default: 2)")
    p.add_argument("--components", type=int, default=10, help="K, the mixture's components (default: 10)")
    p.add_argument("--hidden", type=int, nargs="*", default=[200],
                   help="hidden widths of the decoder and of the encoder (default: 200)")
    p.add_argument("--epochs", type=int, default=100, help="passes over the 1,295 training images (default: 100)")
    p.add_argument("--batch-size", type=int, default=128, help="images per SVI step (default: 128)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="Adam's learning rate for the networks and the mixture (default: 0.003)")
    p.add_argument("--local-lr", type=float, default=3e-2,
                   help="mean-field: SparseAdam's learning rate for the per-image parameters (default: 0.03)")
    add_study_arguments(p, 100, "images", "the run folders, curves.png and compare.json/.md/.png")
    args = p.parse_args(argv)
    if min(args.epochs, args.datapoints, args.latent_dim, args.components) < 1:
        p.error("--epochs, --datapoints, --latent-dim and --components must be at least 1")
    return args


def main(argv=None) -> dict:
    """Return ``{"histories", "comparison", "enumerated", "weights", "purity", "clusters", "labels", "model",
    "guide", "x_study"}``: per guide its per-epoch records and the sites summed out; the amortized run's
    mixture weights, its test images' clusters, their labels and purity, its model and guide, and the
    images of the gap study."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    data = pvae.load_dataset("digits", binarize="static").to(device)
    config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, local_lr=args.local_lr,
                            seed=args.seed, progress=not args.quiet)
    histories, enumerated, fitted = {}, {}, {}
    for name in GUIDES:
        pvae.set_seed(args.seed)  # the same initial model for both
        model = MixtureVAE(data.num_pixels, args.latent_dim, args.components, tuple(args.hidden))
        guide = AmortizedGuide(model, hidden=tuple(args.hidden)) if name == "amortized" else MeanFieldGuide(model)
        run = args.out / name if args.out is not None else None
        result = pvae.fit(model, guide, data, config, out_dir=run, device=device)
        histories[name], enumerated[name], fitted[name] = result.history, result.info.enumerated, (model, guide)

    model, guide = fitted["amortized"]
    with torch.no_grad():
        z_mean = guide.local_params(data.batch("test"))["z"]["loc"]
    clusters = model.responsibilities(z_mean).argmax(-1).cpu()
    score = purity(clusters, data.test_labels.cpu())
    weights = model.mixture_logits.detach().softmax(-1).cpu()

    x = data.batch("test", slice(0, args.datapoints))
    study = study_config(args)
    comparison = compare_inference(model, x, guide, study, progress=not args.quiet,
                                   settings={"split": "test", "data": data.name})

    print(f"mixture VAE, K = {args.components} components in {args.latent_dim}-D, on {data.name} "
          f"({data.train.shape[0]} training images), {args.epochs} epochs; site(s) "
          f"{', '.join(enumerated['amortized'])} summed out by enumeration; after training:")
    print_training(histories, 11)
    print(f"\nthe amortized run's mixture weights: {', '.join(f'{w:.2f}' for w in weights.tolist())}")
    print(f"its {len(clusters)} test images in {len(clusters.unique())} clusters (argmax_c p(c | E_q[z])), "
          f"purity against their labels {score:.3f}")
    print(f"\nInference gaps on {len(x)} test images, the amortized run's model held fixed (q* over "
          f"{comparison.settings['family']}, c summed out):")
    print(comparison_table(comparison))
    if args.out is not None:
        written = write_study(args.out, histories, comparison)
        print(f"\nwrote {', '.join(str(p) for p in written)} and the run folders "
              f"{', '.join(str(args.out / n) for n in GUIDES)}")
    return {"histories": histories, "comparison": comparison, "enumerated": enumerated, "weights": weights,
            "purity": score, "clusters": clusters, "labels": data.test_labels.cpu(), "model": model, "guide": guide,
            "x_study": x.x}


if __name__ == "__main__":
    main()
