"""
Train a Mamba-2 or Mamba-3 (SISO / MIMO) language model with PyTorch for a fixed time budget, then report val_bpb.

The PyTorch mirror of train_mamba_3_mlx.py: the same architectures, parameter names, hyperparameters, schedule,
time-budget rule and summary, scored by the same harness (prepare.evaluate_bpb). On CUDA: bf16 autocast,
torch.compile, and mamba_ssm's fused scans when they import and pass a start-up check; on CPU float32.

Run: `uv run --extra torch train_mamba.py`. Top to bottom: hyperparameters, the scans and blocks as the math reads
(the math: train_mamba_3_mlx.py's Mamba section; tests/test_train_mamba_torch.py holds every scan to its one-token
recurrence), the language model, optimizer, loop and summary, last the speed machinery.
"""

import contextlib
import gc
import math
import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import NamedTuple

t_script_start = time.time()  # total_seconds counts from here (imports included)

if __name__ == "__main__":  # a run (not an import by tests or benchmarks): the harness asks torch for the device
    os.environ.setdefault("AUTORESEARCH_BACKEND", "torch")
import prepare  # first: the harness (constants, presets, data, evaluation)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters: the values this run trains with (setup writes the preset's sizes here; program.md)

# Model
ARCHITECTURE = "mamba-3"  # "mamba-3" or "mamba-2"
DEPTH = 8  # number of mixer blocks
D_MODEL = 768  # width of the residual stream
D_STATE = 64  # SSM state size n per head (the "key/query" side); upstream's default is 128
HEADDIM = 64  # value-side width p per head; heads = EXPAND * D_MODEL / HEADDIM
EXPAND = 2  # inner width d_inner = EXPAND * D_MODEL
NGROUPS = 1  # B/C groups; heads share B and C within a group
D_CONV = 4  # Mamba-2 only: kernel width of the depthwise causal conv over x, B, C
CHUNK_SIZE = 64  # keys per scan chunk (MIMO: tokens x MIMO_RANK), speed only; upstream's Mamba-2 takes 256
DT_MIN = 0.001  # dt_bias is initialised so that softplus(dt_bias) is log-uniform in [DT_MIN, DT_MAX]
DT_MAX = 0.1
DT_INIT_FLOOR = 1e-4  # ... and at least this
A_FLOOR = 1e-4  # Mamba-3: the decay rate A is at most -A_FLOOR (never a perfect integrator)
ROPE_FRACTION = 0.5  # Mamba-3: fraction of the state dims rotated by the data-dependent angles
IS_MIMO = False  # Mamba-3: multi-input multi-output state update (rank MIMO_RANK) instead of SISO
MIMO_RANK = 4
IS_OUTPROJ_NORM = False  # Mamba-3: grouped RMSNorm before the output gate
MLP_EXPAND = 0  # hidden width factor of a gated (SwiGLU) MLP after each mixer; 0 = mixers only, as in Mamba

# Optimization (learning rates are peak values, scaled by the schedule)
DEVICE_BATCH_SIZE = 8  # rows per forward/backward pass
TOTAL_BATCH_SIZE = 8 * 2048  # tokens per optimizer step; a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN (grad accum)
OPTIMIZER = "muon"  # the projection matrices' optimizer: "muon" or "adamw" (the rest is always AdamW)
MATRIX_LR = 0.006  # projections (in_proj, out_proj, MLP). Measured on the cpu preset (README); other sizes keep it,
# since Muon's update is scaled to AdamW's RMS (its rate carries across widths to first order; no GPU has checked it)
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
COMPUTE_DTYPE = "auto"  # activations/matmuls: "float32", "bfloat16" or "auto" (bf16 autocast on CUDA, fp32 on CPU)
CHECKPOINT_BLOCKS = True  # recompute each block in the backward pass: live tensors of a float32 step on one
# 2048-token row SISO 2.7 -> 0.8 GB, MIMO 8.0 -> 1.6 GB (bench/bench_mamba_torch.py --only memory), one more forward
SEED = 42
EXPORT_UPSTREAM_DIR = ""  # a folder: after the run, the final weights and config in mamba_ssm's layout ("" = off)

# PyTorch runtime
COMPILE = True  # torch.compile the model on CUDA (on CPU the inductor C++ build costs more than it saves at test sizes)
FUSED_KERNELS = True  # on CUDA, use mamba_ssm's fused scans when they import and pass the start-up check


# =====================================================================================================================
# Scans, chunked: within a chunk of Q tokens a masked, decayed "attention" (batched matmuls); each chunk's end state;
# a (chunks x chunks) matmul passing states between chunks; each chunk's read of the state it received. O(l * Q), any
# length (the zero-padded tail leaves every state unchanged). Decays, cumulative sums and the passed states are
# float32 (float64 for float64 inputs; TF32 stays off), the big matmuls in the autocast dtype (bf16 on CUDA).
# =====================================================================================================================


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def segsum(a):
    """a (..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal, so that
    exp(segsum(a)) is the causal decay matrix. A cumulative sum of a masked copy: every entry sums only its own terms
    (no difference of two long cumulative sums, which loses float32 precision)."""
    T = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, T)  # rows[i, j] = a[i]
    strictly_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = rows.masked_fill(~strictly_below, 0.0).cumsum(dim=-2)  # sums[i, j] = sum of a[k] for j < k <= i
    on_or_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return sums.masked_fill(~on_or_below, float("-inf"))


def decayed_chunk_scan(q, k, v, log_decay, chunk_size, weight=None, initial_state=None, own_weight=None):
    """The linear recurrence under every block, per head, with a rank axis for MIMO (r = 1 otherwise):

        S_t = exp(log_decay_t) S_{t-1} + weight_t sum_j v_{t,j} k_{t,j}^T        (S is p x n, S_{-1} = initial)
        y_{t,i} = S_t q_{t,i}  -  (weight_t - own_weight_t) sum_j (q_{t,i} . k_{t,j}) v_{t,j}

    that is, a token's input reaches its own output with own_weight instead of weight (Mamba-3's shifted state needs
    this; own_weight None = weight). q, k (b, l, r, g, n): the h/g heads of a group share them; v (b, l, r, h, p);
    log_decay, weight, own_weight (b, l, h) (weight None = 1); initial_state (b, h, p, n) or None. Returns
    y (b, l, r, h, p) and the final state (b, h, p, n) float32.
    """
    b, l, r, g, n = q.shape
    h, p = v.shape[-2:]
    e = h // g  # heads per group
    Q = chunk_size
    acc = accumulation_dtype(v.dtype)
    if weight is None:
        weight = torch.ones_like(log_decay, dtype=acc)
    if own_weight is None:
        own_weight = weight
    pad = -l % Q
    if pad:  # zero tokens at the end: decay exp(0) = 1 and no input, so the state passes through unchanged
        q, k, v = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (q, k, v))
        log_decay, weight, own_weight = (F.pad(t, (0, 0, 0, pad)) for t in (log_decay, weight, own_weight))
    c = (l + pad) // Q
    # Layout: (batch, group, chunk) in front so that every contraction is a batched matmul. Ranks ride along with time
    # inside a chunk (Q*r rows); the heads of a group ride along with p (e*p columns) where the matmul is shared.
    q = q.reshape(b, c, Q, r, g, n).permute(0, 4, 1, 2, 3, 5).reshape(b, g, c, Q * r, n)
    k = k.reshape(b, c, Q, r, g, n).permute(0, 4, 1, 2, 3, 5).reshape(b, g, c, Q * r, n)
    v = v.reshape(b, c, Q, r, g, e, p).permute(0, 4, 1, 2, 3, 5, 6)  # (b, g, c, Q, r, e, p)
    a = log_decay.to(acc).reshape(b, c, Q, g, e).permute(0, 3, 4, 1, 2)  # (b, g, e, c, Q)
    a_cum = a.cumsum(dim=-1)  # log decay from the chunk start to each token
    # The input weights ride on the small (Q x Q) decay matrices and the end-of-chunk decays, never on a copy of v
    w, w_own = (t.to(acc).reshape(b, c, Q, g, e).permute(0, 3, 4, 1, 2) for t in (weight, own_weight))  # (b,g,e,c,Q)

    # 1. Within each chunk: y[t, i] += sum_{s <= t} exp(a[s+1] + ... + a[t]) w[s] (q[t, i] . k[s, j]) v[s, j], with
    #    w_own[t] in place of w[s] on the diagonal s = t
    scores = q @ k.transpose(-1, -2)  # (b, g, c, Qr, Qr): once per group
    diagonal = torch.eye(Q, dtype=torch.bool, device=q.device)
    decay = torch.where(diagonal, w_own[..., :, None], torch.exp(segsum(a)) * w[..., None, :])  # (b,g,e,c,Q,Q)
    mixing = scores.view(b, g, 1, c, Q, r, Q, r) * decay.view(b, g, e, c, Q, 1, Q, 1)
    mixing = mixing.reshape(b, g, e, c, Q * r, Q * r).to(v.dtype)
    v_rows = v.permute(0, 1, 5, 2, 3, 4, 6).reshape(b, g, e, c, Q * r, p)
    y_within = (mixing @ v_rows).view(b, g, e, c, Q, r, p).permute(0, 1, 3, 4, 5, 2, 6)  # (b, g, c, Q, r, e, p)

    # 2. Each chunk's own end state: sum_s exp(a[s+1] + ... + a[end]) v[s, j] k[s, j]^T
    decay_to_end = (torch.exp(a_cum[..., -1:] - a_cum) * w).permute(0, 1, 3, 4, 2)  # (b, g, c, Q, e)
    v_to_end = (v * decay_to_end[:, :, :, :, None, :, None].to(v.dtype)).reshape(b, g, c, Q * r, e * p)
    chunk_states = v_to_end.transpose(-1, -2) @ k  # (b, g, c, e*p, n)

    # 3. Pass states across chunks in float32, whatever the autocast (TF32 off, see above): entering[z] =
    #    sum_{z' <= z} decay * own[z']
    with torch.autocast(q.device.type, enabled=False):
        chunk_states = chunk_states.to(acc).view(b, g, c, e, p, n).permute(0, 1, 3, 2, 4, 5)  # (b, g, e, c, p, n)
        if initial_state is None:
            first = chunk_states.new_zeros(b, g, e, 1, p, n)
        else:
            first = initial_state.to(acc).reshape(b, g, e, 1, p, n)
        states = torch.cat([first, chunk_states], dim=3)  # index 0: the initial state; z: chunk z-1's own state
        chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, g, e, c+1, c+1)
        states = (chunk_decay @ states.reshape(b, g, e, c + 1, p * n)).view(b, g, e, c + 1, p, n)
    entering, final_state = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. Each chunk reads the state it received: y[t, i] += exp(a[start] + ... + a[t]) entering q[t, i]
    entering = entering.permute(0, 1, 3, 5, 2, 4).reshape(b, g, c, n, e * p).to(q.dtype)
    y_carried = (q @ entering).view(b, g, c, Q, r, e, p)
    y_carried = y_carried * torch.exp(a_cum).permute(0, 1, 3, 4, 2)[:, :, :, :, None, :, None]

    y = (y_within + y_carried).permute(0, 2, 3, 4, 1, 5, 6).reshape(b, c * Q, r, h, p)[:, :l]
    return y, final_state.reshape(b, h, p, n)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-2 (SSD), in the conventions of upstream's ssd_minimal_discrete and train_mamba_3_mlx.py: X = x * dt (b l h p),
# A = A * dt (b l h) (<= 0), B and C (b l g n). Per head: S_t = exp(A_t) S_{t-1} + X_t B_t^T, Y_t = S_t C_t.


def ssd_scan(X, A, B, C, chunk_size, initial_states=None):
    """Chunked SSD. Returns (Y (b l h p) in X's dtype, final state (b h p n) float32)."""
    Y, final_state = decayed_chunk_scan(C[:, :, None], B[:, :, None], X[:, :, None], A, chunk_size,
                                        initial_state=initial_states)
    return Y[:, :, 0].to(X.dtype), final_state


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3, in the conventions of train_mamba_3_mlx.py (and of upstream's kernels):
#   theta_t = (theta_{t-1} + pi tanh(Angles_t) DT_t) mod 2 pi per head and angle; q, k (after their per-head bias) turn
#   by +theta_t on the first 2a dims, pairing adjacent dims: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos);
#   S_t = alpha_t S_{t-1} + beta_t sum_i v_{t-1,i} k~_{t-1,i}^T + gamma_t sum_i v_{t,i} k~_{t,i}^T,
#   alpha_t = exp(ADT_t), beta_t = (1 - lam_t) DT_t alpha_t, gamma_t = lam_t DT_t, lam_t = sigmoid(Trap_t);
#   o_{t,i} = S_t q~_{t,i} + D v_{t,i}, v_{t,i} = x_t * MIMO_V[h, i] (SISO: r = 1, v = x), gated by
#   silu(z_t * MIMO_Z[h, i]) and summed with MIMO_O[h, i] (SISO: y_t = o_t * silu(z_t)).
# The state of a sequence is (theta (b h a), S (b h p n), last rotated k (b h n) or (b r h n), last x (b h p)).
#
# Chunked form (derived from the step form, proven against it by the tests). With sigma_t = (1 - lam_t) DT_t (so
# beta_t = alpha_t sigma_t), the shifted state S'_t = S_t + sigma_{t+1} sum_i v_{t,i} k~_{t,i}^T obeys the plain
# decayed recurrence S'_t = alpha_t S'_{t-1} + w_t sum_i v_{t,i} k~_{t,i}^T with weight w_t = gamma_t + sigma_{t+1},
# and S_t q = S'_t q - sigma_{t+1} sum_j (q . k~_{t,j}) v_{t,j}. So the scan is decayed_chunk_scan with weight w and
# own weight w_t - sigma_{t+1} = gamma_t, plus D v. A carried (k~, x) enters as
# S'_{-1} = S_{-1} + sigma_0 sum_i v_{-1,i} k~_{-1,i}^T; after the last token sigma = 0 (the next token is unknown),
# so the final S' is the true final state.


def rotate_pairs(x, theta):
    """Turn adjacent dim pairs (2j, 2j+1) of x (..., n) by theta (..., a) for j < a; other dims pass through (SISO:
    upstream's Triton kernels)."""
    a = theta.shape[-1]
    x0, x1 = x[..., : 2 * a].unflatten(-1, (a, 2)).unbind(-1)
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    turned = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., 2 * a :]], dim=-1)


def rotate_halves(x, theta):
    """Turn the dim pairs (j, n/2 + j) of x (..., n) by theta (..., a) for j < a; other dims pass through (MIMO:
    upstream's TileLang kernel and its decode step pair the halves)."""
    a, half = theta.shape[-1], x.shape[-1] // 2
    x0, x1 = x[..., :a], x[..., half : half + a]
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    return torch.cat([x0 * cos - x1 * sin, x[..., a:half], x0 * sin + x1 * cos, x[..., half + a :]], dim=-1)


def cumulative_angles(increments, initial_angle, chunk_size):
    """theta_t = (theta_{-1} + sum_{u <= t} increments_u) mod 2 pi along dim 1 of (b, l, h, a): summed within chunks
    (float32), then over the chunk totals wrapped mod 2 pi (float64), so that no float32 sum grows with the length."""
    b, l = increments.shape[:2]
    pad = -l % chunk_size
    chunks = F.pad(increments, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk_size))  # (b, c, Q, h, a)
    within = chunks.cumsum(dim=2)
    totals = torch.remainder(chunks.double().sum(dim=2), 2 * math.pi)  # float64: only a few numbers per chunk
    offsets = F.pad(totals.cumsum(dim=1)[:, :-1], (0, 0, 0, 0, 1, 0))  # what the chunks before each one add
    if initial_angle is not None:
        offsets = offsets + initial_angle[:, None]
    offsets = torch.remainder(offsets, 2 * math.pi).to(within.dtype)
    theta = torch.remainder(within + offsets[:, :, None], 2 * math.pi)
    return theta.flatten(1, 2)[:, :l]


def _mamba3_heads(X, bias):
    """Q or K (b, l, r, g, n) plus the per-head bias (h, r, n) -> (b, l, r, h, n); head = group * (h/g) + j."""
    h = bias.shape[0]
    return X.repeat_interleave(h // X.shape[-2], dim=-2) + bias.transpose(0, 1).to(X.dtype)


class Mamba3Inputs(NamedTuple):
    """A Mamba-3 scan's (or one token's) inputs, as mamba3_siso_scan (mamba3_siso_step) describes them."""
    Q: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor
    ADT: torch.Tensor
    DT: torch.Tensor
    Trap: torch.Tensor
    Q_bias: torch.Tensor
    K_bias: torch.Tensor
    Angles: torch.Tensor
    D: torch.Tensor | None = None
    Z: torch.Tensor | None = None


class MimoWeights(NamedTuple):
    """MIMO's per-rank weights (h r p): x up to the rank values, z up to the rank gates (None without Z), the outputs
    down (None keeps the ranks apart)."""
    up_x: torch.Tensor
    up_z: torch.Tensor | None = None
    down: torch.Tensor | None = None


def _mamba3_scan(inputs, mimo, initial_states, chunk_size):
    """Shared body of the SISO (mimo None) and MIMO (mimo a MimoWeights) chunked scans, with the rank axis always
    present inside: Q, K (b l r g n), Q_bias, K_bias (h r n), k state (b r h n)."""
    s = inputs
    b, l, h, p = s.V.shape
    acc = accumulation_dtype(s.V.dtype)
    DT, ADT = s.DT.to(acc).transpose(1, 2), s.ADT.to(acc).transpose(1, 2)  # (b l h) from here on
    lam = torch.sigmoid(s.Trap.to(acc)).transpose(1, 2)
    gamma = lam * DT  # weight of a token's own input
    sigma = DT - gamma  # (1 - lam) DT: beta without its alpha, the previous token's weight in the next step
    sigma_next = F.pad(sigma[:, 1:], (0, 0, 0, 1))  # sigma_{t+1}; 0 after the last token

    angle0 = None if initial_states is None else initial_states[0].to(acc)
    theta = cumulative_angles(math.pi * torch.tanh(s.Angles.to(acc)) * DT[..., None], angle0, chunk_size)  # (b l h a)
    rotate = rotate_pairs if mimo is None else rotate_halves  # upstream's pairings
    q = rotate(_mamba3_heads(s.Q, s.Q_bias), theta[:, :, None])  # (b, l, r, h, n)
    k = rotate(_mamba3_heads(s.K, s.K_bias), theta[:, :, None])
    def up(x):  # x (..., h, p) -> per-rank values (..., r, h, p)
        return x.unsqueeze(-3) if mimo is None else x.unsqueeze(-3) * mimo.up_x.transpose(0, 1).to(x.dtype)

    v = up(s.V)  # (b, l, r, h, p)

    start_state = None
    if initial_states is not None:
        _, S_prev, k_prev, x_prev = initial_states
        carried = torch.einsum("brhp,brhn->bhpn", up(x_prev).to(acc), k_prev.to(acc))
        start_state = S_prev.to(acc) + sigma[:, 0, :, None, None] * carried

    # The shifted term must not reach its own token: its weight there is gamma_t (inside the chunk's decay matrix)
    o, final_S = decayed_chunk_scan(q, k, v, ADT, chunk_size, weight=gamma + sigma_next, initial_state=start_state,
                                    own_weight=gamma)
    if s.D is not None:
        o = o + s.D.to(o.dtype)[:, None] * v
    if mimo is None:
        o = o[:, :, 0]
        if s.Z is not None:
            o = o * F.silu(s.Z.to(o.dtype))
    else:
        if s.Z is not None:
            o = o * F.silu(s.Z.unsqueeze(2).to(o.dtype) * mimo.up_z.transpose(0, 1).to(o.dtype))
        if mimo.down is not None:
            o = (o * mimo.down.transpose(0, 1).to(o.dtype)).sum(dim=2)
    final_states = (theta[:, -1], final_S, k[:, -1], s.V[:, -1].to(acc))
    return o.to(s.V.dtype), final_states


def mamba3_siso_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, initial_states=None,
                     chunk_size=64):
    """Mamba-3 SISO scan, chunked (any l >= 1). Q, K (b l g n) after their RMSNorm, before bias and rotation;
    V, Z (b l h p); ADT (= A*dt), DT, Trap (before sigmoid) (b h l); Q_bias, K_bias (h n); Angles (b l h a) or (b l 1 a)
    before tanh; D (h); initial_states (angle (b h a), S (b h p n), k (b h n), x (b h p)) or None.
    Returns (out (b l h p) in V's dtype, final states like initial_states, float32)."""
    if initial_states is not None:
        angle, S, k_last, x_last = initial_states
        initial_states = (angle, S, k_last[:, None], x_last)
    inputs = Mamba3Inputs(Q[:, :, None], K[:, :, None], V, ADT, DT, Trap, Q_bias[:, None], K_bias[:, None], Angles,
                          D, Z)
    out, (angle, S, k_last, x_last) = _mamba3_scan(inputs, None, initial_states, chunk_size)
    return out, (angle, S, k_last[:, 0], x_last)


def mamba3_mimo_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_Z=None, MIMO_O=None, D=None,
                     Z=None, initial_states=None, chunk_size=16):
    """Mamba-3 MIMO scan of rank r: as mamba3_siso_scan, except Q, K (b l r g n), Q_bias, K_bias (h r n), MIMO_V,
    MIMO_Z, MIMO_O (h r p) (MIMO_Z needed when Z is given), and the carried k is (b r h n). Returns out (b l h p), or
    the per-rank outputs (b l r h p) when MIMO_O is None."""
    inputs = Mamba3Inputs(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    return _mamba3_scan(inputs, MimoWeights(MIMO_V, MIMO_Z, MIMO_O), initial_states, chunk_size)


# =====================================================================================================================
# Model (parameter names and shapes as in train_mamba_3_mlx.py, so weights convert by name)
# =====================================================================================================================


def inverse_softplus(y):
    return y + torch.log(-torch.expm1(-y))  # softplus(inverse_softplus(y)) = y for y > 0


def init_dt_bias(nheads, dt_min, dt_max, dt_init_floor):
    """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max], floored at dt_init_floor (upstream)."""
    log_dt = torch.empty(nheads).uniform_(math.log(dt_min), math.log(dt_max))
    return inverse_softplus(torch.clamp(torch.exp(log_dt), min=dt_init_floor))


def rms_norm(x, weight=None, eps=1e-5):
    """RMSNorm over the last dim, computed in float32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)


def linear(in_features, out_features):
    """A bias-free projection with MLX's default init, uniform(+-1/sqrt(in_features)) (torch's default too)."""
    return nn.Linear(in_features, out_features, bias=False)


class CausalConv1d(nn.Module):
    """Depthwise causal conv with bias: out_t = bias + sum_k weight[k] x_{t-K+1+k}, weight (K, channels) as in the MLX
    script; K shifted multiply-adds (torch.compile fuses them; cuDNN is slow here). Init uniform(+-1/sqrt(K))."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nn.Parameter(torch.empty(kernel_size, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x):  # x (b, l, c)
        K, l = self.weight.shape[0], x.shape[1]
        w = self.weight.to(x.dtype)
        x = F.pad(x, (0, 0, K - 1, 0))
        out = self.bias.to(x.dtype) + w[K - 1] * x[:, K - 1 :]
        for k in range(K - 1):
            out = out + w[k] * x[:, k : k + l]
        return out

    def step(self, x, conv_state):  # x (b, c), conv_state (b, K-1, c): the previous K-1 inputs
        window = torch.cat([conv_state, x[:, None]], dim=1)  # (b, K, c)
        out = self.bias + (window * self.weight).sum(dim=1)
        return out.to(x.dtype), window[:, 1:]


class Mamba2(nn.Module):
    """in_proj -> [z | xBC | dt], causal depthwise conv + SiLU on xBC, SSD scan with skip D, grouped RMSNorm of
    y * silu(z) (gate first, then norm), out_proj."""

    def __init__(self, d_model, d_state, headdim, expand, ngroups, d_conv, chunk_size, dt_min, dt_max, dt_init_floor):
        super().__init__()
        self.d_inner = expand * d_model
        assert self.d_inner % headdim == 0, "expand * d_model must be a multiple of headdim"
        self.nheads = self.d_inner // headdim
        assert self.nheads % ngroups == 0, "heads must split evenly into groups"
        self.headdim, self.d_state, self.ngroups, self.chunk_size = headdim, d_state, ngroups, chunk_size
        self.conv_dim = self.d_inner + 2 * ngroups * d_state  # x, B, C go through the conv together
        self.in_proj = linear(d_model, self.d_inner + self.conv_dim + self.nheads)  # z | xBC | dt
        self.conv = CausalConv1d(self.conv_dim, d_conv)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1.0, 16.0)))  # A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = linear(self.d_inner, d_model)

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _scan_inputs(self, xBC, dt):
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B, C = B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state))
        dt = F.softplus(dt.float() + self.dt_bias)
        return x, dt, -torch.exp(self.A_log.float()), B, C

    def _output(self, y, z):
        """Grouped gated RMSNorm (norm after gate, one group per B/C group, as upstream), then out_proj."""
        y = (y * F.silu(z)).unflatten(-1, (self.ngroups, -1))
        y = rms_norm(y).flatten(-2) * self.norm_weight.to(y.dtype)
        return self.out_proj(y)

    def forward(self, u, initial_states=None, return_state=False):  # u (b, l, d_model) -> (b, l, d_model)
        z, xBC_in, dt = self._split(self.in_proj(u))
        K = self.conv.weight.shape[0]
        if initial_states is None:
            conv_in, conv_out = xBC_in, self.conv(xBC_in)
        else:  # continue after a carried conv window: run the conv over [window, inputs], keep the new positions
            conv_in = torch.cat([initial_states[0].to(xBC_in.dtype), xBC_in], dim=1)
            conv_out = self.conv(conv_in)[:, K - 1 :]
        x, dt, A, B, C = self._scan_inputs(F.silu(conv_out), dt)
        if "mamba-2" in FUSED and initial_states is None and not return_state:  # a fused kernel (speed section)
            y = FUSED["mamba-2"](x, dt, A, B, C, self.chunk_size, self.D)
        else:
            y, ssm_state = ssd_scan(x * dt[..., None].to(x.dtype), A * dt, B, C, self.chunk_size,
                                    None if initial_states is None else initial_states[1])
            y = y + x * self.D[:, None].to(x.dtype)
        out = self._output(y.flatten(-2), z)
        if not return_state:
            return out
        conv_state = F.pad(conv_in, (0, 0, K - 1, 0))[:, conv_in.shape[1] :]  # the last K-1 inputs
        conv_state = conv_state.to(accumulation_dtype(conv_in.dtype))
        return out, (conv_state, ssm_state)

    def init_state(self, batch_size, device=None):
        K = self.conv.weight.shape[0]
        return (torch.zeros(batch_size, K - 1, self.conv_dim, device=device),
                torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device))

    def step(self, u, state):  # u (b, d_model) -> (y (b, d_model), state): one token of recurrent decode
        conv_state, ssm_state = state
        z, xBC, dt = self._split(self.in_proj(u))
        xBC, conv_state = self.conv.step(xBC, conv_state)
        x, dt, A, B, C = self._scan_inputs(F.silu(xBC), dt)
        y, ssm_state = ssd_step(x * dt[..., None].to(x.dtype), A * dt, B, C, ssm_state)  # speed section
        y = y + x * self.D[:, None].to(x.dtype)
        return self._output(y.flatten(-2), z), (conv_state, ssm_state)

    def scan_flops_per_token(self):
        """Forward FLOPs per token of the scan's matmuls (MFU), as in the MLX script: per group scores 2Qn; per head
        the masked product 2Qp, the chunk state 2pn, reading the carried state 2pn."""
        Q, n, p = self.chunk_size, self.d_state, self.headdim
        return 2 * Q * n * self.ngroups + self.nheads * (2 * Q * p + 4 * p * n)


def heavy_tail(u):
    """f(u) = 1 + u for u >= 0, 1 / (1 - u) for u < 0, as (1 + relu(u)) / (1 + relu(-u)): one expression, so neither
    branch can put an inf into the other's gradient."""
    return (1 + F.relu(u)) / (1 + F.relu(-u))


class Mamba3(nn.Module):
    """in_proj -> [z, x, B, C, dd_dt, dd_A, trap, angles]; RMSNorm of B and C over n plus per-head (and per-rank)
    biases; dt = softplus(dd_dt + dt_bias); A = min(-f(dd_A), -a_floor); the rotated exponential-trapezoidal scan with
    skip D; y * silu(z) (or a per-head RMSNorm before the gate with is_outproj_norm); out_proj. MIMO (rank r) projects
    x and z up per rank with mimo_x, mimo_z and the per-rank outputs down with mimo_o. No conv."""

    def __init__(self, d_model, d_state=128, headdim=64, expand=2, ngroups=1, rope_fraction=0.5, a_floor=1e-4,
                 is_mimo=False, mimo_rank=4, is_outproj_norm=False, chunk_size=None, dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4):
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
        self.in_proj = linear(d_model, sum(self.split_sizes))  # z | x | B | C | dd_dt | dd_A | trap | angles
        self.dt_bias = nn.Parameter(init_dt_bias(h, dt_min, dt_max, dt_init_floor))
        self.B_bias = nn.Parameter(torch.ones(h, r, n))  # per-head, per-rank biases after the B/C norms (init 1)
        self.C_bias = nn.Parameter(torch.ones(h, r, n))
        self.B_norm_weight = nn.Parameter(torch.ones(n))
        self.C_norm_weight = nn.Parameter(torch.ones(n))
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.ones(h, r, headdim) / r)
            self.mimo_z = nn.Parameter(torch.ones(h, r, headdim))
            self.mimo_o = nn.Parameter(torch.ones(h, r, headdim) / r)
        self.D = nn.Parameter(torch.ones(h))
        if is_outproj_norm:
            self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = linear(self.d_inner, d_model)

    def _project(self, u):
        """u (b, l, d_model) -> the scan's inputs (all but the parameters) and the gate z (b, l, h, p)."""
        b, l, _ = u.shape
        r, g, h, n, p = self.mimo_rank, self.ngroups, self.nheads, self.d_state, self.headdim
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(self.in_proj(u), self.split_sizes, dim=-1)
        B = rms_norm(B.reshape(b, l, r, g, n), self.B_norm_weight)
        C = rms_norm(C.reshape(b, l, r, g, n), self.C_norm_weight)
        if not self.is_mimo:
            B, C = B[:, :, 0], C[:, :, 0]
        A = torch.clamp(-heavy_tail(dd_A.float()), max=-self.a_floor)
        DT = F.softplus(dd_dt.float() + self.dt_bias)
        inputs = dict(Q=C, K=B, V=x.reshape(b, l, h, p), ADT=(A * DT).transpose(1, 2), DT=DT.transpose(1, 2),
                      Trap=trap.float().transpose(1, 2), Angles=angles.float()[:, :, None])
        return inputs, z.reshape(b, l, h, p)

    def _mimo_weights(self, gate_in_scan):
        return dict(MIMO_V=self.mimo_x, MIMO_Z=self.mimo_z, MIMO_O=self.mimo_o if gate_in_scan else None)

    def _gate_and_norm(self, y, z):
        """With is_outproj_norm: a per-head RMSNorm with its own gate (per rank for MIMO, then mimo_o down)."""
        weight = self.norm_weight.reshape(self.nheads, self.headdim)
        if self.is_mimo:
            z_ranks = z.unsqueeze(-3) * self.mimo_z.transpose(0, 1).to(z.dtype)  # (..., r, h, p)
            y = rms_norm(y.float()) * weight * F.silu(z_ranks.float())
            return (y * self.mimo_o.transpose(0, 1)).sum(dim=-3)
        return rms_norm(y.float()) * weight * F.silu(z.float())

    def _scan(self, inputs, z, initial_states):
        """The scan plus the output gate/norm: -> (y (b, l, d_inner), final states)."""
        b, l = z.shape[:2]
        gate_in_scan = not self.is_outproj_norm
        kwargs = dict(D=self.D, Z=z if gate_in_scan else None)
        if self.is_mimo:
            kwargs.update(self._mimo_weights(gate_in_scan), Q_bias=self.C_bias, K_bias=self.B_bias)
            pure = mamba3_mimo_scan
        else:
            kwargs.update(Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0])
            pure = mamba3_siso_scan
        if "mamba-3" in FUSED and initial_states is None:  # a fused kernel (speed section)
            y, states = FUSED["mamba-3"](**inputs, **kwargs, chunk_size=self.chunk_size), None
        else:
            y, states = pure(**inputs, **kwargs, initial_states=initial_states, chunk_size=self.chunk_size)
        if self.is_outproj_norm:
            y = self._gate_and_norm(y, z)
        return y.reshape(b, l, self.d_inner).to(z.dtype), states

    def forward(self, u, initial_states=None, return_state=False):  # u (b, l, d_model) -> (b, l, d_model)
        inputs, z = self._project(u)
        y, states = self._scan(inputs, z, initial_states)
        return (self.out_proj(y), states) if return_state else self.out_proj(y)

    def init_state(self, batch_size, device=None):
        """(angle (b h a), S (b h p n), last rotated k (b h n) or (b r h n) for MIMO, last x (b h p)), float32."""
        h, n, p = self.nheads, self.d_state, self.headdim
        k_shape = (batch_size, h, n) if not self.is_mimo else (batch_size, self.mimo_rank, h, n)
        return (torch.zeros(batch_size, h, self.num_rope_angles, device=device),
                torch.zeros(batch_size, h, p, n, device=device), torch.zeros(k_shape, device=device),
                torch.zeros(batch_size, h, p, device=device))

    def step(self, u, state):  # u (b, d_model) -> (y (b, d_model), state): one token of recurrent decode
        inputs, z = self._project(u[:, None])
        token = {name: value[:, :, 0] if name in ("ADT", "DT", "Trap") else value[:, 0]
                 for name, value in inputs.items()}
        z = z[:, 0]
        gate_in_step = not self.is_outproj_norm
        kwargs = dict(D=self.D, Z=z if gate_in_step else None, state=state)
        if self.is_mimo:
            kwargs.update(self._mimo_weights(gate_in_step), Q_bias=self.C_bias, K_bias=self.B_bias)
            step = mamba3_mimo_step  # speed section
        else:
            kwargs.update(Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0])
            step = mamba3_siso_step  # speed section
        y, state = step(**token, **kwargs)
        if self.is_outproj_norm:
            y = self._gate_and_norm(y, z)
        return self.out_proj(y.reshape(u.shape[0], self.d_inner).to(u.dtype)), state

    def scan_flops_per_token(self):
        """Forward FLOPs per token of the scan's matmuls (MFU), as in the MLX script, per head: scores 2crrn, the
        masked product 2crrp, the chunk state 2rpn, reading the carried state 2rpn."""
        c, r, n, p = self.chunk_size, self.mimo_rank, self.d_state, self.headdim
        return self.nheads * (2 * c * r * r * (n + p) + 4 * r * p * n)


# ---------------------------------------------------------------------------------------------------------------------
# The language model: a tied token embedding, DEPTH pre-norm residual blocks x = x + mixer(norm(x)) (with MLP_EXPAND > 0
# also x = x + mlp(norm(x))), a final RMSNorm, logits against the embedding matrix.


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
    checkpoint_blocks: bool = CHECKPOINT_BLOCKS

    @property
    def tokens_per_chunk(self):
        return max(1, self.chunk_size // self.mimo_rank) if self.architecture == "mamba-3" and self.is_mimo else \
            self.chunk_size

    @property
    def nheads(self):
        return self.expand * self.d_model // self.headdim

    @property
    def num_rope_angles(self):
        return int(self.d_state * self.rope_fraction) // 2  # pairs of the rotated (even) share of the state dims


def make_mixer(c):
    if c.architecture == "mamba-2":
        return Mamba2(c.d_model, c.d_state, c.headdim, c.expand, c.ngroups, c.d_conv, c.chunk_size,
                      c.dt_min, c.dt_max, c.dt_init_floor)
    if c.architecture == "mamba-3":
        return Mamba3(c.d_model, c.d_state, c.headdim, c.expand, c.ngroups, c.rope_fraction, c.a_floor, c.is_mimo,
                      c.mimo_rank, c.is_outproj_norm, c.tokens_per_chunk, c.dt_min, c.dt_max, c.dt_init_floor)
    raise ValueError(f"Unknown ARCHITECTURE {c.architecture!r}: use 'mamba-3' or 'mamba-2'.")


class RMSNorm(nn.Module):
    def __init__(self, dims, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class GatedMLP(nn.Module):
    """SwiGLU: fc2(h * silu(gate)) with [h | gate] = fc1(x)."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = linear(d_model, 2 * hidden)
        self.fc2 = linear(hidden, d_model)

    def forward(self, x):
        h, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(h * F.silu(gate))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model)
        self.mixer = make_mixer(config)
        if config.mlp_expand > 0:
            self.mlp_norm = RMSNorm(config.d_model)
            self.mlp = GatedMLP(config.d_model, config.mlp_expand * config.d_model)

    def _mlp(self, x):
        return x + self.mlp(self.mlp_norm(x)) if hasattr(self, "mlp") else x

    def forward(self, x, initial_states=None, return_state=False):
        if not return_state:
            return self._mlp(x + self.mixer(self.norm(x)))
        y, state = self.mixer(self.norm(x), initial_states, return_state=True)
        return self._mlp(x + y), state

    def step(self, x, state):
        y, state = self.mixer.step(self.norm(x), state)
        return self._mlp(x + y), state


class MambaLM(nn.Module):
    """model(ids) -> logits (b, l, vocab) float32; model(ids, targets) -> mean cross-entropy. The forward enters the
    autocast itself (bf16 on CUDA), so the harness, which just calls model(ids), scores what was trained."""

    def __init__(self, config, compute_dtype=torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # float32, or bfloat16 = autocast
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm_f = RMSNorm(config.d_model)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """Upstream (mamba_ssm) init, as the MLX script: embedding N(0, 0.02); linear layers keep
        uniform(+-1/sqrt(fan_in)); the projections that write into the residual stream (out_proj, fc2) are scaled by
        1/sqrt(residual writes per layer * depth) so the stream's variance does not grow with depth. The mixers
        initialise their own A, dt, D."""
        nn.init.normal_(self.embed.weight, std=0.02)
        writes = self.config.depth * (2 if self.config.mlp_expand > 0 else 1)
        for layer in self.layers:
            residual_writers = [layer.mixer.out_proj] + ([layer.mlp.fc2] if hasattr(layer, "mlp") else [])
            for proj in residual_writers:
                proj.weight /= math.sqrt(writes)

    def _autocast(self, device):
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(device.type, dtype=self.compute_dtype if enabled else torch.bfloat16, enabled=enabled)

    def _logits(self, x):
        return self.norm_f(x) @ self.embed.weight.to(x.dtype).T  # tied unembedding

    def forward(self, input_ids, targets=None):  # (b, l) int -> logits (b, l, vocab) float32, or the loss
        with self._autocast(input_ids.device):
            x = self.embed(input_ids)
            for layer in self.layers:
                if self.config.checkpoint_blocks and torch.is_grad_enabled():
                    x = checkpoint(layer, x, use_reentrant=False)  # the backward recomputes what the block made from x
                else:
                    x = layer(x)
            logits = self._logits(x).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten().long())

    def init_cache(self, batch_size, device=None):
        return [layer.mixer.init_state(batch_size, device) for layer in self.layers]

    def prefill(self, input_ids, cache=None):
        """Chunked forward over a prompt (b, l) from `cache` (or fresh states): (last logits (b, vocab), cache)."""
        with self._autocast(input_ids.device):
            x = self.embed(input_ids)
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, state = layer(x, None if cache is None else cache[i], return_state=True)
                new_cache.append(state)
            return self._logits(x[:, -1]).float(), new_cache

    def step(self, token_ids, cache):  # (b,) int -> (logits (b, vocab), cache): one token, recurrent
        with self._autocast(token_ids.device):
            x = self.embed(token_ids)
            new_cache = []
            for layer, state in zip(self.layers, cache):
                x, state = layer.step(x, state)
                new_cache.append(state)
            return self._logits(x).float(), new_cache

    def flops_per_token(self):
        """Training FLOPs per token (MFU), as in the MLX script: 6 * (linear and conv weights, the embedding once, as
        the unembedding) + 3 * the scans' forward FLOPs."""
        weights = [self.embed.weight] + [p for _, p in matrix_parameters(self)]
        weights += [m.weight for m in self.modules() if isinstance(m, CausalConv1d)]
        scan = sum(layer.mixer.scan_flops_per_token() for layer in self.layers)
        return 6 * sum(w.numel() for w in weights) + 3 * scan


def matrix_parameters(model):
    """(name, weight) of every projection matrix (the linear layers' weights): Muon's (or MATRIX_LR's) group."""
    return [(f"{path}.weight", m.weight) for path, m in model.named_modules() if isinstance(m, nn.Linear)]


# =====================================================================================================================
# Optimizer, schedule, training loop, summary
# =====================================================================================================================


def orthogonalise(g):
    """The MLX script's orthogonalise: MUON_NS_STEPS quintic Newton-Schulz iterations towards U V^T of g = U S V^T,
    float32 on the CPU, bf16 on GPUs."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.float32 if g.device.type == "cpu" else torch.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.square().sum(dim=(-2, -1), keepdim=True).sqrt() + 1e-7)
    for _ in range(MUON_NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """The MLX script's Muon update: Nesterov momentum, orthogonalised, scaled to AdamW's update size by
    0.2 sqrt(max(rows, cols)), decoupled weight decay (torch.optim.Muon orthogonalises in bf16 and scales otherwise)."""

    def __init__(self, params, lr, weight_decay):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                momentum.lerp_(p.grad, 1 - MUON_MOMENTUM)
                direction = orthogonalise(p.grad.lerp(momentum, MUON_MOMENTUM))  # Nesterov
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape[-2:])))


class Optimizers:
    """Several optimizers stepped as one: the training step sets every group's lr, then calls step and zero_grad."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.param_groups = [group for optimizer in optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def make_optimizer(model, device):
    """The MLX script's three groups: the projection matrices (MATRIX_LR) by Muon or AdamW (OPTIMIZER), the embedding
    (EMBEDDING_LR) by AdamW, both with decoupled weight decay, everything else (SCALAR_LR, no decay) by AdamW. AdamW
    is fused on CUDA and decays by lr * wd like the MLX one."""
    matrices = {id(p) for _, p in matrix_parameters(model)}
    embedding = dict(params=[model.embed.weight], lr=EMBEDDING_LR, weight_decay=WEIGHT_DECAY)
    matrix = dict(params=[p for p in model.parameters() if id(p) in matrices], lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    scalars = dict(params=[p for p in model.parameters() if id(p) not in matrices and p is not model.embed.weight],
                   lr=SCALAR_LR, weight_decay=0.0)
    adam = dict(betas=(ADAM_BETA1, ADAM_BETA2), eps=ADAM_EPS, fused=device.type == "cuda")
    if OPTIMIZER == "muon":
        optimizer = Optimizers(torch.optim.AdamW([embedding, scalars], **adam),
                               Muon([matrix], MATRIX_LR, WEIGHT_DECAY))
    else:
        optimizer = torch.optim.AdamW([embedding, matrix, scalars], **adam)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    return optimizer


def lr_multiplier(progress):
    """Linear warmup over WARMUP_RATIO of the budget, constant, then linear warmdown to FINAL_LR_FRAC over the last
    WARMDOWN_RATIO. progress = training seconds so far / TIME_BUDGET."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1.0 - WARMDOWN_RATIO:
        return 1.0
    decay = min((progress - (1.0 - WARMDOWN_RATIO)) / WARMDOWN_RATIO, 1.0)
    return 1.0 - decay * (1.0 - FINAL_LR_FRAC)


def make_training_step(model, optimizer, grad_accum_steps, device, compile_model=None, data_parallel=False):
    """step(batches, lr_mult) -> (mean loss as a device tensor, epoch): forward + backward per micro-batch (gradients
    accumulate), clip, update, with no host sync; the step's next micro-batch is fetched while the GPU works (never
    one beyond the step: the budget check counts every batch fetched). compile_model: torch.compile the forward
    (default: on CUDA when COMPILE). data_parallel: DDP, averaging gradients in the last micro-batch's backward."""
    if compile_model is None:
        compile_model = COMPILE and device.type == "cuda"
    wrapped = DDP(model, broadcast_buffers=False) if data_parallel else model
    forward = torch.compile(wrapped) if compile_model else wrapped
    prefetched = []  # the next (x, y, epoch), already on its way to the device

    def fetch(batches):
        inputs, targets, epoch = next(batches)
        return to_device(inputs, device), to_device(targets, device), epoch  # speed section

    def step(batches, lr_mult):
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_mult
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y, epoch = prefetched.pop() if prefetched else fetch(batches)
            last = micro_step == grad_accum_steps - 1
            with wrapped.no_sync() if data_parallel and not last else contextlib.nullcontext():  # all-reduce once
                loss = forward(x, y)
                (loss / grad_accum_steps).backward()
            loss_sum += loss.detach()
            if not last:
                prefetched.append(fetch(batches))  # the host fetches while the GPU runs the queued work
        if GRAD_CLIP > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / grad_accum_steps, epoch

    step.forward = forward  # the (compiled) model, reused for evaluation
    return step


def resolve_compute_dtype(device):
    """bf16 autocast on CUDA, float32 on CPU (CPU bf16 matmuls are slower than float32 ones)."""
    if COMPUTE_DTYPE == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, COMPUTE_DTYPE)


def check_hyperparameters(tokens_per_micro_step):
    """One-line errors for settings that cannot train, before any time is spent."""
    g, heads = globals(), EXPAND * D_MODEL // HEADDIM if HEADDIM > 0 else 0
    prepare.check_hyperparameters("train_mamba", [
        prepare.one_of(g, "ARCHITECTURE", ("mamba-2", "mamba-3")),
        prepare.one_of(g, "COMPUTE_DTYPE", ("auto", "float32", "bfloat16", "float16")),
        prepare.one_of(g, "OPTIMIZER", ("muon", "adamw")),
        *prepare.positive(g, "DEPTH", "D_MODEL", "D_STATE", "HEADDIM", "EXPAND", "NGROUPS", "D_CONV", "MIMO_RANK",
                          "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE", "MUON_NS_STEPS"),
        ("CHUNK_SIZE", CHUNK_SIZE > 0, f"must be positive, got {CHUNK_SIZE!r}"),
        ("MLP_EXPAND", MLP_EXPAND >= 0, f"must be >= 0 (0 = no MLP), got {MLP_EXPAND!r}"),
        ("HEADDIM", HEADDIM > 0 and EXPAND * D_MODEL % HEADDIM == 0,
         f"must divide EXPAND * D_MODEL ({EXPAND * D_MODEL}), got {HEADDIM!r}"),
        ("NGROUPS", NGROUPS > 0 and heads % NGROUPS == 0, f"must divide the {heads} heads, got {NGROUPS!r}"),
        ("ROPE_FRACTION", ARCHITECTURE != "mamba-3" or int(D_STATE * ROPE_FRACTION) >= 2,
         f"* D_STATE must give at least one rotary pair, got {ROPE_FRACTION!r} * {D_STATE!r}"),
        ("EXPORT_UPSTREAM_DIR", not EXPORT_UPSTREAM_DIR or os.path.isdir(os.path.dirname(os.path.abspath(
            EXPORT_UPSTREAM_DIR))), f"must be a folder whose parent exists, got {EXPORT_UPSTREAM_DIR!r}"),
        ("TOTAL_BATCH_SIZE", tokens_per_micro_step > 0 and TOTAL_BATCH_SIZE % tokens_per_micro_step == 0,
         f"must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN * processes ({tokens_per_micro_step}), "
         f"got {TOTAL_BATCH_SIZE!r}"),
    ])


def main():
    t_start = t_script_start
    dist = prepare.distributed("torch")  # rank and world size under torchrun; rank 0 of 1 in a plain run
    print(prepare.harness_line())  # the preset and the harness constants in force
    torch.manual_seed(SEED)  # the same on every rank (DDP also starts every rank from rank 0's weights)
    device = torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    # TF32 stays off (torch's default): the scans' float32 state passing is a matmul and keeps its 24-bit mantissa
    seq_len = prepare.MAX_SEQ_LEN
    check_hyperparameters(DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    tokenizer = prepare.Tokenizer.from_directory()
    compute_dtype = resolve_compute_dtype(device)
    device_label = device_name(device)  # speed section
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size())
    model = MambaLM(config, compute_dtype).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token()
    architecture = ARCHITECTURE + (f" (MIMO rank {MIMO_RANK})" if ARCHITECTURE == "mamba-3" and IS_MIMO else "")
    scan_backend = choose_scan_backend(config, device)  # a fused kernel if it matches the pure scan (speed section)

    grad_accum_steps = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    print(f"model: {architecture}, {num_params / 1e6:.2f}M parameters, depth {DEPTH}, d_model {D_MODEL}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token, compute {compute_dtype}, device {device_label}, "
          f"scan {scan_backend}")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows x {seq_len} tokens "
          f"x {dist.world_size} processes")

    optimizer = make_optimizer(model, device)
    training_step = make_training_step(model, optimizer, grad_accum_steps, device, data_parallel=dist.world_size > 1)
    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train", rank=dist.rank,
                                           world_size=dist.world_size)
    progress_line = prepare.ProgressLine(interval=0)  # in run.log: one line per step (the loss curve)
    gc.collect()
    gc.freeze()  # the long-lived objects are made; keep the collector's pauses out of the timed loop
    gc.disable()

    prepare.probe_machine_speed(dist)  # for the summary's machine_speed, outside the budget

    # The clock counts every step but the first (it compiles); a step runs while its predicted middle is in budget,
    # so the run ends at the step end nearest to it. The schedule follows that middle / TIME_BUDGET.
    training_time, step, smooth_loss, t_startup, step_times = 0.0, 0, 0.0, None, []
    while (midpoint := prepare.step_midpoint(training_time, step_times)) < prepare.TIME_BUDGET:
        synchronize(device)  # speed section
        t0 = time.time()
        lr_mult = lr_multiplier(midpoint / prepare.TIME_BUDGET)
        loss, epoch = training_step(train_loader, lr_mult)
        train_loss = loss.item()  # the one host sync of the step
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
            f"lrm {lr_mult:.2f} | {1000 * step_time:.0f} ms | {tokens_per_s:,.0f} tok/s | epoch {epoch} | "
            f"training_seconds {training_time:.3f} | tokens {step * TOTAL_BATCH_SIZE} | {remaining:.0f}s left"
        )
    progress_line.close()
    gc.enable()

    # Evaluation: the harness scores the (compiled, on CUDA) model's forward pass, under the model's own autocast.
    t_eval = time.time()
    val_bpb = prepare.evaluate_bpb(training_step.forward, DEVICE_BATCH_SIZE, dist)
    eval_seconds = time.time() - t_eval

    timed_steps = step - 1
    total_tokens = step * TOTAL_BATCH_SIZE
    tokens_per_s = timed_steps * TOTAL_BATCH_SIZE / max(training_time, 1e-9)
    peak_dtype = "float32" if compute_dtype == torch.float32 else "bfloat16"
    peak, peak_source = prepare.peak_flops(device_label, peak_dtype, backend="torch")
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
        "peak_memory_mb": peak_memory_mb(device),  # speed section
        "mfu_percent": mfu,
        "total_tokens_M": total_tokens / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": DEPTH,
        "scan_backend": scan_backend,
    }, trained_tokens=total_tokens, dist=dist)
    if EXPORT_UPSTREAM_DIR and dist.rank == 0:
        export_upstream(model, EXPORT_UPSTREAM_DIR)  # mamba_ssm's layout: below the speed section


# =====================================================================================================================
# SECTION: Speed machinery (mamba_ssm's fused scans and their start-up check, device helpers, decoding)
# =====================================================================================================================
# Scan backend: the pure-PyTorch scans, or mamba_ssm's fused CUDA kernels, chosen once at start by
# choose_scan_backend(): a kernel is used only if it imports and matches the pure scan on a random problem of the
# model's shape (output and every input gradient), so a kernel with another convention can never train silently.
# The kernels take the pure scans' arguments (upstream's Mamba-3 interface is the one mirrored), except Mamba-2's,
# which takes x, dt and A separately (it folds dt in itself).

FUSED = {}  # "mamba-2" / "mamba-3": the fused function the blocks call instead of the pure scan


def _fused_candidates():
    """{kind: (function, name)} for the fused kernels that import here, wrapped to the pure scans' arguments."""
    found = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        @torch.compiler.disable
        def fused_ssd(x, dt, A, B, C, chunk_size, D):
            return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D)

        found["ssd"] = (fused_ssd, "mamba_chunk_scan_combined")
    except Exception:
        pass
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

        @torch.compiler.disable
        def fused_siso(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, chunk_size=64):
            h = V.shape[2]
            return mamba3_siso_combined(
                Q=Q.contiguous(), K=K.contiguous(), V=V.contiguous(), ADT=ADT.float().contiguous(),
                DT=DT.float().contiguous(), Trap=Trap.contiguous(), Q_bias=Q_bias.float().contiguous(),
                K_bias=K_bias.float().contiguous(), Angles=Angles.float().expand(-1, -1, h, -1).contiguous(),
                D=None if D is None else D.float(), Z=None if Z is None else Z.contiguous(), chunk_size=chunk_size,
            )

        found["siso"] = (fused_siso, "mamba3_siso_combined")
    except Exception:
        pass
    try:
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo

        @torch.compiler.disable
        def fused_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_Z=None, MIMO_O=None, D=None,
                       Z=None, chunk_size=16):
            # The kernel turns dims (j, n/2 + j) for j < n / divisor, divisor 2 or 4: the pure scan's MIMO pairing
            # for the first a <= n/divisor pairs. Angles past a are zero (tanh 0 = 0: those pairs never turn), so any
            # rope fraction (a <= n/2) maps onto it; a shape it cannot take raises, and the start-up check says so.
            n, a, h = Q.shape[-1], Angles.shape[-1], V.shape[2]
            divisor = 4 if a <= n // 4 else 2
            if n % 2 or a > n // divisor:
                raise ValueError(f"the MIMO kernel cannot rotate {a} pairs of d_state {n}")
            angles = F.pad(Angles.float(), (0, n // divisor - a)).expand(-1, -1, h, -1).contiguous()
            return mamba3_mimo(
                Q.contiguous(), K.contiguous(), V.contiguous(), ADT.float().contiguous(), DT.float().contiguous(),
                Trap.contiguous(), Q_bias.float().contiguous(), K_bias.float().contiguous(),
                MIMO_V.float().contiguous(), MIMO_Z.float().contiguous(),
                None if MIMO_O is None else MIMO_O.float().contiguous(), angles, None if D is None else D.float(),
                None if Z is None else Z.contiguous(), chunk_size, divisor, V.dtype,
            )

        found["mimo"] = (fused_mimo, "mamba3_mimo")
    except Exception:
        pass
    return found


def _pure_ssd_with_dt(x, dt, A, B, C, chunk_size, D):
    """ssd_scan in the fused kernel's arguments: x (b l h p), dt (b l h), A (h), D (h)."""
    y, _ = ssd_scan(x * dt[..., None].to(x.dtype), dt * A, B, C, chunk_size)
    return y + x * D[:, None].to(x.dtype)


def _random_scan_problem(kind, config, batch, length, device, dtype):
    """Inputs of the model's shape (heads, dims, rank) with the ranges training sees, for the start-up check."""
    c, gen = config, torch.Generator().manual_seed(0)
    h, g, n, p, r, a = c.nheads, c.ngroups, c.d_state, c.headdim, c.mimo_rank, c.num_rope_angles
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    dt = F.softplus(rand(batch, length, h) - 3)
    if kind == "ssd":
        problem = dict(x=rand(batch, length, h, p), dt=dt, A=-torch.rand(h, generator=gen) - 0.5,
                       B=rand(batch, length, g, n), C=rand(batch, length, g, n), D=rand(h))
    else:
        qk = (batch, length, g, n) if kind == "siso" else (batch, length, r, g, n)
        bias = (h, n) if kind == "siso" else (h, r, n)
        problem = dict(Q=F.normalize(rand(*qk), dim=-1) * 4, K=F.normalize(rand(*qk), dim=-1) * 4,
                       V=rand(batch, length, h, p),
                       ADT=-dt.transpose(1, 2) * (0.5 + torch.rand(batch, h, length, generator=gen)),
                       DT=dt.transpose(1, 2), Trap=rand(batch, h, length), Q_bias=1 + 0.1 * rand(*bias),
                       K_bias=1 + 0.1 * rand(*bias), Angles=rand(batch, length, 1, a), D=rand(h),
                       Z=rand(batch, length, h, p))
        if kind == "mimo":
            problem.update(MIMO_V=1 / r + 0.1 * rand(h, r, p), MIMO_Z=1 + 0.1 * rand(h, r, p),
                           MIMO_O=1 / r + 0.1 * rand(h, r, p))
    low_precision = ("x", "B", "C", "Q", "K", "V", "Z")  # what arrives in bf16 from the projections under autocast
    return {key: value.to(device=device, dtype=dtype if key in low_precision else torch.float32)
            for key, value in problem.items()}


def fused_matches_pure(fused, pure, problem, chunk_size, tolerance=0.05):
    """(ok, detail): the fused kernel's output and input gradients against the pure scan's in float32, relative to
    each tensor's largest magnitude."""
    inputs = {key: value.detach().clone().requires_grad_() for key, value in problem.items()}
    reference = {key: value.detach().float().clone().requires_grad_() for key, value in problem.items()}
    y_fused = fused(**inputs, chunk_size=chunk_size)
    y_pure = pure(**reference, chunk_size=chunk_size)
    y_pure = y_pure[0] if isinstance(y_pure, tuple) else y_pure
    probe = torch.randn_like(y_pure)
    (y_fused.float() * probe).sum().backward()
    (y_pure * probe).sum().backward()
    def relative_error(got, want):
        return ((got.float() - want).abs().max() / (want.abs().max() + 1e-6)).item()

    errors = [(relative_error(y_fused, y_pure), "output")]
    for key, value in inputs.items():
        if reference[key].grad is None:
            continue
        if value.grad is None:
            return False, f"no gradient for {key} from the kernel"
        errors.append((relative_error(value.grad, reference[key].grad), f"d{key}"))
    error, name = max(errors)
    return error <= tolerance, f"worst relative error {error:.2g} ({name})"


def choose_scan_backend(config, device):
    """Pick the scan implementation for this run and return its name for the summary (scan_backend)."""
    FUSED.clear()
    if not (FUSED_KERNELS and device.type == "cuda"):
        return "torch"
    kind = "ssd" if config.architecture == "mamba-2" else ("mimo" if config.is_mimo else "siso")
    candidates = _fused_candidates()
    if kind not in candidates:
        print(f"scan backend: no mamba_ssm kernel for {kind} imports here; using the pure-PyTorch scan")
        return "torch"
    fused, name = candidates[kind]
    pure = {"ssd": _pure_ssd_with_dt, "siso": mamba3_siso_scan, "mimo": mamba3_mimo_scan}[kind]
    problem = _random_scan_problem(kind, config, 2, 4 * config.tokens_per_chunk, device, torch.bfloat16)
    try:
        ok, detail = fused_matches_pure(fused, pure, problem, config.tokens_per_chunk)
    except Exception as e:  # an unsupported shape, a kernel compile failure, ...
        ok, detail = False, f"{type(e).__name__}: {e}"
    if not ok:
        print(f"scan backend: mamba_ssm {name} disagrees with the pure scan ({detail}); using the pure-PyTorch scan")
        return "torch"
    print(f"scan backend: mamba_ssm {name} ({detail} against the pure scan)")
    FUSED[config.architecture] = fused
    return f"mamba_ssm.{name}"


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"


def to_device(array, device):
    """int32 numpy batch -> int64 tensor on device; pinned and non-blocking on CUDA, so the copy overlaps the queued
    GPU work (torch's caching host allocator keeps each pinned block until its copy has run)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True).long()
    return tensor.long()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: the process peak RSS


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding, which training never calls: each scan's one-token recurrence as the math reads (what the blocks' step
# methods call, and the reference the tests hold the chunked scans to), and generate.


def ssd_step(X, A, B, C, state):
    """One token of ssd_scan's recurrence. X (b h p), A (b h), B, C (b g n), state (b h p n) -> (Y (b h p), state)."""
    h, g = X.shape[1], B.shape[1]
    acc = state.dtype
    B, C = (t.to(acc).repeat_interleave(h // g, dim=1) for t in (B, C))  # (b h n)
    state = torch.exp(A.to(acc))[..., None, None] * state + X.to(acc)[..., :, None] * B[..., None, :]
    Y = (state @ C[..., None])[..., 0]
    return Y.to(X.dtype), state


def _mamba3_step(inputs, mimo, state):
    """One token of the recurrence (rank axis always present: Q, K (b r g n)); mimo None or a MimoWeights."""
    s = inputs
    b, h, p = s.V.shape
    acc = accumulation_dtype(s.V.dtype)
    r, n, a = s.Q.shape[1], s.Q.shape[-1], s.Angles.shape[-1]
    if state is None:
        state = (torch.zeros(b, h, a), torch.zeros(b, h, p, n), torch.zeros(b, r, h, n), torch.zeros(b, h, p))
        state = tuple(t.to(device=s.V.device, dtype=acc) for t in state)
    theta, S, k_prev, x_prev = (t.to(acc) for t in state)
    ADT, DT, lam = s.ADT.to(acc), s.DT.to(acc), torch.sigmoid(s.Trap.to(acc))
    alpha = torch.exp(ADT)
    beta, gamma = (1 - lam) * DT * alpha, lam * DT
    theta = torch.remainder(theta + math.pi * torch.tanh(s.Angles.to(acc)) * DT[..., None], 2 * math.pi)  # (b h a)
    e = h // s.Q.shape[-2]
    q = s.Q.to(acc).repeat_interleave(e, dim=-2) + s.Q_bias.transpose(0, 1).to(acc)  # (b r h n)
    k = s.K.to(acc).repeat_interleave(e, dim=-2) + s.K_bias.transpose(0, 1).to(acc)
    rotate = rotate_pairs if mimo is None else rotate_halves
    q, k = rotate(q, theta[:, None]), rotate(k, theta[:, None])
    x = s.V.to(acc)
    up = (lambda x: x[:, None]) if mimo is None else (lambda x: x[:, None] * mimo.up_x.transpose(0, 1).to(acc))
    v, v_prev = up(x), up(x_prev)  # (b r h p)
    S = (alpha[..., None, None] * S
         + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
         + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v, k))
    o = torch.einsum("bhpn,brhn->brhp", S, q)
    if s.D is not None:
        o = o + s.D.to(acc)[:, None] * v
    if mimo is None:
        o = o[:, 0]
        if s.Z is not None:
            o = o * F.silu(s.Z.to(acc))
    else:
        if s.Z is not None:
            o = o * F.silu(s.Z.to(acc)[:, None] * mimo.up_z.transpose(0, 1).to(acc))
        if mimo.down is not None:
            o = (o * mimo.down.transpose(0, 1).to(acc)).sum(dim=1)
    return o.to(s.V.dtype), (theta, S, k, x)


def mamba3_siso_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, state=None):
    """One token of the SISO recurrence: Q, K (b g n), V, Z (b h p), ADT, DT, Trap (b h), Angles (b h a) or (b 1 a),
    state as mamba3_siso_scan's. Returns (y (b h p), new state)."""
    if state is not None:
        angle, S, k_last, x_last = state
        state = (angle, S, k_last[:, None], x_last)
    inputs = Mamba3Inputs(Q[:, None], K[:, None], V, ADT, DT, Trap, Q_bias[:, None], K_bias[:, None], Angles, D, Z)
    y, (angle, S, k_last, x_last) = _mamba3_step(inputs, None, state)
    return y, (angle, S, k_last[:, 0], x_last)


def mamba3_mimo_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_Z=None, MIMO_O=None, D=None,
                     Z=None, state=None):
    """One token of the MIMO recurrence: Q, K (b r g n), biases (h r n), MIMO_* (h r p), k state (b r h n)."""
    inputs = Mamba3Inputs(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    return _mamba3_step(inputs, MimoWeights(MIMO_V, MIMO_Z, MIMO_O), state)


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens=64, temperature=1.0):
    """Sample a continuation of `prompt`: a chunked prefill of the prompt, then the recurrent step path, O(1) per
    token whatever the length so far (the cache holds the conv window and the SSM state of every layer)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    logits, cache = model.prefill(torch.tensor([ids], device=device))
    new_tokens = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]
        new_tokens.append(token.item())
        logits, cache = model.step(token, cache)
    return tokenizer.decode(new_tokens)


# =====================================================================================================================
# END SECTION: Speed machinery
# =====================================================================================================================


# =====================================================================================================================
# SECTION: Export (weights in other layouts: from the MLX script, to mamba_ssm)
# =====================================================================================================================


def load_mlx_parameters(model, arrays):
    """Copy the MLX model's parameters, a flat {name: array} (mlx.utils.tree_flatten(mlx_model.parameters()), arrays
    as numpy or anything torch.as_tensor takes), into `model`. The names and shapes are the same by construction;
    any difference is an error that names the parameter."""
    params = dict(model.named_parameters())
    missing, unknown = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or unknown:
        raise KeyError(f"parameter names differ from the MLX model's: missing {missing[:6]}, unknown {unknown[:6]}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(arrays[name])
            if value.shape != param.shape:
                raise ValueError(f"{name}: MLX shape {tuple(value.shape)}, PyTorch shape {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


# A recipe that transfers: EXPORT_UPSTREAM_DIR writes the final model under mamba_ssm's MambaLMHeadModel names and
# config (README, "Taking a recipe to mamba_ssm"), so MambaLMHeadModel.from_pretrained(EXPORT_UPSTREAM_DIR) loads it.
# Upstream pads the vocabulary to a multiple of 8, keeps the conv as conv1d (C, 1, K) and stores the tied lm_head too;
# its Mamba-3 MIMO rotates the state's halves as here, and its Mamba-3 chunk_size counts tokens.

UPSTREAM_NAMES = {"B_norm_weight": "B_norm.weight", "C_norm_weight": "C_norm.weight", "norm_weight": "norm.weight",
                  "conv.weight": "conv1d.weight", "conv.bias": "conv1d.bias"}


def upstream_state(model):
    """{upstream name: float32 CPU tensor} of a MambaLM's weights (embedding and lm_head one tensor, as upstream's)."""
    out = {}
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu", torch.float32)
        if name == "embed.weight":
            value = F.pad(value, (0, 0, 0, -value.shape[0] % 8))  # zero rows up to a multiple of 8
            out["backbone.embedding.weight"] = out["lm_head.weight"] = value
        elif name == "norm_f.weight":
            out["backbone.norm_f.weight"] = value
        else:
            _, i, part, rest = name.split(".", 3)  # layers.{i}.{mixer, norm, mlp_norm, mlp}.{rest}
            if part == "mixer":
                value = value.T[:, None, :].contiguous() if rest == "conv.weight" else value  # (K, C) -> (C, 1, K)
                out[f"backbone.layers.{i}.mixer.{UPSTREAM_NAMES.get(rest, rest)}"] = value
            else:  # the block's norms and its MLP
                out[f"backbone.layers.{i}.{'norm2' if part == 'mlp_norm' else part}.{rest}"] = value
    return out


def upstream_config(config):
    """MambaLMHeadModel's config (mamba_ssm's MambaConfig fields) of a ModelConfig."""
    ssm = dict(layer="Mamba3" if config.architecture == "mamba-3" else "Mamba2", d_state=config.d_state,
               expand=config.expand, headdim=config.headdim, ngroups=config.ngroups,
               chunk_size=config.tokens_per_chunk, dt_min=config.dt_min, dt_max=config.dt_max,
               dt_init_floor=config.dt_init_floor)
    if config.architecture == "mamba-3":
        ssm.update(rope_fraction=config.rope_fraction, A_floor=config.a_floor, is_outproj_norm=config.is_outproj_norm,
                   is_mimo=config.is_mimo, mimo_rank=config.mimo_rank)
    else:
        ssm.update(d_conv=config.d_conv)
    return dict(d_model=config.d_model, d_intermediate=config.mlp_expand * config.d_model, n_layer=config.depth,
                vocab_size=config.vocab_size, ssm_cfg=ssm, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
                residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)


def export_upstream(model, directory):
    """pytorch_model.bin, then config.json, each whole or not at all (the config last marks a complete export)."""
    import json

    os.makedirs(directory, exist_ok=True)
    state = upstream_state(model)
    prepare._write_atomic(os.path.join(directory, "pytorch_model.bin"), lambda f: torch.save(state, f), "wb")
    config = upstream_config(model.config)
    prepare._write_atomic(os.path.join(directory, "config.json"), lambda f: json.dump(config, f, indent=1), "w")
    hidden = config["d_intermediate"]
    if hidden % 128:  # upstream's GatedMLP rounds its hidden width up to a multiple of 128
        print(f"export: {directory} (config.json, pytorch_model.bin in mamba_ssm's names; MLP_EXPAND * D_MODEL = "
              f"{hidden} is not a multiple of 128, upstream's MLP width, so it will not load as is)")
    else:
        print(f"export: {directory} (config.json, pytorch_model.bin: mamba_ssm's MambaLMHeadModel.from_pretrained "
              f"loads it)")


# =====================================================================================================================
# END SECTION: Export
# =====================================================================================================================


if __name__ == "__main__":
    prepare.run(main)
