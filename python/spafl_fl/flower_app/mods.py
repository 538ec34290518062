"""A client Mod that measures what Flower carries and what the client computes, for any ``ClientApp``.

    from flwr.clientapp import ClientApp
    from spafl_fl.flower_app.mods import wire_mod

    app = ClientApp(mods=[wire_mod])

Every message through the mod gets, in its reply, a ``MetricRecord`` named ``WIRE`` ("wire") with:

- ``in-bytes``: the size of the message the node received, as Flower's public ``count_bytes`` of each of
  its records counts it (what ``flwr.clientapp.mod.message_size_mod`` logs: the arrays' buffers, 8 bytes
  a number, a config string's length, and every key), the message's metadata left out;
- ``out-bytes``: the same for the reply, measured before this record is added;
- ``compute-seconds`` / ``cpu-seconds``: wall-clock and process CPU time of the handler (and of the
  mods inside this one), so that the time a round spends computing on the clients can be told apart
  from the time it spends waiting for the network and for the ClientApp process to start.

A server reads them from the replies (``wire_metrics(reply)``); ``message_bytes`` measures any message,
e.g. the instructions a strategy sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord

WIRE = "wire"


def message_bytes(message: Message) -> int:
    """Bytes of ``message``'s records as Flower counts them (``count_bytes`` of each record, as Flower's
    ``message_size_mod`` sums them): array buffers, numbers, strings and keys, without the metadata. An error
    reply (a node lost mid-round) carries no records: 0."""
    if message.has_error():
        return 0
    return sum(_record_bytes(record) for record in message.content.values())


def _record_bytes(record) -> int:
    """``record.count_bytes()``; Flower's count raises on an empty string, bytes or list in a ``ConfigRecord``
    (which a client may send): those count 0 bytes here, their keys as Flower counts keys."""
    try:
        return record.count_bytes()
    except (ValueError, IndexError):
        return sum(len(key) + (ConfigRecord({key: value}).count_bytes() - len(key) if len(value) else 0)
                   if isinstance(value, (str, bytes, list)) else ConfigRecord({key: value}).count_bytes()
                   for key, value in record.items())


def wire_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Measure the incoming message, run the handler, measure the reply; add the ``WIRE`` record to it."""
    received = message_bytes(message)
    wall, cpu = time.perf_counter(), time.process_time()
    reply = call_next(message, context)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not reply.has_error():
        reply.content[WIRE] = MetricRecord({"in-bytes": received, "out-bytes": message_bytes(reply),
                                            "compute-seconds": wall, "cpu-seconds": cpu})
    return reply


def wire_metrics(reply: Message) -> dict[str, float] | None:
    """The ``WIRE`` record of a reply as a dict (None when the client runs no ``wire_mod``, or failed)."""
    if reply.has_error() or WIRE not in reply.content.metric_records:
        return None
    return dict(reply.content.metric_records[WIRE])
