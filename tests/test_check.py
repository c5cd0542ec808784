"""`python -m fusedops.check` (fusedops/check.py, the checks in fusedops/_checks.py): a full run passes and
lists every op on every backend available here; wrong references, broken kernels, crashing checks and wrong
gradients are reported as FAIL with exit status 1."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import fusedops
from fusedops import _checks, check, reference

OPS = ("attention", "cross_entropy", "linear_cross_entropy", "adam")


def table_rows(out: str) -> list[list[str]]:
    """The rows of the printed table (op, check, backend, dtype, max error, tolerance, result[, note])."""
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op ")) + 2  # header and dashes
    rows = [re.split(r" {2,}", line.strip()) for line in lines[start:-1]]
    assert re.fullmatch(r"\d+ passed, \d+ failed", lines[-1]), lines[-1]
    return rows


def test_every_op_has_checks_on_every_backend():
    for op in OPS:
        for backend in ("cpu", "cuda-emulated", "cuda"):
            assert any(c.op == op and backend in c.backends for c in check.CHECKS), (op, backend)
        gradchecks = [c for c in check.CHECKS if c.op == op and c.name == "gradcheck"]
        if op != "adam":  # float64 gradcheck runs on the cpu backend only (the CUDA kernels take no float64)
            assert gradchecks and all(c.backends == ("cpu",) for c in gradchecks), op


def test_full_run_passes_and_lists_every_op_on_every_backend(capsys):
    assert check.main([]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows and all(r[6] == "PASS" for r in rows), [r for r in rows if r[6] != "PASS"]
    seen = {(r[0], r[2]) for r in rows}
    for op in OPS:
        for backend in fusedops.available_backends():
            assert (op, backend) in seen, f"{op} on {backend} missing from the table"
    dtypes = {(r[0], r[3]) for r in rows}
    for dtype in ("float32", "bfloat16", "float16"):
        assert ("attention", dtype) in dtypes and ("cross_entropy", dtype) in dtypes
    assert ("attention", "float64") in dtypes and ("cross_entropy", "float64") in dtypes  # the gradchecks
    for r in rows:
        assert float(r[4]) <= float(r[5]), r  # a PASS is an error within the tolerance shown
    assert out.strip().splitlines()[-1] == f"{len(rows)} passed, 0 failed"


def test_module_entry_point_with_selection():
    """`python -m fusedops.check` in a fresh interpreter (the module runs as __main__ there); --ops/--backends
    select the rows."""
    package_root = str(Path(fusedops.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fusedops.check", "--ops", "adam,cross_entropy", "--backends", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert {r[0] for r in rows} == {"adam", "cross_entropy"}
    assert {r[2] for r in rows} == {"cpu"}
    assert all(r[6] == "PASS" for r in rows)


def test_wrong_reference_fails(monkeypatch, capsys):
    """A reference off by 10% fails every parity row (its gradients are off too), and the exit status is 1;
    the gradchecks, which do not use the reference, still pass."""
    right = reference.cross_entropy

    def off_by_ten_percent(*args, **kwargs):
        loss, lse = right(*args, **kwargs)
        return loss * 1.1, lse

    monkeypatch.setattr(reference, "cross_entropy", off_by_ten_percent)
    assert check.main(["--ops", "cross_entropy", "--backends", "cpu"]) == 1
    rows = table_rows(capsys.readouterr().out)
    parity = [r for r in rows if not r[1].startswith("gradcheck")]
    gradchecks = [r for r in rows if r[1].startswith("gradcheck")]
    assert parity and gradchecks
    for r in parity:
        assert r[6] == "FAIL" and "loss" in r[7], r
        assert float(r[4]) > float(r[5]), r
    assert all(r[6] == "PASS" for r in gradchecks)


def test_broken_optimizer_fails(monkeypatch):
    """An optimizer step that moves every param 1e-4 too far: every adam row fails, on every backend."""
    # Both classes: torch.optim.Optimizer.__init__ copies a wrapped `step` onto the subclass the first time one
    # is built, so FusedAdamW may hold its own reference to the real step.
    def broken(real_step):
        def step(self, closure=None):
            real_step(self, closure)
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1e-4)
        step.hooked = True  # keep torch from wrapping it again
        return step

    for cls in (fusedops.optim.FusedAdam, fusedops.optim.FusedAdamW):
        monkeypatch.setattr(cls, "step", broken(cls.step))
    results = check.run_checks(["adam"], None, 0)
    assert {r.backend for r in results} == set(fusedops.available_backends())
    assert len(results) >= 4 * len(fusedops.available_backends())
    for r in results:
        assert not r.passed and "param 0 vs torch" in r.note, r


def test_broken_kernel_output_fails(monkeypatch):
    """An attention whose output is slightly wrong (0.1% of the largest value added to one element) fails in
    float32, where the tolerance is tighter than that, and passes where it is looser: errors are measured."""
    real = fusedops.attention

    def nudged(*args, **kwargs):
        out = real(*args, **kwargs)
        out, lse = out if isinstance(out, tuple) else (out, None)
        nudge = torch.zeros_like(out)
        nudge.view(-1)[5] = 1e-3 * float(out.detach().abs().max())
        out = out + nudge
        return (out, lse) if lse is not None else out

    monkeypatch.setattr(fusedops, "attention", nudged)
    results = [r for r in check.run_checks(["attention"], ["cpu"], 0) if r.check.startswith("causal")]
    by_dtype = {r.dtype: r for r in results}
    assert not by_dtype["float32"].passed and "out" in by_dtype["float32"].note
    assert by_dtype["bfloat16"].passed  # 1e-3 is below bfloat16's tolerance


def test_crashing_and_nan_checks_fail(monkeypatch, capsys):
    """A check that raises is one FAIL row with the exception; NaN where the reference is finite fails even
    though the finite elements agree; a run that selects nothing fails."""
    monkeypatch.setattr(check, "CHECKS", list(check.CHECKS))

    @check.register("broken", "raises", backends=("cpu",))
    def _raises(backend, device):
        raise RuntimeError("kernel exploded")

    @check.register("broken", "nan", backends=("cpu",))
    def _nan(backend, device):
        case = _checks._Case("broken", "nan", backend, torch.float32)
        expected = torch.randn(10)
        got = expected.clone()
        got[3] = math.nan
        case.close("out", got, expected, 1e-5)
        yield case.result()

    assert check.main(["--ops", "broken"]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert [(r[1], r[6]) for r in rows] == [("raises", "FAIL"), ("nan", "FAIL")]
    assert "RuntimeError: kernel exploded" in rows[0][7]
    assert "NaN/inf mismatch" in rows[1][7]
    assert check.main(["--ops", "no_such_op"]) == 1


def test_gradcheck_row_catches_a_wrong_gradient():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos() * 1.01

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bad = _checks._gradcheck("demo", "gradcheck", "cpu", WrongGrad.apply, (x,))
    assert not bad.passed and bad.max_abs_err > 1e-3
    good = _checks._gradcheck("demo", "gradcheck", "cpu", torch.sin, (x,))
    assert good.passed and good.max_abs_err < 1e-8


def test_checks_restore_global_settings():
    torch.set_num_threads(2)
    poison = fusedops._C.poison_outputs()
    check.run_checks(["cross_entropy"], ["cpu"], 0)
    assert torch.get_num_threads() == 2 and fusedops._C.poison_outputs() == poison


def test_seeded():
    """The same seed draws the same inputs: identical errors run to run."""
    a = check.run_checks(["linear_cross_entropy"], ["cpu"], 3)
    b = check.run_checks(["linear_cross_entropy"], ["cpu"], 3)
    assert [r.max_abs_err for r in a] == [r.max_abs_err for r in b]
