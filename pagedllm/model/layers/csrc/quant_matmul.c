/* Matrix products and row lookups computed straight from a GGUF file's quantized blocks.
 *
 * A weight row is the file's bytes: blocks of 32 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or
 * super-blocks of 256 (Q4_K, Q5_K, Q6_K). Every type is read here as a sequence of
 * 32-value blocks b, each holding small integers v[0..31] with
 *     w[32b + j] = scale[h] * v[j] + min[h],   h = j / 16
 * (the two halves differ only in Q6_K, whose scales cover 16 values). v is unsigned
 * (0..63: Q4_0 and Q5_0 keep their offset in `min`) except in Q8_0 and Q6_K (signed,
 * no min). `unpack_*` gives v,
 * `block_scales` gives scale and min: both computed exactly as gguf dequantizes, so
 * `dequantize_rows` reproduces gguf's float32 values bit for bit.
 *
 * `quant_matmul` has two modes:
 *  - integer (the fast path, as llama.cpp does): each row of x is quantized to int8 per
 *    block of 32 (one float scale, round to nearest), and blocks are multiplied with
 *    int8 dot products accumulated in int32 (AVX512-VNNI `vpdpbusd`, AVX2 `vpmaddubsw`,
 *    or plain C), then scaled per block in float32;
 *  - exact: x stays float32 and the products are float32 multiply-adds, so y equals a
 *    float32 matmul over the dequantized weights up to summation order.
 *
 * The instruction set is chosen when this file is compiled (pagedllm/cpu_kernels.py builds
 * it once per level the CPU supports and picks one at run time); every level computes the
 * same integer sums, so they agree exactly in integer mode.
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

#define MAX_ROWS 16 /* rows of x per call of the small-batch products */

/* GGML type ids, as in the GGUF file. */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* Bytes of one block (or super-block) and the 32-value blocks it holds. */
static int type_bytes(int type, int *blocks_per_unit) {
    *blocks_per_unit = 1;
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    }
    *blocks_per_unit = 8;
    switch (type) {
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    }
    return 0;
}

const char *level_name(void) {
#if defined(USE_VNNI)
    return "avx512vnni";
#elif defined(USE_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(USE_AVX2)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        float f = ldexpf((float)man, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Q4_K/Q5_K: the 6-bit scale and min of sub-block s, packed in 12 bytes. */
static inline void kquant_scale_min(const uint8_t *sc, int s, int *scale, int *min) {
    if (s < 4) {
        *scale = sc[s] & 63;
        *min = sc[s + 4] & 63;
    } else {
        *scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
        *min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
}

/* Where block b of a row starts: its unit (block or super-block) and sub-block index. */
static inline const uint8_t *unit_of(const uint8_t *row, int type, int b, int *sub) {
    int per_unit;
    int bytes = type_bytes(type, &per_unit);
    *sub = b % per_unit;
    return row + (size_t)(b / per_unit) * bytes;
}

/* scale[2] and min[2] of block b (see the header); computed as gguf computes them. */
static inline void block_scales(int type, const uint8_t *row, int b, float scale[2], float min[2]) {
    int s;
    const uint8_t *p = unit_of(row, type, b, &s);
    float d, m = 0.f;
    switch (type) {
    case Q4_1:
    case Q5_1:
    case Q8_0:
        d = half_to_float(p);
        if (type != Q8_0) m = half_to_float(p + 2);
        scale[0] = scale[1] = d;
        min[0] = min[1] = m;
        return;
    case Q4_0:
    case Q5_0: /* w = d * (q - 8) = d * q - 8 * d (16 for Q5_0): exact in float32 */
        d = half_to_float(p);
        scale[0] = scale[1] = d;
        min[0] = min[1] = -(type == Q4_0 ? 8.f : 16.f) * d;
        return;
    case Q4_K:
    case Q5_K: {
        int sc, mn;
        kquant_scale_min(p + 4, s, &sc, &mn);
        scale[0] = scale[1] = half_to_float(p) * (float)sc;
        min[0] = min[1] = -(half_to_float(p + 2) * (float)mn);
        return;
    }
    case Q6_K: {
        const int8_t *sc = (const int8_t *)(p + 192);
        d = half_to_float(p + 208);
        scale[0] = d * (float)sc[2 * s];
        scale[1] = d * (float)sc[2 * s + 1];
        min[0] = min[1] = 0.f;
        return;
    }
    }
}

/* The 32 integers v of block b, in plain C. */
static inline void unpack_scalar(int type, const uint8_t *row, int b, int8_t v[32]) {
    int s;
    const uint8_t *p = unit_of(row, type, b, &s);
    switch (type) {
    case Q4_0:
    case Q4_1: {
        const uint8_t *qs = p + (type == Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)(qs[j] & 15);
            v[j + 16] = (int8_t)(qs[j] >> 4);
        }
        return;
    }
    case Q5_0:
    case Q5_1: {
        const uint8_t *hp = p + (type == Q5_0 ? 2 : 4), *qs = hp + 4;
        uint32_t qh = (uint32_t)hp[0] | (uint32_t)hp[1] << 8 | (uint32_t)hp[2] << 16 |
                      (uint32_t)hp[3] << 24;
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)((qs[j] & 15) | ((qh >> j) & 1) << 4);
            v[j + 16] = (int8_t)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
        }
        return;
    }
    case Q8_0:
        memcpy(v, p + 2, 32);
        return;
    case Q4_K:
    case Q5_K: {
        const uint8_t *qs = p + (type == Q4_K ? 16 : 48) + 32 * (s / 2), *qh = p + 16;
        for (int j = 0; j < 32; j++) {
            int q = (s & 1) ? qs[j] >> 4 : qs[j] & 15;
            if (type == Q5_K) q |= ((qh[j] >> s) & 1) << 4;
            v[j] = (int8_t)q;
        }
        return;
    }
    case Q6_K: {
        const int half = s / 4, k = s % 4;
        const uint8_t *ql = p + 64 * half + 32 * (k & 1), *qh = p + 128 + 32 * half;
        for (int j = 0; j < 32; j++)
            v[j] = (int8_t)((((ql[j] >> (4 * (k >> 1))) & 15) | ((qh[j] >> (2 * k)) & 3) << 4) - 32);
        return;
    }
    }
}

#if defined(USE_AVX2)
/* Byte j of the result is 0xFF where bit j of `bits` is set. */
static inline __m256i bits_as_bytes(uint32_t bits) {
    const __m256i which_byte = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                  0x0303030303030303);
    const __m256i which_bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), which_byte);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, which_bit), which_bit);
}

static inline __m256i low_nibbles(__m256i x) { return _mm256_and_si256(x, _mm256_set1_epi8(15)); }

static inline __m256i high_nibbles(__m256i x) {
    return _mm256_and_si256(_mm256_srli_epi16(x, 4), _mm256_set1_epi8(15));
}

/* The 32 integers v of block b, in one vector (same values as unpack_scalar). */
static inline __m256i unpack(int type, const uint8_t *row, int b) {
    int s;
    const uint8_t *p = unit_of(row, type, b, &s);
    switch (type) {
    case Q4_0:
    case Q4_1: {
        __m128i raw = _mm_loadu_si128((const __m128i *)(p + (type == Q4_0 ? 2 : 4)));
        __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        return low_nibbles(both);
    }
    case Q5_0:
    case Q5_1: {
        const uint8_t *hp = p + (type == Q5_0 ? 2 : 4);
        uint32_t qh;
        memcpy(&qh, hp, 4);
        __m128i raw = _mm_loadu_si128((const __m128i *)(hp + 4));
        __m256i q = low_nibbles(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw));
        return _mm256_or_si256(q, _mm256_and_si256(bits_as_bytes(qh), _mm256_set1_epi8(16)));
    }
    case Q8_0:
        return _mm256_loadu_si256((const __m256i *)(p + 2));
    case Q4_K:
    case Q5_K: {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(p + (type == Q4_K ? 16 : 48) + 32 * (s / 2)));
        __m256i q = (s & 1) ? high_nibbles(raw) : low_nibbles(raw);
        if (type == Q5_K) {
            const __m256i bit = _mm256_set1_epi8((char)(1 << s));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 16));
            __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
            q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
        }
        return q;
    }
    case Q6_K: {
        const int half = s / 4, k = s % 4;
        __m256i ql = _mm256_loadu_si256((const __m256i *)(p + 64 * half + 32 * (k & 1)));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * half));
        __m256i lo = (k >> 1) ? high_nibbles(ql) : low_nibbles(ql);
        __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)),
                                      _mm256_set1_epi8(3));
        __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        return _mm256_sub_epi8(q, _mm256_set1_epi8(32));
    }
    }
    return _mm256_setzero_si256();
}

/* Eight int32 sums, each of four products of v and x: lanes 0-3 cover values 0-15, lanes
   4-7 values 16-31. v is unsigned (0..63) except in Q8_0 and Q6_K, where |v| is used and x
   takes v's sign, so the unsigned × signed instructions apply to both. */
static inline __m256i dot_u8(__m256i v, __m256i x) {
#if defined(USE_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), v, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(v, x), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 half_scales(const float s[2]) {
    return _mm256_set_m128(_mm_set1_ps(s[1]), _mm_set1_ps(s[0]));
}

static inline void flush_denormals(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }
#else
static inline void flush_denormals(void) {}
#endif

/* x quantized per block of 32: q = round(x / d) with d = max|x| / 127 (so q is never
   -128, which |v| * sign would overflow), and d * sum(q) for the min terms. */
typedef struct {
    int8_t *q;   /* [M, K] */
    float *d;    /* [M, K/32] */
    float *sums; /* [M, K/32] */
} quantized_x;

static void quantize_x(const float *x, int M, int K, quantized_x *out) {
    const int nb = K / 32;
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)r * K + 32 * b;
            int8_t *qb = out->q + (size_t)r * K + 32 * b;
            float amax = 0.f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                int q = (int)nearbyintf(xb[j] * inv);
                qb[j] = (int8_t)q;
                sum += q;
            }
            out->d[(size_t)r * nb + b] = d;
            out->sums[(size_t)r * nb + b] = d * (float)sum;
        }
}

static inline int is_signed(int type) { return type == Q8_0 || type == Q6_K; }

/* Integer mode for one weight row n: out[r] = x_r · w_n, summed block by block.
   Blocks go in pairs, each pair's two products summed before they reach the accumulator,
   so one row of x (decode) is not bound by the latency of a chain of adds. */
static inline __attribute__((always_inline)) void row_int(int type, const uint8_t *row, int nb,
                                                          const quantized_x *xq, int M, int K,
                                                          float *out /* [M] */) {
    float min_acc[MAX_ROWS] = {0};
#if defined(USE_AVX2)
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b += 2) {
        const int pair = b + 1 < nb; /* a lone last block when nb is odd */
        float scale[2][2], min[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
        __m256i v[2], u[2];
        __m256 sv[2];
        for (int k = 0; k <= pair; k++) {
            block_scales(type, row, b + k, scale[k], min[k]);
            v[k] = unpack(type, row, b + k);
            u[k] = is_signed(type) ? _mm256_sign_epi8(v[k], v[k]) : v[k];
            sv[k] = type == Q6_K ? half_scales(scale[k]) : _mm256_set1_ps(scale[k][0]);
        }
#if defined(USE_VNNI)
        if (pair) { /* both blocks in one 512-bit vector: lanes 0-7 block b, 8-15 block b+1 */
            const __m512i u2 = _mm512_inserti64x4(_mm512_castsi256_si512(u[0]), u[1], 1);
            const __mmask64 negative = is_signed(type)
                ? _mm512_movepi8_mask(_mm512_inserti64x4(_mm512_castsi256_si512(v[0]), v[1], 1))
                : 0;
            const __m512 sv2 = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(sv[0])), _mm256_castps_pd(sv[1]), 1));
            const __m512i which = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            for (int r = 0; r < M; r++) {
                const size_t i = (size_t)r * nb + b;
                __m512i x = _mm512_loadu_si512(xq->q + (size_t)r * K + 32 * b);
                if (is_signed(type)) x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                const __m512 d2 = _mm512_permutexvar_ps(
                    which, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(xq->d + i)))));
                const __m512 sum = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u2, x)),
                    _mm512_mul_ps(sv2, d2));
                acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(_mm512_castps512_ps256(sum),
                                                             _mm512_extractf32x8_ps(sum, 1)));
                min_acc[r] += min[0][0] * xq->sums[i] + min[1][0] * xq->sums[i + 1];
            }
            continue;
        }
#endif
        for (int r = 0; r < M; r++) {
            const size_t i = (size_t)r * nb + b;
            const int8_t *xp = xq->q + (size_t)r * K + 32 * b;
            __m256i x = _mm256_loadu_si256((const __m256i *)xp);
            if (is_signed(type)) x = _mm256_sign_epi8(x, v[0]);
            __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8(u[0], x)),
                                       _mm256_mul_ps(sv[0], _mm256_set1_ps(xq->d[i])));
            float m = min[0][0] * xq->sums[i];
            if (pair) {
                x = _mm256_loadu_si256((const __m256i *)(xp + 32));
                if (is_signed(type)) x = _mm256_sign_epi8(x, v[1]);
                sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8(u[1], x)),
                                      _mm256_mul_ps(sv[1], _mm256_set1_ps(xq->d[i + 1])), sum);
                m += min[1][0] * xq->sums[i + 1];
            }
            acc[r] = _mm256_add_ps(acc[r], sum);
            min_acc[r] += m;
        }
    }
    for (int r = 0; r < M; r++) out[r] = hsum8(acc[r]) + min_acc[r];
#else
    float acc[MAX_ROWS] = {0};
    for (int b = 0; b < nb; b++) {
        float scale[2], min[2];
        int8_t v[32];
        block_scales(type, row, b, scale, min);
        unpack_scalar(type, row, b, v);
        for (int r = 0; r < M; r++) {
            const size_t i = (size_t)r * nb + b;
            const int8_t *x = xq->q + (size_t)r * K + 32 * b;
            int sum[2] = {0, 0};
            for (int j = 0; j < 32; j++) sum[j / 16] += (is_signed(type) ? v[j] : (uint8_t)v[j]) * x[j];
            acc[r] += xq->d[i] * (scale[0] * (float)sum[0] + scale[1] * (float)sum[1]);
            min_acc[r] += min[0] * xq->sums[i];
        }
    }
    for (int r = 0; r < M; r++) out[r] = acc[r] + min_acc[r];
#endif
}

/* Exact mode for one weight row n: float32 products with the dequantized values. */
static inline __attribute__((always_inline)) void row_exact(int type, const uint8_t *row, int nb,
                                                            const float *x, const float *xsums,
                                                            int M, int K, float *out) {
    float min_acc[MAX_ROWS] = {0};
#if defined(USE_AVX2)
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        float scale[2], min[2];
        block_scales(type, row, b, scale, min);
        const __m256i v = unpack(type, row, b);
        const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 s0 = _mm256_set1_ps(scale[0]), s1 = _mm256_set1_ps(scale[1]);
        for (int r = 0; r < M; r++) {
            const float *xb = x + (size_t)r * K + 32 * b;
            __m256 first = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            first = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), first);
            __m256 second = _mm256_mul_ps(w2, _mm256_loadu_ps(xb + 16));
            second = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), second);
            acc[r] = _mm256_fmadd_ps(s0, first, acc[r]);
            acc[r] = _mm256_fmadd_ps(s1, second, acc[r]);
            const float *xs = xsums + 2 * ((size_t)r * nb + b);
            min_acc[r] += min[0] * xs[0] + min[1] * xs[1];
        }
    }
    for (int r = 0; r < M; r++) out[r] = hsum8(acc[r]) + min_acc[r];
#else
    float acc[MAX_ROWS] = {0};
    for (int b = 0; b < nb; b++) {
        float scale[2], min[2];
        int8_t v[32];
        block_scales(type, row, b, scale, min);
        unpack_scalar(type, row, b, v);
        for (int r = 0; r < M; r++) {
            const float *xb = x + (size_t)r * K + 32 * b;
            const float *xs = xsums + 2 * ((size_t)r * nb + b);
            float sum[2] = {0.f, 0.f};
            for (int j = 0; j < 32; j++) sum[j / 16] += (float)v[j] * xb[j];
            acc[r] += scale[0] * sum[0] + scale[1] * sum[1];
            min_acc[r] += min[0] * xs[0] + min[1] * xs[1];
        }
    }
    for (int r = 0; r < M; r++) out[r] = acc[r] + min_acc[r];
#endif
}

/* One specialised copy of the row loop per type: `type` is a constant in each case. */
#define FOR_EACH_TYPE(CALL)                                                                    \
    switch (type) {                                                                            \
    case Q4_0: CALL(Q4_0); break;                                                              \
    case Q4_1: CALL(Q4_1); break;                                                              \
    case Q5_0: CALL(Q5_0); break;                                                              \
    case Q5_1: CALL(Q5_1); break;                                                              \
    case Q8_0: CALL(Q8_0); break;                                                              \
    case Q4_K: CALL(Q4_K); break;                                                              \
    case Q5_K: CALL(Q5_K); break;                                                              \
    case Q6_K: CALL(Q6_K); break;                                                              \
    }

/* Ask for the bytes PREFETCH_BYTES past this row's start: a decode step streams every
   weight once from memory, and hardware prefetchers alone left each core at ~2.7 GB/s. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif
static inline void prefetch_ahead(const uint8_t *row, long row_bytes) {
#if defined(USE_AVX2)
    for (long off = 0; off < row_bytes; off += 64)
        _mm_prefetch((const char *)row + PREFETCH_BYTES + off, _MM_HINT_T0);
#else
    (void)row, (void)row_bytes;
#endif
}

static int valid_shape(int type, long row_bytes, int K) {
    int per_unit, bytes = type_bytes(type, &per_unit);
    if (bytes == 0 || K <= 0 || K % (32 * per_unit)) return 0;
    return row_bytes == (long)(K / (32 * per_unit)) * bytes;
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

/* y[M, N] (row stride ldy) = op(x)[M, K] @ w[N, K]^T for w in the file's blocks of `type`,
   or y += that (`accumulate`: a residual add). x's rows are ldx apart; `op` is PLAIN,
   RMS_NORM (with `norm_weight`, `eps`) or SILU_MUL (x rows hold 2K values).
   Return 0; -1 when scratch memory could not be allocated; -2 for a type this file does
   not know, a row size that does not match K, M outside 1..MAX_ROWS or an unknown op
   (y untouched). */
int quant_matmul(int type, const uint8_t *w, long row_bytes, int N, int K, const float *x,
                 long ldx, int M, float *y, long ldy, int exact, int op, const float *norm_weight,
                 float eps, int accumulate, int num_threads) {
    if (!valid_shape(type, row_bytes, K) || M < 1 || M > MAX_ROWS || N < 0) return -2;
    if (op < PLAIN || op > SILU_MUL || (op == RMS_NORM && !norm_weight)) return -2;
    const int nb = K / 32;
    quantized_x xq = {0};
    float *xsums = NULL, *xp = malloc(sizeof(float) * (size_t)M * K);
    if (!xp) return -1;
    prepare_x(x, ldx, M, K, op, norm_weight, eps, xp, 1);
    if (exact) {
        xsums = malloc(sizeof(float) * 2 * (size_t)M * nb);
        if (!xsums) {
            free(xp);
            return -1;
        }
        for (size_t i = 0; i < 2 * (size_t)M * nb; i++) {
            const float *xh = xp + 16 * i; /* halves of 16 are contiguous in a row of xp */
            float s = 0.f;
            for (int j = 0; j < 16; j++) s += xh[j];
            xsums[i] = s;
        }
    } else {
        xq.q = malloc((size_t)M * K);
        xq.d = malloc(sizeof(float) * (size_t)M * nb);
        xq.sums = malloc(sizeof(float) * (size_t)M * nb);
        if (!xq.q || !xq.d || !xq.sums) {
            free(xq.q), free(xq.d), free(xq.sums), free(xp);
            return -1;
        }
        quantize_x(xp, M, K, &xq);
    }
#pragma omp parallel num_threads(num_threads)
    {
        flush_denormals();
        float out[MAX_ROWS];
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const uint8_t *row = w + (size_t)n * row_bytes;
            prefetch_ahead(row, row_bytes);
            if (exact) {
#define EXACT(T) row_exact(T, row, nb, xp, xsums, M, K, out)
                FOR_EACH_TYPE(EXACT)
            } else {
#define INT(T) row_int(T, row, nb, &xq, M, K, out)
                FOR_EACH_TYPE(INT)
            }
            for (int r = 0; r < M; r++) {
                float *yr = y + (size_t)r * ldy + n;
                *yr = accumulate ? *yr + out[r] : out[r];
            }
        }
    }
    free(xsums), free(xq.q), free(xq.d), free(xq.sums), free(xp);
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
    x = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(x, 16), one))), 16);
    y = _mm256_srli_epi32(_mm256_add_epi32(y, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(y, 16), one))), 16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(x, y), 0xD8);
}
#endif

/* One row's values as float32, or as bfloat16 rounded to nearest even. */
static inline __attribute__((always_inline)) void dequantize_row(int type, const uint8_t *row,
                                                                 int nb, void *out, int bf16) {
    for (int b = 0; b < nb; b++) {
        float scale[2], min[2], values[32];
        block_scales(type, row, b, scale, min);
#if defined(USE_AVX2)
        const __m256i v = unpack(type, row, b);
        const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        __m256 w[4];
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale[i / 2]),
                                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])),
                                   _mm256_set1_ps(min[i / 2]));
        if (bf16) {
            __m256i *o = (__m256i *)((uint16_t *)out + 32 * b);
            _mm256_storeu_si256(o, bf16_pack(w[0], w[1]));
            _mm256_storeu_si256(o + 1, bf16_pack(w[2], w[3]));
        } else {
            for (int i = 0; i < 4; i++) _mm256_storeu_ps((float *)out + 32 * b + 8 * i, w[i]);
        }
        continue;
#else
        int8_t v[32];
        unpack_scalar(type, row, b, v);
        for (int j = 0; j < 32; j++) values[j] = scale[j / 16] * (float)v[j] + min[j / 16];
#endif
        if (bf16) {
            uint16_t *o = (uint16_t *)out + 32 * b;
            for (int j = 0; j < 32; j++) o[j] = float_to_bf16(values[j]);
        } else {
            memcpy((float *)out + 32 * b, values, sizeof values);
        }
    }
}

/* out[i] = row ids[i] of w dequantized (ids NULL: rows 0..n-1), float32 or bfloat16.
   Return 0, or -2 for an unknown type or a row size that does not match K; every id
   must be in range (the caller checks it). */
int dequantize_rows(int type, const uint8_t *w, long row_bytes, int K, const int64_t *ids, int n,
                    void *out, int bf16, int num_threads) {
    if (!valid_shape(type, row_bytes, K) || n < 0) return -2;
    const int nb = K / 32;
    const size_t out_row = (size_t)K * (bf16 ? 2 : 4);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int i = 0; i < n; i++) {
        const uint8_t *row = w + (size_t)(ids ? ids[i] : i) * row_bytes;
        void *o = (char *)out + i * out_row;
#define DEQUANT(T) dequantize_row(T, row, nb, o, bf16)
        FOR_EACH_TYPE(DEQUANT)
    }
    return 0;
}
