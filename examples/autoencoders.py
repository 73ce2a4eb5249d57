"""PCA, an autoencoder and a VAE side by side on the digits, then denoising autoencoders.

For each latent size (2, 8 and 32, as the lecture's MNIST figures) the script fits PCA
(scikit-learn), an MLP autoencoder (a point-mass encoder, a flat prior and Gaussian pixels of a fixed
scale, so that its loss is the squared error) and an MLP VAE with the same decoder, likelihood and
encoder body, and prints the squared error per test image, summed over its 64 pixels, of each one's
reconstruction, with the VAE's test ELBO. Then it fits a plain autoencoder and denoising ones (masking
with p = 0.5 and 0.9, Gaussian noise with sigma = 0.5) at latent size 8 and prints the error with which
each restores the clean test images from corrupted ones. It draws into ``--out``:

- ``reconstructions.png``: the same test images reconstructed by PCA, the autoencoder and the VAE at
  each latent size (:func:`pvae.figures.coder_reconstructions`);
- ``interpolation.png``: the VAE's, the autoencoder's and PCA's rows between the same two test images,
  at the largest latent size (:func:`pvae.figures.interpolation`);
- ``generation-failures.png``: autoencoders of latent sizes 8, 16 and 32 (``--sample-sizes``), their
  codes perturbed by N(0, 0.5²I) and N(0, I) noise and drawn from the Gaussian fitted to the training
  codes (:func:`pvae.figures.generation_failures`);
- ``denoising.png``: corrupted test images and what the denoising and the plain autoencoder make of
  them (:func:`pvae.figures.denoising`)::

    python examples/autoencoders.py --out runs/autoencoders     # about 2 minutes on 2 CPU cores
    python examples/autoencoders.py --sizes 2 --epochs 2 --hidden 16 --sample-sizes 2 --out /tmp/ae  # quick

References:

1. Baldi & Hornik, *Neural networks and principal component analysis: Learning from examples without
   local minima*, Neural Networks 2 (1989).
2. Vincent, Larochelle, Bengio & Manzagol, *Extracting and Composing Robust Features with Denoising
   Autoencoders*, ICML 2008.
"""

import argparse
from pathlib import Path

import pvae
from pvae import figures
from pvae.autoencoding import CoderConfig, denoising_errors, fit_autoencoder, reconstruction_errors
from pvae.guides import GaussianNoise, MaskingNoise
from pvae.inference import elbo_terms
from pvae.reports import reconstruction_table


def parse_args(argv=None) -> argparse.Namespace:
    d = CoderConfig()
    p = argparse.ArgumentParser(description="Reconstruction errors of PCA, an autoencoder and a VAE; denoising.")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32], help="latent sizes (default: 2 8 32)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default: {d.epochs}")
    p.add_argument("--hidden", type=int, nargs="*", default=list(d.hidden), help=f"hidden widths of encoder and decoder; none: linear (default: {' '.join(map(str, d.hidden))})")
    p.add_argument("--scale", type=float, default=d.scale, help=f"sigma of the Gaussian pixels (default: {d.scale})")
    p.add_argument("--denoising-size", type=int, default=8, help="latent size of the denoising autoencoders (default: 8)")
    p.add_argument("--sample-sizes", type=int, nargs="+", default=[8, 16, 32],
                   help="latent sizes of the autoencoders whose code spaces are sampled (default: 8 16 32)")
    p.add_argument("--masking", type=float, nargs="+", default=[0.5, 0.9], help="masking probabilities (default: 0.5 0.9)")
    p.add_argument("--noise", type=float, default=0.5, help="Gaussian noise sigma (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the training (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--out", type=Path, default=Path("runs/autoencoders"), help="folder for the pictures (default: runs/autoencoders)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress (default: off)")
    args = p.parse_args(argv)
    if min(args.sizes + args.sample_sizes) < 1:
        p.error("latent sizes must be at least 1")
    if not all(0 <= m < 1 for m in args.masking):
        p.error("masking probabilities are in [0, 1)")
    return args


def main(argv=None) -> dict:
    """Return ``{"reconstruction": ReconstructionErrors, "vae_elbo": {size: test ELBO}, "denoising": {...}}``."""
    args = parse_args(argv)
    data = pvae.load_dataset("digits").to(pvae.resolve_device(args.device))  # grey levels in [0, 1]
    config = CoderConfig(hidden=tuple(args.hidden), scale=args.scale, epochs=args.epochs, seed=args.seed,
                         progress=not args.quiet)
    result = reconstruction_errors(data, args.sizes, config)
    print(f"Squared error per test image ({result.settings['datapoints']} digits of 8x8 pixels in [0, 1]), "
          "mean ± standard error:\n")
    print(reconstruction_table(result))
    vae_elbo = {}
    for size, coder in result.coders["vae"].items():
        vae_elbo[size] = elbo_terms(coder.model, coder.guide, data.test, num_particles=100)["elbo"].mean().item()
        print(f"VAE, latent size {size}: test ELBO {vae_elbo[size]:.2f} nats (Gaussian pixels of scale {args.scale})")
    corruptions = {**{f"masking p = {m:g}": MaskingNoise(m) for m in args.masking},
                   f"Gaussian noise σ = {args.noise:g}": GaussianNoise(args.noise)}
    denoising = denoising_errors(data, corruptions, args.denoising_size, config)
    print(f"\nRestoring corrupted test images, latent size {args.denoising_size}: squared error per image against the "
          "clean ones\n")
    print("| corruption | autoencoder | denoising autoencoder |\n| --- | ---: | ---: |")
    for label, errors in denoising.errors.items():
        print(f"| {label} | {errors['ae']} | {errors['dae']} |")
    written = draw_figures(args, data, config, result, denoising, corruptions)
    print("\nFigures: " + ", ".join(str(p) for p in written))
    return {"reconstruction": result, "vae_elbo": vae_elbo, "denoising": denoising.errors, "figures": written}


def draw_figures(args, data, config: CoderConfig, result, denoising, corruptions) -> list:
    """The four figures of the lecture's autoencoder part, from the coders fitted above (and autoencoders
    for the ``--sample-sizes`` that ``--sizes`` lacks)."""
    coders = result.coders
    by_size = {f"{name}, d = {d}": coders[method][d] for d in args.sizes
               for method, name in (("pca", "PCA"), ("ae", "AE"), ("vae", "VAE"))}
    largest = max(args.sizes)
    vae = coders["vae"][largest]
    autoencoders = {f"d = {d}": coders["ae"][d] if d in coders["ae"] else fit_autoencoder(data, d, config)
                    for d in args.sample_sizes}
    denoisers = {label: (corruption, denoising.coders[label]) for label, corruption in corruptions.items()}
    return [
        figures.coder_reconstructions(by_size, data, args.out / "reconstructions.png",
                                      title=f"{data.name}: test images reconstructed by PCA, the autoencoder and the "
                                            f"VAE (mean of q) at latent sizes {', '.join(map(str, args.sizes))}"),
        figures.interpolation(vae.model, vae.guide, data, args.out / "interpolation.png", label=f"VAE, d = {largest}",
                              others={f"AE, d = {largest}": coders["ae"][largest],
                                      f"PCA, d = {largest}": coders["pca"][largest]}),
        figures.generation_failures(autoencoders, data, args.out / "generation-failures.png", seed=args.seed),
        figures.denoising(denoisers, data, args.out / "denoising.png", plain=denoising.coders["ae"], seed=args.seed),
    ]


if __name__ == "__main__":
    main()
