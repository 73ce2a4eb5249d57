"""Bad input never reaches a traceback, and nothing good is lost: every mistake in flags, files, data,
programs or the disk gets one line naming the culprit (the flag as typed, the file, the key, the
site), exit code 2 for a mistake in what was given and 1 for a failure on the way, and leaves every
file as it was."""

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pvae
from pvae.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from pvae.cli import COMMANDS, main, make_parser
from pvae.data import IDX_FILES, Dataset, binarize_dataset
from pvae.errors import message
from pvae.metrics import read_metrics
from pvae.guides import mlp_guide
from pvae.models import mlp_vae
from pvae.programs import ProgramError

TINY = ["--hidden", "16", "--batch-size", "256", "--no-progress", "--no-figures"]


def cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``pvae argv``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pvae {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished two-epoch run of the command line, to copy and damage."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--epochs", "2", *TINY, "--out", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


# ----------------------------------------------------------------------------- the command line


def test_every_flag_of_every_command_has_help_and_a_shown_default():
    parser = make_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        for action in command._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            assert action.help and action.help.strip(), f"pvae {name} {flag} has no help text"
            assert "default" in action.help, f"pvae {name} {flag} shows no default: {action.help!r}"
        assert "--debug" in command.format_help()


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("example", sorted(p.stem for p in (Path(__file__).parents[1] / "examples").glob("*.py")
                                            if not p.name.startswith("_")))  # _study.py: no flags of its own
def test_every_flag_of_every_example_has_help_and_a_shown_default(example, monkeypatch):
    import importlib.util

    def capture(parser, argv=None, namespace=None):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    path = Path(__file__).parents[1] / "examples" / f"{example}.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as running the script does: its folder's _study.py
    spec = importlib.util.spec_from_file_location(f"example_{example}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(_Parsed) as parsed:
        module.parse_args([])
    for action in parsed.value.args[0]._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            assert action.help and "default" in action.help, f"{example} {action.option_strings[-1]}: {action.help!r}"


@pytest.mark.parametrize("argv,culprit", [
    (["train", "--hidden", "0"], "argument --hidden: must be at least 1, got 0"),
    (["train", "--hidden", "-5"], "argument --hidden: must be at least 1, got -5"),
    (["train", "--kl-warmup", "nan"], "argument --kl-warmup: must be finite, got nan"),
    (["train", "--lr", "inf"], "argument --lr: must be finite, got inf"),
    (["train", "--beta", "inf"], "argument --beta: must be finite, got inf"),
    (["train", "--lr", "0"], "argument --lr: must be above 0, got 0"),
    (["train", "--particles", "0"], "argument --particles: must be at least 1, got 0"),
    (["train", "--epochs", "2.5"], "argument --epochs: must be an integer, got '2.5'"),
    (["train", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--data-dir", "."], "--data-dir is not used by the digits data set"),
    (["train", "--dataset", "cifar"], "--dataset 'cifar' is unknown"),
    (["train", "--val-size", "100000"], "--val-size must be in [0, "),
    (["train", "--resume"], "--resume needs --out RUN"),
    (["train", "--resume", "--out", "elsewhere", "--lr", "0.1"], "--resume keeps the run's own settings: drop --lr"),
    (["evaluate", "RUN", "--samples", "0"], "argument --samples: must be at least 1, got 0"),
    (["evaluate", "RUN", "--split", "all"], "argument --split: invalid choice: 'all'"),
    (["sample", "RUN", "-n", "-1"], "argument -n/--num: must be at least 1, got -1"),
    (["compare", "RUN", "--refine-steps", "0"], "argument --refine-steps: must be at least 1, got 0"),
    (["compare", "RUN", "--curves", "MISSING"], "--curves MISSING: no run folder there"),
])
def test_command_line_mistakes_get_one_line_naming_the_flag_and_exit_code_2(argv, culprit, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert culprit in one_line_error(err, argv[0])
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_debug_shows_the_traceback_instead(capsys):
    with pytest.raises(ValueError, match="'cifar' is unknown"):
        main(["train", "--dataset", "cifar", "--debug"])


def test_an_error_in_your_own_factory_is_one_line_pointing_to_debug(tmp_path, capsys):
    factory = tmp_path / "broken.py"
    factory.write_text("def build(data):\n    return {}['decoder']\n")
    code, _, err = cli(capsys, "train", "--model", f"{factory}:build", "--out", tmp_path / "run", *TINY)
    assert code == 1
    assert "KeyError: 'decoder' (run it again with --debug for the traceback)" in one_line_error(err, "train")


def test_a_diverging_run_stops_with_exit_code_1_naming_epoch_and_step(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--lr", "1e6", "--epochs", "3", *TINY, "--out", tmp_path / "run")
    line = one_line_error(err, "train")
    assert code == 1
    assert "diverged in epoch 1 at step " in line and "lower the learning rate" in line
    assert line.endswith("no checkpoint was written")
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_resume_asking_for_no_more_epochs_is_refused_and_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    for more in (["--epochs", "1"], []):
        code, _, err = cli(capsys, "train", "--resume", "--out", run_copy, *more, "--no-progress")
        assert code == 2
        assert f"--epochs is {more[1] if more else 2}, but the run in {run_copy} has done 2 epochs" in one_line_error(err, "train")
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- files


def test_a_missing_data_set_creates_no_folders(tmp_path, monkeypatch, capsys):
    import torchvision.datasets
    from urllib.error import URLError

    def no_network(self, *args, **kwargs):  # what torchvision does offline: folders first, then the failure
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    monkeypatch.setenv("PVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", "--dataset", "mnist", *TINY)
    assert code == 1 and "could not download mnist" in one_line_error(err, "train")
    code, _, err = cli(capsys, "train", "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", *TINY)
    assert code == 2 and f"--data-dir {tmp_path / 'nowhere'}: no such folder" in one_line_error(err, "train")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_gz_file_is_named(damage, tmp_path, capsys):
    from test_data import idx_folder

    data = tmp_path / "data"
    idx_folder(data, gz_train=True)
    gz = data / (IDX_FILES["train_images"] + ".gz")
    gz.write_bytes(gz.read_bytes()[:-20] if damage == "truncated" else b"plain bytes, not gzip")
    code, _, err = cli(capsys, "train", "--dataset", data, "--out", tmp_path / "run", *TINY)
    assert code == 2
    assert f"{gz} is not a whole gzip file" in one_line_error(err, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["another program's dict", "a bare tensor", "truncated", "weights of another size"])
def test_a_checkpoint_that_is_not_this_runs_is_named(content, run_copy, capsys):
    path = run_copy / CHECKPOINT
    if content == "another program's dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif content == "a bare tensor":
        torch.save(torch.zeros(3), path)
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        state = load_checkpoint(path)
        state["config"]["run"]["hidden"] = [32]  # the config disagrees with the weights
        torch.save(state, path)
    before = snapshot(run_copy)
    for command in ("evaluate", "sample", "compare"):
        code, _, err = cli(capsys, command, run_copy)
        assert code == 2
        line = one_line_error(err, command)
        assert str(path) in line
        if content == "weights of another size":
            assert "does not fit this model's weights" in line and "another architecture" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("edit,culprit", [
    (lambda c: c["fit"].update(learning_rate=0.1), "fit.learning_rate is not a setting"),
    (lambda c: c["run"].update(hiden=[8]), "run.hiden is not a setting"),
    (lambda c: c["fit"].update(lr="fast"), "fit.lr must be a number, got 'fast'"),
    (lambda c: c["run"].update(hidden=[16, "x"]), "run.hidden must be a list of integers"),
    (lambda c: c["fit"].update(epochs=0), "fit.epochs must be at least 1, got 0"),
    (lambda c: c.pop("run"), "run section is missing"),
    (None, "is not valid JSON"),
])
def test_a_hand_edited_config_json_is_refused_naming_file_and_key(edit, culprit, run_copy, capsys):
    path = run_copy / "config.json"
    if edit is None:
        path.write_text(path.read_text()[:-10])
    else:
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    before = snapshot(run_copy)
    code, _, err = cli(capsys, "train", "--resume", "--out", run_copy, "--epochs", "3", "--no-progress")
    assert code == 2
    line = one_line_error(err, "train")
    assert str(path) in line and culprit in line
    assert snapshot(run_copy) == before


def test_data_outside_0_1_or_nan_cannot_be_binarized():
    x = torch.linspace(0, 2, 80).reshape(20, 4)
    with pytest.raises(ValueError, match=r"train split of 'tensors' holds values from 0 to 2: scale the data"):
        binarize_dataset(Dataset.from_tensors(x), "dynamic")
    x = x / 2
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="and NaN or infinite ones"):
        binarize_dataset(Dataset.from_tensors(x), "static")


def test_a_guide_latent_of_the_wrong_size_is_named():
    data = pvae.load_dataset("digits", binarize="static")
    with pytest.raises(ProgramError, match=r"guide site 'z' has shape \(128, 3\) where the model's has \(128, 2\)"):
        pvae.fit(mlp_vae(64, 2, (8,)), mlp_guide(64, 3, (8,)), data, pvae.FitConfig(epochs=1, batch_size=128, progress=False))


# ----------------------------------------------------------------------------- the disk


def test_a_checkpoint_is_never_written_from_non_finite_tensors(tmp_path):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"w": torch.ones(3)})
    before = path.read_bytes()
    with pytest.raises(FloatingPointError, match=r"optimizers\[0\]\.exp_avg holds NaN or infinite values"):
        save_checkpoint(path, {"w": torch.ones(3), "optimizers": [{"exp_avg": torch.tensor([1.0, float("nan")])}]})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 256 KiB at tmp_path/disk, which the test may fill or make read-only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_says_so(small_disk):
    data = pvae.load_dataset("digits", binarize="static")
    run = small_disk / "run"

    def fill_in_epoch_2(record, model, guide):
        if record["epoch"] == 2:
            fill(small_disk)

    with pytest.raises(OSError) as e:
        pvae.fit(mlp_vae(64, 2, (8,)), mlp_guide(64, 2, (8,)), data, pvae.FitConfig(epochs=3, batch_size=128, progress=False),
                 out_dir=run, callbacks=[fill_in_epoch_2])
    assert message(e.value) == (f"{run / CHECKPOINT}: the disk is full (no space left on the device): free some space "
                                f"or write elsewhere; {run / CHECKPOINT} keeps epoch 1 (step 11)")
    assert load_checkpoint(run)["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(run)] == [1], "no metrics for an epoch the checkpoint lacks"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl"]


def test_a_full_disk_at_the_first_checkpoint_and_at_evaluate(small_disk, capsys):
    run = small_disk / "run"
    code, _, err = cli(capsys, "train", "--epochs", "1", "--hidden", "400", "--out", run, *TINY[2:])
    line = one_line_error(err, "train")
    assert code == 1 and "the disk is full" in line and line.endswith("no checkpoint was written")
    assert not list(run.glob(".*.tmp")) and not (run / CHECKPOINT).exists()

    shutil.rmtree(run)
    assert main(["train", "--epochs", "1", *TINY, "--out", str(run)]) == 0
    fill(small_disk)
    capsys.readouterr()
    code, out, err = cli(capsys, "evaluate", run, "--samples", "2", "--max-datapoints", "20", "--no-progress")
    assert code == 1 and "the disk is full" in one_line_error(err, "evaluate")
    assert "log p̂(x)" in out or "log p" in out, "the results are printed before they are written"
    assert not list(run.glob(".*.tmp"))


def test_a_read_only_run_folder_is_said_in_words_before_any_work(small_disk, capsys):
    run = small_disk / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(run)]) == 0
    before = snapshot(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    capsys.readouterr()
    for argv in (["evaluate", run], ["compare", run], ["train", "--resume", "--out", run, "--epochs", "2"],
                 ["train", "--out", small_disk / "new", *TINY]):
        code, out, err = cli(capsys, *argv, "--no-progress")
        assert code == 1
        assert "the file system is read-only: write elsewhere" in one_line_error(err, argv[0])
        assert "log p" not in out, "it failed before the work, not after"
    assert snapshot(run) == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_give_files_the_mode_open_would(tmp_path, umask):
    """mkstemp makes its files 0600: renamed into place, a report or a figure would be private to its
    writer. A new file gets 0666 less the umask, as open() gives it; a replaced file keeps its mode."""
    import os
    import stat

    from pvae.utils import atomic_write

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    def write(tmp):
        Path(tmp).write_text("new")

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "new.html", write)
        kept = tmp_path / "kept.html"
        kept.write_text("old")
        kept.chmod(0o604)
        atomic_write(kept, write)
    finally:
        os.umask(old)
    assert mode(tmp_path / "new.html") == 0o666 & ~umask
    assert mode(kept) == 0o604 and kept.read_text() == "new"
