"""Amortized, mean-field and semi-amortized inference for one decoder, and what each leaves on the
table: the inference gaps of Cremer, Li & Duvenaud (2018).

1. Fits the same MLP VAE three ways, as ``pvae train --guide amortized|mean-field|semi-amortized``
   would: an encoder network; free per-datapoint (loc, scale) trained with the decoder (variational
   EM); the encoder's q refined by K gradient steps per batch (Kim et al. 2018). Each run folder
   lands in ``--out``, and their training curves (ELBO on training rows against epoch and against
   seconds) on one figure, ``curves.png``.
2. Freezes the amortized run's decoder and measures on held-out images L[q] (the encoder), L[q_K]
   (K refinement steps), L[q*] (the best Gaussian per datapoint), log p̂(x) (importance-weighted,
   many samples) and the approximation and amortization gaps; prints the table and writes
   ``compare.json``, ``compare.md`` and the bar chart ``compare.png``.

::

    python examples/amortized_vs_mean_field.py --out runs/amortized_vs_mean_field      # digits, minutes
    python examples/amortized_vs_mean_field.py --epochs 1 --hidden 16 --datapoints 8 --quick --out /tmp/a

On 8x8 digits the gaps are small (a small decoder has simple posteriors); Cremer et al.'s figures are
for Fashion-MNIST after 3,280 epochs, ``pvae.compare.CREMER_2018_COMMAND`` reproduces their setting.

References:

1. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
2. Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, arXiv 1802.02550.
3. Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, arXiv 1206.7051.
"""

import argparse
from pathlib import Path

import pvae
from pvae import figures
from pvae.compare import CompareConfig, compare_inference
from pvae.data import BINARIZE
from pvae.registry import RunConfig, build, load_data
from pvae.reports import comparison_table
from pvae.run import write_comparison

from _study import print_training  # examples/_study.py

GUIDES = ("amortized", "mean-field", "semi-amortized")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fit one VAE with three guides, then measure amortization and approximation gaps.")
    p.add_argument("--dataset", default="digits", help="digits (default), or fashion-mnist with --data-dir, or a folder of IDX files")
    p.add_argument("--data-dir", help="where the data set's files are (default: none, for digits)")
    p.add_argument("--binarize", choices=BINARIZE[1:], default="threshold", help="default: threshold, as Cremer et al.")
    p.add_argument("--latent-dim", type=int, default=5, help="size of z (default: 5)")
    p.add_argument("--hidden", type=int, nargs="*", default=[200, 200], help="hidden widths of encoder and decoder (default: 200 200)")
    p.add_argument("--activation", default="elu", help="default: elu, as Cremer et al.")
    p.add_argument("--epochs", type=int, default=100, help="epochs per guide (default: 100)")
    p.add_argument("--batch-size", type=int, default=100, help="default: 100")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: 0.001)")
    p.add_argument("--local-lr", type=float, default=3e-2, help="mean-field: SparseAdam's learning rate for the local parameters (default: 0.03)")
    p.add_argument("--refine-steps", type=int, default=5, help="semi-amortized training: K (default: 5)")
    p.add_argument("--refine-lr", type=float, default=0.05, help="semi-amortized: the natural-gradient steps' size, in training and in the study (default: 0.05)")
    p.add_argument("--datapoints", type=int, default=200, help="held-out images measured (default: 200)")
    p.add_argument("--study-refine-steps", type=int, nargs="+", default=[1, 5, 20, 100], help="the K of L[q_K] (default: 1 5 20 100)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few particles and steps in the study (default: off)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--out", type=Path, default=Path("runs/amortized_vs_mean_field"), help="folder for the runs and figures (default: runs/amortized_vs_mean_field)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars (default: off)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.datapoints < 1:
        p.error("--epochs and --datapoints must be at least 1")
    return args


def main(argv=None) -> dict:
    """Return ``{"histories": {guide: per-epoch records}, "comparison": pvae.compare.Comparison}``."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    fit_config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, local_lr=args.local_lr,
                                seed=args.seed, progress=not args.quiet)
    runs, histories, fitted = {}, {}, {}
    for guide_name in GUIDES:
        cfg = RunConfig(dataset=args.dataset, data_dir=args.data_dir, binarize=args.binarize, guide=guide_name,
                        latent_dim=args.latent_dim, hidden=tuple(args.hidden), activation=args.activation,
                        refine_steps=args.refine_steps, refine_lr=args.refine_lr, fit=fit_config)
        data = load_data(cfg)
        pvae.set_seed(args.seed)  # the same initial decoder for the three
        model, guide = build(cfg, data)
        runs[guide_name] = args.out / guide_name
        result = pvae.fit(model, guide, data, fit_config, out_dir=runs[guide_name], device=device,
                          run_config=cfg.to_dict())
        histories[guide_name] = result.history
        fitted[guide_name] = (model, guide, data.to(device))
    curves = figures.training_curves(histories, args.out / "curves.png")

    model, guide, data = fitted["amortized"]
    x = data.batch("test", slice(0, args.datapoints))
    quick = dict(particles=8, max_steps=50, elbo_particles=32, iwae_samples=64) if args.quick else {}
    config = CompareConfig(refine_steps=tuple(args.study_refine_steps), refine_lr=args.refine_lr, seed=args.seed,
                           **quick)
    comparison = compare_inference(model, x, guide, config, progress=not args.quiet,
                                   settings={"run": str(runs["amortized"]), "split": "test", "data": data.name})
    paths = write_comparison(args.out, comparison, "compare")

    print(f"{data.name}: {data.train.shape[0]} training images, latent size {args.latent_dim}, hidden "
          f"{args.hidden}, {args.epochs} epochs; the ELBO on training rows after training:")
    print_training(histories, 15)
    print(f"\nInference gaps on {len(x)} test images, the amortized run's decoder held fixed:")
    print(comparison_table(comparison))
    print(f"\nwrote {curves}, {', '.join(str(p) for p in paths)} and the run folders {', '.join(str(r) for r in runs.values())}")
    return {"histories": histories, "comparison": comparison}


if __name__ == "__main__":
    main()
