"""Data-parallel fitting: two gloo processes on 127.0.0.1 against one process.

The ranks are spawned once for the module (:func:`ranks`) and run every scenario of
``distributed_worker.py``; the tests compare what they saved with fits in this process. With a
deterministic objective (noise fixed per datapoint) two ranks with batches of B must take exactly the
steps of one process with batches of 2B; with the VAE's Monte Carlo objective the ELBO curves agree
within their Monte Carlo error.
"""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import assert_close

import distributed_worker as worker
import pvae
from pvae.checkpoint import load_checkpoint
from pvae.data import batches
from pvae.distributed import Shard

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}  # never another address
TIGHT = dict(atol=1e-12, rtol=1e-10)  # float64: sums taken in another order, nothing more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn two ranks that run every scenario; ``{scenario: [rank 0's result, rank 1's]}``."""
    folder = tmp_path_factory.mktemp("ranks")
    worker.fit_tiny(3, 1, out=folder / "one-rank")  # what scenario_from_one resumes with two ranks
    ctx = mp.get_context("spawn")
    with pytest.MonkeyPatch.context() as env:
        for key, value in LOOPBACK.items():
            env.setenv(key, value)
        port = free_port()
        processes = [ctx.Process(target=worker.run_rank, args=(rank, 2, port, str(folder)), daemon=True) for rank in (0, 1)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=300)
    stuck = [p for p in processes if p.is_alive()]
    for p in stuck:
        p.kill()
    assert not stuck, "the ranks did not finish within 300 s"
    results = {name: [torch.load(folder / f"{name}-{rank}.pt", weights_only=False) for rank in (0, 1)]
               for name in worker.SCENARIOS}
    for name, pair in results.items():
        for rank, result in enumerate(pair):
            assert "crashed" not in result, f"scenario {name}, rank {rank}:\n{result.get('crashed')}"
    return folder, results


def gathered(pair) -> torch.Tensor:
    """The whole table from the two ranks' rows: row n lives on rank n % 2."""
    table = torch.empty(worker.N, pair[0]["table"].shape[1], dtype=pair[0]["table"].dtype)
    table[0::2], table[1::2] = pair[0]["table"], pair[1]["table"]
    return table


def assert_same_dense(a: dict, b: dict, msg: str) -> None:
    for part in ("model", "globals"):
        for key in a[part]:
            assert_close(a[part][key], b[part][key], **TIGHT, msg=f"{msg}: {part} {key}")


def test_shards_cut_each_batch_of_one_process_among_the_ranks():
    """Each chunk of R x B rows of the permutation is the batch one process takes with batch size R x B;
    the ranks' parts partition it (by position, or by owner n % R), and a dynamically binarized chunk is
    drawn as that one process draws it, so that every rank's generator stays in step."""
    data = pvae.Dataset.from_tensors(torch.rand(23, 3)).with_inputs(y=torch.arange(23))
    data.binarize = "dynamic"
    for by_row in (False, True):
        single = list(batches(data, 10, torch.Generator().manual_seed(3)))
        generators = [torch.Generator().manual_seed(3) for _ in range(2)]
        parts = [list(batches(data, 5, g, shard=Shard(rank, 2, by_row))) for rank, g in enumerate(generators)]
        assert len(parts[0]) == len(parts[1]) == len(single) == 3
        for whole, mine, theirs in zip(single, *parts):
            idx = torch.cat([mine.idx, theirs.idx])
            order = torch.argsort(idx)
            assert torch.equal(idx[order], torch.sort(whole.idx).values), "the parts partition the batch"
            assert torch.equal(torch.cat([mine.x, theirs.x])[order], whole.x[torch.argsort(whole.idx)])
            assert torch.equal(mine.inputs["y"], mine.idx), "side inputs follow their rows"
            if by_row:
                assert bool((mine.idx % 2 == 0).all()) and bool((theirs.idx % 2 == 1).all())
            else:
                assert abs(len(mine) - len(theirs)) <= 1
        assert torch.equal(generators[0].get_state(), generators[1].get_state())


def test_two_ranks_take_the_steps_of_one_process_over_their_combined_batches(ranks):
    """Mean-field table (sparse, rows on their owner), global site and decoder: after two epochs with
    batches of 3 per rank (19 and 18 rows owned, so the ranks' parts differ in size and one is empty in the
    last step) every parameter and the training loss equal one process's with batches of 6, though rank 1
    built its decoder from another seed."""
    _, results = ranks
    two = results["equal"]
    one = worker.tiny_state(*worker.fit_tiny(6, 2))
    for rank in (0, 1):
        assert_same_dense(two[rank], one, f"rank {rank}")
        assert_close(two[rank]["train_loss"], one["train_loss"], **TIGHT, msg=f"rank {rank}: train_loss")
    assert_close(gathered(two), one["table"], **TIGHT, msg="per-datapoint table")
    assert two[0]["table"].shape[0] == 19 and two[1]["table"].shape[0] == 18, "each rank holds its own rows only"


def test_a_checkpoint_gathers_the_tables_so_that_another_number_of_ranks_resumes_it(ranks):
    folder, results = ranks
    two = results["equal"]
    saved = load_checkpoint(folder / "two-ranks")
    assert saved["world_size"] == 2
    assert_close(saved["programs"]["modules"]["guide"][0]["table.weight"], gathered(two), msg="saved table")
    # two ranks -> one process: restored whole
    _, guide, refused = worker.restored_tiny(folder / "two-ranks", 2)
    assert "ask for more" in refused
    assert_close(guide.table.weight.detach(), gathered(two), msg="table restored in one process")
    # one process -> two ranks: each rank takes its rows
    one_rank = load_checkpoint(folder / "one-rank")["programs"]["modules"]["guide"][0]["table.weight"]
    for rank, result in enumerate(results["from_one"]):
        assert_close(result["table"], one_rank[rank::2], msg=f"rank {rank}'s rows")
        assert "has done 1 epochs: to train on, ask for more" in result["refused"]
    # two ranks -> two ranks: the tables' Adam moments, the generator and the weights go on as if uninterrupted
    for rank in (0, 1):
        assert_same_dense(results["resume"][rank], two[rank], f"resumed rank {rank}")
        assert_close(results["resume"][rank]["table"], two[rank]["table"], **TIGHT, msg=f"resumed rank {rank}'s table")


def test_vae_elbo_curves_of_two_ranks_and_one_process_agree_within_monte_carlo_error(ranks):
    """The digits VAE (Monte Carlo objective), batches of 32 on two ranks against 64 in one process, from
    the same weights over the same batches; only the noise differs. Over 8 seeds in one process the test
    ELBO after epochs 1, 2, 3 spread with standard deviations 0.63, 0.33, 0.26 nats: the two runs must
    agree within 4 standard deviations of a difference, 4 * sqrt(2) * sd."""
    _, results = ranks
    two = results["vae"]
    _, _, history = worker.fit_vae(64, 3)
    steps = math.ceil(worker.digits().train.shape[0] / 64)
    assert [r["step"] for r in two[0]["history"]] == [r["step"] for r in history] == [steps, 2 * steps, 3 * steps]
    for record, reference, sd in zip(two[0]["history"], history, (0.63, 0.33, 0.26)):
        for key in ("test_elbo", "train_elbo"):
            assert abs(record[key] - reference[key]) < 4 * math.sqrt(2) * sd, (record["epoch"], key, record[key], reference[key])
    for mine, theirs in zip(*(result["history"] for result in two)):  # the ranks gather one evaluation
        assert all(mine[key] == theirs[key] for key in ("train_loss", "train_elbo", "test_elbo", "test_kl"))
    for part in ("model", "guide"):  # every rank steps alike: the same weights, bit for bit
        for key, value in two[0][part].items():
            assert torch.equal(value, two[1][part][key]), f"{part} {key} differs between the ranks"
    assert not torch.equal(two[0]["noise"], two[1]["noise"]), "each rank draws noise of its own"
    assert two[0]["recorded"] and two[1]["recorded"], "each rank replays its recorded objective"


def test_a_rank_that_fails_stops_every_rank_and_is_named(ranks):
    _, results = ranks
    failed, stopped = results["fail"][1], results["fail"][0]
    assert failed["error"] == "ValueError", "rank 1 raises its own error"
    assert failed["message"].startswith("the model broke on datapoint 35")
    assert stopped["error"] == "RankFailed"
    assert stopped["message"] == "stopped because rank 1 failed: ValueError: the model broke on datapoint 35"


def test_torchrun_trains_from_the_command_line_and_errors_name_their_rank(tmp_path):
    """``torchrun --nproc_per_node=2 -m pvae train`` on the CPU: one run folder written by rank 0, steps
    of batches of 2 x 64; run again into that folder, rank 0's error stops both ranks, each saying so."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "pvae", "train", "--epochs", "1", "--binarize", "dynamic",
               "--hidden", "16", "--batch-size", "64", "--device", "cpu", "--no-progress", "--no-figures",
               "--out", str(out)]
    env = {**os.environ, **LOOPBACK, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pvae train: ") == 3, f"rank 0 alone prints:\n{done.stdout}"
    assert "x 2 ranks (batches of 2 x 64)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl"]
    (record,) = load_checkpoint(out)["history"]
    assert record["step"] == math.ceil(worker.digits().train.shape[0] / 128) and "test_elbo" in record

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert "pvae train: error: rank 0 of 2: " in again.stderr and "already holds a run" in again.stderr
    assert "pvae train: error: rank 1 of 2: stopped because rank 0 failed: FileExistsError" in again.stderr


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes(ranks):
    """SIGTERM to rank 1 alone after epoch 1 (7 steps an epoch): the ranks agree on the stop at step
    16 (they exchange stop requests every pvae.distributed.STOP_EVERY steps), the checkpoint is saved
    there by both, and resuming ends where an uninterrupted run of the same 3 epochs does."""
    folder, results = ranks
    every = pvae.distributed.STOP_EVERY
    for rank, result in enumerate(results["stop"]):
        assert result["stopped"] is not None, f"rank {rank} did not stop"
        assert f"(step {every})" in result["stopped"] and "SIGTERM" in result["stopped"], result["stopped"]
        assert_same_dense(result["resumed"], result["straight"], f"rank {rank} resumed")
        assert_close(result["resumed"]["table"], result["straight"]["table"], **TIGHT, msg=f"rank {rank}'s table")
    assert load_checkpoint(folder / "stopped")["step"] == 3 * 7
