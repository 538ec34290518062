"""What a user installs: the sdist carries every source the build needs, the metadata and license are
complete, the version is written once, and both commands print it. (``make dist-check`` goes on to build a
wheel from the sdist and smoke-test it in a fresh environment: tools/smoke_wheel.py.)"""

from __future__ import annotations

import email.parser
import re
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import spafl_fl
import spafl_kernels as sk
from spafl_fl.cli import main as fl_main
from spafl_kernels import _ext
from spafl_kernels.bench.cli import main as bench_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tarfile.TarFile:
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False, env={"SPAFL_SKIP_EXT": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = out.glob("spafl_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        yield tar


def _members(tar: tarfile.TarFile) -> set[str]:
    return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_carries_every_source_the_build_needs(sdist):
    members = _members(sdist)
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
               if p.is_file() and p.suffix in {".cpp", ".h", ".cu", ".cuh"}}
    assert {"csrc/cpu/rows.h", "csrc/spafl_conv.h", "csrc/spafl_ste.h", "csrc/cuda/linear.cu"} <= sources
    assert sources - members == set()
    assert {"setup.py", "pyproject.toml", "LICENSE", "README.md", "docs/DESIGN.md", "spafl_kernels/_version.py",
            "spafl_kernels/py.typed", "python/spafl_fl/py.typed",
            "python/spafl_fl/flower_app/spafl-app/pyproject.toml",
            "python/spafl_fl/flower_app/spafl-app/README.md"} - members == set()
    assert not [m for m in members if m.endswith((".so", ".pyc")) or m.startswith(("tests/", "benchmarks/"))]


def test_sdist_metadata(sdist):
    (pkg_info,) = [m for m in sdist.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
    meta = email.parser.Parser().parsestr(sdist.extractfile(pkg_info).read().decode())
    assert meta["Version"] == sk.__version__
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown" and "skip pruned rows" in meta.get_payload()
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta.get_all("Classifier"))
    assert meta.get_all("Project-URL")
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("hypothesis") and 'extra == "test"' in r for r in requires)
    flower = [r for r in requires if 'extra == "flower"' in r]
    assert flower and not [r for r in flower if "==" in r.split(";")[0]], flower  # ranges, not pins


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    app = (ROOT / "python/spafl_fl/flower_app/spafl-app/pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in app


def test_version_is_written_once():
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="spafl_setup_under_test")
    assert setup["package_version"]() == sk.__version__ == spafl_fl.__version__
    app = (ROOT / "python/spafl_fl/flower_app/spafl-app/pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"$', app, re.MULTILINE).group(1) == sk.__version__
    written = [p for p in [*ROOT.glob("spafl_kernels/**/*.py"), *ROOT.glob("python/**/*.py"), ROOT / "setup.py"]
               if re.search(rf'version_*\s*=\s*["\']{re.escape(sk.__version__)}["\']', p.read_text())]
    assert written == [ROOT / "spafl_kernels/_version.py"]


def test_build_record_round_trips():
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="spafl_setup_under_test")
    header = setup["build_info_header"]("2.13.0+cu130", "13.0", True, "1.2.3")
    literal = re.search(r"#define SPAFL_BUILD_INFO (.*)", header).group(1)
    import json

    assert _ext.parse_build_info(json.loads(literal)) == {
        "torch": "2.13.0+cu130", "cuda": "13.0", "cuda_kernels": True, "package": "1.2.3"}


@pytest.mark.parametrize("main, prog", [(fl_main, "spafl-fl"), (bench_main, "spafl-bench")])
def test_commands_print_the_version(main, prog, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {sk.__version__}"


def test_typed_packages():
    assert (ROOT / "spafl_kernels/py.typed").is_file() and (ROOT / "python/spafl_fl/py.typed").is_file()


@pytest.mark.parametrize("required, code, says", [("0", 0, "cuda-check: SKIPPED, nvcc not found"),
                                                  ("1", 2, "SPAFL_REQUIRE_NVCC=1 requires it")])
def test_cuda_check_without_nvcc_skips_unless_required(monkeypatch, capsys, required, code, says):
    from cuda_tools import load_check

    check = load_check()
    monkeypatch.setattr(check, "find_nvcc", lambda: None)
    monkeypatch.setenv("SPAFL_REQUIRE_NVCC", required)
    assert check.main([]) == code
    out = capsys.readouterr()
    assert says in out.out + out.err
