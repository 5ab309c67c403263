/* Differential attention of many queries (prompt processing) over key ranges.
 *
 * The same layout and result as phf_attend above (DiffAttention of phiflash_mlx.models.phi4flash):
 * P = nkv / 2 KV pairs; pair h holds two key heads side by side in one row of width 2D (columns
 * [0, D) for stripe 1, [D, 2D) for stripe 2) and one value row of width DV = 2D that serves both.
 * Query head j (natural order, nh = 2 P G heads) belongs to stripe j % 2 and to pair (j / 2) / G.
 * Query position r of sequence b attends only keys t in [lo[b][r], hi[b][r]):
 *
 *   out[part][b][i][r] = softmax_{lo <= t < hi}(scale * q[b][2i + part][r] . k[b][i / G][t][part]) @ v[b][i / G][t]
 *
 * Per-row ranges express causal masks (with an offset when the cache already holds keys), sliding
 * windows and left or right padding. A row whose range is empty gets zeros.
 *
 * Unlike phf_attend, which keeps a row of scores per query over the whole cache (fine for a few
 * queries), this one is tiled for many: a unit of work is (b, pair, block of qb positions), i.e.
 * 2 G qb rows of queries (both stripes) that share the pair's keys and values. Keys are walked in
 * blocks of AM_KB between the block's lowest lo and highest hi (keys no row of the block may see
 * are never touched), with an online softmax (running maximum and sum per row, FlashAttention
 * style), so the scratch is rows x AM_KB scores + rows x DV accumulators whatever the cache length.
 * Both products (scores = Q K^T and P V) run on one register-blocked micro-kernel (6 rows x 16
 * columns, 12 AVX accumulators); the key block is packed transposed (D x AM_KB) first so that the
 * score product also streams contiguous columns. Units are handed out from a shared counter, the
 * most expensive query blocks (the last ones under a causal mask) first.
 *
 * Keys and values may be float16 (kvtype PHF_SD_F16, as in phf_attend): each key row is widened as it
 * is packed and each block of value rows into a float32 scratch before its product. */

#define AM_KB 256    /* keys per block */
#define AM_ROWS 128  /* rows of queries (both stripes) a unit aims at: 32 positions x 4 heads at the real shapes */

typedef struct {
    const float *q;
    long q_bs, q_hs, q_ls;      /* q[b][j][r][0..D) = q + b q_bs + j q_hs + r q_ls */
    const void *k;              /* float32 or float16 (kvtype); strides in elements */
    long k_bs, k_hs, k_ts;      /* row t of pair h: k + b k_bs + h k_hs + t k_ts, 2D values */
    const void *v;
    long v_bs, v_hs, v_ts;      /* v + b v_bs + h v_hs + t v_ts, DV values */
    const int64_t *lo, *hi;     /* lo[b * r_bs + r] */
    long r_bs;
    float *out;                 /* [2][B][P G][L][DV] */
    long B, P, G, L, D, DV, T, qb, nqb;
    float scale;
    int use_avx2, kvtype, f16c;
    int failed;
    long next;
} many_t;

/* n float16 values from src -> float32 dst */
static void am_widen(const many_t *a, float *dst, const void *src, long n) {
#ifdef PHF_X86
    if (a->f16c) {
        widen_f16_avx2(dst, (const uint16_t *)src, n);
        return;
    }
#endif
    for (long i = 0; i < n; i++) dst[i] = phf_f16_to_float(((const uint16_t *)src)[i]);
}

/* C[M x N] (+)= A[M x K] B[K x N]; all row-major with the given leading dimensions. */
static void am_gemm_portable(const float *A, long lda, const float *Bm, long ldb, float *C, long ldc, long M,
                             long N, long K, int accumulate) {
    for (long i = 0; i < M; i++) {
        float *c = C + i * ldc;
        if (!accumulate)
            for (long j = 0; j < N; j++) c[j] = 0.0f;
        for (long kk = 0; kk < K; kk++) {
            const float a = A[i * lda + kk];
            const float *b = Bm + kk * ldb;
            for (long j = 0; j < N; j++) c[j] += a * b[j];
        }
    }
}

#ifdef PHF_X86
/* mr (<= 6) rows x 16 columns, the accumulators in registers for the whole K loop. */
__attribute__((target("avx2,fma"), always_inline)) static inline void am_tile16(const float *A, long lda,
                                                                                const float *Bm, long ldb,
                                                                                float *C, long ldc, long K,
                                                                                const int mr, int accumulate) {
    __m256 c0[6], c1[6];
    for (int i = 0; i < mr; i++) {
        c0[i] = accumulate ? _mm256_loadu_ps(C + i * ldc) : _mm256_setzero_ps();
        c1[i] = accumulate ? _mm256_loadu_ps(C + i * ldc + 8) : _mm256_setzero_ps();
    }
    for (long kk = 0; kk < K; kk++) {
        const __m256 b0 = _mm256_loadu_ps(Bm + kk * ldb), b1 = _mm256_loadu_ps(Bm + kk * ldb + 8);
        for (int i = 0; i < mr; i++) {
            const __m256 a = _mm256_broadcast_ss(A + i * lda + kk);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(C + i * ldc, c0[i]);
        _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
    }
}

/* mr (<= 6) rows x 8 columns. */
__attribute__((target("avx2,fma"), always_inline)) static inline void am_tile8(const float *A, long lda,
                                                                               const float *Bm, long ldb,
                                                                               float *C, long ldc, long K,
                                                                               const int mr, int accumulate) {
    __m256 c0[6];
    for (int i = 0; i < mr; i++) c0[i] = accumulate ? _mm256_loadu_ps(C + i * ldc) : _mm256_setzero_ps();
    for (long kk = 0; kk < K; kk++) {
        const __m256 b0 = _mm256_loadu_ps(Bm + kk * ldb);
        for (int i = 0; i < mr; i++) c0[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + i * lda + kk), b0, c0[i]);
    }
    for (int i = 0; i < mr; i++) _mm256_storeu_ps(C + i * ldc, c0[i]);
}

#define AM_SWITCH(tile, mr)                                                 \
    switch (mr) {                                                           \
    case 6: tile(a, lda, b, ldb, c, ldc, K, 6, accumulate); break;          \
    case 5: tile(a, lda, b, ldb, c, ldc, K, 5, accumulate); break;          \
    case 4: tile(a, lda, b, ldb, c, ldc, K, 4, accumulate); break;          \
    case 3: tile(a, lda, b, ldb, c, ldc, K, 3, accumulate); break;          \
    case 2: tile(a, lda, b, ldb, c, ldc, K, 2, accumulate); break;          \
    default: tile(a, lda, b, ldb, c, ldc, K, 1, accumulate); break;         \
    }

__attribute__((target("avx2,fma"))) static void am_gemm_avx2(const float *A, long lda, const float *Bm, long ldb,
                                                             float *C, long ldc, long M, long N, long K,
                                                             int accumulate) {
    for (long i = 0; i < M; i += 6) {
        const int mr = M - i < 6 ? (int)(M - i) : 6;
        long j = 0;
        for (; j + 16 <= N; j += 16) {
            const float *a = A + i * lda, *b = Bm + j;
            float *c = C + i * ldc + j;
            AM_SWITCH(am_tile16, mr)
        }
        for (; j + 8 <= N; j += 8) {
            const float *a = A + i * lda, *b = Bm + j;
            float *c = C + i * ldc + j;
            AM_SWITCH(am_tile8, mr)
        }
        if (j < N) am_gemm_portable(A + i * lda, lda, Bm + j, ldb, C + i * ldc + j, ldc, mr, N - j, K, accumulate);
    }
}
#undef AM_SWITCH

/* The maximum of s[from .. to) (from < to). */
__attribute__((target("avx2,fma"))) static float am_row_max_avx2(const float *s, long from, long to) {
    long j = from;
    float m = s[from];
    if (to - from >= 8) {
        __m256 mv = _mm256_loadu_ps(s + from);
        for (j = from + 8; j + 8 <= to; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        m = _mm_cvtss_f32(h);
    }
    for (; j < to; j++) m = s[j] > m ? s[j] : m;
    return m;
}

/* s[j] = exp(s[j] - m) for j in [from, to); returns their sum. */
__attribute__((target("avx2,fma"))) static float am_row_exp_avx2(float *s, long from, long to, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    long j = from;
    for (; j + 8 <= to; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = hsum256(total);
    for (; j < to; j++) {
        const float e = expf(s[j] - m);
        s[j] = e;
        sum += e;
    }
    return sum;
}
#endif

static float am_row_max(int use_avx2, const float *s, long from, long to) {
#ifdef PHF_X86
    if (use_avx2) return am_row_max_avx2(s, from, to);
#endif
    (void)use_avx2;
    float m = s[from];
    for (long j = from + 1; j < to; j++) m = s[j] > m ? s[j] : m;
    return m;
}

static float am_row_exp(int use_avx2, float *s, long from, long to, float m) {
#ifdef PHF_X86
    if (use_avx2) return am_row_exp_avx2(s, from, to, m);
#endif
    (void)use_avx2;
    float sum = 0.0f;
    for (long j = from; j < to; j++) {
        const float e = expf(s[j] - m);
        s[j] = e;
        sum += e;
    }
    return sum;
}

static void am_gemm(int use_avx2, const float *A, long lda, const float *Bm, long ldb, float *C, long ldc, long M,
                    long N, long K, int accumulate) {
#ifdef PHF_X86
    if (use_avx2) {
        am_gemm_avx2(A, lda, Bm, ldb, C, ldc, M, N, K, accumulate);
        return;
    }
#endif
    (void)use_avx2;
    am_gemm_portable(A, lda, Bm, ldb, C, ldc, M, N, K, accumulate);
}

static void am_unit(const many_t *a, long u, float *qs, float *kt, float *sc, float *acc, float *mx, float *sum,
                    float *krow, float *vblock) {
    const long D = a->D, DV = a->DV, G = a->G, BP = a->B * a->P;
    const long qbi = a->nqb - 1 - u / BP, b = (u % BP) / a->P, h = u % a->P;
    const long p0 = qbi * a->qb, np = a->L - p0 < a->qb ? a->L - p0 : a->qb;
    const long rp = G * np, rows = 2 * rp;
    const int64_t *lo = a->lo + b * a->r_bs + p0, *hi = a->hi + b * a->r_bs + p0;
    long klo = a->T, khi = 0;
    for (long i = 0; i < np; i++) {
        const long l0 = lo[i] < 0 ? 0 : lo[i], h0 = hi[i] > a->T ? a->T : hi[i];
        if (l0 >= h0) continue;
        if (l0 < klo) klo = l0;
        if (h0 > khi) khi = h0;
    }
    /* the block's queries, scaled, rows (part, head of the stripe, position) */
    for (int part = 0; part < 2; part++)
        for (long gi = 0; gi < G; gi++)
            for (long i = 0; i < np; i++) {
                const float *src = a->q + b * a->q_bs + (2 * (h * G + gi) + part) * a->q_hs + (p0 + i) * a->q_ls;
                float *dst = qs + ((part * G + gi) * np + i) * D;
                for (long d = 0; d < D; d++) dst[d] = src[d] * a->scale;
            }
    for (long r = 0; r < rows; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(rows * DV));
    const long kh = b * a->k_bs + h * a->k_hs, vh = b * a->v_bs + h * a->v_hs;
    const int f16 = a->kvtype == PHF_SD_F16;
    for (long t0 = klo; t0 < khi; t0 += AM_KB) {
        const long kb = khi - t0 < AM_KB ? khi - t0 : AM_KB, kbp = (kb + 15) / 16 * 16;
        for (int part = 0; part < 2; part++) {
            for (long j = 0; j < kb; j++) {                       /* key block, transposed */
                const long at = kh + (t0 + j) * a->k_ts + part * D;
                const float *kr = (const float *)a->k + at;
                if (f16) {
                    am_widen(a, krow, (const uint16_t *)a->k + at, D);
                    kr = krow;
                }
                for (long d = 0; d < D; d++) kt[d * kbp + j] = kr[d];
            }
            for (long d = 0; d < D; d++)
                for (long j = kb; j < kbp; j++) kt[d * kbp + j] = 0.0f;
            am_gemm(a->use_avx2, qs + part * rp * D, D, kt, kbp, sc + part * rp * kbp, kbp, rp, kbp, D, 0);
        }
        for (long r = 0; r < rows; r++) {                          /* online softmax over the block */
            const long i = r % np;
            float *s = sc + r * kbp;
            long from = lo[i] - t0, to = hi[i] - t0;
            if (from < 0) from = 0;
            if (to > kb) to = kb;
            if (from >= to) {
                for (long j = 0; j < kb; j++) s[j] = 0.0f;
                continue;
            }
            float m = am_row_max(a->use_avx2, s, from, to);
            if (m > mx[r]) {
                const float c = expf(mx[r] - m);                   /* 0 on the row's first block */
                float *o = acc + r * DV;
                for (long d = 0; d < DV; d++) o[d] *= c;
                sum[r] *= c;
                mx[r] = m;
            }
            for (long j = 0; j < from; j++) s[j] = 0.0f;
            for (long j = to; j < kb; j++) s[j] = 0.0f;
            sum[r] += am_row_exp(a->use_avx2, s, from, to, mx[r]);
        }
        if (f16) {                                                  /* the block's values, widened */
            for (long j = 0; j < kb; j++)
                am_widen(a, vblock + j * DV, (const uint16_t *)a->v + vh + (t0 + j) * a->v_ts, DV);
            am_gemm(a->use_avx2, sc, kbp, vblock, DV, acc, DV, rows, DV, kb, 1);
        } else {
            am_gemm(a->use_avx2, sc, kbp, (const float *)a->v + vh + t0 * a->v_ts, a->v_ts, acc, DV, rows, DV, kb, 1);
        }
    }
    const long plane = a->B * a->P * G * a->L * DV;
    for (int part = 0; part < 2; part++)
        for (long gi = 0; gi < G; gi++)
            for (long i = 0; i < np; i++) {
                const long r = (part * G + gi) * np + i;
                const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
                float *dst = a->out + part * plane + ((b * a->P + h) * G + gi) * a->L * DV + (p0 + i) * DV;
                const float *o = acc + r * DV;
                for (long d = 0; d < DV; d++) dst[d] = o[d] * inv;
            }
}

static void am_share(void *arg, int share) {
    many_t *a = (many_t *)arg;
    (void)share;
    const long rows = 2 * a->G * a->qb, units = a->B * a->P * a->nqb;
    const long kbp = (AM_KB + 15) / 16 * 16;
    const long extra = a->kvtype == PHF_SD_F16 ? a->D + AM_KB * a->DV : 0; /* widened key row, value block */
    float *buf = (float *)malloc(sizeof(float) *
                                 (size_t)(rows * a->D + a->D * kbp + rows * kbp + rows * a->DV + 2 * rows + extra));
    if (!buf) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELEASE);
        return;
    }
    float *qs = buf, *kt = qs + rows * a->D, *sc = kt + a->D * kbp, *acc = sc + rows * kbp, *mx = acc + rows * a->DV;
    float *sum = mx + rows, *krow = sum + rows, *vblock = krow + a->D;
    for (long u; (u = next_chunk(&a->next)) < units;) am_unit(a, u, qs, kt, sc, acc, mx, sum, krow, vblock);
    free(buf);
}

/*
 * See the block comment at the top of this file. Strides are in elements (k and v: float32 or float16
 * as kvtype, PHF_SD_F32 / PHF_SD_F16, says; q: float32); lo and hi hold L entries
 * per sequence (r_bs = L) or one set for all (r_bs = 0). qb: positions per unit, 0 for the default
 * (about AM_ROWS rows of both stripes). Returns 0, or -1 for bad sizes or when scratch memory could
 * not be had (the output is then incomplete).
 */
PHF_EXPORT int phf_attend_many(const float *q, long q_bs, long q_hs, long q_ls, const void *k, long k_bs,
                               long k_hs, long k_ts, const void *v, long v_bs, long v_hs, long v_ts,
                               const int64_t *lo, const int64_t *hi, long r_bs, float *out, long B, long P,
                               long G, long L, long D, long DV, long T, float scale, long qb, int threads,
                               int simd, int kvtype) {
    if (B <= 0 || P <= 0 || G <= 0 || L <= 0 || D <= 0 || DV <= 0 || T < 0 || qb < 0) return -1;
    if (kvtype != PHF_SD_F32 && kvtype != PHF_SD_F16) return -1;
    if (qb == 0) qb = AM_ROWS / (2 * G) > 0 ? AM_ROWS / (2 * G) : 1;
    if (qb > L) qb = L;
    many_t a = {q, q_bs, q_hs, q_ls, k, k_bs, k_hs, k_ts, v, v_bs, v_hs, v_ts, lo, hi, r_bs, out,
                B, P, G, L, D, DV, T, qb, (L + qb - 1) / qb, scale, simd && phf_simd(), kvtype,
                simd && phf_f16c(), 0, 0};
    const long units = B * P * a.nqb;
    if (threads < 1 || (double)L * T * P * G * D < 65536.0) threads = 1; /* tiny: not worth waking */
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = (int)units;
    run_shares(am_share, &a, threads);
    return a.failed ? -1 : 0;
}
