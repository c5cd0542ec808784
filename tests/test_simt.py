"""The SIMT layer's own tests: each semantic the emulator claims, checked against a reference written
here from the CUDA programming guide and the PTX ISA (not from the emulator's code).

The same kernels (csrc/simt/selftest.cu) run on a GPU when one is present, so the emulator and the
hardware are held to the same expectations. Failure cases the hardware punishes with a dead context
(traps, misaligned ldmatrix) run on the emulator only.
"""
from __future__ import annotations

import contextlib
import random

import pytest
import torch

import fusedops
from fusedops import _C

from conftest import backend_params

EMU = 1
POISON32 = 0xFFFFFFFF

simt_backends = backend_params(cpu=False)


def code_of(name: str) -> int:
    return {"cuda-emulated": 1, "cuda": 2}[name]


def dev(name: str) -> str:
    return "cuda" if name == "cuda" else "cpu"


def run(name, backend, tensors, ints, threads=32, blocks=1, smem=0):
    _C.simt_selftest(name, code_of(backend), tensors, ints, threads=threads, blocks=blocks, smem=smem)
    if backend == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def schedule(name: str, seed: int = 0):
    previous = _C.simt_schedule()
    _C.set_simt_schedule(name, seed)
    try:
        yield
    finally:
        _C.set_simt_schedule(*previous)


def u32(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in t.cpu().tolist()]


def random_mask(rng: random.Random, must_include: int | None = None) -> int:
    mask = rng.getrandbits(32) | (1 << rng.randrange(32))
    if must_include is not None:
        mask |= 1 << must_include
    return mask


# ---- shuffles --------------------------------------------------------------------------------------

def shuffle_source(mode: str, lane: int, arg: int, width: int) -> int:
    """The lane a __shfl*_sync reads from, per the CUDA programming guide."""
    start = lane // width * width
    if mode == "idx":
        return start + arg % width
    if mode == "up":  # lanes below the segment start + delta keep their own value
        return lane - arg if lane - arg >= start else lane
    if mode == "down":  # reads past the segment end keep their own value
        return lane + arg if lane % width + arg < width else lane
    src = lane ^ arg  # xor: earlier segments may be read, later ones give the own value
    return src if src < start + width else lane


MODES = ["idx", "up", "down", "xor"]


@pytest.mark.parametrize("backend", simt_backends)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("wide", [False, True], ids=["32bit", "64bit"])
@pytest.mark.parametrize("masks", ["full", "partial", "exited"])
def test_shuffle(backend, mode, width, wide, masks, _seed):
    rng = random.Random(_seed)
    threads = 64
    for _ in range(3):
        if masks == "full":
            mask = active = POISON32
        elif masks == "partial":  # lanes outside the mask do not take part
            mask = active = random_mask(rng)
        else:  # the mask names lanes that have exited: allowed, reading from them is undefined
            mask = POISON32
            active = random_mask(rng)
        if mode == "idx":
            args = [rng.randrange(64) for _ in range(threads)]
        elif mode in ("up", "down"):
            args = [rng.randrange(width + 1) for _ in range(threads)]
        else:
            args = [rng.randrange(32) for _ in range(threads)]
        d = dev(backend)
        if wide:
            values = torch.randn(threads, dtype=torch.float64, device=d)
            out = torch.full((threads,), 12345.5, dtype=torch.float64, device=d)
        else:
            values = torch.randint(0, 2**31 - 1, (threads,), dtype=torch.int32, device=d)
            out = torch.full((threads,), 0x5EEDBEEF, dtype=torch.int32, device=d)
        arg_t = torch.tensor(args, dtype=torch.int32, device=d)
        run("shuffle", backend, [values, arg_t, out], [MODES.index(mode), mask, width, int(wide), active], threads=threads)
        got, vals = out.cpu().tolist(), values.cpu().tolist()
        for t in range(threads):
            lane, base = t % 32, t - t % 32
            if not active >> lane & 1:
                assert got[t] == (12345.5 if wide else 0x5EEDBEEF), f"exited lane {t} was written"
                continue
            src = shuffle_source(mode, lane, args[t], width)
            if active >> src & 1:
                assert got[t] == vals[base + src], f"thread {t}: {mode} width {width} arg {args[t]} mask {mask:#x}"
            elif backend == "cuda-emulated":  # undefined on hardware; the emulator poisons it
                if wide:
                    assert got[t] != got[t], f"thread {t}: reading an exited lane should give NaN poison"
                else:
                    assert got[t] & 0xFFFFFFFF == POISON32, f"thread {t}: reading an exited lane should give poison"


# ---- votes, redux, match --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", simt_backends)
def test_vote(backend, _seed):
    rng = random.Random(_seed)
    threads = 96
    for trial in range(6):
        mask = POISON32 if trial == 0 else random_mask(rng)
        preds = [rng.choice([0, 0, 1, 7, -3]) for _ in range(threads)]
        pred_t = torch.tensor(preds, dtype=torch.int32, device=dev(backend))
        out = torch.full((threads * 3,), 0x7777, dtype=torch.int32, device=dev(backend))
        run("vote", backend, [pred_t, out], [mask], threads=threads)
        got = u32(out)
        for t in range(threads):
            lane, base = t % 32, t - t % 32
            if not mask >> lane & 1:
                assert got[3 * t: 3 * t + 3] == [0x7777] * 3
                continue
            members = [l for l in range(32) if mask >> l & 1]
            ballot = sum(1 << l for l in members if preds[base + l] != 0)
            assert got[3 * t] == ballot
            assert got[3 * t + 1] == int(any(preds[base + l] != 0 for l in members))
            assert got[3 * t + 2] == int(all(preds[base + l] != 0 for l in members))


@pytest.mark.parametrize("backend", simt_backends)
def test_reduce(backend, _seed):
    rng = random.Random(_seed)
    threads = 64
    for trial in range(6):
        mask = POISON32 if trial == 0 else random_mask(rng)
        values = [rng.randrange(-(2**31), 2**31) for _ in range(threads)]
        in_t = torch.tensor(values, dtype=torch.int32, device=dev(backend))
        out = torch.zeros(threads * 6, dtype=torch.int32, device=dev(backend))
        run("reduce", backend, [in_t, out], [mask], threads=threads)
        got = u32(out)
        for t in range(threads):
            lane, base = t % 32, t - t % 32
            if not mask >> lane & 1:
                continue
            members = [values[base + l] for l in range(32) if mask >> l & 1]
            as_u = [v & 0xFFFFFFFF for v in members]
            x_and, x_or, x_xor = POISON32, 0, 0
            for v in as_u:
                x_and, x_or, x_xor = x_and & v, x_or | v, x_xor ^ v
            expect = [sum(as_u) & 0xFFFFFFFF, min(members) & 0xFFFFFFFF, max(members) & 0xFFFFFFFF, x_and, x_or, x_xor]
            assert got[6 * t: 6 * t + 6] == expect, f"thread {t}"


@pytest.mark.parametrize("backend", simt_backends)
def test_match_any(backend, _seed):
    rng = random.Random(_seed)
    threads = 64
    for trial in range(4):
        mask = POISON32 if trial == 0 else random_mask(rng)
        values = [rng.choice([3, 5, 9]) for _ in range(threads)]
        in_t = torch.tensor(values, dtype=torch.int32, device=dev(backend))
        out = torch.zeros(threads, dtype=torch.int32, device=dev(backend))
        run("match_any", backend, [in_t, out], [mask], threads=threads)
        got = u32(out)
        for t in range(threads):
            lane, base = t % 32, t - t % 32
            if mask >> lane & 1:
                same = sum(1 << l for l in range(32) if mask >> l & 1 and values[base + l] == values[t])
                assert got[t] == same


# ---- barriers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", simt_backends)
@pytest.mark.parametrize("sched", ["in_order", "reversed", "random"])
@pytest.mark.parametrize("stay", [1, 17, 32, 50, 128])
def test_barrier_with_early_exit(backend, sched, stay):
    """Threads that return early count as arrived at later barriers (sm_70+ semantics)."""
    threads, rounds = 128, 3
    values = torch.randn(threads, device=dev(backend))
    out = torch.full((threads,), float("nan"), device=dev(backend))
    with schedule(sched, seed=stay):
        run("barrier", backend, [values, out], [stay, rounds], threads=threads)
    idx = (torch.arange(stay) + rounds) % stay
    torch.testing.assert_close(out[:stay].cpu(), values.cpu()[idx] + rounds, rtol=0, atol=1e-6)
    assert torch.isnan(out[stay:]).all(), "threads that exited wrote output"


@pytest.mark.parametrize("backend", simt_backends)
def test_barrier_reductions(backend, _seed):
    rng = random.Random(_seed)
    for threads in (1, 45, 96, 1024):
        preds = [rng.choice([0, 1, 1, 2]) if threads > 1 else 1 for _ in range(threads)]
        if threads == 96:
            preds = [1] * threads  # the "all" case
        pred_t = torch.tensor(preds, dtype=torch.int32, device=dev(backend))
        out = torch.full((threads * 3,), -5, dtype=torch.int32, device=dev(backend))
        run("barrier_reduce", backend, [pred_t, out], [], threads=threads)
        count = sum(p != 0 for p in preds)
        expect = torch.tensor([count, int(count == threads), int(count > 0)] * threads, dtype=torch.int32)
        assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("backend", simt_backends)
def test_block_and_grid_indices(backend):
    bx, by, bz, gx, gy, gz = 5, 3, 2, 3, 2, 2
    n = bx * by * bz * gx * gy * gz
    out = torch.full((n * 8,), -1, dtype=torch.int32, device=dev(backend))
    run("block_dims", backend, [out], [by, bz, gy, gz], threads=bx, blocks=gx)
    got = out.cpu().view(n, 8).tolist()
    expect = []
    for z in range(gz):
        for y in range(gy):
            for x in range(gx):
                for tz in range(bz):
                    for ty in range(by):
                        for tx in range(bx):
                            expect.append([tx, ty, tz, x, y, z, bx * 10000 + by * 100 + bz, gx * 10000 + gy * 100 + gz])
    assert got == expect


# ---- atomics and memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", simt_backends)
def test_atomics(backend, _seed):
    blocks, threads, ncounters = 7, 96, 5
    total = blocks * threads
    d = dev(backend)
    counters = torch.zeros(ncounters, dtype=torch.int32, device=d)
    start = torch.randint(0, 1000, (2,))
    fsum = torch.tensor([float(start[0])], device=d)
    umax = torch.zeros(1, dtype=torch.int32, device=d)
    cas = torch.tensor([int(start[1])], dtype=torch.int32, device=d)
    run("atomics", backend, [counters, fsum, umax, cas], [ncounters], threads=threads, blocks=blocks)
    expect = torch.bincount(torch.arange(total) % ncounters, minlength=ncounters).int()
    assert torch.equal(counters.cpu(), expect)
    assert fsum.item() == float(start[0]) + total
    assert umax.item() == total - 1
    assert cas.item() == int(start[1]) + 2 * total


@pytest.mark.parametrize("backend", simt_backends)
@pytest.mark.parametrize("threads", [1, 33, 256])
def test_dynamic_shared_memory(backend, threads):
    d = dev(backend)
    values = torch.randn(threads, device=d)
    before = torch.zeros(threads, dtype=torch.int32, device=d)
    out = torch.full((threads,), float("nan"), device=d)
    run("dynamic_smem", backend, [values, before, out], [], threads=threads)
    assert torch.equal(out.cpu(), values.cpu().flip(0))
    if backend == "cuda-emulated":  # unwritten shared memory reads as poison (NaN for floats)
        assert u32(before) == [POISON32] * threads


@pytest.mark.parametrize("backend", simt_backends)
def test_shared_memory_above_48k_needs_the_attribute(backend):
    threads, smem = 128, 64 * 1024
    out = torch.full((threads,), float("nan"), device=dev(backend))
    if backend == "cuda-emulated":
        with pytest.raises(RuntimeError, match="cudaFuncSetAttribute"):
            run("big_smem", backend, [out], [0, 0], threads=threads, smem=smem)
        with pytest.raises(RuntimeError, match="exceed the device limit"):
            run("big_smem", backend, [out], [0, 1], threads=threads, smem=228 * 1024)
    run("big_smem", backend, [out], [0, 1], threads=threads, smem=smem)
    assert torch.equal(out.cpu(), torch.arange(threads - 1, -1, -1, dtype=torch.float32))


def test_emulated_device_smem_limit():
    """The emulator can model a GPU with less shared memory (99 KiB per block on sm_86/sm_89): above it both
    the attribute and the launch fail, even for a kernel whose attribute was set under a larger limit."""
    threads = 128
    out = torch.full((threads,), float("nan"))
    previous = _C.simt_smem_limit()
    assert previous == 227 * 1024
    run("big_smem", "cuda-emulated", [out], [0, 1], threads=threads, smem=120 * 1024)  # sets the attribute
    try:
        _C.set_simt_smem_limit(99 * 1024)
        assert _C.simt_smem_limit() == 99 * 1024
        with pytest.raises(RuntimeError, match="exceed the device limit of 101376"):
            run("big_smem", "cuda-emulated", [out], [0, 0], threads=threads, smem=120 * 1024)
        with pytest.raises(RuntimeError, match="exceed the device limit of 101376"):
            run("big_smem", "cuda-emulated", [out], [0, 1], threads=threads, smem=100 * 1024)
        out.fill_(float("nan"))
        run("big_smem", "cuda-emulated", [out], [0, 1], threads=threads, smem=99 * 1024)
        assert torch.equal(out, torch.arange(threads - 1, -1, -1, dtype=torch.float32))
        for bad in (47 * 1024, 228 * 1024):
            with pytest.raises(ValueError, match="shared memory limit"):
                _C.set_simt_smem_limit(bad)
    finally:
        _C.set_simt_smem_limit(previous)


@pytest.mark.parametrize("backend", simt_backends)
def test_cp_async_with_zero_fill(backend, _seed):
    rng = random.Random(_seed)
    threads = 32
    for valid in (0, rng.randrange(1, 32), 32):
        src = torch.randn(threads * 4, device=dev(backend))
        dst = torch.full((threads * 4,), float("nan"), device=dev(backend))
        run("cp_async", backend, [src, dst], [valid], threads=threads)
        staged = src.cpu().view(threads, 4).clone()
        staged[valid:] = 0
        assert torch.equal(dst.cpu().view(threads, 4), staged.flip(0))


@pytest.mark.parametrize("backend", simt_backends)
def test_cp_async_groups_land_at_their_wait(backend):
    threads = 32
    src = torch.randn(2 * threads * 4, device=dev(backend))
    dst = torch.full((3 * threads * 4,), 7.0, device=dev(backend))
    run("cp_async_groups", backend, [src, dst], [], threads=threads)
    got, rows = dst.cpu().view(3 * threads, 4), src.cpu().view(2 * threads, 4)
    assert torch.equal(got[:threads], rows[:threads].flip(0)), "the waited-for group has landed"
    assert torch.equal(got[2 * threads:], rows[threads:].flip(0)), "after wait_group 0 everything has landed"
    if backend == "cuda-emulated" and _C.simt_schedule()[0] == "in_order":
        # in lane order copies land at their wait: the group still in flight has not landed
        assert torch.isnan(got[threads:2 * threads]).all()


def test_shared_memory_overrun_faults():
    """Dynamic shared memory ends at a guard page: an overrun crashes loudly instead of corrupting."""
    import subprocess
    import sys

    code = ("import torch, fusedops; from fusedops import _C; "
            "_C.simt_selftest('smem_overrun', 1, [torch.zeros(4)], [], threads=4)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode < 0, f"expected a fault, got exit {proc.returncode}: {proc.stderr[-500:]}"


@pytest.mark.parametrize("backend", simt_backends)
def test_syncwarp_orders_shared_memory(backend, _seed):
    rng = random.Random(_seed)
    for _ in range(4):
        pairs = rng.getrandbits(16) | 1
        mask = sum(3 << (2 * i) for i in range(16) if pairs >> i & 1)
        values = torch.randn(32, device=dev(backend))
        out = torch.full((32,), float("nan"), device=dev(backend))
        with schedule("random", seed=pairs):
            run("syncwarp", backend, [values, out], [mask], threads=32)
        for lane in range(32):
            if mask >> lane & 1:
                assert out[lane].item() == values[lane ^ 1].item()
            else:
                assert out[lane].isnan()


# ---- tensor cores ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", simt_backends)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["fragments", "ldmatrix", "ldmatrix_trans"])
def test_mma_m16n8k16(backend, dtype, method):
    """mma.sync m16n8k16 against a float64 matmul of the same (rounded) inputs."""
    d = dev(backend)
    for scale in (1.0, 30.0):
        A = (torch.randn(16, 16) * scale).to(dtype)
        B = (torch.randn(16, 8) * scale).to(dtype)
        C = torch.randn(16, 8) * scale
        D = torch.full((16, 8), float("nan"), device=d)
        b_arg = B.contiguous() if method == "ldmatrix_trans" else B.t().contiguous()  # row-major B or Bt
        code = ["fragments", "ldmatrix", "ldmatrix_trans"].index(method)
        run("mma", backend, [A.to(d), b_arg.to(d), C.to(d), D], [0 if dtype == torch.float16 else 1, code])
        expect = A.double() @ B.double() + C.double()
        torch.testing.assert_close(D.cpu().double(), expect, rtol=1e-5, atol=1e-5 * scale * scale)


@pytest.mark.parametrize("backend", simt_backends)
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(backend, count, trans, _seed):
    rng = random.Random(_seed)
    rows = count * 8
    data = [[rng.randrange(1 << 16) for _ in range(8)] for _ in range(rows)]
    perm = list(range(rows))
    rng.shuffle(perm)
    perm += [rng.randrange(rows) for _ in range(32 - rows)]  # lanes past count*8 give unused addresses
    src = torch.tensor([v - (1 << 16) if v >= 1 << 15 else v for row in data for v in row], dtype=torch.int16)
    out = torch.zeros(32 * count, dtype=torch.int32, device=dev(backend))
    run("ldmatrix", backend, [src.to(dev(backend)), torch.tensor(perm, dtype=torch.int32, device=dev(backend)), out],
        [count, int(trans)])
    got = u32(out)
    for lane in range(32):
        for i in range(count):
            m = [data[perm[8 * i + r]] for r in range(8)]  # matrix i, as its rows' lanes addressed it
            r, c = lane // 4, 2 * (lane % 4)
            lo, hi = (m[c][r], m[c + 1][r]) if trans else (m[r][c], m[r][c + 1])
            assert got[lane * count + i] == lo | hi << 16, f"lane {lane} matrix {i}"


# ---- what the emulator must report ----------------------------------------------------------------

def test_deadlock_is_an_error_not_a_hang():
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"deadlock in kernel .*threads 0-15 wait at __syncthreads"):
        run("deadlock", "cuda-emulated", [out], [0], threads=64)
    with pytest.raises(RuntimeError, match=r"deadlock .*__shfl_sync \(mask 0x00000003\)"):
        run("deadlock", "cuda-emulated", [out], [1], threads=32)
    # The emulator is usable after a failed launch.
    values, res = torch.randn(32), torch.full((32,), float("nan"))
    run("barrier", "cuda-emulated", [values, res], [32, 1], threads=32)
    assert not torch.isnan(res).any()


def test_missing_barrier_is_caught_by_other_schedules():
    values = torch.randn(64)
    expect = values[torch.tensor([0] + list(range(63)))]

    def outcome(sched: str, with_barrier: int) -> torch.Tensor:
        out = torch.full((64,), 7.0)
        with schedule(sched, seed=3):
            run("missing_barrier", "cuda-emulated", [values, out], [with_barrier], threads=64)
        return out

    assert torch.equal(outcome("in_order", 0), expect), "lane order hides the race"
    for sched in ("reversed", "random"):
        assert torch.isnan(outcome(sched, 0)).any(), f"the {sched} schedule should expose the missing barrier"
        assert torch.equal(outcome(sched, 1), expect)


def test_misaligned_ldmatrix_is_reported():
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        run("misaligned_ldmatrix", "cuda-emulated", [torch.zeros(32, dtype=torch.int32)], [])


def test_trap_names_kernel_block_and_thread():
    with pytest.raises(RuntimeError, match=r"trap_kernel' block \(0,0,0\) thread \(5,0,0\): __trap"):
        run("trap", "cuda-emulated", [torch.zeros(1)], [5], threads=8)


def test_bad_launch_configuration_is_reported():
    with pytest.raises(RuntimeError, match="more than 1024 threads"):
        run("block_dims", "cuda-emulated", [torch.zeros(8 * 33 * 32, dtype=torch.int32)], [32, 1, 1, 1], threads=33)
    with pytest.raises(ValueError, match="unknown SIMT self-test"):
        run("no_such_test", "cuda-emulated", [], [])


def test_schedule_setting_round_trips():
    previous = _C.simt_schedule()
    try:
        fusedops.set_emulator_schedule("random", 42)
        assert _C.simt_schedule() == ("random", 42)
        with pytest.raises(ValueError, match="unknown emulator schedule"):
            fusedops.set_emulator_schedule("sideways")
    finally:
        _C.set_simt_schedule(*previous)
