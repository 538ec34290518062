"""Host-side CUDA tooling for the tests: nvcc, the CUDA headers, the compile check and the host emulation
of the kernels. Tests that need them skip when nvcc is absent, or fail when ``SPAFL_REQUIRE_NVCC=1``
(set by the Makefile, so that CI cannot pass by skipping them)."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
EMULATION_SOURCE = ROOT / "tests" / "cuda_emulation.cpp"


def load_check():
    """``tools/cuda_check.py`` as a module."""
    spec = importlib.util.spec_from_file_location("spafl_cuda_check", ROOT / "tools" / "cuda_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_nvcc() -> str:
    """nvcc's path; skips the test without one (fails instead when ``SPAFL_REQUIRE_NVCC=1``)."""
    nvcc = load_check().find_nvcc()
    if nvcc is None:
        message = "nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)"
        if os.environ.get("SPAFL_REQUIRE_NVCC") == "1":
            pytest.fail(message + "; SPAFL_REQUIRE_NVCC=1 requires it")
        pytest.skip(message)
    return nvcc


# Same defines as torch's CUDAExtension builds with (the headers must not rely on implicit half conversions).
EMULATION_FLAGS = [
    "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def build_emulation(nvcc: str) -> Path:
    """Compile ``tests/cuda_emulation.cpp`` with the host compiler against the CUDA headers (cached in
    ``build/cuda-emulation`` by the hash of the sources and flags). Returns the shared library's path."""
    include = load_check().cuda_include(nvcc)
    compiler = os.environ.get("CXX", "g++")
    h = hashlib.sha256(" ".join([compiler, include, *EMULATION_FLAGS]).encode())
    headers = [*CUDA_SOURCES.glob("*.cuh"), *CUDA_SOURCES.glob("*.h"), *CUDA_SOURCES.parent.glob("*.h")]
    for path in [EMULATION_SOURCE, *sorted(headers)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    library = ROOT / "build" / "cuda-emulation" / f"libspafl_cuda_emulation_{h.hexdigest()[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        tmp = library.with_suffix(f".tmp{os.getpid()}")
        cmd = [compiler, *EMULATION_FLAGS, "-isystem", include, f"-I{CUDA_SOURCES}", str(EMULATION_SOURCE),
               "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"building the CUDA host emulation failed:\n{' '.join(cmd)}\n{proc.stderr}"
        tmp.replace(library)
    return library


_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_I64P = ctypes.POINTER(ctypes.c_int64)


class ConvShape(ctypes.Structure):
    """``SpaflConvShape`` of ``csrc/cuda/spafl_cuda.h``."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "batch", "in_channels", "height", "width", "out_channels", "kernel_h", "kernel_w", "out_h", "out_w",
        "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
    )]


# The launchers of spafl_cuda.h without the stream; pointer arguments are passed as integers.
EMULATION_SIGNATURES = {
    "row_scores": [_INT, _PTR, _PTR, _PTR, _I64, _I64],
    "select_rows": [_INT, _PTR, _I64, _INT, _INT, _PTR, _PTR],
    "param_grads": [_INT, _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64],
    "linear_fwd": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "linear_dx": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "linear_dw": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "conv2d_fwd": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.POINTER(ConvShape)],
    "conv2d_dx": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.POINTER(ConvShape)],
    "conv2d_dw": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.POINTER(ConvShape)],
}


def load_emulation(nvcc: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_emulation(nvcc)))
    for name, argtypes in EMULATION_SIGNATURES.items():
        fn = getattr(lib, f"spafl_emu_{name}")
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib
