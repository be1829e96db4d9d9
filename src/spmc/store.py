"""Run directories (DESIGN.md "Runs are durable"): resolved config, ``metrics.jsonl`` flushed per round, and an
atomically written ``summary.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and ±Inf become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStore:
    """One run's directory: ``config.json``, ``metrics.jsonl`` and ``summary.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.root / "metrics.jsonl"
        self.summary_path = self.root / "summary.json"
        self.config_path = self.root / "config.json"
        self.checkpoint_path = self.root / "checkpoint.pt"

    def write_config(self, config_json: str) -> None:
        atomic_write_text(self.config_path, config_json + "\n")

    def start_metrics(self) -> None:
        """Begin a fresh metrics log (an existing one is replaced)."""
        self.metrics_path.write_text("")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's record as a JSON line, flushed and synced before returning."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary_path, json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n")

    def truncate_metrics(self, rounds: int) -> list[dict[str, Any]]:
        """Keep the first ``rounds`` records (those a checkpoint covers), rewriting the log atomically."""
        records = self.read_metrics()[:rounds]
        atomic_write_text(self.metrics_path, "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in records))
        return records

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` with ``torch.save`` through a temporary file, fsync and rename: a reader sees the old
        checkpoint or the new one, never half of one."""
        tmp = self.checkpoint_path.with_name(f".{self.checkpoint_path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

