"""Pictures of a fitted VAE: image grids, the latent space, the decoded manifold, training curves.

Models drawn here expose ``latent_dim`` and ``decode(z)`` (the likelihood's mean image); amortized
guides expose ``encode(x) -> (loc, scale)``. Every function writes one PNG and returns its path.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def image_grid(images: torch.Tensor, image_shape, nrow: int) -> torch.Tensor:
    """``(N, P)`` flat images -> one ``(H', W')`` (grey) or ``(H', W', C)`` array, one pixel of border."""
    c, h, w = image_shape
    n = images.shape[0]
    ncol = nrow
    nrows = -(-n // ncol)
    canvas = images.new_ones(c, nrows * (h + 1) + 1, ncol * (w + 1) + 1)
    imgs = images.detach().float().clamp(0, 1).reshape(n, c, h, w)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = imgs[i]
    canvas = canvas.cpu()
    return canvas[0] if c == 1 else canvas.permute(1, 2, 0)


def save_grid(images: torch.Tensor, image_shape, path, nrow: int = 8, title: str = "") -> Path:
    grid = image_grid(images, image_shape, nrow)
    fig, ax = plt.subplots(figsize=(max(3, grid.shape[1] / 25), max(3, grid.shape[0] / 25)))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, path)


@torch.no_grad()
def plot_reconstructions(model, guide, x: torch.Tensor, image_shape, path, n: int = 8) -> Path:
    """Originals (top row) and the decoded means of q(z|x) (bottom row)."""
    x = x[:n]
    loc, _ = guide.encode(x)
    recon = model.decode(loc)
    return save_grid(torch.cat([x, recon]), image_shape, path, nrow=x.shape[0], title="data (top), reconstructions")


@torch.no_grad()
def plot_samples(model, path, image_shape, n: int = 64, device="cpu", generator=None) -> Path:
    """Decoded means of ``n`` draws from the prior N(0, I)."""
    z = torch.randn(n, model.latent_dim, generator=generator).to(device)
    nrow = int(n**0.5) or 1
    return save_grid(model.decode(z), image_shape, path, nrow=nrow, title="samples from the prior")


@torch.no_grad()
def plot_latent(guide, x: torch.Tensor, labels, path, title: str = "") -> Path:
    """The means of q(z|x), coloured by label; projected on their two principal axes when D > 2."""
    loc, _ = guide.encode(x)
    loc = loc.cpu()
    axes_names = ("z1", "z2")
    if loc.shape[1] > 2:
        centred = loc - loc.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        loc = centred @ v[:2].T
        axes_names = ("principal axis 1", "principal axis 2")
    elif loc.shape[1] == 1:
        loc = torch.cat([loc, torch.zeros_like(loc)], 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if labels is None:  # unlabelled data (Frey faces): one colour
        ax.scatter(loc[:, 0], loc[:, 1], s=4)
    else:
        points = ax.scatter(loc[:, 0], loc[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=4)
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(axes_names[0])
    ax.set_ylabel(axes_names[1])
    ax.set_title(title or "posterior means E_q[z | x]")
    return _save(fig, path)


@torch.no_grad()
def plot_manifold(model, image_shape, path, n: int = 15, limit: float = 3.0, device="cpu") -> Path:
    """Decoded means over a regular grid of a 2-D latent space, ``[-limit, limit]^2``."""
    if model.latent_dim != 2:
        raise ValueError(f"the manifold is drawn for 2-D latent spaces, not {model.latent_dim}-D")
    ticks = torch.linspace(-limit, limit, n)
    z2, z1 = torch.meshgrid(ticks.flip(0), ticks, indexing="ij")  # rows: z2 from top to bottom
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], 1).to(device)
    return save_grid(model.decode(z), image_shape, path, nrow=n, title=f"decoded z over [-{limit:g}, {limit:g}]^2")


def plot_curves(histories: dict, path, key: str = "test_elbo") -> Path:
    """ELBO against epoch and against training seconds, one line per run: ``{label: history}``."""
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, history in histories.items():
        rows = [r for r in history if key in r]
        if not rows:
            continue
        by_epoch.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=label)
        by_time.plot([r["elapsed"] for r in rows], [r[key] for r in rows], label=label)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training seconds")
    by_epoch.set_ylabel(key.replace("_", " ") + " (nats per datapoint)")
    by_epoch.legend()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(comparison, path, reference=None) -> Path:
    """A bar chart of a :class:`~pvae.compare.Comparison`: each q's gap to log p̂(x), and the two gaps,
    beside a paper's (``reference``) only where the run's setting is theirs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    c = comparison
    bars = [("q*", c.approximation_gap)]
    bars += [(f"q_K\nK={k}", c.gap_q_k[k]) for k in sorted(c.gap_q_k, reverse=True)]
    if c.inference_gap is not None:
        bars.append(("q\n(encoder)", c.inference_gap))
    left.bar(range(len(bars)), [b.mean for _, b in bars], yerr=[_se(b) for _, b in bars], capsize=4, color="tab:blue")
    left.set_xticks(range(len(bars)), [label for label, _ in bars])
    left.set_ylabel("log p̂(x) − L[q]  (nats)")
    left.set_title("inference gap of each q")
    gaps = [("approximation", c.approximation_gap, "approximation_gap"),
            ("amortization", c.amortization_gap, "amortization_gap")]
    gaps = [g for g in gaps if g[1] is not None]
    pos = torch.arange(len(gaps), dtype=torch.float64)
    width = 0.4 if reference else 0.6
    right.bar(pos - (0.2 if reference else 0), [g[1].mean for g in gaps], width, yerr=[_se(g[1]) for g in gaps],
              capsize=4, label="ours")
    if reference:
        right.bar(pos + 0.2, [reference.get(g[2], 0.0) for g in gaps], width, hatch="//", color="white",
                  edgecolor="tab:gray", label="Cremer et al. 2018")
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small")
    right.set_xticks(pos.tolist(), [g[0] + " gap" for g in gaps])
    right.set_ylabel("nats")
    right.set_title(f"gaps, {c.datapoints} datapoints")
    return _save(fig, path)


def _se(estimate) -> float:
    import math

    return estimate.se if math.isfinite(estimate.se) else 0.0
