// Shared by the binding translation units: which backend runs an op, and argument checks whose
// errors name the op, the argument and what was expected (they surface in Python as ValueError,
// TypeError or RuntimeError through torch's exception translation).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>

#include "common/dtype.h"
#include "common/stream.h"

namespace fusedops {

// Must match fusedops/_backend.py.
enum class Backend : int64_t { cpu = 0, emulated = 1, cuda = 2 };

Backend to_backend(int64_t code, const char* op);
const char* backend_name(Backend b);
bool cuda_compiled();

std::string dtype_list(std::initializer_list<c10::ScalarType> allowed);
// The kernels' code for a float dtype (f32, f16, bf16, f64); callers check the dtype first.
DType dtype_code(c10::ScalarType t);

// The tensor lives where the backend runs (CPU memory for cpu and emulated, a CUDA device for cuda).
void check_device(Backend b, const at::Tensor& t, const char* op, const char* arg);
void check_dtype(const at::Tensor& t, const char* op, const char* arg, std::initializer_list<c10::ScalarType> allowed);
void check_contiguous(const at::Tensor& t, const char* op, const char* arg);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg);
// `t` must not share memory with `other` (an output written while `other` is read, or two outputs).
void check_no_overlap(const at::Tensor& t, const at::Tensor& other, const char* op, const char* arg, const char* other_arg);
// An in-place output must not have internal overlap (expanded or strided views writing one element twice).
void check_writable(const at::Tensor& t, const char* op, const char* arg);
void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg);

// Allocates an op's output. With poisoning on (the test suite turns it on), the memory is filled with
// NaN (floating types) or all-ones bits (integers) first, so any element a kernel fails to write shows.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor new_output_like(const at::Tensor& t);
// new_output for a large CPU output that a training loop allocates again every step (the logits' gradient):
// its buffer is kept when the caller lets go of it and handed out again for an output of about the same size
// (no more than a quarter larger), so the next step writes into pages already mapped. Fresh pages cost as
// much as the kernel: the OS zeroes each one on first touch (a 500 MiB gradient: ~25 ms here, a quarter of
// the fused cross-entropy). One buffer is kept, outputs under 32 MiB and non-CPU ones are plain
// new_output; empty_reuse_cache releases it (fusedops.empty_cache()).
at::Tensor reuse_output(at::IntArrayRef sizes, const at::TensorOptions& options);
int64_t reuse_cache_bytes();
int64_t reuse_cache_hits();
void empty_reuse_cache();
void set_poison_outputs(bool on);
bool poison_outputs();

// The stream a kernel of backend `b` runs on for tensors on t's device (the current CUDA stream;
// nullptr for the emulator). Also makes t's device current for the scope of the returned guard.
class LaunchScope {
 public:
  LaunchScope(Backend b, const at::Tensor& t);
  ~LaunchScope();
  LaunchScope(const LaunchScope&) = delete;
  LaunchScope& operator=(const LaunchScope&) = delete;
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  int previous_device_ = -1;
};

}  // namespace fusedops
