"""Several agents share one cache: every cache file is written whole under a unique temporary name, so runs that
build the same file at the same moment never interleave their writes, and two runs started together on a fresh cache
both finish and are scored the same way."""

import os
import re
import subprocess
import sys
import threading

import prepare
from conftest import ROOT, sized_script


def test_concurrent_writers_of_one_file_never_interleave(tmp_path):
    path = str(tmp_path / "eval" / "rows.bin")
    contents = [bytes([i]) * 300_000 for i in range(8)]  # large enough that a write takes several syscalls
    torn = []

    errors = []

    def writer(content):
        try:
            for _ in range(10):
                prepare._write_atomic(path, lambda f: f.write(content))
        except OSError as e:  # with one shared temporary name, a rename can find another writer's file gone
            errors.append(e)

    def reader():
        for _ in range(200):
            if os.path.exists(path):
                data = open(path, "rb").read()
                if data not in contents:
                    torn.append(len(data))

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not torn, f"a reader saw a partial or mixed file: {torn[:5]}"
    assert open(path, "rb").read() in contents
    assert os.listdir(tmp_path / "eval") == ["rows.bin"]  # no temporary file left behind


def test_failed_write_leaves_no_file(tmp_path):
    path = str(tmp_path / "calibration.json")

    def fail(f):
        f.write("{half")
        raise KeyboardInterrupt

    try:
        prepare._write_atomic(path, fail, "w")
    except KeyboardInterrupt:
        pass
    assert os.listdir(tmp_path) == []


def test_two_runs_at_once_on_a_fresh_cache(corpus_dir, tmp_path):
    """Two agents start at the same moment on an empty cache: each prepares it (shards, tokenizer, validation rows)
    and trains a smoke run. Both finish, with the same harness fingerprint."""
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(tmp_path / "cache"))
    script = sized_script("train_mamba_3_mlx", ARCHITECTURE="mamba-2")
    command = (f"{sys.executable} prepare_mlx_mamba_3.py --keep-scripts --data-dir {corpus_dir} && "
               f"{sys.executable} {script}")
    runs = [subprocess.Popen(["sh", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, out[-3000:] + err[-3000:]
    fingerprints = [re.search(r"^harness: (\w+)$", out, flags=re.M).group(1) for out, _ in outputs]
    assert fingerprints[0] == fingerprints[1]
    leftovers = [name for _, _, names in os.walk(tmp_path / "cache") for name in names if name.endswith(".tmp")]
    assert not leftovers
