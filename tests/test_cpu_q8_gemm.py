"""The prefill kernel of the int8-activation products (phiflash_mlx/cpu/csrc/q8_gemm.c: weight rows in
vector lanes) against the NumPy float64 emulation of the integer math that tests/test_cpu_q8.py
documents, and against q8.c's block kernel."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from test_cpu_q8 import BEST, LIB, emulate, pack, q8_product, random_case
from test_cpu_scales16 import DTYPES, spread, to_16   # (at import: inside a @given test it nests @given)

pytestmark = pytest.mark.skipif(LIB is None, reason="the C kernels were not built (Linux only; see setup.py)")


def gemm(x, w, scales, biases, bits, group_size, threads=1, level=-1):
    """phf_q8_gemm directly: (return code, y); y stays NaN where nothing was written."""
    m, k = x.shape
    n = w.shape[0]
    y = np.full((m, n), np.nan, np.float32)
    x, scales, biases = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, scales, biases))
    rc = LIB.phf_q8_gemm(x.ctypes.data, m, k, w.ctypes.data, scales.ctypes.data, biases.ctypes.data, n, bits,
                         group_size, y.ctypes.data, threads, level)
    return rc, y


def covers(bits, level):
    """The cases the kernel takes: AVX2 for 4-bit codes, VNNI for 4 and 8 bits."""
    level = BEST if level < 0 or level > BEST else level
    return level == 2 or (level == 1 and bits == 4)


class route_rows:
    """phf_q8_matmul's row threshold for this kernel, restored afterwards (0: never)."""

    def __init__(self, rows):
        self.rows = rows

    def __enter__(self):
        self.previous = LIB.phf_set_q8_gemm_rows(self.rows)

    def __exit__(self, *exc):
        LIB.phf_set_q8_gemm_rows(self.previous)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), group_size=st.sampled_from([32, 64, 128]), m=st.integers(1, 40),
       n=st.integers(1, 50), groups=st.integers(1, 4), threads=st.integers(1, 4), level=st.integers(0, 2),
       zero_group=st.none() | st.integers(0, 3), scale_exp=st.integers(-3, 3), seed=st.integers(0, 2 ** 16))
def test_tile_equals_the_integer_math(bits, group_size, m, n, groups, threads, level, zero_group, scale_exp,
                                      seed):
    """Partial tiles of weight rows and of x rows, every group size, zero and large groups; levels the
    kernel does not cover are declined with nothing written."""
    rng = np.random.default_rng(seed)
    k = group_size * groups
    x, codes, scales, biases = random_case(rng, m, n, k, bits, group_size, zero_group, scale_exp)
    rc, got = gemm(x, pack(codes, bits), scales, biases, bits, group_size, threads, level)
    if not covers(bits, level):
        assert rc == -1 and np.isnan(got).all()
        return
    assert rc == 0
    want, mag = emulate(x, codes, scales, biases, group_size)
    assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-30), np.max(np.abs(got - want) / (mag + 1e-30))


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([4, 8]), group_size=st.sampled_from([32, 64, 128]), m=st.integers(10, 24),
       n=st.integers(1, 40), groups=st.integers(1, 3), level=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
def test_routing_across_the_threshold_matches_the_block_kernel(bits, group_size, m, n, groups, level, seed):
    """phf_q8_matmul with blocks of >= 16 rows routed here and with the route off (q8.c's kernels):
    both equal the integer math, so they agree with each other to float rounding."""
    rng = np.random.default_rng(seed)
    k = group_size * groups
    x, codes, scales, biases = random_case(rng, m, n, k, bits, group_size, None, 0)
    w = pack(codes, bits)
    with route_rows(16):
        routed = q8_product(x, w, scales, biases, bits, group_size, 2, level)
    with route_rows(0):
        block = q8_product(x, w, scales, biases, bits, group_size, 2, level)
    want, mag = emulate(x, codes, scales, biases, group_size)
    for got in (routed, block):
        assert np.all(np.abs(got - want) <= 1e-5 * mag), np.max(np.abs(got - want) / mag)
    assert np.all(np.abs(routed - block) <= 2e-5 * mag)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 128)])
def test_threads_split_tiles_without_changing_them(bits, group_size):
    """Enough work for the pool: every thread count gives the same bits, equal to the integer math."""
    rng = np.random.default_rng(bits * group_size)
    m, n, k = 19, 517, 2048
    x, codes, scales, biases = random_case(rng, m, n, k, bits, group_size, 1, 0)
    w = pack(codes, bits)
    rc, first = gemm(x, w, scales, biases, bits, group_size, threads=1)
    if not covers(bits, -1):
        pytest.skip("this CPU's SIMD level is not covered by the kernel")
    assert rc == 0
    for t in (2, 3, 4):
        rc, got = gemm(x, w, scales, biases, bits, group_size, threads=t)
        assert rc == 0
        np.testing.assert_array_equal(got, first)
    want, mag = emulate(x, codes, scales, biases, group_size)
    assert np.all(np.abs(first - want) <= 1e-5 * mag)


def test_bad_shapes_are_declined():
    x = np.ones((16, 96), np.float32)
    w = np.zeros((8, 12), np.uint32)
    s = np.ones((8, 3), np.float32)
    for args in ((4, 48), (3, 32), (4, 0)):
        rc, y = gemm(x, w, s, s, *args)
        assert rc == -1 and np.isnan(y).all()


@settings(max_examples=20, deadline=None)
@given(dtype=st.sampled_from(["float32", "float16", "bfloat16"]), bits=st.sampled_from([4, 8]),
       group_size=st.sampled_from([32, 64, 128]), m=st.integers(1, 30), n=st.integers(1, 37),
       groups=st.integers(1, 5), threads=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_16_bit_scales_and_biases(dtype, bits, group_size, m, n, groups, threads, seed):
    """Scales and biases as stored (float16 / bfloat16 bit patterns) give the integer math with their
    exact values, through phf_q8_gemm_sd and through phf_q8_matmul_sd's route."""
    rng = np.random.default_rng(seed)
    k = group_size * groups
    x, codes, _, _ = random_case(rng, m, n, k, bits, group_size, None, 0)
    s16, s64 = to_16(spread(rng, (n, groups)), dtype)
    b16, b64 = to_16(spread(rng, (n, groups)), dtype)
    w = pack(codes, bits)
    want, mag = emulate(x, codes, s64.astype(np.float32), b64.astype(np.float32), group_size)
    for route in (False, True):
        y = np.full((m, n), np.nan, np.float32)
        args = (x.ctypes.data, m, k, w.ctypes.data, s16.ctypes.data, b16.ctypes.data, DTYPES[dtype], n, bits,
                group_size, y.ctypes.data, threads, -1)
        if route:
            with route_rows(1):
                rc = LIB.phf_q8_matmul_sd(*args)
        else:
            rc = LIB.phf_q8_gemm_sd(*args)
            if not covers(bits, -1):
                assert rc == -1
                continue
        assert rc == 0
        assert np.all(np.abs(y - want) <= 1e-5 * mag + 1e-30), (route, np.max(np.abs(y - want) / (mag + 1e-30)))
