"""``pgd``, ``constrain_scale`` and ``neurotoxin`` through ``spmc run`` (``--set``), a sweep axis, and the refusal
of bad option values (one line naming the key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmc.cli import main
from spmc.sweep import expand_grid

TINY = ["rounds=1", "synthetic_train_size=200", "batch_size=16", "synthetic_test_size=50", "threads=1", "device=cpu"]


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in (*TINY, *pairs) for arg in ("--set", pair)]


@pytest.mark.parametrize(
    ("attack", "option", "value"),
    [("pgd", "pgd_eps", 0.01), ("constrain_scale", "cs_alpha", 0.5), ("neurotoxin", "neurotoxin_topk", 0.1)],
)
def test_one_round_through_the_cli(tmp_path: Path, attack: str, option: str, value: float) -> None:
    out = tmp_path / attack
    assert (
        main(["run", "-p", "smoke", *_sets(f"update_attack={attack}", f"{option}={value}"), "--out", str(out), "-q"])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["update_attack"], config[option]) == (attack, value)
    assert (out / "summary.json").is_file()


def test_a_sweep_axis_over_the_training_attacks(tmp_path: Path) -> None:
    """The three expand as a grid axis with their options; one of them (neurotoxin, stateful) runs through
    ``spmc sweep`` (a child process per run, hence one)."""
    axis = {"update_attack": ["pgd", "constrain_scale", "neurotoxin"], "pgd_eps": [0.05], "cs_alpha": [0.6]}
    runs = expand_grid({"base": {"preset": "smoke"}, "grid": axis})
    assert [(r.options["update_attack"], r.options["pgd_eps"]) for r in runs] == [
        ("pgd", 0.05), ("constrain_scale", 0.05), ("neurotoxin", 0.05)
    ]  # fmt: skip
    grid = tmp_path / "grid.toml"
    base = "\n".join(f"{k} = {v if v.isdigit() else json.dumps(v)}" for k, v in (p.split("=") for p in TINY))
    grid.write_text(
        f'jobs = 1\n[base]\npreset = "smoke"\n{base}\n[grid]\nupdate_attack = ["neurotoxin"]\nneurotoxin_topk = [0.2]\n'
    )
    out = tmp_path / "runs"
    assert main(["sweep", str(grid), "--out", str(out)]) == 0
    (run,) = (p for p in out.iterdir() if p.is_dir())
    config = json.loads((run / "config.json").read_text())
    assert (config["update_attack"], config["neurotoxin_topk"]) == ("neurotoxin", 0.2)
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("pgd_eps=-1", "pgd_eps: got -1"),
        ("cs_alpha=2", "cs_alpha: got 2"),
        ("scale_factor=0", "scale_factor: got 0"),
        ("neurotoxin_topk=1.5", "neurotoxin_topk: got 1.5"),
    ],
)
def test_bad_values_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pair: str, message: str
) -> None:
    assert main(["run", "-p", "smoke", "--set", "update_attack=pgd", "--set", pair, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
