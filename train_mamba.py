"""
Train a Mamba-2 or Mamba-3 (SISO / MIMO) language model with PyTorch for a fixed time budget, then report val_bpb.

The PyTorch mirror of train_mamba_3_mlx.py: the same architectures, hyperparameter names, schedule, time-budget rule
and summary, scored by the same harness (prepare.evaluate_bpb) on the same data and tokenizer. On CUDA it trains in
bf16 autocast with torch.compile and fused AdamW, and uses mamba_ssm's fused scan kernels when they are installed and
agree with the pure-PyTorch scans on a start-up check; on CPU it runs in float32 (tests, smoke runs).

Run: `uv run --extra torch train_mamba.py` (architecture from AUTORESEARCH_MLX_ARCHITECTURE, else the preset's
`train_mamba` section, else the constant below). The math of every block is in MODELS.md; the scans below are the
chunked (matmul-shaped) forms, and each has a step recurrence that the tests hold it to.
"""

import prepare  # first: the harness (constants, presets, data, evaluation)
from prepare import apply_preset

import gc
import math
import os
import platform
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters (canonical full-size defaults; the active preset's `train_mamba` section may override them)

# Model
ARCHITECTURE = "mamba-3"  # "mamba-2" (SSD) or "mamba-3"
MIMO_RANK = 1  # Mamba-3 only: 1 = SISO, r > 1 = MIMO of rank r
DEPTH = 8  # number of Mamba blocks
D_MODEL = 768  # residual stream width
D_STATE = 128  # state size n (key/query side)
HEADDIM = 64  # head dim p (value side)
EXPAND = 2  # d_inner = EXPAND * D_MODEL
NGROUPS = 1  # B/C groups shared by the heads
D_CONV = 4  # Mamba-2 causal depthwise conv width
CHUNK_SIZE = 64  # scan chunk length Q (MIMO: use 64 // MIMO_RANK)
ROPE_FRACTION = 0.5  # Mamba-3: share of the state dims that the data-dependent rotation turns
A_FLOOR = 1e-4  # Mamba-3: decay rates are at least this (A <= -A_FLOOR)
OUTPROJ_NORM = False  # Mamba-3: grouped gated RMSNorm before out_proj instead of y * silu(z)
DT_MIN = 0.001  # dt_bias init: dt ~ log-uniform in [DT_MIN, DT_MAX] ...
DT_MAX = 0.1
DT_INIT_FLOOR = 1e-4  # ... floored here
TIE_EMBEDDINGS = True  # lm_head shares the embedding matrix

# Optimization
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step (gradient accumulation makes up the rest)
DEVICE_BATCH_SIZE = 16  # rows per forward/backward pass
LEARNING_RATE = 3e-3  # AdamW peak learning rate
WEIGHT_DECAY = 0.1  # decoupled, matrices and embeddings only (not A_log, dt_bias, D, norms, biases)
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0  # max global gradient norm (0 = off)
WARMUP_RATIO = 0.05  # share of the time budget spent warming the learning rate up from 0
WARMDOWN_RATIO = 0.4  # share of the time budget spent decaying it to FINAL_LR_FRAC * peak
FINAL_LR_FRAC = 0.0
UNTIMED_STEPS = 10  # the first steps (compilation, autotuning) are not counted against TIME_BUDGET
EVAL_BATCH_SIZE = 16  # rows per evaluation forward pass
SEED = 42

# Runtime
COMPILE = True  # torch.compile the model on CUDA (on CPU the inductor C++ build costs more than it saves at test sizes)
FUSED_KERNELS = True  # use mamba_ssm's fused scans on CUDA when they import and pass the start-up check

apply_preset(globals(), "train_mamba")
ARCHITECTURE = os.environ.get("AUTORESEARCH_MLX_ARCHITECTURE") or ARCHITECTURE
# Experiment overrides: assignments placed here win over the preset.


# =====================================================================================================================
# Scans. Every scan is chunked: within a chunk of Q tokens it is a masked, decayed "attention" (matmuls); chunk end
# states pass from chunk to chunk by a small (chunks x chunks) matmul; each chunk then reads the state it received.
# Time and memory are O(l * Q), never O(l^2); any length works (the tail chunk is zero-padded, which leaves every
# state unchanged). Decays, cumulative sums and the states passed between chunks are float32 (float64 if the inputs
# are); the large matmuls run in the input dtype (bf16 under autocast).
# =====================================================================================================================


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def segsum(a):
    """a (..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for j <= i and -inf above the diagonal, so that
    exp(segsum(a)) is the causal decay matrix. Built from a masked cumulative sum, never a difference of two long
    cumulative sums (which loses precision in float32)."""
    T = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, T)  # rows[i, j] = a[i]
    strictly_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = rows.masked_fill(~strictly_below, 0.0).cumsum(dim=-2)  # sums[i, j] = sum of a[k] for j < k <= i
    on_or_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return sums.masked_fill(~on_or_below, float("-inf"))


def decayed_chunk_scan(q, k, v, weight, log_decay, chunk_size, initial_state=None):
    """The linear recurrence shared by every block, per head, with a rank axis for MIMO (r = 1 otherwise):

        S_t = exp(log_decay_t) * S_{t-1} + weight_t * sum_j v_{t,j} k_{t,j}^T        (S is p x n, S_{-1} = initial)
        y_{t,i} = S_t q_{t,i}

    q, k: (b, l, r, g, n), shared by the h/g heads of each group; v: (b, l, r, h, p); weight, log_decay: (b, l, h);
    initial_state: (b, h, p, n) or None. Returns y (b, l, r, h, p) and the final state (b, h, p, n), float32.
    """
    b, l, r, g, n = q.shape
    h, p = v.shape[-2:]
    e = h // g  # heads per group
    Q = chunk_size
    acc = accumulation_dtype(v.dtype)
    pad = -l % Q
    if pad:  # zero tokens at the end: no decay (log 0 = 0 ... exp(0) = 1) and no input, so the state stays as it was
        q, k, v = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (q, k, v))
        weight, log_decay = (F.pad(t, (0, 0, 0, pad)) for t in (weight, log_decay))
    c = (l + pad) // Q
    # Layout: (batch, group, chunk, ...) in front so that every contraction is a batched matmul; ranks ride along
    # with the time axis inside a chunk (Q * r rows), heads of a group ride along with p (e * p columns).
    q = q.reshape(b, c, Q, r, g, n).permute(0, 4, 1, 2, 3, 5).reshape(b, g, c, Q * r, n)
    k = k.reshape(b, c, Q, r, g, n).permute(0, 4, 1, 2, 3, 5).reshape(b, g, c, Q * r, n)
    v = v * weight[:, :, None, :, None].to(v.dtype)  # fold the per-token input weight into the values
    v = v.reshape(b, c, Q, r, g, e, p).permute(0, 4, 1, 2, 3, 5, 6)  # (b, g, c, Q, r, e, p)
    a = log_decay.to(acc).reshape(b, c, Q, g, e).permute(0, 3, 4, 1, 2)  # (b, g, e, c, Q)
    a_cum = a.cumsum(dim=-1)  # decay from the chunk start to each token, in log space

    # 1. Within each chunk: y[t, i] += sum_{s <= t} exp(a[s+1..t]) (q[t, i] . k[s, j]) v[s, j]
    scores = q @ k.transpose(-1, -2)  # (b, g, c, Qr, Qr), once per group
    decay = torch.exp(segsum(a))  # (b, g, e, c, Q, Q), per head
    mixing = scores.view(b, g, 1, c, Q, r, Q, r) * decay.view(b, g, e, c, Q, 1, Q, 1)
    mixing = mixing.reshape(b, g, e, c, Q * r, Q * r).to(v.dtype)
    v_rows = v.permute(0, 1, 5, 2, 3, 4, 6).reshape(b, g, e, c, Q * r, p)
    y_within = (mixing @ v_rows).view(b, g, e, c, Q, r, p).permute(0, 1, 3, 4, 5, 2, 6)  # (b, g, c, Q, r, e, p)

    # 2. Each chunk's end state from its own tokens: sum_s exp(a[s+1..end]) v[s, j] k[s, j]^T
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 1, 3, 4, 2)  # (b, g, c, Q, e)
    v_to_end = (v * decay_to_end[:, :, :, :, None, :, None].to(v.dtype)).reshape(b, g, c, Q * r, e * p)
    chunk_states = v_to_end.transpose(-1, -2) @ k  # (b, g, c, e*p, n)

    # 3. Pass states across chunks, in float32 whatever the autocast: state_in[z] = sum_{c' <= z} decay * own[c']
    with torch.autocast(q.device.type, enabled=False):
        chunk_states = chunk_states.to(acc).view(b, g, c, e, p, n).permute(0, 1, 3, 2, 4, 5)  # (b, g, e, c, p, n)
        if initial_state is None:
            first = chunk_states.new_zeros(b, g, e, 1, p, n)
        else:
            first = initial_state.to(acc).reshape(b, g, e, 1, p, n)
        states = torch.cat([first, chunk_states], dim=3)  # index 0: the initial state, z: chunk z-1's own state
        chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, g, e, c+1, c+1)
        states = (chunk_decay @ states.reshape(b, g, e, c + 1, p * n)).view(b, g, e, c + 1, p, n)
    states_in, final_state = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. Each chunk reads the state it received: y[t, i] += exp(a[start..t]) * state_in q[t, i]
    states_in = states_in.permute(0, 1, 3, 5, 2, 4).reshape(b, g, c, n, e * p).to(q.dtype)
    y_from_state = (q @ states_in).view(b, g, c, Q, r, e, p)
    y_from_state = y_from_state * torch.exp(a_cum).permute(0, 1, 3, 4, 2)[:, :, :, :, None, :, None]

    y = (y_within + y_from_state).permute(0, 2, 3, 4, 1, 5, 6).reshape(b, c * Q, r, h, p)[:, :l]
    return y.to(v.dtype), final_state.reshape(b, h, p, n)


def decayed_step(state, q, k, v, weight, log_decay):
    """One token of decayed_chunk_scan: state (b, h, p, n); q, k (b, r, g, n); v (b, r, h, p); weight, log_decay (b, h).
    Returns y (b, r, h, p) and the new state."""
    e = v.shape[2] // q.shape[2]
    k_heads, q_heads = k.repeat_interleave(e, dim=2), q.repeat_interleave(e, dim=2)  # (b, r, h, n)
    update = torch.einsum("brhp,brhn->bhpn", v.to(state.dtype), k_heads.to(state.dtype))
    state = torch.exp(log_decay.to(state.dtype))[..., None, None] * state + weight.to(state.dtype)[..., None, None] * update
    y = torch.einsum("bhpn,brhn->brhp", state, q_heads.to(state.dtype))
    return y.to(v.dtype), state


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-2 (SSD): S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """x (b, l, h, p); dt (b, l, h) > 0; A (h,) < 0; B, C (b, l, g, n); D (h,) or None; initial_state (b, h, p, n).
    Returns y (b, l, h, p) and the final state (b, h, p, n), float32."""
    y, final_state = decayed_chunk_scan(
        C[:, :, None], B[:, :, None], x[:, :, None], dt, dt * A, chunk_size, initial_state
    )
    y = y[:, :, 0]
    if D is not None:
        y = y + x * D[:, None].to(x.dtype)
    return y, final_state


def ssd_step(state, x, dt, A, B, C, D=None):
    """One token of ssd_scan: state (b, h, p, n) float32; x (b, h, p); dt (b, h); B, C (b, g, n)."""
    y, state = decayed_step(state, C[:, None], B[:, None], x[:, None], dt, dt * A)
    y = y[:, 0]
    if D is not None:
        y = y + x * D[:, None].to(x.dtype)
    return y, state


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3: exponential-trapezoidal recurrence with a data-dependent rotation of q and k (MODELS.md), SISO and MIMO.
#
#   S_t = alpha_t S_{t-1} + beta_t sum_i v_{t-1,i} k~_{t-1,i}^T + gamma_t sum_i v_{t,i} k~_{t,i}^T
#   alpha_t = exp(A_t dt_t),  beta_t = (1 - lam_t) dt_t alpha_t,  gamma_t = lam_t dt_t
#   o_{t,i} = S_t q~_{t,i} + D v_{t,i}
#
# Chunked form. Let sigma_t = (1 - lam_t) dt_t, so beta_t = alpha_t sigma_t. The shifted state
# S'_t = S_t + sigma_{t+1} sum_i v_{t,i} k~_{t,i}^T obeys the plain decayed recurrence
#   S'_t = alpha_t S'_{t-1} + w_t sum_i v_{t,i} k~_{t,i}^T,   w_t = gamma_t + sigma_{t+1},
# and S_t q = S'_t q - sigma_{t+1} sum_j (q . k~_{t,j}) v_{t,j}. So a Mamba-3 scan is decayed_chunk_scan with
# per-token weight w, minus that diagonal term, plus D v. The carried (k~, v) of the previous call enter as
# S'_{-1} = S_{-1} + sigma_0 sum_i v_{-1,i} k~_{-1,i}^T; at the sequence end sigma_{l} = 0 (the next token is
# unknown), so the final S' is the true final state. The carried state is (theta, S, k~_last, v_last).
#
# Rotation: pairs of adjacent dims (0, 1), (2, 3), ... of the first 2 * num_angles dims turn by theta_t, where
# theta_t = theta_{t-1} + pi * tanh(angles_t) * dt_t (mod 2 pi); (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).


def heavy_tail_rate(u):
    """f(u) = 1 + u for u >= 0, 1 / (1 - u) for u < 0, written as (1 + relu(u)) / (1 + relu(-u)) so that neither
    branch can produce inf/NaN gradients for the other."""
    return (1 + F.relu(u)) / (1 + F.relu(-u))


def mamba3_decay_rate(dd_A, A_floor):
    """A_t = min(-f(dd_A), -A_floor), computed in float32."""
    return torch.clamp(-heavy_tail_rate(dd_A.float()), max=-A_floor)


def rotate_pairs(x, theta):
    """Rotate adjacent dim pairs (2j, 2j+1) of x (..., n) by theta (..., a) for j < a; the other dims pass through.
    theta broadcasts against x's leading dims."""
    a = theta.shape[-1]
    turned, rest = x[..., : 2 * a], x[..., 2 * a :]
    x0, x1 = turned.unflatten(-1, (a, 2)).unbind(-1)
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    turned = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([turned, rest], dim=-1)


def rotation_angles(angles, dt, chunk_size, initial_theta=None):
    """theta_t = theta_{-1} + sum_{s <= t} pi tanh(angles_s) dt_s, modulo 2 pi. angles (b, l, a), dt (b, l, h);
    returns theta (b, l, h, a) float32. Summed per chunk and reduced mod 2 pi between chunks, so that no float32 sum
    grows with the sequence length."""
    b, l, h = dt.shape
    acc = accumulation_dtype(dt.dtype)
    increments = math.pi * torch.tanh(angles.to(acc))[:, :, None, :] * dt.to(acc)[..., None]  # (b, l, h, a)
    Q = chunk_size
    pad = -l % Q
    increments = F.pad(increments, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, Q))  # (b, c, Q, h, a)
    within = increments.cumsum(dim=2)
    chunk_totals = torch.remainder(within[:, :, -1], 2 * math.pi)  # (b, c, h, a)
    before = torch.cumsum(chunk_totals, dim=1) - chunk_totals  # what the chunks before each one add
    if initial_theta is not None:
        before = before + initial_theta.to(acc)[:, None]
    theta = torch.remainder(within + before[:, :, None], 2 * math.pi)
    return theta.flatten(1, 2)[:, :l]


def mamba3_scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, chunk_size, mimo_x=None, initial_state=None):
    """The Mamba-3 recurrence, rank r (r = 1: SISO).

    q, k: (b, l, r, g, n) after their RMSNorm, before bias and rotation (q = C, k = B); v: (b, l, h, p) (= x);
    adt = A * dt, dt, trap: (b, l, h) (trap before its sigmoid); q_bias, k_bias: (h, r, n); angles: (b, l, a) raw;
    D: (h,); mimo_x: (h, r) per-rank value scales (None for SISO); initial_state: (theta (b, h, a), S (b, h, p, n),
    k_last (b, r, h, n) rotated, v_last (b, h, p)) or None.
    Returns o (b, l, r, h, p) and the final state in the same form as initial_state.
    """
    b, l, r, g, n = q.shape
    h = v.shape[2]
    acc = accumulation_dtype(v.dtype)
    dt, adt = dt.to(acc), adt.to(acc)
    lam = torch.sigmoid(trap.to(acc))
    gamma = lam * dt  # weight of the current token's own input
    sigma = (1 - lam) * dt  # weight (before its decay) of the previous token's input in the next step
    sigma_next = F.pad(sigma[:, 1:], (0, 0, 0, 1))  # sigma_{t+1}; 0 after the last token
    weight = gamma + sigma_next

    theta = rotation_angles(angles, dt, chunk_size, None if initial_state is None else initial_state[0])
    e = h // g
    q = q.repeat_interleave(e, dim=3) + q_bias.transpose(0, 1).to(q.dtype)  # (b, l, r, h, n), per head from here
    k = k.repeat_interleave(e, dim=3) + k_bias.transpose(0, 1).to(k.dtype)
    q, k = rotate_pairs(q, theta[:, :, None]), rotate_pairs(k, theta[:, :, None])
    v_ranks = v[:, :, None] if mimo_x is None else v[:, :, None] * mimo_x.transpose(0, 1)[None, None, :, :, None].to(v.dtype)

    state0 = None
    if initial_state is not None:
        _, S_prev, k_prev, v_prev = initial_state
        v_prev_ranks = v_prev[:, None] if mimo_x is None else v_prev[:, None] * mimo_x.transpose(0, 1)[None, :, :, None]
        carried = torch.einsum("brhp,brhn->bhpn", v_prev_ranks.to(acc), k_prev.to(acc))
        state0 = S_prev.to(acc) + sigma[:, 0, :, None, None] * carried

    o, S_final = decayed_chunk_scan(q, k, v_ranks, weight, adt, chunk_size, state0)
    # The shifted term must not reach its own token: remove sigma_{t+1} sum_j (q_{t,i} . k_{t,j}) v_{t,j}.
    qk = torch.einsum("blihn,bljhn->blhij", q, k)  # (b, l, h, r, r)
    own = torch.einsum("blhij,bljhp->blihp", qk, v_ranks)
    o = o - sigma_next.to(o.dtype)[:, :, None, :, None] * own + D.to(o.dtype)[:, None] * v_ranks
    final_state = (theta[:, -1], S_final, k[:, -1], v[:, -1])
    return o, final_state


def mamba3_step(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x=None):
    """One token of mamba3_scan, written as the recurrence itself. q, k (b, r, g, n); v (b, h, p); adt, dt, trap (b, h);
    angles (b, a); state = (theta, S, k_last, v_last) as in mamba3_scan. Returns o (b, r, h, p) and the new state."""
    theta, S, k_prev, v_prev = state
    acc = S.dtype
    dt, adt = dt.to(acc), adt.to(acc)
    lam = torch.sigmoid(trap.to(acc))
    alpha = torch.exp(adt)
    beta, gamma = (1 - lam) * dt * alpha, lam * dt
    theta = torch.remainder(theta + math.pi * torch.tanh(angles.to(acc))[:, None] * dt[..., None], 2 * math.pi)
    e = v.shape[1] // q.shape[2]
    q = q.repeat_interleave(e, dim=2) + q_bias.transpose(0, 1).to(q.dtype)  # (b, r, h, n)
    k = k.repeat_interleave(e, dim=2) + k_bias.transpose(0, 1).to(k.dtype)
    q, k = rotate_pairs(q, theta[:, None]), rotate_pairs(k, theta[:, None])
    scale = (lambda x: x[:, None]) if mimo_x is None else (lambda x: x[:, None] * mimo_x.transpose(0, 1)[None, :, :, None])
    v_ranks, v_prev_ranks = scale(v), scale(v_prev)
    S = (
        alpha[..., None, None] * S
        + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev_ranks.to(acc), k_prev.to(acc))
        + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_ranks.to(acc), k.to(acc))
    )
    o = torch.einsum("bhpn,brhn->brhp", S, q.to(acc)).to(v.dtype) + D.to(v.dtype)[:, None] * v_ranks
    return o, (theta, S, k, v)


def mamba3_siso_scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, chunk_size, initial_state=None):
    """SISO Mamba-3: q, k (b, l, g, n); q_bias, k_bias (h, n); k_last in the state is (b, h, n). Returns y (b, l, h, p)."""
    if initial_state is not None:
        theta, S, k_last, v_last = initial_state
        initial_state = (theta, S, k_last[:, None], v_last)
    y, (theta, S, k_last, v_last) = mamba3_scan(
        q[:, :, None], k[:, :, None], v, adt, dt, trap, q_bias[:, None], k_bias[:, None], angles, D, chunk_size,
        initial_state=initial_state,
    )
    return y[:, :, 0], (theta, S, k_last[:, 0], v_last)


def mamba3_siso_step(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D):
    theta, S, k_last, v_last = state
    y, (theta, S, k_last, v_last) = mamba3_step(
        (theta, S, k_last[:, None], v_last), q[:, None], k[:, None], v, adt, dt, trap, q_bias[:, None],
        k_bias[:, None], angles, D,
    )
    return y[:, 0], (theta, S, k_last[:, 0], v_last)


def mamba3_mimo_scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x, chunk_size, initial_state=None):
    """MIMO Mamba-3 of rank r: q, k (b, l, r, g, n); mimo_x (h, r). Returns per-rank outputs o (b, l, r, h, p)."""
    return mamba3_scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, chunk_size, mimo_x, initial_state)


def mamba3_mimo_step(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x):
    return mamba3_step(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x)


# ---------------------------------------------------------------------------------------------------------------------
# Scan backend: the pure-PyTorch scans above, or mamba_ssm's fused CUDA kernels behind the same calls. Chosen once at
# start by choose_scan_backend(); a kernel is used only if it imports and matches the pure scan on a random problem
# of the model's shape (forward and gradients), so a kernel with another convention can never train silently.

SCAN_BACKEND = {"ssd": "torch", "mamba3": "torch"}  # which implementation the blocks call in forward()
FUSED_SCANS = {}  # name -> function with the pure scan's signature (training form: no initial state)


def _import_fused_scans():
    """The fused kernels that import here, wrapped to the pure scans' signatures (layouts converted on the way)."""
    found = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        @torch.compiler.disable
        def fused_ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
            assert initial_state is None
            y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D)
            return y, None

        found["ssd"] = (fused_ssd, "mamba_chunk_scan_combined")
    except Exception:
        pass
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

        @torch.compiler.disable
        def fused_mamba3_siso(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, chunk_size, initial_state=None):
            assert initial_state is None
            h = v.shape[2]
            y = mamba3_siso_combined(
                Q=q.contiguous(), K=k.contiguous(), V=v.contiguous(),
                ADT=adt.float().transpose(1, 2).contiguous(), DT=dt.float().transpose(1, 2).contiguous(),
                Trap=trap.transpose(1, 2).contiguous(), Q_bias=q_bias.float().contiguous(),
                K_bias=k_bias.float().contiguous(),
                Angles=angles.float()[:, :, None].expand(-1, -1, h, -1).contiguous(), D=D.float(), Z=None,
                chunk_size=chunk_size,
            )
            return y, None

        found["mamba3_siso"] = (fused_mamba3_siso, "mamba3_siso_combined")
    except Exception:
        pass
    try:
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo

        @torch.compiler.disable
        def fused_mamba3_mimo(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x, chunk_size, initial_state=None):
            # The tilelang kernel rotates dims (i, i + a) together where the pure scan rotates (2i, 2i + 1): the
            # same model up to a fixed relabelling of state dims, applied to q, k and their biases here.
            assert initial_state is None
            n, a = q.shape[-1], angles.shape[-1]
            order = torch.cat([torch.arange(0, 2 * a, 2), torch.arange(1, 2 * a, 2), torch.arange(2 * a, n)]).to(q.device)
            h, r, p = v.shape[2], q.shape[2], v.shape[3]
            ones = torch.ones(h, r, p, device=v.device, dtype=torch.float32)
            o = mamba3_mimo(
                q[..., order].contiguous(), k[..., order].contiguous(), v.contiguous(),
                adt.float().transpose(1, 2).contiguous(), dt.float().transpose(1, 2).contiguous(),
                trap.transpose(1, 2).contiguous(), q_bias[..., order].float().contiguous(),
                k_bias[..., order].float().contiguous(), (mimo_x.float()[..., None] * ones).contiguous(), ones, None,
                angles.float()[:, :, None].expand(-1, -1, h, -1).contiguous(), D.float(), None, chunk_size,
                n // (2 * a), v.dtype,
            )
            return o.transpose(1, 2) if o.shape[1] != v.shape[1] else o, None  # (b, l, r, h, p)

        found["mamba3_mimo"] = (fused_mamba3_mimo, "mamba3_mimo")
    except Exception:
        pass
    return found


def _random_scan_problem(kind, batch, length, heads, headdim, groups, d_state, rank, num_angles, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    dt = F.softplus(rand(batch, length, heads) - 3)
    if kind == "ssd":
        return dict(
            x=rand(batch, length, heads, headdim).to(dtype), dt=dt, A=-torch.rand(heads, generator=g).to(device) - 0.5,
            B=rand(batch, length, groups, d_state).to(dtype), C=rand(batch, length, groups, d_state).to(dtype),
            D=rand(heads),
        )
    qk_shape = (batch, length, groups, d_state) if rank == 1 else (batch, length, rank, groups, d_state)
    bias_shape = (heads, d_state) if rank == 1 else (heads, rank, d_state)
    problem = dict(
        q=F.normalize(rand(*qk_shape), dim=-1).to(dtype) * 3, k=F.normalize(rand(*qk_shape), dim=-1).to(dtype) * 3,
        v=rand(batch, length, heads, headdim).to(dtype), adt=-dt * (0.5 + torch.rand(batch, length, heads, generator=g).to(device)),
        dt=dt, trap=rand(batch, length, heads), q_bias=1 + 0.1 * rand(*bias_shape), k_bias=1 + 0.1 * rand(*bias_shape),
        angles=rand(batch, length, num_angles), D=rand(heads),
    )
    if rank > 1:
        problem["mimo_x"] = 1 / rank + 0.1 * rand(heads, rank)
    return problem


def _fused_matches_pure(kind, fused, pure, problem, chunk_size, tolerance=0.05):
    """Forward and input gradients of the fused kernel against the pure scan (in float32) on one random problem."""
    inputs = {key: value.detach().clone().requires_grad_(value.is_floating_point()) for key, value in problem.items()}
    reference = {key: value.detach().float().clone().requires_grad_(value.is_floating_point()) for key, value in problem.items()}
    y_fused, _ = fused(**inputs, chunk_size=chunk_size)
    y_pure, _ = pure(**reference, chunk_size=chunk_size)
    probe = torch.randn_like(y_pure)
    (y_fused.float() * probe).sum().backward()
    (y_pure * probe).sum().backward()
    worst = []
    pairs = [("output", y_fused.float(), y_pure)] + [
        (key, inputs[key].grad, reference[key].grad) for key in inputs if reference[key].grad is not None
    ]
    for name, got, want in pairs:
        if got is None:
            return False, f"{name}: no gradient from the kernel"
        error = (got.float() - want).abs().max().item() / (want.abs().max().item() + 1e-6)
        worst.append((error, name))
    error, name = max(worst)
    return error <= tolerance, f"worst relative error {error:.3g} ({name})"


def choose_scan_backend(config, device):
    """Select each scan's implementation for this run; returns the name for the summary (scan_backend)."""
    kind = "ssd" if config.architecture == "mamba-2" else ("mamba3_siso" if config.mimo_rank == 1 else "mamba3_mimo")
    slot = "ssd" if kind == "ssd" else "mamba3"
    SCAN_BACKEND[slot] = "torch"
    if not (FUSED_KERNELS and device.type == "cuda"):
        return "torch"
    fused = _import_fused_scans()
    if kind not in fused:
        print(f"scan backend: mamba_ssm kernel for {kind} not importable; using the pure-PyTorch scan")
        return "torch"
    function, name = fused[kind]
    pure = {"ssd": ssd_scan, "mamba3_siso": mamba3_siso_scan, "mamba3_mimo": mamba3_mimo_scan}[kind]
    problem = _random_scan_problem(
        "ssd" if kind == "ssd" else "mamba3", 2, 4 * config.chunk_size, config.nheads, config.headdim, config.ngroups,
        config.d_state, config.mimo_rank, config.num_rope_angles, device, torch.bfloat16,
    )
    try:
        ok, detail = _fused_matches_pure(kind, function, pure, problem, config.chunk_size)
    except Exception as e:  # unsupported shape, compilation failure, ...
        ok, detail = False, f"{type(e).__name__}: {e}"
    if not ok:
        print(f"scan backend: mamba_ssm {name} disagrees with the pure scan ({detail}); using the pure-PyTorch scan")
        return "torch"
    print(f"scan backend: mamba_ssm {name} ({detail} against the pure scan)")
    FUSED_SCANS[slot] = function
    SCAN_BACKEND[slot] = "fused"
    return f"mamba_ssm:{name}"


def run_scan(slot, pure, *args, **kwargs):
    """Call the pure scan, or the fused kernel chosen for this slot (training/evaluation forward, no carried state)."""
    if SCAN_BACKEND[slot] == "fused" and kwargs.get("initial_state") is None:
        return FUSED_SCANS[slot](*args, **kwargs)
    return pure(*args, **kwargs)


# =====================================================================================================================
# Model
# =====================================================================================================================


class ModelConfig:
    def __init__(self, vocab_size, architecture=None, mimo_rank=None, depth=None, d_model=None, d_state=None,
                 headdim=None, expand=None, ngroups=None, d_conv=None, chunk_size=None, rope_fraction=None,
                 a_floor=None, outproj_norm=None, dt_min=None, dt_max=None, dt_init_floor=None, tie_embeddings=None):
        pick = lambda value, default: default if value is None else value  # noqa: E731
        self.vocab_size = vocab_size
        self.architecture = pick(architecture, ARCHITECTURE)
        if self.architecture not in ("mamba-2", "mamba-3"):
            raise ValueError(f"ARCHITECTURE must be 'mamba-2' or 'mamba-3', got {self.architecture!r}")
        self.mimo_rank = pick(mimo_rank, MIMO_RANK) if self.architecture == "mamba-3" else 1
        self.depth = pick(depth, DEPTH)
        self.d_model = pick(d_model, D_MODEL)
        self.d_state = pick(d_state, D_STATE)
        self.headdim = pick(headdim, HEADDIM)
        self.expand = pick(expand, EXPAND)
        self.ngroups = pick(ngroups, NGROUPS)
        self.d_conv = pick(d_conv, D_CONV)
        self.chunk_size = pick(chunk_size, CHUNK_SIZE)
        self.rope_fraction = pick(rope_fraction, ROPE_FRACTION)
        self.a_floor = pick(a_floor, A_FLOOR)
        self.outproj_norm = pick(outproj_norm, OUTPROJ_NORM)
        self.dt_min, self.dt_max = pick(dt_min, DT_MIN), pick(dt_max, DT_MAX)
        self.dt_init_floor = pick(dt_init_floor, DT_INIT_FLOOR)
        self.tie_embeddings = pick(tie_embeddings, TIE_EMBEDDINGS)
        self.d_inner = self.expand * self.d_model
        if self.d_inner % self.headdim:
            raise ValueError(f"EXPAND * D_MODEL ({self.d_inner}) must be a multiple of HEADDIM ({self.headdim})")
        self.nheads = self.d_inner // self.headdim
        if self.nheads % self.ngroups:
            raise ValueError(f"heads ({self.nheads}) must be a multiple of NGROUPS ({self.ngroups})")
        rotated_dims = int(self.d_state * self.rope_fraction) // 2 * 2  # rounded down to even
        self.num_rope_angles = max(1, rotated_dims // 2)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim (or over groups of it), computed in float32."""

    def __init__(self, dim, eps=1e-5, group_size=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size or dim

    def forward(self, x):
        dtype = x.dtype
        x = x.float().unflatten(-1, (-1, self.group_size))
        x = F.rms_norm(x, (self.group_size,), eps=self.eps).flatten(-2)
        return (x * self.weight).to(dtype)


def dt_bias_init(nheads, dt_min, dt_max, dt_floor):
    """Inverse softplus of dt ~ log-uniform in [dt_min, dt_max], floored: softplus(dt_bias) starts at that dt."""
    dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = torch.clamp(dt, min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2(nn.Module):
    """Mamba-2 block: in_proj -> causal depthwise conv + SiLU on (x, B, C) -> SSD scan -> gated RMSNorm -> out_proj."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.conv_dim = c.d_inner + 2 * c.ngroups * c.d_state
        self.in_proj = nn.Linear(c.d_model, c.d_inner + self.conv_dim + c.nheads, bias=False)  # [z, xBC, dt]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim, padding=c.d_conv - 1)
        self.dt_bias = nn.Parameter(dt_bias_init(c.nheads, c.dt_min, c.dt_max, c.dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(c.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(c.nheads))
        self.norm = RMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False)

    def _split(self, zxbcdt):
        c = self.config
        return torch.split(zxbcdt, [c.d_inner, self.conv_dim, c.nheads], dim=-1)

    def _mix(self, xBC, dt):
        """(conv output after SiLU, raw dt) -> scan inputs."""
        c = self.config
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        x = x.unflatten(-1, (c.nheads, c.headdim))
        B, C = B.unflatten(-1, (c.ngroups, c.d_state)), C.unflatten(-1, (c.ngroups, c.d_state))
        dt = F.softplus(dt.float() + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        return x, dt, A, B, C

    def forward(self, u, initial_state=None, return_state=False):
        c = self.config
        l = u.shape[1]
        z, xBC, dt = self._split(self.in_proj(u))
        conv_input = xBC.transpose(1, 2)
        xBC = F.silu(self.conv1d(conv_input)[..., :l].transpose(1, 2))
        x, dt, A, B, C = self._mix(xBC, dt)
        y, ssm_state = run_scan("ssd", ssd_scan, x, dt, A, B, C, c.chunk_size, D=self.D, initial_state=initial_state)
        y = self.norm(y.flatten(-2) * F.silu(z))
        out = self.out_proj(y)
        if not return_state:
            return out
        conv_state = F.pad(conv_input, (c.d_conv - 1, 0))[..., -(c.d_conv - 1):] if c.d_conv > 1 else conv_input[..., :0]
        return out, (conv_state, ssm_state)

    def empty_state(self, batch, device):
        c = self.config
        return (torch.zeros(batch, self.conv_dim, c.d_conv - 1, device=device),
                torch.zeros(batch, c.nheads, c.headdim, c.d_state, device=device))

    def step(self, u, state):
        """One token: u (b, d_model), state = (conv_state (b, conv_dim, d_conv - 1), ssm_state (b, h, p, n))."""
        conv_state, ssm_state = state
        z, xBC, dt = self._split(self.in_proj(u))
        window = torch.cat([conv_state, xBC[..., None]], dim=-1)  # (b, conv_dim, d_conv)
        xBC = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        x, dt, A, B, C = self._mix(xBC, dt)
        y, ssm_state = ssd_step(ssm_state, x, dt, A, B, C, D=self.D)
        y = self.norm(y.flatten(-2) * F.silu(z))
        return self.out_proj(y), (window[..., 1:], ssm_state)


class Mamba3(nn.Module):
    """Mamba-3 block (SISO, or MIMO of rank r): in_proj -> RMSNorm + bias on B, C -> rotated exponential-trapezoidal
    scan -> y * silu(z) (or grouped gated RMSNorm) [MIMO: per-rank gates, summed by mimo_o] -> out_proj."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        r, bc = c.mimo_rank, c.mimo_rank * c.ngroups * c.d_state
        # in_proj order: [z, x, B, C, dd_dt, dd_A, trap, angles]
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner + 2 * bc + 3 * c.nheads + c.num_rope_angles, bias=False)
        self.dt_bias = nn.Parameter(dt_bias_init(c.nheads, c.dt_min, c.dt_max, c.dt_init_floor))
        self.B_norm = RMSNorm(c.d_state)
        self.C_norm = RMSNorm(c.d_state)
        self.B_bias = nn.Parameter(torch.ones(c.nheads, r, c.d_state))
        self.C_bias = nn.Parameter(torch.ones(c.nheads, r, c.d_state))
        self.D = nn.Parameter(torch.ones(c.nheads))
        if r > 1:
            self.mimo_x = nn.Parameter(torch.full((c.nheads, r), 1.0 / r))
            self.mimo_z = nn.Parameter(torch.ones(c.nheads, r))
            self.mimo_o = nn.Parameter(torch.full((c.nheads, r), 1.0 / r))
        if c.outproj_norm:
            self.norm = RMSNorm(c.d_inner, group_size=c.headdim)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False)

    def _inputs(self, u):
        """in_proj and everything up to the scan; works for (b, l, d) and (b, d)."""
        c = self.config
        r, bc = c.mimo_rank, c.mimo_rank * c.ngroups * c.d_state
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
            self.in_proj(u), [c.d_inner, c.d_inner, bc, bc, c.nheads, c.nheads, c.nheads, c.num_rope_angles], dim=-1
        )
        z = z.unflatten(-1, (c.nheads, c.headdim))
        x = x.unflatten(-1, (c.nheads, c.headdim))
        B = self.B_norm(B.unflatten(-1, (r, c.ngroups, c.d_state)))
        C = self.C_norm(C.unflatten(-1, (r, c.ngroups, c.d_state)))
        dt = F.softplus(dd_dt.float() + self.dt_bias)
        adt = mamba3_decay_rate(dd_A, c.a_floor) * dt
        return z, x, B, C, adt, dt, trap, angles

    def _output(self, o, z):
        """Per-rank scan outputs o (..., r, h, p) and the gate z (..., h, p) -> out_proj input (..., d_inner)."""
        c = self.config
        if c.mimo_rank == 1:
            y = o.squeeze(-3)
            if c.outproj_norm:
                y = (self.norm(y.flatten(-2)) * F.silu(z.flatten(-2))).unflatten(-1, (c.nheads, c.headdim))
            else:
                y = y * F.silu(z)
        else:
            z_ranks = z.unsqueeze(-3) * self.mimo_z.transpose(0, 1)[..., None].to(z.dtype)  # (..., r, h, p)
            if c.outproj_norm:
                o = self.norm(o.flatten(-2)).unflatten(-1, (c.nheads, c.headdim))
            y = (o * F.silu(z_ranks) * self.mimo_o.transpose(0, 1)[..., None].to(o.dtype)).sum(-3)
        return y.flatten(-2)

    def forward(self, u, initial_state=None, return_state=False):
        c = self.config
        z, x, B, C, adt, dt, trap, angles = self._inputs(u)
        if c.mimo_rank == 1:
            y, state = run_scan("mamba3", mamba3_siso_scan, C[:, :, 0], B[:, :, 0], x, adt, dt, trap,
                                self.C_bias[:, 0], self.B_bias[:, 0], angles, self.D, c.chunk_size,
                                initial_state=initial_state)
            o = y[:, :, None]
        else:
            o, state = run_scan("mamba3", mamba3_mimo_scan, C, B, x, adt, dt, trap, self.C_bias, self.B_bias, angles,
                                self.D, self.mimo_x, c.chunk_size, initial_state=initial_state)
        out = self.out_proj(self._output(o, z))
        return (out, state) if return_state else out

    def empty_state(self, batch, device):
        c = self.config
        k_last = torch.zeros(batch, c.nheads, c.d_state, device=device)
        if c.mimo_rank > 1:
            k_last = torch.zeros(batch, c.mimo_rank, c.nheads, c.d_state, device=device)
        return (torch.zeros(batch, c.nheads, c.num_rope_angles, device=device),
                torch.zeros(batch, c.nheads, c.headdim, c.d_state, device=device),
                k_last, torch.zeros(batch, c.nheads, c.headdim, device=device))

    def step(self, u, state):
        """One token: u (b, d_model), state = (theta, S, k_last, v_last) as returned by forward(return_state=True)."""
        c = self.config
        z, x, B, C, adt, dt, trap, angles = self._inputs(u)
        if c.mimo_rank == 1:
            y, state = mamba3_siso_step(state, C[:, 0], B[:, 0], x, adt, dt, trap, self.C_bias[:, 0],
                                        self.B_bias[:, 0], angles, self.D)
            o = y[:, None]
        else:
            o, state = mamba3_mimo_step(state, C, B, x, adt, dt, trap, self.C_bias, self.B_bias, angles, self.D,
                                        self.mimo_x)
        return self.out_proj(self._output(o, z)), state


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x))."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model)
        self.mixer = Mamba2(config) if config.architecture == "mamba-2" else Mamba3(config)

    def forward(self, x, initial_state=None, return_state=False):
        if not return_state:
            return x + self.mixer(self.norm(x))
        out, state = self.mixer(self.norm(x), initial_state, return_state=True)
        return x + out, state

    def step(self, x, state):
        out, state = self.mixer.step(self.norm(x), state)
        return x + out, state


class MambaLM(nn.Module):
    """Token embedding -> DEPTH Mamba blocks -> RMSNorm -> lm_head. model(ids) -> logits (float32);
    model(ids, targets) -> mean cross-entropy. On CUDA the forward runs under bf16 autocast by itself, so the harness
    (which just calls model(ids)) scores the same computation that trained."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm_f = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.autocast_dtype = None  # torch.bfloat16 on CUDA (set by main), None: the parameters' dtype
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Embedding N(0, 0.02); projections U(+-1/sqrt(fan_in)); out_proj scaled by 1/sqrt(depth) so the residual
        stream does not grow with depth; lm_head tied to the embedding (or N(0, 0.02) when untied)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for block in self.layers:
            for linear in (block.mixer.in_proj, block.mixer.out_proj):
                bound = 1 / math.sqrt(linear.in_features)
                nn.init.uniform_(linear.weight, -bound, bound)
            block.mixer.out_proj.weight /= math.sqrt(self.config.depth)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def _autocast(self, device_type):
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def forward(self, input_ids, targets=None):
        with self._autocast(input_ids.device.type):
            x = self.embedding(input_ids)
            for block in self.layers:
                x = block(x)
            logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits.float()
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long())

    # --- inference with a cache: prefill the prompt with the chunked scans, then one step per token ---

    def prefill(self, input_ids):
        """Logits of the last position (b, V) and every layer's carried state after input_ids (b, l)."""
        with self._autocast(input_ids.device.type):
            x = self.embedding(input_ids)
            states = []
            for block in self.layers:
                x, state = block(x, return_state=True)
                states.append(state)
            return self.lm_head(self.norm_f(x[:, -1])).float(), states

    def step(self, token_ids, states):
        """One token per row: token_ids (b,) -> logits (b, V) and the updated states."""
        with self._autocast(token_ids.device.type):
            x = self.embedding(token_ids)
            new_states = []
            for block, state in zip(self.layers, states):
                x, state = block.step(x, state)
                new_states.append(state)
            return self.lm_head(self.norm_f(x)).float(), new_states

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after input_ids (b, l); temperature 0 = greedy. Returns (b, max_new_tokens)."""
        logits, states = self.prefill(input_ids)
        out = []
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            out.append(token)
            logits, states = self.step(token, states)
        return torch.stack(out, dim=1)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())  # tied weights counted once (parameters() deduplicates)


def estimate_flops_per_token(config):
    """Training FLOPs per token (forward + backward = 3x forward): 6 per matmul weight (projections and lm_head)
    plus the chunked scan's matmuls, counted per token for chunk Q, rank r, heads h, groups g:
    forward 2 Q r^2 n per group (q.k scores) + h (2 Q r^2 p (mixing @ v) + 4 r p n (chunk states, state reads))."""
    c = config
    bc = c.mimo_rank * c.ngroups * c.d_state
    if c.architecture == "mamba-2":
        in_features = c.d_inner + (c.d_inner + 2 * c.ngroups * c.d_state) + c.nheads
    else:
        in_features = 2 * c.d_inner + 2 * bc + 3 * c.nheads + c.num_rope_angles
    projection_weights = c.d_model * in_features + c.d_inner * c.d_model
    Q, r, n, p = c.chunk_size, c.mimo_rank, c.d_state, c.headdim
    scan_forward = 2 * Q * r * r * n * c.ngroups + c.nheads * (2 * Q * r * r * p + 4 * r * p * n)
    return 6 * (c.depth * projection_weights + c.d_model * c.vocab_size) + 3 * c.depth * scan_forward


# ---------------------------------------------------------------------------------------------------------------------
# Converting parameters from train_mamba_3_mlx.py (same names; layouts differ only for the conv weight)


def load_numpy_parameters(model, arrays):
    """Copy a flat {name: numpy array} (e.g. mlx.utils.tree_flatten of the MLX model's parameters, as numpy) into
    `model`. Names must match exactly, every parameter must be given, and shapes must agree up to the conv layout
    (MLX Conv1d stores (channels, width, 1), PyTorch (channels, 1, width))."""
    state = model.state_dict()
    missing = [name for name in state if name not in arrays and not _is_tied_alias(model, name)]
    unknown = [name for name in arrays if name not in state]
    if missing or unknown:
        raise KeyError(f"parameter names differ: missing {missing[:8]}, unknown {unknown[:8]}")
    with torch.no_grad():
        for name, array in arrays.items():
            value = torch.as_tensor(array)
            target = state[name]
            if name.endswith("conv1d.weight") and value.shape != target.shape:
                value = value.transpose(1, 2)  # (channels, width, 1) -> (channels, 1, width)
            if value.shape != target.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def _is_tied_alias(model, name):
    return name == "lm_head.weight" and model.config.tie_embeddings


# =====================================================================================================================
# Optimizer, schedule, training loop, summary
# =====================================================================================================================

NO_DECAY_NAMES = ("A_log", "dt_bias", "D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")


def make_optimizer(model, device):
    """AdamW; weight decay only on matrices and the embedding (not A_log, dt_bias, D, norms, biases, MIMO scales)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = ".norm" in name or "_norm." in name or name.startswith("norm_f")
        if param.ndim < 2 or leaf in NO_DECAY_NAMES or leaf == "bias" or is_norm:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(ADAM_BETA1, ADAM_BETA2), eps=ADAM_EPS,
                             fused=device.type == "cuda")


def lr_multiplier(progress):
    """Linear warmup over WARMUP_RATIO of the budget, constant, then linear warmdown to FINAL_LR_FRAC."""
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def to_device(array, device):
    """int32 numpy batch -> int64 tensor on device; pinned + non-blocking on CUDA so the copy overlaps compute (the
    caching host allocator keeps each pinned block alive until its copy has run)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True).long()
    return tensor.long()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    t_start = time.time()
    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name, peak_dtype = torch.cuda.get_device_name(device), "bfloat16"
    else:
        device_name, peak_dtype = f"CPU {platform.machine()}", "float32"

    tokenizer = prepare.Tokenizer.from_directory()
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size())
    model = MambaLM(config).to(device)
    model.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    scan_backend = choose_scan_backend(config, device)
    num_params = count_parameters(model)
    flops_per_token = estimate_flops_per_token(config)
    kind = config.architecture + (f" MIMO rank {config.mimo_rank}" if config.mimo_rank > 1 else "")
    print(f"model: {kind}, depth {config.depth}, d_model {config.d_model}, heads {config.nheads}x{config.headdim}, "
          f"d_state {config.d_state}, {num_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token")

    tokens_per_pass = DEVICE_BATCH_SIZE * prepare.MAX_SEQ_LEN
    grad_accum_steps = max(1, TOTAL_BATCH_SIZE // tokens_per_pass)
    tokens_per_step = grad_accum_steps * tokens_per_pass
    print(f"batch: {tokens_per_step} tokens per step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} x {prepare.MAX_SEQ_LEN}")

    optimizer = make_optimizer(model, device)
    for group in optimizer.param_groups:
        group["initial_lr"] = LEARNING_RATE
    train_model = torch.compile(model) if COMPILE and device.type == "cuda" else model
    peak, peak_source = prepare.peak_flops(device_name, peak_dtype, backend="torch")

    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, prepare.MAX_SEQ_LEN, "train")
    inputs, targets, epoch = next(train_loader)
    x, y = to_device(inputs, device), to_device(targets, device)

    progress_line = prepare.ProgressLine()
    step, total_training_time, smooth_loss = 0, 0.0, 0.0
    while True:
        synchronize(device)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            loss = train_model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
            inputs, targets, epoch = next(train_loader)  # overlaps the GPU work queued above
            x, y = to_device(inputs, device), to_device(targets, device)
        progress = min(total_training_time / prepare.TIME_BUDGET, 1.0)
        lr_scale = lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
        if GRAD_CLIP > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum_steps).item()  # the one host sync per step
        prepare.check_loss(train_loss, step)
        synchronize(device)
        dt = time.time() - t0
        if step >= UNTIMED_STEPS:
            total_training_time += dt

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        tokens_per_s = tokens_per_step / dt
        mfu = 100 * flops_per_token * tokens_per_s / peak
        remaining = max(0.0, prepare.TIME_BUDGET - total_training_time)
        progress_line.update(f"step {step:05d} ({100 * progress:.1f}%) | loss {debiased:.4f} | lr x{lr_scale:.2f} | "
                             f"{dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {mfu:.1f}% | epoch {epoch} | "
                             f"{remaining:.0f}s left")
        if step == 0:  # everything allocated at start-up stays; keep the collector from scanning it every step
            gc.collect()
            gc.freeze()
            gc.disable()
        step += 1
        if step > UNTIMED_STEPS and total_training_time >= prepare.TIME_BUDGET:
            break
    progress_line.close()
    gc.enable()

    timed_steps = step - UNTIMED_STEPS
    total_tokens = step * tokens_per_step
    mfu_percent = 100 * flops_per_token * tokens_per_step * timed_steps / total_training_time / peak
    val_bpb = prepare.evaluate_bpb(train_model, EVAL_BATCH_SIZE)
    prepare.print_summary({
        "architecture": ARCHITECTURE if config.mimo_rank == 1 else f"{ARCHITECTURE}-mimo{config.mimo_rank}",
        "preset": prepare.PRESET_NAME,
        "val_bpb": val_bpb,
        "training_seconds": total_training_time,
        "total_seconds": time.time() - t_start,
        "peak_memory_mb": peak_memory_mb(device),
        "mfu_percent": mfu_percent,
        "total_tokens_M": total_tokens / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": config.depth,
        "scan_backend": scan_backend,
    })


if __name__ == "__main__":
    main()
