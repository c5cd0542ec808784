"""Vocabulary-parallel cross-entropy and linear cross-entropy (process_group=...), on the CPU with the gloo
backend and 2 processes, against the unsharded float64 reference.

Each process builds the same full problem from the same seed, keeps its slice of the vocabulary (uneven
slices: rank 0 holds more classes than rank 1), and checks the loss, the lse, and its slice of the
gradients. The CUDA kernels take part too, through the emulator.
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import fusedops
from fusedops import reference

WORLD = 2
TOL = dict(rtol=2e-5, atol=2e-6)


def _close(actual, expected, what):
    expected = expected.double()
    finite = expected[torch.isfinite(expected)]
    scale = max(finite.abs().max().item() if finite.numel() else 1.0, 0.1)
    torch.testing.assert_close(actual.double(), expected, rtol=TOL["rtol"], atol=TOL["atol"] * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _slices(classes: int):
    first = classes // 2 + 3  # uneven on purpose
    return [slice(0, first), slice(first, classes)]


def _check_cross_entropy(rank: int, group) -> None:
    classes, rows = 37, 11
    mine = _slices(classes)[rank]
    torch.manual_seed(1234)
    x_full = torch.randn(rows, classes, dtype=torch.float64) * 3
    target = torch.randint(0, classes, (rows,))
    target[2] = -100
    target[4], target[5] = 0, _slices(classes)[1].start  # targets at both edges of the split
    weight = torch.rand(classes, dtype=torch.float64) + 0.2
    x_full[7, _slices(classes)[0]] = -math.inf  # a row masked on one shard only: rank 0's local lse is -inf
    target[7] = classes - 1
    cases = [
        dict(),
        dict(weight=weight, label_smoothing=0.1),
        dict(reduction="sum", z_loss=1e-3, softcap=4.0),
        dict(reduction="none", weight=weight, label_smoothing=0.2, z_loss=1e-2),
        dict(reduction="none", return_lse=True),
        dict(inplace_backward=True, label_smoothing=0.05),
        dict(all_ignored=True),
    ]
    for case in cases:
        case = dict(case)
        tgt = torch.full_like(target, -100) if case.pop("all_ignored", False) else target
        return_lse = case.pop("return_lse", False)
        inplace = case.pop("inplace_backward", False)
        ref_opts = dict(case)
        x = x_full[:, mine].float().clone().requires_grad_(True)
        logits = x * 1.0  # a non-leaf, so that the in-place backward may overwrite it
        w = case.pop("weight", None)
        out = fusedops.cross_entropy(logits, tgt, None if w is None else w.float(), process_group=group,
                                     return_lse=return_lse, inplace_backward=inplace, **case)
        xr = x_full.clone().requires_grad_(True)
        ref_loss, ref_lse = reference.cross_entropy(xr, tgt, **ref_opts)
        g = torch.randn(ref_loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        if return_lse:
            loss, lse = out
            g_lse = torch.randn(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
            torch.autograd.backward([loss, lse], [g.float(), g_lse.float()])
            torch.autograd.backward([ref_loss, ref_lse], [g, g_lse])
            _close(lse, ref_lse, f"rank {rank} {ref_opts}: lse")
        else:
            loss = out
            loss.backward(g.float())
            ref_loss.backward(g)
        _close(loss, ref_loss, f"rank {rank} {ref_opts}: loss")
        _close(x.grad, xr.grad[:, mine], f"rank {rank} {ref_opts}: grad")


def _check_linear(rank: int, group) -> None:
    classes, rows, hdim = 45, 19, 12
    mine = _slices(classes)[rank]
    torch.manual_seed(99)
    hidden = torch.randn(rows, hdim, dtype=torch.float64)
    w_full = torch.randn(classes, hdim, dtype=torch.float64)
    b_full = torch.randn(classes, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,))
    target[::4] = -100
    cw = torch.rand(classes, dtype=torch.float64) + 0.3
    for opts in [dict(), dict(reduction="sum", label_smoothing=0.1, class_weight=cw), dict(reduction="none"),
                 dict(return_lse=True, z_loss=1e-3, softcap=5.0)]:
        opts = dict(opts)
        return_lse = opts.pop("return_lse", False)
        h = hidden.float().clone().requires_grad_(True)
        w = w_full[mine].float().clone().requires_grad_(True)
        b = b_full[mine].float().clone().requires_grad_(True)
        cw_opt = opts.pop("class_weight", None)
        out = fusedops.linear_cross_entropy(h, w, target, b, process_group=group, chunk_size=7, return_lse=return_lse,
                                            class_weight=None if cw_opt is None else cw_opt.float(), **opts)
        hr, wr, br = (t.clone().requires_grad_(True) for t in (hidden, w_full, b_full))
        ref_loss, ref_lse = reference.linear_cross_entropy(hr, wr, target, br, class_weight=cw_opt, **opts)
        g = torch.randn(ref_loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        if return_lse:
            loss, lse = out
            g_lse = torch.randn(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            torch.autograd.backward([loss, lse], [g.float(), g_lse.float()])
            torch.autograd.backward([ref_loss, ref_lse], [g, g_lse])
            _close(lse, ref_lse, f"rank {rank} linear {opts}: lse")
        else:
            loss = out
            loss.backward(g.float())
            ref_loss.backward(g)
        what = f"rank {rank} linear {opts}"
        _close(loss, ref_loss, f"{what}: loss")
        _close(h.grad, hr.grad, f"{what}: hidden grad (summed over ranks)")
        _close(w.grad, wr.grad[mine], f"{what}: weight grad")
        _close(b.grad, br.grad[mine], f"{what}: bias grad")


def _worker(rank: int, init_file: str, backend: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    fusedops._C.set_poison_outputs(True)
    try:
        group = dist.new_group([0, 1])
        with fusedops.backend(backend):
            _check_cross_entropy(rank, group)
            _check_linear(rank, group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emulated", marks=pytest.mark.emulated)])
def test_vocab_parallel_gloo(backend):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), backend), nprocs=WORLD, join=True)
