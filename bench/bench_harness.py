"""
Throughput benchmark of the fixed harness (a script, not a test), on the prepared cache of the active preset:

  1. tokenizer: tiktoken encoding of training documents, characters/s and tokens/s;
  2. dataloader: packed training batches per second from `make_dataloader` (tokenize + best-fit pack, in its
     background thread), tokens/s, to compare with a training step's tokens/s (the loader must never be the
     bottleneck);
  3. evaluation: `evaluate_bpb` on a model whose work is almost nothing (uniform logits), so the figure is the
     harness's own cost per evaluated token (row loading, the loss, the host sums). A real model's eval time is its
     forward time plus this;
  4. evaluation against training: train_mamba_3_mlx.py's model as its constants say (setup sized them), the
     harness's scoring of validation rows (what evaluate_bpb runs) and the script's training step, interleaved for
     --rounds rounds:
     tokens/s of each and their ratio (the `cpu` preset's goal: evaluation >= 2.5x training);
  5. the holdout's cost: `evaluate_bpb` as runs call it (validation rows, then the sealed holdout) against the
     validation rows alone (evaluation before the holdout), interleaved for --rounds rounds, on train_mamba_3_mlx.py's
     model sized by the active preset (a sized copy, as setup would write it; random weights: the time is the same).
     Its records go to a temporary file, not the cache's holdout.tsv. `--holdout-only` runs only this part.

Run: `uv run bench/bench_harness.py [--batches 200] [--batch 8] [--rounds 3] [--holdout-only]`. Needs a prepared
cache (`uv run prepare_mlx_mamba_3.py`).
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402  (first: the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="dataloader batches to time")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of evaluation against training")
    parser.add_argument("--holdout-only", action="store_true", help="only the holdout's cost (part 5)")
    args = parser.parse_args()
    if args.holdout_only:
        return holdout_cost(args.rounds)
    tokenizer = prepare.Tokenizer.from_directory()
    seq_len = prepare.MAX_SEQ_LEN

    texts = []
    for batch, _ in prepare.iter_texts("train"):
        texts += batch
        if sum(map(len, texts)) > 20_000_000:
            break
    chars = sum(map(len, texts))
    start = time.perf_counter()
    ids = tokenizer.encode(texts)
    seconds = time.perf_counter() - start
    tokens = sum(map(len, ids))
    print(f"tokenizer encode: {len(texts):,} documents, {chars / seconds / 1e6:.1f}M chars/s, "
          f"{tokens / seconds / 1e6:.2f}M tokens/s ({chars / tokens:.2f} chars/token)")

    loader = prepare.make_dataloader(tokenizer, args.batch, seq_len, "train")
    next(loader)  # start-up: first shard open, first documents tokenized
    start = time.perf_counter()
    for _ in range(args.batches):
        inputs, targets, epoch = next(loader)
    seconds = time.perf_counter() - start
    print(f"dataloader: {args.batches} batches of {args.batch} x {seq_len}, "
          f"{args.batches * args.batch * seq_len / seconds / 1e6:.2f}M tokens/s (epoch {epoch})")

    vocab = tokenizer.get_vocab_size()
    uniform = lambda inputs: mx.zeros((*inputs.shape, vocab))  # noqa: E731
    prepare.load_val_rows()  # build the cached validation rows once, outside the timing
    start = time.perf_counter()
    bpb = prepare.evaluate_bpb(uniform, args.batch)
    seconds = time.perf_counter() - start
    print(f"evaluate_bpb harness cost: {prepare.EVAL_TOKENS:,} tokens in {seconds:.1f} s = "
          f"{prepare.EVAL_TOKENS / seconds / 1e3:.0f}K tokens/s (uniform logits, val_bpb {bpb:.4f})")

    evaluation_against_training(args.rounds)
    holdout_cost(args.rounds)


def evaluation_against_training(rounds, eval_batches=16):
    import numpy as np
    import train_mamba_3_mlx as T

    mx.random.seed(0)
    model = T.MambaLM(T.ModelConfig())
    mx.eval(model.parameters())
    accumulation = T.TOTAL_BATCH_SIZE // (T.DEVICE_BATCH_SIZE * prepare.MAX_SEQ_LEN)
    step = T.make_training_step(model, T.Optimizer(model), accumulation)
    rows = prepare.load_val_rows()
    blocks = [rows[i : i + T.DEVICE_BATCH_SIZE].astype(np.int32)
              for i in range(0, eval_batches * T.DEVICE_BATCH_SIZE, T.DEVICE_BATCH_SIZE)]
    train_batches = iter(lambda: (blocks[0][:, :-1], blocks[0][:, 1:], 1), None)
    score = prepare._mlx_token_losses(mx.compile(model, inputs=model.state))  # evaluate_bpb's per-batch scoring
    step(train_batches, 1.0)[0].item()  # compile both
    score(None, blocks[0][:, :-1], blocks[0][:, 1:])
    for r in range(rounds):
        start = time.perf_counter()
        step(train_batches, 1.0)[0].item()
        train_rate = T.TOTAL_BATCH_SIZE / (time.perf_counter() - start)
        start = time.perf_counter()
        for block in blocks:
            score(None, block[:, :-1], block[:, 1:])
        eval_rate = sum(b[:, 1:].size for b in blocks) / (time.perf_counter() - start)
        print(f"round {r + 1}: training {train_rate:,.0f} tok/s, evaluation {eval_rate:,.0f} tok/s "
              f"({eval_rate / train_rate:.2f}x), {T.ARCHITECTURE} depth {T.DEPTH} d_model {T.D_MODEL}, "
              f"preset {prepare.PRESET_NAME}")


def holdout_cost(rounds):
    import importlib.util
    import shutil
    import statistics
    import tempfile

    work = tempfile.mkdtemp()
    try:
        script = shutil.copy(os.path.join(ROOT, "train_mamba_3_mlx.py"), work)
        prepare.write_constants(script, prepare.PRESET["train_mamba_3_mlx"])
        spec = importlib.util.spec_from_file_location("sized_train_mamba_3_mlx", script)
        T = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(T)
        prepare.HOLDOUT_PATH = os.path.join(work, "holdout.tsv")  # the bench's records stay out of the cache's file
        mx.random.seed(0)
        model = T.MambaLM(T.ModelConfig())
        mx.eval(model.parameters())
        compiled = mx.compile(model, inputs=model.state)  # as the script passes it
        val, holdout = prepare.load_val_rows(), prepare.load_holdout_rows()
        batch = T.DEVICE_BATCH_SIZE

        def validation_only():  # evaluate_bpb before the holdout
            scoring = prepare._mlx_token_losses(compiled)
            return prepare._bits_per_byte(val, compiled, scoring, batch, prepare.SINGLE_PROCESS, prepare.ProgressLine())

        ways = {"validation only": validation_only, "with holdout": lambda: prepare.evaluate_bpb(compiled, batch)}
        times = {name: [] for name in ways}  # (wall, this process's CPU) seconds
        validation_only()  # warm-up: MLX's kernels, the page cache
        for r in range(rounds):
            for name, way in ways.items() if r % 2 == 0 else reversed(ways.items()):
                start, cpu = time.perf_counter(), time.process_time()
                way()
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
        records = prepare.read_holdout()
        assert len(records) == rounds and all(float(r["holdout_bpb"]) > 0 for r in records)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"holdout cost, preset {prepare.PRESET_NAME}, {T.ARCHITECTURE} depth {T.DEPTH} d_model {T.D_MODEL}, batch "
          f"{batch}: {len(val)} validation rows + {len(holdout)} holdout rows of {prepare.MAX_SEQ_LEN} tokens, "
          f"{rounds} interleaved rounds (load average {load:.1f})")
    for clock, k in (("wall", 0), ("CPU", 1)):  # CPU: this process's, less moved by a neighbour's load than wall
        for name, seconds in times.items():
            seconds = [s[k] for s in seconds]
            print(f"  {clock} {name}: {', '.join(f'{s:.2f}' for s in seconds)} s (median "
                  f"{statistics.median(seconds):.2f})")
        ratios = [w[k] / v[k] for w, v in zip(times["with holdout"], times["validation only"])]
        each = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"  {clock} with / without: median {statistics.median(ratios):.3f}x (per round {each}; rows scored "
              f"{(len(val) + len(holdout)) / len(val):.3f}x)")


if __name__ == "__main__":
    main()
