"""Data parallelism, proven on localhost with the frameworks' own launchers (MLX's ring backend under `mlx.launch`,
torch's gloo under `torchrun`): two processes read disjoint shares of the one training stream, train like one process
taking the same global batch, score exactly like one process, and a launched smoke run prints one summary."""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SMOKE_SCRIPTS, check_step_log

BIN = os.path.dirname(sys.executable)  # the venv's launchers: mlx.launch, torchrun
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
TIMEOUT = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend, args, n=2, **env):
    """Run `python args...` as n processes under the backend's launcher (n=1: a plain process, no launcher)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)  # shared cores: no OpenMP spinning against the other rank
    if n == 1:
        command = [sys.executable, *args]
    elif backend == "mlx":  # ring backend, both ranks on this machine, on ports nobody else is using now
        command = [os.path.join(BIN, "mlx.launch"), "--backend", "ring", "-n", str(n), "--starting-port",
                   str(free_port()), "--python", sys.executable, *args]
    else:
        pytest.importorskip("torch")
        command = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(n), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module", params=["mlx", "torch"])
def worker_runs(request, prepared_cache, tmp_path_factory):
    """The worker as one plain process and as two launched ranks: (backend, single, [rank 0, rank 1])."""
    backend = request.param
    if backend == "torch":
        pytest.importorskip("torch")
    results = {}
    for n in (1, 2):
        out = tmp_path_factory.mktemp(f"{backend}-{n}")
        launch(backend, [WORKER, backend, str(out)], n=n)
        results[n] = [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]
    return backend, results[1][0], results[2]


def weights(result):
    return {k: v for k, v in result.items() if k.startswith("weights/")}


def test_ranks_read_disjoint_shares_of_the_one_stream(worker_runs):
    _, single, ranks = worker_runs
    stream = single["seen"]  # the first 12 batches one process reads
    assert len({b.tobytes() for b in stream}) == len(stream)  # distinct batches, so the checks below mean something
    for rank, result in enumerate(ranks):
        np.testing.assert_array_equal(result["seen"], stream[rank::2])  # every 2nd batch, starting at the rank
    assert not {b.tobytes() for b in ranks[0]["seen"]} & {b.tobytes() for b in ranks[1]["seen"]}


def test_two_process_evaluation_equals_one_process_exactly(worker_runs):
    _, single, ranks = worker_runs
    assert ranks[0]["val_bpb"] == ranks[1]["val_bpb"] == single["val_bpb"]  # bit for bit, not approximately


def test_two_processes_train_like_one_with_the_same_global_batch(worker_runs):
    backend, single, ranks = worker_runs
    for rank in ranks:  # the ranks agree with each other exactly: the same averaged gradients, the same update
        np.testing.assert_array_equal(rank["losses"], ranks[0]["losses"])
        for key, value in weights(rank).items():
            np.testing.assert_array_equal(value, ranks[0][key], err_msg=key)
    # ... and with one process up to float32 rounding (gradients are summed in another order)
    np.testing.assert_allclose(ranks[0]["losses"], single["losses"], rtol=1e-5)
    initial_loss_moved = abs(single["losses"][-1] - single["losses"][0]) > 1e-4
    assert initial_loss_moved, f"{backend}: training did not change the loss, the comparison would prove nothing"
    for key, want in weights(single).items():
        err = np.abs(ranks[0][key] - want).max()
        assert err <= 1e-4 * max(1.0, np.abs(want).max()), f"{backend} {key}: max weight difference {err:.2e}"


@pytest.mark.parametrize("backend, script", [
    ("mlx", "train_mamba_3_mlx.py"), ("mlx", "train_hybrid_moe_mlx.py"), ("torch", "train_mamba.py"),
])
def test_launched_smoke_run_prints_one_summary(prepared_cache, backend, script):
    done = launch(backend, [os.path.join(SMOKE_SCRIPTS, script)])
    assert done.stdout.count("\n---\n") == 1, done.stdout[-3000:]
    assert done.stdout.count("preset: smoke (") == 1  # only rank 0 talks, from the first line on
    summary = dict(re.findall(r"^(\w+): (.*)$", done.stdout.split("\n---\n")[-1], flags=re.M))
    assert summary["world_size"] == "2"
    assert summary["budget_check"] == "ok"
    assert 0 < float(summary["val_bpb"]) < 20
    check_step_log(done.stdout, summary)  # rank 0's lines: one per step, the stop nearest to the budget
    assert "x 2 processes" in done.stdout


def test_loader_shares_interleave_to_the_single_stream(prepared_cache):
    """In one process, no launcher: three ranks' loaders together give the single loader's batches, in order."""
    import prepare

    tokenizer = prepare.Tokenizer.from_directory()
    single = prepare.make_dataloader(tokenizer, 2, 16, "train")
    stream = [next(single)[0] for _ in range(9)]
    for rank in range(3):
        loader = prepare.make_dataloader(tokenizer, 2, 16, "train", rank=rank, world_size=3)
        for want in stream[rank::3]:
            np.testing.assert_array_equal(next(loader)[0], want)
