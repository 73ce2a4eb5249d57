"""What the examples that end in the gap study share: the study's flags and its two presets, the
lines that sum up each training run, and the files that the study writes.

Not an example of its own (the tests pass over files whose names start with ``_``): each example
imports it from its own folder, which Python puts first on ``sys.path`` when it runs the example.
"""

import argparse
from pathlib import Path

from pvae import plots
from pvae.compare import CompareConfig
from pvae.run import write_comparison

# the study of a smoke run: few particles and steps
QUICK = dict(batch_size=20, particles=10, max_steps=30, elbo_particles=50, iwae_samples=100, chunk_size=50)
# the study's estimates at the examples' size: fewer samples than pvae compare's defaults
STUDY = dict(elbo_particles=500, iwae_samples=2000)


def add_study_arguments(p: argparse.ArgumentParser, datapoints: int, what: str, out_help: str,
                        refine_steps: bool = True, refine_lr: bool = True, study: dict = STUDY) -> None:
    """The gap study's flags, then the output's: ``--datapoints`` (``what`` they are), the study's K
    (``refine_steps``) and step size (``refine_lr``, unless the example's training defines it),
    ``--quick``, ``--seed``, ``--device``, ``--out`` (``out_help``: what it holds), ``--quiet``."""
    p.add_argument("--datapoints", type=int, default=datapoints, help=f"held-out {what} in the gap study (default: {datapoints})")
    if refine_steps:
        p.add_argument("--study-refine-steps", type=int, nargs="+", default=[1, 5, 20],
                       help="the K of the study's L[q_K] (default: 1 5 20)")
    if refine_lr:
        p.add_argument("--refine-lr", type=float, default=0.05,
                       help="the study's refinement natural-gradient step size (default: 0.05)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few particles and steps in the gap study (default: off, the study then uses "
                        f"{', '.join(f'{k} {v}' for k, v in study.items())})")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batches (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--out", type=Path, default=None, help=f"folder for {out_help} (default: None, write nothing)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars (default: off)")


def study_config(args: argparse.Namespace, quick: dict = QUICK, study: dict = STUDY) -> CompareConfig:
    """The study's :class:`~pvae.compare.CompareConfig` from the flags of :func:`add_study_arguments`."""
    refine = {}
    if hasattr(args, "study_refine_steps"):
        refine = dict(refine_steps=tuple(args.study_refine_steps), refine_lr=args.refine_lr)
    return CompareConfig(seed=args.seed, **refine, **(quick if args.quick else study))


def print_training(histories: dict, width: int) -> None:
    """One line per run of ``histories`` (``{name: per-epoch records}``): its last training-row ELBO, its
    test ELBO where it was evaluated, and its seconds of training."""
    for name, history in histories.items():
        record = history[-1]
        test = f", test ELBO {record['test_elbo']:9.3f}" if "test_elbo" in record else ""
        print(f"  {name:<{width}} train ELBO {record['train_elbo']:9.3f} nats{test}  "
              f"({record['elapsed']:.1f} s of training)")


def write_study(out: Path, histories: dict, comparison) -> list:
    """``curves.png`` (the runs' training-row ELBO) and ``compare.json/.md/.png`` in ``out``: their paths."""
    return [plots.plot_curves(histories, out / "curves.png", keys=("train_elbo",)),
            *write_comparison(out, comparison, "compare")]
