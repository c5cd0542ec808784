// Run-time choice among the CPU kernel variants. Each csrc/cpu/*.cpp is compiled once per ISA level
// (CMakeLists.txt: base, avx2 = AVX2+FMA+F16C, avx512 = AVX-512 F/BW/VL/DQ) into namespace
// fusedops::cpu::<isa>; the binding layer calls the best one this CPU runs, or the one named by
// FUSEDOPS_CPU_ISA / fusedops.set_cpu_isa() (tests use that to check every variant).
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fusedops::cpu {

enum class Isa : int { base = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

// Compiled into this build (FUSEDOPS_HAVE_CPU_* come from CMake for the translation units that dispatch).
inline bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::base: return true;
#if defined(FUSEDOPS_HAVE_CPU_AVX2)
    case Isa::avx2: return true;
#endif
#if defined(FUSEDOPS_HAVE_CPU_AVX512)
    case Isa::avx512: return true;
#endif
    default: return false;
  }
}

inline bool isa_runs_here(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return isa == Isa::base;
#endif
}

inline bool isa_available(Isa isa) { return isa_compiled(isa) && isa_runs_here(isa); }

inline Isa parse_isa(const std::string& name) {
  if (name == "base") return Isa::base;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected base, avx2 or avx512)");
}

inline Isa& selected_isa() {
  static Isa isa = [] {
    if (const char* env = std::getenv("FUSEDOPS_CPU_ISA"); env && *env) {
      Isa wanted = parse_isa(env);
      if (isa_available(wanted)) return wanted;
    }
    for (Isa i : {Isa::avx512, Isa::avx2})
      if (isa_available(i)) return i;
    return Isa::base;
  }();
  return isa;
}

inline Isa active_isa() { return selected_isa(); }

inline void set_isa(Isa isa) {
  if (!isa_available(isa))
    throw std::invalid_argument(std::string("CPU ISA '") + isa_name(isa) + "' is not available here (" +
                                (isa_compiled(isa) ? "this CPU lacks it" : "not compiled in") + ")");
  selected_isa() = isa;
}

}  // namespace fusedops::cpu

// Declares a CPU kernel entry point in every ISA namespace.
#define FUSEDOPS_CPU_DECL(...)   \
  namespace fusedops::cpu {      \
  namespace base {               \
  __VA_ARGS__;                   \
  }                              \
  namespace avx2 {               \
  __VA_ARGS__;                   \
  }                              \
  namespace avx512 {             \
  __VA_ARGS__;                   \
  }                              \
  }

#if defined(FUSEDOPS_HAVE_CPU_AVX512)
#define FUSEDOPS_CPU_CASE_AVX512(call) \
  case ::fusedops::cpu::Isa::avx512:   \
    return ::fusedops::cpu::avx512::call;
#else
#define FUSEDOPS_CPU_CASE_AVX512(call)
#endif
#if defined(FUSEDOPS_HAVE_CPU_AVX2)
#define FUSEDOPS_CPU_CASE_AVX2(call) \
  case ::fusedops::cpu::Isa::avx2:   \
    return ::fusedops::cpu::avx2::call;
#else
#define FUSEDOPS_CPU_CASE_AVX2(call)
#endif

// `return`s call (e.g. adam_step(args)) from the active ISA's namespace.
#define FUSEDOPS_CPU_DISPATCH(call)             \
  switch (::fusedops::cpu::active_isa()) {      \
    FUSEDOPS_CPU_CASE_AVX512(call)              \
    FUSEDOPS_CPU_CASE_AVX2(call)                \
    default:                                    \
      return ::fusedops::cpu::base::call;       \
  }
