"""spmc sweep: grid expansion, skipping finished runs, resuming interrupted ones, parallel jobs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spmc.cli import main
from spmc.config import ConfigError
from spmc.sweep import expand_grid, load_grid, run_sweep

GRID = """
jobs = 2
[base]
dataset = "synthetic"
synthetic_train_size = 400
synthetic_test_size = 50
num_clients = 3
rounds = 2
baseline_local_epochs = 1
spmc_local_epochs = 1
device = "cpu"
[grid]
method = [{ defense = "fedavg" }, { defense = "spmc", client = "spmc" }]
seed = [0, 1]
"""


def test_expand_grid_names_and_options() -> None:
    spec = {"base": {"rounds": 3}, "grid": {"method": [{"defense": "dnc"}, {"defense": "spmc", "client": "spmc"}],
                                            "gamma": [0.2, 0.3]}}  # fmt: skip
    runs = expand_grid(spec)
    assert [r.name for r in runs] == ["dnc_gamma0.2", "dnc_gamma0.3", "spmc-spmc_gamma0.2", "spmc-spmc_gamma0.3"]
    assert runs[3].options == {"rounds": 3, "defense": "spmc", "client": "spmc", "gamma": 0.3}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"grid": {"gamma": [1.5]}}, "gamma"),
        ({"grid": {"defense": []}}, "non-empty list"),
        ({"grid": {"seed": [0]}, "bogus": 1}, "unknown top-level"),
        ({"grid": {"a": [{"seed": 0}], "b": [{"seed": 0}]}}, None),
    ],
)
def test_bad_grids_are_refused_before_running(spec: dict, fragment: str | None) -> None:
    if fragment is None:
        assert len(expand_grid(spec)) == 1
        return
    with pytest.raises(ConfigError, match=fragment):
        expand_grid(spec)


def test_sweep_runs_skips_and_resumes(tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "runs"
    assert main(["sweep", str(grid), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fedavg_seed0", "fedavg_seed1", "spmc-spmc_seed0", "spmc-spmc_seed1"]
    config = json.loads((out / "spmc-spmc_seed1" / "config.json").read_text())
    assert (config["defense"], config["client"], config["seed"]) == ("spmc", "spmc", 1)
    outcomes = run_sweep(json.loads(json.dumps({"jobs": 2, **_toml(grid)})), out)
    assert {o.status for o in outcomes} == {"skipped"}
    # an interrupted run: checkpoint but no summary → resumed to the same result
    done = json.loads((out / "fedavg_seed0" / "summary.json").read_text())
    (out / "fedavg_seed0" / "summary.json").unlink()
    shutil.rmtree(out / "fedavg_seed1")
    statuses = {o.run.name: o.status for o in run_sweep(_toml(grid), out)}
    assert statuses["fedavg_seed0"] == "resumed" and statuses["fedavg_seed1"] == "done"
    assert json.loads((out / "fedavg_seed0" / "summary.json").read_text())["A"] == done["A"]


def _toml(path: Path) -> dict:
    from spmc.config import load_toml_file

    return load_toml_file(path)


EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_grids_are_valid(path: Path) -> None:
    """Every shipped grid loads and every point validates (as `spmc sweep` checks before starting)."""
    spec = load_grid(path)
    runs = expand_grid(spec)
    assert runs and spec.get("out")
