"""
The fixed harness of autoresearch-mamba: the training scripts import it, the agent never edits it and reads it
down to END OF THE CONTRACT. Import it before mlx: on Linux it first loads an optimized BLAS.

Setup: `uv run prepare_mlx_mamba_3.py` (data, tokenizer, the preset's sizes written into the training scripts),
then `uv run prepare_mlx_mamba_3.py --calibrate` on a quiet machine: it records the matmul peak `mfu_percent` uses
and the first machine-speed reference, and refuses on a busy machine unless `--force`.

What a training script calls:
    harness_line()                     the preset and the constants in force, printed first
    run(main)                          a user's mistake ends in one line, Ctrl-C in `Interrupted.`
    distributed("mlx" | "torch")       rank, world_size, agree(loss, step_time); a plain run is rank 0 of 1
    check_hyperparameters(section, [(NAME, ok, message), ...]), positive(...), one_of(...): one-line errors first
    Tokenizer.from_directory()         the BPE tokenizer (VOCAB_SIZE tokens, BOS before every document)
    make_dataloader(tokenizer, B, T, "train", rank, world_size)  endless packed (inputs, targets, epoch), int32 [B, T]
    probe_machine_speed(dist)          before the loop: step_midpoint then probes the machine between steps
    step_midpoint(training_time, step_times)   a step runs while this is before TIME_BUDGET; the schedule reads it
    warn_if_evaluation_is_long(step_times, tokens_per_step), check_loss(loss, step), ProgressLine(interval)
    evaluate_bpb(model, B, dist)       val_bpb on EVAL_TOKENS fixed validation tokens, scored by the harness; then
                                       the sealed holdout, recorded in the cache's holdout/ for the human only
    peak_flops(device, dtype)          (FLOP/s, source) for MFU: datasheet, else the calibrated matmul rate
    print_summary(fields, trained_tokens, dist)  the summary, then world_size, machine_speed, budget_check, harness

The rules, each visible in the summary:
    - training_seconds counts every step but the first (compilation) and ends within half a step of TIME_BUDGET.
    - budget_check: ok only when the loaders served exactly the tokens the timed steps trained on.
    - harness: a fingerprint of this file, prepare_mlx_mamba_3.py, the preset, the tokenizer, the validation and
      holdout rows and the number of processes: only runs with the same fingerprint are comparable.
    - machine_speed: a fixed probe every few seconds between training steps (outside the budget), its mean speed
      against this machine's reference (1.00 = as fast; runs never move it); below 0.90 a `warning:` line.
The cache (~/.cache/autoresearch/ or $AUTORESEARCH_CACHE_DIR): data/, tokenizer/, eval/, calibration.json,
machine_speed.json, holdout/ (the sealed holdout's rows and records: not the agent's to read).
"""

import ast
import collections
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import sys
import time

# ---------------------------------------------------------------------------------------------------------------------
# Fixed constants. A preset's `prepare` section may override the first four (smaller machines, tests).

MAX_SEQ_LEN = 2048  # context length of training rows and evaluation rows
TIME_BUDGET = 300  # seconds of training per experiment (start-up, compilation and evaluation not counted)
EVAL_TOKENS = 40 * 524288  # target tokens scored by evaluate_bpb
NUM_SHARDS = 10  # training shards prepare downloads by default
VOCAB_SIZE = 8192  # BPE vocabulary, special tokens included
SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = SPECIAL_TOKENS[0]  # prepended to every document

# GPT-4 style pre-tokenization, but digits group in runs of at most 2 (small vocabulary).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TOKENIZER_TRAIN_CHARS = 1_000_000_000  # ~1B characters of training documents, or all there are
TOKENIZER_DOC_CHARS = 10_000  # each document's cap, in characters, for tokenizer training

DATASET_REPO = "karpathy/climbmix-400b-shuffle"  # Hugging Face dataset with shard_00000 ... shard_06542
MAX_SHARD = 6542
VAL_SHARD = MAX_SHARD  # pinned validation shard, never trained on
SHARD_NAME = "shard_{:05d}.parquet"

CACHE_DIR = os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE_DIR", "~/.cache/autoresearch"))
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
EVAL_DIR = os.path.join(CACHE_DIR, "eval")
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
PREPARE_COMMAND = "uv run prepare_mlx_mamba_3.py"

# =====================================================================================================================
# END OF THE CONTRACT. The machinery below implements it; an agent need not read further.
# =====================================================================================================================

# =====================================================================================================================
# THE CORE, in the order a run uses it: import, run(main), checks, ranks, data, loader, loop, evaluation, summary.
# =====================================================================================================================

# ---------------------------------------------------------------------------------------------------------------------
# Fast BLAS, at import. The Linux mlx-cpu wheel links a reference BLAS (3-5 GFLOP/s for fp32 matmul on 2 cores). MKL's
# runtime from the venv (the mlx-cpu group's `mkl` wheel), loaded with RTLD_GLOBAL before MLX is imported, takes over
# MLX's cblas_sgemm: the same contract, ~100 GFLOP/s here. Off on macOS (Accelerate, Metal), once MLX is imported, and
# with AUTORESEARCH_FAST_BLAS=0 (which also leaves malloc alone).
_TUNE = sys.platform == "linux" and os.environ.get("AUTORESEARCH_FAST_BLAS", "1") != "0"


def _load_fast_blas():
    if not _TUNE or "mlx.core" in sys.modules:
        return None
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


FAST_BLAS = _load_fast_blas()  # the library's path, or None (MLX's bundled BLAS)


def _keep_large_buffers_in_heap():
    """glibc serves mallocs (MLX's CPU arrays) of 32 MB and more with a fresh mmap, unmapped on free, so each step
    page-faulted its big activations in again (element-wise ops ~6 ns per element instead of 0.5-1). 1 GB mmap and
    trim thresholds keep them in the heap (a batched matmul: 77 -> 23 ms). Speed only, never results."""
    if not _TUNE:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False


HEAP_TUNED = _keep_large_buffers_in_heap()

import numpy as np  # noqa: E402  (after the BLAS: numpy must not pull MLX in first)
import pyarrow.parquet as pq  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Errors: what the user must fix is one line naming the fix.


class HarnessError(SystemExit):
    """A problem the user must fix (missing data, bad preset, corrupt shard). A SystemExit, so an uncaught one prints
    just the message and exits with status 1, without a traceback."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


REPAIR_HINT = f"Rerun `{PREPARE_COMMAND}` (with --data-dir DIR if you prepared offline): it rebuilds damaged files"
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT}  # a disk the user must fix


def run(main):
    """`prepare.run(main)` in a script's __main__: Ctrl-C prints `Interrupted.` (status 130; cache files are written
    whole: _write_atomic), a read-only, full or forbidden disk is a one-line error; a bug keeps its traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nInterrupted." if sys.stdout.isatty() else "Interrupted.", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise HarnessError(
            f"Cannot write {e.filename or CACHE_DIR}: {e.strerror}. Free space or make that disk writable (or set "
            f"AUTORESEARCH_CACHE_DIR to a writable folder), then rerun."
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Presets, at import: one JSON file per device class in presets/, one section per script, named by
# AUTORESEARCH_MLX_PRESET_FILE (a path, or a bare name such as `cpu`), else chosen by the device the training script
# will run on. `default` is the canonical H100-sized configuration.

PRESET_SECTIONS = ("prepare", "train_mamba_3_mlx", "train_hybrid_moe_mlx", "train_mamba")
PREPARE_KEYS = {"MAX_SEQ_LEN": int, "TIME_BUDGET": (int, float), "EVAL_TOKENS": int, "NUM_SHARDS": int}
MAC_MIN_WORKING_SET_GB = 8  # the mac preset's runs peak at 3.7-4.5 GB (MIMO: 11.5 GB), measured on the CPU


def device_preset():
    """(preset name, why). Asks the framework the script uses (MLX; torch for the mirror, which sets
    AUTORESEARCH_BACKEND=torch): an NVIDIA driver beside a CPU-only MLX is a CPU."""
    if os.environ.get("AUTORESEARCH_BACKEND") == "torch":
        import torch

        return ("default", "torch on CUDA") if torch.cuda.is_available() else ("cpu", "torch on the CPU")
    import mlx.core as mx

    if mx.metal.is_available():
        info = mx.device_info()
        working_set = info.get("max_recommended_working_set_size", 2 / 3 * info.get("memory_size", 0)) / 1e9
        if working_set >= MAC_MIN_WORKING_SET_GB:
            return "mac", f"Apple GPU, {working_set:.1f} GB working set"
        return "local", f"Apple GPU, {working_set:.1f} GB working set < {MAC_MIN_WORKING_SET_GB} GB"
    if mx.cuda.is_available():
        return "default", "MLX on CUDA"
    return "cpu", "MLX on the CPU"


def _resolve_preset_path():
    requested = os.environ.get("AUTORESEARCH_MLX_PRESET_FILE", "").strip()
    if not requested:
        name, why = device_preset()
        return os.path.join(PRESETS_DIR, name + ".json"), f"by device: {why}"
    if os.path.isfile(requested):
        return requested, "AUTORESEARCH_MLX_PRESET_FILE"
    named = os.path.join(PRESETS_DIR, requested + ".json")
    if os.sep not in requested and not requested.endswith(".json") and os.path.isfile(named):
        return named, "AUTORESEARCH_MLX_PRESET_FILE"
    known = sorted(os.path.splitext(f)[0] for f in os.listdir(PRESETS_DIR) if f.endswith(".json"))
    raise HarnessError(
        f"Preset file not found: AUTORESEARCH_MLX_PRESET_FILE={requested!r}. "
        f"Give a path to a JSON preset or one of the built-in names: {', '.join(known)}."
    )


def load_preset(path):
    """{section: {KEY: value}}, every section present."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise HarnessError(f"Cannot read preset file {path}: {e.strerror}. Check the path.") from None
    except json.JSONDecodeError as e:
        raise HarnessError(f"Preset file {path} is not valid JSON (line {e.lineno}: {e.msg}). Fix the file.") from None
    if not isinstance(data, dict):
        raise HarnessError(f"Preset file {path} must hold a JSON object with sections {', '.join(PRESET_SECTIONS)}.")
    unknown = [k for k in data if k not in PRESET_SECTIONS and k != "description"]
    if unknown:
        raise HarnessError(
            f"Preset file {path}: unknown section {unknown[0]!r}. "
            f"Valid sections: description, {', '.join(PRESET_SECTIONS)}."
        )
    sections = {}
    for name in PRESET_SECTIONS:
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise HarnessError(f"Preset file {path}: section {name!r} must be a JSON object of KEY: value pairs.")
        sections[name] = section
    for key, value in sections["prepare"].items():
        if key not in PREPARE_KEYS:
            raise HarnessError(
                f"Preset file {path}: unknown key {key!r} in section 'prepare'. "
                f"Valid keys: {', '.join(PREPARE_KEYS)}."
            )
        if isinstance(value, bool) or not isinstance(value, PREPARE_KEYS[key]) or value <= 0:
            raise HarnessError(f"Preset file {path}: prepare.{key} must be a positive number, got {value!r}.")
    return sections


PRESET_FILE, PRESET_ORIGIN = _resolve_preset_path()
PRESET_NAME = os.path.splitext(os.path.basename(PRESET_FILE))[0]
PRESET = load_preset(PRESET_FILE)
globals().update(PRESET["prepare"])  # the preset's overrides of MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, NUM_SHARDS
if EVAL_TOKENS % MAX_SEQ_LEN:
    raise HarnessError(
        f"Preset {PRESET_FILE}: EVAL_TOKENS ({EVAL_TOKENS}) must be a multiple of MAX_SEQ_LEN ({MAX_SEQ_LEN})."
    )


def harness_line():
    blas = (os.path.basename(FAST_BLAS) if FAST_BLAS else "bundled") + (", malloc heap-tuned" if HEAP_TUNED else "")
    return (
        f"preset: {PRESET_NAME} ({PRESET_FILE}, chosen {PRESET_ORIGIN}) | MAX_SEQ_LEN={MAX_SEQ_LEN} "
        f"TIME_BUDGET={TIME_BUDGET} EVAL_TOKENS={EVAL_TOKENS} VOCAB_SIZE={VOCAB_SIZE} | blas: {blas}"
    )


def check_hyperparameters(section, checks):
    """Before anything is built. `checks`: (KEY, ok, requirement); the first failing one is a HarnessError."""
    for key, ok, requirement in checks:
        if not ok:
            raise HarnessError(f"{section}.{key} {requirement} (set in the script). Fix the value and rerun.")


def positive(namespace, *names):
    return [(name, isinstance(namespace[name], (int, float)) and not isinstance(namespace[name], bool)
             and namespace[name] > 0, f"must be a positive number, got {namespace[name]!r}") for name in names]


def one_of(namespace, name, choices):
    return name, namespace[name] in choices, f"must be one of {', '.join(map(repr, choices))}, got {namespace[name]!r}"


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism, started by `mlx.launch` (ring, JACCL, MPI or NCCL) or `torchrun` (NCCL, or gloo on CPUs): each rank
# trains on its share of every step's batch, and the ranks keep in lockstep: one clock, one stop decision, one
# evaluation, one summary. A plain run is rank 0 of 1 and never communicates.


def _launcher_rank():
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):  # mlx.launch (ring, JACCL, NCCL), mpirun
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if os.environ.get("RANK", "").isdigit() and "LOCAL_RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"])
    return 0


def _quiet_unless_rank_zero(rank):
    """Only rank 0 prints, so a launched run writes one log; errors still reach stderr from every rank."""
    if rank > 0 and sys.stdout is not None:
        sys.stdout = open(os.devnull, "w")


_quiet_unless_rank_zero(_launcher_rank())  # at import: before the script prints its first line


class Distributed:
    """`local_rank`: the GPU a torch rank uses (0 under MLX, whose launcher pins each rank's GPU); `group`: MLX's
    communication group, or None; `gather`: the one collective the harness needs."""

    def __init__(self, rank=0, world_size=1, local_rank=0, group=None, all_gather=None):
        self.rank, self.world_size, self.local_rank, self.group = rank, world_size, local_rank, group
        self._all_gather = all_gather

    def gather(self, values):
        """Every rank's float64 `values` as [world_size, n] on every rank. Exact: the collective moves bits and adds
        nothing, so the caller decides the order of any sum."""
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if self.world_size == 1:
            return values[None]
        return np.asarray(self._all_gather(values), dtype=np.float64).reshape(self.world_size, values.size)

    def agree(self, loss, step_time):
        """(mean loss, rank 0's step time) on every rank: one schedule, one fast fail, one last step."""
        if self.world_size == 1:
            return loss, step_time
        both = self.gather([loss, step_time])
        return float(both[:, 0].sum() / self.world_size), float(both[0, 1])


def distributed(backend="mlx"):
    """Join the data-parallel run this process was launched into (as mlx.launch or torchrun set it up); in a plain
    run, Distributed() at no cost."""
    if backend == "mlx":
        import mlx.core as mx

        group = mx.distributed.init()  # a group of one when not launched
        if group.size() == 1:
            return Distributed()

        def all_gather(values):  # float64 travels as pairs of uint32: every backend moves those (Metal has no float64)
            gathered = mx.distributed.all_gather(mx.array(values.view(np.uint32)), group=group)
            return np.array(gathered).view(np.float64)

        dist = Distributed(group.rank(), group.size(), 0, group, all_gather)
    elif backend == "torch":
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return Distributed()
        import atexit

        import torch
        import torch.distributed as td

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")

        def close():  # all ranks reach the end before any group goes: an early teardown can abort a peer's gloo
            td.barrier()
            td.destroy_process_group()

        atexit.register(close)

        def all_gather(values):
            local = torch.from_numpy(values).to(device)
            parts = [torch.empty_like(local) for _ in range(td.get_world_size())]
            td.all_gather(parts, local)
            return torch.cat(parts).cpu().numpy()

        dist = Distributed(td.get_rank(), td.get_world_size(), local_rank, None, all_gather)
    else:
        raise ValueError(f"backend must be 'mlx' or 'torch', got {backend!r}")
    _quiet_unless_rank_zero(dist.rank)
    return dist


SINGLE_PROCESS = Distributed()


# ---------------------------------------------------------------------------------------------------------------------
# The cache check and the data: Tokenizer.from_directory() checks all a run needs before any training time is spent.


class Tokenizer:
    """A tiktoken Encoding with our special tokens (BPE trained with rustbpe by prepare_mlx_mamba_3.py)."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory=None):
        if directory is None:
            return check_cache()
        return cls.load(directory)

    @classmethod
    def load(cls, directory=None):
        path = os.path.join(directory or TOKENIZER_DIR, "tokenizer.pkl")
        if not os.path.exists(path):
            raise HarnessError(
                f"No tokenizer at {path}. Run `{PREPARE_COMMAND}` first "
                f"(or `{PREPARE_COMMAND} --data-dir DIR` offline)."
            )
        try:
            with open(path, "rb") as f:
                tokenizer = cls(pickle.load(f))
        except Exception as e:  # truncated or foreign pickle: anything but a tiktoken Encoding with our specials
            raise HarnessError(f"Damaged tokenizer {path} ({_first_line(e)}). {REPAIR_HINT}.") from None
        if tokenizer.get_vocab_size() != VOCAB_SIZE:
            raise HarnessError(
                f"Tokenizer {path} has {tokenizer.get_vocab_size()} tokens, not VOCAB_SIZE={VOCAB_SIZE}. {REPAIR_HINT}."
            )
        return tokenizer

    def get_vocab_size(self):
        return self.encoding.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Ids of a string, or a list of id lists for a list of strings; `prepend`: a token (id or string) first."""
        if isinstance(prepend, str):
            prepend = self.encoding.encode_single_token(prepend)
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.encoding.encode_ordinary(text)
        return [head + ids for ids in self.encoding.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.encoding.decode(list(ids))


def check_cache():
    """Well under a second. The validation and holdout rows are built here if missing or damaged: the build reads the
    validation shard, so its damage shows here too."""
    tokenizer = Tokenizer.load()
    get_token_bytes()
    for path in list_shards("train") + list_shards("val"):
        check_parquet(path)  # the footer only: milliseconds per shard
    load_val_rows(tokenizer)
    load_holdout_rows(tokenizer)
    return tokenizer


def get_token_bytes():
    """int [VOCAB_SIZE]: UTF-8 byte length of each token id, 0 for special tokens."""
    path = os.path.join(TOKENIZER_DIR, "token_bytes.npy")
    if not os.path.exists(path):
        raise HarnessError(f"No token byte table at {path}. Run `{PREPARE_COMMAND}` first.")
    try:
        table = np.load(path)
    except Exception as e:  # truncated: numpy cannot reshape what is left
        raise HarnessError(f"Damaged token byte table {path} ({_first_line(e)}). {REPAIR_HINT}.") from None
    if table.shape != (VOCAB_SIZE,) or table.dtype.kind not in "iu":
        raise HarnessError(
            f"Damaged token byte table {path} ({table.dtype} {table.shape}, expected int [{VOCAB_SIZE}]). "
            f"{REPAIR_HINT}."
        )
    return table


def shard_path(index):
    return os.path.join(DATA_DIR, SHARD_NAME.format(index))


def list_shards(split):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if split == "val":
        paths = [shard_path(VAL_SHARD)] if os.path.exists(shard_path(VAL_SHARD)) else []
    else:
        paths = [p for p in sorted(glob.glob(os.path.join(DATA_DIR, "shard_*.parquet"))) if p != shard_path(VAL_SHARD)]
    if not paths:
        raise HarnessError(
            f"No {split} data in {DATA_DIR}. Run `{PREPARE_COMMAND}` first "
            f"(or `{PREPARE_COMMAND} --data-dir DIR` to prepare offline from a folder of parquet files)."
        )
    return paths


def check_parquet(path, fix=None):
    """A readable parquet file with a string `text` column, from its footer only (milliseconds)."""
    import pyarrow as pa

    fix = fix or f"Delete this cached copy and rerun `{PREPARE_COMMAND}` (with --data-dir DIR if you prepared offline)."
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:
        raise HarnessError(f"Corrupt or unreadable parquet file {path} ({_first_line(e)}). {fix}") from None
    if "text" not in schema.names:
        raise HarnessError(f"Parquet file {path} has no 'text' column (columns: {', '.join(schema.names)}).")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise HarnessError(f"Parquet file {path}: column 'text' holds {text_type}, not strings. {fix}")


def iter_texts(split, batch_size=128):
    """(texts, epoch) forever, epoch from 1, one parquet row group at a time, in a fixed order."""
    paths = list_shards(split)
    epoch = 1
    while True:
        for path in paths:
            try:
                parquet = pq.ParquetFile(path)
                for group in range(parquet.num_row_groups):
                    texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
                    for start in range(0, len(texts), batch_size):
                        yield texts[start : start + batch_size], epoch
            except HarnessError:
                raise
            except Exception as e:
                raise HarnessError(
                    f"Corrupt shard {path} ({_first_line(e)}). Delete this cached copy and rerun `{PREPARE_COMMAND}` "
                    f"(offline: `{PREPARE_COMMAND} --data-dir DIR` with the folder you prepared from)."
                ) from None
        epoch += 1


# ---------------------------------------------------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing.


class BestFitPacker:
    """Rows of exactly `row_len` tokens, no padding: each row takes the longest buffered document that fits the space
    left; when none fits, the shortest is split, its tail back to the buffer. No token dropped or invented."""

    def __init__(self, row_len, buffer_size=1000):
        self.row_len = row_len
        self.buffer_size = buffer_size
        self.lengths = []  # sorted lengths of the buffered pieces
        self.pieces = []  # numpy int32 arrays, in the same order as `lengths`

    def add(self, piece):
        import bisect

        at = bisect.bisect_right(self.lengths, len(piece))
        self.lengths.insert(at, len(piece))
        self.pieces.insert(at, piece)

    def needs_documents(self):
        return len(self.pieces) < self.buffer_size

    def buffered_tokens(self):
        return sum(self.lengths)

    def next_row(self):
        import bisect

        if self.buffered_tokens() < self.row_len:
            return None
        row = np.empty(self.row_len, dtype=np.int32)
        filled = 0
        while filled < self.row_len:
            space = self.row_len - filled
            at = bisect.bisect_right(self.lengths, space) - 1  # longest piece that fits
            if at >= 0:
                self.lengths.pop(at)
                piece = self.pieces.pop(at)
            else:  # nothing fits: split the shortest piece
                self.lengths.pop(0)
                whole = self.pieces.pop(0)
                piece, tail = whole[:space], whole[space:]
                self.add(tail)
            row[filled : filled + len(piece)] = piece
            filled += len(piece)
        return row


def _packed_rows(tokenizer, row_len, split, buffer_size=1000):
    """(row, epoch) forever. The buffer is not refilled across an epoch boundary unless a row needs the tokens, so a
    small split is not read several times over before its first row."""
    bos = tokenizer.get_bos_token_id()
    packer = BestFitPacker(row_len, buffer_size)
    texts = iter_texts(split)
    upcoming = next(texts)  # one batch of lookahead tells where the epoch ends
    epoch = upcoming[1]
    while True:
        while packer.buffered_tokens() < row_len or (packer.needs_documents() and upcoming[1] == epoch):
            batch, epoch = upcoming
            for ids in tokenizer.encode(batch, prepend=bos):
                packer.add(np.asarray(ids, dtype=np.int32))
            upcoming = next(texts)
        yield packer.next_row(), epoch


# Input tokens the loaders of this process have handed over, per split (budget_check).
tokens_served = {"train": 0, "val": 0}


def make_dataloader(tokenizer, batch_size, seq_len, split, prefetch=4, rank=0, world_size=1):
    """A thread packs a few batches ahead (tiktoken releases the GIL). Rank r keeps batches r, r + world_size, ... of
    the one stream. Closing (or dropping) the iterator joins the thread: none is left in the tokenizer or the parquet
    reader at teardown."""
    import itertools
    import queue
    import threading

    if not 0 <= rank < world_size:
        raise ValueError(f"make_dataloader: rank {rank} is not in 0 .. world_size - 1 = {world_size - 1}")
    list_shards(split)  # fail fast, in the caller's thread, when data is missing
    batches, stop = queue.Queue(maxsize=prefetch), threading.Event()

    def produce():
        try:
            rows = _packed_rows(tokenizer, seq_len + 1, split)
            for index in itertools.count():
                if stop.is_set():
                    return
                block, epoch = zip(*(next(rows) for _ in range(batch_size)))
                if index % world_size != rank:
                    continue  # another rank's batch
                block = np.stack(block)
                batches.put((np.ascontiguousarray(block[:, :-1]), np.ascontiguousarray(block[:, 1:]), epoch[-1]))
        except BaseException as e:  # hand the error to the consumer
            batches.put(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    _LOADER_QUEUES.append(batches)
    try:
        while True:
            item = batches.get()
            if isinstance(item, BaseException):
                raise item
            tokens_served[split] += item[0].size
            yield item
    finally:  # closed or dropped: stop the producer (emptying the queue unblocks its put), give it 10 s to finish
        _LOADER_QUEUES.remove(batches)
        stop.set()
        deadline = time.time() + 10
        while producer.is_alive() and time.time() < deadline:
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.01)


# ---------------------------------------------------------------------------------------------------------------------
# The training loop's helpers.

PROBE_EVERY = 3.0  # wall-clock seconds between machine-speed probes while training (a probe: ~1% of that on a CPU)
SPEED_PROBES = []  # seconds of each probe this run took between its training steps (see machine_speed)
_probe = {"run": None, "next": 0.0}
_LOADER_QUEUES = []  # a probe waits for these to be full: it times the machine, not the run's own loader thread


def probe_machine_speed(dist=SINGLE_PROCESS):
    """Before the loop: arms the probes that step_midpoint runs between steps, every PROBE_EVERY seconds, outside the
    budget clock. Not in a data-parallel run, whose ranks would time each other."""
    if dist.world_size == 1:
        _probe["run"], _probe["next"] = probe_call(_backend()), 0.0


def step_midpoint(training_time, step_times, window=5):
    """Where the next step's middle will fall on the training clock. Running a step only while this is before
    TIME_BUDGET ends a run at the step end nearest to the budget. Between timed steps, the machine-speed probe."""
    now = time.monotonic()
    if _probe["run"] and step_times and now >= _probe["next"]:
        if all(q.full() for q in _LOADER_QUEUES) or now >= _probe["next"] + PROBE_EVERY:  # a loader that cannot rest
            SPEED_PROBES.append(_probe["run"]())
            _probe["next"] = time.monotonic() + PROBE_EVERY
    return training_time + (float(np.median(step_times[-window:])) / 2 if step_times else 0.0)


def check_loss(loss, step):
    """Fast fail. `step` is 0-based; the message counts from 1, like the progress line."""
    if not math.isfinite(loss) or loss > 100:
        print(f"\nFAIL: training diverged at step {step + 1} (loss {loss}). No val_bpb for this run. Lower the "
              f"learning rate, lengthen warmup, or revert the last change.", flush=True)
        sys.exit(1)


class ProgressLine:
    """Rewritten in place on a terminal (cut to its width: a wrapped line cannot be rewritten); into a file
    (run.log), a line at most every `interval` seconds."""

    def __init__(self, interval=5.0):
        self.tty = sys.stdout.isatty()
        self.interval = interval
        self.last_print = -math.inf
        self.width = 0

    def update(self, text, force=False):
        now = time.monotonic()
        if self.tty:
            text = text[: shutil.get_terminal_size().columns - 1]
            print("\r" + text.ljust(self.width), end="", flush=True)
            self.width = len(text)
        elif force or now - self.last_print >= self.interval:
            print(text, flush=True)
            self.last_print = now

    def close(self):
        if self.tty and self.width:
            print(flush=True)
        self.width = 0


def warn_if_evaluation_is_long(step_times, tokens_per_step, forward_speedup=2.5):
    """After the second timed step. A forward pass runs at least `forward_speedup` times the training step's tokens/s
    (measured 2.5x on the CPU, ~3x by FLOPs)."""
    if len(step_times) != 2:
        return
    tokens = EVAL_TOKENS + HOLDOUT_ROWS * MAX_SEQ_LEN
    seconds = tokens / (forward_speedup * tokens_per_step / float(np.median(step_times)))
    if seconds > TIME_BUDGET / 4:
        chain = ["default", "mac", "local", "cpu"]  # largest first
        smaller = chain[chain.index(PRESET_NAME) + 1 :] if PRESET_NAME in chain else []
        choice = device_preset()[0]
        advice = (f"a smaller preset fits it better (AUTORESEARCH_MLX_PRESET_FILE="
                  f"{choice if choice in smaller else smaller[0]})" if smaller else
                  "no shipped preset is smaller: lower EVAL_TOKENS or the model in a copy of the preset")
        print(f"\nwarning: evaluation will take about {seconds:.0f}s ({tokens:,} tokens with the holdout), more than "
              f"a quarter of TIME_BUDGET={TIME_BUDGET}s on this machine: {advice}; `{CALIBRATE_COMMAND}` measures "
              f"each architecture", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: bits per byte on exactly EVAL_TOKENS tokens of the pinned validation shard; then the sealed holdout,
# documents of the same shard that the validation rows do not touch, scored the same way and recorded only in
# HOLDOUT_PATH (beside the commit and val_bpb): no run prints it, so none can be tuned to it.

HOLDOUT_ROWS = max(1, EVAL_TOKENS // MAX_SEQ_LEN // 4)  # a quarter of the validation rows: evaluation takes 1.25x
HOLDOUT_DIR = os.path.join(CACHE_DIR, "holdout")  # the rows and the records, apart from eval/: not the agent's
HOLDOUT_PATH = os.path.join(HOLDOUT_DIR, "holdout.tsv")
HOLDOUT_COLUMNS = ("timestamp", "commit", "tree", "val_bpb", "holdout_bpb", "harness")


def val_rows_path(kind="val"):
    """Named by what determines the rows, so they never describe another validation shard than the cache's. kind:
    "val" or "holdout" (which depends on the validation rows, so on everything they depend on)."""
    tokenizer_id = _file_digest(os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), 8)
    val_name = SHARD_NAME.format(VAL_SHARD)
    val_id = shard_digest(val_name)[:8] if os.path.exists(os.path.join(DATA_DIR, val_name)) else "noval"
    code_id = _file_digest(os.path.abspath(__file__), 6)
    held = f"_H{HOLDOUT_ROWS * MAX_SEQ_LEN}" if kind == "holdout" else ""
    name = f"{kind}_{tokenizer_id}_{val_id}_{code_id}_T{MAX_SEQ_LEN}_N{EVAL_TOKENS}{held}.npy"
    return os.path.join(EVAL_DIR if kind == "val" else HOLDOUT_DIR, name)


def _val_rows_problem(path, n_rows=None):
    """None for a good file of `n_rows` rows (default: the validation rows'; a tuple: any of those counts)."""
    if not os.path.exists(path):
        return "missing"
    try:
        rows = np.load(path)
    except Exception as e:
        return _first_line(e)
    counts = n_rows if isinstance(n_rows, tuple) else (n_rows or EVAL_TOKENS // MAX_SEQ_LEN,)
    if rows.ndim != 2 or rows.shape[0] not in counts or rows.shape[1] != MAX_SEQ_LEN + 1 or rows.dtype != np.uint16:
        return f"{rows.dtype} {rows.shape}"
    if rows.max(initial=0) >= VOCAB_SIZE:
        return "token ids out of range"
    return None


def load_val_rows(tokenizer=None):
    """uint16 [EVAL_TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN + 1], packed from the start of the validation shard (cycling if
    it is shorter). Cached, so evaluation time is model time; a damaged file is rebuilt."""
    path = val_rows_path()
    problem = _val_rows_problem(path)
    if problem:
        if problem != "missing":
            print(f"eval: the cached rows {path} are damaged ({problem}); rebuilding them", flush=True)
        tokenizer = tokenizer or Tokenizer.load()
        n_rows = EVAL_TOKENS // MAX_SEQ_LEN
        stream = _packed_rows(tokenizer, MAX_SEQ_LEN + 1, "val")
        rows = np.stack([next(stream)[0] for _ in range(n_rows)]).astype(np.uint16)
        _write_atomic(path, lambda f: np.save(f, rows))
    return np.load(path)


def load_holdout_rows(tokenizer=None):
    """uint16 [HOLDOUT_ROWS, MAX_SEQ_LEN + 1]: the sealed holdout, packed like the validation rows (BOS-aligned best
    fit) from the validation shard's documents that no validation row touches, its last document first. A shard
    without that many such tokens gets 0 rows (built once, with a one-line message): runs then record no holdout;
    never a row that shares a document with the validation rows. Cached like them; a damaged file is rebuilt."""
    path = val_rows_path("holdout")
    problem = _val_rows_problem(path, (0, HOLDOUT_ROWS))
    if problem:
        if problem != "missing":
            print(f"eval: the cached holdout rows {path} are damaged ({problem}); rebuilding them", flush=True)
        rows = _build_holdout_rows(tokenizer or Tokenizer.load())
        _write_atomic(path, lambda f: np.save(f, rows))
    return np.load(path)


class _DocumentNumbers:
    """Stands in for the tokenizer in _packed_rows: each document's ids become its number in the stream (from 0, BOS
    included). Packing reads only lengths, so the rows come out as the validation rows with every token replaced by
    the number of the document it came from."""

    def __init__(self, tokenizer):
        self.tokenizer, self.count = tokenizer, 0

    def get_bos_token_id(self):
        return self.tokenizer.get_bos_token_id()

    def encode(self, texts, prepend=None):
        ids = self.tokenizer.encode(texts, prepend=prepend)
        first, self.count = self.count, self.count + len(ids)
        return [[first + i] * len(piece) for i, piece in enumerate(ids)]


def validation_documents(tokenizer=None):
    """(sorted numbers of the validation shard's documents that the validation rows use, its number of documents)."""
    n_docs = pq.ParquetFile(list_shards("val")[0]).metadata.num_rows
    stream = _packed_rows(_DocumentNumbers(tokenizer or Tokenizer.load()), MAX_SEQ_LEN + 1, "val")
    numbers = np.stack([next(stream)[0] for _ in range(EVAL_TOKENS // MAX_SEQ_LEN)])
    stream.close()
    return np.unique(numbers % n_docs), n_docs  # a cycled document is the same document


def _holdout_documents(tokenizer, used, n_docs):
    """The token ids of the validation shard's documents not in `used`, from its last document back."""
    free = np.setdiff1d(np.arange(n_docs), used)[::-1]
    texts = pq.read_table(list_shards("val")[0], columns=["text"]).column("text")
    for start in range(0, len(free), 128):
        batch = [texts[int(i)].as_py() for i in free[start : start + 128]]
        yield from tokenizer.encode(batch, prepend=tokenizer.get_bos_token_id())


def _build_holdout_rows(tokenizer):
    used, n_docs = validation_documents(tokenizer)
    packer, rows, documents = BestFitPacker(MAX_SEQ_LEN + 1), [], _holdout_documents(tokenizer, used, n_docs)
    while len(rows) < HOLDOUT_ROWS:
        while (packer.needs_documents() or packer.buffered_tokens() <= MAX_SEQ_LEN) and (
            ids := next(documents, None)
        ) is not None:
            packer.add(np.asarray(ids, dtype=np.int32))
        row = packer.next_row()
        if row is None:
            print(f"eval: no holdout: the validation rows use {len(used)} of the validation shard's {n_docs} "
                  f"documents and the other {n_docs - len(used)} hold fewer than the holdout's "
                  f"{HOLDOUT_ROWS * MAX_SEQ_LEN:,} tokens, so runs record no holdout_bpb (a longer validation shard "
                  f"or a smaller EVAL_TOKENS leaves room)", flush=True)
            return np.zeros((0, MAX_SEQ_LEN + 1), dtype=np.uint16)
        rows.append(row)
    return np.stack(rows).astype(np.uint16)


def _is_torch_module(model):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def evaluate_bpb(model, batch_size, dist=SINGLE_PROCESS):
    """val_bpb: the nats of every target token that has bytes, over ln 2 times their bytes. `model`: int32 ids [B, T]
    -> logits, an MLX callable or a torch.nn.Module. The harness computes the loss (float32 per token, summed in
    float64: a float32 sum over millions of tokens drifts), so the model cannot change how it is scored. Rank r scores
    batches r, r + world_size, ...; the sums are added in batch order: the same val_bpb at any world size. Then the
    holdout rows, scored the same way without a progress line, their bpb appended to HOLDOUT_PATH and shown nowhere:
    every evaluation scores the holdout, whatever the script does after it."""
    per_token_nats = _torch_token_losses if _is_torch_module(model) else _mlx_token_losses(model)
    val_bpb = _bits_per_byte(load_val_rows(), model, per_token_nats, batch_size, dist, ProgressLine())
    holdout = load_holdout_rows()
    if len(holdout):
        holdout_bpb = _bits_per_byte(holdout, model, per_token_nats, batch_size, dist)
        if dist.rank == 0:
            record_holdout(val_bpb, holdout_bpb, harness_fingerprint(dist.world_size))
    return val_bpb


def _bits_per_byte(rows, model, per_token_nats, batch_size, dist, progress=None):
    token_bytes = get_token_bytes()
    starts = range(0, len(rows), batch_size)
    sums = np.zeros((len(starts), 2))  # per batch: nats, bytes (integers, exact in float64 below 2**53)
    t0, total = time.time(), rows.shape[0] * (rows.shape[1] - 1)
    for index in range(dist.rank, len(starts), dist.world_size):
        block = rows[starts[index] : starts[index] + batch_size].astype(np.int32)
        nats = per_token_nats(model, block[:, :-1], block[:, 1:])
        nbytes = token_bytes[block[:, 1:]]
        sums[index] = float(nats[nbytes > 0].astype(np.float64).sum()), int(nbytes.sum())
        if progress:
            done = min(starts[index] + batch_size, len(rows)) * (rows.shape[1] - 1)  # all ranks move in step
            rate = done / max(time.time() - t0, 1e-9)
            progress.update(f"eval: {done:,}/{total:,} tokens | {rate:,.0f} tok/s | {(total - done) / rate:.0f}s left",
                            force=index + dist.world_size >= len(starts))
    if progress:
        progress.close()
    gathered = dist.gather(sums).reshape(dist.world_size, len(starts), 2)
    total_nats, total_bytes = 0.0, 0
    for index in range(len(starts)):
        batch_nats, batch_bytes = gathered[index % dist.world_size, index]  # from the rank that scored the batch
        total_nats += float(batch_nats)
        total_bytes += int(batch_bytes)
    return total_nats / (math.log(2) * total_bytes)


def _git_state(directory):
    """(short hash of HEAD, "clean" or "dirty": tracked files changed) of the repository at `directory`; ("-", "-")
    outside one."""
    import subprocess

    def git(*args):
        done = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=7", "HEAD")
    if not commit:
        return "-", "-"
    return commit, "dirty" if git("status", "--porcelain", "--untracked-files=no") else "clean"


def record_holdout(val_bpb, holdout_bpb, harness):
    """Append a row to HOLDOUT_PATH under a lock (runs may share the cache): the file is rewritten whole, so a reader
    never sees half a row. The commit is that of the run's working directory."""
    import fcntl

    commit, tree = _git_state(os.getcwd())
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    row = "\t".join([when, commit, tree, f"{val_bpb:.6f}", f"{holdout_bpb:.6f}", harness]) + "\n"
    try:
        os.makedirs(HOLDOUT_DIR, exist_ok=True)
        with open(HOLDOUT_PATH + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = "\t".join(HOLDOUT_COLUMNS) + "\n"
            if os.path.exists(HOLDOUT_PATH):
                with open(HOLDOUT_PATH) as f:
                    old = f.read()
            _write_atomic(HOLDOUT_PATH, lambda f: f.write(old + row), mode="w")
    except OSError as e:
        print(f"warning: this run's holdout record was not saved to {HOLDOUT_PATH} ({e.strerror or e})", flush=True)


def read_holdout(path=None):
    """The records of HOLDOUT_PATH (or `path`) as dicts of HOLDOUT_COLUMNS' strings; [] when there is none."""
    try:
        with open(path or HOLDOUT_PATH) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [dict(zip(HOLDOUT_COLUMNS, line.split("\t"))) for line in lines[1:] if line.count("\t") == 5]


def _mlx_token_losses(model, on_gpu=None):
    """(model, inputs, targets) -> per-token nats as numpy, one compiled graph on a GPU. On MLX's CPU backend
    logsumexp's 8192 exps per token cost more than the cpu preset's forward (mx.exp ~12 ns each), so there the graph
    ends at the logits minus their max and numpy takes the exps (SIMD, ~0.6 ns each, measured). on_gpu: None = by
    MLX's device (the tests run both branches on the CPU)."""
    import mlx.core as mx

    on_gpu = mx.default_device() != mx.cpu if on_gpu is None else on_gpu

    def token_nats(inputs, targets):
        logits = model(inputs).astype(mx.float32)
        target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        if on_gpu:
            return mx.logsumexp(logits, axis=-1) - target_logits
        peak = logits.max(axis=-1, keepdims=True)
        return logits - peak, peak[..., 0] - target_logits

    compiled = mx.compile(token_nats)

    def nats(_, inputs, targets):
        if on_gpu:
            return np.array(compiled(mx.array(inputs), mx.array(targets)))
        shifted, offset = compiled(mx.array(inputs), mx.array(targets))
        return np.array(offset) + np.log(np.exp(np.asarray(shifted)).sum(axis=-1))

    return nats


def _torch_token_losses(model, inputs, targets):
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs).long().to(device)).float()
        nats = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).long().to(device).flatten(),
                               reduction="none")
    model.train(was_training)
    return nats.view(targets.shape).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# MFU's peak, then the summary. Dense FLOP/s from vendor datasheets (tensor cores, no sparsity); other devices are
# measured.

PEAK_FLOPS = {
    ("NVIDIA H100", "bfloat16"): 989.4e12,  # H100 SXM; the PCIe card is 756 TFLOP/s (matched first below)
    ("NVIDIA H100 PCIe", "bfloat16"): 756.0e12,
    ("NVIDIA H200", "bfloat16"): 989.4e12,
    ("NVIDIA A100", "bfloat16"): 312.0e12,
    ("NVIDIA H100", "float32"): 494.7e12,  # TF32 tensor cores, which float32 matmuls use when allowed
    ("NVIDIA H200", "float32"): 494.7e12,
    ("NVIDIA A100", "float32"): 156.0e12,
}


def peak_flops(device_name, dtype, backend="mlx"):
    """Else the matmul rate --calibrate recorded (so `mfu_percent` is comparable between runs), else one measured now,
    under whatever else runs."""
    for (name, kind), flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0][0])):
        if kind == dtype and device_name.startswith(name):
            return flops, "datasheet"
    rate = read_calibration().get(calibration_key("matmul", backend, device_name, dtype))
    if rate:
        return rate, f"calibrated, {CALIBRATION_PATH}"
    return _measure_matmul_flops(backend, dtype), f"measured this run, not calibrated: run `{CALIBRATE_COMMAND}`"


def print_summary(fields, trained_tokens=None, dist=SINGLE_PROCESS):
    """`---`, then `key: value` lines the agent greps (a machine_speed warning before `---`). Every rank calls it."""
    check = budget_check(trained_tokens, dist)
    speed, warning = machine_speed()
    if warning:
        print(warning)
    print("---")
    for key, value in {**fields, "world_size": dist.world_size, "machine_speed": speed}.items():
        if isinstance(value, float):
            value = f"{value:.6f}" if key == "val_bpb" else f"{value:.2f}"
        print(f"{key}: {value}")
    print(f"budget_check: {check}")
    print(f"harness: {harness_fingerprint(dist.world_size)}", flush=True)


def budget_check(trained_tokens, dist=SINGLE_PROCESS):
    """`ok` when the loaders served exactly `trained_tokens` in equal shares. A batch read anywhere else (statistics
    before the clock, a second loader, a warm start) breaks the match."""
    served = dist.gather([tokens_served["train"]])[:, 0].astype(np.int64)
    if trained_tokens is None:
        return "not checked (the training script did not pass trained_tokens to print_summary)"
    if served.sum() == trained_tokens and (served * dist.world_size == trained_tokens).all():
        return "ok"
    extra = int(served.sum()) - trained_tokens
    if extra > 0:
        where = f"{extra:,} read outside the timed steps"
    else:
        where = f"{-extra:,} trained on but never served" if extra < 0 else "the ranks' shares differ"
    if dist.world_size > 1:
        where += f"; per rank: {', '.join(f'{int(n):,}' for n in served)}"
    return (f"FAIL: the loader served {int(served.sum()):,} training tokens, the steps trained on "
            f"{trained_tokens:,} ({where})")


# Machine speed: a fixed probe (a matmul and exps: a step's BLAS and element-wise work) between training steps at a
# steady cadence, against this machine's reference. At a fixed budget the steps a run gets follow the mean speed over
# its training time; a run never moves the reference (one yardstick a night): --calibrate on a quiet machine sets it.
SLOW_MACHINE = 0.9  # below this mean speed a run lost a tenth of its steps to the machine: `warning:`
FAST_MACHINE = 1.15  # above it the reference was taken on a slower (busier) machine: a `note:`


def machine_speed():
    """(summary value, warning or note line or None): the mean over this run's probes of reference / probe seconds."""
    if not SPEED_PROBES:
        return "n/a (a data-parallel run, or the script does not call probe_machine_speed)", None
    key, times = probe_key(_backend()), np.array(SPEED_PROBES)
    reference, note = probe_reference(key), ""
    if reference is None:  # the first run here starts it where that run reads exactly 1.00
        reference, note = float(1 / np.mean(1 / times)), "; reference started by this run"
        try:
            set_probe_reference(key, reference)
        except OSError as e:  # a read-only or full cache: the summary still comes
            note = f"; reference not saved: {e.strerror or e}"
    speeds = reference / times
    speed = round(float(speeds.mean()), 2)  # the value the summary shows is the value the warning and the log use
    value = (f"{speed:.2f} ({len(times)} probes over the training time, slowest {speeds.min():.2f}; reference "
             f"{1000 * reference:.1f} ms{note})")
    if speed < SLOW_MACHINE:
        return value, (f"warning: the machine ran {1 - speed:.0%} slower than its reference ({1000 * reference:.1f} ms "
                       f"probe) over this run's training time: it lost steps to the machine, so this val_bpb is not "
                       f"comparable; rerun before deciding")
    if speed > FAST_MACHINE:
        return value, (f"note: the machine ran {speed - 1:.0%} faster than its reference, which was taken on a busier "
                       f"machine; the night's runs share it, so they compare; `{CALIBRATE_COMMAND}` on a quiet "
                       f"machine resets it between nights")
    return value, None


HARNESS_FILES = ("prepare.py", "prepare_mlx_mamba_3.py")


def harness_fingerprint(world_size=1):
    """Of everything that defines the score (the contract's list): N processes train on N times the tokens."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [os.path.join(here, name) for name in HARNESS_FILES]
    parts += [PRESET_FILE, os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), os.path.join(TOKENIZER_DIR, "token_bytes.npy")]
    parts += [val_rows_path(), val_rows_path("holdout")]
    digest = hashlib.sha256(f"{MAX_SEQ_LEN}|{TIME_BUDGET}|{EVAL_TOKENS}|{VOCAB_SIZE}|{world_size}".encode())
    for path in parts:
        digest.update(_file_digest(path, 64).encode() if os.path.exists(path) else b"missing:" + path.encode())
    return digest.hexdigest()[:12]


# =====================================================================================================================
# THE MACHINERY: cache files written whole, the data manifest, calibration figures, the probe, script sizing.
# =====================================================================================================================


def _first_line(error):
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _file_digest(path, length=12):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _write_atomic(path, write, mode="wb"):
    """`write(file)` fills a uniquely named temporary file, renamed over `path`: runs sharing one cache may build a
    file at once, and a reader sees the old file or a complete new one."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private (0600); cache files are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# The data manifest, DATA_DIR/manifest.json: the shards' source (a folder, or the hub) and each one's sha256 with the
# size and mtime it had when hashed. Setup tells another source's shards by it; the validation rows and the fingerprint
# name the validation shard by it.


def _manifest_path():
    return os.path.join(DATA_DIR, "manifest.json")


def _read_manifest():
    """None when there is none (a cache from before manifests) or it is unreadable."""
    try:
        with open(_manifest_path()) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
    return manifest if ok else None


def _write_manifest(manifest):
    _write_atomic(_manifest_path(), lambda f: json.dump(manifest, f, indent=1, sort_keys=True), "w")


def _manifest_entry(name, digest):
    stat = os.stat(os.path.join(DATA_DIR, name))
    return {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def shard_digest(name, manifest=None):
    """sha256 of the cached shard: recorded, or computed (a second per GB) and recorded where the cache is writable."""
    manifest = manifest or _read_manifest() or {"files": {}}
    path = os.path.join(DATA_DIR, name)
    stat = os.stat(path)
    entry = manifest["files"].get(name)
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns")] == [stat.st_size, stat.st_mtime_ns]:
        return entry["sha256"]
    digest = _file_digest(path, 64)
    manifest["files"][name] = _manifest_entry(name, digest)
    try:
        _write_manifest(manifest)
    except OSError:
        pass  # a read-only cache: the digest is computed again next time, nothing else is lost
    return digest


# ---------------------------------------------------------------------------------------------------------------------
# Calibration figures: calibration.json, this machine's matmul peak and probe, written by --calibrate only.

CALIBRATE_COMMAND = f"{PREPARE_COMMAND} --calibrate"
CALIBRATION_PATH = os.path.join(CACHE_DIR, "calibration.json")


def calibration_key(kind, backend, device_name, dtype=""):
    return f"{kind}|{backend}|{device_name}|{dtype}|{os.path.basename(FAST_BLAS or 'bundled')}"


def read_calibration(path=None):
    """{key: figure} from calibration.json, or `path` (machine_speed.json); {} when missing or unreadable."""
    try:
        with open(path or CALIBRATION_PATH) as f:
            figures = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(figures, dict):
        return {}
    return {k: float(v) for k, v in figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def record_calibration(figures):
    """Training runs never write calibration.json: a figure measured while another process or rank competes for the
    machine would skew every later run."""
    _write_atomic(CALIBRATION_PATH, lambda f: json.dump({**read_calibration(), **figures}, f, indent=1), "w")


def _measure_matmul_flops(backend, dtype, n=1024, seconds=1.0):
    if backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        run = lambda: (a @ a).sum().item()  # noqa: E731
    else:
        import mlx.core as mx

        a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
        run = lambda: mx.eval(a @ a)  # noqa: E731
    return 2 * n**3 / min(_timed_calls(run, seconds))


def _timed_calls(run, seconds, at_least=1):
    """Seconds of each call of `run`, after a warm-up call, over about `seconds` and at least `at_least` calls."""
    run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < at_least:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times


# ---------------------------------------------------------------------------------------------------------------------
# The machine-speed probe (the rule: machine_speed). The reference, in machine_speed.json, is set by --calibrate from
# its runs' probes, or started by the first run on a machine that has none.


def _backend():
    return "torch" if os.environ.get("AUTORESEARCH_BACKEND") == "torch" else "mlx"


def probe_device_name(backend):
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import mlx.core as mx

    return mx.device_info().get("device_name", str(mx.default_device()))


def probe_call(backend):
    """A function that runs the probe once and returns its seconds: a 1024 x 1024 matmul and 2^20 exps (~30 ms on a
    2-core CPU), timed after the device has finished earlier work. Its own random key: the run's stream is untouched."""
    if backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device).manual_seed(0)
        a, b = (torch.randn(shape, device=device, generator=gen) for shape in ((1024, 1024), (1 << 20,)))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        work = lambda: ((a @ a).sum() + b.exp().sum()).item()  # noqa: E731
    else:
        import mlx.core as mx

        key = mx.random.key(0)
        a, b = mx.random.normal((1024, 1024), key=key), mx.random.normal((1 << 20,), key=key)
        sync, work = mx.synchronize, lambda: mx.eval(a @ a, mx.exp(b))  # noqa: E731

    def timed():
        sync()
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    timed()  # warm-up: allocation and first-call costs
    return timed


def probe_seconds(backend, seconds=0.5):
    """Median seconds of the probe over about `seconds` (at least 5 calls)."""
    timed, times, start = probe_call(backend), [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        times.append(timed())
    return float(np.median(times))


def machine_speed_path():
    return os.path.join(os.path.dirname(CALIBRATION_PATH), "machine_speed.json")


def probe_key(backend):
    return calibration_key("speed-probe", backend, probe_device_name(backend))


def probe_reference(key):
    return read_calibration(machine_speed_path()).get(key)


def set_probe_reference(key, seconds, replace=False):
    """Start the reference where there is none (a run), or with `replace` set it, None removing it (--calibrate).
    Returns the one before. Under a lock, so concurrent runs start it once; where locking fails (a network disk), a
    lost race only keeps another run's start."""
    path = machine_speed_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except (ImportError, OSError):
            pass
        before = probe_reference(key)
        if before is None or replace:
            figures = {k: v for k, v in {**read_calibration(path), key: seconds}.items() if v is not None}
            _write_atomic(path, lambda f: json.dump(figures, f, indent=1, sort_keys=True), "w")
    return before


# ---------------------------------------------------------------------------------------------------------------------
# Setup's script sizing (prepare_mlx_mamba_3.py), also of the copies tests, benches and --calibrate run.


def write_constants(path, values):
    """Write {KEY: value} into the script's one-line UPPERCASE constants (`KEY = value  # comment`), each value of the
    type it replaces. Returns [(KEY, old source, new source)] of the lines it changed."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines(keepends=True)
    constants = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            constants.setdefault(node.targets[0].id, node)
    changed = []
    for key, value in values.items():
        node = constants.get(key)
        if not key.isupper() or node is None or node.lineno != node.end_lineno:
            known = ", ".join(sorted(k for k, n in constants.items() if k.isupper() and n.lineno == n.end_lineno))
            raise HarnessError(f"{os.path.basename(path)} has no one-line constant {key!r}; its constants: {known}.")
        old = ast.get_source_segment(source, node.value)
        try:
            default = eval(old, {})  # constants are literals or arithmetic on literals (8 * 2048)
        except Exception:
            default = value
        if not (type(value) is type(default) or (type(default) is float and type(value) is int)):
            raise HarnessError(f"{os.path.basename(path)}: {key} must be {type(default).__name__} like the script's "
                               f"{old}, got {value!r}.")
        new = json.dumps(value) if isinstance(value, str) else repr(float(value) if type(default) is float else value)
        if eval(new, {}) != default:
            line = lines[node.lineno - 1]
            lines[node.lineno - 1] = line[: node.value.col_offset] + new + line[node.value.end_col_offset :]
            changed.append((key, old, new))
    if changed:
        _write_atomic(path, lambda f: f.write("".join(lines)), mode="w")
    return changed


# ---------------------------------------------------------------------------------------------------------------------
# The keep rule of program.md (*Deciding*), computed from results.tsv: `uv run prepare.py log run.log "what changed"`
# appends a run and decides it; `uv run prepare.py decide` decides the latest row again.

RESULTS_COLUMNS = ("commit", "val_bpb", "memory_gb", "num_steps", "machine_speed", "status", "description")
STATUSES = ("keep", "discard", "crash", "rerun")
Result = collections.namedtuple("Result", RESULTS_COLUMNS)


def read_results(path="results.tsv"):
    """The rows of results.tsv as Results (num_steps and machine_speed None where the log has no such column)."""
    try:
        with open(path) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise HarnessError(f"Cannot read {path}: {e.strerror}. Start it as program.md's setup says.") from None
    header = lines[0].split("\t") if lines else []
    if not {"commit", "val_bpb", "status", "description"} <= set(header):
        raise HarnessError(f"{path}: the first line must be the header {chr(9).join(RESULTS_COLUMNS)!r} "
                           "(tab-separated).")
    rows = []
    for number, line in enumerate(lines[1:], 2):
        cells = dict(zip(header, line.split("\t")))
        try:
            steps, speed = cells.get("num_steps", "").strip(), cells.get("machine_speed", "").strip().split(" ")[0]
            row = Result(cells["commit"].strip(), float(cells["val_bpb"]), float(cells.get("memory_gb") or 0),
                         int(steps) if steps not in ("", "-") else None,
                         float(speed) if speed not in ("", "-", "n/a") else None,
                         cells["status"].strip(), cells.get("description", "").strip())
        except (KeyError, ValueError) as e:
            raise HarnessError(f"{path} line {number}: cannot read {line!r} ({_first_line(e)}); every row has the "
                               f"header's {len(header)} tab-separated fields.") from None
        if row.status not in STATUSES:
            raise HarnessError(f"{path} line {number}: status {row.status!r} must be one of {', '.join(STATUSES)}.")
        rows.append(row)
    return rows


BUDGET_FAILED = " (budget_check failed)"  # log_run's mark on a run that read data outside its timed steps


def counted(row):
    """A run the arithmetic uses: not a crash, not one that failed budget_check, not one the machine slowed."""
    return (row.status != "crash" and not row.description.endswith(BUDGET_FAILED)
            and (row.machine_speed is None or row.machine_speed >= SLOW_MACHINE))


def speed_slope(rows):
    """d val_bpb / d ln(machine_speed) within commits (a least-squares line through each commit's runs, one slope for
    all): at a fixed budget a slower machine trains fewer steps. None until 4 degrees of freedom say it is negative."""
    by_commit = _runs_by_commit(rows, lambda r: counted(r) and r.machine_speed is not None)
    xy = [(math.log(r.machine_speed), r.val_bpb, runs) for runs in by_commit.values() if len(runs) > 1 for r in runs]
    centred = [(x - np.mean([math.log(r.machine_speed) for r in runs]), y - np.mean([r.val_bpb for r in runs]))
               for x, y, runs in xy]
    dof = sum(len(runs) - 1 for runs in by_commit.values() if len(runs) > 1) - 1
    sxx = sum(x * x for x, _ in centred)
    if dof < 4 or sxx < 1e-6:
        return None
    slope = sum(x * y for x, y in centred) / sxx
    return slope if slope < 0 else None


def adjusted(row, slope):
    """val_bpb as at machine_speed 1.00 (the reference), by the within-commit slope."""
    if slope is None or row.machine_speed is None:
        return row.val_bpb
    return row.val_bpb - slope * math.log(row.machine_speed)


def _runs_by_commit(rows, keep=counted):
    by_commit = {}
    for row in rows:
        if keep(row):
            by_commit.setdefault(row.commit, []).append(row)
    return by_commit


def pooled_noise(rows, slope=None):
    """The pooled sample standard deviation of the counted runs of each commit around its mean (values adjusted by
    `slope` when given; the slope then costs one degree of freedom). None before any commit has two counted runs."""
    groups = [[adjusted(r, slope) for r in runs] for runs in _runs_by_commit(rows).values() if len(runs) > 1]
    dof = sum(len(g) - 1 for g in groups) - (slope is not None)
    if dof < 1:
        return None
    return math.sqrt(sum(float(np.sum((np.array(g) - np.mean(g)) ** 2)) for g in groups) / dof)


def keep_rule(rows):
    """Program.md's *Deciding* on `rows` (results.tsv in order): a dict with noise, best, its runs, the bounds for one
    and two runs, and the verdict for the latest row's commit with its reason."""
    if not rows:
        raise HarnessError("results.tsv has no runs yet: run the baseline and log it first.")
    slope = speed_slope(rows)
    noise = pooled_noise(rows, slope)
    by_commit = _runs_by_commit(rows)
    firsts = {}
    for row in rows:
        firsts.setdefault(row.commit, row)
    keeps = [c for c, first in firsts.items() if first.status == "keep"]
    baseline = next(iter(firsts))
    best = keeps[-1] if keeps else baseline
    best_runs = [adjusted(r, slope) for r in by_commit.get(best, [])]
    best_mean = float(np.mean(best_runs)) if best_runs else None
    bound = lambda n: best_mean - 2 * noise * math.sqrt(1 / n + 1 / len(best_runs))  # noqa: E731
    state = {"noise": noise, "raw_noise": pooled_noise(rows), "slope": slope, "best": best, "best_runs": best_runs,
             "best_mean": best_mean, "bound_1": None, "bound_2": None, "commit": rows[-1].commit}
    if noise is not None and best_runs:
        state["bound_1"], state["bound_2"] = bound(1), bound(2)
    latest = rows[-1]
    runs = [adjusted(r, slope) for r in by_commit.get(latest.commit, [])]
    mean = float(np.mean(runs)) if runs else None
    state["runs"], state["mean"] = runs, mean

    def verdict(word, reason):
        return {**state, "verdict": word, "reason": reason}

    if latest.status == "crash":
        return verdict("crash", "no val_bpb: fix a slip in your own change and rerun (twice at most), else revert")
    if not counted(latest):
        return verdict("machine moved: rerun", f"machine_speed {latest.machine_speed:.2f} < {SLOW_MACHINE:.2f}: the "
                       "machine, not the change, took steps from this run; it is left out of the arithmetic")
    if latest.commit == baseline and len(runs) < 3:
        return verdict("rerun", f"the baseline has {len(runs)} counted run(s) of 3")
    if noise is None:
        return verdict("rerun", "no noise yet: rerun the baseline until one commit has two counted runs")
    if latest.commit == best:
        return verdict("best", f"best is the mean of its {len(runs)} counted runs")
    if not best_runs:
        return verdict("rerun best", f"best ({best}) has no counted run yet: run it once more (a `drift check`)")
    if firsts[latest.commit].status == "keep" or latest.description.startswith("final"):
        return verdict("recorded", "a rerun of an earlier commit: it moves noise, not best")
    n = len(runs)
    if mean < bound(n):
        return verdict("keep", f"mean {mean:.6f} of {n} run(s) < the bound {bound(n):.6f}")
    if n == 1 and mean < best_mean:
        return verdict("rerun", f"{mean:.6f} is between the bound {bound(1):.6f} and best {best_mean:.6f}: run it "
                       "once more and decide on the mean of two")
    return verdict("discard", f"mean {mean:.6f} of {n} run(s) is not below the bound {bound(n):.6f}")


SUMMARY_KEYS = ("val_bpb", "peak_memory_mb", "num_steps", "machine_speed", "budget_check", "total_seconds")


def read_summary(log_path):
    """The `key: value` lines after a run log's last `---` ({} for a run that crashed before its summary), and its
    `warning:` lines."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise HarnessError(f"Cannot read the run log {log_path}: {e.strerror}. Give the file the run wrote.") from None
    start = max((i for i, line in enumerate(lines) if line == "---"), default=None)
    summary = {}
    for line in lines[start + 1 :] if start is not None else []:
        key, _, value = line.partition(": ")
        summary[key] = value
    return summary, [line for line in lines if line.startswith("warning:")]


def log_run(log_path, description, path="results.tsv", commit=None):
    """Append the run in `log_path` (the commit checked out now) to results.tsv, decide it, and write the commit's
    first row's status as the verdict says. Returns keep_rule's dict."""
    import subprocess

    if commit is None:
        done = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
        if done.returncode:
            raise HarnessError("Not in a git repository: run this from the repository the experiment committed to.")
        commit = done.stdout.strip()
    if "\t" in description or "\n" in description:
        raise HarnessError("The description must be one line without tabs.")
    rows = read_results(path) if os.path.exists(path) else []
    summary, _ = read_summary(log_path)
    first = not any(row.commit == commit for row in rows)
    if "val_bpb" not in summary:
        status, values = ("crash" if first else "rerun"), (0.0, 0.0, None, None)
        if not first:
            raise HarnessError(f"{log_path} has no summary: a rerun of {commit} crashed; fix the cause and rerun it.")
    else:
        speed = summary.get("machine_speed", "").split(" ")[0]
        values = (float(summary["val_bpb"]), round(float(summary.get("peak_memory_mb", 0)) / 1024, 1),
                  int(summary["num_steps"]), float(speed) if speed not in ("", "n/a") else None)
        status = ("keep" if not rows else "discard") if first else "rerun"
        if summary.get("budget_check", "ok") != "ok":
            status, description = ("discard" if first else "rerun"), description + BUDGET_FAILED
    if not description:
        description = f"rerun of {next(r for r in rows if r.commit == commit).description}"
    row = Result(commit, *values, status, description)
    rows.append(row)
    decision = keep_rule(rows)
    if decision["verdict"] in ("keep", "discard") and not row.description.endswith(BUDGET_FAILED):
        rows = [r._replace(status=decision["verdict"]) if r.commit == commit and r.status in ("keep", "discard")
                else r for r in rows]
    elif row.description.endswith(BUDGET_FAILED):
        decision = {**decision, "verdict": "discard", "reason": "budget_check failed: never a win"}

    def write(f):
        f.write("\t".join(RESULTS_COLUMNS) + "\n")
        for r in rows:
            steps = "" if r.num_steps is None else str(r.num_steps)
            speed = "" if r.machine_speed is None else f"{r.machine_speed:.2f}"
            cells = (r.commit, f"{r.val_bpb:.6f}", f"{r.memory_gb:.1f}", steps, speed, r.status, r.description)
            f.write("\t".join(cells) + "\n")

    _write_atomic(path, write, mode="w")
    if "total_seconds" in summary and rows[0].commit == commit:
        decision["timeout"] = math.ceil(2 * float(summary["total_seconds"]) / 60) * 60
    return decision


def experiments_since_drift_check(rows):
    """New commits' first runs since the baseline or the last `drift check` row (reruns do not count)."""
    seen, count = set(), 0
    for row in rows:
        if "drift check" in row.description:
            count = 0
        elif row.commit not in seen:
            count += bool(seen)  # the baseline is not an experiment
        seen.add(row.commit)
    return count


def describe_decision(rows, decision):
    """The lines `uv run prepare.py decide` prints."""
    fmt = lambda x: "n/a" if x is None else f"{x:.6f}"  # noqa: E731
    left_out = [r for r in rows if not counted(r)]
    out = [f"results: {len(rows)} runs, {len(rows) - len(left_out)} counted"
           + (f" ({len(left_out)} left out: crashes and slowed machines)" if left_out else "")]
    if decision["slope"] is not None:
        out.append(f"noise: {fmt(decision['noise'])} (each run taken to machine_speed 1.00 by the within-commit slope "
                   f"{decision['slope']:.3f} bpb per ln speed; unadjusted {fmt(decision['raw_noise'])})")
    else:
        out.append(f"noise: {fmt(decision['noise'])}")
    runs = ", ".join(f"{x:.6f}" for x in decision["best_runs"])
    out.append(f"best: {decision['best']}, mean {fmt(decision['best_mean'])} of {len(decision['best_runs'])} runs "
               f"({runs})")
    out.append(f"bound: one run wins below {fmt(decision['bound_1'])}, the mean of two below "
               f"{fmt(decision['bound_2'])}")
    mean = "no counted run"
    if decision["runs"]:
        mean = f"mean {fmt(decision['mean'])} of {len(decision['runs'])} counted run(s)"
    out.append(f"latest: {decision['commit']} ({mean})")
    out.append(f"verdict: {decision['verdict']} ({decision['reason']})")
    finals = {kind: [adjusted(r, decision["slope"]) for r in rows if counted(r) and r.description == f"final: {kind}"]
              for kind in ("baseline", "best")}
    if finals["baseline"] and finals["best"] and decision["noise"] is not None:
        a, b = finals["baseline"], finals["best"]
        spread = decision["noise"] * math.sqrt(1 / len(a) + 1 / len(b))
        out.append(f"confirmed: final baseline {np.mean(a):.6f} ({len(a)} runs) -> final best {np.mean(b):.6f} "
                   f"({len(b)} runs): {np.mean(b) - np.mean(a):+.6f} +- {spread:.6f}")
    experiments = experiments_since_drift_check(rows)
    out.append(f"experiments since the last drift check: {experiments}"
               + (" (due: run the tip unchanged, logged `drift check`)" if experiments >= 10 else ""))
    if decision.get("timeout"):
        out.append(f"timeout for every run: {decision['timeout']} s (twice this baseline's total_seconds)")
    return "\n".join(out)


if __name__ == "__main__":
    usage = "usage: uv run prepare.py log RUN_LOG \"what changed\" | uv run prepare.py decide  (reads results.tsv)"
    args = sys.argv[1:]
    if args[:1] == ["log"] and len(args) in (2, 3):
        decision = log_run(args[1], args[2] if len(args) == 3 else "")
    elif args == ["decide"]:
        decision = keep_rule(read_results())
    else:
        raise HarnessError(usage)
    print(describe_decision(read_results(), decision))
