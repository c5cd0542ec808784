// fusedops._C: the Python module. The ops themselves are registered with the torch dispatcher
// (TORCH_LIBRARY in the other binding files, reached as torch.ops.fusedops.*); this module adds what
// is not an op: build information, the emulator's schedule, the CPU ISA choice and the SIMT self-tests.
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "binding/common.h"
#include "cpu/isa.h"
#include "simt/emulator.h"
#include "simt/selftest.h"

#if !defined(FUSEDOPS_TORCH_VERSION)
#define FUSEDOPS_TORCH_VERSION "unknown"
#endif
#if !defined(FUSEDOPS_CUDA_ARCHS)
#define FUSEDOPS_CUDA_ARCHS ""
#endif

namespace {

using fusedops::simt_emu::Schedule;

Schedule parse_schedule(const std::string& name) {
  if (name == "in_order") return Schedule::in_order;
  if (name == "reversed") return Schedule::reversed;
  if (name == "random") return Schedule::random;
  throw std::invalid_argument("unknown emulator schedule '" + name + "' (expected in_order, reversed or random)");
}

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::reversed: return "reversed";
    case Schedule::random: return "random";
    default: return "in_order";
  }
}

void run_selftest(const std::string& name, int64_t backend, const std::vector<at::Tensor>& tensors,
                  const std::vector<int64_t>& ints, int threads, int blocks, int64_t smem) {
  auto b = fusedops::to_backend(backend, "simt_selftest");
  TORCH_CHECK_VALUE(b != fusedops::Backend::cpu, "simt_selftest runs on cuda-emulated or cuda, not cpu");
  TORCH_CHECK_VALUE(tensors.size() <= 4 && ints.size() <= 6, "simt_selftest takes at most 4 tensors and 6 ints");
  fusedops::SelftestArgs args;
  void** ptrs[] = {&args.a, &args.b, &args.c, &args.d};
  for (size_t i = 0; i < tensors.size(); ++i) {
    fusedops::check_device(b, tensors[i], "simt_selftest", "tensor");
    fusedops::check_contiguous(tensors[i], "simt_selftest", "tensor");
    *ptrs[i] = tensors[i].data_ptr();
  }
  for (size_t i = 0; i < ints.size(); ++i) args.i[i] = ints[i];
  args.threads = threads;
  args.blocks = blocks;
  args.smem = smem;
  if (b == fusedops::Backend::emulated) {
    pybind11::gil_scoped_release no_gil;
    fusedops::emu::simt_selftest(name.c_str(), args, nullptr);
  } else {
#if defined(FUSEDOPS_WITH_CUDA)
    fusedops::LaunchScope scope(b, tensors.at(0));
    fusedops::cuda::simt_selftest(name.c_str(), args, scope.stream());
#endif
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedops compiled kernels";

  m.def("compiled_torch_version", [] { return std::string(FUSEDOPS_TORCH_VERSION); });
  m.def("cuda_compiled", &fusedops::cuda_compiled);
  m.def("cuda_archs", [] { return std::string(FUSEDOPS_CUDA_ARCHS); });

  m.def("cpu_isa", [] { return std::string(fusedops::cpu::isa_name(fusedops::cpu::active_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) { fusedops::cpu::set_isa(fusedops::cpu::parse_isa(name)); });
  m.def("cpu_isas_available", [] {
    std::vector<std::string> names;
    for (auto isa : {fusedops::cpu::Isa::base, fusedops::cpu::Isa::avx2, fusedops::cpu::Isa::avx512})
      if (fusedops::cpu::isa_available(isa)) names.emplace_back(fusedops::cpu::isa_name(isa));
    return names;
  });

  m.def("set_poison_outputs", &fusedops::set_poison_outputs, pybind11::arg("on"));
  m.def("poison_outputs", &fusedops::poison_outputs);
  // Without the GIL: freeing the buffer may need it, while a kernel that holds the slot's lock runs without it.
  m.def("reuse_cache_bytes", &fusedops::reuse_cache_bytes, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("reuse_cache_hits", &fusedops::reuse_cache_hits, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("empty_reuse_cache", &fusedops::empty_reuse_cache, pybind11::call_guard<pybind11::gil_scoped_release>());

  m.def("set_simt_schedule", [](const std::string& name, uint64_t seed) {
    fusedops::simt_emu::set_schedule(parse_schedule(name), seed);
  });
  m.def("simt_schedule", [] {
    return std::make_pair(std::string(schedule_name(fusedops::simt_emu::current_schedule())),
                          fusedops::simt_emu::current_seed());
  });
  m.def("set_simt_smem_limit", &fusedops::simt_emu::set_device_smem_limit, pybind11::arg("bytes"));
  m.def("simt_smem_limit", &fusedops::simt_emu::device_smem_limit);
  m.def("simt_selftest", &run_selftest, pybind11::arg("name"), pybind11::arg("backend"), pybind11::arg("tensors"),
        pybind11::arg("ints"), pybind11::arg("threads") = 32, pybind11::arg("blocks") = 1, pybind11::arg("smem") = 0);
}
