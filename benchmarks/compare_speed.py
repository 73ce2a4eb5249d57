"""How long does ``pvae compare RUN`` take at its defaults, and is its q* as good as a 10x longer one?

1. The run: a 784-400-20 MLP VAE (Bernoulli pixels, amortized encoder) trained by ``pvae train`` on
   8,000 Fashion-MNIST images thresholded at 0.5 (``--val-size 52000`` keeps the other 52,000 out),
   30 epochs of batches of 128, Adam's lr 1e-3, the Monte Carlo ELBO (the run the figures in the README were
   measured on); trained once into ``--run`` when that folder holds no checkpoint. (The issue measured
   real MNIST, which needs the network; Fashion-MNIST is installed.)
2. ``pvae compare RUN --no-figures --no-progress`` at every other default: the first 1,000 test
   images, q* by L-BFGS on 128 fixed draws per datapoint, L[q] and L[q_K] (K = 1, 5, 20) with 1,000
   samples, log p̂(x) and L[q*] with 5,000; timed end to end in a subprocess (imports and loading
   included), wall-clock and CPU, with the study's own seconds per stage. Target: 5 minutes on 2 cores.
3. The accuracy of q*: on the first ``--check-datapoints`` test images, q* at the defaults against a
   reference optimized 10x longer (10x the draws, 10x the iterations, a 10x tighter tolerance), both
   from the encoder's q; each bound estimated on the same ``--check-samples`` fresh draws (paired, so
   the difference is measured more finely than either bound). Target: the mean difference within
   0.05 nats.

``--threads`` sets torch's threads here and ``OMP_NUM_THREADS`` for the subprocess; pin the cores
with ``taskset`` around the whole command::

    taskset -c 0,1 python benchmarks/compare_speed.py --threads 2
    python benchmarks/compare_speed.py --datapoints 100 --check-datapoints 20   # a quicker look
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import pvae
from pvae.compare import CompareConfig, optimize_local
from pvae.guides import LocalFamily, ParamsGuide, model_sites
from pvae.inference import elbo_terms
from pvae.programs import Batch

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
DEFAULT_RUN = "runs/bench-fmnist-400-20"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"folder of Fashion-MNIST IDX files (default: {DEFAULT_DATA})")
    p.add_argument("--run", default=DEFAULT_RUN, help="the run folder, trained here if it holds no checkpoint (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of that training (default: 30)")
    p.add_argument("--datapoints", type=int, default=1000, help="test images of the timed study (default: 1000, its own default)")
    p.add_argument("--check-datapoints", type=int, default=100, help="test images of the accuracy check (default: 100)")
    p.add_argument("--check-samples", type=int, default=5000, help="fresh draws per image for each bound of the check (default: 5000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, here and in the subprocess (default: torch's choice)")
    p.add_argument("--skip-timing", action="store_true", help="the accuracy check only")
    args = p.parse_args(argv)
    if min(args.epochs, args.datapoints, args.check_datapoints, args.check_samples) < 1:
        p.error("counts must be at least 1")
    return args


def pvae_command() -> list:
    return [sys.executable, "-m", "pvae"]


def train(args, env) -> None:
    command = [*pvae_command(), "train", "--dataset", args.data, "--binarize", "threshold", "--latent-dim", "20",
               "--hidden", "400", "--val-size", "52000", "--epochs", str(args.epochs), "--eval-every", "10",
               "--batch-size", "128", "--lr", "1e-3", "--elbo", "trace",
               "--out", args.run, "--no-progress", "--no-figures"]
    print("training the run:", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=env)


def time_compare(args, env) -> dict:
    command = [*pvae_command(), "compare", args.run, "--max-datapoints", str(args.datapoints), "--no-figures",
               "--no-progress"]
    print("timing:", "pvae", " ".join(command[3:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(done.stdout)
    saved = json.loads((Path(args.run) / "compare-test.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stages": saved.get("seconds", {}), "q_star_steps": saved["q_star_steps"]}


def check_accuracy(args) -> dict:
    """L[q*] at the defaults against a reference optimized 10x longer, on the same fresh draws."""
    run = pvae.load_run(args.run)
    batch = run.data.batch("test", slice(0, args.check_datapoints))
    x = Batch.of(batch.x)
    model, encoder = run.model, run.guide
    family = LocalFamily(model_sites(model, x))
    config = CompareConfig()
    with torch.no_grad():
        start = encoder.local_params(x)
    settings = {
        "defaults": dict(num_particles=config.particles, max_steps=config.max_steps, tol=config.tol),
        "reference (10x)": dict(num_particles=10 * config.particles, max_steps=10 * config.max_steps,
                                tol=config.tol / 10),
    }
    found = {}
    for name, kwargs in settings.items():
        started = time.process_time()
        params, iterations = optimize_local(model, x, family, start, generator=torch.Generator().manual_seed(1),
                                            **kwargs)
        found[name] = params
        print(f"  q* {name:16s} {kwargs}: {iterations.float().mean().item():.1f} iterations on average "
              f"(at most {iterations.max().item()}), {time.process_time() - started:.1f} s CPU")
    bounds = {}
    for name, params in [("encoder q", start), *found.items()]:
        torch.manual_seed(2)  # the same fresh draws for every q: a paired comparison
        bounds[name] = elbo_terms(model, ParamsGuide(family, params), x, args.check_samples, 100)["elbo"]
    diff = bounds["defaults"] - bounds["reference (10x)"]
    out = {
        "datapoints": len(x),
        "elbo": {k: v.mean().item() for k, v in bounds.items()},
        "difference": diff.mean().item(),
        "difference_se": (diff.std() / len(diff) ** 0.5).item(),
        "worst": diff.min().item(),
    }
    for name, value in out["elbo"].items():
        print(f"  L[{name}] = {value:.3f} nats")
    print(f"  L[q* defaults] - L[q* reference] = {out['difference']:+.4f} ± {out['difference_se']:.4f} nats "
          f"(mean ± s.e. over {len(x)} images; the worst image {out['worst']:+.4f}); target |mean| <= 0.05: "
          f"{'met' if abs(out['difference']) <= 0.05 else 'NOT met'}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CompareConfig defaults: "
          f"{json.dumps({k: v for k, v in asdict(CompareConfig()).items()})}")
    if not (Path(args.run) / "checkpoint.pt").is_file():
        train(args, env)
    result = {}
    if not args.skip_timing:
        timing = time_compare(args, env)
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in timing["stages"].items())
        print(f"pvae compare on {args.datapoints} test images: {timing['wall']:.1f} s wall-clock "
              f"({timing['wall'] / 60:.2f} min; target 5 min: {'met' if timing['wall'] <= 300 else 'NOT met'}), "
              f"{timing['cpu']:.1f} s CPU; stages: {stages}; q* took {timing['q_star_steps']:.1f} L-BFGS "
              "iterations per image on average")
        result["timing"] = timing
    print(f"\naccuracy of q* on the first {args.check_datapoints} test images, bounds on {args.check_samples} "
          "shared fresh draws:")
    result["accuracy"] = check_accuracy(args)
    return result


if __name__ == "__main__":
    main()
