"""The hybrid Mamba-Transformer MoE script: pattern validation, routing and the load-balancing loss, the gather-based
MoE against a dense all-experts reference (forward and gradients), attention (against a plain reference, causality,
cached decode), the whole model's chunked forward against its step-by-step decode, and a smoke run of the script.
Tiny shapes, float32."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import prepare  # noqa: F401  (before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import train_hybrid_moe_mlx as h
from conftest import SMOKE_SCRIPTS, check_step_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    settings = dict(hybrid_pattern="M*E-M", mamba_type="mamba-3", vocab_size=64, d_model=32, d_state=8, headdim=16,
                    chunk_size=4, num_attention_heads=4, num_kv_heads=2, attn_head_dim=8, num_experts=4, top_k=2,
                    expert_hidden=16, shared_expert_hidden=0, dense_mlp_hidden=24)
    settings.update(overrides)
    return h.HybridConfig(**settings)


def assert_close(x, y, tol=2e-5, what=""):
    """Max abs error below tol times the reference's scale (at least 1)."""
    assert x.shape == y.shape, f"{what}: shape {x.shape} != {y.shape}"
    scale = max(1.0, mx.max(mx.abs(y)).item())
    err = mx.max(mx.abs(x - y)).item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} * {scale:.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# Pattern


@pytest.mark.parametrize("pattern", ["", "MX", "M E", "m*", "EE-", "E-E", "-"])
def test_bad_patterns_are_clear_errors(pattern):
    with pytest.raises(ValueError, match="valid characters") as error:
        h.validate_pattern(pattern)
    for kind in "M*E-":
        assert f"'{kind}'" in str(error.value)
    with pytest.raises(ValueError, match="valid characters"):
        h.HybridLM(tiny_config(hybrid_pattern=pattern))


@pytest.mark.parametrize("pattern", ["M", "*", "ME*EM", "MEM*EME", "*-*E"])
def test_good_patterns(pattern):
    assert h.validate_pattern(pattern) == pattern
    model = h.HybridLM(tiny_config(hybrid_pattern=pattern))
    assert "".join(block.kind for block in model.layers) == pattern


# ---------------------------------------------------------------------------------------------------------------------
# Routing and the load-balancing loss


def test_route_picks_top_k_and_renormalises():
    logits = mx.array([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0], [0.0, 0.1, 0.2, 0.3]])
    chosen, weights, _, counts = h.route(logits, top_k=2)
    assert [sorted(row) for row in chosen.tolist()] == [[1, 3], [0, 2], [2, 3]]
    assert_close(weights.sum(axis=-1), mx.ones(3), 1e-6, "weights sum")
    probs = mx.softmax(logits, axis=-1)
    picked = mx.take_along_axis(probs, chosen, axis=-1)
    assert_close(weights, picked / picked.sum(axis=-1, keepdims=True), 1e-6, "renormalised weights")
    assert counts.tolist() == [1, 1, 2, 2]
    chosen, weights, _, _ = h.route(logits, top_k=1)
    assert chosen[:, 0].tolist() == [1, 0, 3] and mx.all(weights == 1.0).item()


def test_balance_loss():
    # A perfectly uniform router: P_i = 1 / E, so E * sum_i f_i P_i = 1 whatever the tie-breaking.
    _, weights, balance_loss, counts = h.route(mx.zeros((16, 8)), top_k=2)
    assert abs(balance_loss.item() - 1.0) < 1e-6
    assert_close(weights, mx.full(weights.shape, 0.5), 1e-6, "uniform weights")
    assert counts.sum().item() == 32
    # A router that sends every token to experts 0 and 1 with probability ~1/2 each: f = P = (1/2, 1/2, 0, 0), loss 2.
    logits = mx.broadcast_to(mx.array([10.0, 10.0, -10.0, -10.0]), (6, 4))
    _, _, balance_loss, counts = h.route(logits, top_k=2)
    assert counts.tolist() == [6, 6, 0, 0]
    assert abs(balance_loss.item() - 2.0) < 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# The gather-based MoE against every expert on every token


def dense_moe_reference(moe, x):
    """Every expert on every token, mixed with the router's weights (zero for experts not chosen): E times the work."""
    d_model = x.shape[-1]
    tokens = x.reshape(-1, d_model)
    chosen, weights, balance_loss, _ = h.route(moe.router(tokens), moe.top_k)
    hidden, gate = mx.split(tokens[None] @ moe.experts.fc1, 2, axis=-1)  # [E N hidden]
    every_expert = (hidden * h.silu(gate)) @ moe.experts.fc2  # [E N d_model]
    mix = ((chosen[..., None] == mx.arange(moe.num_experts)) * weights[..., None]).sum(axis=1)  # [N E]
    y = (every_expert * mix.T[..., None]).sum(axis=0)
    if "shared_expert" in moe:
        y = y + moe.shared_expert(tokens)
    return y.reshape(x.shape), balance_loss


def test_expert_groups_lay_every_pair_out_once_under_its_expert():
    """Random routings (skewed, some experts empty), group sizes 1 to 8: each (token, slot) pair sits in exactly one
    row, that row's group belongs to the pair's expert, the groups ascend by expert, every filler row copies a real
    pair (an index past the end would read garbage), and the row count is fixed by the pair and expert counts alone (a
    compiled step must not change shape with the routing)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_experts, num_pairs, group_rows = int(rng.integers(1, 7)), int(rng.integers(1, 40)), int(rng.integers(1, 9))
        slot_experts = rng.choice(num_experts, size=num_pairs, p=rng.dirichlet(np.full(num_experts, 0.3)))
        slot_of_row, row_of_slot, group_experts = (
            np.array(a) for a in h.expert_groups(mx.array(slot_experts.astype(np.int32)), num_experts, group_rows))
        case = (num_experts, num_pairs, group_rows, slot_experts.tolist())
        assert group_experts.size == (num_pairs + num_experts * (group_rows - 1)) // group_rows, case
        assert slot_of_row.size == group_experts.size * group_rows, case
        assert np.all(np.diff(group_experts) >= 0), case
        assert len(set(row_of_slot.tolist())) == num_pairs, case
        assert np.all(slot_of_row[row_of_slot] == np.arange(num_pairs)), case
        assert np.all((slot_of_row >= 0) & (slot_of_row < num_pairs)), case  # filler rows copy a real pair
        assert np.all(group_experts[row_of_slot // group_rows] == slot_experts), case


@pytest.mark.parametrize("group_rows", [1, 3, 64])
@pytest.mark.parametrize("num_experts,top_k,shared", [(4, 2, 0), (4, 2, 12), (8, 1, 0), (5, 3, 0)])
def test_moe_matches_dense_reference(num_experts, top_k, shared, group_rows, monkeypatch):
    """Every CPU row-group size (1: the GPU's layout) against all experts run on every token."""
    monkeypatch.setattr(h, "EXPERT_GROUP_ROWS_CPU", group_rows)
    mx.random.seed(0)
    moe = h.MoE(tiny_config(d_model=16, num_experts=num_experts, top_k=top_k, expert_hidden=24,
                            shared_expert_hidden=shared))
    x = mx.random.normal((2, 9, 16))
    y, balance_loss, counts = moe(x)
    y_ref, balance_ref = dense_moe_reference(moe, x)
    assert_close(y, y_ref, 1e-5, "MoE output")
    assert abs(balance_loss.item() - balance_ref.item()) < 1e-6
    assert counts.sum().item() == 2 * 9 * top_k

    # Gradients of a loss that uses the output and the balance loss, for every parameter and for the input.
    probe = mx.random.normal(y.shape)

    def loss(fn):
        def f(x):
            out, bal = fn(x)
            return (out * probe).sum() + 0.5 * bal
        return f

    routed = loss(lambda x: moe(x)[:2])
    dense = loss(lambda x: dense_moe_reference(moe, x))
    _, grads = nn.value_and_grad(moe, routed)(x)
    _, grads_ref = nn.value_and_grad(moe, dense)(x)
    grads_ref = dict(tree_flatten(grads_ref))
    for name, g in tree_flatten(grads):
        assert_close(g, grads_ref[name], 1e-4, f"gradient of {name}")
        assert mx.all(mx.isfinite(g)).item()
    assert mx.abs(dict(tree_flatten(grads))["router.weight"]).max().item() > 0  # the router learns
    assert_close(mx.grad(routed)(x), mx.grad(dense)(x), 1e-4, "input gradient")


def test_moe_single_token_rows():
    """Decode calls the MoE with one token per row; it must route each row on its own."""
    mx.random.seed(1)
    moe = h.MoE(tiny_config(d_model=16, num_experts=4, top_k=2, expert_hidden=8))
    x = mx.random.normal((3, 5, 16))
    y, _, _ = moe(x)
    for t in range(5):
        assert_close(moe(x[:, t:t + 1])[0][:, 0], y[:, t], 1e-5, f"token {t}")


# ---------------------------------------------------------------------------------------------------------------------
# Attention


def rope_reference(x, theta):
    """Rotary positions, written out: dim i pairs with dim i + d/2, angle position * theta^(-2i/d)."""
    length, d = x.shape[-2], x.shape[-1]
    freqs = theta ** (-mx.arange(0, d // 2, dtype=mx.float32) * 2 / d)
    angles = mx.arange(length, dtype=mx.float32)[:, None] * freqs[None]
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_reference(attn, x):
    """Plain softmax attention with every key/value head repeated for its query heads and an explicit causal mask."""
    b, length, _ = x.shape
    H, KV, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = mx.split(x @ attn.qkv_proj.weight.T, [H * d, (H + KV) * d], axis=-1)
    q, k, v = (t.reshape(b, length, -1, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    q, k = rope_reference(q, attn.rope_theta), rope_reference(k, attn.rope_theta)
    k, v = mx.repeat(k, H // KV, axis=1), mx.repeat(v, H // KV, axis=1)
    scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(d)
    causal = mx.arange(length)[:, None] >= mx.arange(length)[None, :]
    probs = mx.softmax(mx.where(causal, scores, -mx.inf), axis=-1)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, H * d)
    return y @ attn.out_proj.weight.T


@pytest.mark.parametrize("query_block", [4, 5, 64])  # 13 tokens: blocks that do and do not divide the row, one block
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_attention_matches_reference(heads, kv_heads, query_block, monkeypatch):
    """The CPU's blocked causal attention (by query block size) against a plain masked softmax: outputs and the
    gradients of every weight and of the input."""
    monkeypatch.setattr(h, "ATTENTION_QUERY_BLOCK_CPU", query_block)
    mx.random.seed(0)
    attn = h.CausalSelfAttention(tiny_config(num_attention_heads=heads, num_kv_heads=kv_heads, rope_theta=100.0))
    x = mx.random.normal((2, 13, 32))
    assert_close(attn(x)[0], attention_reference(attn, x), 1e-5, "attention")
    probe = mx.random.normal((2, 13, 32))
    def blocked(x):
        return (attn(x)[0] * probe).sum()

    def reference(x):
        return (attention_reference(attn, x) * probe).sum()

    grads_ref = dict(tree_flatten(nn.value_and_grad(attn, reference)(x)[1]))
    for name, g in tree_flatten(nn.value_and_grad(attn, blocked)(x)[1]):
        assert_close(g, grads_ref[name], 1e-4, f"gradient of {name}")
    assert_close(mx.grad(blocked)(x), mx.grad(reference)(x), 1e-4, "input gradient")


def test_attention_is_causal():
    mx.random.seed(0)
    attn = h.CausalSelfAttention(tiny_config(rope_theta=10000.0))
    x = mx.random.normal((1, 12, 32))
    y, _ = attn(x)
    changed = mx.concatenate([x[:, :7], x[:, 7:8] + 1.0, x[:, 8:]], axis=1)  # change token 7 only
    y_changed, _ = attn(changed)
    assert mx.max(mx.abs(y_changed[:, :7] - y[:, :7])).item() <= 1e-6  # earlier outputs unchanged
    assert mx.max(mx.abs(y_changed[:, 7:] - y[:, 7:])).item() > 1e-3  # token 7 and later see the change


def test_attention_cached_decode_matches_forward():
    mx.random.seed(0)
    attn = h.CausalSelfAttention(tiny_config(rope_theta=10000.0))
    x = mx.random.normal((2, 10, 32))
    y, _ = attn(x)
    cache = None
    for t in range(10):
        y_t, cache = attn(x[:, t : t + 1], cache)
        assert_close(y_t[:, 0], y[:, t], 1e-5, f"decode token {t}")
    assert cache[0].shape == (2, 2, 10, 8)  # keys of all 10 tokens, one per key/value head
    # Prefill 6 tokens, then decode the rest with the cache.
    y_pre, cache = attn(x[:, :6])
    assert_close(y_pre, y[:, :6], 1e-5, "prefill")
    for t in range(6, 10):
        y_t, cache = attn(x[:, t : t + 1], cache)
        assert_close(y_t[:, 0], y[:, t], 1e-5, f"decode after prefill, token {t}")


# ---------------------------------------------------------------------------------------------------------------------
# The whole model


@pytest.mark.parametrize("mamba_type,pattern", [("mamba-3", "M*E-M"), ("mamba-2", "M*E-M"), ("mamba-3", "*E")])
def test_forward_matches_token_by_token_decode(mamba_type, pattern):
    mx.random.seed(0)
    model = h.HybridLM(tiny_config(mamba_type=mamba_type, hybrid_pattern=pattern, shared_expert_hidden=8))
    ids = mx.random.randint(0, 64, (2, 11)).astype(mx.int32)
    logits = model(ids)
    assert logits.shape == (2, 11, 64)
    cache = [None] * len(model.layers)
    for t in range(ids.shape[1]):
        step_logits = model(ids[:, t : t + 1], cache)[:, 0]
        assert_close(step_logits, logits[:, t], 2e-5, f"token {t}")


def test_mimo_mamba_in_the_hybrid():
    mx.random.seed(0)
    model = h.HybridLM(tiny_config(hybrid_pattern="ME*", is_mimo=True, mimo_rank=2))
    ids = mx.random.randint(0, 64, (1, 7)).astype(mx.int32)
    logits, cache = model(ids), [None] * len(model.layers)
    for t in range(7):
        step_logits = model(ids[:, t : t + 1], cache)[:, 0]
        assert_close(step_logits, logits[:, t], 2e-5, f"token {t}")


def test_aux_outputs_and_parameter_counts():
    config = tiny_config(hybrid_pattern="ME*E", num_experts=4, top_k=2, expert_hidden=16, shared_expert_hidden=8)
    model = h.HybridLM(config)
    ids = mx.random.randint(0, 64, (2, 5)).astype(mx.int32)
    logits, balance_loss, counts = model.forward_with_aux(ids)
    assert_close(logits, model(ids), 0, "logits")
    assert counts.shape == (2, 4) and counts.sum(axis=-1).tolist() == [2 * 5 * 2] * 2
    assert 2.0 - 1e-5 <= balance_loss.item() <= 2 * 4  # two E blocks, each between 1 and E
    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    one_expert = 32 * 2 * 16 + 16 * 32
    assert model.num_params() == total
    assert model.num_active_params() == total - 2 * (4 - 2) * one_expert  # two idle experts in each of two E blocks
    # No E blocks: nothing idle, an empty count matrix.
    dense = h.HybridLM(tiny_config(hybrid_pattern="M-*"))
    assert dense.num_active_params() == dense.num_params()
    assert dense.forward_with_aux(ids)[2].shape == (0, 4)


def test_training_steps_lower_the_loss():
    """A few AdamW steps on one batch through the script's own loss and optimizer: the loss falls, nothing is NaN."""
    mx.random.seed(0)
    model = h.HybridLM(tiny_config(hybrid_pattern="ME*E"))
    optimizer = h.Optimizer(model)
    ids = mx.random.randint(0, 64, (2, 17)).astype(mx.int32)

    def loss_fn(inputs, targets):
        logits, balance_loss, _ = model.forward_with_aux(inputs)
        return h.cross_entropy(logits, targets) + 0.01 * balance_loss

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses = []
    for _ in range(8):
        loss, grads = loss_and_grad(ids[:, :-1], ids[:, 1:])
        optimizer.update(model, grads, mx.array(1.0))
        mx.eval(model.parameters())
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses
    assert optimizer.lr["layers.1.layer.experts.fc1"] == h.MATRIX_LR  # expert stacks are matrices (decay, MATRIX_LR)


def test_generate(prepared_cache):
    tokenizer = prepare.Tokenizer.from_directory()
    model = h.HybridLM(tiny_config(vocab_size=tokenizer.get_vocab_size()))
    text = h.generate(model, tokenizer, "The cat", max_new_tokens=6, temperature=0)
    assert isinstance(text, str)
    # Greedy decoding by full forward passes over the growing sequence gives the same tokens.
    ids = tokenizer.encode("The cat", prepend=tokenizer.get_bos_token_id())
    new = []
    for _ in range(6):
        new.append(mx.argmax(model(mx.array([ids + new], mx.int32))[0, -1]).item())
    assert text == tokenizer.decode(new)


def test_bfloat16_compute():
    """COMPUTE_DTYPE bfloat16 (the GPU default): float32 logits' neighbourhood, and decode runs in bf16 too."""
    mx.random.seed(0)
    model = h.HybridLM(tiny_config(hybrid_pattern="M*E"))
    ids = mx.random.randint(0, 64, (1, 6)).astype(mx.int32)
    full32 = model(ids)
    model.compute_dtype = mx.bfloat16
    full16 = model(ids)
    assert full16.dtype == mx.bfloat16
    assert_close(full16.astype(mx.float32), full32, 0.1, "bf16 logits")
    cache = [None] * len(model.layers)
    for t in range(6):
        logits = model(ids[:, t : t + 1], cache)
    assert logits.dtype == mx.bfloat16 and mx.all(mx.isfinite(logits)).item()


# ---------------------------------------------------------------------------------------------------------------------
# Smoke run of the script


SUMMARY_KEYS = [
    "architecture", "preset", "val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "hybrid_pattern", "mamba_type", "num_active_params_M",
    "expert_load", "world_size", "machine_speed", "budget_check", "harness",
]


def run_script(args):
    # conftest's environment: the test cache and the smoke preset. The timeout allows for the first run on a fresh
    # machine, which also JIT-compiles MLX's fused CPU kernels.
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=900)


def test_import_does_not_train():
    """The committed script (cwd is the repository), imported: nothing trains, nothing is printed but ours."""
    result = run_script(["-c", "import train_hybrid_moe_mlx as H; print('imported', H.__file__, H.HYBRID_PATTERN)"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"imported {os.path.join(ROOT, 'train_hybrid_moe_mlx.py')} ")
    assert "---" not in result.stdout and "step 0" not in result.stdout


def test_smoke_run(prepared_cache):
    result = run_script([os.path.join(SMOKE_SCRIPTS, "train_hybrid_moe_mlx.py")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = dict(re.findall(r"^(\w+): (.*)$", result.stdout.split("\n---\n")[-1], flags=re.M))
    assert list(summary) == SUMMARY_KEYS
    assert summary["architecture"] == "hybrid" and summary["preset"] == "smoke"
    assert summary["world_size"] == "1" and summary["budget_check"] == "ok"
    assert math.isfinite(float(summary["val_bpb"])) and 0 < float(summary["val_bpb"]) < 20
    check_step_log(result.stdout, summary)  # one line per step; the run ends at the step end nearest to the budget
    # The module under test is the same smoke-sized copy, so its constants are the run's.
    assert summary["hybrid_pattern"] == h.HYBRID_PATTERN and summary["depth"] == str(len(h.HYBRID_PATTERN))
    assert summary["mamba_type"] == h.MAMBA_TYPE
    assert 0 < float(summary["num_active_params_M"]) < float(summary["num_params_M"])
    low, high = map(float, re.match(r"min ([\d.]+) max ([\d.]+)", summary["expert_load"]).groups())
    assert 0 <= low <= 1 / h.NUM_EXPERTS <= high <= 1
