"""The same code path on CUDA: data, parameters, plates and checkpoints on the GPU.

These run wherever torch sees a CUDA device; CI machines have none, so there they are skipped.
"""

import pytest
import torch

import pvae
from pvae.checkpoint import load_checkpoint
from pvae.guides import mlp_guide
from pvae.inference import iwae_bound
from pvae.models import mlp_vae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fit_on_cuda_keeps_everything_on_the_device_and_resumes(tmp_path):
    device = pvae.resolve_device("auto")
    assert device.type == "cuda"
    data = pvae.load_dataset("digits", binarize="dynamic")
    pvae.set_seed(0)
    model, guide = mlp_vae(64, 2, (32,)), mlp_guide(64, 2, (32,))
    config = pvae.FitConfig(epochs=2, progress=False)
    result = pvae.fit(model, guide, data, config, out_dir=tmp_path, device=device)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert result.final["test_elbo"] > -45
    x = data.test[:20].to(device)
    assert iwae_bound(model, guide, x, num_samples=50, chunk_size=20).device.type == "cuda"
    state = load_checkpoint(tmp_path)
    assert state["programs"]["modules"]["model"][0]["decoder.0.weight"].device.type == "cpu"  # loaded to CPU, portable
    config.epochs = 3
    resumed = pvae.fit(model, guide, data, config, out_dir=tmp_path, resume=True, device=device)
    assert len(resumed.history) == 3


def test_figures_of_a_run_on_cuda(tmp_path):
    """Codes, decoded means, snapshots (their random state set aside on the device too) and every
    figure of a run trained on the GPU."""
    from pvae import figures

    device = pvae.resolve_device("auto")
    data = pvae.load_dataset("digits", binarize="static")
    pvae.set_seed(0)
    model, guide = mlp_vae(64, 2, (32,)), mlp_guide(64, 2, (32,))
    result = pvae.fit(model, guide, data, pvae.FitConfig(epochs=2, progress=False), out_dir=tmp_path, device=device,
                      callbacks=[figures.LatentSnapshots(tmp_path)])
    data = data.to(device)
    codec = figures.codec_for(model, guide, data)
    assert codec.encode(data.batch("test")).device.type == "cuda"
    assert codec.decode(torch.zeros(3, 2)).device.type == "cuda"  # codes from the CPU are moved
    ctx = figures.FigureContext(model, guide, data, tmp_path, result.history)
    written, skipped = figures.draw_figures(ctx)
    assert {p.name for p in written} >= {"reconstructions.png", "samples.png", "manifold.png", "posteriors-test.png"}
    assert list(skipped) == ["gaps"]
    assert (tmp_path / "latent-training.gif").is_file()
