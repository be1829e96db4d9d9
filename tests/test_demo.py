"""``spmc demo``: its grid, the sentences that read its table, its help, and one whole demo on the smoke preset."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from spmc import cli, demo
from spmc.config import ConfigError
from spmc.demo import DemoRow, reading
from spmc.store import read_json_file


def _rows(asr: dict[tuple[str, str], float | None], a: float = 70.0) -> list[DemoRow]:
    """Demo rows with the given ASR per (defense, attack); None = a run that failed."""
    return [
        DemoRow(d, att, "done", a, 100.0 - v) if v is not None else DemoRow(d, att, "failed", error="boom")
        for (d, att), v in asr.items()
    ]


def _table(fedavg: float, spmc: tuple[float, float], dnc: tuple[float, float], flame: tuple[float, float]):
    values: dict[tuple[str, str], float | None] = {("FedAvg", "badnets"): fedavg, ("FedAvg", "defense_aware"): 99.0}
    for name, (base, adaptive) in (("SPMC", spmc), ("DnC", dnc), ("FLAME", flame)):
        values[(name, "badnets")] = base
        values[(name, "defense_aware")] = adaptive
    return _rows(values)


def test_reading_a_backdoored_fedavg_a_defense_that_holds_one_that_falls_one_that_does_not_hold() -> None:
    text = reading(_table(fedavg=93.0, spmc=(4.0, 6.0), dnc=(88.0, 90.0), flame=(3.0, 85.0)))
    assert text.startswith("FedAvg is backdoored: under badnets its ASR is 93 % (>= 80 %)")
    assert "SPMC (ASR 4 %, A 70.0) and FLAME (ASR 3 %, A 70.0) keep the ASR below 20 %" in text
    assert "DnC (ASR 88 %) does not" in text
    assert "under defense_aware, FLAME (ASR 85 %) falls while SPMC (ASR 6 %) still holds" in text
    assert "Not finished" not in text


def test_reading_a_fedavg_that_is_not_backdoored_says_the_table_says_little() -> None:
    text = reading(_table(fedavg=24.0, spmc=(2.0, 3.0), dnc=(20.0, 30.0), flame=(5.0, 5.0)))
    assert text.startswith("FedAvg is not clearly backdoored at this setting: under badnets its ASR is 24 %")
    assert "says little about a defense" in text
    assert "DnC (ASR 20 %) does not" in text  # 20 % is not below the 20 % a defense must keep
    assert "SPMC (ASR 3 %), FLAME (ASR 5 %) still hold" not in text
    assert "SPMC (ASR 3 %) and FLAME (ASR 5 %) still hold" in text


def test_reading_when_every_defense_falls_under_the_base_attack_and_a_run_failed() -> None:
    rows = _table(fedavg=100.0, spmc=(60.0, 70.0), dnc=(95.0, 96.0), flame=(90.0, 99.0))
    rows[-1] = DemoRow("FLAME", "defense_aware", "failed", error="boom")
    text = reading(rows)
    assert (
        "Under badnets, SPMC (ASR 60 %, A 70.0) lowers it; DnC (ASR 95 %) and FLAME (ASR 90 %) do not lower it; "
        "under defense_aware, SPMC (ASR 70 %) gives way in part." in text
    )
    assert "keep" not in text and "falls" not in text
    assert text.endswith("Not finished: FLAME under defense_aware.")
    missing_fedavg = [r for r in rows if (r.defense, r.attack) != ("FedAvg", "badnets")]
    assert reading(missing_fedavg).startswith("FedAvg under the base attack did not finish")


def test_the_grid_has_four_defenses_times_two_attacks_and_refuses_the_arms_options(tmp_path: Path) -> None:
    spec = demo.demo_spec({"preset": "smoke"}, tmp_path, seed=3)
    assert [d["defense"] for d in spec["grid"]["defense"]] == ["fedavg", "spmc", "dnc", "flame"]
    assert spec["grid"]["defense"][1]["client"] == "spmc"
    assert spec["grid"]["attack"] == [
        {"attack": "badnets", "update_attack": "none"},
        {"attack": "badnets", "update_attack": "defense_aware"},
    ]
    assert spec["grid"]["seed"] == [3] and spec["jobs"] == 2 and spec["base"]["threads"] == 1
    with pytest.raises(ConfigError, match="demo: defense are set by the demo's arms"):
        demo.demo_spec({"preset": "smoke", "defense": "krum"}, tmp_path)


def test_demo_refuses_an_arm_option_in_one_line_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--preset", "smoke", "--set", "update_attack=scaling", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "update_attack are set by the demo's arms" in err
    assert not any(tmp_path.iterdir())


def test_help_names_the_arms_the_presets_and_the_run_directories(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ("FedAvg", "SPMC", "DnC", "FLAME", "badnets", "defense_aware", "--quick", "30 s", "90 s"):
        assert word in text, word
    assert "runs/demo-<time>" in text and "matrix.toml" in text


@pytest.mark.slow
def test_demo_on_the_smoke_preset_prints_eight_rows_and_a_reading_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "console", Console(width=400))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--preset", "smoke", "--set", "rounds=1", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    lines = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    table = {(c[0].strip(), c[1].strip()): [x.strip() for x in c[2:]] for c in lines}
    assert len(lines) == 8 and len(table) == 8
    rows = []
    for label, name in demo.DEFENSE_ARMS:
        client = "spmc" if name == "spmc" else "plain"
        for update in ("none", "defense_aware"):
            summary = read_json_file(out / f"{name}-{client}_badnets-{update}_seed0" / "summary.json")
            attack = "badnets" if update == "none" else update
            A, R = summary["A"], summary["R"]
            assert table[(label, attack)][:3] == [f"{A:.2f}", f"{R:.2f}", f"{100 - R:.2f}"]
            rows.append(DemoRow(label, attack, "done", A, R, summary["seconds_per_round"]))
    assert reading(rows) in text
    assert (out / "matrix.toml").is_file()


def test_reading_a_defense_that_lowers_the_asr_and_an_adaptive_attack_that_does_less_than_the_base_one() -> None:
    """The demo's own pattern: SPMC lowers the ASR without holding it, falls under defense_aware, and the adaptive
    attack does less than badnets against the others (its scaling costs them accuracy instead)."""
    text = reading(
        _rows(
            {
                ("FedAvg", "badnets"): 100.0, ("FedAvg", "defense_aware"): 36.0,
                ("SPMC", "badnets"): 39.0, ("SPMC", "defense_aware"): 100.0,
                ("DnC", "badnets"): 100.0, ("DnC", "defense_aware"): 15.0,
                ("FLAME", "badnets"): 100.0, ("FLAME", "defense_aware"): 95.0,
            }
        )
    )  # fmt: skip
    assert "Under badnets, SPMC (ASR 39 %, A 70.0) lowers it; DnC (ASR 100 %) and FLAME (ASR 100 %) do not" in text
    assert "under defense_aware, SPMC (ASR 100 %) falls;" in text
    assert text.endswith(
        "defense_aware does less than badnets against FedAvg (ASR 36 %, A 70.0) and DnC (ASR 15 %, A 70.0)."
    )
    assert "FLAME (ASR 95 %" not in text  # 95 vs 100: within WEAKER_BY points, not read as doing less


def test_reading_a_model_that_has_not_learnt_the_task_is_not_read_as_backdoored_or_defended() -> None:
    rows = _table(fedavg=100.0, spmc=(8.0, 100.0), dnc=(4.0, 5.0), flame=(100.0, 100.0))
    rows = [r if r.defense != "SPMC" else DemoRow(r.defense, r.attack, "done", 11.6, r.R) for r in rows]
    text = reading(rows)
    assert "SPMC (A 11.6 %) has not learnt the task under badnets" in text
    assert "DnC (ASR 4 %, A 70.0) keeps the ASR below 20 %" in text and "SPMC (ASR" not in text
    collapsed = [r if r.defense != "FedAvg" else DemoRow(r.defense, r.attack, "done", 10.0, 0.0) for r in rows]
    text = reading(collapsed)
    assert text.startswith("FedAvg has not learnt the task at this setting (A 10.0 % under badnets, below 20 %)")
    assert "backdoored" not in text


def test_spmc_without_a_command_is_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str | None, bool, str | None]] = []

    def fake_demo(args: object) -> int:
        seen.append((getattr(args, "preset", None), getattr(args, "quick", None), getattr(args, "out", None)))
        return 0

    monkeypatch.setattr(cli, "cmd_demo", fake_demo)
    assert cli.main([]) == 0
    assert seen == [(None, False, None)]
