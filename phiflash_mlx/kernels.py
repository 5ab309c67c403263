"""Selective scan, scan step and GMU gate: Metal kernels where Metal is available, plain ops elsewhere.

Placeholder dispatch (the kernels are added separately); the model calls only these three functions.
"""

from __future__ import annotations

from .ssm import gmu_gate_ops, selective_scan_ops, selective_state_update_ops


def selective_scan(u, delta, A, B, C, D, z=None, delta_bias=None, state=None, use_kernel=None):
    return selective_scan_ops(u, delta, A, B, C, D, z, delta_bias, state)


def selective_state_update(state, u, delta, A, B, C, D, z=None, delta_bias=None, use_kernel=None):
    return selective_state_update_ops(state, u, delta, A, B, C, D, z, delta_bias)


def gmu_gate(g, memory, use_kernel=None):
    return gmu_gate_ops(g, memory)
