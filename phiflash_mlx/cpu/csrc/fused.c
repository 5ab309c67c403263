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
