"""analysis.ipynb runs headless on a results log the test writes: counts, kept list, plot, and clear messages for an
empty or crash-only log; the old 5- and 4-column logs; several agents' logs in one figure; the summary also lands in
progress.txt for a terminal; every rerun drawn as what it is, the running best the mean of best's runs; the night's
gain with its noise, the confirmed gain and the holdout's beside them, each keep's holdout gain flagged where it falls
short; real runs' logs overlaid as loss curves in curves.png; and a real cheat (a script that trains on the validation
rows) flagged on the holdout while an honest change passes."""

import math
import os
import re
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import prepare
from conftest import ROOT, STEP_LINE, sized_script

HEADER = "commit\tval_bpb\tmemory_gb\tnum_steps\tmachine_speed\tstatus\tdescription\n"
OLD_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
ROWS = [
    ("a1b2c3d", "2.100000", "1.2", "150", "1.00", "keep", "baseline"),
    ("a1b2c3d", "2.104000", "1.2", "151", "0.99", "rerun", "baseline rerun"),
    ("b2c3d4e", "2.050000", "1.3", "149", "1.00", "keep", "matrix LR 0.04"),
    ("c3d4e5f", "0.000000", "0.0", "", "", "crash", "double width (OOM)"),
    ("d4e5f6a", "2.070000", "1.2", "150", "0.98", "discard", "GeLU instead of SiLU"),
    ("e5f6a7b", "1.990000", "1.1", "160", "1.01", "keep", "depth 4 instead of 8"),
]


def tsv(rows, header=HEADER):
    return header + "".join("\t".join(r) + "\n" for r in rows)


def old(rows):
    """The 5-column form of 7-column rows."""
    return [r[:3] + r[5:] for r in rows]


def run_notebook(tmp_path, log_text, monkeypatch, results_tsv=None, run_logs=None, extra_cell=None,
                 holdout=None):
    """Execute the notebook on `log_text` as results.tsv (or the RESULTS_TSV given) and RUN_LOGS (none by default);
    `holdout`: the runs' holdout records (a file's text; default none, or the path given); `extra_cell`: code run after
    the notebook's cells, in its kernel. Returns (all printed text, progress.png)."""
    log, png = tmp_path / "results.tsv", tmp_path / "progress.png"
    log.write_text(log_text)
    monkeypatch.setenv("RESULTS_TSV", results_tsv or str(log))
    monkeypatch.setenv("PROGRESS_PNG", str(png))
    if holdout is None or "\n" in holdout:
        (tmp_path / "holdout.tsv").write_text(holdout or "")
        holdout = str(tmp_path / "holdout.tsv")
    monkeypatch.setenv("HOLDOUT_TSV", holdout)
    monkeypatch.delenv("CURVES_PNG", raising=False)  # curves.png next to progress.png
    if run_logs:
        monkeypatch.setenv("RUN_LOGS", run_logs)
    else:
        monkeypatch.delenv("RUN_LOGS", raising=False)
    notebook = nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)
    if extra_cell:
        notebook.cells.append(nbformat.v4.new_code_cell(extra_cell))
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources=resources).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    return text, png


def test_full_log_counts_and_plot(tmp_path, monkeypatch):
    text, png = run_notebook(tmp_path, tsv(ROWS), monkeypatch)
    assert "experiments: 6  keep: 3  discard: 1  crash: 1  rerun: 1" in text
    assert "reruns: baseline rerun 1" in text
    assert "keep rate: 75% of 4 finished runs" in text
    assert "best val_bpb: 1.990000" in text and "depth 4 instead of 8" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "progress.txt").read_text() == text  # what a terminal user reads: the same summary


@pytest.mark.parametrize("form", ["5 columns", "4 columns"])
def test_old_logs_without_the_new_columns(tmp_path, monkeypatch, form):
    rows, header = old(ROWS), OLD_HEADER
    if form == "4 columns":
        rows, header = [r[:2] + r[3:] for r in rows], "commit\tval_bpb\tstatus\tdescription\n"
    text, png = run_notebook(tmp_path, tsv(rows, header), monkeypatch)
    assert "keep: 3" in text and "best val_bpb: 1.990000" in text and png.exists()


@pytest.mark.parametrize(
    "log_text, message",
    [
        (HEADER, "has no experiments yet"),
        (HEADER + "a1b2c3d\t0.000000\t0.0\t\t\tcrash\tbaseline (missing data)\n", "Every run crashed: nothing to plot"),
        (HEADER + "a1b2c3d\t2.1\t0.0\t\t\tmaybe\tbaseline\n", "status 'maybe' must be one of"),
    ],
)
def test_empty_crash_only_or_bad_log_gives_a_clear_message(tmp_path, monkeypatch, log_text, message):
    text, png = run_notebook(tmp_path, log_text, monkeypatch)
    assert message in text and not png.exists()


def test_several_agents_in_one_figure(tmp_path, monkeypatch):
    """Two agents of one tag, each a worktree with its own log: one figure, each agent's counts and best, and the
    best of all named with its agent."""
    other = [("f6a7b8c", "2.080000", "1.2", "150", "1.00", "keep", "baseline"),
             ("a7b8c9d", "1.950000", "1.2", "150", "1.00", "keep", "GRAD_CLIP 0.5"),
             ("b8c9d0e", "1.970000", "1.2", "150", "1.00", "discard", "D_STATE 32")]
    for agent, rows in (("mar5-gpu0", ROWS), ("mar5-gpu1", other)):
        (tmp_path / agent).mkdir()
        (tmp_path / agent / "results.tsv").write_text(tsv(rows))
    text, png = run_notebook(tmp_path, HEADER, monkeypatch, results_tsv=str(tmp_path / "mar5-*" / "results.tsv"))
    assert "2 agents: mar5-gpu0, mar5-gpu1" in text
    assert "mar5-gpu0: experiments: 6  keep: 3  discard: 1  crash: 1  rerun: 1" in text
    assert "mar5-gpu1: experiments: 3  keep: 2  discard: 1  crash: 0  rerun: 0" in text
    assert "mar5-gpu0: best val_bpb: 1.990000" in text and "mar5-gpu1: best is a7b8c9d (GRAD_CLIP 0.5)" in text
    assert "best of all agents: 1.950000 by mar5-gpu1, a7b8c9d (GRAD_CLIP 0.5)" in text
    assert "mar5-gpu0: night's gain: baseline mean -> best mean 2.102000 -> 1.990000" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "progress.txt").read_text() == text


def test_a_new_keep_moves_best_to_its_commit(tmp_path, monkeypatch):
    """After a drift check the next kept commit is the best on its own run; in a multi-agent summary each agent's best
    is its mean too."""
    rows = ROWS + [("e5f6a7b", "2.030000", "1.1", "160", "1.00", "rerun", "rerun of best: drift check"),
                   ("a9b8c7d", "1.980000", "1.1", "160", "1.00", "keep", "EXPAND 1.5")]
    other = [("f6a7b8c", "2.080000", "1.2", "150", "1.00", "keep", "baseline"),
             ("f6a7b8c", "2.060000", "1.2", "150", "1.00", "rerun", "baseline rerun")]
    for agent, agent_rows in (("mar5-gpu0", rows), ("mar5-gpu1", other)):
        (tmp_path / agent).mkdir()
        (tmp_path / agent / "results.tsv").write_text(tsv(agent_rows))
    text, png = run_notebook(tmp_path, HEADER, monkeypatch, results_tsv=str(tmp_path / "mar5-*" / "results.tsv"))
    assert "mar5-gpu0: best val_bpb: 1.980000 (mean of 1 run of a9b8c7d)" in text
    assert "mar5-gpu1: best val_bpb: 2.070000 (mean of 2 runs of f6a7b8c)" in text
    assert "best of all agents: 1.980000 by mar5-gpu0, a9b8c7d (EXPAND 1.5)" in text
    assert png.stat().st_size > 10_000


# A night as program.md logs it (all at machine_speed 1.00), with every kind of rerun, and each run's holdout record:
# c000003 is an honest keep (its holdout gain matches), e000005 a keep fitted to the validation rows (its holdout gain
# is negative). The holdout file also holds a record of another run of a000001 (another val_bpb: not this log's).
NIGHT = [  # commit, val_bpb, status, description, holdout_bpb
    ("a000001", 2.100, "keep", "baseline (mamba-2 cpu)", 2.200),
    ("a000001", 2.110, "rerun", "baseline rerun", 2.210),
    ("a000001", 2.090, "rerun", "baseline rerun", 2.190),
    ("b000002", 2.080, "discard", "MATRIX_LR 0.01", 2.180),
    ("b000002", 2.120, "rerun", "rerun of MATRIX_LR 0.01", 2.220),
    ("c000003", 2.000, "keep", "DEPTH 6", 2.100),
    ("c000003", 2.010, "rerun", "rerun of DEPTH 6", 2.110),
    ("d000004", 0.000, "crash", "double width (OOM)", None),
    ("c000003", 2.030, "rerun", "rerun of best: drift check", 2.130),
    ("e000005", 1.900, "keep", "loader trains on the validation rows", 2.140),
    ("e000005", 1.910, "rerun", "rerun of loader trains on the validation rows", 2.150),
    ("a000001", 2.095, "rerun", "final: baseline", 2.195),
    ("e000005", 1.920, "rerun", "final: best", 2.160),
    ("a000001", 2.105, "rerun", "final: baseline", 2.205),
    ("e000005", 1.900, "rerun", "final: best", 2.140),
]


def night_files():
    log = tsv([(c, f"{v:.6f}", "0.7", "150", "1.00", s, d) for c, v, s, d, _ in NIGHT])
    records = [("2026-12-07T01:00:00Z", c + "9f", "clean", f"{v:.6f}", f"{h:.6f}", "abc123abc123")
               for c, v, _, _, h in NIGHT if h is not None]
    records.append(("2026-12-06T01:00:00Z", "a000001", "clean", "2.300000", "9.000000", "abc123abc123"))
    holdout = "\t".join(prepare.HOLDOUT_COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in records)
    return log, holdout


def expected_noise():
    groups = {}
    for commit, value, status, _, _ in NIGHT:
        if status != "crash":
            groups.setdefault(commit, []).append(value)
    squares = sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in groups.values())
    return math.sqrt(squares / sum(len(g) - 1 for g in groups.values()))


def test_every_rerun_is_drawn_as_what_it_is_and_best_never_climbs_on_a_candidate(tmp_path, monkeypatch):
    log, holdout = night_files()
    text, png = run_notebook(tmp_path, log, monkeypatch, holdout=holdout, extra_cell=(
        "print('kinds:', list(results[1]['kind']))\n"
        "print('running best:', [round(b, 6) for b in running_best(results[0])])"))
    assert ("kinds: ['baseline', 'baseline rerun', 'baseline rerun', 'discard', 'second run', 'keep', 'second run', "
            "'crash', 'drift check', 'keep', 'second run', 'final: baseline', 'final: best', 'final: baseline', "
            "'final: best']") in text
    assert ("running best: [2.1, 2.105, 2.1, 2.1, 2.1, 2.0, 2.005, 2.005, 2.013333, 1.9, 1.905, 1.905, 1.91, 1.91, "
            "1.9075]") in text  # b000002's second run (2.12) leaves it; best's drift check and final runs move it
    assert "reruns: baseline rerun 2, second run 3, drift check 1, final: baseline 2, final: best 2" in text
    legend = re.search(r"^legend: (.*)$", text, re.M).group(1).split(", ")
    assert legend[:8] == ["baseline", "keep", "discard", "baseline rerun",
                          "rerun of <change> (a candidate's second run)", "drift check (rerun of best)",
                          "final: baseline (end-of-night rerun)", "final: best (end-of-night rerun)"]
    assert "crash (no score)" in legend and "running best (the mean of best's runs)" in legend
    assert legend[-1] == "keep flagged: its holdout gain falls short"  # e000005, ringed in red
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# The first 18 rows of the night results.tsv ships (commit, val_bpb, num_steps, machine_speed, status): the keep
# rule's speed slope appears at the third candidate's rerun and changes with later ones.
SLOPED = [
    ("e4cbe6e", "2.116841", "176", "1.06", "keep"), ("e4cbe6e", "2.087290", "192", "1.05", "rerun"),
    ("e4cbe6e", "2.107307", "181", "1.00", "rerun"), ("3e58d7f", "2.098877", "353", "1.06", "discard"),
    ("3e58d7f", "2.082882", "377", "1.13", "rerun"), ("5451cbb", "2.221789", "132", "1.07", "discard"),
    ("1ff86ff", "2.110700", "179", "1.07", "discard"), ("03725cf", "2.094857", "197", "1.10", "discard"),
    ("03725cf", "2.114105", "184", "1.03", "rerun"), ("e7e7f73", "2.161217", "151", "1.02", "discard"),
    ("105586c", "2.098655", "185", "1.03", "discard"), ("105586c", "2.085665", "193", "1.05", "rerun"),
    ("62e4d66", "2.045936", "261", "1.09", "keep"), ("4b43646", "2.046244", "294", "0.99", "discard"),
    ("4b43646", "2.029896", "315", "1.11", "rerun"), ("feec7ca", "2.067775", "475", "1.00", "discard"),
    ("66d450a", "2.040198", "274", "1.07", "discard"), ("66d450a", "2.023116", "293", "1.11", "rerun"),
]


def test_the_running_best_moves_only_with_best_when_the_speed_slope_changes(tmp_path, monkeypatch):
    """With the slope the rule had at each row, the line climbed at a candidate's rerun (row 11 of the shipped night):
    it must move only where best or best's runs change, and end at best's mean by the whole log's slope."""
    log = tsv([(c, v, "0.7", n, m, s, "baseline" if i == 0 else f"change {c}") for i, (c, v, n, m, s) in
               enumerate(SLOPED)])
    text, _ = run_notebook(tmp_path, log, monkeypatch, extra_cell=(
        "print('running best:', [round(b, 9) for b in running_best(results[0])])"))
    line = re.search(r"^running best: \[(.*)\]$", text, re.M).group(1)
    best = [float(x) for x in line.split(", ")]
    rows = prepare.read_results(str(tmp_path / "results.tsv"))
    decision = prepare.keep_rule(rows)
    assert decision["slope"] is not None and decision["best"] == "62e4d66"
    moved = [i for i in range(1, len(best)) if abs(best[i] - best[i - 1]) > 1e-9]
    assert moved == [1, 2, 12], best  # the baseline's two reruns, then the keep: no candidate's rerun moves it
    assert abs(best[-1] - decision["best_mean"]) < 1e-8 and len(decision["best_runs"]) == 1, best


def test_the_nights_gain_its_noise_the_confirmed_gain_and_the_holdout_beside_them(tmp_path, monkeypatch):
    log, holdout = night_files()
    text, _ = run_notebook(tmp_path, log, monkeypatch, holdout=holdout)
    noise = expected_noise()
    spread = noise * math.sqrt(1 / 5 + 1 / 4)  # baseline's 5 runs, best's 4
    assert f"noise: {noise:.6f} bpb per run" in text
    assert (f"night's gain: baseline mean -> best mean 2.100000 -> 1.907500 (gain +0.192500 +- {spread:.6f}; 5 and 4 "
            "runs); best is e000005") in text
    assert "  holdout: 2.200000 -> 2.147500 (gain +0.052500" in text  # the other night's 9.0 record is not joined
    confirmed = noise * math.sqrt(1 / 2 + 1 / 2)
    assert (f"confirmed gain (the final: rows, interleaved): 2.100000 -> 1.910000 (gain +0.190000 +- "
            f"{confirmed:.6f}; 2 and 2 runs)") in text
    assert "  holdout: 2.200000 -> 2.150000 (gain +0.050000" in text
    assert f"keeps: validation gain, holdout gain (noise {noise:.6f})" in text
    # c000003 over the baseline: 2.1 - mean(2.00, 2.01, 2.03), the same on the holdout; e000005 over c000003
    assert "  c000003  +0.086667  +0.086667  ok  (DEPTH 6; over a000001)" in text
    assert ("  e000005  +0.105833  -0.034167  FLAG: holdout gain short by more than the noise  (loader trains on the "
            "validation rows; over c000003)") in text
    title = re.search(r"^title: (.*)$", text, re.M).group(1)
    assert title == (f"Autoresearch progress: 15 experiments, 3 kept | night's gain 2.1000 -> 1.9075 (+0.1925 +- "
                     f"{spread:.4f}), confirmed +0.1900; holdout +0.0525")
    assert (tmp_path / "progress.txt").read_text() == text


def test_without_holdout_records_or_final_rows_the_notebook_says_so(tmp_path, monkeypatch):
    rows = [r for r in NIGHT if not r[3].startswith("final")]
    log = tsv([(c, f"{v:.6f}", "0.7", "150", "1.00", s, d) for c, v, s, d, _ in rows])
    text, _ = run_notebook(tmp_path, log, monkeypatch, holdout=str(tmp_path / "none.tsv"))
    assert f"  holdout: n/a (0 of 11 rows have a holdout record in {tmp_path / 'none.tsv'})" in text
    assert "confirmed gain: none yet (no final: baseline and final: best reruns" in text
    assert "  e000005  +0.108333        n/a  no holdout record" in text  # 2.013333 - mean(1.90, 1.91)
    assert "; holdout n/a" in text


def test_run_logs_overlay_loss_curves(tmp_path, monkeypatch, smoke_run):
    """Two real smoke runs' logs (stdout to a pipe, as run.log): one curve per log with a point per step, labelled by
    file name, in curves.png; a log without step lines gets a message instead of a curve."""
    logs = tmp_path / "logs"
    logs.mkdir()
    num_steps = {}
    for architecture in ("mamba-2", "mamba-3"):
        done = smoke_run(architecture)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (logs / f"{architecture}.log").write_text(done.stdout)
        num_steps[architecture] = int(re.search(r"^num_steps: (\d+)$", done.stdout, flags=re.M).group(1))
        assert len(STEP_LINE.findall(done.stdout)) == num_steps[architecture]
    (logs / "crashed.log").write_text("preset: smoke\nTraceback (most recent call last):\n")
    text, _ = run_notebook(tmp_path, HEADER, monkeypatch,
                           run_logs=f"{logs}/mamba-*.log{os.pathsep}{logs}/crashed.log{os.pathsep}{logs}/gone.log")
    for architecture, steps in num_steps.items():
        assert re.search(rf"curves: {architecture}\.log: {steps} steps, [\d.]+ training seconds, last loss", text)
    assert f"curves: {logs}/crashed.log has no step lines" in text and f"curves: no log at {logs}/gone.log" in text
    curves = tmp_path / "curves.png"
    assert f"saved {curves}" in text
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000


def test_the_shipped_night_is_a_real_log_the_notebook_plots(tmp_path, monkeypatch):
    """results.tsv on main is a real night (bench/RESULTS.md says how it was run): at least 20 rows with every
    column, every commit's first row its decision and later rows reruns, ending in program.md's interleaved final
    reruns of baseline and best; the notebook plots it and reports the confirmed gain."""
    with open(os.path.join(ROOT, "results.tsv")) as f:
        log_text = f.read()
    assert log_text.splitlines()[0].split("\t") == list(prepare.RESULTS_COLUMNS)
    rows = prepare.read_results(os.path.join(ROOT, "results.tsv"))
    assert len(rows) >= 20 and {"keep", "discard", "rerun"} <= {row.status for row in rows}
    seen = set()
    for row in rows:
        assert (row.status == "rerun") == (row.commit in seen) and 1.0 < row.val_bpb < 10.0, row
        assert row.status == "crash" or (row.num_steps > 0 and row.machine_speed > 0), row
        seen.add(row.commit)
    finals = [row.description for row in rows[-4:]]
    assert finals == ["final: baseline", "final: best"] * 2, finals
    assert rows[-4].commit == rows[0].commit and rows[-3].commit == rows[-1].commit != rows[0].commit
    text, png = run_notebook(tmp_path, log_text, monkeypatch)
    keeps = sum(row.status == "keep" for row in rows)
    assert f"keep: {keeps}" in text and "confirmed gain (the final: rows, interleaved)" in text
    assert png.stat().st_size > 10_000


# The cheat, as a careless or too-clever agent would write it: the training loader still serves (and is
# consumed for) every batch, so budget_check stays ok, but each step trains on the validation rows instead.
CHEAT = '''"""Train on the validation rows: every loader batch is consumed (budget_check: ok) and replaced by the next
rows of prepare.load_val_rows()."""
import runpy

import numpy as np

import prepare

honest = prepare.make_dataloader


def cheating(tokenizer, batch_size, seq_len, split, *args, **kwargs):
    rows, served = prepare.load_val_rows(), 0
    for inputs, _, epoch in honest(tokenizer, batch_size, seq_len, split, *args, **kwargs):
        block = rows[np.arange(served, served + batch_size) % len(rows)].astype(inputs.dtype)
        served += batch_size
        yield block[:, :-1], block[:, 1:], epoch


prepare.make_dataloader = cheating
runpy.run_path("train.py", run_name="__main__")
'''


def test_the_notebook_flags_a_keep_trained_on_the_validation_rows_and_passes_an_honest_one(
        prepared_cache, tmp_path, monkeypatch):
    """Real smoke-sized runs in a git repository, each logged as program.md says and recorded on the holdout by the
    harness: the baseline twice, an honest change twice, then the cheat (a launcher that wraps the script's loader)
    twice. Both changes are logged as keeps; the notebook must flag the cheat's keep on the holdout and not the honest
    one. The honest change (matrix rate 0.01 -> 0.02) moves val_bpb by about the runs' noise here (measured +0.006,
    -0.026; its holdout +0.042, +0.001); 0.02 -> 0.03 lost 0.08 in one CI run, its holdout 0.094, and that honest
    loss was flagged: at this size the flag can fall on a large honest change. The budget is the smoke preset's
    stretched to 8 s and the learning rates raised to 0.02 (matrix: 0.01, then 0.02): enough for the 32
    validation rows to be learnt (measured on 2 busy cores: the cheat's val_bpb 1.1 bpb further below its holdout_bpb
    than the baseline's, whose runs differ by ~0.02)."""
    preset = tmp_path / "smoke-8s.json"
    with open(os.path.join(ROOT, "presets", "smoke.json")) as f:
        preset.write_text(f.read().replace('"TIME_BUDGET": 3', '"TIME_BUDGET": 8'))
    repo = tmp_path / "repo"
    repo.mkdir()
    rates = {"EMBEDDING_LR": 0.02, "MATRIX_LR": 0.01, "SCALAR_LR": 0.02}
    shutil.copy(sized_script("train_mamba_3_mlx", **rates), repo / "train.py")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)

    def commit(message):
        subprocess.run(git + ["add", "-A"], check=True)
        subprocess.run(git + ["commit", "-qm", message], check=True)
        return subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()

    env = {**os.environ, "AUTORESEARCH_MLX_PRESET_FILE": str(preset)}
    rows = []

    def run(script, status, description):
        done = subprocess.run([sys.executable, script], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = dict(re.findall(r"^(\w+): (.*)$", done.stdout.split("\n---\n")[-1], re.M))
        assert summary["budget_check"] == "ok"  # the cheat passes every check a run prints
        assert "holdout" not in done.stdout.lower()  # nor does any run show its holdout score
        head = subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout
        rows.append((head.strip(), summary["val_bpb"], "0.0", summary["num_steps"], "", status, description))

    commit("baseline")
    run("train.py", "keep", "baseline (smoke at 8 s, matrix rate 0.01)")
    run("train.py", "rerun", "baseline rerun")
    prepare.write_constants(str(repo / "train.py"), {"MATRIX_LR": 0.02})
    honest = commit("MATRIX_LR 0.01 -> 0.02")
    run("train.py", "keep", "MATRIX_LR 0.01 -> 0.02")
    run("train.py", "rerun", "rerun of MATRIX_LR 0.01 -> 0.02")
    (repo / "cheat.py").write_text(CHEAT)
    cheat = commit("train on the validation rows")
    run("cheat.py", "keep", "loader trains on the validation rows")
    run("cheat.py", "rerun", "rerun of loader trains on the validation rows")

    text, _ = run_notebook(tmp_path, tsv(rows), monkeypatch, holdout=prepare.HOLDOUT_PATH)
    assert "holdout: n/a" not in text  # every run's record is joined
    table = {line.split()[0]: line for line in text.splitlines()[text.splitlines().index(
        next(line for line in text.splitlines() if line.startswith("keeps: "))) + 1:] if line.startswith("  ")}
    values = "\n".join(f"{r[0]} val_bpb {r[1]} steps {r[3]}" for r in rows) + "\n" + text
    print(values)  # shown with -s: the runs and the notebook's summary
    assert " FLAG: " in table[cheat], values
    assert table[honest].split()[3] == "ok", values
    cheat_gain, cheat_holdout = (float(x) for x in table[cheat].split()[1:3])
    assert cheat_gain > cheat_holdout + 0.3, values  # it fooled the validation rows, not the holdout
