"""
Architecture-aware entry point of the fixed harness: prepare data, tokenizer and evaluation rows, then say how to
train the chosen architecture. Everything it does lives in prepare.py (the one source of truth).

    uv run prepare_mlx_mamba_3.py [--architecture {mamba-2,mamba-3,hybrid}] [--num-shards N]
                                  [--download-workers W] [--data-dir DIR]

The architecture comes from --architecture, else AUTORESEARCH_MLX_ARCHITECTURE, else the preset, else mamba-3.
"""

import os
import shlex

import prepare

ARCHITECTURES = ("mamba-2", "mamba-3", "hybrid")


def resolve_architecture(flag=None):
    """--architecture, else the environment, else the active preset's ARCHITECTURE, else mamba-3."""
    preset_choice = prepare.PRESET["train_mamba_3_mlx"].get("ARCHITECTURE")
    choice = flag or os.environ.get("AUTORESEARCH_MLX_ARCHITECTURE") or preset_choice or "mamba-3"
    if choice not in ARCHITECTURES:
        raise prepare.HarnessError(f"Unknown architecture {choice!r}; choose one of {', '.join(ARCHITECTURES)}.")
    return choice


# The environment variables that shape the cache and the run, besides the architecture.
RUN_ENVIRONMENT = ("AUTORESEARCH_MLX_PRESET_FILE", "AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_FAST_BLAS")


def training_command(architecture):
    """The command that trains `architecture` on this cache and preset. It repeats each variable of RUN_ENVIRONMENT
    that is set (paths made absolute, values quoted), so pasted into a fresh shell it gives the same fingerprint."""
    env = {} if architecture == "hybrid" else {"AUTORESEARCH_MLX_ARCHITECTURE": architecture}
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


def main():
    parser = prepare.make_parser("Prepare data and tokenizer for autoresearch-mamba (MLX), for one architecture.")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=None,
                        help="mamba-2, mamba-3 or hybrid (default: AUTORESEARCH_MLX_ARCHITECTURE, the preset, mamba-3)")
    args = parser.parse_args()
    architecture = resolve_architecture(args.architecture)
    print(f"architecture: {architecture}")
    prepare.prepare(args.num_shards, args.download_workers, args.data_dir)
    print(f"next: {training_command(architecture)} > run.log 2>&1")


if __name__ == "__main__":
    prepare.run(main)
