/* Reading a GGUF file's quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
 *
 * Every type is read as a sequence of 32-value blocks b, each holding small integers
 * v[0..31] with
 *     w[32b + j] = scale[h] * v[j] + min[h],   h = j / 16
 * (the two halves differ only in Q6_K, whose scales cover 16 values). v is unsigned
 * (0..31: Q4_0 and Q5_0 keep their offset in `min`) except in Q8_0 and Q6_K (signed, no
 * min). `unpack_scalar` gives v and `block_scales` scale and min, computed exactly as gguf
 * dequantizes, so scale * v + min reproduces gguf's float32 values bit for bit.
 * Included by quant_matmul.c, which repacks the blocks once at load with these.
 */
#ifndef GGUF_DECODE_H
#define GGUF_DECODE_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

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

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
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

#endif
