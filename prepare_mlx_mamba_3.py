"""
Setup, the fixed harness's entry point: prepare data, tokenizer and evaluation rows, size the training scripts for the
active preset, then say how to train. prepare.py holds what a training run uses; this file what only setup needs:
the download (retries, no-network detection), the offline import, tokenizer training, sizing, and --calibrate. Both
files are the harness (its fingerprint hashes both).

    uv run prepare_mlx_mamba_3.py [--architecture {mamba-2,mamba-3,hybrid}] [--num-shards N]
                                  [--download-workers W] [--data-dir DIR] [--keep-scripts]
    uv run prepare_mlx_mamba_3.py --calibrate      # measure this machine at the active preset (after preparing)

Sizing writes the active preset's section of each training script into that script's constant lines (and
--architecture into ARCHITECTURE), printing every change: the constants a reader sees are the values a run trains
with, and `git diff` shows what setup changed. --keep-scripts leaves the scripts as they are.
"""

import ast
import errno
import glob
import json
import os
import pickle
import re
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


# ---------------------------------------------------------------------------------------------------------------------
# Preparing the cache, in the order it is built: data, tokenizer, validation rows, holdout rows.


def prepare_cache(num_shards=None, download_workers=8, data_dir=None, endpoint=None):
    """Make the cache ready: data shards, tokenizer, validation and holdout rows. Idempotent: each finished step is
    skipped."""
    print(prepare.harness_line())
    t0 = time.time()
    if data_dir is not None:
        n_train, available, copied = import_local_corpus(data_dir, num_shards)
        chosen_by = (f"--num-shards {num_shards}" if num_shards else
                     f"NUM_SHARDS={prepare.NUM_SHARDS}; --num-shards N for more")
        some = "" if n_train == available else f" (the first {n_train} of its {available} training files: {chosen_by})"
        print(f"data: {n_train} training shards{some} + validation from {data_dir} -> {prepare.DATA_DIR} "
              f"({copied} files copied)")
    else:
        _check_num_shards(num_shards)
        n_train = num_shards or prepare.NUM_SHARDS
        indices = list(range(n_train)) + [prepare.VAL_SHARD]
        source = f"huggingface:{prepare.DATASET_REPO}"
        previous = (prepare._read_manifest() or {}).get("source")
        if previous not in (None, source):
            _check_hub_reachable(endpoint)  # before removing another source's shards: offline, keep them
        os.makedirs(prepare.DATA_DIR, exist_ok=True)
        manifest = _forget_stale_shards(source, {prepare.SHARD_NAME.format(i): None for i in indices}, exact=False)
        prepare._write_manifest(manifest)
        fetched = download_shards(indices, download_workers, endpoint)
        print(f"data: {n_train} training shards + validation shard {prepare.VAL_SHARD} in {prepare.DATA_DIR} "
              f"({fetched} downloaded)")
    problem = _tokenizer_problem()
    if problem is None:
        print(f"tokenizer: already trained, {prepare.TOKENIZER_DIR}")
    else:
        if problem != "missing":
            print(f"tokenizer: {problem}; training it again", flush=True)
        t = time.time()
        train_tokenizer()
        print(f"tokenizer: trained BPE ({prepare.VOCAB_SIZE} tokens) in {time.time() - t:.1f}s -> "
              f"{prepare.TOKENIZER_DIR}")
    t = time.time()
    existed = prepare._val_rows_problem(prepare.val_rows_path()) is None
    rows = prepare.load_val_rows()
    status = "cached" if existed else f"built in {time.time() - t:.1f}s"
    print(f"eval: {rows.shape[0]} validation rows x {prepare.MAX_SEQ_LEN} tokens ({status}) -> "
          f"{prepare.val_rows_path()}")
    t, path = time.time(), prepare.val_rows_path("holdout")
    existed = prepare._val_rows_problem(path, (0, prepare.HOLDOUT_ROWS)) is None
    rows = prepare.load_holdout_rows()
    status = "present" if existed else f"built in {time.time() - t:.1f}s"
    if len(rows):
        print(f"eval: {len(rows)} holdout rows x {prepare.MAX_SEQ_LEN} tokens from validation documents the validation "
              f"rows do not use ({status}) -> {path}; each run records its score in {prepare.HOLDOUT_PATH}")
    else:
        print(f"eval: no holdout rows ({status}: the validation shard is too short, see above) -> {path}")
    print(f"ready in {time.time() - t0:.1f}s; cache: {prepare.CACHE_DIR}")


def _tokenizer_problem():
    """None when tokenizer.pkl and token_bytes.npy load and fit VOCAB_SIZE; "missing" when neither is there; else
    what is wrong (prepare then trains the tokenizer again instead of saying it is already trained)."""
    files = [os.path.join(prepare.TOKENIZER_DIR, name) for name in ("tokenizer.pkl", "token_bytes.npy")]
    if not any(os.path.exists(path) for path in files):
        return "missing"
    try:
        prepare.Tokenizer.load()
        prepare.get_token_bytes()
    except prepare.HarnessError as e:
        return e.message.split(" Rerun `")[0].split(" Run `")[0].rstrip(".")  # the diagnosis, not "rerun prepare"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The data: climbmix shards from the Hugging Face hub, or an offline folder of parquet files (--data-dir). The cache
# never mixes shards of two sources (the data manifest, prepare.py).


OFFLINE_HINT = (f"Prepare offline instead: `{prepare.PREPARE_COMMAND} --data-dir DIR` "
                f"(DIR: parquet files + val.parquet).")


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
        raise prepare.HarnessError(f"HF_HUB_OFFLINE is set, so the data cannot be downloaded. {OFFLINE_HINT}")
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                              "all_proxy")):
        return  # connections go through a proxy: only the download itself can tell
    url = urlsplit(endpoint or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        reason = _no_network_reason(e)
        if reason:
            raise prepare.HarnessError(f"Cannot reach {url.hostname} ({reason}): no network? {OFFLINE_HINT}") from None


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
    os.makedirs(prepare.DATA_DIR, exist_ok=True)
    missing = []
    for i in indices:
        if os.path.exists(prepare.shard_path(i)):
            try:
                prepare.check_parquet(prepare.shard_path(i))
                continue
            except prepare.HarnessError as e:
                print(f"  {prepare.SHARD_NAME.format(i)}: {e}; fetching it again", flush=True)
                os.remove(prepare.shard_path(i))
        missing.append(i)
    if not missing:
        return 0
    _check_hub_reachable(endpoint)

    def fetch(index):
        name = prepare.SHARD_NAME.format(index)
        for attempt in range(1, attempts + 1):
            try:
                hf_hub_download(prepare.DATASET_REPO, name, repo_type="dataset", local_dir=prepare.DATA_DIR,
                                endpoint=endpoint, revision="main")
                prepare.check_parquet(prepare.shard_path(index))
                return
            except (Exception, prepare.HarnessError) as e:  # network errors, HTTP 5xx, a corrupt download
                if os.path.exists(prepare.shard_path(index)):
                    os.remove(prepare.shard_path(index))  # only a verified shard may look complete
                if isinstance(e, OSError) and e.errno in prepare.DISK_ERRNOS:
                    raise  # a full or read-only disk: retrying cannot help (run() reports it)
                no_network = _no_network_reason(e)
                if no_network:
                    raise prepare.HarnessError(f"Download of {name} failed ({no_network}): no network? "
                                               f"{OFFLINE_HINT}") from None
                reason = prepare._first_line(e)
                if attempt == attempts:
                    raise prepare.HarnessError(
                        f"Download of {name} failed after {attempts} attempts ({reason}). Check the network and rerun "
                        f"{prepare.PREPARE_COMMAND} (finished shards are kept), or prepare offline with --data-dir DIR."
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


def _check_num_shards(num_shards, available=prepare.VAL_SHARD, where=""):
    if num_shards is not None and not 1 <= num_shards <= available:
        raise prepare.HarnessError(f"--num-shards must be between 1 and {available}{where}, got {num_shards}.")


def import_local_corpus(source_dir, num_shards=None):
    """Prepare DATA_DIR from a local folder: every *.parquet except val.parquet becomes a training shard (in sorted
    order), val.parquet becomes the pinned validation shard. The cache then holds exactly these files: shards already
    there with the same content are kept, others (another folder's, a damaged copy) are replaced, and what was built
    from replaced shards goes too (see _forget_stale_shards). Only the first `num_shards` training files (default
    NUM_SHARDS, at most all) are imported. Returns (training shards imported, training files in the folder, files
    copied)."""
    source_dir = os.path.expanduser(source_dir)
    if not os.path.isdir(source_dir):
        raise prepare.HarnessError(f"--data-dir {source_dir}: no such directory.")
    val_file = os.path.join(source_dir, "val.parquet")
    if not os.path.isfile(val_file):
        raise prepare.HarnessError(
            f"--data-dir {source_dir}: no val.parquet. The folder needs training parquet files and the validation "
            f"split as val.parquet (each with a 'text' column)."
        )
    train_files = sorted(
        f for f in glob.glob(os.path.join(source_dir, "*.parquet")) if os.path.basename(f) != "val.parquet"
    )
    if not train_files:
        raise prepare.HarnessError(f"--data-dir {source_dir}: no training parquet files besides val.parquet.")
    available = len(train_files)
    _check_num_shards(num_shards, available, f" (the training files in {source_dir})")
    train_files = train_files[:num_shards or prepare.NUM_SHARDS]  # the preset's NUM_SHARDS by default, as for downloads
    if len(train_files) > prepare.VAL_SHARD:
        raise prepare.HarnessError(f"--data-dir {source_dir}: at most {prepare.VAL_SHARD} training files are "
                                   f"supported.")
    sources = [(f, prepare.SHARD_NAME.format(i)) for i, f in enumerate(train_files)]
    sources.append((val_file, prepare.SHARD_NAME.format(prepare.VAL_SHARD)))
    fix = f"Replace it in {source_dir} with a good copy (or move it out of that folder), then rerun with --data-dir."
    for src, _ in sources:
        prepare.check_parquet(src, fix)
    wanted = {name: prepare._file_digest(src, 64) for src, name in sources}
    os.makedirs(prepare.DATA_DIR, exist_ok=True)
    manifest = _forget_stale_shards(os.path.realpath(source_dir), wanted, exact=True)
    copied = 0
    for src, name in sources:
        if not os.path.exists(os.path.join(prepare.DATA_DIR, name)):
            _copy_atomic(src, os.path.join(prepare.DATA_DIR, name))
            copied += 1
        manifest["files"][name] = prepare._manifest_entry(name, wanted[name])
    prepare._write_manifest(manifest)
    return len(train_files), available, copied


def _copy_atomic(src, dst):
    def copy(fout):
        with open(src, "rb") as fin:
            while chunk := fin.read(1 << 22):
                fout.write(chunk)

    prepare._write_atomic(dst, copy)


def _forget_stale_shards(source, wanted, exact):
    """Make sure the cache never mixes shards of two sources. `wanted`: {shard name: sha256, or None when unknown
    before download (hub shards, immutable by name)}; `exact`: shards not wanted are stale too (a folder import
    mirrors its folder; the hub keeps extra downloaded shards). A stale shard is removed; if a training shard was
    stale, the tokenizer trained on it goes too, and with any stale shard the validation rows go. Returns the
    manifest to complete with the new shards."""
    manifest = prepare._read_manifest()
    previous = manifest["source"] if manifest and "source" in manifest else None
    from_elsewhere = previous is not None and previous != source
    stale = []
    for path in sorted(glob.glob(os.path.join(prepare.DATA_DIR, "shard_*.parquet"))):
        name = os.path.basename(path)
        if name not in wanted:
            is_stale = exact or from_elsewhere
        elif wanted[name] is None:
            is_stale = from_elsewhere
        else:
            is_stale = prepare.shard_digest(name, manifest) != wanted[name]
        if is_stale:
            stale.append(name)
    if stale:
        val_name = prepare.SHARD_NAME.format(prepare.VAL_SHARD)
        derived = glob.glob(os.path.join(prepare.EVAL_DIR, "val_*.npy"))
        derived += glob.glob(os.path.join(prepare.HOLDOUT_DIR, "holdout_*.npy"))
        if any(name != val_name for name in stale):
            derived += [os.path.join(prepare.TOKENIZER_DIR, name) for name in ("tokenizer.pkl", "token_bytes.npy")]
        for path in [os.path.join(prepare.DATA_DIR, name) for name in stale] + derived:
            if os.path.exists(path):
                os.remove(path)
        gone = "the tokenizer and " if any(name != val_name for name in stale) else ""
        print(f"data: {len(stale)} cached shard(s) differ from {source} (they came from "
              f"{previous or 'an unrecorded source'}): removed them, {gone}the validation and holdout rows built from "
              f"them; rebuilding", flush=True)
    files = {} if from_elsewhere or manifest is None else manifest["files"]
    return {"source": source, "files": {name: entry for name, entry in files.items() if name not in stale}}


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer: BPE trained with rustbpe on training documents only, used through tiktoken (prepare.Tokenizer).


def _training_texts(char_budget):
    """Training documents for the tokenizer, each capped, until the character budget or one pass over the shards."""
    used = 0
    for texts, epoch in prepare.iter_texts("train"):
        if epoch > 1:
            return
        for text in texts:
            text = text[:prepare.TOKENIZER_DOC_CHARS]
            yield text
            used += len(text)
            if used >= char_budget:
                return


def train_tokenizer(char_budget=prepare.TOKENIZER_TRAIN_CHARS):
    """Train the BPE on training documents only and save tokenizer.pkl and token_bytes.npy (atomically)."""
    import numpy as np
    import rustbpe
    import tiktoken

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_texts(char_budget), prepare.VOCAB_SIZE - len(prepare.SPECIAL_TOKENS),
                            pattern=prepare.SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != prepare.VOCAB_SIZE - len(prepare.SPECIAL_TOKENS):
        raise prepare.HarnessError(
            f"Tokenizer training produced {len(ranks)} tokens instead of "
            f"{prepare.VOCAB_SIZE - len(prepare.SPECIAL_TOKENS)}: the training data is too small or too repetitive. "
            f"Prepare more shards."
        )
    specials = {name: len(ranks) + i for i, name in enumerate(prepare.SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                                 special_tokens=specials)
    token_bytes = np.zeros(prepare.VOCAB_SIZE, dtype=np.int32)  # special tokens keep 0: they are not scored
    for token, rank in ranks.items():
        token_bytes[rank] = len(token)
    # tokenizer.pkl last: its presence is what says "tokenizer ready"
    prepare._write_atomic(os.path.join(prepare.TOKENIZER_DIR, "token_bytes.npy"), lambda f: np.save(f, token_bytes))
    prepare._write_atomic(os.path.join(prepare.TOKENIZER_DIR, "tokenizer.pkl"), lambda f: pickle.dump(encoding, f))
    return encoding


# ---------------------------------------------------------------------------------------------------------------------
# Sizing the training scripts for the active preset.


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


# --calibrate refuses to record on a machine that is clearly busy (see busy_reason): other processes kept more than
# BUSY_CPU_SHARE of the cores busy while it probed (Linux's /proc/stat), or, where that cannot be read, the 1-minute
# load average exceeded BUSY_LOAD_PER_CORE per core; or its 5 probes spread by more than BUSY_SPREAD (slowest over
# fastest).
BUSY_CPU_SHARE = 0.25
BUSY_LOAD_PER_CORE = 0.5
BUSY_SPREAD = 1.3


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
    times = [prepare.probe_seconds(backend) for _ in range(repeats)]
    after, wall = _cpu_seconds(), time.perf_counter() - t0
    if before is None or after is None:
        return times, None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return times, max(0.0, others / (wall * (os.cpu_count() or 1)))


def busy_reason(times, others_share=None, load=None):
    """Why --calibrate's probes (`times`, seconds) were taken on a busy machine, or None when it looked quiet. `load`:
    the 1-minute load average before probing, used only where `others_share` could not be measured (it lags by a
    minute)."""
    cores, best = os.cpu_count() or 1, min(times)
    reasons = []
    if others_share is not None and others_share > BUSY_CPU_SHARE:
        reasons.append(f"other processes used {others_share:.0%} of the {cores} cores while it probed")
    elif others_share is None and load is not None and load > BUSY_LOAD_PER_CORE * cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    if max(times) > BUSY_SPREAD * best:
        reasons.append(f"its {len(times)} probes spread {1000 * best:.1f}-{1000 * max(times):.1f} ms")
    return "; ".join(reasons) or None


def record_machine_figures(force=False):
    """Check that the machine is quiet (5 probes, busy_reason), measure the matmul peak (the dtype the scripts compute
    in here) and record it. On a clearly busy machine it refuses, one line and nothing recorded, unless `force`."""
    import mlx.core as mx

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before probing: the probes raise it
    times, others_share = probe_repeats("mlx")
    busy = busy_reason(times, others_share, load)
    if busy and not force:
        raise prepare.HarnessError(f"calibrate: this machine is busy ({busy}): wait until it is quiet and rerun, or "
                                   f"pass --force to record anyway. Nothing was recorded.")
    if busy:
        print(f"calibrate: recording on a busy machine (--force): {busy}")
    name = mx.device_info().get("device_name", str(mx.default_device()))
    dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"  # COMPUTE_DTYPE "auto"
    peak = prepare._measure_matmul_flops("mlx", dtype)
    prepare.record_calibration({prepare.calibration_key("matmul", "mlx", name, dtype): peak})
    print(f"calibrate: {name}: matmul {peak / 1e9:,.0f} GFLOP/s ({dtype}) -> {prepare.CALIBRATION_PATH}")


def pooled_reference(reference, runs):
    """The reference at which the calibration runs' probes, together, read 1.00 on average: `runs` holds each run's
    (probes, machine_speed against `reference`), and a speed is a mean of reference / seconds."""
    probes = sum(n for n, _ in runs)
    return reference * probes / sum(n * speed for n, speed in runs)


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


PRESET_SIZE_DEFAULTS = ("MAX_SEQ_LEN", "EVAL_TOKENS")  # prepare.py's values, where a preset names none


def _preset_cost(path, script):
    """(evaluation cost, memory) of a preset file for `script`, up to a constant factor: tokens scored times width^2 x
    depth, and rows x sequence x width x depth. What decides whether it fits a machine."""
    with open(prepare.__file__) as f:
        harness = {node.targets[0].id: eval(ast.unparse(node.value), {}) for node in ast.parse(f.read()).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in PRESET_SIZE_DEFAULTS}
    preset = prepare.load_preset(path)
    values = {**harness, **preset["prepare"], **preset[script]}  # the harness's defaults where a preset names none
    depth = len(values["HYBRID_PATTERN"]) if "HYBRID_PATTERN" in values else values["DEPTH"]
    width = values["D_MODEL"] * depth * values.get("EXPAND", 1)
    rows = values["DEVICE_BATCH_SIZE"] * values["MAX_SEQ_LEN"]
    return values["EVAL_TOKENS"] * values["D_MODEL"] * width, rows * width


def smaller_presets(script):
    """The shipped presets, largest first, that cost less than the active one for `script` on both counts."""
    this = _preset_cost(prepare.PRESET_FILE, script)
    costs = {name: _preset_cost(os.path.join(prepare.PRESETS_DIR, name + ".json"), script)
             for name in ("default", "mac", "local", "cpu")}
    return [name for name, cost in costs.items() if cost != this and all(a <= b for a, b in zip(cost, this))]


def calibrate(force=False):
    """Print this machine's table at the active preset: tokens/s, MFU, optimizer steps in TIME_BUDGET, evaluation
    seconds at EVAL_TOKENS, peak memory against the device's, machine speed; then, per architecture, whether the
    preset fits and which smaller one to take where it does not. Its runs' probes set the machine-speed reference."""
    prepare.check_cache()  # the runs need the prepared data: fail here, in one line, if it is not there
    record_machine_figures(force)  # a busy machine ends here, before the runs
    key = prepare.probe_key("mlx")
    prepare.set_probe_reference(key, None, replace=True)  # the first run below starts it; all of them set it
    memory, memory_kind = device_memory_gb()
    print(f"calibrate: preset {prepare.PRESET_NAME}, TIME_BUDGET={prepare.TIME_BUDGET}s, "
          f"EVAL_TOKENS={prepare.EVAL_TOKENS:,}; {memory:.1f} GB {memory_kind}; a {CALIBRATION_BUDGET}s run of each")
    header = f"{'architecture':<14} {'tok/s':>9} {'MFU %':>6} {'steps':>6} {'eval s':>7} {'peak GB':>8}  fits"
    rows, verdicts, speeds = [header], {}, []
    with tempfile.TemporaryDirectory() as work_dir:
        for name in CALIBRATION_RUNS:
            t0 = time.time()
            summary = calibration_run(name, work_dir)
            if "error" in summary:
                rows.append(f"{name:<14} failed: {summary['error']}")
                verdicts[name] = f"failed ({summary['error']})"
                continue
            tokens_per_s = float(summary["throughput"].split()[0].replace(",", ""))
            tokens_per_step = int(summary["batch"].split()[0])  # "batch: N tokens/step = ..."
            eval_s = float(summary["eval_seconds"]) * prepare.EVAL_TOKENS / summary["eval_tokens"]
            peak_gb = float(summary["peak_memory_mb"]) / 1e3
            too_big = [f"peak {peak_gb:.1f} of {memory:.1f} GB"] if peak_gb > memory else []
            if eval_s > prepare.TIME_BUDGET / 4:
                too_big.append(f"evaluation {eval_s:.0f}s, over a quarter of the {prepare.TIME_BUDGET}s budget")
            verdicts[name] = "; ".join(too_big) or None
            speed = re.match(r"([\d.]+) \((\d+) probes", summary.get("machine_speed", ""))
            if speed:
                speeds.append((int(speed.group(2)), float(speed.group(1))))
            rows.append(f"{name:<14} {tokens_per_s:>9,.0f} {float(summary['mfu_percent']):>6.1f} "
                        f"{prepare.TIME_BUDGET * tokens_per_s / tokens_per_step:>6.0f} {eval_s:>7.0f} "
                        f"{peak_gb:>8.2f}  {'NO' if too_big else 'yes'}   ({time.time() - t0:.0f}s)")
    print("\n".join(rows))
    reference = prepare.probe_reference(key)
    if reference and speeds:
        pooled = pooled_reference(reference, speeds)
        prepare.set_probe_reference(key, pooled, replace=True)
        each = ", ".join(f"{speed * pooled / reference:.2f}" for _, speed in speeds)
        print(f"machine speed: reference {1000 * pooled:.1f} ms, the {sum(n for n, _ in speeds)} probes of these runs "
              f"(each run against it: {each}) -> {prepare.machine_speed_path()}")
    fit = [name for name, why in verdicts.items() if why is None]
    if fit:
        print(f"fits: preset {prepare.PRESET_NAME} fits {', '.join(fit)} here")
    for name, why in verdicts.items():
        if why is None or why.startswith("failed"):
            continue
        script = CALIBRATION_RUNS[name][0]
        smaller = smaller_presets(script)
        advice = (f"take a smaller preset: AUTORESEARCH_MLX_PRESET_FILE={smaller[0]}" if smaller else
                  f"no shipped preset is smaller: copy {prepare.PRESET_FILE} and lower EVAL_TOKENS or the model's "
                  f"sizes in its {script} section")
        print(f"fits: preset {prepare.PRESET_NAME} is too big for {name} here ({why}): {advice}")


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for autoresearch-mamba (MLX), and size "
                                                 "the training scripts for the active preset.")
    parser.add_argument("--num-shards", type=int, default=None,
                        help=f"training shards to download, or to import from --data-dir (default "
                             f"{prepare.NUM_SHARDS}, from the preset; at most the folder's files)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--data-dir", default=None,
                        help="prepare offline from a folder of parquet files with a 'text' column and val.parquet")
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
    prepare_cache(args.num_shards, args.download_workers, args.data_dir)
    if not args.keep_scripts:
        size_scripts(args.architecture)
        print("sized: the constants above are what the runs train with; `git diff` shows them (program.md: commit)")
    print(f"next: {training_command(args.architecture or 'mamba-3')} > run.log 2>&1")


if __name__ == "__main__":
    prepare.run(main)
