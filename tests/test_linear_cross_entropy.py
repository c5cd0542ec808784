"""fusedops.linear_cross_entropy (the loss of hidden @ weight.T + bias, by chunks of tokens) on every
backend, against fusedops.reference.linear_cross_entropy (float64, the logits materialized)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedops
from fusedops import reference

from conftest import backend_params

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 5e-6), torch.bfloat16: (3e-2, 2e-2)}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    expected = expected.double()
    finite = expected[torch.isfinite(expected)]
    scale = max(finite.abs().max().item() if finite.numel() else 1.0, 0.1)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def problem(n, h, v, device, dtype=torch.float32, ignore=True, shape=None):
    hidden = torch.randn(*(shape or (n,)), h, dtype=torch.float64) / h**0.5 * 3
    weight = torch.randn(v, h, dtype=torch.float64)
    bias = torch.randn(v, dtype=torch.float64) * 0.5
    target = torch.randint(0, v, hidden.shape[:-1])
    if ignore and target.numel():
        target.view(-1)[::5] = -100
    return [t.to(device=device, dtype=dtype) for t in (hidden, weight, bias)] + [target.to(device)]


def run_both(hidden, weight, bias, target, dtype, g=None, g_lse=None, **opts):
    """Our loss/lse and gradients, and the reference's, for the same upstream gradients."""
    return_lse = opts.pop("return_lse", False)
    h, w = (t.detach().clone().to(dtype).requires_grad_(True) for t in (hidden, weight))
    b = bias.detach().clone().to(dtype).requires_grad_(True) if bias is not None else None
    out = fusedops.linear_cross_entropy(h, w, target, b, return_lse=return_lse, **opts)
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_size", "inplace_backward")}
    hr, wr = (t.detach().double().requires_grad_(True) for t in (h, w))
    br = b.detach().double().requires_grad_(True) if b is not None else None
    if "class_weight" in ref_opts and ref_opts["class_weight"] is not None:
        ref_opts["class_weight"] = ref_opts["class_weight"].double()
    ref_loss, ref_lse = reference.linear_cross_entropy(hr, wr, target, br, **ref_opts)
    if g is None:
        g = (torch.randn(ref_loss.shape, dtype=torch.float64) + 0.5).to(hidden.device)
    if return_lse:
        loss, lse = out
        if g_lse is None:
            g_lse = torch.randn(ref_lse.shape, dtype=torch.float64).to(hidden.device)
        torch.autograd.backward([loss, lse], [g.to(loss.dtype), g_lse.float()])
        torch.autograd.backward([ref_loss, ref_lse], [g, g_lse])
        close(lse, ref_lse, dtype, "lse")
    else:
        loss = out
        loss.backward(g.to(loss.dtype))
        ref_loss.backward(g)
    close(loss, ref_loss, dtype, "loss")
    close(h.grad, hr.grad, dtype, "hidden grad")
    close(w.grad, wr.grad, dtype, "weight grad")
    if b is not None:
        close(b.grad, br.grad, dtype, "bias grad")
    return loss, h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_matches_reference(backend, device, reduction, chunk_size):
    n, h, v = (23, 16, 97) if backend != "cpu" else (41, 24, 301)
    hidden, weight, bias, target = problem(n, h, v, device)
    cw = (torch.rand(v) + 0.2).to(device)
    for opts in [dict(), dict(class_weight=cw, label_smoothing=0.1), dict(z_loss=1e-3, softcap=6.0)]:
        run_both(hidden, weight, bias, target, torch.float32, reduction=reduction, chunk_size=chunk_size, **opts)
        run_both(hidden, weight, None, target, torch.float32, reduction=reduction, chunk_size=chunk_size,
                 return_lse=True, **opts)


@pytest.mark.parametrize("backend", backend_params(emulated=False, cuda=False))
@pytest.mark.parametrize("chunk_size", [511, 512])
def test_cpu_chunk_layouts(backend, device, chunk_size):
    """On the CPU a chunk of under 512 rows is computed as W @ hᵀ and its loss taken in that transposed
    layout; from 512 rows on, as h @ Wᵀ in rows. Both against the reference, with every option the fused
    path takes and a last chunk shorter than the others."""
    hidden, weight, bias, target = problem(1100, 8, 37, device)
    cw = (torch.rand(37) + 0.2).to(device)
    run_both(hidden, weight, bias, target, torch.float32, chunk_size=chunk_size, class_weight=cw,
             label_smoothing=0.1, z_loss=1e-3)
    run_both(hidden, weight, None, target, torch.bfloat16, chunk_size=chunk_size, reduction="sum")


def test_dtypes_and_shapes(backend, device):
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if backend == "cpu" else [])
    for dtype in dtypes:
        hidden, weight, bias, target = problem(0, 16, 53, device, shape=(3, 5))  # (B, T, H) hidden
        run_both(hidden, weight, bias, target, dtype, chunk_size=4, label_smoothing=0.1)
        run_both(hidden, weight, bias, target, dtype, chunk_size=4, reduction="none")
    for reduction in ("mean", "sum", "none"):  # no tokens at all
        hidden, weight, bias, target = problem(0, 8, 11, device)
        run_both(hidden, weight, bias, target, torch.float32, reduction=reduction)
    hidden, weight, bias, target = problem(9, 8, 11, device)
    target[:] = -100  # every token ignored: mean is 0/0, gradients are zero
    loss, gh, gw = run_both(hidden, weight, bias, target, torch.float32)
    assert torch.isnan(loss) and (gh == 0).all() and (gw == 0).all()


def test_upstream_scaling_and_retained_graph(backend, device):
    hidden, weight, bias, target = problem(17, 8, 40, device)
    for g in (1.0, 0.25, -3.0):
        run_both(hidden, weight, bias, target, torch.float32, g=torch.tensor(g, dtype=torch.float64, device=device),
                 chunk_size=5)
    # A retained graph serves any number of backwards, each with its own upstream gradient, each gradient on
    # its own or accumulated into .grad (the gradients computed in the forward must come out unchanged).
    h = hidden.clone().requires_grad_(True)
    loss = fusedops.linear_cross_entropy(h, weight, target)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    for scales in ((1.0, 2.0, 1.0), (2.0, 1.0, -0.5)):
        h = hidden.clone().requires_grad_(True)
        loss = fusedops.linear_cross_entropy(h, weight, target)
        for g in scales:
            h.grad = None
            (loss * g).backward(retain_graph=True)
            close(h.grad, g * first, torch.float32, f"upstream {g} in {scales}")
        h.grad = None
        for g in scales:
            (loss * g).backward(retain_graph=True)
        close(h.grad, sum(scales) * first, torch.float32, f"accumulated over {scales}")
    # Not retained: the last use, scaled in place.
    h = hidden.clone().requires_grad_(True)
    (fusedops.linear_cross_entropy(h, weight, target) * 2).backward()
    close(h.grad, 2 * first, torch.float32, "upstream 2, graph freed")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivative_refused(backend, device, reduction):
    hidden, weight, bias, target = problem(6, 8, 11, device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        gh, gw = torch.autograd.grad(fusedops.linear_cross_entropy(h, w, target, reduction=reduction).sum(),
                                     (h, w), create_graph=True)
        torch.autograd.grad((gh * gh).sum() + (gw * gw).sum() + (h * h).sum(), (h, w))


def test_deterministic(backend, device):
    hidden, weight, bias, target = problem(64 if backend == "cpu" else 24, 32, 257, device)
    grads = []
    for _ in range(2):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        fusedops.linear_cross_entropy(h, w, target, b, chunk_size=9, label_smoothing=0.1).backward()
        grads.append((h.grad, w.grad, b.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b), "linear_cross_entropy gradients differ between two identical runs"


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_the_logits(backend, device):
    n, h, v, chunk = 60, 8, 150, 8
    hidden, weight, bias, target = problem(n, h, v, device)
    for reduction in ("mean", "none"):
        hh, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        mode = _LargestTensor()
        with mode:
            fusedops.linear_cross_entropy(hh, w, target, b, chunk_size=chunk, reduction=reduction).sum().backward()
        assert mode.largest <= max(chunk * v, v * h), f"a tensor of {mode.largest} elements was created (N×V = {n * v})"


def test_bad_arguments(backend, device):
    hidden, weight, bias, target = problem(6, 8, 10, device)
    lce = fusedops.linear_cross_entropy
    cases = [
        (lambda: lce(hidden, weight[:, :5], target), ValueError, "same H"),
        (lambda: lce(hidden, weight.double(), target), TypeError, "must have hidden's dtype"),
        (lambda: lce(hidden.long(), weight, target), TypeError, "hidden must be"),
        (lambda: lce(hidden, weight, target[:4]), ValueError, "target must have shape"),
        (lambda: lce(hidden, weight, target.float()), TypeError, "integer class indices"),
        (lambda: lce(hidden, weight, target, bias[:3]), ValueError, "bias must be"),
        (lambda: lce(hidden, weight, target, chunk_size=0), ValueError, "chunk_size"),
        (lambda: lce(hidden, weight, target, reduction="max"), ValueError, "reduction"),
        (lambda: lce(hidden, weight, target, label_smoothing=2.0), ValueError, "label_smoothing"),
        (lambda: lce(hidden, weight, target, class_weight=torch.ones(3, device=device)), ValueError, "weight"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()
    if backend == "cpu":
        bad = target.clone()
        bad[2] = 10
        with pytest.raises(IndexError, match=r"target\[2\] = 10 is out of range"):
            lce(hidden, weight, bad)


def test_module(backend, device):
    hidden, weight, bias, target = problem(10, 8, 30, device)
    m = fusedops.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=3)
    expected, _ = reference.linear_cross_entropy(hidden, weight, target, bias, label_smoothing=0.1)
    close(m(hidden, weight, target, bias), expected, torch.float32, "module loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_weight_gradient_summed_in_fp32_over_chunks(backend, device, dtype):
    """Many chunks of a 16-bit weight: dW is summed in fp32 and rounded once, so its error stays at torch's
    own 16-bit error (rounded to 16 bits after every chunk it grew with the number of chunks: ~10x at 128)."""
    n, h, v = (2048, 32, 64) if backend == "cpu" else (512, 16, 24)
    hidden, weight, bias, target = problem(n, h, v, device, dtype=dtype)
    w = weight.detach().clone().requires_grad_(True)
    fusedops.linear_cross_entropy(hidden, w, target, reduction="sum", chunk_size=16).backward()
    wt = weight.detach().clone().requires_grad_(True)  # torch's own 16-bit path: one GEMM for dW
    torch.nn.functional.cross_entropy(hidden @ wt.t(), target, reduction="sum").backward()
    wr = weight.detach().double().requires_grad_(True)
    reference.linear_cross_entropy(hidden.double(), wr, target, reduction="sum")[0].backward()
    ours, torchs = ((g.double() - wr.grad).abs().max().item() for g in (w.grad, wt.grad))
    assert w.grad.dtype == dtype
    assert ours <= 2 * torchs + 1e-3 * wr.grad.abs().max().item(), (ours, torchs)
