// x·Wᵀ for 1–64 rows of float16 x and a packed weight in the kernel layout (layout.py), on tensor cores
// (mma.sync m16n8k16, float32 sums). Built by cuda_build.py with nvcc, one library per weight type
// (packed_decode.cuh: KIND, BITS, HAS_ZEROS); SPAN: k-steps that share one scale (1, 2 or 4), 0 where a
// group is shorter than a k-step. act_order is gathered before the call.
//
// No layout of its own: a product's k order is free as long as x and W agree on it, so lane (g, t) of a
// warp (g = lane / 4, t = lane % 4) takes word row 4·step + t whole. Each thread loads 4 adjacent outputs'
// words of that row in 16 bytes, a warp 32 outputs × 4 word rows in four 128-byte lines, and decodes
// each word's code pairs (p, p + PAIRS) into the B fragments of PER / 4 products: column g of n-tile o is
// output 4g + o, and physical k (2t, 2t + 1) of product i, register r is stored input (PER·(4·step + t)
// + 2i + r, … + PAIRS). The A fragments are the matching pairs of x's rows g and g + 8.
//
// Scales: where a group spans whole k-steps (SPAN > 0), B holds q − z exactly (ternary: each trit plane
// apart, MXFP4: the E2M1 values) and each span's sums are scaled in float32, per accumulator column. 64-row blocks
// put the scales into B (MXFP4's only where cuda_mma.py found them exact there).
// Shorter groups differ between the rows of one k-step, so each thread scales its B (float16 scales:
// one rounding, as a dequantized float16 weight); NVFP4's E2M1 × E4M3 products are exact in float16 and
// its global scale is applied last.
//
// A block's WARPS warps cover WARPS_N × 32 outputs and split the k-steps among WARPS / WARPS_N of them in
// slabs of 4, the next slab's words (and scale bits, where each k-step has its own) loading into registers
// while one is decoded; their sums meet in shared memory. Split-K (8- and 16-row blocks) gives each of
// gridDim.z blocks a run of whole slabs and adds their float32 sums as packed_gemv.cu does: the last to
// arrive, in split order (store_split_sums). x's pairs come from global memory (a slab ahead where two slabs of
// them fit in 64 registers), or (X_SHARED) from a ring of 2–3 shared-memory stages that the warps sharing a slab
// fill with cp.async, one or two slabs ahead, so that no load of x waits on L2. Rows of x: 8 (the upper half of each
// m-tile idle), 16, 32, or 64 where the scales go into B (one decode of each weight for all 64 rows). Capped
// blocks (32 rows, 4 warps side by side sharing x's stages) cap their registers at 128 so that 16 warps share a
// multiprocessor.

#include "tensor_core_decode.cuh"

namespace {

constexpr int COLS = 8 * OUTS;  // outputs per warp
constexpr int SLAB_INPUTS = SLAB * STEP_ROWS * PER;
constexpr int X_ROW_BYTES = SLAB_INPUTS * 2 + 64;  // one row of x in a stage; the 64 bytes keep rows g and g + 1
                                                   // of a quarter warp's 16-byte reads on different banks
constexpr size_t STAGE_BUDGET = 224 * 1024;  // per multiprocessor: three stages a block where they fit, else two

// CAPPED blocks (32 rows, x shared by 4 warps side by side) cap their registers at 128 a thread so
// that 16 warps share a multiprocessor; others take what registers the compiler gives them. Shared memory is
// budgeted for this many blocks a multiprocessor.
template <int WARPS, bool CAPPED>
__host__ __device__ constexpr int blocks_sharing_memory() { return CAPPED ? 16 / WARPS : 2; }

template <int TILE_ROWS, int WARPS_K>
__host__ __device__ constexpr size_t stage_bytes() { return static_cast<size_t>(WARPS_K) * TILE_ROWS * X_ROW_BYTES; }

template <int TILE_ROWS, int WARPS_K, int BLOCKS>
__host__ __device__ constexpr int x_stages() {
  return 3 * stage_bytes<TILE_ROWS, WARPS_K>() <= STAGE_BUDGET / BLOCKS ? 3 : 2;
}

// cp.async of one slab's inputs of the block's ROWS rows of x into a stage (zeros past K or M), by the
// GROUP_THREADS threads that share the slab, each slab one commit group. A thread copies the same 16-byte
// column of rows r0, r0 + ROW_STEP, …: its addresses are set once, and each slab only moves them along K.
template <int ROWS, int GROUP_THREADS>
struct XCopier {
  static constexpr int UNITS_PER_ROW = SLAB_INPUTS / 8;  // 16 bytes each
  static_assert(GROUP_THREADS % UNITS_PER_ROW == 0, "each thread keeps one column");
  static constexpr int ROW_STEP = GROUP_THREADS / UNITS_PER_ROW;
  static constexpr int COPIES = (ROWS + ROW_STEP - 1) / ROW_STEP;
  const half* first;  // row m0 + r0, column 8·c of slab 0
  size_t row_stride;  // ROW_STEP rows of x
  uint32_t target;    // the stage offset of row r0, column c
  int first_row, column, rows_inside, K;

  __device__ __forceinline__ XCopier(const half* x, int m0, int M, int K_, int stride_x, int thread) : K(K_) {
    const int r0 = thread / UNITS_PER_ROW, c = thread % UNITS_PER_ROW;
    first_row = r0;
    column = 8 * c;
    first = x + static_cast<size_t>(min(m0 + r0, M - 1)) * stride_x + column;
    row_stride = static_cast<size_t>(ROW_STEP) * stride_x;
    target = r0 * X_ROW_BYTES + 16 * c;
    const int rows_left = min(ROWS, M - m0) - r0;  // rows r0 + i·ROW_STEP < min(ROWS, M − m0)
    rows_inside = rows_left > 0 ? (rows_left + ROW_STEP - 1) / ROW_STEP : 0;
  }

  __device__ __forceinline__ void copy(unsigned char* stage, int step0) const {
    const int k0 = step0 * STEP_ROWS * PER;
    const int live = k0 + column < K ? rows_inside : 0;  // copies that read x; the others copy no byte
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(stage)) + target;
    const half* source = first + k0;
#pragma unroll
    for (int i = 0; i < COPIES; ++i) {
      if (ROWS % ROW_STEP && first_row + i * ROW_STEP >= ROWS) break;  // past the stage's rows
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                   :: "r"(base + i * ROW_STEP * X_ROW_BYTES), "l"(source), "r"(i < live ? 16 : 0));
      source += row_stride;
    }
    asm volatile("cp.async.commit_group;");
  }
};

// The WARPS_N warps that share a slab meet (named barrier 1 + warp_k; 0 is __syncthreads').
template <int WARPS_N>
__device__ __forceinline__ void group_barrier(int warp_k) {
  if constexpr (WARPS_N == 1) {
    __syncwarp();
  } else {
    asm volatile("bar.sync %0, %1;" :: "r"(1 + warp_k), "n"(32 * WARPS_N) : "memory");
  }
}

__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Word row j's inputs of rows g and (HALVES 2) g + 8 of each m-tile (zero past K or M).
template <int TILES_M, int HALVES>
__device__ __forceinline__ void load_inputs(const half* __restrict__ x, int j, int word_rows, int m0, int g, int M,
                                            int stride_x, uint32_t (&inputs)[TILES_M][HALVES][PER / 2]) {
#pragma unroll
  for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
      const int row = m0 + 16 * mt + 8 * h + g;
      input_words(x + static_cast<size_t>(row) * stride_x, j, j < word_rows && row < M, inputs[mt][h]);
    }
}

// Split-K: the block's sums written as float32 partials, 4 adjacent outputs (a unit) at a time; the last block of
// the tile to arrive adds the splits in split order, each thread with up to UNITS_AT_ONCE units' loads of a split
// in flight together (an output at a time, it waited on L2 once per output it adds).
template <int ROWS, int WARPS_N, int THREADS, typename BlockSum>
__device__ __forceinline__ void store_split_sums(const BlockSum& block_sum, half* __restrict__ out,
                                                 float* __restrict__ partials, int* __restrict__ arrivals, int M,
                                                 int N, int m0, bool gated, float last_scale) {
  constexpr int ROW_UNITS = COLS / 4, UNITS = WARPS_N * ROWS * ROW_UNITS;
  constexpr int PER_THREAD = (UNITS + THREADS - 1) / THREADS;
  constexpr int UNITS_AT_ONCE = PER_THREAD < 8 ? PER_THREAD : 8;
  const size_t split_stride = static_cast<size_t>(M) * N;
  // Unit idx of the block: its row m and first output n (N is a multiple of 4: a unit is inside or outside whole).
  const auto place = [&](int idx, int& m, int& n, int& wn, int& r, int& c) {
    wn = idx / (ROWS * ROW_UNITS), r = idx / ROW_UNITS % ROWS, c = 4 * (idx % ROW_UNITS);
    m = m0 + r, n = (blockIdx.x * WARPS_N + wn) * COLS + c;
    return idx < UNITS && m < M && n < N;
  };
  for (int idx = threadIdx.x; idx < UNITS; idx += THREADS) {
    int m, n, wn, r, c;
    if (!place(idx, m, n, wn, r, c)) continue;
    const float4 sums = make_float4(block_sum(wn, r, c), block_sum(wn, r, c + 1), block_sum(wn, r, c + 2),
                                    block_sum(wn, r, c + 3));
    *reinterpret_cast<float4*>(partials + blockIdx.z * split_stride + static_cast<size_t>(m) * N + n) = sums;
  }
  const int splits = gridDim.z;
  if (!last_to_arrive(arrivals, splits)) return;
  for (int first = 0; first < PER_THREAD; first += UNITS_AT_ONCE) {
    int m[UNITS_AT_ONCE], n[UNITS_AT_ONCE];
    bool inside[UNITS_AT_ONCE];
    float4 sum[UNITS_AT_ONCE];
#pragma unroll
    for (int u = 0; u < UNITS_AT_ONCE; ++u) {
      int wn, r, c;
      inside[u] = first + u < PER_THREAD && place(threadIdx.x + (first + u) * THREADS, m[u], n[u], wn, r, c);
      sum[u] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll 2
    for (int z = 0; z < splits; ++z)
#pragma unroll
      for (int u = 0; u < UNITS_AT_ONCE; ++u) {
        if (!inside[u]) continue;
        const float4 p = __ldcg(reinterpret_cast<const float4*>(
            partials + z * split_stride + static_cast<size_t>(m[u]) * N + n[u]));
        sum[u].x += p.x, sum[u].y += p.y, sum[u].z += p.z, sum[u].w += p.w;
      }
#pragma unroll
    for (int u = 0; u < UNITS_AT_ONCE; ++u) {
      if (!inside[u]) continue;
      const float s[4] = {sum[u].x * last_scale, sum[u].y * last_scale, sum[u].z * last_scale,
                          sum[u].w * last_scale};
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (!(gated && j % 2)) store_output(out, m[u], n[u] + j, N, gated, s[j], s[j | 1]);
    }
  }
}

// SPLIT: blocks along K (gridDim.z of them), built apart so that one split keeps the plain kernel's code.
// SLAB_SCALE (64-row blocks of int and ternary weights whose groups span whole slabs): each slab's scales load and
// unpack once, not at every k-step (the same values: the same sums).
template <int ROWS, int WARPS, int WARPS_N, bool X_SHARED, bool SPLIT, bool CAPPED, bool SLAB_SCALE>
__global__ void __launch_bounds__(WARPS * 32, CAPPED ? blocks_sharing_memory<WARPS, true>() : 0) packed_mma(
    const half* __restrict__ x, const uint32_t* __restrict__ w, const void* __restrict__ scales_,
    const uint8_t* __restrict__ zeros, half* __restrict__ out, int M, int N, int K, int n_groups, int row_shift,
    int stride_x, float inverse_global_scale, float* __restrict__ partials, int* __restrict__ arrivals, bool gated) {
  constexpr int TILES_M = ROWS <= 16 ? 1 : ROWS / 16;
  constexpr bool UPPER = ROWS >= 16;  // rows g + 8 of each m-tile hold x
  constexpr int WARPS_K = WARPS / WARPS_N;
  constexpr int TILE_ROWS = 16 * TILES_M;
  constexpr int HALVES = UPPER ? 2 : 1;
  // A slab's inputs take SLAB · TILES_M · HALVES · PER / 2 registers: loaded with the next slab's words
  // where two slabs' fit in 64 (2), at the start of their slab where one fits (1), else step by step (0).
  // X_SHARED: step by step from the stage (0).
  constexpr int X_REGISTERS = SLAB * TILES_M * HALVES * PER / 2;
  constexpr int X_AHEAD = X_SHARED ? 0 : X_REGISTERS <= 32 ? 2 : X_REGISTERS <= 64 ? 1 : 0;
  constexpr int STAGES = x_stages<TILE_ROWS, WARPS_K, blocks_sharing_memory<WARPS, CAPPED>()>();
  static_assert(!CAPPED || (X_SHARED && ROWS == 32 && WARPS_N == 4), "capped: 32 rows, x shared side by side");
  static_assert(!ON_SUMS || ROWS <= 32, "64 rows of sums and span sums do not fit the registers: scales go into B");
  static_assert(!SLAB_SCALE || (ROWS == 64 && KIND <= 1), "a scale per slab: 64-row blocks, int and ternary");
  extern __shared__ __align__(16) unsigned char shared[];  // X_SHARED: the stages; then the warps' partial sums
  auto partial = reinterpret_cast<float (*)[TILE_ROWS][COLS]>(shared);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_n = warp % WARPS_N, warp_k = warp / WARPS_N;
  const int n_warp = (blockIdx.x * WARPS_N + warp_n) * COLS;
  const int n0 = n_warp + OUTS * g;
  const int m0 = blockIdx.y * ROWS;
  const int word_rows = K / PER;
  const int steps = (word_rows + STEP_ROWS - 1) / STEP_ROWS;
  const int splits = SPLIT ? gridDim.z : 1;
  const int chunk = SPLIT ? split_steps(steps, splits) : steps;  // this block's k-steps: whole slabs
  const int step_begin = SPLIT ? blockIdx.z * chunk : 0, step_end = SPLIT ? min(steps, step_begin + chunk) : steps;
  const int rows_end = SPLIT ? min(word_rows, step_end * STEP_ROWS) : word_rows;  // no word past them is loaded
  const bool active = n0 < N;

  float acc[TILES_M][OUTS][4];
#pragma unroll
  for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][o][e] = 0.f;

  uint4 next[SLAB];
  load_slab(next, w, step_begin + warp_k * SLAB, rows_end, N, n0, t, active);  // before x: it may still be being written
  wait_for_previous_kernel();
  unsigned char* const stages = shared + static_cast<size_t>(warp_k) * TILE_ROWS * X_ROW_BYTES;  // this group's
  constexpr size_t STAGE_STRIDE = stage_bytes<TILE_ROWS, WARPS_K>();
  const XCopier<ROWS, 32 * WARPS_N> x_copier(x, m0, M, K, stride_x, warp_n * 32 + lane);
  if constexpr (X_SHARED) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      x_copier.copy(stages + s * STAGE_STRIDE, step_begin + warp_k * SLAB + s * WARPS_K * SLAB);
  }
  uint32_t next_inputs[X_AHEAD == 2 ? SLAB : 1][TILES_M][HALVES][PER / 2];
  if constexpr (X_AHEAD == 2) {
#pragma unroll
    for (int i = 0; i < SLAB; ++i)
      load_inputs(x, (step_begin + warp_k * SLAB + i) * STEP_ROWS + t, word_rows, m0, g, M, stride_x, next_inputs[i]);
  }
  constexpr int SCALE_EVERY = ON_SUMS ? SPAN : SLAB_SCALE ? SLAB : 1;  // k-steps per scale load
  // Scale bits load a slab ahead where every k-step needs its own (scales into B, MXFP4, NVFP4); span sums of
  // int and ternary load theirs at the span's start: ahead, they cost the registers of a second block.
  constexpr bool SCALES_AHEAD = !ON_SUMS || KIND == 2 || KIND == 3;
  constexpr int SCALE_LOADS = SCALES_AHEAD ? SLAB / SCALE_EVERY : 1;
  auto scale_bits_at = [&](int step) {
    const int group = min((step * STEP_ROWS + t) >> row_shift, n_groups - 1);
    return load_scale_bits(scales_, zeros, group, n_groups, N, n0, n_warp, t, active);
  };
  auto load_slab_scales = [&](ScaleBits (&bits)[SCALE_LOADS], int step0) {
#pragma unroll
    for (int l = 0; l < SCALE_LOADS; ++l) bits[l] = scale_bits_at(step0 + l * SCALE_EVERY);
  };
  ScaleBits next_bits[SCALE_LOADS];
  if constexpr (SCALES_AHEAD) load_slab_scales(next_bits, step_begin + warp_k * SLAB);
  Scales s;
  float sums[PLANES][TILES_M][OUTS][4];  // ON_SUMS: the current span's sums, scaled into acc at its end
  for (int step0 = step_begin + warp_k * SLAB, it = 0; step0 < step_end; step0 += WARPS_K * SLAB, ++it) {
    const unsigned char* stage = stages + (it % STAGES) * STAGE_STRIDE;
    if constexpr (X_SHARED) {  // this slab's stage landed; the one consumed last round takes slab it + STAGES − 1
      asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
      group_barrier<WARPS_N>(warp_k);
      x_copier.copy(stages + ((it + STAGES - 1) % STAGES) * STAGE_STRIDE, step0 + (STAGES - 1) * WARPS_K * SLAB);
    }
    uint4 words[SLAB];
#pragma unroll
    for (int i = 0; i < SLAB; ++i) words[i] = next[i];
    load_slab(next, w, step0 + WARPS_K * SLAB, rows_end, N, n0, t, active);
    ScaleBits bits[SCALE_LOADS];
    if constexpr (SCALES_AHEAD) {
#pragma unroll
      for (int l = 0; l < SCALE_LOADS; ++l) bits[l] = next_bits[l];
      load_slab_scales(next_bits, step0 + WARPS_K * SLAB);
    }
    uint32_t inputs[X_AHEAD ? SLAB : 1][TILES_M][HALVES][PER / 2];  // rows g (+ 8) of each m-tile
    if constexpr (X_AHEAD == 2) {
#pragma unroll
      for (int i = 0; i < SLAB; ++i) {
#pragma unroll
        for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
          for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int q = 0; q < PER / 2; ++q) inputs[i][mt][h][q] = next_inputs[i][mt][h][q];
        load_inputs(x, (step0 + WARPS_K * SLAB + i) * STEP_ROWS + t, word_rows, m0, g, M, stride_x, next_inputs[i]);
      }
    } else if constexpr (X_AHEAD == 1) {  // the slab's inputs all in flight at once: one wait per slab
#pragma unroll
      for (int i = 0; i < SLAB; ++i) load_inputs(x, (step0 + i) * STEP_ROWS + t, word_rows, m0, g, M, stride_x, inputs[i]);
    }
#pragma unroll
    for (int i = 0; i < SLAB; ++i) {
      const int j = (step0 + i) * STEP_ROWS + t;
      if (i % SCALE_EVERY == 0) {
        s = unpack_scales(SCALES_AHEAD ? bits[i / SCALE_EVERY] : scale_bits_at(step0 + i));
        if (ON_SUMS) {
#pragma unroll
          for (int plane = 0; plane < PLANES; ++plane)
#pragma unroll
            for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
              for (int o = 0; o < OUTS; ++o)
#pragma unroll
                for (int e = 0; e < 4; ++e) sums[plane][mt][o][e] = 0.f;
        }
      }
      if constexpr (X_SHARED) {  // zeros past K and M are in the stage
#pragma unroll
        for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
          for (int h = 0; h < HALVES; ++h)
            input_words(reinterpret_cast<const half*>(stage + (16 * mt + 8 * h + g) * X_ROW_BYTES), i * STEP_ROWS + t,
                        true, inputs[0][mt][h]);
      } else if constexpr (!X_AHEAD) {
        load_inputs(x, j, word_rows, m0, g, M, stride_x, inputs[0]);
      }
      uint32_t a[TILES_M][PRODUCTS][4];
#pragma unroll
      for (int mt = 0; mt < TILES_M; ++mt) {
        half2 low[PAIRS], high[PAIRS];
        pairs_of(inputs[X_AHEAD ? i : 0][mt][0], low);
        if (UPPER) pairs_of(inputs[X_AHEAD ? i : 0][mt][HALVES - 1], high);
#pragma unroll
        for (int i2 = 0; i2 < PRODUCTS; ++i2) {
          a[mt][i2][0] = as_bits(low[2 * i2]);
          a[mt][i2][1] = UPPER ? as_bits(high[2 * i2]) : 0u;
          a[mt][i2][2] = as_bits(low[2 * i2 + 1]);
          a[mt][i2][3] = UPPER ? as_bits(high[2 * i2 + 1]) : 0u;
        }
      }
#pragma unroll
      for (int o = 0; o < OUTS; ++o) {
        uint32_t b[PLANES][PAIRS];
        decode_word(word_of(words[i], o), s, o, b);
#pragma unroll
        for (int plane = 0; plane < (ON_SUMS ? PLANES : 1); ++plane)
#pragma unroll
          for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
            for (int i2 = 0; i2 < PRODUCTS; ++i2)
              mma(ON_SUMS ? sums[plane][mt][o] : acc[mt][o], a[mt][i2], b[plane][2 * i2], b[plane][2 * i2 + 1]);
      }
      if (ON_SUMS && i % SCALE_EVERY == SCALE_EVERY - 1) {  // accumulator e sits in column 8t + 4·(e % 2) + o
#pragma unroll
        for (int plane = 0; plane < PLANES; ++plane)
#pragma unroll
          for (int mt = 0; mt < TILES_M; ++mt)
#pragma unroll
            for (int o = 0; o < OUTS; ++o)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                acc[mt][o][e] += (e % 2 ? s.c_high[plane][o] : s.c_low[plane][o]) * sums[plane][mt][o][e];
      }
    }
  }

  let_next_kernel_start();
  if constexpr (X_SHARED) {  // the partial sums reuse the stages: every copy (the last ones past K) and read done
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
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
  const auto block_sum = [&](int wn, int r, int c) {
    float sum = 0.f;
#pragma unroll
    for (int wk = 0; wk < WARPS_K; ++wk) sum += partial[wk * WARPS_N + wn][r][c];
    return sum;
  };
  if constexpr (SPLIT) {
    store_split_sums<ROWS, WARPS_N, WARPS * 32>(block_sum, out, partials, arrivals, M, N, m0, gated, last_scale);
  } else {
    for (int idx = threadIdx.x; idx < WARPS_N * ROWS * COLS; idx += WARPS * 32) {
      const int wn = idx / (ROWS * COLS), r = idx / COLS % ROWS, c = idx % COLS;
      const int m = m0 + r, n = (blockIdx.x * WARPS_N + wn) * COLS + c;
      if (m >= M || n >= N) continue;
      if (!(gated && c % 2))  // a gated pair is stored by its gate's thread
        store_output(out, m, n, N, gated, block_sum(wn, r, c) * last_scale,
                     gated ? block_sum(wn, r, c + 1) * last_scale : 0.f);
    }
  }
}

struct Call {
  const void *x, *w, *scales, *zeros;
  void *out, *partials, *arrivals;
  int splits, M, N, K, n_groups, row_shift, stride_x;
  float inverse_global_scale;
  bool capped, gated, dependent;
  cudaStream_t stream;
};

template <int ROWS, int WARPS, int WARPS_N, bool X_SHARED, bool SPLIT, bool CAPPED, bool SLAB_SCALE = false>
cudaError_t launch(const Call& c) {
  constexpr int TILE_ROWS = ROWS <= 16 ? 16 : ROWS;
  constexpr int WARPS_K = WARPS / WARPS_N;
  const size_t partial = sizeof(float) * WARPS * TILE_ROWS * COLS;
  constexpr int BLOCKS = blocks_sharing_memory<WARPS, CAPPED>();
  const size_t staged = X_SHARED ? x_stages<TILE_ROWS, WARPS_K, BLOCKS>() * stage_bytes<TILE_ROWS, WARPS_K>() : 0;
  const size_t shared = staged > partial ? staged : partial;
  auto kernel = packed_mma<ROWS, WARPS, WARPS_N, X_SHARED, SPLIT, CAPPED, SLAB_SCALE>;
  const cudaError_t error =
      allow_shared_memory<packed_mma<ROWS, WARPS, WARPS_N, X_SHARED, SPLIT, CAPPED, SLAB_SCALE>>(shared);
  if (error != cudaSuccess) return error;
  const dim3 grid((c.N + WARPS_N * COLS - 1) / (WARPS_N * COLS), (c.M + ROWS - 1) / ROWS, c.splits);
  return launch_after(kernel, grid, WARPS * 32, shared, c.stream, c.dependent,
      static_cast<const half*>(c.x), static_cast<const uint32_t*>(c.w), c.scales, static_cast<const uint8_t*>(c.zeros),
      static_cast<half*>(c.out), c.M, c.N, c.K, c.n_groups, c.row_shift, c.stride_x, c.inverse_global_scale,
      static_cast<float*>(c.partials), static_cast<int*>(c.arrivals), c.gated);
}

constexpr int SLAB_ROW_SHIFT = 4;  // log2 of a slab's word rows
static_assert(1 << SLAB_ROW_SHIFT == SLAB * STEP_ROWS, "a slab's word rows");

// 64-row blocks of int4, int8 and ternary weights whose scale groups hold whole slabs take each slab's scales
// once (int2's, held a slab long, spill).
template <int ROWS, int WARPS, int WARPS_N, bool X_SHARED>
cudaError_t by_scale_groups(const Call& c) {
  if constexpr (ROWS == 64 && KIND <= 1 && BITS >= 4) {
    if (c.row_shift >= SLAB_ROW_SHIFT) return launch<ROWS, WARPS, WARPS_N, X_SHARED, false, false, true>(c);
  }
  return launch<ROWS, WARPS, WARPS_N, X_SHARED, false, false>(c);
}

// Split-K is built for the blocks of 8 and 16 rows only: taller ones lost with it, their many blocks and
// multiprocessors busy already (capped blocks included).
template <int ROWS, int WARPS, int WARPS_N, bool X_SHARED>
cudaError_t by_split(const Call& c) {
  if (c.capped) {
    if constexpr (X_SHARED && ROWS == 32 && WARPS_N == 4 && !(ON_SUMS && PLANES == 2)) {  // ternary's sums spill
      if (c.splits == 1) return launch<ROWS, WARPS, WARPS_N, X_SHARED, false, true>(c);
    }
    return cudaErrorInvalidValue;
  }
  if (c.splits == 1) return by_scale_groups<ROWS, WARPS, WARPS_N, X_SHARED>(c);
  if constexpr (ROWS <= 16) return launch<ROWS, WARPS, WARPS_N, X_SHARED, true, false>(c);
  return cudaErrorInvalidValue;
}

template <int ROWS, int WARPS, bool X_SHARED>
cudaError_t by_warps_n(int warps_n, const Call& c) {
  switch (warps_n) {
    case 1: return by_split<ROWS, WARPS, 1, X_SHARED>(c);
    case 2: return by_split<ROWS, WARPS, 2, X_SHARED>(c);
    case 4: return by_split<ROWS, WARPS, 4, X_SHARED>(c);
  }
  return cudaErrorInvalidValue;
}

template <int ROWS, bool X_SHARED>
cudaError_t by_warps(int warps, int warps_n, const Call& c) {
  switch (warps) {
    case 4: return by_warps_n<ROWS, 4, X_SHARED>(warps_n, c);
    case 8: return by_warps_n<ROWS, 8, X_SHARED>(warps_n, c);
  }
  return cudaErrorInvalidValue;
}

template <bool X_SHARED>
cudaError_t by_rows(int rows, int warps, int warps_n, const Call& c) {
  switch (rows) {
    case 8: return by_warps<8, X_SHARED>(warps, warps_n, c);
    case 16: return by_warps<16, X_SHARED>(warps, warps_n, c);
    case 32: return by_warps<32, X_SHARED>(warps, warps_n, c);
    case 64:
      if constexpr (!ON_SUMS) return by_warps<64, X_SHARED>(warps, warps_n, c);
  }
  return cudaErrorInvalidValue;
}

// act_order: out[m, k] = x[m, perm[k]], 8 stored inputs of GATHER_ROWS rows of x per thread (every load in
// flight at once), one 16-byte store per row. It lets the next kernel (the matmul, where launched dependent)
// start at once: that one loads its weights meanwhile and waits for the whole gather before it reads x.
constexpr int GATHER_ROWS = 4;

__global__ void __launch_bounds__(128) gather_inputs(const half* __restrict__ x, const int* __restrict__ perm,
                                                     half* __restrict__ out, int M, int K, int stride_x) {
  let_next_kernel_start();
  const int k = 8 * (blockIdx.x * blockDim.x + threadIdx.x), m0 = blockIdx.y * GATHER_ROWS;
  if (k >= K) return;
  const int4 low = __ldg(reinterpret_cast<const int4*>(perm + k)), high = __ldg(reinterpret_cast<const int4*>(perm + k + 4));
  wait_for_previous_kernel();
  const int index[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
  for (int r = 0; r < GATHER_ROWS; ++r) {
    if (m0 + r >= M) break;
    const half* row = x + static_cast<size_t>(m0 + r) * stride_x;
    uint32_t pairs[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) pairs[q] = as_bits(__halves2half2(__ldg(row + index[2 * q]), __ldg(row + index[2 * q + 1])));
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(m0 + r) * K + k) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
}

}  // namespace

// Returns a cudaError_t (0: launched). rows_per_block 8, 16, 32, or 64 where the scales go into B (SPAN 0);
// warps 4 or 8, warps_n 1, 2 or 4 of them along the outputs; x_shared: x through shared-memory stages
// (K a multiple of 8); capped (32 rows, x_shared, warps_n 4): registers capped so that 16 warps share a
// multiprocessor; splits > 1 (8 or 16 rows per block): blocks along K, `partials` holding splits · M · N
// floats and `arrivals` one zeroed int per block of outputs (packed_gemv.cu's workspace). x [M, K] float16 in the
// stored input order, rows 16-byte aligned. gated: out [M, N / 2] gets silu(gate)·up of interleaved gate and up
// outputs (packed_decode.cuh, store_output). dependent: launched to start while the stream's previous kernel
// finishes (packed_decode.cuh, launch_after).
extern "C" int quantbench_packed_mma(int rows_per_block, int warps, int warps_n, int x_shared, int capped, int splits,
                                     const void* x, const void* w, const void* scales, const void* zeros, void* out,
                                     void* partials, void* arrivals, int M, int N, int K, int n_groups, int row_shift,
                                     int stride_x, int gated, float inverse_global_scale, int dependent,
                                     void* stream) {
  if (splits < 1 || splits > 65535 || (gated && N % 2)) return cudaErrorInvalidValue;
  const Call c{x, w, scales, zeros, out, partials, arrivals, splits, M, N, K, n_groups, row_shift, stride_x,
               inverse_global_scale, capped != 0, gated != 0, dependent != 0, static_cast<cudaStream_t>(stream)};
  if (x_shared) return K % 8 ? cudaErrorInvalidValue : by_rows<true>(rows_per_block, warps, warps_n, c);
  return by_rows<false>(rows_per_block, warps, warps_n, c);
}

// x [M, K] float16 (rows stride_x apart) → out [M, K] contiguous in the stored input order (K a multiple of 8).
extern "C" int quantbench_gather_inputs(const void* x, const void* perm, void* out, int M, int K, int stride_x,
                                        int dependent, void* stream) {
  if (K % 8) return cudaErrorInvalidValue;
  const dim3 grid((K / 8 + 127) / 128, (M + GATHER_ROWS - 1) / GATHER_ROWS);
  return launch_after(gather_inputs, grid, 128, 0, static_cast<cudaStream_t>(stream), dependent != 0,
                      static_cast<const half*>(x), static_cast<const int*>(perm), static_cast<half*>(out), M, K,
                      stride_x);
}
