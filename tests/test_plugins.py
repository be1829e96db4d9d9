"""Entry-point plug-ins (spmc.plugins): a package written by the test, a module and a ``*.dist-info`` on sys.path."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import spmc
from spmc import cli, make_experiment, plugins
from spmc.attacks import ATTACKS
from spmc.config import ConfigError
from spmc.data import DATASETS
from spmc.defenses import DEFENSES, FedAvg
from spmc.models import MODELS, build_model
from spmc.plugins import ATTACK, DATASET, DEFENSE, MODEL, load_entry_points, plugin_origin

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SRC = Path(spmc.__file__).resolve().parents[1]
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"

#: A third-party package: a defense (uniform mean of the states), an attack, a dataset and a model, plus entries
#: that are broken in every way the loader must survive.
PLUGIN_MODULE = '''
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from spmc.attacks.base import Attack
from spmc.data.registry import MNIST_MEAN, MNIST_STD, DatasetInfo
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.options import option


@dataclass(frozen=True)
class UniformMeanOptions:
    rounding: int = option(6, "acme_rounding", "digits of the weights in the diagnostics, 0 … 12")

    def __post_init__(self) -> None:
        if not 0 <= self.rounding <= 12:
            raise ValueError(f"acme_rounding: got {self.rounding!r}; allowed: 0 … 12")


class UniformMean:
    """θ_g ← (1/n) Σ_k θ_k: every participant weighs the same, whatever its sample count."""

    name: ClassVar[str] = "acme"
    description: ClassVar[str] = "Acme uniform mean [bold]of[/bold] the client states"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[UniformMeanOptions]] = UniformMeanOptions

    def __init__(self, options: UniformMeanOptions | None = None) -> None:
        self.options = options if options is not None else UniformMeanOptions()

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        w = torch.full((inputs.n,), 1.0 / inputs.n, dtype=torch.float64)
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w),
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={"weights": as_weight_list(w, inputs.client_ids)},
        )


class NoAggregate:
    name: ClassVar[str] = "lazy"
    description: ClassVar[str] = "lacks aggregate"
    needs_server_data: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg):
        return cls()


class Flip(Attack):
    """y → C − 1 − y on an attacker's poisoned samples (data hook)."""

    name: ClassVar[str] = "acme-flip"
    description: ClassVar[str] = "label flip of the acme package"
    hooks: ClassVar[frozenset[str]] = frozenset({"data"})

    def poison(self, x, y, mask, generator=None):
        return x, torch.where(mask, 9 - y, y)


class NotAnAttack:
    description = "a description but no Attack base"


def acme_net(num_classes: int) -> nn.Module:
    """Acme linear classifier on flattened 3x32x32 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


ACME_DATA = DatasetInfo("acme-data", "Acme IDX images", MNIST_MEAN, MNIST_STD, hflip=False, model="simplecnn")
OTHER_NAME = DatasetInfo("not-mine", "named otherwise", MNIST_MEAN, MNIST_STD, hflip=False, model="simplecnn")
NOT_CALLABLE = 42
'''

ENTRY_POINTS = """
[spmc.defenses]
acme = acme_plugin:UniformMean
krum = acme_plugin:UniformMean
lazy = acme_plugin:NoAggregate
function = acme_plugin:acme_net
broken = acme_broken:Anything
exits = acme_exits:Anything
missing = acme_plugin:DoesNotExist
Bad Name = acme_plugin:UniformMean

[spmc.attacks]
acme-flip = acme_plugin:Flip
base = acme_plugin:Flip
silent = acme_plugin:NOT_CALLABLE
plain-class = acme_plugin:NotAnAttack

[spmc.datasets]
acme-data = acme_plugin:ACME_DATA
renamed = acme_plugin:OTHER_NAME

[spmc.models]
acme-net = acme_plugin:acme_net
number = acme_plugin:NOT_CALLABLE
"""


def write_plugin(root: Path) -> Path:
    """The package ``acme-plugin`` 1.0 in ``root``: its modules and its dist-info with the entry points."""
    (root / "acme_plugin.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    (root / "acme_broken.py").write_text("raise ImportError('acme_broken needs a library that is not installed')\n")
    (root / "acme_exits.py").write_text("import sys\nsys.exit(3)\n")
    info = root / "acme_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plug-in package on sys.path; the registries and the plug-in record are restored afterwards."""
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = [(reg, dict(reg)) for reg in (DEFENSES, ATTACKS, DATASETS, MODELS, plugins.PLUGINS)]
    yield tmp_path
    for reg, content in saved:
        reg.clear()
        reg.update(content)
    for name in ("acme_plugin", "acme_broken", "acme_exits"):
        sys.modules.pop(name, None)


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_defense_plugin_is_registered_and_its_distribution_recorded(plugin_path: Path) -> None:
    registry = dict(DEFENSES)
    added = load_entry_points("spmc.defenses", registry, DEFENSE)
    assert added == ["acme"]
    assert registry["acme"].__name__ == "UniformMean"
    assert {k: v for k, v in registry.items() if k != "acme"} == DEFENSES
    assert plugin_origin("spmc.defenses", "acme") == "distribution 'acme-plugin'"
    assert plugin_origin("spmc.defenses", "fedavg") is None


def test_broken_defense_plugins_are_skipped_with_one_warning_each(
    plugin_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry: dict[str, type] = {"krum": FedAvg}
    with caplog.at_level(logging.WARNING, logger="spmc.plugins"):
        load_entry_points("spmc.defenses", registry, DEFENSE)
    text = warnings_of(caplog)
    assert set(registry) == {"krum", "acme"}
    assert registry["krum"] is FedAvg  # a built-in is never overridden
    expected = {
        "krum": "already taken by a built-in",
        "lazy": "lacks aggregate",
        "function": "expected a class",
        "broken": "ImportError: acme_broken needs a library",
        "exits": "SystemExit",
        "missing": "failed to load",
        "Bad Name": "the name must match",
    }
    lines = text.splitlines()
    assert len(lines) == len(expected)
    for name, reason in expected.items():
        line = next(line for line in lines if f"plug-in {name!r}" in line)
        assert reason in line and "distribution 'acme-plugin'" in line, line


def test_a_second_plugin_of_the_same_name_does_not_replace_the_first(
    plugin_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry: dict[str, type] = {}
    load_entry_points("spmc.defenses", registry, DEFENSE)
    first = registry["acme"]
    with caplog.at_level(logging.WARNING, logger="spmc.plugins"):
        assert load_entry_points("spmc.defenses", registry, DEFENSE) == []
    assert registry["acme"] is first
    assert "already taken by the plug-in from distribution 'acme-plugin'" in warnings_of(caplog)


def test_attack_dataset_and_model_plugins(plugin_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    attacks: dict[str, object] = {"base": "built-in"}
    datasets: dict[str, object] = {}
    models: dict[str, object] = {}
    with caplog.at_level(logging.WARNING, logger="spmc.plugins"):
        assert load_entry_points("spmc.attacks", attacks, ATTACK) == ["acme-flip"]
        assert load_entry_points("spmc.datasets", datasets, DATASET) == ["acme-data"]
        assert load_entry_points("spmc.models", models, MODEL) == ["acme-net"]
    assert list(attacks) == ["base", "acme-flip"] and attacks["base"] == "built-in"
    flip = attacks["acme-flip"]
    assert isinstance(flip, type) and flip.description == "label flip of the acme package"
    _, y = flip().poison(torch.zeros(2, 3, 32, 32), torch.tensor([0, 4]), torch.tensor([True, False]))
    assert y.tolist() == [9, 4]
    assert getattr(datasets["acme-data"], "description", None) == "Acme IDX images"
    text = warnings_of(caplog)
    assert "'silent'" in text and "expected a subclass of spmc.attacks.Attack" in text
    assert "'plain-class'" in text and "got NotAnAttack" in text
    assert "'renamed'" in text and "DatasetInfo.name is 'not-mine'" in text
    assert "'number'" in text and "expected a callable" in text


def test_no_plugins_installed_adds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = {"fedavg": FedAvg}
    assert load_entry_points("spmc.defenses", registry, DEFENSE) == []
    assert registry == {"fedavg": FedAvg}


def test_loaded_plugins_are_usable_through_the_real_registries(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "console", Console(width=300))
    for group, registry, kind in (
        ("spmc.defenses", DEFENSES, DEFENSE),
        ("spmc.attacks", ATTACKS, ATTACK),
        ("spmc.datasets", DATASETS, DATASET),
        ("spmc.models", MODELS, MODEL),
    ):
        load_entry_points(group, registry, kind)
    cfg = make_experiment(dataset="synthetic", defense="acme", model="acme-net")
    assert DEFENSES[cfg.defense].from_config(cfg).aggregate is not None
    assert sum(p.numel() for p in build_model("acme-net").parameters()) == 3 * 32 * 32 * 10 + 10
    with pytest.raises(ConfigError, match="unknown defense"):
        make_experiment(dataset="synthetic", defense="lazy")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("acme", "acme-flip", "acme-data", "acme-net"):
        assert f"│ {name} " in out
    assert "Acme uniform mean [bold]of[/bold] the client states" in out  # markup shown, not interpreted
    assert out.count("[plug-in from distribution 'acme-plugin']") == 4
    for skipped in ("lazy", "broken", "renamed", "number"):
        assert f"│ {skipped} " not in out


def test_spmc_run_with_a_plugin_defense_and_model(plugin_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(SRC)])}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "spmc", "run", "--preset", "smoke", "--defense", "acme", "--out", str(out), "-q"]
    proc = subprocess.run(
        [*cmd, "--set", "model=acme-net"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plug-in 'broken'" in proc.stderr and "skipped" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {"A", "R", "V"} <= set(summary)
    config = json.loads((out / "config.json").read_text())
    assert (config["defense"], config["model"], config["acme_rounding"]) == ("acme", "acme-net", 6)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        weights = json.loads(line)["weights"]
        assert list(weights.values()) == pytest.approx([0.25] * 4)  # FedAvg would weigh by sample count


def test_a_plugin_declares_its_options_next_to_it(plugin_path: Path, tmp_path: Path) -> None:
    """The plug-in's option key is listed, set by ``--set``, checked by the plug-in's own dataclass, recorded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(SRC)]), "COLUMNS": "200"}
    listed = subprocess.run(
        [sys.executable, "-m", "spmc", "list", "--options"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and "acme_rounding" in listed.stdout
    assert "digits of the weights in the diagnostics" in listed.stdout  # its description, not only its default
    base = [sys.executable, "-m", "spmc", "run", "--preset", "smoke", "--defense", "acme", "-q"]
    bad = subprocess.run([*base, "--set", "acme_rounding=13"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: invalid configuration: acme_rounding: got 13; allowed: 0 … 12"
    ), bad.stderr[-500:]
    out = tmp_path / "run"
    good = subprocess.run(
        [*base, "--set", "acme_rounding=3", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["acme_rounding"] == 3


def test_the_guide_example_defense_registers_and_passes_its_own_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = GUIDE.read_text()
    blocks = re.findall(r"```(python|toml)\n(.*?)```", text, flags=re.S)
    defense = next(code for lang, code in blocks if lang == "python" and "class NormClipMean" in code)
    unit_tests = next(code for lang, code in blocks if lang == "python" and "def test_clip_factors" in code)
    project = tomllib.loads(next(code for lang, code in blocks if lang == "toml" and "[project]" in code))
    package = tmp_path / "spmc_normclip"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "defense.py").write_text(defense)
    info = tmp_path / "spmc_normclip-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['project']['name']}\nVersion: 0.1.0\n")
    groups = project["project"]["entry-points"]
    (info / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items())
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "spmc_normclip", raising=False)
    monkeypatch.delitem(sys.modules, "spmc_normclip.defense", raising=False)
    registry = dict(DEFENSES)
    assert load_entry_points("spmc.defenses", registry, DEFENSE) == ["normclip"]
    namespace: dict[str, object] = {}
    exec(compile(unit_tests, str(GUIDE), "exec"), namespace)  # noqa: S102
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert len(tests) == 2
    for test in tests:
        test()


def test_the_guide_example_attack_crafts_with_its_option() -> None:
    from spmc.attacks import CraftingInputs

    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    code = next(block for block in blocks if "class Boost(Attack)" in block)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102
    boost = namespace["Boost"](options=namespace["BoostOptions"](3.0))
    g = torch.tensor([1.0, 1.0])
    attackers = torch.tensor([[2.0, 0.0]])
    inputs = CraftingInputs(0, g, attackers, (9,), torch.zeros(0, 2), ())
    assert boost.craft(inputs).tolist() == [[4.0, -2.0]]
    with pytest.raises(ValueError, match="boost_factor: got -1.0"):
        namespace["BoostOptions"](-1.0)
