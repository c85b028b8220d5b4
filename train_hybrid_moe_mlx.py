"""Train a hybrid Mamba-Transformer mixture-of-experts language model (Nemotron-H style) with MLX for a fixed time
budget, then report val_bpb. The file the agent edits (program.md). Run: `uv run train_hybrid_moe_mlx.py`."""

import gc
import math
import time
from functools import partial
from types import SimpleNamespace

t_script_start = time.time()  # total_seconds counts the imports too

import prepare  # first: loads the fast BLAS before MLX is imported

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

ON_CPU = mx.default_device() == mx.cpu

# Hyperparameters (setup writes the preset's sizes here)

# Model: the layer stack
HYBRID_PATTERN = "MEM*EME"  # a block per character: M Mamba, * attention, E mixture of experts, - dense MLP
MAMBA_TYPE = "mamba-3"  # "mamba-3" or "mamba-2"
D_MODEL = 512  # width of the residual stream

# Mamba blocks (M): as in train_mamba_3_mlx.py
D_STATE = 64  # state size n per head (upstream: 128)
HEADDIM = 64  # value width p per head
EXPAND = 2  # inner width / D_MODEL
NGROUPS = 1  # heads share B and C within a group
D_CONV = 4  # Mamba-2's conv width
CHUNK_SIZE = 0  # scan chunk, speed only; 0 = the block's default
DT_MIN = 0.001  # initial dt log-uniform in [DT_MIN, DT_MAX], at least DT_INIT_FLOOR
DT_MAX = 0.1
DT_INIT_FLOOR = 1e-4
A_FLOOR = 1e-4  # Mamba-3: A <= -A_FLOOR
ROPE_FRACTION = 0.5  # Mamba-3: share of state dims rotated
IS_MIMO = False  # Mamba-3: MIMO of rank MIMO_RANK, else SISO
MIMO_RANK = 4
IS_OUTPROJ_NORM = False  # Mamba-3: RMSNorm before the output gate

# Attention blocks (*)
NUM_ATTENTION_HEADS = 8  # query heads
NUM_KV_HEADS = 2  # key/value heads, each serving a group of query heads
ATTN_HEAD_DIM = 64
ROPE_THETA = 10000.0  # base of the rotary frequencies

# Mixture-of-experts blocks (E)
NUM_EXPERTS = 8  # routed experts per E block
TOP_K = 2  # experts per token: compute grows with TOP_K, not NUM_EXPERTS
EXPERT_HIDDEN = 512  # hidden width of one SwiGLU expert
SHARED_EXPERT_HIDDEN = 0  # an always-on shared expert's hidden width; 0 = none
AUX_LOSS_COEFF = 0.01  # weight of the load-balancing loss

# Dense MLP blocks (-)
DENSE_MLP_HIDDEN = 1024  # SwiGLU hidden width

# Optimization (peak learning rates)
DEVICE_BATCH_SIZE = 8  # rows per forward/backward pass
TOTAL_BATCH_SIZE = 8 * 2048  # tokens per step (gradient accumulation)
OPTIMIZER = "muon"  # the matrices': "muon" or "adamw" (the rest: AdamW)
MATRIX_LR = 0.006  # projection matrices, each expert's its own
EMBEDDING_LR = 0.004  # the tied embedding
SCALAR_LR = 0.004  # the rest (no weight decay)
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5  # Newton-Schulz iterations
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1  # matrices and embedding
GRAD_CLIP = 1.0  # global gradient norm clip; 0 = off
WARMUP_RATIO = 0.0  # share of the time budget
WARMDOWN_RATIO = 0.5  # ... at the end, decaying linearly
FINAL_LR_FRAC = 0.05  # ... to this fraction of the peak
COMPUTE_DTYPE = "auto"  # "float32", "bfloat16"; "auto": bf16 on GPU
CHECKPOINT_BLOCKS = True  # recompute blocks in the backward: less memory, more time
SEED = 42


class HybridConfig(SimpleNamespace):
    """The constants above, lower-cased (d_model is D_MODEL), and vocab_size; keywords override them."""

    def __init__(self, **overrides):
        knobs = {name.lower(): value for name, value in globals().items() if name.isupper()}
        assert set(overrides) <= {*knobs, "vocab_size"}, overrides
        super().__init__(**{**knobs, "vocab_size": prepare.VOCAB_SIZE, **overrides})


# SECTION: Mamba  [identical in both MLX scripts]
# Mamba-2: arXiv:2405.21060, mamba_ssm's ssd_minimal.py; Mamba-3: mamba_ssm's modules/mamba3.py. Plain MLX.


exp, sigmoid, logsumexp, checkpoint = mx.exp, mx.sigmoid, mx.logsumexp, nn.utils.checkpoint


def silu(x):
    return x * sigmoid(x)


def softplus(x):
    return mx.maximum(x, 0.0) + mx.log1p(exp(-mx.abs(x)))  # log(1 + e^x) without overflow


def cos_sin(theta):
    return mx.cos(theta), mx.sin(theta)


def rms_norm(x, weight=None, eps=1e-5):
    return mx.fast.rms_norm(x, weight, eps)


def init_dt_bias(nheads, c):  # softplus(dt_bias) log-uniform in [dt_min, dt_max]
    dt = mx.maximum(mx.exp(mx.random.uniform(math.log(c.dt_min), math.log(c.dt_max), (nheads,))), c.dt_init_floor)
    return dt + mx.log(-mx.expm1(-dt))  # the inverse of softplus


def to_chunks(x, chunk_size, axis):
    """The time axis as (chunks, chunk_size), zero-padded: padding leaves the state unchanged."""
    axis = axis % x.ndim
    pad = -x.shape[axis] % chunk_size
    if pad:
        x = mx.pad(x, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (x.ndim - axis - 1))
    return x.reshape(*x.shape[:axis], -1, chunk_size, *x.shape[axis + 1 :])


def chunked_scan(log_alpha, weight, diag_weight, q, k, v, start_state):
    """Per head P_t = exp(log_alpha_t) P_{t-1} + w_t v_t k_t^T, y_t = P_t q_t (the current key weighted gamma_t):
    log_alpha, weight, diag_weight `... C c`, q, k `... C (c r) n`, v `... C (c r) p`, start_state `... p n`."""
    rank = q.shape[-2] // log_alpha.shape[-1]
    # 1. Inside each chunk: causal "attention" weighted by the decay L[t, s].
    decay, mix, to_end, from_start = chunk_gates(log_alpha, weight, diag_weight)
    y = rank_mix(q @ k.swapaxes(-1, -2), mix) @ v
    # 2. The state each chunk adds by its end.
    chunk_decay = from_start[..., -1]
    if rank > 1:
        to_end, from_start = mx.repeat(to_end, rank, axis=-1), mx.repeat(from_start, rank, axis=-1)
    shared = k.shape[-4] == 1 < v.shape[-4]  # SSD: the heads of a group share q and k
    chunk_states = (v * to_end[..., None]).swapaxes(-1, -2)
    chunk_states = shared_matmul(chunk_states, k) if shared else chunk_states @ k
    # 3. The states entering each chunk.
    start_state = mx.broadcast_to(start_state, chunk_states.shape[:-3] + chunk_states.shape[-2:])
    entering, final = carry_states(chunk_decay[..., None, None], chunk_states, start_state)
    # 4. Each token reads the state its chunk received.
    if shared:
        read = shared_matmul(entering, q.swapaxes(-1, -2)).swapaxes(-1, -2)
    else:
        read = q @ entering.swapaxes(-1, -2)
    return y + read * from_start[..., None], final


def chunk_gates(log_alpha, weight, diag_weight):
    c = log_alpha.shape[-1]
    decay = decay_matrix(log_alpha)
    mix = decay if weight is None else decay * weight[..., None, :]
    if diag_weight is not None:
        mix = mx.where(mx.eye(c, dtype=mx.bool_), diag_weight[..., :, None], mix)
    to_end = decay[..., -1, :] if weight is None else decay[..., -1, :] * weight
    from_start = exp(mx.cumsum(log_alpha, axis=-1))
    return decay, mix, to_end, from_start


def decay_matrix(log_alpha):
    """L[t, s] = exp(log_alpha_{s+1} + ... + log_alpha_t) for s <= t, else 0: `... c` -> `... c c`."""
    c = log_alpha.shape[-1]
    idx = mx.arange(c)
    factors = mx.where(idx[:, None] > idx[None, :], exp(log_alpha)[..., :, None], 1.0)
    return mx.where(idx[:, None] >= idx[None, :], mx.cumprod(factors, axis=-2), 0.0)


def carry_states(decays, added, start):
    """S_0 = start, S_{j+1} = decays[j] S_j + added[j] -> (S_0 .. S_{C-1}, S_C)."""
    c = added.shape[-3]
    entering, state = [], start[..., None, :, :]
    for decay, add in zip(mx.split(decays, c, axis=-3), mx.split(added, c, axis=-3)):
        entering.append(state)
        state = decay * state + add
    return mx.concatenate(entering, axis=-3), state[..., 0, :, :]


def shared_matmul(per_head, shared):
    """per_head `... h C m k` @ shared `... 1 C k n`, one (h m) x k matmul per chunk."""
    *lead, h, C, m, k = per_head.shape
    out = per_head.swapaxes(-4, -3).reshape(*lead, C, h * m, k) @ shared.squeeze(-4)
    return out.reshape(*lead, C, h, m, -1).swapaxes(-4, -3)


def rank_mix(scores, mix):
    c, rank = mix.shape[-1], scores.shape[-1] // mix.shape[-1]
    if rank == 1:
        return scores * mix
    return (scores.reshape(*scores.shape[:-2], c, rank, c, rank) * mix[..., :, None, :, None]).reshape(scores.shape)


def ssd_scan(X, A, B, C, chunk_size, initial_states=None):
    """SSD, S_t = exp(A_t) S_{t-1} + X_t B_t^T, Y_t = S_t C_t (ssd_minimal_discrete): X [b l h p], A [b l h], B, C
    [b l g n]."""
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    Q = min(chunk_size, l)
    f32 = mx.float32
    x = X.astype(f32).reshape(b, l, g, h // g, p).transpose(0, 2, 3, 1, 4)
    a = A.astype(f32).reshape(b, l, g, h // g).transpose(0, 2, 3, 1)
    keys = B.astype(f32).transpose(0, 2, 1, 3)[:, :, None]
    queries = C.astype(f32).transpose(0, 2, 1, 3)[:, :, None]
    start = mx.zeros((b, h, p, n), f32) if initial_states is None else initial_states.astype(f32)
    start = start.reshape(b, g, h // g, p, n)
    chunked = [to_chunks(t, Q, 3) for t in (queries, keys, x, a)]
    y, state = chunked_scan(chunked[3], None, None, *chunked[:3], start)
    y = y.reshape(b, g, h // g, -1, p)[:, :, :, :l].transpose(0, 3, 1, 2, 4)
    return y.reshape(b, l, h, p), state.reshape(b, h, p, n)




class Linear(nn.Linear):
    """Without bias, in its input's dtype."""

    def __init__(self, in_dims, out_dims):
        super().__init__(in_dims, out_dims, bias=False)

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


def block_input(norm, x, compute_dtype):  # the stream (norm's input) stays float32: upstream's residual_in_fp32
    return norm(x).astype(compute_dtype)


class GatedMLP(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = Linear(d_model, 2 * hidden)
        self.fc2 = Linear(hidden, d_model)

    def __call__(self, x):
        h, gate = mx.split(self.fc1(x), 2, axis=-1)
        return self.fc2(h * silu(gate))


def causal_conv1d(window, weight, bias):
    """out_t = bias + sum_k weight[k] window_{t+k}: window [b K-1+l c] -> [b l c]."""
    K = weight.shape[0]
    l = window.shape[1] - (K - 1)
    out = bias + weight[0] * window[:, :l]
    for k in range(1, K):
        out = out + weight[k] * window[:, k : k + l]
    return out


class CausalConv1d(nn.Module):
    def __init__(self, channels, kernel_size):
        super().__init__()
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = mx.random.uniform(-bound, bound, (kernel_size, channels))
        self.bias = mx.random.uniform(-bound, bound, (channels,))

    def __call__(self, x, history=None):
        K = self.weight.shape[0]
        history = mx.zeros((x.shape[0], K - 1, x.shape[2]), x.dtype) if history is None else history.astype(x.dtype)
        window = mx.concatenate([history, x], axis=1)
        out = causal_conv1d(window, self.weight.astype(x.dtype), self.bias.astype(x.dtype))
        return out, window[:, window.shape[1] - (K - 1) :]


class Mamba2(nn.Module):
    """Upstream's Mamba2: in_proj -> [z | xBC | dt], conv + SiLU on xBC, SSD, grouped RMSNorm of y * silu(z)."""

    def __init__(self, c):
        super().__init__()
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups = c.headdim, c.d_state, c.ngroups
        self.chunk_size = c.chunk_size or 32  # faster than 64 on the CPU (bench/RESULTS.md)
        self.conv_dim = self.d_inner + 2 * c.ngroups * c.d_state  # x, B, C
        self.in_proj = Linear(c.d_model, self.d_inner + self.conv_dim + self.nheads)  # z | xBC | dt
        self.conv = CausalConv1d(self.conv_dim, c.d_conv)
        self.dt_bias = init_dt_bias(self.nheads, c)
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.nheads,)))
        self.D = mx.ones((self.nheads,))
        self.norm_weight = mx.ones((self.d_inner,))
        self.out_proj = Linear(self.d_inner, c.d_model)

    def __call__(self, u, state=None):  # -> (y, the state after the last token)
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        conv_state, ssm_state = state or (None, None)
        z, xBC, dt = mx.split(self.in_proj(u), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
        xBC, conv_state = self.conv(xBC, conv_state)
        x, B, C = mx.split(silu(xBC), [self.d_inner, self.d_inner + g * n], axis=-1)
        dt = softplus(dt.astype(mx.float32) + self.dt_bias)
        A = -mx.exp(self.A_log)
        x = x.reshape(b, l, h, p)
        y, ssm_state = ssd_scan(x * dt[..., None], A * dt, B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                                self.chunk_size, ssm_state)
        y = (y + x * self.D[:, None]).reshape(b, l, self.d_inner).astype(u.dtype) * silu(z)
        y = rms_norm(y.reshape(b, l, g, -1)).reshape(b, l, -1) * self.norm_weight.astype(y.dtype)
        return self.out_proj(y), (conv_state, ssm_state)


# Mamba-3 per head, q~, k~ rotated by theta_t = theta_{t-1} + pi tanh(angles_t) dt_t, lam_t = sigmoid(trap_t):
#   S_t = alpha_t S_{t-1} + (1 - lam_t) dt_t alpha_t v_{t-1} k~_{t-1}^T + lam_t dt_t v_t k~_t^T,  y_t = S_t q~_t + D v_t
# MIMO: r queries, keys, values per token. P_t = S_t + beta'_{t+1} v_t k~_t^T obeys chunked_scan's recurrence.


def wrap_angle(theta):
    return theta - 2.0 * math.pi * mx.floor(theta / (2.0 * math.pi))  # in [0, 2 pi)


def cumulative_angles(increments, initial_angle, chunk_size):
    """theta_t = theta_{-1} + sum_{u<=t} increments_u (mod 2 pi) along axis 2, by chunks (keeps float32 precise)."""
    l = increments.shape[2]
    within = mx.cumsum(to_chunks(increments, chunk_size, 2), axis=3)
    chunk_totals = wrap_angle(within[:, :, :, -1])
    offsets = wrap_angle(mx.cumsum(chunk_totals, axis=2, inclusive=False) + initial_angle[:, :, None])
    theta = wrap_angle(within + offsets[:, :, :, None])
    return theta.reshape(*theta.shape[:2], -1, theta.shape[-1])[:, :, :l]


def rotation(theta, n, halves=False):
    """(cos, sin) rotating pairs (2k, 2k+1), or (k, n/2 + k) with halves (MIMO), by theta `... a`."""
    a, lead = theta.shape[-1], [(0, 0)] * (theta.ndim - 1)
    cos, sin = cos_sin(theta)
    if halves:
        cos, sin = mx.pad(cos, lead + [(0, n // 2 - a)], constant_values=1.0), mx.pad(sin, lead + [(0, n // 2 - a)])
        return mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)
    cos = mx.stack([cos, cos], axis=-1).reshape(*theta.shape[:-1], 2 * a)
    sin = mx.stack([-sin, sin], axis=-1).reshape(*theta.shape[:-1], 2 * a)
    return mx.pad(cos, lead + [(0, n - 2 * a)], constant_values=1.0), mx.pad(sin, lead + [(0, n - 2 * a)])


def rotate(x, cos, sin):
    """x * cos + partner(x) * sin; MIMO's x `b h l r n` pairs halves."""
    if x.ndim > cos.ndim:
        return x * cos[..., None, :] + swap_halves(x) * sin[..., None, :]
    return x * cos + swap_pairs(x) * sin


def swap_pairs(x):
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)


def swap_halves(x):
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)[..., ::-1, :].reshape(x.shape)


def heads_qk(X, bias, heads):
    """Q or K `b l (r) g n` plus the per-head bias `h (r) n` -> `b h l (r) n`."""
    X = mx.moveaxis(X, -2, 1)[:, :, None]  # b g 1 l (r) n
    g = X.shape[1]
    return (X + bias.reshape(g, heads // g, 1, *bias.shape[1:])).reshape(X.shape[0], heads, *X.shape[3:])


def mimo_gate(y, v, z, D, mimo_z, mimo_o):
    """sum_i (y_i + D v_i) silu(z mimo_z[i]) mimo_o[i] over the ranks i."""
    gate_in = z[:, :, :, None] * mimo_z[:, None]
    return ((y + D[:, None, None, None] * v) * silu(gate_in) * mimo_o[:, None]).sum(axis=3)


lean_backward = (rotate, chunked_scan, mimo_gate)  # the door swaps in gradients that keep only inputs


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, MIMO_V=None, MIMO_Z=None, MIMO_O=None,
                initial_states=None, chunk_size=64, rotate_qk=rotate, scan=chunked_scan, gate=mimo_gate):
    """Q, K `b l (r) g n`, V, Z `b l h p`, ADT, DT, Trap `b h l`, Angles `b l h a`, MIMO_* `h r p` -> (out `b l h p`,
    state: angle, ssm `b h p n`, last k, last x)."""
    dtype, mimo = V.dtype, MIMO_V is not None
    Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, MIMO_V, MIMO_Z, MIMO_O = (
        None if t is None else t.astype(mx.float32)
        for t in (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, MIMO_V, MIMO_Z, MIMO_O))
    b, l, h, p = V.shape
    n, a = Q.shape[-1], Angles.shape[-1]
    chunk_size = min(chunk_size, l)
    if initial_states is None:
        k_shape = (b, Q.shape[2], h, n) if mimo else (b, h, n)
        initial_states = (mx.zeros((b, h, a)), mx.zeros((b, h, p, n)), mx.zeros(k_shape), mx.zeros((b, h, p)))
    angle0, ssm0, k0, x0 = (t.astype(mx.float32) for t in initial_states)

    # 1. q and k rotated token by token.
    theta = cumulative_angles(math.pi * mx.tanh(Angles).transpose(0, 2, 1, 3) * DT[..., None], angle0, chunk_size)
    cos, sin = rotation(theta, n, halves=mimo)
    q = rotate_qk(heads_qk(Q, Q_bias, h), cos, sin)
    k = rotate_qk(heads_qk(K, K_bias, h), cos, sin)
    x = V.transpose(0, 2, 1, 3)
    v = x[:, :, :, None] * MIMO_V[:, None] if mimo else x

    # 2. Trapezoid weights: w_t = gamma_t + beta'_{t+1}, beta' = (1 - lam) dt.
    gamma = sigmoid(Trap) * DT
    beta_prime = DT - gamma
    weight = gamma + mx.pad(beta_prime[..., 1:], [(0, 0), (0, 0), (0, 1)])

    # 3. The last (k, v) of the previous segment, weighted beta'_0.
    if mimo:
        v0 = x0[:, :, None] * MIMO_V[None] * beta_prime[..., :1, None]
        carried = v0.swapaxes(-1, -2) @ k0.transpose(0, 2, 1, 3)
    else:
        carried = (x0 * beta_prime[..., :1])[..., :, None] * k0[..., None, :]

    # 4. The chunked scan (MIMO: c*r keys per chunk).
    chunked = [to_chunks(t, chunk_size, 2) for t in (q, k, v)]
    chunked = [t.reshape(*t.shape[:3], -1, t.shape[-1]) for t in chunked]
    gates = [to_chunks(t, chunk_size, 2) for t in (ADT, weight, gamma)]
    y, final_ssm = scan(*gates, *chunked, ssm0 + carried)
    y = y.reshape(b, h, -1, *v.shape[3:])[:, :, :l]

    # 5. Skip D, gate, ranks down.
    z = None if Z is None else Z.transpose(0, 2, 1, 3)
    if mimo and MIMO_O is not None and D is not None and z is not None:
        y = gate(y, v, z, D, MIMO_Z, MIMO_O)
    else:
        y = y if D is None else y + D.reshape(h, 1, *([1] * (v.ndim - 4)), 1) * v
        if z is not None:
            y = y * silu(z[:, :, :, None] * MIMO_Z[:, None] if mimo else z)
        if mimo and MIMO_O is not None:
            y = (y * MIMO_O[:, None]).sum(axis=3)
    y = y.transpose(0, 2, 1, 3) if y.ndim == 4 else y.transpose(0, 2, 3, 1, 4)
    k_last = k[:, :, -1].transpose(0, 2, 1, 3) if mimo else k[:, :, -1]
    return y.astype(dtype), (theta[:, :, -1], final_ssm, k_last, x[:, :, -1])


def heavy_tail(u):
    """1 + u for u >= 0, 1 / (1 - u) below."""
    return mx.where(u >= 0, 1.0 + mx.maximum(u, 0.0), 1.0 / (1.0 - mx.minimum(u, 0.0)))


class Mamba3(nn.Module):
    """Upstream's Mamba3 (no conv)."""

    def __init__(self, c):
        super().__init__()
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups = c.headdim, c.d_state, c.ngroups
        self.is_mimo, self.is_outproj_norm, self.a_floor = c.is_mimo, c.is_outproj_norm, c.a_floor
        r = c.mimo_rank if c.is_mimo else 1
        self.ranks = (r,) if c.is_mimo else ()
        self.chunk_size = c.chunk_size or max(1, 64 // r)
        lean = c.checkpoint_blocks and c.is_mimo
        self.rotate_qk, self.scan, self.gate = lean_backward if lean else (rotate, chunked_scan, mimo_gate)
        self.num_rope_angles = int(c.d_state * c.rope_fraction) // 2
        h, n = self.nheads, c.d_state
        bc_dim = r * c.ngroups * n
        sizes = [self.d_inner, self.d_inner, bc_dim, bc_dim, h, h, h, self.num_rope_angles]
        self.in_proj = Linear(c.d_model, sum(sizes))  # z | x | B | C | dd_dt | dd_A | trap | angles
        self.bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        self.dt_bias = init_dt_bias(h, c)
        self.B_bias, self.C_bias = mx.ones((h, r, n)), mx.ones((h, r, n))
        self.B_norm_weight, self.C_norm_weight = mx.ones((n,)), mx.ones((n,))
        if c.is_mimo:
            ones = mx.ones((h, r, c.headdim))
            self.mimo_x, self.mimo_z, self.mimo_o = ones / r, ones, ones / r
        self.D = mx.ones((h,))
        if c.is_outproj_norm:
            self.norm_weight = mx.ones((self.d_inner,))
        self.out_proj = Linear(self.d_inner, c.d_model)

    def __call__(self, u, state=None):
        b, l, _ = u.shape
        g, h, n, p, f32 = self.ngroups, self.nheads, self.d_state, self.headdim, mx.float32
        z, x, B, C, dd_dt, dd_A, trap, angles = mx.split(self.in_proj(u), self.bounds, axis=-1)
        B = rms_norm(B.reshape(b, l, *self.ranks, g, n), self.B_norm_weight.astype(B.dtype))
        C = rms_norm(C.reshape(b, l, *self.ranks, g, n), self.C_norm_weight.astype(C.dtype))
        A = mx.minimum(-heavy_tail(dd_A.astype(f32)), -self.a_floor)
        DT = softplus(dd_dt.astype(f32) + self.dt_bias)
        z = z.reshape(b, l, h, p)
        norm_first = self.is_outproj_norm
        y, state = mamba3_scan(
            Q=C, K=B, V=x.reshape(b, l, h, p), ADT=(A * DT).transpose(0, 2, 1), DT=DT.transpose(0, 2, 1),
            Trap=trap.astype(f32).transpose(0, 2, 1), Q_bias=self.C_bias.reshape(h, *self.ranks, n),
            K_bias=self.B_bias.reshape(h, *self.ranks, n), Angles=angles.astype(f32)[:, :, None], D=self.D,
            Z=None if norm_first else z, MIMO_V=self.get("mimo_x"), MIMO_Z=self.get("mimo_z"),
            MIMO_O=None if norm_first else self.get("mimo_o"), initial_states=state, chunk_size=self.chunk_size,
            rotate_qk=self.rotate_qk, scan=self.scan, gate=self.gate)
        if norm_first:  # RMSNorm per head, then the gate and the ranks down
            if self.is_mimo:
                z = z[:, :, None] * self.mimo_z.transpose(1, 0, 2)
            y = rms_norm(y.astype(f32)) * self.norm_weight.reshape(h, p) * silu(z.astype(f32))
            if self.is_mimo:
                y = (y * self.mimo_o.transpose(1, 0, 2)).sum(axis=2)
        return self.out_proj(y.reshape(b, l, self.d_inner).astype(u.dtype)), state


# END SECTION: Mamba

# Hybrid blocks: one per HYBRID_PATTERN character, x + layer(RMSNorm(x)); "ME" acts like one transformer layer.

BLOCK_KINDS = {
    "M": "Mamba block (MAMBA_TYPE), mixes the sequence",
    "*": "causal self-attention, mixes the sequence",
    "E": "mixture-of-experts FFN, per token",
    "-": "dense MLP, per token",
}
SEQUENCE_MIXERS = "M*"


def validate_pattern(pattern):
    """The pattern, or a ValueError naming what is wrong with it."""
    valid = "valid characters: " + ", ".join(f"'{kind}' = {what}" for kind, what in BLOCK_KINDS.items())
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"HYBRID_PATTERN is empty; {valid}")
    unknown = sorted(set(pattern) - set(BLOCK_KINDS))
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise ValueError(f"HYBRID_PATTERN {pattern!r} has unknown character(s) {listed}; {valid}")
    if not any(kind in SEQUENCE_MIXERS for kind in pattern):
        raise ValueError(f"HYBRID_PATTERN {pattern!r} has no sequence mixer ('M' or '*'); {valid}")
    return pattern


def causal_attention(q, k, v, scale):
    """softmax(q k^T scale, causal) v: q [b heads l d], k, v [b kv_heads past+l d]."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if q.shape[2] > 1 else None)


class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions."""

    def __init__(self, c):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_kv_heads, c.attn_head_dim
        self.rope_theta = c.rope_theta
        self.qkv_proj = Linear(c.d_model, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.out_proj = Linear(self.num_heads * self.head_dim, c.d_model)

    def __call__(self, x, cache=None):  # cache: the keys and values of the tokens before x
        b, l, _ = x.shape
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_dim, q_dim + kv_dim], axis=-1)
        q = q.reshape(b, l, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(b, l, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        past = 0 if cache is None else cache[0].shape[2]
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=past)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=past)
        if cache is not None:
            k = mx.concatenate([cache[0].astype(k.dtype), k], axis=2)
            v = mx.concatenate([cache[1].astype(v.dtype), v], axis=2)
        y = causal_attention(q, k, v, self.head_dim**-0.5)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, l, q_dim)), (k, v)


# Mixture of experts: each token goes to its TOP_K best experts, mixed by the renormalised router probabilities. The
# Switch Transformer's balance loss E * sum_i f_i P_i (slot share, mean probability of expert i) is 1.0 when even.


def route(router_logits, top_k):
    """[N, E] -> (chosen [N, k], weights [N, k], balance_loss, counts [E]). The choice gets no gradient (one through
    top-k indices crashes MLX's backward)."""
    num_tokens, num_experts = router_logits.shape
    probs = mx.softmax(router_logits.astype(mx.float32), axis=-1)
    chosen = mx.stop_gradient(mx.argpartition(mx.stop_gradient(-probs), kth=top_k - 1, axis=-1)[:, :top_k])
    chosen = chosen.astype(mx.int32)
    chosen_probs = mx.take_along_axis(probs, chosen, axis=-1)
    weights = chosen_probs / chosen_probs.sum(axis=-1, keepdims=True)
    counts = (chosen[..., None] == mx.arange(num_experts, dtype=mx.int32)).sum(axis=(0, 1)).astype(mx.int32)
    slot_share = counts.astype(mx.float32) / (num_tokens * top_k)
    balance_loss = num_experts * mx.sum(slot_share * probs.mean(axis=0))
    return chosen, weights, balance_loss, counts


def expert_groups(slot_experts, num_experts):
    """slot_experts [R] -> (the pair of each row, the row of each pair, each row's expert), sorted by expert."""
    order = mx.argsort(slot_experts)
    return order, mx.argsort(order), slot_experts[order]


class RoutedExperts(nn.Module):
    """SwiGLU experts, their weights stacked [experts, in, out] for mx.gather_mm."""

    def __init__(self, num_experts, d_model, hidden):
        super().__init__()
        bound_in, bound_hidden = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(hidden)
        self.fc1 = mx.random.uniform(-bound_in, bound_in, (num_experts, d_model, 2 * hidden))
        self.fc2 = mx.random.uniform(-bound_hidden, bound_hidden, (num_experts, hidden, d_model))

    def __call__(self, tokens, chosen):
        """tokens [N, d_model], chosen [N, k] -> [N, k, d_model]."""
        dtype = mx.float32 if ON_CPU else tokens.dtype  # MLX's CPU gather_mm takes float32 only
        num_experts, d_model, _ = self.fc1.shape
        slot_of_row, row_of_slot, group_experts = expert_groups(chosen.reshape(-1), num_experts)
        x = tokens.astype(dtype)[slot_of_row // chosen.shape[1]].reshape(group_experts.size, -1, d_model)
        h, gate = mx.split(mx.gather_mm(x, self.fc1.astype(dtype), rhs_indices=group_experts, sorted_indices=True),
                           2, axis=-1)
        y = mx.gather_mm(h * silu(gate), self.fc2.astype(dtype), rhs_indices=group_experts, sorted_indices=True)
        return y.reshape(-1, d_model)[row_of_slot].reshape(*chosen.shape, d_model).astype(tokens.dtype)


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_experts, self.top_k = c.num_experts, c.top_k
        self.router = Linear(c.d_model, c.num_experts)
        self.experts = RoutedExperts(c.num_experts, c.d_model, c.expert_hidden)
        if c.shared_expert_hidden > 0:
            self.shared_expert = GatedMLP(c.d_model, c.shared_expert_hidden)

    def __call__(self, x):  # -> (y, balance_loss, expert counts)
        tokens = x.reshape(-1, x.shape[-1])
        chosen, weights, balance_loss, counts = route(self.router(tokens), self.top_k)
        slot_out = self.experts(tokens, chosen)
        y = (slot_out * weights[..., None].astype(slot_out.dtype)).sum(axis=1)
        if "shared_expert" in self:
            y = y + self.shared_expert(tokens)
        return y.reshape(x.shape), balance_loss, counts

    def expert_params(self):  # one routed expert's
        return self.experts.fc1[0].size + self.experts.fc2[0].size


def make_layer(kind, c):
    if kind == "M":
        return {"mamba-2": Mamba2, "mamba-3": Mamba3}[c.mamba_type](c)
    if kind == "*":
        return CausalSelfAttention(c)
    if kind == "E":
        return MoE(c)
    return GatedMLP(c.d_model, c.dense_mlp_hidden)


class HybridBlock(nn.Module):
    def __init__(self, kind, config, compute_dtype=mx.float32):
        super().__init__()
        self.kind = kind
        self.compute_dtype = compute_dtype
        self.norm = nn.RMSNorm(config.d_model)
        self.layer = make_layer(kind, config)

    def __call__(self, x, state=None):
        """-> (x, a sequence mixer's state, an E block's (balance_loss, expert counts))."""
        h = block_input(self.norm, x, self.compute_dtype)
        if self.kind in SEQUENCE_MIXERS:
            y, state = self.layer(h, state)
            return x + y, state, None
        if self.kind == "E":
            y, balance_loss, counts = self.layer(h)
            return x + y, None, (balance_loss, counts)
        return x + self.layer(h), None, None

    def without_state(self, x):  # no state: its slices would pin buffers
        x, _, moe_stats = self(x)
        return x, moe_stats


class HybridLM(nn.Module):
    """A tied embedding, one pre-norm residual block per pattern character, a final RMSNorm."""

    def __init__(self, config, compute_dtype=mx.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [HybridBlock(kind, config, compute_dtype) for kind in validate_pattern(config.hybrid_pattern)]
        self.norm_f = nn.RMSNorm(config.d_model)
        # Writes into the stream scaled by 1/sqrt(blocks) so its variance does not grow with depth.
        self.embed.weight = 0.02 * mx.random.normal(self.embed.weight.shape)
        scale = 1.0 / math.sqrt(len(self.layers))
        for block in self.layers:
            layer = block.layer
            if block.kind in SEQUENCE_MIXERS:
                layer.out_proj.weight = layer.out_proj.weight * scale
            elif block.kind == "E":
                layer.experts.fc2 = layer.experts.fc2 * scale
                if "shared_expert" in layer:
                    layer.shared_expert.fc2.weight = layer.shared_expert.fc2.weight * scale
            else:
                layer.fc2.weight = layer.fc2.weight * scale

    def forward_with_aux(self, input_ids, cache=None):
        """[b l] -> (logits, balance loss summed over the E blocks, routed slots [E blocks, experts])."""
        x = self.embed(input_ids)
        balance_loss, counts = mx.array(0.0), []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, cache[i], moe_stats = layer(x, cache[i])
            elif self.config.checkpoint_blocks:
                x, moe_stats = checkpoint(layer, layer.without_state)(x)
            else:
                x, _, moe_stats = layer(x)
            if moe_stats is not None:
                balance_loss = balance_loss + moe_stats[0]
                counts.append(moe_stats[1])
        x = self.norm_f(x).astype(self.compute_dtype)
        logits = x @ self.embed.weight.astype(self.compute_dtype).T
        counts = mx.stack(counts) if counts else mx.zeros((0, self.config.num_experts), mx.int32)
        return logits, balance_loss, counts

    def __call__(self, input_ids, cache=None):
        return self.forward_with_aux(input_ids, cache)[0]

    def moe_layers(self):
        return [block.layer for block in self.layers if block.kind == "E"]

    def num_params(self):
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def num_active_params(self):  # all but the experts a token is not routed to
        idle = sum((moe.num_experts - moe.top_k) * moe.expert_params() for moe in self.moe_layers())
        return self.num_params() - idle


def matrix_parameters(model):
    """(name, weight) of the projection matrices, each expert's its own: MATRIX_LR's group."""
    params = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):
            params.append((f"{path}.weight", m.weight))
        elif isinstance(m, RoutedExperts):
            params += [(f"{path}.fc1", m.fc1), (f"{path}.fc2", m.fc2)]
    return params


# SECTION: Loss, optimizer, schedule  [identical in both MLX scripts]


def cross_entropy(logits, targets):
    logits = logits.astype(mx.float32)
    lse = logsumexp(logits, axis=-1)
    return (lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]).mean()


# Muon (Jordan et al., 2024) scaled to AdamW's update size (arXiv:2502.16982), so both share rates and decay.


def orthogonalise(g):
    """About U V^T of g = U S V^T per matrix, by quintic Newton-Schulz."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.astype(mx.float32 if ON_CPU else mx.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # the smaller Gram matrix
        x = x.swapaxes(-1, -2)
    x = x / (mx.sqrt(mx.sum(mx.square(x), axis=(-2, -1), keepdims=True)) + 1e-7)  # all singular values <= 1
    for _ in range(MUON_NS_STEPS):
        gram = x @ x.swapaxes(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.swapaxes(-1, -2) if tall else x).astype(g.dtype)


class Optimizer:
    def __init__(self, model):
        matrices = {name for name, _ in matrix_parameters(model)}
        params = dict(tree_flatten(model.trainable_parameters()))
        self.lr = {k: EMBEDDING_LR if k == "embed.weight" else MATRIX_LR if k in matrices else SCALAR_LR
                   for k in params}
        self.weight_decay = {k: WEIGHT_DECAY if k == "embed.weight" or k in matrices else 0.0 for k in params}
        self.muon = matrices if OPTIMIZER == "muon" else set()
        self.state = {"step": mx.array(0, mx.int32), "m": {k: mx.zeros_like(p) for k, p in params.items()},
                      "v": {k: mx.zeros_like(p) for k, p in params.items() if k not in self.muon}}

    def update(self, model, grads, lr_multiplier):
        step = self.state["step"] = self.state["step"] + 1
        bias1 = 1 - ADAM_BETA1 ** step.astype(mx.float32)
        bias2 = 1 - ADAM_BETA2 ** step.astype(mx.float32)
        grads = dict(tree_flatten(grads))
        updated = []
        for name, p in tree_flatten(model.trainable_parameters()):
            g, lr = grads[name], self.lr[name] * lr_multiplier
            p = p * (1 - lr * self.weight_decay[name])
            if name in self.muon:
                m = self.state["m"][name] = MUON_MOMENTUM * self.state["m"][name] + (1 - MUON_MOMENTUM) * g
                direction = orthogonalise((1 - MUON_MOMENTUM) * g + MUON_MOMENTUM * m)  # Nesterov
                p = p - lr * 0.2 * math.sqrt(max(p.shape[-2:])) * direction
            else:
                m = self.state["m"][name] = ADAM_BETA1 * self.state["m"][name] + (1 - ADAM_BETA1) * g
                v = self.state["v"][name] = ADAM_BETA2 * self.state["v"][name] + (1 - ADAM_BETA2) * mx.square(g)
                p = p - lr * (m / bias1) / (mx.sqrt(v / bias2) + ADAM_EPS)
            updated.append((name, p))
        model.update(tree_unflatten(updated))


def lr_multiplier(progress):
    """Linear warmup, constant, linear warmdown; progress in [0, 1] of TIME_BUDGET."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1.0 - WARMDOWN_RATIO:
        return 1.0
    decay = min((progress - (1.0 - WARMDOWN_RATIO)) / WARMDOWN_RATIO, 1.0)
    return 1.0 - decay * (1.0 - FINAL_LR_FRAC)


# END SECTION: Loss, optimizer, schedule

def expert_load_summary(run_counts):
    """'min X max Y' of the experts' shares of their block's routed slots over the run."""
    if run_counts.shape[0] == 0:
        return "none (no E blocks)"
    counts = run_counts.astype(mx.float32)
    shares = counts / mx.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
    return (f"min {shares.min().item():.3f} max {shares.max().item():.3f} "
            f"(share of routed tokens per expert; uniform {1 / run_counts.shape[1]:.3f})")


def main():
    dist = prepare.distributed("mlx")  # rank 0 of 1 unless under mlx.launch
    print(prepare.harness_line())
    seq_len = prepare.MAX_SEQ_LEN
    check_hyperparameters(DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    mx.random.seed(SEED)  # all ranks start from the same weights
    tokenizer = prepare.Tokenizer.from_directory()
    auto = mx.float32 if ON_CPU else mx.bfloat16  # MLX's CPU has no bf16 BLAS
    compute_dtype = auto if COMPUTE_DTYPE == "auto" else getattr(mx, COMPUTE_DTYPE)
    model = HybridLM(HybridConfig(vocab_size=tokenizer.get_vocab_size()), compute_dtype)
    mx.eval(model.parameters())
    num_params, num_active_params = model.num_params(), model.num_active_params()
    flops = flops_per_token(model, seq_len)
    device = mx.device_info().get("device_name", str(mx.default_device()))
    mamba_type = MAMBA_TYPE + (f" (MIMO rank {MIMO_RANK})" if MAMBA_TYPE == "mamba-3" and IS_MIMO else "")
    grad_accum_steps = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    print(f"model: hybrid {HYBRID_PATTERN} ({mamba_type}), {num_params / 1e6:.2f}M parameters, "
          f"{num_active_params / 1e6:.2f}M active per token, d_model {D_MODEL}, {flops / 1e6:.1f} MFLOP/token, "
          f"compute {str(compute_dtype).split('.')[-1]}, device {device}")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows x {seq_len} tokens "
          f"x {dist.world_size} processes")

    training_step = make_training_step(model, Optimizer(model), grad_accum_steps)
    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train", rank=dist.rank,
                                           world_size=dist.world_size)
    progress_line = prepare.ProgressLine(interval=0)
    run_expert_counts = mx.zeros((len(model.moe_layers()), NUM_EXPERTS), mx.int64)  # stays on the device
    gc.collect()
    gc.freeze()  # no collector pauses in the timed loop
    gc.disable()
    prepare.probe_machine_speed(dist)  # outside the budget

    # The clock skips the first step (it compiles); a step runs while its predicted middle is in budget.
    training_time, step, smooth_loss, t_startup, step_times = 0.0, 0, 0.0, None, []
    while (midpoint := prepare.step_midpoint(training_time, step_times)) < prepare.TIME_BUDGET:
        t0 = time.time()
        lr_mult = lr_multiplier(midpoint / prepare.TIME_BUDGET)
        loss, balance, expert_counts, epoch = training_step(train_loader, lr_mult)
        run_expert_counts = run_expert_counts + expert_counts
        mx.async_eval(run_expert_counts)
        train_loss = loss.item()  # the one host sync of the step
        balance = balance.item()
        train_loss, step_time = dist.agree(train_loss, time.time() - t0)  # the same loss and clock on every rank
        prepare.check_loss(train_loss, step)
        if step == 0:
            t_startup = time.time() - t_script_start
        else:
            training_time += step_time
            step_times.append(step_time)
            prepare.warn_if_evaluation_is_long(step_times, TOTAL_BATCH_SIZE)
        step += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        progress_line.update(
            f"step {step:05d} ({100 * min(training_time / prepare.TIME_BUDGET, 1.0):5.1f}%) | "
            f"loss {smooth_loss / (1 - 0.9**step):.4f} | balance {balance:.3f} | lrm {lr_mult:.2f} | "
            f"{1000 * step_time:.0f} ms | {TOTAL_BATCH_SIZE / step_time:,.0f} tok/s | epoch {epoch} | "
            f"training_seconds {training_time:.3f} | tokens {step * TOTAL_BATCH_SIZE} | "
            f"{max(prepare.TIME_BUDGET - training_time, 0.0):.0f}s left"
        )
    progress_line.close()
    gc.enable()

    t_eval = time.time()
    val_bpb = prepare.evaluate_bpb(mx.compile(model, inputs=model.state), DEVICE_BATCH_SIZE, dist)
    eval_seconds = time.time() - t_eval
    tokens_per_s = (step - 1) * TOTAL_BATCH_SIZE / max(training_time, 1e-9)
    peak, peak_source = prepare.peak_flops(device, "float32" if compute_dtype == mx.float32 else "bfloat16")
    print(f"startup_seconds: {t_startup:.1f} (imports, model, data, first compiled step; not in training_seconds)")
    print(f"eval_seconds: {eval_seconds:.1f}")
    print(f"throughput: {tokens_per_s:,.0f} tok/s; MFU against {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    prepare.print_summary({
        "architecture": "hybrid", "preset": prepare.PRESET_NAME, "val_bpb": val_bpb,
        "training_seconds": training_time, "total_seconds": time.time() - t_script_start,
        "peak_memory_mb": mx.get_peak_memory() / 1024**2,
        "mfu_percent": 100 * flops * tokens_per_s / (peak * dist.world_size),  # tokens/s of all ranks
        "total_tokens_M": step * TOTAL_BATCH_SIZE / 1e6, "num_steps": step, "num_params_M": num_params / 1e6,
        "depth": len(HYBRID_PATTERN), "hybrid_pattern": HYBRID_PATTERN, "mamba_type": mamba_type,
        "num_active_params_M": num_active_params / 1e6,
        "expert_load": expert_load_summary(mx.distributed.all_sum(run_expert_counts)),  # all ranks' tokens
    }, trained_tokens=step * TOTAL_BATCH_SIZE, dist=dist)


# SECTION: Speed machinery  [identical in both MLX scripts]
# Faster versions of the plain code (bench/RESULTS.md): exp, cos/sin from arithmetic on the CPU; gradients by hand
# where autodiff was slower or kept more memory, each checked at start. THE DOOR swaps them in.


def common_checks(g, tokens_per_micro_step):
    """The (NAME, ok, requirement) checks both scripts share."""
    def check(name, ok, requirement):
        value = g[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return name, number and ok(value), f"{requirement}, got {value!r}"

    heads = g["EXPAND"] * g["D_MODEL"] // g["HEADDIM"] if g["HEADDIM"] > 0 else 0
    mamba3 = "mamba-3" in (g.get("ARCHITECTURE"), g.get("MAMBA_TYPE"))
    nonnegative = "CHUNK_SIZE DT_INIT_FLOOR A_FLOOR GRAD_CLIP WEIGHT_DECAY MATRIX_LR EMBEDDING_LR SCALAR_LR"
    return [
        prepare.one_of(g, "COMPUTE_DTYPE", ("auto", "float32", "bfloat16", "float16")),
        prepare.one_of(g, "OPTIMIZER", ("muon", "adamw")),
        *prepare.positive(g, "D_MODEL", "D_STATE", "HEADDIM", "EXPAND", "NGROUPS", "D_CONV", "MIMO_RANK", "DT_MIN",
                          "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE", "MUON_NS_STEPS", "ADAM_EPS"),
        *[check(name, ok, f"must be {interval}") for interval, ok, names in (
            (">= 0", lambda v: v >= 0, nonnegative), ("in [0, 1)", lambda v: 0 <= v < 1, "MUON_MOMENTUM ADAM_BETA1 "
            "ADAM_BETA2"), ("in [0, 1]", lambda v: 0 <= v <= 1, "WARMUP_RATIO WARMDOWN_RATIO FINAL_LR_FRAC"))
          for name in names.split()],
        check("WARMDOWN_RATIO", lambda v: v + g["WARMUP_RATIO"] <= 1,
              f"must be <= 1 - WARMUP_RATIO ({g['WARMUP_RATIO']!r})"),
        check("DT_MIN", lambda v: v <= g["DT_MAX"], f"must be <= DT_MAX ({g['DT_MAX']!r})"),
        check("ROPE_FRACTION", lambda v: 0 < v <= 1 and (not mamba3 or int(g["D_STATE"] * v) >= 2),
              f"must be in (0, 1] and give a rotary pair of D_STATE ({g['D_STATE']!r})"),
        check("HEADDIM", lambda v: v > 0 and g["EXPAND"] * g["D_MODEL"] % v == 0,
              f"must divide EXPAND * D_MODEL ({g['EXPAND'] * g['D_MODEL']})"),
        check("NGROUPS", lambda v: v > 0 and heads % v == 0, f"must divide the {heads} heads"),
        ("TOTAL_BATCH_SIZE", tokens_per_micro_step > 0 and g["TOTAL_BATCH_SIZE"] % tokens_per_micro_step == 0,
         f"must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN * processes ({tokens_per_micro_step}), "
         f"got {g['TOTAL_BATCH_SIZE']!r}"),
    ]


def scan_flops_per_token(mixer):
    if isinstance(mixer, Mamba2):
        Q, n, p = mixer.chunk_size, mixer.d_state, mixer.headdim
        return 2 * Q * n * mixer.ngroups + mixer.nheads * (2 * Q * p + 4 * p * n)
    c, r, n, p = mixer.chunk_size, (mixer.ranks or (1,))[0], mixer.d_state, mixer.headdim
    return mixer.nheads * (2 * c * r * r * (n + p) + 4 * r * p * n)


def generate(model, tokenizer, prompt, max_new_tokens=64, temperature=1.0):
    """A continuation of `prompt`, decoded token by token (temperature 0: greedy)."""
    cache, new_tokens = [None] * len(model.layers), []
    token = mx.array([tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())], mx.int32)
    for _ in range(max_new_tokens):
        logits = model(token, cache)[:, -1].astype(mx.float32)
        token = mx.argmax(logits, -1) if temperature == 0 else mx.random.categorical(logits / temperature)
        new_tokens.append(token.item())
        token = token.astype(mx.int32)[:, None]
    return tokenizer.decode(new_tokens)


HAND_WRITTEN_GRADIENTS = []


def hand_written_gradient(forward, backward, *example_shapes, domain=None):
    """forward with the gradient backward(primals, cotangents, outputs), checked on inputs of the example shapes
    (`domain` maps the first)."""
    custom = mx.custom_function(forward)
    custom.vjp(backward)
    HAND_WRITTEN_GRADIENTS.append((forward.__name__, forward, custom, example_shapes, domain or (lambda x: x)))
    return custom


def check_hand_written_gradients(tolerance=1e-3):
    """Every hand-written gradient against autodiff of its forward; an unregistered one is an error too."""
    registered = [entry[2] for entry in HAND_WRITTEN_GRADIENTS]
    unregistered = [name for name, value in globals().items()
                    if type(value) is type(registered[0]) and all(value is not c for c in registered)]
    if unregistered:
        raise prepare.HarnessError(
            f"Gradient check failed: {unregistered[0]} has a custom gradient that is not checked: make it with "
            f"hand_written_gradient."
        )
    key = mx.random.key(0)
    for name, forward, custom, shapes, domain in HAND_WRITTEN_GRADIENTS:
        keys = mx.random.split(key, len(shapes) + 1)
        inputs = [mx.random.normal(shape, key=k) for shape, k in zip(shapes, keys)]
        inputs[0] = domain(inputs[0])
        outputs = custom(*inputs)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        cotangents = [mx.random.normal(o.shape, key=keys[-1]) for o in outputs]
        _, by_hand = mx.vjp(custom, inputs, cotangents)
        _, by_autodiff = mx.vjp(forward, inputs, cotangents)
        for i, (g, ref) in enumerate(zip(by_hand, by_autodiff)):
            error = (mx.max(mx.abs(g - ref)) / (mx.max(mx.abs(ref)) + 1e-6)).item()
            if not error <= tolerance:
                raise prepare.HarnessError(
                    f"Gradient check failed: the hand-written gradient of {name} (input {i}) differs from autodiff "
                    f"of its forward by {error:.1e} (relative). Match its backward to the forward, or drop it."
                )


def fast_exp(x):
    return exp_from_polynomial(x) if ON_CPU else mx.exp(x)


def fast_sigmoid(x):
    return 1.0 / (1.0 + fast_exp(-x)) if ON_CPU else mx.sigmoid(x)


def fast_cos_sin(theta):
    return cos_sin_from_polynomial(theta) if ON_CPU else (mx.cos(theta), mx.sin(theta))


def fast_logsumexp(x, axis):
    if not ON_CPU:
        return mx.logsumexp(x, axis=axis)
    peak = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    return peak.squeeze(axis) + mx.log(fast_exp(x - peak).sum(axis=axis))


EXP2_COEFFS = (1.0, 0.6931470036506653, 0.2402222454547882, 0.055507123470306396, 0.009670180268585682,
               0.0013260914711281657)  # 2^f on [-1/2, 1/2], relative error < 1.7e-7


def exp_from_polynomial(x):
    """exp(x) = 2^k 2^f, k = round(x / ln 2): 2^f a polynomial, 2^k float32 bits."""
    t = mx.clip(x.astype(mx.float32) * 1.4426950408889634, -127.0, 127.0)  # x / ln 2
    k = mx.floor(t + 0.5)  # mx.round would not fuse
    f = t - k
    c0, c1, c2, c3, c4, c5 = EXP2_COEFFS
    two_f = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
    # exponent field k + 127; stop_gradient lets autodiff (the check) pass the bit cast
    two_k = mx.stop_gradient(((k.astype(mx.int32) + 127) << 23).view(mx.float32))
    return (two_f * two_k).astype(x.dtype)


exp_from_polynomial = hand_written_gradient(exp_from_polynomial, lambda primals, d_out, out: d_out * out, (4, 8),
                                            domain=lambda x: 3 * x)  # d exp(x) = exp(x) dx; a wide range of exponents


def cos_sin_from_polynomial(theta):
    """(cos, sin) of theta = 2y + pi in [0, 2 pi] from Taylor polynomials of y and the double angles."""
    y = 0.5 * theta - 0.5 * math.pi
    y2 = y * y
    s = y * (1 + y2 * (-1 / 6 + y2 * (1 / 120 + y2 * (-1 / 5040 + y2 * (1 / 362880 + y2 * (-1 / 39916800))))))
    c = 1 + y2 * (-1 / 2 + y2 * (1 / 24 + y2 * (-1 / 720 + y2 * (1 / 40320 + y2 * (-1 / 3628800 + y2 / 479001600)))))
    return s * s - c * c, -2.0 * s * c


def _cos_sin_vjp(theta, cotangents, outputs):
    (d_cos, d_sin), (cos, sin) = cotangents, outputs
    return d_sin * cos - d_cos * sin


cos_sin_from_polynomial = hand_written_gradient(cos_sin_from_polynomial, _cos_sin_vjp, (6,),
                                                domain=lambda x: math.pi * (1 + 0.9 * mx.tanh(x)))  # in [0, 2 pi]


def _decay_matrix_vjp(log_alpha, cotangent, decay):
    """d L[t, s] / d a_u = L[t, s] for s < u <= t (autodiff of cumprod divides)."""
    c = decay.shape[-1]
    idx = mx.arange(c)
    below_rows = mx.cumsum(cotangent * decay, axis=-2, reverse=True)
    return mx.where(idx[:, None] > idx[None, :], below_rows, 0.0).sum(axis=-1)


def _carry_states_vjp(primals, cotangents, outputs):
    """R_j = G_j + decays[j] R_{j+1}, the recurrence run backwards (autodiff of the loop is slow)."""
    decays, added, start = primals
    grad_entering, grad_final = cotangents
    entering, _ = outputs
    after, grad_start = carry_states(decays[..., ::-1, :, :], grad_entering[..., ::-1, :, :], grad_final)
    grad_added = after[..., ::-1, :, :]  # d S_{j+1} / d added[j] = 1
    grad_decays = (grad_added * entering).sum(axis=(-2, -1), keepdims=True)  # d S_{j+1} / d decays[j] = S_j
    return grad_decays, grad_added, grad_start


def _causal_conv1d_vjp(primals, d_out, out):
    """d window_s = sum_k weight[k] d out_{s-k} (autodiff scatters into zero arrays)."""
    window, weight, bias = primals
    K, l = weight.shape[0], d_out.shape[1]
    padded = mx.pad(d_out, [(0, 0), (K - 1, K - 1), (0, 0)])
    d_window = weight[0] * padded[:, K - 1 :]
    for k in range(1, K):
        d_window = d_window + weight[k] * padded[:, K - 1 - k : K - 1 - k + l + K - 1]
    d_weight = mx.stack([(d_out * window[:, k : k + l]).sum(axis=(0, 1)) for k in range(K)])
    return d_window, d_weight, d_out.sum(axis=(0, 1))


# The lean backward: gradients that keep only the inputs and rebuild the rest, one group of heads at a time.

BACKWARD_HEAD_GROUPS = 24


def in_head_groups(backward, arrays, axes, out_axes):
    """backward(*arrays) by groups of heads, chained so that one group's temporaries are alive at a time."""
    heads = arrays[0].shape[axes[0]] if arrays[0].ndim >= abs(axes[0]) else 1
    groups = max(g for g in range(1, min(BACKWARD_HEAD_GROUPS, heads) + 1) if heads % g == 0)
    split = [mx.split(x, groups, axis=a) for x, a in zip(arrays, axes)]
    grads = []
    for i in range(groups):
        args = [parts[i] for parts in split]
        if grads:
            args = mx.depends(args, list(grads[-1]))
        grads.append(backward(*args))
    return tuple(mx.concatenate([g[j] for g in grads], axis=a) for j, a in enumerate(out_axes))


def _gated_chunked_scan_vjp(primals, cotangents, outputs):
    axes = [-3, -3, -3, -4, -4, -4, -3]  # each input's head axis
    return in_head_groups(_chunked_scan_backward, [*primals, *cotangents], axes + [-4, -3], axes)


def _chunked_scan_backward(log_alpha, weight, diag_weight, q, k, v, start_state, dy, d_final):
    """chunked_scan's steps backwards: read = (q E^T) f, chunk states (v e)^T k, y = (q k^T * mix) v."""
    c = log_alpha.shape[-1]
    rank = q.shape[-2] // c
    lead = q.shape[:-2]

    def per_row(x):  # ... C c -> ... C (c r) 1
        return (mx.repeat(x, rank, axis=-1) if rank > 1 else x)[..., None]

    def rank_sum(x):  # ... C (c r) -> ... C c
        return x.reshape(*lead, c, rank).sum(axis=-1) if rank > 1 else x

    decay, mix, to_end, from_start = chunk_gates(log_alpha, weight, diag_weight)
    v_end = v * per_row(to_end)
    chunk_states = v_end.swapaxes(-1, -2) @ k
    chunk_decay = from_start[..., -1, None, None]
    entering, final = carry_states(chunk_decay, chunk_states, start_state)
    # 4. Reading the states.
    dy_entering = dy @ entering
    dq_read = dy_entering * per_row(from_start)
    d_from_start = rank_sum((dy_entering * q).sum(axis=-1))
    d_entering = (dy * per_row(from_start)).swapaxes(-1, -2) @ q
    # 3. The carry, run backwards.
    d_chunk_decay, d_chunk_states, d_start = _carry_states_vjp((chunk_decay, chunk_states, start_state),
                                                               (d_entering, d_final), (entering, final))
    # 2. The chunk states.
    dk_state = v_end @ d_chunk_states
    dv_end = k @ d_chunk_states.swapaxes(-1, -2)
    dv_state = dv_end * per_row(to_end)
    d_to_end = rank_sum((dv_end * v).sum(axis=-1))
    # 1. Inside the chunks.
    scores = q @ k.swapaxes(-1, -2)
    dv = dv_state + rank_mix(scores, mix).swapaxes(-1, -2) @ dy
    d_mixed = dy @ v.swapaxes(-1, -2)
    d_mix = d_mixed * scores
    if rank > 1:
        d_mix = d_mix.reshape(*lead, c, rank, c, rank).sum(axis=(-3, -1))  # ... C c c
    d_scores = rank_mix(d_mixed, mix)
    dq = dq_read + d_scores @ k
    dk = dk_state + d_scores.swapaxes(-1, -2) @ q
    # The gates: mix = L w below the diagonal, gamma on it; to_end = L[end] w.
    idx = mx.arange(c)
    d_mix_below = mx.where(idx[:, None] > idx[None, :], d_mix, 0.0)
    d_diag_weight = mx.diagonal(d_mix, axis1=-2, axis2=-1)
    d_weight = (d_mix_below * decay).sum(axis=-2) + d_to_end * decay[..., -1, :]
    is_last = idx == c - 1
    d_decay = d_mix_below * weight[..., None, :] + mx.where(is_last[:, None], (d_to_end * weight)[..., None, :], 0.0)
    d_from_start = d_from_start + mx.where(is_last, d_chunk_decay[..., 0], 0.0)
    d_log_alpha = _decay_matrix_vjp(log_alpha, d_decay, decay) + mx.cumsum(d_from_start * from_start, axis=-1,
                                                                          reverse=True)
    return d_log_alpha, d_weight, d_diag_weight, dq, dk, dv, d_start


gated_chunked_scan = hand_written_gradient(  # heads 2, chunks 3, 4 tokens x rank 2 per chunk; log decays <= 0
    chunked_scan, _gated_chunked_scan_vjp, (2, 3, 4), (2, 3, 4), (2, 3, 4), (2, 3, 8, 5), (2, 3, 8, 5), (2, 3, 8, 6),
    (2, 6, 5), domain=lambda x: -mx.abs(x))


def _lean_rotate_backward(out, cos, sin, d_out):
    """Per pair out = M x: dx = M^T d_out, and x = M^-1 out."""
    mimo = out.ndim > cos.ndim
    swap = swap_halves if mimo else swap_pairs
    if mimo:
        cos, sin = cos[..., None, :], sin[..., None, :]
    x = (swap(cos) * out - sin * swap(out)) / (cos * swap(cos) - sin * swap(sin))
    d_x = d_out * cos + swap(d_out * sin)
    d_cos, d_sin = d_out * x, d_out * swap(x)
    if mimo:
        d_cos, d_sin = d_cos.sum(axis=-2), d_sin.sum(axis=-2)
    return d_x, d_cos, d_sin


lean_rotate = hand_written_gradient(rotate, lambda primals, d_out, out: in_head_groups(
    _lean_rotate_backward, [out, *primals[1:], d_out], [1] * 4, [1] * 3), (2, 3, 5, 2, 4), (2, 3, 5, 4), (2, 3, 5, 4))


def _mimo_gate_backward(y, v, z, D, mimo_z, mimo_o, d_out):
    """u = y + D v, g = z mimo_z, s = sigmoid(g): d silu(g) = s (1 + g (1 - s)) dg."""
    u = y + D[:, None, None, None] * v
    gate_in = z[:, :, :, None] * mimo_z[:, None]
    s = sigmoid(gate_in)
    gate = gate_in * s
    d_gated = d_out[:, :, :, None] * mimo_o[:, None]
    d_mimo_o = (d_out[:, :, :, None] * u * gate).sum(axis=(0, 2))
    du = d_gated * gate
    d_gate_in = d_gated * u * s * (1 + gate_in * (1 - s))
    d_z = (d_gate_in * mimo_z[:, None]).sum(axis=3)
    d_mimo_z = (d_gate_in * z[:, :, :, None]).sum(axis=(0, 2))
    d_D = (du * v).sum(axis=(0, 2, 3, 4))
    return du, du * D[:, None, None, None], d_z, d_D, d_mimo_z, d_mimo_o


mimo_gate_down = hand_written_gradient(mimo_gate, lambda primals, d_out, out: in_head_groups(
    _mimo_gate_backward, [*primals, d_out], [1, 1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]),
    (2, 3, 5, 2, 4), (2, 3, 5, 2, 4), (2, 3, 5, 4), (3,), (3, 2, 4), (3, 2, 4))


def checkpoint_block(module, fn):
    """nn.utils.checkpoint(module, fn), ordered so that one block's activations are alive at a time. fn(x) -> a tree
    of arrays and None."""
    layout = {}

    def forward(weights, x):  # -> fn(x)'s arrays
        module.update(weights)
        leaves = tree_flatten(fn(x))
        layout["keys"] = [(key, leaf is None) for key, leaf in leaves]
        return [leaf for _, leaf in leaves if leaf is not None]

    recomputed = mx.custom_function(forward)

    def backward(primals, cotangents, outputs):
        weights, x = primals
        names, arrays = zip(*tree_flatten(weights))
        wanted = [i for i, o in enumerate(outputs) if mx.issubdtype(o.dtype, mx.floating)]
        arrays = mx.depends([*arrays, x], [cotangents[i] for i in wanted])  # recompute only then

        def differentiable(*arrays):
            outs = forward(tree_unflatten(list(zip(names, arrays[:-1]))), arrays[-1])
            return [outs[i] for i in wanted]

        _, grads = mx.vjp(differentiable, arrays, [cotangents[i] for i in wanted])
        module.update(weights)  # its own weights, not the recomputation's
        dx = mx.depends([grads[-1]], grads[:-1])[0]
        return tree_unflatten(list(zip(names, grads[:-1]))), dx

    recomputed.vjp(backward)

    def call(x):
        leaves = iter(recomputed(module.trainable_parameters(), x))
        return tree_unflatten([(key, None if is_none else next(leaves)) for key, is_none in layout["keys"]])

    return call


# END SECTION: Speed machinery


def make_training_step(model, optimizer, grad_accum_steps):
    """step(batches, lr_mult) -> (mean cross-entropy, mean balance loss per E block, routed slots per expert, epoch):
    compiled forward+backward per micro-batch (loss + AUX_LOSS_COEFF * balance loss), then mean, clip, update."""

    def loss_fn(inputs, targets):
        logits, balance_loss, expert_counts = model.forward_with_aux(inputs)
        ce = cross_entropy(logits, targets)
        return ce + AUX_LOSS_COEFF * balance_loss, (ce, balance_loss, expert_counts)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    num_moe_blocks = max(len(model.moe_layers()), 1)

    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def forward_backward(inputs, targets):
        (_, aux), grads = loss_and_grad(inputs, targets)
        return aux, grads

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def optimizer_step(grads, lr_mult):
        grads = nn.average_gradients(grads)  # over data-parallel ranks
        grads = tree_map(lambda g: g / grad_accum_steps, grads)
        if GRAD_CLIP > 0:
            norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
            grads = tree_map(lambda g: g * mx.minimum(1.0, GRAD_CLIP / (norm + 1e-6)), grads)
        optimizer.update(model, grads, lr_mult)

    def step(batches, lr_mult):
        grad_sum, loss_sum, balance_sum, counts_sum = None, 0.0, 0.0, 0
        for _ in range(grad_accum_steps):
            inputs, targets, epoch = next(batches)
            (loss, balance_loss, expert_counts), grads = forward_backward(mx.array(inputs), mx.array(targets))
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            loss_sum = loss_sum + loss
            balance_sum = balance_sum + balance_loss
            counts_sum = counts_sum + expert_counts
            mx.async_eval(loss_sum, balance_sum, counts_sum, grad_sum)
        optimizer_step(grad_sum, mx.array(lr_mult, mx.float32))
        mean_loss = loss_sum / grad_accum_steps
        mean_balance = balance_sum / (grad_accum_steps * num_moe_blocks)  # per E block; 1.0 = an even load
        mx.async_eval(mean_loss, mean_balance, model.state, optimizer.state)
        return mean_loss, mean_balance, counts_sum, epoch

    return step


def check_hyperparameters(tokens_per_micro_step):
    """One-line errors for settings that cannot train, then the gradient check."""
    try:
        pattern_problem = validate_pattern(HYBRID_PATTERN) and ""
    except ValueError as e:
        pattern_problem = str(e).replace(f"HYBRID_PATTERN {HYBRID_PATTERN!r} ", "").replace("HYBRID_PATTERN ", "")
    g = globals()
    prepare.check_hyperparameters("train_hybrid_moe_mlx", [
        ("HYBRID_PATTERN", not pattern_problem, f"{HYBRID_PATTERN!r}: {pattern_problem}"),
        prepare.one_of(g, "MAMBA_TYPE", ("mamba-2", "mamba-3")),
        *prepare.positive(g, "NUM_ATTENTION_HEADS", "NUM_KV_HEADS", "ATTN_HEAD_DIM", "ROPE_THETA", "NUM_EXPERTS",
                          "TOP_K", "EXPERT_HIDDEN", "DENSE_MLP_HIDDEN"),
        ("SHARED_EXPERT_HIDDEN", SHARED_EXPERT_HIDDEN >= 0, f"must be >= 0 (0 = none), got {SHARED_EXPERT_HIDDEN!r}"),
        ("AUX_LOSS_COEFF", AUX_LOSS_COEFF >= 0, f"must be >= 0, got {AUX_LOSS_COEFF!r}"),
        *common_checks(g, tokens_per_micro_step),
        ("NUM_KV_HEADS", NUM_KV_HEADS > 0 and NUM_ATTENTION_HEADS % NUM_KV_HEADS == 0,
         f"must divide NUM_ATTENTION_HEADS ({NUM_ATTENTION_HEADS}), got {NUM_KV_HEADS!r}"),
        ("TOP_K", 0 < TOP_K <= NUM_EXPERTS, f"must be between 1 and NUM_EXPERTS ({NUM_EXPERTS}), got {TOP_K!r}"),
    ])
    check_hand_written_gradients()


def flops_per_token(model, seq_len):
    """Training FLOPs per token (MFU): 6 * the weights that multiply a token's activations (its top_k experts only)
    + 3 * the forward FLOPs of the scans and of attention over a seq_len row."""
    weights = [model.embed.weight] + [p for _, p in matrix_parameters(model)]
    weights += [m.weight for _, m in model.named_modules() if isinstance(m, CausalConv1d)]
    matmul_params = sum(w.size for w in weights) - (model.num_params() - model.num_active_params())
    mixing = 0
    for block in model.layers:
        if block.kind == "M":
            mixing += scan_flops_per_token(block.layer)
        elif block.kind == "*":  # the kernel computes the whole seq_len x seq_len product
            mixing += 4 * block.layer.num_heads * block.layer.head_dim * seq_len
    return 6 * matmul_params + 3 * mixing


# The CPU's layouts of attention and the routed experts (figures: bench/RESULTS.md). MLX's CPU attention builds the
# whole l x l softmax, masked half included: here the queries go in blocks, with the polynomial exp. MLX's CPU
# gather_mm runs one small product per matrix: here an expert's rows go in groups of EXPERT_GROUP_ROWS_CPU.
ATTENTION_QUERY_BLOCK_CPU = 64
EXPERT_GROUP_ROWS_CPU = 64


def attention_in_query_blocks(q, k, v, scale):
    """causal_attention with the queries in blocks, each against the keys up to its last query only."""
    b, heads, l, d = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if not ON_CPU or l == 1 or keys != l:  # the fused kernel's "causal" aligns the queries with the last l keys
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if l > 1 else None)
    group = heads // kv_heads
    q = (q * scale).reshape(b, kv_heads, group, l, d)
    blocks = []
    for start in range(0, l, ATTENTION_QUERY_BLOCK_CPU):
        end = min(start + ATTENTION_QUERY_BLOCK_CPU, l)
        scores = q[:, :, :, start:end].reshape(b, kv_heads, -1, d) @ k[:, :, :end].swapaxes(-1, -2)
        scores = scores.reshape(b, kv_heads, group, end - start, end)
        scores = mx.where(mx.arange(start, end)[:, None] >= mx.arange(end), scores, -mx.inf)
        weights = exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
        weights = weights / weights.sum(axis=-1, keepdims=True)
        blocks.append((weights.reshape(b, kv_heads, -1, end) @ v[:, :, :end]).reshape(b, kv_heads, group, -1, d))
    return mx.concatenate(blocks, axis=3).reshape(b, heads, l, d)


def expert_row_groups(slot_experts, num_experts, group_rows=None):
    """expert_groups with each expert's rows padded to whole groups of group_rows (filler: copies of a real row, never
    read back); as many groups as any routing can need, so a compiled step keeps its shapes."""
    group_rows = group_rows or (EXPERT_GROUP_ROWS_CPU if ON_CPU else 1)
    order = mx.argsort(slot_experts)
    if group_rows == 1:
        return order, mx.argsort(order), slot_experts[order]
    counts = (slot_experts[:, None] == mx.arange(num_experts, dtype=slot_experts.dtype)).sum(axis=0)
    padded = (counts + group_rows - 1) // group_rows * group_rows
    first_row = mx.cumsum(padded) - padded
    filler_before = first_row - (mx.cumsum(counts) - counts)
    row_of_slot = (mx.arange(slot_experts.size) + filler_before[slot_experts[order]])[mx.argsort(order)]
    num_groups = (slot_experts.size + num_experts * (group_rows - 1)) // group_rows
    group_start = mx.arange(num_groups) * group_rows
    group_experts = (mx.cumsum(padded)[None] <= group_start[:, None]).sum(axis=1)
    group_experts = mx.minimum(group_experts, num_experts - 1).astype(slot_experts.dtype)
    row, row_expert = mx.arange(num_groups * group_rows), mx.repeat(group_experts, group_rows)
    real = row < (first_row + counts)[row_expert]
    return order[mx.where(real, row - filler_before[row_expert], 0)], row_of_slot, group_experts



# THE DOOR: the speed section replaces these names of the plain code above, here only.
exp, sigmoid, cos_sin, logsumexp = fast_exp, fast_sigmoid, fast_cos_sin, fast_logsumexp  # noqa: F811
checkpoint = checkpoint_block
decay_matrix = hand_written_gradient(decay_matrix, _decay_matrix_vjp, (2, 3, 8), domain=lambda x: -mx.abs(x))
carry_states = hand_written_gradient(carry_states, _carry_states_vjp, (2, 3, 1, 1), (2, 3, 4, 5), (2, 4, 5))
causal_conv1d = hand_written_gradient(causal_conv1d, _causal_conv1d_vjp, (2, 9, 3), (4, 3), (3,))
lean_backward = (lean_rotate, gated_chunked_scan, mimo_gate_down)
causal_attention, expert_groups = attention_in_query_blocks, expert_row_groups  # noqa: F811 (the CPU's layouts)

if __name__ == "__main__":
    prepare.run(main)
