/* Matrix products and row lookups over GGUF quantized weights, repacked once at load.
 *
 * `repack_rows` reads the file's blocks (gguf_decode.h) into one of four layouts, each a
 * row of 32-value blocks with the integers v apart from their float32 scales and mins:
 *     U4         Q4_0, Q4_1, Q4_K   16 bytes per block: v[j] low nibble, v[j+16] high
 *     U8         Q5_0, Q5_1, Q5_K   32 bytes per block, 0..31
 *     I8         Q8_0               32 bytes per block, signed
 *     I8_HALVES  Q6_K               32 bytes per block, signed, a scale per 16 values
 * so  w[32b + j] = scale[b (, j / 16)] * v[j] + min[b]  exactly as gguf dequantizes. The hot
 * loops then read no per-type bit layout: two blocks are one 512-bit load (AVX-512) and
 * their scales one small load, which is what kept the file-layout kernel compute-bound.
 *
 * `quant_matmul` has two modes:
 *  - integer (the fast path, as llama.cpp does): each row of x is quantized to int8 with
 *    a float scale per 16 values (round to nearest) and multiplied with int8 dot products
 *    accumulated in int32 (AVX512-VNNI `vpdpbusd`, AVX2 `vpmaddubsw`, or plain C), then
 *    scaled per block in float32;
 *  - exact: x stays float32 and the products are float32 multiply-adds, so y equals a
 *    float32 matmul over the dequantized weights up to summation order.
 *
 * The instruction set is chosen when this file is compiled (pagedllm/cpu_kernels.py builds
 * it once per level the CPU supports and picks one at run time); every level computes the
 * same integer sums, so they agree exactly in integer mode up to float summation order.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define USE_AVX2 1
#include <immintrin.h>
#endif
#if defined(USE_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define USE_VNNI 1 /* and 512-bit vectors: two blocks per instruction */
#endif

#include "gguf_decode.h"

#define MAX_ROWS 16 /* rows of x per call of the small-batch products */
#define AI __attribute__((always_inline)) inline

enum { U4 = 0, U8 = 1, I8 = 2, I8_HALVES = 3 };

/* The layout a GGML type is repacked into, or -1 for a type this file does not read. */
int weight_format(int type) {
    switch (type) {
    case Q4_0: case Q4_1: case Q4_K: return U4;
    case Q5_0: case Q5_1: case Q5_K: return U8;
    case Q8_0: return I8;
    case Q6_K: return I8_HALVES;
    }
    return -1;
}

/* Whether the type's values carry a min (an offset) per block. */
int weight_has_min(int type) { return type != Q8_0 && type != Q6_K && weight_format(type) >= 0; }

static AI int quant_bytes(int format) { return format == U4 ? 16 : 32; }
static AI int scales_per_block(int format) { return format == I8_HALVES ? 2 : 1; }
static AI int is_signed(int format) { return format >= I8; }

const char *level_name(void) {
#if defined(USE_VNNI)
    return "avx512vnni";
#elif defined(USE_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

/* qs [N, K/32 * quant bytes], scales [N, K/32 * scales per block], mins [N, K/32] (NULL for
   types without) from the file's rows [N, row_bytes]. Return 0, or -2 for an unknown type or
   a row size that does not match K. */
int repack_rows(int type, const uint8_t *src, long row_bytes, int N, int K, uint8_t *qs,
                float *scales, float *mins, int num_threads) {
    int per_unit, bytes = type_bytes(type, &per_unit);
    const int format = weight_format(type);
    if (format < 0 || K <= 0 || K % (32 * per_unit) || row_bytes != (long)(K / (32 * per_unit)) * bytes)
        return -2;
    const int nb = K / 32, qb = quant_bytes(format), spb = scales_per_block(format);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = src + (size_t)n * row_bytes;
        for (int b = 0; b < nb; b++) {
            float scale[2], min[2];
            int8_t v[32];
            block_scales(type, row, b, scale, min);
            unpack_scalar(type, row, b, v);
            uint8_t *q = qs + ((size_t)n * nb + b) * qb;
            if (format == U4)
                for (int j = 0; j < 16; j++) q[j] = (uint8_t)(v[j] | v[j + 16] << 4);
            else
                memcpy(q, v, 32);
            for (int h = 0; h < spb; h++) scales[((size_t)n * nb + b) * spb + h] = scale[h];
            if (mins) mins[(size_t)n * nb + b] = min[0];
        }
    }
    return 0;
}

/* The repacked weight, as the kernels take it. Scales and mins are float32, or float16
   (`half`) where every one of a tensor's values is exactly a float16 (the legacy types,
   whose file stores them so): 20 bytes a Q4_1 block instead of 24, read every token. */
typedef struct {
    int format, half;
    const uint8_t *qs;
    const void *scales, *mins;
    int nb; /* blocks per row */
} weight;

static AI float scalar_at(const void *p, size_t i, int half) {
    if (half) return half_to_float((const uint8_t *)p + 2 * i);
    return ((const float *)p)[i];
}

/* The 32 integers of block b of row n, in plain C. */
static AI void values_scalar(const weight *w, size_t n, int b, int8_t v[32]) {
    const uint8_t *q = w->qs + (n * w->nb + b) * quant_bytes(w->format);
    if (w->format == U4) {
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)(q[j] & 15);
            v[j + 16] = (int8_t)(q[j] >> 4);
        }
    } else {
        memcpy(v, q, 32);
    }
}

static AI float block_scale(const weight *w, size_t n, int b, int h) {
    const int spb = scales_per_block(w->format);
    return scalar_at(w->scales, (n * w->nb + b) * spb + (spb == 2 ? h : 0), w->half);
}

static AI const void *min_row(const weight *w, size_t n) {
    return (const char *)w->mins + (n * w->nb << (2 - w->half));
}

static AI float block_min(const weight *w, size_t n, int b) {
    return w->mins ? scalar_at(w->mins, n * w->nb + b, w->half) : 0.f;
}

#if defined(USE_AVX2)
/* Block b of row n as 32 bytes in value order. */
static AI __m256i values(const weight *w, size_t n, int b) {
    const uint8_t *q = w->qs + (n * w->nb + b) * quant_bytes(w->format);
    if (w->format == U4) {
        __m128i raw = _mm_loadu_si128((const __m128i *)q);
        __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        return _mm256_and_si256(both, _mm256_set1_epi8(15));
    }
    return _mm256_loadu_si256((const __m256i *)q);
}

/* Block b's scales over its eight int32 lanes (lanes 0-3: values 0-15, 4-7: 16-31). */
static AI __m256 scale_lanes(const weight *w, size_t n, int b) {
    if (scales_per_block(w->format) == 2)
        return _mm256_set_m128(_mm_set1_ps(block_scale(w, n, b, 1)),
                               _mm_set1_ps(block_scale(w, n, b, 0)));
    return _mm256_set1_ps(block_scale(w, n, b, 0));
}

/* Eight int32 sums of four products u * x each; u unsigned, x signed. */
static AI __m256i dot_u8(__m256i u, __m256i x) {
#if defined(USE_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

static AI float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* sum over i < n of a[i] * b[i] (the min terms of a row); a is float16 with `half`. */
static AI float dot_floats(const void *a, const float *b, int n, int half) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 ai = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a + i)))
                               : _mm256_loadu_ps((const float *)a + i);
        acc = _mm256_fmadd_ps(ai, _mm256_loadu_ps(b + i), acc);
    }
    float s = hsum8(acc);
    for (; i < n; i++) s += scalar_at(a, i, half) * b[i];
    return s;
}

static inline void flush_denormals(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }
#else
static AI float dot_floats(const void *a, const float *b, int n, int half) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += scalar_at(a, i, half) * b[i];
    return s;
}

static inline void flush_denormals(void) {}
#endif

#if defined(USE_VNNI)
/* Blocks b and b+1 of row n as 64 bytes in value order. */
static AI __m512i values_pair(const weight *w, size_t n, int b) {
    const uint8_t *q = w->qs + (n * w->nb + b) * quant_bytes(w->format);
    if (w->format == U4) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)q), mask = _mm256_set1_epi8(15);
        const __m256i lo = _mm256_and_si256(raw, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
        /* [b lo, b+1 lo, b hi, b+1 hi] → [b lo, b hi, b+1 lo, b+1 hi] */
        const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
    }
    return _mm512_loadu_si512(q);
}

/* Two consecutive values p[0], p[1] (float32, or float16 with `half`) spread over lanes
   0-7 and 8-15 (four values over four lanes each with `quarters`). */
static AI __m512 spread(const void *p, int quarters, int half) {
    __m128 v;
    if (half)
        v = _mm_cvtph_ps(quarters ? _mm_loadl_epi64((const __m128i *)p)
                                  : _mm_cvtsi32_si128(*(const int *)p));
    else
        v = quarters ? _mm_loadu_ps((const float *)p)
                     : _mm_castpd_ps(_mm_load_sd((const double *)p));
    const __m512i idx = quarters
        ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
        : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}
#endif

/* x quantized per half-block of 16: q = round(x / d) with d = max|x| / 127 over the 16
   (so q is never -128, which |v| * sign would overflow), and per block of 32 the sum of
   d * q for the min terms. Sixteen values a scale rather than 32: an outlier channel (LLM
   activations have a few) then coarsens 15 neighbours, not 31, for the same dot products. */
typedef struct {
    int8_t *q;   /* [M, K] */
    float *d;    /* [M, K/32, 2] */
    float *sums; /* [M, K/32] */
    float *dx;   /* AVX-512: [M, K/64, 16], each block pair's two scales over its lanes */
} quantized_x;

static void quantize_x(const float *x, int M, int K, quantized_x *out) {
    const int nb = K / 32;
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            float block_sum = 0.f;
            for (int h = 0; h < 2; h++) {
                const float *xh = x + (size_t)r * K + 32 * b + 16 * h;
                int8_t *qh = out->q + (size_t)r * K + 32 * b + 16 * h;
                float amax = 0.f;
                for (int j = 0; j < 16; j++) amax = fmaxf(amax, fabsf(xh[j]));
                const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
                int sum = 0;
                for (int j = 0; j < 16; j++) {
                    int q = (int)nearbyintf(xh[j] * inv);
                    qh[j] = (int8_t)q;
                    sum += q;
                }
                out->d[2 * ((size_t)r * nb + b) + h] = d;
                block_sum += d * (float)sum;
            }
            out->sums[(size_t)r * nb + b] = block_sum;
        }
    /* The pair scales as the VNNI loop multiplies them, spread once here rather than
       once per weight row (a load and a permute per row, pair and output, before). */
    if (out->dx)
        for (int r = 0; r < M; r++)
            for (int p = 0; p < nb / 2; p++) {
                const float *d = out->d + 2 * ((size_t)r * nb + 2 * p);
                float *lanes = out->dx + ((size_t)r * (nb / 2) + p) * 16;
                for (int j = 0; j < 16; j++) lanes[j] = d[(j / 8) * 2 + (j % 8) / 4];
            }
}

/* Integer mode, weight row n against every row of x: out[r] = x_r · w_n. */
static AI void row_int(const weight *w, size_t n, const quantized_x *xq, int M, int K, float *out) {
    const int nb = w->nb, sgn = is_signed(w->format);
    for (int r = 0; r < M; r++)
        out[r] = w->mins ? dot_floats(min_row(w, n), xq->sums + (size_t)r * nb, nb, w->half) : 0.f;
#if defined(USE_AVX2)
    int b = 0;
#if defined(USE_VNNI)
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    const int spb = scales_per_block(w->format);
    for (; b + 1 < nb; b += 2) {
        const __m512i v = values_pair(w, n, b);
        const __m512i u = sgn ? _mm512_abs_epi8(v) : v;
        const __mmask64 negative = sgn ? _mm512_movepi8_mask(v) : 0;
        const __m512 sv = spread((const char *)w->scales + ((n * nb + b) * spb << (2 - w->half)),
                                 spb == 2, w->half);
        for (int r = 0; r < M; r++) {
            __m512i x = _mm512_loadu_si512(xq->q + (size_t)r * K + 32 * b);
            if (sgn) x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x));
            const __m512 dx = _mm512_loadu_ps(xq->dx + ((size_t)r * (nb / 2) + b / 2) * 16);
            acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(sv, dx), acc[r]);
        }
    }
    for (int r = 0; r < M; r++) out[r] += _mm512_reduce_add_ps(acc[r]);
#endif
    __m256 tail[MAX_ROWS];
    for (int r = 0; r < M; r++) tail[r] = _mm256_setzero_ps();
    for (; b < nb; b++) { /* every block on AVX2; the odd last one on AVX-512 */
        const __m256i v = values(w, n, b), u = sgn ? _mm256_sign_epi8(v, v) : v;
        const __m256 sv = scale_lanes(w, n, b);
        for (int r = 0; r < M; r++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq->q + (size_t)r * K + 32 * b));
            if (sgn) x = _mm256_sign_epi8(x, v);
            const float *d = xq->d + 2 * ((size_t)r * nb + b);
            const __m256 dx = _mm256_set_m128(_mm_set1_ps(d[1]), _mm_set1_ps(d[0]));
            tail[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8(u, x)), _mm256_mul_ps(sv, dx),
                                      tail[r]);
        }
    }
    for (int r = 0; r < M; r++) out[r] += hsum8(tail[r]);
#else
    for (int b = 0; b < nb; b++) {
        int8_t v[32];
        values_scalar(w, n, b, v);
        const float s0 = block_scale(w, n, b, 0), s1 = block_scale(w, n, b, 1);
        for (int r = 0; r < M; r++) {
            const int8_t *x = xq->q + (size_t)r * K + 32 * b;
            int sum[2] = {0, 0};
            for (int h = 0; h < 2; h++) /* v is never negative unless sgn: int8 reads it */
                for (int j = 16 * h; j < 16 * h + 16; j++) sum[h] += v[j] * x[j];
            const float *d = xq->d + 2 * ((size_t)r * nb + b);
            out[r] += s0 * d[0] * (float)sum[0] + s1 * d[1] * (float)sum[1];
        }
    }
#endif
}

#if defined(USE_VNNI)
/* row_int for weight rows n and n + 1 at once, for an even number of blocks: each x block
   pair and its scales are loaded once for both rows, the cost that grows with the rows
   of x (speculative verification, small batches). It repeats row_int's VNNI loop on
   purpose: one loop generic over 1 or 2 weight rows measured 12-20% slower at 5-9 rows. */
static AI void row_int_pair(const weight *w, size_t n, const quantized_x *xq, int M, int K,
                            float *out0, float *out1) {
    const int nb = w->nb, sgn = is_signed(w->format), spb = scales_per_block(w->format);
    for (int r = 0; r < M; r++) {
        const float *sums = xq->sums + (size_t)r * nb;
        out0[r] = w->mins ? dot_floats(min_row(w, n), sums, nb, w->half) : 0.f;
        out1[r] = w->mins ? dot_floats(min_row(w, n + 1), sums, nb, w->half) : 0.f;
    }
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
    for (int r = 0; r < M; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int b = 0; b + 1 < nb; b += 2) {
        const __m512i v0 = values_pair(w, n, b), v1 = values_pair(w, n + 1, b);
        const __m512i u0 = sgn ? _mm512_abs_epi8(v0) : v0, u1 = sgn ? _mm512_abs_epi8(v1) : v1;
        const __mmask64 neg0 = sgn ? _mm512_movepi8_mask(v0) : 0;
        const __mmask64 neg1 = sgn ? _mm512_movepi8_mask(v1) : 0;
        const char *scales = (const char *)w->scales;
        const __m512 sv0 = spread(scales + ((n * nb + b) * spb << (2 - w->half)), spb == 2, w->half);
        const __m512 sv1 =
            spread(scales + (((n + 1) * nb + b) * spb << (2 - w->half)), spb == 2, w->half);
        for (int r = 0; r < M; r++) {
            const __m512i x = _mm512_loadu_si512(xq->q + (size_t)r * K + 32 * b);
            const __m512i x0 = sgn ? _mm512_mask_sub_epi8(x, neg0, _mm512_setzero_si512(), x) : x;
            const __m512i x1 = sgn ? _mm512_mask_sub_epi8(x, neg1, _mm512_setzero_si512(), x) : x;
            const __m512 dx = _mm512_loadu_ps(xq->dx + ((size_t)r * (nb / 2) + b / 2) * 16);
            const __m512i zero = _mm512_setzero_si512();
            acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, u0, x0)),
                                      _mm512_mul_ps(sv0, dx), acc0[r]);
            acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, u1, x1)),
                                      _mm512_mul_ps(sv1, dx), acc1[r]);
        }
    }
    for (int r = 0; r < M; r++) {
        out0[r] += _mm512_reduce_add_ps(acc0[r]);
        out1[r] += _mm512_reduce_add_ps(acc1[r]);
    }
}
#endif

/* Exact mode, weight row n: float32 products with the dequantized values. xsums[r, b] is
   the sum of block b of x row r (for the min terms). */
static AI void row_exact(const weight *w, size_t n, const float *x, const float *xsums, int M,
                         int K, float *out) {
    const int nb = w->nb;
    for (int r = 0; r < M; r++)
        out[r] = w->mins ? dot_floats(min_row(w, n), xsums + (size_t)r * nb, nb, w->half) : 0.f;
#if defined(USE_AVX2)
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m256i v = values(w, n, b);
        const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 s0 = _mm256_set1_ps(block_scale(w, n, b, 0));
        const __m256 s1 = _mm256_set1_ps(block_scale(w, n, b, 1));
        for (int r = 0; r < M; r++) {
            const float *xb = x + (size_t)r * K + 32 * b;
            __m256 first = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            first = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), first);
            __m256 second = _mm256_mul_ps(w2, _mm256_loadu_ps(xb + 16));
            second = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), second);
            acc[r] = _mm256_fmadd_ps(s0, first, acc[r]);
            acc[r] = _mm256_fmadd_ps(s1, second, acc[r]);
        }
    }
    for (int r = 0; r < M; r++) out[r] += hsum8(acc[r]);
#else
    for (int b = 0; b < nb; b++) {
        int8_t v[32];
        values_scalar(w, n, b, v);
        const float s0 = block_scale(w, n, b, 0), s1 = block_scale(w, n, b, 1);
        for (int r = 0; r < M; r++) {
            const float *xb = x + (size_t)r * K + 32 * b;
            float sum[2] = {0.f, 0.f};
            for (int h = 0; h < 2; h++)
                for (int j = 16 * h; j < 16 * h + 16; j++) sum[h] += (float)v[j] * xb[j];
            out[r] += s0 * sum[0] + s1 * sum[1];
        }
    }
#endif
}

/* Ask for the weight bytes a few rows ahead: a decode step streams every weight once from
   memory, and the hardware prefetchers alone left each core at ~2.7 GB/s. */
#define PREFETCH_ROWS 8
static AI void prefetch_row(const weight *w, size_t n) {
#if defined(USE_AVX2)
    const size_t qbytes = (size_t)w->nb * quant_bytes(w->format);
    const char *q = (const char *)(w->qs + n * qbytes);
    for (size_t off = 0; off < qbytes; off += 64) _mm_prefetch(q + off, _MM_HINT_T0);
    const size_t sbytes = (size_t)w->nb * scales_per_block(w->format) << (2 - w->half);
    const char *s = (const char *)w->scales + n * sbytes;
    for (size_t off = 0; off < sbytes; off += 64) _mm_prefetch(s + off, _MM_HINT_T0);
    if (w->mins) _mm_prefetch((const char *)min_row(w, n), _MM_HINT_T0);
#else
    (void)w, (void)n;
#endif
}

/* One specialised copy of a loop per layout and scale width: constants in each case. */
#define FOR_EACH_FORMAT(CALL)                                                                  \
    switch (format * 2 + half) {                                                               \
    case 2 * U4: CALL(U4, 0); break;                                                           \
    case 2 * U4 + 1: CALL(U4, 1); break;                                                       \
    case 2 * U8: CALL(U8, 0); break;                                                           \
    case 2 * U8 + 1: CALL(U8, 1); break;                                                       \
    case 2 * I8: CALL(I8, 0); break;                                                           \
    case 2 * I8 + 1: CALL(I8, 1); break;                                                       \
    case 2 * I8_HALVES: CALL(I8_HALVES, 0); break;                                             \
    case 2 * I8_HALVES + 1: CALL(I8_HALVES, 1); break;                                         \
    }

/* What is done to x before the product: a decode step's small elementwise ops, fused here
   because on a few rows each torch call costs more than its arithmetic. */
enum { PLAIN = 0, RMS_NORM = 1, SILU_MUL = 2 };

/* out[M, K] = op(x): x as is, RMSNorm(x) * weight (float32 statistics, as transformers), or
   silu(gate) * up where a row of x is [gate (K) | up (K)]. Rows of x are ldx apart. */
static void prepare_x(const float *x, long ldx, int M, int K, int op, const float *weight,
                      float eps, float *out, int num_threads) {
#pragma omp parallel for num_threads(M > 8 ? num_threads : 1) schedule(static)
    for (int r = 0; r < M; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *o = out + (size_t)r * K;
        if (op == RMS_NORM) {
            float squares = 0.f;
            for (int j = 0; j < K; j++) squares += xr[j] * xr[j];
            const float inv = 1.f / sqrtf(squares / (float)K + eps);
            for (int j = 0; j < K; j++) o[j] = weight[j] * (xr[j] * inv);
        } else if (op == SILU_MUL) {
            for (int j = 0; j < K; j++) o[j] = xr[j] / (1.f + expf(-xr[j])) * xr[K + j];
        } else {
            memcpy(o, xr, sizeof(float) * K);
        }
    }
}

static int valid(int format, int K) { return format >= U4 && format <= I8_HALVES && K > 0 && K % 32 == 0; }

/* y[M, N] (row stride ldy) = op(x)[M, K] @ w[N, K]^T for w repacked by repack_rows (format,
   qs, scales, mins; the last two float16 with `half`), or y += that (`accumulate`: a residual add). x's rows are ldx apart;
   `op` is PLAIN, RMS_NORM (with `norm_weight`, `eps`) or SILU_MUL (x rows hold 2K values).
   Return 0; -1 when scratch memory could not be allocated; -2 for an unknown format, K not
   a multiple of 32, M outside 1..MAX_ROWS or an unknown op (y untouched). */
int quant_matmul(int format, int half, const uint8_t *qs, const void *scales, const void *mins, int N,
                 int K, const float *x, long ldx, int M, float *y, long ldy, int exact, int op,
                 const float *norm_weight, float eps, int accumulate, int num_threads) {
    if (!valid(format, K) || M < 1 || M > MAX_ROWS || N < 0) return -2;
    if (op < PLAIN || op > SILU_MUL || (op == RMS_NORM && !norm_weight)) return -2;
    const int nb = K / 32;
    const weight w = {format, half != 0, qs, scales, mins, nb};
    quantized_x xq = {0};
    float *xsums = NULL, *xp = malloc(sizeof(float) * (size_t)M * K);
    if (!xp) return -1;
    prepare_x(x, ldx, M, K, op, norm_weight, eps, xp, 1);
    if (exact) {
        xsums = malloc(sizeof(float) * (size_t)M * nb);
        if (!xsums) {
            free(xp);
            return -1;
        }
        for (size_t i = 0; i < (size_t)M * nb; i++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += xp[32 * i + j];
            xsums[i] = s;
        }
    } else {
        xq.q = malloc((size_t)M * K);
        xq.d = malloc(sizeof(float) * 2 * (size_t)M * nb);
        xq.sums = malloc(sizeof(float) * (size_t)M * nb);
#if defined(USE_VNNI)
        xq.dx = malloc(sizeof(float) * 16 * (size_t)M * (nb / 2 > 0 ? nb / 2 : 1));
        const int dx_missing = !xq.dx;
#else
        const int dx_missing = 0;
#endif
        if (!xq.q || !xq.d || !xq.sums || dx_missing) {
            free(xq.q), free(xq.d), free(xq.sums), free(xq.dx), free(xp);
            return -1;
        }
        quantize_x(xp, M, K, &xq);
    }
#pragma omp parallel num_threads(num_threads)
    {
        flush_denormals();
        float out[MAX_ROWS], out_next[MAX_ROWS];
        weight wf = w;
#if defined(USE_VNNI)
        const int step = exact || nb % 2 ? 1 : 2; /* two weight rows per x pass */
#else
        const int step = 1;
#endif
#pragma omp for schedule(static)
        for (int i = 0; i < (N + step - 1) / step; i++) {
            const int n = i * step, both = step == 2 && n + 1 < N;
            prefetch_row(&w, (size_t)n + PREFETCH_ROWS);
            if (both) prefetch_row(&w, (size_t)n + 1 + PREFETCH_ROWS);
            if (exact) {
#define EXACT(F, H) (wf.format = F, wf.half = H, row_exact(&wf, (size_t)n, xp, xsums, M, K, out))
                FOR_EACH_FORMAT(EXACT)
            } else if (!both) {
#define INT(F, H) (wf.format = F, wf.half = H, row_int(&wf, (size_t)n, &xq, M, K, out))
                FOR_EACH_FORMAT(INT)
            } else {
#if defined(USE_VNNI)
#define PAIR(F, H) \
    (wf.format = F, wf.half = H, row_int_pair(&wf, (size_t)n, &xq, M, K, out, out_next))
                FOR_EACH_FORMAT(PAIR)
#endif
            }
            for (int r = 0; r < M; r++) {
                float *yr = y + (size_t)r * ldy + n;
                *yr = accumulate ? *yr + out[r] : out[r];
                if (both) yr[1] = accumulate ? yr[1] + out_next[r] : out_next[r];
            }
        }
    }
    free(xsums), free(xq.q), free(xq.d), free(xq.sums), free(xq.dx), free(xp);
    return 0;
}

/* out[M, K] = op(x) for batches too large for quant_matmul (their product is computed
   elsewhere): the same norm or activation, so both paths see the same inputs. Return 0,
   or -2 for an unknown op. */
int prepare_rows(const float *x, long ldx, int M, int K, int op, const float *norm_weight,
                 float eps, float *out, int num_threads) {
    if (op < PLAIN || op > SILU_MUL || (op == RMS_NORM && !norm_weight) || M < 0 || K < 0)
        return -2;
    prepare_x(x, ldx, M, K, op, norm_weight, eps, out, num_threads);
    return 0;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16); /* round to nearest even */
}

#if defined(USE_AVX2)
/* Sixteen floats as bfloat16, rounded to nearest even (as float_to_bf16), in order. */
static inline __m256i bf16_pack(__m256 a, __m256 b) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    __m256i x = _mm256_castps_si256(a), y = _mm256_castps_si256(b);
    x = _mm256_add_epi32(x, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(x, 16), one)));
    y = _mm256_add_epi32(y, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(y, 16), one)));
    x = _mm256_srli_epi32(x, 16), y = _mm256_srli_epi32(y, 16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(x, y), 0xD8);
}
#endif

/* Row n's values as float32, or as bfloat16 rounded to nearest even. */
static AI void dequantize_row(const weight *w, size_t n, void *out, int bf16) {
    for (int b = 0; b < w->nb; b++) {
        const float min = block_min(w, n, b);
#if defined(USE_AVX2)
        const __m256i v = values(w, n, b);
        const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        __m256 f[4];
        for (int i = 0; i < 4; i++)
            f[i] = _mm256_fmadd_ps(_mm256_set1_ps(block_scale(w, n, b, i / 2)),
                                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])),
                                   _mm256_set1_ps(min));
        if (bf16) {
            __m256i *o = (__m256i *)((uint16_t *)out + 32 * b);
            _mm256_storeu_si256(o, bf16_pack(f[0], f[1]));
            _mm256_storeu_si256(o + 1, bf16_pack(f[2], f[3]));
        } else {
            for (int i = 0; i < 4; i++) _mm256_storeu_ps((float *)out + 32 * b + 8 * i, f[i]);
        }
#else
        int8_t v[32];
        float f[32];
        values_scalar(w, n, b, v);
        for (int j = 0; j < 32; j++) f[j] = block_scale(w, n, b, j / 16) * (float)v[j] + min;
        if (bf16)
            for (int j = 0; j < 32; j++) ((uint16_t *)out)[32 * b + j] = float_to_bf16(f[j]);
        else
            memcpy((float *)out + 32 * b, f, sizeof f);
#endif
    }
}

/* out[i] = row ids[i] of w dequantized (ids NULL: rows 0..n-1), float32 or bfloat16.
   Return 0, -2 for an unknown format or K not a multiple of 32, or -3 (out untouched) when
   an id lies outside [0, num_rows): checked here, where it costs nothing beside the rows,
   rather than by two tensor reductions before every embedding lookup. */
int dequantize_rows(int format, int half, const uint8_t *qs, const void *scales, const void *mins, int K,
                    const int64_t *ids, int n, long num_rows, void *out, int bf16, int num_threads) {
    if (!valid(format, K) || n < 0) return -2;
    for (int i = 0; ids && i < n; i++)
        if (ids[i] < 0 || ids[i] >= num_rows) return -3;
    const weight w = {format, half != 0, qs, scales, mins, K / 32};
    const size_t out_row = (size_t)K * (bf16 ? 2 : 4);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int i = 0; i < n; i++) {
        const size_t row = ids ? (size_t)ids[i] : (size_t)i;
        void *o = (char *)out + i * out_row;
        weight wf = w;
#define DEQUANT(F, H) (wf.format = F, wf.half = H, dequantize_row(&wf, row, o, bf16))
        FOR_EACH_FORMAT(DEQUANT)
    }
    return 0;
}

/* ---- one decode layer in one call ------------------------------------------------------ */

/* The attention of a decode-only step (paged_decode_rope in attention/csrc/paged_decode.c,
   passed in by address so the two rooms stay apart; `kv` is its `paged_kv`, opaque here). */
typedef int (*attention_fn)(const float *qkv, long ld, const float *cos, const float *sin,
                            const int64_t *slots, const void *kv, const int64_t *block_tables,
                            const int64_t *seq_lens, int num_seqs, int max_blocks, int group,
                            float scale, float *out, int num_threads);

/* A repacked weight as quant_matmul takes it. */
typedef struct {
    int format, half;
    const uint8_t *qs;
    const void *scales, *mins;
    int rows, cols;
} packed_weight;

/* What stays fixed between a layer's decode steps. */
typedef struct {
    packed_weight qkv, o, gate_up, down;
    const float *norm_1, *norm_2;
    float eps_1, eps_2;
    int num_heads, num_kv_heads, head_dim;
    float scale;
    const void *kv; /* the layer's KV cache (attention/csrc/paged_decode.c's paged_kv) */
} decode_layer_t;

/* What one step shares across layers: rotary angles and where each sequence's KV lives. */
typedef struct {
    const float *cos, *sin;
    const int64_t *slots, *block_tables, *seq_lens;
    int max_blocks;
} decode_step_t;

static int product(const packed_weight *w, const float *x, long ldx, int M, float *y, long ldy,
                   int exact, int op, const float *norm, float eps, int accumulate, int threads) {
    return quant_matmul(w->format, w->half, w->qs, w->scales, w->mins, w->rows, w->cols, x, ldx,
                        M, y, ldy, exact, op, norm, eps, accumulate, threads);
}

/* hidden [M, H] += the layer (M <= MAX_ROWS decode rows, one per sequence), in place: the
   five steps of the fused decode as one call from Python, whose per-call cost was a fifth
   of a batch-1 step. Return 0, or the first failing step's status. */
int decode_layer(const decode_layer_t *l, const decode_step_t *s, float *hidden, int M, int exact,
                 attention_fn attention, int num_threads) {
    if (M < 1 || M > MAX_ROWS) return -2;
    const int hidden_size = l->o.rows, q_size = l->num_heads * l->head_dim;
    float *qkv = malloc(sizeof(float) * (size_t)M * l->qkv.rows);
    float *attn = malloc(sizeof(float) * (size_t)M * q_size);
    float *gate_up = malloc(sizeof(float) * (size_t)M * l->gate_up.rows);
    int status = (!qkv || !attn || !gate_up) ? -1 : 0;
    if (!status)
        status = product(&l->qkv, hidden, hidden_size, M, qkv, l->qkv.rows, exact, RMS_NORM,
                         l->norm_1, l->eps_1, 0, num_threads);
    if (!status)
        status = attention(qkv, l->qkv.rows, s->cos, s->sin, s->slots, l->kv, s->block_tables,
                           s->seq_lens, M, s->max_blocks, l->num_heads / l->num_kv_heads,
                           l->scale, attn, num_threads);
    if (!status)
        status = product(&l->o, attn, q_size, M, hidden, hidden_size, exact, PLAIN, NULL, 0.f, 1,
                         num_threads);
    if (!status)
        status = product(&l->gate_up, hidden, hidden_size, M, gate_up, l->gate_up.rows, exact,
                         RMS_NORM, l->norm_2, l->eps_2, 0, num_threads);
    if (!status)
        status = product(&l->down, gate_up, l->gate_up.rows, M, hidden, hidden_size, exact,
                         SILU_MUL, NULL, 0.f, 1, num_threads);
    free(qkv), free(attn), free(gate_up);
    return status;
}

/* layers[0..n) of a decode step, one after another, then the model's final RMSNorm of
   hidden in place (with `final_norm`, when not NULL): one call from Python for the whole
   stack, where a call per layer cost ~3 µs of Python and ctypes each and torch's norm
   ~25 µs (together a fifth of the time a batch-1 step spent outside the kernels).
   Return 0 or the first failure's status. */
int decode_layers(const decode_layer_t *const *layers, int n, const decode_step_t *s,
                  float *hidden, int M, int exact, attention_fn attention,
                  const float *final_norm, float eps, int num_threads) {
    for (int i = 0; i < n; i++) {
        const int status = decode_layer(layers[i], s, hidden, M, exact, attention, num_threads);
        if (status) return status;
    }
    if (n > 0 && final_norm) { /* in place: each row is read whole before it is written */
        const int hidden_size = layers[0]->o.rows;
        prepare_x(hidden, hidden_size, M, hidden_size, RMS_NORM, final_norm, eps, hidden, 1);
    }
    return 0;
}
