"""Compile every Triton kernel of the ``triton`` backend for sm_80 and sm_90 without a GPU.

Triton's interpreter (how CI runs the kernels) executes the Python of a kernel, not its compilation:
type errors in loop-carried values, constexpr misuse and shared-memory overruns show only when a GPU
compiles the kernel. This compiles each kernel ahead of time (``triton.compile`` for a ``GPUTarget``;
ptxas ships with triton) and reports registers, stack (spills) and shared memory per kernel,
autotune tile and dtype, in two argument variants, as Triton specialises them at launch: ``generic``
(pointers 16-byte aligned, as torch allocates them; integers unknown) and ``aligned`` (contiguous
tensors of a large layer: innermost strides and unit conv strides are 1, the other integers that
are specialised at all are multiples of 16).

    python tools/triton_check.py [--all-tiles] [--arch 80 90] [--markdown FILE]

Exits non-zero when a kernel fails to compile. A tile over an architecture's shared memory is listed,
not failed: the autotuner skips it on that GPU. Needs ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

# Fusion stays on (Triton 3.9's default); saying so silences its notice that the default will change.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from spafl_kernels.backends.triton import conv2d, linear, rows  # noqa: E402
from spafl_kernels.semantics import score_lanes  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
"""Most dynamic shared memory a block may use, per compute capability."""

INDEX_POINTERS = {"rows_ptr", "count_ptr", "active_ptr", "active_count_ptr", "graded_ptr", "graded_count_ptr"}
ACC_POINTERS = {"gw_ptr", "gsum_ptr", "score_ptr"}
CONTIGUOUS_UNIT = {  # arguments that are 1 for contiguous (NCHW / row-major) tensors and unit conv strides
    "stride_xk", "stride_yn", "stride_dxk", "stride_gn", "stride_xw", "stride_yw", "stride_gw", "stride_dxw",
    "stride_ww", "stride_h", "stride_w",
}
DTYPES = {"fp32": "tf32", "bf16": "ieee", "fp16": "ieee", "fp64": "ieee"}  # dtype -> tl.dot precision


def _attributes(fn, constants: dict, aligned: bool) -> dict:
    """Divisibility hints as the launcher derives them: 16 for pointers, and with ``aligned`` for every
    integer argument that is neither constant nor excluded from specialisation (``rows.SIZE_ARGS``)."""
    hints = {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            continue
        if name.endswith("_ptr") or (aligned and name not in rows.SIZE_ARGS):
            hints[(index,)] = [["tt.divisibility", 16]]
    return hints


def _signature(fn, dtype: str, constants: dict) -> dict:
    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in INDEX_POINTERS:
            signature[name] = "*i32"
        elif name in ACC_POINTERS:
            signature[name] = "*" + acc
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "i32"
    return signature


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of the one function in ``cubin``, from cuobjdump: a stack frame in
    these kernels (no calls, no local arrays) holds register spills."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(match.group(1)), int(match.group(2))


def cases(all_tiles: bool):
    """``(label, jit function, dtype, constants, num_warps, num_stages)`` for every kernel to compile."""
    tiles = rows.CUDA_GEMM_TILES if all_tiles else [(64, 64, 32, 8, 3)]
    gemms = [
        (linear._linear_fwd_kernel, {"HAS_BIAS": True}),
        (linear._linear_bwd_dx_kernel, {}),
        (linear._linear_bwd_dw_kernel, {}),
        (conv2d._conv2d_fwd_kernel, {"KH": 3, "KW": 3, "HAS_BIAS": True}),
        (conv2d._conv2d_bwd_dx_kernel, {"KH": 3, "KW": 3}),
        (conv2d._conv2d_bwd_dw_kernel, {"KH": 3, "KW": 3}),
    ]
    for dtype, precision in DTYPES.items():
        options = {"PRECISION": precision, "UPCAST": False, "ACC64": dtype == "fp64"}
        for block_m, block_n, block_k, warps, stages in tiles:
            blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
            for kernel, extra in gemms:
                label = f"{block_m}x{block_n}x{block_k} w{warps} s{stages}"
                yield label, kernel.fn, dtype, {**extra, **options, **blocks}, warps, stages
        lanes = score_lanes(torch.float64 if dtype == "fp64" else torch.float32)
        yield "", rows._score_fwd_kernel, dtype, {"BLOCK_R": 4, "LANES": lanes, "FOLDS": lanes.bit_length() - 1}, 4, 3
        for block_r, block, one_chunk, warps in ((4, 512, True, 4), (1, 8192, True, 8), (1, 8192, False, 8)):
            constants = {"STE": 0, "HAS_BIAS": True, "BLOCK_R": block_r, "BLOCK": block, "ONE_CHUNK": one_chunk}
            yield f"{block_r}x{block} {'one pass' if one_chunk else 'two passes'}", rows._param_grads_bwd_kernel, \
                dtype, constants, warps, 3
        yield "", rows._row_sums_bwd_kernel, dtype, {"BLOCK_Q": 64, "BLOCK_R": 64}, 4, 3
    yield "", rows._compact_fwd_kernel, "fp32", {"STE": 2, "GRADED": True, "BLOCK": 1024}, 4, 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-tiles", action="store_true", help="every autotune tile (default: the fixed one)")
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (default: 90)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    header = "| arch | kernel | tile | dtype | variant | registers | stack (spill) bytes | shared KiB | note |"
    lines = [header, "|" + "---|" * 9]
    failures = 0
    spilling: dict[str, int] = {}  # tile -> compilations with a stack frame (within shared memory)
    start = time.perf_counter()
    for arch in args.arch:
        for label, fn, dtype, constants, warps, stages in cases(args.all_tiles):
            unit = {name: 1 for name in fn.arg_names if name in CONTIGUOUS_UNIT}
            for variant, extra in (("generic", {}), ("aligned", unit)):
                values = {**constants, **extra}
                attributes = _attributes(fn, values, aligned=variant == "aligned")
                source = ASTSource(fn, _signature(fn, dtype, values), values, attributes)
                try:
                    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                            options={"num_warps": warps, "num_stages": stages})
                except Exception as error:  # noqa: BLE001  (report every failing kernel, then fail)
                    failures += 1
                    message = str(error).strip().splitlines()[-1][:150]
                    lines.append(f"| {arch} | {fn.__name__} | {label} | {dtype} | {variant} | | | | ERROR: {message} |")
                    continue
                registers, stack = _resources(kernel.asm["cubin"])
                shared = kernel.metadata.shared
                note = "over shared memory: autotune skips it" if shared > SHARED_LIMIT.get(arch, 1 << 30) else ""
                if stack and not note:
                    key = f"sm_{arch} {label or fn.__name__}"
                    spilling[key] = spilling.get(key, 0) + 1
                lines.append(f"| {arch} | {fn.__name__} | {label} | {dtype} | {variant} | {registers} | {stack} "
                             f"| {shared / 1024:.0f} | {note} |")
    table = "\n".join(lines)
    summary = f"triton {triton.__version__}: {len(lines) - 2} compilations, {failures} failed"
    spills = "; ".join(f"{tile}: {count}" for tile, count in spilling.items()) or "none"
    print(f"{table}\n\nspilling compilations per tile: {spills}\n{summary}, {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Triton kernels compiled ahead of time\n\n`{' '.join(['python', *sys.argv])}`\n\n"
                    f"{summary}. Spilling compilations (stack frame > 0) per tile: {spills}.\n\n{table}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
