"""
Replays a night's results through the keep rule (`prepare.keep_rule`, what `uv run prepare.py log` decides), row by
row, as the command would have decided it: each commit's status is the rule's, the runs are the night's. Three
variants of the speed column: as logged, none (the arithmetic alone), and a speed that follows the steps exactly
(each run's steps over the most any run of its commit got: a hindsight figure, what a perfect signal could give).

Run: `uv run bench/replay_keep_rule.py [night.tsv]` (default: the 28-run night of issue 27, below). A night file has
the columns commit, val_bpb, status, num_steps, machine_speed, warning, description (tab-separated, no header).
Prints a Markdown table of the verdicts (the noise after each row in brackets) and each variant's final state.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402

ISSUE_27_NIGHT = """\
3bc23da	2.446172	keep	71	0.63 (0.68, 0.58)	yes	baseline
3bc23da	2.424213	rerun	77	0.80 (0.95, 0.66)	yes	baseline rerun
3bc23da	2.440155	rerun	73	0.78 (0.96, 0.59)	yes	baseline rerun
6aba357	2.406067	keep	136	0.85 (0.83, 0.87)	yes	TOTAL_BATCH_SIZE 4096 -> 2048
6aba357	2.382621	rerun	147	0.71 (0.82, 0.60)	yes	rerun of TOTAL_BATCH_SIZE 2048
05855da	2.425319	discard	256	0.94 (0.90, 0.97)	no	TOTAL_BATCH_SIZE 2048 -> 1024 with DEVICE_BATCH_SIZE 2
832ba81	2.400214	discard	142	0.91 (0.84, 0.98)	yes	EMBEDDING_LR 0.012 -> 0.024
09184d5	2.422853	discard	136	0.99 (0.98, 1.00)	no	MATRIX_LR 0.006 -> 0.012
e4ce863	2.336053	keep	200	0.77 (0.92, 0.62)	yes	D_MODEL 192 -> 128
cf79733	2.297099	keep	239	0.90 (0.90, 0.90)	yes	D_MODEL 128 -> 96
cf79733	2.303684	rerun	234	0.91 (0.94, 0.89)	yes	rerun of D_MODEL 96
e4ce863	2.358803	rerun	184	0.86 (0.76, 0.97)	yes	rerun of D_MODEL 128
6e7d673	2.296411	discard	287	0.75 (0.60, 0.91)	yes	D_MODEL 96 -> 64
6e7d673	2.272855	rerun	308	0.69 (0.78, 0.59)	yes	rerun of D_MODEL 64
2027e52	2.346680	discard	206	0.81 (0.62, 0.99)	yes	DEPTH 4 -> 6
29efd8c	2.337903	discard	203	0.97 (0.94, 1.00)	no	MLP_EXPAND 0 -> 2
059ed88	2.263796	keep	273	0.86 (0.90, 0.81)	yes	DEPTH 4 -> 3
059ed88	2.251551	rerun	285	0.83 (0.78, 0.88)	yes	rerun of best: drift check
f5035ba	2.210692	keep	311	0.73 (0.64, 0.81)	yes	DEPTH 3 -> 2
f5035ba	2.232501	rerun	288	0.92 (0.89, 0.95)	yes	rerun of DEPTH 2
821944f	2.271390	discard	270	0.78 (0.96, 0.60)	yes	WARMDOWN_RATIO 0.5 -> 0.8
5ec14aa	2.215520	discard	304	0.92 (0.89, 0.95)	yes	WARMDOWN_RATIO 0.5 -> 0.3
5ec14aa	2.232967	rerun	285	0.97 (0.98, 0.96)	no	rerun of WARMDOWN_RATIO 0.3
6075fa0	2.249021	discard	353	0.79 (0.63, 0.96)	yes	D_MODEL 96 -> 64 at DEPTH 2
3bc23da	2.442309	rerun	72	0.91 (0.96, 0.86)	yes	final interleaved rerun of baseline
f5035ba	2.243277	rerun	277	0.89 (0.92, 0.86)	yes	final interleaved rerun of best
3bc23da	2.444417	rerun	72	0.85 (0.88, 0.81)	yes	final interleaved rerun of baseline
f5035ba	2.235182	rerun	284	0.92 (0.94, 0.91)	no	final interleaved rerun of best
"""


def replay(night, speed_of):
    """[(night row, keep_rule's dict)] with each commit's status written as the rule decided it."""
    rows, decisions = [], []
    for commit, val_bpb, _, steps, speed, _, description in night:
        first = not any(row.commit == commit for row in rows)
        status = ("keep" if not rows else "discard") if first else "rerun"
        rows.append(prepare.Result(commit, float(val_bpb), 0.0, int(steps), speed_of(commit, int(steps), speed),
                                   status, description))
        decision = prepare.keep_rule(rows)
        if decision["verdict"] in ("keep", "discard"):
            rows = [row._replace(status=decision["verdict"]) if row.commit == commit and row.status != "rerun"
                    else row for row in rows]
        decisions.append(decision)
    return decisions


def main():
    text = open(sys.argv[1]).read() if len(sys.argv) > 1 else ISSUE_27_NIGHT
    night = [line.split("\t") for line in text.splitlines() if line.strip()]
    most_steps = {}
    for commit, _, _, steps, *_ in night:
        most_steps[commit] = max(most_steps.get(commit, 0), int(steps))
    variants = {
        "rule, logged machine_speed": lambda commit, steps, speed: float(speed.split()[0]),
        "rule, no speed column": lambda commit, steps, speed: None,
        "rule, speed = steps / the commit's most": lambda commit, steps, speed: steps / most_steps[commit],
    }
    results = {name: replay(night, speed_of) for name, speed_of in variants.items()}
    print("| row | commit | val_bpb | steps | agent | " + " | ".join(variants) + " |")
    print("|---|---|---|---|---|" + "---|" * len(variants))
    for i, (commit, val_bpb, status, steps, *_) in enumerate(night):
        cells = [f"{d['verdict']} ({d['noise']:.4f})" if d["noise"] else d["verdict"]
                 for d in (results[name][i] for name in variants)]
        print(f"| {i + 1} | {commit} | {val_bpb} | {steps} | {status} | " + " | ".join(cells) + " |")
    for name in variants:
        d = results[name][-1]
        slope = "none" if d["slope"] is None else f"{d['slope']:.3f}"
        print(f"\n{name}: noise {d['noise']:.4f} (unadjusted {d['raw_noise']:.4f}, slope {slope}), "
              f"best {d['best']} {d['best_mean']:.6f}")


if __name__ == "__main__":
    main()
