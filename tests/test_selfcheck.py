"""The self-check a backend passes on a device before ``backend="auto"`` trusts it there: a correct backend
passes, a deliberately wrong one fails, warns once and is skipped by ``auto`` (an explicit backend still runs),
the verdict is cached on disk as JSON, and ``SPAFL_SELFCHECK=0`` turns the check off. The ``triton`` backend
runs it on the CPU in Triton's interpreter (the tests naming triton, under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from oracle import require_backend

import spafl_kernels as sk
from spafl_kernels import _ext, backends, selfcheck
from spafl_kernels.backends import BackendNotSupportedError, get_backend, resolve_backend


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch, tmp_path):
    """Every test starts with no verdict in memory and an empty cache folder, and leaves none behind."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPAFL_SELFCHECK", raising=False)
    monkeypatch.delenv("SPAFL_BACKEND", raising=False)
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})


def _wrong_linear_bwd(real):
    """``linear_bwd`` whose threshold gradient is off by 1e-3 on its first row: a small, plausible bug."""
    def linear_bwd(*args):
        dx, dweight, dbias, dthreshold = real(*args)
        if dthreshold.numel():
            dthreshold = dthreshold.clone()
            dthreshold[0] += 1e-3
        return dx, dweight, dbias, dthreshold
    return linear_bwd


def _wrong_conv2d_fwd(real):
    """``conv2d_fwd`` that lets the first pruned filter through at 1e-6 of the input's sum: not exactly zero."""
    def conv2d_fwd(x, weight, bias, threshold, geometry):
        y, score = real(x, weight, bias, threshold, geometry)
        pruned = (score <= 0).nonzero()
        if len(pruned):
            y = y.clone()
            y[:, pruned[0, 0]] += 1e-6 * x.sum()
        return y, score
    return conv2d_fwd


def test_correct_backend_passes():
    assert selfcheck.run_checks("torch", "cpu") == []


def test_checks_cover_both_ops_both_stes_and_pruned_rows():
    ops = {case.op for case in selfcheck.CASES}
    stes = {case.ste for case in selfcheck.CASES}
    assert ops == {"linear", "conv2d"} and {"identity", "outer"} <= stes
    assert all(0 < case.n_active < case.weight_shape[0] for case in selfcheck.CASES)


@pytest.mark.parametrize("kernel, wrap, op, output", [
    ("linear_bwd", _wrong_linear_bwd, "linear", "dthreshold"),
    ("conv2d_fwd", _wrong_conv2d_fwd, "conv2d", "pruned row"),
])
def test_wrong_backend_fails_warns_once_and_auto_skips_it(monkeypatch, kernel, wrap, op, output):
    wrong = get_backend("torch")
    monkeypatch.setattr(wrong, kernel, wrap(getattr(wrong, kernel)))
    monkeypatch.setattr(wrong, "self_check_device_types", ("cpu",))  # the check as on a GPU, here on the CPU
    failures = selfcheck.run_checks("torch", "cpu")
    assert failures and all(case.startswith(op) for case in failures) and any(output in f for f in failures)

    monkeypatch.setattr(backends, "AUTO_ORDER", ("torch",))
    with pytest.warns(selfcheck.SelfCheckWarning, match="'torch' failed its self-check on cpu") as record:
        with pytest.raises(BackendNotSupportedError, match="torch: failed its self-check on cpu"):
            resolve_backend("auto", op, "cpu", torch.float32, 1)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning, no second check
        monkeypatch.setattr(selfcheck, "run_checks", lambda *a: pytest.fail("checked twice"))
        with pytest.raises(BackendNotSupportedError, match="failed its self-check"):
            resolve_backend("auto", "linear", "cpu", torch.float32, 1)
        assert resolve_backend("torch", op, "cpu", torch.float32, 1) == "torch"  # explicit still runs

    if _ext.extension_available():  # auto goes on to the next backend
        monkeypatch.setattr(backends, "AUTO_ORDER", ("torch", "cpp"))
        assert resolve_backend("auto", op, "cpu", torch.float32, 1) == "cpp"


def test_verdict_is_cached_on_disk_as_json(monkeypatch):
    wrong = get_backend("torch")
    monkeypatch.setattr(wrong, "linear_bwd", _wrong_linear_bwd(wrong.linear_bwd))
    with pytest.warns(selfcheck.SelfCheckWarning):
        first = selfcheck.verdict("torch", "cpu")
    record = json.loads(open(first.path, encoding="utf-8").read())
    assert record["passed"] is False and record["failures"] == list(first.failures)
    assert record["key"] == selfcheck.cache_key("torch", "cpu")
    assert {"backend", "device", "driver", "torch", "package"} <= set(record["key"])

    monkeypatch.setattr(selfcheck, "_VERDICTS", {})  # a new process: the verdict comes from disk
    monkeypatch.setattr(selfcheck, "run_checks", lambda *a: pytest.fail("ran again despite the cached verdict"))
    with pytest.warns(selfcheck.SelfCheckWarning, match="delete it to check again"):
        assert selfcheck.verdict("torch", "cpu").failures == first.failures


def test_new_key_or_damaged_cache_checks_again(monkeypatch):
    assert selfcheck.verdict("torch", "cpu").passed
    path = selfcheck.cache_path(selfcheck.cache_key("torch", "cpu"))
    path.write_text("{not json")
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    calls = []
    monkeypatch.setattr(selfcheck, "run_checks", lambda *a: calls.append(a) or [])
    assert selfcheck.verdict("torch", "cpu").passed and calls == [("torch", "cpu")]
    assert json.loads(path.read_text())["passed"] is True  # rewritten whole

    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    monkeypatch.setattr(selfcheck, "__version__", "99.0")  # a new release: another key, another check
    assert selfcheck.verdict("torch", "cpu").passed and len(calls) == 2
    assert not list(path.parent.glob(".selfcheck-*.tmp"))  # no temporary file left behind


def test_env_turns_the_check_off(monkeypatch):
    monkeypatch.setenv("SPAFL_SELFCHECK", "0")
    monkeypatch.setattr(selfcheck, "run_checks", lambda *a: pytest.fail("checked with SPAFL_SELFCHECK=0"))
    monkeypatch.setattr(get_backend("torch"), "self_check_device_types", ("cpu",))
    monkeypatch.setattr(backends, "AUTO_ORDER", ("torch",))
    assert resolve_backend("auto", "linear", "cpu", torch.float32, 1) == "torch"


def test_gpu_backends_are_checked_on_cuda_only():
    for name in ("triton", "cuda"):
        assert get_backend(name).self_check_device_types == ("cuda",), name
    for name in ("cpp", "torch"):
        assert get_backend(name).self_check_device_types == (), name


def test_triton_selfcheck_passes_in_the_interpreter(monkeypatch):
    require_backend("triton", "linear", "cpu")
    triton = get_backend("triton")
    monkeypatch.setattr(triton, "auto_device_types", ("cpu", "cuda"))
    monkeypatch.setattr(triton, "self_check_device_types", ("cpu", "cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", selfcheck.SelfCheckWarning)
        assert resolve_backend("auto", "conv2d", "cpu", torch.float32, 1) == "triton"
    result = selfcheck.verdict("triton", "cpu", run=False)
    assert result is not None and result.passed and result.failures == ()
    assert json.loads(open(result.path, encoding="utf-8").read())["key"]["interpreter"] is True


def test_triton_with_a_wrong_kernel_is_skipped_in_the_interpreter(monkeypatch):
    require_backend("triton", "linear", "cpu")
    triton = get_backend("triton")
    monkeypatch.setattr(triton, "linear_bwd", _wrong_linear_bwd(triton.linear_bwd))
    monkeypatch.setattr(triton, "auto_device_types", ("cpu", "cuda"))
    monkeypatch.setattr(triton, "self_check_device_types", ("cpu", "cuda"))
    with pytest.warns(selfcheck.SelfCheckWarning, match="'triton' failed its self-check"):
        chosen = resolve_backend("auto", "linear", "cpu", torch.float32, 1)
    assert chosen in ("cpp", "torch")


def test_check_runs_when_the_first_call_is_compiled(monkeypatch):
    """``resolve_backend`` runs at trace time under ``torch.compile``; the check must run eagerly there."""
    monkeypatch.setattr(get_backend("torch"), "self_check_device_types", ("cpu",))
    monkeypatch.setattr(backends, "AUTO_ORDER", ("torch",))
    torch._dynamo.reset()
    layer = sk.SparseLinear(8, 6)
    x = torch.randn(4, 8)
    y = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y, layer(x))
    result = selfcheck.verdict("torch", "cpu", run=False)
    assert result is not None and result.passed
    torch._dynamo.reset()
