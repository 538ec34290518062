"""Compile check of the CUDA sources (docs/DESIGN.md §4), for machines with nvcc but maybe no GPU.

1. Every ``csrc/cuda/*.cu`` is compiled by nvcc for sm_80 and sm_90 with ``-Xptxas -v`` and the flags
   torch's ``CUDAExtension`` adds (``-D__CUDA_NO_HALF_CONVERSIONS__`` and friends); the check fails on a
   compile error or on any kernel with non-zero spill stores/loads.
2. The torch bindings (``csrc/cuda/*.cpp``) are type-checked with ``g++ -fsyntax-only -Werror`` against the
   installed torch's headers and the CUDA headers. A CPU build of torch ships the c10/cuda headers but not
   the one its CMake build generates (``c10/cuda/impl/cuda_cmake_macros.h``, a single define); the check
   supplies that one in a temporary folder, so the bindings are checked against the real c10/cuda API.

A passing result is cached under ``build/cuda-check/`` keyed by the sources, the flags and the tool
versions, so that ``make cuda-check`` followed by the test suite compiles once.

usage: python tools/cuda_check.py [--json PATH] [--no-cache] [--no-bindings]
Without nvcc the check is skipped with a message (exit 0), unless ``SPAFL_REQUIRE_NVCC=1`` (CI sets it).

exit status: 0 clean or skipped, 1 compile error or spills, 2 nvcc not found and SPAFL_REQUIRE_NVCC=1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "csrc" / "cuda"  # the sources checked
ARCHS = ("80", "90")
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS of torch 2.13; read from torch itself when it is importable.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def find_nvcc() -> str | None:
    """``$NVCC``, nvcc on PATH, or ``$CUDA_HOME/bin/nvcc`` / ``/usr/local/cuda/bin/nvcc``."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_include(nvcc: str) -> str:
    """The toolkit's include folder: ``TOP/include`` from ``nvcc --dryrun`` (nvcc may be a wrapper script)."""
    cmd = [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    dry = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if m := re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE):
        return str((Path(m.group(1).strip()) / "include").resolve())
    return str(Path(nvcc).resolve().parent.parent / "include")


def nvcc_flags() -> list[str]:
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        common = list(COMMON_NVCC_FLAGS)
    except ImportError:
        common = TORCH_NVCC_FLAGS
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return ["-std=c++17", "-O3", "-Xptxas", "-v", *gencode, *common]


def parse_ptxas(text: str) -> list[dict]:
    """One record per function and architecture: ``{name, arch, registers, stack, spill_stores, spill_loads}``.

    ptxas prints, per function: ``Compiling entry function 'NAME' for 'sm_XX'`` (kernels only), then
    ``Function properties for NAME``, the stack/spill line, and ``Used N registers`` (kernels only).
    Non-inlined device functions get the properties and spill lines too; their spills count the same.
    """
    records: list[dict] = []
    arch = None
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            arch = m.group(2)
            current = {"name": m.group(1), "arch": arch, "registers": None}
            records.append(current)
        elif m := _PROPERTIES.search(line):
            if current is None or current["name"] != m.group(1) or "stack" in current:
                current = {"name": m.group(1), "arch": arch, "registers": None}
                records.append(current)
        elif (m := _SPILLS.search(line)) and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := _REGISTERS.search(line)) and current is not None:
            current["registers"] = int(m.group(1))
    return records


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    pretty = out.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def compile_cu(nvcc: str, source: Path) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", str(source), "-o", str(Path(tmp) / "out.o"), f"-I{HERE}", *nvcc_flags()]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


# What torch's CMake writes into c10/cuda/impl/cuda_cmake_macros.h for its (shared-library) CUDA builds.
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def check_bindings(nvcc: str, source: Path) -> tuple[bool, str]:
    from torch.utils.cpp_extension import include_paths

    compiler = os.environ.get("CXX", "g++")
    paths = [*include_paths(), cuda_include(nvcc)]
    with tempfile.TemporaryDirectory() as tmp:
        if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in paths):
            generated = Path(tmp) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
            generated.parent.mkdir(parents=True)
            generated.write_text(CUDA_CMAKE_MACROS)
            paths.append(tmp)
        includes = [flag for path in paths for flag in ("-isystem", path)]
        cmd = [compiler, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror", *includes, f"-I{HERE}",
               str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


def cache_key(nvcc: str, bindings: bool) -> str:
    h = hashlib.sha256()
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.encode())
    h.update(" ".join(nvcc_flags()).encode())
    h.update(str(bindings).encode())
    if bindings:
        import torch

        h.update(torch.__version__.encode())
    # This script, the sources and csrc/*.h (headers the .cu files include).
    for path in [Path(__file__).resolve(), *sorted(HERE.iterdir()), *sorted(HERE.parent.glob("*.h"))]:
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".cpp", ".py"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:24]


def run(bindings: bool) -> dict:
    """Compile everything; returns ``{ok, nvcc, flags, kernels: [...], errors: [...]}``."""
    nvcc = find_nvcc()
    result: dict = {"ok": False, "nvcc": nvcc, "flags": nvcc_flags(), "kernels": [], "errors": []}
    if nvcc is None:
        result["errors"].append("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
        return result
    sources = sorted(HERE.glob("*.cu"))
    if not sources:
        result["errors"].append(f"no .cu files in {HERE}")
    for source in sources:  # one nvcc at a time: the CI machine has 2 cores
        ok, log = compile_cu(nvcc, source)
        if not ok:
            result["errors"].append(f"{source.name}: nvcc failed\n{log}")
            continue
        records = parse_ptxas(log)
        if not records:
            result["errors"].append(f"{source.name}: no ptxas report in nvcc's output")
        names = demangle(sorted({r["name"] for r in records}))
        for record in records:
            record.update(file=source.name, kernel=names[record["name"]])
            result["kernels"].append(record)
            if "spill_stores" not in record:
                result["errors"].append(f"{source.name}: no spill report for {record['kernel']} ({record['arch']})")
            elif record["spill_stores"] or record["spill_loads"]:
                result["errors"].append(
                    f"{source.name}: {record['kernel']} ({record['arch']}) spills "
                    f"{record['spill_stores']} bytes stores / {record['spill_loads']} bytes loads"
                )
    if bindings:
        for source in sorted(HERE.glob("*.cpp")):
            ok, log = check_bindings(nvcc, source)
            if not ok:
                result["errors"].append(f"{source.name}: type check against torch's headers failed\n{log}")
    result["ok"] = not result["errors"]
    return result


def report(result: dict) -> str:
    lines = [f"nvcc: {result['nvcc']}", "flags: " + " ".join(result["flags"])]
    by_kernel: dict[tuple[str, str], dict[str, dict]] = {}
    for r in result["kernels"]:
        by_kernel.setdefault((r["file"], r["kernel"]), {})[r["arch"]] = r
    header = f"{'file':<11} {'kernel':<62}" + "".join(f" {'sm_' + a + ' regs/spill':>18}" for a in ARCHS)
    lines += ["", header, "-" * len(header)]
    for (file, kernel), per_arch in sorted(by_kernel.items()):
        cells = []
        for arch in ARCHS:
            r = per_arch.get(f"sm_{arch}")
            if r is None:
                cells.append(f" {'-':>18}")
            else:
                spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
                cells.append(f" {str(r['registers']) + ' / ' + str(spill):>18}")
        short = kernel.replace("spafl::", "")
        lines.append(f"{file:<11} {short[:62]:<62}" + "".join(cells))
    lines.append("")
    lines += [f"ERROR: {e}" for e in result["errors"]]
    lines.append("cuda-check: " + ("OK (no compile errors, no spills)" if result["ok"] else "FAILED"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--no-cache", action="store_true", help="compile even when a cached pass matches")
    parser.add_argument("--no-bindings", action="store_true", help="skip the type check of the torch bindings")
    args = parser.parse_args(argv)
    bindings = not args.no_bindings
    nvcc = find_nvcc()
    if nvcc is None:
        message = "nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)"
        if os.environ.get("SPAFL_REQUIRE_NVCC") == "1":
            print(f"cuda-check: {message}; SPAFL_REQUIRE_NVCC=1 requires it", file=sys.stderr)
            return 2
        print(f"cuda-check: SKIPPED, {message}; the CUDA sources were not compiled (CI requires nvcc)")
        return 0
    cache = ROOT / "build" / "cuda-check" / f"{cache_key(nvcc, bindings)}.json"
    if not args.no_cache and cache.exists():
        result = json.loads(cache.read_text())
        print(f"(cached result {cache.relative_to(ROOT)}: sources and flags unchanged)")
    else:
        result = run(bindings)
        if result["ok"]:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(result, indent=1))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
