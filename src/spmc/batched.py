"""The batched engine: all the clients of a round trained together as one stacked SimpleCNN (issue 4).

The C clients' parameters are the rows of one leaf tensor P ∈ R^{C×d}. Per-tensor views of P feed a stacked
forward pass: the convolutions of all clients run as one grouped convolution (``groups = C``, activations in
channels_last), the linear layers as one batched matmul (``baddbmm``). The loss is Σ_k L_k, so ∂/∂P_k is client k's
own gradient. Each step computes only the clients that still have a mini-batch, so a client with fewer
mini-batches takes exactly the steps it would take alone (spec §1.4) and idle clients cost nothing; SGD with
momentum and weight decay is applied to their rows:

    buf_k ← μ·buf_k + g_k + λ_wd·P_k ,  P_k ← P_k − η·buf_k        for active clients; unchanged otherwise.

Each client draws its mini-batches from the same per-client generator and in the same order as the sequential
engine, so both engines give the same states to floating-point tolerance. SPMC clients (spec §4) project their CE
gradient with :func:`spmc.purify.project_rows`, all clients and tensors at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from spmc.models import SimpleCNN
from spmc.params import ParamLayout
from spmc.purify import project_rows, segment_ids
from spmc.training import ClientResult, ClientTask, OptimConfig, batches

_CONVS = ("conv1", "conv2")
_LINEARS = ("fc1", "fc2", "l1", "l2", "cls")
_RELU_AFTER = {"fc1", "fc2", "l1"}


def supports(model: torch.nn.Module, layout: ParamLayout) -> bool:
    """The batched engine handles SimpleCNN (parameters only, no buffers)."""
    return isinstance(model, SimpleCNN) and layout.num_params == layout.dim


class StackedSimpleCNN:
    """A functional SimpleCNN over C stacked parameter rows."""

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self.entries = {e.name: e for e in layout.entries}

    def _view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        e = self.entries[name]
        return rows[:, e.slice].reshape(rows.shape[0], *e.shape)

    def forward(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits [C, B, classes] for inputs ``x`` [B, C·3, 32, 32] (client k's images in channels 3k … 3k+2)."""
        c = rows.shape[0]
        h = x
        for name in _CONVS:
            w = self._view(rows, f"{name}.weight")
            b = self._view(rows, f"{name}.bias")
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), groups=c)
            h = F.relu(F.max_pool2d(h, 2), inplace=True)  # = max_pool(relu(h)), on a 4× smaller tensor
        batch = h.shape[0]
        h = h.reshape(batch, c, -1).transpose(0, 1)
        for name in _LINEARS:
            w = self._view(rows, f"{name}.weight")
            b = self._view(rows, f"{name}.bias")
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if name in _RELU_AFTER:
                h = F.relu(h, inplace=True)
        return h


def _next_or_none(it: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    return next(it, None)


class BatchedEngine:
    """Train every client of a round together; same interface and same results as the sequential engine."""

    name = "batched"

    def __init__(self, layout: ParamLayout, cfg: OptimConfig, channels_last: bool = True) -> None:
        self.layout = layout
        self.cfg = cfg
        self.net = StackedSimpleCNN(layout)
        self.channels_last = channels_last
        self.numels = [e.numel for e in layout.entries]

    def _gather(
        self, step: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack one batch per client into [B, C·3, 32, 32] (channels_last) and labels [C, B]."""
        bs = self.cfg.batch_size
        buf = torch.empty(bs, 32, 32, len(step) * 3, device=device)
        for k, (x, _) in enumerate(step):
            buf[:, :, :, 3 * k : 3 * k + 3] = x.permute(0, 2, 3, 1)
        x = buf.permute(0, 3, 1, 2)
        return (x if self.channels_last else x.contiguous()), torch.stack([y for _, y in step])

    def train_round(self, start: torch.Tensor, tasks: list[ClientTask]) -> list[ClientResult]:
        """Train ``tasks`` from the global state ``start``; returns each client's state, mean loss and steps."""
        if not tasks:
            return []
        cfg = self.cfg
        device = start.device
        c = len(tasks)
        spmc = torch.tensor([t.method == "spmc" for t in tasks], device=device)
        teachers = None
        if bool(spmc.any()):
            teachers = torch.stack([t.teacher if t.teacher is not None else start for t in tasks])
        granularity = cfg.spmc_proj_granularity
        segments = segment_ids(self.numels, granularity, device)
        num_segments = len(self.numels) if granularity == "tensor" else 1
        rows = start.unsqueeze(0).repeat(c, 1)
        momentum = torch.zeros_like(rows)
        gens = [torch.Generator().manual_seed(t.seed) for t in tasks]
        iters = [batches(t.data, t.epochs, cfg.batch_size, g) for t, g in zip(tasks, gens)]
        loss_sum = torch.zeros(c, device=device)
        steps = torch.zeros(c, dtype=torch.long)
        while True:
            step = [_next_or_none(it) for it in iters]
            active = [k for k, item in enumerate(step) if item is not None]
            if not active:
                break
            # Only the clients that still have a batch are computed; the others keep their state and momentum.
            idx = torch.tensor(active, device=device)
            steps[active] += 1
            sub = rows[idx].requires_grad_(True)
            x, y = self._gather([step[k] for k in active], device)
            logits = self.net.forward(sub, x)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            ce = ce.view(len(active), -1).mean(dim=1)
            if teachers is None:
                (grad,) = torch.autograd.grad(ce.sum(), sub)
            else:
                with torch.no_grad():
                    target = torch.softmax(self.net.forward(teachers[idx], x) / cfg.spmc_kd_T, dim=-1)
                kd = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean(dim=1) * cfg.spmc_kd_T**2
                (g_kd,) = torch.autograd.grad(kd.sum(), sub, retain_graph=True)
                (g_ce,) = torch.autograd.grad(ce.sum(), sub)
                projected = project_rows(
                    g_ce, g_kd, segments, num_segments, cfg.spmc_lambda, cfg.spmc_proj_norm_power
                )
                if cfg.spmc_kd_grad_weight:
                    projected = projected + cfg.spmc_kd_grad_weight * g_kd
                grad = torch.where(spmc[idx].unsqueeze(1), projected, g_ce)
            with torch.no_grad():
                buf = cfg.momentum * momentum[idx] + grad + cfg.weight_decay * sub
                momentum[idx] = buf
                rows[idx] = sub - cfg.lr * buf
                loss_sum[idx] += ce.detach()
        final = rows
        return [
            ClientResult(
                t.client_id,
                final[k].clone(),
                float(loss_sum[k]) / int(steps[k]) if int(steps[k]) else float("nan"),
                int(steps[k]),
            )
            for k, t in enumerate(tasks)
        ]
