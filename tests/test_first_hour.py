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


def test_a_resume_lists_what_it_wrote_and_flags_results_that_predate_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(run)]) == 0
    for name in ("evaluation-test.json", "compare-test.md"):  # results of the run at epoch 2
        (run / name).write_text("{}")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--no-progress", "--no-figures"]) == 0
    lines = capsys.readouterr().out.splitlines()
    wrote = next(line for line in lines if " wrote " in line)
    assert "evaluation-test.json" not in wrote and "compare-test.md" not in wrote
    assert "checkpoint.pt" in wrote and "metrics.jsonl" in wrote
    assert lines[-1].startswith("pvae train: compare-test.md, evaluation-test.json predate epochs 3-3")


def test_run_folder_files_get_open_modes_and_config_holds_the_fit_once(tmp_path):
    import json
    import os

    old = os.umask(0o022)
    try:
        assert main([*TINY[:-1], "--epochs", "1", "--report", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert {"checkpoint.pt", "metrics.jsonl", "config.json", "samples.png", "report.html"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(config) == {"format", "fit", "run"} and "fit" not in config["run"]
