#include <cuda_fp8.h>

#include <type_traits>

#include "src/kernels/cuda/paged_decode_common.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// Rows each lane group loads before using the first: decode attention is bound by memory latency
// at small batches (one CTA per SM), so several independent 16-byte loads must be in flight.
#ifndef MAGA_DECODE_UNROLL
#define MAGA_DECODE_UNROLL 4
#endif
constexpr int kUnroll = MAGA_DECODE_UNROLL;
// Keys a CTA scores, normalises and accumulates between two barriers: up to this many consecutive
// partitions of its split at once. Each span costs four block-wide barriers and a softmax pass with
// the memory idle, so at long contexts larger spans pay (H200, 2026-12-03: one 256-key partition
// per span against 64 took batch 1 x 32k keys from 75 to 60 us and 8 x 8k from 168 to 103 us),
// while splits of one or two partitions (short contexts at small batches, where 64-key partitions
// keep every SM busy) are not affected.
#ifndef MAGA_DECODE_SPAN_PARTITIONS
#define MAGA_DECODE_SPAN_PARTITIONS 4
#endif
constexpr int kSpanKeys = MAGA_DECODE_SPAN_PARTITIONS * kDecodePartitionSize;
// CTAs per SM the register allocation must allow (__launch_bounds__' second argument) for big
// batches (at least kBandwidthBoundPairs (sequence, KV head) pairs), which are bound by memory
// parallelism, i.e. by how many CTAs share an SM: unconstrained, the kernel's 96 registers left room
// for 5. On the H100 (Llama-3-8B heads, 512-4,096 keys) 6 gave 6-13 % more bandwidth at batch
// 64-256 and cost batch 1 0.8 us a call, so small batches keep the unconstrained build.
#ifndef MAGA_DECODE_MIN_BLOCKS
#define MAGA_DECODE_MIN_BLOCKS 6
#endif
constexpr int64_t kBandwidthBoundPairs = 256;

constexpr int next_pow2(int x) { return x <= 1 ? 1 : 2 * next_pow2((x + 1) / 2); }

// The word a lane loads of a cached row: 16 bytes of 2- and 4-byte elements, 8 bytes of 1-byte ones
// (int8 / e4m3 caches), so that a lane holds as many elements, and as many query registers, as for
// bf16 keys.
template <typename C>
struct ChunkOf {
  using type = uint4;
};
template <>
struct ChunkOf<int8_t> {
  using type = uint2;
};
template <>
struct ChunkOf<__nv_fp8_e4m3> {
  using type = uint2;
};

// Quantized caches (INT8_KV_CACHE / KV_CACHE_DTYPE=fp8) carry one fp32 scale per token and KV head.
template <typename C>
constexpr bool kQuantized = sizeof(C) == 1;

// How a warp reads key/value rows: each row is split into chunks (ChunkOf), a group of kLanes lanes
// reads one row (coalesced loads), and a warp reads kKeysPerWarp rows at a time. Head sizes whose
// chunk count is not a power of two (80, 96) leave a few lanes of the group idle.
template <typename T, int kHeadDim>
struct RowLayout {
  using Chunk = typename ChunkOf<T>::type;
  static constexpr int kVec = sizeof(Chunk) / sizeof(T);
  static_assert(kHeadDim % kVec == 0, "head_dim must be a whole number of 16-byte chunks");
  static constexpr int kChunks = kHeadDim / kVec;
  static constexpr int kLanes = kChunks >= 32 ? 32 : next_pow2(kChunks);
  static constexpr int kChunksPerLane = (kChunks + kLanes - 1) / kLanes;
  static constexpr int kKeysPerWarp = 32 / kLanes;
  static constexpr int kStride = kWarps * kKeysPerWarp;  // rows between a warp's consecutive rows
  static constexpr int kElems = kChunksPerLane * kVec;  // row elements each lane holds
};

// Loads this lane's chunks of one cached row, raw (zeros for a row past the end). They are
// converted to float where they are used: float copies would double the registers the loads in
// flight hold, and registers bound how many CTAs share an SM (see MAGA_DECODE_MIN_BLOCKS).
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_row(const T* cache, int64_t row_offset, bool valid, int lane_in_row,
                                         typename RowLayout<T, kHeadDim>::Chunk (&out)[RowLayout<T, kHeadDim>::kChunksPerLane]) {
  using L = RowLayout<T, kHeadDim>;
#pragma unroll
  for (int j = 0; j < L::kChunksPerLane; ++j) {
    const int chunk = lane_in_row + j * L::kLanes;
    out[j] = typename L::Chunk{};
    if (valid && chunk < L::kChunks)
      out[j] = *reinterpret_cast<const typename L::Chunk*>(cache + row_offset + chunk * L::kVec);
  }
}

// Element e of a lane's loaded row part, as float (bf16 widens by a shift of its 32-bit word).
template <typename T, int kHeadDim>
__device__ __forceinline__ float row_element(const typename RowLayout<T, kHeadDim>::Chunk (&raw)[RowLayout<T, kHeadDim>::kChunksPerLane],
                                             int e) {
  using L = RowLayout<T, kHeadDim>;
  if constexpr (std::is_same<T, int8_t>::value) {
    return static_cast<float>(reinterpret_cast<const int8_t*>(&raw[e / L::kVec])[e % L::kVec]);
  } else if constexpr (std::is_same<T, __nv_fp8_e4m3>::value) {
    // e4m3's sign, exponent and mantissa bits moved into fp16's places give the same value times
    // 2^-8 (the biases differ by 8; e4m3's subnormals land on fp16's): two integer ops and one
    // conversion, where cuda_fp8.h's generic conversion is a long routine on sm_80 that made this
    // file take minutes to compile. Exact for every finite e4m3 value (the quantizer writes no NaN).
    const uint32_t b = reinterpret_cast<const uint8_t*>(&raw[e / L::kVec])[e % L::kVec];
    const unsigned short bits = static_cast<unsigned short>(((b & 0x80u) << 8) | ((b & 0x7fu) << 7));
    return __half2float(__ushort_as_half(bits)) * 256.f;
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(&raw[e / L::kVec])[(e % L::kVec) / 2];
    return __uint_as_float(e % 2 == 0 ? word << 16 : word & 0xffff0000u);
  } else {
    return to_float(reinterpret_cast<const T*>(&raw[e / L::kVec])[e % L::kVec]);
  }
}

// The partition's slice of the block table, staged in shared memory once as row offsets, so that
// finding a row inside the key loops costs no dependent global load, no 64-bit multiply and (for
// power-of-two block sizes, the usual case) no integer division.
struct PartitionBlocks {
  const int64_t* base;  // base[j]: offset of the CTA's KV head in row 0 of the block of tokens
                        // [(first + j) * block_size, ...)
  int first;
  int block_size;
  int block_shift;      // log2(block_size), or -1 when it is not a power of two
  int64_t token_stride;  // elements between consecutive tokens of a block (kv_heads * head_dim)
};

// Offset of key `t`'s row for the CTA's KV head.
__device__ __forceinline__ int64_t row_offset(const PartitionBlocks& blocks, int t) {
  const int j = blocks.block_shift >= 0 ? t >> blocks.block_shift : t / blocks.block_size;
  return blocks.base[j - blocks.first] + static_cast<int64_t>(t - j * blocks.block_size) * blocks.token_stride;
}

// The kUnroll rows a lane reads from `base` on (rows base + u * kStride + row_in_warp of the
// partition), raw; rows at or past n read as zeros. Both the key and the value pass use it.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_rows(const T* cache, const PartitionBlocks& table, int t0, int n, int base,
                                          int row_in_warp, int lane_in_row,
                                          typename RowLayout<T, kHeadDim>::Chunk (&out)[kUnroll][RowLayout<T, kHeadDim>::kChunksPerLane]) {
  using L = RowLayout<T, kHeadDim>;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int i = base + u * L::kStride + row_in_warp;
    load_row<T, kHeadDim>(cache, i < n ? row_offset(table, t0 + i) : 0, i < n, lane_in_row, out[u]);
  }
}

// The scale of key / value row `t` of a quantized cache (one per token and KV head: the row's offset
// in elements over head_dim), or 1.
template <typename C, int kHeadDim>
__device__ __forceinline__ float row_scale(const float* scales, const PartitionBlocks& table, int t) {
  if constexpr (kQuantized<C>) {
    return scales[row_offset(table, t) / kHeadDim];
  } else {
    return 1.f;
  }
}

// Scores of this CTA's kHeads query heads against keys [t0, t0 + n): logits[h][i], scaled. C: the
// cache's element type.
template <typename C, int kHeadDim, int kHeads>
__device__ __forceinline__ void compute_logits(const PagedDecodeParams& p, const float* q_s,
                                               const PartitionBlocks& table, int t0, int n, float* logits) {
  using L = RowLayout<C, kHeadDim>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_warp = lane / L::kLanes, lane_in_row = lane % L::kLanes;
  // Each lane keeps the query elements matching the key elements it loads: no shared-memory
  // traffic inside the loop over keys.
  float q[kHeads][L::kElems];
#pragma unroll
  for (int h = 0; h < kHeads; ++h)
#pragma unroll
    for (int e = 0; e < L::kElems; ++e) {
      const int d = (lane_in_row + (e / L::kVec) * L::kLanes) * L::kVec + e % L::kVec;
      q[h][e] = d < kHeadDim ? q_s[h * kHeadDim + d] : 0.f;
    }
  const C* k_cache = static_cast<const C*>(p.k_cache);
  // The loop bound is uniform per warp so every lane reaches the shuffles below.
  for (int base = warp * L::kKeysPerWarp; base < n; base += L::kStride * kUnroll) {
    typename L::Chunk k[kUnroll][L::kChunksPerLane];
    load_rows<C, kHeadDim>(k_cache, table, t0, n, base, row_in_warp, lane_in_row, k);
    float dots[kUnroll * kHeads];  // this lane's share of row u's dot with head h at [u * kHeads + h]
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) dot += q[h][e] * row_element<C, kHeadDim>(k[u], e);
        dots[u * kHeads + h] = dot;
      }
    bool writer;
    const int first = reduce_scatter<kUnroll * kHeads, L::kLanes>(dots, lane_in_row, writer);
    constexpr int kSums = kUnroll * kHeads > L::kLanes ? kUnroll * kHeads / L::kLanes : 1;
#pragma unroll
    for (int j = 0; j < kSums; ++j) {
      const int u = (first + j) / kHeads, h = (first + j) % kHeads;
      const int i = base + u * L::kStride + row_in_warp;
      if (i < n && writer) logits[h * kSpanKeys + i] = dots[j] * row_scale<C, kHeadDim>(p.k_scale, table, t0 + i);
    }
  }
}

// In place: logits -> exp(logit - max); one warp per head. Returns nothing: max and sum go to smem.
template <int kHeads>
__device__ __forceinline__ void softmax_numerators(float* logits, int n, float* head_max, float* head_sum) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < kHeads; h += kWarps) {
    float* row = logits + h * kSpanKeys;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, row[i]);
    m = warp_max(m);
    float s = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float e = expf(row[i] - m);
      row[i] = e;
      s += e;
    }
    s = warp_sum(s);
    if (lane == 0) {
      head_max[h] = m;
      head_sum[h] = s;
    }
  }
}

// sum_i probs[h][i] * v_i for this warp's rows, reduced over the rows a warp reads at once, and
// stored per warp into `warp_out` [kWarps][kHeads][kHeadDim] (which may alias `probs`).
template <typename C, int kHeadDim, int kHeads>
__device__ __forceinline__ void accumulate_values(const PagedDecodeParams& p, const float* probs,
                                                  const PartitionBlocks& table, int t0, int n, float* warp_out) {
  using L = RowLayout<C, kHeadDim>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_warp = lane / L::kLanes, lane_in_row = lane % L::kLanes;
  float acc[kHeads][L::kElems] = {};
  const C* v_cache = static_cast<const C*>(p.v_cache);
  for (int base = warp * L::kKeysPerWarp; base < n; base += L::kStride * kUnroll) {
    typename L::Chunk v[kUnroll][L::kChunksPerLane];
    load_rows<C, kHeadDim>(v_cache, table, t0, n, base, row_in_warp, lane_in_row, v);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * L::kStride + row_in_warp;
      const float v_scale = i < n ? row_scale<C, kHeadDim>(p.v_scale, table, t0 + i) : 0.f;
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const float prob = i < n ? probs[h * kSpanKeys + i] * v_scale : 0.f;
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) acc[h][e] += prob * row_element<C, kHeadDim>(v[u], e);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < kHeads; ++h)
#pragma unroll
    for (int e = 0; e < L::kElems; ++e)
#pragma unroll
      for (int offset = L::kLanes; offset < 32; offset <<= 1)
        acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], offset);
  __syncthreads();  // every warp has read `probs`: the buffer becomes warp_out
  if (row_in_warp == 0) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h)
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) {
        const int d = (lane_in_row + (e / L::kVec) * L::kLanes) * L::kVec + e % L::kVec;
        if (d < kHeadDim) warp_out[(warp * kHeads + h) * kHeadDim + d] = acc[h][e];
      }
  }
}

// Keys [t0, t0 + n) of partitions [rel, rel + count) (relative to the range's first partition).
struct PartitionSpan {
  int t0, n;
};

__device__ __forceinline__ PartitionSpan partition_span(const DecodeRange& r, int rel, int count) {
  const int part = r.first_part + rel;
  const int t0 = max(part * kDecodePartitionSize, r.start);
  return {t0, min((part + count) * kDecodePartitionSize, r.len) - t0};
}

// Split z's partitions: a contiguous, balanced share [begin, end) of the sequence's, so that a
// split's consecutive partitions form spans. Non-empty for z < min(num_parts, splits) (the
// partition merge counts on the first min(num_parts, splits) splits holding results).
struct SplitRange {
  int begin, end;
};

__device__ __forceinline__ SplitRange split_range(int num_parts, int z, int splits) {
  const int used = min(num_parts, splits);
  return {z * num_parts / used, (z + 1) * num_parts / used};
}

// The span of the split's partitions starting at `rel`: up to MAGA_DECODE_SPAN_PARTITIONS of them.
__device__ __forceinline__ PartitionSpan span_at(const DecodeRange& r, const SplitRange& mine, int rel) {
  return partition_span(r, rel, min(MAGA_DECODE_SPAN_PARTITIONS, mine.end - rel));
}

// Stages a span's slice of the block table as row offsets (PartitionBlocks::base). The caller
// synchronizes before the rows are used.
__device__ __forceinline__ void stage_partition_rows(const PartitionSpan& span, const int32_t* row_table,
                                                     int block_size, int64_t token_stride, int64_t head_offset,
                                                     int64_t* block_base) {
  const int first_block = span.t0 / block_size;
  for (int j = threadIdx.x; j <= (span.t0 + span.n - 1) / block_size - first_block; j += kThreads)
    block_base[j] = static_cast<int64_t>(row_table[first_block + j]) * block_size * token_stride + head_offset;
}

template <int kHeadDim, int kHeads>
constexpr int smem_floats() {
  return kHeads * kHeadDim + (kHeads * kSpanKeys > kWarps * kHeads * kHeadDim
                                  ? kHeads * kSpanKeys
                                  : kWarps * kHeads * kHeadDim);
}

// Grid: (sequence, kv head x chunk of kHeads query heads sharing it, split). Sharing the CTA
// between the query heads of one KV head reads each key and value row once for all of them. Split
// z takes a contiguous share of the partitions (split_range), a span of up to
// MAGA_DECODE_SPAN_PARTITIONS of them at a time, and merges the spans in registers (online softmax).
template <typename T, typename C, int kHeadDim, int kHeads, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) paged_decode_kernel(const PagedDecodeParams p) {
  extern __shared__ float smem[];
  __shared__ float head_max[kHeads], head_sum[kHeads];  // this partition's
  __shared__ float run_max[kHeads], run_sum[kHeads];    // the split's so far
  // A span covers at most kSpanKeys + 1 blocks (block_size 1, or a misaligned start).
  __shared__ int64_t block_base[kSpanKeys + 1];
  allow_downstream_launch();
  constexpr int kPerThread = (kHeads * kHeadDim + kThreads - 1) / kThreads;
  float* q_s = smem;                     // [kHeads][kHeadDim], pre-scaled
  float* work = smem + kHeads * kHeadDim;  // logits, then per-warp outputs
  const int seq = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks_per_kv = group / kHeads;
  const int kv_head = blockIdx.y / chunks_per_kv;
  const int head0 = kv_head * group + (blockIdx.y % chunks_per_kv) * kHeads;
  // Lengths and block tables are step metadata, which no kernel of ours writes: they are read, and
  // the first partition's rows located, before waiting for the previous kernel (launch.cuh).
  const DecodeRange r = decode_range(p.seq_lens[seq], p.sliding_window);
  if (r.num_parts > 0 && static_cast<int>(blockIdx.z) >= r.num_parts) return;  // nothing to read or write
  const int32_t* row_table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const int block_shift = (p.block_size & (p.block_size - 1)) == 0 ? __ffs(p.block_size) - 1 : -1;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kHeadDim;
  const SplitRange mine = r.num_parts > 0 ? split_range(r.num_parts, blockIdx.z, gridDim.z) : SplitRange{0, 0};
  if (r.num_parts > 0)
    stage_partition_rows(span_at(r, mine, mine.begin), row_table, p.block_size, token_stride, head_offset, block_base);
  wait_for_upstream();
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(seq) * p.num_heads + head0) * kHeadDim;
  if (r.num_parts <= 0) {  // no keys: defined output rather than garbage
    if (blockIdx.z == 0)
      for (int i = threadIdx.x; i < kHeads * kHeadDim; i += kThreads) out[i] = from_float<T>(0.f);
    return;
  }

  const T* q = static_cast<const T*>(p.q) + seq * p.q_seq_stride;
  for (int i = threadIdx.x; i < kHeads * kHeadDim; i += kThreads)
    q_s[i] = to_float(q[(head0 + i / kHeadDim) * p.q_head_stride + i % kHeadDim]) * p.scale;
  float o_run[kPerThread];  // this thread's elements i = threadIdx.x + k * kThreads of [kHeads][kHeadDim]
  for (int rel = mine.begin; rel < mine.end; rel += MAGA_DECODE_SPAN_PARTITIONS) {
    const bool first = rel == mine.begin;
    const PartitionSpan span = span_at(r, mine, rel);
    const int t0 = span.t0, n = span.n;
    const PartitionBlocks table{block_base, t0 / p.block_size, p.block_size, block_shift, token_stride};
    if (!first) stage_partition_rows(span, row_table, p.block_size, token_stride, head_offset, block_base);
    __syncthreads();
    compute_logits<C, kHeadDim, kHeads>(p, q_s, table, t0, n, work);
    __syncthreads();
    softmax_numerators<kHeads>(work, n, head_max, head_sum);
    __syncthreads();
    accumulate_values<C, kHeadDim, kHeads>(p, work, table, t0, n, work);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int i = threadIdx.x + k * kThreads;
      if (i >= kHeads * kHeadDim) break;
      const int h = i / kHeadDim, d = i % kHeadDim;
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += work[(w * kHeads + h) * kHeadDim + d];
      if (first) {
        o_run[k] = o;
      } else {
        const float m = fmaxf(run_max[h], head_max[h]);
        o_run[k] = o_run[k] * expf(run_max[h] - m) + o * expf(head_max[h] - m);
      }
    }
    __syncthreads();  // every thread has read run_max before it moves
    if (threadIdx.x < kHeads) {
      const int h = threadIdx.x;
      if (first) {
        run_max[h] = head_max[h];
        run_sum[h] = head_sum[h];
      } else {
        const float m = fmaxf(run_max[h], head_max[h]);
        run_sum[h] = run_sum[h] * expf(run_max[h] - m) + head_sum[h] * expf(head_max[h] - m);
        run_max[h] = m;
      }
    }
    __syncthreads();  // before the next partition overwrites block_base, work and head_max
  }

  const bool single = min(r.num_parts, static_cast<int>(gridDim.z)) == 1;
  const int64_t part_row = (static_cast<int64_t>(seq) * p.num_heads + head0) * p.num_splits + blockIdx.z;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i >= kHeads * kHeadDim) break;
    const int h = i / kHeadDim, d = i % kHeadDim;
    const float o = o_run[k] / run_sum[h];
    if (single) out[i] = from_float<T>(o);
    else p.partial_out[(part_row + static_cast<int64_t>(h) * p.num_splits) * kHeadDim + d] = o;
  }
  if (!single && threadIdx.x < kHeads) {
    p.partial_max[part_row + threadIdx.x * p.num_splits] = run_max[threadIdx.x];
    p.partial_sum[part_row + threadIdx.x * p.num_splits] = run_sum[threadIdx.x];
  }
}

template <typename T, typename C, int kHeadDim, int kHeads>
cudaError_t launch(const PagedDecodeParams& p, cudaStream_t stream) {
  const int chunks_per_kv = p.num_heads / p.num_kv_heads / kHeads;
  const dim3 grid(p.num_seqs, p.num_kv_heads * chunks_per_kv, p.num_splits);
  constexpr size_t smem = smem_floats<kHeadDim, kHeads>() * sizeof(float);
  static_assert(smem <= 48 * 1024, "keep under the default dynamic shared-memory limit");
  const auto kernel = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads >= kBandwidthBoundPairs
                          ? paged_decode_kernel<T, C, kHeadDim, kHeads, MAGA_DECODE_MIN_BLOCKS>
                          : paged_decode_kernel<T, C, kHeadDim, kHeads, 1>;
  cudaError_t err = launch_kernel(kernel, grid, dim3(kThreads), smem, stream, p);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_paged_decode_reduce(p, stream);
}

// Query heads per CTA: the largest of 8/4/2/1 dividing the GQA group (8 caps the registers).
template <typename T, typename C, int kHeadDim>
cudaError_t dispatch_heads(const PagedDecodeParams& p, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  if (group % 8 == 0) return launch<T, C, kHeadDim, 8>(p, stream);
  if (group % 4 == 0) return launch<T, C, kHeadDim, 4>(p, stream);
  if (group % 2 == 0) return launch<T, C, kHeadDim, 2>(p, stream);
  return launch<T, C, kHeadDim, 1>(p, stream);
}

template <typename T, typename C>
cudaError_t dispatch_head_dim(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return dispatch_heads<T, C, 64>(p, stream);
    case 80: return dispatch_heads<T, C, 80>(p, stream);
    case 96: return dispatch_heads<T, C, 96>(p, stream);
    case 128: return dispatch_heads<T, C, 128>(p, stream);
    case 256: return dispatch_heads<T, C, 256>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// The cache's element type: the query's, or int8 / e4m3 with scales (fp16 / bf16 queries only).
template <typename T>
cudaError_t dispatch_cache(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.cache_dtype == p.dtype) return dispatch_head_dim<T, T>(p, stream);
  if constexpr (sizeof(T) == 2) {
    if (p.cache_dtype == DType::kInt8) return dispatch_head_dim<T, int8_t>(p, stream);
    if (p.cache_dtype == DType::kFloat8E4M3) return dispatch_head_dim<T, __nv_fp8_e4m3>(p, stream);
  }
  return cudaErrorInvalidValue;
}

bool valid_params(const PagedDecodeParams& p) {
  const bool shapes = p.num_seqs > 0 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
                      p.block_size > 0 && p.max_blocks_per_seq > 0 && p.num_splits > 0 &&
                      p.num_splits <= 65535 && p.num_seqs <= 0x7fffffff;
  const bool workspace = p.num_splits == 1 || (p.partial_out && p.partial_max && p.partial_sum);
  const bool quantized = p.cache_dtype == DType::kInt8 || p.cache_dtype == DType::kFloat8E4M3;
  const bool scales = !quantized || (p.k_scale && p.v_scale);
  return shapes && workspace && scales && paged_decode_supports_head_dim(p.head_dim);
}

}  // namespace

bool paged_decode_supports_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

cudaError_t paged_decode_attention(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (!valid_params(p)) return cudaErrorInvalidValue;
  if (paged_decode_stream_applies(p)) return launch_paged_decode_stream(p, stream);
  return dispatch_dtype(p.dtype, [&](auto tag) { return dispatch_cache<decltype(tag)>(p, stream); });
}

}  // namespace cuda
}  // namespace th_transformer
