"""The compiled extension: tolerant import, and the fix named when it is missing."""

from __future__ import annotations

import os

import pytest

from spafl_kernels import _ext

pytestmark = pytest.mark.skipif(
    os.environ.get("SPAFL_SKIP_EXT") == "1", reason="built with SPAFL_SKIP_EXT=1 (pure Python)"
)


def test_extension_is_built():
    assert _ext.extension_available(), _ext.EXTENSION_ERROR


def test_missing_extension_names_the_fix(monkeypatch):
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "ImportError: no module")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _ext.require_extension()
