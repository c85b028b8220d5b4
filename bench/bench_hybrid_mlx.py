"""
Throughput benchmark of train_hybrid_moe_mlx.py (a script, not a test). Measures, on the current MLX device:

  1. training step (forward + backward + AdamW update, the script's own compiled step): tokens/s and ms/step of
     the local configuration (pattern ME*EM, d_model 256, 4 experts, batch 4 x 512) and of the script's
     full-size default (pattern MEM*EME, d_model 512, 8 experts; batch 1 x 2048 here, to keep a CPU run short);
  2. the MoE layer alone (forward + backward) as the expert count grows at fixed top-k: routed dispatch (only the
     chosen experts run) against a dense all-experts reference. Routed cost should stay flat in the expert count.
  3. the CPU layouts at the end of the script (causal attention by query blocks, routed experts in row groups)
     against MLX's own kernels, one layer each at the cpu preset's width.

Run: `uv run bench/bench_hybrid_mlx.py [--only step,moe,layouts] [--steps 3] [--rounds 5] [--mamba-type mamba-2]`.
With --against FILE (another copy of the script, e.g. `git show main:train_hybrid_moe_mlx.py > /tmp/base.py`), each
training-step configuration runs in both versions, steps interleaved, with the ratio new / base.
Timings on a shared machine are noisy: compare the figures printed side by side in one run (the MoE sizes are timed
in interleaved rounds and the best round of each is kept).
"""

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402  (first: the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

import train_hybrid_moe_mlx as H  # noqa: E402

# name -> (HybridConfig fields, batch rows, row length). "local" is the local preset's hybrid section; "default" the
# script's full-size defaults, written out so the sizes in the script cannot change what is measured.
CONFIGS = {
    "local": (dict(pattern="ME*EM", d_model=256, d_state=32, headdim=32, num_attention_heads=4, num_kv_heads=2,
                   attn_head_dim=64, num_experts=4, top_k=2, expert_hidden=256), 4, 512),
    "default": (dict(pattern="MEM*EME", d_model=512, d_state=64, headdim=64, num_attention_heads=8, num_kv_heads=2,
                     attn_head_dim=64, num_experts=8, top_k=2, expert_hidden=512), 1, 2048),
}


def make_config(fields, mamba_type, module=H, checkpoint_blocks=None):
    base = dict(mamba_type=mamba_type, vocab_size=prepare.VOCAB_SIZE, expand=2, ngroups=1, chunk_size=64,
                shared_expert_hidden=0, dense_mlp_hidden=1024, is_mimo=False)
    old = getattr(module.HybridConfig, "__dataclass_fields__", None)  # scripts before issue 29: a dataclass
    if checkpoint_blocks is not None and (old is None or "checkpoint_blocks" in old):
        base["checkpoint_blocks"] = bool(checkpoint_blocks)  # scripts before it: always off
    base.update(fields)
    if old is None and "pattern" in base:  # the config reads the constants: HYBRID_PATTERN is hybrid_pattern
        base["hybrid_pattern"] = base.pop("pattern")
    return module.HybridConfig(**base)


def load_script(path):
    """Import another copy of the training script under its own module name (a copy from before the preset change
    calls apply_preset, which the harness no longer has: delete its apply_preset lines first)."""
    spec = importlib.util.spec_from_file_location("base_hybrid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_batches(batch_size, seq_len, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        block = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        yield block[:, :-1], block[:, 1:], 1


def bench_step(args):
    print(f"\n== training step (fwd+bwd+AdamW, the script's compiled step), {args.mamba_type}, float32 ==")
    versions = {"": H} if not args.against else {"": H, " base": load_script(args.against)}
    runs = {}
    for name, (fields, batch, seq_len) in CONFIGS.items():
        for suffix, module in versions.items():
            mx.random.seed(0)
            model = module.HybridLM(make_config(fields, args.mamba_type, module, args.checkpoint_blocks))
            mx.eval(model.parameters())
            optimizer = (getattr(module, "Optimizer", None) or module.AdamW)(model)  # AdamW: scripts before Muon
            step = module.make_training_step(model, optimizer, grad_accum_steps=1)
            batches = random_batches(batch, seq_len, prepare.VOCAB_SIZE)
            for _ in range(2):  # compile + one real step
                step(batches, 1.0)[0].item()
            flops = module.flops_per_token(model, seq_len) if hasattr(module, "flops_per_token") else \
                model.flops_per_token(seq_len)  # a method before issue 29
            runs[name + suffix] = (model, step, batches, batch * seq_len, seq_len, [], flops)
    for _ in range(args.steps):  # interleaved, so a change in the machine's load hits every run alike
        for model, step, batches, tokens, seq_len, times, _ in runs.values():
            t0 = time.perf_counter()
            step(batches, 1.0)[0].item()
            times.append(time.perf_counter() - t0)
    speed = {}
    for name, (model, step, batches, tokens, seq_len, times, flops) in runs.items():
        seconds = float(np.median(times))
        speed[name] = tokens / seconds
        pattern = getattr(model.config, "hybrid_pattern", None) or model.config.pattern
        print(f"{name:13s} {pattern:8s} {model.num_params() / 1e6:5.2f}M params "
              f"({model.num_active_params() / 1e6:5.2f}M active)  {tokens // seq_len} x {seq_len}: "
              f"{tokens / seconds:8.0f} tok/s  {1000 * seconds:7.0f} ms/step  "
              f"{flops * tokens / seconds / 1e9:5.1f} GFLOP/s model")
    if args.against:
        print(f"this script / {args.against}: " + ", ".join(f"{name} {speed[name] / speed[name + ' base']:.2f}x"
                                                             for name in CONFIGS))


def bench_moe(args):
    d_model, hidden, top_k, tokens = args.moe_d_model, args.moe_hidden, args.moe_top_k, args.moe_tokens
    counts = [int(e) for e in args.moe_experts.split(",")]
    print(f"\n== MoE layer alone, fwd+bwd, {tokens} tokens, d_model {d_model}, expert hidden {hidden}, top-{top_k}, "
          f"compiled; best of {args.rounds} interleaved rounds ==")
    mx.random.seed(0)
    x = mx.random.normal((1, tokens, d_model))
    probe = mx.random.normal((1, tokens, d_model))

    def dense_all_experts(moe, x):
        """Every expert on every token, mixed with the router weights: the cost a gather-free MoE would pay."""
        rows = x.reshape(-1, d_model)
        chosen, weights, balance_loss, _ = H.route(moe.router(rows), moe.top_k)
        h, gate = mx.split(rows[None] @ moe.experts.fc1, 2, axis=-1)
        every = (h * H.silu(gate)) @ moe.experts.fc2
        mix = ((chosen[..., None] == mx.arange(moe.num_experts)) * weights[..., None]).sum(axis=1)
        return (every * mix.T[..., None]).sum(axis=0).reshape(x.shape), balance_loss

    cases = {}
    for n in counts:
        moe = H.MoE(make_config(dict(d_model=d_model, num_experts=n, top_k=top_k, expert_hidden=hidden), "mamba-3"))
        mx.eval(moe.parameters())
        for kind, forward in (("routed", lambda m, x: m(x)[:2]), ("dense", dense_all_experts)):
            def loss(x, moe=moe, forward=forward):
                y, balance = forward(moe, x)
                return (y * probe).sum() + 0.01 * balance
            grad = mx.compile(nn.value_and_grad(moe, loss))
            cases[(n, kind)] = lambda grad=grad: mx.eval(grad(x))
    for run in cases.values():  # compile and warm up
        run()
    best = {key: float("inf") for key in cases}
    for _ in range(args.rounds):
        for key, run in cases.items():
            t0 = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - t0)
    base = best[(counts[0], "routed")]
    for n in counts:
        routed, dense = best[(n, "routed")], best[(n, "dense")]
        print(f"{n:3d} experts: routed {1000 * routed:7.1f} ms ({routed / base:4.2f}x of {counts[0]} experts)   "
              f"dense all-experts {1000 * dense:7.1f} ms ({dense / routed:4.1f}x routed)")


def bench_layouts(args):
    """The CPU layouts at the end of the script against MLX's own kernels, one layer each, compiled, interleaved:
    causal attention by query blocks with the polynomial exp against mx.fast.scaled_dot_product_attention, and the
    routed experts in row groups against one row per gather_mm matrix (EXPERT_GROUP_ROWS_CPU = 1). ON_CPU is set for
    each case, so on a GPU this compares the same layouts there."""
    tokens, seq_len, d_model = args.moe_tokens, 512, args.layout_d_model
    print(f"\n== CPU layouts, one layer, {tokens // seq_len} x {seq_len} tokens, d_model {d_model}; forward and "
          f"forward+backward, compiled; best of {args.rounds} interleaved rounds ==")
    mx.random.seed(0)
    x = mx.random.normal((tokens // seq_len, seq_len, d_model))
    fields = dict(d_model=d_model, num_attention_heads=4, num_kv_heads=2, attn_head_dim=64, num_experts=4, top_k=2,
                  expert_hidden=256)
    attention, moe = H.CausalSelfAttention(make_config(fields, "mamba-3")), H.MoE(make_config(fields, "mamba-3"))
    mx.eval(attention.parameters(), moe.parameters())
    settings = {  # name: (layer, the script's globals for the run)
        "attention, fused kernel": (attention, dict(ON_CPU=False)),
        "attention, query blocks": (attention, dict(ON_CPU=True)),
        "experts, one-row matrices": (moe, dict(ON_CPU=True, EXPERT_GROUP_ROWS_CPU=1)),
        "experts, 64-row groups": (moe, dict(ON_CPU=True, EXPERT_GROUP_ROWS_CPU=64)),
    }
    cases = {}
    for name, (layer, overrides) in settings.items():
        saved = {key: getattr(H, key) for key in overrides}
        for key, value in overrides.items():  # mx.compile bakes the branch in when it traces, below
            setattr(H, key, value)
        forward = mx.compile(lambda x, layer=layer: layer(x)[0])
        grad = mx.compile(nn.value_and_grad(layer, lambda x, layer=layer: (layer(x)[0] ** 2).sum()))
        cases[name] = (lambda f=forward: mx.eval(f(x)), lambda g=grad: mx.eval(g(x)))
        for run in cases[name]:
            run()  # trace and compile with the overrides in place
        for key, value in saved.items():
            setattr(H, key, value)
    best = {(name, kind): float("inf") for name in cases for kind in (0, 1)}
    for _ in range(args.rounds):
        for name, runs in cases.items():
            for kind, run in enumerate(runs):
                t0 = time.perf_counter()
                run()
                best[(name, kind)] = min(best[(name, kind)], time.perf_counter() - t0)
    for name in cases:
        forward, both = best[(name, 0)], best[(name, 1)]
        print(f"{name:26s} forward {1000 * forward:6.1f} ms ({tokens / forward:8,.0f} tok/s)   "
              f"forward+backward {1000 * both:6.1f} ms ({tokens / both:8,.0f} tok/s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="step,moe,layouts", help="comma-separated: step,moe,layouts")
    parser.add_argument("--mamba-type", default="mamba-3", choices=["mamba-3", "mamba-2"])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per configuration (median)")
    parser.add_argument("--checkpoint-blocks", type=int, default=int(H.CHECKPOINT_BLOCKS),
                        help="1: recompute each block in the backward pass (CHECKPOINT_BLOCKS; default: the script's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of the MoE sizes (best kept)")
    parser.add_argument("--against", default=None, help="another copy of train_hybrid_moe_mlx.py to compare steps with")
    parser.add_argument("--moe-experts", default="4,8,16", help="expert counts to compare, the first is the base")
    parser.add_argument("--moe-top-k", type=int, default=2)
    parser.add_argument("--moe-d-model", type=int, default=256)
    parser.add_argument("--moe-hidden", type=int, default=256)
    parser.add_argument("--moe-tokens", type=int, default=2048, help="tokens per MoE call (local micro-batch: 4 x 512)")
    parser.add_argument("--layout-d-model", type=int, default=192, help="d_model of the layouts' layers (cpu preset)")
    args = parser.parse_args()
    blas = os.path.basename(prepare.FAST_BLAS or "bundled")
    print(f"device: {mx.device_info().get('device_name', '?')} ({mx.default_device()}), blas: {blas}")
    sections = {"step": bench_step, "moe": bench_moe, "layouts": bench_layouts}
    for name in args.only.split(","):
        sections[name.strip()](args)


if __name__ == "__main__":
    main()
