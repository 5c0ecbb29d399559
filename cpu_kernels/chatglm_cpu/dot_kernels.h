/* The dot-product kernels, compiled once per instruction set: _kernels.c includes this file under
 * each `#pragma GCC target`, with KERNEL(name) giving the functions that set's suffix and VNNI saying
 * whether `vpdpbusd` (AVX512-VNNI) and 512-bit registers are there. Without it an unsigned-by-signed
 * byte dot product takes three AVX2 instructions (`vpmaddubsw` into 16-bit sums, an add, and `vpmaddwd`
 * into 32-bit sums at the end of a group); with it, one that adds straight into 32-bit sums (on 256-bit
 * registers for one activation row, a stream from memory; on 512-bit ones for batches and float weights).
 * Every path gives the same integers and adds them in the same order: the same results bit for bit. */

#if VNNI
/* 32-bit lanes += four u8 x s8 products each. */
#define DOT_INT4(sums, u, s) _mm256_dpbusd_epi32(sums, u, s)
/* A span's even and odd inputs into separate sums: two independent chains keep vpdpbusd's latency hidden. */
#define DOT_INT4_SPAN(even_sums, odd_sums, evens, x_evens, odds, x_odds) \
    (even_sums = DOT_INT4(even_sums, evens, x_evens), odd_sums = DOT_INT4(odd_sums, odds, x_odds))
#define GROUP_SUMS_INT32(even_sums, odd_sums) _mm256_add_epi32(even_sums, odd_sums)
/* (v ^ 0x88) & 0x0F in one vpternlogd: bit function of (v, 0x88, 0x0F) = (A ^ B) & C. */
#define OFFSET_NIBBLES(v) _mm256_ternarylogic_epi32(v, _mm256_set1_epi8((char)0x88), _mm256_set1_epi8(0x0F), 0x28)
#define OFFSET_NIBBLES_512(v) _mm512_ternarylogic_epi32(v, _mm512_set1_epi8((char)0x88), _mm512_set1_epi8(0x0F), 0x28)
#else
/* 16-bit lanes: a group adds at most eight products into a lane (128 inputs, two spans of 64, each lane
 * two even and two odd inputs per span): 8 x 15 x 127 = 15240 fits. */
#define DOT_INT4(sums, u, s) _mm256_add_epi16(sums, _mm256_maddubs_epi16(u, s))
/* A span's even and odd products add to each other first, then into one sum: one add fewer per span and
 * two fewer per group than two chains (the AVX2 kernel is short of instruction slots, not of latency; timings
 * in bench/README.md, "Tuning constants"). The odd sums stay zero. */
#define DOT_INT4_SPAN(even_sums, odd_sums, evens, x_evens, odds, x_odds) \
    (even_sums = _mm256_add_epi16(even_sums, _mm256_add_epi16(_mm256_maddubs_epi16(evens, x_evens), \
                                                              _mm256_maddubs_epi16(odds, x_odds))))
#define GROUP_SUMS_INT32(even_sums, odd_sums) _mm256_madd_epi16(even_sums, _mm256_set1_epi16(1))
#endif

/* 32 released bytes (64 inputs) -> their 32 even inputs' and 32 odd inputs' nibbles q + 8. */
static inline void KERNEL(unpack_int4_pair)(const int8_t *bytes, __m256i *evens, __m256i *odds) {
    __m256i v = _mm256_loadu_si256((const __m256i *)bytes);
#if VNNI
    *evens = OFFSET_NIBBLES(_mm256_srli_epi16(v, 4));
    *odds = OFFSET_NIBBLES(v);
#else
    /* the offset once for both halves: the shift moves a neighbour's bits only into the masked-off nibble */
    v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x88));
    *evens = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
    *odds = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
#endif
}

#if VNNI
/* unpack_int4_pair on a 512-bit register of 64 released bytes (one row's 128 inputs, or two rows' 64 each side by
 * side): the even inputs' nibbles q + 8 of each 32-byte half, and the odd inputs'. */
static inline void KERNEL(unpack_int4_line)(__m512i v, __m512i *evens, __m512i *odds) {
    *evens = OFFSET_NIBBLES_512(_mm512_srli_epi16(v, 4));
    *odds = OFFSET_NIBBLES_512(v);
}

/* 32 bytes of row a and 32 of row b at offset `at` -> [a | b] in one 512-bit register. */
static inline __m512i KERNEL(load_row_pair)(const int8_t *a, const int8_t *b, int64_t at) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + at))),
                              _mm256_loadu_si256((const __m256i *)(b + at)), 1);
}
#endif

/* Dot products of R int4 weight rows with one activation row: sums[r] = sum_g xd[g] sum_{k in g} (q + 8) xq,
 * the activations in spans of `span` inputs (see quantize_row). Rows come from the released bytes
 * (`unpacked` NULL) or from a buffer of rows unpacked in the activations' order, K bytes each. */
static inline __attribute__((always_inline)) void KERNEL(int4_rows)(const int8_t *weight, int64_t row_bytes,
                                                                     const uint8_t *unpacked, const int R,
                                                                     const int span, const int8_t *xq,
                                                                     const float *xd, int64_t K, int64_t group,
                                                                     float *sums) {
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / group; g++) {
        __m256i even_sums[4], odd_sums[4];
        for (int r = 0; r < R; r++) even_sums[r] = odd_sums[r] = _mm256_setzero_si256();
        /* Into L2 (T1), not L1, whose few miss buffers hold requests back; a single row's stream SINGLE_ROW_AHEAD on,
         * non-temporal (NTA) on AVX2 so the weights evict less of the step (bench/README.md, "Tuning constants"). */
        if (!unpacked)
            for (int r = 0; r < R; r++)
                for (int64_t line = 0; line < group / 2; line += 64)
                    _mm_prefetch((const char *)(weight + (R == 1 ? SINGLE_ROW_AHEAD : (r + 4) * row_bytes) + g * group / 2 + line),
                                 R == 1 && !VNNI ? _MM_HINT_NTA : _MM_HINT_T1);
        for (int64_t k = g * group; k < (g + 1) * group; k += span) {
            if (span == 64) {
                __m256i x_evens = _mm256_loadu_si256((const __m256i *)(xq + k));
                __m256i x_odds = _mm256_loadu_si256((const __m256i *)(xq + k + 32));
                for (int r = 0; r < R; r++) {
                    __m256i evens, odds;
                    if (unpacked) {
                        evens = _mm256_loadu_si256((const __m256i *)(unpacked + r * K + k));
                        odds = _mm256_loadu_si256((const __m256i *)(unpacked + r * K + k + 32));
                    } else {
                        KERNEL(unpack_int4_pair)(weight + r * row_bytes + k / 2, &evens, &odds);
                    }
                    DOT_INT4_SPAN(even_sums[r], odd_sums[r], evens, x_evens, odds, x_odds);
                }
            } else {
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + k));
                for (int r = 0; r < R; r++) {
                    __m256i w = unpacked ? _mm256_loadu_si256((const __m256i *)(unpacked + r * K + k))
                                         : unpack_int4(weight + r * row_bytes + k / 2);
                    even_sums[r] = DOT_INT4(even_sums[r], w, x);
                }
            }
        }
        __m256 d = _mm256_set1_ps(xd[g]);
        for (int r = 0; r < R; r++) {
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(GROUP_SUMS_INT32(even_sums[r], odd_sums[r])), d, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r] = horizontal_sum(acc[r]);
}

#if VNNI
/* int4_rows for one weight row in spans of 128 inputs: a 64-byte line of released bytes gives its 64 even inputs and
 * its 64 odd ones, a 512-bit register each. The group's two spans of 64 lie in lanes 0-7 and 8-15, added at its end:
 * the same integers and float order as int4_rows, so the same bits, in fewer instructions per byte. */
static inline float KERNEL(wide_int4_row)(const int8_t *weight, const int8_t *xq, const float *xd, int64_t K, int64_t group) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / group; g++) {
        __m512i even_sums = _mm512_setzero_si512(), odd_sums = _mm512_setzero_si512();
        for (int64_t k = g * group; k < (g + 1) * group; k += 128) {
            _mm_prefetch((const char *)(weight + SINGLE_ROW_AHEAD + k / 2), _MM_HINT_T1);
            __m512i evens, odds;
            KERNEL(unpack_int4_line)(_mm512_loadu_si512((const void *)(weight + k / 2)), &evens, &odds);
            even_sums = _mm512_dpbusd_epi32(even_sums, evens, _mm512_loadu_si512((const void *)(xq + k)));
            odd_sums = _mm512_dpbusd_epi32(odd_sums, odds, _mm512_loadu_si512((const void *)(xq + k + 64)));
        }
        const __m512i lanes = _mm512_add_epi32(even_sums, odd_sums);
        const __m256i folded = _mm256_add_epi32(_mm512_castsi512_si256(lanes), _mm512_extracti64x4_epi64(lanes, 1));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(xd[g]), acc);
    }
    return horizontal_sum(acc);
}
#endif

/* The same for int8 weight rows: |q| times x with q's sign (the byte products multiply unsigned by signed). */
static inline __attribute__((always_inline)) void KERNEL(int8_rows)(const int8_t *weight, int64_t K, const int R,
                                                                     const int8_t *xq, const float *xd,
                                                                     int64_t group, float *sums) {
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / group; g++) {
        __m256i partial[4]; /* int32 */
        for (int r = 0; r < R; r++) partial[r] = _mm256_setzero_si256();
        for (int r = 0; r < R; r++)
            for (int64_t line = 0; line < group; line += 64)
                _mm_prefetch((const char *)(weight + (R == 1 ? SINGLE_ROW_AHEAD : (r + 4) * K) + g * group + line), _MM_HINT_T1);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + k));
            for (int r = 0; r < R; r++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(weight + r * K + k));
#if VNNI
                partial[r] = _mm256_dpbusd_epi32(partial[r], _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
#else
                /* 2 x 127 x 127 fits int16: q is in [-127, 127] */
                __m256i products = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
                partial[r] = _mm256_add_epi32(partial[r], _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
#endif
            }
        }
        __m256 d = _mm256_set1_ps(xd[g]);
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(partial[r]), d, acc[r]);
    }
    for (int r = 0; r < R; r++) sums[r] = horizontal_sum(acc[r]);
}

#if VNNI
/* 128 sum(q) per int32 lane of each group of int8 weight rows [n_begin, n_end) (`vpdpbusd` with 0x80 bytes), what
 * block_rows takes out of x + 128 times q: computed once per chunk, for every block of activation rows. */
static void KERNEL(int8_corrections)(const Job *job, int64_t n_begin, int64_t n_end, __m256i *corrections) {
    const int64_t K = job->K, groups = K / job->group;
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int64_t n = n_begin; n < n_end; n++)
        for (int64_t g = 0; g < groups; g++) {
            __m256i sums = _mm256_setzero_si256();
            for (int64_t k = g * job->group; k < (g + 1) * job->group; k += 32)
                sums = _mm256_dpbusd_epi32(sums, bias, _mm256_loadu_si256((const __m256i *)(job->weight + n * K + k)));
            corrections[(n - n_begin) * groups + g] = sums;
        }
}

/* The first pass over a chunk of a batch fetches the next block's 4 weight rows (from `ahead`) for group g into the L2,
 * as int4_rows does for one activation row. */
static inline void KERNEL(prefetch_rows)(const int8_t *ahead, int64_t row_bytes, int64_t g, int64_t group, int bits) {
    for (int r = 0; r < 4; r++)
        for (int64_t line = 0; line < group * bits / 8; line += 64)
            _mm_prefetch((const char *)(ahead + r * row_bytes + g * group * bits / 8 + line), _MM_HINT_T1);
}

/* Batches on VNNI: R weight rows (4; 2 or 1 at a chunk's end) times MB activation rows (1-4, from m0) at once, each
 * weight vector loaded (int4: unpacked) once for the MB rows, where the row-by-row loop did it again for every row.
 * int8 multiplies x + 128 (unsigned) by q and takes out 128 sum(q) per lane (`corrections`: the rows'
 * int8_corrections) instead of |q| by x with q's sign: one instruction per product vector instead of three. (AVX2's
 * `vpmaddubsw` saturates at 16 bits, which x + 128 would reach: there int8 keeps the sign trick, and batches the
 * row-by-row loop.) The int32 lanes hold the same integers as int4_rows' / int8_rows' (lane j: the products of bytes
 * 4j..4j+3 of each 32-byte block of the group), added into the float sums in the same order: the same bits as a row
 * alone. block_rows takes int8 groups of 32 inputs on 256-bit registers; wide_block_rows the rest (groups of whole
 * 64-byte spans). */
static inline __attribute__((always_inline)) void KERNEL(block_rows)(const Job *job, const int8_t *weight,
                                                                      int64_t row_bytes, const __m256i *corrections,
                                                                      const int R, const int MB, int64_t m0, const int8_t *ahead,
                                                                      float sums[4][4]) {
    const int64_t K = job->K, group = job->group, groups = K / group;
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256 acc[4][4];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i lanes[4][4];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MB; m++) lanes[m][r] = _mm256_setzero_si256();
        if (ahead) KERNEL(prefetch_rows)(ahead, row_bytes, g, group, 8);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m256i w[4];
            for (int r = 0; r < R; r++) w[r] = _mm256_loadu_si256((const __m256i *)(weight + r * row_bytes + k));
            for (int m = 0; m < MB; m++) {
                const __m256i x = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(job->xq + (m0 + m) * K + k)), bias);
                for (int r = 0; r < R; r++) lanes[m][r] = _mm256_dpbusd_epi32(lanes[m][r], x, w[r]);
            }
        }
        for (int m = 0; m < MB; m++) {
            const __m256 d = _mm256_set1_ps(job->xd[(m0 + m) * groups + g]);
            for (int r = 0; r < R; r++)
                acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lanes[m][r], _mm256_loadu_si256(corrections + r * groups + g))),
                                            d, acc[m][r]);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) sums[m][r] = horizontal_sum(acc[m][r]);
}

/* The upper 8 floats of a 512-bit register (with AVX512-F alone: no AVX512-DQ). */
static inline __m256 KERNEL(upper_half)(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* block_rows on 512-bit registers, for groups of whole 64-byte spans, weight rows in pairs: one register holds a span's
 * first 32 bytes' inputs of rows a and b side by side (int4: the span's even inputs; int8: its first 32), another the
 * second ones, and each meets the activations' matching 32 bytes in both halves. Each half's int32 lanes are then the
 * lanes of its row in block_rows (the same integers), and a group's epilogue converts and adds two rows per
 * instruction into the float sums, in the same order: the same bits as a row alone. R 1 pairs a row with itself.
 * `unpacked` (int4) holds the pairs' spans as laid out by run_columns: [a's evens | b's evens], [a's odds | b's odds]. */
static inline __attribute__((always_inline)) void KERNEL(wide_block_rows)(const Job *job, const int8_t *weight,
                                                                           int64_t row_bytes, const uint8_t *unpacked,
                                                                           const __m256i *corrections, const int bits,
                                                                           const int R, const int MB, int64_t m0,
                                                                           const int8_t *ahead, float sums[4][4]) {
    const int64_t K = job->K, group = job->group, groups = K / group;
    const int P = (R + 1) / 2;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512 acc[4][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i lanes[4][2];
        for (int m = 0; m < MB; m++) lanes[m][0] = lanes[m][1] = _mm512_setzero_si512();
        if (ahead) KERNEL(prefetch_rows)(ahead, row_bytes, g, group, bits);
        for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
            __m512i first[2], second[2];
            for (int p = 0; p < P; p++) {
                const int8_t *a = weight + 2 * p * row_bytes, *b = R == 1 ? a : a + row_bytes;
                if (bits == 8) {
                    first[p] = KERNEL(load_row_pair)(a, b, k);
                    second[p] = KERNEL(load_row_pair)(a, b, k + 32);
                } else if (unpacked) {
                    first[p] = _mm512_loadu_si512((const void *)(unpacked + 2 * p * K + 2 * k));
                    second[p] = _mm512_loadu_si512((const void *)(unpacked + 2 * p * K + 2 * k + 64));
                } else {
                    KERNEL(unpack_int4_line)(KERNEL(load_row_pair)(a, b, k / 2), &first[p], &second[p]);
                }
            }
            for (int m = 0; m < MB; m++) {
                const int8_t *x = job->xq + (m0 + m) * K + k;
                __m512i x_first = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x));
                __m512i x_second = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + 32)));
                if (bits == 8) x_first = _mm512_xor_si512(x_first, bias), x_second = _mm512_xor_si512(x_second, bias); /* x + 128 */
                for (int p = 0; p < P; p++) {
                    if (bits == 8) {
                        lanes[m][p] = _mm512_dpbusd_epi32(lanes[m][p], x_first, first[p]);
                        lanes[m][p] = _mm512_dpbusd_epi32(lanes[m][p], x_second, second[p]);
                    } else {
                        lanes[m][p] = _mm512_dpbusd_epi32(lanes[m][p], first[p], x_first);
                        lanes[m][p] = _mm512_dpbusd_epi32(lanes[m][p], second[p], x_second);
                    }
                }
            }
        }
        __m512i correction[2];
        if (bits == 8)
            for (int p = 0; p < P; p++)
                correction[p] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(corrections + 2 * p * groups + g)),
                                                   _mm256_loadu_si256(corrections + (R == 1 ? 0 : 2 * p + 1) * groups + g), 1);
        for (int m = 0; m < MB; m++) {
            const __m512 d = _mm512_set1_ps(job->xd[(m0 + m) * groups + g]);
            for (int p = 0; p < P; p++) {
                const __m512i pair = bits == 8 ? _mm512_sub_epi32(lanes[m][p], correction[p]) : lanes[m][p];
                acc[m][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair), d, acc[m][p]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            const __m512 pair = acc[m][r / 2];
            sums[m][r] = horizontal_sum(r % 2 ? KERNEL(upper_half)(pair) : _mm512_castps512_ps256(pair));
        }
}

/* block_rows or wide_block_rows with its weight kind, R and MB constants, each combination its own inlined copy. */
static void KERNEL(block_dot)(const Job *job, const int8_t *weight, int64_t row_bytes, const uint8_t *unpacked,
                              const __m256i *corrections, int R, int MB, int64_t m0, const int8_t *ahead, float sums[4][4]) {
#define WIDE(bits, buffer, rows, batch) \
    KERNEL(wide_block_rows)(job, weight, row_bytes, buffer, corrections, bits, rows, batch, m0, ahead, sums)
#define NARROW(bits, buffer, rows, batch) KERNEL(block_rows)(job, weight, row_bytes, corrections, rows, batch, m0, ahead, sums)
#define BLOCKS(BLOCK, bits, buffer)                                                                                     \
    switch (MB * 4 + R) {                                                                                               \
    case 5: BLOCK(bits, buffer, 1, 1); break;                                                                           \
    case 6: BLOCK(bits, buffer, 2, 1); break;                                                                           \
    case 8: BLOCK(bits, buffer, 4, 1); break;                                                                           \
    case 9: BLOCK(bits, buffer, 1, 2); break;                                                                           \
    case 10: BLOCK(bits, buffer, 2, 2); break;                                                                          \
    case 12: BLOCK(bits, buffer, 4, 2); break;                                                                          \
    case 13: BLOCK(bits, buffer, 1, 3); break;                                                                          \
    case 14: BLOCK(bits, buffer, 2, 3); break;                                                                          \
    case 16: BLOCK(bits, buffer, 4, 3); break;                                                                          \
    case 17: BLOCK(bits, buffer, 1, 4); break;                                                                          \
    case 18: BLOCK(bits, buffer, 2, 4); break;                                                                          \
    default: BLOCK(bits, buffer, 4, 4); break;                                                                          \
    }
    if (job->group % 64) BLOCKS(NARROW, 8, NULL) /* int8 groups of 32: int4 takes them row by row (run_columns) */
    else if (job->bits == 8) BLOCKS(WIDE, 8, NULL)
    else if (unpacked) BLOCKS(WIDE, 4, unpacked)
    else BLOCKS(WIDE, 4, NULL)
#undef BLOCKS
#undef NARROW
#undef WIDE
}
#endif

static inline void KERNEL(dot_rows)(const Job *job, const int8_t *weight, const uint8_t *unpacked, int R, int64_t m,
                                    float *sums) {
    const int64_t K = job->K, group = job->group, row_bytes = job->bits == 4 ? K / 2 : K;
    const int8_t *xq = job->xq + m * K;
    const float *xd = job->xd + m * (K / group);
    if (job->bits == 8) {
        if (R == 4) KERNEL(int8_rows)(weight, K, 4, xq, xd, group, sums);
        else KERNEL(int8_rows)(weight, K, 1, xq, xd, group, sums);
    } else {
        /* Each combination its own inlined copy: the branches on them leave the inner loops. */
#define INT4_ROWS(buffer, rows, span) KERNEL(int4_rows)(weight, row_bytes, buffer, rows, span, xq, xd, K, group, sums)
#if VNNI
        if (job->span == 128) {
            sums[0] = KERNEL(wide_int4_row)(weight, xq, xd, K, group);
            return;
        }
#endif
        if (unpacked) {
            if (job->span == 64) R == 4 ? INT4_ROWS(unpacked, 4, 64) : INT4_ROWS(unpacked, 1, 64);
            else R == 4 ? INT4_ROWS(unpacked, 4, 32) : INT4_ROWS(unpacked, 1, 32);
        } else {
            if (job->span == 64) R == 4 ? INT4_ROWS(NULL, 4, 64) : INT4_ROWS(NULL, 1, 64);
            else R == 4 ? INT4_ROWS(NULL, 4, 32) : INT4_ROWS(NULL, 1, 32);
        }
#undef INT4_ROWS
    }
}

/* Output columns [n_begin, n_end) for every activation row (a chunk of claim_rows: CHUNK_ROWS of them from
 * two activation rows on). One activation row: each weight row is read once, straight from memory (one row
 * after another; int8 on AVX2 in blocks of 4). Several: the chunk's weight rows
 * (for int4 from UNPACK_ONCE_FROM_ROWS rows, unpacked once into `unpacked`, CHUNK_ROWS rows of K bytes) stay
 * in the cache while every activation row passes over them. Every path adds the same products in the same
 * order, so a row's result does not depend on the rows batched with it. */
static void KERNEL(run_columns)(const Job *job, int64_t n_begin, int64_t n_end, uint8_t *unpacked, __m256i *corrections) {
    const int64_t K = job->K, row_bytes = job->bits == 4 ? K / 2 : K;
    float sums[4];
#if VNNI
    /* wide_block_rows' pairs of rows (the last one alone with itself) */
    if (unpacked && job->span == 64)
        for (int64_t r = 0; r < n_end - n_begin; r += 2) {
            const int8_t *a = job->weight + (n_begin + r) * row_bytes, *b = n_begin + r + 1 < n_end ? a + row_bytes : a;
            uint8_t *destination = unpacked + r * K;
            for (int64_t k = 0; k < K; k += 64) {
                __m512i evens, odds;
                KERNEL(unpack_int4_line)(KERNEL(load_row_pair)(a, b, k / 2), &evens, &odds);
                _mm512_storeu_si512((void *)(destination + 2 * k), evens);
                _mm512_storeu_si512((void *)(destination + 2 * k + 64), odds);
            }
        }
    else
#endif
    if (unpacked)
        for (int64_t r = 0; r < n_end - n_begin; r++) {
            const int8_t *row = job->weight + (n_begin + r) * row_bytes;
            uint8_t *destination = unpacked + r * K;
            for (int64_t k = 0; k < K; k += job->span) {
                if (job->span == 64) {
                    __m256i evens, odds;
                    KERNEL(unpack_int4_pair)(row + k / 2, &evens, &odds);
                    _mm256_storeu_si256((__m256i *)(destination + k), evens);
                    _mm256_storeu_si256((__m256i *)(destination + k + 32), odds);
                } else {
                    _mm256_storeu_si256((__m256i *)(destination + k), unpack_int4(row + k / 2));
                }
            }
        }
    /* A single activation row reads weight rows one at a time: one sequential stream per thread, which the
     * prefetchers keep ahead of, where 4 interleaved rows are 4 short ones. Batches keep the blocks: there each
     * weight byte serves every row. So do int8 weights on AVX2, where their longer rows streamed as well in blocks.
     * Timings: bench/README.md, "Tuning constants". */
#if VNNI
    if (job->M > 1 && (job->bits == 8 ? corrections != NULL : job->span == 64)) {
        const int64_t groups = K / job->group;
        float block_sums[4][4];
        if (job->bits == 8) KERNEL(int8_corrections)(job, n_begin, n_end, corrections);
        for (int64_t m0 = 0; m0 < job->M; m0 += VNNI_BATCH_ROWS) {
            const int MB = job->M - m0 < VNNI_BATCH_ROWS ? (int)(job->M - m0) : VNNI_BATCH_ROWS;
            for (int64_t n = n_begin; n < n_end;) {
                const int R = n_end - n >= 4 ? 4 : n_end - n >= 2 ? 2 : 1;
                const int8_t *weight = job->weight + n * row_bytes;
                const int8_t *ahead = m0 == 0 && R == 4 && !unpacked ? weight + 4 * row_bytes : NULL;
                KERNEL(block_dot)(job, weight, row_bytes, unpacked ? unpacked + (n - n_begin) * K : NULL,
                                  corrections ? corrections + (n - n_begin) * groups : NULL, R, MB, m0, ahead, block_sums);
                for (int m = 0; m < MB; m++) store_rows(job, m0 + m, n, R, block_sums[m]);
                n += R;
            }
        }
        return;
    }
#endif
    const int single_rows = job->M == 1 && !unpacked && (VNNI || job->bits == 4);
    for (int64_t m = 0; m < job->M; m++) {
        for (int64_t n = n_begin; n < n_end;) {
            const int R = n_end - n >= 4 && !single_rows ? 4 : 1;
            KERNEL(dot_rows)(job, job->weight + n * row_bytes, unpacked ? unpacked + (n - n_begin) * K : NULL, R, m, sums);
            store_rows(job, m, n, R, sums);
            n += R;
        }
    }
}

static void KERNEL(run_chunks)(void *argument) {
    Work *work = (Work *)argument;
    const Job *job = work->job;
    /* Up to UNPACK_ONCE_FROM_ROWS - 1 activation rows (batched decode) each unpack the nibbles again on the
     * way, from packed bytes the L2 holds; from there on (prompts), unpacking once pays for reading twice
     * the bytes. Without the buffer (out of memory), every row unpacks again: slower, same result. */
    uint8_t *unpacked = job->bits == 4 && job->M >= UNPACK_ONCE_FROM_ROWS ? (uint8_t *)aligned_alloc(32, (size_t)(CHUNK_ROWS * job->K)) : NULL;
    /* VNNI int8 batches: the chunk's int8_corrections (without them, out of memory: the row-by-row loop, same result). */
    __m256i *corrections = VNNI && job->bits == 8 && job->M > 1
                               ? (__m256i *)aligned_alloc(32, sizeof(__m256i) * (size_t)(CHUNK_ROWS * (job->K / job->group)))
                               : NULL;
    for (;;) {
        int64_t end = 0, begin = claim_rows(work, &end); /* end: set when a chunk is left */
        if (begin >= job->N) break;
        KERNEL(run_columns)(job, begin, end, unpacked, corrections);
    }
    free(unpacked);
    free(corrections);
}

#if VNNI
/* float_rows' 512-bit code for MB (1-4) activation rows from m0: the four sums of the AVX2 code two to a register
 * ([inputs 0-7 | 8-15], [16-23 | 24-31] of each 32), the same operations lane by lane, so the same bits in half the
 * instructions; four activation rows share each converted weight vector (some of the 4 x 4 x 2 sums spill: they
 * cost less than converting the weights twice). */
static inline __attribute__((always_inline)) void KERNEL(wide_float_rows)(const Job *job, const uint16_t *rows, const int dtype,
                                                                          const int count, const int MB, int64_t m0,
                                                                          float sums[FLOAT_BLOCK_ROWS][FLOAT_PASS_ROWS]) {
    const int64_t K = job->K;
    __m512 acc[4][FLOAT_BLOCK_ROWS][2];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < count; r++) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += FLOAT_WIDTH_MULTIPLE) {
        if (count == 1) _mm_prefetch((const char *)(rows + k) + FLOAT_ROW_AHEAD, _MM_HINT_T1);
        for (int i = 0; i < 2; i++) {
            __m512 w[FLOAT_BLOCK_ROWS];
            for (int r = 0; r < count; r++) {
                const __m256i halves = _mm256_loadu_si256((const __m256i *)(rows + r * K + k + 16 * i));
                w[r] = dtype == DTYPE_FLOAT16 ? _mm512_cvtph_ps(halves)
                                              : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
            }
            for (int m = 0; m < MB; m++) {
                const __m512 xv = _mm512_loadu_ps(job->xf + (m0 + m) * K + k + 16 * i);
                for (int r = 0; r < count; r++) acc[m][r][i] = _mm512_fmadd_ps(w[r], xv, acc[m][r][i]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < count; r++) {
            const __m256 low = _mm256_add_ps(_mm512_castps512_ps256(acc[m][r][0]), KERNEL(upper_half)(acc[m][r][0]));
            const __m256 high = _mm256_add_ps(_mm512_castps512_ps256(acc[m][r][1]), KERNEL(upper_half)(acc[m][r][1]));
            sums[r][m0 + m] = horizontal_sum(_mm256_add_ps(low, high));
        }
}
#endif

/* Float weights (float16 or bfloat16, [N, K]) times float32 activations, added in float32: the products are
 * exact (11- or 8-bit significands), only the order of the additions differs from torch's. Each weight row is
 * read once, one row after another, and serves every activation row from the L1. One sequential stream per
 * thread, which the hardware prefetchers follow alone in the AVX2 code (software prefetches slowed it there); the
 * 512-bit code, faster through its arithmetic, prefetches a single row FLOAT_ROW_AHEAD on (bench/README.md,
 * "Tuning constants"). With several activation rows, `count` (1 or FLOAT_BLOCK_ROWS, a constant once inlined)
 * weight rows share each activation load: one row at a time reads every activation row again from the L2 for each
 * weight row. Each output gets the same four sums, added in the same order, whatever `count`: a row's result never
 * depends on how the call was cut. */
static inline __attribute__((always_inline)) void KERNEL(float_rows)(const Job *job, const uint16_t *rows, const int dtype,
                                                                     const int count,
                                                                     float sums[FLOAT_BLOCK_ROWS][FLOAT_PASS_ROWS]) {
#if VNNI
    for (int64_t m = 0; m < job->M; m += 4) {
        if (job->M - m >= 4) KERNEL(wide_float_rows)(job, rows, dtype, count, 4, m, sums);
        else if (job->M - m == 3) KERNEL(wide_float_rows)(job, rows, dtype, count, 3, m, sums);
        else if (job->M - m == 2) KERNEL(wide_float_rows)(job, rows, dtype, count, 2, m, sums);
        else KERNEL(wide_float_rows)(job, rows, dtype, count, 1, m, sums);
    }
#else
    const int64_t K = job->K;
    for (int64_t m = 0; m < job->M; m++) {
        const float *x = job->xf + m * K;
        __m256 acc[FLOAT_BLOCK_ROWS][4];
        for (int r = 0; r < count; r++)
            for (int i = 0; i < 4; i++) acc[r][i] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += FLOAT_WIDTH_MULTIPLE)
            for (int i = 0; i < 4; i++) {
                const __m256 xv = _mm256_loadu_ps(x + k + 8 * i);
                for (int r = 0; r < count; r++)
                    acc[r][i] = _mm256_fmadd_ps(load8(rows + r * K, dtype, k + 8 * i), xv, acc[r][i]);
            }
        for (int r = 0; r < count; r++)
            sums[r][m] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
    }
#endif
}

static void KERNEL(run_float_chunks)(void *argument) {
    Work *work = (Work *)argument;
    const Job *job = work->job;
    const int fp16 = job->weight_dtype == DTYPE_FLOAT16;
    float sums[FLOAT_BLOCK_ROWS][FLOAT_PASS_ROWS];
    for (;;) {
        int64_t end = 0, begin = claim_rows(work, &end);
        if (begin >= job->N) break;
        int64_t n = begin;
        if (job->M >= FLOAT_BLOCK_FROM_ROWS)
            for (; n + FLOAT_BLOCK_ROWS <= end; n += FLOAT_BLOCK_ROWS) {
                const uint16_t *rows = (const uint16_t *)job->weight + n * job->K;
                if (fp16) KERNEL(float_rows)(job, rows, DTYPE_FLOAT16, FLOAT_BLOCK_ROWS, sums);
                else KERNEL(float_rows)(job, rows, DTYPE_BFLOAT16, FLOAT_BLOCK_ROWS, sums);
                for (int r = 0; r < FLOAT_BLOCK_ROWS; r++) store_float_sums(job, n + r, sums[r]);
            }
        for (; n < end; n++) {
            const uint16_t *row = (const uint16_t *)job->weight + n * job->K;
            if (fp16) KERNEL(float_rows)(job, row, DTYPE_FLOAT16, 1, sums);
            else KERNEL(float_rows)(job, row, DTYPE_BFLOAT16, 1, sums);
            store_float_sums(job, n, sums[0]);
        }
    }
}

#undef DOT_INT4
#undef DOT_INT4_SPAN
#undef GROUP_SUMS_INT32
#undef OFFSET_NIBBLES
#undef OFFSET_NIBBLES_512
