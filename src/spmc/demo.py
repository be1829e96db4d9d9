"""``spmc demo``: FedAvg, SPMC, DnC and FLAME under the base backdoor and under an adaptive attack, in one table.

The demo is a small robustness matrix (:mod:`spmc.matrix`): four defense columns (FedAvg; SPMC with its own
client; DnC, a Table 2 baseline; FLAME, one of the added defenses) times two attack rows (``badnets``, the paper's
base backdoor, and ``badnets`` + ``defense_aware``, the attack that searches its scale against a copy of the
server's defense), run as a sweep (:func:`spmc.sweep.run_sweep`), two runs at a time with one thread each. Its grid
is saved as ``matrix.toml`` in the output folder, so an interrupted demo finishes with ``spmc sweep
DIR/matrix.toml``. The table gives A, R = 100 − ASR, ASR and seconds per round over the last ``report_last_k``
rounds, and :func:`reading` turns the numbers into one or two sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmc import matrix
from spmc.attacks import ATTACKS
from spmc.config import ConfigError
from spmc.sweep import SweepOutcome, _label, expand_grid, run_name, run_sweep

#: (label, defense) of the demo's columns; each defense runs with its natural client (SPMC's own for ``spmc``).
DEFENSE_ARMS: tuple[tuple[str, str], ...] = (("FedAvg", "fedavg"), ("SPMC", "spmc"), ("DnC", "dnc"), ("FLAME", "flame"))
#: ``spmc demo --quick``: the first two arms under the base attack only, at the same setting (about 30 s).
QUICK_ARMS: tuple[tuple[str, str], ...] = DEFENSE_ARMS[:2]
#: The base backdoor (ATTACKS.md §A3) and the adaptive attack layered on it (ATTACKS.md §A5).
BASE_ATTACK = "badnets"
ADAPTIVE_ATTACK = "defense_aware"
#: Options each arm sets itself: the demo refuses them in ``--set`` rather than let the arms overwrite them.
ARM_KEYS = ("defense", "client", "attack", "update_attack")
#: ASR (%) at or above which a model counts as backdoored (the criterion the demo's setting is chosen by).
BACKDOORED_ASR = 80.0
#: ASR (%) below which a defense counts as holding.
HOLDS_ASR = 20.0
#: Clean accuracy (%) below which a model has not learnt the task (twice chance on the ten-class datasets): its
#: ASR then only says which class it predicts, so it is not read as a backdoor or a defense.
LEARNT_A = 20.0
#: Points of ASR by which the adaptive attack must fall short of the base attack to be read as doing less.
WEAKER_BY = 10.0
#: Runs at once; each gets one torch thread (``threads = 1``) unless the options set another count.
DEMO_JOBS = 2


@dataclass(frozen=True)
class DemoRow:
    """One run of the demo: its defense label, attack label, status and metrics (None when it did not finish)."""

    defense: str
    attack: str
    status: str
    A: float | None = None
    R: float | None = None
    seconds_per_round: float | None = None
    run_dir: Path | None = None
    error: str = ""

    @property
    def asr(self) -> float | None:
        """ASR = 100 − R over the last rounds, None when R is unknown."""
        return None if self.R is None else 100.0 - self.R


def demo_arms(quick: bool = False) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The demo's (label, defense) arms and its attacks: all of them, or with ``quick`` FedAvg and SPMC under the
    base attack."""
    if quick:
        return QUICK_ARMS, (BASE_ATTACK,)
    return DEFENSE_ARMS, (BASE_ATTACK, ADAPTIVE_ATTACK)


def demo_spec(
    base: dict[str, Any], out: Path, seed: int = 0, jobs: int = DEMO_JOBS, quick: bool = False
) -> dict[str, Any]:
    """The demo's sweep grid (:func:`spmc.matrix.matrix_spec`): ``base`` options (a preset and overrides, one
    thread per run unless ``threads`` is given) × the defense arms × the attack rows of :func:`demo_arms`, for
    ``seed``."""
    clash = sorted(set(base) & set(ARM_KEYS))
    if clash:
        raise ConfigError(
            f"demo: {', '.join(clash)} are set by the demo's arms and cannot be overridden; "
            "use `spmc run` or `spmc matrix` for other defenses or attacks"
        )
    arms, attacks = demo_arms(quick)
    columns = matrix.defense_columns([name for _, name in arms])
    rows = matrix.attack_rows(list(attacks), ATTACKS, base=BASE_ATTACK)
    return matrix.matrix_spec(columns, rows, [seed], {"threads": 1, **base}, out, jobs)


def attack_label(options: dict[str, Any]) -> str:
    """``badnets`` or ``defense_aware`` (the update attack on top of badnets), as the table shows them."""
    update = options.get("update_attack", "none")
    return str(options.get("attack")) if update == "none" else str(update)


def run_demo(
    base: dict[str, Any],
    out: Path,
    seed: int = 0,
    jobs: int = DEMO_JOBS,
    on_done: Callable[[SweepOutcome], None] | None = None,
    quick: bool = False,
) -> list[DemoRow]:
    """Validate every arm, save the grid as ``out/matrix.toml``, run the sweep and return the rows (eight, or two
    with ``quick``) in the order defense × attack (finished runs in ``out`` are reused, as in any sweep)."""
    spec = demo_spec(base, out, seed, jobs, quick)
    expand_grid(spec)  # every arm validated (one line naming the run and the option) before anything is written
    matrix.save_spec(spec, out)
    outcomes = {o.run.name: o for o in run_sweep(spec, out, jobs, on_done)}
    rows = []
    for label, column in zip((lab for lab, _ in demo_arms(quick)[0]), spec["grid"]["defense"]):
        for attack in spec["grid"]["attack"]:
            name = run_name([_label("defense", column), _label("attack", attack), _label("seed", seed)])
            rows.append(_row(label, attack_label(attack), outcomes.get(name), out / name))
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _row(defense: str, attack: str, outcome: SweepOutcome | None, run_dir: Path) -> DemoRow:
    if outcome is None or outcome.status not in ("done", "skipped", "resumed"):
        status = "missing" if outcome is None else outcome.status
        return DemoRow(defense, attack, status, run_dir=run_dir, error="" if outcome is None else outcome.error)
    s = outcome.summary
    return DemoRow(
        defense,
        attack,
        "done",
        _number(s.get("A")),
        _number(s.get("R")),
        _number(s.get("seconds_per_round")),
        run_dir,
    )


def _accuracy(row: DemoRow) -> str:
    return "unknown" if row.A is None else f"{row.A:.1f} %"


def _pct(value: float) -> str:
    return f"{value:.0f} %"


def _names(rows: Sequence[DemoRow], with_a: bool = False) -> str:
    """The rows as a list for a sentence: SPMC (ASR 3 %) and FLAME (ASR 5 %); with ``with_a`` their A too."""
    parts = []
    for r in rows:
        assert r.asr is not None
        extra = f", A {r.A:.1f}" if with_a and r.A is not None else ""
        parts.append(f"{r.defense} (ASR {_pct(r.asr)}{extra})")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _asr(row: DemoRow) -> float:
    return row.asr if row.asr is not None else 0.0


def _verb(rows: Sequence[DemoRow], singular: str, plural: str) -> str:
    return singular if len(rows) == 1 else plural


def reading(rows: Sequence[DemoRow], base: str = BASE_ATTACK, adaptive: str = ADAPTIVE_ATTACK) -> str:
    """One or two sentences that read the demo's table from its numbers: whether FedAvg is backdoored under
    ``base`` (ASR >= :data:`BACKDOORED_ASR`), which defenses hold under ``base`` (ASR < :data:`HOLDS_ASR`) and
    which do not, and under ``adaptive`` which of those that held fall and which still hold. Runs that did not
    finish are named as such, never read."""
    done = {(r.defense, r.attack): r for r in rows if r.status == "done" and r.asr is not None}
    unfinished = [f"{r.defense} under {r.attack}" for r in rows if (r.defense, r.attack) not in done]
    fedavg = done.get(("FedAvg", base))
    if fedavg is None:
        first = "FedAvg under the base attack did not finish, so the table cannot be read."
    elif fedavg.A is None or fedavg.A < LEARNT_A:
        first = (
            f"FedAvg has not learnt the task at this setting (A {_accuracy(fedavg)} under {base}, below "
            f"{_pct(LEARNT_A)}): its ASR of {_pct(fedavg.asr or 0.0)} only says which class it predicts, so the "
            "table says nothing about the defenses; try more rounds or local epochs."
        )
    elif fedavg.asr is not None and fedavg.asr >= BACKDOORED_ASR:
        first = (
            f"FedAvg is backdoored: under {base} its ASR is {_pct(fedavg.asr)} (>= {_pct(BACKDOORED_ASR)}), with "
            f"clean accuracy A {fedavg.A:.1f} %."
        )
    else:
        assert fedavg.asr is not None
        first = (
            f"FedAvg is not clearly backdoored at this setting: under {base} its ASR is {_pct(fedavg.asr)} (below "
            f"{_pct(BACKDOORED_ASR)}), so a low ASR below says little about a defense."
        )
    defenses = list(dict.fromkeys(r.defense for r in rows if r.defense != "FedAvg"))
    under_base = [done[(d, base)] for d in defenses if (d, base) in done]
    unlearnt = [r for r in under_base if r.A is None or r.A < LEARNT_A]
    under_base = [r for r in under_base if r not in unlearnt]
    backdoored = fedavg is not None and fedavg.asr is not None and fedavg.asr >= BACKDOORED_ASR
    holds = [r for r in under_base if _asr(r) < HOLDS_ASR]
    lowers = [r for r in under_base if backdoored and HOLDS_ASR <= _asr(r) < BACKDOORED_ASR]
    gives = [r for r in under_base if r not in holds and r not in lowers]
    base_parts = []
    if holds:
        base_parts.append(
            f"{_names(holds, with_a=True)} {_verb(holds, 'keeps', 'keep')} the ASR below {_pct(HOLDS_ASR)}"
        )
    if lowers:
        base_parts.append(f"{_names(lowers, with_a=True)} {_verb(lowers, 'lowers', 'lower')} it")
    if gives:
        base_parts.append(f"{_names(gives)} {_verb(gives, 'does', 'do')} not{' lower it' if backdoored else ''}")
    parts = [f"under {base}, " + "; ".join(base_parts)] if base_parts else []
    held = [r.defense for r in holds + lowers if (r.defense, adaptive) in done]
    falls = [done[(d, adaptive)] for d in held if _asr(done[(d, adaptive)]) >= BACKDOORED_ASR]
    still = [done[(d, adaptive)] for d in held if _asr(done[(d, adaptive)]) < HOLDS_ASR]
    between = [done[(d, adaptive)] for d in held if done[(d, adaptive)] not in falls + still]
    adaptive_parts = []
    if falls:
        adaptive_parts.append(f"{_names(falls)} {_verb(falls, 'falls', 'fall')}")
    if between:
        adaptive_parts.append(f"{_names(between)} {_verb(between, 'gives', 'give')} way in part")
    if still:
        adaptive_parts.append(f"{_names(still)} still {_verb(still, 'holds', 'hold')}")
    if adaptive_parts:
        parts.append(f"under {adaptive}, " + " while ".join(adaptive_parts))
    weaker = [
        done[(d, adaptive)]
        for d in ["FedAvg", *defenses]
        if (d, adaptive) in done and (d, base) in done and _asr(done[(d, adaptive)]) < _asr(done[(d, base)]) - WEAKER_BY
    ]
    if weaker:
        parts.append(f"{adaptive} does less than {base} against {_names(weaker, with_a=True)}")
    if unlearnt:
        names = ", ".join(f"{r.defense} (A {_accuracy(r)})" for r in unlearnt)
        parts.append(f"{names} {_verb(unlearnt, 'has', 'have')} not learnt the task under {base}")
    second = ""
    if parts:
        text = "; ".join(parts)
        second = " " + text[0].upper() + text[1:] + "."
    tail = f" Not finished: {', '.join(unfinished)}." if unfinished else ""
    return first + second + tail


def demo_base(preset: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The options every arm shares (``preset``, then the overrides without ``seed``) and the seed (default 0)."""
    values = dict(overrides)
    seed = values.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: got {seed!r}; must be an integer 0 … 4294967295")
    return {"preset": preset, **values}, seed
