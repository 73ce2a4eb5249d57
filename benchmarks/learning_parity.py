"""Does ``pvae.fit`` learn as well as a hand-written PyTorch loop, at equal budget?

The setting of issue 12, section 3: Fashion-MNIST thresholded at 0.5 (Cremer et al.'s binarization),
all 60,000 training images, 784-200-200-50 MLPs with ELU, batch 100, Adam with lr 1e-3, 30 epochs.
Each *variant* trains one VAE per seed; every one is then measured by the same evaluator (plain
PyTorch, below), so that only the training differs:

- test -ELBO: per test image, the closed-form KL(q || N(0, I)) minus the reconstruction term
  averaged over ``--elbo-samples`` draws of z, mean over all 10,000 test images;
- IWAE NLL: minus the importance-weighted bound with K = ``--iwae-samples`` (1000) draws from q, on the
  first ``--iwae-images`` (500) test images (Burda et al. 2015).

Variants (``--variants``):

- ``pvae``: ``pvae.fit`` with the built-in ``mlp_vae`` and ``mlp_guide`` and pvae's default objective,
  as ``pvae train ... --val-size 0`` runs them;
- ``pvae-trace``, ``pvae-analytic``: ``pvae.fit`` with ``--elbo trace`` (a Monte Carlo KL) or
  ``--elbo analytic-kl`` (the closed-form KL);
- ``hand-<kl>-<scale>``: a hand-written loop (seeded ``nn.Linear`` layers, in-memory shuffled batches,
  ``torch.optim.Adam``), with ``<kl>`` ``analytic`` or ``mc`` (the KL in closed form, or
  ``log q(z) - log p(z)`` at the sampled z) and ``<scale>`` ``exp`` (the encoder outputs a
  log-variance, sigma = exp(log-variance / 2), as the PyTorch VAE example) or ``softplus``
  (sigma = softplus(raw) + 1e-6, as pvae's guides). ``hand-analytic-exp`` is the issue's baseline.

Each (variant, seed) writes one JSON line to ``--out`` as it finishes, and a rerun skips the pairs
already there, so a long study can be stopped and resumed. The summary table gives, per variant, the
mean over seeds and the spread (the sample standard deviation over seeds)::

    python benchmarks/learning_parity.py --seeds 0 1 2      # the study (about 4 minutes a run on 2 cores)
    python benchmarks/learning_parity.py --epochs 1 --train-size 2000 --seeds 0 --out /tmp/smoke.jsonl
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.guides import mlp_guide
from pvae.models import mlp_vae

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
VARIANTS = ("pvae", "pvae-trace", "pvae-analytic", "hand-analytic-exp", "hand-mc-exp", "hand-analytic-softplus",
            "hand-mc-softplus")
LOG_2PI = math.log(2 * math.pi)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"folder of Fashion-MNIST IDX files (default: {DEFAULT_DATA})")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["pvae", "hand-analytic-exp"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    p.add_argument("--train-size", type=int, default=None, help="the first N training images only (a smoke run)")
    p.add_argument("--elbo-samples", type=int, default=10, help="draws of z per test image for the -ELBO (default: 10)")
    p.add_argument("--iwae-samples", type=int, default=1000, help="K of the IWAE NLL (default: 1000)")
    p.add_argument("--iwae-images", type=int, default=500, help="first test images of the IWAE NLL (default: 500)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="learning_parity.jsonl", help="results, one JSON line per run (default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.epochs, args.batch_size, args.elbo_samples, args.iwae_samples, args.iwae_images) < 1:
        p.error("counts must be at least 1")
    return args


# ----------------------------------------------------------------------------- the hand-written VAE


class HandVAE(nn.Module):
    """The PyTorch VAE as one writes it by hand: encoder to (mu, raw scale), decoder to logits."""

    def __init__(self, num_pixels: int, hidden, latent_dim: int, scale: str):
        super().__init__()
        sizes = [num_pixels, *hidden]
        self.encoder = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ELU())])
        self.loc = nn.Linear(sizes[-1], latent_dim)
        self.raw_scale = nn.Linear(sizes[-1], latent_dim)
        dec = [latent_dim, *hidden[::-1]]
        layers = [m for a, b in zip(dec[:-1], dec[1:]) for m in (nn.Linear(a, b), nn.ELU())]
        self.decoder = nn.Sequential(*layers, nn.Linear(dec[-1], num_pixels))
        self.scale = scale

    def encode(self, x: torch.Tensor) -> tuple:
        h = self.encoder(x)
        raw = self.raw_scale(h)
        scale = torch.exp(0.5 * raw) if self.scale == "exp" else F.softplus(raw) + 1e-6
        return self.loc(h), scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, x: torch.Tensor, analytic_kl: bool) -> torch.Tensor:
        """-ELBO summed over the batch, one draw of z per image."""
        loc, scale = self.encode(x)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_px = -F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="none").sum(-1)
        if analytic_kl:
            kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)
        else:  # log q(z) - log p(z) at the sampled z
            kl = (0.5 * (z.pow(2) - eps.pow(2)) - scale.log()).sum(-1)
        return (kl - log_px).sum()


def train_hand(x: torch.Tensor, args, seed: int, kl: str, scale: str):
    torch.manual_seed(seed)
    net = HandVAE(x.shape[1], args.hidden, args.latent_dim, scale)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        for idx in torch.randperm(x.shape[0], generator=generator).split(args.batch_size):
            loss = net.loss(x[idx], kl == "analytic") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.encode, net.decode


def train_pvae(data: pvae.Dataset, args, seed: int, elbo):
    pvae.set_seed(seed)
    model = mlp_vae(data.num_pixels, args.latent_dim, tuple(args.hidden), "bernoulli", "elu")
    guide = mlp_guide(data.num_pixels, args.latent_dim, tuple(args.hidden), "elu")
    config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, eval_every=0,
                            progress=False, **({} if elbo is None else {"elbo": elbo}))
    pvae.fit(model, guide, data, config)
    return guide.encode, model.decoder, config.elbo


# ----------------------------------------------------------------------------- one evaluator for all


@torch.no_grad()
def evaluate(encode, decode, x: torch.Tensor, args, seed: int) -> dict:
    """test -ELBO (closed-form KL, reconstruction over ``elbo_samples`` draws) and the IWAE NLL."""
    g = torch.Generator().manual_seed(10_000 + seed)
    neg_elbo = []
    for xb in x.split(500):
        loc, scale = encode(xb)
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)
        eps = torch.randn((args.elbo_samples, *loc.shape), generator=g)
        logits = decode(loc + scale * eps)  # (S, B, P)
        recon = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1).mean(0)
        neg_elbo.append(kl - recon)
    nll = []
    for xb in x[: args.iwae_images].split(50):
        loc, scale = encode(xb)
        running = torch.full((xb.shape[0],), -math.inf)
        for start in range(0, args.iwae_samples, 100):
            k = min(100, args.iwae_samples - start)
            eps = torch.randn((k, *loc.shape), generator=g)
            z = loc + scale * eps
            logits = decode(z)
            log_px = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
            log_w = log_px - 0.5 * z.pow(2).sum(-1) + 0.5 * eps.pow(2).sum(-1) + scale.log().sum(-1)
            running = torch.logaddexp(running, log_w.logsumexp(0))
        nll.append(math.log(args.iwae_samples) - running)
    return {"test_neg_elbo": torch.cat(neg_elbo).mean().item(), "iwae_nll": torch.cat(nll).mean().item()}


def run_one(variant: str, seed: int, data: pvae.Dataset, args) -> dict:
    start = time.perf_counter()
    if variant.startswith("hand-"):
        _, kl, scale = variant.split("-")
        encode, decode = train_hand(data.train, args, seed, kl, scale)
        objective = f"{kl} KL, {scale} scales"
    else:
        elbo = {"pvae": None, "pvae-trace": "trace", "pvae-analytic": "analytic-kl"}[variant]
        encode, decode, objective = train_pvae(data, args, seed, elbo)
    seconds = time.perf_counter() - start
    return {"variant": variant, "seed": seed, "epochs": args.epochs, "train_size": data.train.shape[0],
            "objective": objective, "seconds": seconds, **evaluate(encode, decode, data.test, args, seed)}


def summarize(rows: list, variants) -> str:
    lines = ["| variant | seeds | test -ELBO | IWAE NLL (K = 1000, 500 images) |", "| --- | ---: | ---: | ---: |"]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        cells = []
        for key in ("test_neg_elbo", "iwae_nll"):
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else math.nan
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        lines.append(f"| {variant} | {len(mine)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def claim(out: Path, variant: str, seed: int, setting: dict) -> bool:
    """Whether this process takes the pair (variant, seed): a lock file beside ``out`` lets several
    processes share one study."""
    lock = out.with_name(f"{out.name}.{variant}.{seed}.{setting['epochs']}.{setting['train_size']}.lock")
    try:
        lock.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder = Path(args.data)
    if not folder.is_dir():
        sys.exit(f"learning_parity: no Fashion-MNIST folder at {folder} (apt-get install dataset-fashion-mnist, "
                 "or pass --data FOLDER)")
    data = pvae.load_dataset(str(folder), binarize="threshold", val_size=0)
    if args.train_size is not None:
        data = pvae.Dataset(data.name, data.image_shape, data.train[: args.train_size], data.val, data.test,
                            binarize=data.binarize)
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    setting = {"epochs": args.epochs, "train_size": data.train.shape[0]}
    done = {(r["variant"], r["seed"]) for r in rows if all(r.get(k) == v for k, v in setting.items())}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {data.train.shape[0]} training images, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, 784-{'-'.join(map(str, args.hidden))}-"
          f"{args.latent_dim} ELU")
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done or not claim(out, variant, seed, setting):
                continue  # done, or being run by another process of this study
            row = run_one(variant, seed, data, args)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if all(r.get(k) == v for k, v in setting.items()) and r["seed"] in args.seeds]
    print(summarize(rows, args.variants))
    return rows


if __name__ == "__main__":
    main()
