/*
 * blas_shim.c - route MLX's CPU GEMMs to an optimized BLAS on Linux.
 *
 * MLX's Linux CPU library (libmlx.so) resolves exactly three BLAS entry points
 * by their plain CBLAS names: cblas_sgemm, cblas_dgemm and cblas_cgemm. It is
 * linked against the reference (netlib) BLAS, which is one to two orders of
 * magnitude slower than an optimized one.
 *
 * This small library exports those three names with the standard CBLAS
 * signatures (32-bit integer arguments) and forwards every call to a "target"
 * BLAS that is opened at run time with dlopen(). The usual target is the
 * OpenBLAS that numpy's wheels bundle, whose symbols are prefixed and use
 * 64-bit integers (e.g. scipy_cblas_sgemm64_); the shim widens the integer
 * arguments as needed.
 *
 * Python (phiflash_mlx/_blas.py) loads this file with RTLD_LOCAL, calls
 * phiflash_blas_init(path) and, only if that succeeds, promotes it to
 * RTLD_GLOBAL before mlx.core is imported, so that the dynamic linker binds
 * libmlx.so's references to the functions below.
 *
 * No BLAS headers are needed: the CBLAS enums are passed through as ints,
 * which is what they are at the ABI level.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PHIFLASH_EXPORT __attribute__((visibility("default")))

/* Target signatures, with 32-bit ("lp") and 64-bit ("ilp") integers. */
typedef void (*sgemm_lp_t)(int, int, int, int32_t, int32_t, int32_t, float,
                           const float *, int32_t, const float *, int32_t,
                           float, float *, int32_t);
typedef void (*sgemm_ilp_t)(int, int, int, int64_t, int64_t, int64_t, float,
                            const float *, int64_t, const float *, int64_t,
                            float, float *, int64_t);
typedef void (*dgemm_lp_t)(int, int, int, int32_t, int32_t, int32_t, double,
                           const double *, int32_t, const double *, int32_t,
                           double, double *, int32_t);
typedef void (*dgemm_ilp_t)(int, int, int, int64_t, int64_t, int64_t, double,
                            const double *, int64_t, const double *, int64_t,
                            double, double *, int64_t);
typedef void (*cgemm_lp_t)(int, int, int, int32_t, int32_t, int32_t,
                           const void *, const void *, int32_t, const void *,
                           int32_t, const void *, void *, int32_t);
typedef void (*cgemm_ilp_t)(int, int, int, int64_t, int64_t, int64_t,
                            const void *, const void *, int64_t, const void *,
                            int64_t, const void *, void *, int64_t);

/* Naming schemes tried in order: printf pattern for the routine name, and
 * whether that scheme uses 64-bit integers. */
static const struct {
    const char *pattern;
    int ilp64;
} schemes[] = {
    {"scipy_cblas_%s64_", 1}, /* numpy >= 2 wheels, scipy-openblas64 */
    {"cblas_%s64_", 1},       /* numpy 1.2x wheels, OpenBLAS INTERFACE64 + suffix */
    {"scipy_cblas_%s", 0},    /* scipy-openblas32 */
    {"cblas_%s", 0},          /* plain CBLAS: system OpenBLAS, MKL, BLIS */
};

static void *target_handle = NULL;
static int target_ilp64 = 0;
static void *p_sgemm = NULL;
static void *p_dgemm = NULL;
static void *p_cgemm = NULL;
static char symbol_name[64] = "";
static char error_text[512] = "";
static unsigned long long n_calls = 0;

static void count_call(void) {
    __atomic_fetch_add(&n_calls, 1ULL, __ATOMIC_RELAXED);
}

/* Reached only if MLX calls before a successful init, which _blas.py never
 * allows (the shim is made global only after init succeeded). */
static void not_ready(const char *name) {
    fprintf(stderr,
            "phiflash_mlx blas_shim: %s called before phiflash_blas_init "
            "succeeded; aborting\n",
            name);
    abort();
}

/*
 * Open the BLAS at `path` and bind sgemm, dgemm and cgemm from the first
 * naming scheme that provides all three. Returns 0 on success, -1 if the
 * library cannot be opened, -2 if it lacks the routines, -3 if a different
 * target was already bound. Calling it again with the same path is a no-op.
 */
PHIFLASH_EXPORT int phiflash_blas_init(const char *path) {
    if (target_handle != NULL) {
        return 0;
    }
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        const char *err = dlerror();
        snprintf(error_text, sizeof error_text, "dlopen failed: %s",
                 err ? err : "unknown error");
        return -1;
    }
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; ++i) {
        char s[64], d[64], c[64];
        snprintf(s, sizeof s, schemes[i].pattern, "sgemm");
        snprintf(d, sizeof d, schemes[i].pattern, "dgemm");
        snprintf(c, sizeof c, schemes[i].pattern, "cgemm");
        void *ps = dlsym(handle, s);
        void *pd = dlsym(handle, d);
        void *pc = dlsym(handle, c);
        if (ps == NULL || pd == NULL || pc == NULL) {
            continue;
        }
        /* A plain-named target that resolves to this shim would recurse. */
        Dl_info self_info, other_info;
        if (dladdr(ps, &other_info) != 0 &&
            dladdr((void *)&phiflash_blas_init, &self_info) != 0 &&
            other_info.dli_fbase == self_info.dli_fbase) {
            continue;
        }
        target_ilp64 = schemes[i].ilp64;
        p_sgemm = ps;
        p_dgemm = pd;
        p_cgemm = pc;
        snprintf(symbol_name, sizeof symbol_name, "%s", s);
        __atomic_store_n(&target_handle, handle, __ATOMIC_RELEASE);
        error_text[0] = '\0';
        return 0;
    }
    snprintf(error_text, sizeof error_text,
             "%s exports no sgemm/dgemm/cgemm under a known CBLAS name", path);
    dlclose(handle);
    return -2;
}

/* Name of the target sgemm symbol ("" before a successful init). */
PHIFLASH_EXPORT const char *phiflash_blas_symbol(void) { return symbol_name; }

/* 1 if the target takes 64-bit integers, 0 otherwise. */
PHIFLASH_EXPORT int phiflash_blas_ilp64(void) { return target_ilp64; }

/* Why the last init failed ("" if it did not). */
PHIFLASH_EXPORT const char *phiflash_blas_error(void) { return error_text; }

/* How many GEMM calls were forwarded so far (all three routines). */
PHIFLASH_EXPORT unsigned long long phiflash_blas_calls(void) {
    return __atomic_load_n(&n_calls, __ATOMIC_RELAXED);
}

PHIFLASH_EXPORT void cblas_sgemm(int order, int ta, int tb, int m, int n, int k,
                                 float alpha, const float *a, int lda,
                                 const float *b, int ldb, float beta, float *c,
                                 int ldc) {
    if (p_sgemm == NULL) not_ready("cblas_sgemm");
    count_call();
    if (target_ilp64) {
        ((sgemm_ilp_t)p_sgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                               beta, c, ldc);
    } else {
        ((sgemm_lp_t)p_sgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                              beta, c, ldc);
    }
}

PHIFLASH_EXPORT void cblas_dgemm(int order, int ta, int tb, int m, int n, int k,
                                 double alpha, const double *a, int lda,
                                 const double *b, int ldb, double beta,
                                 double *c, int ldc) {
    if (p_dgemm == NULL) not_ready("cblas_dgemm");
    count_call();
    if (target_ilp64) {
        ((dgemm_ilp_t)p_dgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                               beta, c, ldc);
    } else {
        ((dgemm_lp_t)p_dgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                              beta, c, ldc);
    }
}

PHIFLASH_EXPORT void cblas_cgemm(int order, int ta, int tb, int m, int n, int k,
                                 const void *alpha, const void *a, int lda,
                                 const void *b, int ldb, const void *beta,
                                 void *c, int ldc) {
    if (p_cgemm == NULL) not_ready("cblas_cgemm");
    count_call();
    if (target_ilp64) {
        ((cgemm_ilp_t)p_cgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                               beta, c, ldc);
    } else {
        ((cgemm_lp_t)p_cgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                              beta, c, ldc);
    }
}
