"""Reports: Table 2 from run directories, the curves of Figure 6, the Grad-CAM maps of Figure 7."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spmc import make_experiment, run_experiment
from spmc.cli import main
from spmc.models import build_model
from spmc.report import build_table, load_paper_table, load_runs, render_csv, render_latex, render_markdown
from spmc.report.curves import fitting_legend, parse_panels, plot_curves, save_figure
from spmc.report.gradcam import (
    compare_runs,
    grad_cam,
    load_final_model,
    load_report_config,
    load_test_images,
    target_layer,
)
from spmc.report.runs import distinct_labels, method_label
from spmc.simulation import build_federated_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(
    root: Path,
    name: str,
    *,
    defense: str = "fedavg",
    client: str = "plain",
    dataset: str = "fmnist",
    gamma: float = 0.2,
    seed: int = 0,
    A: float = 80.0,
    R: float = 10.0,
    rounds: int = 6,
    **options: object,
) -> Path:
    """A run directory as ``spmc run`` leaves it (no checkpoint): every round has accuracy A and ASR 100 − R."""
    run = root / name
    run.mkdir(parents=True)
    cfg = make_experiment(
        dataset=dataset, defense=defense, client=client, gamma=gamma, seed=seed, rounds=rounds, **options
    )
    (run / "config.json").write_text(cfg.to_json())
    records = [
        {"round": t, "accuracy": A - (rounds - 1 - t), "asr": 100.0 - R + (rounds - 1 - t), "asr_all": 100.0 - R}
        for t in range(rounds)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"A": A, "R": R, "V": (A + R) / 2, "last_k": 5, "rounds": rounds, "dataset": dataset}
    summary.update(defense=defense, client=client, gamma=gamma, seed=seed)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, (a, r) in enumerate([(80.0, 10.0), (82.0, 20.0), (84.0, 30.0)]):
        fake_run(root / "fedavg", f"s{seed}", seed=seed, A=a, R=r)
    fake_run(root, "spmc", defense="spmc", client="spmc", A=82.5, R=70.0)
    fake_run(root, "spmc-t", defense="spmc", client="spmc", A=81.0, R=75.0, spmc_temperature=0.01)
    fake_run(root, "fedavg-spmc-client", defense="fedavg", client="spmc", A=85.0, R=5.0)
    fake_run(root, "bulyan", defense="bulyan", A=40.0, R=99.0)
    fake_run(root, "krum", defense="krum", A=70.0, R=50.0)
    fake_run(root, "sample", defense="spmc", client="spmc", dataset="fmnist-sample", gamma=0.3, A=75.0, R=60.0)
    fake_run(root, "mnist", defense="fedavg", dataset="mnist", gamma=0.3, A=99.0, R=1.0)
    return root


def _md_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_labels_follow_the_documented_rule() -> None:
    assert method_label("fedavg", "plain") == "FedAvg"
    assert method_label("spmc", "spmc") == "SPMC"
    assert method_label("fedavg", "spmc") == "FedAvg + SPMC client"
    assert method_label("spmc", "plain") == "SPMC + plain client"
    assert method_label("multikrum", "plain") == "Multi-Krum"
    assert method_label("flame", "plain") == "FLAME"


def test_every_built_in_defense_has_a_printed_name() -> None:
    from spmc.defenses import DEFENSES
    from spmc.report.runs import DEFENSE_LABELS

    built_in = {name for name, cls in DEFENSES.items() if cls.__module__.startswith("spmc.defenses.")}
    assert len(built_in) >= 26
    assert built_in <= set(DEFENSE_LABELS)


def test_paper_csv_ships_with_the_package() -> None:
    paper = load_paper_table()
    assert paper[("SPMC", "FashionMNIST", 0.2)] == {"A": 82.19, "R": 70.07, "V": 76.45}
    assert paper[("Bulyan", "FashionMNIST", 0.2)]["A"] is None
    assert {m for m, _, _ in paper} == {
        "FedAvg", "DnC", "Sageflow", "Bulyan", "RFA", "RLR", "CRFL", "FoolsGold", "RSA", "Finetuning", "SPMC",
    }  # fmt: skip


def test_table_layout_and_numbers(runs_root: Path) -> None:
    table = build_table(load_runs([runs_root]), load_paper_table())
    assert table.gammas == [0.2, 0.3]
    assert table.datasets == ["FashionMNIST", "MNIST", "fmnist-sample"]
    assert [r.label for r in table.rows_at(0.2)] == [
        "FedAvg",
        "FedAvg + SPMC client",
        "Bulyan",
        "SPMC [spmc_temperature=0.01]",
        "SPMC [spmc_temperature=1.0]",
        "Krum",
    ]
    # the variant split applies to every run of the defense, so the fmnist-sample run joins the default row
    assert [r.label for r in table.rows_at(0.3)] == ["FedAvg", "SPMC [spmc_temperature=1.0]"]
    fedavg = table.rows[0]
    cell = table.cell(fedavg, 0.2, "FashionMNIST")
    assert cell is not None and cell.seeds == (0, 1, 2)
    assert cell.stats["A"].mean == pytest.approx(82.0) and cell.stats["A"].std == pytest.approx(2.0)
    assert cell.stats["R"].mean == pytest.approx(20.0) and cell.stats["R"].std == pytest.approx(10.0)
    assert cell.stats["V"].mean == pytest.approx(51.0) and cell.stats["V"].std == pytest.approx(6.0)
    assert cell.diff("A") == 82.0 - 87.89 and cell.diff("R") == cell.stats["R"].mean - 4.73
    spmc = next(r for r in table.rows if r.label == "SPMC [spmc_temperature=1.0]")
    one = table.cell(spmc, 0.2, "FashionMNIST")
    assert one is not None and one.stats["A"].std is None and one.diff("A") == 82.5 - 82.19
    ablation = next(r for r in table.rows if r.label == "FedAvg + SPMC client")
    assert ablation.paper_method is None and table.cell(ablation, 0.2, "FashionMNIST").paper is None
    bulyan = table.cell(next(r for r in table.rows if r.defense == "bulyan"), 0.2, "FashionMNIST")
    assert bulyan.paper_value("A") is None and bulyan.diff("A") is None and bulyan.diff("R") == 99.0 - 99.94
    # Runs on a dataset the paper does not have get their own column, without paper values.
    sample = table.cell(next(r for r in table.rows_at(0.3) if r.defense == "spmc"), 0.3, "fmnist-sample")
    assert sample is not None and sample.paper is None


def test_markdown_parses(runs_root: Path) -> None:
    table = build_table(load_runs([runs_root]), load_paper_table())
    text = render_markdown(table)
    rows = _md_rows(text)
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == 1 + 3 * 3 * 3
    header = rows[0]
    assert header[1:4] == ["FashionMNIST A", "paper", "Δ"]
    fedavg = next(r for r in rows if r[0] == "FedAvg")
    assert fedavg[1:4] == ["82.00 ± 2.00", "87.89", "-5.89"]
    assert fedavg[4:7] == ["20.00 ± 10.00", "4.73", "+15.27"]
    bulyan = next(r for r in rows if r[0] == "Bulyan")
    assert bulyan[1:4] == ["40.00", "", ""]  # one seed: no ±; the paper's A is unreadable: blank
    assert "**γ = 0.2**" in text and "**γ = 0.3**" in text
    plain = _md_rows(render_markdown(build_table(load_runs([runs_root]))))
    assert len(plain[0]) == 1 + 3 * 3 and next(r for r in plain if r[0] == "FedAvg")[1] == "82.00 ± 2.00"


def test_latex_is_booktabs_and_escaped(runs_root: Path) -> None:
    text = render_latex(build_table(load_runs([runs_root]), load_paper_table()))
    assert text.startswith(r"\begin{tabular}{l" + "r" * 27 + "}")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){2-10}"):
        assert rule in text
    assert r"SPMC [spmc\_temperature=0.01]" in text and r"82.00 $\pm$ 2.00" in text
    assert r"$\gamma = 0.2$" in text
    body = [ln for ln in text.splitlines() if ln.endswith(r"\\") and not ln.startswith(r"\multicolumn")]
    assert body and all(ln.count("&") == 27 for ln in body[2:])
    assert re.search(r"(?<!\\)_", text.replace("$", "")) is None  # every underscore escaped


def test_csv_parses(runs_root: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(render_csv(build_table(load_runs([runs_root]), load_paper_table())))))
    fedavg = next(r for r in rows if r["method"] == "FedAvg" and r["dataset"] == "FashionMNIST")
    assert (fedavg["gamma"], fedavg["n"], fedavg["seeds"]) == ("0.2", "3", "0 1 2")
    assert float(fedavg["A"]) == 82.0 and float(fedavg["A_std"]) == 2.0 and float(fedavg["A_paper"]) == 87.89
    assert float(fedavg["A_diff"]) == pytest.approx(82.0 - 87.89, abs=1e-6)
    spmc = next(r for r in rows if r["variant"] == "spmc_temperature=0.01")
    assert (spmc["defense"], spmc["client"], spmc["A_std"]) == ("spmc", "spmc", "")
    bulyan = next(r for r in rows if r["defense"] == "bulyan")
    assert bulyan["A_paper"] == "" and bulyan["A_diff"] == "" and bulyan["R_paper"] == "99.94"
    assert len(rows) == 8  # one line per (row, dataset, γ) cell that has runs


def test_table_command(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "t2.csv"
    assert (
        main(["table", str(runs_root / "fedavg"), str(runs_root / "spmc"), "--paper", "-f", "csv", "-o", str(out)]) == 0
    )
    assert [r["method"] for r in csv.DictReader(out.open())] == ["FedAvg", "SPMC"]
    assert main(["table", str(runs_root), "--format", "latex", "--out", str(tmp_path / "t2.tex")]) == 0
    assert (tmp_path / "t2.tex").read_text().startswith(r"\begin{tabular}")
    assert main(["table", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["table", str(tmp_path / "empty")]) == 2


def test_plot_files(runs_root: Path, tmp_path: Path) -> None:
    assert parse_panels("accuracy, asr") == ["accuracy", "asr"]
    runs = load_runs([runs_root / "fedavg", runs_root / "spmc"], need_summary=False)
    assert distinct_labels(runs) == ["FedAvg (seed 0)", "FedAvg (seed 1)", "FedAvg (seed 2)", "SPMC"]
    paths = save_figure(plot_curves(runs), tmp_path / "figs" / "f6.png")
    assert [p.name for p in paths] == ["f6.png", "f6.svg"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC) and paths[1].stat().st_size > 1000
    prefix = tmp_path / "cli"
    assert main(["plot", str(runs_root / "fedavg"), "--out", str(prefix), "--metric", "accuracy,asr_all"]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 1000 and (tmp_path / "cli.svg").stat().st_size > 1000
    assert main(["plot", str(runs_root), "--metric", "loss", "--out", str(prefix)]) == 2


# ------------------------------------------------------------------------------------------------------ Grad-CAM


class ChannelReadout(nn.Module):
    """logit_j = r_j · Σ_hw A[0, h, w] where A = conv(x) has 2 channels: ∂logit_j/∂A_0 = r_j, ∂logit_j/∂A_1 = 0,
    so the Grad-CAM of class j is ReLU(r_j · A_0) / max."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.register_buffer("readout", torch.tensor([0.5, -2.0, 1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, 0].sum(dim=(1, 2))[:, None] * self.readout


def test_grad_cam_known_answer() -> None:
    torch.manual_seed(0)
    model = ChannelReadout().train()
    x = torch.randn(3, 1, 8, 8)
    a0 = model.conv(x)[:, 0].detach()
    pos, neg = a0.relu(), (-a0).relu()
    expected_pos = pos / pos.amax(dim=(1, 2), keepdim=True)
    expected_neg = neg / neg.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(grad_cam(model, model.conv, x, 0), expected_pos)
    torch.testing.assert_close(grad_cam(model, model.conv, x, 2), expected_pos)
    torch.testing.assert_close(grad_cam(model, model.conv, x, torch.tensor([1, 1, 1])), expected_neg)
    mixed = grad_cam(model, model.conv, x, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(mixed, torch.stack([expected_pos[0], expected_neg[1], expected_pos[2]]))
    predicted = model(x).argmax(dim=1)
    torch.testing.assert_close(grad_cam(model, model.conv, x), grad_cam(model, model.conv, x, predicted))
    assert model.training and model.conv.weight.grad is None  # mode restored, no parameter gradient left behind


@pytest.mark.parametrize("name", ["simplecnn", "resnet10"])
def test_grad_cam_on_the_backbones(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).requires_grad_(False)  # frozen parameters still work
    layer = target_layer(model)
    assert layer is (model.conv2 if name == "simplecnn" else model.layer4)
    cam = grad_cam(model, layer, torch.randn(2, 3, 32, 32))
    assert cam.shape == (2, 32, 32) and float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0 + 1e-6
    assert model.training  # the mode it came in with


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("real")
    common = dict(
        dataset="synthetic", synthetic_train_size=300, synthetic_test_size=50, num_clients=2, rounds=1,
        baseline_local_epochs=1, spmc_local_epochs=1, device="cpu", gamma=0.5,
    )  # fmt: skip
    run_experiment(make_experiment(defense="fedavg", **common), out_dir=root / "fedavg")
    run_experiment(make_experiment(defense="spmc", client="spmc", **common), out_dir=root / "spmc")
    return root / "fedavg", root / "spmc"


def test_gradcam_images_match_the_simulation(real_runs: tuple[Path, Path]) -> None:
    cfg = load_report_config(real_runs[0])
    clean, triggered, labels, idx = load_test_images(cfg, 3)
    data = build_federated_data(cfg, torch.device("cpu"))
    assert bool((labels != cfg.target_label).all())
    torch.testing.assert_close(clean, data.test_x[idx])
    torch.testing.assert_close(triggered, data.backdoor_x[idx])
    model = load_final_model(real_runs[0], cfg)
    state = torch.load(real_runs[0] / "checkpoint.pt", weights_only=True)["global_state"]
    torch.testing.assert_close(torch.cat([v.flatten().float() for v in model.state_dict().values()]), state)


def test_gradcam_end_to_end(real_runs: tuple[Path, Path], tmp_path: Path) -> None:
    comparison = compare_runs(real_runs, images=2)
    assert [m.label for m in comparison.models] == ["FedAvg", "SPMC"]
    assert comparison.models[0].cam_clean.shape == (2, 32, 32)
    prefix = tmp_path / "f7"
    assert main(["gradcam", str(real_runs[0]), str(real_runs[1]), "--images", "2", "--out", str(prefix)]) == 0
    assert (tmp_path / "f7.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["gradcam", str(real_runs[0]), str(tmp_path), "--out", str(prefix)]) == 2  # not a run directory
    # The real runs also go through the table and the plot.
    assert main(["table", str(real_runs[0].parent), "-o", str(tmp_path / "t.md")]) == 0
    assert "| FedAvg |" in (tmp_path / "t.md").read_text() and "| SPMC |" in (tmp_path / "t.md").read_text()
    assert main(["plot", str(real_runs[0].parent), "-o", str(tmp_path / "f6")]) == 0


def test_the_legend_fits_the_figure_whatever_the_labels(tmp_path: Path) -> None:
    """Three short labels share one row; seven long ones (runs told apart by several options) take fewer columns, so
    that no label is cut off at the figure's edges."""

    def legend_of(fig: Any) -> Any:
        return fig.legends[0]

    short = load_runs([fake_run(tmp_path / "short", n, defense=n) for n in ("fedavg", "krum", "rlr")])
    fig = plot_curves(short)
    rows = {round(t.get_window_extent().y0) for t in legend_of(fig).get_texts()}
    assert len(rows) == 1 and legend_of(fig).get_window_extent().width <= fig.bbox.width
    options = [
        {"malicious_client": m, "spmc_temperature": t, "spmc_lambda": a}
        for m, t, a in [("defense", 1.0, 1.0), ("plain", 1.0, 1.0), ("spmc", 0.001, 1.0), ("defense", 0.001, 0.5)]
    ]
    long = [fake_run(tmp_path / "long", f"r{i}", defense="spmc", client="spmc", **o) for i, o in enumerate(options)]
    fig = plot_curves(load_runs(long), panels=["asr"])
    assert max(len(t.get_text()) for t in legend_of(fig).get_texts()) > 60
    assert legend_of(fig).get_window_extent().width <= fig.bbox.width
    with pytest.raises(ValueError, match="no legend entries"):
        fitting_legend(fig, [], [])


def test_unfinished_runs_are_left_out_by_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run directory without summary.json (still going, killed or failed), named or inside a searched folder, is
    left out of the table with a warning naming it; one with neither file is not a run and is not named."""
    done = fake_run(tmp_path, "done", A=81.0)
    named = fake_run(tmp_path, "named")
    inside = fake_run(tmp_path / "folder", "inside")
    for run in (named, inside):
        (run / "summary.json").unlink()
    (tmp_path / "folder" / "notes").mkdir()
    runs = load_runs([done, named, tmp_path / "folder", done])
    assert [r.path for r in runs] == [done]
    assert f"left out 2 run folder(s) without summary.json (unfinished or failed): {named}, {inside}" in caplog.text
    assert "notes" not in caplog.text
    assert main(["table", str(named)]) == 2  # nothing finished: an error, not an empty table
    (inside / "error.txt").write_bytes(b"lr: -1 is not > 0\n\xff" + b"x" * 10_000)  # hostile: long, not UTF-8
    load_runs([tmp_path / "folder", done])
    assert f"{inside} (failed: lr: -1 is not > 0)" in caplog.text


def test_table_warns_about_unequal_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake_run(tmp_path, "a", defense="fedavg", rounds=10)
    fake_run(tmp_path, "b", defense="rlr", rounds=6)
    fake_run(tmp_path, "c", defense="rlr", rounds=6)
    table = build_table(load_runs([tmp_path]))
    assert [r.label for r in table.rows] == ["FedAvg", "RLR"]  # rounds differ between rows, not within one
    assert "differ in rounds" in caplog.text and "several runs with the same seed" in caplog.text
