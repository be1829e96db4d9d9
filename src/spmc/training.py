"""Local training (spec §1.4, §4) and the sequential engine that trains one client after another.

Two client procedures:

* ``plain``: per mini-batch, mean cross-entropy, backward, SGD step (spec §1.4);
* ``spmc``: one forward pass of the student, the teacher's logits under ``no_grad``, G_d = ∇L_CE and G_g = ∇L_KD
  per parameter tensor, the projection of :func:`spmc.purify.project_conflicting`, and an SGD step on the
  projected CE gradient (plus ``kd_grad_weight``·G_g, 0 by default; spec §4.4, D7).

Every client gets a fresh SGD optimiser (zero momentum) each round, lr 0.01, momentum 0.9, weight decay 1e-5,
and draws its mini-batches (reshuffled every epoch) from its own generator, so the result never depends on the
order in which clients are visited. With ``drop_last`` (the paper's setting, spec D30) the last partial batch of
an epoch is dropped, ⌊n_k/B⌋ steps; without it, it is trained too, ⌈n_k/B⌉ steps, its loss the mean over its own
n_k mod B samples (as PyTorch's ``DataLoader(drop_last=False)``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from spmc.params import ParamLayout
from spmc.purify import Granularity, distillation_loss, project_conflicting

ClientMethod = Literal["plain", "spmc"]
BatchTransform = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


@dataclass
class ClientData:
    """One client's training data.

    ``x`` holds unit-float images for the on-the-fly pipeline or, when ``final`` is True, finished model inputs
    (a malicious client's frozen, poisoned data; spec §2.2, D12). ``transform(x, y, idx, generator)`` turns a
    gathered batch into model inputs (augmentation, normalisation, on-the-fly poisoning); it is not called when
    ``final`` is True.
    """

    x: torch.Tensor
    y: torch.Tensor
    final: bool = False
    transform: BatchTransform | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        """⌊n_k/B⌋ with ``drop_last``, else ⌈n_k/B⌉."""
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


@dataclass(frozen=True)
class OptimConfig:
    """SGD settings of spec §1.1 and the SPMC client options of spec §4 / §7."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 64
    drop_last: bool = True
    spmc_lambda: float = 1.0
    spmc_kd_T: float = 1.0
    spmc_proj_norm_power: float = 2.0
    spmc_proj_granularity: Granularity = "tensor"
    spmc_kd_grad_weight: float = 0.0
    spmc_teacher_bn_mode: Literal["train", "eval"] = "train"


class TrainingHook(Protocol):
    """An attack's training hook (spec ATTACKS.md §A2.2) on the stacked rows [m, d] of the attackers it trains:
    ``gradient`` transforms the gradient rows of a local step before momentum and weight decay, ``project``
    the states after the step; both see θ_g (the round's start). :class:`spmc.attacks.base.TrainingHooks`."""

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor: ...

    def project(self, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ClientTask:
    """What one client does in one round; ``training`` is the attack's training hook of an attacker in an attack
    round (None for everyone else)."""

    client_id: int
    data: ClientData
    method: ClientMethod
    epochs: int
    seed: int
    teacher: torch.Tensor | None = None
    training: TrainingHook | None = None


@dataclass
class ClientResult:
    client_id: int
    state: torch.Tensor
    mean_loss: float
    steps: int


def batches(
    data: ClientData, epochs: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``batch_size``, reshuffled every epoch with ``generator``; the last partial batch of an
    epoch (n_k mod B samples) is dropped with ``drop_last``, else yielded after the full ones. The generator's
    draws for the full batches are the same either way."""
    n = len(data)
    steps = data.steps_per_epoch(batch_size, drop_last)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(data.x.device)
        for b in range(steps):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x, y = data.x[idx], data.y[idx]
            if not data.final and data.transform is not None:
                x, y = data.transform(x, y, idx, generator)
            yield x, y


def _sgd(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


StepHook = Callable[[], None]


def plain_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, before_step: StepHook | None = None
) -> torch.Tensor:
    """One SGD step on the mean cross-entropy (spec §1.4); returns the detached loss. ``before_step`` runs between
    the backward pass and the SGD step (an attack's gradient hook)."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if before_step is not None:
        before_step()
    opt.step()
    return loss.detach()


def spmc_step(
    model: nn.Module,
    teacher: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: OptimConfig,
    before_step: StepHook | None = None,
) -> torch.Tensor:
    """One SPMC step (spec §4.2-§4.4): project ∇L_CE away from a conflicting ∇L_KD per tensor, then SGD
    (``before_step`` runs just before it, as in :func:`plain_step`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(x)
    with torch.no_grad():
        teacher_logits = teacher(x)
    ce = F.cross_entropy(logits, y)
    kd = distillation_loss(logits, teacher_logits, cfg.spmc_kd_T)
    g_kd = torch.autograd.grad(kd, params, retain_graph=True)
    g_ce = torch.autograd.grad(ce, params)
    grads = project_conflicting(g_ce, g_kd, cfg.spmc_lambda, cfg.spmc_proj_norm_power, cfg.spmc_proj_granularity)
    for p, g, gk in zip(params, grads, g_kd):
        p.grad = g + cfg.spmc_kd_grad_weight * gk if cfg.spmc_kd_grad_weight else g
    if before_step is not None:
        before_step()
    opt.step()
    return ce.detach()


class SequentialEngine:
    """The reference engine: clients trained one after another on one reusable model (and teacher) object."""

    name = "sequential"
    kernel = "torch"

    def __init__(self, model: nn.Module, layout: ParamLayout, cfg: OptimConfig) -> None:
        self.model = model
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.layout = layout
        self.cfg = cfg

    def train_client(self, start: torch.Tensor, task: ClientTask) -> ClientResult:
        """Train one client from the global state ``start`` and return its state vector."""
        self.layout.load(self.model, start)
        self.model.train()
        opt = _sgd(self.model, self.cfg)
        if task.method == "spmc":
            if task.teacher is None:
                raise ValueError(f"client {task.client_id}: the spmc client needs a teacher state")
            self.layout.load(self.teacher, task.teacher)
            self.teacher.train(self.cfg.spmc_teacher_bn_mode == "train")
        elif task.method != "plain":
            raise ValueError(f"client: unknown value {task.method!r}; allowed: plain, spmc")
        gen = torch.Generator().manual_seed(task.seed)
        total = torch.zeros((), device=start.device)
        steps = 0
        hook = task.training
        before_step = None if hook is None else functools.partial(self._gradient_hook, hook, start)
        for x, y in batches(task.data, task.epochs, self.cfg.batch_size, gen, self.cfg.drop_last):
            if task.method == "spmc":
                loss = spmc_step(self.model, self.teacher, opt, x, y, self.cfg, before_step)
            else:
                loss = plain_step(self.model, opt, x, y, before_step)
            if hook is not None:
                self.layout.load(self.model, hook.project(self.layout.flatten(self.model).unsqueeze(0), start)[0])
            total += loss
            steps += 1
        mean_loss = float(total) / steps if steps else float("nan")
        return ClientResult(task.client_id, self.layout.flatten(self.model), mean_loss, steps)

    def _gradient_hook(self, hook: TrainingHook, start: torch.Tensor) -> None:
        """The model's gradients as one row [1, d] of the layout (zero at buffers), through ``hook.gradient``, and
        back into the parameters' ``.grad``."""
        params = dict(self.model.named_parameters())
        row = torch.zeros(1, self.layout.dim, device=start.device)
        for e in self.layout.params:
            grad = params[e.name].grad
            if grad is not None:
                row[0, e.slice] = grad.reshape(-1)
        rows = self.layout.flatten(self.model).unsqueeze(0)
        new = hook.gradient(row, rows, start)
        for e in self.layout.params:
            params[e.name].grad = new[0, e.slice].reshape(e.shape).clone()

    def train_round(self, start: torch.Tensor, tasks: list[ClientTask]) -> list[ClientResult]:
        return [self.train_client(start, task) for task in tasks]


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The top-1 class [n] of ``model`` in eval mode on ``x``, in batches of ``batch_size``."""
    model.eval()
    out = [model(x[start : start + batch_size]).argmax(dim=1) for start in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def percent_correct(pred: torch.Tensor, y: torch.Tensor) -> float:
    """100 · mean(pred == y); NaN for an empty set."""
    if y.numel() == 0:
        return float("nan")
    return 100.0 * int((pred == y).sum()) / y.shape[0]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in % of ``model`` in eval mode; NaN for an empty set."""
    return percent_correct(predictions(model, x, batch_size), y)
