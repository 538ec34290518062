"""A client Mod that measures what Flower carries and what the client computes, for any ``ClientApp``.

    from flwr.clientapp import ClientApp
    from spafl_fl.flower_app.mods import wire_mod

    app = ClientApp(mods=[wire_mod])

Every message through the mod gets, in its reply, a ``MetricRecord`` named ``WIRE`` ("wire") with:

- ``in-bytes``: the size of the message the node received, as Flower serialises it (every object of
  its tree deflated: the message and its metadata, the record dict, each record, each array and its
  chunks);
- ``out-bytes``: the same for the reply, measured before this record is added (the record itself
  adds about 100 bytes);
- ``compute-seconds`` / ``cpu-seconds``: wall-clock and process CPU time of the handler (and of the
  mods inside this one), so that the time a round spends computing on the clients can be told apart
  from the time it spends waiting for the network and for the ClientApp process to start.

A server reads them from the replies (``wire_metrics(reply)``); ``message_bytes`` measures any message,
e.g. the instructions a strategy sends.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

WIRE = "wire"


def message_bytes(message: Message) -> int:
    """Bytes Flower carries for ``message``: the deflated size of every object of its tree (each object
    travels once per message: arrays, records and the message with its metadata)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def wire_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
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
