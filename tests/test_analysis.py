"""analysis.ipynb runs headless on a results log the test writes: counts, kept list, plot, and clear messages for an
empty or crash-only log; several agents' logs in one figure; the summary also lands in progress.txt for a terminal;
reruns of the best commit make `best` a mean; real runs' logs overlaid as loss curves in curves.png."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, STEP_LINE

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
ROWS = [
    ("a1b2c3d", "2.100000", "1.2", "keep", "baseline"),
    ("a1b2c3d", "2.104000", "1.2", "discard", "baseline rerun (noise)"),
    ("b2c3d4e", "2.050000", "1.3", "keep", "matrix LR 0.04"),
    ("c3d4e5f", "0.000000", "0.0", "crash", "double width (OOM)"),
    ("d4e5f6a", "2.070000", "1.2", "discard", "GeLU instead of SiLU"),
    ("e5f6a7b", "1.990000", "1.1", "keep", "depth 4 instead of 8"),
]


def run_notebook(tmp_path, log_text, monkeypatch, results_tsv=None, run_logs=None, extra_cell=None):
    """Execute the notebook on `log_text` as results.tsv (or the RESULTS_TSV given) and RUN_LOGS (none by default);
    `extra_cell`: code run after the notebook's cells, in its kernel. Returns (all printed text, progress.png)."""
    log, png = tmp_path / "results.tsv", tmp_path / "progress.png"
    log.write_text(log_text)
    monkeypatch.setenv("RESULTS_TSV", results_tsv or str(log))
    monkeypatch.setenv("PROGRESS_PNG", str(png))
    monkeypatch.delenv("CURVES_PNG", raising=False)  # curves.png next to progress.png
    if run_logs:
        monkeypatch.setenv("RUN_LOGS", run_logs)
    else:
        monkeypatch.delenv("RUN_LOGS", raising=False)
    notebook = nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)
    if extra_cell:
        notebook.cells.append(nbformat.v4.new_code_cell(extra_cell))
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    return text, png


def test_full_log_counts_and_plot(tmp_path, monkeypatch):
    text, png = run_notebook(tmp_path, HEADER + "".join("\t".join(r) + "\n" for r in ROWS), monkeypatch)
    assert "experiments: 6  keep: 3  discard: 2  crash: 1" in text
    assert "keep rate: 60% of 5 finished runs" in text
    assert "best val_bpb: 1.990000" in text and "depth 4 instead of 8" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "progress.txt").read_text() == text  # what a terminal user reads: the same summary


def test_four_column_log_without_memory(tmp_path, monkeypatch):
    rows = "".join("\t".join(r[:2] + r[3:]) + "\n" for r in ROWS)
    text, png = run_notebook(tmp_path, "commit\tval_bpb\tstatus\tdescription\n" + rows, monkeypatch)
    assert "keep: 3" in text and png.exists()


@pytest.mark.parametrize(
    "log_text, message",
    [
        (HEADER, "has no experiments yet"),
        (HEADER + "a1b2c3d\t0.000000\t0.0\tcrash\tbaseline (missing data)\n", "Every run crashed: nothing to plot"),
    ],
)
def test_empty_or_crash_only_log_gives_a_clear_message(tmp_path, monkeypatch, log_text, message):
    text, png = run_notebook(tmp_path, log_text, monkeypatch)
    assert message in text and not png.exists()


def test_several_agents_in_one_figure(tmp_path, monkeypatch):
    """Two agents of one tag, each a worktree with its own log: one figure, each agent's counts and best, and the
    best of all named with its agent."""
    other = [("f6a7b8c", "2.080000", "1.2", "keep", "baseline"),
             ("a7b8c9d", "1.950000", "1.2", "keep", "GRAD_CLIP 0.5"),
             ("b8c9d0e", "1.970000", "1.2", "discard", "D_STATE 32")]
    for agent, rows in (("mar5-gpu0", ROWS), ("mar5-gpu1", other)):
        (tmp_path / agent).mkdir()
        (tmp_path / agent / "results.tsv").write_text(HEADER + "".join("\t".join(r) + "\n" for r in rows))
    text, png = run_notebook(tmp_path, HEADER, monkeypatch, results_tsv=str(tmp_path / "mar5-*" / "results.tsv"))
    assert "2 agents: mar5-gpu0, mar5-gpu1" in text
    assert "mar5-gpu0: experiments: 6  keep: 3  discard: 2  crash: 1" in text
    assert "mar5-gpu1: experiments: 3  keep: 2  discard: 1  crash: 0" in text
    assert "mar5-gpu0: best val_bpb: 1.990000" in text and "mar5-gpu1: best is a7b8c9d (GRAD_CLIP 0.5)" in text
    assert "best of all agents: 1.950000 by mar5-gpu1, a7b8c9d (GRAD_CLIP 0.5)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "progress.txt").read_text() == text


def test_reruns_of_the_best_commit_make_best_a_mean(tmp_path, monkeypatch):
    """A rerun row (the best commit run again to check for drift) is counted and plotted, and `best` becomes the mean
    of that commit's keep and rerun rows; the running best follows the latest kept commit's runs."""
    rows = ROWS + [("e5f6a7b", "2.010000", "1.1", "rerun", "rerun of depth 4: drift check"),
                   ("f6a7b8c", "2.030000", "1.1", "discard", "EXPAND 3"),
                   ("e5f6a7b", "2.020000", "1.1", "rerun", "rerun of depth 4: drift check")]
    text, png = run_notebook(tmp_path, HEADER + "".join("\t".join(r) + "\n" for r in rows), monkeypatch,
                             extra_cell="print('running best:', [round(b, 6) for b in running_best(results)])")
    assert "experiments: 9  keep: 3  discard: 3  crash: 1  rerun: 2" in text
    assert "keep rate: 50% of 6 finished runs" in text  # a rerun decides nothing
    assert "best val_bpb: 2.006667 (mean of 3 runs of e5f6a7b)" in text
    assert "running best: [2.1, 2.1, 2.05, 2.05, 2.05, 1.99, 2.0, 2.0, 2.006667]" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_new_keep_moves_best_to_its_commit(tmp_path, monkeypatch):
    """After a drift check the next kept commit is the best on its own run; in a multi-agent summary each agent's best
    is its mean too."""
    rows = ROWS + [("e5f6a7b", "2.030000", "1.1", "rerun", "rerun of depth 4: drift check"),
                   ("a9b8c7d", "1.980000", "1.1", "keep", "EXPAND 1.5")]
    other = [("f6a7b8c", "2.080000", "1.2", "keep", "baseline"),
             ("f6a7b8c", "2.060000", "1.2", "rerun", "baseline rerun: drift check")]
    for agent, agent_rows in (("mar5-gpu0", rows), ("mar5-gpu1", other)):
        (tmp_path / agent).mkdir()
        (tmp_path / agent / "results.tsv").write_text(HEADER + "".join("\t".join(r) + "\n" for r in agent_rows))
    text, png = run_notebook(tmp_path, HEADER, monkeypatch, results_tsv=str(tmp_path / "mar5-*" / "results.tsv"))
    assert "mar5-gpu0: best val_bpb: 1.980000 (mean of 1 run of a9b8c7d)" in text
    assert "mar5-gpu1: best val_bpb: 2.070000 (mean of 2 runs of f6a7b8c)" in text
    assert "best of all agents: 1.980000 by mar5-gpu0, a9b8c7d (EXPAND 1.5)" in text
    assert png.stat().st_size > 10_000


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


def test_the_shipped_example_walk_is_a_real_log_the_notebook_plots(tmp_path, monkeypatch):
    """results.tsv on main is a real walk (bench/RESULTS.md says how it was run): at least 8 rows with a keep,
    discards and reruns, every commit's first row its decision and later rows reruns, and the notebook plots it."""
    with open(os.path.join(ROOT, "results.tsv")) as f:
        log_text = f.read()
    rows = [line.split("\t") for line in log_text.strip().splitlines()[1:]]
    assert len(rows) >= 8 and {"keep", "discard", "rerun"} <= {row[3] for row in rows}
    seen = set()
    for commit, val_bpb, memory_gb, status, description in rows:
        assert (status == "rerun") == (commit in seen) and 1.0 < float(val_bpb) < 10.0, (commit, status)
        seen.add(commit)
    text, png = run_notebook(tmp_path, log_text, monkeypatch)
    keeps = sum(row[3] == "keep" for row in rows)
    assert f"keep: {keeps}" in text and png.stat().st_size > 10_000
