// Decode attention with warp-private online softmax ("stream" kernel), for long contexts.
//
// paged_decode_attention.cu scores a span of keys across the whole CTA, then normalises and
// accumulates it, with block-wide barriers between the phases: at long contexts memory sits idle
// during each softmax pass and barrier (52-66 % of the copy rate on the H200 at 32k-128k keys).
// Here each warp walks its own rows, keeps its own running max, sum and output per head in
// registers, and loads each row's key and value together, so no barrier stands between loads:
// barriers remain only to stage the block table, every 256 blocks, and to merge the warps at the
// end. The split layout, the partial results and their merge (paged_decode_reduce.cu) are those of
// paged_decode_attention.cu, so either kernel serves any launch. Chosen by
// MAGA_DECODE_KERNEL=stream (read once per process; default: the span kernel) for fp16 / bf16
// caches of the query's dtype and head sizes 64, 128 and 256; other launches keep the span kernel.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "src/kernels/cuda/paged_decode_common.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;          // rows in flight per lane group and iteration (keys and values each)
constexpr int kWindowBlocks = 256;  // block-table entries staged per barrier

template <int kHeadDim>
struct StreamLayout {
  static constexpr int kVec = 8;  // 16 bytes of fp16 / bf16
  static constexpr int kChunks = kHeadDim / kVec;
  static constexpr int kLanes = kChunks >= 32 ? 32 : kChunks;  // lanes reading one row
  static constexpr int kChunksPerLane = kChunks / kLanes;
  static constexpr int kRows = 32 / kLanes;  // rows a warp reads at once
  static constexpr int kElems = kChunksPerLane * kVec;
  static constexpr int kStep = kRows * kUnroll;  // rows per warp iteration
};

template <typename T, int kChunksPerLane>
__device__ __forceinline__ float chunk_element(const uint4 (&raw)[kChunksPerLane], int e) {
  const uint32_t word = reinterpret_cast<const uint32_t*>(&raw[e / 8])[(e % 8) / 2];
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __uint_as_float(e % 2 == 0 ? word << 16 : word & 0xffff0000u);
  } else {
    const __half2 pair = *reinterpret_cast<const __half2*>(&word);
    return e % 2 == 0 ? __low2float(pair) : __high2float(pair);
  }
}

template <int kHeadDim, int kHeads>
constexpr int stream_smem_floats() {
  return kHeads * kHeadDim + kWarps * kHeads * (kHeadDim + 2);
}

template <typename T, int kHeadDim, int kHeads>
__global__ void __launch_bounds__(kThreads, 2) paged_decode_stream_kernel(const PagedDecodeParams p) {
  using L = StreamLayout<kHeadDim>;
  extern __shared__ float smem[];
  __shared__ int64_t block_base[kWindowBlocks];
  allow_downstream_launch();
  float* q_s = smem;                               // [kHeads][kHeadDim], pre-scaled
  float* warp_acc = smem + kHeads * kHeadDim;      // [kWarps][kHeads][kHeadDim]
  float* warp_ml = warp_acc + kWarps * kHeads * kHeadDim;  // [kWarps][kHeads][2]: max, sum
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_warp = lane / L::kLanes, lane_in_row = lane % L::kLanes;
  const int seq = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks_per_kv = group / kHeads;
  const int kv_head = blockIdx.y / chunks_per_kv;
  const int head0 = kv_head * group + (blockIdx.y % chunks_per_kv) * kHeads;
  const DecodeRange r = decode_range(p.seq_lens[seq], p.sliding_window);  // step metadata: before the wait
  if (r.num_parts > 0 && static_cast<int>(blockIdx.z) >= r.num_parts) return;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(seq) * p.num_heads + head0) * kHeadDim;
  wait_for_upstream();
  if (r.num_parts <= 0) {
    if (blockIdx.z == 0)
      for (int i = threadIdx.x; i < kHeads * kHeadDim; i += kThreads) out[i] = from_float<T>(0.f);
    return;
  }
  // This split's keys: the same contiguous share of partitions as the span kernel's split_range.
  const int used = min(r.num_parts, static_cast<int>(gridDim.z));
  const int part_begin = r.first_part + static_cast<int>(blockIdx.z) * r.num_parts / used;
  const int part_end = r.first_part + (static_cast<int>(blockIdx.z) + 1) * r.num_parts / used;
  const int k_begin = max(part_begin * kDecodePartitionSize, r.start);
  const int k_end = min(part_end * kDecodePartitionSize, r.len);

  const T* q = static_cast<const T*>(p.q) + seq * p.q_seq_stride;
  for (int i = threadIdx.x; i < kHeads * kHeadDim; i += kThreads)
    q_s[i] = to_float(q[(head0 + i / kHeadDim) * p.q_head_stride + i % kHeadDim]) * p.scale;
  __syncthreads();
  float qr[kHeads][L::kElems];
#pragma unroll
  for (int h = 0; h < kHeads; ++h)
#pragma unroll
    for (int e = 0; e < L::kElems; ++e)
      qr[h][e] = q_s[h * kHeadDim + (lane_in_row + (e / L::kVec) * L::kLanes) * L::kVec + e % L::kVec];

  float m[kHeads], l[kHeads], acc[kHeads][L::kElems];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < L::kElems; ++e) acc[h][e] = 0.f;
  }
  const int32_t* row_table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kHeadDim;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int bs = p.block_size;

  for (int w0 = k_begin; w0 < k_end;) {
    const int first_block = w0 / bs;
    const int w1 = min(k_end, (first_block + kWindowBlocks) * bs);
    __syncthreads();  // every warp is done with the previous window's rows
    for (int j = threadIdx.x; j <= (w1 - 1) / bs - first_block; j += kThreads)
      block_base[j] = static_cast<int64_t>(row_table[first_block + j]) * bs * token_stride + head_offset;
    __syncthreads();
    for (int base = w0 + warp * L::kStep; base < w1; base += kWarps * L::kStep) {
      uint4 kr[kUnroll][L::kChunksPerLane], vr[kUnroll][L::kChunksPerLane];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + u * L::kRows + row_in_warp;
        const int j = t / bs;
        const int64_t row = t < w1 ? block_base[j - first_block] + static_cast<int64_t>(t - j * bs) * token_stride : 0;
#pragma unroll
        for (int c = 0; c < L::kChunksPerLane; ++c) {
          const int64_t at = row + (lane_in_row + c * L::kLanes) * L::kVec;
          kr[u][c] = t < w1 ? *reinterpret_cast<const uint4*>(k_cache + at) : uint4{};
          vr[u][c] = t < w1 ? *reinterpret_cast<const uint4*>(v_cache + at) : uint4{};
        }
      }
      float s[kUnroll][kHeads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < L::kElems; ++e) dot += qr[h][e] * chunk_element<T, L::kChunksPerLane>(kr[u], e);
#pragma unroll
          for (int offset = L::kLanes / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
          s[u][h] = base + u * L::kRows + row_in_warp < w1 ? dot : -INFINITY;
        }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float mx = m[h];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][h]);
        if (mx == -INFINITY) continue;  // no key of this lane group yet
        const float correction = expf(m[h] - mx);
        l[h] *= correction;
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) acc[h][e] *= correction;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const float prob = expf(s[u][h] - mx);  // 0 for a row past the end (-inf)
          l[h] += prob;
#pragma unroll
          for (int e = 0; e < L::kElems; ++e) acc[h][e] += prob * chunk_element<T, L::kChunksPerLane>(vr[u], e);
        }
        m[h] = mx;
      }
    }
    w0 = w1;
  }

  // Merge the lane groups of each warp, then the warps (through shared memory).
#pragma unroll
  for (int offset = L::kLanes; offset < 32; offset <<= 1)
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[h], offset);
      const float mx = fmaxf(m[h], m_o);
      const float a = mx == -INFINITY ? 0.f : expf(m[h] - mx), b = mx == -INFINITY ? 0.f : expf(m_o - mx);
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) acc[h][e] = acc[h][e] * a + __shfl_xor_sync(0xffffffffu, acc[h][e], offset) * b;
      l[h] = l[h] * a + l_o * b;
      m[h] = mx;
    }
  if (row_in_warp == 0) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
      for (int e = 0; e < L::kElems; ++e)
        warp_acc[(warp * kHeads + h) * kHeadDim + (lane_in_row + (e / L::kVec) * L::kLanes) * L::kVec + e % L::kVec] =
            acc[h][e];
      if (lane_in_row == 0) {
        warp_ml[(warp * kHeads + h) * 2] = m[h];
        warp_ml[(warp * kHeads + h) * 2 + 1] = l[h];
      }
    }
  }
  __syncthreads();
  const bool single = min(r.num_parts, static_cast<int>(gridDim.z)) == 1;
  const int64_t part_row = (static_cast<int64_t>(seq) * p.num_heads + head0) * p.num_splits + blockIdx.z;
  for (int i = threadIdx.x; i < kHeads * kHeadDim; i += kThreads) {
    const int h = i / kHeadDim, d = i % kHeadDim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, warp_ml[(w * kHeads + h) * 2]);
    float total = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wm = warp_ml[(w * kHeads + h) * 2];
      const float weight = wm == -INFINITY ? 0.f : expf(wm - mx);
      total += warp_ml[(w * kHeads + h) * 2 + 1] * weight;
      o += warp_acc[(w * kHeads + h) * kHeadDim + d] * weight;
    }
    o /= total;
    if (single) {
      out[i] = from_float<T>(o);
    } else {
      p.partial_out[(part_row + static_cast<int64_t>(h) * p.num_splits) * kHeadDim + d] = o;
      if (d == 0) {
        p.partial_max[part_row + h * p.num_splits] = mx;
        p.partial_sum[part_row + h * p.num_splits] = total;
      }
    }
  }
}

template <typename T, int kHeadDim, int kHeads>
cudaError_t launch_stream(const PagedDecodeParams& p, cudaStream_t stream) {
  const int chunks_per_kv = p.num_heads / p.num_kv_heads / kHeads;
  const dim3 grid(p.num_seqs, p.num_kv_heads * chunks_per_kv, p.num_splits);
  constexpr size_t smem = stream_smem_floats<kHeadDim, kHeads>() * sizeof(float);
  static_assert(smem + kWindowBlocks * sizeof(int64_t) <= 48 * 1024, "keep under the default shared-memory limit");
  cudaError_t err = launch_kernel(paged_decode_stream_kernel<T, kHeadDim, kHeads>, grid, dim3(kThreads), smem, stream, p);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_paged_decode_reduce(p, stream);
}

template <typename T, int kHeadDim>
cudaError_t stream_heads(const PagedDecodeParams& p, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  if (group % 8 == 0) return launch_stream<T, kHeadDim, 8>(p, stream);
  if (group % 4 == 0) return launch_stream<T, kHeadDim, 4>(p, stream);
  if (group % 2 == 0) return launch_stream<T, kHeadDim, 2>(p, stream);
  return launch_stream<T, kHeadDim, 1>(p, stream);
}

template <typename T>
cudaError_t stream_head_dim(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return stream_heads<T, 64>(p, stream);
    case 128: return stream_heads<T, 128>(p, stream);
    case 256: return stream_heads<T, 256>(p, stream);
  }
  return cudaErrorInvalidValue;
}

bool stream_kernel_chosen() {
  static const bool chosen = [] {
    const char* value = std::getenv("MAGA_DECODE_KERNEL");
    return value != nullptr && std::strcmp(value, "stream") == 0;
  }();
  return chosen;
}

}  // namespace

bool paged_decode_stream_applies(const PagedDecodeParams& p) {
  const bool half = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  return stream_kernel_chosen() && half && p.cache_dtype == p.dtype &&
         (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256);
}

cudaError_t launch_paged_decode_stream(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) return stream_head_dim<__nv_bfloat16>(p, stream);
  return stream_head_dim<__half>(p, stream);
}

}  // namespace cuda
}  // namespace th_transformer
