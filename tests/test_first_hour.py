"""What a newcomer's first hour meets: the collapse warning at the end of training, tidy run folders."""

import numpy as np

from pvae.cli import main
from pvae.evaluate import Evaluation

TINY = ["train", "--epochs", "3", "--hidden", "16", "--no-progress", "--no-figures"]


def _evaluation(activity) -> Evaluation:
    d = len(activity)
    per_datapoint = {k: np.zeros(4) for k in ("log_px", "elbo", "recon", "kl", "khat", "khat_flag")}
    return Evaluation(num_samples=1, num_dims=64, per_datapoint=per_datapoint,
                      latent_names=[f"z[{i}]" for i in range(d)], activity=np.array(activity, dtype=float),
                      activity_se=np.zeros(d), kl_per_dim=np.zeros(d), kl_per_dim_se=np.zeros(d), psis=False)


def test_collapsed_means_fewer_than_half_of_the_units_active():
    assert _evaluation([0.001, 0.002]).collapsed
    assert not _evaluation([0.001, 0.5]).collapsed  # one of two: half the code still speaks
    assert _evaluation([0.5] * 4 + [0.0] * 6).collapsed
    assert not _evaluation([0.5] * 5 + [0.0] * 5).collapsed
    assert not _evaluation([]).collapsed  # no continuous code, nothing to collapse


def test_a_collapsed_run_warns_with_what_to_try(tmp_path, capsys):
    # a KL weighted by 100 pushes q(z|x) onto the prior within three epochs
    assert main([*TINY, "--beta", "100", "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("pvae train: warning: the posterior has collapsed: 0 of 2 latent units active")
    assert "--beta (now 100)" in warnings[0] and "--kl-warmup" in warnings[0]


def test_a_healthy_run_does_not_warn(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path / "run")]) == 0
    assert "warning" not in capsys.readouterr().out
