"""The ``pvae`` command: ``pvae train``, ``pvae evaluate RUN``, ``pvae sample RUN``, ``pvae compare RUN``.

Each subcommand is a ``(add_arguments, run)`` pair in :data:`COMMANDS`; ``run(args)`` returns an
exit code. Flags left out take the defaults of :class:`~pvae.registry.RunConfig` and
:class:`~pvae.train.FitConfig`.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from . import plots
from .data import BINARIZE, DATASETS
from .inference import ELBOS
from .programs import ProgramError
from .protocols import has_q_for
from .registry import GUIDES, MODELS, RunConfig, build, load_data
from .run import CONFIG_JSON, load_run, read_config, write_comparison, write_evaluation
from .train import FitConfig, fit
from .utils import resolve_device, set_seed

# flag -> (config, field); the flag's default is None so that a resumed run keeps its saved value
RUN_FLAGS = {
    "dataset": "dataset", "data_dir": "data_dir", "binarize": "binarize", "val_size": "val_size", "labels_as": "labels_as",
    "model": "model", "guide": "guide", "likelihood": "likelihood", "latent_dim": "latent_dim",
    "hidden": "hidden", "activation": "activation", "device": "device",
    "refine_steps": "refine_steps", "refine_lr": "refine_lr",
}
FIT_FLAGS = {
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "elbo": "elbo",
    "particles": "num_particles", "beta": "beta", "kl_warmup": "kl_warmup_epochs", "seed": "seed",
    "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "local_lr": "local_lr",
}


def _defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    run, fitd = _defaults(RunConfig), _defaults(FitConfig)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help=f"{', '.join(DATASETS)}, or a folder of MNIST-format IDX files (default: {run['dataset']}, embedded, no network)")
    data.add_argument("--data-dir", help="folder holding the data set's files, or where to download them")
    data.add_argument("--binarize", choices=BINARIZE, help=f"default: {run['binarize']} (fresh Bernoulli draws each epoch)")
    data.add_argument("--val-size", type=int, help="training images held out for validation (default: 5000 for 28x28 sets, else 10%%)")
    data.add_argument("--labels-as", metavar="NAME", help="also pass the labels to the programs as the side input NAME (a conditional model's y; default: none)")
    arch = p.add_argument_group("model and guide")
    arch.add_argument("--model", metavar="NAME", help=f"{', '.join(MODELS)}, or your own factory 'module:function' / 'file.py:function' returning a Pyro model or (model, guide) for the data (default: {run['model']}; conv takes 28x28 images)")
    arch.add_argument("--guide", choices=list(GUIDES), help=f"variational family, built from the model's latent sites (default: {run['guide']}; a factory's own guide when it returns one)")
    arch.add_argument("--likelihood", choices=["bernoulli", "continuous-bernoulli", "gaussian"], help=f"p(x|z) per pixel (default: {run['likelihood']})")
    arch.add_argument("--latent-dim", type=int, help=f"size of z (default: {run['latent_dim']}; 2 adds latent-space and manifold pictures)")
    arch.add_argument("--hidden", type=int, nargs="*", help=f"hidden widths of the MLPs (default: {' '.join(map(str, run['hidden']))})")
    arch.add_argument("--activation", choices=["relu", "elu", "tanh", "softplus"], help=f"default: {run['activation']}")
    arch.add_argument("--refine-steps", type=int, help=f"semi-amortized guide: K, gradient steps refining the encoder's q per batch (default: {run['refine_steps']})")
    arch.add_argument("--refine-lr", type=float, help=f"semi-amortized guide: the size of those steps (default: {run['refine_lr']})")
    opt = p.add_argument_group("fitting")
    opt.add_argument("--epochs", type=int, help=f"default: {fitd['epochs']}; with --resume, the new total")
    opt.add_argument("--batch-size", type=int, help=f"default: {fitd['batch_size']}")
    opt.add_argument("--lr", type=float, help=f"Adam's learning rate (default: {fitd['lr']})")
    opt.add_argument("--local-lr", type=float, help=f"mean-field guide: SparseAdam's learning rate for the per-datapoint parameters, each row of which takes one step per epoch (default: {fitd['local_lr']})")
    opt.add_argument("--elbo", choices=list(ELBOS), help=f"{'; '.join(f'{k}: {v}' for k, v in ELBOS.items())} (default: {fitd['elbo']}; enumerated models get enum)")
    opt.add_argument("--particles", type=int, help=f"samples of z per datapoint and step (default: {fitd['num_particles']})")
    opt.add_argument("--beta", type=float, help=f"KL weight after warm-up; > 1 is a beta-VAE (default: {fitd['beta']})")
    opt.add_argument("--kl-warmup", type=float, help="epochs over which the KL weight rises linearly from 0 (default: 0)")
    opt.add_argument("--seed", type=int, help=f"default: {fitd['seed']}")
    opt.add_argument("--eval-every", type=int, help="epochs between train/test ELBO evaluations; 0: never (default: 1)")
    opt.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (default: 1)")
    out = p.add_argument_group("output")
    out.add_argument("--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... (default: auto)")
    out.add_argument("--out", help="run folder (default: runs/<dataset>-<time>)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    out.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    out.add_argument("--no-figures", action="store_true", help="write no PNGs")


def config_from_args(args) -> RunConfig:
    """A fresh run's config: the dataclass defaults, overridden by every flag given."""
    cfg = RunConfig(**{f: getattr(args, a) for a, f in RUN_FLAGS.items() if getattr(args, a) is not None})
    if cfg.model not in MODELS and args.guide is None:
        cfg.guide = None  # a factory's own guide when it returns one, else the amortized family
    fit_kwargs = {f: getattr(args, a) for a, f in FIT_FLAGS.items() if getattr(args, a) is not None}
    cfg.fit = FitConfig(**fit_kwargs, progress=not args.no_progress)
    return cfg


def run_train(args) -> int:
    if args.resume:
        if not args.out:
            raise SystemExit("pvae train: --resume needs --out RUN, the run to continue")
        given = [a for a in RUN_FLAGS if a != "device" and getattr(args, a) is not None]
        given += [a for a in FIT_FLAGS if a != "epochs" and getattr(args, a) is not None]
        if given:
            raise SystemExit(f"pvae train: --resume keeps the run's own settings; drop --{', --'.join(a.replace('_', '-') for a in given)}")
        saved = read_config(args.out)
        if not saved.get("run"):
            raise SystemExit(f"pvae train: {args.out} was fitted from Python: resume it with pvae.fit(..., resume=True)")
        cfg = RunConfig.from_dict({**saved["run"], "fit": saved["fit"]})
        cfg.fit.progress = not args.no_progress
        if args.epochs is not None:
            cfg.fit.epochs = args.epochs
        if args.device is not None:
            cfg.device = args.device
    else:
        cfg = config_from_args(args)
    out = Path(args.out or f"runs/{Path(cfg.dataset).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    set_seed(cfg.fit.seed)  # the initial weights; fit seeds the training itself
    model, guide = build(cfg, data)
    what = f"{cfg.model} VAE ({cfg.likelihood}, z in R^{cfg.latent_dim})" if cfg.model in MODELS else cfg.model
    print(f"pvae train: {what} with the {cfg.guide or type(guide).__name__} guide "
          f"on {data.name} ({data.train.shape[0]} train / {data.test.shape[0]} test), {device}, run folder {out}")
    callbacks = []
    has_encoder = hasattr(guide, "encode") and has_q_for(guide, "test")  # not mean-field
    if cfg.latent_dim == 2 and not args.no_figures and data.train_labels is not None and has_encoder and cfg.model in MODELS:
        callbacks.append(_latent_snapshots(out, data.to(device), cfg.fit.epochs))
    result = fit(model, guide, data, cfg.fit, out_dir=out, resume=args.resume, device=device,
                 run_config=cfg.to_dict(), callbacks=callbacks)
    if not args.no_figures:
        write_figures(out, model, guide, data.to(device), cfg, result.history, device)
    final = result.final
    split = "test" if "test_elbo" in final else "train"  # a mean-field guide has no test ELBO
    summary = ", ".join(f"{k} {final[k]:.3f}" for k in (f"{split}_elbo", f"{split}_recon", f"{split}_kl") if k in final)
    print(f"pvae train: {result.steps} steps in {result.seconds:.1f}s of training; {summary}")
    print(f"pvae train: wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}")
    return 0


def _latent_snapshots(out: Path, data, epochs: int):
    """The 2-D latent space of the test set as training goes on: epochs 1, 2, 4, 8, ... and the last."""

    def snapshot(record, model, guide):
        epoch = record["epoch"]
        if epoch & (epoch - 1) == 0 or epoch == epochs:
            plots.plot_latent(guide, data.test, data.test_labels, out / "latent-epochs" / f"epoch-{epoch:04d}.png",
                              title=f"posterior means after epoch {epoch}")

    return snapshot


def write_figures(out: Path, model, guide, data, cfg: RunConfig, history, device) -> None:
    if not hasattr(model, "decode"):
        return
    generator = torch.Generator().manual_seed(cfg.fit.seed)
    plots.plot_samples(model, out / "samples.png", data.image_shape, device=device, generator=generator)
    if hasattr(guide, "encode") and has_q_for(guide, "test"):
        plots.plot_reconstructions(model, guide, data.test, data.image_shape, out / "reconstructions.png")
        plots.plot_latent(guide, data.test, data.test_labels, out / "latent.png")
    if cfg.latent_dim == 2:
        plots.plot_manifold(model, data.image_shape, out / "manifold.png", device=device)
    # a mean-field guide has no test ELBO (no q for held-out data): its curve is the training rows'
    key = "test_elbo" if any("test_elbo" in r for r in history) else "train_elbo"
    plots.plot_curves({cfg.guide: history}, out / "curves.png", key=key)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by pvae train")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--samples", type=int, default=1000,
                   help="K, samples of z per datapoint for log p(x), the ELBO and PSIS (default: 1000; the literature: 5000)")
    p.add_argument("--max-datapoints", type=int, help="evaluate the first N datapoints only, for a quick look")
    p.add_argument("--chunk-size", type=int, default=100, help="samples traced at once; bounds the memory (default: 100)")
    p.add_argument("--batch-size", type=int, default=100, help="datapoints traced at once (default: 100)")
    p.add_argument("--marginal", action="store_true", help="models with global latent sites: also log p(x) with them integrated out (default: conditional on their guide's mean only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate(args) -> int:
    from .evaluate import evaluate
    from .reports import evaluation_markdown

    if args.samples < 1:
        raise SystemExit(f"pvae evaluate: --samples must be at least 1, got {args.samples}")
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    if not has_q_for(run.guide, args.split):
        raise SystemExit(f"pvae evaluate: the {run.label()} guide has parameters for training rows only: "
                         "use --split train")
    batch = _datapoints("evaluate", run, args.split, args.max_datapoints, args.seed)
    set_seed(args.seed)
    print(f"pvae evaluate: {run.path}, {len(batch)} {args.split} datapoints of {run.data.name}, "
          f"K = {args.samples} samples each, {device}")
    info = {"run": str(run.path), "split": args.split, "seed": args.seed, "guide": run.label()}
    result = evaluate(run.model, run.guide, batch, num_samples=args.samples, chunk_size=args.chunk_size,
                      batch_size=args.batch_size, progress=not args.no_progress, info=info,
                      marginal=args.marginal)
    print(evaluation_markdown(result))
    paths = write_evaluation(run.path, result, f"evaluation-{args.split}")
    print(f"pvae evaluate: wrote {' and '.join(str(p) for p in paths)}")
    return 0


def _datapoints(command: str, run, split: str, max_datapoints, seed: int):
    """The first ``max_datapoints`` of a run's split, as a batch with their side inputs, as its guide
    saw them in training: dynamically binarized training images, which keep their grey levels, become
    one seeded binary draw."""
    x, _ = run.data.split(split)
    if max_datapoints is not None and max_datapoints < 1:
        raise SystemExit(f"pvae {command}: --max-datapoints must be at least 1, got {max_datapoints}")
    if x.shape[0] == 0:
        raise SystemExit(f"pvae {command}: the {split} split of {run.data.name} is empty")
    n = x.shape[0] if max_datapoints is None else min(max_datapoints, x.shape[0])
    batch = run.data.batch(split, slice(0, n))
    if split == "train" and run.data.binarize == "dynamic":
        g = torch.Generator(device=x.device).manual_seed(seed)
        batch = dataclasses.replace(batch, x=torch.bernoulli(batch.x, generator=g))
    return batch


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by pvae train")
    p.add_argument("-n", "--num", type=int, default=64, help="how many samples (default: 64)")
    p.add_argument("--out", help="PNG to write (default: RUN/samples-<seed>.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run_sample(args) -> int:
    if args.num < 1:
        raise SystemExit(f"pvae sample: --num must be at least 1, got {args.num}")
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    out = Path(args.out or run.path / f"samples-{args.seed}.png")
    generator = torch.Generator().manual_seed(args.seed)
    plots.plot_samples(run.model, out, run.data.image_shape, n=args.num, device=device, generator=generator)
    print(f"pvae sample: wrote {args.num} prior samples to {out}")
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from .compare import CompareConfig

    d = _defaults(CompareConfig)
    p.add_argument("run", help="a run folder written by pvae train; its decoder stays fixed")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="the datapoints (default: test; Cremer et al. measured on train)")
    p.add_argument("--max-datapoints", type=int, default=1000, help="the first N datapoints of the split (default: 1000)")
    q = p.add_argument_group("q*, the best Gaussian per datapoint (L-BFGS on the ELBO over fixed draws)")
    q.add_argument("--init", choices=["encoder", "prior"], default=d["init"], help=f"where q* starts (default: {d['init']}; prior without an encoder)")
    q.add_argument("--particles", type=int, default=d["particles"], help=f"fixed draws of z per datapoint in q*'s objective, antithetic and moment-matched (default: {d['particles']})")
    q.add_argument("--max-steps", type=int, default=d["max_steps"], help=f"L-BFGS iterations per datapoint at most (default: {d['max_steps']})")
    q.add_argument("--tol", type=float, default=d["tol"], help=f"converged when a full L-BFGS step gains less than this share of the bound (default: {d['tol']})")
    q.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"datapoints optimized at once (default: {d['batch_size']})")
    k = p.add_argument_group("q_K, the encoder's q refined by K gradient steps")
    k.add_argument("--refine-steps", type=int, nargs="+", default=list(d["refine_steps"]), help=f"the values of K (default: {' '.join(map(str, d['refine_steps']))})")
    k.add_argument("--refine-lr", type=float, help="their step size (default: the run's --refine-lr)")
    e = p.add_argument_group("estimates")
    e.add_argument("--elbo-particles", type=int, default=d["elbo_particles"], help=f"samples per datapoint of each ELBO of q and q_K (default: {d['elbo_particles']})")
    e.add_argument("--iwae-samples", type=int, default=d["iwae_samples"], help=f"samples per datapoint of log p(x), and of L[q*] on the same draws (default: {d['iwae_samples']})")
    e.add_argument("--chunk-size", type=int, default=d["chunk_size"], help=f"samples traced at once; bounds the memory (default: {d['chunk_size']})")
    e.add_argument("--seed", type=int, default=d["seed"])
    out = p.add_argument_group("output")
    out.add_argument("--device", default="auto")
    out.add_argument("--curves", nargs="+", metavar="RUN", default=[],
                     help="other runs (e.g. the same decoder fitted with the other guides) whose training curves are drawn with RUN's in RUN/curves-compared.png")
    out.add_argument("--no-figures", action="store_true", help="no bar chart or curves")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_compare(args) -> int:
    from .compare import CompareConfig, compare_inference, study_encoder
    from .metrics import read_metrics
    from .reports import comparison_table, cremer_reference

    for other in args.curves:  # before the long study, not after it
        if not (Path(other) / CONFIG_JSON).is_file():
            raise SystemExit(f"pvae compare: --curves {other}: no run folder there ({CONFIG_JSON} missing)")
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    refine_lr = args.refine_lr if args.refine_lr is not None else getattr(run.config, "refine_lr", 1e-2)
    config = CompareConfig(
        batch_size=args.batch_size, init=args.init, particles=args.particles, max_steps=args.max_steps, tol=args.tol,
        refine_steps=tuple(args.refine_steps), refine_lr=refine_lr,
        elbo_particles=args.elbo_particles, iwae_samples=args.iwae_samples, chunk_size=args.chunk_size, seed=args.seed,
    )
    batch = _datapoints("compare", run, args.split, args.max_datapoints, args.seed)
    encoder = study_encoder(run.guide)
    print(f"pvae compare: {run.path} ({run.label()}), {len(batch)} {args.split} datapoints of "
          f"{run.data.name}, {device}" + ("" if encoder else "; no encoder: q* from the prior, no L[q] or L[q_K]"))
    result = compare_inference(run.model, batch, run.guide, config, progress=not args.no_progress,
                               settings={"run": str(run.path), "guide": run.label(), "split": args.split,
                                         "data": run.data.name})
    saved = read_config(run.path)
    reference = cremer_reference({**(saved.get("run") or {}), "split": args.split})
    print(comparison_table(result, reference))
    print("pvae compare: seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    paths = write_comparison(run.path, result, f"compare-{args.split}", figure=not args.no_figures, reference=reference)
    if args.curves and not args.no_figures:
        runs = {_run_label(r): read_metrics(r) for r in [args.run, *args.curves]}
        paths.append(plots.plot_curves(runs, run.path / "curves-compared.png", key="train_elbo"))
    print(f"pvae compare: wrote {', '.join(str(p) for p in paths)}")
    return 0


def _run_label(run_dir) -> str:
    """A run's guide and folder name, to label its training curve."""
    guide = (read_config(run_dir).get("run") or {}).get("guide") or "run"
    return f"{guide} ({Path(run_dir).name})"


COMMANDS = {
    "train": (add_train_arguments, run_train, "fit a VAE by SVI and write metrics, a checkpoint and figures"),
    "evaluate": (add_evaluate_arguments, run_evaluate, "importance-weighted log-likelihood, ELBO with its parts, PSIS and active units of a trained run"),
    "sample": (add_sample_arguments, run_sample, "a PNG grid of samples from a trained run's prior"),
    "compare": (add_compare_arguments, run_compare,
                "amortization and approximation gaps of a trained run (Cremer et al. 2018): L[q], L[q*], L[q_K], log p(x)"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError, ProgramError) as e:
        print(f"pvae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
