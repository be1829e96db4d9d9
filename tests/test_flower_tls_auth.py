"""A Flower deployment over TLS with SuperNode authentication, all on 127.0.0.1: a CA, a server certificate and one
key pair per SuperNode made by the test in a temporary directory (``spmc.flower.tls``), the nodes' public keys
registered with ``flwr supernode register``; a run completes, and SuperNodes that are not registered are refused.
Every process is stopped by its PID (process group) in the fixture's teardown, also on failure.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from spmc.flower.localhost import CONNECTION, LocalDeployment  # noqa: E402
from spmc.flower.tls import NodeKey, make_node_key, make_tls_files  # noqa: E402
from spmc.store import RunStore  # noqa: E402
from tests._deployment import running  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"
BIN = Path(sys.executable).parent
NODES = 3
RUN = {
    "dataset": "synthetic",
    "synthetic_train_size": 300,
    "synthetic_test_size": 100,
    "num_clients": NODES,
    "gamma": 0.34,
    "rounds": 1,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 32,
    "defense": "spmc",
    "client": "spmc",
    "threads": 1,
    "resume": False,
    "round-timeout": 120.0,
}
REFUSED = "Failed to initialize the connection to the SuperLink"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all((BIN / tool).exists() for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")),
        reason=f"Flower's executables are not in {BIN} (install spmc[flower] into this environment)",
    ),
]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalDeployment, NodeKey]]:
    """The deployment (TLS, authentication, three registered nodes) and a key pair that was never registered."""
    workdir = tmp_path_factory.mktemp("flower-tls")
    keys = workdir / "keys"
    tls = make_tls_files(keys)
    node_keys = [make_node_key(keys, f"node-{i}") for i in range(NODES)]
    with running(LocalDeployment(APP, workdir, NODES, tls=tls, node_keys=node_keys, supernode_auth=True)) as dep:
        yield dep, make_node_key(keys, "stranger")


def registered_nodes(dep: LocalDeployment) -> list[dict[str, object]]:
    """``flwr supernode ls --format json``: the SuperNodes the SuperLink knows, with their status."""
    args = ["flwr", "supernode", "ls", CONNECTION, "--format", "json"]
    done = subprocess.run(args, env=dep.env, cwd=dep.workdir, capture_output=True, text=True, timeout=60, check=True)
    nodes = json.loads(done.stdout)["nodes"]
    assert isinstance(nodes, list)
    return nodes


def test_the_superlink_speaks_tls_with_the_certificate_of_the_test_ca(
    secure: tuple[LocalDeployment, NodeKey],
) -> None:
    dep, _ = secure
    assert dep.tls is not None
    context = ssl.create_default_context(cafile=str(dep.tls.ca_cert))
    address = ("127.0.0.1", dep.port)
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=address[0]) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")  # handshake done, certificate checked against the CA
    with socket.create_connection(("127.0.0.1", dep.port), timeout=10) as raw:  # plain HTTP gets no answer
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(10)
        assert not raw.recv(100).startswith(b"HTTP/")


def test_supernodes_that_are_not_registered_are_refused(secure: tuple[LocalDeployment, NodeKey]) -> None:
    dep, stranger = secure
    config = f"partition-id=0 num-partitions={NODES}"
    unregistered = dep.start_extra_node("unregistered", config, key=stranger)
    anonymous = dep.start_extra_node("anonymous", config, key=None)
    reasons = {
        "unregistered": "[code: 2004] Failed to activate SuperNode",  # a key the SuperLink does not know
        "anonymous": "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered",
    }
    for name, proc in (("unregistered", unregistered), ("anonymous", anonymous)):
        rc = proc.wait(timeout=120)  # the SuperNode gives up at once: Flower's exit code 305
        text = dep.log_text(name)
        assert rc != 0 and REFUSED in text and reasons[name] in text, f"{name}: exit {rc}\n{text[-2000:]}"
    nodes = registered_nodes(dep)
    assert [n["status"] for n in nodes] == ["online"] * NODES, nodes  # only the registered keys, all online


def test_a_run_over_tls_with_authenticated_supernodes_completes(
    secure: tuple[LocalDeployment, NodeKey], tmp_path: Path
) -> None:
    dep, _ = secure
    rc = dep.run({**RUN, "out-dir": str(tmp_path)}, timeout=300, name="run-tls")
    assert rc == 0, dep.log_text("run-tls")[-3000:]
    records = RunStore(tmp_path).read_metrics()
    assert [r["server_round"] for r in records] == [1], dep.log_text("run-tls")[-3000:]
    assert (records[0]["num_aggregated"], records[0]["num_failed"], records[0]["clients"]) == (3, 0, [0, 1, 2])
    for i in range(NODES):
        assert "Option `--insecure` was set" not in dep.log_text(f"supernode-{i}")
