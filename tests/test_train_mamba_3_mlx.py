"""End-to-end checks of train_mamba_3_mlx.py: smoke runs (smoke preset, a few seconds of training on the tiny prepared
corpus; one log line per step, the stop at the step end nearest to the budget), import without side effects, fast
fail on divergence, and generation with carried state."""

import math
import os
import subprocess
import sys

import mlx.core as mx
import pytest

import prepare
import train_mamba_3_mlx as T
from conftest import check_step_log, sized_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = [
    "architecture", "preset", "val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "world_size", "machine_speed", "budget_check", "harness",
]
# The first run on a fresh machine also JIT-compiles MLX's fused CPU kernels (cached in the temp dir afterwards).
RUN_TIMEOUT = 900


def run_script(args, **env_overrides):
    env = dict(os.environ, **env_overrides)  # conftest's cache dir and smoke preset, plus the overrides
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def parse_summary(stdout):
    lines = stdout.splitlines()
    assert "---" in lines, f"no summary in output:\n{stdout[-3000:]}"
    block = lines[len(lines) - 1 - lines[::-1].index("---") + 1:]
    return dict(line.split(": ", 1) for line in block if ": " in line)


@pytest.mark.parametrize("architecture", ["mamba-2", "mamba-3"])
def test_smoke_run_prints_full_summary(smoke_run, architecture):
    result = smoke_run(architecture)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert list(summary) == SUMMARY_KEYS
    assert summary["architecture"] == architecture
    assert summary["preset"] == "smoke"
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 20
    assert len(summary["val_bpb"].split(".")[1]) == 6
    check_step_log(result.stdout, summary)  # one line per step; the run ends at the step end nearest to the budget
    assert int(summary["depth"]) == T.DEPTH
    assert summary["world_size"] == "1" and summary["budget_check"] == "ok"
    assert "startup_seconds:" in result.stdout and "eval_seconds:" in result.stdout


def test_import_does_not_train():
    code = "import train_mamba_3_mlx as T; print('imported', T.ARCHITECTURE, callable(T.main))"
    result = run_script(["-c", code])  # the committed script (cwd is the repository)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported mamba-3 True" in result.stdout
    assert "---" not in result.stdout and "step 0" not in result.stdout


def test_diverging_run_fails_fast(prepared_cache):
    script = sized_script("train_mamba_3_mlx", ARCHITECTURE="mamba-2", MATRIX_LR=1e4, EMBEDDING_LR=1e4,
                          SCALAR_LR=1e4, GRAD_CLIP=0.0, WARMUP_RATIO=0.0)
    result = run_script([script])
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAIL: training diverged" in result.stdout
    assert "val_bpb:" not in result.stdout


def test_generate_with_carried_state_matches_greedy_forward(prepared_cache):
    tokenizer = prepare.Tokenizer.from_directory()
    config = T.ModelConfig(architecture="mamba-2", vocab_size=tokenizer.get_vocab_size(), depth=2, d_model=32,
                           d_state=8, headdim=8, chunk_size=8)
    mx.random.seed(0)
    model = T.MambaLM(config)
    text = T.generate(model, tokenizer, "The quick brown", max_new_tokens=6, temperature=0)
    assert isinstance(text, str)
    # Greedy decoding by full forward passes over the growing sequence gives the same tokens.
    ids = tokenizer.encode("The quick brown", prepend=tokenizer.get_bos_token_id())
    new = []
    for _ in range(6):
        logits = model(mx.array([ids + new], mx.int32))
        new.append(mx.argmax(logits[0, -1]).item())
    assert text == tokenizer.decode(new)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 24, 40)])  # tall, wide, stacked (the hybrid's experts)
def test_orthogonalise_flattens_the_spectrum(shape):
    """Muon's Newton-Schulz iteration: however spread the singular values of g (here over 2 decades), those of the
    result land near 1 (the quintic's band, about [0.7, 1.2]), per matrix, with g's singular vectors."""
    import numpy as np

    rng = np.random.default_rng(0)
    *lead, rows, cols = shape
    k = min(rows, cols)
    u = np.linalg.qr(rng.standard_normal((*lead, rows, k)))[0]
    v = np.linalg.qr(rng.standard_normal((*lead, cols, k)))[0]
    g = (u * np.logspace(-1, 1, k)) @ np.swapaxes(v, -1, -2)
    out = np.array(T.orthogonalise(mx.array(g.astype(np.float32))))
    singular = np.linalg.svd(out, compute_uv=False)
    assert out.shape == g.shape and singular.min() > 0.6 and singular.max() < 1.25, singular
    aligned = np.swapaxes(u, -1, -2) @ out @ v  # in g's singular bases: diagonal
    off_diagonal = aligned - np.eye(k) * np.diagonal(aligned, axis1=-2, axis2=-1)[..., None, :]
    assert np.abs(off_diagonal).max() < 0.02


def test_optimizer_groups_muon_and_adamw(monkeypatch):
    """The projection matrices go to Muon with OPTIMIZER = "muon" (to AdamW with "adamw"); the embedding, conv taps,
    norms and the mixers' per-head parameters always to AdamW; a Muon step moves a matrix by lr * 0.2 sqrt(max
    dimension) times a matrix whose singular values are all near 1 (RMS ~0.2 lr, an AdamW step's typical size)."""
    import numpy as np
    from mlx.utils import tree_flatten

    monkeypatch.setattr(T, "ARCHITECTURE", "mamba-2")
    config = T.ModelConfig(architecture="mamba-2", vocab_size=64, depth=1, d_model=32, d_state=16, headdim=16)
    model = T.MambaLM(config)
    for optimizer in ("muon", "adamw"):
        monkeypatch.setattr(T, "OPTIMIZER", optimizer)
        made = T.Optimizer(model)
        if optimizer == "adamw":
            assert made.muon == set()
            continue
        assert made.muon == {"layers.0.mixer.in_proj.weight", "layers.0.mixer.out_proj.weight"}
        assert made.lr["layers.0.mixer.conv.weight"] == T.SCALAR_LR and made.lr["embed.weight"] == T.EMBEDDING_LR
        before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        grads = {k: mx.random.normal(mx.array(v).shape) for k, v in before.items()}
        made.update(model, T.tree_unflatten(list(grads.items())), mx.array(1.0))
        after = dict(tree_flatten(model.trainable_parameters()))
        for name in made.muon:
            p = before[name]
            step = p * (1 - T.MATRIX_LR * T.WEIGHT_DECAY) - np.array(after[name])
            singular = np.linalg.svd(step / (T.MATRIX_LR * 0.2 * math.sqrt(max(p.shape))), compute_uv=False)
            assert 0.6 < singular.min() and singular.max() < 1.25, (name, singular)
