"""Fused Adam and AdamW: drop-in replacements for torch.optim.Adam and torch.optim.AdamW.

``FusedAdam`` and ``FusedAdamW`` take torch's arguments and keep torch's state (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``), so a ``state_dict`` moves between them and torch's optimizers in both
directions. One kernel call per param group and device updates every tensor (the CUDA kernel: one launch
per dtype; the CPU kernel: one multi-threaded pass); the step counters live with the params, so no step
synchronizes with the host, and with ``capturable=True`` and a tensor ``lr`` a step can be captured in a
CUDA graph. ``torch.amp.GradScaler`` hands its scale and inf flag to the kernel (unscale in the kernel,
skip the step on inf), as with torch's ``fused=True``.

Beyond torch's arguments (all keyword-only):

* ``master_weights``: float16/bfloat16 params keep an fp32 copy (state ``master_param``) that the update
  reads and writes; the param is that copy rounded to nearest.
* ``stochastic_rounding``: bfloat16 params are rounded stochastically after each update (unbiased, so small
  updates are not lost), deterministically for a given ``seed``.
* ``state_dtype``: ``torch.float32`` (default) or ``torch.bfloat16`` for the moments, which are then rounded
  stochastically: half the optimizer memory and 20 instead of 28 bytes moved per fp32 parameter.
* ``seed``: the seed of the stochastic rounding (Philox; identical on every backend). A tensor's random
  stream depends on its position in the optimizer's parameter list and on its step count, so a run resumed
  from a ``state_dict`` continues with the same numbers.

Params may be float32, float16, bfloat16 or complex64 (as torch: real and imaginary parts updated as
independent reals); moments are float32 (or bfloat16 with ``state_dtype``) whatever the param dtype.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from . import _backend

__all__ = ["FusedAdam", "FusedAdamW"]

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.complex64)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_EXTRA_DEFAULTS = ("master_weights", "stochastic_rounding", "state_dtype", "seed")


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and without gaps: the storage holds exactly its elements, in some dim order."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t: Tensor, ref: Tensor) -> bool:
    return t.shape == ref.shape and all(n == 1 or a == b for a, b, n in zip(t.stride(), ref.stride(), ref.shape))


def _state_layout_ok(t: Tensor, p: Tensor) -> bool:
    """State is kept in the param's layout when the param is dense, else contiguous (see _step_group)."""
    return _same_layout(t, p) if _is_dense(p) else (t.shape == p.shape and t.is_contiguous())


def _zeros_like_param(p: Tensor, dtype: torch.dtype) -> Tensor:
    # preserve_format: a dense param's strides, so the kernel walks param and state in the same order.
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


class FusedAdam(torch.optim.Optimizer):
    """torch.optim.Adam with a fused kernel; see the module docstring for the extra options.

    Args are torch.optim.Adam's: ``params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
    amsgrad=False, *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
    decoupled_weight_decay=False`` (``foreach`` and ``fused`` are accepted and recorded, and change nothing:
    the step is always fused; ``differentiable=True`` is not supported), then ``master_weights=False,
    stochastic_rounding=False, state_dtype=torch.float32, seed=0``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        # torch.optim.Adam's checks, with its messages and exception types.
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                    )
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        # The fused kernels' own options.
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype} (expected torch.float32 or torch.bfloat16)")
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights and stochastic_rounding are alternatives; choose one")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"Invalid seed: {seed!r} (expected an int in [0, 2**63))")
        betas = tuple(b.reshape(()) if isinstance(b, Tensor) else b for b in betas)

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": bool(master_weights),
            "stochastic_rounding": bool(stochastic_rounding),
            "state_dtype": state_dtype,
            "seed": int(seed),
        }
        super().__init__(params, defaults)
        # GradScaler hands grad_scale and found_inf to step() instead of unscaling and checking itself.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)
            # Groups loaded from torch's optimizers lack the fused options: this optimizer's choices apply.
            for key in _EXTRA_DEFAULTS:
                group.setdefault(key, self.defaults[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len({id(p) for p in params}) != len(params):
            self.param_groups.pop()
            raise ValueError(
                f"{type(self).__name__}: a parameter group lists the same parameter twice "
                "(the fused step would update it twice at once)"
            )

    # ---- state --------------------------------------------------------------------------------------------

    @staticmethod
    def _wants_master(group: dict[str, Any], p: Tensor) -> bool:
        return bool(group["master_weights"]) and p.dtype in (torch.float16, torch.bfloat16)

    def _check_param(self, p: Tensor, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"{name} supports float32, float16, bfloat16 and complex64 params; got a {p.dtype} param")
        if p.is_complex() and group["state_dtype"] != torch.float32:
            raise ValueError(f"{name}: complex params keep their moments in complex64; state_dtype must be float32")
        if group["stochastic_rounding"] and p.dtype == torch.float16:
            raise ValueError(f"{name}: stochastic_rounding applies to bfloat16 params, not float16")

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        self._check_param(p, group)
        moment_dtype = p.dtype if p.is_complex() else group["state_dtype"]
        # The step counter lives with the param (as with torch's fused=True): no host synchronization.
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = _zeros_like_param(p, moment_dtype)
        state["exp_avg_sq"] = _zeros_like_param(p, moment_dtype)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = _zeros_like_param(p, moment_dtype)
        if self._wants_master(group, p):
            state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(p)

    def _fix_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Brings a state (loaded, or written under other options) to what the kernel needs: moments in the
        group's state dtype and in the param's layout, a float32 step counter on the param's device, the
        max moment for amsgrad, a master copy that matches the param."""
        self._check_param(p, group)
        moment_dtype = p.dtype if p.is_complex() else group["state_dtype"]
        for key in _MOMENTS:
            t = state.get(key)
            if not isinstance(t, Tensor):
                continue
            if t.dtype != moment_dtype or t.device != p.device or not _state_layout_ok(t, p):
                state[key] = _zeros_like_param(p, moment_dtype).copy_(t)
        step = state.get("step", 0.0)
        if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device != p.device or step.dim() != 0:
            value = step.reshape(()) if isinstance(step, Tensor) else torch.tensor(float(step))
            state["step"] = value.to(device=p.device, dtype=torch.float32).clone()
        if "exp_avg" not in state:
            state["exp_avg"] = _zeros_like_param(p, moment_dtype)
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = _zeros_like_param(p, moment_dtype)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _zeros_like_param(p, moment_dtype)
        if self._wants_master(group, p):
            master = state.get("master_param")
            # A master copy that no longer rounds to the param (the param was trained without it, e.g. by
            # torch.optim.Adam after a state_dict round trip) would undo that training: start from the param.
            stale = (
                not isinstance(master, Tensor)
                or master.shape != p.shape
                or not torch.equal(master.to(device=p.device, dtype=p.dtype), p.detach())
            )
            if stale:
                state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(p)
            elif master.dtype != torch.float32 or master.device != p.device or not _state_layout_ok(master, p):
                state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(master)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating-point state to the param's dtype while loading; the moments and master copies of
        # 16-bit params are float32 here, so they are taken from the dict as saved, not from the cast copies.
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (p, group) in zip(saved_ids, params):
            state = self.state.get(p)
            if not state:
                continue
            original = saved_state.get(saved_id, {})
            for key in (*_MOMENTS, "master_param"):
                if isinstance(original.get(key), Tensor):
                    state[key] = original[key].detach().to(device=p.device, copy=True)
            self._fix_state(p, state, group)

    # ---- the step ---------------------------------------------------------------------------------------

    def _workspace(self, device: torch.device) -> Tensor:
        """One zeroed int32 per device for the CUDA kernel's block count (it leaves it zero)."""
        tickets = self.__dict__.setdefault("_tickets", {})
        t = tickets.get(device)
        if t is None:
            t = tickets[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return t

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None and not isinstance(grad_scale, Tensor):
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            found_inf = torch.tensor(float(found_inf), dtype=torch.float32)
        first_index = 0
        for group in self.param_groups:
            self._step_group(group, first_index, grad_scale, found_inf)
            first_index += len(group["params"])
        return loss

    def _step_group(self, group: dict[str, Any], first_index: int, grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        amsgrad = group["amsgrad"]
        state_dtype = group["state_dtype"]
        per_device: dict[torch.device, list[list[Any]]] = {}
        copy_back: list[tuple[Tensor, Tensor]] = []  # (destination, what the kernel updated) after the step
        unscales = grad_scale is not None
        for index, p in enumerate(group["params"], first_index):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients, please consider SparseAdam instead"
                )
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, group)
            elif state["exp_avg"].dtype != (p.dtype if p.is_complex() else state_dtype) or (
                amsgrad and "max_exp_avg_sq" not in state
            ):
                self._fix_state(p, state, group)
            param, exp_avg, exp_avg_sq = p, state["exp_avg"], state["exp_avg_sq"]
            max_sq = state.get("max_exp_avg_sq") if amsgrad else None
            master = state.get("master_param") if group["master_weights"] else None
            if not (param.is_contiguous() and grad.is_contiguous()):
                # The kernel walks param, grad and state as flat arrays in one common layout.
                if not _is_dense(param):
                    dense = param.clone(memory_format=torch.contiguous_format)
                    copy_back.append((param, dense))
                    param = dense
                    exp_avg, exp_avg_sq, max_sq, master = (
                        t.contiguous() if t is not None else None for t in (exp_avg, exp_avg_sq, max_sq, master)
                    )
                    if not _same_layout(state["exp_avg"], param):
                        raise RuntimeError(f"{type(self).__name__}: internal error: state not laid out like its param")
                if not _same_layout(grad, param):
                    laid_out = torch.empty_like(param).copy_(grad)
                    if unscales:  # the kernel writes the unscaled gradient back
                        copy_back.append((grad, laid_out))
                    grad = laid_out
            if p.is_complex():
                param, grad, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (param, grad, exp_avg, exp_avg_sq))
                if max_sq is not None:
                    max_sq = torch.view_as_real(max_sq)
            lists = per_device.get(p.device)
            if lists is None:
                lists = per_device[p.device] = [[], [], [], [], [], [], [], []]
            lists[0].append(param)
            lists[1].append(grad)
            lists[2].append(exp_avg)
            lists[3].append(exp_avg_sq)
            if max_sq is not None:
                lists[4].append(max_sq)
            lists[5].append(master)
            lists[6].append(state["step"])
            lists[7].append(index)
        if not per_device:
            return

        capturing = _backend.capturing()
        if capturing and any(isinstance(b, Tensor) and b.device.type != "cpu" for b in group["betas"]):
            raise RuntimeError("fusedops.FusedAdam: betas on the GPU are read on the host at every step, which a CUDA "
                               "graph cannot capture; pass float betas to capture the step")
        beta1, beta2 = (float(b) if isinstance(b, Tensor) else b for b in group["betas"])
        lr = group["lr"]
        for device, (params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps, ids) in per_device.items():
            backend = _backend.resolve("FusedAdam", device)
            if capturing and device.type == "cuda":
                # Copies from pageable host memory are not allowed while a graph is being captured.
                for value, name in ((lr, "lr"), (grad_scale, "grad_scale"), (found_inf, "found_inf")):
                    if isinstance(value, Tensor) and value.device != device:
                        raise RuntimeError(f"fusedops.FusedAdam: to capture the step in a CUDA graph, {name} must be a "
                                           f"tensor on {device} (capturable=True and a tensor lr), got one on "
                                           f"{value.device}")
            lr_value, lr_tensor = (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)
            if lr_tensor is not None and (lr_tensor.device != device or lr_tensor.dtype != torch.float32):
                lr_tensor = lr_tensor.to(device=device, dtype=torch.float32, non_blocking=True)
            scale = grad_scale.to(device, torch.float32, non_blocking=True) if grad_scale is not None else None
            inf = found_inf.to(device, torch.float32, non_blocking=True) if found_inf is not None else None
            torch.ops.fusedops.adam_step_(
                params, grads, exp_avgs, exp_avg_sqs, max_sqs,
                masters if any(m is not None for m in masters) else [],
                steps, ids, lr_value, lr_tensor, beta1, beta2, group["eps"], group["weight_decay"],
                group["decoupled_weight_decay"], amsgrad, group["maximize"], scale, inf,
                group["stochastic_rounding"], group["seed"],
                self._workspace(device) if backend != _backend.CPU else None, backend,
            )
        for destination, updated in copy_back:
            destination.copy_(updated)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW with a fused kernel: FusedAdam with decoupled weight decay (default 1e-2).

    Args are torch.optim.AdamW's: ``params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    amsgrad=False, *, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None``, then
    ``master_weights=False, stochastic_rounding=False, state_dtype=torch.float32, seed=0``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, state_dtype=state_dtype,
            seed=seed,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


def _register_fake() -> None:
    # adam_step_ only mutates its arguments: nothing to compute for meta/fake tensors.
    @torch.library.register_fake("fusedops::adam_step_")
    def _adam_step_fake(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        return None


_register_fake()
