"""
The fixed harness of autoresearch-mamba: the training scripts import it, the agent never edits it (program.md) and
reads it down to END OF THE CONTRACT. Import it before mlx: on Linux it first loads an optimized BLAS.

Setup: `uv run prepare_mlx_mamba_3.py` (data, tokenizer, and the active preset's sizes written into the training
scripts' constants), then `uv run prepare_mlx_mamba_3.py --calibrate` on a quiet machine.

What a training script calls:
    harness_line()                     the preset and the constants in force, printed first
    run(main)                          a user's mistake ends in one line, Ctrl-C in `Interrupted.`
    distributed("mlx" | "torch")       rank, world_size, agree(loss, step_time); a plain run is rank 0 of 1
    check_hyperparameters(section, [(NAME, ok, message), ...]), positive(...), one_of(...): one-line errors first
    Tokenizer.from_directory()         the BPE tokenizer (VOCAB_SIZE tokens, BOS before every document)
    make_dataloader(tokenizer, B, T, "train", rank, world_size)
                                       endless (inputs, targets, epoch), int32 numpy [B, T], packed documents
    probe_machine_speed(dist)          times a fixed probe before the loop (outside the budget)
    step_midpoint(training_time, step_times)
                                       a step runs while this is before TIME_BUDGET; the schedule reads progress there
    warn_if_evaluation_is_long(step_times, tokens_per_step), check_loss(loss, step), ProgressLine(interval)
    evaluate_bpb(model, B, dist)       val_bpb on EVAL_TOKENS fixed validation tokens, scored by the harness
    peak_flops(device, dtype)          (FLOP/s, source) for MFU: datasheet, else the calibrated matmul rate
    print_summary(fields, trained_tokens, dist)
                                       the summary block, then world_size, machine_speed, budget_check, harness

The rules, each visible in the summary:
    - training_seconds counts every step but the first (compilation) and ends within half a step of TIME_BUDGET.
    - budget_check: ok only when the loaders served exactly the tokens the timed steps trained on.
    - harness: a fingerprint of this file, prepare_mlx_mamba_3.py, the preset, the tokenizer, the validation rows and
      the number of processes. Only runs with the same fingerprint are comparable.
    - machine_speed: the probe against this machine's reference (1.00 = as fast as it has been); below 0.90 a
      `warning:` line: rerun instead of deciding.
The cache (~/.cache/autoresearch/ or $AUTORESEARCH_CACHE_DIR): data/, tokenizer/, eval/, calibration.json.
"""

import ast
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
# Fixed constants. A preset's `prepare` section may override the first three and NUM_SHARDS (smaller machines, tests).

MAX_SEQ_LEN = 2048  # context length of training rows and evaluation rows
TIME_BUDGET = 300  # seconds of training per experiment (start-up, compilation and evaluation not counted)
EVAL_TOKENS = 40 * 524288  # target tokens scored by evaluate_bpb
NUM_SHARDS = 10  # training shards prepare downloads by default
VOCAB_SIZE = 8192  # BPE vocabulary, special tokens included
SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = SPECIAL_TOKENS[0]  # prepended to every document

# GPT-4 style pre-tokenization, except that digits group in runs of at most 2 (small vocabulary).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TOKENIZER_TRAIN_CHARS = 1_000_000_000  # about 1B characters of training documents, or all there are
TOKENIZER_DOC_CHARS = 10_000  # documents are capped at this many characters for tokenizer training

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

# ---------------------------------------------------------------------------------------------------------------------
# Fast BLAS. The Linux mlx-cpu wheel links a reference BLAS (about 3-5 GFLOP/s for fp32 matmul on 2 cores). Loading
# MKL's runtime from the venv (the `mkl` wheel of the mlx-cpu dependency group) with RTLD_GLOBAL before MLX is imported
# makes the dynamic linker resolve MLX's cblas_sgemm to MKL: the same sgemm contract, about 100 GFLOP/s here. It is a
# no-op on macOS (MLX uses Accelerate and Metal there), when MLX is already imported, or with AUTORESEARCH_FAST_BLAS=0.


def _load_fast_blas():
    if sys.platform != "linux" or os.environ.get("AUTORESEARCH_FAST_BLAS", "1") == "0" or "mlx.core" in sys.modules:
        return None
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


FAST_BLAS = _load_fast_blas()  # path of the loaded library, or None (then MLX uses its bundled BLAS)


def _keep_large_buffers_in_heap():
    """MLX's CPU backend allocates every array with malloc. glibc serves blocks of 32 MB and more with a fresh mmap
    and unmaps them on free, so each training step page-faults its big activations in again: element-wise ops on
    them ran at ~6 ns per element instead of 0.5-1. Raising the mmap and trim thresholds to 1 GB keeps such blocks in
    the heap for reuse (a batched matmul went from 77 to 23 ms). Changes speed only, never results."""
    if sys.platform != "linux" or os.environ.get("AUTORESEARCH_FAST_BLAS", "1") == "0":
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

class HarnessError(SystemExit):
    """A problem the user must fix (missing data, bad preset, corrupt shard): the message says what and how.
    A SystemExit, so an uncaught one prints just the message and exits with status 1, without a traceback."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


# How to repair anything derived in the cache: prepare rebuilds what is missing or damaged.
REPAIR_HINT = f"Rerun `{PREPARE_COMMAND}` (with --data-dir DIR if you prepared offline): it rebuilds damaged files"
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT}  # a disk the user must fix


def run(main):
    """Run a harness script's main() as the user should see it: `if __name__ == "__main__": prepare.run(main)`.

    Ctrl-C prints `Interrupted.` and exits with status 130 (cache files are written to a temporary name and renamed,
    so an interrupted write never leaves a file that looks complete); a read-only, full or forbidden disk is a one-line
    error with status 1; a HarnessError stays its one line. Anything else is a bug and keeps its traceback."""
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
# Presets. One JSON file per device class in presets/, one section per script. Chosen by the environment variable
# AUTORESEARCH_MLX_PRESET_FILE (a path, or a bare name such as `cpu` for presets/cpu.json); without it, by the device
# the training script will run on: MLX's own device for the MLX scripts, torch's for the torch mirror (it sets
# AUTORESEARCH_BACKEND=torch). An Apple GPU gets `mac`, or `local` where its recommended working set is small; a CUDA
# GPU `default` (the canonical H100-sized configuration); a CPU `cpu`, whatever drivers sit beside it.

PRESET_SECTIONS = ("prepare", "train_mamba_3_mlx", "train_hybrid_moe_mlx", "train_mamba")
PREPARE_KEYS = {"MAX_SEQ_LEN": int, "TIME_BUDGET": (int, float), "EVAL_TOKENS": int, "NUM_SHARDS": int}
MAC_MIN_WORKING_SET_GB = 8  # the mac preset's runs peak at 3.7-4.5 GB (MIMO: 11.5 GB), measured on the CPU


def device_preset():
    """(preset name, why) for the device the training script will use. Asks the framework itself (an NVIDIA driver
    beside a CPU-only MLX is a CPU); imports torch only for the torch mirror."""
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
    """Read and validate a preset file; returns {section: {KEY: value}} with every section present."""
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
    """One line naming the preset and the fixed constants in force; printed at the start of every run."""
    blas = (os.path.basename(FAST_BLAS) if FAST_BLAS else "bundled") + (", malloc heap-tuned" if HEAP_TUNED else "")
    return (
        f"preset: {PRESET_NAME} ({PRESET_FILE}, chosen {PRESET_ORIGIN}) | MAX_SEQ_LEN={MAX_SEQ_LEN} "
        f"TIME_BUDGET={TIME_BUDGET} EVAL_TOKENS={EVAL_TOKENS} VOCAB_SIZE={VOCAB_SIZE} | blas: {blas}"
    )


def write_constants(path, values):
    """Write {KEY: value} into the UPPERCASE constant lines of the script at `path` (`KEY = value  # comment`: the
    value replaced, the comment kept): how setup sizes a script for a preset, and how tests, benches and --calibrate
    size a copy. Each KEY must be a one-line top-level constant of the script with a value of the same type. Returns
    [(KEY, old source, new source)] of the lines it changed; the file is rewritten only if one did."""
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


def check_hyperparameters(section, checks):
    """Validate a training script's hyperparameters before anything is built: (KEY, ok, requirement) triples, e.g.
    ("DEPTH", DEPTH > 0, f"must be a positive int, got {DEPTH!r}"); `positive` and `one_of` below make the common
    ones. The first failing check is a HarnessError naming the key."""
    for key, ok, requirement in checks:
        if not ok:
            raise HarnessError(f"{section}.{key} {requirement} (set in the script). Fix the value and rerun.")


def positive(namespace, *names):
    """Checks for check_hyperparameters: each named constant is a number above zero."""
    return [(name, isinstance(namespace[name], (int, float)) and not isinstance(namespace[name], bool)
             and namespace[name] > 0, f"must be a positive number, got {namespace[name]!r}") for name in names]


def one_of(namespace, name, choices):
    """A check for check_hyperparameters: the named constant is one of `choices`."""
    return name, namespace[name] in choices, f"must be one of {', '.join(map(repr, choices))}, got {namespace[name]!r}"


# ---------------------------------------------------------------------------------------------------------------------
# Data: shards from the Hugging Face hub, or an offline folder of parquet files.


def shard_path(index):
    return os.path.join(DATA_DIR, SHARD_NAME.format(index))


def check_parquet(path, fix=None):
    """Raise HarnessError unless `path` is a readable parquet file with a string `text` column. Reads only the
    footer (milliseconds). `fix` says how to repair it; by default, for a file in the cache, rebuild it."""
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


def _first_line(error):
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


OFFLINE_HINT = f"Prepare offline instead: `{PREPARE_COMMAND} --data-dir DIR` (DIR: parquet files + val.parquet)."


def _no_network_reason(error):
    """Why `error` means the hub cannot be reached at all (a name that does not resolve, a refused or unroutable
    connection), found anywhere in its chain of causes; None for failures worth retrying (timeouts, HTTP 5xx)."""
    import socket

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, socket.gaierror):
            return f"name resolution failed: {error.strerror or error}"
        if isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) in (
                errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"connection failed: {error.strerror or error}"
        error = error.__cause__ or error.__context__
    return None


def _check_hub_reachable(endpoint=None):
    """Fail at once, with the offline instructions, when the hub cannot be reached at all. huggingface_hub retries
    such failures for about 25 seconds per file (minutes in all); a slow or flaky network is left to the retries."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HarnessError(f"HF_HUB_OFFLINE is set, so the data cannot be downloaded. {OFFLINE_HINT}")
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                              "all_proxy")):
        return  # connections go through a proxy: only the download itself can tell
    url = urlsplit(endpoint or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        reason = _no_network_reason(e)
        if reason:
            raise HarnessError(f"Cannot reach {url.hostname} ({reason}): no network? {OFFLINE_HINT}") from None


def download_shards(indices, workers=8, endpoint=None, attempts=5, backoff_seconds=2.0):
    """Download climbmix shards into DATA_DIR with huggingface_hub: parallel, resumable, atomic.

    huggingface_hub writes to a temporary `.incomplete` file and renames it only once the size matches the server's,
    resuming with a Range request when a connection drops; on top of that we retry failed shards with exponential
    backoff and check that each finished file is valid parquet. A shard already there whose footer is damaged is
    fetched again. No network at all (see _check_hub_reachable) ends at once. Returns the number of shards fetched."""
    import queue
    import threading

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    os.makedirs(DATA_DIR, exist_ok=True)
    missing = []
    for i in indices:
        if os.path.exists(shard_path(i)):
            try:
                check_parquet(shard_path(i))
                continue
            except HarnessError as e:
                print(f"  {SHARD_NAME.format(i)}: {e}; fetching it again", flush=True)
                os.remove(shard_path(i))
        missing.append(i)
    if not missing:
        return 0
    _check_hub_reachable(endpoint)

    def fetch(index):
        name = SHARD_NAME.format(index)
        for attempt in range(1, attempts + 1):
            try:
                hf_hub_download(
                    DATASET_REPO, name, repo_type="dataset", local_dir=DATA_DIR, endpoint=endpoint, revision="main"
                )
                check_parquet(shard_path(index))
                return
            except (Exception, HarnessError) as e:  # network errors, HTTP 5xx, a corrupt download
                if os.path.exists(shard_path(index)):
                    os.remove(shard_path(index))  # only a verified shard may look complete
                if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                    raise  # a full or read-only disk: retrying cannot help (run() reports it)
                no_network = _no_network_reason(e)
                if no_network:
                    raise HarnessError(f"Download of {name} failed ({no_network}): no network? {OFFLINE_HINT}") \
                        from None
                reason = _first_line(e)
                if attempt == attempts:
                    raise HarnessError(
                        f"Download of {name} failed after {attempts} attempts ({reason}). Check the network and rerun "
                        f"{PREPARE_COMMAND} (finished shards are kept), or prepare offline with --data-dir DIR."
                    ) from None
                wait = backoff_seconds * 2 ** (attempt - 1)
                print(f"  {name}: attempt {attempt} failed ({reason}); retrying in {wait:.1f}s", flush=True)
                time.sleep(wait)

    # Daemon worker threads, not a ThreadPoolExecutor: on Ctrl-C or a fatal error the process can exit at once
    # instead of waiting for the downloads in flight (their `.incomplete` files are resumed next time).
    todo, errors = queue.Queue(), []
    for index in missing:
        todo.put(index)

    def worker():
        while not errors:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                fetch(index)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, len(missing))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)  # a short timeout keeps Ctrl-C responsive
    if errors:
        raise errors[0]
    return len(missing)


def _write_atomic(path, write, mode="wb"):
    """Create `path` whole or not at all: `write(file)` fills a temporary file with a unique name in the same folder,
    which then replaces `path` in one rename. Several runs sharing one cache (agents on one machine) may build the
    same file at the same moment; each writes its own temporary file, so their writes never interleave, and a reader
    sees the old file or a complete new one."""
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


def _copy_atomic(src, dst):
    def copy(fout):
        with open(src, "rb") as fin:
            while chunk := fin.read(1 << 22):
                fout.write(chunk)

    _write_atomic(dst, copy)


def _check_num_shards(num_shards, available=VAL_SHARD, where=""):
    if num_shards is not None and not 1 <= num_shards <= available:
        raise HarnessError(f"--num-shards must be between 1 and {available}{where}, got {num_shards}.")


def import_local_corpus(source_dir, num_shards=None):
    """Prepare DATA_DIR from a local folder: every *.parquet except val.parquet becomes a training shard (in sorted
    order), val.parquet becomes the pinned validation shard. The cache then holds exactly these files: shards already
    there with the same content are kept, others (another folder's, a damaged copy) are replaced, and what was built
    from replaced shards goes too (see _forget_stale_shards). Only the first `num_shards` training files (default
    NUM_SHARDS, at most all) are imported. Returns (training shards imported, training files in the folder, files
    copied)."""
    source_dir = os.path.expanduser(source_dir)
    if not os.path.isdir(source_dir):
        raise HarnessError(f"--data-dir {source_dir}: no such directory.")
    val_file = os.path.join(source_dir, "val.parquet")
    if not os.path.isfile(val_file):
        raise HarnessError(
            f"--data-dir {source_dir}: no val.parquet. The folder needs training parquet files and the validation "
            f"split as val.parquet (each with a 'text' column)."
        )
    train_files = sorted(
        f for f in glob.glob(os.path.join(source_dir, "*.parquet")) if os.path.basename(f) != "val.parquet"
    )
    if not train_files:
        raise HarnessError(f"--data-dir {source_dir}: no training parquet files besides val.parquet.")
    available = len(train_files)
    _check_num_shards(num_shards, available, f" (the training files in {source_dir})")
    train_files = train_files[:num_shards or NUM_SHARDS]  # the preset's NUM_SHARDS by default, as for downloads
    if len(train_files) > VAL_SHARD:
        raise HarnessError(f"--data-dir {source_dir}: at most {VAL_SHARD} training files are supported.")
    sources = [(f, SHARD_NAME.format(i)) for i, f in enumerate(train_files)]
    sources.append((val_file, SHARD_NAME.format(VAL_SHARD)))
    fix = f"Replace it in {source_dir} with a good copy (or move it out of that folder), then rerun with --data-dir."
    for src, _ in sources:
        check_parquet(src, fix)
    wanted = {name: _file_digest(src, 64) for src, name in sources}
    os.makedirs(DATA_DIR, exist_ok=True)
    manifest = _forget_stale_shards(os.path.realpath(source_dir), wanted, exact=True)
    copied = 0
    for src, name in sources:
        if not os.path.exists(os.path.join(DATA_DIR, name)):
            _copy_atomic(src, os.path.join(DATA_DIR, name))
            copied += 1
        manifest["files"][name] = _manifest_entry(name, wanted[name])
    _write_manifest(manifest)
    return len(train_files), available, copied


# The data manifest, DATA_DIR/manifest.json: where the shards came from ("source": a folder, or the hub repository)
# and each shard's sha256 with the size and mtime it had when hashed, so a digest is recomputed only for a file that
# changed since. It is how prepare tells another folder's shards from this one's, and how the validation rows and the
# fingerprint know which validation shard they describe.


def _manifest_path():
    return os.path.join(DATA_DIR, "manifest.json")


def _read_manifest():
    """The manifest, or None when there is none (a cache from before manifests) or it is unreadable."""
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
    """sha256 of the cached shard `name`: from the manifest when the file still has the recorded size and mtime,
    else computed (a second per GB) and, when the cache is writable, recorded (in a new manifest without a source
    for a cache from before manifests)."""
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


def _forget_stale_shards(source, wanted, exact):
    """Make sure the cache never mixes shards of two sources. `wanted`: {shard name: sha256, or None when unknown
    before download (hub shards, immutable by name)}; `exact`: shards not wanted are stale too (a folder import
    mirrors its folder; the hub keeps extra downloaded shards). A stale shard is removed; if a training shard was
    stale, the tokenizer trained on it goes too, and with any stale shard the validation rows go. Returns the
    manifest to complete with the new shards."""
    manifest = _read_manifest()
    previous = manifest["source"] if manifest and "source" in manifest else None
    from_elsewhere = previous is not None and previous != source
    stale = []
    for path in sorted(glob.glob(os.path.join(DATA_DIR, "shard_*.parquet"))):
        name = os.path.basename(path)
        if name not in wanted:
            is_stale = exact or from_elsewhere
        elif wanted[name] is None:
            is_stale = from_elsewhere
        else:
            is_stale = shard_digest(name, manifest) != wanted[name]
        if is_stale:
            stale.append(name)
    if stale:
        val_name = SHARD_NAME.format(VAL_SHARD)
        derived = glob.glob(os.path.join(EVAL_DIR, "val_*.npy"))
        if any(name != val_name for name in stale):
            derived += [os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), os.path.join(TOKENIZER_DIR, "token_bytes.npy")]
        for path in [os.path.join(DATA_DIR, name) for name in stale] + derived:
            if os.path.exists(path):
                os.remove(path)
        gone = "the tokenizer and " if any(name != val_name for name in stale) else ""
        print(f"data: {len(stale)} cached shard(s) differ from {source} (they came from "
              f"{previous or 'an unrecorded source'}): removed them, {gone}the validation rows built from them; "
              f"rebuilding", flush=True)
    files = {} if from_elsewhere or manifest is None else manifest["files"]
    return {"source": source, "files": {name: entry for name, entry in files.items() if name not in stale}}


def list_shards(split):
    """Paths of the prepared shards of a split, in order; a HarnessError saying what to run when there are none."""
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


def iter_texts(split, batch_size=128):
    """Documents of a split as lists of strings, streamed one parquet row group at a time, forever.
    Yields (texts, epoch) with epoch starting at 1; the order is fixed, so the stream is deterministic."""
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
# Tokenizer: BPE trained with rustbpe, used through tiktoken.


class Tokenizer:
    """A tiktoken Encoding with our special tokens; BOS is prepended to every document."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory=None):
        """The tokenizer in `directory`. Without one, the cache's, after check_cache(): a training script starts
        with this call, so a missing or damaged file is reported before any training time is spent."""
        if directory is None:
            return check_cache()
        return cls.load(directory)

    @classmethod
    def load(cls, directory=None):
        """Unpickle tokenizer.pkl; a missing or damaged file is a HarnessError saying how to rebuild it."""
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
        """Token ids of a string (a list of ints), or of a list of strings (a list of lists). `prepend`: a token id
        or special-token string put before each sequence."""
        if isinstance(prepend, str):
            prepend = self.encoding.encode_single_token(prepend)
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.encoding.encode_ordinary(text)
        return [head + ids for ids in self.encoding.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.encoding.decode(list(ids))


def _training_texts(char_budget):
    """Training documents for the tokenizer, each capped, until the character budget or one pass over the shards."""
    used = 0
    for texts, epoch in iter_texts("train"):
        if epoch > 1:
            return
        for text in texts:
            text = text[:TOKENIZER_DOC_CHARS]
            yield text
            used += len(text)
            if used >= char_budget:
                return


def train_tokenizer(char_budget=TOKENIZER_TRAIN_CHARS):
    """Train the BPE on training documents only and save tokenizer.pkl and token_bytes.npy (atomically)."""
    import rustbpe
    import tiktoken

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_texts(char_budget), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != VOCAB_SIZE - len(SPECIAL_TOKENS):
        raise HarnessError(
            f"Tokenizer training produced {len(ranks)} tokens instead of {VOCAB_SIZE - len(SPECIAL_TOKENS)}: "
            f"the training data is too small or too repetitive. Prepare more shards."
        )
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                                 special_tokens=specials)
    token_bytes = np.zeros(VOCAB_SIZE, dtype=np.int32)  # special tokens keep 0: they are not scored
    for token, rank in ranks.items():
        token_bytes[rank] = len(token)
    # tokenizer.pkl last: its presence is what says "tokenizer ready"
    _write_atomic(os.path.join(TOKENIZER_DIR, "token_bytes.npy"), lambda f: np.save(f, token_bytes))
    _write_atomic(os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), lambda f: pickle.dump(encoding, f))
    return encoding


def get_token_bytes():
    """int32 array [VOCAB_SIZE]: UTF-8 byte length of each token id, 0 for special tokens."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing.


class BestFitPacker:
    """Packs tokenized documents into rows of exactly `row_len` tokens with no padding.

    Every document starts with BOS. For each row we repeatedly take the longest buffered piece that fits the space
    left; when none fits, the shortest piece is split: its head fills the row and its tail goes back to the buffer,
    so no token is ever dropped or invented. Deterministic for a given document stream."""

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
        """One row of row_len tokens, or None if the buffer holds fewer tokens than a row."""
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
    """Infinite stream of (row, epoch): rows of row_len tokens packed from the split's documents. The buffer is
    refilled up to buffer_size documents but not across an epoch boundary unless a row needs the tokens, so a small
    split is not read several times over before its first row."""
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


# Tokens (inputs) every loader of this process has handed to its caller, per split: the budget check compares the
# training count with the tokens the timed steps trained on (print_summary).
tokens_served = {"train": 0, "val": 0}


def make_dataloader(tokenizer, batch_size, seq_len, split, prefetch=4, rank=0, world_size=1):
    """Infinite iterator of (inputs, targets, epoch): int32 numpy arrays [batch_size, seq_len], targets shifted by one.

    Tokenizing and packing run in a background thread a few batches ahead (tiktoken releases the GIL), so the
    loader overlaps the training step instead of adding to it. In a data-parallel run every rank packs the one
    stream of batches and keeps every world_size-th, starting at its rank: together the ranks read each batch of
    that stream exactly once, in the order one process would. A batch counts in `tokens_served` when it is handed
    over, not when the thread prepares it. Closing the iterator (or dropping it) stops and joins the thread, so that
    no thread is inside the tokenizer or the parquet reader while the process tears down."""
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
    try:
        while True:
            item = batches.get()
            if isinstance(item, BaseException):
                raise item
            tokens_served[split] += item[0].size
            yield item
    finally:  # closed or dropped: stop the producer (emptying the queue unblocks its put), give it 10 s to finish
        stop.set()
        deadline = time.time() + 10
        while producer.is_alive() and time.time() < deadline:
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.01)


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism: one experiment on several processes (Macs, GPUs), started by MLX's own launcher (`mlx.launch`:
# ring, JACCL, MPI or NCCL) or PyTorch's (`torchrun`: NCCL on GPUs, gloo on CPUs). Each rank trains on its share of
# every step's batch (make_dataloader), gradients are averaged before the optimizer step (the training script: MLX's
# nn.average_gradients, torch's DDP), and the harness keeps the ranks in lockstep: one clock, one stop decision, one
# evaluation, one summary. A plain run is rank 0 of 1 and never communicates.


def _launcher_rank():
    """This process's rank as the launcher announced it in the environment (0 when not launched)."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):  # mlx.launch (ring, JACCL, NCCL), mpirun
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if os.environ.get("RANK", "").isdigit() and "LOCAL_RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"])
    return 0


def _quiet_unless_rank_zero(rank):
    """Only rank 0 talks: the other ranks' stdout (harness line, progress, summary) goes nowhere, so a launched run
    prints one log. Errors still reach stderr from every rank."""
    if rank > 0 and sys.stdout is not None:
        sys.stdout = open(os.devnull, "w")


_quiet_unless_rank_zero(_launcher_rank())  # at import: before the script prints its first line


class Distributed:
    """This process's place in a data-parallel run: `rank` of `world_size` processes, `local_rank` (the GPU a torch
    rank uses: torchrun's LOCAL_RANK; 0 under MLX, whose launcher pins each rank's GPU itself), `group` (MLX's
    communication group, or None), and `gather`, the one collective the harness needs."""

    def __init__(self, rank=0, world_size=1, local_rank=0, group=None, all_gather=None):
        self.rank, self.world_size, self.local_rank, self.group = rank, world_size, local_rank, group
        self._all_gather = all_gather

    def gather(self, values):
        """Every rank's float64 `values` (the same length on each) as an array [world_size, n], identical on every
        rank. Exact: the collective moves bits and adds nothing, so the caller decides the order of any sum."""
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if self.world_size == 1:
            return values[None]
        return np.asarray(self._all_gather(values), dtype=np.float64).reshape(self.world_size, values.size)

    def agree(self, loss, step_time):
        """(the mean of the ranks' losses, rank 0's step time): the same two numbers on every rank, so all ranks
        follow one learning-rate schedule, fail fast together and stop after the same step."""
        if self.world_size == 1:
            return loss, step_time
        both = self.gather([loss, step_time])
        return float(both[:, 0].sum() / self.world_size), float(both[0, 1])


def distributed(backend="mlx"):
    """Join the data-parallel run this process was launched into and return its Distributed; in a plain run,
    Distributed() (rank 0 of 1) at no cost. backend: "mlx" (mx.distributed, as mlx.launch set it up) or "torch"
    (torch.distributed as torchrun set it up: NCCL when CUDA is available, else gloo; each rank on GPU LOCAL_RANK)."""
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
# Evaluation: bits per byte on exactly EVAL_TOKENS tokens of the pinned validation shard.


def _file_digest(path, length=12):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def val_rows_path():
    """Cache file of the validation rows, named by what determines them: tokenizer, validation shard, packing code,
    shape. So rows are never scored against another validation shard than the one in the cache."""
    tokenizer_id = _file_digest(os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), 8)
    val_name = SHARD_NAME.format(VAL_SHARD)
    val_id = shard_digest(val_name)[:8] if os.path.exists(os.path.join(DATA_DIR, val_name)) else "noval"
    code_id = _file_digest(os.path.abspath(__file__), 6)
    return os.path.join(EVAL_DIR, f"val_{tokenizer_id}_{val_id}_{code_id}_T{MAX_SEQ_LEN}_N{EVAL_TOKENS}.npy")


def _val_rows_problem(path):
    """Why the cached rows file cannot be used (None if it can): missing, truncated, or of the wrong shape."""
    if not os.path.exists(path):
        return "missing"
    try:
        rows = np.load(path)
    except Exception as e:
        return _first_line(e)
    if rows.shape != (EVAL_TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN + 1) or rows.dtype != np.uint16:
        return f"{rows.dtype} {rows.shape}"
    if rows.max(initial=0) >= VOCAB_SIZE:
        return "token ids out of range"
    return None


def load_val_rows(tokenizer=None):
    """The validation rows evaluate_bpb scores: uint16 [EVAL_TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN + 1], packed with the
    same best-fit packer from the start of the validation shard (cycling through it if it is shorter). Built once per
    tokenizer, validation shard and shape and cached, so evaluation time is model time; a damaged file is rebuilt."""
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


def check_cache():
    """Check, in well under a second, everything a run needs before it trains: the tokenizer and its byte table
    load, the training shards and the validation shard are there (parquet footers readable), and the validation rows
    load with the right shape (built now if missing or damaged: the build reads the validation shard, so its damage
    shows here too). Any problem is a HarnessError naming the file and the fix. Returns the tokenizer."""
    tokenizer = Tokenizer.load()
    get_token_bytes()
    for path in list_shards("train") + list_shards("val"):
        check_parquet(path)  # the footer only: milliseconds per shard
    load_val_rows(tokenizer)
    return tokenizer


def _is_torch_module(model):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def evaluate_bpb(model, batch_size, dist=SINGLE_PROCESS):
    """Validation bits per byte: the summed cross-entropy (nats) of every target token whose byte length is > 0,
    divided by ln 2 times the summed byte lengths of those tokens, over exactly EVAL_TOKENS target tokens.

    `model` maps int32 token ids [B, MAX_SEQ_LEN] to logits [B, MAX_SEQ_LEN, VOCAB_SIZE]: an MLX callable, or a
    torch.nn.Module (then the same computation runs in torch, on the module's device). The harness computes the loss
    itself: per-token losses in float32 on the device, summed in float64 on the host (a float32 running sum over
    millions of tokens would drift). So the model cannot change how it is scored, and the score is deterministic.

    In a data-parallel run (`dist`, every rank calls this) rank r scores batches r, r + world_size, ...; the float64
    sums of all batches are then gathered and added in batch order, as one process adds them: the same val_bpb,
    bit for bit, whatever the world size."""
    rows = load_val_rows()
    token_bytes = get_token_bytes()
    per_token_nats = _torch_token_losses if _is_torch_module(model) else _mlx_token_losses(model)
    starts = range(0, len(rows), batch_size)
    sums = np.zeros((len(starts), 2))  # per batch: nats, bytes (integers, exact in float64 below 2**53)
    progress, t0, total = ProgressLine(), time.time(), rows.shape[0] * (rows.shape[1] - 1)
    for index in range(dist.rank, len(starts), dist.world_size):
        block = rows[starts[index] : starts[index] + batch_size].astype(np.int32)
        nats = per_token_nats(model, block[:, :-1], block[:, 1:])
        nbytes = token_bytes[block[:, 1:]]
        sums[index] = float(nats[nbytes > 0].astype(np.float64).sum()), int(nbytes.sum())
        done = min(starts[index] + batch_size, len(rows)) * (rows.shape[1] - 1)  # all ranks move in step
        rate = done / max(time.time() - t0, 1e-9)
        progress.update(f"eval: {done:,}/{total:,} tokens | {rate:,.0f} tok/s | {(total - done) / rate:.0f}s left",
                        force=index + dist.world_size >= len(starts))
    progress.close()
    gathered = dist.gather(sums).reshape(dist.world_size, len(starts), 2)
    total_nats, total_bytes = 0.0, 0
    for index in range(len(starts)):
        batch_nats, batch_bytes = gathered[index % dist.world_size, index]  # from the rank that scored the batch
        total_nats += float(batch_nats)
        total_bytes += int(batch_bytes)
    return total_nats / (math.log(2) * total_bytes)


def _mlx_token_losses(model, on_gpu=None):
    """(model, inputs, targets) -> per-token nats as numpy: one compiled graph from token ids to losses on a GPU. On
    MLX's CPU backend logsumexp's V = 8192 exps per token cost more than the cpu preset's forward (mx.exp ~12 ns each,
    a fused polynomial ~4 ns), so there the graph ends at the logits minus their max, and numpy takes the exps (SIMD,
    ~0.6 ns each, measured): nats = max - target logit + log(sum exp(logits - max)). on_gpu: None = by MLX's device
    (the tests run both branches on the CPU)."""
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
# Run-time helpers for the training scripts: stopping rule, progress line, fast fail, MFU peak, summary, fingerprint.


def step_midpoint(training_time, step_times, window=5):
    """Where the next training step's middle will fall on the training clock: training_time plus half the median of
    the last `window` timed step times (nothing before the first). The training loops run a step only while this is
    before TIME_BUDGET, so a run ends at the step end nearest to the budget (training_seconds within half a step of
    TIME_BUDGET, either way), and give each step the learning rate of its middle. Every rank of a data-parallel run
    has the same step times (Distributed.agree), so all stop after the same step."""
    return training_time + (float(np.median(step_times[-window:])) / 2 if step_times else 0.0)


class ProgressLine:
    """One progress line rewritten in place on a terminal (cut to its width: a wrapped line cannot be rewritten);
    when stdout is a file (run.log), a line at most every `interval` seconds (evaluation: 5, so logs stay small;
    training: 0, one line per step, the loss curve)."""

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


def check_loss(loss, step):
    """Fast fail: end the run at once, with status 1, when the training loss is NaN/inf or above 100. `step` is the
    0-based index of the step just run; the message counts from 1, like the progress line."""
    if not math.isfinite(loss) or loss > 100:
        print(
            f"\nFAIL: training diverged at step {step + 1} (loss {loss}). No val_bpb for this run. "
            f"Lower the learning rate, lengthen warmup, or revert the last change.",
            flush=True,
        )
        sys.exit(1)


# Dense peak throughput per device and dtype, FLOP/s, from vendor datasheets (tensor cores, no sparsity). Devices not
# listed (Apple GPUs, CPUs, other GPUs) are measured instead: the best large-matmul throughput, recorded by --calibrate.
PEAK_FLOPS = {
    ("NVIDIA H100", "bfloat16"): 989.4e12,  # H100 SXM; the PCIe card is 756 TFLOP/s (matched first below)
    ("NVIDIA H100 PCIe", "bfloat16"): 756.0e12,
    ("NVIDIA H200", "bfloat16"): 989.4e12,
    ("NVIDIA A100", "bfloat16"): 312.0e12,
    ("NVIDIA H100", "float32"): 494.7e12,  # TF32 tensor cores, which float32 matmuls use when allowed
    ("NVIDIA H200", "float32"): 494.7e12,
    ("NVIDIA A100", "float32"): 156.0e12,
}


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
    run()
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


CALIBRATE_COMMAND = f"{PREPARE_COMMAND} --calibrate"
CALIBRATION_PATH = os.path.join(CACHE_DIR, "calibration.json")  # this machine's figures, written by --calibrate only


def calibration_key(kind, backend, device_name, dtype=""):
    return f"{kind}|{backend}|{device_name}|{dtype}|{os.path.basename(FAST_BLAS or 'bundled')}"


def read_calibration(path=None):
    """{key: figure} recorded by --calibrate on this machine ({} when there is none or it is unreadable); `path`:
    another file of figures in that format (machine_speed.json)."""
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
    """Add figures measured by --calibrate (on a quiet machine) to calibration.json. Training runs never write it: a
    figure measured while another process or rank competes for the machine would skew every later run."""
    _write_atomic(CALIBRATION_PATH, lambda f: json.dump({**read_calibration(), **figures}, f, indent=1), "w")


def peak_flops(device_name, dtype, backend="mlx"):
    """(peak FLOP/s, source) for MFU: the datasheet figure for known GPUs, else the matmul rate --calibrate recorded
    for this device, dtype and BLAS, so that `mfu_percent` is comparable between runs; without one, a rate measured
    now (under whatever else is running) and said so. The source string says which figure was used."""
    for (name, kind), flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0][0])):
        if kind == dtype and device_name.startswith(name):
            return flops, "datasheet"
    rate = read_calibration().get(calibration_key("matmul", backend, device_name, dtype))
    if rate:
        return rate, f"calibrated, {CALIBRATION_PATH}"
    return _measure_matmul_flops(backend, dtype), f"measured this run, not calibrated: run `{CALIBRATE_COMMAND}`"


# Machine speed: a fixed probe (a 1024 x 1024 matmul and 2^22 exps: the BLAS and element-wise work a step does)
# timed before training and after evaluation, against this machine's reference: the fastest probe it has shown, per
# device and BLAS (--calibrate's best of 5 in calibration.json, or any run's in machine_speed.json beside it). A laptop
# that throttles or a neighbour on a shared machine shows here, so a run that was slow is rerun rather than decided on.
# The rule: a run whose best probe (start or end) beats the reference first raises it to that probe, then is scored
# against it, so machine_speed is at most 1.00 and says how far this run fell below the best this machine has done.
# Load only ever slows a probe, so a busy moment can never lower the reference: a calibration taken under load is
# repaired by the first quiet run (which reads ~1.00), and a run under load against a quiet reference reads below
# SLOW_MACHINE and warns. A fresh cache's first run starts the reference (its slower probe can still warn).
PROBE_TIMES = {}  # "start", "end": this run's median probe seconds
SLOW_MACHINE = 0.9  # a run whose machine_speed falls below this prints a warning
# --calibrate refuses to record on a machine that is clearly busy (see busy_reason): other processes kept more than
# BUSY_CPU_SHARE of the cores busy while it probed (Linux's /proc/stat), or, where that cannot be read, the 1-minute
# load average exceeded BUSY_LOAD_PER_CORE per core; or its 5 probes spread by more than BUSY_SPREAD (slowest over
# fastest); or its best probe would read below SLOW_MACHINE against the reference.
BUSY_CPU_SHARE = 0.25
BUSY_LOAD_PER_CORE = 0.5
BUSY_SPREAD = 1.3


def _backend():
    return "torch" if os.environ.get("AUTORESEARCH_BACKEND") == "torch" else "mlx"


def probe_device_name(backend):
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import mlx.core as mx

    return mx.device_info().get("device_name", str(mx.default_device()))


def probe_seconds(backend, seconds=0.5):
    """Median seconds of the probe over about `seconds` (at least 5 repeats; the median of 5 spread 4% on a quiet
    2-core VM, a smaller probe 7-15%)."""
    if backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device).manual_seed(0)  # its own generator: the run's random stream is untouched
        a, b = (torch.randn(shape, device=device, generator=gen) for shape in ((1024, 1024), (1 << 22,)))
        run = lambda: ((a @ a).sum() + b.exp().sum()).item()  # noqa: E731
    else:
        import mlx.core as mx

        key = mx.random.key(0)  # its own key: the run's random stream is untouched
        a, b = mx.random.normal((1024, 1024), key=key), mx.random.normal((1 << 22,), key=key)
        run = lambda: mx.eval(a @ a, mx.exp(b))  # noqa: E731
    run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def probe_machine_speed(dist=SINGLE_PROCESS, when="start"):
    """Time the probe now (outside the time budget). The training scripts call it before their loop; print_summary
    calls it again at the end. Skipped in a data-parallel run, whose ranks would time each other."""
    if dist.world_size == 1:
        PROBE_TIMES[when] = probe_seconds(_backend())


def machine_speed_path():
    """machine_speed.json, beside calibration.json: {probe key: the fastest probe seconds a run has shown}."""
    return os.path.join(os.path.dirname(CALIBRATION_PATH), "machine_speed.json")


def probe_key(backend):
    return calibration_key("probe", backend, probe_device_name(backend))


def probe_reference(key):
    """The reference probe seconds for `key`: the fastest this machine has shown (calibrated or a run's), or None."""
    figures = [read_calibration(path).get(key) for path in (CALIBRATION_PATH, machine_speed_path())]
    return min((figure for figure in figures if figure), default=None)


def raise_probe_reference(key, seconds):
    """Make `seconds` the reference for `key` if it beats the one recorded (or there is none); returns the reference
    before (None: there was none). A read-modify-write under a lock file, written atomically: concurrent runs never
    lose each other's figures, and a reader sees the old file or the new one. Where locking fails (a network disk),
    a lost race can only keep a slightly slower figure, never corrupt the file."""
    path = machine_speed_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except (ImportError, OSError):
            pass
        before = probe_reference(key)
        if before is None or seconds < before:
            figures = {**read_calibration(path), key: seconds}
            _write_atomic(path, lambda f: json.dump(figures, f, indent=1, sort_keys=True), "w")
    return before


def _cpu_seconds():
    """(busy seconds of all cores together, this process's CPU seconds) from Linux's /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(field) for field in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 5:
        return None
    own = os.times()
    busy = sum(ticks) - ticks[3] - ticks[4]  # user nice system [idle iowait] irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def probe_repeats(backend, repeats=5):
    """`repeats` probe times (seconds, each probe_seconds) and the share of the machine's cores that other processes
    (and, in a VM, its host: steal time) kept busy meanwhile; the share is None where /proc/stat is missing."""
    before, t0 = _cpu_seconds(), time.perf_counter()
    times = [probe_seconds(backend) for _ in range(repeats)]
    after, wall = _cpu_seconds(), time.perf_counter() - t0
    if before is None or after is None:
        return times, None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return times, max(0.0, others / (wall * (os.cpu_count() or 1)))


def busy_reason(times, others_share=None, load=None, reference=None):
    """Why --calibrate's probes (`times`, seconds) were taken on a busy machine, or None when it looked quiet. `load`:
    the 1-minute load average before probing, used only where `others_share` could not be measured (it lags by a
    minute); `reference`: the probe reference recorded before (see probe_reference)."""
    cores, best = os.cpu_count() or 1, min(times)
    reasons = []
    if others_share is not None and others_share > BUSY_CPU_SHARE:
        reasons.append(f"other processes used {others_share:.0%} of the {cores} cores while it probed")
    elif others_share is None and load is not None and load > BUSY_LOAD_PER_CORE * cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    if max(times) > BUSY_SPREAD * best:
        reasons.append(f"its {len(times)} probes spread {1000 * best:.1f}-{1000 * max(times):.1f} ms")
    if reference and reference / best < SLOW_MACHINE:
        reasons.append(f"its best probe {1000 * best:.1f} ms is {best / reference:.2f}x this machine's reference "
                       f"{1000 * reference:.1f} ms")
    return "; ".join(reasons) or None


def machine_speed():
    """(summary value, warning line or None) from the probe times against the reference (the rule above; a faster
    run raises it first): 1.00 = as fast as this machine has shown."""
    if "start" not in PROBE_TIMES or "end" not in PROBE_TIMES:
        return "n/a (a data-parallel run, or the script does not call probe_machine_speed)", None
    key, best = probe_key(_backend()), min(PROBE_TIMES["start"], PROBE_TIMES["end"])
    try:
        before = raise_probe_reference(key, best)
        note = ("; reference started by this run" if before is None else
                f"; reference raised by this run from {1000 * before:.1f} ms" if best < before else "")
    except OSError as e:  # a read-only or full cache: the summary still comes, scored against what is recorded
        before = probe_reference(key)
        note = f"; reference not saved: {e.strerror or e}"
    reference = best if before is None else min(before, best)
    start, end = (reference / PROBE_TIMES[when] for when in ("start", "end"))
    value = f"{(start + end) / 2:.2f} (start {start:.2f}, end {end:.2f}{note})"
    if min(start, end) >= SLOW_MACHINE:
        return value, None
    return value, (f"warning: the machine ran {1 - min(start, end):.0%} slower than its reference, the fastest probe "
                   f"it has shown ({1000 * reference:.1f} ms; machine_speed start {start:.2f}, end {end:.2f}): this "
                   f"val_bpb is not comparable; rerun before deciding")


def warn_if_evaluation_is_long(step_times, tokens_per_step, forward_speedup=2.5):
    """After the second timed step, estimate evaluation from the measured step time (a forward pass runs at least
    `forward_speedup` times the training step's tokens/s: measured 2.5x on the CPU, ~3x by FLOPs) and print a warning
    when it would take more than a quarter of TIME_BUDGET, naming a smaller preset."""
    if len(step_times) != 2:
        return
    seconds = EVAL_TOKENS / (forward_speedup * tokens_per_step / float(np.median(step_times)))
    if seconds > TIME_BUDGET / 4:
        choice = device_preset()[0]
        smaller = choice if choice != PRESET_NAME else {"default": "mac", "mac": "local"}.get(PRESET_NAME, "cpu")
        print(f"\nwarning: evaluation will take about {seconds:.0f}s ({EVAL_TOKENS:,} tokens), more than a quarter of "
              f"TIME_BUDGET={TIME_BUDGET}s on this machine: a smaller preset fits it better "
              f"(AUTORESEARCH_MLX_PRESET_FILE={smaller}; `{CALIBRATE_COMMAND}` measures each)", flush=True)


HARNESS_FILES = ("prepare.py", "prepare_mlx_mamba_3.py")


def harness_fingerprint(world_size=1):
    """A short hash of everything that defines the score: the harness source, the active preset, the tokenizer, the
    validation rows, and the number of processes (N data-parallel processes train on N times the tokens in the same
    budget). Two runs with the same fingerprint were scored the same way."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [os.path.join(here, name) for name in HARNESS_FILES]
    parts += [PRESET_FILE, os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), os.path.join(TOKENIZER_DIR, "token_bytes.npy")]
    parts += [val_rows_path()]
    digest = hashlib.sha256(f"{MAX_SEQ_LEN}|{TIME_BUDGET}|{EVAL_TOKENS}|{VOCAB_SIZE}|{world_size}".encode())
    for path in parts:
        digest.update(_file_digest(path, 64).encode() if os.path.exists(path) else b"missing:" + path.encode())
    return digest.hexdigest()[:12]


def budget_check(trained_tokens, dist=SINGLE_PROCESS):
    """`ok` when the training loaders of all ranks together served exactly `trained_tokens` (the global tokens of
    every training step, num_steps * TOTAL_BATCH_SIZE), each rank its equal share; else what went wrong. A batch
    read anywhere else (statistics before the clock starts, a second loader, a warm start) breaks the match: all
    use of training data must happen inside the timed steps. Every rank calls it."""
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


def print_summary(fields, trained_tokens=None, dist=SINGLE_PROCESS):
    """The run summary the agent greps: `---` then one `key: value` per line, in order, then world_size, machine_speed
    (see machine_speed; its warning line, if any, comes just before `---`), the budget check (see budget_check) and
    the harness line. In a data-parallel run every rank calls it; rank 0 prints."""
    check = budget_check(trained_tokens, dist)
    probe_machine_speed(dist, "end")
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


# ---------------------------------------------------------------------------------------------------------------------
# Preparation entry point.


def prepare(num_shards=None, download_workers=8, data_dir=None, endpoint=None):
    """Make the cache ready: data shards, tokenizer, validation rows. Idempotent: each finished step is skipped."""
    print(harness_line())
    t0 = time.time()
    if data_dir is not None:
        n_train, available, copied = import_local_corpus(data_dir, num_shards)
        chosen_by = f"--num-shards {num_shards}" if num_shards else f"NUM_SHARDS={NUM_SHARDS}; --num-shards N for more"
        some = "" if n_train == available else f" (the first {n_train} of its {available} training files: {chosen_by})"
        print(f"data: {n_train} training shards{some} + validation from {data_dir} -> {DATA_DIR} "
              f"({copied} files copied)")
    else:
        _check_num_shards(num_shards)
        n_train = num_shards or NUM_SHARDS
        indices = list(range(n_train)) + [VAL_SHARD]
        source = f"huggingface:{DATASET_REPO}"
        previous = (_read_manifest() or {}).get("source")
        if previous not in (None, source):
            _check_hub_reachable(endpoint)  # before removing another source's shards: offline, keep them
        os.makedirs(DATA_DIR, exist_ok=True)
        manifest = _forget_stale_shards(source, {SHARD_NAME.format(i): None for i in indices}, exact=False)
        _write_manifest(manifest)
        fetched = download_shards(indices, download_workers, endpoint)
        print(f"data: {n_train} training shards + validation shard {VAL_SHARD} in {DATA_DIR} ({fetched} downloaded)")
    problem = _tokenizer_problem()
    if problem is None:
        print(f"tokenizer: already trained, {TOKENIZER_DIR}")
    else:
        if problem != "missing":
            print(f"tokenizer: {problem}; training it again", flush=True)
        t = time.time()
        train_tokenizer()
        print(f"tokenizer: trained BPE ({VOCAB_SIZE} tokens) in {time.time() - t:.1f}s -> {TOKENIZER_DIR}")
    t = time.time()
    existed = _val_rows_problem(val_rows_path()) is None
    rows = load_val_rows()
    status = "cached" if existed else f"built in {time.time() - t:.1f}s"
    print(f"eval: {rows.shape[0]} validation rows x {MAX_SEQ_LEN} tokens ({status}) -> {val_rows_path()}")
    print(f"ready in {time.time() - t0:.1f}s; cache: {CACHE_DIR}")


def _tokenizer_problem():
    """None when tokenizer.pkl and token_bytes.npy load and fit VOCAB_SIZE; "missing" when neither is there; else
    what is wrong (prepare then trains the tokenizer again instead of saying it is already trained)."""
    files = [os.path.join(TOKENIZER_DIR, name) for name in ("tokenizer.pkl", "token_bytes.npy")]
    if not any(os.path.exists(path) for path in files):
        return "missing"
    try:
        Tokenizer.load()
        get_token_bytes()
    except HarnessError as e:
        return e.message.split(" Rerun `")[0].split(" Run `")[0].rstrip(".")  # the diagnosis, not "rerun prepare"
    return None


def make_parser(description):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--num-shards", type=int, default=None,
                        help=f"training shards to download, or to import from --data-dir (default {NUM_SHARDS}, "
                             f"from the preset; at most the folder's files)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--data-dir", default=None,
                        help="prepare offline from a folder of parquet files with a 'text' column and val.parquet")
    return parser


def main():
    args = make_parser("Prepare data, tokenizer and evaluation rows for autoresearch-mamba.").parse_args()
    prepare(args.num_shards, args.download_workers, args.data_dir)


if __name__ == "__main__":
    run(main)
