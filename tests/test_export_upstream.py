"""EXPORT_UPSTREAM_DIR: train_mamba_3_mlx.py writes its final model under mamba_ssm's MambaLMHeadModel names and config.
Checked against the independent mapping of tests/upstream_reference.py (whose model of upstream's math the parity
tests hold our logits to), loaded back into a fresh model, and end to end in a smoke run."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train_mamba_3_mlx as T
import upstream_reference as U
from conftest import ROOT, sized_script

VARIANTS = {"mamba-2": dict(architecture="mamba-2"), "siso": dict(architecture="mamba-3"),
            "mimo": dict(architecture="mamba-3", is_mimo=True, mimo_rank=2), "mlp": dict(architecture="mamba-3",
                                                                                       mlp_expand=4)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_is_upstreams_layout_and_loads_back(variant, tmp_path):
    config = T.ModelConfig(vocab_size=61, depth=2, d_model=32, d_state=16, headdim=16, chunk_size=8,
                           checkpoint_blocks=False, **VARIANTS[variant])
    mx.random.seed(3)
    model = T.MambaLM(config)
    T.export_upstream(model, str(tmp_path))
    written = {k: np.array(v) for k, v in mx.load(str(tmp_path / "model.safetensors")).items()}
    want = U.mlx_to_upstream({k: np.array(v) for k, v in tree_flatten(model.parameters())})
    assert sorted(written) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["n_layer"], cfg["d_model"], cfg["vocab_size"], cfg["d_intermediate"]) == (2, 32, 61,
                                                                                          config.mlp_expand * 32)
    assert cfg["ssm_cfg"]["layer"] == ("Mamba2" if config.architecture == "mamba-2" else "Mamba3")
    assert cfg["tie_embeddings"] and cfg["residual_in_fp32"] and cfg["pad_vocab_size_multiple"] == 8
    if config.architecture == "mamba-3":
        assert cfg["ssm_cfg"]["is_mimo"] == config.is_mimo and cfg["ssm_cfg"]["rope_fraction"] == config.rope_fraction
    mx.random.seed(4)
    fresh = T.MambaLM(config)
    fresh.update(mlx_tree(U.mlx_from_upstream(written, vocab_size=61)))
    ids = mx.array(np.random.default_rng(0).integers(0, 61, (2, 21)).astype(np.int32))
    np.testing.assert_array_equal(np.array(fresh(ids)), np.array(model(ids)))


def mlx_tree(flat):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, mx.array(v)) for k, v in flat.items()])


def test_a_run_with_the_constant_set_exports_after_its_summary(prepared_cache, tmp_path):
    script = sized_script("train_mamba_3_mlx", EXPORT_UPSTREAM_DIR=str(tmp_path / "export"))
    done = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    export = next(i for i, line in enumerate(lines) if line.startswith(f"export: {tmp_path / 'export'} "))
    assert export > lines.index("---")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
