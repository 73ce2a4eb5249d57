"""How much does fitting through Pyro cost? ``pvae.fit`` against hand-written loops and Pyro's own idiom.

Every loop trains the same 784-400-20 MLP VAE (Bernoulli pixels, diagonal-Gaussian q,
reparameterized) on Fashion-MNIST for one epoch with Adam (lr 1e-3), at each ``--batch-sizes``:

- ``pvae``: ``pvae.fit`` (evaluation and checkpoints off), which replays its recorded objective
  (``pvae.tape``) and steps a fused Adam; ``--elbo`` as pvae's flag;
- ``hand, fused``: the loop a careful engineer writes, in-memory shuffled batches, closed-form
  log-densities, ``torch.optim.Adam(fused=True)``: the target, ``pvae / hand, fused <= 1.10`` at batch
  128 and ``<= 1.03`` at batch 1024;
- ``hand, same log-density``: ``hand, fused`` with pvae's Bernoulli log-density
  (``pvae.models.likelihoods.bernoulli_log_density``: exp and log rather than the cross-entropy's
  ``log1p``, which torch computes one element at a time on the CPU) in place of
  ``F.binary_cross_entropy_with_logits``: the same arithmetic as pvae, so that ``pvae / hand, same
  log-density`` is what pvae's own machinery costs;
- ``hand-written``: ``hand, fused`` with ``torch.optim.Adam``'s defaults;
- ``pyro SVI.step``: Pyro's VAE example (``vae.model``/``vae.guide`` with ``pyro.module``, ``SVI``,
  ``pyro.optim.Adam``, ``Trace_ELBO``), fed the same in-memory batches, Pyro's validation off (its
  fastest setting): pvae should be at least 1.4x faster at batch 128, the batch of both examples;
- ``torch DataLoader``: the PyTorch VAE example's loop, ``torchvision.datasets.FashionMNIST`` with
  ``transforms.ToTensor()`` through a ``DataLoader`` (``shuffle=True``), default Adam, on grey levels
  as that example trains: pvae should be at least 1.4x faster (at 128). It needs the IDX files unpacked
  into torchvision's layout, which the script does once under ``--cache``.

The hand-written loops compute the single-sample ELBO of pvae's ``--elbo`` choice (``trace``: Monte
Carlo log p(z) - log q(z); ``analytic-kl``: the closed-form KL), scaled to the data set as pvae's data
plate scales it. Runs are interleaved, in reversed order every other repeat, so that drift in the
machine's speed falls on all; the figures are medians over ``--repeats``, in wall-clock and in this
process's CPU time (steadier on a machine that other work shares), and the median of the repeats'
own ratios (runs next to each other in time: steadier where the machine's speed drifts).

Each batch size also prints the matrix products' share of a step: the step's matmul FLOPs (forward,
and backward to the weights and to every input but the data) divided by its time, as a fraction of
this machine's matmul peak, measured here by large ``torch.mm`` products on the same threads::

    python benchmarks/fit_speed.py --repeats 5                  # batch 128 and 1024, all six loops
    taskset -c 0,1 python benchmarks/fit_speed.py --threads 2   # pinned to two cores
    python benchmarks/fit_speed.py --repeats 1 --max-batches 20 --batch-sizes 128   # a smoke run

The data are the four IDX files of Fashion-MNIST in ``--data`` (Debian's ``dataset-fashion-mnist``
puts them in /usr/share/datasets/fashion-mnist).
"""

import argparse
import gzip
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.guides import mlp_guide
from pvae.inference import ELBOS
from pvae.models import mlp_vae
from pvae.models.likelihoods import bernoulli_log_density

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
DEFAULT_CACHE = Path.home() / ".cache" / "pvae" / "torchvision"
LOG_2PI = math.log(2 * math.pi)
LOOPS = ("pvae", "hand, fused", "hand, same log-density", "hand-written", "pyro SVI.step", "torch DataLoader")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"folder of Fashion-MNIST IDX files (default: {DEFAULT_DATA})")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where torchvision's copy is unpacked (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each loop, interleaved (default: 5)")
    p.add_argument("--max-batches", type=int, default=None, help="train on this many batches per epoch only (a smoke run)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--elbo", choices=list(ELBOS), default="trace",
                   help="the ELBO pvae and the hand-written loops compute (default: trace, Monte Carlo KL)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for every loop (default: torch's choice)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each loop")
    p.add_argument("--no-tape", action="store_true", help="pvae without its recorded objective (FitConfig(tape='never'))")
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.max_batches is not None and args.max_batches < 1) or min(args.batch_sizes) < 1:
        p.error("--repeats, --max-batches and --batch-sizes must be at least 1")
    return args


# ----------------------------------------------------------------------------- hand-written


class HandVAE(nn.Module):
    """The same networks as ``mlp_vae`` + ``mlp_guide``, as a plain PyTorch module."""

    def __init__(self, num_pixels: int, hidden: int, latent_dim: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(num_pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_pixels))

    def loss(self, x: torch.Tensor, num_data: int, analytic_kl: bool, same_density: bool = False) -> torch.Tensor:
        """-ELBO of the batch scaled to the data set, ``num_data / B * sum_b -elbo_b``, as pvae's plate;
        ``same_density``: log p(x | z) by pvae's ``bernoulli_log_density``."""
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)  # (B, D) each
        scale = F.softplus(raw_scale) + 1e-6
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        # the baseline is what one writes by hand in PyTorch: closed forms, no distribution objects
        if same_density:
            log_px = bernoulli_log_density(self.decoder(z), x)
        else:
            log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)  # (B,)
        if analytic_kl:
            kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)
        else:
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            log_qz = (-0.5 * (eps.pow(2) + LOG_2PI) - scale.log()).sum(-1)
            kl = log_qz - log_pz
        return (kl - log_px).sum() * (num_data / x.shape[0])


def hand_written(x: torch.Tensor, args, batch_size: int, seed: int, fused=None, same_density: bool = False) -> float:
    """One epoch of the hand-written loop; returns its loss per datapoint."""
    torch.manual_seed(seed)
    net = HandVAE(x.shape[1], args.hidden, args.latent_dim).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    num_data = x.shape[0]
    analytic = args.elbo == "analytic-kl"
    loss_sum = torch.zeros((), device=x.device)
    for idx in torch.randperm(num_data, generator=generator, device=x.device).split(batch_size):
        loss = net.loss(x[idx], num_data, analytic, same_density)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
    return loss_sum.item() / (math.ceil(num_data / batch_size) * num_data)


# ----------------------------------------------------------------------------- pvae


def through_pvae(data: pvae.Dataset, args, batch_size: int, seed: int, device) -> float:
    """One epoch of ``pvae.fit``: no evaluation, no run folder, no progress bar."""
    pvae.set_seed(seed)  # the initial weights, as the hand-written loop seeds its own
    model = mlp_vae(data.num_pixels, args.latent_dim, (args.hidden,), "bernoulli")
    guide = mlp_guide(data.num_pixels, args.latent_dim, (args.hidden,))
    config = pvae.FitConfig(epochs=1, batch_size=batch_size, lr=1e-3, elbo=args.elbo, seed=seed, eval_every=0,
                            progress=False, tape="never" if args.no_tape else "auto")
    return pvae.fit(model, guide, data, config, device=device).final["train_loss"]


# ----------------------------------------------------------------------------- Pyro's VAE example


class PyroExampleVAE(nn.Module):
    """Pyro's ``examples/vae/vae.py``: ``model`` and ``guide`` methods registering their networks with
    ``pyro.module``; ReLU and a softplus scale here, as the other loops, for the same arithmetic."""

    def __init__(self, num_pixels: int, hidden: int, latent_dim: int):
        super().__init__()
        self.nets = HandVAE(num_pixels, hidden, latent_dim)
        self.latent_dim = latent_dim

    def model(self, x):
        pyro.module("decoder", self.nets.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.nets.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.nets.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw_scale = self.nets.encoder(x).chunk(2, dim=-1)
            pyro.sample("latent", dist.Normal(loc, F.softplus(raw_scale) + 1e-6).to_event(1))


def pyro_svi(x: torch.Tensor, args, batch_size: int, seed: int) -> float:
    """One epoch of ``svi.step(x)`` as Pyro's VAE example runs it (loss summed over the batch)."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    vae = PyroExampleVAE(x.shape[1], args.hidden, args.latent_dim).to(x.device)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=pyro.infer.Trace_ELBO())
    generator = torch.Generator(device=x.device).manual_seed(seed)
    epoch_loss = 0.0
    with pyro.validation_enabled(False):
        for idx in torch.randperm(x.shape[0], generator=generator, device=x.device).split(batch_size):
            epoch_loss += svi.step(x[idx])
    return epoch_loss / x.shape[0]


# ----------------------------------------------------------------------------- the PyTorch VAE example


def torchvision_set(args, max_items):
    """``datasets.FashionMNIST(transform=transforms.ToTensor())``, from the IDX files unpacked once."""
    from torchvision import datasets, transforms

    raw = Path(args.cache) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        if (raw / name).is_file():
            continue
        source = Path(args.data) / name
        gz = source.with_name(name + ".gz")
        if gz.is_file():
            with gzip.open(gz, "rb") as f, open(raw / name, "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(source, raw / name)
    dataset = datasets.FashionMNIST(str(Path(args.cache)), train=True, download=False, transform=transforms.ToTensor())
    if max_items is not None:
        dataset = torch.utils.data.Subset(dataset, range(max_items))
    return dataset


def torch_dataloader(dataset, args, batch_size: int, seed: int, device) -> float:
    """One epoch of the PyTorch VAE example's loop: ``DataLoader(shuffle=True)`` over ``ToTensor`` images,
    default Adam, the loss summed over the batch."""
    torch.manual_seed(seed)
    net = HandVAE(784, args.hidden, args.latent_dim).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    loss_sum = 0.0
    for x, _ in loader:
        x = x.to(device).view(-1, 784)
        opt.zero_grad()
        loss = net.loss(x, x.shape[0], args.elbo == "analytic-kl")
        loss.backward()
        loss_sum += loss.item()
        opt.step()
    return loss_sum / len(dataset)


# ----------------------------------------------------------------------------- FLOPs


def step_matmul_flops(batch_size: int, pixels: int, hidden: int, latent: int) -> float:
    """Multiply-adds x 2 of one step's matrix products: forward through the four layers, backward to
    every weight and to every layer's input but the data's."""
    layers = [(pixels, hidden), (hidden, 2 * latent), (latent, hidden), (hidden, pixels)]
    forward = sum(2 * batch_size * i * o for i, o in layers)
    to_inputs = forward - 2 * batch_size * pixels * hidden
    return forward + forward + to_inputs


def matmul_peak(device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of ``torch.mm`` on ``size x size`` float32 matrices, the best of ``repeats``."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        seconds, _, _ = timed(lambda: torch.mm(a, b), device)
        best = min(best, seconds)
    return 2 * size**3 / best


# ----------------------------------------------------------------------------- timing


def timed(fn, device) -> tuple:
    """``(wall seconds, CPU seconds of this process, fn())``."""
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
    data = pvae.load_dataset(str(folder), binarize="static", val_size=0)
    if args.max_batches is not None:
        n = min(data.train.shape[0], args.max_batches * max(args.batch_sizes))
        data = pvae.Dataset(data.name, data.image_shape, data.train[:n], data.val[:0], data.test[:0],
                            binarize=data.binarize)
    return data.to(device)


def run_batch_size(batch_size: int, data, dataset, args, device, peak: float) -> dict:
    x = data.train
    every = {
        "pvae": lambda seed: through_pvae(data, args, batch_size, seed, device),
        "hand, fused": lambda seed: hand_written(x, args, batch_size, seed, fused=True),
        "hand, same log-density": lambda seed: hand_written(x, args, batch_size, seed, fused=True, same_density=True),
        "hand-written": lambda seed: hand_written(x, args, batch_size, seed),
        "pyro SVI.step": lambda seed: pyro_svi(x, args, batch_size, seed),
        "torch DataLoader": lambda seed: torch_dataloader(dataset, args, batch_size, seed, device),
    }
    runs = {name: every[name] for name in args.loops}
    steps = math.ceil(x.shape[0] / batch_size)
    print(f"\nbatch {batch_size}: {x.shape[0]} images x {x.shape[1]} pixels, one epoch = {steps} steps")
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
            print(f"  repeat {r + 1}/{args.repeats}  {name:22s} {s:7.3f} s  {1e3 * s / steps:6.2f} ms/step  "
                  f"(CPU {cpu:7.3f} s)  loss {loss:8.3f} nats")
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu_seconds.items()}
    flops = step_matmul_flops(batch_size, x.shape[1], args.hidden, args.latent_dim)
    for name, m in medians.items():
        rate = flops * steps / m
        print(f"  median {name:22s} {m:7.3f} s  {1e3 * m / steps:6.2f} ms/step  (CPU {cpu_medians[name]:7.3f} s)  "
              f"matmuls {rate / 1e9:6.1f} GFLOP/s = {rate / peak:.2f} of the peak")
    ratios = {}
    if "pvae" in medians:
        for name in medians:
            if name == "pvae":
                continue
            ratios[name] = medians["pvae"] / medians[name]
            paired = statistics.median(a / b for a, b in zip(seconds["pvae"], seconds[name]))
            print(f"  ratio pvae / {name + ':':23s} {ratios[name]:.3f} wall-clock, "
                  f"{cpu_medians['pvae'] / cpu_medians[name]:.3f} CPU time; {paired:.3f} the median of each "
                  "repeat's ratio")
        if "hand, fused" in ratios:
            target = 1.10 if batch_size <= 128 else 1.03
            met = "met" if ratios["hand, fused"] <= target else "NOT met"
            print(f"  target pvae / hand, fused <= {target}: {met}")
        for name in ("pyro SVI.step", "torch DataLoader"):
            if name in ratios:  # the target is set at 128, the batch of both examples
                target = (f"target >= 1.4: {'met' if 1 / ratios[name] >= 1.4 else 'NOT met'}" if batch_size == 128
                          else "the target is set at the examples' batch of 128")
                print(f"  pvae is {1 / ratios[name]:.2f}x as fast as {name} ({target})")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "medians": medians, "ratios": ratios}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())  # the same for every loop
    device = pvae.resolve_device(args.device)
    data = load(args, device)
    dataset = torchvision_set(args, data.train.shape[0]) if "torch DataLoader" in args.loops else None
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} threads; {args.latent_dim}-D latent, {args.hidden} hidden, elbo {args.elbo}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048 x 2048 torch.mm)")
    return {b: run_batch_size(b, data, dataset, args, device, peak) for b in args.batch_sizes}


if __name__ == "__main__":
    main()
