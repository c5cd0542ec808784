"""Modules built on fusedops' fused kernels (``fusedops.nn.Attention``)."""
from __future__ import annotations

from .attention import Attention

__all__ = ["Attention"]
