"""The threat model a run assumes (spec §2.1): how many clients, which fraction γ of them attack, the seed.

It sits below :mod:`spmc.config` (which composes it from the flat options) and is the one place of the rule
m = ⌊γK⌋; the attacks place the attackers with it, and the defenses that need an attacker count (Krum, Multi-Krum,
the trimmed mean, DnC) or the run's seed (DnC, CRFL) receive it.
"""

from __future__ import annotations

from dataclasses import dataclass


def num_attackers(gamma: float, clients: int) -> int:
    """m = ⌊γ·K⌋ for K = ``clients``, guarded against float error (0.3·10 = 2.9999… gives 3; spec §2.1)."""
    return int(gamma * clients + 1e-9)


@dataclass(frozen=True)
class ThreatModel:
    """K = ``num_clients`` clients of which a fraction γ = ``gamma`` attack while ``attack_active`` (an attack is
    configured); ``seed`` is the experiment seed. The defaults are those of the default experiment."""

    num_clients: int = 10
    gamma: float = 0.3
    attack_active: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"num_clients: got {self.num_clients!r}; must be an integer >= 1")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma: got {self.gamma!r}; must be a fraction in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: got {self.seed!r}; must be an integer >= 0")

    @property
    def expected_attackers(self) -> int:
        """m = ⌊γK⌋ when an attack runs, else 0."""
        return num_attackers(self.gamma, self.num_clients) if self.attack_active else 0

    @property
    def malicious_ids(self) -> tuple[int, ...]:
        """The last m client ids (spec §2.1)."""
        return tuple(range(self.num_clients - self.expected_attackers, self.num_clients))


def resolve_count(given: int | None, threat: ThreatModel | None) -> int:
    """An option that counts attackers (``krum_f``, ``trimmed_mean_k``): ``given``, or m = ⌊γK⌋ of ``threat``
    (of the default :class:`ThreatModel` when None) when it is None."""
    if given is not None:
        return given
    return (threat if threat is not None else ThreatModel()).expected_attackers
