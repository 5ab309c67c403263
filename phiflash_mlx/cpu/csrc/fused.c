/* Fused decode steps: several operations of one layer in one call.
 *
 * A decode step reached through MLX pays, per kernel, a graph evaluation, NumPy conversions and a copy
 * back, and between kernels MLX runs its small element-wise ops on one thread. The functions here do
 * the whole of a layer's one-token step on the host in one call: the quantized products through
 * `phf_qmatvec` (whatever path it takes), everything between them spread over the thread pool.
 *
 * Quantized weights are described by `phf_qweight` (MLX's affine layout, see the top of
 * cpu_kernels.c); a product is y[n] = x[k] @ W^T. All arrays are contiguous float32, batch 1, except a
 * weight's scales and biases, which are float32, float16 or bfloat16 as `sdtype` says (PHF_SD_*). */

typedef struct {
    const uint32_t *w;
    const void *scales, *biases;
    long n, k;
    int bits, group_size;
    int sdtype; /* PHF_SD_F32 (0), PHF_SD_F16 (1), PHF_SD_BF16 (2) */
} phf_qweight;

/* simd 0 forces the portable loops in this file and in the products (tests); 1 uses AVX2 where the CPU has it */
static int fused_simd = 1;

static int qw_product(const phf_qweight *q, const float *x, float *y, int threads) {
    return phf_qmatvec_sd(x, 1, q->k, q->w, q->scales, q->biases, q->sdtype, q->n, q->bits, q->group_size, y, threads,
                          fused_simd);
}

/* Sets the SIMD switch of the fused steps (1 = AVX2 where available, 0 = portable C); returns the old one. */
PHF_EXPORT int phf_fused_simd(int simd) {
    int old = fused_simd;
    fused_simd = simd ? 1 : 0;
    return old;
}

static inline float silu1(float x) { return x / (1.0f + expf(-x)); }

#ifdef PHF_X86
__attribute__((target("avx2,fma"))) static void silu_mul_avx2(float *out, const float *g, const float *v, long n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(v + i)));
    }
    for (; i < n; i++) out[i] = silu1(g[i]) * v[i];
}
#endif

/* out[i] = SiLU(g[i]) * v[i] over n values (out may equal g): the gates of the MLP and the GMU, 8
 * lanes at a time where the CPU allows (one expf per value cost ~1.5 ms of a 1K decode step) */
static void silu_mul(float *out, const float *g, const float *v, long n) {
#ifdef PHF_X86
    if (fused_simd && phf_simd()) {
        silu_mul_avx2(out, g, v, n);
        return;
    }
#endif
    for (long i = 0; i < n; i++) out[i] = silu1(g[i]) * v[i];
}

/* out[r][i] = SiLU(g[r][i]) * v[r][i] over m rows of n values (row strides o_ld, g_ld, v_ld; out may
 * equal g or v), rows spread over the pool: the gates of a prompt block's MLP (m x 10240 values per
 * layer at the released widths) and GMU, which MLX's CPU back-end computes on one thread. */
typedef struct {
    float *out;
    const float *g, *v;
    long o_ld, g_ld, v_ld, m, n, rows;
    long next;
} silu_rows_t;

static void silu_rows_share(void *arg, int share) {
    silu_rows_t *a = (silu_rows_t *)arg;
    (void)share;
    const long chunks = (a->m + a->rows - 1) / a->rows;
    for (long c; (c = next_chunk(&a->next)) < chunks;)
        for (long r = c * a->rows; r < a->m && r < (c + 1) * a->rows; r++)
            silu_mul(a->out + r * a->o_ld, a->g + r * a->g_ld, a->v + r * a->v_ld, a->n);
}

PHF_EXPORT int phf_silu_mul_rows(float *out, long o_ld, const float *g, long g_ld, const float *v, long v_ld, long m,
                                 long n, int threads) {
    if (m < 0 || n < 0 || o_ld < n || g_ld < n || v_ld < n) return -1;
    if (m == 0 || n == 0) return 0;
    silu_rows_t a = {out, g, v, o_ld, g_ld, v_ld, m, n, 1, 0};
    a.rows = (1L << 14) / n > 1 ? (1L << 14) / n : 1; /* ~64 KB of gate values per chunk */
    const long chunks = (m + a.rows - 1) / a.rows;
    if (threads < 1 || m * n < (1L << 15)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > chunks) threads = (int)chunks;
    run_shares(silu_rows_share, &a, threads);
    return 0;
}

/* ---- the Mamba mixer, one token ------------------------------------------------------------- */

typedef struct {
    const float *xz;                 /* in_proj's output: x (Di) | z (Di) */
    const float *conv_w, *conv_b;    /* (Di, K), (Di) or NULL */
    const float *conv_state;         /* (K-1, Di) */
    float *conv_out;                 /* (K-1, Di) */
    float *u;                        /* (Di): SiLU(conv) */
    const float *dbc;                /* x_proj's output: dt (R) | B (N) | C (N) */
    const float *dt_w, *dt_b;        /* (Di, R), (Di) or NULL */
    const float *A, *D;              /* (Di, N) = -exp(A_log), (Di) */
    const float *ssm_state;          /* (Di, N) */
    float *ssm_out;                  /* (Di, N) */
    float *y;                        /* (Di): the gated output (out_proj's input) */
    float *memory;                   /* (Di): the ungated output, or NULL */
    long Di, K, R, N, chunk, chunks;
    int phase, use_avx2;
    long next;
} mamba_t;

static void mamba_share(void *arg, int share) {
    mamba_t *a = (mamba_t *)arg;
    const long Di = a->Di, K = a->K, keep = K - 1, N = a->N, R = a->R;
    (void)share;
    for (long c; (c = next_chunk(&a->next)) < a->chunks;) {
        const long d0 = c * a->chunk, d1 = d0 + a->chunk < Di ? d0 + a->chunk : Di;
        if (a->phase == 0) {                      /* conv window shift, depthwise conv, SiLU */
            for (long d = d0; d < d1; d++) {
                const float *w = a->conv_w + d * K;
                const float xd = a->xz[d];
                float acc = a->conv_b ? a->conv_b[d] : 0.0f;
                for (long k = 0; k < keep; k++) acc += a->conv_state[k * Di + d] * w[k];
                acc += xd * w[keep];
                a->u[d] = silu1(acc);
            }
            for (long k = 0; k + 1 < keep; k++)
                memcpy(a->conv_out + k * Di + d0, a->conv_state + (k + 1) * Di + d0, sizeof(float) * (size_t)(d1 - d0));
            if (keep > 0) memcpy(a->conv_out + (keep - 1) * Di + d0, a->xz + d0, sizeof(float) * (size_t)(d1 - d0));
            continue;
        }
        const float *dt = a->dbc, *Bv = dt + R, *Cv = Bv + N;   /* dt_proj, softplus, scan, D, gate */
        for (long d = d0; d < d1; d++) {
            const float *w = a->dt_w + d * R;
            float acc;
#ifdef PHF_X86
            acc = a->use_avx2 ? dot_avx2(w, dt, R) : dot_portable(w, dt, R);
#else
            acc = dot_portable(w, dt, R);
#endif
            if (a->dt_b) acc += a->dt_b[d];
            const float delta = softplus20(acc), ud = a->u[d], du = delta * ud;
            float *s = a->ssm_out + d * N;
            memcpy(s, a->ssm_state + d * N, sizeof(float) * (size_t)N);
            float yd;
#ifdef PHF_X86
            if (a->use_avx2 && N % 8 == 0)
                yd = ssm_lanes_avx2(s, a->A + d * N, Bv, Cv, delta, du, N);
            else
#endif
                yd = ssm_lanes_portable(s, a->A + d * N, Bv, Cv, delta, du, N);
            yd += a->D[d] * ud;
            const float z = a->xz[Di + d];
            if (a->memory) a->memory[d] = yd;
            a->y[d] = yd * z * (1.0f / (1.0f + expf(-z)));
        }
    }
}

/*
 * One token of the Mamba mixer (SAMBAY.md 4.5; with `memory` non-NULL the layer-h variant of 4.6):
 *
 *   x | z = in_proj(a);  window = [conv_state | x];  u = SiLU(depthwise conv(window) + conv_b)
 *   dt | B | C = x_proj(u);  delta = softplus(dt_w . dt + dt_b)
 *   s = exp(delta * A) * s + delta * u * B;  y = s . C + D * u
 *   out = out_proj(y * SiLU(z))                       (memory = y where asked)
 *
 * a (H); conv_w (Di, K); conv_b (Di) or NULL; dt_w (Di, R); dt_b (Di) or NULL; A (Di, N) = -exp(A_log);
 * D (Di); conv_state / conv_out (K-1, Di) (the last K-1 convolution inputs, oldest first);
 * ssm_state / ssm_out (Di, N); out (H); memory (Di) or NULL. The outputs may not alias the inputs.
 * Returns 0, or -1 for inconsistent shapes or no memory (nothing meaningful written).
 */
PHF_EXPORT int phf_mamba_step(const float *a, const phf_qweight *in_proj, const phf_qweight *x_proj,
                              const phf_qweight *out_proj, const float *conv_w, const float *conv_b,
                              const float *dt_w, const float *dt_b, const float *A, const float *D,
                              const float *conv_state, const float *ssm_state, float *conv_out, float *ssm_out,
                              float *out, float *memory, long H, long Di, long K, long R, long N, int threads) {
    if (H <= 0 || Di <= 0 || K < 1 || R <= 0 || N <= 0) return -1;
    if (in_proj->k != H || in_proj->n != 2 * Di || x_proj->k != Di || x_proj->n != R + 2 * N ||
        out_proj->k != Di || out_proj->n != H)
        return -1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * Di + Di + (R + 2 * N) + Di));
    if (!buf) return -1;
    float *xz = buf, *u = xz + 2 * Di, *dbc = u + Di, *y = dbc + R + 2 * N;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int rc = qw_product(in_proj, a, xz, threads);
    mamba_t m = {xz, conv_w, conv_b, conv_state, conv_out, u, dbc, dt_w, dt_b, A, D, ssm_state, ssm_out, y, memory,
                 Di, K, R, N, 0, 0, 0, fused_simd && phf_simd(), 0};
    m.chunk = 256;
    m.chunks = (Di + m.chunk - 1) / m.chunk;
    /* the scan phase reads dt_w (Di x R floats) and updates Di x N states: worth a second thread at
     * the released model's widths (5120 x (160 + 16)), not at small ones; the conv phase never is */
    const int shares = Di * (R + N) < (1L << 16) ? 1 : (threads < m.chunks ? threads : (int)m.chunks);
    if (rc == 0) {
        mamba_share(&m, 0);
        rc = qw_product(x_proj, u, dbc, threads);
    }
    if (rc == 0) {
        m.phase = 1;
        m.next = 0;
        run_shares(mamba_share, &m, shares);
        rc = qw_product(out_proj, y, out, threads);
    }
    free(buf);
    return rc;
}

/* ---- LayerNorm, and the decoder layer's second half ------------------------------------------ */

/* out = (x - mean) / sqrt(var + eps) * w + b over n values (w, b may be NULL); out may equal x. */
PHF_EXPORT void phf_layernorm(const float *x, const float *w, const float *b, float eps, float *out, long n) {
    double sum = 0.0, sq = 0.0;
    for (long i = 0; i < n; i++) sum += x[i];
    const float mean = (float)(sum / (double)n);
    for (long i = 0; i < n; i++) {
        const float d = x[i] - mean;
        sq += (double)d * d;
    }
    const float inv = 1.0f / sqrtf((float)(sq / (double)n) + eps);
    for (long i = 0; i < n; i++) {
        float v = (x[i] - mean) * inv;
        if (w) v *= w[i];
        if (b) v += b[i];
        out[i] = v;
    }
}

/*
 * h += fc2(SiLU(g) * v) with g | v = fc1(LayerNorm(h)) (SAMBAY.md 4.2, 4.4): the second half of a
 * decoder layer for one token. h (H) is updated in place. Returns 0, or -1 for inconsistent shapes or
 * no memory (h unchanged).
 */
PHF_EXPORT int phf_mlp_residual(float *h, const float *ln_w, const float *ln_b, float eps, const phf_qweight *fc1,
                                const phf_qweight *fc2, long H, int threads) {
    const long I = fc2->k;
    if (fc1->k != H || fc1->n != 2 * I || fc2->n != H) return -1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(H + 2 * I + H));
    if (!buf) return -1;
    float *a = buf, *gv = a + H, *y = gv + 2 * I;
    phf_layernorm(h, ln_w, ln_b, eps, a, H);
    int rc = qw_product(fc1, a, gv, threads);
    if (rc == 0) {
        silu_mul(gv, gv, gv + I, I);
        rc = qw_product(fc2, gv, y, threads);
    }
    if (rc == 0)
        for (long i = 0; i < H; i++) h[i] += y[i];
    free(buf);
    return rc;
}

/*
 * A Gated Memory Unit layer's first half for one token (SAMBAY.md 4.7):
 * h += out_proj(SiLU(in_proj(LayerNorm(h))) * memory). h (H) in place; memory (Di).
 */
PHF_EXPORT int phf_gmu_residual(float *h, const float *ln_w, const float *ln_b, float eps, const phf_qweight *in_proj,
                                const phf_qweight *out_proj, const float *memory, long H, int threads) {
    const long Di = in_proj->n;
    if (in_proj->k != H || out_proj->k != Di || out_proj->n != H) return -1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(H + Di + H));
    if (!buf) return -1;
    float *a = buf, *g = a + H, *y = g + Di;
    phf_layernorm(h, ln_w, ln_b, eps, a, H);
    int rc = qw_product(in_proj, a, g, threads);
    if (rc == 0) {
        silu_mul(g, g, memory, Di);
        rc = qw_product(out_proj, g, y, threads);
    }
    if (rc == 0)
        for (long i = 0; i < H; i++) h[i] += y[i];
    free(buf);
    return rc;
}

/* ---- attention of one query over a cache and the row a step is adding to it ------------------ *
 *
 * The differential-attention pair layout of phf_attend (cpu_kernels.c), batch 1 and one query, but
 * the T rows attended are named by `rows`: row t is the cache's row rows[t] (k + h * k_hs + rows[t] *
 * k_ts, likewise v), or, where rows[t] < 0, the new row of this step (k_new + h * 2D, v_new + h * DV,
 * the pair layout of one position). So a decode step can attend over its cache as it will be after
 * the update without the update having been written yet.
 *
 *   out[h][part * R + r] = softmax_t(q[part][h][r] . key(t, h, part)) @ value(t, h)
 *
 * q: [2][P][R][D] (already scaled); out: [P][2R][DV]. k, v and the new row are float32 or float16
 * (kvtype, as in phf_attend; the new row holds the values the cache will store). */

typedef struct {
    const float *q;
    const void *k, *v;
    const void *k_new, *v_new;
    const int *rows;
    long k_hs, k_ts, v_hs, v_ts;
    float *out;
    long P, R, D, DV, T;
    int use_avx2, kvtype, failed;
    long next;
} attend_rows_t;

static void attend_rows_share(void *arg, int share) {
    attend_rows_t *a = (attend_rows_t *)arg;
    const long R2 = 2 * a->R;
    (void)share;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(R2 * a->T));
    if (!scores) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELEASE);
        return;
    }
    kv_dot_fn dot;
    kv_axpy_fn axpy;
    kv_kernels(a->kvtype, a->use_avx2, &dot, &axpy);
    const int blocked = pair_attend_ok(a->use_avx2, a->D, a->DV);
    for (long h; (h = next_chunk(&a->next)) < a->P;) {
        if (blocked) {
            pair_t p = {a->q + h * a->R * a->D, a->q + (a->P + h) * a->R * a->D, phf_sd_at(a->k, h * a->k_hs, a->kvtype),
                        phf_sd_at(a->v, h * a->v_hs, a->kvtype), a->k_ts, a->v_ts, a->rows,
                        phf_sd_at(a->k_new, h * 2 * a->D, a->kvtype), phf_sd_at(a->v_new, h * a->DV, a->kvtype), NULL, 0,
                        1, a->R, a->D, a->DV, a->T, a->kvtype == PHF_SD_F16};
            pair_attend(&p, scores, a->out + h * R2 * a->DV);
            continue;
        }
        for (long t = 0; t < a->T; t++) {
            const long row = a->rows[t];
            for (int part = 0; part < 2; part++) {
                const float *qh = a->q + (part * a->P + h) * a->R * a->D;
                const void *kt = row >= 0 ? phf_sd_at(a->k, h * a->k_hs + row * a->k_ts + part * a->D, a->kvtype)
                                          : phf_sd_at(a->k_new, h * 2 * a->D + part * a->D, a->kvtype);
                for (long r = 0; r < a->R; r++) scores[(part * a->R + r) * a->T + t] = dot(qh + r * a->D, kt, a->D);
            }
        }
        float *o = a->out + h * R2 * a->DV;
        for (long i = 0; i < R2; i++) {
            softmax_row(scores + i * a->T, a->T);
            memset(o + i * a->DV, 0, sizeof(float) * (size_t)a->DV);
        }
        for (long t = 0; t < a->T; t++) {
            const long row = a->rows[t];
            const void *vt = row >= 0 ? phf_sd_at(a->v, h * a->v_hs + row * a->v_ts, a->kvtype)
                                      : phf_sd_at(a->v_new, h * a->DV, a->kvtype);
            for (long i = 0; i < R2; i++) axpy(o + i * a->DV, scores[i * a->T + t], vt, a->DV);
        }
    }
    free(scores);
}

/* Strides in elements of k and v. Returns 0, or -1 for a bad shape or dtype code or no memory (the
 * output is then incomplete). */
PHF_EXPORT int phf_attend_rows(const float *q, const void *k, long k_hs, long k_ts, const void *v, long v_hs,
                               long v_ts, const int *rows, const void *k_new, const void *v_new, float *out,
                               long P, long R, long D, long DV, long T, int threads, int kvtype) {
    if (P <= 0 || R <= 0 || D <= 0 || DV <= 0 || T <= 0) return -1;
    if (kvtype != PHF_SD_F32 && kvtype != PHF_SD_F16) return -1;
    if (fused_simd) { /* attn_decode.c's 512-bit kernel where it applies; it takes the new row as float32 */
        if (kvtype == PHF_SD_F32) {
            if (attend_decode(q, k, k_hs, k_ts, v, v_hs, v_ts, rows, (const float *)k_new, (const float *)v_new, out,
                              P, R, D, DV, T, threads, 0) == 0)
                return 0;
        } else {
            const long nk = P * 2 * D, nv = P * DV;
            float *fresh = (float *)malloc(sizeof(float) * (size_t)(nk + nv));
            if (fresh) {
                for (long i = 0; i < nk; i++) fresh[i] = phf_f16_to_float(((const uint16_t *)k_new)[i]);
                for (long i = 0; i < nv; i++) fresh[nk + i] = phf_f16_to_float(((const uint16_t *)v_new)[i]);
                const int rc = attend_decode(q, k, k_hs, k_ts, v, v_hs, v_ts, rows, fresh, fresh + nk, out, P, R, D,
                                             DV, T, threads, 1);
                free(fresh);
                if (rc == 0) return 0;
            }
        }
    }
    attend_rows_t a = {q, k, v, k_new, v_new, rows, k_hs, k_ts, v_hs, v_ts, out, P, R, D, DV, T,
                       fused_simd && phf_simd(), kvtype, 0, 0};
    if (threads < 1 || T * P * D < (1L << 14)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > P) threads = (int)P;
    run_shares(attend_rows_share, &a, threads);
    return a.failed ? -1 : 0;
}

/* ---- every decoder layer of a one-token step in one call ------------------------------------ *
 *
 * The functions above each do a piece of one layer; a step that calls them one by one from Python
 * spends ~10-15 ms of a ~100 ms step (4-bit, 1K context, 2 threads) between them, on one thread while
 * the pool waits. phf_decode_layers runs the whole stack: each phf_layer describes one decoder layer
 * (its weights, made once per model) and this step's state (cache pointers, filled per step). */

#define PHF_LAYER_MAMBA 0 /* Mamba mixer (SAMBAY.md 4.5 / 4.6) */
#define PHF_LAYER_GMU 1   /* Gated Memory Unit (4.7), gating the last memory a Mamba layer made */
#define PHF_LAYER_ATTN 2  /* differential attention over its own cache (sliding window or full) */
#define PHF_LAYER_CROSS 3 /* differential attention over the last PHF_LAYER_ATTN layer's cache */

#define PHF_LAYER_MEMORY 1   /* flag: the Mamba layer produces the memory the GMUs gate */
#define PHF_LAYER_SHARES 2   /* flag: an attention layer whose cache the cross layers read (full attention) */
#define PHF_LAYER_STORE16 4  /* flag: the attention layer's cache stores new rows as float16 */

typedef struct {
    int kind, flags;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* the two LayerNorms (weights or NULL) */
    float ln1_eps, ln2_eps;
    const phf_qweight *fc1, *fc2;               /* the MLP */
    /* Mamba: in_proj, x_proj, out_proj; GMU: in_proj, out_proj; attention: Wqkv (in_proj), out_proj */
    const phf_qweight *in_proj, *x_proj, *out_proj;
    const float *in_bias, *out_bias;            /* attention: Wqkv's and out_proj's biases or NULL */
    const float *conv_w, *conv_b, *dt_w, *dt_b, *A, *D; /* Mamba, as phf_mamba_step takes them */
    long Di, K, R, N;
    long nh, nkv, hd;                           /* attention: query heads, K/V heads (own cache), head dim */
    float scale, lambda, out_scale, subln_eps;  /* 1/sqrt(hd), the layer's lambda, 1 - lambda_init */
    const float *subln_w;                       /* (2 hd) or NULL */
    /* this step: Mamba states in (K-1, Di), (Di, N) and out; the attention cache (pair layout of
     * phf_attend_rows, kvtype float32 / float16), its rows after the update, and where the new row goes
     * (P x 2hd each, float16 with PHF_LAYER_STORE16, else float32) */
    const float *conv_state, *ssm_state;
    float *conv_out, *ssm_out;
    const void *k, *v;
    long k_hs, k_ts, v_hs, v_ts, T;
    const int *rows;
    int kvtype, pad;
    void *k_out, *v_out;
} phf_layer;

/* IEEE binary16 of a float32, rounded to nearest even as a float16 cast does (NaN stays NaN). */
static inline uint16_t phf_float_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u); /* NaN, inf */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;          /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                /* below 2^-14: subnormal or zero */
        if (ax < 0x33000000u) return sign;                 /* below half the smallest subnormal */
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(ax >> 23);           /* 14..24 */
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return sign | (uint16_t)r;
    }
    uint32_t r = ((ax - 0x38000000u) >> 13);               /* rebias 127 -> 15, drop 13 bits */
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return sign | (uint16_t)r;
}

/* out[i] = the float16 bits of x[i] (the rounding phf_decode_layers gives a 16-bit cache's new rows; tests) */
PHF_EXPORT void phf_f16_round(const float *x, uint16_t *out, long n) {
    for (long i = 0; i < n; i++) out[i] = phf_float_to_f16(x[i]);
}

/* The attention of one PHF_LAYER_ATTN / PHF_LAYER_CROSS layer for one token, its residual add into h,
 * and the MLP half. `own` is the layer whose cache is read (L itself, or the sharing layer for a cross
 * layer), `fresh_k` / `fresh_v` that layer's new row as the attention reads it (set here for an own
 * cache). */
static int attention_layer(float *h, const phf_layer *L, const phf_layer *own, const void **fresh_k,
                           const void **fresh_v, float *scratch_f32, long H, int threads) {
    const long nh = L->nh, hd = L->hd, hs = nh / 2;
    const long P = own->nkv / 2, dv = 2 * hd;
    if (P <= 0 || hs % P != 0 || L->hd != own->hd || L->in_proj->k != H || L->out_proj->k != nh * hd ||
        L->out_proj->n != H)
        return -1;
    const long r = hs / P, rows_qkv = L->in_proj->n;
    if (rows_qkv < nh * hd || (L == own && rows_qkv != (nh + 2 * own->nkv) * hd)) return -1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(H + rows_qkv + nh * hd + P * 2 * r * dv + nh * hd + H));
    if (!buf) return -1;
    float *a = buf, *qkv = a + H, *qa = qkv + rows_qkv, *o = qa + nh * hd, *d = o + P * 2 * r * dv, *y = d + nh * hd;
    phf_layernorm(h, L->ln1_w, L->ln1_b, L->ln1_eps, a, H);
    int rc = qw_product(L->in_proj, a, qkv, threads);
    if (rc == 0 && L->in_bias)
        for (long i = 0; i < rows_qkv; i++) qkv[i] += L->in_bias[i];
    if (rc == 0) {
        /* queries of both stripes, scaled: qa[part][head pair j] = q[2j + part] * scale */
        for (long j = 0; j < hs; j++)
            for (int part = 0; part < 2; part++) {
                const float *src = qkv + (2 * j + part) * hd;
                float *dst = qa + (part * hs + j) * hd;
                for (long e = 0; e < hd; e++) dst[e] = src[e] * L->scale;
            }
        if (L == own) { /* the new K / V row (pair layout), as the cache will hold it */
            const long n = P * 2 * hd;
            const float *kn = qkv + nh * hd, *vn = kn + n;
            if (L->flags & PHF_LAYER_STORE16) {
                uint16_t *ko = (uint16_t *)L->k_out, *vo = (uint16_t *)L->v_out;
                for (long i = 0; i < n; i++) ko[i] = phf_float_to_f16(kn[i]);
                for (long i = 0; i < n; i++) vo[i] = phf_float_to_f16(vn[i]);
                if (L->kvtype == PHF_SD_F16) {
                    *fresh_k = ko;
                    *fresh_v = vo;
                } else { /* a float32 cache given float16-rounded rows */
                    for (long i = 0; i < n; i++) scratch_f32[i] = phf_f16_to_float(ko[i]);
                    for (long i = 0; i < n; i++) scratch_f32[n + i] = phf_f16_to_float(vo[i]);
                    *fresh_k = scratch_f32;
                    *fresh_v = scratch_f32 + n;
                }
            } else {
                if (L->kvtype != PHF_SD_F32) rc = -1; /* float32 rows into a 16-bit cache: not decided here */
                memcpy(L->k_out, kn, sizeof(float) * (size_t)n);
                memcpy(L->v_out, vn, sizeof(float) * (size_t)n);
                *fresh_k = L->k_out;
                *fresh_v = L->v_out;
            }
        }
    }
    if (rc == 0)
        rc = phf_attend_rows(qa, own->k, own->k_hs, own->k_ts, own->v, own->v_hs, own->v_ts, own->rows, *fresh_k,
                             *fresh_v, o, P, r, hd, dv, own->T, threads, own->kvtype);
    if (rc == 0) {
        /* differential combination, sub-LN (RMSNorm over each head pair's 2hd values), (1 - lambda_init) */
        for (long p = 0; p < P; p++)
            for (long i = 0; i < r; i++) {
                const float *o1 = o + (p * 2 * r + i) * dv, *o2 = o + (p * 2 * r + r + i) * dv;
                float *dj = d + (p * r + i) * dv;
                double sq = 0.0;
                for (long e = 0; e < dv; e++) {
                    dj[e] = o1[e] - L->lambda * o2[e];
                    sq += (double)dj[e] * dj[e];
                }
                const float inv = 1.0f / sqrtf((float)(sq / (double)dv) + L->subln_eps);
                for (long e = 0; e < dv; e++) {
                    float x = dj[e] * inv;
                    if (L->subln_w) x *= L->subln_w[e];
                    dj[e] = x * L->out_scale;
                }
            }
        rc = qw_product(L->out_proj, d, y, threads);
    }
    if (rc == 0)
        for (long i = 0; i < H; i++) h[i] += y[i] + (L->out_bias ? L->out_bias[i] : 0.0f);
    free(buf);
    if (rc == 0) rc = phf_mlp_residual(h, L->ln2_w, L->ln2_b, L->ln2_eps, L->fc1, L->fc2, H, threads);
    return rc;
}

/*
 * h (H) through layers[0 .. n) for one token, in place. Mamba layers write their new states to
 * conv_out / ssm_out, attention layers with a cache of their own their new K/V row to k_out / v_out;
 * nothing else is written. Returns 0, or -(1 + i) where layer i refused (bad shapes, a cross layer
 * before any sharing layer, a GMU before any memory, no memory): h is then partly updated and the
 * outputs incomplete.
 */
PHF_EXPORT int phf_decode_layers(float *h, const phf_layer *layers, long n, long H, int threads) {
    const phf_layer *shared = NULL;
    const void *shared_k = NULL, *shared_v = NULL;
    float *memory = NULL, *ln = NULL, *fresh = NULL, *kept = NULL;
    long mem_n = 0, fresh_n = 0, memory_n = 0;
    int rc = 0;
    long i;
    for (i = 0; i < n; i++) { /* scratch: the largest memory and new-row sizes */
        const phf_layer *L = layers + i;
        if (L->kind == PHF_LAYER_MAMBA && L->Di > mem_n) mem_n = L->Di;
        if (L->kind == PHF_LAYER_ATTN && L->nkv * L->hd > fresh_n) fresh_n = L->nkv * L->hd;
    }
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(mem_n + H + 2 * fresh_n + 1));
    if (!scratch) return -1;
    ln = scratch + mem_n;
    fresh = ln + H;
    for (i = 0; i < n && rc == 0; i++) {
        const phf_layer *L = layers + i;
        switch (L->kind) {
        case PHF_LAYER_MAMBA: {
            float *mem = (L->flags & PHF_LAYER_MEMORY) ? scratch : NULL;
            float *out = (float *)malloc(sizeof(float) * (size_t)H);
            if (!out) {
                rc = -1;
                break;
            }
            phf_layernorm(h, L->ln1_w, L->ln1_b, L->ln1_eps, ln, H);
            rc = phf_mamba_step(ln, L->in_proj, L->x_proj, L->out_proj, L->conv_w, L->conv_b, L->dt_w, L->dt_b, L->A,
                                L->D, L->conv_state, L->ssm_state, L->conv_out, L->ssm_out, out, mem, H, L->Di, L->K,
                                L->R, L->N, threads);
            if (rc == 0) {
                for (long e = 0; e < H; e++) h[e] += out[e];
                if (mem) {
                    memory = mem;
                    memory_n = L->Di;
                }
                rc = phf_mlp_residual(h, L->ln2_w, L->ln2_b, L->ln2_eps, L->fc1, L->fc2, H, threads);
            }
            free(out);
            break;
        }
        case PHF_LAYER_GMU:
            if (!memory || L->in_proj->n != memory_n) {
                rc = -1;
                break;
            }
            rc = phf_gmu_residual(h, L->ln1_w, L->ln1_b, L->ln1_eps, L->in_proj, L->out_proj, memory, H, threads);
            if (rc == 0) rc = phf_mlp_residual(h, L->ln2_w, L->ln2_b, L->ln2_eps, L->fc1, L->fc2, H, threads);
            break;
        case PHF_LAYER_ATTN: {
            const void *fk = NULL, *fv = NULL;
            rc = attention_layer(h, L, L, &fk, &fv, fresh, H, threads);
            if (rc == 0 && (L->flags & PHF_LAYER_SHARES)) {
                shared = L;
                shared_k = fk;
                shared_v = fv;
                if (fk == (const void *)fresh) { /* keep the widened row: the next own-cache layer reuses `fresh` */
                    const long nrow = L->nkv * L->hd;
                    free(kept);
                    kept = (float *)malloc(sizeof(float) * (size_t)(2 * nrow));
                    if (!kept) {
                        rc = -1;
                        break;
                    }
                    memcpy(kept, fresh, sizeof(float) * (size_t)(2 * nrow));
                    shared_k = kept;
                    shared_v = kept + nrow;
                }
            }
            break;
        }
        case PHF_LAYER_CROSS:
            if (!shared) {
                rc = -1;
                break;
            }
            rc = attention_layer(h, L, shared, &shared_k, &shared_v, NULL, H, threads);
            break;
        default:
            rc = -1;
        }
    }
    free(kept);
    free(scratch);
    return rc == 0 ? 0 : (int)-i;
}
