"""fusedops attention (scaled_dot_product_attention, attention, attention_varlen, nn.Attention) on every
backend, against the float64 reference in fusedops.reference (plain matmul + softmax) and against torch's
own scaled_dot_product_attention where torch defines the result.

The CUDA kernels run here through the emulator (`cuda-emulated`, small shapes). While they are being
written they raise "... not implemented yet": those cases skip, and light up when the kernels land.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fusedops
from fusedops import reference as ref

from conftest import backend_params

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# Max |error| relative to the largest reference magnitude. On the CPU kernel (fp32 throughout) bf16/fp16
# are dominated by rounding the result (and dO) to 8 / 11 mantissa bits, fp64 by `scale` and `dropout_p`,
# which the kernel interface carries as float32. The CUDA kernels (also under the emulator) may round P and
# dS to 16 bits for the tensor cores, and fp32 inputs may go through reduced-precision tensor-core math:
# looser bounds there, still far below what a wrong mask, tile or scale produces (errors of order 1).
TOL_CPU = {F32: 2e-5, F16: 4e-3, BF16: 3e-2, F64: 1e-6}
TOL_GPU = {F32: 5e-3, F16: 1e-2, BF16: 5e-2, F64: 1e-6}


class _Tolerances:
    def __getitem__(self, dtype):
        gpu = fusedops.current_backend() in ("cuda-emulated", "cuda")
        return (TOL_GPU if gpu else TOL_CPU)[dtype]


TOL = _Tolerances()


@contextlib.contextmanager
def unimplemented_skips():
    """Skip (rather than fail) while the CUDA kernels are stubs that say they are not implemented yet."""
    try:
        yield
    except RuntimeError as e:
        if "not implemented yet" in str(e):
            pytest.skip(str(e))
        raise


def rand(*shape, dtype=F32, device="cpu", requires_grad=False):
    """Random normal values (never zeros) rounded to `dtype`."""
    t = torch.randn(*shape, device=device).to(dtype)
    return t.requires_grad_(requires_grad)


def leaf64(t):
    return t.detach().double().requires_grad_(True)


def assert_close(actual, expected, dtype, what, scale=None):
    """max |actual - expected| <= TOL · scale, scale = max |expected| unless given; same NaN/inf pattern."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN in the result"
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: infinities differ from the reference"
    if e.numel() == 0 or not finite.any():
        return
    if scale is None:
        scale = e[finite].abs().max().item()
    scale = max(scale, 1e-6)
    err = (a[finite] - e[finite]).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {TOL[dtype]}"


def assert_grads_close(actual, expected, dtype, names="qkv"):
    """Gradients against one common scale (the largest of them): a gradient that is exactly 0 in the
    reference (one visible key makes dq and dk vanish) is compared against the others' magnitude."""
    scale = max((e.detach().abs().max().item() for e in expected if e.numel()), default=1.0)
    for a, e, n in zip(actual, expected, names):
        assert_close(a, e, dtype, f"grad {n}", scale=scale)


def check_attention(backend, q, k, v, dtype, *, grad=True, lse=True, generator_seed=None, **kw):
    """fusedops.attention vs reference.attention: output, lse, and the gradients of q, k, v."""
    ref_kw = {n: kw[n] for n in ("causal", "window", "softcap", "alibi_slopes", "scale", "dropout_p") if n in kw}
    seed = None
    if kw.get("dropout_p", 0) > 0:
        gen = torch.Generator().manual_seed(generator_seed or 1234)
        seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(generator_seed or 1234)))
        kw = dict(kw, generator=gen)
    with unimplemented_skips():
        out, out_lse = fusedops.attention(q, k, v, return_lse=True, **kw)
    qr, kr, vr = leaf64(q), leaf64(k), leaf64(v)
    ro, rl = ref.attention(qr, kr, vr, dropout_seed=seed or 0, **ref_kw)
    assert out.dtype == q.dtype and out_lse.dtype == (F64 if dtype == F64 else F32)
    assert_close(out, ro, dtype, "out")
    if lse:
        assert_close(out_lse, rl, F32 if dtype != F64 else F64, "lse")
    if grad:
        g = rand(*out.shape, dtype=dtype, device=out.device)
        with unimplemented_skips():
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
        assert_grads_close((dq, dk, dv), torch.autograd.grad(ro, (qr, kr, vr), g.double()), dtype)
    return out


def qkv(B, Hq, Hkv, L, S, E, Ev=None, dtype=F32, device="cpu", requires_grad=True):
    Ev = E if Ev is None else Ev
    return (rand(B, Hq, L, E, dtype=dtype, device=device, requires_grad=requires_grad),
            rand(B, Hkv, S, E, dtype=dtype, device=device, requires_grad=requires_grad),
            rand(B, Hkv, S, Ev, dtype=dtype, device=device, requires_grad=requires_grad))


def emulated_or_cuda(backend):
    return backend in ("cuda-emulated", "cuda")


# ---- the reference's own building blocks ---------------------------------------------------------------

def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    got = [int(x) for x in ref.philox4x32((0, 0, 0, 0), 0)]
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    got = [int(x) for x in ref.philox4x32((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF)]
    assert got == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    got = [int(x) for x in ref.philox4x32((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822)]
    assert got == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    # vectorized: each lane equals the scalar evaluation
    c = torch.tensor([0, 1, 0xFFFFFFFF, 12345], dtype=torch.int64)
    lanes = ref.philox4x32((c, c ^ 7, c + 3 & 0xFFFFFFFF, torch.zeros_like(c)), 0x1234_5678_9ABC_DEF0)
    for n in range(4):
        scalar = ref.philox4x32((int(c[n]), int(c[n]) ^ 7, int(c[n]) + 3 & 0xFFFFFFFF, 0), 0x1234_5678_9ABC_DEF0)
        assert [int(w[n]) for w in lanes] == [int(w) for w in scalar]


def test_dropout_keep_rate():
    keep = ref.dropout_keep(99, torch.arange(64), 1000, 0.3)
    assert keep.shape == (64, 1000)
    assert abs(keep.double().mean().item() - 0.7) < 0.01
    assert not torch.equal(keep[0], keep[1])  # streams differ
    assert torch.equal(keep, ref.dropout_keep(99, torch.arange(64), 1000, 0.3))


# ---- parity with the reference: head dims × dtypes, lengths, features --------------------------------------

HEAD_DIMS = [8, 40, 64, 96, 128, 256]
LENGTHS = [1, 7, 64, 129, 257]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_head_dims_and_dtypes(backend, device, E, dtype):
    """Every head dim the CUDA kernels take, in each dtype; L ≠ S, causal on every other case."""
    causal = E in (8, 64, 128)
    L, S = (37, 50) if emulated_or_cuda(backend) else (65, 90)
    q, k, v = qkv(2, 2, 1, L, S, E, dtype=dtype, device=device)
    check_attention(backend, q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("L", LENGTHS)
def test_lengths(L, S):
    """All length pairs on the CPU kernel (odd sizes, one row, longer and shorter key sequences), plain and
    causal (bottom-right, so for L > S the first rows see nothing)."""
    with fusedops.backend("cpu"):
        q, k, v = qkv(1, 2, 2, L, S, 40, Ev=24)
        check_attention("cpu", q, k, v, F32)
        check_attention("cpu", q, k, v, F32, causal=True)


@pytest.mark.parametrize("L,S", [(1, 1), (7, 64), (64, 7), (100, 128), (128, 100)])
def test_lengths_emulated(L, S):
    with fusedops.backend("cuda-emulated"):
        q, k, v = qkv(1, 2, 1, L, S, 32)
        check_attention("cuda-emulated", q, k, v, F32, causal=L % 2 == 0)


@pytest.mark.parametrize("E", [1, 3, 5, 12, 33, 300])
def test_cpu_any_head_dim(E):
    """The CPU kernel takes any head dim (not only multiples of 8), and Ev ≠ E."""
    with fusedops.backend("cpu"):
        q, k, v = qkv(1, 3, 3, 19, 23, E, Ev=E % 7 + 1)
        check_attention("cpu", q, k, v, F32, causal=E % 2 == 1)
        check_attention("cpu", *qkv(1, 1, 1, 9, 11, E, dtype=BF16), BF16)


@pytest.mark.parametrize("window", [(0, 0), (5, 3), (16, -1), (-1, 4), (40, 0)])
def test_window(backend, device, window):
    L, S = (57, 83) if emulated_or_cuda(backend) else (130, 200)
    q, k, v = qkv(1, 2, 2, L, S, 32, device=device)
    causal = window[1] == 0
    check_attention(backend, q, k, v, F32, window=window if not causal else (window[0], -1), causal=causal)


@pytest.mark.parametrize("softcap", [0.5, 5.0])
def test_softcap(backend, device, softcap):
    q, k, v = qkv(2, 2, 2, 33, 47, 64, device=device)
    check_attention(backend, q, k, v, F32, softcap=softcap, scale=0.7)


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(backend, device, per_batch):
    B, H = 2, 4
    slopes = torch.rand(B, H, device=device) if per_batch else torch.rand(H, device=device)
    q, k, v = qkv(B, H, 2, 45, 61, 32, device=device)
    check_attention(backend, q, k, v, F32, alibi_slopes=slopes, causal=per_batch)


def test_all_options_together(backend, device):
    slopes = torch.rand(3, 4, device=device)
    for dtype in (F32, BF16):
        q, k, v = qkv(3, 4, 2, 70, 66, 48, Ev=32, dtype=dtype, device=device)
        check_attention(backend, q, k, v, dtype, alibi_slopes=slopes, softcap=3.0, window=(20, 0), causal=True,
                        dropout_p=0.25)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1), (8, 2)])
def test_gqa(backend, device, Hq, Hkv):
    q, k, v = qkv(2, Hq, Hkv, 30, 41, 16, device=device)
    check_attention(backend, q, k, v, F32, causal=Hkv == 1)


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("p", [0.125, 0.5])
def test_dropout_exact(backend, device, dtype, p):
    """Dropout masks replay the reference's Philox streams exactly (same seed, same mask), forward and
    backward; the seed comes from the generator, so the same generator state gives the same result."""
    if dtype == F64 and backend != "cpu":
        pytest.skip("float64 runs on the cpu backend only")
    q, k, v = qkv(2, 2, 2, 67, 45, 32, dtype=dtype, device=device)
    out = check_attention(backend, q, k, v, dtype, dropout_p=p, causal=p > 0.2, generator_seed=7)
    with unimplemented_skips():
        again = fusedops.attention(q, k, v, dropout_p=p, causal=p > 0.2,
                                   generator=torch.Generator().manual_seed(7))
        other = fusedops.attention(q, k, v, dropout_p=p, causal=p > 0.2,
                                   generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


def test_dropout_default_generator(backend, device):
    q, k, v = qkv(1, 2, 2, 16, 16, 16, device=device)
    torch.manual_seed(3)
    with unimplemented_skips():
        a = fusedops.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = fusedops.attention(q, k, v, dropout_p=0.5)
    c = fusedops.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_refused_under_graph_capture(monkeypatch):
    """The dropout key is a kernel argument, so a captured graph would replay one mask forever: refused with
    a clear error (the capture state is faked here; the check runs before any kernel)."""
    q, k, v = qkv(1, 2, 2, 16, 16, 16, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        fusedops.attention(q, k, v, dropout_p=0.5)
    fusedops.attention(q, k, v, dropout_p=0.0)  # no dropout: nothing to refuse


def test_strided_inputs(backend, device):
    """(B, S, H, D) tensors transposed to (B, H, S, D) (no copy needed), a slice of a wider tensor, an
    expanded (stride-0) batch, and a last dim that is not contiguous (copied by the binding)."""
    B, L, S, H, D = 2, 29, 43, 4, 32
    x = rand(B, L, 3 * H, D, device=device)
    q_view = x[:, :, :H].transpose(1, 2).requires_grad_()  # (B, H, L, D), row stride 3·H·D
    assert q_view.stride(2) == 3 * H * D
    kv = rand(S, 2, H, D, device=device)
    k = kv[:, 0].unsqueeze(0).expand(B, S, H, D).transpose(1, 2).detach().requires_grad_()
    assert k.stride(0) == 0
    vw = rand(B, H, S, 2 * D, device=device)[..., ::2].detach().requires_grad_()
    assert vw.stride(-1) == 2
    check_attention(backend, q_view, k, vw, F32, causal=True)


def test_size_one_dims_with_odd_strides(backend, device):
    """Batch 1, one kv head (MQA) and one query row whose strides are ones torch allows for size-1 dims
    (here 3, 5 and 7 elements) but no kernel would expect."""
    D, S = 32, 45

    def odd_view(h, rows):
        base = rand(h * rows * D + 8, device=device)
        return base.as_strided((1, h, rows, D), (3, rows * D if h > 1 else 5, D if rows > 1 else 7, 1), 8)

    for q in (odd_view(3, 1), odd_view(2, 19)):
        k, v = odd_view(1, S), odd_view(1, S)
        check_attention(backend, q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), F32, causal=True)


# ---- variable-length sequences --------------------------------------------------------------------------

def check_varlen(backend, device, lens_q, lens_k, Hq, Hkv, E, dtype=F32, max_given=True, **kw):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    tq, tk = sum(lens_q), sum(lens_k)
    q = rand(tq, Hq, E, dtype=dtype, device=device, requires_grad=True)
    k = rand(tk, Hkv, E, dtype=dtype, device=device, requires_grad=True)
    v = rand(tk, Hkv, E, dtype=dtype, device=device, requires_grad=True)
    max_q = max(lens_q) if max_given else None
    max_k = max(lens_k) if max_given else None
    seed = 0
    if kw.get("dropout_p", 0) > 0:
        seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
        kw = dict(kw, generator=torch.Generator().manual_seed(5))
    with unimplemented_skips():
        out, lse = fusedops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)
    ref_kw = {n: kw[n] for n in ("causal", "window", "softcap", "alibi_slopes", "dropout_p") if n in kw}
    qr, kr, vr = leaf64(q), leaf64(k), leaf64(v)
    ro, rl = ref.attention_varlen(qr, kr, vr, cu_q.cpu(), cu_k.cpu(), max_q if max_given else tq,
                                  dropout_seed=seed, **ref_kw)
    assert_close(out, ro, dtype, "out")
    assert_close(lse, rl, F32, "lse")
    g = rand(*out.shape, dtype=dtype, device=device)
    with unimplemented_skips():
        grads = torch.autograd.grad(out, (q, k, v), g)
    assert_grads_close(grads, torch.autograd.grad(ro, (qr, kr, vr), g.double()), dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(backend, device, causal):
    check_varlen(backend, device, [5, 0, 17, 64, 1], [9, 3, 0, 50, 70], 4, 2, 32, causal=causal)


def test_varlen_options(backend, device):
    slopes = torch.rand(3, 2, device=device)
    check_varlen(backend, device, [33, 12, 40], [20, 12, 61], 2, 1, 64, dtype=BF16, window=(8, 2), softcap=4.0,
                 alibi_slopes=slopes, dropout_p=0.25)


def test_varlen_without_max_seqlen(backend, device):
    """max_seqlen_* default to the totals (no host sync): same results, dropout streams numbered with it."""
    check_varlen(backend, device, [10, 31, 7], [12, 5, 40], 2, 2, 16, max_given=False, causal=True, dropout_p=0.5)


# ---- fully masked rows, empty inputs ---------------------------------------------------------------------

def test_fully_masked_rows(backend, device):
    """A row that sees no key gives output 0, lse -inf and gradient 0 — never NaN (torch gives NaN or 0)."""
    B, H, L, S, E = 1, 2, 9, 13, 16
    q, k, v = qkv(B, H, H, L, S, E, device=device)
    mask = torch.rand(B, H, L, S, device=device) > 0.3
    mask[0, 0, 2] = False
    mask[0, 1, 5] = False
    mask[:, :, :, 4] = False  # a key nobody sees: its dk, dv are 0
    with unimplemented_skips():
        out = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not torch.isnan(out).any()
    assert torch.count_nonzero(out[0, 0, 2]) == 0 and torch.count_nonzero(out[0, 1, 5]) == 0
    additive = torch.zeros(B, H, L, S, device=device).masked_fill(~mask, float("-inf"))
    out2 = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert_close(out2, out.double(), F32, "additive -inf mask vs bool mask")
    with unimplemented_skips():
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t in (dq, dk, dv):
        assert not torch.isnan(t).any()
    assert torch.count_nonzero(dq[0, 0, 2]) == 0 and torch.count_nonzero(dq[0, 1, 5]) == 0
    assert torch.count_nonzero(dk[:, :, 4]) == 0 and torch.count_nonzero(dv[:, :, 4]) == 0
    qr, kr, vr = leaf64(q), leaf64(k), leaf64(v)
    ro = ref.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
    assert_close(out, ro, F32, "out")
    rd = torch.autograd.grad(ro, (qr, kr, vr), torch.ones_like(ro))
    assert_grads_close(torch.autograd.grad(fusedops.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                           (q, k, v), torch.ones_like(out)), rd, F32)
    # nothing visible at all: a window that excludes every key of the first rows, and no keys at all
    with unimplemented_skips():
        o, lse = fusedops.attention(q, k[:, :, :3], v[:, :, :3], causal=True, return_lse=True)  # L > S: rows 0..5 see nothing
    assert torch.count_nonzero(o[:, :, :L - 3]) == 0 and torch.isneginf(lse[:, :, :L - 3]).all()


@pytest.mark.parametrize("window", [(2**31 - 1, 0), (2**31 + 1, 0), (2**32, 0), (3, 2**32), (2**63 - 1, 2**40)])
def test_window_bounds_beyond_int32(backend, device, window):
    """Window bounds past any sequence length cut nothing, however large (the CPU kernel once compared them
    as int32, so 2^32 became 0)."""
    q, k, v = qkv(1, 2, 2, 21, 37, 16, device=device)
    check_attention(backend, q, k, v, F32, window=window)


def test_sdpa_empty_with_many_batch_dims(backend, device):
    for lq, s in ((4, 0), (0, 5)):
        q = rand(2, 3, 2, lq, 8, device=device, requires_grad=True)
        k, v = rand(2, 3, 2, s, 8, device=device), rand(2, 3, 2, s, 8, device=device)
        with unimplemented_skips():
            out = fusedops.scaled_dot_product_attention(q, k, v)
        assert out.shape == (2, 3, 2, lq, 8) and torch.count_nonzero(out) == 0
        if out.numel():
            dq, = torch.autograd.grad(out, (q,), torch.randn_like(out))
            assert torch.count_nonzero(dq) == 0


def test_empty(backend, device):
    q, k, v = qkv(1, 2, 2, 5, 0, 16, device=device)
    with unimplemented_skips():
        out = fusedops.attention(q, k, v)
        assert out.shape == (1, 2, 5, 16) and torch.count_nonzero(out) == 0
        dq, = torch.autograd.grad(out, (q,), torch.randn_like(out))
        assert torch.count_nonzero(dq) == 0
    q, k, v = qkv(1, 2, 2, 0, 5, 16, device=device)
    out = fusedops.attention(q, k, v)
    assert out.shape == (1, 2, 0, 16)
    assert fusedops.attention(*qkv(0, 2, 2, 4, 4, 8, device=device)).shape == (0, 2, 4, 8)


# ---- scaled_dot_product_attention: torch's semantics ------------------------------------------------------------

SDPA_CASES = {
    "2d": dict(q=(17, 16), k=(23, 16), v=(23, 8)),
    "3d": dict(q=(3, 17, 16), k=(3, 23, 16), v=(3, 23, 16)),
    "4d": dict(q=(2, 3, 17, 32), k=(2, 3, 23, 32), v=(2, 3, 23, 24)),
    "5d": dict(q=(2, 2, 3, 17, 16), k=(2, 2, 3, 23, 16), v=(2, 2, 3, 23, 16)),
    "bcast_batch": dict(q=(2, 3, 17, 16), k=(1, 3, 23, 16), v=(1, 3, 23, 16)),
    "bcast_rank": dict(q=(3, 17, 16), k=(2, 3, 23, 16), v=(2, 3, 23, 16)),
    "gqa": dict(q=(2, 6, 17, 16), k=(2, 2, 23, 16), v=(2, 2, 23, 16), enable_gqa=True),
    "gqa_5d": dict(q=(2, 2, 4, 17, 16), k=(2, 2, 1, 23, 16), v=(2, 2, 1, 23, 16), enable_gqa=True),
    "mqa_bcast_heads": dict(q=(2, 4, 17, 16), k=(2, 1, 23, 16), v=(2, 1, 23, 16)),
    "bcast_value_batch": dict(q=(1, 6, 17, 16), k=(1, 6, 23, 16), v=(3, 1, 23, 8)),  # v widens the batch
}
MASKS = {
    "none": None,
    "bool_LS": lambda L, S, lead: torch.rand(L, S) > 0.2,
    "bool_full": lambda L, S, lead: torch.rand(*lead, L, S) > 0.2,
    "float_bcast_rows": lambda L, S, lead: torch.randn(1, S),
    "bool_1d": lambda L, S, lead: torch.rand(S) > 0.2,
    "float_per_head": lambda L, S, lead: torch.randn(*lead[-1:], L, S) if lead else torch.randn(L, S),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(case, mask, is_causal):
    """fusedops.scaled_dot_product_attention vs torch's (fp32, forward and gradients) and the float64
    reference, over ranks, batch broadcasting, GQA, masks (bool / additive, broadcast) and causal (top-left,
    L ≠ S, combined with the mask)."""
    spec = dict(SDPA_CASES[case])
    gqa = spec.pop("enable_gqa", False)
    q, k, v = (rand(*spec[n], requires_grad=True) for n in "qkv")
    L, S = q.shape[-2], k.shape[-2]
    kv_lead = [t.shape[:-3] + q.shape[-3:-2] if gqa else t.shape[:-2] for t in (k, v)]
    out_lead = torch.broadcast_shapes(q.shape[:-2], *kv_lead)
    m = None if MASKS[mask] is None else MASKS[mask](L, S, tuple(out_lead))
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True  # torch gives NaN on fully masked rows; keep them out of this comparison
    with fusedops.backend("cpu"):
        out = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal, enable_gqa=gqa)
    if m is not None and is_causal:  # torch combines them too, but refuses the pair when gradients are needed
        tril = torch.ones(L, S, dtype=torch.bool).tril()
        tm = m & tril if m.dtype == torch.bool else m.masked_fill(~tril, float("-inf"))
        kw = dict(attn_mask=tm, enable_gqa=gqa)
    else:  # (torch's own CPU kernel rejects a 1-D mask that its documentation calls broadcastable)
        kw = dict(attn_mask=m if m is None or m.dim() >= 2 else m[None], is_causal=is_causal, enable_gqa=gqa)
    try:
        expected = F.scaled_dot_product_attention(q, k, v, **kw)
    except RuntimeError:
        # torch 2.13 adds a mask wider than q·kᵀ's batch (value widens it) in place and fails: the float64
        # reference alone is the oracle there.
        assert case == "bcast_value_batch" and m is not None and m.dim() > 2
        expected = None
    if expected is not None:
        assert out.shape == expected.shape
        assert_close(out, expected.double(), F32, "out vs torch")
    qr, kr, vr = leaf64(q), leaf64(k), leaf64(v)
    ro = ref.scaled_dot_product_attention(qr, kr, vr, attn_mask=m, is_causal=is_causal, enable_gqa=gqa)
    assert out.shape == ro.shape
    assert_close(out, ro, F32, "out vs reference")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    if expected is not None:
        tgrads = torch.autograd.grad(expected, (q, k, v), g)
        assert_grads_close(grads, [t.double() for t in tgrads], F32)
    assert_grads_close(grads, torch.autograd.grad(ro, (qr, kr, vr), g.double()), F32)


def test_sdpa_scale_dropout_and_mask_grad(backend, device):
    """scale, dropout (exact against the reference's Philox streams over the flattened batch), and the
    gradient of an additive mask that requires grad (as torch supports)."""
    q, k, v = qkv(2, 3, 3, 20, 31, 16, Ev=8, device=device)
    bias = torch.randn(3, 20, 31, device=device, requires_grad=True)
    torch.manual_seed(11)
    with unimplemented_skips():
        out = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.25, scale=0.3,
                                                    is_causal=True)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(11)))
    leaves = [leaf64(t) for t in (q, k, v, bias)]
    ro = ref.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], dropout_p=0.25, scale=0.3,
                                          is_causal=True, dropout_seed=seed)
    assert_close(out, ro, F32, "out")
    g = torch.randn_like(out)
    with unimplemented_skips():
        grads = torch.autograd.grad(out, (q, k, v, bias), g)
    assert_grads_close(grads, torch.autograd.grad(ro, leaves, g.double()), F32, ("q", "k", "v", "attn_mask"))


def test_sdpa_emulated_matches_cpu():
    q, k, v = qkv(1, 2, 2, 40, 56, 64, requires_grad=False)
    mask = torch.rand(40, 56) > 0.3
    with fusedops.backend("cpu"):
        expected = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    with fusedops.backend("cuda-emulated"), unimplemented_skips():
        out = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
        assert_close(out, expected.double(), F32, "emulated vs cpu")


# ---- float64 gradcheck on the CPU kernel ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["plain", "options", "gqa_dropout", "varlen", "sdpa_mask"])
def test_gradcheck_cpu(variant):
    torch.manual_seed(0)
    with fusedops.backend("cpu"):
        if variant == "plain":
            q, k, v = qkv(1, 2, 2, 5, 7, 4, dtype=F64)
            fn = fusedops.attention
        elif variant == "options":
            q, k, v = qkv(2, 2, 1, 6, 5, 3, Ev=2, dtype=F64)
            slopes = torch.rand(2, 2)

            def fn(q, k, v):
                return fusedops.attention(q, k, v, causal=True, window=(3, -1), softcap=2.0, alibi_slopes=slopes,
                                          scale=0.75)
        elif variant == "gqa_dropout":
            q, k, v = qkv(1, 4, 2, 6, 9, 4, dtype=F64)

            def fn(q, k, v):
                return fusedops.attention(q, k, v, dropout_p=0.25, generator=torch.Generator().manual_seed(1))
        elif variant == "varlen":
            q, k, v = (rand(n, 2, 3, dtype=F64, requires_grad=True) for n in (9, 11, 11))
            cu_q = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
            cu_k = torch.tensor([0, 6, 8, 11], dtype=torch.int32)

            def fn(q, k, v):
                return fusedops.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
        else:
            q, k, v = qkv(1, 2, 2, 5, 6, 3, dtype=F64)
            bias = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
            keep = torch.rand(5, 6) > 0.3
            keep[1] = False  # a fully masked row inside

            def fn(q, k, v, bias=bias):
                return fusedops.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~keep, -math.inf))

            assert torch.autograd.gradcheck(lambda b: fn(q.detach(), k.detach(), v.detach(), b), (bias,))
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_second_derivative_refused(backend, device):
    """Differentiable once: with create_graph a second derivative raises (torch's fallback for ops without
    autograd would warn and leave the path through the backward kernel out of it, silently)."""
    q, k, v = qkv(1, 2, 1, 7, 9, 16, dtype=F32, device=device)
    with unimplemented_skips():
        out = fusedops.scaled_dot_product_attention(q, k.expand(1, 2, 9, 16), v.expand(1, 2, 9, 16))
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad((dq * dq).sum() + (dk * dv).sum() + (q * q).sum(), (q, k, v))


# ---- determinism -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2, 1, 300, 333, 32), (4, 8, 8, 64, 96, 16)], ids=["split_keys", "many_heads"])
def test_backward_deterministic(backend, device, shape):
    """Two backward runs are bitwise identical (the CPU kernel also across thread counts: its work split
    depends on the shape only)."""
    B, Hq, Hkv, L, S, E = shape
    if emulated_or_cuda(backend):  # keep the emulator's work small
        B, Hq, Hkv, L, S = 1, min(Hq, 2), 1, min(L, 100), min(S, 128)
    q, k, v = qkv(B, Hq, Hkv, L, S, E, dtype=BF16 if backend == "cpu" else F32, device=device)
    g = torch.randn(B, Hq, L, E, device=device).to(q.dtype)

    def grads():
        with unimplemented_skips():
            out = fusedops.attention(q, k, v, causal=True)
            return torch.autograd.grad(out, (q, k, v), g)

    first = grads()
    threads = torch.get_num_threads()
    try:
        for n in ([1, 2, 3] if backend == "cpu" else [threads]):
            torch.set_num_threads(n)
            for a, b in zip(first, grads()):
                assert torch.equal(a, b), f"backward differs between runs ({n} threads)"
    finally:
        torch.set_num_threads(threads)


# ---- CPU ISA variants --------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", fusedops.build_info()["cpu_isas_available"])
def test_cpu_isas(isa):
    """Each compiled CPU variant (vector width 4/8/16) computes the same function."""
    previous = fusedops.build_info()["cpu_isa"]
    try:
        fusedops.set_cpu_isa(isa)
        with fusedops.backend("cpu"):
            for dtype in (F32, BF16, F16):
                q, k, v = qkv(2, 2, 1, 45, 70, 40, Ev=24, dtype=dtype)
                check_attention("cpu", q, k, v, dtype, causal=True, softcap=3.0, dropout_p=0.25,
                                alibi_slopes=torch.rand(2))
    finally:
        fusedops.set_cpu_isa(previous)


# ---- module, torch.compile ------------------------------------------------------------------------------------

def test_attention_module(backend, device):
    torch.manual_seed(0)
    m = fusedops.nn.Attention(64, num_heads=4, qkv_bias=True, causal=True).to(device)
    assert fusedops.Attention is fusedops.nn.Attention
    x = rand(2, 19, 64, device=device, requires_grad=True)
    with unimplemented_skips():
        y = m(x)
    # the same computation with torch's SDPA (L == S: causal alignments agree)
    qkv_ = m.qkv(x).view(2, 19, 3, 4, 16).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv_[0], qkv_[1], qkv_[2], is_causal=True)
    expected = m.proj(o.transpose(1, 2).reshape(2, 19, 64))
    assert_close(y, expected.double(), F32, "module output")
    with unimplemented_skips():
        y.sum().backward()
    assert x.grad is not None and m.qkv.weight.grad is not None and not torch.isnan(x.grad).any()
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    gqa = fusedops.nn.Attention(64, num_heads=4, num_kv_heads=2, attn_drop=0.5, window=(4, 0)).to(device)
    with unimplemented_skips():
        gqa.train()
        assert gqa(x).shape == x.shape
        gqa.eval()
        assert torch.equal(gqa(x), gqa(x))  # no dropout in eval


def test_torch_compile():
    """The public functions trace under torch.compile(fullgraph=True) through the fake kernels and the
    autograd formula, and give the eager results."""
    torch._dynamo.reset()

    def f(q, k, v, bias):
        a = fusedops.attention(q, k, v, causal=True, window=(6, 0), softcap=2.0)
        b = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return (a * b).sum()

    q, k, v = qkv(1, 2, 2, 13, 13, 16)
    bias = torch.randn(13, 13, requires_grad=True)
    with fusedops.backend("cpu"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        loss = compiled(q, k, v, bias)
        grads = torch.autograd.grad(loss, (q, k, v, bias))
        loss_e = f(q, k, v, bias)
        grads_e = torch.autograd.grad(loss_e, (q, k, v, bias))
    assert torch.allclose(loss, loss_e)
    for a, b in zip(grads, grads_e):
        assert torch.allclose(a, b, atol=1e-6)
    # the fake kernels alone
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fq, fk, fv = torch.empty(2, 3, 5, 8), torch.empty(2, 1, 7, 8), torch.empty(2, 1, 7, 4)
        out, lse = torch.ops.fusedops.attention_forward(fq, fk, fv, None, None, None, None, 0, 0, 1.0, 0.0, -1, -1,
                                                        True, 0.0, 0, 0)
        assert out.shape == (2, 3, 5, 4) and lse.shape == (2, 3, 5) and lse.dtype == F32


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_input(backend, device):
    q, k, v = qkv(1, 2, 2, 8, 8, 16, device=device, requires_grad=False)
    attn = fusedops.attention
    sdpa = fusedops.scaled_dot_product_attention
    cases = [
        (lambda: attn(q, rand(1, 2, 8, 12, device=device), v), ValueError, "head dim"),
        (lambda: attn(q, k, rand(1, 2, 9, 16, device=device)), ValueError, "positions"),
        (lambda: attn(q, k.to(F16), v), TypeError, "same dtype"),
        (lambda: attn(q.int(), k, v), TypeError, "q must be float32"),
        (lambda: attn(q[0], k, v), ValueError, "q must have at least 4 dims"),
        (lambda: attn(q, rand(1, 3, 8, 16, device=device), rand(1, 3, 8, 16, device=device)), ValueError,
         "multiple"),
        (lambda: attn(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: attn(q, k, v, softcap=-1.0), ValueError, "softcap"),
        (lambda: attn(q, k, v, window=(1, 2, 3)), ValueError, "window"),
        (lambda: attn(q, k, v, causal=True, window=(-1, 3)), ValueError, "causal"),
        (lambda: attn(q, k, v, alibi_slopes=torch.rand(3, device=device)), ValueError, "alibi_slopes"),
        (lambda: attn(q, k, v, scale=float("nan")), ValueError, "scale"),
        (lambda: attn(q, k, v, scale=1e39), ValueError, "scale must be finite as a float32"),
        (lambda: attn(q, k, v, softcap=1e39), ValueError, "softcap"),
        (lambda: sdpa(q, k, v, scale=-1e39), ValueError, "scale"),
        (lambda: attn(q, k.to("meta"), v), ValueError, "same device"),
        (lambda: sdpa(q, k, v, attn_mask=torch.ones(3, 8, device=device, dtype=torch.bool)), ValueError,
         "attn_mask"),
        (lambda: sdpa(q, k, v, attn_mask=torch.ones(8, 8, device=device, dtype=torch.int64)), TypeError, "attn_mask"),
        (lambda: sdpa(q, rand(1, 3, 8, 16, device=device), rand(1, 3, 8, 16, device=device)), ValueError,
         "broadcast"),
        (lambda: sdpa(q, k[:, :1], v, enable_gqa=True), ValueError, "heads"),
        (lambda: sdpa(q[0, 0, 0], k, v), ValueError, "at least 2 dims"),
    ]
    if emulated_or_cuda(backend):
        q12 = rand(1, 2, 8, 12, device=device)
        cases += [
            (lambda: attn(q12, q12, q12), ValueError, "head dims that are multiples of 8"),
            (lambda: attn(q, k, rand(1, 2, 8, 264, device=device)), ValueError, "multiples of 8"),
            (lambda: attn(q.double(), k.double(), v.double()), TypeError, "float64"),
        ]
    for fn, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn()


def test_bad_varlen(backend, device):
    q = rand(10, 2, 16, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    vl = fusedops.attention_varlen
    with pytest.raises(ValueError, match="rise from 0"):
        vl(q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32, device=device), cu)
    with pytest.raises(ValueError, match="rise from 0"):
        vl(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=device),
           torch.tensor([0, 2, 4, 10], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        vl(q, q, q, cu, cu, max_seqlen_q=5)
    with pytest.raises(ValueError, match=r"max_seqlen_q and max_seqlen_k must be in \[0, 2\^31\)"):
        vl(q, q, q, cu, cu, max_seqlen_k=2**31 + 5)
    with pytest.raises(ValueError, match="softcap"):
        vl(q, q, q, cu, cu, softcap=float("inf"))
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        vl(q, q, q, cu, cu.float())
    with pytest.raises(ValueError, match="same length"):
        vl(q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"\(total, heads, head_dim\)"):
        vl(q[None], q, q, cu, cu)


def test_op_checks_direct_calls():
    """torch.ops.fusedops.attention_* check their arguments themselves (they can be called directly)."""
    q = rand(1, 2, 4, 8)
    fwd = torch.ops.fusedops.attention_forward
    with pytest.raises(ValueError, match="attn_mask must be expanded"):
        fwd(q, q, q, torch.ones(4, 4, dtype=torch.bool), None, None, None, 0, 0, 1.0, 0.0, -1, -1, False, 0.0, 0, 0)
    with pytest.raises(ValueError, match="backend code"):
        fwd(q, q, q, None, None, None, None, 0, 0, 1.0, 0.0, -1, -1, False, 0.0, 0, 7)
    with pytest.raises(ValueError, match="query must be"):
        fwd(q[0], q, q, None, None, None, None, 0, 0, 1.0, 0.0, -1, -1, False, 0.0, 0, 0)
    # varlen offsets are checked too (the kernels trust them)
    qv = rand(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for bad, words in (([0, 4, 11], "rise from 0"), ([0, 6, 4, 10], "non-decreasing"), ([1, 4, 10], "rise from 0")):
        with pytest.raises(ValueError, match=words):
            fwd(qv, qv, qv, None, None, torch.tensor(bad, dtype=torch.int32), cu[:len(bad)] if len(bad) == 3 else
                torch.tensor([0, 2, 4, 10], dtype=torch.int32), 10, 10, 1.0, 0.0, -1, -1, False, 0.0, 0, 0)
    with pytest.raises(ValueError, match="max_seqlen_k = 5"):
        fwd(qv, qv, qv, None, None, cu, cu, 10, 5, 1.0, 0.0, -1, -1, False, 0.0, 0, 0)
    for backend_code in (0, 1):  # cpu, cuda-emulated (whose grid would have ~2^31 / 64 idle blocks)
        with pytest.raises(ValueError, match=r"must be in \[0, 2\^31\)"):
            fwd(qv, qv, qv, None, None, cu, cu, 2**31 + 5, 10, 1.0, 0.0, -1, -1, False, 0.0, 0, backend_code)
    with pytest.raises(ValueError, match="scale must be finite as a float32"):
        fwd(q, q, q, None, None, None, None, 0, 0, 1e39, 0.0, -1, -1, False, 0.0, 0, 0)
    out, lse = fwd(q, q, q, None, None, None, None, 0, 0, 1.0, 0.0, -1, -1, False, 0.0, 0, 0)
    bwd = torch.ops.fusedops.attention_backward
    with pytest.raises(ValueError, match="lse must have shape"):
        bwd(out, q, q, q, out, lse[0], None, None, None, None, 0, 0, 1.0, 0.0, -1, -1, False, 0.0, 0, True, 0)
