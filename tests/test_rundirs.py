"""Run directories against hostile input (issue 11, part 4): one writer at a time, resume checks what it reads,
children die with their sweep, and every expected error is one line without a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spmc.federation
import spmc.store
from spmc import make_experiment
from spmc.cli import main
from spmc.config import ConfigError, Experiment
from spmc.data import DataError, load_dataset
from spmc.report.gradcam import load_test_images
from spmc.simulation import Simulation, load_run_config
from spmc.store import SWEEP_LOCK, RunLock, RunLockedError, RunStore, config_hash, read_metrics_file
from spmc.sweep import child_error, run_sweep

SMALL = {"synthetic_train_size": 400, "synthetic_test_size": 50, "device": "cpu"}


def smoke(**update: object) -> Experiment:
    return make_experiment(
        dataset="synthetic", rounds=3, num_clients=4, gamma=0.25, baseline_local_epochs=1, **{**SMALL, **update}
    )


def fake_run(root: Path, name: str, seed: int = 0, gamma: float = 0.2, A: float | None = 80.0) -> None:
    """A finished run's config.json and summary.json (what ``spmc table`` reads), R = 10."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(make_experiment(dataset="fmnist", gamma=gamma, seed=seed).to_json())
    summary = {"A": A, "R": 10.0, "V": None if A is None else (A + 10.0) / 2, "last_k": 5, "rounds": 6}
    summary.update(dataset="fmnist", defense="fedavg", client="plain", gamma=gamma, seed=seed)
    (run / "summary.json").write_text(json.dumps(summary))


def _stop_after_round_1(record: dict) -> None:
    if record["round"] == 1:
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``full``: a finished 3-round run; ``cut``: the same run stopped after round 1 (checkpoint at round 2)."""
    root = tmp_path_factory.mktemp("runs")
    Simulation(smoke(), root / "full").run()
    with pytest.raises(KeyboardInterrupt):
        Simulation(smoke(), root / "cut").run(_stop_after_round_1)
    return {"full": root / "full", "cut": root / "cut"}


@pytest.fixture
def cut(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the interrupted run."""
    return Path(shutil.copytree(runs["cut"], tmp_path / "cut"))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------- locks


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = RunStore(tmp_path / "run")
    holder.lock()
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data loaded before the run directory was locked")

    monkeypatch.setattr(spmc.federation, "build_federated_data", no_data)
    with pytest.raises(RunLockedError):
        Simulation(smoke(), tmp_path / "run")
    holder.unlock()
    assert RunLock(tmp_path / "run").acquire().held


def test_cli_run_on_a_locked_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        assert main(["run", "-p", "smoke", "-q", "--out", str(tmp_path / "run")]) == 2
    assert f"in use by process {os.getpid()}" in _one_error_line(capsys)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, time
        from spmc.store import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"process {child.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert (tmp_path / ".lock").read_text().strip() == str(child.pid)  # the stale file is still there
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------------------------------------------ resume


def test_resume_tolerates_a_torn_last_line(runs: dict[str, Path], cut: Path) -> None:
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "accura')
    resumed = Simulation(load_run_config(cut), cut).run(resume=True)
    reference = read_metrics_file(runs["full"] / "metrics.jsonl")
    assert [r["round"] for r in read_metrics_file(cut / "metrics.jsonl")] == [0, 1, 2]
    assert [r["accuracy"] for r in resumed.records] == [r["accuracy"] for r in reference]


def test_read_metrics_drops_only_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert read_metrics_file(path) == [{"round": 0}, {"round": 1}]
    path.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(DataError, match="line 2"):
        read_metrics_file(path)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=5), st.data())
def test_a_log_cut_anywhere_reads_as_a_prefix(values: list[float], data: st.DataObject) -> None:
    """A writer killed mid-write leaves a byte prefix of the log: it reads as a prefix of the records."""
    records = [{"round": t, "accuracy": v} for t, v in enumerate(values)]
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    cut = data.draw(st.integers(0, len(text)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        path.write_bytes(text[:cut])
        got = read_metrics_file(path)
    assert got == records[: len(got)] and len(got) >= text[:cut].count(b"\n")


def test_resume_refuses_a_hole_before_the_checkpoint(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(runs["full"], tmp_path / "run"))
    (run / "summary.json").unlink()
    first = (run / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(first + "\n")
    assert main(["run", "--resume", str(run), "-q"]) == 2
    assert "needs rounds 0..2" in _one_error_line(capsys)
    assert not (run / "summary.json").exists()
    assert (run / "metrics.jsonl").read_text() == first + "\n"  # nothing rewritten


@pytest.mark.parametrize("edit", ["num_clients", "seed"])
def test_resume_refuses_a_checkpoint_of_another_configuration(cut: Path, edit: str, capsys) -> None:
    config = json.loads((cut / "config.json").read_text())
    config[edit] += 1
    (cut / "config.json").write_text(json.dumps(config))
    assert main(["run", "--resume", str(cut), "-q"]) == 2
    assert "written under another configuration" in _one_error_line(capsys)


def test_checkpoint_holds_the_hash_of_the_stored_config(cut: Path) -> None:
    payload = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert payload["config_hash"] == config_hash(load_run_config(cut).model_dump(mode="json"))


def test_resume_refuses_a_truncated_checkpoint(cut: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (cut / "checkpoint.pt").read_bytes()
    (cut / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert main(["run", "--resume", str(cut), "-q"]) == 2
    assert "checkpoint.pt: not a readable checkpoint" in _one_error_line(capsys)


def test_resume_refuses_a_forged_checkpoint(cut: Path) -> None:
    payload = torch.load(cut / "checkpoint.pt", weights_only=True)
    payload["teachers"]["7"] = payload["teachers"].pop("3")
    torch.save(payload, cut / "checkpoint.pt")
    with pytest.raises(spmc.store.RunDirError, match="does not fit this run"):
        Simulation(load_run_config(cut), cut).run(resume=True)


def test_non_utf8_config_is_one_line(cut: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cut / "config.json").write_bytes(b'{"seed": "\xff"}')
    assert main(["run", "--resume", str(cut), "-q"]) == 2
    assert "config.json: not UTF-8 text" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------------- I/O errors


def test_out_that_is_a_file_fails_before_data_loading(tmp_path: Path, monkeypatch, capsys) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data loaded before the run directory was checked")

    monkeypatch.setattr(spmc.federation, "build_federated_data", no_data)
    (tmp_path / "file").write_text("x")
    assert main(["run", "-p", "smoke", "-q", "--out", str(tmp_path / "file")]) == 1
    assert _one_error_line(capsys) == f"error: {tmp_path / 'file'}: exists and is not a directory"
    assert main(["run", "-p", "smoke", "-q", "--out", str(tmp_path / "file" / "sub")]) == 1
    assert _one_error_line(capsys) == f"error: {tmp_path / 'file' / 'sub'}: Not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main(["run", "-p", "smoke", "-q", "--out", str(tmp_path / "ro" / "run")]) == 1
    assert "Permission denied" in _one_error_line(capsys)


def test_disk_full_is_one_line_and_keeps_what_was_written(tmp_path: Path, monkeypatch, capsys) -> None:
    real_fsync = os.fsync
    appended = []

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/metrics.jsonl"):
            appended.append(fd)
            if len(appended) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(spmc.store.os, "fsync", fsync)
    out = tmp_path / "run"
    args = ["run", "-p", "smoke", "-q", "--out", str(out), "--rounds", "3"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    assert main(args) == 1
    assert _one_error_line(capsys) == f"error: {out / 'metrics.jsonl'}: No space left on device"
    assert [r["round"] for r in read_metrics_file(out / "metrics.jsonl")][0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1
    assert load_run_config(out).num_clients == 4


def test_messages_keep_brackets_and_verbose_adds_the_traceback(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "x[bold]y")
    assert main(["run", "--resume", missing]) == 2
    assert missing in _one_error_line(capsys)
    assert main(["-v", "run", "--resume", missing]) == 2
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ reports and data


def test_table_shows_a_null_metric_blank(tmp_path: Path) -> None:
    from spmc.report import build_table, load_runs, render_markdown

    fake_run(tmp_path, "a", seed=0, A=80.0)
    fake_run(tmp_path, "b", seed=1, A=None)
    fake_run(tmp_path, "c", seed=0, gamma=0.3, A=None)
    table = build_table(load_runs([tmp_path]))
    mixed, empty = table.cell(table.rows[0], 0.2, "FashionMNIST"), table.cell(table.rows[0], 0.3, "FashionMNIST")
    assert mixed is not None and (mixed.stats["A"].mean, mixed.stats["A"].n) == (80.0, 1)
    assert empty is not None and empty.stats["A"].mean is None
    assert "| FedAvg |  | 10.00 |" in render_markdown(table)


def test_empty_test_set_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import spmc.data.datasets as datasets

    real = datasets.make_synthetic

    def no_test_images(*args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        train_x, train_y, test_x, test_y = real(*args, **kwargs)
        return train_x, train_y, test_x[:0], test_y[:0]

    monkeypatch.setattr(datasets, "make_synthetic", no_test_images)
    with pytest.raises(DataError, match="test set has no images"):
        load_dataset("synthetic", synthetic_size=(100, 20))


def test_gradcam_images_are_bounded_by_the_test_set() -> None:
    with pytest.raises(ConfigError, match="images: got 100000; .* at most"):
        load_test_images(smoke(), count=100_000)


# ----------------------------------------------------------------------------------------------------- sweeps


def test_a_point_locked_by_another_sweep_is_busy(tmp_path: Path) -> None:
    spec = {"base": {"dataset": "synthetic", "rounds": 1, "num_clients": 4, **SMALL}, "grid": {"seed": [0]}}
    (tmp_path / "seed0").mkdir()
    with RunLock(tmp_path / "seed0", SWEEP_LOCK):
        (outcome,) = run_sweep(spec, tmp_path)
    assert outcome.status == "busy" and f"process {os.getpid()}" in outcome.error
    assert not (tmp_path / "seed0" / "metrics.jsonl").exists()


def test_a_failed_point_keeps_its_error_until_it_finishes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A point whose run fails (here: a torn checkpoint left by a killed run) records the one-line error in its
    folder's error.txt, which `spmc table` quotes when it leaves the folder out; the file goes once the point runs."""
    spec = {"base": {"dataset": "synthetic", "rounds": 1, "num_clients": 4, **SMALL}, "grid": {"seed": [0]}}
    point = tmp_path / "seed0"
    point.mkdir()
    (point / "config.json").write_text("{")
    (point / "checkpoint.pt").write_bytes(b"torn")
    (outcome,) = run_sweep(spec, tmp_path)
    assert outcome.status == "failed" and outcome.error
    assert (point / "error.txt").read_text() == outcome.error + "\n"
    assert main(["table", str(tmp_path)]) == 2
    assert f"{point} (failed: {outcome.error.splitlines()[0]})" in caplog.text
    with RunLock(point, SWEEP_LOCK):
        (busy,) = run_sweep(spec, tmp_path)
    assert busy.status == "busy" and (point / "error.txt").exists()  # another process owns the point
    (point / "checkpoint.pt").unlink()
    (point / "config.json").unlink()
    (done,) = run_sweep(spec, tmp_path)
    assert done.status == "done" and not (point / "error.txt").exists()


def test_child_error_is_the_one_line_message() -> None:
    stderr = "WARNING something\nerror: /r/checkpoint.pt: not a readable checkpoint (EOF)\n"
    assert child_error(stderr, "", 2) == "/r/checkpoint.pt: not a readable checkpoint (EOF)"
    assert child_error("", "", -9) == "killed by signal 9"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_killed_sweep_takes_its_child_along(tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    base = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL.items())
    grid.write_text(f'[base]\ndataset = "synthetic"\nrounds = 100000\nnum_clients = 4\n{base}\n[grid]\nseed = [0]\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "spmc", "sweep", str(grid), "--out", str(tmp_path / "out")]
    sweep = subprocess.Popen(cmd, env=env)
    lock = tmp_path / "out" / "seed0" / ".lock"
    child = 0
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not child:
            text = lock.read_text().strip() if lock.exists() else ""
            child = int(text) if text.isdigit() and int(text) != sweep.pid else 0
            time.sleep(0.05)
        assert child and _alive(child)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait(timeout=30)
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_error_line_joins_a_multi_line_message() -> None:
    from spmc.cli import error_line
    from spmc.config import ConfigError

    assert error_line(ConfigError("invalid configuration:\n  lr: bad\n  seed: bad")) == (
        "invalid configuration: lr: bad; seed: bad"
    )
    assert error_line(OSError(28, "No space left on device", "/r/metrics.jsonl")) == (
        "/r/metrics.jsonl: No space left on device"
    )
