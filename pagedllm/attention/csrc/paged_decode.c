/* Decode attention that reads the paged KV cache in place, on the CPU.
 *
 * The torch path gathers every decode sequence's blocks into a padded copy and runs SDPA
 * on it: at 64 sequences of a few hundred tokens that copy (and the padded reads) cost
 * more than the layer's matmuls. Here each (sequence, KV head) pair, one work item, walks
 * the sequence's block table: pass 1 scores the query heads sharing that KV head against
 * each key, a softmax in float32 (max subtracted), pass 2 sums the values.
 * Each key and value is read once, straight from its block, in the cache's own format
 * (float32, bf16, f16, int8 with a scale per token and head, fp8 e4m3/e5m2 with a scale
 * per layer): a head's row is widened to float32 in a small buffer on the stack, never
 * the cache.
 *
 * query [B, Hkv * G, D], a cache half [num_blocks, block_size, Hkv, D] (paged_kv below),
 * block_tables [B, max_blocks] (int64), seq_lens [B] (int64), out [B, Hkv * G, D].
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE__)
#include <immintrin.h>
static inline void flush_denormals(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }
#else
static inline void flush_denormals(void) {}
#endif

/* The cache's storage formats (KV_FORMATS in kv_cache.py names the same codes). */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_INT8 = 3, KV_FP8_E4M3 = 4, KV_FP8_E5M2 = 5 };
#define MAX_HEAD_DIM 256

/* One layer's cache as the kernels read and write it: two halves of
   [num_blocks, block_size, Hkv, D] elements of `format`; for int8 one float16 scale per
   (slot, KV head) in each half's scales, for fp8 one scale per half (values are stored
   divided by it). */
typedef struct {
    void *key, *value;
    uint16_t *key_scales, *value_scales;
    float key_scale, value_scale;
    int format, block_size, num_kv_heads, head_dim;
    int window; /* a sliding-window layer's span (keys before the last `window` unseen), or 0 */
} paged_kv;

static inline size_t element_size(int format) {
    return format == KV_F32 ? 4 : format <= KV_F16 ? 2 : 1;
}

/* Token t's slot (its row of the flattened cache). block_size is a power of two whenever
   the engine runs (checked by the caller), so the block and the offset are a shift and a
   mask: a 64-bit division per token cost more than the arithmetic it feeds. */
static inline size_t token_slot(const int64_t *table, int64_t t, int block_size) {
    const int shift = __builtin_ctz((unsigned)block_size);
    return (size_t)table[t >> shift] * (size_t)block_size + (size_t)(t & (block_size - 1));
}

/* IEEE half → float for machines without F16C. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        const float v = ldexpf((float)man, -24); /* subnormal (or zero) */
        return sign ? -v : v;
    }
    uint32_t bits = sign | ((exp == 31 ? 255 : exp - 15 + 127) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* An fp8 byte as the half with the same value (e5m2: the half's top byte; e4m3: its bits
   moved into a half's fields, which reads 2^-8 of the value, subnormals included). */
static inline uint16_t fp8_as_half(uint8_t b, int format) {
    return format == KV_FP8_E5M2 ? (uint16_t)(b << 8)
                                 : (uint16_t)(((b & 0x80) << 8) | ((b & 0x7f) << 7));
}

#if defined(__AVX2__) && defined(__F16C__)
/* Eight elements of a cache half from element i, as floats (int8 and fp8 before their
   scales): the AVX2 kernel's row loads, and the scalar kernel's row widening. */
static inline __m256 widen8(const void *half, int format, size_t i) {
    switch (format) {
    case KV_F32: return _mm256_loadu_ps((const float *)half + i);
    case KV_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)half + i))), 16));
    case KV_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)half + i)));
    case KV_INT8:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)half + i))));
    default: {
        const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)((const uint8_t *)half + i)));
        if (format == KV_FP8_E5M2) return _mm256_cvtph_ps(_mm_slli_epi16(b, 8));
        const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                       _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
        return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
    }
    }
}
#endif

/* Element i of a cache half as a float (int8 and fp8 before their scales). */
static inline float element_to_float(const void *half, int format, size_t i) {
    switch (format) {
    case KV_F32: return ((const float *)half)[i];
    case KV_BF16: {
        const uint32_t bits = (uint32_t)((const uint16_t *)half)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    case KV_F16: return half_to_float(((const uint16_t *)half)[i]);
    case KV_INT8: return (float)((const int8_t *)half)[i];
    default: {
        const float factor = format == KV_FP8_E4M3 ? 256.f : 1.f;
        return factor * half_to_float(fp8_as_half(((const uint8_t *)half)[i], format));
    }
    }
}

/* Head h of slot `slot` in one cache half, as float32: the row itself for float32, else
   widened into buf (MAX_HEAD_DIM floats). The int8 and fp8 scales are left to the caller. */
static const float *load_head(const void *half, int format, size_t slot, int h, int num_kv_heads,
                              int head_dim, float *buf) {
    const size_t first = (slot * (size_t)num_kv_heads + (size_t)h) * (size_t)head_dim;
    if (format == KV_F32) return (const float *)half + first;
    int d = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; d + 8 <= head_dim; d += 8) _mm256_storeu_ps(buf + d, widen8(half, format, first + d));
#endif
    for (; d < head_dim; d++) buf[d] = element_to_float(half, format, first + (size_t)d);
    return buf;
}

/* |x| as a small float's code (man_bits of mantissa, exponent bias `bias`), rounded to
   nearest even and clamped to `largest`, as torch converts after a clamp: half (10, 15),
   fp8 e4m3 (3, 7) and e5m2 (2, 15). The quotient by the value's quantum is the code's
   mantissa part, subnormals included; a rounding up into the next binade carries into
   the exponent field by the addition. */
static uint32_t small_float_code(float x, int man_bits, int bias, float largest) {
    float a = fabsf(x);
    if (!(a <= largest)) a = largest;
    if (a == 0.f) return 0;
    int e;
    frexpf(a, &e); /* a = m 2^e with m in [0.5, 1): the exponent is e - 1 */
    const int exponent = e - 1 < 1 - bias ? 1 - bias : e - 1;
    const uint32_t mantissa = (uint32_t)nearbyintf(ldexpf(a, man_bits - exponent));
    return ((uint32_t)(exponent + bias - 1) << man_bits) + mantissa;
}

static inline uint8_t float_to_fp8(float x, int format) {
    const uint32_t code = format == KV_FP8_E4M3 ? small_float_code(x, 3, 7, 448.f)
                                                : small_float_code(x, 2, 15, 57344.f);
    return (uint8_t)((signbit(x) ? 0x80 : 0) | code);
}

static inline uint16_t float_to_half(float x) {
    return (uint16_t)((signbit(x) ? 0x8000 : 0) | small_float_code(x, 10, 15, 65504.f));
}

/* Store x [head_dim] as head h of slot `slot` in one half of the cache, in its format. */
static void store_head(void *half, uint16_t *scales, float layer_scale, int format, size_t slot, int h,
                       int num_kv_heads, int head_dim, const float *x) {
    const size_t first = (slot * (size_t)num_kv_heads + (size_t)h) * (size_t)head_dim;
    if (format == KV_F32) {
        memcpy((float *)half + first, x, sizeof(float) * (size_t)head_dim);
    } else if (format == KV_BF16) {
        uint16_t *dst = (uint16_t *)half + first;
        for (int d = 0; d < head_dim; d++) {
            uint32_t bits;
            memcpy(&bits, x + d, 4);
            dst[d] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16); /* nearest even */
        }
    } else if (format == KV_F16) {
        uint16_t *dst = (uint16_t *)half + first;
        for (int d = 0; d < head_dim; d++) dst[d] = float_to_half(x[d]);
    } else if (format == KV_INT8) {
        int8_t *dst = (int8_t *)half + first;
        float amax = 0.f;
        for (int d = 0; d < head_dim; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
        const uint16_t stored = float_to_half(amax / 127.f); /* quantize by the stored scale */
        const float scale = half_to_float(stored);
        for (int d = 0; d < head_dim; d++) {
            const float q = scale > 0.f ? nearbyintf(x[d] / scale) : 0.f;
            dst[d] = (int8_t)(q > 127.f ? 127.f : q < -127.f ? -127.f : q);
        }
        scales[slot * (size_t)num_kv_heads + (size_t)h] = stored;
    } else {
        uint8_t *dst = (uint8_t *)half + first;
        for (int d = 0; d < head_dim; d++) dst[d] = float_to_fp8(x[d] / layer_scale, format);
    }
}

/* A slot's scale in one half: int8's per (slot, head), else the layer's. */
static inline float head_scale(const uint16_t *scales, float layer_scale, size_t slot, int h,
                               int num_kv_heads) {
    if (!scales) return layer_scale;
    const uint16_t stored = scales[slot * (size_t)num_kv_heads + (size_t)h];
#if defined(__F16C__)
    return _cvtsh_ss(stored);
#else
    return half_to_float(stored);
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
/* e^x for x <= 0 (scores minus their max), eight at a time: x = n ln2 + r with |r| <= ln2/2,
   e^r by its degree-6 Taylor polynomial (relative error < 2e-7), times 2^n. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f)); /* e^-87 is already below float's normals */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x); /* ln2, high part */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);      /* ln2, low part */
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#endif

/* row[t] = e^(row[t] - max) / sum over t: the softmax of one head's scores, in place. */
static void softmax(float *row, int64_t len) {
    float max_score = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < len; t++) max_score = row[t] > max_score ? row[t] : max_score;
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 sums = _mm256_setzero_ps();
    for (; t + 8 <= len; t += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + t), _mm256_set1_ps(max_score)));
        _mm256_storeu_ps(row + t, e);
        sums = _mm256_add_ps(sums, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sums);
    for (int i = 0; i < 8; i++) sum += lanes[i];
#endif
    for (; t < len; t++) {
        row[t] = expf(row[t] - max_score);
        sum += row[t];
    }
    const float inv = 1.f / sum;
    for (t = 0; t < len; t++) row[t] *= inv;
}

/* Keys and values are read one head's slice per token, a stride apart: ask for the slice
   AHEAD tokens on while this one is used (the hardware prefetchers miss the pattern). */
#define AHEAD 8
static inline void prefetch_head(const paged_kv *kv, const void *half, size_t slot, int h) {
#if defined(__SSE__)
    const size_t size = element_size(kv->format);
    const char *p = (const char *)half +
                    (slot * (size_t)kv->num_kv_heads + (size_t)h) * (size_t)kv->head_dim * size;
    for (size_t i = 0; i < (size_t)kv->head_dim * size; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
#else
    (void)kv, (void)half, (void)slot, (void)h;
#endif
}

/* One work item: the `group` query heads that share KV head h of one sequence. Pass 1
   scores them against each of the sequence's keys, a softmax, pass 2 sums the values.
   This is the plain version, for any head_dim and machine; attend_vector below is the
   one that runs where the vector unit takes whole rows. */
static void attend_scalar(const float *q, const paged_kv *kv, const int64_t *table,
                               int64_t start, int64_t len, int h, int group, float scale,
                               float *scores /* [group, len] */, float *o /* [group, D] */) {
    const int head_dim = kv->head_dim, block_size = kv->block_size, heads = kv->num_kv_heads;
    float buf[MAX_HEAD_DIM];
    for (int64_t t = 0; t < len; t++) {
        if (t + AHEAD < len) prefetch_head(kv, kv->key, token_slot(table, start + t + AHEAD, block_size), h);
        const size_t slot = token_slot(table, start + t, block_size);
        const float *k = load_head(kv->key, kv->format, slot, h, heads, head_dim, buf);
        const float k_scale = scale * head_scale(kv->key_scales, kv->key_scale, slot, h, heads);
        for (int g = 0; g < group; g++) {
            const float *qg = q + (size_t)g * head_dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < head_dim; d++) s += qg[d] * k[d];
            scores[(size_t)g * len + t] = s * k_scale;
        }
    }
    for (int g = 0; g < group; g++) {
        softmax(scores + (size_t)g * len, len);
        memset(o + (size_t)g * head_dim, 0, sizeof(float) * head_dim);
    }
    for (int64_t t = 0; t < len; t++) {
        if (t + AHEAD < len) prefetch_head(kv, kv->value, token_slot(table, start + t + AHEAD, block_size), h);
        const size_t slot = token_slot(table, start + t, block_size);
        const float *v = load_head(kv->value, kv->format, slot, h, heads, head_dim, buf);
        const float v_scale = head_scale(kv->value_scales, kv->value_scale, slot, h, heads);
        for (int g = 0; g < group; g++) {
            const float p = scores[(size_t)g * len + t] * v_scale;
            float *og = o + (size_t)g * head_dim;
#pragma omp simd
            for (int d = 0; d < head_dim; d++) og[d] += p * v[d];
        }
    }
}

#if defined(__AVX512F__)
/* Vectors of 16 floats; a row's LANES elements widened from the cache's format. */
#define LANES 16
typedef __m512 vec;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfma _mm512_fmadd_ps
#define vsum _mm512_reduce_add_ps
static inline vec widen(const void *half, int format, size_t i) {
    switch (format) {
    case KV_F32: return _mm512_loadu_ps((const float *)half + i);
    case KV_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)half + i))), 16));
    case KV_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)half + i)));
    case KV_INT8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)half + i))));
    default: {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)((const uint8_t *)half + i)));
        if (format == KV_FP8_E5M2) return _mm512_cvtph_ps(_mm256_slli_epi16(b, 8));
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                          _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
        return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
    }
    }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LANES 8
typedef __m256 vec;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfma _mm256_fmadd_ps
#define widen widen8
static inline float vsum(vec v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#endif

#ifdef LANES
/* attend_scalar's work with whole vectors, for head_dim a multiple of LANES: each key is
   widened once for up to four query heads, whose dot products stay in registers; the
   value pass walks the tokens once per LANES-wide slice of the output, its four
   accumulators in registers (the scalar loop kept them in memory: a load and a store
   per value and head). Measured on the 2-core Xeon: see BENCHMARKS.md (issue 14). */
static void attend_vector(const float *q, const paged_kv *kv, const int64_t *table, int64_t start,
                          int64_t len, int h, int group, float scale, float *scores, float *o) {
    const int head_dim = kv->head_dim, block_size = kv->block_size, heads = kv->num_kv_heads,
              format = kv->format;
    for (int64_t t = 0; t < len; t++) {
        if (t + AHEAD < len) prefetch_head(kv, kv->key, token_slot(table, start + t + AHEAD, block_size), h);
        const size_t slot = token_slot(table, start + t, block_size);
        const size_t first = (slot * (size_t)heads + (size_t)h) * (size_t)head_dim;
        const float k_scale = scale * head_scale(kv->key_scales, kv->key_scale, slot, h, heads);
        for (int g0 = 0; g0 < group; g0 += 4) {
            const int n = group - g0 < 4 ? group - g0 : 4;
            const float *q0 = q + (size_t)g0 * head_dim;
            vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
            for (int d = 0; d < head_dim; d += LANES) {
                const vec k = widen(kv->key, format, first + (size_t)d);
                a0 = vfma(vload(q0 + d), k, a0);
                if (n > 1) a1 = vfma(vload(q0 + head_dim + d), k, a1);
                if (n > 2) a2 = vfma(vload(q0 + 2 * head_dim + d), k, a2);
                if (n > 3) a3 = vfma(vload(q0 + 3 * head_dim + d), k, a3);
            }
            float *row = scores + (size_t)g0 * len + t;
            row[0] = vsum(a0) * k_scale;
            if (n > 1) row[len] = vsum(a1) * k_scale;
            if (n > 2) row[2 * len] = vsum(a2) * k_scale;
            if (n > 3) row[3 * len] = vsum(a3) * k_scale;
        }
    }
    for (int g = 0; g < group; g++) softmax(scores + (size_t)g * len, len);
    /* the values' scales folded into the probabilities once, not once per slice */
    for (int64_t t = 0; t < len; t++) {
        const size_t slot = token_slot(table, start + t, block_size);
        const float v_scale = head_scale(kv->value_scales, kv->value_scale, slot, h, heads);
        if (v_scale != 1.f)
            for (int g = 0; g < group; g++) scores[(size_t)g * len + t] *= v_scale;
    }
    for (int g0 = 0; g0 < group; g0 += 4) {
        const int n = group - g0 < 4 ? group - g0 : 4;
        const float *p0 = scores + (size_t)g0 * len;
        for (int d = 0; d < head_dim; d += LANES) {
            vec o0 = vzero(), o1 = vzero(), o2 = vzero(), o3 = vzero();
            for (int64_t t = 0; t < len; t++) {
                const size_t slot = token_slot(table, start + t, block_size);
                if (d == 0 && t + AHEAD < len)
                    prefetch_head(kv, kv->value, token_slot(table, start + t + AHEAD, block_size), h);
                const vec v = widen(kv->value, format,
                                    (slot * (size_t)heads + (size_t)h) * (size_t)head_dim + (size_t)d);
                o0 = vfma(vset1(p0[t]), v, o0);
                if (n > 1) o1 = vfma(vset1(p0[len + t]), v, o1);
                if (n > 2) o2 = vfma(vset1(p0[2 * len + t]), v, o2);
                if (n > 3) o3 = vfma(vset1(p0[3 * len + t]), v, o3);
            }
            float *out = o + (size_t)g0 * head_dim + d;
            vstore(out, o0);
            if (n > 1) vstore(out + head_dim, o1);
            if (n > 2) vstore(out + 2 * head_dim, o2);
            if (n > 3) vstore(out + 3 * head_dim, o3);
        }
    }
}
#endif

/* A sliding-window layer attends to the last kv->window positions only. */
static inline void attend_one_kv_head(const float *q, const paged_kv *kv, const int64_t *table,
                                      int64_t len, int h, int group, float scale, float *scores,
                                      float *o) {
    const int64_t start = kv->window > 0 && len > kv->window ? len - kv->window : 0;
#ifdef LANES
    if (kv->head_dim % LANES == 0) {
        attend_vector(q, kv, table, start, len - start, h, group, scale, scores, o);
        return;
    }
#endif
    attend_scalar(q, kv, table, start, len - start, h, group, scale, scores, o);
}

/* Return 0, -1 when a score buffer could not be allocated, -2 for a head_dim past
   MAX_HEAD_DIM. Work items are (sequence, KV head) pairs, so even one sequence keeps
   every thread busy. */
int paged_decode_attention(const float *query, const paged_kv *kv, const int64_t *block_tables,
                           const int64_t *seq_lens, int num_seqs, int max_blocks, int group,
                           float scale, float *out, int num_threads) {
    if (kv->head_dim > MAX_HEAD_DIM) return -2;
    const int num_kv_heads = kv->num_kv_heads, head_dim = kv->head_dim;
    const int num_heads = num_kv_heads * group;
    int64_t longest = 0;
    for (int b = 0; b < num_seqs; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    const int items = num_seqs * num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(items < num_threads ? (items > 0 ? items : 1) : num_threads)
    {
        flush_denormals();
        float *scores = malloc(sizeof(float) * (size_t)group * (longest > 0 ? longest : 1));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < items; item++) {
            if (!scores) continue;
            const int b = item / num_kv_heads, h = item % num_kv_heads;
            const size_t first = ((size_t)b * num_heads + (size_t)h * group) * head_dim;
            attend_one_kv_head(query + first, kv, block_tables + (size_t)b * max_blocks,
                               seq_lens[b], h, group, scale, scores, out + first);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* Write keys and values [T, Hkv, D] (rows ld_k and ld_v floats apart) to their slots, in
   the cache's format: the write path of every step whose attention runs elsewhere. */
void paged_kv_write(const paged_kv *kv, const float *key, long ld_k, const float *value, long ld_v,
                    const int64_t *slots, int num_tokens) {
    for (int t = 0; t < num_tokens; t++)
        for (int h = 0; h < kv->num_kv_heads; h++) {
            const size_t offset = (size_t)h * kv->head_dim;
            store_head(kv->key, kv->key_scales, kv->key_scale, kv->format, (size_t)slots[t], h,
                       kv->num_kv_heads, kv->head_dim, key + (size_t)t * ld_k + offset);
            store_head(kv->value, kv->value_scales, kv->value_scale, kv->format, (size_t)slots[t],
                       h, kv->num_kv_heads, kv->head_dim, value + (size_t)t * ld_v + offset);
        }
}

/* q and k of T tokens rotated out of the fused QKV projection (rotate-half convention, as
   transformers' Llama: a cos/sin row holds both halves' angles, head_dim apart). qkv rows
   are [q (Hq*D) | k (Hkv*D) | v (Hkv*D)], ld apart; query [T, Hq*D], key [T, Hkv*D]. The
   same float operations as torch's x * cos + rotate_half(x) * sin (no contraction under
   -std=c11), so the values are torch's. */
static void rotate_rows(const float *qkv, long ld, const float *cos, const float *sin, int T,
                        int num_heads, int num_kv_heads, int head_dim, float *query, float *key,
                        int num_threads) {
    const int half = head_dim / 2;
    const size_t q_size = (size_t)num_heads * head_dim, kv_size = (size_t)num_kv_heads * head_dim;
#pragma omp parallel for num_threads(T > 16 ? num_threads : 1) schedule(static)
    for (int b = 0; b < T; b++) {
        const float *row = qkv + (size_t)b * ld, *c = cos + (size_t)b * head_dim,
                    *s = sin + (size_t)b * head_dim;
        for (int h = 0; h < num_heads + num_kv_heads; h++) {
            const float *x = row + (size_t)h * head_dim;
            float *o = h < num_heads ? query + (size_t)b * q_size + (size_t)h * head_dim
                                     : key + (size_t)b * kv_size + (size_t)(h - num_heads) * head_dim;
            for (int i = 0; i < half; i++) {
                const float first = x[i], second = x[i + half];
                o[i] = first * c[i] - second * s[i];
                o[i + half] = second * c[i + half] + first * s[i + half];
            }
        }
    }
}

/* rotate_rows for a prefill (or any step the decode kernel does not take): the rotation
   that cost ~7 ms a layer in torch's five elementwise ops for a 2,048-token chunk of the
   default model. Return 0, or -2 for an odd head_dim. */
int rotate_qk(const float *qkv, long ld, const float *cos, const float *sin, int T,
              int num_heads, int num_kv_heads, int head_dim, float *query, float *key,
              int num_threads) {
    if (head_dim % 2 || T < 0) return -2;
    rotate_rows(qkv, ld, cos, sin, T, num_heads, num_kv_heads, head_dim, query, key, num_threads);
    return 0;
}

/* A decode step's attention straight from the fused QKV projection, one token per sequence:
   q and k are rotated (rotate-half convention, as transformers' Llama: cos/sin rows hold
   both halves' angles), k and v are written to their cache slots, then each query attends
   as in paged_decode_attention. qkv rows are [q (Hq*D) | k (Hkv*D) | v (Hkv*D)], ld apart.
   Return 0, or -1 when a buffer could not be allocated, -2 for a head_dim too large. */
int paged_decode_rope(const float *qkv, long ld, const float *cos, const float *sin,
                      const int64_t *slots, const paged_kv *kv, const int64_t *block_tables,
                      const int64_t *seq_lens, int num_seqs, int max_blocks, int group,
                      float scale, float *out, int num_threads) {
    const int num_kv_heads = kv->num_kv_heads, head_dim = kv->head_dim;
    const int num_heads = num_kv_heads * group;
    if (head_dim > MAX_HEAD_DIM) return -2;
    const size_t q_size = (size_t)num_heads * head_dim, kv_size = (size_t)num_kv_heads * head_dim;
    const size_t rows = num_seqs > 0 ? (size_t)num_seqs : 1;
    float *query = malloc(sizeof(float) * q_size * rows), *key = malloc(sizeof(float) * kv_size * rows);
    if (!query || !key) return free(query), free(key), -1;
    rotate_rows(qkv, ld, cos, sin, num_seqs, num_heads, num_kv_heads, head_dim, query, key, 1);
    paged_kv_write(kv, key, (long)kv_size, qkv + q_size + kv_size, ld, slots, num_seqs);
    int status = paged_decode_attention(query, kv, block_tables, seq_lens, num_seqs, max_blocks,
                                        group, scale, out, num_threads);
    free(query), free(key);
    return status;
}
