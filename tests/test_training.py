"""Local training (spec §1.4, §4): the SPMC step against an independent construction, batching rules."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spmc.models import SimpleCNN
from spmc.training import ClientData, OptimConfig, batches, spmc_step


def _numpy_project(gd: np.ndarray, gg: np.ndarray, lam: float) -> np.ndarray:
    dot = float(gd @ gg)
    if np.linalg.norm(gd) > 0 and np.linalg.norm(gg) > 0 and dot < 0:
        return gd - lam * dot / float(gg @ gg) * gg
    return gd


def test_spmc_step_gradient_matches_independent_computation() -> None:
    torch.manual_seed(0)
    student, teacher = SimpleCNN(), SimpleCNN()
    teacher.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in student.state_dict().items()})
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    # Independent path: separate forward passes, KL form of the distillation gradient, numpy projection.
    p_t = torch.softmax(teacher(x), 1).detach()
    ce_grads = torch.autograd.grad(F.cross_entropy(student(x), y), list(student.parameters()))
    kl = F.kl_div(F.log_softmax(student(x), 1), p_t, reduction="batchmean")
    kd_grads = torch.autograd.grad(kl, list(student.parameters()))
    lam = 0.7
    expected = [
        _numpy_project(d.flatten().double().numpy(), g.flatten().double().numpy(), lam)
        for d, g in zip(ce_grads, kd_grads)
    ]
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    spmc_step(student, teacher, opt, x, y, OptimConfig(spmc_lambda=lam))
    conflicts = 0
    for p, e, d, g in zip(student.parameters(), expected, ce_grads, kd_grads):
        np.testing.assert_allclose(p.grad.flatten().double().numpy(), e, rtol=1e-4, atol=1e-6)
        conflicts += int(float((d * g).sum()) < 0)
    assert 0 < conflicts < 14  # the case exercises both branches


def test_batches_drop_last_and_reshuffle() -> None:
    data = ClientData(torch.arange(10.0).view(10, 1), torch.arange(10), final=True)
    gen = torch.Generator().manual_seed(0)
    out = list(batches(data, epochs=2, batch_size=4, generator=gen))
    assert len(out) == 4  # ⌊10/4⌋ = 2 steps per epoch
    first_epoch = torch.cat([b[1] for b in out[:2]])
    assert len(set(first_epoch.tolist())) == 8
    assert not torch.equal(first_epoch, torch.cat([b[1] for b in out[2:]]))
    assert list(batches(ClientData(torch.zeros(3, 1), torch.zeros(3)), 5, 4, gen)) == []  # n_k < batch: no step
