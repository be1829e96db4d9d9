"""The attack interface (spec ATTACKS.md §A1, §A2): an :class:`Attack` implements any subset of three hooks.

1. **data** (``"data" in hooks``): which training samples of an attacker are poisoned and how, and the test set of
   the attack success rate;
2. **training** (``"training" in hooks``): :meth:`Attack.prepare_round` once before the attackers' local training
   of an attack round (and :meth:`Attack.observe` before every round, attackers or not), then per local step
   :meth:`Attack.gradient` on the attackers' stacked gradient rows g ∈ R^{m×d} (before momentum and weight decay)
   and :meth:`Attack.project` on their rows θ ∈ R^{m×d} after the SGD step;
3. **crafting** (``"crafting" in hooks``): after local training, :meth:`Attack.craft` replaces the attackers'
   states θ_M ∈ R^{m×d}, seeing θ_g, the round and the benign states: under ``attacker_knowledge = full`` those of
   the round's benign clients; under ``partial`` their estimate, the attackers' own clean models (each attacker
   also trains a clean "shadow" model on its clean data, like a benign client, with its own seed stream;
   Shejwalkar & Houmansadr, NDSS 2021 §3). Under ``partial`` crafting never reads a benign client's state. An
   attack that wants the attackers' clean models under ``full`` too sets :attr:`Attack.needs_clean`.

The schedule of §A1: round t is an attack round when start ≤ t ≤ end and (t − start) mod every = 0; outside attack
rounds an attacker trains like a benign client on clean data. Nothing here imports :mod:`spmc.config`.

An attack that keeps state across rounds (Neurotoxin's θ_g^{t−1}, PGD's radius) returns it from
:meth:`Attack.state_dict`; the simulator saves :meth:`AttackPlan.state_dict` in its checkpoint and restores it on
resume. :meth:`Attack.bind` hands an attack the model's :class:`spmc.params.ParamLayout` (which coordinates of a
state are parameters, float buffers, integer counters) when the federation is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from spmc.params import ParamLayout
from spmc.threat import ThreatModel, num_attackers
from spmc.training import ClientMethod

if TYPE_CHECKING:
    from spmc.defenses.base import RoundInputs

log = logging.getLogger(__name__)

Hook = Literal["data", "training", "crafting"]
HOOKS: tuple[Hook, ...] = ("data", "training", "crafting")
Knowledge = Literal["full", "partial"]
#: What a run's metrics mean (§A1): ``backdoor`` reports A and R = 100 − ASR on the data attack's trigger;
#: ``untargeted`` reports A and ΔA = A − A(no attack, same seed), R blank; ``none`` (no attack) reports A and R.
AttackKind = Literal["backdoor", "untargeted", "none"]
ATTACK_KINDS: tuple[AttackKind, ...] = ("backdoor", "untargeted", "none")

#: Purpose of the seed stream of the random attacker pool (distinct from the federation's purposes 1-6).
SEED_ATTACKER_POOL = 7

#: (states [r, d], ids, sample counts [r]) → the :class:`spmc.defenses.RoundInputs` the server would hand its
#: defense for that set of states in this round (θ_g, layout, round, server data when the defense needs it).
MakeInputs = Callable[[torch.Tensor, Sequence[int], torch.Tensor], "RoundInputs"]


@dataclass(frozen=True)
class AttackSettings:
    """What the built-in attacks are configured with: the target label τ_bd, the trigger's value per channel in
    normalised space, the semantic attack's source class and noise σ, the dataset's per-channel normalisation
    (x_normalised = (x_pixel − mean_c)/std_c; the defaults make both spaces equal) and its number of classes C."""

    target: int = 2
    values: tuple[tuple[int, float], ...] = ((0, 1.0),)
    source_label: int = 3
    noise_std: float = 0.05
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    num_classes: int = 10

    @property
    def trigger(self) -> dict[int, float]:
        """The trigger's value per channel, as :func:`spmc.attacks.backdoor.apply_trigger` takes it."""
        return dict(self.values)


@dataclass(frozen=True)
class AttackSchedule:
    """Attack rounds: start ≤ t ≤ end (end None: the last round) and (t − start) mod every = 0 (§A1)."""

    start: int = 0
    end: int | None = None
    every: int = 1

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"attack_start: got {self.start!r}; must be >= 0")
        if self.end is not None and self.end < self.start:
            raise ValueError(f"attack_end: got {self.end!r}; must be None or >= attack_start = {self.start}")
        if self.every < 1:
            raise ValueError(f"attack_every: got {self.every!r}; must be >= 1")

    def active(self, t: int) -> bool:
        """Whether round ``t`` is an attack round."""
        if t < self.start or (self.end is not None and t > self.end):
            return False
        return (t - self.start) % self.every == 0


@dataclass(frozen=True)
class CraftingInputs:
    """What the colluding attackers see when they craft (§A2.3): the round, θ_g, their own trained states [m, d]
    and ids, and the benign states [n, d] with their ids.

    Under ``attacker_knowledge = full`` the benign states are the round's benign clients' states. Under
    ``partial`` they are the attackers' pooled clean models (their estimate of benign behaviour) and
    ``benign_ids`` is empty. ``clean_states`` [m, d] holds the attackers' own clean models, row i for
    ``attacker_ids[i]``, when they were trained (``partial``, or an attack with :attr:`Attack.needs_clean`) and
    every attacker of the round sent one; else None.

    ``teachers`` [m, d] holds the teacher the server sent each attacker this round (row i for ``attacker_ids[i]``:
    SPMC's α-weighted marginal-coalition model, ALGORITHMS.md §4.1), when the server sends teachers (some client
    of the round distils from one); an attacker the server holds no teacher for yet (Flower's first round, a new
    node) gets θ_g, what the SPMC client distils from without one. None when the server sends no teachers. It is
    the attacker's own message from the server, so it is there under either knowledge.


    For adaptive attacks (§A5; filled by :class:`spmc.server.ServerCore`, None when crafting runs without a
    server): ``attacker_counts`` [m] and ``benign_counts`` [n] are the sample counts of the rows of
    ``attacker_states`` and ``benign_states`` (under ``partial`` the benign rows are the attackers' clean models,
    so their counts are the attackers' own); ``defense`` is the server's defense object itself — an attack must
    never call or change it, only a ``copy.deepcopy`` of it; ``make_inputs`` builds the
    :class:`spmc.defenses.RoundInputs` the server would give that defense for a set of states, ids and counts."""

    round: int
    global_state: torch.Tensor
    attacker_states: torch.Tensor
    attacker_ids: tuple[int, ...]
    benign_states: torch.Tensor
    benign_ids: tuple[int, ...]
    clean_states: torch.Tensor | None = None
    teachers: torch.Tensor | None = None
    attacker_counts: torch.Tensor | None = None
    benign_counts: torch.Tensor | None = None
    defense: Any = None
    make_inputs: MakeInputs | None = None


@dataclass(frozen=True)
class AttackContext:
    """What :meth:`Attack.attach` gives an attack that needs the run itself (an adaptive trigger, A3FL): a scratch
    copy of the run's model (its weights are the attack's to overwrite), the layout that loads a flat state into it,
    and ``clean(k)``: attacker ``k``'s clean training images, normalised without augmentation, and labels."""

    model: torch.nn.Module
    layout: ParamLayout
    clean: Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class Attack:
    """Base of every attack: ``name``, ``description``, the ``hooks`` it implements and their defaults (no
    poisoning, identity gradient and projection, the attackers' states unchanged).

    An attack with options declares ``options_type``, a frozen dataclass whose fields are declared with
    :func:`spmc.options.option` (the configuration key, its help) and whose ``__post_init__`` validates them; it
    receives an instance as ``options`` (the defaults when None). ``threat`` is the run's threat model (K, γ, m).
    """

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no attack: every client is benign"
    hooks: ClassVar[frozenset[Hook]] = frozenset()
    #: A backdoor (data) attack with its own test-time trigger: runs report A and R = 100 − ASR on its test set.
    #: False for untargeted attacks (label flip, Byzantine updates): runs report A and ΔA, R is blank (§A1).
    targeted: ClassVar[bool] = False
    #: An update attack that carries a data attack's backdoor (model replacement, PGD, Neurotoxin, the adaptive
    #: attacks): the robustness matrix pairs it with ``badnets``; the others (Byzantine) run alone, untargeted.
    carries_backdoor: ClassVar[bool] = False
    options_type: ClassVar[type[Any] | None] = None
    #: The crafting step wants the attackers' own clean models (:attr:`CraftingInputs.clean_states`) under
    #: ``attacker_knowledge = full`` too (under ``partial`` they are always trained): each attacker of an attack
    #: round then also trains a clean model on its clean data, as under ``partial``.
    needs_clean: ClassVar[bool] = False
    #: The client procedure the attackers run in attack rounds whatever the configured one (``plain``: they skip
    #: SPMC's, ALGORITHMS.md §4; the adaptive attacks of ATTACKS.md §A5); None: the configured one (or
    #: ``malicious_client``). Read by :meth:`spmc.federation.Federation.method_for`, so the engines and the Flower
    #: ClientApp alike train with it.
    client_procedure: ClassVar[ClientMethod | None] = None

    def __init__(
        self, settings: AttackSettings | None = None, options: Any = None, threat: ThreatModel | None = None
    ) -> None:
        self.settings = settings if settings is not None else AttackSettings()
        if options is None and self.options_type is not None:
            options = self.options_type()
        self.options = options
        self.threat = threat if threat is not None else ThreatModel()
        #: The model's layout once :meth:`bind` was called (None: every coordinate of a state is a float entry).
        self.layout: ParamLayout | None = None
        self._all_float = True
        self._all_params = True

    def bind(self, layout: ParamLayout) -> None:
        """Called once when the federation is built, with the layout of the model's flat states."""
        self.layout = layout
        self._all_float = not bool(layout.int_mask().any())
        self._all_params = layout.num_params == layout.dim

    def float_mask(self, device: torch.device) -> torch.Tensor | None:
        """The [d] mask of the float entries of a state (parameters and float buffers, integer counters left out;
        :meth:`spmc.params.ParamLayout.stat_mask`), or None when every entry is a float one or no layout is bound."""
        if self.layout is None or self._all_float:
            return None
        return self.layout.stat_mask(device)

    def param_mask(self, device: torch.device) -> torch.Tensor | None:
        """The [d] mask of the trainable parameters of a state, or None when every entry is one or no layout is
        bound."""
        if self.layout is None or self._all_params:
            return None
        return self.layout.param_mask(device)

    # --------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the attack keeps across rounds, as CPU tensors by name (checkpointed; empty by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` on anything that does not fit."""
        if state:
            raise ValueError(f"attack {self.name!r} keeps no state; got entries {sorted(state)}")

    # ------------------------------------------------------------------------------------------------ data

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """Which samples of the whole training set get poisoned (only attackers' samples are used)."""
        return torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised batch with the rows where ``mask`` is True poisoned (``x`` may be written in place)."""
        return x, y

    def poison_for(
        self,
        attacker: int,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`poison` as the attacker of rank ``attacker`` (its position in the sorted attacker ids) does it;
        the federation calls this one. The default ignores the rank; DBA gives each rank its part of the trigger."""
        return self.poison(x, y, mask, generator)

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attack's test set: images, labels and the mask of rows whose true class is not the target."""
        return x, y, y != self.settings.target

    # -------------------------------------------------------------------------------------------- training

    def attach(self, context: AttackContext) -> None:
        """Called once by :meth:`spmc.federation.Federation.build` with the run's model and the attackers' clean
        data, for an attack that needs them in :meth:`prepare_round` (A3FL); the default ignores it."""

    def observe(self, t: int, global_state: torch.Tensor) -> None:
        """Called before the local training of every round ``t``, whether or not an attacker takes part (the
        attackers see θ_g^t whenever they are sampled; e.g. Neurotoxin's θ_g^t − θ_g^{t−1}). Must be idempotent
        for a repeated ``t`` (a Flower process may train several partitions in one round)."""

    def prepare_round(self, t: int, global_state: torch.Tensor, attacker_ids: Sequence[int]) -> bool:
        """Called once before the attackers' local training of attack round ``t`` (e.g. a trigger optimisation).
        Returns True when the data hook changed (a new trigger): the federation then poisons the attackers' data
        again and rebuilds the attack's test set."""
        return False

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """The attackers' gradient rows [m, d] of one local step (rows: their states before the step)."""
        return grad

    def project(self, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """The attackers' states [m, d] after one local step, projected (e.g. onto a ball around θ_g)."""
        return rows

    # -------------------------------------------------------------------------------------------- crafting

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """The attackers' states [m, d] sent to the server."""
        return inputs.attacker_states

    def crafting_diagnostics(self) -> dict[str, Any]:
        """What the last :meth:`craft` decided (e.g. a chosen scale), JSON-ready, for the round's record under
        ``crafting``; empty by default (nothing is recorded)."""
        return {}


def attacker_pool(num_clients: int, gamma: float, pool: str, seed: int) -> tuple[int, ...]:
    """The m = ⌊γK⌋ attackers (§A1): ``fixed`` = the last m ids, ``random`` = a seeded m-subset drawn once."""
    m = num_attackers(gamma, num_clients)
    if pool == "fixed":
        return tuple(range(num_clients - m, num_clients))
    if pool == "random":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), SEED_ATTACKER_POOL]))
        return tuple(sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False)))
    raise ValueError(f"attacker_pool: unknown value {pool!r}; allowed: fixed, random")


def attack_kind(data: Attack | type[Attack], update: Attack | type[Attack] | None = None) -> AttackKind:
    """The kind of a run with the data attack ``data`` and the update attack ``update`` (§A1): ``backdoor`` when
    the data attack is targeted (it has a test-time trigger), else ``untargeted`` when either attack has a hook
    (label flip, an update attack with ``attack = none``), else ``none``."""
    if data.targeted:
        return "backdoor"
    if data.hooks or (update is not None and update.hooks):
        return "untargeted"
    return "none"


@dataclass
class Crafter:
    """The crafting step of a run (§A2.3), called by :meth:`spmc.server.ServerCore.step` before the update guard:
    in attack rounds, the participating attackers' states are replaced by ``attack.craft``.

    ``clean`` maps an attacker's id to its clean model of the round (trained when :attr:`wants_clean`); under
    ``knowledge = partial`` those are the only benign estimate the attack sees, and ``states`` of benign ids are
    never read. Clean models of ids that are not participating attackers are ignored."""

    attack: Attack
    attackers: frozenset[int]
    schedule: AttackSchedule = AttackSchedule()
    knowledge: Knowledge = "full"
    #: :meth:`Attack.crafting_diagnostics` of the last call (empty when it crafted nothing).
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def wants_clean(self) -> bool:
        """Whether the attackers train clean models in attack rounds (``partial``, or the attack asks for them)."""
        return self.knowledge == "partial" or self.attack.needs_clean

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
        make_inputs: MakeInputs | None = None,
    ) -> list[torch.Tensor]:
        """``states`` with the attackers' rows crafted (unchanged outside attack rounds or without attackers).

        ``teachers`` (client id → the teacher the server sent it this round; None when it sends none) become
        :attr:`CraftingInputs.teachers`, θ_g for an attacker without one. ``counts`` (the states' sample counts),
        ``defense`` and ``make_inputs`` are passed on to adaptive attacks (:class:`CraftingInputs`); under
        ``partial`` no benign client's count is passed on either."""
        self.diagnostics = {}
        bad = [i for i, k in enumerate(ids) if k in self.attackers]
        if not bad or not self.schedule.active(t):
            return list(states)
        bad_ids = tuple(ids[i] for i in bad)
        full = self.knowledge == "full"
        d = len(global_state)
        clean = clean or {}
        shadows = [clean[k] for k in bad_ids if k in clean]
        clean_states = torch.stack(shadows) if shadows and len(shadows) == len(bad_ids) else None
        if self.wants_clean and clean_states is None:
            missing = [k for k in bad_ids if k not in clean]
            log.warning("round %d: no clean model from attackers %s; crafting without theirs", t, missing)
        weight = None if counts is None else torch.tensor([float(c) for c in counts], dtype=torch.float64)
        benign_counts = None
        if full:
            good = [i for i, k in enumerate(ids) if k not in self.attackers]
            benign = torch.stack([states[i] for i in good]) if good else global_state.new_zeros(0, d)
            benign_ids = tuple(ids[i] for i in good)
            benign_counts = None if weight is None else weight[good]
        else:  # partial: the attackers' pooled clean models; a benign client's state is never read
            benign = torch.stack(shadows) if shadows else global_state.new_zeros(0, d)
            benign_ids = ()
            if weight is not None:  # a clean model's count is its attacker's own
                by_id = dict(zip(ids, weight.tolist()))
                benign_counts = torch.tensor([by_id[k] for k in bad_ids if k in clean], dtype=torch.float64)
        inputs = CraftingInputs(
            round=t,
            global_state=global_state,
            attacker_states=torch.stack([states[i] for i in bad]),
            attacker_ids=bad_ids,
            benign_states=benign,
            benign_ids=benign_ids,
            clean_states=clean_states,
            teachers=None
            if teachers is None
            else torch.stack([teachers.get(k, global_state).to(global_state) for k in bad_ids]),
            attacker_counts=None if weight is None else weight[bad],
            benign_counts=benign_counts,
            defense=defense,
            make_inputs=make_inputs,
        )
        crafted = self.attack.craft(inputs)
        self.diagnostics = self.attack.crafting_diagnostics()
        if crafted.shape != inputs.attacker_states.shape:
            raise ValueError(
                f"attack {self.attack.name!r}: craft returned shape {tuple(crafted.shape)}; "
                f"expected {tuple(inputs.attacker_states.shape)}"
            )
        out = list(states)
        for row, i in enumerate(bad):
            out[i] = crafted[row]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The update attack's :meth:`Attack.state_dict`, named as in :meth:`AttackPlan.state_dict` (``update.``):
        what the Flower strategy, which holds the crafter but not the plan, checkpoints."""
        return {f"update.{k}": v for k, v in self.attack.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the ``update.`` entries of an :meth:`AttackPlan.state_dict` (``data.`` entries are the
        clients'); raises ``ValueError`` on an entry of neither."""
        own: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            role, _, name = str(key).partition(".")
            if role not in ("data", "update") or not name:
                raise ValueError(f"attack state: entry {key!r} belongs to no attack of this run (data, update)")
            if role == "update":
                own[name] = value
        self.attack.load_state_dict(own)


@dataclass(frozen=True)
class TrainingHooks:
    """The training hooks of a run's attacks, chained in order (:class:`spmc.training.TrainingHook`)."""

    attacks: tuple[Attack, ...]

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """g ← a.gradient(g) for every attack a."""
        for attack in self.attacks:
            grad = attack.gradient(grad, rows, global_state)
        return grad

    def project(self, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """θ ← a.project(θ) for every attack a."""
        for attack in self.attacks:
            rows = attack.project(rows, global_state)
        return rows


@dataclass(frozen=True)
class AttackPlan:
    """A run's attack: the data attack (``attack``; :class:`NoAttack`-like when none), the update attack
    (``update_attack``), the attackers, the schedule and the attackers' knowledge (§A1)."""

    data: Attack
    update: Attack | None = None
    attackers: tuple[int, ...] = ()
    schedule: AttackSchedule = AttackSchedule()
    knowledge: Knowledge = "full"

    @property
    def kind(self) -> AttackKind:
        """:func:`attack_kind` of the data and update attacks: what the run's metrics mean."""
        return attack_kind(self.data, self.update)

    @property
    def attacks(self) -> tuple[Attack, ...]:
        """The data attack, then the update attack."""
        return (self.data,) if self.update is None else (self.data, self.update)

    def attacking(self, t: int, client_id: int) -> bool:
        """Whether ``client_id`` attacks in round ``t`` (an attacker in an attack round)."""
        return client_id in self.attackers and self.schedule.active(t)

    def training(self) -> TrainingHooks | None:
        """The chained per-step training hooks, or None when no attack has one. An attack whose training hook is
        only :meth:`Attack.prepare_round` (it overrides neither ``gradient`` nor ``project``) is left out, so the
        engines keep their speed."""
        hooked = tuple(a for a in self.attacks if "training" in a.hooks and _steps(a))
        return TrainingHooks(hooked) if hooked else None

    def bind(self, layout: ParamLayout) -> None:
        """:meth:`Attack.bind` of every attack."""
        for attack in self.attacks:
            attack.bind(layout)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every attack's :meth:`Attack.state_dict`, its names prefixed ``data.`` and ``update.``."""
        out: dict[str, torch.Tensor] = {}
        for role, attack in self._roles():
            out.update({f"{role}.{k}": v for k, v in attack.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` on an entry of no attack of this plan."""
        roles = dict(self._roles())
        split: dict[str, dict[str, torch.Tensor]] = {role: {} for role in roles}
        for key, value in state.items():
            role, _, name = str(key).partition(".")
            if role not in roles or not name:
                raise ValueError(f"attack state: entry {key!r} belongs to no attack of this run ({', '.join(roles)})")
            split[role][name] = value
        for role, attack in roles.items():
            attack.load_state_dict(split[role])

    def _roles(self) -> list[tuple[str, Attack]]:
        return [("data", self.data)] + ([] if self.update is None else [("update", self.update)])

    def prepare_round(self, t: int, global_state: torch.Tensor, ids: Sequence[int]) -> bool:
        """:meth:`Attack.observe` of every attack, then :meth:`Attack.prepare_round` of every training attack when
        some of ``ids`` attacks in round ``t``; True when the data attack's data changed."""
        for attack in self.attacks:
            attack.observe(t, global_state)
        attackers = [k for k in ids if self.attacking(t, k)]
        if not attackers:
            return False
        changed = False
        for attack in self.attacks:
            if "training" in attack.hooks:
                changed |= bool(attack.prepare_round(t, global_state, attackers)) and attack is self.data
        return changed

    @property
    def client_procedure(self) -> ClientMethod | None:
        """The client procedure the attackers run in attack rounds by the attacks' choice
        (:attr:`Attack.client_procedure` of the update attack, else of the data attack), or None."""
        for attack in reversed(self.attacks):
            if attack.client_procedure is not None:
                return attack.client_procedure
        return None

    def crafter(self) -> Crafter | None:
        """The crafting step of the update attack (None when it has no crafting hook or there are no attackers)."""
        if self.update is None or "crafting" not in self.update.hooks or not self.attackers:
            return None
        return Crafter(self.update, frozenset(self.attackers), self.schedule, self.knowledge)

    def shadows(self, t: int, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` that also train a clean model in round ``t``: the attackers of an attack round,
        when there is a crafting step that wants clean models (``partial`` knowledge or
        :attr:`Attack.needs_clean`); none otherwise (the default path trains nothing extra)."""
        crafter = self.crafter()
        if crafter is None or not crafter.wants_clean:
            return []
        return [k for k in ids if self.attacking(t, k)]


def _steps(attack: Attack) -> bool:
    """Whether ``attack`` acts per local step (overrides :meth:`Attack.gradient` or :meth:`Attack.project`)."""
    cls = type(attack)
    return cls.gradient is not Attack.gradient or cls.project is not Attack.project
