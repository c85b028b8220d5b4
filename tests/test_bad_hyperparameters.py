"""A user's or an agent's impossible setting in any training script ends in one line naming the setting and what it
must be (exit status 1), before any training: never a traceback, never a trained model."""

import subprocess
import sys

import pytest

from conftest import ROOT, sized_script

CASES = [  # (script, constants edited in a smoke-sized copy, expected text); every range-checked constant below
    ("train_mamba_3_mlx.py", {"DEPTH": 0}, "train_mamba_3_mlx.DEPTH must be a positive number, got 0"),
    ("train_mamba_3_mlx.py", {"DEVICE_BATCH_SIZE": 0}, "DEVICE_BATCH_SIZE must be a positive number"),
    ("train_mamba_3_mlx.py", {"TOTAL_BATCH_SIZE": -512}, "TOTAL_BATCH_SIZE must be a positive number"),
    ("train_mamba_3_mlx.py", {"TOTAL_BATCH_SIZE": 500}, "TOTAL_BATCH_SIZE must be a multiple of"),
    ("train_mamba_3_mlx.py", {"D_MODEL": 60}, "HEADDIM must divide EXPAND * D_MODEL (120), got 16"),
    ("train_mamba_3_mlx.py", {"COMPUTE_DTYPE": "fp8"}, "COMPUTE_DTYPE must be one of"),
    ("train_mamba_3_mlx.py", {"EXPORT_UPSTREAM_DIR": "/no/such/folder/export"},
     "EXPORT_UPSTREAM_DIR must be a folder whose parent exists and is writable, got '/no/such/folder/export'"),
    ("train_mamba_3_mlx.py", {"EXPORT_UPSTREAM_DIR": "/proc/export"},  # a folder even root cannot write into
     "EXPORT_UPSTREAM_DIR must be a folder whose parent exists and is writable, got '/proc/export'"),
    ("train_mamba_3_mlx.py", {"ARCHITECTURE": "mamba-4"},
     "ARCHITECTURE must be one of 'mamba-2', 'mamba-3', got 'mamba-4' (set in the script)"),
    ("train_hybrid_moe_mlx.py", {"HYBRID_PATTERN": "MX"}, "HYBRID_PATTERN 'MX': has unknown character(s) 'X'"),
    ("train_hybrid_moe_mlx.py", {"HYBRID_PATTERN": "EE"}, "has no sequence mixer"),
    ("train_hybrid_moe_mlx.py", {"HYBRID_PATTERN": ""}, "HYBRID_PATTERN '': is empty"),
    ("train_hybrid_moe_mlx.py", {"TOP_K": 9}, "TOP_K must be between 1 and NUM_EXPERTS"),
    ("train_hybrid_moe_mlx.py", {"NUM_KV_HEADS": 3}, "NUM_KV_HEADS must divide NUM_ATTENTION_HEADS"),
    *[("train_mamba_3_mlx.py", {name: value}, f"{name} must be {requirement}") for name, value, requirement in [
        ("MATRIX_LR", -0.006, ">= 0"), ("EMBEDDING_LR", -1.0, ">= 0"), ("SCALAR_LR", -1.0, ">= 0"),
        ("WEIGHT_DECAY", -0.1, ">= 0"), ("GRAD_CLIP", -1.0, ">= 0"), ("A_FLOOR", -1e-4, ">= 0"),
        ("DT_INIT_FLOOR", -1e-4, ">= 0"), ("CHUNK_SIZE", -1, ">= 0"), ("DT_MIN", 0.5, "<= DT_MAX (0.1)"),
        ("DT_MIN", 0.0, "a positive number"), ("WARMUP_RATIO", 1.5, "in [0, 1]"),
        ("WARMDOWN_RATIO", -0.5, "in [0, 1]"), ("FINAL_LR_FRAC", 2.0, "in [0, 1]"),
        ("MUON_MOMENTUM", 1.0, "in [0, 1)"), ("ADAM_BETA1", -0.1, "in [0, 1)"), ("ADAM_BETA2", 1.5, "in [0, 1)"),
        ("ADAM_EPS", 0.0, "a positive number"), ("ROPE_FRACTION", 1.5, "in (0, 1]"),
        ("MIMO_RANK", 0, "a positive number"), ("MLP_EXPAND", -1, ">= 0"), ("MUON_NS_STEPS", 0, "a positive number")]],
    ("train_mamba_3_mlx.py", {"NGROUPS": 3}, "NGROUPS must divide the 8 heads, got 3"),
    ("train_mamba_3_mlx.py", {"WARMUP_RATIO": 0.6, "WARMDOWN_RATIO": 0.5},
     "WARMDOWN_RATIO must be <= 1 - WARMUP_RATIO"),
    *[("train_hybrid_moe_mlx.py", {name: value}, f"{name} must be {requirement}") for name, value, requirement in [
        ("AUX_LOSS_COEFF", -0.01, ">= 0"), ("ROPE_THETA", 0.0, "a positive number"),
        ("EXPERT_HIDDEN", 0, "a positive number"), ("SHARED_EXPERT_HIDDEN", -8, ">= 0"),
        ("DENSE_MLP_HIDDEN", -1, "a positive number"), ("MATRIX_LR", -0.006, ">= 0"),
        ("ROPE_FRACTION", 0.0, "in (0, 1]"), ("DT_MIN", 0.2, "<= DT_MAX (0.1)")]],
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
    assert "model:" not in done.stdout  # refused before the model is built (and before data, compilation, training)
