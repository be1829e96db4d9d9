"""Reports from run directories: Table 2 (:mod:`spmc.report.table`), the curves of Figure 6
(:mod:`spmc.report.curves`) and the Grad-CAM maps of Figure 7 (:mod:`spmc.report.gradcam`).

Only the table and the run readers are imported here; the two figure modules import matplotlib and are imported
on their own (``from spmc.report.curves import plot_curves``).
"""

from spmc.report.runs import (
    DATASET_LABELS,
    DEFENSE_LABELS,
    RunDir,
    dataset_label,
    distinct_labels,
    find_run_dirs,
    load_run_dir,
    load_runs,
    method_label,
)
from spmc.report.table import (
    FORMATS,
    Cell,
    ResultsTable,
    Row,
    Stat,
    build_table,
    load_paper_table,
    render_csv,
    render_latex,
    render_markdown,
    render_table,
)

__all__ = [
    "DATASET_LABELS",
    "DEFENSE_LABELS",
    "FORMATS",
    "Cell",
    "ResultsTable",
    "Row",
    "RunDir",
    "Stat",
    "build_table",
    "dataset_label",
    "distinct_labels",
    "find_run_dirs",
    "load_paper_table",
    "load_run_dir",
    "load_runs",
    "method_label",
    "render_csv",
    "render_latex",
    "render_markdown",
    "render_table",
]
