"""The GPU branches of the MLX scripts, run on the CPU. Where ON_CPU is true the scripts take CPU fast paths (exp and
cos/sin from polynomials, sigmoid and the cross-entropy's logsumexp through that exp; in the hybrid, attention by
query blocks and the routed experts in row groups); on a GPU, MLX's native ops and kernels.
Each model here (Mamba-2, Mamba-3 SISO, Mamba-3 MIMO in train_mamba_3_mlx.py; hybrids with attention and MoE in
train_hybrid_moe_mlx.py) trains a few steps in float32 with the script's own compiled step and AdamW, once with
ON_CPU = True and once with ON_CPU = False, from the same weights on the same batches: the losses and the gradients
must agree to the precision of the polynomials. Muon's orthogonalisation, bf16 off the CPU, is compared on its own, to
bf16's precision.

The scripts' functions read the module global ON_CPU when they are called, and mx.compile bakes the branch in when
it traces, so each branch builds its own model, optimizer and freshly compiled step; a spy on the polynomials checks
which branch really ran. Not covered here: bf16 (MLX's CPU gather_mm and matmuls are float32 only or slow), and the
GPU kernels themselves."""

import numpy as np
import prepare  # noqa: F401  (before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import train_hybrid_moe_mlx as H
import train_mamba_3_mlx as T

VOCAB, BATCH, SEQ, STEPS = 256, 2, 40, 3  # 40 tokens: five chunks of 8, so the state passing runs
MAMBA = dict(d_model=32, d_state=8, headdim=8, chunk_size=8)
CASES = {  # name: (script, config)
    "mamba-2": (T, dict(architecture="mamba-2", depth=2, mlp_expand=2, **MAMBA)),
    "mamba-3 siso": (T, dict(architecture="mamba-3", depth=2, **MAMBA)),
    "mamba-3 mimo": (T, dict(architecture="mamba-3", depth=2, is_mimo=True, mimo_rank=2, is_outproj_norm=True,
                             **MAMBA)),
    "hybrid mamba-3": (H, dict(hybrid_pattern="M*E-M", mamba_type="mamba-3", **MAMBA)),
    "hybrid mamba-2": (H, dict(hybrid_pattern="ME*", mamba_type="mamba-2", **MAMBA)),
    "hybrid mamba-3 mimo": (H, dict(hybrid_pattern="M*E", mamba_type="mamba-3", is_mimo=True, mimo_rank=2, **MAMBA)),
}
HYBRID = dict(num_attention_heads=4, num_kv_heads=2, attn_head_dim=8, num_experts=4, top_k=2, expert_hidden=16,
              shared_expert_hidden=8, dense_mlp_hidden=24)
# Measured (mlx 0.32.4, Linux CPU) between the two branches over these cases: the losses differ by at most 2.7e-7
# relative, each parameter's gradient by at most 2.1e-6 of its largest entry (the polynomials' relative errors, exp
# < 4e-7 and cos/sin < 1e-7, carried through a few layers and float32 sums). A bent GPU-only line fails by far more:
# mx.sigmoid(1.01 * x) moves the gradients by 9e-3 to 2e-2, exp(1.001 * x) by 3e-3 to 8e-3, cos(1.001 * theta) by
# 3e-3 to 1e-2 (Mamba-3), logsumexp(1.001 * logits) by 3e-4 to 8e-4, logsumexp + 1e-3 the losses by 1.9e-4.
LOSS_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4


def make_model(script, config):
    if script is T:
        return T.MambaLM(T.ModelConfig(vocab_size=VOCAB, **config))
    return H.HybridLM(H.HybridConfig(vocab_size=VOCAB, **HYBRID, **config))


def loss_of(script, model, inputs, targets):
    """The loss the script trains on (the hybrid adds its load-balancing loss)."""
    if script is T:
        return T.cross_entropy(model(inputs), targets)
    logits, balance_loss, _ = model.forward_with_aux(inputs)
    return H.cross_entropy(logits, targets) + H.AUX_LOSS_COEFF * balance_loss


def fixed_batch():
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, SEQ + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:], 0


def train(script, config, on_cpu, monkeypatch):
    """-> (the loss and gradients of fresh weights, uncompiled; the losses of STEPS compiled training steps; how often
    each polynomial was traced or called)."""
    monkeypatch.setattr(script, "ON_CPU", on_cpu)
    monkeypatch.setattr(script, "OPTIMIZER", "adamw")  # float32 in both branches (Muon: the test below)
    calls = {}
    for name in ("exp_from_polynomial", "cos_sin_from_polynomial"):
        calls[name] = 0
        monkeypatch.setattr(script, name, counted(getattr(script, name), calls, name))
    mx.random.seed(0)
    model = make_model(script, config)
    batch = fixed_batch()
    inputs, targets = mx.array(batch[0]), mx.array(batch[1])
    loss, grads = nn.value_and_grad(model, lambda x, y: loss_of(script, model, x, y))(inputs, targets)
    step = script.make_training_step(model, script.Optimizer(model), grad_accum_steps=1)  # compiled for this branch
    batches = iter([batch] * STEPS)  # the same batch each step: the loss must fall
    losses = [step(batches, 1.0)[0].item() for _ in range(STEPS)]
    return loss.item(), dict(tree_flatten(grads)), losses, calls


def counted(fn, calls, name):
    def spy(*args):
        calls[name] += 1
        return fn(*args)

    return spy


@pytest.mark.parametrize("case", CASES)
def test_gpu_branches_train_like_the_cpu_fast_paths(case, monkeypatch):
    script, config = CASES[case]
    cpu_loss, cpu_grads, cpu_losses, cpu_calls = train(script, config, True, monkeypatch)
    gpu_loss, gpu_grads, gpu_losses, gpu_calls = train(script, config, False, monkeypatch)
    # Each run took its own branch (a compiled function that kept the other branch would show here).
    assert cpu_calls["exp_from_polynomial"] > 0
    assert (cpu_calls["cos_sin_from_polynomial"] > 0) == ("mamba-3" in case)
    assert gpu_calls == {"exp_from_polynomial": 0, "cos_sin_from_polynomial": 0}

    assert abs(gpu_loss - cpu_loss) <= LOSS_TOLERANCE * cpu_loss, (gpu_loss, cpu_loss)
    for step, (gpu, cpu) in enumerate(zip(gpu_losses, cpu_losses)):
        assert abs(gpu - cpu) <= LOSS_TOLERANCE * cpu, f"step {step}: loss {gpu} (ON_CPU False) vs {cpu} (True)"
    assert cpu_losses[-1] < cpu_losses[0]  # it trains
    assert sorted(gpu_grads) == sorted(cpu_grads)
    for name, cpu in cpu_grads.items():
        scale = mx.max(mx.abs(cpu)).item()
        assert scale > 0, f"{name}: zero gradient, the comparison would see nothing"
        error = mx.max(mx.abs(gpu_grads[name] - cpu)).item() / scale
        assert error <= GRADIENT_TOLERANCE, f"d loss / d {name}: ON_CPU False vs True differ by {error:.1e} (relative)"


@pytest.mark.parametrize("script", [T, H])
@pytest.mark.parametrize("shape", [(24, 40), (3, 40, 24), (64, 256)])
def test_orthogonalise_gpu_branch_matches_the_cpu_one_to_bf16(script, shape, monkeypatch):
    """Off the CPU, Muon's Newton-Schulz iteration runs in bf16 (as Muon does on GPUs): per matrix, the same direction
    as the CPU's float32 one to bf16's precision. Measured on these shapes: cosine similarity >= 0.9985 (bf16's
    rounding, amplified by the iteration, moves entries by up to 13% of the largest); a bent coefficient (a 3.4445 ->
    3.5, or c 2.0315 -> 2.1) gives <= 0.9913."""
    g = mx.random.normal(shape, key=mx.random.key(1))
    cpu = script.orthogonalise(g)
    monkeypatch.setattr(script, "ON_CPU", False)
    gpu = script.orthogonalise(g)
    assert gpu.dtype == cpu.dtype == mx.float32 and gpu.shape == cpu.shape
    dot = lambda a, b: (a * b).sum(axis=(-2, -1))  # noqa: E731  (per matrix)
    cosine = dot(gpu, cpu) / mx.sqrt(dot(gpu, gpu) * dot(cpu, cpu))
    assert mx.min(cosine).item() >= 0.997, f"orthogonalise: ON_CPU False vs True, cosine {mx.min(cosine).item():.4f}"
