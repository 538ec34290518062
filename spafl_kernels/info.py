"""``python -m spafl_kernels.info``: versions, built extensions, and which backend serves what."""

from __future__ import annotations

import argparse
import os
import platform

import torch

from . import __version__, paths
from ._ext import BUILT_WITH, EXTENSION_ERROR, describe_build, describe_running
from .backends import AUTO_ORDER, BACKEND_NAMES, BackendNotSupportedError, get_backend, resolve_backend
from .backends.base import CallSpec


def report() -> str:
    lines = [
        f"spafl-kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"extension spafl_kernels._C: {'built' if EXTENSION_ERROR is None else EXTENSION_ERROR}")
    if BUILT_WITH is not None:
        kernels = "with" if BUILT_WITH.get("cuda_kernels") else "without"
        lines.append(f"  built against {describe_build(BUILT_WITH)}, {kernels} the CUDA kernels, "
                     f"for spafl-kernels {BUILT_WITH.get('package')}; running {describe_running()}")
    elif EXTENSION_ERROR is None:
        lines.append(f"  built against {describe_build(None)}; running {describe_running()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append(f"devices: {', '.join(devices)}; auto order: {', '.join(AUTO_ORDER)}; "
                 f"SPAFL_BACKEND={os.environ.get('SPAFL_BACKEND', '(unset)')}")
    lines.append("")
    lines.append("backends:")
    for name in BACKEND_NAMES:
        lines.append(f"  {name:<10} {get_backend(name).description}")
    lines.append("")
    lines.append("who serves what (float32; 'auto' = what backend='auto' picks):")
    for device in devices:
        for op in ("linear", "conv2d"):
            spec = CallSpec(op, device, torch.float32)
            try:
                chosen = resolve_backend("auto", op, device, torch.float32, 1)
            except BackendNotSupportedError as error:
                chosen = f"none ({error})"
            lines.append(f"  {op} on {device}: auto -> {chosen}")
            for name in BACKEND_NAMES:
                reasons = get_backend(name).not_supported_reasons(spec)
                lines.append(f"    {name:<10} {'ok' if not reasons else 'no: ' + '; '.join(reasons)}")
    lines.append("")
    lines.append(f"cpp path choices (SPAFL_CPU_PATH={os.environ.get('SPAFL_CPU_PATH', 'auto')}; "
                 f"cache {paths.cache_file() or 'off'}):")
    lines.extend(f"  {paths.describe(entry)}" for entry in paths.export_table())
    return "\n".join(lines)


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m spafl_kernels.info", description=__doc__).parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
