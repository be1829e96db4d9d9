"""The server's clean validation split, for the defenses that need proxy data (spec §5, D38).

Only Sageflow, FLTrust and Finetuning (classes with ``needs_server_data = True``) receive it through
``RoundInputs.server_data``. It holds the last ``val_fraction`` of the official training set as unit-float images,
the server-validation transform (for MNIST and Fashion-MNIST the client training transform, spec §1.2), a scratch
model and the SGD settings of spec §1.1, and offers the two operations those defenses need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spmc.params import ParamLayout

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

#: How many evaluated states :meth:`ServerData.loss_and_entropy` remembers, at most, and how many bytes they may
#: take (a ResNet-10 state is 19.6 MB: 13 of them). They are one round's states, kept until the next round's first
#: evaluation.
_EVAL_MEMO_SIZE = 64
_EVAL_MEMO_BYTES = 256 * 2**20


@dataclass
class ServerData:
    """Clean server data plus the means to evaluate and train a flat state on it."""

    x: torch.Tensor
    y: torch.Tensor
    transform: Transform
    model: nn.Module
    layout: ParamLayout
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    seed: int = 0
    #: (state, images) → logits [n, classes] of ``model`` with that state, faster than the model's own forward
    #: (:func:`spmc.federation.make_server_data` passes :func:`spmc.batched.stacked_logits` where it applies);
    #: ``None``: the model's forward, batch by batch.
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)
    #: The last :meth:`train` call: (epochs, round_seed, start state, result). Training is deterministic in these,
    #: so a repeated call (an adaptive attack calling a copy of FLTrust 24 times a round, then the server itself)
    #: returns the same state without training again.
    _last_train: tuple[int, int, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    #: This round's :meth:`loss_and_entropy` results: (round_seed, [(state, (ℓ, H)), …]), least recently used
    #: first. Evaluation is deterministic in (state, round_seed), so an adaptive attack that probes a copy of
    #: Sageflow 24 times a round re-evaluates only the states it changed.
    _evals: tuple[int, list[tuple[torch.Tensor, tuple[float, float]]]] | None = field(
        default=None, repr=False, compare=False
    )
    #: The evaluation batches of the last round_seed, stacked: (round_seed, images [b, batch, …], labels [b, batch]).
    #: They depend only on round_seed, so every state of a round is evaluated on one transformed copy.
    _eval_batches: tuple[int, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, generator: torch.Generator, shuffle: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in mini-batches of ``batch_size``, last partial batch dropped (spec §1.1), transformed."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for b in range(n // self.batch_size):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.transform(self.x[idx], generator), self.y[idx]

    def loss_and_entropy(self, state: torch.Tensor, round_seed: int = 0) -> tuple[float, float]:
        """ℓ = mean over batches of the batch-mean CE; H = mean over batches of the batch-mean entropy
        −Σ_c p_c ln p_c; the model in eval mode (spec §6.3 [REC]). NaN when there is no full batch.

        The result depends only on (state, round_seed): a state already evaluated with the same round_seed is not
        evaluated again (the memo holds one round_seed's most recently used states, up to ``_EVAL_MEMO_SIZE`` and
        ``_EVAL_MEMO_BYTES``)."""
        if self._evals is None or self._evals[0] != round_seed:
            self._evals = (round_seed, [])
        memo = self._evals[1]
        for i, (seen, result) in enumerate(memo):
            if seen.shape == state.shape and torch.equal(seen, state):
                memo.append(memo.pop(i))
                return result
        result = self._loss_and_entropy(state, round_seed)
        bytes_per_state = max(1, state.numel() * state.element_size())
        capacity = min(_EVAL_MEMO_SIZE, _EVAL_MEMO_BYTES // bytes_per_state)
        if capacity > 0 and bool(torch.isfinite(state).all()):  # NaN never equals itself: it could never be found
            memo.append((state.detach().clone(), result))
            del memo[:-capacity]
        return result

    @torch.no_grad()
    def _loss_and_entropy(self, state: torch.Tensor, round_seed: int) -> tuple[float, float]:
        x, y = self._evaluation_batches(round_seed)
        if y.numel() == 0:
            return float("nan"), float("nan")
        batches, size = y.shape
        logits = self._logits(state, x.flatten(0, 1)).view(batches, size, -1)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(batches, size).mean(dim=1)
        logp = F.log_softmax(logits, dim=2)
        entropies = -(logp.exp() * logp).sum(dim=2).mean(dim=1)
        return float(losses.mean()), float(entropies.mean())

    def _evaluation_batches(self, round_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unshuffled, transformed full batches of ``round_seed``, stacked (computed once per round_seed)."""
        if self._eval_batches is None or self._eval_batches[0] != round_seed:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + round_seed) % (2**63))
            pairs = list(self.batches(gen, shuffle=False))
            if pairs:
                x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            else:
                x, y = self.x[:0].float().unsqueeze(0), self.y[:0].unsqueeze(0)
            self._eval_batches = (round_seed, x, y)
        return self._eval_batches[1], self._eval_batches[2]

    def _logits(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``state`` on ``x`` in eval mode: :attr:`logits` if set, else the model in ``batch_size`` chunks."""
        if self.logits is not None:
            return self.logits(state, x)
        self.layout.load(self.model, state)
        self.model.eval()
        return torch.cat([self.model(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    def train(self, state: torch.Tensor, epochs: int, round_seed: int = 0) -> torch.Tensor:
        """``epochs`` passes of SGD on the mean CE from ``state`` (train mode, fresh optimiser); the new state.

        The generator is seeded from ``seed`` and ``round_seed``, so the result depends only on (state, epochs,
        round_seed): the last call's result is reused (a copy) when all three are the same."""
        last = self._last_train
        if last is not None and last[:2] == (epochs, round_seed) and torch.equal(last[2], state):
            return last[3].clone()
        trained = self._train(state, epochs, round_seed)
        self._last_train = (epochs, round_seed, state.detach().clone(), trained.clone())
        return trained

    def _train(self, state: torch.Tensor, epochs: int, round_seed: int) -> torch.Tensor:
        self.layout.load(self.model, state)
        self.model.train()
        opt = torch.optim.SGD(
            self.model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + round_seed) % (2**63))
        for _ in range(epochs):
            for x, y in self.batches(gen, shuffle=True):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(x), y).backward()
                opt.step()
        return self.layout.flatten(self.model)
