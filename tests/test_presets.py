"""What you read is what runs. Setup writes the active preset's section of each training script into that script's
constant lines (prepare.write_constants); nothing replaces a constant at run time. So: every shipped preset sizes
every script with values the import really yields (no later line overrides them), every preset names the same keys
(switching presets writes a whole size, not half of one), a fresh clone holds the `default` preset, and a hand edit
of a constant line is what the run trains."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

import prepare
from conftest import ROOT, SCRIPTS, sized_script

PRESETS = sorted(f.removesuffix(".json") for f in os.listdir(os.path.join(ROOT, "presets")) if f.endswith(".json"))


def load(name):
    return prepare.load_preset(os.path.join(ROOT, "presets", name + ".json"))


def import_copy(path):
    spec = importlib.util.spec_from_file_location(f"sized_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_preset_names_the_same_keys(script):
    keys = {name: sorted(load(name)[script]) for name in PRESETS}
    assert all(value == keys["default"] for value in keys.values()), keys


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_fresh_clone_holds_the_default_preset(script, tmp_path):
    copy = shutil.copy(os.path.join(ROOT, script + ".py"), tmp_path)
    assert prepare.write_constants(copy, load("default")[script]) == []


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_a_sized_script_imports_with_the_presets_values(preset, script, tmp_path):
    if script == "train_mamba":
        pytest.importorskip("torch", reason="the torch extra is not installed (uv sync --extra torch)")
    values = load(preset)[script]
    copy = shutil.copy(os.path.join(ROOT, script + ".py"), tmp_path)
    prepare.write_constants(copy, values)
    module = import_copy(copy)
    assert {key: getattr(module, key) for key in values} == values
    if script != "train_hybrid_moe_mlx":
        assert module.ModelConfig().depth == values["DEPTH"]  # the config the run builds reads the constant


def summary(stdout):
    return dict(re.findall(r"^(\w+): (.*)$", stdout.split("\n---\n")[-1], flags=re.M))


@pytest.mark.parametrize("script, line, edited, field", [
    ("train_mamba_3_mlx", "\nDEPTH = 2  #", "\nDEPTH = 3  #", ("depth", "3")),
    ("train_hybrid_moe_mlx", '\nHYBRID_PATTERN = "ME*EM"  #', '\nHYBRID_PATTERN = "M*E"  #', ("hybrid_pattern", "M*E")),
])
def test_a_hand_edit_of_a_constant_line_is_what_the_run_trains(prepared_cache, script, line, edited, field):
    path = sized_script(script)
    with open(path) as f:
        text = f.read()
    assert line in text, f"the smoke-sized {script}.py has no line {line.strip()!r}"
    with open(path, "w") as f:
        f.write(text.replace(line, edited))
    done = subprocess.run([sys.executable, path], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary(done.stdout)[field[0]] == field[1]
