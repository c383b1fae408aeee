// Multi-tensor launcher in the spirit of apex / ATen MultiTensorApply, torch-free.
//
// Tensor addresses and sizes travel in the kernel argument (a struct kept under the 4 KB
// parameter limit); the work is cut into fixed chunks of CHUNK elements, one thread block
// per chunk, and one launch covers up to MAX_TENSORS tensors / MAX_BLOCKS chunks. Each
// block also owns one slot of a `partials` array (its global chunk index), so reductions
// (the penalty value) are summed later in a fixed order: deterministic by construction.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mas_fast_kernels.h"

namespace mas_fast {
namespace cuda {

template <typename T> struct Type { using type = T; };

// Calls body(Type<P>{}) for the device type P of a parameter dtype.
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::f32: return body(Type<float>{});
    case DType::f64: return body(Type<double>{});
    case DType::bf16: return body(Type<__nv_bfloat16>{});
    case DType::f16: return body(Type<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Math type of a parameter type: fp64 stays fp64, everything else computes in fp32.
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::f32; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::f64; };
template <> struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::bf16; };
template <> struct DTypeOf<__half> { static constexpr DType value = DType::f16; };

// Calls body(Type<X>{}) or body(Type<Y>{}), whichever `dtype` names (one instantiation when X is Y).
template <typename X, typename Y, typename Body>
cudaError_t dispatch_either(DType dtype, Body&& body) {
  if (dtype == DTypeOf<X>::value) return body(Type<X>{});
  if (dtype == DTypeOf<Y>::value) return body(Type<Y>{});
  return cudaErrorInvalidValue;
}

// Calls body(Type<P>{}, Type<TS>{}, Type<OM>{}) for the device types of the parameters, θ*
// (their math type or P) and Ω (the math type or bf16) of `dtypes` (mas_fast_kernels.h).
template <typename Body>
cudaError_t dispatch_dtypes(const DTypes& dtypes, Body&& body) {
  return dispatch_dtype(dtypes.param, [&](auto param) {
    using P = typename decltype(param)::type;
    using M = typename MathOf<P>::type;
    return dispatch_either<M, P>(dtypes.theta_star, [&](auto star) {
      return dispatch_either<M, __nv_bfloat16>(dtypes.omega, [&](auto omega) { return body(param, star, omega); });
    });
  });
}

constexpr int kChunk = 65536;     // elements per block
constexpr int kThreads = 512;
constexpr int kILP = 4;           // elements per thread per step: 128-bit loads for fp32

// Tensor/block counts per launch that keep TensorListMeta<DEPTH> under the 4 KB kernel
// parameter limit: 320 blocks cost 6 bytes each, a tensor 8 bytes per list plus its size.
template <int DEPTH> struct Limits {
  static constexpr int blocks = 320;
  static constexpr int tensors = (4000 - 8 - blocks * 6) / (8 * DEPTH + 8);
  static_assert(tensors >= 16, "too many tensor lists for one launch");
};

template <int DEPTH>
struct TensorListMeta {
  void* addresses[DEPTH][Limits<DEPTH>::tensors];
  int64_t sizes[Limits<DEPTH>::tensors];
  int16_t block_to_tensor[Limits<DEPTH>::blocks];
  int32_t block_to_chunk[Limits<DEPTH>::blocks];
  int64_t first_global_chunk;  // global index of this launch's first block (for partials)
};

// Scalar conversions between storage types and the fp32/fp64 math type.
template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename M> __device__ __forceinline__ T from_math(M v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_math<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

template <typename M, typename T> __device__ __forceinline__ M load_as(const T* p) {
  return static_cast<M>(to_float(*p));
}
template <> __device__ __forceinline__ double load_as<double, double>(const double* p) { return *p; }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ILP contiguous elements as one or two wide accesses: aligned to at most 16 bytes (the widest
// sm_80/sm_90 access, and what the callers check), so 4 doubles are two 128-bit accesses.
template <typename T>
struct alignas(sizeof(T) * kILP < 16 ? sizeof(T) * kILP : 16) Pack {
  T v[kILP];
};

// Copies ILP contiguous elements with wide accesses when the caller checked alignment.
template <typename T>
__device__ __forceinline__ void load_ilp(T (&dst)[kILP], const T* src) {
  const Pack<T> p = *reinterpret_cast<const Pack<T>*>(src);
#pragma unroll
  for (int i = 0; i < kILP; ++i) dst[i] = p.v[i];
}
template <typename T>
__device__ __forceinline__ void store_ilp(T* dst, const T (&src)[kILP]) {
  Pack<T> p;
#pragma unroll
  for (int i = 0; i < kILP; ++i) p.v[i] = src[i];
  *reinterpret_cast<Pack<T>*>(dst) = p;
}

// One step of a thread over a chunk of n elements: kILP elements, read and written together.
// Vectorised: kILP contiguous elements as 128-bit packs (every pointer 16-byte aligned and n a
// multiple of kILP). Otherwise apex's scalar layout: element j sits j·blockDim.x after the
// first, so each of the kILP accesses is coalesced across the warp.
struct IlpSlot {
  int64_t base, stride, n;
  bool vec;

  __device__ __forceinline__ bool valid(int j) const { return base + j * stride < n; }

  // r[j] ← p[element j] for valid j; nothing for an absent list (p == nullptr).
  template <typename T>
  __device__ __forceinline__ void load(T (&r)[kILP], const T* p) const {
    if (p == nullptr) return;
    if (vec) {
      if (base < n) load_ilp(r, p + base);
      return;
    }
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (valid(j)) r[j] = p[base + j * stride];
  }

  template <typename T>
  __device__ __forceinline__ void store(T* p, const T (&r)[kILP]) const {
    if (p == nullptr) return;
    if (vec) {
      if (base < n) store_ilp(p + base, r);
      return;
    }
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (valid(j)) p[base + j * stride] = r[j];
  }
};

// Calls f(slot) for each of this thread's steps over a chunk of n elements.
template <typename F>
__device__ __forceinline__ void for_each_slot(int64_t n, bool vec, F&& f) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * kILP;
  for (int64_t start = 0; start < n; start += step) {
    const IlpSlot slot{vec ? start + static_cast<int64_t>(threadIdx.x) * kILP : start + threadIdx.x,
                       vec ? 1 : static_cast<int64_t>(blockDim.x), n, vec};
    f(slot);
  }
}

// Ω(θ − θ*)² in fp64: Ω near the fp32 limit times a squared step of 2 would overflow fp32,
// although λ·Σ fits (the CPU kernels and the reference do the same).
template <typename W, typename D>
__device__ __forceinline__ double penalty_term(W omega, D d) {
  return static_cast<double>(omega) * static_cast<double>(d) * static_cast<double>(d);
}

// Block-wide sum of one double per thread; result valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// Runs `op(chunk_pointers, start, n, vectorised) -> double` per block and stores the block's
// partial sum (when partials != nullptr).
template <int DEPTH, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorListMeta<DEPTH> meta, Op op,
                                                                  double* partials) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  const int64_t start = chunk * kChunk;
  const int64_t n = min(static_cast<int64_t>(kChunk), meta.sizes[t] - start);
  void* ptrs[DEPTH];
  bool vec = (n % kILP) == 0;
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    ptrs[d] = meta.addresses[d][t];
    vec = vec && (ptrs[d] == nullptr || aligned16(ptrs[d]));
  }
  double acc = op(ptrs, start, n, vec);
  if (partials != nullptr) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[meta.first_global_chunk + blockIdx.x] = acc;
  }
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Total chunks (= partial slots) over a list of tensors.
inline int64_t total_chunks(int64_t n, const int64_t* numels) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += chunks_of(numels[i]);
  return c;
}

// Host side: pack tensors and chunks into launches of at most Limits<DEPTH> each.
// ptrs[d][i] is the address of list d's tensor i (nullptr allowed for an absent list).
template <int DEPTH, typename Op>
cudaError_t launch_multi_tensor(int64_t n, void* const* const* ptrs, const int64_t* numels, Op op,
                                double* partials, cudaStream_t stream) {
  TensorListMeta<DEPTH> meta;
  int tensors = 0, blocks = 0;
  int64_t global_chunk = 0;
  meta.first_global_chunk = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][tensors] = ptrs[d] ? ptrs[d][i] : nullptr;
    meta.sizes[tensors] = numels[i];
    ++tensors;
    const int64_t chunks = chunks_of(numels[i]);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<int16_t>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool full = blocks == Limits<DEPTH>::blocks ||
                        (last_chunk && tensors == Limits<DEPTH>::tensors) || (last_chunk && i == n - 1);
      if (full) {
        multi_tensor_kernel<DEPTH, Op><<<blocks, kThreads, 0, stream>>>(meta, op, partials);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        global_chunk += blocks;
        meta.first_global_chunk = global_chunk;
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the current tensor continues in the next launch
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][tensors - 1];
          meta.sizes[0] = meta.sizes[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {  // trailing zero-size tensors may leave a partly filled launch
    multi_tensor_kernel<DEPTH, Op><<<blocks, kThreads, 0, stream>>>(meta, op, partials);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mas_fast
