"""
Train a Mamba-2 or Mamba-3 (SISO / MIMO) language model with PyTorch for a fixed time budget, then report val_bpb.

The PyTorch twin of train_mamba_3_mlx.py, which explains the math. Run: `uv run --extra torch train_mamba.py`.
"""

import contextlib
import gc
import math
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass

t_script_start = time.time()  # total_seconds counts from here

if __name__ == "__main__":  # a run: the harness asks torch for the device
    os.environ.setdefault("AUTORESEARCH_BACKEND", "torch")
import prepare  # first: the harness

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

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
CHUNK_SIZE = 64  # keys per scan chunk (MIMO: tokens x MIMO_RANK), speed only; upstream's Mamba-2: 256
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
MATRIX_LR = 0.006  # projections (in_proj, out_proj, MLP); measured on the cpu preset, Muon's RMS scaling carries it
EMBEDDING_LR = 0.004  # the tied embedding / unembedding matrix
SCALAR_LR = 0.004  # A_log, dt_bias, D, norm weights, biases, conv taps (no weight decay)
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5  # Newton-Schulz iterations per orthogonalisation
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1  # decoupled, matrices and embedding only
GRAD_CLIP = 1.0  # clip the global gradient norm to this; 0 turns clipping off
WARMUP_RATIO = 0.0  # share of the time budget ramping the learning rate up from 0
WARMDOWN_RATIO = 0.5  # share of the budget at the end decaying it linearly ...
FINAL_LR_FRAC = 0.05  # ... down to this fraction of the peak
COMPUTE_DTYPE = "auto"  # activations/matmuls: "float32", "bfloat16" or "auto" (bf16 autocast on CUDA, fp32 on CPU)
CHECKPOINT_BLOCKS = True  # recompute each block in the backward pass: less memory, one more forward
SEED = 42
EXPORT_UPSTREAM_DIR = ""  # a folder: the final weights and config in mamba_ssm's layout (after the summary; "" = off)

# PyTorch runtime
COMPILE = True  # torch.compile on CUDA (on the CPU its C++ build costs more than it saves)
FUSED_KERNELS = True  # on CUDA, mamba_ssm's fused scans where they match the pure ones


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
    def tokens_per_chunk(self):  # a MIMO token brings MIMO_RANK keys
        mimo = self.architecture == "mamba-3" and self.is_mimo
        return max(1, self.chunk_size // self.mimo_rank) if mimo else self.chunk_size


# SECTION: Mamba (the chunked scan, Mamba-2 and Mamba-3 blocks)

FUSED = {}  # architecture -> a fused scan that matches the pure one (speed section)


def rms_norm(x, weight=None, eps=1e-5):  # in float32
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)


def init_dt_bias(nheads, c):
    """softplus(dt_bias) log-uniform in [dt_min, dt_max], at least dt_init_floor (upstream)."""
    dt = torch.exp(torch.empty(nheads).uniform_(math.log(c.dt_min), math.log(c.dt_max))).clamp(min=c.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


def segsum(a):
    """a (..., T) -> (..., T, T): a[j+1] + ... + a[i] for j <= i, else -inf; no difference of cumulative sums."""
    T = a.shape[-1]
    strictly_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = a[..., :, None].expand(*a.shape, T).masked_fill(~strictly_below, 0.0).cumsum(dim=-2)
    return sums.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0), float("-inf"))


def chunked_scan(q, k, v, log_alpha, chunk_size, weight=None, diag_weight=None, start_state=None):
    """P_t = alpha_t P_{t-1} + w_t sum_j v_{t,j} k_{t,j}^T, y_{t,i} = P_t q_{t,i} (own input weighted diag_weight_t).
    q, k (b l r g n), v (b l r h p), log_alpha, weights (b l h), start_state (b h p n) -> y, final state."""
    b, l, r, g, n = q.shape
    h, p = v.shape[-2:]
    e, Q, acc = h // g, chunk_size, torch.promote_types(v.dtype, torch.float32)  # decays, states
    weight = torch.ones_like(log_alpha, dtype=acc) if weight is None else weight
    diag_weight = weight if diag_weight is None else diag_weight
    pad = -l % Q
    if pad:  # zero tokens: decay 1 and no input, so the state passes through
        q, k, v = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (q, k, v))
        log_alpha, weight, diag_weight = (F.pad(t, (0, 0, 0, pad)) for t in (log_alpha, weight, diag_weight))
    c = (l + pad) // Q
    # (batch, group, chunk) in front, ranks beside time: batched matmuls
    q, k = (t.reshape(b, c, Q, r, g, n).permute(0, 4, 1, 2, 3, 5).reshape(b, g, c, Q * r, n) for t in (q, k))
    v = v.reshape(b, c, Q, r, g, e, p).permute(0, 4, 1, 2, 3, 5, 6)  # (b, g, c, Q, r, e, p)
    a = log_alpha.to(acc).reshape(b, c, Q, g, e).permute(0, 3, 4, 1, 2)  # (b, g, e, c, Q)
    a_cum = a.cumsum(dim=-1)
    w, w_diag = (t.to(acc).reshape(b, c, Q, g, e).permute(0, 3, 4, 1, 2) for t in (weight, diag_weight))

    # 1. within each chunk: the decayed, weighted "attention" of q_t on k_s, s <= t
    scores = q @ k.transpose(-1, -2)  # (b, g, c, Qr, Qr): once per group
    diagonal = torch.eye(Q, dtype=torch.bool, device=q.device)
    decay = torch.where(diagonal, w_diag[..., :, None], torch.exp(segsum(a)) * w[..., None, :])  # (b,g,e,c,Q,Q)
    mixing = scores.view(b, g, 1, c, Q, r, Q, r) * decay.view(b, g, e, c, Q, 1, Q, 1)
    mixing = mixing.reshape(b, g, e, c, Q * r, Q * r).to(v.dtype)
    v_rows = v.permute(0, 1, 5, 2, 3, 4, 6).reshape(b, g, e, c, Q * r, p)
    y_within = (mixing @ v_rows).view(b, g, e, c, Q, r, p).permute(0, 1, 3, 4, 5, 2, 6)  # (b, g, c, Q, r, e, p)

    # 2. each chunk's own end state
    decay_to_end = (torch.exp(a_cum[..., -1:] - a_cum) * w).permute(0, 1, 3, 4, 2)  # (b, g, c, Q, e)
    v_to_end = (v * decay_to_end[:, :, :, :, None, :, None].to(v.dtype)).reshape(b, g, c, Q * r, e * p)
    chunk_states = v_to_end.transpose(-1, -2) @ k  # (b, g, c, e*p, n)

    # 3. pass the states across chunks, in float32 whatever the autocast
    with torch.autocast(q.device.type, enabled=False):
        chunk_states = chunk_states.to(acc).view(b, g, c, e, p, n).permute(0, 1, 3, 2, 4, 5)  # (b, g, e, c, p, n)
        first = chunk_states.new_zeros(b, g, e, 1, p, n) if start_state is None else start_state.to(acc)
        states = torch.cat([first.reshape(b, g, e, 1, p, n), chunk_states], dim=3)
        chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, g, e, c+1, c+1)
        states = (chunk_decay @ states.reshape(b, g, e, c + 1, p * n)).view(b, g, e, c + 1, p, n)
    entering, final_state = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. each token reads the state its chunk received, decayed from the chunk start
    entering = entering.permute(0, 1, 3, 5, 2, 4).reshape(b, g, c, n, e * p).to(q.dtype)
    y_carried = (q @ entering).view(b, g, c, Q, r, e, p)
    y_carried = y_carried * torch.exp(a_cum).permute(0, 1, 3, 4, 2)[:, :, :, :, None, :, None]

    y = (y_within + y_carried).permute(0, 2, 3, 4, 1, 5, 6).reshape(b, c * Q, r, h, p)[:, :l]
    return y, final_state.reshape(b, h, p, n)


def ssd_scan(X, A, B, C, chunk_size, initial_states=None):
    """S_t = exp(A_t) S_{t-1} + X_t B_t^T, Y_t = S_t C_t (ssd_minimal_discrete): X = x dt (b l h p), A = A dt (b l h),
    B, C (b l g n)."""
    Y, final_state = chunked_scan(C[:, :, None], B[:, :, None], X[:, :, None], A, chunk_size,
                                  start_state=initial_states)
    return Y[:, :, 0].to(X.dtype), final_state


class Linear(nn.Linear):  # bias-free; torch's init is MLX's
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        return rms_norm(x, self.weight)


class GatedMLP(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = Linear(d_model, 2 * hidden)
        self.fc2 = Linear(hidden, d_model)

    def forward(self, x):  # SwiGLU: fc2(h * silu(gate)), [h | gate] = fc1(x)
        h, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(h * F.silu(gate))


class CausalConv1d(nn.Module):
    """Depthwise causal conv, weight (K, channels): K shifted multiply-adds, which torch.compile fuses."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nn.Parameter(torch.empty(kernel_size, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x):  # x (b, l, c): out_t = bias + sum_k weight[k] x_{t-K+1+k}
        K, l = self.weight.shape[0], x.shape[1]
        w = self.weight.to(x.dtype)
        x = F.pad(x, (0, 0, K - 1, 0))
        out = self.bias.to(x.dtype) + w[K - 1] * x[:, K - 1 :]
        for k in range(K - 1):
            out = out + w[k] * x[:, k : k + l]
        return out


class Mamba2(nn.Module):
    """mamba_ssm's modules/mamba2.py: in_proj -> z, xBC, dt; causal conv; SSD with skip D; gated RMSNorm; out_proj."""

    def __init__(self, c):
        super().__init__()
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups, self.chunk_size = c.headdim, c.d_state, c.ngroups, c.chunk_size
        self.conv_dim = self.d_inner + 2 * c.ngroups * c.d_state  # x, B, C go through the conv together
        self.in_proj = Linear(c.d_model, self.d_inner + self.conv_dim + self.nheads)  # z | xBC | dt
        self.conv = CausalConv1d(self.conv_dim, c.d_conv)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, c))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1.0, 16.0)))  # A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = Linear(self.d_inner, c.d_model)

    def forward(self, u, state=None):  # state: None (training: none kept), () (a new sequence), or a carried one
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        K = self.conv.weight.shape[0]
        if state:  # the conv over [carried window, inputs]
            xBC = torch.cat([state[0].to(xBC.dtype), xBC], dim=1)
        conv_out = self.conv(xBC)[:, K - 1 :] if state else self.conv(xBC)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(F.silu(conv_out), [self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B, C = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B, C))
        dt = F.softplus(dt.float() + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        if "mamba-2" in FUSED and state is None:
            y = FUSED["mamba-2"](x, dt, A, B, C, self.chunk_size, self.D)
        else:
            y, ssm_state = ssd_scan(x * dt[..., None].to(x.dtype), A * dt, B, C, self.chunk_size,
                                    state[1] if state else None)
            y = y + x * self.D[:, None].to(x.dtype)
        y = (y.flatten(-2) * F.silu(z)).unflatten(-1, (self.ngroups, -1))  # gate, then a norm per group (upstream)
        out = self.out_proj(rms_norm(y).flatten(-2) * self.norm_weight.to(y.dtype))
        if state is None:
            return out, None
        window = F.pad(xBC, (0, 0, K - 1, 0))[:, xBC.shape[1] :]  # the last K-1 inputs
        return out, (window.to(torch.promote_types(xBC.dtype, torch.float32)), ssm_state)

    def scan_flops_per_token(self):  # forward matmuls, for MFU
        Q, n, p = self.chunk_size, self.d_state, self.headdim
        return 2 * Q * n * self.ngroups + self.nheads * (2 * Q * p + 4 * p * n)


# Mamba-3 (train_mamba_3_mlx.py's notes derive the chunked form)


def rotate_pairs(x, theta):
    """Turn dims (2j, 2j+1) of x (..., n) by theta (..., a), j < a (SISO)."""
    a = theta.shape[-1]
    x0, x1 = x[..., : 2 * a].unflatten(-1, (a, 2)).unbind(-1)
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    turned = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., 2 * a :]], dim=-1)


def rotate_halves(x, theta):
    """Turn dims (j, n/2 + j) of x (..., n) by theta (..., a), j < a (MIMO)."""
    a, half = theta.shape[-1], x.shape[-1] // 2
    x0, x1 = x[..., :a], x[..., half : half + a]
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    return torch.cat([x0 * cos - x1 * sin, x[..., a:half], x0 * sin + x1 * cos, x[..., half + a :]], dim=-1)


def cumulative_angles(increments, initial_angle, chunk_size):
    """theta_t = theta_{-1} + sum_{u <= t} increments_u mod 2 pi over dim 1 of (b l h a); chunk totals in float64."""
    l = increments.shape[1]
    chunks = F.pad(increments, (0, 0, 0, 0, 0, -l % chunk_size)).unflatten(1, (-1, chunk_size))  # (b, c, Q, h, a)
    within = chunks.cumsum(dim=2)
    totals = torch.remainder(chunks.double().sum(dim=2), 2 * math.pi)
    offsets = F.pad(totals.cumsum(dim=1)[:, :-1], (0, 0, 0, 0, 1, 0))  # what the chunks before each one add
    if initial_angle is not None:
        offsets = offsets + initial_angle[:, None]
    offsets = torch.remainder(offsets, 2 * math.pi).to(within.dtype)
    return torch.remainder(within + offsets[:, :, None], 2 * math.pi).flatten(1, 2)[:, :l]


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, MIMO_V=None, MIMO_Z=None,
                MIMO_O=None, initial_states=None, chunk_size=64):
    """S_t = alpha_t S_{t-1} + beta_t v_{t-1} k_{t-1}^T + gamma_t v_t k_t^T, y_t = S_t q_t + D v_t, q and k rotated,
    in upstream's kernel arguments (mamba3_siso_combined; mamba3_mimo with MIMO_V): Q, K (b l g n), MIMO (b l r g n);
    V, Z (b l h p); ADT, DT, Trap (b h l); biases (h n) (h r n); Angles (b l 1 a); MIMO_* (h r p); states (angle
    (b h a), S (b h p n), k (b h n) (b r h n), x (b h p)) -> (out (b l h p), final states)."""
    mimo = MIMO_V is not None
    if not mimo:  # a rank axis of 1 from here on
        Q, K, Q_bias, K_bias = Q[:, :, None], K[:, :, None], Q_bias[:, None], K_bias[:, None]
        if initial_states is not None:
            initial_states = (*initial_states[:2], initial_states[2][:, None], initial_states[3])
    acc = torch.promote_types(V.dtype, torch.float32)
    DT, ADT = DT.to(acc).transpose(1, 2), ADT.to(acc).transpose(1, 2)  # (b l h) from here on
    gamma = torch.sigmoid(Trap.to(acc)).transpose(1, 2) * DT  # lam DT
    sigma = DT - gamma  # (1 - lam) DT = beta / alpha
    sigma_next = F.pad(sigma[:, 1:], (0, 0, 0, 1))  # 0 after the last token: the final state is unshifted

    theta = cumulative_angles(math.pi * torch.tanh(Angles.to(acc)) * DT[..., None],
                              None if initial_states is None else initial_states[0].to(acc), chunk_size)
    rotate = rotate_halves if mimo else rotate_pairs  # upstream's pairings

    def heads(X, bias):  # (b l r g n) + (h r n) -> (b l r h n)
        return X.repeat_interleave(bias.shape[0] // X.shape[-2], dim=-2) + bias.transpose(0, 1).to(X.dtype)

    def ranks(x):  # (..., h, p) -> (..., r, h, p)
        return x.unsqueeze(-3) * MIMO_V.transpose(0, 1).to(x.dtype) if mimo else x.unsqueeze(-3)

    q, k, v = rotate(heads(Q, Q_bias), theta[:, :, None]), rotate(heads(K, K_bias), theta[:, :, None]), ranks(V)
    start = None
    if initial_states is not None:  # the carried token enters the shifted state
        _, S, k_prev, x_prev = initial_states
        carried = torch.einsum("brhp,brhn->bhpn", ranks(x_prev).to(acc), k_prev.to(acc))
        start = S.to(acc) + sigma[:, 0, :, None, None] * carried
    o, final_S = chunked_scan(q, k, v, ADT, chunk_size, gamma + sigma_next, gamma, start)
    if D is not None:
        o = o + D.to(o.dtype)[:, None] * v
    if not mimo:
        o = o[:, :, 0]
        if Z is not None:
            o = o * F.silu(Z.to(o.dtype))
    else:
        if Z is not None:
            o = o * F.silu(Z.unsqueeze(2).to(o.dtype) * MIMO_Z.transpose(0, 1).to(o.dtype))
        if MIMO_O is not None:
            o = (o * MIMO_O.transpose(0, 1).to(o.dtype)).sum(dim=2)
    return o.to(V.dtype), (theta[:, -1], final_S, k[:, -1] if mimo else k[:, -1, 0], V[:, -1].to(acc))


def heavy_tail(u):  # 1 + u for u >= 0, 1 / (1 - u) below; branch-free, so no inf gradient
    return (1 + F.relu(u)) / (1 + F.relu(-u))


class Mamba3(nn.Module):
    """mamba_ssm's modules/mamba3.py: in_proj -> z, x, B, C, dt, A, trap, angles; mamba3_scan; gate; out_proj."""

    def __init__(self, c):
        super().__init__()
        self.d_inner = c.expand * c.d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups = c.headdim, c.d_state, c.ngroups
        self.is_mimo, self.is_outproj_norm, self.a_floor = c.is_mimo, c.is_outproj_norm, c.a_floor
        self.mimo_rank = c.mimo_rank if c.is_mimo else 1
        self.chunk_size = c.tokens_per_chunk
        r, h, n, angles = self.mimo_rank, self.nheads, c.d_state, int(c.d_state * c.rope_fraction) // 2
        bc_dim = r * c.ngroups * n
        self.split_sizes = [self.d_inner, self.d_inner, bc_dim, bc_dim, h, h, h, angles]
        self.in_proj = Linear(c.d_model, sum(self.split_sizes))  # z | x | B | C | dd_dt | dd_A | trap | angles
        self.dt_bias = nn.Parameter(init_dt_bias(h, c))
        self.B_bias = nn.Parameter(torch.ones(h, r, n))
        self.C_bias = nn.Parameter(torch.ones(h, r, n))
        self.B_norm_weight = nn.Parameter(torch.ones(n))
        self.C_norm_weight = nn.Parameter(torch.ones(n))
        if c.is_mimo:
            self.mimo_x = nn.Parameter(torch.ones(h, r, c.headdim) / r)
            self.mimo_z = nn.Parameter(torch.ones(h, r, c.headdim))
            self.mimo_o = nn.Parameter(torch.ones(h, r, c.headdim) / r)
        self.D = nn.Parameter(torch.ones(h))
        if c.is_outproj_norm:
            self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = Linear(self.d_inner, c.d_model)

    def forward(self, u, state=None):  # as Mamba2's
        b, l, _ = u.shape
        r, g, h, n, p = self.mimo_rank, self.ngroups, self.nheads, self.d_state, self.headdim
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(self.in_proj(u), self.split_sizes, dim=-1)
        B = rms_norm(B.reshape(b, l, r, g, n), self.B_norm_weight)
        C = rms_norm(C.reshape(b, l, r, g, n), self.C_norm_weight)
        A = torch.clamp(-heavy_tail(dd_A.float()), max=-self.a_floor)
        DT = F.softplus(dd_dt.float() + self.dt_bias)
        z = z.reshape(b, l, h, p)
        gate_in_scan = not self.is_outproj_norm  # else the norm comes first
        scan = dict(Q=C, K=B, V=x.reshape(b, l, h, p), ADT=(A * DT).transpose(1, 2), DT=DT.transpose(1, 2),
                    Trap=trap.float().transpose(1, 2), Q_bias=self.C_bias, K_bias=self.B_bias,
                    Angles=angles.float()[:, :, None], D=self.D, Z=z if gate_in_scan else None)
        if self.is_mimo:
            scan.update(MIMO_V=self.mimo_x, MIMO_Z=self.mimo_z, MIMO_O=self.mimo_o if gate_in_scan else None)
        else:  # upstream's SISO interface has no rank axis
            scan.update(Q=C[:, :, 0], K=B[:, :, 0], Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0])
        if "mamba-3" in FUSED and state is None:
            y = FUSED["mamba-3"](**scan, chunk_size=self.chunk_size)
        else:
            y, new_state = mamba3_scan(**scan, initial_states=state or None, chunk_size=self.chunk_size)
            state = None if state is None else new_state
        if self.is_outproj_norm:  # a per-head RMSNorm, then the gate (and MIMO's down-projection)
            weight = self.norm_weight.reshape(h, p)
            if self.is_mimo:
                z_ranks = z.unsqueeze(-3) * self.mimo_z.transpose(0, 1).to(z.dtype)
                y = (rms_norm(y.float()) * weight * F.silu(z_ranks.float()) * self.mimo_o.transpose(0, 1)).sum(-3)
            else:
                y = rms_norm(y.float()) * weight * F.silu(z.float())
        return self.out_proj(y.reshape(b, l, self.d_inner).to(z.dtype)), state


    def scan_flops_per_token(self):
        c, r, n, p = self.chunk_size, self.mimo_rank, self.d_state, self.headdim
        return self.nheads * (2 * c * r * r * (n + p) + 4 * r * p * n)


# END SECTION: Mamba


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model)
        self.mixer = {"mamba-2": Mamba2, "mamba-3": Mamba3}[config.architecture](config)
        if config.mlp_expand > 0:
            self.mlp_norm = RMSNorm(config.d_model)
            self.mlp = GatedMLP(config.d_model, config.mlp_expand * config.d_model)

    def forward(self, x, state=None):
        y, state = self.mixer(self.norm(x), state)
        x = x + y
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.mlp_norm(x))
        return x, state


class MambaLM(nn.Module):
    def __init__(self, config, compute_dtype=torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # bfloat16: autocast
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm_f = RMSNorm(config.d_model)
        with torch.no_grad():  # upstream's init
            nn.init.normal_(self.embed.weight, std=0.02)
            writes = config.depth * (2 if config.mlp_expand > 0 else 1)
            for layer in self.layers:
                for proj in [layer.mixer.out_proj] + ([layer.mlp.fc2] if hasattr(layer, "mlp") else []):
                    proj.weight /= math.sqrt(writes)

    def forward(self, input_ids, targets=None, cache=None):
        """(b l) ids -> float32 logits, or the loss; cache (init_cache) is updated. Autocast inside, for the harness."""
        with torch.autocast(input_ids.device.type, self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            x = self.embed(input_ids)
            for i, layer in enumerate(self.layers):
                if cache is not None:
                    x, cache[i] = layer(x, cache[i])
                elif self.config.checkpoint_blocks and torch.is_grad_enabled():
                    x = checkpoint(layer, x, use_reentrant=False)[0]
                else:
                    x = layer(x)[0]
            logits = (self.norm_f(x) @ self.embed.weight.to(x.dtype).T).float()  # tied unembedding
        return logits if targets is None else cross_entropy(logits, targets)

    def init_cache(self, batch_size=None):  # a new sequence in every layer, for forward(ids, cache=cache)
        return [()] * len(self.layers)

    def step(self, token_ids, cache):  # one token (b,) -> (logits (b vocab), cache)
        return self(token_ids[:, None], cache=cache)[:, -1], cache

    def flops_per_token(self):
        """Training FLOPs per token: 6 * weights (embedding once) + 3 * scan FLOPs."""
        weights = [self.embed.weight] + [p for _, p in matrix_parameters(self)]
        weights += [m.weight for m in self.modules() if isinstance(m, CausalConv1d)]
        scan = sum(layer.mixer.scan_flops_per_token() for layer in self.layers)
        return 6 * sum(w.numel() for w in weights) + 3 * scan


def matrix_parameters(model):
    return [(f"{path}.weight", m.weight) for path, m in model.named_modules() if isinstance(m, nn.Linear)]


# SECTION: Loss, optimizer, schedule


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten().long())


def orthogonalise(g):  # about U V^T of g = U S V^T, by quintic Newton-Schulz iterations
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.float32 if g.device.type == "cpu" else torch.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.square().sum(dim=(-2, -1), keepdim=True).sqrt() + 1e-7)
    for _ in range(MUON_NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Optimizer:
    """The MLX script's: the matrices by Muon or AdamW, the embedding and the rest by torch's AdamW."""

    def __init__(self, model, device):
        matrices = {id(p) for _, p in matrix_parameters(model)}
        embedding = dict(params=[model.embed.weight], lr=EMBEDDING_LR, weight_decay=WEIGHT_DECAY)
        matrix = dict(params=[p for p in model.parameters() if id(p) in matrices], lr=MATRIX_LR,
                      weight_decay=WEIGHT_DECAY)
        scalars = dict(params=[p for p in model.parameters() if id(p) not in matrices and p is not model.embed.weight],
                       lr=SCALAR_LR, weight_decay=0.0)
        self.muon = matrix if OPTIMIZER == "muon" else None
        self.adamw = torch.optim.AdamW([embedding, scalars] if self.muon else [embedding, matrix, scalars],
                                       betas=(ADAM_BETA1, ADAM_BETA2), eps=ADAM_EPS, fused=device.type == "cuda")
        self.param_groups = self.adamw.param_groups + ([self.muon] if self.muon else [])
        for group in self.param_groups:
            group["peak_lr"] = group["lr"]
        self.zero_grad, self.momentum = model.zero_grad, {}

    @torch.no_grad()
    def step(self):
        self.adamw.step()
        for p in self.muon["params"] if self.muon else []:  # torch.optim.Muon scales its update otherwise
            lr = self.muon["lr"]
            momentum = self.momentum.setdefault(p, torch.zeros_like(p)).lerp_(p.grad, 1 - MUON_MOMENTUM)
            direction = orthogonalise(p.grad.lerp(momentum, MUON_MOMENTUM))  # Nesterov
            p.mul_(1 - lr * self.muon["weight_decay"]).add_(direction, alpha=-lr * 0.2 * math.sqrt(max(p.shape[-2:])))


def lr_multiplier(progress):
    """Warmup, constant, warmdown to FINAL_LR_FRAC; progress in [0, 1]."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1.0 - WARMDOWN_RATIO:
        return 1.0
    decay = min((progress - (1.0 - WARMDOWN_RATIO)) / WARMDOWN_RATIO, 1.0)
    return 1.0 - decay * (1.0 - FINAL_LR_FRAC)


# END SECTION: Loss, optimizer, schedule


def make_training_step(model, optimizer, grad_accum_steps, device, compile_model=None, data_parallel=False):
    """step(batches, lr_mult) -> (mean loss on the device, epoch); no host sync, the next batch fetched meanwhile."""
    if compile_model is None:
        compile_model = COMPILE and device.type == "cuda"
    wrapped = DDP(model, broadcast_buffers=False) if data_parallel else model
    forward = torch.compile(wrapped) if compile_model else wrapped
    prefetched = []

    def to_device(array):  # pinned and non-blocking on CUDA: the copy overlaps the queued GPU work
        tensor = torch.from_numpy(array)
        return tensor.pin_memory().to(device, non_blocking=True).long() if device.type == "cuda" else tensor.long()

    def fetch(batches):
        inputs, targets, epoch = next(batches)
        return to_device(inputs), to_device(targets), epoch

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
                prefetched.append(fetch(batches))
        if GRAD_CLIP > 0:
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad()
        return loss_sum / grad_accum_steps, epoch

    step.forward = forward  # reused for evaluation
    return step


def main():
    dist = prepare.distributed("torch")  # rank 0 of 1 unless under torchrun
    print(prepare.harness_line())
    seq_len = prepare.MAX_SEQ_LEN
    check_hyperparameters(DEVICE_BATCH_SIZE * seq_len * dist.world_size)  # one-line errors: speed section
    torch.manual_seed(SEED)  # the same on every rank
    cuda = torch.cuda.is_available()  # TF32 stays off: the scans' state passing needs float32
    device = torch.device("cuda", dist.local_rank) if cuda else torch.device("cpu")
    tokenizer = prepare.Tokenizer.from_directory()
    auto = torch.bfloat16 if cuda else torch.float32  # the CPU's bf16 matmuls are slower than its float32 ones
    compute_dtype = auto if COMPUTE_DTYPE == "auto" else getattr(torch, COMPUTE_DTYPE)
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}"
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size())
    model = MambaLM(config, compute_dtype).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token()
    architecture = ARCHITECTURE + (f" (MIMO rank {MIMO_RANK})" if ARCHITECTURE == "mamba-3" and IS_MIMO else "")
    scan_backend = choose_scan_backend(config, device)  # fills FUSED: speed section
    grad_accum_steps = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * seq_len * dist.world_size)
    print(f"model: {architecture}, {num_params / 1e6:.2f}M parameters, depth {DEPTH}, d_model {D_MODEL}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token, compute {compute_dtype}, device {device_name}, "
          f"scan {scan_backend}")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows x {seq_len} tokens "
          f"x {dist.world_size} processes")

    optimizer = Optimizer(model, device)
    training_step = make_training_step(model, optimizer, grad_accum_steps, device, data_parallel=dist.world_size > 1)
    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train", rank=dist.rank,
                                           world_size=dist.world_size)
    progress_line = prepare.ProgressLine(interval=0)  # one line per step in run.log
    gc.collect()
    gc.freeze()  # keep the collector's pauses out of the timed loop
    gc.disable()

    prepare.probe_machine_speed(dist)  # the summary's machine_speed, outside the budget

    # The clock counts every step but the first (it compiles); a step runs while its predicted middle is in budget.
    training_time, step, smooth_loss, t_startup, step_times = 0.0, 0, 0.0, None, []
    while (midpoint := prepare.step_midpoint(training_time, step_times)) < prepare.TIME_BUDGET:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.time()
        lr_mult = lr_multiplier(midpoint / prepare.TIME_BUDGET)
        loss, epoch = training_step(train_loader, lr_mult)
        train_loss = loss.item()  # the one host sync of the step
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
            f"loss {smooth_loss / (1 - 0.9**step):.4f} | lrm {lr_mult:.2f} | {1000 * step_time:.0f} ms | "
            f"{TOTAL_BATCH_SIZE / step_time:,.0f} tok/s | epoch {epoch} | training_seconds {training_time:.3f} | "
            f"tokens {step * TOTAL_BATCH_SIZE} | {max(prepare.TIME_BUDGET - training_time, 0.0):.0f}s left"
        )
    progress_line.close()
    gc.enable()

    t_eval = time.time()
    val_bpb = prepare.evaluate_bpb(training_step.forward, DEVICE_BATCH_SIZE, dist)
    eval_seconds = time.time() - t_eval

    tokens_per_s = (step - 1) * TOTAL_BATCH_SIZE / max(training_time, 1e-9)
    peak, peak_source = prepare.peak_flops(device_name, "float32" if compute_dtype == torch.float32 else "bfloat16",
                                           backend="torch")
    print(f"startup_seconds: {t_startup:.1f} (imports, model, data, first compiled step; not in training_seconds)")
    print(f"eval_seconds: {eval_seconds:.1f}")
    print(f"throughput: {tokens_per_s:,.0f} tok/s; MFU against {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    prepare.print_summary({
        "architecture": architecture,
        "preset": prepare.PRESET_NAME,
        "val_bpb": val_bpb,
        "training_seconds": training_time,
        "total_seconds": time.time() - t_script_start,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else  # CPU: peak RSS (KiB)
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mfu_percent": 100 * flops_per_token * tokens_per_s / (peak * dist.world_size),  # tokens/s of all ranks
        "total_tokens_M": step * TOTAL_BATCH_SIZE / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": DEPTH,
        "scan_backend": scan_backend,
    }, trained_tokens=step * TOTAL_BATCH_SIZE, dist=dist)
    if EXPORT_UPSTREAM_DIR and dist.rank == 0:
        export_upstream(model, EXPORT_UPSTREAM_DIR)  # below the speed section


# SECTION: Speed machinery (the knobs' checks, mamba_ssm's fused scans and their check, decoding)


def check_hyperparameters(tokens_per_micro_step):
    """One-line errors for impossible settings, in order: a comparison meets checked numbers."""
    g = globals()

    def number(name, test, requirement):
        value = g[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and test(value)
        return name, ok, f"must be {requirement}, got {value!r}"

    def writable(folder):  # a folder, or a place for one, where files can be made
        if os.path.exists(folder) and not os.path.isdir(folder):
            return False
        try:
            with tempfile.TemporaryFile(dir=folder if os.path.isdir(folder) else os.path.dirname(folder)):
                return True
        except OSError:
            return False

    def checks():
        yield prepare.one_of(g, "ARCHITECTURE", ("mamba-2", "mamba-3"))
        yield prepare.one_of(g, "COMPUTE_DTYPE", ("auto", "float32", "bfloat16", "float16"))
        yield prepare.one_of(g, "OPTIMIZER", ("muon", "adamw"))
        for name in ("IS_MIMO", "IS_OUTPROJ_NORM", "CHECKPOINT_BLOCKS", "COMPILE", "FUSED_KERNELS"):
            yield prepare.one_of(g, name, (True, False))
        yield from prepare.positive(g, "DEPTH", "D_MODEL", "D_STATE", "HEADDIM", "EXPAND", "NGROUPS", "D_CONV",
                                    "MIMO_RANK", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE", "MUON_NS_STEPS", "DT_MIN",
                                    "DT_MAX", "DT_INIT_FLOOR", "ADAM_EPS")
        yield "CHUNK_SIZE", isinstance(CHUNK_SIZE, int) and CHUNK_SIZE > 0, f"must be positive, got {CHUNK_SIZE!r}"
        yield number("MLP_EXPAND", lambda v: v >= 0 and v == int(v), "a whole number >= 0 (0 = no MLP)")
        yield "DT_MAX", DT_MAX >= DT_MIN, f"must be at least DT_MIN ({DT_MIN!r}), got {DT_MAX!r}"
        ranges = {">= 0": ("MATRIX_LR", "EMBEDDING_LR", "SCALAR_LR", "WEIGHT_DECAY", "A_FLOOR", "GRAD_CLIP"),
                  "in [0, 1)": ("ADAM_BETA1", "ADAM_BETA2", "MUON_MOMENTUM"),
                  "in [0, 1]": ("WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC"), "in (0, 1]": ("ROPE_FRACTION",)}
        tests = {">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1,
                 "in (0, 1]": lambda v: 0 < v <= 1}
        for requirement, names in ranges.items():
            yield from (number(name, tests[requirement], requirement) for name in names)
        yield ("WARMDOWN_RATIO", WARMUP_RATIO + WARMDOWN_RATIO <= 1,
               f"+ WARMUP_RATIO must be at most 1 (the whole budget), got {WARMDOWN_RATIO!r} + {WARMUP_RATIO!r}")
        yield ("ROPE_FRACTION", ARCHITECTURE != "mamba-3" or int(D_STATE * ROPE_FRACTION) >= 2,
               f"* D_STATE must give at least one rotary pair, got {ROPE_FRACTION!r} * {D_STATE!r}")
        yield ("HEADDIM", EXPAND * D_MODEL % HEADDIM == 0,
               f"must divide EXPAND * D_MODEL ({EXPAND * D_MODEL}), got {HEADDIM!r}")
        heads = EXPAND * D_MODEL // HEADDIM
        yield "NGROUPS", heads % NGROUPS == 0, f"must divide the {heads} heads, got {NGROUPS!r}"
        yield "SEED", isinstance(SEED, int) and not isinstance(SEED, bool), f"must be an integer, got {SEED!r}"
        if EXPORT_UPSTREAM_DIR:
            folder = os.path.abspath(EXPORT_UPSTREAM_DIR)
            yield ("EXPORT_UPSTREAM_DIR", os.path.isdir(os.path.dirname(folder)),
                   f"must be a folder whose parent exists, got {EXPORT_UPSTREAM_DIR!r}")
            yield ("EXPORT_UPSTREAM_DIR", writable(folder),
                   f"must be a folder this process can write in, got {EXPORT_UPSTREAM_DIR!r}")
        yield ("TOTAL_BATCH_SIZE", tokens_per_micro_step > 0 and TOTAL_BATCH_SIZE % tokens_per_micro_step == 0,
               f"must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN * processes ({tokens_per_micro_step}), "
               f"got {TOTAL_BATCH_SIZE!r}")

    prepare.check_hyperparameters("train_mamba", checks())


# A kernel enters FUSED only if it matches the pure scan: one with another convention never trains.


def _fused_candidates():  # {kind: (function, kernel name)} of the kernels that import
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
            # it turns dims (j, n/2 + j) for j < n / divisor (2 or 4); angles past ours are zero
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
    """ssd_scan in the kernel's arguments: x (b l h p), dt (b l h), A (h), D (h)."""
    y, _ = ssd_scan(x * dt[..., None].to(x.dtype), dt * A, B, C, chunk_size)
    return y + x * D[:, None].to(x.dtype)


PURE_SCANS = {"ssd": _pure_ssd_with_dt, "siso": mamba3_scan, "mimo": mamba3_scan}


def _random_scan_problem(kind, config, batch, length, device, dtype):
    """Scan inputs of the model's shapes in the ranges training sees."""
    c, gen = config, torch.Generator().manual_seed(0)
    h, g, n, p, r = c.expand * c.d_model // c.headdim, c.ngroups, c.d_state, c.headdim, c.mimo_rank
    a = int(c.d_state * c.rope_fraction) // 2

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

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
    low_precision = ("x", "B", "C", "Q", "K", "V", "Z")  # bf16 under autocast
    return {key: value.to(device=device, dtype=dtype if key in low_precision else torch.float32)
            for key, value in problem.items()}


def fused_matches_pure(fused, pure, problem, chunk_size, tolerance=0.05):
    """(ok, detail): output and input gradients against the pure scan's, relative errors."""
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
    """Fill FUSED where a kernel passes the check; returns what runs (scan_backend)."""
    FUSED.clear()
    if not (FUSED_KERNELS and device.type == "cuda"):
        return "torch"
    kind = "ssd" if config.architecture == "mamba-2" else ("mimo" if config.is_mimo else "siso")
    candidates = _fused_candidates()
    if kind not in candidates:
        print(f"scan backend: no mamba_ssm kernel for {kind} imports here; using the pure-PyTorch scan")
        return "torch"
    fused, name = candidates[kind]
    problem = _random_scan_problem(kind, config, 2, 4 * config.tokens_per_chunk, device, torch.bfloat16)
    try:
        ok, detail = fused_matches_pure(fused, PURE_SCANS[kind], problem, config.tokens_per_chunk)
    except Exception as e:  # an unsupported shape, a failed kernel build
        ok, detail = False, f"{type(e).__name__}: {e}"
    if not ok:
        print(f"scan backend: mamba_ssm {name} disagrees with the pure scan ({detail}); using the pure-PyTorch scan")
        return "torch"
    print(f"scan backend: mamba_ssm {name} ({detail} against the pure scan)")
    FUSED[config.architecture] = fused
    return f"mamba_ssm.{name}"


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens=64, temperature=1.0):
    """A sampled continuation of `prompt`, a token at a time from the carried states."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    cache = model.init_cache()
    logits = model(torch.tensor([ids], device=device), cache=cache)[:, -1]
    new_tokens = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]
        new_tokens.append(token.item())
        logits, cache = model.step(token, cache)
    return tokenizer.decode(new_tokens)


# END SECTION: Speed machinery


# SECTION: Export (weights from the MLX script, to mamba_ssm)


def load_mlx_parameters(model, arrays):
    """Copy the MLX model's flat {name: array} into `model`, naming a parameter that differs."""
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


UPSTREAM_NAMES = {"B_norm_weight": "B_norm.weight", "C_norm_weight": "C_norm.weight", "norm_weight": "norm.weight",
                  "conv.weight": "conv1d.weight", "conv.bias": "conv1d.bias"}


def upstream_state(model):
    """{upstream name: float32 CPU tensor}; the vocabulary padded to a multiple of 8, as upstream's."""
    out = {}
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu", torch.float32)
        if name == "embed.weight":
            value = F.pad(value, (0, 0, 0, -value.shape[0] % 8))
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
    """mamba_ssm's MambaConfig of a ModelConfig (its Mamba-3 chunk counts tokens)."""
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
    """pytorch_model.bin, then config.json (a complete export), each written whole or not at all."""
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


# END SECTION: Export


if __name__ == "__main__":
    prepare.run(main)
