"""Dispatch (docs/DESIGN.md §3): auto, SPAFL_BACKEND, errors listing reasons, and the info report."""

from __future__ import annotations

import pytest
import torch

import spafl_kernels as sk
import spafl_kernels.backends as backends
from spafl_kernels import info
from spafl_kernels.backends import BackendNotSupportedError, resolve_backend
from spafl_kernels.backends.base import Backend


def test_auto_picks_a_kernel_backend_on_cpu():
    chosen = resolve_backend("auto", "linear", "cpu", torch.float32, 1)
    assert chosen in backends.AUTO_ORDER and chosen != "reference"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("SPAFL_BACKEND", "reference")
    assert resolve_backend("auto", "linear", "cpu", torch.float32, 1) == "reference"
    assert resolve_backend("torch", "linear", "cpu", torch.float32, 1) == "torch"  # explicit wins
    monkeypatch.setenv("SPAFL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        resolve_backend("auto", "linear", "cpu", torch.float32, 1)


class _Refusing(Backend):
    name = "torch"
    auto_device_types = ("cpu",)

    def not_supported_reasons(self, spec):
        return [f"refuses {spec}"]


def test_errors_list_every_reason(monkeypatch):
    refusing = _Refusing()
    monkeypatch.setattr(backends, "get_backend", lambda name: refusing)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("torch",))
    with pytest.raises(BackendNotSupportedError, match=r"backend 'torch' cannot run linear\(cpu, float32\): refuses"):
        resolve_backend("torch", "linear", "cpu", torch.float32, 1)
    with pytest.raises(BackendNotSupportedError, match=r"no backend can run conv2d\(cuda, float16, groups=2\)") as e:
        resolve_backend("auto", "conv2d", "cuda", torch.float16, 2)
    assert "torch: refuses conv2d(cuda, float16, groups=2); not chosen automatically on cuda" in str(e.value)


def test_torch_backend_refuses_cpu_float16_conv():
    x, w, t = torch.randn(1, 2, 4, 4).half(), torch.randn(3, 2, 3, 3).half(), torch.zeros(3).half()
    with pytest.raises(BackendNotSupportedError, match="float16 convolution"):
        sk.sparse_conv2d(x, w, None, t, backend="torch")


def test_bfloat16_on_cpu_close_to_float32():
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 16), torch.randn(12, 16), torch.randn(12)
    t = w.abs().mean(1) - torch.linspace(-0.5, 0.5, 12)
    y32 = sk.sparse_linear(x, w, b, t, backend="torch")
    y16 = sk.sparse_linear(*(v.bfloat16() for v in (x, w, b, t)), backend="torch")
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.2, rtol=0.05)


def test_info_report(capsys):
    info.main([])
    out = capsys.readouterr().out
    assert "spafl-kernels" in out and "torch " + torch.__version__ in out
    assert "linear on cpu: auto -> " in out and "reference  ok" in out


def test_ops_refuse_a_backend_without_kernels():
    x, w, t = torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4)
    with pytest.raises(ValueError, match="backend 'reference' has no kernels"):
        torch.ops.spafl.linear_fwd(x, w, None, t, 0, "reference")
