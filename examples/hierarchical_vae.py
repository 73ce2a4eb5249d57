"""A VAE with two stochastic layers, fitted with amortized, mean-field and semi-amortized guides that
pvae builds from the model's trace, then the inference gaps of its amortized guide.

The generative model stacks two Gaussian layers above Bernoulli pixels, as the two-layer models of
Burda et al. (2015), small enough for 8x8 digits:

.. math::
    z_1 \\sim \\mathcal N(0, I_{D_1}), \\qquad
    z_2 \\mid z_1 \\sim \\mathcal N\\big(\\mu_\\theta(z_1),\\ \\mathrm{diag}\\,\\sigma_\\theta(z_1)^2\\big), \\qquad
    x \\mid z_2 \\sim \\prod_{i=1}^{64} \\mathrm{Bernoulli}\\big(x_i;\\ \\mathrm{sigmoid}(f_\\theta(z_2)_i)\\big),

with :math:`D_1 = 2`, :math:`D_2 = 8` and MLPs :math:`(\\mu_\\theta, \\sigma_\\theta)` and
:math:`f_\\theta`. It is a plain Pyro program: both sites sit in ``pyro.plate("data", ...)``, and
nothing in it is written for pvae. The guides are built from its trace, each giving both local sites
a diagonal Gaussian, :math:`q(z_1, z_2 \\mid x) = q(z_1 \\mid x)\\, q(z_2 \\mid x)`:

- ``AmortizedGuide``: one encoder network :math:`x \\mapsto` the means and scales of both sites;
- ``MeanFieldGuide``: a free :math:`(\\mu_n, \\sigma_n)` per training image, trained with the model
  (variational EM, Hoffman et al. 2013);
- ``SemiAmortizedGuide``: the encoder's q refined by K gradient steps per batch (Kim et al. 2018).

(Burda et al.'s own q is a chain :math:`q(z_2 \\mid x) q(z_1 \\mid z_2)`; the factorized family here
is what the gap study's q* optimizes over.) The ELBO takes the closed-form
:math:`\\mathrm{KL}(q(z_2 \\mid x) \\,\\|\\, p(z_2 \\mid z_1))` at the sampled :math:`z_1`, which is
exact because the guide does not draw :math:`z_1` after :math:`z_2` (``--elbo analytic-kl``). Each
guide's final ELBO on training images is printed in nats; then the amortized run's model is frozen
and the gap study of Cremer et al. (2018) measures on held-out images :math:`\\mathcal L[q]` (the
encoder), :math:`\\mathcal L[q_K]` (K refinement steps from it), :math:`\\mathcal L[q^*]` (the best
factorized Gaussian per image, started at the encoder's q), :math:`\\log \\hat p(x)` and the
approximation and amortization gaps::

    python examples/hierarchical_vae.py                                # a minute or two on a CPU
    python examples/hierarchical_vae.py --epochs 2 --quick --out /tmp/hierarchical_vae

References:

1. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
2. Sønderby, Raiko, Maaløe, Sønderby & Winther, *Ladder Variational Autoencoders*, arXiv 1602.02282.
3. Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, arXiv 1206.7051.
4. Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, arXiv 1802.02550.
5. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.compare import compare_inference
from pvae.guides import AmortizedGuide, MeanFieldGuide, SemiAmortizedGuide
from pvae.models.networks import mlp
from pvae.reports import comparison_table

from _study import add_study_arguments, print_training, study_config, write_study  # examples/_study.py

GUIDES = ("amortized", "mean-field", "semi-amortized")


class HierarchicalVAE(nn.Module):
    """p(z1) p(z2 | z1) p(x | z2), with an MLP for each conditional.

    :param num_pixels: P, the size of a flat image.
    :param top_dim: D1, the size of z1.
    :param bottom_dim: D2, the size of z2.
    :param hidden: hidden widths of both MLPs.
    """

    def __init__(self, num_pixels: int = 64, top_dim: int = 2, bottom_dim: int = 8, hidden=(64,)):
        super().__init__()
        self.top_dim = top_dim
        self.prior_net = mlp([top_dim, *hidden, 2 * bottom_dim])  # z1 -> (loc, raw scale) of z2
        self.decoder = mlp([bottom_dim, *hidden, num_pixels])  # z2 -> Bernoulli logits

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(x.shape[0], self.top_dim), 1.0).to_event(1))
            loc, raw_scale = self.prior_net(z1).chunk(2, dim=-1)
            z2 = pyro.sample("z2", dist.Normal(loc, F.softplus(raw_scale) + 1e-3).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z2)).to_event(1), obs=x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A two-layer VAE on 8x8 digits with amortized, mean-field and "
                                            "semi-amortized guides, then the inference gaps.")
    p.add_argument("--top-dim", type=int, default=2, help="D1, the size of z1 (default: 2)")
    p.add_argument("--bottom-dim", type=int, default=8, help="D2, the size of z2 (default: 8)")
    p.add_argument("--hidden", type=int, nargs="*", default=[64],
                   help="hidden widths of the model's MLPs and of the encoder (default: 64)")
    p.add_argument("--guides", nargs="+", choices=GUIDES, default=list(GUIDES),
                   help="the guides to fit; amortized is always fitted, for the gap study "
                        "(default: amortized mean-field semi-amortized)")
    p.add_argument("--epochs", type=int, default=150, help="passes over the 1,295 training images (default: 150)")
    p.add_argument("--batch-size", type=int, default=128, help="images per SVI step (default: 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate for the networks (default: 0.003)")
    p.add_argument("--local-lr", type=float, default=3e-2,
                   help="mean-field: SparseAdam's learning rate for the per-image parameters (default: 0.03)")
    p.add_argument("--elbo", choices=("trace", "analytic-kl"), default="analytic-kl",
                   help="the training objective's KL: Monte Carlo or closed form where exact (default: analytic-kl)")
    p.add_argument("--refine-steps", type=int, default=5, help="semi-amortized training: K (default: 5)")
    p.add_argument("--refine-lr", type=float, default=0.05,
                   help="the refinement's natural-gradient step size, in training and in the study (default: 0.05)")
    add_study_arguments(p, 100, "images", "the run folders, curves.png and compare.json/.md/.png", refine_lr=False)
    args = p.parse_args(argv)
    if min(args.epochs, args.datapoints, args.top_dim, args.bottom_dim) < 1:
        p.error("--epochs, --datapoints, --top-dim and --bottom-dim must be at least 1")
    args.guides = [g for g in GUIDES if g == "amortized" or g in args.guides]
    return args


def main(argv=None) -> dict:
    """Return ``{"histories": {guide: per-epoch records}, "comparison": pvae.compare.Comparison}``."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    data = pvae.load_dataset("digits", binarize="static").to(device)
    config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, local_lr=args.local_lr,
                            elbo=args.elbo, seed=args.seed, progress=not args.quiet)
    histories, fitted = {}, {}
    for name in args.guides:
        pvae.set_seed(args.seed)  # the same initial model for every guide
        model = HierarchicalVAE(data.num_pixels, args.top_dim, args.bottom_dim, tuple(args.hidden))
        if name == "mean-field":
            guide = MeanFieldGuide(model)
        else:
            guide = AmortizedGuide(model, hidden=tuple(args.hidden))
            if name == "semi-amortized":
                guide = SemiAmortizedGuide(guide, model, args.refine_steps, args.refine_lr)
        run = args.out / name if args.out is not None else None
        result = pvae.fit(model, guide, data, config, out_dir=run, device=device)
        histories[name], fitted[name] = result.history, (model, guide)

    model, guide = fitted["amortized"]
    x = data.batch("test", slice(0, args.datapoints))
    study = study_config(args)
    comparison = compare_inference(model, x, guide, study, progress=not args.quiet,
                                   settings={"split": "test", "data": data.name})

    print(f"two-layer VAE z1 ({args.top_dim}) -> z2 ({args.bottom_dim}) -> x on {data.name} "
          f"({data.train.shape[0]} training images), hidden {args.hidden}, {args.epochs} epochs; after training:")
    print_training(histories, 15)
    print(f"\nInference gaps on {len(x)} test images, the amortized run's model held fixed "
          f"(q* over {comparison.settings['family']}, from the encoder's q):")
    print(comparison_table(comparison))
    if args.out is not None:
        written = write_study(args.out, histories, comparison)
        print(f"\nwrote {', '.join(str(p) for p in written)} and the run folders "
              f"{', '.join(str(args.out / n) for n in args.guides)}")
    return {"histories": histories, "comparison": comparison}


if __name__ == "__main__":
    main()
