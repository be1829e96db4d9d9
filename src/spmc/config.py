"""The experiment configuration: one validated, frozen model; TOML loading; presets (spec §1.1, §7, Appendix A).

Field names follow the spec's flag names (``spmc_lambda``, ``baseline_local_epochs``, ...). ``profile = "repo"``
changes the defaults of the plain settings that differ between the two profiles (spec §7): the baselines' local
epochs (D1) and whether integer counters enter vector statistics (D31). Values given explicitly always win.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from spmc.defenses import (
    DEFENSES,
    Defense,
)
from spmc.options import build_method, merged_specs, option_specs, options_from
from spmc.threat import ThreatModel

if TYPE_CHECKING:
    from spmc.attacks import AttackPlan
from spmc.training import OptimConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


log = logging.getLogger(__name__)

#: Seeds reach ``np.random.RandomState`` (partition, synthetic data), which takes integers below 2**32.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
#: Every integer option must fit a C int (tensor sizes, counts, ranges in the engines).
MAX_INT = 2**31 - 1
#: The synthetic set is generated in memory (784 bytes an image, plus float copies): a sane upper bound.
MAX_SYNTHETIC = 1_000_000


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the field, the value and what is allowed."""


REPO_PROFILE_DEFAULTS: dict[str, Any] = {"baseline_local_epochs": 1, "exclude_int_buffers": False}


def _registered(value: str, names: Iterable[str], kind: str, extra: tuple[str, ...] = ()) -> str:
    """``value`` if it is one of ``extra`` or a registered name, else a ValueError listing what is allowed."""
    allowed = [*extra, *sorted(names)]
    if value not in allowed:
        raise ValueError(f"unknown {kind}; allowed: {', '.join(allowed)}")
    return value


class ExperimentCore(BaseModel):
    """One federated backdoor experiment. Defaults are the paper profile (spec Appendix A).

    The options of the defenses and attacks (``krum_f``, ``scale_factor``, ...) are not listed here: each method
    declares them next to itself (:mod:`spmc.options`) and :data:`Experiment` adds one field per key, typed by the
    declaration; :meth:`_method_options_valid` runs every method's own checks on them.

    Validation is strict: no bool for a number, no string for a number, no null unless the option allows None,
    finite floats only (an int is accepted for a float). Lists are accepted for ``trigger_channels`` (TOML, JSON).
    Checks that need several options together (a defense's client count, the data split, the device) are made by
    :func:`make_experiment`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)
    #: The methods' options classes whose keys are fields (set by :func:`experiment_model`).
    option_types: ClassVar[tuple[type[Any], ...]] = ()

    profile: Literal["paper", "repo"] = Field(
        "paper",
        description="paper = the paper's settings; repo = the reference code's where they differ "
        "(baseline_local_epochs "
        "1, integer counters in statistics; spec §7 D1, D31)",
    )
    name: str = Field("", description="a label for the run, free text (shown in tables; not in the spec)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description=f"random seed, 0 … {MAX_SEED} (numpy's RandomState range; spec §1.1)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to train: auto (CUDA if available, else CPU), cpu or cuda (not in the spec)"
    )
    engine: Literal["auto", "sequential", "batched"] = Field(
        "auto",
        description="auto = batched for SimpleCNN, sequential otherwise (ResNet10 has per-client BN); same results "
        "(not in the spec; docs/performance.md)",
    )
    threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description=f"torch intra-op threads, 0 … {MAX_THREADS}; 0 keeps torch's default (not in the spec)",
    )
    kernel: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="batched engine's convolutions (first block, second block's backward) and SimpleCNN's "
        "evaluation: native = C kernels compiled at first use (CPU), torch = oneDNN; auto = native on the CPU where "
        "they build, else torch (not in the spec; docs/performance.md)",
    )

    dataset: str = Field(
        "fmnist-sample",
        description="dataset of the registry (`spmc list`): fmnist, mnist, cifar10 (files), fmnist-sample (embedded), "
        "synthetic (spec §1.2)",
    )
    data_dir: str | None = Field(
        None, description="folder with the dataset's files (None: $SPMC_DATA_DIR, then system folders; spec §1.2)"
    )
    model: str = Field(
        "auto",
        description="backbone of the registry (`spmc list`); auto = the dataset's (SimpleCNN or ResNet10) (spec §1.3)",
    )
    synthetic_train_size: int = Field(
        2000,
        ge=20,
        le=MAX_SYNTHETIC,
        description=f"training images of the synthetic dataset, 20 … {MAX_SYNTHETIC} (tests; not in the spec)",
    )
    synthetic_test_size: int = Field(
        500,
        ge=10,
        le=MAX_SYNTHETIC,
        description=f"test images of the synthetic dataset, 10 … {MAX_SYNTHETIC} (tests; not in the spec)",
    )

    num_clients: int = Field(10, ge=1, description="K, clients in the federation, >= 1 (spec §1.1: 10)")
    participation: float = Field(
        1.0, gt=0.0, le=1.0, description="fraction of the K clients sampled each round, in (0, 1]; n = ⌈p·K⌉ (spec D34)"
    )
    rounds: int = Field(50, gt=0, description="communication rounds T, >= 1 (spec §1.1: 50)")
    beta: float = Field(
        0.5,
        ge=0.0,
        description="Dirichlet concentration of the label-skew partition, >= 0; smaller = more skewed (spec §1.2: 0.5)",
    )
    min_client_size: int = Field(
        10,
        ge=0,
        description="the Dirichlet partition is redrawn until every client has at least this many samples, >= 0 "
        "(spec §1.2)",
    )
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="the last fraction of the training set kept as the server's clean validation split, in [0, "
        "1) (spec "
        "§1.2, D38)",
    )
    batch_size: int = Field(64, gt=0, description="local mini-batch size, >= 1 (spec §1.1: 64)")
    drop_last: bool = Field(
        True,
        description="drop each client's last partial batch every epoch (the paper's; a client with fewer than "
        "batch_size samples takes no step, spec D30); false trains it, with the loss averaged over its samples",
    )
    eval_batch_size: int = Field(
        1000, gt=0, description="batch size of evaluation, >= 1 (no effect on results; not in the spec)"
    )
    lr: float = Field(0.01, gt=0.0, description="local SGD learning rate, > 0 (spec §1.4: 0.01)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="local SGD momentum, in [0, 1) (spec §1.4: 0.9)")
    weight_decay: float = Field(1e-5, ge=0.0, description="local SGD weight decay, >= 0 (spec §1.4: 1e-5)")
    baseline_local_epochs: int = Field(
        10,
        ge=0,
        description="local epochs of the plain client (every baseline), >= 0 (spec §1.4, D1: paper 10, repo 1)",
    )
    spmc_local_epochs: int = Field(10, ge=0, description="local epochs of the SPMC client, >= 0 (spec §1.4: 10)")

    defense: str = Field(
        "fedavg", description="server defense, one of the registry (`spmc list`) (spec §3, §6; ATTACKS.md §A6)"
    )
    client: Literal["plain", "spmc"] = Field(
        "plain", description="client procedure of the benign clients: plain SGD or spmc (gradient projection, spec §4)"
    )
    malicious_client: Literal["defense", "plain", "spmc"] = Field(
        "defense",
        description="threat model, defense|plain|spmc: malicious clients run the configured client procedure (spec "
        "§4.5), plain SGD, or SPMC's whatever the benign clients run (an ablation, not in the spec)",
    )
    on_invalid_update: Literal["drop", "stop"] = Field(
        "drop",
        description="a client state with NaN/Inf, the wrong size or refused by the update guard: drop it for the "
        "round, or stop the run (not in the spec; docs/reliability.md)",
    )
    update_guard: bool = Field(
        True,
        description="refuse client states that break float arithmetic before any defense sees them (a safety net, "
        "not a defense), true or false (not in the spec; docs/reliability.md)",
    )
    update_guard_max_abs: float = Field(
        1e15,
        gt=0.0,
        description="update guard: refuse a state with any |value| >= this, > 0 (not in the spec; docs/reliability.md)",
    )
    update_guard_norm_ratio: float = Field(
        1e6,
        ge=1.0,
        description="update guard: refuse an update norm above this × the round's median update norm, >= 1 "
        "(not in the spec; docs/reliability.md)",
    )
    fedavg_weighting: Literal["uniform", "samples"] = Field(
        "uniform", description="FedAvg's client weights: uniform (the reference code) or samples (n_k/Σn_j) (spec §6.1)"
    )
    exclude_int_buffers: bool = Field(
        True, description="leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)"
    )

    attack: str = Field(
        "base",
        description="data-poisoning attack of the registry (`spmc list`; base = badnets, the paper's); none = no data "
        "attack; one of the registry (ATTACKS.md §A3)",
    )
    update_attack: str = Field(
        "none",
        description="update (model-poisoning) attack of the registry, with a training or crafting hook; composes "
        "with attack; alone (attack = none) it is untargeted; none = no update attack (ATTACKS.md §A4, §A5)",
    )
    attacker_pool: Literal["fixed", "random"] = Field(
        "fixed",
        description="attackers: fixed = the last ⌊gamma·num_clients⌋ ids, random = a seeded random subset drawn once "
        "(ATTACKS.md §A1)",
    )
    attack_start: int = Field(0, ge=0, description="first attack round, 0 … rounds − 1 (ATTACKS.md §A1)")
    attack_end: int | None = Field(
        None,
        ge=0,
        description="last attack round, attack_start … rounds − 1, or None = the last round (ATTACKS.md §A1)",
    )
    attack_every: int = Field(1, ge=1, description="attack every N-th round from attack_start, N >= 1 (ATTACKS.md §A1)")
    attacker_knowledge: Literal["full", "partial"] = Field(
        "full",
        description="update attacks see the benign states (full) or estimate them from their clean data (partial) "
        "(ATTACKS.md §A1)",
    )
    gamma: float = Field(
        0.3, ge=0.0, lt=1.0, description="γ, the malicious fraction in [0, 1); m = ⌊γK⌋ attackers (spec §2.1)"
    )
    poison_rate: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="ρ, the fraction of an attacker's training samples poisoned, in [0, 1] (spec §2.2: 0.3)",
    )
    target_label: int = Field(2, ge=0, description="τ_bd, the backdoor's target class, 0 … 9 (spec §2.2: 2)")
    semantic_source_label: int = Field(
        3, ge=0, description="the semantic backdoor's source class, 0 … 9 (spec §2.3: 3)"
    )
    semantic_noise_std: float = Field(
        0.05,
        ge=0.0,
        description="σ of the Gaussian noise on the semantic backdoor's images (normalised space), >= 0 (spec §2.3)",
    )
    trigger_channels: tuple[int, ...] = Field(
        (0,),
        description="channels the pixel trigger is written into, a non-empty list, each one of 0, 1, 2 "
        "(spec §2.2, D13: [0])",
    )
    trigger_space: Literal["normalized", "pixel"] = Field(
        "normalized",
        description="trigger value 1.0 in normalised space (normalized, the paper's) or raw intensity 1.0 (pixel) "
        "(spec D13)",
    )
    poison_static_aug: bool = Field(
        True,
        description="poison the attackers' data once after one static augmentation (the reference code) or per batch "
        "(spec §2.2)",
    )
    asr_exclude_target_class: bool = Field(
        False, description="ASR over the test images whose true class is not the target (true) or over all (spec §2.4)"
    )
    report_last_k: int = Field(
        5, gt=0, description="final metrics A and R are means over the last k rounds, >= 1 (spec §1.6: 5)"
    )
    checkpoint_every: int = Field(
        1,
        ge=0,
        description="write checkpoint.pt every N rounds, N >= 0, 0 = never (not in the spec; docs/reliability.md)",
    )

    spmc_lambda: float = Field(
        1.0,
        ge=0.0,
        description="λ of the SPMC client's projection: 1 removes the conflicting component fully, >= 0 (spec §4.3)",
    )
    spmc_kd_T: float = Field(
        1.0, gt=0.0, description="distillation temperature T of the SPMC client, > 0 (spec §4.2: 1)"
    )
    spmc_proj_norm_power: float = Field(
        2.0,
        gt=0.0,
        description="p of the projection's normaliser ‖G_g‖^p: 2 = a true projection (the code), 1 = the seed "
        "text (spec "
        "D5)",
    )
    spmc_proj_granularity: Literal["tensor", "model"] = Field(
        "tensor", description="project per parameter tensor (the paper) or once over the whole model (spec §4.3)"
    )
    spmc_kd_grad_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight of ∇L_KD added to the applied gradient, >= 0; 0 = only the projected CE gradient "
        "(spec §4.4, "
        "D7)",
    )
    spmc_teacher_bn_mode: Literal["train", "eval"] = Field(
        "train", description="the teacher's BN mode during distillation: train (the code) or eval (spec §4.1, D8)"
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") == "repo":
            return {**REPO_PROFILE_DEFAULTS, **data}
        return data

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from spmc.data import DATASETS

        return _registered(v, DATASETS, "dataset")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from spmc.models import MODELS

        return _registered(v, MODELS, "model", extra=("auto",))

    @field_validator("defense")
    @classmethod
    def _known_defense(cls, v: str) -> str:
        return _registered(v, DEFENSES, "defense")

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, v: str) -> str:
        from spmc.attacks import ATTACKS

        data = [k for k, a in ATTACKS.items() if "data" in a.hooks]
        return _registered(v, data, "data attack", extra=("none",))

    @field_validator("update_attack")
    @classmethod
    def _known_update_attack(cls, v: str) -> str:
        from spmc.attacks import ATTACKS

        updates = [k for k, a in ATTACKS.items() if a.hooks & {"training", "crafting"} and "data" not in a.hooks]
        return _registered(v, updates, "update attack", extra=("none",))

    @field_validator("trigger_channels", mode="before")
    @classmethod
    def _channels_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("trigger_channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c not in (0, 1, 2) for c in v):
            raise ValueError("must be a non-empty list of channels from 0, 1, 2")
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError("folder does not exist")
        return v

    @field_validator("*")
    @classmethod
    def _int_fits(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name != "seed" and isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            raise ValueError(f"integers must be at most {MAX_INT} in size")
        return v

    @model_validator(mode="after")
    def _labels_in_range(self) -> Experiment:
        for field in ("target_label", "semantic_source_label"):
            if getattr(self, field) >= 10:
                raise ValueError(f"{field} = {getattr(self, field)} is not a class of a 10-class dataset (0-9)")
        if self.attack_end is not None and self.attack_end < self.attack_start:
            raise ValueError(
                f"attack_end = {self.attack_end} is before attack_start = {self.attack_start}; allowed: None or "
                f">= attack_start"
            )
        for field in ("attack_start", "attack_end"):
            value = getattr(self, field)
            if value is not None and value >= self.rounds:
                none = " or None" if field == "attack_end" else ""
                raise ValueError(
                    f"{field} = {value} is not a round of the run (rounds = {self.rounds}: rounds 0 … "
                    f"{self.rounds - 1}); allowed: 0 … {self.rounds - 1}{none}"
                )
        return self

    @model_validator(mode="after")
    def _drop_last_leaves_steps(self) -> Experiment:
        check_drop_last(self)
        return self

    @model_validator(mode="after")
    def _method_options_valid(self) -> Experiment:
        problems = []
        for options_type in type(self).option_types:
            try:
                options_from(options_type, self)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))
        return self

    @property
    def resolved_model(self) -> str:
        from spmc.data import DATASETS

        return DATASETS[self.dataset].model if self.model == "auto" else self.model

    @property
    def num_malicious(self) -> int:
        """m = ⌊γK⌋, guarded against float error (spec §2.1)."""
        return threat_model(self).expected_attackers

    @property
    def malicious_ids(self) -> tuple[int, ...]:
        """The m attackers (spec §2.1, ATTACKS.md §A1): the last m ids (``attacker_pool = fixed``) or a seeded
        random m-subset (``random``); none without an attack."""
        from spmc.attacks import attacker_pool

        threat = threat_model(self)
        if not threat.attack_active:
            return ()
        return attacker_pool(self.num_clients, self.gamma, self.attacker_pool, self.seed)

    def local_epochs(self, client: str) -> int:
        return self.spmc_local_epochs if client == "spmc" else self.baseline_local_epochs

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def method_option_types() -> list[type[Any]]:
    """The options classes of every registered defense and attack (plug-ins included), each once."""
    from spmc.attacks import ATTACKS

    types: list[type[Any]] = []
    for registry in (DEFENSES, ATTACKS):
        for method in registry.values():
            options_type = getattr(method, "options_type", None)
            if options_type is not None and options_type not in types:
                types.append(options_type)
    return types


def usable_option_types(core: type[BaseModel], types: Sequence[type[Any]]) -> list[type[Any]]:
    """The options classes of ``types`` whose declarations agree (:func:`spmc.options.merged_specs`), in order; one
    that is broken or clashes with an earlier one (a plug-in's) is skipped with a warning naming it."""
    usable: list[type[Any]] = []
    for options_type in types:
        try:
            merged_specs([*usable, options_type], reserved=core.model_fields)
        except (TypeError, NameError) as err:
            log.warning("options of %s are ignored: %s", getattr(options_type, "__qualname__", options_type), err)
            continue
        usable.append(options_type)
    return usable


def method_fields(core: type[BaseModel], types: Sequence[type[Any]]) -> dict[str, Any]:
    """One pydantic field per option key the classes ``types`` declare, typed by its annotation, with its default
    and help, for :func:`pydantic.create_model`; keys that are fields of ``core`` stay the core's."""
    specs = merged_specs(types, reserved=core.model_fields)
    return {key: (spec.annotation, Field(spec.default, description=spec.help)) for key, spec in specs.items()}


def experiment_model(types: Sequence[type[Any]], name: str = "Experiment") -> type[ExperimentCore]:
    """:class:`ExperimentCore` with one field per option key of the options classes ``types``, whose checks its
    validation runs (:func:`method_fields`)."""
    types = usable_option_types(ExperimentCore, types)
    fields = method_fields(ExperimentCore, types)
    model = create_model(name, __base__=ExperimentCore, __module__=__name__, __doc__=ExperimentCore.__doc__, **fields)
    model.option_types = tuple(types)
    return model


if TYPE_CHECKING:
    Experiment = ExperimentCore
else:
    Experiment = experiment_model(method_option_types())


def expected_train_size(dataset: str, synthetic_train_size: int) -> int | None:
    """The number of training images ``dataset`` loads, before the server's validation split (``DatasetInfo.
    train_size``; fmnist-sample: the 6,000 of the embedded sample; synthetic: ``synthetic_train_size``), or None
    where it is not known."""
    from spmc.data import DATASETS

    info = DATASETS.get(dataset)
    if info is None:
        return None
    return synthetic_train_size if info.train_size is None else info.train_size


def check_drop_last(cfg: Experiment) -> None:
    """Refuse ``drop_last = true`` where the mean client size n̄ = N_pool/K is below one batch, so that most
    clients would take no step (spec D30); N_pool = ⌊(1 − val_fraction)·N_train⌋ is the client pool that the
    Dirichlet partition divides among the K = ``num_clients`` clients."""
    n_train = expected_train_size(cfg.dataset, cfg.synthetic_train_size)
    if not cfg.drop_last or n_train is None:
        return
    pool = math.floor((1.0 - cfg.val_fraction) * n_train + 1e-9)
    mean = pool / cfg.num_clients
    if mean < cfg.batch_size:
        raise ValueError(
            f"drop_last = true with batch_size = {cfg.batch_size}: num_clients = {cfg.num_clients} clients share "
            f"{pool} training samples, a mean size of {mean:.1f} per client, less than one batch, so most clients "
            "would take no step; set drop_last = false or a smaller batch_size"
        )


PRESETS: dict[str, dict[str, Any]] = {
    "paper-fmnist": {"dataset": "fmnist", "rounds": 50},
    "paper-mnist": {"dataset": "mnist", "rounds": 50},
    "paper-cifar10": {"dataset": "cifar10", "rounds": 50},
    "quick-fmnist": {"dataset": "fmnist", "rounds": 15, "baseline_local_epochs": 2, "spmc_local_epochs": 2},
    "quick-mnist": {"dataset": "mnist", "rounds": 15, "baseline_local_epochs": 2, "spmc_local_epochs": 2},
    "quick-cifar10": {"dataset": "cifar10", "rounds": 15, "baseline_local_epochs": 2, "spmc_local_epochs": 2},
    "matrix-fmnist": {
        "dataset": "fmnist",
        "rounds": 10,
        "baseline_local_epochs": 1,
        "spmc_local_epochs": 1,
        "lr": 0.02,
        "gamma": 0.3,
        "trigger_space": "pixel",
        "trigger_channels": (0, 1, 2),
    },
    "demo": {
        "dataset": "fmnist-sample",
        "rounds": 16,
        "baseline_local_epochs": 2,
        "spmc_local_epochs": 2,
        "batch_size": 32,
        "lr": 0.04,
        "gamma": 0.3,
        "trigger_space": "pixel",
        "trigger_channels": (0, 1, 2),
    },
    "smoke": {
        "dataset": "synthetic",
        "rounds": 2,
        "num_clients": 4,
        "baseline_local_epochs": 1,
        "spmc_local_epochs": 1,
        "gamma": 0.25,
    },
}
PRESET_DESCRIPTIONS: dict[str, str] = {
    "paper-fmnist": "Table 2 protocol on full Fashion-MNIST (SimpleCNN, 10 clients, Dir(0.5), 50 rounds, 10 epochs)",
    "paper-mnist": "Table 2 protocol on MNIST (IDX files from --data-dir)",
    "paper-cifar10": "Table 2 protocol on CIFAR-10 (python batches from --data-dir; ResNet10)",
    "quick-fmnist": "paper protocol on full Fashion-MNIST reduced for CPUs: 15 rounds of 2 local epochs",
    "quick-mnist": "paper protocol on MNIST reduced for CPUs: 15 rounds of 2 local epochs",
    "quick-cifar10": "paper protocol on CIFAR-10 reduced for CPUs: 15 rounds of 2 local epochs",
    "matrix-fmnist": (
        "the robustness matrix's setting (docs/matrix.md): full Fashion-MNIST, 10 rounds of 1 local epoch, lr 0.02,"
        " the trigger as white pixels in all channels, γ = 0.3"
    ),
    "demo": (
        "`spmc demo`'s setting (docs/quickstart.md): the embedded Fashion-MNIST sample, 16 rounds of 2 local epochs, "
        "batch 32, lr 0.04, the trigger as white pixels in all channels, γ = 0.3"
    ),
    "smoke": "tiny synthetic run for tests: 4 clients, 2 rounds, 1 epoch",
}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "configuration"
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(Experiment.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{field}: unknown option (value {value!r}){hint} (see `spmc list --options`)")
        elif e["loc"]:
            lines.append(f"{field}: got {value!r}; {msg}")
        else:
            lines.append(msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def clients_per_round(cfg: Experiment) -> int:
    """n, the clients a round hands the defense: all K at participation 1, else ⌈p·K⌉ sampled (spec D34)."""
    k = cfg.num_clients
    return k if cfg.participation >= 1.0 else max(1, math.ceil(cfg.participation * k - 1e-9))


def data_split_sizes(cfg: Experiment) -> tuple[int, int, int]:
    """(N training samples, client pool N_tr = ⌊(1 − val_fraction)·N⌋, server validation N − N_tr) (spec §1.2)."""
    from spmc.data import server_split

    total = expected_train_size(cfg.dataset, cfg.synthetic_train_size) or 0
    pool, val = server_split(total, cfg.val_fraction)
    return total, len(pool), len(val)


def threat_model(cfg: Experiment) -> ThreatModel:
    """The threat model of ``cfg``: K = ``num_clients``, γ = ``gamma``, an attack unless ``attack`` and
    ``update_attack`` are both ``'none'``, the experiment seed."""
    active = cfg.attack != "none" or cfg.update_attack != "none"
    return ThreatModel(num_clients=cfg.num_clients, gamma=cfg.gamma, attack_active=active, seed=cfg.seed)


def build_attack(cfg: Experiment, attackers: Sequence[int] | None = None) -> AttackPlan:
    """The run's :class:`spmc.attacks.AttackPlan` composed from the flat options: the data attack ``attack`` with
    the trigger (in the dataset's normalised space), target, source class and noise; the update attack
    ``update_attack``; the attackers (``attackers`` overrides :attr:`Experiment.malicious_ids`); the schedule
    ``attack_start`` / ``attack_end`` / ``attack_every``; ``attacker_knowledge``."""
    from spmc.attacks import ATTACKS, AttackPlan, AttackSchedule, AttackSettings, trigger_values
    from spmc.data import DATASETS

    info = DATASETS[cfg.dataset]
    threat = threat_model(cfg)
    values = trigger_values(cfg.trigger_space, info.mean, info.std, cfg.trigger_channels)
    settings = AttackSettings(
        target=cfg.target_label,
        values=tuple(values.items()),
        source_label=cfg.semantic_source_label,
        noise_std=cfg.semantic_noise_std,
        mean=tuple(info.mean),
        std=tuple(info.std),
        num_classes=info.num_classes,
    )
    return AttackPlan(
        data=build_method(ATTACKS[cfg.attack], cfg, settings=settings, threat=threat),
        update=None
        if cfg.update_attack == "none"
        else build_method(ATTACKS[cfg.update_attack], cfg, settings=settings, threat=threat),
        attackers=cfg.malicious_ids if attackers is None else tuple(sorted(attackers)),
        schedule=AttackSchedule(cfg.attack_start, cfg.attack_end, cfg.attack_every),
        knowledge=cfg.attacker_knowledge,
    )


def build_as(name: str, cfg: Experiment) -> Defense:
    """The registered defense ``name`` composed from the options of ``cfg`` (whatever ``cfg.defense`` names)."""
    if name not in DEFENSES:
        raise ValueError(f"defense: unknown value {name!r}; allowed: {', '.join(sorted(DEFENSES))}")
    defense: Defense = build_method(DEFENSES[name], cfg, threat=threat_model(cfg), config=cfg)
    return defense


def build_defense(cfg: Experiment) -> Defense:
    """The defense named by ``cfg.defense``, its options (and threat model, where it takes one) composed from the
    configuration; ``ValueError`` naming the option when one is not allowed."""
    return build_as(cfg.defense, cfg)


def optim_config(cfg: Experiment) -> OptimConfig:
    """The SGD settings (spec §1.1) and SPMC client options (spec §4, §7) of ``cfg``."""
    return OptimConfig(
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        drop_last=cfg.drop_last,
        spmc_lambda=cfg.spmc_lambda,
        spmc_kd_T=cfg.spmc_kd_T,
        spmc_proj_norm_power=cfg.spmc_proj_norm_power,
        spmc_proj_granularity=cfg.spmc_proj_granularity,
        spmc_kd_grad_weight=cfg.spmc_kd_grad_weight,
        spmc_teacher_bn_mode=cfg.spmc_teacher_bn_mode,
    )


def _defense_problems(cfg: Experiment) -> list[str]:
    """The defense's own option checks, its rule for n clients per round and its need of server data."""
    n = clients_per_round(cfg)
    total, _, val = data_split_sizes(cfg)
    rounds = (
        f"n = {n} clients per round from num_clients = {cfg.num_clients}, participation = {cfg.participation}; "
        f"m = ⌊gamma·num_clients⌋ = {cfg.num_malicious} with gamma = {cfg.gamma}"
    )
    split = f"{total} training samples in {cfg.dataset!r}, val_fraction = {cfg.val_fraction} leaves {val}"
    try:
        defense = build_defense(cfg)
    except ValueError as err:
        return [f"defense = {cfg.defense!r}: {err}"]
    problems = []
    for check, args, context in (
        ("check_clients", (n,), rounds),
        ("check_server_data", (val, cfg.batch_size), split),
    ):
        method = getattr(defense, check, None)
        if method is None:
            continue
        try:
            method(*args)
        except ValueError as err:
            problems.append(f"defense = {cfg.defense!r}: {err} ({context})")
    return problems


def _data_problems(cfg: Experiment) -> list[str]:
    """Every client must be able to get min_client_size samples (at least one) from the client pool."""
    total, pool, _ = data_split_sizes(cfg)
    per_client = max(cfg.min_client_size, 1)
    if per_client * cfg.num_clients <= pool:
        return []
    allowed = f"min_client_size <= {pool // cfg.num_clients}" if pool >= cfg.num_clients else f"num_clients <= {pool}"
    return [
        f"min_client_size, num_clients, val_fraction: {cfg.num_clients} clients of at least {per_client} samples "
        f"need {per_client * cfg.num_clients}, but the client pool has {pool} ({total} training samples in "
        f"{cfg.dataset!r}, val_fraction = {cfg.val_fraction}); allowed: {allowed}, or a smaller val_fraction"
    ]


def _runtime_problems(cfg: Experiment) -> list[str]:
    """What this machine and the engines can do: a CUDA device, the batched engine's model."""
    problems = []
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("device: got 'cuda' but no CUDA device is available here; allowed: 'cpu' or 'auto'")
    if cfg.engine == "batched" and cfg.resolved_model != "simplecnn":
        problems.append(
            f"engine: 'batched' supports SimpleCNN only; model {cfg.resolved_model!r} (dataset {cfg.dataset!r}, "
            f"model = {cfg.model!r}) needs engine = 'sequential' or 'auto'"
        )
    return problems


def cross_field_problems(cfg: Experiment) -> list[str]:
    """One line per contradiction between options (or with this machine) that would stop a run after loading."""
    return [*_defense_problems(cfg), *_data_problems(cfg), *_runtime_problems(cfg)]


def _warn_no_attackers(cfg: Experiment) -> None:
    if cfg.attack != "none" and cfg.gamma > 0 and cfg.num_malicious == 0:
        log.warning(
            "gamma = %s with num_clients = %d gives m = ⌊gamma·num_clients⌋ = 0 malicious clients: attack %r "
            "is not run",
            cfg.gamma,
            cfg.num_clients,
            cfg.attack,
        )


def make_experiment(**values: Any) -> Experiment:
    """Validate ``values`` into an :class:`Experiment`, then the options together (:func:`cross_field_problems`),
    raising :class:`ConfigError` with one line per problem naming the fields, the values and what is allowed."""
    try:
        cfg = Experiment(**values)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    _warn_no_attackers(cfg)
    return cfg


def load_toml_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config: {p} is not valid TOML: {err}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML configuration file: top-level keys and an ``[experiment]`` table, merged; a key in both is
    refused."""
    data = load_toml_file(path)
    if "experiment" not in data:
        return dict(data)
    table = data["experiment"]
    if not isinstance(table, dict):
        raise ConfigError(f"config: experiment in {path} must be a table ([experiment]); got {table!r}")
    top = {k: v for k, v in data.items() if k != "experiment"}
    both = sorted(set(top) & set(table))
    if both:
        raise ConfigError(f"config: {path} sets {', '.join(both)} both at top level and under [experiment]; keep one")
    return {**top, **table}


def unknown_key_line(where: str, key: str) -> str:
    """One line for a key that is not an option: where it is, the key, the closest option name if one is close."""
    close = difflib.get_close_matches(key, list(Experiment.model_fields), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: {key!r} is not an option{hint} (see `spmc list --options`)"


def load_run_json(path: str | Path) -> dict[str, Any]:
    """The options of a run's own ``config.json`` (what ``spmc run`` writes in its run directory: every option of
    :class:`Experiment` by name, nothing else). Every key must be an option: a key that is not (a typo, an
    option of a newer or older spmc, any metadata) is refused, naming the closest option, rather than dropped,
    since dropping it could change what the rerun computes. Options the file lacks (it was written before they
    existed) take today's defaults; those the run reads (:func:`used_option_keys`) are named in a warning. Errors
    are one line naming the file."""
    from spmc.store import read_json_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file {str(p)!r} does not exist")
    try:
        values = read_json_file(p)
    except ValueError as err:  # DataError: not JSON, not UTF-8
        raise ConfigError(f"config: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config: {p} must be a JSON object of options (a run's config.json); got a {type(values).__name__}"
        )
    for key in values:
        if key not in Experiment.model_fields:
            raise ConfigError(unknown_key_line(f"config: {p}", str(key)))
    missing = sorted(used_option_keys(values) - set(values))
    if missing:
        log.warning(
            "%s does not set %s (written by an earlier spmc, or by hand); today's defaults are used",
            p,
            ", ".join(missing),
        )
    return dict(values)


def used_option_keys(values: dict[str, Any]) -> set[str]:
    """The options a run of ``values`` reads: the configuration's own and those of its defense, data attack and
    update attack (the options of methods it does not run change nothing)."""
    from spmc.attacks import ATTACKS

    keys = set(ExperimentCore.model_fields)
    methods: list[object] = [DEFENSES.get(str(values.get("defense", "fedavg")))]
    methods += [ATTACKS.get(str(values.get(k, "none"))) for k in ("attack", "update_attack")]
    for method in methods:
        options_type = getattr(method, "options_type", None)
        if options_type is not None:
            keys |= {spec.key for spec in option_specs(options_type)}
    return keys & set(Experiment.model_fields)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options of ``--config``: a run's ``config.json`` (a ``.json`` file, :func:`load_run_json`) or a TOML
    file (:func:`load_toml`)."""
    if Path(path).suffix.lower() == ".json":
        return load_run_json(path)
    return load_toml(path)


def resolve(preset: str | None = None, file: str | Path | None = None, /, **overrides: Any) -> Experiment:
    """Preset, then file (TOML, or a run's ``config.json``), then explicit overrides (later wins), validated.
    ``preset`` may also be given in a TOML file or among the overrides (later wins); an override of None is kept
    (allowed only where an option is)."""
    values: dict[str, Any] = load_config_file(file) if file is not None else {}
    for given in (values.pop("preset", None), overrides.pop("preset", None)):
        preset = given if given is not None else preset
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"preset: unknown value {preset!r}; allowed: {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **values}
    values.update(overrides)
    return make_experiment(**values)
