"""The threads of one CTA for the host emulations (tests/bwd_host_emu.py, tests/decode_cpu_exec.py):
every CUDA thread is a fiber (its own stack, ucontext) and a CTA runs on the one OS thread that launched
it. A fiber runs until it waits at a barrier (__syncthreads, a warp's barrier); a barrier completes, as
std::barrier does, when its count of threads has arrived, and the fibers waiting at it run again. A
barrier that never completes (divergent __syncthreads, a thread that returned early) aborts with a
message instead of hanging.

Why not one std::thread per CUDA thread: a CTA of 128-256 threads meeting at a barrier many times per
tile costs futex waits and wake-ups by the thousand (more system time than kernel math), and hundreds
of runnable threads per process make two processes on a 2-core CI machine (pytest-xdist) slow each
other down far more than twofold. Fibers compute the same thing: the kernel's code and index math,
the same barrier semantics, the same NaN-poisoned shared memory; threads run in index order between
barriers, as the std::threads mostly did on few cores (no race that needs true parallelism to show was
ever reliably caught). Each fiber's stack has a guard page: an overflow faults instead of corrupting.
"""
from __future__ import annotations

import os
import subprocess

FIBERS = r"""
// ---- fibers: the threads of one CTA on one OS thread (tests/host_fibers.py) ----
#include <sys/mman.h>
#include <unistd.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace emu_fib {
constexpr size_t STACK_BYTES = size_t(1) << 20;  // per CUDA thread (a std::thread had 8 MiB; kernels use KiBs)
static void trampoline();
#if defined(__x86_64__)
// switch: push the callee-saved registers (SysV: rbx rbp r12-r15, MXCSR and the x87 control word) on the
// old stack, store its sp, load the new sp, pop; no system call (swapcontext saves the signal mask: one each)
struct Ctx { void* sp = nullptr; };
extern "C" __attribute__((visibility("hidden"))) void emu_fib_swap(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl emu_fib_swap
  .hidden emu_fib_swap
  .type emu_fib_swap,@function
emu_fib_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fib_swap, .-emu_fib_swap
)");
inline void ctx_switch(Ctx& from, Ctx& to) { emu_fib_swap(&from.sp, to.sp); }
inline void ctx_make(Ctx& c, char* stack, size_t bytes) {
  // a frame emu_fib_swap pops: FPU control words, six zero registers, then "returns" into trampoline with
  // rsp = 8 mod 16, as after a call
  unsigned long long* top = reinterpret_cast<unsigned long long*>(stack + bytes);  // 16-byte aligned
  unsigned long long* sp = top - 10;
  unsigned short fpucw;
  asm volatile("fnstcw %0" : "=m"(fpucw));
  const unsigned mxcsr = __builtin_ia32_stmxcsr();
  sp[0] = fpucw; sp[1] = mxcsr;
  for (int i = 2; i < 8; ++i) sp[i] = 0;
  sp[8] = reinterpret_cast<unsigned long long>(&trampoline);
  sp[9] = 0;
  c.sp = sp;
}
#else
}  // namespace emu_fib
#include <ucontext.h>
namespace emu_fib {
struct Ctx { ucontext_t uc; };
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
inline void ctx_make(Ctx& c, char* stack, size_t bytes) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack; c.uc.uc_stack.ss_size = bytes; c.uc.uc_link = nullptr;
  makecontext(&c.uc, &trampoline, 0);
}
#endif
enum State { RUNNABLE, WAITING, DONE };
struct Barrier {
  int expected, arrived = 0;
  unsigned long long phase = 0;
  explicit Barrier(int n) : expected(n) {}
  void arrive_and_wait();
};
struct Fiber {
  Ctx ctx;
  State state = RUNNABLE;
  const Barrier* bar = nullptr;
  unsigned long long phase = 0;
};
static Ctx g_sched;
static Fiber* g_fibers = nullptr;
static int g_cur = -1;
static void (*g_body)(int, void*) = nullptr;
static void* g_body_arg = nullptr;

inline void Barrier::arrive_and_wait() {
  if (g_cur < 0) { std::fprintf(stderr, "host emulation: a barrier outside the CTA's threads\n"); std::abort(); }
  if (++arrived == expected) {  // the phase completes: the waiting threads become runnable
    arrived = 0;
    ++phase;
    return;
  }
  Fiber& f = g_fibers[g_cur];
  f.state = WAITING; f.bar = this; f.phase = phase;
  ctx_switch(f.ctx, g_sched);
}

static void trampoline() {
  const int t = g_cur;
  g_body(t, g_body_arg);
  g_fibers[t].state = DONE;
  ctx_switch(g_fibers[t].ctx, g_sched);  // never resumed
  std::abort();
}

// One stack per CUDA thread, mapped once per launch and reused by each CTA; a guard page below each.
struct Stacks {
  char* base = nullptr; size_t each = 0; int n = 0;
  explicit Stacks(int count) : n(count) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    each = STACK_BYTES + page;
    void* m = mmap(nullptr, each * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) { std::perror("host emulation: mmap of the thread stacks"); std::abort(); }
    base = static_cast<char*>(m);
    for (int i = 0; i < n; ++i) mprotect(base + i * each, page, PROT_NONE);
  }
  ~Stacks() { munmap(base, each * n); }
  char* stack(int i) const { return base + i * each + (each - STACK_BYTES); }
};

// Runs body(t, arg) for t in [0, n) as the threads of one CTA; on_resume(t) runs each time thread t
// (re)starts (it sets threadIdx).
inline void run_block(const Stacks& stacks, int n, void (*body)(int, void*), void* arg, void (*on_resume)(int)) {
  std::vector<Fiber> fibers(n);
  g_fibers = fibers.data(); g_body = body; g_body_arg = arg;
  for (int t = 0; t < n; ++t) ctx_make(fibers[t].ctx, stacks.stack(t), STACK_BYTES);
  int done = 0;
  while (done < n) {
    bool ran = false;
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers[t];
      if (f.state == DONE || (f.state == WAITING && f.bar->phase == f.phase)) continue;
      f.state = RUNNABLE;
      g_cur = t;
      on_resume(t);
      ctx_switch(g_sched, f.ctx);
      g_cur = -1;
      ran = true;
      if (f.state == DONE) ++done;
    }
    if (!ran) {
      std::fprintf(stderr, "host emulation: deadlock: %d of %d threads wait at barriers that never complete "
                           "(divergent __syncthreads or a thread that returned before a barrier)\n", n - done, n);
      std::abort();
    }
  }
  g_fibers = nullptr;
}

template <class F>
inline void run_block(const Stacks& stacks, int n, F& body, void (*on_resume)(int)) {
  run_block(stacks, n, [](int t, void* p) { (*static_cast<F*>(p))(t); }, &body, on_resume);
}
}  // namespace emu_fib
// ---- end of fibers ----
"""

# g++ flags of every host-emulation build; a precompiled header is only used with the flags it was built with
GXX_FLAGS = ("-std=c++20", "-O1", "-fPIC", "-pthread", "-w")


def write_atomic(path: str, text: str) -> None:
    """Renamed into place: a concurrent process (a pytest-xdist worker, another checkout's tests) compiling
    from the same folder never reads a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_PRECOMPILED: set[str] = set()


def precompile(header: str) -> None:
    """header.gch next to `header` (the shim's standard headers and inline functions: ~0.45 s of each build).
    g++ uses it for `#include "<header>"` when it is valid for the build's flags and falls back to the
    header's text otherwise, so a missing, stale or failed .gch costs time, never correctness."""
    if header in _PRECOMPILED:
        return
    gch = header + ".gch"
    if not os.path.exists(gch):
        tmp = f"{gch}.{os.getpid()}.tmp"
        res = subprocess.run(["g++", *GXX_FLAGS, "-x", "c++-header", header, "-o", tmp], capture_output=True)
        if res.returncode == 0:
            os.replace(tmp, gch)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    _PRECOMPILED.add(header)
