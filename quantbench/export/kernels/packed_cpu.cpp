// Packed-weight kernels for the CPU (built by cpu_packed.py): a matmul for a few rows of x, where every weight
// word is decoded once, in vector lanes along the outputs, for four rows at once and never stored as floats;
// and a decode of a slab of inputs to float32, for batches that a dense matmul then multiplies faster.
//
// Within a group, the matmul sums x·v per row and output, v the code's value (int: the code q itself; ternary
// α1·lo + α2·hi; fp4 e2m1(q)); at the group's end it applies what the codes' values leave out:
//   int      w = s·q − s·z                      out += s·Σx·q − (s·z)·Σx
//   ternary  w = α1·(lo − 1) + α2·(hi − 1)      out += Σx·(α1·lo + α2·hi) − (α1 + α2)·Σx
//   fp4      w = e2m1(q)·s                      out += s·Σx·e2m1(q)
// Int and ternary fields are converted where they lie in the word (q·2^e) against x scaled by 2^−e beforehand:
// a mask and a conversion a field, no shift.
// Int and ternary scales are read as stored (float16 s, α1, α2; uint8 z); MXFP4 and NVFP4 take float32 s,
// their E8M0 exponents and E4M3 codes over the tensor's scale decoded once beforehand.
// Words in tiles of 64 outputs (KernelWeight.in_cpu_tiles) put each task's words in one run of memory, which the
// hardware prefetchers follow: in rows of the whole output width, a task's 256 bytes a row lie 4·N bytes apart.
// bfloat16 x, where the CPU has bfloat16 dot products, takes a kernel of its own that multiplies two codes at a
// time (the "pair" kernel below); then a packed layer's gradient in x, grad·W, for a few rows of grad; and dense
// rows, a few rows of x times a dense weight (a packed model's lm_head). Last, not a matmul: GPTQ's column loop for
// integer grids and for block formats of float elements (quantizers/gptq_cpu.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// One vector is one register of the widest float unit the library is compiled for
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int kVectors = 4;  // vectors per task: each row's sums in four registers
constexpr int64_t kOutputs = kLanes * kVectors;
constexpr int kMaxRows = 4;   // rows of x sharing one decode

typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef uint32_t Words __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef uint16_t Halves __attribute__((vector_size(2 * kLanes)));  // float16 bits
typedef uint8_t Bytes __attribute__((vector_size(kLanes)));

enum Kind : int64_t { kInt = 0, kTernary = 1, kMxfp4 = 2, kNvfp4 = 3 };

// `count` (clamped to 0..kLanes) values from memory, the other lanes zero
template <typename Vector, typename T>
inline Vector load(const T* from, int64_t count) {
  Vector v = {};
  if (count >= kLanes)
    std::memcpy(&v, from, sizeof(v));
  else if (count > 0)
    std::memcpy(&v, from, count * sizeof(T));
  return v;
}

inline void store(float* to, const Floats& v, int64_t count) {
  if (count >= kLanes)
    std::memcpy(to, &v, sizeof(v));
  else if (count > 0)
    std::memcpy(to, &v, count * sizeof(float));
}

// f(std::integral_constant<int, R>{}) for R = rows, 1..kMaxRows: a task's code compiled for its block of rows
template <typename F>
inline void for_rows(int rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, kMaxRows>{});
  }
}

// a·b + c rounded once, in every lane: the one contraction the kernels make (the library is compiled with
// -ffp-contract=off), so that a row's sums do not depend on how many rows share its decode
inline Floats fma(Floats a, Floats b, Floats c) {
#if defined(__AVX512F__)
  return (Floats)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX__) && defined(__FMA__)
  return (Floats)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;  // no fused multiply-add in the instruction set: two roundings, as many on every row
#endif
}

// x in every lane (`Floats{} + x` would add a zero in every lane: no compiler may drop it, −0 + 0 being +0)
inline Floats splat(float x) {
#if defined(__AVX512F__)
  return (Floats)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (Floats)_mm256_set1_ps(x);
#elif defined(__SSE__)
  return (Floats)_mm_set1_ps(x);
#else
  Floats v;
  for (int i = 0; i < kLanes; ++i) v[i] = x;
  return v;
#endif
}

// The lanes' sum, in lane order (a fixed order: the same on every call)
inline float sum_lanes(const Floats& v) {
  float total = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) total += v[lane];
  return total;
}

inline Floats to_floats(Words v) { return __builtin_convertvector((Ints)v, Floats); }

// E2M1 codes [sign | e1 e0 | m] → float, by table (a permute of one or two registers where there is one)
inline Floats e2m1(Words code) {
#if defined(__AVX512F__)
  const Floats table = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
  return __builtin_shuffle(table, (Ints)code);
#elif defined(__AVX__)
  const Floats positive = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  return __builtin_shuffle(positive, -positive, (Ints)code);
#else
  static constexpr float kTable[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                       -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
  Floats out;
  for (int i = 0; i < kLanes; ++i) out[i] = kTable[code[i]];
  return out;
#endif
}

// uint8 → float32: widened in one instruction where the target has one, then converted
inline Floats to_floats(Bytes b) {
#if defined(__AVX512F__)
  __m128i bytes;
  std::memcpy(&bytes, &b, sizeof(b));
  return (Floats)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
  __m128i bytes = _mm_setzero_si128();
  std::memcpy(&bytes, &b, sizeof(b));
  return (Floats)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
#else
  return __builtin_convertvector(__builtin_convertvector(b, Ints), Floats);
#endif
}

// float16 → float32 in one instruction where the target has one (F16C, AVX-512), else lane by lane
inline Floats to_floats(Halves h) {
#if defined(__AVX512F__)
  return (Floats)_mm512_cvtph_ps((__m256i)h);
#elif defined(__AVX__) && defined(__F16C__)
  return (Floats)_mm256_cvtph_ps((__m128i)h);
#else
  Floats out;
  for (int i = 0; i < kLanes; ++i) {
    _Float16 half;
    const uint16_t bits = h[i];
    std::memcpy(&half, &bits, sizeof(half));
    out[i] = static_cast<float>(half);
  }
  return out;
#endif
}

constexpr int64_t kTile = 64;  // outputs a tile of words holds (layout.CPU_TILE)

struct Weight {
  const uint32_t* words;  // int32 [K / per word, N], or in tiles [⌈N / kTile⌉, K / per word, kTile]
  const void* scales;     // float16 [P, G, N] (int, ternary) or float32 [G, N] (fp4)
  const uint8_t* zeros;   // uint8 [G, N] (int with zero points) or null
  int64_t K, N, group, groups;
  float symmetric_zero;  // int without zero points: 2^(bits − 1)
  int64_t word_rows;     // K / per word
  bool tiled;
  int64_t row_stride;    // words from one word row to the next: kTile (tiled) or N

  // word row 0's words from output n; word row r's lie r·row_stride further, contiguous up to the end of n's
  // tile (tiled) or of the row
  const uint32_t* column(int64_t n) const {
    return tiled ? words + (n / kTile) * word_rows * kTile + n % kTile : words + n;
  }
};

// The group's scales for `count` outputs from `at` (= g·N + n): s (ternary: α1, α2) and the offset that the
// group's Σx multiplies (int: s·z; ternary: α1 + α2)
struct Scales {
  Floats s, s2, offset;
};

template <int64_t KIND>
inline Scales scales_at(const Weight& w, int64_t at, int64_t count) {
  if constexpr (KIND == kInt || KIND == kTernary) {
    const auto* halves = static_cast<const uint16_t*>(w.scales);
    const Floats s = to_floats(load<Halves>(halves + at, count));
    if constexpr (KIND == kTernary) {
      const Floats s2 = to_floats(load<Halves>(halves + w.groups * w.N + at, count));
      return {s, s2, s + s2};
    } else {
      const Floats z = w.zeros ? to_floats(load<Bytes>(w.zeros + at, count)) : splat(w.symmetric_zero);
      return {s, Floats{}, z * s};
    }
  } else {
    return {load<Floats>(static_cast<const float*>(w.scales) + at, count), Floats{}, Floats{}};
  }
}

// A field of a word converted to float in place, q·2^e (e = field_exponent), where the conversion is exact: every
// field with AVX-512's unsigned conversion; elsewhere every field below bit 31, and the top field shifted down
// first. x is scaled by 2^−e beforehand (prepare_x), so that each product is q·x exactly and one instruction (the
// mask) decodes a field where a shift and a mask did.
template <int BITS>
constexpr int field_shift(int j) {
#if defined(__AVX512F__)
  return 0;
#else
  return (j + 1) * BITS == 32 ? j * BITS : 0;
#endif
}

template <int BITS>
constexpr int field_exponent(int j) { return j * BITS - field_shift<BITS>(j); }

template <int BITS, int J>
inline Floats field(Words words, uint32_t mask) {
  constexpr int kShift = field_shift<BITS>(J);
  const Words bits = (kShift ? words >> kShift : words) & (mask << field_exponent<BITS>(J));
#if defined(__AVX512F__)
  return (Floats)_mm512_cvtepu32_ps((__m512i)bits);
#else
  return __builtin_convertvector((Ints)bits, Floats);
#endif
}

// What code J of a word multiplies x by within a group, its scales applied at the group's end: int q·2^e and
// fp4 e2m1(q) (the group's s applies to the sums); ternary α1·lo + α2·hi (over 2^e)
template <int64_t KIND, int BITS, int J>
inline Floats code_value(Words words, const Scales& scales) {
  if constexpr (KIND == kInt)
    return field<BITS, J>(words, (1u << BITS) - 1u);
  else if constexpr (KIND == kTernary)
    return fma(scales.s2, field<BITS, J>(words, 12u), scales.s * field<BITS, J>(words, 3u));
  else
    return e2m1(J ? (words >> (J * BITS)) & 15u : words & 15u);
}

// The sums of one word row's codes J..32/BITS − 1, x its inputs interleaved [32/BITS, ROWS] (always inlined: an
// outlined call would keep the sums in memory)
template <int64_t KIND, int BITS, int ROWS, int J = 0>
__attribute__((always_inline)) inline void add_codes(const float* x, const Words (&words)[kVectors],
                                                     const Scales (&scales)[kVectors], Floats (&sums)[ROWS][kVectors]) {
  if constexpr (J < 32 / BITS) {
    for (int v = 0; v < kVectors; ++v) {
      const Floats value = code_value<KIND, BITS, J>(words[v], scales[v]);
      for (int r = 0; r < ROWS; ++r) sums[r][v] = fma(value, splat(x[J * ROWS + r]), sums[r][v]);
    }
    add_codes<KIND, BITS, ROWS, J + 1>(x, words, scales, sums);
  }
}

// x [M, K] → the x the tasks read: each block of kMaxRows rows interleaved, [K, rows] from its first row's
// offset, so a task reads one run of x; for int and ternary (SCALED) times 2^−e, e the exponent of the field each
// input's code lies at (a power of two: exact for all but subnormal products). And Σx [M, G] for each group (what
// zero points and ternary's −1 offsets multiply).
template <int BITS, bool SCALED>
void prepare_x(const float* x, int64_t M, const Weight& w, float* prepared, float* sums) {
  constexpr int kPerWord = 32 / BITS;
  float factor[kPerWord];
  for (int j = 0; j < kPerWord; ++j) factor[j] = SCALED ? std::ldexp(1.f, -field_exponent<BITS>(j)) : 1.f;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t m0 = r / kMaxRows * kMaxRows, rows = std::min<int64_t>(kMaxRows, M - m0);
    for (int64_t g = 0; g < w.groups; ++g) {
      float sum = 0.f;
      for (int64_t k = g * w.group; k < std::min((g + 1) * w.group, w.K); ++k) {
        if constexpr (SCALED) sum += x[r * w.K + k];
        prepared[m0 * w.K + k * rows + (r - m0)] = x[r * w.K + k] * factor[k % kPerWord];
      }
      sums[r * w.groups + g] = sum;  // fp4 (not SCALED) has no offsets: its sums stay unread
    }
  }
}

// FULL: width is kOutputs, known to the compiler (every task but a narrow last one), so no load is partial
template <int64_t KIND, int BITS, int ROWS, bool FULL>
void matmul_block(const float* x, const float* x_sums, const Weight& w, int64_t n0, int64_t any_width, float* out) {
  constexpr int kPerWord = 32 / BITS;
  const int64_t width = FULL ? kOutputs : any_width;
  const int64_t K = w.K, N = w.N, group = w.group, groups = w.groups;
  const uint32_t* const column = w.column(n0);
  Floats acc[ROWS][kVectors] = {};
  for (int64_t g = 0; g < groups; ++g) {  // the last group may be shorter
    Floats sums[ROWS][kVectors] = {};  // int: Σx·q·2^e; ternary Σx·(α1·lo + α2·hi); fp4 Σx·e2m1(q)
    Scales group_scales[kVectors];
    for (int v = 0; v < kVectors; ++v)
      group_scales[v] = scales_at<KIND>(w, g * N + n0 + v * kLanes, width - v * kLanes);
    if constexpr (KIND == kTernary)  // the hi field lies two bits above the lo field: α2 over 4
      for (int v = 0; v < kVectors; ++v) group_scales[v].s2 *= .25f;
    for (int64_t k0 = g * group; k0 < std::min((g + 1) * group, K); k0 += kPerWord) {
      const uint32_t* row = column + (k0 / kPerWord) * w.row_stride;
      Words words[kVectors];
      for (int v = 0; v < kVectors; ++v) words[v] = load<Words>(row + v * kLanes, width - v * kLanes);
      add_codes<KIND, BITS, ROWS>(x + k0 * ROWS, words, group_scales, sums);
    }
    for (int v = 0; v < kVectors; ++v)
      for (int r = 0; r < ROWS; ++r) {
        if constexpr (KIND == kTernary)
          acc[r][v] += sums[r][v] - group_scales[v].offset * x_sums[r * groups + g];
        else if constexpr (KIND == kInt)
          acc[r][v] += group_scales[v].s * sums[r][v] - group_scales[v].offset * x_sums[r * groups + g];
        else
          acc[r][v] += group_scales[v].s * sums[r][v];
      }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVectors; ++v) store(out + r * N + n0 + v * kLanes, acc[r][v], width - v * kLanes);
}

// A code's weight: int s·q − s·z, ternary α1·lo + α2·hi − (α1 + α2), fp4 e2m1(q)·s
template <int64_t KIND>
inline Floats weight_value(Words code, const Scales& scales) {
  if constexpr (KIND == kTernary)
    return scales.s * to_floats(code & 3u) + scales.s2 * to_floats(code >> 2) - scales.offset;
  else if constexpr (KIND == kInt)
    return to_floats(code) * scales.s - scales.offset;
  else
    return e2m1(code) * scales.s;
}

// The weights of word row `word_row` at outputs [n, n + kLanes) (zero words past N), code by code: f(j, values)
// for codes j = 0..per word − 1 (decode_rows stores them, gradient_rows multiplies them by grad); `group_at` is
// g·N for the row's group g (computed once a row by group_at_row: a division)
template <int64_t KIND, int BITS, typename F>
__attribute__((always_inline)) inline void word_row_values(const Weight& w, int64_t word_row, int64_t group_at,
                                                           int64_t n, F&& f) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t count = w.N - n;
  const Words words = load<Words>(w.column(n) + word_row * w.row_stride, count);
  const Scales group_scales = scales_at<KIND>(w, group_at + n, count);
  for (int j = 0; j < 32 / BITS; ++j) f(j, weight_value<KIND>((words >> (j * BITS)) & kMask, group_scales));
}

template <int BITS>
inline int64_t group_at_row(const Weight& w, int64_t word_row) { return word_row * (32 / BITS) / w.group * w.N; }

// word rows [row0, row1) decoded to float32 [(row1 − row0)·per word, N] (inputs in their stored order)
template <int64_t KIND, int BITS>
void decode_rows(const Weight& w, int64_t row0, int64_t row1, int64_t first_row, float* out) {
  constexpr int kPerWord = 32 / BITS;
  const int64_t N = w.N;
  for (int64_t word_row = row0; word_row < row1; ++word_row) {  // the floats written in order
    const int64_t group_at = group_at_row<BITS>(w, word_row);
    for (int64_t n = 0; n < N; n += kLanes)
      word_row_values<KIND, BITS>(w, word_row, group_at, n, [&](int j, const Floats& value) {
        store(out + ((word_row - first_row) * kPerWord + j) * N + n, value, N - n);
      });
  }
}

#if defined(__AVX512BF16__)
// bfloat16 x: two codes a lane, multiplied by an x pair in one bfloat16 dot product (vdpbf16ps: each product exact,
// summed in float32), 32 products an instruction where the float32 kernel's multiply-add makes 16. A word's codes
// J and J + per word / 2 lie at the same place in its low and high halves, so one 16-bit shift moves both:
//   int      to the top of a bfloat16 mantissa, masked under the exponent of 1.0 by one ternary logic op:
//            v = 1 + q/2^b (b ≤ 4), exact; at the group's end Σx·w = s·(2^b·Σx·v − (2^b + z)·Σx)
//   ternary  the same for its lo and hi fields, v = 1 + t/4, in two sums:
//            Σx·w = α1·(4·Σx·v_lo − 5·Σx) + α2·(4·Σx·v_hi − 5·Σx)
//   fp4      the E2M1 value by a table of bfloat16 (one permute): Σx·w = s·Σx·e2m1(q)

// code J's field of each 16-bit half placed at mantissa bits [7 − WIDTH, 7) under a bfloat16 exponent of 1.0
template <int FIELD_AT, int WIDTH>
inline __m512i pair_codes(Words words) {
  constexpr int kShift = 7 - WIDTH - FIELD_AT;
  __m512i placed = (__m512i)words;
  if constexpr (kShift > 0)
    placed = _mm512_slli_epi16(placed, kShift);
  else if constexpr (kShift < 0)
    placed = _mm512_srli_epi16(placed, -kShift);
  constexpr uint32_t kMask = ((1u << WIDTH) - 1u) << (7 - WIDTH);
  return _mm512_ternarylogic_epi32(placed, _mm512_set1_epi32(kMask | kMask << 16), _mm512_set1_epi32(0x3F803F80),
                                   0xEA);  // (placed & mask) | one
}

// E2M1 code J of each 16-bit half as bfloat16, by table (vpermw reads an index's low 5 bits: the table twice
// over, so the bit above the code need not be cleared)
template <int FIELD_AT>
inline __m512i pair_e2m1(Words words) {
  const __m512i table = _mm512_set_epi16(
      -16192, -16256, -16320, -16384, -16448, -16512, -16640, -32768, 0x40C0, 0x4080, 0x4040, 0x4000, 0x3FC0,
      0x3F80, 0x3F00, 0, -16192, -16256, -16320, -16384, -16448, -16512, -16640, -32768, 0x40C0, 0x4080, 0x4040,
      0x4000, 0x3FC0, 0x3F80, 0x3F00, 0);  // 0, ±.5, ±1, ±1.5, ±2, ±3, ±4, ±6 (high entries first)
  __m512i index = (__m512i)words;
  if constexpr (FIELD_AT > 0) index = _mm512_srli_epi16(index, FIELD_AT);
  return _mm512_permutexvar_epi16(index, table);
}

inline Floats dot_pairs(Floats sums, __m512i codes, uint32_t x_pair) {
  return (Floats)_mm512_dpbf16_ps((__m512)sums, (__m512bh)codes, (__m512bh)_mm512_set1_epi32(x_pair));
}

// x bfloat16 [M, K] → its pairs (x[k], x[k + per word / 2]) of each word's codes J and J + per word / 2 as uint32,
// [word rows, per word / 2, rows] for each block of kMaxRows rows; and for int and ternary (SUMMED) Σx [M, G] in
// float32, as the float32 kernel sums it
template <int BITS, bool SUMMED>
void prepare_pairs(const uint16_t* x, int64_t M, const Weight& w, uint32_t* pairs, float* sums) {
  constexpr int kPerWord = 32 / BITS, kHalf = kPerWord / 2;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t m0 = r / kMaxRows * kMaxRows, rows = std::min<int64_t>(kMaxRows, M - m0);
    const uint16_t* row = x + r * w.K;
    uint32_t* block = pairs + m0 * (w.K / 2);
    for (int64_t word = 0; word < w.word_rows; ++word)
      for (int j = 0; j < kHalf; ++j) {
        const int64_t k = word * kPerWord + j;
        block[(word * kHalf + j) * rows + (r - m0)] = row[k] | static_cast<uint32_t>(row[k + kHalf]) << 16;
      }
    for (int64_t g = 0; SUMMED && g < w.groups; ++g) {
      float sum = 0.f;
      for (int64_t k = g * w.group; k < std::min((g + 1) * w.group, w.K); ++k) {
        const uint32_t bits = static_cast<uint32_t>(row[k]) << 16;
        float value;
        std::memcpy(&value, &bits, sizeof(value));
        sum += value;
      }
      sums[r * w.groups + g] = sum;
    }
  }
}

// The sums of one word row's pairs J..per word / 2 − 1 for VECTORS vectors of outputs (ternary: lo and hi)
template <int64_t KIND, int BITS, int ROWS, int VECTORS, int J = 0>
__attribute__((always_inline)) inline void add_pairs(const uint32_t* x, const Words (&words)[VECTORS],
                                                     Floats (&sums)[2][ROWS][VECTORS]) {
  if constexpr (J < 16 / BITS) {
    for (int v = 0; v < VECTORS; ++v) {
      if constexpr (KIND == kTernary) {
        const __m512i lo = pair_codes<J * BITS, 2>(words[v]), hi = pair_codes<J * BITS + 2, 2>(words[v]);
        for (int r = 0; r < ROWS; ++r) {
          sums[0][r][v] = dot_pairs(sums[0][r][v], lo, x[J * ROWS + r]);
          sums[1][r][v] = dot_pairs(sums[1][r][v], hi, x[J * ROWS + r]);
        }
      } else {
        const __m512i codes = KIND == kInt ? pair_codes<J * BITS, BITS>(words[v]) : pair_e2m1<J * BITS>(words[v]);
        for (int r = 0; r < ROWS; ++r) sums[0][r][v] = dot_pairs(sums[0][r][v], codes, x[J * ROWS + r]);
      }
    }
    add_pairs<KIND, BITS, ROWS, VECTORS, J + 1>(x, words, sums);
  }
}

// outputs [n0 + v0·kLanes, + VECTORS·kLanes) of a task, its width `width` from n0
template <int64_t KIND, int BITS, int ROWS, int VECTORS, bool FULL>
void pairs_block(const uint32_t* x, const float* x_sums, const Weight& w, int64_t n0, int v0, int64_t any_width,
                 float* out) {
  constexpr int kPerWord = 32 / BITS, kHalf = kPerWord / 2;
  constexpr float kLevels = KIND == kTernary ? 4.f : static_cast<float>(1 << BITS);  // 1/ulp of v's field
  const int64_t width = FULL ? kOutputs : any_width;
  const int64_t K = w.K, N = w.N, groups = w.groups;
  const uint32_t* const column = w.column(n0) + v0 * kLanes;
  Floats acc[ROWS][VECTORS] = {};
  for (int64_t g = 0; g < groups; ++g) {
    Floats sums[2][ROWS][VECTORS] = {};
    for (int64_t k0 = g * w.group; k0 < std::min((g + 1) * w.group, K); k0 += kPerWord) {
      const uint32_t* row = column + (k0 / kPerWord) * w.row_stride;
      Words words[VECTORS];
      for (int v = 0; v < VECTORS; ++v)
        words[v] = load<Words>(row + v * kLanes, width - (v0 + v) * kLanes);
      add_pairs<KIND, BITS, ROWS, VECTORS>(x + (k0 / kPerWord) * kHalf * ROWS, words, sums);
    }
    for (int v = 0; v < VECTORS; ++v) {
      const int64_t count = width - (v0 + v) * kLanes;
      const Scales scales = scales_at<KIND>(w, g * N + n0 + (v0 + v) * kLanes, count);
      for (int r = 0; r < ROWS; ++r) {
        const Floats x_sum = KIND == kMxfp4 ? Floats{} : splat(x_sums[r * groups + g]);
        if constexpr (KIND == kTernary) {
          const Floats lo = fma(splat(kLevels), sums[0][r][v], splat(-5.f) * x_sum);
          const Floats hi = fma(splat(kLevels), sums[1][r][v], splat(-5.f) * x_sum);
          acc[r][v] = fma(scales.s, lo, fma(scales.s2, hi, acc[r][v]));
        } else if constexpr (KIND == kMxfp4) {
          acc[r][v] = fma(scales.s, sums[0][r][v], acc[r][v]);
        } else {
          // s·(2^b·Σx·v − 2^b·Σx) − s·z·Σx, scales.offset = s·z
          const Floats q_sum = fma(splat(kLevels), sums[0][r][v], splat(-kLevels) * x_sum);
          acc[r][v] = fma(scales.s, q_sum, fma(-scales.offset, x_sum, acc[r][v]));
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v)
      store(out + r * N + n0 + (v0 + v) * kLanes, acc[r][v], width - (v0 + v) * kLanes);
}

template <int64_t KIND, int BITS, int ROWS>
void pairs_task(const uint32_t* x, const float* x_sums, const Weight& w, int64_t n0, int64_t width, float* out) {
  constexpr int kAtOnce = KIND == kTernary ? kVectors / 2 : kVectors;  // ternary's two sums a vector: half as many
  for (int v0 = 0; v0 < kVectors && v0 * kLanes < width; v0 += kAtOnce) {
    if (width == kOutputs)
      pairs_block<KIND, BITS, ROWS, kAtOnce, true>(x, x_sums, w, n0, v0, width, out);
    else
      pairs_block<KIND, BITS, ROWS, kAtOnce, false>(x, x_sums, w, n0, v0, width, out);
  }
}

template <int64_t KIND, int BITS>
void pairs_rows(int rows, const uint32_t* x, const float* x_sums, const Weight& w, int64_t n0, int64_t width,
                float* out) {
  for_rows(rows, [&](auto r) { pairs_task<KIND, BITS, decltype(r)::value>(x, x_sums, w, n0, width, out); });
}
#endif

// grad·W for one row of grad: word rows [row0, row1), each decoded in lanes along the outputs as decode_rows does,
// multiplied by grad's outputs and summed per input across the lanes (a fixed order); inputs in their stored order
template <int64_t KIND, int BITS>
void gradient_rows(const float* grad, const Weight& w, int64_t row0, int64_t row1, float* out) {
  constexpr int kPerWord = 32 / BITS;
  for (int64_t word_row = row0; word_row < row1; ++word_row) {
    Floats sums[kPerWord] = {};
    const int64_t group_at = group_at_row<BITS>(w, word_row);
    for (int64_t n = 0; n < w.N; n += kLanes) {
      const Floats g_n = load<Floats>(grad + n, w.N - n);  // zero past N: those lanes add nothing
      word_row_values<KIND, BITS>(w, word_row, group_at, n, [&](int j, const Floats& value) {
        sums[j] = fma(value, g_n, sums[j]);
      });
    }
    for (int j = 0; j < kPerWord; ++j) out[word_row * kPerWord + j] = sum_lanes(sums[j]);
  }
}

template <int64_t KIND, int BITS, int ROWS>
void matmul_task(const float* x, const float* x_sums, const Weight& w, int64_t n0, int64_t width, float* out) {
  if (width == kOutputs)
    matmul_block<KIND, BITS, ROWS, true>(x, x_sums, w, n0, width, out);
  else
    matmul_block<KIND, BITS, ROWS, false>(x, x_sums, w, n0, width, out);
}

template <int64_t KIND, int BITS>
void matmul_rows(int rows, const float* x, const float* x_sums, const Weight& w, int64_t n0, int64_t width,
                 float* out) {
  for_rows(rows, [&](auto r) { matmul_task<KIND, BITS, decltype(r)::value>(x, x_sums, w, n0, width, out); });
}

using MatmulFn = void (*)(int, const float*, const float*, const Weight&, int64_t, int64_t, float*);
using PrepareFn = void (*)(const float*, int64_t, const Weight&, float*, float*);
using DecodeFn = void (*)(const Weight&, int64_t, int64_t, int64_t, float*);
using GradientFn = void (*)(const float*, const Weight&, int64_t, int64_t, float*);
using PairsFn = void (*)(int, const uint32_t*, const float*, const Weight&, int64_t, int64_t, float*);
using PreparePairsFn = void (*)(const uint16_t*, int64_t, const Weight&, uint32_t*, float*);

struct Functions {
  MatmulFn matmul;
  DecodeFn decode;
  PrepareFn prepare_x;
  GradientFn gradient;
  PairsFn pairs = nullptr;  // bfloat16 x, where the CPU has bfloat16 dot products: all but int8
  PreparePairsFn prepare_pairs = nullptr;
};

template <int64_t KIND, int BITS>
Functions functions_of() {
  Functions fns{matmul_rows<KIND, BITS>, decode_rows<KIND, BITS>, prepare_x<BITS, KIND == kInt || KIND == kTernary>,
                gradient_rows<KIND, BITS>};
#if defined(__AVX512BF16__)
  if constexpr (KIND != kInt || BITS <= 4) {
    fns.pairs = pairs_rows<KIND, BITS>;
    fns.prepare_pairs = prepare_pairs<BITS, KIND != kMxfp4>;
  }
#endif
  return fns;
}

Functions functions_for(int64_t kind, int64_t bits) {
  if (kind == kInt && bits == 2) return functions_of<kInt, 2>();
  if (kind == kInt && bits == 4) return functions_of<kInt, 4>();
  if (kind == kInt && bits == 8) return functions_of<kInt, 8>();
  if (kind == kTernary && bits == 4) return functions_of<kTernary, 4>();
  if ((kind == kMxfp4 || kind == kNvfp4) && bits == 4) return functions_of<kMxfp4, 4>();
  TORCH_CHECK(false, "no CPU kernel for weight kind ", kind, " with ", bits, " bits");
}

// words int32 [K / (32 / bits), N], or in tiles of kTile outputs [⌈N / kTile⌉, K / (32 / bits), kTile] (a
// tile's rows one after the other, the last tile padded); scales (G = ⌈K / group⌉) float16 [G, N] (int),
// float16 [2, G, N] (ternary) or float32 [G, N] (MXFP4, NVFP4); zeros uint8 [G, N] for int with zero points,
// else an empty tensor
Weight checked(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t kind,
               int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, not ", bits);
  const bool tiled = words.dim() == 3;
  TORCH_CHECK((words.dim() == 2 || (tiled && words.size(2) == kTile)) && words.scalar_type() == at::kInt &&
              words.is_contiguous(), "words: contiguous int32 [K / codes per word, N] or, in tiles, [⌈N / ", kTile,
              "⌉, K / codes per word, ", kTile, "]");
  const int64_t word_rows = words.size(tiled ? 1 : 0), K = word_rows * (32 / bits);
  const int64_t N = tiled ? scales.size(-1) : words.size(1);
  TORCH_CHECK(!tiled || words.size(0) == (N + kTile - 1) / kTile, "words in ", words.size(0), " tiles of ", kTile,
              " outputs, for ", N, " outputs");
  TORCH_CHECK(group > 0 && group % (32 / bits) == 0, "the group ", group, " must hold whole words");
  const int64_t groups = (K + group - 1) / group;
  const bool stored = kind == kInt || kind == kTernary;
  const int64_t planes = kind == kTernary ? 2 : 1;
  TORCH_CHECK(scales.scalar_type() == (stored ? at::kHalf : at::kFloat) && scales.is_contiguous() &&
              scales.numel() == planes * groups * N, "scales: contiguous ", stored ? "float16" : "float32", " [",
              planes, ", ⌈K / group⌉, N]");
  const bool has_zeros = kind == kInt && zeros.numel() > 0;
  TORCH_CHECK(!has_zeros || (zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.numel() == groups * N),
              "zeros: contiguous uint8 [⌈K / group⌉, N]");
  return {reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), scales.data_ptr(),
          has_zeros ? zeros.data_ptr<uint8_t>() : nullptr, K, N, group, groups, static_cast<float>(1 << (bits - 1)),
          word_rows, tiled, tiled ? kTile : N};
}

// x float32 [M, K], or bfloat16 where takes_bfloat16(kind, bits), inputs in the weight's stored order →
// x·Wᵀ float32 [M, N]; in_x_dtype: bfloat16 for bfloat16 x, rounded here as torch rounds (one call less from Python)
at::Tensor packed_matmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t kind, int64_t bits, int64_t group, bool in_x_dtype) {
  const Weight w = checked(words, scales, zeros, kind, bits, group);
  const Functions fns = functions_for(kind, bits);
  const bool pairs = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || (pairs && fns.pairs)) && x.is_contiguous() &&
              x.size(1) == w.K, "x: contiguous float32 [M, ", w.K, "] (bfloat16 where takes_bfloat16)");
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, w.N}, x.options().dtype(at::kFloat));
  const at::Tensor prepared = at::empty({M, pairs ? w.K / 2 : w.K}, out.options().dtype(pairs ? at::kInt : at::kFloat));
  const at::Tensor sums = at::empty({M, w.groups}, out.options());
  if (pairs)
    fns.prepare_pairs(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, w,
                      reinterpret_cast<uint32_t*>(prepared.data_ptr<int32_t>()), sums.data_ptr<float>());
  else
    fns.prepare_x(x.data_ptr<float>(), M, w, prepared.data_ptr<float>(), sums.data_ptr<float>());
  const void* x_data = prepared.data_ptr();  // float32 or pairs of bfloat16, x_row of either a row
  const float* x_sums = sums.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t blocks = (w.N + kOutputs - 1) / kOutputs, x_row = pairs ? w.K / 2 : w.K;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {  // a task's words read from memory once, then from cache
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        const int64_t n0 = b * kOutputs, width = std::min(kOutputs, w.N - n0);
        if (pairs)
          fns.pairs(rows, static_cast<const uint32_t*>(x_data) + m0 * x_row, x_sums + m0 * w.groups, w, n0, width,
                    out_data + m0 * w.N);
        else
          fns.matmul(rows, static_cast<const float*>(x_data) + m0 * x_row, x_sums + m0 * w.groups, w, n0, width,
                     out_data + m0 * w.N);
      }
  });
  return pairs && in_x_dtype ? out.to(at::kBFloat16) : out;
}

// out float32 [rows, N] ← the stored inputs [start, start + rows) decoded (whole words)
void decode(at::Tensor& out, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
            int64_t kind, int64_t bits, int64_t group, int64_t start) {
  const Weight w = checked(words, scales, zeros, kind, bits, group);
  const int64_t per_word = 32 / bits, stop = start + out.size(0);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == w.N,
              "out: contiguous float32 [rows, ", w.N, "]");
  TORCH_CHECK(0 <= start && stop <= w.K && start % per_word == 0 && stop % per_word == 0,
              "[", start, ", ", stop, ") must hold whole words of the ", w.K, " inputs");
  const DecodeFn fn = functions_for(kind, bits).decode;
  float* out_data = out.data_ptr<float>();
  const int64_t first = start / per_word;
  at::parallel_for(first, stop / per_word, 1, [&](int64_t begin, int64_t end) {
    fn(w, begin, end, first, out_data);
  });
}

// grad float32 [M, N] → grad·W float32 [M, K], inputs in their stored order, without decoding W into memory (a few
// rows of grad; more take slabs and torch's matmul)
at::Tensor input_gradient(const at::Tensor& grad, const at::Tensor& words, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t kind, int64_t bits, int64_t group) {
  const Weight w = checked(words, scales, zeros, kind, bits, group);
  TORCH_CHECK(grad.dim() == 2 && grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.size(1) == w.N,
              "grad: contiguous float32 [M, ", w.N, "]");
  const GradientFn fn = functions_for(kind, bits).gradient;
  at::Tensor out = at::empty({grad.size(0), w.K}, grad.options());
  const float* grad_data = grad.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for (int64_t m = 0; m < grad.size(0); ++m)
    at::parallel_for(0, w.word_rows, 1, [&](int64_t begin, int64_t end) {
      fn(grad_data + m * w.N, w, begin, end, out_data + m * w.K);
    });
  return out;
}

// Dense rows: x [M, K] times a dense weight [N, K] (nn.Linear's), for the few rows of a decode step, where torch's
// matrix-vector products read the weight at about half this CPU's rate. Lanes along K: each task's outputs are
// rows of the weight read in one run each; a dot product per output and row, summed across lanes at the end.
constexpr int kDenseOutputs = 8;  // outputs a task multiplies at once

// How a dense task reads and multiplies its lanes: float32, one multiply-add per kLanes (16 with AVX-512) products
struct DenseFloat {
  using Element = float;
  using Vector = Floats;
  static constexpr int kStep = kLanes;
  static Vector read(const float* from, int64_t count) { return load<Floats>(from, count); }
  static Floats add(Floats acc, Vector w, Vector x) { return fma(w, x, acc); }
};

#if defined(__AVX512BF16__)
// bfloat16: one dot product per 32 products, each exact, summed in float32
struct DenseBfloat16 {
  using Element = uint16_t;
  using Vector = __m512i;
  static constexpr int kStep = 32;
  static Vector read(const uint16_t* from, int64_t count) {  // up to 32 values, zero past `count`
    const __mmask32 mask = count >= 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
    return _mm512_maskz_loadu_epi16(mask, from);
  }
  static Floats add(Floats acc, Vector w, Vector x) {
    return (Floats)_mm512_dpbf16_ps((__m512)acc, (__m512bh)w, (__m512bh)x);
  }
};
#endif

template <typename Lanes, int ROWS>
void dense_task(const typename Lanes::Element* x, const typename Lanes::Element* w, int64_t K, int64_t N, int64_t n0,
                int64_t outputs, float* out) {
  Floats acc[kDenseOutputs][ROWS] = {};
  for (int64_t k = 0; k < K; k += Lanes::kStep) {
    typename Lanes::Vector xs[ROWS];
    for (int r = 0; r < ROWS; ++r) xs[r] = Lanes::read(x + r * K + k, K - k);
    for (int o = 0; o < kDenseOutputs; ++o) {
      if (o >= outputs) break;
      const typename Lanes::Vector wv = Lanes::read(w + (n0 + o) * K + k, K - k);
      for (int r = 0; r < ROWS; ++r) acc[o][r] = Lanes::add(acc[o][r], wv, xs[r]);
    }
  }
  for (int o = 0; o < outputs; ++o)
    for (int r = 0; r < ROWS; ++r) out[r * N + n0 + o] = sum_lanes(acc[o][r]);
}

bool dense_takes_bfloat16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// x [M, K] float32 (or bfloat16 where dense_takes_bfloat16) · weightᵀ, weight [N, K] of x's dtype → float32 [M, N]
at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& weight) {
  const bool bfloat16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.is_contiguous() && weight.is_contiguous() &&
              x.scalar_type() == weight.scalar_type() && x.size(1) == weight.size(1) &&
              (x.scalar_type() == at::kFloat || (bfloat16 && dense_takes_bfloat16())),
              "x [M, K] and weight [N, K]: contiguous, both float32 (or bfloat16 where dense_takes_bfloat16)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const void* x_data = x.data_ptr();
  const void* w_data = weight.data_ptr();
  float* out_data = out.data_ptr<float>();
  const int64_t tasks = (N + kDenseOutputs - 1) / kDenseOutputs;
  at::parallel_for(0, tasks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        const int64_t n0 = t * kDenseOutputs, outputs = std::min<int64_t>(kDenseOutputs, N - n0);
        for_rows(rows, [&](auto r) {
          constexpr int kRows = decltype(r)::value;
#if defined(__AVX512BF16__)
          if (bfloat16)
            return dense_task<DenseBfloat16, kRows>(static_cast<const uint16_t*>(x_data) + m0 * K,
                                                    static_cast<const uint16_t*>(w_data), K, N, n0, outputs,
                                                    out_data + m0 * N);
#endif
          dense_task<DenseFloat, kRows>(static_cast<const float*>(x_data) + m0 * K, static_cast<const float*>(w_data),
                                        K, N, n0, outputs, out_data + m0 * N);
        });
      }
  });
  return out;
}

int64_t lanes() { return kLanes; }

bool takes_bfloat16(int64_t kind, int64_t bits) { return functions_for(kind, bits).pairs != nullptr; }

// How many of torch's threads take part when `tasks` tasks are spread as the kernels spread theirs (1 where the
// library was compiled without OpenMP: at::parallel_for then runs serially)
int64_t threads_used(int64_t tasks) {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int64_t thread = at::get_thread_num() + 1;
    for (int64_t seen = most.load(); seen < thread && !most.compare_exchange_weak(seen, thread);) {
    }
  });
  return most.load();
}

// What both GPTQ column loops take: contiguous float32 matrices W, codes and errors [rows, width], Hinv [width,
// width], columns [begin, end) within the width, and scale [rows, 1 or end − begin].
void check_column_block(const char* loop, const at::Tensor& W, const at::Tensor& hinv, const at::Tensor& codes,
                        const at::Tensor& errors, const at::Tensor& scale, int64_t begin, int64_t end) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&W, &hinv, &codes, &errors, &scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2, loop,
                ": contiguous float32 matrices");
  const int64_t width = W.size(1), grids = scale.size(1);
  TORCH_CHECK(hinv.size(0) == width && hinv.size(1) == width && codes.sizes() == W.sizes() &&
                  errors.sizes() == W.sizes() && 0 <= begin && begin <= end && end <= width &&
                  scale.size(0) == W.size(0) && (grids == 1 || grids == end - begin),
              loop, ": W, codes, errors [rows, width], Hinv [width, width], a scale per run or column");
}

// GPTQ's column loop for integer grids, columns [begin, end) of one lazy block W [rows, width] in place: a row at a
// time (rows never meet), code = clamp(round(w / s) + z, low, max_code), error = (w − (code − z)·s) / Hinv[i, i],
// then W[r, i:] −= error·Hinv[i, i:]. scale and zero [rows, k]: one grid for the run (k = 1) or one per column
// (k = end − begin). No sums, and every product rounded on its own (-ffp-contract=off): the eager loop's floats.
void gptq_int_columns(at::Tensor& W, const at::Tensor& hinv, at::Tensor& codes, at::Tensor& errors,
                      const at::Tensor& scale, const at::Tensor& zero, int64_t begin, int64_t end, int64_t low,
                      int64_t max_code) {
  const int64_t rows = W.size(0), width = W.size(1), grids = scale.size(1);
  check_column_block("gptq_int_columns", W, hinv, codes, errors, scale, begin, end);
  TORCH_CHECK(zero.scalar_type() == at::kFloat && zero.is_contiguous() && zero.sizes() == scale.sizes(),
              "gptq_int_columns: a float32 zero point for each scale");
  float* w_data = W.data_ptr<float>();
  float* code_data = codes.data_ptr<float>();
  float* error_data = errors.data_ptr<float>();
  const float* h = hinv.data_ptr<float>();
  const float* s_data = scale.data_ptr<float>();
  const float* z_data = zero.data_ptr<float>();
  const float lo = static_cast<float>(low), hi = static_cast<float>(max_code);
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      float* w = w_data + r * width;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t g = grids == 1 ? 0 : i - begin;
        const float s = s_data[r * grids + g], z = z_data[r * grids + g];
        const float code = std::min(std::max(std::nearbyint(w[i] / s) + z, lo), hi);
        const float error = (w[i] - (code - z) * s) / h[i * width + i];
        code_data[r * width + i] = code;
        error_data[r * width + i] = error;
        const float* h_row = h + i * width;
        for (int64_t j = i; j < width; ++j) w[j] -= error * h_row[j];
      }
    }
  });
}

// The nearest code of y in a float element format (E2M1, E2M3, E3M2, E4M3, E5M2): FloatElement._encode of
// formats/fp.py, step for step. The magnitude, clamped to the largest value, has exponent e = max(⌊log2⌋, emin)
// and n = round(|y|·2^(m − e)) steps there (ties to even; the product is exact); the code is (e − emin)·2^m + n
// with the sign above it, and a NaN takes the format's NaN code (or 0).
inline int32_t element_code(float y, int32_t mantissa_bits, int32_t min_exponent, float max_value, int32_t bits,
                            int32_t nan_code) {
  uint32_t y_bits;
  std::memcpy(&y_bits, &y, sizeof y_bits);
  const uint32_t magnitude_bits = y_bits & 0x7FFFFFFFu;
  if (magnitude_bits > 0x7F800000u) return nan_code;
  float magnitude;
  std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
  magnitude = std::min(magnitude, max_value);
  uint32_t clamped_bits;
  std::memcpy(&clamped_bits, &magnitude, sizeof clamped_bits);
  const int32_t exponent = std::max(static_cast<int32_t>((clamped_bits >> 23) & 0xFF) - 127, min_exponent);
  const uint32_t inverse_step_bits = static_cast<uint32_t>(mantissa_bits + 127 - exponent) << 23;
  float inverse_step;
  std::memcpy(&inverse_step, &inverse_step_bits, sizeof inverse_step);
  const int32_t steps = static_cast<int32_t>(std::nearbyint(inverse_step * magnitude));
  return (steps + ((exponent - min_exponent) << mantissa_bits)) |
         (static_cast<int32_t>(y_bits >> 31) << (bits - 1));
}

// GPTQ's column loop for block formats of float elements (MXFP4/6/8, NVFP4), as gptq_int_columns: code =
// element_code(w / s'), s' = s where s > 0 and 1 elsewhere (_ElementBlocks.encode), value = table[code]·s, error
// = (w − value) / Hinv[i, i], W[r, i:] −= error·Hinv[i, i:]. scale [rows, k]: one block's for the run or one per
// column; table: the value of each code.
void gptq_element_columns(at::Tensor& W, const at::Tensor& hinv, at::Tensor& codes, at::Tensor& errors,
                          const at::Tensor& scale, const at::Tensor& table, int64_t begin, int64_t end,
                          int64_t mantissa_bits, int64_t min_exponent, double max_value, int64_t bits,
                          int64_t nan_code) {
  const int64_t rows = W.size(0), width = W.size(1), grids = scale.size(1);
  check_column_block("gptq_element_columns", W, hinv, codes, errors, scale, begin, end);
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.dim() == 1 &&
                  table.size(0) == (int64_t{1} << bits) && 2 <= bits && bits <= 8,
              "gptq_element_columns: a float32 table of 2^bits values");
  float* w_data = W.data_ptr<float>();
  float* code_data = codes.data_ptr<float>();
  float* error_data = errors.data_ptr<float>();
  const float* h = hinv.data_ptr<float>();
  const float* s_data = scale.data_ptr<float>();
  const float* values = table.data_ptr<float>();
  const float largest = static_cast<float>(max_value);
  const auto m = static_cast<int32_t>(mantissa_bits), emin = static_cast<int32_t>(min_exponent);
  const auto nbits = static_cast<int32_t>(bits), nan = static_cast<int32_t>(nan_code);
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      float* w = w_data + r * width;
      for (int64_t i = begin; i < end; ++i) {
        const float s = s_data[r * grids + (grids == 1 ? 0 : i - begin)];
        const int32_t code = element_code(w[i] / (s > 0.0f ? s : 1.0f), m, emin, largest, nbits, nan) & 0xFF;
        const float error = (w[i] - values[code] * s) / h[i * width + i];
        code_data[r * width + i] = static_cast<float>(code);
        error_data[r * width + i] = error;
        const float* h_row = h + i * width;
        for (int64_t j = i; j < width; ++j) w[j] -= error * h_row[j];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(quantbench_cpu, m) {
  m.def("packed_matmul(Tensor x, Tensor words, Tensor scales, Tensor zeros, int kind, int bits, int group, "
        "bool in_x_dtype=False) -> Tensor");
  m.def("decode(Tensor(a!) out, Tensor words, Tensor scales, Tensor zeros, int kind, int bits, int group, "
        "int start) -> ()");
  m.def("input_gradient(Tensor grad, Tensor words, Tensor scales, Tensor zeros, int kind, int bits, int group) "
        "-> Tensor");
  m.def("dense_matmul(Tensor x, Tensor weight) -> Tensor");
  m.def("dense_takes_bfloat16() -> bool", TORCH_FN(dense_takes_bfloat16));
  m.def("lanes() -> int", TORCH_FN(lanes));  // floats in one vector: what the library was compiled for
  m.def("threads_used(int tasks) -> int", TORCH_FN(threads_used));
  m.def("takes_bfloat16(int kind, int bits) -> bool", TORCH_FN(takes_bfloat16));  // the bfloat16 pair kernel
  m.def("gptq_int_columns(Tensor(a!) W, Tensor hinv, Tensor(b!) codes, Tensor(c!) errors, Tensor scale, "
        "Tensor zero, int begin, int end, int low, int max_code) -> ()");
  m.def("gptq_element_columns(Tensor(a!) W, Tensor hinv, Tensor(b!) codes, Tensor(c!) errors, Tensor scale, "
        "Tensor table, int begin, int end, int mantissa_bits, int min_exponent, float max_value, int bits, "
        "int nan_code) -> ()");
  m.impl("packed_matmul", c10::DispatchKey::CPU, TORCH_FN(packed_matmul));
  m.impl("decode", c10::DispatchKey::CPU, TORCH_FN(decode));
  m.impl("input_gradient", c10::DispatchKey::CPU, TORCH_FN(input_gradient));
  m.impl("dense_matmul", c10::DispatchKey::CPU, TORCH_FN(dense_matmul));
  m.impl("gptq_int_columns", c10::DispatchKey::CPU, TORCH_FN(gptq_int_columns));
  m.impl("gptq_element_columns", c10::DispatchKey::CPU, TORCH_FN(gptq_element_columns));
}
