// torch.ops.fusedops.adam_step_: argument checks, grouping by param dtype and dispatch to the CPU kernel,
// the emulated CUDA kernel or the CUDA kernel (csrc/kernels/adam.h). Updates params, moments, master
// copies and step counters in place; with grad_scale, also writes the unscaled gradients back.
//
// The Python optimizer (fusedops/optim.py) prepares the lists (state allocated in each param's layout,
// complex params viewed as real); this layer checks everything again, because torch.ops.fusedops.* can be
// called directly, and a kernel walking a tensor of the wrong layout or size would corrupt memory.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "binding/common.h"
#include "kernels/adam.h"

namespace fusedops {
namespace {

constexpr const char* kOp = "fusedops.adam_step_";

std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// Elements in the same storage order as `ref` (dense, same shape, equal strides wherever a size exceeds 1):
// the kernels walk both as flat arrays.
void check_like(const at::Tensor& t, const at::Tensor& ref, const std::string& name, const std::string& ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), kOp, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
                    " has shape ", ref.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), kOp, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
  if (t.numel() <= 1) return;
  bool same = t.is_non_overlapping_and_dense();
  for (int64_t d = 0; same && d < t.dim(); ++d) same = t.size(d) == 1 || t.stride(d) == ref.stride(d);
  TORCH_CHECK_VALUE(same, kOp, ": ", name, " must be laid out like ", ref_name, " (strides ", ref.strides(), "), got strides ",
                    t.strides());
}

void check_scalar_tensor(const at::Tensor& t, Backend b, const at::Tensor& device_ref, const char* name,
                         c10::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", name, " must be a ", c10::toString(dtype),
                   " tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == 1, kOp, ": ", name, " must have one element, got shape ", t.sizes());
  check_device(b, t, kOp, name);
  TORCH_CHECK_VALUE(!device_ref.defined() || t.device() == device_ref.device(), kOp, ": ", name, " is on ", t.device(),
                    " but the params are on ", device_ref.device());
}

void dispatch(Backend b, const AdamConfig& cfg, const std::vector<AdamTensor>& tensors, unsigned* ticket,
              const at::Tensor& like) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  switch (b) {
    case Backend::cpu: {
      auto run = [&]() { FUSEDOPS_CPU_DISPATCH(adam_step(cfg, tensors.data(), n)) };
      run();
      break;
    }
    case Backend::emulated: emu::adam_step(cfg, tensors.data(), n, ticket, nullptr); break;
    case Backend::cuda: {
#if defined(FUSEDOPS_WITH_CUDA)
      LaunchScope scope(b, like);
      cuda::adam_step(cfg, tensors.data(), n, ticket, scope.stream());
#endif
      break;
    }
  }
}

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& master_params,
               at::TensorList steps, at::IntArrayRef rng_ids, double lr, const std::optional<at::Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
               bool maximize, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& workspace, int64_t backend) {
  const Backend b = to_backend(backend, kOp);
  const size_t n = params.size();
  const auto expect_len = [&](size_t len, const char* name, size_t want) {
    TORCH_CHECK_VALUE(len == want, kOp, ": ", name, " has ", len, " entries but params has ", want);
  };
  expect_len(grads.size(), "grads", n);
  expect_len(exp_avgs.size(), "exp_avgs", n);
  expect_len(exp_avg_sqs.size(), "exp_avg_sqs", n);
  expect_len(max_exp_avg_sqs.size(), "max_exp_avg_sqs", amsgrad ? n : 0);
  TORCH_CHECK_VALUE(master_params.size() == 0 || master_params.size() == n, kOp, ": master_params has ",
                    master_params.size(), " entries but params has ", n, " (expected 0 or ", n, ")");
  expect_len(steps.size(), "steps", n);
  expect_len(rng_ids.size(), "rng_ids", n);

  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, kOp, ": lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, kOp, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, kOp, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), kOp, ": eps must be a finite number >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0 && std::isfinite(weight_decay), kOp,
                    ": weight_decay must be a finite number >= 0, got ", weight_decay);
  if (n == 0) return;

  const at::Tensor& first = params[0];
  check_device(b, first, kOp, "params[0]");
  AdamConfig base;
  base.decoupled_weight_decay = decoupled_weight_decay;
  base.amsgrad = amsgrad;
  base.maximize = maximize;
  base.lr = lr;
  base.beta1 = beta1;
  base.beta2 = beta2;
  base.eps = eps;
  base.weight_decay = weight_decay;
  base.seed = static_cast<uint64_t>(seed);
  if (lr_tensor.has_value()) {
    check_scalar_tensor(*lr_tensor, b, first, "lr (a tensor)", at::kFloat);
    base.lr_ptr = lr_tensor->const_data_ptr<float>();
  }
  if (grad_scale.has_value()) {
    check_scalar_tensor(*grad_scale, b, first, "grad_scale", at::kFloat);
    base.grad_scale = grad_scale->const_data_ptr<float>();
  }
  if (found_inf.has_value()) {
    check_scalar_tensor(*found_inf, b, first, "found_inf", at::kFloat);
    base.found_inf = found_inf->const_data_ptr<float>();
  }
  unsigned* ticket = nullptr;
  if (b != Backend::cpu) {
    TORCH_CHECK_VALUE(workspace.has_value(), kOp, ": the ", backend_name(b),
                      " backend needs a workspace (one int32 element, zero-initialized)");
    check_scalar_tensor(*workspace, b, first, "workspace", at::kInt);
    ticket = reinterpret_cast<unsigned*>(workspace->data_ptr<int32_t>());
  }

  // Tensors grouped by (param dtype, rounding): one kernel call each.
  std::map<std::pair<int, int>, std::vector<AdamTensor>> groups;
  std::optional<c10::ScalarType> state_type;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string pname = item("params", i);
    check_device(b, p, kOp, pname.c_str());
    TORCH_CHECK_VALUE(p.device() == first.device(), kOp, ": ", pname, " is on ", p.device(), " but params[0] is on ",
                      first.device(), " (one call takes the params of one device)");
    check_dtype(p, kOp, pname.c_str(), {at::kFloat, at::kHalf, at::kBFloat16});
    TORCH_CHECK_VALUE(p.numel() <= 1 || p.is_non_overlapping_and_dense(), kOp, ": ", pname,
                      " must be dense (non-overlapping, no gaps), got shape ", p.sizes(), " and strides ", p.strides());
    const at::Tensor& g = grads[i];
    const std::string gname = item("grads", i);
    TORCH_CHECK_TYPE(!g.is_sparse(), kOp, ": ", gname, " is sparse; Adam does not support sparse gradients");
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), kOp, ": ", gname, " has dtype ", g.scalar_type(), " but ",
                     pname, " has dtype ", p.scalar_type());
    check_like(g, p, gname, pname);

    AdamTensor t;
    t.param = p.data_ptr();
    t.grad = g.data_ptr();
    t.numel = p.numel();
    const auto state = [&](const at::Tensor& s, const char* list) {
      const std::string sname = item(list, i);
      check_dtype(s, kOp, sname.c_str(), {at::kFloat, at::kBFloat16});
      if (!state_type) state_type = s.scalar_type();
      TORCH_CHECK_TYPE(s.scalar_type() == *state_type, kOp, ": ", sname, " has dtype ", s.scalar_type(),
                       " but the other moments have dtype ", *state_type, " (one call keeps its moments in one dtype)");
      check_like(s, p, sname, pname);
      return s.data_ptr();
    };
    t.exp_avg = state(exp_avgs[i], "exp_avgs");
    t.exp_avg_sq = state(exp_avg_sqs[i], "exp_avg_sqs");
    if (amsgrad) t.max_exp_avg_sq = state(max_exp_avg_sqs[i], "max_exp_avg_sqs");

    AdamParamRounding rounding = AdamParamRounding::nearest;
    if (master_params.size() > 0 && master_params.get(i).has_value()) {
      const at::Tensor master = *master_params.get(i);
      const std::string mname = item("master_params", i);
      TORCH_CHECK_VALUE(p.scalar_type() != at::kFloat, kOp, ": ", mname,
                        " is given but ", pname, " is float32 (master weights are for float16 and bfloat16 params)");
      TORCH_CHECK_VALUE(!stochastic_rounding, kOp, ": ", mname,
                        " is given with stochastic_rounding=True; use either master weights or stochastic rounding");
      check_dtype(master, kOp, mname.c_str(), {at::kFloat});
      check_like(master, p, mname, pname);
      t.master = master.data_ptr<float>();
      rounding = AdamParamRounding::master;
    } else if (stochastic_rounding && p.scalar_type() != at::kFloat) {
      TORCH_CHECK_VALUE(p.scalar_type() == at::kBFloat16, kOp, ": stochastic_rounding applies to bfloat16 params, but ",
                        pname, " is ", p.scalar_type());
      rounding = AdamParamRounding::stochastic;
    }

    const at::Tensor& step = steps[i];
    const std::string sname = item("steps", i);
    check_scalar_tensor(step, b, first, sname.c_str(), at::kFloat);
    t.step = step.data_ptr<float>();
    TORCH_CHECK_VALUE(rng_ids[i] >= 0 && rng_ids[i] <= 0xffffffffLL, kOp, ": rng_ids[", i,
                      "] must be in [0, 2^32), got ", rng_ids[i]);
    t.rng_id = static_cast<uint32_t>(rng_ids[i]);

    // The kernels read and write these in one pass: two of them sharing memory would be a silent race.
    if (t.numel > 0) {
      const void* arrays[] = {t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq, t.master};
      for (int a = 0; a < 6; ++a)
        for (int c = a + 1; c < 6; ++c)
          TORCH_CHECK_VALUE(arrays[a] == nullptr || arrays[a] != arrays[c], kOp,
                            ": the param, grad and state tensors of ", pname, " must not share memory");
    }
    groups[{static_cast<int>(dtype_code(p.scalar_type())), static_cast<int>(rounding)}].push_back(t);
  }

  for (const auto& [key, tensors] : groups) {
    AdamConfig cfg = base;
    cfg.param_dtype = static_cast<DType>(key.first);
    cfg.rounding = static_cast<AdamParamRounding>(key.second);
    cfg.state_dtype = dtype_code(state_type.value_or(at::kFloat));
    dispatch(b, cfg, tensors, ticket, first);
  }
}

int64_t adam_tensors_per_launch(bool amsgrad, bool master_weights) {
  AdamConfig cfg;
  cfg.amsgrad = amsgrad;
  cfg.rounding = master_weights ? AdamParamRounding::master : AdamParamRounding::nearest;
  return emu::adam_tensors_per_launch(cfg);
}

}  // namespace
}  // namespace fusedops

TORCH_LIBRARY_FRAGMENT(fusedops, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)?[] master_params, Tensor(g!)[] steps, int[] rng_ids, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, bool stochastic_rounding, int seed, "
      "Tensor(h!)? workspace, int backend) -> ()");
  m.def("adam_tensors_per_launch(bool amsgrad, bool master_weights) -> int", &fusedops::adam_tensors_per_launch);
}

TORCH_LIBRARY_IMPL(fusedops, CPU, m) { m.impl("adam_step_", &fusedops::adam_step); }

#if defined(FUSEDOPS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fusedops, CUDA, m) { m.impl("adam_step_", &fusedops::adam_step); }
#endif
