"""Plain-ops MLX versions of the selective scan, its decode step and the GMU gate.

These are the fallback path and the oracle of the Metal kernels (``kernels.py``): the model calls the
dispatching functions there, which pick a kernel or these.

Shapes: u, delta, z (b, l, d_in); A (d_in, n); B, C (b, l, n); D, delta_bias (d_in,); state (b, d_in, n).
"""

from __future__ import annotations

import mlx.core as mx


def softplus(x: mx.array) -> mx.array:
    """mamba_ssm's softplus with threshold 20 (SAMBAY.md 4.5 step 7)."""
    return mx.where(x <= 20.0, mx.log1p(mx.exp(mx.minimum(x, 20.0))), x)


def silu_gate(y: mx.array, z: mx.array) -> mx.array:
    """y * SiLU(z), as the scan kernel gates: y * z / (1 + exp(-z))."""
    return y * z * mx.sigmoid(z)


@mx.compile
def _scan_step(s, dA, dBu, C):
    s = dA * s + dBu                                  # (b, d_in, n)
    return s, (s * C[:, None, :]).sum(-1)            # y_t (b, d_in)


def selective_scan_ops(u, delta, A, B, C, D, z=None, delta_bias=None, state=None):
    """Whole-sequence selective scan; returns (y (b, l, d_in), final state (b, d_in, n))."""
    b, l, d_in = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias
    delta = softplus(delta)
    dA = mx.exp(delta[..., None] * A)                                    # (b, l, d_in, n)
    dBu = (delta * u)[..., None] * B[:, :, None, :]                      # (b, l, d_in, n)
    s = mx.zeros((b, d_in, A.shape[1]), dtype=mx.float32) if state is None else state.astype(mx.float32)
    ys = []
    for t in range(l):
        s, y_t = _scan_step(s, dA[:, t], dBu[:, t], C[:, t])
        ys.append(y_t)
    y = mx.stack(ys, axis=1) + D * u
    if z is not None:
        y = silu_gate(y, z)
    return y, s


def selective_state_update_ops(state, u, delta, A, B, C, D, z=None, delta_bias=None):
    """One decode step: u, delta, z (b, d_in); B, C (b, n). Returns (y (b, d_in), new state)."""
    if delta_bias is not None:
        delta = delta + delta_bias
    delta = softplus(delta)
    dA = mx.exp(delta[..., None] * A)                                    # (b, d_in, n)
    s = dA * state + (delta * u)[..., None] * B[:, None, :]
    y = (s * C[:, None, :]).sum(-1) + D * u
    if z is not None:
        y = silu_gate(y, z)
    return y, s


def gmu_gate_ops(g: mx.array, memory: mx.array) -> mx.array:
    """The GMU's elementwise gate SiLU(g) ⊙ memory (SAMBAY.md 4.7)."""
    return g * mx.sigmoid(g) * memory
