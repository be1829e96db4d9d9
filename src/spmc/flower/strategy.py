"""A Flower strategy (Message API) that runs any defense of spmc's registry on the replies of a round.

One round, on the same server core as the simulator (:class:`spmc.server.ServerCore`):

```
nodes  ← the connected nodes (a seeded sample of ⌈p·n⌉ when participation p < 1)
send   ← every node: the global arrays, and with the SPMC client its own teacher (its marginal-coalition model)
replies← what arrives before the round time-out; error replies and time-outs are logged and left out
check  ← each reply must hold one state of the model (names, shapes, numbers), a finite state, a positive
         ``num-examples`` and at most one reply per client id; anything else is rejected and logged
craft  ← with an update attack, the attackers' states are crafted here, where the server sees every reply; under
         ``attacker_knowledge = partial`` an attacker's reply also holds its clean model (ArrayRecord ``shadow``),
         checked like a state and passed to the crafting step only, never to the guard, defense or record
guard  ← the update guard (:meth:`ServerCore.step`), then θ_g ← defense.aggregate(states sorted by client id)
teacher_k ← α-weighted leave-one-out model of every aggregated client (uniform α over the accepted clients when
         the defense gives no weights)
```

A client's id is the ``partition-id`` it reports in its metrics (its node id when it reports none), so teachers
and stateful defenses (FoolsGold's histories) follow clients, not positions or node ids. A node never seen before
is asked for its partition id with a ``query`` message before it is sent a teacher.

:meth:`DefenseStrategy.start` runs the rounds like Flower's own ``Strategy.start`` (server-side evaluation with
``evaluate_fn``; no client-side evaluation) and, given a :class:`~spmc.store.RunStore`, appends every round's
record to ``metrics.jsonl`` and rewrites ``checkpoint.pt`` atomically in the simulator's format
(:meth:`ServerCore.checkpoint`, plus the node → client map), so that a stopped run resumes after its last completed
round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from spmc.attacks import Crafter
from spmc.config import ConfigError
from spmc.defenses import Defense
from spmc.flower.convert import MalformedUpdate, arrays_to_state, finite_number, metric_record, state_to_arrays
from spmc.guard import InvalidUpdateError, UpdateGuard
from spmc.params import ParamLayout
from spmc.server import Crafting, RoundOutcome, ServerCore, sample_participants
from spmc.store import RunDirError, RunStore, config_hash

log = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"
TEACHER_KEY = "teacher"
SHADOW_KEY = "shadow"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class ClientUpdate:
    """One accepted reply: whose it is, its flat state and what it reported."""

    node_id: int
    client_id: int
    state: torch.Tensor
    num_samples: float
    train_loss: float
    malicious: bool | None
    train_seconds: float = math.nan
    reply_seconds: float = math.nan
    shadow: torch.Tensor | None = None


def _single(records: dict[str, Any], key: str, kind: str) -> Any:
    if key in records:
        return records[key]
    if len(records) == 1:
        return next(iter(records.values()))
    raise MalformedUpdate(f"expected one {kind} (key {key!r}); got keys {sorted(records)}")


def client_id_of(metrics: MetricRecord | None, node_id: int) -> int:
    """The reported ``partition-id`` (a non-negative integer), else the node id."""
    if metrics is None or "partition-id" not in metrics:
        return node_id
    value = finite_number(metrics["partition-id"])
    if value is None or value < 0 or value != int(value):
        raise MalformedUpdate(f"partition-id {metrics['partition-id']!r} is not a non-negative integer")
    return int(value)


class DefenseStrategy(Strategy):
    """Runs ``defense`` (any spmc defense) on the replies of every round; optionally sends SPMC teachers."""

    def __init__(
        self,
        defense: Defense,
        layout: ParamLayout,
        *,
        send_teachers: bool = False,
        participation: float = 1.0,
        seed: int = 0,
        on_invalid_update: str = "drop",
        guard: UpdateGuard | None = None,
        server_data: Any = None,
        store: RunStore | None = None,
        resume: bool = True,
        config_json: str = "",
        min_nodes: int = 1,
        connect_timeout: float = 120.0,
        identify_timeout: float = 30.0,
        poll_interval: float = 0.2,
        initial_state: torch.Tensor | None = None,
        crafter: Crafting | None = None,
    ) -> None:
        if defense.needs_server_data and server_data is None:
            raise ConfigError(f"defense {defense.name!r} needs server data (spec §5); pass server_data")
        self.defense = defense
        self.layout = layout
        self.send_teachers = send_teachers
        self.participation = participation
        self.seed = seed
        self.on_invalid_update = on_invalid_update
        self.core = ServerCore(
            defense,
            layout,
            torch.zeros(layout.dim) if initial_state is None else initial_state,
            guard=UpdateGuard() if guard is None else guard,
            on_invalid_update=on_invalid_update,
            server_data=server_data,
            learns_from_teacher=lambda k: send_teachers,
            crafter=crafter,
        )
        self._has_state = initial_state is not None
        self.store = store
        self.resume = resume
        self.config_json = config_json
        self.config_hash = config_hash(json.loads(config_json)) if config_json else ""
        self.min_nodes = max(1, min_nodes)
        self.connect_timeout = connect_timeout
        self.identify_timeout = identify_timeout
        self.poll_interval = poll_interval
        self.eval_state: torch.Tensor | None = None
        self.node_clients: dict[int, int] = {}
        self.last_record: dict[str, Any] = {}
        self.round_timeout: float | None = None
        self._first_round = 1
        self._reply_node: dict[str, int] = {}
        self._reply_seconds: dict[str, float] = {}
        self._sampled: list[int] = []
        self._unanswered: list[int] = []

    @property
    def global_state(self) -> torch.Tensor | None:
        """θ_g (on the CPU), held by the server core; None before the first round or checkpoint."""
        return self.core.global_state if self._has_state else None

    @global_state.setter
    def global_state(self, state: torch.Tensor) -> None:
        self.core.global_state = state
        self._has_state = True

    @property
    def teachers(self) -> dict[int, torch.Tensor]:
        """teacher_k of every client aggregated so far, held by the server core."""
        return self.core.teachers

    # ------------------------------------------------------------------ Flower's Strategy interface

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "DefenseStrategy: defense=%s, teachers=%s, participation=%.2f, min nodes=%d, on invalid update=%s",
            self.defense.name,
            self.send_teachers,
            self.participation,
            self.min_nodes,
            self.on_invalid_update,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node: the global arrays, the config and, with SPMC, its teacher."""
        self.global_state = arrays_to_state(self.layout, arrays)
        nodes = self._sample_nodes(grid, server_round)
        self._sampled = nodes
        if self.send_teachers and self.teachers:
            self._identify(grid, [n for n in nodes if n not in self.node_clients])
        messages = []
        for node in nodes:
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: node_config})
            client = self.node_clients.get(node)
            if self.send_teachers and client in self.teachers:
                content[TEACHER_KEY] = state_to_arrays(self.layout, self.teachers[client])
                node_config["teacher-client-id"] = client
            messages.append(self._message(content, node, MessageType.TRAIN, server_round))
        log.info("round %d: sending to %d nodes", server_round, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, run the defense on the valid states and update the teachers."""
        t = server_round - 1  # the server core's 0-based round; messages name the 1-based server round
        updates, rejected, failed = self._collect(server_round, replies)
        failed += self._unanswered
        self._unanswered = []
        if rejected and self.on_invalid_update == "stop":
            raise InvalidUpdateError(
                f"round {server_round}: rejected updates from {rejected}; stopping (on_invalid_update)"
            )
        if self.global_state is None and updates:
            raise RuntimeError("aggregate_train before any global state: call configure_train or start first")
        updates.sort(key=lambda u: u.client_id)
        ids = [u.client_id for u in updates]
        shadows = {u.client_id: u.shadow for u in updates if u.shadow is not None}
        self._attackers_as_reported(updates)
        outcome = self.core.step(t, [u.state for u in updates], ids, [u.num_samples for u in updates], shadows)
        rejected += list(outcome.refused)
        aggregated = [u for u in updates if u.client_id in outcome.kept_ids]
        record: dict[str, Any] = {
            "num_sampled": len(self._sampled),
            "num_aggregated": len(aggregated),
            "num_rejected": len(rejected),
            "num_failed": len(failed),
            "rejected": rejected,
            "failed_nodes": failed,
        }
        if outcome.aggregate is None:
            log.error("round %d: no valid update arrived; the global model is unchanged", server_round)
            self.last_record = record
            return None, metric_record(record)
        eval_state = outcome.aggregate.eval_state
        self.eval_state = None if eval_state is None else eval_state.detach().cpu()
        self.node_clients.update({u.node_id: u.client_id for u in aggregated})
        record.update(self._round_record(outcome, aggregated))
        self.last_record = record
        return state_to_arrays(self.layout, self.core.global_state), metric_record(record)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: A and ASR are measured on the server (``evaluate_fn``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """No client-side evaluation."""
        return None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run rounds ``1..num_rounds`` (after the checkpoint's last round when resuming), evaluating on the server
        after every round and checkpointing it; ``timeout`` bounds the wait for one round's replies."""
        self.round_timeout = timeout
        self.summary()
        result = Result()
        arrays = initial_arrays
        self.global_state = arrays_to_state(self.layout, initial_arrays)
        done = self._resume()
        if done:
            arrays = state_to_arrays(self.layout, self.core.global_state)
            result.arrays = arrays
            log.info("resuming after round %d of %d", done, num_rounds)
        elif evaluate_fn is not None and (initial := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = initial
        self._first_round = done + 1
        for server_round in range(done + 1, num_rounds + 1):
            started = time.perf_counter()
            messages = self.configure_train(server_round, arrays, ConfigRecord(dict(train_config or {})), grid)
            replies = self.send_and_receive(grid, messages, timeout)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            train_seconds = time.perf_counter() - started
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            record: dict[str, Any] = {"round": server_round - 1, "server_round": server_round, **self.last_record}
            if evaluate_fn is not None:
                evaluated = arrays if self.eval_state is None else state_to_arrays(self.layout, self.eval_state)
                if (res := evaluate_fn(server_round, evaluated)) is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
                    record.update(dict(res))
            record.update(train_seconds=train_seconds, seconds=time.perf_counter() - started)
            self._save(server_round, record)
            log.info(
                "round %d/%d: %d aggregated, %d rejected, %d failed, A=%s ASR=%s (%.1fs)",
                server_round,
                num_rounds,
                record["num_aggregated"],
                record["num_rejected"],
                record["num_failed"],
                record.get("accuracy"),
                record.get("asr"),
                record["seconds"],
            )
        return result

    # ------------------------------------------------------------------ messaging

    def send_and_receive(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Push ``messages`` and pull replies every ``poll_interval`` s until all arrived or ``timeout`` s passed.

        Nodes whose message could not be pushed or that did not reply in time are kept for the round's record.
        """
        messages = list(messages)
        if not messages:
            return []
        pushed = list(grid.push_messages(messages))
        pending: dict[str, int] = {}
        for msg_id, msg in zip(pushed, messages):
            node = msg.metadata.dst_node_id
            if msg_id:
                pending[msg_id] = node
            else:
                log.warning("message to node %d could not be pushed", node)
                self._unanswered.append(node)
        pushed_at = time.monotonic()
        deadline = pushed_at + timeout
        replies: list[Message] = []
        while pending:
            for reply in grid.pull_messages(list(pending)):
                sender = pending.pop(reply.metadata.reply_to_message_id, None)
                if sender is not None:
                    self._reply_node[reply.metadata.reply_to_message_id] = sender
                    self._reply_seconds[reply.metadata.reply_to_message_id] = time.monotonic() - pushed_at
                    replies.append(reply)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        if pending:
            log.warning("no reply within %.0fs from nodes %s", timeout, sorted(pending.values()))
            self._unanswered.extend(pending.values())
        return replies

    def _message(self, content: RecordDict, node: int, message_type: str, server_round: int) -> Message:
        ttl = None if self.round_timeout is None else max(float(self.round_timeout), 60.0)
        return Message(content, dst_node_id=node, message_type=message_type, group_id=str(server_round), ttl=ttl)

    def _sample_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The connected nodes, after waiting (at most ``connect_timeout`` s) for ``min_nodes`` of them before the
        first round of this run and for at least one later; a seeded sample when participation < 1."""
        need = self.min_nodes if server_round == self._first_round else 1
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := sorted(grid.get_node_ids())) < need and time.monotonic() < deadline:
            log.info("waiting for nodes: %d connected, %d wanted", len(nodes), need)
            time.sleep(1.0)
        if len(nodes) < need:
            log.warning(
                "only %d of %d wanted nodes connected after %.0fs; going on", len(nodes), need, self.connect_timeout
            )
        return sample_participants(nodes, self.participation, self.seed, server_round - 1)

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes never seen before for their partition id (a ``query`` message), so they get their teacher."""
        if not nodes:
            return
        messages = [
            self._message(RecordDict({CONFIG_KEY: ConfigRecord({"want": "partition-id"})}), n, MessageType.QUERY, 0)
            for n in nodes
        ]
        unanswered = list(self._unanswered)
        for reply in self.send_and_receive(grid, messages, self.identify_timeout):
            node = self._reply_node.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            self._reply_seconds.pop(reply.metadata.reply_to_message_id, None)
            if reply.has_error():
                continue
            try:
                metrics = reply.content.metric_records
                self.node_clients[node] = client_id_of(next(iter(metrics.values()), None), node)
            except MalformedUpdate as err:
                log.warning("node %d answered the partition-id query badly: %s", node, err)
        self._unanswered = unanswered  # a node silent here still gets its train message
        log.info("identified nodes: %s", {n: self.node_clients.get(n) for n in nodes})

    # ------------------------------------------------------------------ checking replies

    def _collect(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[ClientUpdate], list[int], list[int]]:
        """Valid updates, rejected client ids (malformed, non-finite, duplicate) and failed node ids; the warnings
        name ``server_round`` (1-based, as every other message of the strategy)."""
        updates: list[ClientUpdate] = []
        rejected: list[int] = []
        failed: list[int] = []
        seen: set[int] = set()
        for msg in replies:
            node = self._reply_node.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            seconds = self._reply_seconds.pop(msg.metadata.reply_to_message_id, math.nan)
            if msg.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                failed.append(node)
                continue
            try:
                update = self._parse(node, msg.content)
            except MalformedUpdate as err:
                log.warning("round %d: update from node %d rejected, never aggregated: %s", server_round, node, err)
                rejected.append(node)
                continue
            if update.client_id in seen:
                log.warning(
                    "round %d: a second update for client %d (node %d) rejected", server_round, update.client_id, node
                )
                rejected.append(update.client_id)
                continue
            seen.add(update.client_id)
            update.reply_seconds = seconds
            updates.append(update)
        return updates, rejected, failed

    def _parse(self, node: int, content: RecordDict) -> ClientUpdate:
        """A reply's update, or :class:`MalformedUpdate` naming what is wrong with it."""
        arrays = _single(dict(content.array_records), ARRAYS_KEY, "ArrayRecord")
        metrics = _single(dict(content.metric_records), METRICS_KEY, "MetricRecord")
        client = client_id_of(metrics, node)
        samples = finite_number(metrics.get("num-examples"))
        if samples is None or samples <= 0:
            raise MalformedUpdate(f"client {client}: num-examples {metrics.get('num-examples')!r} is not positive")
        state = arrays_to_state(self.layout, arrays)
        if not bool(torch.isfinite(state).all()):
            raise MalformedUpdate(f"client {client}'s state holds NaN or Inf")
        shadow = None
        if SHADOW_KEY in content.array_records and ARRAYS_KEY in content.array_records:
            try:
                shadow = arrays_to_state(self.layout, content.array_records[SHADOW_KEY])
            except MalformedUpdate as err:
                raise MalformedUpdate(f"client {client}'s clean model (shadow): {err}") from None
            if not bool(torch.isfinite(shadow).all()):
                raise MalformedUpdate(f"client {client}'s clean model (shadow) holds NaN or Inf")
        loss = finite_number(metrics.get("train-loss"))
        train_seconds = finite_number(metrics.get("train-seconds"))
        flag = metrics.get("malicious")
        return ClientUpdate(
            node_id=node,
            client_id=client,
            state=state,
            num_samples=samples,
            train_loss=math.nan if loss is None else loss,
            malicious=None if flag is None else bool(flag),
            train_seconds=math.nan if train_seconds is None else train_seconds,
            shadow=shadow,
        )

    def _attackers_as_reported(self, updates: list[ClientUpdate]) -> None:
        """The crafting step's attackers as the nodes report them: a node's ``malicious`` flag (its node config, or
        the configured last ⌊γK⌋ ids) decides whether its reply is crafted, so a node made malicious by its node
        config is an attacker of the crafting step too. Nodes that report nothing keep the configured role."""
        crafter = self.core.crafter
        reported = [u for u in updates if u.malicious is not None]
        if not reported or not isinstance(crafter, Crafter):
            return
        known = {u.client_id for u in reported}
        flagged = {u.client_id for u in reported if u.malicious}
        crafter.attackers = frozenset((crafter.attackers - known) | flagged)

    def _round_record(self, outcome: RoundOutcome, updates: list[ClientUpdate]) -> dict[str, Any]:
        """What the round decided, for ``metrics.jsonl`` and (flattened) the train MetricRecord."""
        losses = [u.train_loss for u in updates if not math.isnan(u.train_loss)]
        reported = any(u.malicious is not None for u in updates)  # simulation bookkeeping; the defense never sees it
        malicious = [u.client_id for u in updates if u.malicious] if reported else None
        record: dict[str, Any] = {
            "clients": [u.client_id for u in updates],
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "client_loss": {str(u.client_id): u.train_loss for u in updates},
            "client_train_seconds": {str(u.client_id): u.train_seconds for u in updates},
            "client_reply_seconds": {str(u.client_id): u.reply_seconds for u in updates},
            **outcome.record(malicious),
        }
        if malicious is not None:
            record["reported_malicious"] = malicious
        return record

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, server_round: int) -> dict[str, Any]:
        """Everything needed to resume after ``server_round``: the server core's checkpoint (the simulator's format:
        global state, teachers, defense state, config hash), the node → client map and the crafting attack's state
        across rounds (e.g. PGD's learned radius) when it keeps one."""
        if self.global_state is None:
            raise RuntimeError("no global state to checkpoint")
        node_clients = {str(n): c for n, c in self.node_clients.items()}
        crafter = self.core.crafter
        attack_state = crafter.state_dict() if isinstance(crafter, Crafter) else {}
        extra: dict[str, Any] = {"attack_state": attack_state} if attack_state else {}
        return self.core.checkpoint(server_round, self.config_hash, node_clients=node_clients, **extra)

    def load_state_dict(self, payload: dict[str, Any]) -> int:
        """Restore a :meth:`state_dict`; returns the last completed round. Refuses another model or defense (a
        checkpoint of another configuration is resumed with a warning: the number of rounds may grow)."""
        where = str(self.store.checkpoint_path) if self.store is not None else "checkpoint"
        try:
            done = self.core.restore(payload, self.config_hash, where=where, strict_config=False)
            node_clients = {int(n): int(c) for n, c in payload["node_clients"].items()}
            if isinstance(self.core.crafter, Crafter):
                self.core.crafter.load_state_dict(payload.get("attack_state") or {})
        except (RunDirError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise ConfigError(str(err) if isinstance(err, RunDirError) else f"{where}: {err!r}") from None
        self._has_state = True
        self.node_clients = node_clients
        return done

    def _resume(self) -> int:
        """Rounds already done according to the store's checkpoint (0 for a fresh run, which clears the log)."""
        if self.store is None:
            return 0
        payload = self.store.load_checkpoint() if self.resume else None
        if payload is None:
            self.store.start_metrics()
            return 0
        done = self.load_state_dict(payload)
        self.store.truncate_metrics(done)
        return done

    def _save(self, server_round: int, record: dict[str, Any]) -> None:
        """Append the round's record, then rewrite the checkpoint (atomically)."""
        if self.store is None:
            return
        self.store.append_metrics(record)
        self.store.save_checkpoint(self.state_dict(server_round))
