"""The data attacks of ATTACKS.md §A3 (blended, dba, label_flip, a3fl) through the CLI, as sweep axes, and their
option keys refused with one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmc import cli, make_experiment
from spmc.config import ConfigError
from spmc.sweep import expand_grid

SETS = {
    "blended": ["blend_alpha=0.3", "blend_seed=4"],
    "dba": ["dba_parts=2"],
    "label_flip": [],
    "a3fl": ["a3fl_samples=32", "a3fl_trigger_epochs=1", "a3fl_adv_epochs=0"],
}


@pytest.mark.parametrize("attack", sorted(SETS))
def test_one_round_through_the_cli(attack: str, tmp_path: Path) -> None:
    sets = [f'attack="{attack}"', "rounds=1", 'device="cpu"', *SETS[attack]]
    argv = ["run", "--preset", "smoke", "--out", str(tmp_path / "run"), "-q"]
    assert cli.main([*argv, *(arg for s in sets for arg in ("--set", s))]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config = config.get("experiment", config)
    for s in SETS[attack]:
        key, value = s.split("=")
        assert config[key] == json.loads(value)


def test_options_as_sweep_axes() -> None:
    runs = expand_grid({"base": {"preset": "smoke", "attack": "blended"}, "grid": {"blend_alpha": [0.1, 0.5]}})
    assert [r.options["blend_alpha"] for r in runs] == [0.1, 0.5]
    runs = expand_grid({"base": {"preset": "smoke"}, "grid": {"attack": ["dba", "label_flip", "a3fl", "blended"]}})
    assert len({r.name for r in runs}) == 4


@pytest.mark.parametrize(
    ("key", "value"),
    [("blend_alpha", 0.0), ("blend_seed", -1), ("dba_parts", 3), ("a3fl_samples", 0), ("a3fl_trigger_lr", -1.0)],
)
def test_bad_values_are_refused_naming_the_key(key: str, value: float) -> None:
    with pytest.raises((ConfigError, ValueError), match=key):
        make_experiment(**{key: value})
