"""The ``pvae`` command: ``pvae train``, ``pvae evaluate RUN``, ``pvae sample RUN``, ``pvae compare RUN``,
``pvae plot RUN``, ``pvae report RUN``.

Each subcommand is a ``(add_arguments, run)`` pair in :data:`COMMANDS`; ``run(args)`` returns an
exit code. Flags left out take the defaults of :class:`~pvae.registry.RunConfig` and
:class:`~pvae.train.FitConfig`.

Every mistake gets one line, ``pvae <command>: error: ...``, naming the flag as typed, the file or the
site: exit code 2 for a mistake in what was given (flags, files, data, programs), 1 for a failure on
the way (a diverged fit, a full disk), 130 / 143 for SIGINT / SIGTERM (a fit saves its checkpoint at
the step it reached first). ``--debug`` shows the traceback instead.
``torchrun --nproc_per_node=R -m pvae train ...`` trains data-parallel on R processes (see
:mod:`pvae.distributed`); rank 0 prints and writes the run folder, and an error names its rank.
"""

import argparse
import dataclasses
import errno
import math
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from . import distributed, figures, metrics
from .data import BINARIZE, DATASETS
from .errors import ConfigError, Interrupted, add_note, message
from .inference import ELBOS, TC_ESTIMATORS
from .protocols import has_q_for
from .registry import ACTIVATIONS, DEFAULT_GUIDES, GUIDES, LIKELIHOODS, MODELS, RunConfig, build, load_data
from .run import CONFIG_JSON, load_run, read_config, run_config_from, write_comparison, write_evaluation
from .train import FitConfig, fit
from .utils import resolve_device, set_seed

# flag -> (config, field); the flag's default is None so that a resumed run keeps its saved value
RUN_FLAGS = {
    "dataset": "dataset", "data_dir": "data_dir", "binarize": "binarize", "val_size": "val_size", "labels_as": "labels_as",
    "model": "model", "guide": "guide", "likelihood": "likelihood", "latent_dim": "latent_dim",
    "hidden": "hidden", "activation": "activation", "device": "device",
    "refine_steps": "refine_steps", "refine_lr": "refine_lr", "masking": "masking", "input_noise": "input_noise",
    "latent_dims": "latent_dims", "layer_hidden": "layer_hidden", "flow_steps": "flow_steps",
}
FIT_FLAGS = {
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "elbo": "elbo",
    "particles": "num_particles", "beta": "beta", "kl_warmup": "kl_warmup_epochs", "seed": "seed",
    "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "local_lr": "local_lr", "tc_beta": "tc_beta", "tc_estimator": "tc_estimator",
}


# the flag a setting is given by, to name it as the user typed it
FLAG_OF = {field: "--" + flag.replace("_", "-") for flag, field in {**RUN_FLAGS, **FIT_FLAGS}.items()}


# ----------------------------------------------------------------------------- flag values


def _number(kind, low=None, strict=False, high=None):
    """An argparse ``type``: a finite ``kind`` (int or float) at least ``low`` (above it, if ``strict``),
    at most ``high``."""
    words = "an integer" if kind is int else "a number"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if low is not None and (value <= low if strict else value < low):
            bound = f"above {low:g}" if strict else (f"at least {low}" if low else ">= 0")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse's fallback message names the type
    return convert


POSITIVE_INT, COUNT, SEED = _number(int, 1), _number(int, 0), _number(int, 0, high=2**32 - 1)  # NumPy's seeds
POSITIVE, NON_NEGATIVE = _number(float, 0, strict=True), _number(float, 0)


def _device(text: str) -> str:
    try:
        resolve_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.problem) from None
    return text


def _defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    run, fitd = _defaults(RunConfig), _defaults(FitConfig)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help=f"{', '.join(DATASETS)}, or a folder of MNIST-format IDX files (default: {run['dataset']}, embedded, no network)")
    data.add_argument("--data-dir", help="the folder holding the data set's files, or where to download them; not for digits or a folder given as --dataset (default: the files' cache, ~/.cache/pvae)")
    data.add_argument("--binarize", choices=BINARIZE, help="dynamic: fresh Bernoulli draws each epoch; threshold: pixel >= 0.5 (default: none for digits, which keep their grey levels, dynamic for the others)")
    data.add_argument("--val-size", type=COUNT, help="training images held out for validation (default: 5000 for 28x28 sets, else 10%%)")
    data.add_argument("--labels-as", metavar="NAME", help="also pass the labels to the programs as the side input NAME (a conditional model's y; default: none)")
    arch = p.add_argument_group("model and guide")
    arch.add_argument("--model", metavar="NAME", help=f"{', '.join(MODELS)}, or your own factory 'module:function' / 'file.py:function' returning a Pyro model or (model, guide) for the data (default: {run['model']}; mlp and conv are VAEs, conv takes 28x28 images; two-layer: z2 -> z1 -> x, Burda et al.; ae is an autoencoder, a flat prior with the point guide, linear with --hidden and no widths)")
    arch.add_argument("--guide", choices=list(GUIDES), help=f"variational family, built from the model's latent sites (default: {run['guide']}; for ae: point; a factory's own guide when it returns one); full-covariance and planar: an encoder's joint Gaussian, or Gaussian and planar flows, over all local sites; point: a point mass z = f(x), an autoencoder's")
    arch.add_argument("--likelihood", choices=list(LIKELIHOODS), help="p(x|z) per pixel; gaussian learns its variance, gaussian-fixed has sigma = 1, the squared error (default: bernoulli for binarized data, continuous-bernoulli for grey levels)")
    arch.add_argument("--latent-dim", type=POSITIVE_INT, help=f"size of z (default: {run['latent_dim']}; 2 adds latent-space and manifold pictures)")
    arch.add_argument("--hidden", type=POSITIVE_INT, nargs="*", metavar="WIDTH", help=f"hidden widths of the MLPs; none: linear (default: {' '.join(map(str, run['hidden']))})")
    arch.add_argument("--activation", choices=list(ACTIVATIONS), help=f"default: {run['activation']} (Burda et al.'s models: tanh)")
    arch.add_argument("--latent-dims", type=POSITIVE_INT, nargs=2, metavar=("D1", "D2"), help=f"two-layer model: the sizes of z1 and z2 (default: {' '.join(map(str, run['latent_dims']))})")
    arch.add_argument("--layer-hidden", type=POSITIVE_INT, nargs=2, metavar=("H1", "H2"), help=f"two-layer model: widths of z1 -> H1 -> H1 -> x and z2 -> H2 -> H2 -> z1, and of the encoder's x -> H1 -> H1 -> H2 -> H2 (default: {' '.join(map(str, run['layer_hidden']))})")
    arch.add_argument("--flow-steps", type=POSITIVE_INT, help=f"planar guide: planar maps after the Gaussian (default: {run['flow_steps']})")
    arch.add_argument("--refine-steps", type=COUNT, help=f"semi-amortized guide: K, gradient steps refining the encoder's q per batch (default: {run['refine_steps']})")
    arch.add_argument("--refine-lr", type=POSITIVE, help=f"semi-amortized guide: the size of those steps (default: {run['refine_lr']})")
    noise = p.add_argument_group("denoising: the encoder reads a corrupted x in training, the model observes the clean x")
    noise.add_argument("--masking", type=NON_NEGATIVE, metavar="P", help="probability that each input value of the encoder is set to 0 (default: 0)")
    noise.add_argument("--input-noise", type=NON_NEGATIVE, metavar="SIGMA", help="sigma of the Gaussian noise added to each input value of the encoder (default: 0)")
    opt = p.add_argument_group("fitting")
    opt.add_argument("--epochs", type=POSITIVE_INT, help=f"default: {fitd['epochs']}; with --resume, the new total")
    opt.add_argument("--batch-size", type=POSITIVE_INT, help=f"per rank under torchrun, whose batches have ranks x this many rows (default: {fitd['batch_size']})")
    opt.add_argument("--lr", type=POSITIVE, help=f"Adam's learning rate (default: {fitd['lr']})")
    opt.add_argument("--local-lr", type=POSITIVE, help=f"mean-field guide: SparseAdam's learning rate for the per-datapoint parameters, each row of which takes one step per epoch (default: {fitd['local_lr']})")
    opt.add_argument("--elbo", choices=list(ELBOS), help=f"{'; '.join(f'{k}: {v}' for k, v in ELBOS.items())} (default: {fitd['elbo']}; enumerated models get enum)")
    opt.add_argument("--particles", type=POSITIVE_INT, help=f"samples of z per datapoint and step; iwae and dreg: the bound's K (default: {fitd['num_particles']})")
    opt.add_argument("--tc-beta", type=NON_NEGATIVE, help=f"--elbo tc: the weight of the total correlation, beta of the beta-TCVAE (default: {fitd['tc_beta']}, the ELBO)")
    opt.add_argument("--tc-estimator", choices=list(TC_ESTIMATORS), help=f"--elbo tc: how q(z) is estimated from the minibatch, minibatch weighted or stratified sampling (default: {fitd['tc_estimator']})")
    opt.add_argument("--beta", type=NON_NEGATIVE, help=f"KL weight after warm-up; > 1 is a beta-VAE (default: {fitd['beta']})")
    opt.add_argument("--kl-warmup", type=NON_NEGATIVE, metavar="EPOCHS", help="epochs over which the KL weight rises linearly from 0 (default: 0)")
    opt.add_argument("--seed", type=SEED, help=f"seeds the initial weights and the training (default: {fitd['seed']})")
    opt.add_argument("--eval-every", type=COUNT, help="epochs between train/test ELBO evaluations; 0: never (default: 1)")
    opt.add_argument("--checkpoint-every", type=COUNT, help="epochs between checkpoints; the last epoch always has one (default: 1)")
    out = p.add_argument_group("output")
    out.add_argument("--device", type=_device, help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...; under torchrun auto and cuda take the GPU of each rank's LOCAL_RANK (default: auto)")
    out.add_argument("--out", help="run folder (default: runs/<dataset>-<time>)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (default: off)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines (default: off, they are shown)")
    out.add_argument("--no-figures", action="store_true", help="write no PNGs (default: off, figures are written)")
    out.add_argument("--report", action="store_true", help="also write RUN/report.html, the run on one page, as pvae report does (default: off)")


def config_from_args(args) -> RunConfig:
    """A fresh run's config: the dataclass defaults, overridden by every flag given."""
    cfg = RunConfig(**{f: getattr(args, a) for a, f in RUN_FLAGS.items() if getattr(args, a) is not None})
    if cfg.model not in MODELS and args.guide is None:
        cfg.guide = None  # a factory's own guide when it returns one, else the amortized family
    elif args.guide is None:
        cfg.guide = DEFAULT_GUIDES.get(cfg.model, cfg.guide)
    fit_kwargs = {f: getattr(args, a) for a, f in FIT_FLAGS.items() if getattr(args, a) is not None}
    cfg.fit = FitConfig(**fit_kwargs, progress=not args.no_progress)
    return cfg


def resumed_config(args) -> RunConfig:
    """The config of the run in ``--out``, read back from its ``config.json``; only --epochs (the new
    total), --device and the output flags may be given with --resume."""
    if not args.out:
        raise ConfigError("--resume", "needs --out RUN, the run to continue")
    given = [a for a in RUN_FLAGS if a != "device" and getattr(args, a) is not None]
    given += [a for a in FIT_FLAGS if a != "epochs" and getattr(args, a) is not None]
    if given:
        raise ConfigError("--resume", f"keeps the run's own settings: drop --{', --'.join(a.replace('_', '-') for a in given)}")
    saved = read_config(args.out)
    if not saved.get("run"):
        raise ConfigError("--resume", f"cannot continue {args.out}, which was fitted from Python: resume it with "
                          "pvae.fit(..., resume=True)")
    cfg = run_config_from(saved, str(Path(args.out) / CONFIG_JSON))
    if not (Path(args.out) / "checkpoint.pt").is_file():
        print(f"pvae train: {args.out} stopped before its first checkpoint: it starts again from its first step")
    cfg.fit.progress = not args.no_progress
    if args.epochs is not None:
        cfg.fit.epochs = args.epochs
    if args.device is not None:
        cfg.device = args.device
    return cfg


def run_train(args) -> int:
    cfg = resumed_config(args) if args.resume else config_from_args(args)
    world, device = distributed.join(cfg.device)
    # rank 0's clock names the folder
    out = Path(world.from_main(args.out or f"runs/{Path(cfg.dataset).name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    try:
        data = world.main_first(lambda: load_data(cfg))  # one rank downloads, the others read its files
    except ConfigError as e:  # a resumed run's data settings are its config file's
        raise e.within(str(out / CONFIG_JSON), "run") if args.resume and e.where is None else e
    set_seed(cfg.fit.seed)  # the initial weights; fit seeds the training itself
    model, guide = build(cfg, data)
    dims = getattr(model, "latent_dims", (cfg.latent_dim,))
    what = (f"{cfg.model} {type(model).__name__} ({cfg.likelihood}, z in {' x '.join(f'R^{d}' for d in dims)})"
            if cfg.model in MODELS else cfg.model)
    ranks = f" x {world.size} ranks (batches of {world.size} x {cfg.fit.batch_size})" if world.distributed else ""
    say = print if world.is_main else (lambda *a, **k: None)
    say(f"pvae train: {what} with the {cfg.guide or type(guide).__name__} guide "
        f"on {data.name} ({data.train.shape[0]} train / {data.test.shape[0]} test), {device}{ranks}, run folder {out}")
    callbacks = [] if args.no_figures else [figures.LatentSnapshots(out)]
    before = _file_times(out)  # what a resumed run's folder held: what this command did not write is stale
    done = len(metrics.read_metrics(out)) if args.resume and (out / "metrics.jsonl").is_file() else 0
    try:
        result = fit(model, guide, data, cfg.fit, out_dir=out, resume=args.resume, device=device,
                     run_config=cfg.to_dict(), callbacks=callbacks)
    except (Interrupted, OSError) as e:  # a fit that can go on from its checkpoint
        if getattr(e, "complete", False):
            add_note(e, "the fit itself is complete; the figures were not written")
        elif (out / "checkpoint.pt").is_file() and (isinstance(e, Interrupted) or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            add_note(e, f"continue with: pvae train --resume --out {out}")
        raise
    if not world.is_main:
        return 0
    try:
        if not args.no_figures:
            ctx = figures.FigureContext(model, guide, data.to(device), out, result.history, cfg.to_dict(), cfg.fit.seed)
            figures.draw_figures(ctx, [name for name, f in figures.FIGURES.items() if f.on_train])
        if args.report:
            from .reports import write_report

            write_report(out)
    except BaseException as e:
        add_note(e, f"the fit itself is complete: {out}/checkpoint.pt holds its {result.final.get('epoch')} epochs")
        raise
    final = result.final
    split = "test" if "test_elbo" in final else "train"  # a mean-field guide has no test ELBO
    summary = ", ".join(f"{k} {final[k]:.3f}" for k in (f"{split}_elbo", f"{split}_recon", f"{split}_kl") if k in final)
    print(f"pvae train: {result.steps} steps in {result.seconds:.1f}s of training; {summary}")
    warning = collapse_warning(result.model, result.guide, data.to(device), cfg)
    if warning:
        print(f"pvae train: warning: {warning}")
    now = _file_times(out)
    print(f"pvae train: wrote {', '.join(sorted(n for n, t in now.items() if before.get(n) != t))} in {out}")
    stale = sorted(n for n, t in now.items() if before.get(n) == t)
    if stale:
        print(f"pvae train: {', '.join(stale)} predate epochs {done + 1}-"
              f"{result.final.get('epoch')}: they describe the run before this resume; run pvae evaluate, "
              f"compare or plot on {out} again")
    return 0


def _file_times(folder: Path) -> dict:
    """``{name: modification time in ns}`` of the files in ``folder``."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def collapse_warning(model, guide, data, cfg: RunConfig) -> Optional[str]:
    """What to say when the fitted posterior has collapsed (:func:`pvae.evaluate.collapse_check` on the
    split the figures show), with the flags to try; None when it has not."""
    from .evaluate import collapse_check

    data, split = figures.shown(guide, data)
    collapsed = collapse_check(model, guide, data.batch(split), seed=cfg.fit.seed)
    if collapsed is None:
        return None
    tries = ([f"a lower --beta (now {cfg.fit.beta:g})"] if cfg.fit.beta > 1 else []) + \
        (["--kl-warmup EPOCHS (the KL weight raised from 0)"] if not cfg.fit.kl_warmup_epochs else []) + \
        ([f"a smaller --latent-dim (now {cfg.latent_dim})"] if cfg.latent_dim > 2 and cfg.model in MODELS else [])
    return (f"{collapsed.collapse_note()} on the {split} split: the codes say little of x"
            + (f"; try {', '.join(tries)}" if tries else ""))


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by pvae train")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="the datapoints (default: test)")
    p.add_argument("--samples", type=POSITIVE_INT, default=1000,
                   help="K, samples of z per datapoint for log p(x), the ELBO and PSIS (default: 1000; the literature: 5000)")
    p.add_argument("--max-datapoints", type=POSITIVE_INT, help="evaluate the first N datapoints only, for a quick look (default: all)")
    p.add_argument("--chunk-size", type=POSITIVE_INT, default=100, help="samples traced at once; bounds the memory (default: 100)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=100, help="datapoints traced at once (default: 100)")
    p.add_argument("--marginal", action="store_true", help="models with global latent sites: also log p(x) with them integrated out (default: off, conditional on their guide's mean only)")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the samples of z (default: 0)")
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, it is shown)")


def run_evaluate(args) -> int:
    from .evaluate import evaluate
    from .reports import evaluation_markdown

    device = resolve_device(args.device)
    run = load_run(args.run, device)
    if not has_q_for(run.guide, args.split):
        raise ConfigError("--split", f"{args.split}: the {run.label()} guide has parameters for training rows only: "
                          "use --split train")
    check_writable(run.path)  # before the work, not after it
    batch = _datapoints("evaluate", run, args.split, args.max_datapoints, args.seed)
    set_seed(args.seed, clear_param_store=False)  # the run's pyro.params are loaded
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
    if x.shape[0] == 0:
        raise ConfigError("--split", f"{split}: the {split} split of {run.data.name} is empty: choose another")
    n = x.shape[0] if max_datapoints is None else min(max_datapoints, x.shape[0])
    batch = run.data.batch(split, slice(0, n))
    if split == "train" and run.data.binarize == "dynamic":
        g = torch.Generator(device=x.device).manual_seed(seed)
        batch = dataclasses.replace(batch, x=torch.bernoulli(batch.x, generator=g))
    return batch


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by pvae train")
    p.add_argument("-n", "--num", type=POSITIVE_INT, default=64, help="how many samples (default: 64)")
    p.add_argument("--out", help="PNG to write (default: RUN/samples-<seed>.png)")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the draws from the prior (default: 0)")
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... (default: auto)")


def run_sample(args) -> int:
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    if run.info.improper:
        raise ValueError(f"the prior of site(s) {', '.join(run.info.improper)} in {run.path} is flat (an "
                         "autoencoder's): it has no samples; sample the code space with "
                         "pvae.autoencoding.sample_code_space")
    out = Path(args.out or run.path / f"samples-{args.seed}.png")
    if not hasattr(run.model, "decode"):
        raise ValueError(f"the model of {run.path} has no decoder (decode) to draw pictures with")
    figures.prior_samples(run.model, run.guide, run.data, out, n=args.num, seed=args.seed)
    print(f"pvae sample: wrote {args.num} prior samples to {out}")
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from .compare import CompareConfig

    d = _defaults(CompareConfig)
    p.add_argument("run", help="a run folder written by pvae train; its decoder stays fixed")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="the datapoints (default: test; Cremer et al. measured on train)")
    p.add_argument("--max-datapoints", type=POSITIVE_INT, default=1000, help="the first N datapoints of the split (default: 1000)")
    q = p.add_argument_group("q*, the best q of the guide's family per datapoint (L-BFGS on the ELBO over fixed draws)")
    q.add_argument("--init", choices=["encoder", "prior"], default=d["init"], help=f"where q* starts (default: {d['init']}; prior without an encoder)")
    q.add_argument("--particles", type=POSITIVE_INT, default=d["particles"], help=f"fixed draws of z per datapoint in q*'s objective, antithetic and moment-matched (default: {d['particles']})")
    q.add_argument("--max-steps", type=POSITIVE_INT, default=d["max_steps"], help=f"L-BFGS iterations per datapoint at most (default: {d['max_steps']})")
    q.add_argument("--tol", type=POSITIVE, default=d["tol"], help=f"converged when a full L-BFGS step gains less than this share of the bound (default: {d['tol']})")
    q.add_argument("--batch-size", type=POSITIVE_INT, default=d["batch_size"], help=f"datapoints optimized at once (default: {d['batch_size']})")
    k = p.add_argument_group("q_K, the encoder's q refined by K gradient steps")
    k.add_argument("--refine-steps", type=POSITIVE_INT, nargs="+", default=list(d["refine_steps"]), help=f"the values of K (default: {' '.join(map(str, d['refine_steps']))})")
    k.add_argument("--refine-lr", type=POSITIVE, help="their step size (default: the run's --refine-lr, else 0.05)")
    e = p.add_argument_group("estimates")
    e.add_argument("--elbo-particles", type=POSITIVE_INT, default=d["elbo_particles"], help=f"samples per datapoint of each ELBO of q and q_K (default: {d['elbo_particles']})")
    e.add_argument("--iwae-samples", type=POSITIVE_INT, default=d["iwae_samples"], help=f"samples per datapoint of log p(x), and of L[q*] on the same draws (default: {d['iwae_samples']})")
    e.add_argument("--chunk-size", type=POSITIVE_INT, default=d["chunk_size"], help=f"samples traced at once; bounds the memory (default: {d['chunk_size']})")
    e.add_argument("--seed", type=SEED, default=d["seed"], help=f"seeds every draw of the study (default: {d['seed']})")
    out = p.add_argument_group("output")
    out.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... (default: auto)")
    out.add_argument("--curves", nargs="+", metavar="RUN", default=[],
                     help="other runs (e.g. the same decoder fitted with the other guides) whose training curves are drawn with RUN's in RUN/curves-compared.png (default: none)")
    out.add_argument("--no-figures", action="store_true", help="no bar chart or curves (default: off, they are drawn)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, it is shown)")


def run_compare(args) -> int:
    from .compare import CompareConfig, compare_inference, study_encoder
    from .metrics import read_metrics
    from .reports import comparison_table, cremer_reference

    for other in args.curves:  # before the long study, not after it
        if not (Path(other) / CONFIG_JSON).is_file():
            raise ConfigError("--curves", f"{other}: no run folder there ({CONFIG_JSON} missing)")
        read_metrics(other)
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    check_writable(run.path)
    refine_lr = args.refine_lr if args.refine_lr is not None else getattr(run.config, "refine_lr", CompareConfig.refine_lr)
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
        runs = {run_label(r): read_metrics(r) for r in [args.run, *args.curves]}
        paths.append(figures.training_curves(runs, run.path / "curves-compared.png"))
    print(f"pvae compare: wrote {', '.join(str(p) for p in paths)}")
    return 0


def run_label(run_dir) -> str:
    """A run's folder name, and its guide where the name does not say it: a curve's or a panel's label."""
    guide = (read_config(run_dir).get("run") or {}).get("guide")
    name = Path(run_dir).resolve().name
    return name if not guide or guide in name else f"{name} ({guide})"


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    names = "; ".join(f"{name}: {f.caption} ({f.file})" for name, f in figures.FIGURES.items())
    p.add_argument("run", nargs="?", help="a run folder written by pvae train (or pvae.fit with a factory)")
    p.add_argument("--what", nargs="+", metavar="NAME",
                   help=f"the figures to draw into RUN: {names}. With --runs: {', '.join(MULTI_RUN_FIGURES)} (default: none; --all draws every one that applies)")
    p.add_argument("--all", action="store_true", help="every figure that applies to RUN; says why the others do not (default: off)")
    p.add_argument("--runs", nargs="+", metavar="RUN",
                   help="several run folders for one figure: samples (side by side) or curves (on one axis) (default: none)")
    p.add_argument("--out", help="with --runs: the PNG to write (default: <first run>/<figure>-runs.png)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="the datapoints figures show (default: test, train for a mean-field guide)")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the prior samples and the evaluations (default: 0)")
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, ... (default: auto)")


def _samples_by_run(runs, out: Path, device) -> Path:
    loaded = ((run_label(r), run.model, run.guide, run.data) for r in runs for run in [load_run(r, device)])
    return figures.samples_by_run(loaded, out)


def _curves_by_run(runs, out: Path, device) -> Path:
    from .metrics import read_metrics

    return figures.training_curves({run_label(r): read_metrics(r) for r in runs}, out)


MULTI_RUN_FIGURES = {"samples": _samples_by_run, "curves": _curves_by_run}


def run_plot(args) -> int:
    from .metrics import read_metrics

    device = resolve_device(args.device)
    if args.runs:
        if args.run or args.all:
            raise ValueError("--runs draws figures of several runs: give no RUN and no --all")
        unknown = [w for w in args.what or [] if w not in MULTI_RUN_FIGURES]
        if not args.what or unknown:
            raise ValueError(f"with --runs, --what takes {' or '.join(MULTI_RUN_FIGURES)}"
                             + (f", not {', '.join(unknown)}" if unknown else ""))
        for r in args.runs:
            read_config(r)  # every folder is a run, before any is drawn
        if args.out and len(args.what) > 1:
            raise ValueError("--out names one file: draw one figure at a time")
        for name in args.what:
            out = Path(args.out or Path(args.runs[0]) / f"{name}-runs.png")
            print(f"pvae plot: wrote {MULTI_RUN_FIGURES[name](args.runs, out, device)}")
        return 0
    if not args.run:
        raise ValueError("give a run folder (pvae plot RUN --what NAME), or --runs RUN RUN ...")
    unknown = [w for w in args.what or [] if w not in figures.FIGURES]
    if unknown or not (args.what or args.all):
        raise ValueError(f"--what takes {', '.join(figures.FIGURES)}"
                         + (f", not {', '.join(unknown)}" if unknown else "") + "; or give --all")
    run = load_run(args.run, device)
    ctx = figures.FigureContext(run.model, run.guide, run.data, run.path, read_metrics(run.path),
                                read_config(run.path).get("run"), args.seed, args.split)
    names = list(figures.FIGURES) if args.all else args.what
    written, skipped = figures.draw_figures(ctx, names, strict=not args.all)
    for path in written:
        print(f"pvae plot: wrote {path}")
    for name, reason in skipped.items():
        print(f"pvae plot: no {name}: {reason}")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder")
    p.add_argument("--out", help="the HTML file to write (default: RUN/report.html)")


def run_report(args) -> int:
    from .reports import write_report

    print(f"pvae report: wrote {write_report(args.run, args.out)}")
    return 0


COMMANDS = {
    "train": (add_train_arguments, run_train, "fit a VAE by SVI and write metrics, a checkpoint and figures"),
    "evaluate": (add_evaluate_arguments, run_evaluate, "importance-weighted log-likelihood, ELBO with its parts, PSIS and active units of a trained run"),
    "sample": (add_sample_arguments, run_sample, "a PNG grid of samples from a trained run's prior"),
    "compare": (add_compare_arguments, run_compare,
                "amortization and approximation gaps of a trained run (Cremer et al. 2018): L[q], L[q*], L[q_K], log p(x)"),
    "plot": (add_plot_arguments, run_plot, "figures of a trained run, or of several runs side by side"),
    "report": (add_report_arguments, run_report, "one self-contained HTML page of a run: config, metrics, results, figures"),
}


class Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are one line, ``pvae <command>: error: ...``, and exit code 2."""

    def error(self, text: str):
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pvae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.add_argument("--debug", action="store_true",
                             help="on an error, show Python's traceback instead of one line (default: off)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, or ``SystemExit(2)`` after one line naming the mistake (``SystemExit(0)`` after
    --help)."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, not by "pvae"
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def check_writable(folder) -> None:
    """Fail now, in words, if nothing can be written in ``folder`` (read-only, no permission)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        e.filename = str(folder)
        raise


# a mistake in what was given (exit code 2), rather than a failure on the way (1)
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def describe(error: BaseException) -> str:
    """The one line for ``error``: a setting named by the flag that gives it."""
    if isinstance(error, ConfigError) and error.where is None and error.key in FLAG_OF:
        return "; ".join([f"{FLAG_OF[error.key]} {error.problem}", *getattr(error, "__notes__", [])])
    return message(error)


def _terminate(signum, frame):
    raise Interrupted(signum)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a mistake argparse found (its one line is printed)
        return e.code
    prog = f"pvae {args.command}"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM says why, as SIGINT
    try:
        if args.command != "train" and distributed.launched_ranks() > 1:
            raise ValueError(f"only pvae train runs on several processes: run pvae {args.command} without torchrun")
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        interrupted = e if str(e) else Interrupted(signum)  # Python's own KeyboardInterrupt says nothing
        for note in getattr(e, "__notes__", []) if interrupted is not e else []:
            add_note(interrupted, note)
        print(f"{prog}: {message(interrupted)}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if args.debug:
            raise
        expected = isinstance(e, (*INPUT_ERRORS, OSError, FloatingPointError, RuntimeError))
        text = describe(e) if expected else f"{type(e).__name__}: {describe(e)} (run it again with --debug for the traceback)"
        world = distributed.current_world()
        where = f"{world.describe()}: " if world.distributed else ""
        print(f"{prog}: error: {where}{text}", file=sys.stderr)
        return 2 if isinstance(e, INPUT_ERRORS) else 1
    finally:
        distributed.leave()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
