"""What a run costs on this machine: the machine-speed probe against the calibrated figure (and its warning under
load), the warning when evaluation would eat the budget, and `prepare_mlx_mamba_3.py --calibrate`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import prepare
from conftest import ROOT, SMOKE_SCRIPTS, TEST_CACHE

SMOKE_MAMBA = os.path.join(SMOKE_SCRIPTS, "train_mamba_3_mlx.py")


def test_machine_speed_against_the_calibrated_probe(monkeypatch, tmp_path):
    """The calibrated probe is the reference (tests/test_machine_speed.py: the rest of the rule)."""
    monkeypatch.setattr(prepare, "CALIBRATION_PATH", str(tmp_path / "calibration.json"))
    prepare.set_probe_reference(prepare.probe_key("mlx"), 0.1)
    monkeypatch.setattr(prepare, "SPEED_PROBES", [0.100, 0.125])
    value, warning = prepare.machine_speed()
    assert value == "0.90 (2 probes over the training time, slowest 0.80; reference 100.0 ms)" and warning is None
    monkeypatch.setattr(prepare, "SPEED_PROBES", [0.125, 0.125])
    value, warning = prepare.machine_speed()
    assert warning.startswith("warning: the machine ran 20% slower than its reference")
    monkeypatch.setattr(prepare, "SPEED_PROBES", [])  # a data-parallel run, or no call to probe_machine_speed
    assert prepare.machine_speed()[0].startswith("n/a")


def test_long_evaluation_warns_once_after_the_second_timed_step(monkeypatch, capsys):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 80_000)
    monkeypatch.setattr(prepare, "HOLDOUT_ROWS", 20_000 // prepare.MAX_SEQ_LEN)  # a quarter more, scored after
    monkeypatch.setattr(prepare, "TIME_BUDGET", 100)
    monkeypatch.setattr(prepare, "PRESET_NAME", "mac")
    prepare.warn_if_evaluation_is_long([1.0], 1000)
    prepare.warn_if_evaluation_is_long([1.0, 1.0, 1.0], 1000)
    assert capsys.readouterr().out == ""
    prepare.warn_if_evaluation_is_long([1.0, 1.0], 1000)  # ~100k tokens at 2.5 x 1k tok/s: 40 s > 25 s
    out = capsys.readouterr().out
    assert "warning: evaluation will take about 40s (99,968 tokens with the holdout)" in out
    assert "AUTORESEARCH_MLX_PRESET_FILE=cpu" in out  # smaller than mac, and this machine's own
    monkeypatch.setattr(prepare, "PRESET_NAME", "cpu")
    prepare.warn_if_evaluation_is_long([1.0, 1.0], 1000)
    out = capsys.readouterr().out
    assert "no shipped preset is smaller" in out and "PRESET_FILE=" not in out  # never one that is not smaller
    monkeypatch.setattr(prepare, "TIME_BUDGET", 200)
    prepare.warn_if_evaluation_is_long([1.0, 1.0], 1000)
    assert capsys.readouterr().out == ""


@pytest.fixture
def cache_copy(prepared_cache, tmp_path):
    """A private copy of the prepared test cache, so a calibration recorded here reaches no other test."""
    root = tmp_path / "cache"
    for part in ("data", "tokenizer", "eval"):
        shutil.copytree(os.path.join(TEST_CACHE, part), root / part)
    return root


def run(args, cache, preset=None):
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache))
    if preset:
        env["AUTORESEARCH_MLX_PRESET_FILE"] = str(preset)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_loaded_machine_prints_the_warning(cache_copy):
    calibrated = run(["-c", "import prepare; prepare.set_probe_reference(prepare.probe_key('mlx'), "
                            "prepare.probe_seconds('mlx'))"], cache_copy)
    assert calibrated.returncode == 0, calibrated.stderr
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    try:
        result = run([SMOKE_MAMBA], cache_copy)
    finally:
        for process in busy:
            process.kill()
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    warning = [line for line in lines if line.startswith("warning: the machine ran")]
    assert warning, result.stdout[-2000:]
    speed = next(line for line in lines if line.startswith("machine_speed: "))
    assert float(speed.split()[1]) < prepare.SLOW_MACHINE
    assert lines.index(warning[0]) < lines.index("---")


def test_a_run_whose_evaluation_would_eat_the_budget_warns_before_evaluating(cache_copy, tmp_path):
    preset = json.load(open(os.path.join(ROOT, "presets", "smoke.json")))
    preset["prepare"].update(TIME_BUDGET=0.5, EVAL_TOKENS=8192)
    with open(tmp_path / "long-eval.json", "w") as f:
        json.dump(preset, f)
    result = run([SMOKE_MAMBA], cache_copy, tmp_path / "long-eval.json")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: evaluation will take about"))
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("eval:"))


def test_calibrate_measures_every_architecture_and_records_the_machine(cache_copy):
    result = run(["prepare_mlx_mamba_3.py", "--calibrate", "--force"], cache_copy)  # tests share the machine
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.splitlines()
    for name in ("mamba-2", "mamba-3 SISO", "mamba-3 MIMO", "hybrid"):
        row = next(line for line in out if line.startswith(name + " "))
        tokens_per_s, mfu, steps, eval_s, peak_gb, fits = row[len(name):].split()[:6]
        assert float(tokens_per_s.replace(",", "")) > 0 and float(mfu) > 0 and float(peak_gb) > 0, row
        assert fits in ("yes", "NO")
    assert any(line.startswith("fits: preset smoke") for line in out)
    recorded = json.load(open(cache_copy / "calibration.json"))
    assert {key.split("|")[0] for key in recorded} == {"matmul"}
    speed = next(line for line in out if line.startswith("machine speed: reference "))
    assert len(speed.split("each run against it: ")[1].split(", ")) == 4, speed  # one figure per run
    reference = json.load(open(cache_copy / "machine_speed.json"))
    assert list(reference) == [prepare.probe_key("mlx")] and f"{1000 * reference[prepare.probe_key('mlx')]:.1f} ms" \
        in speed
