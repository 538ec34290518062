"""A SpaFL client's state on its node's disk, so that a resumed deployment continues from it.

A SpaFL client's weights are personal: they never leave the node, so the server's checkpoint cannot
hold them. With node config ``state-dir``, the node writes its client's model, the last global
thresholds it received and how many broadcasts that was into ``<state-dir>/client-<partition-id>/``
(a ``spafl_fl.checkpoint`` checkpoint: safetensors + JSON, atomic) after every train and evaluate.
A resumed run marks its messages with the round it resumes after (``ConfigRecord`` ``DEPLOY``,
``resume-round``); a node that holds no state in memory then loads it from there, and refuses
(clear error) when the saved state belongs to other settings or another round.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import RunConfig
from ..flower import from_array_record, to_array_record

DEPLOY = "deploy"
"""``ConfigRecord`` a resumed run adds to its messages: ``resume-round`` (rounds done before)."""

_PARTS = ("model", "global")


def state_folder(context: Context) -> str:
    return os.path.join(str(context.node_config["state-dir"]), f"client-{int(context.node_config['partition-id'])}")


def resume_round(message: Message) -> int:
    """The round a resumed run continues after (0: a fresh run)."""
    record = message.content.config_records.get(DEPLOY)
    return int(record["resume-round"]) if record is not None and "resume-round" in record else 0


def save_state(folder: str, config: RunConfig, context: Context) -> None:
    tensors = {f"{part}.{name}": t for part in _PARTS for name, t in from_array_record(context.state[part]).items()}
    received = int(context.state["client"]["received"])
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(folder, received, tensors, {"config": config.to_dict(), "received": received})


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
    # Eager: a client receives every round's broadcast. Lazy: it holds the global thresholds it last
    # trained on (saved beside its model) and catches up when next sampled, so no count to check.
    if config.global_update == "eager" and int(meta["received"]) != rounds_done:
        raise RuntimeError(f"resume after round {rounds_done}: the client state in {folder} holds "
                           f"{meta['received']} broadcasts")
    for part in _PARTS:
        prefix = f"{part}."
        context.state[part] = to_array_record({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    context.state["client"] = ConfigRecord({"received": int(meta["received"])})


def persisted(handler: ClientApp, config: RunConfig, message: Message, context: Context) -> Message:
    """``handler(message, context)`` with the client state loaded from the node's ``state-dir`` first (when
    a resumed run asks and the node holds none in memory) and saved there after train and evaluate."""
    folder = state_folder(context)
    done = resume_round(message)
    if done > 0 and "model" not in context.state:
        load_state(folder, config, done, context)
    reply = handler(message, context)
    if not reply.has_error() and message.metadata.message_type in ("train", "evaluate") and "model" in context.state:
        save_state(folder, config, context)
    return reply
