// Attention forward and backward on the CPU (stub: the tiled CPU kernel replaces this file).
#include <stdexcept>

#include "../kernels/attention.h"
#include "vec.h"

namespace fusedops::cpu::FUSEDOPS_CPU_ISA {

void attention_forward(const AttentionForwardParams&) {
  throw std::runtime_error("fusedops: the CPU attention kernel is not implemented yet");
}

void attention_backward(const AttentionBackwardParams&) {
  throw std::runtime_error("fusedops: the CPU attention kernel is not implemented yet");
}

}  // namespace fusedops::cpu::FUSEDOPS_CPU_ISA
