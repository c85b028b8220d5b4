"""The fixed harness: presets, tokenizer, packing, dataloader, evaluate_bpb, offline preparation, fingerprint."""

import json
import math
import re
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import prepare
import prepare_mlx_mamba_3
from conftest import ROOT, write_parquet

# ---------------------------------------------------------------------------------------------------------------------
# Presets


def write_json(path, data):
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"prepare": {"MAX_SEQ_LEN": 128}, "training": {}}, "unknown section 'training'"),
        ({"prepare": {"MAX_SEQ": 128}}, "unknown key 'MAX_SEQ' in section 'prepare'"),
        ({"prepare": {"MAX_SEQ_LEN": "128"}}, "prepare.MAX_SEQ_LEN must be a positive number"),
        ({"prepare": {"EVAL_TOKENS": -5}}, "prepare.EVAL_TOKENS must be a positive number"),
        ({"train_mamba_3_mlx": [1, 2]}, "section 'train_mamba_3_mlx' must be a JSON object"),
        ('{"prepare": {', "is not valid JSON"),
    ],
)
def test_bad_preset_file_is_a_clear_error(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(prepare.HarnessError, match=message) as error:
        prepare.load_preset(path)
    assert path in str(error.value)


def test_unreadable_preset_file_names_the_file(tmp_path):
    with pytest.raises(prepare.HarnessError, match="Cannot read preset file .*missing.json"):
        prepare.load_preset(str(tmp_path / "missing.json"))


def test_write_constants_changes_values_keeps_comments_and_checks_keys_and_types(tmp_path):
    script = tmp_path / "train_x.py"
    original = ('"""A script."""\nDEPTH = 8  # blocks\nLR = 0.01\nNAME = "a#b"  # a name, with a hash\n'
                'BATCH = 8 * 2048  # tokens\nUSE_MLP = True\nLONG = (\n    1\n)\n\n\ndef f():\n    DEPTH = 1\n')
    script.write_text(original)
    changed = prepare.write_constants(str(script), {"DEPTH": 3, "LR": 1, "NAME": "ME*EM", "BATCH": 16384})
    assert changed == [("DEPTH", "8", "3"), ("LR", "0.01", "1.0"), ("NAME", '"a#b"', '"ME*EM"')]
    assert script.read_text() == original.replace("DEPTH = 8", "DEPTH = 3").replace("LR = 0.01", "LR = 1.0").replace(
        '"a#b"  #', '"ME*EM"  #')  # BATCH already had that value: its expression stays; f's local DEPTH too
    assert prepare.write_constants(str(script), {"DEPTH": 3}) == []
    before = script.read_text()
    for values, message in [({"DEPTH": 2, "DEPHT": 3}, "no one-line constant 'DEPHT'; its constants: .*DEPTH"),
                            ({"DEPTH": 2.5}, "DEPTH must be int like the script's 3, got 2.5"),
                            ({"USE_MLP": 1}, "USE_MLP must be bool"), ({"LONG": 2}, "no one-line constant 'LONG'")]:
        with pytest.raises(prepare.HarnessError, match=message):
            prepare.write_constants(str(script), values)
        assert script.read_text() == before  # an error writes nothing, not even the keys before it


def run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True)


def test_preset_chosen_by_name_and_bad_path_exits_with_message(tmp_path):
    shown = run_python("import prepare; print(prepare.PRESET_NAME, prepare.MAX_SEQ_LEN)",
                       AUTORESEARCH_MLX_PRESET_FILE="cpu")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["cpu", str(prepare.load_preset(os.path.join(ROOT, "presets/cpu.json"))
                                                ["prepare"]["MAX_SEQ_LEN"])]
    missing = run_python("import prepare", AUTORESEARCH_MLX_PRESET_FILE=str(tmp_path / "nope.json"))
    assert missing.returncode == 1
    assert "Preset file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_preset_by_device_asks_the_framework_not_the_driver(monkeypatch, tmp_path):
    """MLX scripts follow MLX's device, the torch mirror torch's: an NVIDIA driver beside a CPU-only MLX is a CPU."""
    import mlx.core as mx

    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    assert prepare.device_preset() == ("cpu", "MLX on the CPU")  # this machine: the mlx-cpu wheel
    monkeypatch.setattr(os.path, "exists", lambda path: True)  # /dev/nvidiactl and everything else "present"
    assert prepare.device_preset()[0] == "cpu"
    monkeypatch.undo()
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert prepare.device_preset() == ("default", "MLX on CUDA")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    for working_set, preset in [(10.7e9, "mac"), (5.3e9, "local")]:
        monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": working_set})
        assert prepare.device_preset()[0] == preset
    # The torch mirror, run as a script, declares itself before importing the harness; torch decides there.
    unset = {k: v for k, v in os.environ.items() if k not in ("AUTORESEARCH_MLX_PRESET_FILE", "AUTORESEARCH_BACKEND")}
    empty_cache = dict(unset, AUTORESEARCH_CACHE_DIR=str(tmp_path))  # the run stops at "No tokenizer", after the preset
    shown = subprocess.run([sys.executable, "train_mamba.py"], cwd=ROOT, env=empty_cache, capture_output=True,
                           text=True)
    assert "preset: cpu (" in shown.stdout and "chosen by device: torch on the CPU)" in shown.stdout, shown.stdout
    assert "No tokenizer" in shown.stderr
    shown = subprocess.run([sys.executable, "-c", "import prepare; print(prepare.PRESET_NAME, prepare.PRESET_ORIGIN)"],
                           cwd=ROOT, env=unset, capture_output=True, text=True)
    assert shown.stdout.split("\n")[-2] == "cpu by device: MLX on the CPU"


def test_shipped_presets_are_valid():
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "presets")) if f.endswith(".json"))
    assert {"default.json", "mac.json", "local.json", "cpu.json", "smoke.json"} <= set(names)
    for name in names:
        sections = prepare.load_preset(os.path.join(ROOT, "presets", name))
        p = {"MAX_SEQ_LEN": 2048, "EVAL_TOKENS": 40 * 524288, **sections["prepare"]}
        assert p["EVAL_TOKENS"] % p["MAX_SEQ_LEN"] == 0, name


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_byte_table(prepared_cache):
    tokenizer = prepare.Tokenizer.from_directory()
    token_bytes = prepare.get_token_bytes()
    assert tokenizer.get_vocab_size() == prepare.VOCAB_SIZE == len(token_bytes)
    bos = tokenizer.get_bos_token_id()
    assert bos == prepare.VOCAB_SIZE - len(prepare.SPECIAL_TOKENS)
    special_ids = [tokenizer.encoding.encode_single_token(t) for t in prepare.SPECIAL_TOKENS]
    assert all(token_bytes[i] == 0 for i in special_ids)
    assert (token_bytes[: bos] > 0).all()
    samples = ["Hello world!", "  spaces\tand\nnewlines\n\n", "12345678 3.14159", "café naïve Straße 数据 — λx", ""]
    for text in samples:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))  # every byte is counted once
        assert bos not in ids
    assert max(len(tokenizer.decode([i])) for i in tokenizer.encode("1234567890")) <= 2  # digits split in pairs
    batch = tokenizer.encode(samples, prepend=prepare.BOS_TOKEN)
    assert [ids[0] for ids in batch] == [bos] * len(samples)
    assert [ids[1:] for ids in batch] == [tokenizer.encode(t) for t in samples]


def test_missing_tokenizer_and_data_say_what_to_run(tmp_path, monkeypatch):
    with pytest.raises(prepare.HarnessError, match="prepare_mlx_mamba_3.py"):
        prepare.Tokenizer.from_directory(str(tmp_path))
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path))
    with pytest.raises(prepare.HarnessError, match="No train data .*prepare_mlx_mamba_3.py"):
        prepare.list_shards("train")


# ---------------------------------------------------------------------------------------------------------------------
# Packing and dataloader


def labelled_documents(n_docs, seed, max_len=300):
    """Documents whose tokens name themselves: doc d is [-(d + 1), d * 10_000 + 1, d * 10_000 + 2, ...], its BOS
    labelled -(d + 1) so the test can tell whose start it is (the packer never looks at token values)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n_docs)
    return [np.array([-(d + 1)] + [d * 10_000 + i for i in range(1, n)], dtype=np.int32) for d, n in enumerate(lengths)]


@pytest.mark.parametrize("row_len, buffer_size", [(65, 8), (129, 50), (513, 20)])
def test_best_fit_packing_invariants(row_len, buffer_size):
    docs = labelled_documents(400, seed=row_len)
    packer = prepare.BestFitPacker(row_len, buffer_size)
    rows, fed = [], 0
    while True:
        while fed < len(docs) and (packer.needs_documents() or packer.buffered_tokens() < row_len):
            packer.add(docs[fed])
            fed += 1
        row = packer.next_row()
        if row is None:
            break
        rows.append(row)
    assert fed == len(docs) and packer.buffered_tokens() < row_len
    assert all(len(r) == row_len for r in rows)  # exact rows, no padding
    # no token lost or invented: rows plus what is left in the buffer hold every document token exactly once
    emitted = np.concatenate(rows + packer.pieces)
    assert np.array_equal(np.sort(emitted), np.sort(np.concatenate(docs)))
    # split pieces stay in order: within a row, consecutive tokens of one document are consecutive positions
    for row in rows:
        for a, b in zip(row[:-1], row[1:]):
            if a > 0 and b > 0 and a // 10_000 == b // 10_000:
                assert b == a + 1
    # every document starts with its BOS: inside a row, a BOS is always followed by its own document's first token
    # (a BOS can only be separated from it by a row boundary, when the document was split right after it)
    bos_seen = 0
    for row in rows:
        for a, b in zip(row[:-1], row[1:]):
            if a < 0 and len(docs[-a - 1]) > 1:
                assert b == (-a - 1) * 10_000 + 1
                bos_seen += 1
    assert bos_seen > len(docs) // 2
    # best fit leaves little behind: all but the last partial row's worth of tokens went into rows
    assert packer.buffered_tokens() < row_len


def test_dataloader_shapes_shift_and_determinism(prepared_cache):
    tokenizer = prepare.Tokenizer.from_directory()
    bos = tokenizer.get_bos_token_id()
    first = prepare.make_dataloader(tokenizer, 4, 32, "train")
    second = prepare.make_dataloader(tokenizer, 4, 32, "train")
    for _ in range(20):
        (x1, y1, e1), (x2, y2, e2) = next(first), next(second)
        assert x1.shape == y1.shape == (4, 32) and x1.dtype == y1.dtype == np.int32
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and e1 == e2 == 1
        assert np.array_equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
        assert ((0 <= x1) & (x1 < prepare.VOCAB_SIZE)).all()
    assert (x1 == bos).any()


def test_dataloader_cycles_with_epoch_counter(prepared_cache):
    tokenizer = prepare.Tokenizer.from_directory()
    val_docs = prepare.pq.read_table(prepare.shard_path(prepare.VAL_SHARD)).column("text").to_pylist()
    val_tokens = sum(len(ids) for ids in tokenizer.encode(val_docs, prepend=tokenizer.get_bos_token_id()))
    loader = prepare.make_dataloader(tokenizer, 8, 63, "val")
    epochs = [next(loader)[2] for _ in range(2 * val_tokens // (8 * 64) + 10)]
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 2


def test_dataloader_stops_its_thread_when_closed_or_dropped(prepared_cache):
    """No producer thread outlives its loader: at the end of a run none is left inside the tokenizer or the parquet
    reader while the process tears down."""
    import threading

    tokenizer = prepare.Tokenizer.from_directory()
    before = set(threading.enumerate())
    loader = prepare.make_dataloader(tokenizer, 2, 16, "train", prefetch=2)
    next(loader)  # the producer is running, and blocks on a full queue soon after
    (producer,) = set(threading.enumerate()) - before
    loader.close()
    assert not producer.is_alive()
    loader = prepare.make_dataloader(tokenizer, 2, 16, "train")
    next(loader)
    (producer,) = set(threading.enumerate()) - before
    del loader  # dropped, as at the end of main()
    assert not producer.is_alive()


def test_corrupt_shard_is_a_clear_error(prepared_cache, tmp_path, monkeypatch):
    shutil.copy(prepare.shard_path(0), tmp_path / "shard_00000.parquet")
    with open(tmp_path / "shard_00001.parquet", "wb") as f:
        f.write(b"PAR1 this is not a parquet file")
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path))
    texts = prepare.iter_texts("train")
    with pytest.raises(prepare.HarnessError,
                       match="Corrupt shard .*shard_00001.parquet.*Delete this cached copy.*--data-dir DIR"):
        for _ in range(10_000):
            next(texts)


# ---------------------------------------------------------------------------------------------------------------------
# evaluate_bpb


def test_evaluate_bpb_uniform_logits_is_log2_vocab_per_byte(prepared_cache):
    import mlx.core as mx

    rows = prepare.load_val_rows()
    assert rows.shape == (prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN, prepare.MAX_SEQ_LEN + 1)
    token_bytes = prepare.get_token_bytes()
    target_bytes = token_bytes[rows[:, 1:].astype(np.int64)]
    expected = math.log2(prepare.VOCAB_SIZE) * (target_bytes > 0).sum() / target_bytes.sum()
    uniform = lambda ids: mx.zeros((*ids.shape, prepare.VOCAB_SIZE))  # noqa: E731
    for batch_size in (1, 5, 32):  # also a batch size that does not divide the rows
        assert prepare.evaluate_bpb(uniform, batch_size) == pytest.approx(expected, rel=1e-6)


def low_rank_logits(seed=0, rank=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(prepare.VOCAB_SIZE, rank)).astype(np.float32), rng.normal(
        size=(rank, prepare.VOCAB_SIZE)).astype(np.float32)


def test_evaluate_bpb_is_deterministic_and_matches_a_numpy_reference(prepared_cache):
    import mlx.core as mx

    left, right = low_rank_logits()
    left_mx, right_mx = mx.array(left), mx.array(right)
    model = lambda ids: left_mx[ids] @ right_mx  # noqa: E731
    score = prepare.evaluate_bpb(model, 8)
    assert score == prepare.evaluate_bpb(model, 8)
    rows = prepare.load_val_rows().astype(np.int64)
    logits = (left[rows[:, :-1]] @ right).astype(np.float64)
    targets = rows[:, 1:]
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nats = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    nbytes = prepare.get_token_bytes()[targets]
    expected = nats[nbytes > 0].sum() / (math.log(2) * nbytes.sum())
    assert score == pytest.approx(expected, rel=1e-5)


def test_cpu_scoring_matches_the_native_logsumexp(prepared_cache):
    """The CPU branch (numpy takes the exps) and the GPU branch (mx.logsumexp in the graph), run here on the CPU."""
    import mlx.core as mx

    left, right = low_rank_logits(seed=2)
    left_mx, right_mx = mx.array(3 * left), mx.array(right)  # a wide spread of logits
    model = lambda ids: left_mx[ids] @ right_mx  # noqa: E731
    rows = prepare.load_val_rows()[:8].astype(np.int32)
    by_numpy = prepare._mlx_token_losses(model, on_gpu=False)(model, rows[:, :-1], rows[:, 1:])
    native = prepare._mlx_token_losses(model, on_gpu=True)(model, rows[:, :-1], rows[:, 1:])
    assert by_numpy.shape == native.shape == rows[:, 1:].shape
    np.testing.assert_allclose(by_numpy, native, rtol=1e-6, atol=1e-5)


def test_evaluate_bpb_mlx_and_torch_agree(prepared_cache):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (uv sync --extra torch)")
    import mlx.core as mx

    left, right = low_rank_logits(seed=1)

    class LowRank(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.left = torch.nn.Parameter(torch.from_numpy(left))
            self.right = torch.nn.Parameter(torch.from_numpy(right))

        def forward(self, ids):
            return self.left[ids] @ self.right

    left_mx, right_mx = mx.array(left), mx.array(right)
    mlx_score = prepare.evaluate_bpb(lambda ids: left_mx[ids] @ right_mx, 8)
    torch_score = prepare.evaluate_bpb(LowRank(), 8)
    assert torch_score == pytest.approx(mlx_score, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Offline preparation, end to end


def test_offline_prepare_is_complete_and_idempotent(prepared_cache, corpus_dir, capsys):
    assert sorted(os.listdir(prepare.DATA_DIR)) == ["manifest.json", "shard_00000.parquet", "shard_00001.parquet",
                                                    "shard_06542.parquet"]
    manifest = json.loads(open(os.path.join(prepare.DATA_DIR, "manifest.json")).read())
    assert manifest["source"] == os.path.realpath(corpus_dir)
    assert manifest["files"]["shard_06542.parquet"]["sha256"] == prepare._file_digest(
        os.path.join(corpus_dir, "val.parquet"), 64)
    tokenizer_file = os.path.join(prepare.TOKENIZER_DIR, "tokenizer.pkl")
    before = os.path.getmtime(tokenizer_file), os.path.getmtime(prepare.val_rows_path())
    prepare_mlx_mamba_3.prepare_cache(data_dir=corpus_dir)
    out = capsys.readouterr().out
    assert "(0 files copied)" in out and "already trained" in out and "(cached)" in out
    assert (os.path.getmtime(tokenizer_file), os.path.getmtime(prepare.val_rows_path())) == before
    assert not [f for root, _, files in os.walk(prepare.CACHE_DIR) for f in files if f.endswith(".tmp")]


def test_offline_source_errors(tmp_path):
    with pytest.raises(prepare.HarnessError, match="no such directory"):
        prepare_mlx_mamba_3.import_local_corpus(str(tmp_path / "absent"))
    write_parquet(tmp_path / "a.parquet", ["some text"])
    with pytest.raises(prepare.HarnessError, match="no val.parquet"):
        prepare_mlx_mamba_3.import_local_corpus(str(tmp_path))
    os.remove(tmp_path / "a.parquet")
    write_parquet(tmp_path / "val.parquet", ["held out"])
    with pytest.raises(prepare.HarnessError, match="no training parquet files"):
        prepare_mlx_mamba_3.import_local_corpus(str(tmp_path))
    import pyarrow as pa

    prepare.pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(prepare.HarnessError, match="has no 'text' column"):
        prepare_mlx_mamba_3.import_local_corpus(str(tmp_path))


def repository_copy(directory):
    """The harness, the presets and the three training scripts, as a fresh clone lays them out."""
    for name in ("prepare.py", "prepare_mlx_mamba_3.py", "train_mamba_3_mlx.py", "train_hybrid_moe_mlx.py",
                 "train_mamba.py"):
        shutil.copy(os.path.join(ROOT, name), directory)
    shutil.copytree(os.path.join(ROOT, "presets"), os.path.join(directory, "presets"))
    return directory


def test_setup_sizes_the_scripts_for_the_preset_and_says_what_it_did(prepared_cache, corpus_dir, tmp_path):
    """prepare_mlx_mamba_3.py writes the active preset's sections into the scripts' constant lines (and
    --architecture into ARCHITECTURE), printing each change; a second run finds them sized; --keep-scripts and a
    failed preparation leave them alone."""
    repo = repository_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("AUTORESEARCH_FAST_BLAS", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "prepare_mlx_mamba_3.py", "--architecture", "mamba-2", "--data-dir",
                           corpus_dir], cwd=repo, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    smoke = prepare.load_preset(os.path.join(ROOT, "presets", "smoke.json"))
    for script in ("train_mamba_3_mlx", "train_hybrid_moe_mlx", "train_mamba"):
        line = next(line for line in done.stdout.splitlines() if line.startswith(f"{script}.py: "))
        assert "DEPTH 8 -> 2" in line or "HYBRID_PATTERN \"MEM*EME\" -> \"ME*EM\"" in line, line
        assert ("ARCHITECTURE \"mamba-3\" -> \"mamba-2\"" in line) == (script != "train_hybrid_moe_mlx"), line
        lines = dict(re.findall(r"^([A-Z_]+) = (.+?)(?:  #.*)?$", open(tmp_path / f"{script}.py").read(), re.M))
        assert {key: eval(lines[key]) for key in smoke[script]} == smoke[script], script
    preset, cache = env["AUTORESEARCH_MLX_PRESET_FILE"], env["AUTORESEARCH_CACHE_DIR"]
    for expected in ("preset: smoke", prepare.DATA_DIR, "tokenizer: already trained",
                     f"next: AUTORESEARCH_MLX_PRESET_FILE={preset} AUTORESEARCH_CACHE_DIR={cache} "
                     f"uv run train_mamba_3_mlx.py > run.log 2>&1"):
        assert expected in done.stdout
    again = subprocess.run([sys.executable, "prepare_mlx_mamba_3.py", "--architecture", "hybrid", "--data-dir",
                            corpus_dir], cwd=repo, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and again.stdout.count("already sized for preset smoke") == 3, again.stdout
    assert "uv run train_hybrid_moe_mlx.py > run.log" in again.stdout
    prepare.write_constants(str(tmp_path / "train_mamba.py"), {"DEPTH": 5})  # an edit setup must now leave alone
    edited = open(tmp_path / "train_mamba.py").read()
    kept = subprocess.run([sys.executable, "prepare_mlx_mamba_3.py", "--keep-scripts", "--data-dir", corpus_dir],
                          cwd=repo, capture_output=True, text=True, env=env)
    assert kept.returncode == 0 and "sized" not in kept.stdout, kept.stdout
    failed = subprocess.run([sys.executable, "prepare_mlx_mamba_3.py", "--data-dir", str(tmp_path / "nothing")],
                            cwd=repo, capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert open(tmp_path / "train_mamba.py").read() == edited
    bad = subprocess.run([sys.executable, "prepare_mlx_mamba_3.py", "--architecture", "gpt"], cwd=repo,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "invalid choice: 'gpt'" in bad.stderr


def test_next_command_pasted_into_a_fresh_shell_has_the_same_fingerprint(prepared_cache, tmp_path, monkeypatch):
    """prepare's closing `next:` command repeats the preset and the cache (paths made absolute, quoted): run from
    another folder in an empty environment, it scores against the same preset and cache as this session."""
    import prepare_mlx_mamba_3

    cache = tmp_path / "the cache's folder"  # a space and a quote: the command must quote the path
    os.symlink(prepare.CACHE_DIR, cache)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("AUTORESEARCH_MLX_PRESET_FILE", os.path.join("presets", "smoke.json"))  # relative
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(cache))
    monkeypatch.delenv("AUTORESEARCH_FAST_BLAS", raising=False)
    command = prepare_mlx_mamba_3.training_command("mamba-2")
    assert command.endswith(" uv run train_mamba_3_mlx.py")
    assert prepare_mlx_mamba_3.training_command("hybrid").startswith("AUTORESEARCH_MLX_PRESET_FILE=")
    probe = f"{sys.executable} -c 'import prepare; print(prepare.PRESET_NAME, prepare.CACHE_DIR, " \
            f"prepare.harness_fingerprint())'"
    done = subprocess.run(["bash", "-c", command.replace("uv run train_mamba_3_mlx.py", probe)], cwd=tmp_path,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rsplit(maxsplit=1) == [f"smoke {cache}", prepare.harness_fingerprint()]


# ---------------------------------------------------------------------------------------------------------------------
# Integrity fingerprint


def test_editing_the_harness_changes_the_fingerprint(prepared_cache, tmp_path):
    for name in ("prepare.py", "prepare_mlx_mamba_3.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "presets"), tmp_path / "presets")
    code = "import prepare; print(prepare.harness_fingerprint())"

    def fingerprint():
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env=dict(os.environ, AUTORESEARCH_MLX_PRESET_FILE=str(tmp_path / "presets/smoke.json")))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    original = fingerprint()
    assert original == fingerprint()
    with open(tmp_path / "prepare.py", "a") as f:
        f.write("\n# an innocent-looking edit\n")
    edited = fingerprint()
    assert edited != original
    with open(tmp_path / "presets/smoke.json", "w") as f:
        f.write(open(os.path.join(ROOT, "presets/smoke.json")).read().replace('"TIME_BUDGET": 3', '"TIME_BUDGET": 4'))
    assert fingerprint() not in (original, edited)


def test_peak_is_the_calibrated_one_and_runs_never_record_it(monkeypatch, tmp_path):
    """MFU's denominator on a CPU or an Apple GPU: the matmul rate --calibrate recorded, so mfu_percent is comparable
    between runs; without it each run measures its own and records nothing (several ranks or agents measuring at once
    would record a contended figure). The source string says which figure was used."""
    monkeypatch.setattr(prepare, "CALIBRATION_PATH", str(tmp_path / "calibration.json"))
    readings = iter([1e9, 2e9])
    monkeypatch.setattr(prepare, "_measure_matmul_flops", lambda backend, dtype: next(readings))
    assert prepare.peak_flops("Some CPU", "float32")[0] == 1e9
    assert prepare.peak_flops("Some CPU", "float32")[0] == 2e9  # measured again: nothing was recorded
    assert not (tmp_path / "calibration.json").exists()
    prepare.record_calibration({prepare.calibration_key("matmul", "mlx", "Some CPU", "float32"): 5e9})
    assert prepare.peak_flops("Some CPU", "float32") == (5e9, f"calibrated, {tmp_path / 'calibration.json'}")
    monkeypatch.setattr(prepare, "_measure_matmul_flops", lambda backend, dtype: 3e9)
    assert prepare.peak_flops("Some CPU", "float32", backend="torch")[1].startswith("measured this run")
    assert prepare.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")[1] == "datasheet"
