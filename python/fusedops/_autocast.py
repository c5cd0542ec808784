"""torch.autocast for fusedops' ops, following torch's own lists: attention runs in the autocast dtype
(torch's scaled_dot_product_attention is a lower-precision op on CPU and CUDA), cross-entropy in float32
(torch's cross_entropy is a float32 op). As in torch, only float32/float16/bfloat16 tensors are cast;
float64 and integer tensors are left alone.

The casts happen in the Python entry points, before the custom ops, so eager mode, autograd and
torch.compile (which traces the autocast state) all see the same thing.
"""
from __future__ import annotations

from typing import Optional

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast would cast a lower-precision op to on `device`, or None when it is off there."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _cast(t, dtype):
    if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def cast_lower(device: torch.device, *tensors):
    """tensors in the autocast dtype when autocast is on for `device` (a lower-precision op)."""
    dtype = autocast_dtype(device)
    return tensors if dtype is None else tuple(_cast(t, dtype) for t in tensors)


def cast_float32(device: torch.device, *tensors):
    """tensors in float32 when autocast is on for `device` (a float32 op)."""
    return tensors if autocast_dtype(device) is None else tuple(_cast(t, torch.float32) for t in tensors)
