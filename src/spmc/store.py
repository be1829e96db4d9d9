"""Run directories (DESIGN.md "Runs are durable"): resolved config, ``metrics.jsonl`` flushed per round, an
atomically written ``summary.json`` and ``checkpoint.pt``, and a lock file that keeps a second writer out.

Locks: ``.lock`` is held (``flock``) by the process that writes the run (``spmc run``, :class:`Simulation`) for
the whole run; ``.sweep.lock`` is held by the ``spmc sweep`` that owns the grid point, so the ``spmc run`` child it
starts can still take ``.lock``. Each lock file holds its holder's PID. The kernel drops a ``flock`` when its
holder dies, so the lock file of a killed process is simply taken over.

Every :class:`OSError` raised here names the path it concerns (``err.filename``), so the CLI can print
``error: <path>: <cause>``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spmc.data.errors import DataError

log = logging.getLogger(__name__)

RUN_LOCK = ".lock"
SWEEP_LOCK = ".sweep.lock"
ERROR_FILE = "error.txt"  # a failed sweep point's error (spmc.sweep.record_outcome)


class RunDirError(DataError):
    """A run directory that cannot be used as asked: locked, or its files do not belong together."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and ±Inf become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@contextlib.contextmanager
def naming_path(path: str | Path) -> Iterator[None]:
    """Re-raise an :class:`OSError` that names no file (a failed ``write``: disk full, ...) with ``path`` set."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno or errno.EIO, err.strerror or str(err), str(path)) from None
        raise


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a resolved configuration (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file; on
    failure the old file is untouched and the temporary file removed."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as :func:`atomic_write_text` does (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming_path(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 is a :class:`DataError` naming it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def recorded_error(run_dir: Path) -> str:
    """The first line of the error a sweep kept in ``run_dir/error.txt`` (at most 200 characters; a hostile file is
    read only in part; anything but a regular file, such as a FIFO, is not opened), or "" when there is none."""
    path = run_dir / ERROR_FILE
    try:
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            lines = f.read(4096).decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[0][:200] if lines else ""


def read_json_file(path: str | Path) -> Any:
    """Parse the JSON file ``path``; malformed or non-UTF-8 content is a one-line :class:`DataError` naming it."""
    path = Path(path)
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A torn last line (a writer killed mid-line: not a JSON object) is
    dropped with a warning; a bad line before it is a :class:`DataError` naming the line."""
    path = Path(path)
    lines = read_text_file(path).split("\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records: list[dict[str, Any]] = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if pos == len(numbered) - 1:
                log.warning("%s: last line is incomplete, dropped", path)
                break
            raise DataError(f"{path}, line {lineno}: not a JSON object ({err})") from None
        records.append(record)
    return records


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``directory/name``, holding the holder's PID.

    Raises:
        RunLockedError: on :meth:`acquire`, when another process (or another lock object) holds it.
    """

    def __init__(self, directory: str | Path, name: str = RUN_LOCK) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.directory}: in use by process {holder} (lock {self.path.name}); wait for it to finish, "
                "or choose another directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            with naming_path(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would let two processes lock two different files)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class RunStore:
    """One run's directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt`` and ``.lock``.

    The directory is created at once (an :class:`OSError` naming it if that fails: permission denied, a file in
    the way); :meth:`lock` takes the writer's lock, which also proves the directory writable."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(self.root))
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.root / "metrics.jsonl"
        self.summary_path = self.root / "summary.json"
        self.config_path = self.root / "config.json"
        self.checkpoint_path = self.root / "checkpoint.pt"
        self._lock = RunLock(self.root)

    def lock(self) -> None:
        """Take the run directory's lock (no-op when held). Raises :class:`RunLockedError`."""
        self._lock.acquire()

    def unlock(self) -> None:
        self._lock.release()

    def write_config(self, config_json: str) -> None:
        atomic_write_text(self.config_path, config_json + "\n")

    def start_metrics(self) -> None:
        """Begin a fresh run: an empty metrics log, and no summary or checkpoint of an earlier run left behind."""
        atomic_write_text(self.metrics_path, "")
        for stale in (self.summary_path, self.checkpoint_path):
            with naming_path(stale):
                stale.unlink(missing_ok=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's record as a JSON line, flushed and synced before returning."""
        with naming_path(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (:func:`read_metrics_file`); none when it does not exist."""
        if not self.metrics_path.exists():
            return []
        return read_metrics_file(self.metrics_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary_path, json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n")

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace the log by ``records``, atomically."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in records))

    def truncate_metrics(self, rounds: int) -> list[dict[str, Any]]:
        """Keep the first ``rounds`` records (those a checkpoint covers), rewriting the log atomically."""
        records = self.read_metrics()[:rounds]
        self.write_metrics(records)
        return records

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` with ``torch.save`` through a temporary file, fsync and rename: a reader sees the old
        checkpoint or the new one, never half of one."""
        tmp = self.checkpoint_path.with_name(f".{self.checkpoint_path.name}.tmp")
        try:
            with naming_path(self.checkpoint_path), open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's payload, None when there is none.

        Raises:
            RunDirError: the file is truncated, corrupt or not a checkpoint dictionary (one line).
        """
        if not self.checkpoint_path.exists():
            return None
        try:
            payload = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as err:  # torch reports corruption as RuntimeError, EOFError, UnpicklingError, ...
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunDirError(f"{self.checkpoint_path}: not a readable checkpoint ({cause})") from None
        if not isinstance(payload, dict):
            raise RunDirError(f"{self.checkpoint_path}: not a checkpoint (holds {type(payload).__name__})")
        return payload
