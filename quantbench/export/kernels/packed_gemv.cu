// x·Wᵀ for a few rows of float16 x and a packed weight in the kernel layout (layout.py), on CUDA cores.
// Built by cuda_build.py with nvcc, one library per weight type (packed_decode.cuh: KIND, BITS, HAS_ZEROS);
// HAS_PERM: act_order, stored input k reads x[perm[k]] (the block first gathers its rows of x into shared
// memory); FLUSH: word rows that share one scale (1, 2, 4 or 8).
//
// Each thread owns 4 adjacent outputs and copies their words of one input row in 16 bytes; a warp covers
// LANES_N × 16 contiguous bytes of 32 / LANES_N rows. Word rows go in slabs of 8 round-robin over the
// block's THREADS / LANES_N row lanes, in one of two ways (the tuner times both): each slab loaded into
// registers while the previous one is decoded, or (ASYNC, up to 2 rows of x) cp.async copies into 2–4
// shared-memory stages per thread, several slabs in flight without holding registers. Each pair of codes,
// decoded to q − z (packed_decode.cuh), is multiplied by one more f16x2 FMA into the matching pair of
// inputs. Sums run in float16 within a scale's rows and in float32 across them; the row lanes are reduced
// by shuffles and through shared memory.

#include "packed_decode.cuh"

#ifndef HAS_PERM
#define HAS_PERM 0
#endif
#ifndef FLUSH
#define FLUSH 8
#endif
#ifndef LOAD_ONLY
#define LOAD_ONLY 0
#endif

namespace {

constexpr int SLAB = 8;

__device__ __forceinline__ float lane_sum(half2 v) { return __low2float(v) + __high2float(v); }

// Stages of slabs in flight per thread (ASYNC): as many as keep a block's buffers within 64–128 KB.
template <int THREADS>
__host__ __device__ constexpr int stages() { return THREADS <= 128 ? 4 : THREADS <= 256 ? 3 : 2; }

template <int THREADS>
__host__ __device__ constexpr size_t stage_bytes() { return static_cast<size_t>(stages<THREADS>()) * SLAB * THREADS * sizeof(uint4); }

// cp.async of one slab's words of this thread's 4 outputs into its column of a stage (zeros past the last
// row or output), as one commit group.
template <int THREADS>
__device__ __forceinline__ void copy_slab(uint4* stage, const uint32_t* __restrict__ w, int j0, int rows, int N,
                                          int n0, bool active) {
#pragma unroll
  for (int i = 0; i < SLAB; ++i) {
    const bool inside = active && j0 + i < rows;
    const uint32_t* source = inside ? w + static_cast<size_t>(j0 + i) * N + n0 : w;
    const uint32_t target = static_cast<uint32_t>(__cvta_generic_to_shared(stage + i * THREADS + threadIdx.x));
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;"
                 :: "r"(target), "l"(source), "r"(inside ? 16 : 0));
  }
  asm volatile("cp.async.commit_group;");
}

template <int N_GROUPS>
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group %0;" :: "n"(N_GROUPS)); }

// One slab's words of this thread's 4 outputs (zero past the last row or output).
__device__ __forceinline__ void load_slab(uint4 (&words)[SLAB], const uint32_t* __restrict__ w, int j0, int rows,
                                          int N, int n0, bool active) {
#pragma unroll
  for (int i = 0; i < SLAB; ++i)
    words[i] = active && j0 + i < rows ? load_streaming(w + static_cast<size_t>(j0 + i) * N + n0)
                                       : make_uint4(0, 0, 0, 0);
}

template <int ROWS, int LANES_N, int THREADS, bool ASYNC>
__global__ void __launch_bounds__(THREADS) packed_gemv(
    const half* __restrict__ x, const int* __restrict__ perm, const uint32_t* __restrict__ w,
    const void* __restrict__ scales_, const uint8_t* __restrict__ zeros, half* __restrict__ out,
    int M, int N, int K, int n_groups, int row_shift, int stride_x, float inverse_global_scale) {
  constexpr int ROW_LANES = THREADS / LANES_N;
  constexpr int WARPS = THREADS / 32;
  constexpr int BLOCK_N = LANES_N * OUTS;
  constexpr int STEP = ROW_LANES * SLAB;
  __shared__ float partial[WARPS][ROWS][BLOCK_N];

  const int lane_n = threadIdx.x % LANES_N;
  const int row_lane = threadIdx.x / LANES_N;
  const int n0 = blockIdx.x * BLOCK_N + lane_n * OUTS;
  const int m0 = blockIdx.y * ROWS;
  const int rows = K / PER;
  const bool active = n0 < N;

  extern __shared__ uint4 dynamic_shared[];  // ASYNC: [stages][SLAB][THREADS] words; then HAS_PERM: gathered x
  constexpr int STAGES = stages<THREADS>();
  uint4* const staged = dynamic_shared;
  uint4 next[SLAB];
  if constexpr (ASYNC) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      copy_slab<THREADS>(staged + s * SLAB * THREADS, w, row_lane * SLAB + s * STEP, rows, N, n0, active);
  } else {
    load_slab(next, w, row_lane * SLAB, rows, N, n0, active);
  }
#if HAS_PERM  // the block's rows of x, gathered while the first slabs load
  half* gathered = reinterpret_cast<half*>(dynamic_shared + (ASYNC ? stage_bytes<THREADS>() / sizeof(uint4) : 0));
  constexpr int GATHER = 4;  // chunks of 4 indices per thread and round: their loads in flight together
  for (int base = 4 * threadIdx.x; base < K; base += 4 * THREADS * GATHER) {
    int4 index[GATHER];
#pragma unroll
    for (int u = 0; u < GATHER; ++u) {
      const int k = base + 4 * THREADS * u;
      index[u] = k < K ? __ldg(reinterpret_cast<const int4*>(perm + k)) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < GATHER; ++u) {
      const int k = base + 4 * THREADS * u;
      if (k >= K) continue;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const half* x_row = x + static_cast<size_t>(min(m0 + r, M - 1)) * stride_x;
        half* row = gathered + static_cast<size_t>(r) * K;
        row[k] = __ldg(x_row + index[u].x); row[k + 1] = __ldg(x_row + index[u].y);
        row[k + 2] = __ldg(x_row + index[u].z); row[k + 3] = __ldg(x_row + index[u].w);
      }
    }
  }
  __syncthreads();
  const half* x_rows = gathered;
  stride_x = K;
#else
  const half* x_rows = x + static_cast<size_t>(m0) * stride_x;
#endif

  float total[ROWS][OUTS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int o = 0; o < OUTS; ++o) total[r][o] = 0.f;

  for (int j0 = row_lane * SLAB, it = 0; j0 < rows; j0 += STEP, ++it) {
    uint4 words[SLAB];
    if constexpr (ASYNC) {  // each thread reads back only what it copied itself: its own wait suffices
      copy_slab<THREADS>(staged + ((it + STAGES - 1) % STAGES) * SLAB * THREADS, w, j0 + (STAGES - 1) * STEP, rows,
                         N, n0, active);
      wait_copies<STAGES - 1>();
      const uint4* stage = staged + (it % STAGES) * SLAB * THREADS;
#pragma unroll
      for (int i = 0; i < SLAB; ++i) words[i] = stage[i * THREADS + threadIdx.x];
    } else {
#pragma unroll
      for (int i = 0; i < SLAB; ++i) words[i] = next[i];
      load_slab(next, w, j0 + STEP, rows, N, n0, active);
    }
#if LOAD_ONLY  // bench/gemv_anatomy.py: the loads alone, their words folded so that none is dropped
    uint32_t folded = 0;
#pragma unroll
    for (int i = 0; i < SLAB; ++i) folded ^= words[i].x ^ words[i].y ^ words[i].z ^ words[i].w;
    total[0][0] += static_cast<float>(folded & 1u);
    continue;
#endif
#pragma unroll
    for (int f = 0; f < SLAB; f += FLUSH) {
      const int g = min((j0 + f) >> row_shift, n_groups - 1);
      const size_t at = static_cast<size_t>(g) * N + n0;
      float scale[OUTS], second[OUTS], zero[OUTS];
#if KIND == 0 || KIND == 1
      const half* scales = static_cast<const half*>(scales_);
      const uint2 s = active ? __ldg(reinterpret_cast<const uint2*>(scales + at)) : make_uint2(0, 0);
      scale[0] = __low2float(as_half2(s.x)); scale[1] = __high2float(as_half2(s.x));
      scale[2] = __low2float(as_half2(s.y)); scale[3] = __high2float(as_half2(s.y));
#endif
#if KIND == 0
#if HAS_ZEROS
      const uint32_t z = active ? __ldg(reinterpret_cast<const uint32_t*>(zeros + at)) : 0u;
#pragma unroll
      for (int o = 0; o < OUTS; ++o) zero[o] = static_cast<float>((z >> (8 * o)) & 0xFFu);
#else
#pragma unroll
      for (int o = 0; o < OUTS; ++o) zero[o] = static_cast<float>(1 << (BITS - 1));
#endif
#elif KIND == 1
      const uint2 s2 = active ? __ldg(reinterpret_cast<const uint2*>(scales + static_cast<size_t>(n_groups) * N + at))
                              : make_uint2(0, 0);
      second[0] = __low2float(as_half2(s2.x)); second[1] = __high2float(as_half2(s2.x));
      second[2] = __low2float(as_half2(s2.y)); second[3] = __high2float(as_half2(s2.y));
#else
      const uint32_t codes = active ? __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(scales_) + at)) : 0u;
#pragma unroll
      for (int o = 0; o < OUTS; ++o) {
        const uint32_t c = (codes >> (8 * o)) & 0xFFu;
        scale[o] = KIND == 2 ? e8m0_value(c) : e4m3_value(c) * inverse_global_scale;
      }
#endif
      half2 acc[ROWS][OUTS], acc_second[ROWS][OUTS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int o = 0; o < OUTS; ++o) acc[r][o] = acc_second[r][o] = __float2half2_rn(0.f);
#pragma unroll
      for (int i = f; i < f + FLUSH; ++i) {
        half2 pairs[ROWS][PAIRS];
        input_pairs<ROWS>(x_rows, j0 + i, j0 + i < rows, m0, M, stride_x, pairs);
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
          const uint32_t word = word_of(words[i], o);
#pragma unroll
          for (int p = 0; p < PAIRS; ++p) {
            const uint32_t bytes = word >> pair_shift(p);
            const int b = field_bit(p);
#if KIND == 0
            const half2 v = field_minus(bytes, b, CODE_MASK, zero[o]);
#elif KIND == 1
            const half2 v = field_minus(bytes, b, 0x00030003u, 1.f);  // trit digits are t + 1
            const half2 v2 = field_minus(bytes, b + 2, 0x00030003u, 1.f);
#else
            const half2 v = e2m1_pair(bytes, b);
#endif
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              acc[r][o] = __hfma2(v, pairs[r][p], acc[r][o]);
#if KIND == 1
              acc_second[r][o] = __hfma2(v2, pairs[r][p], acc_second[r][o]);
#endif
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
          total[r][o] += scale[o] * lane_sum(acc[r][o]);
#if KIND == 1
          total[r][o] += second[o] * lane_sum(acc_second[r][o]);
#endif
        }
      (void)second; (void)zero;
    }
  }

  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
#pragma unroll
      for (int offset = LANES_N; offset < 32; offset *= 2)
        total[r][o] += __shfl_xor_sync(0xffffffffu, total[r][o], offset);
      if (threadIdx.x % 32 < LANES_N) partial[warp][r][lane_n * OUTS + o] = total[r][o];
    }
  __syncthreads();
  for (int t = threadIdx.x; t < ROWS * BLOCK_N; t += THREADS) {
    const int r = t / BLOCK_N, c = t % BLOCK_N;
    const int n = blockIdx.x * BLOCK_N + c;
    if (m0 + r >= M || n >= N) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) sum += partial[v][r][c];
    out[static_cast<size_t>(m0 + r) * N + n] = __float2half_rn(sum);
  }
}

struct Call {
  const void *x, *perm, *w, *scales, *zeros;
  void* out;
  int M, N, K, n_groups, row_shift, stride_x;
  float inverse_global_scale;
  cudaStream_t stream;
};

template <int ROWS, int LANES_N, int THREADS, bool ASYNC>
cudaError_t launch(const Call& c) {
  const dim3 grid((c.N + LANES_N * OUTS - 1) / (LANES_N * OUTS), (c.M + ROWS - 1) / ROWS);
  const size_t shared = (ASYNC ? stage_bytes<THREADS>() : 0) +
                        (HAS_PERM ? static_cast<size_t>(ROWS) * c.K * sizeof(half) : 0);
  auto kernel = packed_gemv<ROWS, LANES_N, THREADS, ASYNC>;
  const cudaError_t error = allow_shared_memory<packed_gemv<ROWS, LANES_N, THREADS, ASYNC>>(shared);
  if (error != cudaSuccess) return error;
  kernel<<<grid, THREADS, shared, c.stream>>>(
      static_cast<const half*>(c.x), static_cast<const int*>(c.perm), static_cast<const uint32_t*>(c.w), c.scales,
      static_cast<const uint8_t*>(c.zeros), static_cast<half*>(c.out), c.M, c.N, c.K, c.n_groups, c.row_shift,
      c.stride_x, c.inverse_global_scale);
  return cudaGetLastError();
}

template <int ROWS, int LANES_N, bool ASYNC>
cudaError_t by_threads(int threads, const Call& c) {
  switch (threads) {
    case 128: return launch<ROWS, LANES_N, 128, ASYNC>(c);
    case 256: return launch<ROWS, LANES_N, 256, ASYNC>(c);
  }
  if (ROWS == 1 && threads == 512) return launch<1, LANES_N, 512, ASYNC>(c);  // more rows spill at 128 registers
  return cudaErrorInvalidValue;
}

template <int ROWS, bool ASYNC>
cudaError_t by_lanes(int lanes_n, int threads, const Call& c) {
  switch (lanes_n) {
    case 4: return by_threads<ROWS, 4, ASYNC>(threads, c);
    case 8: return by_threads<ROWS, 8, ASYNC>(threads, c);
    case 16: return by_threads<ROWS, 16, ASYNC>(threads, c);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Returns a cudaError_t (0: launched). rows_per_program 1, 2, 4 or 8; lanes_n 4, 8 or 16; threads 128 or
// 256, or with one row 512; async_copies (cp.async stages) with 1 or 2 rows. HAS_PERM takes
// rows_per_program · K · 2 bytes of shared memory.
extern "C" int quantbench_packed_gemv(int rows_per_program, int lanes_n, int threads, int async_copies, const void* x,
                                      const void* perm, const void* w, const void* scales, const void* zeros,
                                      void* out, int M, int N, int K, int n_groups, int row_shift, int stride_x,
                                      float inverse_global_scale, void* stream) {
  const Call c{x, perm, w, scales, zeros, out, M, N, K, n_groups, row_shift, stride_x, inverse_global_scale,
               static_cast<cudaStream_t>(stream)};
  if (async_copies) {
    switch (rows_per_program) {
      case 1: return by_lanes<1, true>(lanes_n, threads, c);
      case 2: return by_lanes<2, true>(lanes_n, threads, c);
    }
    return cudaErrorInvalidValue;
  }
  switch (rows_per_program) {
    case 1: return by_lanes<1, false>(lanes_n, threads, c);
    case 2: return by_lanes<2, false>(lanes_n, threads, c);
    case 4: return by_lanes<4, false>(lanes_n, threads, c);
    case 8: return by_lanes<8, false>(lanes_n, threads, c);
  }
  return cudaErrorInvalidValue;
}
