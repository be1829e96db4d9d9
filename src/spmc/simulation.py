"""The round loop of spec §1.5 with stable client ids, deterministic for a given seed.

```
θ_g ← θ^0 ; teacher_k ← θ^0
for t in 0..T-1:
    S_t ← participants (all clients at participation 1.0)
    θ_k ← LocalTrain_k(θ_g [, teacher_k])          client = plain | spmc (malicious clients: per threat model)
    θ_k^clean ← LocalTrain_k(θ_g) on clean data    attackers of an attack round, attacker_knowledge = partial
    crafting: the update attack rewrites the attackers' θ_k (ATTACKS.md §A2.3)
    update guard: reject mis-sized, non-finite or absurd states (spmc.guard)
    θ_g, α ← defense.aggregate(...)                 defense = fedavg | spmc | ...
    teacher_k ← Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j       (spec §4.1; only when the spmc client is used)
    A_t, ASR_t ← evaluate θ_g
```
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spmc.config import ConfigError, Experiment, build_defense, load_run_json, make_experiment, optim_config
from spmc.federation import (
    SEED_CLIENT,
    SEED_PARTICIPATION,
    SEED_POISON,
    SEED_SERVER,
    SEED_STATIC_AUG,
    SEED_TEST,
    Engine,
    FederatedData,
    Federation,
    build_federated_data,
    derive_seed,
    evaluate_state,
    make_server_data,
    resolve_device,
    update_guard,
)
from spmc.guard import InvalidUpdateError, describe_refusals
from spmc.metrics import FinalMetrics, final_metrics
from spmc.server import ServerCore, coalition_teachers, sample_participants
from spmc.store import RunDirError, RunStore, config_hash
from spmc.training import ClientTask

__all__ = [
    "RECORD_METRICS",
    "SEED_CLIENT",
    "SEED_PARTICIPATION",
    "SEED_POISON",
    "SEED_SERVER",
    "SEED_STATIC_AUG",
    "SEED_TEST",
    "FederatedData",
    "InvalidUpdateError",
    "RunResult",
    "Simulation",
    "build_federated_data",
    "coalition_teachers",
    "derive_seed",
    "evaluate_state",
    "load_run_config",
    "make_server_data",
    "optim_config",
    "resolve_device",
    "run_experiment",
    "update_guard",
]

log = logging.getLogger(__name__)

#: The metrics of a round record that the summary reads (a resumed log must hold them).
RECORD_METRICS: tuple[str, ...] = ("accuracy", "asr", "asr_all", "asr_excl_target", "seconds")


def _is_metric(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _rounds_text(rounds: Sequence[Any]) -> str:
    """A short list of round numbers for a message: the first few and the count."""
    if not rounds:
        return "(none)"
    head = ", ".join(map(str, rounds[:6]))
    return f"[{head}{', ...' if len(rounds) > 6 else ''}] ({len(rounds)} records)"


@dataclass
class RunResult:
    """What a finished run returns: the per-round records, the final metrics and the global state."""

    records: list[dict[str, Any]]
    final: FinalMetrics
    summary: dict[str, Any]
    global_state: torch.Tensor
    out_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Simulation:
    """One federated experiment: the :class:`Federation`, the engine, the :class:`ServerCore` and the round loop."""

    def __init__(self, cfg: Experiment, out_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.store = RunStore(out_dir) if out_dir is not None else None
        if self.store is not None:
            self.store.lock()  # created, writable and ours before any data is loaded
        self.federation = Federation.build(cfg)
        self.device = self.federation.device
        self.data = self.federation.data
        self.model = self.federation.model
        self.layout = self.federation.layout
        self.defense = build_defense(cfg)
        self.server_data = self.federation.server_data()
        self.engine: Engine = self.federation.engine()
        initial = self.federation.initial_state
        self.core = ServerCore(
            self.defense,
            self.layout,
            initial,
            guard=update_guard(cfg),
            on_invalid_update=cfg.on_invalid_update,
            server_data=self.server_data,
            learns_from_teacher=lambda k: self.method_for(k) == "spmc",
            teachers=dict.fromkeys(range(cfg.num_clients), initial),
            crafter=self.federation.crafter(),
        )

    @property
    def global_state(self) -> torch.Tensor:
        """θ_g, held by the server core."""
        return self.core.global_state

    @global_state.setter
    def global_state(self, state: torch.Tensor) -> None:
        self.core.global_state = state

    @property
    def teachers(self) -> dict[int, torch.Tensor]:
        """teacher_k of every client, held by the server core."""
        return self.core.teachers

    @teachers.setter
    def teachers(self, teachers: dict[int, torch.Tensor]) -> None:
        self.core.teachers = teachers

    def participants(self, t: int) -> list[int]:
        """S_t: every client at participation 1.0, else a seeded sample of ⌈pK⌉ ids, sorted (D2, D34)."""
        return sample_participants(range(self.cfg.num_clients), self.cfg.participation, self.cfg.seed, t)

    def method_for(self, client_id: int) -> str:
        """The client procedure (:meth:`spmc.federation.Federation.method_for`)."""
        return self.federation.method_for(client_id)

    def tasks(self, t: int, ids: list[int]) -> list[ClientTask]:
        return [self.federation.task(t, k, self.teachers[k]) for k in ids]

    def evaluate(self, state: torch.Tensor | None = None) -> dict[str, float]:
        """:func:`evaluate_state` of ``state`` (default: the global model)."""
        return self.federation.evaluate(self.global_state if state is None else state)

    def run_round(self, t: int) -> dict[str, Any]:
        """Train, aggregate (:meth:`ServerCore.step`) and evaluate round ``t``; returns its metrics record."""
        started = time.perf_counter()
        ids = self.participants(t)
        self.federation.prepare_round(t, self.global_state, ids)
        # attacker_knowledge = partial: the attackers' clean shadows are extra rows of the same round (one batch on
        # the batched engine); their states go to the crafting step only, never to the guard, defense or record.
        shadow_ids = self.federation.shadow_ids(t, ids)
        shadow_tasks = [self.federation.shadow_task(t, k, self.teachers[k]) for k in shadow_ids]
        trained = self.engine.train_round(self.global_state, self.tasks(t, ids) + shadow_tasks)
        results = trained[: len(ids)]
        shadows = {r.client_id: r.state for r in trained[len(ids) :]} if shadow_tasks else None
        counts = [float(self.data.num_samples[k]) for k in ids]
        outcome = self.core.step(t, [r.state for r in results], ids, counts, shadows)
        if outcome.aggregate is None:
            raise InvalidUpdateError(
                f"round {t}: the update guard refused every client state ({describe_refusals(outcome.refused)}); "
                "the global model is unchanged"
            )
        train_seconds = time.perf_counter() - started
        record: dict[str, Any] = {"round": t, **self.evaluate(outcome.aggregate.eval_state)}
        losses = [r.mean_loss for r in results if math.isfinite(r.mean_loss)]
        epochs = self.cfg.local_epochs(self.cfg.client)
        record.update(
            train_loss=float(np.mean(losses)) if losses else math.nan,
            client_loss={str(r.client_id): r.mean_loss for r in results},
            participants=ids,
            rejected=[k for k in ids if k not in outcome.kept_ids],
            invalid={str(k): p for k, p in outcome.refused.items()},
            train_seconds=train_seconds,
            seconds=time.perf_counter() - started,
            samples=sum(
                min(r.steps * self.cfg.batch_size, epochs * self.data.num_samples[r.client_id]) for r in results
            ),
            **outcome.record(self.data.malicious),
        )
        return record

    def summary(self, records: list[dict[str, Any]]) -> tuple[FinalMetrics, dict[str, Any]]:
        acc = [r["accuracy"] for r in records]
        kind = self.federation.attack.kind
        targeted = kind != "untargeted"
        final = final_metrics(acc, [r["asr"] for r in records], self.cfg.report_last_k, targeted)
        other_key = "asr_all" if self.cfg.asr_exclude_target_class else "asr_excl_target"
        other = final_metrics(acc, [r[other_key] for r in records], self.cfg.report_last_k, targeted)
        summary = {
            **final.as_dict(),
            "R_" + ("all" if self.cfg.asr_exclude_target_class else "excl_target"): other.R,
            "attack_kind": kind,
            "rounds": len(records),
            "rejected_updates": sum(len(r.get("rejected", [])) for r in records),
            "dataset": self.cfg.dataset,
            "defense": self.cfg.defense,
            "client": self.cfg.client,
            "gamma": self.cfg.gamma,
            "seed": self.cfg.seed,
            "malicious_ids": list(self.data.malicious),
            "num_samples": {str(k): n for k, n in self.data.num_samples.items()},
            "seconds_per_round": float(np.mean([r["seconds"] for r in records])),
            "engine": self.engine.name,
            "kernel": self.engine.kernel,
            "device": str(self.device),
        }
        return final, summary

    def checkpoint(self, next_round: int) -> dict[str, Any]:
        """Everything needed to continue at ``next_round`` (:meth:`ServerCore.checkpoint`, the Flower format),
        with the attacks' state across rounds (:meth:`spmc.attacks.AttackPlan.state_dict`) when they keep one."""
        attack_state = self.federation.attack.state_dict()
        extra = {"attack_state": attack_state} if attack_state else {}
        return self.core.checkpoint(next_round, self.config_hash, **extra)

    @property
    def config_hash(self) -> str:
        """sha256 of the resolved configuration's canonical JSON (:func:`spmc.store.config_hash`)."""
        return config_hash(self.cfg.model_dump(mode="json"))

    def restore(self, payload: dict[str, Any]) -> int:
        """Load a :meth:`checkpoint`; returns the round to continue from.

        Raises:
            RunDirError: the checkpoint was written under another configuration (its config hash differs), or its
                entries do not fit this run (round, state size, client ids).
        """
        where = str(self.store.checkpoint_path) if self.store is not None else "checkpoint"
        rounds = self.core.restore(
            payload,
            self.config_hash,
            where=where,
            max_round=self.cfg.rounds,
            teacher_ids=range(self.cfg.num_clients),
        )
        try:
            self.federation.attack.load_state_dict(payload.get("attack_state") or {})
        except (ValueError, TypeError, AttributeError, RuntimeError) as err:
            raise RunDirError(f"{where}: does not fit this run ({type(err).__name__}: {err})") from None
        return rounds

    def resume_records(self, next_round: int) -> list[dict[str, Any]]:
        """The records of rounds 0..next_round-1 from ``metrics.jsonl`` (a torn last line dropped, later rounds
        discarded to be recomputed), rewritten atomically. A hole before the checkpoint is refused, never
        summarised: the checkpoint cannot recompute rounds before it.

        Raises:
            RunDirError: the log does not hold exactly rounds 0..next_round-1 first, or a record lacks a metric.
        """
        assert self.store is not None
        path = self.store.metrics_path
        records = self.store.read_metrics()[:next_round]
        rounds = [r.get("round") for r in records]
        if rounds != list(range(next_round)):
            raise RunDirError(
                f"{path}: starts with rounds {_rounds_text(rounds)}, but the checkpoint is at round {next_round} "
                f"and needs rounds 0..{next_round - 1}; remove checkpoint.pt to run afresh"
            )
        for r in records:
            bad = [k for k in RECORD_METRICS if not _is_metric(r.get(k, "missing"))]
            if bad:
                raise RunDirError(f"{path}, round {r['round']}: {', '.join(bad)} missing or not a number")
            r.update({k: math.nan for k in RECORD_METRICS if r[k] is None})
        self.store.write_metrics(records)
        return records

    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None, resume: bool = False) -> RunResult:
        """Run every round, writing each record to the run directory as soon as it exists and a checkpoint every
        ``checkpoint_every`` rounds. ``resume`` continues from the directory's checkpoint (records after it are
        recomputed), giving the same metrics as an uninterrupted run. The run directory stays locked throughout."""
        if self.store is not None:
            self.store.lock()
        try:
            return self._run(on_round, resume)
        finally:
            if self.store is not None:
                self.store.unlock()

    def _run(self, on_round: Callable[[dict[str, Any]], None] | None, resume: bool) -> RunResult:
        records: list[dict[str, Any]] = []
        start = 0
        payload = self.store.load_checkpoint() if (resume and self.store is not None) else None
        if self.store is not None and payload is not None:
            start = self.restore(payload)
            records = self.resume_records(start)
            log.info("resuming %s at round %d", self.store.root, start)
        elif self.store is not None:
            self.store.write_config(self.cfg.to_json())
            self.store.start_metrics()
        every = self.cfg.checkpoint_every
        for t in range(start, self.cfg.rounds):
            record = self.run_round(t)
            records.append(record)
            if self.store is not None:
                self.store.append_metrics(record)
                if every and ((t + 1) % every == 0 or t + 1 == self.cfg.rounds):
                    self.store.save_checkpoint(self.checkpoint(t + 1))
            if on_round is not None:
                on_round(record)
            log.info("round %d: A=%.2f ASR=%.2f (%.1fs)", t, record["accuracy"], record["asr"], record["seconds"])
        final, summary = self.summary(records)
        if self.store is not None:
            self.store.write_summary(summary)
        return RunResult(
            records, final, summary, self.global_state, self.store.root if self.store is not None else None
        )


def run_experiment(
    cfg: Experiment,
    out_dir: str | Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> RunResult:
    """Build and run one experiment (``resume``: continue from ``out_dir``'s checkpoint if there is one)."""
    return Simulation(cfg, out_dir).run(on_round, resume)


def load_run_config(run_dir: str | Path) -> Experiment:
    """The resolved configuration stored in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"resume: {str(run_dir)!r} has no config.json; is it a run directory?")
    return make_experiment(**load_run_json(path))
