"""fusedops.cross_entropy on every backend, against torch.nn.functional.cross_entropy run in float64 (for
everything torch has) and against fusedops.reference.cross_entropy, a plain float64 reference (for the
extras: z_loss, softcap, return_lse). Gradients are compared with random upstream gradients, in each of
the three ways the gradient can be produced (grad_mode 0: recomputed in the backward, 1: in the forward,
2: recomputed over the logits' buffer).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedops
from fusedops import reference

from conftest import backend_params, device_for

pytestmark = pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")

GRAD_MODES = [0, 1, 2]
TOL = {  # (rtol, atol relative to the largest expected magnitude)
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 2e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.5e-2),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread by default: the machines these run on are shared, and many tiny calls that each wake a
    thread pool are slow there. Tests that take the `two_threads` fixture cover the split of rows over
    threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def two_threads(_one_thread):
    torch.set_num_threads(2)


def dtypes_for(backend):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend == "cpu" else [])


def close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    expected = expected.double()
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * max(scale, 0.1), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def make_inputs(rows, classes, dtype, device, *, ignore=None, ignore_index=-100, scale=3.0):
    """Random logits (never zeros) and targets; `ignore`: None, "some", "all" or "in_range" (ignore_index is
    a real class, and some targets equal it)."""
    x = (torch.randn(rows, classes, dtype=torch.float64) * scale + 0.5).to(dtype)
    t = torch.randint(0, classes, (rows,))
    if ignore == "some" and rows:
        t[torch.rand(rows) < 0.3] = ignore_index
        t[0] = ignore_index
    elif ignore == "all":
        t[:] = ignore_index
    elif ignore == "in_range" and rows:
        t[::2] = ignore_index
    return x.to(device), t.to(device)


def upstream(loss):
    """A random upstream gradient for loss (per token for reduction none)."""
    g = torch.randn(loss.shape, dtype=torch.float64) + 0.5
    return g.to(loss.device)


def fused_loss_and_grad(x, t, grad_mode, g=None, **kwargs):
    xx = x.detach().clone().requires_grad_(True)
    out = fusedops.cross_entropy(xx, t, _grad_mode=grad_mode, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    if g is None:
        g = upstream(loss)
    loss.backward(g.to(loss.dtype))
    return out, xx.grad, g


def torch_loss_and_grad(x, t, g, **kwargs):
    xr = x.detach().double().requires_grad_(True)
    if kwargs.get("weight") is not None:
        kwargs = dict(kwargs, weight=kwargs["weight"].double())
    loss = F.cross_entropy(xr, t, **kwargs)
    loss.backward(g.double())
    return loss.detach(), xr.grad


# ---- parity with torch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("ignore", [None, "some", "all", "in_range"])
def test_matches_torch(backend, device, reduction, weighted, label_smoothing, ignore):
    rows, classes = (13, 301) if backend != "cpu" else (37, 1001)
    ignore_index = 7 if ignore == "in_range" else -100
    x, t = make_inputs(rows, classes, torch.float32, device, ignore=ignore, ignore_index=ignore_index)
    w = (torch.rand(classes, dtype=torch.float64) + 0.1).float().to(device) if weighted else None
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    for mode in GRAD_MODES:
        loss, grad, g = fused_loss_and_grad(x, t, mode, **kw)
        ref_loss, ref_grad = torch_loss_and_grad(x, t, g, **kw)
        assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
        close(loss, ref_loss, torch.float32, f"loss (grad_mode {mode})")
        close(grad, ref_grad, torch.float32, f"grad (grad_mode {mode})")
        if ignore == "all" and reduction == "mean":
            assert torch.isnan(loss).item()  # 0/0, as torch
        if ignore is not None:
            assert (grad[t.cpu() == ignore_index] == 0).all(), "ignored tokens must get a zero gradient"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dtypes(backend, device, reduction):
    classes = 257 if backend != "cpu" else 3001
    w = torch.rand(classes, dtype=torch.float64) + 0.1
    for dtype in dtypes_for(backend):
        x, t = make_inputs(9, classes, dtype, device, ignore="some")
        kw = dict(weight=w.to(dtype).to(device), reduction=reduction, label_smoothing=0.05)
        for mode in GRAD_MODES:
            loss, grad, g = fused_loss_and_grad(x, t, mode, **kw)
            assert loss.dtype == dtype and grad.dtype == dtype
            ref_loss, ref_grad = torch_loss_and_grad(x, t, g, **kw)
            close(loss, ref_loss, dtype, f"{dtype} loss (grad_mode {mode})")
            close(grad, ref_grad, dtype, f"{dtype} grad (grad_mode {mode})")


def test_none_reduction_weights_ignore_upstream(backend, device):
    """reduction="none" with per-token upstream gradients, class weights and ignored tokens together: each
    row's gradient is scaled by its own upstream gradient and its target's weight (a known failure of
    implementations that precompute the gradient)."""
    rows, classes = 12, 97
    x, t = make_inputs(rows, classes, torch.float32, device, ignore="some")
    w = (torch.rand(classes) * 3).to(device)
    g = (torch.randn(rows) * 4).double().to(device)
    for mode in GRAD_MODES:
        loss, grad, _ = fused_loss_and_grad(x, t, mode, g, weight=w, reduction="none", label_smoothing=0.1)
        ref_loss, ref_grad = torch_loss_and_grad(x, t, g, weight=w, reduction="none", label_smoothing=0.1)
        close(loss, ref_loss, torch.float32, "loss")
        close(grad, ref_grad, torch.float32, f"grad (grad_mode {mode})")


# ---- the extras, against the plain reference -------------------------------------------------------------

@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extras_match_reference(backend, device, z_loss, softcap, reduction):
    rows, classes = (11, 203) if backend != "cpu" else (29, 2051)
    x, t = make_inputs(rows, classes, torch.float32, device, ignore="some")
    w = (torch.rand(classes) + 0.2).to(device)
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=z_loss, softcap=softcap)
    for mode in GRAD_MODES:
        for return_lse in ([False, True] if mode != 1 else [False]):
            xx = x.clone().requires_grad_(True)
            out = fusedops.cross_entropy(xx, t, return_lse=return_lse, _grad_mode=mode, **opts)
            xr = x.double().requires_grad_(True)
            ref_loss, ref_lse = reference.cross_entropy(xr, t, **opts)
            if return_lse:
                loss, lse = out
                close(lse, ref_lse, torch.float32, "lse")
                assert lse.dtype == torch.float32 and lse.shape == t.shape
                g, g_lse = upstream(loss), upstream(lse)
                torch.autograd.backward([loss, lse], [g.float(), g_lse.float()])
                torch.autograd.backward([ref_loss, ref_lse], [g, g_lse])
            else:
                loss = out
                g = upstream(loss)
                loss.backward(g.float())
                ref_loss.backward(g)
            close(loss, ref_loss, torch.float32, f"loss (grad_mode {mode}, return_lse {return_lse})")
            close(xx.grad, xr.grad, torch.float32, f"grad (grad_mode {mode}, return_lse {return_lse})")


def test_lse_of_ignored_and_masked_rows(backend, device):
    x, t = make_inputs(6, 40, torch.float32, device)
    x[1, :] = -math.inf
    t[2] = -100
    loss, lse = fusedops.cross_entropy(x, t, reduction="none", return_lse=True)
    assert lse[2].item() == 0.0 and loss[2].item() == 0.0
    assert lse[1].item() == -math.inf  # log 0; the loss is NaN (0/0) as torch's
    assert math.isnan(loss[1].item())
    close(lse[[0, 3, 4, 5]], torch.logsumexp(x[[0, 3, 4, 5]].double(), 1), torch.float32, "lse")


# ---- shapes, sizes, layouts -----------------------------------------------------------------------------

def vocab_sizes(backend):
    sizes = [1, 2, 3, 33, 2047, 2049, 4099]  # around the CUDA kernels' warp/block switch (2048)
    if backend == "cpu":
        sizes += [50257, 128256]
    return sizes + [262147]  # past 256k (2 rows: affordable even emulated, one block per row)


def test_vocab_sizes(backend, device, two_threads):
    for classes in vocab_sizes(backend):
        rows = 5 if classes < 5000 else (3 if classes < 200000 else 2)
        for dtype in ([torch.float32, torch.bfloat16] if classes < 100000 or classes > 200000 else [torch.float32]):
            x, t = make_inputs(rows, classes, dtype, device, ignore=None)
            for mode in GRAD_MODES:
                loss, grad, g = fused_loss_and_grad(x, t, mode, label_smoothing=0.1)
                ref_loss, ref_grad = torch_loss_and_grad(x, t, g, label_smoothing=0.1)
                close(loss, ref_loss, dtype, f"V={classes} {dtype} loss (grad_mode {mode})")
                close(grad, ref_grad, dtype, f"V={classes} {dtype} grad (grad_mode {mode})")


@pytest.mark.parametrize("backend", backend_params(emulated=False))
def test_large_gradient_streamed(backend, two_threads):
    """Gradients of 16 MiB and more are written with non-temporal stores on the CPU."""
    device = device_for(backend)
    with fusedops.backend(backend):
        for dtype in (torch.float32, torch.bfloat16):
            x, t = make_inputs(70, 128256 if dtype == torch.bfloat16 else 60001, dtype, device, ignore="some")
            for mode in GRAD_MODES:
                loss, grad, g = fused_loss_and_grad(x, t, mode)
                ref_loss, ref_grad = torch_loss_and_grad(x, t, g)
                close(loss, ref_loss, dtype, f"{dtype} loss (grad_mode {mode})")
                close(grad, ref_grad, dtype, f"{dtype} grad (grad_mode {mode})")


@pytest.mark.parametrize("shape", [(17,), (5, 17), (3, 17, 4), (2, 17, 3, 2), (0, 17), (0, 17, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes(backend, device, shape, reduction):
    x = (torch.randn(shape) * 2).to(device)
    classes = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, classes, tshape).to(device)
    w = (torch.rand(classes) + 0.5).to(device)
    for mode in GRAD_MODES:
        loss, grad, g = fused_loss_and_grad(x, t, mode, weight=w, reduction=reduction)
        ref_loss, ref_grad = torch_loss_and_grad(x, t, g, weight=w, reduction=reduction)
        assert loss.shape == ref_loss.shape and grad.shape == x.shape
        close(loss, ref_loss, torch.float32, f"loss (grad_mode {mode})")
        close(grad, ref_grad, torch.float32, f"grad (grad_mode {mode})")


def test_non_contiguous_inputs(backend, device):
    base = (torch.randn(10, 70, dtype=torch.float64) * 2).float().to(device)
    cases = {
        "row stride > classes": base[:, 3:60],
        "odd offset (unaligned rows)": base.reshape(-1)[1:1 + 9 * 67].reshape(9, 67),
        "column stride 2": base[:, ::2],
        "transposed": base[:, :10].t(),
        "expanded rows": base[0:1, :33].expand(8, 33),
    }
    for name, x in cases.items():
        t = torch.randint(0, x.shape[1], (x.shape[0],)).to(device)
        for mode in GRAD_MODES:
            loss, grad, g = fused_loss_and_grad(x, t, mode, label_smoothing=0.1)
            ref_loss, ref_grad = torch_loss_and_grad(x, t, g, label_smoothing=0.1)
            close(loss, ref_loss, torch.float32, f"{name}: loss (grad_mode {mode})")
            close(grad, ref_grad, torch.float32, f"{name}: grad (grad_mode {mode})")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_nan_and_inf_propagate_as_torch(backend, device, label_smoothing):
    x, t = make_inputs(8, 50, torch.float32, device)
    x[0, 5] = math.nan        # NaN anywhere: the token's loss and gradient are NaN
    x[1, 7] = math.inf        # +inf: NaN as well (inf - inf)
    x[2, :] = -math.inf       # all -inf: 0/0
    x[3, 3:9] = -math.inf     # masked classes: finite, zero probability
    x[4, 11] = -math.inf      # ... and the target among them: infinite loss
    t[3], t[4] = 20, 11
    for reduction in ["none", "sum"]:
        for mode in GRAD_MODES:
            loss, grad, g = fused_loss_and_grad(x, t, mode, reduction=reduction, label_smoothing=label_smoothing)
            ref_loss, ref_grad = torch_loss_and_grad(x, t, g, reduction=reduction, label_smoothing=label_smoothing)
            close(loss, ref_loss, torch.float32, f"loss (grad_mode {mode})")
            close(grad, ref_grad, torch.float32, f"grad (grad_mode {mode})")
    if label_smoothing == 0:
        assert (grad[3, 3:9] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_rounded_to_nearest(backend, device, dtype):
    """16-bit gradients are the exact gradient rounded to nearest: at most one unit in the last place off
    the float64 reference rounded to the dtype (our exp is not exact either), and nearly all equal to it. A
    gradient rounded by truncation, or twice, misses the second bound by far. Upstream gradient 1 keeps
    the fused gradient unscaled; the rows are long enough for the streaming stores on the CPU."""
    rows, classes = (4, 1000) if backend != "cpu" else (64, 70001)
    x, t = make_inputs(rows, classes, dtype, device)
    for mode in GRAD_MODES:
        _, grad, _ = fused_loss_and_grad(x, t, mode, g=torch.ones((), dtype=torch.float64), reduction="sum")
        _, ref = torch_loss_and_grad(x, t, torch.ones((), dtype=torch.float64), reduction="sum")
        expected = ref.to(dtype)
        # Distance in representable values: the bit patterns of same-signed 16-bit floats are ordered.
        bits = lambda v: v.cpu().view(torch.int16).to(torch.int32)
        same_sign = torch.sign(grad.cpu().float()) * torch.sign(expected.cpu().float()) >= 0
        ulps = (bits(grad) - bits(expected)).abs()
        assert same_sign.all() and ulps.max().item() <= 1, f"grad_mode {mode}: {ulps.max().item()} ulps off"
        assert (ulps == 0).float().mean().item() > 0.99, f"grad_mode {mode}: {(ulps != 0).sum().item()} rounded off"


def test_nan_payloads_stay_nan_in_16bit_gradients(backend, device):
    """A class weight, or an upstream gradient of the (fp32) logsumexp, that is a NaN with payload bits
    arithmetic never makes still gives NaN gradients in bf16, where a cheap fp32 -> bf16 rounding would
    carry it into inf or a zero."""
    odd_nans = torch.tensor([0x7FFFFFFF, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(odd_nans).all()
    x, t = make_inputs(6, 300, torch.bfloat16, device)
    for mode in GRAD_MODES:
        for odd in odd_nans:  # assigned as tensors: a Python float would come back a plain NaN
            w = torch.rand(300) + 0.5
            w[t[4]] = odd
            _, grad, _ = fused_loss_and_grad(x, t, mode, weight=w.to(device), reduction="sum")
            assert torch.isnan(grad[4]).all(), f"grad_mode {mode}: row 4 of the gradient is not all NaN"
            assert torch.isfinite(grad[[0, 1, 2, 3, 5]]).all()
            if mode == 1:
                continue  # the gradient made in the forward cannot take the lse's
            xx = x.detach().clone().requires_grad_(True)
            loss, lse = fusedops.cross_entropy(xx, t, reduction="none", return_lse=True, _grad_mode=mode)
            g_lse = torch.rand(6, dtype=torch.float32)
            g_lse[1] = odd
            torch.autograd.backward([loss, lse], [torch.ones_like(loss), g_lse.to(device)])
            assert torch.isnan(xx.grad[1]).all(), f"grad_mode {mode}: row 1 of the gradient is not all NaN"
            assert torch.isfinite(xx.grad[[0, 2, 3, 4, 5]]).all()


def test_ignored_rows_skip_their_logits(backend, device):
    """Ignored tokens cost no softmax work, so their logits are not even looked at: NaN there changes
    nothing (torch's gradient for such rows is NaN, an artifact of its log_softmax backward)."""
    x, t = make_inputs(6, 30, torch.float32, device)
    x[2] = math.nan
    t[2] = -100
    for mode in GRAD_MODES:
        loss, grad, _ = fused_loss_and_grad(x, t, mode)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (grad[2] == 0).all()


def test_out_of_range_targets(backend, device):
    x, t = make_inputs(5, 10, torch.float32, device)
    for bad in (10, -1, -101):
        tb = t.clone()
        tb[3] = bad
        if backend == "cpu":
            with pytest.raises(IndexError, match=r"target\[3\] = %d is out of range" % bad):
                fusedops.cross_entropy(x, tb)
        else:  # the CUDA kernels cannot raise: the row's loss and gradient are NaN
            loss, grad, _ = fused_loss_and_grad(x, tb, 0, reduction="none")
            assert math.isnan(loss[3].item()) and torch.isnan(grad[3]).all()
            assert torch.isfinite(loss[[0, 1, 2, 4]]).all()
            assert math.isnan(fusedops.cross_entropy(x, tb).item())


# ---- autograd -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params(emulated=False, cuda=False))
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, mode, reduction):
    with fusedops.backend(backend):
        x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([1, 8, -100, 0, 4, 4])
        w = torch.rand(9, dtype=torch.float64) + 0.1
        opts = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=0.01, softcap=2.5)
        assert torch.autograd.gradcheck(lambda x: fusedops.cross_entropy(x, t, _grad_mode=mode, **opts), (x,))
        if mode == 0:
            assert torch.autograd.gradcheck(
                lambda x: fusedops.cross_entropy(x, t, return_lse=True, **opts), (x,))


def test_inplace_backward(backend, device):
    h = torch.randn(7, 16, device=device, requires_grad=True)
    wmat = torch.randn(50, 16, device=device, requires_grad=True)
    t = torch.randint(0, 50, (7,), device=device)
    seen = []
    logits = h @ wmat.t()
    logits.register_hook(lambda g: seen.append(g))
    loss = fusedops.cross_entropy(logits, t, inplace_backward=True)
    loss.backward()
    assert seen[0].data_ptr() == logits.data_ptr(), "the gradient should live in the logits' buffer"
    h2, w2 = h.detach().clone().requires_grad_(True), wmat.detach().clone().requires_grad_(True)
    F.cross_entropy(h2 @ w2.t(), t).backward()
    close(h.grad, h2.grad, torch.float32, "hidden grad")
    close(wmat.grad, w2.grad, torch.float32, "weight grad")

    loss = fusedops.cross_entropy(h @ wmat.t(), t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the logits were overwritten by the first backward
        loss.backward()


def test_inplace_backward_on_logits_it_cannot_overwrite(backend, device):
    """Rows that overlap (an expanded tensor) or strided classes cannot take the gradient in place: the
    gradient then gets its own buffer, as without inplace_backward, and matches torch's."""
    t = torch.tensor([1, 2, 3, 6])
    views = {"expanded": ((1, 7), lambda b: b.expand(4, 7)),
             "rows one apart": ((1, 10), lambda b: b.as_strided((4, 7), (1, 1))),
             "strided classes": ((4, 14), lambda b: b[:, ::2])}
    for what, (shape, view) in views.items():
        base = torch.randn(*shape, dtype=torch.float64)
        x = base.to(device=device, dtype=torch.float32).requires_grad_(True)
        fusedops.cross_entropy(view(x), t.to(device), label_smoothing=0.1, inplace_backward=True).backward()
        xr = base.clone().requires_grad_(True)
        F.cross_entropy(view(xr), t, label_smoothing=0.1).backward()
        close(x.grad, xr.grad, torch.float32, f"grad through {what} logits")


@pytest.mark.parametrize("extra", [dict(label_smoothing=0.1), dict(z_loss=1e-2), dict()])
def test_mean_over_zero_total_weight_is_nan(backend, device, extra):
    """Every kept target of weight 0: torch's mean is 0/0 = NaN even though the smoothing term's sum is not 0
    (fusedops once gave inf)."""
    x, t = make_inputs(6, 5, torch.float32, device)
    t = torch.tensor([0, 1, 0, 1, -100, 1], device=device)
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0], device=device)
    loss = fusedops.cross_entropy(x, t, weight=w, **extra)
    assert torch.isnan(loss), loss
    if "z_loss" not in extra:
        assert torch.isnan(F.cross_entropy(x.cpu(), t.cpu(), weight=w.cpu(), **extra))
    assert torch.isnan(reference.cross_entropy(x.cpu(), t.cpu(), weight=w.cpu(), **extra)[0])


def test_inplace_backward_guards_other_users_of_the_logits(backend, device):
    """An op that saved the logits for its own backward must not silently read the gradient."""
    x = torch.randn(5, 20, device=device, requires_grad=True)
    t = torch.randint(0, 20, (5,), device=device)
    y = torch.tanh(x)  # tanh saves its output for its backward
    loss = fusedops.cross_entropy(y, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_gradient_scaled_by_upstream(backend, device):
    x, t = make_inputs(9, 40, torch.float32, device, ignore="some")
    for g in (1.0, 0.0, -2.5):
        loss, grad, _ = fused_loss_and_grad(x, t, 1, torch.tensor(g, dtype=torch.float64, device=device))
        _, ref_grad = torch_loss_and_grad(x, t, torch.tensor(g, dtype=torch.float64, device=device))
        close(grad, ref_grad, torch.float32, f"upstream {g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gradient_backward_twice(backend, device, dtype):
    """A retained graph backpropagated through again with other upstream gradients, each gradient on its own
    and accumulated into .grad: the saved gradient must come out of each backward unchanged (the first one's
    may be stolen as the leaf's .grad, and accumulation adds into that)."""
    x, t = make_inputs(9, 40, dtype, device, ignore="some")
    for scales in ((0.25, -3.0, 1.0, 0.25), (1.0, 0.5, 1.0), (0.0, 2.0)):
        xx = x.detach().clone().requires_grad_(True)
        loss = fusedops.cross_entropy(xx, t, _grad_mode=1)
        for g in scales:
            xx.grad = None
            loss.backward(torch.tensor(g, dtype=dtype, device=device), retain_graph=True)
            _, ref_grad = torch_loss_and_grad(x, t, torch.tensor(g, dtype=torch.float64, device=device))
            close(xx.grad, ref_grad, dtype, f"upstream {g} after {scales}")
        xx.grad = None
        for g in scales:
            loss.backward(torch.tensor(g, dtype=dtype, device=device), retain_graph=True)
        _, ref_grad = torch_loss_and_grad(x, t, torch.tensor(sum(scales), dtype=torch.float64, device=device))
        close(xx.grad, ref_grad, dtype, f"accumulated over {scales}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivative_refused(backend, device, reduction):
    """Differentiable once: autograd.grad's gradient does not require grad, and a second derivative through
    it raises (at the create_graph backward or at the second one), never a silently incomplete one; the
    extra term x² keeps the second derivative's graph connected to x whatever our part of it does."""
    x, t = make_inputs(6, 20, torch.float32, device, ignore="some")
    xx = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fusedops.cross_entropy(xx, t, reduction=reduction).sum(), xx)
    assert not g.requires_grad
    with pytest.raises(RuntimeError, match="differentiable once"):
        (g,) = torch.autograd.grad(fusedops.cross_entropy(xx, t, reduction=reduction).sum(), xx, create_graph=True)
        torch.autograd.grad((g * g).sum() + (xx * xx).sum(), xx)


def test_no_grad_and_detached(backend, device):
    x, t = make_inputs(4, 30, torch.float32, device)
    ref = F.cross_entropy(x.double(), t)
    with torch.no_grad():
        close(fusedops.cross_entropy(x.requires_grad_(True), t), ref, torch.float32, "no_grad")
    close(fusedops.cross_entropy(x.detach(), t), ref, torch.float32, "detached")


def test_deterministic(backend, device, two_threads):
    x, t = make_inputs(64 if backend == "cpu" else 16, 3001, torch.float32, device, ignore="some")
    runs = []
    for _ in range(2):
        loss, grad, _ = fused_loss_and_grad(x, t, 0, torch.tensor(1.0, device=device))
        runs.append((loss, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpu_isa_variants(isa):
    if isa not in fusedops.build_info()["cpu_isas_available"]:
        pytest.skip(f"{isa} does not run here")
    previous = fusedops.build_info()["cpu_isa"]
    fusedops.set_cpu_isa(isa)
    try:
        with fusedops.backend("cpu"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for classes in (1, 7, 37, 4133):
                    x, t = make_inputs(6, classes, dtype, "cpu", ignore="some")
                    for mode in GRAD_MODES:
                        kw = dict(label_smoothing=0.1, weight=(torch.rand(classes) + 0.5).to(dtype))
                        loss, grad, g = fused_loss_and_grad(x, t, mode, **kw)
                        ref_loss, ref_grad = torch_loss_and_grad(x, t, g, **kw)
                        close(loss, ref_loss, dtype, f"{isa} {dtype} V={classes} loss")
                        close(grad, ref_grad, dtype, f"{isa} {dtype} V={classes} grad")
    finally:
        fusedops.set_cpu_isa(previous)


def test_module_mirrors_torch(backend, device):
    classes = 23
    w = (torch.rand(classes) + 0.5).to(device)
    x, t = make_inputs(8, classes, torch.float32, device, ignore="some")
    for kwargs in [dict(), dict(weight=w, reduction="sum", label_smoothing=0.2), dict(reduction="none"),
                   dict(size_average=False), dict(reduce=False)]:
        ours = fusedops.CrossEntropyLoss(**kwargs).to(device)
        theirs = torch.nn.CrossEntropyLoss(**kwargs).to(device)
        close(ours(x, t), theirs(x.double(), t) if "weight" not in kwargs else
              torch.nn.CrossEntropyLoss(**dict(kwargs, weight=w.double()))(x.double(), t), torch.float32, str(kwargs))
    m = fusedops.CrossEntropyLoss(weight=w, z_loss=1e-4, softcap=30.0)
    assert "weight" in m.state_dict() and "z_loss=0.0001" in repr(m)
    loss, lse = fusedops.CrossEntropyLoss(return_lse=True)(x, t)
    assert lse.shape == t.shape


# ---- bad arguments --------------------------------------------------------------------------------------

def test_bad_arguments(backend, device):
    x, t = make_inputs(4, 10, torch.float32, device)
    ce = fusedops.cross_entropy
    cases = [
        (lambda: ce(x.long(), t), TypeError, "input must be float32"),
        (lambda: ce(x[0, 0], t), ValueError, "class dimension"),
        (lambda: ce(x, t.float()), TypeError, "integer class indices"),
        (lambda: ce(x, torch.rand(4, 10, device=device)), NotImplementedError, "probability"),
        (lambda: ce(x, t[:3]), ValueError, r"target must have shape \(4,\)"),
        (lambda: ce(x, t, weight=torch.ones(9, device=device)), ValueError, r"weight must have shape \(10,\)"),
        (lambda: ce(x, t, weight=torch.ones(10, dtype=torch.long, device=device)), TypeError, "weight must be"),
        (lambda: ce(x, t, reduction="avg"), ValueError, "reduction must be"),
        (lambda: ce(x, t, label_smoothing=1.5), ValueError, "label_smoothing must be finite and in"),
        (lambda: ce(x, t, label_smoothing=-0.1), ValueError, "label_smoothing must be finite and in"),
        (lambda: ce(x, t, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: ce(x, t, z_loss=math.nan), ValueError, "z_loss"),
        (lambda: ce(x, t, softcap=0.0), ValueError, "softcap must be positive"),
        (lambda: ce(x, t, softcap=math.inf), ValueError, "softcap"),
        (lambda: ce(x, t, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: ce(x, t, weight=torch.ones(10, device=device, requires_grad=True)), NotImplementedError, "weight"),
        (lambda: ce(x, "t"), TypeError, "target must be a Tensor"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_op_checks_its_arguments(backend, device):
    """torch.ops.fusedops.* can be called directly: the binding checks everything again."""
    from fusedops import _backend

    code = _backend.resolve("cross_entropy", device)
    op = torch.ops.fusedops.cross_entropy_forward
    x, t = make_inputs(4, 10, torch.float32, device)
    ok = (x, t, None, None, -100, 1, 0.0, 0.0, 0.0, 0, code)

    def call(**changes):
        names = ["logits", "target", "weight", "grad_scale", "ignore_index", "reduction", "label_smoothing", "z_loss",
                 "softcap", "grad_mode", "backend"]
        args = dict(zip(names, ok))
        args.update(changes)
        return op(*[args[n] for n in names])

    cases = [
        (dict(logits=x[0]), "logits must be 2-D"),
        (dict(logits=x[:, :0]), "at least one class"),
        (dict(target=t.int()), "target must be int64"),
        (dict(target=t[:2]), "target must have shape"),
        (dict(weight=torch.ones(3, device=device)), "weight must have shape"),
        (dict(reduction=3), "reduction must be"),
        (dict(label_smoothing=2.0), "label_smoothing"),
        (dict(softcap=-1.0), "softcap"),
        (dict(grad_mode=5), "grad_mode"),
        (dict(backend=7), "backend code"),
    ]
    if backend != "cpu":
        cases.append((dict(logits=x.double()), "logits must have dtype"))
    for changes, pattern in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            call(**changes)
    bwd = torch.ops.fusedops.cross_entropy_backward
    _, lse, _ = call()
    with pytest.raises(ValueError, match="grad_loss must be a scalar"):
        bwd(torch.ones(4, device=device), None, x, t, None, lse, -100, 1, 0.0, 0.0, 0.0, 0, 10, code)
    with pytest.raises(ValueError, match="shard"):
        bwd(torch.ones((), device=device), None, x, t, None, lse, -100, 1, 0.0, 0.0, 0.0, 5, 10, code)
    with pytest.raises(ValueError, match="written in place"):
        torch.ops.fusedops.cross_entropy_backward_(torch.ones((), device=device), None, x[:, ::2], t, None, lse, -100,
                                                   1, 0.0, 0.0, 0.0, 0, 5, code)


# ---- the transposed (columns) layout of the CPU in-place forward ------------------------------------------

def _columns(x: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """x (rows, classes) as the transpose of a contiguous (classes, rows + pad) buffer (pad: rows of slack
    that must stay untouched, poisoned with NaN)."""
    rows, classes = x.shape
    buf = torch.full((classes, rows + pad), math.nan, dtype=x.dtype)
    buf[:, :rows] = x.t()
    return buf[:, :rows].t()


@pytest.fixture(params=["base", "avx2", "avx512"])
def cpu_isa(request):
    if request.param not in fusedops.build_info()["cpu_isas_available"]:
        pytest.skip(f"{request.param} does not run here")
    previous = fusedops.build_info()["cpu_isa"]
    fusedops.set_cpu_isa(request.param)
    yield request.param
    fusedops.set_cpu_isa(previous)


@pytest.mark.parametrize("rows, classes", [(2, 2), (13, 17), (37, 33), (300, 50), (9, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_columns_layout_forward_grad(rows, classes, dtype, cpu_isa, two_threads):
    """linear_cross_entropy's CPU chunks are (classes, rows) matrices seen transposed: the in-place forward
    takes them as they are. Against the float64 reference: rows not a multiple of the vector width, more
    rows than a thread's tile (300), classes not a multiple of the kernel's class chunk, ignored rows (whole
    vectors of them, and a NaN logit in one), weights, smoothing, z-loss, a grad scale, every reduction."""
    ops = torch.ops.fusedops
    x, t = make_inputs(rows, classes, dtype, "cpu", ignore="some")
    x_ref = x.clone()
    if rows >= 24:
        t[8:24] = -100  # two whole AVX2 vectors (one AVX-512 vector) of ignored rows
        x[9, 0] = math.nan  # ignored: its gradient is 0 all the same (the reference would say NaN)
    weight = torch.rand(classes) + 0.5
    for reduction, name in ((0, "none"), (1, "mean"), (2, "sum")):
        for kw in (dict(), dict(label_smoothing=0.2, z_loss=1e-3)):
            eps, z = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
            cols = _columns(x, pad=3)
            scale = torch.tensor(0.75)
            loss, lse = ops.cross_entropy_forward_grad_(cols, t, weight, scale, -100, reduction, eps, z, 0.0, 0)
            xr = x_ref.double().requires_grad_(True)
            ref_loss, ref_lse = reference.cross_entropy(xr, t, weight, reduction=name, **kw)
            (ref_loss.sum() * 0.75).backward()
            close(loss, ref_loss.detach(), dtype, f"loss ({name}, {kw})")
            close(lse, ref_lse.detach(), torch.float32, f"lse ({name}, {kw})")
            close(cols, xr.grad, dtype, f"grad ({name}, {kw})")
            assert torch.isnan(cols._base[:, rows:]).all(), "the kernel wrote outside the logits"


def test_columns_layout_only_where_supported():
    """The transposed layout is the CPU forward's alone: with a softcap, or on the emulated CUDA kernels, it
    is refused with the layout named (never read as if rows were contiguous)."""
    ops = torch.ops.fusedops
    x, t = make_inputs(8, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match="classes must be contiguous"):
        ops.cross_entropy_forward_grad_(_columns(x), t, None, None, -100, 1, 0.0, 0.0, 2.0, 0)
    with pytest.raises(ValueError, match="classes must be contiguous"):
        ops.cross_entropy_forward_grad_(_columns(x).double(), t, None, None, -100, 1, 0.0, 0.0, 0.0, 0)
    if "cuda-emulated" in fusedops.build_info()["backends"]:
        with pytest.raises(ValueError, match="classes must be contiguous"):
            ops.cross_entropy_forward_grad_(_columns(x), t, None, None, -100, 1, 0.0, 0.0, 0.0, 1)


# ---- torch.compile and the op registrations --------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params(emulated=False, cuda=False))
def test_opcheck(backend):
    ops = torch.ops.fusedops
    x = torch.randn(5, 11, requires_grad=True)
    t = torch.tensor([1, 3, -100, 10, 0])
    w = torch.rand(11) + 0.5
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, t, w, None, -100, 1, 0.1, 0.01, 2.0, 0, 0))
    # grad_mode 1 refuses a gradient for its lse output (the public API never returns that lse), which the
    # aot_dispatch check feeds it.
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, t, w, None, -100, 1, 0.1, 0.01, 2.0, 1, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, t, None, None, -100, 0, 0.0, 0.0, 0.0, 0, 0))
    _, lse, _ = ops.cross_entropy_forward(x.detach(), t, w, None, -100, 0, 0.1, 0.0, 0.0, 0, 0)
    torch.library.opcheck(ops.cross_entropy_backward.default,
                          (torch.randn(5), None, x.detach(), t, w, lse, -100, 0, 0.1, 0.0, 0.0, 0, 11, 0))
    torch.library.opcheck(ops.cross_entropy_stats.default,
                          (x.detach(), t, torch.rand(20) + 0.5, -100, 3.0, 2, 20, True, 0))
    torch.library.opcheck(ops.cross_entropy_forward_grad_.default,
                          (x.detach().clone(), t, w, torch.tensor(0.5), -100, 2, 0.0, 0.0, 0.0, 0))


@pytest.mark.parametrize("backend", backend_params(emulated=False, cuda=False))
def test_torch_compile(backend):
    with fusedops.backend(backend):
        x, t = make_inputs(8, 50, torch.float32, "cpu", ignore="some")
        w = torch.rand(50) + 0.5

        def fn(x, t):
            return fusedops.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0) * 2

        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        for mode_x in (x.clone().requires_grad_(True), x.clone()):
            got = compiled(mode_x, t)
            expected = fn(x, t)
            close(got, expected, torch.float32, "compiled loss")
            if mode_x.requires_grad:
                got.backward()
                x2 = x.clone().requires_grad_(True)
                fn(x2, t).backward()
                close(mode_x.grad, x2.grad, torch.float32, "compiled grad")


# ---- the reused gradient buffer (fusedops.empty_cache) ---------------------------------------------------
# Large CPU gradients go into the previous call's gradient buffer once nothing refers to it: the suite's
# poisoning fills a reused buffer with NaN too, so a stale element from the previous call shows. Whether a
# buffer was reused is told by the slot's count of reuses: data_ptr cannot tell, since a freed buffer's pages
# are often mapped again at the same address.

REUSE_ROWS, REUSE_CLASSES = 256, 33000  # 33.8 MB of fp32: above the 32 MiB threshold


def reuses():
    return fusedops._C.reuse_cache_hits()


@pytest.mark.parametrize("grad_mode", [0, 1])
def test_gradient_buffer_reused_only_when_free(grad_mode):
    fusedops.empty_cache()
    assert fusedops.cached_bytes() == 0
    x, t = make_inputs(REUSE_ROWS, REUSE_CLASSES, torch.float32, "cpu", ignore="some")
    # grad_mode 1 with an upstream gradient of 1 passes the buffer on as it is (else scaled in place).
    g = torch.tensor(1.0, dtype=torch.float64) if grad_mode == 1 else upstream(torch.empty(REUSE_ROWS))
    reduction = "mean" if grad_mode == 1 else "none"
    _, expected = torch_loss_and_grad(x, t, g, reduction=reduction)

    n = reuses()
    _, first, _ = fused_loss_and_grad(x, t, grad_mode, g, reduction=reduction)
    close(first, expected, torch.float32, "first grad")
    assert fusedops.cached_bytes() == first.nbytes and reuses() == n
    kept = first.clone()

    # Still referenced (by `first`, or by a view of it alone): a fresh buffer, and the old one untouched.
    _, second, _ = fused_loss_and_grad(x, t, grad_mode, g, reduction=reduction)
    assert reuses() == n and second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)
    row = second[3]
    del first, second
    _, third, _ = fused_loss_and_grad(x, t, grad_mode, g, reduction=reduction)
    assert reuses() == n
    assert torch.equal(row, kept[3])
    close(third, expected, torch.float32, "third grad")

    # Free: reused, and written in full.
    third_ptr = third.data_ptr()
    del third, row
    _, fourth, _ = fused_loss_and_grad(x, t, grad_mode, g, reduction=reduction)
    assert reuses() == n + 1 and fourth.data_ptr() == third_ptr
    close(fourth, expected, torch.float32, "grad in the reused buffer")

    fusedops.empty_cache()
    assert fusedops.cached_bytes() == 0
    close(fourth, expected, torch.float32, "grad after empty_cache")  # the caller's tensor keeps its memory


@pytest.mark.parametrize("holder", ["numpy", "storage", "shared_memory"])
def test_gradient_buffer_not_reused_while_held_elsewhere(holder):
    """Holders that are not tensors: a numpy array over the gradient, its Python storage object, and another
    process (share_memory_ moves the storage to shared memory that a receiver may still map)."""
    fusedops.empty_cache()
    x, t = make_inputs(REUSE_ROWS, REUSE_CLASSES, torch.float32, "cpu")
    one = torch.tensor(1.0, dtype=torch.float64)
    _, grad, _ = fused_loss_and_grad(x, t, 1, one)
    kept = grad.clone()
    n = reuses()
    if holder == "numpy":
        held = grad.numpy()
    elif holder == "storage":
        held = grad.untyped_storage()
    else:
        grad.share_memory_()
        held = None  # only the shared memory is left, which another process could map
    del grad
    _, again, _ = fused_loss_and_grad(x, t, 1, one)
    assert reuses() == n
    if holder == "numpy":
        assert torch.equal(torch.from_numpy(held), kept)
    elif holder == "storage":
        assert torch.equal(torch.empty(0).set_(held).view_as(kept), kept)
    del held
    fusedops.empty_cache()


def test_gradient_buffer_size_rules():
    """Reused for a gradient that needs at least 80% of the buffer (the buffer at most a quarter larger than
    the request); otherwise replaced."""
    fusedops.empty_cache()
    one = torch.tensor(1.0, dtype=torch.float64)
    x, t = make_inputs(330, REUSE_CLASSES, torch.float32, "cpu")

    def grad_of(rows, dtype=torch.float32):
        _, grad, _ = fused_loss_and_grad(x[:rows].to(dtype), t[:rows], 1, one)
        _, expected = torch_loss_and_grad(x[:rows].to(dtype), t[:rows], one)
        close(grad, expected, dtype, f"grad of {rows} rows")
        return grad.nbytes

    n = reuses()
    nbytes = grad_of(330)
    assert fusedops.cached_bytes() == nbytes
    # bf16 of the same shape: under the 32 MiB threshold, so a plain allocation; the buffer stays.
    grad_of(330, torch.bfloat16)
    assert fusedops.cached_bytes() == nbytes and reuses() == n
    # 256 rows need 78% of the buffer: it is replaced.
    nbytes = grad_of(256)
    assert fusedops.cached_bytes() == nbytes and reuses() == n
    # Larger than the buffer: replaced; then a slightly smaller request reuses the larger buffer.
    nbytes = grad_of(260)
    assert fusedops.cached_bytes() == nbytes and reuses() == n
    grad_of(256)
    assert fusedops.cached_bytes() == nbytes and reuses() == n + 1
    fusedops.empty_cache()
    assert fusedops.cached_bytes() == 0
