"""The checks that `python -m fusedops.check` runs, for every op (see fusedops/check.py).

Each registered check is one small case; it returns one Result per dtype (or per optimizer variant), which
folds together every tensor the case compares (outputs, logsumexps, gradients, params, moments) and names the
worst of them in the note.

Errors are reported *relative* to the largest magnitude of the float64 reference (floored as in the tests),
so the "max error" and "tolerance" columns compare directly: a check passes when

    max |got - reference| / max |reference| <= tolerance

for every tensor it compares. The tolerances are those of tests/test_*.py (for the cross-entropies, whose
tests allow atol·scale + rtol·|expected|, atol + rtol), per dtype and, for attention, per backend (the CUDA
kernels, also under the emulator, may round P and dS to 16 bits for the tensor cores).

Inputs come from torch's default generator, which run_checks seeds for every check and backend; they are
drawn on the CPU and moved to the backend's device, so every backend sees the same numbers. Outputs the ops
allocate are poisoned (NaN) during the checks, so an element a kernel never writes fails the comparison. The
checks run on one CPU thread: the shapes are tiny, and a thread pool woken for each of hundreds of small calls
made the whole run 4x slower on a busy 2-core machine (the kernels' split over threads is covered by the
test suite).

gradcheck rows (float64, cpu backend only: the CUDA kernels and the emulator take fp32/fp16/bf16) run
torch.autograd.gradcheck and report the largest difference between the analytical and the numerical
(central-difference) Jacobian.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import traceback

import torch

import fusedops
from fusedops import reference as ref
from fusedops.check import Result, compare, register
from fusedops.optim import FusedAdam, FusedAdamW

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
_DTYPE_NAMES = {F64: "float64", F32: "float32", F16: "float16", BF16: "bfloat16"}


# ==== helpers ==============================================================================================

@contextlib.contextmanager
def _check_settings():
    """Outputs poisoned, one CPU thread (see the module docstring); restored afterwards."""
    poison, threads = fusedops._C.poison_outputs(), torch.get_num_threads()
    fusedops._C.set_poison_outputs(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        fusedops._C.set_poison_outputs(poison)


def check(op: str, name: str, backends: tuple[str, ...] = ("cpu", "cuda-emulated", "cuda")):
    """register(), with the settings of _check_settings while the check runs."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(backend, device):
            with _check_settings():
                return list(fn(backend, device))

        register(op, name, backends)(run)
        return fn

    return wrap


def _rand(*shape, dtype=F32, device="cpu", scale=1.0, shift=0.0, requires_grad=False):
    """Normal values drawn in float64 on the CPU (never zeros), rounded to `dtype`, moved to `device`."""
    t = (torch.randn(*shape, dtype=F64) * scale + shift).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    """The same values as float64 CPU leaf (the reference sees exactly the rounded inputs)."""
    return t.detach().cpu().double().requires_grad_(True)


def _scale_of(*expected: torch.Tensor, floor: float) -> float:
    """The largest finite |value| over the expected tensors, at least `floor`."""
    top = 0.0
    for e in expected:
        e = e.detach()
        finite = e[torch.isfinite(e)]
        if finite.numel():
            top = max(top, float(finite.abs().max()))
    return max(top, floor)


class _Case:
    """Collects the comparisons of one case and folds them into one Result."""

    def __init__(self, op: str, check: str, backend: str, dtype, note: str = ""):
        self.op, self.check, self.backend, self.note = op, check, backend, note
        self.dtype = dtype if isinstance(dtype, str) else _DTYPE_NAMES[dtype]
        self.parts: list[tuple[str, Result]] = []

    def close(self, what: str, got: torch.Tensor, expected: torch.Tensor, tol: float, *, scale: float | None = None,
              floor: float = 1e-6) -> None:
        """max |got - expected| / scale <= tol; scale = max |expected| (at least `floor`) unless given."""
        if tuple(got.shape) != tuple(expected.shape):
            self.parts.append((what, Result(self.op, self.check, self.backend, self.dtype, math.inf, tol, False,
                                            note=f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}")))
            return
        s = _scale_of(expected, floor=floor) if scale is None else max(scale, floor)
        r = compare(self.op, self.check, self.backend, got.detach().double().cpu() / s,
                    expected.detach().double().cpu() / s, atol=tol, rtol=0.0)
        self.parts.append((what, r))

    def result(self) -> Result:
        if not self.parts:
            return Result(self.op, self.check, self.backend, self.dtype, math.nan, 0.0, False, note="nothing compared")

        def badness(part):
            r = part[1]
            if not r.passed and not (r.max_abs_err > r.tolerance):
                return math.inf  # NaN/inf pattern or shape mismatch
            return r.max_abs_err / r.tolerance if r.tolerance > 0 else math.inf

        worst_name, worst = max(self.parts, key=badness)
        failed = [(n, r) for n, r in self.parts if not r.passed]
        if failed:
            names = [f"{n}{' (' + r.note.strip() + ')' if r.note.strip() else ''}" for n, r in failed]
            note = "FAIL: " + ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        else:
            note = f"worst: {worst_name}"
        if self.note:
            note = f"{self.note}; {note}"
        return Result(self.op, self.check, self.backend, self.dtype, worst.max_abs_err, worst.tolerance,
                      not failed, note=note)


def _guarded(op: str, check: str, backend: str, dtype, fn) -> Result:
    """fn(case) fills a _Case; an exception becomes a failed Result of this dtype only (not the whole check)."""
    case = _Case(op, check, backend, dtype)
    try:
        fn(case)
    except Exception as e:  # noqa: BLE001 - reported in the table
        if "--verbose" in sys.argv:
            traceback.print_exc()
        return Result(op, check, backend, case.dtype, math.nan, 0.0, False,
                      note=f"{type(e).__name__}: {e}".splitlines()[0][:120])
    return case.result()


def _as_vector(outputs) -> torch.Tensor:
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    return torch.cat([o.reshape(-1) for o in outputs])


def _jacobian_error(fn, inputs: tuple[torch.Tensor, ...], eps: float = 1e-6) -> float:
    """max |analytical - numerical| over the Jacobian of fn at `inputs` (float64; central differences)."""
    columns = []
    with torch.no_grad():
        for x in inputs:
            flat = x.data.view(-1)
            for i in range(flat.numel()):
                orig = float(flat[i])
                flat[i] = orig + eps
                plus = _as_vector(fn(*inputs))
                flat[i] = orig - eps
                minus = _as_vector(fn(*inputs))
                flat[i] = orig
                columns.append((plus - minus) / (2 * eps))
    numerical = torch.stack(columns, dim=1)  # (outputs, inputs)
    out = _as_vector(fn(*inputs))
    analytical = torch.zeros_like(numerical)
    for j in range(out.numel()):
        grads = torch.autograd.grad(out[j], inputs, retain_graph=True, allow_unused=True)
        analytical[j] = torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(-1)
                                   for g, x in zip(grads, inputs)])
    diff = (analytical - numerical).detach()[torch.isfinite(numerical)]
    return float(diff.abs().max()) if diff.numel() else 0.0


def _gradcheck(op: str, check: str, backend: str, fn, inputs, note: str = "") -> Result:
    """torch.autograd.gradcheck (its default tolerances: atol 1e-5, rtol 1e-3) of fn at float64 `inputs`."""
    try:
        passed = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
        err = _jacobian_error(fn, inputs)
    except Exception as e:  # noqa: BLE001
        return Result(op, check, backend, "float64", math.nan, 1e-5, False,
                      note=f"{type(e).__name__}: {e}".splitlines()[0][:120])
    return Result(op, check, backend, "float64", err, 1e-5, bool(passed),
                  note=(note + ("" if passed else "; gradcheck failed")).strip("; "))


# ==== attention =============================================================================================
# Tolerances of tests/test_attention.py: max |error| relative to the largest reference magnitude; gradients
# against the largest of the three reference gradients; the float32 lse against the float32 tolerance.

_ATT_TOL_CPU = {F32: 2e-5, F16: 4e-3, BF16: 3e-2, F64: 1e-6}
_ATT_TOL_GPU = {F32: 5e-3, F16: 1e-2, BF16: 5e-2, F64: 1e-6}
_ATT_DTYPES = (F32, BF16, F16)


def _att_tol(backend: str, dtype) -> float:
    return (_ATT_TOL_CPU if backend == "cpu" else _ATT_TOL_GPU)[dtype]


def _att_grads(case: _Case, backend: str, dtype, out, ref_out, inputs, ref_inputs, names="qkv"):
    g = _rand(*out.shape, dtype=dtype, device=out.device)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref_out, ref_inputs, g.detach().cpu().double())
    scale = _scale_of(*want, floor=1e-6)
    for n, a, e in zip(names, got, want):
        case.close(f"d{n}", a, e, _att_tol(backend, dtype), scale=scale)


def _qkv(B, Hq, Hkv, L, S, E, dtype, device, Ev=None):
    Ev = E if Ev is None else Ev
    return (_rand(B, Hq, L, E, dtype=dtype, device=device, requires_grad=True),
            _rand(B, Hkv, S, E, dtype=dtype, device=device, requires_grad=True),
            _rand(B, Hkv, S, Ev, dtype=dtype, device=device, requires_grad=True))


@check("attention", "sdpa GQA, bool mask+causal / additive")
def _attention_sdpa(backend, device):
    for dtype in _ATT_DTYPES:
        def run(case, dtype=dtype):
            # bool mask combined with top-left causal, L < S, GQA (fully masked rows give 0)
            q, k, v = _qkv(2, 4, 2, 37, 53, 32, dtype, device)
            mask = (torch.rand(37, 53) > 0.3).to(device)
            out = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
            qr, kr, vr = _leaf64(q), _leaf64(k), _leaf64(v)
            ro = ref.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask.cpu(), is_causal=True, enable_gqa=True)
            case.close("out", out, ro, _att_tol(backend, dtype))
            _att_grads(case, backend, dtype, out, ro, (q, k, v), (qr, kr, vr))
            # an additive per-head mask that requires grad, L > S, 3-D inputs
            q, k, v = (_rand(*s, dtype=dtype, device=device, requires_grad=True)
                       for s in ((2, 41, 32), (2, 23, 32), (2, 23, 32)))
            bias = _rand(2, 41, 23, dtype=dtype, device=device, requires_grad=True)
            out = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            leaves = tuple(_leaf64(t) for t in (q, k, v, bias))
            ro = ref.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
            case.close("out (additive)", out, ro, _att_tol(backend, dtype))
            _att_grads(case, backend, dtype, out, ro, (q, k, v, bias), leaves, names=("q'", "k'", "v'", "mask"))

        yield _guarded("attention", "sdpa GQA, bool mask+causal / additive", backend, dtype, run)


@check("attention", "causal, MQA, E=64 L=37 S=53")
def _attention_causal(backend, device):
    for dtype in _ATT_DTYPES:
        def run(case, dtype=dtype):
            q, k, v = _qkv(1, 4, 1, 37, 53, 64, dtype, device)
            out, lse = fusedops.attention(q, k, v, causal=True, return_lse=True)
            qr, kr, vr = _leaf64(q), _leaf64(k), _leaf64(v)
            ro, rl = ref.attention(qr, kr, vr, causal=True)
            case.close("out", out, ro, _att_tol(backend, dtype))
            case.close("lse", lse, rl, _att_tol(backend, F32))
            _att_grads(case, backend, dtype, out, ro, (q, k, v), (qr, kr, vr))

        yield _guarded("attention", "causal, MQA, E=64 L=37 S=53", backend, dtype, run)


@check("attention", "window+softcap+alibi+dropout L=45 S=29")
def _attention_options(backend, device):
    for dtype in _ATT_DTYPES:
        def run(case, dtype=dtype):
            q, k, v = _qkv(2, 2, 2, 45, 29, 32, dtype, device, Ev=16)
            slopes = torch.rand(2, 2).to(device)
            # the Philox key the op draws from this generator (as tests/test_attention.py replays it)
            seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(1234)))
            kw = dict(window=(8, 3), softcap=4.0, alibi_slopes=slopes, scale=0.3, dropout_p=0.2)
            out, lse = fusedops.attention(q, k, v, return_lse=True, generator=torch.Generator().manual_seed(1234),
                                          **kw)
            qr, kr, vr = _leaf64(q), _leaf64(k), _leaf64(v)
            ro, rl = ref.attention(qr, kr, vr, dropout_seed=seed, **dict(kw, alibi_slopes=slopes.cpu()))
            case.close("out", out, ro, _att_tol(backend, dtype))
            case.close("lse", lse, rl, _att_tol(backend, F32))
            _att_grads(case, backend, dtype, out, ro, (q, k, v), (qr, kr, vr))

        yield _guarded("attention", "window+softcap+alibi+dropout L=45 S=29", backend, dtype, run)


@check("attention", "varlen causal, 3 sequences")
def _attention_varlen(backend, device):
    lq, lk = [12, 0, 25], [20, 11, 22]  # an empty query sequence, L < S and L > S
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    for dtype in _ATT_DTYPES:
        def run(case, dtype=dtype):
            q = _rand(sum(lq), 4, 32, dtype=dtype, device=device, requires_grad=True)
            k = _rand(sum(lk), 2, 32, dtype=dtype, device=device, requires_grad=True)
            v = _rand(sum(lk), 2, 32, dtype=dtype, device=device, requires_grad=True)
            out, lse = fusedops.attention_varlen(q, k, v, cu_q.to(device), cu_k.to(device), max(lq), max(lk),
                                                 causal=True, return_lse=True)
            qr, kr, vr = _leaf64(q), _leaf64(k), _leaf64(v)
            # GQA in the reference: kv heads repeated (differentiably) for the query heads
            ro, rl = ref.attention_varlen(qr, kr.repeat_interleave(2, 1), vr.repeat_interleave(2, 1), cu_q, cu_k,
                                          max(lq), causal=True)
            case.close("out", out, ro, _att_tol(backend, dtype))
            case.close("lse", lse, rl, _att_tol(backend, F32))
            _att_grads(case, backend, dtype, out, ro, (q, k, v), (qr, kr, vr))

        yield _guarded("attention", "varlen causal, 3 sequences", backend, dtype, run)


@check("attention", "gradcheck", backends=("cpu",))
def _attention_gradcheck(backend, device):
    q, k, v = (_rand(*s, dtype=F64, requires_grad=True) for s in ((1, 4, 5, 4), (1, 2, 7, 4), (1, 2, 7, 3)))
    slopes = torch.rand(4, dtype=F64)

    def options(q, k, v):
        return fusedops.attention(q, k, v, causal=True, window=(3, -1), softcap=2.0, alibi_slopes=slopes, scale=0.75)

    yield _gradcheck("attention", "gradcheck attention", backend, options, (q, k, v),
                     note="GQA causal window softcap alibi")

    q, k, v = (_rand(*s, dtype=F64, requires_grad=True) for s in ((2, 5, 4), (2, 6, 4), (2, 6, 4)))
    keep = torch.rand(5, 6) > 0.3
    keep[1] = False  # a fully masked row
    bias = torch.randn(2, 5, 6, dtype=F64).masked_fill(~keep, -math.inf).requires_grad_(True)

    def sdpa(q, k, v, bias):
        return fusedops.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)

    yield _gradcheck("attention", "gradcheck sdpa", backend, sdpa, (q, k, v, bias),
                     note="causal + additive mask (its grad too)")


# ==== cross_entropy =========================================================================================
# tests/test_cross_entropy.py: rtol + atol·max(scale, 0.1), scale = max |expected|; here atol + rtol.

_CE_TOL = {F64: 1e-10 + 1e-12, F32: 1e-5 + 2e-6, F16: 4e-3 + 2e-3, BF16: 2e-2 + 1.5e-2}


def _ce_dtypes(backend):
    return (F32, BF16, F16) + ((F64,) if backend == "cpu" else ())


def _ce_run(case, dtype, device, x, t, *, return_lse=False, inplace=False, **opts):
    """Loss (and lse) and the logits' gradient for random upstream gradients, vs reference.cross_entropy."""
    leaf = x.detach().clone().requires_grad_(True)
    logits = leaf.clone() if inplace else leaf  # the in-place backward overwrites its logits: not a leaf's
    out = fusedops.cross_entropy(logits, t, return_lse=return_lse, inplace_backward=inplace, **opts)
    loss, lse = out if return_lse else (out, None)
    xr = _leaf64(x)
    ref_opts = dict(opts, weight=opts["weight"].cpu().double() if opts.get("weight") is not None else None)
    rloss, rlse = ref.cross_entropy(xr, t.cpu(), **ref_opts)
    g = torch.randn(rloss.shape, dtype=F64) + 0.5
    tol = _CE_TOL[dtype]
    red = opts.get("reduction", "mean")
    case.close(f"{red} loss", loss, rloss, tol, floor=0.1)
    if return_lse:
        g_lse = torch.randn(rlse.shape, dtype=F64)
        case.close("lse", lse, rlse, tol if dtype == F64 else _CE_TOL[F32], floor=0.1)
        torch.autograd.backward([loss, lse], [g.to(device, loss.dtype), g_lse.to(device, lse.dtype)])
        (want,) = torch.autograd.grad([rloss, rlse], [xr], [g, g_lse])
    else:
        loss.backward(g.to(device, loss.dtype))
        (want,) = torch.autograd.grad(rloss, [xr], g)
    case.close(f"{red} grad", leaf.grad, want, tol, floor=0.1)


@check("cross_entropy", "weight+ignore+smoothing+z_loss+softcap")
def _cross_entropy_options(backend, device):
    rows, classes = 29, 257
    for dtype in _ce_dtypes(backend):
        def run(case, dtype=dtype):
            x = _rand(rows, classes, dtype=dtype, device=device, scale=3.0, shift=0.5)
            t = torch.randint(0, classes, (rows,))
            t[torch.rand(rows) < 0.3] = -100
            t[0] = -100
            weight = (torch.rand(classes) + 0.2).to(device)
            opts = dict(weight=weight, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
            # none: gradient recomputed in the backward; mean: made in the forward (on the CPU); sum: written
            # over the logits' buffer
            _ce_run(case, dtype, device, x, t.to(device), reduction="none", **opts)
            _ce_run(case, dtype, device, x, t.to(device), reduction="mean", **opts)
            _ce_run(case, dtype, device, x, t.to(device), reduction="sum", inplace=True, **opts)

        yield _guarded("cross_entropy", "weight+ignore+smoothing+z_loss+softcap", backend, dtype, run)


@check("cross_entropy", "(N,C,d) lse, ignore_index in range")
def _cross_entropy_lse(backend, device):
    n, classes, d = 3, 131, 7
    for dtype in _ce_dtypes(backend):
        def run(case, dtype=dtype):
            x = _rand(n, classes, d, dtype=dtype, device=device, scale=3.0, shift=0.5)
            t = torch.randint(0, classes, (n, d))
            t[:, ::3] = 5  # ignore_index is a real class here
            _ce_run(case, dtype, device, x, t.to(device), reduction="mean", ignore_index=5, return_lse=True,
                    z_loss=1e-2, softcap=20.0)

        yield _guarded("cross_entropy", "(N,C,d) lse, ignore_index in range", backend, dtype, run)


@check("cross_entropy", "gradcheck", backends=("cpu",))
def _cross_entropy_gradcheck(backend, device):
    x = torch.randn(6, 9, dtype=F64, requires_grad=True)
    t = torch.tensor([1, 8, -100, 0, 4, 4])
    w = torch.rand(9, dtype=F64) + 0.1
    opts = dict(weight=w, label_smoothing=0.1, z_loss=0.01, softcap=2.5)
    for reduction in ("none", "mean", "sum"):
        yield _gradcheck("cross_entropy", f"gradcheck {reduction}", backend,
                         lambda x, r=reduction: fusedops.cross_entropy(x, t, reduction=r, **opts), (x,),
                         note="all options")
    yield _gradcheck("cross_entropy", "gradcheck lse", backend,
                     lambda x: fusedops.cross_entropy(x, t, return_lse=True, **opts), (x,), note="loss and lse")


# ==== linear_cross_entropy ==================================================================================
# tests/test_linear_cross_entropy.py: rtol + atol·max(scale, 0.1); here atol + rtol.

_LCE_TOL = {F64: 1e-10 + 1e-12, F32: 2e-5 + 5e-6, BF16: 3e-2 + 2e-2,
            F16: 4e-3 + 2e-3}  # (no float16 in those tests: cross_entropy's float16 tolerance)


def _lce_problem(n, h, v, dtype, device):
    hidden = (torch.randn(n, h, dtype=F64) / h**0.5 * 3).to(dtype).to(device)
    weight = torch.randn(v, h, dtype=F64).to(dtype).to(device)
    bias = (torch.randn(v, dtype=F64) * 0.5).to(dtype).to(device)
    target = torch.randint(0, v, (n,))
    target[::5] = -100
    return hidden, weight, bias, target.to(device)


@check("linear_cross_entropy", "bias+class_weight+options, chunks of 7")
def _linear_cross_entropy(backend, device):
    n, h, v = 23, 16, 97
    for dtype in _ce_dtypes(backend):
        def run(case, dtype=dtype):
            hidden, weight, bias, target = _lce_problem(n, h, v, dtype, device)
            cw = (torch.rand(v) + 0.2).to(device)
            opts = dict(class_weight=cw, label_smoothing=0.1, z_loss=1e-3, softcap=10.0)
            tol = _LCE_TOL[dtype]
            # mean: gradients made in the forward; none and lse: recomputed in the backward
            for reduction, return_lse in (("mean", False), ("none", False), ("sum", True)):
                hs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
                out = fusedops.linear_cross_entropy(hs, ws, target, bs, reduction=reduction, return_lse=return_lse,
                                                    chunk_size=7, **opts)
                hr, wr, br = _leaf64(hidden), _leaf64(weight), _leaf64(bias)
                rloss, rlse = ref.linear_cross_entropy(hr, wr, target.cpu(), br, reduction=reduction,
                                                       **dict(opts, class_weight=cw.cpu().double()))
                g = torch.randn(rloss.shape, dtype=F64) + 0.5
                if return_lse:
                    loss, lse = out
                    g_lse = torch.randn(rlse.shape, dtype=F64)
                    case.close("lse", lse, rlse, tol, floor=0.1)
                    torch.autograd.backward([loss, lse], [g.to(device, loss.dtype), g_lse.to(device, lse.dtype)])
                    want = torch.autograd.grad([rloss, rlse], [hr, wr, br], [g, g_lse])
                else:
                    loss = out
                    loss.backward(g.to(device, loss.dtype))
                    want = torch.autograd.grad(rloss, [hr, wr, br], g)
                case.close(f"{reduction} loss", loss, rloss, tol, floor=0.1)
                for name, got, e in zip(("hidden", "weight", "bias"), (hs.grad, ws.grad, bs.grad), want):
                    case.close(f"{reduction} d{name}", got, e, tol, floor=0.1)

        yield _guarded("linear_cross_entropy", "bias+class_weight+options, chunks of 7", backend, dtype, run)


@check("linear_cross_entropy", "gradcheck", backends=("cpu",))
def _linear_cross_entropy_gradcheck(backend, device):
    hidden, weight, bias, target = _lce_problem(5, 4, 7, F64, device)
    hidden, weight, bias = (t.requires_grad_(True) for t in (hidden, weight, bias))
    opts = dict(label_smoothing=0.1, z_loss=0.01, softcap=3.0, chunk_size=2)
    for reduction in ("none", "mean"):
        yield _gradcheck("linear_cross_entropy", f"gradcheck {reduction}", backend,
                         lambda h, w, b, r=reduction: fusedops.linear_cross_entropy(h, w, target, b, reduction=r,
                                                                                     **opts),
                         (hidden, weight, bias), note="hidden, weight, bias")


# ==== FusedAdam / FusedAdamW ================================================================================
# tests/test_adam.py: params vs torch.optim (foreach=False) rtol 2e-5 atol 2e-6, vs the float64 reference
# rtol 1e-5 atol 1e-5; moments vs torch rtol 2e-5 atol 1e-7. Here atol + rtol, relative to max |expected|
# (at least 1 for params).

_ADAM_STEPS = 20
_ADAM_SIZES = [(7,), (33,), (4, 5), (1000,)]
_ADAM_GRAD_SCALES = [1.0, 0.01, 3.0, 0.3]
_ADAM_VARIANTS = {
    "FusedAdam": dict(decoupled=False, weight_decay=0.0, amsgrad=False, maximize=False),
    "FusedAdam wd+amsgrad": dict(decoupled=False, weight_decay=0.05, amsgrad=True, maximize=False),
    "FusedAdamW wd": dict(decoupled=True, weight_decay=0.05, amsgrad=False, maximize=False),
    "FusedAdamW wd+amsgrad+maximize": dict(decoupled=True, weight_decay=0.05, amsgrad=True, maximize=True),
}


def _adam_variant(case, device, decoupled, weight_decay, amsgrad, maximize):
    init = [_rand(*s) for s in _ADAM_SIZES]
    ours_p = [p.clone().to(device).requires_grad_(True) for p in init]
    torch_p = [p.clone().to(device).requires_grad_(True) for p in init]
    group_of = [0, 0, 1, 1]  # the second group's β1 < 0.5 takes torch's other lerp form
    betas = [(0.9, 0.999), (0.3, 0.9)]
    lr = [0.02, 0.01]

    def groups(params):
        return [{"params": params[:2], "lr": lr[0], "betas": betas[0]},
                {"params": params[2:], "lr": lr[1], "betas": betas[1]}]

    hyper = dict(eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours = (FusedAdamW if decoupled else FusedAdam)(groups(ours_p), **hyper)
    theirs = (torch.optim.AdamW if decoupled else torch.optim.Adam)(groups(torch_p), foreach=False, **hyper)
    ref64 = [p.double() for p in init]
    states64 = [ref.adam_new_state(p, amsgrad) for p in ref64]
    for _ in range(_ADAM_STEPS):
        for i, (a, b) in enumerate(zip(ours_p, torch_p)):
            g = _rand(*a.shape, scale=_ADAM_GRAD_SCALES[i])
            a.grad, b.grad = g.to(device), g.clone().to(device)
            b1, b2 = betas[group_of[i]]
            ref64[i] = ref.adam_step(ref64[i], g.double(), states64[i], lr=lr[group_of[i]], beta1=b1, beta2=b2,
                                     eps=1e-8, weight_decay=weight_decay, decoupled_weight_decay=decoupled,
                                     amsgrad=amsgrad, maximize=maximize)
        ours.step()
        theirs.step()
    moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        case.close(f"param {i} vs torch", a, b, 2e-5 + 2e-6, floor=1.0)
        case.close(f"param {i} vs float64", a, ref64[i], 1e-5 + 1e-5, floor=1.0)
        for k in moments:
            case.close(f"{k} {i} vs torch", ours.state[a][k], theirs.state[b][k], 2e-5 + 1e-7)
            case.close(f"{k} {i} vs float64", ours.state[a][k], states64[i][k], 1e-4 + 1e-7)
        if float(ours.state[a]["step"]) != _ADAM_STEPS:
            raise AssertionError(f"param {i}: step count {float(ours.state[a]['step'])} != {_ADAM_STEPS}")


@check("adam", f"{_ADAM_STEPS} steps vs torch.optim and float64")
def _adam(backend, device):
    for name, variant in _ADAM_VARIANTS.items():
        def run(case, variant=variant):
            _adam_variant(case, device, **variant)

        yield _guarded("adam", f"{name}, {_ADAM_STEPS} steps", backend, F32, run)
