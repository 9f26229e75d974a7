/*
 * The AdamMini/Eve update of fp32 tensors whose second moment is shared within rows, for CPUs.
 *
 * One call updates a list of row ranges ("items", usually slices of several tensors). For every
 * row r of an item, with g the row of the gradient and n its block size:
 *
 *     v[r]  <- beta2 * v[r] + (1 - beta2) * sum(g^2) / n       (skipped when row_denom is given)
 *     s     <- -step_size / (sqrt(v[r]) / bias_correction2_sqrt + eps)
 *     m     <- m + (1 - beta1) * (g - m)
 *     p     <- p * decay + s * m
 *
 * The row of g is read twice, but the second read hits the L1/L2 cache: memory sees one pass over
 * p, g and m (20 bytes per parameter) against AdamW's 28. When an item has row_denom (blocks that
 * span several rows, or block means reduced across ranks), the caller has updated v already and
 * s uses row_denom[r] = sqrt(v_hat) + eps instead.
 *
 * Plain C99 with `#pragma omp simd` (compile with -fopenmp-simd; no OpenMP runtime is used). The
 * caller splits the rows between threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

int64_t lowmem_block_adam_rows_abi(void) { return 1; }

static float row_sum_sq(const float *g, int64_t cols) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) {
        acc += g[j] * g[j];
    }
    return acc;
}

static void row_update(float *p, const float *g, float *m, int64_t cols, float decay, float scale,
                       float one_minus_beta1, float grad_sign) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
        float m_new = m[j] + one_minus_beta1 * (grad_sign * g[j] - m[j]);
        m[j] = m_new;
        p[j] = p[j] * decay + scale * m_new;
    }
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
    const float *block_numels,
    float decay,
    float step_size,
    float bias_correction2_sqrt,
    float beta1,
    float beta2,
    float eps,
    int32_t maximize) {
    const float grad_sign = maximize ? -1.0f : 1.0f;
    for (int64_t item = 0; item < n_items; ++item) {
        const int64_t cols = n_cols[item];
        const float *denom = row_denoms[item];
        float *v = exp_avg_sqs[item];
        for (int64_t r = 0; r < n_rows[item]; ++r) {
            const int64_t offset = r * cols;
            const float *g = grads[item] + offset;
            float row_denom;
            if (denom != NULL) {
                row_denom = denom[r];
            } else {
                float mean_sq = row_sum_sq(g, cols) / block_numels[item];
                v[r] = beta2 * v[r] + (1.0f - beta2) * mean_sq;
                row_denom = sqrtf(v[r]) / bias_correction2_sqrt + eps;
            }
            row_update(params[item] + offset, g, exp_avgs[item] + offset, cols, decay,
                       -step_size / row_denom, 1.0f - beta1, grad_sign);
        }
    }
}
