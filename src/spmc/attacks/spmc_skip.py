"""``spmc_skip``: the attackers skip SPMC's client procedure (ATTACKS.md §A5, adaptive attacks).

Source: the threat model of He et al., "SPMC" (ICML 2025), ALGORITHMS.md §4.5, assumes that malicious clients run
the same SPMC trainer as everybody (teacher, gradient projection; only their data is poisoned). An attacker who
knows the defense has no reason to: the projection of §4.3 removes the part of its poisoned cross-entropy gradient
that conflicts with the teacher's distillation gradient, i.e. it purifies the backdoor on the attacker's own
machine. ``spmc_skip`` drops it: in attack rounds the attackers train with plain SGD (same optimiser, epochs and
data as the configured client, no teacher, no projection), whatever ``client`` is.

This is exactly ``malicious_client = "plain"`` (which stays), as a registry entry so that the robustness matrix
has it as a row (``badnets+spmc_skip``): composed with a data attack (``carries_backdoor``), it sends what the
attackers trained, unchanged. Choices:

* Mechanism: :attr:`spmc.attacks.Attack.client_procedure` = ``plain``, read by
  :meth:`spmc.federation.Federation.method_for` (both engines and the Flower ClientApp), so a run with
  ``client = spmc, update_attack = spmc_skip`` is bit-identical to ``client = spmc, malicious_client = plain``
  (tested). It declares the ``training`` hook (it changes how the attackers train) but no per-step rule, so the
  engines keep their fast path; it has no crafting hook, trains no clean model and draws no random numbers.
* Outside attack rounds an attacker trains like a benign client (ATTACKS.md §A1), with the configured procedure.
* With ``client = plain`` it changes nothing.
"""

from __future__ import annotations

from typing import ClassVar

from spmc.attacks.base import Attack, Hook
from spmc.training import ClientMethod


class SpmcSkip(Attack):
    """The attackers train with plain SGD in attack rounds (they skip SPMC's client procedure)."""

    name: ClassVar[str] = "spmc_skip"
    description: ClassVar[str] = (
        "attackers skip SPMC's client procedure: plain SGD in attack rounds (= malicious_client = plain; §A5)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training"})
    carries_backdoor: ClassVar[bool] = True
    client_procedure: ClassVar[ClientMethod | None] = "plain"
