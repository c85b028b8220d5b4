"""
Throughput benchmark of train_mamba_3_mlx.py (a script, not a test). Measures, on the current MLX device:

  1. training step (forward + backward + AdamW update, the script's own compiled step): tokens/s and peak memory for
     Mamba-2, Mamba-3 SISO and Mamba-3 MIMO (rank 4) at one configuration;
  2. sequence-length scaling: per-token time of the training step at several lengths, same tokens per step;
  3. the scans alone (forward + backward) against their one-token step forms run over the sequence;
  4. with --dtype, the training step in float32 against bfloat16 (what COMPUTE_DTYPE="auto" is based on).

Default configuration = the local comparison config (depth 4, d_model 384, d_state 32, headdim 32, batch 4 x 512).
Run: `uv run bench/bench_mamba_mlx.py [--only step,scaling,scan,dtype] [--steps 3] [--depth 4 ...]`.
Timings on a shared machine are noisy: compare the ratios printed side by side in one run.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402  (first: the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import train_mamba_3_mlx as T  # noqa: E402

VARIANTS = {  # name -> ModelConfig overrides
    "mamba-2": dict(architecture="mamba-2"),
    "mamba-3 SISO": dict(architecture="mamba-3", is_mimo=False),
    "mamba-3 MIMO r4": dict(architecture="mamba-3", is_mimo=True, mimo_rank=4),
}


def make_config(args, **overrides):
    fields = dict(vocab_size=prepare.VOCAB_SIZE, depth=args.depth, d_model=args.d_model, d_state=args.d_state,
                  headdim=args.headdim, expand=2, ngroups=1, chunk_size=args.chunk_size, mlp_expand=0)
    fields.update(overrides)
    return T.ModelConfig(**fields)


def random_batches(batch_size, seq_len, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        block = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        yield block[:, :-1], block[:, 1:], 1


def time_training_step(config, batch_size, seq_len, steps, dtype=mx.float32):
    """(seconds per step, peak memory MiB) of the script's compiled training step, after two warm-up steps."""
    mx.random.seed(0)
    model = T.MambaLM(config, dtype)
    mx.eval(model.parameters())
    optimizer = T.AdamW(model)
    step = T.make_training_step(model, optimizer, grad_accum_steps=1)
    batches = random_batches(batch_size, seq_len, config.vocab_size)
    for _ in range(2):  # compile + first real step
        step(batches, 1.0)[0].item()
    mx.reset_peak_memory()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = step(batches, 1.0)
        loss.item()
        mx.eval(model.state, optimizer.state)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_SECONDS[0] = float(np.median(cpu))
    return float(np.median(wall)), mx.get_peak_memory() / 1024**2, model


# CPU seconds of the last timed step (all threads of this process). On a machine shared with other jobs, wall time
# includes waiting for a core; CPU time does not, so it is the steadier number for comparing variants.
CPU_SECONDS = [0.0]


def bench_step(args):
    print(f"\n== training step (fwd+bwd+AdamW), depth {args.depth}, d_model {args.d_model}, d_state {args.d_state}, "
          f"headdim {args.headdim}, chunk {args.chunk_size}, batch {args.batch} x {args.seq_len}, float32 ==")
    tokens = args.batch * args.seq_len
    results = {}
    for name, overrides in VARIANTS.items():
        seconds, peak, model = time_training_step(make_config(args, **overrides), args.batch, args.seq_len, args.steps)
        results[name] = tokens / seconds
        mfu_flops = model.flops_per_token() * tokens / seconds
        print(f"{name:16s} {tokens / seconds:8.0f} tok/s  {1000 * seconds:8.0f} ms/step  "
              f"({tokens / CPU_SECONDS[0]:6.0f} tok per CPU-s)  peak {peak:7.0f} MiB  {mfu_flops / 1e9:6.1f} GFLOP/s model")
    siso = results["mamba-3 SISO"]
    print(f"ratios: MIMO/SISO time {siso / results['mamba-3 MIMO r4']:.2f}x, "
          f"Mamba-2/SISO speed {results['mamba-2'] / siso:.2f}x")


def bench_scaling(args):
    print(f"\n== sequence-length scaling: per-token time of the training step, {args.scaling_tokens} tokens/step ==")
    lengths = [512, 1024, 2048, 4096]
    for name, overrides in VARIANTS.items():
        row = []
        for seq_len in lengths:
            batch = max(1, args.scaling_tokens // seq_len)
            seconds, _, _ = time_training_step(make_config(args, **overrides), batch, seq_len, args.steps)
            row.append(1e6 * seconds / (batch * seq_len))
        cells = "  ".join(f"{length}: {us:6.0f} us" for length, us in zip(lengths, row))
        print(f"{name:16s} {cells}  | {lengths[-1]} vs {lengths[0]}: {row[-1] / row[0]:.2f}x")


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_scan(args):
    """One layer's scan (forward + backward) on [batch, seq_len] at the config's heads, chunked vs token steps."""
    b, l, p, n = args.batch, args.seq_len, args.headdim, args.d_state
    h = 2 * args.d_model // p
    print(f"\n== scans alone, fwd+bwd, b={b} l={l} h={h} p={p} n={n}, chunk {args.chunk_size}, compiled ==")
    mx.random.seed(0)
    X = mx.random.normal((b, l, h, p)) * 0.1
    A = -mx.random.uniform(0.001, 0.1, (b, l, h))
    B, C = mx.random.normal((b, l, 1, n)), mx.random.normal((b, l, 1, n))

    def by_steps(X, A, B, C):
        state = mx.zeros((b, h, p, n))
        ys = []
        for t in range(l):
            y, state = T.ssd_step(X[:, t], A[:, t], B[:, t], C[:, t], state)
            ys.append(y)
        return mx.stack(ys, axis=1), state

    def fwd_bwd(scan):
        grad = mx.compile(mx.grad(lambda X, A, B, C: scan(X, A, B, C)[0].sum(), argnums=(0, 1, 2, 3)))
        return lambda: mx.eval(grad(X, A, B, C))

    chunked = timed(fwd_bwd(lambda *a: T.ssd_scan(*a, args.chunk_size)), args.steps)
    stepped = timed(fwd_bwd(by_steps), 1)
    print(f"ssd_scan (Mamba-2)   chunked {1000 * chunked:8.1f} ms   step loop {1000 * stepped:8.1f} ms   "
          f"speed-up {stepped / chunked:5.1f}x   ({1e6 * chunked / (b * l):.1f} us/token)")
    for Q in (16, 32, 64, 128):
        t = timed(fwd_bwd(lambda *a, Q=Q: T.ssd_scan(*a, Q)), args.steps)
        print(f"    ssd_scan chunk {Q:4d}: {1000 * t:8.1f} ms")


def bench_dtype(args):
    print(f"\n== compute dtype: training step float32 vs bfloat16 (batch {args.batch} x {args.seq_len}) ==")
    for name in ("mamba-2", "mamba-3 SISO"):
        config = make_config(args, **VARIANTS[name])
        tokens = args.batch * args.seq_len
        fp32, _, _ = time_training_step(config, args.batch, args.seq_len, args.steps, mx.float32)
        bf16, _, _ = time_training_step(config, args.batch, args.seq_len, args.steps, mx.bfloat16)
        print(f"{name:16s} float32 {tokens / fp32:8.0f} tok/s   bfloat16 {tokens / bf16:8.0f} tok/s   "
              f"-> {'float32' if fp32 <= bf16 else 'bfloat16'} is faster here")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="step,scaling,scan,dtype", help="comma-separated: step,scaling,scan,dtype")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=T.CHUNK_SIZE)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--scaling-tokens", type=int, default=4096, help="tokens per step in the scaling runs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median reported)")
    args = parser.parse_args()
    print(f"device: {T.device_name()} ({mx.default_device()}), blas: {os.path.basename(prepare.FAST_BLAS or 'bundled')}")
    sections = {"step": bench_step, "scaling": bench_scaling, "scan": bench_scan, "dtype": bench_dtype}
    for name in args.only.split(","):
        sections[name.strip()](args)


if __name__ == "__main__":
    main()
