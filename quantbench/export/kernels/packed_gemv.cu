// x·Wᵀ for a few rows of float16 x and a packed weight in the kernel layout (layout.py), on CUDA cores.
// Built by cuda_build.py with nvcc, one library per weight type (packed_decode.cuh: KIND, BITS, HAS_ZEROS);
// HAS_PERM: act_order, stored input k reads x[perm[k]] (the block first copies its rows of x whole into shared
// memory and gathers its inputs from there); FLUSH: word rows that share one scale (1, 2, 4 or 8).
//
// Each thread owns 4 adjacent outputs and copies their words of one input row in 16 bytes; a warp covers
// LANES_N × 16 contiguous bytes of 32 / LANES_N rows. Word rows go in slabs of 8 round-robin over the
// block's THREADS / LANES_N row lanes, in one of three ways (the tuner times them): each slab loaded into
// registers while the previous one is decoded; the same a row at a time (STREAMED, 1–2 rows of x: each row's
// register reloaded as soon as that row is decoded, so a slab's worth of loads stays in flight); or (ASYNC,
// 1–2 rows of x) cp.async copies into 2–4 shared-memory stages per thread, several slabs in flight without
// holding registers, each slab's scale groups copied beside its words (the register paths load scales into
// registers, where a slab's scales share a scoreboard with the next slab's loads and wait for them too). Each
// pair of codes, decoded to q − z (packed_decode.cuh), is multiplied by one more f16x2 FMA into the matching pair
// of inputs. Sums run in float16 within a scale's rows and in float32 across them; the row lanes are reduced by
// shuffles and through shared memory.
//
// The outputs go to gridDim.x blocks in even shares of whole 4-output units, at most BLOCK_N each: one block per
// BLOCK_N outputs by default, or more (column_blocks), so that every multiprocessor streams the same share of
// the weight while all blocks walk the word rows together.
//
// Split-K (gridDim.z > 1), for more blocks in flight than the columns alone give: each block takes its own
// run of whole slabs and writes float32 partial sums; the last block of a column tile to arrive (counted in
// `arrivals`, which it sets back to zero) adds them in split order, so the sum does not depend on timing.

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
constexpr int GROUPS = SLAB / FLUSH;  // scale groups a slab spans

__device__ __forceinline__ float lane_sum(half2 v) { return __low2float(v) + __high2float(v); }

// Stages of slabs in flight per thread (ASYNC): as many as keep a block's buffers within 64–128 KB.
template <int THREADS>
__host__ __device__ constexpr int stages() { return THREADS <= 128 ? 4 : THREADS <= 256 ? 3 : 2; }

// A stage: the slab's words, SLAB × THREADS 16-byte slots, then its scale groups, GROUPS × THREADS slots (scales in
// the first 8 bytes; the second plane's scales, the zero points or the scale codes in the next 8 or 4).
constexpr int STAGE_SLOTS = SLAB + GROUPS;

template <int THREADS>
__host__ __device__ constexpr size_t stage_bytes() {
  return static_cast<size_t>(stages<THREADS>()) * STAGE_SLOTS * THREADS * sizeof(uint4);
}

// cp.async of BYTES (4, 8 or 16) from `source` to shared `target` (zeros where not `inside`).
template <int BYTES>
__device__ __forceinline__ void copy_bytes(uint32_t target, const void* source, bool inside) {
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;"
                 :: "r"(target), "l"(source), "r"(inside ? 16 : 0));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
                 :: "r"(target), "l"(source), "n"(BYTES), "r"(inside ? BYTES : 0));
}

// cp.async of one slab's words of this thread's 4 outputs into its column of a stage (zeros past the last
// row or output), and of the slab's scale groups for them (as load_group reads them), as one commit group.
// `column`: the thread's words in row 0. A slab's rows are reached by adding N words a row to its first row's
// address (one 64-bit product a slab, not one a row).
template <int THREADS>
__device__ __forceinline__ void copy_slab(uint4* stage, const uint32_t* __restrict__ column,
                                          const void* __restrict__ scales_, const uint8_t* __restrict__ zeros, int j0,
                                          int rows, int row_shift, int n_groups, int N, int n0, bool active) {
  const uint32_t* row = column + static_cast<size_t>(j0) * N;
#pragma unroll
  for (int i = 0; i < SLAB; ++i, row += N) {
    const bool inside = active && j0 + i < rows;
    copy_bytes<16>(static_cast<uint32_t>(__cvta_generic_to_shared(stage + i * THREADS + threadIdx.x)),
                   inside ? row : column, inside);
  }
  const bool live = active && j0 < rows;
#pragma unroll
  for (int f = 0; f < GROUPS; ++f) {
    const size_t at = live ? static_cast<size_t>(min((j0 + f * FLUSH) >> row_shift, n_groups - 1)) * N + n0 : 0;
    const uint32_t slot = static_cast<uint32_t>(__cvta_generic_to_shared(stage + (SLAB + f) * THREADS + threadIdx.x));
#if KIND == 0 || KIND == 1
    copy_bytes<8>(slot, static_cast<const half*>(scales_) + at, live);
#endif
#if KIND == 0 && HAS_ZEROS
    copy_bytes<4>(slot + 8, zeros + at, live);
#elif KIND == 1
    copy_bytes<8>(slot + 8, static_cast<const half*>(scales_) + (live ? static_cast<size_t>(n_groups) * N : 0) + at,
                  live);
#elif KIND >= 2
    copy_bytes<4>(slot + 8, static_cast<const uint8_t*>(scales_) + at, live);
#endif
  }
  (void)zeros;
  asm volatile("cp.async.commit_group;");
}

// The word rows of each of `splits` blocks along K: whole slabs, so that every slab keeps its scale groups.
__host__ __device__ inline int split_rows(int rows, int splits) {
  return ((rows + splits - 1) / splits + SLAB - 1) / SLAB * SLAB;
}

template <int N_GROUPS>
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group %0;" :: "n"(N_GROUPS)); }

// One word row's words of this thread's 4 outputs, at `row` (zero where it is not `inside`).
__device__ __forceinline__ uint4 load_row(const uint32_t* __restrict__ row, bool inside) {
  return inside ? load_streaming(row) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ void load_slab(uint4 (&words)[SLAB], const uint32_t* __restrict__ column, int j0, int rows,
                                          int N, bool active) {
  const uint32_t* row = column + static_cast<size_t>(j0) * N;
#pragma unroll
  for (int i = 0; i < SLAB; ++i, row += N) words[i] = load_row(row, active && j0 + i < rows);
}

// One scale group's values for this thread's 4 outputs, as stored: float16 scales (int, ternary), the second
// plane's (ternary), uint8 zero points (int) or E8M0/E4M3 codes (MXFP4/NVFP4). Loaded with their slab.
struct GroupScales {
  uint2 scales, second;
  uint32_t bytes;
};

__device__ __forceinline__ GroupScales load_group(const void* __restrict__ scales_, const uint8_t* __restrict__ zeros,
                                                  int j, int row_shift, int n_groups, int N, int n0, bool active) {
  GroupScales v{make_uint2(0, 0), make_uint2(0, 0), 0u};
  if (!active) return v;
  const size_t at = static_cast<size_t>(min(j >> row_shift, n_groups - 1)) * N + n0;
#if KIND == 0 || KIND == 1
  const half* scales = static_cast<const half*>(scales_);
  v.scales = __ldg(reinterpret_cast<const uint2*>(scales + at));
#endif
#if KIND == 0 && HAS_ZEROS
  v.bytes = __ldg(reinterpret_cast<const uint32_t*>(zeros + at));
#elif KIND == 1
  v.second = __ldg(reinterpret_cast<const uint2*>(scales + static_cast<size_t>(n_groups) * N + at));
#elif KIND >= 2
  v.bytes = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(scales_) + at));
#endif
  return v;
}

// A scale group as copy_slab left it in a stage.
__device__ __forceinline__ GroupScales staged_group(const uint4& slot) {
  return {make_uint2(slot.x, slot.y), make_uint2(slot.z, slot.w), slot.z};
}

__device__ __forceinline__ void load_groups(GroupScales (&groups)[GROUPS], const void* __restrict__ scales_,
                                            const uint8_t* __restrict__ zeros, int j0, int rows, int row_shift,
                                            int n_groups, int N, int n0, bool active) {
#pragma unroll
  for (int f = 0; f < GROUPS; ++f)
    groups[f] = load_group(scales_, zeros, j0 + f * FLUSH, row_shift, n_groups, N, n0, active && j0 < rows);
}

// cp.async of rows [m0, m0 + ROWS) of x, inputs [begin, end), into shared rows of `width` inputs, as one
// commit group (rows past M are left as they are: their sums are never stored).
template <int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows(half* shared, const half* __restrict__ x, int begin, int end, int width,
                                          int m0, int M, int stride_x) {
  const int chunks = (end - begin) / 8;  // 16 bytes each
  for (int t = threadIdx.x; t < ROWS * chunks; t += THREADS) {
    const int r = t / chunks, k = begin + 8 * (t % chunks);
    if (m0 + r >= M) break;
    half* const at = shared + static_cast<size_t>(r) * width + k - begin;
    const uint32_t target = static_cast<uint32_t>(__cvta_generic_to_shared(at));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :: "r"(target), "l"(x + static_cast<size_t>(m0 + r) * stride_x + k));
  }
  asm volatile("cp.async.commit_group;");
}

// Asks L2 for `bytes` from `p` on (act_order's indices: the later rounds of the gather then find them there).
__device__ __forceinline__ void prefetch_range(const void* p, size_t bytes) {
  const char* at = static_cast<const char*>(p);
  for (size_t line = 128 * threadIdx.x; line < bytes; line += 128 * blockDim.x)
    asm volatile("prefetch.global.L2 [%0];" :: "l"(at + line));
}

// act_order: the stored order's original inputs perm[k .. k + 3] for k = base + STRIDE·u.
template <int ROUND, int STRIDE>
__device__ __forceinline__ void load_indices(int4 (&index)[ROUND], const int* __restrict__ perm, int base, int end) {
#pragma unroll
  for (int u = 0; u < ROUND; ++u) {
    const int k = base + STRIDE * u;
    index[u] = k < end ? __ldg(reinterpret_cast<const int4*>(perm + k)) : make_int4(0, 0, 0, 0);
  }
}

// The same copy through registers, 8 chunks a thread at a time (loaded, then stored): for the cp.async tiles,
// whose word stages stay in flight meanwhile, where waiting for a cp.async group of x would wait for them too.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(half* shared, const half* __restrict__ x, int begin, int end, int width,
                                          int m0, int M, int stride_x) {
  constexpr int BATCH = 8;
  const int chunks = (end - begin) / 8;
  const int count = ROWS * chunks;
  for (int t0 = threadIdx.x; t0 < count; t0 += BATCH * THREADS) {
    uint4 chunk[BATCH];
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const int t = t0 + u * THREADS, r = t / chunks, k = begin + 8 * (t % chunks);
      chunk[u] = t < count && m0 + r < M
                     ? __ldcg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m0 + r) * stride_x + k))
                     : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const int t = t0 + u * THREADS, r = t / chunks, k = begin + 8 * (t % chunks);
      if (t < count && m0 + r < M)
        *reinterpret_cast<uint4*>(shared + static_cast<size_t>(r) * width + k - begin) = chunk[u];
    }
  }
}

// The block's x into shared memory: rows [m0, m0 + ROWS) of inputs [k_begin, k_end) as `held`, rows of k_count
// inputs. act_order copies the rows whole (`raw`) and gathers them from there, so that the gather's indices and
// x come from memory at the same time. Every thread of the block takes part. By cp.async (the register tiles: it
// waits for all of its groups, x's alone) or, for the cp.async tiles (ASYNC), through registers.
template <int ROWS, int THREADS, bool ASYNC>
__device__ __forceinline__ void hold_x(half* held, half* raw, const half* __restrict__ x, const int* __restrict__ perm,
                                       int k_begin, int k_end, int k_count, int K, int m0, int M, int stride_x) {
#if HAS_PERM
  constexpr int ROUND = 4;  // chunks of 4 inputs per thread and round
  constexpr int STRIDE = 4 * THREADS;
  int4 index[ROUND];
  load_indices<ROUND, STRIDE>(index, perm, k_begin + 4 * threadIdx.x, k_end);
#endif
  half* const target = HAS_PERM ? raw : held;
  const int begin = HAS_PERM ? 0 : k_begin, end = HAS_PERM ? K : k_end, width = HAS_PERM ? K : k_count;
  if constexpr (ASYNC) {
    load_rows<ROWS, THREADS>(target, x, begin, end, width, m0, M, stride_x);
  } else {
    copy_rows<ROWS, THREADS>(target, x, begin, end, width, m0, M, stride_x);
    wait_copies<0>();
  }
  __syncthreads();
#if HAS_PERM
  for (int base = k_begin + 4 * threadIdx.x; base < k_end; base += STRIDE * ROUND) {
    int4 next_index[ROUND];
    load_indices<ROUND, STRIDE>(next_index, perm, base + STRIDE * ROUND, k_end);
#pragma unroll
    for (int u = 0; u < ROUND; ++u) {
      const int k = base + STRIDE * u;
      if (k >= k_end) continue;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const half* from = raw + static_cast<size_t>(r) * K;
        const half2 low = __halves2half2(from[index[u].x], from[index[u].y]);
        const half2 high = __halves2half2(from[index[u].z], from[index[u].w]);
        *reinterpret_cast<uint2*>(held + static_cast<size_t>(r) * k_count + k - k_begin) =
            make_uint2(as_bits(low), as_bits(high));
      }
    }
#pragma unroll
    for (int u = 0; u < ROUND; ++u) index[u] = next_index[u];
  }
  __syncthreads();
#else
  (void)perm;
#endif
}

// Word row j's input pairs for each row of x: from the held x (X_HELD: rows of k_count inputs from word row
// row_begin, shared-memory loads) or from memory (x_rows, through the read-only path); zero past the block's rows.
template <int ROWS, bool X_HELD>
__device__ __forceinline__ void row_inputs(half2 (&pairs)[ROWS][PAIRS], const half* held,
                                           const half* __restrict__ x_rows, int j, int row_begin, int rows, int m0,
                                           int M, int k_count, int stride_x) {
  if constexpr (X_HELD)
    input_pairs<ROWS>(held, j - row_begin, j < rows, m0, M, k_count, pairs);
  else
    input_pairs<ROWS, true>(x_rows, j, j < rows, m0, M, stride_x, pairs);
}

// One slab's products added to `total`: word row j0 + i's words are take(i), its inputs come from the held x
// (X_HELD: rows of k_count inputs from word row row_begin) or from memory (x_rows). Sums run in float16 within
// FLUSH rows and in float32 across them. LOAD_ONLY 1: the words folded, nothing decoded; 2: a tensor-core-shaped
// decode of them.
template <int ROWS, bool X_HELD, typename Take>
__device__ __forceinline__ void accumulate_slab(float (&total)[ROWS][OUTS], const GroupScales (&groups)[GROUPS],
                                                const Take& take, const half* held, const half* __restrict__ x_rows,
                                                int j0, int row_begin, int rows, int m0, int M, int k_count,
                                                int stride_x, float inverse_global_scale) {
#if LOAD_ONLY == 1  // bench/gemv_anatomy.py: the loads alone, their words folded so that none is dropped
  uint32_t folded = 0;
#pragma unroll
  for (int i = 0; i < SLAB; ++i) {
    const uint4 word = take(i);
    folded ^= word.x ^ word.y ^ word.z ^ word.w;
  }
  total[0][0] += static_cast<float>(folded & 1u);
  return;
#elif LOAD_ONLY == 2
  // bench/gemv_anatomy.py: the loads, x's pairs and the instructions a tensor-core decode would need (one LOP3
  // per code pair into A fragments, one m16n8k16 product per 4 pairs, float32 sums), with no regard to which
  // thread holds which output: a wrong result, timed to see whether such a decode hides under the loads.
  (void)groups; (void)inverse_global_scale;
  float sums[OUTS][4] = {};  // one accumulator fragment per word of a row: 4 chains of products in flight
#pragma unroll
  for (int i = 0; i < SLAB; ++i) {
    half2 pairs[ROWS][PAIRS];
    row_inputs<ROWS, X_HELD>(pairs, held, x_rows, j0 + i, row_begin, rows, m0, M, k_count, stride_x);
    const uint4 row_words = take(i);
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
      uint32_t a[PAIRS];
#pragma unroll
      for (int p = 0; p < PAIRS; ++p)
        a[p] = and_or(word_of(row_words, o) >> pair_shift(p), CODE_MASK << field_bit(p), HALF_1024);
#pragma unroll
      for (int q = 0; q + 4 <= PAIRS; q += 4)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(sums[o][0]), "+f"(sums[o][1]), "+f"(sums[o][2]), "+f"(sums[o][3])
                     : "r"(a[q]), "r"(a[q + 1]), "r"(a[q + 2]), "r"(a[q + 3]), "r"(as_bits(pairs[0][q])),
                       "r"(as_bits(pairs[ROWS - 1][q + 1])));
    }
  }
#pragma unroll
  for (int o = 0; o < OUTS; ++o) total[0][o] += sums[o][0] + sums[o][1] + sums[o][2] + sums[o][3];
  return;
#endif
#pragma unroll
  for (int f = 0; f < SLAB; f += FLUSH) {
    const GroupScales& group = groups[f / FLUSH];
    float scale[OUTS], second[OUTS], zero[OUTS];
#if KIND == 0 || KIND == 1
    scale[0] = __low2float(as_half2(group.scales.x)); scale[1] = __high2float(as_half2(group.scales.x));
    scale[2] = __low2float(as_half2(group.scales.y)); scale[3] = __high2float(as_half2(group.scales.y));
#endif
#if KIND == 0
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
      zero[o] = HAS_ZEROS ? static_cast<float>((group.bytes >> (8 * o)) & 0xFFu) : static_cast<float>(1 << (BITS - 1));
#elif KIND == 1
    second[0] = __low2float(as_half2(group.second.x)); second[1] = __high2float(as_half2(group.second.x));
    second[2] = __low2float(as_half2(group.second.y)); second[3] = __high2float(as_half2(group.second.y));
#else
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
      const uint32_t c = (group.bytes >> (8 * o)) & 0xFFu;
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
      row_inputs<ROWS, X_HELD>(pairs, held, x_rows, j0 + i, row_begin, rows, m0, M, k_count, stride_x);
      const uint4 row_words = take(i);
#pragma unroll
      for (int o = 0; o < OUTS; ++o) {
        const uint32_t word = word_of(row_words, o);
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

// The block's sums of outputs [n_begin, n_end): the row lanes reduced by shuffles and, across warps in warp
// order, through shared memory; stored (`gated`: silu(gate)·up, store_output), or with split-K written as partial
// sums that the last block of the tile to arrive adds in split order.
template <int ROWS, int LANES_N, int THREADS>
__device__ __forceinline__ void store_sums(float (&total)[ROWS][OUTS], half* __restrict__ out,
                                           float* __restrict__ partials, int* __restrict__ arrivals, int M, int N,
                                           int m0, int n_begin, int n_end, bool gated) {
  constexpr int WARPS = THREADS / 32;
  constexpr int BLOCK_N = LANES_N * OUTS;
  __shared__ float partial[WARPS][ROWS][BLOCK_N];
  const int lane_n = threadIdx.x % LANES_N;
  const int warp = threadIdx.x / 32;
  const int splits = gridDim.z;
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
  const auto block_sum = [&](int r, int c) {
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) sum += partial[v][r][c];
    return sum;
  };
  for (int t = threadIdx.x; t < ROWS * BLOCK_N; t += THREADS) {
    const int r = t / BLOCK_N, c = t % BLOCK_N;
    const int n = n_begin + c;
    if (m0 + r >= M || n >= n_end) continue;
    if (splits > 1)
      partials[(static_cast<size_t>(blockIdx.z) * M + m0 + r) * N + n] = block_sum(r, c);
    else if (!(gated && c % 2))  // a gated pair is stored by its gate's thread
      store_output(out, m0 + r, n, N, gated, block_sum(r, c), gated ? block_sum(r, c + 1) : 0.f);
  }
  if (splits == 1 || !last_to_arrive(arrivals, splits)) return;
  const auto split_sum = [&](int m, int n) {
    float sum = 0.f;
    for (int z = 0; z < splits; ++z) sum += __ldcg(partials + (static_cast<size_t>(z) * M + m) * N + n);
    return sum;
  };
  for (int t = threadIdx.x; t < ROWS * BLOCK_N; t += THREADS) {
    const int r = t / BLOCK_N, c = t % BLOCK_N;
    const int n = n_begin + c;
    if (m0 + r >= M || n >= n_end || (gated && c % 2)) continue;
    store_output(out, m0 + r, n, N, gated, split_sum(m0 + r, n), gated ? split_sum(m0 + r, n + 1) : 0.f);
  }
}

// This block's share of the outputs, [begin, end): whole 4-output units, evenly over gridDim.x blocks.
struct Columns {
  int begin, end;
};

__device__ __forceinline__ Columns block_columns(int N) {
  const int units = N / OUTS;
  return {OUTS * static_cast<int>(static_cast<long long>(blockIdx.x) * units / gridDim.x),
          OUTS * static_cast<int>(static_cast<long long>(blockIdx.x + 1) * units / gridDim.x)};
}

template <int ROWS, int LANES_N, int THREADS, bool ASYNC, bool X_HELD, bool STREAMED>
__global__ void __launch_bounds__(THREADS) packed_gemv(
    const half* __restrict__ x, const int* __restrict__ perm, const uint32_t* __restrict__ w,
    const void* __restrict__ scales_, const uint8_t* __restrict__ zeros, half* __restrict__ out,
    float* __restrict__ partials, int* __restrict__ arrivals, int M, int N, int K, int n_groups, int row_shift,
    int stride_x, bool gated, float inverse_global_scale) {
  constexpr int ROW_LANES = THREADS / LANES_N;
  constexpr int STEP = ROW_LANES * SLAB;

  const int lane_n = threadIdx.x % LANES_N;
  const int row_lane = threadIdx.x / LANES_N;
  const Columns columns = block_columns(N);
  const int n0 = columns.begin + lane_n * OUTS;
  const int m0 = blockIdx.y * ROWS;
  const int chunk = split_rows(K / PER, gridDim.z);
  const int row_begin = blockIdx.z * chunk;
  const int rows = min(K / PER, row_begin + chunk);  // this block's word rows end here
  const bool active = n0 < columns.end;
  const uint32_t* const column = w + n0;

  extern __shared__ uint4 dynamic_shared[];  // ASYNC: [stages][STAGE_SLOTS][THREADS] words and scales; then x
  constexpr int STAGES = stages<THREADS>();
  uint4* const staged = dynamic_shared;
  const half* const x_rows = x + static_cast<size_t>(m0) * stride_x;  // x from memory: read-only loads
  half* const held = reinterpret_cast<half*>(dynamic_shared + (ASYNC ? stage_bytes<THREADS>() / sizeof(uint4) : 0));
  const int k_count = chunk * PER;  // held: rows of k_count inputs, word row 0 the block's first
  const int k_begin = row_begin * PER, k_end = min(K, k_begin + k_count);
  // The first slabs' words and scales load first: they do not depend on the previous kernel, which may
  // still be running (dependent launch). Then the block's x goes into shared memory (hold_x).
  half* const raw = held + static_cast<size_t>(ROWS) * k_count;
  uint4 next[SLAB];
  GroupScales next_groups[GROUPS];
  if constexpr (ASYNC) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      copy_slab<THREADS>(staged + s * STAGE_SLOTS * THREADS, column, scales_, zeros,
                         row_begin + row_lane * SLAB + s * STEP, rows, row_shift, n_groups, N, n0, active);
  } else {
    load_slab(next, column, row_begin + row_lane * SLAB, rows, N, active);
    load_groups(next_groups, scales_, zeros, row_begin + row_lane * SLAB, rows, row_shift, n_groups, N, n0, active);
  }
  if constexpr (X_HELD) prefetch_range(perm + k_begin, HAS_PERM ? max(k_end - k_begin, 0) * sizeof(int) : 0);
  wait_for_previous_kernel();
  if constexpr (X_HELD) hold_x<ROWS, THREADS, ASYNC>(held, raw, x, perm, k_begin, k_end, k_count, K, m0, M, stride_x);

  float total[ROWS][OUTS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int o = 0; o < OUTS; ++o) total[r][o] = 0.f;

  for (int j0 = row_begin + row_lane * SLAB, it = 0; j0 < rows; j0 += STEP, ++it) {
    uint4 words[SLAB];
    GroupScales groups[GROUPS];
    if constexpr (ASYNC) {  // each thread reads back only what it copied itself: its own wait suffices
      copy_slab<THREADS>(staged + ((it + STAGES - 1) % STAGES) * STAGE_SLOTS * THREADS, column, scales_, zeros,
                         j0 + (STAGES - 1) * STEP, rows, row_shift, n_groups, N, n0, active);
      wait_copies<STAGES - 1>();
      const uint4* stage = staged + (it % STAGES) * STAGE_SLOTS * THREADS;
#pragma unroll
      for (int i = 0; i < SLAB; ++i) words[i] = stage[i * THREADS + threadIdx.x];
#pragma unroll
      for (int f = 0; f < GROUPS; ++f) groups[f] = staged_group(stage[(SLAB + f) * THREADS + threadIdx.x]);
    } else {
#pragma unroll
      for (int f = 0; f < GROUPS; ++f) groups[f] = next_groups[f];
      load_groups(next_groups, scales_, zeros, j0 + STEP, rows, row_shift, n_groups, N, n0, active);
      if constexpr (!STREAMED) {
#pragma unroll
        for (int i = 0; i < SLAB; ++i) words[i] = next[i];
        load_slab(next, column, j0 + STEP, rows, N, active);
      }
    }
    const uint32_t* const ahead = column + static_cast<size_t>(j0 + STEP) * N;  // STREAMED: the next slab
    // A row's words; STREAMED: its register then loads the same row of the next slab at once, so that a
    // thread keeps a slab's worth of loads in flight all the time instead of waiting for a whole slab.
    const auto take = [&](int i) -> uint4 {
      if constexpr (ASYNC || !STREAMED) {
        return words[i];
      } else {
        const uint4 word = next[i];
        next[i] = load_row(ahead + static_cast<ptrdiff_t>(i) * N, active && j0 + STEP + i < rows);
        return word;
      }
    };
    accumulate_slab<ROWS, X_HELD>(total, groups, take, held, x_rows, j0, row_begin, rows, m0, M, k_count, stride_x,
                                  inverse_global_scale);
  }

  let_next_kernel_start();
  store_sums<ROWS, LANES_N, THREADS>(total, out, partials, arrivals, M, N, m0, columns.begin, columns.end,
                                     gated);
}

struct Call {
  const void *x, *perm, *w, *scales, *zeros;
  void *out, *partials, *arrivals;
  int splits, column_blocks, M, N, K, n_groups, row_shift, stride_x, x_shared, streamed;
  float inverse_global_scale;
  bool gated, dependent;
  cudaStream_t stream;
};

template <int ROWS, int LANES_N, int THREADS, bool ASYNC, bool X_HELD, bool STREAMED>
cudaError_t launch_kernel(const Call& c) {
  const int tiles = (c.N + LANES_N * OUTS - 1) / (LANES_N * OUTS);
  if (c.column_blocks && (c.column_blocks < tiles || c.column_blocks > c.N / OUTS)) return cudaErrorInvalidValue;
  const dim3 grid(c.column_blocks ? c.column_blocks : tiles, (c.M + ROWS - 1) / ROWS, c.splits);
  // held rows (act_order: and the whole rows they are gathered from)
  const size_t x_inputs = split_rows(c.K / PER, c.splits) * PER + (HAS_PERM ? c.K : 0);
  const size_t x_bytes = static_cast<size_t>(ROWS) * x_inputs * sizeof(half);
  const size_t shared = (ASYNC ? stage_bytes<THREADS>() : 0) + (X_HELD ? x_bytes : 0);
  constexpr auto kernel = packed_gemv<ROWS, LANES_N, THREADS, ASYNC, X_HELD, STREAMED>;
  const cudaError_t error = allow_shared_memory<kernel>(shared);
  if (error != cudaSuccess) return error;
  return launch_after(kernel, grid, THREADS, shared, c.stream, c.dependent,
      static_cast<const half*>(c.x), static_cast<const int*>(c.perm), static_cast<const uint32_t*>(c.w), c.scales,
      static_cast<const uint8_t*>(c.zeros), static_cast<half*>(c.out), static_cast<float*>(c.partials),
      static_cast<int*>(c.arrivals), c.M, c.N, c.K, c.n_groups, c.row_shift, c.stride_x, c.gated,
      c.inverse_global_scale);
}

// act_order always holds its gathered x: its libraries build no variant that reads x from memory. Streamed
// rows: built for the register path with 1 or 2 rows of x.
template <int ROWS, int LANES_N, int THREADS, bool ASYNC, bool STREAMED>
cudaError_t by_x(const Call& c) {
  if (HAS_PERM || c.x_shared) return launch_kernel<ROWS, LANES_N, THREADS, ASYNC, true, STREAMED>(c);
  return launch_kernel<ROWS, LANES_N, THREADS, ASYNC, HAS_PERM != 0, STREAMED>(c);
}

template <int ROWS, int LANES_N, int THREADS, bool ASYNC>
cudaError_t launch(const Call& c) {
  if constexpr (!ASYNC && ROWS <= 2)
    if (c.streamed) return by_x<ROWS, LANES_N, THREADS, false, true>(c);
  if (c.streamed) return cudaErrorInvalidValue;
  return by_x<ROWS, LANES_N, THREADS, ASYNC, false>(c);
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
    case 32: return by_threads<ROWS, 32, ASYNC>(threads, c);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Returns a cudaError_t (0: launched). rows_per_program 1, 2, 4 or 8; lanes_n 4, 8, 16 or 32; threads 128 or
// 256, or with one row 512; async_copies (cp.async stages) with 1 or 2 rows. HAS_PERM and x_shared take
// rows_per_program · (the block's inputs, HAS_PERM: + K) · 2 bytes of shared memory for the block's x; x's rows
// start 16-byte aligned (stride_x a multiple of 8). streamed (registers, 1 or 2 rows): each word row's next load
// is issued as soon as the row is used, not a slab at a time. splits > 1: `partials` holds
// splits · M · N floats and `arrivals` one zeroed int per block of outputs (column blocks × row tiles).
// column_blocks: blocks along the outputs, each an even share of at most lanes_n · 4 of them (0: N / (lanes_n · 4)
// rounded up). gated: the outputs are a gated MLP's gate and up rows interleaved (gate j at 2j, up j at 2j + 1), and
// out [M, N / 2] gets silu(gate)·up.
// dependent: launched to start while the stream's previous kernel finishes (packed_decode.cuh, launch_after).
extern "C" int quantbench_packed_gemv(int rows_per_program, int lanes_n, int threads, int async_copies, int splits,
                                      int column_blocks, const void* x, const void* perm, const void* w,
                                      const void* scales, const void* zeros, void* out, void* partials,
                                      void* arrivals, int M, int N, int K, int n_groups, int row_shift, int stride_x,
                                      int x_shared, int streamed, int gated, float inverse_global_scale,
                                      int dependent, void* stream) {
  if (splits < 1 || splits > 65535 || (gated && N % 2)) return cudaErrorInvalidValue;
  const Call c{x, perm, w, scales, zeros, out, partials, arrivals, splits, column_blocks, M, N, K, n_groups,
               row_shift, stride_x, x_shared, streamed, inverse_global_scale, gated != 0, dependent != 0,
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
