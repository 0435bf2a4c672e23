/* The op's forward and backward on CPU: one fused loop per row, threads over rows (OpenMP).
 *
 * Built at first use by mallowspo_fast/ops/cpu_native.py with the system C compiler (-O3 -march=native
 * -fopenmp) and called through ctypes. Same math as the Triton kernels and ops/torch_rows.py (docs/kernels.md):
 * with z = post * y (y the raw logits, post the logit transform's scale),
 *
 *   m = max z,  s = sum e^(z - m),  w = sum e^(z - m) (z - m),  lse = m + log s,  H = log s - w / s,
 *   logp = (z[label] - m) - log s,
 *   dL/dy_j = post * (p_j (c - h log p_j) + g [j = label]),  c = g_lse - g - h H,  log p_j = z_j - lse,
 *
 * z - m and log p clamped below at FLOOR_Z (e^-200 is 0 in fp32: -inf logits never meet 0 * -inf).
 * A row's two reductions read it once from memory: the max pass brings the row into the core's cache and
 * the exp pass reads it there. Sums of e and e (z - m) run in fp32 over blocks of 128 elements (8 per
 * SIMD lane) and in float64 across blocks and for everything per row, so that the row sums are as exact
 * as fp32 inputs allow at any vocabulary size. Masked rows (mask[r] == 0) are skipped: their outputs and
 * gradient rows are 0.
 *
 * e^x: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r (relative error
 * below 1.1e-7 on [-87, 0.5], torch's expf: 6.3e-8; both about one fp32 ulp), scaled by 2^n. With AVX-512
 * the scaling is vscalefps, which gives 0 below the fp32 range, inf above it and keeps NaN; the portable
 * loop (any other CPU, auto-vectorised) builds 2^n from its bits and selects 0 / inf at the ends.
 *
 * The gradient's full, aligned vectors are written with non-temporal stores (they bypass the cache and
 * need no read of the line first). Without a logit scale (post == 1) the multiplications by it are
 * skipped; with a positive scale the max pass runs on the raw logits (post * max y = max post * y).
 *
 * Every row is computed by one thread with the same instruction sequence whatever the other rows, the
 * row count or the thread count: a row's results are bitwise the same alone and in any batch. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(MALLOWSPO_PORTABLE)
#define USE_AVX512 1
#include <immintrin.h>
#else
#define USE_AVX512 0
#endif

#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define FLOOR_Z -200.0f
#define BLK 128
/* e^r on [-ln2/2, ln2/2]: a Chebyshev fit of degree 6, coefficients rounded to fp32 */
#define C6 1.3944600941613317e-3f
#define C5 8.371911942958832e-3f
#define C4 4.166628047823906e-2f
#define C3 1.6666455566883087e-1f
#define C2 0.5f
#define C1 1.0f
#define C0 1.0f

int cpu_rows_simd_width(void) { return USE_AVX512 ? 16 : 1; }

/* ---------------------------------------------------------------------------------------------------- */
/* Portable loops (auto-vectorised by the compiler) */

static inline float fexp(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: t + magic rounds t to an integer in the low bits */
    float t = x * LOG2E;
    t = t < -130.0f ? -130.0f : (t > 130.0f ? 130.0f : t);
    float k = t + magic;
    int32_t kb;
    memcpy(&kb, &k, 4);
    float n = k - magic;
    float r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    float p = C6;
    p = p * r + C5;
    p = p * r + C4;
    p = p * r + C3;
    p = p * r + C2;
    p = p * r + C1;
    p = p * r + C0;
    int32_t e = kb - 0x4B400000;
    e = e < -126 ? -126 : (e > 127 ? 127 : e);
    int32_t bits = (e + 127) << 23;
    float sc;
    memcpy(&sc, &bits, 4);
    float y = p * sc;
    y = x < -87.33654f ? 0.0f : y;
    y = x > 88.72283f ? INFINITY : y;
    return y;
}

static inline float ld_f32(const void* base, int64_t i) { return ((const float*)base)[i]; }
static inline float ld_bf16(const void* base, int64_t i) {
    uint32_t b = ((uint32_t)((const uint16_t*)base)[i]) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline void st_f32(void* base, int64_t i, float v) { ((float*)base)[i] = v; }
static inline void st_bf16(void* base, int64_t i, float v) { /* round to nearest even, NaN stays NaN */
    uint32_t b;
    memcpy(&b, &v, 4);
    uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    ((uint16_t*)base)[i] = (uint16_t)(v != v ? 0x7FC0u : rounded);
}

#define ROW_SUMS_PORTABLE(LD)                                                                               \
    static void row_sums_##LD(const void* row, int64_t vocab, float post, float* m_out, double* s_out,     \
                              double* w_out) {                                                              \
        float m = -INFINITY;                                                                                \
        _Pragma("omp simd reduction(max:m)") for (int64_t j = 0; j < vocab; j++) {                          \
            float v = LD(row, j) * post;                                                                    \
            m = v > m ? v : m;                                                                              \
        }                                                                                                   \
        float shift = isfinite(m) ? m : 0.0f;                                                              \
        double s = 0.0, w = 0.0;                                                                            \
        for (int64_t j0 = 0; j0 < vocab; j0 += BLK) {                                                       \
            int64_t n = vocab - j0 < BLK ? vocab - j0 : BLK;                                                \
            float sb = 0.0f, wb = 0.0f;                                                                     \
            _Pragma("omp simd reduction(+:sb, wb)") for (int64_t j = 0; j < n; j++) {                      \
                float zm = LD(row, j0 + j) * post - shift;                                                  \
                zm = zm < FLOOR_Z ? FLOOR_Z : zm;                                                           \
                float e = fexp(zm);                                                                         \
                sb += e;                                                                                    \
                wb += e * zm;                                                                               \
            }                                                                                               \
            s += sb;                                                                                        \
            w += wb;                                                                                        \
        }                                                                                                   \
        *m_out = shift;                                                                                     \
        *s_out = s;                                                                                         \
        *w_out = w;                                                                                         \
    }

#define ROW_GRAD_PORTABLE(LD, ST)                                                                           \
    static void row_grad_##LD(const void* row, void* orow, int64_t vocab, float post, float l, float lo,   \
                              float c, float hr, float gr, int64_t k) {                                     \
        _Pragma("omp simd") for (int64_t j = 0; j < vocab; j++) {                                           \
            float lp = LD(row, j) * post - l;                                                               \
            lp = lp - lo;                                                                                   \
            lp = lp < FLOOR_Z ? FLOOR_Z : lp;                                                               \
            float v = fexp(lp) * (c - hr * lp);                                                             \
            v = j == k ? v + gr : v;                                                                        \
            ST(orow, j, v * post);                                                                          \
        }                                                                                                   \
    }

#if !USE_AVX512
ROW_SUMS_PORTABLE(ld_f32)
ROW_SUMS_PORTABLE(ld_bf16)
ROW_GRAD_PORTABLE(ld_f32, st_f32)
ROW_GRAD_PORTABLE(ld_bf16, st_bf16)
#else
/* ---------------------------------------------------------------------------------------------------- */
/* AVX-512 loops: 16 lanes, masked loads and stores for the last partial vector of a row */

static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(100.0f), x); /* +inf -> e^100 = inf; NaN stays NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(C6);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C0));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

/* 16 logits from j (lanes at or past the row's end: `fill`) */
static inline __m512 vld_ld_f32(const void* row, int64_t j, __mmask16 k, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), k, (const float*)row + j);
}
static inline __m512 vld_ld_bf16(const void* row, int64_t j, __mmask16 k, float fill) {
    __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t*)row + j);
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_mask_blend_ps(k, _mm512_set1_ps(fill), v);
}
#define ROW_SUMS_AVX512(LD)                                                                                 \
    static inline __attribute__((always_inline)) __m512 sums_step_##LD(                                      \
        const void* row, int64_t j, __mmask16 k, __m512 vpost, __m512 vshift, __m512 vfloor, __m512* wb,    \
        const int scaled, const int partial) {                                                              \
        __m512 z = vld_##LD(row, j, k, 0.0f);                                                               \
        if (scaled) z = _mm512_mul_ps(z, vpost);                                                            \
        __m512 zm = _mm512_max_ps(vfloor, _mm512_sub_ps(z, vshift)); /* NaN stays NaN */                    \
        __m512 e = exp512(zm);                                                                              \
        if (partial) {                                                                                      \
            e = _mm512_maskz_mov_ps(k, e);                                                                  \
            zm = _mm512_maskz_mov_ps(k, zm);                                                                \
        }                                                                                                   \
        *wb = _mm512_fmadd_ps(e, zm, *wb);                                                                  \
        return e;                                                                                           \
    }                                                                                                       \
    static inline __attribute__((always_inline)) void row_sums_body_##LD(                                   \
        const void* row, int64_t vocab, float post, float* m_out, double* s_out, double* w_out,            \
        const int scaled) {                                                                                 \
        const __m512 vpost = _mm512_set1_ps(post);                                                          \
        __m512 vm0 = _mm512_set1_ps(-INFINITY), vm1 = vm0;                                                  \
        int64_t j = 0;                                                                                      \
        for (; j + 32 <= vocab; j += 32) {                                                                  \
            vm0 = _mm512_max_ps(vm0, vld_##LD(row, j, 0xFFFF, 0.0f));                                       \
            vm1 = _mm512_max_ps(vm1, vld_##LD(row, j + 16, 0xFFFF, 0.0f));                                  \
        }                                                                                                   \
        for (; j < vocab; j += 16) {                                                                        \
            __mmask16 k = tail_mask(vocab - j);                                                             \
            vm0 = _mm512_mask_max_ps(vm0, k, vm0, vld_##LD(row, j, k, 0.0f));                               \
        }                                                                                                   \
        float m = _mm512_reduce_max_ps(_mm512_max_ps(vm0, vm1));                                            \
        if (scaled) { /* max(post y) = post max y for post > 0, post min y for post < 0 */                 \
            if (post >= 0.0f) m = m * post;                                                                 \
            else {                                                                                          \
                __m512 vn = _mm512_set1_ps(-INFINITY);                                                      \
                for (j = 0; j < vocab; j += 16) {                                                           \
                    __mmask16 k = tail_mask(vocab - j);                                                     \
                    vn = _mm512_mask_max_ps(vn, k, vn, _mm512_mul_ps(vld_##LD(row, j, k, 0.0f), vpost));    \
                }                                                                                           \
                m = _mm512_reduce_max_ps(vn);                                                               \
            }                                                                                               \
        }                                                                                                   \
        float shift = isfinite(m) ? m : 0.0f;                                                              \
        const __m512 vshift = _mm512_set1_ps(shift), vfloor = _mm512_set1_ps(FLOOR_Z);                      \
        __m512d s0 = _mm512_setzero_pd(), s1 = s0, w0 = s0, w1 = s0;                                        \
        for (int64_t j0 = 0; j0 < vocab; j0 += BLK) {                                                       \
            int64_t end = vocab - j0 < BLK ? vocab : j0 + BLK;                                              \
            __m512 sb = _mm512_setzero_ps(), wb = sb;                                                       \
            for (j = j0; j + 16 <= end; j += 16)                                                            \
                sb = _mm512_add_ps(sb, sums_step_##LD(row, j, 0xFFFF, vpost, vshift, vfloor, &wb, scaled, 0)); \
            if (j < end)                                                                                    \
                sb = _mm512_add_ps(sb, sums_step_##LD(row, j, tail_mask(end - j), vpost, vshift, vfloor, &wb,  \
                                                      scaled, 1));                                          \
            s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(sb)));                            \
            s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(                \
                                                                      _mm512_castps_pd(sb), 1))));          \
            w0 = _mm512_add_pd(w0, _mm512_cvtps_pd(_mm512_castps512_ps256(wb)));                            \
            w1 = _mm512_add_pd(w1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(                \
                                                                      _mm512_castps_pd(wb), 1))));          \
        }                                                                                                   \
        *m_out = shift;                                                                                     \
        *s_out = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));                                               \
        *w_out = _mm512_reduce_add_pd(_mm512_add_pd(w0, w1));                                               \
    }                                                                                                       \
    static void row_sums_##LD(const void* row, int64_t vocab, float post, float* m_out, double* s_out,     \
                              double* w_out) {                                                              \
        if (post == 1.0f)                                                                                   \
            row_sums_body_##LD(row, vocab, post, m_out, s_out, w_out, 0);                                   \
        else                                                                                                \
            row_sums_body_##LD(row, vocab, post, m_out, s_out, w_out, 1);                                   \
    }

/* Gradient stores: full 64-byte-aligned vectors go straight to memory (non-temporal: the gradient is not
 * read again here, and the store needs no read of the line first); the rest as ordinary masked stores. */
static inline void vst_st_f32(void* row, int64_t j, __mmask16 k, __m512 v) {
    float* p = (float*)row + j;
    if (k == 0xFFFF && ((uintptr_t)p & 63) == 0)
        _mm512_stream_ps(p, v);
    else
        _mm512_mask_storeu_ps(p, k, v);
}
static inline void vst_st_bf16(void* row, int64_t j, __mmask16 k, __m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    __m256i h = _mm512_cvtepi32_epi16(r);
    uint16_t* p = (uint16_t*)row + j;
    if (k == 0xFFFF && ((uintptr_t)p & 31) == 0)
        _mm256_stream_si256((__m256i*)p, h);
    else
        _mm256_mask_storeu_epi16(p, k, h);
}

#define ROW_GRAD_AVX512(LD, ST)                                                                             \
    static inline __attribute__((always_inline)) void row_grad_body_##LD(                                   \
        const void* row, void* orow, int64_t vocab, float post, float l, float lo, float c, float hr,       \
        float gr, int64_t k, const int scaled) {                                                            \
        const __m512 vpost = _mm512_set1_ps(post), vl = _mm512_set1_ps(l), vlo = _mm512_set1_ps(lo);        \
        const __m512 vc = _mm512_set1_ps(c), vh = _mm512_set1_ps(hr), vfloor = _mm512_set1_ps(FLOOR_Z);     \
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);       \
        for (int64_t j = 0; j < vocab; j += 16) {                                                           \
            __mmask16 m = tail_mask(vocab - j);                                                             \
            __m512 z = vld_##LD(row, j, m, 0.0f);                                                           \
            if (scaled) z = _mm512_mul_ps(z, vpost);                                                        \
            __m512 lp = _mm512_sub_ps(_mm512_sub_ps(z, vl), vlo);                                           \
            lp = _mm512_max_ps(vfloor, lp);                                                                 \
            __m512 v = _mm512_mul_ps(exp512(lp), _mm512_fnmadd_ps(vh, lp, vc));                            \
            if (k >= j && k < j + 16) {                                                                     \
                __mmask16 hit = _mm512_cmpeq_epi32_mask(lane, _mm512_set1_epi32((int)(k - j)));             \
                v = _mm512_mask_add_ps(v, hit, v, _mm512_set1_ps(gr));                                      \
            }                                                                                               \
            if (scaled) v = _mm512_mul_ps(v, vpost);                                                        \
            vst_##ST(orow, j, m, v);                                                                     \
        }                                                                                                   \
        _mm_sfence();                                                                                       \
    }                                                                                                       \
    static void row_grad_##LD(const void* row, void* orow, int64_t vocab, float post, float l, float lo,   \
                              float c, float hr, float gr, int64_t k) {                                     \
        if (post == 1.0f)                                                                                   \
            row_grad_body_##LD(row, orow, vocab, post, l, lo, c, hr, gr, k, 0);                             \
        else                                                                                                \
            row_grad_body_##LD(row, orow, vocab, post, l, lo, c, hr, gr, k, 1);                             \
    }

ROW_SUMS_AVX512(ld_f32)
ROW_SUMS_AVX512(ld_bf16)
ROW_GRAD_AVX512(ld_f32, st_f32)
ROW_GRAD_AVX512(ld_bf16, st_bf16)
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Entry points. z: rows of `vocab` logits, row r at byte offset r * row_stride; labels may be NULL (no
 * log-prob, nothing masked), mask NULL (every row live). Outputs fp32 [rows]. */

#define FORWARD(NAME, LD)                                                                                   \
    void NAME(const void* z, int64_t rows, int64_t vocab, int64_t row_stride, const int64_t* labels,       \
              const uint8_t* mask, float post, float* logp, float* ent, float* lse_out, float* lse_lo_out,   \
              int nthreads) {                                                                               \
        _Pragma("omp parallel for schedule(dynamic, 4) num_threads(nthreads)")                              \
        for (int64_t r = 0; r < rows; r++) {                                                                \
            if (mask && !mask[r]) {                                                                         \
                if (logp) logp[r] = 0.0f;                                                                   \
                ent[r] = lse_out[r] = lse_lo_out[r] = 0.0f;                                                 \
                continue;                                                                                   \
            }                                                                                               \
            const char* row = (const char*)z + r * row_stride;                                              \
            float shift;                                                                                    \
            double s, w;                                                                                    \
            row_sums_##LD(row, vocab, post, &shift, &s, &w);                                                \
            double log_s = log(s);                                                                          \
            double lse64 = (double)shift + log_s;                                                           \
            float lse = (float)lse64;                                                                       \
            lse_out[r] = lse;                                                                               \
            lse_lo_out[r] = (float)(lse64 - (double)lse);                                                   \
            ent[r] = (float)(log_s - w / s);                                                                \
            if (logp) logp[r] = (float)(((double)(LD(row, labels[r]) * post) - (double)shift) - log_s);    \
        }                                                                                                   \
    }

FORWARD(cpu_rows_forward_f32, ld_f32)
FORWARD(cpu_rows_forward_bf16, ld_bf16)

#define BACKWARD(NAME, LD, ESZ)                                                                             \
    void NAME(const void* z, void* out, int64_t rows, int64_t vocab, int64_t row_stride, int64_t out_stride, \
              const int64_t* labels, const uint8_t* mask, const float* lse, const float* lse_lo,          \
              const float* entropy, const float* g, const float* h, const float* g_lse, float post,      \
              int nthreads) {                                                                               \
        _Pragma("omp parallel for schedule(dynamic, 4) num_threads(nthreads)")                              \
        for (int64_t r = 0; r < rows; r++) {                                                                \
            char* orow = (char*)out + r * out_stride;                                                       \
            if (mask && !mask[r]) {                                                                         \
                memset(orow, 0, (size_t)vocab * ESZ);                                                       \
                continue;                                                                                   \
            }                                                                                               \
            float c = (g_lse[r] - g[r]) - h[r] * entropy[r];                                                \
            row_grad_##LD((const char*)z + r * row_stride, orow, vocab, post, lse[r], lse_lo[r], c, h[r],  \
                          g[r], labels ? labels[r] : -1);                                                   \
        }                                                                                                   \
    }

BACKWARD(cpu_rows_backward_f32, ld_f32, 4)
BACKWARD(cpu_rows_backward_bf16, ld_bf16, 2)

/* ---------------------------------------------------------------------------------------------------- */
/* The exp rate of this build (benchmarks/floor.py): each of `nthreads` threads sums e^x over the n
 * elements of x (cache-resident when n is small) `reps` times; nthreads * reps * n exponentials. */

double cpu_rows_exp_sum(const float* x, int64_t n, int64_t reps, int nthreads) {
    double total = 0.0;
    _Pragma("omp parallel for schedule(static, 1) reduction(+:total) num_threads(nthreads)")
    for (int t = 0; t < nthreads; t++) {
        for (int64_t rep = 0; rep < reps; rep++) {
#if USE_AVX512
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16)
                acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(tail_mask(n - j), exp512(
                                                                  _mm512_maskz_loadu_ps(tail_mask(n - j), x + j))));
            total += _mm512_reduce_add_ps(acc);
#else
            float acc = 0.0f;
            _Pragma("omp simd reduction(+:acc)") for (int64_t j = 0; j < n; j++) acc += fexp(x[j]);
            total += acc;
#endif
        }
    }
    return total;
}
