"""A user's or an agent's impossible setting in any training script ends in one line naming the setting and what it
must be (exit status 1), before any training: never a traceback, never a trained model."""

import subprocess
import sys

import pytest

from conftest import ROOT, sized_script

CASES = [  # (script, constants edited in a smoke-sized copy, expected text)
    ("train_mamba_3_mlx.py", {"DEPTH": 0}, "train_mamba_3_mlx.DEPTH must be a positive number, got 0"),
    ("train_mamba_3_mlx.py", {"DEVICE_BATCH_SIZE": 0}, "DEVICE_BATCH_SIZE must be a positive number"),
    ("train_mamba_3_mlx.py", {"TOTAL_BATCH_SIZE": -512}, "TOTAL_BATCH_SIZE must be a positive number"),
    ("train_mamba_3_mlx.py", {"TOTAL_BATCH_SIZE": 500}, "TOTAL_BATCH_SIZE must be a multiple of"),
    ("train_mamba_3_mlx.py", {"D_MODEL": 60}, "HEADDIM must divide EXPAND * D_MODEL (120), got 16"),
    ("train_mamba_3_mlx.py", {"COMPUTE_DTYPE": "fp8"}, "COMPUTE_DTYPE must be one of"),
    ("train_mamba_3_mlx.py", {"EXPORT_UPSTREAM_DIR": "/no/such/folder/export"},
     "EXPORT_UPSTREAM_DIR must be a folder whose parent exists, got '/no/such/folder/export'"),
    ("train_mamba_3_mlx.py", {"ARCHITECTURE": "mamba-4"},
     "ARCHITECTURE must be one of 'mamba-2', 'mamba-3', got 'mamba-4' (set in the script)"),
    ("train_hybrid_moe_mlx.py", {"HYBRID_PATTERN": "MX"}, "HYBRID_PATTERN 'MX': has unknown character(s) 'X'"),
    ("train_hybrid_moe_mlx.py", {"HYBRID_PATTERN": "EE"}, "has no sequence mixer"),
    ("train_hybrid_moe_mlx.py", {"HYBRID_PATTERN": ""}, "HYBRID_PATTERN '': is empty"),
    ("train_hybrid_moe_mlx.py", {"TOP_K": 9}, "TOP_K must be between 1 and NUM_EXPERTS"),
    ("train_hybrid_moe_mlx.py", {"NUM_KV_HEADS": 3}, "NUM_KV_HEADS must divide NUM_ATTENTION_HEADS"),
    ("train_mamba.py", {"DEPTH": -1}, "train_mamba.DEPTH must be a positive number, got -1"),
    ("train_mamba.py", {"CHUNK_SIZE": 0}, "train_mamba.CHUNK_SIZE must be positive, got 0"),
]


@pytest.mark.parametrize("script,constants,expected", CASES)
def test_bad_setting_is_one_line_before_training(prepared_cache, script, constants, expected):
    if script == "train_mamba.py":
        pytest.importorskip("torch")
    copy = sized_script(script.removesuffix(".py"), **constants)
    done = subprocess.run([sys.executable, copy], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert expected in done.stderr and "(set in the script)" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "step 0" not in done.stdout and "---" not in done.stdout
