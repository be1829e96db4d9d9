"""``a3fl``: the adversarially adaptive backdoor (Zhang, Jia, Chen, Lin & Wu, "A3FL: Adversarially Adaptive
Backdoor Attacks to Federated Learning", NeurIPS 2023, Alg. 1; public code github.com/hfzhang31/A3FL; ATTACKS.md §A3).

Before the local training of every attack round t, the attackers optimise the trigger values δ inside the trigger's
region (the 12 ``badnets`` entries of each trigger channel, in normalised space) on a sample D of their clean data,
against the current global model θ_g and against θ_adv, a copy of θ_g trained to *unlearn* the trigger:

    θ_adv ← SGD on Σ_(x,y)∈D CE(f(x ⊕ δ; θ), y)                   (true labels; lr 0.01, momentum 0.9, wd 5e-4)
    w     = mean over conv weight tensors of cos(∇L_g, ∇L_adv)     (L = the backdoor loss below, on one batch)
    δ     ← clip(δ − η·sign ∇_δ [CE(f(x ⊕ δ; θ_g), τ) + λ·w·CE(f(x ⊕ δ; θ_adv), τ)])

x ⊕ δ writes δ into the trigger entries, τ is the target label. The adversarial copy is retrained from θ_g before
every pass over D but the first (the code's ``dm_adv_K = 1``, one copy: ``dm_adv_model_count = 1``). Then the
attackers poison as ``badnets`` (u_i < ρ, relabel to τ) with the optimised values, and the ASR test set uses the last
optimised trigger (:meth:`A3FL.prepare_round` returns True so the federation re-poisons and rebuilds it).

Defaults, the paper's code (``main/configs/config.yaml``) and ours:

* ``a3fl_trigger_lr`` η = 0.01 (paper 0.01, a signed-gradient step);
* ``a3fl_adv_lambda`` λ = 0.01 (paper ``noise_loss_lambda`` 0.01);
* ``a3fl_trigger_epochs`` = 5 passes over D (paper ``trigger_outter_epochs`` 200) — scaled down for CPU cost;
* ``a3fl_adv_epochs`` = 1 epoch of unlearning per refresh (paper ``dm_adv_epochs`` 5) — scaled down likewise;
* ``a3fl_samples`` |D| = 256, drawn (seeded by seed and round) from the pooled clean data of the round's attackers;
  the paper uses the attacker's whole local set; batches of 64 (the paper's batch size).

Choices where the source is loose or does not fit: the trigger region is the 12-entry pattern (the paper's 5×5
patch at (2, 2) would not be comparable with the other backdoors), only in the configured trigger channels, started
from the ``badnets`` values (the paper starts from 0.5 everywhere); δ is clipped to the pixel range [0, 1] mapped to
normalised space, (0 − μ_c)/σ_c … (1 − μ_c)/σ_c (the paper clips to [−2, 2], roughly that range for CIFAR-10);
the trigger persists across rounds and is optimised further each round (as the paper's ``self.trigger``). The
paper's weight w compares the two models' accumulated ``.grad`` fields; we compare the gradients of the same
backdoor loss on D. Both models run in eval mode during the trigger steps, the copy in train mode while unlearning
(as the code). In the Flower ClientApp each attacker optimises on its own data only; the server's ASR there uses
the initial trigger (the server never sees the optimised one).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from spmc.attacks.badnets import TRIGGER_COLS, TRIGGER_ROWS, relabel
from spmc.attacks.base import Attack, AttackContext, AttackSettings, Hook
from spmc.options import option
from spmc.threat import ThreatModel

#: Purpose of the seed stream of the trigger optimisation (federation: 1-6, attacker pool: 7, shadows: 8).
SEED_A3FL = 9
#: Batch size of the trigger optimisation and the unlearning (the paper's 64).
BATCH = 64


@dataclass(frozen=True)
class A3FLOptions:
    """The trigger optimisation of A3FL's Alg. 1 (defaults: the paper's, scaled down where marked)."""

    trigger_epochs: int = option(
        5,
        key="a3fl_trigger_epochs",
        help="passes over the sample per round, integer >= 1 (A3FL, NeurIPS 2023: 200; scaled for CPU)",
    )
    trigger_lr: float = option(
        0.01, key="a3fl_trigger_lr", help="signed-gradient step on the trigger, > 0 (A3FL, NeurIPS 2023: 0.01)"
    )
    adv_epochs: int = option(
        1,
        key="a3fl_adv_epochs",
        help="unlearning epochs of the adversarial copy, integer >= 0 (A3FL, NeurIPS 2023: 5; scaled)",
    )
    adv_lambda: float = option(
        0.01, key="a3fl_adv_lambda", help="weight λ of the adversarial copy's loss, >= 0 (A3FL, NeurIPS 2023: 0.01)"
    )
    samples: int = option(
        256,
        key="a3fl_samples",
        help="clean attacker samples the trigger is optimised on, integer >= 1 (A3FL, NeurIPS 2023: all)",
    )

    def __post_init__(self) -> None:
        for key, value, low in (
            ("a3fl_trigger_epochs", self.trigger_epochs, 1),
            ("a3fl_adv_epochs", self.adv_epochs, 0),
            ("a3fl_samples", self.samples, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}: got {value!r}; must be an integer >= {low}")
        if isinstance(self.trigger_lr, bool) or not self.trigger_lr > 0.0:
            raise ValueError(f"a3fl_trigger_lr: got {self.trigger_lr!r}; must be > 0")
        if isinstance(self.adv_lambda, bool) or not self.adv_lambda >= 0.0:
            raise ValueError(f"a3fl_adv_lambda: got {self.adv_lambda!r}; must be >= 0")


def stamp(x: torch.Tensor, trigger: torch.Tensor, channels: Sequence[int], rows: torch.Tensor | None = None) -> None:
    """Write ``trigger`` [len(channels), 2, 6] into the 12 entries of each channel of ``x`` [B, C, H, W] (in place;
    only rows where ``rows`` is True)."""
    r = torch.tensor(TRIGGER_ROWS, device=x.device)[:, None]
    c = torch.tensor(TRIGGER_COLS, device=x.device)[None, :]
    for i, channel in enumerate(channels):
        if rows is None:
            x[:, channel, r, c] = trigger[i]
        else:
            patch = x[:, channel, r, c]
            patch[rows] = trigger[i].to(patch.dtype)
            x[:, channel, r, c] = patch


class A3FL(Attack):
    """A trigger optimised each attack round against θ_g and an unlearning copy; then ``badnets`` poisoning."""

    name: ClassVar[str] = "a3fl"
    description: ClassVar[str] = (
        "adversarially adaptive backdoor (Zhang 2023): the trigger values are optimised each attack round against "
        "θ_g and a copy trained to unlearn them"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"data", "training"})
    targeted: ClassVar[bool] = True
    options_type: ClassVar[type[A3FLOptions]] = A3FLOptions
    options: A3FLOptions

    def __init__(
        self,
        settings: AttackSettings | None = None,
        options: A3FLOptions | None = None,
        threat: ThreatModel | None = None,
    ) -> None:
        super().__init__(settings, options, threat)
        values = self.settings.trigger
        self.channels: tuple[int, ...] = tuple(values)
        #: δ, one [2, 6] block per trigger channel, in normalised space (starts at the ``badnets`` values).
        self.trigger = torch.stack(
            [torch.full((len(TRIGGER_ROWS), len(TRIGGER_COLS)), values[c]) for c in self.channels]
        )
        self.context: AttackContext | None = None

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixel range [0, 1] in normalised space, per trigger channel, shaped like the trigger."""
        mean, std = self.settings.mean, self.settings.std

        def at(values: tuple[float, ...], c: int) -> float:
            return values[c] if len(values) > c else values[-1]

        low = torch.tensor([(0.0 - at(mean, c)) / at(std, c) for c in self.channels])[:, None, None]
        high = torch.tensor([(1.0 - at(mean, c)) / at(std, c) for c in self.channels])[:, None, None]
        return low, high

    # ------------------------------------------------------------------------------------------------ data

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """u_i < ρ with u_i ~ U[0, 1) for every index i (the ``badnets`` rule)."""
        return (torch.rand(labels.shape[0], generator=generator) < rate).to(labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The current trigger written into the masked rows (in place), relabelled to τ_bd."""
        stamp(x, self.trigger.to(x.device), self.channels, rows=mask)
        return x, relabel(y, mask, self.settings.target)

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every test image with the current trigger, labelled τ_bd; ``x`` is not modified."""
        xb, yb = self.poison(x.clone(), y, torch.ones_like(y, dtype=torch.bool), generator)
        return xb, yb, y != self.settings.target

    # -------------------------------------------------------------------------------------------- training

    def attach(self, context: AttackContext) -> None:
        """Keep the run's scratch model and the attackers' clean data for :meth:`prepare_round`."""
        self.context = context

    def sample(self, t: int, attacker_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """D: a seeded subset of ``a3fl_samples`` of the round's attackers' pooled clean data."""
        assert self.context is not None
        parts = [self.context.clean(k) for k in sorted(attacker_ids)]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        rng = np.random.default_rng(np.random.SeedSequence([int(self.threat.seed), SEED_A3FL, int(t)]))
        n = min(self.options.samples, int(y.shape[0]))
        idx = torch.as_tensor(np.sort(rng.choice(int(y.shape[0]), size=n, replace=False)), device=y.device)
        return x[idx].contiguous(), y[idx]

    def backdoor_loss(self, model: torch.nn.Module, x: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
        """CE(f(x ⊕ δ), τ) of ``model`` (differentiable in ``trigger``)."""
        xs = x.clone()
        stamp(xs, trigger, self.channels)
        target = torch.full((x.shape[0],), self.settings.target, dtype=torch.long, device=x.device)
        return F.cross_entropy(model(xs), target)

    def prepare_round(self, t: int, global_state: torch.Tensor, attacker_ids: Sequence[int]) -> bool:
        """Optimise δ (Alg. 1) against θ_g and the unlearning copy; True (the trigger changed)."""
        if self.context is None:
            raise RuntimeError(
                "attack 'a3fl': prepare_round needs the run's model and data (Federation.build attaches)"
            )
        x, y = self.sample(t, attacker_ids)
        model = self.context.model
        self.context.layout.load(model, global_state)
        model.eval()
        device = x.device
        low, high = (b.to(device) for b in self.bounds())
        delta = self.trigger.to(device).clone()
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([int(self.threat.seed), SEED_A3FL, t, 1]).generate_state(1)[0])
        )
        opts = self.options
        adv: torch.nn.Module | None = None
        weight = 0.0
        for epoch in range(opts.trigger_epochs):
            if epoch > 0 and opts.adv_lambda > 0.0 and opts.adv_epochs > 0:
                adv = self.unlearn(model, x, y, delta, gen)
                weight = self.similarity(model, adv, x[:BATCH], delta)
            for b in torch.randperm(int(y.shape[0]), generator=gen).to(device).split(BATCH):
                d = delta.clone().requires_grad_(True)
                loss = self.backdoor_loss(model, x[b], d)
                if adv is not None:
                    loss = loss + opts.adv_lambda * weight * self.backdoor_loss(adv, x[b], d)
                (grad,) = torch.autograd.grad(loss, d)
                delta = torch.minimum(torch.maximum(delta - opts.trigger_lr * grad.sign(), low), high).detach()
        self.trigger = delta.cpu()
        return True

    def unlearn(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, gen: torch.Generator
    ) -> torch.nn.Module:
        """θ_adv: a copy of θ_g trained on the triggered sample with its true labels (the paper's SGD settings)."""
        adv = copy.deepcopy(model)
        adv.train()
        opt = torch.optim.SGD(adv.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for _ in range(self.options.adv_epochs):
            for b in torch.randperm(int(y.shape[0]), generator=gen).to(x.device).split(BATCH):
                xs = x[b].clone()
                stamp(xs, delta, self.channels)
                opt.zero_grad()
                F.cross_entropy(adv(xs), y[b]).backward()
                opt.step()
        adv.eval()
        return adv

    def similarity(self, model: torch.nn.Module, adv: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> float:
        """w: the mean cosine similarity of the two models' gradients of the backdoor loss over the conv weights."""
        grads = []
        for m in (model, adv):
            params = [p for p in m.parameters() if p.dim() == 4]
            grads.append(torch.autograd.grad(self.backdoor_loss(m, x, delta), params))
        cos = [F.cosine_similarity(g.flatten(), h.flatten(), dim=0, eps=1e-8) for g, h in zip(*grads)]
        return float(torch.stack(cos).mean()) if cos else 1.0
