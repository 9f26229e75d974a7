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
 * Plain C99 with `#pragma omp simd` (compile with -fopenmp-simd; no OpenMP runtime is used): the
 * caller splits the work between threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

int64_t lowmem_block_adam_rows_abi(void) { return 2; }

typedef struct {
    float decay, step_size, bias_correction2_sqrt, beta1, beta2, eps, grad_sign;
} hparams;

static float sum_sq(const float *g, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
        acc += g[j] * g[j];
    }
    return acc;
}

static void update_with_scale(float *p, const float *g, float *m, int64_t n, float scale, const hparams *h) {
    const float one_minus_beta1 = 1.0f - h->beta1;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float m_new = m[j] + one_minus_beta1 * (h->grad_sign * g[j] - m[j]);
        m[j] = m_new;
        p[j] = p[j] * h->decay + scale * m_new;
    }
}

static void update_elementwise(float *p, const float *g, float *m, float *v, int64_t n, const hparams *h) {
    const float one_minus_beta1 = 1.0f - h->beta1, one_minus_beta2 = 1.0f - h->beta2;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float grad = h->grad_sign * g[j];
        float m_new = m[j] + one_minus_beta1 * (grad - m[j]);
        float v_new = h->beta2 * v[j] + one_minus_beta2 * g[j] * g[j];
        m[j] = m_new;
        v[j] = v_new;
        p[j] = p[j] * h->decay - h->step_size * m_new / (sqrtf(v_new) / h->bias_correction2_sqrt + h->eps);
    }
}

static float block_scale(float *v, float mean_sq, const hparams *h) {
    *v = h->beta2 * *v + (1.0f - h->beta2) * mean_sq;
    return -h->step_size / (sqrtf(*v) / h->bias_correction2_sqrt + h->eps);
}

void lowmem_block_adam_rows(
    int64_t n_items,
    float *const *params,
    const float *const *grads,
    float *const *exp_avgs,
    float *const *exp_avg_sqs,
    const float *const *row_denoms,
    const int64_t *n_rows,
    const int64_t *n_cols,
    const int64_t *rows_per_block,
    float decay,
    float step_size,
    float bias_correction2_sqrt,
    float beta1,
    float beta2,
    float eps,
    int32_t maximize) {
    const hparams h = {decay, step_size, bias_correction2_sqrt, beta1, beta2, eps, maximize ? -1.0f : 1.0f};
    for (int64_t item = 0; item < n_items; ++item) {
        float *p = params[item], *m = exp_avgs[item], *v = exp_avg_sqs[item];
        const float *g = grads[item], *denom = row_denoms[item];
        const int64_t cols = n_cols[item], k = rows_per_block[item];
        if (k == 0) {
            update_elementwise(p, g, m, v, n_rows[item] * cols, &h);
            continue;
        }
        const int64_t block = k * cols;
        for (int64_t b = 0; b * k < n_rows[item]; ++b) {
            const int64_t offset = b * block;
            float scale = denom != NULL ? -step_size / denom[b]
                                        : block_scale(&v[b], sum_sq(g + offset, block) / (float)block, &h);
            update_with_scale(p + offset, g + offset, m + offset, block, scale, &h);
        }
    }
}
