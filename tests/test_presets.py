"""Every shipped preset applies cleanly to every training script: each key names a constant the script really has,
with a value of the same type (a typo in a preset would otherwise only show up when someone runs it)."""

import importlib
import os

import pytest

import prepare
from conftest import ROOT

PRESETS = sorted(f for f in os.listdir(os.path.join(ROOT, "presets")) if f.endswith(".json"))
SCRIPTS = ["train_mamba_3_mlx", "train_hybrid_moe_mlx", "train_mamba"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_section_fits_the_script(preset, script, monkeypatch):
    if script == "train_mamba":
        pytest.importorskip("torch", reason="the torch extra is not installed (uv sync --extra torch)")
    module = importlib.import_module(script)
    constants = {k: v for k, v in vars(module).items() if k.isupper()}
    sections = prepare.load_preset(os.path.join(ROOT, "presets", preset))
    monkeypatch.setattr(prepare, "PRESET", sections)
    applied = prepare.apply_preset(constants, script)
    assert applied == sections[script]
    if script != "train_hybrid_moe_mlx":
        assert constants["ARCHITECTURE"] in ("mamba-2", "mamba-3")
