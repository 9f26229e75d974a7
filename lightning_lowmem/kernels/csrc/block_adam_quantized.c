/*
 * The AdamMini/Eve update of fp32 parameters whose momentum m is stored as bf16 values or as
 * blockwise int8/int4 codes, for CPUs: one pass over p, g and the codes per step.
 *
 * For each quantization block (qblock consecutive entries of one row; the last one of a row may be
 * shorter) the kernel decodes m (int8: inside the update loop; int4 and bf16: into an L1 scratch
 * block), updates
 *
 *     m <- m + (1 - beta1) * (g - m)
 *     p <- p * decay + s * m                       (s = -step_size / (sqrt(v_hat) + eps))
 *
 * and encodes the block again: int8 codes q = floor(m * 127 / absmax + 127.5) - 127 with scale absmax / 127,
 * int4 the nearest value of a code book (the count of code-book midpoints below m / absmax, two codes
 * a byte, even column in the low nibble) with scale absmax, bf16 with stochastic rounding by a
 * counter-based hash of (seed, flat index). Memory sees 4 + 4 + 4 + 1 + 1 bytes per parameter for
 * int8 (p read and written, g read, codes read and written), 13 for int4, against AdamW's 28.
 *
 * int4 decodes through a 16-entry table (the book times the block's scale) and encodes by 7
 * comparisons of |m| / absmax with the positive midpoints (the book is symmetric); with AVX-512
 * (-march=native on such a CPU) both run 16 entries at a time with intrinsics, the table held in one
 * register (one permute looks up 16 codes), elsewhere as plain C loops with the same results.
 *
 * Where s comes from, per item (mode):
 *   k >= 1: blocks of k consecutive rows share v[b] <- beta2 v[b] + (1 - beta2) mean(g^2), summed here;
 *   0:      elementwise (AdamW), v has the shape of p;
 *   -1:     the caller's denominators sqrt(v_hat) + eps, one per row;
 *   -2:     the caller's denominators, one per column (rows of a transposed GPT-2 Conv1D weight).
 *
 * C99 with `#pragma omp simd` (no OpenMP runtime), two GCC/Clang extensions, always_inline and
 * __builtin_prefetch (the compilers native.py builds with), and <immintrin.h> intrinsics where
 * __AVX512F__ is defined: the caller splits rows between threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
/* GCC's loops in 512-bit vectors, as wide as the intrinsics' (it picks 256 for most AVX-512 CPUs):
 * where a loop stores the scratch m in 32-byte halves and the next loads it in 64-byte vectors (or
 * the other way), the loads wait for the stores to reach the cache instead of being forwarded from
 * them. Measured, one thread, int4: 1.10 ns a parameter with mixed widths, 0.70 with 512-bit loops
 * (int8 0.58 -> 0.48, bf16 1.20 -> 1.00). Clang has no such pragma: there the kernel is correct but
 * slower. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif
#endif

int64_t lowmem_block_adam_quantized_abi(void) { return 1; }

enum { FORMAT_BF16 = 1, FORMAT_INT8 = 2, FORMAT_INT4 = 3 };
#define INT4_CODES 15

typedef struct {
    float decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, grad_sign;
    int32_t format;
    int64_t qblock;
    const float *book;  /* int4: INT4_CODES values and 0 (the padding code 15): a 16-entry table */
    const float *mids;  /* int4: INT4_CODES - 1 midpoints, symmetric about 0 */
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

/* bf16: the fp32 values of n stored bf16 values (exact: the low 16 bits are zero) */
static void decode_bf16(float *restrict m, const uint16_t *restrict c, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
        uint32_t bits = (uint32_t)c[j] << 16;
        memcpy(&m[j], &bits, sizeof bits);
    }
}

/* bf16 with stochastic rounding: add 16 random bits below the bf16 mantissa, truncate (not inf/NaN) */
static void encode_bf16(const float *restrict m, uint16_t *restrict c, int64_t n, uint32_t seed, uint64_t index) {
    for (int64_t j = 0; j < n; ++j) {
        uint32_t bits;
        memcpy(&bits, &m[j], sizeof bits);
        if ((bits & 0x7F800000u) != 0x7F800000u) bits += random_bits(seed, index + (uint64_t)j) & 0xFFFFu;
        c[j] = (uint16_t)(bits >> 16);
    }
}

/* int4 decode of n codes (two a byte, even entry in the low nibble) through lut, the block's code book
 * times its scale (lut[q] = book[q] * scale: the product the reference computes). With AVX-512, 16 codes
 * at a time: 8 bytes spread to 16 nibbles, widened to 32-bit lanes and looked up by one permute of the
 * 16-entry table held in a register; elsewhere a gather. */
static inline __attribute__((always_inline)) void decode_int4(float *restrict m, const uint8_t *restrict c,
                                                               const float *restrict lut, int64_t n) {
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 table = _mm512_loadu_ps(lut);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (; j + 16 <= n; j += 16) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)(c + j / 2));
        const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m512i q = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)); /* lo0 hi0 lo1 hi1 ...: entry order */
        _mm512_storeu_ps(m + j, _mm512_permutexvar_ps(q, table));
    }
#endif
    for (; j < n; ++j) m[j] = lut[(c[j / 2] >> (4 * (j & 1))) & 0xF];
}

/* The int4 code of y = m / absmax: the count of code-book midpoints below y, as torch.bucketize counts
 * them (boundaries[q-1] < y <= boundaries[q]). The book is symmetric (book[14 - q] = -book[q], checked
 * by the caller), so the 14 midpoints are -pos[6], ..., -pos[0], pos[0], ..., pos[6], and with a = |y|:
 *
 *   y >= 0 (or -0.0 read as 0): q = 7 + #{pos[k] < a}    (all 7 negative midpoints are below y)
 *   y <  0:                     q = 7 - #{pos[k] <= a}   (the negative midpoints -pos[k] < y: pos[k] > a)
 *
 * and #{pos[k] <= a} = #{pos[k] < nextafter(a, inf)}: one formula, 7 comparisons, on a nudged up one
 * ulp (its bits plus one) where y is negative. Branch-free; NaN gets 7, the code of 0. */
static inline __attribute__((always_inline)) uint32_t int4_code(float y, const float *restrict pos) {
    uint32_t bits;
    memcpy(&bits, &y, sizeof bits);
    const uint32_t negative = bits >> 31;
    bits = (bits & 0x7FFFFFFFu) + negative;
    float a;
    memcpy(&a, &bits, sizeof a);
    uint32_t count = 0;
    for (int k = 0; k < INT4_CODES / 2; ++k) count += a > pos[k];
    return negative ? INT4_CODES / 2 - count : INT4_CODES / 2 + count;
}

/* int4 encode of n entries of m with scale absmax into c (two codes a byte), int4_code of each
 * m * (1 / absmax) (the product the reference computes); an odd n (the end of an odd row) pads the
 * last byte's high nibble with the code of 0. pos: the 7 positive midpoints. With AVX-512, 16 entries
 * at a time, int4_code's steps on 16 lanes: the comparisons give masks that count into 32-bit lanes,
 * and each pair of lanes (one 64-bit lane) becomes a byte q0 | q1 << 4, narrowed by one vpmovqb. */
static inline __attribute__((always_inline)) void encode_int4(const float *restrict m, float absmax,
                                                               uint8_t *restrict c, int64_t n,
                                                               const float *restrict pos) {
    const float inverse = absmax > 0.0f ? 1.0f / absmax : 0.0f;
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 mid[INT4_CODES / 2];
    for (int k = 0; k < INT4_CODES / 2; ++k) mid[k] = _mm512_set1_ps(pos[k]);
    const __m512 inv = _mm512_set1_ps(inverse);
    const __m512i one = _mm512_set1_epi32(1), zero_code = _mm512_set1_epi32(INT4_CODES / 2);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), low4 = _mm512_set1_epi64(0xF);
    for (; j + 16 <= n; j += 16) {
        const __m512i bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(m + j), inv));
        const __m512i negative = _mm512_srli_epi32(bits, 31); /* 1 where y < 0 */
        const __m512 a = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_and_si512(bits, magnitude), negative));
        __m512i count = _mm512_setzero_si512();
        for (int k = 0; k < INT4_CODES / 2; ++k)
            count = _mm512_mask_add_epi32(count, _mm512_cmp_ps_mask(a, mid[k], _CMP_GT_OQ), count, one);
        /* 7 + count, or 7 - count in the negative lanes */
        const __m512i q = _mm512_mask_sub_epi32(_mm512_add_epi32(zero_code, count),
                                                _mm512_test_epi32_mask(negative, negative), zero_code, count);
        /* 64-bit lane i holds q[2i] (low half) and q[2i+1] (high half): q[2i] | q[2i+1] << 4 */
        const __m512i pair = _mm512_or_si512(_mm512_and_si512(q, low4), _mm512_srli_epi64(q, 28));
        _mm_storel_epi64((__m128i *)(c + j / 2), _mm512_cvtepi64_epi8(pair));
    }
#endif
    for (; j + 1 < n; j += 2)
        c[j / 2] = (uint8_t)(int4_code(m[j] * inverse, pos) | int4_code(m[j + 1] * inverse, pos) << 4);
    if (j < n) c[j / 2] = (uint8_t)(int4_code(m[j] * inverse, pos) | (INT4_CODES / 2) << 4);
}

/* One bf16 row: decode, update, encode, in chunks of qblock entries. Exactly one of v (elementwise),
 * col_scales (per column) is non-NULL, or neither (the row's scale). */
static void update_row_bf16(float *p, const float *g, uint16_t *codes, float *v, const float *col_scales, float scale,
                            int64_t cols, uint32_t seed, uint64_t index, float *m, const hparams *h) {
    const float omb1 = h->one_minus_beta1, sign = h->grad_sign, decay = h->decay;
    for (int64_t c0 = 0; c0 < cols; c0 += h->qblock) {
        const int64_t n = c0 + h->qblock < cols ? h->qblock : cols - c0;
        decode_bf16(m, codes + c0, n);
        float *pb = p + c0;
        const float *gb = g + c0;
        if (v != NULL) {
            float *vb = v + c0;
            const float beta2 = h->beta2, omb2 = h->one_minus_beta2, step_size = h->step_size;
            const float bc2 = h->bias_correction2_sqrt, eps = h->eps;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const float m_new = m[j] + omb1 * (sign * gb[j] - m[j]);
                const float v_new = beta2 * vb[j] + omb2 * gb[j] * gb[j];
                m[j] = m_new;
                vb[j] = v_new;
                pb[j] = pb[j] * decay - step_size * m_new / (sqrtf(v_new) / bc2 + eps);
            }
        } else if (col_scales != NULL) {
            const float *sb = col_scales + c0;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const float m_new = m[j] + omb1 * (sign * gb[j] - m[j]);
                m[j] = m_new;
                pb[j] = pb[j] * decay + sb[j] * m_new;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const float m_new = m[j] + omb1 * (sign * gb[j] - m[j]);
                m[j] = m_new;
                pb[j] = pb[j] * decay + scale * m_new;
            }
        }
        encode_bf16(m, codes + c0, n, seed, index + (uint64_t)c0);
    }
}

/* Where an int8/int4 row's s comes from: a compile-time constant of int_block, so that each of its
 * callers gets a loop without a branch on it. */
enum { S_ROW, S_COLUMN, S_ELEMENTWISE };

/* One int8 or int4 block of n entries (format: a compile-time constant). int8 decodes inside the
 * update loop (a multiply by the old scale), int4 into the L1 scratch m first (a table lookup); the
 * loop updates m, p (and v) and takes the absmax of the new m, which stays in m for the encode loop. */
static inline __attribute__((always_inline)) void int_block(
    float *restrict pb, const float *restrict gb, void *restrict codes, float *restrict scale_b, float *restrict vb,
    const float *restrict sb, float scale, int64_t n, float *restrict m, const hparams *h, const int format,
    const int source) {
    const float omb1 = h->one_minus_beta1, sign = h->grad_sign, decay = h->decay, old_scale = *scale_b;
    const float beta2 = h->beta2, omb2 = h->one_minus_beta2, step_size = h->step_size;
    const float bc2 = h->bias_correction2_sqrt, eps = h->eps;
    int8_t *restrict c8 = (int8_t *)codes;
    if (format == FORMAT_INT4) {
        float lut[INT4_CODES + 1];
        for (int q = 0; q <= INT4_CODES; ++q) lut[q] = h->book[q] * old_scale;
        decode_int4(m, (const uint8_t *)codes, lut, n);
    }
    float absmax = 0.0f;
#pragma omp simd reduction(max : absmax)
    for (int64_t j = 0; j < n; ++j) {
        const float m_old = format == FORMAT_INT8 ? (float)c8[j] * old_scale : m[j];
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
    if (format == FORMAT_INT4) {
        encode_int4(m, absmax, (uint8_t *)codes, n, h->mids + INT4_CODES / 2);
        *scale_b = absmax;
        return;
    }
    const float inverse = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    /* floor(y + 0.5) for y in [-127, 127], as a truncation of a positive value (vectorizes) */
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c8[j] = (int8_t)((int32_t)(m[j] * inverse + 127.5f) - 127);
    *scale_b = absmax / 127.0f;
}

/* One int8 or int4 row of cols entries whose codes start at codes (format: a compile-time constant).
 * g_ahead: where the gradients of the next row block start (or NULL), the ones its sum(g^2) will stream
 * alone before its update; p_ahead: the parameters of the next row (or NULL), whose codes follow this
 * row's. Prefetching them here, a block's worth per block, overlaps those reads with this row's
 * traffic: measured, the loads of p and g, not the arithmetic, were where the loop waited. */
static inline __attribute__((always_inline)) void update_row_int(
    float *p, const float *g, uint8_t *codes, float *scales, float *v, const float *col_scales, float scale,
    int64_t cols, const float *g_ahead, const float *p_ahead, float *m, const hparams *h, const int format) {
    const int64_t qblock = h->qblock;
    const int64_t row_bytes = format == FORMAT_INT8 ? cols : (cols + 1) / 2;
    for (int64_t c0 = 0, b = 0; c0 < cols; c0 += qblock, ++b) {
        const int64_t n = c0 + qblock < cols ? qblock : cols - c0;
        /* the block's codes: c0 is even for int4 (qblock is), so they start at a byte */
        uint8_t *cb = codes + (format == FORMAT_INT8 ? c0 : c0 / 2);
        if (g_ahead != NULL)
            for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(g_ahead + c0 + j, 0, 2); /* 16 floats: a line */
        if (p_ahead != NULL) {
            for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p_ahead + c0 + j, 1, 2);
            const int64_t bytes = format == FORMAT_INT8 ? n : (n + 1) / 2;
            for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch(cb + row_bytes + j, 1, 2); /* a line */
        }
        if (v != NULL)
            int_block(p + c0, g + c0, cb, scales + b, v + c0, NULL, scale, n, m, h, format, S_ELEMENTWISE);
        else if (col_scales != NULL)
            int_block(p + c0, g + c0, cb, scales + b, NULL, col_scales + c0, scale, n, m, h, format, S_COLUMN);
        else
            int_block(p + c0, g + c0, cb, scales + b, NULL, NULL, scale, n, m, h, format, S_ROW);
    }
}

/* update_row_int with the format fixed: one compiled body per format, without a branch on it */
static void update_row_int8(float *p, const float *g, uint8_t *codes, float *scales, float *v, const float *col_scales,
                            float scale, int64_t cols, const float *g_ahead, const float *p_ahead, float *m,
                            const hparams *h) {
    update_row_int(p, g, codes, scales, v, col_scales, scale, cols, g_ahead, p_ahead, m, h, FORMAT_INT8);
}

static void update_row_int4(float *p, const float *g, uint8_t *codes, float *scales, float *v, const float *col_scales,
                            float scale, int64_t cols, const float *g_ahead, const float *p_ahead, float *m,
                            const hparams *h) {
    update_row_int(p, g, codes, scales, v, col_scales, scale, cols, g_ahead, p_ahead, m, h, FORMAT_INT4);
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
    /* scratch: the decoded block */
    float *m = malloc((size_t)qblock * sizeof(float));
    if (m == NULL) return -1;
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
                float *pr = p + r * cols, *vr = mode == 0 ? v + r * cols : NULL;
                const float *gr = g + r * cols;
                if (format == FORMAT_BF16) {
                    update_row_bf16(pr, gr, (uint16_t *)codes[item] + r * cols, vr, col_scales, scale, cols, seed,
                                    base + (uint64_t)(r * cols), m, &h);
                    continue;
                }
                const float *g_ahead = mode >= 1 && r0 + k < rows ? g + (r + k) * cols : NULL;
                const float *p_ahead = r + 1 < rows ? p + (r + 1) * cols : NULL;
                if (format == FORMAT_INT8)
                    update_row_int8(pr, gr, (uint8_t *)codes[item] + r * cols, s + r * n_blocks, vr, col_scales, scale,
                                    cols, g_ahead, p_ahead, m, &h);
                else
                    update_row_int4(pr, gr, (uint8_t *)codes[item] + r * ((cols + 1) / 2), s + r * n_blocks, vr,
                                    col_scales, scale, cols, g_ahead, p_ahead, m, &h);
            }
        }
        free(col_scales);
    }
    free(m);
    return 0;
}
