"""``neurotoxin``: durable backdoors in rarely updated coordinates (Zhang, Panda, Song, Yang, Mahoney, Mittal,
Ramchandran, Gonzalez, "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022, arXiv 2206.10341, Alg. 1;
ATTACKS.md §A4).

The benign clients' recent direction is read off the global model: Δ = |θ_g^t − θ_g^{t−1}| per parameter. Every
local gradient of an attacker (before momentum and weight decay) is masked to the coordinates OUTSIDE the top-k
fraction of Δ,

    g_j ← 0 for j ∈ top_k(Δ),  k = ⌊``neurotoxin_topk`` · P⌋ of the P trainable parameters,

so that the backdoor lives in coordinates the benign updates rarely touch and is overwritten slowly; no mask in
round 0 (no previous global model). Like the paper, the attackers also apply the ``pgd`` projection (Alg. 1 line 9):
after every local step θ is projected onto {‖θ − θ_g‖₂ ≤ ε}, ε = ``pgd_eps`` (None = auto, as in :mod:`pgd`).

Choices where the source is loose:

* k: the paper masks the top-k% of the benign gradient; for image tasks its public code
  (github.com/jhcknzzm/Federated-Learning-Backdoor, ``--gradmask_ratio 0.95`` in its CIFAR-10/100 and EMNIST
  scripts, i.e. keep the 95 % least-updated coordinates) masks the top 5 %: ``neurotoxin_topk = 0.05``.
* The benign direction: the paper's code accumulates the gradient of the attacker's clean data; §A4 takes the global
  update θ_g^t − θ_g^{t−1}, which the attacker observes without extra training. θ_g^{t−1} is the global state of
  the last round the attack observed (:meth:`Attack.observe`, called every round in the simulator, so t − 1 there;
  in Flower the ClientApp observes the rounds in which it is sampled). It is checkpointed (``state_dict``).
* Ties in Δ (e.g. an all-zero Δ) are broken by ``torch.topk``; the mask covers trainable parameters only (buffers
  have no gradient). Weight decay still moves masked coordinates, as in the paper's code (the mask multiplies the
  gradient before ``optimizer.step``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from spmc.attacks.base import AttackSettings, Hook
from spmc.attacks.pgd import PGD, PGD_EPS_HELP, check_pgd_eps, load_eps
from spmc.options import option
from spmc.threat import ThreatModel


@dataclass(frozen=True)
class NeurotoxinOptions:
    """The masked fraction k and the PGD radius ε (None: auto)."""

    topk: float = option(
        0.05,
        key="neurotoxin_topk",
        help="fraction in [0, 1) of parameters most changed by the last global update whose gradient is masked (§A4)",
    )
    eps: float | None = option(None, key="pgd_eps", help=PGD_EPS_HELP)

    def __post_init__(self) -> None:
        k = self.topk
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or not 0.0 <= k < 1.0:
            raise ValueError(f"neurotoxin_topk: got {k!r}; must be a fraction in [0, 1)")
        check_pgd_eps(self.eps)


def top_coordinates(delta: torch.Tensor, fraction: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The indices of the ⌊fraction·P⌋ largest |delta| among the P coordinates of ``mask`` (all when None)."""
    magnitude = delta.abs()
    if mask is not None:
        magnitude = torch.where(mask, magnitude, torch.full_like(magnitude, -1.0))
        count = int(mask.sum())
    else:
        count = magnitude.numel()
    k = int(fraction * count + 1e-9)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=delta.device)
    return torch.topk(magnitude, k, sorted=False).indices


class Neurotoxin(PGD):
    """The gradient masked outside the top-k coordinates of the last global update, plus the PGD projection."""

    name: ClassVar[str] = "neurotoxin"
    description: ClassVar[str] = (
        "mask local gradients on the top neurotoxin_topk coordinates of |θ_g^t − θ_g^{t−1}|, plus PGD (Zhang 2022)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training", "crafting"})
    options_type: ClassVar[type[Any] | None] = NeurotoxinOptions

    def __init__(
        self, settings: AttackSettings | None = None, options: Any = None, threat: ThreatModel | None = None
    ) -> None:
        super().__init__(settings, options, threat)
        self.seen_round: int | None = None
        self.seen_state: torch.Tensor | None = None
        self.masked: torch.Tensor | None = None  # the indices whose gradient is zeroed this round; None: no mask

    def observe(self, t: int, global_state: torch.Tensor) -> None:
        """θ_g^t: the mask of round ``t`` from θ_g^t − (the state of the last observed round before ``t``)."""
        if self.seen_round == t:
            return
        previous = self.seen_state if self.seen_round is not None and self.seen_round < t else None
        self.masked = None
        if previous is not None:
            delta = global_state - previous.to(global_state.device)
            self.masked = top_coordinates(delta, float(self.options.topk), self.param_mask(global_state.device))
        self.seen_round, self.seen_state = t, global_state.detach().cpu().clone()

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """The gradient rows with the masked coordinates set to zero (unchanged without a mask)."""
        if self.masked is None or self.masked.numel() == 0:
            return grad
        out = grad.clone()
        out[:, self.masked.to(grad.device)] = 0.0
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned ε, the last observed round and its global state."""
        state = super().state_dict()
        if self.seen_round is not None and self.seen_state is not None:
            state["seen_round"] = torch.tensor(self.seen_round, dtype=torch.long)
            state["seen_state"] = self.seen_state.clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (the mask is recomputed when the next round is observed)."""
        eps = load_eps(self.name, state, frozenset({"seen_round", "seen_state"}))
        seen = state.get("seen_round")
        seen_state = state.get("seen_state")
        if (seen is None) != (seen_state is None):
            raise ValueError(f"attack {self.name!r}: state needs both 'seen_round' and 'seen_state' or neither")
        if seen is not None and seen_state is not None:
            if not isinstance(seen, torch.Tensor) or seen.numel() != 1 or seen.is_floating_point() or int(seen) < 0:
                raise ValueError(f"attack {self.name!r}: state 'seen_round' must be an integer scalar >= 0")
            if not isinstance(seen_state, torch.Tensor) or seen_state.dim() != 1 or not seen_state.is_floating_point():
                raise ValueError(f"attack {self.name!r}: state 'seen_state' must be a float vector")
            if self.layout is not None and seen_state.numel() != self.layout.dim:
                raise ValueError(
                    f"attack {self.name!r}: state 'seen_state' has {seen_state.numel()} entries; "
                    f"the model has {self.layout.dim}"
                )
            if not bool(torch.isfinite(seen_state).all()):
                raise ValueError(f"attack {self.name!r}: state 'seen_state' is not finite")
            self.seen_round, self.seen_state = int(seen), seen_state.detach().cpu().clone()
        else:
            self.seen_round, self.seen_state = None, None
        self.masked = None
        self.learned_eps = eps
