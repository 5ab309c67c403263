/*
 * Prefill blocks of int8-activation products (the arithmetic of q8.c, see its header): weight rows
 * in the lanes of a vector.
 *
 * q8.c's block kernel puts 32 columns of one weight row in a vector and multiplies it with 32 columns
 * of one x row; every (x row, weight row, group) then needs its own int32 -> float conversion, scale
 * multiply and, at the end, a horizontal sum. Here a tile of Q8G_NT (16) weight rows is first
 * repacked into scratch memory so that one 32-byte vector holds 4 consecutive codes (one byte each)
 * of 8 weight rows, row r in int32 lane r:
 *
 *   packed[c][r] = codes[n0 + r][4c .. 4c + 3]        (c = 0 .. k/4 - 1, r = 0 .. Q8G_NT - 1)
 *
 * and the 4 int8 activations of x row m at the same columns, broadcast to all lanes, meet it in one
 * vpdpbusd (AVX512-VNNI, on a 512-bit vector holding all 16 rows) or vpmaddubsw + vpmaddwd (AVX2, two
 * 256-bit halves, 4-bit codes only: a pair of 8-bit codes times activations can saturate int16): the
 * lanes accumulate the partial dots of the weight rows with x row m, so there is no horizontal sum.
 * After each group the int32 lanes are converted once and multiplied by (the rows' scales x the x
 * row's d), and the bias term is one FMA of the rows' biases with the x row's group sum sx: float work
 * once per vector of weight rows and group, not once per weight row. Several x rows share every load of packed codes.
 *
 * The scales and biases of the tile are transposed into the scratch as well ([group][row]). x is
 * quantized once per call in natural column order (q8_quantize with split = 0). Work is split over
 * the pool by tiles of weight rows; each thread packs its tile once and passes all rows of x over
 * it, 8 (VNNI) or 3 (AVX2) x rows at a time.
 *
 * phf_q8_matmul(_sd) hands blocks of at least q8g_min_rows rows of x to phf_q8_gemm_sd when the SIMD
 * level allows it; decode rows (and whatever this file declines) stay with q8.c's kernels.
 */

#ifndef PHF_Q8G_BODY

#define Q8G_NT 16 /* weight rows per tile: two vectors of 8 lanes */

static int q8g_min_rows = 16;

/* Blocks of at least `rows` rows of x take this file's kernel inside phf_q8_matmul (rows <= 0: never).
 * Returns the previous value. */
PHF_EXPORT int phf_set_q8_gemm_rows(int rows) {
    return __atomic_exchange_n(&q8g_min_rows, rows, __ATOMIC_ACQ_REL);
}

typedef struct {
    const int8_t *xq;        /* [m, k], natural column order */
    const float *d, *sx;     /* [m, groups] */
    const uint8_t *w;        /* [n, row_bytes] */
    const void *scales, *biases; /* [n, groups], dtype code sdtype (PHF_SD_*) */
    float *y;                /* [m, n] */
    uint8_t *scratch;        /* per share: packed codes, transposed scales and biases */
    long m, k, n, groups, row_bytes, scratch_bytes;
    int bits, group_size, level, sdtype;
    long tiles, next;
} q8g_t;

static long q8g_scratch_bytes(long k, long groups) {
    long b = (long)Q8G_NT * k + 2L * Q8G_NT * groups * (long)sizeof(float);
    return (b + 63) & ~63L;
}

#ifdef PHF_X86
/* 8 x 8 transpose of int32: in[r] lane c -> out[c] lane r */
__attribute__((target("avx2,fma"))) static inline void q8g_transpose8(__m256i v[8]) {
    const __m256 a0 = _mm256_castsi256_ps(v[0]), a1 = _mm256_castsi256_ps(v[1]);
    const __m256 a2 = _mm256_castsi256_ps(v[2]), a3 = _mm256_castsi256_ps(v[3]);
    const __m256 a4 = _mm256_castsi256_ps(v[4]), a5 = _mm256_castsi256_ps(v[5]);
    const __m256 a6 = _mm256_castsi256_ps(v[6]), a7 = _mm256_castsi256_ps(v[7]);
    const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
    const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
    const __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
    const __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x20));
    v[1] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x20));
    v[2] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x20));
    v[3] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x20));
    v[4] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x31));
    v[5] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x31));
    v[6] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x31));
    v[7] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x31));
}

/* 32 codes (one byte each) of a weight row from column c0 (a multiple of 32) */
__attribute__((target("avx2,fma"))) static inline __m256i q8g_codes32(const uint8_t *row, long c0, int bits) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)(row + c0));
    const __m128i b = _mm_loadu_si128((const __m128i *)(row + c0 / 2));
    const __m128i low4 = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    /* byte i holds codes 2i (low nibble) and 2i + 1 (high nibble) */
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

/* Pack weight rows [n0, n0 + nr) of the tile (rows past nr are zero): codes as above, 8 rows x 32
 * columns at a time (k a multiple of 32); scales and biases as [groups][Q8G_NT]. */
__attribute__((target("avx2,fma"))) static void q8g_pack_avx2(const q8g_t *j, long n0, int nr, uint8_t *wp,
                                                             float *st, float *bt) {
    const uint8_t *rows[Q8G_NT];
    for (int r = 0; r < Q8G_NT; r++) rows[r] = r < nr ? j->w + (n0 + r) * j->row_bytes : NULL;
    for (long c0 = 0; c0 < j->k; c0 += 32) {
        for (int h = 0; h < Q8G_NT / 8; h++) {
            __m256i v[8];
            for (int r = 0; r < 8; r++)
                v[r] = rows[8 * h + r] ? q8g_codes32(rows[8 * h + r], c0, j->bits) : _mm256_setzero_si256();
            q8g_transpose8(v);
            /* v[c]: the codes of columns c0 + 4c .. c0 + 4c + 3 of the 8 rows */
            for (int c = 0; c < 8; c++)
                _mm256_store_si256((__m256i *)(wp + ((c0 / 4 + c) * Q8G_NT + 8 * h) * 4), v[c]);
        }
    }
    for (int r = 0; r < Q8G_NT; r++) {
        const long sb = (n0 + r) * j->groups;
        for (long g = 0; g < j->groups; g++) {
            st[g * Q8G_NT + r] = r < nr ? phf_sd(j->scales, sb + g, j->sdtype) : 0.0f;
            bt[g * Q8G_NT + r] = r < nr ? phf_sd(j->biases, sb + g, j->sdtype) : 0.0f;
        }
    }
}

__attribute__((target("avx2,fma"))) static inline __m256i q8g_dot_avx2(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

#define PHF_Q8G_BODY 1
#define Q8G_NAME(f) f##_avx2
#define Q8G_TARGET "avx2,fma"
#define Q8G_DOT(acc, w, x) q8g_dot_avx2(acc, w, x)
#define Q8G_MR 3
#include "q8_gemm.c"
#undef PHF_Q8G_BODY
#undef Q8G_NAME
#undef Q8G_TARGET
#undef Q8G_DOT
#undef Q8G_MR

#define Q8G_ZMR 8 /* x rows per block */

/* AVX512-VNNI on 512-bit vectors: one vector holds all 16 rows of a tile (one load of codes and one
 * dot per x row and 4 columns; 5-20% faster than two 256-bit halves on this Zen 4). The dot is inline
 * assembly: with the intrinsic GCC (12) copied every accumulator once per step (256-bit version:
 * 111 -> ~165 GMAC/s on one core). */
#define Q8G_ZT "avx512f,avx512vl,avx512vnni,avx2,fma"
__attribute__((target(Q8G_ZT))) static inline __m512i q8g_dot_zmm(__m512i acc, __m512i w, __m512i x) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}
__attribute__((always_inline, target(Q8G_ZT))) static inline void q8g_zblock(
    const q8g_t *j, const uint8_t *wp, const float *st, const float *bt, long m0, long n0, int nr, const int MR) {
    const long k = j->k, groups = j->groups;
    const long steps = j->group_size / 4;
    const int8_t *xr[Q8G_ZMR];
    for (int a = 0; a < MR; a++) xr[a] = j->xq + (m0 + a) * k;
    __m512 f[Q8G_ZMR];
    for (int a = 0; a < MR; a++) f[a] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        __m512i i[Q8G_ZMR];
        for (int a = 0; a < MR; a++) i[a] = _mm512_setzero_si512();
        const uint8_t *wg = wp + g * steps * 64;
        const long c0 = g * j->group_size;
        for (long s = 0; s < steps; s++) {
            const __m512i w = _mm512_load_si512((const void *)(wg + s * 64));
            for (int a = 0; a < MR; a++) {
                int32_t x4;
                memcpy(&x4, xr[a] + c0 + 4 * s, 4);
                i[a] = q8g_dot_zmm(i[a], w, _mm512_set1_epi32(x4));
            }
        }
        const __m512 sv = _mm512_load_ps(st + g * Q8G_NT), bv = _mm512_load_ps(bt + g * Q8G_NT);
        for (int a = 0; a < MR; a++) {
            const __m512 dv = _mm512_set1_ps(j->d[(m0 + a) * groups + g]);
            const __m512 sxv = _mm512_set1_ps(j->sx[(m0 + a) * groups + g]);
            f[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[a]), _mm512_mul_ps(sv, dv), f[a]);
            f[a] = _mm512_fmadd_ps(bv, sxv, f[a]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int a = 0; a < MR; a++) _mm512_mask_storeu_ps(j->y + (m0 + a) * j->n + n0, keep, f[a]);
}
#define Q8G_ZFN(MR_)                                                                                        \
    __attribute__((noinline, target(Q8G_ZT))) static void q8g_zb_##MR_(                                     \
        const q8g_t *j, const uint8_t *wp, const float *st, const float *bt, long m0, long n0, int nr) {    \
        q8g_zblock(j, wp, st, bt, m0, n0, nr, MR_);                                                         \
    }
Q8G_ZFN(1) Q8G_ZFN(2) Q8G_ZFN(3) Q8G_ZFN(4) Q8G_ZFN(5) Q8G_ZFN(6) Q8G_ZFN(7) Q8G_ZFN(8)
__attribute__((target(Q8G_ZT))) static void q8g_rows_zmm(const q8g_t *j, const uint8_t *wp, const float *st,
                                                         const float *bt, long n0, int nr) {
    for (long m0 = 0; m0 < j->m; m0 += Q8G_ZMR) {
        const int mr = j->m - m0 < Q8G_ZMR ? (int)(j->m - m0) : Q8G_ZMR;
        switch (mr) {
        case 1: q8g_zb_1(j, wp, st, bt, m0, n0, nr); break;
        case 2: q8g_zb_2(j, wp, st, bt, m0, n0, nr); break;
        case 3: q8g_zb_3(j, wp, st, bt, m0, n0, nr); break;
        case 4: q8g_zb_4(j, wp, st, bt, m0, n0, nr); break;
        case 5: q8g_zb_5(j, wp, st, bt, m0, n0, nr); break;
        case 6: q8g_zb_6(j, wp, st, bt, m0, n0, nr); break;
        case 7: q8g_zb_7(j, wp, st, bt, m0, n0, nr); break;
        case 8: q8g_zb_8(j, wp, st, bt, m0, n0, nr); break;
        }
    }
}
#endif

static void q8g_share(void *arg, int share) {
    q8g_t *j = (q8g_t *)arg;
    uint8_t *wp = j->scratch + (long)share * j->scratch_bytes;
    float *st = (float *)(wp + (long)Q8G_NT * j->k), *bt = st + Q8G_NT * j->groups;
    for (long t; (t = next_chunk(&j->next)) < j->tiles;) {
        const long n0 = t * Q8G_NT;
        const int nr = j->n - n0 < Q8G_NT ? (int)(j->n - n0) : Q8G_NT;
#ifdef PHF_X86
        q8g_pack_avx2(j, n0, nr, wp, st, bt);
        if (j->level == Q8_VNNI) q8g_rows_zmm(j, wp, st, bt, n0, nr);
        else q8g_rows_avx2(j, wp, st, bt, n0, nr);
#else
        (void)nr; (void)st; (void)bt; (void)wp;
#endif
    }
}

/*
 * The same product as phf_q8_matmul_sd (same arguments; scales and biases float32, float16 or bfloat16
 * by sdtype, converted to float32 when a tile is packed), always with this file's kernel: bits 4 at
 * level 1 (AVX2) or 2 (VNNI), bits 8 at level 2. level: the SIMD level to use at most (negative: the
 * best this CPU has). Returns 0, or -1 when this kernel does not cover the case (level, bits, shape,
 * dtype) or scratch memory could not be had (nothing written then).
 */
PHF_EXPORT int phf_q8_gemm_sd(const float *x, long m, long k, const uint32_t *w, const void *scales,
                              const void *biases, int sdtype, long n, int bits, int group_size, float *y,
                              int threads, int level) {
    if (!(bits == 4 || bits == 8) || group_size <= 0 || m <= 0 || n <= 0 || k <= 0) return -1;
    if (sdtype < PHF_SD_F32 || sdtype > PHF_SD_BF16) return -1;
    if (group_size % 32 != 0 || k % group_size != 0) return -1;
    const int best = phf_q8_level();
    if (level < 0 || level > best) level = best;
    if (level < Q8_AVX2 || (bits == 8 && level < Q8_VNNI)) return -1;
    const long groups = k / group_size;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const long tiles = (n + Q8G_NT - 1) / Q8G_NT;
    if (tiles < threads) threads = (int)tiles;
    if (m * n * k < (1L << 22)) threads = 1;
    q8g_t j;
    j.scratch_bytes = q8g_scratch_bytes(k, groups);
    j.scratch = (uint8_t *)aligned_alloc(64, (size_t)(j.scratch_bytes * threads));
    int8_t *xq = (int8_t *)malloc((size_t)(m * k) + 64);
    float *d = (float *)malloc(sizeof(float) * (size_t)(2 * m * groups));
    if (!j.scratch || !xq || !d) {
        free(j.scratch);
        free(xq);
        free(d);
        return -1;
    }
    float *sx = d + m * groups;
    q8_quantize(x, m, k, group_size, 0, 1, xq, d, sx);
    j.xq = xq; j.d = d; j.sx = sx;
    j.w = (const uint8_t *)w; j.scales = scales; j.biases = biases; j.y = y;
    j.m = m; j.k = k; j.n = n; j.groups = groups; j.row_bytes = k * bits / 8;
    j.bits = bits; j.group_size = group_size; j.level = level; j.sdtype = sdtype;
    j.tiles = tiles; j.next = 0;
    run_shares(q8g_share, &j, threads);
    free(j.scratch);
    free(xq);
    free(d);
    return 0;
}

/* phf_q8_gemm_sd with float32 scales and biases */
PHF_EXPORT int phf_q8_gemm(const float *x, long m, long k, const uint32_t *w, const float *scales,
                           const float *biases, long n, int bits, int group_size, float *y, int threads,
                           int level) {
    return phf_q8_gemm_sd(x, m, k, w, scales, biases, PHF_SD_F32, n, bits, group_size, y, threads, level);
}

/* phf_q8_matmul_sd's route to phf_q8_gemm_sd: blocks of rows at a level this kernel covers. Returns 0
 * when done here, -1 to leave the product to q8.c. */
static int q8g_route(const float *x, long m, long k, const uint32_t *w, const void *scales, const void *biases,
                     int sdtype, long n, int bits, int group_size, float *y, int threads, int level) {
    const int rows = __atomic_load_n(&q8g_min_rows, __ATOMIC_ACQUIRE);
    if (rows <= 0 || m < rows) return -1;
    return phf_q8_gemm_sd(x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, threads, level);
}

#else /* PHF_Q8G_BODY: the kernels, once per instruction set */

/* y[m0 .. m0 + MR) x [n0 .. n0 + nr) from the packed tile; MR is a constant after inlining */
__attribute__((always_inline, target(Q8G_TARGET))) static inline void Q8G_NAME(q8g_block)(
    const q8g_t *j, const uint8_t *wp, const float *st, const float *bt, long m0, long n0, int nr, const int MR) {
    const long k = j->k, groups = j->groups;
    const long steps = j->group_size / 4;
    const int8_t *xr[Q8G_MR];
    for (int a = 0; a < MR; a++) xr[a] = j->xq + (m0 + a) * k;
    __m256 f0[Q8G_MR], f1[Q8G_MR];
    for (int a = 0; a < MR; a++) f0[a] = f1[a] = _mm256_setzero_ps();
    for (long g = 0; g < groups; g++) {
        __m256i i0[Q8G_MR], i1[Q8G_MR];
        for (int a = 0; a < MR; a++) i0[a] = i1[a] = _mm256_setzero_si256();
        const uint8_t *wg = wp + g * steps * (Q8G_NT * 4);
        const long c0 = g * j->group_size;
        for (long s = 0; s < steps; s++) {
            const __m256i w0 = _mm256_load_si256((const __m256i *)(wg + s * (Q8G_NT * 4)));
            const __m256i w1 = _mm256_load_si256((const __m256i *)(wg + s * (Q8G_NT * 4) + 32));
            for (int a = 0; a < MR; a++) {
                int32_t x4;
                memcpy(&x4, xr[a] + c0 + 4 * s, 4);
                const __m256i xb = _mm256_set1_epi32(x4);
                i0[a] = Q8G_DOT(i0[a], w0, xb);
                i1[a] = Q8G_DOT(i1[a], w1, xb);
            }
        }
        const __m256 s0 = _mm256_load_ps(st + g * Q8G_NT), s1 = _mm256_load_ps(st + g * Q8G_NT + 8);
        const __m256 b0 = _mm256_load_ps(bt + g * Q8G_NT), b1 = _mm256_load_ps(bt + g * Q8G_NT + 8);
        for (int a = 0; a < MR; a++) {
            const __m256 dv = _mm256_broadcast_ss(j->d + (m0 + a) * groups + g);
            const __m256 sxv = _mm256_broadcast_ss(j->sx + (m0 + a) * groups + g);
            f0[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0[a]), _mm256_mul_ps(s0, dv), f0[a]);
            f1[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1[a]), _mm256_mul_ps(s1, dv), f1[a]);
            f0[a] = _mm256_fmadd_ps(b0, sxv, f0[a]);
            f1[a] = _mm256_fmadd_ps(b1, sxv, f1[a]);
        }
    }
    for (int a = 0; a < MR; a++) {
        float *yr = j->y + (m0 + a) * j->n + n0;
        if (nr == Q8G_NT) {
            _mm256_storeu_ps(yr, f0[a]);
            _mm256_storeu_ps(yr + 8, f1[a]);
        } else {
            float tmp[Q8G_NT];
            _mm256_storeu_ps(tmp, f0[a]);
            _mm256_storeu_ps(tmp + 8, f1[a]);
            memcpy(yr, tmp, sizeof(float) * (size_t)nr);
        }
    }
}

#define Q8G_FN(MR_)                                                                                         \
    __attribute__((noinline, target(Q8G_TARGET))) static void Q8G_NAME(q8g_b_##MR_)(                        \
        const q8g_t *j, const uint8_t *wp, const float *st, const float *bt, long m0, long n0, int nr) {    \
        Q8G_NAME(q8g_block)(j, wp, st, bt, m0, n0, nr, MR_);                                                \
    }
Q8G_FN(1) Q8G_FN(2) Q8G_FN(3)
#if Q8G_MR >= 4
Q8G_FN(4)
#endif
#if Q8G_MR >= 5
Q8G_FN(5)
#endif
#if Q8G_MR >= 6
Q8G_FN(6)
#endif
#if Q8G_MR >= 7
Q8G_FN(7)
#endif
#if Q8G_MR >= 8
Q8G_FN(8)
#endif
#undef Q8G_FN

/* every row of x against the packed tile of weight rows [n0, n0 + nr) */
__attribute__((target(Q8G_TARGET))) static void Q8G_NAME(q8g_rows)(const q8g_t *j, const uint8_t *wp,
                                                                   const float *st, const float *bt, long n0,
                                                                   int nr) {
    for (long m0 = 0; m0 < j->m; m0 += Q8G_MR) {
        const int mr = j->m - m0 < Q8G_MR ? (int)(j->m - m0) : Q8G_MR;
        switch (mr) {
        case 1: Q8G_NAME(q8g_b_1)(j, wp, st, bt, m0, n0, nr); break;
        case 2: Q8G_NAME(q8g_b_2)(j, wp, st, bt, m0, n0, nr); break;
        case 3: Q8G_NAME(q8g_b_3)(j, wp, st, bt, m0, n0, nr); break;
#if Q8G_MR >= 4
        case 4: Q8G_NAME(q8g_b_4)(j, wp, st, bt, m0, n0, nr); break;
#endif
#if Q8G_MR >= 5
        case 5: Q8G_NAME(q8g_b_5)(j, wp, st, bt, m0, n0, nr); break;
#endif
#if Q8G_MR >= 6
        case 6: Q8G_NAME(q8g_b_6)(j, wp, st, bt, m0, n0, nr); break;
#endif
#if Q8G_MR >= 7
        case 7: Q8G_NAME(q8g_b_7)(j, wp, st, bt, m0, n0, nr); break;
#endif
#if Q8G_MR >= 8
        case 8: Q8G_NAME(q8g_b_8)(j, wp, st, bt, m0, n0, nr); break;
#endif
        }
    }
}

#endif /* PHF_Q8G_BODY */
