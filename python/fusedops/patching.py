"""Drop fusedops into existing code: swap torch.nn.functional's attention and cross-entropy for ours.

    fusedops.patch()            # from now on F.scaled_dot_product_attention / F.cross_entropy are fused
    fusedops.unpatch()          # torch's own again
    with fusedops.patch():      # or only inside a block
        model(x)
    fusedops.patch_report()     # what ran fused, what fell back to torch and why

The swap replaces the attributes of ``torch.nn.functional``, so it reaches every caller that looks them up
at call time: ``F.scaled_dot_product_attention(...)``, ``torch.nn.CrossEntropyLoss``,
``torch.nn.MultiheadAttention``'s slow path, Hugging Face models' ``sdpa`` attention. Code that bound the
function earlier (``from torch.nn.functional import cross_entropy`` at import time) keeps torch's.

Calls ours cannot serve go to torch's function unchanged (probability targets, a class weight that requires
grad, a device other than CPU/CUDA, tensor subclasses, head dims the CUDA kernels lack, ...); each is counted
with its reason. Where ours differs from torch on purpose, the patched function does too: a query row that
may attend to no key gets 0 instead of NaN, and dropout draws a different (Philox) random stream.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import _backend, _C
from .attention import scaled_dot_product_attention as _fused_sdpa
from .cross_entropy import cross_entropy as _fused_cross_entropy

__all__ = ["patch", "unpatch", "is_patched", "patch_report"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_lock = threading.Lock()
_originals: dict[str, Callable] = {}
_fused_calls: collections.Counter = collections.Counter()
_fallbacks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _count(name: str, reason: Optional[str]) -> None:
    if torch.compiler.is_compiling():
        return  # traced once, run many times: counting here would count traces, not calls
    with _lock:
        if reason is None:
            _fused_calls[name] += 1
        else:
            _fallbacks[name][reason] += 1


def _device_reason(t: torch.Tensor) -> Optional[str]:
    if t.device.type == "cuda":
        return None if _C.cuda_compiled() else "CUDA tensors, but this fusedops was built without CUDA kernels"
    if t.device.type != "cpu":
        return f"tensors on {t.device.type} (fusedops runs CPU and CUDA tensors)"
    return None


def _plain_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and (torch.compiler.is_compiling() or type(t) in (torch.Tensor, torch.nn.Parameter))


def _runs_on_kernels_for_gpus(t: torch.Tensor) -> bool:
    name = _backend.current_backend()
    return name in ("cuda", "cuda-emulated") or (name == "auto" and t.device.type == "cuda")


def _sdpa_unsupported(query, key, value, attn_mask) -> Optional[str]:
    """Why fusedops cannot run this call (None: it can). Bad arguments are not reasons: ours raises for them."""
    for t in (query, key, value) + (() if attn_mask is None else (attn_mask,)):
        if not _plain_tensor(t):
            return f"a {type(t).__name__} argument (plain tensors only)"
        if t.is_nested:
            return "nested tensors"
        if t.layout != torch.strided:
            return f"{t.layout} tensors"
    if query.dtype not in _FLOATS:
        return f"query dtype {query.dtype}"
    reason = _device_reason(query)
    if reason is not None:
        return reason
    if _runs_on_kernels_for_gpus(query):
        if query.dtype == torch.float64:
            return "float64 on the CUDA kernels"
        for d in (query.shape[-1], value.shape[-1]):
            if not (8 <= d <= 256 and d % 8 == 0):
                return f"head dim {d} on the CUDA kernels (multiples of 8 up to 256)"
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        return f"attn_mask dtype {attn_mask.dtype} with {query.dtype} query"
    return None


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    reason = _sdpa_unsupported(query, key, value, attn_mask)
    _count("scaled_dot_product_attention", reason)
    if reason is not None:
        return _originals["scaled_dot_product_attention"](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return _fused_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa)


def _cross_entropy_unsupported(input, target, weight) -> Optional[str]:
    for t in (input, target) + (() if weight is None else (weight,)):
        if not _plain_tensor(t):
            return f"a {type(t).__name__} argument (plain tensors only)"
        if t.layout != torch.strided:
            return f"{t.layout} tensors"
    if target.is_floating_point():
        return "probability (soft) targets"
    if input.dtype not in _FLOATS:
        return f"input dtype {input.dtype}"
    reason = _device_reason(input)
    if reason is not None:
        return reason
    if input.dtype == torch.float64 and _runs_on_kernels_for_gpus(input):
        return "float64 on the CUDA kernels"
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return "a class weight that requires grad"
    return None


def _patched_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                           reduction="mean", label_smoothing=0.0):
    reason = _cross_entropy_unsupported(input, target, weight)
    _count("cross_entropy", reason)
    if reason is not None:
        return _originals["cross_entropy"](input, target, weight=weight, size_average=size_average,
                                           ignore_index=ignore_index, reduce=reduce, reduction=reduction,
                                           label_smoothing=label_smoothing)
    return _fused_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                size_average=size_average, reduce=reduce)


_REPLACEMENTS = {"scaled_dot_product_attention": _patched_sdpa, "cross_entropy": _patched_cross_entropy}


class _Patch(contextlib.AbstractContextManager):
    """Returned by patch(): leaving a ``with`` block undoes that patch."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def __exit__(self, *exc) -> None:
        unpatch(*self.names)


def _settle_dynamo_rules() -> None:
    """torch.compile's table of torch functions to keep whole in its graph is filled on first use by looking
    the functions up by name: filled while patched, it would list our replacements as torch's and put them in
    the graph as opaque calls instead of tracing through to the fusedops ops. Fill it with torch's own first
    (importing torch._dynamo, ~2 s once per process on a slow CPU, which torch.compile would pay anyway).
    torch.distributed.init_process_group clears the table; refilled while patched, it keeps a replacement
    whole in the graph again, which still computes the same (AOTAutograd traces through it)."""
    try:
        from torch._dynamo import trace_rules

        trace_rules.get_torch_obj_rule_map()
    except Exception:  # noqa: BLE001 - a torch without this table (or without dynamo) has nothing to settle
        pass


def patch(attention: bool = True, cross_entropy: bool = True) -> _Patch:
    """Route torch.nn.functional.scaled_dot_product_attention and/or cross_entropy through fusedops.

    Idempotent. Returns a context manager whose exit undoes what this call patched."""
    names = tuple(n for n, on in (("scaled_dot_product_attention", attention), ("cross_entropy", cross_entropy)) if on)
    _settle_dynamo_rules()
    done = []
    with _lock:
        for name in names:
            if name not in _originals:
                _originals[name] = getattr(F, name)
                setattr(F, name, _REPLACEMENTS[name])
                done.append(name)
    return _Patch(tuple(done))


def unpatch(*names: str) -> None:
    """Restore torch's functions (all of them, or the named ones)."""
    with _lock:
        for name in names or tuple(_originals):
            original = _originals.pop(name, None)
            if original is not None:
                setattr(F, name, original)


def is_patched(name: str = "scaled_dot_product_attention") -> bool:
    return name in _originals


def patch_report(reset: bool = False) -> dict:
    """Calls the patched functions served since the last reset (outside torch.compile tracing):
    ``{name: {"fused": n, "fell_back": {reason: n}}}``."""
    with _lock:
        report = {name: {"fused": _fused_calls[name], "fell_back": dict(_fallbacks[name])} for name in _REPLACEMENTS}
        if reset:
            _fused_calls.clear()
            _fallbacks.clear()
    return report
