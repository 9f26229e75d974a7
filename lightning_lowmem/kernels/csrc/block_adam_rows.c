/*
 * The AdamMini/Eve update of fp32 tensors for CPUs: one call updates a list of items (tensors, or
 * slices of rows of tensors) of three kinds.
 *
 * Blocks of k consecutive rows (k = rows_per_block >= 1: a row, a head, a whole tensor), with g the
 * block's gradient and n its entry count:
 *
 *     v[b]  <- beta2 * v[b] + (1 - beta2) * sum(g^2) / n
 *     s     <- -step_size / (sqrt(v[b]) / bias_correction2_sqrt + eps)
 *     m     <- m + (1 - beta1) * (g - m)
 *     p     <- p * decay + s * m
 *
 * The block's gradient is read twice (sum, then update), but a row or a head stays in the L1/L2
 * cache in between: memory sees one pass over p, g and m, 20 bytes per parameter against AdamW's 28.
 *
 * Given denominators (row_denom != NULL, k = 1): the caller has updated the second moments (block
 * means reduced across ranks) and s uses row_denom[r] = sqrt(v_hat) + eps.
 *
 * Elementwise (k = 0): AdamW, v has the shape of p.
 *
 * Transposed rows (row_stride > 0, GPT-2's Conv1D): the rows are columns of a row-major matrix
 * whose rows are row_stride apart. Column sums need the whole gradient first, so g is read twice
 * from memory (24 bytes per parameter); the loops still run along memory.
 *
 * Plain C99 with `#pragma omp simd` (compile with -fopenmp-simd; no OpenMP runtime is used): the
 * caller splits the work between threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int64_t lowmem_block_adam_rows_abi(void) { return 4; }

typedef struct {
    /* 1 - beta1 and 1 - beta2 come computed in double: 1 - (float)0.999 is 1.3e-5 off */
    float decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, grad_sign;
} hparams;

/* sum(g^2) over n entries: fp32 vector sums of chunks of 4096 entries, added up in fp64, so that a
 * block of a whole large tensor is summed about as accurately as torch.sum does. */
static double sum_sq(const float *g, int64_t n) {
    double total = 0.0;
    for (int64_t start = 0; start < n; start += 4096) {
        const int64_t stop = start + 4096 < n ? start + 4096 : n;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = start; j < stop; ++j) {
            acc += g[j] * g[j];
        }
        total += acc;
    }
    return total;
}

static void update_with_scale(float *p, const float *g, float *m, int64_t n, float scale, const hparams *h) {
    const float one_minus_beta1 = h->one_minus_beta1, sign = h->grad_sign, decay = h->decay;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float m_new = m[j] + one_minus_beta1 * (sign * g[j] - m[j]);
        m[j] = m_new;
        p[j] = p[j] * decay + scale * m_new;
    }
}

static void update_elementwise(float *p, const float *g, float *m, float *v, int64_t n, const hparams *h) {
    const float one_minus_beta1 = h->one_minus_beta1, beta2 = h->beta2, one_minus_beta2 = h->one_minus_beta2;
    const float sign = h->grad_sign, decay = h->decay, step_size = h->step_size;
    const float bias_correction2_sqrt = h->bias_correction2_sqrt, eps = h->eps;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float m_new = m[j] + one_minus_beta1 * (sign * g[j] - m[j]);
        float v_new = beta2 * v[j] + one_minus_beta2 * g[j] * g[j];
        m[j] = m_new;
        v[j] = v_new;
        p[j] = p[j] * decay - step_size * m_new / (sqrtf(v_new) / bias_correction2_sqrt + eps);
    }
}

static float block_scale(float *v, float mean_sq, const hparams *h) {
    *v = h->beta2 * *v + h->one_minus_beta2 * mean_sq;
    return -h->step_size / (sqrtf(*v) / h->bias_correction2_sqrt + h->eps);
}

static void update_with_scales(float *p, const float *g, float *m, int64_t n, const float *scales, const hparams *h) {
    const float one_minus_beta1 = h->one_minus_beta1, sign = h->grad_sign, decay = h->decay;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float m_new = m[j] + one_minus_beta1 * (sign * g[j] - m[j]);
        m[j] = m_new;
        p[j] = p[j] * decay + scales[j] * m_new;
    }
}

/* Rows that are the n_rows columns of a n_cols x row_stride row-major matrix, k per block.
 * Returns 0, or -1 if the scratch row cannot be allocated. */
static int update_transposed(float *p, const float *g, float *m, float *v, const float *denom, int64_t n_rows,
                             int64_t n_cols, int64_t row_stride, int64_t k, const hparams *h) {
    float *scales = malloc((size_t)n_rows * sizeof(float));
    if (scales == NULL) return -1;
    if (denom != NULL) {
        for (int64_t r = 0; r < n_rows; ++r) scales[r] = -h->step_size / denom[r];
    } else {
        for (int64_t r = 0; r < n_rows; ++r) scales[r] = 0.0f;
        int64_t i = 0;
        for (; i + 4 <= n_cols; i += 4) { /* four matrix rows per sweep: four read streams, a quarter of the scratch traffic */
            const float *g0 = g + i * row_stride, *g1 = g0 + row_stride, *g2 = g1 + row_stride, *g3 = g2 + row_stride;
#pragma omp simd
            for (int64_t r = 0; r < n_rows; ++r) scales[r] += (g0[r] * g0[r] + g1[r] * g1[r]) + (g2[r] * g2[r] + g3[r] * g3[r]);
        }
        for (; i < n_cols; ++i) {
            const float *g_i = g + i * row_stride;
#pragma omp simd
            for (int64_t r = 0; r < n_rows; ++r) scales[r] += g_i[r] * g_i[r];
        }
        for (int64_t b = 0; b * k < n_rows; ++b) {
            double block_sum = 0.0;
            for (int64_t r = b * k; r < (b + 1) * k; ++r) block_sum += scales[r];
            float scale = block_scale(&v[b], (float)(block_sum / (double)(k * n_cols)), h);
            for (int64_t r = b * k; r < (b + 1) * k; ++r) scales[r] = scale;
        }
    }
    for (int64_t i = 0; i < n_cols; ++i) {
        update_with_scales(p + i * row_stride, g + i * row_stride, m + i * row_stride, n_rows, scales, h);
    }
    free(scales);
    return 0;
}

/* Returns 0, or -1 if a transposed item could not allocate its scratch row. */
int32_t lowmem_block_adam_rows(
    int64_t n_items,
    float *const *params,
    const float *const *grads,
    float *const *exp_avgs,
    float *const *exp_avg_sqs,
    const float *const *row_denoms,
    const int64_t *n_rows,
    const int64_t *n_cols,
    const int64_t *rows_per_block,
    const int64_t *row_strides,
    float decay,
    float step_size,
    float bias_correction2_sqrt,
    float one_minus_beta1,
    float beta2,
    float one_minus_beta2,
    float eps,
    int32_t maximize) {
    const hparams h = {decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                       maximize ? -1.0f : 1.0f};
    for (int64_t item = 0; item < n_items; ++item) {
        float *p = params[item], *m = exp_avgs[item], *v = exp_avg_sqs[item];
        const float *g = grads[item], *denom = row_denoms[item];
        const int64_t cols = n_cols[item], k = rows_per_block[item];
        if (row_strides[item] > 0) {
            if (update_transposed(p, g, m, v, denom, n_rows[item], cols, row_strides[item], k, &h) != 0) return -1;
            continue;
        }
        if (k == 0) {
            update_elementwise(p, g, m, v, n_rows[item] * cols, &h);
            continue;
        }
        const int64_t block = k * cols;
        for (int64_t b = 0; b * k < n_rows[item]; ++b) {
            const int64_t offset = b * block;
            float scale = denom != NULL ? -step_size / denom[b]
                                        : block_scale(&v[b], (float)(sum_sq(g + offset, block) / (double)block), &h);
            update_with_scale(p + offset, g + offset, m + offset, block, scale, &h);
        }
    }
    return 0;
}
