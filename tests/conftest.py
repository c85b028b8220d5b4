"""Test setup: a private cache, the tiny `smoke` preset and true float32 matmuls, set before anything imports the
harness or MLX; copies of the training scripts sized by the smoke preset (tests import and run those, never the
committed scripts, which a session-end check holds unchanged); a session fixture that prepares a small synthetic
corpus offline (tests never read ../shared or the network), and the check of a run's per-step log lines that every
training script's smoke run passes."""

import atexit
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CACHE = tempfile.mkdtemp(prefix="autoresearch-test-")
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
os.environ["AUTORESEARCH_CACHE_DIR"] = TEST_CACHE
os.environ["AUTORESEARCH_MLX_PRESET_FILE"] = os.path.join(ROOT, "presets", "smoke.json")
os.environ.pop("AUTORESEARCH_MLX_ARCHITECTURE", None)
# True float32 matmuls: MLX runs float32 matmuls as TF32 on CUDA (and Apple M5) GPUs unless this is 0, read once when
# the process first multiplies. The tests hold float32 scans to float32 references; child processes inherit it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
sys.path.insert(0, ROOT)

import prepare  # noqa: E402  (before mlx: loads the fast BLAS)
import prepare_mlx_mamba_3  # noqa: E402

SCRIPTS = ("train_mamba_3_mlx", "train_hybrid_moe_mlx", "train_mamba")
SMOKE = prepare.load_preset(os.path.join(ROOT, "presets", "smoke.json"))
SMOKE_SCRIPTS = os.path.join(TEST_CACHE, "scripts")  # the smoke-sized copies; `import train_mamba_3_mlx` finds these
os.environ["PYTHONPATH"] = os.pathsep.join([SMOKE_SCRIPTS, ROOT])  # children import the copies and prepare.py


def sized_script(script, directory=None, **constants):
    """The path of a copy of `script` (e.g. "train_mamba_3_mlx") in `directory` (default: a new folder), sized by the
    smoke preset and then `constants`: the setup's own writer (prepare.write_constants) on a copy."""
    directory = directory or tempfile.mkdtemp(dir=TEST_CACHE)
    path = shutil.copy(os.path.join(ROOT, script + ".py"), directory)
    prepare.write_constants(path, {**SMOKE[script], **constants})
    return path


os.makedirs(SMOKE_SCRIPTS)
for _script in SCRIPTS:
    sized_script(_script, SMOKE_SCRIPTS)
sys.path.insert(0, SMOKE_SCRIPTS)


def _committed_scripts():
    return {name: open(os.path.join(ROOT, name + ".py"), "rb").read() for name in SCRIPTS}


COMMITTED = _committed_scripts()


def pytest_sessionfinish(session, exitstatus):
    """A test that wrote into the repository's own training scripts fails the session (tests size copies only)."""
    touched = [name for name, text in _committed_scripts().items() if text != COMMITTED[name]]
    if touched:
        print(f"\nFAIL: the tests changed the committed scripts {touched}: size a copy (conftest.sized_script)")
        session.exitstatus = 1


def synthetic_documents(n_docs, seed):
    """Deterministic English-like documents: Zipf-distributed pseudo-words with punctuation, numbers, some
    non-ASCII text and newlines. Rich enough for an 8192-token BPE, small enough to train it in seconds."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters[: rng.randint(8, 26)]) for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    words += ["café", "naïve", "Straße", "数据", "—", "λx"]
    cumulative_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    docs = []
    for _ in range(n_docs):
        parts = []
        for word in rng.choices(words, cum_weights=cumulative_weights, k=rng.randint(20, 400)):
            roll = rng.random()
            if roll < 0.05:
                word = str(rng.randint(0, 99999))
            elif roll < 0.12:
                word += rng.choice([",", ".", ";", ":", "!", "?"])
            elif roll < 0.14:
                word += "\n"
            parts.append(word.capitalize() if rng.random() < 0.1 else word)
        docs.append(" ".join(parts))
    return docs


def write_parquet(path, texts, row_group_size=64):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def write_corpus(directory, n_train_files=2, docs_per_file=600, n_val_docs=150):
    os.makedirs(directory, exist_ok=True)
    for i in range(n_train_files):
        write_parquet(os.path.join(directory, f"part_{i}.parquet"), synthetic_documents(docs_per_file, seed=i))
    write_parquet(os.path.join(directory, "val.parquet"), synthetic_documents(n_val_docs, seed=1000))
    return directory


@pytest.fixture(scope="session")
def corpus_dir():
    return write_corpus(os.path.join(TEST_CACHE, "corpus"))


@pytest.fixture(scope="session")
def prepared_cache(corpus_dir):
    """The test cache, prepared offline from the synthetic corpus: shards, tokenizer, validation rows."""
    prepare_mlx_mamba_3.prepare_cache(data_dir=corpus_dir)
    return TEST_CACHE


@pytest.fixture(scope="session")
def smoke_run(prepared_cache):
    """smoke_run(architecture): a smoke-sized train_mamba_3_mlx.py's CompletedProcess, its stdout a pipe (so
    logged like run.log, one line per step). Run once per architecture per session: the script's smoke test and the
    notebook's curves test read the same runs. The timeout allows for the first run on a fresh machine, which also
    JIT-compiles MLX's fused CPU kernels."""
    runs = {}

    def run(architecture):
        if architecture not in runs:
            script = sized_script("train_mamba_3_mlx", ARCHITECTURE=architecture)
            runs[architecture] = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True,
                                                timeout=900)
        return runs[architecture]

    return run


# A training step's line in a run logged to a file (program.md, output format), e.g. `step 00012 ( 20.6%) | loss 5.1234
# | lrm 1.00 | 123 ms | 4,162 tok/s | epoch 1 | training_seconds 12.345 | tokens 6144 | 48s left` (the hybrid adds a
# balance field after the loss).
STEP_LINE = re.compile(r"^step (\d+) .*\| (\d+) ms \|.*\| training_seconds ([\d.]+) \| tokens (\d+) \|", re.M)


def check_step_log(stdout, summary):
    """A finished run's stdout (a pipe, as run.log) against its summary: one step line per step, numbered from 1, with
    the tokens so far; and the run stopped at the step end nearest to TIME_BUDGET by the scripts' rule: the last step
    started while its predicted middle (prepare.step_midpoint) was before the budget, the next one would not have.
    With steady step times that puts training_seconds within half a step of TIME_BUDGET. Returns the step lines."""
    lines = [(int(s), int(ms) / 1000, float(t), int(tokens)) for s, ms, t, tokens in STEP_LINE.findall(stdout)]
    num_steps = int(summary["num_steps"])
    assert num_steps >= 2  # the first step compiles; at least one is timed
    assert [step for step, *_ in lines] == list(range(1, num_steps + 1)), "not one line per step"
    assert [tokens for *_, tokens in lines] == [step * lines[0][3] for step, *_ in lines]
    assert abs(lines[-1][2] - float(summary["training_seconds"])) <= 0.006  # 3 decimals vs 2
    step_times = [ms for _, ms, _, _ in lines[1:]]  # the first step compiles and is not timed
    slack = 0.002  # the log rounds step times to a millisecond and training_seconds to three decimals
    before_last, last = lines[-2][2], lines[-1][2]
    assert prepare.step_midpoint(before_last, step_times[:-1]) < prepare.TIME_BUDGET + slack, "ran a step too many"
    assert prepare.step_midpoint(last, step_times) >= prepare.TIME_BUDGET - slack, "stopped a step too early"
    return lines
