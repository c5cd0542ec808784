"""Which implementation runs an op: the C++ CPU kernels, the CUDA kernels, or the CUDA kernels run
on the CPU by the SIMT emulator.

The choice is process-wide and set with the `backend` context manager; an op resolves it once, in
its forward, from the device of its inputs, and its backward reuses the same backend.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from . import _C

CPU, EMULATED, CUDA = 0, 1, 2  # must match csrc/binding/common.h
_NAMES = {"cpu": CPU, "cuda-emulated": EMULATED, "cuda": CUDA}
BACKENDS = ("auto",) + tuple(_NAMES)

_lock = threading.Lock()
_current = "auto"


def current_backend() -> str:
    """The backend selected by the innermost active `backend(...)` context ("auto" by default)."""
    return _current


def available_backends() -> list[str]:
    """Backends that can run here: always "cpu" and "cuda-emulated"; "cuda" with a GPU and a CUDA build."""
    names = ["cpu", "cuda-emulated"]
    if _C.cuda_compiled() and torch.cuda.is_available():
        names.append("cuda")
    return names


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Select the implementation used by fusedops ops inside the block.

    "auto" (default) runs CUDA tensors on the CUDA kernels and CPU tensors on the C++ CPU kernels;
    "cpu" forces the CPU kernels; "cuda-emulated" runs CPU tensors through the CUDA kernel sources on
    the SIMT emulator (slow: for testing); "cuda" requires CUDA tensors.
    """
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    with _lock:
        previous, _current = _current, name
    try:
        yield
    finally:
        with _lock:
            _current = previous


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (ops with host-side state refuse it)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def resolve(op: str, device: torch.device) -> int:
    """The backend code for running `op` on tensors on `device`, under the current selection."""
    name = _current
    if name == "auto":
        if device.type == "cuda":
            if not _C.cuda_compiled():
                raise RuntimeError(
                    f"fusedops.{op}: got CUDA tensors, but this fusedops was built without CUDA kernels "
                    "(rebuild with a CUDA build of torch and nvcc on PATH; see README)"
                )
            return CUDA
        if device.type == "cpu":
            return CPU
        raise ValueError(f"fusedops.{op}: tensors on {device} are not supported (CPU or CUDA tensors expected)")
    code = _NAMES[name]
    wanted = "cuda" if code == CUDA else "cpu"
    if device.type != wanted:
        raise ValueError(
            f"fusedops.{op}: backend {name!r} runs on {wanted.upper()} tensors, but the inputs are on {device}"
        )
    if code == CUDA and not _C.cuda_compiled():
        raise RuntimeError(f"fusedops.{op}: the cuda backend is not built into this fusedops (see README)")
    return code


def graph_retained() -> bool:
    """Whether the running backward keeps the graph (retain_graph), so that its saved tensors are used again.
    Unknown (a torch without the query): assumed kept."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def scale_saved_gradients(grads, g: torch.Tensor) -> list:
    """grads · g for gradients a forward computed in advance and saved (None entries pass through), g the
    upstream gradient: a 0-dim tensor, or one that broadcasts against them.

    When the graph is not retained this backward is their last use: they are passed on as they are, or scaled
    in place (a loss divided for gradient accumulation, or scaled for mixed precision), instead of copied,
    which would be one more pass over them into fresh pages. When it is retained, a later backward needs them
    again, and whoever receives them may write into them (AccumulateGrad keeps them as .grad and adds into
    them), so the caller gets copies. A 0-dim g on the CPU is read as a Python scalar (free there; it also
    keeps 16-bit products in fp32)."""
    compiling = torch.compiler.is_compiling()  # first: dynamo cannot trace graph_retained()
    in_place = not compiling and not graph_retained()
    scale = g.item() if g.dim() == 0 and g.device.type == "cpu" and not compiling else None
    if scale == 1.0 and in_place:
        return list(grads)

    def scaled(t: torch.Tensor) -> torch.Tensor:
        factor = scale if scale is not None else g.to(t.dtype)
        return t.mul_(factor) if in_place else t * factor

    return [None if t is None else scaled(t) for t in grads]


def refuse_create_graph(what: str) -> None:
    """For a backward whose gradients are constants of the graph (computed in the forward, or under no_grad):
    with create_graph=True (the only way grad mode is on in a backward) a second derivative through them
    would silently leave their dependence on the inputs out, so refuse it."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{what} is differentiable once: its backward cannot build a graph for a second "
                           "derivative (create_graph=True)")


def differentiable_once(op: str, what: str):
    """Gives the backward kernel `op` ("namespace::name") an autograd formula that refuses to be
    differentiated, and returns its caller (autograd_caller). Without one, a double backward
    (create_graph=True) goes through torch's fallback for ops without autograd, which warns and returns a
    second derivative that silently leaves out the path through this op."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{what} is differentiable once: a second derivative through its gradient "
                           "(create_graph=True) is not supported")

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    namespace, name = op.split("::")
    return autograd_caller(getattr(getattr(torch.ops, namespace), name), setup_context, backward,
                           "".join(part.title() for part in name.split("_")))


def autograd_caller(op, setup_context, backward, name: str):
    """A caller for the custom op `op` whose autograd formula (setup_context, backward) is registered with
    torch.library.register_autograd: eager calls that need a graph go through an autograd.Function with the
    same formula, calls that need none skip autograd, torch.compile traces the op and its registration.

    Why not the registration alone: torch's wrapper refills the schema's defaults on every call that needs a
    graph (torch._library.utils.fill_defaults, quadratic in the number of arguments, each access building the
    schema's pybind objects again): 200-350 µs per call for our 11- and 18-argument ops, more than the
    kernels themselves at small sizes. Without a graph it still costs tens of µs."""

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call
