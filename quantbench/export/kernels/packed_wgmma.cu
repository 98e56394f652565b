// x·Wᵀ for 1–64 rows of float16 x and a packed weight in the kernel layout (layout.py), on Hopper's
// warpgroup tensor-core products (wgmma, sm_90a, float32 sums). Built by cuda_build.py with nvcc, one library
// per weight type (packed_decode.cuh: KIND, BITS, HAS_ZEROS), the scales always in the weight's fragment (SPAN
// 0: not MXFP4, whose scales may leave float16's range). act_order is gathered before the call.
//
// The weight is the product's A and x its B, so that the rows of x are the product's N (8–64) and a batch of 8
// costs no more products than one of 64: a warpgroup multiplies 64 outputs × ROWS rows of x by 16 inputs per
// product. A comes from registers, decoded as packed_mma.cu decodes its B: lane (g, t) of warp w loads the
// words of outputs 4g … 4g + 3 of the warp's 32 for word row 4·step + t, and A-tile a holds outputs 4g + 2a
// (row 16w + g) and 4g + 2a + 1 (row 16w + g + 8). Product i of a k-step takes the words' code pairs 2i
// (physical k 2t, 2t + 1) and 2i + 1 (2t + 8, 2t + 9), pair p being stored inputs (p, p + PAIRS) of a word.
//
// x reaches B through shared memory in that physical order: K-major core matrices of 8 rows × 16 bytes, no
// swizzle (a product's two k-halves 128 bytes apart, groups of 8 rows 256), two slabs of 128 inputs, one
// written while the other is read. Each thread's words come by cp.async into a ring of its own, STAGES slabs
// deep; x is loaded into registers a slab before it is paired and stored; the block meets once a slab. A
// warpgroup decodes k-step s + 1 while the products of k-step s run. GROUPS warpgroups side by side (128
// outputs each) share x's stages; split-K gives each of gridDim.z blocks a run of whole slabs and adds their
// float32 sums as the other kernels do.

#include "tensor_core_decode.cuh"

namespace {

static_assert(SPAN == 0, "the wgmma kernel puts the scales into A");
static_assert(KIND != 2, "MXFP4 scales may leave float16's range: no wgmma build");

constexpr int WARPGROUP = 128;
constexpr int SLAB_INPUTS = 128;
constexpr int STEP_INPUTS = STEP_ROWS * PER;
constexpr int SLAB_STEPS = SLAB_INPUTS / STEP_INPUTS;  // k-steps a slab: 2 (int2), 4 (4-bit codes), 8 (int8)
constexpr int STAGES = 4;        // slabs of words in each thread's ring
constexpr int CORE_BYTES = 128;  // 8 rows × 16 bytes

// An sm_90a shared-memory matrix descriptor, no swizzle: `along_k` bytes between the core matrices of a
// product's two k-halves, `along_rows` between groups of 8 rows.
__device__ __forceinline__ uint64_t matrix_descriptor(uint32_t address, uint32_t along_k, uint32_t along_rows) {
  return static_cast<uint64_t>((address & 0x3FFFFu) >> 4) | static_cast<uint64_t>(along_k >> 4) << 16 |
         static_cast<uint64_t>(along_rows >> 4) << 32;
}

// d += A·B for a 64 × N × 16 product: A four f16x2 registers a thread, B through its descriptor (K-major).
template <int N>
__device__ __forceinline__ void wgmma_async(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b);

template <>
__device__ __forceinline__ void wgmma_async<8>(float (&d)[4], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, "
               "1, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <>
__device__ __forceinline__ void wgmma_async<16>(float (&d)[8], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, "
               "%10, %11}, %12, p, 1, 1, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <>
__device__ __forceinline__ void wgmma_async<32>(float (&d)[16], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
               "%11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <>
__device__ __forceinline__ void wgmma_async<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
               "%11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
               "%30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
                 "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
                 "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
                 "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(PENDING) : "memory");
}

// Keeps the compiler from moving reads or writes of v across the asynchronous products.
template <int COUNT>
__device__ __forceinline__ void pin(float (&v)[COUNT]) {
#pragma unroll
  for (int i = 0; i < COUNT; ++i) asm volatile("" : "+f"(v[i]) :: "memory");
}

// Generic-proxy stores to shared memory made visible to the products' (async-proxy) reads after a barrier.
__device__ __forceinline__ void fence_shared_for_products() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory"); }

template <int ROWS, int GROUPS>
struct Layout {
  static constexpr int THREADS = GROUPS * WARPGROUP;
  static constexpr int WORD_BYTES = SLAB_STEPS * THREADS * 16;  // a slab of each thread's words: [k-step][thread]
  static constexpr int X_BYTES = SLAB_INPUTS * ROWS * 2;        // a slab of B: products of ROWS · 32 bytes
  static constexpr int BYTES = STAGES * WORD_BYTES + 2 * X_BYTES;
};

// cp.async of this thread's words of a slab into its ring (zeros past the weight's rows or outputs), one commit
// group a slab.
template <int ROWS, int GROUPS>
__device__ __forceinline__ void copy_words(uint32_t ring, const uint32_t* __restrict__ w, int slab, int rows_end,
                                           int N, int n0, int t, bool active) {
  const uint32_t at = ring + (slab % STAGES) * Layout<ROWS, GROUPS>::WORD_BYTES + 16 * threadIdx.x;
#pragma unroll
  for (int i = 0; i < SLAB_STEPS; ++i) {
    const int j = (slab * SLAB_STEPS + i) * STEP_ROWS + t;
    const bool inside = active && j < rows_end;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(at + i * Layout<ROWS, GROUPS>::THREADS * 16),
                    "l"(w + (inside ? static_cast<size_t>(j) * N + n0 : 0)), "r"(inside ? 16 : 0));
  }
  asm volatile("cp.async.commit_group;");
}

// A slab's x of ROWS rows, in the products' physical order: unit u is row u / 4 and word row u % 4 of each
// k-step (a warp's 32 units store to 32 banks). Loaded into registers a slab before it is stored.
template <int ROWS, int THREADS>
struct XStager {
  static constexpr int UNITS = ROWS * STEP_ROWS * SLAB_STEPS;
  static constexpr int PER_THREAD = (UNITS + THREADS - 1) / THREADS;
  uint32_t held[PER_THREAD][PER / 2];

  __device__ __forceinline__ void load(const half* __restrict__ x, int slab, int m0, int M, int word_rows,
                                       int stride_x) {
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {
      const int unit = threadIdx.x + u * THREADS, step = unit / (ROWS * STEP_ROWS), row = unit / STEP_ROWS % ROWS;
      const int j = (slab * SLAB_STEPS + step) * STEP_ROWS + unit % STEP_ROWS;
      const bool live = unit < UNITS && m0 + row < M && j < word_rows;
      input_words<true>(x + static_cast<size_t>(live ? m0 + row : 0) * stride_x, j, live, held[u]);
    }
  }

  __device__ __forceinline__ void store(unsigned char* b) const {
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {
      const int unit = threadIdx.x + u * THREADS;
      if (UNITS % THREADS && unit >= UNITS) break;
      const int step = unit / (ROWS * STEP_ROWS), row = unit / STEP_ROWS % ROWS, word_row = unit % STEP_ROWS;
      half2 pairs[PAIRS];
      pairs_of(held[u], pairs);
#pragma unroll
      for (int p = 0; p < PAIRS; ++p) {
        const int product = step * PRODUCTS + p / 2, k_half = p % 2;
        const int at = product * ROWS * 32 + ((row / 8) * 2 + k_half) * CORE_BYTES + (row % 8) * 16 + 4 * word_row;
        *reinterpret_cast<uint32_t*>(b + at) = as_bits(pairs[p]);
      }
    }
  }
};

template <int ROWS, int GROUPS, bool SPLIT>
__global__ void __launch_bounds__(GROUPS * WARPGROUP) packed_wgmma(
    const half* __restrict__ x, const uint32_t* __restrict__ w, const void* __restrict__ scales_,
    const uint8_t* __restrict__ zeros, half* __restrict__ out, int M, int N, int K, int n_groups, int row_shift,
    int stride_x, float inverse_global_scale, float* __restrict__ partials, int* __restrict__ arrivals) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<ROWS, GROUPS>;
  constexpr int ACC = ROWS / 2;  // a 64 × ROWS tile's float32 sums a thread
  extern __shared__ __align__(128) unsigned char shared[];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4, group = threadIdx.x / WARPGROUP;
  const int g = lane / 4, t = lane % 4;
  const int n0 = (blockIdx.x * GROUPS + group) * WARPGROUP + 32 * warp + OUTS * g;
  const int m0 = blockIdx.y * ROWS;
  const int word_rows = K / PER;
  const int slabs = (K + SLAB_INPUTS - 1) / SLAB_INPUTS;
  const int splits = SPLIT ? gridDim.z : 1;
  const int chunk = (slabs + splits - 1) / splits;
  const int slab_begin = SPLIT ? blockIdx.z * chunk : 0, slab_end = SPLIT ? min(slabs, slab_begin + chunk) : slabs;
  const int rows_end = min(word_rows, slab_end * SLAB_STEPS * STEP_ROWS);
  const bool active = n0 < N;
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  unsigned char* const b_stages = shared + STAGES * L::WORD_BYTES;

  float acc[2][ACC];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int e = 0; e < ACC; ++e) acc[a][e] = 0.f;

  auto scale_bits_at = [&](int step) {
    const int scale_group = min((step * STEP_ROWS + t) >> row_shift, n_groups - 1);
    return load_scale_bits(scales_, zeros, scale_group, n_groups, N, n0, n0, t, active);
  };
  ScaleBits next_bits[SLAB_STEPS];
#pragma unroll
  for (int i = 0; i < SLAB_STEPS; ++i) next_bits[i] = scale_bits_at(slab_begin * SLAB_STEPS + i);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)  // one commit group a slab, empty past the last
    copy_words<ROWS, GROUPS>(ring, w, slab_begin + s, rows_end, N, n0, t, active);
  wait_for_previous_kernel();
  XStager<ROWS, L::THREADS> stager;
  if (slab_begin < slab_end) {
    stager.load(x, slab_begin, m0, M, word_rows, stride_x);
    stager.store(b_stages);
    stager.load(x, slab_begin + 1, m0, M, word_rows, stride_x);
  }

  uint32_t a[2][2][PRODUCTS][4];  // [k-step parity][A-tile][product]
  for (int slab = slab_begin; slab < slab_end; ++slab) {
    wgmma_wait<0>();  // the last slab's products are done with the B stage the next slab's x goes to
    wait_copies<STAGES - 2>();
    fence_shared_for_products();
    __syncthreads();
    copy_words<ROWS, GROUPS>(ring, w, slab + STAGES - 1, rows_end, N, n0, t, active);
    if (slab + 1 < slab_end) {
      stager.store(b_stages + ((slab - slab_begin + 1) % 2) * L::X_BYTES);
      if (slab + 2 < slab_end) stager.load(x, slab + 2, m0, M, word_rows, stride_x);
    }
    ScaleBits bits[SLAB_STEPS];
#pragma unroll
    for (int i = 0; i < SLAB_STEPS; ++i) {
      bits[i] = next_bits[i];
      if (slab + 1 < slab_end) next_bits[i] = scale_bits_at((slab + 1) * SLAB_STEPS + i);
    }
    const unsigned char* words = shared + (slab % STAGES) * L::WORD_BYTES + 16 * threadIdx.x;
    const uint32_t b_stage = ring + STAGES * L::WORD_BYTES + ((slab - slab_begin) % 2) * L::X_BYTES;
#pragma unroll
    for (int i = 0; i < SLAB_STEPS; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(words + i * L::THREADS * 16);
      const Scales s = unpack_scales(bits[i]);
#pragma unroll
      for (int pair_of_outputs = 0; pair_of_outputs < 2; ++pair_of_outputs) {
        uint32_t low[PLANES][PAIRS], high[PLANES][PAIRS];  // outputs 4g + 2a and 4g + 2a + 1
        decode_word(word_of(v, 2 * pair_of_outputs), s, 2 * pair_of_outputs, low);
        decode_word(word_of(v, 2 * pair_of_outputs + 1), s, 2 * pair_of_outputs + 1, high);
#pragma unroll
        for (int product = 0; product < PRODUCTS; ++product) {
          uint32_t (&fragment)[4] = a[i % 2][pair_of_outputs][product];
          fragment[0] = low[0][2 * product];
          fragment[1] = high[0][2 * product];
          fragment[2] = low[0][2 * product + 1];
          fragment[3] = high[0][2 * product + 1];
        }
      }
      wgmma_fence();
#pragma unroll
      for (int product = 0; product < PRODUCTS; ++product) {
        const uint64_t b = matrix_descriptor(b_stage + (i * PRODUCTS + product) * ROWS * 32, CORE_BYTES,
                                             2 * CORE_BYTES);
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) wgmma_async<ROWS>(acc[tile], a[i % 2][tile][product], b);
      }
      wgmma_commit();
      wgmma_wait<1>();  // k-step i − 1's products are done: its A registers are free for k-step i + 1
    }
  }
  wgmma_wait<0>();
  pin(acc[0]);
  pin(acc[1]);
  let_next_kernel_start();

  // Sum e of n-chunk c, A-tile a: output n0 + 2a + (e / 2), row of x m0 + 8c + 2t + e % 2.
  const float last_scale = KIND == 3 ? inverse_global_scale : 1.f;
#pragma unroll
  for (int c = 0; c < ROWS / 8; ++c)
#pragma unroll
    for (int column = 0; column < 2; ++column) {
      const int m = m0 + 8 * c + 2 * t + column;
      if (!active || m >= M) continue;
      const float4 sums = make_float4(acc[0][4 * c + column], acc[0][4 * c + 2 + column], acc[1][4 * c + column],
                                      acc[1][4 * c + 2 + column]);
      if constexpr (SPLIT) {
        *reinterpret_cast<float4*>(partials + (static_cast<size_t>(blockIdx.z) * M + m) * N + n0) = sums;
      } else {
        const half2 low = __floats2half2_rn(sums.x * last_scale, sums.y * last_scale);
        const half2 high = __floats2half2_rn(sums.z * last_scale, sums.w * last_scale);
        *reinterpret_cast<uint2*>(out + static_cast<size_t>(m) * N + n0) = make_uint2(as_bits(low), as_bits(high));
      }
    }
  if constexpr (SPLIT) {  // the last block of this tile to arrive adds the splits in their order
    if (!last_to_arrive(arrivals, splits)) return;
#pragma unroll
    for (int c = 0; c < ROWS / 8; ++c)
#pragma unroll
      for (int column = 0; column < 2; ++column) {
        const int m = m0 + 8 * c + 2 * t + column;
        if (!active || m >= M) continue;
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int z = 0; z < splits; ++z) {
          const size_t at = (static_cast<size_t>(z) * M + m) * N + n0;
          const float4 part = __ldcg(reinterpret_cast<const float4*>(partials + at));
          sum.x += part.x; sum.y += part.y; sum.z += part.z; sum.w += part.w;
        }
        const half2 low = __floats2half2_rn(sum.x * last_scale, sum.y * last_scale);
        const half2 high = __floats2half2_rn(sum.z * last_scale, sum.w * last_scale);
        *reinterpret_cast<uint2*>(out + static_cast<size_t>(m) * N + n0) = make_uint2(as_bits(low), as_bits(high));
      }
  }
#else
  __trap();  // built for sm_90a only
#endif
}

struct Call {
  const void *x, *w, *scales, *zeros;
  void *out, *partials, *arrivals;
  int splits, M, N, K, n_groups, row_shift, stride_x;
  float inverse_global_scale;
  bool dependent;
  cudaStream_t stream;
};

// Where the stages exceed 48 KB, the kernel's allowance covers its static shared memory too (split-K's flag).
template <int ROWS, int GROUPS, bool SPLIT>
cudaError_t launch(const Call& c) {
  constexpr auto kernel = packed_wgmma<ROWS, GROUPS, SPLIT>;
  constexpr size_t stages = Layout<ROWS, GROUPS>::BYTES;
  static size_t static_bytes = ~size_t{0};
  if (static_bytes == ~size_t{0}) {
    cudaFuncAttributes attributes{};
    const cudaError_t error = cudaFuncGetAttributes(&attributes, kernel);
    if (error != cudaSuccess) return error;
    static_bytes = attributes.sharedSizeBytes;
  }
  const cudaError_t error = allow_shared_memory<kernel>(stages + static_bytes);
  if (error != cudaSuccess) return error;
  constexpr int OUTPUTS = GROUPS * WARPGROUP;
  const dim3 grid((c.N + OUTPUTS - 1) / OUTPUTS, (c.M + ROWS - 1) / ROWS, c.splits);
  return launch_after(kernel, grid, GROUPS * WARPGROUP, stages, c.stream, c.dependent,
                      static_cast<const half*>(c.x), static_cast<const uint32_t*>(c.w), c.scales,
                      static_cast<const uint8_t*>(c.zeros), static_cast<half*>(c.out), c.M, c.N, c.K, c.n_groups,
                      c.row_shift, c.stride_x, c.inverse_global_scale, static_cast<float*>(c.partials),
                      static_cast<int*>(c.arrivals));
}

template <int ROWS, int GROUPS>
cudaError_t by_split(const Call& c) {
  if (c.splits > 1) return launch<ROWS, GROUPS, true>(c);
  return launch<ROWS, GROUPS, false>(c);
}

template <int ROWS>
cudaError_t by_groups(int groups, const Call& c) {
  switch (groups) {
    case 1: return by_split<ROWS, 1>(c);
    case 2: return by_split<ROWS, 2>(c);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Returns a cudaError_t (0: launched). rows_per_block 8, 16, 32 or 64 (the products' N); groups 1 or 2
// warpgroups side by side along the outputs (128 each); splits > 1: blocks along K, `partials` holding
// splits · M · N floats and `arrivals` one zeroed int per block of outputs (cuda_build.split_workspace).
// x [M, K] float16 in the stored input order, rows 16-byte aligned, K a multiple of 8. dependent: launched to
// start while the stream's previous kernel finishes (packed_decode.cuh).
extern "C" int quantbench_packed_wgmma(int rows_per_block, int groups, int splits, const void* x, const void* w,
                                       const void* scales, const void* zeros, void* out, void* partials,
                                       void* arrivals, int M, int N, int K, int n_groups, int row_shift, int stride_x,
                                       float inverse_global_scale, int dependent, void* stream) {
  if (splits < 1 || splits > 65535 || K % 8) return cudaErrorInvalidValue;
  const Call c{x, w, scales, zeros, out, partials, arrivals, splits, M, N, K, n_groups, row_shift, stride_x,
               inverse_global_scale, dependent != 0, static_cast<cudaStream_t>(stream)};
  switch (rows_per_block) {
    case 8: return by_groups<8>(groups, c);
    case 16: return by_groups<16>(groups, c);
    case 32: return by_groups<32>(groups, c);
    case 64: return by_groups<64>(groups, c);
  }
  return cudaErrorInvalidValue;
}
