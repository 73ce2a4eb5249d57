"""Weak scaling of data-parallel fitting on the CPU: samples per second with 1 and 2 processes.

Each process trains with the same batch per rank (``--batch-size``) and one torch thread, so that a
process's work per step stays the same as processes are added (weak scaling): with R ranks a step takes
R x B rows, an epoch R times fewer steps. Two ranks are a gloo process group on 127.0.0.1, spawned by this
script; one process fits alone. Each run is ``pvae.fit`` (evaluation and checkpoints off) of the
784-400-20 Bernoulli MLP VAE on statically binarized Fashion-MNIST; its training seconds (the steps,
all-reduces included, as ``FitResult.seconds`` counts them; starting the processes excluded) give
samples/s = epochs x N / seconds, taken from the slowest rank. Runs of each process count are
interleaved, in reversed order every other round, so that drift in the machine's speed falls on all;
the figures are medians over ``--rounds``. Efficiency = samples/s with R ranks / (R x samples/s with one);
1 is perfect weak scaling. On a machine that other work shares, R processes may not get R cores: the
script also prints each rank's samples per CPU-second of its own (its process time over the fit's loop,
gloo's threads included), whose ratio to one process's is the efficiency the all-reduce leaves when
every rank has a core to itself::

    python benchmarks/distributed_scaling.py                     # 1 and 2 processes, 5 rounds
    python benchmarks/distributed_scaling.py --rounds 1 --datapoints 2560   # a smoke run

The data are the four IDX files of Fashion-MNIST in ``--data`` (Debian's ``dataset-fashion-mnist`` puts
them in /usr/share/datasets/fashion-mnist); ``--data digits`` takes the embedded 8x8 digits instead.
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"folder of Fashion-MNIST IDX files, or digits (default: {DEFAULT_DATA})")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time (default: 1 2)")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per process count, interleaved (default: 5)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (default: 1)")
    p.add_argument("--datapoints", type=int, default=12800, help="training rows used (default: 12800; 100 steps of 128 alone)")
    p.add_argument("--batch-size", type=int, default=128, help="rows per rank and step (default: 128)")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.epochs < 1 or min(args.processes) < 1:
        p.error("--rounds, --epochs and every process count must be at least 1")
    return args


def load(args):
    import pvae

    data = (pvae.load_dataset("digits", binarize="static") if args.data == "digits"
            else pvae.load_dataset(args.data, binarize="static", download=False))
    train = data.train[: args.datapoints]
    return pvae.Dataset.from_tensors(train, name=data.name, image_shape=data.image_shape), train.shape[1]


def rank_main(rank: int, size: int, port: int, args, out: str) -> None:
    """One rank: fit, then write its training seconds, CPU seconds and rows to ``out``."""
    import time

    import pvae
    from pvae.guides import mlp_guide
    from pvae.models import mlp_vae

    class CPUTime(pvae.Callback):
        def on_fit_start(self, state):
            self.start = time.process_time()

        def on_fit_end(self, state):
            self.seconds = time.process_time() - self.start

    torch.set_num_threads(args.threads)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        data, pixels = load(args)
        pvae.set_seed(0)
        model, guide = mlp_vae(pixels, args.latent_dim, (args.hidden,)), mlp_guide(pixels, args.latent_dim, (args.hidden,))
        config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, eval_every=0, progress=False)
        cpu = CPUTime()
        result = pvae.fit(model, guide, data, config, callbacks=[cpu])
        rows = args.epochs * data.train.shape[0] // size  # this rank's share
        Path(out).write_text(f"{result.seconds} {cpu.seconds} {args.epochs * data.train.shape[0]} {rows}\n")
    finally:
        if size > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_run(size: int, args) -> tuple:
    """Samples per second of one fit on ``size`` processes (the slowest rank's training time), and
    samples per CPU-second of the slowest rank's own."""
    with tempfile.TemporaryDirectory() as folder:
        outs = [os.path.join(folder, f"rank{r}.txt") for r in range(size)]
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=rank_main, args=(r, size, port, args, outs[r])) for r in range(size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a rank of the {size}-process run failed (exit codes {[p.exitcode for p in procs]})")
        ranks = [Path(o).read_text().split() for o in outs]
    seconds, samples = max(float(r[0]) for r in ranks), int(ranks[0][2])
    per_cpu = min(int(r[3]) / float(r[1]) for r in ranks)
    return samples / seconds, per_cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks talk over the loopback only
    timings = {size: [] for size in args.processes}
    for round_ in range(args.rounds):
        order = args.processes if round_ % 2 == 0 else list(reversed(args.processes))
        for size in order:
            timings[size].append(timed_run(size, args))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{s} process(es) {timings[s][-1][0]:,.0f} samples/s"
                                                               for s in args.processes), flush=True)
    smallest = min(args.processes)
    base = statistics.median(t[0] for t in timings[smallest]) / smallest
    base_cpu = statistics.median(t[1] for t in timings[smallest])
    print(f"\nweak scaling, {args.batch_size} rows per rank and step, {args.threads} thread(s) per process, "
          f"{args.datapoints} datapoints, medians of {args.rounds}:")
    for size in args.processes:
        rate = statistics.median(t[0] for t in timings[size])
        per_cpu = statistics.median(t[1] for t in timings[size])
        print(f"  {size} process(es): {rate:10,.0f} samples/s, efficiency {rate / (size * base):.2f};   "
              f"per rank {per_cpu:8,.0f} samples per CPU-second, efficiency {per_cpu / base_cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
