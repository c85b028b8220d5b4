"""One process of the data-parallel proofs in test_distributed.py, launched plainly (world size 1) or by the framework's
own launcher (`mlx.launch --backend ring -n 2`, `torchrun --nproc_per_node 2`). On the test cache and smoke preset it:

  1. reads its share of the first 12 batches of the training stream,
  2. scores a freshly initialised tiny model with prepare.evaluate_bpb (the same weights in every process),
  3. trains it for a few optimizer steps with the training script's own make_training_step, the global batch
     fixed: grad-accum steps = global micro-batches / world size,

and saves what it saw and got to OUT_DIR/rank{rank}.npz for the test to compare across world sizes.

    python tests/distributed_worker.py {mlx,torch} OUT_DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare  # noqa: E402  (first: loads the fast BLAS before MLX)
import numpy as np  # noqa: E402

GLOBAL_MICRO_BATCHES = 4  # per optimizer step, over all ranks
STEPS = 3
LOADER_BATCHES = 12  # of the global stream, for the disjointness check
ROWS, SEQ_LEN = 2, 32
EVAL_BATCH = 3  # 32 validation rows -> 11 batches: an uneven split over two ranks
MODEL = dict(depth=2, d_model=32, d_state=16, headdim=16, chunk_size=8)


def main(backend, out_dir):
    dist = prepare.distributed(backend)
    tokenizer = prepare.Tokenizer.from_directory()
    seen = [b[0] for _, b in zip(range(LOADER_BATCHES // dist.world_size), prepare.make_dataloader(
        tokenizer, ROWS, SEQ_LEN, "train", rank=dist.rank, world_size=dist.world_size))]
    loader = prepare.make_dataloader(tokenizer, ROWS, SEQ_LEN, "train", rank=dist.rank, world_size=dist.world_size)
    grad_accum = GLOBAL_MICRO_BATCHES // dist.world_size
    losses, weights, val_bpb = (train_mlx if backend == "mlx" else train_torch)(dist, tokenizer, loader, grad_accum)
    np.savez(os.path.join(out_dir, f"rank{dist.rank}.npz"), seen=np.stack(seen), losses=np.array(losses),
             val_bpb=np.array(val_bpb), **{"weights/" + k: v for k, v in weights.items()})


def train_mlx(dist, tokenizer, loader, grad_accum):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import train_mamba_3_mlx as T

    mx.random.seed(7)  # the same initial weights on every rank and in the single process
    model = T.MambaLM(T.ModelConfig(architecture="mamba-3", vocab_size=tokenizer.get_vocab_size(), **MODEL))
    val_bpb = prepare.evaluate_bpb(model, EVAL_BATCH, dist)
    step = T.make_training_step(model, T.Optimizer(model), grad_accum)
    losses = []
    for i in range(STEPS):
        loss, _ = step(loader, T.lr_multiplier(i / STEPS))
        losses.append(dist.agree(loss.item(), 0.0)[0])
    return losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}, val_bpb


def train_torch(dist, tokenizer, loader, grad_accum):
    import torch

    import train_mamba as tm

    torch.manual_seed(7)
    model = tm.MambaLM(tm.ModelConfig(architecture="mamba-3", vocab_size=tokenizer.get_vocab_size(), **MODEL))
    cpu = torch.device("cpu")
    val_bpb = prepare.evaluate_bpb(model, EVAL_BATCH, dist)
    step = tm.make_training_step(model, tm.Optimizer(model, cpu), grad_accum, cpu, compile_model=False,
                                 data_parallel=dist.world_size > 1)
    losses = []
    for i in range(STEPS):
        loss, _ = step(loader, tm.lr_multiplier(i / STEPS))
        losses.append(dist.agree(loss.item(), 0.0)[0])
    return losses, {k: p.detach().numpy() for k, p in model.named_parameters()}, val_bpb


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
