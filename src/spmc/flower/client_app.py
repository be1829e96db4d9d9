"""SPMC's client side over Flower: a ClientApp that trains one partition with spmc's trainers.

The node config gives ``partition-id`` and ``num-partitions`` (Flower's simulation sets them; a SuperNode gets them
from ``--node-config``). The partition, its poisoning and the seeds are exactly those of the engine: the node builds
the :class:`~spmc.federation.Federation` with ``num_clients = num-partitions`` (cached per process), and round ``r``
(1-based) trains the task the engine gives its client in round ``r − 1``.

A node is malicious when its partition id is among the last ⌊γK⌋ (spec §2.1), unless its node config says
otherwise with ``malicious = true|false``. Malicious nodes run the configured client procedure, or plain SGD under
``malicious_client = "plain"``. With the SPMC client the node distils from the teacher the server sent it (its
marginal-coalition model); without one (round 1, or a node the server does not know yet) from the global model.

Under ``attacker_knowledge = partial`` (ATTACKS.md §A1) an attacker in an attack round also trains a clean model on
its clean data, like a benign client with its own seed stream, and returns it as a second ArrayRecord
(``shadow``); the strategy passes it to the crafting step only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from spmc.config import ConfigError, Experiment, optim_config
from spmc.federation import Federation
from spmc.flower.convert import arrays_to_state, state_to_arrays
from spmc.flower.nodewatch import watch_node
from spmc.flower.options import UserValue, parse_run_config, with_num_clients
from spmc.flower.strategy import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SHADOW_KEY, TEACHER_KEY
from spmc.params import ParamLayout
from spmc.training import ClientData, SequentialEngine

log = logging.getLogger(__name__)


def _as_int(node_config: Mapping[str, UserValue], key: str) -> int:
    value = node_config.get(key)
    number = _whole(value)
    if number is None or number < 0:
        raise ConfigError(f"node config: {key} = {value!r}; expected a non-negative integer (--node-config)")
    return number


def _whole(value: object) -> int | None:
    """An int, or a string of one (``"3"``, `` 3 ``), as an int; anything else (bools, floats, text) None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def node_partition(node_config: Mapping[str, UserValue]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, checked."""
    pid, k = _as_int(node_config, "partition-id"), _as_int(node_config, "num-partitions")
    if pid >= k:
        raise ConfigError(f"node config: partition-id {pid} must be < num-partitions {k}")
    return pid, k


def node_malicious_flag(node_config: Mapping[str, UserValue]) -> bool | None:
    """The explicit ``malicious`` flag of the node config, or None when absent."""
    if "malicious" not in node_config:
        return None
    value = node_config["malicious"]
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"node config: malicious = {value!r}; expected true or false")


@dataclass
class ClientSetup:
    """What one node needs to train: its configuration, data, model layout and trainer."""

    cfg: Experiment
    partition_id: int
    malicious: bool
    method: str
    data: ClientData
    layout: ParamLayout
    engine: SequentialEngine
    device: torch.device
    federation: Federation


def malicious_ids(cfg: Experiment, partition_id: int, flag: bool | None) -> tuple[tuple[int, ...], bool]:
    """The malicious ids to build the data with and whether this node is malicious: the last ⌊γK⌋ (spec §2.1),
    with this node added or removed by its explicit ``malicious`` flag."""
    ids = set(cfg.malicious_ids)
    if flag is not None and cfg.attack == "none":
        log.warning("node config: malicious = %s ignored, attack = 'none'", flag)
    elif flag is not None:
        ids = ids | {partition_id} if flag else ids - {partition_id}
    return tuple(sorted(ids)), partition_id in ids


@functools.lru_cache(maxsize=2)
def federation(cfg_json: str, malicious: tuple[int, ...]) -> tuple[Federation, SequentialEngine]:
    """Every partition's data exactly as the engine builds it, with ``malicious`` poisoned, and a sequential
    trainer over the federation's model (cached per process)."""
    fed = Federation.build(Experiment.model_validate_json(cfg_json), malicious)
    return fed, SequentialEngine(fed.model, fed.layout, optim_config(fed.cfg))


def client_setup(context: Context, overrides: Mapping[str, UserValue] | None = None) -> ClientSetup:
    """The node's setup from its run and node configs (data and trainer built once per process)."""
    pid, k = node_partition(context.node_config)
    cfg, _ = parse_run_config(context.run_config, overrides)
    if cfg.num_clients != k:
        log.info("num_clients = %d in the run config; using num-partitions = %d of the node config", cfg.num_clients, k)
    cfg = with_num_clients(cfg, k)
    cfg_json = cfg.model_dump_json()
    ids, malicious = malicious_ids(cfg, pid, node_malicious_flag(context.node_config))
    fed, engine = federation(cfg_json, ids)
    return ClientSetup(
        cfg=cfg,
        partition_id=pid,
        malicious=malicious,
        method=fed.method_for(pid),
        data=fed.data.clients[pid],
        layout=fed.layout,
        engine=engine,
        device=fed.device,
        federation=fed,
    )


def train(msg: Message, context: Context, overrides: Mapping[str, UserValue] | None = None) -> Message:
    """Train the node's partition from the received global arrays (with its teacher under the SPMC client)."""
    setup = client_setup(context, overrides)
    pid = setup.partition_id
    content = msg.content
    start = arrays_to_state(setup.layout, content.array_records[ARRAYS_KEY]).to(setup.device)
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = _whole(config.get("server-round", 1))
    if server_round is None:
        raise ConfigError(f"server-round = {config.get('server-round')!r}; expected an integer")
    t = server_round - 1
    shadow = bool(setup.federation.shadow_ids(t, [pid]))  # attacker_knowledge = partial: also a clean model
    teacher = None
    if setup.method == "spmc" or (shadow and setup.cfg.client == "spmc"):
        teacher = start
        sent_for = config.get("teacher-client-id")
        if TEACHER_KEY in content.array_records and sent_for is not None and _whole(sent_for) != pid:
            log.warning("teacher sent for client %s, but this is partition %d; using the global model", sent_for, pid)
        elif TEACHER_KEY in content.array_records:
            teacher = arrays_to_state(setup.layout, content.array_records[TEACHER_KEY]).to(setup.device)
    setup.federation.prepare_round(t, start, [pid])
    task = setup.federation.task(t, pid, teacher)
    started = time.perf_counter()
    result = setup.engine.train_client(start, task)
    seconds = time.perf_counter() - started
    metrics = MetricRecord(
        {
            "num-examples": len(setup.data),
            "partition-id": pid,
            "train-loss": float(result.mean_loss),
            "train-seconds": seconds,
            "steps": result.steps,
            "malicious": int(setup.malicious),
        }
    )
    reply = RecordDict({ARRAYS_KEY: state_to_arrays(setup.layout, result.state), METRICS_KEY: metrics})
    if shadow:  # its clean model, trained like a benign client's, for the crafting step only
        clean = setup.engine.train_client(start, setup.federation.shadow_task(t, pid, teacher))
        reply[SHADOW_KEY] = state_to_arrays(setup.layout, clean.state)
    return Message(reply, reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Answer the server's identification query with the node's partition id."""
    pid, _ = node_partition(context.node_config)
    return Message(RecordDict({METRICS_KEY: MetricRecord({"partition-id": pid})}), reply_to=msg)


def make_client_app(overrides: Mapping[str, UserValue] | None = None) -> ClientApp:
    """A ClientApp training with spmc; ``overrides`` take precedence over the run config (e.g. in tests). Under a
    SuperNode, the process stops when its SuperNode is gone (:func:`~spmc.flower.nodewatch.watch_node`)."""
    app = ClientApp()
    watch_node()  # the app is built when flwr-clientapp loads it: watch from then on

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, overrides)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context)

    return app
