"""The compiled extension: tolerant import and the fused score/mask/active-index CPU op."""

from __future__ import annotations

import os

import pytest
import torch
from oracle import controlled_threshold

from spafl_kernels import _ext
from spafl_kernels.semantics import row_score

pytestmark = pytest.mark.skipif(
    os.environ.get("SPAFL_SKIP_EXT") == "1", reason="built with SPAFL_SKIP_EXT=1 (pure Python)"
)


def test_extension_is_built():
    assert _ext.extension_available(), _ext.EXTENSION_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (63, 2, 3, 3), (123, 17)])
@pytest.mark.parametrize("n_active", ["none", "one", "half", "all"])
def test_score_mask_matches_semantics(dtype, shape, n_active):
    g = torch.Generator().manual_seed(shape[0])
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = shape[0]
    count = {"none": 0, "one": 1, "half": rows // 2, "all": rows}[n_active]
    threshold = controlled_threshold(weight, count, g)
    weight, threshold = weight.to(dtype), threshold.to(dtype)
    score, active, num_active = _ext.score_mask(weight, threshold)
    expected = row_score(weight, threshold)
    assert score.dtype == expected.dtype
    torch.testing.assert_close(score, expected)
    assert num_active.shape == () and int(num_active) == count
    torch.testing.assert_close(active[:count], (expected > 0).nonzero().squeeze(1))
    assert (active[count:] == -1).all()


def test_score_mask_checks_shapes():
    with pytest.raises(RuntimeError, match="threshold must have shape"):
        _ext.score_mask(torch.randn(4, 3), torch.zeros(3))


def test_score_mask_opcheck():
    torch.library.opcheck(torch.ops.spafl.score_mask.default, (torch.randn(9, 4), torch.zeros(9)))


def test_missing_extension_names_the_fix(monkeypatch):
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "ImportError: no module")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _ext.score_mask(torch.randn(2, 2), torch.zeros(2))
