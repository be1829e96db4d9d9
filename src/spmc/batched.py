"""The batched engine: all the clients of a round trained together as one stacked SimpleCNN (issue 4).

The C clients' parameters are the rows of one leaf tensor P ∈ R^{C×d}. Per-tensor views of P feed a stacked
forward pass: the convolutions of all clients run as one grouped convolution (``groups = C``, activations in
channels_last), the linear layers as one batched matmul (``baddbmm``). The loss is Σ_k L_k, so ∂/∂P_k is client k's
own gradient. Each step computes only the clients that still have a mini-batch, so a client with fewer
mini-batches takes exactly the steps it would take alone (spec §1.4) and idle clients cost nothing; SGD with
momentum and weight decay is applied to their rows:

    buf_k ← μ·buf_k + g_k + λ_wd·P_k ,  P_k ← P_k − η·buf_k        for active clients; unchanged otherwise.

Each client draws its mini-batches from the same per-client generator and in the same order as the sequential
engine, so both engines give the same states to floating-point tolerance. With ``drop_last = false`` a step may
mix full batches with clients' last partial ones: every batch is padded to the step's largest size b with
zero images, and a client's loss is the mean over its n real samples only, L_k = (1/n) Σ_{i<n} ℓ_i, so the padding
gets a zero gradient; SimpleCNN has no batch norm, so this is exact. SPMC clients (spec §4) project their CE
gradient with :func:`spmc.purify.project_rows`, all clients and tensors at once.

Exact rewrites that make it faster on a CPU (each measured by ``benchmarks/bench_engine.py``): every parameter
tensor is its own autograd leaf; a convolution's bias and relu are applied after max-pooling (they commute with
it); conv2's input gradient is a convolution with the flipped kernel (:class:`GroupedConv`); and an SPMC step runs
conv1 once for the student and the teacher (:class:`SharedInputBlock`), since oneDNN pads each group's 6 output
channels to 16 anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from spmc import native
from spmc.models import SimpleCNN
from spmc.params import ParamLayout
from spmc.purify import distillation_terms, project_rows, segment_ids
from spmc.training import ClientResult, ClientTask, OptimConfig, TrainingHook, batches

_CONVS = ("conv1", "conv2")
_LINEARS = ("fc1", "fc2", "l1", "l2", "cls")
_RELU_AFTER = {"fc1", "fc2", "l1"}
_TensorPair = tuple[torch.Tensor, torch.Tensor]


def supports(model: torch.nn.Module, layout: ParamLayout) -> bool:
    """The batched engine handles SimpleCNN (parameters only, no buffers)."""
    return isinstance(model, SimpleCNN) and layout.num_params == layout.dim


class GroupedConv(torch.autograd.Function):
    """y = conv2d(x, w, groups=g) (stride 1, no padding, no bias) with a faster input gradient on this CPU.

    ∂L/∂x is the full correlation of ∂L/∂y with the spatially flipped, per-group transposed kernel
    (conv2d with padding k − 1), which oneDNN runs ~1.4× faster than its transposed-convolution kernel for these
    small groups; ∂L/∂w is oneDNN's weight gradient.
    """

    # torch's Function.apply is untyped: each Function here declares the signature of its forward (less ctx)
    apply: ClassVar[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]]

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.groups = groups
        return F.conv2d(x, w, groups=groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        g = ctx.groups
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            out_g, in_g, kh, kw = w.shape[0] // g, w.shape[1], w.shape[2], w.shape[3]
            flipped = w.view(g, out_g, in_g, kh, kw).transpose(1, 2).flip(-1, -2).reshape(g * in_g, out_g, kh, kw)
            grad_x = F.conv2d(grad, flipped, padding=(kh - 1, kw - 1), groups=g)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], g, [False, True, False]
            )[1]
        return grad_x, grad_w, None


class SharedInputBlock(torch.autograd.Function):
    """The first block of a student and of its teacher on the same images, with one convolution.

    h_s = relu(maxpool₂(conv(x, w_s)) + b_s) and h_t = relu(maxpool₂(conv(x, w_t)) + b_t), each [B, C·o, H, W]
    for C groups (clients) of o channels. oneDNN pads a group's output channels to a block of 16, so one
    convolution with the student's and the teacher's o channels side by side (2·o per group) costs about as much
    as one of them. Only the student is differentiable: ∂L/∂b_s = Σ ∂L/∂h_s·[h_s > 0] over batch and space, and
    ∂L/∂w_s is the convolution's weight gradient of that, routed back through the pooling's argmax.
    """

    apply: ClassVar[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], _TensorPair]]

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_s: torch.Tensor,
        b_s: torch.Tensor,
        w_t: torch.Tensor,
        b_t: torch.Tensor,
        groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c, o = groups, w_s.shape[0] // groups
        w = torch.stack([w_s.view(c, o, *w_s.shape[1:]), w_t.view(c, o, *w_t.shape[1:])], dim=1)
        conv = F.conv2d(x, w.reshape(2 * c * o, *w_s.shape[1:]), groups=c)
        pooled, idx = F.max_pool2d_with_indices(conv, (2, 2))
        batch, _, h, wd = pooled.shape

        def half(src: torch.Tensor, k: int) -> torch.Tensor:
            out = torch.empty(
                batch, c * o, h, wd, dtype=src.dtype, device=src.device, memory_format=torch.channels_last
            )
            out.view(batch, c, o, h, wd).copy_(src.view(batch, c, 2, o, h, wd)[:, :, k])
            return out

        h_s = half(pooled, 0).add_(b_s.view(1, -1, 1, 1)).relu_()
        h_t = half(pooled, 1).add_(b_t.view(1, -1, 1, 1)).relu_()
        ctx.save_for_backward(x, w_s, h_s, half(idx, 0))
        ctx.groups = groups
        ctx.conv_size = conv.shape[2:]
        ctx.mark_non_differentiable(h_t)
        return h_s, h_t

    @staticmethod
    def backward(
        ctx: Any, grad_s: torch.Tensor, _grad_t: torch.Tensor | None
    ) -> tuple[None, torch.Tensor, torch.Tensor, None, None, None]:
        x, w_s, h_s, idx = ctx.saved_tensors
        grad = grad_s * (h_s > 0)
        grad_b = grad.sum(dim=(0, 2, 3))
        grad_conv = F.max_unpool2d(grad, idx, (2, 2), output_size=ctx.conv_size)
        grad_w = torch.ops.aten.convolution_backward(
            grad_conv, x, w_s, None, [1, 1], [0, 0], [1, 1], False, [0, 0], ctx.groups, [False, True, False]
        )[1]
        return None, grad_w, grad_b, None, None, None


class NativeFirstBlock(torch.autograd.Function):
    """SimpleCNN's first block for all clients with the compiled kernel of :mod:`spmc.native`.

    h_s = relu(maxpool₂(conv(x_g, w_s,g)) + b_s,g) for every client g and, if ``w_t`` is not empty, the teacher's
    h_t likewise (not differentiable; the kernel runs both in one pass over the images) on the images ``x`` of a
    :class:`spmc.native.ImageBatch`. ∂L/∂b_s = Σ ∂L/∂h_s·[h_s > 0] over batch and
    space; ∂L/∂w_s routes that through each pooling window's argmax to the convolution's weight gradient.
    """

    apply: ClassVar[Callable[[native.ImageBatch, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], _TensorPair]]

    @staticmethod
    def forward(
        ctx: Any,
        x: native.ImageBatch,
        w_s: torch.Tensor,
        b_s: torch.Tensor,
        w_t: torch.Tensor,
        b_t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = w_s if w_t.numel() == 0 else torch.cat([w_s, w_t], dim=1)
        pooled, arg = native.conv1_pool_forward(native.require(), x, w, argmax=True)
        channels = pooled.permute(0, 1, 4, 2, 3)  # [nch, B, C·6, 14, 14], channels_last per block
        h_s = channels[0].add_(b_s.reshape(1, -1, 1, 1)).relu_()
        h_t = channels[1].add_(b_t.reshape(1, -1, 1, 1)).relu_() if w_t.numel() else w_t.new_empty(0)
        ctx.save_for_backward(h_s, arg)
        ctx.images = x
        ctx.bias_shape = b_s.shape
        ctx.mark_non_differentiable(h_t)
        return h_s, h_t

    @staticmethod
    def backward(
        ctx: Any, grad_s: torch.Tensor, _grad_t: torch.Tensor | None
    ) -> tuple[None, torch.Tensor, torch.Tensor, None, None]:
        h_s, arg = ctx.saved_tensors
        grad_w, grad_b = native.conv1_pool_backward(
            native.require(), ctx.images, grad_s.permute(0, 2, 3, 1), h_s.permute(0, 2, 3, 1), arg
        )
        return None, grad_w, grad_b.view(ctx.bias_shape), None, None


class NativeSecondBlock(torch.autograd.Function):
    """SimpleCNN's second block for all clients, h = relu(maxpool₂(conv(a, w)) + b), with the compiled backward
    of :func:`spmc.native.conv2_pool_backward`: only the pooled maxima carry a gradient, so ∂L/∂a and ∂L/∂w are
    scatters from them instead of two dense convolutions (oneDNN pads the 6 channels per client of ∂L/∂a to 16).
    The forward pass is torch's (grouped convolution, channels_last)."""

    apply: ClassVar[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d(a, w.reshape(-1, *w.shape[2:]), groups=w.shape[0])
        pooled, idx = F.max_pool2d_with_indices(conv, (2, 2))
        h = pooled.add_(b.reshape(1, -1, 1, 1)).relu_()
        ctx.save_for_backward(a, w, h, idx)
        return h

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, w, h, idx = ctx.saved_tensors
        grad_a, grad_w, grad_b = native.conv2_pool_backward(native.require(), a, w, grad, h, idx)
        return grad_a, grad_w, grad_b.view(h.shape[1] // 16, 16)


def _torch_input(x: torch.Tensor | native.ImageBatch) -> torch.Tensor:
    """The first block's input for torch's kernel: a tensor [B, C·3, 32, 32]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batched engine: torch's kernel takes a tensor [B, C·3, 32, 32], got {type(x).__name__}")
    return x


def _native_input(x: torch.Tensor | native.ImageBatch) -> native.ImageBatch:
    """The first block's input for the native kernel: a :class:`spmc.native.ImageBatch`."""
    if not isinstance(x, native.ImageBatch):
        raise TypeError(f"batched engine: the native kernel takes a spmc.native.ImageBatch, got {type(x).__name__}")
    return x


class StackedSimpleCNN:
    """A functional SimpleCNN over C stacked parameter rows.

    With ``native`` the first block runs the compiled kernel (:class:`NativeFirstBlock`), so does the second
    block's backward pass (:class:`NativeSecondBlock`), and the inputs are a :class:`spmc.native.ImageBatch`;
    otherwise they are [B, C·3, 32, 32] (client k's images in channels 3k … 3k+2) and both blocks are torch's
    grouped convolutions.
    """

    def __init__(self, layout: ParamLayout, native: bool = False) -> None:
        self.layout = layout
        self.native = native

    def tensors(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views [C, *shape] of every parameter tensor of the stacked rows [C, d]."""
        c = rows.shape[0]
        return {e.name: rows[:, e.slice].view(c, *e.shape) for e in self.layout.entries}

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor | native.ImageBatch) -> torch.Tensor:
        """Logits [C, B, classes]."""
        if not self.native:
            return self._layers(params, _torch_input(x), _CONVS)
        h, _ = self._native_block(params, None, _native_input(x))
        return self._layers(params, h, _CONVS[1:])

    def forward_with_teacher(
        self, params: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], x: torch.Tensor | native.ImageBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits (differentiable) and teacher logits (not) on the same inputs, sharing conv1's call."""
        c = params["conv1.weight"].shape[0]
        w_s, w_t = params["conv1.weight"], teacher["conv1.weight"]
        if self.native:
            h_s, h_t = self._native_block(params, teacher, _native_input(x))
        else:
            h_s, h_t = SharedInputBlock.apply(
                _torch_input(x),
                w_s.reshape(-1, *w_s.shape[2:]),
                params["conv1.bias"].reshape(-1),
                w_t.reshape(-1, *w_t.shape[2:]),
                teacher["conv1.bias"].reshape(-1),
                c,
            )
        logits = self._layers(params, h_s, _CONVS[1:])
        with torch.no_grad():
            return logits, self._layers(teacher, h_t, _CONVS[1:])

    def _native_block(
        self, params: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None, x: native.ImageBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w_s = params["conv1.weight"]
        empty = w_s.new_empty(0)
        w_t, b_t = (teacher["conv1.weight"], teacher["conv1.bias"]) if teacher is not None else (empty, empty)
        return NativeFirstBlock.apply(x, w_s, params["conv1.bias"], w_t.detach(), b_t.detach())

    def _layers(self, params: dict[str, torch.Tensor], h: torch.Tensor, convs: tuple[str, ...]) -> torch.Tensor:
        """The conv blocks ``convs`` (conv → max-pool → bias → relu), then the linear layers, on ``h``."""
        c = params["conv1.weight"].shape[0]
        for name in convs:
            w = params[f"{name}.weight"]
            b = params[f"{name}.bias"]
            if self.native and name == "conv2" and torch.is_grad_enabled():
                h = NativeSecondBlock.apply(h, w, b)
                continue
            h = F.max_pool2d(GroupedConv.apply(h, w.reshape(-1, *w.shape[2:]), c), 2)
            # = max_pool(relu(conv + b)): the per-channel bias and relu commute with max-pooling, so both run on
            # the 4× smaller pooled tensor (and the bias gradient is a sum over it)
            h = F.relu(h + b.reshape(1, -1, 1, 1), inplace=True)
        batch = h.shape[0]
        h = h.reshape(batch, c, -1).transpose(0, 1)
        for name in _LINEARS:
            w = params[f"{name}.weight"]
            b = params[f"{name}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if name in _RELU_AFTER:
                h = F.relu(h, inplace=True)
        return h


@torch.no_grad()
def stacked_logits(layout: ParamLayout, state: torch.Tensor, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The logits [n, classes] of the SimpleCNN with parameters ``state`` on images ``x`` [n, 3, 32, 32], in batches
    of ``batch_size``, with the native first block (:class:`StackedSimpleCNN` over one row): the same logits as
    :class:`spmc.models.SimpleCNN` to float rounding, and grey images cost a third of the first block's work."""
    net = StackedSimpleCNN(layout, native=True)
    params = net.tensors(state.detach().to(torch.float32).unsqueeze(0))
    out = [
        net.forward(params, native.ImageBatch.stack([x[start : start + batch_size]]))[0]
        for start in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, params["cls.bias"].shape[-1])


def stacked_predictions(layout: ParamLayout, state: torch.Tensor, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The top-1 class [n] of :func:`stacked_logits`."""
    return stacked_logits(layout, state, x, batch_size).argmax(dim=1)


KernelChoice = Literal["auto", "native", "torch"]


def resolve_kernel(choice: KernelChoice, device: torch.device) -> Literal["native", "torch"]:
    """The first block's kernel: ``native`` (compiled, CPU only) where asked for or, with ``auto``, available."""
    if choice == "torch" or (choice == "auto" and device.type != "cpu"):
        return "torch"
    if device.type != "cpu":
        raise ValueError(f"kernel: 'native' runs on the CPU only, got device {str(device)!r}; use 'auto' or 'torch'")
    if native.load() is None:
        if choice == "native":
            raise RuntimeError(
                "kernel: 'native' needs a working C compiler ($CC, cc or gcc) to build spmc/csrc/conv1_pool.c; "
                "use 'auto' or 'torch'"
            )
        return "torch"
    return "native"


def _flat(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-tensor gradients [C, *shape] → one [C, d] row per client."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def _training_hook(tasks: list[ClientTask]) -> TrainingHook | None:
    """The one training hook of the round's attackers (None when no task has one)."""
    hooks = [t.training for t in tasks if t.training is not None]
    if any(h != hooks[0] for h in hooks[1:]):
        raise ValueError("training hooks: the tasks of one round carry different hooks; one per round is allowed")
    return hooks[0] if hooks else None


def _next_or_none(it: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    return next(it, None)


def pad_batches(
    step: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Pad every client's batch (x [n_k, ...], y [n_k]) to b = max_k n_k with zero images and label 0.

    Returns the padded batches and the mask [C, b] of real samples (1 for i < n_k, else 0), or the batches
    unchanged and None where all have the same size. A grey batch expanded from one channel (stride 0) stays
    one: its single channel is padded, then expanded again.
    """
    sizes = [int(y.shape[0]) for _, y in step]
    b = max(sizes)
    if min(sizes) == b:
        return step, None
    padded = []
    for (x, y), n in zip(step, sizes):
        if n < b:
            src = x[:, :1] if x.dim() == 4 and x.shape[1] == 3 and x.stride(1) == 0 else x
            zeros = src.new_zeros(b - n, *src.shape[1:])
            x = torch.cat([src, zeros]).expand(b, *x.shape[1:])
            y = torch.cat([y, y.new_zeros(b - n)])
        padded.append((x, y))
    mask = torch.arange(b).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    return padded, mask.to(device=step[0][1].device, dtype=torch.float32)


class BatchedEngine:
    """Train every client of a round together; same interface and same results as the sequential engine."""

    name = "batched"

    def __init__(
        self,
        layout: ParamLayout,
        cfg: OptimConfig,
        channels_last: bool = True,
        kernel: KernelChoice = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        self.layout = layout
        self.cfg = cfg
        self.kernel: str = resolve_kernel(kernel, torch.device(device))
        self.net = StackedSimpleCNN(layout, native=self.kernel == "native")
        self.channels_last = channels_last
        self.numels = [e.numel for e in layout.entries]

    def _gather(
        self, step: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor | native.ImageBatch, torch.Tensor]:
        """Stack one batch per client into the first block's input and labels [C, b], b the largest batch.

        The input is [b, C·3, 32, 32] (channels_last) for torch's kernel, a :class:`spmc.native.ImageBatch` for
        the native one. Smaller batches must have been padded to b (:func:`pad_batches`).
        """
        bs = step[0][0].shape[0]
        if self.net.native:
            return native.ImageBatch.stack([x for x, _ in step]), torch.stack([y for _, y in step])
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
        iters = [batches(t.data, t.epochs, cfg.batch_size, g, cfg.drop_last) for t, g in zip(tasks, gens)]
        loss_sum = torch.zeros(c, device=device)
        steps = torch.zeros(c, dtype=torch.long)
        hook = _training_hook(tasks)
        hooked = [t.training is not None for t in tasks]
        while True:
            step = [_next_or_none(it) for it in iters]
            present = [(k, item) for k, item in enumerate(step) if item is not None]
            active = [k for k, _ in present]
            if not active:
                break
            # Only the clients that still have a batch are computed; the others keep their state and momentum.
            idx = torch.tensor(active, device=device)
            steps[active] += 1
            everyone = len(active) == c
            sub = rows if everyone else rows[idx]
            # One leaf per tensor: the gradient of a slice of one [C, d] leaf would cost a zero-filled [C, d] each.
            params = {name: t.requires_grad_(True) for name, t in self.net.tensors(sub).items()}
            leaves = list(params.values())
            # drop_last = false: clients' last partial batches are padded, and their losses masked (mean over real)
            padded, mask = pad_batches([item for _, item in present])
            x, y = self._gather(padded, device)
            if teachers is None:
                logits = self.net.forward(params, x)
            else:
                logits, teacher_logits = self.net.forward_with_teacher(
                    params, self.net.tensors(teachers if everyone else teachers[idx]), x
                )
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            ce = ce.view(len(active), -1)
            ce = ce.mean(dim=1) if mask is None else (ce * mask).sum(dim=1) / mask.sum(dim=1)
            if teachers is None:
                grad = _flat(torch.autograd.grad(ce.sum(), leaves))
            else:
                kd = distillation_terms(logits, teacher_logits, cfg.spmc_kd_T)
                kd = (kd.mean(dim=1) if mask is None else (kd * mask).sum(dim=1) / mask.sum(dim=1)) * cfg.spmc_kd_T**2
                g_kd = _flat(torch.autograd.grad(kd.sum(), leaves, retain_graph=True))
                g_ce = _flat(torch.autograd.grad(ce.sum(), leaves))
                projected = project_rows(g_ce, g_kd, segments, num_segments, cfg.spmc_lambda, cfg.spmc_proj_norm_power)
                if cfg.spmc_kd_grad_weight:
                    projected = projected + cfg.spmc_kd_grad_weight * g_kd
                grad = torch.where(spmc[idx].unsqueeze(1), projected, g_ce)
            attackers = None
            if hook is not None:  # the attackers' rows among the active ones (spec ATTACKS.md §A2.2)
                pos = [j for j, k in enumerate(active) if hooked[k]]
                if pos:
                    attackers = torch.tensor(pos, device=device)
                    with torch.no_grad():
                        grad[attackers] = hook.gradient(grad[attackers], sub[attackers].detach(), start)
            with torch.no_grad():
                if everyone:  # in place, no gather/scatter of the [C, d] rows
                    momentum.mul_(cfg.momentum).add_(grad).add_(rows, alpha=cfg.weight_decay)
                    rows.sub_(momentum, alpha=cfg.lr)
                else:
                    buf = cfg.momentum * momentum[idx] + grad + cfg.weight_decay * sub
                    momentum[idx] = buf
                    rows[idx] = sub - cfg.lr * buf
                if attackers is not None and hook is not None:
                    moved = idx[attackers]
                    rows[moved] = hook.project(rows[moved], start)
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
