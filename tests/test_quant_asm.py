"""The int8 kernel's hot loop as machine code for seven x86-64 CPUs: quant.groups_dot
compiled for each (NUMBA_CPU_NAME, in a process of its own) must multiply-add packed
integers on the CPU's widest registers, with no scalar code per weight, and prefetch
the rows ahead in software. Int8 decoding keeps up with memory only where this holds; as plain loops, which LLVM vectorises its
own way for each CPU, the kernel fails here on all seven, whatever the host."""
import os
import platform
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# LLVM CPU name -> the registers its multiply-adds must use
TARGETS = {"haswell": "ymm", "znver3": "ymm", "znver4": "zmm", "skylake-avx512": "zmm",
           "icelake-server": "zmm", "sapphirerapids": "zmm", "rocketlake": "zmm"}
MULTIPLY_ADDS = {"vpmaddwd", "vpdpwssd", "vpmaddubsw", "vpdpbusd"}
SCALAR = re.compile(r"movs[bw]|imul|v?cvtsi2s")  # one weight or product at a time
COMPILE = """
import sys
sys.modules["scipy"] = None  # Numba imports SciPy's BLAS wrappers if it can: half of this process's start
import numba, quant
array = lambda dtype: numba.types.Array(dtype, 2, "C")
sig = (array(numba.int8), array(numba.float32), array(numba.int16), array(numba.float32), numba.intp, numba.intp, numba.intp, numba.intp)
quant.{name}.compile(sig)
print(quant.{name}.inspect_asm(sig))
"""

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 targets")


def assembly(cpu, name="groups_dot"):
    """name's assembly for cpu, with that CPU's own features (NUMBA_CPU_FEATURES empty)
    and an empty cache directory, so nothing compiled for the host is loaded instead;
    None if this LLVM does not know the CPU."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": cache,
               "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-c", COMPILE.format(name=name)], env=env, capture_output=True, text=True)
    if "is not a recognized processor" in run.stderr:
        return None
    assert run.returncode == 0, run.stderr
    return run.stdout


def function_body(asm, name):
    """The instructions of the compiled function (not its Python wrapper) as lines."""
    start = next(i for i, line in enumerate(asm.splitlines())
                 if re.match(rf"_ZN5quant\d+{name}B\w*:", line))
    lines = asm.splitlines()[start:]
    return lines[:next(i for i, line in enumerate(lines) if line.startswith(".Lfunc_end"))]


def loops(body):
    """[instructions] of each loop: from a label to a later jump back to it."""
    labels, found = {}, []
    for i, line in enumerate(body):
        if m := re.match(r"(\.\w+):", line):
            labels[m[1]] = i
        elif (m := re.match(r"\s+j\w+\s+(\.\w+)", line)) and m[1] in labels:
            found.append([ln.split(None, 1) for ln in body[labels[m[1]] + 1:i + 1]
                          if ln.startswith("\t") and not ln.lstrip().startswith(".")])
    return found


def hot_loop_problems(asm, width, name="groups_dot"):
    """What is wrong with the loops that multiply-add: each packed multiply-add on
    `width` registers, no scalar arithmetic per weight, a prefetch of the rows ahead;
    [] when all is well."""
    hot = [loop for loop in loops(function_body(asm, name)) if any(ins[0] in MULTIPLY_ADDS for ins in loop)]
    if not hot:
        return ["no loop with packed integer multiply-adds"]
    problems = []
    for loop in hot:
        if not any(ins[0].startswith("prefetch") for ins in loop):
            problems.append("no software prefetch of the rows ahead")  # half of memory speed on a Xeon without it
        for ins in loop:
            operands = ins[1] if len(ins) > 1 else ""
            if ins[0] in MULTIPLY_ADDS and set(re.findall(r"%([xyz]mm)", operands)) != {width}:
                problems.append(f"{ins[0]} {operands}: not on {width}")
            if SCALAR.match(ins[0]):
                problems.append(f"scalar {ins[0]} {operands}")
    return problems


# each CPU's groups_dot, and the plain loops for one AVX-512 Xeon
JOBS = [(cpu, "groups_dot") for cpu in TARGETS] + [("rocketlake", "groups_dot_reference")]


@pytest.fixture(scope="module")
def compiled():
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # each job a process (~2 s)
        return dict(zip(JOBS, pool.map(lambda job: assembly(*job), JOBS)))


@pytest.mark.parametrize("cpu", TARGETS)
def test_the_hot_loop_multiply_adds_on_full_width_registers(compiled, cpu):
    if compiled[cpu, "groups_dot"] is None:
        pytest.skip(f"this LLVM does not know {cpu}")
    assert hot_loop_problems(compiled[cpu, "groups_dot"], TARGETS[cpu]) == []


def test_the_check_fails_the_plain_loops(compiled):
    """The same sum as plain loops (groups_dot_reference), compiled for an AVX-512 Xeon:
    LLVM's own vectorisation, what the check is there to catch."""
    asm = compiled["rocketlake", "groups_dot_reference"]
    assert asm is None or hot_loop_problems(asm, "zmm", "groups_dot_reference")
