"""The PyTorch mirror (train_mamba.py): every chunked scan against its own one-token recurrence (outputs, final states,
gradients; lengths that are not multiples of the chunk; carried states), the blocks' chunked forward against their
step-by-step decode, logits equal to the MLX model's for the same weights (mamba-2, mamba-3 SISO, mamba-3 MIMO), the
scans under torch.compile, the fused-kernel start-up check, and a CPU smoke run of the script. Tiny shapes, float32.

Needs the optional `torch` extra (`uv sync --extra torch`); without PyTorch the whole module is skipped."""

import contextlib
import math
import os
import subprocess
import sys

import prepare  # noqa: F401  (first, as everywhere: loads the fast BLAS before MLX)
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional extra: uv sync --extra torch)")
F = torch.nn.functional

import train_mamba as tm  # noqa: E402
from conftest import check_step_log, sized_script  # noqa: E402

torch.set_num_threads(1)  # tiny shapes on shared cores: one thread is faster than two threads spinning against others
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def cuda_tf32(allowed):
    """torch.backends.cuda.matmul.allow_tf32 set for the block, then restored (not an attribute monkeypatch can see)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def true_float32_matmuls():
    """float32 matmuls in float32, not TF32 (torch's default; train_mamba.main() allows TF32 on CUDA): the tests hold
    float32 scans to float32 recurrences."""
    with cuda_tf32(False):
        yield


def make_generator(seed):
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def uniform(gen, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


def assert_close(got, want, tol=2e-5, what=""):
    """Max abs error below tol times the reference's scale (at least 1)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} * {scale:.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-2 (SSD)


def ssd_inputs(b, l, h, g, n, p, seed):
    gen = make_generator(seed)
    dt = uniform(gen, 0.01, 0.6, b, l, h)
    return dict(X=randn(gen, b, l, h, p) * dt[..., None], A=-uniform(gen, 0.1, 2.0, h) * dt,
                B=randn(gen, b, l, g, n), C=randn(gen, b, l, g, n))


def ssd_step(X, A, B, C, state):
    """One token of Mamba-2's recurrence S = exp(A) S + X B^T, Y = S C: X (b h p), A (b h), B, C (b g n), state
    (b h p n) -> (Y (b h p), state). The reference the chunked scan is held to."""
    h, g = X.shape[1], B.shape[1]
    B, C = (t.to(state.dtype).repeat_interleave(h // g, dim=1) for t in (B, C))  # (b h n)
    state = torch.exp(A.to(state.dtype))[..., None, None] * state + X.to(state.dtype)[..., :, None] * B[..., None, :]
    return (state @ C[..., None])[..., 0].to(X.dtype), state


def ssd_steps(inputs, state):
    outputs = []
    for t in range(inputs["X"].shape[1]):
        y, state = ssd_step(*(inputs[k][:, t] for k in ("X", "A", "B", "C")), state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


SSD_CASES = [  # (b, l, h, g, n, p, chunk)
    (2, 1, 4, 2, 8, 4, 4),
    (2, 13, 4, 1, 8, 4, 4),
    (1, 37, 4, 4, 6, 3, 8),  # one group per head
    (2, 50, 6, 3, 8, 4, 16),
    (1, 64, 2, 1, 8, 4, 64),  # exactly one chunk
]


@pytest.mark.parametrize("b,l,h,g,n,p,chunk", SSD_CASES)
def test_ssd_scan_matches_recurrence(b, l, h, g, n, p, chunk):
    inputs = ssd_inputs(b, l, h, g, n, p, seed=l)
    start = randn(make_generator(1), b, h, p, n)
    out, state = tm.ssd_scan(**inputs, chunk_size=chunk, initial_states=start)
    ref, ref_state = ssd_steps(inputs, start)
    assert_close(out, ref, what="output")
    assert_close(state, ref_state, what="final state")
    fresh, _ = tm.ssd_scan(**inputs, chunk_size=chunk)
    assert_close(fresh, ssd_steps(inputs, torch.zeros(b, h, p, n))[0], what="output from a zero state")


def test_ssd_gradients_match_recurrence():
    b, l, h, g, n, p = 2, 11, 4, 2, 8, 4
    base = ssd_inputs(b, l, h, g, n, p, seed=5)
    start = randn(make_generator(2), b, h, p, n)
    w_out, w_state = randn(make_generator(3), b, l, h, p), randn(make_generator(4), b, h, p, n)

    def grads(run):
        leaves = {k: v.clone().requires_grad_() for k, v in dict(base, start=start).items()}
        out, state = run({k: leaves[k] for k in base}, leaves["start"])
        ((out * w_out).sum() + (state * w_state).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    chunked = grads(lambda inputs, s: tm.ssd_scan(**inputs, chunk_size=4, initial_states=s))
    stepped = grads(ssd_steps)
    for name in chunked:
        assert_close(chunked[name], stepped[name], 1e-4, f"d/d{name}")


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3 (SISO and MIMO)


def mamba3_inputs(b, l, h, g, n, p, a, rank=None, seed=0, heads_in_angles=True):
    """Scan inputs with realistic ranges: decays in (-1, 0], dt in (0.01, 0.6), trapezoid gates on both sides."""
    gen = make_generator(seed)
    qk = (b, l, g, n) if rank is None else (b, l, rank, g, n)
    bias = (h, n) if rank is None else (h, rank, n)
    inputs = dict(Q=randn(gen, *qk), K=randn(gen, *qk), V=randn(gen, b, l, h, p),
                  ADT=-torch.rand(b, h, l, generator=gen),
                  DT=uniform(gen, 0.01, 0.6, b, h, l), Trap=2 * randn(gen, b, h, l), Q_bias=randn(gen, *bias),
                  K_bias=randn(gen, *bias), Angles=2 * randn(gen, b, l, h if heads_in_angles else 1, a),
                  D=randn(gen, h), Z=randn(gen, b, l, h, p))
    if rank is not None:
        inputs.update(MIMO_V=randn(gen, h, rank, p), MIMO_Z=randn(gen, h, rank, p), MIMO_O=randn(gen, h, rank, p))
    return inputs


def mamba3_state(b, h, n, p, a, rank=None, seed=1):
    gen = make_generator(seed)
    k_shape = (b, h, n) if rank is None else (b, rank, h, n)
    return (uniform(gen, 0, 6.28, b, h, a), randn(gen, b, h, p, n), randn(gen, *k_shape), randn(gen, b, h, p))


def mamba3_scan(inputs, mimo, **kw):
    return tm.mamba3_scan(**inputs, **kw)


def mamba3_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, MIMO_V=None, MIMO_Z=None,
                MIMO_O=None, state=None):
    """One token of Mamba-3's recurrence as the math reads (train_mamba_3_mlx.py's Mamba-3 notes), in tm.mamba3_scan's
    arguments less the time axis: S = alpha S + beta v_prev k_prev^T + gamma v k^T, y = S q + D v, gated."""
    mimo = MIMO_V is not None
    if not mimo:  # a rank axis of 1
        Q, K, Q_bias, K_bias = Q[:, None], K[:, None], Q_bias[:, None], K_bias[:, None]
        if state is not None:
            state = (state[0], state[1], state[2][:, None], state[3])
    b, h, p = V.shape
    acc = torch.float64 if V.dtype == torch.float64 else torch.float32
    r, n, a = Q.shape[1], Q.shape[-1], Angles.shape[-1]
    if state is None:
        state = (torch.zeros(b, h, a), torch.zeros(b, h, p, n), torch.zeros(b, r, h, n), torch.zeros(b, h, p))
    theta, S, k_prev, x_prev = (t.to(acc) for t in state)
    DT, lam = DT.to(acc), torch.sigmoid(Trap.to(acc))
    alpha = torch.exp(ADT.to(acc))
    beta, gamma = (1 - lam) * DT * alpha, lam * DT
    theta = torch.remainder(theta + math.pi * torch.tanh(Angles.to(acc)) * DT[..., None], 2 * math.pi)  # (b h a)
    e = h // Q.shape[-2]
    q = Q.to(acc).repeat_interleave(e, dim=-2) + Q_bias.transpose(0, 1).to(acc)  # (b r h n)
    k = K.to(acc).repeat_interleave(e, dim=-2) + K_bias.transpose(0, 1).to(acc)
    rotate = tm.rotate_halves if mimo else tm.rotate_pairs
    q, k = rotate(q, theta[:, None]), rotate(k, theta[:, None])
    x = V.to(acc)

    def ranks(x):
        return x[:, None] * MIMO_V.transpose(0, 1).to(acc) if mimo else x[:, None]

    v, v_prev = ranks(x), ranks(x_prev)  # (b r h p)
    S = (alpha[..., None, None] * S + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
         + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v, k))
    o = torch.einsum("bhpn,brhn->brhp", S, q)
    if D is not None:
        o = o + D.to(acc)[:, None] * v
    if not mimo:
        o = o[:, 0]
        if Z is not None:
            o = o * F.silu(Z.to(acc))
    else:
        if Z is not None:
            o = o * F.silu(Z.to(acc)[:, None] * MIMO_Z.transpose(0, 1).to(acc))
        if MIMO_O is not None:
            o = (o * MIMO_O.transpose(0, 1).to(acc)).sum(dim=1)
    return o.to(V.dtype), (theta, S, k if mimo else k[:, 0], x)


def mamba3_steps(inputs, mimo, state=None):
    """The recurrence token by token: outputs stacked along time and the final state."""
    step = mamba3_step
    outputs = []
    for t in range(inputs["V"].shape[1]):
        kw = {}
        for name, value in inputs.items():
            if value is None or name in ("Q_bias", "K_bias", "D", "MIMO_V", "MIMO_Z", "MIMO_O"):
                kw[name] = value
            elif name in ("ADT", "DT", "Trap"):
                kw[name] = value[:, :, t]
            else:
                kw[name] = value[:, t]
        y, state = step(**kw, state=state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def assert_states_close(got, want, tol=2e-5):
    for name, x, y in zip(("angle", "S", "k", "x"), got, want):
        if name == "angle":  # compare on the circle: a wrap at 2 pi is not an error
            x, y = torch.stack([x.cos(), x.sin()]), torch.stack([y.cos(), y.sin()])
        assert_close(x, y, tol, f"final {name} state")


SISO_CASES = [  # (b, l, h, g, n, p, a, chunk)
    (2, 1, 4, 2, 8, 4, 2, 4),
    (2, 5, 4, 1, 8, 4, 4, 4),  # every dim rotated
    (1, 33, 4, 4, 8, 6, 1, 8),  # one group per head, one rotated pair
    (2, 70, 2, 1, 16, 4, 4, 16),
    (1, 37, 2, 1, 8, 4, 2, 64),  # shorter than a chunk
]


@pytest.mark.parametrize("b,l,h,g,n,p,a,chunk", SISO_CASES)
def test_siso_scan_matches_recurrence(b, l, h, g, n, p, a, chunk):
    inputs = mamba3_inputs(b, l, h, g, n, p, a, seed=l)
    out, state = mamba3_scan(inputs, False, chunk_size=chunk)
    ref, ref_state = mamba3_steps(inputs, False)
    assert_close(out, ref, what="output")
    assert_states_close(state, ref_state)


MIMO_CASES = [  # (b, l, h, g, n, p, a, rank, chunk)
    (2, 1, 4, 2, 8, 4, 2, 2, 4),
    (2, 5, 2, 1, 8, 4, 4, 4, 2),
    (1, 33, 4, 2, 8, 6, 2, 4, 8),
    (2, 45, 2, 1, 8, 4, 2, 2, 16),
    (1, 20, 2, 2, 8, 4, 1, 1, 8),  # rank 1 through the MIMO path
]


@pytest.mark.parametrize("b,l,h,g,n,p,a,rank,chunk", MIMO_CASES)
def test_mimo_scan_matches_recurrence(b, l, h, g, n, p, a, rank, chunk):
    inputs = mamba3_inputs(b, l, h, g, n, p, a, rank=rank, seed=l + rank)
    out, state = mamba3_scan(inputs, True, chunk_size=chunk)
    ref, ref_state = mamba3_steps(inputs, True)
    assert_close(out, ref, what="output")
    assert_states_close(state, ref_state)


@pytest.mark.parametrize("mimo", [False, True])
def test_optional_paths_match_recurrence(mimo):
    """Without D, without Z, angles shared over heads (b l 1 a), MIMO without the down-projection."""
    inputs = mamba3_inputs(2, 23, 4, 2, 8, 4, 2, rank=2 if mimo else None, seed=5, heads_in_angles=False)
    variants = [dict(D=None), dict(Z=None), dict(D=None, Z=None)]
    if mimo:
        variants += [dict(MIMO_O=None), dict(MIMO_O=None, Z=None, MIMO_Z=None)]
    for change in variants:
        case = dict(inputs, **change)
        out, state = mamba3_scan(case, mimo, chunk_size=8)
        ref, ref_state = mamba3_steps(case, mimo)
        assert_close(out, ref, what=f"output {sorted(change)}")
        assert_states_close(state, ref_state)
    with_all, _ = mamba3_scan(inputs, mimo, chunk_size=8)
    without, _ = mamba3_scan(dict(inputs, D=None, Z=None), mimo, chunk_size=8)
    assert (with_all - without).abs().max() > 0.1  # D and Z are not ignored


@pytest.mark.parametrize("mimo", [False, True])
def test_initial_states_continue_a_sequence(mimo):
    rank = 4 if mimo else None
    b, l, h, g, n, p, a = 2, 29, 4, 2, 8, 4, 2
    inputs = mamba3_inputs(b, l, h, g, n, p, a, rank=rank, seed=11)
    start = mamba3_state(b, h, n, p, a, rank=rank)
    full, full_state = mamba3_scan(inputs, mimo, initial_states=start, chunk_size=4)
    ref, ref_state = mamba3_steps(inputs, mimo, state=start)
    assert_close(full, ref, what="output from a given state")
    assert_states_close(full_state, ref_state)

    def part(lo, hi):
        return {k: None if v is None else v[:, :, lo:hi] if k in ("ADT", "DT", "Trap")
                else v if k in ("Q_bias", "K_bias", "D", "MIMO_V", "MIMO_Z", "MIMO_O") else v[:, lo:hi]
                for k, v in inputs.items()}

    first, middle = mamba3_scan(part(0, 13), mimo, initial_states=start, chunk_size=4)
    second, end = mamba3_scan(part(13, l), mimo, initial_states=middle, chunk_size=8)
    assert_close(torch.cat([first, second], dim=1), full, what="two segments")
    assert_states_close(end, full_state)


@pytest.mark.parametrize("mimo,rank", [(False, None), (True, 2)])
def test_mamba3_gradients_match_recurrence(mimo, rank):
    """d(loss)/d(every input, parameter and initial state) of the chunked scan equals that of the recurrence."""
    b, l, h, g, n, p, a = 2, 11, 4, 2, 8, 4, 2
    base = mamba3_inputs(b, l, h, g, n, p, a, rank=rank, seed=21)
    start = mamba3_state(b, h, n, p, a, rank=rank)
    w_out = randn(make_generator(99), b, l, h, p)
    w_states = [randn(make_generator(100 + i), *s.shape) for i, s in enumerate(start)]

    def grads(run):
        leaves = {k: v.clone().requires_grad_() for k, v in base.items()}
        start_leaves = [s.clone().requires_grad_() for s in start]
        out, state = run(leaves, tuple(start_leaves))
        loss = (out * w_out).sum() + torch.sin(state[0]).sum()  # the angle only matters modulo 2 pi
        loss = loss + sum((s * w).sum() for s, w in zip(state[1:], w_states[1:]))
        loss.backward()
        return {**{k: v.grad for k, v in leaves.items()}, **{f"state{i}": s.grad for i, s in enumerate(start_leaves)}}

    chunked = grads(lambda inputs, s: mamba3_scan(inputs, mimo, initial_states=s, chunk_size=4))
    stepped = grads(lambda inputs, s: mamba3_steps(inputs, mimo, state=s))
    for name in chunked:
        assert chunked[name] is not None and stepped[name] is not None, name
        assert_close(chunked[name], stepped[name], 1e-4, f"d/d{name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: TF32 is a mode of CUDA's float32 matmuls")
@pytest.mark.parametrize("allow_tf32,tolerance", [(False, 2e-5), (True, 5e-3)])
def test_scan_precision_on_cuda_with_and_without_tf32(allow_tf32, tolerance):
    """A model-sized SISO scan (n = p = chunk = 64, four chunks) in float32 on the GPU against the recurrence in float64
    on the CPU: float32's tolerance with TF32 off, a looser one with it on (as main() sets it). TF32 rounds matmul
    operands to 10 mantissa bits; emulated on the CPU (operands so rounded), this scan was off by up to 1e-3
    relative."""
    inputs = mamba3_inputs(2, 256, 4, 2, 64, 64, 16, seed=0)
    ref, ref_state = mamba3_steps({k: v.double() for k, v in inputs.items()}, False)
    with cuda_tf32(allow_tf32):
        out, state = mamba3_scan({k: v.cuda() for k, v in inputs.items()}, False, chunk_size=64)
    assert_close(out.cpu(), ref, tolerance, "output")
    assert_close(state[1].cpu(), ref_state[1], tolerance, "final state")


def test_rotation_pairs_as_upstream_by_hand():
    """Pins the pairings (upstream's kernels): with n = 8 and two angles, SISO turns dims (0, 1), (2, 3); MIMO turns
    (0, 4), (1, 5); the other dims pass through. The step and the chunked scan agree on the one-token k state."""
    angles, dt = 0.7, 0.3
    theta = math.pi * math.tanh(angles) * dt
    c, s = math.cos(theta), math.sin(theta)
    k = torch.arange(1.0, 9.0)
    expected = {False: [c - 2 * s, s + 2 * c, 3 * c - 4 * s, 3 * s + 4 * c, 5.0, 6.0, 7.0, 8.0],
                True: [c - 5 * s, 2 * c - 6 * s, 3.0, 4.0, s + 5 * c, 2 * s + 6 * c, 7.0, 8.0]}
    for mimo in (False, True):
        kk = k.reshape(1, 1, 1, 8) if mimo else k.reshape(1, 1, 8)  # (b r g n) or (b g n)
        bias = torch.zeros(1, 1, 8) if mimo else torch.zeros(1, 8)
        token = dict(Q=kk, K=kk, V=torch.ones(1, 1, 1), ADT=torch.tensor([[-0.5]]), DT=torch.tensor([[dt]]),
                     Trap=torch.tensor([[0.4]]), Q_bias=bias, K_bias=bias, Angles=torch.tensor([[[angles, angles]]]))
        if mimo:
            token.update(MIMO_V=torch.ones(1, 1, 1), MIMO_Z=torch.ones(1, 1, 1), MIMO_O=torch.ones(1, 1, 1))
        _, (_, _, k_step, _) = mamba3_step(**token)
        sequence = {name: value.unsqueeze(1) if name in ("Q", "K", "V", "Angles") else value
                    for name, value in token.items()}
        sequence.update(ADT=token["ADT"][..., None], DT=token["DT"][..., None], Trap=token["Trap"][..., None])
        _, (_, _, k_scan, _) = mamba3_scan(sequence, mimo, chunk_size=4)
        for got in (k_step, k_scan):
            assert torch.allclose(got.flatten(), torch.tensor(expected[mimo]), atol=1e-6), (mimo, got)


def test_cumulative_angles_stay_precise_on_long_sequences():
    """The two-level angle sum (within chunks, then wrapped chunk totals) against a float64 running sum."""
    gen = make_generator(7)
    increments = uniform(gen, 0.0, 3.0, 1, 5000, 2, 3)
    theta = tm.cumulative_angles(increments, None, 64)
    exact = torch.remainder(increments.double().cumsum(dim=1), 2 * math.pi)
    assert torch.stack([theta.cos() - exact.cos(), theta.sin() - exact.sin()]).abs().max() < 5e-5


# ---------------------------------------------------------------------------------------------------------------------
# Blocks and language model

TINY = dict(vocab_size=50, depth=2, d_model=16, d_state=8, headdim=8, expand=2, ngroups=2, chunk_size=4)
ARCHITECTURES = {  # name: ModelConfig overrides
    "mamba-2": dict(architecture="mamba-2"),
    "mamba-2 mlp": dict(architecture="mamba-2", mlp_expand=2),
    "mamba-3 siso": dict(architecture="mamba-3"),
    "mamba-3 mimo": dict(architecture="mamba-3", is_mimo=True, mimo_rank=2),
    "mamba-3 siso outproj-norm": dict(architecture="mamba-3", is_outproj_norm=True),
    "mamba-3 mimo outproj-norm": dict(architecture="mamba-3", is_mimo=True, mimo_rank=2, is_outproj_norm=True),
}


def perturbed_model(overrides, seed=0):
    """A tiny model whose biases, norms, D and MIMO weights are moved off their initial values (ones, 1/r), so that
    a mistake in how any of them is applied shows."""
    torch.manual_seed(seed)
    model = tm.MambaLM(tm.ModelConfig(**TINY, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1 or "bias" in name or "mimo" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_prefill_and_step_match_forward(name):
    """Logits of a chunked prefill, a second prefill from its cache, then one-token steps equal the full forward's."""
    model = perturbed_model(ARCHITECTURES[name])
    ids = torch.randint(0, 50, (2, 11), generator=make_generator(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2)
        assert_close(model(ids[:, :3], cache=cache), full[:, :3], 1e-5, "prefill")
        assert_close(model(ids[:, 3:6], cache=cache), full[:, 3:6], 1e-5, "prefill from a cache")
        for t in range(6, 11):
            logits, cache = model.step(ids[:, t], cache)
            assert_close(logits, full[:, t], 1e-5, f"step {t}")
    loss = model(ids, ids)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_optimizer_groups_and_schedule(monkeypatch):
    model = perturbed_model(ARCHITECTURES["mamba-2"])
    names = {id(p): n for n, p in model.named_parameters()}
    for optimizer in ("muon", "adamw"):
        monkeypatch.setattr(tm, "OPTIMIZER", optimizer)
        made = tm.Optimizer(model, torch.device("cpu"))
        assert len(made.param_groups) == 3
        embedding, = (g for g in made.param_groups if g["params"][0] is model.embed.weight)
        matrices, = (g for g in made.param_groups if g is not embedding and g["weight_decay"] > 0)
        scalars, = (g for g in made.param_groups if g["weight_decay"] == 0)
        assert [names[id(p)] for p in embedding["params"]] == ["embed.weight"] and embedding["weight_decay"] > 0
        assert (embedding["lr"], matrices["lr"], scalars["lr"]) == (tm.EMBEDDING_LR, tm.MATRIX_LR, tm.SCALAR_LR)
        assert matrices["weight_decay"] > 0 and all(p.ndim == 2 and names[id(p)].endswith(
            ("in_proj.weight", "out_proj.weight")) for p in matrices["params"])
        assert scalars["weight_decay"] == 0
        for no_decay in ("A_log", "dt_bias", ".D", "norm_weight", "norm.weight", "conv.bias", "conv.weight"):
            assert any(names[id(p)].endswith(no_decay) for p in scalars["params"]), no_decay
        by_muon = made.muon["params"] if made.muon else []
        assert by_muon == (matrices["params"] if optimizer == "muon" else [])
        assert not {id(p) for p in by_muon} & {id(p) for g in made.adamw.param_groups for p in g["params"]}
    assert tm.lr_multiplier(1.0 - tm.WARMDOWN_RATIO) == 1.0
    assert tm.lr_multiplier(1.0) == pytest.approx(tm.FINAL_LR_FRAC)
    monkeypatch.setattr(tm, "WARMUP_RATIO", 0.0)
    assert tm.lr_multiplier(0.0) == 1.0  # no warmup: the first step runs at the peak
    monkeypatch.setattr(tm, "WARMUP_RATIO", 0.1)
    assert tm.lr_multiplier(0.0) == 0.0 and tm.lr_multiplier(0.05) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the MLX model: the same weights give the same logits


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_mlx_model(name):
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    import train_mamba_3_mlx as mlx_script

    config = dict(TINY, vocab_size=64, d_model=32, d_state=16, chunk_size=8, **ARCHITECTURES[name])
    mx.random.seed(1)
    mlx_model = mlx_script.MambaLM(mlx_script.ModelConfig(**config))
    rng = np.random.RandomState(0)
    arrays = {}
    for key, value in tree_flatten(mlx_model.parameters()):
        array = np.array(value)
        if array.ndim <= 1 or "bias" in key or "mimo" in key:  # off the ones/1/r init, as in perturbed_model
            array = array + 0.3 * rng.randn(*array.shape).astype(np.float32)
        arrays[key] = array
    mlx_model.load_weights([(key, mx.array(value)) for key, value in arrays.items()])
    torch_model = tm.MambaLM(tm.ModelConfig(**config))
    tm.load_mlx_parameters(torch_model, arrays)
    ids = rng.randint(0, 64, (2, 21)).astype(np.int32)  # 21: not a multiple of the chunk
    want = np.array(mlx_model(mx.array(ids)))
    with torch.no_grad():
        got = torch_model(torch.from_numpy(ids).long()).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name, optimizer", [("mamba-3 siso", "muon"), ("mamba-2 mlp", "muon"),
                                             ("mamba-3 siso", "adamw")])
def test_training_steps_match_mlx_script(name, optimizer, monkeypatch):
    """From the same weights and batches, the scripts' own training steps (optimizer groups, clip, Muon or AdamW,
    gradient accumulation, schedule multiplier) give the same losses and the same weights: the dynamics agree."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    import train_mamba_3_mlx as mlx_script

    monkeypatch.setattr(mlx_script, "OPTIMIZER", optimizer)
    monkeypatch.setattr(tm, "OPTIMIZER", optimizer)

    config = dict(vocab_size=64, depth=2, d_model=32, d_state=16, headdim=16, chunk_size=8, **ARCHITECTURES[name])
    mx.random.seed(3)
    mlx_model = mlx_script.MambaLM(mlx_script.ModelConfig(**config))
    torch_model = tm.MambaLM(tm.ModelConfig(**config))
    tm.load_mlx_parameters(torch_model, {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())})
    rng = np.random.RandomState(0)
    grad_accum, steps = 2, 6
    batches = []
    for _ in range(grad_accum * steps):
        row = rng.randint(0, 64, (2, 21)).astype(np.int32)
        batches.append((row[:, :-1].copy(), row[:, 1:].copy(), 0))
    mlx_step = mlx_script.make_training_step(mlx_model, mlx_script.Optimizer(mlx_model), grad_accum)
    torch_step = tm.make_training_step(torch_model, tm.Optimizer(torch_model, torch.device("cpu")), grad_accum,
                                       torch.device("cpu"), compile_model=False)
    mlx_batches, torch_batches = iter(batches), iter(batches)  # neither step fetches beyond its own micro-batches
    for i in range(steps):
        lr_mult = tm.lr_multiplier(i / steps)
        want, _ = mlx_step(mlx_batches, lr_mult)
        got, _ = torch_step(torch_batches, lr_mult)
        assert abs(got.item() - want.item()) <= 1e-4, f"step {i}: loss {got.item():.6f} != {want.item():.6f}"
    mlx_params = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())}
    for key, param in torch_model.named_parameters():
        want = mlx_params[key]
        err = np.abs(param.detach().numpy() - want).max()
        assert err <= 1e-4 * max(1.0, np.abs(want).max()), f"{key}: max weight difference {err:.2e} after {steps} steps"


def test_mlx_parameter_names_are_required():
    model = perturbed_model(ARCHITECTURES["mamba-3 siso"])
    arrays = {name: p.detach().numpy() for name, p in model.named_parameters()}
    tm.load_mlx_parameters(model, arrays)  # round trip
    with pytest.raises(KeyError, match="missing"):
        tm.load_mlx_parameters(model, {k: v for k, v in arrays.items() if k != "embed.weight"})
    with pytest.raises(ValueError, match="D"):
        tm.load_mlx_parameters(model, dict(arrays, **{"layers.0.mixer.D": arrays["layers.0.mixer.D"][:-1]}))


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile and the fused-kernel check


@pytest.mark.parametrize("name", ["mamba-2", "mamba-3 mimo"])
def test_model_traces_into_one_graph_under_autocast(name):
    """The whole model, as main() compiles it (bf16 autocast, the loss inside), traces with fullgraph=True, which fails
    on any graph break; the aot_eager backend traces forward and backward without building C++/Triton code (fast on
    CPU). The result equals the eager model's."""
    model = perturbed_model(ARCHITECTURES[name])
    model.compute_dtype = torch.bfloat16
    ids = torch.randint(0, 50, (2, 19), generator=make_generator(1))  # 19: not a multiple of the chunk
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, ids)
    loss.backward()
    assert loss.item() == pytest.approx(model(ids, ids).item(), rel=1e-3)
    with torch.no_grad():
        assert compiled(ids).dtype == torch.float32


def test_fused_check_accepts_a_match_and_rejects_a_mismatch():
    """The start-up check of a fused kernel, run on CPU with stand-ins: the pure scan itself passes; a 'kernel' with
    another trapezoid convention (lam and 1 - lam swapped) fails on the output and gradients."""
    config = tm.ModelConfig(**TINY, architecture="mamba-3")
    problem = tm._random_scan_problem("siso", config, 1, 12, torch.device("cpu"), torch.float32)

    def same(**kw):
        return tm.mamba3_scan(**kw)[0]

    def swapped_gate(**kw):
        return tm.mamba3_scan(**dict(kw, Trap=-kw["Trap"]))[0]

    ok, detail = tm.fused_matches_pure(same, tm.mamba3_scan, problem, config.chunk_size)
    assert ok, detail
    ok, detail = tm.fused_matches_pure(swapped_gate, tm.mamba3_scan, problem, config.chunk_size)
    assert not ok, detail
    assert tm.choose_scan_backend(config, torch.device("cpu")) == "torch" and not tm.FUSED


# ---------------------------------------------------------------------------------------------------------------------
# Smoke run of the script

def test_smoke_run_prints_a_finite_summary(prepared_cache, architecture="mamba-3"):
    """python train_mamba.py on CPU, sized by the smoke preset and then its DEPTH line edited by hand to 3, prints
    the summary block with the MLX script's keys plus scan_backend, and trains the depth that line says. One
    architecture: the loop is the same for all, and the blocks are covered above."""
    script = sized_script("train_mamba", ARCHITECTURE=architecture)
    with open(script) as f:
        text = f.read()
    assert "\nDEPTH = 2  #" in text
    with open(script, "w") as f:
        f.write(text.replace("\nDEPTH = 2  #", "\nDEPTH = 3  #"))  # the edit a user or an agent makes
    env = dict(os.environ, OMP_NUM_THREADS="1")  # shared cores: one thread avoids OpenMP spinning against others
    done = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("\n---\n")[-1]
    fields = dict(line.split(": ", 1) for line in summary.strip().splitlines())
    keys = ["architecture", "preset", "val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "mfu_percent",
            "total_tokens_M", "num_steps", "num_params_M", "depth", "scan_backend", "world_size", "machine_speed",
            "budget_check", "harness"]
    assert list(fields) == keys
    assert fields["architecture"] == architecture and fields["depth"] == "3"
    assert fields["world_size"] == "1" and fields["budget_check"] == "ok"  # no batch fetched beyond the last step
    assert fields["scan_backend"] == "torch" or fields["scan_backend"].startswith("mamba_ssm.")  # fused: CUDA only
    for key in ("val_bpb", "training_seconds", "peak_memory_mb", "mfu_percent", "num_params_M"):
        assert math.isfinite(float(fields[key])) and float(fields[key]) > 0, key
    assert 0 < float(fields["val_bpb"]) < 20
    check_step_log(done.stdout, fields)  # one line per step; the run ends at the step end nearest to the budget
