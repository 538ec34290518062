"""Every field a client controls in a Flower reply: a malformed or out-of-range one is rejected and logged,
the round completes, and nothing it holds reaches the global model or the records (docs/DESIGN.md §8).
Driven in process through the fake Grid of test_fl_flower, and fuzzed with hypothesis."""

import math

import pytest

pytest.importorskip("flwr")
hypothesis = pytest.importorskip("hypothesis")

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from helpers_fl import tiny_config  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fl_flower import app_grid, server_identity  # noqa: E402, F401

from spafl_fl.flower_app.client import app as client_app  # noqa: E402
from spafl_fl.flower_app.messages import to_array_record  # noqa: E402
from spafl_fl.flower_app.strategy import RunStrategy, drive  # noqa: E402
from spafl_kernels.flops import FLOP_FIELDS  # noqa: E402

CONFIG = tiny_config(rounds=1, measure_baseline=False)


def _set_array(field, value):
    def change(content):
        record = content["update"]
        name = next(iter(record))
        array = record[name]
        values = {"dtype": array.dtype, "shape": array.shape, "stype": array.stype, "data": array.data,
                  **{field: value(array) if callable(value) else value}}
        record[name] = Array(**values)
    return change


def _set_metric(key, value):
    def change(content):
        metrics = dict(content["metrics"])
        if value is _DELETE:
            del metrics[key]
        else:
            metrics[key] = value
        content["metrics"] = MetricRecord(metrics)
    return change


_DELETE = object()


def _failure(reason):
    def change(content):
        content["failure"] = ConfigRecord({"reason": reason})
    return change


def _drop(name):
    def change(content):
        del content[name]
    return change


TRAIN = {
    "dtype bogus": _set_array("dtype", "bogus"),
    "dtype object": _set_array("dtype", "object"),
    "shape disagrees with the data": _set_array("shape", lambda a: (a.shape[0] + 1,)),
    "truncated data": _set_array("data", lambda a: a.data[:-1]),
    "non-raw encoding": _set_array("stype", "numpy.ndarray"),
    "num-examples a list": _set_metric("num-examples", [3, 4]),
    "num-examples missing": _set_metric("num-examples", _DELETE),
    "num-examples 0": _set_metric("num-examples", 0),
    "num-examples negative": _set_metric("num-examples", -5),
    "FLOPs -1e30": _set_metric(f"flops.{FLOP_FIELDS[0]}", -1e30),
    "train-seconds NaN": _set_metric("train-seconds", float("nan")),
    "no metrics": _drop("metrics"),
    "failure reason not a string": _failure(5),
    "failure reason empty": _failure(""),
}

EVALUATE = {
    "no metrics": _drop("metrics"),
    "no accuracy": _set_metric("accuracy", _DELETE),
    "accuracy NaN": _set_metric("accuracy", float("nan")),
    "accuracy a list": _set_metric("accuracy", [50.0]),
    "loss inf": _set_metric("loss", float("inf")),
    "extra density key": _set_metric("density.bogus", 0.5),
    "density above 1": _set_metric("density.total", 2.0),
}


def _run(changes: dict, victim_of):
    """One round of SpaFL through the fake Grid; ``changes[phase](content)`` alters the victim's reply."""
    app = client_app
    strategy = RunStrategy(CONFIG)
    victim = victim_of(strategy)

    def tampering(message, context):
        reply = app(message, context)
        change = changes.get(message.metadata.message_type)
        if change is not None and context.node_config["partition-id"] == victim:
            change(reply.content)
        return reply

    drive(strategy, app_grid(CONFIG, app=tampering), timeout=30)
    assert len(strategy.records) == 1  # the round completed
    assert all(bool(torch.isfinite(t).all()) for t in strategy.server.tensors.values())
    record = strategy.records[0]
    for key in ("accuracy", "train_flops", "dense_train_flops", "paper_train_flops", "train_seconds",
                "authors_train_flops"):
        assert math.isfinite(record[key]) and record[key] >= 0, key
    return strategy, victim, record


@pytest.mark.parametrize("case", TRAIN)
def test_a_malformed_train_reply_is_rejected_and_the_round_completes(server_identity, case):  # noqa: F811
    strategy, victim, record = _run({"train": TRAIN[case]}, lambda s: min(s.server.sample_clients(0)))
    assert [r["client"] for r in record["rejected"]] == [victim]
    assert strategy.server.tensors != {}


@pytest.mark.parametrize("case", EVALUATE)
def test_a_malformed_evaluate_reply_is_left_out_of_the_average(server_identity, case):  # noqa: F811
    strategy, victim, record = _run({"evaluate": EVALUATE[case]}, lambda s: 0)
    assert [r["client"] for r in record["rejected_evaluations"]] == [victim]
    assert record["rejected"] == []


# -- fuzzing -----------------------------------------------------------------------------------------

NUMBERS = st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(),
                    st.lists(st.integers(min_value=-2**63, max_value=2**63 - 1), max_size=3),
                    st.lists(st.floats(), max_size=3))
ARRAYS = st.builds(lambda dtype, shape, stype, data: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data),
                   st.sampled_from(["float32", "float64", "int64", "bogus", "object", "<f4", "", "bool"]),
                   st.lists(st.integers(min_value=-2, max_value=6), max_size=3),
                   st.sampled_from(["raw", "numpy.ndarray", ""]), st.binary(max_size=64))
TRAIN_KEYS = ["num-examples", "train-loss", "train-seconds", "baseline-seconds", "authors-flops",
              *(f"flops.{name}" for name in FLOP_FIELDS)]


def _instruction(kind: str) -> Message:
    return Message(RecordDict(), dst_node_id=5, message_type=kind)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metrics=st.dictionaries(st.sampled_from(TRAIN_KEYS + ["other"]), NUMBERS),
       arrays=st.dictionaries(st.sampled_from(["fc1.threshold", "x"]), ARRAYS, max_size=2),
       reason=st.one_of(st.none(), st.text(max_size=5), st.integers(), st.floats()))
def test_train_replies_decode_or_are_refused(server_identity, metrics, arrays, reason):  # noqa: F811
    from spafl_fl.flower_app.messages import ReplyError, decode_train_reply

    content = RecordDict({"metrics": MetricRecord(metrics), "update": ArrayRecord(arrays)})
    if reason is not None:
        content["failure"] = ConfigRecord({"reason": reason})
    try:
        update = decode_train_reply(Message(content, reply_to=_instruction("train")), 3)
    except ReplyError:
        return
    assert isinstance(update.num_samples, int) and update.num_samples >= 1
    assert math.isfinite(update.train_seconds) and update.train_seconds >= 0
    assert math.isfinite(update.authors_flops) and update.authors_flops >= 0
    assert all(math.isfinite(getattr(update.flops, name)) and getattr(update.flops, name) >= 0
               for name in FLOP_FIELDS)
    assert update.baseline_seconds is None or (math.isfinite(update.baseline_seconds) and update.baseline_seconds >= 0)
    assert (update.failure is not None) == (reason is not None)
    assert all(isinstance(t, torch.Tensor) for t in update.tensors.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metrics=st.dictionaries(st.sampled_from(["accuracy", "loss", "density.total", "density.fc1", "density.x",
                                                "num-examples"]), NUMBERS))
def test_evaluate_replies_decode_or_are_refused(server_identity, metrics):  # noqa: F811
    from spafl_fl.flower_app.messages import ReplyError, decode_evaluate_reply

    reply = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=_instruction("evaluate"))
    try:
        accuracy, loss, dens = decode_evaluate_reply(reply, ("fc1", "total"))
    except ReplyError:
        return
    assert 0 <= accuracy <= 100 and math.isfinite(loss) and loss >= 0
    assert set(dens) == {"fc1", "total"} and all(0 <= v <= 1 for v in dens.values())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(TRAIN_KEYS), value=NUMBERS, phase=st.sampled_from(["train", "evaluate"]),
       eval_key=st.sampled_from(["accuracy", "loss", "density.total"]))
def test_fuzzed_replies_never_stop_a_round(server_identity, key, value, phase, eval_key):  # noqa: F811
    change = _set_metric(key, value) if phase == "train" else _set_metric(eval_key, value)
    _run({phase: change}, lambda s: min(s.server.sample_clients(0)))


def test_to_array_record_round_trips_every_accepted_dtype():
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4), "c": torch.tensor([True, False]),
               "d": torch.randn(2, dtype=torch.float64), "e": torch.zeros(0, 5)}
    from spafl_fl.flower_app.messages import from_array_record

    back = from_array_record(to_array_record(tensors))
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
