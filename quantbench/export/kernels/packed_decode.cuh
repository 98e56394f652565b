// Decoding shared by the CUDA kernels (packed_gemv.cu, packed_mma.cu) of the kernel layout (layout.py): qweight
// int32 [K / PER, N], PER = 32 / BITS codes of one output per word, code i at bits [i·BITS, (i+1)·BITS).
//   KIND 0 int (BITS 2, 4, 8; HAS_ZEROS: uint8 zero points, else 2^(BITS−1)), 1 ternary pair codes,
//   2 mxfp4, 3 nvfp4.
// Two codes of a word, the fields at bits b and 16 + b, become 1024 + 2^b·q in both float16 lanes by one
// LOP3 (Marlin's and ExLlama's trick, b < 8 so the field stays in the mantissa; the word shifts by 8 for its
// upper bytes), and one f16x2 FMA turns that into q − z exactly. E2M1 codes are shifted into float16 bits.
// A word's codes go in pairs (p, p + PAIRS), matched by the input pairs (x[p], x[p + PAIRS]).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#ifndef KIND
#define KIND 0
#endif
#ifndef BITS
#define BITS 4
#endif
#ifndef HAS_ZEROS
#define HAS_ZEROS 0
#endif

namespace {

constexpr int PER = 32 / BITS;
constexpr int PAIRS = PER / 2;
constexpr int FIELDS = 8 / BITS;  // code pairs in the low byte of each 16-bit lane
constexpr int OUTS = 4;           // outputs whose words one thread loads in 16 bytes
[[maybe_unused]] constexpr uint32_t CODE_MASK = ((1u << BITS) - 1u) * 0x00010001u;
constexpr uint32_t HALF_1024 = 0x64006400u;  // float16 1024 in both lanes

__device__ __forceinline__ uint4 load_streaming(const uint32_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));  // (a & mask) | bits
  return r;
}

__device__ __forceinline__ half2 as_half2(uint32_t v) { return *reinterpret_cast<half2*>(&v); }

__device__ __forceinline__ uint32_t as_bits(half2 v) { return *reinterpret_cast<uint32_t*>(&v); }

__device__ __forceinline__ uint32_t word_of(const uint4& v, int o) {
  return o == 0 ? v.x : o == 1 ? v.y : o == 2 ? v.z : v.w;
}

// The field of code pair p sits at bit `field_bit(p)` of `word >> pair_shift(p)`.
__host__ __device__ constexpr int pair_shift(int p) { return 8 * (p / FIELDS); }
__host__ __device__ constexpr int field_bit(int p) { return BITS * (p % FIELDS); }

// d − c for the field at bits [b, b + width) of both lanes: 1024 + 2^b·d by one LOP3, then one exact FMA whose
// constant `bias` is −(2^(10 − b) + c) in both lanes.
__device__ __forceinline__ half2 field_minus_biased(uint32_t word, int b, uint32_t width_mask, uint32_t bias) {
  const half2 biased = as_half2(and_or(word, width_mask << b, HALF_1024));
  return __hfma2(biased, __float2half2_rn(1.f / static_cast<float>(1 << b)), as_half2(bias));
}

// The same with c a float (its constant converted from float).
__device__ __forceinline__ half2 field_minus(uint32_t word, int b, uint32_t width_mask, float c) {
  const float unit = 1.f / static_cast<float>(1 << b);
  return field_minus_biased(word, b, width_mask, as_bits(__float2half2_rn(-(1024.f * unit + c))));
}

// −(2^(10 − b) + c) in both float16 lanes, built from its bits (exponent 25 − b, mantissa c·2^b) for an integer
// c < 2^(10 − b) given in both lanes: field_minus's constant, without float arithmetic.
__host__ __device__ constexpr uint32_t field_bias(uint32_t c_both_lanes, int b) {
  return (c_both_lanes << b) | ((0x8000u | static_cast<uint32_t>(25 - b) << 10) * 0x00010001u);
}

// E2M1 [s e1 e0 m] at bit b of both lanes: |e m| shifted into a float16's exponent and mantissa is 2^-14
// times the element, the sign goes to bit 15; the exact product by 2^14 keeps it out of subnormals.
__device__ __forceinline__ half2 e2m1_pair(uint32_t word, int b) {
  const uint32_t codes = word >> b;
  const uint32_t bits = ((codes & 0x00070007u) << 9) | ((codes & 0x00080008u) << 12);
  return __hmul2(as_half2(bits), __float2half2_rn(16384.f));
}

// 2^(code − 127) built from its bits (code 0: the subnormal 2^-127), without exp2f's special-function unit.
__device__ __forceinline__ float e8m0_value(uint32_t code) { return __uint_as_float(code ? code << 23 : 0x00400000u); }

// A non-negative E4M3 code's bits placed in a float16 are 2^-8 times its value.
__device__ __forceinline__ float e4m3_value(uint32_t code) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>((code & 0x7Fu) << 7))) * 256.f;
}

// Programmatic dependent launch (sm_90 on): a kernel launched by `launch_after` with `dependent` may start
// while the stream's previous kernel is still running, and loads what does not depend on it (its weights)
// before `wait_for_previous_kernel`, which returns once that kernel's writes are visible. It calls
// `let_next_kernel_start` when its own loads are done, so that a next kernel launched the same way (Triton's
// under TORCHINDUCTOR_ENABLE_PDL=1, or ours) starts in turn. Both are no-ops in a kernel launched plainly.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_start() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Split-K: counts this block's arrival at its tile of outputs (one int per (blockIdx.y, blockIdx.x), zero
// before a call) once its partial sums are written, and tells every thread whether it was the last of the
// `splits` blocks along K; the last sets the count back to zero for the next call and sees every split's sums.
// (Both kernels' split-K ends here.)
__device__ __forceinline__ bool last_to_arrive(int* __restrict__ arrivals, int splits) {
  __shared__ bool last;
  __threadfence();  // this block's partial sums are visible before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    int* count = arrivals + blockIdx.y * gridDim.x + blockIdx.x;
    last = atomicAdd(count, 1) == splits - 1;
    if (last) *count = 0;  // every split has arrived: ready for the next call
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();
  return true;
}

// A finished output (float32 sum) stored as float16: at column n of a row of N outputs, or where `gated` (a gated
// MLP's gate and up rows interleaved, gate j at output 2j and up j at 2j + 1; called for even n with up's sum)
// silu(gate)·up at column n / 2 of a row of N / 2.
__device__ __forceinline__ void store_output(half* __restrict__ out, int m, int n, int N, bool gated, float sum,
                                             float up) {
  if (gated)
    out[static_cast<size_t>(m) * (N / 2) + n / 2] = __float2half_rn(sum / (1.f + __expf(-sum)) * up);
  else
    out[static_cast<size_t>(m) * N + n] = __float2half_rn(sum);
}

template <typename... Params, typename... Args>
__host__ cudaError_t launch_after(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                                  bool dependent, Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// Lets KERNEL take `bytes` of dynamic shared memory beyond the default 48 KB. The attribute is per device and
// kernel, so it is set once per device (again only for more bytes): a tile's first launch is eager, and no
// graph capture, where setting it is not allowed, sees the call.
template <auto KERNEL>
__host__ cudaError_t allow_shared_memory(size_t bytes) {
  constexpr int MAX_DEVICES = 64;
  static size_t allowed[MAX_DEVICES] = {};
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  if (device < MAX_DEVICES && allowed[device] >= bytes) return cudaSuccess;
  error = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (error == cudaSuccess && device < MAX_DEVICES) allowed[device] = bytes;
  return error;
}

// Word row j's PER inputs of one row of x, two per word (zero unless `live`); READ_ONLY: x in global memory,
// through the read-only data path.
template <bool READ_ONLY = false>
__device__ __forceinline__ void input_words(const half* __restrict__ row, int j, bool live, uint32_t (&words)[PER / 2]) {
  const half* at = row + j * PER;
  if (PER >= 8) {
#pragma unroll
    for (int q = 0; q < PER / 8; ++q) {
      const uint4* p = reinterpret_cast<const uint4*>(at) + q;
      const uint4 v = live ? (READ_ONLY ? __ldg(p) : *p) : make_uint4(0, 0, 0, 0);
      words[4 * q] = v.x; words[4 * q + 1] = v.y; words[4 * q + 2] = v.z; words[4 * q + 3] = v.w;
    }
  } else {
    const uint2* p = reinterpret_cast<const uint2*>(at);
    const uint2 v = live ? (READ_ONLY ? __ldg(p) : *p) : make_uint2(0, 0);
    words[0] = v.x; words[1] = v.y;
  }
}

// The pairs (x[p], x[p + PAIRS]) of those words: p and p + PAIRS have the same parity, so both are the low or
// both the high halves of their words.
__device__ __forceinline__ void pairs_of(const uint32_t (&words)[PER / 2], half2 (&pairs)[PAIRS]) {
#pragma unroll
  for (int p = 0; p < PAIRS; ++p)
    pairs[p] = as_half2(__byte_perm(words[p / 2], words[(p + PAIRS) / 2], p % 2 ? 0x7632 : 0x5410));
}

// The pairs of word row j's inputs for each of ROWS rows of x (zero past K or M).
template <int ROWS, bool READ_ONLY = false>
__device__ __forceinline__ void input_pairs(const half* __restrict__ x, int j, bool inside, int m0, int M,
                                            int stride_x, half2 (&pairs)[ROWS][PAIRS]) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    uint32_t words[PER / 2];
    input_words<READ_ONLY>(x + static_cast<size_t>(r) * stride_x, j, inside && m0 + r < M, words);
    pairs_of(words, pairs[r]);
  }
}

}  // namespace
