// Packed-weight kernels for the CPU (built by cpu_packed.py): a matmul for a few rows of x, where every weight
// word is decoded once, in vector lanes along the outputs, for four rows at once and never stored as floats;
// and a decode of a slab of inputs to float32, for batches that a dense matmul then multiplies faster.
//
// Within a group, the matmul sums x·v per row and output, v the code's value (int: the code q itself; ternary
// α1·lo + α2·hi; fp4 e2m1(q)·s); at the group's end it applies what the codes' values leave out:
//   int      w = s·q − s·z                      out += s·Σx·q − (s·z)·Σx
//   ternary  w = α1·(lo − 1) + α2·(hi − 1)      out += Σx·(α1·lo + α2·hi) − (α1 + α2)·Σx
//   fp4      w = e2m1(q)·s                      out += Σx·e2m1(q)·s
// `scales` holds s (ternary: α1, then α2) and `offsets` s·z (ternary: α1 + α2), float32 [G, N] each.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// Scales that apply to each code: the group's s (ternary: α1 and α2) for 16 outputs
struct Scales {
  Floats s, s2;
};

inline Scales scales_at(const float* scales, int64_t plane, int64_t at, int64_t count, bool two) {
  return {load<Floats>(scales + at, count), two ? load<Floats>(scales + plane + at, count) : Floats{}};
}

// A code's value: int q (its scale applies to the group's sums), ternary α1·lo + α2·hi, fp4 e2m1(q)·s
template <int64_t KIND>
inline Floats code_value(Words code, const Scales& scales) {
  if constexpr (KIND == kTernary)
    return scales.s * to_floats(code & 3u) + scales.s2 * to_floats(code >> 2);
  else if constexpr (KIND == kInt)
    return to_floats(code);
  else
    return e2m1(code) * scales.s;
}

template <int64_t KIND, int BITS, int ROWS>
void matmul_block(const float* x, int64_t K, const uint32_t* words, int64_t N, const float* scales,
                  const float* offsets, int64_t group, int64_t n0, int64_t width, float* out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t groups = (K + group - 1) / group;  // the last may be shorter
  Floats acc[ROWS][kVectors] = {};
  for (int64_t g = 0; g < groups; ++g) {
    Floats sums[ROWS][kVectors] = {};  // int: Σx·q of the group; else Σx·w
    Scales group_scales[kVectors];
    for (int v = 0; v < kVectors; ++v)
      group_scales[v] = scales_at(scales, groups * N, g * N + n0 + v * kLanes, width - v * kLanes,
                                  KIND == kTernary);
    float x_sum[ROWS] = {};
    for (int64_t k0 = g * group; k0 < std::min((g + 1) * group, K); k0 += kPerWord) {
      const uint32_t* row = words + (k0 / kPerWord) * N + n0;
      Words w[kVectors];
      for (int v = 0; v < kVectors; ++v) w[v] = load<Words>(row + v * kLanes, width - v * kLanes);
      for (int j = 0; j < kPerWord; ++j) {
        float xj[ROWS];
        for (int r = 0; r < ROWS; ++r) {
          xj[r] = x[r * K + k0 + j];
          x_sum[r] += xj[r];
        }
        for (int v = 0; v < kVectors; ++v) {
          const Floats value = code_value<KIND>((w[v] >> (j * BITS)) & kMask, group_scales[v]);
          for (int r = 0; r < ROWS; ++r) sums[r][v] = fma(value, Floats{} + xj[r], sums[r][v]);
        }
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      const int64_t at = g * N + n0 + v * kLanes, count = width - v * kLanes;
      for (int r = 0; r < ROWS; ++r) {
        Floats sum = KIND == kInt ? group_scales[v].s * sums[r][v] : sums[r][v];
        if constexpr (KIND == kInt || KIND == kTernary) sum -= load<Floats>(offsets + at, count) * x_sum[r];
        acc[r][v] += sum;
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVectors; ++v) store(out + r * N + n0 + v * kLanes, acc[r][v], width - v * kLanes);
}

// word rows [row0, row1) decoded to float32 [(row1 − row0)·per word, N] (inputs in their stored order)
template <int64_t KIND, int BITS>
void decode_rows(const uint32_t* words, int64_t N, const float* scales, const float* offsets, int64_t groups,
                 int64_t group, int64_t row0, int64_t row1, int64_t first_row, float* out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  for (int64_t word_row = row0; word_row < row1; ++word_row) {
    const int64_t g = word_row * kPerWord / group;
    for (int64_t n = 0; n < N; n += kLanes) {
      const int64_t count = N - n, at = g * N + n;
      const Words w = load<Words>(words + word_row * N + n, count);
      const Scales group_scales = scales_at(scales, groups * N, at, count, KIND == kTernary);
      const Floats offset = KIND == kInt || KIND == kTernary ? load<Floats>(offsets + at, count) : Floats{};
      for (int j = 0; j < kPerWord; ++j) {
        Floats value = code_value<KIND>((w >> (j * BITS)) & kMask, group_scales);
        if constexpr (KIND == kInt) value *= group_scales.s;
        store(out + ((word_row - first_row) * kPerWord + j) * N + n, value - offset, count);
      }
    }
  }
}

template <int64_t KIND, int BITS>
void matmul_rows(int rows, const float* x, int64_t K, const uint32_t* words, int64_t N, const float* scales,
                 const float* offsets, int64_t group, int64_t n0, int64_t width, float* out) {
  switch (rows) {
    case 1: return matmul_block<KIND, BITS, 1>(x, K, words, N, scales, offsets, group, n0, width, out);
    case 2: return matmul_block<KIND, BITS, 2>(x, K, words, N, scales, offsets, group, n0, width, out);
    case 3: return matmul_block<KIND, BITS, 3>(x, K, words, N, scales, offsets, group, n0, width, out);
    default: return matmul_block<KIND, BITS, 4>(x, K, words, N, scales, offsets, group, n0, width, out);
  }
}

using MatmulFn = void (*)(int, const float*, int64_t, const uint32_t*, int64_t, const float*, const float*,
                          int64_t, int64_t, int64_t, float*);
using DecodeFn = void (*)(const uint32_t*, int64_t, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, float*);

template <int64_t KIND, int BITS>
std::pair<MatmulFn, DecodeFn> functions_of() {
  return {matmul_rows<KIND, BITS>, decode_rows<KIND, BITS>};
}

std::pair<MatmulFn, DecodeFn> functions_for(int64_t kind, int64_t bits) {
  if (kind == kInt && bits == 2) return functions_of<kInt, 2>();
  if (kind == kInt && bits == 4) return functions_of<kInt, 4>();
  if (kind == kInt && bits == 8) return functions_of<kInt, 8>();
  if (kind == kTernary && bits == 4) return functions_of<kTernary, 4>();
  if ((kind == kMxfp4 || kind == kNvfp4) && bits == 4) return functions_of<kMxfp4, 4>();
  TORCH_CHECK(false, "no CPU kernel for weight kind ", kind, " with ", bits, " bits");
}

struct Weight {
  const uint32_t* words;
  const float* scales;
  const float* offsets;
  int64_t K, N, group;
};

// words int32 [K / (32 / bits), N]; scales float32 [P, G, N] (G = ⌈K / group⌉, P = 2 for ternary, else 1);
// offsets float32 [G, N] for int and ternary (else ignored)
Weight checked(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& offsets, int64_t kind,
               int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, not ", bits);
  TORCH_CHECK(words.dim() == 2 && words.scalar_type() == at::kInt && words.is_contiguous(),
              "words: contiguous int32 [K / codes per word, N]");
  const int64_t K = words.size(0) * (32 / bits), N = words.size(1);
  TORCH_CHECK(group > 0 && group % (32 / bits) == 0, "the group ", group, " must hold whole words");
  const int64_t groups = (K + group - 1) / group;
  const int64_t planes = kind == kTernary ? 2 : 1;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
              scales.numel() == planes * groups * N, "scales: contiguous float32 [", planes, ", ⌈K / group⌉, N]");
  const bool has_offsets = kind == kInt || kind == kTernary;
  TORCH_CHECK(!has_offsets || (offsets.scalar_type() == at::kFloat && offsets.is_contiguous() &&
                               offsets.numel() == groups * N), "offsets: contiguous float32 [⌈K / group⌉, N]");
  return {reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), scales.data_ptr<float>(),
          has_offsets ? offsets.data_ptr<float>() : nullptr, K, N, group};
}

// x float32 [M, K], inputs in the weight's stored order → x·Wᵀ float32 [M, N]
at::Tensor packed_matmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                         const at::Tensor& offsets, int64_t kind, int64_t bits, int64_t group) {
  const Weight w = checked(words, scales, offsets, kind, bits, group);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == w.K,
              "x: contiguous float32 [M, ", w.K, "]");
  const MatmulFn fn = functions_for(kind, bits).first;
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, w.N}, x.options());
  const float* x_data = x.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t blocks = (w.N + kOutputs - 1) / kOutputs;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * kOutputs;
        fn(rows, x_data + m0 * w.K, w.K, w.words, w.N, w.scales, w.offsets, w.group, n0,
           std::min(kOutputs, w.N - n0), out_data + m0 * w.N);
      }
    });
  }
  return out;
}

// out float32 [rows, N] ← the stored inputs [start, start + rows) decoded (whole words)
void decode(at::Tensor& out, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& offsets,
            int64_t kind, int64_t bits, int64_t group, int64_t start) {
  const Weight w = checked(words, scales, offsets, kind, bits, group);
  const int64_t per_word = 32 / bits, stop = start + out.size(0);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == w.N,
              "out: contiguous float32 [rows, ", w.N, "]");
  TORCH_CHECK(0 <= start && stop <= w.K && start % per_word == 0 && stop % per_word == 0,
              "[", start, ", ", stop, ") must hold whole words of the ", w.K, " inputs");
  const DecodeFn fn = functions_for(kind, bits).second;
  float* out_data = out.data_ptr<float>();
  const int64_t first = start / per_word;
  at::parallel_for(first, stop / per_word, 1, [&](int64_t begin, int64_t end) {
    fn(w.words, w.N, w.scales, w.offsets, (w.K + w.group - 1) / w.group, w.group, begin, end, first, out_data);
  });
}

int64_t lanes() { return kLanes; }

}  // namespace

TORCH_LIBRARY(quantbench_cpu, m) {
  m.def("packed_matmul(Tensor x, Tensor words, Tensor scales, Tensor offsets, int kind, int bits, int group) "
        "-> Tensor");
  m.def("decode(Tensor(a!) out, Tensor words, Tensor scales, Tensor offsets, int kind, int bits, int group, "
        "int start) -> ()");
  m.def("lanes() -> int", TORCH_FN(lanes));  // floats in one vector: what the library was compiled for
  m.impl("packed_matmul", c10::DispatchKey::CPU, TORCH_FN(packed_matmul));
  m.impl("decode", c10::DispatchKey::CPU, TORCH_FN(decode));
}
