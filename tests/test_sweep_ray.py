"""spmc sweep --ray: a grid on a local Ray cluster (a head and a worker node, each started with ``ray start``)
completes with a local sweep's metrics even when the worker node is killed mid-run; every process is stopped by
its PID (process group), and nothing of the cluster is left afterwards."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spmc.cluster import LocalCluster, RayOptions, processes_of, write_results
from spmc.config import ConfigError
from spmc.store import SWEEP_LOCK, RunLock
from spmc.sweep import run_sweep

GRID = {
    "base": {"preset": "smoke", "device": "cpu", "threads": 1, "rounds": 2},
    "grid": {"method": [{"defense": "fedavg"}, {"defense": "spmc", "client": "spmc"}], "seed": [0, 1]},
}
TIMING = ("seconds", "train_seconds", "seconds_per_round")


def _results(root: Path) -> dict[str, tuple[dict, list[dict]]]:
    """Per run (``root`` itself when it is one): its summary and metrics records, without wall-clock timings."""
    out = {}
    runs = [root] if (root / "config.json").exists() else sorted(p for p in root.iterdir() if p.is_dir())
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        strip = lambda d: {k: v for k, v in d.items() if k not in TIMING}  # noqa: E731
        out[run.name] = (strip(summary), [strip(r) for r in records])
    return out


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    pytest.importorskip("ray", reason="ray is not installed (pip install spmc[ray])")
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    nodes = LocalCluster([1, 1], temp)
    try:
        nodes.start()
        yield nodes
    finally:
        left = nodes.stop()
        shutil.rmtree(temp, ignore_errors=True)
        assert left == [], f"processes of the cluster still alive: {left}"
        assert processes_of(set(), ancestor=os.getpid()) == [], "a child of the test is still alive"


def _spmc_run_on(node_session: int) -> bool:
    """Whether an ``spmc run`` process is running in the given node's session."""
    for pid in processes_of({node_session}):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"spmc" in cmdline and b"run" in cmdline:
            return True
    return False


@pytest.mark.slow  # ~60-90 s: a two-node cluster and eight smoke runs
def test_ray_sweep_survives_a_killed_worker_node_with_local_metrics(cluster: LocalCluster, tmp_path: Path) -> None:
    import threading

    worker = cluster.nodes[1].pid
    killed: list[bool] = []

    def kill_worker_mid_run() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if _spmc_run_on(worker):
                cluster.kill_node(1)
                killed.append(True)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_worker_mid_run)
    killer.start()
    outcomes = run_sweep(GRID, tmp_path / "ray", ray=RayOptions(cluster.address, cpus_per_run=1))
    killer.join()
    assert killed == [True], "the worker node never ran a point"
    assert sorted(o.status for o in outcomes) == ["done"] * 4, [(o.run.name, o.status, o.error) for o in outcomes]
    local = run_sweep(GRID, tmp_path / "local", jobs=1)
    assert sorted(o.status for o in local) == ["done"] * 4
    ray_results, local_results = _results(tmp_path / "ray"), _results(tmp_path / "local")
    assert sorted(ray_results) == ["fedavg_seed0", "fedavg_seed1", "spmc-spmc_seed0", "spmc-spmc_seed1"]
    assert ray_results == local_results
    for name in ray_results:  # the whole run directory came back, and a second sweep skips every point
        assert (tmp_path / "ray" / name / "checkpoint.pt").is_file()
    again = run_sweep(GRID, tmp_path / "ray", ray=RayOptions(cluster.address))
    assert {o.status for o in again} == {"skipped"}


@pytest.mark.slow
def test_ray_sweep_resumes_an_interrupted_point_from_the_drivers_files(cluster: LocalCluster, tmp_path: Path) -> None:
    grid = {"base": GRID["base"], "grid": {"seed": [0]}}
    local = tmp_path / "local"
    run_sweep(grid, local, jobs=1)
    ray_root = tmp_path / "ray"
    shutil.copytree(local, ray_root)
    (ray_root / "seed0" / "summary.json").unlink()  # interrupted after its last checkpoint
    (ray_root / "seed1").mkdir()
    with RunLock(ray_root / "seed1", SWEEP_LOCK):  # another sweep runs this point
        resumed, busy = run_sweep({**grid, "grid": {"seed": [0, 1]}}, ray_root, ray=RayOptions(cluster.address))
    assert resumed.status == "resumed", resumed.error
    assert busy.status == "busy" and "in use by process" in busy.error
    assert not (ray_root / "seed1" / "config.json").exists()
    assert _results(ray_root / "seed0") == _results(local / "seed0")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"cpus_per_run": 0}, "--cpus-per-run: got 0; must be an integer >= 1"),
        ({"cpus_per_run": True}, "--cpus-per-run: got True"),
        ({"gpus_per_run": -1.0}, "--gpus-per-run: got -1.0; must be a number >= 0"),
        ({"gpus_per_run": float("nan")}, "--gpus-per-run: got nan"),
        ({"address": " "}, "--ray: got ' '"),
    ],
)
def test_ray_options_are_checked(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        RayOptions(**kwargs)


@pytest.mark.parametrize(
    "files",
    [
        {"../evil": b"x"},
        {"summary.json": "not bytes"},
        {".lock": b""},
        ["summary.json"],
    ],
)
def test_a_tasks_files_never_leave_the_run_directory(tmp_path: Path, files: object) -> None:
    with pytest.raises(ValueError, match="ray task"):
        write_results(tmp_path / "run", files)
    assert list(tmp_path.iterdir()) == []


def test_a_tasks_files_are_written_into_the_run_directory(tmp_path: Path) -> None:
    write_results(tmp_path, {"summary.json": b'{"A": 1}', "metrics.jsonl": b"", "config.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]
    assert (tmp_path / "summary.json").read_bytes() == b'{"A": 1}'


def test_sweep_and_matrix_help_show_ray(capsys: pytest.CaptureFixture[str]) -> None:
    from spmc.cli import main

    for command in ("sweep", "matrix"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--ray [ADDRESS]" in text and "--cpus-per-run" in text


def test_a_worker_runs_the_task_without_importing_spmc(tmp_path: Path) -> None:
    """The task is pickled by value: it loads in a process where spmc cannot be imported, so a Ray worker does not
    spend seconds importing torch before the point's ``spmc run`` starts."""
    import subprocess
    import sys

    import ray.cloudpickle

    from spmc.cluster import pickle_tasks_by_value
    from spmc.raytask import execute_point

    pickle_tasks_by_value()
    (tmp_path / "task.pkl").write_bytes(ray.cloudpickle.dumps(execute_point))
    code = (
        "import pickle, sys; sys.modules['spmc'] = None; "
        f"f = pickle.loads(open({str(tmp_path / 'task.pkl')!r}, 'rb').read()); "
        "print(f.__name__, sorted(m for m in ('torch', 'spmc.config') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "execute_point []"
