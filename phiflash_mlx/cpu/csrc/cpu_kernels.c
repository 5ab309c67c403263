/*
 * CPU kernels for decoding, loaded with ctypes by phiflash_mlx/cpu_kernels.py (not a Python
 * extension module):
 *
 *   phf_qmatvec  multi-threaded affine-quantized matrix x few vectors (below)
 *   phf_attend   differential attention of a few queries over a long K/V cache (further down)
 *
 * Both run on a persistent pool of POSIX threads, with an AVX2+FMA path chosen at run time on x86-64
 * CPUs that have it and portable C everywhere else.
 *
 * Quantized products:
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
 * and is compute-bound; the output rows are split over the threads.
 */

#include <math.h>
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

/* ---- scales and biases: float32, or 16 bits as stored (MLX's float16 / bfloat16) ------------
 * The products read them where they use them (one value per group), never converting whole
 * matrices: 16-bit ones cut a 4-bit g64 weight's bytes from 40 to 36 per group. */
#define PHF_SD_F32 0
#define PHF_SD_F16 1
#define PHF_SD_BF16 2

static inline float phf_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE binary16 -> float32, exact for every value (subnormals through an integer conversion, so a
 * flush-to-zero mode cannot change them; infinities and NaNs keep their class). */
static inline float phf_f16_to_float(uint16_t h) {
    const uint32_t mag = h & 0x7fffu, exp = h & 0x7c00u;
    const int sign = (h & 0x8000u) != 0;
    float f;
    if (exp == 0) f = (float)mag * 0x1p-24f;                                 /* zero, subnormal */
    else if (exp == 0x7c00u) f = phf_bits_to_float((mag << 13) + (224u << 23)); /* inf, NaN */
    else f = phf_bits_to_float((mag << 13) + (112u << 23));
    return sign ? -f : f;
}

/* value i of a scales / biases array of dtype code dt */
static inline float phf_sd(const void *p, long i, int dt) {
    if (dt == PHF_SD_F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    if (dt == PHF_SD_BF16) return phf_bits_to_float((uint32_t)h << 16);
    return phf_f16_to_float(h);
}

/* s[0 .. n) := softmax(s) in place (the portable attention loops; n >= 1) */
static void softmax_row(float *s, long n) {
    float m = s[0];
    for (long t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
    float sum = 0.0f;
    for (long t = 0; t < n; t++) {
        s[t] = expf(s[t] - m);
        sum += s[t];
    }
    const float inv = 1.0f / sum;
    for (long t = 0; t < n; t++) s[t] *= inv;
}

/* a pointer to element i of a scales / biases array of dtype code dt */
static inline const void *phf_sd_at(const void *p, long i, int dt) {
    return dt == PHF_SD_F32 ? (const void *)((const float *)p + i) : (const void *)((const uint16_t *)p + i);
}

typedef struct {
    const float *x;       /* [m, k] */
    const float *xsum;    /* [m, groups] */
    const float *xeo;     /* one row, 4 bits: x[0::2] then x[1::2] (k / 2 each), or NULL */
    const uint32_t *w;    /* [n, k * bits / 32] */
    const void *scales;   /* [n, groups], dtype code sdtype (PHF_SD_*) */
    const void *biases;   /* [n, groups], the same dtype */
    float *y;             /* [m, n] */
    long m, k, n0, n1, n;
    int bits, group_size, use_avx2, sdtype;
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
        const long sb = row * groups;
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
                total += phf_sd(j->scales, sb + g, j->sdtype) * dot + phf_sd(j->biases, sb + g, j->sdtype) * xs[g];
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

/* values i .. i+7 of a scales / biases array of dtype code dt (phf_sd's arithmetic, 8 lanes) */
__attribute__((target("avx2,fma"))) static inline __m256 phf_sd8_avx2(const void *p, long i, int dt) {
    if (dt == PHF_SD_F32) return _mm256_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    if (dt == PHF_SD_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    const __m256i mag = _mm256_and_si256(h, _mm256_set1_epi32(0x7fff));
    const __m256i exp = _mm256_and_si256(h, _mm256_set1_epi32(0x7c00));
    const __m256i bias = _mm256_set1_epi32(112 << 23);
    __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(mag, 13), bias);
    bits = _mm256_add_epi32(bits, _mm256_and_si256(_mm256_cmpeq_epi32(exp, _mm256_set1_epi32(0x7c00)), bias));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0x1p-24f));
    const __m256 zero_exp = _mm256_castsi256_ps(_mm256_cmpeq_epi32(exp, _mm256_setzero_si256()));
    const __m256 f = _mm256_blendv_ps(_mm256_castsi256_ps(bits), sub, zero_exp);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
    return _mm256_or_ps(f, _mm256_castsi256_ps(sign));
}

/* Codes 8i .. 8i+7 of a group starting at byte `base`, as floats: 4 bits (one uint32 word) or 8
 * bits (eight bytes). */
__attribute__((target("avx2,fma"))) static inline __m256 codes8_avx2(const uint8_t *base, long i, int bits) {
    if (bits == 4) {
        uint32_t word;
        memcpy(&word, base + 4 * i, sizeof word);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_cvtepi32_ps(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), _mm256_set1_epi32(15)));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(base + 8 * i))));
}

/* One input row (decoding one sequence): four independent accumulators per group keep the FMA
 * pipeline full instead of waiting on one dependency chain. */
__attribute__((target("avx2,fma"))) static void rows_avx2_single(const job_t *j) {
    const long groups = j->k / j->group_size;
    const long words_per_row = j->k * j->bits / 32;
    const long steps = j->group_size / 8; /* 8 codes per step; 4, 8 or 16: a multiple of 4 */
    const float *x = j->x;
    for (long row = j->n0; row < j->n1; row++) {
        const uint32_t *wr = j->w + row * words_per_row;
        const long sb = row * groups;
        __m256 total = _mm256_setzero_ps();
        float bias_part = 0.0f;
        for (long g = 0; g < groups; g++) {
            const float *xg = x + g * j->group_size;
            const uint8_t *bg = (const uint8_t *)wr + g * j->group_size * j->bits / 8;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (long i = 0; i < steps; i += 4) {
                a0 = _mm256_fmadd_ps(codes8_avx2(bg, i, j->bits), _mm256_loadu_ps(xg + 8 * i), a0);
                a1 = _mm256_fmadd_ps(codes8_avx2(bg, i + 1, j->bits), _mm256_loadu_ps(xg + 8 * i + 8), a1);
                a2 = _mm256_fmadd_ps(codes8_avx2(bg, i + 2, j->bits), _mm256_loadu_ps(xg + 8 * i + 16), a2);
                a3 = _mm256_fmadd_ps(codes8_avx2(bg, i + 3, j->bits), _mm256_loadu_ps(xg + 8 * i + 24), a3);
            }
            __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(phf_sd(j->scales, sb + g, j->sdtype)), total);
            bias_part += phf_sd(j->biases, sb + g, j->sdtype) * j->xsum[g];
        }
        j->y[row] = hsum256(total) + bias_part;
    }
}

/* One input row, 4-bit codes, groups of a multiple of 64: 32 bytes of codes at a time. Byte i of a
 * row holds code 2i in its low nibble and code 2i+1 in its high one, so masking and shifting the
 * whole 32 bytes gives 32 codes that pair with x[0::2] and 32 that pair with x[1::2] (the split
 * copy `xeo` made once per call); widening 8 bytes at a time then costs about half the
 * instructions per weight of unpacking one 32-bit word per 8 codes. */
__attribute__((target("avx2,fma"))) static void rows_avx2_single_q4(const job_t *j) {
    const long groups = j->k / j->group_size;
    const long half = j->k / 2, bytes_per_group = j->group_size / 2;
    const float *xe = j->xeo, *xo = j->xeo + half;
    const __m256i low4 = _mm256_set1_epi8(15);
    for (long row = j->n0; row < j->n1; row++) {
        const uint8_t *wr = (const uint8_t *)(j->w + row * (j->k / 8));
        const long sb = row * groups;
        __m256 total = _mm256_setzero_ps();
        float bias_part = 0.0f;
        for (long g = 0; g < groups; g++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (long b = g * bytes_per_group; b < (g + 1) * bytes_per_group; b += 32) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wr + b));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                const __m128i l0 = _mm256_castsi256_si128(lo), l1 = _mm256_extracti128_si256(lo, 1);
                const __m128i h0 = _mm256_castsi256_si128(hi), h1 = _mm256_extracti128_si256(hi, 1);
#define PHF_W8(src) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(src))
                a0 = _mm256_fmadd_ps(PHF_W8(l0), _mm256_loadu_ps(xe + b), a0);
                a1 = _mm256_fmadd_ps(PHF_W8(_mm_srli_si128(l0, 8)), _mm256_loadu_ps(xe + b + 8), a1);
                a2 = _mm256_fmadd_ps(PHF_W8(l1), _mm256_loadu_ps(xe + b + 16), a2);
                a3 = _mm256_fmadd_ps(PHF_W8(_mm_srli_si128(l1, 8)), _mm256_loadu_ps(xe + b + 24), a3);
                a0 = _mm256_fmadd_ps(PHF_W8(h0), _mm256_loadu_ps(xo + b), a0);
                a1 = _mm256_fmadd_ps(PHF_W8(_mm_srli_si128(h0, 8)), _mm256_loadu_ps(xo + b + 8), a1);
                a2 = _mm256_fmadd_ps(PHF_W8(h1), _mm256_loadu_ps(xo + b + 16), a2);
                a3 = _mm256_fmadd_ps(PHF_W8(_mm_srli_si128(h1, 8)), _mm256_loadu_ps(xo + b + 24), a3);
#undef PHF_W8
            }
            __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(phf_sd(j->scales, sb + g, j->sdtype)), total);
            bias_part += phf_sd(j->biases, sb + g, j->sdtype) * j->xsum[g];
        }
        j->y[row] = hsum256(total) + bias_part;
    }
}

__attribute__((target("avx2,fma"))) static void rows_avx2(const job_t *j) {
    const long groups = j->k / j->group_size;
    const long words_per_row = j->k * j->bits / 32;
    for (long m0 = 0; m0 < j->m; m0 += MAX_ROWS) {
        const long mm = (j->m - m0 < MAX_ROWS) ? j->m - m0 : MAX_ROWS;
        for (long row = j->n0; row < j->n1; row++) {
            const uint32_t *wr = j->w + row * words_per_row;
            const long sb = row * groups;
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
                const uint8_t *bg = (const uint8_t *)wr + base * j->bits / 8;
                for (long i = 0; i < j->group_size / 8; i++) {
                    const __m256 qf = codes8_avx2(bg, i, j->bits);
                    for (long m = 0; m < mm; m++) {
                        acc[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(j->x + (m0 + m) * j->k + base + i * 8), acc[m]);
                    }
                }
                const __m256 s = _mm256_set1_ps(phf_sd(j->scales, sb + g, j->sdtype));
                const float bg_ = phf_sd(j->biases, sb + g, j->sdtype);
                for (long m = 0; m < mm; m++) {
                    total[m] = _mm256_fmadd_ps(acc[m], s, total[m]);
                    bias_part[m] += bg_ * j->xsum[(m0 + m) * groups + g];
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
        if (j->m == 1 && j->xeo) rows_avx2_single_q4(j);
        else if (j->m == 1) rows_avx2_single(j);
        else rows_avx2(j);
        return;
    }
#endif
    rows_portable(j);
}

/* Work is handed out in chunks of rows from a shared counter rather than as one fixed slice per
 * thread: where another process holds a core for a while (a shared machine, a laptop with a browser
 * open), the threads that do run take the remaining chunks instead of waiting for the slow one. */
static inline long next_chunk(long *counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

typedef struct {
    job_t job;
    long chunk, chunks, next;
} qmv_t;

static void qmatvec_share(void *arg, int share) {
    qmv_t *q = (qmv_t *)arg;
    job_t j = q->job;
    (void)share;
    for (long c; (c = next_chunk(&q->next)) < q->chunks;) {
        j.n0 = c * q->chunk;
        j.n1 = (c + 1) * q->chunk < j.n ? (c + 1) * q->chunk : j.n;
        run_job(&j);
    }
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
typedef void (*task_fn)(void *arg, int share);
static task_fn pool_task = NULL;           /* worker w runs pool_task(pool_arg, w + 1) */
static void *pool_arg = NULL;
static int pool_active = 0;                /* shares in the current call, caller's included */
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
        if (idx + 1 < pool_active) pool_task(pool_arg, idx + 1);
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

/* Run task(arg, 0 .. count-1), share 0 on the calling thread, the others on the pool. */
static void run_shares(task_fn task, void *arg, int count) {
    pthread_mutex_lock(&call_lock);
    pool_grow(count - 1);
    int active = count <= pool_size + 1 ? count : pool_size + 1;
    if (active > 1) {
        pool_task = task;
        pool_arg = arg;
        pool_active = active;
        __atomic_store_n(&pool_pending, pool_size, __ATOMIC_RELEASE);
        pthread_mutex_lock(&pool_mu);
        __atomic_add_fetch(&pool_generation, 1, __ATOMIC_ACQ_REL);
        pthread_cond_broadcast(&pool_start);
        pthread_mutex_unlock(&pool_mu);
    }
    task(arg, 0);
    for (int t = active; t < count; t++) task(arg, t); /* shares no worker could take */
    if (active > 1) {
        for (int i = 0; i < SPIN_ROUNDS && __atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0; i++) cpu_relax();
        pthread_mutex_lock(&pool_mu);
        while (__atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&pool_done, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
    }
    pthread_mutex_unlock(&call_lock);
}

/* 1 if this CPU runs the AVX2+FMA path. */
PHF_EXPORT int phf_simd(void) {
#ifdef PHF_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* ---- quantized matrix x a block of rows (prefill) ------------------------------------------
 *
 * For blocks of many rows (a prompt of 16..512 tokens) the pass-per-16-rows loop above converts
 * every code once per 16 rows and keeps 16 accumulators live; here the weight is instead
 * dequantized a tile at a time (QMM_NT rows x QMM_KC columns, ~64 KB, it stays in L2) into float
 * scratch, and the tile is multiplied with every row of x by a register-blocked micro-kernel
 * (QMM_MR rows of x x QMM_NR rows of the tile, 12 accumulators). The packed codes are read once per
 * call and nothing of the size of the whole matrix is ever written, so the time is the product's
 * arithmetic: proportional to the number of rows, without the fixed cost of dequantizing whole
 * matrices. Each thread owns a range of output columns and its own scratch. */

#define QMM_MR 3
#define QMM_NR 4
#define QMM_NT 64
#define QMM_KC 256

typedef struct {
    const float *x;
    const uint32_t *w;
    const void *scales, *biases; /* dtype code sdtype */
    float *y; /* [m, n], zeroed by the caller */
    long m, k, n;
    int bits, group_size, shares, use_avx2, sdtype;
    int failed;
    long next; /* the next tile of QMM_NT output rows to take */
} qmm_t;

static void qmm_dequant_portable(const qmm_t *a, long r0, long nt, long k0, long kc, float *wd) {
    const int per_word = 32 / a->bits;
    const uint32_t mask = (a->bits == 32) ? 0xffffffffu : ((1u << a->bits) - 1u);
    const long groups = a->k / a->group_size, words_per_row = a->k / per_word;
    for (long r = 0; r < nt; r++) {
        const uint32_t *wr = a->w + (r0 + r) * words_per_row;
        float *dst = wd + r * kc;
        for (long c = 0; c < kc; c++) {
            const long col = k0 + c, g = col / a->group_size;
            const uint32_t code = (wr[col / per_word] >> (a->bits * (col % per_word))) & mask;
            dst[c] = phf_sd(a->scales, (r0 + r) * groups + g, a->sdtype) * (float)code +
                     phf_sd(a->biases, (r0 + r) * groups + g, a->sdtype);
        }
    }
}

static void qmm_micro_portable(const float *x, long xs, const float *wd, long kc, float *y, long ys, long mr,
                               long nr) {
    for (long i = 0; i < mr; i++) {
        for (long j = 0; j < nr; j++) {
            float s = 0.0f;
            for (long c = 0; c < kc; c++) s += x[i * xs + c] * wd[j * kc + c];
            y[i * ys + j] += s;
        }
    }
}

#ifdef PHF_X86
__attribute__((target("avx2,fma"))) static void qmm_dequant_avx2(const qmm_t *a, long r0, long nt, long k0,
                                                                 long kc, float *wd) {
    const long groups = a->k / a->group_size, words_per_row = a->k * a->bits / 32;
    const long g0 = k0 / a->group_size, gn = kc / a->group_size;
    for (long r = 0; r < nt; r++) {
        const uint8_t *wr = (const uint8_t *)(a->w + (r0 + r) * words_per_row);
        const long sb = (r0 + r) * groups + g0;
        for (long g = 0; g < gn; g++) {
            const uint8_t *bg = wr + (g0 + g) * a->group_size * a->bits / 8;
            const __m256 s = _mm256_set1_ps(phf_sd(a->scales, sb + g, a->sdtype));
            const __m256 b = _mm256_set1_ps(phf_sd(a->biases, sb + g, a->sdtype));
            float *dst = wd + r * kc + g * a->group_size;
            for (long i = 0; i < a->group_size / 8; i++)
                _mm256_storeu_ps(dst + 8 * i, _mm256_fmadd_ps(codes8_avx2(bg, i, a->bits), s, b));
        }
    }
}

/* y[0..3, 0..4) += x[0..3, 0..kc) . wd[0..4, 0..kc) (kc a multiple of 8) */
__attribute__((target("avx2,fma"))) static void qmm_micro_avx2(const float *x, long xs, const float *wd, long kc,
                                                               float *y, long ys) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps(), c03 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps(), c13 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c22 = _mm256_setzero_ps(), c23 = _mm256_setzero_ps();
    const float *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs;
    const float *w0 = wd, *w1 = wd + kc, *w2 = wd + 2 * kc, *w3 = wd + 3 * kc;
    for (long c = 0; c < kc; c += 8) {
        const __m256 b0 = _mm256_loadu_ps(w0 + c), b1 = _mm256_loadu_ps(w1 + c);
        const __m256 b2 = _mm256_loadu_ps(w2 + c), b3 = _mm256_loadu_ps(w3 + c);
        __m256 av = _mm256_loadu_ps(x0 + c);
        c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
        c02 = _mm256_fmadd_ps(av, b2, c02); c03 = _mm256_fmadd_ps(av, b3, c03);
        av = _mm256_loadu_ps(x1 + c);
        c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
        c12 = _mm256_fmadd_ps(av, b2, c12); c13 = _mm256_fmadd_ps(av, b3, c13);
        av = _mm256_loadu_ps(x2 + c);
        c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
        c22 = _mm256_fmadd_ps(av, b2, c22); c23 = _mm256_fmadd_ps(av, b3, c23);
    }
    y[0] += hsum256(c00); y[1] += hsum256(c01); y[2] += hsum256(c02); y[3] += hsum256(c03);
    y[ys] += hsum256(c10); y[ys + 1] += hsum256(c11); y[ys + 2] += hsum256(c12); y[ys + 3] += hsum256(c13);
    y[2 * ys] += hsum256(c20); y[2 * ys + 1] += hsum256(c21);
    y[2 * ys + 2] += hsum256(c22); y[2 * ys + 3] += hsum256(c23);
}

/* the edges: mr <= 3 rows of x, nr <= 4 rows of the tile */
__attribute__((target("avx2,fma"))) static void qmm_edge_avx2(const float *x, long xs, const float *wd, long kc,
                                                              float *y, long ys, long mr, long nr) {
    for (long i = 0; i < mr; i++) {
        for (long j = 0; j < nr; j++) {
            __m256 acc = _mm256_setzero_ps();
            for (long c = 0; c < kc; c += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * xs + c), _mm256_loadu_ps(wd + j * kc + c), acc);
            y[i * ys + j] += hsum256(acc);
        }
    }
}
#endif

static void qmm_share(void *arg, int share) {
    qmm_t *a = (qmm_t *)arg;
    (void)share;
    /* a tile's columns: whole groups, about QMM_KC of them */
    long kc_step = a->group_size >= QMM_KC ? a->group_size : (QMM_KC / a->group_size) * a->group_size;
    float *wd = (float *)malloc(sizeof(float) * (size_t)(QMM_NT * kc_step));
    if (!wd) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELEASE);
        return;
    }
    const long tiles = (a->n + QMM_NT - 1) / QMM_NT;
    for (long tile; (tile = next_chunk(&a->next)) < tiles;) {
        const long r0 = tile * QMM_NT, nt = (a->n - r0 < QMM_NT) ? a->n - r0 : QMM_NT;
        for (long k0 = 0; k0 < a->k; k0 += kc_step) {
            const long kc = (a->k - k0 < kc_step) ? a->k - k0 : kc_step;
#ifdef PHF_X86
            if (a->use_avx2 && a->bits != 2) {
                qmm_dequant_avx2(a, r0, nt, k0, kc, wd);
                for (long m0 = 0; m0 < a->m; m0 += QMM_MR) {
                    const long mr = (a->m - m0 < QMM_MR) ? a->m - m0 : QMM_MR;
                    const float *xb = a->x + m0 * a->k + k0;
                    float *yb = a->y + m0 * a->n + r0;
                    for (long j = 0; j < nt; j += QMM_NR) {
                        const long nr = (nt - j < QMM_NR) ? nt - j : QMM_NR;
                        if (mr == QMM_MR && nr == QMM_NR) qmm_micro_avx2(xb, a->k, wd + j * kc, kc, yb + j, a->n);
                        else qmm_edge_avx2(xb, a->k, wd + j * kc, kc, yb + j, a->n, mr, nr);
                    }
                }
                continue;
            }
#endif
            qmm_dequant_portable(a, r0, nt, k0, kc, wd);
            for (long m0 = 0; m0 < a->m; m0 += QMM_MR) {
                const long mr = (a->m - m0 < QMM_MR) ? a->m - m0 : QMM_MR;
                for (long j = 0; j < nt; j += QMM_NR) {
                    const long nr = (nt - j < QMM_NR) ? nt - j : QMM_NR;
                    qmm_micro_portable(a->x + m0 * a->k + k0, a->k, wd + j * kc, kc, a->y + m0 * a->n + r0 + j, a->n,
                                       mr, nr);
                }
            }
        }
    }
    free(wd);
}

/* int8-activation products (q8.c): phf_qmatvec and phf_qmatmul hand 4- and 8-bit products to
 * phf_q8_matmul while phf_set_q8(1) is in effect */
PHF_EXPORT int phf_q8(void);
PHF_EXPORT int phf_q8_matmul_sd(const float *x, long m, long k, const uint32_t *w, const void *scales,
                                const void *biases, int sdtype, long n, int bits, int group_size, float *y,
                                int threads, int level);

/*
 * y[m, n] = x[m, k] @ dequantize(w, scales, biases)[n, k]^T for blocks of rows, tile by tile (see
 * above); same arguments and layout as phf_qmatvec. Returns 0, or -1 for an unsupported case or when
 * scratch memory could not be had (y is then incomplete).
 */
PHF_EXPORT int phf_qmatmul_sd(const float *x, long m, long k, const uint32_t *w, const void *scales,
                              const void *biases, int sdtype, long n, int bits, int group_size, float *y,
                              int threads, int simd) {
    if (!(bits == 2 || bits == 4 || bits == 8) || group_size <= 0 || m <= 0 || n <= 0 || k <= 0) return -1;
    if (group_size % 32 != 0 || k % group_size != 0) return -1;
    if (sdtype < PHF_SD_F32 || sdtype > PHF_SD_BF16) return -1;
    if ((bits == 4 || bits == 8) && phf_q8())
        return phf_q8_matmul_sd(x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, threads, simd ? -1 : 0);
    qmm_t a = {x, w, scales, biases, y, m, k, n, bits, group_size, 1, 0, sdtype, 0, 0};
    a.use_avx2 = simd && phf_simd();
    if (threads < 1 || m * n * k < (1L << 20)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (n < (long)QMM_NR * threads) threads = (int)(n / QMM_NR) > 0 ? (int)(n / QMM_NR) : 1;
    a.shares = threads;
    memset(y, 0, sizeof(float) * (size_t)(m * n));
    run_shares(qmm_share, &a, threads);
    return a.failed ? -1 : 0;
}

/* phf_qmatmul_sd with float32 scales and biases */
PHF_EXPORT int phf_qmatmul(const float *x, long m, long k, const uint32_t *w, const float *scales,
                           const float *biases, long n, int bits, int group_size, float *y, int threads,
                           int simd) {
    return phf_qmatmul_sd(x, m, k, w, scales, biases, PHF_SD_F32, n, bits, group_size, y, threads, simd);
}

/*
 * y[m, n] = x[m, k] @ dequantize(w, scales, biases)[n, k]^T. x, y contiguous float32, w uint32;
 * scales and biases contiguous, of dtype code sdtype: PHF_SD_F32 (0) float32, PHF_SD_F16 (1) float16,
 * PHF_SD_BF16 (2) bfloat16, read as stored. Returns 0, or -1 for an unsupported bits / group size /
 * shape / dtype code (nothing written). simd: 1 to use the AVX2 path when the CPU has it, 0 to force
 * the portable loop.
 */
PHF_EXPORT int phf_qmatvec_sd(const float *x, long m, long k, const uint32_t *w, const void *scales,
                              const void *biases, int sdtype, long n, int bits, int group_size, float *y,
                              int threads, int simd) {
    if (!(bits == 2 || bits == 4 || bits == 8) || group_size <= 0 || m <= 0 || n <= 0 || k <= 0) return -1;
    if (group_size % 32 != 0 || k % group_size != 0) return -1;
    if (sdtype < PHF_SD_F32 || sdtype > PHF_SD_BF16) return -1;
    if ((bits == 4 || bits == 8) && phf_q8())
        return phf_q8_matmul_sd(x, m, k, w, scales, biases, sdtype, n, bits, group_size, y, threads, simd ? -1 : 0);
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
    int use_avx2 = simd && (bits == 4 || bits == 8) && phf_simd();
    float *xeo = NULL;
    if (use_avx2 && m == 1 && bits == 4 && group_size % 64 == 0) {
        xeo = (float *)malloc(sizeof(float) * (size_t)k);
        if (xeo) {
            for (long i = 0; i < k / 2; i++) {
                xeo[i] = x[2 * i];
                xeo[k / 2 + i] = x[2 * i + 1];
            }
        }
    }
    /* below about a million weights a second thread costs more than it saves */
    if (threads < 1 || n * k < (1L << 20)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (n < 8L * threads) threads = (int)(n / 8) > 0 ? (int)(n / 8) : 1;

    qmv_t q;
    job_t *jb = &q.job;
    jb->x = x; jb->xsum = xsum; jb->xeo = xeo; jb->w = w; jb->scales = scales; jb->biases = biases; jb->y = y;
    jb->m = m; jb->k = k; jb->n = n; jb->bits = bits; jb->group_size = group_size;
    jb->use_avx2 = use_avx2;
    jb->sdtype = sdtype;
    jb->n0 = 0; jb->n1 = n;
    /* chunks of ~64 KB of codes, at least 8 per thread */
    q.chunk = (64L * 1024 * 8) / (k * bits) + 1;
    if (q.chunk > n / (8L * threads) + 1) q.chunk = n / (8L * threads) + 1;
    q.chunks = (n + q.chunk - 1) / q.chunk;
    q.next = 0;
    run_shares(qmatvec_share, &q, threads);
    free(xsum);
    free(xeo);
    return 0;
}

/* phf_qmatvec_sd with float32 scales and biases (the original entry point) */
PHF_EXPORT int phf_qmatvec(const float *x, long m, long k, const uint32_t *w, const float *scales,
                           const float *biases, long n, int bits, int group_size, float *y, int threads,
                           int simd) {
    return phf_qmatvec_sd(x, m, k, w, scales, biases, PHF_SD_F32, n, bits, group_size, y, threads, simd);
}

/* ---- attention of a few queries over a long cache (CPU decode) ------------------------------
 *
 * The differential-attention layout of phiflash_mlx.models.phi4flash: nkv / 2 KV pairs; pair h holds
 * two key heads (part 0 for stripe 1, part 1 for stripe 2) and one value row of width DV = 2 * head
 * size that serves both. Key head (h, part) starts at k + h * k_hs + part * k_ps (in the model's pair
 * layout k_hs is the pair stride and k_ps the head size). Query head j = h + part * nkv / 2 has R
 * rows (query heads x positions, already scaled); row r is query position r % L. For pair h the
 * result rows are part 0's R rows, then part 1's:
 *
 *   out[b][h][part * R + r] = softmax_t(q[b][j][r] . k[b][h, part][t] + bias[b][r % L][t]) @ v[b][h]
 *
 * One unit of work is one (b, h): it reads both key heads once and the value head once, which is
 * what makes the step memory-bound instead of copy-bound. Units are spread over the pool.
 *
 * Keys and values are float32 or float16 (kvtype PHF_SD_F32 / PHF_SD_F16, the codes of the scales):
 * 16-bit caches are widened where they are read (F16C on x86 CPUs that have it, phf_f16_to_float
 * elsewhere), so a step reads half the bytes and computes the same float32 math on the stored
 * values. */

typedef struct {
    const float *q;
    long q_bs, q_hs;           /* q[b][j][r][0..D), rows contiguous (stride D) */
    const void *k;             /* float32 or float16 (kvtype), like v; strides in elements */
    long k_bs, k_hs, k_ps, k_ts; /* key head (h, part): k + b * k_bs + h * k_hs + part * k_ps */
    const void *v;
    long v_bs, v_hs, v_ts;     /* v[b][h][t][0..DV) */
    const float *bias;         /* bias[b][l][t], or NULL */
    long bias_bs, bias_ls;
    float *out;                /* [B][nkv / 2][2R][DV], contiguous */
    long B, nkv, R, L, D, DV, T;
    int shares, use_avx2, kvtype;
    int failed;                /* set by a share that could not allocate its scratch */
    long next;                 /* the next unit to take */
} attend_t;

static float dot_portable(const float *a, const float *b, long n) {
    float s = 0.0f;
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_portable(float *y, float a, const float *x, long n) {
    for (long i = 0; i < n; i++) y[i] += a * x[i];
}

#ifdef PHF_X86
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(float *y, float a, const float *x, long n) {
    const __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* the same over a float16 row (F16C widens 8 values per instruction) */
__attribute__((target("avx2,fma,f16c"))) static float dot_f16_avx2(const float *a, const void *bv, long n) {
    const uint16_t *b = (const uint16_t *)bv;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8))), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * phf_f16_to_float(b[i]);
    return s;
}

__attribute__((target("avx2,fma,f16c"))) static void axpy_f16_avx2(float *y, float a, const void *xv, long n) {
    const uint16_t *x = (const uint16_t *)xv;
    const __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * phf_f16_to_float(x[i]);
}

/* n float16 values -> float32 */
__attribute__((target("avx2,f16c"))) static void widen_f16_avx2(float *dst, const uint16_t *src, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = phf_f16_to_float(src[i]);
}

__attribute__((target("avx2,fma"))) static float dot_f32_avx2(const float *a, const void *b, long n) {
    return dot_avx2(a, (const float *)b, n);
}

__attribute__((target("avx2,fma"))) static void axpy_f32_avx2(float *y, float a, const void *x, long n) {
    axpy_avx2(y, a, (const float *)x, n);
}
#endif

/* 1 if this CPU widens float16 K/V with F16C (the AVX2 path of 16-bit caches); 0: phf_f16_to_float. */
PHF_EXPORT int phf_f16c(void) {
#ifdef PHF_X86
    __builtin_cpu_init();
    return phf_simd() && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* Marks a library whose attention kernels take the K/V dtype code (kvtype); Python checks it exists. */
PHF_EXPORT int phf_kv16(void) { return 1; }

static float dot_f16_portable(const float *a, const void *bv, long n) {
    const uint16_t *b = (const uint16_t *)bv;
    float s = 0.0f;
    for (long i = 0; i < n; i++) s += a[i] * phf_f16_to_float(b[i]);
    return s;
}

static void axpy_f16_portable(float *y, float a, const void *xv, long n) {
    const uint16_t *x = (const uint16_t *)xv;
    for (long i = 0; i < n; i++) y[i] += a * phf_f16_to_float(x[i]);
}

static float dot_f32_portable(const float *a, const void *b, long n) { return dot_portable(a, (const float *)b, n); }

static void axpy_f32_portable(float *y, float a, const void *x, long n) { axpy_portable(y, a, (const float *)x, n); }

typedef float (*kv_dot_fn)(const float *, const void *, long);
typedef void (*kv_axpy_fn)(float *, float, const void *, long);

/* The dot and axpy over K/V rows of dtype code kvtype (PHF_SD_F32 or PHF_SD_F16); simd: the AVX2
 * (+F16C for float16) loops where the CPU has them. */
static void kv_kernels(int kvtype, int simd, kv_dot_fn *dot, kv_axpy_fn *axpy) {
    if (kvtype == PHF_SD_F16) {
        *dot = dot_f16_portable;
        *axpy = axpy_f16_portable;
#ifdef PHF_X86
        if (simd && phf_f16c()) {
            *dot = dot_f16_avx2;
            *axpy = axpy_f16_avx2;
        }
#endif
        return;
    }
    *dot = dot_f32_portable;
    *axpy = axpy_f32_portable;
#ifdef PHF_X86
    if (simd) {
        *dot = dot_f32_avx2;
        *axpy = axpy_f32_avx2;
    }
#endif
}

/* ---- one KV pair of a decode step, register-blocked (AVX2 + FMA + F16C) ------------------------
 *
 * The loops in attend_share / attend_rows_share call a dot product per (key row, query row) and an
 * axpy that loads and stores the output rows per key row: at long contexts they run below what
 * memory delivers, so halving the bytes (float16 caches) hardly shows. Here, for one pair: the
 * scores of two query rows against two key rows at a time (4 accumulators, one 4-way reduction), a
 * vectorised softmax, and the value pass in blocks of PAIR_TB key rows (L1-resident) with the output
 * strip of up to four query rows held in registers; rows are prefetched into L2 ahead of use.
 * Measured (phf_attend_rows without the 512-bit kernel, 10 pairs x 2 queries per stripe, D 64, 32K
 * rows, one thread, shared machine): float32 26.7 -> 21.7-24.5 ms, float16 23.5 -> 11.7-12.8 ms
 * (64-row blocks, prefetched into L1, were slower: 46 / 17.7 ms). Applies where D % 8 == 0 and
 * DV % 16 == 0 on CPUs with AVX2, FMA and F16C; the loops above do the rest. */

typedef struct {
    const float *q0, *q1;       /* the pair's R query rows of part 0 / part 1 (scaled), D floats each */
    const void *k, *v;          /* the pair's row 0 (kvtype elements) */
    long k_ts, v_ts;            /* row strides, elements */
    const int *rows;            /* T row indices (< 0: the new row), or NULL for row t */
    const void *k_new, *v_new;  /* the new row, kvtype elements (where rows has < 0) */
    const float *bias;          /* bias[(r % L) * bias_ls + t] for query row r of either part, or NULL */
    long bias_ls, L;
    long R, D, DV, T;
    int f16;
} pair_t;

#define PAIR_TB 16     /* key rows per block of the value pass */
#define PAIR_AHEAD 16  /* key rows the score pass fetches ahead */

#ifdef PHF_X86
__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x);

static inline const void *pair_row(const pair_t *p, const void *base, const void *fresh, long ts, long t) {
    long i = t;
    if (p->rows) {
        i = p->rows[t];
        if (i < 0) return fresh;
    }
    return p->f16 ? (const void *)((const uint16_t *)base + i * ts) : (const void *)((const float *)base + i * ts);
}

#define PAIR_LD8(base, i, f16)                                                                            \
    ((f16) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(base) + (i))))         \
           : _mm256_loadu_ps((const float *)(base) + (i)))

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void pair_attend_body(const pair_t *p,
                                                                                          float *scores,
                                                                                          float *out,
                                                                                          const int f16) {
    const long R = p->R, D = p->D, DV = p->DV, T = p->T, R2 = 2 * R, key_bytes = 2 * D * (f16 ? 2 : 4);
    /* scores: two key rows x two query rows per pass */
    for (long t = 0; t < T; t += 2) {
        const int two = t + 1 < T;
        const void *ka = pair_row(p, p->k, p->k_new, p->k_ts, t);
        const void *kb = two ? pair_row(p, p->k, p->k_new, p->k_ts, t + 1) : ka;
        if (t + PAIR_AHEAD + 1 < T) {                               /* key rows a few ahead */
            const char *pa = (const char *)pair_row(p, p->k, p->k_new, p->k_ts, t + PAIR_AHEAD);
            const char *pb = (const char *)pair_row(p, p->k, p->k_new, p->k_ts, t + PAIR_AHEAD + 1);
            for (long off = 0; off < key_bytes; off += 64) {
                _mm_prefetch(pa + off, _MM_HINT_T1);
                _mm_prefetch(pb + off, _MM_HINT_T1);
            }
        }
        for (int part = 0; part < 2; part++) {
            const float *qp = part ? p->q1 : p->q0;
            const long off = part * D;
            for (long r = 0; r < R; r += 2) {
                const long r1 = r + 1 < R ? r + 1 : r;
                const float *qa = qp + r * D, *qb = qp + r1 * D;
                __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps();
                __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
                for (long d = 0; d < D; d += 8) {
                    const __m256 x = PAIR_LD8(ka, off + d, f16), y = PAIR_LD8(kb, off + d, f16);
                    const __m256 u = _mm256_loadu_ps(qa + d), w = _mm256_loadu_ps(qb + d);
                    a00 = _mm256_fmadd_ps(u, x, a00);
                    a01 = _mm256_fmadd_ps(u, y, a01);
                    a10 = _mm256_fmadd_ps(w, x, a10);
                    a11 = _mm256_fmadd_ps(w, y, a11);
                }
                const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a00, a01), _mm256_hadd_ps(a10, a11));
                float s4[4];
                _mm_storeu_ps(s4, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
                float *sa = scores + (part * R + r) * T, *sb = scores + (part * R + r1) * T;
                const float *ba = p->bias ? p->bias + (r % p->L) * p->bias_ls : NULL;
                const float *bb = p->bias ? p->bias + (r1 % p->L) * p->bias_ls : NULL;
                sa[t] = s4[0] + (ba ? ba[t] : 0.0f);
                if (two) sa[t + 1] = s4[1] + (ba ? ba[t + 1] : 0.0f);
                if (r1 != r) {
                    sb[t] = s4[2] + (bb ? bb[t] : 0.0f);
                    if (two) sb[t + 1] = s4[3] + (bb ? bb[t + 1] : 0.0f);
                }
            }
        }
    }
    /* softmax per query row, normalised; a NaN score makes the row NaN (exp256 would clamp it away) */
    for (long i = 0; i < R2; i++) {
        float *sr = scores + i * T;
        long t = 0;
        float m = sr[0];
        int nan = 0;
        if (T >= 8) {
            __m256 mv = _mm256_loadu_ps(sr), un = _mm256_cmp_ps(mv, mv, _CMP_UNORD_Q);
            for (t = 8; t + 8 <= T; t += 8) {
                const __m256 x = _mm256_loadu_ps(sr + t);
                mv = _mm256_max_ps(mv, x);
                un = _mm256_or_ps(un, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            }
            __m128 hm = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
            hm = _mm_max_ps(hm, _mm_movehl_ps(hm, hm));
            hm = _mm_max_ss(hm, _mm_movehdup_ps(hm));
            m = _mm_cvtss_f32(hm);
            nan = _mm256_movemask_ps(un) != 0;
        }
        for (; t < T; t++) {
            m = sr[t] > m ? sr[t] : m;
            nan |= sr[t] != sr[t];
        }
        const __m256 mv = _mm256_set1_ps(m);
        __m256 sv = _mm256_setzero_ps();
        for (t = 0; t + 8 <= T; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + t), mv));
            _mm256_storeu_ps(sr + t, e);
            sv = _mm256_add_ps(sv, e);
        }
        float sum = hsum256(sv);
        for (; t < T; t++) {
            sr[t] = expf(sr[t] - m);
            sum += sr[t];
        }
        if (nan) sum = NAN;
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (t = 0; t + 8 <= T; t += 8) _mm256_storeu_ps(sr + t, _mm256_mul_ps(_mm256_loadu_ps(sr + t), inv));
        for (; t < T; t++) sr[t] *= 1.0f / sum;
    }
    /* values: blocks of PAIR_TB key rows; per 16 columns, up to four query rows in registers */
    memset(out, 0, sizeof(float) * (size_t)(R2 * DV));
    const void *vrow[PAIR_TB];
    const long row_bytes = DV * (f16 ? 2 : 4);
    for (long t0 = 0; t0 < T; t0 += PAIR_TB) {
        const long tb = T - t0 < PAIR_TB ? T - t0 : PAIR_TB;
        for (long j = 0; j < tb; j++) vrow[j] = pair_row(p, p->v, p->v_new, p->v_ts, t0 + j);
        /* the strips below walk the block column-wise: fetch the next block's rows meanwhile, in order */
        for (long j = t0 + PAIR_TB; j < t0 + 2 * PAIR_TB && j < T; j++) {
            const char *row = (const char *)pair_row(p, p->v, p->v_new, p->v_ts, j);
            for (long off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
        }
        for (long i = 0; i < R2; i += 4) {
            const long n = R2 - i < 4 ? R2 - i : 4;
            const float *p0 = scores + i * T + t0;
            const float *p1 = scores + (i + (n > 1 ? 1 : 0)) * T + t0;
            const float *p2 = scores + (i + (n > 2 ? 2 : 0)) * T + t0;
            const float *p3 = scores + (i + (n > 3 ? 3 : 0)) * T + t0;
            for (long c = 0; c < DV; c += 16) {
                float *o0 = out + i * DV + c;
                __m256 c00 = _mm256_loadu_ps(o0), c01 = _mm256_loadu_ps(o0 + 8);
                __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
                __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
                __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
                if (n > 1) c10 = _mm256_loadu_ps(o0 + DV), c11 = _mm256_loadu_ps(o0 + DV + 8);
                if (n > 2) c20 = _mm256_loadu_ps(o0 + 2 * DV), c21 = _mm256_loadu_ps(o0 + 2 * DV + 8);
                if (n > 3) c30 = _mm256_loadu_ps(o0 + 3 * DV), c31 = _mm256_loadu_ps(o0 + 3 * DV + 8);
                for (long j = 0; j < tb; j++) {
                    const __m256 v0 = PAIR_LD8(vrow[j], c, f16), v1 = PAIR_LD8(vrow[j], c + 8, f16);
                    __m256 w = _mm256_broadcast_ss(p0 + j);
                    c00 = _mm256_fmadd_ps(w, v0, c00);
                    c01 = _mm256_fmadd_ps(w, v1, c01);
                    w = _mm256_broadcast_ss(p1 + j);
                    c10 = _mm256_fmadd_ps(w, v0, c10);
                    c11 = _mm256_fmadd_ps(w, v1, c11);
                    w = _mm256_broadcast_ss(p2 + j);
                    c20 = _mm256_fmadd_ps(w, v0, c20);
                    c21 = _mm256_fmadd_ps(w, v1, c21);
                    w = _mm256_broadcast_ss(p3 + j);
                    c30 = _mm256_fmadd_ps(w, v0, c30);
                    c31 = _mm256_fmadd_ps(w, v1, c31);
                }
                _mm256_storeu_ps(o0, c00);
                _mm256_storeu_ps(o0 + 8, c01);
                if (n > 1) _mm256_storeu_ps(o0 + DV, c10), _mm256_storeu_ps(o0 + DV + 8, c11);
                if (n > 2) _mm256_storeu_ps(o0 + 2 * DV, c20), _mm256_storeu_ps(o0 + 2 * DV + 8, c21);
                if (n > 3) _mm256_storeu_ps(o0 + 3 * DV, c30), _mm256_storeu_ps(o0 + 3 * DV + 8, c31);
            }
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void pair_attend_avx2(const pair_t *p, float *scores, float *out) {
    if (p->f16)
        pair_attend_body(p, scores, out, 1);
    else
        pair_attend_body(p, scores, out, 0);
}
#undef PAIR_LD8
#endif

/* 1 if pair_attend applies to these sizes with this SIMD switch (the CPU has AVX2, FMA and F16C). */
static int pair_attend_ok(int simd, long D, long DV) {
    return simd && D % 8 == 0 && DV % 16 == 0 && phf_f16c();
}

/* scores: 2R x T scratch; out: 2R x DV. Only where pair_attend_ok. */
static void pair_attend(const pair_t *p, float *scores, float *out) {
#ifdef PHF_X86
    pair_attend_avx2(p, scores, out);
#else
    (void)p, (void)scores, (void)out;
#endif
}

static void attend_share(void *arg, int share) {
    attend_t *a = (attend_t *)arg;
    const long half = a->nkv / 2, rows = 2 * a->R, units = a->B * half;
    (void)share;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(rows * a->T));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(rows * a->DV));
    if (!scores || !acc) {
        free(scores);
        free(acc);
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELEASE);
        return;
    }
    kv_dot_fn dot;
    kv_axpy_fn axpy;
    kv_kernels(a->kvtype, a->use_avx2, &dot, &axpy);
    const int blocked = pair_attend_ok(a->use_avx2, a->D, a->DV) && a->k_ps == a->D; /* part 1 after part 0 */
    for (long u; (u = next_chunk(&a->next)) < units;) {
        const long b = u / half, h = u % half;
        if (blocked) {
            const int f16 = a->kvtype == PHF_SD_F16;
            const long k0 = b * a->k_bs + h * a->k_hs, v0 = b * a->v_bs + h * a->v_hs;
            pair_t p = {a->q + b * a->q_bs + h * a->q_hs, a->q + b * a->q_bs + (h + half) * a->q_hs,
                        phf_sd_at(a->k, k0, a->kvtype), phf_sd_at(a->v, v0, a->kvtype), a->k_ts, a->v_ts, NULL,
                        NULL, NULL, a->bias ? a->bias + b * a->bias_bs : NULL, a->bias_ls, a->L, a->R, a->D, a->DV,
                        a->T, f16};
            pair_attend(&p, scores, a->out + u * rows * a->DV);
            continue;
        }
        /* scores: one pass over the pair's key rows, both heads of a row while it is in cache */
        const long kh = b * a->k_bs + h * a->k_hs;
        for (long t = 0; t < a->T; t++) {
            for (int part = 0; part < 2; part++) {
                const float *qj = a->q + b * a->q_bs + (h + part * half) * a->q_hs;
                const void *kt = phf_sd_at(a->k, kh + t * a->k_ts + part * a->k_ps, a->kvtype);
                for (long r = 0; r < a->R; r++) {
                    float sc = dot(qj + r * a->D, kt, a->D);
                    if (a->bias) sc += a->bias[b * a->bias_bs + (r % a->L) * a->bias_ls + t];
                    scores[(part * a->R + r) * a->T + t] = sc;
                }
            }
        }
        for (long row = 0; row < rows; row++) {
            float *o = acc + row * a->DV;
            for (long d = 0; d < a->DV; d++) o[d] = 0.0f;
            /* normalise the probabilities now: the value pass then only accumulates */
            softmax_row(scores + row * a->T, a->T);
        }
        const long vh = b * a->v_bs + h * a->v_hs;               /* values: read once for all rows */
        for (long t = 0; t < a->T; t++) {
            const void *vt = phf_sd_at(a->v, vh + t * a->v_ts, a->kvtype);
            for (long row = 0; row < rows; row++) axpy(acc + row * a->DV, scores[row * a->T + t], vt, a->DV);
        }
        float *out = a->out + u * rows * a->DV;
        memcpy(out, acc, sizeof(float) * (size_t)(rows * a->DV));
    }
    free(scores);
    free(acc);
}

/*
 * See the block comment above. Strides are in elements (of q and bias: floats; of k and v: kvtype's).
 * kvtype: PHF_SD_F32 or PHF_SD_F16 for both k and v. Returns 0, or -1 for a bad size or dtype code or
 * when scratch memory could not be had (the output is then incomplete).
 */
PHF_EXPORT int phf_attend(const float *q, long q_bs, long q_hs, const void *k, long k_bs, long k_hs,
                          long k_ps, long k_ts, const void *v, long v_bs, long v_hs, long v_ts,
                          const float *bias, long bias_bs, long bias_ls, float *out, long B, long nkv,
                          long R, long L, long D, long DV, long T, int threads, int simd, int kvtype) {
    if (B <= 0 || nkv < 2 || nkv % 2 || R <= 0 || L <= 0 || D <= 0 || DV <= 0 || T <= 0) return -1;
    if (kvtype != PHF_SD_F32 && kvtype != PHF_SD_F16) return -1;
    attend_t a = {q, q_bs, q_hs, k, k_bs, k_hs, k_ps, k_ts, v, v_bs, v_hs, v_ts, bias, bias_bs, bias_ls, out,
                  B, nkv, R, L, D, DV, T, 1, simd && phf_simd(), kvtype, 0, 0};
    long units = B * (nkv / 2);
    if (threads < 1 || T * nkv * D < (1L << 16)) threads = 1;   /* short caches: not worth waking */
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = (int)units;
    a.shares = threads;
    run_shares(attend_share, &a, threads);
    return a.failed ? -1 : 0;
}

/* ---- the Mamba selective scan after x_proj (CPU decode and prefill) ---------------------------
 *
 * For L tokens of b sequences, per channel d of d_inner and token t in order (SAMBAY.md 4.5, 6-9):
 *
 *   delta = softplus(w_dt[d] . dt_t + b_dt[d])          (dt_proj and mamba_ssm's softplus, threshold 20)
 *   s[d, i] = exp(delta * A[d, i]) * s[d, i] + delta * u_t[d] * B_t[i]
 *   y_t[d] = sum_i s[d, i] * C_t[i] + D[d] * u_t[d]    (times z_t[d] * sigmoid(z_t[d]) when z is given)
 *
 * with dt_t, B_t, C_t the R, N and N columns of x_proj's output for token t. In MLX ops this is a
 * float32 GEMM on the BLAS, (L x d_inner x N) intermediates and, per token, a few single-threaded
 * element-wise passes; here the state of a channel stays in L1 for all L tokens and the channels
 * are split over the pool. The final state goes to `state_out` (may equal `state`). */

/* ---- exp on 8 lanes (Cephes' single-precision polynomial; relative error ~2e-7) --------------- */
#ifdef PHF_X86
__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* s = exp(delta * A) * s + du * B over n (a multiple of 8) lanes; returns s . C */
__attribute__((target("avx2,fma"))) static float ssm_lanes_avx2(float *s, const float *A, const float *B,
                                                                const float *C, float delta, float du, long n) {
    const __m256 dv = _mm256_set1_ps(delta), uv = _mm256_set1_ps(du);
    __m256 acc = _mm256_setzero_ps();
    for (long i = 0; i < n; i += 8) {
        __m256 st = _mm256_loadu_ps(s + i);
        st = _mm256_fmadd_ps(exp256(_mm256_mul_ps(dv, _mm256_loadu_ps(A + i))), st,
                             _mm256_mul_ps(uv, _mm256_loadu_ps(B + i)));
        _mm256_storeu_ps(s + i, st);
        acc = _mm256_fmadd_ps(st, _mm256_loadu_ps(C + i), acc);
    }
    return hsum256(acc);
}
#endif

static float ssm_lanes_portable(float *s, const float *A, const float *B, const float *C, float delta, float du,
                                long n) {
    float y = 0.0f;
    for (long i = 0; i < n; i++) {
        s[i] = expf(delta * A[i]) * s[i] + du * B[i];
        y += s[i] * C[i];
    }
    return y;
}


#define SSM_MAX_N 256

typedef struct {
    const float *u, *dbc, *z, *w_dt, *b_dt, *A, *D, *state;
    float *y, *state_out;
    long B, L, Di, R, N;
    int shares;
    long next; /* the next chunk of SSM_CHUNK channels to take */
    int use_avx2;
} ssm_t;

#define SSM_CHUNK 128

static inline float softplus20(float x) { return x <= 20.0f ? log1pf(expf(x)) : x; }

static void ssm_share(void *arg, int share) {
    ssm_t *a = (ssm_t *)arg;
    const long units = a->B * a->Di, width = a->R + 2 * a->N, chunks = (units + SSM_CHUNK - 1) / SSM_CHUNK;
    float s[SSM_MAX_N];
    (void)share;
    for (long c; (c = next_chunk(&a->next)) < chunks;)
    for (long unit = c * SSM_CHUNK; unit < units && unit < (c + 1) * SSM_CHUNK; unit++) {
        const long b = unit / a->Di, d = unit % a->Di;
        const float *w = a->w_dt + d * a->R, *Ad = a->A + d * a->N;
        memcpy(s, a->state + (b * a->Di + d) * a->N, sizeof(float) * (size_t)a->N);
        for (long t = 0; t < a->L; t++) {
            const long row = b * a->L + t;
            const float *dt = a->dbc + row * width, *Bv = dt + a->R, *Cv = Bv + a->N;
            float acc, y;
#ifdef PHF_X86
            acc = a->use_avx2 ? dot_avx2(w, dt, a->R) : dot_portable(w, dt, a->R);
#else
            acc = dot_portable(w, dt, a->R);
#endif
            if (a->b_dt) acc += a->b_dt[d];
            const float delta = softplus20(acc), ud = a->u[row * a->Di + d], du = delta * ud;
#ifdef PHF_X86
            if (a->use_avx2 && a->N % 8 == 0)
                y = ssm_lanes_avx2(s, Ad, Bv, Cv, delta, du, a->N);
            else
#endif
                y = ssm_lanes_portable(s, Ad, Bv, Cv, delta, du, a->N);
            y += a->D[d] * ud;
            if (a->z) {
                const float z = a->z[row * a->Di + d];
                y = y * z * (1.0f / (1.0f + expf(-z)));
            }
            a->y[row * a->Di + d] = y;
        }
        memcpy(a->state_out + (b * a->Di + d) * a->N, s, sizeof(float) * (size_t)a->N);
    }
}

/*
 * u, z, y: [B, L, Di]; dbc: [B, L, R + 2N] (x_proj's output: dt | B | C); w_dt: [Di, R]; b_dt: [Di] or
 * NULL; A: [Di, N] (= -exp(A_log)); D: [Di]; state, state_out: [B, Di, N]; z NULL for no gate. All
 * contiguous float32. Returns 0, or -1 for a bad shape (N above SSM_MAX_N included).
 */
PHF_EXPORT int phf_ssm_scan(const float *u, const float *dbc, const float *z, const float *w_dt, const float *b_dt,
                            const float *A, const float *D, const float *state, float *y, float *state_out, long B,
                            long L, long Di, long R, long N, int threads) {
    if (B <= 0 || L <= 0 || Di <= 0 || R <= 0 || N <= 0 || N > SSM_MAX_N) return -1;
    ssm_t a = {u, dbc, z, w_dt, b_dt, A, D, state, y, state_out, B, L, Di, R, N, 1, 0, phf_simd()};
    if (threads < 1 || B * L * Di * N < (1L << 14)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    a.shares = threads;
    run_shares(ssm_share, &a, threads);
    return 0;
}

/* ---- products with int8-quantized activations (q8.c) and fused decode steps (fused.c) ---------
 * Separate files for readability; they are part of this translation unit and use its thread pool. */
#include "q8.c"
#include "q8_gemm.c"
#include "attn_decode.c"
#include "fused.c"
#include "attn_prefill.c"
