"""The harness under bad input and faults (issue 11): damaged cache files, a changed data source, bad arguments,
no network, a read-only or full disk, Ctrl-C. Each damage is made by the test in a private copy of the prepared
cache; every case must end in a one-line error naming the fix, or in a repaired cache, before any training."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare
import prepare_mlx_mamba_3
from conftest import ROOT, TEST_CACHE, synthetic_documents, write_corpus, write_parquet


@pytest.fixture
def cache(prepared_cache, tmp_path, monkeypatch):
    """A private copy of the prepared cache (data, tokenizer, eval rows) that the test may damage."""
    root = tmp_path / "cache"
    for part in ("data", "tokenizer", "eval"):
        shutil.copytree(os.path.join(TEST_CACHE, part), root / part)
    for name, part in (("CACHE_DIR", ""), ("DATA_DIR", "data"), ("TOKENIZER_DIR", "tokenizer"), ("EVAL_DIR", "eval")):
        monkeypatch.setattr(prepare, name, str(root / part).rstrip("/"))
    return root


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def cache_env(cache):
    return dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache))


def run_script(args, env=None, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(done, *expected):
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for text in expected:
        assert text in done.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Everything a run needs is checked before the first step (Tokenizer.from_directory() runs check_cache())


@pytest.mark.parametrize("damage, message", [
    (lambda c: truncate(c / "tokenizer/tokenizer.pkl"), "Damaged tokenizer .*tokenizer.pkl.*Rerun `uv run prepare"),
    (lambda c: open(c / "tokenizer/tokenizer.pkl", "wb").write(b"not a pickle"), "Damaged tokenizer"),
    (lambda c: truncate(c / "tokenizer/token_bytes.npy"), "Damaged token byte table .*token_bytes.npy.*Rerun"),
    (lambda c: np.save(c / "tokenizer/token_bytes.npy", np.zeros(10, np.int32)), r"expected int \[8192\]"),
    (lambda c: os.remove(c / "tokenizer/token_bytes.npy"), "No token byte table"),
    (lambda c: os.remove(c / "data/shard_06542.parquet"), "No val data"),
    (lambda c: truncate(c / "data/shard_06542.parquet"), "Corrupt or unreadable parquet file .*shard_06542.*Delete"),
    (lambda c: truncate(c / "data/shard_00001.parquet"), "Corrupt or unreadable parquet file .*shard_00001"),
])
def test_damaged_cache_is_reported_before_training(cache, damage, message):
    damage(cache)
    with pytest.raises(prepare.HarnessError, match=message):
        prepare.Tokenizer.from_directory()


def test_damaged_or_missing_rows_are_rebuilt_before_training(cache, capsys):
    rows_file = prepare.val_rows_path()
    good = np.load(rows_file)
    truncate(rows_file, 0.7)
    prepare.Tokenizer.from_directory()
    assert "damaged" in capsys.readouterr().out
    assert np.array_equal(np.load(rows_file), good)
    os.remove(rows_file)
    prepare.Tokenizer.from_directory()
    assert np.array_equal(np.load(rows_file), good)


def test_damaged_val_shard_without_rows_is_reported_before_training(cache):
    os.remove(prepare.val_rows_path())
    path = prepare.shard_path(prepare.VAL_SHARD)
    with open(path, "r+b") as f:  # damage a data page, keep the footer: only reading the rows can tell
        f.seek(200)
        f.write(b"\xff" * 2000)
    with pytest.raises(prepare.HarnessError, match="Corrupt shard .*shard_06542"):
        prepare.Tokenizer.from_directory()


def test_training_script_stops_before_training_on_a_damaged_cache(cache):
    truncate(cache / "tokenizer/token_bytes.npy")
    code = "import prepare; prepare.run(lambda: (prepare.Tokenizer.from_directory(), print('TRAINING')))"
    done = run_script(["-c", code], cache_env(cache))
    assert_one_line_error(done, "Damaged token byte table", "token_bytes.npy")
    assert "TRAINING" not in done.stdout


# ---------------------------------------------------------------------------------------------------------------------
# prepare repairs what is damaged and never mixes two sources


def test_prepare_repairs_a_damaged_tokenizer_and_rows(cache, corpus_dir, capsys):
    good_rows = np.load(prepare.val_rows_path())
    truncate(prepare.val_rows_path(), 0.5)
    prepare_mlx_mamba_3.prepare_cache(data_dir=corpus_dir)
    out = capsys.readouterr().out
    assert "rows" in out and "damaged" in out and "(cached)" not in out
    assert np.array_equal(np.load(prepare.val_rows_path()), good_rows)

    open(cache / "tokenizer/tokenizer.pkl", "wb").write(b"garbage")
    prepare_mlx_mamba_3.prepare_cache(data_dir=corpus_dir)
    out = capsys.readouterr().out
    assert "already trained" not in out and "Damaged tokenizer" in out and "training it again" in out
    prepare.check_cache()
    assert np.array_equal(np.load(prepare.val_rows_path()), good_rows)  # the same tokenizer again, the same rows


def test_prepare_fetches_a_corrupt_cached_copy_again(cache, corpus_dir, capsys):
    truncate(prepare.shard_path(1))
    prepare_mlx_mamba_3.prepare_cache(data_dir=corpus_dir)
    assert "(1 files copied)" in capsys.readouterr().out
    prepare.check_parquet(prepare.shard_path(1))
    assert prepare._file_digest(prepare.shard_path(1)) == prepare._file_digest(os.path.join(corpus_dir,
                                                                                            "part_1.parquet"))


def test_new_data_dir_replaces_the_old_cache_and_changes_the_fingerprint(cache, corpus_dir, tmp_path, capsys):
    before = prepare.harness_fingerprint()
    tokenizer_file = cache / "tokenizer/tokenizer.pkl"
    old_tokenizer = tokenizer_file.read_bytes()

    # the same training files, another val.parquet: the tokenizer stays, the validation data and rows change
    other = tmp_path / "other"
    shutil.copytree(corpus_dir, other)
    write_parquet(other / "val.parquet", synthetic_documents(150, seed=2000))
    prepare_mlx_mamba_3.prepare_cache(data_dir=str(other))
    out = capsys.readouterr().out
    assert "1 cached shard(s) differ" in out and "already trained" in out and "built in" in out
    assert prepare._file_digest(prepare.shard_path(prepare.VAL_SHARD)) == prepare._file_digest(other / "val.parquet")
    assert tokenizer_file.read_bytes() == old_tokenizer
    assert len(os.listdir(cache / "eval")) == 1  # the old rows are gone
    after_val = prepare.harness_fingerprint()
    assert after_val != before

    # other training files (one only): the old shards and the tokenizer trained on them go
    new = write_corpus(str(tmp_path / "new"), n_train_files=1, docs_per_file=900)
    write_parquet(os.path.join(new, "part_0.parquet"), synthetic_documents(900, seed=77))
    prepare_mlx_mamba_3.prepare_cache(data_dir=new)
    out = capsys.readouterr().out
    assert "the tokenizer and" in out and "trained BPE" in out
    assert sorted(f for f in os.listdir(cache / "data") if f.startswith("shard_")) == ["shard_00000.parquet",
                                                                                     "shard_06542.parquet"]
    assert json.loads((cache / "data/manifest.json").read_text())["source"] == os.path.realpath(new)
    assert prepare.harness_fingerprint() not in (before, after_val)

    # back to the first folder: its files again, and with them its fingerprint
    prepare_mlx_mamba_3.prepare_cache(data_dir=corpus_dir)
    assert prepare.harness_fingerprint() == before


def test_val_shard_replaced_by_hand_gets_new_rows(cache):
    before_rows, before = prepare.val_rows_path(), prepare.harness_fingerprint()
    write_parquet(prepare.shard_path(prepare.VAL_SHARD), synthetic_documents(150, seed=3000))
    prepare.Tokenizer.from_directory()
    assert prepare.val_rows_path() != before_rows and os.path.exists(prepare.val_rows_path())
    assert prepare.harness_fingerprint() != before


def test_hub_prepare_offline_keeps_an_offline_cache(cache, direct_network):
    """Plain prepare (the hub) over a cache prepared from a folder, without network: an error at once, and the
    folder's shards are still there (they are removed only when the hub's can replace them)."""
    before = sorted(os.listdir(cache / "data"))
    started = time.time()
    with pytest.raises(prepare.HarnessError, match="Cannot reach 127.0.0.1 .*--data-dir DIR"):
        prepare_mlx_mamba_3.prepare_cache(endpoint=f"http://127.0.0.1:{closed_port()}")
    assert time.time() - started < 10
    assert sorted(os.listdir(cache / "data")) == before


def test_hub_prepare_over_a_folder_cache_removes_the_folder_shards(cache, capsys):
    """With network, the hub's shards replace a folder's: none of the folder's shards, nor the tokenizer and rows
    built from them, may be mixed with the downloaded ones (hub shards are immutable by name: not hashed)."""
    source = f"huggingface:{prepare.DATASET_REPO}"
    manifest = prepare_mlx_mamba_3._forget_stale_shards(source, {prepare.SHARD_NAME.format(i): None for i in (0, 6542)},
                                            exact=False)
    assert manifest == {"source": source, "files": {}}
    assert [f for f in os.listdir(cache / "data") if f.startswith("shard_")] == []
    assert os.listdir(cache / "tokenizer") == [] and os.listdir(cache / "eval") == []
    assert "3 cached shard(s) differ" in capsys.readouterr().out

    # the hub again over the hub's own shards: kept, nothing rebuilt
    shutil.copy(os.path.join(TEST_CACHE, "data", "shard_00000.parquet"), cache / "data")
    prepare._write_manifest(manifest)
    prepare_mlx_mamba_3._forget_stale_shards(source, {"shard_00000.parquet": None}, exact=False)
    assert sorted(os.listdir(cache / "data")) == ["manifest.json", "shard_00000.parquet"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments and bad source files


@pytest.mark.parametrize("num_shards, message", [
    (-3, "--num-shards must be between 1 and 2 "), (0, "--num-shards must be between 1 and 2 "),
    (5, "--num-shards must be between 1 and 2 "),
])
def test_num_shards_out_of_range_is_a_clear_error(cache, corpus_dir, num_shards, message):
    with pytest.raises(prepare.HarnessError, match=message):
        prepare_mlx_mamba_3.prepare_cache(num_shards=num_shards, data_dir=corpus_dir)


def test_data_dir_imports_num_shards_of_the_preset(cache, tmp_path, capsys, monkeypatch):
    """A folder with more training files than the preset's NUM_SHARDS (smoke: 2) gives the first NUM_SHARDS, as a
    download would; --num-shards asks for more, up to all; a NUM_SHARDS above the folder's files imports them all."""
    big = write_corpus(str(tmp_path / "big"), n_train_files=4)  # its first two files are the prepared cache's
    prepare_mlx_mamba_3.prepare_cache(data_dir=big)
    out = capsys.readouterr().out
    assert "data: 2 training shards (the first 2 of its 4 training files: NUM_SHARDS=2; --num-shards N for more)" in out
    assert "already trained" in out and "(cached)" in out  # the same two shards: nothing rebuilt

    def shards():
        return sorted(f for f in os.listdir(cache / "data") if f.startswith("shard_"))

    assert shards() == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert prepare_mlx_mamba_3.import_local_corpus(big, 3) == (3, 4, 1)
    assert shards() == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_06542.parquet"]
    monkeypatch.setattr(prepare, "NUM_SHARDS", 10)
    assert prepare_mlx_mamba_3.import_local_corpus(big) == (4, 4, 1)


def test_num_shards_zero_without_data_dir_fails_before_any_download(cache):
    with pytest.raises(prepare.HarnessError, match="--num-shards must be between 1 and 6542, got 0"):
        prepare_mlx_mamba_3.prepare_cache(num_shards=0, endpoint="http://127.0.0.1:1")


def test_integer_text_column_and_corrupt_source_file(tmp_path):
    import pyarrow as pa

    write_parquet(tmp_path / "val.parquet", ["held out"])
    prepare.pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "a.parquet")
    with pytest.raises(prepare.HarnessError, match="column 'text' holds int64, not strings"):
        prepare_mlx_mamba_3.import_local_corpus(str(tmp_path))
    with open(tmp_path / "a.parquet", "wb") as f:
        f.write(b"PAR1 not really")
    with pytest.raises(prepare.HarnessError, match="a.parquet .*Replace it in .* with a good copy") as error:
        prepare_mlx_mamba_3.import_local_corpus(str(tmp_path))
    assert "Delete" not in str(error.value)  # never advise deleting the user's own source file


def test_entry_point_errors_are_one_line(cache, tmp_path):
    import pyarrow as pa

    bad = tmp_path / "bad"
    bad.mkdir()
    write_parquet(bad / "val.parquet", ["held out"])
    prepare.pq.write_table(pa.table({"text": [1, 2, 3]}), bad / "a.parquet")
    assert_one_line_error(run_script(["prepare_mlx_mamba_3.py", "--data-dir", str(bad)], cache_env(cache)),
                          "column 'text' holds int64")
    assert_one_line_error(run_script(["prepare_mlx_mamba_3.py", "--keep-scripts", "--num-shards", "-3"],
                                     cache_env(cache)), "--num-shards must be between 1 and 6542, got -3")


# ---------------------------------------------------------------------------------------------------------------------
# Network: none at all ends at once; a flaky one is retried (tests/test_download.py)


@pytest.fixture
def direct_network(monkeypatch):
    """No proxy and no HF_HUB_OFFLINE from the caller's environment: these tests probe the connection itself."""
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: connecting to it is refused


@pytest.mark.parametrize("endpoint, reason", [
    (None, "connection failed"), ("http://no-such-host.invalid", "name resolution failed"),
])
def test_no_network_fails_at_once_with_offline_instructions(tmp_path, monkeypatch, direct_network, endpoint,
                                                             reason):
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    started = time.time()
    with pytest.raises(prepare.HarnessError, match=f"{reason}.*--data-dir DIR"):
        prepare_mlx_mamba_3.download_shards([0, 1], endpoint=endpoint or f"http://127.0.0.1:{closed_port()}")
    assert time.time() - started < 10  # not huggingface_hub's 25 s of retries per file
    assert not [f for f in os.listdir(tmp_path / "data") if f.startswith("shard_")]


def test_no_network_is_recognised_inside_wrapped_errors():
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as inner:
            raise RuntimeError("An error happened while trying to locate the file on the Hub") from inner
    except RuntimeError as outer:
        assert "name resolution failed" in prepare_mlx_mamba_3._no_network_reason(outer)
    assert prepare_mlx_mamba_3._no_network_reason(TimeoutError("read timed out")) is None  # flaky: retried


# ---------------------------------------------------------------------------------------------------------------------
# A cache-side record never costs a run its summary; Ctrl-C and full disks are one line


def test_peak_flops_of_a_run_is_never_recorded_and_calibration_on_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_measure_matmul_flops", lambda backend, dtype: 3e9)
    monkeypatch.setattr(prepare, "CALIBRATION_PATH", str(tmp_path / "calibration.json"))
    rate, source = prepare.peak_flops("Some CPU", "float32")  # a training run: measured for itself only
    assert rate == 3e9 and "not calibrated" in source and "--calibrate" in source
    assert os.listdir(tmp_path) == []

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.json, "dump", full_disk)
    with pytest.raises(OSError):  # --calibrate runs under prepare.run: a one-line disk error
        prepare.record_calibration({prepare.calibration_key("matmul", "mlx", "Some CPU", "float32"): 5e9})
    assert os.listdir(tmp_path) == []  # no partial calibration.json or .tmp
    monkeypatch.undo()
    monkeypatch.setattr(prepare, "CALIBRATION_PATH", str(tmp_path / "calibration.json"))
    prepare.record_calibration({prepare.calibration_key("matmul", "mlx", "Some CPU", "float32"): 5e9})
    assert prepare.peak_flops("Some CPU", "float32") == (5e9, f"calibrated, {tmp_path / 'calibration.json'}")


def test_summary_is_printed_from_a_read_only_cache(cache, monkeypatch, capsys):
    """The fingerprint needs the validation shard's digest; an unrecorded one is computed, and recording it is
    skipped when the cache cannot be written."""
    os.remove(cache / "data/manifest.json")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(prepare, "_write_manifest", read_only)
    prepare.print_summary({"val_bpb": 1.0})
    assert capsys.readouterr().out.splitlines()[-1].startswith("harness: ")


def test_run_turns_interrupts_and_disk_errors_into_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        prepare.run(interrupted)
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == "Interrupted."

    def full(name):
        def main():
            raise OSError(getattr(errno, name), os.strerror(getattr(errno, name)), "/cache/eval/rows.npy")
        return main

    for name in ("ENOSPC", "EROFS", "EACCES"):
        message = f"Cannot write /cache/eval/rows.npy: {os.strerror(getattr(errno, name))}"
        with pytest.raises(prepare.HarnessError, match=message):
            prepare.run(full(name))
    with pytest.raises(FileNotFoundError):  # anything else is a bug and keeps its traceback
        prepare.run(lambda: open("/no/such/file"))
    assert prepare.run(lambda: 7) == 7


def test_ctrl_c_is_one_line_and_status_130():
    code = "import time, prepare\ndef main():\n    print('ready', flush=True)\n    time.sleep(60)\nprepare.run(main)"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130 and err.strip() == "Interrupted."


# ---------------------------------------------------------------------------------------------------------------------
# Run-time messages: divergence step, evaluation progress, hyperparameter checks


def test_divergence_names_the_step_as_the_progress_line_counts(capsys):
    prepare.check_loss(2.5, 0)
    with pytest.raises(SystemExit) as stop:
        prepare.check_loss(float("nan"), 0)  # the first step (0-based index 0) is "step 00001" on the progress line
    assert stop.value.code == 1
    assert "training diverged at step 1 (loss nan)" in capsys.readouterr().out


def test_evaluate_bpb_shows_progress_and_ends_the_line(prepared_cache, capsys):
    import mlx.core as mx

    prepare.evaluate_bpb(lambda ids: mx.zeros((*ids.shape, prepare.VOCAB_SIZE)), 8)
    out = capsys.readouterr().out
    total = f"{prepare.EVAL_TOKENS:,}"
    assert f"eval: 512/{total} tokens" in out and f"eval: {total}/{total} tokens" in out and "tok/s" in out
    assert out.endswith("\n")


def test_check_hyperparameters_names_the_key():
    namespace = {"DEPTH": 0, "DEVICE_BATCH_SIZE": 4, "TOTAL_BATCH_SIZE": -512, "COMPUTE_DTYPE": "fp8"}
    prepare.check_hyperparameters("train_mamba", prepare.positive(namespace, "DEVICE_BATCH_SIZE"))
    with pytest.raises(prepare.HarnessError, match=r"^train_mamba.DEPTH must be a positive number, got 0 "
                                                   r"\(set in the script\)\. Fix the value"):
        prepare.check_hyperparameters("train_mamba", prepare.positive(namespace, "DEVICE_BATCH_SIZE", "DEPTH"))
    with pytest.raises(prepare.HarnessError, match=r"TOTAL_BATCH_SIZE must be a positive number, got -512"):
        prepare.check_hyperparameters("train_mamba", prepare.positive(namespace, "TOTAL_BATCH_SIZE"))
    with pytest.raises(prepare.HarnessError, match="COMPUTE_DTYPE must be one of 'float32', 'bfloat16', got 'fp8'"):
        prepare.check_hyperparameters("train_mamba", [prepare.one_of(namespace, "COMPUTE_DTYPE",
                                                                     ("float32", "bfloat16"))])
    with pytest.raises(prepare.HarnessError, match="D_MODEL must divide"):
        prepare.check_hyperparameters("train_mamba", [("D_MODEL", 100 % 16 == 0, "must divide into HEADDIM 16")])
