// CUDA execution model on the host, for tests/kernels/cuda_emu (see build_emu.py there).
//
// Each CUDA thread of a block is a fiber (its own stack and saved registers) on ONE host thread;
// a block's fibers run round-robin until each reaches a barrier, so the code between two barriers
// runs for every thread before any thread passes the second one: __syncthreads() is a block
// barrier, __shfl_down_sync a warp barrier around a per-warp exchange buffer. Blocks run one
// after another; __shared__ variables become function-local statics, shared by the fibers of the
// running block.
//
// It checks what a GPU would fault or hang on and a host run would not notice:
//   * a barrier that not every thread of the block (or lane of the warp) reaches: a divergent
//     __syncthreads (undefined behaviour in the CUDA programming guide, a hang or a wrong result
//     on the device) or a full-mask shuffle that part of the warp skips; the emulator aborts,
//     naming the barrier, when no thread can go on;
//   * 16-byte vector loads and stores (__ldca / __stwb on uint4) at addresses that are not
//     16-byte aligned (a misaligned-address fault on the device);
//   * launch geometry outside the device limits (a block of 32..1024 threads, a multiple of 32;
//     grid.y and grid.z at most 65535; an empty grid).
// It does NOT model the memory model, timing, or the device's floating-point units: the device
// code compiles with the host compiler (-ffp-contract=off, like nvcc -fmad=false), so what it
// tests is the kernels' indexing, control flow, reductions and rounding logic.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "emu_bits.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// The running thread's coordinates: globals, rewritten by the scheduler before it resumes a fiber.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace saq_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

// A fiber's saved context. On x86-64 a hand-written switch (callee-saved registers, MXCSR and the
// x87 control word on the fiber's own stack): ucontext's swapcontext makes a sigprocmask system
// call per switch, which made a reduction test take minutes. Elsewhere, ucontext. The symbol is
// weak: every translation unit that includes this header carries the same copy.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void saq_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .weak saq_emu_switch
  .hidden saq_emu_switch
  .type saq_emu_switch, @function
saq_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size saq_emu_switch, .-saq_emu_switch
)");
inline void switch_context(Context* from, Context* to) { saq_emu_switch(&from->sp, to->sp); }
// A fresh fiber's stack, laid out as saq_emu_switch leaves a suspended one: control words, six
// zeroed registers, then `entry` as the return address, at a 16-byte boundary so that entry
// starts with the stack alignment of a called function. entry must never return.
inline void make_context(Context* c, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);  // return address at a 16-byte boundary
  slot[0] = reinterpret_cast<uint64_t>(entry);
  slot[1] = 0;
  for (int i = 1; i <= 6; ++i) slot[-i] = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  auto* ctl = reinterpret_cast<uint32_t*>(slot - 7);
  ctl[0] = mxcsr;
  ctl[1] = fpucw;
  c->sp = slot - 7;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context* from, Context* to) {
  if (swapcontext(&from->uc, &to->uc) != 0) std::abort();
}
inline void make_context(Context* c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = bytes;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  State state = State::kRunnable;
  uint64_t shuffles = 0;  // shuffles done: picks the exchange buffer (double buffering)
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Context scheduler;
  unsigned current = 0;
  unsigned at_block_barrier = 0;
  std::vector<unsigned> at_warp_barrier;  // per warp
  std::vector<uint64_t> slots[2];         // per lane: the value a shuffle publishes
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
};

inline Block* g_block = nullptr;
constexpr size_t kStackBytes = 64 * 1024;

inline void yield_to_scheduler() {
  Block& b = *g_block;
  switch_context(&b.fibers[b.current].ctx, &b.scheduler);
}

inline void block_barrier() {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.current];
  if (++b.at_block_barrier == b.fibers.size()) {  // the last one releases the others
    b.at_block_barrier = 0;
    for (Fiber& o : b.fibers)
      if (o.state == State::kAtBlockBarrier) o.state = State::kRunnable;
    return;
  }
  f.state = State::kAtBlockBarrier;
  yield_to_scheduler();
}

inline void warp_barrier() {
  Block& b = *g_block;
  const unsigned warp = b.current / 32;
  if (++b.at_warp_barrier[warp] == 32) {
    b.at_warp_barrier[warp] = 0;
    for (unsigned t = warp * 32; t < warp * 32 + 32; ++t)
      if (b.fibers[t].state == State::kAtWarpBarrier) b.fibers[t].state = State::kRunnable;
    return;
  }
  b.fibers[b.current].state = State::kAtWarpBarrier;
  yield_to_scheduler();
}

[[noreturn]] inline void fiber_main() {
  Block& b = *g_block;
  b.body(b.closure);
  b.fibers[b.current].state = State::kDone;
  switch_context(&b.fibers[b.current].ctx, &b.scheduler);  // never resumed
  std::abort();
}

// Run one launch: every block of `grid`, each with `block.x` fibers, calling body(closure).
inline void launch(dim3 grid, dim3 block, void (*body)(void*), void* closure) {
  if (block.y != 1 || block.z != 1) fail("launch: only 1-D blocks are emulated");
  if (block.x == 0 || block.x > 1024 || block.x % 32 != 0)
    fail("launch: a block must have 32..1024 threads, a multiple of 32");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch: empty grid (invalid configuration)");
  if (grid.y > 65535 || grid.z > 65535) fail("launch: grid.y / grid.z above 65535");
  if (g_block != nullptr) fail("launch: nested launch");
  Block b;
  b.fibers.resize(block.x);
  b.stacks.resize(block.x);
  for (auto& s : b.stacks) s.reset(new char[kStackBytes]);
  b.at_warp_barrier.assign(block.x / 32, 0);
  b.slots[0].assign(block.x, 0);
  b.slots[1].assign(block.x, 0);
  b.body = body;
  b.closure = closure;
  g_block = &b;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        for (unsigned t = 0; t < block.x; ++t) {
          Fiber& f = b.fibers[t];
          f.state = State::kRunnable;
          f.shuffles = 0;
          make_context(&f.ctx, b.stacks[t].get(), kStackBytes, fiber_main);
        }
        unsigned done = 0;
        while (done < block.x) {
          bool ran = false;
          for (unsigned t = 0; t < block.x; ++t) {
            if (b.fibers[t].state != State::kRunnable) continue;
            b.current = t;
            threadIdx = uint3{t, 0, 0};
            switch_context(&b.scheduler, &b.fibers[t].ctx);
            ran = true;
            if (b.fibers[t].state == State::kDone) ++done;
          }
          if (!ran) {  // everyone left is waiting for someone who finished or waits elsewhere
            for (unsigned t = 0; t < block.x; ++t)
              if (b.fibers[t].state != State::kDone) threadIdx = uint3{t, 0, 0};
            g_block = nullptr;
            fail(b.at_block_barrier ? "__syncthreads() not reached by every thread of the block"
                                    : "__shfl_down_sync not reached by every lane of the warp");
          }
        }
      }
  g_block = nullptr;
}

template <class F>
void call_closure(void* f) {
  (*static_cast<F*>(f))();
}

}  // namespace saq_emu

// What build_emu.py rewrites `kernel<<<grid, block, smem, stream>>>(args)` into.
template <class F>
void emu_launch(dim3 grid, dim3 block, F&& body) {
  saq_emu::launch(grid, block, &saq_emu::call_closure<std::remove_reference_t<F>>, &body);
}

inline void __syncthreads() { saq_emu::block_barrier(); }

template <class T>
T __shfl_down_sync(unsigned mask, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  if (mask != 0xffffffffu) saq_emu::fail("__shfl_down_sync: only full-warp masks are emulated");
  saq_emu::Block& b = *saq_emu::g_block;
  const unsigned lane = threadIdx.x & 31, base = threadIdx.x & ~31u;
  // Double-buffered exchange: shuffle k of every lane uses buffer k % 2, so one warp barrier per
  // shuffle suffices (a lane can only overwrite buffer k % 2 again at shuffle k + 2, after every
  // lane has passed shuffle k + 1's barrier, i.e. finished reading shuffle k).
  std::vector<uint64_t>& slot = b.slots[b.fibers[threadIdx.x].shuffles++ & 1];
  std::memcpy(&slot[threadIdx.x], &v, sizeof(T));
  saq_emu::warp_barrier();  // every lane has published
  T r = v;
  if (lane + off < 32) std::memcpy(&r, &slot[base + lane + off], sizeof(T));
  return r;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}
inline uint4 __ldg(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) saq_emu::fail("__ldg: misaligned 16-byte load");
  return *p;
}
inline uint4 __ldca(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) saq_emu::fail("__ldca: misaligned 16-byte load");
  return *p;
}
inline void __stwb(uint4* p, uint4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16) saq_emu::fail("__stwb: misaligned 16-byte store");
  *p = v;
}
inline uint64_t __umul64hi(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}
// Correctly rounded fp32 operations: the host's IEEE single-precision arithmetic (SSE, no
// contraction: build_emu.py passes -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint_as_float(uint32_t u) { return emu_bit_cast<float>(u); }
inline uint32_t __float_as_uint(float f) { return emu_bit_cast<uint32_t>(f); }
using std::isfinite;
