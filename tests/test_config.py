"""Configuration validation: bad values give errors naming the field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from spmc.config import ConfigError, make_experiment, resolve


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"defense": "krumm"}, ["defense", "'krumm'", "fedavg", "spmc"]),
        ({"gamma": 1.0}, ["gamma", "1.0", "less than 1"]),
        ({"gamma": -0.1}, ["gamma", "-0.1", "greater than or equal to 0"]),
        ({"rounds": 0}, ["rounds", "0", "greater than 0"]),
        ({"rounds": -3}, ["rounds", "-3"]),
        ({"dataset": "imagenet"}, ["dataset", "'imagenet'", "fmnist"]),
        ({"data_dir": "/no/such/folder"}, ["data_dir", "/no/such/folder", "does not exist"]),
        ({"client": "fancy"}, ["client", "'fancy'", "plain", "spmc"]),
        ({"spmc_temperature": 0}, ["spmc_temperature", "greater than 0"]),
        ({"trigger_channels": [5]}, ["trigger_channels", "0, 1, 2"]),
        ({"no_such_option": 1}, ["no_such_option", "unknown option"]),
        ({"target_label": 12}, ["target_label", "12"]),
    ],
)
def test_bad_values_name_the_field(values: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        make_experiment(**values)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_defaults_are_the_paper_profile() -> None:
    cfg = make_experiment()
    assert (cfg.num_clients, cfg.rounds, cfg.beta, cfg.batch_size, cfg.lr, cfg.momentum) == (10, 50, 0.5, 64, 0.01, 0.9)
    assert (cfg.baseline_local_epochs, cfg.spmc_local_epochs, cfg.poison_rate, cfg.target_label) == (10, 10, 0.3, 2)
    assert cfg.malicious_ids == (7, 8, 9)
    assert make_experiment(gamma=0.2).malicious_ids == (8, 9)
    assert make_experiment(attack="none").malicious_ids == ()


def test_repo_profile_changes_plain_settings_but_explicit_values_win() -> None:
    assert make_experiment(profile="repo").baseline_local_epochs == 1
    assert not make_experiment(profile="repo").exclude_int_buffers
    assert make_experiment(profile="repo", baseline_local_epochs=3).baseline_local_epochs == 3


def test_presets_files_and_overrides(tmp_path: Path) -> None:
    cfg = resolve("paper-fmnist")
    assert cfg.dataset == "fmnist" and cfg.rounds == 50
    f = tmp_path / "exp.toml"
    f.write_text('[experiment]\ndefense = "spmc"\nrounds = 7\n')
    cfg = resolve("paper-fmnist", f, rounds=3)
    assert (cfg.dataset, cfg.defense, cfg.rounds) == ("fmnist", "spmc", 3)
    with pytest.raises(ConfigError, match="preset: unknown value 'nope'"):
        resolve("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(None, tmp_path / "missing.toml")
    f.write_text("rounds = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(None, f)
