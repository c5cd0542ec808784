"""Compile check of every CUDA kernel source with nvcc for sm_80 and sm_90: each must compile, and no
kernel may spill registers. Runs wherever nvcc is on PATH (no GPU or CUDA torch needed: the kernel
sources are torch-free); skipped elsewhere.

`python tests/test_nvcc_compile.py` prints registers, spills and shared memory per kernel and arch.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "90")
# The same flags CMakeLists.txt gives the CUDA kernels.
FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v,-warn-spills"]


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def kernel_sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "kernels").glob("*.cu")) + [ROOT / "csrc" / "simt" / "selftest.cu"]


ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
SPILLS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
USAGE = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def compile_report(source: Path) -> tuple[list[dict], str]:
    """Compiles `source` for every arch; returns one record per (kernel, arch) and nvcc's output."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc(), *FLAGS, *gencode, "-I", str(ROOT / "csrc"), "-c", str(source), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"nvcc failed on {source.name}:\n{log}")
    records, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": m["name"], "arch": m["arch"], "stack": 0, "spill_stores": 0, "spill_loads": 0,
                       "registers": None, "smem": 0}
            records.append(current)
        elif current is not None and (m := SPILLS.search(line)):
            current.update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif current is not None and (m := USAGE.search(line)):
            current["registers"] = int(m["regs"])
            current["smem"] = int(m["smem"] or 0)
    for record, name in zip(records, demangle([r["kernel"] for r in records])):
        record["kernel"] = name
    return records, log


requires_nvcc = pytest.mark.skipif(nvcc() is None, reason="nvcc not found")


@requires_nvcc
@pytest.mark.parametrize("source", kernel_sources(), ids=lambda p: p.name)
def test_compiles_without_spills(source):
    records, log = compile_report(source)
    if not records:
        pytest.skip(f"{source.name} compiled, but defines no kernel")
    for arch in ARCHS:
        assert any(r["arch"] == f"sm_{arch}" for r in records), f"{source.name}: nothing compiled for sm_{arch}"
    spilling = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "register spills:\n" + "\n".join(
        f"  {r['arch']} {r['kernel']}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded" for r in spilling)


def main() -> int:
    if nvcc() is None:
        print("nvcc not found: nothing to check")
        return 0
    failed = False
    print(f"{'arch':6} {'regs':>4} {'smem':>6} {'stack':>5} {'spills':>6}  kernel")
    for source in kernel_sources():
        try:
            records, _ = compile_report(source)
        except AssertionError as e:
            print(e)
            failed = True
            continue
        print(f"-- {source.relative_to(ROOT)}")
        for r in records:
            spills = r["spill_stores"] + r["spill_loads"]
            failed |= spills > 0
            name = r["kernel"] if len(r["kernel"]) < 110 else r["kernel"][:107] + "..."
            print(f"{r['arch']:6} {r['registers'] or 0:>4} {r['smem']:>6} {r['stack']:>5} {spills:>6}  {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
