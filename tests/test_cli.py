import json

import pytest

from pvae.cli import main


def test_train_writes_metrics_checkpoint_and_pictures_then_evaluate_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--hidden", "32", "--binarize", "dynamic", "--out", str(run), "--no-progress"]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "reconstructions.png",
            "samples.png", "latent.png", "manifold.png", "curves.png"} <= names
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["test_elbo"] < 0 for r in records)
    assert json.loads((run / "config.json").read_text())["run"]["hidden"] == [32]

    assert main(["evaluate", str(run), "--max-datapoints", "50", "--device", "cpu"]) == 0
    assert (run / "evaluation-test.json").is_file()

    assert main(["sample", str(run), "-n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0

    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--no-progress", "--no-figures"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_train_without_out_makes_a_dated_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--hidden", "16", "--no-progress", "--no-figures"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("digits-") and (run / "checkpoint.pt").is_file()


@pytest.mark.parametrize("command", ["train", "evaluate", "sample", "compare"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage: pvae " + command in capsys.readouterr().out


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["train", "--dataset", "cifar", "--out", str(tmp_path / "x")]) == 2
    assert "--dataset 'cifar' is unknown" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
