// Kernels with the faults the emulator must catch (its own tests, tests/test_cuda_emulated.py).
#include <cuda_runtime.h>

namespace {

__global__ void shuffle_with_exited_lanes(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void barrier_beside_shuffle(float* out) {  // lane 0 waits for the block, its warp for lane 0
  float v = 1.0f;
  if (threadIdx.x == 0) __syncthreads();
  else v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

struct Huge {
  char bytes[5000];
};
__global__ void huge_parameters(Huge, float* out) { out[threadIdx.x] = 1.0f; }

__global__ void write_thread_index(float* out) {  // a correct kernel, to check the launch grid
  out[(blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x] = static_cast<float>(threadIdx.x);
}

}  // namespace

extern "C" int emu_fault(int which, float* out) {
  emu::reset();
  switch (which) {
    case 0: shuffle_with_exited_lanes<<<1, 64, 0, nullptr>>>(out); break;
    case 1: barrier_beside_shuffle<<<1, 32, 0, nullptr>>>(out); break;
    case 2: huge_parameters<<<1, 32, 0, nullptr>>>(Huge{}, out); break;
    case 3: write_thread_index<<<1, 2048, 0, nullptr>>>(out); break;
    case 4: write_thread_index<<<dim3(3, 2), 64, 0, nullptr>>>(out); break;
  }
  return cudaGetLastError();
}
