"""The keep rule of program.md (*Deciding*), computed by `uv run prepare.py log|decide` from results.tsv: the verdicts
its arithmetic gives (keep, rerun, discard, machine moved, crash), checked against the numbers written in program.md."""

import math
import os
import subprocess
import sys

import pytest

import prepare
from conftest import ROOT

HEADER = "\t".join(prepare.RESULTS_COLUMNS)
BASELINE = [  # program.md's example: best 1.412248, noise 0.001303, one run wins below 1.409240
    "a1b2c3d\t1.412345\t1.2\t150\t1.00\tkeep\tbaseline (mamba-3 cpu)",
    "a1b2c3d\t1.413500\t1.2\t151\t0.99\trerun\tbaseline rerun",
    "a1b2c3d\t1.410900\t1.2\t149\t1.00\trerun\tbaseline rerun",
]


def decide(*rows, tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("\n".join([HEADER, *BASELINE, *rows]) + "\n")
    return prepare.keep_rule(prepare.read_results(str(path)))


def test_the_arithmetic_is_program_mds(tmp_path):
    decision = decide("b2c3d4e\t1.401000\t1.2\t150\t0.98\tdiscard\tMATRIX_LR 0.006 -> 0.004", tmp_path=tmp_path)
    assert round(decision["best_mean"], 6) == 1.412248 and round(decision["noise"], 6) == 0.001303
    assert round(decision["bound_1"], 6) == 1.409240
    assert round(decision["bound_2"], 6) == round(1.412248 - 2 * 0.0013027 * math.sqrt(1 / 2 + 1 / 3), 6)
    assert decision["verdict"] == "keep" and decision["best"] == "a1b2c3d"


def test_between_the_bound_and_best_reruns_then_the_mean_of_two_decides(tmp_path):
    first = "c3d4e5f\t1.409500\t1.2\t150\t1.00\tdiscard\tWARMDOWN_RATIO 0.5 -> 0.3"
    decision = decide(first, tmp_path=tmp_path)
    assert decision["verdict"] == "rerun" and "run it once more" in decision["reason"]
    second = "c3d4e5f\t{}\t1.2\t150\t1.00\trerun\trerun of WARMDOWN_RATIO 0.3"
    decision = decide(first, second.format("1.408500"), tmp_path=tmp_path)  # its spread joins the noise: 0.001139
    assert decision["verdict"] == "keep" and round(decision["mean"], 6) == 1.409
    assert round(decision["bound_2"], 6) == 1.410168
    decision = decide(first, second.format("1.411500"), tmp_path=tmp_path)
    assert decision["verdict"] == "discard" and round(decision["bound_2"], 6) == 1.409800


def test_at_or_above_best_is_a_discard(tmp_path):
    assert decide("d4e5f6a\t1.412300\t1.2\t150\t1.00\tdiscard\tDEPTH 4 -> 6", tmp_path=tmp_path)["verdict"] == "discard"


def test_a_slowed_machine_is_left_out_and_rerun(tmp_path):
    slow = "e5f6a7b\t1.380000\t1.2\t120\t0.80\tdiscard\tD_MODEL 192 -> 128"
    decision = decide(slow, tmp_path=tmp_path)
    assert decision["verdict"] == "machine moved: rerun" and "0.80 < 0.90" in decision["reason"]
    assert decision["runs"] == []  # not in the arithmetic
    decision = decide(slow, "e5f6a7b\t1.400000\t1.2\t150\t0.99\trerun\trerun of D_MODEL 128", tmp_path=tmp_path)
    assert decision["verdict"] == "keep" and decision["runs"] == [1.4]  # decided on the one counted run


def test_a_crash_says_so(tmp_path):
    decision = decide("f6a7b8c\t0.000000\t0.0\t\t\tcrash\tD_MODEL 4096 (out of memory)", tmp_path=tmp_path)
    assert decision["verdict"] == "crash" and round(decision["noise"], 6) == 0.001303  # crashes stay out


def test_best_and_its_reruns(tmp_path):
    kept = ["b2c3d4e\t1.401000\t1.2\t150\t0.98\tkeep\tMATRIX_LR 0.006 -> 0.004",
            "b2c3d4e\t1.403000\t1.2\t150\t1.00\trerun\tdrift check"]
    decision = decide(*kept, tmp_path=tmp_path)
    assert decision["verdict"] == "best" and decision["best"] == "b2c3d4e"
    assert decision["best_mean"] == pytest.approx(1.402)
    decision = decide(*kept, "a1b2c3d\t1.411000\t1.2\t150\t1.00\trerun\tfinal: baseline", tmp_path=tmp_path)
    assert decision["verdict"] == "recorded" and decision["best"] == "b2c3d4e"


def test_the_baseline_needs_three_counted_runs(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("\n".join([HEADER, BASELINE[0]]) + "\n")
    decision = prepare.keep_rule(prepare.read_results(str(path)))
    assert decision["verdict"] == "rerun" and "1 counted run(s) of 3" in decision["reason"]


def test_steps_that_follow_speed_are_taken_out_of_the_noise(tmp_path):
    """At a fixed budget a slower machine trains fewer steps: the within-commit slope of val_bpb on ln(speed) takes
    each run to speed 1.00, so the noise is what speed does not explain."""
    rows, slope = [], -0.3
    for commit, level, speeds in (("aaaaaaa", 2.40, (1.00, 0.93, 0.96)), ("bbbbbbb", 2.30, (0.99, 0.91)),
                                  ("ccccccc", 2.25, (0.97, 1.02, 0.92))):
        for i, speed in enumerate(speeds):
            jitter = 0.001 * (-1) ** i
            status = "keep" if i == 0 else "rerun"
            rows.append(prepare.Result(commit, level + slope * math.log(speed) + jitter, 1.0, 100, speed, status, "x"))
    decision = prepare.keep_rule(rows)
    assert decision["slope"] == pytest.approx(slope, abs=0.05)
    assert decision["noise"] < 0.0015 < 0.01 < decision["raw_noise"]
    assert decision["best_mean"] == pytest.approx(2.25, abs=0.002)  # best taken to speed 1.00


def test_log_run_appends_decides_and_writes_the_status(tmp_path):
    results = tmp_path / "results.tsv"

    def log(val_bpb, description, commit, speed="1.00", budget="ok"):
        run_log = tmp_path / "run.log"
        run_log.write_text(f"step 00001 | loss 9\n---\nval_bpb: {val_bpb}\ntotal_seconds: 100.4\n"
                           f"peak_memory_mb: 1228.8\nnum_steps: 150\n"
                           f"machine_speed: {speed} (20 probes over the training time)\n"
                           f"budget_check: {budget}\nharness: 3f2a9c81d0be\n")
        return prepare.log_run(str(run_log), description, str(results), commit=commit)

    assert log(1.412345, "baseline", "a1b2c3d")["timeout"] == 240  # twice the baseline's 100.4 s, in whole minutes
    log(1.413500, "baseline rerun", "a1b2c3d")
    assert log(1.410900, "", "a1b2c3d")["verdict"] == "best"
    assert log(1.409500, "WARMDOWN_RATIO 0.5 -> 0.3", "c3d4e5f")["verdict"] == "rerun"
    assert prepare.read_results(str(results))[-1].status == "discard"  # until its second run wins
    assert log(1.408500, "", "c3d4e5f")["verdict"] == "keep"
    rows = prepare.read_results(str(results))
    assert [r.status for r in rows] == ["keep", "rerun", "rerun", "keep", "rerun"]
    assert rows[2].description == "rerun of baseline" and rows[3].memory_gb == 1.2 and rows[3].machine_speed == 1.0
    assert log(1.300000, "a cheat", "d4e5f6a", budget="FAIL: the loader served 8,192 ...")["verdict"] == "discard"
    assert prepare.read_results(str(results))[-1].description == "a cheat (budget_check failed)"
    assert not prepare.counted(prepare.read_results(str(results))[-1])  # never in noise or best
    crash_log = tmp_path / "run.log"
    crash_log.write_text("Traceback (most recent call last):\n  ...\nValueError: shapes\n")
    assert prepare.log_run(str(crash_log), "D_MODEL 4096", str(results), commit="e5f6a7b")["verdict"] == "crash"
    assert prepare.read_results(str(results))[-1][:3] == ("e5f6a7b", 0.0, 0.0)


def test_the_shipped_log_reads():
    rows = prepare.read_results(os.path.join(ROOT, "results.tsv"))
    assert rows and all(row.status in prepare.STATUSES for row in rows)


@pytest.mark.parametrize("text,expected", [
    ("commit,val_bpb\n", "the first line must be the header"),
    (HEADER + "\na1b2c3d\tnot-a-number\t1.2\t150\t1.00\tkeep\tbaseline\n", "line 2: cannot read"),
    (HEADER + "\na1b2c3d\t1.4\t1.2\t150\t1.00\tkept\tbaseline\n", "status 'kept' must be one of"),
])
def test_a_damaged_log_is_one_line(tmp_path, text, expected):
    (tmp_path / "results.tsv").write_text(text)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "decide"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_the_command_prints_the_state_and_the_verdict(tmp_path):
    (tmp_path / "results.tsv").write_text("\n".join([HEADER, *BASELINE,
                                                     "b2c3d4e\t1.401000\t1.2\t150\t0.98\tdiscard\tMATRIX_LR"]) + "\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "decide"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "noise: 0.001303" in out and "best: a1b2c3d, mean 1.412248 of 3 runs" in out
    assert "one run wins below 1.409240" in out and "verdict: keep" in out
    assert "experiments since the last drift check: 1\n" in out


def test_drift_checks_are_due_every_ten_experiments():
    rows = [prepare.Result("base000", 2.0, 1.0, 100, 1.0, "keep", "baseline")] * 3
    for i in range(10):
        rows += [prepare.Result(f"cand{i:03d}", 2.0, 1.0, 100, 1.0, "discard", f"idea {i}")] * (1 + i % 2)  # reruns
    assert prepare.experiments_since_drift_check(rows) == 10
    rows.append(prepare.Result("cand009", 2.0, 1.0, 100, 1.0, "rerun", "drift check"))
    assert prepare.experiments_since_drift_check(rows) == 0


def test_the_nights_end_prints_the_confirmed_gain(tmp_path):
    finals = ["b2c3d4e\t1.401000\t1.2\t150\t0.98\tkeep\tMATRIX_LR 0.006 -> 0.004",
              "a1b2c3d\t1.412000\t1.2\t150\t1.00\trerun\tfinal: baseline",
              "b2c3d4e\t1.402000\t1.2\t150\t1.00\trerun\tfinal: best",
              "a1b2c3d\t1.413000\t1.2\t150\t1.00\trerun\tfinal: baseline",
              "b2c3d4e\t1.400000\t1.2\t150\t1.00\trerun\tfinal: best"]
    (tmp_path / "results.tsv").write_text("\n".join([HEADER, *BASELINE, *finals]) + "\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "decide"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    line = next(line for line in done.stdout.splitlines() if line.startswith("confirmed: "))
    assert line.startswith("confirmed: final baseline 1.412500 (2 runs) -> final best 1.401000 (2 runs): -0.011500 +- ")
