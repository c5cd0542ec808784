"""fusedops: fused kernels for PyTorch.

Each op has a CUDA kernel, a vectorized multi-threaded C++ CPU kernel, and a float64 PyTorch
reference (fusedops.reference) that the tests compare both against. See README.md.
"""
from __future__ import annotations

import torch

from ._loader import load_extension as _load_extension

_C = _load_extension()

from ._backend import available_backends, backend, current_backend  # noqa: E402
from . import optim  # noqa: E402,F401
from .attention import Attention, attention, attention_varlen, scaled_dot_product_attention  # noqa: E402
from .cross_entropy import CrossEntropyLoss, cross_entropy  # noqa: E402
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy  # noqa: E402
from . import nn  # noqa: E402,F401
from .patching import is_patched, patch, patch_report, unpatch  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build of fusedops contains and what it runs on here."""
    from . import _build_config as cfg

    return {
        "fusedops_version": __version__,
        "torch_version": torch.__version__,
        "built_against_torch": cfg.TORCH_VERSION,
        "cuda_built": bool(cfg.WITH_CUDA),
        "cuda_archs": [a for a in cfg.CUDA_ARCHS.split(",") if a],
        "cuda_available": bool(cfg.WITH_CUDA) and torch.cuda.is_available(),
        "cpu_isas_built": [a for a in cfg.CPU_ISAS.split(",") if a],
        "cpu_isas_available": list(_C.cpu_isas_available()),
        "cpu_isa": _C.cpu_isa(),
        "backends": available_backends(),
        "emulator_schedule": "{}:{}".format(*_C.simt_schedule()),
        "threads": torch.get_num_threads(),
    }


def set_cpu_isa(name: str) -> None:
    """Use the CPU kernels compiled for `name` ("base", "avx2" or "avx512"); it must run on this CPU."""
    try:
        _C.set_cpu_isa(name)
    except RuntimeError as e:  # pybind11 turns std::invalid_argument into ValueError already
        raise ValueError(str(e)) from None


def empty_cache() -> None:
    """Releases the CPU buffer fusedops keeps for reuse (like torch.cuda.empty_cache()).

    cross_entropy's gradient of large CPU logits (32 MiB and up) is written into the previous call's
    gradient buffer when nothing refers to that any more and it is at most a quarter larger than needed: a
    training loop then writes into memory already mapped instead of fresh pages, which the OS zeroes on
    first touch (a quarter of the op's time at N=4096, V=32000 fp32 on a 2-core EPYC). One buffer is kept;
    it stays resident between steps, so call this after training (or whenever the memory should go back).
    A gradient still alive in the buffer keeps it: this only drops fusedops' own reference."""
    _C.empty_reuse_cache()


def cached_bytes() -> int:
    """Size of the buffer fusedops holds for reuse (0 when none), whether or not a gradient lives in it."""
    return int(_C.reuse_cache_bytes())


def set_emulator_schedule(name: str, seed: int = 0) -> None:
    """Order in which the SIMT emulator runs the threads of a block between synchronization points:
    "in_order", "reversed", or "random" (seeded). Races that one order hides, another exposes."""
    _C.set_simt_schedule(name, seed)


__all__ = [
    "Attention",
    "attention",
    "attention_varlen",
    "available_backends",
    "backend",
    "CrossEntropyLoss",
    "cross_entropy",
    "LinearCrossEntropyLoss",
    "linear_cross_entropy",
    "build_info",
    "cached_bytes",
    "empty_cache",
    "current_backend",
    "is_patched",
    "patch",
    "patch_report",
    "unpatch",
    "nn",
    "optim",
    "set_cpu_isa",
    "scaled_dot_product_attention",
    "set_emulator_schedule",
]
