// Fiber scheduler of the CUDA emulator (see include/emulator.h): one ucontext per thread of
// the running block; a thread that reaches a barrier yields, and the scheduler releases a
// barrier once every live thread of its group (the block, or one warp) waits at it.
#include <ucontext.h>

#include <csetjmp>
#include <csignal>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "emulator.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {
namespace {

constexpr int kWarp = 32;
constexpr int kBlockBarrier = -1;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxParamBytes = 4096;  // the classic kernel parameter limit the launcher keeps under

enum class State { kReady, kWaiting, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
  int barrier = 0;    // kBlockBarrier, or the warp index while waiting in a shuffle
  unsigned mask = 0;  // the lanes the shuffle names
};

std::mutex launch_mutex;  // ctypes releases the GIL: one emulated launch at a time
ucontext_t scheduler;
std::vector<Fiber> fibers;
int current = 0;
const std::function<void()>* body = nullptr;
uint64_t shuffle_slots[1024];
std::string first_failure;
sigjmp_buf fault_jump;  // where a memory fault in a kernel returns to
cudaError_t pending = cudaSuccess;

void fail(cudaError_t err, const std::string& what) {
  if (first_failure.empty()) first_failure = what;
  if (pending == cudaSuccess) pending = err;
}

std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// A misaligned vector access or a wild pointer faults like on a GPU (illegal address): the
// handler leaves the kernel for run_grid, which reports the thread and block.
void on_fault(int signal) { siglongjmp(fault_jump, signal); }

void trampoline() {
  (*body)();
  fibers[current].state = State::kDone;
}  // uc_link returns to the scheduler

void wait_at(int barrier) {
  Fiber& f = fibers[current];
  f.state = State::kWaiting;
  f.barrier = barrier;
  swapcontext(&f.context, &scheduler);
}

// A shuffle is defined only when every lane its mask names takes part in it.
void check_masks(int begin, int end) {
  for (int t = begin; t < end; ++t) {
    if (fibers[t].state != State::kWaiting) continue;
    for (int lane = 0; lane < kWarp; ++lane) {
      if (!(fibers[t].mask >> lane & 1u)) continue;
      if (begin + lane >= end || fibers[begin + lane].state != State::kWaiting)
        fail(cudaErrorLaunchFailure, "__shfl_down_sync in " + block_name() + ": the mask names lane " +
                                         std::to_string(lane) + " of warp " + std::to_string(begin / kWarp) +
                                         ", which does not exist or has exited");
    }
  }
}

// Releases the block barrier or a warp's, when all their live threads wait there.
bool release(int threads) {
  bool released = false;
  auto try_group = [&](int begin, int end, int barrier) {
    bool live = false;
    for (int t = begin; t < end; ++t) {
      if (fibers[t].state == State::kDone) continue;
      live = true;
      if (fibers[t].state != State::kWaiting || fibers[t].barrier != barrier) return;
    }
    if (!live) return;
    if (barrier != kBlockBarrier) check_masks(begin, end);
    for (int t = begin; t < end; ++t)
      if (fibers[t].state == State::kWaiting) fibers[t].state = State::kReady;
    released = true;
  };
  try_group(0, threads, kBlockBarrier);
  for (int w = 0; w * kWarp < threads; ++w) try_group(w * kWarp, std::min(threads, (w + 1) * kWarp), w);
  return released;
}

// Runs one block to completion; false on a deadlock.
bool run_block(int threads) {
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, trampoline, 0);
    f.state = State::kReady;
  }
  for (;;) {
    bool live = false;
    for (int t = 0; t < threads; ++t) {
      if (fibers[t].state == State::kReady) {
        current = t;
        threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
        swapcontext(&scheduler, &fibers[t].context);
      }
      live = live || fibers[t].state != State::kDone;
    }
    if (!live) return true;
    if (!release(threads)) {
      fail(cudaErrorLaunchFailure, "deadlock in " + block_name() +
                                       ": live threads wait at different barriers (divergent __syncthreads or "
                                       "shuffle?)");
      return false;
    }
  }
}

// Blocks in order, x fastest; a deadlock ends the grid.
void run_blocks(dim3 grid, int threads) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        if (!run_block(threads)) return;
      }
}

}  // namespace

uint64_t shuffle_down(unsigned mask, uint64_t value, unsigned delta) {
  const int lane = current % kWarp, warp = current / kWarp;
  if (!(mask >> lane & 1u)) fail(cudaErrorLaunchFailure, "__shfl_down_sync called by a lane outside its mask");
  fibers[current].mask = mask;
  shuffle_slots[current] = value;
  wait_at(warp);
  const int source = lane + static_cast<int>(delta);
  const uint64_t result = source < kWarp ? shuffle_slots[warp * kWarp + source] : value;
  wait_at(warp);  // nobody overwrites a slot before every lane has read
  return result;
}

void run_grid(dim3 grid, dim3 block, size_t shared_bytes, size_t param_bytes, const std::function<void()>& kernel) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "invalid launch configuration: grid (" + std::to_string(grid.x) + "," +
                                            std::to_string(grid.y) + "," + std::to_string(grid.z) + "), block (" +
                                            std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                                            std::to_string(block.z) + ")");
    return;
  }
  if (param_bytes > kMaxParamBytes) {
    fail(cudaErrorInvalidValue, "kernel parameters take " + std::to_string(param_bytes) + " bytes (limit " +
                                    std::to_string(kMaxParamBytes) + ")");
    return;
  }
  if (shared_bytes != 0) {
    fail(cudaErrorInvalidValue, "dynamic shared memory is not emulated");
    return;
  }
  if (fibers.size() < threads) fibers.resize(threads);
  gridDim = grid;
  blockDim = block;
  body = &kernel;
  struct sigaction action = {}, old_segv, old_bus;
  action.sa_handler = on_fault;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &old_segv);
  sigaction(SIGBUS, &action, &old_bus);
  if (const int signal = sigsetjmp(fault_jump, 1); signal != 0) {
    fail(cudaErrorIllegalAddress, "illegal memory access (signal " + std::to_string(signal) + ") by thread " +
                                      std::to_string(current) + " of " + block_name());
  } else {
    run_blocks(grid, static_cast<int>(threads));
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
}

const char* failure() { return first_failure.c_str(); }

void reset() {
  first_failure.clear();
  pending = cudaSuccess;
}

}  // namespace emu

void __syncthreads() { emu::wait_at(emu::kBlockBarrier); }

cudaError_t cudaGetLastError() {  // launch errors are not sticky: reading one clears it
  const cudaError_t err = emu::pending;
  emu::pending = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
  }
  return "unknown error";
}

float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}

__half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE round-to-nearest-even
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}

float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

__nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};  // stays a quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return {static_cast<uint16_t>(bits >> 16)};
}
