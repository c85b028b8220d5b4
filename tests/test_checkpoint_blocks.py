"""CHECKPOINT_BLOCKS: recomputing each block in the backward pass gives the same loss and gradients as keeping its
activations (every script, every architecture), and it keeps less memory (MLX's allocator peak, the figure the summary
reports)."""

import prepare  # noqa: F401  (before mlx: the fast BLAS)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import train_hybrid_moe_mlx as H
import train_mamba as P
import train_mamba_3_mlx as T

SMALL = dict(vocab_size=512, depth=3, d_model=64, d_state=16, headdim=16, chunk_size=16)
MLX_CASES = {
    "mamba-2": lambda ck: T.MambaLM(T.ModelConfig(**SMALL, architecture="mamba-2", checkpoint_blocks=ck)),
    "mamba-3 SISO": lambda ck: T.MambaLM(T.ModelConfig(**SMALL, architecture="mamba-3", checkpoint_blocks=ck)),
    "mamba-3 MIMO": lambda ck: T.MambaLM(T.ModelConfig(**SMALL, architecture="mamba-3", is_mimo=True,
                                                         checkpoint_blocks=ck)),
    "hybrid": lambda ck: H.HybridLM(H.HybridConfig(
        vocab_size=512, hybrid_pattern="ME*EM", d_model=64, d_state=16, headdim=16, chunk_size=16,
        num_attention_heads=2, num_kv_heads=1, attn_head_dim=32, num_experts=4, top_k=2, expert_hidden=64,
        checkpoint_blocks=ck)),
}


def mlx_loss_and_grads(name, checkpoint, tokens):
    mx.random.seed(0)
    model = MLX_CASES[name](checkpoint)
    mx.eval(model.parameters())
    inputs, targets = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])
    if name == "hybrid":  # the hybrid's training loss: cross-entropy plus the weighted balance loss
        def loss_fn(x, y):
            logits, balance, _ = model.forward_with_aux(x)
            return H.cross_entropy(logits, y) + H.AUX_LOSS_COEFF * balance
    else:
        def loss_fn(x, y):
            return T.cross_entropy(model(x), y)
    step = mx.compile(nn.value_and_grad(model, loss_fn), inputs=model.state, outputs=model.state)
    mx.reset_peak_memory()
    loss, grads = step(inputs, targets)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads)), mx.get_peak_memory()


@pytest.mark.parametrize("name", list(MLX_CASES))
def test_mlx_checkpointing_keeps_the_gradients_and_saves_memory(name):
    tokens = np.random.default_rng(0).integers(0, 512, (4, 257)).astype(np.int32)
    loss_kept, grads_kept, peak_kept = mlx_loss_and_grads(name, False, tokens)
    loss_ck, grads_ck, peak_ck = mlx_loss_and_grads(name, True, tokens)
    assert loss_ck == pytest.approx(loss_kept, rel=1e-6)
    assert grads_ck.keys() == grads_kept.keys()
    for key, g in grads_kept.items():
        scale = mx.max(mx.abs(g)).item() + 1e-12
        assert mx.max(mx.abs(grads_ck[key] - g)).item() <= 1e-5 * scale, key
    assert peak_ck < 0.8 * peak_kept, f"peak {peak_ck / 2**20:.1f} MiB checkpointed, {peak_kept / 2**20:.1f} kept"


def test_mlx_checkpointed_memory_does_not_grow_with_depth():
    """Only each block's input outlives its backward (checkpoint_block). With nn.utils.checkpoint's order a block's
    weight gradients waited for every block below, keeping their activation-sized inputs (this model, MiB of peak:
    depth 2 -> 6 grew by 25 with nn.utils.checkpoint, by 2 with checkpoint_block)."""

    def peak(depth):
        mx.random.seed(0)
        model = T.MambaLM(T.ModelConfig(**{**SMALL, "depth": depth}, architecture="mamba-3", is_mimo=True,
                                        checkpoint_blocks=True))
        mx.eval(model.parameters())
        tokens = np.random.default_rng(0).integers(0, 512, (4, 513)).astype(np.int32)
        step = mx.compile(nn.value_and_grad(model, lambda x, y: T.cross_entropy(model(x), y)), inputs=model.state,
                          outputs=model.state)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(step(mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])))
        return mx.get_peak_memory() - base

    peak_2, peak_6 = peak(2), peak(6)
    assert peak_6 - peak_2 < 0.1 * peak_2, f"depth 2: {peak_2 / 2**20:.1f} MiB, depth 6: {peak_6 / 2**20:.1f} MiB"


@pytest.mark.parametrize("mimo", [False, True])
def test_torch_checkpointing_keeps_the_gradients(mimo):
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 512, (2, 129)))
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        config = P.ModelConfig(**SMALL, architecture="mamba-3", is_mimo=mimo, checkpoint_blocks=checkpoint)
        model = P.MambaLM(config)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_kept, grads_kept), (loss_ck, grads_ck) = results
    assert loss_ck == pytest.approx(loss_kept, rel=1e-6)
    for name, g in grads_kept.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
