"""Figures and the HTML report: every figure from one tiny trained run (a module fixture), checked as
files (a valid PNG of the grid's size, not blank; the GIF's frames; the report's references), and the
readings of the programs they rest on (codes, decoded means, prior samples, quantiles) checked as values."""

import base64
import json
import math
import os
import stat
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from PIL import Image
from torch import nn

import pvae
from pvae import figures, plots
from pvae.cli import main
from pvae.autoencoding import PCA
from pvae.codec import ProgramCodec
from pvae.figures import FIGURES, snapshot_epochs
from pvae.guides import AmortizedGuide, mlp_guide
from pvae.models import LinearGaussianHierarchy, mlp_vae
from pvae.programs import Batch
from pvae.utils import set_seed

from helpers import assert_close

EPOCHS = 3
SHAPE = (1, 8, 8)  # the digits
BLANK_STD = 8.0  # grey levels (0-255): a figure whose pixels vary less than this is blank


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run, trained by the command line with its report, then every figure drawn into it."""
    folder = tmp_path_factory.mktemp("figures") / "run"
    with pyro.validation_enabled(True):
        assert main(["train", "--epochs", str(EPOCHS), "--hidden", "32", "--out", str(folder), "--no-progress",
                     "--report"]) == 0
        assert main(["evaluate", str(folder), "--max-datapoints", "40", "--samples", "50", "--no-progress"]) == 0
        assert main(["compare", str(folder), "--max-datapoints", "4", "--particles", "4", "--max-steps", "20",
                     "--elbo-particles", "8", "--iwae-samples", "16", "--chunk-size", "16",
                     "--refine-steps", "2", "--no-progress"]) == 0
        assert main(["plot", str(folder), "--all"]) == 0
    return folder


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        image.verify()  # a valid PNG or GIF
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def grid_px(rows: int, cols: int, shape=SHAPE, pad: int = 1) -> tuple:
    """Width and height in pixels of a grid of images with ``pad`` pixels around each, magnified."""
    _, h, w = shape
    s = plots.scale_for(shape)
    return (cols * (w + pad) + pad) * s, (rows * (h + pad) + pad) * s


def assert_not_blank(image: np.ndarray, name: str) -> None:
    assert image.std() > BLANK_STD, f"{name} is blank: its pixels' standard deviation is {image.std():.1f}"


def test_training_writes_every_training_figure_and_nothing_blank(run):
    expected = {f.file.format(split="test") for f in FIGURES.values() if f.on_train}
    assert expected <= {p.name for p in run.iterdir()}
    for name in expected:
        assert_not_blank(pixels(run / name), name)


def test_image_grids_have_the_size_of_their_grid(run):
    m, t = plots.MARGIN_PX, plots.TITLE_PX
    # 100 prior samples, 10 to a row, under a title
    w, h = grid_px(10, 10)
    assert pixels(run / "samples.png").shape == (t + h + m, m + w + m)
    # 16 test images over their reconstructions, 8 to a row: two blocks of two rows, half an image between
    w, h = grid_px(4, 8)
    gap = 4 * plots.scale_for(SHAPE)  # half an 8-pixel image between the blocks
    image = pixels(run / "reconstructions.png")
    assert image.shape[0] == t + h + gap + m
    label = m + plots.CHAR_PX * len("reconstruction") + 10
    assert image.shape[1] == label + w + m
    # 15 x 15 decoded codes, with axes
    w, h = grid_px(15, 15)
    for name in ("manifold.png", "manifold-quantiles.png"):
        assert pixels(run / name).shape == (t + h + 64, 84 + w + m)
    # two rows (the data at both ends, the VAE's line) of 10 steps
    w, h = grid_px(2, 10)
    assert pixels(run / "interpolation.png").shape[0] == t + h + m


def test_the_latent_animation_has_a_frame_per_snapshot_on_fixed_axes(run):
    saved = figures.load_snapshots(run)
    assert sorted(saved["frames"]) == sorted(snapshot_epochs(EPOCHS)) == [0, 1, 2, 3]
    with Image.open(run / "latent-training.gif") as gif:
        assert gif.n_frames == 4
        sizes = set()
        for i in range(gif.n_frames):
            gif.seek(i)
            sizes.add(gif.size)
            assert_not_blank(np.asarray(gif.convert("L"), dtype=np.float64), f"frame {i}")
    assert len(sizes) == 1
    # the axes hold every frame: the widest code of any frame is inside the common limit
    limit = plots.common_limit(list(saved["frames"].values()))
    assert limit >= 3.0 and limit >= max(np.quantile(np.abs(c).max(-1), 0.995) for c in saved["frames"].values())


def test_plot_all_draws_the_diagnostics_and_the_gaps(run):
    for name in ("posteriors-test.png", "psis-test.png", "kl-per-dim-test.png", "compare-test.png"):
        assert_not_blank(pixels(run / name), name)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external = {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images[attrs["data-file"]] = attrs["src"]
        if tag in ("script", "link") or any(str(v).startswith(("http:", "https:", "//")) for v in attrs.values()):
            self.external.append((tag, attrs))


def test_the_report_is_self_contained_and_embeds_every_figure(run):
    assert main(["report", str(run)]) == 0
    parser = _Images()
    text = (run / "report.html").read_text()
    parser.feed(text)
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.suffix in (".png", ".gif")}
    assert set(parser.images) == on_disk and len(on_disk) >= 12
    for name, src in parser.images.items():
        kind, _, data = src.partition(";base64,")
        assert kind == f"data:image/{Path(name).suffix[1:]}"
        assert base64.b64decode(data) == (run / name).read_bytes()
    assert not parser.external
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run / "report.html").stat().st_mode) == 0o666 & ~umask, "as open() would make it"
    for section in ('id="metrics"', 'id="config"', 'id="evaluation-test"', 'id="compare-test"', 'id="figures"'):
        assert section in text
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{final['test_elbo']:.4g}" in text


def test_plot_refuses_what_does_not_apply_with_the_reason(run, tmp_path, capsys):
    wide = tmp_path / "wide"
    assert main(["train", "--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--out", str(wide), "--no-progress"]) == 0
    assert not (wide / "manifold.png").exists() and not (wide / figures.SNAPSHOTS).exists()
    assert main(["plot", str(wide), "--what", "manifold"]) == 2
    assert "3 numbers per datapoint, not 2" in capsys.readouterr().err
    assert main(["plot", str(wide), "--what", "nonsense"]) == 2
    assert "--what takes" in capsys.readouterr().err

    # several runs: prior samples side by side (2-D and 3-D codes), curves on one axis
    assert main(["plot", "--runs", str(run), str(wide), "--what", "samples", "curves"]) == 0
    panel = pixels(run / "samples-runs.png")
    one = pixels(run / "samples.png")
    assert panel.shape[1] > 2 * (one.shape[1] - 2 * plots.MARGIN_PX)
    assert_not_blank(pixels(run / "curves-runs.png"), "curves-runs.png")


# ----------------------------------------------------------------------------- the readings, as values


@pytest.fixture(scope="module")
def trained():
    set_seed(0)
    data = pvae.load_dataset("digits", binarize="static")
    model, guide = mlp_vae(data.num_pixels, 2, (32,)), mlp_guide(data.num_pixels, 2, (32,))
    with pyro.validation_enabled(True):
        pvae.fit(model, guide, data, pvae.FitConfig(epochs=2, progress=False, eval_every=0))
    return model, guide, data


def test_codes_and_decoded_means_are_the_vaes_own(trained):
    model, guide, data = trained
    batch = data.batch("test", slice(0, 20))
    codec = ProgramCodec(model, guide, batch)
    with torch.no_grad():
        loc, _ = guide.encode(batch.x)
        assert_close(codec.encode(batch), loc, msg="codes are q's means")
        assert_close(codec.reconstruct(batch), model.decode(loc), msg="reconstructions are E[x | z = mean]")
        z = torch.randn(7, 2)
        assert_close(codec.decode(z), model.decode(z), atol=1e-6, msg="decoded means")


class ShiftedPrior(nn.Module):
    """z ~ N(mu, s^2) in 2-D, x | z ~ N(W z, 0.1): prior samples' mean is W mu, its quantiles mu + s Φ⁻¹(u)."""

    def __init__(self, mu=(3.0, -1.0), s=0.5):
        super().__init__()
        self.mu, self.s = torch.tensor(mu), s
        self.W = nn.Linear(2, 4, bias=False)
        with torch.no_grad():
            self.W.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))

    def forward(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.mu.expand(len(x), 2), self.s).to_event(1))
            pyro.sample("x", dist.Normal(self.W(z), 0.1).to_event(1), obs=x)
            if y is not None:  # a second observed site: pictures show x, the data
                pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)


def test_prior_samples_come_from_the_models_own_prior_and_quantiles_invert_it():
    model = ShiftedPrior()
    x = torch.randn(6, 4)
    codec = ProgramCodec(model, AmortizedGuide(model, hidden=(8,)), Batch.of(x, inputs={"y": torch.randn(6)}))
    assert codec.observed == "x"
    samples = codec.sample(4000)  # E[x | z] = W z, z ~ N(mu, s^2 I)
    expected = model.W(model.mu)
    # 4000 draws: each coordinate's standard error is at most 0.5 * 2 / sqrt(4000) = 0.016; 5 s.e.
    assert_close(samples.mean(0), expected, atol=0.08, msg="prior samples' mean")
    icdf = figures._prior_quantiles(codec)
    u = torch.tensor([0.5, 0.975])
    want = model.mu + model.s * torch.tensor([[0.0], [1.959964]])
    assert_close(icdf(u), want, atol=1e-4, msg="the prior's quantiles")


class PositiveLatent(nn.Module):
    """A positive latent (a scale), which codes hold in unconstrained space: log z."""

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(x.new_full((len(x), 2), 2.0), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.repeat(1, 2), 0.1).to_event(1), obs=x)


def positive_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.LogNormal(x.new_full((len(x), 2), math.log(2.0)), 0.3).to_event(1))


def test_codes_of_constrained_sites_are_unconstrained_and_decode_back():
    x = torch.randn(5, 4)
    codec = ProgramCodec(PositiveLatent(), positive_guide, x)
    codes = codec.encode(x)
    # the centre of a LogNormal is the image of its base's mean, its median: 2; its code log 2
    assert_close(codes, math.log(2.0), atol=1e-6, msg="codes in unconstrained space")
    assert_close(codec.decode(codes), 2.0, atol=1e-6, msg="decoded back through exp")


def test_exact_posterior_draws_are_split_into_the_models_sites():
    set_seed(1)
    model = LinearGaussianHierarchy(6, top_dim=2, bottom_dim=3)
    x = torch.randn(4, 6)
    from pvae.evaluate import draws_inference_data
    from pvae.guides import LocalFamily, model_sites

    family = LocalFamily(model_sites(model, Batch.of(x)))
    export = figures._exact_draws(model, Batch.of(x), family, 20000, draws_inference_data)
    mean, _ = model.posterior(x)
    # 20000 draws of posterior standard deviations below 1: a standard error under 0.008; 5 s.e.
    assert_close(export.posterior["z1"].values[0].mean(0), mean[:, :2], atol=0.04, msg="z1")
    assert_close(export.posterior["z2"].values[0].mean(0), mean[:, 2:], atol=0.04, msg="z2")


def test_interpolation_takes_other_codecs_as_rows(trained, tmp_path):
    model, guide, data = trained
    assert isinstance(PCA(2).fit(data.train), pvae.protocols.Codec)
    path = figures.interpolation(model, guide, data, tmp_path / "i.png", pair=(3, 7), steps=6,
                                 others={"PCA, d = 2": PCA(2).fit(data.train), "PCA, d = 8": PCA(8).fit(data.train)})
    image = pixels(path)
    _, h = grid_px(4, 6)  # data, VAE, two PCA rows
    assert image.shape[0] == plots.TITLE_PX + h + plots.MARGIN_PX
    assert_not_blank(image, "interpolation")


def test_snapshots_do_not_change_the_fit_and_resume_goes_on(tmp_path):
    """Tracing the programs for their codes draws random numbers (the model's prior, the semi-amortized
    guide's refinement steps): without setting torch's random state aside, the snapshots would change
    the fit."""
    from pvae.guides import SemiAmortizedGuide

    digits = pvae.load_dataset("digits", binarize="static")
    data = pvae.Dataset.from_tensors(digits.train[:256], digits.test[:64], image_shape=SHAPE,
                                     labels={"train": digits.train_labels[:256], "test": digits.test_labels[:64]})
    config = pvae.FitConfig(epochs=2, batch_size=64, eval_every=0, progress=False)

    def programs():
        set_seed(0)
        model = mlp_vae(data.num_pixels, 2, (8,))
        return model, SemiAmortizedGuide(mlp_guide(data.num_pixels, 2, (8,)), model, steps=1)

    weights = []
    for callbacks in ([], [figures.LatentSnapshots(tmp_path / "a")]):
        model, guide = programs()
        pvae.fit(model, guide, data, config, callbacks=callbacks, out_dir=tmp_path / ("a" if callbacks else "b"))
        weights.append(torch.cat([p.detach().flatten() for p in [*model.parameters(), *guide.parameters()]]))
    assert torch.equal(weights[0], weights[1])
    assert sorted(figures.load_snapshots(tmp_path / "a")["frames"]) == [0, 1, 2]
    model, guide = programs()
    config.epochs = 3
    pvae.fit(model, guide, data, config, out_dir=tmp_path / "a", resume=True,
             callbacks=[figures.LatentSnapshots(tmp_path / "a")])
    assert sorted(figures.load_snapshots(tmp_path / "a")["frames"]) == [0, 1, 2, 3]
    with Image.open(tmp_path / "a" / "latent-training.gif") as gif:
        assert gif.n_frames == 4


class FlatPriorAE(nn.Module):
    """An autoencoder as a Pyro program: a flat (improper) prior, which cannot be sampled, and a
    point-mass guide; its objective is log p(x | z = f(x))."""

    def __init__(self):
        super().__init__()
        self.decoder, self.encoder = nn.Linear(2, 64), nn.Linear(64, 2)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.ImproperUniform(dist.constraints.real, (len(x),), (2,)))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x)).to_event(1))


def test_a_model_gets_the_figures_that_apply_to_it(trained, tmp_path):
    _, _, data = trained
    ae = FlatPriorAE()
    ctx = figures.FigureContext(ae.model, ae.guide, data, tmp_path)
    written, skipped = figures.draw_figures(ctx, ["reconstructions", "samples", "latent", "manifold",
                                                  "manifold-quantiles", "latent-training", "curves"])
    assert [p.name for p in written] == ["reconstructions.png", "latent.png", "manifold.png"]
    assert "prior cannot be sampled" in skipped["samples"]
    assert sorted(skipped) == ["curves", "latent-training", "manifold-quantiles", "samples"]
    x = data.test[:5]
    with torch.no_grad():
        assert_close(ctx.codec.reconstruct(x), torch.sigmoid(ae.decoder(ae.encoder(x))), atol=1e-6,
                     msg="an autoencoder's reconstruction: the decoder's mean at the point mass f(x)")
    with pytest.raises(ValueError, match="does not apply to this run: the model's prior cannot be sampled"):
        figures.draw_figures(ctx, ["samples"], strict=True)


def test_grey_faces_of_another_shape(tmp_path):
    """Frey-face-like 28 x 20 grey images under a Gaussian likelihood: tiles keep their shape."""
    shape = (1, 28, 20)
    x = torch.rand(40, 560)
    data = pvae.Dataset.from_tensors(x[:30], x[30:], image_shape=shape)
    model = mlp_vae(560, 2, (16,), likelihood="gaussian")
    ctx = figures.FigureContext(model, mlp_guide(560, 2, (16,)), data, tmp_path)
    written, _ = figures.draw_figures(ctx, ["reconstructions", "manifold"])
    m, t, s = plots.MARGIN_PX, plots.TITLE_PX, plots.scale_for(shape)
    w, h = grid_px(4, 8, shape)
    label = m + plots.CHAR_PX * len("reconstruction") + 10
    # 10 test images: a block of 8 and a block of 2 (with blank cells), 14 rows apart
    assert pixels(written[0]).shape == (t + h + 14 * s + m, label + w + m)
    w, h = grid_px(15, 15, shape)
    assert pixels(written[1]).shape == (t + h + 64, 84 + w + m)


def test_a_mean_field_guide_shows_its_training_rows_as_it_saw_them(tmp_path):
    """A mean-field guide has a q for its training rows only; dynamically binarized, they are grey
    levels, which Bernoulli pixels refuse: figures show one seeded binary draw of them."""
    from pvae.guides import MeanFieldGuide

    data = pvae.load_dataset("digits", binarize="dynamic")
    model = mlp_vae(data.num_pixels, 2, (8,))
    guide = MeanFieldGuide(model, num_data=data.train.shape[0])
    ctx = figures.FigureContext(model, guide, data, tmp_path)
    assert ctx.split == "train" and set(ctx.data.train.unique().tolist()) == {0.0, 1.0}
    written, _ = figures.draw_figures(ctx, ["reconstructions", "psis"])
    assert [p.name for p in written] == ["reconstructions.png", "psis-train.png"]
    with pytest.raises(ValueError, match="training rows only"):
        figures.FigureContext(model, guide, data, split="test")


# ----------------------------------------------------------------------------- coders side by side


@pytest.fixture(scope="module")
def side_by_side():
    """Tiny coders on the grey digits, two epochs each: PCA, autoencoders and VAEs at latent sizes 2
    and 4, denoising autoencoders for masking with p = 0.5 and 0.9."""
    from pvae.autoencoding import CoderConfig, fit_autoencoder, fit_vae
    from pvae.guides import MaskingNoise

    set_seed(0)
    data = pvae.load_dataset("digits")
    config = CoderConfig(hidden=(16,), epochs=2, lr=1e-2)
    coders = {f"{name}{d}": build(d) for d in (2, 4) for name, build in (
        ("pca", lambda d: PCA(d).fit(data.train)), ("ae", lambda d: fit_autoencoder(data, d, config)),
        ("vae", lambda d: fit_vae(data, d, config)))}
    for p in (0.5, 0.9):
        coders[f"dae{p}"] = fit_autoencoder(data, 4, config, MaskingNoise(p))
    return data, coders


def cells(path, labels, ncol: int, shape=SHAPE) -> torch.Tensor:
    """The images of an :func:`plots.image_rows` figure of one block (``len(labels)`` rows of ``ncol``), read
    back from its pixels: ``(rows, ncol, P)`` in [0, 1], each image pixel from the centre of its magnified square."""
    image = pixels(path)
    _, h, w = shape
    s = plots.scale_for(shape)
    left = plots.MARGIN_PX + plots.CHAR_PX * max(map(len, labels)) + 10
    _, height = grid_px(len(labels), ncol, shape)
    width, _ = grid_px(1, ncol, shape)
    assert image.shape == (plots.TITLE_PX + height + plots.MARGIN_PX, left + width + plots.MARGIN_PX)
    assert_not_blank(image, Path(path).name)
    centre = np.arange(h) * s + s // 2
    out = np.empty((len(labels), ncol, h, w))
    for r in range(len(labels)):
        for k in range(ncol):
            top, lft = plots.TITLE_PX + (1 + r * (h + 1)) * s, left + (1 + k * (w + 1)) * s
            out[r, k] = image[top + centre][:, lft + np.arange(w) * s + s // 2]
    return torch.as_tensor(out / 255, dtype=torch.float32).reshape(len(labels), ncol, -1)


SHOWN = 2 / 255  # a grey level in [0, 1] drawn through the 256-level grey colormap and read back


def assert_rows(path, expected: list, ncol: int) -> None:
    """Each row of the figure at ``path`` shows the images of ``expected`` ``[(label, (ncol, P))]``, in order,
    and no two rows look alike, so that rows drawn in another order would fail."""
    shown_rows = cells(path, [label for label, _ in expected], ncol)
    for (label, images), row in zip(expected, shown_rows):
        assert_close(row, images.clip(0, 1), atol=SHOWN, msg=f"row {label!r}")
    for i in range(len(expected)):
        for j in range(i):
            assert (expected[i][1].clip(0, 1) - expected[j][1].clip(0, 1)).abs().max() > 10 * SHOWN, (i, j)


def test_pca_the_autoencoder_and_the_vae_reconstruct_the_same_images_row_by_row(side_by_side, tmp_path):
    data, c = side_by_side
    x = data.test[:6]
    coders = {"PCA, d = 2": c["pca2"], "AE, d = 2": c["ae2"], "VAE, d = 2": c["vae2"], "PCA, d = 4": c["pca4"],
              "AE, d = 4": c["ae4"]}
    path = figures.coder_reconstructions(coders, data, tmp_path / "r.png", n=6)
    expected = [("data", x)] + [(label, coder.reconstruct(x)) for label, coder in coders.items()]
    assert_rows(path, expected, 6)


def test_an_autoencoders_codes_perturbed_and_sampled(side_by_side, tmp_path):
    """The rows of the generation failures, drawn again here from the documented stream: one generator,
    seeded once, draws each coder's N(0, 0.5²I) and N(0, I) noise and then its code-space sample."""
    data, c = side_by_side
    x, n = data.test[:5], 5
    coders = {"d = 2": c["ae2"], "d = 4": c["ae4"]}
    path = figures.generation_failures(coders, data, tmp_path / "g.png", n=n, seed=3)
    g = torch.Generator().manual_seed(3)
    expected = [("data", x)]
    for label, coder in coders.items():
        code = coder.encode(x)
        expected.append((f"{label}: g(f(x))", coder.reconstruct(x)))
        for s in (0.5, 1.0):
            expected.append((f"{label}: z + N(0, {s:g}²I)", coder.decode(code + s * torch.randn(code.shape, generator=g))))
        train = coder.encode(data.train)
        z = train.mean(0) + train.std(0, correction=0) * torch.randn(code.shape, generator=g)
        expected.append((f"{label}: z ~ N(μ̂, Σ̂)", coder.decode(z)))
    assert_rows(path, expected, n)


def test_the_denoising_figure_shows_inputs_corrupted_at_the_stated_rate(side_by_side, tmp_path):
    """Masked rows read back from the figure: of the test pixels that are visibly grey, the share drawn
    black is p within 5 standard errors (a failure rate below 1e-6 each), and every other one is the
    original; each corruption's denoiser restores its own corrupted row."""
    from pvae.guides import GaussianNoise, MaskingNoise

    data, c = side_by_side
    n = 16
    x = data.test[:n]
    denoisers = {"masking p = 0.5": (MaskingNoise(0.5), c["dae0.5"]), "masking p = 0.9": (MaskingNoise(0.9), c["dae0.9"]),
                 "noise σ = 0.5": (GaussianNoise(0.5), c["ae4"])}
    path = figures.denoising(denoisers, data, tmp_path / "d.png", plain=c["ae2"], n=n, seed=7)
    expected = [("data", x)]
    for i, (label, (corruption, coder)) in enumerate(denoisers.items()):
        corrupted = corruption(x, torch.Generator().manual_seed(7 + i))
        expected += [(label, corrupted), ("denoised by its DAE", coder.reconstruct(corrupted)),
                     ("by the plain AE", c["ae2"].reconstruct(corrupted))]
    assert_rows(path, expected, n)
    shown_rows = cells(path, [label for label, _ in expected], n)
    original = shown_rows[0]
    grey = original > 0.1
    for row, p in ((1, 0.5), (4, 0.9)):
        masked = shown_rows[row]
        black = (masked[grey] < SHOWN).double()
        m = black.numel()
        assert_close(black.mean(), p, atol=5 * math.sqrt(p * (1 - p) / m), msg=f"masking p = {p}: share of {m} pixels")
        kept = masked > SHOWN
        assert_close(masked[kept], original[kept], atol=SHOWN, msg="what is not masked is the original")


def test_the_vae_the_autoencoder_and_pca_interpolate_between_the_same_pair(side_by_side, tmp_path):
    data, c = side_by_side
    pair, steps = (3, 7), 6
    vae = c["vae2"]
    path = figures.interpolation(vae.model, vae.guide, data, tmp_path / "i.png", pair=pair, steps=steps,
                                 label="VAE", others={"AE": c["ae2"], "PCA": c["pca2"]})
    ends = data.test[list(pair)]
    t = torch.linspace(0, 1, steps)[:, None]
    expected = [("data", torch.cat([ends[:1], torch.ones(steps - 2, ends.shape[1]), ends[1:]]))]
    for label, coder in (("VAE", vae), ("AE", c["ae2"]), ("PCA", c["pca2"])):
        z = coder.encode(ends)
        expected.append((label, coder.decode((1 - t) * z[0] + t * z[1])))
    assert_rows(path, expected, steps)
