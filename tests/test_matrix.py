"""The robustness matrix (spmc.matrix, ``spmc matrix``): rows, the report's numbers and states, end to end."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import ClassVar

import pytest

from spmc import cli, matrix
from spmc.attacks import ATTACKS, Attack
from spmc.config import ConfigError


class _Byz(Attack):
    name: ClassVar[str] = "byz"
    hooks: ClassVar[frozenset[str]] = frozenset({"crafting"})  # type: ignore[assignment]


class _Boost(Attack):
    name: ClassVar[str] = "boost"
    hooks: ClassVar[frozenset[str]] = frozenset({"crafting"})  # type: ignore[assignment]
    carries_backdoor: ClassVar[bool] = True


def test_attack_rows_pair_each_kind_of_attack_as_documented() -> None:
    registry = {**ATTACKS, "byz": _Byz, "boost": _Boost}
    rows = matrix.attack_rows(["badnets", "byz", "boost", "none"], registry)
    assert [(r.label, r.options) for r in rows] == [
        ("none", {"attack": "none", "update_attack": "none"}),
        ("badnets", {"attack": "badnets", "update_attack": "none"}),
        ("byz", {"attack": "none", "update_attack": "byz"}),
        ("badnets+boost", {"attack": "badnets", "update_attack": "boost"}),
    ]
    with pytest.raises(ConfigError, match="attack 'nope' is not registered"):
        matrix.attack_rows(["nope"], registry)
    assert matrix.all_attack_names({"none": Attack, "badnets": _Boost, "base": _Boost}) == ["none", "badnets"]


def _cell(d: str, a: str, seed: int, kind: str, A: float | None, R: float | None, status: str = "done") -> matrix.Cell:
    return matrix.Cell(d, a, seed, Path(f"{d}_{a}_{seed}"), status, kind, A, R)  # type: ignore[arg-type]


def test_summary_worst_case_and_ranking_by_hand() -> None:
    cells = [
        _cell("fedavg", "none", 0, "none", 80.0, None),
        _cell("fedavg", "badnets", 0, "backdoor", 79.0, 10.0),
        _cell("fedavg", "badnets", 1, "backdoor", 81.0, 30.0),
        _cell("fedavg", "lie", 0, "untargeted", 60.0, None),
        _cell("spmc", "none", 0, "none", 70.0, None),
        _cell("spmc", "badnets", 0, "backdoor", 68.0, 50.0),
        _cell("spmc", "badnets", 1, "backdoor", None, None, status="running"),
        _cell("spmc", "lie", 0, "untargeted", None, None, status="failed"),
    ]
    cells[3].dA = 60.0 - 80.0
    cells[0].seconds, cells[1].seconds = 30.0, 5370.0
    summary = matrix.summarise(cells)
    assert (summary.done, summary.total, summary.run_seconds) == (6, 8, 5400.0)
    assert summary.values[("fedavg", "badnets")]["R"] == (20.0, pytest.approx(14.1421, abs=1e-4))
    assert summary.values[("fedavg", "badnets")]["A"] == (80.0, pytest.approx(1.4142, abs=1e-4))
    assert summary.states == {("spmc", "badnets"): "running", ("spmc", "lie"): "failed"}
    worst = matrix.worst_cases(summary)
    assert worst["fedavg"] == {
        "min_R": 20.0, "min_R_attack": "badnets", "min_A": 60.0, "min_A_attack": "lie", "unfinished": 0,
    }  # fmt: skip
    assert worst["spmc"]["min_R"] is None and worst["spmc"]["min_A"] == 70.0 and worst["spmc"]["unfinished"] == 2
    assert matrix.ranking(worst) == ["fedavg", "spmc"]  # a defense with no finished backdoor cell ranks last
    md = matrix.to_markdown(summary)
    assert "| badnets | 20.0 ± 14.1 | running |" in md
    assert "| lie | 60.0 (ΔA -20.0) | failed |" in md
    assert "| 1 | fedavg | 20.0 | badnets | 60.0 | lie | 0 |" in md
    assert md.startswith("6 of 8 runs finished; their rounds took 1.50 h in all")
    rows = list(csv.DictReader(io.StringIO(matrix.to_csv(cells))))
    assert rows[3]["dA"] == "-20.00" and rows[3]["R"] == "" and rows[6]["status"] == "running"
    assert [r["seconds"] for r in rows[:3]] == ["30.0", "5370.0", ""]


def test_an_unfinished_backdoor_row_is_listed_in_the_r_table_as_unfinished(tmp_path: Path) -> None:
    cols = matrix.defense_columns(["fedavg"])
    rows = matrix.attack_rows(["none", "badnets", "sign_flip"], ATTACKS)
    spec = matrix.matrix_spec(cols, rows, [0], {"preset": "smoke"}, tmp_path)
    cells = matrix.collect(spec, tmp_path)
    assert [(c.attack, c.kind, c.status) for c in cells] == [
        ("none", "none", "pending"),
        ("badnets", "backdoor", "pending"),
        ("sign_flip", "untargeted", "pending"),
    ]
    md = matrix.to_markdown(matrix.summarise(cells))
    r_table = md.split("## A, clean accuracy")[0]
    assert "| badnets | pending |" in r_table and "sign_flip" not in r_table


def test_a_cell_a_sweep_saw_fail_is_failed_with_its_error(tmp_path: Path) -> None:
    """A cell resumed with `spmc sweep DIR/matrix.toml` that failed has no entry in matrix-status.json; its
    error.txt says it failed and why. A FIFO in its place is not opened (it would block) and reads as no record."""
    spec = matrix.matrix_spec(
        matrix.defense_columns(["fedavg"]),
        matrix.attack_rows(["none", "badnets"], ATTACKS),
        [0],
        {"preset": "smoke"},
        tmp_path,
    )
    none_cell, badnets_cell = (c.run_dir for c in matrix.collect(spec, tmp_path))
    badnets_cell.mkdir(parents=True)
    (badnets_cell / "error.txt").write_text("resume: checkpoint.pt: not a readable checkpoint\nmore\n")
    none_cell.mkdir(parents=True)
    os.mkfifo(none_cell / "error.txt")
    cells = matrix.collect(spec, tmp_path)
    assert [(c.status, c.error) for c in cells] == [
        ("pending", ""),
        ("failed", "resume: checkpoint.pt: not a readable checkpoint"),
    ]


def test_a_matrix_folder_of_other_base_options_is_refused(tmp_path: Path) -> None:
    cols, rows = matrix.defense_columns(["fedavg"]), matrix.attack_rows(["none"], ATTACKS)
    matrix.save_spec(matrix.matrix_spec(cols, rows, [0], {"preset": "smoke", "gamma": 0.3}, tmp_path), tmp_path)
    more = matrix.matrix_spec(matrix.defense_columns(["fedavg", "median"]), rows, [0, 1], {"preset": "smoke",
                              "gamma": 0.3}, tmp_path)  # fmt: skip
    matrix.save_spec(more, tmp_path)  # more cells of the same setting: fine
    other = matrix.matrix_spec(cols, rows, [0], {"preset": "smoke", "gamma": 0.25}, tmp_path)
    with pytest.raises(ConfigError, match="holds a matrix of other base options"):
        matrix.save_spec(other, tmp_path)


def test_matrix_end_to_end_on_a_tiny_grid(tmp_path: Path) -> None:
    """2 defenses × 3 attack rows on the synthetic set: every cell runs, the CSV, the tables, the heat maps and
    the worst cases are written; rerunning skips every cell; a report-only rebuild gives the same files."""
    out = tmp_path / "m"
    argv = ["matrix", "--preset", "smoke", "--defenses", "fedavg", "median", "--attacks", "none", "badnets",
            "semantic", "--set", "rounds=1", "--out", str(out), "--jobs", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = list(csv.DictReader((out / "matrix.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    assert {(r["defense"], r["attack"]) for r in rows} == {
        (d, a) for d in ("fedavg", "median") for a in ("none", "badnets", "semantic")
    }
    for r in rows:
        assert 0.0 <= float(r["A"]) <= 100.0
        assert (r["R"] == "") == (r["attack"] == "none")
        assert float(r["seconds"]) > 0.0
    md = (out / "matrix.md").read_text()
    assert "## Worst case per defense" in md and "| fedavg |" in md
    for name in ("matrix_R.png", "matrix_R.svg", "matrix_A.png", "matrix_A.svg", "matrix.toml"):
        assert (out / name).stat().st_size > 0
    first = (out / "matrix.csv").read_text()
    assert cli.main(["matrix", "--out", str(out), "--report-only"]) == 0
    assert (out / "matrix.csv").read_text() == first
