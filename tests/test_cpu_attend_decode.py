"""One-query attention over a cache (phf_attend_rows: the 512-bit kernel in csrc/attn_decode.c where the
CPU has AVX-512, the AVX2 and portable loops of csrc/fused.c otherwise).

Oracle: the formula in float64 NumPy,

    out[h][part * R + r] = softmax_t(q[part][h][r] . key(t, h, part)) @ value(t, h),

with row t of the cache named by rows[t] (or the step's new row where rows[t] < 0)."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from phiflash_mlx.cpu import kernels as cpu_kernels

LIB = cpu_kernels._fused_library()
pytestmark = pytest.mark.skipif(LIB is None, reason="the C kernels were not built (Linux only; see setup.py)")


def reference(q, k, v, rows, k_new, v_new):
    """q [2, P, R, D]; k [P, S, 2D]; v [P, S, DV]; rows [T]; k_new [P, 2D]; v_new [P, DV] -> [P, 2R, DV]."""
    _, P, R, D = q.shape
    keys = np.where(rows[None, :, None] >= 0, k[:, np.maximum(rows, 0)], k_new[:, None]).astype(np.float64)
    vals = np.where(rows[None, :, None] >= 0, v[:, np.maximum(rows, 0)], v_new[:, None]).astype(np.float64)
    out = np.empty((P, 2 * R, v.shape[-1]))
    for part in range(2):
        s = np.einsum("hrd,htd->hrt", q[part].astype(np.float64), keys[:, :, part * D:(part + 1) * D])
        s -= s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        out[:, part * R:(part + 1) * R] = np.einsum("hrt,htv->hrv", p, vals)
    return out


def attend(q, k, v, rows, k_new, v_new, threads):
    """phf_attend_rows on (possibly strided) float32 views k, v."""
    _, P, R, D = q.shape
    DV = v.shape[-1]
    out = np.full((P, 2 * R, DV), np.nan, np.float32)
    ks, vs = (np.array(a.strides) // 4 for a in (k, v))
    assert ks[-1] == 1 and vs[-1] == 1
    rc = LIB.phf_attend_rows(q.ctypes.data, k.ctypes.data, int(ks[0]), int(ks[1]), v.ctypes.data, int(vs[0]),
                             int(vs[1]), rows.ctypes.data, k_new.ctypes.data, v_new.ctypes.data, out.ctypes.data,
                             P, R, D, DV, rows.shape[0], threads, cpu_kernels.SD_F32)
    assert rc == 0
    return out


def strided(rng, shape, pad_rows, pad_cols):
    """A float32 view of `shape` inside a larger buffer (padding between heads and rows)."""
    P, S, W = shape
    buf = rng.standard_normal((P, S + pad_rows, W + pad_cols)).astype(np.float32)
    return buf[:, :S, :W]


def case(rng, P, R, D, DV, T, pad_rows, pad_cols, scale):
    S = T + 3
    q = (rng.standard_normal((2, P, R, D)) * scale).astype(np.float32)
    k = strided(rng, (P, S, 2 * D), pad_rows, pad_cols)
    v = strided(rng, (P, S, DV), pad_rows, pad_cols)
    rows = rng.permutation(S)[:T].astype(np.int32)       # any rows of the cache, in any order ...
    rows[rng.integers(T)] = -1                           # ... and the new row once
    k_new = rng.standard_normal((P, 2 * D)).astype(np.float32)
    v_new = rng.standard_normal((P, DV)).astype(np.float32)
    return q, k, v, rows, k_new, v_new


PATHS = ["best", "avx2", "portable"]


@contextlib.contextmanager
def kernel_path(name):
    """The kernel paths: the best this CPU has, the 512-bit kernel forbidden, all SIMD off."""
    old_ad = LIB.phf_set_attend_decode(0 if name != "best" else 1)
    old_simd = LIB.phf_fused_simd(0 if name == "portable" else 1)
    try:
        yield
    finally:
        LIB.phf_set_attend_decode(old_ad)
        LIB.phf_fused_simd(old_simd)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(P=st.integers(1, 3), R=st.sampled_from([1, 2, 3, 4, 8]), D=st.sampled_from([8, 16, 32, 64]),
       DVm=st.sampled_from([1, 2, 4, 8]), T=st.integers(1, 200), pad_rows=st.integers(0, 2),
       pad_cols=st.sampled_from([0, 16]), scale=st.sampled_from([0.1, 1.0, 4.0]), threads=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_attend_rows_equals_the_formula(path, P, R, D, DVm, T, pad_rows, pad_cols, scale, threads, seed):
    """Shapes the 512-bit kernel takes (2R in 2, 4, 8, 16; D a multiple of 16) and ones it leaves to
    the other loops; rows in any order with the new row anywhere; padded (strided) caches; partial
    blocks of rows; scores large enough that the softmax is sharp."""
    rng = np.random.default_rng(seed)
    DV = 16 * DVm
    q, k, v, rows, k_new, v_new = case(rng, P, R, D, DV, T, pad_rows, pad_cols, scale)
    with kernel_path(path):
        got = attend(q, k, v, rows, k_new, v_new, threads)
    want = reference(q, k, v, rows, k_new, v_new)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(v).max())


@pytest.mark.parametrize("path", PATHS)
def test_attend_rows_real_shape_long_cache(path):
    """Phi-4-mini-flash's shape (10 pairs, 2 query rows per stripe, D 64, DV 128) over 3000 rows with
    2 threads: more rows than a block of values or a prefetch distance."""
    rng = np.random.default_rng(3)
    q, k, v, rows, k_new, v_new = case(rng, 10, 2, 64, 128, 3000, 0, 0, 0.125)
    rows = np.sort(rows)
    with kernel_path(path):
        got = attend(q, k, v, rows, k_new, v_new, 2)
    np.testing.assert_allclose(got, reference(q, k, v, rows, k_new, v_new),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
def test_nan_reaches_the_output_of_its_query_only(path):
    """A NaN in one key makes the outputs of the queries that score it NaN, and only those."""
    rng = np.random.default_rng(5)
    q, k, v, rows, k_new, v_new = case(rng, 2, 2, 16, 32, 40, 0, 0, 1.0)
    base = k.base if k.base is not None else k
    row = int(rows[rows >= 0][7])
    base[1, row, 3] = np.nan                             # pair 1, stripe 1 (columns < D)
    with kernel_path(path):
        got = attend(q, k, v, rows, k_new, v_new, 1)
    assert np.isnan(got[1, :2]).all()                    # stripe-1 queries of pair 1
    assert np.isfinite(got[1, 2:]).all() and np.isfinite(got[0]).all()
