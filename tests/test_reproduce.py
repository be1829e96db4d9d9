"""Rerunning a run from its own ``config.json`` (``spmc run --config RUN/config.json``), and hostile files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmc import cli
from spmc.store import read_json_file, read_metrics_file

METRICS = ("accuracy", "asr", "asr_all", "asr_excl_target", "train_loss")


def _run(*argv: str) -> int:
    return cli.main(["run", "--quiet", *argv])


def test_a_rerun_from_config_json_gives_the_same_metrics(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert (
        _run("--preset", "smoke", "--defense", "spmc", "--client", "spmc", "--set", "seed=3", "--out", str(first)) == 0
    )
    assert _run("--config", str(first / "config.json"), "--out", str(second)) == 0
    assert read_json_file(second / "config.json") == read_json_file(first / "config.json")
    a, b = read_metrics_file(first / "metrics.jsonl"), read_metrics_file(second / "metrics.jsonl")
    assert [[r[k] for k in METRICS] for r in a] == [[r[k] for k in METRICS] for r in b]
    sa, sb = read_json_file(first / "summary.json"), read_json_file(second / "summary.json")
    assert (sa["A"], sa["R"], sa["defense"], sa["seed"]) == (sb["A"], sb["R"], "spmc", 3)


def test_flags_after_config_json_still_win(tmp_path: Path) -> None:
    assert _run("--preset", "smoke", "--out", str(tmp_path / "a")) == 0
    assert _run("--config", str(tmp_path / "a" / "config.json"), "--rounds", "1", "--out", str(tmp_path / "b")) == 0
    assert read_json_file(tmp_path / "b" / "config.json")["rounds"] == 1


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"seed = 1\n", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"[1, 2]", "must be a JSON object of options (a run's config.json); got a list"),
        (b'"fedavg"', "got a str"),
        (b'{"spmc_temprature": 0.5}', "'spmc_temprature' is not an option; did you mean 'spmc_temperature'?"),
        (b'{"spmc_version": "0.9"}', "'spmc_version' is not an option"),
        (b'{"gamma": 2}', "gamma: got 2; Input should be less than 1"),
        (b'{"rounds": "10"}', "rounds: got '10'"),
        (b'{"gamma": NaN}', "gamma: got nan"),
    ],
)
def test_a_hostile_config_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert _run("--config", str(path), "--out", str(tmp_path / "out")) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_missing_config_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--config", str(tmp_path / "nope.json")) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_a_committed_results_config_json_resolves() -> None:
    """Every config.json under docs/results is accepted as it is (only data_dir, null there, may need a flag)."""
    from spmc.config import Experiment, load_run_json, make_experiment

    paths = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").rglob("config.json"))
    assert paths
    for path in paths:
        values = load_run_json(path)
        assert values == json.loads(path.read_text()) and set(values) <= set(Experiment.model_fields)
        resolved = json.loads(make_experiment(**values).to_json())
        assert {k: resolved[k] for k in values} == values, path


def test_options_a_config_json_lacks_are_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from spmc.config import load_run_json, make_experiment

    values = json.loads(make_experiment(dataset="synthetic", defense="flame").to_json())
    del values["drop_last"], values["update_guard"], values["flame_lambda"], values["krum_f"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with caplog.at_level("WARNING"):
        assert load_run_json(path) == values
    assert "does not set drop_last, flame_lambda, update_guard (written by an earlier spmc" in caplog.text
    assert "krum_f" not in caplog.text  # an option of a defense the run does not use changes nothing
