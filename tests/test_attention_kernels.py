"""The CUDA attention kernels (csrc/kernels/attention_fwd.cu, attention_bwd.cu), called directly through
torch.ops.fusedops.attention_forward / attention_backward on the "cuda-emulated" backend (and "cuda" when
a GPU is present), against a float64 reference written here from the semantics in
csrc/kernels/attention.h — Philox dropout included, replayed with torch int64 arithmetic.

Every kernel code path is covered at least once: each head-dim instantiation (fp16/bf16: 32..256 in steps of
32; fp32: 64, 128, 256), E != Ev, each dtype, odd and unequal lengths, causal and sliding windows in both
alignments, softcap, ALiBi, boolean and additive masks with broadcasting, GQA/MQA, dropout, varlen with
empty sequences, strided and misaligned inputs, fully masked rows, backward determinism, and a random
emulator schedule. Shapes stay small (L, S <= 128): the emulator runs each CUDA thread as a fiber.

fp16/bf16 results are compared with the reference computed from the same rounded inputs; the tolerances
cover the kernels' rounding of P and dS to 16 bits before the tensor-core products.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import fusedops
from fusedops import reference as ref

from conftest import backend_params, device_for

BACKENDS = backend_params(cpu=False)
CODES = {"cuda-emulated": 1, "cuda": 2}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Max error relative to the reference's largest magnitude (outputs and gradients).
TOL = {F32: 1e-4, F16: 5e-3, BF16: 3e-2}

# ---- float64 reference (fusedops.reference.attention_dense: attention.h's semantics) ------------------------

def reference(q, k, v, *, scale, mask=None, alibi=None, softcap=0.0, window=(-1, -1), bottom_right=False,
              dropout_p=0.0, seed=0, streams=None):
    """(out, lse) in float64, differentiable in q, k, v. mask bool (True = visible) or additive,
    broadcastable to (B, Hq, L, S); alibi (Hq,) or (B, Hq); streams (B, Hq, L): each row's Philox stream."""
    B, Hq = q.shape[:2]
    return ref.attention_dense(q, k, v, attn_mask=None if mask is None else mask.cpu(), scale=scale,
                               softcap=softcap, slopes=None if alibi is None else alibi.double().cpu().expand(B, Hq),
                               window=window, bottom_right=bottom_right, dropout_p=dropout_p, dropout_seed=seed,
                               streams=streams)


def dense_streams(B, H, L):
    return torch.arange(B * H * L, dtype=torch.int64).view(B, H, L)


# ---- calling the kernels ----------------------------------------------------------------------------------

def forward(backend, q, k, v, *, scale, mask=None, alibi=None, cu=None, max_len=(0, 0), softcap=0.0,
            window=(-1, -1), bottom_right=False, dropout_p=0.0, seed=0):
    cu_q, cu_k = cu if cu is not None else (None, None)
    mask = mask.to(q.device) if mask is not None else None
    alibi = alibi.to(q.device) if alibi is not None else None
    return torch.ops.fusedops.attention_forward(q, k, v, mask, alibi, cu_q, cu_k, max_len[0], max_len[1], scale, softcap,
                                                window[0], window[1], bottom_right, dropout_p, seed, CODES[backend])


def backward(backend, dout, q, k, v, out, lse, *, scale, mask=None, alibi=None, cu=None, max_len=(0, 0), softcap=0.0,
             window=(-1, -1), bottom_right=False, dropout_p=0.0, seed=0, deterministic=True):
    cu_q, cu_k = cu if cu is not None else (None, None)
    mask = mask.to(q.device) if mask is not None else None
    alibi = alibi.to(q.device) if alibi is not None else None
    return torch.ops.fusedops.attention_backward(dout, q, k, v, out, lse, mask, alibi, cu_q, cu_k, max_len[0], max_len[1],
                                                 scale, softcap, window[0], window[1], bottom_right, dropout_p, seed,
                                                 deterministic, CODES[backend])


def assert_close(name, got, want, tol):
    got = got.detach().cpu().double()
    want = want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.nonzero(torch.isnan(got))[:5].tolist()}"
    if want.numel() == 0:
        return
    scale = max(want.abs().max().item(), 1e-2)  # gradients can cancel to 0 (e.g. one key)
    err = (got - want).abs()
    worst = err.max().item()
    assert worst <= tol * scale, (f"{name}: max error {worst:.3g} > {tol:g} x {scale:.3g} at "
                                  f"{torch.nonzero(err == worst)[0].tolist()}")


def assert_lse(got, want):
    got = got.detach().cpu().double()
    want = want.detach()
    assert not torch.isnan(got).any(), "lse: NaN"
    empty = want == -math.inf
    assert torch.equal(got == -math.inf, empty), "lse: -inf rows differ"
    err = (got[~empty] - want[~empty]).abs()
    if err.numel():
        assert err.max().item() <= 1e-4 * max(1.0, want[~empty].abs().max().item()), f"lse: max error {err.max().item():.3g}"


def make(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def check(backend, dtype, *, B=1, Hq=2, Hkv=None, L=33, S=47, E=64, Ev=None, scale=None, mask=None, alibi=None,
          softcap=0.0, window=(-1, -1), bottom_right=False, dropout_p=0.0, seed=0, grads=True, qkv=None,
          deterministic=True):
    """Runs forward (and backward) on `backend` and compares with the float64 reference; returns the
    kernel's results."""
    dev = device_for(backend)
    Hkv = Hkv or Hq
    Ev = Ev or E
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if qkv is None:
        q, k, v = make((B, Hq, L, E), dtype, dev), make((B, Hkv, S, E), dtype, dev), make((B, Hkv, S, Ev), dtype, dev)
    else:
        q, k, v = qkv
        B, Hq, L, E = q.shape
        S, Ev = k.shape[2], v.shape[3]
    if mask is not None:
        mask = mask.to(dev)
    if alibi is not None:
        alibi = alibi.to(dev)
    opts = dict(scale=scale, mask=mask, alibi=alibi, softcap=softcap, window=window, bottom_right=bottom_right,
                dropout_p=dropout_p, seed=seed)
    out, lse = forward(backend, q, k, v, **opts)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference(qd, kd, vd, streams=dense_streams(B, Hq, L), **opts)
    tol = TOL[dtype]
    assert_close("out", out, ref_out, tol)
    assert_lse(lse, ref_lse)
    if not grads:
        return out, lse, None
    dout = make(out.shape, dtype, dev)
    dq, dk, dv = backward(backend, dout, q, k, v, out, lse, deterministic=deterministic, **opts)
    ref_out.backward(dout.cpu().double())
    assert_close("dq", dq, qd.grad, tol)
    assert_close("dk", dk, kd.grad, tol)
    assert_close("dv", dv, vd.grad, tol)
    return out, lse, (dq, dk, dv)


# ---- tests ----------------------------------------------------------------------------------------------------


# fp16/bf16: every tile width 32..256 (E, Ev padded up to the next multiple of 32; E != Ev among them).
HALF_DIMS = [(8, 8), (40, 64), (64, 64), (96, 88), (128, 128), (136, 160), (192, 176), (224, 200), (256, 256)]
FP32_DIMS = [(8, 40), (128, 96), (256, 256), (200, 64), (64, 200)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,E,Ev", [(d, e, ev) for d in (F16, BF16) for e, ev in HALF_DIMS] +
                         [(F32, e, ev) for e, ev in FP32_DIMS])
def test_head_dims(backend, dtype, E, Ev):
    check(backend, dtype, E=E, Ev=Ev, L=37, S=70)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("L,S", [(1, 1), (1, 100), (7, 33), (64, 64), (100, 7), (128, 128)])
def test_lengths(backend, dtype, L, S):
    check(backend, dtype, L=L, S=S, E=32, Hq=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bottom_right", [False, True], ids=["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(-1, 0), (16, 0), (5, 3), (0, 0), (-1, 9), (40, -1)],
                         ids=["causal", "causal_w16", "w5_3", "diag", "right9", "left40"])
@pytest.mark.parametrize("L,S", [(100, 64), (33, 128)])
def test_windows(backend, bottom_right, window, L, S):
    check(backend, F16, L=L, S=S, E=64, window=window, bottom_right=bottom_right)


# Window edges one row or key either side of the 32/64 tile boundaries, where tile skipping can go wrong.
EDGE_WINDOWS = [(0, 1), (1, 1), (63, 0), (64, -1), (65, 2), (-1, 31), (-1, 64), (33, 65)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("L,S,bottom_right", [(128, 128, False), (96, 128, True)], ids=["top_left", "bottom_right"])
@pytest.mark.parametrize("window", EDGE_WINDOWS, ids=[f"w{l}_{r}" for l, r in EDGE_WINDOWS])
def test_window_tile_edges(backend, dtype, L, S, bottom_right, window):
    check(backend, dtype, Hq=1, L=L, S=S, E=16, window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_causal_other_dtypes(backend, dtype):
    check(backend, dtype, L=70, S=128, E=48, window=(-1, 0), bottom_right=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_softcap(backend, dtype):
    # A large scale drives the scores into tanh's curved range, so the derivative matters.
    check(backend, dtype, L=40, S=90, E=64, scale=0.6, softcap=4.0, window=(30, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["per_head", "per_batch_head"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_alibi(backend, per_batch, dtype):
    B, H = 2, 3
    slopes = torch.rand((B, H) if per_batch else (H,), dtype=torch.float32) * 0.5
    check(backend, dtype, B=B, Hq=H, L=45, S=60, E=32, alibi=slopes, window=(-1, 0), bottom_right=True)


MASK_SHAPES = {"full": (2, 2, 50, 70), "per_batch": (2, 1, 50, 70), "per_head_row": (1, 2, 1, 70),
               "shared": (1, 1, 50, 70)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "f32", "dtype"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_masks(backend, kind, shape):
    dtype = BF16 if kind == "dtype" and shape == "shared" else F16
    B, H, L, S = 2, 2, 50, 70
    size = MASK_SHAPES[shape]
    if kind == "bool":
        mask = torch.rand(size) > 0.3
    else:
        mask = torch.randn(size) * 2
        mask[torch.rand(size) < 0.2] = -math.inf
        mask = mask.to(torch.float32 if kind == "f32" else dtype)
    mask = mask.expand(B, H, L, S)  # the binding takes masks expanded, broadcasting through 0 strides
    check(backend, dtype, B=B, Hq=H, L=L, S=S, E=40, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_gqa(backend, Hq, Hkv, dtype):
    check(backend, dtype, Hq=Hq, Hkv=Hkv, L=40, S=72, E=32, Ev=48, window=(20, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_dropout(backend, dtype):
    check(backend, dtype, B=2, Hq=2, Hkv=1, L=45, S=70, E=32, dropout_p=0.3, seed=1234567, window=(-1, 0),
          bottom_right=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_exactly_the_philox_replay(backend, p):
    """With q = 0 every visible key has weight 1/S, and with v = I row i of the output is
    keep(i, :) / ((1 - p) S): the kernel's dropout pattern, read back bit for bit."""
    dev = device_for(backend)
    B, H, L, S = 1, 2, 20, 40
    q = torch.zeros(B, H, L, 8, device=dev)
    k = torch.randn(B, H, S, 8).to(dev)
    v = torch.eye(S).expand(B, H, S, S).contiguous().to(dev)
    seed = (0xDEADBEEF << 20) | 12345
    out, _ = forward(backend, q, k, v, scale=1.0, dropout_p=p, seed=seed)
    kept = out.cpu() > 0
    expected = ref.dropout_keep(seed, dense_streams(B, H, L), S, p)
    assert torch.equal(kept, expected)
    values = out.cpu()[kept]
    assert torch.allclose(values, torch.full_like(values, 1.0 / ((1.0 - p) * S)), rtol=1e-6)


def check_varlen(backend, dtype, lens_q, lens_k, *, H=2, Hkv=1, E=32, Ev=40, extra=(5, 3), **opts):
    dev = device_for(backend)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    max_len = (max(lens_q) + extra[0], max(lens_k) + extra[1])  # upper bounds, not exact maxima
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = make((tq, H, E), dtype, dev), make((tk, Hkv, E), dtype, dev), make((tk, Hkv, Ev), dtype, dev)
    scale = 1.0 / math.sqrt(E)
    cu = (cu_q.to(dev), cu_k.to(dev))
    out, lse = forward(backend, q, k, v, scale=scale, cu=cu, max_len=max_len, **opts)
    dout = make(out.shape, dtype, dev)
    dq, dk, dv = backward(backend, dout, q, k, v, out, lse, scale=scale, cu=cu, max_len=max_len, **opts)

    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    outs, lses = [], []
    for b in range(len(lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        qb, kb, vb = (t[s].transpose(0, 1).unsqueeze(0) for t, s in ((qd, sq), (kd, sk), (vd, sk)))
        Lb = lens_q[b]
        streams = (b * H + torch.arange(H).view(1, H, 1)) * max_len[0] + torch.arange(Lb).view(1, 1, Lb)
        o, l = reference(qb, kb, vb, scale=scale, streams=streams, **opts)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    ref_out, ref_lse = torch.cat(outs, 0), torch.cat(lses, 1)
    tol = TOL[dtype]
    assert_close("out", out, ref_out, tol)
    assert_lse(lse, ref_lse)
    ref_out.backward(dout.cpu().double())
    assert_close("dq", dq, qd.grad, tol)
    assert_close("dk", dk, kd.grad, tol)
    assert_close("dv", dv, vd.grad, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_varlen(backend, dtype):
    # An empty query sequence (whose keys get zero gradients), an empty key sequence (whose rows get
    # o = 0, lse = -inf), and lengths on both sides of the tile sizes.
    check_varlen(backend, dtype, [5, 0, 70, 17, 1], [9, 12, 0, 100, 33])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_causal_dropout_alibi(backend):
    check_varlen(backend, F16, [30, 66, 8], [50, 66, 3], H=4, Hkv=2, window=(-1, 0), bottom_right=True,
                 dropout_p=0.25, seed=77, alibi=torch.rand(4) * 0.3, softcap=6.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_strided_inputs(backend, dtype, aligned):
    """(B, L, H, E) storage seen as (B, H, L, E); misaligned: every row starts 1 element past a 16-byte
    boundary (an odd element offset and odd row strides), which takes the element-wise copy path."""
    dev = device_for(backend)
    B, H, L, S, E = 2, 3, 40, 56, 24
    pad = 8 if aligned else 1

    def strided(n, heads):
        base = torch.randn(B, n, heads, E + pad, dtype=torch.float64).to(dtype).to(dev)
        view = base[..., pad:] if not aligned else base[..., :E]
        return view.transpose(1, 2)

    q, k, v = strided(L, H), strided(S, 1), strided(S, 1)
    assert q.stride(-1) == 1 and (q.data_ptr() % 16 != 0) == (not aligned)
    check(backend, dtype, qkv=(q, k, v), window=(-1, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_size_one_dims_with_odd_strides(backend, dtype):
    """Batch 1, one kv head and one query row, each with a stride torch allows for a size-1 dim but that is
    no multiple of 16 bytes (the binding passes such strides as 0: never stepped)."""
    dev = device_for(backend)
    E, S = 64, 45

    def odd_view(h, rows):
        base = make((h * rows * E + 8,), dtype, dev)
        return base.as_strided((1, h, rows, E), (3, rows * E if h > 1 else 5, E if rows > 1 else 7, 1), 8)

    q, k, v = odd_view(3, 1), odd_view(1, S), odd_view(1, S)
    check(backend, dtype, qkv=(q, k, v))
    check(backend, dtype, qkv=(odd_view(2, 19), k, v), window=(-1, 0), bottom_right=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_fully_masked_rows(backend, dtype):
    """Rows that see no key — by the boolean mask, by an all -inf additive mask, or by a bottom-right
    window with L > S — give o = 0, lse = -inf and zero gradients, never NaN."""
    B, H, L, S = 1, 2, 60, 40
    mask = torch.rand(B, H, L, S) > 0.5
    mask[:, :, 3] = False
    mask[:, 1, 40:50] = False
    out, lse, (dq, _, _) = check(backend, dtype, B=B, Hq=H, L=L, S=S, E=32, mask=mask)
    assert torch.all(out.cpu()[:, :, 3] == 0) and torch.all(lse.cpu()[:, :, 3] == -math.inf)
    assert torch.all(dq.cpu()[:, :, 3] == 0) and torch.all(dq.cpu()[:, 1, 40:50] == 0)

    additive = torch.zeros(B, H, L, S)
    additive[:, :, 7] = -math.inf
    out, lse, (dq, _, _) = check(backend, dtype, B=B, Hq=H, L=L, S=S, E=32, mask=additive)
    assert torch.all(out.cpu()[:, :, 7] == 0) and torch.all(lse.cpu()[:, :, 7] == -math.inf)
    assert torch.all(dq.cpu()[:, :, 7] == 0)

    # Bottom-right causal with L > S: the first L - S rows precede every key.
    out, lse, (dq, dk, dv) = check(backend, dtype, B=B, Hq=H, L=L, S=S, E=32, window=(-1, 0), bottom_right=True)
    assert torch.all(out.cpu()[:, :, : L - S] == 0) and torch.all(lse.cpu()[:, :, : L - S] == -math.inf)
    assert torch.all(dq.cpu()[:, :, : L - S] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys(backend):
    """S = 0: every row is empty; dq = 0."""
    dev = device_for(backend)
    q, k, v = make((1, 2, 9, 16), F16, dev), make((1, 2, 0, 16), F16, dev), make((1, 2, 0, 24), F16, dev)
    out, lse = forward(backend, q, k, v, scale=0.25)
    assert torch.all(out.cpu() == 0) and torch.all(lse.cpu() == -math.inf)
    dq, dk, dv = backward(backend, make(out.shape, F16, dev), q, k, v, out, lse, scale=0.25)
    assert torch.all(dq.cpu() == 0) and dk.numel() == 0 and dv.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_is_deterministic(backend, deterministic):
    dev = device_for(backend)
    B, Hq, Hkv, L, S, E = 2, 4, 2, 90, 100, 64
    q, k, v = make((B, Hq, L, E), F16, dev), make((B, Hkv, S, E), F16, dev), make((B, Hkv, S, E), F16, dev)
    opts = dict(scale=0.125, window=(50, 0), dropout_p=0.2, seed=5)
    out, lse = forward(backend, q, k, v, **opts)
    dout = make(out.shape, F16, dev)
    first = backward(backend, dout, q, k, v, out, lse, deterministic=deterministic, **opts)
    second = backward(backend, dout, q, k, v, out, lse, deterministic=deterministic, **opts)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@contextlib.contextmanager
def device_smem_limit(nbytes):
    """The emulator models a GPU with `nbytes` of shared memory per block."""
    previous = fusedops._C.simt_smem_limit()
    fusedops._C.set_simt_smem_limit(nbytes)
    try:
        yield
    finally:
        fusedops._C.set_simt_smem_limit(previous)


SMALL_SMEM = 99 * 1024  # per block on sm_86, sm_89, sm_120 (RTX 30/40/50, A10, A40, L4, L40S)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype,E,Ev", [(d, e, ev) for d in (F16, BF16) for e, ev in HALF_DIMS] +
                         [(F32, 8, 40), (F32, 128, 96)])
@pytest.mark.parametrize("masked", [False, True], ids=["causal_dropout", "mask"])
def test_small_smem_gpu(dtype, E, Ev, masked):
    """With 99 KiB of shared memory per block, every fp16/bf16 head dim and fp32 up to 128 runs forward and
    backward: kernels whose default tiles need more switch to their compact ones (narrower key tiles, or
    shorter query tiles and one stage), over several tiles of each kind here."""
    L, S = 70, 100
    opts = dict(dropout_p=0.15, seed=4, window=(-1, 0)) if not masked else dict(
        mask=(torch.rand(2, 1, L, S) > 0.3).expand(2, 3, L, S), alibi=torch.rand(3) * 0.2)
    with device_smem_limit(SMALL_SMEM):
        check("cuda-emulated", dtype, B=2, Hq=3, L=L, S=S, E=E, Ev=Ev, **opts)


@pytest.mark.emulated
def test_small_smem_gpu_fp32_wide_heads():
    """fp32 above head dim 128 on a 99 KiB GPU: the forward runs (compact tiles); no fp32 backward tiling
    fits, and the backward says so by name instead of failing the launch."""
    with device_smem_limit(SMALL_SMEM):
        check("cuda-emulated", F32, L=40, S=50, E=200, Ev=256, grads=False)
        dev = device_for("cuda-emulated")
        q, k, v = make((1, 2, 40, 200), F32, dev), make((1, 2, 50, 200), F32, dev), make((1, 2, 50, 256), F32, dev)
        out, lse = forward("cuda-emulated", q, k, v, scale=0.1)
        with pytest.raises(ValueError, match=r"backward \(dK, dV\) kernel for head dim 256 needs 139 KiB.*allows 99 KiB"):
            backward("cuda-emulated", torch.randn_like(out), q, k, v, out, lse, scale=0.1)


@contextlib.contextmanager
def emulator_schedule(name, seed):
    previous = fusedops._C.simt_schedule()
    fusedops.set_emulator_schedule(name, seed)
    try:
        yield
    finally:
        fusedops.set_emulator_schedule(*previous)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype,E", [(BF16, 256), (F16, 128), (F32, 128), (F32, 256)])
def test_random_schedule_compact_tiles(dtype, E):
    """The compact tiles' one-stage pipelines (fp16/bf16 dK/dV above head dim 128, every dQ, the fp32
    forward at head dim 256) under a thread order other than lane order."""
    with device_smem_limit(SMALL_SMEM), emulator_schedule("random", 77):
        check("cuda-emulated", dtype, Hq=2, Hkv=1, L=70, S=100, E=E, window=(60, 0), dropout_p=0.1, seed=3,
              mask=(torch.rand(1, 1, 70, 100) > 0.2).expand(1, 2, 70, 100), grads=dtype != F32 or E <= 128)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [F32, F16])
def test_random_schedule(dtype):
    """A thread order other than lane order exposes a missing barrier or a read before cp.async landed."""
    with emulator_schedule("random", 2024):
        check("cuda-emulated", dtype, Hq=2, Hkv=1, L=70, S=100, E=40, Ev=72, window=(60, 0), bottom_right=True,
              dropout_p=0.1, seed=3)
        check_varlen("cuda-emulated", dtype, [20, 0, 65], [70, 9, 33], window=(-1, 0))
