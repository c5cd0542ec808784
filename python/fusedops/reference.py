"""Float64 references for every fusedops op, written plainly in PyTorch.

Tests and benchmarks compare the kernels against these. Each function says in a few lines what the op
computes — no fusion, no tiling, no tricks — and computes it in float64.
"""
from __future__ import annotations

import torch


# ==== Adam / AdamW =========================================================================================




# ==== cross-entropy ========================================================================================




# ==== attention ============================================================================================



