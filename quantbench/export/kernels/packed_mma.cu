// x·Wᵀ for 1–64 rows of float16 x and a packed weight in the kernel layout (layout.py), on tensor cores
// (mma.sync m16n8k16, float32 sums). Built by cuda_build.py with nvcc, one library per weight type
// (packed_decode.cuh: KIND, BITS, HAS_ZEROS); SPAN: k-steps that share one scale (1, 2 or 4). act_order is
// gathered before the call.
//
// No layout of its own: a product's k order is free as long as x and W agree on it, so lane (g, t) of a
// warp (g = lane / 4, t = lane % 4) takes word row 4·step + t whole. Each thread loads 4 adjacent outputs'
// words of that row in 16 bytes, a warp 32 outputs × 4 word rows in four 128-byte lines, and decodes
// each word's code pairs (p, p + PAIRS) into the B fragments of PER / 4 products: column g of n-tile o is
// output 4g + o, and physical k (2t, 2t + 1) of product i, register r is stored input (PER·(4·step + t)
// + 2i + r, … + PAIRS). The A fragments are the matching pairs of x's rows g and g + 8. int and ternary
// weights are scaled into B (float16 scales: one rounding, as a dequantized float16 weight); NVFP4's
// E2M1 × E4M3 products are exact in float16 and the global scale is applied last; MXFP4's power-of-two
// scales may leave float16's range, so each block of 32 inputs (one k-step) is summed apart and scaled
// in float32.
//
// A block's WARPS warps cover WARPS_N × 32 outputs and split the k-steps among WARPS / WARPS_N of them in
// slabs of 4, the next slab's words loading into registers while one is decoded; their sums meet in
// shared memory. Rows of x: 8 (the upper half of each m-tile idle), 16 or 32 per block.

#include "packed_decode.cuh"

#ifndef SPAN
#define SPAN 1
#endif

namespace {

constexpr int STEP_ROWS = 4;   // word rows per k-step: one per thread of a quad
constexpr int PRODUCTS = PER / 4;  // m16n8k16 products per word: 4 codes each per thread
constexpr int SLAB = 4;        // k-steps per load-ahead
constexpr int COLS = 8 * OUTS;  // outputs per warp

__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One slab's words of this thread's 4 outputs (zero past the last row or output).
__device__ __forceinline__ void load_slab(uint4 (&words)[SLAB], const uint32_t* __restrict__ w, int step0,
                                          int word_rows, int N, int n0, int t, bool active) {
#pragma unroll
  for (int i = 0; i < SLAB; ++i) {
    const int j = (step0 + i) * STEP_ROWS + t;
    words[i] = active && j < word_rows ? load_streaming(w + static_cast<size_t>(j) * N + n0)
                                       : make_uint4(0, 0, 0, 0);
  }
}

// The scales of one word row's group for this thread: B's (per weight column 4g + o) or, MXFP4, C's (per
// accumulator column 8t + o and 8t + 4 + o).
struct Scales {
  half2 b[OUTS], b_second[OUTS];
  float zero[OUTS];
  float c_low[OUTS], c_high[OUTS];
};

__device__ __forceinline__ void load_scales(Scales& s, const void* __restrict__ scales_, const uint8_t* __restrict__ zeros,
                                            int group, int n_groups, int N, int n0, int n_warp, int t,
                                            bool active) {
  const size_t at = static_cast<size_t>(group) * N + n0;
#if KIND == 0 || KIND == 1
  const half* scales = static_cast<const half*>(scales_);
  const uint2 v = active ? __ldg(reinterpret_cast<const uint2*>(scales + at)) : make_uint2(0, 0);
  s.b[0] = __low2half2(as_half2(v.x)); s.b[1] = __high2half2(as_half2(v.x));
  s.b[2] = __low2half2(as_half2(v.y)); s.b[3] = __high2half2(as_half2(v.y));
#endif
#if KIND == 0
#if HAS_ZEROS
  const uint32_t z = active ? __ldg(reinterpret_cast<const uint32_t*>(zeros + at)) : 0u;
#pragma unroll
  for (int o = 0; o < OUTS; ++o) s.zero[o] = static_cast<float>((z >> (8 * o)) & 0xFFu);
#else
#pragma unroll
  for (int o = 0; o < OUTS; ++o) s.zero[o] = static_cast<float>(1 << (BITS - 1));
#endif
#elif KIND == 1  // the second plane's α follow the first's
  const uint2 v2 = active ? __ldg(reinterpret_cast<const uint2*>(scales + static_cast<size_t>(n_groups) * N + at))
                          : make_uint2(0, 0);
  s.b_second[0] = __low2half2(as_half2(v2.x)); s.b_second[1] = __high2half2(as_half2(v2.x));
  s.b_second[2] = __low2half2(as_half2(v2.y)); s.b_second[3] = __high2half2(as_half2(v2.y));
#endif
#if KIND == 2
  const uint8_t* codes = static_cast<const uint8_t*>(scales_) + static_cast<size_t>(group) * N + n_warp + 8 * t;
  const bool low = n_warp + 8 * t < N, high = n_warp + 8 * t + 4 < N;
  const uint32_t c_low = low ? __ldg(reinterpret_cast<const uint32_t*>(codes)) : 0u;
  const uint32_t c_high = high ? __ldg(reinterpret_cast<const uint32_t*>(codes + 4)) : 0u;
#pragma unroll
  for (int o = 0; o < OUTS; ++o) {
    s.c_low[o] = low ? e8m0_value((c_low >> (8 * o)) & 0xFFu) : 0.f;
    s.c_high[o] = high ? e8m0_value((c_high >> (8 * o)) & 0xFFu) : 0.f;
  }
#elif KIND == 3
  const uint32_t codes = active ? __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(scales_) + at)) : 0u;
#pragma unroll
  for (int o = 0; o < OUTS; ++o) s.b[o] = __float2half2_rn(e4m3_value((codes >> (8 * o)) & 0xFFu));
#endif
}

// Word → the B registers of its PRODUCTS products (two code pairs each), scaled where B carries the scale.
__device__ __forceinline__ void decode_word(uint32_t word, const Scales& s, int o, uint32_t (&b)[PAIRS]) {
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const uint32_t bytes = word >> pair_shift(p);
    const int bit = field_bit(p);
#if KIND == 0
    const half2 v = __hmul2(field_minus(bytes, bit, CODE_MASK, s.zero[o]), s.b[o]);
#elif KIND == 1  // trit digits are t + 1
    const half2 v = __hfma2(field_minus(bytes, bit + 2, 0x00030003u, 1.f), s.b_second[o],
                            __hmul2(field_minus(bytes, bit, 0x00030003u, 1.f), s.b[o]));
#elif KIND == 2
    const half2 v = e2m1_pair(bytes, bit);
#else
    const half2 v = __hmul2(e2m1_pair(bytes, bit), s.b[o]);
#endif
    b[p] = as_bits(v);
  }
}

template <int ROWS, int WARPS, int WARPS_N>
__global__ void __launch_bounds__(WARPS * 32) packed_mma(
    const half* __restrict__ x, const uint32_t* __restrict__ w, const void* __restrict__ scales_,
    const uint8_t* __restrict__ zeros, half* __restrict__ out, int M, int N, int K, int n_groups, int row_shift,
    int stride_x, float inverse_global_scale) {
  constexpr int TILES_M = ROWS <= 16 ? 1 : ROWS / 16;
  constexpr bool UPPER = ROWS >= 16;  // rows g + 8 of each m-tile hold x
  constexpr int WARPS_K = WARPS / WARPS_N;
  constexpr int TILE_ROWS = 16 * TILES_M;
  __shared__ float partial[WARPS][TILE_ROWS][COLS];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_n = warp % WARPS_N, warp_k = warp / WARPS_N;
  const int n_warp = (blockIdx.x * WARPS_N + warp_n) * COLS;
  const int n0 = n_warp + OUTS * g;
  const int m0 = blockIdx.y * ROWS;
  const int word_rows = K / PER;
  const int steps = (word_rows + STEP_ROWS - 1) / STEP_ROWS;
  const bool active = n0 < N;

  float acc[TILES_M][OUTS][4];
#pragma unroll
  for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][o][e] = 0.f;

  uint4 next[SLAB];
  load_slab(next, w, warp_k * SLAB, word_rows, N, n0, t, active);
  Scales s;
  for (int step0 = warp_k * SLAB; step0 < steps; step0 += WARPS_K * SLAB) {
    uint4 words[SLAB];
#pragma unroll
    for (int i = 0; i < SLAB; ++i) words[i] = next[i];
    load_slab(next, w, step0 + WARPS_K * SLAB, word_rows, N, n0, t, active);
#pragma unroll
    for (int i = 0; i < SLAB; ++i) {
      const int j = (step0 + i) * STEP_ROWS + t;
      if (i % SPAN == 0) {
        const int group = min(j >> row_shift, n_groups - 1);
        load_scales(s, scales_, zeros, group, n_groups, N, n0, n_warp, t, active);
      }
      uint32_t a[TILES_M][PRODUCTS][4];
#pragma unroll
      for (int mt = 0; mt < TILES_M; ++mt) {
        const int row = m0 + 16 * mt + g;
        half2 low[1][PAIRS], high[1][PAIRS];
        input_pairs<1>(x + static_cast<size_t>(row) * stride_x, j, j < word_rows, row, M, stride_x, low);
        if (UPPER) {
          input_pairs<1>(x + static_cast<size_t>(row + 8) * stride_x, j, j < word_rows, row + 8, M, stride_x, high);
        }
#pragma unroll
        for (int i2 = 0; i2 < PRODUCTS; ++i2) {
          a[mt][i2][0] = as_bits(low[0][2 * i2]);
          a[mt][i2][1] = UPPER ? as_bits(high[0][2 * i2]) : 0u;
          a[mt][i2][2] = as_bits(low[0][2 * i2 + 1]);
          a[mt][i2][3] = UPPER ? as_bits(high[0][2 * i2 + 1]) : 0u;
        }
      }
#pragma unroll
      for (int o = 0; o < OUTS; ++o) {
        uint32_t b[PAIRS];
        decode_word(word_of(words[i], o), s, o, b);
#pragma unroll
        for (int mt = 0; mt < TILES_M; ++mt) {
#if KIND == 2  // one k-step is one block of 32 inputs: summed apart, then scaled per accumulator column
          float block[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int i2 = 0; i2 < PRODUCTS; ++i2) mma(block, a[mt][i2], b[2 * i2], b[2 * i2 + 1]);
          acc[mt][o][0] += s.c_low[o] * block[0]; acc[mt][o][1] += s.c_high[o] * block[1];
          acc[mt][o][2] += s.c_low[o] * block[2]; acc[mt][o][3] += s.c_high[o] * block[3];
#else
#pragma unroll
          for (int i2 = 0; i2 < PRODUCTS; ++i2) mma(acc[mt][o], a[mt][i2], b[2 * i2], b[2 * i2 + 1]);
#endif
        }
      }
    }
  }

  // Accumulator e of n-tile o: row g (+ 8 for e ≥ 2), physical column 2t + e % 2, i.e. output 8t + 4·(e % 2) + o.
#pragma unroll
  for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        partial[warp][16 * mt + g + 8 * (e / 2)][8 * t + 4 * (e % 2) + o] = acc[mt][o][e];
  __syncthreads();
  const float last_scale = KIND == 3 ? inverse_global_scale : 1.f;
  for (int idx = threadIdx.x; idx < WARPS_N * ROWS * COLS; idx += WARPS * 32) {
    const int wn = idx / (ROWS * COLS), r = idx / COLS % ROWS, c = idx % COLS;
    const int m = m0 + r, n = (blockIdx.x * WARPS_N + wn) * COLS + c;
    if (m >= M || n >= N) continue;
    float sum = 0.f;
#pragma unroll
    for (int wk = 0; wk < WARPS_K; ++wk) sum += partial[wk * WARPS_N + wn][r][c];
    out[static_cast<size_t>(m) * N + n] = __float2half_rn(sum * last_scale);
  }
}

struct Call {
  const void *x, *w, *scales, *zeros;
  void* out;
  int M, N, K, n_groups, row_shift, stride_x;
  float inverse_global_scale;
  cudaStream_t stream;
};

template <int ROWS, int WARPS, int WARPS_N>
cudaError_t launch(const Call& c) {
  const dim3 grid((c.N + WARPS_N * COLS - 1) / (WARPS_N * COLS), (c.M + ROWS - 1) / ROWS);
  packed_mma<ROWS, WARPS, WARPS_N><<<grid, WARPS * 32, 0, c.stream>>>(
      static_cast<const half*>(c.x), static_cast<const uint32_t*>(c.w), c.scales, static_cast<const uint8_t*>(c.zeros),
      static_cast<half*>(c.out), c.M, c.N, c.K, c.n_groups, c.row_shift, c.stride_x, c.inverse_global_scale);
  return cudaGetLastError();
}

template <int ROWS, int WARPS>
cudaError_t by_warps_n(int warps_n, const Call& c) {
  switch (warps_n) {
    case 1: return launch<ROWS, WARPS, 1>(c);
    case 2: return launch<ROWS, WARPS, 2>(c);
    case 4: return launch<ROWS, WARPS, 4>(c);
  }
  return cudaErrorInvalidValue;
}

template <int ROWS>
cudaError_t by_warps(int warps, int warps_n, const Call& c) {
  switch (warps) {
    case 4: return by_warps_n<ROWS, 4>(warps_n, c);
    case 8: return by_warps_n<ROWS, 8>(warps_n, c);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Returns a cudaError_t (0: launched). rows_per_block 8, 16 or 32; warps 4 or 8, warps_n 1, 2 or 4 of
// them along the outputs. x [M, K] float16 in the stored input order, rows 16-byte aligned.
extern "C" int quantbench_packed_mma(int rows_per_block, int warps, int warps_n, const void* x, const void* w,
                                     const void* scales, const void* zeros, void* out, int M, int N, int K,
                                     int n_groups, int row_shift, int stride_x, float inverse_global_scale,
                                     void* stream) {
  const Call c{x, w, scales, zeros, out, M, N, K, n_groups, row_shift, stride_x, inverse_global_scale,
               static_cast<cudaStream_t>(stream)};
  switch (rows_per_block) {
    case 8: return by_warps<8>(warps, warps_n, c);
    case 16: return by_warps<16>(warps, warps_n, c);
    case 32: return by_warps<32>(warps, warps_n, c);
  }
  return cudaErrorInvalidValue;
}
