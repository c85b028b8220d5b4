"""One-token step references for the MLX scans: the recurrences written directly from the math, token by token, in
float32 with MLX's exact transcendentals. They are the oracles the chunked scans of train_mamba_3_mlx.py (and the
same scans in train_hybrid_moe_mlx.py) are tested against; training never runs them."""

import math

import mlx.core as mx


def silu(x):
    return x * mx.sigmoid(x)


def ssd_step(X, A, B, C, state):
    """One token of the SSD recurrence S_t = exp(A_t) S_{t-1} + X_t B_t^T, Y_t = S_t C_t.
    X [b h p], A [b h], B, C [b g n], state [b h p n] -> (Y [b h p] float32, new state)."""
    h, g = X.shape[1], B.shape[1]
    B, C = (mx.repeat(t.astype(mx.float32), h // g, axis=1) for t in (B, C))  # [b h n]
    X, A = X.astype(mx.float32), A.astype(mx.float32)
    state = mx.exp(A)[..., None, None] * state + X[..., :, None] * B[..., None, :]
    Y = (state @ C[..., None])[..., 0]
    return Y, state


def mamba3_step_common(Q, K, ADT, DT, Trap, Q_bias, K_bias, Angles, state, mimo):
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

    def rotate(x):  # (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) on a pairs, as upstream pairs them: SISO the
        a = theta.shape[-1]  # adjacent (0,1), (2,3), ...; MIMO (j, n/2 + j), j < a; the other dims unturned
        if mimo:
            half = x.shape[-1] // 2
            x0, x1 = x[..., :a], x[..., half : half + a]
            return mx.concatenate([x0 * cos - x1 * sin, x[..., a:half], x0 * sin + x1 * cos, x[..., half + a :]], -1)
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
    theta, ssm, k_prev, v_prev, q, k, alpha, beta, gamma = mamba3_step_common(Q, K, ADT, DT, Trap, Q_bias, K_bias,
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
    theta, ssm, k_prev, v_prev, q, k, alpha, beta, gamma = mamba3_step_common(Q, K, ADT, DT, Trap, Q_bias, K_bias,
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
