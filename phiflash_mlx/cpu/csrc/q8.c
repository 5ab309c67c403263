/*
 * Products of affine-quantized weights (4 and 8 bits) with int8-quantized activations.
 *
 * The float path above (phf_qmatvec) widens every code to float and multiplies it with float x:
 * about 10 GB/s of codes per core, half what one core can read. Here x is quantized once per call,
 * per group g of x's columns (the weight's groups):
 *
 *   d[g] = max|x_g| / 127 (0 for an all-zero group),  id = d ? 1/d : 0,
 *   xq_i = round-half-even(x_i * id)   (int8, float32 arithmetic: NumPy's np.rint(x * id) gives the same),
 *   sx[g] = sum of the original x_g     (float32, so the bias term carries no quantization error),
 *
 * and each output is
 *
 *   y[m, n] = sum_g ( scale[n, g] * d[m, g] * sum_i q[n, i] * xq[m, i]  +  bias[n, g] * sx[m, g] ).
 *
 * The inner sums are exact integer dot products of unsigned codes with signed bytes: AVX512-VNNI's
 * vpdpbusd on 256-bit vectors where the CPU has it, AVX2's vpmaddubsw + vpmaddwd elsewhere on x86-64, plain C
 * otherwise (8-bit codes on AVX2 are widened to int16 first: a pair of 255 * 127 would saturate
 * vpmaddubsw). A 256-bit load holds 64 4-bit codes (byte b: code 2b low nibble, 2b+1 high nibble) or
 * 32 8-bit codes; for 4 bits the activations of each 64 columns are stored even columns first, odd
 * columns second, so the low nibbles (masked) meet the first 32 bytes and the high nibbles (shifted)
 * the second 32 bytes without any shuffle. Per group the int32 lanes become floats and are scaled by
 * d (per x row) and the weight's scale (per weight row) into float accumulators; the bias term is a
 * short float dot of the row's biases with sx.
 *
 * Blocking: a call computes MR rows of x against NR rows of the weight at once (one load of each
 * weight vector serves MR rows of x, one load of x serves NR weight rows). Decode (few rows) splits
 * the weight rows over the pool in chunks of ~64 KB of codes, like phf_qmatvec; blocks of rows
 * (prefill) take tiles of weight rows that stay in L2 while every row of x passes over them.
 *
 * phf_qmatvec and phf_qmatmul route 4- and 8-bit products here while phf_set_q8(1) is in effect.
 */

#ifndef PHF_Q8_BODY

#define Q8_PORTABLE 0
#define Q8_AVX2 1
#define Q8_VNNI 2

static int q8_on = 0;

/* Switch the int8-activation products on (1) or off (0) for phf_qmatvec / phf_qmatmul. Set it
 * before the calls it should affect (calls are serialised by the pool's lock, the switch is read
 * once at the start of a call). */
PHF_EXPORT void phf_set_q8(int on) { __atomic_store_n(&q8_on, on ? 1 : 0, __ATOMIC_RELEASE); }

PHF_EXPORT int phf_q8(void) { return __atomic_load_n(&q8_on, __ATOMIC_ACQUIRE); }

static int q8_level_cap = Q8_VNNI;

/* The best SIMD level of this CPU for these products: 2 AVX512-VNNI (+VL), 1 AVX2+FMA, 0 portable C;
 * at most the cap phf_set_q8_level_cap set. */
PHF_EXPORT int phf_q8_level(void) {
    const int cap = __atomic_load_n(&q8_level_cap, __ATOMIC_ACQUIRE);
#ifdef PHF_X86
    __builtin_cpu_init();
    if (!phf_simd()) return Q8_PORTABLE;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return cap < Q8_VNNI ? cap : Q8_VNNI;
    return cap < Q8_AVX2 ? cap : Q8_AVX2;
#else
    (void)cap;
    return Q8_PORTABLE;
#endif
}

/* Caps the level every int8-activation product uses (2, 1 or 0: what a CPU with only AVX2, or no
 * SIMD, would run; tests and measurements on bigger CPUs); returns the previous cap. */
PHF_EXPORT int phf_set_q8_level_cap(int cap) {
    if (cap < Q8_PORTABLE) cap = Q8_PORTABLE;
    if (cap > Q8_VNNI) cap = Q8_VNNI;
    return __atomic_exchange_n(&q8_level_cap, cap, __ATOMIC_ACQ_REL);
}

#define Q8_TILE_BYTES (64L * 1024) /* codes per unit of work: a chunk of decode rows, a prefill tile */

typedef struct {
    const int8_t *xq;    /* [m, k]; 4 bits with SIMD: each 64 columns even-first, then odd */
    const float *d;      /* [m, groups] */
    const float *dl;     /* [m, units, 8]: d of each int32 lane of a unit (SIMD only) */
    const float *sx;     /* [m, groups] */
    const uint8_t *w;    /* [n, k * bits / 8] */
    const void *scales, *biases; /* [n, groups], dtype code sdtype (PHF_SD_*) */
    float *y;            /* [m, n] */
    long m, k, n, groups, units, row_bytes;
    int bits, group_size, level, sdtype;
    int unit_cols;       /* columns per unit: the group, or 64 for 4-bit groups of 32 (two groups) */
    long rows_per_task, tasks, next;
} q8job_t;

/* ---- quantizing the activations ------------------------------------------------------------ */

static void q8_quantize_group_portable(const float *x, int gs, int8_t *xq, float *d_out, float *sx_out) {
    float amax = 0.0f, s = 0.0f;
    for (int i = 0; i < gs; i++) {
        const float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
        s += x[i];
    }
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < gs; i++) {
        float v = rintf(x[i] * id);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        if (v != v) v = 0.0f; /* NaN input: it reaches y through sx (the bias term) */
        xq[i] = (int8_t)v;
    }
    *d_out = d;
    *sx_out = s;
}

#ifdef PHF_X86
/* The same arithmetic, 8 columns at a time (vcvtps2dq rounds half to even, as rintf does in the
 * default rounding mode); gs a multiple of 32. */
__attribute__((target("avx2,fma"))) static void q8_quantize_group_avx2(const float *x, int gs, int8_t *xq,
                                                                      float *d_out, float *sx_out) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int i = 0; i < gs; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        sum = _mm256_add_ps(sum, v); /* 8 partial sums: a sequential sum's dependency chain cost
                                      * 3/4 of the quantization time */
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float s = hsum256(sum);
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m256 idv = _mm256_set1_ps(id);
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    for (int i = 0; i < gs; i += 32) {
        __m256i q[4];
        for (int t = 0; t < 4; t++) {
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * t), idv));
            q[t] = _mm256_max_epi32(_mm256_min_epi32(v, lim), nlim);
        }
        /* packs work within 128-bit lanes: fix the order with one permute */
        const __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + i), ordered);
    }
    *d_out = d;
    *sx_out = s;
}
#endif

#ifdef PHF_X86
/* Each 64 bytes of a row even-first, then odd (k a multiple of 64): per 128-bit lane gather the even
 * bytes into the low half and the odd ones into the high half, then reorder the 64-bit quarters. */
__attribute__((target("avx2,fma"))) static void q8_split_row_avx2(int8_t *row, long k) {
    const __m256i deint = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (long c = 0; c < k; c += 64) {
        __m256i a = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(row + c)), deint);
        __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(row + c + 32)), deint);
        a = _mm256_permute4x64_epi64(a, 0xD8); /* quarters 0, 2, 1, 3: evens of a, then odds */
        b = _mm256_permute4x64_epi64(b, 0xD8);
        _mm256_storeu_si256((__m256i *)(row + c), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(row + c + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
}
#endif

/* Quantize all rows of x. split: store each 64 columns even-first (the 4-bit SIMD layout). */
static void q8_quantize(const float *x, long m, long k, int gs, int split, int use_avx2, int8_t *xq, float *d,
                        float *sx) {
    const long groups = k / gs;
    int8_t tmp[64];
    for (long r = 0; r < m; r++) {
        for (long g = 0; g < groups; g++) {
            const float *xg = x + r * k + g * gs;
            int8_t *dst = xq + r * k + g * gs;
#ifdef PHF_X86
            if (use_avx2) q8_quantize_group_avx2(xg, gs, dst, d + r * groups + g, sx + r * groups + g);
            else
#endif
                q8_quantize_group_portable(xg, gs, dst, d + r * groups + g, sx + r * groups + g);
        }
        if (split) {
#ifdef PHF_X86
            if (use_avx2) {
                q8_split_row_avx2(xq + r * k, k);
                continue;
            }
#endif
            for (long c = 0; c < k; c += 64) {
                int8_t *blk = xq + r * k + c;
                for (int i = 0; i < 32; i++) {
                    tmp[i] = blk[2 * i];
                    tmp[32 + i] = blk[2 * i + 1];
                }
                memcpy(blk, tmp, 64);
            }
        }
    }
}

/* ---- portable C --------------------------------------------------------------------------- */

static void q8_rows_portable(const q8job_t *j, long n0, long n1) {
    const long G = j->group_size;
    for (long n = n0; n < n1; n++) {
        const uint8_t *wr = j->w + n * j->row_bytes;
        const long sb = n * j->groups;
        for (long m = 0; m < j->m; m++) {
            const int8_t *xr = j->xq + m * j->k;
            const float *dr = j->d + m * j->groups, *sxr = j->sx + m * j->groups;
            float acc = 0.0f, bacc = 0.0f;
            for (long g = 0; g < j->groups; g++) {
                int32_t isum = 0;
                const int8_t *xg = xr + g * G;
                if (j->bits == 4) {
                    const uint8_t *bg = wr + g * G / 2;
                    for (long b = 0; b < G / 2; b++)
                        isum += (int32_t)(bg[b] & 15) * xg[2 * b] + (int32_t)(bg[b] >> 4) * xg[2 * b + 1];
                } else {
                    const uint8_t *bg = wr + g * G;
                    for (long i = 0; i < G; i++) isum += (int32_t)bg[i] * xg[i];
                }
                acc += (float)isum * dr[g] * phf_sd(j->scales, sb + g, j->sdtype);
                bacc += phf_sd(j->biases, sb + g, j->sdtype) * sxr[g];
            }
            j->y[m * j->n + n] = acc + bacc;
        }
    }
}

#ifdef PHF_X86
/* 32 u8 x 32 s8 products summed in fours into 8 int32 lanes, added to acc. */
__attribute__((target("avx2,fma"))) static inline __m256i q8_dot_avx2(__m256i acc, __m256i u, __m256i s) {
    /* vpmaddubsw adds pairs of products in int16 with saturation; for 4-bit codes a pair is at most
     * 2 * 15 * 127 = 3810, so nothing saturates (8-bit codes take q8_dot8_avx2) */
    const __m256i p = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* 8-bit codes on AVX2: widen to int16 first (vpmaddwd of 16-bit codes and 16-bit activations is exact). */
__attribute__((target("avx2,fma"))) static inline __m256i q8_dot8_avx2(__m256i acc, __m256i u, __m256i s) {
    const __m256i u_lo = _mm256_unpacklo_epi8(u, _mm256_setzero_si256());
    const __m256i u_hi = _mm256_unpackhi_epi8(u, _mm256_setzero_si256());
    const __m256i sgn = _mm256_cmpgt_epi8(_mm256_setzero_si256(), s);
    const __m256i s_lo = _mm256_unpacklo_epi8(s, sgn), s_hi = _mm256_unpackhi_epi8(s, sgn);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(u_lo, s_lo), _mm256_madd_epi16(u_hi, s_hi)));
}

__attribute__((target("avx512vl,avx512vnni,avx2,fma"))) static inline __m256i q8_dot_vnni(__m256i acc, __m256i u,
                                                                                            __m256i s) {
    return _mm256_dpbusd_epi32(acc, u, s);
}

/* the SIMD kernels: q8.c included again, once per instruction set */
#define PHF_Q8_BODY 1
#define Q8_NAME(f) f##_avx2
#define Q8_TARGET "avx2,fma"
#define Q8_DOT4(acc, u, s) q8_dot_avx2(acc, u, s)
#define Q8_DOT8(acc, u, s) q8_dot8_avx2(acc, u, s)
#define Q8_MR 2
#define Q8_NR 4
#include "q8.c"
#undef Q8_NAME
#undef Q8_TARGET
#undef Q8_DOT4
#undef Q8_DOT8
#undef Q8_MR
#undef Q8_NR
#define Q8_NAME(f) f##_vnni
#define Q8_TARGET "avx512vl,avx512vnni,avx2,fma"
#define Q8_DOT4(acc, u, s) q8_dot_vnni(acc, u, s)
#define Q8_DOT8(acc, u, s) q8_dot_vnni(acc, u, s)
#define Q8_MR 4
#define Q8_NR 4
#include "q8.c"
#undef PHF_Q8_BODY
#endif

static void q8_run_rows(const q8job_t *j, long n0, long n1) {
#ifdef PHF_X86
    if (j->level == Q8_VNNI) {
        q8_rows_vnni(j, n0, n1);
        return;
    }
    if (j->level == Q8_AVX2) {
        q8_rows_avx2(j, n0, n1);
        return;
    }
#endif
    q8_rows_portable(j, n0, n1);
}

static void q8_share(void *arg, int share) {
    q8job_t *j = (q8job_t *)arg;
    (void)share;
    for (long t; (t = next_chunk(&j->next)) < j->tasks;) {
        const long n0 = t * j->rows_per_task, n1 = n0 + j->rows_per_task < j->n ? n0 + j->rows_per_task : j->n;
        q8_run_rows(j, n0, n1);
    }
}

/* prefetch distance in weight-row pairs (0: none); whole 1K / 32K decode steps, distances alternated
 * in one process: 4 was 1-2% faster than 8 and than 2, 16 was 6% slower, none 70% slower */
static int q8v_prefetch = 4;

/* Sets the software prefetch distance of the 512-bit mat-vec in pairs of weight rows (0 = none);
 * returns the previous one. */
PHF_EXPORT int phf_set_q8v_prefetch(int pairs) {
    return __atomic_exchange_n(&q8v_prefetch, pairs < 0 ? 0 : pairs, __ATOMIC_ACQ_REL);
}

#ifdef PHF_X86
/* The decode mat-vecs' split of n weight rows of row_bytes over the pool: tasks of ~256 KB of codes
 * (each starts its prefetch anew), at least 8 per thread, an even number of rows (pairs); sets
 * *threads (fewer for a small product) and returns the rows per task. */
static long q8_decode_tasks(long n, long k, long row_bytes, int *threads) {
    int t = *threads;
    if (t < 1 || n * k < (1L << 20)) t = 1;
    if (t > MAX_THREADS) t = MAX_THREADS;
    if (n < 8L * t) t = (int)(n / 8) > 0 ? (int)(n / 8) : 1;
    long rows = 4 * Q8_TILE_BYTES / row_bytes + 1;
    if (rows > n / (8L * t) + 1) rows = n / (8L * t) + 1;
    if (rows > 2) rows -= rows % 2;
    *threads = t;
    return rows;
}

/* Per segment of each of m rows of x: d of the segment's group, and the group's sum of x on its first
 * segment only (0 on the others), so that the bias term counts once per group. */
static void q8_segment_terms(const float *d, const float *sx, long m, long groups, long segs, int spg, float *dseg,
                             float *sxseg) {
    for (long r = 0; r < m; r++)
        for (long s = 0; s < segs; s++) {
            dseg[r * segs + s] = d[r * groups + s / spg];
            sxseg[r * segs + s] = s % spg == 0 ? sx[r * groups + s / spg] : 0.0f;
        }
}

/* A decode mat-vec's job (both the 512-bit and the AVX2 one): x quantized per segment of a weight row
 * (half a 64-byte vector: 64 columns at 4 bits, 32 at 8), each segment's d and sum-of-x terms. */
typedef struct {
    const int8_t *xq;            /* [m, k], the kernel's layout */
    const float *dseg, *sxseg;   /* [m, segments]: d of the segment's group; the group's sum of x, or 0 */
    const uint8_t *w;            /* [n, row_bytes] */
    const void *scales, *biases; /* [n, groups], dtype code sdtype */
    float *y;                    /* [m, n] */
    long m, k, n, groups, row_bytes, loads, segs; /* loads: 64-byte vectors per weight row */
    int bits, spg, sdtype;       /* segments per group: 1, 2 or 4 */
    void *scratch[2];            /* what q8_decode_prepare allocated */
} q8d_t;

/* Quantizes x for a decode mat-vec (4 bits: each 64 columns even-first, then odd, and with `swap` the
 * middle quarters of every 128 columns exchanged, the 512-bit kernel's layout) and fills the job.
 * Returns 0, or -1 without memory (nothing to free). */
static int q8_decode_prepare(q8d_t *j, const float *x, long m, long k, const uint32_t *w, const void *scales,
                             const void *biases, int sdtype, long n, int bits, int group_size, float *y, int swap) {
    const long seg_cols = bits == 4 ? 64 : 32, groups = k / group_size, segs = k / seg_cols;
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));
    float *f = (float *)malloc(sizeof(float) * (size_t)(m * (2 * groups + 2 * segs)));
    if (!xq || !f) {
        free(xq);
        free(f);
        return -1;
    }
    float *d = f, *sx = d + m * groups, *dseg = sx + m * groups, *sxseg = dseg + m * segs;
    q8_quantize(x, m, k, group_size, bits == 4, 1, xq, d, sx);
    for (long c = 0; swap && bits == 4 && c < m * k; c += 128) {
        int8_t tmp[32];
        memcpy(tmp, xq + c + 32, 32);
        memcpy(xq + c + 32, xq + c + 64, 32);
        memcpy(xq + c + 64, tmp, 32);
    }
    const int spg = (int)(group_size / seg_cols);
    q8_segment_terms(d, sx, m, groups, segs, spg, dseg, sxseg);
    j->xq = xq; j->dseg = dseg; j->sxseg = sxseg; j->w = (const uint8_t *)w; j->scales = scales; j->biases = biases;
    j->y = y; j->m = m; j->k = k; j->n = n; j->groups = groups; j->row_bytes = k * bits / 8; j->loads = j->row_bytes / 64;
    j->segs = segs; j->bits = bits; j->spg = spg; j->sdtype = sdtype;
    j->scratch[0] = xq;
    j->scratch[1] = f;
    return 0;
}

/* A decode mat-vec's kernels (its job struct passed as `job`) and the split of its weight rows. */
typedef void (*q8_pair_fn)(const void *job, long n, long ahead); /* row 0 of x against weight rows n, n + 1 */
typedef void (*q8_rows_fn)(const void *job, long a0, long n);    /* rows a0 .. of x against weight row n */
typedef struct {
    const void *job;
    const uint8_t *w;
    long m, n, row_bytes, rows_per_task, tasks, next;
    q8_pair_fn pair;
    q8_rows_fn rows[5]; /* rows[mr]: mr = 1 .. 4 rows of x */
} q8_decode_t;

static void q8_decode_share(void *arg, int share) {
    q8_decode_t *j = (q8_decode_t *)arg;
    (void)share;
    const long pf = __atomic_load_n(&q8v_prefetch, __ATOMIC_ACQUIRE), rb = j->row_bytes;
    for (long t; (t = next_chunk(&j->next)) < j->tasks;) {
        const long n0 = t * j->rows_per_task, n1 = n0 + j->rows_per_task < j->n ? n0 + j->rows_per_task : j->n;
        /* prefetch only within the task: the rows after it may be another thread's, and a line fetched
         * into this core's L2 does not help that one; so the task's first rows are fetched up front */
        const long lead = n0 + 2 * pf < n1 ? n0 + 2 * pf : n1;
        for (const uint8_t *p = j->w + n0 * rb, *e = j->w + lead * rb; p < e; p += 64)
            _mm_prefetch((const char *)p, _MM_HINT_T1);
        if (j->m == 1) {
            long n = n0;
            for (; n + 2 <= n1; n += 2) j->pair(j->job, n, pf && n + 2 * pf + 2 <= n1 ? 2 * pf * rb : 0);
            if (n < n1) j->rows[1](j->job, 0, n);
            continue;
        }
        /* several rows of x: groups of up to 4 pass over the task's weight rows (in L2 after the first) */
        for (long a0 = 0; a0 < j->m; a0 += 4) {
            const long mr = j->m - a0 < 4 ? j->m - a0 : 4;
            for (long n = n0; n < n1; n++) {
                if (a0 == 0 && pf && n + 2 * pf < n1)
                    for (long b = 0; b < rb; b += 64)
                        _mm_prefetch((const char *)(j->w + (n + 2 * pf) * rb + b), _MM_HINT_T1);
                j->rows[mr](j->job, a0, n);
            }
        }
    }
}

/* Runs a prepared job's kernels over its weight rows on the pool, then frees the job's scratch. */
static void q8_decode_run(q8d_t *j, int threads, q8_pair_fn pair, q8_rows_fn r1, q8_rows_fn r2, q8_rows_fn r3,
                          q8_rows_fn r4) {
    q8_decode_t d = {j, j->w, j->m, j->n, j->row_bytes, 0, 0, 0, pair, {NULL, r1, r2, r3, r4}};
    d.rows_per_task = q8_decode_tasks(j->n, j->k, j->row_bytes, &threads);
    d.tasks = (j->n + d.rows_per_task - 1) / d.rows_per_task;
    run_shares(q8_decode_share, &d, threads);
    free(j->scratch[0]);
    free(j->scratch[1]);
}
#endif

#ifdef PHF_X86
/* ---- decode rows of x against 4- or 8-bit weights on 512-bit VNNI ------------------------------
 *
 * The block kernel above spends its time on per-group float work: for every 32 bytes of codes it
 * converts 8 int32 lanes, fetches the weight row's scale and multiplies twice, which held one core to
 * ~15 GB/s of codes, below what it can read. Here one 64-byte vector holds two segments of one weight
 * row: 128 4-bit codes (segments of 64 columns) or 64 8-bit codes (segments of 32). At 4 bits the
 * activations are stored per 128 columns as
 *
 *   [even columns of segment 0 | even of segment 1 | odd of segment 0 | odd of segment 1]  (32 bytes each)
 *
 * so the low nibbles meet the first 64 bytes and the high nibbles the second; at 8 bits they are in
 * natural order. Eight such vectors (16 segments) accumulate in eight int32 vectors; a tree of unpacks
 * and adds then reduces them to one vector holding the 16 segment sums, and the float work is done
 * once for 16 segments: convert, multiply by (d of x) x (scale of the row), add; the bias term is one
 * FMA of 16 biases with 16 sums of x. A group of several segments has its scale and bias spread over
 * them, and only its first segment carries the group's sum of x, so the bias counts once. One row of x
 * goes against two weight rows per pass; several rows of x (a batch of streams) go up to four at a
 * time against one weight row, so each weight vector loaded serves all of them. */

#define Q8V_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"

typedef q8d_t q8v_t; /* (xq in the layout above) */

/* `count` (<= 16) consecutive scales / biases from element i, as floats; lanes past count are 0. With
 * spg 2 or 4 each value fills that many lanes (count counts lanes). */
__attribute__((always_inline, target(Q8V_TARGET))) static inline __m512 q8v_sd16(const void *p, long i, int count,
                                                                                   int spg, int dt) {
    const int values = count / spg;
    const __mmask16 m = values >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << values) - 1u);
    __m512 v;
    if (dt == PHF_SD_F32) v = _mm512_maskz_loadu_ps(m, (const float *)p + i);
    else {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
        if (dt == PHF_SD_BF16) v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        else v = _mm512_cvtph_ps(h);
    }
    if (spg == 2) v = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), v);
    if (spg == 4) v = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), v);
    return v;
}

/* 8 vectors of int32 -> one vector: lane 2i + j = the sum of vector i's 256-bit half j */
__attribute__((always_inline, target(Q8V_TARGET))) static inline __m512i q8v_tree(const __m512i *v) {
    __m512i a[4], b[2];
    for (int p = 0; p < 4; p++)
        a[p] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * p], v[2 * p + 1]),
                                _mm512_unpackhi_epi32(v[2 * p], v[2 * p + 1]));
    for (int p = 0; p < 2; p++)
        b[p] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * p], a[2 * p + 1]),
                                _mm512_unpackhi_epi64(a[2 * p], a[2 * p + 1]));
    /* b[p] 128-bit lane L, element i: the sum of lane L of vector 4p + i */
    const __m512i s = _mm512_add_epi32(_mm512_shuffle_i32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15), s);
}

/* row a of x against weight rows n .. n + NR - 1 (NR 1 or 2, BITS 4 or 8: constants after inlining) */
__attribute__((always_inline, target(Q8V_TARGET))) static inline void q8v_block(const q8v_t *j, long a, long n,
                                                                                 const int NR, long ahead,
                                                                                 const int BITS) {
    const __m512i low4 = _mm512_set1_epi8(15);
    const uint8_t *wr[2];
    for (int r = 0; r < NR; r++) wr[r] = j->w + (n + r) * j->row_bytes;
    __m512 acc[2], bacc[2];
    for (int r = 0; r < NR; r++) acc[r] = bacc[r] = _mm512_setzero_ps();
    const long sb0 = n * j->groups;
    for (long l0 = 0; l0 < j->loads; l0 += 8) {
        const int cnt = j->loads - l0 < 8 ? (int)(j->loads - l0) : 8;
        __m512i is[2][8];
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            for (int r = 0; r < NR; r++) is[r][t] = _mm512_setzero_si512();
            if (t >= cnt) continue;
            const int8_t *xp = j->xq + a * j->k + (l0 + t) * (BITS == 4 ? 128 : 64);
            const __m512i xe = _mm512_loadu_si512((const void *)xp);
            const __m512i xo = BITS == 4 ? _mm512_loadu_si512((const void *)(xp + 64)) : xe;
            for (int r = 0; r < NR; r++) {
                const uint8_t *src = wr[r] + (l0 + t) * 64;
                if (ahead) _mm_prefetch((const char *)(src + ahead), _MM_HINT_T1);
                const __m512i v = _mm512_loadu_si512((const void *)src);
                if (BITS == 8) {
                    is[r][t] = _mm512_dpbusd_epi32(is[r][t], v, xe);
                    continue;
                }
                is[r][t] = _mm512_dpbusd_epi32(is[r][t], _mm512_and_si512(v, low4), xe);
                is[r][t] = _mm512_dpbusd_epi32(is[r][t], _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xo);
            }
        }
        const long seg = 2 * l0;
        const int segs = 2 * cnt;
        const __mmask16 m = segs >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << segs) - 1u);
        const __m512 d = _mm512_maskz_loadu_ps(m, j->dseg + a * j->segs + seg);
        const __m512 sx = _mm512_maskz_loadu_ps(m, j->sxseg + a * j->segs + seg);
        for (int r = 0; r < NR; r++) {
            const long at = sb0 + r * j->groups + seg / j->spg;
            const __m512 s = q8v_sd16(j->scales, at, segs, j->spg, j->sdtype);
            const __m512 b = q8v_sd16(j->biases, at, segs, j->spg, j->sdtype);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q8v_tree(is[r])), _mm512_mul_ps(d, s), acc[r]);
            bacc[r] = _mm512_fmadd_ps(b, sx, bacc[r]);
        }
    }
    for (int r = 0; r < NR; r++) j->y[a * j->n + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], bacc[r]));
}

#define Q8V_FNS(B_)                                                                                        \
    __attribute__((noinline, target(Q8V_TARGET))) static void q8v_pair##B_(const void *j, long n, long ahead) { \
        q8v_block((const q8v_t *)j, 0, n, 2, ahead, B_);                                                      \
    }                                                                                                        \
    __attribute__((noinline, target(Q8V_TARGET))) static void q8v_single_row##B_(const void *j, long a, long n) { \
        q8v_block((const q8v_t *)j, a, n, 1, 0, B_);                                                          \
    }
Q8V_FNS(4) Q8V_FNS(8)
#undef Q8V_FNS

/* Rows a0 .. a0 + MR - 1 of x (MR 2, 3 or 4, a constant after inlining) against weight row n: each
 * weight vector loaded serves every x row; blocks of 4 vectors (8 segments), the int32 sums of two x
 * rows reduced by one tree (lanes 0-7 the first row's 8 segments, 8-15 the second's). */
__attribute__((always_inline, target(Q8V_TARGET))) static inline void q8v_rows_block(const q8v_t *j, long a0, long n,
                                                                                      const int MR, const int BITS) {
    const __m512i low4 = _mm512_set1_epi8(15);
    const uint8_t *wr = j->w + n * j->row_bytes;
    const int NP = (MR + 1) / 2; /* pairs of x rows */
    __m512 acc[2], bacc[2];
    for (int p = 0; p < NP; p++) acc[p] = bacc[p] = _mm512_setzero_ps();
    const long sb = n * j->groups;
    for (long l0 = 0; l0 < j->loads; l0 += 4) {
        const int cnt = j->loads - l0 < 4 ? (int)(j->loads - l0) : 4;
        __m512i is[4][4];
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
#pragma GCC unroll 4
            for (int a = 0; a < 4; a++) is[a][t] = _mm512_setzero_si512();
            if (t >= cnt) continue;
            const __m512i v = _mm512_loadu_si512((const void *)(wr + (l0 + t) * 64));
            const __m512i lo = BITS == 4 ? _mm512_and_si512(v, low4) : v;
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 4
            for (int a = 0; a < MR; a++) {
                const int8_t *xp = j->xq + (a0 + a) * j->k + (l0 + t) * (BITS == 4 ? 128 : 64);
                is[a][t] = _mm512_dpbusd_epi32(is[a][t], lo, _mm512_loadu_si512((const void *)xp));
                if (BITS == 4) is[a][t] = _mm512_dpbusd_epi32(is[a][t], hi, _mm512_loadu_si512((const void *)(xp + 64)));
            }
        }
        const long seg = 2 * l0;
        const int segs = 2 * cnt;
        const __mmask8 m8 = segs >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << segs) - 1u);
        /* the weight row's scales and biases of the 8 segments, in both halves */
        const __m512 s8 = q8v_sd16(j->scales, sb + seg / j->spg, segs, j->spg, j->sdtype);
        const __m512 b8 = q8v_sd16(j->biases, sb + seg / j->spg, segs, j->spg, j->sdtype);
        const __m512 s = _mm512_shuffle_f32x4(s8, s8, 0x44), b = _mm512_shuffle_f32x4(b8, b8, 0x44);
#pragma GCC unroll 2
        for (int p = 0; p < NP; p++) {
            const long r0 = a0 + 2 * p, r1 = 2 * p + 1 < MR ? r0 + 1 : r0; /* an odd last row pairs with zeros */
            __m512 d = _mm512_castps256_ps512(_mm256_maskz_loadu_ps(m8, j->dseg + r0 * j->segs + seg));
            __m512 sx = _mm512_castps256_ps512(_mm256_maskz_loadu_ps(m8, j->sxseg + r0 * j->segs + seg));
            d = _mm512_insertf32x8(d, _mm256_maskz_loadu_ps(m8, j->dseg + r1 * j->segs + seg), 1);
            sx = _mm512_insertf32x8(sx, _mm256_maskz_loadu_ps(m8, j->sxseg + r1 * j->segs + seg), 1);
            __m512i v[8];
            for (int t = 0; t < 4; t++) {
                v[t] = is[2 * p][t];
                v[4 + t] = 2 * p + 1 < MR ? is[2 * p + 1][t] : _mm512_setzero_si512();
            }
            acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q8v_tree(v)), _mm512_mul_ps(d, s), acc[p]);
            bacc[p] = _mm512_fmadd_ps(b, sx, bacc[p]);
        }
    }
    for (int p = 0; p < NP; p++) {
        const __m512 t = _mm512_add_ps(acc[p], bacc[p]);
        j->y[(a0 + 2 * p) * j->n + n] = hsum256(_mm512_castps512_ps256(t));
        if (2 * p + 1 < MR)
            j->y[(a0 + 2 * p + 1) * j->n + n] =
                hsum256(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    }
}

#define Q8V_ROWS_FN(MR_, B_)                                                                               \
    __attribute__((noinline, target(Q8V_TARGET))) static void q8v_rows_##MR_##_##B_(const void *j, long a0,     \
                                                                                     long n) {               \
        q8v_rows_block((const q8v_t *)j, a0, n, MR_, B_);                                                    \
    }
Q8V_ROWS_FN(2, 4) Q8V_ROWS_FN(3, 4) Q8V_ROWS_FN(4, 4) Q8V_ROWS_FN(2, 8) Q8V_ROWS_FN(3, 8) Q8V_ROWS_FN(4, 8)
#undef Q8V_ROWS_FN

static int q8v_supported(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
    }
    return known;
}

/* Rows of x (m <= Q8V_MAX_ROWS); 4-bit codes in groups of 64 or 128, 8-bit codes in groups of 32, 64
 * or 128; k a multiple of 128. Returns 0 when done here, -1 to leave the product to the block kernel
 * (nothing written). */
#define Q8V_MAX_ROWS 15
static int q8v_matvec(const float *x, long m, long k, const uint32_t *w, const void *scales, const void *biases,
                      int sdtype, long n, int bits, int group_size, float *y, int threads) {
    if (!q8v_supported() || m < 1 || m > Q8V_MAX_ROWS || k % 128 != 0) return -1;
    if (!(bits == 4 && (group_size == 64 || group_size == 128)) &&
        !(bits == 8 && (group_size == 32 || group_size == 64 || group_size == 128)))
        return -1;
    q8v_t j;
    if (q8_decode_prepare(&j, x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, 1) != 0) return -1;
    if (bits == 4)
        q8_decode_run(&j, threads, q8v_pair4, q8v_single_row4, q8v_rows_2_4, q8v_rows_3_4, q8v_rows_4_4);
    else
        q8_decode_run(&j, threads, q8v_pair8, q8v_single_row8, q8v_rows_2_8, q8v_rows_3_8, q8v_rows_4_8);
    return 0;
}
#endif

#ifdef PHF_X86
/* ---- one row of x against 4- or 8-bit weights on AVX2 ---------------------------------------
 *
 * The same design as the 512-bit mat-vec above for CPUs without AVX-512 (most laptops): the block
 * kernel's per-group float work held one core to ~13 GB/s of codes. Here one 32-byte vector is one
 * segment of a weight row (64 4-bit codes, the low nibbles the even columns, or 32 8-bit codes), its
 * products with x summed into 8 int32 lanes (vpmaddubsw + vpmaddwd; 8-bit codes widened to int16
 * first, as a pair of 255 * 127 would saturate vpmaddubsw). Eight segments are reduced by a tree of
 * unpacks and adds, built as the segments arrive (16 registers hold two weight rows' partial trees),
 * to one vector of 8 segment sums; the float work is then done once for 8 segments. x is stored per
 * segment as q8_quantize writes it (4 bits: even columns, then odd). One row of x goes against two
 * weight rows per pass, which share each load of x; several rows of x (a batch of streams) go up to
 * four at a time against one weight row, which each segment of codes loaded serves. k a multiple of
 * 8 segments. */

#define Q8A_TARGET "avx2,fma,f16c"

typedef q8d_t q8a_t; /* (xq as q8_quantize writes it) */

/* 8 consecutive segments' scales (or biases) from value i of a row, spread over spg segments each */
__attribute__((always_inline, target(Q8A_TARGET))) static inline __m256 q8a_sd8(const void *p, long i, int spg,
                                                                                  int dt) {
    __m256 v;
    if (spg == 1) {
        if (dt == PHF_SD_F32) return _mm256_loadu_ps((const float *)p + i);
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        if (dt == PHF_SD_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        return _mm256_cvtph_ps(h);
    }
    const int values = 8 / spg; /* 4 or 2 */
    if (dt == PHF_SD_F32)
        v = _mm256_castps128_ps256(values == 4 ? _mm_loadu_ps((const float *)p + i)
                                               : _mm_castpd_ps(_mm_load_sd((const double *)((const float *)p + i))));
    else {
        uint64_t raw = 0;
        memcpy(&raw, (const uint16_t *)p + i, sizeof(uint16_t) * (size_t)values);
        const __m128i h = _mm_cvtsi64_si128((long long)raw);
        v = dt == PHF_SD_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                              : _mm256_cvtph_ps(h);
    }
    const __m256i idx = spg == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    return _mm256_permutevar8x32_ps(v, idx);
}

/* one segment of a weight row, ready for the products: 4 bits: the low and the high nibbles; 8 bits:
 * the two halves widened to int16 */
typedef struct {
    __m256i a, b;
} q8a_codes;

__attribute__((always_inline, target(Q8A_TARGET))) static inline q8a_codes q8a_load(const uint8_t *src, const int BITS) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)src);
    q8a_codes c;
    if (BITS == 4) {
        const __m256i low4 = _mm256_set1_epi8(15);
        c.a = _mm256_and_si256(v, low4);
        c.b = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    } else {
        c.a = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
        c.b = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
    }
    return c;
}

/* the int32 products of one segment with x (8 lanes to be summed) */
__attribute__((always_inline, target(Q8A_TARGET))) static inline __m256i q8a_dot(q8a_codes c, const int8_t *xp,
                                                                                   const int BITS) {
    if (BITS == 4) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(c.a, _mm256_loadu_si256((const __m256i *)xp)),
                                           _mm256_maddubs_epi16(c.b, _mm256_loadu_si256((const __m256i *)(xp + 32))));
        return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
    }
    const __m128i x0 = _mm_loadu_si128((const __m128i *)xp), x1 = _mm_loadu_si128((const __m128i *)(xp + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(c.a, _mm256_cvtepi8_epi16(x0)),
                            _mm256_madd_epi16(c.b, _mm256_cvtepi8_epi16(x1)));
}

/* two segment vectors -> lanes (per 128-bit half) [a0+a2, b0+b2, a1+a3, b1+b3] */
__attribute__((always_inline, target(Q8A_TARGET))) static inline __m256i q8a_pair(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}

/* two pairs -> per 128-bit half, the sums of that half of each of the 4 segments */
__attribute__((always_inline, target(Q8A_TARGET))) static inline __m256i q8a_quad(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
}

/* weight rows n .. n + NR - 1 (NR 1 or 2) against row a of x */
__attribute__((always_inline, target(Q8A_TARGET))) static inline void q8a_block(const q8a_t *j, long a, long n,
                                                                                 const int NR, long ahead,
                                                                                 const int BITS) {
    const uint8_t *wr[2];
    for (int r = 0; r < NR; r++) wr[r] = j->w + (n + r) * j->row_bytes;
    const long xstep = BITS == 4 ? 64 : 32;
    __m256 acc[2], bacc[2];
    for (int r = 0; r < NR; r++) acc[r] = bacc[r] = _mm256_setzero_ps();
    for (long seg = 0; seg < j->segs; seg += 8) {
        __m256i quad[2][2];
#pragma GCC unroll 2
        for (int q = 0; q < 2; q++) {
            __m256i pair[2][2];
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const long s0 = seg + 4 * q + 2 * h;
                const int8_t *x0 = j->xq + a * j->k + s0 * xstep;
                __m256i u[2], v[2];
                for (int r = 0; r < NR; r++) {
                    const uint8_t *src = wr[r] + s0 * 32;
                    if (ahead) _mm_prefetch((const char *)(src + ahead), _MM_HINT_T1);
                    u[r] = q8a_dot(q8a_load(src, BITS), x0, BITS);
                    v[r] = q8a_dot(q8a_load(src + 32, BITS), x0 + xstep, BITS);
                }
                for (int r = 0; r < NR; r++) pair[r][h] = q8a_pair(u[r], v[r]);
            }
            for (int r = 0; r < NR; r++) quad[r][q] = q8a_quad(pair[r][0], pair[r][1]);
        }
        const __m256 d = _mm256_loadu_ps(j->dseg + a * j->segs + seg), sx = _mm256_loadu_ps(j->sxseg + a * j->segs + seg);
        for (int r = 0; r < NR; r++) {
            /* lanes 0-3: segments 0-3, lanes 4-7: segments 4-7, each the sum of both 128-bit halves */
            const __m256i lo = _mm256_permute2x128_si256(quad[r][0], quad[r][1], 0x20);
            const __m256i hi = _mm256_permute2x128_si256(quad[r][0], quad[r][1], 0x31);
            const long at = (n + r) * j->groups + seg / j->spg;
            const __m256 sc = q8a_sd8(j->scales, at, j->spg, j->sdtype);
            const __m256 bi = q8a_sd8(j->biases, at, j->spg, j->sdtype);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_mul_ps(d, sc), acc[r]);
            bacc[r] = _mm256_fmadd_ps(bi, sx, bacc[r]);
        }
    }
    for (int r = 0; r < NR; r++) j->y[a * j->n + n + r] = hsum256(_mm256_add_ps(acc[r], bacc[r]));
}

/* Rows a0 .. a0 + MR - 1 of x (MR 2, 3 or 4) against weight row n: each segment of codes loaded (and
 * split or widened) serves every row of x. */
__attribute__((always_inline, target(Q8A_TARGET))) static inline void q8a_rows_block(const q8a_t *j, long a0, long n,
                                                                                      const int MR, const int BITS) {
    const uint8_t *wr = j->w + n * j->row_bytes;
    const long xstep = BITS == 4 ? 64 : 32;
    __m256 acc[4], bacc[4];
    for (int r = 0; r < MR; r++) acc[r] = bacc[r] = _mm256_setzero_ps();
    for (long seg = 0; seg < j->segs; seg += 8) {
        __m256i quad[4][2];
#pragma GCC unroll 2
        for (int q = 0; q < 2; q++) {
            __m256i pair[4][2];
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const long s0 = seg + 4 * q + 2 * h;
                const q8a_codes c0 = q8a_load(wr + s0 * 32, BITS), c1 = q8a_load(wr + s0 * 32 + 32, BITS);
#pragma GCC unroll 4
                for (int r = 0; r < MR; r++) {
                    const int8_t *x0 = j->xq + (a0 + r) * j->k + s0 * xstep;
                    pair[r][h] = q8a_pair(q8a_dot(c0, x0, BITS), q8a_dot(c1, x0 + xstep, BITS));
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < MR; r++) quad[r][q] = q8a_quad(pair[r][0], pair[r][1]);
        }
        const long at = n * j->groups + seg / j->spg;
        const __m256 sc = q8a_sd8(j->scales, at, j->spg, j->sdtype);
        const __m256 bi = q8a_sd8(j->biases, at, j->spg, j->sdtype);
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
            const __m256i lo = _mm256_permute2x128_si256(quad[r][0], quad[r][1], 0x20);
            const __m256i hi = _mm256_permute2x128_si256(quad[r][0], quad[r][1], 0x31);
            const float *dr = j->dseg + (a0 + r) * j->segs + seg, *sr = j->sxseg + (a0 + r) * j->segs + seg;
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)),
                                     _mm256_mul_ps(_mm256_loadu_ps(dr), sc), acc[r]);
            bacc[r] = _mm256_fmadd_ps(bi, _mm256_loadu_ps(sr), bacc[r]);
        }
    }
    for (int r = 0; r < MR; r++) j->y[(a0 + r) * j->n + n] = hsum256(_mm256_add_ps(acc[r], bacc[r]));
}

#define Q8A_FNS(B_)                                                                                        \
    __attribute__((noinline, target(Q8A_TARGET))) static void q8a_pair##B_(const void *j, long n, long ahead) { \
        q8a_block((const q8a_t *)j, 0, n, 2, ahead, B_);                                                      \
    }                                                                                                        \
    __attribute__((noinline, target(Q8A_TARGET))) static void q8a_single##B_(const void *j, long a, long n) {   \
        q8a_block((const q8a_t *)j, a, n, 1, 0, B_);                                                          \
    }                                                                                                        \
    __attribute__((noinline, target(Q8A_TARGET))) static void q8a_rows2_##B_(const void *j, long a0, long n) {  \
        q8a_rows_block((const q8a_t *)j, a0, n, 2, B_);                                                       \
    }                                                                                                        \
    __attribute__((noinline, target(Q8A_TARGET))) static void q8a_rows3_##B_(const void *j, long a0, long n) {  \
        q8a_rows_block((const q8a_t *)j, a0, n, 3, B_);                                                       \
    }                                                                                                        \
    __attribute__((noinline, target(Q8A_TARGET))) static void q8a_rows4_##B_(const void *j, long a0, long n) {  \
        q8a_rows_block((const q8a_t *)j, a0, n, 4, B_);                                                       \
    }
Q8A_FNS(4) Q8A_FNS(8)
#undef Q8A_FNS

/* Rows of x (m <= Q8V_MAX_ROWS); 4-bit codes in groups of 64 or 128, 8-bit codes in groups of 32, 64
 * or 128; a multiple of 8 segments per row (k % 512 == 0 at 4 bits, k % 256 == 0 at 8); 16-bit
 * scales need F16C. Returns 0 when done here, -1 to leave the product to the block kernel (nothing
 * written). */
static int q8a_matvec(const float *x, long m, long k, const uint32_t *w, const void *scales, const void *biases,
                      int sdtype, long n, int bits, int group_size, float *y, int threads) {
    if (m < 1 || m > Q8V_MAX_ROWS || !phf_simd() || (sdtype == PHF_SD_F16 && !phf_f16c())) return -1;
    if (!(bits == 4 && (group_size == 64 || group_size == 128)) &&
        !(bits == 8 && (group_size == 32 || group_size == 64 || group_size == 128)))
        return -1;
    const long seg_cols = bits == 4 ? 64 : 32;
    if (k % seg_cols != 0 || (k / seg_cols) % 8 != 0) return -1;
    q8a_t j;
    if (q8_decode_prepare(&j, x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, 0) != 0) return -1;
    if (bits == 4)
        q8_decode_run(&j, threads, q8a_pair4, q8a_single4, q8a_rows2_4, q8a_rows3_4, q8a_rows4_4);
    else
        q8_decode_run(&j, threads, q8a_pair8, q8a_single8, q8a_rows2_8, q8a_rows3_8, q8a_rows4_8);
    return 0;
}
#endif

/*
 * y[m, n] = x[m, k] @ dequantize(w, scales, biases)[n, k]^T with x quantized to int8 per group (see the
 * top of this file); same arguments and layout as phf_qmatvec_sd (scales and biases float32, float16
 * or bfloat16 by sdtype), bits 4 or 8. level: the SIMD level to use at most (2 VNNI, 1 AVX2, 0
 * portable; a negative value: the best this CPU has). Returns 0, or -1 for an unsupported case or
 * when scratch memory could not be had (nothing written).
 */
/* blocks of many rows: weight rows in vector lanes (q8_gemm.c) */
static int q8g_route(const float *x, long m, long k, const uint32_t *w, const void *scales, const void *biases,
                     int sdtype, long n, int bits, int group_size, float *y, int threads, int level);

PHF_EXPORT int phf_q8_matmul_sd(const float *x, long m, long k, const uint32_t *w, const void *scales,
                                const void *biases, int sdtype, long n, int bits, int group_size, float *y,
                                int threads, int level) {
    if (!(bits == 4 || bits == 8) || group_size <= 0 || m <= 0 || n <= 0 || k <= 0) return -1;
    if (sdtype < PHF_SD_F32 || sdtype > PHF_SD_BF16) return -1;
    if (group_size % 32 != 0 || k % group_size != 0) return -1;
    if (q8g_route(x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, threads, level) == 0) return 0;
    const int best = phf_q8_level();
    if (level < 0 || level > best) level = best;
#ifdef PHF_X86
    if (level == Q8_VNNI && q8v_matvec(x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, threads) == 0)
        return 0;
    if (level == Q8_AVX2 && q8a_matvec(x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, threads) == 0)
        return 0;
#endif
    /* 4-bit SIMD works on 64 columns at a time */
    if (bits == 4 && k % 64 != 0) level = Q8_PORTABLE;
    const long groups = k / group_size;
    const int unit_cols = (bits == 4 && group_size == 32) ? 64 : group_size;
    const long units = k / unit_cols;
    const int split = bits == 4 && level != Q8_PORTABLE;
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));
    float *d = (float *)malloc(sizeof(float) * (size_t)(2 * m * groups));
    float *dl = level != Q8_PORTABLE ? (float *)malloc(sizeof(float) * (size_t)(m * units * 8)) : NULL;
    if (!xq || !d || (level != Q8_PORTABLE && !dl)) {
        free(xq);
        free(d);
        free(dl);
        return -1;
    }
    float *sx = d + m * groups;
    q8_quantize(x, m, k, group_size, split, level != Q8_PORTABLE, xq, d, sx);
    if (dl) {
        for (long r = 0; r < m; r++) {
            for (long u = 0; u < units; u++) {
                float *dst = dl + (r * units + u) * 8;
                if (unit_cols == group_size) {
                    for (int l = 0; l < 8; l++) dst[l] = d[r * groups + u];
                } else { /* 4 bits, groups of 32: lanes 0-3 hold columns 0..31 of the unit, 4-7 the rest */
                    for (int l = 0; l < 8; l++) dst[l] = d[r * groups + 2 * u + (l >= 4)];
                }
            }
        }
    }
    q8job_t j;
    j.xq = xq; j.d = d; j.dl = dl; j.sx = sx;
    j.w = (const uint8_t *)w; j.scales = scales; j.biases = biases; j.y = y;
    j.m = m; j.k = k; j.n = n; j.groups = groups; j.units = units; j.row_bytes = k * bits / 8;
    j.bits = bits; j.group_size = group_size; j.level = level; j.unit_cols = unit_cols; j.sdtype = sdtype;
    /* below about a million weights a second thread costs more than it saves */
    if (threads < 1 || n * k < (1L << 20)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (n < 8L * threads) threads = (int)(n / 8) > 0 ? (int)(n / 8) : 1;
    /* units of work of ~64 KB of codes (they stay in L2 while all rows of x pass), at least 8 per
     * thread; a multiple of 4 rows where possible */
    long rows = Q8_TILE_BYTES / j.row_bytes + 1;
    if (rows > n / (8L * threads) + 1) rows = n / (8L * threads) + 1;
    if (rows > 4) rows -= rows % 4;
    j.rows_per_task = rows;
    j.tasks = (n + rows - 1) / rows;
    j.next = 0;
    run_shares(q8_share, &j, threads);
    free(xq);
    free(d);
    free(dl);
    return 0;
}

/* phf_q8_matmul_sd with float32 scales and biases */
PHF_EXPORT int phf_q8_matmul(const float *x, long m, long k, const uint32_t *w, const float *scales,
                             const float *biases, long n, int bits, int group_size, float *y, int threads,
                             int level) {
    return phf_q8_matmul_sd(x, m, k, w, scales, biases, PHF_SD_F32, n, bits, group_size, y, threads, level);
}

#else /* PHF_Q8_BODY: the SIMD kernels, compiled once per instruction set (see above) */

/* y for x rows [m0, m0 + MR) x weight rows [n0, n0 + NR); MR, NR, BITS are constants after inlining. */
__attribute__((always_inline, target(Q8_TARGET))) static inline void Q8_NAME(q8_block)(const q8job_t *j, long m0,
                                                                                      long n0, const int MR,
                                                                                      const int NR, const int BITS) {
    const long k = j->k, units = j->units, rb = j->row_bytes;
    const int cols = BITS == 4 ? 64 : 32;             /* columns per 32-byte load of codes */
    const long loads = j->unit_cols / cols;           /* loads per unit: 1, 2 or 4 */
    const int split = j->unit_cols != j->group_size;  /* 4 bits, groups of 32 */
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc[Q8_MR][Q8_NR];
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) acc[a][b] = _mm256_setzero_ps();
    const uint8_t *wrow[Q8_NR];
    for (int b = 0; b < NR; b++) wrow[b] = j->w + (n0 + b) * rb;
    /* prefetch the next block of weight rows (contiguous with this one) a slice per unit: in decode
     * the 4 row streams alone did not keep enough reads in flight (20480 x 2560, one thread:
     * 4.2-6.6 GB/s without, 14.5 with; the float path 9.8) */
    const uint8_t *ahead = wrow[0] + NR * rb;
    const long ahead_step = NR * rb / units;
    for (long u = 0; u < units; u++) {
        for (long o = 0; o < ahead_step; o += 64) _mm_prefetch((const char *)(ahead + u * ahead_step + o), _MM_HINT_T0);
        __m256i isum[Q8_MR][Q8_NR];
        for (int a = 0; a < MR; a++)
            for (int b = 0; b < NR; b++) isum[a][b] = _mm256_setzero_si256();
        for (long c = 0; c < loads; c++) {
            const long blk = u * loads + c;
            if (BITS == 4) {
                __m256i lo[Q8_NR], hi[Q8_NR];
                for (int b = 0; b < NR; b++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wrow[b] + blk * 32));
                    lo[b] = _mm256_and_si256(v, low4);
                    hi[b] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                }
                for (int a = 0; a < MR; a++) {
                    const int8_t *xa = j->xq + (m0 + a) * k + blk * 64;
                    const __m256i xe = _mm256_loadu_si256((const __m256i *)xa);
                    const __m256i xo = _mm256_loadu_si256((const __m256i *)(xa + 32));
                    for (int b = 0; b < NR; b++) {
                        isum[a][b] = Q8_DOT4(isum[a][b], lo[b], xe);
                        isum[a][b] = Q8_DOT4(isum[a][b], hi[b], xo);
                    }
                }
            } else {
                __m256i cv[Q8_NR];
                for (int b = 0; b < NR; b++) cv[b] = _mm256_loadu_si256((const __m256i *)(wrow[b] + blk * 32));
                for (int a = 0; a < MR; a++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(j->xq + (m0 + a) * k + blk * 32));
                    for (int b = 0; b < NR; b++) isum[a][b] = Q8_DOT8(isum[a][b], cv[b], xv);
                }
            }
        }
        __m256 sv[Q8_NR];
        for (int b = 0; b < NR; b++) {
            const long sb = (n0 + b) * j->groups;
            sv[b] = split ? _mm256_blend_ps(_mm256_set1_ps(phf_sd(j->scales, sb + 2 * u, j->sdtype)),
                                            _mm256_set1_ps(phf_sd(j->scales, sb + 2 * u + 1, j->sdtype)), 0xF0)
                          : _mm256_set1_ps(phf_sd(j->scales, sb + u, j->sdtype));
        }
        for (int a = 0; a < MR; a++) {
            const __m256 dv = _mm256_loadu_ps(j->dl + ((m0 + a) * units + u) * 8);
            for (int b = 0; b < NR; b++)
                acc[a][b] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum[a][b]), dv), sv[b], acc[a][b]);
        }
    }
    for (int a = 0; a < MR; a++) {
        const float *sxr = j->sx + (m0 + a) * j->groups;
        for (int b = 0; b < NR; b++) {
            const long sb = (n0 + b) * j->groups;
            __m256 bacc = _mm256_setzero_ps();
            long g = 0;
            for (; g + 8 <= j->groups; g += 8)
                bacc = _mm256_fmadd_ps(phf_sd8_avx2(j->biases, sb + g, j->sdtype), _mm256_loadu_ps(sxr + g), bacc);
            float bias_part = 0.0f;
            for (; g < j->groups; g++) bias_part += phf_sd(j->biases, sb + g, j->sdtype) * sxr[g];
            j->y[(m0 + a) * j->n + n0 + b] = hsum256(acc[a][b]) + hsum256(bacc) + bias_part;
        }
    }
}

/* every (MR, NR) up to the maxima as its own unrolled function, for 4 and 8 bits */
#define Q8_FN(MR_, NR_)                                                                                      \
    __attribute__((noinline, target(Q8_TARGET))) static void Q8_NAME(q8_b4_##MR_##_##NR_)(const q8job_t *j,  \
                                                                                         long m0, long n0) { \
        Q8_NAME(q8_block)(j, m0, n0, MR_, NR_, 4);                                                            \
    }                                                                                                        \
    __attribute__((noinline, target(Q8_TARGET))) static void Q8_NAME(q8_b8_##MR_##_##NR_)(const q8job_t *j,  \
                                                                                         long m0, long n0) { \
        Q8_NAME(q8_block)(j, m0, n0, MR_, NR_, 8);                                                            \
    }
Q8_FN(1, 1) Q8_FN(1, 2) Q8_FN(1, 3) Q8_FN(1, 4)
Q8_FN(2, 1) Q8_FN(2, 2) Q8_FN(2, 3) Q8_FN(2, 4)
#if Q8_MR > 2
Q8_FN(3, 1) Q8_FN(3, 2) Q8_FN(3, 3) Q8_FN(3, 4)
Q8_FN(4, 1) Q8_FN(4, 2) Q8_FN(4, 3) Q8_FN(4, 4)
#endif
#undef Q8_FN

__attribute__((target(Q8_TARGET))) static void Q8_NAME(q8_block_any)(const q8job_t *j, long m0, long n0, int mr,
                                                                     int nr) {
#define Q8_CASE(MR_, NR_)                                                                                     \
    case (MR_) * 8 + (NR_):                                                                                 \
        if (j->bits == 4) Q8_NAME(q8_b4_##MR_##_##NR_)(j, m0, n0);                                          \
        else Q8_NAME(q8_b8_##MR_##_##NR_)(j, m0, n0);                                                       \
        return;
    switch (mr * 8 + nr) {
        Q8_CASE(1, 1) Q8_CASE(1, 2) Q8_CASE(1, 3) Q8_CASE(1, 4)
        Q8_CASE(2, 1) Q8_CASE(2, 2) Q8_CASE(2, 3) Q8_CASE(2, 4)
#if Q8_MR > 2
        Q8_CASE(3, 1) Q8_CASE(3, 2) Q8_CASE(3, 3) Q8_CASE(3, 4)
        Q8_CASE(4, 1) Q8_CASE(4, 2) Q8_CASE(4, 3) Q8_CASE(4, 4)
#endif
    }
#undef Q8_CASE
}

/* weight rows [n0, n1) against every row of x, in blocks of Q8_MR x Q8_NR */
__attribute__((target(Q8_TARGET))) static void Q8_NAME(q8_rows)(const q8job_t *j, long n0, long n1) {
    for (long m0 = 0; m0 < j->m; m0 += Q8_MR) {
        const int mr = j->m - m0 < Q8_MR ? (int)(j->m - m0) : Q8_MR;
        for (long r = n0; r < n1; r += Q8_NR) {
            const int nr = n1 - r < Q8_NR ? (int)(n1 - r) : Q8_NR;
            Q8_NAME(q8_block_any)(j, m0, r, mr, nr);
        }
    }
}

#endif /* PHF_Q8_BODY */
