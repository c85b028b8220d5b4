"""
Train a Mamba-2 or Mamba-3 (SISO / MIMO) language model with MLX for a fixed time budget, then report val_bpb.

This is the file the agent edits. Run: `uv run train_mamba_3_mlx.py`
(architecture from AUTORESEARCH_MLX_ARCHITECTURE or the preset; see README.md and program.md).
"""

import gc
import math
import os
import time
from dataclasses import dataclass
from functools import partial

t_script_start = time.time()  # total_seconds counts from here (imports included)

import prepare  # first: loads the fast BLAS before MLX is imported
from prepare import apply_preset

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters (canonical full-size defaults; the active preset may override them just below)

# Model
ARCHITECTURE = "mamba-3"  # "mamba-3" or "mamba-2"; env AUTORESEARCH_MLX_ARCHITECTURE wins over this and the preset
DEPTH = 8  # number of mixer blocks
D_MODEL = 768  # width of the residual stream
D_STATE = 64  # SSM state size n per head (the "key/query" side)
HEADDIM = 64  # value-side width p per head; heads = EXPAND * D_MODEL / HEADDIM
EXPAND = 2  # inner width d_inner = EXPAND * D_MODEL
NGROUPS = 1  # B/C groups; heads share B and C within a group
D_CONV = 4  # Mamba-2 only: kernel width of the depthwise causal conv over x, B, C
CHUNK_SIZE = 0  # tokens per chunk of the chunked scans; 0 = each block's measured default (Mamba-2 32, Mamba-3
# 64 // MIMO rank). Larger chunks cost more per token inside the chunk, smaller ones more state passing.
DT_MIN = 0.001  # dt_bias is initialised so that softplus(dt_bias) is log-uniform in [DT_MIN, DT_MAX]
DT_MAX = 0.1
DT_INIT_FLOOR = 1e-4  # ... and at least this
A_FLOOR = 1e-4  # Mamba-3: the decay rate A is at most -A_FLOOR (never a perfect integrator)
ROPE_FRACTION = 0.5  # Mamba-3: fraction of the state dims rotated by the data-dependent angles
IS_MIMO = False  # Mamba-3: multi-input multi-output state update (rank MIMO_RANK) instead of SISO
MIMO_RANK = 4
IS_OUTPROJ_NORM = False  # Mamba-3: grouped RMSNorm before the output gate
MLP_EXPAND = 0  # hidden width factor of a gated (SwiGLU) MLP after each mixer; 0 = mixers only, as in Mamba

# Optimization (AdamW; learning rates are peak values, scaled by the schedule)
DEVICE_BATCH_SIZE = 8  # rows per forward/backward pass
TOTAL_BATCH_SIZE = 8 * 2048  # tokens per optimizer step; a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN (grad accum)
MATRIX_LR = 0.002  # projections (in_proj, out_proj, conv, MLP)
EMBEDDING_LR = 0.004  # the tied embedding / unembedding matrix
SCALAR_LR = 0.004  # A_log, dt_bias, D, norm weights, biases (no weight decay)
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1  # decoupled, matrices and embedding only
GRAD_CLIP = 1.0  # clip the global gradient norm to this; 0 turns clipping off
WARMUP_RATIO = 0.0  # fraction of the time budget spent ramping the learning rate up from 0 (0 = start at the peak)
WARMDOWN_RATIO = 0.5  # fraction of the time budget at the end spent decaying it linearly ...
FINAL_LR_FRAC = 0.05  # ... down to this fraction of the peak
COMPUTE_DTYPE = "auto"  # activations/matmuls: "float32", "bfloat16" or "auto" (bf16 on GPU, fp32 on CPU, measured)
SEED = 42

apply_preset(globals(), "train_mamba_3_mlx")
# Experiment overrides: assignments placed here win over the preset.

# The environment picks the architecture last, over the constant and the preset (tests and prepare use it).
ARCHITECTURE = os.environ.get("AUTORESEARCH_MLX_ARCHITECTURE", "").strip() or ARCHITECTURE

# =====================================================================================================================
# SECTION: Mamba-2 (SSD scan, Mamba-2 block)
# =====================================================================================================================

# ---------------------------------------------------------------------------------------------------------------------
# Element-wise helpers. On MLX's CPU backend a transcendental (exp, sigmoid, tanh) costs ~20 ns per element: it is not
# vectorised, so it is as slow as ~20-40 adds, and exp/sigmoid/softmax would rival the matmuls. `exp` below rebuilds
# exp from cheap ops that mx.compile fuses into vectorised loops (2-4x faster than mx.exp, measured; relative error
# < 4e-7 in float32), with its gradient written out. On a GPU the native ops are used. The blocks call these helpers.

ON_CPU = mx.default_device() == mx.cpu
LOG2_E = 1.4426950408889634
EXP2_COEFFS = (1.0, 0.6931470036506653, 0.2402222454547882, 0.055507123470306396, 0.009670180268585682,
               0.0013260914711281657)  # 2^f on [-1/2, 1/2]: least-squares fit of the relative error, max 1.7e-7


@mx.custom_function
def _exp_from_polynomial(x):
    """exp(x) = 2^k * 2^f with k = round(x / ln 2), f in [-1/2, 1/2]: a polynomial for 2^f, the float32 bit pattern
    for 2^k. Saturates at 2^127 for large x and is exactly 0 below about -87.7 (never inf, never denormal)."""
    t = mx.clip(x.astype(mx.float32) * LOG2_E, -127.0, 127.0)
    k = mx.floor(t + 0.5)  # round to nearest (floor fuses into the compiled kernel, mx.round does not)
    f = t - k
    c0, c1, c2, c3, c4, c5 = EXP2_COEFFS
    two_f = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
    two_k = ((k.astype(mx.int32) + 127) << 23).view(mx.float32)  # exponent field k + 127; k = -127 gives 0.0
    return (two_f * two_k).astype(x.dtype)


@_exp_from_polynomial.vjp
def _exp_from_polynomial_vjp(primals, cotangent, output):
    return cotangent * output  # d exp(x) = exp(x) dx: reuse the forward output, no second polynomial


def exp(x):
    return _exp_from_polynomial(x) if ON_CPU else mx.exp(x)


def sigmoid(x):
    return 1.0 / (1.0 + exp(-x)) if ON_CPU else mx.sigmoid(x)


def silu(x):
    return x * sigmoid(x)


def softplus(x):
    return mx.maximum(x, 0.0) + mx.log1p(exp(-mx.abs(x)))  # log(1 + e^x) without overflow


def rms_norm(x, weight=None, eps=1e-5):
    return mx.fast.rms_norm(x, weight, eps)


def inverse_softplus(y):
    return y + mx.log(-mx.expm1(-y))  # softplus(inverse_softplus(y)) = y for y > 0


def init_dt_bias(nheads, dt_min, dt_max, dt_init_floor):
    """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max], floored at dt_init_floor (upstream)."""
    log_dt = mx.random.uniform(math.log(dt_min), math.log(dt_max), (nheads,))
    return inverse_softplus(mx.maximum(mx.exp(log_dt), dt_init_floor))


# ---------------------------------------------------------------------------------------------------------------------
# The SSD scan (Mamba-2 paper, "state space duality"). Per head, with a p x n state S:
#     S_t = exp(A_t) S_{t-1} + X_t B_t^T,    Y_t = S_t C_t
# in the conventions of upstream's ssd_minimal_discrete: X = x * dt [b l h p], A = A * dt [b l h] (<= 0), B and C
# [b l g n] (g groups of heads share them; g = h is allowed). `ssd_scan` computes the same Y in chunks of Q tokens:
#   1. inside each chunk, a masked Q x Q "attention" with decays: Y_i = sum_{j<=i} (C_i . B_j) exp(A_{j+1}+..+A_i) X_j;
#   2. the state each chunk adds, S_c = sum_j exp(A_{j+1}+..+A_Q) X_j B_j^T;
#   3. a short loop over chunks (not tokens) that carries the state: S_in(c+1) = exp(sum of A in c) S_in(c) + S_c;
#   4. what each position reads from the state carried in: Y_i += exp(A_1+..+A_i) S_in C_i.
# Steps 1, 2 and 4 are batched matmuls (MKL on CPU); the only O(Q^2) element-wise work is the decay matrix. Time and
# memory are linear in the length. Everything runs in float32.


def segsum(a):
    """a [..., T] -> [..., T, T]: out[..., i, j] = a_{j+1} + ... + a_i for j <= i (0 on the diagonal), -inf for j > i.
    A cumulative sum of a masked copy, so every entry sums only its own terms: no difference of two long cumulative
    sums, which would lose float32 precision as the sums grow."""
    T = a.shape[-1]
    idx = mx.arange(T)
    strictly_below = idx[:, None] > idx[None, :]  # [i, j]: j < i
    x = mx.where(strictly_below, a[..., :, None], 0.0)  # x[..., i, j] = a_i where j < i
    out = mx.cumsum(x, axis=-2)  # sum over k <= i of x[..., k, j] = a_{j+1} + ... + a_i
    return mx.where(idx[:, None] >= idx[None, :], out, -mx.inf)


@mx.custom_function
def segment_decay(a):
    """exp(segsum(a)): [..., T] -> [..., T, T], the decay from step j to step i (1 on the diagonal, 0 above it).
    Its gradient is written out (autodiff would retrace the selects and the cumulative sum): with P = cotangent * L,
    d/da_u = sum over i >= u > j of P[i, j]: a reverse cumulative sum down the columns, then a sum left of the
    diagonal."""
    return exp(segsum(a))


@segment_decay.vjp
def _segment_decay_vjp(a, cotangent, decay):
    T = decay.shape[-1]
    idx = mx.arange(T)
    from_below = mx.cumsum(cotangent * decay, axis=-2, reverse=True)  # [u, j] = sum_{i >= u} P[i, j]
    return mx.where(idx[:, None] > idx[None, :], from_below, 0.0).sum(axis=-1)


def _linear_recurrence(decays, added, start):
    """S_0 = start, S_{c+1} = decays[c] * S_c + added[c] over lists of arrays. Returns ([S_0 .. S_{n-1}], S_n)."""
    entering = []
    for decay_c, added_c in zip(decays, added):
        entering.append(start)
        start = decay_c * start + added_c
    return entering, start


@mx.custom_function
def carry_states(decays, added, start):
    """The recurrence over chunks: decays [b c h 1 1], added [b c h p n], start [b 1 h p n] -> (state entering each
    chunk [b c h p n], final state [b 1 h p n]). A loop over c chunks, O(c) multiply-adds on [b h p n] states.
    Its gradient is written out below because autodiff through the loop is ~20x slower on MLX's CPU backend (every
    step's cotangents become full-size adds). The backward pass is the same recurrence run in reverse:
    R_c = G_c + decays[c] * R_{c+1} from R_c = G_final, where G are the incoming cotangents of the outputs."""
    c = decays.shape[1]
    entering, final = _linear_recurrence(mx.split(decays, c, axis=1), mx.split(added, c, axis=1), start)
    return mx.concatenate(entering, axis=1), final


@carry_states.vjp
def _carry_states_vjp(primals, cotangents, outputs):
    decays, added, start = primals
    grad_entering, grad_final = cotangents
    entering, _ = outputs
    c = decays.shape[1]
    reversed_decays = mx.split(decays, c, axis=1)[::-1]
    reversed_grads = mx.split(grad_entering, c, axis=1)[::-1]
    after, grad_start = _linear_recurrence(reversed_decays, reversed_grads, grad_final)  # R_{c+1}, c = last .. 0
    grad_added = mx.concatenate(after[::-1], axis=1)  # d S_{c+1} / d added[c] = 1
    grad_decays = (grad_added * entering).sum(axis=(3, 4), keepdims=True)  # d S_{c+1} / d decays[c] = S_c
    return grad_decays, grad_added, grad_start


def ssd_scan(X, A, B, C, chunk_size, initial_states=None):
    """Chunked SSD. X [b l h p], A [b l h], B, C [b l g n] (g divides h), initial_states [b h p n] or None.
    Returns (Y [b l h p] float32, final_state [b h p n] float32). Any length: the sequence is padded to a multiple of
    the chunk with A = 0, X = B = C = 0, steps that leave the state unchanged."""
    b, l, h, p = X.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g  # heads per group; head k belongs to group k // hg
    Q = chunk_size
    pad = -l % Q
    X, A, B, C = (t.astype(mx.float32) for t in (X, A, B, C))
    if pad:
        X, A, B, C = (mx.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (X, A, B, C))
    nc = (l + pad) // Q

    # Chunked layouts: heads of a group side by side, so B and C are shared by a whole group's matmul.
    Xc = X.reshape(b, nc, Q, g, hg, p).transpose(0, 1, 3, 4, 2, 5)  # [b c g hg Q p]
    Ac = A.reshape(b, nc, Q, g, hg).transpose(0, 1, 3, 4, 2)  # [b c g hg Q]
    Bc = B.reshape(b, nc, Q, g, n).transpose(0, 1, 3, 2, 4)  # [b c g Q n]
    Cc = C.reshape(b, nc, Q, g, n).transpose(0, 1, 3, 2, 4)  # [b c g Q n]
    A_cum = mx.cumsum(Ac, axis=-1)  # [b c g hg Q]: A_1 + ... + A_i within the chunk

    # 1. Intra-chunk: decayed, causally masked (C_i . B_j) applied to X.
    decay = segment_decay(Ac)  # [b c g hg Q Q]: exp(A_{j+1} + ... + A_i), 0 above the diagonal
    scores = Cc @ Bc.swapaxes(-1, -2)  # [b c g Q Q], one per group
    Y = (scores[:, :, :, None] * decay) @ Xc  # [b c g hg Q p]

    # 2. State added by each chunk: the last row of the decay matrix takes token j to the chunk's end.
    X_to_end = Xc * decay[..., -1, :, None]  # [b c g hg Q p]
    X_to_end = X_to_end.transpose(0, 1, 2, 3, 5, 4).reshape(b, nc, g, hg * p, Q)
    chunk_states = (X_to_end @ Bc).reshape(b, nc, h, p, n)  # [b c h p n]

    # 3. Carry the state across chunks (a loop over chunks, not tokens; see carry_states).
    chunk_decay = exp(A_cum[..., -1]).reshape(b, nc, h, 1, 1)  # total decay of each chunk
    state = mx.zeros((b, 1, h, p, n), mx.float32) if initial_states is None else initial_states[:, None]
    states_in, state = carry_states(chunk_decay, chunk_states, state.astype(mx.float32))
    states_in = states_in.reshape(b, nc, g, hg * p, n)  # state entering each chunk

    # 4. Read the carried-in state, decayed from the chunk start to each position.
    Y_carried = (Cc @ states_in.swapaxes(-1, -2)).reshape(b, nc, g, Q, hg, p)  # [b c g Q hg p]
    Y_carried = Y_carried * exp(A_cum).transpose(0, 1, 2, 4, 3)[..., None]
    Y = Y.transpose(0, 1, 4, 2, 3, 5) + Y_carried.transpose(0, 1, 3, 2, 4, 5)  # [b c Q g hg p]
    return Y.reshape(b, nc * Q, h, p)[:, :l], state[:, 0]


def ssd_step(X, A, B, C, state):
    """One token of the same recurrence, the reference the scan is tested against and the decode path.
    X [b h p], A [b h], B, C [b g n], state [b h p n] -> (Y [b h p] float32, new state)."""
    h, g = X.shape[1], B.shape[1]
    B, C = (mx.repeat(t.astype(mx.float32), h // g, axis=1) for t in (B, C))  # [b h n]
    X, A = X.astype(mx.float32), A.astype(mx.float32)
    state = mx.exp(A)[..., None, None] * state + X[..., :, None] * B[..., None, :]
    Y = (state @ C[..., None])[..., 0]
    return Y, state


# ---------------------------------------------------------------------------------------------------------------------
# The Mamba-2 block (upstream mamba_ssm Mamba2): in_proj -> [z | xBC | dt], causal depthwise conv + SiLU on xBC, SSD
# scan with a skip D, grouped RMSNorm of y * silu(z) (gate first, then norm), out_proj.


class Linear(nn.Linear):
    """nn.Linear without bias that computes in the dtype of its input (the float32 master weight is cast on use),
    so COMPUTE_DTYPE can be bfloat16 while the optimizer updates float32 weights."""

    def __init__(self, in_dims, out_dims):
        super().__init__(in_dims, out_dims, bias=False)

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


@mx.custom_function
def causal_conv1d(x, weight, bias):
    """Depthwise causal conv over time: x [b l c], weight [K c], bias [c] -> out_t = bias + sum_k weight[k] x_{t-K+1+k}.
    K shifted multiply-adds, which mx.compile fuses (on CPU ~2.5x cheaper than a grouped convolution with one group
    per channel). The gradient is written out: autodiff would scatter each shifted slice into a full-size zero array
    (measured 2x slower)."""
    K, l = weight.shape[0], x.shape[1]
    padded = mx.pad(x, [(0, 0), (K - 1, 0), (0, 0)])
    out = bias + weight[K - 1] * x
    for k in range(K - 1):
        out = out + weight[k] * padded[:, k : k + l]
    return out


@causal_conv1d.vjp
def _causal_conv1d_vjp(primals, d_out, out):
    """The transposed conv: x_s feeds out_{s+K-1-k} through weight[k], so d x_s = sum_k weight[k] d out_{s+K-1-k}."""
    x, weight, bias = primals
    K, l = weight.shape[0], x.shape[1]
    padded_d_out = mx.pad(d_out, [(0, 0), (0, K - 1), (0, 0)])
    d_x = weight[K - 1] * d_out
    for k in range(K - 1):
        d_x = d_x + weight[k] * padded_d_out[:, K - 1 - k : K - 1 - k + l]
    padded_x = mx.pad(x, [(0, 0), (K - 1, 0), (0, 0)])
    d_weight = mx.stack([(d_out * padded_x[:, k : k + l]).sum(axis=(0, 1)) for k in range(K)])
    return d_x, d_weight, d_out.sum(axis=(0, 1))


class CausalConv1d(nn.Module):
    """Depthwise causal conv1d with bias (see causal_conv1d). Same init as torch's Conv1d: uniform(+-1/sqrt(K)) for
    weight and bias."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = mx.random.uniform(-bound, bound, (kernel_size, channels))
        self.bias = mx.random.uniform(-bound, bound, (channels,))

    def __call__(self, x):  # x [b l c]
        return causal_conv1d(x, self.weight.astype(x.dtype), self.bias.astype(x.dtype))

    def step(self, x, conv_state):  # x [b c], conv_state [b K-1 c]: the previous K-1 inputs
        window = mx.concatenate([conv_state, x[:, None]], axis=1)  # [b K c]
        out = self.bias + (window * self.weight).sum(axis=1)
        return out.astype(x.dtype), window[:, 1:]


MAMBA2_CHUNK = 32  # measured (bench/bench_mamba_mlx.py, d_state = headdim = 32, CPU): 32 beat 64 by 1-10% per
# training step at lengths 512 and 2048, and the scan alone by ~1.5x; 16 ties with 32


class Mamba2(nn.Module):
    def __init__(self, d_model, d_state, headdim, expand, ngroups, d_conv, chunk_size, dt_min, dt_max, dt_init_floor):
        """chunk_size: tokens per chunk of the SSD scan; None picks the measured default MAMBA2_CHUNK."""
        super().__init__()
        chunk_size = chunk_size or MAMBA2_CHUNK
        self.d_inner = expand * d_model
        assert self.d_inner % headdim == 0, "expand * d_model must be a multiple of headdim"
        self.nheads = self.d_inner // headdim
        assert self.nheads % ngroups == 0, "heads must split evenly into groups"
        self.headdim, self.d_state, self.ngroups, self.chunk_size = headdim, d_state, ngroups, chunk_size
        self.conv_dim = self.d_inner + 2 * ngroups * d_state  # x, B, C go through the conv together
        self.in_proj = Linear(d_model, self.d_inner + self.conv_dim + self.nheads)  # z | xBC | dt
        self.conv = CausalConv1d(self.conv_dim, d_conv)
        self.dt_bias = init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor)
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.nheads,)))  # A = -exp(A_log) in [-16, -1]
        self.D = mx.ones((self.nheads,))
        self.norm_weight = mx.ones((self.d_inner,))
        self.out_proj = Linear(self.d_inner, d_model)

    def _split_in_proj(self, zxbcdt):
        return mx.split(zxbcdt, [self.d_inner, self.d_inner + self.conv_dim], axis=-1)

    def _split_xBC(self, xBC):
        gn = self.ngroups * self.d_state
        return mx.split(xBC, [self.d_inner, self.d_inner + gn], axis=-1)

    def _output(self, y, z):
        """Grouped gated RMSNorm (norm after gate, one group per B/C group, as upstream), then out_proj."""
        y = y * silu(z)
        shape = y.shape
        y = rms_norm(y.reshape(*shape[:-1], self.ngroups, -1)).reshape(shape) * self.norm_weight.astype(y.dtype)
        return self.out_proj(y)

    def __call__(self, x):  # x [b l d_model] -> [b l d_model]
        b, l, _ = x.shape
        z, xBC, dt = self._split_in_proj(self.in_proj(x))
        x_ssm, B, C = self._split_xBC(silu(self.conv(xBC)))
        dt = softplus(dt.astype(mx.float32) + self.dt_bias)  # [b l h]
        A = -mx.exp(self.A_log)  # [h]
        x_ssm = x_ssm.reshape(b, l, self.nheads, self.headdim)
        y, _ = ssd_scan(
            x_ssm * dt[..., None],
            A * dt,
            B.reshape(b, l, self.ngroups, self.d_state),
            C.reshape(b, l, self.ngroups, self.d_state),
            self.chunk_size,
        )
        y = y + x_ssm * self.D[:, None]
        return self._output(y.reshape(b, l, self.d_inner).astype(x.dtype), z)

    def init_state(self, batch_size):
        conv_state = mx.zeros((batch_size, self.conv.weight.shape[0] - 1, self.conv_dim))
        ssm_state = mx.zeros((batch_size, self.nheads, self.headdim, self.d_state))
        return conv_state, ssm_state

    def step(self, x, state):  # x [b d_model] -> (y [b d_model], state): one token of recurrent decode
        conv_state, ssm_state = state
        b = x.shape[0]
        z, xBC, dt = self._split_in_proj(self.in_proj(x))
        xBC, conv_state = self.conv.step(xBC, conv_state)
        x_ssm, B, C = self._split_xBC(silu(xBC))
        dt = softplus(dt.astype(mx.float32) + self.dt_bias)  # [b h]
        A = -mx.exp(self.A_log)
        x_ssm = x_ssm.reshape(b, self.nheads, self.headdim)
        y, ssm_state = ssd_step(
            x_ssm * dt[..., None],
            A * dt,
            B.reshape(b, self.ngroups, self.d_state),
            C.reshape(b, self.ngroups, self.d_state),
            ssm_state,
        )
        y = y + x_ssm * self.D[:, None]
        return self._output(y.reshape(b, self.d_inner).astype(x.dtype), z), (conv_state, ssm_state)

    def scan_flops_per_token(self):
        """Forward FLOPs per token of the chunked scan's matmuls (for MFU): per group, C.B scores 2*Q*n; per head,
        the masked product with X 2*Q*p, the chunk state 2*p*n and reading the carried state 2*p*n."""
        Q, n, p = self.chunk_size, self.d_state, self.headdim
        return 2 * Q * n * self.ngroups + self.nheads * (2 * Q * p + 4 * p * n)


# =====================================================================================================================
# SECTION: Mamba-3 (SISO and MIMO scans, Mamba-3 block)
# =====================================================================================================================
#
# Conventions (shared by the chunked scans, the one-token step references and the block):
# - Angles: theta_t = (theta_{t-1} + pi * tanh(angles_t) * dt_t) mod 2*pi, per head and per rotary angle, as in upstream's
#   angle_dt kernel and SISO step kernel. The input `Angles` is the raw projection (before tanh); a head axis of size 1
#   broadcasts over heads (the block passes it that way: upstream shares the angle projection across heads, and the
#   heads differ only through their dt).
# - Rotation: q and k (after their per-head bias) are rotated by +theta_t on the first 2*a dims, pairing adjacent dims
#   (0,1), (2,3), ...: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), as upstream's step references do; the other
#   dims pass through. This holds for SISO and MIMO alike (upstream's fused MIMO kernel pairs i with i + n/2 instead;
#   that is only a fixed relabelling of the state dims, so a model trained here differs from one trained there only
#   by that permutation of its B/C columns).
# - Recurrence (per head, float32), with q~, k~ the rotated q, k and lam_t = sigmoid(trap_t):
#     S_t = alpha_t S_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T,   alpha_t = exp(ADT_t),
#     beta_t = (1 - lam_t) dt_t alpha_t,  gamma_t = lam_t dt_t,   y_t = S_t q~_t + D v_t  (then * silu(z_t)).
#   MIMO sums the two outer products over the rank and reads every rank: o_{t,i} = S_t q~_{t,i} + D v_{t,i} with
#   v_{t,i} = x_t * mimo_v[h,i,:]; o_{t,i} is gated by silu(z_t * mimo_z[h,i,:]); y_t = sum_i o_{t,i} * mimo_o[h,i,:].
# - State of a sequence: (angle `b h a`, ssm `b h p n`, last rotated k, last v `b h p`); the last k is `b h n` for
#   SISO and `b r h n` for MIMO (rank first, as upstream's decode cache), the last v is the raw x (before mimo_v).
#
# How the chunked form is derived. Put the shifted term of step t+1 into step t: the "preloaded" state
#     P_t = S_t + beta'_{t+1} v_t k~_t^T,    beta'_t = (1 - lam_t) dt_t  (beta without its alpha; beta'_L = 0)
# obeys the plain Mamba-2 (SSD) recurrence P_t = alpha_t P_{t-1} + w_t v_t k~_t^T with per-key weight
# w_t = gamma_t + beta'_{t+1}, and the output is y_t = P_t q~_t - beta'_{t+1} (q~_t . k~_t) v_t + D v_t: in the
# intra-chunk "attention" matrix the diagonal weight is gamma_t instead of w_t. A carried (k, v) from an earlier
# segment folds into the start state, P_{-1} = S_{-1} + beta'_0 v_prev k~_prev^T, and the final P equals the final S
# because beta'_L = 0. The rotation is applied to q and k token by token before the products (rotations compose, so
# q~_t . k~_s carries the relative angle theta_t - theta_s by itself). Then per chunk of c tokens (as in SSD):
# intra-chunk causal products with the decay matrix L[t, s] = prod_{s<u<=t} alpha_u, each chunk's end state, the
# recurrence over chunk states, and each chunk's read of the state it received. MIMO folds the rank into the matmul
# dimensions: a chunk holds c*r queries and c*r keys that share the token's decay and weights.
#
# Speed notes (MLX on CPU): matmuls go to the BLAS and are fast, transcendental element-wise ops (exp, sigmoid, sin)
# cost ~20-40 ns per element, plain arithmetic ~1 ns. So the c x c decay matrix is a cumulative product of the
# per-token alphas (exact and stable: factors in (0, 1] never overflow) with a hand-written gradient, instead of
# exp(segsum), which would cost c exps per token; cos/sin are polynomials on CPU. Per token and head the scan costs
# about 2*c*r^2*(n + p) + 4*r*p*n flops: the best chunk balances the two terms, c ~ 2pn / (r (n + p)). Measured
# (d_model 384, n = p = 32, batch 4 x 512, forward + backward): SISO c = 32 and 64 within 10% of each other, MIMO r = 4
# c = 8 and 16 likewise; at length 2048 the larger chunk wins (the state passing grows with the chunk count), hence
# the block's default c = 64 // r (upstream's recommendation too). MIMO costs about r times the scan of SISO: r times
# the flops for the same state size, which a CPU cannot hide the way a memory-bound GPU kernel does.


@mx.custom_function
def _mamba3_cos_sin(theta):
    """(cos, sin) of angles in [0, 2*pi] from plain arithmetic (MLX's CPU sin and cos cost ~35 ns per element): with
    theta = 2y + pi, y in [-pi/2, pi/2], Taylor polynomials for sin y and cos y (error < 1e-7) and the double-angle
    formulas cos theta = s^2 - c^2, sin theta = -2 s c."""
    y = 0.5 * theta - 0.5 * math.pi
    y2 = y * y
    s = y * (1 + y2 * (-1 / 6 + y2 * (1 / 120 + y2 * (-1 / 5040 + y2 * (1 / 362880 + y2 * (-1 / 39916800))))))
    c = 1 + y2 * (-1 / 2 + y2 * (1 / 24 + y2 * (-1 / 720 + y2 * (1 / 40320 + y2 * (-1 / 3628800 + y2 / 479001600)))))
    return s * s - c * c, -2.0 * s * c


@_mamba3_cos_sin.vjp
def _mamba3_cos_sin_vjp(theta, cotangents, outputs):
    (d_cos, d_sin), (cos, sin) = cotangents, outputs
    return d_sin * cos - d_cos * sin


def _mamba3_rotary_cos_sin(theta, n):
    """Per-dimension factors for rotating adjacent pairs: rot(x) = x * cos_full + pair_swap(x) * sin_full.
    theta `... a` -> cos_full, sin_full `... n` (pass-through dims get cos 1, sin 0)."""
    a = theta.shape[-1]
    cos, sin = _mamba3_cos_sin(theta) if ON_CPU else (mx.cos(theta), mx.sin(theta))
    cos_full = mx.stack([cos, cos], axis=-1).reshape(*theta.shape[:-1], 2 * a)
    sin_full = mx.stack([-sin, sin], axis=-1).reshape(*theta.shape[:-1], 2 * a)
    if 2 * a < n:
        rest = theta.shape[:-1] + (n - 2 * a,)
        cos_full = mx.concatenate([cos_full, mx.ones(rest, dtype=cos_full.dtype)], axis=-1)
        sin_full = mx.concatenate([sin_full, mx.zeros(rest, dtype=sin_full.dtype)], axis=-1)
    return cos_full, sin_full


def _mamba3_rotate_pairs(x, cos_full, sin_full):
    """Rotate adjacent pairs (0,1), (2,3), ... of the last axis: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c)."""
    swapped = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)  # (x1, x0) per pair
    return x * cos_full + swapped * sin_full


def _mamba3_wrap_angle(theta):
    """Angle modulo 2*pi, in [0, 2*pi) (the floor has zero gradient, so the wrap is transparent to autodiff)."""
    two_pi = 2.0 * math.pi
    return theta - two_pi * mx.floor(theta / two_pi)


def _mamba3_cumulative_angles(increments, initial_angle, chunk_size):
    """theta_t = (theta_{-1} + sum_{u<=t} increments_u) mod 2*pi along axis -2 of `b h l a`, summed in two levels
    (within chunks, then over chunk totals wrapped mod 2*pi) so float32 keeps its precision on long sequences."""
    b, h, l, a = increments.shape
    n_chunks = -(-l // chunk_size)
    pad = n_chunks * chunk_size - l
    if pad:
        increments = mx.pad(increments, [(0, 0), (0, 0), (0, pad), (0, 0)])
    inc = increments.reshape(b, h, n_chunks, chunk_size, a)
    within = mx.cumsum(inc, axis=-2)
    chunk_totals = _mamba3_wrap_angle(within[..., -1, :])  # b h c a
    offsets = _mamba3_wrap_angle(mx.cumsum(chunk_totals, axis=-2, inclusive=False) + initial_angle[:, :, None, :])
    theta = _mamba3_wrap_angle(within + offsets[..., None, :]).reshape(b, h, n_chunks * chunk_size, a)
    return theta[:, :, :l]


_MAMBA3_PASSING_MATMUL_MAX_CHUNKS = 512  # state passing: one (C+1)^2 matmul up to this many chunks (measured faster than
# a loop over 256 chunks), else a loop over chunks


@mx.custom_function
def _mamba3_decay_matrix(log_alpha):
    """Decay matrix L[..., t, s] = prod_{s<u<=t} exp(log_alpha_u) for s <= t (1 on the diagonal), 0 above: `... c` ->
    `... c c`. A cumulative product of the alphas down each column: exact and stable (factors in (0, 1] never
    overflow), with c exps per chunk instead of c per token for exp(segsum)."""
    c = log_alpha.shape[-1]
    idx = mx.arange(c)
    factors = mx.where(idx[:, None] > idx[None, :], exp(log_alpha)[..., :, None], 1.0)
    return mx.where(idx[:, None] >= idx[None, :], mx.cumprod(factors, axis=-2), 0.0)


@_mamba3_decay_matrix.vjp
def _mamba3_decay_matrix_vjp(log_alpha, cotangent, decay):
    """L[t, s] = exp(sum_{s<u<=t} a_u), so d loss / d a_u = sum over s < u <= t of cotangent[t, s] * L[t, s]: a reverse
    cumulative sum down the columns, then a row sum left of the diagonal (four cheap passes, no division)."""
    c = decay.shape[-1]
    idx = mx.arange(c)
    below_rows = mx.cumsum(cotangent * decay, axis=-2, reverse=True)  # [u, s] = sum_{t>=u} cotangent[t, s] L[t, s]
    return mx.where(idx[:, None] > idx[None, :], below_rows, 0.0).sum(axis=-1)


def _mamba3_pass_states(chunk_states, chunk_log_decay, start_state):
    """The state entering each chunk and the final state, from each chunk's own end state `b h C p n`, its total log
    decay `b h C` and the start state `b h p n`: entering[j] = sum_{i<=j} exp(decay of chunks i..j-1) * contrib[i]
    with contrib = [start, chunk_states[0], ...]."""
    b, h, n_chunks, p, n = chunk_states.shape
    if n_chunks <= _MAMBA3_PASSING_MATMUL_MAX_CHUNKS:
        # one (C+1) x (C+1) matmul; segment sums by a masked cumulative sum (not a difference of two long cumulative
        # sums, which would lose float32 precision on long sequences)
        totals = mx.pad(chunk_log_decay, [(0, 0), (0, 0), (1, 0)])  # b h (C+1)
        idx = mx.arange(n_chunks + 1)
        seg = mx.cumsum(mx.where(idx[:, None] > idx[None, :], totals[..., :, None], 0.0), axis=-2)
        passing = exp(mx.where(idx[:, None] >= idx[None, :], seg, -mx.inf))  # b h (C+1) (C+1)
        contributions = mx.concatenate([start_state[:, :, None], chunk_states], axis=2).reshape(b, h, -1, p * n)
        states = (passing @ contributions).reshape(b, h, n_chunks + 1, p, n)
        return states[:, :, :-1], states[:, :, -1]
    # many chunks: a loop over chunks (not tokens), one multiply-add on `b h p n` each, linear in the chunk count
    chunk_decay = exp(chunk_log_decay)[..., None, None]  # b h C 1 1
    state, entering = start_state, []
    for j in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, :, j] * state + chunk_states[:, :, j]
    return mx.stack(entering, axis=2), state


def _mamba3_chunked_core(q, k, v, log_alpha, state_weight, diag_weight, start_state, rank):
    """Chunked scan of P_t = alpha_t P_{t-1} + w_t sum_i v_{t,i} k_{t,i}^T with outputs
    o_{t,i} = P_t q_{t,i} - (w_t - gamma_t) sum_j (q_{t,i} . k_{t,j}) v_{t,j}, everything float32.

    q, k `b h C (c r) n`, v `b h C (c r) p` (token-major, rank-minor inside a chunk); log_alpha, state_weight (w),
    diag_weight (gamma) `b h C c`; start_state `b h p n`. Returns outputs `b h C (c r) p` and the final state."""
    b, h, n_chunks, c = log_alpha.shape
    decay = _mamba3_decay_matrix(log_alpha)  # b h C c c
    # Weight of key s for query t: L[t, s] w_s below the diagonal, gamma_t on it (the shifted term of step t + 1 is
    # already in P_t but not yet in S_t).
    eye = mx.eye(c, dtype=mx.bool_)
    mix = mx.where(eye, diag_weight[..., :, None], decay * state_weight[..., None, :])
    scores = q @ k.swapaxes(-1, -2)  # b h C (c r) (c r)
    if rank > 1:
        scores = scores.reshape(b, h, n_chunks, c, rank, c, rank) * mix[..., :, None, :, None]
        scores = scores.reshape(b, h, n_chunks, c * rank, c * rank)
    else:
        scores = scores * mix
    out = scores @ v
    # Each chunk's own end state: sum_s L[end, s] w_s v_s k_s^T.
    to_end = decay[..., -1, :] * state_weight  # b h C c
    if rank > 1:
        to_end = mx.repeat(to_end, rank, axis=-1)
    chunk_states = (v * to_end[..., None]).swapaxes(-1, -2) @ k  # b h C p n
    chunk_log_decay = mx.cumsum(log_alpha, axis=-1)  # b h C c, inclusive within chunk
    entering, final_state = _mamba3_pass_states(chunk_states, chunk_log_decay[..., -1], start_state)
    # Read of the entering state, decayed from the chunk start to each token.
    from_start = exp(chunk_log_decay)
    if rank > 1:
        from_start = mx.repeat(from_start, rank, axis=-1)
    out = out + (q * from_start[..., None]) @ entering.swapaxes(-1, -2)
    return out, final_state


def _mamba3_to_chunks(x, n_chunks, chunk_size):
    """`b h l ...` -> `b h C (c ...)` after zero-padding l to C*c (padded tokens have zero weight and zero decay)."""
    b, h, l = x.shape[:3]
    pad = n_chunks * chunk_size - l
    if pad:
        x = mx.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(b, h, n_chunks, chunk_size, *x.shape[3:])


def _mamba3_gates(ADT, DT, Trap):
    """Per-token scalars `b h l`: w_t = gamma_t + beta'_{t+1} (state weight), gamma_t (diagonal weight), beta'_0."""
    lam = sigmoid(Trap)
    gamma = lam * DT
    beta_prime = DT - gamma  # (1 - lam) dt, beta without its alpha
    beta_next = mx.pad(beta_prime[..., 1:], [(0, 0), (0, 0), (0, 1)])
    return gamma + beta_next, gamma, beta_prime[..., 0]


def _mamba3_heads_qk(X, bias, heads_per_group, rank):
    """Q or K `b l g n` (rank 1) / `b l r g n` plus the per-head bias `h n` / `h r n` -> `b h l n` / `b h l r n`."""
    if X.ndim == 4:
        b, l, g, n = X.shape
        X = X.transpose(0, 2, 1, 3)[:, :, None]  # b g 1 l n
        return (X + bias.reshape(g, heads_per_group, 1, n)).reshape(b, g * heads_per_group, l, n)
    b, l, r, g, n = X.shape
    X = X.transpose(0, 3, 1, 2, 4)[:, :, None]  # b g 1 l r n
    bias = bias.reshape(g, heads_per_group, 1, r, n)
    return (X + bias).reshape(b, g * heads_per_group, l, r, n)


def _mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, initial_states, chunk_size, mimo):
    """Shared body of the SISO (mimo None) and MIMO (mimo = (MIMO_V, MIMO_Z, MIMO_O)) chunked scans."""
    f32 = mx.float32
    out_dtype = V.dtype
    Q, K, V, ADT, DT, Trap = (t.astype(f32) for t in (Q, K, V, ADT, DT, Trap))
    Q_bias, K_bias, Angles = Q_bias.astype(f32), K_bias.astype(f32), Angles.astype(f32)
    b, l, h, p = V.shape
    rank = 1 if mimo is None else Q.shape[2]
    g, n = Q.shape[-2:]
    heads_per_group = h // g
    a = Angles.shape[-1]
    if initial_states is None:
        k_shape = (b, h, n) if mimo is None else (b, rank, h, n)
        initial_states = (mx.zeros((b, h, a), f32), mx.zeros((b, h, p, n), f32), mx.zeros(k_shape, f32),
                          mx.zeros((b, h, p), f32))
    angle0, ssm0, k0, v0 = (t.astype(f32) for t in initial_states)

    # Angles and the rotation of q and k (head-major layout `b h l ...` from here on).
    increments = math.pi * mx.tanh(Angles).transpose(0, 2, 1, 3) * DT[..., None]  # b h l a
    theta = _mamba3_cumulative_angles(increments, angle0, chunk_size)
    cos_full, sin_full = _mamba3_rotary_cos_sin(theta, n)  # b h l n
    if mimo is not None:
        cos_full, sin_full = cos_full[:, :, :, None], sin_full[:, :, :, None]
    q = _mamba3_rotate_pairs(_mamba3_heads_qk(Q, Q_bias, heads_per_group, rank), cos_full, sin_full)
    k = _mamba3_rotate_pairs(_mamba3_heads_qk(K, K_bias, heads_per_group, rank), cos_full, sin_full)
    x = V.transpose(0, 2, 1, 3)  # b h l p
    if mimo is None:
        v = x
    else:
        MIMO_V = mimo[0].astype(f32)
        v = x[:, :, :, None] * MIMO_V[:, None]  # b h l r p
        v0_ranks = v0[:, :, None] * MIMO_V[None]  # b h r p

    state_weight, diag_weight, beta_first = _mamba3_gates(ADT, DT, Trap)
    # Fold the carried (k, v) of the previous segment into the start state (the shifted term of token 0).
    if mimo is None:
        carried = (v0 * beta_first[..., None])[..., :, None] * k0[..., None, :]
    else:
        carried = (v0_ranks * beta_first[..., None, None]).swapaxes(-1, -2) @ k0.transpose(0, 2, 1, 3)
    start_state = ssm0 + carried

    n_chunks = -(-l // chunk_size)
    chunked = [_mamba3_to_chunks(t, n_chunks, chunk_size) for t in (q, k, v)]
    if mimo is not None:
        chunked = [t.reshape(b, h, n_chunks, chunk_size * rank, t.shape[-1]) for t in chunked]
    gates = [_mamba3_to_chunks(t, n_chunks, chunk_size) for t in (ADT, state_weight, diag_weight)]
    out, final_ssm = _mamba3_chunked_core(*chunked, *gates, start_state, rank)
    out = out.reshape(b, h, n_chunks * chunk_size, *(() if mimo is None else (rank,)), p)[:, :, :l]

    if D is not None:
        D = D.astype(f32).reshape(h, 1, *(() if mimo is None else (1,)), 1)
        out = out + D * v
    if mimo is None:
        if Z is not None:
            out = out * silu(Z.astype(f32).transpose(0, 2, 1, 3))
        out = out.transpose(0, 2, 1, 3)  # b l h p
    else:
        MIMO_Z, MIMO_O = mimo[1], mimo[2]
        if Z is not None:
            z = Z.astype(f32).transpose(0, 2, 1, 3)[:, :, :, None] * MIMO_Z.astype(f32)[:, None]
            out = out * silu(z)
        if MIMO_O is not None:
            out = (out * MIMO_O.astype(f32)[:, None]).sum(axis=3).transpose(0, 2, 1, 3)  # b l h p
        else:
            out = out.transpose(0, 2, 3, 1, 4)  # b l r h p
    k_last = k[:, :, -1] if mimo is None else k[:, :, -1].transpose(0, 2, 1, 3)
    final_states = (theta[:, :, -1], final_ssm, k_last, x[:, :, -1])
    return out.astype(out_dtype), final_states


def mamba3_siso_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, initial_states=None,
                     chunk_size=64):
    """Mamba-3 SISO scan, chunked (cost linear in l; any l >= 1), float32 inside.

    Q, K `b l g n` (before bias and rotation; heads share them within a group, head = group * heads_per_group + j),
    V, Z `b l h p`, ADT (= A*dt), DT, Trap (before sigmoid) `b h l`, Q_bias, K_bias `h n`, Angles `b l h a` or
    `b l 1 a` (before tanh), D `h`, initial_states (angle `b h a`, ssm `b h p n`, k `b h n`, v `b h p`) or None.
    Returns (out `b l h p` in V's dtype, final states in the same form as initial_states, float32)."""
    return _mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, initial_states, chunk_size, None)


def mamba3_mimo_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_Z=None, MIMO_O=None, D=None,
                     Z=None, initial_states=None, chunk_size=16):
    """Mamba-3 MIMO scan of rank r, chunked (a chunk of c tokens is a (c*r) x (c*r) product; upstream recommends
    c = 64 / r). As mamba3_siso_scan, except Q, K `b l r g n`, Q_bias, K_bias `h r n`, MIMO_V, MIMO_Z, MIMO_O `h r p`
    (MIMO_Z is needed when Z is given), and the carried k state is `b r h n`. Returns out `b l h p`, or the per-rank
    outputs `b l r h p` (before any down-projection) when MIMO_O is None."""
    return _mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, initial_states, chunk_size,
                        (MIMO_V, MIMO_Z, MIMO_O))


def _mamba3_step_common(Q, K, ADT, DT, Trap, Q_bias, K_bias, Angles, state, mimo):
    """One token of the angle recurrence and rotation; returns rotated per-head q, k and the scalars. Written apart
    from the scan's helpers (its own wrap and pair rotation), so that the tests compare two implementations."""
    f32 = mx.float32
    angle, ssm, k_prev, v_prev = (t.astype(f32) for t in state)
    Q, K, ADT, DT, Trap = (t.astype(f32) for t in (Q, K, ADT, DT, Trap))
    h = ADT.shape[1]
    theta = mx.remainder(angle + math.pi * mx.tanh(Angles.astype(f32)) * DT[..., None], 2 * math.pi)  # b h a
    heads_per_group = h // Q.shape[-2]
    q = mx.repeat(Q, heads_per_group, axis=-2)  # b h n or b r h n
    k = mx.repeat(K, heads_per_group, axis=-2)
    cos, sin = mx.cos(theta), mx.sin(theta)
    if not mimo:
        q, k = q + Q_bias.astype(f32), k + K_bias.astype(f32)
    else:
        q = q + Q_bias.astype(f32).transpose(1, 0, 2)
        k = k + K_bias.astype(f32).transpose(1, 0, 2)
        cos, sin = cos[:, None], sin[:, None]

    def rotate(x):  # pairs (0,1), (2,3), ... of the first 2a dims: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
        a = theta.shape[-1]
        pairs = x[..., : 2 * a].reshape(*x.shape[:-1], a, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(*x.shape[:-1], 2 * a)
        return mx.concatenate([rotated, x[..., 2 * a :]], axis=-1)

    q, k = rotate(q), rotate(k)
    alpha = mx.exp(ADT)
    lam = mx.sigmoid(Trap)
    beta = (1.0 - lam) * DT * alpha
    gamma = lam * DT
    return theta, ssm, k_prev, v_prev, q, k, alpha, beta, gamma


def mamba3_siso_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, state=None):
    """One token of the SISO recurrence, written directly from the math (the reference the scan is tested against).
    Q, K `b g n`, V, Z `b h p`, ADT, DT, Trap `b h`, Angles `b h a` (or `b 1 a`), state as the scan's (or None).
    Returns (y `b h p`, new state)."""
    f32 = mx.float32
    b, h, p = V.shape
    n, a = Q.shape[-1], Angles.shape[-1]
    if state is None:
        state = (mx.zeros((b, h, a)), mx.zeros((b, h, p, n)), mx.zeros((b, h, n)), mx.zeros((b, h, p)))
    theta, ssm, k_prev, v_prev, q, k, alpha, beta, gamma = _mamba3_step_common(Q, K, ADT, DT, Trap, Q_bias, K_bias,
                                                                        Angles, state, False)
    v = V.astype(f32)
    ssm = (alpha[..., None, None] * ssm + (beta[..., None] * v_prev)[..., :, None] * k_prev[..., None, :]
           + (gamma[..., None] * v)[..., :, None] * k[..., None, :])
    y = (ssm @ q[..., None])[..., 0]
    if D is not None:
        y = y + D.astype(f32)[:, None] * v
    if Z is not None:
        y = y * silu(Z.astype(f32))
    return y.astype(V.dtype), (theta, ssm, k, v)


def mamba3_mimo_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_Z=None, MIMO_O=None, D=None,
                     Z=None, state=None):
    """One token of the MIMO recurrence (reference). Q, K `b r g n`, V, Z `b h p`, ADT, DT, Trap `b h`,
    Angles `b h a`, biases `h r n`, MIMO_* `h r p`, state (angle `b h a`, ssm `b h p n`, k `b r h n`, v `b h p`).
    Returns (y `b h p`, or `b r h p` when MIMO_O is None, new state)."""
    f32 = mx.float32
    b, h, p = V.shape
    r, n, a = Q.shape[1], Q.shape[-1], Angles.shape[-1]
    if state is None:
        state = (mx.zeros((b, h, a)), mx.zeros((b, h, p, n)), mx.zeros((b, r, h, n)), mx.zeros((b, h, p)))
    theta, ssm, k_prev, v_prev, q, k, alpha, beta, gamma = _mamba3_step_common(Q, K, ADT, DT, Trap, Q_bias, K_bias,
                                                                        Angles, state, True)
    x = V.astype(f32)
    up = MIMO_V.astype(f32).transpose(1, 0, 2)  # r h p
    v_ranks, v_prev_ranks = x[:, None] * up, v_prev[:, None] * up  # b r h p
    # sum over ranks of v k^T, as (b h p r) @ (b h r n)
    new_kv = (v_ranks * gamma[:, None, :, None]).transpose(0, 2, 3, 1) @ k.transpose(0, 2, 1, 3)
    old_kv = (v_prev_ranks * beta[:, None, :, None]).transpose(0, 2, 3, 1) @ k_prev.transpose(0, 2, 1, 3)
    ssm = alpha[..., None, None] * ssm + old_kv + new_kv
    o = (ssm[:, None] @ q[..., None])[..., 0]  # b r h p
    if D is not None:
        o = o + D.astype(f32)[:, None] * v_ranks
    if Z is not None:
        o = o * silu(Z.astype(f32)[:, None] * MIMO_Z.astype(f32).transpose(1, 0, 2))
    if MIMO_O is not None:
        o = (o * MIMO_O.astype(f32).transpose(1, 0, 2)).sum(axis=1)
    return o.astype(V.dtype), (theta, ssm, k, x)


# ---------------------------------------------------------------------------------------------------------------------
# The Mamba-3 block (upstream mamba_ssm Mamba3): in_proj -> [z, x, B, C, dd_dt, dd_A, trap, angles], RMSNorm of B and C
# over n plus learned per-head (and per-rank) biases, dt = softplus(dd_dt + dt_bias), A = min(-f(dd_A), -a_floor) with
# the heavy-tailed f, the trapezoid gate, data-dependent rotary angles, the scan with skip D, then y * silu(z) (or a
# grouped RMSNorm per head before the gate when is_outproj_norm), out_proj. MIMO (rank r) projects x and z up per rank
# with mimo_x and mimo_z and the per-rank outputs down with mimo_o. No conv.


def _mamba3_heavy_tail(u):
    """f(u) = 1 + u for u >= 0, 1 / (1 - u) for u < 0: positive, continuous with slope 1 at 0, linear growth for
    large u and a slow approach to 0 for very negative u. Each branch sees only its own side (no inf in a gradient)."""
    return mx.where(u >= 0, 1.0 + mx.maximum(u, 0.0), 1.0 / (1.0 - mx.minimum(u, 0.0)))


def _mamba3_gated_group_norm(y, z, weight, eps=1e-5):
    """RMSNorm over the last axis (one group per head, group size = headdim), times weight, then * silu(z)."""
    return rms_norm(y.astype(mx.float32), None, eps) * weight * silu(z.astype(mx.float32))


class Mamba3(nn.Module):
    def __init__(self, d_model, d_state=128, headdim=64, expand=2, ngroups=1, rope_fraction=0.5, a_floor=1e-4,
                 is_mimo=False, mimo_rank=4, is_outproj_norm=False, chunk_size=None, dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4):
        """chunk_size: tokens per chunk of the scan; None picks the measured default (64 for SISO, 64 // rank for
        MIMO, so that a chunk is a 64 x 64 product either way)."""
        super().__init__()
        self.d_inner = int(expand * d_model)
        assert self.d_inner % headdim == 0, "expand * d_model must be a multiple of headdim"
        self.nheads = self.d_inner // headdim
        assert self.nheads % ngroups == 0, "heads must split evenly into groups"
        self.headdim, self.d_state, self.ngroups = headdim, d_state, ngroups
        self.is_mimo, self.is_outproj_norm, self.a_floor = is_mimo, is_outproj_norm, a_floor
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.chunk_size = chunk_size if chunk_size is not None else max(1, 64 // self.mimo_rank)
        rotary_dims = int(d_state * rope_fraction)
        rotary_dims -= rotary_dims % 2
        self.num_rope_angles = rotary_dims // 2
        assert self.num_rope_angles > 0, "rope_fraction * d_state must give at least one rotary pair"
        r, h, n = self.mimo_rank, self.nheads, d_state
        bc_dim = r * ngroups * n
        self.split_sizes = [self.d_inner, self.d_inner, bc_dim, bc_dim, h, h, h, self.num_rope_angles]
        self.in_proj = Linear(d_model, sum(self.split_sizes))  # z | x | B | C | dd_dt | dd_A | trap | angles
        self.dt_bias = init_dt_bias(h, dt_min, dt_max, dt_init_floor)
        self.B_bias = mx.ones((h, r, n))  # per-head, per-rank biases after the B/C norms (upstream init 1)
        self.C_bias = mx.ones((h, r, n))
        self.B_norm_weight = mx.ones((n,))
        self.C_norm_weight = mx.ones((n,))
        if is_mimo:
            self.mimo_x = mx.ones((h, r, headdim)) / r
            self.mimo_z = mx.ones((h, r, headdim))
            self.mimo_o = mx.ones((h, r, headdim)) / r
        self.D = mx.ones((h,))
        if is_outproj_norm:
            self.norm_weight = mx.ones((self.d_inner,))
        self.out_proj = Linear(self.d_inner, d_model)

    def _project(self, u):
        """u [b l d_model] -> the scan's inputs (everything but the parameters) and the gate z [b l h p]."""
        b, l, _ = u.shape
        r, g, h, n, p = self.mimo_rank, self.ngroups, self.nheads, self.d_state, self.headdim
        bounds = [sum(self.split_sizes[: i + 1]) for i in range(len(self.split_sizes) - 1)]
        z, x, B, C, dd_dt, dd_A, trap, angles = mx.split(self.in_proj(u), bounds, axis=-1)
        B = rms_norm(B.reshape(b, l, r, g, n), self.B_norm_weight.astype(B.dtype), 1e-5)
        C = rms_norm(C.reshape(b, l, r, g, n), self.C_norm_weight.astype(C.dtype), 1e-5)
        if not self.is_mimo:
            B, C = B[:, :, 0], C[:, :, 0]
        A = mx.minimum(-_mamba3_heavy_tail(dd_A.astype(mx.float32)), -self.a_floor)
        DT = softplus(dd_dt.astype(mx.float32) + self.dt_bias)
        inputs = dict(Q=C, K=B, V=x.reshape(b, l, h, p), ADT=(A * DT).transpose(0, 2, 1), DT=DT.transpose(0, 2, 1),
                      Trap=trap.astype(mx.float32).transpose(0, 2, 1), Angles=angles.astype(mx.float32)[:, :, None])
        return inputs, z.reshape(b, l, h, p)

    def _scan(self, inputs, z, initial_states):
        """The scan plus the output gate/norm: -> (y [b l d_inner], final states)."""
        b, l = z.shape[:2]
        gate_in_scan = not self.is_outproj_norm
        if self.is_mimo:
            y, states = mamba3_mimo_scan(**inputs, Q_bias=self.C_bias, K_bias=self.B_bias, MIMO_V=self.mimo_x,
                                         MIMO_Z=self.mimo_z, MIMO_O=self.mimo_o if gate_in_scan else None, D=self.D,
                                         Z=z if gate_in_scan else None, initial_states=initial_states,
                                         chunk_size=self.chunk_size)
        else:
            y, states = mamba3_siso_scan(**inputs, Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0], D=self.D,
                                         Z=z if gate_in_scan else None, initial_states=initial_states,
                                         chunk_size=self.chunk_size)
        if self.is_outproj_norm:
            weight = self.norm_weight.reshape(self.nheads, self.headdim)
            if self.is_mimo:  # norm each rank's output with its own gate, then project the ranks down
                z_ranks = z[:, :, None] * self.mimo_z.transpose(1, 0, 2)  # b l r h p
                y = _mamba3_gated_group_norm(y, z_ranks, weight)
                y = (y * self.mimo_o.transpose(1, 0, 2)).sum(axis=2)
            else:
                y = _mamba3_gated_group_norm(y, z, weight)
        return y.reshape(b, l, self.d_inner).astype(z.dtype), states

    def __call__(self, u):  # u [b l d_model] -> [b l d_model]
        inputs, z = self._project(u)
        y, _ = self._scan(inputs, z, None)
        return self.out_proj(y)

    def forward_with_state(self, u, state=None):
        """Chunked forward that starts from `state` (or a fresh one) and also returns the state after the last token:
        a prompt's prefill before step-by-step decode."""
        inputs, z = self._project(u)
        y, state = self._scan(inputs, z, state)
        return self.out_proj(y), state

    def init_state(self, batch_size):
        """(angle [b h a], ssm [b h p n], last rotated k [b h n] or [b r h n] for MIMO, last x [b h p]), float32."""
        h, n, p = self.nheads, self.d_state, self.headdim
        k_shape = (batch_size, h, n) if not self.is_mimo else (batch_size, self.mimo_rank, h, n)
        return (mx.zeros((batch_size, h, self.num_rope_angles)), mx.zeros((batch_size, h, p, n)), mx.zeros(k_shape),
                mx.zeros((batch_size, h, p)))

    def step(self, u, state):  # u [b d_model] -> (y [b d_model], state): one token of recurrent decode
        inputs, z = self._project(u[:, None])
        token = {name: (value[:, :, 0] if name in ("ADT", "DT", "Trap") else value[:, 0])
                 for name, value in inputs.items()}
        z = z[:, 0]
        gate_in_step = not self.is_outproj_norm
        if self.is_mimo:
            y, state = mamba3_mimo_step(**token, Q_bias=self.C_bias, K_bias=self.B_bias, MIMO_V=self.mimo_x,
                                        MIMO_Z=self.mimo_z, MIMO_O=self.mimo_o if gate_in_step else None, D=self.D,
                                        Z=z if gate_in_step else None, state=state)
        else:
            y, state = mamba3_siso_step(**token, Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0], D=self.D,
                                        Z=z if gate_in_step else None, state=state)
        if self.is_outproj_norm:
            weight = self.norm_weight.reshape(self.nheads, self.headdim)
            if self.is_mimo:
                z_ranks = z[:, None] * self.mimo_z.transpose(1, 0, 2)  # b r h p
                y = (_mamba3_gated_group_norm(y, z_ranks, weight) * self.mimo_o.transpose(1, 0, 2)).sum(axis=1)
            else:
                y = _mamba3_gated_group_norm(y, z, weight)
        return self.out_proj(y.reshape(u.shape[0], self.d_inner).astype(u.dtype)), state

    def scan_flops_per_token(self):
        """Forward FLOPs per token of the chunked scan's matmuls (for MFU), per head: scores 2*c*r*r*n, the masked
        product with v 2*c*r*r*p, the chunk state 2*r*p*n and reading the carried state 2*r*p*n (c = chunk size)."""
        c, r, n, p = self.chunk_size, self.mimo_rank, self.d_state, self.headdim
        return self.nheads * (2 * c * r * r * (n + p) + 4 * r * p * n)



# =====================================================================================================================
# SECTION: Language model, generate
# =====================================================================================================================

# The language model: a tied token embedding, DEPTH pre-norm residual blocks x = x + mixer(norm(x)) (with MLP_EXPAND > 0
# also x = x + mlp(norm(x))), a final RMSNorm, logits against the embedding matrix. Either mixer fits: a block only
# needs __call__ (whole sequences, chunked scan), init_state and step (one token, recurrent; used by generate).


@dataclass
class ModelConfig:
    architecture: str = ARCHITECTURE
    vocab_size: int = prepare.VOCAB_SIZE
    depth: int = DEPTH
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
    mlp_expand: int = MLP_EXPAND


def make_mixer(c):
    if c.architecture == "mamba-2":
        return Mamba2(c.d_model, c.d_state, c.headdim, c.expand, c.ngroups, c.d_conv, c.chunk_size or None, c.dt_min,
                      c.dt_max, c.dt_init_floor)
    if c.architecture == "mamba-3":
        return Mamba3(c.d_model, c.d_state, c.headdim, c.expand, c.ngroups, c.rope_fraction, c.a_floor, c.is_mimo,
                      c.mimo_rank, c.is_outproj_norm, c.chunk_size or None, c.dt_min, c.dt_max, c.dt_init_floor)
    raise ValueError(f"Unknown ARCHITECTURE {c.architecture!r}: use 'mamba-3' or 'mamba-2'.")


class RMSNorm(nn.Module):
    def __init__(self, dims, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x):
        return rms_norm(x, self.weight.astype(x.dtype), self.eps)


class GatedMLP(nn.Module):
    """SwiGLU: fc2(h * silu(gate)) with [h | gate] = fc1(x)."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = Linear(d_model, 2 * hidden)
        self.fc2 = Linear(hidden, d_model)

    def __call__(self, x):
        h, gate = mx.split(self.fc1(x), 2, axis=-1)
        return self.fc2(h * silu(gate))


class Block(nn.Module):
    """Pre-norm residual block. The residual stream stays float32 (upstream's residual_in_fp32); the normalised input of
    the mixer and the MLP is cast to the compute dtype."""

    def __init__(self, config, compute_dtype=mx.float32):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.norm = RMSNorm(config.d_model)
        self.mixer = make_mixer(config)
        if config.mlp_expand > 0:
            self.mlp_norm = RMSNorm(config.d_model)
            self.mlp = GatedMLP(config.d_model, config.mlp_expand * config.d_model)

    def __call__(self, x):
        x = x + self.mixer(self.norm(x).astype(self.compute_dtype))
        if "mlp" in self:
            x = x + self.mlp(self.mlp_norm(x).astype(self.compute_dtype))
        return x

    def step(self, x, state):
        y, state = self.mixer.step(self.norm(x).astype(self.compute_dtype), state)
        x = x + y
        if "mlp" in self:
            x = x + self.mlp(self.mlp_norm(x).astype(self.compute_dtype))
        return x, state


class MambaLM(nn.Module):
    def __init__(self, config, compute_dtype=mx.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [Block(config, compute_dtype) for _ in range(config.depth)]
        self.norm_f = RMSNorm(config.d_model)
        self._init_weights()

    def _init_weights(self):
        """Upstream (mamba_ssm) init: embedding N(0, 0.02); linear layers keep their default uniform(+-1/sqrt(fan_in));
        the projections that write into the residual stream (out_proj, fc2) are scaled by 1/sqrt(residual writes per
        layer * depth) so the stream's variance does not grow with depth. The mixers initialise their own A, dt, D."""
        self.embed.weight = 0.02 * mx.random.normal(self.embed.weight.shape)
        writes = self.config.depth * (2 if self.config.mlp_expand > 0 else 1)
        for layer in self.layers:
            residual_writers = [layer.mixer.out_proj] + ([layer.mlp.fc2] if "mlp" in layer else [])
            for proj in residual_writers:
                proj.weight = proj.weight / math.sqrt(writes)

    def __call__(self, input_ids):  # [b l] int32 -> logits [b l vocab]
        x = self.embed(input_ids)  # float32 residual stream
        for layer in self.layers:
            x = layer(x)
        return self.unembed(self.norm_f(x))

    def unembed(self, x):  # tied: logits against the embedding matrix, in the compute dtype
        return x.astype(self.compute_dtype) @ self.embed.weight.astype(self.compute_dtype).T

    def init_cache(self, batch_size):
        return [layer.mixer.init_state(batch_size) for layer in self.layers]

    def step(self, token_ids, cache):  # [b] int32 -> (logits [b vocab], cache): one token, recurrent
        x = self.embed(token_ids)
        new_cache = []
        for layer, state in zip(self.layers, cache):
            x, state = layer.step(x, state)
            new_cache.append(state)
        return self.unembed(self.norm_f(x)), new_cache

    def flops_per_token(self):
        """Training FLOPs per token for MFU: 6 * (weights that multiply activations: every linear and conv weight, and
        the embedding matrix once, as the unembedding; the input lookup costs nothing) + 3 * the scans' own forward
        FLOPs (forward + backward ~ 3x forward), which the mixers report as scan_flops_per_token()."""
        matmul_params = self.embed.weight.size + sum(p.size for _, p in matrix_parameters(self))
        scan = sum(getattr(layer.mixer, "scan_flops_per_token", lambda: 0)() for layer in self.layers)
        return 6 * matmul_params + 3 * scan


def matrix_parameters(model):
    """(name, weight) of every linear and conv weight, the parameters that multiply activations: they get weight
    decay and MATRIX_LR, and they are what the FLOP count counts."""
    modules = model.named_modules()
    return [(f"{path}.weight", m.weight) for path, m in modules if isinstance(m, (nn.Linear, CausalConv1d))]


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in float32; the logsumexp uses the fast exp on CPU (V exps per token is the single
    largest transcendental cost of a step)."""
    logits = logits.astype(mx.float32)
    if ON_CPU:
        peak = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
        lse = peak[..., 0] + mx.log(exp(logits - peak).sum(axis=-1))
    else:
        lse = mx.logsumexp(logits, axis=-1)
    target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (lse - target_logits).mean()


def generate(model, tokenizer, prompt, max_new_tokens=64, temperature=1.0):
    """Sample a continuation of `prompt` with the recurrent step path: each token costs O(1), whatever the length so
    far (the cache holds the conv window and the SSM state of every layer). temperature 0 = greedy."""
    cache = model.init_cache(1)
    logits = None
    for token in tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id()):
        logits, cache = model.step(mx.array([token], mx.int32), cache)
    new_tokens = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = mx.argmax(logits, axis=-1)
        else:
            token = mx.random.categorical(logits.astype(mx.float32) / temperature, axis=-1)
        new_tokens.append(token.item())
        logits, cache = model.step(token.astype(mx.int32), cache)
    return tokenizer.decode(new_tokens)


# =====================================================================================================================
# SECTION: Optimizer, schedule, training loop, summary
# =====================================================================================================================

# AdamW with three parameter groups: the embedding (EMBEDDING_LR), the matrices (MATRIX_LR), both with decoupled weight
# decay; and everything else (SCALAR_LR, no decay): A_log, dt_bias, D, norm weights, biases and the mixers' other
# per-head parameters. The schedule scales every group's rate by one multiplier.


class AdamW:
    def __init__(self, model, betas=(ADAM_BETA1, ADAM_BETA2), eps=ADAM_EPS):
        matrices = {name for name, _ in matrix_parameters(model)}
        self.lr, self.weight_decay = {}, {}
        for name, p in tree_flatten(model.trainable_parameters()):
            if name == "embed.weight":
                self.lr[name], self.weight_decay[name] = EMBEDDING_LR, WEIGHT_DECAY
            elif name in matrices:
                self.lr[name], self.weight_decay[name] = MATRIX_LR, WEIGHT_DECAY
            else:
                self.lr[name], self.weight_decay[name] = SCALAR_LR, 0.0
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        params = dict(tree_flatten(model.trainable_parameters()))
        self.state = {
            "step": mx.array(0, mx.int32),
            "m": {name: mx.zeros_like(p) for name, p in params.items()},
            "v": {name: mx.zeros_like(p) for name, p in params.items()},
        }

    def update(self, model, grads, lr_multiplier):
        """One step. grads: a tree like the model's trainable parameters; lr_multiplier: a float32 scalar array."""
        step = self.state["step"] + 1
        self.state["step"] = step
        bias1 = 1 - self.beta1 ** step.astype(mx.float32)
        bias2 = 1 - self.beta2 ** step.astype(mx.float32)
        grads = dict(tree_flatten(grads))
        updated = []
        for name, p in tree_flatten(model.trainable_parameters()):
            g = grads[name]
            m = self.state["m"][name] = self.beta1 * self.state["m"][name] + (1 - self.beta1) * g
            v = self.state["v"][name] = self.beta2 * self.state["v"][name] + (1 - self.beta2) * mx.square(g)
            lr = self.lr[name] * lr_multiplier
            p = p * (1 - lr * self.weight_decay[name]) - lr * (m / bias1) / (mx.sqrt(v / bias2) + self.eps)
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


def make_training_step(model, optimizer, grad_accum_steps):
    """One optimizer step: a compiled forward+backward per micro-batch, gradients summed on the device without a host
    sync (mx.async_eval lets the host fetch the next batch meanwhile), then a compiled mean + clip + AdamW update.
    Returns step(batches, lr_mult) -> (mean loss, an mx.array already scheduled, epoch of the last batch)."""
    loss_and_grad = nn.value_and_grad(model, lambda inputs, targets: cross_entropy(model(inputs), targets))

    # The model's and optimizer's arrays are the compiled functions' implicit inputs and outputs: the graphs read and
    # update them instead of baking them in as constants.
    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def forward_backward(inputs, targets):
        return loss_and_grad(inputs, targets)

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def optimizer_step(grads, lr_mult):
        grads = nn.average_gradients(grads)  # sum over the data-parallel ranks / world size (none in a plain run)
        grads = tree_map(lambda g: g / grad_accum_steps, grads)  # mean over micro-batches
        if GRAD_CLIP > 0:
            norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
            grads = tree_map(lambda g: g * mx.minimum(1.0, GRAD_CLIP / (norm + 1e-6)), grads)
        optimizer.update(model, grads, lr_mult)

    def step(batches, lr_mult):
        grad_sum, loss_sum = None, 0.0
        for _ in range(grad_accum_steps):
            inputs, targets, epoch = next(batches)
            loss, grads = forward_backward(mx.array(inputs), mx.array(targets))
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            loss_sum = loss_sum + loss
            mx.async_eval(loss_sum, grad_sum)
        optimizer_step(grad_sum, mx.array(lr_mult, mx.float32))
        mean_loss = loss_sum / grad_accum_steps
        mx.async_eval(mean_loss, model.state, optimizer.state)
        return mean_loss, epoch

    return step


def resolve_compute_dtype():
    """bf16 where the device runs it well (GPUs). On the MLX CPU backend bf16 matmuls bypass the BLAS: the training
    step measured ~12x slower than in float32 (`bench/bench_mamba_mlx.py --only dtype`), so "auto" is float32 there."""
    if COMPUTE_DTYPE == "auto":
        return mx.float32 if ON_CPU else mx.bfloat16
    return getattr(mx, COMPUTE_DTYPE)


def device_name():
    return mx.device_info().get("device_name", str(mx.default_device()))


def main():
    t_start = t_script_start
    dist = prepare.distributed("mlx")  # rank and world size under mlx.launch; rank 0 of 1 in a plain run
    mx.random.seed(SEED)  # the same on every rank: all ranks start from the same weights
    seq_len = prepare.MAX_SEQ_LEN
    tokenizer = prepare.Tokenizer.from_directory()
    compute_dtype = resolve_compute_dtype()
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size())
    model = MambaLM(config, compute_dtype)
    mx.eval(model.parameters())
    num_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    flops_per_token = model.flops_per_token()
    architecture = ARCHITECTURE + (f" (MIMO rank {MIMO_RANK})" if ARCHITECTURE == "mamba-3" and IS_MIMO else "")

    tokens_per_micro_step = DEVICE_BATCH_SIZE * seq_len * dist.world_size  # one micro-batch on every rank
    if TOTAL_BATCH_SIZE % tokens_per_micro_step:
        raise SystemExit(
            f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN * world size "
            f"({DEVICE_BATCH_SIZE} * {seq_len} * {dist.world_size} = {tokens_per_micro_step})."
        )
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step
    print(f"model: {architecture}, {num_params / 1e6:.2f}M parameters, depth {DEPTH}, d_model {D_MODEL}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token, compute {str(compute_dtype).split('.')[-1]}, "
          f"device {device_name()}")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows x {seq_len} tokens "
          f"x {dist.world_size} processes")

    optimizer = AdamW(model)
    training_step = make_training_step(model, optimizer, grad_accum_steps)
    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train", rank=dist.rank,
                                           world_size=dist.world_size)
    progress_line = prepare.ProgressLine()
    gc.collect()
    gc.freeze()  # the long-lived objects are made; keep the collector's pauses out of the timed loop
    gc.disable()

    # The clock: training_time counts every optimizer step except the first (it compiles); the run stops once the
    # budget is spent, whatever the step count. The schedule follows progress = training_time / TIME_BUDGET.
    training_time, step, smooth_loss, t_startup = 0.0, 0, 0.0, None
    while True:
        t0 = time.time()
        progress = min(training_time / prepare.TIME_BUDGET, 1.0)
        lr_mult = lr_multiplier(progress)
        loss, epoch = training_step(train_loader, lr_mult)
        train_loss = loss.item()  # the one host sync of the step
        train_loss, step_time = dist.agree(train_loss, time.time() - t0)  # the same loss and clock on every rank
        prepare.check_loss(train_loss, step)
        if step == 0:
            t_startup = time.time() - t_start  # imports, model, data, compilation of the first step
        else:
            training_time += step_time
        step += 1

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9**step)
        tokens_per_s = TOTAL_BATCH_SIZE / step_time
        remaining = max(prepare.TIME_BUDGET - training_time, 0.0)
        progress_line.update(
            f"step {step:05d} ({100 * min(training_time / prepare.TIME_BUDGET, 1.0):5.1f}%) | loss {debiased:.4f} | "
            f"lrm {lr_mult:.2f} | {1000 * step_time:.0f} ms | {tokens_per_s:,.0f} tok/s | epoch {epoch} | "
            f"{remaining:.0f}s left"
        )
        if step > 1 and training_time >= prepare.TIME_BUDGET:
            break
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
    mfu = 100 * flops_per_token * tokens_per_s / (peak * dist.world_size)  # tokens_per_s counts all ranks
    print(f"startup_seconds: {t_startup:.1f} (imports, model, data, first compiled step; not in training_seconds)")
    print(f"eval_seconds: {eval_seconds:.1f}")
    print(f"throughput: {tokens_per_s:,.0f} tok/s; MFU against {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    prepare.print_summary({
        "architecture": architecture,
        "preset": prepare.PRESET_NAME,
        "val_bpb": val_bpb,
        "training_seconds": training_time,
        "total_seconds": time.time() - t_start,
        "peak_memory_mb": mx.get_peak_memory() / 1024**2,
        "mfu_percent": mfu,
        "total_tokens_M": total_tokens / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": DEPTH,
    }, trained_tokens=total_tokens, dist=dist)


if __name__ == "__main__":
    main()
