"""What a run is built from, for both drivers (:class:`spmc.simulation.Simulation` and the Flower apps).

```
raw      ← load(dataset)                                   (spec §1.1)
pool,val ← server_split(raw.train)                         (spec §1.2: the server's clean validation split)
parts    ← Dirichlet(β) partition of pool over K clients   (spec §1.3)
client_k ← parts[k], poisoned when k is malicious          (spec §2: last ⌊γK⌋ ids unless overridden)
test     ← clean test set; backdoor ← triggered test set   (spec §1.6, §2.4)
θ⁰       ← build_model(seed)
```

Every random stream is derived from (seed, purpose, round, client) by :func:`derive_seed`, so a Flower node that
builds its own :class:`Federation` poisons, shuffles and trains exactly as the simulator does.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from spmc import batched, native
from spmc.attacks import Attack, AttackContext, AttackPlan, Crafter
from spmc.batched import BatchedEngine
from spmc.config import Experiment, build_attack, optim_config
from spmc.data import (
    DATASETS,
    DatasetInfo,
    Preprocessor,
    dirichlet_partition,
    load_dataset,
    server_split,
    to_unit_float,
)
from spmc.data.strong_aug import strong_augment
from spmc.defenses.server_data import ServerData
from spmc.guard import UpdateGuard
from spmc.models import build_model
from spmc.params import ParamLayout
from spmc.training import (
    ClientData,
    ClientMethod,
    ClientResult,
    ClientTask,
    SequentialEngine,
    percent_correct,
    predictions,
)

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (experiment seed, purpose, round, client id), independent of visiting order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


# Purposes for derive_seed, so that streams never collide (the Flower apps derive the same streams). 7 is the
# random attacker pool's (spmc.attacks.base.SEED_ATTACKER_POOL); 8 an attacker's clean shadow training.
SEED_POISON, SEED_STATIC_AUG, SEED_CLIENT, SEED_PARTICIPATION, SEED_TEST, SEED_SERVER = 1, 2, 3, 4, 5, 6
SEED_SHADOW = 8


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error naming the field."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: got 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def update_guard(cfg: Experiment) -> UpdateGuard:
    """The update guard's thresholds of ``cfg`` (:mod:`spmc.guard`)."""
    return UpdateGuard(cfg.update_guard, cfg.update_guard_max_abs, cfg.update_guard_norm_ratio)


class Engine(Protocol):
    """Trains the clients of one round from the global state: :class:`SequentialEngine` or :class:`BatchedEngine`.

    ``name`` and ``kernel`` (the first block's kernel: ``torch`` or ``native``) go into the run's summary."""

    name: str
    kernel: str

    def train_round(self, start: torch.Tensor, tasks: list[ClientTask]) -> list[ClientResult]: ...


def build_engine(cfg: Experiment, model: torch.nn.Module, layout: ParamLayout, device: torch.device) -> Engine:
    """The configured engine; ``auto`` takes the batched one wherever it applies (SimpleCNN)."""
    can_batch = batched.supports(model, layout)
    if cfg.engine == "batched" and not can_batch:
        raise ValueError(
            f"engine: 'batched' supports SimpleCNN only; model {cfg.resolved_model!r} needs 'sequential' or 'auto'"
        )
    if cfg.engine == "batched" or (cfg.engine == "auto" and can_batch):
        return BatchedEngine(layout, optim_config(cfg), kernel=cfg.kernel, device=device)
    log.info("engine: sequential (model %s is not stacked)", cfg.resolved_model)
    return SequentialEngine(model, layout, optim_config(cfg))


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class FederatedData:
    """Everything the round loop reads: client data, sample counts, evaluation sets (all on the run's device)."""

    info: DatasetInfo
    clients: dict[int, ClientData]
    num_samples: dict[int, int]
    malicious: tuple[int, ...]
    test_x: torch.Tensor
    test_y: torch.Tensor
    backdoor_x: torch.Tensor
    backdoor_y: torch.Tensor
    backdoor_not_target: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_transform: Transform
    clean: dict[int, ClientData] = field(default_factory=dict)
    #: The run's attack plan; its data attack is the instance that poisoned ``clients`` (one instance per run, so
    #: that a trigger an adaptive attack optimises is the one its data and test set use).
    attack: AttackPlan | None = None
    #: Poisons the attackers' data again and rebuilds the attack's test set, after the data attack changed (A3FL).
    repoison: Callable[[], None] | None = None


def poison_mask(cfg: Experiment, attack: Attack, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The data attack's seeded mask of poisoned samples over the whole training set (spec §2.2)."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_POISON))
    return attack.poison_mask(labels, cfg.poison_rate, gen).to(device)


def benign_data(x: torch.Tensor, y: torch.Tensor, pre: Preprocessor) -> ClientData:
    """A benign client's data: the training transform per batch."""

    def benign(
        xb: torch.Tensor, yb: torch.Tensor, ib: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pre.train(xb, g, grey_view=True), yb  # never written into: a stride-0 view is safe

    return ClientData(x, y, transform=benign)


def poisoned_data(
    cfg: Experiment,
    k: int,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    pre: Preprocessor,
    attack: Attack,
    rank: int = 0,
) -> ClientData:
    """Attacker ``k``'s data, poisoned by the data hook of ``attack`` as the attacker of rank ``rank`` (its position
    in the sorted attacker ids; :meth:`Attack.poison_for`) — once, after a static augmentation
    (``poison_static_aug``), or on the fly per batch."""
    if cfg.poison_static_aug:
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_STATIC_AUG, k))
        xs, ys = attack.poison_for(rank, pre.train(x, gen), y, mask, gen)
        return ClientData(xs.contiguous(), ys, final=True)

    def on_the_fly(
        xb: torch.Tensor, yb: torch.Tensor, ib: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attack.poison_for(rank, pre.train(xb, g), yb, mask[ib], g)

    return ClientData(x, y, transform=on_the_fly)


def server_transform(info: DatasetInfo, pre: Preprocessor) -> Transform:
    """The augmentation of the server's clean split (:attr:`DatasetInfo.server_augmentation`)."""
    if info.server_augmentation == "strong":
        return functools.partial(strong_augment, mean=info.mean, std=info.std)
    return pre.train


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==
class OwnData:
    """One party's own files instead of a share of the whole dataset (a Flower deployment with node-local data).

    A node (``client_id`` set): ``train_*`` are all its training data, no test set. The server (``client_id`` None):
    ``test_*`` its test set, ``train_*`` its clean validation split (empty unless a defense needs server data).
    Images uint8 ``[N, C, H, W]``, labels int64 ``[N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    client_id: int | None = None

    @classmethod
    def node(cls, client_id: int, images: torch.Tensor, labels: torch.Tensor) -> OwnData:
        """A node's own training data; its test set is empty."""
        empty = images[:0]
        return cls(images, labels, empty, labels[:0], client_id)


def _split_and_partition(
    cfg: Experiment, own: OwnData | None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[int, np.ndarray], np.ndarray]:
    """The training and test arrays, each client's training indices and the server's validation indices: the whole
    dataset split (spec §1.2) and partitioned (Dirichlet) — or, with ``own``, a node's whole data as its only
    client, or the server's own validation split and no client."""
    if own is not None:
        arrays = (own.train_images, own.train_labels, own.test_images, own.test_labels)
        everything = np.arange(int(own.train_labels.shape[0]), dtype=np.int64)
        if own.client_id is None:
            return arrays, {}, everything
        return arrays, {own.client_id: everything}, everything[:0]
    raw = load_dataset(
        cfg.dataset, cfg.data_dir, synthetic_size=(cfg.synthetic_train_size, cfg.synthetic_test_size), seed=cfg.seed
    )
    pool, val = server_split(int(raw.train_labels.shape[0]), cfg.val_fraction)
    parts = dirichlet_partition(
        raw.train_labels[torch.as_tensor(pool)].numpy(), cfg.num_clients, cfg.beta, cfg.min_client_size, cfg.seed
    )
    members = {k: pool[part] for k, part in enumerate(parts)}
    return (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels), members, val


def backdoor_set(
    cfg: Experiment, attack: Attack, test_x: torch.Tensor, test_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data attack's triggered test set with its mask of non-target rows (spec §2.4); empty without a test set
    (a Flower node with its own data evaluates nothing)."""
    if not test_y.numel():
        return test_x, test_y, torch.zeros(0, dtype=torch.bool, device=test_y.device)
    return attack.test_set(test_x, test_y, torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_TEST)))


def build_federated_data(
    cfg: Experiment, device: torch.device, malicious: Sequence[int] | None = None, own: OwnData | None = None
) -> FederatedData:
    """Load, split (spec §1.2), partition (Dirichlet), poison the malicious clients (spec §2) and build test sets.

    ``malicious`` overrides the last-⌊γK⌋ rule (a Flower node configured as malicious, for instance). ``own``
    replaces loading and partitioning by one party's own files (:class:`OwnData`)."""
    info = DATASETS[cfg.dataset]
    (train_images, train_labels, test_images, test_labels), members, val = _split_and_partition(cfg, own)
    pre = Preprocessor(info)
    train01 = to_unit_float(train_images).to(device)
    labels = train_labels.to(device)
    plan = build_attack(cfg, malicious)
    bad = plan.attackers
    poisons = "data" in plan.data.hooks and bool(bad)
    mask = poison_mask(cfg, plan.data, train_labels, device) if poisons else None
    clients: dict[int, ClientData] = {}
    clean: dict[int, ClientData] = {}
    masks: dict[int, torch.Tensor] = {}
    for k, rows in members.items():
        idx = torch.as_tensor(rows, dtype=torch.long, device=device)
        x, y = train01[idx], labels[idx]
        clients[k] = benign_data(x, y, pre)
        if mask is not None and k in bad:
            clean[k] = clients[k]  # the same tensors: outside attack rounds an attacker trains on clean data
            masks[k] = mask[idx]
            clients[k] = poisoned_data(cfg, k, x, y, masks[k], pre, plan.data, bad.index(k))
    num_samples = {k: len(d) for k, d in clients.items()}
    small = {k: n for k, n in num_samples.items() if n < cfg.batch_size}
    if small and cfg.drop_last:
        log.warning("clients with fewer samples than one batch take no step (spec D30): %s", small)
    log.info("client sizes n_k: %s; malicious ids: %s", num_samples, list(bad))
    test_x = pre.test(to_unit_float(test_images).to(device))
    test_y = test_labels.to(device)
    bd_x, bd_y, bd_not_target = backdoor_set(cfg, plan.data, test_x, test_y)
    val_idx = torch.as_tensor(val, dtype=torch.long, device=device)
    data = FederatedData(
        info, clients, num_samples, bad, test_x, test_y, bd_x, bd_y, bd_not_target,
        val_x=train01[val_idx], val_y=labels[val_idx], val_transform=server_transform(info, pre), clean=clean,
        attack=plan,
    )  # fmt: skip

    def repoison() -> None:
        for k, m in masks.items():
            data.clients[k] = poisoned_data(cfg, k, clean[k].x, clean[k].y, m, pre, plan.data, bad.index(k))
        data.backdoor_x, data.backdoor_y, data.backdoor_not_target = backdoor_set(cfg, plan.data, test_x, test_y)

    data.repoison = repoison
    return data


def predictor(
    model: torch.nn.Module, layout: ParamLayout, cfg: Experiment, state: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """images → top-1 classes of ``state`` (already loaded into ``model``), in batches of ``eval_batch_size``: the
    native first block (:func:`spmc.batched.stacked_predictions`) for a SimpleCNN on the CPU unless ``kernel`` is
    ``torch`` or the C library does not build here, else ``model`` itself. Same classes to float rounding; on this
    machine 4.8× faster than the model's forward (docs/performance.md)."""
    bs = cfg.eval_batch_size
    if fast_forward(model, layout, cfg, state.device):
        return lambda x: batched.stacked_predictions(layout, state, x, bs)
    return lambda x: predictions(model, x, bs)


def fast_forward(model: torch.nn.Module, layout: ParamLayout, cfg: Experiment, device: torch.device) -> bool:
    """Whether evaluation may run the stacked SimpleCNN with the native first block: a SimpleCNN on the CPU, the C
    library builds here, and ``kernel`` is not ``torch``."""
    return (
        device.type == "cpu" and cfg.kernel != "torch" and batched.supports(model, layout) and native.load() is not None
    )


def evaluate_state(
    model: torch.nn.Module, layout: ParamLayout, data: FederatedData, cfg: Experiment, state: torch.Tensor
) -> dict[str, float]:
    """A_t on the clean test set and ASR_t on the triggered set (spec §1.6, §2.4), with and without target-class
    images (one pass over the triggered set); ``asr`` is the one ``asr_exclude_target_class`` picks. ``model`` is
    overwritten with ``state``."""
    layout.load(model, state)
    predict = predictor(model, layout, cfg, state)
    keep = data.backdoor_not_target
    triggered = predict(data.backdoor_x)
    asr_all = percent_correct(triggered, data.backdoor_y)
    asr_excl = percent_correct(triggered[keep], data.backdoor_y[keep])
    return {
        "accuracy": percent_correct(predict(data.test_x), data.test_y),
        "asr": asr_excl if cfg.asr_exclude_target_class else asr_all,
        "asr_all": asr_all,
        "asr_excl_target": asr_excl,
    }


def _stacked_logits(layout: ParamLayout, batch_size: int, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return batched.stacked_logits(layout, state, x, batch_size)


def make_server_data(cfg: Experiment, data: FederatedData, model: torch.nn.Module, layout: ParamLayout) -> ServerData:
    """The server's clean validation split with a scratch copy of ``model`` (spec §5, D38); it evaluates states
    through the stacked fast path where :func:`fast_forward` allows."""
    fast = fast_forward(model, layout, cfg, data.val_x.device)
    return ServerData(
        x=data.val_x,
        y=data.val_y,
        transform=data.val_transform,
        model=copy.deepcopy(model),
        layout=layout,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=derive_seed(cfg.seed, SEED_SERVER),
        logits=functools.partial(_stacked_logits, layout, cfg.eval_batch_size) if fast else None,
    )


# ------------------------------------------------------------------------------------------------ federation


@dataclass
class Federation:
    """Everything a run is built from: data (split, partition, poisoning, test sets), the model, its layout and θ⁰.

    Built the same way by the simulator, the Flower ServerApp and every Flower ClientApp (:meth:`build`)."""

    cfg: Experiment
    device: torch.device
    data: FederatedData
    model: torch.nn.Module
    layout: ParamLayout
    initial_state: torch.Tensor
    attack: AttackPlan

    @classmethod
    def build(cls, cfg: Experiment, malicious: Sequence[int] | None = None, own: OwnData | None = None) -> Federation:
        """Data first, then θ⁰ from ``torch.manual_seed(cfg.seed)``; ``malicious`` overrides the configured
        attackers (:attr:`Experiment.malicious_ids`); ``own`` is one party's own data instead of a share of the
        whole dataset (:class:`OwnData`)."""
        device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        data = build_federated_data(cfg, device, malicious, own)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.resolved_model, data.info.num_classes).to(device)
        layout = ParamLayout.from_module(model)
        plan = data.attack if data.attack is not None else build_attack(cfg, data.malicious)
        pre = Preprocessor(data.info)

        def clean(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            client = data.clean.get(k, data.clients[k])
            return pre.test(client.x), client.y

        context = AttackContext(copy.deepcopy(model), layout, clean)
        for attack in plan.attacks:
            attack.attach(context)
        plan.bind(layout)
        return cls(cfg, device, data, model, layout, layout.flatten(model), plan)

    def method_for(self, client_id: int) -> ClientMethod:
        """The client procedure: the configured one, except malicious clients when an attack chooses theirs
        (:attr:`spmc.attacks.Attack.client_procedure`, e.g. ``spmc_skip``) or under ``malicious_client = plain |
        spmc``. (:meth:`task` applies it in attack rounds only.)"""
        if client_id in self.data.malicious:
            chosen = self.attack.client_procedure
            if chosen is not None:
                return chosen
            if self.cfg.malicious_client == "plain":
                return "plain"
            if self.cfg.malicious_client == "spmc":
                return "spmc"
        return self.cfg.client

    def task(self, t: int, client_id: int, teacher: torch.Tensor | None) -> ClientTask:
        """Client ``client_id``'s training task in round ``t`` (its teacher is used by the SPMC client only). An
        attacker outside attack rounds trains like a benign client on its clean data (ATTACKS.md §A1); in attack
        rounds it trains on its poisoned data with the attacks' training hooks."""
        attacking = self.attack.attacking(t, client_id)
        benign = client_id in self.data.malicious and not attacking
        method = self.cfg.client if benign else self.method_for(client_id)
        data = self.data.clients[client_id]
        return ClientTask(
            client_id=client_id,
            data=self.data.clean.get(client_id, data) if benign else data,
            method=method,
            epochs=self.cfg.local_epochs(self.cfg.client),
            seed=derive_seed(self.cfg.seed, SEED_CLIENT, t, client_id),
            teacher=teacher if method == "spmc" else None,
            training=self.attack.training() if attacking else None,
        )

    def shadow_ids(self, t: int, ids: Sequence[int]) -> list[int]:
        """The attackers among ``ids`` that also train a clean model in round ``t`` (ATTACKS.md §A1
        ``attacker_knowledge = partial``, or an update attack with ``needs_clean``); empty on the default path."""
        return self.attack.shadows(t, ids)

    def shadow_task(self, t: int, client_id: int, teacher: torch.Tensor | None) -> ClientTask:
        """Attacker ``client_id``'s clean model of round ``t``, trained exactly like a benign client on its clean
        data (the configured client procedure, no training hook) from its own seed stream (``SEED_SHADOW``). Its
        result goes to the crafting step only (:meth:`spmc.server.ServerCore.step`), never to the update guard,
        the defense or the metrics."""
        method = self.cfg.client
        return ClientTask(
            client_id=client_id,
            data=self.data.clean.get(client_id, self.data.clients[client_id]),
            method=method,
            epochs=self.cfg.local_epochs(method),
            seed=derive_seed(self.cfg.seed, SEED_SHADOW, t, client_id),
            teacher=teacher if method == "spmc" else None,
        )

    def prepare_round(self, t: int, global_state: torch.Tensor, ids: Sequence[int]) -> None:
        """The attacks' per-round preparation before the local training of round ``t``, called every round
        (:meth:`spmc.attacks.AttackPlan.prepare_round`: every attack observes θ_g^t, the training attacks prepare
        when an attacker takes part); when the data attack changed its data (an optimised trigger), the attackers'
        data are poisoned again and the attack's test set rebuilt."""
        if self.attack.prepare_round(t, global_state, ids) and self.data.repoison is not None:
            self.data.repoison()

    def crafter(self) -> Crafter | None:
        """The update attack's crafting step for :class:`spmc.server.ServerCore` (None without one)."""
        return self.attack.crafter()

    def server_data(self) -> ServerData:
        """The server's clean split for defenses that need it (:func:`make_server_data`)."""
        return make_server_data(self.cfg, self.data, self.model, self.layout)

    def evaluate(self, state: torch.Tensor) -> dict[str, float]:
        """:func:`evaluate_state` of ``state`` (the federation's model is overwritten)."""
        return evaluate_state(self.model, self.layout, self.data, self.cfg, state)

    def engine(self) -> Engine:
        """The configured engine over this federation's model (:func:`build_engine`)."""
        return build_engine(self.cfg, self.model, self.layout, self.device)
