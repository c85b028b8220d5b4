"""
Does `machine_speed` follow the steps a run got? Six runs of one script on one core (Linux `taskset`), interleaved:
two quiet, two beside BUSY spinning processes on the same core for the whole run, two with them only in the middle
half of the training time. Prints each run's num_steps, machine_speed, whether it warned, val_bpb and the probes' share
of its wall time, then the Spearman rank correlation of machine_speed with num_steps.

Run: `uv run bench/bench_speed_signal.py [--script train_mamba_3_mlx.py] [--budget 75] [--core N] [--busy 2]`.
Needs a prepared cache; the script is run as a copy sized by the active preset (AUTORESEARCH_MLX_PRESET_FILE, default
`cpu`) with TIME_BUDGET set to --budget. Other work on the chosen core makes the quiet runs loaded: pin it elsewhere.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402
import numpy as np  # noqa: E402

SPIN = "while True: pass"
WITH_PROBE_TIMES = ("import atexit, runpy, sys, prepare; atexit.register(lambda: print('probe_ms: ' + ' '.join("
                    "f'{1000 * t:.1f}' for t in prepare.SPEED_PROBES))); "
                    "runpy.run_path(sys.argv[1], run_name='__main__')")


def sized_copy(script, budget, directory):
    """The script and harness in `directory`, the script sized by the active preset, with a preset of TIME_BUDGET."""
    for name in ("prepare.py", "prepare_mlx_mamba_3.py", script):
        with open(os.path.join(ROOT, name)) as f, open(os.path.join(directory, name), "w") as g:
            g.write(f.read())
    os.symlink(os.path.join(ROOT, "presets"), os.path.join(directory, "presets"))
    prepare.write_constants(os.path.join(directory, script), prepare.PRESET[script.removesuffix(".py")])
    preset = {**prepare.PRESET, "prepare": {**prepare.PRESET["prepare"], "TIME_BUDGET": budget}}
    path = os.path.join(directory, f"{prepare.PRESET_NAME}{budget}.json")
    with open(path, "w") as f:
        json.dump(preset, f)
    return path


def run(directory, script, preset, core, load, budget, busy):
    """One run; `load`: "quiet", "whole" (busy processes for the whole run) or "middle" (from a quarter to three
    quarters of the training time)."""
    env = dict(os.environ, AUTORESEARCH_MLX_PRESET_FILE=preset)
    pin = ["taskset", "-c", str(core)]
    spinners = []

    def spin():
        spinners.extend(subprocess.Popen([*pin, sys.executable, "-c", SPIN]) for _ in range(busy))

    if load == "whole":
        spin()
    process = subprocess.Popen([*pin, sys.executable, "-c", WITH_PROBE_TIMES, script], cwd=directory, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, timer = [], None
    for line in process.stdout:
        lines.append(line)
        if load == "middle" and timer is None and line.startswith("step 00002"):  # the training clock has started
            timer = threading.Timer(budget / 4, spin)
            timer.start()
            threading.Timer(3 * budget / 4, lambda: [p.kill() for p in spinners]).start()
    process.wait()
    for p in spinners:
        p.kill()
    text = "".join(lines)
    summary = dict(re.findall(r"^(\w+): (.*)$", text.split("\n---\n")[-1], re.M))
    if "val_bpb" not in summary:
        raise SystemExit(f"the {load} run failed:\n{text[-3000:]}")
    probes = int(re.search(r"\((\d+) probes", summary["machine_speed"]).group(1))
    speed = float(summary["machine_speed"].split()[0])
    return {"load": load, "num_steps": int(summary["num_steps"]), "machine_speed": speed,
            "warned": any(line.startswith("warning: the machine ran") for line in lines),
            "val_bpb": float(summary["val_bpb"]), "total_seconds": float(summary["total_seconds"]), "probes": probes,
            "line": summary["machine_speed"],
            "probe_ms": [float(x) for x in re.search(r"^probe_ms: (.*)$", text, re.M).group(1).split()]}


def spearman(x, y):
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (no ties in practice; ties would rank in order)
    return float(np.corrcoef(rank(np.array(x)), rank(np.array(y)))[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--script", default="train_mamba_3_mlx.py")
    parser.add_argument("--budget", type=int, default=75, help="TIME_BUDGET seconds of each run")
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1, help="the one core every run uses")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes on that core in the loaded runs")
    parser.add_argument("--order", default="quiet,whole,middle,quiet,whole,middle")
    parser.add_argument("--json", help="also write every run's figures and probe times (ms) to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        preset = sized_copy(args.script, args.budget, directory)
        rows = []
        for load in args.order.split(","):
            rows.append(run(directory, args.script, preset, args.core, load, args.budget, args.busy))
            r = rows[-1]
            probe_s = sum(r["probe_ms"]) / 1000
            print(f"{r['load']:7s} num_steps {r['num_steps']:4d}  machine_speed {r['machine_speed']:.2f}  "
                  f"warning {'yes' if r['warned'] else 'no ':3s}  val_bpb {r['val_bpb']:.6f}  "
                  f"probes {r['probes']}: {probe_s:.2f} s, {probe_s / r['total_seconds']:.1%} of "
                  f"{r['total_seconds']:.0f} s  | {r['line']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    rho = spearman([r["num_steps"] for r in rows], [r["machine_speed"] for r in rows])
    loaded_warn = all(r["warned"] for r in rows if r["load"] != "quiet")
    quiet_silent = not any(r["warned"] for r in rows if r["load"] == "quiet")
    print(f"Spearman(machine_speed, num_steps) = {rho:.2f}; loaded runs all warned: {loaded_warn}; quiet runs "
          f"silent: {quiet_silent}")


if __name__ == "__main__":
    main()
