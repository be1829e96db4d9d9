"""A Flower deployment on 127.0.0.1 for tests, benchmarks and trying things out: one ``flower-superlink``, several
``flower-supernode`` processes and ``flwr run`` against them, with a private ``FLWR_HOME``.

Every process is started in its own session, so stopping it by its PID (``os.killpg(pid, ...)``) also stops what
it spawned (``flower-superexec``, the ServerApp and ClientApp processes). The SuperLink starts
``flower-superexec`` through ``PATH``, so the directory of the running Python (the venv's ``bin``) is put first
on it; runtime installation of app dependencies is disabled (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``).

```python
with LocalDeployment(app_dir, workdir, num_nodes=3) as dep:
    done = dep.run({"rounds": 2, "out-dir": str(workdir / "run")}, timeout=300)
```

With ``tls`` (:class:`~spmc.flower.tls.TlsFiles`) every connection to the SuperLink (SuperNodes, ``flwr``, the
ServerApp) is HTTPS checked against the CA certificate; with ``supernode_auth`` as well, the SuperLink admits only
SuperNodes whose public key was registered (``flwr supernode register``, done by :meth:`LocalDeployment.start` for
every key in ``node_keys``) and each SuperNode signs its requests with its private key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spmc.flower.tls import NodeKey, TlsFiles

log = logging.getLogger(__name__)

CONNECTION = "spmc-localhost"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> bool:
    """True once something accepts TCP connections on 127.0.0.1:``port`` (within ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def toml_value(value: bool | int | float | str) -> str:
    """A TOML scalar (JSON's string escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid`` (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM to the process group of every process, SIGKILL to whatever is left after ``grace`` s (also the
    children of a leader that exited), then wait for the leaders."""
    for proc in procs:
        signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        signal_group(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=10.0)
    for proc in procs:
        if not wait_group_gone(proc.pid, timeout=15.0):
            log.warning("process group %d still has members (zombies not reaped yet?)", proc.pid)


def group_exists(pgid: int) -> bool:
    """Whether any process (zombies included) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until process group ``pgid`` is empty: an orphan that died is only gone once PID 1 has reaped it."""
    deadline = time.monotonic() + timeout
    while group_exists(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class LocalDeployment:
    """SuperLink and SuperNodes on loopback, started and stopped by PID (see module docstring)."""

    def __init__(
        self,
        app_dir: str | Path,
        workdir: str | Path,
        num_nodes: int,
        node_configs: Sequence[str] | None = None,
        threads: int = 1,
        tls: TlsFiles | None = None,
        node_keys: Sequence[NodeKey | None] | None = None,
        supernode_auth: bool = False,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.node_configs = list(node_configs or [""] * num_nodes)
        if len(self.node_configs) != num_nodes:
            raise ValueError(f"node_configs has {len(self.node_configs)} entries for {num_nodes} nodes")
        self.threads = threads
        self.tls = tls
        self.node_keys = list(node_keys or [None] * num_nodes)
        if len(self.node_keys) != num_nodes:
            raise ValueError(f"node_keys has {len(self.node_keys)} entries for {num_nodes} nodes")
        if supernode_auth and tls is None:
            raise ValueError("supernode_auth needs tls: Flower authenticates SuperNodes over TLS only")
        self.supernode_auth = supernode_auth
        self.port = 0
        self.node_ports: list[int] = []
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: list[subprocess.Popen[bytes] | None] = []
        self._others: list[subprocess.Popen[bytes]] = []
        self._killed: list[subprocess.Popen[bytes]] = []
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process: venv ``bin`` first on PATH, private FLWR_HOME, no installs."""
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
        }

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, start_new_session=True
            )
        finally:
            out.close()
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return proc

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the SuperLink, wait for its port, then start the SuperNodes and write the FLWR_HOME config."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.superlink = self._spawn("superlink", self._superlink_args())
        if not wait_for_port(self.port, ready_timeout):
            raise RuntimeError(f"flower-superlink did not open port {self.port}; see {self.logs / 'superlink.log'}")
        security = "insecure = true" if self.tls is None else f"root-certificates = {toml_value(str(self.tls.ca_cert))}"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{security}\n'
        )
        if self.supernode_auth:
            for key in self.node_keys:
                if key is not None:
                    self.register_node(key)
        self.node_ports = [free_port() for _ in range(self.num_nodes)]
        self.nodes = [self._start_node(i) for i in range(self.num_nodes)]

    def _superlink_args(self) -> list[str]:
        """``flower-superlink`` on 127.0.0.1:``port``: plain HTTP, or HTTPS (and SuperNode authentication)."""
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert)]
            args += ["--ssl-keyfile", str(self.tls.server_key)]
        if self.supernode_auth:
            args.append("--enable-supernode-auth")
        return [*args, "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]

    def register_node(self, key: NodeKey, timeout: float = 60.0) -> None:
        """``flwr supernode register KEY.pub``: admit the SuperNode holding ``key`` (SuperNode authentication)."""
        args = ["flwr", "supernode", "register", str(key.public), CONNECTION]
        done = subprocess.run(args, env=self.env, cwd=self.workdir, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise RuntimeError(f"flwr supernode register {key.public} failed (exit {done.returncode}): {output}")
        log.info("registered SuperNode key %s", key.public)

    def _start_node(self, i: int) -> subprocess.Popen[bytes]:
        node_config = f"partition-id={i} num-partitions={self.num_nodes} {self.node_configs[i]}".strip()
        return self._spawn(f"supernode-{i}", self.supernode_args(node_config, self.node_ports[i], self.node_keys[i]))

    def supernode_args(self, node_config: str, port: int, key: NodeKey | None) -> list[str]:
        """``flower-supernode`` connected to this SuperLink, its Runtime API on 127.0.0.1:``port``; over TLS when the
        deployment has it, signing its requests with ``key`` when one is given."""
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(port)]
        args += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key.private)]
        return [*args, "--node-config", node_config]

    def start_extra_node(self, name: str, node_config: str, key: NodeKey | None = None) -> subprocess.Popen[bytes]:
        """Start one more SuperNode (output in ``logs/NAME.log``; stopped with the deployment), e.g. one whose key
        is not registered."""
        proc = self._spawn(name, self.supernode_args(node_config, free_port(), key))
        self._others.append(proc)
        return proc

    def restart_node(self, i: int) -> subprocess.Popen[bytes]:
        """Start SuperNode ``i`` again, on the Runtime API port it had (after :meth:`kill_node`)."""
        running = self.nodes[i]
        if running is not None:
            raise RuntimeError(f"supernode {i} is still running (pid {running.pid})")
        proc = self._start_node(i)
        self.nodes[i] = proc
        return proc

    def _run_args(self, run_config: Mapping[str, bool | int | float | str]) -> list[str]:
        path = self.workdir / f"run-config-{time.time_ns()}.toml"
        path.write_text("".join(f"{key} = {toml_value(v)}\n" for key, v in run_config.items()))
        return ["flwr", "run", str(self.app_dir), CONNECTION, "--stream", "--run-config", str(path)]

    def submit(
        self, run_config: Mapping[str, bool | int | float | str], name: str = "flwr-run"
    ) -> subprocess.Popen[bytes]:
        """Start ``flwr run --stream`` in the background (output in ``logs/NAME.log``)."""
        proc = self._spawn(name, self._run_args(run_config))
        self._others.append(proc)
        return proc

    def run(
        self, run_config: Mapping[str, bool | int | float | str], timeout: float = 600.0, name: str = "flwr-run"
    ) -> int:
        """``flwr run --stream`` to completion; returns its exit status (raises on time-out, after stopping it)."""
        proc = self.submit(run_config, name)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_processes([proc])
            raise

    def log_text(self, name: str) -> str:
        """The output of a started process so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_node(self, i: int, whole_group: bool = True, reap: bool = True) -> None:
        """Kill SuperNode ``i`` with SIGKILL: with ``whole_group`` everything it started at once (its process
        group), else the SuperNode process only, as a crash or the OOM killer would, and what it started is left to
        stop by itself (it is stopped with the deployment if it does not). ``reap = False`` leaves the dead SuperNode
        a zombie until :meth:`stop`, as under a parent that does not collect its children at once (a shell busy with
        a foreground command, a container's PID 1 that is not an init)."""
        proc = self.nodes[i]
        if proc is None:
            return
        if whole_group:
            signal_group(proc.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            self._killed.append(proc)
        if reap:
            proc.wait(timeout=10.0)
        if whole_group:
            wait_group_gone(proc.pid, timeout=15.0)
        self.nodes[i] = None
        log.info("killed supernode %d (pid %d%s)", i, proc.pid, ", its group" if whole_group else "")

    def pids(self) -> list[int]:
        """PIDs of the processes this deployment started that are still running."""
        procs = [self.superlink, *self.nodes, *self._others]
        return [p.pid for p in procs if p is not None and p.poll() is None]

    def group_members(self, pgid: int) -> list[tuple[int, str]]:
        """``(pid, command line)`` of the live processes (zombies left out) in process group ``pgid``: what a
        SuperNode started and that still runs after it is gone. Linux (``/proc``) only; elsewhere empty."""
        members = []
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    members.append((int(entry.name), cmd))
        return sorted(members)

    def stop(self) -> None:
        """Stop every process started here, by PID (its process group)."""
        procs = [p for p in (*self._others, *self.nodes, *self._killed, self.superlink) if p is not None]
        stop_processes(procs)
        self._others, self.nodes, self._killed, self.superlink = [], [], [], None

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
