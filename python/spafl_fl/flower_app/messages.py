"""What the Flower app's messages carry, and checking what comes back.

Arrays travel as raw little-endian bytes (``stype`` "raw") rather than Flower's default ``.npy``
serialisation, so the bytes a message carries per array are exactly ``numel * itemsize``: the bits on
the wire reported are the lengths of the ``Array.data`` Flower sent. Every reply is decoded inside its
own check: anything malformed raises ``ReplyError`` saying why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from spafl_kernels.flops import FLOP_FIELDS, LayerFlops

from ..client import ClientUpdate

RAW = "raw"
"""``Array.stype`` of a C-contiguous little-endian buffer: ``data`` holds the elements and nothing else."""

METRICS = "metrics"
CONFIG = "config"
FAILURE = "failure"  # a train reply's ConfigRecord {"reason": ...} when local training diverged
UPDATE = "update"
"""A train reply's ``ArrayRecord``: the client's update (SpaFL: thresholds; FedAvg: the full state)."""
GLOBAL = "global"
"""An instruction's ``ArrayRecord``: what goes down from the server (``Algorithm.train_payload`` /
``evaluate_payload``)."""
KERNEL_PATHS = "kernel-paths"
"""A ``ConfigRecord`` key (JSON text): the run's timed kernel path choices (``spafl_kernels.paths``)."""


# -- tensors <-> records ---------------------------------------------------------------------------

def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ``ArrayRecord`` of raw little-endian buffers (no header, no pickle)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        array = tensor.detach().cpu().numpy()
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        record[name] = Array(dtype=array.dtype.name, shape=tuple(array.shape), stype=RAW, data=array.tobytes())
    return record


class ReplyError(ValueError):
    """A message whose content cannot be used (a malformed array or metric); the text says which and why."""


ARRAY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
"""The element types an ``Array`` may declare (what models and their buffers hold)."""


def _decode_array(name: str, array) -> torch.Tensor:
    if not isinstance(array, Array):
        raise ReplyError(f"array {name!r} is a {type(array).__name__}, not an Array")
    if array.stype != RAW:
        raise ReplyError(f"array {name!r} is encoded as {array.stype!r}; only {RAW!r} buffers are read")
    if not isinstance(array.dtype, str) or array.dtype not in ARRAY_DTYPES:
        raise ReplyError(f"array {name!r} has dtype {array.dtype!r}; expected one of {', '.join(ARRAY_DTYPES)}")
    shape = array.shape
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape):
        raise ReplyError(f"array {name!r} has shape {shape!r}; expected non-negative integers")
    dtype = np.dtype(array.dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not isinstance(array.data, bytes) or len(array.data) != expected:
        got = len(array.data) if isinstance(array.data, bytes) else type(array.data).__name__
        raise ReplyError(f"array {name!r} holds {got} bytes; shape {tuple(shape)} of {array.dtype} needs {expected}")
    values = np.frombuffer(array.data, dtype=dtype).reshape(tuple(shape))
    return torch.from_numpy(values.astype(values.dtype.newbyteorder("="), copy=True))


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of ``to_array_record``; ``ReplyError`` (naming the array) for anything else: another
    encoding, an unknown dtype, a shape that disagrees with the data."""
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"expected an ArrayRecord, got a {type(record).__name__}")
    return {name: _decode_array(name, array) for name, array in record.items()}


def _metric(metrics: MetricRecord, key: str, *, low: float | None = 0.0, high: float | None = None,
            default=None, finite: bool = True, integer: bool = False):
    """``metrics[key]`` checked: a number (an int with ``integer``), finite unless ``finite`` is False, in
    ``[low, high]``; ``default`` when absent (``ReplyError`` when absent and ``default`` is None)."""
    if key not in metrics:
        if default is None:
            raise ReplyError(f"metric {key!r} is missing")
        return default
    value = metrics[key]
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ReplyError(f"metric {key!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (finite and not math.isfinite(value)) or (low is not None and not value >= low) or (
            high is not None and not value <= high):
        bounds = f" in [{low}, {high if high is not None else 'inf'})" if low is not None else ""
        raise ReplyError(f"metric {key!r} must be a{' finite' if finite else ''} number{bounds}, got {value!r}")
    return value


def decode_train_reply(reply: Message, client: int) -> ClientUpdate:
    """The ``ClientUpdate`` a train reply carries, every field a client controls checked; ``ReplyError``
    saying why when it is malformed. A reply with a failure record is a failed update whatever its reason."""
    content = reply.content
    metrics = content.metric_records.get(METRICS)
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r}")
    failure = None
    if FAILURE in content:
        reason = content.config_records.get(FAILURE, ConfigRecord()).get("reason")
        failure = reason.strip() if isinstance(reason, str) and reason.strip() else (
            f"the client reported a failure without a readable reason ({reason!r})")
    tensors = from_array_record(content.array_records.get(UPDATE, ArrayRecord()))
    flops = LayerFlops(**{name: _metric(metrics, f"flops.{name}", default=0) for name in FLOP_FIELDS})
    baseline = _metric(metrics, "baseline-seconds") if "baseline-seconds" in metrics else None
    return ClientUpdate(
        client, tensors, _metric(metrics, "num-examples", low=1, integer=True),
        float(_metric(metrics, "train-loss", low=None, finite=False)), float(_metric(metrics, "train-seconds")),
        None if baseline is None else float(baseline), flops, failure=failure,
        authors_flops=float(_metric(metrics, "authors-flops", default=0.0)))


def decode_evaluate_reply(reply: Message, density_keys: tuple[str, ...]) -> tuple[float, float, dict[str, float]]:
    """``(accuracy %, loss, density per layer)`` of an evaluate reply, checked: accuracy in [0, 100], a
    finite loss >= 0, and ``density.<name>`` in [0, 1] for exactly the names ``density_keys`` (none for
    a dense model); ``ReplyError`` saying why otherwise."""
    metrics = reply.content.metric_records.get(METRICS)
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r}")
    accuracy = float(_metric(metrics, "accuracy", high=100.0))
    loss = float(_metric(metrics, "loss"))
    sent = {key[len("density."):] for key in metrics if key.startswith("density.")}
    if sent != set(density_keys):
        raise ReplyError(f"density keys {sorted(sent)}, expected {sorted(density_keys)}")
    dens = {name: float(_metric(metrics, f"density.{name}", high=1.0)) for name in density_keys}
    return accuracy, loss, dens


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record carries (``sum len(Array.data)``; names and shapes not counted)."""
    return sum(len(array.data) for array in record.values())
