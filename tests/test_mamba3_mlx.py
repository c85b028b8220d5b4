"""Mamba-3 in MLX: the chunked SISO/MIMO scans against their one-token recurrences (outputs, final states and
gradients), state passing across segments, the block's chunked forward against its step-by-step decode, bf16 inputs.
Tiny shapes, float32, tolerances that a wrong term in the recurrence would fail by orders of magnitude."""

import json
import math
import os
import subprocess
import sys

import prepare  # noqa: F401  (before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_reference as R
import train_mamba_3_mlx as m


def random_inputs(b, l, h, g, n, p, a, rank=None, seed=0, heads_in_angles=True):
    """Scan inputs with realistic ranges: decays in (-1, 0], dt in (0.01, 0.6), trapezoid gates on both sides."""
    mx.random.seed(seed)
    R = mx.random
    qk_shape = (b, l, g, n) if rank is None else (b, l, rank, g, n)
    bias_shape = (h, n) if rank is None else (h, rank, n)
    inputs = dict(
        Q=R.normal(qk_shape), K=R.normal(qk_shape), V=R.normal((b, l, h, p)),
        ADT=-R.uniform(shape=(b, h, l)), DT=R.uniform(0.01, 0.6, (b, h, l)), Trap=2 * R.normal((b, h, l)),
        Q_bias=R.normal(bias_shape), K_bias=R.normal(bias_shape),
        Angles=2 * R.normal((b, l, h if heads_in_angles else 1, a)), D=R.normal((h,)), Z=R.normal((b, l, h, p)),
    )
    if rank is not None:
        inputs.update(MIMO_V=R.normal((h, rank, p)), MIMO_Z=R.normal((h, rank, p)), MIMO_O=R.normal((h, rank, p)))
    return inputs


def random_state(b, h, n, p, a, rank=None, seed=1):
    mx.random.seed(seed)
    k_shape = (b, h, n) if rank is None else (b, rank, h, n)
    return (mx.random.uniform(0, 6.28, (b, h, a)), mx.random.normal((b, h, p, n)), mx.random.normal(k_shape),
            mx.random.normal((b, h, p)))


def scan(inputs, mimo, lean_backward=False, **kw):
    """mamba3_scan (MIMO when the inputs hold MIMO_V); lean_backward: the rotate_qk, scan and gate a checkpointed MIMO
    block takes (the speed section's hand-written gradients)."""
    assert mimo == ("MIMO_V" in inputs)
    lean = dict(zip(("rotate_qk", "scan", "gate"), m.lean_backward)) if lean_backward else {}
    return m.mamba3_scan(**inputs, **kw, **lean)


def run_steps(inputs, mimo, state=None):
    """The recurrence token by token: stacked outputs `b l ...` and the final state."""
    fn = R.mamba3_mimo_step if mimo else R.mamba3_siso_step
    per_token = ("Q", "K", "V", "Angles", "Z")  # `b l ...`
    per_head_token = ("ADT", "DT", "Trap")  # `b h l`
    outputs = []
    for t in range(inputs["V"].shape[1]):
        kw = {}
        for name, value in inputs.items():
            if value is None:
                kw[name] = None
            elif name in per_token:
                kw[name] = value[:, t]
            elif name in per_head_token:
                kw[name] = value[:, :, t]
            else:
                kw[name] = value
        y, state = fn(**kw, state=state)
        outputs.append(y)
    return mx.stack(outputs, axis=1), state


def max_err(x, y):
    return mx.max(mx.abs(x.astype(mx.float32) - y.astype(mx.float32))).item()


def assert_close(x, y, tol=2e-5, what=""):
    """Max abs error below tol times the reference's scale (at least 1)."""
    scale = max(1.0, mx.max(mx.abs(y)).item())
    assert x.shape == y.shape, f"{what}: shape {x.shape} != {y.shape}"
    err = max_err(x, y)
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} * {scale:.2f}"


def assert_states_close(s1, s2, tol=2e-5):
    for name, x, y in zip(("angle", "ssm", "k", "v"), s1, s2):
        if name == "angle":  # compare angles on the circle (a wrap at 2*pi is not an error)
            x, y = mx.stack([mx.cos(x), mx.sin(x)]), mx.stack([mx.cos(y), mx.sin(y)])
        assert_close(x, y, tol, f"final {name} state")


# ---------------------------------------------------------------------------------------------------------------------
# Chunked scans against the recurrence


SISO_CASES = [  # (b, l, h, g, n, p, a, chunk)
    (2, 1, 4, 2, 8, 4, 2, 4),
    (2, 5, 4, 1, 8, 4, 4, 4),  # every dim rotated (a = n / 2)
    (1, 33, 4, 4, 8, 6, 1, 8),  # one group per head, a single rotated pair
    (2, 100, 2, 1, 16, 4, 4, 16),
    (1, 64, 2, 2, 8, 4, 2, 64),  # exactly one chunk
    (1, 37, 2, 1, 8, 4, 2, 64),  # shorter than a chunk
]


@pytest.mark.parametrize("b,l,h,g,n,p,a,chunk", SISO_CASES)
def test_siso_scan_matches_recurrence(b, l, h, g, n, p, a, chunk):
    inputs = random_inputs(b, l, h, g, n, p, a, seed=l)
    out, state = scan(inputs, False, chunk_size=chunk)
    ref, ref_state = run_steps(inputs, False)
    assert_close(out, ref, what="output")
    assert_states_close(state, ref_state)


MIMO_CASES = [  # (b, l, h, g, n, p, a, rank, chunk)
    (2, 1, 4, 2, 8, 4, 2, 2, 4),
    (2, 5, 2, 1, 8, 4, 4, 4, 2),
    (1, 33, 4, 2, 8, 6, 2, 4, 8),
    (2, 100, 2, 1, 8, 4, 2, 2, 16),
    (1, 20, 2, 2, 8, 4, 1, 1, 8),  # rank 1 through the MIMO path
]


@pytest.mark.parametrize("b,l,h,g,n,p,a,rank,chunk", MIMO_CASES)
def test_mimo_scan_matches_recurrence(b, l, h, g, n, p, a, rank, chunk):
    inputs = random_inputs(b, l, h, g, n, p, a, rank=rank, seed=l + rank)
    out, state = scan(inputs, True, chunk_size=chunk)
    ref, ref_state = run_steps(inputs, True)
    assert_close(out, ref, what="output")
    assert_states_close(state, ref_state)


def test_mimo_rank_one_equals_siso():
    """Rank 1 is SISO up to a relabelling of the state dims: MIMO turns (j, n/2 + j), SISO (2j, 2j+1) (upstream's
    kernels), so SISO gets dims j, n/2 + j in its slots 2j, 2j+1."""
    inputs = random_inputs(2, 19, 4, 2, 8, 4, 2, rank=1, seed=3)
    ones = mx.ones((4, 1, 4))
    inputs.update(MIMO_V=ones, MIMO_Z=ones, MIMO_O=ones)
    out, state = scan(inputs, True, chunk_size=8)
    perm = mx.array([0, 4, 1, 5, 2, 3, 6, 7])  # n = 8, a = 2
    siso = dict(inputs, Q=inputs["Q"][:, :, 0][..., perm], K=inputs["K"][:, :, 0][..., perm],
                Q_bias=inputs["Q_bias"][:, 0][..., perm], K_bias=inputs["K_bias"][:, 0][..., perm])
    for name in ("MIMO_V", "MIMO_Z", "MIMO_O"):
        del siso[name]
    ref, ref_state = scan(siso, False, chunk_size=8)
    assert_close(out, ref, what="output")
    assert_close(state[2][:, 0][..., perm], ref_state[2], what="k state")
    assert_close(state[1][..., perm], ref_state[1], what="ssm state")


@pytest.mark.parametrize("mimo", [False, True])
def test_optional_paths_match_recurrence(mimo):
    """Without D, without Z, with angles shared over heads (`b l 1 a`), and MIMO without the down-projection."""
    rank = 2 if mimo else None
    inputs = random_inputs(2, 23, 4, 2, 8, 4, 2, rank=rank, seed=5, heads_in_angles=False)
    variants = [dict(D=None), dict(Z=None), dict(D=None, Z=None)]
    if mimo:
        variants.append(dict(MIMO_O=None))
        variants.append(dict(MIMO_O=None, Z=None, MIMO_Z=None))
    for change in variants:
        case = dict(inputs, **change)
        out, state = scan(case, mimo, chunk_size=8)
        ref, ref_state = run_steps(case, mimo)
        assert_close(out, ref, what=f"output {sorted(change)}")
        assert_states_close(state, ref_state)
    # D and Z really change the output (the paths are not ignored)
    out_all, _ = scan(inputs, mimo, chunk_size=8)
    out_none, _ = scan(dict(inputs, D=None, Z=None), mimo, chunk_size=8)
    assert max_err(out_all, out_none) > 0.1


@pytest.mark.parametrize("mimo", [False, True])
def test_initial_states_continue_a_sequence(mimo):
    rank = 4 if mimo else None
    b, l, h, g, n, p, a = 2, 29, 4, 2, 8, 4, 2
    inputs = random_inputs(b, l, h, g, n, p, a, rank=rank, seed=11)
    start = random_state(b, h, n, p, a, rank=rank)
    full, full_state = scan(inputs, mimo, initial_states=start, chunk_size=4)
    ref, ref_state = run_steps(inputs, mimo, state=start)
    assert_close(full, ref, what="output from a given state")
    assert_states_close(full_state, ref_state)
    split = 13

    def part(lo, hi):
        return {k: (None if v is None else v[:, lo:hi] if k in ("Q", "K", "V", "Angles", "Z")
                    else v[:, :, lo:hi] if k in ("ADT", "DT", "Trap") else v) for k, v in inputs.items()}

    first, mid_state = scan(part(0, split), mimo, initial_states=start, chunk_size=4)
    second, end_state = scan(part(split, l), mimo, initial_states=mid_state, chunk_size=8)
    assert_close(mx.concatenate([first, second], axis=1), full, what="two halves")
    assert_states_close(end_state, full_state)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("mimo,rank,l,g,chunk", [(False, None, 13, 2, 4), (False, None, 33, 1, 8), (True, 1, 13, 2, 4),
                                                  (True, 2, 13, 2, 4), (True, 4, 13, 1, 4), (True, 4, 21, 2, 8)])
def test_gradients_match_recurrence(mimo, rank, l, g, chunk, lean):
    """d(loss)/d(every input, parameter and initial state) of the chunked scan equals that of the recurrence, by
    autodiff and by the hand-written gradients of lean_backward."""
    b, h, n, p, a = 2, 4, 8, 4, 2
    inputs = random_inputs(b, l, h, g, n, p, a, rank=rank, seed=21)
    start = random_state(b, h, n, p, a, rank=rank)
    mx.random.seed(99)
    out_shape = (b, l, h, p)
    w_out = mx.random.normal(out_shape)
    w_states = [mx.random.normal(s.shape) for s in start]

    def loss_of(out, state):
        # the angle enters through sin (it is only defined modulo 2*pi); the rest linearly
        loss = (out * w_out).sum() + mx.sin(state[0]).sum()
        for s, w in zip(state[1:], w_states[1:]):
            loss = loss + (s * w).sum()
        return loss

    def chunked(args):
        ins, st = args
        return loss_of(*scan(ins, mimo, initial_states=st, chunk_size=chunk, lean_backward=lean))

    def recurrent(args):
        ins, st = args
        return loss_of(*run_steps(ins, mimo, state=st))

    if lean:  # the lean path's own forward (MIMO's last step is written once more)
        out, state = scan(inputs, mimo, initial_states=start, chunk_size=chunk, lean_backward=True)
        ref_out, ref_state = run_steps(inputs, mimo, state=start)
        assert_close(out, ref_out, what="output")
        assert_states_close(state, ref_state)
    grads = mx.grad(chunked)((inputs, start))
    ref_grads = mx.grad(recurrent)((inputs, start))
    for name in inputs:
        assert_close(grads[0][name], ref_grads[0][name], tol=5e-5, what=f"d/d{name}")
        assert mx.max(mx.abs(ref_grads[0][name])).item() > 0, f"d/d{name} is zero: the test would not see a bug"
    for i, name in enumerate(("angle", "ssm", "k", "v")):
        assert_close(grads[1][i], ref_grads[1][i], tol=5e-5, what=f"d/d initial {name}")


@pytest.mark.parametrize("rank,l,chunk,start", [(1, 64, 16, False), (1, 37, 16, True), (4, 32, 8, False),
                                                (4, 29, 8, True), (2, 5, 8, True)])
def test_hand_written_scan_gradient_matches_autodiff(rank, l, chunk, start):
    """gated_chunked_scan's hand-written backward against autodiff of the same forward (chunked_scan): SISO
    (rank 1) and MIMO, lengths padded to the chunk the way mamba3_scan pads them (zero decay and weight), and a
    non-zero start state."""
    b, h, n, p = 2, 3, 8, 4
    mx.random.seed(rank * 100 + l)
    R = mx.random
    q, k = R.normal((b, h, l, rank, n)), R.normal((b, h, l, rank, n))
    v = R.normal((b, h, l, rank, p))
    gates = [-R.uniform(shape=(b, h, l)), R.uniform(0.01, 0.6, (b, h, l)), R.uniform(0.01, 0.6, (b, h, l))]
    start_state = R.normal((b, h, p, n)) if start else mx.zeros((b, h, p, n))
    chunked = [m.to_chunks(t, chunk, 2) for t in (q, k, v)]
    q, k, v = (t.reshape(*t.shape[:3], -1, t.shape[-1]) for t in chunked)  # b h C (c r) n|p
    log_alpha, weight, diag_weight = (m.to_chunks(t, chunk, 2) for t in gates)
    inputs = [log_alpha, weight, diag_weight, q, k, v, start_state]
    outputs = m.gated_chunked_scan(*inputs)
    cotangents = [R.normal(o.shape) for o in outputs]

    def autodiff(log_alpha, weight, diag_weight, q, k, v, start_state):
        return m.chunked_scan(log_alpha, weight, diag_weight, q, k, v, start_state)

    _, by_hand = mx.vjp(m.gated_chunked_scan, inputs, cotangents)
    _, ref = mx.vjp(autodiff, inputs, cotangents)
    names = ("log_alpha", "weight", "diag_weight", "q", "k", "v", "start_state")
    for name, g, r in zip(names, by_hand, ref):
        assert g.shape == r.shape, name
        scale = mx.max(mx.abs(r)).item()
        assert scale > 0, f"d/d{name} is zero: the test would not see a bug"
        assert max_err(g, r) <= 1e-5 * scale, f"d/d{name}: relative error {max_err(g, r) / scale:.1e}"


def test_strong_decay_stays_finite_and_exact():
    """Log-decays down to -300 per token (far beyond float32's exp range over a chunk): still the recurrence."""
    inputs = random_inputs(1, 40, 2, 1, 8, 4, 2, seed=7)
    inputs["ADT"] = inputs["ADT"] * 300.0
    out, state = scan(inputs, False, chunk_size=16)
    ref, ref_state = run_steps(inputs, False)
    assert_close(out, ref, what="output")
    assert_states_close(state, ref_state)
    grads = mx.grad(lambda adt: scan(dict(inputs, ADT=adt), False, chunk_size=16)[0].sum())(inputs["ADT"])
    assert mx.all(mx.isfinite(grads)).item()


@pytest.mark.parametrize("mimo", [False, True])
def test_bf16_inputs_recur_in_float32(mimo):
    rank = 2 if mimo else None
    inputs = random_inputs(2, 40, 4, 2, 8, 4, 2, rank=rank, seed=13)
    as_bf16 = {k: v.astype(mx.bfloat16) for k, v in inputs.items()}
    rounded = {k: v.astype(mx.float32) for k, v in as_bf16.items()}  # the same values in float32
    out16, state16 = scan(as_bf16, mimo, chunk_size=16)
    out32, state32 = scan(rounded, mimo, chunk_size=16)
    assert out16.dtype == mx.bfloat16
    assert all(s.dtype == mx.float32 for s in state16)
    assert_close(out16, out32, tol=1e-2, what="bf16 output")  # only the final rounding to bf16
    assert_states_close(state16, state32, tol=1e-5)  # states stay float32 end to end


def test_step_conventions_by_hand():
    """Pins the conventions: theta_t = theta_{t-1} + pi*tanh(angles_t)*dt_t, adjacent pairs rotated by +theta, the
    unrotated dims passed through, and the first token's output gamma * (q.k) * v + D v."""
    b, h, n, p = 1, 1, 6, 1
    angles, dt, theta0 = 0.7, 0.3, 0.2
    theta = theta0 + math.pi * math.tanh(angles) * dt
    k = mx.array([[[1.0, 0.0, 0.0, 2.0, 5.0, 7.0]]])  # b g n
    q = mx.array([[[0.5, 1.0, 3.0, 0.0, 1.0, 0.0]]])
    zeros_bias = mx.zeros((h, n))
    state = (mx.array([[[theta0, theta0]]]), mx.zeros((b, h, p, n)), mx.zeros((b, h, n)), mx.zeros((b, h, p)))
    v = mx.array([[[2.0]]])
    trap, adt, D = 0.4, -0.5, 0.25
    y, (angle, ssm, k_rot, v_last) = R.mamba3_siso_step(
        q, k, v, mx.array([[adt]]), mx.array([[dt]]), mx.array([[trap]]), zeros_bias, zeros_bias,
        mx.array([[[angles, angles]]]), D=mx.array([D]), state=state)
    c, s = math.cos(theta), math.sin(theta)
    expected_k = [c, s, -2 * s, 2 * c, 5.0, 7.0]  # pairs (0,1) and (2,3) rotated by +theta, dims 4, 5 untouched
    assert mx.allclose(k_rot[0, 0], mx.array(expected_k), atol=1e-6).item()
    assert mx.allclose(angle, mx.array([[[theta, theta]]]), atol=1e-6).item()
    q_rot = [0.5 * c - s, 0.5 * s + c, 3 * c, 3 * s, 1.0, 0.0]
    gamma = dt / (1 + math.exp(-trap))
    expected_y = gamma * 2.0 * sum(a * b for a, b in zip(q_rot, expected_k)) + D * 2.0
    assert abs(y.item() - expected_y) < 1e-5
    assert v_last.item() == 2.0


def test_mimo_pairs_the_halves_by_hand():
    """Pins MIMO's pairing (upstream's TileLang kernel and Mamba3.step): with n = 8 and two angles, dims (0, 4) and
    (1, 5) turn by +theta, dims 2, 3, 6, 7 pass through; the reference's step and the scan's one token agree."""
    angles, dt = 0.7, 0.3
    theta = math.pi * math.tanh(angles) * dt
    k = mx.array([[[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]]])  # b r g n
    zeros, ones = mx.zeros((1, 1, 8)), mx.ones((1, 1, 1))
    token = dict(Q=k, K=k, V=mx.ones((1, 1, 1)), ADT=mx.array([[-0.5]]), DT=mx.array([[dt]]), Trap=mx.array([[0.4]]),
                 Q_bias=zeros, K_bias=zeros, Angles=mx.array([[[angles, angles]]]), MIMO_V=ones, MIMO_Z=ones,
                 MIMO_O=ones)
    _, (_, _, k_rot, _) = R.mamba3_mimo_step(**token)
    c, s = math.cos(theta), math.sin(theta)
    expected = [c - 5 * s, 2 * c - 6 * s, 3.0, 4.0, s + 5 * c, 2 * s + 6 * c, 7.0, 8.0]
    assert mx.allclose(k_rot[0, 0, 0], mx.array(expected), atol=1e-5).item()
    sequence = {name: value[:, None] if name in ("Q", "K", "V", "Angles") else value for name, value in token.items()}
    sequence.update(ADT=token["ADT"][..., None], DT=token["DT"][..., None], Trap=token["Trap"][..., None])
    _, (_, _, k_scan, _) = scan(sequence, True, chunk_size=4)
    assert mx.allclose(k_scan[0, 0, 0], mx.array(expected), atol=1e-5).item()


def siso_scan_errors():
    """A model-sized SISO scan (n = p = chunk = 64, four chunks) on the default device against the recurrence run on
    the CPU (true float32): max errors of the output and the final state, relative to their scale (at least 1)."""
    inputs = random_inputs(2, 256, 4, 2, 64, 64, 16, seed=0)
    out, state = scan(inputs, False, chunk_size=64)
    with mx.stream(mx.cpu):
        ref, ref_state = run_steps(inputs, False)
    return [max_err(x, y) / max(1.0, mx.max(mx.abs(y)).item()) for x, y in ((out, ref), (state[1], ref_state[1]))]


@pytest.mark.skipif(mx.default_device() != mx.gpu, reason="GPU only: TF32 is a mode of the GPUs' float32 matmuls")
@pytest.mark.parametrize("tf32,tolerance", [("0", 2e-5), ("1", 5e-3)])
def test_scan_precision_on_gpu_with_and_without_tf32(tf32, tolerance):
    """float32's tolerance with MLX_ENABLE_TF32=0, a looser one with TF32 on (MLX's default on CUDA and Apple M5 GPUs).
    TF32 rounds matmul operands to 10 mantissa bits; emulated on the CPU (operands so rounded), this scan was off by up
    to 7e-4 relative. MLX reads the variable once per process, hence a process per setting."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MLX_ENABLE_TF32=tf32, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
    code = "import json, test_mamba3_mlx as t; print(json.dumps(t.siso_scan_errors()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output_error, state_error = json.loads(result.stdout.splitlines()[-1])
    assert output_error <= tolerance and state_error <= tolerance, (output_error, state_error)


# ---------------------------------------------------------------------------------------------------------------------
# The block


def make_block(is_mimo, is_outproj_norm, chunk_size=0):
    mx.random.seed(0)
    block = m.Mamba3(m.ModelConfig(d_model=16, d_state=8, headdim=4, expand=2, ngroups=2, rope_fraction=0.5,
                                   a_floor=1e-4, is_mimo=is_mimo, mimo_rank=2, is_outproj_norm=is_outproj_norm,
                                   chunk_size=chunk_size, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4))
    # move every parameter away from its init (biases of 1, equal mimo weights) so a mixed-up axis would show
    params = nn.utils.tree_map(lambda w: w + 0.3 * mx.random.normal(w.shape), block.parameters())
    block.update(params)
    return block


@pytest.mark.parametrize("is_mimo,is_outproj_norm", [(False, False), (False, True), (True, False), (True, True)])
def test_block_forward_matches_decode(is_mimo, is_outproj_norm):
    """The whole sequence in chunks = one token at a time through the same path with the carried state = a prefill of
    6 tokens, then token by token."""
    block = make_block(is_mimo, is_outproj_norm, chunk_size=4)
    mx.random.seed(1)
    x = mx.random.normal((2, 11, 16))
    y, _ = block(x)
    assert y.shape == x.shape
    state, steps = None, []
    for t in range(x.shape[1]):
        y_t, state = block(x[:, t : t + 1], state)
        steps.append(y_t)
    assert_close(mx.concatenate(steps, axis=1), y, what="token by token")
    y_pre, st = block(x[:, :6])
    assert_close(y_pre, y[:, :6], what="prefill output")
    for t in range(6, 11):
        y_t, st = block(x[:, t : t + 1], st)
        assert_close(y_t[:, 0], y[:, t], what=f"decode after prefill, token {t}")


@pytest.mark.parametrize("is_mimo", [False, True])
def test_block_bf16_activations(is_mimo):
    """bf16 activations (COMPUTE_DTYPE on a GPU) give the float32 block's output up to bf16 rounding."""
    block = make_block(is_mimo, True, chunk_size=4)
    x = mx.random.normal((2, 11, 16))
    y32, _ = block(x)
    y16, _ = block(x.astype(mx.bfloat16))
    assert y16.dtype == mx.bfloat16
    assert_close(y16, y32, tol=3e-2, what="bf16 block output")


def test_block_parameters_and_gradients():
    block = make_block(True, True)
    names = {k for k, _ in nn.utils.tree_flatten(block.parameters())}
    assert names == {"in_proj.weight", "out_proj.weight", "dt_bias", "B_bias", "C_bias", "B_norm_weight",
                     "C_norm_weight", "mimo_x", "mimo_z", "mimo_o", "D", "norm_weight"}
    assert block.chunk_size == 32  # 64 // rank
    x = mx.random.normal((1, 9, 16))
    _, grads = nn.value_and_grad(block, lambda x: block(x)[0].sum())(x)
    for name, g in nn.utils.tree_flatten(grads):
        assert mx.all(mx.isfinite(g)).item() and mx.max(mx.abs(g)).item() > 0, name


def test_block_init():
    mx.random.seed(0)
    block = m.Mamba3(m.ModelConfig(d_model=32, d_state=16, headdim=8, expand=2, ngroups=1, rope_fraction=1.0,
                                   a_floor=1e-4, is_mimo=False, mimo_rank=4, is_outproj_norm=False, chunk_size=0,
                                   dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4))
    assert block.num_rope_angles == 8 and block.chunk_size == 64 and block.nheads == 8
    dt = nn.softplus(block.dt_bias)
    assert mx.all(dt >= 0.001 * 0.999).item() and mx.all(dt <= 0.1 * 1.001).item()
    assert block.B_bias.shape == (8, 1, 16) and mx.all(block.B_bias == 1).item()
    # A = min(-f(dd_A), -a_floor) with the heavy tail f
    u = mx.array([-3.0, -1.0, 0.0, 2.0])
    assert mx.allclose(m.heavy_tail(u), mx.array([0.25, 0.5, 1.0, 3.0])).item()
