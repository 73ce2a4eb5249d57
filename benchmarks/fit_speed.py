"""How much does fitting through Pyro cost? ``pvae.fit`` against a hand-written PyTorch loop.

Both train the same 784-400-20 MLP VAE (Bernoulli pixels, diagonal-Gaussian q, reparameterized)
on statically binarized Fashion-MNIST for one epoch with batch 128 and Adam (lr 1e-3), on in-memory
tensors in shuffled batches. The hand-written loop computes the same single-sample ELBO as pvae's
``--elbo`` choice: ``trace`` (Trace_ELBO: Monte Carlo log p(z) - log q(z)) or ``analytic-kl``
(TraceMeanField_ELBO: the Gaussian KL in closed form), scaled to the data set as pvae's data plate
scales it.

Three loops are timed: ``pvae`` (``pvae.fit``, evaluation and checkpoints off), ``hand-written``
(``torch.optim.Adam`` with its defaults, as one writes it) and ``hand, fused`` (the same loop with
``Adam(fused=True)``, the optimizer ``pvae.fit`` uses). The first ratio is what a user gains or loses
by fitting through pvae; the second is the cost of Pyro itself (tracing the model and guide, every
step). Runs are interleaved, in reversed order every other repeat, so that drift in the machine's
speed falls on all; the figures are medians over ``--repeats``, in wall-clock and in this process's
CPU time (steadier on a machine that other work shares)::

    python benchmarks/fit_speed.py --repeats 5
    python benchmarks/fit_speed.py --repeats 1 --max-batches 20   # a quick smoke run
    python benchmarks/fit_speed.py --validate    # Pyro's validation in every pvae step, as before

The data are the four IDX files of Fashion-MNIST in ``--data`` (Debian's ``dataset-fashion-mnist``
puts them in /usr/share/datasets/fashion-mnist).
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.inference import ELBOS
from pvae.guides import mlp_guide
from pvae.models import mlp_vae

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
LOG_2PI = math.log(2 * math.pi)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"folder of Fashion-MNIST IDX files (default: {DEFAULT_DATA})")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each loop, interleaved (default: 5)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (default: 1)")
    p.add_argument("--max-batches", type=int, default=None, help="train on this many batches per epoch only (a smoke run)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--elbo", choices=list(ELBOS), default="trace",
                   help="the ELBO both loops compute (default: trace, Monte Carlo KL)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both loops (default: torch's choice)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each loop")
    p.add_argument("--fused-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the hand-written loop with fused Adam, the optimizer pvae.fit uses, so that "
                        "the two ratios separate Pyro's overhead from the optimizer's speed-up (default: on)")
    p.add_argument("--validate", action="store_true",
                   help="pvae with Pyro's validation in every step (FitConfig.validate), as before the fix")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.epochs < 1 or (args.max_batches is not None and args.max_batches < 1):
        p.error("--repeats, --epochs and --max-batches must be at least 1")
    return args


# ----------------------------------------------------------------------------- the hand-written loop


class HandVAE(nn.Module):
    """The same networks as ``mlp_vae`` + ``mlp_guide``, as a plain PyTorch module."""

    def __init__(self, num_pixels: int, hidden: int, latent_dim: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(num_pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_pixels))

    def loss(self, x: torch.Tensor, num_data: int, analytic_kl: bool) -> torch.Tensor:
        """-ELBO of the batch scaled to the data set, ``num_data / B * sum_b -elbo_b``, as pvae's plate."""
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)  # (B, D) each
        scale = F.softplus(raw_scale) + 1e-6
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        # the baseline is what one writes by hand in PyTorch: closed forms, no distribution objects
        log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)  # (B,)
        if analytic_kl:
            kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)
        else:
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            log_qz = (-0.5 * (eps.pow(2) + LOG_2PI) - scale.log()).sum(-1)
            kl = log_qz - log_pz
        return (kl - log_px).sum() * (num_data / x.shape[0])


def hand_written(x: torch.Tensor, args, seed: int, fused=None) -> float:
    """One run of the hand-written loop; returns its loss per datapoint over the last epoch."""
    torch.manual_seed(seed)
    net = HandVAE(x.shape[1], args.hidden, args.latent_dim).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    num_data = x.shape[0]
    analytic = args.elbo == "analytic-kl"
    for _ in range(args.epochs):
        loss_sum = torch.zeros((), device=x.device)
        for idx in torch.randperm(num_data, generator=generator, device=x.device).split(args.batch_size):
            loss = net.loss(x[idx], num_data, analytic)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
    steps = math.ceil(num_data / args.batch_size)
    return loss_sum.item() / (steps * num_data)


# ----------------------------------------------------------------------------- pvae


def through_pvae(data: pvae.Dataset, args, seed: int, device) -> float:
    """One run of ``pvae.fit``, no evaluation, no run folder, no progress bar."""
    pvae.set_seed(seed)  # the initial weights, as the hand-written loop seeds its own
    model = mlp_vae(data.num_pixels, args.latent_dim, (args.hidden,), "bernoulli")
    guide = mlp_guide(data.num_pixels, args.latent_dim, (args.hidden,))
    config = pvae.FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, elbo=args.elbo, seed=seed,
        eval_every=0, progress=False, validate=args.validate,
    )
    result = pvae.fit(model, guide, data, config, device=device)
    return result.final["train_loss"]


def timed(fn, device) -> tuple:
    """``(wall seconds, CPU seconds of this process, fn())``; CPU time is less disturbed by other
    processes on a shared machine."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, value


def load(args, device) -> pvae.Dataset:
    folder = Path(args.data)
    if not folder.is_dir():
        sys.exit(
            f"fit_speed: no Fashion-MNIST folder at {folder}. Install Debian's copy with "
            "`apt-get install dataset-fashion-mnist` (it fills /usr/share/datasets/fashion-mnist), "
            "or pass --data FOLDER holding the four IDX files (plain or .gz)."
        )
    data = pvae.load_dataset(str(folder), binarize="static")
    if args.max_batches is not None:
        n = min(data.train.shape[0], args.max_batches * args.batch_size)
        data = pvae.Dataset(data.name, data.image_shape, data.train[:n], data.val[:0], data.test[:0],
                            binarize=data.binarize)
    return data.to(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())  # the same for every loop
    device = pvae.resolve_device(args.device)
    data = load(args, device)
    x = data.train
    runs = {
        "pvae": lambda seed: through_pvae(data, args, seed, device),
        "hand-written": lambda seed: hand_written(x, args, seed),
    }
    if args.fused_baseline:
        runs["hand, fused"] = lambda seed: hand_written(x, args, seed, fused=True)
    steps = args.epochs * math.ceil(x.shape[0] / args.batch_size)
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
          f"pyro validation in pvae: {'every step' if args.validate else 'first batch only'}")
    print(f"{x.shape[0]} training images x {x.shape[1]} pixels, {args.epochs} epoch(s) = {steps} steps of "
          f"{args.batch_size}, {args.latent_dim}-D latent, {args.hidden} hidden, elbo {args.elbo}")
    if not args.no_warmup:
        for fn in runs.values():
            fn(args.repeats)  # a seed no timed run uses
    seconds = {name: [] for name in runs}
    cpu_seconds = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            s, cpu, loss = timed(lambda: runs[name](r), device)
            seconds[name].append(s)
            cpu_seconds[name].append(cpu)
            print(f"repeat {r + 1}/{args.repeats}  {name:12s} {s:7.3f} s  {1e3 * s / steps:6.2f} ms/step  "
                  f"(CPU {cpu:7.3f} s)  loss {loss:8.3f} nats")
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu_seconds.items()}
    for name, m in medians.items():
        print(f"median {name:12s} {m:7.3f} s  {1e3 * m / steps:6.2f} ms/step  (CPU {cpu_medians[name]:7.3f} s)")
    ratios = {}
    for name in list(runs)[1:]:
        ratios[name] = medians["pvae"] / medians[name]
        print(f"ratio pvae / {name + ':':13s} {ratios[name]:.3f} wall-clock, "
              f"{cpu_medians['pvae'] / cpu_medians[name]:.3f} CPU time")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "medians": medians, "ratios": ratios}


if __name__ == "__main__":
    main()
