"""SPMC's client side over Flower: a ClientApp that trains one partition with spmc's trainers.

The node config gives ``partition-id`` and ``num-partitions`` (Flower's simulation sets them; a SuperNode gets them
from ``--node-config``). The partition, its poisoning and the seeds are exactly those of the engine: the node builds
the :class:`~spmc.federation.Federation` with ``num_clients = num-partitions`` (cached per process), and round ``r``
(1-based) trains the task the engine gives its client in round ``r − 1``.

A node is malicious when its partition id is among the last ⌊γK⌋ (spec §2.1), unless its node config says
otherwise with ``malicious = true|false``. Malicious nodes run the configured client procedure, or plain SGD under
``malicious_client = "plain"``, or SPMC's under ``"spmc"``. With the SPMC client the node distils from the teacher
the server sent it (its marginal-coalition model); without one (round 1, or a node the server does not know yet)
from the global model.

**Node-local data.** A node whose node config has ``data-dir = "/path"`` trains on the files of that folder only:
the training files of the run's dataset in their standard form (``train-images-idx3-ubyte`` and
``train-labels-idx1-ubyte`` for an IDX dataset, ``data_batch_*`` for CIFAR-10; :func:`spmc.data.load_split_folder`),
the whole folder as its data, no partitioning and no other node's files. Its ``partition-id`` is then its client id
(0 … ``num_clients`` − 1 of the run config; ``num-partitions`` is not needed) and it is malicious only when its node
config says ``malicious = true``: the last-⌊γK⌋ rule assumes a shared partition that does not exist here.

Under ``attacker_knowledge = partial`` (ATTACKS.md §A1) an attacker in an attack round also trains a clean model on
its clean data, like a benign client with its own seed stream, and returns it as a second ArrayRecord
(``shadow``); the strategy passes it to the crafting step only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from spmc.config import ConfigError, Experiment, optim_config
from spmc.data import DataError, load_split_folder
from spmc.federation import Federation, OwnData
from spmc.flower.convert import arrays_to_state, state_to_arrays
from spmc.flower.nodewatch import watch_node
from spmc.flower.options import UserValue, field_name, parse_run_config, with_num_clients
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


DATA_DIR_KEY = "data-dir"


def node_data_dir(node_config: Mapping[str, UserValue]) -> str | None:
    """The ``data-dir`` of the node config (node-local data), or None when the key is absent."""
    if DATA_DIR_KEY not in node_config:
        return None
    value = node_config[DATA_DIR_KEY]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"node config: {DATA_DIR_KEY} = {value!r}; expected the path of a folder with this node's training files"
        )
    return value.strip()


def node_client_id(node_config: Mapping[str, UserValue], cfg: Experiment) -> int:
    """A node with its own data: its ``partition-id`` (its client id), < ``num_clients`` of the run config and <
    ``num-partitions`` when the node config gives one."""
    pid = _as_int(node_config, "partition-id")
    if "num-partitions" in node_config:
        pid, _ = node_partition(node_config)
    if pid >= cfg.num_clients:
        raise ConfigError(
            f"node config: partition-id = {pid}; expected a client id in 0..{cfg.num_clients - 1} "
            f"(num_clients = {cfg.num_clients} of the run config)"
        )
    return pid


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
def federation(
    cfg_json: str, malicious: tuple[int, ...], data_dir: str | None = None, client_id: int = 0
) -> tuple[Federation, SequentialEngine]:
    """Every partition's data exactly as the engine builds it, with ``malicious`` poisoned — or, with
    ``data_dir``, client ``client_id``'s own training files only — and a sequential trainer over the federation's
    model (cached per process)."""
    cfg = Experiment.model_validate_json(cfg_json)
    own = None if data_dir is None else OwnData.node(client_id, *node_files(cfg, data_dir))
    fed = Federation.build(cfg, malicious, own)
    return fed, SequentialEngine(fed.model, fed.layout, optim_config(fed.cfg))


def node_files(cfg: Experiment, data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of ``cfg.dataset`` in the node's ``data-dir``; a missing, empty or malformed
    folder, or a dataset not read from files, is a :class:`ConfigError` naming the key and the value."""
    try:
        return load_split_folder(cfg.dataset, data_dir, "train")
    except (DataError, ValueError) as err:
        raise ConfigError(f"node config: {DATA_DIR_KEY} = {data_dir!r}: {err}") from None


def without_data_dir(run_config: Mapping[str, UserValue]) -> dict[str, UserValue]:
    """The run config without ``data_dir``: that is the server's folder (``local-data``), which need not exist on a
    node's machine, and a node with its own data reads only its ``data-dir``."""
    return {k: v for k, v in run_config.items() if field_name(k) != "data_dir"}


def local_setup(context: Context, cfg: Experiment, data_dir: str) -> ClientSetup:
    """A node training on its own files (``data-dir``): client id ``partition-id``, malicious only by its flag."""
    pid = node_client_id(context.node_config, cfg)
    flag = node_malicious_flag(context.node_config)
    if flag is not None and cfg.attack == "none" and cfg.update_attack == "none":
        log.warning("node config: malicious = %s ignored, attack = 'none'", flag)
        flag = False
    ids = (pid,) if flag else ()
    fed, engine = federation(cfg.model_dump_json(), ids, data_dir, pid)
    return _setup(cfg, pid, bool(flag), fed, engine)


def _setup(cfg: Experiment, pid: int, malicious: bool, fed: Federation, engine: SequentialEngine) -> ClientSetup:
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


def client_setup(context: Context, overrides: Mapping[str, UserValue] | None = None) -> ClientSetup:
    """The node's setup from its run and node configs (data and trainer built once per process)."""
    data_dir = node_data_dir(context.node_config)
    if data_dir is not None:
        cfg, _ = parse_run_config(without_data_dir(context.run_config), without_data_dir(overrides or {}))
        return local_setup(context, cfg, data_dir)
    cfg, _ = parse_run_config(context.run_config, overrides)
    pid, k = node_partition(context.node_config)
    if cfg.num_clients != k:
        log.info("num_clients = %d in the run config; using num-partitions = %d of the node config", cfg.num_clients, k)
    cfg = with_num_clients(cfg, k)
    cfg_json = cfg.model_dump_json()
    ids, malicious = malicious_ids(cfg, pid, node_malicious_flag(context.node_config))
    fed, engine = federation(cfg_json, ids)
    return _setup(cfg, pid, malicious, fed, engine)


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
    """Answer the server's identification query with the node's partition id (its client id)."""
    if node_data_dir(context.node_config) is not None:
        pid = _as_int(context.node_config, "partition-id")
    else:
        pid, _ = node_partition(context.node_config)
    return Message(RecordDict({METRICS_KEY: MetricRecord({"partition-id": pid})}), reply_to=msg)


@contextlib.contextmanager
def logged_config_errors() -> Iterator[None]:
    """Log a node or run configuration error as one line before Flower turns it into an error reply (and prints
    its traceback); the error still fails the reply."""
    try:
        yield
    except (ConfigError, DataError) as err:
        log.error("%s", " ".join(str(err).split()))
        raise


def make_client_app(overrides: Mapping[str, UserValue] | None = None) -> ClientApp:
    """A ClientApp training with spmc; ``overrides`` take precedence over the run config (e.g. in tests). Under a
    SuperNode, the process stops when its SuperNode is gone (:func:`~spmc.flower.nodewatch.watch_node`)."""
    app = ClientApp()
    watch_node()  # the app is built when flwr-clientapp loads it: watch from then on

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        with logged_config_errors():
            return train(msg, context, overrides)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        with logged_config_errors():
            return query(msg, context)

    return app
