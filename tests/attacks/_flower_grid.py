"""A stand-in Flower Grid that delivers each pushed message to a node's handler at once, so the ServerApp and
ClientApp logic run in one process (``tests/test_flower_protocol.py`` and the attack tests over Flower)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

#: A node: its reply to a message, or None for a node that never replies.
Handler = Callable[[Message], Message | None]


class StandInGrid(Grid):
    """Delivers each pushed message to a node's handler at once; ``None`` from a handler means no reply ever."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[int, str]] = []
        self._ids = itertools.count()

    def set_run(self, run: object) -> None:  # type: ignore[override]
        pass

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self.sent.append((msg.metadata.dst_node_id, msg.metadata.message_type))
            if (answer := self.handlers[msg.metadata.dst_node_id](msg)) is not None:
                self.replies[msg_id] = answer
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def node(
    pid: int,
    overrides: Mapping[str, Any],
    replies: list[Message] | None = None,
    num_partitions: int = 4,
    node_config: Mapping[str, Any] | None = None,
) -> Handler:
    """A node's handler: the ClientApp's query and train for partition ``pid`` with the run-config ``overrides``
    (and extra ``node_config`` entries); its train replies are appended to ``replies`` when given."""
    from flwr.app import Context, RecordDict

    from spmc.flower import client_app

    config = {"partition-id": pid, "num-partitions": num_partitions, **(node_config or {})}

    def handle(msg: Message) -> Message:
        ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config=config, state=RecordDict(), run_config={})
        if msg.metadata.message_type == "query":
            return client_app.query(msg, ctx)
        answer = client_app.train(msg, ctx, dict(overrides))
        if replies is not None:
            replies.append(answer)
        return answer

    return handle
