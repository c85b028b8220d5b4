"""The sealed holdout: rows that share no document with the validation rows (found from the text, not from the harness's
own bookkeeping), in the fingerprint, scored by every evaluate_bpb (MLX and torch) and recorded in the cache's
holdout.tsv beside the commit and val_bpb, printed nowhere; a validation shard too short for both gets no holdout and
one clear line, never an overlap."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import prepare
from conftest import synthetic_documents

K = 8  # tokens in a window: long enough that a window of these synthetic documents names one document


def documents_of(rows, windows):
    """The documents the rows' windows of K tokens come from, and the share of windows that named exactly one (a
    window across two packed pieces names none)."""
    found, named, total = set(), 0, 0
    for row in rows.astype(np.int64):
        for start in range(len(row) - K + 1):
            hits = windows.get(tuple(row[start : start + K]), set())
            total += 1
            if len(hits) == 1:
                named += 1
                found |= hits
    return found, named / total


def test_holdout_rows_share_no_document_with_the_validation_rows(prepared_cache):
    tokenizer = prepare.Tokenizer.load()
    texts = synthetic_documents(150, seed=1000)  # conftest's validation file, as the corpus wrote it
    windows = {}
    for number, ids in enumerate(tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())):
        for start in range(len(ids) - K + 1):
            windows.setdefault(tuple(ids[start : start + K]), set()).add(number)
    val, holdout = prepare.load_val_rows(), prepare.load_holdout_rows()
    assert holdout.shape == (prepare.HOLDOUT_ROWS, prepare.MAX_SEQ_LEN + 1) == (8, 65)
    val_docs, val_named = documents_of(val, windows)
    holdout_docs, holdout_named = documents_of(holdout, windows)
    assert val_named > 0.8 and holdout_named > 0.8  # the windows do name the rows' documents
    assert val_docs and holdout_docs and not val_docs & holdout_docs
    used, n_docs = prepare.validation_documents()
    assert n_docs == 150 and val_docs <= set(used.tolist())  # the harness's own account covers what the text shows


def test_a_shard_too_short_for_both_gets_no_holdout_and_one_line(prepared_cache, monkeypatch, capsys):
    """Validation rows that cycle through the whole shard leave no document free: 0 holdout rows, a line saying why,
    no record; the fingerprint still names the (empty) holdout."""
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 64 * 1500)  # more than the synthetic shard holds (~45k tokens)
    monkeypatch.setattr(prepare, "HOLDOUT_ROWS", 375)
    assert prepare.load_holdout_rows().shape == (0, 65)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and re.match(r"eval: no holdout: the validation rows use \d+ of the validation "
                                              r"shard's 150 documents and the other \d+ hold fewer than the "
                                              r"holdout's 24,000 tokens, so runs record no holdout_bpb", out)
    before = prepare.read_holdout()
    import mlx.core as mx

    prepare.evaluate_bpb(lambda ids: mx.zeros((*ids.shape, prepare.VOCAB_SIZE)), 64)
    assert prepare.read_holdout() == before
    assert prepare.load_holdout_rows().shape == (0, 65) and "no holdout" not in capsys.readouterr().out  # built once


def git_repository(path):
    path.mkdir()
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (path / "train.py").write_text("print('a training script')\n")
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "an experiment"], check=True)
    return subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()


def expected_uniform_bpb(rows):
    target_bytes = prepare.get_token_bytes()[rows[:, 1:].astype(np.int64)]
    return math.log2(prepare.VOCAB_SIZE) * (target_bytes > 0).sum() / target_bytes.sum()


def test_every_evaluation_records_the_holdout_beside_commit_and_val_bpb_and_prints_it_nowhere(
        prepared_cache, tmp_path, monkeypatch, capsys):
    import mlx.core as mx

    commit = git_repository(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    before = len(prepare.read_holdout())
    uniform = lambda ids: mx.zeros((*ids.shape, prepare.VOCAB_SIZE))  # noqa: E731
    val_bpb = prepare.evaluate_bpb(uniform, 5)
    (tmp_path / "repo" / "train.py").write_text("print('an uncommitted edit')\n")
    prepare.evaluate_bpb(uniform, 3)
    out = capsys.readouterr().out
    records = prepare.read_holdout()
    assert len(records) == before + 2
    first, second = records[-2:]
    holdout_bpb = expected_uniform_bpb(prepare.load_holdout_rows())
    assert abs(holdout_bpb - val_bpb) > 1e-3  # other rows, another score
    assert first["commit"] == commit and first["tree"] == "clean" and second["tree"] == "dirty"
    assert first["val_bpb"] == f"{val_bpb:.6f}" and float(first["holdout_bpb"]) == pytest.approx(holdout_bpb, abs=1e-6)
    assert first["harness"] == prepare.harness_fingerprint() and first["timestamp"].endswith("Z")
    assert all(re.fullmatch(rf"eval: [\d,]+/{prepare.EVAL_TOKENS:,} tokens \| .* tok/s \| \d+s left", line)
               for line in out.splitlines())  # the validation rows' progress line, nothing else
    for figure in (f"{holdout_bpb:.6f}", f"{holdout_bpb:.4f}", f"{holdout_bpb:.2f}"):
        assert figure not in out


def test_torch_models_and_mlx_models_score_the_same_holdout(prepared_cache, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (uv sync --extra torch)")
    import mlx.core as mx

    rng = np.random.default_rng(3)
    left = rng.normal(size=(prepare.VOCAB_SIZE, 8)).astype(np.float32)
    right = rng.normal(size=(8, prepare.VOCAB_SIZE)).astype(np.float32)

    class LowRank(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.left = torch.nn.Parameter(torch.from_numpy(left))
            self.right = torch.nn.Parameter(torch.from_numpy(right))

        def forward(self, ids):
            return self.left[ids] @ self.right

    monkeypatch.chdir(tmp_path)  # not a repository: the record says so
    left_mx, right_mx = mx.array(left), mx.array(right)
    prepare.evaluate_bpb(lambda ids: left_mx[ids] @ right_mx, 8)
    prepare.evaluate_bpb(LowRank(), 8)
    by_mlx, by_torch = prepare.read_holdout()[-2:]
    assert by_mlx["commit"] == by_torch["commit"] == "-"
    assert float(by_torch["holdout_bpb"]) == pytest.approx(float(by_mlx["holdout_bpb"]), abs=2e-6)
    rows = prepare.load_holdout_rows().astype(np.int64)  # and both are the numpy reference's score
    logits = (left[rows[:, :-1]] @ right).astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nats = log_z - np.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]
    nbytes = prepare.get_token_bytes()[rows[:, 1:]]
    assert float(by_mlx["holdout_bpb"]) == pytest.approx(nats[nbytes > 0].sum() / (math.log(2) * nbytes.sum()),
                                                         abs=2e-6)


def test_the_holdout_rows_are_fingerprinted_and_rebuilt_when_damaged(prepared_cache, capsys):
    path = prepare.val_rows_path("holdout")
    good, fingerprint = np.load(path), prepare.harness_fingerprint()
    try:
        prepare._write_atomic(path, lambda f: np.save(f, good[::-1].copy()))
        assert prepare.harness_fingerprint() != fingerprint
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        prepare.check_cache()
        assert "holdout rows" in capsys.readouterr().out and np.array_equal(np.load(path), good)
    finally:
        prepare._write_atomic(path, lambda f: np.save(f, good))
    assert prepare.harness_fingerprint() == fingerprint


def test_concurrent_records_are_all_kept(prepared_cache, tmp_path):
    """Four processes sharing the cache record at once: every row arrives whole."""
    code = ("import prepare\nfor i in range(10):\n    prepare.record_holdout(1.0 + i / 1e6, 2.0, 'x' * 12)\n")
    before = len(prepare.read_holdout())
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    records = prepare.read_holdout()
    assert len(records) == before + 40
    assert sorted(r["val_bpb"] for r in records[before:]) == sorted([f"{1.0 + i / 1e6:.6f}" for i in range(10)] * 4)
    assert all(r["holdout_bpb"] == "2.000000" and r["harness"] == "x" * 12 for r in records[before:])


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_data_parallel_ranks_record_one_holdout_score_equal_to_one_process(prepared_cache, tmp_path, backend):
    """tests/distributed_worker.py scores the same initial weights as one process and as two launched ranks: one
    record per run (rank 0 writes it), with the same val_bpb and holdout_bpb."""
    from test_distributed import WORKER, launch

    before = len(prepare.read_holdout())
    for n in (1, 2):
        (tmp_path / f"out{n}").mkdir()
        launch(backend, [WORKER, backend, str(tmp_path / f"out{n}")], n=n)
    records = prepare.read_holdout()[before:]
    assert len(records) == 2
    single, ranks = records
    assert single["val_bpb"] == ranks["val_bpb"]
    assert float(single["holdout_bpb"]) == pytest.approx(float(ranks["holdout_bpb"]), abs=2e-6)
    assert single["harness"] != ranks["harness"]  # the fingerprint counts the processes
