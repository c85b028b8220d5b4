"""Upstream's layout and math, reproduced for the parity tests (tests/test_upstream_parity.py); training never runs it.

Upstream = state-spaces/mamba: `MambaLMHeadModel` (mamba_ssm/models/mixer_seq_simple.py) with `Mamba3` or `Mamba2`
mixers (mamba_ssm/modules/mamba3.py, mamba2.py). What is here, written for these tests from reading that source:
  - `upstream_shapes(config)`: the names and shapes of that model's state_dict;
  - `random_upstream_state(config)`: random float64 weights in that layout, away from the inits;
  - `lm_logits` / `lm_step`: the model as a plain token-by-token recurrence in float64 (upstream's decode math: the
    in_proj split, the B/C norms and biases, the rotation, the exponential-trapezoidal state update, the gate, the
    MIMO projections; Mamba-2's conv window and SSD step; the pre-norm blocks, the tied head);
  - `mamba3_mimo_kernel_model`: upstream's fused MIMO kernel `mamba3_mimo` (ops/tilelang/mamba3/mamba3_mimo.py) by
    its positional interface, as a differentiable recurrence with the kernel's own rotation pairing;
  - the weight mappings between upstream's state_dict and each of our script families (`mlx_*`, `hybrid_*`,
    `torch_*`: `*_to_upstream(state) -> dict`, `*_from_upstream(dict) -> state`).

Rotation pairing (the one convention that differs between upstream's paths): SISO turns adjacent state dims
(2j, 2j+1), j < a (its Triton kernels and its step/forward references); MIMO turns (j, n/2 + j), j < a (its TileLang
kernel, `Mamba3.step` with rotate_pairwise=False, and the kernel-aligned chunk reference). Dims past the pairs pass
through. Only upstream's MIMO *step* test reference uses adjacent pairs; `pairing=` below can model it.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------------
# Configuration and layout


def config(layer="Mamba3", d_model=32, n_layer=2, vocab_size=64, d_intermediate=0, **ssm_cfg):
    """An upstream MambaConfig as a dict (rms_norm, residual_in_fp32, tied embeddings: upstream's defaults), with the
    mixer's kwargs in ssm_cfg. Mixer defaults here are upstream's, except d_state (upstream 128)."""
    defaults = dict(d_state=16, headdim=16, expand=2, ngroups=1)
    if layer == "Mamba3":
        defaults.update(rope_fraction=0.5, is_mimo=False, mimo_rank=4, is_outproj_norm=False, A_floor=1e-4)
    else:
        defaults.update(d_conv=4)
    return dict(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, d_intermediate=d_intermediate,
                ssm_cfg=dict(defaults, layer=layer, **ssm_cfg))


def padded_vocab(cfg, multiple=8):
    v = cfg["vocab_size"]
    return v + (-v % multiple)


def mixer_sizes(cfg):
    """Derived sizes as upstream's __init__ computes them."""
    s = cfg["ssm_cfg"]
    d_inner = int(s["expand"] * cfg["d_model"])
    sizes = dict(d_inner=d_inner, h=d_inner // s["headdim"], p=s["headdim"], n=s["d_state"], g=s["ngroups"])
    if s["layer"] == "Mamba3":
        rotary = int(s["d_state"] * s["rope_fraction"])
        rotary -= rotary % 2
        sizes.update(a=rotary // 2, r=s["mimo_rank"] if s["is_mimo"] else 1)
    else:
        sizes.update(K=s["d_conv"], conv_dim=d_inner + 2 * s["ngroups"] * s["d_state"])
    return sizes


def mlp_hidden(cfg):
    """GatedMLP's hidden width: d_intermediate rounded up to a multiple of 128 (mamba_ssm/modules/mlp.py)."""
    return -(-cfg["d_intermediate"] // 128) * 128


def upstream_shapes(cfg):
    """{state_dict name: shape} of upstream's MambaLMHeadModel(config)."""
    z = mixer_sizes(cfg)
    s = cfg["ssm_cfg"]
    d, d_inner, h, p, n, g = cfg["d_model"], z["d_inner"], z["h"], z["p"], z["n"], z["g"]
    if s["layer"] == "Mamba3":
        r, a = z["r"], z["a"]
        mixer = {"in_proj.weight": (2 * d_inner + 2 * n * g * r + 3 * h + a, d), "dt_bias": (h,),
                 "B_bias": (h, r, n), "C_bias": (h, r, n), "B_norm.weight": (n,), "C_norm.weight": (n,)}
        if s["is_mimo"]:
            mixer.update({"mimo_x": (h, r, p), "mimo_z": (h, r, p), "mimo_o": (h, r, p)})
        mixer["D"] = (h,)
        if s["is_outproj_norm"]:
            mixer["norm.weight"] = (d_inner,)
    else:
        C = z["conv_dim"]
        mixer = {"in_proj.weight": (2 * d_inner + 2 * g * n + h, d), "conv1d.weight": (C, 1, z["K"]),
                 "conv1d.bias": (C,), "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (d_inner,)}
    mixer["out_proj.weight"] = (d, d_inner)
    shapes = {"backbone.embedding.weight": (padded_vocab(cfg), d)}
    for i in range(cfg["n_layer"]):
        shapes[f"backbone.layers.{i}.norm.weight"] = (d,)
        shapes.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in mixer.items()})
        if cfg["d_intermediate"] > 0:
            hid = mlp_hidden(cfg)
            shapes[f"backbone.layers.{i}.norm2.weight"] = (d,)
            shapes[f"backbone.layers.{i}.mlp.fc1.weight"] = (2 * hid, d)
            shapes[f"backbone.layers.{i}.mlp.fc2.weight"] = (d, hid)
    shapes["backbone.norm_f.weight"] = (d,)
    shapes["lm_head.weight"] = (padded_vocab(cfg), d)
    return shapes


def random_upstream_state(cfg, seed=0):
    """Random float64 weights in upstream's layout, moved off the inits (biases of 1, equal MIMO weights, tiny dt) so
    a mixed-up axis or pairing shows: dt ~ softplus(U(-1, 1)) turns the angles by radians within a few tokens."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    r = mixer_sizes(cfg).get("r", 1)
    state = {}
    for name, shape in upstream_shapes(cfg).items():
        leaf, last = ".".join(name.split(".")[-2:]), name.split(".")[-1]
        if name == "lm_head.weight":
            state[name] = state["backbone.embedding.weight"]  # tied
        elif name == "backbone.embedding.weight":
            state[name] = randn(*shape)
        elif last == "dt_bias":
            state[name] = uniform(-1.0, 1.0, *shape)
        elif last == "A_log":
            state[name] = torch.log(uniform(1.0, 16.0, *shape))
        elif last in ("mimo_x", "mimo_o"):
            state[name] = 1.0 / r + 0.3 * randn(*shape)
        elif len(shape) == 1 or last in ("B_bias", "C_bias", "mimo_z"):
            state[name] = 1.0 + 0.3 * randn(*shape)  # norm weights, biases, D, conv bias
        elif leaf == "conv1d.weight":
            state[name] = uniform(-0.5, 0.5, *shape)
        else:  # projections: torch Linear's init range
            state[name] = uniform(-1.0, 1.0, *shape) / math.sqrt(shape[-1])
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The reference model: upstream's math, one token at a time, float64


def rms_norm(x, weight=None, eps=1e-5):
    out = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def heavy_tail(x):  # upstream's heavy_tail_activation (PyPI 2.3.2.post1 still used softplus)
    return x.clamp_min(0) + torch.reciprocal(1 - x.clamp_max(0))


def rotate_adjacent(x, theta):
    """Turn (2j, 2j+1) by theta[..., j] for j < a; the rest of x (..., n) passes through (upstream's SISO)."""
    a = theta.shape[-1]
    x0, x1 = x[..., 0 : 2 * a : 2], x[..., 1 : 2 * a : 2]
    cos, sin = torch.cos(theta), torch.sin(theta)
    out = x.clone()
    out[..., 0 : 2 * a : 2] = x0 * cos - x1 * sin
    out[..., 1 : 2 * a : 2] = x0 * sin + x1 * cos
    return out


def rotate_halves(x, theta):
    """Turn (j, n/2 + j) by theta[..., j] for j < a; the rest passes through (upstream's MIMO kernel and step)."""
    a, half = theta.shape[-1], x.shape[-1] // 2
    x0, x1 = x[..., :a], x[..., half : half + a]
    cos, sin = torch.cos(theta), torch.sin(theta)
    out = x.clone()
    out[..., :a] = x0 * cos - x1 * sin
    out[..., half : half + a] = x0 * sin + x1 * cos
    return out


ROTATIONS = {"adjacent": rotate_adjacent, "halves": rotate_halves}


def mamba3_token(q, k, x, ADT, DT, trap, angles, mimo_x, D, state, pairing):
    """One token of upstream's Mamba-3 recurrence (`mamba3_siso_step_ref` / `mamba3_MIMO_step_ref` math).
    q, k (b r h n): C, B after their norm, expanded to heads, biases added, not yet rotated; x (b h p); ADT, DT,
    trap (before sigmoid) (b h); angles (b h a) before tanh; mimo_x (h r p) or None (SISO); D (h,);
    state (angle (b h a), S (b h p n), k (b r h n) rotated, x (b h p)). -> (o (b r h p) = S q_r + D v_r, new state)."""
    angle, S, k_prev, x_prev = state
    angle = torch.remainder(angle + math.pi * torch.tanh(angles) * DT[..., None], 2 * math.pi)
    rotate = ROTATIONS[pairing]
    q, k = rotate(q, angle[:, None]), rotate(k, angle[:, None])
    lam = torch.sigmoid(trap)
    alpha = torch.exp(ADT)
    beta, gamma = (1 - lam) * DT * alpha, lam * DT

    def up(v):  # (b h p) -> (b r h p)
        return v[:, None] if mimo_x is None else v[:, None] * mimo_x.transpose(0, 1)

    v, v_prev = up(x), up(x_prev)
    S = (alpha[..., None, None] * S + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
         + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v, k))
    o = torch.einsum("bhpn,brhn->brhp", S, q) + D[:, None] * v
    return o, (angle, S, k, x)


def mamba3_mixer_step(w, cfg, u, state, pairing=None):
    """Upstream `Mamba3` on one token: w = {name without 'mixer.': tensor}, u (b, d_model)."""
    s, z_ = cfg["ssm_cfg"], mixer_sizes(cfg)
    d_inner, h, p, n, g, r, a = (z_[k] for k in ("d_inner", "h", "p", "n", "g", "r", "a"))
    pairing = pairing or ("halves" if s["is_mimo"] else "adjacent")
    b = u.shape[0]
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
        u @ w["in_proj.weight"].T, [d_inner, d_inner, r * g * n, r * g * n, h, h, h, a], dim=-1)
    B = rms_norm(B.reshape(b, r, g, n), w["B_norm.weight"]).repeat_interleave(h // g, dim=2)  # (b r h n)
    C = rms_norm(C.reshape(b, r, g, n), w["C_norm.weight"]).repeat_interleave(h // g, dim=2)
    k = B + w["B_bias"].transpose(0, 1)
    q = C + w["C_bias"].transpose(0, 1)
    A = torch.clamp(-heavy_tail(dd_A), max=-s["A_floor"])
    DT = F.softplus(dd_dt + w["dt_bias"])
    angles = angles[:, None].expand(b, h, a)  # one set per token, shared by the heads
    mimo_x = w["mimo_x"] if s["is_mimo"] else None
    x, z = x.reshape(b, h, p), z.reshape(b, h, p)
    o, state = mamba3_token(q, k, x, A * DT, DT, trap, angles, mimo_x, w["D"], state, pairing)  # o (b r h p)
    z_r = z[:, None] * w["mimo_z"].transpose(0, 1) if s["is_mimo"] else z[:, None]
    if s["is_outproj_norm"]:  # RMSNormGated(group_size=headdim, norm_before_gate=True), per rank
        o = rms_norm(o, w["norm.weight"].reshape(h, p))
    o = o * F.silu(z_r)
    y = (o * w["mimo_o"].transpose(0, 1)).sum(dim=1) if s["is_mimo"] else o[:, 0]
    return y.reshape(b, d_inner) @ w["out_proj.weight"].T, state


def mamba2_mixer_step(w, cfg, u, state):
    """Upstream `Mamba2.step` (its pure-PyTorch path: rolled conv window, then the discretised SSM step) on one token;
    heads of a group share B and C (head = group * h/g + j, as the chunked kernels).
    state (conv (b C K), S (b h p n))."""
    z_ = mixer_sizes(cfg)
    d_inner, h, p, n, g = (z_[k] for k in ("d_inner", "h", "p", "n", "g"))
    b = u.shape[0]
    conv_state, S = state
    z, xBC, dt = torch.split(u @ w["in_proj.weight"].T, [d_inner, z_["conv_dim"], h], dim=-1)
    conv_state = torch.cat([conv_state[:, :, 1:], xBC[:, :, None]], dim=-1)  # roll, newest last
    xBC = F.silu((conv_state * w["conv1d.weight"][:, 0]).sum(dim=-1) + w["conv1d.bias"])
    x, B, C = torch.split(xBC, [d_inner, g * n, g * n], dim=-1)
    B = B.reshape(b, g, n).repeat_interleave(h // g, dim=1)
    C = C.reshape(b, g, n).repeat_interleave(h // g, dim=1)
    dt = F.softplus(dt + w["dt_bias"])
    A = -torch.exp(w["A_log"])
    x = x.reshape(b, h, p)
    S = S * torch.exp(dt * A)[..., None, None] + torch.einsum("bh,bhn,bhp->bhpn", dt, B, x)
    y = torch.einsum("bhpn,bhn->bhp", S, C) + w["D"][:, None] * x
    y = y.reshape(b, d_inner) * F.silu(z)  # norm_before_gate=False: gate, then the grouped norm
    y = rms_norm(y.reshape(b, g, -1)).reshape(b, d_inner) * w["norm.weight"]
    return y @ w["out_proj.weight"].T, (conv_state, S)


def init_cache(cfg, batch):
    """Upstream's allocate_inference_cache layout per layer: Mamba-3 (angle (b h a), ssm (b h p n), k (b r h n), v
    (b h p)), SISO with r = 1; Mamba-2 (conv (b conv_dim d_conv), ssm (b h p n))."""
    z = mixer_sizes(cfg)
    f64 = dict(dtype=torch.float64)
    if cfg["ssm_cfg"]["layer"] == "Mamba3":
        one = (torch.zeros(batch, z["h"], z["a"], **f64), torch.zeros(batch, z["h"], z["p"], z["n"], **f64),
               torch.zeros(batch, z["r"], z["h"], z["n"], **f64), torch.zeros(batch, z["h"], z["p"], **f64))
    else:
        one = (torch.zeros(batch, z["conv_dim"], z["K"], **f64), torch.zeros(batch, z["h"], z["p"], z["n"], **f64))
    return [one for _ in range(cfg["n_layer"])]


def lm_step(state, cfg, token_ids, cache, pairing=None):
    """MambaLMHeadModel on one token: token_ids (b,) -> (logits (b, padded vocab) float64, new cache)."""
    x = state["backbone.embedding.weight"][token_ids]
    new_cache = []
    for i, layer_state in enumerate(cache):
        prefix = f"backbone.layers.{i}."
        w = {k[len(prefix) + 6 :]: v for k, v in state.items() if k.startswith(prefix + "mixer.")}
        hidden = rms_norm(x, state[prefix + "norm.weight"])
        if cfg["ssm_cfg"]["layer"] == "Mamba3":
            y, layer_state = mamba3_mixer_step(w, cfg, hidden, layer_state, pairing)
        else:
            y, layer_state = mamba2_mixer_step(w, cfg, hidden, layer_state)
        x = x + y  # residual in float (residual_in_fp32); fused_add_norm only fuses this add with the next norm
        if cfg["d_intermediate"] > 0:
            normed = rms_norm(x, state[prefix + "norm2.weight"])
            h_mlp, gate = (normed @ state[prefix + "mlp.fc1.weight"].T).chunk(2, -1)
            x = x + (h_mlp * F.silu(gate)) @ state[prefix + "mlp.fc2.weight"].T
        new_cache.append(layer_state)
    return rms_norm(x, state["backbone.norm_f.weight"]) @ state["lm_head.weight"].T, new_cache


def lm_logits(state, cfg, ids, pairing=None):
    """ids (b, l) -> (logits (b, l, padded vocab) float64, cache after the last token), token by token."""
    ids = torch.as_tensor(np.asarray(ids)).long()
    cache = init_cache(cfg, ids.shape[0])
    out = []
    for t in range(ids.shape[1]):
        logits, cache = lm_step(state, cfg, ids[:, t], cache, pairing)
        out.append(logits)
    return torch.stack(out, dim=1), cache


def relabel_mimo_to_adjacent(state, cfg):
    """The same model with the state dims relabelled so that upstream's halves pairs (j, n/2 + j) sit on adjacent
    slots (2j, 2j+1): B/C rows of in_proj (every rank and group), the B/C biases and norm weights permuted. Run with
    pairing="adjacent", it equals the original with "halves" (what a checkpoint would need without the same pairing)."""
    z = mixer_sizes(cfg)
    d_inner, h, n, g, r = (z[k] for k in ("d_inner", "h", "n", "g", "r"))
    perm = adjacent_slots_of_halves(n, z["a"])
    out = dict(state)
    for name in state:
        if name.endswith("B_bias") or name.endswith("C_bias"):
            out[name] = state[name][..., perm]
        elif name.endswith("B_norm.weight") or name.endswith("C_norm.weight"):
            out[name] = state[name][perm]
        elif name.endswith("mixer.in_proj.weight"):
            rows = torch.arange(state[name].shape[0])
            for start in (2 * d_inner, 2 * d_inner + r * g * n):  # B, then C: (r g n) blocks of n
                block = rows[start : start + r * g * n].reshape(r * g, n)
                rows[start : start + r * g * n] = block[:, perm].reshape(-1)
            out[name] = state[name][rows]
    return out


def adjacent_slots_of_halves(n, a):
    """perm with x[..., perm] placing dim j at slot 2j and dim n/2 + j at slot 2j + 1 (j < a), the other dims after
    them in order: rotate_adjacent(x[..., perm], t) == rotate_halves(x, t)[..., perm]."""
    pairs = [d for j in range(a) for d in (j, n // 2 + j)]
    return pairs + [d for d in range(n) if d not in pairs]


# ---------------------------------------------------------------------------------------------------------------------
# Upstream's fused MIMO kernel, modelled (for the CPU test of train_mamba.py's fused_mimo wrapper)


def mamba3_mimo_kernel_model(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                             chunk_size, rotary_dim_divisor, dtype, return_state=False, pairing="halves", **unused):
    """`mamba_ssm.ops.tilelang.mamba3.mamba3_mimo.mamba3_mimo` by its positional interface and its asserts, as a
    differentiable token-by-token recurrence: Q, K (b l r g n), V, Z (b l h p), ADT, DT, Trap (b h l), Q_bias, K_bias
    (h r n), MIMO_* (h r p), Angles (b l h n // rotary_dim_divisor) before tanh, D (h,). The kernel's pairing: dims
    (j, n/2 + j) for j < n / rotary_dim_divisor (mamba3_mimo_fwd.py: q[n] with q[N//2 + n]); pairing="adjacent" models
    a kernel of another convention (the start-up check must reject it)."""
    b, l, r, g, n = Q.shape
    h = V.shape[2]
    assert chunk_size >= 8, "chunk_size must be at least 8"
    assert rotary_dim_divisor in [2, 4], "currently only supports rotary embedding on entire or half of headdim_qk"
    assert Angles.shape == (b, l, h, n // rotary_dim_divisor), f"Angles {tuple(Angles.shape)}"
    f64 = torch.float64
    state = (torch.zeros(b, h, n // rotary_dim_divisor, dtype=f64), torch.zeros(b, h, V.shape[-1], n, dtype=f64),
             torch.zeros(b, r, h, n, dtype=f64), torch.zeros(b, h, V.shape[-1], dtype=f64))
    q_all = Q.to(f64).repeat_interleave(h // g, dim=3) + Q_bias.to(f64).transpose(0, 1)  # (b l r h n)
    k_all = K.to(f64).repeat_interleave(h // g, dim=3) + K_bias.to(f64).transpose(0, 1)
    out = []
    for t in range(l):
        o, state = mamba3_token(q_all[:, t], k_all[:, t], V[:, t].to(f64), ADT[:, :, t].to(f64), DT[:, :, t].to(f64),
                                Trap[:, :, t].to(f64), Angles[:, t].to(f64), MIMO_V.to(f64), D.to(f64), state,
                                pairing)
        if Z is not None:
            o = o * F.silu(Z[:, t, None].to(f64) * MIMO_Z.to(f64).transpose(0, 1))
        if MIMO_Out is not None:
            o = (o * MIMO_Out.to(f64).transpose(0, 1)).sum(dim=1)
        out.append(o)
    y = torch.stack(out, dim=1)  # (b l h p), or (b l r h p) without MIMO_Out
    return y.to(V.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Weight mappings: upstream's state_dict <-> ours. The MLX script and the torch mirror share their parameter names;
# the hybrid's Mamba blocks hold the mixer as `layer`. Values pass through untouched (views), except the conv taps
# (ours (K, C), upstream (C, 1, K)) and the vocab rows (upstream pads the vocab to a multiple of 8).

_MIXER_RENAMES = {"B_norm_weight": "B_norm.weight", "C_norm_weight": "C_norm.weight", "norm_weight": "norm.weight",
                  "conv.weight": "conv1d.weight", "conv.bias": "conv1d.bias"}
_BLOCK_RENAMES = {"norm.weight": "norm.weight", "mlp_norm.weight": "norm2.weight", "mlp.fc1.weight": "mlp.fc1.weight",
                  "mlp.fc2.weight": "mlp.fc2.weight"}


def _pad_rows(value, multiple):
    pad = -value.shape[0] % multiple
    if not pad:
        return value
    if isinstance(value, np.ndarray):
        return np.concatenate([value, np.zeros((pad, *value.shape[1:]), value.dtype)])
    return torch.cat([value, value.new_zeros(pad, *value.shape[1:])])


def _to_upstream(state, mixer, pad_vocab_size_multiple):
    out = {}
    for name, value in state.items():
        if name == "embed.weight":
            out["backbone.embedding.weight"] = out["lm_head.weight"] = _pad_rows(value, pad_vocab_size_multiple)
            continue
        if name == "norm_f.weight":
            out["backbone.norm_f.weight"] = value
            continue
        layers, i, rest = name.split(".", 2)
        if layers != "layers":
            raise KeyError(f"no upstream name for {name}")
        if rest in _BLOCK_RENAMES:
            out[f"backbone.layers.{i}.{_BLOCK_RENAMES[rest]}"] = value
            continue
        if not rest.startswith(mixer + "."):
            raise KeyError(f"no upstream name for {name}")
        rest = rest[len(mixer) + 1 :]
        if rest == "conv.weight":
            value = value.T[:, None, :]  # (K, C) -> (C, 1, K)
        out[f"backbone.layers.{i}.mixer.{_MIXER_RENAMES.get(rest, rest)}"] = value
    return out


def _from_upstream(upstream, mixer, vocab_size):
    inverse_mixer = {v: k for k, v in _MIXER_RENAMES.items()}
    inverse_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    out = {}
    for name, value in upstream.items():
        if name == "lm_head.weight":
            emb = upstream["backbone.embedding.weight"]
            if value is not emb and not (value.shape == emb.shape and bool((value == emb).all())):
                raise ValueError("lm_head.weight is not tied to backbone.embedding.weight; ours ties them")
            continue
        if name == "backbone.embedding.weight":
            out["embed.weight"] = value if vocab_size is None else value[:vocab_size]
            continue
        if name == "backbone.norm_f.weight":
            out["norm_f.weight"] = value
            continue
        backbone, layers, i, rest = name.split(".", 3)
        if (backbone, layers) != ("backbone", "layers"):
            raise KeyError(f"no name of ours for {name}")
        if rest in inverse_block:
            out[f"layers.{i}.{inverse_block[rest]}"] = value
            continue
        if not rest.startswith("mixer."):
            raise KeyError(f"no name of ours for {name}")
        rest = rest[len("mixer.") :]
        if rest == "conv1d.weight":
            value = value[:, 0, :].T  # (C, 1, K) -> (K, C)
        out[f"layers.{i}.{mixer}.{inverse_mixer.get(rest, rest)}"] = value
    return out


def mlx_to_upstream(state, pad_vocab_size_multiple=8):
    """train_mamba_3_mlx.MambaLM's {name: numpy array} (dict of tree_flatten(model.parameters()), as numpy) ->
    upstream's MambaLMHeadModel state_dict names (numpy)."""
    return _to_upstream(state, "mixer", pad_vocab_size_multiple)


def mlx_from_upstream(upstream, vocab_size=None):
    """Upstream state_dict (numpy or anything np.asarray takes) -> MambaLM's {name: numpy array}; vocab_size drops
    upstream's padding rows."""
    return _from_upstream({k: np.asarray(v) for k, v in upstream.items()}, "mixer", vocab_size)


def hybrid_to_upstream(state, pattern, pad_vocab_size_multiple=8):
    """train_hybrid_moe_mlx.HybridLM's {name: numpy array}, for a pattern of Mamba blocks only ("M" * depth: upstream's
    LM has no MoE, and its attention is another module) -> upstream's names."""
    if set(pattern) != {"M"}:
        raise ValueError(f"only Mamba blocks map onto MambaLMHeadModel; pattern {pattern!r}")
    return _to_upstream(state, "layer", pad_vocab_size_multiple)


def hybrid_from_upstream(upstream, vocab_size=None):
    return _from_upstream({k: np.asarray(v) for k, v in upstream.items()}, "layer", vocab_size)


def torch_to_upstream(state_dict, pad_vocab_size_multiple=8):
    """train_mamba.MambaLM's state_dict -> upstream's names (torch tensors, float32 as ours)."""
    return _to_upstream(dict(state_dict), "mixer", pad_vocab_size_multiple)


def torch_from_upstream(upstream, vocab_size=None):
    """Upstream state_dict -> a state_dict for train_mamba.MambaLM.load_state_dict."""
    return _from_upstream({k: torch.as_tensor(v) for k, v in upstream.items()}, "mixer", vocab_size)


def decode_state_to_upstream(state, layer):
    """One layer's decode state of ours -> upstream's layout, as numpy float64. Mamba-3: (angle, ssm, k, x) with the
    SISO k (b h n) given upstream's rank axis (b 1 h n). Mamba-2: ours keeps the last K-1 conv inputs (b K-1 C),
    upstream the last K (b C K) whose oldest is never read again: returned as (b C K-1), upstream's [..., 1:]."""
    arrays = [np.asarray(s, dtype=np.float64) for s in state]
    if layer == "Mamba3":
        angle, ssm, k, x = arrays
        return angle, ssm, (k[:, None] if k.ndim == 3 else k), x
    conv, ssm = arrays
    return conv.transpose(0, 2, 1), ssm
