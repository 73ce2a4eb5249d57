"""Drawing: numbers and images in, one PNG (or GIF) out. Nothing here knows a model;
:mod:`pvae.figures` reads the models and calls these.

Images are flat rows ``(N, P)`` with an ``image_shape`` ``(C, H, W)``, shown in [0, 1]. Image grids
are drawn at an integer magnification that makes each image at least :data:`TILE_PX` pixels on its
longer side, with fixed margins, so that a figure's size in pixels follows from its grid: ``width =
left + columns * (W + pad) * scale + pad * scale + right``. Every function returns the path it wrote.
"""

import math
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 100
TILE_PX = 48  # each image is drawn at least this many pixels on its longer side
TITLE_PX = 44  # the band above a grid that holds its title
MARGIN_PX = 8
CHAR_PX = 7  # about one character of 10-point text, to size the margin of row labels
GIF_MS = 300  # each frame of an animation; the last one stays 5 times as long


# ----------------------------------------------------------------------------- image grids


def scale_for(image_shape) -> int:
    """The integer magnification of images of ``image_shape`` in a grid."""
    return max(1, math.ceil(TILE_PX / max(image_shape[1:])))


def tile(images, image_shape, ncol: int, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """``(N, P)`` images as one array, ``ncol`` to a row, ``pad`` pixels of ``fill`` around each:
    ``(H', W')`` for grey images, ``(H', W', C)`` for colour ones. Missing cells of the last row are
    ``fill``."""
    c, h, w = image_shape
    images = _numpy(images).reshape(-1, c, h, w).clip(0, 1)
    n = images.shape[0]
    nrow = max(1, -(-n // ncol))
    canvas = np.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), fill, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[:, top : top + h, left : left + w] = images[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def _image_figure(width: int, height: int, left: int, bottom: int, title: str = ""):
    """A figure of ``(left + width + MARGIN_PX) x (bottom + height + title band)`` pixels with one axes
    of exactly ``width x height`` pixels; returns ``(fig, ax)``."""
    top = TITLE_PX if title else MARGIN_PX
    fw, fh = left + width + MARGIN_PX, bottom + height + top
    fig = plt.figure(figsize=(fw / DPI, fh / DPI), dpi=DPI)
    ax = fig.add_axes((left / fw, bottom / fh, width / fw, height / fh))
    if title:
        fig.text(0.5, 1 - 4 / fh, _wrap(title, fw), ha="center", va="top", fontsize=10)
    return fig, ax


def _wrap(text: str, width_px: int) -> str:
    return "\n".join(textwrap.wrap(text, max(20, width_px // CHAR_PX))[:2])


def _show(ax, canvas: np.ndarray, extent=None) -> None:
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest", extent=extent, aspect="auto")


def save_grid(images, image_shape, path, nrow: int = 8, title: str = "") -> Path:
    """The images ``nrow`` to a row, under a title."""
    canvas = tile(images, image_shape, nrow)
    s = scale_for(image_shape)
    fig, ax = _image_figure(canvas.shape[1] * s, canvas.shape[0] * s, MARGIN_PX, MARGIN_PX, title)
    _show(ax, canvas)
    ax.set_axis_off()
    return save_figure(fig, path)


def image_rows(rows: Sequence, image_shape, path, ncol: int = 8, title: str = "") -> Path:
    """Labelled rows of images, e.g. ``[("data", x), ("reconstruction", r)]``: the rows are cut into
    blocks of ``ncol`` columns, and each block repeats every row, so an image stays above its
    counterparts; a gap of half an image separates the blocks.

    :param rows: ``(label, (N, P) images)`` pairs with the same N.
    """
    c, h, w = image_shape
    n = len(rows[0][1])
    ncol = min(ncol, n)
    blocks = -(-n // ncol)
    strips, centres, labels, gap = [], [], [], max(2, h // 2)
    y = 0
    for b in range(blocks):
        for label, images in rows:
            part = images[b * ncol : (b + 1) * ncol]
            strip = tile(part, image_shape, ncol)
            if b or strips:  # one pixel of padding is shared with the strip above
                strip = strip[1:]
            strips.append(strip)
            centres.append(y + strip.shape[0] / 2)
            labels.append(label)
            y += strip.shape[0]
        if b < blocks - 1:
            strips.append(np.ones((gap, *strips[-1].shape[1:]), dtype=np.float32))
            y += gap
    canvas = np.concatenate(strips)
    s = scale_for(image_shape)
    left = MARGIN_PX + CHAR_PX * max(len(label) for label, _ in rows) + 10
    fig, ax = _image_figure(canvas.shape[1] * s, canvas.shape[0] * s, left, MARGIN_PX, title)
    _show(ax, canvas, extent=(0, canvas.shape[1], canvas.shape[0], 0))
    ax.set_xticks([])
    ax.set_yticks(centres, labels)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return save_figure(fig, path)


def image_panels(panels: Sequence, image_shape, path, nrow: int, title: str = "") -> Path:
    """Grids side by side, each under its own title: ``[(title, (N, P) images), ...]``."""
    c, h, w = image_shape
    s = scale_for(image_shape)
    canvases = [tile(images, image_shape, nrow) for _, images in panels]
    width = max(x.shape[1] for x in canvases) * s
    height = max(x.shape[0] for x in canvases) * s
    gap, head = 16, 24
    top = TITLE_PX if title else MARGIN_PX
    fw = MARGIN_PX + len(panels) * (width + gap) - gap + MARGIN_PX
    fh = MARGIN_PX + height + head + top
    fig = plt.figure(figsize=(fw / DPI, fh / DPI), dpi=DPI)
    for i, ((label, _), canvas) in enumerate(zip(panels, canvases)):
        ax = fig.add_axes(((MARGIN_PX + i * (width + gap)) / fw, MARGIN_PX / fh,
                           canvas.shape[1] * s / fw, canvas.shape[0] * s / fh))
        _show(ax, canvas)
        ax.set_axis_off()
        ax.set_title(label, fontsize=10)
    if title:
        fig.text(0.5, 1 - 4 / fh, _wrap(title, fw), ha="center", va="top", fontsize=11)
    return save_figure(fig, path)


def image_sheet(images, image_shape, n: int, path, xs, ys, xticks, yticks, xlabel: str, ylabel: str,
                title: str = "", fill: float = 0.3) -> Path:
    """An ``n x n`` sheet of images, one dark-grey pixel (``fill``) between them, the image in row i and
    column j centred at ``(xs[j], ys[i])`` of labelled axes (the decoded manifold); rows go from the
    largest y at the top.

    :param images: ``(n * n, P)`` images, row by row from the top.
    :param xticks, yticks: ``(positions, labels)`` on the axes.
    """
    c, h, w = image_shape
    canvas = tile(images, image_shape, n, pad=1, fill=fill)
    s = scale_for(image_shape)
    # the first and last image centres sit (1 + size / 2) pixels from the canvas's edges, a step apart
    dx, dy = (xs[-1] - xs[0]) / (n - 1), (ys[-1] - ys[0]) / (n - 1)
    ex, ey = dx * (1 + w / 2) / (w + 1), dy * (1 + h / 2) / (h + 1)
    extent = (xs[0] - ex, xs[-1] + ex, ys[0] - ey, ys[-1] + ey)
    fig, ax = _image_figure(canvas.shape[1] * s, canvas.shape[0] * s, 84, 64, title)
    _show(ax, canvas, extent=extent)
    ax.set_xticks(*xticks)
    ax.set_yticks(*yticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the latent space


def _scatter(ax, codes: np.ndarray, labels, limit: Optional[float], names) -> list:
    """Codes ``(N, 2)`` as points coloured by class, with one legend entry per class; returns the
    ``(collection, rows)`` of each class, whose points an animation moves."""
    if labels is None:
        groups = [(None, np.arange(len(codes)))]
    else:
        labels = np.asarray(labels)
        groups = [(k, np.flatnonzero(labels == k)) for k in np.unique(labels)]
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    drawn = []
    for i, (k, rows) in enumerate(groups):
        colour = cmap(i % cmap.N) if k is not None else "tab:blue"
        drawn.append((ax.scatter(codes[rows, 0], codes[rows, 1], s=5, color=colour, alpha=0.8,
                                 label=None if k is None else str(k)), rows))
    if labels is not None:
        ax.legend(title="label", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small",
                  markerscale=3, frameon=False)
    if limit is not None:
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
    ax.set_aspect("equal", adjustable="box" if limit is not None else "datalim")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    return drawn


def latent_scatter(codes, labels, path, names=("z1", "z2"), title: str = "", limit: Optional[float] = None) -> Path:
    """2-D codes ``(N, 2)`` as a scatter coloured by label."""
    fig, ax = plt.subplots(figsize=(6, 5))
    _scatter(ax, _numpy(codes), None if labels is None else _numpy(labels).astype(int), limit, names)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def common_limit(frames: Sequence, floor: float = 3.0, quantile: float = 0.995) -> float:
    """A half-width for axes that hold every frame's codes: at least ``floor``, and wide enough for
    ``quantile`` of every frame's largest coordinate, rounded up to a half."""
    widest = max(float(np.quantile(np.abs(_numpy(f)).max(-1), quantile)) for f in frames)
    return max(floor, math.ceil(2 * widest) / 2)


def latent_animation(frames: Sequence, labels, path, names=("z1", "z2"), limit: Optional[float] = None) -> Path:
    """An animated GIF of 2-D codes, one frame per ``(title, (N, 2) codes)``, on the same axes
    throughout (:func:`common_limit` unless ``limit`` is given). One figure is drawn, and its points
    moved from frame to frame."""
    from PIL import Image

    limit = limit if limit is not None else common_limit([c for _, c in frames])
    labels = None if labels is None else _numpy(labels).astype(int)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=DPI)
    drawn = _scatter(ax, _numpy(frames[0][1]), labels, limit, names)
    title = ax.set_title(frames[0][0])
    fig.tight_layout()
    # the axes, legend and labels drawn once; each frame redraws the points and the title over them
    moving = [collection for collection, _ in drawn] + [title]
    for artist in moving:
        artist.set_animated(True)
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    images = []
    for text, codes in frames:
        codes = _numpy(codes)
        fig.canvas.restore_region(background)
        for collection, rows in drawn:
            collection.set_offsets(codes[rows])
        title.set_text(text)
        for artist in moving:
            ax.draw_artist(artist)
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).quantize(colors=64))
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [GIF_MS] * (len(images) - 1) + [5 * GIF_MS]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
    return path


# ----------------------------------------------------------------------------- curves and charts


def plot_curves(histories: dict, path, keys: Sequence = ("train_elbo", "test_elbo"), title: str = "") -> Path:
    """The ELBO per epoch and against training seconds, one colour per run (``{label: history}``), one
    line style per key: training rows dashed, test data solid."""
    styles = {"train": "--", "test": "-", "val": ":"}
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (label, history) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        for key in keys:
            rows = [r for r in history if r.get(key) is not None]
            if not rows:
                continue
            split = key.split("_")[0]
            name = f"{label}: {split}" if len(histories) > 1 else split
            style = styles.get(split, "-")
            by_epoch.plot([r["epoch"] for r in rows], [r[key] for r in rows], style, color=colour, label=name)
            by_time.plot([r["elapsed"] for r in rows], [r[key] for r in rows], style, color=colour)
    metric = keys[0].split("_", 1)[-1].upper() if keys else ""
    by_epoch.set_xlabel("epoch")
    by_epoch.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    by_time.set_xlabel("training seconds")
    by_epoch.set_ylabel(f"{metric} (nats per datapoint, higher is better)")
    by_epoch.legend(fontsize="small")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{metric} per epoch: training rows dashed, test data solid")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_khat_vs_gap(gap, khat, path, title: str = "") -> Path:
    """Per datapoint, the PSIS k̂ against the gap log p̂(x) − ELBO, with the thresholds 0.5 and 0.7."""
    gap, khat = _numpy(gap).astype(np.float64), _numpy(khat).astype(np.float64)
    fitted = np.isfinite(khat) & np.isfinite(gap)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(gap[fitted], khat[fitted], s=10, alpha=0.6, color="tab:blue")
    for t, colour, text in ((0.5, "tab:orange", "0.5: infinite variance above"),
                            (0.7, "tab:red", "0.7: unreliable above")):
        ax.axhline(t, color=colour, ls="--", lw=1)
        ax.text(1.0, t, f" {text}", transform=ax.get_yaxis_transform(), va="center", fontsize="small", color=colour)
    ax.set_xlabel("log p̂(x) − ELBO  (nats): the datapoint's inference gap")
    ax.set_ylabel("PSIS k̂ of the importance ratios")
    share = float((khat[fitted] > 0.7).mean()) if fitted.any() else math.nan
    note = f"{fitted.sum()} datapoints, {share:.0%} with k̂ > 0.7"
    if (~fitted).any():
        note += f"; {int((~fitted).sum())} without a k̂"
    ax.set_title(title + ("\n" if title else "") + note)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_kl_per_dim(names, kl, kl_se, activity, threshold: float, path, title: str = "") -> Path:
    """Per latent dimension, the KL (bars, with standard errors) and Cov_x(E_q[z_d]) (points): the
    active units, above ``threshold``, in colour; the collapsed ones grey."""
    kl, kl_se, activity = (_numpy(v).astype(np.float64) for v in (kl, kl_se, activity))
    active = activity > threshold
    pos = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(names) + 2), 5.5), sharex=True)
    colours = np.where(active, "tab:blue", "tab:gray")
    top.bar(pos, np.nan_to_num(kl), yerr=np.nan_to_num(kl_se), color=colours, capsize=2)
    top.set_ylabel("KL(q(z_d|x) ‖ p(z_d))\n(nats, mean over x)")
    floor = min(threshold / 100, np.nanmin(np.where(activity > 0, activity, np.inf), initial=threshold) / 2)
    bottom.bar(pos, np.clip(np.nan_to_num(activity), floor, None) - floor, bottom=floor, color=colours)
    bottom.axhline(threshold, color="tab:red", ls="--", lw=1)
    bottom.set_yscale("log")
    bottom.set_ylabel("Cov_x(E_q[z_d])")
    bottom.set_xticks(pos, names, rotation=90 if len(names) > 12 else 0, fontsize="small")
    top.set_title(title + ("\n" if title else "") +
                  f"{int(active.sum())} of {len(names)} units active (Cov_x(E_q[z_d]) > {threshold}); grey: collapsed")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_comparison(comparison, path, reference=None) -> Path:
    """A bar chart of a :class:`~pvae.compare.Comparison`: each q's gap to log p̂(x), and the two gaps,
    beside a paper's (``reference``) only where the run's setting is theirs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    c = comparison
    bars = [("q*", c.approximation_gap)]
    bars += [(f"q_K\nK={k}", c.gap_q_k[k]) for k in sorted(c.gap_q_k, reverse=True)]
    if c.inference_gap is not None:
        bars.append(("q\n(encoder)", c.inference_gap))
    left.bar(range(len(bars)), [b.mean for _, b in bars], yerr=[_se(b) for _, b in bars], capsize=4, color="tab:blue")
    left.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize="small")
    left.set_ylabel("log p̂(x) − L[q]  (nats)")
    left.set_title("inference gap of each q")
    gaps = [("approximation", c.approximation_gap, "approximation_gap"),
            ("amortization", c.amortization_gap, "amortization_gap")]
    gaps = [g for g in gaps if g[1] is not None]
    pos = np.arange(len(gaps), dtype=np.float64)
    width = 0.4 if reference else 0.6
    right.bar(pos - (0.2 if reference else 0), [g[1].mean for g in gaps], width, yerr=[_se(g[1]) for g in gaps],
              capsize=4, label="ours")
    if reference:
        right.bar(pos + 0.2, [reference.get(g[2], 0.0) for g in gaps], width, hatch="//", color="white",
                  edgecolor="tab:gray", label="Cremer et al. 2018")
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    right.set_xticks(pos.tolist(), [g[0] + "\ngap" for g in gaps], fontsize="small")
    right.set_ylabel("nats")
    right.set_title(f"gaps, {c.datapoints} datapoints")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


def _se(estimate) -> float:
    return estimate.se if math.isfinite(estimate.se) else 0.0


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as it is laid out, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
