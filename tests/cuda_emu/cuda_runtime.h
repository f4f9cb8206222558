// CPU emulation of the small part of CUDA that csrc/cuda/memft_cuda.cu uses, so that the unmodified
// kernel source compiles as C++ (g++ -x c++ -I tests/cuda_emu) and runs on the host under ASan/UBSan
// (tests/test_cuda_emulated.py). Not a CUDA implementation: only what that file needs.
//
// Execution model of emu::launch: the blocks of a grid run one after another; the threads of a
// block are real OS threads (a reused pool) that run concurrently. __syncthreads() is a block-wide
// barrier; __shfl_down_sync publishes the lane's value and waits for the k-th value of the lane it
// reads (shuffles match by their order in each lane, as in a converged warp). A __syncthreads()
// reached after another thread of the block returned, a thread returning while others wait at one,
// or a shuffle reading a lane that returned aborts with a message instead of hanging. __shared__
// variables are function-local statics: blocks never overlap, so one copy per kernel instantiation
// is the block's shared memory. It is not cleared between blocks (GCC ignores section attributes
// on statics of function templates, so the emulator cannot find it to poison it): a read before a
// write in the same block sees the previous block's (another row's) values, or zeros in the first.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

// ------------------------------------------------------------------------------ vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 must be a 16-byte aligned type");

constexpr int warpSize = 32;

template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T __ldg(const T* p) { return *p; }

// ------------------------------------------------------------------------------ runtime API stubs
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorInvalidValue = 1 };

namespace emu {
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "invalid argument (emulated)";
  }
}

// ------------------------------------------------------------------------------ the emulator
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "CUDA-EMU ERROR: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

// A barrier over `expected` threads that knows which of them have returned from the kernel. The
// arrival count (low 32 bits) and the count of returned threads (high 32) share one atomic word,
// so "a thread waits at a barrier another one will never reach" is caught whichever comes first.
class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}
  void wait(const char* what) {
    const uint32_t phase = phase_.load(std::memory_order_acquire);  // cannot move on without us
    const uint64_t s = state_.fetch_add(1, std::memory_order_acq_rel);
    if (s >> 32) fatal(what);  // some thread of the group returned and will never arrive
    if ((s & 0xffffffffu) + 1 == static_cast<uint64_t>(expected_)) {
      state_.fetch_sub(expected_, std::memory_order_acq_rel);
      phase_.fetch_add(1, std::memory_order_acq_rel);
      phase_.notify_all();
      return;
    }
    while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase, std::memory_order_acquire);
  }
  void exit(const char* what) {
    const uint64_t s = state_.fetch_add(uint64_t{1} << 32, std::memory_order_acq_rel);
    if (s & 0xffffffffu) fatal(what);  // others wait at a barrier this thread skipped
  }

 private:
  const int expected_;
  std::atomic<uint64_t> state_{0};
  std::atomic<uint32_t> phase_{0};
};

// A warp's shuffles: lane L's value of its k-th shuffle is history[k][L]; published[L] counts the
// values L has written (kExited set once L returned). A lane waits only for the lane it reads.
constexpr uint32_t kExited = 0x80000000u;
constexpr int kMaxShuffles = 256;  // per thread and block; the kernels do 25 or 50

struct Warp {
  explicit Warp(int lanes) : lanes(lanes) {}
  const int lanes;
  std::atomic<uint32_t> published[warpSize] = {};
  uint64_t history[kMaxShuffles][warpSize];
};

struct Block {
  explicit Block(int threads) : bar(threads) {
    for (int w = 0; w * warpSize < threads; ++w)
      warps.emplace_back(std::make_unique<Warp>(std::min(warpSize, threads - w * warpSize)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadState {
  Block* block = nullptr;
  uint32_t shuffles = 0;  // shuffles this thread has done in this block
};
inline thread_local ThreadState tl;

inline void syncthreads() { tl.block->bar.wait("__syncthreads() reached after a thread of the block returned"); }

template <class T>
T shfl_down(unsigned mask, T v, unsigned delta, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type CUDA does not shuffle");
  if (width != warpSize) fatal("__shfl_down_sync with width != 32 is not emulated");
  const unsigned lane = threadIdx.x % warpSize;
  Warp& w = *tl.block->warps[threadIdx.x / warpSize];
  const unsigned lanes_mask = w.lanes == warpSize ? 0xffffffffu : (1u << w.lanes) - 1u;
  // CUDA: every lane named in mask must execute the same shuffle; naming a lane that does not
  // exist (a partial last warp with the full mask) is undefined behaviour.
  if (mask != lanes_mask) fatal("__shfl_down_sync mask differs from the lanes of this warp");
  const uint32_t k = tl.shuffles++;
  if (k >= kMaxShuffles) fatal("more shuffles per thread than the emulator records");
  std::memcpy(&w.history[k][lane], &v, sizeof(T));
  w.published[lane].store(k + 1, std::memory_order_release);
  w.published[lane].notify_all();
  const unsigned src = lane + delta;
  T out = v;  // a source lane past the warp's end: the lane keeps its own value (as CUDA does)
  if (src < static_cast<unsigned>(w.lanes)) {
    for (;;) {
      const uint32_t p = w.published[src].load(std::memory_order_acquire);
      if ((p & ~kExited) > k) break;
      if (p & kExited) fatal("__shfl_down_sync reads a lane of the warp that returned");
      w.published[src].wait(p, std::memory_order_acquire);
    }
    std::memcpy(&out, &w.history[k][src], sizeof(T));
  }
  return out;
}

inline void thread_exit(int t) {  // after the kernel returned on thread t of the block
  Warp& w = *tl.block->warps[t / warpSize];
  w.published[t % warpSize].fetch_or(kExited, std::memory_order_acq_rel);
  w.published[t % warpSize].notify_all();
  tl.block->bar.exit("a thread returned while others of its block wait at __syncthreads()");
}

// Worker pool: thread k of every block runs on worker k; only the workers a block needs are woken.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers park forever, the process exits
    return *pool;
  }
  void run(int threads, const std::function<void(int)>& body) {
    while (static_cast<int>(workers_.size()) < threads) {
      workers_.emplace_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      const int id = static_cast<int>(workers_.size()) - 1;
      std::thread([this, w, id] { loop(*w, id); }).detach();
    }
    body_ = &body;
    remaining_.store(threads, std::memory_order_release);
    for (int k = 0; k < threads; ++k) {
      workers_[k]->go.fetch_add(1, std::memory_order_acq_rel);
      workers_[k]->go.notify_one();
    }
    for (int left; (left = remaining_.load(std::memory_order_acquire)) != 0;)
      remaining_.wait(left, std::memory_order_acquire);
  }

 private:
  struct Worker {
    std::atomic<uint32_t> go{0};
  };
  void loop(Worker& w, int id) {
    for (uint32_t seen = 0;; ++seen) {
      while (w.go.load(std::memory_order_acquire) == seen) w.go.wait(seen, std::memory_order_acquire);
      (*body_)(id);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_one();
    }
  }
  std::vector<std::unique_ptr<Worker>> workers_;  // touched by the launching thread only
  const std::function<void(int)>* body_ = nullptr;
  std::atomic<int> remaining_{0};
};

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

// kernel<<<grid, block, shared_bytes, stream>>>(args...) as the test build rewrites it.
template <class... P, class... A>
void launch(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  static std::mutex one_grid_at_a_time;  // one copy of shared memory: grids never overlap
  std::lock_guard<std::mutex> guard(one_grid_at_a_time);
  const unsigned threads = cfg.block.x * cfg.block.y * cfg.block.z;
  if (cfg.block.y != 1 || cfg.block.z != 1 || cfg.grid.y != 1 || cfg.grid.z != 1)
    fatal("only 1-D grids and blocks are emulated");
  if (threads == 0 || threads > 1024 || cfg.grid.x == 0 || cfg.grid.x > 0x7fffffffu || cfg.shared_bytes != 0) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // by value, as CUDA copies them
  for (unsigned b = 0; b < cfg.grid.x; ++b) {
    Block block(static_cast<int>(threads));
    const std::function<void(int)> body = [&](int t) {
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      blockIdx = uint3{b, 0, 0};
      blockDim = cfg.block;
      gridDim = cfg.grid;
      tl = ThreadState{&block, 0};
      std::apply(kernel, params);
      thread_exit(t);
      tl = ThreadState{};
    };
    Pool::get().run(static_cast<int>(threads), body);
  }
}

}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return emu::shfl_down(mask, v, delta, width);
}
