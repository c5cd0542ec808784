// Attention forward, CUDA (stub: the FlashAttention-2 kernels replace this file).
#include "../simt/simt.cuh"
#include "attention.h"

namespace fusedops::FUSEDOPS_BACKEND {

void attention_forward(const AttentionForwardParams&, cudaStream_t) {
  throw std::runtime_error("fusedops: the CUDA attention forward kernel is not implemented yet");
}

}  // namespace fusedops::FUSEDOPS_BACKEND
