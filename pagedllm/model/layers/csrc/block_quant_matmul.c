/* Matrix products over GGUF block-quantized weights, for small batches on the CPU.
 *
 * A decode step with a few sequences reads every weight once per step: with float32
 * weights the step is bound by memory traffic (4 bytes per weight). These kernels read
 * the file's 4-bit or 8-bit blocks instead (0.75 or 1.125 bytes per weight with the
 * float32 scales) and do the multiply-adds in float32, so the result equals a float32
 * matmul over the dequantized weights up to summation order.
 *
 * Layout (prepared by pagedllm/model/layers/linear.py from the GGUF blocks):
 *   weight row n, block b of 32 columns: w[n, 32b + j] = scale[n, b] * q[n, b, j] (+ min[n, b])
 *   Q4: q in 0..15, 16 bytes per block, byte j holds element j (low nibble) and j + 16 (high);
 *   Q8: q in -128..127, 32 bytes per block.
 *   `mins` may be NULL (all zero); its term uses each block's sum of x, computed once per call.
 * y[M, N] = x[M, K] @ w[N, K]^T. K is a multiple of 32, M <= MAX_ROWS.
 * Denormals are flushed in every worker thread, as torch does on the engine's thread.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 16

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline void flush_denormals(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }

/* One block's 32 weights as four vectors of 8 floats, times x's 32 values, summed. */
static inline __m256 dot_block(const __m256 w[4], const float *xb) {
    __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), s);
    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), s);
    return _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), s);
}

static inline void unpack_q4(const uint8_t *qb, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i raw = _mm_loadu_si128((const __m128i *)qb);
    __m128i lo = _mm_and_si128(raw, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void unpack_q8(const uint8_t *qb, __m256 w[4]) {
    for (int i = 0; i < 4; i++) {
        __m128i raw = _mm_loadl_epi64((const __m128i *)(qb + 8 * i));
        w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
}

#define DEFINE_MATMUL(NAME, UNPACK, BLOCK_BYTES)                                          \
    void NAME(const float *x, int M, int K, const uint8_t *q, const float *scale,           \
              const float *mins, const float *xsum, int N, float *y, int num_threads) {     \
        const int nb = K / 32;                                                             \
        _Pragma("omp parallel num_threads(num_threads)") {                                 \
            flush_denormals();                                                             \
            _Pragma("omp for schedule(static)") for (int n = 0; n < N; n++) {              \
                __m256 acc[MAX_ROWS];                                                      \
                float min_acc[MAX_ROWS];                                                   \
                for (int r = 0; r < M; r++) {                                              \
                    acc[r] = _mm256_setzero_ps();                                          \
                    min_acc[r] = 0.f;                                                      \
                }                                                                          \
                const uint8_t *qr = q + (size_t)n * nb * (BLOCK_BYTES);                    \
                const float *sr = scale + (size_t)n * nb;                                  \
                for (int b = 0; b < nb; b++) {                                             \
                    __m256 w[4];                                                           \
                    UNPACK(qr + (size_t)b * (BLOCK_BYTES), w);                             \
                    const __m256 d = _mm256_set1_ps(sr[b]);                                \
                    for (int r = 0; r < M; r++)                                            \
                        acc[r] = _mm256_fmadd_ps(d, dot_block(w, x + (size_t)r * K + 32 * b), \
                                                 acc[r]);                                  \
                }                                                                          \
                if (mins) {                                                                \
                    const float *mr = mins + (size_t)n * nb;                               \
                    for (int r = 0; r < M; r++)                                            \
                        for (int b = 0; b < nb; b++) min_acc[r] += mr[b] * xsum[r * nb + b]; \
                }                                                                          \
                for (int r = 0; r < M; r++) y[(size_t)r * N + n] = hsum8(acc[r]) + min_acc[r]; \
            }                                                                              \
        }                                                                                  \
    }

#else /* portable C: the compiler vectorises what it can */

static inline void flush_denormals(void) {}

static inline void unpack_q4(const uint8_t *qb, float w[32]) {
    for (int j = 0; j < 16; j++) {
        w[j] = (float)(qb[j] & 15);
        w[j + 16] = (float)(qb[j] >> 4);
    }
}

static inline void unpack_q8(const uint8_t *qb, float w[32]) {
    for (int j = 0; j < 32; j++) w[j] = (float)(int8_t)qb[j];
}

#define DEFINE_MATMUL(NAME, UNPACK, BLOCK_BYTES)                                          \
    void NAME(const float *x, int M, int K, const uint8_t *q, const float *scale,           \
              const float *mins, const float *xsum, int N, float *y, int num_threads) {     \
        const int nb = K / 32;                                                             \
        _Pragma("omp parallel for num_threads(num_threads) schedule(static)")              \
        for (int n = 0; n < N; n++) {                                                      \
            float acc[MAX_ROWS] = {0};                                                     \
            const uint8_t *qr = q + (size_t)n * nb * (BLOCK_BYTES);                        \
            for (int b = 0; b < nb; b++) {                                                 \
                float w[32];                                                               \
                UNPACK(qr + (size_t)b * (BLOCK_BYTES), w);                                 \
                for (int r = 0; r < M; r++) {                                              \
                    const float *xb = x + (size_t)r * K + 32 * b;                          \
                    float s = 0.f;                                                         \
                    for (int j = 0; j < 32; j++) s += w[j] * xb[j];                        \
                    acc[r] += scale[(size_t)n * nb + b] * s;                               \
                    if (mins) acc[r] += mins[(size_t)n * nb + b] * xsum[r * nb + b];       \
                }                                                                          \
            }                                                                              \
            for (int r = 0; r < M; r++) y[(size_t)r * N + n] = acc[r];                     \
        }                                                                                  \
    }

#endif

DEFINE_MATMUL(q4_blocks_matmul, unpack_q4, 16)
DEFINE_MATMUL(q8_blocks_matmul, unpack_q8, 32)

/* Each block's sum of x, for the min term: [M, K/32]. */
static float *block_sums(const float *x, int M, int K) {
    const int nb = K / 32;
    float *sums = malloc(sizeof(float) * (size_t)M * nb);
    if (!sums) return NULL;
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += x[(size_t)r * K + 32 * b + j];
            sums[r * nb + b] = s;
        }
    return sums;
}

/* y = x @ w^T for w of `bits` 4 or 8. Return 0, or -1 when the block sums could not be
   allocated, -2 for M > MAX_ROWS, K not a multiple of 32 or other bits (y is then untouched). */
int block_quant_matmul(int bits, const float *x, int M, int K, const uint8_t *q,
                       const float *scale, const float *mins, int N, float *y, int num_threads) {
    if (M > MAX_ROWS || K % 32 || (bits != 4 && bits != 8)) return -2;
    float *xsum = mins ? block_sums(x, M, K) : NULL;
    if (mins && !xsum) return -1;
    if (bits == 4)
        q4_blocks_matmul(x, M, K, q, scale, mins, xsum, N, y, num_threads);
    else
        q8_blocks_matmul(x, M, K, q, scale, mins, xsum, N, y, num_threads);
    free(xsum);
    return 0;
}
