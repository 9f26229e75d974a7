/*
 * The AdamMini/Eve update of fp32 parameters whose momentum m is stored as bf16 values or as
 * blockwise int8/int4 codes, for CPUs: one pass over p, g and the codes per step.
 *
 * For each quantization block (qblock consecutive entries of one row; the last one of a row may be
 * shorter) the kernel decodes m into a scratch block (int8: inside the update loop), updates
 *
 *     m <- m + (1 - beta1) * (g - m)
 *     p <- p * decay + s * m                       (s = -step_size / (sqrt(v_hat) + eps))
 *
 * and encodes the block again: int8 codes q = floor(m * 127 / absmax + 127.5) - 127 with scale absmax / 127,
 * int4 the nearest value of a code book (the count of code-book midpoints below m / absmax, two codes
 * a byte, even column in the low nibble) with scale absmax, bf16 with stochastic rounding by a
 * counter-based hash of (seed, flat index). Memory sees 4 + 4 + 4 + 1 + 1 bytes per parameter for
 * int8 (p read and written, g read, codes read and written) against AdamW's 28.
 *
 * Where s comes from, per item (mode):
 *   k >= 1: blocks of k consecutive rows share v[b] <- beta2 v[b] + (1 - beta2) mean(g^2), summed here;
 *   0:      elementwise (AdamW), v has the shape of p;
 *   -1:     the caller's denominators sqrt(v_hat) + eps, one per row;
 *   -2:     the caller's denominators, one per column (rows of a transposed GPT-2 Conv1D weight).
 *
 * C99 with `#pragma omp simd` (no OpenMP runtime) and two GCC/Clang extensions, always_inline and
 * __builtin_prefetch (the compilers native.py builds with): the caller splits rows between threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int64_t lowmem_block_adam_quantized_abi(void) { return 1; }

enum { FORMAT_BF16 = 1, FORMAT_INT8 = 2, FORMAT_INT4 = 3 };
#define INT4_CODES 15

typedef struct {
    float decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, grad_sign;
    int32_t format;
    int64_t qblock;
    const float *book;  /* int4: INT4_CODES values */
    const float *mids;  /* int4: INT4_CODES - 1 midpoints */
} hparams;

static uint32_t random_bits(uint32_t seed, uint64_t index) {
    uint32_t h = (uint32_t)index * 0x2C1B3C6Du + seed;
    h = (h ^ (h >> 16)) * 0x297A2D39u;
    h = (h ^ (h >> 15)) * 0x1B873593u;
    return h ^ (h >> 16);
}

static double sum_sq(const float *g, int64_t n) {
    double total = 0.0;
    for (int64_t start = 0; start < n; start += 4096) {
        const int64_t stop = start + 4096 < n ? start + 4096 : n;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = start; j < stop; ++j) acc += g[j] * g[j];
        total += acc;
    }
    return total;
}

/* code: scratch of n + 1 bytes for int4 codes after they are unpacked */
static void decode_block(float *restrict m, uint8_t *restrict code, const void *codes, const float *scales, int64_t c0,
                         int64_t n, const hparams *h) {
    if (h->format == FORMAT_BF16) {
        const uint16_t *c = (const uint16_t *)codes + c0;
        for (int64_t j = 0; j < n; ++j) {
            uint32_t bits = (uint32_t)c[j] << 16;
            memcpy(&m[j], &bits, sizeof bits);
        }
    } else { /* c0 is even: the block starts at a byte */
        const uint8_t *c = (const uint8_t *)codes + c0 / 2;
        const float *book = h->book;
        const float scale = scales[c0 / h->qblock];
        /* unpack the nibbles first, then look the codes up: two loops that vectorize (a gather) where one
         * indexing the bytes by j / 2 does not */
#pragma omp simd
        for (int64_t j = 0; j < (n + 1) / 2; ++j) {
            code[2 * j] = c[j] & 0xF;
            code[2 * j + 1] = c[j] >> 4;
        }
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) m[j] = book[code[j]] * scale;
    }
}

/* code: scratch of n + 1 bytes for int4 codes before they are packed */
static void encode_block(const float *m, float absmax, uint8_t *code, void *codes, float *scales, int64_t c0,
                         int64_t n, uint32_t seed, uint64_t index, const hparams *h) {
    if (h->format == FORMAT_BF16) {
        uint16_t *c = (uint16_t *)codes + c0;
        for (int64_t j = 0; j < n; ++j) {
            uint32_t bits;
            memcpy(&bits, &m[j], sizeof bits);
            if ((bits & 0x7F800000u) != 0x7F800000u) bits += random_bits(seed, index + (uint64_t)j) & 0xFFFFu;
            c[j] = (uint16_t)(bits >> 16);
        }
        return;
    }
    uint8_t *c = (uint8_t *)codes + c0 / 2;
    /* a local copy of the midpoints with a constant count: the compiler unrolls the count over them
     * and vectorizes the loop over j */
    float mids[INT4_CODES - 1];
    memcpy(mids, h->mids, sizeof mids);
    const float inverse = absmax > 0.0f ? 1.0f / absmax : 0.0f;
    code[n] = INT4_CODES / 2; /* the code of 0: the padding nibble of an odd row */
    for (int64_t j = 0; j < n; ++j) {
        const float y = m[j] * inverse;
        int32_t q = 0;
        for (int k = 0; k < INT4_CODES - 1; ++k) q += y > mids[k];
        code[j] = (uint8_t)q;
    }
#pragma omp simd
    for (int64_t j = 0; j < (n + 1) / 2; ++j) c[j] = (uint8_t)(code[2 * j] | (code[2 * j + 1] << 4));
    scales[c0 / h->qblock] = absmax;
}

/* One row: decode, update, encode, block by block. Exactly one of v (elementwise), col_scales
 * (per column) is non-NULL, or neither (the row's scale). */
static void update_row(float *p, const float *g, void *codes, float *scales, float *v, const float *col_scales,
                       float scale, int64_t cols, uint32_t seed, uint64_t index, float *m, uint8_t *code,
                       const hparams *h) {
    const float omb1 = h->one_minus_beta1, sign = h->grad_sign, decay = h->decay;
    for (int64_t c0 = 0; c0 < cols; c0 += h->qblock) {
        const int64_t n = c0 + h->qblock < cols ? h->qblock : cols - c0;
        decode_block(m, code, codes, scales, c0, n, h);
        float *pb = p + c0;
        const float *gb = g + c0;
        float absmax = 0.0f; /* of the new m, for its scale */
        if (v != NULL) {
            float *vb = v + c0;
            const float beta2 = h->beta2, omb2 = h->one_minus_beta2, step_size = h->step_size;
            const float bc2 = h->bias_correction2_sqrt, eps = h->eps;
#pragma omp simd reduction(max : absmax)
            for (int64_t j = 0; j < n; ++j) {
                const float m_new = m[j] + omb1 * (sign * gb[j] - m[j]);
                absmax = fabsf(m_new) > absmax ? fabsf(m_new) : absmax;
                const float v_new = beta2 * vb[j] + omb2 * gb[j] * gb[j];
                m[j] = m_new;
                vb[j] = v_new;
                pb[j] = pb[j] * decay - step_size * m_new / (sqrtf(v_new) / bc2 + eps);
            }
        } else if (col_scales != NULL) {
            const float *sb = col_scales + c0;
#pragma omp simd reduction(max : absmax)
            for (int64_t j = 0; j < n; ++j) {
                const float m_new = m[j] + omb1 * (sign * gb[j] - m[j]);
                absmax = fabsf(m_new) > absmax ? fabsf(m_new) : absmax;
                m[j] = m_new;
                pb[j] = pb[j] * decay + sb[j] * m_new;
            }
        } else {
#pragma omp simd reduction(max : absmax)
            for (int64_t j = 0; j < n; ++j) {
                const float m_new = m[j] + omb1 * (sign * gb[j] - m[j]);
                absmax = fabsf(m_new) > absmax ? fabsf(m_new) : absmax;
                m[j] = m_new;
                pb[j] = pb[j] * decay + scale * m_new;
            }
        }
        encode_block(m, absmax, code, codes, scales, c0, n, seed, index + (uint64_t)c0, h);
    }
}

/* Where an int8 row's s comes from: a compile-time constant of int8_block, so that each of its
 * callers gets a loop without a branch on it. */
enum { S_ROW, S_COLUMN, S_ELEMENTWISE };

/* One int8 block of n entries: decode (a multiply by the old scale), update and the absmax of the new
 * m in one loop that keeps the new m in the L1 scratch m, then the encode loop. Decoding inside the
 * update loop saves a store and a load of the scratch per entry against decode_block. */
static inline __attribute__((always_inline)) void int8_block(
    float *restrict pb, const float *restrict gb, int8_t *restrict c, float *restrict scale_b, float *restrict vb,
    const float *restrict sb, float scale, int64_t n, float *restrict m, const hparams *h, const int source) {
    const float omb1 = h->one_minus_beta1, sign = h->grad_sign, decay = h->decay, old_scale = *scale_b;
    const float beta2 = h->beta2, omb2 = h->one_minus_beta2, step_size = h->step_size;
    const float bc2 = h->bias_correction2_sqrt, eps = h->eps;
    float absmax = 0.0f;
#pragma omp simd reduction(max : absmax)
    for (int64_t j = 0; j < n; ++j) {
        const float m_old = (float)c[j] * old_scale;
        const float m_new = m_old + omb1 * (sign * gb[j] - m_old);
        absmax = fabsf(m_new) > absmax ? fabsf(m_new) : absmax;
        m[j] = m_new;
        if (source == S_ELEMENTWISE) {
            const float v_new = beta2 * vb[j] + omb2 * gb[j] * gb[j];
            vb[j] = v_new;
            pb[j] = pb[j] * decay - step_size * m_new / (sqrtf(v_new) / bc2 + eps);
        } else if (source == S_COLUMN) {
            pb[j] = pb[j] * decay + sb[j] * m_new;
        } else {
            pb[j] = pb[j] * decay + scale * m_new;
        }
    }
    const float inverse = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    /* floor(y + 0.5) for y in [-127, 127], as a truncation of a positive value (vectorizes) */
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c[j] = (int8_t)((int32_t)(m[j] * inverse + 127.5f) - 127);
    *scale_b = absmax / 127.0f;
}

/* g_ahead: where the gradients of the next row block start (or NULL), the ones its sum(g^2) will stream
 * alone before its update; p_ahead: the parameters of the next row (or NULL), whose codes follow this
 * row's. Prefetching them here, a block's worth per block, overlaps those reads with this row's
 * traffic: measured, the loads of p and g, not the arithmetic, were where the loop waited. */
static void update_row_int8(float *p, const float *g, int8_t *codes, float *scales, float *v, const float *col_scales,
                            float scale, int64_t cols, const float *g_ahead, const float *p_ahead, float *m,
                            const hparams *h) {
    const int64_t qblock = h->qblock;
    for (int64_t c0 = 0, b = 0; c0 < cols; c0 += qblock, ++b) {
        const int64_t n = c0 + qblock < cols ? qblock : cols - c0;
        if (g_ahead != NULL)
            for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(g_ahead + c0 + j, 0, 2); /* 16 floats: a line */
        if (p_ahead != NULL) {
            for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p_ahead + c0 + j, 1, 2);
            for (int64_t j = 0; j < n; j += 64) __builtin_prefetch(codes + cols + c0 + j, 1, 2); /* 64 codes: a line */
        }
        if (v != NULL)
            int8_block(p + c0, g + c0, codes + c0, scales + b, v + c0, NULL, scale, n, m, h, S_ELEMENTWISE);
        else if (col_scales != NULL)
            int8_block(p + c0, g + c0, codes + c0, scales + b, NULL, col_scales + c0, scale, n, m, h, S_COLUMN);
        else
            int8_block(p + c0, g + c0, codes + c0, scales + b, NULL, NULL, scale, n, m, h, S_ROW);
    }
}

static void *code_row(void *codes, int64_t r, int64_t cols, int32_t format) {
    switch (format) {
        case FORMAT_BF16: return (uint16_t *)codes + r * cols;
        case FORMAT_INT8: return (int8_t *)codes + r * cols;
        default: return (uint8_t *)codes + r * ((cols + 1) / 2);
    }
}

/* Returns 0, or -1 if the scratch block or the column scales cannot be allocated. */
int32_t lowmem_block_adam_quantized(
    int64_t n_items,
    float *const *params,
    const float *const *grads,
    void *const *codes,
    float *const *scales,
    float *const *exp_avg_sqs,
    const float *const *denoms,
    const int64_t *n_rows,
    const int64_t *n_cols,
    const int64_t *modes,
    const int64_t *index_bases,
    const uint32_t *seeds,
    float decay,
    float step_size,
    float bias_correction2_sqrt,
    float one_minus_beta1,
    float beta2,
    float one_minus_beta2,
    float eps,
    int32_t maximize,
    int32_t format,
    int64_t qblock,
    const float *book,
    const float *mids) {
    const hparams h = {decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                       maximize ? -1.0f : 1.0f, format, qblock, book, mids};
    /* scratch: the decoded block, then room for its int4 codes */
    float *m = malloc((size_t)qblock * sizeof(float) + (size_t)qblock + 1);
    if (m == NULL) return -1;
    uint8_t *code = (uint8_t *)(m + qblock);
    for (int64_t item = 0; item < n_items; ++item) {
        float *p = params[item], *v = exp_avg_sqs[item], *s = scales[item];
        const float *g = grads[item], *denom = denoms[item];
        const int64_t rows = n_rows[item], cols = n_cols[item], mode = modes[item];
        const uint32_t seed = seeds[item];
        const uint64_t base = (uint64_t)index_bases[item];
        const int64_t n_blocks = (cols + qblock - 1) / qblock;
        float *col_scales = NULL;
        if (mode == -2) {
            col_scales = malloc((size_t)cols * sizeof(float));
            if (col_scales == NULL) {
                free(m);
                return -1;
            }
            for (int64_t c = 0; c < cols; ++c) col_scales[c] = -step_size / denom[c];
        }
        const int64_t k = mode >= 1 ? mode : 1;
        for (int64_t r0 = 0; r0 < rows; r0 += k) {
            float scale = 0.0f;
            if (mode >= 1) {
                float *vb = &v[r0 / k];
                *vb = beta2 * *vb + one_minus_beta2 * (float)(sum_sq(g + r0 * cols, k * cols) / (double)(k * cols));
                scale = -step_size / (sqrtf(*vb) / bias_correction2_sqrt + eps);
            } else if (mode == -1) {
                scale = -step_size / denom[r0];
            }
            for (int64_t r = r0; r < r0 + k; ++r) {
                if (format == FORMAT_INT8) {
                    update_row_int8(p + r * cols, g + r * cols, (int8_t *)codes[item] + r * cols, s + r * n_blocks,
                                    mode == 0 ? v + r * cols : NULL, col_scales, scale, cols,
                                    mode >= 1 && r0 + k < rows ? g + (r + k) * cols : NULL,
                                    r + 1 < rows ? p + (r + 1) * cols : NULL, m, &h);
                    continue;
                }
                update_row(p + r * cols, g + r * cols, code_row(codes[item], r, cols, format), s ? s + r * n_blocks : NULL,
                           mode == 0 ? v + r * cols : NULL, col_scales, scale, cols, seed,
                           base + (uint64_t)(r * cols), m, code, &h);
            }
        }
        free(col_scales);
    }
    free(m);
    return 0;
}
