"""Configuration validation: bad values give errors naming the field, the value and what is allowed."""

from __future__ import annotations

import json
import logging
import math
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.cli import main
from spmc.config import PRESETS, ConfigError, Experiment, make_experiment, resolve


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
        ({"spmc_temperature": 0}, ["spmc_temperature", "got 0", "> 0"]),
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


# ------------------------------------------------------------------------------ issue 11 §3: validation up front


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"defense": "krum"}, ["defense = 'krum'", "krum_f", "n = 4", "f = 1", "f <= 0"]),
        ({"defense": "multikrum"}, ["defense = 'multikrum'", "krum_f", "n = 4"]),
        ({"defense": "multikrum", "krum_f": 0, "multikrum_select": 5}, ["multikrum_select", "got 5", "4"]),
        ({"defense": "bulyan"}, ["defense = 'bulyan'", "bulyan_f", "n >= 4f + 3", "f <= 0"]),
        ({"defense": "trimmed_mean", "trimmed_mean_k": 2}, ["trimmed_mean_k", "k = 2", "n = 4", "k <= 1"]),
        ({"defense": "dnc", "dnc_filter_frac": 5}, ["dnc_filter_frac", "r = ⌊c·⌊γ·n⌋⌋ = 5", "n = 4", "r < n"]),
        ({"defense": "dnc", "dnc_filter_frac": -1}, ["dnc_filter_frac", "-1"]),
        ({"min_client_size": 600}, ["min_client_size", "600", "1800", "min_client_size <= 450"]),
        (
            {"val_fraction": 0.999, "min_client_size": 0, "drop_last": False},
            ["num_clients", "val_fraction = 0.999", "num_clients <= 2"],
        ),
        ({"defense": "fltrust", "val_fraction": 0.0}, ["val_fraction", "0 samples", "batch_size = 64", "fltrust"]),
        ({"defense": "sageflow", "synthetic_train_size": 300}, ["val_fraction", "30 samples", "sageflow"]),
        ({"seed": 2**32}, ["seed", "4294967296", "4294967295"]),
        ({"threads": 10**20}, ["threads", "1024"]),
        ({"threads": 1e20}, ["threads", "integer"]),
        ({"synthetic_train_size": 10**12}, ["synthetic_train_size", "1000000"]),
        ({"dataset": "cifar10", "engine": "batched"}, ["'batched' supports SimpleCNN", "resnet10", "sequential"]),
        ({"model": "resnet10", "engine": "batched"}, ["engine", "resnet10"]),
    ],
)
def test_contradictions_are_refused_before_anything_runs(values: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve("smoke", None, **values)
    message = str(err.value)
    assert len(message.splitlines()) == 2, message  # the header and one line for the one problem
    for fragment in fragments:
        assert fragment in message


def test_defense_rules_count_the_sampled_clients() -> None:
    """At participation p a round hands the defense ⌈p·K⌉ clients: 5 of 10 cannot run Krum with f = m = 3."""
    assert make_experiment(defense="krum", num_clients=10, gamma=0.3).defense == "krum"
    with pytest.raises(ConfigError, match=r"n = 5 clients per round .* participation = 0.5"):
        make_experiment(defense="krum", num_clients=10, gamma=0.3, participation=0.5)
    assert make_experiment(defense="krum", num_clients=10, gamma=0.3, participation=0.5, krum_f=1).krum_f == 1


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 30), f=st.integers(0, 15))
def test_krum_is_accepted_exactly_when_n_exceeds_2f_plus_2(k: int, f: int) -> None:
    values = {"defense": "krum", "num_clients": k, "krum_f": f, "dataset": "synthetic", "min_client_size": 1,
              "drop_last": False}  # fmt: skip
    if k > 2 * f + 2:
        assert make_experiment(**values).krum_f == f
    else:
        with pytest.raises(ConfigError, match="krum_f"):
            make_experiment(**values)


def test_several_problems_give_one_line_each() -> None:
    with pytest.raises(ConfigError) as err:
        resolve("smoke", None, defense="bulyan", min_client_size=20_000, dataset="cifar10", engine="batched")
    lines = str(err.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "defense = 'bulyan'",
        "min_client_size, num_clients, val_fraction",
        "engine",
    ]


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: got 'cuda' but no CUDA device"):
        make_experiment(device="cuda")
    assert make_experiment(device="auto").device == "auto"


def test_limits_themselves_are_accepted() -> None:
    cfg = make_experiment(seed=2**32 - 1, threads=1024, lr=1, trigger_channels=[0, 2], min_client_size=540)
    assert (cfg.seed, cfg.threads, cfg.lr, cfg.trigger_channels) == (2**32 - 1, 1024, 1.0, (0, 2))
    assert make_experiment(defense="fltrust", val_fraction=64 / 6000).defense == "fltrust"


def _allows_none(annotation: object) -> bool:
    return type(None) in typing.get_args(annotation)


BAD_SCALARS = [None, True, False, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("field", sorted(Experiment.model_fields))
def test_every_option_refuses_null_bool_and_non_finite(field: str) -> None:
    annotation = Experiment.model_fields[field].annotation
    for bad in BAD_SCALARS:
        if (bad is None and _allows_none(annotation)) or (isinstance(bad, bool) and annotation is bool):
            continue
        with pytest.raises(ConfigError) as err:
            make_experiment(**{field: bad})
        assert f"{field}: got {bad!r}" in str(err.value)


def test_null_from_the_command_line_is_not_the_default() -> None:
    """``--set rounds=null`` reached resolve as None, which used to mean "not given" (the default)."""
    with pytest.raises(ConfigError, match="rounds: got None"):
        resolve(None, None, rounds=None)
    assert resolve(None, None, krum_f=None).krum_f is None


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_round_trips_through_json(preset: str) -> None:
    cfg = resolve(preset)
    assert Experiment(**json.loads(cfg.to_json())) == cfg
    assert make_experiment(**json.loads(cfg.to_json())) == cfg


def test_toml_keys_at_top_level_and_under_experiment_are_merged(tmp_path: Path) -> None:
    f = tmp_path / "exp.toml"
    f.write_text('rounds = 7\n[experiment]\ndefense = "spmc"\n')
    cfg = resolve(None, f)
    assert (cfg.rounds, cfg.defense) == (7, "spmc")
    f.write_text("rounds = 7\n[experiment]\nrounds = 3\n")
    with pytest.raises(ConfigError, match="rounds both at top level and under"):
        resolve(None, f)
    f.write_text("experiment = 3\n")
    with pytest.raises(ConfigError, match="experiment .* must be a table"):
        resolve(None, f)


def test_preset_may_come_from_the_overrides_or_the_file(tmp_path: Path) -> None:
    assert resolve(None, None, preset="smoke").dataset == "synthetic"
    assert resolve("paper-fmnist", None, preset="smoke").dataset == "synthetic"  # later wins
    f = tmp_path / "exp.toml"
    f.write_text('preset = "smoke"\nrounds = 1\n')
    assert (resolve(None, f).dataset, resolve(None, f).rounds) == ("synthetic", 1)
    with pytest.raises(ConfigError, match="preset: unknown value 3"):
        resolve(None, None, preset=3)
    with pytest.raises(ConfigError, match="file: unknown option"):
        resolve(None, None, file="x.toml")


def test_unknown_option_suggests_the_closest_and_the_list_command() -> None:
    with pytest.raises(ConfigError) as err:
        make_experiment(spmc_temprature=0.1)
    assert "did you mean 'spmc_temperature'?" in str(err.value)
    assert "spmc list --options" in str(err.value)
    assert "spmc run --help" not in str(err.value)


def test_gamma_giving_no_attackers_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spmc.config"):
        make_experiment(gamma=0.1, num_clients=4)
    assert "0 malicious clients" in caplog.text and "gamma = 0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spmc.config"):
        make_experiment(gamma=0.1, num_clients=4, attack="none")
        make_experiment(gamma=0.0, num_clients=4)
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--defense", "krum"], "krum_f"),
        (["--set", "seed=4294967296"], "seed"),
        (["--set", "rounds=null"], "rounds"),
        (["--set", "lr=true"], "lr"),
        (["--set", "preset=nope"], "preset"),
    ],
)
def test_cli_refuses_before_creating_the_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], field: str
) -> None:
    out = tmp_path / "run"
    assert main(["run", "-q", "--preset", "smoke", "--out", str(out), *args]) == 2
    printed = capsys.readouterr()
    assert field in printed.out + printed.err
    assert not out.exists()


@pytest.mark.parametrize(
    "field", sorted(f for f, info in Experiment.model_fields.items() if info.annotation in (int, int | None))
)
def test_every_integer_option_must_fit_a_c_int(field: str) -> None:
    if field == "seed":
        pytest.skip("seed has its own bound, numpy's 2**32 - 1")
    refused = rf"{field}: got {2**31}; (integers must be at most 2147483647|Input should be)"
    with pytest.raises(ConfigError, match=refused):
        make_experiment(**{field: 2**31})
