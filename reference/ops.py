"""Every SambaY component as one plain NumPy function (SAMBAY.md section 4).

Glossary of dimension letters used in the shape comments:
    b     batch
    l     tokens in this call (queries)
    s     keys visible to this call (cached + new)
    d     hidden size H
    d_in  Mamba inner size Di = expand * H
    n     SSM state size ds
    k     conv width K
    r     dt rank R
    nh    query heads, nkv key/value heads, hd head dim

Weights use the PyTorch ``nn.Linear`` layout (out_features, in_features): ``y = x @ W.T + b``.
Everything is float32. ``bf16=True`` rounds to bfloat16 at the points where the original CUDA model
rounds (SAMBAY.md 4.0, points marked [r]); with ``bf16=False`` those roundings are skipped.
"""

from __future__ import annotations

import numpy as np

from .weights import round_to_bf16


def r(x: np.ndarray, bf16: bool) -> np.ndarray:
    """A rounding point [r] of SAMBAY.md 4.0: bf16 round-to-nearest-even in bf16 mode, else identity."""
    return round_to_bf16(x) if bf16 else x


# ---------------------------------------------------------------------------------------------
# Elementwise pieces and norms (SAMBAY.md 4.3, 4.4, 4.8)
# ---------------------------------------------------------------------------------------------

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def swiglu(gate, value, bf16=False):
    """CUDA jiterator `swiglu(x, y) = x*y/(1+exp(-x))` in fp32, output [r] (SAMBAY.md 4.0, 4.4)."""
    return r(gate * value / (1.0 + np.exp(-gate)), bf16)


def softplus(x):
    """mamba_ssm's softplus: log1p(exp(x)) for x <= 20, x itself above (SAMBAY.md 4.5 step 7)."""
    return np.where(x <= 20.0, np.log1p(np.exp(np.minimum(x, 20.0))), x)


def linear(x, weight, bias=None, bf16=False):
    """nn.Linear: x (..., in) @ W.T (out, in) + b, output [r]."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return r(y, bf16)


def layer_norm(x, weight, bias, eps, bf16=False):
    """nn.LayerNorm over the last axis, biased variance (SAMBAY.md 4.3). Input is the stream cast [r]."""
    x = r(x, bf16)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return r((x - mean) / np.sqrt(var + eps) * weight + bias, bf16)


def rms_norm(x, weight, eps=1e-5, bf16=False):
    """The differential attention sub-LN (`SambaYRMSNorm`): normalise in fp32, [r], times weight, [r]."""
    normed = r(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps), bf16)
    return r(normed * weight, bf16)


def mlp(x, fc1, fc2, bf16=False):
    """SwiGLU MLP (SAMBAY.md 4.4): fc1 gives [gate | value]; gate first."""
    gu = linear(x, fc1, bf16=bf16)                      # (b, l, 2I)
    gate, value = np.split(gu, 2, axis=-1)              # (b, l, I) each
    return linear(swiglu(gate, value, bf16), fc2, bf16=bf16)   # (b, l, d)


# ---------------------------------------------------------------------------------------------
# Mamba-1 pieces (SAMBAY.md 4.5, 5.2)
# ---------------------------------------------------------------------------------------------

def causal_conv1d(x, weight, bias, conv_state=None):
    """Depthwise causal conv + bias, *before* SiLU (SAMBAY.md 4.5 step 4; `causal_conv1d_fn`).

    x:          (b, l, d_in)  raw inputs of this call
    weight:     (d_in, k)     w[c, k-1] multiplies the current token
    conv_state: (b, d_in, k)  raw inputs of the last k earlier positions (zeros at sequence start)
    Returns (out (b, l, d_in), new conv_state (b, d_in, k) = last k raw inputs, the current one last).
    """
    b, l, d_in = x.shape
    k = weight.shape[1]
    if conv_state is None:
        conv_state = np.zeros((b, d_in, k), dtype=np.float32)
    history = np.concatenate([conv_state.transpose(0, 2, 1), x], axis=1)   # (b, k + l, d_in)
    out = np.zeros((b, l, d_in), dtype=np.float32)
    for j in range(k):
        # tap j sees the input k-1-j steps back: history index (t + k) - (k-1-j) = t + 1 + j
        out += weight[:, j] * history[:, 1 + j:1 + j + l]                 # (b, l, d_in)
    out += bias
    new_state = history[:, -k:].transpose(0, 2, 1).copy()                  # (b, d_in, k)
    return out, new_state


def selective_scan(u, delta, A, B, C, D, z=None, delta_bias=None, state=None):
    """The Mamba-1 selective scan over a whole sequence (SAMBAY.md 4.5 steps 7-9; `selective_scan_fn`
    with delta_softplus=True).

    u, delta: (b, l, d_in)   delta is dt_proj's output without bias
    A:        (d_in, n)      A = -exp(A_log)
    B, C:     (b, l, n)
    D:        (d_in,)
    z:        (b, l, d_in) or None: when given, y is gated by SiLU(z) (inside the kernel, fp32)
    state:    (b, d_in, n) or None (zeros)
    Returns (y (b, l, d_in), final state (b, d_in, n)).
    """
    b, l, d_in = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias
    delta = softplus(delta)                                               # (b, l, d_in)
    s = np.zeros((b, d_in, A.shape[1]), np.float32) if state is None else state.astype(np.float32)
    ys = np.empty((b, l, d_in), dtype=np.float32)
    for t in range(l):
        dA = np.exp(delta[:, t, :, None] * A)                             # (b, d_in, n)
        dBu = delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]  # (b, d_in, n)
        s = dA * s + dBu                                                  # s_t = exp(Δ A) s_{t-1} + Δ B u
        ys[:, t] = (s * C[:, t, None, :]).sum(-1)                         # (b, d_in)  y_t = C·s_t
    y = ys + D * u                                                        # + D u
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))                                    # · SiLU(z)
    return y, s


def selective_state_update(state, u, delta, A, B, C, D, z=None, delta_bias=None):
    """One decode step of the scan (SAMBAY.md 5.2; `selective_state_update`).

    state: (b, d_in, n); u, delta, z: (b, d_in); B, C: (b, n).
    Returns (y (b, d_in), new state (b, d_in, n)).
    """
    y, s = selective_scan(u[:, None], delta[:, None], A, B[:, None], C[:, None], D,
                          None if z is None else z[:, None], delta_bias, state)
    return y[:, 0], s


# ---------------------------------------------------------------------------------------------
# Mixers (SAMBAY.md 4.5, 4.6, 4.7)
# ---------------------------------------------------------------------------------------------

def mamba_mixer(a, w, prefix, cfg, state=None, produce_memory=False, bf16=False):
    """MAMBA (4.5) or, with produce_memory, MAMBA-MEM (4.6). `Phi3Mamba.forward` / `.step`.

    a:     (b, l, d) the normalised input
    state: None or (conv_state (b, d_in, k), ssm_state (b, d_in, n))
    Returns (out (b, l, d), memory (b, l, d_in) or None, new state).
    """
    d_in, rank, n = cfg.d_inner, cfg.dt_rank, cfg.mamba_d_state
    conv_state, ssm_state = state if state is not None else (None, None)
    xz = linear(a, w[prefix + "in_proj.weight"], bf16=bf16)              # (b, l, 2 d_in)
    x, z = xz[..., :d_in], xz[..., d_in:]                                # (b, l, d_in) each
    conv_w = w[prefix + "conv1d.weight"][:, 0, :]                        # (d_in, k)
    pre, conv_state = causal_conv1d(x, conv_w, w[prefix + "conv1d.bias"], conv_state)
    u = r(silu(pre), bf16)                                               # (b, l, d_in)
    xdbl = linear(u, w[prefix + "x_proj.weight"], bf16=bf16)             # (b, l, r + 2n)
    dt_raw, B, C = xdbl[..., :rank], xdbl[..., rank:rank + n], xdbl[..., rank + n:]
    delta = linear(dt_raw, w[prefix + "dt_proj.weight"], bf16=bf16)      # (b, l, d_in), bias in the scan
    A = -np.exp(w[prefix + "A_log"])                                     # (d_in, n)
    y, ssm_state = selective_scan(u, delta, A, B, C, w[prefix + "D"],
                                  z=None if produce_memory else z,
                                  delta_bias=w[prefix + "dt_proj.bias"], state=ssm_state)
    y = r(y, bf16)
    memory = None
    if produce_memory:
        memory = y                                                       # ungated read-out incl. D·u
        y = swiglu(z, memory, bf16)                                      # gate outside the kernel
    out = linear(y, w[prefix + "out_proj.weight"], bf16=bf16)            # (b, l, d)
    return out, memory, (conv_state, r(ssm_state, bf16))                 # the SSM cache is bf16 [r]


def gmu(a, w, prefix, memory, bf16=False):
    """Gated Memory Unit (SAMBAY.md 4.7): out_proj( SiLU(in_proj a) ⊙ memory ).

    a: (b, l, d); memory: (b, l, d_in) from the MAMBA-MEM layer at the same positions.
    """
    g = linear(a, w[prefix + "in_proj.weight"], bf16=bf16)               # (b, l, d_in)
    return linear(swiglu(g, memory, bf16), w[prefix + "out_proj.weight"], bf16=bf16)   # (b, l, d)


# ---------------------------------------------------------------------------------------------
# Differential attention (SAMBAY.md 4.8 - 4.11)
# ---------------------------------------------------------------------------------------------

def attention_mask(q_pos, k_pos, window=None):
    """Which keys each query sees: causal, and within `window` keys including itself (SAMBAY.md 4.9).

    q_pos: (l,) absolute positions of the queries; k_pos: (s,) of the keys. Returns bool (l, s).
    """
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    return allowed


def softmax_attention(q, k, v, mask, bf16=False):
    """softmax(q k^T / sqrt(hd) + mask) v for one head group, fp32 softmax, output [r] (an FA2 call).

    q: (b, l, hq, hd); k, v: (b, s, hk, hd) with hq a multiple of hk (GQA: head h uses h // (hq/hk));
    mask: (l, s) bool or None. A query that sees no key gets 0 (FlashAttention's rule).
    """
    hq, hk = q.shape[2], k.shape[2]
    group = hq // hk
    k = np.repeat(k, group, axis=2)                                      # (b, s, hq, hd)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])   # (b, hq, l, s)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    p = np.exp(scores - peak)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1.0)
    return r(np.einsum("bhls,bshd->blhd", p, v).astype(np.float32), bf16)   # (b, l, hq, hd)


def differential_attention(q, k, v, mask, lambdas, subln_weight, lambda_init, bf16=False):
    """The differential attention core (`FlashDiffCustomAttention`, SAMBAY.md 4.8).

    q: (b, l, nh, hd); k, v: (b, s, nkv, hd) in the original (un-striped) head order.
    lambdas: (lambda_q1, lambda_k1, lambda_q2, lambda_k2), each (hd,).
    Returns (b, l, nh, hd).
    """
    q1, q2 = q[:, :, 0::2], q[:, :, 1::2]          # (b, l, nh/2, hd): stripe 1 = even heads
    k1, k2 = k[:, :, 0::2], k[:, :, 1::2]          # (b, s, nkv/2, hd)
    v1, v2 = v[:, :, 0::2], v[:, :, 1::2]
    attn1 = np.concatenate([softmax_attention(q1, k1, v1, mask, bf16),
                            softmax_attention(q1, k1, v2, mask, bf16)], axis=-1)   # (b, l, nh/2, 2hd)
    attn2 = np.concatenate([softmax_attention(q2, k2, v1, mask, bf16),
                            softmax_attention(q2, k2, v2, mask, bf16)], axis=-1)
    lq1, lk1, lq2, lk2 = lambdas
    lambda_1 = r(np.exp(np.sum(lq1 * lk1, dtype=np.float32)), bf16)   # one scalar per layer
    lambda_2 = r(np.exp(np.sum(lq2 * lk2, dtype=np.float32)), bf16)
    lam = r(r(lambda_1 - lambda_2, bf16) + np.float32(lambda_init), bf16)
    diff = r(attn1 - r(lam * attn2, bf16), bf16)                        # (b, l, nh/2, 2hd)
    diff = rms_norm(diff, subln_weight, 1e-5, bf16)
    diff = r(diff * np.float32(1.0 - lambda_init), bf16)
    b, l, pairs, two_hd = diff.shape
    return diff.reshape(b, l, pairs * 2, two_hd // 2)                   # "H (two D) -> (H two) D"


def split_qkv(qkv, nh, nkv, hd):
    """Wqkv output rows are [q | k | v], each head-major (SAMBAY.md 3.5)."""
    b, l, _ = qkv.shape
    q = qkv[..., :nh * hd].reshape(b, l, nh, hd)
    k = qkv[..., nh * hd:(nh + nkv) * hd].reshape(b, l, nkv, hd)
    v = qkv[..., (nh + nkv) * hd:].reshape(b, l, nkv, hd)
    return q, k, v


def attention_output(o, w, prefix, bf16=False):
    """(b, l, nh, hd) -> head-major (b, l, nh*hd) -> out_proj with bias."""
    b, l = o.shape[:2]
    return linear(o.reshape(b, l, -1), w[prefix + "out_proj.weight"], w[prefix + "out_proj.bias"], bf16)


def lambdas_of(w, prefix):
    p = prefix + "inner_cross_attn."
    return tuple(w[p + name] for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
