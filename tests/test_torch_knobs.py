"""Every range-checked knob of train_mamba.py refuses nonsense: a smoke-sized copy with one constant (or a pair) set as
a careless edit would set it ends in one line naming the setting and its range (exit status 1), before any training.
Modelled on test_bad_hyperparameters.py, which holds the other scripts and train_mamba.py's first messages."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

from conftest import ROOT, sized_script

pytest.importorskip("torch", reason="PyTorch is not installed (optional extra: uv sync --extra torch)")

CASES = [  # (constants edited in a smoke-sized copy, expected text after "train_mamba.")
    ({"MATRIX_LR": -0.006}, "MATRIX_LR must be >= 0, got -0.006"),  # gradient ascent
    ({"EMBEDDING_LR": -0.004}, "EMBEDDING_LR must be >= 0, got -0.004"),
    ({"SCALAR_LR": -0.004}, "SCALAR_LR must be >= 0, got -0.004"),
    ({"WEIGHT_DECAY": -0.1}, "WEIGHT_DECAY must be >= 0, got -0.1"),
    ({"A_FLOOR": -0.0001}, "A_FLOOR must be >= 0, got -0.0001"),  # a state that can grow
    ({"GRAD_CLIP": -1.0}, "GRAD_CLIP must be >= 0, got -1.0"),
    ({"ADAM_BETA1": 1.0}, "ADAM_BETA1 must be in [0, 1), got 1.0"),
    ({"ADAM_BETA2": -0.5}, "ADAM_BETA2 must be in [0, 1), got -0.5"),
    ({"MUON_MOMENTUM": 1.5}, "MUON_MOMENTUM must be in [0, 1), got 1.5"),
    ({"ADAM_EPS": 0.0}, "ADAM_EPS must be a positive number, got 0.0"),
    ({"WARMUP_RATIO": -0.1}, "WARMUP_RATIO must be in [0, 1], got -0.1"),
    ({"WARMDOWN_RATIO": 1.5}, "WARMDOWN_RATIO must be in [0, 1], got 1.5"),
    ({"FINAL_LR_FRAC": 2.0}, "FINAL_LR_FRAC must be in [0, 1], got 2.0"),
    ({"WARMUP_RATIO": 0.6, "WARMDOWN_RATIO": 0.5},
     "WARMDOWN_RATIO + WARMUP_RATIO must be at most 1 (the whole budget), got 0.5 + 0.6"),
    ({"DT_MIN": 0.2}, "DT_MAX must be at least DT_MIN (0.2), got 0.1"),
    ({"DT_MIN": 0.0}, "DT_MIN must be a positive number, got 0.0"),
    ({"DT_MAX": -0.1}, "DT_MAX must be a positive number, got -0.1"),
    ({"DT_INIT_FLOOR": -0.0001}, "DT_INIT_FLOOR must be a positive number, got -0.0001"),
    ({"ROPE_FRACTION": 1.5}, "ROPE_FRACTION must be in (0, 1], got 1.5"),  # was a traceback in the rotation
    ({"ROPE_FRACTION": 0.0}, "ROPE_FRACTION must be in (0, 1], got 0.0"),
    ({"MLP_EXPAND": -1}, "MLP_EXPAND must be a whole number >= 0 (0 = no MLP), got -1"),
    ({"CHUNK_SIZE": -64}, "CHUNK_SIZE must be positive, got -64"),
    ({"MIMO_RANK": 0}, "MIMO_RANK must be a positive number, got 0"),
    ({"D_CONV": 0}, "D_CONV must be a positive number, got 0"),
    ({"MUON_NS_STEPS": -5}, "MUON_NS_STEPS must be a positive number, got -5"),
    ({"NGROUPS": 3}, "NGROUPS must divide the 8 heads, got 3"),
    ({"OPTIMIZER": "sgd"}, "OPTIMIZER must be one of 'muon', 'adamw', got 'sgd'"),
    ({"EXPORT_UPSTREAM_DIR": "/proc/export"},  # was a FileNotFoundError traceback after the run
     "EXPORT_UPSTREAM_DIR must be a folder this process can write in, got '/proc/export'"),
    ({"EXPORT_UPSTREAM_DIR": os.path.join(ROOT, "README.md")},
     f"EXPORT_UPSTREAM_DIR must be a folder this process can write in, got {os.path.join(ROOT, 'README.md')!r}"),
]


def test_every_case_edits_a_constant_the_preset_leaves_valid():
    """The cases are nonsense only through their edit: the smoke copy itself passes every check (it trains in
    test_train_mamba_torch.py), and each constant named exists as a one-line constant of the script."""
    text = open(os.path.join(ROOT, "train_mamba.py")).read()
    for constants, _ in CASES:
        for name in constants:
            assert f"\n{name} = " in text, name


@pytest.fixture(scope="module")
def runs(prepared_cache):
    """{case index: finished run} of every case's smoke-sized copy, run a few at a time (each is mostly torch's
    import, one process per core)."""
    def run(constants):
        copy = sized_script("train_mamba", **constants)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, copy], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(enumerate(pool.map(run, [constants for constants, _ in CASES])))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[", ".join(f"{k}={v!r}" for k, v in c.items())[:60]
                                                         for c, _ in CASES])
def test_nonsense_knob_is_one_line_before_training(runs, case):
    expected, done = CASES[case][1], runs[case]
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"train_mamba.{expected} (set in the script)" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "step 0" not in done.stdout and "---" not in done.stdout
