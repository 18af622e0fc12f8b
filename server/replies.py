"""The first steps of every server round: classify each reply, then validate it.

    classify   failed (an error, or no reply within round-timeout), declined (a well-formed
               budget decline), or accepted for now
    validate   an accepted reply that fails its check (server/validation.py) becomes rejected,
               with the reason; nothing rejected touches the global adapter, prior or metrics

Every reply is named by the ledger's pseudonym for its client (``Names``), so the record step
(server/records.py) and the ledger never see a client's own id or Flower node id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID

from server.ledger import pseudonym
from server.validation import check_fields

log = logging.getLogger("fedrec.server")


@dataclass
class Reply:
    node: int  # the Flower node id the reply is about
    name: str  # the ledger's pseudonym for that client
    status: str  # "failed", "declined", "rejected" or "accepted"
    reason: str | None
    msg: Message | None  # None: no reply arrived

    @property
    def metrics(self) -> MetricRecord:
        if self.msg is None or self.msg.has_error():
            return MetricRecord()
        return self.msg.content.metric_records.get("metrics", MetricRecord())


class Names:
    """The ledger's pseudonym for each client, for one run.

    Clients send their own random ``client-id``, which outlives a server restart (Flower's node
    ids in a simulation do not); a client that never sent one is named by its node id.
    """

    def __init__(self, key: str):
        self.key = key
        self.of_node: dict[int, str] = {}

    def name(self, node: int, msg: Message | None) -> str:
        if msg is not None and not msg.has_error() and "metrics" in msg.content:
            client = msg.content["metrics"].get("client-id")
            if isinstance(client, int) and not isinstance(client, bool):
                self.of_node[node] = pseudonym(self.key, client)
        return self.of_node.get(node) or pseudonym(self.key, f"flower-node-{node}")


def classify(replies: Iterable[Message], names: Names, sent: list[Message] = (),
             timeout: float | None = None) -> list[Reply]:
    """One ``Reply`` per reply, and a failed one per node in ``sent`` that never answered."""
    classified = []
    for msg in replies:
        node = replier(msg, sent)
        name = names.name(node, msg)
        if msg.has_error():  # crashed, or dropped out of SecAgg+
            classified.append(Reply(node, name, "failed", short_reason(msg.error.reason), msg))
        elif is_decline(msg):
            classified.append(Reply(node, name, "declined", str(msg.content["decline"]["reason"]), msg))
        else:
            classified.append(Reply(node, name, "accepted", None, msg))
    answered = {r.node for r in classified}
    for node in sorted({m.metadata.dst_node_id for m in sent} - answered):
        reason = f"no reply within round-timeout = {timeout:g} s"
        classified.append(Reply(node, names.name(node, None), "failed", reason, None))
    return classified


def validate(replies: list[Reply], check: Callable[[Message], str | None], what: str) -> None:
    """Reject each accepted reply ``check`` finds a reason against."""
    for r in replies:
        if r.status == "accepted" and (reason := check(r.msg)):
            log.warning("dropped the %s of node %s: %s", what, r.node, reason)
            r.status, r.reason = "rejected", reason


def accepted(replies: list[Reply]) -> list[Reply]:
    return [r for r in replies if r.status == "accepted"]


def replier(reply: Message, sent: list[Message]) -> int:
    """The node a reply is about. An error the SuperLink writes itself (e.g. "Node Unavailable")
    comes from the SuperLink's own node id; the instruction it answers names the node."""
    if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
        return reply.metadata.src_node_id
    for instruction in sent:
        if instruction.metadata.message_id and instruction.metadata.message_id == reply.metadata.reply_to_message_id:
            return instruction.metadata.dst_node_id
    return reply.metadata.src_node_id


def is_decline(msg: Message) -> bool:
    """A well-formed decline (common/releases.py); a malformed one is checked, and dropped, as a reply."""
    return not msg.has_error() and "decline" in msg.content and check_fields("decline", msg.content) is None


def short_reason(reason: str) -> str:
    """A client error in one line: Flower wraps the exception's message in a traceback, or (a
    deployed ClientApp) in ``<class '…'>:<'message'>``."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "(no reason given)"
    last = re.sub(r"^<class '[^']*'>:<'", "", last.split("Message: ", 1)[-1])
    return last.removesuffix("'>").strip()
