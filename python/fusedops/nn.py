"""Modules built on fusedops' fused kernels, mirroring torch.nn's."""
from __future__ import annotations

from .attention import Attention
from .cross_entropy import CrossEntropyLoss
from .linear_cross_entropy import LinearCrossEntropyLoss

__all__ = ["Attention", "CrossEntropyLoss", "LinearCrossEntropyLoss"]
