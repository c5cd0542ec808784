// SIMT emulator runtime: fibers, the per-block scheduler, barriers and warp collectives.
// The model and its limits are described in emulator.h. Fragment layouts of mma.sync and ldmatrix
// follow the PTX ISA ("Matrix Fragments for mma.m16n8k16", "ldmatrix"); shuffle semantics follow
// the pseudocode of shfl.sync.
#include "emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/parallel.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FUSEDOPS_SIMT_ASAN 1
#else
#define FUSEDOPS_SIMT_ASAN 0
#endif

namespace fusedops::simt_emu {

thread_local ThreadBuiltins* tls_thread = nullptr;
thread_local BlockBuiltins tls_block{};

namespace {

// ---- configuration ------------------------------------------------------------------------------

struct ScheduleConfig {
  std::atomic<int> schedule{static_cast<int>(Schedule::in_order)};
  std::atomic<uint64_t> seed{0};
  ScheduleConfig() {
    const char* env = std::getenv("FUSEDOPS_SIMT_SCHEDULE");
    if (!env || !*env) return;
    std::string s(env);
    if (s == "in_order") {
      schedule = static_cast<int>(Schedule::in_order);
    } else if (s == "reversed") {
      schedule = static_cast<int>(Schedule::reversed);
    } else if (s.rfind("random", 0) == 0) {
      schedule = static_cast<int>(Schedule::random);
      if (s.size() > 7 && s[6] == ':') seed = std::strtoull(s.c_str() + 7, nullptr, 10);
    } else {
      std::fprintf(stderr, "fusedops: ignoring FUSEDOPS_SIMT_SCHEDULE=%s (expected in_order, reversed, random[:SEED])\n",
                   env);
    }
  }
};
ScheduleConfig& config() {
  static ScheduleConfig c;
  return c;
}

std::mutex g_smem_attr_mutex;
std::unordered_map<const void*, size_t>& smem_attributes() {
  static std::unordered_map<const void*, size_t> m;
  return m;
}

std::atomic<size_t> g_device_smem_limit{kMaxDynamicSmem};

constexpr unsigned kMaxThreadsPerBlock = 1024;

size_t fiber_stack_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("FUSEDOPS_SIMT_STACK_KB");
    size_t kb = env ? std::strtoull(env, nullptr, 10) : 256;
    return std::max<size_t>(kb, 64) * 1024;
  }();
  return bytes;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---- fiber stacks and context switching ------------------------------------------------------------

// Memory with an inaccessible guard page on one side, so running off that end faults instead of
// corrupting: below the usable range for fiber stacks (which grow down), above it for shared memory.
struct Stack {
  void* base = nullptr;  // mapping start
  size_t mapped = 0;
  bool guard_above = false;
  Stack() = default;
  explicit Stack(size_t bytes, bool guard_above_ = false) : guard_above(guard_above_) {
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    mapped = ((bytes + page - 1) / page + 1) * page;
    base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("simt emulator: cannot map a fiber stack");
    mprotect(guard_above ? static_cast<char*>(base) + mapped - page : base, page, PROT_NONE);
  }
  Stack(Stack&& o) noexcept : base(o.base), mapped(o.mapped), guard_above(o.guard_above) { o.base = nullptr; }
  Stack& operator=(Stack&& o) noexcept {
    std::swap(base, o.base);
    std::swap(mapped, o.mapped);
    std::swap(guard_above, o.guard_above);
    return *this;
  }
  ~Stack() {
    if (base) munmap(base, mapped);
  }
  // The usable range [bottom, top).
  char* top() const {
    return static_cast<char*>(base) + mapped - (guard_above ? static_cast<size_t>(sysconf(_SC_PAGESIZE)) : 0);
  }
  char* bottom() const {
    return static_cast<char*>(base) + (guard_above ? 0 : static_cast<size_t>(sysconf(_SC_PAGESIZE)));
  }
};

struct Fiber;
}  // namespace
}  // namespace fusedops::simt_emu

extern "C" [[noreturn]] __attribute__((visibility("hidden"))) void fusedops_simt_fiber_main(
    fusedops::simt_emu::Fiber* fiber);

#if defined(__x86_64__)
// void fusedops_simt_switch(void** save_sp, void* load_sp): saves the callee-saved registers on the
// current stack, stores its pointer in *save_sp, and resumes the context whose stack pointer is
// load_sp. The floating-point control words are shared by all fibers of an OS thread (kernels never
// change them), which keeps the switch cheap.
extern "C" void fusedops_simt_switch(void** save_sp, void* load_sp);
extern "C" void fusedops_simt_fiber_start();
asm(R"(
  .text
  .globl fusedops_simt_switch
  .hidden fusedops_simt_switch
  .type fusedops_simt_switch, @function
fusedops_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fusedops_simt_switch, .-fusedops_simt_switch

  .globl fusedops_simt_fiber_start
  .hidden fusedops_simt_fiber_start
  .type fusedops_simt_fiber_start, @function
fusedops_simt_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  call fusedops_simt_fiber_main
  ud2
  .cfi_endproc
  .size fusedops_simt_fiber_start, .-fusedops_simt_fiber_start
)");
#endif

namespace fusedops::simt_emu {
namespace {

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

#if !defined(__x86_64__)
void ucontext_entry(unsigned hi, unsigned lo) {
  auto* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  fusedops_simt_fiber_main(f);
}
#endif

// `color` staggers the stack tops of a block's fibers across cache sets: page-aligned stacks would
// otherwise all start in the same L1 set and evict each other at every switch.
void context_init(Context& ctx, const Stack& stack, Fiber* fiber, unsigned color) {
#if defined(__x86_64__)
  auto top = (reinterpret_cast<uintptr_t>(stack.top()) - (color % 64) * 64) & ~uintptr_t(15);
  // The frame fusedops_simt_switch pops: r15 r14 r13 r12 rbx rbp, then the return address. After the
  // `ret`, rsp = sp + 56 must be 16-byte aligned for the `call` in fusedops_simt_fiber_start.
  auto* sp = reinterpret_cast<uint64_t*>(top - 64 - 56);
  sp[0] = 0;                                    // r15
  sp[1] = 0;                                    // r14
  sp[2] = 0;                                    // r13
  sp[3] = reinterpret_cast<uint64_t>(fiber);    // r12: the argument fusedops_simt_fiber_start passes on
  sp[4] = 0;                                    // rbx
  sp[5] = 0;                                    // rbp
  sp[6] = reinterpret_cast<uint64_t>(&fusedops_simt_fiber_start);
  ctx.sp = sp;
#else
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack.bottom();
  ctx.uc.uc_stack.ss_size = static_cast<size_t>(stack.top() - stack.bottom());
  ctx.uc.uc_link = nullptr;
  auto p = reinterpret_cast<uintptr_t>(fiber);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
#endif
}

inline void context_switch(Context& from, Context& to) {
#if defined(__x86_64__)
  fusedops_simt_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// ---- blocks ---------------------------------------------------------------------------------

enum class FiberState : uint8_t { runnable, at_barrier, in_collective, exited };

// A cp.async issued by a thread that has not landed in shared memory yet: it lands when the thread
// waits for its group (cp.async.wait_group), as on the GPU, where reading the destination earlier
// sees whatever was there before.
struct PendingCopy {
  void* dst;
  unsigned char data[16];
  int bytes;
  uint64_t group;  // the number of commits the thread had made when it issued the copy
};

struct Fiber {
  ThreadBuiltins builtins{};
  std::vector<PendingCopy> copies;
  uint64_t commits = 0;
  Context context;
  FiberState state = FiberState::runnable;
  unsigned warp = 0;
  int barrier_reduce = 0;   // BarrierReduce asked for at the current barrier
  int barrier_result = 0;
  const CollectiveKind* collective = nullptr;  // what the fiber waits in
  unsigned collective_mask = 0;
#if FUSEDOPS_SIMT_ASAN
  void* asan_fake_stack = nullptr;
#endif
};

struct Pending {
  const CollectiveKind* kind;
  unsigned mask;
  unsigned arrived;
};

struct Warp {
  LaneSlot slots[32];
  Pending pending[32];
  int pending_count = 0;
  unsigned live_mask = 0;
};

std::string thread_ranges(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

class BlockRunner {
 public:
  // Runs one block to completion on this OS thread. Throws on a deadlock or a trap.
  void run(const LaunchSpec& spec, BodyRef body, uint64_t linear_block) {
    spec_ = &spec;
    body_ = &body;
    const unsigned nthreads = spec.block.x * spec.block.y * spec.block.z;
    const unsigned nwarps = (nthreads + 31) / 32;
    block_label_ = "(" + std::to_string(tls_block.block_idx.x) + "," + std::to_string(tls_block.block_idx.y) + "," +
                   std::to_string(tls_block.block_idx.z) + ")";
    prepare(nthreads, nwarps, linear_block);

    // Dynamic shared memory ends right at a guard page, so a kernel that overruns it faults.
    smem_size_ = spec.dynamic_smem_bytes;
    if (!smem_storage_.base) smem_storage_ = Stack(kMaxDynamicSmem, /*guard_above=*/true);
    smem_ = reinterpret_cast<unsigned char*>(smem_storage_.top()) - ((smem_size_ + 15) / 16 * 16);
    std::memset(smem_, 0xFF, smem_size_);

    struct Leave {
      BlockRunner* r;
      ~Leave() {
        r->current_ = nullptr;
        tls_thread = nullptr;
        current_runner() = nullptr;
      }
    } leave{this};
    current_runner() = this;
    while (live_ > 0) {
      if (queue_head_ == queue_.size()) throw std::runtime_error(deadlock_message());
      Fiber* f = &fibers_[pick()];
      current_ = f;
      tls_thread = &f->builtins;
      switch_into(f);
      if (error_) break;
    }
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  // ---- called on fibers ----

  void fiber_body(Fiber* f) {
#if FUSEDOPS_SIMT_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &asan_sched_bottom_, &asan_sched_size_);
#endif
    try {
      (*body_)();
    } catch (...) {
      if (!error_) error_ = std::current_exception();
    }
    on_exit(f);
    yield(f, /*exiting=*/true);
    __builtin_unreachable();
  }

  int barrier(BarrierReduce reduce, int predicate) {
    Fiber* f = current_;
    f->state = FiberState::at_barrier;
    f->barrier_reduce = static_cast<int>(reduce);
    ++barrier_arrived_;
    barrier_true_ += predicate ? 1 : 0;
    if (barrier_arrived_ == live_) release_barrier();
    yield(f, false);
    return f->barrier_result;
  }

  void collective(const CollectiveKind& kind, unsigned mask, const void* in, size_t in_bytes, void* out,
                  size_t out_bytes) {
    Fiber* f = current_;
    const unsigned lane = f->builtins.lane;
    if (!(mask >> lane & 1u))
      trap_here(std::string(kind.name) + ": the calling lane " + std::to_string(lane) + " is not in mask " + hex(mask));
    if (kind.needs_full_warp && mask != 0xffffffffu)
      trap_here(std::string(kind.name) + " is .aligned: all 32 lanes must execute it (mask " + hex(mask) + ")");
    Warp& w = warps_[f->warp];
    std::memcpy(w.slots[lane].in, in, in_bytes);
    Pending* p = nullptr;
    for (int i = 0; i < w.pending_count; ++i)
      if (w.pending[i].mask == mask) p = &w.pending[i];
    if (!p) {
      p = &w.pending[w.pending_count++];
      *p = Pending{&kind, mask, 0};
    } else if (p->kind != &kind) {
      trap_here(std::string("lanes of warp ") + std::to_string(f->warp) + " with mask " + hex(mask) + " diverge: " +
                kind.name + " against " + p->kind->name);
    }
    p->arrived |= 1u << lane;
    f->state = FiberState::in_collective;
    f->collective = &kind;
    f->collective_mask = mask;
    if (p->arrived == (mask & w.live_mask)) complete(w, static_cast<int>(p - w.pending));
    yield(f, false);
    std::memcpy(out, w.slots[lane].out, out_bytes);
  }

  [[noreturn]] void trap_here(const std::string& what) {
    const ThreadBuiltins* t = tls_thread;
    std::string where = "simt emulator: kernel '" + std::string(spec_ ? spec_->kernel_name : "?") + "' block " +
                        block_label_;
    if (t)
      where += " thread (" + std::to_string(t->thread_idx.x) + "," + std::to_string(t->thread_idx.y) + "," +
               std::to_string(t->thread_idx.z) + ")";
    throw std::runtime_error(where + ": " + what);
  }

  // A copy may land any time between its issue and its group's wait. In order, it lands at the wait
  // (exposing reads before the wait); reversed, at issue (exposing a prefetch that overwrites a buffer
  // other warps still read, i.e. a missing barrier before it); random, at either, drawn per copy.
  void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
    const bool land_now = schedule_ == Schedule::reversed || (schedule_ == Schedule::random && (splitmix64(rng_) & 1));
    if (land_now) {
      if (src_bytes > 0) std::memcpy(dst, src, static_cast<size_t>(src_bytes));
      if (src_bytes < bytes) std::memset(static_cast<char*>(dst) + src_bytes, 0, static_cast<size_t>(bytes - src_bytes));
      return;
    }
    PendingCopy c;
    c.dst = dst;
    c.bytes = bytes;
    c.group = current_->commits;
    std::memset(c.data, 0, sizeof c.data);
    if (src_bytes > 0) std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
    current_->copies.push_back(c);
  }
  void cp_async_commit() { ++current_->commits; }
  // cp.async.wait_group n: every committed group but the newest n has landed.
  void cp_async_wait(int n) {
    Fiber* f = current_;
    if (f->commits >= static_cast<uint64_t>(n)) land_copies(f, f->commits - static_cast<uint64_t>(n));
  }

  unsigned char* smem() const { return smem_; }
  size_t smem_size() const { return smem_size_; }

  static BlockRunner*& current_runner() {
    static thread_local BlockRunner* r = nullptr;
    return r;
  }

 private:
  void prepare(unsigned nthreads, unsigned nwarps, uint64_t linear_block) {
    const size_t stack_bytes = fiber_stack_bytes();
    while (stacks_.size() < nthreads) stacks_.emplace_back(stack_bytes);
    fibers_.resize(nthreads);
    warps_.resize(nwarps);
    for (unsigned w = 0; w < nwarps; ++w) {
      warps_[w].pending_count = 0;
      const unsigned lanes = std::min(32u, nthreads - 32 * w);
      warps_[w].live_mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    }
    const dim3 b = spec_->block;
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = fibers_[t];
      f.builtins.thread_idx = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
      f.builtins.lane = t % 32;
      f.warp = t / 32;
      f.state = FiberState::runnable;
      f.collective = nullptr;
      f.copies.clear();
      f.commits = 0;
      context_init(f.context, stacks_[t], &f, t);
    }
    live_ = static_cast<int>(nthreads);
    barrier_arrived_ = 0;
    barrier_true_ = 0;
    error_ = nullptr;
    schedule_ = static_cast<Schedule>(config().schedule.load());
    rng_ = config().seed.load() * 0x100000001B3ull + linear_block;
    queue_.clear();
    queue_.reserve(nthreads);
    queue_head_ = 0;
    make_runnable(0, static_cast<int>(nthreads), [](int) { return true; });
  }

  // Appends the fibers whose ids `select` picks from [first, first + count) to the run queue, in
  // reversed order under the reversed schedule.
  template <class Select>
  void make_runnable(int first, int count, Select select) {
    if (schedule_ == Schedule::reversed) {
      for (int id = first + count - 1; id >= first; --id)
        if (select(id)) push(id);
    } else {
      for (int id = first; id < first + count; ++id)
        if (select(id)) push(id);
    }
  }
  void push(int id) {
    fibers_[id].state = FiberState::runnable;
    queue_.push_back(id);
  }
  int pick() {
    if (schedule_ == Schedule::random) {
      size_t n = queue_.size() - queue_head_;
      size_t k = queue_head_ + static_cast<size_t>(splitmix64(rng_) % n);
      std::swap(queue_[queue_head_], queue_[k]);
    }
    int id = queue_[queue_head_++];
    if (queue_head_ == queue_.size()) {
      queue_.clear();
      queue_head_ = 0;
    }
    return id;
  }

  void release_barrier() {
    const int arrived = barrier_arrived_, n_true = barrier_true_;
    barrier_arrived_ = 0;
    barrier_true_ = 0;
    make_runnable(0, static_cast<int>(fibers_.size()), [&](int id) {
      Fiber& f = fibers_[static_cast<size_t>(id)];
      if (f.state != FiberState::at_barrier) return false;
      switch (static_cast<BarrierReduce>(f.barrier_reduce)) {
        case BarrierReduce::none: f.barrier_result = 0; break;
        case BarrierReduce::count: f.barrier_result = n_true; break;
        case BarrierReduce::all: f.barrier_result = n_true == arrived; break;
        case BarrierReduce::any: f.barrier_result = n_true > 0; break;
      }
      return true;
    });
  }

  void complete(Warp& w, int index) {
    Pending p = w.pending[index];
    w.pending[index] = w.pending[--w.pending_count];
    if (p.kind->needs_full_warp && p.arrived != 0xffffffffu)
      trap_here(std::string(p.kind->name) + " is .aligned: all 32 lanes must execute it, but lanes " +
                hex(~p.arrived) + " of the warp have exited or do not exist");
    p.kind->compute(w.slots, p.mask, p.arrived);
    const int first = static_cast<int>(&w - warps_.data()) * 32;
    make_runnable(first, 32, [&](int id) { return (p.arrived >> (id - first) & 1u) != 0; });
  }

  // Lands the fiber's copies of groups below `group_limit`, in issue order.
  static void land_copies(Fiber* f, uint64_t group_limit) {
    size_t kept = 0;
    for (size_t i = 0; i < f->copies.size(); ++i) {
      PendingCopy& c = f->copies[i];
      if (c.group < group_limit) {
        std::memcpy(c.dst, c.data, static_cast<size_t>(c.bytes));
      } else {
        f->copies[kept++] = c;
      }
    }
    f->copies.resize(kept);
  }

  void on_exit(Fiber* f) {
    land_copies(f, f->commits + 1);  // what a thread leaves in flight still arrives
    f->state = FiberState::exited;
    --live_;
    Warp& w = warps_[f->warp];
    w.live_mask &= ~(1u << f->builtins.lane);
    if (error_) return;
    try {
      if (barrier_arrived_ > 0 && barrier_arrived_ == live_) release_barrier();
      // Collectives that waited only for lanes that have now exited can complete without them.
      for (int i = 0; i < w.pending_count;) {
        Pending& p = w.pending[i];
        if (p.arrived != 0 && p.arrived == (p.mask & w.live_mask)) {
          complete(w, i);
        } else {
          ++i;
        }
      }
    } catch (...) {
      error_ = std::current_exception();
    }
  }

  void switch_into(Fiber* f) {
#if FUSEDOPS_SIMT_ASAN
    const Stack& s = stacks_[static_cast<size_t>(f - fibers_.data())];
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, s.bottom(), static_cast<size_t>(s.top() - s.bottom()));
    context_switch(scheduler_, f->context);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    context_switch(scheduler_, f->context);
#endif
  }

  void yield(Fiber* f, bool exiting) {
#if FUSEDOPS_SIMT_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake_stack, asan_sched_bottom_, asan_sched_size_);
    context_switch(f->context, scheduler_);
    __sanitizer_finish_switch_fiber(f->asan_fake_stack, &asan_sched_bottom_, &asan_sched_size_);
#else
    (void)exiting;
    context_switch(f->context, scheduler_);
#endif
  }

  std::string deadlock_message() const {
    std::string msg = "simt emulator: deadlock in kernel '" + std::string(spec_->kernel_name) + "' block " +
                      block_label_ + ":";
    std::vector<int> at_barrier, exited;
    for (size_t i = 0; i < fibers_.size(); ++i) {
      if (fibers_[i].state == FiberState::at_barrier) at_barrier.push_back(static_cast<int>(i));
      if (fibers_[i].state == FiberState::exited) exited.push_back(static_cast<int>(i));
    }
    if (!at_barrier.empty()) msg += " threads " + thread_ranges(at_barrier) + " wait at __syncthreads;";
    for (size_t w = 0; w < warps_.size(); ++w) {
      for (int i = 0; i < warps_[w].pending_count; ++i) {
        const Pending& p = warps_[w].pending[i];
        std::vector<int> ids;
        for (unsigned lane = 0; lane < 32; ++lane)
          if (p.arrived >> lane & 1u) ids.push_back(static_cast<int>(w * 32 + lane));
        msg += " threads " + thread_ranges(ids) + " wait in " + p.kind->name + " (mask " + hex(p.mask) +
               ") for lanes " + hex(p.mask & warps_[w].live_mask & ~p.arrived) + " of warp " + std::to_string(w) +
               ";";
      }
    }
    if (!exited.empty()) msg += " threads " + thread_ranges(exited) + " have exited;";
    msg.pop_back();
    return msg;
  }

  const LaunchSpec* spec_ = nullptr;
  const BodyRef* body_ = nullptr;
  std::string block_label_;
  std::vector<Stack> stacks_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  std::vector<int> queue_;
  size_t queue_head_ = 0;
  Context scheduler_;
  Fiber* current_ = nullptr;
  int live_ = 0;
  int barrier_arrived_ = 0;
  int barrier_true_ = 0;
  std::exception_ptr error_;
  Schedule schedule_ = Schedule::in_order;
  uint64_t rng_ = 0;
  Stack smem_storage_;  // a mapping with a guard page; shared memory sits at its top end
  unsigned char* smem_ = nullptr;
  size_t smem_size_ = 0;
#if FUSEDOPS_SIMT_ASAN
  const void* asan_sched_bottom_ = nullptr;
  size_t asan_sched_size_ = 0;
#endif
};

BlockRunner& thread_runner() {
  static thread_local BlockRunner runner;
  return runner;
}

BlockRunner& running() {
  BlockRunner* r = BlockRunner::current_runner();
  if (!r) throw std::runtime_error("simt emulator: a device function was called outside a kernel launch");
  return *r;
}

[[noreturn]] void launch_error(const LaunchSpec& spec, const std::string& what) {
  throw std::runtime_error("simt emulator: launch of kernel '" + std::string(spec.kernel_name) + "' failed: " + what);
}

}  // namespace

// ---- public entry points --------------------------------------------------------------------------

void set_schedule(Schedule schedule, uint64_t seed) {
  config().schedule = static_cast<int>(schedule);
  config().seed = seed;
}
Schedule current_schedule() { return static_cast<Schedule>(config().schedule.load()); }
uint64_t current_seed() { return config().seed.load(); }

void set_device_smem_limit(size_t bytes) {
  if (bytes < kDefaultDynamicSmem || bytes > kMaxDynamicSmem)
    throw std::invalid_argument("simt emulator: shared memory limit " + std::to_string(bytes) + " bytes, expected " +
                                std::to_string(kDefaultDynamicSmem) + " to " + std::to_string(kMaxDynamicSmem));
  g_device_smem_limit = bytes;
}
size_t device_smem_limit() { return g_device_smem_limit.load(); }

void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  const size_t limit = device_smem_limit();
  if (bytes > limit)
    throw std::runtime_error("simt emulator: cudaFuncSetAttribute: " + std::to_string(bytes) +
                             " bytes of dynamic shared memory exceed the device limit of " + std::to_string(limit));
  std::lock_guard<std::mutex> lock(g_smem_attr_mutex);
  smem_attributes()[kernel] = bytes;
}

void run_grid(const LaunchSpec& spec, BodyRef body) {
  const dim3 g = spec.grid, b = spec.block;
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0)
    launch_error(spec, "invalid configuration argument (a grid or block dimension is 0)");
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || uint64_t(b.x) * b.y * b.z > kMaxThreadsPerBlock)
    launch_error(spec, "invalid configuration argument (more than 1024 threads per block)");
  if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    launch_error(spec, "invalid configuration argument (grid dimension too large)");
  if (spec.dynamic_smem_bytes > kDefaultDynamicSmem) {
    size_t allowed = 0;
    {
      std::lock_guard<std::mutex> lock(g_smem_attr_mutex);
      auto it = smem_attributes().find(spec.kernel);
      if (it != smem_attributes().end()) allowed = it->second;
    }
    const size_t limit = device_smem_limit();
    if (spec.dynamic_smem_bytes > limit)
      launch_error(spec, std::to_string(spec.dynamic_smem_bytes) + " bytes of dynamic shared memory exceed the device limit of " +
                             std::to_string(limit));
    if (spec.dynamic_smem_bytes > allowed)
      launch_error(spec, std::to_string(spec.dynamic_smem_bytes) +
                             " bytes of dynamic shared memory need cudaFuncSetAttribute("
                             "cudaFuncAttributeMaxDynamicSharedMemorySize) first (set: " +
                             std::to_string(allowed) + ")");
  }
  if (BlockRunner::current_runner())
    throw std::runtime_error("simt emulator: kernel launch from inside a kernel is not supported");

  const uint64_t nblocks = uint64_t(g.x) * g.y * g.z;
  const bool reversed = current_schedule() == Schedule::reversed;
  std::atomic<bool> failed{false};
  parallel_for(static_cast<int64_t>(nblocks), 1, [&](int64_t begin, int64_t end) {
    BlockRunner& runner = thread_runner();
    for (int64_t i = begin; i < end && !failed.load(std::memory_order_relaxed); ++i) {
      const uint64_t linear = static_cast<uint64_t>(reversed ? end - 1 - (i - begin) : i);
      tls_block.block_idx = uint3{static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                                  static_cast<unsigned>(linear / (uint64_t(g.x) * g.y))};
      tls_block.block_dim = b;
      tls_block.grid_dim = g;
      try {
        runner.run(spec, body, linear);
      } catch (...) {
        failed = true;
        throw;
      }
    }
  });
}

[[noreturn]] void trap(const char* message) { running().trap_here(message); }

unsigned char* dynamic_smem() { return running().smem(); }
size_t dynamic_smem_size() { return running().smem_size(); }

int syncthreads(BarrierReduce reduce, int predicate) { return running().barrier(reduce, predicate); }

void warp_collective(const CollectiveKind& kind, unsigned mask, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes) {
  running().collective(kind, mask, in, in_bytes, out, out_bytes);
}

// ---- collectives ------------------------------------------------------------------------------------

namespace {

template <class T>
T slot_in(const LaneSlot& s) {
  T v;
  std::memcpy(&v, s.in, sizeof v);
  return v;
}
template <class T>
void slot_out(LaneSlot& s, const T& v) {
  std::memcpy(s.out, &v, sizeof v);
}

constexpr uint64_t kPoison = ~uint64_t(0);

// shfl.sync: the PTX ISA's pseudocode, lane by lane.
void compute_shuffle(LaneSlot* lanes, unsigned, unsigned arrived) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(arrived >> lane & 1u)) continue;
    const auto in = slot_in<ShuffleIn>(lanes[lane]);
    const int b = in.b & 31, segmask = (in.c >> 8) & 31, cval = in.c & 31;
    const int max_lane = (lane & segmask) | (cval & ~segmask);
    const int min_lane = lane & segmask;
    int j = lane;
    bool in_range = false;
    switch (static_cast<ShuffleMode>(in.mode)) {
      case ShuffleMode::up: j = lane - b; in_range = j >= max_lane; break;
      case ShuffleMode::down: j = lane + b; in_range = j <= max_lane; break;
      case ShuffleMode::bfly: j = lane ^ b; in_range = j <= max_lane; break;
      case ShuffleMode::idx: j = min_lane | (b & ~segmask); in_range = j <= max_lane; break;
    }
    if (!in_range) j = lane;
    const uint64_t value = (arrived >> j & 1u) ? slot_in<ShuffleIn>(lanes[j]).value : kPoison;
    slot_out(lanes[lane], value);
  }
}

template <class Reduce>
void for_arrived(LaneSlot* lanes, unsigned arrived, Reduce reduce) {
  for (int lane = 0; lane < 32; ++lane)
    if (arrived >> lane & 1u) reduce(lane, lanes[lane]);
}

void compute_ballot(LaneSlot* lanes, unsigned, unsigned arrived) {
  unsigned ballot = 0;
  for_arrived(lanes, arrived, [&](int lane, LaneSlot& s) { ballot |= (slot_in<int>(s) != 0 ? 1u : 0u) << lane; });
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) { slot_out(s, ballot); });
}
void compute_any(LaneSlot* lanes, unsigned, unsigned arrived) {
  int any = 0;
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) { any |= slot_in<int>(s) != 0; });
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) { slot_out(s, any); });
}
void compute_all(LaneSlot* lanes, unsigned, unsigned arrived) {
  int all = 1;
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) { all &= slot_in<int>(s) != 0; });
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) { slot_out(s, all); });
}
void compute_nothing(LaneSlot*, unsigned, unsigned) {}

// redux.sync: in = {value (32 bits), signed flag}
template <class Op>
void compute_reduce(LaneSlot* lanes, unsigned arrived, Op op) {
  bool first = true;
  uint32_t acc = 0;
  int is_signed = 0;
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) {
    const auto in = slot_in<ReduceIn>(s);
    is_signed = in.is_signed;
    acc = first ? in.value : op(acc, in.value, is_signed);
    first = false;
  });
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) { slot_out(s, acc); });
}
void compute_reduce_add(LaneSlot* l, unsigned, unsigned a) {
  compute_reduce(l, a, [](uint32_t x, uint32_t y, int) { return x + y; });
}
void compute_reduce_min(LaneSlot* l, unsigned, unsigned a) {
  compute_reduce(l, a, [](uint32_t x, uint32_t y, int s) {
    return s ? static_cast<uint32_t>(std::min<int32_t>(int32_t(x), int32_t(y))) : std::min(x, y);
  });
}
void compute_reduce_max(LaneSlot* l, unsigned, unsigned a) {
  compute_reduce(l, a, [](uint32_t x, uint32_t y, int s) {
    return s ? static_cast<uint32_t>(std::max<int32_t>(int32_t(x), int32_t(y))) : std::max(x, y);
  });
}
void compute_reduce_and(LaneSlot* l, unsigned, unsigned a) {
  compute_reduce(l, a, [](uint32_t x, uint32_t y, int) { return x & y; });
}
void compute_reduce_or(LaneSlot* l, unsigned, unsigned a) {
  compute_reduce(l, a, [](uint32_t x, uint32_t y, int) { return x | y; });
}
void compute_reduce_xor(LaneSlot* l, unsigned, unsigned a) {
  compute_reduce(l, a, [](uint32_t x, uint32_t y, int) { return x ^ y; });
}
void compute_match_any(LaneSlot* lanes, unsigned, unsigned arrived) {
  for_arrived(lanes, arrived, [&](int, LaneSlot& s) {
    const auto v = slot_in<uint64_t>(s);
    unsigned same = 0;
    for_arrived(lanes, arrived, [&](int other, LaneSlot& o) { same |= (slot_in<uint64_t>(o) == v ? 1u : 0u) << other; });
    slot_out(s, same);
  });
}

// ---- tensor cores ----

float unpack_half(uint32_t reg, int half, MmaType type) {
  const auto bits = static_cast<uint16_t>(reg >> (16 * half));
  if (type == MmaType::bf16) {
    uint32_t f = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &f, sizeof v);
    return v;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  int type;
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32. With groupID = lane / 4 and
// t = lane % 4: A's register r holds A[g + 8·(r&1)][2t + 8·(r>>1) + {0,1}], B's register r holds
// B[2t + 8r + {0,1}][g], and C/D element i is [g + 8·(i>>1)][2t + (i&1)].
void compute_mma(LaneSlot* lanes, unsigned, unsigned) {
  double A[16][16], B[16][8], C[16][8];
  MmaType type = static_cast<MmaType>(slot_in<MmaIn>(lanes[0]).type);
  for (int lane = 0; lane < 32; ++lane) {
    const auto in = slot_in<MmaIn>(lanes[lane]);
    if (static_cast<MmaType>(in.type) != type) trap("mma.sync: lanes disagree on the operand type");
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * t + 8 * (r >> 1) + h] = unpack_half(in.a[r], h, type);
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = unpack_half(in.b[r], h, type);
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = in.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double acc = C[m][n];
      for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
      d[i] = static_cast<float>(acc);
    }
    slot_out(lanes[lane], d);
  }
}

struct LdmatrixIn {
  const void* address;
  int count;
  int trans;
};

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; lane l receives, from each matrix, row l/4, columns 2(l%4) and 2(l%4)+1 (or the
// transposed pair with .trans), the lower column in the lower half of the register.
void compute_ldmatrix(LaneSlot* lanes, unsigned, unsigned) {
  const auto first = slot_in<LdmatrixIn>(lanes[0]);
  uint16_t m[4][8][8];
  for (int i = 0; i < first.count; ++i) {
    for (int r = 0; r < 8; ++r) {
      const auto in = slot_in<LdmatrixIn>(lanes[8 * i + r]);
      if (in.count != first.count || in.trans != first.trans) trap("ldmatrix: lanes disagree on .num or .trans");
      if (reinterpret_cast<uintptr_t>(in.address) % 16 != 0) trap("ldmatrix: a row address is not 16-byte aligned");
      std::memcpy(m[i][r], in.address, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t regs[4] = {0, 0, 0, 0};
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int i = 0; i < first.count; ++i) {
      const uint16_t lo = first.trans ? m[i][col][row] : m[i][row][col];
      const uint16_t hi = first.trans ? m[i][col + 1][row] : m[i][row][col + 1];
      regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    slot_out(lanes[lane], regs);
  }
}

const CollectiveKind kMma{"mma.sync.m16n8k16", compute_mma, true};
const CollectiveKind kLdmatrix{"ldmatrix", compute_ldmatrix, true};

}  // namespace

const CollectiveKind kShuffle{"__shfl_sync", compute_shuffle, false};
const CollectiveKind kBallot{"__ballot_sync", compute_ballot, false};
const CollectiveKind kAny{"__any_sync", compute_any, false};
const CollectiveKind kAll{"__all_sync", compute_all, false};
const CollectiveKind kSyncwarp{"__syncwarp", compute_nothing, false};
const CollectiveKind kReduceAdd{"__reduce_add_sync", compute_reduce_add, false};
const CollectiveKind kReduceMin{"__reduce_min_sync", compute_reduce_min, false};
const CollectiveKind kReduceMax{"__reduce_max_sync", compute_reduce_max, false};
const CollectiveKind kReduceAnd{"__reduce_and_sync", compute_reduce_and, false};
const CollectiveKind kReduceOr{"__reduce_or_sync", compute_reduce_or, false};
const CollectiveKind kReduceXor{"__reduce_xor_sync", compute_reduce_xor, false};
const CollectiveKind kMatchAny{"__match_any_sync", compute_match_any, false};

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  in.type = static_cast<int>(type);
  warp_collective(kMma, 0xffffffffu, &in, sizeof in, d, sizeof d);
}

void ldmatrix(int count, bool trans, uint32_t* regs, const void* row_address) {
  LdmatrixIn in{row_address, count, trans ? 1 : 0};
  warp_collective(kLdmatrix, 0xffffffffu, &in, sizeof in, regs, sizeof(uint32_t) * static_cast<size_t>(count));
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) trap("cp.async: the copy size must be 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) != 0 ||
      reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0)
    trap("cp.async: source and destination must be aligned to the copy size");
  if (src_bytes < 0 || src_bytes > bytes) trap("cp.async: src-size exceeds cp-size");
  running().cp_async(dst, src, bytes, src_bytes);
}

void cp_async_commit() { running().cp_async_commit(); }
void cp_async_wait(int pending) { running().cp_async_wait(pending); }

}  // namespace fusedops::simt_emu

extern "C" void fusedops_simt_fiber_main(fusedops::simt_emu::Fiber* fiber) {
  fusedops::simt_emu::BlockRunner::current_runner()->fiber_body(fiber);
  __builtin_unreachable();
}
