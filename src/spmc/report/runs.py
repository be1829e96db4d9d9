"""Reading finished (or running) run directories for the reports, and the names the reports give them.

A run directory (``store.RunStore``) holds ``config.json``, ``metrics.jsonl``, ``summary.json`` and
``checkpoint.pt``. The reports take run directories or parent folders, which are searched recursively.

Row labels (Table 2, the legends of Figure 6, the titles of Figure 7) follow one rule:

* the defense's name as the paper prints it (``fedavg`` → ``FedAvg``, ``spmc`` → ``SPMC``, ...; a defense the
  paper does not have keeps a readable name such as ``Multi-Krum``);
* the paper pairs each defense with one client procedure, ``spmc`` for SPMC and ``plain`` for every other
  defense; a run with the other procedure gets `` + SPMC client`` or `` + plain client``
  (``--defense fedavg --client spmc`` → ``FedAvg + SPMC client``, ``--defense spmc --client plain`` →
  ``SPMC + plain client``);
* where runs of the same defense and client procedure differ in another option (a different
  ``spmc_temperature``, say) on the same dataset and γ, the options that differ are appended in brackets:
  ``SPMC [spmc_temperature=0.01]``. Options that do not change results (:data:`IGNORED_OPTIONS`) are never
  compared.

What a run's numbers mean depends on its attack (ATTACKS.md §A1, :attr:`RunDir.attack_kind`): a backdoor run
reports A and R; an untargeted run (label flip, an update attack with ``attack = none``) reports A and
ΔA = A − A(no attack, same seed), where the run without attack is the one :func:`no_attack_match` finds.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from spmc.attacks import ATTACK_KINDS, ATTACKS, AttackKind, kind_of
from spmc.config import ConfigError, Experiment
from spmc.data import DataError
from spmc.options import option_specs
from spmc.store import read_json_file, read_metrics_file, recorded_error

log = logging.getLogger(__name__)

#: The paper's names of the defenses, in the row order of its Table 2; then the other registered defenses.
DEFENSE_LABELS: dict[str, str] = {
    "fedavg": "FedAvg",
    "dnc": "DnC",
    "sageflow": "Sageflow",
    "bulyan": "Bulyan",
    "rfa": "RFA",
    "rlr": "RLR",
    "crfl": "CRFL",
    "foolsgold": "FoolsGold",
    "rsa": "RSA",
    "finetuning": "Finetuning",
    "spmc": "SPMC",
    "krum": "Krum",
    "multikrum": "Multi-Krum",
    "trimmed_mean": "Trimmed mean",
    "median": "Median",
    "fltrust": "FLTrust",
    "fedcpa": "FedCPA",
    "flame": "FLAME",
    "norm_clip": "Norm clipping",
    "weak_dp": "Weak DP",
    "centered_clip": "Centered clipping",
    "bucketing": "Bucketing",
    "signguard": "SignGuard",
    "deepsight": "DeepSight",
    "fldetector": "FLDetector",
    "multimetrics": "MultiMetrics",
}
#: Defenses that are rows of the paper's Table 2 (the method strings of ``table2_paper.csv``).
PAPER_DEFENSES: tuple[str, ...] = tuple(list(DEFENSE_LABELS)[:11])
#: The paper's names of the datasets, in its column order; other datasets are labelled by their own name.
DATASET_LABELS: dict[str, str] = {"fmnist": "FashionMNIST", "cifar10": "CIFAR-10", "mnist": "MNIST"}
CLIENT_LABELS: dict[str, str] = {"plain": "plain", "spmc": "SPMC"}
#: Options that never change a run's numbers, or that name the run rather than its setting.
IGNORED_OPTIONS: frozenset[str] = frozenset(
    {"seed", "name", "device", "engine", "threads", "data_dir", "checkpoint_every", "eval_batch_size"}
)
#: Options that place a run in the table (row, column, block) rather than distinguish variants of a row.
IDENTITY_OPTIONS: frozenset[str] = frozenset({"dataset", "gamma", "defense", "client"})

SUMMARY_KEYS: tuple[str, ...] = ("A", "R", "V", "dataset", "defense", "client", "gamma", "seed")

#: Options of the attack and the threat model (ATTACKS.md §A1-§A4): the run without attack that gives an untargeted
#: run its ΔA may differ from it in these, and in nothing else but :data:`IGNORED_OPTIONS`. The attacks' own
#: option keys (``scale_factor``, ...) are added from the registry by :func:`attack_options`.
ATTACK_OPTIONS: frozenset[str] = frozenset(
    {
        "attack",
        "update_attack",
        "attacker_pool",
        "attack_start",
        "attack_end",
        "attack_every",
        "attacker_knowledge",
        "malicious_client",
        "poison_rate",
        "poison_static_aug",
        "target_label",
        "semantic_source_label",
        "semantic_noise_std",
        "trigger_channels",
        "trigger_space",
        "asr_exclude_target_class",
    }
)


def attack_options() -> frozenset[str]:
    """:data:`ATTACK_OPTIONS` and the option keys every registered attack declares (:mod:`spmc.options`)."""
    keys = set(ATTACK_OPTIONS)
    for cls in ATTACKS.values():
        if cls.options_type is not None:
            keys.update(spec.key for spec in option_specs(cls.options_type))
    return frozenset(keys)


def _json_defaults() -> dict[str, Any]:
    defaults: dict[str, Any] = json.loads(Experiment.model_construct().model_dump_json())
    return defaults


def natural_client(defense: str) -> str:
    """The client procedure the paper pairs with ``defense``: ``spmc`` for SPMC, ``plain`` for the others."""
    return "spmc" if defense == "spmc" else "plain"


def defense_label(defense: str) -> str:
    """The paper's name of a defense (``fedavg`` → ``FedAvg``); unknown names are returned unchanged."""
    return DEFENSE_LABELS.get(defense, defense)


def method_label(defense: str, client: str) -> str:
    """Row label of a (defense, client procedure) pair: ``FedAvg``, ``SPMC``, ``FedAvg + SPMC client``, ..."""
    base = defense_label(defense)
    if client == natural_client(defense):
        return base
    return f"{base} + {CLIENT_LABELS.get(client, client)} client"


def dataset_label(dataset: str) -> str:
    """Column label of a dataset: the paper's name for ``fmnist``, ``cifar10``, ``mnist``; the name otherwise."""
    return DATASET_LABELS.get(dataset, dataset)


def defense_order(defense: str) -> tuple[int, str]:
    """Sort key: the paper's row order, then the other registered defenses, then unknown names alphabetically."""
    order = list(DEFENSE_LABELS)
    return (order.index(defense), "") if defense in order else (len(order), defense)


def dataset_order(label: str) -> tuple[int, str]:
    """Sort key of a dataset label: the paper's column order, then the others alphabetically."""
    order = list(DATASET_LABELS.values())
    return (order.index(label), "") if label in order else (len(order), label)


@dataclass(frozen=True)
class RunDir:
    """One run directory as the reports see it."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None

    def _get(self, key: str) -> Any:
        if self.summary is not None and key in self.summary:
            return self.summary[key]
        return self.config[key]

    @property
    def dataset(self) -> str:
        return str(self._get("dataset"))

    @property
    def defense(self) -> str:
        return str(self._get("defense"))

    @property
    def client(self) -> str:
        return str(self._get("client"))

    @property
    def gamma(self) -> float:
        return float(self._get("gamma"))

    @property
    def seed(self) -> int:
        return int(self._get("seed"))

    @property
    def label(self) -> str:
        return method_label(self.defense, self.client)

    @property
    def attack_kind(self) -> AttackKind:
        """``backdoor``, ``untargeted`` or ``none`` (§A1): the summary's ``attack_kind``; for a run written before
        it existed (or still running), from the configuration's ``attack`` and ``update_attack`` (an attack the
        registry lacks, a plug-in not installed here: backdoor unless ``attack = none``)."""
        stored = (self.summary or {}).get("attack_kind")
        if stored in ATTACK_KINDS:
            return cast(AttackKind, stored)
        attack, update = str(self.config.get("attack", "none")), str(self.config.get("update_attack", "none"))
        try:
            return kind_of(attack, update)
        except KeyError:
            if attack != "none":
                return "backdoor"
            return "untargeted" if update != "none" else "none"

    def metric(self, key: str) -> float:
        """A, R or V from ``summary.json`` (NaN where the run stored null)."""
        if self.summary is None:
            raise DataError(f"{self.path}: no summary.json (is the run finished?)")
        value = self.summary[key]
        return float("nan") if value is None else float(value)

    def options(self) -> dict[str, Any]:
        """The options that may distinguish variants of a row (everything but identity and ignored options)."""
        skip = IGNORED_OPTIONS | IDENTITY_OPTIONS
        return {k: v for k, v in self.config.items() if k not in skip}

    def metrics(self) -> list[dict[str, Any]]:
        """The per-round records of ``metrics.jsonl``."""
        return read_metrics(self.path)

    def setting(self) -> dict[str, Any]:
        """The options that decide the numbers of a run without attack: everything but the attack's options
        (:func:`attack_options`) and :data:`IGNORED_OPTIONS`, plus the seed."""
        skip = (IGNORED_OPTIONS - {"seed"}) | attack_options()
        return {k: v for k, v in self.config.items() if k not in skip}


def no_attack_match(run: RunDir, candidates: Sequence[RunDir]) -> RunDir | None:
    """The run of ``candidates`` without attack (``attack_kind == "none"``) whose :meth:`RunDir.setting` equals
    ``run``'s (same seed, same everything but the attack options): the reference of ``run``'s ΔA (§A1). The first
    when several match (they are repeats of one run); None when none does."""
    want = json.dumps(run.setting(), sort_keys=True)
    for c in candidates:
        if c is not run and c.attack_kind == "none" and json.dumps(c.setting(), sort_keys=True) == want:
            return c
    return None


def _read_json(path: Path) -> Any:
    try:
        return read_json_file(path)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None


def _left_out_label(run_dir: Path) -> str:
    """``run_dir``, with the first line of the error its sweep recorded (``error.txt``) when it failed."""
    error = recorded_error(run_dir)
    return f"{run_dir} (failed: {error})" if error else str(run_dir)


def find_run_dirs(paths: Iterable[str | Path], marker: str = "summary.json") -> list[Path]:
    """Run directories named by ``paths``: each path that holds ``marker`` is one; any other folder is searched
    recursively for ``marker``. Order: as given, then sorted within a searched folder; no duplicates. Run
    directories without ``marker`` (a ``config.json`` but no ``summary.json``: a run still going, killed or failed)
    are left out with one warning that names them.

    Raises:
        ConfigError: a path does not exist.
        DataError: no run directory was found.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    unfinished: list[Path] = []
    given = list(paths)
    for p in map(Path, given):
        if not p.exists():
            raise ConfigError(f"runs: {str(p)!r} does not exist")
        if (p / marker).is_file():
            candidates = [p]
        elif p.is_dir():
            candidates = sorted(m.parent for m in p.rglob(marker))
            unfinished += sorted(c.parent for c in p.rglob("config.json") if not (c.parent / marker).is_file())
        else:
            raise ConfigError(f"runs: {str(p)!r} is a file; give run directories or folders that hold them")
        for c in candidates:
            if c.resolve() not in seen:
                seen.add(c.resolve())
                found.append(c)
    left_out = [_left_out_label(d) for d in dict.fromkeys(unfinished)]
    if left_out:
        log.warning(
            "runs: left out %d run folder(s) without %s (unfinished or failed): %s",
            len(left_out),
            marker,
            ", ".join(left_out),
        )
    if not found:
        raise DataError(f"runs: no {marker} under {', '.join(map(str, given))}; give run directories")
    return found


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (:func:`spmc.store.read_metrics_file`: a half-written last line,
    from a running job, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl; is it a run directory?")
    try:
        return read_metrics_file(path)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None


def load_run_dir(path: str | Path, need_summary: bool = True) -> RunDir:
    """Read ``config.json`` (missing options take the defaults) and ``summary.json`` of one run directory.

    Raises:
        DataError: a file is missing or malformed, or the summary lacks one of :data:`SUMMARY_KEYS`.
    """
    path = Path(path)
    config = _json_defaults()
    config_path = path / "config.json"
    if config_path.is_file():
        stored = _read_json(config_path)
        if not isinstance(stored, dict):
            raise DataError(f"{config_path}: expected a JSON object")
        config.update(stored)
    elif need_summary:
        log.warning("%s: no config.json; variants of a row cannot be told apart", path)
    else:
        raise DataError(f"{path}: no config.json; is it a run directory?")
    summary = None
    summary_path = path / "summary.json"
    if summary_path.is_file():
        summary = _read_json(summary_path)
        if not isinstance(summary, dict):
            raise DataError(f"{summary_path}: expected a JSON object")
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise DataError(f"{summary_path}: missing {', '.join(missing)}")
    elif need_summary:
        raise DataError(f"{path}: no summary.json (is the run finished?)")
    return RunDir(path, config, summary)


def load_runs(paths: Iterable[str | Path], need_summary: bool = True) -> list[RunDir]:
    """Find (:func:`find_run_dirs`) and read (:func:`load_run_dir`) the runs named by ``paths``."""
    marker = "summary.json" if need_summary else "metrics.jsonl"
    return [load_run_dir(p, need_summary) for p in find_run_dirs(paths, marker)]


def _fmt_option(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def variant_keys(runs: Sequence[RunDir]) -> dict[tuple[str, str], tuple[str, ...]]:
    """For each (defense, client), the options that differ between its runs on the same dataset and γ."""
    cells: dict[tuple[str, str, str, float], list[RunDir]] = defaultdict(list)
    for r in runs:
        cells[(r.defense, r.client, r.dataset, round(r.gamma, 6))].append(r)
    keys: dict[tuple[str, str], set[str]] = {}
    for (defense, client, _, _), members in cells.items():
        pair_keys = keys.setdefault((defense, client), set())
        opts = [m.options() for m in members]
        for k in set().union(*opts):
            if len({json.dumps(o.get(k), sort_keys=True) for o in opts}) > 1:
                pair_keys.add(k)
    return {pair: tuple(sorted(ks)) for pair, ks in keys.items()}


def variant_of(run: RunDir, keys: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The (option, value) pairs of ``run`` for the given variant keys, values as short strings."""
    opts = run.options()
    return tuple((k, _fmt_option(opts.get(k))) for k in keys)


def variant_suffix(variant: Sequence[tuple[str, str]]) -> str:
    """`` [k=v, k=v]`` for a non-empty variant, else the empty string."""
    return f" [{', '.join(f'{k}={v}' for k, v in variant)}]" if variant else ""


def distinct_labels(runs: Sequence[RunDir]) -> list[str]:
    """One label per run, as short as possible: the method label, then whatever tells runs with the same label
    apart (dataset, γ, variant options, seed, finally the directory name)."""
    labels = [r.label for r in runs]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    vkeys = variant_keys(runs)
    out = list(labels)
    for idx in groups.values():
        if len(idx) == 1:
            continue
        members = [runs[i] for i in idx]
        parts: dict[int, list[str]] = {i: [] for i in idx}
        if len({m.dataset for m in members}) > 1:
            for i in idx:
                parts[i].append(dataset_label(runs[i].dataset))
        if len({m.gamma for m in members}) > 1:
            for i in idx:
                parts[i].append(f"γ={runs[i].gamma:g}")
        for i in idx:
            keys = vkeys.get((runs[i].defense, runs[i].client), ())
            parts[i] += [f"{k}={v}" for k, v in variant_of(runs[i], keys)]
        if len({m.seed for m in members}) > 1:
            for i in idx:
                parts[i].append(f"seed {runs[i].seed}")
        for i in idx:
            out[i] = labels[i] + (f" ({', '.join(parts[i])})" if parts[i] else "")
        if len({out[i] for i in idx}) < len(idx):
            for i in idx:
                out[i] = f"{out[i]} [{runs[i].path.name}]"
    return out
