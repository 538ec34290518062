"""The compiled extension: tolerant import, the fix named when it is missing, and a warning (never a silent
fallback) when it is installed but does not load or was built for another torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import spafl_kernels as sk
from spafl_kernels import _ext, info

pytestmark = pytest.mark.skipif(
    os.environ.get("SPAFL_SKIP_EXT") == "1", reason="built with SPAFL_SKIP_EXT=1 (pure Python)"
)


def test_extension_is_built():
    assert _ext.extension_available(), _ext.EXTENSION_ERROR


def test_missing_extension_names_the_fix(monkeypatch):
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "ImportError: no module")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _ext.require_extension()


RECORD = b'SPAFL_BUILD_INFO={"torch": "2.12.0+cpu", "cuda": null, "cuda_kernels": false, "package": "0.0.9"}'


def _failing_import(name):
    raise ImportError("spafl_kernels/_C.so: undefined symbol: _ZN3c106detail14torchCheckFailEPKcS2_jS2_")


def test_build_record_matches_the_running_torch():
    assert _ext.BUILT_WITH is not None, "_C carries no build record: rebuild it (setup.py generates it)"
    assert _ext.BUILT_WITH["torch"] == torch.__version__ and _ext.BUILT_WITH["cuda"] == torch.version.cuda
    assert _ext.BUILT_WITH["package"] == sk.__version__


def test_load_failure_warns_with_both_versions_and_the_fix(tmp_path):
    binary = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    binary.write_bytes(b"\x7fELF\0\0junk\0" + RECORD + b"\0more")
    result = _ext.load_extension(_failing_import, [str(binary)])
    assert result.error.startswith("ImportError: ") and "undefined symbol" in result.error
    assert result.built == {"torch": "2.12.0+cpu", "cuda": None, "cuda_kernels": False, "package": "0.0.9"}
    for part in ("failed to load", "undefined symbol", "torch 2.12.0+cpu", f"torch {torch.__version__}",
                 "pip install --no-build-isolation"):
        assert part in result.warning, part


def test_load_failure_of_a_binary_without_record_still_warns(tmp_path):
    binary = tmp_path / "_C.so"
    binary.write_bytes(b"\x7fELF no record")
    result = _ext.load_extension(_failing_import, [str(binary)])
    assert result.built is None and "unknown torch" in result.warning


def test_build_without_the_extension_is_quiet():
    result = _ext.load_extension(_failing_import, [])
    assert result.error is not None and result.warning is None


@pytest.mark.parametrize("record, warns", [
    (RECORD.decode(), True),  # built against another torch
    (f'SPAFL_BUILD_INFO={{"torch": "{torch.__version__}", "cuda": "12.8", "package": "0.1.0"}}',
     torch.version.cuda != "12.8"),  # another CUDA
    (f'SPAFL_BUILD_INFO={{"torch": "{torch.__version__}", "cuda": {json.dumps(torch.version.cuda)}}}', False),
    ("", True),  # no record (built before records, or by hand)
])
def test_version_mismatch_warns(record, warns):
    result = _ext.load_extension(lambda name: types.SimpleNamespace(BUILD_INFO=record), ["_C.so"])
    assert result.error is None  # it loaded: still usable, but the user is told
    assert (result.warning is not None) is warns
    if warns:
        assert f"this is torch {torch.__version__}" in result.warning and "pip install --no-build-isolation" in (
            result.warning)


def _import_in_subprocess(prelude: str) -> subprocess.CompletedProcess:
    code = prelude + "\nimport spafl_kernels, spafl_fl, spafl_kernels.info\n"
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_injected_load_failure_warns_once_on_import():
    """``_C`` is installed but cannot be imported: one ExtensionWarning, and the backends say why."""
    proc = _import_in_subprocess("import sys; sys.modules['spafl_kernels._C'] = None")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ExtensionWarning") == 1, proc.stderr
    assert "failed to load" in proc.stderr and f"this is torch {torch.__version__}" in proc.stderr


def test_injected_version_mismatch_warns_once_on_import():
    proc = _import_in_subprocess("import torch; torch.__version__ = '2.99.0+other'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ExtensionWarning") == 1, proc.stderr
    assert f"built against torch {torch.__version__}" in proc.stderr and "this is torch 2.99.0+other" in proc.stderr


def test_info_prints_the_build_record():
    report = info.report()
    assert f"built against torch {torch.__version__}" in report and f"running torch {torch.__version__}" in report
