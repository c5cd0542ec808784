#include "binding/common.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/set.h>
#include <c10/core/ScalarType.h>
#include <c10/util/accumulate.h>
#include <c10/util/strides.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(FUSEDOPS_WITH_CUDA)
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fusedops {

Backend to_backend(int64_t code, const char* op) {
  TORCH_CHECK_VALUE(code >= 0 && code <= 2, op, ": backend code ", code, " is not 0 (cpu), 1 (cuda-emulated) or 2 (cuda)");
  auto b = static_cast<Backend>(code);
  TORCH_CHECK(b != Backend::cuda || cuda_compiled(), op,
              ": the cuda backend is not built into this fusedops (rebuild with a CUDA torch and nvcc)");
  return b;
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::cpu: return "cpu";
    case Backend::emulated: return "cuda-emulated";
    default: return "cuda";
  }
}

bool cuda_compiled() {
#if defined(FUSEDOPS_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

DType dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK(false, "fusedops: internal error: no kernel dtype for ", t);
  }
}

std::string dtype_list(std::initializer_list<c10::ScalarType> allowed) {
  std::string s;
  size_t i = 0;
  for (auto t : allowed) {
    if (i > 0) s += (i + 1 == allowed.size()) ? " or " : ", ";
    s += c10::toString(t);
    ++i;
  }
  return s;
}

void check_device(Backend b, const at::Tensor& t, const char* op, const char* arg) {
  const bool want_cuda = b == Backend::cuda;
  TORCH_CHECK_VALUE(t.device().is_cuda() == want_cuda && (want_cuda || t.device().is_cpu()), op, ": ", arg,
                    " is on ", t.device(), " but the ", backend_name(b), " backend needs ",
                    want_cuda ? "a CUDA tensor" : "a CPU tensor");
}

void check_dtype(const at::Tensor& t, const char* op, const char* arg, std::initializer_list<c10::ScalarType> allowed) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  TORCH_CHECK_TYPE(false, op, ": ", arg, " must have dtype ", dtype_list(allowed), ", got ", t.scalar_type());
}

void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", arg, " must be contiguous (got strides ", t.strides(), ")");
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg, " is on ",
                    ref.device());
}

void check_no_overlap(const at::Tensor& t, const at::Tensor& other, const char* op, const char* arg,
                      const char* other_arg) {
  if (!t.defined() || !other.defined() || t.numel() == 0 || other.numel() == 0) return;
  const auto status = at::get_overlap_status(t, other);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", arg,
                    " shares memory with ", other_arg, "; pass separate tensors");
}

void check_writable(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", arg,
                    " has elements that share memory (an expanded or overlapping view); it cannot be written in place");
}

void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", arg, " has shape ", t.sizes(), " but ", ref_arg, " has shape ",
                    ref.sizes());
}

namespace {
std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("FUSEDOPS_POISON_OUTPUTS");
    return env != nullptr && *env != '\0' && *env != '0';
  }()};
  return flag;
}

// Large CPU outputs (the gradients of the logits, of q, k, v) come fresh from mmap, and with 4 KiB pages
// their first touch costs about as much as the kernel that writes them (a 500 MiB gradient: ~130k page
// faults, each zeroing its page). Advising transparent huge pages for the 2 MiB-aligned interior before
// anything touches it makes that 512x fewer faults (torch does so for its own allocations only under
// THP_MEM_ALLOC_ENABLE=1). A hint: where the system's THP setting is "never" nothing changes.
at::Tensor with_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (t.device().is_cpu() && t.nbytes() >= 4 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // errors: ignored
  }
#endif
  return t;
}

at::Tensor poisoned(at::Tensor t) {
  if (!poison_flag().load(std::memory_order_relaxed) || t.numel() == 0) return t;
  if (at::isFloatingType(t.scalar_type()) || at::isComplexType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (t.scalar_type() == at::kBool) {
    t.fill_(true);
  } else {
    t.fill_(-1);
  }
  return t;
}
}  // namespace

void set_poison_outputs(bool on) { poison_flag() = on; }
bool poison_outputs() { return poison_flag().load(); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poisoned(with_huge_pages(at::empty(sizes, options)));
}

at::Tensor new_output_like(const at::Tensor& t) {
  return poisoned(with_huge_pages(at::empty_like(t, at::MemoryFormat::Contiguous)));
}

namespace {
// The CPU buffer kept for reuse_output. Its TensorImpl is never handed out (callers get other TensorImpls
// over its storage), so the storage's use count is 1 exactly when no tensor, view, numpy array or Python
// storage object outside the slot refers to it. `data` and `deleter` identify the allocation: sharing the
// storage with another process (share_memory_) swaps them, and such memory is never reused.
struct ReuseSlot {
  std::mutex mutex;
  at::Tensor block;
  const void* data = nullptr;
  c10::DeleterFnPtr deleter = nullptr;
  int64_t hits = 0;  // outputs served from the buffer (for the tests)
};
ReuseSlot& reuse_slot() {
  static auto* slot = new ReuseSlot;  // never destroyed: no ordering issue with torch's allocator at exit
  return *slot;
}
constexpr int64_t kReuseMinBytes = int64_t{32} << 20;  // above glibc's largest mmap threshold: always fresh pages

bool reusable(const ReuseSlot& slot, int64_t bytes) {
  const c10::Storage& storage = slot.block.storage();
  if (storage.use_count() != 1) return false;
  std::atomic_thread_fence(std::memory_order_acquire);  // the last other holder's writes happen before ours
  const auto have = static_cast<int64_t>(storage.nbytes());
  return storage.data() == slot.data && storage.data_ptr().get_deleter() == slot.deleter && storage.resizable() &&
         have >= bytes && have - bytes <= bytes / 4;
}

at::Tensor over_storage(const c10::Storage& storage, at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty({0}, options);
  out.set_(storage, 0, sizes, c10::contiguous_strides(sizes));
  return out;
}
}  // namespace

at::Tensor reuse_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (!options.device().is_cpu() || bytes < kReuseMinBytes) return new_output(sizes, options);
  ReuseSlot& slot = reuse_slot();
  // Buffers are let go with the lock released (freeing one may take the GIL), and a replaced one before the
  // next is allocated, so the two never add up.
  std::unique_lock<std::mutex> lock(slot.mutex);
  if (slot.block.defined()) {
    if (reusable(slot, bytes)) {
      ++slot.hits;
      at::Tensor out = over_storage(slot.block.storage(), sizes, options);
      lock.unlock();
      return poisoned(out);
    }
    at::Tensor released = std::move(slot.block);  // in use, shared or the wrong size
    lock.unlock();
    released = at::Tensor();
    lock.lock();
  }
  at::Tensor displaced = std::move(slot.block);  // another thread's, installed meanwhile
  slot.block = with_huge_pages(at::empty(sizes, options));
  slot.data = slot.block.storage().data();
  slot.deleter = slot.block.storage().data_ptr().get_deleter();
  at::Tensor out = over_storage(slot.block.storage(), sizes, options);
  lock.unlock();
  displaced = at::Tensor();
  return poisoned(out);
}

int64_t reuse_cache_bytes() {
  ReuseSlot& slot = reuse_slot();
  std::lock_guard<std::mutex> lock(slot.mutex);
  return slot.block.defined() ? static_cast<int64_t>(slot.block.storage().nbytes()) : 0;
}

int64_t reuse_cache_hits() {
  ReuseSlot& slot = reuse_slot();
  std::lock_guard<std::mutex> lock(slot.mutex);
  return slot.hits;
}

void empty_reuse_cache() {
  ReuseSlot& slot = reuse_slot();
  at::Tensor released;  // declared before the lock: freed after it is let go
  std::lock_guard<std::mutex> lock(slot.mutex);
  released = std::move(slot.block);
}

LaunchScope::LaunchScope(Backend b, const at::Tensor& t) {
#if defined(FUSEDOPS_WITH_CUDA)
  if (b == Backend::cuda) {
    previous_device_ = c10::cuda::current_device();
    c10::cuda::set_device(t.device().index());
    stream_ = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  }
#else
  (void)b;
  (void)t;
#endif
}

LaunchScope::~LaunchScope() {
#if defined(FUSEDOPS_WITH_CUDA)
  if (previous_device_ >= 0) c10::cuda::set_device(static_cast<c10::DeviceIndex>(previous_device_));
#endif
}

}  // namespace fusedops
