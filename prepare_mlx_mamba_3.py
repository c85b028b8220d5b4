"""
Architecture-aware entry point of the fixed harness: prepare data, tokenizer and evaluation rows, size the training
scripts for the active preset, then say how to train. The work itself lives in prepare.py (the one source of truth).

    uv run prepare_mlx_mamba_3.py [--architecture {mamba-2,mamba-3,hybrid}] [--num-shards N]
                                  [--download-workers W] [--data-dir DIR] [--keep-scripts]
    uv run prepare_mlx_mamba_3.py --calibrate      # measure this machine at the active preset (after preparing)

Sizing writes the active preset's section of each training script into that script's constant lines (and
--architecture into ARCHITECTURE), printing every change: the constants a reader sees are the values a run trains
with, and `git diff` shows what setup changed. --keep-scripts leaves the scripts as they are.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import prepare

ARCHITECTURES = ("mamba-2", "mamba-3", "hybrid")
ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("train_mamba_3_mlx", "train_hybrid_moe_mlx", "train_mamba")  # also the preset sections' names


def size_scripts(architecture=None, directory=ROOT):
    """Write the active preset's values (and ARCHITECTURE, for mamba-2 / mamba-3) into the training scripts."""
    for script in SCRIPTS:
        values = dict(prepare.PRESET[script])
        if architecture in ("mamba-2", "mamba-3") and script != "train_hybrid_moe_mlx":
            values["ARCHITECTURE"] = architecture
        changed = prepare.write_constants(os.path.join(directory, script + ".py"), values)
        print(f"{script}.py: " + (", ".join(f"{key} {old} -> {new}" for key, old, new in changed) if changed else
                                 f"already sized for preset {prepare.PRESET_NAME}"))


# The environment variables that shape the cache and the run.
RUN_ENVIRONMENT = ("AUTORESEARCH_MLX_PRESET_FILE", "AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_FAST_BLAS")


def training_command(architecture):
    """The command that trains `architecture` on this cache and preset. It repeats each variable of RUN_ENVIRONMENT
    that is set (paths made absolute, values quoted), so pasted into a fresh shell it gives the same fingerprint."""
    env = {}
    for name in RUN_ENVIRONMENT:
        value = os.environ.get(name)
        if name == "AUTORESEARCH_MLX_PRESET_FILE":
            value = (value or "").strip() or None  # empty: chosen by device, as if unset
            if value and os.path.isfile(value):  # a path (else a name in presets/, such as `cpu`)
                value = os.path.abspath(value)
        elif name == "AUTORESEARCH_CACHE_DIR" and value is not None:
            value = os.path.abspath(os.path.expanduser(value))
        if value is not None:
            env[name] = value
    script = "train_hybrid_moe_mlx.py" if architecture == "hybrid" else "train_mamba_3_mlx.py"
    return " ".join([f"{name}={shlex.quote(value)}" for name, value in env.items()] + ["uv run", script])


# ---------------------------------------------------------------------------------------------------------------------
# --calibrate: this machine at the active preset. First the figures later runs compare with, on a quiet machine (the
# matmul peak for MFU, the machine-speed probe); then a short real run of each architecture's training script (a
# copy of the preset with a short budget and a small evaluation): what a 5-minute experiment will cost here.

CALIBRATION_RUNS = {  # name -> (script, constants written into its copy besides the preset's)
    "mamba-2": ("train_mamba_3_mlx", {"ARCHITECTURE": "mamba-2"}),
    "mamba-3 SISO": ("train_mamba_3_mlx", {"ARCHITECTURE": "mamba-3", "IS_MIMO": False}),
    "mamba-3 MIMO": ("train_mamba_3_mlx", {"ARCHITECTURE": "mamba-3", "IS_MIMO": True}),
    "hybrid": ("train_hybrid_moe_mlx", {}),
}
CALIBRATION_BUDGET = min(15, prepare.TIME_BUDGET)  # seconds of training per architecture: a few timed steps
CALIBRATION_EVAL_ROWS = 32  # evaluation rows scored per architecture; the full evaluation is extrapolated


def device_memory_gb():
    """What the device may use: Metal's recommended working set, a CUDA GPU's memory, else the machine's RAM."""
    import mlx.core as mx

    info = mx.device_info()
    if mx.metal.is_available():
        return info.get("max_recommended_working_set_size", 0) / 1e9, "Metal working set"
    if mx.cuda.is_available():
        return info.get("memory_size", 0) / 1e9, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, "RAM"


def record_machine_figures(force=False):
    """Measure the probe 5 times (keeping the best) and the matmul peak (the dtype the scripts compute in here), and
    record both. On a clearly busy machine (prepare.busy_reason) it refuses, one line and nothing recorded, unless
    `force`. Recording never slows the machine-speed reference: it stays the fastest probe this machine has shown."""
    import mlx.core as mx

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before probing: the probes raise it
    key = prepare.probe_key("mlx")
    reference = prepare.probe_reference(key)
    times, others_share = prepare.probe_repeats("mlx")
    busy = prepare.busy_reason(times, others_share, load, reference)
    if busy and not force:
        raise prepare.HarnessError(f"calibrate: this machine is busy ({busy}): wait until it is quiet and rerun, or "
                                   f"pass --force to record anyway. Nothing was recorded.")
    if busy:
        print(f"calibrate: recording on a busy machine (--force): {busy}")
    name = mx.device_info().get("device_name", str(mx.default_device()))
    dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"  # COMPUTE_DTYPE "auto"
    peak, probe = prepare._measure_matmul_flops("mlx", dtype), min(times)
    prepare.raise_probe_reference(key, min(probe, reference or probe))  # keeps a faster calibrated probe it replaces
    prepare.record_calibration({prepare.calibration_key("matmul", "mlx", name, dtype): peak, key: probe})
    print(f"calibrate: {name}: matmul {peak / 1e9:,.0f} GFLOP/s ({dtype}), probe {1000 * probe:.1f} ms (best of "
          f"{len(times)}, slowest {1000 * max(times):.1f}; reference {1000 * prepare.probe_reference(key):.1f} ms) "
          f"-> {prepare.CALIBRATION_PATH}")


def calibration_run(name, work_dir):
    """Train `name` for CALIBRATION_BUDGET seconds: a copy of its script sized for the active preset, under a copy
    of the preset with that budget and a small evaluation; returns its summary as a dict."""
    script, constants = CALIBRATION_RUNS[name]
    eval_tokens = min(prepare.EVAL_TOKENS, CALIBRATION_EVAL_ROWS * prepare.MAX_SEQ_LEN)
    sections = {key: dict(value) for key, value in prepare.PRESET.items()}
    sections["prepare"].update(TIME_BUDGET=CALIBRATION_BUDGET, EVAL_TOKENS=eval_tokens)
    run_dir = os.path.join(work_dir, name.replace(" ", "-"))
    os.makedirs(run_dir)
    copy = shutil.copy(os.path.join(ROOT, f"{script}.py"), run_dir)
    prepare.write_constants(copy, {**prepare.PRESET[script], **constants})
    preset = os.path.join(run_dir, "preset.json")
    with open(preset, "w") as f:
        json.dump(sections, f)
    run_env = dict(os.environ, AUTORESEARCH_MLX_PRESET_FILE=preset, PYTHONPATH=ROOT)  # the copy imports prepare.py
    result = subprocess.run([sys.executable, copy], cwd=ROOT, env=run_env, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or "---" not in lines:
        why = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        return {"error": why}
    summary = dict(line.split(": ", 1) for line in lines if ": " in line and not line.startswith("step "))
    summary["eval_tokens"] = eval_tokens
    return summary


def calibrate(force=False):
    """Print this machine's table at the active preset: tokens/s, MFU, optimizer steps in TIME_BUDGET, evaluation
    seconds at EVAL_TOKENS, peak memory against the device's; then which preset fits."""
    prepare.check_cache()  # the runs need the prepared data: fail here, in one line, if it is not there
    record_machine_figures(force)  # a busy machine ends here, before the runs
    memory, memory_kind = device_memory_gb()
    print(f"calibrate: preset {prepare.PRESET_NAME}, TIME_BUDGET={prepare.TIME_BUDGET}s, "
          f"EVAL_TOKENS={prepare.EVAL_TOKENS:,}; {memory:.1f} GB {memory_kind}; a {CALIBRATION_BUDGET}s run of each")
    header = f"{'architecture':<14} {'tok/s':>9} {'MFU %':>6} {'steps':>6} {'eval s':>7} {'peak GB':>8}  fits"
    rows, worst_eval, worst_peak = [header], 0.0, 0.0
    with tempfile.TemporaryDirectory() as work_dir:
        for name in CALIBRATION_RUNS:
            t0 = time.time()
            summary = calibration_run(name, work_dir)
            if "error" in summary:
                rows.append(f"{name:<14} failed: {summary['error']}")
                continue
            tokens_per_s = float(summary["throughput"].split()[0].replace(",", ""))
            tokens_per_step = int(summary["batch"].split()[0])  # "batch: N tokens/step = ..."
            eval_s = float(summary["eval_seconds"]) * prepare.EVAL_TOKENS / summary["eval_tokens"]
            peak_gb = float(summary["peak_memory_mb"]) / 1e3
            fits = peak_gb <= memory and eval_s <= prepare.TIME_BUDGET / 4
            worst_eval, worst_peak = max(worst_eval, eval_s), max(worst_peak, peak_gb)
            rows.append(f"{name:<14} {tokens_per_s:>9,.0f} {float(summary['mfu_percent']):>6.1f} "
                        f"{prepare.TIME_BUDGET * tokens_per_s / tokens_per_step:>6.0f} {eval_s:>7.0f} "
                        f"{peak_gb:>8.2f}  {'yes' if fits else 'NO'}   ({time.time() - t0:.0f}s)")
    print("\n".join(rows))
    if worst_peak <= memory and worst_eval <= prepare.TIME_BUDGET / 4:
        print(f"fits: preset {prepare.PRESET_NAME} fits this machine (peak {worst_peak:.1f} of {memory:.1f} GB, "
              f"evaluation at most {worst_eval:.0f}s of a {prepare.TIME_BUDGET}s budget)")
    else:
        print(f"fits: preset {prepare.PRESET_NAME} is too big here (peak {worst_peak:.1f} of {memory:.1f} GB, "
              f"evaluation up to {worst_eval:.0f}s of a {prepare.TIME_BUDGET}s budget): try a smaller one, e.g. "
              f"AUTORESEARCH_MLX_PRESET_FILE={'cpu' if prepare.device_preset()[0] == 'cpu' else 'local'}")


def main():
    parser = prepare.make_parser("Prepare data and tokenizer for autoresearch-mamba (MLX), and size the training "
                                 "scripts for the active preset.")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=None,
                        help="mamba-2 or mamba-3: written into the Mamba scripts' ARCHITECTURE; hybrid: "
                             "train_hybrid_moe_mlx.py (default: the scripts as they are)")
    parser.add_argument("--keep-scripts", action="store_true",
                        help="leave the training scripts' constants as they are (no sizing for the preset)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine at the active preset (every architecture; prepare first)")
    parser.add_argument("--force", action="store_true",
                        help="with --calibrate: record even when the machine looks busy (it refuses otherwise)")
    args = parser.parse_args()
    if args.calibrate:
        return calibrate(force=args.force)
    prepare.prepare(args.num_shards, args.download_workers, args.data_dir)
    if not args.keep_scripts:
        size_scripts(args.architecture)
        print("sized: the constants above are what the runs train with; `git diff` shows them (program.md: commit)")
    print(f"next: {training_command(args.architecture or 'mamba-3')} > run.log 2>&1")


if __name__ == "__main__":
    prepare.run(main)
