"""Writes past the end of heap memory: the CPU kernels (every ISA this CPU runs) and the CUDA kernels on the
emulator, at odd sizes, in a subprocess under glibc's checking allocator (libc_malloc_debug with
MALLOC_CHECK_=3: every block gets a guard byte after its end, checked when the block is freed, and the
process aborts on a bad one).

The poisoned-output tests elsewhere catch elements a kernel forgets to write; this catches the opposite, a
kernel writing past the end of a scratch buffer or an output (e.g. a whole-vector store of a row's tail
into a buffer whose rows are packed back to back). Such a write corrupts the heap silently: results stay
right and nothing crashes until some later, unrelated free.
"""
from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import fusedops

MALLOC_DEBUG = ctypes.util.find_library("c_malloc_debug")

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or MALLOC_DEBUG is None,
    reason="needs glibc's libc_malloc_debug (glibc >= 2.34)")

PRELUDE = """
import torch, fusedops
torch.manual_seed(0)
def rnd(*shape, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)
def attention_cases(dtypes, head_dims, lengths):
    for dt in dtypes:
        for (E, Ev) in head_dims:
            for (L, S) in lengths:
                for causal in (False, True):
                    q, k, v = rnd(2, 2, L, E, dtype=dt), rnd(2, 1, S, E, dtype=dt), rnd(2, 1, S, Ev, dtype=dt)
                    out = fusedops.attention(q, k, v, causal=causal, softcap=5.0 if causal else 0.0)
                    out.backward(torch.randn_like(out))
                    mask = torch.rand(L, S) > 0.3
                    out = fusedops.scaled_dot_product_attention(q, k.expand(2, 2, S, E), v.expand(2, 2, S, Ev),
                                                                 attn_mask=mask)
                    out.backward(torch.randn_like(out))
def cross_entropy_cases(dtypes, classes, rows):
    for dt in dtypes:
        for V in classes:
            for N in rows:
                x = rnd(N, V, dtype=dt)
                t = torch.randint(0, V, (N,))
                t[::3] = -100
                w = torch.rand(V, dtype=torch.float64).to(torch.float32 if dt != torch.float64 else dt)
                loss = fusedops.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=20.0,
                                              reduction="none")
                loss.backward(torch.randn_like(loss))
                y = rnd(N, V, dtype=dt)
                fusedops.cross_entropy(y.clone(), t, inplace_backward=True).backward()
"""

CPU_SCRIPT = PRELUDE + """
for isa in fusedops.build_info()["cpu_isas_available"]:
    fusedops.set_cpu_isa(isa)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with fusedops.backend("cpu"):
            attention_cases((torch.float32, torch.bfloat16, torch.float16),
                            ((8, 8), (9, 3), (249, 17), (40, 72)), ((1, 1), (5, 63), (65, 129), (130, 7)))
            attention_cases((torch.float64,), ((3, 5),), ((5, 7),))
            cross_entropy_cases((torch.float32, torch.bfloat16, torch.float16, torch.float64),
                                (1, 3, 17, 1001), (1, 3, 37))
            h, W, b = rnd(37, 19), rnd(1001, 19), rnd(1001)
            t = torch.randint(0, 1001, (37,))
            fusedops.linear_cross_entropy(h, W, t, b, chunk_size=5, reduction="sum").backward()
            for state_dtype in (torch.float32, torch.bfloat16):
                params = [torch.nn.Parameter(rnd(n, grad=False)) for n in (1, 3, 17, 1001)]
                for p in params:
                    p.grad = torch.randn_like(p)
                opt = fusedops.optim.FusedAdamW(params, lr=1e-2, state_dtype=state_dtype)
                for _ in range(2):
                    opt.step()
print("done")
"""

EMULATED_SCRIPT = PRELUDE + """
with fusedops.backend("cuda-emulated"):
    attention_cases((torch.float32, torch.bfloat16), ((8, 8), (40, 24)), ((1, 1), (17, 33)))
    cross_entropy_cases((torch.float32, torch.bfloat16), (1, 3, 1001), (1, 5))
print("done")
"""


def run_checked(script: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=MALLOC_DEBUG, MALLOC_CHECK_="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(fusedops.__file__)),
                                                    env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_checking_allocator_catches_a_write_past_the_end():
    # The harness itself must be able to fail: one float written past a tensor's end aborts the process
    # when the tensor is freed.
    proc = run_checked("""
        import ctypes, torch
        t = torch.empty(61, dtype=torch.float32)
        ctypes.memset(t.data_ptr() + t.nbytes, 0x5A, 4)
        del t
        print("done")
        """, timeout=60)
    assert proc.returncode != 0 and "done" not in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("script, timeout", [
    pytest.param(CPU_SCRIPT, 900, id="cpu"),
    pytest.param(EMULATED_SCRIPT, 900, id="emu", marks=pytest.mark.emulated),
])
def test_no_heap_overflow_at_odd_sizes(script, timeout):
    proc = run_checked(script, timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("done"), (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
