"""Smoke test of an installed spafl-kernels wheel, run by ``make dist-check`` in a fresh virtual environment.

Run it with that environment's python, isolated (``python -I``) and from outside the source tree, so that
only the installed package can be imported. Checks: the package and ``spafl_fl`` import from site-packages
without a warning, ``python -m spafl_kernels.info`` reports ``_C`` built against this torch, both commands
print the version, the shipped data files are there, and a ``cpp`` Linear and Conv2d (forward and the
gradients of x, weight, bias and threshold) equal ``reference``.

usage: python -I tools/smoke_wheel.py
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import sysconfig
import warnings
from importlib import metadata, resources


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke_wheel: FAILED: {message}")


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-I", *args], capture_output=True, text=True, check=False)
    check(proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def outputs_and_grads(fn, tensors: dict, grad_seed: int = 7) -> dict:
    """``fn(**tensors)`` and the gradients of every tensor input after backpropagating a fixed ``dL/dy``."""
    import torch

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    y = fn(**leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype))
    return {"y": y.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def compare_layers() -> list[str]:
    """The cpp backend against reference on a partly pruned Linear and Conv2d, both STEs that differ."""
    import torch

    import spafl_kernels as sk

    g = torch.Generator().manual_seed(0)
    lines = []
    for op, ste in (("linear", "identity"), ("linear", "outer"), ("conv2d", "identity"), ("conv2d", "outer")):
        shape = (7, 5) if op == "linear" else (6, 3, 3, 3)
        weight = torch.randn(shape, generator=g, dtype=torch.float64)
        mean_abs = weight.abs().flatten(1).mean(1)
        # rows 0, 2, 4 (and 6) pruned; scores +-0.5 and +-1.5, away from the mask and gate edges
        score = torch.tensor([-0.5, 0.5, -1.5, 1.5, -0.5, 1.5, -1.5][: shape[0]], dtype=torch.float64)
        tensors = {"weight": weight, "bias": torch.randn(shape[0], generator=g, dtype=torch.float64),
                   "threshold": mean_abs - score}
        if op == "linear":
            tensors["x"] = torch.randn(4, 5, generator=g, dtype=torch.float64)
            call = sk.sparse_linear
            kwargs = {}
        else:
            tensors["x"] = torch.randn(2, 3, 8, 7, generator=g, dtype=torch.float64)
            call = sk.sparse_conv2d
            kwargs = {"stride": 2, "padding": 1}
        results = {backend: outputs_and_grads(functools.partial(call, ste=ste, backend=backend, **kwargs), tensors)
                   for backend in ("cpp", "reference")}
        for name, expected in results["reference"].items():
            got = results["cpp"][name]
            check(torch.allclose(got, expected, rtol=1e-10, atol=1e-12),
                  f"{op} ste={ste}: cpp {name} differs from reference by {(got - expected).abs().max().item():.3g}")
        lines.append(f"{op} ste={ste}: cpp == reference (y, dx, dweight, dbias, dthreshold)")
    return lines


def main() -> None:
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an extension that loads with a warning is a broken install
        import spafl_fl
        import spafl_kernels
    for module in (spafl_kernels, spafl_fl):
        path = os.path.realpath(module.__file__)
        check(path.startswith(site + os.sep), f"{module.__name__} imported from {path}, not from {site}")
    version = metadata.version("spafl-kernels")
    check(spafl_kernels.__version__ == version, f"__version__ {spafl_kernels.__version__} != metadata {version}")

    info = run("-m", "spafl_kernels.info")
    check("extension spafl_kernels._C: built" in info, "info does not report _C built:\n" + info)
    import torch

    check(f"built against torch {torch.__version__}" in info, "info does not name the torch _C was built against")
    from spafl_kernels import _ext

    check(_ext.BUILT_WITH is not None and _ext.BUILT_WITH["package"] == version, f"build record {_ext.BUILT_WITH}")

    bin_dir = os.path.dirname(sys.executable)
    for command in ("spafl-fl", "spafl-bench"):
        proc = subprocess.run([os.path.join(bin_dir, command), "--version"], capture_output=True, text=True,
                              check=False)
        check(proc.returncode == 0 and version in proc.stdout, f"{command} --version: {proc.stdout}{proc.stderr}")

    for package, name in (("spafl_kernels", "py.typed"), ("spafl_fl", "py.typed"),
                          ("spafl_fl.flower_app", "spafl-app/pyproject.toml")):
        check(resources.files(package).joinpath(name).is_file(), f"{package}/{name} is not installed")
    dist = metadata.distribution("spafl-kernels")
    check(any(str(f).endswith("LICENSE") for f in dist.files or ()), "LICENSE is not in the wheel's metadata")
    check(dist.metadata["License-Expression"] == "Apache-2.0" or dist.metadata["License"] == "Apache-2.0",
          "the license metadata is not Apache-2.0")

    lines = compare_layers()
    extension = [line.strip() for line in info.splitlines() if line.startswith(("extension", "  built against"))]
    print("\n".join([f"spafl-kernels {version} from {os.path.dirname(spafl_kernels.__file__)}", *extension, *lines,
                     "smoke_wheel: OK"]))


if __name__ == "__main__":
    main()
