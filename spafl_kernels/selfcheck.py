"""Self-check of a backend on a device, before ``backend="auto"`` trusts it there (docs/DESIGN.md §8, §9).

The GPU backends (``triton``, ``cuda``) are tested in CI on the CPU only (Triton's interpreter, a thread-by-
thread emulation of the CUDA kernels); no GPU runs there. So before ``auto`` picks such a backend on a device
(``Backend.self_check_device_types``), a few oracle cases run once on that device against ``reference``:
a partly pruned Linear and Conv2d, float32, forward and the gradients of x, weight, bias and threshold, with
the ``identity`` and the ``outer`` STE. A backend's error against the float64 oracle may be at most twice the
float32 oracle's own error plus a small slack (the test suite's rule), and a pruned row's output must be
exactly 0.

The verdict is cached in memory and on disk (``$XDG_CACHE_HOME/spafl_kernels/selfcheck-<key>.json``, JSON,
written atomically), per device name, driver, torch (and its CUDA), triton, package version and backend: a
new driver or release checks again. A failing check warns once per process and ``auto`` skips the backend on
that device, naming the failures; an explicit ``backend=`` still runs it. ``SPAFL_SELFCHECK=0`` trusts every
backend without checking (the default is to check).
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ._version import __version__

ENV = "SPAFL_SELFCHECK"


class SelfCheckWarning(RuntimeWarning):
    """A backend failed its self-check on a device; ``auto`` does not pick it there."""


@dataclass(frozen=True)
class Case:
    """One oracle case: ``op`` with a weight of ``weight_shape``, ``n_active`` active rows (the first ones of
    a fixed permutation), input ``x_shape``; ``stride``/``padding`` for Conv2d."""

    op: str
    ste: str
    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    n_active: int
    bias: bool = True
    stride: int = 1
    padding: int = 0

    def __str__(self) -> str:
        geometry = f", stride {self.stride}, padding {self.padding}" if self.op == "conv2d" else ""
        return (f"{self.op} x{list(self.x_shape)} w{list(self.weight_shape)}{geometry}, "
                f"{self.n_active}/{self.weight_shape[0]} rows active, ste={self.ste}, bias={self.bias}")


CASES = (
    Case("linear", "identity", (5, 37), (11, 37), 6),
    Case("linear", "outer", (3, 2, 20), (9, 20), 4, bias=False),
    Case("conv2d", "identity", (2, 3, 9, 8), (7, 3, 3, 3), 4, padding=1),
    Case("conv2d", "outer", (2, 4, 10, 9), (6, 4, 3, 3), 3, stride=2),
)
"""Odd sizes, both STEs, with and without bias, each layer partly pruned (open and closed gates among both
active and pruned rows)."""


@dataclass(frozen=True)
class Verdict:
    backend: str
    device: str
    passed: bool
    failures: tuple[str, ...]
    path: str | None
    """The cache file (None when it could not be written)."""


def _inputs(case: Case, seed: int) -> dict:
    """float64 CPU tensors ``x, weight, bias, threshold`` with scores 0.2 away from the mask (0) and gate
    (+-1) edges, so that float32 and float64 take the same decision for every row."""
    g = torch.Generator().manual_seed(seed)
    n_rows = case.weight_shape[0]
    weight = torch.randn(case.weight_shape, generator=g, dtype=torch.float64) * 0.5
    magnitude = torch.rand(n_rows, generator=g, dtype=torch.float64) * 0.6 + 0.2
    magnitude[1::2] += 1.0  # alternate rows inside and outside |s| <= 1
    sign = -torch.ones(n_rows, dtype=torch.float64)
    sign[torch.randperm(n_rows, generator=g)[: case.n_active]] = 1.0
    threshold = weight.reshape(n_rows, -1).abs().mean(1) - sign * magnitude
    bias = torch.randn(n_rows, generator=g, dtype=torch.float64) if case.bias else None
    return {"x": torch.randn(case.x_shape, generator=g, dtype=torch.float64), "weight": weight, "bias": bias,
            "threshold": threshold}


def _run(case: Case, backend: str, tensors: dict, dtype: torch.dtype, device: str) -> dict:
    """Output and gradients (``y, dx, dweight, dbias, dthreshold``) of ``backend`` on ``device`` in ``dtype``."""
    from .functional import sparse_conv2d, sparse_linear

    leaves = {k: v.to(device, dtype, copy=True).requires_grad_(True) for k, v in tensors.items() if v is not None}
    args = (leaves["x"], leaves["weight"], leaves.get("bias"), leaves["threshold"])
    if case.op == "linear":
        y = sparse_linear(*args, ste=case.ste, backend=backend)
    else:
        y = sparse_conv2d(*args, stride=case.stride, padding=case.padding, ste=case.ste, backend=backend)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(grad_y.to(device, dtype))
    return {"y": y.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def _compare(case: Case, got: dict, ref32: dict, ref64: dict) -> list[str]:
    failures = []
    for name, expected in ref64.items():
        value = got.get(name)
        if value is None or value.shape != expected.shape:
            failures.append(f"{case}: {name} missing or of shape {None if value is None else tuple(value.shape)}")
            continue
        err = (value.double() - expected).abs().max().item()
        own = (ref32[name].double() - expected).abs().max().item()
        allowed = 2 * own + 1e-5 * max(1.0, expected.abs().max().item())
        if not err <= allowed:  # also catches NaN
            failures.append(f"{case}: {name} is off by {err:.3g} (allowed {allowed:.3g})")
    pruned = ref64["y"].transpose(0, 1).reshape(ref64["y"].shape[1], -1).abs().amax(1) == 0
    y = got["y"].transpose(0, 1).reshape(got["y"].shape[1], -1)
    if pruned.any() and bool((y[pruned.to(y.device)] != 0).any()):
        failures.append(f"{case}: a pruned row's output is not exactly 0")
    return failures


def run_checks(backend: str, device: str) -> list[str]:
    """The failures of ``backend`` on ``device`` (e.g. ``"cuda:0"``) over ``CASES`` (empty: passed). An
    exception in the backend is a failure. Touches neither the global RNG nor autocast/grad modes."""
    failures = []
    device_type = torch.device(device).type
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        for seed, case in enumerate(CASES):
            tensors = _inputs(case, seed)
            try:
                ref64 = _run(case, "reference", tensors, torch.float64, device)
                ref32 = _run(case, "reference", tensors, torch.float32, device)
                got = _run(case, backend, tensors, torch.float32, device)
            except Exception as error:  # noqa: BLE001  (any error of the backend fails the check)
                failures.append(f"{case}: raised {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                continue
            failures += _compare(case, got, ref32, ref64)
    return failures


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), else the CUDA driver API version
    (``cuDriverGetVersion``), else ``"unknown"``."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
        words = [w for w in first.split() if w[:1].isdigit() and "." in w]
        if words:
            return words[0]
    except OSError:
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-driver-api {version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def current_device(device_type: str) -> str:
    """The device a call on ``device_type`` tensors is checked on: the current one of that type."""
    if device_type == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device_type


def cache_key(backend: str, device: str) -> dict:
    """What a verdict depends on: backend, device name, driver, torch (with its CUDA), triton, package."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        name, driver = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})", _nvidia_driver()
    elif device_type == "cpu":
        name, driver = cpu_model(), "none"
    else:
        name, driver = device_type, "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"backend": backend, "device": name, "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "package": __version__,
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1" if backend == "triton" else None}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spafl_kernels"


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"selfcheck-{key['backend']}-{digest}.json"


def _read(path: Path, key: dict) -> dict | None:
    """The cached record at ``path`` if it is well-formed and for ``key``; None otherwise (then it reruns)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("passed"), bool)
            or not isinstance(record.get("failures"), list)):
        return None
    return record


def _write(path: Path, record: dict) -> bool:
    """Atomic: a temporary file in the same folder, renamed over ``path``; False if the folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".selfcheck-", suffix=".tmp",
                                         delete=False, encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            tmp = f.name
        os.replace(tmp, path)
        return True
    except OSError:
        return False


_VERDICTS: dict[tuple[str, str], Verdict] = {}
"""(backend, device) -> verdict, for this process."""


def verdict(backend: str, device: str, run: bool = True) -> Verdict | None:
    """The verdict for ``backend`` on ``device``: from this process, else the disk cache, else by running the
    checks (and caching them; None instead when not ``run``). A failure warns once per process."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    known = _VERDICTS.get((backend, device))
    if known is not None:
        return known
    key = cache_key(backend, device)
    path = cache_path(key)
    record = _read(path, key)
    written = record is not None
    if record is None:
        if not run:
            return None
        with unset_fake_temporarily():  # resolve_backend may run while torch.compile traces
            failures = run_checks(backend, device)
        record = {"key": key, "passed": not failures, "failures": failures,
                  "checked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        written = _write(path, record)
    result = Verdict(backend, device, record["passed"], tuple(record["failures"]), str(path) if written else None)
    _VERDICTS[(backend, device)] = result
    if not result.passed:
        shown = "; ".join(result.failures[:4]) + (f" (+{len(result.failures) - 4} more)"
                                                  if len(result.failures) > 4 else "")
        warnings.warn(
            f"backend {backend!r} failed its self-check on {device} ({key['device']}, driver {key['driver']}, "
            f"torch {key['torch']}); backend='auto' will not use it there. Failures: {shown}"
            + (f". Verdict cached in {result.path} (delete it to check again)" if result.path else ""),
            SelfCheckWarning, stacklevel=2,
        )
    return result


def untrusted_reasons(backend: str, device_type: str) -> list[str]:
    """Why ``auto`` must not pick ``backend`` on the current ``device_type`` device: empty when its self-check
    passed there or ``SPAFL_SELFCHECK=0``."""
    if os.environ.get(ENV, "1") == "0":
        return []
    device = current_device(device_type)
    capturing = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    result = verdict(backend, device, run=not capturing)
    if result is None:
        return [f"its self-check on {device} cannot run during CUDA graph capture; make one eager call first"]
    if result.passed:
        return []
    return [f"failed its self-check on {result.device} ({len(result.failures)} failure(s), first: "
            f"{result.failures[0]}; {ENV}=0 skips the check)"]
