"""``dba``: the distributed backdoor attack (Xie, Huang, Chen & Li, "DBA: Distributed Backdoor Attacks against
Federated Learning", ICLR 2020; ATTACKS.md §A3).

The global trigger is the 12-entry ``badnets`` pattern (rows {0, 2} × columns {0, 1, 2, 4, 5, 6} of the trigger
channels, value v_c in normalised space). It is split into ``dba_parts`` local triggers; with the default 4 (the
paper's four-part split of its pixel pattern):

    part 0 = row 0 × cols {0, 1, 2}    part 1 = row 0 × cols {4, 5, 6}
    part 2 = row 2 × cols {0, 1, 2}    part 3 = row 2 × cols {4, 5, 6}

The i-th attacker by rank (its position in the sorted attacker ids) poisons its samples with part i mod parts only
(:meth:`DBA.poison_for`); samples are chosen by the ``badnets`` rule (u_i < ρ) and relabelled to τ_bd. The ASR test
set uses the full global trigger (the paper evaluates the assembled trigger).

Choices: ``dba_parts`` = 2 splits by row (row 0, row 2), 1 is the global trigger itself (then DBA = badnets); other
splits of 12 entries are not in the paper and are refused. :meth:`DBA.poison` without a rank writes the global
trigger (what :func:`spmc.attacks.backdoor.poison_batch` and the test set use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.attacks.badnets import TRIGGER_COLS, TRIGGER_ROWS, apply_trigger, relabel
from spmc.attacks.base import Attack, Hook
from spmc.options import option

Entry = tuple[int, int]

#: The local triggers of each allowed split, as (row, column) entries of the global 12-entry pattern.
SPLITS: dict[int, tuple[tuple[Entry, ...], ...]] = {
    1: (tuple((r, c) for r in TRIGGER_ROWS for c in TRIGGER_COLS),),
    2: tuple(tuple((r, c) for c in TRIGGER_COLS) for r in TRIGGER_ROWS),
    4: tuple(tuple((r, c) for c in cols) for r in TRIGGER_ROWS for cols in (TRIGGER_COLS[:3], TRIGGER_COLS[3:])),
}


@dataclass(frozen=True)
class DBAOptions:
    """How many local triggers the global one is split into."""

    parts: int = option(
        4, key="dba_parts", help="local triggers the 12-entry pattern is split into, one of 1, 2, 4 (Xie 2020)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.parts, bool) or self.parts not in SPLITS:
            raise ValueError(f"dba_parts: got {self.parts!r}; allowed: 1, 2, 4")


def local_trigger(parts: int, rank: int) -> tuple[Entry, ...]:
    """The entries the attacker of rank ``rank`` writes: part rank mod ``parts``."""
    split = SPLITS[parts]
    return split[rank % len(split)]


def apply_entries(
    x: torch.Tensor, values: dict[int, float], entries: tuple[Entry, ...], rows: torch.Tensor
) -> torch.Tensor:
    """Write v_c at ``entries`` of every trigger channel c of the rows of ``x`` [B, C, H, W] where ``rows`` is
    True (in place)."""
    r = torch.tensor([e[0] for e in entries], device=x.device)
    c = torch.tensor([e[1] for e in entries], device=x.device)
    for channel, value in values.items():
        patch = x[:, channel, r, c]
        patch[rows] = value
        x[:, channel, r, c] = patch
    return x


class DBA(Attack):
    """Each attacker writes its part of the pattern; the test set uses the whole pattern (data hook only)."""

    name: ClassVar[str] = "dba"
    description: ClassVar[str] = (
        "distributed backdoor (Xie 2020): attacker i writes local trigger i mod dba_parts; ASR on the global trigger"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"data"})
    targeted: ClassVar[bool] = True
    options_type: ClassVar[type[DBAOptions]] = DBAOptions
    options: DBAOptions

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """u_i < ρ with u_i ~ U[0, 1) for every index i (the ``badnets`` rule)."""
        return (torch.rand(labels.shape[0], generator=generator) < rate).to(labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global trigger written into the masked rows (in place), relabelled to τ_bd."""
        apply_trigger(x, self.settings.trigger, rows=mask)
        return x, relabel(y, mask, self.settings.target)

    def poison_for(
        self,
        attacker: int,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local trigger ``attacker`` mod ``dba_parts`` written into the masked rows (in place), relabelled."""
        apply_entries(x, self.settings.trigger, local_trigger(self.options.parts, attacker), mask)
        return x, relabel(y, mask, self.settings.target)

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every test image with the global trigger, labelled τ_bd; ``x`` is not modified."""
        xb, yb = self.poison(x.clone(), y, torch.ones_like(y, dtype=torch.bool), generator)
        return xb, yb, y != self.settings.target
