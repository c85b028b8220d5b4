"""machine_speed: a fixed probe between training steps every PROBE_EVERY seconds, its mean speed over the training time
against this machine's reference (per device and BLAS: calibration.json's, else machine_speed.json's, which the first
run here starts). A run never moves the reference; --calibrate keeps its best of 5 probes and refuses to record on a
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


def run_probes(monkeypatch, *times):
    """machine_speed() of a run whose probes between training steps took `times` seconds."""
    monkeypatch.setattr(prepare, "SPEED_PROBES", list(times))
    return prepare.machine_speed()


def reference_file(cache):
    return json.load(open(cache / "machine_speed.json"))


def speed(value):
    return float(value.split()[0])


def test_a_fresh_cache_starts_the_reference_with_a_typical_probe(cache, monkeypatch):
    value, warning = run_probes(monkeypatch, 0.100, 0.100, 0.050, 0.100, 0.400)
    assert value == "1.00 (5 probes over the training time, slowest 0.24; reference 95.2 ms; reference started by " \
                    "this run)"
    assert warning is None  # the run that starts the reference reads 1.00: its mean speed is the yardstick
    assert reference_file(cache) == {KEY: pytest.approx(5 / (10 + 10 + 20 + 10 + 2.5))}  # 1 / mean(1 / seconds)
    value, warning = run_probes(monkeypatch, 0.110, 0.110, 0.110)
    assert value.startswith("0.87 ") and warning.startswith("warning: the machine ran 13% slower")
    assert not (cache / "calibration.json").exists()  # runs never write the calibration


def test_the_mean_over_the_training_time_decides_not_a_moment(cache, monkeypatch):
    prepare.record_calibration({KEY: 0.100})
    value, warning = run_probes(monkeypatch, *[0.100] * 9, 0.300)  # one slow moment in ten: 7% of the steps
    assert speed(value) == 0.93 and warning is None
    value, warning = run_probes(monkeypatch, *[0.100] * 5, *[0.300] * 5)  # slowed 3x for half of training
    assert speed(value) == 0.67 and "slowest 0.33" in value
    assert warning.startswith("warning: the machine ran 33% slower")


def test_a_run_never_moves_the_reference(cache, monkeypatch):
    """One yardstick a night: a faster run says so in a note and leaves the reference, so earlier runs keep theirs."""
    prepare.record_calibration({KEY: 0.100})
    value, note = run_probes(monkeypatch, 0.080, 0.080, 0.080)
    assert value == "1.25 (3 probes over the training time, slowest 1.25; reference 100.0 ms)"
    assert note.startswith("note: the machine ran 25% faster than its reference")
    assert prepare.probe_reference(KEY) == 0.100 and not (cache / "machine_speed.json").exists()
    value, warning = run_probes(monkeypatch, 0.200, 0.190)
    assert speed(value) == 0.51 and warning.startswith("warning: the machine ran 49% slower")
    other = prepare.calibration_key("speed-probe", "torch", "Some GPU")
    assert prepare.raise_probe_reference(other, 0.001) is None  # per device and BLAS: the keys do not mix
    assert reference_file(cache) == {other: 0.001}


def test_probes_run_between_timed_steps_at_a_steady_cadence(monkeypatch):
    calls = []
    monkeypatch.setattr(prepare, "SPEED_PROBES", [])
    monkeypatch.setattr(prepare, "_probe", {"run": lambda: calls.append(1) or 0.05, "next": 0.0})
    prepare.step_midpoint(0.0, [])  # before the first timed step (the compiling one): no probe
    assert calls == []
    prepare.step_midpoint(1.0, [1.0])
    prepare.step_midpoint(2.0, [1.0, 1.0])  # within PROBE_EVERY of the last probe: none
    assert prepare.SPEED_PROBES == [0.05]
    prepare._probe["next"] -= prepare.PROBE_EVERY  # PROBE_EVERY seconds later
    prepare.step_midpoint(3.0, [1.0, 1.0, 1.0])
    assert prepare.SPEED_PROBES == [0.05, 0.05]
    monkeypatch.setattr(prepare, "_probe", {"run": None, "next": 0.0})
    prepare.probe_machine_speed(prepare.Distributed(0, 2))  # a data-parallel run: its ranks would time each other
    prepare.step_midpoint(4.0, [1.0] * 4)
    assert len(calls) == 2


def test_a_busy_run_after_a_quiet_calibration_warns_in_the_summary(prepared_cache, cache, monkeypatch, capsys):
    prepare.record_calibration({KEY: 0.100})
    monkeypatch.setattr(prepare, "SPEED_PROBES", [0.150, 0.160])
    prepare.print_summary({"val_bpb": 1.5})
    lines = capsys.readouterr().out.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: the machine ran 35% slower"))
    assert warning < lines.index("---")
    assert "machine_speed: 0.65 (2 probes over the training time, slowest 0.62; reference 100.0 ms)" in lines
    assert prepare.probe_reference(KEY) == 0.100 and not (cache / "machine_speed.json").exists()


def test_an_unwritable_cache_still_gives_the_summary(cache, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(prepare, "_write_atomic", fail)
    value, warning = run_probes(monkeypatch, 0.100, 0.100)
    assert value.endswith("reference 100.0 ms; reference not saved: Read-only file system)") and warning is None


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
    assert recorded[KEY] == 0.20 and {key.split("|")[0] for key in recorded} == {"matmul", "speed-probe"}
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
    key = prepare.calibration_key("speed-probe", "mlx", "device %d" % (i % 3))
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
            key = prepare.calibration_key("speed-probe", "mlx", f"device {i % 3}")
            fastest[key] = min(fastest.get(key, 1.0), rng.uniform(0.01, 1.0))
    assert json.load(open(path)) == fastest  # the lock: no writer's figure is lost
    assert sorted(os.listdir(tmp_path)) == ["machine_speed.json", "machine_speed.json.lock"]  # no temporary file


def test_a_real_run_scores_against_the_calibration_and_leaves_it(prepared_cache, tmp_path):
    """End to end: a smoke run against a calibration recorded absurdly slow (10 s) reads far above 1.00, says why in a
    note, and leaves the reference where it was."""
    cache = copy_of_the_test_cache(tmp_path)
    with open(cache / "calibration.json", "w") as f:
        json.dump({KEY: 10.0}, f)
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache))
    result = subprocess.run([sys.executable, os.path.join(SMOKE_SCRIPTS, "train_mamba_3_mlx.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    line = next(line for line in lines if line.startswith("machine_speed: "))
    probes = int(re.search(r"\((\d+) probes over the training time", line).group(1))
    assert speed(line.split(": ", 1)[1]) > 10 and probes >= 1, line
    assert any(line.startswith("note: the machine ran") for line in lines[: lines.index("---")])
    assert json.load(open(cache / "calibration.json")) == {KEY: 10.0} and not (cache / "machine_speed.json").exists()
