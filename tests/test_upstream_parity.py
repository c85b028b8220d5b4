"""Parity with upstream's Mamba (state-spaces/mamba's MambaLMHeadModel with Mamba3 / Mamba2 mixers).

The reference is tests/upstream_reference.py: upstream's state_dict layout and its math as a plain float64
token-by-token recurrence, written from upstream's source. Random weights in upstream's layout are mapped onto each of
our script families (MLX script, the hybrid's Mamba blocks, the torch mirror) and must give the same logits, chunked
and decoded one token at a time, and the same decode states; the mappings round-trip exactly. Also: the MIMO rotation
pairing against upstream's (and adjacent-relabelled == upstream's), train_mamba.py's fused MIMO wrapper against a
model of upstream's kernel, and (optional, when mamba_ssm imports) upstream's own modules.

Tolerance of the logit comparisons: 2e-5 of the logits' scale (at least 1). Ours run in float32 (CPU, true float32
matmuls; MLX's polynomial exp/cos/sin are accurate to < 4e-7 relative), the reference in float64; two layers over 21
tokens leave errors of a few 1e-7 to 1e-6 of the scale, measured. A convention error (a pairing, an axis order, a gate
before instead of after a norm) moves logits by 1e-2 or more; the MIMO tests were seen to fail with the old pairing."""

import functools
import json
import os
import subprocess
import sys
import types

import prepare  # noqa: F401  (first: loads the fast BLAS before MLX)

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import train_hybrid_moe_mlx as H
import train_mamba as tm
import train_mamba_3_mlx as T
import upstream_reference as U
from conftest import ROOT, sized_script

VARIANTS = {  # name: upstream config kwargs (d_model 32, 2 layers, d_state 16, headdim 16: 4 heads)
    "mamba-2": dict(layer="Mamba2"),
    "mamba-2 groups mlp": dict(layer="Mamba2", ngroups=2, d_intermediate=128),
    "mamba-3 siso": dict(layer="Mamba3"),
    "mamba-3 siso norm groups full-rope": dict(layer="Mamba3", is_outproj_norm=True, ngroups=2, rope_fraction=1.0),
    "mamba-3 mimo": dict(layer="Mamba3", is_mimo=True, mimo_rank=2),
    "mamba-3 mimo norm groups mlp": dict(layer="Mamba3", is_mimo=True, mimo_rank=2, is_outproj_norm=True, ngroups=2,
                                         d_intermediate=128),
    "mamba-3 mimo full-rope": dict(layer="Mamba3", is_mimo=True, mimo_rank=4, rope_fraction=1.0),
}
MAMBA_ONLY = [name for name, kw in VARIANTS.items() if not kw.get("d_intermediate")]  # what the hybrid can hold
VOCAB = 60  # upstream pads it to 64: the mapping drops and adds the padding rows
LENGTH = 21  # not a multiple of the chunk (8 tokens)
TOL = 2e-5


def upstream_config(name):
    return U.config(vocab_size=VOCAB, **VARIANTS[name])


def our_fields(cfg):
    """Our ModelConfig / HybridConfig fields for an upstream config (chunks of 8 tokens)."""
    s = cfg["ssm_cfg"]
    fields = dict(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_state=s["d_state"], headdim=s["headdim"],
                  expand=s["expand"], ngroups=s["ngroups"], chunk_size=8, checkpoint_blocks=False)
    if s["layer"] == "Mamba3":
        fields.update(rope_fraction=s["rope_fraction"], is_mimo=s["is_mimo"], mimo_rank=s["mimo_rank"],
                      is_outproj_norm=s["is_outproj_norm"], a_floor=s["A_floor"])
    else:
        fields.update(d_conv=s["d_conv"])
    return fields


def lm_fields(cfg):
    fields = dict(our_fields(cfg), architecture="mamba-3" if cfg["ssm_cfg"]["layer"] == "Mamba3" else "mamba-2",
                  depth=cfg["n_layer"], mlp_expand=cfg["d_intermediate"] // cfg["d_model"])
    assert fields["mlp_expand"] * cfg["d_model"] == U.mlp_hidden(cfg) or not cfg["d_intermediate"]
    return fields


def numpy_state(state):
    return {k: v.numpy() for k, v in state.items()}


def mlx_model(cfg, upstream):
    model = T.MambaLM(T.ModelConfig(**lm_fields(cfg)))
    weights = U.mlx_from_upstream(numpy_state(upstream), vocab_size=cfg["vocab_size"])
    model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in weights.items()])  # strict: every name
    return model


def hybrid_model(cfg, upstream):
    fields = dict(our_fields(cfg), hybrid_pattern="M" * cfg["n_layer"],
                  mamba_type="mamba-3" if cfg["ssm_cfg"]["layer"] == "Mamba3" else "mamba-2")
    model = H.HybridLM(H.HybridConfig(**fields))
    weights = U.hybrid_from_upstream(numpy_state(upstream), vocab_size=cfg["vocab_size"])
    model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in weights.items()])
    return model


def torch_model(cfg, upstream):
    fields = lm_fields(cfg)
    if fields["architecture"] == "mamba-3" and fields["is_mimo"]:
        fields["chunk_size"] *= fields["mimo_rank"]  # the mirror's chunk counts keys: tokens x rank
    model = tm.MambaLM(tm.ModelConfig(**fields))
    model.load_state_dict(U.torch_from_upstream({k: v.float() for k, v in upstream.items()},
                                                vocab_size=cfg["vocab_size"]))  # strict
    return model.eval()


def assert_close(got, want, what, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.2e} > {tol:.0e} * {scale:.2f}"


def reference(name, seed=0):
    cfg = upstream_config(name)
    upstream = U.random_upstream_state(cfg, seed)
    ids = np.random.RandomState(seed).randint(0, VOCAB, (2, LENGTH)).astype(np.int32)
    logits, cache = U.lm_logits(upstream, cfg, ids)
    return cfg, upstream, ids, logits[..., :VOCAB].numpy(), cache


# ---------------------------------------------------------------------------------------------------------------------
# Layout and mappings


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mapped_state_has_upstreams_names_and_shapes(name):
    cfg = upstream_config(name)
    want = U.upstream_shapes(cfg)
    mlx = {k: np.array(v) for k, v in tree_flatten(T.MambaLM(T.ModelConfig(**lm_fields(cfg))).parameters())}
    families = {"mlx": U.mlx_to_upstream(mlx), "torch": U.torch_to_upstream(tm.MambaLM(tm.ModelConfig(
        **lm_fields(cfg))).state_dict())}
    if name in MAMBA_ONLY:
        hybrid = hybrid_model(cfg, U.random_upstream_state(cfg))
        families["hybrid"] = U.hybrid_to_upstream({k: np.array(v) for k, v in tree_flatten(hybrid.parameters())},
                                                  "M" * cfg["n_layer"])
    for family, got in families.items():
        assert {k: tuple(v.shape) for k, v in got.items()} == want, family
        assert got["lm_head.weight"] is got["backbone.embedding.weight"], family  # tied, as upstream


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mappings_round_trip_exactly(name):
    cfg = upstream_config(name)
    upstream = numpy_state(U.random_upstream_state(cfg, seed=3))
    back = U.mlx_to_upstream(U.mlx_from_upstream(upstream))  # without vocab_size: all rows kept
    assert set(back) == set(upstream) and all(np.array_equal(back[k], upstream[k]) for k in upstream)
    torch_up = {k: torch.from_numpy(v) for k, v in upstream.items()}
    back = U.torch_to_upstream(U.torch_from_upstream(torch_up))
    assert set(back) == set(upstream) and all(torch.equal(back[k], torch_up[k]) for k in upstream)

    model = mlx_model(cfg, U.random_upstream_state(cfg, seed=4))
    ours = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    again = U.mlx_from_upstream(U.mlx_to_upstream(ours), vocab_size=VOCAB)
    assert set(again) == set(ours) and all(np.array_equal(again[k], ours[k]) for k in ours)
    model = torch_model(cfg, U.random_upstream_state(cfg, seed=4))
    ours = model.state_dict()
    again = U.torch_from_upstream(U.torch_to_upstream(ours), vocab_size=VOCAB)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    if name in MAMBA_ONLY:
        model = hybrid_model(cfg, U.random_upstream_state(cfg, seed=4))
        ours = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
        again = U.hybrid_from_upstream(U.hybrid_to_upstream(ours, "M" * cfg["n_layer"]), vocab_size=VOCAB)
        assert set(again) == set(ours) and all(np.array_equal(again[k], ours[k]) for k in ours)


def test_untied_or_foreign_checkpoints_are_refused():
    cfg = upstream_config("mamba-3 siso")
    upstream = numpy_state(U.random_upstream_state(cfg))
    with pytest.raises(ValueError, match="tied"):
        U.mlx_from_upstream(dict(upstream, **{"lm_head.weight": upstream["lm_head.weight"] + 1}))
    with pytest.raises(KeyError, match="mlp.A"):
        U.mlx_from_upstream(dict(upstream, **{"backbone.layers.0.mlp.A": upstream["backbone.norm_f.weight"]}))
    with pytest.raises(ValueError, match="pattern"):
        U.hybrid_to_upstream({}, "ME")


# ---------------------------------------------------------------------------------------------------------------------
# Same weights, same logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mlx_script_matches_upstream(name):
    cfg, upstream, ids, want, _ = reference(name)
    assert_close(mlx_model(cfg, upstream)(mx.array(ids)), want, f"{name}: MLX logits")


@pytest.mark.parametrize("name", ["mamba-3 mimo", "mamba-3 mimo norm groups mlp"])
def test_mlx_checkpointed_mimo_matches_upstream(name):
    """The checkpointed MIMO block runs the lean forward (lean_rotate, mimo_gate_down): the same logits."""
    cfg, upstream, ids, want, _ = reference(name)
    model = mlx_model(cfg, upstream)
    model.config.checkpoint_blocks = True
    for layer in model.layers:
        layer.mixer.rotate_qk, layer.mixer.scan, layer.mixer.gate = T.lean_backward
    assert_close(model(mx.array(ids)), want, f"{name}: checkpointed MLX logits")


@pytest.mark.parametrize("name", MAMBA_ONLY)
def test_hybrid_mamba_blocks_match_upstream(name):
    cfg, upstream, ids, want, _ = reference(name)
    assert_close(hybrid_model(cfg, upstream)(mx.array(ids)), want, f"{name}: hybrid logits")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torch_mirror_matches_upstream(name):
    cfg, upstream, ids, want, _ = reference(name)
    with torch.no_grad():
        got = torch_model(cfg, upstream)(torch.from_numpy(ids).long())
    assert_close(got.numpy(), want, f"{name}: torch logits")


def assert_decode_states(name, cfg, ours, want):
    layer = cfg["ssm_cfg"]["layer"]
    for i, (state, ref) in enumerate(zip(ours, want)):
        got = U.decode_state_to_upstream(state, layer)
        ref = [t.numpy() for t in ref]
        if layer == "Mamba2":
            ref[0] = ref[0][:, :, 1:]  # upstream's window also keeps the one input that is never read again
        else:  # angles on the circle: a wrap at 2 pi is not an error
            got, ref = list(got), list(ref)
            got[0], ref[0] = np.stack([np.cos(got[0]), np.sin(got[0])]), np.stack([np.cos(ref[0]), np.sin(ref[0])])
        for j, (g, r) in enumerate(zip(got, ref)):
            assert_close(g, r, f"{name}: layer {i} decode state {j}")


@pytest.mark.parametrize("family", ["mlx", "hybrid", "torch"])
@pytest.mark.parametrize("name", ["mamba-2", "mamba-3 siso", "mamba-3 mimo", "mamba-3 mimo norm groups mlp"])
def test_one_token_decode_matches_upstream(family, name):
    """Decode one token at a time from fresh states: every step's logits, and the final states in upstream's layout
    (allocate_inference_cache: Mamba-3 angle, ssm, k (b r h n), v; Mamba-2 conv window, ssm)."""
    if family == "hybrid" and name not in MAMBA_ONLY:
        pytest.skip("the hybrid's pattern has no MLP after a Mamba block")
    cfg, upstream, ids, want, want_cache = reference(name)
    steps = []
    if family == "torch":
        model = torch_model(cfg, upstream)
        cache = model.init_cache(ids.shape[0])
        with torch.no_grad():
            for t in range(LENGTH):
                logits, cache = model.step(torch.from_numpy(ids[:, t]).long(), cache)
                steps.append(logits.numpy())
    else:
        model = mlx_model(cfg, upstream) if family == "mlx" else hybrid_model(cfg, upstream)
        cache = [None] * cfg["n_layer"]
        for t in range(LENGTH):
            steps.append(np.array(model(mx.array(ids[:, t : t + 1]), cache)[:, 0]))
    assert_close(np.stack(steps, axis=1), want, f"{name}: {family} decoded logits")
    assert_decode_states(name, cfg, cache, want_cache)


# ---------------------------------------------------------------------------------------------------------------------
# The MIMO rotation pairing


def test_reference_pairings_differ_by_a_relabelling_only():
    """Upstream's MIMO model (halves pairing) equals the same model with its state dims relabelled (B/C rows of
    in_proj, biases, norm weights) run with adjacent pairs; unrelabelled, the adjacent pairing is another model."""
    cfg, upstream, ids, want, _ = reference("mamba-3 mimo norm groups mlp")
    relabelled = U.relabel_mimo_to_adjacent(upstream, cfg)
    assert_close(U.lm_logits(relabelled, cfg, ids, pairing="adjacent")[0][..., :VOCAB].numpy(), want, "relabelled")
    other = U.lm_logits(upstream, cfg, ids, pairing="adjacent")[0][..., :VOCAB].numpy()
    assert np.abs(other - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("n,a", [(8, 2), (8, 4), (16, 3), (16, 8)])
def test_scripts_rotate_as_upstream(n, a):
    """SISO turns (2j, 2j+1), MIMO (j, n/2 + j), j < a, other dims pass through, in the MLX scripts and the torch
    mirror (upstream_reference's rotations are the oracles), and adjacent-relabelled == halves."""
    gen = torch.Generator().manual_seed(n + a)
    x = torch.randn(2, 3, 5, 1, n, generator=gen)  # b h l r n (MIMO layout of the MLX scan)
    theta = 6.28 * torch.rand(2, 3, 5, a, generator=gen)
    perm = U.adjacent_slots_of_halves(n, a)
    halves, adjacent = U.rotate_halves(x, theta[:, :, :, None]), U.rotate_adjacent(x, theta[:, :, :, None])
    assert torch.allclose(U.rotate_adjacent(x[..., perm], theta[:, :, :, None]), halves[..., perm], atol=1e-6)
    turned = [d for j in range(a) for d in (j, n // 2 + j)]
    still = [d for d in range(n) if d not in turned]
    assert torch.equal(halves[..., still], x[..., still]) and torch.equal(adjacent[..., 2 * a :], x[..., 2 * a :])

    mx_x, mx_theta = mx.array(x.numpy()), mx.array(theta.numpy())
    for script in (T, H):
        mimo = script.rotate(mx_x, *script.rotation(mx_theta, n, halves=True))
        siso = script.rotate(mx_x[:, :, :, 0], *script.rotation(mx_theta, n))
        assert_close(np.array(mimo), halves.numpy(), f"{script.__name__} MIMO rotation", 1e-6)
        assert_close(np.array(siso), adjacent[:, :, :, 0].numpy(), f"{script.__name__} SISO rotation", 1e-6)
        lean = script.lean_rotate(mx_x, *script.rotation(mx_theta, n, halves=True))
        assert_close(np.array(lean), halves.numpy(), f"{script.__name__} lean MIMO rotation", 1e-6)
    assert torch.allclose(tm.rotate_halves(x, theta[:, :, :, None]), halves, atol=1e-6)
    assert torch.allclose(tm.rotate_pairs(x, theta[:, :, :, None]), adjacent, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# train_mamba.py's fused MIMO kernel wrapper against a model of upstream's kernel (its pairing, its interface)


@pytest.fixture
def fake_mimo_kernel(monkeypatch):
    """Stand-in modules so that `from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo` finds
    upstream_reference's model of the kernel; returns a dict whose "kernel" entry the test may replace."""
    slot = {"kernel": U.mamba3_mimo_kernel_model, "calls": 0}

    def kernel(*args, **kwargs):
        slot["calls"] += 1
        return slot["kernel"](*args, **kwargs)

    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.tilelang", "mamba_ssm.ops.tilelang.mamba3",
             "mamba_ssm.ops.tilelang.mamba3.mamba3_mimo"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].mamba3_mimo = kernel
    monkeypatch.setattr(tm, "FUSED", {})
    return slot


def mimo_config(rope_fraction, d_state=16):
    return tm.ModelConfig(architecture="mamba-3", vocab_size=VOCAB, depth=2, d_model=32, d_state=d_state, headdim=16,
                          expand=2, ngroups=1, chunk_size=32, rope_fraction=rope_fraction, is_mimo=True, mimo_rank=2,
                          is_outproj_norm=False, mlp_expand=0, checkpoint_blocks=False)


@pytest.mark.parametrize("rope_fraction,d_state", [(0.5, 16), (1.0, 16), (0.25, 16), (0.5, 24), (0.3, 16)])
def test_fused_mimo_wrapper_matches_the_pure_scan(fake_mimo_kernel, rope_fraction, d_state):
    """The wrapper's output and every input gradient equal the pure MIMO scan's when the kernel turns dims
    (j, n/2 + j) for j < n / divisor (upstream's tilelang kernel), for every rope fraction the config allows. (With the
    old relabelling to (j, j + a), 0.5 failed by O(1) and 0.25 could not even pick a divisor.)"""
    config = mimo_config(rope_fraction, d_state)
    fused, name = tm._fused_candidates()["mimo"]
    assert name == "mamba3_mimo"
    problem = tm._random_scan_problem("mimo", config, 2, 20, torch.device("cpu"), torch.float32)
    ok, detail = tm.fused_matches_pure(fused, tm.mamba3_scan, problem, config.tokens_per_chunk, tolerance=1e-4)
    assert ok, detail
    assert fake_mimo_kernel["calls"] == 1


def test_start_up_check_names_what_runs(fake_mimo_kernel, monkeypatch, capsys):
    """choose_scan_backend as on CUDA (the problem built on the CPU): a kernel that agrees is taken, named in
    scan_backend, and is what the model's forward then calls, giving the pure model's logits; a kernel that turns
    other pairs is rejected with one printed line, and the pure scan runs."""
    real_problem = tm._random_scan_problem
    monkeypatch.setattr(tm, "_random_scan_problem", lambda kind, config, batch, length, device, dtype: real_problem(
        kind, config, batch, length, torch.device("cpu"), torch.float32))
    monkeypatch.setattr(tm, "FUSED_KERNELS", True)
    cuda = types.SimpleNamespace(type="cuda")
    config = mimo_config(0.5)
    torch.manual_seed(0)
    model = tm.MambaLM(config).eval()
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pure_logits = model(ids)

    assert tm.choose_scan_backend(config, cuda) == "mamba_ssm.mamba3_mimo"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "mamba_ssm mamba3_mimo" in lines[0], lines
    calls = fake_mimo_kernel["calls"]
    with torch.no_grad():
        fused_logits = model(ids)
    assert fake_mimo_kernel["calls"] == calls + config.depth  # the kernel ran, once per block
    assert_close(fused_logits.numpy(), pure_logits.numpy(), "fused model logits", 1e-4)

    fake_mimo_kernel["kernel"] = functools.partial(U.mamba3_mimo_kernel_model, pairing="adjacent")
    assert tm.choose_scan_backend(config, cuda) == "torch" and not tm.FUSED
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "using the pure-PyTorch scan" in lines[0], lines
    calls = fake_mimo_kernel["calls"]
    with torch.no_grad():
        assert_close(model(ids).numpy(), pure_logits.numpy(), "pure model logits", 0)
    assert fake_mimo_kernel["calls"] == calls


# ---------------------------------------------------------------------------------------------------------------------
# EXPORT_UPSTREAM_DIR: train_mamba.py's final model in upstream's layout (pytorch_model.bin, config.json)

EXPORTS = {"mamba-2": dict(architecture="mamba-2"), "siso": dict(architecture="mamba-3"),
           "mimo norm": dict(architecture="mamba-3", is_mimo=True, mimo_rank=2, is_outproj_norm=True),
           "mlp 128": dict(architecture="mamba-3", mlp_expand=4), "mlp 64": dict(architecture="mamba-2", mlp_expand=2)}


def exported_model(variant, seed):
    torch.manual_seed(seed)
    config = tm.ModelConfig(vocab_size=61, depth=2, d_model=32, d_state=16, headdim=16, chunk_size=8,
                            checkpoint_blocks=False, **EXPORTS[variant])
    return tm.MambaLM(config).eval()


@pytest.mark.parametrize("variant", EXPORTS)
def test_torch_export_is_upstreams_layout_and_loads_back(variant, tmp_path, capsys):
    """The files equal the reference mapping of the model's state_dict, the config describes those weights (upstream's
    shapes of it), and the weights mapped back into a fresh model give the same logits."""
    model = exported_model(variant, 3)
    tm.export_upstream(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    written = torch.load(tmp_path / "pytorch_model.bin")
    want = U.torch_to_upstream(model.state_dict())
    assert sorted(written) == sorted(want)
    for name, value in want.items():
        assert written[name].dtype == torch.float32 and torch.equal(written[name], value), name
    assert written["lm_head.weight"].data_ptr() == written["backbone.embedding.weight"].data_ptr()  # tied, as upstream

    cfg = json.loads((tmp_path / "config.json").read_text())
    c, ssm = model.config, cfg["ssm_cfg"]
    assert (cfg["n_layer"], cfg["d_model"], cfg["vocab_size"], cfg["d_intermediate"]) == (2, 32, 61, 32 * c.mlp_expand)
    assert (ssm["d_state"], ssm["headdim"], ssm["expand"], ssm["ngroups"]) == (16, 16, 2, 1)
    assert ssm["chunk_size"] == model.layers[0].mixer.chunk_size  # tokens (MIMO: keys / rank), as upstream counts
    assert cfg["tie_embeddings"] and cfg["rms_norm"] and cfg["residual_in_fp32"] and cfg["pad_vocab_size_multiple"] == 8
    if c.architecture == "mamba-3":
        assert ssm["layer"] == "Mamba3" and (ssm["is_mimo"], ssm["mimo_rank"], ssm["is_outproj_norm"]) == (
            c.is_mimo, c.mimo_rank, c.is_outproj_norm)
        assert (ssm["rope_fraction"], ssm["A_floor"]) == (c.rope_fraction, c.a_floor)
    else:
        assert ssm["layer"] == "Mamba2" and ssm["d_conv"] == c.d_conv
    if cfg["d_intermediate"] % 128 == 0:  # upstream's MLP width: what its model built from this config holds
        assert {k: tuple(v.shape) for k, v in written.items()} == U.upstream_shapes(cfg)
        assert capsys.readouterr().out == (f"export: {tmp_path} (config.json, pytorch_model.bin: mamba_ssm's "
                                           "MambaLMHeadModel.from_pretrained loads it)\n")
    else:
        assert "is not a multiple of 128" in capsys.readouterr().out

    fresh = exported_model(variant, 4)
    fresh.load_state_dict(U.torch_from_upstream(written, vocab_size=61))  # strict: every name
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 61, (2, 21))).long()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_a_torch_run_with_the_constant_set_exports_after_its_summary(prepared_cache, tmp_path):
    export = tmp_path / "export"
    script = sized_script("train_mamba", EXPORT_UPSTREAM_DIR=str(export), ARCHITECTURE="mamba-3")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    line = next(i for i, text in enumerate(lines) if text.startswith(f"export: {export} "))
    assert line > lines.index("---") and "from_pretrained loads it" in lines[line]
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "pytorch_model.bin"]
    cfg = json.loads((export / "config.json").read_text())
    written = torch.load(export / "pytorch_model.bin")
    assert {k: tuple(v.shape) for k, v in written.items()} == U.upstream_shapes(cfg)


def test_a_torch_export_to_a_missing_parent_is_one_line_before_training(prepared_cache):
    script = sized_script("train_mamba", EXPORT_UPSTREAM_DIR="/no/such/folder/export")
    done = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "train_mamba.EXPORT_UPSTREAM_DIR must be a folder whose parent exists, got '/no/such/folder/export'" in \
        done.stderr and "Traceback" not in done.stderr and "---" not in done.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Optional: upstream's own modules, when mamba_ssm imports (a CPU-only install: MAMBA_SKIP_CUDA_BUILD=TRUE builds no
# CUDA extension; its kernels are Triton/TileLang/CuTe and do not run on a CPU, so its modules are built and their
# state_dicts read, and its pure-PyTorch pieces run: the MIMO decode rotation reference and Mamba2.step's torch path)


def upstream_package():
    try:
        import mamba_ssm  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "selective_scan_cuda":
            pytest.skip(f"mamba_ssm is not installed ({e.name} missing): upstream_reference.py is the reference")
        # a CPU-only build: the package's __init__ imports the Mamba-1 CUDA extension, which nothing here calls
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    import mamba_ssm.modules.mamba2 as mamba2
    import mamba_ssm.modules.mamba3 as mamba3

    return mamba2, mamba3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_upstream_modules_have_the_reproduced_layout(name):
    mamba2, mamba3 = upstream_package()
    cfg = upstream_config(name)
    kwargs = dict(cfg["ssm_cfg"])
    layer = kwargs.pop("layer")
    if layer == "Mamba3" and kwargs["is_mimo"] and mamba3.mamba3_mimo_combined is None:
        pytest.skip("mamba_ssm's MIMO kernels (TileLang) do not import here")
    cls = mamba3.Mamba3 if layer == "Mamba3" else mamba2.Mamba2
    module = cls(cfg["d_model"], layer_idx=0, **kwargs)
    want = {k[len("backbone.layers.0.mixer."):]: v for k, v in U.upstream_shapes(cfg).items()
            if k.startswith("backbone.layers.0.mixer.")}
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == want
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        lm = MambaLMHeadModel(MambaConfig(**cfg))
    except ValueError as e:  # PyPI 2.3.2.post1's create_block knows only Mamba1 and Mamba2
        assert layer == "Mamba3", e
        return
    assert {k: tuple(v.shape) for k, v in lm.state_dict().items()} == U.upstream_shapes(cfg)


@pytest.mark.parametrize("is_mimo", [False, True])
def test_upstream_decode_rotation_pairs_as_ours(is_mimo):
    """mamba_ssm's pure-PyTorch apply_rotary_qk_inference_reference, called as Mamba3.step calls it
    (rotate_pairwise = not is_mimo), against our scripts' rotation."""
    upstream_package()
    from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_reference

    b, r, h, n, a = 2, (2 if is_mimo else 1), 3, 16, 4
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(b, r, h, n, generator=gen), torch.randn(b, r, h, n, generator=gen)
    angle_state, angle_proj = torch.randn(b, h, a, generator=gen), torch.randn(b, h, a, generator=gen)
    dt = torch.rand(b, h, generator=gen)
    q_up, k_up, angle = apply_rotary_qk_inference_reference(q, k, angle_state, angle_proj, dt,
                                                            rotate_pairwise=not is_mimo)
    ours = tm.rotate_halves if is_mimo else tm.rotate_pairs
    assert torch.allclose(ours(q, angle[:, None]), q_up, atol=1e-5)
    assert torch.allclose(ours(k, angle[:, None]), k_up, atol=1e-5)
    wrapped = torch.remainder(angle, 2 * torch.pi)  # as our scans keep theta (MLX's CPU cos/sin take [0, 2 pi])
    cos_sin = T.rotation(mx.array(wrapped[:, :, None].numpy()), n, halves=is_mimo)  # b h 1 n
    x = mx.array(q.permute(0, 2, 1, 3).numpy())  # b h r n: the rank axis where the MLX scan's token axis is
    mlx = T.rotate(x[:, :, :, None], *cos_sin)[:, :, :, 0] if is_mimo else T.rotate(x, *cos_sin)
    assert_close(np.array(mlx), q_up.permute(0, 2, 1, 3).numpy(), "MLX rotation vs upstream", 1e-5)


def test_upstream_mamba2_step_matches_the_reproduction(monkeypatch):
    """mamba_ssm's Mamba2.step on its pure-PyTorch path (no causal_conv1d, no selective_state_update; the gated norm
    by its rms_norm_ref) equals upstream_reference's Mamba-2 step, in float64 (but for upstream's float32 A)."""
    mamba2, _ = upstream_package()
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref

    monkeypatch.setattr(mamba2, "selective_state_update", None)
    monkeypatch.setattr(mamba2, "causal_conv1d_update", None)
    cfg = upstream_config("mamba-2")
    kwargs = {k: v for k, v in cfg["ssm_cfg"].items() if k != "layer"}
    module = mamba2.Mamba2(cfg["d_model"], layer_idx=0, **kwargs).double()
    state = {k[len("backbone.layers.0.mixer."):]: v for k, v in U.random_upstream_state(cfg).items()
             if k.startswith("backbone.layers.0.mixer.")}
    module.load_state_dict(state)
    norm = module.norm
    monkeypatch.setattr(norm, "forward", lambda x, z=None: rms_norm_ref(
        x, norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size, norm_before_gate=norm.norm_before_gate,
        upcast=False))  # float64 throughout (upcast would round to float32)
    conv_state, ssm_state = module.allocate_inference_cache(2, 1, dtype=torch.float64)
    ref_state = U.init_cache(cfg, 2)[0]
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        u = torch.randn(2, 1, cfg["d_model"], generator=gen, dtype=torch.float64)
        with torch.no_grad():
            y, conv_state, ssm_state = module.step(u, conv_state, ssm_state)
        y_ref, ref_state = U.mamba2_mixer_step(state, cfg, u[:, 0], ref_state)
        assert torch.allclose(y[:, 0], y_ref, atol=1e-6)  # upstream takes A = -exp(A_log.float()): float32's 1e-8
    assert torch.equal(conv_state, ref_state[0]) and torch.allclose(ssm_state, ref_state[1], atol=1e-6)


def test_mamba_ssm_loads_a_torch_export(tmp_path):
    """MambaLMHeadModel.from_pretrained(the folder) holds the exported weights (where mamba_ssm imports)."""
    upstream_package()
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    model = exported_model("mlp 128", 3)
    tm.export_upstream(model, str(tmp_path))
    try:
        lm = MambaLMHeadModel.from_pretrained(str(tmp_path))
    except ValueError as e:  # PyPI 2.3.2.post1's create_block knows only Mamba1 and Mamba2
        pytest.skip(f"this mamba_ssm builds no Mamba3: {e}")
    for name, value in U.torch_to_upstream(model.state_dict()).items():
        assert torch.equal(lm.state_dict()[name].float().cpu(), value), name
