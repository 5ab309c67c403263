/* One query position of differential attention over a cache, on 512-bit vectors (decode).
 *
 * The layout and result of phf_attend_rows (fused.c): P pairs, R query rows per stripe and pair,
 * key rows of width 2D (stripe 1 | stripe 2), value rows of width DV; the T rows attended are named
 * by `rows` (row t: the cache's row rows[t], or the step's new row where rows[t] < 0). Keys and
 * values of the cache may be float32 or float16 (kv16); the new row is float32.
 *
 * phf_attend_rows spends its time in calls: per cache row, 2R dot products of length D (each with a
 * horizontal sum) and 2R axpys of length DV through function pointers, ~13 GB/s of cache at 32K.
 * Here, per pair:
 *   1. scores: 16 accumulators hold (16 / 2R) rows x 2R queries; each key vector loaded is used by
 *      the R queries of its stripe; a tree of unpacks, shuffles and adds turns the 16 accumulators
 *      into one vector of 16 scores, stored row-major ([t][2R]), so lane j always belongs to query
 *      j % 2R;
 *   2. softmax: the running maximum and sum are vectors over that layout (one exp per 16 scores);
 *   3. values: blocks of AD_TB rows; for each slice of value columns that 2R x (16 / 2R) accumulators
 *      cover, every value vector loaded is used by the 2R queries; the block's values stay in L1/L2
 *      between slices. The 1 / sum scaling is applied once at the end.
 * Rows AD_PF ahead are prefetched into L2 (the hardware prefetcher alone left the loads waiting).
 * The pairs are split over the pool. Returns -1 (nothing written) for shapes it does not cover
 * (2R not 2, 4, 8 or 16; D not a multiple of 16; DV not a multiple of 256 / 2R), CPUs without
 * AVX-512, or no memory. */

#define AD_TB 64 /* value rows per block */
#define AD_PF 16 /* rows ahead that are prefetched into L2 */

static inline const void *ad_row(const void *base, long h, long hs, long row, long ts, int kv16) {
    const long off = h * hs + row * ts;
    return kv16 ? (const void *)((const uint16_t *)base + off) : (const void *)((const float *)base + off);
}

#ifdef PHF_X86
#define AD_TARGET "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c"

typedef struct {
    const float *q;
    const void *k, *v;
    const float *k_new, *v_new;
    const int *rows;
    long k_hs, k_ts, v_hs, v_ts;
    float *out;
    long P, R, D, DV, T;
    int kv16, failed;
    long next;
} ad_t;

/* 16 floats of a row: float32 as is, float16 converted; f16 rows are uint16_t */
__attribute__((always_inline, target(AD_TARGET))) static inline __m512 ad_load(const void *p, long i, int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_loadu_ps((const float *)p + i);
}

/* 16 vectors -> one: lane j = the sum of the lanes of v[j] */
__attribute__((always_inline, target(AD_TARGET))) static inline __m512 ad_tree(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int p = 0; p < 8; p++)
        a[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
    for (int p = 0; p < 4; p++) {
        const __m512d x = _mm512_castps_pd(a[2 * p]), y = _mm512_castps_pd(a[2 * p + 1]);
        b[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* b[p] 128-bit lane L, element e: the sum of lane L of v[4p + e] */
    for (int p = 0; p < 2; p++)
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

__attribute__((always_inline, target(AD_TARGET))) static inline __m512 ad_exp(__m512 x) {
    const __m256 lo = exp256(_mm512_castps512_ps256(x));
    const __m256 hi = exp256(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

/* pair h; R2 = 2R is a constant after inlining; sc: scratch of ceil(T R2 / 16) * 16 floats */
__attribute__((always_inline, target(AD_TARGET))) static inline void ad_pair(const ad_t *a, long h, float *sc,
                                                                               const int R2) {
    const long T = a->T, D = a->D, DV = a->DV, R = R2 / 2;
    const int TB = 16 / R2; /* rows per vector of scores */
    const float *qh[16];
    for (int i = 0; i < R2; i++) qh[i] = a->q + (((long)(i / R) * a->P + h) * R + i % R) * D;
    const long n = T * R2, nv = (n + 15) / 16;
    const long esz = a->kv16 ? 2 : 4, krow_bytes = 2 * D * esz, vrow_bytes = DV * esz;
    /* 1. scores */
    for (long t0 = 0; t0 < T; t0 += TB) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
        const void *kr[16];
        int f16[16];
        for (int tt = 0; tt < TB; tt++) {
            const long ta = t0 + tt + AD_PF;
            if (ta < T && a->rows[ta] >= 0) {
                const char *pk = (const char *)ad_row(a->k, h, a->k_hs, a->rows[ta], a->k_ts, a->kv16);
                for (long b = 0; b < krow_bytes; b += 64) _mm_prefetch(pk + b, _MM_HINT_T1);
            }
            const long t = t0 + tt < T ? t0 + tt : T - 1; /* past T: a real row, its lanes dropped below */
            const long row = a->rows[t];
            f16[tt] = row >= 0 && a->kv16;
            kr[tt] = row >= 0 ? ad_row(a->k, h, a->k_hs, row, a->k_ts, a->kv16) : (const void *)(a->k_new + h * 2 * D);
        }
        for (long c = 0; c < D; c += 16) {
#pragma GCC unroll 2
            for (int part = 0; part < 2; part++) {
                __m512 qv[8];
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) qv[r] = _mm512_loadu_ps(qh[part * R + r] + c);
#pragma GCC unroll 16
                for (int tt = 0; tt < TB; tt++) {
                    const __m512 kv = ad_load(kr[tt], part * D + c, f16[tt]);
#pragma GCC unroll 8
                    for (int r = 0; r < R; r++)
                        acc[tt * R2 + part * R + r] = _mm512_fmadd_ps(qv[r], kv, acc[tt * R2 + part * R + r]);
                }
            }
        }
        const long at = t0 * R2, left = n - at;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        _mm512_mask_storeu_ps(sc + at, m, ad_tree(acc));
    }
    for (long i = n; i < nv * 16; i++) sc[i] = -INFINITY;
    /* 2. softmax over t, per lane pattern (lane j: query j % R2) */
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0; /* lanes that saw a NaN score */
    for (long b = 0; b < nv; b++) {
        const __m512 s = _mm512_loadu_ps(sc + 16 * b);
        bad |= _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, s);
    }
    float mlane[16], m[16];
    _mm512_storeu_ps(mlane, mx);
    for (int i = 0; i < R2; i++) {
        m[i] = mlane[i];
        for (int j = i + R2; j < 16; j += R2) m[i] = mlane[j] > m[i] ? mlane[j] : m[i];
    }
    float pat[16];
    for (int j = 0; j < 16; j++) pat[j] = m[j % R2];
    const __m512 mp = _mm512_loadu_ps(pat);
    __m512 sum = _mm512_setzero_ps();
    for (long b = 0; b < nv; b++) {
        const __m512 e = ad_exp(_mm512_sub_ps(_mm512_loadu_ps(sc + 16 * b), mp));
        _mm512_storeu_ps(sc + 16 * b, e);
        sum = _mm512_add_ps(sum, e);
    }
    /* lanes past n held -inf - m: exp gave 0 (exp256 clamps its argument, so check) */
    float slane[16], inv[16];
    _mm512_storeu_ps(slane, sum);
    for (int i = 0; i < R2; i++) {
        float s = 0.0f;
        for (int j = i; j < 16; j += R2) s += slane[j];
        inv[i] = 1.0f / s;
        /* a NaN or infinite score makes the query's output NaN, as the softmax of MLX does (the
         * clamped exp above would otherwise hide it) */
        int nan = !(m[i] - m[i] == 0.0f);
        for (int j = i; j < 16; j += R2) nan |= (bad >> j) & 1;
        if (nan) inv[i] = NAN;
    }
    /* 3. values: out[i] = sum_t p[t][i] v[t] / sum[i] */
    float *o = a->out + h * R2 * DV;
    const int NV = 16 / R2; /* vectors of columns per slice (the last slice may use fewer: nvs) */
    memset(o, 0, sizeof(float) * (size_t)(R2 * DV));
    for (long t0 = 0; t0 < T; t0 += AD_TB) {
        const long t1 = t0 + AD_TB < T ? t0 + AD_TB : T;
        for (long c0 = 0; c0 < DV; c0 += 16L * NV) {
            __m512 acc[16];
#pragma GCC unroll 16
            for (int i = 0; i < R2; i++)
#pragma GCC unroll 16
                for (int c = 0; c < NV; c++) acc[i * NV + c] = _mm512_loadu_ps(o + i * DV + c0 + 16 * c);
            for (long t = t0; t < t1; t++) {
                const long row = a->rows[t];
                const int f = row >= 0 && a->kv16;
                const void *vr = row >= 0 ? ad_row(a->v, h, a->v_hs, row, a->v_ts, a->kv16)
                                          : (const void *)(a->v_new + h * DV);
                if (c0 == 0 && t + AD_PF < T && a->rows[t + AD_PF] >= 0) {
                    const char *pv = (const char *)ad_row(a->v, h, a->v_hs, a->rows[t + AD_PF], a->v_ts, a->kv16);
                    for (long b = 0; b < vrow_bytes; b += 64) _mm_prefetch(pv + b, _MM_HINT_T1);
                }
                __m512 vv[16];
#pragma GCC unroll 16
                for (int c = 0; c < NV; c++) vv[c] = ad_load(vr, c0 + 16 * c, f);
#pragma GCC unroll 16
                for (int i = 0; i < R2; i++) {
                    const __m512 p = _mm512_set1_ps(sc[t * R2 + i]);
#pragma GCC unroll 16
                    for (int c = 0; c < NV; c++) acc[i * NV + c] = _mm512_fmadd_ps(p, vv[c], acc[i * NV + c]);
                }
            }
#pragma GCC unroll 16
            for (int i = 0; i < R2; i++)
#pragma GCC unroll 16
                for (int c = 0; c < NV; c++) _mm512_storeu_ps(o + i * DV + c0 + 16 * c, acc[i * NV + c]);
        }
    }
    for (int i = 0; i < R2; i++) {
        const __m512 s = _mm512_set1_ps(inv[i]);
        for (long c = 0; c < DV; c += 16)
            _mm512_storeu_ps(o + i * DV + c, _mm512_mul_ps(_mm512_loadu_ps(o + i * DV + c), s));
    }
}

#define AD_FN(R2_)                                                                                   \
    __attribute__((noinline, target(AD_TARGET))) static void ad_pair_##R2_(const ad_t *a, long h, float *sc) { \
        ad_pair(a, h, sc, R2_);                                                                       \
    }
AD_FN(2) AD_FN(4) AD_FN(8) AD_FN(16)
#undef AD_FN

static void ad_share(void *arg, int share) {
    ad_t *a = (ad_t *)arg;
    (void)share;
    const long R2 = 2 * a->R;
    float *sc = (float *)malloc(sizeof(float) * (size_t)(((a->T * R2 + 15) / 16) * 16));
    if (!sc) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELEASE);
        return;
    }
    for (long h; (h = next_chunk(&a->next)) < a->P;) {
        if (R2 == 2) ad_pair_2(a, h, sc);
        else if (R2 == 4) ad_pair_4(a, h, sc);
        else if (R2 == 8) ad_pair_8(a, h, sc);
        else ad_pair_16(a, h, sc);
    }
    free(sc);
}

static int ad_supported(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = phf_simd() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                __builtin_cpu_supports("f16c");
    }
    return known;
}
#endif

static int ad_level = 1; /* 0: never take this kernel (tests) */

/* Allows (1) or forbids (0) the 512-bit decode attention; returns the previous setting. */
PHF_EXPORT int phf_set_attend_decode(int on) { return __atomic_exchange_n(&ad_level, on ? 1 : 0, __ATOMIC_ACQ_REL); }

/* phf_attend_rows's arguments with the cache's element type (kv16: float16, else float32); strides
 * in elements. Returns 0, or -1 where this kernel does not apply (nothing written). */
static int attend_decode(const float *q, const void *k, long k_hs, long k_ts, const void *v, long v_hs, long v_ts,
                         const int *rows, const float *k_new, const float *v_new, float *out, long P, long R, long D,
                         long DV, long T, int threads, int kv16) {
#ifdef PHF_X86
    const long R2 = 2 * R;
    if (!__atomic_load_n(&ad_level, __ATOMIC_ACQUIRE) || !ad_supported()) return -1;
    if (!(R2 == 2 || R2 == 4 || R2 == 8 || R2 == 16) || D % 16 != 0 || DV % (16 * (16 / R2)) != 0 || T <= 0 ||
        P <= 0)
        return -1;
    ad_t a = {q, k, v, k_new, v_new, rows, k_hs, k_ts, v_hs, v_ts, out, P, R, D, DV, T, kv16, 0, 0};
    if (threads < 1 || T * P * D < (1L << 14)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > P) threads = (int)P;
    run_shares(ad_share, &a, threads);
    return a.failed ? -1 : 0;
#else
    (void)q; (void)k; (void)k_hs; (void)k_ts; (void)v; (void)v_hs; (void)v_ts; (void)rows; (void)k_new;
    (void)v_new; (void)out; (void)P; (void)R; (void)D; (void)DV; (void)T; (void)threads; (void)kv16;
    return -1;
#endif
}
