"""
Train a Mamba-2 or Mamba-3 (SISO / MIMO) language model with MLX for a fixed time budget, then report val_bpb.

This is the file the agent edits. Run: `uv run train_mamba_3_mlx.py`
(architecture from AUTORESEARCH_MLX_ARCHITECTURE or the preset; see README.md and program.md).
"""

import prepare  # first: loads the fast BLAS before MLX is imported
from prepare import apply_preset

import mlx.core as mx
import mlx.nn as nn

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters (canonical full-size defaults; the active preset may override them just below)
# [owner: pure-Mamba helper A]

apply_preset(globals(), "train_mamba_3_mlx")
# Experiment overrides: assignments placed here win over the preset.

# =====================================================================================================================
# SECTION: Mamba-2 (SSD scan, Mamba-2 block)  [owner: helper A]
# =====================================================================================================================

# =====================================================================================================================
# SECTION: Mamba-3 (SISO and MIMO scans, Mamba-3 block)  [owner: helper B]
# =====================================================================================================================

# =====================================================================================================================
# SECTION: Language model, generate  [owner: helper A]
# =====================================================================================================================

# =====================================================================================================================
# SECTION: Optimizer, schedule, training loop, summary  [owner: helper A]
# =====================================================================================================================
