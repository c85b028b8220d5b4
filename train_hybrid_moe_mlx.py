"""
Train a hybrid Mamba-Transformer mixture-of-experts language model (Nemotron-H style) with MLX for a fixed time budget,
then report val_bpb.

The layer stack is the string HYBRID_PATTERN, one character per pre-norm residual block x = x + layer(RMSNorm(x)):
    M  Mamba block (Mamba-2 or Mamba-3 by MAMBA_TYPE; the same blocks and chunked scans as train_mamba_3_mlx.py)
    *  causal self-attention (grouped-query, RoPE)
    E  mixture-of-experts FFN (softmax router, top-k experts per token, load-balancing loss)
    -  dense MLP (SwiGLU)
e.g. "ME*EM": a Mamba block mixes the sequence and an MoE block transforms each token, so "ME" acts like one
transformer layer.

This is the file the agent edits. Run: `uv run train_hybrid_moe_mlx.py`
Reads top to bottom: hyperparameters, the Mamba blocks (the same sections as train_mamba_3_mlx.py), attention and
mixture of experts, the language model, optimizer, training loop and summary, and last the speed machinery.
"""

import gc
import math
import time
from collections import namedtuple
from dataclasses import dataclass
from functools import partial

t_script_start = time.time()  # total_seconds counts from here (imports included)

import prepare  # first: loads the fast BLAS before MLX is imported

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

ON_CPU = mx.default_device() == mx.cpu  # MLX's CPU backend: the speed section's fast paths and float32

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters: the values this run trains with (setup writes the preset's sizes here; program.md)

# Model: the layer stack
HYBRID_PATTERN = "MEM*EME"  # one block per character: M Mamba, * attention, E mixture of experts, - dense MLP
MAMBA_TYPE = "mamba-3"  # what the M blocks are: "mamba-3" or "mamba-2"
D_MODEL = 512  # width of the residual stream

# Mamba blocks (M): the knobs of train_mamba_3_mlx.py
D_STATE = 64  # SSM state size n per head (the "key/query" side); upstream's default is 128
HEADDIM = 64  # value-side width p per head; heads = EXPAND * D_MODEL / HEADDIM
EXPAND = 2  # inner width d_inner = EXPAND * D_MODEL
NGROUPS = 1  # B/C groups; heads share B and C within a group
D_CONV = 4  # Mamba-2 only: kernel width of the depthwise causal conv over x, B, C
CHUNK_SIZE = 0  # scan chunk, speed only; 0 = measured default: Mamba-2 32 (upstream 256), Mamba-3 64 // MIMO rank
DT_MIN = 0.001  # dt_bias is initialised so that softplus(dt_bias) is log-uniform in [DT_MIN, DT_MAX]
DT_MAX = 0.1
DT_INIT_FLOOR = 1e-4  # ... and at least this
A_FLOOR = 1e-4  # Mamba-3: the decay rate A is at most -A_FLOOR (never a perfect integrator)
ROPE_FRACTION = 0.5  # Mamba-3: fraction of the state dims rotated by the data-dependent angles
IS_MIMO = False  # Mamba-3: multi-input multi-output state update (rank MIMO_RANK) instead of SISO
MIMO_RANK = 4
IS_OUTPROJ_NORM = False  # Mamba-3: grouped RMSNorm before the output gate

# Attention blocks (*)
NUM_ATTENTION_HEADS = 8  # query heads
NUM_KV_HEADS = 2  # key/value heads, each shared by NUM_ATTENTION_HEADS / NUM_KV_HEADS query heads (grouped-query)
ATTN_HEAD_DIM = 64  # width of one head
ROPE_THETA = 10000.0  # base of the rotary position frequencies

# Mixture-of-experts blocks (E)
NUM_EXPERTS = 8  # routed experts per E block
TOP_K = 2  # experts each token is sent to; compute per token grows with TOP_K, not with NUM_EXPERTS
EXPERT_HIDDEN = 512  # hidden width of one (SwiGLU) expert
SHARED_EXPERT_HIDDEN = 0  # hidden width of an always-on shared expert in every E block; 0 = none
AUX_LOSS_COEFF = 0.01  # weight of the load-balancing loss (1.0 when routing is uniform) added to the training loss

# Dense MLP blocks (-)
DENSE_MLP_HIDDEN = 1024  # hidden width of the SwiGLU; 2 * EXPERT_HIDDEN matches an E block's active width at top-2

# Optimization (learning rates are peak values, scaled by the schedule)
DEVICE_BATCH_SIZE = 8  # rows per forward/backward pass
TOTAL_BATCH_SIZE = 8 * 2048  # tokens per optimizer step; a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN (grad accum)
OPTIMIZER = "muon"  # the projection matrices' optimizer: "muon" or "adamw" (the rest is always AdamW)
MATRIX_LR = 0.006  # projections (Mamba, attention, router, experts (each its own), MLPs). Measured on the cpu preset
# (README); other sizes keep it, since Muon's update is scaled to AdamW's RMS (its rate carries across widths to first
# order; no GPU has checked it)
EMBEDDING_LR = 0.004  # the tied embedding / unembedding matrix
SCALAR_LR = 0.004  # A_log, dt_bias, D, norm weights, biases, conv taps (no weight decay)
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5  # Newton-Schulz iterations per orthogonalisation
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1  # decoupled, matrices and embedding only
GRAD_CLIP = 1.0  # clip the global gradient norm to this; 0 turns clipping off
WARMUP_RATIO = 0.0  # fraction of the time budget spent ramping the learning rate up from 0 (0 = start at the peak)
WARMDOWN_RATIO = 0.5  # fraction of the time budget at the end spent decaying it linearly ...
FINAL_LR_FRAC = 0.05  # ... down to this fraction of the peak
COMPUTE_DTYPE = "auto"  # activations/matmuls: "float32", "bfloat16" or "auto" (bf16 on GPU, fp32 on CPU, measured)
CHECKPOINT_BLOCKS = True  # recompute each block in the backward pass instead of keeping its activations: default
# model at 8 x 2048, 12.5 -> 6.8 GB (README), for one more forward of the blocks; off in the cpu and local presets
SEED = 42



@dataclass
class HybridConfig:
    """Everything a block needs, passed whole: a new knob is one constant, one field and its use."""

    pattern: str = HYBRID_PATTERN
    mamba_type: str = MAMBA_TYPE
    vocab_size: int = prepare.VOCAB_SIZE
    d_model: int = D_MODEL
    d_state: int = D_STATE
    headdim: int = HEADDIM
    expand: int = EXPAND
    ngroups: int = NGROUPS
    d_conv: int = D_CONV
    chunk_size: int = CHUNK_SIZE
    dt_min: float = DT_MIN
    dt_max: float = DT_MAX
    dt_init_floor: float = DT_INIT_FLOOR
    a_floor: float = A_FLOOR
    rope_fraction: float = ROPE_FRACTION
    is_mimo: bool = IS_MIMO
    mimo_rank: int = MIMO_RANK
    is_outproj_norm: bool = IS_OUTPROJ_NORM
    num_attention_heads: int = NUM_ATTENTION_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    attn_head_dim: int = ATTN_HEAD_DIM
    rope_theta: float = ROPE_THETA
    num_experts: int = NUM_EXPERTS
    top_k: int = TOP_K
    expert_hidden: int = EXPERT_HIDDEN
    shared_expert_hidden: int = SHARED_EXPERT_HIDDEN
    dense_mlp_hidden: int = DENSE_MLP_HIDDEN
    checkpoint_blocks: bool = CHECKPOINT_BLOCKS


# =====================================================================================================================
# SECTION: Mamba (shared layers, the chunked scan, Mamba-2 and Mamba-3 blocks)  [identical in both MLX scripts]
# =====================================================================================================================
# Papers: Mamba-2 "Transformers are SSMs" (Dao & Gu, 2024, arXiv:2405.21060), its SSD algorithm as in mamba_ssm's
# ssd_minimal.py; Mamba-3 (2025, mamba_ssm's Mamba3 module and step references).


def silu(x):
    return x * sigmoid(x)  # sigmoid, exp, cos_sin: exact and fast on the CPU (speed section)


def softplus(x):
    return mx.maximum(x, 0.0) + mx.log1p(exp(-mx.abs(x)))  # log(1 + e^x) without overflow; exp: speed section


def rms_norm(x, weight=None, eps=1e-5):
    return mx.fast.rms_norm(x, weight, eps)


def init_dt_bias(nheads, c):
    """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max], floored at dt_init_floor (upstream)."""
    dt = mx.maximum(mx.exp(mx.random.uniform(math.log(c.dt_min), math.log(c.dt_max), (nheads,))), c.dt_init_floor)
    return dt + mx.log(-mx.expm1(-dt))  # the inverse of softplus


def to_chunks(x, chunk_size, axis):
    """Split the time axis of x into (chunks, chunk_size), zero-padding it to a multiple of the chunk. A padded token
    has zero weight and zero log decay, so it leaves the state unchanged."""
    axis = axis % x.ndim
    pad = -x.shape[axis] % chunk_size
    if pad:
        x = mx.pad(x, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (x.ndim - axis - 1))
    return x.reshape(*x.shape[:axis], -1, chunk_size, *x.shape[axis + 1 :])


def chunked_scan(q, k, v, log_alpha, weight, diag_weight, start_state):
    """The one chunked core of both architectures. Per head, a state P (p x n) and
        P_t = alpha_t P_{t-1} + w_t v_t k_t^T,    y_t = P_t q_t   (the current key weighted gamma_t, not w_t, in y_t)
    with alpha_t = exp(log_alpha_t). Inputs in chunks: q, k `... C (c r) n`, v `... C (c r) p`, log_alpha, weight
    (w, None = 1), diag_weight (gamma, None = w) `... C c`, start_state `... p n`; head axes may broadcast (SSD shares
    q, k within a group), and rank r > 1 (Mamba-3 MIMO) puts r keys and queries per token. Returns y `... C (c r) p`
    and the final state `... p n`.
    Float32 (its matmuls TF32 on CUDA and M5 GPUs unless MLX_ENABLE_TF32=0, still finer than the bf16 around it)."""
    rank = q.shape[-2] // log_alpha.shape[-1]
    # 1. Inside each chunk: causal "attention" q_t . k_s weighted by the decay L[t, s] = alpha_{s+1} ... alpha_t.
    decay, mix, to_end, from_start = chunk_gates(log_alpha, weight, diag_weight)
    y = rank_mix(q @ k.swapaxes(-1, -2), mix) @ v
    # 2. The state each chunk adds by its end: sum_s L[end, s] w_s v_s k_s^T.
    chunk_decay = from_start[..., -1]
    if rank > 1:
        to_end, from_start = mx.repeat(to_end, rank, axis=-1), mx.repeat(from_start, rank, axis=-1)
    shared = k.shape[-4] == 1 < v.shape[-4]  # SSD: the heads of a group share q and k
    chunk_states = (v * to_end[..., None]).swapaxes(-1, -2)  # ... C p (c r)
    chunk_states = shared_matmul(chunk_states, k) if shared else chunk_states @ k  # ... C p n (speed section)
    # 3. Pass the states across chunks, a loop over chunks (not tokens): S_in[j+1] = decay of chunk j * S_in[j] + its
    #    own state, from S_in[0] = start_state.
    start_state = mx.broadcast_to(start_state, chunk_states.shape[:-3] + chunk_states.shape[-2:])
    entering, final = carry_states(chunk_decay[..., None, None], chunk_states, start_state)  # speed section
    # 4. Each token reads the state its chunk received, decayed from the chunk start.
    if shared:
        read = shared_matmul(entering, q.swapaxes(-1, -2)).swapaxes(-1, -2)  # ... C (c r) p (speed section)
    else:
        read = q @ entering.swapaxes(-1, -2)
    return y + read * from_start[..., None], final


def chunk_gates(log_alpha, weight, diag_weight):
    """The per-chunk factors of chunked_scan: decay L `... C c c`, mix (L weighted, gamma on the diagonal), to_end
    L[end, s] w_s and from_start (the decay from the chunk start to each token) `... C c`."""
    c = log_alpha.shape[-1]
    decay = decay_matrix(log_alpha)  # L[t, s] = alpha_{s+1} ... alpha_t (speed section)
    mix = decay if weight is None else decay * weight[..., None, :]
    if diag_weight is not None:
        mix = mx.where(mx.eye(c, dtype=mx.bool_), diag_weight[..., :, None], mix)
    to_end = decay[..., -1, :] if weight is None else decay[..., -1, :] * weight
    from_start = exp(mx.cumsum(log_alpha, axis=-1))  # speed section
    return decay, mix, to_end, from_start


def rank_mix(scores, mix):
    """scores `... (c r) (c r)` * mix `... c c`: every (query rank, key rank) pair of tokens t, s shares mix[t, s]."""
    c = mix.shape[-1]
    rank = scores.shape[-1] // c
    if rank == 1:
        return scores * mix
    lead = scores.shape[:-2]
    return (scores.reshape(*lead, c, rank, c, rank) * mix[..., :, None, :, None]).reshape(scores.shape)


def ssd_scan(X, A, B, C, chunk_size, initial_states=None):
    """Mamba-2's SSD scan, S_t = exp(A_t) S_{t-1} + X_t B_t^T, Y_t = S_t C_t per head, in upstream's
    ssd_minimal_discrete conventions: X = x * dt [b l h p], A = A * dt [b l h] (<= 0), B, C [b l g n] (g groups of
    heads share them), initial_states [b h p n] or None. Returns (Y [b l h p], final state [b h p n]), float32."""
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    Q = min(chunk_size, l)
    f32 = mx.float32
    x = X.astype(f32).reshape(b, l, g, h // g, p).transpose(0, 2, 3, 1, 4)  # b g hg l p
    a = A.astype(f32).reshape(b, l, g, h // g).transpose(0, 2, 3, 1)  # b g hg l
    keys = B.astype(f32).transpose(0, 2, 1, 3)[:, :, None]  # b g 1 l n: shared by the group's heads
    queries = C.astype(f32).transpose(0, 2, 1, 3)[:, :, None]
    start = mx.zeros((b, h, p, n), f32) if initial_states is None else initial_states.astype(f32)
    start = start.reshape(b, g, h // g, p, n)
    chunked = [to_chunks(t, Q, 3) for t in (queries, keys, x, a)]
    y, state = chunked_scan(*chunked, None, None, start)  # b g hg C Q p
    y = y.reshape(b, g, h // g, -1, p)[:, :, :, :l].transpose(0, 3, 1, 2, 4)
    return y.reshape(b, l, h, p), state.reshape(b, h, p, n)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-2 block (upstream Mamba2): in_proj -> [z | xBC | dt], causal depthwise conv + SiLU on xBC, SSD scan with a skip
# D, grouped RMSNorm of y * silu(z) (gate first, then norm), out_proj. Its state: (last d_conv - 1 inputs of the conv
# [b K-1 conv_dim], SSM state [b h p n]).


class Linear(nn.Linear):
    """nn.Linear without bias that computes in the dtype of its input (the float32 master weight is cast on use),
    so COMPUTE_DTYPE can be bfloat16 while the optimizer updates float32 weights."""

    def __init__(self, in_dims, out_dims):
        super().__init__(in_dims, out_dims, bias=False)

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class RMSNorm(nn.Module):
    def __init__(self, dims, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x):
        return rms_norm(x, self.weight.astype(x.dtype), self.eps)


def block_input(norm, x, compute_dtype):
    """What a block's layer reads: the RMSNorm of the residual stream, in the compute dtype. The stream itself stays
    float32 (upstream's residual_in_fp32): x + layer(...) promotes a bfloat16 output back, so bfloat16 rounding does
    not pile up over depth (bf16 logits 18% closer to float32's than with a bf16 stream: bench/RESULTS.md)."""
    return norm(x).astype(compute_dtype)


class GatedMLP(nn.Module):
    """SwiGLU: fc2(h * silu(gate)) with [h | gate] = fc1(x)."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = Linear(d_model, 2 * hidden)
        self.fc2 = Linear(hidden, d_model)

    def __call__(self, x):
        h, gate = mx.split(self.fc1(x), 2, axis=-1)
        return self.fc2(h * silu(gate))


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with bias; torch Conv1d's init, uniform(+-1/sqrt(K))."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = mx.random.uniform(-bound, bound, (kernel_size, channels))
        self.bias = mx.random.uniform(-bound, bound, (channels,))

    def __call__(self, x, history=None):  # x [b l c], history [b K-1 c] (the inputs before x; None = zeros)
        K = self.weight.shape[0]
        if history is None:
            history = mx.zeros((x.shape[0], K - 1, x.shape[2]), x.dtype)
        window = mx.concatenate([history.astype(x.dtype), x], axis=1)  # [b K-1+l c]
        out = causal_conv1d(window, self.weight.astype(x.dtype), self.bias.astype(x.dtype))  # speed section
        return out, window[:, window.shape[1] - (K - 1) :]


MAMBA2_CHUNK = 32  # measured (bench/bench_mamba_mlx.py, d_state = headdim = 32, CPU): 32 beat 64 by 1-10% per step


class Mamba2(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups = c.headdim, c.d_state, c.ngroups
        self.chunk_size = c.chunk_size or MAMBA2_CHUNK
        self.conv_dim = self.d_inner + 2 * c.ngroups * c.d_state  # x, B, C go through the conv together
        self.in_proj = Linear(c.d_model, self.d_inner + self.conv_dim + self.nheads)  # z | xBC | dt
        self.conv = CausalConv1d(self.conv_dim, c.d_conv)
        self.dt_bias = init_dt_bias(self.nheads, c)
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.nheads,)))  # A = -exp(A_log) in [-16, -1]
        self.D = mx.ones((self.nheads,))
        self.norm_weight = mx.ones((self.d_inner,))
        self.out_proj = Linear(self.d_inner, c.d_model)

    def __call__(self, u, state=None):  # u [b l d_model] -> (y [b l d_model], state after the last token)
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        conv_state, ssm_state = state if state is not None else (None, None)
        z, xBC, dt = mx.split(self.in_proj(u), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
        xBC, conv_state = self.conv(xBC, conv_state)
        x, B, C = mx.split(silu(xBC), [self.d_inner, self.d_inner + g * n], axis=-1)
        dt = softplus(dt.astype(mx.float32) + self.dt_bias)  # [b l h]
        A = -mx.exp(self.A_log)  # [h]
        x = x.reshape(b, l, h, p)
        y, ssm_state = ssd_scan(x * dt[..., None], A * dt, B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                                self.chunk_size, ssm_state)
        y = (y + x * self.D[:, None]).reshape(b, l, self.d_inner).astype(u.dtype) * silu(z)
        y = rms_norm(y.reshape(b, l, g, -1)).reshape(b, l, -1) * self.norm_weight.astype(y.dtype)  # norm per group
        return self.out_proj(y), (conv_state, ssm_state)

    def scan_flops_per_token(self):
        """Forward FLOPs per token of the scan's matmuls (for MFU): per group, C.B scores 2*Q*n; per head, the masked
        product with X 2*Q*p, the chunk state 2*p*n and reading the carried state 2*p*n."""
        Q, n, p = self.chunk_size, self.d_state, self.headdim
        return 2 * Q * n * self.ngroups + self.nheads * (2 * Q * p + 4 * p * n)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3 scans. Per head, with q~, k~ the rotated q, k, lam_t = sigmoid(trap_t), alpha_t = exp(ADT_t):
#     S_t = alpha_t S_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T,   y_t = S_t q~_t + D v_t  (* silu z_t)
#     beta_t = (1 - lam_t) dt_t alpha_t,   gamma_t = lam_t dt_t    (the exponential-trapezoidal rule)
#     theta_t = theta_{t-1} + pi tanh(angles_t) dt_t (mod 2 pi); q, k rotated by theta_t on pairs of dims as upstream's
#     kernels pair them: SISO (0,1), (2,3), ...; MIMO (0, n/2), (1, n/2 + 1), ...
# MIMO (rank r): r keys, queries, values per token, v_{t,i} = x_t * mimo_v[i], outputs gated by silu(z_t * mimo_z[i])
# and summed with weights mimo_o[i]. State: (angle `b h a`, ssm `b h p n`, last rotated k `b h n` (MIMO `b r h n`),
# last x `b h p`); step references in tests/mlx_reference.py. Chunked: P_t = S_t + beta'_{t+1} v_t k~_t^T (beta' =
# (1 - lam) dt, beta'_L = 0) obeys chunked_scan's recurrence with w_t = gamma_t + beta'_{t+1}, diagonal gamma_t; a
# carried (k, v) enters the start state as beta'_0 v_prev k~_prev^T.


def wrap_angle(theta):
    return theta - 2.0 * math.pi * mx.floor(theta / (2.0 * math.pi))  # in [0, 2 pi); the floor has zero gradient


def cumulative_angles(increments, initial_angle, chunk_size):
    """theta_t = theta_{-1} + sum_{u<=t} increments_u (mod 2 pi) along axis 2 of `b h l a`, summed within chunks and
    then over wrapped chunk totals, so float32 keeps its precision on long sequences."""
    l = increments.shape[2]
    within = mx.cumsum(to_chunks(increments, chunk_size, 2), axis=3)  # b h C c a
    chunk_totals = wrap_angle(within[:, :, :, -1])
    offsets = wrap_angle(mx.cumsum(chunk_totals, axis=2, inclusive=False) + initial_angle[:, :, None])
    theta = wrap_angle(within + offsets[:, :, :, None])
    return theta.reshape(*theta.shape[:2], -1, theta.shape[-1])[:, :, :l]


def rotation(theta, n, halves=False):
    """Factors that rotate a pairs (i, j) of an n-vector by theta `... a`: rotate(x) = x * cos + partner(x) * sin gives
    (x_i, x_j) -> (x_i cos - x_j sin, x_i sin + x_j cos); other dims pass through. Pairs (2k, 2k+1), or (k, n/2 + k)
    with halves=True (MIMO), k < a: upstream's SISO and MIMO kernels."""
    a, lead = theta.shape[-1], [(0, 0)] * (theta.ndim - 1)
    cos, sin = cos_sin(theta)  # speed section
    if halves:
        cos, sin = mx.pad(cos, lead + [(0, n // 2 - a)], constant_values=1.0), mx.pad(sin, lead + [(0, n // 2 - a)])
        return mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)
    cos = mx.stack([cos, cos], axis=-1).reshape(*theta.shape[:-1], 2 * a)
    sin = mx.stack([-sin, sin], axis=-1).reshape(*theta.shape[:-1], 2 * a)
    return mx.pad(cos, lead + [(0, n - 2 * a)], constant_values=1.0), mx.pad(sin, lead + [(0, n - 2 * a)])


def rotate(x, cos, sin):
    if x.ndim > cos.ndim:  # MIMO: x `b h l r n`, one angle per token; pairs halves (factors made with halves=True)
        return x * cos[..., None, :] + swap_halves(x) * sin[..., None, :]
    return x * cos + swap_pairs(x) * sin


def swap_pairs(x):
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)  # (x1, x0) per pair


def swap_halves(x):
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)[..., ::-1, :].reshape(x.shape)  # (x[n/2:], x[:n/2])


def heads_qk(X, bias, heads):
    """Q or K `b l g n` (`b l r g n`) plus the per-head bias `h n` (`h r n`) -> `b h l n` (`b h l r n`)."""
    g = X.shape[-2]
    if X.ndim == 4:
        X = X.transpose(0, 2, 1, 3)[:, :, None]  # b g 1 l n
        return (X + bias.reshape(g, heads // g, 1, -1)).reshape(X.shape[0], heads, *X.shape[3:])
    X = X.transpose(0, 3, 1, 2, 4)[:, :, None]  # b g 1 l r n
    return (X + bias.reshape(g, heads // g, 1, *bias.shape[1:])).reshape(X.shape[0], heads, *X.shape[3:])


# A Mamba-3 scan's inputs as mamba3_siso_scan describes them (D, Z may be None), and MIMO's per-rank weights `h r p`:
# x up to the rank values, z up to the rank gates (None without Z), the outputs down (None keeps the ranks apart).
Mamba3Inputs = namedtuple("Mamba3Inputs", "Q K V ADT DT Trap Q_bias K_bias Angles D Z")
MimoWeights = namedtuple("MimoWeights", "up_x up_z down")


def mamba3_scan(inputs, mimo, initial_states, chunk_size, lean_backward):
    """Shared body of the SISO (mimo None) and MIMO (mimo a MimoWeights) scans; layout `b h l ...`."""
    s = Mamba3Inputs(*(None if t is None else t.astype(mx.float32) for t in inputs))  # float32 inside
    mimo = None if mimo is None else MimoWeights(*(None if t is None else t.astype(mx.float32) for t in mimo))
    b, l, h, p = s.V.shape
    n, a = s.Q.shape[-1], s.Angles.shape[-1]
    chunk_size = min(chunk_size, l)
    if initial_states is None:
        k_shape = (b, h, n) if mimo is None else (b, s.Q.shape[2], h, n)
        initial_states = (mx.zeros((b, h, a)), mx.zeros((b, h, p, n)), mx.zeros(k_shape), mx.zeros((b, h, p)))
    angle0, ssm0, k0, x0 = (t.astype(mx.float32) for t in initial_states)
    if lean_backward:  # the same forward; hand-written gradients that keep only their inputs (speed section)
        rotate_qk, gate_down = lean_rotate, mimo_gate_down  # speed section

        def scan(q, k, v, log_alpha, weight, diag_weight, start_state):
            return gated_chunked_scan(log_alpha, weight, diag_weight, q, k, v, start_state)  # speed section
    else:
        rotate_qk, scan, gate_down = rotate, chunked_scan, None

    # 1. Angles, then q and k rotated token by token (rotations compose: q~_t . k~_s sees theta_t - theta_s).
    theta = cumulative_angles(math.pi * mx.tanh(s.Angles).transpose(0, 2, 1, 3) * s.DT[..., None], angle0, chunk_size)
    cos, sin = rotation(theta, n, halves=mimo is not None)  # b h l n
    q = rotate_qk(heads_qk(s.Q, s.Q_bias, h), cos, sin)  # b h l n (b h l r n)
    k = rotate_qk(heads_qk(s.K, s.K_bias, h), cos, sin)
    x = s.V.transpose(0, 2, 1, 3)  # b h l p
    v = x if mimo is None else x[:, :, :, None] * mimo.up_x[:, None]  # b h l (r) p

    # 2. Trapezoid weights: w_t = gamma_t + beta'_{t+1} on the state, gamma_t on the diagonal.
    gamma = sigmoid(s.Trap) * s.DT  # sigmoid: speed section
    beta_prime = s.DT - gamma  # (1 - lam) dt
    weight = gamma + mx.pad(beta_prime[..., 1:], [(0, 0), (0, 0), (0, 1)])

    # 3. The carried (k, v) of the previous segment enters the start state with weight beta'_0.
    if mimo is None:
        carried = (x0 * beta_prime[..., :1])[..., :, None] * k0[..., None, :]
    else:
        v0 = x0[:, :, None] * mimo.up_x[None] * beta_prime[..., :1, None]  # b h r p
        carried = v0.swapaxes(-1, -2) @ k0.transpose(0, 2, 1, 3)

    # 4. The chunked scan (MIMO: each chunk holds c*r queries and keys).
    chunked = [to_chunks(t, chunk_size, 2) for t in (q, k, v)]
    chunked = [t.reshape(*t.shape[:3], -1, t.shape[-1]) for t in chunked]  # b h C (c r) n|p
    gates = [to_chunks(t, chunk_size, 2) for t in (s.ADT, weight, gamma)]
    y, final_ssm = scan(*chunked, *gates, ssm0 + carried)
    y = y.reshape(b, h, -1, *v.shape[3:])[:, :, :l]  # b h l (r) p

    # 5. Skip D, the gate, and for MIMO the down-projection of the ranks.
    z = None if s.Z is None else s.Z.transpose(0, 2, 1, 3)
    if gate_down is not None and mimo is not None and all(t is not None for t in (s.D, z, mimo.up_z, mimo.down)):
        y = gate_down(y, v, z, s.D, mimo.up_z, mimo.down).transpose(0, 2, 1, 3)
    else:
        if s.D is not None:
            y = y + s.D.reshape(h, 1, *([1] * (v.ndim - 4)), 1) * v
        if mimo is None:
            y = (y if z is None else y * silu(z)).transpose(0, 2, 1, 3)  # b l h p
        else:
            if z is not None:
                y = y * silu(z[:, :, :, None] * mimo.up_z[:, None])
            if mimo.down is not None:
                y = (y * mimo.down[:, None]).sum(axis=3).transpose(0, 2, 1, 3)  # b l h p
            else:
                y = y.transpose(0, 2, 3, 1, 4)  # b l r h p
    k_last = k[:, :, -1] if mimo is None else k[:, :, -1].transpose(0, 2, 1, 3)
    return y.astype(inputs.V.dtype), (theta[:, :, -1], final_ssm, k_last, x[:, :, -1])


def mamba3_siso_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, initial_states=None,
                     chunk_size=64, lean_backward=False):
    """Mamba-3 SISO scan, chunked (any length), float32 inside. Q, K `b l g n` (before bias and rotation; head =
    group * heads_per_group + j), V, Z `b l h p`, ADT (= A*dt), DT, Trap (before sigmoid) `b h l`, Q_bias, K_bias
    `h n`, Angles `b l h a` or `b l 1 a` (before tanh), D `h`, initial_states as the returned states or None.
    Returns (out `b l h p` in V's dtype, (angle `b h a`, ssm `b h p n`, k `b h n`, x `b h p`) float32).
    lean_backward: the hand-written gradients that keep only their inputs (less memory, more time: what a checkpointed
    block is for)."""
    inputs = Mamba3Inputs(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    return mamba3_scan(inputs, None, initial_states, chunk_size, lean_backward)


def mamba3_mimo_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_Z=None, MIMO_O=None, D=None,
                     Z=None, initial_states=None, chunk_size=16, lean_backward=False):
    """Mamba-3 MIMO scan of rank r (a chunk of c tokens is a (c*r) x (c*r) product; upstream recommends c = 64 / r).
    As mamba3_siso_scan, except Q, K `b l r g n`, Q_bias, K_bias `h r n`, MIMO_V, MIMO_Z, MIMO_O `h r p` (MIMO_Z is
    needed when Z is given), the carried k `b r h n`, and out `b l r h p` (before the down-projection) when MIMO_O is
    None."""
    inputs = Mamba3Inputs(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    return mamba3_scan(inputs, MimoWeights(MIMO_V, MIMO_Z, MIMO_O), initial_states, chunk_size, lean_backward)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3 block (upstream Mamba3): in_proj -> [z, x, B, C, dd_dt, dd_A, trap, angles], RMSNorm of B and C over n plus
# learned per-head (and per-rank) biases, dt = softplus(dd_dt + dt_bias), A = min(-f(dd_A), -a_floor) with the
# heavy-tailed f, the scan with skip D, then y * silu(z) (or a grouped RMSNorm per head before the gate when
# is_outproj_norm), out_proj. MIMO projects x and z up per rank and the outputs down. No conv.


def heavy_tail(u):
    """f(u) = 1 + u for u >= 0, 1 / (1 - u) for u < 0: positive, slope 1 at 0 (each branch sees only its own side)."""
    return mx.where(u >= 0, 1.0 + mx.maximum(u, 0.0), 1.0 / (1.0 - mx.minimum(u, 0.0)))


class Mamba3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups = c.headdim, c.d_state, c.ngroups
        self.is_mimo, self.is_outproj_norm, self.a_floor = c.is_mimo, c.is_outproj_norm, c.a_floor
        self.mimo_rank = c.mimo_rank if c.is_mimo else 1
        self.chunk_size = c.chunk_size or max(1, 64 // self.mimo_rank)  # measured default: a 64 x 64 product
        # checkpointed MIMO: gradients that keep only their inputs (memory over time); SISO's autodiff is faster
        self.lean_backward = c.checkpoint_blocks and c.is_mimo
        self.num_rope_angles = int(c.d_state * c.rope_fraction) // 2
        r, h, n = self.mimo_rank, self.nheads, c.d_state
        bc_dim = r * c.ngroups * n
        self.split_sizes = [self.d_inner, self.d_inner, bc_dim, bc_dim, h, h, h, self.num_rope_angles]
        self.in_proj = Linear(c.d_model, sum(self.split_sizes))  # z | x | B | C | dd_dt | dd_A | trap | angles
        self.dt_bias = init_dt_bias(h, c)
        self.B_bias = mx.ones((h, r, n))  # per-head, per-rank biases after the B/C norms (upstream init 1)
        self.C_bias = mx.ones((h, r, n))
        self.B_norm_weight = mx.ones((n,))
        self.C_norm_weight = mx.ones((n,))
        if c.is_mimo:
            self.mimo_x = mx.ones((h, r, c.headdim)) / r
            self.mimo_z = mx.ones((h, r, c.headdim))
            self.mimo_o = mx.ones((h, r, c.headdim)) / r
        self.D = mx.ones((h,))
        if c.is_outproj_norm:
            self.norm_weight = mx.ones((self.d_inner,))
        self.out_proj = Linear(self.d_inner, c.d_model)

    def __call__(self, u, state=None):  # u [b l d_model] -> (y [b l d_model], state after the last token)
        b, l, _ = u.shape
        r, g, h, n, p = self.mimo_rank, self.ngroups, self.nheads, self.d_state, self.headdim
        bounds = [sum(self.split_sizes[: i + 1]) for i in range(len(self.split_sizes) - 1)]
        z, x, B, C, dd_dt, dd_A, trap, angles = mx.split(self.in_proj(u), bounds, axis=-1)
        B = rms_norm(B.reshape(b, l, r, g, n), self.B_norm_weight.astype(B.dtype))
        C = rms_norm(C.reshape(b, l, r, g, n), self.C_norm_weight.astype(C.dtype))
        A = mx.minimum(-heavy_tail(dd_A.astype(mx.float32)), -self.a_floor)
        DT = softplus(dd_dt.astype(mx.float32) + self.dt_bias)
        z = z.reshape(b, l, h, p)
        gate = None if self.is_outproj_norm else z  # else the gate comes after the norm, below
        scan_inputs = dict(Q=C, K=B, V=x.reshape(b, l, h, p), ADT=(A * DT).transpose(0, 2, 1),
                           DT=DT.transpose(0, 2, 1), Trap=trap.astype(mx.float32).transpose(0, 2, 1),
                           Angles=angles.astype(mx.float32)[:, :, None], D=self.D, Z=gate, initial_states=state,
                           chunk_size=self.chunk_size, lean_backward=self.lean_backward)
        if self.is_mimo:
            y, state = mamba3_mimo_scan(**scan_inputs, Q_bias=self.C_bias, K_bias=self.B_bias, MIMO_V=self.mimo_x,
                                        MIMO_Z=self.mimo_z, MIMO_O=None if self.is_outproj_norm else self.mimo_o)
        else:
            scan_inputs.update(Q=C[:, :, 0], K=B[:, :, 0])
            y, state = mamba3_siso_scan(**scan_inputs, Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0])
        if self.is_outproj_norm:  # RMSNorm per head, then the gate (per rank for MIMO, then the ranks down)
            weight = self.norm_weight.reshape(h, p)
            if self.is_mimo:
                z = z[:, :, None] * self.mimo_z.transpose(1, 0, 2)  # b l r h p
            y = rms_norm(y.astype(mx.float32)) * weight * silu(z.astype(mx.float32))
            if self.is_mimo:
                y = (y * self.mimo_o.transpose(1, 0, 2)).sum(axis=2)
        return self.out_proj(y.reshape(b, l, self.d_inner).astype(u.dtype)), state

    def scan_flops_per_token(self):
        """Forward FLOPs per token of the scan's matmuls (for MFU), per head: scores 2*c*r*r*n, the masked product
        with v 2*c*r*r*p, the chunk state 2*r*p*n and reading the carried state 2*r*p*n (c = chunk size)."""
        c, r, n, p = self.chunk_size, self.mimo_rank, self.d_state, self.headdim
        return self.nheads * (2 * c * r * r * (n + p) + 4 * r * p * n)


# =====================================================================================================================
# END SECTION: Mamba
# =====================================================================================================================

# =====================================================================================================================
# Hybrid blocks: the pattern, attention, mixture of experts
# =====================================================================================================================

BLOCK_KINDS = {
    "M": "Mamba block (MAMBA_TYPE), mixes the sequence",
    "*": "causal self-attention, mixes the sequence",
    "E": "mixture-of-experts FFN, per token",
    "-": "dense MLP, per token",
}
SEQUENCE_MIXERS = "M*"


def validate_pattern(pattern):
    """Return the pattern if every character names a block kind and at least one block mixes the sequence (without
    one, no token could see another). Otherwise raise ValueError listing the valid characters."""
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


class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions (the '*' block). Each of the num_kv_heads key/value
    heads serves num_heads / num_kv_heads query heads, which shrinks the decode cache by that factor. Rotary positions
    (mx.fast.rope, non-traditional: dim i pairs with dim i + head_dim / 2) rotate q and k by their absolute position,
    so q . k depends on the distance only; decode continues the positions after the cached tokens."""

    def __init__(self, c):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_kv_heads, c.attn_head_dim
        self.rope_theta = c.rope_theta
        self.qkv_proj = Linear(c.d_model, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)  # q | k | v
        self.out_proj = Linear(self.num_heads * self.head_dim, c.d_model)

    def __call__(self, x, cache=None):
        """x [b l d_model], cache None or (keys, values) [b kv_heads past head_dim] of the tokens before x.
        -> (y [b l d_model], keys and values including x's)."""
        b, l, _ = x.shape
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_dim, q_dim + kv_dim], axis=-1)
        q = q.reshape(b, l, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # [b heads l head_dim]
        k = k.reshape(b, l, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        past = 0 if cache is None else cache[0].shape[2]
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=past)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=past)
        if cache is not None:
            k = mx.concatenate([cache[0].astype(k.dtype), k], axis=2)
            v = mx.concatenate([cache[1].astype(v.dtype), v], axis=2)
        y = causal_attention(q, k, v, self.head_dim**-0.5)  # speed section; a key/value head serves its query group
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, l, q_dim)), (k, v)

    def attention_flops_per_token(self, seq_len):
        """Forward FLOPs per token of the score and value products over a row of seq_len tokens (the kernel computes
        the whole seq_len x seq_len product and masks it): 2 products * 2 * heads * head_dim * seq_len."""
        return 4 * self.num_heads * self.head_dim * seq_len


# ---------------------------------------------------------------------------------------------------------------------
# Mixture of experts (the 'E' block). A router scores the experts for each token (softmax over NUM_EXPERTS), the token
# goes to its TOP_K best, and their outputs are mixed with the router probabilities renormalised over those k. Only the
# chosen experts run: the (token, expert) pairs are sorted by expert and mx.gather_mm multiplies each group of rows by
# its expert's matrix (expert_groups, at the end of the file), so the cost follows tokens * TOP_K whatever NUM_EXPERTS
# is. A Switch-Transformer load-balancing loss, E * sum_i f_i P_i (f_i: share of routed slots sent to expert i, P_i:
# mean router probability of expert i), pushes the router towards an even load; it is 1.0 when routing is uniform.


def route(router_logits, top_k):
    """router_logits [N, E] -> (chosen [N, k] int32 expert ids, weights [N, k] summing to 1 over the chosen,
    balance_loss scalar, counts [E] int32: routed slots per expert).

    The choice is discrete: no gradient flows into it (stop_gradient on both the scores it sorts and the indices; a
    gradient through top-k indices crashes MLX's backward). The router learns through the weights and through P_i."""
    num_tokens, num_experts = router_logits.shape
    probs = mx.softmax(router_logits.astype(mx.float32), axis=-1)
    chosen = mx.stop_gradient(mx.argpartition(mx.stop_gradient(-probs), kth=top_k - 1, axis=-1)[:, :top_k])
    chosen = chosen.astype(mx.int32)
    chosen_probs = mx.take_along_axis(probs, chosen, axis=-1)
    weights = chosen_probs / chosen_probs.sum(axis=-1, keepdims=True)
    counts = (chosen[..., None] == mx.arange(num_experts, dtype=mx.int32)).sum(axis=(0, 1)).astype(mx.int32)
    slot_share = counts.astype(mx.float32) / (num_tokens * top_k)  # f_i: a count, no gradient
    balance_loss = num_experts * mx.sum(slot_share * probs.mean(axis=0))
    return chosen, weights, balance_loss, counts


class RoutedExperts(nn.Module):
    """num_experts SwiGLU experts (the GatedMLP form: fc2(h * silu(gate)), [h | gate] = fc1(x)) with their weights
    stacked on a leading expert axis and stored [in, out], so mx.gather_mm multiplies each group of rows by its expert's
    matrix with no transpose. Init as nn.Linear's default, per expert: uniform(+-1/sqrt(fan_in))."""

    def __init__(self, num_experts, d_model, hidden):
        super().__init__()
        bound_in, bound_hidden = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(hidden)
        self.fc1 = mx.random.uniform(-bound_in, bound_in, (num_experts, d_model, 2 * hidden))
        self.fc2 = mx.random.uniform(-bound_hidden, bound_hidden, (num_experts, hidden, d_model))

    def __call__(self, tokens, chosen):
        """tokens [N, d_model], chosen [N, k] expert ids -> [N, k, d_model]: token n through each of its k experts."""
        # MLX's CPU gather_mm takes float32 only (bf16 raises "[GatherMM::eval] Currently only supports float32"), so
        # the GPU branch with bf16 rows cannot run on a CPU; the CPU tests run float32, where both branches agree.
        dtype = mx.float32 if ON_CPU else tokens.dtype
        num_experts, d_model, _ = self.fc1.shape
        slot_of_row, row_of_slot, group_experts = expert_groups(chosen.reshape(-1), num_experts)  # speed section
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

    def __call__(self, x):
        """x [b l d_model] -> (y [b l d_model], balance_loss, expert counts [num_experts])."""
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)
        chosen, weights, balance_loss, counts = route(self.router(tokens), self.top_k)
        slot_out = self.experts(tokens, chosen)
        y = (slot_out * weights[..., None].astype(slot_out.dtype)).sum(axis=1)
        if "shared_expert" in self:
            y = y + self.shared_expert(tokens)
        return y.reshape(x.shape), balance_loss, counts

    def expert_params(self):
        """Parameters of one routed expert (what a token skips for each expert it is not sent to)."""
        return self.experts.fc1[0].size + self.experts.fc2[0].size


# ---------------------------------------------------------------------------------------------------------------------
# The language model: a tied token embedding, one pre-norm residual block per pattern character, a final RMSNorm,
# logits against the embedding matrix. The sequence mixers (M, *) carry a state (recurrent state, key/value cache)
# through generation; E and - are per token.


def make_layer(kind, c):
    """The layer of one pattern character."""
    if kind == "M":
        return {"mamba-2": Mamba2, "mamba-3": Mamba3}[c.mamba_type](c)
    if kind == "*":
        return CausalSelfAttention(c)
    if kind == "E":
        return MoE(c)
    return GatedMLP(c.d_model, c.dense_mlp_hidden)


class HybridBlock(nn.Module):
    """One pattern character: x + layer(RMSNorm(x)), the same pre-norm residual form for every kind (block_input)."""

    def __init__(self, kind, config, compute_dtype=mx.float32):
        super().__init__()
        self.kind = kind
        self.compute_dtype = compute_dtype
        self.norm = RMSNorm(config.d_model)
        self.layer = make_layer(kind, config)

    def __call__(self, x, state=None):
        """-> (x, state, moe_stats): a sequence mixer's state after x (None for E and -), and (balance_loss, expert
        counts) for an E block (None for the others)."""
        h = block_input(self.norm, x, self.compute_dtype)
        if self.kind in SEQUENCE_MIXERS:
            y, state = self.layer(h, state)
            return x + y, state, None
        if self.kind == "E":
            y, balance_loss, counts = self.layer(h)
            return x + y, None, (balance_loss, counts)
        return x + self.layer(h), None, None

    def without_state(self, x):  # for checkpointing: the state is not kept (its last-token slices would pin buffers)
        x, _, moe_stats = self(x)
        return x, moe_stats


class HybridLM(nn.Module):
    def __init__(self, config, compute_dtype=mx.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [HybridBlock(kind, config, compute_dtype) for kind in validate_pattern(config.pattern)]
        self.norm_f = RMSNorm(config.d_model)
        # Embedding N(0, 0.02), linears their uniform(+-1/sqrt(fan_in)), and every projection
        # that writes into the residual stream scaled by 1/sqrt(number of blocks), one write each.
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
        """input_ids [b l] int32 -> (logits [b l vocab], balance loss summed over the E blocks, expert counts
        [number of E blocks, num_experts] int32: routed slots per expert). cache: as MambaLM's (generation)."""
        x = self.embed(input_ids)  # float32 residual stream
        balance_loss, counts = mx.array(0.0), []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, cache[i], moe_stats = layer(x, cache[i])
            elif self.config.checkpoint_blocks:  # the backward pass recomputes what the block made from x
                x, moe_stats = checkpoint_block(layer, layer.without_state)(x)  # speed section
            else:
                x, _, moe_stats = layer(x)
            if moe_stats is not None:
                balance_loss = balance_loss + moe_stats[0]
                counts.append(moe_stats[1])
        x = self.norm_f(x).astype(self.compute_dtype)
        logits = x @ self.embed.weight.astype(self.compute_dtype).T  # tied unembedding
        counts = mx.stack(counts) if counts else mx.zeros((0, self.config.num_experts), mx.int32)
        return logits, balance_loss, counts

    def __call__(self, input_ids, cache=None):  # [b l] int32 -> logits [b l vocab]
        return self.forward_with_aux(input_ids, cache)[0]

    def moe_layers(self):
        return [block.layer for block in self.layers if block.kind == "E"]

    def idle_expert_params(self):
        """Parameters a token does not use: the num_experts - top_k experts it is not routed to, in every E block."""
        return sum((moe.num_experts - moe.top_k) * moe.expert_params() for moe in self.moe_layers())

    def num_params(self):
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def num_active_params(self):
        """Parameters one token actually uses: all but the experts its routers did not pick."""
        return self.num_params() - self.idle_expert_params()

    def flops_per_token(self, seq_len):
        """Training FLOPs per token for MFU, counted as train_mamba_3_mlx.py does: 6 * (the weights that multiply a
        token's activations: the embedding once as the unembedding, every linear and conv weight, and only the top_k
        experts it is routed to) + 3 * the forward FLOPs of the Mamba scans and of attention over a seq_len row."""
        weights = [self.embed.weight] + [p for _, p in matrix_parameters(self)]
        weights += [m.weight for _, m in self.named_modules() if isinstance(m, CausalConv1d)]
        matmul_params = sum(w.size for w in weights) - self.idle_expert_params()
        mixing = 0
        for block in self.layers:
            if block.kind == "M":
                mixing += block.layer.scan_flops_per_token()
            elif block.kind == "*":
                mixing += block.layer.attention_flops_per_token(seq_len)
        return 6 * matmul_params + 3 * mixing


def matrix_parameters(model):
    """(name, weight) of every projection matrix: the linear layers' weights and the experts' stacked matrices (Muon
    orthogonalises each expert's own). Muon's (or MATRIX_LR's) group."""
    params = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):
            params.append((f"{path}.weight", m.weight))
        elif isinstance(m, RoutedExperts):
            params += [(f"{path}.fc1", m.fc1), (f"{path}.fc2", m.fc2)]
    return params


# =====================================================================================================================
# SECTION: Loss, optimizer, schedule  [identical in both MLX scripts]
# =====================================================================================================================


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in float32. On CPU the logsumexp goes through the fast exp (V exps per token, the
    largest transcendental cost of a step); elsewhere MLX's fused logsumexp."""
    logits = logits.astype(mx.float32)
    if ON_CPU:
        peak = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
        lse = peak[..., 0] + mx.log(exp(logits - peak).sum(axis=-1))  # speed section
    else:
        lse = mx.logsumexp(logits, axis=-1)
    return (lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer: the projection matrices (matrix_parameters) at MATRIX_LR with decoupled weight decay, by Muon or AdamW
# (OPTIMIZER); the embedding at EMBEDDING_LR with decay and the rest at SCALAR_LR without, by AdamW. Muon (Jordan et
# al., 2024): Nesterov momentum orthogonalised by Newton-Schulz, scaled to AdamW's update size (0.2 sqrt(max(rows,
# cols)), Moonlight, arXiv:2502.16982) so both share rates and decay. Not mlx.optimizers.Muon: that one flattens the
# experts' stacked matrices into one and adds the decay to the gradient.


def orthogonalise(g):
    """About U V^T of g = U S V^T per matrix (last two axes): MUON_NS_STEPS quintic Newton-Schulz iterations (Jordan
    et al.'s coefficients) push every singular value of g / |g| into about [0.7, 1.2]. float32 on the CPU (its BLAS)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.astype(mx.float32 if ON_CPU else mx.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
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
        self.lr, self.weight_decay, self.muon = {}, {}, set()
        for name in params:
            if name == "embed.weight":
                self.lr[name], self.weight_decay[name] = EMBEDDING_LR, WEIGHT_DECAY
            elif name in matrices:
                self.lr[name], self.weight_decay[name] = MATRIX_LR, WEIGHT_DECAY
                if OPTIMIZER == "muon":
                    self.muon.add(name)
            else:
                self.lr[name], self.weight_decay[name] = SCALAR_LR, 0.0
        self.state = {"step": mx.array(0, mx.int32), "m": {k: mx.zeros_like(p) for k, p in params.items()},
                      "v": {k: mx.zeros_like(p) for k, p in params.items() if k not in self.muon}}

    def update(self, model, grads, lr_multiplier):
        """One step. grads: a tree like the model's trainable parameters; lr_multiplier: a float32 scalar array."""
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
    """Linear warmup over WARMUP_RATIO of the budget, constant, then linear warmdown to FINAL_LR_FRAC over the last
    WARMDOWN_RATIO. progress = training seconds so far / TIME_BUDGET."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1.0 - WARMDOWN_RATIO:
        return 1.0
    decay = min((progress - (1.0 - WARMDOWN_RATIO)) / WARMDOWN_RATIO, 1.0)
    return 1.0 - decay * (1.0 - FINAL_LR_FRAC)


# =====================================================================================================================
# END SECTION: Loss, optimizer, schedule
# =====================================================================================================================


def make_training_step(model, optimizer, grad_accum_steps):
    """One optimizer step: a compiled forward+backward per micro-batch, gradients summed on the device without a host
    sync (mx.async_eval lets the host fetch the next batch meanwhile), then a compiled mean + clip + optimizer update.
    The loss is the cross-entropy plus AUX_LOSS_COEFF * the load-balancing loss of every E block.
    Returns step(batches, lr_mult) -> (mean cross-entropy, mean balance loss per E block, routed slots per expert
    [E blocks, NUM_EXPERTS] summed over the micro-batches, epoch of the last batch); the arrays are already
    scheduled."""

    def loss_fn(inputs, targets):
        logits, balance_loss, expert_counts = model.forward_with_aux(inputs)
        ce = cross_entropy(logits, targets)
        return ce + AUX_LOSS_COEFF * balance_loss, (ce, balance_loss, expert_counts)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    num_moe_blocks = max(len(model.moe_layers()), 1)

    # The model's and optimizer's arrays are the compiled functions' implicit inputs and outputs: the graphs read and
    # update them instead of baking them in as constants.
    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def forward_backward(inputs, targets):
        (_, aux), grads = loss_and_grad(inputs, targets)
        return aux, grads

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def optimizer_step(grads, lr_mult):
        grads = nn.average_gradients(grads)  # mean over data-parallel ranks (a no-op in a plain run)
        grads = tree_map(lambda g: g / grad_accum_steps, grads)  # mean over micro-batches
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


def device_name():
    return mx.device_info().get("device_name", str(mx.default_device()))


def expert_load_summary(run_counts):
    """run_counts [E blocks, num_experts]: routed slots per expert over the run -> 'min X max Y' of the experts' shares
    of their block's routed slots (uniform = 1 / num_experts)."""
    if run_counts.shape[0] == 0:
        return "none (no E blocks)"
    counts = run_counts.astype(mx.float32)
    shares = counts / mx.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
    return (f"min {shares.min().item():.3f} max {shares.max().item():.3f} "
            f"(share of routed tokens per expert; uniform {1 / run_counts.shape[1]:.3f})")


def check_hyperparameters(tokens_per_micro_step):
    """One-line errors for settings that cannot train, before any time is spent."""
    try:
        pattern_problem = validate_pattern(HYBRID_PATTERN) and ""
    except ValueError as e:
        pattern_problem = str(e).replace(f"HYBRID_PATTERN {HYBRID_PATTERN!r} ", "").replace("HYBRID_PATTERN ", "")
    g, heads = globals(), EXPAND * D_MODEL // HEADDIM if HEADDIM > 0 else 0
    prepare.check_hyperparameters("train_hybrid_moe_mlx", [
        ("HYBRID_PATTERN", not pattern_problem, f"{HYBRID_PATTERN!r}: {pattern_problem}"),
        prepare.one_of(g, "MAMBA_TYPE", ("mamba-2", "mamba-3")),
        prepare.one_of(g, "COMPUTE_DTYPE", ("auto", "float32", "bfloat16", "float16")),
        prepare.one_of(g, "OPTIMIZER", ("muon", "adamw")),
        *prepare.positive(g, "D_MODEL", "D_STATE", "HEADDIM", "EXPAND", "NGROUPS", "D_CONV", "MIMO_RANK",
                          "NUM_ATTENTION_HEADS", "NUM_KV_HEADS", "ATTN_HEAD_DIM", "NUM_EXPERTS", "TOP_K",
                          "EXPERT_HIDDEN", "DENSE_MLP_HIDDEN", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE",
                          "MUON_NS_STEPS"),
        ("CHUNK_SIZE", CHUNK_SIZE >= 0, f"must be >= 0 (0 = the block's default), got {CHUNK_SIZE!r}"),
        ("SHARED_EXPERT_HIDDEN", SHARED_EXPERT_HIDDEN >= 0, f"must be >= 0 (0 = none), got {SHARED_EXPERT_HIDDEN!r}"),
        ("HEADDIM", HEADDIM > 0 and EXPAND * D_MODEL % HEADDIM == 0,
         f"must divide EXPAND * D_MODEL ({EXPAND * D_MODEL}), got {HEADDIM!r}"),
        ("NGROUPS", NGROUPS > 0 and heads % NGROUPS == 0, f"must divide the {heads} heads, got {NGROUPS!r}"),
        ("ROPE_FRACTION", MAMBA_TYPE != "mamba-3" or int(D_STATE * ROPE_FRACTION) >= 2,
         f"* D_STATE must give at least one rotary pair, got {ROPE_FRACTION!r} * {D_STATE!r}"),
        ("NUM_KV_HEADS", NUM_KV_HEADS > 0 and NUM_ATTENTION_HEADS % NUM_KV_HEADS == 0,
         f"must divide NUM_ATTENTION_HEADS ({NUM_ATTENTION_HEADS}), got {NUM_KV_HEADS!r}"),
        ("TOP_K", 0 < TOP_K <= NUM_EXPERTS, f"must be between 1 and NUM_EXPERTS ({NUM_EXPERTS}), got {TOP_K!r}"),
        ("TOTAL_BATCH_SIZE", tokens_per_micro_step > 0 and TOTAL_BATCH_SIZE % tokens_per_micro_step == 0,
         f"must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN * processes ({tokens_per_micro_step}), "
         f"got {TOTAL_BATCH_SIZE!r}"),
    ])


def main():
    t_start = t_script_start
    dist = prepare.distributed("mlx")  # rank and world size under mlx.launch; rank 0 of 1 in a plain run
    print(prepare.harness_line())  # the preset and the harness constants in force
    seq_len = prepare.MAX_SEQ_LEN
    check_hyperparameters(DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    check_hand_written_gradients()  # a forward edited without its gradient stops the run here (speed section)
    mx.random.seed(SEED)  # the same on every rank: all ranks start from the same weights
    tokenizer = prepare.Tokenizer.from_directory()
    # bf16 where the device runs it well (GPUs); on MLX's CPU backend bf16 matmuls bypass the BLAS (`bench/
    # bench_mamba_mlx.py --only dtype`: the step ~12x slower), so "auto" is float32 there.
    if COMPUTE_DTYPE == "auto":
        compute_dtype = mx.float32 if ON_CPU else mx.bfloat16
    else:
        compute_dtype = getattr(mx, COMPUTE_DTYPE)
    model = HybridLM(HybridConfig(vocab_size=tokenizer.get_vocab_size()), compute_dtype)
    mx.eval(model.parameters())
    num_params = model.num_params()
    num_active_params = model.num_active_params()
    flops_per_token = model.flops_per_token(seq_len)
    mamba_type = MAMBA_TYPE + (f" (MIMO rank {MIMO_RANK})" if MAMBA_TYPE == "mamba-3" and IS_MIMO else "")
    num_moe_blocks = len(model.moe_layers())
    grad_accum_steps = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    print(f"model: hybrid {HYBRID_PATTERN} ({mamba_type}), {num_params / 1e6:.2f}M parameters, "
          f"{num_active_params / 1e6:.2f}M active per token, d_model {D_MODEL}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token, compute {str(compute_dtype).split('.')[-1]}, "
          f"device {device_name()}")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows x {seq_len} tokens "
          f"x {dist.world_size} processes")

    optimizer = Optimizer(model)
    training_step = make_training_step(model, optimizer, grad_accum_steps)
    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train", rank=dist.rank,
                                           world_size=dist.world_size)
    progress_line = prepare.ProgressLine(interval=0)  # in run.log: one line per step (the loss curve)
    # Routed slots per expert over the whole run, summed on the device (read once, for the summary).
    run_expert_counts = mx.zeros((num_moe_blocks, NUM_EXPERTS), mx.int64)
    gc.collect()
    gc.freeze()  # the long-lived objects are made; keep the collector's pauses out of the timed loop
    gc.disable()

    prepare.probe_machine_speed(dist)  # for the summary's machine_speed, outside the budget

    # The clock: training_time counts every optimizer step except the first (it compiles). A step runs only while its
    # predicted middle (from the last step times) falls before TIME_BUDGET, so the run ends at the step end nearest to
    # the budget, whatever the step count. The schedule follows progress = that middle / TIME_BUDGET.
    training_time, step, smooth_loss, t_startup, step_times = 0.0, 0, 0.0, None, []
    while (midpoint := prepare.step_midpoint(training_time, step_times)) < prepare.TIME_BUDGET:
        t0 = time.time()
        lr_mult = lr_multiplier(midpoint / prepare.TIME_BUDGET)
        loss, balance, expert_counts, epoch = training_step(train_loader, lr_mult)
        run_expert_counts = run_expert_counts + expert_counts  # stays on the device until the summary
        mx.async_eval(run_expert_counts)
        train_loss = loss.item()  # the one host sync of the step
        balance = balance.item()  # (computed with the loss: no second wait)
        train_loss, step_time = dist.agree(train_loss, time.time() - t0)  # the same loss and clock on every rank
        prepare.check_loss(train_loss, step)
        if step == 0:
            t_startup = time.time() - t_start  # imports, model, data, compilation of the first step
        else:
            training_time += step_time
            step_times.append(step_time)
            prepare.warn_if_evaluation_is_long(step_times, TOTAL_BATCH_SIZE)
        step += 1

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9**step)
        tokens_per_s = TOTAL_BATCH_SIZE / step_time
        remaining = max(prepare.TIME_BUDGET - training_time, 0.0)
        progress_line.update(
            f"step {step:05d} ({100 * min(training_time / prepare.TIME_BUDGET, 1.0):5.1f}%) | loss {debiased:.4f} | "
            f"balance {balance:.3f} | lrm {lr_mult:.2f} | {1000 * step_time:.0f} ms | {tokens_per_s:,.0f} tok/s | "
            f"epoch {epoch} | training_seconds {training_time:.3f} | tokens {step * TOTAL_BATCH_SIZE} | "
            f"{remaining:.0f}s left"
        )
    progress_line.close()
    gc.enable()

    # Evaluation: the harness scores a compiled forward pass (same weights, no training state).
    t_eval = time.time()
    val_bpb = prepare.evaluate_bpb(mx.compile(model, inputs=model.state), DEVICE_BATCH_SIZE, dist)
    eval_seconds = time.time() - t_eval

    timed_steps = step - 1
    total_tokens = step * TOTAL_BATCH_SIZE
    tokens_per_s = timed_steps * TOTAL_BATCH_SIZE / max(training_time, 1e-9)
    peak, peak_source = prepare.peak_flops(device_name(), "float32" if compute_dtype == mx.float32 else "bfloat16")
    mfu = 100 * flops_per_token * tokens_per_s / (peak * dist.world_size)  # tokens/s of all ranks
    print(f"startup_seconds: {t_startup:.1f} (imports, model, data, first compiled step; not in training_seconds)")
    print(f"eval_seconds: {eval_seconds:.1f}")
    print(f"throughput: {tokens_per_s:,.0f} tok/s; MFU against {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    prepare.print_summary({
        "architecture": "hybrid",
        "preset": prepare.PRESET_NAME,
        "val_bpb": val_bpb,
        "training_seconds": training_time,
        "total_seconds": time.time() - t_start,
        "peak_memory_mb": mx.get_peak_memory() / 1024**2,
        "mfu_percent": mfu,
        "total_tokens_M": total_tokens / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": len(HYBRID_PATTERN),
        "hybrid_pattern": HYBRID_PATTERN,
        "mamba_type": mamba_type,
        "num_active_params_M": num_active_params / 1e6,
        "expert_load": expert_load_summary(mx.distributed.all_sum(run_expert_counts)),  # all ranks' tokens
    }, trained_tokens=total_tokens, dist=dist)


# =====================================================================================================================
# SECTION: Speed machinery (CPU fast paths, hand-written gradients)  [identical in both MLX scripts]
# =====================================================================================================================
# Each function computes what its docstring says, shaped for speed. On MLX's CPU backend a transcendental costs
# ~20-40 ns per element, so exp and cos/sin are rebuilt from arithmetic that mx.compile fuses (a GPU runs the native
# ops). Gradients are written by hand where autodiff was 2x-20x slower, each checked against autodiff of its forward
# at start. (`f.vjp(g)` is called: the decorator form would make g a second, unchecked custom function.)

def shared_matmul(per_head, shared):
    """per_head `... h C m k` @ shared `... 1 C k n`: the heads share the right operand (SSD's B and C within a
    group), so their rows are stacked into one (h m) x k matmul per chunk (a few large products run faster than many
    small ones, measured)."""
    *lead, h, C, m, k = per_head.shape
    out = per_head.swapaxes(-4, -3).reshape(*lead, C, h * m, k) @ shared.squeeze(-4)  # ... C (h m) n
    return out.reshape(*lead, C, h, m, -1).swapaxes(-4, -3)


# Decoding, which training never calls: a carried state per layer, as upstream decodes.
def generate(model, tokenizer, prompt, max_new_tokens=64, temperature=1.0):
    """Sample a continuation of `prompt` (temperature 0 = greedy): the prompt in one chunked pass, then one token at a
    time with each layer's carried state."""
    cache = [None] * len(model.layers)
    ids = mx.array([tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())], mx.int32)
    logits = model(ids, cache)[:, -1]
    new_tokens = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = mx.argmax(logits, axis=-1)
        else:
            token = mx.random.categorical(logits.astype(mx.float32) / temperature, axis=-1)
        new_tokens.append(token.item())
        logits = model(token.astype(mx.int32)[:, None], cache)[:, -1]
    return tokenizer.decode(new_tokens)


HAND_WRITTEN_GRADIENTS = []  # (name, forward, function with the custom gradient, example inputs)


def hand_written_gradient(*example_shapes, domain=None):
    """Decorator: wrap the forward in an mx.custom_function and register both for check_hand_written_gradients, with the
    shapes of small example inputs (float32 normal draws; `domain` maps the first one into the function's domain)."""

    def register(forward):
        custom = mx.custom_function(forward)
        HAND_WRITTEN_GRADIENTS.append((forward.__name__, forward, custom, example_shapes, domain or (lambda x: x)))
        return custom

    return register


def check_hand_written_gradients(tolerance=1e-3):
    """Compare every hand-written gradient with MLX's autodiff of the same forward on small random inputs
    (milliseconds). A mismatch, or a custom gradient that was not registered, stops the run with a one-line error
    that names the function."""
    registered = [custom for _, _, custom, _, _ in HAND_WRITTEN_GRADIENTS]
    unregistered = [name for name, value in globals().items()
                    if isinstance(value, type(registered[0])) and not any(value is c for c in registered)]
    if unregistered:
        raise prepare.HarnessError(
            f"Gradient check failed: {unregistered[0]} has a custom gradient that is not checked. Define it with "
            f"@hand_written_gradient(example input shapes) instead of mx.custom_function."
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
                    f"of its forward by {error:.1e} (relative). Update its .vjp to match the forward, or drop the "
                    f"custom gradient (remove @hand_written_gradient and the .vjp)."
                )


def exp(x):
    return exp_from_polynomial(x) if ON_CPU else mx.exp(x)


def sigmoid(x):
    return 1.0 / (1.0 + exp(-x)) if ON_CPU else mx.sigmoid(x)


def cos_sin(theta):
    return cos_sin_from_polynomial(theta) if ON_CPU else (mx.cos(theta), mx.sin(theta))


EXP2_COEFFS = (1.0, 0.6931470036506653, 0.2402222454547882, 0.055507123470306396, 0.009670180268585682,
               0.0013260914711281657)  # 2^f on [-1/2, 1/2]: least-squares fit of the relative error, max 1.7e-7


@hand_written_gradient((4, 8), domain=lambda x: 3 * x)  # a wide range of exponents
def exp_from_polynomial(x):
    """exp(x) = 2^k * 2^f with k = round(x / ln 2), f in [-1/2, 1/2]: a polynomial for 2^f, the float32 bit pattern
    for 2^k (2-4x faster than mx.exp on CPU, relative error < 4e-7). Saturates at 2^127, exactly 0 below ~-87.7."""
    t = mx.clip(x.astype(mx.float32) * 1.4426950408889634, -127.0, 127.0)  # x / ln 2
    k = mx.floor(t + 0.5)  # round to nearest (floor fuses into the compiled kernel, mx.round does not)
    f = t - k
    c0, c1, c2, c3, c4, c5 = EXP2_COEFFS
    two_f = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
    two_k = mx.stop_gradient(((k.astype(mx.int32) + 127) << 23).view(mx.float32))  # exponent field k + 127 (k = -127
    # gives 0.0); piecewise constant, and stop_gradient lets autodiff (the gradient check) pass the bit cast
    return (two_f * two_k).astype(x.dtype)


def _exp_from_polynomial_vjp(primals, cotangent, output):
    return cotangent * output  # d exp(x) = exp(x) dx: reuse the forward output


exp_from_polynomial.vjp(_exp_from_polynomial_vjp)


@hand_written_gradient((6,), domain=lambda x: math.pi * (1 + 0.9 * mx.tanh(x)))  # in [0, 2 pi]
def cos_sin_from_polynomial(theta):
    """(cos, sin) of angles in [0, 2 pi] from arithmetic (MLX's CPU sin and cos cost ~35 ns per element): with
    theta = 2y + pi, y in [-pi/2, pi/2], Taylor polynomials for sin y and cos y (error < 1e-7) and the double-angle
    formulas cos theta = s^2 - c^2, sin theta = -2 s c."""
    y = 0.5 * theta - 0.5 * math.pi
    y2 = y * y
    s = y * (1 + y2 * (-1 / 6 + y2 * (1 / 120 + y2 * (-1 / 5040 + y2 * (1 / 362880 + y2 * (-1 / 39916800))))))
    c = 1 + y2 * (-1 / 2 + y2 * (1 / 24 + y2 * (-1 / 720 + y2 * (1 / 40320 + y2 * (-1 / 3628800 + y2 / 479001600)))))
    return s * s - c * c, -2.0 * s * c


def _cos_sin_vjp(theta, cotangents, outputs):
    (d_cos, d_sin), (cos, sin) = cotangents, outputs
    return d_sin * cos - d_cos * sin


cos_sin_from_polynomial.vjp(_cos_sin_vjp)


@hand_written_gradient((2, 3, 8), domain=lambda x: -mx.abs(x))  # log decays <= 0
def decay_matrix(log_alpha):
    """L[..., t, s] = exp(log_alpha_{s+1} + ... + log_alpha_t) for s <= t (1 on the diagonal), 0 above: `... c` ->
    `... c c`. A cumulative product of the alphas down each column: exact and stable (factors in (0, 1] never
    overflow), c exps per chunk instead of c per token for exp of segment sums."""
    c = log_alpha.shape[-1]
    idx = mx.arange(c)
    factors = mx.where(idx[:, None] > idx[None, :], exp(log_alpha)[..., :, None], 1.0)
    return mx.where(idx[:, None] >= idx[None, :], mx.cumprod(factors, axis=-2), 0.0)


def _decay_matrix_vjp(log_alpha, cotangent, decay):
    """d L[t, s] / d a_u = L[t, s] for s < u <= t: a reverse cumulative sum down the columns, then a row sum left of the
    diagonal (four cheap passes; autodiff of cumprod divides)."""
    c = decay.shape[-1]
    idx = mx.arange(c)
    below_rows = mx.cumsum(cotangent * decay, axis=-2, reverse=True)  # [u, s] = sum_{t>=u} cotangent[t, s] L[t, s]
    return mx.where(idx[:, None] > idx[None, :], below_rows, 0.0).sum(axis=-1)


decay_matrix.vjp(_decay_matrix_vjp)


def _linear_recurrence(decays, added, start):
    """S_0 = start, S_{j+1} = decays[j] * S_j + added[j] over lists of arrays -> ([S_0 .. S_{n-1}], S_n)."""
    entering = []
    for decay_c, added_c in zip(decays, added):
        entering.append(start)
        start = decay_c * start + added_c
    return entering, start


@hand_written_gradient((2, 3, 1, 1), (2, 3, 4, 5), (2, 4, 5))
def carry_states(decays, added, start):
    """S_0 = start, S_{j+1} = decays[j] S_j + added[j] along the chunk axis: decays `... C 1 1`, added `... C p n`,
    start `... p n` -> (S_0 .. S_{C-1} `... C p n`, S_C `... p n`). The gradient is the same recurrence run backwards,
    R_j = G_j + decays[j] R_{j+1} from R_C = G_final (autodiff of the loop: ~20x slower on CPU, measured; a (C+1)^2
    matmul instead of the loop: up to 1.8x slower, measured)."""
    c = added.shape[-3]
    entering, final = _linear_recurrence(mx.split(decays, c, axis=-3), mx.split(added, c, axis=-3),
                                         start[..., None, :, :])
    return mx.concatenate(entering, axis=-3), final[..., 0, :, :]


def _carry_states_vjp(primals, cotangents, outputs):
    decays, added, start = primals
    grad_entering, grad_final = cotangents
    entering, _ = outputs
    c = added.shape[-3]
    after, grad_start = _linear_recurrence(mx.split(decays, c, axis=-3)[::-1],
                                           mx.split(grad_entering, c, axis=-3)[::-1], grad_final[..., None, :, :])
    grad_added = mx.concatenate(after[::-1], axis=-3)  # d S_{j+1} / d added[j] = 1
    grad_decays = (grad_added * entering).sum(axis=(-2, -1), keepdims=True)  # d S_{j+1} / d decays[j] = S_j
    return grad_decays, grad_added, grad_start[..., 0, :, :]


carry_states.vjp(_carry_states_vjp)


GATED_SCAN_EXAMPLE = 3 * ((2, 3, 4),) + ((2, 3, 8, 5), (2, 3, 8, 5), (2, 3, 8, 6), (2, 6, 5))  # heads 2, chunks 3,
# 4 tokens x rank 2 per chunk


@hand_written_gradient(*GATED_SCAN_EXAMPLE, domain=lambda x: -mx.abs(x))  # log decays <= 0
def gated_chunked_scan(log_alpha, weight, diag_weight, q, k, v, start_state):
    """chunked_scan with both weights given (Mamba-3), full shapes (no broadcast head axes); log_alpha first, so the
    check's domain applies to it. The gradient keeps only the inputs: the decays, the (c r) x (c r) scores and the
    chunk states are rebuilt in the backward (autodiff kept them from the forward: most of a MIMO block's backward
    memory). More time in the backward (the rebuilt products), so only checkpointed MIMO blocks take it
    (Mamba3.lean_backward)."""
    return chunked_scan(q, k, v, log_alpha, weight, diag_weight, start_state)


BACKWARD_HEAD_GROUPS = 24


def in_head_groups(backward, arrays, axes, out_axes):
    """backward(*arrays) computed for groups of heads one after another (each group's inputs depend on the previous
    group's gradients, mx.depends), then concatenated: MLX evaluates depth first and frees an array after its last
    consumer, so only one group's temporaries are alive at a time (default MIMO model, 2 x 2048, scan and gate: peak
    6.3 GB with all 24 heads at once, 5.0 GB in 8 groups, 4.8 GB in 24, measured). axes: each array's head axis;
    out_axes: each gradient's."""
    heads = arrays[0].shape[axes[0]] if arrays[0].ndim >= abs(axes[0]) else 1
    groups = max(g for g in range(1, min(BACKWARD_HEAD_GROUPS, heads) + 1) if heads % g == 0)
    if groups == 1:
        return backward(*arrays)
    split = [mx.split(x, groups, axis=a) for x, a in zip(arrays, axes)]
    grads = []
    for i in range(groups):
        args = [parts[i] for parts in split]
        if grads:
            args = mx.depends(args, list(grads[-1]))
        grads.append(backward(*args))
    return tuple(mx.concatenate([g[j] for g in grads], axis=a) for j, a in enumerate(out_axes))


def _gated_chunked_scan_vjp(primals, cotangents, outputs):
    axes = [-3, -3, -3, -4, -4, -4, -3]  # the head axis of log_alpha, weight, diag_weight, q, k, v, start_state
    return in_head_groups(_chunked_scan_backward, [*primals, *cotangents], axes + [-4, -3], axes)


def _chunked_scan_backward(log_alpha, weight, diag_weight, q, k, v, start_state, dy, d_final):
    """Step by step backwards through chunked_scan, with E the entering states, f from_start, e to_end:
    read = (q E^T) f gives dq = (dy E) f, dE = (dy f)^T q, df = q . (dy E); the chunk states (v e)^T k give
    dk = (v e) dS, dv = (k dS^T) e; y = (q k^T * mix) v gives dv = (q k^T * mix)^T dy, d(q k^T) = (dy v^T) * mix
    and dmix = (dy v^T) * q k^T summed over the rank pairs. The decays get theirs through decay_matrix's gradient
    and a reverse cumulative sum for f (the chunk's total decay is f at its end)."""
    c = log_alpha.shape[-1]
    rank = q.shape[-2] // c
    lead = q.shape[:-2]

    def per_row(x):  # ... C c -> ... C (c r) 1: a token's factor on each of its rank rows
        return (mx.repeat(x, rank, axis=-1) if rank > 1 else x)[..., None]

    def rank_sum(x):  # ... C (c r) -> ... C c
        return x.reshape(*lead, c, rank).sum(axis=-1) if rank > 1 else x

    decay, mix, to_end, from_start = chunk_gates(log_alpha, weight, diag_weight)
    # The chunk states and the states entering each chunk, again (forward steps 2 and 3).
    v_end = v * per_row(to_end)
    chunk_states = v_end.swapaxes(-1, -2) @ k  # ... C p n
    chunk_decay = from_start[..., -1, None, None]
    entering, final = carry_states(chunk_decay, chunk_states, start_state)
    # 4. Reading the entering states.
    dy_entering = dy @ entering  # ... C (c r) n
    dq_read = dy_entering * per_row(from_start)
    d_from_start = rank_sum((dy_entering * q).sum(axis=-1))
    d_entering = (dy * per_row(from_start)).swapaxes(-1, -2) @ q  # ... C p n
    # 3. The carry, run backwards.
    d_chunk_decay, d_chunk_states, d_start = _carry_states_vjp((chunk_decay, chunk_states, start_state),
                                                               (d_entering, d_final), (entering, final))
    # 2. The chunk states.
    dk_state = v_end @ d_chunk_states
    dv_end = k @ d_chunk_states.swapaxes(-1, -2)  # ... C (c r) p
    dv_state = dv_end * per_row(to_end)
    d_to_end = rank_sum((dv_end * v).sum(axis=-1))
    # 1. Inside the chunks.
    scores = q @ k.swapaxes(-1, -2)  # ... C (c r) (c r)
    dv = dv_state + rank_mix(scores, mix).swapaxes(-1, -2) @ dy
    d_mixed = dy @ v.swapaxes(-1, -2)
    d_mix = d_mixed * scores
    if rank > 1:
        d_mix = d_mix.reshape(*lead, c, rank, c, rank).sum(axis=(-3, -1))  # ... C c c
    d_scores = rank_mix(d_mixed, mix)
    dq = dq_read + d_scores @ k
    dk = dk_state + d_scores.swapaxes(-1, -2) @ q
    # The gates: mix = L w below the diagonal, gamma on it; to_end = L[end] w; the chunk decay = f at the end.
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


gated_chunked_scan.vjp(_gated_chunked_scan_vjp)


@hand_written_gradient((2, 3, 5, 2, 4), (2, 3, 5, 4), (2, 3, 5, 4))
def lean_rotate(x, cos, sin):
    """rotate, with a gradient that keeps only the output (the scan keeps it anyway): x is rebuilt from it (autodiff
    kept x and its pair-swapped copy, for q and for k)."""
    return rotate(x, cos, sin)


def _lean_rotate_vjp(primals, d_out, out):
    _, cos, sin = primals
    return in_head_groups(_lean_rotate_backward, [out, cos, sin, d_out], [1, 1, 1, 1], [1, 1, 1])


def _lean_rotate_backward(out, cos, sin, d_out):
    """Per pair out = M x, M = [[c0, s0], [s1, c1]] (a rotation: c0 = c1, s0 = -s1): dx = M^T d_out, and x = M^-1 out
    = (swap(cos) out - sin swap(out)) / (c0 c1 - s0 s1), the denominator 1 for true angles, any value in the check."""
    mimo = out.ndim > cos.ndim  # the ranks share the token's angle, and pair the halves (rotate)
    swap = swap_halves if mimo else swap_pairs
    if mimo:
        cos, sin = cos[..., None, :], sin[..., None, :]
    x = (swap(cos) * out - sin * swap(out)) / (cos * swap(cos) - sin * swap(sin))
    d_x = d_out * cos + swap(d_out * sin)
    d_cos, d_sin = d_out * x, d_out * swap(x)
    if mimo:
        d_cos, d_sin = d_cos.sum(axis=-2), d_sin.sum(axis=-2)
    return d_x, d_cos, d_sin


lean_rotate.vjp(_lean_rotate_vjp)


@hand_written_gradient((2, 3, 5, 2, 4), (2, 3, 5, 2, 4), (2, 3, 5, 4), (3,), (3, 2, 4), (3, 2, 4))
def mimo_gate_down(y, v, z, D, mimo_z, mimo_o):
    """MIMO's last step: sum_i (y_i + D v_i) * silu(z * mimo_z[i]) * mimo_o[i] over the ranks i; y, v `b h l r p`,
    z `b h l p`, D `h`, mimo_z, mimo_o `h r p` -> `b h l p`. Its gradient keeps only the inputs (autodiff kept
    y + D v, the gate's input, its sigmoid, the gate and the gated y: five arrays of the size of y)."""
    u = y + D[:, None, None, None] * v
    gate_in = z[:, :, :, None] * mimo_z[:, None]
    return (u * (gate_in * sigmoid(gate_in)) * mimo_o[:, None]).sum(axis=3)


def _mimo_gate_down_vjp(primals, d_out, out):
    return in_head_groups(_mimo_gate_down_backward, [*primals, d_out], [1, 1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0])


def _mimo_gate_down_backward(y, v, z, D, mimo_z, mimo_o, d_out):
    """With u = y + D v, g = z mimo_z, s = sigmoid(g): d(silu g) = s (1 + g (1 - s)) dg, the rest products."""
    u = y + D[:, None, None, None] * v
    gate_in = z[:, :, :, None] * mimo_z[:, None]
    s = sigmoid(gate_in)
    gate = gate_in * s
    d_gated = d_out[:, :, :, None] * mimo_o[:, None]  # b h l r p
    d_mimo_o = (d_out[:, :, :, None] * u * gate).sum(axis=(0, 2))
    du = d_gated * gate
    d_gate_in = d_gated * u * s * (1 + gate_in * (1 - s))
    d_z = (d_gate_in * mimo_z[:, None]).sum(axis=3)
    d_mimo_z = (d_gate_in * z[:, :, :, None]).sum(axis=(0, 2))
    d_D = (du * v).sum(axis=(0, 2, 3, 4))
    return du, du * D[:, None, None, None], d_z, d_D, d_mimo_z, d_mimo_o


mimo_gate_down.vjp(_mimo_gate_down_vjp)


@hand_written_gradient((2, 9, 3), (4, 3), (3,))
def causal_conv1d(window, weight, bias):
    """Depthwise conv over time without padding: window [b K-1+l c], weight [K c], bias [c] -> out [b l c],
    out_t = bias + sum_k weight[k] window_{t+k}. K shifted multiply-adds that mx.compile fuses (on CPU ~2.5x cheaper
    than a grouped convolution; autodiff scatters each slice into a zero array, measured 2x slower)."""
    K = weight.shape[0]
    l = window.shape[1] - (K - 1)
    out = bias + weight[0] * window[:, :l]
    for k in range(1, K):
        out = out + weight[k] * window[:, k : k + l]
    return out


def _causal_conv1d_vjp(primals, d_out, out):
    """The transposed conv: window_s feeds out_{s-k} through weight[k], so d window_s = sum_k weight[k] d out_{s-k}."""
    window, weight, bias = primals
    K, l = weight.shape[0], d_out.shape[1]
    padded = mx.pad(d_out, [(0, 0), (K - 1, K - 1), (0, 0)])  # padded[i] = d_out[i - (K-1)]
    d_window = weight[0] * padded[:, K - 1 :]
    for k in range(1, K):
        d_window = d_window + weight[k] * padded[:, K - 1 - k : K - 1 - k + l + K - 1]
    d_weight = mx.stack([(d_out * window[:, k : k + l]).sum(axis=(0, 1)) for k in range(K)])
    return d_window, d_weight, d_out.sum(axis=(0, 1))


causal_conv1d.vjp(_causal_conv1d_vjp)


def checkpoint_block(module, fn):
    """nn.utils.checkpoint(module, fn) (keep the block's input, recompute the rest in the backward pass), ordered for
    memory. Nothing in the graph makes MLX compute a block's weight gradients before the blocks below run their
    backward, and with nn.utils.checkpoint it did so after all of them, keeping every block's activation-sized inputs
    to those gradients alive (default MIMO model: +240 MB per block per 2048-token row, measured). Here the
    recomputation waits for the output's cotangent, and the input's cotangent for the weight gradients: one block's
    activations live at a time. Same gradients. fn(x) may return a tree of arrays and None (the hybrid's MoE stats)."""
    layout = {}

    def forward(weights, x):  # -> the leaves of fn(x) that are arrays
        module.update(weights)
        leaves = tree_flatten(fn(x))
        layout["keys"] = [(key, leaf is None) for key, leaf in leaves]
        return [leaf for _, leaf in leaves if leaf is not None]

    recomputed = mx.custom_function(forward)

    def backward(primals, cotangents, outputs):
        weights, x = primals
        names, arrays = zip(*tree_flatten(weights))
        wanted = [i for i, o in enumerate(outputs) if mx.issubdtype(o.dtype, mx.floating)]  # not the integer counts
        arrays = mx.depends([*arrays, x], [cotangents[i] for i in wanted])  # recompute when the backward gets here

        def differentiable(*arrays):
            outs = forward(tree_unflatten(list(zip(names, arrays[:-1]))), arrays[-1])
            return [outs[i] for i in wanted]

        _, grads = mx.vjp(differentiable, arrays, [cotangents[i] for i in wanted])
        module.update(weights)  # the module's own weights again, not the recomputation's
        dx = mx.depends([grads[-1]], grads[:-1])[0]  # the weight gradients are done before the block below starts
        return tree_unflatten(list(zip(names, grads[:-1]))), dx

    recomputed.vjp(backward)

    def call(x):
        leaves = iter(recomputed(module.trainable_parameters(), x))
        return tree_unflatten([(key, None if is_none else next(leaves)) for key, is_none in layout["keys"]])

    return call


# =====================================================================================================================
# END SECTION: Speed machinery
# =====================================================================================================================

# ---------------------------------------------------------------------------------------------------------------------
# CPU layouts of the hybrid's attention and routed experts (this script only; the agent's reading stops above).
#
# Attention: MLX's CPU scaled_dot_product_attention builds the whole l x l score matrix and its softmax (exp at ~17 ns
# per element on that backend), the masked half included. On the CPU, causal_attention takes the queries in blocks of
# ATTENTION_QUERY_BLOCK_CPU, each against the keys up to its last query only, with the polynomial exp. A GPU keeps the
# fused kernel. `uv run bench/bench_hybrid_mlx.py --only layouts` (4 x 512 tokens, d_model 192, Linux CPU + MKL): the
# attention layer's forward 129 -> 63 ms, the MoE layer's 91 -> 40 ms.
#
# Experts: mx.gather_mm multiplies a stack of matrices, each by the expert its index names. Rows of one (token, slot)
# pair each are what a GPU kernel wants; MLX's CPU backend runs one small product per matrix, and 4,096 one-row
# products (d_model 192, 512 outputs) took 45 ms where 64-row groups of the same rows took 13 ms. So on the CPU an
# expert's rows go in groups of EXPERT_GROUP_ROWS_CPU, its last group filled up with copies of a real row whose outputs
# are never read back (their gradients are zero).
ATTENTION_QUERY_BLOCK_CPU = 64


def causal_attention(q, k, v, scale):
    """q [b heads l d], k and v [b kv_heads past + l d] (the l queries are the last l positions; kv_heads divides
    heads) -> softmax(q k^T * scale, causal) v, [b heads l d]."""
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


EXPERT_GROUP_ROWS_CPU = 64


def expert_groups(slot_experts, num_experts, group_rows=None):
    """slot_experts [R], the expert of each routed (token, slot) pair -> (slot_of_row [G * group_rows], the pair each
    row holds; row_of_slot [R], the row holding each pair; group_experts [G], each group's expert, ascending). The
    rows are the pairs sorted by expert, each expert's padded to whole groups; G is the most groups any routing can
    need, so a compiled step keeps its shapes (groups past the last hold filler only)."""
    group_rows = group_rows or (EXPERT_GROUP_ROWS_CPU if ON_CPU else 1)
    order = mx.argsort(slot_experts)  # sorted pair i is pair order[i]
    if group_rows == 1:  # a GPU's layout: one row per pair, no filler
        return order, mx.argsort(order), slot_experts[order]
    counts = (slot_experts[:, None] == mx.arange(num_experts, dtype=slot_experts.dtype)).sum(axis=0)
    padded = (counts + group_rows - 1) // group_rows * group_rows
    first_row = mx.cumsum(padded) - padded  # each expert's first row
    filler_before = first_row - (mx.cumsum(counts) - counts)  # filler rows ahead of each expert's first row
    row_of_slot = (mx.arange(slot_experts.size) + filler_before[slot_experts[order]])[mx.argsort(order)]
    num_groups = (slot_experts.size + num_experts * (group_rows - 1)) // group_rows
    group_start = mx.arange(num_groups) * group_rows
    group_experts = (mx.cumsum(padded)[None] <= group_start[:, None]).sum(axis=1)  # experts that end before it
    group_experts = mx.minimum(group_experts, num_experts - 1).astype(slot_experts.dtype)
    row, row_expert = mx.arange(num_groups * group_rows), mx.repeat(group_experts, group_rows)
    real = row < (first_row + counts)[row_expert]
    return order[mx.where(real, row - filler_before[row_expert], 0)], row_of_slot, group_experts


if __name__ == "__main__":
    prepare.run(main)
