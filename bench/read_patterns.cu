// Loads alone over a [rows, n] int32 word matrix (the decode kernel's layout) in the access patterns a batch-1
// kernel could take, for bench/read_patterns.py: which of a pattern's traits sets the read rate.
//
// A block reads a column tile of `lanes` threads × WIDTH bytes along a row, over its share of the rows (`splits`
// blocks along them). Its THREADS / lanes row lanes take ROWS rows each per round, either consecutive rows
// (as packed_gemv.cu's slabs) or `interleaved` (row lane r takes r, r + row lanes, …, as a Triton tile's warps
// do). PIPELINED: the next round's rows load while this round's are folded (packed_gemv.cu's register path);
// else each round waits for its own loads. Words are XOR-folded so that no load is dropped. The kernel promises
// the compiler one block per multiprocessor only (launch bounds), so that it holds a round's words in registers
// at once instead of interleaving loads and uses to fit more blocks (it does that below 32 registers).

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

template <int WIDTH>
struct Words;
template <>
struct Words<4> {
  uint32_t v;
  __device__ __forceinline__ void load(const uint32_t* p) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
  }
  __device__ __forceinline__ uint32_t fold(uint32_t acc) const { return acc ^ v; }
};
template <>
struct Words<8> {
  uint32_t v[2];
  __device__ __forceinline__ void load(const uint32_t* p) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(v[0]), "=r"(v[1]) : "l"(p));
  }
  __device__ __forceinline__ uint32_t fold(uint32_t acc) const { return acc ^ v[0] ^ v[1]; }
};
template <>
struct Words<16> {
  uint32_t v[4];
  __device__ __forceinline__ void load(const uint32_t* p) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
  }
  __device__ __forceinline__ uint32_t fold(uint32_t acc) const { return acc ^ v[0] ^ v[1] ^ v[2] ^ v[3]; }
};

template <int WIDTH, int ROWS>
__device__ __forceinline__ void load_round(Words<WIDTH> (&words)[ROWS], const uint32_t* __restrict__ column, int j0,
                                           int spacing, int end, int n, bool active) {
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int j = j0 + i * spacing;
    if (active && j < end) words[i].load(column + static_cast<size_t>(j) * n);
    else words[i] = Words<WIDTH>{};
  }
}

template <int WIDTH, int ROWS, int THREADS, bool PIPELINED>
__global__ void __launch_bounds__(THREADS, 1) read_words(const uint32_t* __restrict__ w, uint32_t* __restrict__ out,
                                                      int rows, int n, int lanes, int interleaved) {
  constexpr int PER = WIDTH / 4;
  const int lane = threadIdx.x % lanes, row_lane = threadIdx.x / lanes, row_lanes = THREADS / lanes;
  const int col = (blockIdx.x * lanes + lane) * PER;
  const bool active = col < n;
  const int chunk = (rows + gridDim.y - 1) / gridDim.y;
  const int begin = blockIdx.y * chunk, end = min(rows, begin + chunk);
  const int first = begin + (interleaved ? row_lane : row_lane * ROWS);
  const int spacing = interleaved ? row_lanes : 1;
  const int step = row_lanes * ROWS;
  const uint32_t* column = w + col;
  uint32_t acc = 0;
  Words<WIDTH> words[ROWS], next[ROWS];
  if constexpr (PIPELINED) load_round<WIDTH, ROWS>(next, column, first, spacing, end, n, active);
  for (int j0 = first; j0 < end; j0 += step) {
    if constexpr (PIPELINED) {
#pragma unroll
      for (int i = 0; i < ROWS; ++i) words[i] = next[i];
      load_round<WIDTH, ROWS>(next, column, j0 + step, spacing, end, n, active);
    } else {
      load_round<WIDTH, ROWS>(words, column, j0, spacing, end, n, active);
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) acc = words[i].fold(acc);
  }
  if (acc == 0x9E3779B9u) out[blockIdx.y * gridDim.x + blockIdx.x] = acc;  // keeps the loads; almost never stores
}

template <int WIDTH, int ROWS, int THREADS, bool PIPELINED>
int run(int lanes, int splits, int interleaved, const void* w, void* out, int rows, int n, cudaStream_t stream,
        int* blocks_per_sm) {
  constexpr auto kernel = read_words<WIDTH, ROWS, THREADS, PIPELINED>;
  if (blocks_per_sm) return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, THREADS, 0);
  const int per_block = lanes * WIDTH / 4;
  const dim3 grid((n + per_block - 1) / per_block, splits);
  kernel<<<grid, THREADS, 0, stream>>>(static_cast<const uint32_t*>(w), static_cast<uint32_t*>(out), rows, n, lanes,
                                       interleaved);
  return cudaGetLastError();
}

template <int WIDTH, int ROWS, int THREADS>
int by_pipelined(int pipelined, int lanes, int splits, int interleaved, const void* w, void* out, int rows, int n,
                 cudaStream_t stream, int* blocks_per_sm) {
  if (pipelined)
    return run<WIDTH, ROWS, THREADS, true>(lanes, splits, interleaved, w, out, rows, n, stream, blocks_per_sm);
  return run<WIDTH, ROWS, THREADS, false>(lanes, splits, interleaved, w, out, rows, n, stream, blocks_per_sm);
}

template <int WIDTH, int ROWS>
int by_threads(int threads, int pipelined, int lanes, int splits, int interleaved, const void* w, void* out, int rows,
               int n, cudaStream_t stream, int* blocks_per_sm) {
  switch (threads) {
    case 128: return by_pipelined<WIDTH, ROWS, 128>(pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                                    blocks_per_sm);
    case 256: return by_pipelined<WIDTH, ROWS, 256>(pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                                    blocks_per_sm);
    case 512: return by_pipelined<WIDTH, ROWS, 512>(pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                                    blocks_per_sm);
  }
  return cudaErrorInvalidValue;
}

template <int WIDTH>
int by_rows(int rows_per_round, int threads, int pipelined, int lanes, int splits, int interleaved, const void* w,
            void* out, int rows, int n, cudaStream_t stream, int* blocks_per_sm) {
  switch (rows_per_round) {
    case 2: return by_threads<WIDTH, 2>(threads, pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                        blocks_per_sm);
    case 4: return by_threads<WIDTH, 4>(threads, pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                        blocks_per_sm);
    case 8: return by_threads<WIDTH, 8>(threads, pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                        blocks_per_sm);
    case 16: return by_threads<WIDTH, 16>(threads, pipelined, lanes, splits, interleaved, w, out, rows, n, stream,
                                          blocks_per_sm);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Returns a cudaError_t. width 4, 8 or 16 bytes per load; rows_per_round 2, 4, 8 or 16; threads 128, 256 or 512,
// a multiple of lanes; splits blocks along the rows; blocks_per_sm non-null: only the occupancy is written there.
extern "C" int quantbench_read_words(int width, int rows_per_round, int threads, int pipelined, int lanes, int splits,
                                     int interleaved, const void* w, void* out, int rows, int n, void* stream,
                                     int* blocks_per_sm) {
  if (lanes < 1 || threads % lanes || splits < 1 || splits > 65535) return cudaErrorInvalidValue;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (width) {
    case 4: return by_rows<4>(rows_per_round, threads, pipelined, lanes, splits, interleaved, w, out, rows, n, s,
                              blocks_per_sm);
    case 8: return by_rows<8>(rows_per_round, threads, pipelined, lanes, splits, interleaved, w, out, rows, n, s,
                              blocks_per_sm);
    case 16: return by_rows<16>(rows_per_round, threads, pipelined, lanes, splits, interleaved, w, out, rows, n, s,
                                blocks_per_sm);
  }
  return cudaErrorInvalidValue;
}
