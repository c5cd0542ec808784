// Attention backward, CUDA (stub: the FlashAttention-2 kernels replace this file).
#include "../simt/simt.cuh"
#include "attention.h"

namespace fusedops::FUSEDOPS_BACKEND {

size_t attention_backward_workspace_bytes(const AttentionBackwardParams&) { return 0; }

void attention_backward(const AttentionBackwardParams&, cudaStream_t) {
  throw std::runtime_error("fusedops: the CUDA attention backward kernel is not implemented yet");
}

}  // namespace fusedops::FUSEDOPS_BACKEND
