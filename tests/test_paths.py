"""The ``cpp`` backend's two exact paths (row skipping, masked dense), the timed choice between them, and
the table that records and replays the choices (spafl_kernels.paths, csrc/cpu/paths.h)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from oracle import assert_matches_oracle, make_params, require_backend, rows_for_density

import spafl_kernels as sk
from spafl_kernels import _ext, paths

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason=f"extension not built: {_ext.EXTENSION_ERROR}")

DENSITIES = [0.0, "one", 0.4, 1.0]


@pytest.fixture(autouse=True)
def _fresh_table(monkeypatch):
    """Each test starts and ends with an empty table and no pin (other tests' choices are not replayed)."""
    for name in ("SPAFL_CPU_PATH", "SPAFL_CPU_TIMED_CHOICE", "SPAFL_CPU_CONV_DW"):
        monkeypatch.delenv(name, raising=False)
    paths.clear_table()
    yield
    paths.clear_table()


def _linear(ste, x, weight, threshold, bias=None, backend="cpp"):
    return sk.sparse_linear(x, weight, bias, threshold, ste=ste, backend=backend)


def _conv(ste, geometry, x, weight, threshold, bias=None, backend="cpp"):
    return sk.sparse_conv2d(x, weight, bias, threshold, **geometry, ste=ste, backend=backend)


# ------------------------------------------------------------------------------ both paths exact


@pytest.mark.parametrize("path", ["skip", "dense"])
@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape, bias", [((7, 13, 11), True), ((5, 40, 9), False), ((80, 10, 17), True)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_linear_paths_match_reference(monkeypatch, path, ste, density, shape, bias, layout):
    """Both paths, pinned, on odd shapes (a batch larger than the fan-in too: masked dense then masks the
    weight, not dL/dy), with and without bias, x contiguous or a transposed view."""
    require_backend("cpp", "linear")
    monkeypatch.setenv("SPAFL_CPU_PATH", path)
    batch, fan_in, rows = shape
    weight, b, threshold = make_params((rows, fan_in), rows_for_density(rows, density), bias, seed=batch)
    x = torch.randn(batch, fan_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if layout == "transposed":
        x = x.t().contiguous().t()
    tensors = {"x": x, "weight": weight, "threshold": threshold, "bias": b}
    assert_matches_oracle(functools.partial(_linear, ste), functools.partial(_linear, ste, backend="reference"),
                          tensors)
    assert paths.export_table() == []  # pinned: nothing timed, nothing recorded


_GEOMETRIES = [
    ((2, 6, 9, 11), (5, 6, 3, 2), {}),
    ((2, 6, 9, 11), (7, 6, 3, 3), {"stride": 2, "padding": 1}),
    ((2, 6, 8, 8), (9, 2, 3, 3), {"padding": "same", "groups": 3}),
    ((3, 1, 12, 11), (20, 1, 5, 5), {}),  # one input channel (LeNet-5's conv1): the dW choice inside
]


@pytest.mark.parametrize("path", ["skip", "dense"])
@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", range(len(_GEOMETRIES)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv2d_paths_match_reference(monkeypatch, path, ste, density, case, layout):
    x_shape, w_shape, geometry = _GEOMETRIES[case]
    require_backend("cpp", "conv2d", groups=geometry.get("groups", 1))
    monkeypatch.setenv("SPAFL_CPU_PATH", path)
    weight, b, threshold = make_params(w_shape, rows_for_density(w_shape[0], density), case % 2 == 0, seed=case)
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = {"x": x, "weight": weight, "threshold": threshold, "bias": b}
    assert_matches_oracle(functools.partial(_conv, ste, geometry),
                          functools.partial(_conv, ste, geometry, backend="reference"), tensors)


@pytest.mark.parametrize("path", ["skip", "dense"])
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("need_dx, need_params", [(True, False), (False, True)])
def test_partial_gradients_on_both_paths(monkeypatch, path, op, need_dx, need_params):
    """Only the gradients asked for come back (the rest empty), and they are the other path's."""
    require_backend("cpp", op)
    results = {}
    for pin in ("skip", "dense"):
        monkeypatch.setenv("SPAFL_CPU_PATH", pin)
        if op == "linear":
            weight, bias, threshold = (t.float() for t in make_params((9, 5), 4, True, seed=1))
            x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
            y, score = torch.ops.spafl.native_linear_fwd(x, weight, bias, threshold)
            grads = torch.ops.spafl.native_linear_bwd(torch.ones_like(y), x, weight, bias, score, 2, need_dx,
                                                      need_params)
        else:
            weight, bias, threshold = (t.float() for t in make_params((6, 3, 3, 3), 2, True, seed=1))
            x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
            geometry = [1, 1, 1, 1, 1, 1, 1]
            y, score = torch.ops.spafl.native_conv2d_fwd(x, weight, bias, threshold, geometry)
            grads = torch.ops.spafl.native_conv2d_bwd(torch.ones_like(y), x, weight, bias, score, geometry, 2,
                                                      need_dx, need_params)
        assert [t.numel() > 0 for t in grads] == [need_dx, need_params, need_params, need_params]
        results[pin] = (y, *grads)
    for a, b in zip(results["skip"], results["dense"]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ timed choice, table


def _linear_step(x, weight, bias, threshold, ste="identity"):
    leaves = [t.detach().clone().requires_grad_() for t in (weight, bias, threshold)]
    y = sk.sparse_linear(x, *leaves[:2], leaves[2], ste=ste, backend="cpp")
    y.sin().sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


def _linear_sample():
    weight, bias, threshold = (t.float() for t in make_params((24, 40), 10, True, seed=5))
    return torch.randn(16, 40, generator=torch.Generator().manual_seed(3)), weight, bias, threshold


@pytest.mark.parametrize("forced, expected", [("first", "skip"), ("second", "dense")])
def test_first_sight_records_forward_and_backward(monkeypatch, forced, expected):
    """A signature's first call times both paths and records the outcome (here forced) for the forward and
    the backward; a later call of the signature replays it, whatever the timing would say now."""
    require_backend("cpp", "linear")
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", forced)
    sample = _linear_sample()
    first = _linear_step(*sample)
    table = paths.export_table()
    assert sorted(e["kind"] for e in table) == ["linear_bwd", "linear_fwd"]
    assert {e["choice"] for e in table} == {expected}
    fwd = next(e for e in table if e["kind"] == "linear_fwd")
    threads = torch.get_num_threads()
    assert paths.describe(fwd) == f"linear_fwd float32 threads={threads} M_bucket=16 K=40 N=24 bias=1 active=7/16 " \
                                  f"-> {expected}"
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "second" if forced == "first" else "first")
    again = _linear_step(*sample)
    assert paths.export_table() == table
    monkeypatch.setenv("SPAFL_CPU_PATH", expected)  # the pinned path gives the same bits
    pinned = _linear_step(*sample)
    for a, b, c in zip(first, again, pinned):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_other_active_counts_are_other_signatures(monkeypatch):
    require_backend("cpp", "linear")
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "first")
    x, weight, bias, threshold = _linear_sample()
    _linear_step(x, weight, bias, threshold)
    _linear_step(x, weight, bias, threshold - 10.0)  # every row active
    active = sorted(paths.describe(e).split("active=")[1].split()[0] for e in paths.export_table()
                    if e["kind"] == "linear_fwd")
    assert active == ["7/16", "all"]


def test_import_replaces_only_when_asked(monkeypatch):
    require_backend("cpp", "linear")
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "first")
    _linear_step(*_linear_sample())
    skip_table = paths.export_table()
    dense_table = [dict(e, choice="dense") for e in skip_table]
    paths.import_table(dense_table)
    assert paths.export_table() == skip_table  # kept ones win
    paths.import_table(dense_table, replace=True)
    assert paths.export_table() == dense_table
    with pytest.raises(ValueError, match="not a path choice"):
        paths.import_table([dict(skip_table[0], choice="fast")])
    with pytest.raises(ValueError, match="list of ints"):
        paths.import_table([dict(skip_table[0], key=[1.5])])


def test_one_channel_weight_gradient_choice_is_recorded(monkeypatch):
    """The oneDNN / im2col choice of a one-channel convolution's dW lives in the same table."""
    require_backend("cpp", "conv2d")
    monkeypatch.setenv("SPAFL_CPU_PATH", "dense")
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "second")
    weight, bias, threshold = make_params((20, 1, 5, 5), 19, True, seed=3)
    x = torch.randn(5, 1, 12, 12, dtype=torch.float64)
    w = weight.clone().requires_grad_()
    sk.sparse_conv2d(x, w, bias, threshold, backend="cpp").sum().backward()
    table = paths.export_table()
    assert [(e["kind"], e["choice"]) for e in table] == [("conv2d_dw", "im2col")]
    assert paths.describe(table[0]).startswith("conv2d_dw float64")


def test_bad_setting_is_a_clear_error(monkeypatch):
    require_backend("cpp", "linear")
    monkeypatch.setenv("SPAFL_CPU_PATH", "fastest")
    with pytest.raises(RuntimeError, match="SPAFL_CPU_PATH='fastest' is not a setting: use skip, dense or auto"):
        _linear_step(*_linear_sample())


# ------------------------------------------------------------------------------ per-machine cache


def test_cache_saves_merges_and_replays(monkeypatch, tmp_path):
    require_backend("cpp", "linear")
    cache = tmp_path / "paths.json"
    monkeypatch.setenv("SPAFL_PATH_CACHE", str(cache))
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "second")
    sample = _linear_sample()
    first = _linear_step(*sample)
    assert paths.save_cache() == str(cache)
    saved = json.loads(cache.read_text())
    assert saved["machine"] == paths.machine() and saved["choices"] == paths.export_table()
    # A new process: empty table, the clock would now choose otherwise; the cache replays the choices.
    paths.clear_table()
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "first")
    assert paths.load_cache() == 2
    again = _linear_step(*sample)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert paths.save_cache() is None  # nothing new
    # Another process saved a choice for a signature this one timed otherwise: the file's entry stays.
    _linear_step(sample[0][:8], *sample[1:])
    mine = paths.export_table()
    theirs = [dict(e, choice="dense") for e in mine if e not in saved["choices"]]
    cache.write_text(json.dumps({"machine": paths.machine(), "choices": saved["choices"] + theirs}))
    assert paths.save_cache() is None
    assert json.loads(cache.read_text())["choices"] == saved["choices"] + theirs
    # Another machine's (or version's) file is not replayed.
    cache.write_text(json.dumps({"machine": dict(paths.machine(), torch="0.0"), "choices": theirs}))
    paths.clear_table()
    assert paths.load_cache() == 0 and paths.export_table() == []
    monkeypatch.setenv("SPAFL_PATH_CACHE", "off")
    assert paths.cache_file() is None and paths.save_cache() is None


def test_an_unwritable_cache_is_skipped(monkeypatch, tmp_path):
    """Saving at exit must never fail a run: a cache path that cannot be written is left alone."""
    require_backend("cpp", "linear")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPAFL_PATH_CACHE", str(blocker / "paths.json"))
    monkeypatch.setenv("SPAFL_CPU_TIMED_CHOICE", "first")
    _linear_step(*_linear_sample())
    assert paths.save_cache() is None
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
