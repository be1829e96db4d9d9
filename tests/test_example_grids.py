"""Every grid file in examples/sweeps is one `spmc sweep` away from running: it loads, every point is a valid
experiment, and its results go under runs/ (ignored by git)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spmc.sweep import expand_grid, load_grid

GRIDS = sorted((Path(__file__).resolve().parents[1] / "examples" / "sweeps").glob("*.toml"))


def test_there_are_example_grids() -> None:
    assert len(GRIDS) >= 10


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_example_grid_expands_into_valid_runs(path: Path) -> None:
    spec = load_grid(path)
    runs = expand_grid(spec)
    assert runs
    assert str(spec["out"]).startswith("runs/")
    assert path.read_text(encoding="utf-8").startswith("#"), "a grid file starts with a comment: what it is for"
