"""machine_speed: a fixed probe between training steps every PROBE_EVERY seconds, its mean speed over the training time
against this machine's reference (per device and BLAS, in machine_speed.json: --calibrate's runs set it, else the
first run here starts it). A run never moves it; --calibrate refuses to record on a busy machine unless --force.
Probe times are injected wherever a real load would make the test slow or flaky."""

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
    prepare.set_probe_reference(KEY, 0.100)
    value, warning = run_probes(monkeypatch, *[0.100] * 9, 0.300)  # one slow moment in ten: 7% of the steps
    assert speed(value) == 0.93 and warning is None
    value, warning = run_probes(monkeypatch, *[0.100] * 5, *[0.300] * 5)  # slowed 3x for half of training
    assert speed(value) == 0.67 and "slowest 0.33" in value
    assert warning.startswith("warning: the machine ran 33% slower")


def test_the_warning_uses_the_speed_the_summary_shows(cache, monkeypatch):
    """What `uv run prepare.py log` reads (0.90, counted) is what decided the warning (none)."""
    prepare.set_probe_reference(KEY, 0.100)
    value, warning = run_probes(monkeypatch, 0.100, 0.12538)  # mean speed 0.8988
    assert value.startswith("0.90 ") and warning is None
    value, warning = run_probes(monkeypatch, 0.100, 0.12821)  # 0.8900
    assert value.startswith("0.89 ") and warning.startswith("warning:")


def test_a_run_never_moves_the_reference(cache, monkeypatch):
    """One yardstick a night: a faster run says so in a note and leaves the reference, so earlier runs keep theirs."""
    prepare.set_probe_reference(KEY, 0.100)
    value, note = run_probes(monkeypatch, 0.080, 0.080, 0.080)
    assert value == "1.25 (3 probes over the training time, slowest 1.25; reference 100.0 ms)"
    assert note.startswith("note: the machine ran 25% faster than its reference")
    assert reference_file(cache) == {KEY: 0.100}
    value, warning = run_probes(monkeypatch, 0.200, 0.190)
    assert speed(value) == 0.51 and warning.startswith("warning: the machine ran 49% slower")
    other = prepare.calibration_key("speed-probe", "torch", "Some GPU")
    assert prepare.set_probe_reference(other, 0.001) is None  # per device and BLAS: the keys do not mix
    assert reference_file(cache) == {KEY: 0.100, other: 0.001}
    assert prepare.set_probe_reference(KEY, 0.050) == 0.100 and reference_file(cache)[KEY] == 0.100  # a run: no
    prepare.set_probe_reference(KEY, 0.050, replace=True)  # --calibrate sets it
    prepare.set_probe_reference(other, None, replace=True)
    assert reference_file(cache) == {KEY: 0.050}


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


def test_a_probe_waits_for_the_runs_own_loader_to_rest(monkeypatch):
    """A probe while the loader's thread packs batches would time the run, not the machine; one that cannot rest for
    another PROBE_EVERY seconds is probed anyway."""
    import queue

    filling = queue.Queue(maxsize=2)
    filling.put(1)
    monkeypatch.setattr(prepare, "SPEED_PROBES", [])
    monkeypatch.setattr(prepare, "_LOADER_QUEUES", [filling])
    monkeypatch.setattr(prepare, "_probe", {"run": lambda: 0.05, "next": 0.0})
    prepare._probe["next"] = prepare.time.monotonic()
    prepare.step_midpoint(1.0, [1.0])
    assert prepare.SPEED_PROBES == []  # the loader is filling its queue
    filling.put(2)
    prepare.step_midpoint(2.0, [1.0, 1.0])
    assert prepare.SPEED_PROBES == [0.05]  # full: its thread rests
    filling.get()
    prepare._probe["next"] -= 2 * prepare.PROBE_EVERY
    prepare.step_midpoint(3.0, [1.0] * 3)
    assert prepare.SPEED_PROBES == [0.05, 0.05]  # a loader that never rests does not silence the probe


def test_a_busy_run_after_a_quiet_calibration_warns_in_the_summary(prepared_cache, cache, monkeypatch, capsys):
    prepare.set_probe_reference(KEY, 0.100)
    monkeypatch.setattr(prepare, "SPEED_PROBES", [0.150, 0.160])
    prepare.print_summary({"val_bpb": 1.5})
    lines = capsys.readouterr().out.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: the machine ran 35% slower"))
    assert warning < lines.index("---")
    assert "machine_speed: 0.65 (2 probes over the training time, slowest 0.62; reference 100.0 ms)" in lines
    assert reference_file(cache) == {KEY: 0.100}


def test_an_unwritable_cache_still_gives_the_summary(cache, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(prepare, "_write_atomic", fail)
    value, warning = run_probes(monkeypatch, 0.100, 0.100)
    assert value.endswith("reference 100.0 ms; reference not saved: Read-only file system)") and warning is None


def test_busy_reason():
    quiet = [0.100, 0.101, 0.103, 0.100, 0.102]
    # the measured share wins over the load average
    assert prepare_mlx_mamba_3.busy_reason(quiet, others_share=0.05, load=50.0) is None
    assert "other processes used 90% of" in prepare_mlx_mamba_3.busy_reason(quiet, others_share=0.9)
    assert prepare_mlx_mamba_3.busy_reason(quiet, load=0.1) is None
    assert "load average 99.0" in prepare_mlx_mamba_3.busy_reason(quiet, load=99.0)  # no /proc/stat: the load average
    assert "spread 100.0-150.0 ms" in prepare_mlx_mamba_3.busy_reason(quiet + [0.150])


def test_calibrate_sets_the_reference_where_its_runs_read_one_on_average():
    """Each calibration run reads against the reference the first started; pooled, their probes set it."""
    runs = [(10, 1.00), (5, 0.90), (5, 1.10)]  # (probes, machine_speed against 50 ms)
    pooled = prepare_mlx_mamba_3.pooled_reference(0.050, runs)
    assert pooled == pytest.approx(0.050)  # mean speed 1.00: unchanged
    assert prepare_mlx_mamba_3.pooled_reference(0.050, [(10, 0.80)]) == pytest.approx(0.0625)  # slower: longer


def test_the_advice_is_always_a_smaller_preset(tmp_path, monkeypatch):
    """Never a preset that is not smaller: a copy of `cpu` with another budget has no smaller shipped preset."""
    for name, smaller in (("default", ["mac", "local", "cpu"]), ("mac", ["local", "cpu"]), ("local", ["cpu"]),
                          ("cpu", [])):
        monkeypatch.setattr(prepare, "PRESET_FILE", os.path.join(prepare.PRESETS_DIR, name + ".json"))
        assert prepare_mlx_mamba_3.smaller_presets("train_mamba_3_mlx") == smaller
    preset = json.load(open(os.path.join(prepare.PRESETS_DIR, "cpu.json")))
    preset["prepare"]["TIME_BUDGET"] = 120
    (tmp_path / "cpu120.json").write_text(json.dumps(preset))
    monkeypatch.setattr(prepare, "PRESET_FILE", str(tmp_path / "cpu120.json"))
    assert prepare_mlx_mamba_3.smaller_presets("train_mamba_3_mlx") == []
    assert prepare_mlx_mamba_3.smaller_presets("train_hybrid_moe_mlx") == []


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
    assert {key.split("|")[0] for key in prepare.read_calibration()} == {"matmul"}


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
import sys
import prepare
seed = int(sys.argv[1])
for i in range(300):
    prepare.set_probe_reference(prepare.calibration_key("speed-probe", "mlx", "device %d" % seed), i + 1, replace=True)
    prepare.set_probe_reference(prepare.calibration_key("speed-probe", "mlx", "shared"), seed + 1)
"""


def test_concurrent_writers_never_leave_an_unreadable_file_or_lose_a_figure(tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(tmp_path))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(seed)], cwd=ROOT, env=env) for seed in range(4)]
    path = tmp_path / "machine_speed.json"
    while any(w.poll() is None for w in writers):
        if path.exists():
            json.load(open(path))  # a reader sees the old file or a complete new one, never a torn one
    assert all(w.returncode == 0 for w in writers)
    figures = json.load(open(path))
    assert {key: figures[key] for key in figures if "device" in key} == {
        prepare.calibration_key("speed-probe", "mlx", f"device {seed}"): 300 for seed in range(4)}  # none lost
    assert figures[prepare.calibration_key("speed-probe", "mlx", "shared")] in (1, 2, 3, 4)  # started once, kept
    assert sorted(os.listdir(tmp_path)) == ["machine_speed.json", "machine_speed.json.lock"]  # no temporary file


def test_a_real_run_scores_against_the_reference_and_leaves_it(prepared_cache, tmp_path):
    """End to end: a smoke run against a reference recorded absurdly slow (100 s) reads far above 1.00, says why in a
    note, and leaves the reference where it was."""
    cache = copy_of_the_test_cache(tmp_path)
    with open(cache / "machine_speed.json", "w") as f:
        json.dump({KEY: 100.0}, f)
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache))
    result = subprocess.run([sys.executable, os.path.join(SMOKE_SCRIPTS, "train_mamba_3_mlx.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    line = next(line for line in lines if line.startswith("machine_speed: "))
    probes = int(re.search(r"\((\d+) probes over the training time", line).group(1))
    assert speed(line.split(": ", 1)[1]) > 10 and probes >= 1, line
    assert any(line.startswith("note: the machine ran") for line in lines[: lines.index("---")])
    assert json.load(open(cache / "machine_speed.json")) == {KEY: 100.0}
