"""The chunked scans and blocks of train_mamba_3_mlx.py against their one-token step forms (tiny shapes, CPU).

The step forms (tests/mlx_reference.py) are the definitions; the chunked forms are what training runs. Every test here
compares the two: outputs, final states, gradients, carried states, whole blocks, whole language models."""

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_reference as R
import train_mamba_3_mlx as T


def close(a, b, tol=1e-4):
    """Max abs difference, relative to the size of the reference."""
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max()) / scale
    assert err < tol, f"max error {err:.2e} (tolerance {tol:.0e})"


def ssd_by_steps(X, A, B, C, state=None):
    """The SSD recurrence token by token with the step reference."""
    b, l, h, p = X.shape
    state = mx.zeros((b, h, p, B.shape[-1])) if state is None else state
    ys = []
    for t in range(l):
        y, state = R.ssd_step(X[:, t], A[:, t], B[:, t], C[:, t], state)
        ys.append(y)
    return mx.stack(ys, axis=1), state


def random_ssd_inputs(b, l, h, p, g, n, seed=0):
    mx.random.seed(seed)
    X = mx.random.normal((b, l, h, p))
    A = -mx.random.uniform(0.0, 1.5, (b, l, h))  # A * dt <= 0
    B = mx.random.normal((b, l, g, n))
    C = mx.random.normal((b, l, g, n))
    return X, A, B, C


# (batch, length, heads, headdim p, groups, state n, chunk): lengths shorter than, equal to and not divisible by the
# chunk; one group, several groups, one group per head.
SHAPES = [
    (2, 1, 4, 8, 1, 4, 4),
    (2, 7, 4, 8, 2, 4, 4),
    (1, 33, 6, 4, 3, 8, 8),
    (2, 64, 4, 8, 1, 16, 16),
    (1, 100, 4, 8, 4, 8, 32),
    (1, 100, 2, 4, 1, 4, 64),
]


def test_fast_exp_matches_exp_and_its_gradient():
    x = mx.concatenate([mx.linspace(-80.0, 80.0, 10001), mx.array([0.0, -1e-8, 1e-8])])
    close(T.exp(x) / mx.exp(x), mx.ones_like(x), tol=1e-6)
    close(mx.grad(lambda v: T.exp(v).sum())(x) / mx.exp(x), mx.ones_like(x), tol=1e-6)
    extreme = T.exp(mx.array([-mx.inf, -1000.0, 1000.0, mx.inf]))
    assert extreme[0].item() == 0.0 and extreme[1].item() == 0.0  # exactly zero, never denormal or NaN
    assert math.isfinite(extreme[2].item()) and math.isfinite(extreme[3].item())
    close(T.silu(x[::100]), x[::100] * mx.sigmoid(x[::100]), tol=1e-6)
    y = mx.linspace(-30.0, 30.0, 601)
    close(T.softplus(y), mx.logaddexp(y, 0.0), tol=1e-6)


def test_decay_matrix_is_the_product_of_decays_between_two_steps():
    a = -mx.random.uniform(0.0, 2.0, (3, 6))
    L = np.array(T.decay_matrix(a))
    an = np.array(a)
    for i in range(6):
        for j in range(6):
            expected = np.exp(an[:, j + 1 : i + 1].sum(-1)) if j <= i else 0.0
            np.testing.assert_allclose(L[:, i, j], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", SHAPES)
def test_ssd_scan_equals_step_by_step(b, l, h, p, g, n, chunk):
    X, A, B, C = random_ssd_inputs(b, l, h, p, g, n)
    Y, state = T.ssd_scan(X, A, B, C, chunk)
    Y_ref, state_ref = ssd_by_steps(X, A, B, C)
    close(Y, Y_ref)
    close(state, state_ref)


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", SHAPES[1:5])
def test_ssd_scan_gradients_equal_step_by_step(b, l, h, p, g, n, chunk):
    X, A, B, C = random_ssd_inputs(b, l, h, p, g, n, seed=1)
    weights_y = mx.random.normal((b, l, h, p))
    weights_s = mx.random.normal((b, h, p, n))

    def loss(fn):
        def scalar(X, A, B, C):
            Y, state = fn(X, A, B, C)
            return (Y * weights_y).sum() + (state * weights_s).sum()

        return mx.grad(scalar, argnums=(0, 1, 2, 3))(X, A, B, C)

    grads = loss(lambda *a: T.ssd_scan(*a, chunk))
    grads_ref = loss(ssd_by_steps)
    for g_scan, g_ref in zip(grads, grads_ref):
        close(g_scan, g_ref, tol=2e-4)


def test_ssd_scan_accepts_heads_for_b_and_c():
    X, A, B, C = random_ssd_inputs(1, 20, 4, 8, 4, 8)  # g = h: B, C given per head (b l h n)
    close(T.ssd_scan(X, A, B, C, 8)[0], ssd_by_steps(X, A, B, C)[0])


@pytest.mark.parametrize("l,chunk", [(40, 16), (37, 8)])
def test_ssd_scan_initial_states_equal_running_two_halves(l, chunk):
    X, A, B, C = random_ssd_inputs(2, l, 4, 8, 2, 8, seed=2)
    Y_all, state_all = T.ssd_scan(X, A, B, C, chunk)
    half = l // 2 + 1
    Y1, state1 = T.ssd_scan(X[:, :half], A[:, :half], B[:, :half], C[:, :half], chunk)
    Y2, state2 = T.ssd_scan(X[:, half:], A[:, half:], B[:, half:], C[:, half:], chunk, initial_states=state1)
    close(mx.concatenate([Y1, Y2], axis=1), Y_all)
    close(state2, state_all)


def test_ssd_scan_is_stable_for_strong_decay_and_long_chunks():
    X, A, B, C = random_ssd_inputs(1, 128, 2, 4, 1, 4, seed=3)
    Y, state = T.ssd_scan(X, A * 40.0, B, C, 128)  # exp of segment sums down to about -8000: no inf/NaN
    assert np.isfinite(np.array(Y)).all() and np.isfinite(np.array(state)).all()
    close(Y, ssd_by_steps(X, A * 40.0, B, C)[0])


def block_by_tokens(block, x, prefix=0):
    """The block run on `prefix` tokens at once, then one token at a time, carrying its state (the decode path)."""
    ys, state = [], None
    if prefix:
        y, state = block(x[:, :prefix])
        ys.append(y)
    for t in range(prefix, x.shape[1]):
        y, state = block(x[:, t : t + 1], state)
        ys.append(y)
    return mx.concatenate(ys, axis=1)


@pytest.mark.parametrize("ngroups,chunk,l", [(1, 8, 21), (2, 16, 16)])
def test_mamba2_block_forward_equals_decode_with_carried_state(ngroups, chunk, l):
    mx.random.seed(4)
    block = T.Mamba2(tiny_config("mamba-2", ngroups=ngroups, chunk_size=chunk))
    x = mx.random.normal((2, l, 16))
    y, _ = block(x)
    close(y, block_by_tokens(block, x))
    close(y, block_by_tokens(block, x, prefix=6))


def test_mamba2_init_matches_upstream_ranges():
    mx.random.seed(5)
    block = T.Mamba2(tiny_config("mamba-2", d_model=64, d_state=16, headdim=16, chunk_size=16))
    dt = np.array(T.softplus(block.dt_bias))
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    A = -np.exp(np.array(block.A_log))
    assert A.min() >= -16.0 and A.max() <= -1.0
    assert block.in_proj.weight.shape == (2 * 128 + 2 * 16 + 8, 64)  # z | x B C | dt
    assert T.Mamba2(tiny_config("mamba-2", chunk_size=0)).chunk_size == 32


def tiny_config(architecture, **overrides):
    fields = dict(architecture=architecture, vocab_size=50, depth=2, d_model=16, d_state=8, headdim=8, expand=2,
                  ngroups=1, d_conv=4, chunk_size=8, mlp_expand=0)
    fields.update(overrides)
    return T.ModelConfig(**fields)


def lm_by_tokens(model, ids):
    """Logits one token at a time through the cache (the path generate takes)."""
    cache = [None] * len(model.layers)
    return mx.concatenate([model(ids[:, t : t + 1], cache) for t in range(ids.shape[1])], axis=1)


@pytest.mark.parametrize(
    "architecture,overrides",
    [
        ("mamba-2", {}),
        ("mamba-2", {"mlp_expand": 2, "ngroups": 2}),
        ("mamba-3", {}),
        ("mamba-3", {"is_mimo": True, "mimo_rank": 2}),
    ],
)
def test_language_model_forward_equals_decode_with_cache(architecture, overrides):
    mx.random.seed(6)
    model = T.MambaLM(tiny_config(architecture, **overrides))
    ids = mx.random.randint(0, 50, (2, 19)).astype(mx.int32)
    logits = model(ids)
    assert logits.shape == (2, 19, 50)
    close(logits, lm_by_tokens(model, ids))


def test_optimizer_groups_and_no_weight_decay_on_ssm_parameters():
    model = T.MambaLM(tiny_config("mamba-2", mlp_expand=2))
    opt = T.Optimizer(model)
    for name, decay in opt.weight_decay.items():
        leaf = name.split(".")[-1]
        if leaf in ("A_log", "dt_bias", "D", "bias") or "norm" in name or name.endswith("conv.weight"):
            assert decay == 0.0, name
        if name.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight")) or name == "embed.weight":
            assert decay == T.WEIGHT_DECAY, name


def test_lr_schedule_shape(monkeypatch):
    assert T.lr_multiplier(1.0 - T.WARMDOWN_RATIO) == 1.0
    assert abs(T.lr_multiplier(1.0) - T.FINAL_LR_FRAC) < 1e-9
    monkeypatch.setattr(T, "WARMUP_RATIO", 0.0)
    assert T.lr_multiplier(0.0) == 1.0  # no warmup: the first step runs at the peak
    monkeypatch.setattr(T, "WARMUP_RATIO", 0.1)
    assert T.lr_multiplier(0.0) == 0.0 and abs(T.lr_multiplier(0.05) - 0.5) < 1e-9 and T.lr_multiplier(0.1) == 1.0


@pytest.mark.parametrize("architecture", ["mamba-2", "mamba-3"])
def test_bfloat16_compute_stays_close_to_float32(architecture):
    mx.random.seed(7)
    model = T.MambaLM(tiny_config(architecture))
    ids = mx.random.randint(0, 50, (2, 24)).astype(mx.int32)
    logits32 = model(ids)
    model16 = T.MambaLM(tiny_config(architecture), compute_dtype=mx.bfloat16)
    model16.update(model.parameters())  # same float32 weights, bf16 activations
    logits16 = model16(ids)
    assert logits16.dtype == mx.bfloat16
    close(logits16.astype(mx.float32), logits32, tol=5e-2)
    loss = T.cross_entropy(logits16, ids)
    assert np.isfinite(loss.item())


def test_causal_conv1d_and_its_gradient_match_the_definition():
    mx.random.seed(8)
    window, w, bias = mx.random.normal((2, 12, 5)), mx.random.normal((4, 5)), mx.random.normal((5,))
    g = mx.random.normal((2, 9, 5))

    def reference(window, w, bias):  # out_t = bias + sum_k w[k] window_{t+k}, differentiated by autodiff
        return bias + sum(w[k] * window[:, k : k + 9] for k in range(4))

    close(T.causal_conv1d(window, w, bias), reference(window, w, bias))
    grads = mx.grad(lambda *a: (T.causal_conv1d(*a) * g).sum(), argnums=(0, 1, 2))(window, w, bias)
    grads_ref = mx.grad(lambda *a: (reference(*a) * g).sum(), argnums=(0, 1, 2))(window, w, bias)
    for a, b in zip(grads, grads_ref):
        close(a, b, tol=1e-5)
