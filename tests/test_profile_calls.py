"""benchmarks/profile_calls.py: every stage of a call is timed and the step profile names our ops."""

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_calls.py")


@pytest.fixture(scope="module")
def profile_calls():
    spec = importlib.util.spec_from_file_location("profile_calls", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layer", ["lenet5-fc1-b32", "lenet5-conv1-b32"])
def test_every_stage_runs_and_matches_the_dense_op(profile_calls, layer):
    import torch

    profile_calls.layers.LAYERS.update(profile_calls.AUTHORS)
    stages = profile_calls.layer_stages(layer, 1.0)
    assert set(stages) == set(profile_calls.STAGES)
    with torch.no_grad():
        dense = stages["dense op"]()
        for name in ("native fwd op", "functional"):  # density 1: the dense op's numbers
            out = stages[name]()
            y = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(y, dense)
        assert stages["score pass"]()[0].abs().sum() == 0  # every row pruned
        torch.testing.assert_close(stages["module"](), stages["dense module"]())


def test_markdown_has_a_row_per_layer_and_the_step_table(profile_calls, tmp_path):
    out = tmp_path / "p.md"
    profile_calls.main(["--layers", "authors-fc4", "--reps", "2", "--step", "mlp:0.5", "--markdown", str(out)])
    text = out.read_text()
    assert "| authors-fc4 | 1.00 |" in text
    assert "`mlp` at density 0.5" in text and "spafl::native_linear" in text
