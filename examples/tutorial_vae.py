"""Pyro's own VAE tutorial, unchanged, fitted by ``pvae.fit``: its encoder against free per-image
parameters, and what its encoder leaves on the table.

The program is the VAE of Pyro's tutorial and ``examples/vae/vae.py`` (Kingma & Welling 2013), with
784 pixels replaced by the 64 of scikit-learn's 8x8 digits and nothing else changed: a class ``VAE``
whose methods ``model(x)`` and ``guide(x)`` register their networks with ``pyro.module``, put the
images in ``pyro.plate("data", x.shape[0])`` and sample the sites ``"latent"`` and ``"obs"``:

.. math:: p_\\theta(x, z) = \\mathcal N(z;\\ 0, I) \\prod_{i=1}^{64} \\mathrm{Bernoulli}\\big(x_i;\\
          \\mathrm{decoder}_\\theta(z)_i\\big), \\qquad
          q_\\phi(z \\mid x) = \\mathcal N\\big(z;\\ \\mu_\\phi(x),\\ \\mathrm{diag}\\,\\sigma_\\phi(x)^2\\big).

pvae needs nothing of it but the plate's name. The script

1. fits ``vae.model`` with the tutorial's own amortized guide ``vae.guide``;
2. fits a second copy of the same model (same initial decoder) with ``MeanFieldGuide(vae.model)``:
   free :math:`(\\mu_n, \\sigma_n)` for every training image, built from the model's trace and trained
   with the decoder (variational EM, Hoffman et al. 2013). Each prints its final ELBO on training
   images, :math:`\\frac1N \\sum_n \\mathcal L(x_n)` in nats;
3. runs the gap study of Cremer et al. (2018) on held-out images with the amortized run's decoder
   frozen: :math:`\\mathcal L[q]` (the tutorial's encoder), :math:`\\mathcal L[q^*]` (the best
   diagonal Gaussian per image), :math:`\\log \\hat p(x)` (importance-weighted, Burda et al. 2015),
   and the gaps :math:`\\log \\hat p(x) - \\mathcal L[q^*]` (approximation) and
   :math:`\\mathcal L[q^*] - \\mathcal L[q]` (amortization). The tutorial's guide is a plain Pyro
   program that does not expose its :math:`(\\mu, \\sigma)` to pvae, so q* starts from the prior
   and there are no :math:`\\mathcal L[q_K]` rows (pvae's ``AmortizedGuide`` has both).

::

    python examples/tutorial_vae.py                                   # about a minute on a laptop CPU
    python examples/tutorial_vae.py --epochs 2 --quick --out /tmp/tutorial_vae

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Pyro's VAE tutorial, https://pyro.ai/examples/vae.html
3. Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, arXiv 1206.7051.
4. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
5. Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, arXiv 1509.00519.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

import pvae
from pvae.compare import compare_inference
from pvae.guides import MeanFieldGuide
from pvae.reports import comparison_table

from _study import add_study_arguments, print_training, study_config, write_study  # examples/_study.py

# ----------------------------------------------------------------------------- Pyro's tutorial, 784 -> 64


# define the PyTorch module that parameterizes the
# diagonal gaussian distribution q(z|x)
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        # setup the three linear transformations used
        self.fc1 = nn.Linear(64, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        # setup the non-linearities
        self.softplus = nn.Softplus()

    def forward(self, x):
        # define the forward computation on the image x
        # first shape the mini-batch to have pixels in the rightmost dimension
        x = x.reshape(-1, 64)
        # then compute the hidden units
        hidden = self.softplus(self.fc1(x))
        # then return a mean vector and a (positive) square root covariance
        # each of size batch_size x z_dim
        z_loc = self.fc21(hidden)
        z_scale = torch.exp(self.fc22(hidden))
        return z_loc, z_scale


# define the PyTorch module that parameterizes the
# observation likelihood p(x|z)
class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        # setup the two linear transformations used
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 64)
        # setup the non-linearities
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        # define the forward computation on the latent z
        # first compute the hidden units
        hidden = self.softplus(self.fc1(z))
        # return the parameter for the output Bernoulli
        # each is of size batch_size x 64
        loc_img = self.sigmoid(self.fc21(hidden))
        return loc_img


# define a PyTorch module for the VAE
class VAE(nn.Module):
    # by default our latent space is 50-dimensional
    # and we use 400 hidden units
    def __init__(self, z_dim=50, hidden_dim=400, use_cuda=False):
        super().__init__()
        # create the encoder and decoder networks
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)

        if use_cuda:
            # calling cuda() here will put all the parameters of
            # the encoder and decoder networks into gpu memory
            self.cuda()
        self.use_cuda = use_cuda
        self.z_dim = z_dim

    # define the model p(x|z)p(z)
    def model(self, x):
        # register PyTorch module `decoder` with Pyro
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            # setup hyperparameters for prior p(z)
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            # sample from prior (value will be sampled by guide when computing the ELBO)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            # decode the latent code z
            loc_img = self.decoder.forward(z)
            # score against actual images (with relaxed Bernoulli values)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, 64),
            )
            # return the loc so we can visualize it later
            return loc_img

    # define the guide (i.e. variational distribution) q(z|x)
    def guide(self, x):
        # register PyTorch module `encoder` with Pyro
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            # use the encoder to get the parameters used to define q(z|x)
            z_loc, z_scale = self.encoder.forward(x)
            # sample the latent code z
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    # define a helper function for reconstructing images
    def reconstruct_img(self, x):
        # encode image x
        z_loc, z_scale = self.encoder(x)
        # sample in latent space
        z = dist.Normal(z_loc, z_scale).sample()
        # decode the image (note we don't sample in image space)
        loc_img = self.decoder(z)
        return loc_img


# ----------------------------------------------------------------------------- the study

GUIDES = ("amortized", "mean-field")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pyro's VAE tutorial on 8x8 digits: its encoder against a mean-field "
                                            "guide, then the amortization and approximation gaps.")
    p.add_argument("--latent-dim", type=int, default=5, help="z_dim of the tutorial's VAE (default: 5)")
    p.add_argument("--hidden", type=int, default=200, help="hidden_dim of the tutorial's VAE (default: 200)")
    p.add_argument("--epochs", type=int, default=200, help="passes over the 1,295 training images (default: 200)")
    p.add_argument("--batch-size", type=int, default=128, help="images per SVI step (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate for the networks (default: 0.001)")
    p.add_argument("--local-lr", type=float, default=3e-2,
                   help="mean-field: SparseAdam's learning rate for the per-image parameters (default: 0.03)")
    add_study_arguments(p, 100, "images", "the two run folders, curves.png and compare.json/.md/.png",
                        refine_steps=False, refine_lr=False)
    args = p.parse_args(argv)
    if min(args.epochs, args.datapoints, args.latent_dim, args.hidden) < 1:
        p.error("--epochs, --datapoints, --latent-dim and --hidden must be at least 1")
    return args


def main(argv=None) -> dict:
    """Return ``{"histories": {guide: per-epoch records}, "comparison": pvae.compare.Comparison}``."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    data = pvae.load_dataset("digits", binarize="static").to(device)
    config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, local_lr=args.local_lr,
                            seed=args.seed, progress=not args.quiet)
    histories, vaes = {}, {}
    for name in GUIDES:
        pvae.set_seed(args.seed)  # the same initial decoder for both
        vae = VAE(z_dim=args.latent_dim, hidden_dim=args.hidden).to(device)
        guide = vae.guide if name == "amortized" else MeanFieldGuide(vae.model)
        run = args.out / name if args.out is not None else None
        histories[name] = pvae.fit(vae.model, guide, data, config, out_dir=run, device=device).history
        vaes[name] = vae

    vae = vaes["amortized"]
    x = data.batch("test", slice(0, args.datapoints))
    study = study_config(args)
    comparison = compare_inference(vae.model, x, vae.guide, study, progress=not args.quiet,
                                   settings={"split": "test", "data": data.name})

    print(f"Pyro's tutorial VAE on {data.name}: {data.train.shape[0]} training images of 64 binary pixels, "
          f"z_dim {args.latent_dim}, hidden_dim {args.hidden}, {args.epochs} epochs; after training:")
    print_training(histories, 11)
    print(f"\nInference gaps on {len(x)} test images, the amortized run's decoder held fixed (q* from the prior: "
          "vae.guide does not expose its parameters):")
    print(comparison_table(comparison))
    if args.out is not None:
        written = write_study(args.out, histories, comparison)
        print(f"\nwrote {', '.join(str(p) for p in written)} and the run folders "
              f"{', '.join(str(args.out / n) for n in GUIDES)}")
    return {"histories": histories, "comparison": comparison}


if __name__ == "__main__":
    main()
