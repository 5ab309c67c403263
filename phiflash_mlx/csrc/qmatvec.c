/*
 * Multi-threaded affine-quantized matrix-vector products for CPUs.
 *
 * y[m, n] = sum_k x[m, k] * (scales[n, g(k)] * q[n, k] + biases[n, g(k)])
 *
 * where q is MLX's affine layout (mx.quantize, mode "affine"): each row of the weight is packed
 * little-end-first into uint32 words, 32 / bits codes per word, code j of a word in bits
 * [bits * j, bits * (j + 1)); scales and biases hold one float per group of `group_size` codes.
 * Supported: bits 2, 4, 8 and group sizes that are multiples of 32 (MLX's 32, 64, 128).
 *
 * The sum splits per group: scale * (q . x_g) + bias * sum(x_g), so the inner loop multiplies raw
 * codes with x and the bias needs only the per-group sums of x, computed once per call.
 *
 * Used for the few-token products of decoding, where MLX's CPU quantized_matmul runs on one thread
 * and is compute-bound; the output rows are split over `threads` POSIX threads. An AVX2+FMA path is
 * chosen at run time on x86-64 CPUs that have it; every other CPU runs the portable C loop.
 * Loaded with ctypes (phiflash_mlx/cpu_quant.py); not a Python extension module.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PHF_X86 1
#endif

#define PHF_EXPORT __attribute__((visibility("default")))
#define MAX_ROWS 16 /* rows of x handled per pass over the weight */

typedef struct {
    const float *x;       /* [m, k] */
    const float *xsum;    /* [m, groups] */
    const uint32_t *w;    /* [n, k * bits / 32] */
    const float *scales;  /* [n, groups] */
    const float *biases;  /* [n, groups] */
    float *y;             /* [m, n] */
    long m, k, n0, n1, n;
    int bits, group_size, use_avx2;
} job_t;

/* ---- portable path ------------------------------------------------------------------------- */

static void rows_portable(const job_t *j) {
    const int per_word = 32 / j->bits;
    const uint32_t mask = (j->bits == 32) ? 0xffffffffu : ((1u << j->bits) - 1u);
    const long groups = j->k / j->group_size;
    const long words_per_row = j->k / per_word;
    const long words_per_group = j->group_size / per_word;
    for (long row = j->n0; row < j->n1; row++) {
        const uint32_t *wr = j->w + row * words_per_row;
        const float *sr = j->scales + row * groups;
        const float *br = j->biases + row * groups;
        for (long m = 0; m < j->m; m++) {
            const float *xm = j->x + m * j->k;
            const float *xs = j->xsum + m * groups;
            float total = 0.0f;
            for (long g = 0; g < groups; g++) {
                const uint32_t *wg = wr + g * words_per_group;
                const float *xg = xm + g * j->group_size;
                float dot = 0.0f;
                for (long i = 0; i < words_per_group; i++) {
                    uint32_t word = wg[i];
                    for (int c = 0; c < per_word; c++) {
                        dot += (float)((word >> (j->bits * c)) & mask) * xg[i * per_word + c];
                    }
                }
                total += sr[g] * dot + br[g] * xs[g];
            }
            j->y[m * j->n + row] = total;
        }
    }
}

/* ---- AVX2 + FMA path (4 and 8 bits) -------------------------------------------------------- */

#ifdef PHF_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) static void rows_avx2(const job_t *j) {
    const long groups = j->k / j->group_size;
    const long words_per_row = j->k * j->bits / 32;
    const __m256i shifts4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask4 = _mm256_set1_epi32(15);
    for (long m0 = 0; m0 < j->m; m0 += MAX_ROWS) {
        const long mm = (j->m - m0 < MAX_ROWS) ? j->m - m0 : MAX_ROWS;
        for (long row = j->n0; row < j->n1; row++) {
            const uint32_t *wr = j->w + row * words_per_row;
            const float *sr = j->scales + row * groups;
            const float *br = j->biases + row * groups;
            __m256 total[MAX_ROWS];
            float bias_part[MAX_ROWS];
            for (long m = 0; m < mm; m++) {
                total[m] = _mm256_setzero_ps();
                bias_part[m] = 0.0f;
            }
            for (long g = 0; g < groups; g++) {
                const long base = g * j->group_size;
                __m256 acc[MAX_ROWS];
                for (long m = 0; m < mm; m++) acc[m] = _mm256_setzero_ps();
                if (j->bits == 4) {
                    const uint32_t *wg = wr + base / 8;
                    for (long i = 0; i < j->group_size / 8; i++) {
                        __m256i q = _mm256_and_si256(
                            _mm256_srlv_epi32(_mm256_set1_epi32((int)wg[i]), shifts4), mask4);
                        __m256 qf = _mm256_cvtepi32_ps(q);
                        for (long m = 0; m < mm; m++) {
                            acc[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(j->x + (m0 + m) * j->k + base + i * 8),
                                                     acc[m]);
                        }
                    }
                } else { /* 8 bits: one code per byte */
                    const uint8_t *bg = (const uint8_t *)wr + base;
                    for (long i = 0; i < j->group_size / 8; i++) {
                        __m128i b = _mm_loadl_epi64((const __m128i *)(bg + i * 8));
                        __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                        for (long m = 0; m < mm; m++) {
                            acc[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(j->x + (m0 + m) * j->k + base + i * 8),
                                                     acc[m]);
                        }
                    }
                }
                const __m256 s = _mm256_set1_ps(sr[g]);
                for (long m = 0; m < mm; m++) {
                    total[m] = _mm256_fmadd_ps(acc[m], s, total[m]);
                    bias_part[m] += br[g] * j->xsum[(m0 + m) * groups + g];
                }
            }
            for (long m = 0; m < mm; m++) j->y[(m0 + m) * j->n + row] = hsum256(total[m]) + bias_part[m];
        }
    }
}
#endif

static void *run_job(void *arg) {
    const job_t *j = (const job_t *)arg;
#ifdef PHF_X86
    if (j->use_avx2) {
        rows_avx2(j);
        return NULL;
    }
#endif
    rows_portable(j);
    return NULL;
}

/* 1 if this CPU runs the AVX2+FMA path. */
PHF_EXPORT int phf_qmatvec_simd(void) {
#ifdef PHF_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/*
 * y[m, n] = x[m, k] @ dequantize(w, scales, biases)[n, k]^T. All arrays are contiguous float32 /
 * uint32. Returns 0, or -1 for an unsupported bits / group size / shape (nothing written).
 * simd: 1 to use the AVX2 path when the CPU has it, 0 to force the portable loop.
 */
PHF_EXPORT int phf_qmatvec(const float *x, long m, long k, const uint32_t *w, const float *scales,
                           const float *biases, long n, int bits, int group_size, float *y, int threads,
                           int simd) {
    if (!(bits == 2 || bits == 4 || bits == 8) || group_size <= 0 || m <= 0 || n <= 0 || k <= 0) return -1;
    if (group_size % 32 != 0 || k % group_size != 0) return -1;
    const long groups = k / group_size;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m * groups));
    if (!xsum) return -1;
    for (long r = 0; r < m; r++) {
        for (long g = 0; g < groups; g++) {
            float s = 0.0f;
            const float *xg = x + r * k + g * group_size;
            for (int i = 0; i < group_size; i++) s += xg[i];
            xsum[r * groups + g] = s;
        }
    }
    int use_avx2 = simd && (bits == 4 || bits == 8) && phf_qmatvec_simd();
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (n < 64L * threads) threads = (int)(n / 64) > 0 ? (int)(n / 64) : 1;

    job_t jobs[64];
    pthread_t tids[64];
    long chunk = (n + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        job_t *jb = &jobs[t];
        jb->x = x; jb->xsum = xsum; jb->w = w; jb->scales = scales; jb->biases = biases; jb->y = y;
        jb->m = m; jb->k = k; jb->n = n; jb->bits = bits; jb->group_size = group_size;
        jb->use_avx2 = use_avx2;
        jb->n0 = t * chunk;
        jb->n1 = (t + 1) * chunk < n ? (t + 1) * chunk : n;
    }
    /* thread 0's share runs on the calling thread; a thread that cannot be created runs here too */
    int spawned[64] = {0};
    for (int t = 1; t < threads; t++) {
        if (jobs[t].n0 >= jobs[t].n1) continue;
        if (pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0) {
            spawned[t] = 1;
        }
    }
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (spawned[t]) pthread_join(tids[t], NULL);
        else if (jobs[t].n0 < jobs[t].n1) run_job(&jobs[t]);
    }
    free(xsum);
    return 0;
}
