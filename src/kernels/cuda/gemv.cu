#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/gemv.h"
#include "src/kernels/cuda/launch.cuh"

#include <cuda_fp8.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// 16-byte chunks of each row a lane loads before using the first: with kRows rows that is
// kRows * kUnroll loads in flight per lane.
constexpr int kUnroll = 4;

// sum over 8 elements of w * x (both 16-byte chunks of T), in fp32
template <typename T>
__device__ __forceinline__ float dot_chunk(const uint4& w, const uint4& x) {
  const T* wv = reinterpret_cast<const T*>(&w);
  const T* xv = reinterpret_cast<const T*>(&x);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc += to_float(wv[i]) * to_float(xv[i]);
  return acc;
}

// One byte-sized e4m3 weight (WEIGHT_TYPE=FP8): the W template argument of the byte-weight kernels.
struct E4M3Weight {
  uint8_t bits;
};

// The 16 x elements a byte-weight chunk c multiplies (two 16-byte chunks of T), as floats; zeros
// past the row's end (stale shared memory could hold NaNs). Converted once for all kRows rows.
template <typename T>
__device__ __forceinline__ void x_for_int8_chunk(const uint4* x_s, int c, int chunks, float (&xf)[16]) {
  if (c >= chunks) {
#pragma unroll
    for (int i = 0; i < 16; ++i) xf[i] = 0.f;
    return;
  }
  const uint4 halves[2] = {x_s[2 * c], x_s[2 * c + 1]};
#pragma unroll
  for (int i = 0; i < 16; ++i) xf[i] = to_float(reinterpret_cast<const T*>(&halves[i / 8])[i % 8]);
}

// sum over the 16 int8 weights of one 16-byte chunk times xf, in fp32 (the row's scale is applied
// once at the end). Each byte becomes a float without the slow integer-to-float unit: with its sign
// bit flipped it is an unsigned u = w + 128, placed as the low mantissa byte of 2^23 (one byte
// permute), and 2^23 + 128 is subtracted.
__device__ __forceinline__ float dot_chunk_bytes(const uint4& w, const float (&xf)[16], int8_t) {
  const uint32_t words[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u, w.w ^ 0x80808080u};
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float wf = __uint_as_float(__byte_perm(words[i / 4], 0x4B000000u, 0x7540u + (i % 4))) - 8388736.f;
    acc = fmaf(wf, xf[i], acc);
  }
  return acc;
}

// The same for 16 e4m3 weights: pairs widened by the hardware's e4m3x2 -> f16x2 conversion (one
// instruction on sm_89+), then to fp32.
__device__ __forceinline__ float dot_chunk_bytes(const uint4& w, const float (&xf)[16], E4M3Weight) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[i / 2] >> (16 * (i % 2)));
    const __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
    const float2 f = __half22float2(h);
    acc = fmaf(f.x, xf[2 * i], acc);
    acc = fmaf(f.y, xf[2 * i + 1], acc);
  }
  return acc;
}

// Streaming load: the weight is read once per step, keep it out of L1.
__device__ __forceinline__ uint4 load_stream(const uint4* p) { return __ldcs(p); }

// Loads the 16-byte chunks base + u * 32 (u < kUnroll) of each of the warp's rows (zeros past the
// row's end).
template <int kRows>
__device__ __forceinline__ void load_tile(const uint4* const (&rows)[kRows], int base, int chunks,
                                          uint4 (&w)[kUnroll][kRows]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int c = base + u * 32;
      w[u][r] = c < chunks ? load_stream(rows[r] + c) : make_uint4(0, 0, 0, 0);
    }
}

// 16-byte chunks of one row that a warp's lanes cover in one pass of the loop.
constexpr int kTileChunks = 32 * kUnroll;
// Dynamic shared memory stays within the default limit (no opt-in attribute needed).
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// 16-byte asynchronous copy global -> shared, through L2 only (the weight is read once).
__device__ __forceinline__ void copy_async_16(uint4* shared, const uint4* global) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global) : "memory");
}

__device__ __forceinline__ void copy_async_commit_and_wait() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}

// Where tile t (1 <= t <= pre_tiles) of the warp's row r sits in the prefetch buffer.
template <int kRows>
__device__ __forceinline__ uint4* prefetched_tile(uint4* w_s, int warp, int r, int t, int pre_tiles) {
  return w_s + (static_cast<int64_t>((warp * kRows + r) * pre_tiles) + (t - 1)) * kTileChunks;
}

// Grid: one CTA per kWarps * kRows output rows; warp w of CTA b computes rows
// (b * kWarps + w) * kRows + [0, kRows). Lanes stride over the row's 16-byte chunks.
// Before waiting for the previous kernel (launch.cuh) the CTA loads the first tile of each row
// into registers and the next `pre_tiles` tiles into shared memory (cp.async): at batch 1 the
// projection after attention then streams most of its weight while the attention kernels run.
// Each lane later reads back only the chunks it copied itself, so waiting for its own copies is
// enough. Shared memory: x (in_features elements), then the prefetched tiles.
// W: the weight's element type, T (fp16 / bf16), int8_t or E4M3Weight (byte weights: each 16-byte
// chunk holds 16 weights, and each output is multiplied by its row's scale).
template <typename T, typename W, int kRows>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvParams p, int pre_tiles) {
  extern __shared__ uint4 gemv_smem[];
  allow_downstream_launch();
  const int chunks = static_cast<int>(p.in_features * sizeof(W) / 16);  // weight chunks per row
  const int x_chunks = static_cast<int>(p.in_features * sizeof(T) / 16);
  uint4* x_s = gemv_smem;
  uint4* w_s = gemv_smem + x_chunks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  const int64_t last_row = p.out_features - 1;
  const uint4* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r)  // rows past the end re-read the last one; their sums are dropped
    rows[r] = static_cast<const uint4*>(p.weight) + min(row0 + r, last_row) * chunks;
  uint4 w[kUnroll][kRows];
  load_tile<kRows>(rows, lane, chunks, w);
  for (int t = 1; t <= pre_tiles; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = t * kTileChunks + lane + u * 32;
        if (c < chunks) copy_async_16(prefetched_tile<kRows>(w_s, warp, r, t, pre_tiles) + lane + u * 32, rows[r] + c);
      }
  wait_for_upstream();
  const uint4* x = static_cast<const uint4*>(p.x);
  for (int i = threadIdx.x; i < x_chunks; i += kThreads) x_s[i] = x[i];
  if (pre_tiles > 0) copy_async_commit_and_wait();
  __syncthreads();
  if (row0 >= p.out_features) return;
  float acc[kRows] = {};
  for (int t = 0, base = lane;;) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32;
      if constexpr (sizeof(W) == 1) {
        float xf[16];
        x_for_int8_chunk<T>(x_s, c, chunks, xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += dot_chunk_bytes(w[u][r], xf, W{});
      } else {
        const uint4 xv = c < chunks ? x_s[c] : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += dot_chunk<T>(w[u][r], xv);
      }
    }
    ++t;
    base += kTileChunks;
    if (base >= chunks) break;
    if (t > pre_tiles) {
      load_tile<kRows>(rows, base, chunks, w);
      continue;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const uint4* tile = prefetched_tile<kRows>(w_s, warp, r, t, pre_tiles);
        w[u][r] = base + u * 32 < chunks ? tile[lane + u * 32] : make_uint4(0, 0, 0, 0);
      }
  }
  bool writer;
  const int first = reduce_scatter<kRows, 32>(acc, lane, writer);
  if (writer && row0 + first < p.out_features) {
    const float scale = p.scale != nullptr ? p.scale[row0 + first] : 1.f;
    static_cast<T*>(p.out)[row0 + first] = from_float<T>(acc[0] * scale);
  }
}

// CTAs of gemv_kernel<T, kRows> an SM holds with `smem` bytes of dynamic shared memory (asked
// once per size: the launch path stays free of driver queries).
template <typename T, typename W, int kRows>
int resident_ctas_per_sm(int64_t smem) {
  static std::mutex mutex;
  static std::unordered_map<int64_t, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(smem);
  if (found != cache.end()) return found->second;
  int resident = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, gemv_kernel<T, W, kRows>, kThreads, smem) != cudaSuccess)
    resident = 0;
  cache.emplace(smem, resident);
  return resident;
}

// Tiles of each row to prefetch into shared memory (beyond the first, in registers): as many as
// fit kMaxSharedBytes, at most 2, and only while every CTA is still resident at once. A CTA of a
// later wave would load the tiles right away anyway, and shared memory would cost it occupancy.
// With PDL off nothing runs before the wait, so nothing is prefetched. MAGA_GEMV_SMEM_PREFETCH=0
// turns it off (A/B measurements).
template <typename T, typename W, int kRows>
int prefetch_tiles(const GemvParams& p, int64_t ctas, int64_t x_bytes) {
  static const bool disabled = [] {
    const char* env = std::getenv("MAGA_GEMV_SMEM_PREFETCH");
    return env != nullptr && env[0] == '0';
  }();
  if (disabled || !pdl_enabled() || p.num_sms <= 0) return 0;
  const int64_t tile_bytes = static_cast<int64_t>(kWarps) * kRows * kTileChunks * 16;
  const int64_t row_tiles = (p.in_features * static_cast<int64_t>(sizeof(W)) / 16 + kTileChunks - 1) / kTileChunks;
  for (int tiles = static_cast<int>(min(int64_t{2}, row_tiles - 1)); tiles > 0; --tiles) {
    const int64_t smem = x_bytes + tiles * tile_bytes;
    if (smem > kMaxSharedBytes) continue;
    if (ctas <= static_cast<int64_t>(resident_ctas_per_sm<T, W, kRows>(smem)) * p.num_sms) return tiles;
  }
  return 0;
}

template <typename T, typename W, int kRows>
cudaError_t launch_rows(const GemvParams& p, cudaStream_t stream) {
  const int64_t rows_per_cta = static_cast<int64_t>(kWarps) * kRows;
  const int64_t ctas = (p.out_features + rows_per_cta - 1) / rows_per_cta;
  const int64_t x_bytes = p.in_features * static_cast<int64_t>(sizeof(T));
  const int tiles = prefetch_tiles<T, W, kRows>(p, ctas, x_bytes);
  const size_t smem = static_cast<size_t>(x_bytes + tiles * rows_per_cta * kTileChunks * 16);
  return launch_kernel(gemv_kernel<T, W, kRows>, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), smem, stream, p,
                       tiles);
}

// Rows per warp: 4 (the most loads in flight) while that still gives two CTAs per SM, fewer for
// narrow outputs so that every SM streams part of the weight.
template <typename T, typename W>
cudaError_t launch(const GemvParams& p, cudaStream_t stream) {
  const int64_t want = 2 * static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 132);
  if (p.out_features / (kWarps * 4) >= want) return launch_rows<T, W, 4>(p, stream);
  if (p.out_features / (kWarps * 2) >= want) return launch_rows<T, W, 2>(p, stream);
  return launch_rows<T, W, 1>(p, stream);
}

template <typename T>
cudaError_t launch_for_weight(const GemvParams& p, cudaStream_t stream) {
  switch (p.weight_kind) {
    case GemvWeight::kSameAsX: return launch<T, T>(p, stream);
    case GemvWeight::kInt8: return launch<T, int8_t>(p, stream);
    case GemvWeight::kE4M3: return launch<T, E4M3Weight>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.out_features == 0) return cudaSuccess;
  const bool byte_weight = p.weight_kind != GemvWeight::kSameAsX;
  const int64_t per_chunk = byte_weight ? 16 : 8;  // weights in 16 bytes
  if (p.out_features < 0 || p.out_features > 0x7fffffffLL * kWarps || p.in_features <= 0 ||
      p.in_features % per_chunk != 0 || p.in_features > kGemvMaxInFeatures || (byte_weight && !p.scale)) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case DType::kFloat16: return launch_for_weight<__half>(p, stream);
    case DType::kBFloat16: return launch_for_weight<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace th_transformer
