"""Figure 6 of the paper: clean accuracy A_t and R_t = 100 − ASR_t per communication round, one line per run.

A run under an untargeted attack (ATTACKS.md §A1) has no trigger, hence no R: it is drawn in the A and loss panels
only (:data:`R_PANELS` are left without its line).

Drawn with matplotlib's Agg canvas on a bare ``Figure`` (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from spmc.config import ConfigError
from spmc.report.runs import RunDir, dataset_label, distinct_labels

log = logging.getLogger(__name__)


def _value(key: str, transform: Callable[[float], float] = lambda v: v) -> Callable[[dict[str, Any]], float]:
    def get(record: dict[str, Any]) -> float:
        v = record.get(key)
        return math.nan if v is None else transform(float(v))

    return get


#: Panel name → (y-axis label, value of one metrics record).
PANELS: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "accuracy": ("A: clean accuracy (%)", _value("accuracy")),
    "asr": ("R = 100 − ASR (%)", _value("asr", lambda v: 100.0 - v)),
    "asr_all": ("R = 100 − ASR, all test images (%)", _value("asr_all", lambda v: 100.0 - v)),
    "asr_excl_target": ("R = 100 − ASR, target class excluded (%)", _value("asr_excl_target", lambda v: 100.0 - v)),
    "train_loss": ("mean training loss", _value("train_loss")),
}
#: Panels of R = 100 − ASR, which an untargeted run does not have.
R_PANELS: frozenset[str] = frozenset({"asr", "asr_all", "asr_excl_target"})
LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")


def parse_panels(text: str | Sequence[str]) -> list[str]:
    """``"accuracy,asr"`` → ``["accuracy", "asr"]``, checked against :data:`PANELS`."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if n not in PANELS]
    if bad or not names:
        raise ConfigError(f"metric: got {text!r}; allowed (comma-separated): {', '.join(PANELS)}")
    return names


def run_curve(records: Sequence[dict[str, Any]], panel: str) -> tuple[list[int], list[float]]:
    """(communication rounds counted from 1, values) of one panel for one run's records."""
    get = PANELS[panel][1]
    return [int(r["round"]) + 1 for r in records], [get(r) for r in records]


def plot_curves(
    runs: Sequence[RunDir], panels: Sequence[str] = ("accuracy", "asr"), title: str | None = None
) -> Figure:
    """One panel per metric side by side, one line per run. Runs with the same method label share a colour and
    differ in line style; labels say what else tells them apart (dataset, γ, options, seed)."""
    if not runs:
        raise ValueError("no runs to plot")
    labels = distinct_labels(runs)
    colours: dict[str, str] = {}
    styles: dict[str, int] = {}
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    records = [r.metrics() for r in runs]
    for run, recs, label in zip(runs, records, labels):
        if not recs:
            log.warning("%s: no rounds recorded yet, not plotted", run.path)
            continue
        colour = colours.setdefault(run.label, f"C{len(colours) % 10}")
        style = LINESTYLES[styles.get(run.label, 0) % len(LINESTYLES)]
        styles[run.label] = styles.get(run.label, 0) + 1
        untargeted = run.attack_kind == "untargeted"
        for ax, panel in zip(axes, panels):
            if untargeted and panel in R_PANELS:
                continue
            x, y = run_curve(recs, panel)
            ax.plot(x, y, color=colour, linestyle=style, linewidth=1.5, label=label)
    for ax, panel in zip(axes, panels):
        ax.set_xlabel("communication round")
        ax.set_ylabel(PANELS[panel][0])
        ax.grid(alpha=0.3)
        if panel != "train_loss":
            ax.set_ylim(-2, 102)
    handles: list[Any] = []
    texts: list[str] = []
    for ax in axes:  # every run once, whichever panel it is drawn in
        for handle, text in zip(*ax.get_legend_handles_labels()):
            if text not in texts:
                handles.append(handle)
                texts.append(text)
    if handles:
        fitting_legend(fig, handles, texts)
    if title is None:
        datasets = {dataset_label(r.dataset) for r in runs}
        gammas = {r.gamma for r in runs}
        if len(datasets) == 1 and len(gammas) == 1:
            title = f"{datasets.pop()}, γ = {gammas.pop():g}"
    if title:
        fig.suptitle(title)
    return fig


def fitting_legend(fig: Figure, handles: Sequence[Any], texts: Sequence[str]) -> Legend:
    """The figure's legend below the panels in the most columns (at most 3) whose width fits the figure's, so that
    long labels (runs told apart by several options) are never cut off; when not even one column fits, one column
    and the figure widened to it."""
    for ncols in range(min(3, len(handles)), 0, -1):
        legend = fig.legend(handles, texts, loc="outside lower center", ncols=ncols, fontsize="small")
        width = legend.get_window_extent().width
        if width <= fig.bbox.width:
            return legend
        if ncols == 1:
            fig.set_figwidth(1.02 * width / fig.dpi)
            return legend
        legend.remove()
    raise ValueError("no legend entries")


def save_figure(fig: Figure, prefix: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``PREFIX.<format>`` for each format (parent folders created; a ``.png``, ``.svg`` or ``.pdf``
    suffix on ``prefix`` is dropped); returns the paths."""
    prefix = Path(prefix)
    if prefix.suffix.lstrip(".").lower() in {"png", "svg", "pdf"}:
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = prefix.with_name(f"{prefix.name}.{fmt}")
        fig.savefig(path, dpi=dpi, format=fmt)
        paths.append(path)
    return paths
