"""The budget check: the harness counts the training tokens its loaders hand out and the summary says whether they
match the tokens the timed steps trained on. Reading training data anywhere else breaks the match."""

import re
import subprocess
import sys

import pytest

import prepare
from conftest import SMOKE_SCRIPTS


def test_counts_batches_handed_over_not_prefetched(prepared_cache):
    tokenizer = prepare.Tokenizer.from_directory()
    prepare.tokens_served["train"] = 0
    loader = prepare.make_dataloader(tokenizer, 2, 32, "train", prefetch=4)
    batches = [next(loader) for _ in range(3)]  # the thread has packed more by now; they must not count
    assert prepare.tokens_served["train"] == 3 * 2 * 32
    assert prepare.budget_check(3 * 64) == "ok"
    assert prepare.budget_check(2 * 64) == (
        "FAIL: the loader served 192 training tokens, the steps trained on 128 (64 read outside the timed steps)")
    assert "(64 trained on but never served)" in prepare.budget_check(4 * 64)
    second = prepare.make_dataloader(tokenizer, 2, 32, "train")  # a second loader counts in the same total
    next(second)
    assert prepare.tokens_served["train"] == 4 * 64 and prepare.budget_check(4 * 64) == "ok"
    del batches


@pytest.mark.parametrize("script", ["train_mamba_3_mlx", "train_hybrid_moe_mlx"])
def test_run_that_reads_batches_before_its_loop_is_flagged(prepared_cache, script):
    """An agent's edit that reads training data before the clock starts (here: a second loader, 3 batches, as for
    unigram statistics) gets a budget_check that is not ok; the run itself finishes normally."""
    code = (
        f"import prepare, {script} as T\n"
        "loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(), T.DEVICE_BATCH_SIZE, prepare.MAX_SEQ_LEN,"
        " 'train')\n"
        "stats = [next(loader) for _ in range(3)]\n"
        "T.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=SMOKE_SCRIPTS, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check = re.search(r"^budget_check: (.*)$", done.stdout, flags=re.M).group(1)
    extra = 3 * prepare.PRESET[script]["DEVICE_BATCH_SIZE"] * prepare.MAX_SEQ_LEN
    assert check.startswith("FAIL:") and f"({extra:,} read outside the timed steps)" in check, check
