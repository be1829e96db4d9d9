"""Bucketing (Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022,
Alg. 1; ATTACKS.md §A6): average random buckets of s clients, then apply a robust rule to the bucket means.

    π      = a random permutation of the round's clients in increasing id order, drawn from
             ``round_generator(seed, round)`` (so it depends on the seed, the round and the ids only)
    B_i    = {π(i·s), …, π(i·s + s − 1)},  i = 0 … ⌈n/s⌉ − 1      (the last bucket may be smaller)
    x̄_i    = (1/|B_i|) Σ_{k ∈ B_i} θ_k                              (the whole state, a pseudo-client)
    θ_g   ← base({x̄_i})                                             base = ``bucketing_base``, s = ``bucket_size``

The pseudo-client of B_i has the id min B_i and the sum of its members' sample counts; the base rule sees the
pseudo-clients in increasing id order. With s = 1 every bucket is one client and the result is exactly the base
rule's on the clients in id order. The base rule's weight w_i of a bucket is split evenly among its members
(w_k = w_i / |B_i|, so the weights still sum to one, as the bucket mean gives each member 1/|B_i|); a client is
accepted when its bucket is. The base's own diagnostics are kept under ``"base"``.

Default s = 2, as ATTACKS.md §A6 says (the authors' code, epfml/byzantine-robust-noniid-optimizer, fixes s = 2
when it varies other settings and also tries s ∈ {0, 5}). Default base rule: ``median`` (coordinate-wise median),
one of the paper's base rules, that needs no attacker count. Krum and the trimmed mean take f = m from the threat
model, a safe count of buckets (an attacker spoils at most one bucket), but Krum then needs ⌈n/s⌉ > 2m + 2
pseudo-clients: 5 buckets of the default 10 clients with m = 3 are too few. Any
registered defense that needs no server data may be the base, except bucketing itself.

The base rule is one object kept across rounds, so a stateful base (``centered_clip``) keeps its state; bucketing's
``state_dict`` is the base's. The base rule is ``base`` when given (built with the options one wants); else
``DEFENSES[bucketing_base]`` built by :func:`spmc.options.build_method` from ``config`` (the flat configuration
values, a mapping by key or an object with the keys as attributes, so ``cc_tau`` or ``krum_f`` reach the base), or
with its default options when ``config`` is None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from spmc.defenses.base import Aggregate, Defense, RoundInputs, Stateful, round_generator, weighted_average
from spmc.options import build_method, option
from spmc.threat import ThreatModel


def check_base(name: str) -> None:
    """Raise unless ``name`` is a registered defense that bucketing can use as its base rule."""
    from spmc.defenses import DEFENSES  # the registry imports this module

    allowed = sorted(k for k, cls in DEFENSES.items() if k != "bucketing" and not cls.needs_server_data)
    if name not in allowed:
        raise ValueError(f"bucketing_base: got {name!r}; allowed: {', '.join(allowed)}")


def make_buckets(client_ids: tuple[int, ...], size: int, generator: torch.Generator) -> list[list[int]]:
    """The buckets as lists of positions into ``client_ids``: a permutation (from ``generator``) of the clients in
    increasing id order cut into consecutive groups of ``size`` (the last one may be smaller), then ordered by the
    smallest id of each bucket."""
    order = sorted(range(len(client_ids)), key=lambda i: client_ids[i])
    perm = torch.randperm(len(order), generator=generator).tolist()
    shuffled = [order[i] for i in perm]
    buckets = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    return sorted(buckets, key=lambda b: min(client_ids[i] for i in b))


def bucket_inputs(inputs: RoundInputs, buckets: list[list[int]]) -> RoundInputs:
    """The pseudo-clients: the uniform mean state of each bucket, id = the bucket's smallest id, samples = their
    sum; same global state, layout and round, no server data."""
    states = inputs.client_states
    means = torch.stack(
        [
            weighted_average(
                states[torch.tensor(b, dtype=torch.long, device=states.device)],
                torch.full((len(b),), 1.0 / len(b), dtype=torch.float64),
            )
            for b in buckets
        ]
    )
    ids = tuple(min(inputs.client_ids[i] for i in b) for b in buckets)
    counts = torch.stack([inputs.num_samples[b].sum() for b in buckets]).to(inputs.num_samples.dtype)
    return RoundInputs(inputs.global_state, means, ids, counts, inputs.layout, inputs.round)


class BaseRule:
    """Holds bucketing's base defense; two holders are equal when their defenses have the same type and attributes
    (so that two bucketings built alike compare equal attribute by attribute)."""

    def __init__(self, defense: Defense) -> None:
        self.defense = defense

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BaseRule)
            and type(self.defense) is type(other.defense)
            and vars(self.defense) == vars(other.defense)
        )

    def __hash__(self) -> int:
        return hash(type(self.defense))


@dataclass(frozen=True)
class BucketingOptions:
    """Bucketing's options: the bucket size s and the base rule's registry name."""

    size: int = option(2, "bucket_size", "bucketing: clients per bucket s (>= 1; Karimireddy et al. ICLR 2022: 2)")
    base: str = option(
        "median",
        "bucketing_base",
        "bucketing: the defense applied to the bucket means, one of the registry without server data, not "
        "bucketing (e.g. median, rfa, centered_clip, krum; Karimireddy et al. ICLR 2022)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= 100_000:
            raise ValueError(f"bucket_size: got {self.size!r}; must be an integer in 1 … 100000")
        check_base(self.base)


class Bucketing:
    """Random buckets of s clients averaged into pseudo-clients, then a base rule from the registry."""

    name: ClassVar[str] = "bucketing"
    description: ClassVar[str] = "Bucketing: means of random buckets of s clients, then a base rule (ICLR'22)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[BucketingOptions]] = BucketingOptions

    def __init__(
        self,
        options: BucketingOptions | None = None,
        threat: ThreatModel | None = None,
        base: Defense | None = None,
        config: Mapping[str, Any] | Any | None = None,
    ) -> None:
        from spmc.defenses import DEFENSES  # the registry imports this module

        self.options = options if options is not None else BucketingOptions()
        self.seed = (threat if threat is not None else ThreatModel()).seed
        if base is None:
            values = config if config is not None else {}
            base = build_method(DEFENSES[self.options.base], values, threat=threat)
        elif base.name != self.options.base:
            raise ValueError(f"bucketing_base: got {self.options.base!r} but the base rule given is {base.name!r}")
        self.base = BaseRule(base)

    def check_clients(self, n: int) -> None:
        """The base rule's check on the ⌈n/s⌉ pseudo-clients of a round of n clients."""
        check = getattr(self.base.defense, "check_clients", None)
        if check is not None:
            check(math.ceil(n / self.options.size))

    def state_dict(self) -> dict[int, torch.Tensor]:
        """The base rule's state (``{}`` for a stateless base)."""
        base = self.base.defense
        return base.state_dict() if isinstance(base, Stateful) else {}

    def load_state_dict(self, state: Mapping[int | str, torch.Tensor]) -> None:
        """Restore the base rule's state written by :meth:`state_dict`."""
        base = self.base.defense
        if isinstance(base, Stateful):
            base.load_state_dict(state)
        elif state:
            raise ValueError(f"bucketing: the base rule {base.name!r} keeps no state; got {len(state)} entries")

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        buckets = make_buckets(inputs.client_ids, self.options.size, round_generator(self.seed, inputs.round))
        pseudo = bucket_inputs(inputs, buckets)
        agg = self.base.defense.aggregate(pseudo)
        weights = None
        if agg.weights is not None:
            weights = torch.zeros(inputs.n, dtype=torch.float64)
            for b, wb in zip(buckets, agg.weights.to(torch.float64).tolist()):
                weights[b] = wb / len(b)
        accepted = None
        if agg.accepted is not None:
            chosen = set(agg.accepted)
            member_of = {inputs.client_ids[i]: pid for pid, b in zip(pseudo.client_ids, buckets) for i in b}
            accepted = tuple(cid for cid in inputs.client_ids if member_of[cid] in chosen)
        diagnostics: dict[str, Any] = {
            "buckets": {
                str(pid): sorted(inputs.client_ids[i] for i in b) for pid, b in zip(pseudo.client_ids, buckets)
            },
            "base": agg.diagnostics,
        }
        if accepted is not None:
            diagnostics["removed"] = sorted(cid for cid in inputs.client_ids if cid not in accepted)
        return Aggregate(
            global_state=agg.global_state,
            weights=weights,
            accepted=accepted,
            diagnostics=diagnostics,
            eval_state=agg.eval_state,
        )
