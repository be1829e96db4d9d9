"""The round loop of spec §1.5 with stable client ids, deterministic for a given seed.

```
θ_g ← θ^0 ; teacher_k ← θ^0
for t in 0..T-1:
    S_t ← participants (all clients at participation 1.0)
    θ_k ← LocalTrain_k(θ_g [, teacher_k])          client = plain | spmc (malicious clients: per threat model)
    update guard: reject mis-sized, non-finite or absurd states (spmc.guard)
    θ_g, α ← defense.aggregate(...)                 defense = fedavg | spmc | ...
    teacher_k ← Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j       (spec §4.1; only when the spmc client is used)
    A_t, ASR_t ← evaluate θ_g
```
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spmc import batched
from spmc.attacks.backdoor import backdoor_test_set, poison_batch, poison_mask, trigger_values
from spmc.batched import BatchedEngine
from spmc.config import ConfigError, Experiment, build_defense, make_experiment, optim_config
from spmc.data import (
    DATASETS,
    DatasetInfo,
    Preprocessor,
    dirichlet_partition,
    load_dataset,
    server_split,
    to_unit_float,
)
from spmc.data.strong_aug import strong_augment
from spmc.defenses import Aggregate, RoundInputs, marginal_teachers, weighted_average
from spmc.defenses.server_data import ServerData
from spmc.guard import InvalidUpdateError, UpdateGuard, finalise_global, guard_states
from spmc.metrics import FinalMetrics, detection_scores, final_metrics
from spmc.models import build_model
from spmc.params import ParamLayout
from spmc.store import RunDirError, RunStore, config_hash, read_json_file
from spmc.training import ClientData, ClientTask, SequentialEngine, accuracy

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (experiment seed, purpose, round, client id), independent of visiting order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


# Purposes for derive_seed, so that streams never collide (public: the Flower apps derive the same streams).
SEED_POISON, SEED_STATIC_AUG, SEED_CLIENT, SEED_PARTICIPATION, SEED_TEST, SEED_SERVER = 1, 2, 3, 4, 5, 6


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


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error naming the field."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: got 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


@dataclass
class FederatedData:
    """Everything the round loop reads: client data, sample counts, evaluation sets (all on the run's device)."""

    info: DatasetInfo
    clients: dict[int, ClientData]
    num_samples: dict[int, int]
    malicious: tuple[int, ...]
    test_x: torch.Tensor
    test_y: torch.Tensor
    backdoor_x: torch.Tensor
    backdoor_y: torch.Tensor
    backdoor_not_target: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def build_federated_data(
    cfg: Experiment, device: torch.device, malicious: Sequence[int] | None = None
) -> FederatedData:
    """Load, split (spec §1.2), partition (Dirichlet), poison the malicious clients (spec §2) and build test sets.

    ``malicious`` overrides the last-⌊γK⌋ rule (a Flower node configured as malicious, for instance)."""
    info = DATASETS[cfg.dataset]
    raw = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        synthetic_size=(cfg.synthetic_train_size, cfg.synthetic_test_size),
        seed=cfg.seed,
    )
    pre = Preprocessor(info)
    train01 = to_unit_float(raw.train_images).to(device)
    labels = raw.train_labels.to(device)
    pool, val = server_split(int(labels.shape[0]), cfg.val_fraction)
    parts = dirichlet_partition(
        raw.train_labels[torch.as_tensor(pool)].numpy(), cfg.num_clients, cfg.beta, cfg.min_client_size, cfg.seed
    )
    malicious = cfg.malicious_ids if malicious is None else tuple(sorted(malicious))
    values = trigger_values(cfg.trigger_space, info.mean, info.std, cfg.trigger_channels)
    attack_kw: dict[str, Any] = {
        "attack": cfg.attack,
        "values": values,
        "target": cfg.target_label,
        "noise_std": cfg.semantic_noise_std,
    }
    poisoned = (
        poison_mask(
            raw.train_labels,
            cfg.poison_rate,
            torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_POISON)),
            cfg.attack,
            cfg.semantic_source_label,
        ).to(device)
        if malicious
        else None
    )

    def benign(
        x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pre.train(x, g, grey_view=True), y  # never written into: a stride-0 view is safe

    clients: dict[int, ClientData] = {}
    for k, part in enumerate(parts):
        idx = torch.as_tensor(pool[part], dtype=torch.long, device=device)
        x, y = train01[idx], labels[idx]
        if k not in malicious or poisoned is None:
            clients[k] = ClientData(x, y, transform=benign)
            continue
        mask = poisoned[idx]
        if cfg.poison_static_aug:
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_STATIC_AUG, k))
            xs, ys = poison_batch(pre.train(x, gen), y, mask, generator=gen, **attack_kw)
            clients[k] = ClientData(xs.contiguous(), ys, final=True)
        else:

            def on_the_fly(
                xb: torch.Tensor, yb: torch.Tensor, ib: torch.Tensor, g: torch.Generator, mask: torch.Tensor = mask
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return poison_batch(pre.train(xb, g), yb, mask[ib], generator=g, **attack_kw)

            clients[k] = ClientData(x, y, transform=on_the_fly)
    num_samples = {k: len(d) for k, d in clients.items()}
    small = {k: n for k, n in num_samples.items() if n < cfg.batch_size}
    if small and cfg.drop_last:
        log.warning("clients with fewer samples than one batch take no step (spec D30): %s", small)
    log.info("client sizes n_k: %s; malicious ids: %s", num_samples, list(malicious))

    test_x = pre.test(to_unit_float(raw.test_images).to(device))
    test_y = raw.test_labels.to(device)
    bd_attack = "base" if cfg.attack == "none" else cfg.attack
    bd_x, bd_y, bd_not_target = backdoor_test_set(
        test_x,
        test_y,
        attack=bd_attack,
        values=values,
        target=cfg.target_label,
        source_label=cfg.semantic_source_label,
        noise_std=cfg.semantic_noise_std,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_TEST)),
    )
    val_idx = torch.as_tensor(val, dtype=torch.long, device=device)
    return FederatedData(
        info=info,
        clients=clients,
        num_samples=num_samples,
        malicious=malicious,
        test_x=test_x,
        test_y=test_y,
        backdoor_x=bd_x,
        backdoor_y=bd_y,
        backdoor_not_target=bd_not_target,
        val_x=train01[val_idx],
        val_y=labels[val_idx],
        val_transform=(
            functools.partial(strong_augment, mean=info.mean, std=info.std) if info.name == "cifar10" else pre.train
        ),
    )


def update_guard(cfg: Experiment) -> UpdateGuard:
    """The update guard's thresholds of ``cfg`` (:mod:`spmc.guard`)."""
    return UpdateGuard(cfg.update_guard, cfg.update_guard_max_abs, cfg.update_guard_norm_ratio)


def make_server_data(cfg: Experiment, data: FederatedData, model: torch.nn.Module, layout: ParamLayout) -> ServerData:
    """The server's clean validation split with a scratch copy of ``model`` (spec §5, D38)."""
    return ServerData(
        x=data.val_x,
        y=data.val_y,
        transform=data.val_transform,
        model=copy.deepcopy(model),
        layout=layout,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=derive_seed(cfg.seed, SEED_SERVER),
    )


def coalition_teachers(agg: Aggregate, states: torch.Tensor, ids: Sequence[int]) -> dict[int, torch.Tensor]:
    """teacher_k = α-weighted leave-one-out model of every client (spec §4.1); α is the defense's weights, or
    uniform over the accepted clients when the defense gives none."""
    weights = agg.weights
    if weights is None:
        accepted = set(agg.accepted if agg.accepted is not None else ids)
        mask = torch.tensor([k in accepted for k in ids], dtype=torch.float64)
        weights = mask / mask.sum()
    weights = weights.to(torch.float64)
    coalition = weighted_average(states, weights)
    return dict(zip(ids, marginal_teachers(coalition, states, weights)))


def evaluate_state(
    model: torch.nn.Module, layout: ParamLayout, data: FederatedData, cfg: Experiment, state: torch.Tensor
) -> dict[str, float]:
    """A_t on the clean test set and ASR_t on the triggered set (spec §1.6, §2.4), with and without target-class
    images; ``asr`` is the one ``asr_exclude_target_class`` picks. ``model`` is overwritten with ``state``."""
    layout.load(model, state)
    bs = cfg.eval_batch_size
    keep = data.backdoor_not_target
    asr_all = accuracy(model, data.backdoor_x, data.backdoor_y, bs)
    asr_excl = accuracy(model, data.backdoor_x[keep], data.backdoor_y[keep], bs)
    return {
        "accuracy": accuracy(model, data.test_x, data.test_y, bs),
        "asr": asr_excl if cfg.asr_exclude_target_class else asr_all,
        "asr_all": asr_all,
        "asr_excl_target": asr_excl,
    }


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
    """One federated experiment: data, models, engine, defense and the round loop."""

    def __init__(self, cfg: Experiment, out_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.store = RunStore(out_dir) if out_dir is not None else None
        if self.store is not None:
            self.store.lock()  # created, writable and ours before any data is loaded
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.data = build_federated_data(cfg, self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.resolved_model, self.data.info.num_classes).to(self.device)
        self.layout = ParamLayout.from_module(self.model)
        self.defense = build_defense(cfg)
        self.server_data = make_server_data(cfg, self.data, self.model, self.layout)
        self.engine = self._build_engine()
        self.global_state = self.layout.flatten(self.model)
        self.teachers: dict[int, torch.Tensor] = dict.fromkeys(range(cfg.num_clients), self.global_state)
        self.guard = update_guard(cfg)

    def _build_engine(self) -> SequentialEngine | BatchedEngine:
        """The configured engine; ``auto`` takes the batched one wherever it applies (SimpleCNN)."""
        can_batch = batched.supports(self.model, self.layout)
        if self.cfg.engine == "batched" and not can_batch:
            raise ValueError(
                f"engine: 'batched' supports SimpleCNN only; model {self.cfg.resolved_model!r} "
                "needs 'sequential' or 'auto'"
            )
        if self.cfg.engine == "batched" or (self.cfg.engine == "auto" and can_batch):
            return BatchedEngine(self.layout, optim_config(self.cfg), kernel=self.cfg.kernel, device=self.device)
        log.info("engine: sequential (model %s is not stacked)", self.cfg.resolved_model)
        return SequentialEngine(self.model, self.layout, optim_config(self.cfg))

    def participants(self, t: int) -> list[int]:
        """S_t: every client at participation 1.0, else a seeded sample of ⌈pK⌉ ids, sorted (D2, D34)."""
        k = self.cfg.num_clients
        if self.cfg.participation >= 1.0:
            return list(range(k))
        size = max(1, math.ceil(self.cfg.participation * k - 1e-9))
        rng = np.random.default_rng(derive_seed(self.cfg.seed, SEED_PARTICIPATION, t))
        return sorted(int(i) for i in rng.choice(k, size=size, replace=False))

    def method_for(self, client_id: int) -> str:
        """The client procedure: the configured one, except malicious clients under ``malicious_client = plain``."""
        if client_id in self.data.malicious and self.cfg.malicious_client == "plain":
            return "plain"
        return self.cfg.client

    def tasks(self, t: int, ids: list[int]) -> list[ClientTask]:
        epochs = self.cfg.local_epochs(self.cfg.client)
        return [
            ClientTask(
                client_id=k,
                data=self.data.clients[k],
                method=self.method_for(k),  # type: ignore[arg-type]
                epochs=epochs,
                seed=derive_seed(self.cfg.seed, SEED_CLIENT, t, k),
                teacher=self.teachers[k] if self.method_for(k) == "spmc" else None,
            )
            for k in ids
        ]

    def check_states(self, t: int, states: list[torch.Tensor], ids: list[int]) -> dict[int, str]:
        """The update guard (:mod:`spmc.guard`): ``{client id: why}`` for every refused state. A refused state is
        logged and, per ``on_invalid_update``, dropped for the round or the run is stopped; it never reaches a
        defense."""
        problems = guard_states(self.global_state, states, self.layout.stat_mask(self.device), self.guard)
        refused = {k: p for k, p in zip(ids, problems) if p is not None}
        for k, problem in refused.items():
            if self.cfg.on_invalid_update == "stop":
                raise InvalidUpdateError(
                    f"round {t}: client {k}'s state {problem}; stopping (on_invalid_update = 'stop')"
                )
            log.warning("round %d: client %d's state %s; dropped for this round", t, k, problem)
        return refused

    def update_teachers(self, agg: Aggregate, states: torch.Tensor, ids: list[int]) -> None:
        """teacher_k = α-weighted leave-one-out model (spec §4.1), see :func:`coalition_teachers`."""
        self.teachers.update(coalition_teachers(agg, states, ids))

    def evaluate(self, state: torch.Tensor | None = None) -> dict[str, float]:
        """:func:`evaluate_state` of ``state`` (default: the global model)."""
        state = self.global_state if state is None else state
        return evaluate_state(self.model, self.layout, self.data, self.cfg, state)

    def run_round(self, t: int) -> dict[str, Any]:
        """Train, aggregate and evaluate round ``t``; returns its metrics record."""
        started = time.perf_counter()
        ids = self.participants(t)
        results = self.engine.train_round(self.global_state, self.tasks(t, ids))
        refused = self.check_states(t, [r.state for r in results], ids)
        keep = [i for i, k in enumerate(ids) if k not in refused]
        if not keep:
            raise InvalidUpdateError(f"round {t}: every client state was rejected; the global model is unchanged")
        states = torch.stack([results[i].state for i in keep])
        kept_ids = [ids[i] for i in keep]
        counts = torch.tensor([self.data.num_samples[k] for k in kept_ids], dtype=torch.float64)
        server_data = self.server_data if self.defense.needs_server_data else None
        inputs = RoundInputs(self.global_state, states, tuple(kept_ids), counts, self.layout, t, server_data)
        agg = self.defense.aggregate(inputs)
        self.global_state = finalise_global(agg.global_state, self.layout, self.cfg.defense, t)
        if any(self.method_for(k) == "spmc" for k in kept_ids):
            self.update_teachers(agg, states, kept_ids)
        train_seconds = time.perf_counter() - started
        record: dict[str, Any] = {"round": t, **self.evaluate(agg.eval_state)}
        losses = [r.mean_loss for r in results if math.isfinite(r.mean_loss)]
        epochs = self.cfg.local_epochs(self.cfg.client)
        record.update(
            train_loss=float(np.mean(losses)) if losses else math.nan,
            client_loss={str(r.client_id): r.mean_loss for r in results},
            participants=ids,
            rejected=[k for k in ids if k not in kept_ids],
            invalid={str(k): p for k, p in refused.items()},
            accepted=list(agg.accepted) if agg.accepted is not None else kept_ids,
            train_seconds=train_seconds,
            seconds=time.perf_counter() - started,
            samples=sum(
                min(r.steps * self.cfg.batch_size, epochs * self.data.num_samples[r.client_id]) for r in results
            ),
            **agg.diagnostics,
        )
        if agg.accepted is not None and len(agg.accepted) < len(kept_ids):
            record["detection"] = detection_scores(agg.accepted, kept_ids, self.data.malicious)
        return record

    def summary(self, records: list[dict[str, Any]]) -> tuple[FinalMetrics, dict[str, Any]]:
        acc = [r["accuracy"] for r in records]
        final = final_metrics(acc, [r["asr"] for r in records], self.cfg.report_last_k)
        other_key = "asr_all" if self.cfg.asr_exclude_target_class else "asr_excl_target"
        other = final_metrics(acc, [r[other_key] for r in records], self.cfg.report_last_k)
        summary = {
            **final.as_dict(),
            "R_" + ("all" if self.cfg.asr_exclude_target_class else "excl_target"): other.R,
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
            "kernel": getattr(self.engine, "kernel", "torch"),
            "device": str(self.device),
        }
        return final, summary

    def checkpoint(self, next_round: int) -> dict[str, Any]:
        """Everything needed to continue at ``next_round``: global state, teachers, the defense's own state. Every
        random stream is derived from (seed, round, client), so no generator state needs saving."""
        ids = sorted(self.teachers)
        payload: dict[str, Any] = {
            "config_hash": self.config_hash,
            "next_round": next_round,
            "global_state": self.global_state.cpu(),
            "teacher_ids": torch.tensor(ids),
            "teachers": torch.stack([self.teachers[k] for k in ids]).cpu(),
        }
        if hasattr(self.defense, "state_dict"):
            payload["defense_state"] = {str(k): v for k, v in self.defense.state_dict().items()}
        return payload

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
        where = self.store.checkpoint_path if self.store is not None else "checkpoint"
        stored = payload.get("config_hash")
        if stored != self.config_hash:
            raise RunDirError(
                f"{where}: written under another configuration (config hash {str(stored)[:12]}, this run's "
                f"{self.config_hash[:12]}); config.json was edited or the checkpoint comes from another run"
            )
        try:
            next_round = payload["next_round"]
            if not isinstance(next_round, int) or not 0 < next_round <= self.cfg.rounds:
                raise ValueError(f"next_round {next_round!r} is not in 1..{self.cfg.rounds}")
            self.layout.check(payload["global_state"])
            ids = payload["teacher_ids"].tolist()
            if ids != list(range(self.cfg.num_clients)):
                raise ValueError(f"teacher ids {ids} are not 0..{self.cfg.num_clients - 1}")
            teachers = payload["teachers"]
            if tuple(teachers.shape) != (self.cfg.num_clients, self.layout.dim):
                raise ValueError(f"teachers have shape {tuple(teachers.shape)}")
            if "defense_state" in payload and hasattr(self.defense, "load_state_dict"):
                self.defense.load_state_dict(payload["defense_state"])
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
            raise RunDirError(f"{where}: does not fit this run ({type(err).__name__}: {err})") from None
        self.global_state = payload["global_state"].to(self.device)
        self.teachers = {k: t.to(self.device) for k, t in zip(ids, teachers)}
        return next_round

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
    values = read_json_file(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of options, got {type(values).__name__}")
    return make_experiment(**values)
