"""The server's side of a round, shared by both drivers (:class:`spmc.simulation.Simulation` and
:class:`spmc.flower.strategy.DefenseStrategy`), and the one checkpoint format they write.

```
S_t       ← sample_participants(pool, p, seed, t)              (all of the pool at p = 1, else ⌈p·|pool|⌉ seeded)
crafting  ← the update attack's crafting hook rewrites the attackers' states (ATTACKS.md §A2.3; attack rounds),
            seeing the attackers' clean shadow models when they trained some (``attacker_knowledge = partial``),
            the teachers sent this round, when the server sends teachers (§A5 ``coalition_mimic``), the sample
            counts, and — for adaptive attacks (§A5) — the defense and a builder of its RoundInputs
screen    ← update guard over the states: refused ones are logged and dropped, or stop the run (spec.guard)
θ_g, α    ← defense.aggregate(states, ids, counts)
θ_g       ← finalise_global(θ_g)                                (integer counters rounded; non-finite refused)
teacher_k ← Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j                        (spec §4.1; when a client learns from a teacher)
record    ← accepted ids, the defense's diagnostics, detection scores against the known malicious ids
```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from spmc.defenses import Aggregate, Defense, RoundInputs, Stateful, marginal_teachers, weighted_average
from spmc.defenses.server_data import ServerData
from spmc.federation import SEED_PARTICIPATION, derive_seed
from spmc.guard import InvalidUpdateError, UpdateGuard, finalise_global, guard_states
from spmc.metrics import detection_scores
from spmc.params import ParamLayout
from spmc.store import RunDirError

log = logging.getLogger(__name__)


class Crafting(Protocol):
    """The crafting step (:class:`spmc.attacks.Crafter`): (round, θ_g, states, ids, the attackers' clean models
    by id, the teachers sent this round by id; the states' sample counts, the server's defense and a builder of
    the defense's RoundInputs for adaptive attacks) → states with the attackers' replaced. ``diagnostics``: what the
    last call decided, for the record."""

    diagnostics: dict[str, Any]

    def __call__(
        self,
        t: int,
        global_state: torch.Tensor,
        states: Sequence[torch.Tensor],
        ids: Sequence[int],
        clean: Mapping[int, torch.Tensor] | None = None,
        teachers: Mapping[int, torch.Tensor] | None = None,
        *,
        counts: Sequence[float] | None = None,
        defense: Any = None,
        make_inputs: Callable[[torch.Tensor, Sequence[int], torch.Tensor], RoundInputs] | None = None,
    ) -> list[torch.Tensor]: ...


#: The version of the checkpoint payload (:meth:`ServerCore.checkpoint`), written by both drivers.
CHECKPOINT_FORMAT = 2


def sample_participants(pool: Sequence[int], participation: float, seed: int, t: int) -> list[int]:
    """S_t: all of ``pool`` (sorted) at participation ≥ 1, else a seeded sample of ⌈p·|pool|⌉ of it (D2, D34)."""
    ids = sorted(int(i) for i in pool)
    if participation >= 1.0 or not ids:
        return ids
    size = max(1, math.ceil(participation * len(ids) - 1e-9))
    rng = np.random.default_rng(derive_seed(seed, SEED_PARTICIPATION, t))
    return sorted(ids[int(i)] for i in rng.choice(len(ids), size=size, replace=False))


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


@dataclass
class RoundOutcome:
    """What :meth:`ServerCore.step` decided: the guard's refusals and, when some state was kept, the aggregate."""

    ids: tuple[int, ...]
    refused: dict[int, str]
    kept_ids: tuple[int, ...] = ()
    states: torch.Tensor | None = None
    aggregate: Aggregate | None = None
    crafting: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> list[int]:
        """The ids the defense accepted (every kept id when it does not say)."""
        if self.aggregate is not None and self.aggregate.accepted is not None:
            return list(self.aggregate.accepted)
        return list(self.kept_ids)

    def record(self, malicious: Sequence[int] | None = None) -> dict[str, Any]:
        """The decision part of a round's record: accepted ids, the defense's diagnostics and, when it filtered
        and the malicious ids are known, its detection scores (spec §6); what the crafting step decided (an
        adaptive attack's chosen scale) under ``crafting`` when it says something."""
        record: dict[str, Any] = {"accepted": self.accepted}
        if self.crafting:
            record["crafting"] = dict(self.crafting)
        if self.aggregate is not None:
            record.update(self.aggregate.diagnostics)
        if malicious is not None and len(self.accepted) < len(self.kept_ids):
            record["detection"] = detection_scores(self.accepted, list(self.kept_ids), malicious)
        return record


@dataclass
class ServerCore:
    """The server's state (global model, teachers, the defense's own state) and its round step.

    ``learns_from_teacher(k)`` says whether client ``k`` distils from a teacher (the SPMC client): teachers are
    recomputed only in rounds where some kept client does. ``teachers`` starts as given (the simulator: θ⁰ for
    every client; Flower: none, a client without one distils from the global model)."""

    defense: Defense
    layout: ParamLayout
    global_state: torch.Tensor
    guard: UpdateGuard = field(default_factory=UpdateGuard)
    on_invalid_update: str = "drop"
    server_data: ServerData | None = None
    learns_from_teacher: Callable[[int], bool] = lambda k: False
    teachers: dict[int, torch.Tensor] = field(default_factory=dict)
    crafter: Crafting | None = None

    def screen(self, t: int, states: Sequence[torch.Tensor], ids: Sequence[int]) -> dict[int, str]:
        """The update guard (:mod:`spmc.guard`): ``{client id: why}`` for every refused state, logged. Under
        ``on_invalid_update = 'stop'`` the first refusal stops the run (:class:`InvalidUpdateError`)."""
        problems = guard_states(
            self.global_state, list(states), self.layout.stat_mask(self.global_state.device), self.guard
        )
        refused = {k: p for k, p in zip(ids, problems) if p is not None}
        for k, problem in refused.items():
            if self.on_invalid_update == "stop":
                raise InvalidUpdateError(
                    f"round {t}: client {k}'s state {problem}; stopping (on_invalid_update = 'stop'; refused "
                    f"clients {sorted(refused)})"
                )
            log.warning("round %d: client %d's state %s; dropped for this round", t, k, problem)
        return refused

    def round_inputs_builder(self, t: int) -> Callable[[torch.Tensor, Sequence[int], torch.Tensor], RoundInputs]:
        """(states [r, d], ids, sample counts [r]) → the :class:`RoundInputs` of round ``t`` that this server gives
        its defense (θ_g, layout, round, the server data when the defense needs it). The crafting step passes it to
        adaptive attacks (ATTACKS.md §A5), which call a copy of the defense on candidate rounds."""
        global_state, layout = self.global_state, self.layout
        server_data = self.server_data if self.defense.needs_server_data else None

        def build(states: torch.Tensor, ids: Sequence[int], counts: torch.Tensor) -> RoundInputs:
            weights = counts.to(torch.float64)
            return RoundInputs(global_state, states, tuple(int(k) for k in ids), weights, layout, t, server_data)

        return build

    def step(
        self,
        t: int,
        states: Sequence[torch.Tensor],
        ids: Sequence[int],
        counts: Sequence[float],
        shadows: Mapping[int, torch.Tensor] | None = None,
    ) -> RoundOutcome:
        """One server round over the clients' returned states (ids sorted, one state and sample count each):
        crafting → screen → defense → finalise_global → teachers. A crafted state passes the guard like any
        other. ``shadows`` (attacker id → its clean model of the round, ``attacker_knowledge = partial``) go to
        the crafting step only: never to the guard, the defense or the record. When every state is refused the
        global model and the teachers stay as they are and the outcome has no aggregate.

        The crafting step also sees the teachers sent this round (:attr:`teachers`, computed after the previous
        round), when the server sends teachers at all: some client of the round learns from one."""
        crafting: dict[str, Any] = {}
        if self.crafter is not None:
            sent = self.teachers if any(self.learns_from_teacher(k) for k in ids) else None
            states = self.crafter(
                t,
                self.global_state,
                states,
                ids,
                shadows,
                sent,
                counts=counts,
                defense=self.defense,
                make_inputs=self.round_inputs_builder(t),
            )
            crafting = dict(self.crafter.diagnostics)
        refused = self.screen(t, states, ids)
        keep = [i for i, k in enumerate(ids) if k not in refused]
        outcome = RoundOutcome(tuple(ids), refused, crafting=crafting)
        if not keep:
            return outcome
        kept_ids = tuple(ids[i] for i in keep)
        stacked = torch.stack([states[i] for i in keep])
        weights = torch.tensor([float(counts[i]) for i in keep], dtype=torch.float64)
        agg = self.defense.aggregate(self.round_inputs_builder(t)(stacked, kept_ids, weights))
        self.global_state = finalise_global(agg.global_state, self.layout, self.defense.name, t).to(
            self.global_state.device
        )
        if any(self.learns_from_teacher(k) for k in kept_ids):
            self.teachers.update(coalition_teachers(agg, stacked, kept_ids))
        outcome.kept_ids, outcome.states, outcome.aggregate = kept_ids, stacked, agg
        return outcome

    # -------------------------------------------------------------------------------------------- checkpoints

    def checkpoint(self, rounds_done: int, config_hash: str, **extra: Any) -> dict[str, Any]:
        """Everything needed to continue after ``rounds_done`` rounds: global state, teachers, the defense's own
        state, with the configuration's hash, the model's layout and the defense's name to check on resume.
        Every random stream is derived from (seed, round, client), so no generator state needs saving."""
        defense_state = self.defense.state_dict() if isinstance(self.defense, Stateful) else None
        return {
            "format": CHECKPOINT_FORMAT,
            "config_hash": config_hash,
            "round": rounds_done,
            "global_state": self.global_state.detach().cpu().clone(),
            "teachers": {str(k): v.detach().cpu().clone() for k, v in sorted(self.teachers.items())},
            "defense": self.defense.name,
            "defense_state": None if defense_state is None else {str(k): v for k, v in defense_state.items()},
            "layout": [e.name for e in self.layout.entries],
            **extra,
        }

    def restore(
        self,
        payload: dict[str, Any],
        config_hash: str,
        *,
        where: str = "checkpoint",
        strict_config: bool = True,
        max_round: int | None = None,
        teacher_ids: Sequence[int] | None = None,
    ) -> int:
        """Load a :meth:`checkpoint`; returns the number of rounds it covers.

        ``strict_config`` refuses a checkpoint written under another configuration (else a warning);
        ``max_round`` bounds its round; ``teacher_ids`` is the exact set of teachers it must hold.

        Raises:
            RunDirError: another configuration (strict), format, model or defense, or entries that do not fit.
        """
        stored = payload.get("config_hash")
        if stored != config_hash and strict_config:
            raise RunDirError(
                f"{where}: written under another configuration (config hash {str(stored)[:12]}, this run's "
                f"{config_hash[:12]}); config.json was edited or the checkpoint comes from another run"
            )
        if stored != config_hash:
            log.warning("%s: written with another configuration; resuming with the current one", where)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise RunDirError(f"{where}: format {payload.get('format')!r}; expected {CHECKPOINT_FORMAT}")
        if payload.get("layout") != [e.name for e in self.layout.entries]:
            raise RunDirError(f"{where}: it holds another model's state; use another run directory")
        if payload.get("defense") != self.defense.name:
            raise RunDirError(f"{where}: written by defense {payload.get('defense')!r}, not {self.defense.name!r}")
        try:
            rounds = payload["round"]
            if not isinstance(rounds, int) or rounds < 1 or (max_round is not None and rounds > max_round):
                raise ValueError(f"round {rounds!r} is not in 1..{max_round if max_round is not None else 'any'}")
            global_state = payload["global_state"]
            self.layout.check(global_state)
            teachers = {int(k): v for k, v in payload["teachers"].items()}
            if any(k < 0 for k in teachers) or (teacher_ids is not None and sorted(teachers) != list(teacher_ids)):
                raise ValueError(f"teacher ids {sorted(teachers)} do not fit")
            for v in teachers.values():
                self.layout.check(v)
            if payload.get("defense_state") is not None and isinstance(self.defense, Stateful):
                self.defense.load_state_dict(payload["defense_state"])
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
            raise RunDirError(f"{where}: does not fit this run ({type(err).__name__}: {err})") from None
        device = self.global_state.device
        self.global_state = global_state.to(device)
        self.teachers = {k: v.to(device) for k, v in teachers.items()}
        return rounds
