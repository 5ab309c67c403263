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

/* One input row (decoding one sequence): four independent accumulators per group keep the FMA
 * pipeline full instead of waiting on one dependency chain. */
__attribute__((target("avx2,fma"))) static void rows_avx2_single(const job_t *j) {
    const long groups = j->k / j->group_size;
    const long words_per_row = j->k * j->bits / 32;
    const long steps = j->group_size / 8; /* 8 codes per step; 4, 8 or 16: a multiple of 4 */
    const __m256i shifts4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask4 = _mm256_set1_epi32(15);
    const float *x = j->x;
    for (long row = j->n0; row < j->n1; row++) {
        const uint32_t *wr = j->w + row * words_per_row;
        const float *sr = j->scales + row * groups;
        const float *br = j->biases + row * groups;
        __m256 total = _mm256_setzero_ps();
        float bias_part = 0.0f;
        for (long g = 0; g < groups; g++) {
            const float *xg = x + g * j->group_size;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            if (j->bits == 4) {
                const uint32_t *wg = wr + g * steps;
#define PHF_Q4(i) _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)wg[i]), shifts4), mask4))
                for (long i = 0; i < steps; i += 4) {
                    a0 = _mm256_fmadd_ps(PHF_Q4(i), _mm256_loadu_ps(xg + 8 * i), a0);
                    a1 = _mm256_fmadd_ps(PHF_Q4(i + 1), _mm256_loadu_ps(xg + 8 * i + 8), a1);
                    a2 = _mm256_fmadd_ps(PHF_Q4(i + 2), _mm256_loadu_ps(xg + 8 * i + 16), a2);
                    a3 = _mm256_fmadd_ps(PHF_Q4(i + 3), _mm256_loadu_ps(xg + 8 * i + 24), a3);
                }
#undef PHF_Q4
            } else {
                const uint8_t *bg = (const uint8_t *)wr + g * j->group_size;
#define PHF_Q8(i) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bg + 8 * (i)))))
                for (long i = 0; i < steps; i += 4) {
                    a0 = _mm256_fmadd_ps(PHF_Q8(i), _mm256_loadu_ps(xg + 8 * i), a0);
                    a1 = _mm256_fmadd_ps(PHF_Q8(i + 1), _mm256_loadu_ps(xg + 8 * i + 8), a1);
                    a2 = _mm256_fmadd_ps(PHF_Q8(i + 2), _mm256_loadu_ps(xg + 8 * i + 16), a2);
                    a3 = _mm256_fmadd_ps(PHF_Q8(i + 3), _mm256_loadu_ps(xg + 8 * i + 24), a3);
                }
#undef PHF_Q8
            }
            __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(sr[g]), total);
            bias_part += br[g] * j->xsum[g];
        }
        j->y[row] = hsum256(total) + bias_part;
    }
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

static void run_job(const job_t *j) {
#ifdef PHF_X86
    if (j->use_avx2) {
        if (j->m == 1) rows_avx2_single(j);
        else rows_avx2(j);
        return;
    }
#endif
    rows_portable(j);
}

/* ---- a persistent pool of worker threads ----------------------------------------------------
 * Creating threads per call costs more than a small product (measured ~130 us per call here), so
 * workers are created once and wait for the next call: they spin briefly (decoding calls this
 * hundreds of times per token, back to back) and then sleep on a condition variable. One call at a
 * time (call_lock); the calling thread does the first share itself. */

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_start = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static int pool_size = 0;                  /* workers running (the caller is not counted) */
static const job_t *pool_jobs = NULL;      /* pool_jobs[1 + worker index] */
static int pool_active = 0;                /* jobs in the current call, caller's included */
static volatile long pool_generation = 0;  /* bumped once per call */
static volatile int pool_pending = 0;      /* workers that have not finished the current call */
static long pool_born[MAX_THREADS];        /* the generation current when each worker was created */

static inline void cpu_relax(void) {
#ifdef PHF_X86
    __builtin_ia32_pause();
#endif
}

static void *pool_worker(void *arg) {
    const int idx = (int)(long)arg;
    long seen = pool_born[idx]; /* not the current value: the first call may already have begun */
    for (;;) {
        long gen = seen;
        for (int i = 0; i < SPIN_ROUNDS; i++) {
            gen = __atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE);
            if (gen != seen) break;
            cpu_relax();
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool_mu);
            while ((gen = __atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&pool_start, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = gen;
        if (idx + 1 < pool_active) run_job(&pool_jobs[idx + 1]);
        if (__atomic_sub_fetch(&pool_pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&pool_mu);
            pthread_cond_signal(&pool_done);
            pthread_mutex_unlock(&pool_mu);
        }
    }
    return NULL;
}

/* After fork() only the forking thread exists in the child: forget the workers. */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_start, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_size = 0;
}

static void pool_grow(int workers) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, pool_after_fork_child);
        registered = 1;
    }
    while (pool_size < workers) {
        pthread_t tid;
        pthread_attr_t attr;
        pool_born[pool_size] = __atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&tid, &attr, pool_worker, (void *)(long)pool_size);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with the workers we have */
        pool_size++;
    }
}

static void run_jobs(const job_t *jobs, int count) {
    pthread_mutex_lock(&call_lock);
    pool_grow(count - 1);
    int active = count <= pool_size + 1 ? count : pool_size + 1;
    if (active > 1) {
        pool_jobs = jobs;
        pool_active = active;
        __atomic_store_n(&pool_pending, pool_size, __ATOMIC_RELEASE);
        pthread_mutex_lock(&pool_mu);
        __atomic_add_fetch(&pool_generation, 1, __ATOMIC_ACQ_REL);
        pthread_cond_broadcast(&pool_start);
        pthread_mutex_unlock(&pool_mu);
    }
    run_job(&jobs[0]);
    for (int t = active; t < count; t++) run_job(&jobs[t]); /* shares no worker could take */
    if (active > 1) {
        for (int i = 0; i < SPIN_ROUNDS && __atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0; i++) cpu_relax();
        pthread_mutex_lock(&pool_mu);
        while (__atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&pool_done, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
    }
    pthread_mutex_unlock(&call_lock);
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
    /* below about a million weights a second thread costs more than it saves */
    if (threads < 1 || n * k < (1L << 20)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (n < 8L * threads) threads = (int)(n / 8) > 0 ? (int)(n / 8) : 1;

    job_t jobs[MAX_THREADS];
    long chunk = (n + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        job_t *jb = &jobs[t];
        jb->x = x; jb->xsum = xsum; jb->w = w; jb->scales = scales; jb->biases = biases; jb->y = y;
        jb->m = m; jb->k = k; jb->n = n; jb->bits = bits; jb->group_size = group_size;
        jb->use_avx2 = use_avx2;
        jb->n0 = t * chunk < n ? t * chunk : n;
        jb->n1 = (t + 1) * chunk < n ? (t + 1) * chunk : n;
    }
    run_jobs(jobs, threads);
    free(xsum);
    return 0;
}
