"""Test setup: a private cache, the tiny `smoke` preset and true float32 matmuls, set before anything imports the
harness or MLX, plus a session fixture that prepares a small synthetic corpus offline (tests never read ../shared or
the network)."""

import atexit
import itertools
import os
import random
import shutil
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
    prepare.prepare(data_dir=corpus_dir)
    return TEST_CACHE
