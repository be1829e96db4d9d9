"""What a run reports under each kind of attack (ATTACKS.md §A1): backdoor runs A and R, untargeted runs A and
ΔA = A − A(no attack, same seed) with R blank; through ``summary.json``, ``spmc table``, ``spmc plot``, the
``--attack`` / ``--update-attack`` flags, ``spmc list``, a sweep axis and a Flower run configuration."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from rich.console import Console

import spmc
from spmc import cli
from spmc.attacks import ATTACKS, Attack, AttackPlan, CraftingInputs, attack_kind, kind_of
from spmc.attacks.badnets import BadNets
from spmc.attacks.base import Hook
from spmc.attacks.none import NoAttack
from spmc.cli import build_parser, main
from spmc.config import ConfigError, make_experiment, resolve
from spmc.metrics import final_metrics
from spmc.report import build_table, load_runs, render_csv, render_latex, render_markdown
from spmc.report.curves import plot_curves, save_figure
from spmc.report.runs import no_attack_match

SRC = Path(spmc.__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SignFlipForTest(Attack):
    """θ̃ = θ_g − (θ_k − θ_g): the attacker's honest update reversed (a crafting-only, untargeted attack)."""

    name: ClassVar[str] = "test_sign_flip"
    description: ClassVar[str] = "the test's sign flip"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        return 2 * inputs.global_state - inputs.attacker_states


class ShrinkForTest(Attack):
    """A training-only update attack (halves the attackers' gradients)."""

    name: ClassVar[str] = "test_shrink"
    description: ClassVar[str] = "the test's gradient shrink"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training"})

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        return grad / 2


@pytest.fixture
def test_attacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ATTACKS, SignFlipForTest.name, SignFlipForTest)
    monkeypatch.setitem(ATTACKS, ShrinkForTest.name, ShrinkForTest)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three smoke runs through the CLI flags: no attack, the test's sign flip with ``--attack none`` (untargeted)
    and the same with another seed (no run without attack matches it)."""
    root = tmp_path_factory.mktemp("runs")
    smoke = ["run", "--preset", "smoke", "--rounds", "1", "-q", "--attack", "none"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ATTACKS, SignFlipForTest.name, SignFlipForTest)
        mp.setattr(cli, "console", Console(width=300))
        assert main([*smoke, "--out", str(root / "clean")]) == 0
        assert main([*smoke, "--update-attack", "test_sign_flip", "--out", str(root / "flip")]) == 0
        assert main([*smoke, "--update-attack", "test_sign_flip", "--seed", "1", "--out", str(root / "alone")]) == 0
    return {name: root / name for name in ("clean", "flip", "alone")}


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ------------------------------------------------------------------------------------------------------ kinds


def test_attack_kind_of_each_composition(test_attacks: None) -> None:
    assert attack_kind(BadNets) == "backdoor" and attack_kind(BadNets, SignFlipForTest) == "backdoor"
    assert attack_kind(NoAttack) == "none" and attack_kind(NoAttack, NoAttack) == "none"
    assert attack_kind(NoAttack, SignFlipForTest) == "untargeted"
    assert attack_kind(NoAttack, ShrinkForTest) == "untargeted"
    assert kind_of("semantic") == "backdoor" and kind_of("none", "test_sign_flip") == "untargeted"
    assert AttackPlan(NoAttack(), SignFlipForTest(), attackers=(3,)).kind == "untargeted"
    assert AttackPlan(BadNets()).kind == "backdoor" and AttackPlan(NoAttack()).kind == "none"


def test_final_metrics_of_an_untargeted_attack_have_no_r() -> None:
    m = final_metrics([50.0, 60.0, 70.0], [10.0, 20.0, 30.0], last_k=2, targeted=False)
    assert (m.A, m.R, m.V, m.last_k) == (65.0, None, None, 2)
    assert final_metrics([50.0, 60.0, 70.0], [10.0, 20.0, 30.0], last_k=2).R == 75.0


def test_update_attack_accepts_training_or_crafting_attacks_only(test_attacks: None) -> None:
    assert make_experiment(attack="none", update_attack="test_shrink").update_attack == "test_shrink"
    assert make_experiment(attack="none", update_attack="test_sign_flip").update_attack == "test_sign_flip"
    with pytest.raises(
        ConfigError, match="update_attack: got .semantic.; unknown update attack; allowed: none, "
    ) as err:
        make_experiment(update_attack="semantic")  # a data attack only
    allowed = str(err.value).split("allowed: ")[1].split(", ")
    assert {"test_shrink", "test_sign_flip", "scaling", "pgd"} <= set(allowed)
    assert not {"semantic", "badnets", "a3fl", "label_flip"} & set(allowed)  # data attacks (a3fl trains a trigger)
    with pytest.raises(ConfigError, match="attack: got 'lie'; unknown data attack"):
        make_experiment(attack="lie")  # an update attack is no data attack


# ------------------------------------------------------------------------------------------------- summaries


def test_untargeted_summary_has_a_and_no_r(runs: dict[str, Path]) -> None:
    flip, clean = _summary(runs["flip"]), _summary(runs["clean"])
    assert flip["attack_kind"] == "untargeted"
    assert flip["R"] is None and flip["V"] is None and flip["R_excl_target"] is None
    records = [json.loads(line) for line in (runs["flip"] / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and flip["A"] == records[0]["accuracy"]
    assert flip["malicious_ids"] == [3]
    # the run without attack keeps today's metrics: R = 100 − ASR of the badnets pattern, V = (A + R)/2
    assert clean["attack_kind"] == "none" and clean["malicious_ids"] == []
    assert isinstance(clean["R"], float) and clean["V"] == pytest.approx((clean["A"] + clean["R"]) / 2)
    assert flip["A"] != clean["A"]  # the sign flip acted


def test_flags_reach_the_configuration(runs: dict[str, Path], test_attacks: None) -> None:
    config = json.loads((runs["flip"] / "config.json").read_text())
    assert (config["attack"], config["update_attack"], config["dataset"]) == ("none", "test_sign_flip", "synthetic")
    args = build_parser().parse_args(["run", "--attack", "semantic", "--update-attack", "test_shrink"])
    cfg = resolve("smoke", None, **cli._overrides(args))
    assert (cfg.attack, cfg.update_attack) == ("semantic", "test_shrink")
    args = build_parser().parse_args(["run", "--defense", "krum"])
    assert "attack" not in cli._overrides(args) and "update_attack" not in cli._overrides(args)


def test_a_backdoor_run_reports_r_and_its_table_has_no_delta_column(tmp_path: Path) -> None:
    result = spmc.run_experiment(resolve("smoke", None, rounds=1), tmp_path / "bd")
    summary = _summary(tmp_path / "bd")
    assert summary["attack_kind"] == "backdoor"
    assert summary["R"] == pytest.approx(100.0 - result.records[0]["asr"])
    assert summary["R_excl_target"] == pytest.approx(100.0 - result.records[0]["asr_excl_target"])
    table = build_table(load_runs([tmp_path]))
    assert table.metrics == ("A", "R", "V") and "ΔA" not in render_markdown(table)


# --------------------------------------------------------------------------------------------------- reports


def test_table_shows_delta_a_against_the_run_without_attack(runs: dict[str, Path]) -> None:
    loaded = load_runs([runs["clean"], runs["flip"]])
    flip, clean = loaded[1], loaded[0]
    assert no_attack_match(flip, loaded) is clean and no_attack_match(clean, loaded) is None
    table = build_table(loaded)
    assert table.metrics == ("A", "dA", "R", "V") and table.unmatched == ()
    expected = _summary(runs["flip"])["A"] - _summary(runs["clean"])["A"]
    row = next(r for r in table.rows if "test_sign_flip" in r.label)
    cell = table.cell(row, 0.25, "synthetic")
    assert cell is not None and cell.stats["dA"].mean == pytest.approx(expected)
    assert cell.stats["R"].mean is None and cell.stats["V"].mean is None
    text = render_markdown(table)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["method", "synthetic A", "synthetic ΔA", "synthetic R", "synthetic V"]
    flip_line = next([c.strip() for c in line.strip("|").split("|")] for line in lines if "test_sign_flip" in line)
    assert flip_line[1:] == [f"{_summary(runs['flip'])['A']:.2f}", f"{expected:.2f}", "", ""]
    clean_line = next([c.strip() for c in line.strip("|").split("|")] for line in lines if "update_attack=none" in line)
    assert clean_line[2] == "" and clean_line[3] == f"{_summary(runs['clean'])['R']:.2f}"
    assert "ΔA = A − A of the same setting without attack" in text
    assert "dA" in render_csv(table).splitlines()[0] and r"$\Delta$A" in render_latex(table)


def test_table_leaves_delta_a_blank_without_the_matching_run(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    table = build_table(load_runs([runs["clean"], runs["alone"]]))  # seed 1 has no run without attack
    assert table.unmatched == (runs["alone"],)
    cell = table.cell(next(r for r in table.rows if "test_sign_flip" in r.label), 0.25, "synthetic")
    assert cell is not None and cell.stats["dA"].mean is None and cell.stats["A"].mean is not None
    assert main(["table", str(runs["alone"])]) == 0
    out = capsys.readouterr().out
    assert "ΔA blank for 1 run(s) whose run without attack" in out


def test_table_command_on_a_folder(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["table", str(runs["clean"].parent), "--format", "csv"]) == 0
    rows = [line.split(",") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:7] == ["method", "dataset", "gamma", "A", "dA", "R", "V"]
    # seeds 0 and 1 share the row; only seed 0 has its run without attack, so ΔA is seed 0's alone
    flip = next(r for r in rows if "test_sign_flip" in r[0])
    expected = _summary(runs["flip"])["A"] - _summary(runs["clean"])["A"]
    assert (
        float(flip[4]) == pytest.approx(expected, abs=1e-6)
        and flip[11] == "2"
        and sorted(flip[12].split()) == ["0", "1"]
    )
    assert float(flip[3]) == pytest.approx((_summary(runs["flip"])["A"] + _summary(runs["alone"])["A"]) / 2)


def test_plot_draws_untargeted_runs_in_the_accuracy_panel_only(runs: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_runs([runs["clean"], runs["flip"]], need_summary=False)
    fig = plot_curves(loaded, ["accuracy", "asr"])
    acc_ax, asr_ax = fig.axes[:2]
    assert len(acc_ax.get_lines()) == 2 and len(asr_ax.get_lines()) == 1
    paths = save_figure(fig, tmp_path / "fig")
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", str(runs["flip"]), "--out", str(tmp_path / "only"), "--metric", "asr,accuracy"]) == 0
    assert (tmp_path / "only.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_reads_the_kind_from_the_config_of_a_running_run(runs: dict[str, Path], tmp_path: Path) -> None:
    running = tmp_path / "running"
    running.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (running / name).write_bytes((runs["flip"] / name).read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ATTACKS, SignFlipForTest.name, SignFlipForTest)
        (run,) = load_runs([running], need_summary=False)
        assert run.summary is None and run.attack_kind == "untargeted"
    (run,) = load_runs([running], need_summary=False)  # the attack is not registered here: still untargeted
    assert run.attack_kind == "untargeted"
    fig = plot_curves([run], ["asr", "accuracy"])
    assert len(fig.axes[0].get_lines()) == 0 and len(fig.axes[1].get_lines()) == 1


# ------------------------------------------------------------------------------------------------- commands


def test_list_shows_kind_and_hooks(test_attacks: None, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(cli, "console", Console(width=300))
    assert main(["list"]) == 0
    lines = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.count("│") > 2}
    assert "[backdoor; data]" in lines["badnets"] and "[backdoor; data]" in lines["semantic"]
    assert "[no attack; no hook]" in lines["none"]
    assert "[update attack: untargeted with attack = none; crafting] the test's sign flip" in lines["test_sign_flip"]
    assert "[update attack: untargeted with attack = none; training]" in lines["test_shrink"]


PLUGIN = """
from typing import ClassVar

from spmc.attacks.base import Attack


class SignFlip(Attack):
    name: ClassVar[str] = "t-sign-flip"
    description: ClassVar[str] = "sign flip of a test plug-in"
    hooks: ClassVar[frozenset[str]] = frozenset({"crafting"})

    def craft(self, inputs):
        return 2 * inputs.global_state - inputs.attacker_states
"""

SWEEP = """
[base]
preset = "smoke"
rounds = 1
attack = "none"
[grid]
update_attack = ["none", "t-sign-flip"]
"""


@pytest.fixture
def plugin_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A plug-in with a sign-flip update attack on the PYTHONPATH of the sweep's ``spmc run`` processes (a
    monkeypatched registry does not reach them)."""
    root = tmp_path / "plugin"
    (root / "t_attack-1.0.dist-info").mkdir(parents=True)
    (root / "t_attack.py").write_text(textwrap.dedent(PLUGIN))
    (root / "t_attack-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: t-attack\nVersion: 1.0\n")
    entry = "[spmc.attacks]\nt-sign-flip = t_attack:SignFlip\n"
    (root / "t_attack-1.0.dist-info" / "entry_points.txt").write_text(entry)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(SRC), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(root))  # and here, where the sweep checks its grid before it starts
    monkeypatch.setitem(ATTACKS, "t-sign-flip", importlib.import_module("t_attack").SignFlip)
    yield root
    sys.modules.pop("t_attack", None)


def test_update_attack_is_a_sweep_axis(plugin_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(SWEEP)
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--jobs", "1"]) == 0
    assert len(list(out.iterdir())) == 2
    summaries = {p.name: _summary(p) for p in out.iterdir()}
    kinds = sorted(s["attack_kind"] for s in summaries.values())
    assert kinds == ["none", "untargeted"]
    flip = next(s for s in summaries.values() if s["attack_kind"] == "untargeted")
    assert flip["R"] is None and flip["malicious_ids"] == [3]
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    clean = next(s for s in summaries.values() if s["attack_kind"] == "none")
    row = next(line for line in capsys.readouterr().out.splitlines() if "update_attack=t-sign-flip" in line)
    assert [c.strip() for c in row.strip("|").split("|")][1:] == [
        f"{flip['A']:.2f}",
        f"{flip['A'] - clean['A']:.2f}",
        "",
        "",
    ]


def test_flower_run_config_takes_update_attack(test_attacks: None) -> None:
    pytest.importorskip("flwr")
    from spmc.flower.options import parse_run_config
    from spmc.flower.server_app import summarise

    cfg, _ = parse_run_config({"preset": "smoke", "attack": "none", "update-attack": "test_sign_flip"})
    assert (cfg.attack, cfg.update_attack) == ("none", "test_sign_flip")
    with pytest.raises(ConfigError, match="update_attack"):
        parse_run_config({"preset": "smoke", "update-attack": "semantic"})
    records = [{"round": t, "accuracy": 40.0 + t, "asr": 5.0, "seconds": 1.0} for t in range(3)]
    summary = summarise(cfg, records)
    assert summary["attack_kind"] == "untargeted" and summary["R"] is None and summary["V"] is None
    assert summary["A"] == pytest.approx(41.0)
    backdoor, _ = parse_run_config({"preset": "smoke"})
    summary = summarise(backdoor, records)
    assert summary["attack_kind"] == "backdoor" and summary["R"] == 95.0 and not math.isnan(summary["V"])
