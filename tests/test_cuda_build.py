"""The `cuda` backend on a machine without a GPU: the compile check, setup.py's decision, registration,
the reasons it gives, and the fake kernels of its ops."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest
import torch
from cuda_tools import CUDA_SOURCES, ROOT, load_check, require_nvcc

import spafl_kernels as sk
from spafl_kernels import _ext, info
from spafl_kernels.backends import BackendNotSupportedError, get_backend
from spafl_kernels.backends.base import CallSpec

cuda_backend = get_backend("cuda")
cuda_module = sys.modules[type(cuda_backend).__module__]


def test_compile_check_passes():
    """Every .cu compiles for sm_80 and sm_90 without spills, and the bindings type-check (tools/cuda_check.py)."""
    require_nvcc()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_check.py")], capture_output=True, text=True,
                          check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cuda-check: OK" in proc.stdout


PTXAS_SAMPLE = """\
ptxas info    : Compiling entry function '_Z4goodv' for 'sm_80'
ptxas info    : Function properties for _Z4goodv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8320 bytes smem
ptxas info    : Compiling entry function '_Z3badv' for 'sm_90'
ptxas info    : Function properties for _Z3badv
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 8 bytes cumulative stack size
"""


def test_ptxas_report_is_parsed():
    records = load_check().parse_ptxas(PTXAS_SAMPLE)
    assert records == [
        {"name": "_Z4goodv", "arch": "sm_80", "registers": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0},
        {"name": "_Z3badv", "arch": "sm_90", "registers": 80, "stack": 8, "spill_stores": 4, "spill_loads": 8},
    ]


def _setup_module():
    """setup.py's functions, without running setup() (it runs only as __main__)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="spafl_setup_under_test")


@pytest.mark.parametrize(
    "torch_cuda, cuda_home, expected",
    [(None, None, False), (None, "/usr/local/cuda", False), ("13.0", None, False), ("13.0", "/usr/local/cuda", True),
     ("", "/usr/local/cuda", False)],
)
def test_setup_builds_cuda_only_with_cuda_torch_and_toolkit(torch_cuda, cuda_home, expected):
    assert _setup_module()["cuda_build_enabled"](torch_cuda, cuda_home) is expected


def test_setup_sources():
    sources = _setup_module()["extension_sources"]
    cpu, cuda = sources(False, str(ROOT)), sources(True, str(ROOT))
    assert "csrc/spafl.cpp" in cpu and "csrc/cpu/linear.cpp" in cpu
    assert not any(path.startswith("csrc/cuda/") for path in cpu)
    added = sorted(set(cuda) - set(cpu))
    assert added == sorted(f"csrc/cuda/{p.name}" for p in [*CUDA_SOURCES.glob("*.cu"), *CUDA_SOURCES.glob("*.cpp")])
    assert {"csrc/cuda/bindings.cpp", "csrc/cuda/linear.cu", "csrc/cuda/conv2d.cu", "csrc/cuda/rows.cu"} <= set(added)


def test_registered_but_not_chosen_automatically():
    assert "cuda" in sk.BACKEND_NAMES and "cuda" not in sk.AUTO_ORDER
    assert cuda_backend.name == "cuda" and cuda_backend.auto_device_types == ("cuda",)


def test_reasons_name_the_missing_pieces():
    reasons = cuda_backend.not_supported_reasons(CallSpec("conv2d", "cpu", torch.float32, groups=2))
    assert "runs on cuda tensors only, not cpu" in reasons
    assert any("groups=2" in r for r in reasons)
    if not cuda_module.has_cuda_kernels():
        assert any(
            "spafl_kernels._C was built without CUDA (torch.version.cuda is None or CUDA_HOME unset)" in r
            for r in reasons
        ) or any("spafl_kernels._C is not available" in r for r in reasons)
    reasons = cuda_backend.not_supported_reasons(CallSpec("linear", "cuda", torch.int32))
    assert any("dtype int32 is not supported" in r for r in reasons)


def test_built_without_cuda_here():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here: the extension may carry the CUDA kernels")
    if not _ext.extension_available():
        pytest.skip(f"extension not built: {_ext.EXTENSION_ERROR}")
    assert not cuda_module.has_cuda_kernels()
    assert cuda_module.NO_CUDA_BUILD in cuda_backend.not_supported_reasons(CallSpec("linear", "cuda", torch.float32))


def test_explicit_cuda_backend_on_cpu_raises_with_reasons():
    x, w, t = torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4)
    with pytest.raises(BackendNotSupportedError, match="backend 'cuda' cannot run linear.*runs on cuda tensors only"):
        sk.sparse_linear(x, w, None, t, backend="cuda")


def test_info_lists_the_cuda_backend(capsys):
    info.main([])
    assert "cuda       " in capsys.readouterr().out


@pytest.mark.skipif(not _ext.extension_available(), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fake_kernels_give_shapes_and_dtypes(dtype):
    meta = {"device": "meta", "dtype": dtype}
    score_dtype = sk.semantics.acc_dtype(dtype)
    x, w, b, t = torch.empty(6, 5, **meta), torch.empty(9, 5, **meta), torch.empty(9, **meta), torch.empty(9, **meta)
    y, score = torch.ops.spafl.native_linear_fwd(x, w, b, t)
    assert (y.shape, y.dtype, score.shape, score.dtype) == ((6, 9), dtype, (9,), score_dtype)
    grads = torch.ops.spafl.native_linear_bwd(y, x, w, b, score, 1, True, True)
    assert [g.shape for g in grads] == [(6, 5), (9, 5), (9,), (9,)]
    grads = torch.ops.spafl.native_linear_bwd(y, x, w, None, score, 0, False, True)
    assert [g.shape for g in grads] == [(0,), (9, 5), (0,), (9,)]

    x, w = torch.empty(2, 3, 9, 8, **meta), torch.empty(9, 3, 3, 3, **meta)
    y, score = torch.ops.spafl.native_conv2d_fwd(x, w, b, t, [2, 2, 1, 1, 1, 1, 1])
    assert (y.shape, y.dtype, score.dtype) == ((2, 9, 5, 4), dtype, score_dtype)
    grads = torch.ops.spafl.native_conv2d_bwd(y, x, w, b, score, [2, 2, 1, 1, 1, 1, 1], 2, True, False)
    assert [g.shape for g in grads] == [(2, 3, 9, 8), (0,), (0,), (0,)]
