"""spmc sweep: grid expansion, skipping finished runs, resuming interrupted ones, parallel jobs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spmc.cli import main
from spmc.config import ConfigError
from spmc.sweep import command_for, expand_grid, load_grid, run_dir_in, run_sweep

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


# ------------------------------------------------------------------------------ issue 11 §3: hostile grids

SMOKE_BASE = {"preset": "smoke", "device": "cpu"}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"base": 3}, "base must be a table"),
        ({"grid": [1, 2]}, "grid must be a table"),
        ({"base": SMOKE_BASE, "grid": {"defense": ["fedavg", "krum"]}}, "(?s)run 'defensekrum'.*krum_f"),
        ({"base": {"rounds": True}}, "rounds: got True"),
    ],
)
def test_hostile_grids_are_refused(spec: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        expand_grid(spec)


@pytest.mark.parametrize(
    ("spec", "jobs", "out", "fragment"),
    [
        ({"jobs": "two"}, None, "x", "jobs: got 'two'"),
        ({"jobs": 0}, None, "x", "jobs: got 0"),
        ({"jobs": True}, None, "x", "jobs: got True"),
        ({}, -3, "x", "--jobs: got -3; must be an integer >= 1"),
        ({}, 0, "x", "--jobs: got 0"),
        ({"out": 5}, None, None, "out must be a folder path .* got 5"),
        ({"out": ""}, None, None, "out must be a folder path"),
    ],
)
def test_jobs_and_out_are_checked_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: dict, jobs: int | None, out: str | None, fragment: str
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = {"base": SMOKE_BASE, "grid": {"seed": [0]}, **spec}
    with pytest.raises(ConfigError, match=fragment):
        run_sweep(spec, out, jobs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["..", ".", "", "../../etc", "/abs/path", ".hidden", "a/../../b", "\\..\\x"])
def test_run_names_never_leave_the_sweep_folder(tmp_path: Path, value: str) -> None:
    runs = expand_grid({"base": SMOKE_BASE, "grid": {"point": [{"name": value}]}})
    root = tmp_path / "sweep"
    (name,) = [r.name for r in runs]
    assert name not in ("", ".", "..") and not name.startswith(".") and "/" not in name
    assert (root / name).resolve().parent == root.resolve()
    assert run_dir_in(root, name).parent == root


def test_run_dir_in_refuses_traversal_and_links_out(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    root.mkdir()
    for bad in ("..", ".", "", "../x", "/etc"):
        with pytest.raises(ConfigError, match="not a folder name inside"):
            run_dir_in(root, bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="'link'"):
        run_dir_in(root, "link")


def test_long_run_names_are_shortened_and_stay_distinct() -> None:
    a, b = "x" * 300, "x" * 299 + "y"
    runs = expand_grid({"base": SMOKE_BASE, "grid": {"point": [{"name": a}, {"name": b}]}})
    assert len({r.name for r in runs}) == 2
    assert all(len(r.name) <= 200 for r in runs)


def test_preset_as_a_grid_axis(tmp_path: Path) -> None:
    runs = expand_grid({"base": {"rounds": 1}, "grid": {"preset": ["smoke", "demo"]}})
    assert [(r.name, r.options) for r in runs] == [
        ("presetsmoke", {"preset": "smoke", "rounds": 1}),
        ("presetdemo", {"preset": "demo", "rounds": 1}),
    ]
    cmd, action = command_for(runs[0], tmp_path / "presetsmoke", 0)
    assert action == "start" and cmd[cmd.index("--preset") + 1] == "smoke" and "preset=" not in " ".join(cmd)
    with pytest.raises(ConfigError, match="preset: unknown value 'nope'"):
        expand_grid({"grid": {"preset": ["nope"]}})


def test_cli_sweep_refuses_bad_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\npreset = "smoke"\n[grid]\nseed = [0]\n')
    assert main(["sweep", str(grid), "--out", str(tmp_path / "runs"), "--jobs", "-3"]) == 2
    printed = capsys.readouterr()
    assert "--jobs" in printed.out + printed.err
    assert not (tmp_path / "runs").exists()
