"""Node-local data over Flower: a node whose node config has ``data-dir`` trains on the files of that folder only
(no partitioning), and the server loads only its own test set (``local-data = true``, ``data_dir``). Three nodes
get disjoint IDX files written here; poisoning one folder's labels changes that node's update and no other.
The ServerApp and ClientApp logic run in one process over a stand-in Grid; one slow test runs real processes."""

from __future__ import annotations

import gzip
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from spmc.config import ConfigError  # noqa: E402
from spmc.data import IDX_FILES  # noqa: E402
from spmc.flower import client_app, parse_run_config, run_server  # noqa: E402
from spmc.flower.server_app import server_files  # noqa: E402
from spmc.store import RunStore  # noqa: E402
from tests.attacks._flower_grid import StandInGrid  # noqa: E402

SIZES = (40, 56, 72)  # disjoint folders of different sizes: num-examples tells whose data a node read
RUN = {
    "dataset": "mnist",
    "num_clients": 3,
    "gamma": 0.0,
    "attack": "none",
    "rounds": 1,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 16,
    "device": "cpu",
    "defense": "fedavg",
    "client": "plain",
    "local-data": True,
    "round-timeout": 5.0,
}

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file (uint8 payload, gzipped) as MNIST ships it."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stems = IDX_FILES[:2] if split == "train" else IDX_FILES[2:]
    write_idx(folder / f"{stems[0]}.gz", images)
    write_idx(folder / f"{stems[1]}.gz", labels)
    return folder


def images_and_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28×28 images whose brightness follows their label (learnable), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)) + 19 * labels[:, None, None]
    return images.astype(np.uint8), labels


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Three node folders with disjoint training files, node 1's also with poisoned labels, and a server folder
    with test files only."""
    out: dict[str, Path] = {}
    for k, n in enumerate(SIZES):
        images, labels = images_and_labels(n, seed=100 + k)
        out[f"node{k}"] = write_split(tmp_path / f"node{k}", "train", images, labels)
        if k == 1:
            out["node1-poisoned"] = write_split(tmp_path / "node1-poisoned", "train", images, (labels + 1) % 10)
    out["server"] = write_split(tmp_path / "server", "test", *images_and_labels(30, seed=7))
    return out


def local_node(pid: int, data_dir: Path, replies: list[Message], **extra: object) -> Callable[[Message], Message]:
    """spmc's ClientApp handlers for a node with its own data (no num-partitions in its node config)."""
    config = {"partition-id": pid, "data-dir": str(data_dir), **extra}

    def handle(msg: Message) -> Message:
        ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config=config, state=RecordDict(), run_config={})
        if msg.metadata.message_type == "query":
            return client_app.query(msg, ctx)
        answer = client_app.train(msg, ctx, NODE_RUN)
        replies.append(answer)
        return answer

    return handle


def one_round(dirs: list[Path], server: Path, out: Path, **node1: object) -> dict[int, Message]:
    """One round with nodes 0-2 on ``dirs``; the replies by partition id."""
    replies: list[Message] = []
    grid = StandInGrid({500 + k: local_node(k, d, replies, **(node1 if k == 1 else {})) for k, d in enumerate(dirs)})
    cfg, opts = parse_run_config({}, {**RUN, "data_dir": str(server), "out-dir": str(out)})  # type: ignore[dict-item]
    run_server(grid, cfg, opts)
    return {int(r.content.metric_records["metrics"]["partition-id"]): r for r in replies}  # type: ignore[arg-type]


def state(reply: Message) -> torch.Tensor:
    """A reply's model state as one float64 vector."""
    arrays = reply.content.array_records["arrays"]
    return torch.cat([torch.from_numpy(a.numpy().astype(np.float64).ravel()) for a in arrays.values()])


def test_each_node_trains_on_its_own_folder_only(folders: dict[str, Path], tmp_path: Path) -> None:
    clean = one_round([folders["node0"], folders["node1"], folders["node2"]], folders["server"], tmp_path / "a")
    poisoned = one_round(
        [folders["node0"], folders["node1-poisoned"], folders["node2"]], folders["server"], tmp_path / "b"
    )
    for k, n in enumerate(SIZES):  # each node trained on exactly its folder's images
        assert clean[k].content.metric_records["metrics"]["num-examples"] == n
    assert torch.equal(state(clean[0]), state(poisoned[0]))
    assert torch.equal(state(clean[2]), state(poisoned[2]))
    assert not torch.equal(state(clean[1]), state(poisoned[1]))  # node 1's labels changed: only its update did
    (record,) = RunStore(tmp_path / "a").read_metrics()
    assert record["clients"] == [0, 1, 2] and record["num_aggregated"] == 3
    assert 0.0 <= record["accuracy"] <= 100.0  # measured on the server's own 30 test images


def node_context(node_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})  # type: ignore[arg-type]


NODE_RUN = {k: v for k, v in RUN.items() if k != "local-data"}


def test_the_node_config_makes_a_local_node_malicious(folders: dict[str, Path]) -> None:
    overrides = {**NODE_RUN, "attack": "base"}
    bad = node_context({"partition-id": 2, "data-dir": str(folders["node2"]), "malicious": "true"})
    setup = client_app.client_setup(bad, overrides)
    assert setup.malicious and setup.data.final and len(setup.data) == SIZES[2]  # its own data, poisoned
    good = client_app.client_setup(node_context({"partition-id": 2, "data-dir": str(folders["node2"])}), overrides)
    assert not good.malicious and not good.data.final  # no last-⌊γK⌋ rule for nodes with their own data


@pytest.mark.parametrize(
    "node_config, message",
    [
        (
            {"partition-id": 0, "data-dir": "/nonexistent/spmc-node"},
            r"data-dir = '/nonexistent/spmc-node': .*does not exist",
        ),
        ({"partition-id": 0, "data-dir": "EMPTY"}, r"data-dir = '.*': .*missing IDX file\(s\) train-images-idx3-ubyte"),
        ({"partition-id": 0, "data-dir": ""}, r"data-dir = ''; expected the path of a folder"),
        ({"partition-id": 0, "data-dir": 3}, r"data-dir = 3; expected the path of a folder"),
        ({"data-dir": "NODE"}, r"partition-id = None; expected a non-negative integer"),
        ({"partition-id": 3, "data-dir": "NODE"}, r"partition-id = 3; expected a client id in 0..2"),
        ({"partition-id": 0, "data-dir": "NODE", "malicious": "maybe"}, r"malicious = 'maybe'; expected true or false"),
    ],
)
def test_bad_node_config_values_are_one_line_errors(
    folders: dict[str, Path], tmp_path: Path, node_config: dict, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"EMPTY": str(tmp_path / "empty"), "NODE": str(folders["node0"])}
    node_config = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in node_config.items()}
    with pytest.raises(ConfigError, match=message) as err:
        client_app.client_setup(node_context(node_config), NODE_RUN)
    assert "\n" not in str(err.value) and str(err.value).startswith("node config: ")


def test_a_dataset_not_read_from_files_is_refused_for_a_local_node(folders: dict[str, Path]) -> None:
    ctx = node_context({"partition-id": 0, "data-dir": str(folders["node0"])})
    with pytest.raises(ConfigError, match=r"data-dir = .*dataset='fmnist-sample' is not read from files"):
        client_app.client_setup(ctx, {**NODE_RUN, "dataset": "fmnist-sample"})


def test_the_server_loads_only_its_own_files(folders: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPMC_DATA_DIR", raising=False)
    cfg, _ = parse_run_config({}, {**RUN, "data_dir": str(folders["server"])})  # type: ignore[dict-item]
    own = server_files(cfg, needs_server_data=False)
    assert own.test_labels.shape == (30,) and own.train_labels.shape == (0,)
    with pytest.raises(ConfigError, match=r"data_dir = .*missing IDX file\(s\) train-images-idx3-ubyte"):
        server_files(cfg, needs_server_data=True)  # FLTrust & co. need its training files as the validation split
    write_split(folders["server"], "train", *images_and_labels(20, seed=9))
    assert server_files(cfg, needs_server_data=True).train_labels.shape == (20,)
    no_dir, _ = parse_run_config({}, RUN)
    with pytest.raises(ConfigError, match=r"data_dir is not set .*local-data = true needs the server's own folder"):
        server_files(no_dir, needs_server_data=False)


@pytest.mark.slow  # ~1 min: a real SuperLink and three SuperNodes
def test_nodes_with_their_own_folders_on_a_real_deployment(folders: dict[str, Path], tmp_path: Path) -> None:
    """``flower-supernode --node-config 'data-dir="…"'`` on 127.0.0.1: each node reads its folder, node 1 is made
    malicious by its node config, the server holds only its test files; every process is stopped by its PID."""
    import shutil

    from spmc.flower.localhost import LocalDeployment
    from tests._deployment import running

    app = Path(__file__).resolve().parents[1] / "examples" / "flower"
    if shutil.which("flower-supernode", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("Flower's executables are not installed next to this Python")
    nodes = [f'data-dir="{folders[f"node{k}"]}"' + (" malicious=true" if k == 1 else "") for k in range(3)]
    with running(LocalDeployment(app, tmp_path / "deploy", 3, node_configs=nodes)) as dep:
        out = tmp_path / "run"
        run = {**RUN, "attack": "base", "data_dir": str(folders["server"]), "out-dir": str(out), "round-timeout": 120.0}
        rc = dep.run(run, timeout=240, name="run-local")  # type: ignore[arg-type]
        assert rc == 0, dep.log_text("run-local")[-3000:]
        (record,) = RunStore(out).read_metrics()
        assert (record["clients"], record["num_aggregated"], record["num_failed"]) == ([0, 1, 2], 3, 0)
        assert record["reported_malicious"] == [1]
        assert sorted(p.name for p in folders["server"].iterdir()) == [f"{s}.gz" for s in IDX_FILES[2:]]


def test_a_node_logs_its_configuration_error_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """What the SuperNode's output shows before Flower's traceback; the reply still fails."""
    import logging

    ctx = node_context({"partition-id": 0, "data-dir": "/nonexistent/spmc-node"})
    with (
        caplog.at_level(logging.ERROR, logger="spmc.flower.client_app"),
        pytest.raises(ConfigError),
        client_app.logged_config_errors(),
    ):
        client_app.client_setup(ctx, NODE_RUN)
    (record,) = [r for r in caplog.records if r.name == "spmc.flower.client_app"]
    assert record.getMessage().startswith("node config: data-dir = '/nonexistent/spmc-node': ")
    assert "\n" not in record.getMessage()


def test_the_servers_data_dir_need_not_exist_on_a_node(folders: dict[str, Path]) -> None:
    """The run config's data_dir names the server's folder; on another machine it is not there, and a node with its
    own data never reads it."""
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "data-dir": str(folders["node0"])},
        state=RecordDict(),
        run_config={"data_dir": "/nonexistent/server-only", "local-data": True},
    )
    setup = client_app.client_setup(ctx, NODE_RUN)
    assert len(setup.data) == SIZES[0] and setup.cfg.data_dir is None
