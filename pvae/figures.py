"""The pictures people learn VAEs from, for any model/guide pair, and the registry ``pvae plot`` draws
from.

Each figure is a function of ``(model, guide, data, path)`` (``data`` a :class:`~pvae.data.Dataset`)
that reads the programs through :class:`~pvae.codec.ProgramCodec`, so a model of your own gets every
figure that applies to it: any model whose observed site has a mean gets reconstructions and prior
samples (image data), any model whose continuous local latents are two numbers per datapoint the
latent scatter, its animation during training and the decoded manifold.

- :func:`reconstructions`: test images above their reconstructions, E[x | z = the guide's centre].
- :func:`prior_samples`: E[x | z] for z drawn from the model's own prior; :func:`samples_by_run` puts
  the samples of several runs side by side (latent sizes 2, 5, 10, 20).
- :func:`latent_space`: the codes of the test set coloured by label; :class:`LatentSnapshots` records
  them during training and :func:`latent_animation` makes the GIF, with the same axes throughout.
- :func:`manifold`: E[x | z] over a grid of z in [-3, 3]², or over the unit square through the
  prior's quantile function (``quantiles=True``: Kingma & Welling 2013, figure 4).
- :func:`interpolation`: decoded codes on the line between the codes of two test images, one row per
  model (an autoencoder's and PCA's rows plug in through ``others``, any :class:`~pvae.protocols.Codec`).
- Coders side by side, any :class:`~pvae.protocols.Codec` (PCA, autoencoders, VAEs):
  :func:`coder_reconstructions` (PCA against the autoencoder and the VAE at latent sizes 2, 8, 32),
  :func:`generation_failures` (an autoencoder's codes perturbed by N(0, 0.5²I) and N(0, I) noise, and
  drawn from the Gaussian fitted to its training codes) and :func:`denoising` (corrupted images and
  what denoising autoencoders make of them).
- :func:`training_curves`: train and test ELBO per epoch and per second, several runs on one axis.
- :func:`posterior_densities`: q(z | x) of a few datapoints under the run's guide, the encoder's q
  refined by K gradient steps (semi-amortized), the optimal mean-field q* and, where the model has
  one (:class:`~pvae.protocols.ExactPosterior`), the exact posterior, through arviz.
- :func:`psis_vs_gap` and :func:`kl_per_dimension`: per-datapoint PSIS k̂ against the gap
  log p̂(x) − ELBO, and the KL per latent dimension (posterior collapse), from an
  :class:`~pvae.evaluate.Evaluation`.

:data:`FIGURES` names them for the command line (``pvae plot RUN --what NAME``), with the file each
writes into a run folder and what it needs; :func:`draw_figures` draws those that apply.

References:

1. Kingma & Welling, *Auto-Encoding Variational Bayes*, arXiv 1312.6114.
2. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
3. Yao, Vehtari, Simpson & Gelman, *Yes, but Did It Work?: Evaluating Variational Inference*,
   arXiv 1802.02538.
"""

import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import plots
from .codec import ProgramCodec
from .data import Dataset
from .programs import ProgramError
from .protocols import ExactPosterior, LocalEncoder, Refining, has_q_for
from .train import Callback, FitState
from .utils import atomic_write

QUICK_EVALUATION = {"num_samples": 100, "max_datapoints": 500}  # when a run folder holds no evaluation
SNAPSHOTS = "latent-epochs.npz"


def default_split(guide, data: Dataset) -> str:
    """The split figures show: test, unless the guide has a q for the training rows only (mean-field)."""
    return "test" if data.test.shape[0] and has_q_for(guide, "test") else "train"


def shown(guide, data: Dataset, split: Optional[str] = None, seed: int = 0) -> tuple:
    """``(data, split)`` as figures show them: ``split`` by default :func:`default_split`, and dynamically
    binarized training images (grey levels, drawn anew at each use) as one seeded binary draw, the
    kind of image the guide was trained on."""
    split = split or default_split(guide, data)
    if split == "train" and data.binarize == "dynamic":
        g = torch.Generator(device=data.train.device).manual_seed(seed)
        data = replace(data, train=torch.bernoulli(data.train, generator=g), binarize="static")
    return data, split


def codec_for(model, guide, data: Dataset, split: Optional[str] = None, rows: int = 64) -> ProgramCodec:
    """A :class:`~pvae.codec.ProgramCodec` whose context is the first ``rows`` rows of ``split``."""
    data, split = shown(guide, data, split)
    return ProgramCodec(model, guide, data.batch(split, slice(0, rows)))


def _image_shape(data: Dataset) -> tuple:
    if data.image_shape is None:
        raise ValueError(f"the data set {data.name!r} holds no images (no image_shape): there is nothing to draw")
    return data.image_shape


# ----------------------------------------------------------------------------- images


@torch.no_grad()
def reconstructions(model, guide, data: Dataset, path, n: int = 16, ncol: int = 8, split: Optional[str] = None,
                    codec: Optional[ProgramCodec] = None) -> Path:
    """The first ``n`` images of ``split`` above their reconstructions, E[x | z] with every latent
    site at the guide's centre for x, ``ncol`` to a row."""
    data, split = shown(guide, data, split)
    codec = codec or codec_for(model, guide, data, split)
    batch = data.batch(split, slice(0, n))
    recon = codec.reconstruct(batch)
    title = f"{data.name}, {split} split: images above their reconstructions, E[x | z] at the centre of q(z|x)"
    return plots.image_rows([("data", batch.x), ("reconstruction", recon)], _image_shape(data), path, ncol, title)


@torch.no_grad()
def prior_samples(model, guide, data: Dataset, path, n: int = 100, seed: int = 0, draw: bool = False,
                  title: Optional[str] = None, codec: Optional[ProgramCodec] = None) -> Path:
    """``n`` samples from the model's prior: E[x | z] (or, with ``draw``, x itself) for z drawn from
    p(z) by the model, global sites at the guide's centre; seeded by ``seed``."""
    codec = codec or codec_for(model, guide, data)
    images = _seeded_samples(codec, data, n, seed, draw)
    what = "draws x ~ p(x | z)" if draw else "E[x | z]"
    title = title or f"{n} samples from the prior: {what}, z ~ p(z) ({codec.latent_dim}-D continuous code)"
    return plots.save_grid(images, _image_shape(data), path, nrow=max(1, round(math.sqrt(n))), title=title)


@torch.no_grad()
def _seeded_samples(codec: ProgramCodec, data: Dataset, n: int, seed: int, draw: bool = False) -> torch.Tensor:
    """``codec.sample(n)`` from the seed ``seed``, torch's random state restored after."""
    with torch.random.fork_rng(devices=_cuda_devices(data)):
        torch.manual_seed(seed)
        return codec.sample(n, draw=draw)


def samples_by_run(runs, path, n: int = 100, seed: int = 0) -> Path:
    """Prior samples of several runs side by side, each panel titled by its label and latent size
    (Kingma & Welling 2013 show latent sizes 2, 5, 10 and 20).

    :param runs: ``(label, model, guide, data)`` for each run, in order; an iterator is consumed one run
        at a time, so that runs can be loaded as they are drawn (loading a run resets Pyro's param store).
    """
    panels, shape = [], None
    for label, model, guide, data in runs:
        codec = codec_for(model, guide, data)
        panels.append((f"{label}: {codec.latent_dim}-D code", _seeded_samples(codec, data, n, seed)))
        if shape is not None and data.image_shape != shape:
            raise ValueError(f"the runs' images differ in shape ({shape} and {data.image_shape}): one panel needs one shape")
        shape = _image_shape(data)
    if not panels:
        raise ValueError("no runs to draw")
    return plots.image_panels(panels, shape, path, nrow=max(1, round(math.sqrt(n))),
                              title=f"{n} samples from the prior of each run: E[x | z], z ~ p(z)")


@torch.no_grad()
def interpolation(model, guide, data: Dataset, path, pair: Sequence = (0, 1), steps: int = 10,
                  split: Optional[str] = None, others: Optional[dict] = None, label: str = "VAE") -> Path:
    """The decoded codes on the straight line between the codes of two images, ``steps`` points with
    both ends, one row per model: this model's (codes in unconstrained space) and one per entry of
    ``others``, ``{label: Codec}`` (an autoencoder, PCA), which get the same two images."""
    data, split = shown(guide, data, split)
    codec = codec_for(model, guide, data, split)
    batch = data.batch(split, torch.as_tensor(list(pair), device=data.split(split)[0].device))
    t = torch.linspace(0, 1, steps, device=batch.x.device)[:, None]

    def line(ends):  # (2, D) -> (steps, D)
        return (1 - t) * ends[0] + t * ends[1]

    # the model's row with the side inputs (a conditional model's label) of the first image
    rows = [(label, codec.decode(line(codec.encode(batch)), batch.rows(slice(0, 1))))]
    rows += [(name, other.decode(line(other.encode(batch.x)))) for name, other in (others or {}).items()]
    images = [("data", torch.cat([batch.x[:1], batch.x.new_ones(steps - 2, batch.x.shape[1]), batch.x[1:]]))]
    title = (f"from {split} image {pair[0]} to {pair[1]}: E[x | z] on the line between their codes "
             f"(data at both ends)")
    return plots.image_rows(images + rows, _image_shape(data), path, ncol=steps, title=title)


# ----------------------------------------------------------------------------- coders side by side
# Figures of several fitted coders at once (PCA, autoencoders, VAEs, denoising autoencoders: anything
# with the Codec interface), each row labelled; examples/autoencoders.py draws them.


def _first_rows(data: Dataset, split: str, n: int) -> torch.Tensor:
    x = data.split(split)[0]
    if x.shape[0] < n:
        raise ValueError(f"the {split} split of {data.name} has {x.shape[0]} datapoints, fewer than the {n} to draw")
    return x[:n].reshape(n, -1)


def coder_reconstruction_rows(coders: dict, x: torch.Tensor) -> list:
    """``[("data", x), (label, coder.reconstruct(x)), ...]`` for ``coders`` ``{label: Codec}``, in their order."""
    return [("data", x)] + [(label, coder.reconstruct(x)) for label, coder in coders.items()]


@torch.no_grad()
def coder_reconstructions(coders: dict, data: Dataset, path, n: int = 12, split: str = "test",
                          title: Optional[str] = None) -> Path:
    """The first ``n`` images of ``split`` above their reconstructions by each coder, one row per entry of
    ``coders`` ``{label: Codec}`` in its order: PCA against the autoencoder and the VAE at latent sizes
    2, 8 and 32 (:func:`pvae.autoencoding.reconstruction_errors` fits them)."""
    rows = coder_reconstruction_rows(coders, _first_rows(data, split, n))
    title = title or f"{data.name}, {split} split: the same images reconstructed by each coder, g(f(x))"
    return plots.image_rows(rows, _image_shape(data), path, ncol=n, title=title)


def code_space_rows(coders: dict, x: torch.Tensor, train: torch.Tensor, scales: Sequence = (0.5, 1.0),
                    seed: int = 0) -> list:
    """The rows of :func:`generation_failures`: ``x``, then for each coder its reconstructions, the codes
    of ``x`` plus N(0, s² I) for each s of ``scales`` (:func:`~pvae.autoencoding.perturbed_codes`) and as
    many codes drawn from the Gaussian fitted to the codes of ``train``
    (:func:`~pvae.autoencoding.sample_code_space`), decoded; one generator seeded by ``seed`` draws them
    all, in that order."""
    from .autoencoding import perturbed_codes, sample_code_space

    g = torch.Generator(device=x.device).manual_seed(seed)
    rows = [("data", x)]
    for label, coder in coders.items():
        rows.append((f"{label}: g(f(x))", coder.reconstruct(x)))
        rows += [(f"{label}: z + N(0, {s:g}²I)", perturbed_codes(coder, x, s, g).images) for s in scales]
        rows.append((f"{label}: z ~ N(μ̂, Σ̂)", sample_code_space(coder, train, len(x), g).images))
    return rows


@torch.no_grad()
def generation_failures(coders: dict, data: Dataset, path, n: int = 8, scales: Sequence = (0.5, 1.0),
                        seed: int = 0, split: str = "test") -> Path:
    """Why an autoencoder is no generative model: for each coder of ``coders`` ``{label: Codec}`` (the
    autoencoders of latent sizes 8, 16 and 32), the first ``n`` images of ``split`` reconstructed, their
    codes perturbed by N(0, s² I) noise for each s of ``scales`` and decoded, and ``n`` codes drawn from
    the diagonal Gaussian fitted to the codes of the training images, decoded (:func:`code_space_rows`)."""
    rows = code_space_rows(coders, _first_rows(data, split, n), data.train.reshape(len(data.train), -1), scales, seed)
    noise = " and ".join(f"N(0, {s:g}²I)" for s in scales)
    title = (f"{data.name}: codes z = f(x) of {split} images plus {noise} noise, and z drawn from the Gaussian "
             "fitted to the training codes, decoded by g")
    return plots.image_rows(rows, _image_shape(data), path, ncol=n, title=title)


def denoising_rows(denoisers: dict, x: torch.Tensor, plain=None, seed: int = 0) -> list:
    """The rows of :func:`denoising`: ``x``, then for each ``{label: (corruption, Codec)}`` the corrupted
    x (labelled ``label``), drawn by a generator seeded by ``seed + i`` for the i-th corruption (as
    :func:`~pvae.autoencoding.denoising_errors` seeds them), its reconstruction by the denoiser and, with a
    ``plain`` coder, by that one."""
    rows = [("data", x)]
    for i, (label, (corruption, coder)) in enumerate(denoisers.items()):
        corrupted = corruption(x, torch.Generator(device=x.device).manual_seed(seed + i))
        rows += [(label, corrupted), ("denoised by its DAE", coder.reconstruct(corrupted))]
        if plain is not None:
            rows.append(("by the plain AE", plain.reconstruct(corrupted)))
    return rows


@torch.no_grad()
def denoising(denoisers: dict, data: Dataset, path, plain=None, n: int = 8, seed: int = 0, split: str = "test") -> Path:
    """The first ``n`` images of ``split``; for each ``{label: (corruption, Codec)}`` (masking with p = 0.5
    and 0.9, Gaussian noise; each coder a denoising autoencoder trained with its corruption), the
    corrupted images and what the denoiser makes of them, and what a ``plain`` autoencoder makes of
    them where one is given (:func:`denoising_rows`). Corrupted values outside [0, 1] are drawn clipped."""
    rows = denoising_rows(denoisers, _first_rows(data, split, n), plain, seed)
    title = f"{data.name}, {split} split: corrupted images restored by denoising autoencoders, h(x̃) ≈ x"
    return plots.image_rows(rows, _image_shape(data), path, ncol=n, title=title)


# ----------------------------------------------------------------------------- the latent space


def _two_dims(codec: ProgramCodec) -> None:
    if codec.latent_dim != 2:
        raise ValueError(f"the model's continuous local code has {codec.latent_dim} numbers per datapoint, not 2")


@torch.no_grad()
def latent_space(model, guide, data: Dataset, path, split: Optional[str] = None, limit: Optional[float] = None,
                 codec: Optional[ProgramCodec] = None) -> Path:
    """The codes of every datapoint of ``split`` (the centres of q(z | x)) coloured by label, for a
    2-D code."""
    data, split = shown(guide, data, split)
    codec = codec or codec_for(model, guide, data, split)
    _two_dims(codec)
    codes = codec.encode(data.batch(split))
    return plots.latent_scatter(codes, data.split(split)[1], path, codec.latent_names, limit=limit,
                                title=f"{data.name}, {split} split: centres of q(z | x), {len(codes)} datapoints")


def snapshot_epochs(epochs: int, frames: int = 20) -> set:
    """The epochs whose codes :class:`LatentSnapshots` records: 0 (before training) to 10, where the
    blob around 0 organises itself, and about ``frames`` more spread over the rest."""
    return set(range(min(epochs, 10) + 1)) | {round(k * epochs / frames) for k in range(frames + 1)}


class LatentSnapshots(Callback):
    """Records the 2-D codes of a split during training (at :func:`snapshot_epochs`, epoch 0 before
    the first step) in ``folder/latent-epochs.npz``, and at the end of the fit draws them as
    ``folder/latent-training.gif``. It does nothing for a model whose code is not 2-D.

    A resumed fit goes on from the snapshots in the folder. The codes are taken with torch's random
    state set aside, so recording them does not change the fit.

    :param split: the split to encode; default :func:`default_split`.
    """

    def __init__(self, folder, split: Optional[str] = None):
        self.folder, self.split = Path(folder), split
        self.frames, self.codec, self.initial = {}, None, None

    def on_fit_start(self, state: FitState) -> None:
        self.epochs = state.config.epochs
        if not state.world.is_main or (state.shard is not None and state.shard.by_row):
            return  # rank 0 records; a rank holds only its own rows of a mean-field guide
        self.data, self.split = shown(state.guide.fn, state.data, self.split)
        with torch.random.fork_rng(devices=_cuda_devices(self.data)):  # tracing the programs draws
            codec = codec_for(state.model, state.guide, self.data, self.split)
        if codec.latent_dim != 2:
            return
        self.codec, self.batch = codec, self.data.batch(self.split)
        self.initial = self._codes()  # epoch 0, kept if this fit is not a resumed one

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        if self.codec is None:
            return
        epoch = record["epoch"]
        if self.initial is not None:  # the first epoch of this fit tells whether it resumed
            if epoch == 1:
                self.frames[0] = self.initial
            elif (self.folder / SNAPSHOTS).is_file():
                self.frames = load_snapshots(self.folder)["frames"]
            self.initial = None
        if epoch in snapshot_epochs(self.epochs) or epoch == self.epochs:
            self.frames[epoch] = self._codes()
            self._write()

    def on_fit_end(self, state: FitState) -> None:
        if self.frames:
            latent_animation(self.folder, self.folder / FIGURES["latent-training"].file)

    def _codes(self) -> np.ndarray:
        with torch.random.fork_rng(devices=_cuda_devices(self.data)), torch.no_grad():
            return self.codec.encode(self.batch).cpu().numpy()

    def _write(self) -> None:
        epochs = sorted(self.frames)
        labels = self.data.split(self.split)[1]
        arrays = {"epochs": np.array(epochs), "codes": np.stack([self.frames[e] for e in epochs]),
                  "names": np.array(self.codec.latent_names), "split": np.array(self.split)}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(self.folder / SNAPSHOTS, write)


def load_snapshots(folder) -> dict:
    """What :class:`LatentSnapshots` recorded: ``{"frames": {epoch: (N, 2)}, "labels", "names", "split"}``."""
    with np.load(Path(folder) / SNAPSHOTS) as f:
        return {"frames": dict(zip(f["epochs"].tolist(), f["codes"])),
                "labels": f["labels"] if "labels" in f else None,
                "names": f["names"].tolist(), "split": str(f["split"])}


def latent_animation(folder, path) -> Path:
    """The GIF of the codes :class:`LatentSnapshots` recorded in ``folder``, one frame per snapshot."""
    saved = load_snapshots(folder)
    frames = [(f"{saved['split']} codes after epoch {e}" if e else "codes before training (epoch 0)", codes)
              for e, codes in sorted(saved["frames"].items())]
    return plots.latent_animation(frames, saved["labels"], path, saved["names"])


@torch.no_grad()
def manifold(model, guide, data: Dataset, path, n: int = 15, limit: float = 3.0, quantiles: bool = False,
             codec: Optional[ProgramCodec] = None) -> Path:
    """E[x | z] over an ``n x n`` grid of a 2-D code: z in ``[-limit, limit]²``, or (``quantiles``)
    linearly spaced points u of the unit square mapped through the prior's quantile function,
    z = F⁻¹(u) (Φ⁻¹ for N(0, I); Kingma & Welling 2013, figure 4). The code is one latent site whose
    prior factorizes into univariate distributions with a quantile function, for ``quantiles``."""
    codec = codec or codec_for(model, guide, data)
    _two_dims(codec)
    if quantiles:
        icdf = _prior_quantiles(codec)
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        z = icdf(u).double().cpu()
        zs, axes = [z[:, 0], z[:, 1]], [u.numpy(), u.numpy()]
        positions = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
        at = icdf(torch.as_tensor(positions)).double().cpu()
        ticks = [(positions, [f"{p:.1f}\n{at[i, d]:+.2f}" for i, p in enumerate(positions)]) for d in range(2)]
        names = [f"quantile u, {name} = F⁻¹(u) below" for name in codec.latent_names]
        what = "linearly spaced quantiles u of the prior, z = F⁻¹(u)"
    else:
        grid = torch.linspace(-limit, limit, n, dtype=torch.float64)
        zs, axes = [grid, grid], [grid.numpy(), grid.numpy()]
        positions = np.arange(-math.floor(limit), math.floor(limit) + 1)
        ticks = [(positions, [f"{p:g}" for p in positions])] * 2
        names = list(codec.latent_names)
        what = f"z on a grid over [-{limit:g}, {limit:g}]²"
    z2, z1 = torch.meshgrid(zs[1].flip(0), zs[0], indexing="ij")  # rows: the largest z2 at the top
    # every image with the side inputs of one datapoint (a conditional model's label), the context's first
    images = codec.decode(torch.stack([z1.reshape(-1), z2.reshape(-1)], 1).float(), codec.context.rows(slice(0, 1)))
    return plots.image_sheet(images, _image_shape(data), n, path, axes[0], axes[1], ticks[0], ticks[1],
                             names[0], names[1], title=f"{data.name}: E[x | z], {what}")


def _prior_quantiles(codec: ProgramCodec) -> Callable:
    """``icdf(u) -> (n, 2)``: for quantiles u ``(n,)``, the code of the prior's quantile u in each
    dimension, read from one run of the model (its first context row). The code must be one latent site
    whose prior factorizes into univariate distributions with a quantile function."""
    from pyro import poutine

    from .programs import base_distribution, run_traced

    if len(codec.sites) != 1:
        raise ValueError(f"the 2-D code spans the sites {', '.join(s.name for s in codec.sites)}: the quantile grid "
                         "inverts the prior of one site")
    site = codec.sites[0]
    rows = codec.context.rows(slice(0, 1))
    with torch.no_grad(), poutine.block():
        trace = run_traced(poutine.condition(codec.model, data=codec.global_values), rows, "model")
    prior = base_distribution(trace.nodes[site.name]["fn"])
    if prior.event_shape != ():
        raise ValueError(f"the prior of {site.name!r} does not factorize into univariate distributions")

    @torch.no_grad()
    def icdf(u: torch.Tensor) -> torch.Tensor:
        u = u.to(rows.x.device, rows.x.dtype).reshape(-1, *[1] * len(prior.batch_shape))
        values = prior.icdf(u.expand(-1, *prior.batch_shape))  # (n, *batch shape): one value per u
        return torch.cat([codec.flatten(site, v) for v in values])  # (n, 2)

    try:
        icdf(torch.tensor([0.5]))
    except NotImplementedError:
        raise ValueError(f"the prior of {site.name!r} ({type(prior).__name__}) has no quantile function") from None
    return icdf


# ----------------------------------------------------------------------------- curves and posteriors


def training_curves(histories: dict, path, title: str = "") -> Path:
    """The ELBO on training rows and on test data per epoch and per training second, ``{label: history}``
    (a run's ``metrics.jsonl`` records); several runs share the axes."""
    return plots.plot_curves(histories, path, ("train_elbo", "test_elbo"), title)


def posterior_densities(model, guide, data: Dataset, path, datapoints: int = 3, dims: int = 2,
                        split: Optional[str] = None, num_samples: int = 2000, refine_steps: int = 20,
                        refine_lr: float = 0.05, q_star_steps: int = 150, q_star_particles: int = 32) -> Path:
    """The marginal densities of the first ``dims`` code dimensions of the first ``datapoints`` of
    ``split``, under: the run's guide q; the encoder's q refined by ``refine_steps`` gradient steps
    (q_K, semi-amortized; for a guide with an encoder) or, for a semi-amortized guide, its encoder's
    q before refinement; the best mean-field Gaussian q* (optimized for each datapoint on the frozen
    model by :func:`pvae.compare.optimize_local`, from the encoder's q where there is one, with
    ``q_star_particles`` particles and at most ``q_star_steps`` Adam steps: a picture's budget; ``pvae
    compare`` spends more); and the exact posterior where the model has one
    (:class:`~pvae.protocols.ExactPosterior`). Drawn from ``num_samples`` draws of each through
    :func:`pvae.evaluate.to_inference_data` and ``arviz.plot_density``; global sites are held at the
    guide's centre."""
    from pvae.guides import LocalFamily, ParamsGuide, model_sites, refine

    from .compare import optimize_local, study_encoder
    from .evaluate import condition_on, draws_inference_data, global_means, import_arviz, to_inference_data
    from .programs import inspect_programs

    data, split = shown(guide, data, split)
    batch = data.batch(split, slice(0, datapoints))
    family = LocalFamily(model_sites(model, batch))
    if not family.continuous or len(family.continuous) != len(family.sites):
        raise ProgramError("posterior densities are drawn for models whose local latent sites are all continuous")
    means = global_means(guide, batch, inspect_programs(model, guide, batch))
    cond_model, cond_guide = condition_on(means, model, guide)
    exports = {"q, the run's guide": to_inference_data(cond_guide, batch, num_samples)}
    encoder = study_encoder(guide)
    if isinstance(encoder, LocalEncoder):
        with torch.no_grad():
            start = encoder.local_params(batch)
        if isinstance(guide, Refining):
            exports["q₀, its encoder before refinement"] = to_inference_data(ParamsGuide(encoder.family, start), batch,
                                                                              num_samples)
        else:
            refined = refine(cond_model, batch, start, encoder.family, refine_steps, refine_lr)
            exports[f"q_K, K = {refine_steps} gradient steps"] = to_inference_data(
                ParamsGuide(encoder.family, refined), batch, num_samples)
    else:
        start = None
    q_star, _ = optimize_local(cond_model, batch, family, start, q_star_particles, max_steps=q_star_steps)
    exports["q*, the best mean-field Gaussian"] = to_inference_data(ParamsGuide(family, q_star), batch, num_samples)
    if isinstance(model, ExactPosterior):
        exports["p(z | x), exact"] = _exact_draws(model, batch, family, num_samples, draws_inference_data)
    az = import_arviz()
    names = [s.name for s in family.sites]
    # the first `dims` entries of each site's first event dimension
    keep = {f"{s.name}_dim_0": slice(0, dims) for s in family.sites if s.event_dim}
    exports = {label: export.isel(**keep) for label, export in exports.items()}
    first = next(iter(exports.values())).posterior
    panels = sum(int(np.prod(first[n].shape[2:])) for n in names)  # (chain, draw, datapoint, ...)
    cols = max(1, panels // len(batch))
    axes = np.asarray(az.plot_density(list(exports.values()), data_labels=list(exports), var_names=names,
                                      shade=0.1, hdi_prob=0.995, grid=(len(batch), cols),
                                      figsize=(3.4 * cols + 1, 2.5 * len(batch) + 1)))
    for ax in axes.ravel():  # arviz titles a panel "z\n<datapoint>, <dim>"
        var, _, where = ax.get_title().partition("\n")
        point, _, dim = where.partition(", ")
        ax.set_title(f"{split} datapoint {point}: {var}" + (f"[{dim}]" if dim else ""), fontsize=10)
        ax.tick_params(labelsize=9)
    fig = axes.ravel()[0].figure
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    for ax in axes.ravel():
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize="small", frameon=False)
    fig.suptitle(f"{data.name}: q(z | x) under each inference, {num_samples} draws each (kernel densities; "
                 "dots: means)", fontsize=11)
    legend_inches = 0.25 * math.ceil(len(labels) / 2) + 0.1
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    return plots.save_figure(fig, path)


def _exact_draws(model, batch, family, num_samples: int, to_data):
    """Draws from the model's exact Gaussian posterior, split into the family's sites (in its order)."""
    mean, precision = model.posterior(batch.x)
    draws = torch.distributions.MultivariateNormal(mean, precision_matrix=precision).sample((num_samples,))
    sites, start = {}, 0
    for site in family.sites:
        sites[site.name] = draws[..., start : start + site.numel].reshape(num_samples, len(batch), *site.shape)
        start += site.numel
    return to_data(sites, batch.idx)


# ----------------------------------------------------------------------------- diagnostics


def quick_evaluation(model, guide, data: Dataset, split: Optional[str] = None, seed: int = 0):
    """An :class:`~pvae.evaluate.Evaluation` of the first 500 datapoints of ``split`` with K = 100."""
    from .evaluate import evaluate

    data, split = shown(guide, data, split)
    n = min(QUICK_EVALUATION["max_datapoints"], data.split(split)[0].shape[0])
    with torch.random.fork_rng(devices=_cuda_devices(data)):
        torch.manual_seed(seed)
        return evaluate(model, guide, data.batch(split, slice(0, n)), num_samples=QUICK_EVALUATION["num_samples"],
                        info={"split": split})


def psis_vs_gap(evaluation, path, title: str = "") -> Path:
    """Per datapoint of an :class:`~pvae.evaluate.Evaluation`, the PSIS k̂ against the gap log p̂(x) − ELBO."""
    d = evaluation.per_datapoint
    return plots.plot_khat_vs_gap(d["log_px"] - d["elbo"], d["khat"], path,
                                  title or f"PSIS k̂ and the gap per datapoint, K = {evaluation.num_samples}")


def kl_per_dimension(evaluation, path, title: str = "") -> Path:
    """The KL and Cov_x(E_q[z_d]) per latent dimension of an :class:`~pvae.evaluate.Evaluation`."""
    e = evaluation
    return plots.plot_kl_per_dim(e.latent_names, e.kl_per_dim, e.kl_per_dim_se, e.activity, e.active_threshold, path,
                                 title or f"KL per latent dimension, {e.num_datapoints} datapoints")


def _cuda_devices(data: Dataset) -> list:
    device = data.train.device
    return [device.index or 0] if device.type == "cuda" else []


# ----------------------------------------------------------------------------- the registry


@dataclass
class FigureContext:
    """What the figures of one run are drawn from: its programs and data, and its folder (metrics,
    snapshots, evaluation and comparison results), when there is one.

    :param split: the split figures show; default :func:`default_split`.
    """

    model: Callable
    guide: Callable
    data: Dataset
    folder: Optional[Path] = None
    history: list = field(default_factory=list)
    run_config: Optional[dict] = None
    seed: int = 0
    split: Optional[str] = None

    def __post_init__(self):
        self.folder = Path(self.folder) if self.folder is not None else None
        if self.split is not None and not has_q_for(self.guide, self.split):
            raise ValueError(f"the guide has a q for its training rows only, not for the {self.split} split: "
                             "use --split train")
        self.data, self.split = shown(self.guide, self.data, self.split)
        if self.data.split(self.split)[0].shape[0] == 0:
            raise ValueError(f"the {self.split} split of {self.data.name} is empty")

    @cached_property
    def codec(self) -> ProgramCodec:
        return codec_for(self.model, self.guide, self.data, self.split)

    def results(self, stem: str) -> Optional[dict]:
        path = self.folder / f"{stem}-{self.split}.json" if self.folder is not None else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    @cached_property
    def evaluation(self):
        from .evaluate import Evaluation

        saved = self.results("evaluation")
        if saved is not None and "per_datapoint" in saved:
            return Evaluation.from_dict(saved)
        return quick_evaluation(self.model, self.guide, self.data, self.split, self.seed)


@dataclass(frozen=True)
class Figure:
    """A figure of one run: its file in the run folder (``{split}`` filled in), what it shows, how it is
    drawn, and ``needs(context)``: None when it applies, else why not."""

    name: str
    file: str
    caption: str
    draw: Callable
    needs: Callable = lambda ctx: None
    on_train: bool = True  # drawn at the end of ``pvae train``

    def path(self, ctx: FigureContext) -> Path:
        return Path(ctx.folder or ".") / self.file.format(split=ctx.split)


def _fails(check: Callable) -> Optional[str]:
    """None when ``check()`` runs, else the first line of why not."""
    try:
        check()
    except (ProgramError, ValueError, NotImplementedError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _needs_codec(ctx) -> Optional[str]:
    return _fails(lambda: ctx.codec)


def _needs_images(ctx) -> Optional[str]:
    return "the data are not images" if ctx.data.image_shape is None else _needs_codec(ctx)


def _sample_one(ctx) -> None:
    with torch.random.fork_rng(devices=_cuda_devices(ctx.data)):
        ctx.codec.sample(1)


def _needs_prior(ctx) -> Optional[str]:
    reason = _needs_images(ctx)
    if reason is None:
        failed = _fails(lambda: _sample_one(ctx))
        reason = failed and f"the model's prior cannot be sampled: {failed}"
    return reason


def _needs_2d(ctx) -> Optional[str]:
    reason = _needs_codec(ctx)
    if reason is None and ctx.codec.latent_dim != 2:
        return f"the continuous local code has {ctx.codec.latent_dim} numbers per datapoint, not 2"
    return reason


def _needs_2d_images(ctx) -> Optional[str]:
    return _needs_images(ctx) or _needs_2d(ctx)


def _needs_quantiles(ctx) -> Optional[str]:
    return _needs_2d_images(ctx) or _fails(lambda: _prior_quantiles(ctx.codec))


def _continuous_family(ctx) -> None:
    from pvae.guides import LocalFamily, model_sites

    family = LocalFamily(model_sites(ctx.model, ctx.data.batch(ctx.split, slice(0, 2))))
    if not family.sites or len(family.continuous) != len(family.sites):
        raise ValueError("q* is optimized over continuous local sites, and the model's are not all continuous")


def _needs_local_family(ctx) -> Optional[str]:
    return _needs_codec(ctx) or _fails(lambda: _continuous_family(ctx))


def _bounds_defined(ctx) -> None:
    from .programs import check_bounds_defined, inspect_programs

    info = inspect_programs(ctx.model, ctx.guide, ctx.data.batch(ctx.split, slice(0, 2)), check=False)
    check_bounds_defined("the figure", info.point_mass, info.improper)


def _needs_bounds(ctx) -> Optional[str]:
    """The figures of evaluate's measures need q's density and a proper prior (not an autoencoder's)."""
    return _needs_codec(ctx) or _fails(lambda: _bounds_defined(ctx))


def _needs_snapshots(ctx) -> Optional[str]:
    if ctx.folder is None or not (ctx.folder / SNAPSHOTS).is_file():
        return f"no {SNAPSHOTS} in the run folder (recorded by pvae train for 2-D codes)"
    return None


def _needs_file(stem: str, command: str) -> Callable:
    def needs(ctx):
        return None if ctx.results(stem) is not None else f"no {stem}-{ctx.split}.json: run {command} first"

    return needs


def _draw_gaps(ctx, path):
    from .compare import Comparison
    from .reports import cremer_reference

    reference = cremer_reference({**(ctx.run_config or {}), "split": ctx.split})
    return plots.plot_comparison(Comparison.from_dict(ctx.results("compare")), path, reference)


def _draw_curves(ctx, path):
    label = (ctx.run_config or {}).get("guide") or type(ctx.guide).__name__
    return training_curves({label: ctx.history}, path, title=f"{label} guide: ELBO per epoch, training rows dashed, "
                                                             "test data solid")


FIGURES = {f.name: f for f in (
    Figure("reconstructions", "reconstructions.png", "test images above their reconstructions",
           lambda ctx, p: reconstructions(ctx.model, ctx.guide, ctx.data, p, split=ctx.split, codec=ctx.codec),
           _needs_images),
    Figure("samples", "samples.png", "samples from the prior, E[x | z] for z ~ p(z)",
           lambda ctx, p: prior_samples(ctx.model, ctx.guide, ctx.data, p, seed=ctx.seed, codec=ctx.codec),
           _needs_prior),
    Figure("latent", "latent.png", "the codes of the test set, coloured by label (2-D codes)",
           lambda ctx, p: latent_space(ctx.model, ctx.guide, ctx.data, p, ctx.split, codec=ctx.codec), _needs_2d),
    Figure("latent-training", "latent-training.gif", "the codes of the test set during training, one frame per "
           "snapshot, on the same axes (2-D codes)", lambda ctx, p: latent_animation(ctx.folder, p), _needs_snapshots,
           on_train=False),  # LatentSnapshots draws it at the end of the fit
    Figure("manifold", "manifold.png", "E[x | z] over z in [-3, 3]² (2-D codes)",
           lambda ctx, p: manifold(ctx.model, ctx.guide, ctx.data, p, codec=ctx.codec), _needs_2d_images),
    Figure("manifold-quantiles", "manifold-quantiles.png", "E[x | z] over the unit square through the prior's "
           "quantile function (Kingma & Welling 2013, figure 4)",
           lambda ctx, p: manifold(ctx.model, ctx.guide, ctx.data, p, quantiles=True, codec=ctx.codec),
           _needs_quantiles),
    Figure("interpolation", "interpolation.png", "decoded codes on the line between the codes of two test images",
           lambda ctx, p: interpolation(ctx.model, ctx.guide, ctx.data, p, split=ctx.split), _needs_images),
    Figure("curves", "curves.png", "the ELBO on training rows and on test data per epoch and per second",
           _draw_curves, lambda ctx: None if ctx.history else "no metrics recorded"),
    Figure("posteriors", "posteriors-{split}.png", "q(z | x) of three datapoints under the guide, q_K, q* and the "
           "exact posterior where the model has one", lambda ctx, p: posterior_densities(ctx.model, ctx.guide, ctx.data,
                                                                                        p, split=ctx.split),
           lambda ctx: _needs_bounds(ctx) or _needs_local_family(ctx), on_train=False),
    Figure("psis", "psis-{split}.png", "PSIS k̂ against the gap log p̂(x) − ELBO, per datapoint",
           lambda ctx, p: psis_vs_gap(ctx.evaluation, p), _needs_bounds, on_train=False),
    Figure("kl", "kl-per-dim-{split}.png", "the KL and the activity per latent dimension (posterior collapse)",
           lambda ctx, p: kl_per_dimension(ctx.evaluation, p), _needs_bounds, on_train=False),
    Figure("gaps", "compare-{split}.png", "the amortization and approximation gaps (pvae compare)",
           _draw_gaps, _needs_file("compare", "pvae compare RUN"), on_train=False),
)}


def figure_for_file(name: str) -> Optional[Figure]:
    """The figure of :data:`FIGURES` that writes the file ``name`` (relative to a run folder), if any."""
    for figure in FIGURES.values():
        pattern = re.escape(figure.file).replace(re.escape("{split}"), "(train|val|test)")
        if re.fullmatch(pattern, name):
            return figure
    return None


def draw_figures(ctx: FigureContext, names: Optional[Sequence] = None, strict: bool = False) -> tuple:
    """Draw the figures ``names`` (default: all of :data:`FIGURES`) that apply to ``ctx``.

    :param strict: a figure that does not apply raises a ``ValueError`` saying why, instead of being
        skipped.
    :returns: ``(written paths, {name: why it was skipped})``.
    """
    written, skipped = [], {}
    for name in names or FIGURES:
        figure = FIGURES[name]
        reason = figure.needs(ctx)
        if reason is not None:
            if strict:
                raise ValueError(f"figure {name!r} does not apply to this run: {reason}")
            skipped[name] = reason
            continue
        written.append(figure.draw(ctx, figure.path(ctx)))
    return written, skipped
