"""The machine-speed reference a busy moment cannot poison: the fastest probe this machine has shown (per device and
BLAS, in machine_speed.json beside calibration.json). A run whose best probe beats it raises it and is scored against
the raised figure; a slower run leaves it and warns; --calibrate keeps its best of 5 probes and refuses to record on a
busy machine unless --force. Probe times are injected wherever a real load would make the test slow or flaky."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import prepare
import prepare_mlx_mamba_3
from conftest import ROOT, SMOKE_SCRIPTS, TEST_CACHE

KEY = prepare.probe_key("mlx")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh, empty calibration folder: calibration.json and machine_speed.json both absent."""
    monkeypatch.setattr(prepare, "CALIBRATION_PATH", str(tmp_path / "calibration.json"))
    return tmp_path


def run_probes(monkeypatch, start, end):
    """machine_speed() of a run whose start and end probes took `start` and `end` seconds."""
    monkeypatch.setattr(prepare, "PROBE_TIMES", {"start": start, "end": end})
    return prepare.machine_speed()


def reference_file(cache):
    return json.load(open(cache / "machine_speed.json"))


def speed(value):
    return float(value.split()[0])


def test_a_fresh_cache_starts_the_reference(cache, monkeypatch):
    value, warning = run_probes(monkeypatch, 0.100, 0.101)
    assert value == "1.00 (start 1.00, end 0.99; reference started by this run)" and warning is None
    assert reference_file(cache) == {KEY: 0.100}
    assert not (cache / "calibration.json").exists()  # runs never write the calibration
    value, warning = run_probes(monkeypatch, 0.100, 0.125)  # started by an earlier run: it already warns
    assert value == "0.90 (start 1.00, end 0.80)"
    assert warning.startswith("warning: the machine ran 20% slower than its reference") and "100.0 ms" in warning


def test_a_first_run_that_slowed_down_warns(cache, monkeypatch):
    value, warning = run_probes(monkeypatch, 0.100, 0.125)
    assert value == "0.90 (start 1.00, end 0.80; reference started by this run)"
    assert warning.startswith("warning: the machine ran 20% slower")


def test_a_faster_probe_raises_the_reference_and_a_slower_one_does_not(cache, monkeypatch):
    run_probes(monkeypatch, 0.100, 0.100)
    value, warning = run_probes(monkeypatch, 0.085, 0.080)  # the end probe is this run's best
    assert value == "0.97 (start 0.94, end 1.00; reference raised by this run from 100.0 ms)" and warning is None
    assert reference_file(cache) == {KEY: 0.080}
    value, warning = run_probes(monkeypatch, 0.200, 0.190)
    assert value == "0.41 (start 0.40, end 0.42)" and warning.startswith("warning: the machine ran 60% slower")
    assert reference_file(cache) == {KEY: 0.080}
    other = prepare.calibration_key("probe", "torch", "Some GPU")
    assert prepare.raise_probe_reference(other, 0.001) is None  # per device and BLAS: the keys do not mix
    assert reference_file(cache) == {KEY: 0.080, other: 0.001}


def test_a_calibration_taken_under_load_is_healed_by_one_quiet_run(cache, monkeypatch):
    prepare.record_calibration({KEY: 0.200})  # calibrated while other processes used the cores
    value, warning = run_probes(monkeypatch, 0.100, 0.104)  # a quiet run: ~1.00, not "2x faster than calibrated"
    assert 0.8 <= speed(value) <= 1.25 and warning is None
    assert value == "0.98 (start 1.00, end 0.96; reference raised by this run from 200.0 ms)"
    assert prepare.probe_reference(KEY) == 0.100
    value, warning = run_probes(monkeypatch, 0.102, 0.101)  # every later quiet run reads ~1.00
    assert 0.8 <= speed(value) <= 1.25 and warning is None
    value, warning = run_probes(monkeypatch, 0.180, 0.190)  # a real slowdown now shows as one
    assert speed(value) < prepare.SLOW_MACHINE and warning.startswith("warning: the machine ran")


def test_a_busy_run_after_a_quiet_calibration_warns_in_the_summary(prepared_cache, cache, monkeypatch, capsys):
    prepare.record_calibration({KEY: 0.100})
    times = iter([0.150, 0.160])
    monkeypatch.setattr(prepare, "probe_seconds", lambda backend: next(times))
    monkeypatch.setattr(prepare, "PROBE_TIMES", {})
    prepare.probe_machine_speed()
    prepare.print_summary({"val_bpb": 1.5})
    lines = capsys.readouterr().out.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: the machine ran 38% slower"))
    assert warning < lines.index("---")
    assert "machine_speed: 0.65 (start 0.67, end 0.62)" in lines
    assert prepare.probe_reference(KEY) == 0.100 and not (cache / "machine_speed.json").exists()


def test_an_unwritable_cache_still_gives_the_summary(cache, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(prepare, "_write_atomic", fail)
    value, warning = run_probes(monkeypatch, 0.100, 0.100)
    assert value == "1.00 (start 1.00, end 1.00; reference not saved: Read-only file system)" and warning is None


def test_busy_reason():
    quiet = [0.100, 0.101, 0.103, 0.100, 0.102]
    # the measured share wins over the load average
    assert prepare_mlx_mamba_3.busy_reason(quiet, others_share=0.05, load=50.0, reference=0.100) is None
    assert "other processes used 90% of" in prepare_mlx_mamba_3.busy_reason(quiet, others_share=0.9)
    assert prepare_mlx_mamba_3.busy_reason(quiet, load=0.1) is None
    assert "load average 99.0" in prepare_mlx_mamba_3.busy_reason(quiet, load=99.0)  # no /proc/stat: the load average
    assert "spread 100.0-150.0 ms" in prepare_mlx_mamba_3.busy_reason(quiet + [0.150])
    assert "2.00x this machine's reference 50.0 ms" in prepare_mlx_mamba_3.busy_reason(quiet, reference=0.050)
    assert prepare_mlx_mamba_3.busy_reason(quiet, reference=0.095) is None  # within SLOW_MACHINE of the reference


def test_probe_repeats_measures_the_others_share():
    times, share = prepare_mlx_mamba_3.probe_repeats("mlx", repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert share is None if not os.path.exists("/proc/stat") else 0 <= share <= 1.5


@pytest.fixture
def calibrate_cache(cache, monkeypatch):
    monkeypatch.setattr(prepare, "_measure_matmul_flops", lambda backend, dtype: 5e9)
    return cache


def test_calibrate_refuses_on_a_busy_machine_and_records_with_force(calibrate_cache, monkeypatch, capsys):
    monkeypatch.setattr(prepare_mlx_mamba_3, "probe_repeats", lambda backend: ([0.21, 0.20, 0.24, 0.22, 0.20], 0.95))
    with pytest.raises(prepare.HarnessError) as refusal:
        prepare_mlx_mamba_3.record_machine_figures()
    message = str(refusal.value)
    assert "\n" not in message and "busy" in message and "95% of the" in message and "--force" in message
    assert os.listdir(calibrate_cache) == []  # nothing recorded
    prepare_mlx_mamba_3.record_machine_figures(force=True)
    assert "recording on a busy machine (--force)" in capsys.readouterr().out
    recorded = prepare.read_calibration()
    assert recorded[KEY] == 0.20 and {key.split("|")[0] for key in recorded} == {"matmul", "probe"}
    assert prepare.probe_reference(KEY) == 0.20


def test_calibrate_keeps_its_best_probe_and_never_slows_the_reference(calibrate_cache, monkeypatch):
    quiet = [0.102, 0.100, 0.104, 0.101, 0.103]
    monkeypatch.setattr(prepare_mlx_mamba_3, "probe_repeats", lambda backend: (quiet, 0.01))
    prepare_mlx_mamba_3.record_machine_figures()  # quiet: records the best of its 5 probes
    assert prepare.read_calibration()[KEY] == 0.100 and prepare.probe_reference(KEY) == 0.100
    monkeypatch.setattr(prepare_mlx_mamba_3, "probe_repeats", lambda backend: ([0.2] * 5, 0.01))
    with pytest.raises(prepare.HarnessError, match="2.00x this machine's reference 100.0 ms"):
        prepare_mlx_mamba_3.record_machine_figures()  # no other load seen, but far slower than this machine was
    prepare_mlx_mamba_3.record_machine_figures(force=True)
    assert prepare.read_calibration()[KEY] == 0.2  # recorded, as forced
    assert prepare.probe_reference(KEY) == 0.100  # the reference stays the machine's best


def copy_of_the_test_cache(tmp_path):
    """A private copy of the prepared test cache (no calibration, no reference): nothing written reaches other tests."""
    root = tmp_path / "cache"
    for part in ("data", "tokenizer", "eval"):
        shutil.copytree(os.path.join(TEST_CACHE, part), root / part)
    return root


def test_calibrate_refusal_exits_non_zero_with_one_line_before_the_runs(prepared_cache, tmp_path):
    cache = copy_of_the_test_cache(tmp_path)
    busy = ("import sys, prepare, prepare_mlx_mamba_3 as p; "
            "p.probe_repeats = lambda backend: ([0.1, 0.11, 0.1, 0.1, 0.1], 0.9); "
            "sys.argv = ['prepare_mlx_mamba_3.py', '--calibrate']; prepare.run(p.main)")
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache))
    result = subprocess.run([sys.executable, "-c", busy], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("calibrate: this machine is busy (other processes used 90% of")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "architecture" not in result.stdout  # no calibration run started
    assert not (cache / "calibration.json").exists() and not (cache / "machine_speed.json").exists()


WRITER = """
import random, sys
import prepare
rng = random.Random(int(sys.argv[1]))
for i in range(300):
    key = prepare.calibration_key("probe", "mlx", "device %d" % (i % 3))
    prepare.raise_probe_reference(key, rng.uniform(0.01, 1.0))
"""


def test_concurrent_writers_never_leave_an_unreadable_file_or_lose_the_fastest(tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(tmp_path))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(seed)], cwd=ROOT, env=env) for seed in range(4)]
    path, reads = tmp_path / "machine_speed.json", 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            json.load(open(path))  # a reader sees the old file or a complete new one, never a torn one
            reads += 1
    assert all(w.returncode == 0 for w in writers)
    import random

    fastest = {}
    for seed in range(4):
        rng = random.Random(seed)
        for i in range(300):
            key = prepare.calibration_key("probe", "mlx", f"device {i % 3}")
            fastest[key] = min(fastest.get(key, 1.0), rng.uniform(0.01, 1.0))
    assert json.load(open(path)) == fastest  # the lock: no writer's figure is lost
    assert sorted(os.listdir(tmp_path)) == ["machine_speed.json", "machine_speed.json.lock"]  # no temporary file


def test_a_real_run_heals_a_poisoned_calibration(prepared_cache, tmp_path):
    """End to end: a smoke run against a calibration recorded absurdly slow (10 s) reads ~1.00 and raises the
    reference to its own probe, which the cache then keeps."""
    cache = copy_of_the_test_cache(tmp_path)
    with open(cache / "calibration.json", "w") as f:
        json.dump({KEY: 10.0}, f)
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache))
    result = subprocess.run([sys.executable, os.path.join(SMOKE_SCRIPTS, "train_mamba_3_mlx.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("machine_speed: "))
    start, end = map(float, re.search(r"\(start ([\d.]+), end ([\d.]+);", line).groups())
    assert max(start, end) == 1.0 and line.endswith("; reference raised by this run from 10000.0 ms)"), line
    assert 0 < json.load(open(cache / "machine_speed.json"))[KEY] < 10.0
