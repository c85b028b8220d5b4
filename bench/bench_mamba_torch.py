"""
Throughput benchmark of train_mamba.py, the PyTorch mirror (a script, not a test). On the current device it measures:

  1. step: the script's own training step (make_training_step: compiled forward + backward, clip, fused AdamW) for
     Mamba-2, Mamba-3 SISO and Mamba-3 MIMO: tokens/s, ms/step, MFU (the script's FLOP count against
     prepare.peak_flops: the datasheet bf16 peak on known GPUs, 989 TFLOP/s for an H100 SXM) and peak memory;
  2. scan: each scan alone, forward + backward at the model's shapes: the pure-PyTorch chunked scan (eager and
     compiled) and, where mamba_ssm imports, its fused kernel after the same start-up check the script runs;
  3. with --profile, the CUDA kernels that take the most time in one training step of each variant;
  4. memory (only when asked): the live-tensor peak of one eager training step, with and without block
     checkpointing, from torch's MemTracker (the tensors themselves, on the CPU too, where RSS overstates them);
  5. losses (only when asked): eight training steps from one seed, in this script and the --against copy.

Defaults: on CUDA the script's full-size configuration (depth 8, d_model 768, d_state 64, headdim 64, chunk 64,
8 x 2048 tokens per pass, bf16 autocast); on CPU a small one so it finishes (depth 2, d_model 128, 2 x 256, float32).
With --against FILE (another copy of the script, e.g. `git show main:train_mamba.py > /tmp/base.py`), the training step
of every variant also runs in that copy, the two interleaved step by step in one run, with the ratio new / base: the
check for a change to a hot path on a machine whose speed drifts.

Run: `uv run --extra torch bench/bench_mamba_torch.py [--only step,scan,memory,losses] [--variants mamba-2,mamba-3]
[--steps 10] [--no-compile] [--no-fused] [--profile] [--depth 8 --d-model 768 ...] [--against FILE]`.
"""

import argparse
import importlib.util
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("AUTORESEARCH_BACKEND", "torch")  # the harness picks the preset by torch's device
import prepare  # noqa: E402  (first, as in every script)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_mamba as T  # noqa: E402

VARIANTS = {  # name -> ModelConfig overrides
    "mamba-2": dict(architecture="mamba-2"),
    "mamba-3": dict(architecture="mamba-3", is_mimo=False),
    "mamba-3-mimo": dict(architecture="mamba-3", is_mimo=True, mimo_rank=4),
}


def load_script(path):
    """Import another copy of train_mamba.py under its own module name."""
    spec = importlib.util.spec_from_file_location("base_" + os.path.basename(path).replace(".py", ""), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(args, module=T, **overrides):
    fields = dict(vocab_size=prepare.VOCAB_SIZE, depth=args.depth, d_model=args.d_model, d_state=args.d_state,
                  headdim=args.headdim, expand=2, ngroups=1, chunk_size=args.chunk_size, mlp_expand=0)
    fields.update(overrides)
    if overrides.get("is_mimo") and args.mimo_chunk_size:
        fields["chunk_size"] = args.mimo_chunk_size
    return module.ModelConfig(**fields)


def random_batches(batch_size, seq_len, vocab_size, seed=0):
    """Random token rows in the dataloader's format (int32 numpy inputs, targets, epoch): no tokenizer or data."""
    rng = np.random.default_rng(seed)
    while True:
        block = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        yield block[:, :-1], block[:, 1:], 1


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: the process peak RSS


def make_optimizer(module, model, device):  # the script's Optimizer (make_optimizer in copies before 2026-12-07)
    return (getattr(module, "Optimizer", None) or module.make_optimizer)(model, device)


def build(config, args, device, module=T):
    torch.manual_seed(0)
    module.FUSED.clear()
    model = module.MambaLM(config, args.dtype).to(device)
    backend = module.choose_scan_backend(config, device) if args.fused else "torch"
    optimizer = make_optimizer(module, model, device)
    step = module.make_training_step(model, optimizer, 1, device, compile_model=args.compile)
    return model, step, backend


def time_training_steps(configs, args, device):
    """{name: (median seconds per step, model, backend)} of configs {name: (config, module)}, each after warm-up steps
    (compilation, autotuning), timed one step of each in turn, in alternating order, so that a drift in the machine's
    speed hits all alike."""
    built = {}
    for name, (config, module) in configs.items():
        model, step, backend = build(config, args, device, module)
        batches = random_batches(args.batch, args.seq_len, config.vocab_size)
        for _ in range(args.warmup):
            step(batches, 1.0)[0].item()
        built[name] = (model, step, backend, batches)
    times = {name: [] for name in built}
    for i in range(args.steps):
        for name, (_, step, _, batches) in list(built.items())[:: 1 if i % 2 == 0 else -1]:  # first in turn
            synchronize(device)
            t0 = time.perf_counter()
            step(batches, 1.0)[0].item()
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(times[name])), model, backend) for name, (model, _, backend, _) in built.items()}


def bench_step(args, device, peak_flops, peak_source):
    tokens = args.batch * args.seq_len
    print(f"\n== training step (fwd+bwd+clip+AdamW), depth {args.depth}, d_model {args.d_model}, "
          f"d_state {args.d_state}, headdim {args.headdim}, chunk {args.chunk_size}, "
          f"batch {args.batch} x {args.seq_len}, {args.dtype}, compile {args.compile}; "
          f"MFU against {peak_flops / 1e12:.1f} TFLOP/s ({peak_source}) ==")
    base = load_script(args.against) if args.against else None
    for name in args.variants:
        configs = {name: (make_config(args, **VARIANTS[name]), T)}
        if base:
            configs[f"{name} base"] = (make_config(args, base, **VARIANTS[name]), base)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = time_training_steps(configs, args, device)
        peak = peak_memory_mb(device)  # of the variant (with its base, if any)
        for label, (seconds, model, backend) in timed.items():
            flops = model.flops_per_token()
            mfu = 100 * flops * tokens / seconds / peak_flops
            print(f"{label:18s} {tokens / seconds:12,.0f} tok/s  {1000 * seconds:8.1f} ms/step  MFU {mfu:5.1f}%  "
                  f"{flops / 1e6:7.1f} MFLOP/token  {sum(p.numel() for p in model.parameters()) / 1e6:6.1f}M params  "
                  f"peak {peak:8.0f} MiB  scan {backend}", flush=True)
        if base:
            print(f"{name:18s} this script / {args.against}: {timed[name + ' base'][0] / timed[name][0]:.3f}x speed",
                  flush=True)
        if args.profile and device.type == "cuda":
            profile_step(timed[name][1], configs[name][0], args, device)
        del timed
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_step(model, config, args, device):
    """The CUDA kernels of one (already warm) training step, by total time."""
    _, step, _ = build(config, args, device)
    batches = random_batches(args.batch, args.seq_len, config.vocab_size)
    for _ in range(args.warmup):
        step(batches, 1.0)[0].item()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(batches, 1.0)[0].item()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80))


def scan_problem(kind, config, args, device):
    problem = T._random_scan_problem(kind, config, args.batch, args.seq_len, device, args.dtype)
    return {key: value.requires_grad_() for key, value in problem.items()}


def time_scan(function, problem, chunk_size, device, repeats):
    """Median seconds of forward + backward of sum(output * probe)."""
    def run():
        for value in problem.values():
            value.grad = None
        out = function(**problem, chunk_size=chunk_size)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_scan(args, device):
    print(f"\n== scans alone (forward + backward), batch {args.batch} x {args.seq_len}, d_model {args.d_model}, "
          f"d_state {args.d_state}, headdim {args.headdim}, inputs {args.dtype} ==")
    kinds = {"mamba-2": "ssd", "mamba-3": "siso", "mamba-3-mimo": "mimo"}
    fused = T._fused_candidates() if device.type == "cuda" and args.fused else {}
    for name in args.variants:
        config = make_config(args, **VARIANTS[name])
        kind = kinds[name]
        pure = T.PURE_SCANS[kind]
        problem = scan_problem(kind, config, args, device)
        layer = T.Block(config).mixer
        flops = 3 * layer.scan_flops_per_token() * args.batch * args.seq_len  # forward + backward
        rows = [("pure eager", pure)]
        if args.compile and device.type == "cuda":
            rows.append(("pure compiled", torch.compile(pure)))
        if kind in fused:
            function, kernel = fused[kind]
            ok, detail = T.fused_matches_pure(function, pure, T._random_scan_problem(
                kind, config, 2, 4 * config.chunk_size, device, torch.bfloat16), config.chunk_size)
            rows.append((f"{kernel} ({'ok' if ok else 'MISMATCH'}: {detail})", function))
        for label, function in rows:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == torch.bfloat16):
                seconds = time_scan(function, problem, config.chunk_size, device, args.steps)
            print(f"{name:13s} {label:60s} {1000 * seconds:9.2f} ms  {flops / seconds / 1e12:7.2f} TFLOP/s "
                  f"(scan matmul FLOPs)", flush=True)


def bench_losses(args, device):
    """Eight optimizer steps from one seed on fixed random batches (two micro-batches a step, the schedule over eight
    steps), in this script and, with --against, in the other copy: a change meant to keep the numbers keeps these."""
    modules = {"": T} | ({" base": load_script(args.against)} if args.against else {})
    print(f"\n== eight training steps from one seed, depth {args.depth}, d_model {args.d_model}, batch {args.batch} x "
          f"{args.seq_len}, {args.dtype}, compile {args.compile} ==")
    for name in args.variants:
        losses = {}
        for suffix, module in modules.items():
            torch.manual_seed(42)
            model = module.MambaLM(make_config(args, module, **VARIANTS[name]), args.dtype).to(device)
            step = module.make_training_step(model, make_optimizer(module, model, device), 2, device,
                                             compile_model=args.compile)
            batches = random_batches(args.batch, args.seq_len, model.config.vocab_size)
            losses[suffix] = [step(batches, module.lr_multiplier(i / 8))[0].item() for i in range(8)]
            print(f"{name + suffix:18s} " + " ".join(f"{loss:.6f}" for loss in losses[suffix]), flush=True)
        if args.against:
            print(f"{name:18s} {'bit-identical' if losses[''] == losses[' base'] else 'DIFFERENT'}", flush=True)


def bench_memory(args, device):
    """The live-tensor peak of one training step, checkpointed as the script's CHECKPOINT_BLOCKS and not: what every
    tensor alive at once holds, counted by torch's MemTracker (a dispatch mode that follows each storage from its
    allocation to its release) on any device. A process's peak RSS on the CPU also counts the allocator's one-time
    growth; CUDA's max_memory_allocated counts the same tensors as this, plus the caching allocator's rounding."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tokens = args.batch * args.seq_len
    print(f"\n== live-tensor peak of one training step (eager, the step's own optimizer), depth "
          f"{args.depth}, d_model {args.d_model}, batch {args.batch} x {args.seq_len} ==")
    for name in args.variants:
        for checkpointed in (True, False):
            config = make_config(args, checkpoint_blocks=checkpointed, **VARIANTS[name])
            torch.manual_seed(0)
            T.FUSED.clear()
            model = T.MambaLM(config, args.dtype).to(device)
            optimizer = T.Optimizer(model, device)
            step = T.make_training_step(model, optimizer, 1, device, compile_model=False)
            batches = random_batches(args.batch, args.seq_len, config.vocab_size)
            step(batches, 1.0)[0].item()  # the optimizer's state exists from here on
            tracker = MemTracker()
            tracker.track_external(model, optimizer.adamw)  # Muon's momentum is tracked as a plain allocation
            with tracker:
                step(batches, 1.0)[0].item()
            peak = tracker.get_tracker_snapshot("peak")[device]["Total"] / 2**20
            print(f"{name:13s} checkpointed {str(checkpointed):5s} peak {peak:9,.0f} MiB  "
                  f"({1024 * peak / tokens:6.1f} MiB per 1k tokens)", flush=True)
            del model, optimizer, step


def main():
    on_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="step,scan", help="comma-separated: step,scan,memory,losses")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--depth", type=int, default=T.DEPTH if on_cuda else 2)
    parser.add_argument("--d-model", type=int, default=T.D_MODEL if on_cuda else 128)
    parser.add_argument("--d-state", type=int, default=T.D_STATE if on_cuda else 32)
    parser.add_argument("--headdim", type=int, default=T.HEADDIM if on_cuda else 32)
    parser.add_argument("--chunk-size", type=int, default=T.CHUNK_SIZE)
    parser.add_argument("--mimo-chunk-size", type=int, default=0, help="chunk for MIMO (0: same as --chunk-size)")
    parser.add_argument("--batch", type=int, default=T.DEVICE_BATCH_SIZE if on_cuda else 2)
    parser.add_argument("--seq-len", type=int, default=2048 if on_cuda else 256)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10 if on_cuda else 3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3 if on_cuda else 1, help="untimed steps (compile, autotune)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager model (default on CPU)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="pure-PyTorch scans only")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a step per variant")
    parser.add_argument("--against", default=None, help="another copy of train_mamba.py to compare steps with")
    parser.set_defaults(compile=on_cuda)
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    device = torch.device("cuda" if on_cuda else "cpu")
    if args.dtype == "auto":
        args.dtype = torch.bfloat16 if on_cuda else torch.float32
    else:
        args.dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU {platform.machine()}"
    peak_flops, peak_source = prepare.peak_flops(name, "float32" if args.dtype == torch.float32 else "bfloat16",
                                                 backend="torch")
    print(f"device: {name}, torch {torch.__version__}")
    only = set(args.only.split(","))
    if "step" in only:
        bench_step(args, device, peak_flops, peak_source)
    if "scan" in only:
        bench_scan(args, device)
    if "memory" in only:
        bench_memory(args, device)
    if "losses" in only:
        bench_losses(args, device)


if __name__ == "__main__":
    main()
