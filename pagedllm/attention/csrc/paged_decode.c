/* Decode attention that reads the paged KV cache in place, for float32 on the CPU.
 *
 * The torch path gathers every decode sequence's blocks into a padded copy and runs SDPA
 * on it: at 64 sequences of a few hundred tokens that copy (and the padded reads) cost
 * more than the layer's matmuls. Here each (sequence, KV head) pair, one work item, walks
 * the sequence's block table: pass 1 scores the query heads sharing that KV head against
 * each key, a softmax in float32 (max subtracted), pass 2 sums the values.
 * Each key and value is read once, straight from its block.
 *
 * query [B, Hkv * G, D], key/value cache [num_blocks, block_size, Hkv, D],
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

/* Token t's row in a cache half. block_size is a power of two whenever the engine runs
   (checked by the caller), so the block and the offset are a shift and a mask: a 64-bit
   division per token cost more than the arithmetic it feeds. */
static inline const float *token_row(const float *cache, const int64_t *table, int64_t t,
                                     int block_size, size_t block_stride, size_t token_stride) {
    const int shift = __builtin_ctz((unsigned)block_size);
    return cache + (size_t)table[t >> shift] * block_stride +
           (size_t)(t & (block_size - 1)) * token_stride;
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
static inline void prefetch_head(const float *p, int head_dim) {
#if defined(__SSE__)
    for (int d = 0; d < head_dim; d += 16) _mm_prefetch((const char *)(p + d), _MM_HINT_T0);
#else
    (void)p, (void)head_dim;
#endif
}

/* One work item: the `group` query heads that share KV head h of one sequence. Pass 1
   scores them against each of the sequence's keys, a softmax, pass 2 sums the values. */
static void attend_one_kv_head(const float *q, const float *key_cache, const float *value_cache,
                               const int64_t *table, int64_t len, int block_size, int h, int group,
                               int head_dim, size_t block_stride, size_t token_stride, float scale,
                               float *scores /* [group, len] */, float *o /* [group, D] */) {
    /* head h's slice of every token row: the caches offset by h heads */
    const float *keys = key_cache + (size_t)h * head_dim, *values = value_cache + (size_t)h * head_dim;
    for (int64_t t = 0; t < len; t++) {
        if (t + AHEAD < len)
            prefetch_head(token_row(keys, table, t + AHEAD, block_size, block_stride, token_stride),
                          head_dim);
        const float *k = token_row(keys, table, t, block_size, block_stride, token_stride);
        for (int g = 0; g < group; g++) {
            const float *qg = q + (size_t)g * head_dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < head_dim; d++) s += qg[d] * k[d];
            scores[(size_t)g * len + t] = s * scale;
        }
    }
    for (int g = 0; g < group; g++) {
        softmax(scores + (size_t)g * len, len);
        memset(o + (size_t)g * head_dim, 0, sizeof(float) * head_dim);
    }
    for (int64_t t = 0; t < len; t++) {
        if (t + AHEAD < len)
            prefetch_head(token_row(values, table, t + AHEAD, block_size, block_stride, token_stride),
                          head_dim);
        const float *v = token_row(values, table, t, block_size, block_stride, token_stride);
        for (int g = 0; g < group; g++) {
            const float p = scores[(size_t)g * len + t];
            float *og = o + (size_t)g * head_dim;
#pragma omp simd
            for (int d = 0; d < head_dim; d++) og[d] += p * v[d];
        }
    }
}

/* Return 0, or -1 when a score buffer could not be allocated. Work items are (sequence,
   KV head) pairs, so even one sequence keeps every thread busy. */
int paged_decode_attention(const float *query, const float *key_cache, const float *value_cache,
                           const int64_t *block_tables, const int64_t *seq_lens, int num_seqs,
                           int max_blocks, int block_size, int num_kv_heads, int group,
                           int head_dim, float scale, float *out, int num_threads) {
    const int num_heads = num_kv_heads * group;
    const size_t token_stride = (size_t)num_kv_heads * head_dim;
    const size_t block_stride = (size_t)block_size * token_stride;
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
            attend_one_kv_head(query + first, key_cache, value_cache,
                               block_tables + (size_t)b * max_blocks, seq_lens[b], block_size, h,
                               group, head_dim, block_stride, token_stride, scale, scores,
                               out + first);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* A decode step's attention straight from the fused QKV projection, one token per sequence:
   q and k are rotated (rotate-half convention, as transformers' Llama: cos/sin rows hold
   both halves' angles), k and v are written to their cache slots, then each query attends
   as in paged_decode_attention. qkv rows are [q (Hq*D) | k (Hkv*D) | v (Hkv*D)], ld apart.
   Return 0, or -1 when a buffer could not be allocated. */
int paged_decode_rope(const float *qkv, long ld, const float *cos, const float *sin,
                      const int64_t *slots, float *key_cache, float *value_cache,
                      const int64_t *block_tables, const int64_t *seq_lens, int num_seqs,
                      int max_blocks, int block_size, int num_kv_heads, int group, int head_dim,
                      float scale, float *out, int num_threads) {
    const int num_heads = num_kv_heads * group, half = head_dim / 2;
    const size_t q_size = (size_t)num_heads * head_dim, kv_size = (size_t)num_kv_heads * head_dim;
    float *query = malloc(sizeof(float) * q_size * (num_seqs > 0 ? num_seqs : 1));
    if (!query) return -1;
    for (int b = 0; b < num_seqs; b++) {
        const float *row = qkv + (size_t)b * ld, *c = cos + (size_t)b * head_dim,
                    *s = sin + (size_t)b * head_dim;
        float *key = key_cache + (size_t)slots[b] * kv_size;
        for (int h = 0; h < num_heads + num_kv_heads; h++) {
            const float *x = row + (size_t)h * head_dim;
            float *o = h < num_heads ? query + (size_t)b * q_size + (size_t)h * head_dim
                                     : key + (size_t)(h - num_heads) * head_dim;
            for (int i = 0; i < half; i++) {
                const float first = x[i], second = x[i + half];
                o[i] = first * c[i] - second * s[i];
                o[i + half] = second * c[i + half] + first * s[i + half];
            }
        }
        memcpy(value_cache + (size_t)slots[b] * kv_size, row + q_size + kv_size,
               sizeof(float) * kv_size);
    }
    int status = paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                        num_seqs, max_blocks, block_size, num_kv_heads, group,
                                        head_dim, scale, out, num_threads);
    free(query);
    return status;
}
