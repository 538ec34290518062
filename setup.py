"""Build of spafl-kernels. Install torch first (pinned), then: pip install --no-build-isolation .

Environment:
  SPAFL_SKIP_EXT=1     build no extension (pure Python; the `cpp` and `cuda` backends are absent)
  MAX_JOBS=N           parallel compile jobs (torch's cpp_extension)
"""

import glob
import os

from setuptools import find_packages, setup


def extensions():
    if os.environ.get("SPAFL_SKIP_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    openmp = ["-fopenmp"] if os.name != "nt" else []
    ext = CppExtension(
        "spafl_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17", *openmp]},
        extra_link_args=openmp,
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()

setup(
    name="spafl-kernels",
    version="0.1.0",
    description="Structured-sparse SpaFL layers whose kernels skip pruned rows, and a federated loop",
    packages=find_packages(include=["spafl_kernels", "spafl_kernels.*"])
    + find_packages("python", include=["spafl_fl", "spafl_fl.*"]),
    package_dir={"spafl_fl": "python/spafl_fl"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["spafl-bench = spafl_kernels.bench:main"]},
)
