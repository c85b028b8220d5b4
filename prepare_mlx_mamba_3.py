"""
Architecture-aware entry point of the fixed harness: prepare data, tokenizer and evaluation rows, then say how to
train the chosen architecture. Everything it does lives in prepare.py (the one source of truth).

    uv run prepare_mlx_mamba_3.py [--architecture {mamba-2,mamba-3,hybrid}] [--num-shards N]
                                  [--download-workers W] [--data-dir DIR]

The architecture comes from --architecture, else AUTORESEARCH_MLX_ARCHITECTURE, else the preset, else mamba-3.
"""

import os

import prepare

ARCHITECTURES = ("mamba-2", "mamba-3", "hybrid")


def resolve_architecture(flag=None):
    """--architecture, else the environment, else the active preset's ARCHITECTURE, else mamba-3."""
    preset_choice = prepare.PRESET["train_mamba_3_mlx"].get("ARCHITECTURE")
    choice = flag or os.environ.get("AUTORESEARCH_MLX_ARCHITECTURE") or preset_choice or "mamba-3"
    if choice not in ARCHITECTURES:
        raise prepare.HarnessError(f"Unknown architecture {choice!r}; choose one of {', '.join(ARCHITECTURES)}.")
    return choice


def training_command(architecture):
    if architecture == "hybrid":
        return "uv run train_hybrid_moe_mlx.py"
    return f"AUTORESEARCH_MLX_ARCHITECTURE={architecture} uv run train_mamba_3_mlx.py"


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
