"""Table 2 of the paper from run directories: rows = defenses, column groups = dataset × (A, R, V), one block per γ.

Several runs of the same cell (same defense, client procedure, dataset, γ and other options, different seeds) are
averaged: A, R and V are the means of the runs' last-k values (``summary.json``), which is the same as averaging
each round over the runs first and then taking the last-k mean (spec §1.6), and the spread is the sample standard
deviation over the runs (not shown for a single run). With the paper's numbers (``table2_paper.csv``, shipped in
the package), each value gets the paper's value and the difference ours − paper beside it; a value the paper does
not give (unreadable in the source, or a defense or dataset it does not have) stays blank.

Untargeted attacks (ATTACKS.md §A1: label flip, an update attack with ``attack = none``) have no R nor V (blank);
when the runs hold one, a ΔA column (``dA`` in CSV) follows A: ΔA = A − A(no attack, same seed), per run against
the run without attack that :func:`spmc.report.runs.no_attack_match` finds among the runs given, averaged like the
other metrics; blank, with a note under the table, where that run is not among them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from spmc.config import ConfigError
from spmc.report.runs import (
    PAPER_DEFENSES,
    RunDir,
    dataset_label,
    dataset_order,
    defense_label,
    defense_order,
    method_label,
    natural_client,
    no_attack_match,
    variant_keys,
    variant_of,
    variant_suffix,
)

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("A", "R", "V")
#: The metrics of a table that holds an untargeted run: ΔA (key ``dA``) after A.
METRICS_WITH_DELTA: tuple[str, ...] = ("A", "dA", "R", "V")
#: How the metrics are printed in Markdown and LaTeX (CSV headers use the keys).
METRIC_LABELS: dict[str, str] = {"dA": "ΔA"}
FORMATS: tuple[str, ...] = ("markdown", "latex", "csv")
PAPER_CSV = "table2_paper.csv"

#: (paper method, dataset label, γ rounded to 6 decimals) → {"A": ..., "R": ..., "V": ...}, None where blank.
PaperTable = Mapping[tuple[str, str, float], Mapping[str, float | None]]


def _gamma_key(gamma: float) -> float:
    return round(float(gamma), 6)


def load_paper_table(path: str | Path | None = None) -> dict[tuple[str, str, float], dict[str, float | None]]:
    """The paper's Table 2 (columns ``method,dataset,gamma,A,R,V``; an empty cell is None). Default: the copy of
    ``table2_paper.csv`` shipped in the package."""
    if path is None:
        text = resources.files("spmc.report").joinpath(PAPER_CSV).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    table: dict[tuple[str, str, float], dict[str, float | None]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        key = (row["method"].strip(), row["dataset"].strip(), _gamma_key(float(row["gamma"])))
        table[key] = {m: (float(row[m]) if row[m].strip() else None) for m in METRICS}
    return table


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for a single value) of one metric over the runs that have it;
    ``n`` counts those runs. A missing value (None or NaN: a run that stored null) is left out; with no value at
    all the mean is None (a blank cell)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        if not values:
            raise ValueError("no values to summarise")
        present = [float(v) for v in values if v is not None and not math.isnan(v)]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(statistics.fmean(present), std, len(present))


@dataclass(frozen=True)
class Cell:
    """One (row, dataset, γ) entry: A, R, V over the runs, their seeds, and the paper's values if compared."""

    stats: Mapping[str, Stat]
    seeds: tuple[int, ...]
    runs: tuple[Path, ...]
    paper: Mapping[str, float | None] | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    def paper_value(self, metric: str) -> float | None:
        return None if self.paper is None else self.paper.get(metric)

    def diff(self, metric: str) -> float | None:
        """Ours − paper for ``metric``, None where the paper gives no value."""
        p, ours = self.paper_value(metric), self.stats[metric].mean
        return None if p is None or ours is None else ours - p


@dataclass
class Row:
    """One row: a defense with a client procedure and, where needed, the options that tell its variants apart."""

    defense: str
    client: str
    variant: tuple[tuple[str, str], ...] = ()
    cells: dict[tuple[float, str], Cell] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return method_label(self.defense, self.client) + variant_suffix(self.variant)

    @property
    def paper_method(self) -> str | None:
        """The paper's method string for this row, or None (defense not in the paper, or an ablation)."""
        if self.defense in PAPER_DEFENSES and self.client == natural_client(self.defense):
            return defense_label(self.defense)
        return None

    def sort_key(self) -> tuple[tuple[int, str], int, tuple[tuple[str, str], ...]]:
        return (defense_order(self.defense), int(self.client != natural_client(self.defense)), self.variant)


@dataclass
class ResultsTable:
    """Table 2's layout: ``rows`` in the paper's order, ``datasets`` (labels) in its column order, ``gammas``;
    ``metrics`` per dataset (:data:`METRICS`, or :data:`METRICS_WITH_DELTA` with an untargeted run), and
    ``unmatched``: the untargeted runs whose run without attack was not given (their ΔA is blank)."""

    gammas: list[float]
    datasets: list[str]
    rows: list[Row]
    with_paper: bool = False
    last_k: list[int] = field(default_factory=list)
    metrics: tuple[str, ...] = METRICS
    unmatched: tuple[Path, ...] = ()

    def rows_at(self, gamma: float) -> list[Row]:
        """The rows with at least one value in the block of ``gamma``."""
        g = _gamma_key(gamma)
        return [r for r in self.rows if any(k[0] == g for k in r.cells)]

    def cell(self, row: Row, gamma: float, dataset: str) -> Cell | None:
        return row.cells.get((_gamma_key(gamma), dataset))

    def seed_counts(self) -> list[int]:
        return sorted({c.n for r in self.rows for c in r.cells.values()})


def _warn_mixed_settings(runs: Sequence[RunDir], vkeys: Mapping[tuple[str, str], Sequence[str]]) -> None:
    """Log the options that differ between the rows of one block (a comparison on unequal settings)."""
    blocks: dict[tuple[str, float], list[RunDir]] = defaultdict(list)
    for r in runs:
        blocks[(dataset_label(r.dataset), _gamma_key(r.gamma))].append(r)
    row_keys = {k for ks in vkeys.values() for k in ks}
    for (dataset, gamma), members in blocks.items():
        opts = [m.options() for m in members]
        differ = sorted(
            k
            for k in set().union(*opts)
            if k not in row_keys and len({json.dumps(o.get(k), sort_keys=True) for o in opts}) > 1
        )
        if differ:
            log.warning("%s, γ = %g: the compared runs differ in %s", dataset, gamma, ", ".join(differ))


def build_table(runs: Sequence[RunDir], paper: PaperTable | None = None) -> ResultsTable:
    """Group ``runs`` into Table 2's cells and summarise each (mean ± sample std over runs); with ``paper``, attach
    the paper's values to the rows the paper has (the defense with its own client procedure)."""
    if not runs:
        raise ValueError("no runs to tabulate")
    vkeys = variant_keys(runs)
    _warn_mixed_settings(runs, vkeys)
    delta, unmatched = _delta_accuracy(runs)
    metrics = METRICS_WITH_DELTA if delta or unmatched else METRICS
    groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], dict[tuple[float, str], list[RunDir]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in runs:
        variant = variant_of(r, vkeys.get((r.defense, r.client), ()))
        groups[(r.defense, r.client, variant)][(_gamma_key(r.gamma), dataset_label(r.dataset))].append(r)
    rows: list[Row] = []
    for (defense, client, variant), cells in groups.items():
        row = Row(defense, client, variant)
        for (gamma, dataset), members in cells.items():
            seeds = tuple(m.seed for m in members)
            if len(set(seeds)) < len(seeds):
                log.warning(
                    "%s on %s, γ = %g: several runs with the same seed, all counted: %s",
                    row.label,
                    dataset,
                    gamma,
                    ", ".join(str(m.path) for m in members),
                )
            if len({(m.summary or {}).get("rounds") for m in members}) > 1:
                log.warning("%s on %s, γ = %g: runs of different lengths averaged", row.label, dataset, gamma)
            stats = {m: Stat.of([_run_value(run, m, delta) for run in members]) for m in metrics}
            lacking = [str(run.path) for run in members if any(math.isnan(run.metric(m)) for m in _reported(run))]
            if lacking:
                log.warning("%s on %s, γ = %g: no value (null) in %s", row.label, dataset, gamma, ", ".join(lacking))
            paper_values = None
            if paper is not None and row.paper_method is not None:
                paper_values = paper.get((row.paper_method, dataset, gamma))
            row.cells[(gamma, dataset)] = Cell(stats, seeds, tuple(m.path for m in members), paper_values)
        rows.append(row)
    rows.sort(key=Row.sort_key)
    datasets = sorted({d for r in rows for (_, d) in r.cells}, key=dataset_order)
    gammas = sorted({g for r in rows for (g, _) in r.cells})
    last_k = sorted({int(r.summary["last_k"]) for r in runs if r.summary is not None and "last_k" in r.summary})
    return ResultsTable(gammas, datasets, rows, paper is not None, last_k, metrics, tuple(r.path for r in unmatched))


def _reported(run: RunDir) -> tuple[str, ...]:
    """The summary metrics a run has by its attack kind: A only for an untargeted attack, else A, R and V."""
    return ("A",) if run.attack_kind == "untargeted" else METRICS


def _run_value(run: RunDir, metric: str, delta: Mapping[Path, float]) -> float | None:
    """One run's value of ``metric``: ΔA from ``delta`` (None for a run that has none), else from the summary."""
    if metric == "dA":
        return delta.get(run.path)
    return run.metric(metric)


def _delta_accuracy(runs: Sequence[RunDir]) -> tuple[dict[Path, float], list[RunDir]]:
    """ΔA = A − A(no attack, same seed) of each untargeted run whose run without attack is among ``runs``, and
    the untargeted runs whose is not (logged)."""
    delta: dict[Path, float] = {}
    unmatched: list[RunDir] = []
    for r in runs:
        if r.attack_kind != "untargeted":
            continue
        ref = no_attack_match(r, runs)
        if ref is None:
            unmatched.append(r)
            log.warning("%s: no run without attack with the same settings and seed given; ΔA left blank", r.path)
        else:
            delta[r.path] = r.metric("A") - ref.metric("A")
    return delta, unmatched


# ----------------------------------------------------------------------------------------------------- rendering


def _num(x: float | None, sign: bool = False) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _stat_text(s: Stat, pm: str = " ± ") -> str:
    if s.mean is None:
        return ""
    return _num(s.mean) + (f"{pm}{_num(s.std)}" if s.std is not None else "")


def _cell_texts(table: ResultsTable, cell: Cell | None, metric: str, pm: str = " ± ") -> list[str]:
    """The texts of one metric of one cell: [ours] or [ours, paper, Δ]."""
    if cell is None:
        return ["", "", ""] if table.with_paper else [""]
    ours = _stat_text(cell.stats[metric], pm)
    if not table.with_paper:
        return [ours]
    return [ours, _num(cell.paper_value(metric)), _num(cell.diff(metric), sign=True)]


def _head(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _footnote(table: ResultsTable) -> str:
    counts = table.seed_counts()
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    k = "/".join(map(str, table.last_k)) + " " if table.last_k else ""
    text = (
        f"A: clean accuracy, R = 100 − ASR, V = (A + R)/2, in %, over the last {k}rounds of each run; mean ± sample "
        f"standard deviation over runs with different seeds (runs per cell: {n}; ± omitted for a single run)."
    )
    if "dA" in table.metrics:
        text += " Untargeted attacks: R and V blank; ΔA = A − A of the same setting without attack (same seed)."
    if table.unmatched:
        text += (
            f" ΔA blank for {len(table.unmatched)} run(s) whose run without attack (same settings and seed) was not "
            f"given: {', '.join(str(p) for p in table.unmatched)}."
        )
    if table.with_paper:
        text += " paper: Table 2 of He et al. (ICML 2025); Δ = ours − paper; blank where the paper has no value."
    return text


def render_markdown(table: ResultsTable) -> str:
    """One Markdown table per γ, then a footnote."""
    header = ["method"]
    for d in table.datasets:
        for m in table.metrics:
            header += [f"{d} {_head(m)}", "paper", "Δ"] if table.with_paper else [f"{d} {_head(m)}"]
    lines: list[str] = []
    for g in table.gammas:
        lines += [f"**γ = {g:g}**", "", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for row in table.rows_at(g):
            cells = [row.label.replace("|", "\\|")]
            for d in table.datasets:
                for m in table.metrics:
                    cells += _cell_texts(table, table.cell(row, g, d), m)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(_footnote(table))
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "γ": r"$\gamma$",
    "−": "--",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (``_`` → ``\\_``, ...) and write γ, ±, Δ in math mode."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def render_latex(table: ResultsTable) -> str:
    """A booktabs ``tabular``: dataset groups over (A, R, V) (each with paper and Δ when compared), one block per γ
    separated by a ``\\midrule`` and a γ line."""
    per_metric = 3 if table.with_paper else 1
    per_dataset = per_metric * len(table.metrics)
    ncols = 1 + per_dataset * len(table.datasets)
    lines = [r"\begin{tabular}{l" + "r" * (ncols - 1) + "}", r"\toprule"]
    groups = [rf"\multicolumn{{{per_dataset}}}{{c}}{{{latex_escape(d)}}}" for d in table.datasets]
    lines.append("Method & " + " & ".join(groups) + r" \\")
    rules = [rf"\cmidrule(lr){{{2 + i * per_dataset}-{1 + (i + 1) * per_dataset}}}" for i in range(len(table.datasets))]
    lines.append(" ".join(rules))
    if table.with_paper:
        heads = [latex_escape(_head(m)) for m in table.metrics]
        metric_heads = [rf"\multicolumn{{3}}{{c}}{{{h}}}" for _ in table.datasets for h in heads]
        lines.append(" & " + " & ".join(metric_heads) + r" \\")
        ours = ["ours", "paper", r"$\Delta$"] * len(table.metrics) * len(table.datasets)
        lines.append(" & " + " & ".join(ours) + r" \\")
    else:
        heads = [latex_escape(_head(m)) for m in table.metrics]
        lines.append(" & " + " & ".join(heads * len(table.datasets)) + r" \\")
    for g in table.gammas:
        lines += [r"\midrule", rf"\multicolumn{{{ncols}}}{{l}}{{$\gamma = {g:g}$}} \\", r"\midrule"]
        for row in table.rows_at(g):
            cells = [latex_escape(row.label)]
            for d in table.datasets:
                for m in table.metrics:
                    cells += _cell_texts(table, table.cell(row, g, d), m, pm=r" $\pm$ ")
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + latex_escape(_footnote(table))]
    return "\n".join(lines) + "\n"


def _csv_num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 6))


def render_csv(table: ResultsTable) -> str:
    """Long format, one line per (method, dataset, γ), starting with the columns of ``table2_paper.csv``:
    ``method,dataset,gamma,A,R,V,A_std,R_std,V_std,n,seeds,defense,client,variant`` and, with the paper,
    ``A_paper,R_paper,V_paper,A_diff,R_diff,V_diff`` (with an untargeted run, ``dA`` after each ``A``). Full
    precision (6 decimals); empty where undefined."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metrics = table.metrics
    header = ["method", "dataset", "gamma", *metrics, *(f"{m}_std" for m in metrics)]
    header += ["n", "seeds", "defense", "client", "variant"]
    if table.with_paper:
        header += [f"{m}_paper" for m in metrics] + [f"{m}_diff" for m in metrics]
    writer.writerow(header)
    for g in table.gammas:
        for row in table.rows_at(g):
            for d in table.datasets:
                cell = table.cell(row, g, d)
                if cell is None:
                    continue
                line = [row.label, d, f"{g:g}"]
                line += [_csv_num(cell.stats[m].mean) for m in metrics]
                line += [_csv_num(cell.stats[m].std) for m in metrics]
                line += [str(cell.n), " ".join(map(str, cell.seeds)), row.defense, row.client]
                line.append("; ".join(f"{k}={v}" for k, v in row.variant))
                if table.with_paper:
                    line += [_csv_num(cell.paper_value(m)) for m in metrics]
                    line += [_csv_num(cell.diff(m)) for m in metrics]
                writer.writerow(line)
    return out.getvalue()


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "csv": render_csv}


def render_table(table: ResultsTable, fmt: str = "markdown") -> str:
    """Render in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in RENDERERS:
        raise ConfigError(f"format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    return RENDERERS[fmt](table)
