// A CPU emulator of the CUDA subset csrc/cuda uses, so that CI (no GPU) executes the real
// kernel sources: every block runs its threads as fibers on one OS thread, with
// __syncthreads and warp shuffles as barriers. It checks what a GPU would reject or leave
// undefined: launch configurations, kernel parameter size, memory faults (an aligned vector
// type at a misaligned address faults on x86 too), barriers not reached by all live threads
// (deadlock), shuffles naming exited lanes. It says nothing about speed or the memory model,
// and a shuffle must have its whole warp take part. tests/cuda_emulator/__init__.py
// builds it; tests/test_cuda_emulated.py runs it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another, so one static per declaration is the block's shared memory.
#define __shared__ static

using std::max;  // CUDA's device overloads of min/max
using std::min;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

// Storage-only half types with round-to-nearest-even conversions, like cuda_fp16/cuda_bf16.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
float __half2float(__half h);
__half __float2half_rn(float f);
float __bfloat162float(__nv_bfloat16 h);
__nv_bfloat16 __float2bfloat16_rn(float f);

void __syncthreads();

namespace emu {
uint64_t shuffle_down(unsigned mask, uint64_t value, unsigned delta);

// Runs body once per thread of every block; param_bytes is the kernel's argument size.
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, size_t param_bytes, const std::function<void()>& body);

template <class... P>
constexpr size_t param_bytes() {  // the kernel argument buffer, laid out like a C struct
  size_t offset = 0;
  ((offset = (offset + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return offset;
}

// What `kernel<<<grid, block, shared, stream>>>(args...)` becomes (see the build's rewrite).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, A&&... args) {
  std::tuple<std::decay_t<P>...> params(static_cast<P>(std::forward<A>(args))...);
  run_grid(grid, block, shared_bytes, param_bytes<P...>(), [&] { std::apply(kernel, params); });
}

// The first problem the emulator found since the last reset ("" when none).
const char* failure();
void reset();
}  // namespace emu

template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  uint64_t in = 0;
  std::memcpy(&in, &value, sizeof(T));
  const uint64_t out = emu::shuffle_down(mask, in, delta);
  T result;
  std::memcpy(&result, &out, sizeof(T));
  return result;
}
