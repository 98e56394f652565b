// The tensor-core kernels' decoding (packed_mma.cu on mma.sync, packed_wgmma.cu on wgmma): a thread's words of 4
// adjacent outputs, a k-step of 4 word rows (one per thread of a quad), their scales, and the code pairs of a
// word decoded into the float16 pairs of a product's fragment. SPAN: k-steps that share one scale (1, 2 or 4),
// 0 where the scales go into the fragment (packed_mma.cu says where each applies).
#pragma once

#include "packed_decode.cuh"

#ifndef SPAN
#define SPAN 0
#endif

namespace {

constexpr int STEP_ROWS = 4;      // word rows per k-step: one per thread of a quad
constexpr int PRODUCTS = PER / 4;  // k16 products per word: 4 codes each per thread
constexpr int SLAB = 4;           // k-steps per load-ahead

// One slab's words of this thread's 4 outputs (zero past the last row or output).
__device__ __forceinline__ void load_slab(uint4 (&words)[SLAB], const uint32_t* __restrict__ w, int step0,
                                          int rows_end, int N, int n0, int t, bool active) {
#pragma unroll
  for (int i = 0; i < SLAB; ++i) {
    const int j = (step0 + i) * STEP_ROWS + t;
    words[i] = active && j < rows_end ? load_streaming(w + static_cast<size_t>(j) * N + n0)
                                       : make_uint4(0, 0, 0, 0);
  }
}

// The k-steps of each of `splits` blocks along K: whole slabs, so that every slab and span keeps its place.
__host__ __device__ inline int split_steps(int steps, int splits) {
  return ((steps + splits - 1) / splits + SLAB - 1) / SLAB * SLAB;
}

constexpr bool ON_SUMS = SPAN > 0;  // scales applied to each span's sums (else to B, per word row)
// MXFP4 scales go into B only for weights whose every E8M0 code keeps its block's E2M1 values float16 normals
// (cuda_mma.py checks them before choosing such a build); else onto the sums.
static_assert(KIND != 3 || !ON_SUMS, "NVFP4 blocks of 16 are shorter than a k-step");
constexpr int PLANES = KIND == 1 ? 2 : 1;  // ternary on sums: each trit plane summed apart

// The scales of one word row's group for this thread: per weight column 4g + o where they go into B, per
// accumulator column 8t + o and 8t + 4 + o where they go onto the sums; zero points always per weight column.
struct Scales {
  half2 b[PLANES][OUTS];
  float zero[OUTS];              // int, span sums: the zero points
  uint32_t bias[OUTS][FIELDS];  // int, scales into B: field_minus's constant per field of a byte, from its bits
  float c_low[PLANES][OUTS], c_high[PLANES][OUTS];
};

// The bits one scale load reads, a slab ahead of their use: float16 scales (per plane; in `low` for this
// thread's weight columns where they go into B, else for accumulator columns 8t + o, and 8t + 4 + o in `high`),
// zero points, and MXFP4's (low, high) or NVFP4's (low.x) scale codes. Unused members cost no registers.
struct ScaleBits {
  uint2 low[PLANES], high[PLANES];
  uint32_t zeros;
};

__device__ __forceinline__ uint2 eight_bytes(const void* p, bool inside) {
  return inside ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0, 0);
}

__device__ __forceinline__ uint32_t four_bytes(const void* p, bool inside) {
  return inside ? __ldg(reinterpret_cast<const uint32_t*>(p)) : 0u;
}

__device__ __forceinline__ ScaleBits load_scale_bits(const void* __restrict__ scales_,
                                                     const uint8_t* __restrict__ zeros, int group, int n_groups,
                                                     int N, int n0, int n_warp, int t, bool active) {
  ScaleBits bits{};
  const size_t at = static_cast<size_t>(group) * N + n0;
  const size_t at_sums = static_cast<size_t>(group) * N + n_warp + 8 * t;
  const bool low = n_warp + 8 * t < N, high = n_warp + 8 * t + 4 < N;
#if KIND == 0 || KIND == 1
  const half* scales = static_cast<const half*>(scales_);
#pragma unroll
  for (int plane = 0; plane < PLANES; ++plane) {  // the second plane's α follow the first's
    const size_t offset = static_cast<size_t>(plane) * n_groups * N;
    if (ON_SUMS) {
      bits.low[plane] = eight_bytes(scales + offset + at_sums, low);
      bits.high[plane] = eight_bytes(scales + offset + at_sums + 4, high);
    } else {
      bits.low[plane] = eight_bytes(scales + offset + at, active);
    }
  }
#if HAS_ZEROS
  bits.zeros = four_bytes(zeros + at, active);
#endif
#else
  const uint8_t* codes = static_cast<const uint8_t*>(scales_);
  if (KIND == 2 && ON_SUMS) {
    bits.low[0].x = four_bytes(codes + at_sums, low);
    bits.high[0].x = four_bytes(codes + at_sums + 4, high);
  } else {
    bits.low[0].x = four_bytes(codes + at, active);
  }
#endif
  (void)zeros;
  return bits;
}

__device__ __forceinline__ float half_of(uint2 v, int o) {
  return o < 2 ? (o ? __high2float(as_half2(v.x)) : __low2float(as_half2(v.x)))
               : (o == 3 ? __high2float(as_half2(v.y)) : __low2float(as_half2(v.y)));
}

// Float16 o of the four in v, in both lanes (its bits moved, not converted).
__device__ __forceinline__ half2 both_lanes(uint2 v, int o) {
  return as_half2(__byte_perm(o < 2 ? v.x : v.y, 0u, o % 2 ? 0x3232u : 0x1010u));
}

__device__ __forceinline__ Scales unpack_scales(const ScaleBits& bits) {
  Scales s;
#pragma unroll
  for (int o = 0; o < OUTS; ++o) {
#if KIND == 0 || KIND == 1
#pragma unroll
    for (int plane = 0; plane < PLANES; ++plane) {
      if (ON_SUMS) {
        s.c_low[plane][o] = half_of(bits.low[plane], o);
        s.c_high[plane][o] = half_of(bits.high[plane], o);
      } else {
        s.b[plane][o] = both_lanes(bits.low[plane], o);
      }
    }
#endif
#if KIND == 0
    // Where every k-step unpacks its scales, the constants are built from the zero's bits (a float zero costs a
    // conversion and two float additions each); once a span, the float path compiles to fewer instructions.
    if (ON_SUMS) {
      s.zero[o] = HAS_ZEROS ? static_cast<float>((bits.zeros >> (8 * o)) & 0xFFu) : static_cast<float>(1 << (BITS - 1));
    } else {
      const uint32_t zero = HAS_ZEROS ? __byte_perm(bits.zeros, 0u, 0x4040u + 0x0101u * o)  // byte o, both lanes
                                      : (1u << (BITS - 1)) * 0x00010001u;
#pragma unroll
      for (int f = 0; f < FIELDS; ++f) s.bias[o][f] = field_bias(zero, BITS * f);
    }
#elif KIND == 2  // on sums, a code 0 past N scales sums that are zero
    if (ON_SUMS) {
      s.c_low[0][o] = e8m0_value((bits.low[0].x >> (8 * o)) & 0xFFu);
      s.c_high[0][o] = e8m0_value((bits.high[0].x >> (8 * o)) & 0xFFu);
    } else {  // 2^(code − 127) as float16 bits (exponent field code − 112), in both lanes
      const uint32_t exponent = (((bits.low[0].x >> (8 * o)) & 0xFFu) - 112u) << 10;
      s.b[0][o] = as_half2(exponent | exponent << 16);
    }
#elif KIND == 3
    s.b[0][o] = __float2half2_rn(e4m3_value((bits.low[0].x >> (8 * o)) & 0xFFu));
#endif
  }
  return s;
}

// Word → the B registers of its PRODUCTS products (two code pairs each) for each plane, scaled where B
// carries the scale.
__device__ __forceinline__ void decode_word(uint32_t word, const Scales& s, int o, uint32_t (&b)[PLANES][PAIRS]) {
#pragma unroll
  for (int p = 0; p < PAIRS; ++p) {
    const uint32_t bytes = word >> pair_shift(p);
    const int bit = field_bit(p);
#if KIND == 0
    const half2 v = ON_SUMS ? field_minus(bytes, bit, CODE_MASK, s.zero[o])
                            : field_minus_biased(bytes, bit, CODE_MASK, s.bias[o][p % FIELDS]);
    b[0][p] = as_bits(ON_SUMS ? v : __hmul2(v, s.b[0][o]));
#elif KIND == 1  // trit digits are t + 1
    const half2 t1 = field_minus(bytes, bit, 0x00030003u, 1.f), t2 = field_minus(bytes, bit + 2, 0x00030003u, 1.f);
    if (ON_SUMS) {
      b[0][p] = as_bits(t1);
      b[PLANES - 1][p] = as_bits(t2);
    } else {
      b[0][p] = as_bits(__hfma2(t2, s.b[PLANES - 1][o], __hmul2(t1, s.b[0][o])));
    }
#elif KIND == 2
    b[0][p] = as_bits(ON_SUMS ? e2m1_pair(bytes, bit) : __hmul2(e2m1_pair(bytes, bit), s.b[0][o]));
#else
    b[0][p] = as_bits(__hmul2(e2m1_pair(bytes, bit), s.b[0][o]));
#endif
  }
}

}  // namespace
