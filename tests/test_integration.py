"""fusedops inside existing PyTorch code: patch()/unpatch() of torch.nn.functional, torch.compile(fullgraph=True)
of a model built from every op (the default inductor backend), and torch.autocast."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusedops

STOCK_SDPA = F.scaled_dot_product_attention
STOCK_CROSS_ENTROPY = F.cross_entropy


@pytest.fixture(autouse=True)
def _unpatched():
    fusedops.unpatch()
    fusedops.patch_report(reset=True)
    yield
    fusedops.unpatch()
    assert F.scaled_dot_product_attention is STOCK_SDPA and F.cross_entropy is STOCK_CROSS_ENTROPY


def _close(got, expected, atol, rtol=1e-5, what=""):
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---- patch / unpatch ---------------------------------------------------------------------------------------------

def test_patch_swaps_and_restores():
    handle = fusedops.patch()
    assert F.scaled_dot_product_attention is not STOCK_SDPA and F.cross_entropy is not STOCK_CROSS_ENTROPY
    assert fusedops.is_patched("scaled_dot_product_attention") and fusedops.is_patched("cross_entropy")
    assert fusedops.patch() is not None  # idempotent: patching twice keeps torch's originals
    fusedops.unpatch()
    assert F.scaled_dot_product_attention is STOCK_SDPA and F.cross_entropy is STOCK_CROSS_ENTROPY
    assert not fusedops.is_patched()
    del handle
    with fusedops.patch(cross_entropy=False):
        assert F.scaled_dot_product_attention is not STOCK_SDPA and F.cross_entropy is STOCK_CROSS_ENTROPY
    assert F.scaled_dot_product_attention is STOCK_SDPA


def test_patch_context_restores_on_error():
    with pytest.raises(KeyError):
        with fusedops.patch():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is STOCK_SDPA and F.cross_entropy is STOCK_CROSS_ENTROPY


def test_patched_functions_match_torch_and_are_counted():
    q = torch.randn(2, 3, 17, 16, requires_grad=True)
    k = torch.randn(2, 3, 23, 16, requires_grad=True)
    v = torch.randn(2, 3, 23, 8, requires_grad=True)
    mask = torch.rand(17, 23) > 0.3
    mask[:, 0] = True
    x = torch.randn(2, 11, 5, requires_grad=True)
    t = torch.randint(0, 11, (2, 5))
    t[0, 1] = -100
    w = torch.rand(11) + 0.5

    def run(qq, kk, vv, xx):
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=0.3)
        loss = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(xx, t)  # reaches F.cross_entropy
        (out.square().sum() + loss).backward()
        return out.detach(), loss.detach()

    stock = [a.detach().clone().requires_grad_() for a in (q, k, v, x)]
    expected = run(*stock)
    with fusedops.patch():
        got = run(q, k, v, x)
    _close(got[0], expected[0], 2e-5, what="attention")
    _close(got[1], expected[1], 2e-5, what="loss")
    for a, b, name in zip((q, k, v, x), stock, "qkvx"):
        _close(a.grad, b.grad, 5e-5, what=f"grad {name}")
    report = fusedops.patch_report()
    assert report["scaled_dot_product_attention"] == {"fused": 1, "fell_back": {}}
    assert report["cross_entropy"] == {"fused": 1, "fell_back": {}}


def test_fallbacks_are_torch_and_reported():
    logits = torch.randn(4, 7, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 7), -1)
    weight = (torch.rand(7) + 0.5).requires_grad_()
    hard = torch.randint(0, 7, (4,))
    with fusedops.patch():
        soft_loss = F.cross_entropy(logits, soft)
        with pytest.raises(RuntimeError, match="weight"):  # torch's error: it cannot differentiate it either
            F.cross_entropy(logits, hard, weight=weight)
        ints = torch.randn(1, 2, 3, 4).to(torch.int64)
        with pytest.raises(RuntimeError):  # torch's own error for torch's own unsupported case
            F.scaled_dot_product_attention(ints, ints, ints)
    _close(soft_loss, STOCK_CROSS_ENTROPY(logits, soft), 1e-6)
    report = fusedops.patch_report(reset=True)
    assert report["cross_entropy"]["fused"] == 0
    assert report["cross_entropy"]["fell_back"] == {"probability (soft) targets": 1,
                                                    "a class weight that requires grad": 1}
    assert report["scaled_dot_product_attention"]["fell_back"] == {"query dtype torch.int64": 1}
    assert fusedops.patch_report()["cross_entropy"] == {"fused": 0, "fell_back": {}}


def test_patched_head_dims_the_cuda_kernels_lack_fall_back():
    q = torch.randn(1, 2, 9, 12)
    with fusedops.patch(), fusedops.backend("cuda-emulated"):
        out = F.scaled_dot_product_attention(q, q, q)
    _close(out, STOCK_SDPA(q, q, q), 1e-6)
    assert fusedops.patch_report()["scaled_dot_product_attention"]["fell_back"] == {
        "head dim 12 on the CUDA kernels (multiples of 8 up to 256)": 1}


def test_patched_multihead_attention_module():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(3, 10, 32)
    expected, _ = mha(x, x, x, need_weights=False, is_causal=True,
                      attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(10))
    with fusedops.patch():
        got, _ = mha(x, x, x, need_weights=False, is_causal=True,
                     attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(10))
    _close(got, expected, 1e-5)
    assert fusedops.patch_report()["scaled_dot_product_attention"]["fused"] == 1


# ---- torch.compile(fullgraph=True) with every op inside ------------------------------------------------------

class TinyLM(torch.nn.Module):
    """Embedding → one causal attention block (fusedops SDPA) → linear cross-entropy (or logits + cross-entropy)."""

    def __init__(self, vocab=61, dim=32, heads=4, linear_loss=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)  # a key bias has no gradient: Adam would amplify noise
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.heads = heads
        self.linear_loss = linear_loss

    def forward(self, tokens, targets):
        b, s = tokens.shape
        x = self.embed(tokens)
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(fusedops.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1))
        if self.linear_loss:
            return fusedops.linear_cross_entropy(x, self.head.weight, targets, z_loss=1e-3)
        return fusedops.cross_entropy(self.head(x).transpose(1, 2), targets, label_smoothing=0.05)


@pytest.mark.parametrize("linear_loss,compiler", [(True, "inductor"), (False, "aot_eager")])
def test_torch_compile_fullgraph_model_and_optimizer(linear_loss, compiler):
    """fullgraph (the default inductor backend once; aot_eager, much faster to compile, for the other loss): the
    model (attention + loss) forward and backward and the FusedAdamW step compile with no graph break, and
    match eager."""
    torch.manual_seed(0)
    eager = TinyLM(linear_loss=linear_loss)
    compiled_model = copy.deepcopy(eager)
    tokens = torch.randint(0, 61, (2, 13))
    targets = torch.randint(0, 61, (2, 13))
    targets[0, :3] = -100
    opt_eager = fusedops.optim.FusedAdamW(eager.parameters(), lr=1e-2)
    opt_compiled = fusedops.optim.FusedAdamW(compiled_model.parameters(), lr=1e-2)
    step = torch.compile(opt_compiled.step, fullgraph=True, backend=compiler)
    forward = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for _ in range(3):
        loss_e = eager(tokens, targets)
        loss_e.backward()
        opt_eager.step()
        opt_eager.zero_grad()
        loss_c = forward(tokens, targets)
        loss_c.backward()
        step()
        opt_compiled.zero_grad()
        _close(loss_c, loss_e, 1e-5, what="loss")
    for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
        _close(a, b, 1e-5, what=name)


def test_torch_compile_fullgraph_patched_torch_code():
    """Unmodified torch code (F.scaled_dot_product_attention, F.cross_entropy) under patch(), compiled."""
    q = torch.randn(2, 2, 9, 16, requires_grad=True)
    logits = torch.randn(9, 5, requires_grad=True)
    t = torch.randint(0, 5, (9,))

    def f(q, logits):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).sum() + F.cross_entropy(logits, t)

    expected = f(q, logits)
    with fusedops.patch():
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, logits)
        graph = torch._dynamo.explain(f)(q, logits)
    _close(got, expected, 1e-5)
    assert graph.graph_break_count == 0
    ops = {str(n.target) for g in graph.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("fusedops" in o and "attention" in o for o in ops), ops
    assert any("fusedops" in o and "cross_entropy" in o for o in ops), ops


# ---- autocast ----------------------------------------------------------------------------------------------------

def test_autocast_attention_like_torch():
    q, k, v = (torch.randn(2, 3, 19, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(19, 19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = STOCK_SDPA(q, k, v, attn_mask=mask)
        got = fusedops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got4 = fusedops.attention(q, k, v, causal=True)
    assert got.dtype == expected.dtype == got4.dtype == torch.bfloat16
    _close(got.float(), expected.float(), 2e-2, 2e-2)
    got.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0  # gradients flow back through the casts
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not cast, as in torch
        assert fusedops.scaled_dot_product_attention(q.double(), k.double(), v.double()).dtype == torch.float64


def test_autocast_cross_entropy_like_torch():
    logits = torch.randn(8, 33, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 33, (8,))
    hidden, weight = torch.randn(8, 16, requires_grad=True), torch.randn(33, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = STOCK_CROSS_ENTROPY(logits, t)
        got = fusedops.cross_entropy(logits, t)
        stock_linear = STOCK_CROSS_ENTROPY(F.linear(hidden, weight), t)
        linear = fusedops.linear_cross_entropy(hidden, weight, t)
    assert got.dtype == expected.dtype == torch.float32
    assert linear.dtype == stock_linear.dtype == torch.float32
    _close(got, expected, 1e-4)
    _close(linear, stock_linear, 1e-2, 1e-2)  # both from a bfloat16 matmul
    linear.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    got.backward()
    assert logits.grad.dtype == torch.bfloat16


# ---- activation checkpointing -------------------------------------------------------------------------------

@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    """torch.utils.checkpoint over attention and cross-entropy (both ways it recomputes the forward) gives the
    loss and gradients of the plain run, bit for bit: the kernels are deterministic."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    q0 = torch.randn(2, 3, 17, 16, dtype=torch.float64)
    w0 = torch.randn(16, 11, dtype=torch.float64)
    target = torch.randint(0, 11, (2 * 3 * 17,))

    def block(q, w):
        h = fusedops.scaled_dot_product_attention(q, q @ w @ w.T, q, is_causal=True)
        return fusedops.cross_entropy(h.reshape(-1, 16) @ w, target, label_smoothing=0.1)

    def run(fn):
        q, w = q0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(q, w)
        loss.backward()
        return loss.detach(), q.grad, w.grad

    expected = run(block)
    got = run(lambda q, w: checkpoint(block, q, w, use_reentrant=use_reentrant))
    for name, a, b in zip(("loss", "q.grad", "w.grad"), got, expected):
        assert torch.equal(a, b), name
