"""analysis.ipynb runs headless on a results log the test writes: counts, kept list, plot, and clear messages for an
empty or crash-only log; several agents' logs in one figure; the summary also lands in progress.txt for a terminal."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
ROWS = [
    ("a1b2c3d", "2.100000", "1.2", "keep", "baseline"),
    ("a1b2c3d", "2.104000", "1.2", "discard", "baseline rerun (noise)"),
    ("b2c3d4e", "2.050000", "1.3", "keep", "matrix LR 0.04"),
    ("c3d4e5f", "0.000000", "0.0", "crash", "double width (OOM)"),
    ("d4e5f6a", "2.070000", "1.2", "discard", "GeLU instead of SiLU"),
    ("e5f6a7b", "1.990000", "1.1", "keep", "depth 4 instead of 8"),
]


def run_notebook(tmp_path, log_text, monkeypatch, results_tsv=None):
    log, png = tmp_path / "results.tsv", tmp_path / "progress.png"
    log.write_text(log_text)
    monkeypatch.setenv("RESULTS_TSV", results_tsv or str(log))
    monkeypatch.setenv("PROGRESS_PNG", str(png))
    notebook = nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)
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
