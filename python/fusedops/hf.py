"""Hugging Face transformers integration: our attention as ``attn_implementation="fusedops"``, our
(linear) cross-entropy as a causal LM's loss.

    import fusedops.hf
    fusedops.hf.register()                      # once, before building / loading the model
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fusedops")
    fusedops.hf.patch_loss(model)               # loss from the hidden states, the logits never materialized
    loss = model(input_ids, labels=labels).loss

This module imports transformers; ``import fusedops`` does not import this module, so fusedops keeps working
(and stays cheap to import) without transformers.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any, Callable, Optional

import torch

from .attention import scaled_dot_product_attention as _fused_sdpa
from .cross_entropy import cross_entropy as _fused_cross_entropy
from .linear_cross_entropy import linear_cross_entropy as _fused_linear_cross_entropy

__all__ = ["ATTN_IMPLEMENTATION", "register", "fusedops_attention_forward", "patch_loss", "unpatch_loss",
           "is_loss_patched", "causal_lm_loss", "linear_causal_lm_loss"]

ATTN_IMPLEMENTATION = "fusedops"


# ---- attention --------------------------------------------------------------------------------------------

def fusedops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               position_bias: Optional[torch.Tensor] = None, cache=None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` (same arguments, masks and causal decision) on
    fusedops.scaled_dot_product_attention.

    query (b, h, L, d), key/value (b, h_kv, S, d) → ((b, L, h, d), None). GQA goes to the kernel as is (no
    ``repeat_kv`` copies, also with a mask). The mask is the one transformers builds for sdpa (registered for
    "fusedops" by :func:`register`): None for plain causal attention, else a bool / additive 4-D mask that
    also carries padding, sliding windows and packed sequences. As in our SDPA, a query row that sees no key
    (a left-padding position) gets 0, where some of torch's kernels give NaN. ``softcap`` is refused, as sdpa
    does.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("fusedops attention (like `sdpa`) does not support `softcap`; use `eager` or "
                         "`flex_attention` for this model")
    if cache is not None:  # continuous batching's paged cache: update before attending, as sdpa does
        try:
            from transformers.generation.continuous_batching.cache import PagedAttentionCache
        except ImportError:  # pragma: no cover - older transformers
            PagedAttentionCache = ()
        if isinstance(cache, PagedAttentionCache):
            key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)

    q_length, kv_length = query.shape[2], key.shape[2]
    groups = getattr(module, "num_key_value_groups", 1)
    enable_gqa = groups > 1
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # sdpa's rule: rely on the causal flag only for a real prefill (L > 1) with no mask; a mask already holds
    # the causal pattern, and a single query token attends to everything cached.
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and kv_length > q_length:
        # Empty static cache at prefill: top-left causal alignment never reaches the keys past L.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    out = _fused_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
                      scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register() -> str:
    """Register "fusedops" with transformers' AttentionInterface (and, where transformers has one, its mask
    interface, with the mask function sdpa uses, since our attention takes the same masks). Idempotent.
    Returns the name to pass as ``attn_implementation``."""
    global _registered
    if _registered:
        return ATTN_IMPLEMENTATION
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fusedops_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - transformers without a mask interface builds masks by itself
        pass
    else:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _registered = True
    return ATTN_IMPLEMENTATION


# ---- loss -------------------------------------------------------------------------------------------------

def _shifted_labels(labels: torch.Tensor, ignore_index: int, shift_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """ForCausalLMLoss's targets: position t predicts token t+1, the last position predicts nothing."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return shift_labels.reshape(-1)


def _finish(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """HF's reduction: a sum divided by num_items_in_batch (the count over all gradient-accumulation steps)
    when given, else the mean over the tokens not ignored. Losses of half-precision models come back as
    float32 like HF's, but rounded to the model's dtype, as fusedops returns them (outside autocast); float64
    ones stay float64 (HF's are rounded to float32)."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Optional[torch.Tensor] = None,
                   **kwargs) -> torch.Tensor:
    """transformers' ForCausalLMLoss on fusedops.cross_entropy: same signature, shift, ignore_index and
    num_items_in_batch semantics, without the float32 copy of the logits HF makes."""
    target = _shifted_labels(labels, ignore_index, shift_labels).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = _fused_cross_entropy(logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
                                reduction=reduction)
    return _finish(loss, num_items_in_batch)


# The linear path: a patched forward with labels opens a capture slot (a context variable, so concurrent threads
# and nested calls stay apart); in it the lm_head records its input (the final hidden states) and returns an
# empty placeholder instead of the logits, and the model's loss_function, called by the model's own forward as
# usual, computes the loss from the recorded hidden states. Whatever else the forward does with the loss (MoE
# models add their router's auxiliary loss) still happens. The forwards are functools.partial objects over
# module-level functions, not closures, so that copy.deepcopy (a reference model, an EMA copy) and pickling
# carry them over bound to the copy.
_capture: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("fusedops_hf_capture", default=None)
_STATE = "_fusedops_loss_patch"


class _Missing:
    """'No instance attribute to restore': one object that copies and pickles as itself."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


class _Unsupported(RuntimeError):
    """A model the linear loss cannot serve."""


def _head_forward(head: torch.nn.Module, original: Callable, hidden_states, *args, **kwargs):
    slot = _capture.get()
    if slot is None or slot["head"] is not head or "hidden" in slot:
        return original(hidden_states, *args, **kwargs)  # not a patched call with labels (or a second use)
    slot["hidden"] = hidden_states
    if slot["keep_logits"]:
        out = original(hidden_states, *args, **kwargs)
    else:
        out = hidden_states.new_empty((*hidden_states.shape[:-1], 0))
    slot["logits"] = out
    return out


def _output_softcap(model) -> Optional[float]:
    """The final-logit soft-capping (Gemma 2/3 style) the model applies after its lm_head, if any."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def linear_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: Optional[int] = None,
                          num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """The loss_function of a model patched with linear=True: ForCausalLMLoss's semantics, computed by
    fusedops.linear_cross_entropy from the hidden states the lm_head received. Called outside a patched forward
    (no hidden states recorded) it is :func:`causal_lm_loss` on the given logits."""
    slot = _capture.get()
    if slot is None or "hidden" not in slot or "loss" in slot:
        return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
    model, head, hidden = slot["model"], slot["head"], slot["hidden"]
    softcap = None
    if logits is not slot["logits"]:
        # Something ran between the head and the loss. Soft-capping we know how to fuse; anything else (logit
        # scaling, vocabulary slicing, ...) the fused loss would silently miss.
        softcap = _output_softcap(model)
        if softcap is None:
            raise _Unsupported(f"fusedops.hf.patch_loss: {type(model).__name__} transforms its logits after the "
                               "lm_head, which the fused linear cross-entropy cannot reproduce; patch it with "
                               "linear=False")
    target = _shifted_labels(labels, ignore_index, shift_labels).to(hidden.device)
    loss = _fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, target,
                                       bias=getattr(head, "bias", None), ignore_index=ignore_index,
                                       reduction="sum" if num_items_in_batch is not None else "mean",
                                       softcap=softcap)
    slot["loss"] = True
    return _finish(loss, num_items_in_batch)


def _model_forward(model, original: Callable, head: torch.nn.Module, keep_logits: bool, *args, **kwargs):
    labels = kwargs.get("labels")
    if labels is None and args:  # labels may come positionally
        labels = inspect.signature(original).bind(*args, **kwargs).arguments.get("labels")
    if labels is None:
        return original(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    slot = {"model": model, "head": head, "keep_logits": keep_logits}
    token = _capture.set(slot)
    try:
        out = original(*args, return_dict=True, **kwargs)
    except Exception as e:
        if "hidden" in slot and "loss" not in slot and not keep_logits and not isinstance(e, _Unsupported):
            raise _Unsupported(f"fusedops.hf.patch_loss: {type(model).__name__}.forward failed after its lm_head "
                               "returned the empty placeholder that stands for the logits (it needs them for "
                               "something other than its loss_function); patch it with linear=False or "
                               "keep_logits=True") from e
        raise
    finally:
        _capture.reset(token)
    if "loss" not in slot:
        raise _Unsupported(f"fusedops.hf.patch_loss: {type(model).__name__}.forward did not compute its loss with "
                           "its lm_head and loss_function; patch it with linear=False")
    if not keep_logits:
        fields = dict(out.items())
        fields["logits"] = None
        out = type(out)(**fields)
    return out if return_dict else out.to_tuple()


_CAUSAL_LM_LOSSES = (causal_lm_loss, linear_causal_lm_loss)


def _check_causal_lm(model) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    current = model.loss_function
    if current is not ForCausalLMLoss and current not in _CAUSAL_LM_LOSSES:
        raise ValueError(f"fusedops.hf.patch_loss: {type(model).__name__}'s loss is "
                         f"{getattr(current, '__name__', current)}, not transformers' causal LM loss "
                         "(ForCausalLMLoss); only causal LMs can be patched")


def patch_loss(model, *, linear: bool = True, keep_logits: bool = False):
    """Compute a Hugging Face causal LM's loss (``model(..., labels=labels).loss``) with fusedops' kernels.

    linear=True: the loss is fusedops.linear_cross_entropy of the final hidden states and the lm_head weight
    (and bias), so the (tokens × vocabulary) logits and their gradient are never materialized. When labels are
    given, the output's ``logits`` is None, unless ``keep_logits=True`` (then they are also computed as usual
    and returned, which costs their memory again; the loss still comes from the fused kernel). Without labels
    the model runs unchanged. This wraps ``model.forward`` and the lm_head's forward (inside a patched call
    with labels the head hands its input over instead of computing logits) and sets ``model.loss_function``
    to :func:`linear_causal_lm_loss`. A final-logit soft-capping (Gemma 2/3) is fused; any other change the
    model makes to the logits after its lm_head raises (use linear=False there).

    linear=False: ``model.loss_function`` becomes :func:`causal_lm_loss` (fusedops.cross_entropy on the
    logits the model computed).

    Both keep HF's semantics: labels shifted by one, ignore_index -100 (or the ``ignore_index`` kwarg),
    ``shift_labels`` when passed, and a sum divided by ``num_items_in_batch`` when that is passed (as the
    Trainer does under gradient accumulation), else the mean; the model's own additions to the loss (an MoE
    router's auxiliary loss) stay. Patching again replaces the previous patch. Returns the model.
    """
    _check_causal_lm(model)
    head = None
    if linear:
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(head, torch.nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"fusedops.hf.patch_loss: {type(model).__name__}'s output embeddings "
                             f"({type(head).__name__}) are not a linear layer with a 2-D weight; use linear=False")
    unpatch_loss(model)
    state: dict[str, Any] = {"loss_function": model.__dict__.get("_loss_function", _MISSING)}
    if linear:
        state.update(head=head, head_forward=head.__dict__.get("forward", _MISSING),
                     model_forward=model.__dict__.get("forward", _MISSING))
        head.forward = functools.partial(_head_forward, head, head.forward)
        # update_wrapper: inspect.signature (the Trainer's, generate's) sees the model's own forward.
        model.forward = functools.update_wrapper(
            functools.partial(_model_forward, model, model.forward, head, keep_logits), model.forward)
    model.loss_function = linear_causal_lm_loss if linear else causal_lm_loss
    setattr(model, _STATE, state)
    return model


def _restore(obj, name: str, previous) -> None:
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, previous)


def unpatch_loss(model):
    """Undo :func:`patch_loss` (a no-op on a model that is not patched). Returns the model."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    _restore(model, "_loss_function", state["loss_function"])
    if "head" in state:
        _restore(state["head"], "forward", state["head_forward"])
        _restore(model, "forward", state["model_forward"])
    return model


def is_loss_patched(model) -> bool:
    """Whether :func:`patch_loss` is in effect on this model."""
    return _STATE in model.__dict__
