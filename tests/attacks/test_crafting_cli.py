"""The update attacks of ATTACKS.md §A4 through the command line: ``spmc run --set update_attack=... --set
<option>=...`` runs one round with the option in config.json, a bad option value is refused in one line before the
run directory exists, and the options are sweep axes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmc.attacks import ATTACKS
from spmc.cli import main
from spmc.config import make_experiment
from spmc.sweep import expand_grid

TINY = ["--preset", "smoke", "--rounds", "1", "-q", "--set", "attack=none", "--set", "kernel=torch"]
TINY += ["--set", "synthetic_train_size=400", "--set", "synthetic_test_size=20", "--set", "batch_size=32"]

ATTACK_OPTIONS = [
    ("scaling", "scale_factor", 2.5),
    ("lie", "lie_z", 1.5),
    ("min_max", "perturbation", "std"),
    ("min_sum", "perturbation", "sign"),
    ("ipm", "ipm_eps", 100.0),
    ("sign_flip", None, None),
    ("gaussian", "gaussian_std", 0.5),
]


@pytest.mark.parametrize(("attack", "key", "value"), ATTACK_OPTIONS)
def test_every_update_attack_runs_one_round_through_the_cli(
    tmp_path: Path, attack: str, key: str | None, value: object
) -> None:
    out = tmp_path / "run"
    extra = [] if key is None else ["--set", f"{key}={value}"]
    assert main(["run", *TINY, "--set", f"update_attack={attack}", *extra, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["update_attack"] == attack and config["attack"] == "none"
    if key is not None:
        assert config[key] == value
    summary = json.loads((out / "summary.json").read_text())
    assert summary["malicious_ids"] == [3] and summary["rejected_updates"] == 0


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("scale_factor=-1", "scale_factor"),
        ("lie_z=inf", "lie_z"),
        ("perturbation=cube", "perturbation"),
        ("minmax_lambda_init=0", "minmax_lambda_init"),
        ("minmax_tol=-1e-5", "minmax_tol"),
        ("ipm_eps=0", "ipm_eps"),
        ("gaussian_std=-0.5", "gaussian_std"),
    ],
)
def test_bad_option_values_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, key: str
) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "--set", "update_attack=scaling", "--set", setting, "--out", str(out)]) == 2
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if key in line]
    assert lines, printed
    assert not out.exists()


def test_update_attack_options_are_sweep_axes() -> None:
    spec = {
        "base": {"preset": "smoke", "attack": "none"},
        "grid": {"update_attack": ["min_max", "min_sum"], "perturbation": ["unit", "sign"], "minmax_tol": [1e-4]},
    }
    runs = expand_grid(spec)
    assert len(runs) == 4
    assert {(r.options["update_attack"], r.options["perturbation"]) for r in runs} == {
        ("min_max", "unit"),
        ("min_max", "sign"),
        ("min_sum", "unit"),
        ("min_sum", "sign"),
    }
    assert all(r.options["minmax_tol"] == 1e-4 for r in runs)


def test_the_update_attacks_are_registered_untargeted_crafting_attacks() -> None:
    for name, _, _ in ATTACK_OPTIONS:
        cls = ATTACKS[name]
        assert cls.name == name and cls.hooks == {"crafting"} and not cls.targeted, name
        cfg = make_experiment(attack="none", update_attack=name, num_clients=10, gamma=0.3)
        assert cfg.malicious_ids == (7, 8, 9)
