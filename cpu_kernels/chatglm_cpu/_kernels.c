/* Integer-dot CPU kernels for the released ChatGLM int4 / int8 weight format.
 *
 * out[m, n] = scale[n] * sum_k x[m, k] * q[n, k] (+ bias[n]), with q read where it is stored: int8
 * [N, K] for 8 bits, int8 [N, K/2] for 4 bits (byte j holds q[2j] in its high nibble, q[2j+1] in its
 * low nibble, two's complement). Activations are quantized to int8 per group of `group` inputs
 * (scale = max|x| / 127, round half to even) and multiplied with integer dot products: the q4_0 x
 * q8_0 numerics of ggml and onnxruntime's accuracy_level 4. A step reads each weight byte once, in
 * place, so decode runs at the memory bandwidth instead of at the speed of unpacking nibbles to floats.
 * Beside them: float16/bfloat16 weights times float activations (float_linear: a decode step's float
 * matrices at the memory's bandwidth, and prompts on CPUs where torch has no fast GEMM in those dtypes) and
 * the attention of one query per sequence over a key/value cache (attend), both in float32 (attend in AVX2 code only).
 *
 * The module builds with default compiler flags and selects its code at run time: AVX2 (with FMA and
 * F16C), or AVX512-VNNI's one-instruction byte dot products where the CPU has them (AVX512-F/BW/VL/VNNI:
 * Intel Ice Lake, Sapphire Rapids and later, AMD Zen 4 and later). `isas()` lists what this CPU can run,
 * best first; on CPUs without AVX2/FMA/F16C (and non-x86 builds) it is empty and nothing else may be called.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The constants below are defined here only: the module exports each (see PyInit__kernels) and chatglm_cpu
 * reads them from it, so its checks and this code cannot disagree. */

enum { DTYPE_FLOAT32 = 0, DTYPE_FLOAT16 = 1, DTYPE_BFLOAT16 = 2 };
/* Codes of the instruction sets, as chatglm_cpu.linear passes them; ISA_NAMES[code] is the name isas() gives. */
enum { ISA_AVX2 = 0, ISA_AVX512_VNNI = 1 };
static const char *const ISA_NAMES[] = {[ISA_AVX2] = "avx2", [ISA_AVX512_VNNI] = "avx512_vnni"};

/* Inputs per activation scale, largest first: chatglm_cpu takes the largest that divides K. At most 128: the
 * AVX2 int4 kernel adds a group's products in 16-bit lanes, and four 32-input blocks is the most that stays exact. */
static const int GROUP_SIZES[] = {128, 64, 32};

/* Threads take the output columns in chunks from a shared counter, so a thread slowed by another process
 * on its core takes fewer of them: CHUNK_ROWS (whole blocks of 4), whose weights stay in the L2 while
 * several activation rows pass over them. A single activation row reuses nothing, so its chunks start at
 * half of each thread's share and shrink as the rows run out, down to CHUNK_ROWS: every chunk is one
 * stream that the prefetchers have to pick up again (see claim_rows). */
#define CHUNK_ROWS 32

/* The activation rows a float-weight pass takes (float_linear makes as many passes as it needs): their sums stay on
 * the stack, their float32 copies (16 x 4096 x 4 bytes for the 6B model) in the L2. */
#define FLOAT_PASS_ROWS 16

/* Activation rows from which the int4 kernels unpack a chunk's weights once into a buffer (see run_chunks): below
 * it, unpacking again for each row from bytes the L2 holds costs less. Timings: bench/README.md, "Tuning constants". */
#define UNPACK_ONCE_FROM_ROWS 8

/* Activation rows that a VNNI batch block (block_rows) takes at once, with 4 weight rows: their sums and the weight
 * vectors fit the 32 vector registers. Timings against the row-by-row loop: bench/README.md, "Tuning constants". */
#define VNNI_BATCH_ROWS 4

/* FloatWeight's input width must be a multiple of this: float_rows takes 4 vectors of 8 inputs per step. */
#define FLOAT_WIDTH_MULTIPLE 32
/* attend's head width must be a multiple of this: its loops take whole vectors of 8 floats. */
#define ATTEND_DIM_MULTIPLE 8

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_AVX2_BUILD 1
#include <immintrin.h>
#include <stdatomic.h>
#endif

#ifdef HAVE_AVX2_BUILD

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

typedef struct {
    int bits;
    int64_t M, N, K, group;
    int span;             /* int4: inputs per span of released bytes the kernels unpack at once (see quantize_row) */
    const int8_t *weight; /* [N, K * bits / 8] */
    const void *scale;    /* [N] */
    int scale_dtype;
    const void *bias;     /* [N] or NULL */
    int bias_dtype;
    const void *norm_weight; /* [K]: an RMSNorm to apply to each activation row first, or NULL */
    int norm_dtype;
    float norm_eps;
    int swiglu;           /* activation rows hold [gate | up], 2K wide; the input is silu(gate) * up */
    void *out;            /* [M, N] */
    int out_dtype;
    const int8_t *xq;     /* [M, K]: int4 jobs hold each span of 32, 64 or 128 inputs as its even inputs, then its odd ones */
    const float *xd;      /* [M, K / group] activation scales */
    const float *xzero;   /* int4: [M] the activations' product with the zero point 8 */
    const float *xf;      /* float weights (bits 16): [M, K] the activations in float32 */
    int weight_dtype;     /* float weights: DTYPE_FLOAT16 or DTYPE_BFLOAT16 */
    int threads;
    int isa;
} Job;

/* Bytes per value of a float32, float16 or bfloat16 buffer. */
static inline size_t dtype_bytes(int dtype) { return dtype == DTYPE_FLOAT32 ? 4 : 2; }

static inline float load_float(const void *data, int dtype, int64_t i) {
    if (dtype == DTYPE_FLOAT32) return ((const float *)data)[i];
    if (dtype == DTYPE_FLOAT16) return _cvtsh_ss(((const uint16_t *)data)[i]);
    uint32_t bits = (uint32_t)((const uint16_t *)data)[i] << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static inline void store_float(void *data, int dtype, int64_t i, float value) {
    if (dtype == DTYPE_FLOAT32) {
        ((float *)data)[i] = value;
    } else if (dtype == DTYPE_FLOAT16) {
        ((uint16_t *)data)[i] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
    } else {
        uint32_t bits;
        memcpy(&bits, &value, 4);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            bits |= 0x00400000u; /* NaN stays a (quiet) NaN */
        } else {
            bits += 0x7fffu + ((bits >> 16) & 1u); /* round half to even */
        }
        ((uint16_t *)data)[i] = (uint16_t)(bits >> 16);
    }
}

static inline float horizontal_sum(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

static inline __m256 load8(const void *data, int dtype, int64_t i) {
    if (dtype == DTYPE_FLOAT32) return _mm256_loadu_ps((const float *)data + i);
    __m128i halves = _mm_loadu_si128((const __m128i *)((const uint16_t *)data + i));
    if (dtype == DTYPE_FLOAT16) return _mm256_cvtph_ps(halves);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

/* count (a multiple of 8) values of `source` from index `start` -> float32 `destination`. */
static inline void to_float32(float *destination, const void *source, int dtype, int64_t start, int64_t count) {
    for (int64_t i = 0; i < count; i += 8) _mm256_storeu_ps(destination + i, load8(source, dtype, start + i));
}

static inline float horizontal_max(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* e^x in float32: x = n ln2 + r with |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r (relative error about
 * 1e-7), 2^n put into the exponent. 0 below -87.3, where float32's e^x leaves the normal numbers (torch's gives 0
 * or a subnormal there); infinity above 88.3 (torch's from 88.72: as a softmax weight or in 1 / (1 + e^x), the
 * same to float32). A NaN comes out as a number: callers keep their NaNs otherwise. */
static inline __m256 exp_ps(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.3f), highest = _mm256_set1_ps(88.3f);
    const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    const __m256 overflow = _mm256_cmp_ps(x, highest, _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), highest);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
    return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), overflow);
}

/* silu(gate) * up in float32, silu(a) = a / (1 + e^-a) as torch computes it; a NaN in either stays NaN. */
static inline __m256 swiglu8(__m256 gate, __m256 up) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 minus_gate = _mm256_xor_ps(gate, _mm256_set1_ps(-0.0f));
    return _mm256_mul_ps(_mm256_div_ps(gate, _mm256_add_ps(one, exp_ps(minus_gate))), up);
}

/* RMSNorm's factor for one row: 1 / sqrt(mean(x^2) + eps), in float32 as torch computes it (its order of
 * adding the squares aside, which moves the last bit at most). */
static float rms_factor(const void *x, int dtype, int64_t K, float eps) {
    __m256 squares[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32)
        for (int i = 0; i < 4; i++) {
            __m256 v = load8(x, dtype, k + 8 * i);
            squares[i] = _mm256_fmadd_ps(v, v, squares[i]);
        }
    float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(squares[0], squares[1]), _mm256_add_ps(squares[2], squares[3])));
    return 1.0f / sqrtf(sum / (float)K + eps);
}

/* One row of activations -> int8 per group, plus the group scales (`buffer`: `group` floats). A `span`
 * of 32, 64 or 128 stores each span of inputs as its even inputs, then its odd ones: the order in which the
 * int4 kernels take a span's nibbles from its bytes (0: natural order, for int8 weights).
 * Returns sum_g scale_g * sum_{k in g} xq[k] (the product with a constant weight of 1). */
static float quantize_row(const void *x, int dtype, int64_t K, int64_t group, int span, const Job *norm, float *buffer,
                          int8_t *xq, float *xd) {
    const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 largest = _mm256_set1_ps(FLT_MAX);
    const __m256i natural_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    /* within each 16-byte lane: even bytes first, then odd ones */
    const __m256i even_then_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                   0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    /* With an RMSNorm (norm->norm_weight), the row is normalized first: (x * factor) * weight in float32,
     * torch's order, without rounding to the input dtype in between. With norm->swiglu, the row is [gate | up]
     * (2K wide) and its input silu(gate) * up, in float32 too. */
    const int normed = norm->norm_weight != NULL;
    const __m256 factor = _mm256_set1_ps(normed ? rms_factor(x, dtype, K, norm->norm_eps) : 1.0f);
    float total = 0.0f;
    for (int64_t g = 0; g < K / group; g++) {
        __m256 amax = _mm256_setzero_ps(), not_finite = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
            __m256 v = load8(x, dtype, k);
            if (normed) v = _mm256_mul_ps(_mm256_mul_ps(v, factor), load8(norm->norm_weight, norm->norm_dtype, k));
            if (norm->swiglu) v = swiglu8(v, load8(x, dtype, K + k));
            _mm256_storeu_ps(buffer + k - g * group, v);
            __m256 magnitude = _mm256_and_ps(v, magnitude_mask);
            not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps(magnitude, largest, _CMP_NLE_UQ));
            amax = _mm256_max_ps(amax, magnitude);
        }
        float magnitude = horizontal_max(amax);
        int finite = !_mm256_movemask_ps(not_finite);
        /* A NaN or infinite input makes every result NaN, as the float product would: NaN scale, zeros. */
        float scale = finite ? magnitude / 127.0f : NAN;
        float inverse = finite && magnitude > 0.0f ? 127.0f / magnitude : 0.0f;
        xd[g] = scale;
        const __m256 multiplier = _mm256_set1_ps(inverse);
        __m256i sum = _mm256_setzero_si256();
        for (int64_t k = 0; k < group; k += 32) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) {
                __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(buffer + k + 8 * i), multiplier);
                q[i] = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                sum = _mm256_add_epi32(sum, q[i]);
            }
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            bytes = _mm256_permutevar8x32_epi32(bytes, natural_order);
            if (span) {
                /* the block's 16 even inputs, then its 16 odd ones, each to its place in the span's halves */
                bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, even_then_odd), 0xD8);
                int8_t *span_start = xq + g * group + k / span * span;
                _mm_storeu_si128((__m128i *)(span_start + k % span / 2), _mm256_castsi256_si128(bytes));
                _mm_storeu_si128((__m128i *)(span_start + span / 2 + k % span / 2), _mm256_extracti128_si256(bytes, 1));
            } else {
                _mm256_storeu_si256((__m256i *)(xq + g * group + k), bytes);
            }
        }
        __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4E));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xB1));
        total += scale * (float)_mm_cvtsi128_si32(sum4);
    }
    return total;
}

/* 16 released bytes (32 inputs) -> 32 unsigned nibbles q + 8: the even inputs, then the odd ones. */
static inline __m256i unpack_int4(const int8_t *bytes) {
    __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i *)bytes), _mm_set1_epi8((char)0x88));
    __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_srli_epi16(v, 4)), v, 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* 4 values of a float32, float16 or bfloat16 buffer from index i. */
static inline __m128 load4(const void *data, int dtype, int64_t i) {
    if (dtype == DTYPE_FLOAT32) return _mm_loadu_ps((const float *)data + i);
    const __m128i halves = _mm_loadl_epi64((const __m128i *)((const uint16_t *)data + i));
    if (dtype == DTYPE_FLOAT16) return _mm_cvtph_ps(halves);
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(halves), 16));
}

/* store_float on 4 values at once, the same bits. */
static inline void store4(void *data, int dtype, int64_t i, __m128 values) {
    if (dtype == DTYPE_FLOAT32) {
        _mm_storeu_ps((float *)data + i, values);
    } else if (dtype == DTYPE_FLOAT16) {
        _mm_storel_epi64((__m128i *)((uint16_t *)data + i), _mm_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
    } else {
        const __m128i bits = _mm_castps_si128(values);
        const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(bits, _mm_set1_epi32(0x7fffffff)), _mm_set1_epi32(0x7f800000));
        const __m128i rounded = _mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7fff)),
                                              _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1)));
        const __m128i kept = _mm_blendv_epi8(rounded, _mm_or_si128(bits, _mm_set1_epi32(0x00400000)), nan);
        _mm_storel_epi64((__m128i *)((uint16_t *)data + i), _mm_packus_epi32(_mm_srli_epi32(kept, 16), _mm_setzero_si128()));
    }
}

static void store_rows(const Job *job, int64_t m, int64_t n, int R, const float *sums) {
    float zero = job->bits == 4 ? 8.0f * job->xzero[m] : 0.0f;
    if (R == 4) {
        __m128 values = _mm_mul_ps(load4(job->scale, job->scale_dtype, n), _mm_sub_ps(_mm_loadu_ps(sums), _mm_set1_ps(zero)));
        if (job->bias) values = _mm_add_ps(values, load4(job->bias, job->bias_dtype, n));
        store4(job->out, job->out_dtype, m * job->N + n, values);
        return;
    }
    for (int r = 0; r < R; r++) {
        float value = load_float(job->scale, job->scale_dtype, n + r) * (sums[r] - zero);
        if (job->bias) value += load_float(job->bias, job->bias_dtype, n + r);
        store_float(job->out, job->out_dtype, m * job->N + n + r, value);
    }
}

/* Weight rows that float_rows multiplies together, sharing each activation load, for calls of at least
 * FLOAT_BLOCK_FROM_ROWS activation rows (a single row keeps one sequential weight stream per thread). Timings:
 * bench/README.md, "Tuning constants". */
#define FLOAT_BLOCK_ROWS 4
#define FLOAT_BLOCK_FROM_ROWS 2

/* How far ahead a single-row stream prefetches, in bytes: the distance that streamed fastest (bench/README.md,
 * "Tuning constants"). */
#define SINGLE_ROW_AHEAD 4096
/* The same for one activation row's float weights in the 512-bit code (the AVX2 code leaves them to the hardware). */
#define FLOAT_ROW_AHEAD 8192

typedef struct {
    const Job *job;
    atomic_long next_row;
    int64_t threads;
} Work;

/* The next chunk [begin, *end) of output columns; begin >= N when none is left. One activation row's chunks
 * shrink (see CHUNK_ROWS): fewer, longer streams, and still an even finish. */
static inline int64_t claim_rows(Work *work, int64_t *end) {
    const Job *job = work->job;
    long begin = atomic_load(&work->next_row);
    for (;;) {
        if (begin >= job->N) return begin;
        int64_t size = CHUNK_ROWS;
        if (job->M == 1) {
            int64_t shrinking = (job->N - begin) / (2 * work->threads) / 4 * 4;
            if (shrinking > size) size = shrinking;
        }
        if (atomic_compare_exchange_weak(&work->next_row, &begin, begin + size)) {
            *end = begin + size < job->N ? begin + size : job->N;
            return begin;
        }
    }
}

static inline void store_float_sums(const Job *job, int64_t n, const float *sums) {
    for (int64_t m = 0; m < job->M; m++) {
        float value = sums[m];
        if (job->bias) value += load_float(job->bias, job->bias_dtype, n);
        store_float(job->out, job->out_dtype, m * job->N + n, value);
    }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KERNEL(name) name##_avx2
#define VNNI 0
#include "dot_kernels.h"
#undef KERNEL
#undef VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define KERNEL(name) name##_avx512_vnni
#define VNNI 1
#include "dot_kernels.h"
#undef KERNEL
#undef VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

/* The OpenMP runtime torch computes with (libgomp's GOMP_parallel entry point, which LLVM's and
 * Intel's runtimes also provide), set by chatglm_cpu at import. Its threads are the ones torch's
 * operators just used: they are awake (OpenMP threads spin a while after each parallel region) and
 * run these kernels at once, instead of competing for the cores with a second pool. Unset: one thread. */
typedef void (*ParallelEntry)(void (*function)(void *), void *data, unsigned threads, unsigned flags);
static ParallelEntry parallel_entry;

static void run_job(const Job *job) {
    int64_t chunks = (job->N + CHUNK_ROWS - 1) / CHUNK_ROWS;
    unsigned threads = (unsigned)(job->threads < chunks ? job->threads : chunks);
    Work work = {job, 0, threads};
    const int wide = job->isa == ISA_AVX512_VNNI;
    void (*run_chunks)(void *) = job->bits == 16 ? (wide ? run_float_chunks_avx512_vnni : run_float_chunks_avx2)
                                                 : (wide ? run_chunks_avx512_vnni : run_chunks_avx2);
    if (parallel_entry && threads > 1)
        parallel_entry(run_chunks, &work, threads, 0);
    else
        run_chunks(&work);
}

/* Whether this CPU (and its OS: libgcc checks that the OS saves the registers) runs the instruction set's
 * code. Asked once per set: every call checks it, and the answer never changes. */
static int cpu_supports(int isa) {
    static int answers[2] = {-1, -1};
    if (answers[isa] < 0) {
        __builtin_cpu_init();
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        answers[isa] = isa == ISA_AVX2 ? avx2
                                       : avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    return answers[isa];
}

/* Quantize the activations, then run the job. Returns 0, or -1 when out of memory. */
static int linear(Job *job, const void *x, int x_dtype) {
    const int64_t M = job->M, K = job->K, groups = K / job->group;
    const size_t element = dtype_bytes(x_dtype);
    float *buffer = (float *)malloc(sizeof(float) * (size_t)job->group);
    int8_t *xq = (int8_t *)aligned_alloc(32, (size_t)(M * K + 32) / 32 * 32);
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * groups));
    float *xzero = (float *)malloc(sizeof(float) * (size_t)M);
    int ok = buffer && xq && xd && xzero;
    if (ok) {
        for (int64_t m = 0; m < M; m++)
            xzero[m] = quantize_row((const char *)x + m * (job->swiglu ? 2 * K : K) * element, x_dtype, K, job->group,
                                    job->bits == 8 ? 0 : job->span, job, buffer, xq + m * K, xd + m * groups);
        job->xq = xq;
        job->xd = xd;
        job->xzero = xzero;
        run_job(job);
    }
    free(buffer);
    free(xq);
    free(xd);
    free(xzero);
    return ok ? 0 : -1;
}

/* ---- Attention of one query per sequence (decode steps) ---- */

typedef struct {
    int64_t B, H, G, T, D;
    const void *query; /* [B, H, D] */
    int query_dtype;
    const void *key, *value; /* [B, G, T, D] */
    int kv_dtype;
    const uint8_t *mask; /* [B, T], nonzero = attend; NULL: every key */
    float scaling;
    void *out; /* [B, H, D], in the query's dtype */
    atomic_long next_item;
} Attention;

/* The scores of query q [D] against 8 consecutive key rows k [8, D] (float32), as one vector. */
static inline __m256 dot_8_rows(const float *q, const float *k, int64_t D) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k + j * D + d), qv, acc[j]);
    }
    /* lane j of each half: row j's sum over that half's lanes; the two halves then add */
    __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}

static inline float dot_row(const float *q, const float *k, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(k + d), _mm256_loadu_ps(q + d), acc);
    return horizontal_sum(acc);
}

/* Keys and values per tile: a tile's keys or values in float32, 32 x 128 x 4 bytes, stay in the L1 while every
 * head of the group passes over them, where converting the whole cache first read it again from the L3 for
 * each head. Timings: bench/README.md, "Tuning constants". */
#define ATTENTION_TILE 32

/* Softmax of one head's scores in place (masked ones left out: torch's masked_fill with the dtype's lowest, so
 * a row with no key left attends to all alike), times 1 / their sum; 0 where torch's softmax gives NaN. */
static int softmax_in_place(float *scores, const uint8_t *mask, int64_t T) {
    float maximum = -FLT_MAX;
    int nan = 0;
    for (int64_t t = 0; t < T; t++) {
        if (mask && !mask[t]) scores[t] = -FLT_MAX;
        nan |= scores[t] != scores[t];
        if (scores[t] > maximum) maximum = scores[t];
    }
    if (nan || maximum == INFINITY) return 0;
    const __m256 shift = _mm256_set1_ps(maximum);
    __m256 sums = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + t), shift));
        _mm256_storeu_ps(scores + t, e);
        sums = _mm256_add_ps(sums, e);
    }
    float sum = horizontal_sum(sums);
    for (; t < T; t++) {
        float tail[8] = {scores[t] - maximum};
        _mm256_storeu_ps(tail, exp_ps(_mm256_loadu_ps(tail)));
        scores[t] = tail[0];
        sum += tail[0];
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / sum);
    for (t = 0; t + 8 <= T; t += 8) _mm256_storeu_ps(scores + t, _mm256_mul_ps(_mm256_loadu_ps(scores + t), inverse));
    for (; t < T; t++) scores[t] *= 1.0f / sum;
    return 1;
}

/* Threads take (sequence, key group) items and attend with every query head that reads the group (H / G of them:
 * 16 in ChatGLM2-6B), tile by tile of its keys and values, each converted to float32 once. */
static void run_attention(void *argument) {
    Attention *a = (Attention *)argument;
    const int64_t T = a->T, D = a->D, heads = a->H / a->G;
    const size_t kv_element = dtype_bytes(a->kv_dtype), q_element = dtype_bytes(a->query_dtype);
    /* per head: its scaled query [D], scores [T], output sums [D], whether its softmax is finite; one tile [ATTENTION_TILE, D] */
    float *queries = (float *)malloc(sizeof(float) * (size_t)(heads * (2 * D + T + 1) + ATTENTION_TILE * D));
    if (!queries) return; /* the caller sees next_item short of the end */
    float *sums = queries + heads * D, *scores = sums + heads * D, *tile = scores + heads * T, *finite = tile + ATTENTION_TILE * D;
    for (;;) {
        const long item = atomic_fetch_add(&a->next_item, 1);
        if (item >= a->B * a->G) break;
        const int64_t b = item / a->G, first_head = (item % a->G) * heads;
        const char *keys = (const char *)a->key + (size_t)item * T * D * kv_element;
        const char *values = (const char *)a->value + (size_t)item * T * D * kv_element;
        const __m256 scaling = _mm256_set1_ps(a->scaling);
        /* From the sequence's first attended key: the keys a left-padded batch puts before it get no weight, and
         * skipping them keeps every sum in the order of the sequence alone (its answer does not change with the
         * batch it shares). A sequence with no key attended attends to all. */
        const uint8_t *mask = a->mask ? a->mask + b * T : NULL;
        int64_t start = 0;
        while (mask && start < T && !mask[start]) start++;
        if (start == T) start = 0;
        for (int64_t h = 0; h < heads; h++) {
            const char *q = (const char *)a->query + (size_t)(b * a->H + first_head + h) * D * q_element;
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(queries + h * D + d, _mm256_mul_ps(load8(q, a->query_dtype, d), scaling));
        }
        for (int64_t t0 = start; t0 < T; t0 += ATTENTION_TILE) {
            const int64_t n = T - t0 < ATTENTION_TILE ? T - t0 : ATTENTION_TILE;
            to_float32(tile, keys, a->kv_dtype, t0 * D, n * D);
            for (int64_t h = 0; h < heads; h++) {
                float *row = scores + h * T + t0;
                int64_t t = 0;
                for (; t + 8 <= n; t += 8) _mm256_storeu_ps(row + t, dot_8_rows(queries + h * D, tile + t * D, D));
                for (; t < n; t++) row[t] = dot_row(queries + h * D, tile + t * D, D);
            }
        }
        for (int64_t h = 0; h < heads; h++)
            finite[h] = (float)softmax_in_place(scores + h * T + start, mask ? mask + start : NULL, T - start);
        memset(sums, 0, sizeof(float) * (size_t)(heads * D));
        for (int64_t t0 = start; t0 < T; t0 += ATTENTION_TILE) {
            const int64_t n = T - t0 < ATTENTION_TILE ? T - t0 : ATTENTION_TILE;
            to_float32(tile, values, a->kv_dtype, t0 * D, n * D);
            for (int64_t h = 0; h < heads; h++) {
                const float *p = scores + h * T + t0;
                /* 64 outputs at a time: 8 accumulators, the other registers free for the loads */
                for (int64_t d0 = 0; d0 < D; d0 += 64) {
                    const int width = (int)((D - d0 < 64 ? D - d0 : 64) / 8);
                    __m256 acc[8];
                    for (int i = 0; i < width; i++) acc[i] = _mm256_loadu_ps(sums + h * D + d0 + 8 * i);
                    for (int64_t t = 0; t < n; t++) {
                        const __m256 weight = _mm256_set1_ps(p[t]);
                        for (int i = 0; i < width; i++)
                            acc[i] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(tile + t * D + d0 + 8 * i), acc[i]);
                    }
                    for (int i = 0; i < width; i++) _mm256_storeu_ps(sums + h * D + d0 + 8 * i, acc[i]);
                }
            }
        }
        for (int64_t h = 0; h < heads; h++)
            for (int64_t d = 0; d < D; d++)
                store_float(a->out, a->query_dtype, (b * a->H + first_head + h) * D + d, finite[h] != 0.0f ? sums[h * D + d] : NAN);
    }
    free(queries);
}

/* Float weights: FLOAT_PASS_ROWS activation rows at a time (their float32 copies stay in the L2 while each weight
 * row serves them all from the L1), converted to float32 once; each pass reads the whole weight again, which
 * costs a prompt little beside its arithmetic. Returns 0, or -1 when out of memory. */
static int float_linear(Job *job, const void *x, int x_dtype) {
    const int64_t M = job->M, K = job->K, rows = M < FLOAT_PASS_ROWS ? M : FLOAT_PASS_ROWS;
    const size_t element = dtype_bytes(x_dtype), out_element = dtype_bytes(job->out_dtype);
    float *xf = (float *)aligned_alloc(32, sizeof(float) * (size_t)(rows * K));
    if (!xf) return -1;
    Job pass = *job;
    pass.xf = xf;
    for (int64_t first = 0; first < M; first += rows) {
        pass.M = M - first < rows ? M - first : rows;
        pass.out = (char *)job->out + (size_t)(first * job->N) * out_element;
        for (int64_t m = 0; m < pass.M; m++)
            to_float32(xf + m * K, (const char *)x + (size_t)((first + m) * K) * element, x_dtype, 0, K);
        run_job(&pass);
    }
    free(xf);
    return 0;
}

#pragma GCC pop_options

#endif /* HAVE_AVX2_BUILD */

static PyObject *py_isas(PyObject *self, PyObject *unused) {
#ifdef HAVE_AVX2_BUILD
    if (cpu_supports(ISA_AVX512_VNNI)) return Py_BuildValue("(ss)", ISA_NAMES[ISA_AVX512_VNNI], ISA_NAMES[ISA_AVX2]);
    if (cpu_supports(ISA_AVX2)) return Py_BuildValue("(s)", ISA_NAMES[ISA_AVX2]);
#endif
    return PyTuple_New(0);
}

/* Whether this build and CPU run the instruction set's code; if not, sets the Python error. */
static int can_run(int isa) {
#ifdef HAVE_AVX2_BUILD
    if ((isa == ISA_AVX2 || isa == ISA_AVX512_VNNI) && cpu_supports(isa)) return 1;
    PyErr_Format(PyExc_RuntimeError, "chatglm_cpu: this CPU cannot run instruction set code %d", isa);
#else
    PyErr_SetString(PyExc_RuntimeError, "chatglm_cpu was built without its x86-64 kernels");
#endif
    return 0;
}

#ifdef HAVE_AVX2_BUILD
/* Runs `function` on the job without the GIL; None, or MemoryError when it ran out of memory. */
static PyObject *run_unlocked(int (*function)(Job *, const void *, int), Job *job, const void *x, int x_dtype) {
    int status;
    Py_BEGIN_ALLOW_THREADS status = function(job, x, x_dtype);
    Py_END_ALLOW_THREADS if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#endif

/* linear(bits, x, x_dtype, M, K, weight, N, scale, scale_dtype, bias, bias_dtype, out, out_dtype, group, threads, isa,
 *        norm, norm_dtype, norm_eps, swiglu)
 * Pointers are addresses (int; bias and norm 0 for none); with swiglu, x is [M, 2K] (and norm 0). The caller
 * (chatglm_cpu.linear) checks every shape, dtype and alignment: this function trusts them. */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    int bits, x_dtype, scale_dtype, bias_dtype, out_dtype, threads, isa, norm_dtype, swiglu;
    Py_ssize_t x, weight, scale, bias, out, M, K, N, group, norm;
    double norm_eps;
    if (!PyArg_ParseTuple(args, "ininnnnninininiinidi", &bits, &x, &x_dtype, &M, &K, &weight, &N, &scale, &scale_dtype,
                          &bias, &bias_dtype, &out, &out_dtype, &group, &threads, &isa, &norm, &norm_dtype, &norm_eps,
                          &swiglu) ||
        !can_run(isa))
        return NULL;
#ifdef HAVE_AVX2_BUILD
    if (M == 0 || N == 0) Py_RETURN_NONE;
    /* int4: spans of 64 inputs (one 256-bit load of released bytes) wherever the groups allow it; one activation row
     * on VNNI, of 128 (a 512-bit load: wide_int4_row) */
    const int span = isa == ISA_AVX512_VNNI && M == 1 && group % 128 == 0 ? 128 : group >= 64 ? 64 : 32;
    Job job = {.bits = bits, .M = M, .N = N, .K = K, .group = group, .span = span,
               .weight = (const int8_t *)weight, .scale = (const void *)scale, .scale_dtype = scale_dtype,
               .bias = (const void *)bias, .bias_dtype = bias_dtype, .norm_weight = (const void *)norm,
               .norm_dtype = norm_dtype, .norm_eps = (float)norm_eps, .swiglu = swiglu, .out = (void *)out,
               .out_dtype = out_dtype, .threads = threads < 1 ? 1 : threads, .isa = isa};
    return run_unlocked(linear, &job, (const void *)x, x_dtype);
#endif
    Py_RETURN_NONE;
}

/* float_linear(x, x_dtype, M, K, weight, weight_dtype, N, bias, bias_dtype, out, out_dtype, threads, isa): float16 or
 * bfloat16 weights [N, K]; K a multiple of FLOAT_WIDTH_MULTIPLE. Checked by the caller, as for linear. */
static PyObject *py_float_linear(PyObject *self, PyObject *args) {
    int x_dtype, weight_dtype, bias_dtype, out_dtype, threads, isa;
    Py_ssize_t x, M, K, weight, N, bias, out;
    if (!PyArg_ParseTuple(args, "ninnninniniii", &x, &x_dtype, &M, &K, &weight, &weight_dtype, &N, &bias, &bias_dtype,
                          &out, &out_dtype, &threads, &isa) ||
        !can_run(isa))
        return NULL;
#ifdef HAVE_AVX2_BUILD
    if (M == 0 || N == 0) Py_RETURN_NONE;
    Job job = {.bits = 16, .M = M, .N = N, .K = K, .weight = (const int8_t *)weight, .weight_dtype = weight_dtype,
               .bias = (const void *)bias, .bias_dtype = bias_dtype, .out = (void *)out, .out_dtype = out_dtype,
               .threads = threads < 1 ? 1 : threads, .isa = isa};
    return run_unlocked(float_linear, &job, (const void *)x, x_dtype);
#endif
    Py_RETURN_NONE;
}

/* attend(query, query_dtype, key, value, kv_dtype, B, H, G, T, D, mask, scaling, out, threads): one query per
 * sequence, contiguous [B, H, D] and [B, G, T, D], D a multiple of ATTEND_DIM_MULTIPLE, mask 0 or [B, T] bytes. Checked by the caller. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    int query_dtype, kv_dtype, threads;
    Py_ssize_t query, key, value, B, H, G, T, D, mask, out;
    double scaling;
    if (!PyArg_ParseTuple(args, "ninninnnnnndni", &query, &query_dtype, &key, &value, &kv_dtype, &B, &H, &G, &T, &D, &mask,
                          &scaling, &out, &threads) ||
        !can_run(ISA_AVX2))
        return NULL;
#ifdef HAVE_AVX2_BUILD
    Attention a = {.B = B, .H = H, .G = G, .T = T, .D = D, .query = (const void *)query, .query_dtype = query_dtype,
                   .key = (const void *)key, .value = (const void *)value, .kv_dtype = kv_dtype,
                   .mask = (const uint8_t *)mask, .scaling = (float)scaling, .out = (void *)out};
    atomic_init(&a.next_item, 0);
    const int64_t items = B * G;
    if (items == 0 || T == 0) Py_RETURN_NONE;
    if (threads < 1) threads = 1;
    unsigned team = (unsigned)(threads < items ? threads : items);
    Py_BEGIN_ALLOW_THREADS if (parallel_entry && team > 1) parallel_entry(run_attention, &a, team, 0);
    else run_attention(&a);
    Py_END_ALLOW_THREADS if (atomic_load(&a.next_item) < items) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_set_parallel_runtime(PyObject *self, PyObject *args) {
    Py_ssize_t address;
    if (!PyArg_ParseTuple(args, "n", &address)) return NULL;
#ifdef HAVE_AVX2_BUILD
    parallel_entry = (ParallelEntry)address;
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_parallel_runtime", py_set_parallel_runtime, METH_VARARGS,
     "The address of the OpenMP runtime's GOMP_parallel that torch uses (0: compute on the calling thread)."},
    {"isas", py_isas, METH_NOARGS, "The instruction sets whose kernels this CPU runs, best first (empty: none)."},
    {"linear", py_linear, METH_VARARGS, "Quantized linear layer on raw buffers (see chatglm_cpu.linear)."},
    {"attend", py_attend, METH_VARARGS, "Attention of one query per sequence on raw buffers (see chatglm_cpu.attend)."},
    {"float_linear", py_float_linear, METH_VARARGS, "Float16/bfloat16 linear layer on raw buffers (see chatglm_cpu.FloatWeight)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

/* module.name = object, taking the reference; 0, or -1 with the error set. */
static int add_object(PyObject *module, const char *name, PyObject *object) {
    if (object == NULL) return -1;
    if (PyModule_AddObject(module, name, object) < 0) {
        Py_DECREF(object);
        return -1;
    }
    return 0;
}

/* The constants above, as chatglm_cpu reads them: ints, GROUP_SIZES a tuple, ISA_NAMES a tuple indexed by code. */
static int add_constants(PyObject *m) {
    const Py_ssize_t group_count = sizeof(GROUP_SIZES) / sizeof(GROUP_SIZES[0]);
    const Py_ssize_t isa_count = sizeof(ISA_NAMES) / sizeof(ISA_NAMES[0]);
    PyObject *groups = PyTuple_New(group_count), *isa_names = PyTuple_New(isa_count);
    int ok = groups != NULL && isa_names != NULL;
    for (Py_ssize_t i = 0; ok && i < group_count; i++) {
        PyObject *size = PyLong_FromLong(GROUP_SIZES[i]);
        ok = size != NULL;
        if (ok) PyTuple_SET_ITEM(groups, i, size);
    }
    for (Py_ssize_t i = 0; ok && i < isa_count; i++) {
        PyObject *name = PyUnicode_FromString(ISA_NAMES[i]);
        ok = name != NULL;
        if (ok) PyTuple_SET_ITEM(isa_names, i, name);
    }
    if (!ok) {
        Py_XDECREF(groups);
        Py_XDECREF(isa_names);
        return -1;
    }
    if (add_object(m, "GROUP_SIZES", groups) < 0) {
        Py_DECREF(isa_names);
        return -1;
    }
    if (add_object(m, "ISA_NAMES", isa_names) < 0) return -1;
    const struct {
        const char *name;
        long value;
    } ints[] = {
        {"DTYPE_FLOAT32", DTYPE_FLOAT32}, {"DTYPE_FLOAT16", DTYPE_FLOAT16}, {"DTYPE_BFLOAT16", DTYPE_BFLOAT16},
        {"CHUNK_ROWS", CHUNK_ROWS}, {"FLOAT_PASS_ROWS", FLOAT_PASS_ROWS}, {"UNPACK_ONCE_FROM_ROWS", UNPACK_ONCE_FROM_ROWS},
        {"VNNI_BATCH_ROWS", VNNI_BATCH_ROWS}, {"FLOAT_WIDTH_MULTIPLE", FLOAT_WIDTH_MULTIPLE},
        {"ATTEND_DIM_MULTIPLE", ATTEND_DIM_MULTIPLE},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        if (PyModule_AddIntConstant(m, ints[i].name, ints[i].value) < 0) return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && add_constants(m) < 0) Py_CLEAR(m);
    return m;
}
