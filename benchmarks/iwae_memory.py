"""Does ``pvae.evaluate`` keep its memory flat in K, and what does its generality cost in speed?

One run prints, side by side:

1. Peak memory of :func:`pvae.evaluate.evaluate` (the importance-weighted bound, the ELBO terms,
   active units and PSIS, all in one pass) at K = 50 and at K = 5000 samples per datapoint, with the
   same ``--chunk-size`` and ``--batch-size``, and their ratio (target <= 1.2). Peak memory is set
   by one chunk of particles; what grows with K is the K x batch log-weights kept for PSIS.
2. Throughput, in datapoint-samples per second, of ``evaluate`` at K = ``--samples``, as a fraction
   of a hand-written batched decoder forward pass over the same particles (target >= 0.7): for
   each batch and chunk, ``decoder(z)`` with ``z`` of shape (chunk, batch, latent), nothing else.
   Also shown: a hand-written importance-weighted bound in plain PyTorch (encoder, reparameterized
   draws, decoder, Bernoulli log-likelihood, Gaussian log-densities, running log-sum-exp: the same
   maths without Pyro and without PSIS), the same with pvae's Bernoulli log-density
   (``bernoulli_log_density``: exp and log where the cross-entropy's CPU kernel runs ``log1p`` one
   element at a time), and ``evaluate`` without PSIS.
3. The gap study's estimates under q*, :func:`pvae.inference.elbo_and_iwae_bound` (the ELBO and the
   importance-weighted bound from one pass of the stream, what ``pvae compare`` runs for L[q*] and
   log p̂(x)), against the hand-written IWAE (target >= 0.9).

How memory is measured, honestly:

- on CUDA, the caching allocator's own count: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the call;
- on the CPU (torch's allocations are invisible to ``tracemalloc``), each K runs in a fresh
  subprocess (this script with ``--child``) that imports everything (arviz included), builds the
  model and the data, then resets the kernel's high-water mark of its resident set
  (``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` from ``/proc/self/status`` around the
  call: the extra resident memory at the peak of the evaluation, whatever allocated it. Where the
  reset is refused the peak also holds the imports' and is flagged as such.

  Resident memory also counts what the C allocator keeps after a free. glibc raises its mmap
  threshold to the size of the first large block freed, then serves later chunks' tensors from a
  heap it does not trim, so with its defaults the peak depends on the allocation history (it grows
  over the first few chunks, then stays). Each K is therefore measured twice: with glibc's defaults,
  and with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, where every large tensor is mapped and
  unmapped on its own and the resident set follows the memory that ``evaluate`` holds. The target
  applies to the second; both are printed.

Throughput runs are interleaved (evaluate, forward, hand-written, then the reverse order) so that
drift in the machine's speed falls on all; the figures are medians over ``--repeats``.

The model is the 784-400-20 MLP VAE (Bernoulli pixels) with its amortized Gaussian guide,
untrained and seeded (speed and memory do not depend on the weights), on statically binarized
Fashion-MNIST test images when the folder ``--data`` holds them, else on random binary images of
784 pixels (no network either way).

    python benchmarks/iwae_memory.py                    # CPU: two to three minutes on two cores
    python benchmarks/iwae_memory.py --threads 1        # where waking OpenMP threads costs more than they give
    python benchmarks/iwae_memory.py --datapoints 16 --repeats 1 --samples 1000   # a quick look
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

import pvae
from pvae.evaluate import evaluate, import_arviz
from pvae.inference import elbo_and_iwae_bound
from pvae.guides import mlp_guide
from pvae.models import mlp_vae
from pvae.models.likelihoods import bernoulli_log_density

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
LOG_2PI = math.log(2 * math.pi)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="folder of Fashion-MNIST IDX files; random images if absent")
    p.add_argument("--datapoints", type=int, default=32, help="test images evaluated (default: 32)")
    p.add_argument("--samples", type=int, default=5000, help="K of the throughput runs (default: 5000)")
    p.add_argument("--memory-samples", type=int, nargs=2, default=[50, 5000], help="the two K compared (default: 50 5000)")
    p.add_argument("--chunk-size", type=int, default=50, help="particles traced at once, both K alike (default: 50)")
    p.add_argument("--batch-size", type=int, default=32, help="datapoints traced at once (default: 32)")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (default: 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # K: measure memory, print JSON
    args = p.parse_args(argv)
    if min(args.datapoints, args.samples, args.chunk_size, args.batch_size, args.repeats, *args.memory_samples) < 1:
        p.error("every count must be at least 1")
    return args


def setup(args, device) -> tuple:
    """``(model, guide, x)``: the seeded, untrained VAE and ``(N, 784)`` binary images on ``device``."""
    pvae.set_seed(0)
    model = mlp_vae(784, args.latent_dim, (args.hidden,), "bernoulli").to(device).eval()
    guide = mlp_guide(784, args.latent_dim, (args.hidden,)).to(device).eval()
    folder = Path(args.data)
    if folder.is_dir():
        data = pvae.load_dataset(str(folder), binarize="static")
        x, source = data.test[: args.datapoints], f"{data.name} test images (static binarization)"
    else:
        g = torch.Generator().manual_seed(0)
        x, source = torch.bernoulli(torch.full((args.datapoints, 784), 0.3), generator=g), "random binary images"
    return model, guide, x.to(device), source


def run_evaluate(model, guide, x, args, num_samples, psis=True):
    return evaluate(model, guide, x, num_samples=num_samples, chunk_size=args.chunk_size,
                    batch_size=args.batch_size, psis=psis)


def study_bounds(model, guide, x, args, num_samples):
    """What ``pvae compare`` computes under q*: the ELBO and the importance-weighted bound from one pass
    of the stream, batch by batch."""
    return [elbo_and_iwae_bound(model, guide, xb, num_samples, args.chunk_size) for xb in x.split(args.batch_size)]


# ----------------------------------------------------------------------------- the hand-written baselines


@torch.no_grad()
def decoder_forward(model, x, args, num_samples) -> None:
    """The decoder on every (chunk, batch, latent) draw of standard normals: the floor."""
    for xb in x.split(args.batch_size):
        for start in range(0, num_samples, args.chunk_size):
            k = min(args.chunk_size, num_samples - start)
            model.decoder(torch.randn(k, xb.shape[0], args.latent_dim, device=x.device, dtype=x.dtype))


@torch.no_grad()
def hand_written_iwae(model, guide, x, args, num_samples, same_density: bool = False) -> torch.Tensor:
    """log p̂(x) per datapoint in plain PyTorch, chunked with a running log-sum-exp; ``same_density``:
    the Bernoulli log-likelihood by pvae's ``bernoulli_log_density`` rather than the cross-entropy."""
    out = []
    for xb in x.split(args.batch_size):
        loc, scale = guide.encode(xb)  # (B, D) each: the encoder's network, as the stream runs it
        log_scale = scale.log().sum(-1)  # (B,)
        running = xb.new_full((xb.shape[0],), -math.inf)
        for start in range(0, num_samples, args.chunk_size):
            k = min(args.chunk_size, num_samples - start)
            eps = torch.randn(k, *loc.shape, device=x.device, dtype=x.dtype)
            z = loc + scale * eps  # (k, B, D)
            logits = model.decoder(z)
            if same_density:
                log_lik = bernoulli_log_density(logits, xb.expand(k, -1, -1))
            else:
                log_lik = -F.binary_cross_entropy_with_logits(logits, xb.expand(k, -1, -1), reduction="none").sum(-1)
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            log_qz = -0.5 * (eps.pow(2) + LOG_2PI).sum(-1) - log_scale
            running = torch.logaddexp(running, (log_lik + log_pz - log_qz).logsumexp(0))
        out.append(running - math.log(num_samples))
    return torch.cat(out)


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure_memory(model, guide, x, args, num_samples) -> dict:
    """Extra bytes at the peak of one evaluation, in this process (see the module docstring)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        run_evaluate(model, guide, x, args, num_samples)
        torch.cuda.synchronize(x.device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(x.device) - before, "how": "torch.cuda.max_memory_allocated"}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        how = "VmHWM - VmRSS (high-water mark reset)"
    except OSError:
        how = "VmHWM - VmRSS (reset refused: the peak may be the imports')"
    before = _proc_status_kb("VmRSS")
    run_evaluate(model, guide, x, args, num_samples)
    return {"peak_bytes": 1024 * (_proc_status_kb("VmHWM") - before), "how": how}


def child(args) -> None:
    """One K's memory, in a process of its own: prints one JSON line."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pvae.resolve_device(args.device)
    import_arviz()  # loaded before the measurement, as every other module
    model, guide, x, _ = setup(args, device)
    print(json.dumps(measure_memory(model, guide, x, args, args.child)))


ALLOCATORS = {
    "glibc defaults": {},
    "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "65536"},  # RSS follows live memory
}


def memory_in_subprocess(argv, num_samples, env) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", str(num_samples)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return {}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pvae.resolve_device(args.device)
    model, guide, x, source = setup(args, device)
    n, k = x.shape[0], args.samples
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
          f"pyro validation {'on' if pyro.infer.util.is_validation_enabled() else 'off'}")
    print(f"784-{args.hidden}-{args.latent_dim} MLP VAE (Bernoulli), untrained; {n} {source}; "
          f"chunks of {args.chunk_size} particles x batches of {args.batch_size} datapoints")

    # memory: each K in a fresh process (CPU), or one after the other on the GPU's allocator
    small, large = args.memory_samples
    if device.type == "cuda":
        run_evaluate(model, guide, x, args, small)  # warm-up: CUDA context, cuBLAS workspaces
        mem = {"caching allocator": {K: measure_memory(model, guide, x, args, K) for K in (small, large)}}
    else:
        mem = {name: {K: memory_in_subprocess(argv, K, env) for K in (small, large)} for name, env in ALLOCATORS.items()}
    kept = large * min(args.batch_size, n) * x.element_size()
    print(f"\npeak memory of evaluate, {next(iter(mem.values()))[large]['how']} (MiB):")
    print(f"  {'':22s} {'K = ' + str(small):>10s} {'K = ' + str(large):>10s}  ratio")
    for name, m in mem.items():
        ratio = m[large]["peak_bytes"] / m[small]["peak_bytes"]
        print(f"  {name:22s} {m[small]['peak_bytes'] / 2**20:10.1f} {m[large]['peak_bytes'] / 2**20:10.1f}  {ratio:.3f}")
    mem_ratio = ratio  # the last: the fixed threshold on the CPU, the caching allocator on CUDA
    print(f"  target: ratio <= 1.2 ({'met' if mem_ratio <= 1.2 else 'NOT met'}); the K x batch log-weights kept "
          f"for PSIS are {kept / 2**20:.1f} MiB of it")

    # throughput
    runs = {
        "evaluate": lambda: run_evaluate(model, guide, x, args, k),
        "evaluate, no PSIS": lambda: run_evaluate(model, guide, x, args, k, psis=False),
        "gap study's bounds": lambda: study_bounds(model, guide, x, args, k),
        "decoder forward": lambda: decoder_forward(model, x, args, k),
        "hand-written IWAE": lambda: hand_written_iwae(model, guide, x, args, k),
        "hand, same density": lambda: hand_written_iwae(model, guide, x, args, k, same_density=True),
    }
    # warm-up, untimed, on one batch and one chunk
    run_evaluate(model, guide, x[: args.batch_size], args, args.chunk_size)
    decoder_forward(model, x[: args.batch_size], args, args.chunk_size)
    seconds = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            seconds[name].append(timed(runs[name], device))
    rate = {name: n * k / statistics.median(s) for name, s in seconds.items()}
    print(f"\nthroughput at K = {k}, median of {args.repeats} (datapoint-samples per second):")
    for name, r in rate.items():
        print(f"  {name:18s} {r:12,.0f}  ({statistics.median(seconds[name]):.2f} s)")
    speed_ratio = rate["evaluate"] / rate["decoder forward"]
    print(f"  evaluate / decoder forward:   {speed_ratio:.3f}  (target >= 0.7: {'met' if speed_ratio >= 0.7 else 'NOT met'})")
    print(f"  evaluate / hand-written IWAE: {rate['evaluate'] / rate['hand-written IWAE']:.3f}")
    study_ratio = rate["gap study's bounds"] / rate["hand-written IWAE"]
    same_density = rate["gap study's bounds"] / rate["hand, same density"]
    print(f"  gap study's L[q*] and log p(x) / hand-written IWAE: {study_ratio:.3f}  "
          f"(target >= 0.9: {'met' if study_ratio >= 0.9 else 'NOT met'}); / the same with pvae's Bernoulli "
          f"log-density: {same_density:.3f}")
    print(f"  evaluate without PSIS / decoder forward: {rate['evaluate, no PSIS'] / rate['decoder forward']:.3f}")
    return {"memory": mem, "memory_ratio": mem_ratio, "rate": rate, "speed_ratio": speed_ratio, "study_ratio": study_ratio}


if __name__ == "__main__":
    main()
