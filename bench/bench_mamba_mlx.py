"""
Throughput benchmark of train_mamba_3_mlx.py (a script, not a test). Measures, on the current MLX device:

  1. training step (forward + backward + AdamW update, the script's own compiled step): tokens/s and peak memory for
     Mamba-2, Mamba-3 SISO and Mamba-3 MIMO (rank 4) at one configuration;
  2. sequence-length scaling: per-token time of the training step at several lengths, same tokens per step;
  3. the scans alone (forward + backward) against their one-token step forms run over the sequence;
  4. with --dtype, the training step in float32 against bfloat16 (what COMPUTE_DTYPE="auto" is based on).

With --against FILE (another copy of the script, e.g. `git show main:train_mamba_3_mlx.py > /tmp/base.py`), the
training step of every variant runs in both versions, interleaved in one run, with the ratio new / base: the check
for any change to a hot path.

Default configuration = the local comparison config (depth 4, d_model 384, d_state 32, headdim 32, batch 4 x 512).
Run: `uv run bench/bench_mamba_mlx.py [--only step,scaling,scan,dtype] [--steps 3] [--depth 4 ...] [--against FILE]`.
Timings on a shared machine are noisy: compare the ratios printed side by side in one run.
"""

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # mlx_reference: the one-token step forms

import prepare  # noqa: E402  (first: the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_reference as R  # noqa: E402
import train_mamba_3_mlx as T  # noqa: E402

VARIANTS = {  # name -> ModelConfig overrides
    "mamba-2": dict(architecture="mamba-2"),
    "mamba-3 SISO": dict(architecture="mamba-3", is_mimo=False),
    "mamba-3 MIMO r4": dict(architecture="mamba-3", is_mimo=True, mimo_rank=4),
}


def make_config(args, module=T, **overrides):
    fields = dict(vocab_size=prepare.VOCAB_SIZE, depth=args.depth, d_model=args.d_model, d_state=args.d_state,
                  headdim=args.headdim, expand=2, ngroups=1, chunk_size=args.chunk_size, mlp_expand=0)
    if "checkpoint_blocks" in getattr(module.ModelConfig, "__dataclass_fields__", {"checkpoint_blocks"}):  # always off
        # in scripts before it; a script whose ModelConfig reads the constants takes any of them
        fields["checkpoint_blocks"] = bool(args.checkpoint_blocks)
    fields.update(overrides)
    return module.ModelConfig(**fields)


def load_script(path):
    """Import another copy of the training script under its own module name (a copy from before the preset change
    calls apply_preset, which the harness no longer has: delete its apply_preset lines first)."""
    spec = importlib.util.spec_from_file_location("base_" + os.path.basename(path).replace(".py", ""), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_batches(batch_size, seq_len, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        block = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        yield block[:, :-1], block[:, 1:], 1


class TrainingStep:
    """The script's compiled training step (grad_accum 1) on random tokens, compiled and warmed up by two steps.
    peak_mib: the peak memory of those steps above what was in use before this model was built."""

    def __init__(self, config, batch_size, seq_len, dtype=mx.float32, module=T):
        mx.random.seed(0)
        in_use = mx.get_active_memory()
        mx.reset_peak_memory()
        self.model = module.MambaLM(config, dtype)
        self.module = module
        mx.eval(self.model.parameters())
        self.optimizer = (getattr(module, "Optimizer", None) or module.AdamW)(self.model)  # AdamW: before Muon
        self.step = module.make_training_step(self.model, self.optimizer, grad_accum_steps=1)
        self.batches = random_batches(batch_size, seq_len, config.vocab_size)
        self.tokens = batch_size * seq_len
        for _ in range(2):  # compile + first real step
            self.step(self.batches, 1.0)[0].item()
        self.peak_mib = (mx.get_peak_memory() - in_use) / 1024**2

    def run_once(self):
        """(wall seconds, CPU seconds of all this process's threads) of one step."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.step(self.batches, 1.0)[0].item()
        mx.eval(self.model.state, self.optimizer.state)
        return time.perf_counter() - t0, time.process_time() - c0


def compare(steps_by_name, repeats):
    """Median (wall, CPU) seconds per step of each, the steps interleaved round by round so that a change in the
    machine's load (other jobs on a shared machine) hits every variant alike. CPU time leaves out waiting for a core;
    with a multithreaded BLAS it counts every thread."""
    times = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            times[name].append(step.run_once())
    return {name: tuple(np.median(np.array(t), axis=0)) for name, t in times.items()}


def bench_step(args):
    print(f"\n== training step (fwd+bwd+AdamW), depth {args.depth}, d_model {args.d_model}, d_state {args.d_state}, "
          f"headdim {args.headdim}, chunk {args.chunk_size or 'auto'}, batch {args.batch} x {args.seq_len}, float32, "
          f"variants interleaved ==")
    steps = {name: TrainingStep(make_config(args, **overrides), args.batch, args.seq_len)
             for name, overrides in VARIANTS.items()}
    if args.against:
        base = load_script(args.against)
        steps.update({f"{name} base": TrainingStep(make_config(args, base, **overrides), args.batch, args.seq_len,
                                                   module=base) for name, overrides in VARIANTS.items()})
    speed = {}
    for name, (wall, cpu) in compare(steps, args.steps).items():
        step = steps[name]
        speed[name] = step.tokens / wall
        flops = step.module.flops_per_token(step.model) if hasattr(step.module, "flops_per_token") else \
            step.model.flops_per_token()  # a method in scripts before issue 29
        model_flops = flops * step.tokens / wall
        print(f"{name:16s} {step.tokens / wall:8.0f} tok/s  {1000 * wall:8.0f} ms/step  "
              f"({step.tokens / cpu:6.0f} tok per CPU-s)  peak {step.peak_mib:7.0f} MiB  "
              f"{model_flops / 1e9:6.1f} GFLOP/s model")
    print(f"ratios: MIMO/SISO time {speed['mamba-3 SISO'] / speed['mamba-3 MIMO r4']:.2f}x, "
          f"Mamba-2/SISO speed {speed['mamba-2'] / speed['mamba-3 SISO']:.2f}x")
    if args.against:
        print(f"this script / {args.against}: " + ", ".join(f"{name} {speed[name] / speed[name + ' base']:.2f}x"
                                                             for name in VARIANTS))


def bench_scaling(args):
    print(f"\n== sequence-length scaling: per-token time of the training step, {args.scaling_tokens} tokens/step, "
          f"lengths interleaved ==")
    lengths = [512, 1024, 2048, 4096]
    for name, overrides in VARIANTS.items():
        steps = {length: TrainingStep(make_config(args, **overrides), max(1, args.scaling_tokens // length), length)
                 for length in lengths}
        us = {length: 1e6 * wall / steps[length].tokens for length, (wall, _) in compare(steps, args.steps).items()}
        cells = "  ".join(f"{length}: {t:6.0f} us" for length, t in us.items())
        print(f"{name:16s} {cells}  | {lengths[-1]} vs {lengths[0]}: {us[lengths[-1]] / us[lengths[0]]:.2f}x")


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def scan_inputs(kind, b, l, h, p, n, r=4, a=8):
    """Random inputs of one layer's scan (one B/C group), as (chunked call, one-token step call, step state)."""
    mx.random.seed(0)
    normal, uniform = mx.random.normal, mx.random.uniform
    if kind == "mamba-2":
        X, A = normal((b, l, h, p)) * 0.1, -uniform(0.001, 0.1, (b, l, h))
        B, C = normal((b, l, 1, n)), normal((b, l, 1, n))
        args = (X, A, B, C)
        return (args, lambda X, A, B, C, Q: T.ssd_scan(X, A, B, C, Q)[0],
                lambda X, A, B, C, t, s: R.ssd_step(X[:, t], A[:, t], B[:, t], C[:, t], s), mx.zeros((b, h, p, n)))
    rank = r if kind == "mamba-3 MIMO r4" else 1
    qk_shape = (b, l, rank, 1, n) if rank > 1 else (b, l, 1, n)
    bias_shape = (h, rank, n) if rank > 1 else (h, n)
    Qm, K = normal(qk_shape), normal(qk_shape)
    V = normal((b, l, h, p))
    DT = uniform(0.001, 0.1, (b, h, l))
    ADT, Trap = -DT * uniform(1.0, 4.0, (b, h, l)), normal((b, h, l))
    Q_bias, K_bias, Angles, D = mx.ones(bias_shape), mx.ones(bias_shape), normal((b, l, 1, a)), mx.ones((h,))
    state = (mx.zeros((b, h, a)), mx.zeros((b, h, p, n)), mx.zeros((b, rank, h, n) if rank > 1 else (b, h, n)),
             mx.zeros((b, h, p)))
    args = (Qm, K, V, ADT, DT, Trap)
    if rank == 1:
        def scan(Qm, K, V, ADT, DT, Trap, chunk):
            return T.mamba3_scan(Qm, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, chunk_size=chunk)[0]

        def step(Qm, K, V, ADT, DT, Trap, t, s):
            return R.mamba3_siso_step(Qm[:, t], K[:, t], V[:, t], ADT[..., t], DT[..., t], Trap[..., t], Q_bias,
                                      K_bias, Angles[:, t], D, state=s)
    else:
        mimo = mx.full((h, rank, p), 1.0 / rank)

        def scan(Qm, K, V, ADT, DT, Trap, chunk):
            return T.mamba3_scan(Qm, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, MIMO_V=mimo, MIMO_O=mimo,
                                 chunk_size=chunk)[0]

        def step(Qm, K, V, ADT, DT, Trap, t, s):
            return R.mamba3_mimo_step(Qm[:, t], K[:, t], V[:, t], ADT[..., t], DT[..., t], Trap[..., t], Q_bias,
                                      K_bias, Angles[:, t], mimo, None, mimo, D, state=s)
    return args, scan, step, state


def bench_scan(args):
    """Each layer's scan (forward + backward), chunked against its one-token step run over the sequence."""
    b, l, p, n = args.batch, args.seq_len, args.headdim, args.d_state
    h = 2 * args.d_model // p
    print(f"\n== scans alone, fwd+bwd (compiled), b={b} l={l} h={h} p={p} n={n}: chunked vs a loop of steps ==")
    for kind, chunks in (("mamba-2", (16, 32, 64, 128)), ("mamba-3 SISO", (16, 32, 64, 128)),
                         ("mamba-3 MIMO r4", (8, 16, 32))):
        inputs, scan, step, state0 = scan_inputs(kind, b, l, h, p, n)
        argnums = tuple(range(len(inputs)))

        def by_steps(*inputs):
            state, ys = state0, []
            for t in range(l):
                y, state = step(*inputs, t, state)
                ys.append(y)
            return mx.stack(ys, axis=1)

        def fwd_bwd(fn):
            grad = mx.compile(mx.grad(lambda *a: fn(*a).sum(), argnums=argnums))
            return lambda: mx.eval(grad(*inputs))

        stepped = timed(fwd_bwd(by_steps), 1)
        times = {Q: timed(fwd_bwd(lambda *a, Q=Q: scan(*a, Q)), args.steps) for Q in chunks}
        best = min(times, key=times.get)
        cells = "  ".join(f"c={Q}: {1000 * t:6.1f} ms" for Q, t in times.items())
        print(f"{kind:16s} step loop {1000 * stepped:8.1f} ms | chunked {cells} | best c={best}: "
              f"{stepped / times[best]:5.1f}x faster than steps, {1e6 * times[best] / (b * l):5.1f} us/token")


def bench_dtype(args):
    print(f"\n== compute dtype: training step float32 vs bfloat16 (batch {args.batch} x {args.seq_len}) ==")
    for name in ("mamba-2", "mamba-3 SISO"):
        config = make_config(args, **VARIANTS[name])
        steps = {dtype: TrainingStep(config, args.batch, args.seq_len, getattr(mx, dtype))
                 for dtype in ("float32", "bfloat16")}
        speed = {dtype: steps[dtype].tokens / wall for dtype, (wall, _) in compare(steps, args.steps).items()}
        print(f"{name:16s} float32 {speed['float32']:8.0f} tok/s   bfloat16 {speed['bfloat16']:8.0f} tok/s   "
              f"-> {max(speed, key=speed.get)} is faster here")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="step,scaling,scan,dtype", help="comma-separated: step,scaling,scan,dtype")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=T.CHUNK_SIZE, help="0 = each block's default")
    parser.add_argument("--checkpoint-blocks", type=int, default=int(T.CHECKPOINT_BLOCKS),
                        help="1: recompute each block in the backward pass (CHECKPOINT_BLOCKS; default: the script's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--scaling-tokens", type=int, default=4096, help="tokens per step in the scaling runs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median reported)")
    parser.add_argument("--against", default=None, help="another copy of train_mamba_3_mlx.py to compare steps with")
    args = parser.parse_args()
    blas = os.path.basename(prepare.FAST_BLAS or "bundled")
    print(f"device: {mx.device_info().get('device_name', '?')} ({mx.default_device()}), blas: {blas}")
    sections = {"step": bench_step, "scaling": bench_scaling, "scan": bench_scan, "dtype": bench_dtype}
    for name in args.only.split(","):
        sections[name.strip()](args)


if __name__ == "__main__":
    main()
