"""A client's state on its node's disk, so that a resumed run continues from it.

A SpaFL or Local client's weights are personal: they never leave the node, so the server's checkpoint cannot
hold them. With a state folder, the node writes its client's ``state()`` and how many broadcasts it has
received into ``<state folder>/client-<partition-id>/`` (a ``spafl_fl.checkpoint`` checkpoint: safetensors +
JSON, atomic) after every train and evaluate. A resumed run marks its messages with the round it resumes
after (``ConfigRecord`` ``DEPLOY``, ``resume-round``); a node that holds no state in memory then loads it
from there, and refuses (clear error) when the saved state belongs to other settings or another round.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message

from ..algorithms import algorithm
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import RunConfig
from .messages import from_array_record, to_array_record

DEPLOY = "deploy"
"""``ConfigRecord`` a resumed run adds to its messages: ``resume-round`` (rounds done before)."""
STATE = "client-state"
"""``Context.state`` entry: the client's ``state()`` (``ArrayRecord``)."""
COUNTERS = "client-counters"
"""``Context.state`` entry: ``received``, the broadcasts the client has received (``ConfigRecord``)."""


def state_folder(folder: str, context: Context) -> str:
    return os.path.join(folder, f"client-{int(context.node_config['partition-id'])}")


def resume_round(message: Message) -> int:
    """The round a resumed run continues after (0: a fresh run)."""
    record = message.content.config_records.get(DEPLOY)
    return int(record["resume-round"]) if record is not None and "resume-round" in record else 0


def save_state(folder: str, config: RunConfig, context: Context) -> None:
    received = int(context.state[COUNTERS]["received"])
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(folder, received, from_array_record(context.state[STATE]),
                    {"config": config.to_dict(), "received": received})


def load_state(folder: str, config: RunConfig, rounds_done: int, context: Context) -> None:
    """Put the client state saved in ``folder`` into ``context.state``; it must be ``config``'s (rounds
    aside) after ``rounds_done`` broadcasts."""
    found = load_checkpoint(folder) if os.path.isdir(folder) else None
    if found is None:
        raise RuntimeError(f"resume after round {rounds_done}: this node holds no client state in {folder}")
    _, tensors, meta = found
    saved, mine = dict(meta["config"]), config.to_dict()
    differ = sorted(k for k in mine if k != "rounds" and saved.get(k) != mine[k])
    if differ:
        raise RuntimeError(f"resume: the client state in {folder} was made with other settings: {differ}")
    # A broadcast reaches every client every round: the count must match. Otherwise a client holds the global
    # tensors it last trained on (in its state) and catches up when next sampled.
    if algorithm(config.algorithm).counts_evaluate_payload(config) and int(meta["received"]) != rounds_done:
        raise RuntimeError(f"resume after round {rounds_done}: the client state in {folder} holds "
                           f"{meta['received']} broadcasts")
    context.state[STATE] = to_array_record(tensors)
    context.state[COUNTERS] = ConfigRecord({"received": int(meta["received"])})


def persisted(handler: Callable[[Message, Context], Message], config: RunConfig, folder: str, message: Message,
              context: Context) -> Message:
    """``handler(message, context)`` with the client state loaded from the node's state folder first (when a
    resumed run asks and the node holds none in memory) and saved there after train and evaluate."""
    folder = state_folder(folder, context)
    done = resume_round(message)
    needs_state = algorithm(config.algorithm).personal
    if done > 0 and needs_state and STATE not in context.state.array_records:
        load_state(folder, config, done, context)
    reply = handler(message, context)
    if needs_state and not reply.has_error() and STATE in context.state.array_records:
        save_state(folder, config, context)
    return reply
