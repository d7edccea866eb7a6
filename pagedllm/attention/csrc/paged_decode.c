/* Decode attention that reads the paged KV cache in place, for float32 on the CPU.
 *
 * The torch path gathers every decode sequence's blocks into a padded copy and runs SDPA
 * on it: at 64 sequences of a few hundred tokens that copy (and the padded reads) cost
 * more than the layer's matmuls. Here each sequence (one work item) walks its own block
 * table: pass 1 scores all its query heads against each key row (every KV head of a token
 * is one contiguous row), a softmax in float32 (max subtracted), pass 2 sums the values.
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

/* Return 0, or -1 when a score buffer could not be allocated. */
int paged_decode_attention(const float *query, const float *key_cache, const float *value_cache,
                           const int64_t *block_tables, const int64_t *seq_lens, int num_seqs,
                           int max_blocks, int block_size, int num_kv_heads, int group,
                           int head_dim, float scale, float *out, int num_threads) {
    const int num_heads = num_kv_heads * group;
    const size_t token_stride = (size_t)num_kv_heads * head_dim;
    const size_t block_stride = (size_t)block_size * token_stride;
    int64_t longest = 0;
    for (int b = 0; b < num_seqs; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        flush_denormals();
        /* scores[head][t]; one sequence per work item, all its heads together, so each
           token's keys (all KV heads, one contiguous row) are read in one sweep */
        float *scores = malloc(sizeof(float) * (size_t)num_heads * (longest > 0 ? longest : 1));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < num_seqs; b++) {
            if (!scores) continue;
            const int64_t len = seq_lens[b];
            const int64_t *table = block_tables + (size_t)b * max_blocks;
            const float *q = query + (size_t)b * num_heads * head_dim;
            float *o = out + (size_t)b * num_heads * head_dim;
            /* pass 1: scores[i][t] = scale * q_i . k_t(head of i) */
            for (int64_t t = 0; t < len; t++) {
                const float *k = token_row(key_cache, table, t, block_size, block_stride,
                                           token_stride);
                for (int i = 0; i < num_heads; i++) {
                    const float *qi = q + (size_t)i * head_dim;
                    const float *kh = k + (size_t)(i / group) * head_dim;
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int d = 0; d < head_dim; d++) s += qi[d] * kh[d];
                    scores[(size_t)i * len + t] = s * scale;
                }
            }
            /* softmax over each head's scores (max subtracted), normalised in place */
            for (int i = 0; i < num_heads; i++) {
                float *row = scores + (size_t)i * len;
                float max_score = -INFINITY, sum = 0.f;
                for (int64_t t = 0; t < len; t++) max_score = row[t] > max_score ? row[t] : max_score;
                for (int64_t t = 0; t < len; t++) {
                    row[t] = expf(row[t] - max_score);
                    sum += row[t];
                }
                const float inv = 1.f / sum;
                for (int64_t t = 0; t < len; t++) row[t] *= inv;
                for (int d = 0; d < head_dim; d++) o[(size_t)i * head_dim + d] = 0.f;
            }
            /* pass 2: out_i = sum_t p_i,t v_t(head of i) */
            for (int64_t t = 0; t < len; t++) {
                const float *v = token_row(value_cache, table, t, block_size, block_stride,
                                           token_stride);
                for (int i = 0; i < num_heads; i++) {
                    const float p = scores[(size_t)i * len + t];
                    const float *vh = v + (size_t)(i / group) * head_dim;
                    float *oi = o + (size_t)i * head_dim;
#pragma omp simd
                    for (int d = 0; d < head_dim; d++) oi[d] += p * vh[d];
                }
            }
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
