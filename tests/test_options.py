"""A method's options declared next to it (spmc.options) and composed into the flat configuration (spmc.config)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import pytest
from pydantic import Field
from pydantic.fields import FieldInfo

from spmc.config import Experiment, ExperimentCore, experiment_model, method_option_types
from spmc.options import build_method, merged_specs, option, option_specs, options_from
from spmc.threat import ThreatModel


@dataclass(frozen=True)
class WidgetOptions:
    """A test method's options: a bounded float, a Literal, an optional count and a field that is not a key."""

    width: float = option(1.5, "widget_width", "widget width in metres, > 0")
    mode: Literal["a", "b"] = option("a", "widget_mode", "a or b")
    count: int | None = option(None, "widget_count", "how many; None = m")
    internal: int = 7

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"widget_width: got {self.width!r}; must be > 0")
        if self.count is not None and self.count < 0:
            raise ValueError(f"widget_count: got {self.count!r}; must be >= 0 or None")


@dataclass(frozen=True)
class GadgetOptions:
    """Shares ``widget_width`` with the widget (same type and default) and reuses a core key."""

    width: float = option(1.5, "widget_width", "widget width in metres, > 0")
    exclude: bool = option(True, "exclude_int_buffers", "leave integer counters out")


@dataclass(frozen=True)
class ClashOptions:
    width: float = option(2.0, "widget_width", "another default")


class Widget:
    options_type: ClassVar[type[WidgetOptions]] = WidgetOptions

    def __init__(self, options: WidgetOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options
        self.threat = threat


class Plain:
    def __init__(self) -> None:
        self.built = True


Model = experiment_model([WidgetOptions, GadgetOptions], name="WidgetExperiment")


def test_option_specs_read_key_type_default_and_help() -> None:
    specs = {s.key: s for s in option_specs(WidgetOptions)}
    assert set(specs) == {"widget_width", "widget_mode", "widget_count"}  # ``internal`` is not a key
    assert (specs["widget_width"].name, specs["widget_width"].annotation, specs["widget_width"].default) == (
        "width",
        float,
        1.5,
    )
    assert specs["widget_mode"].annotation == Literal["a", "b"]
    assert specs["widget_count"].help == "how many; None = m"
    assert specs["widget_count"].owner == "WidgetOptions"


def test_options_from_maps_keys_to_fields_and_keeps_defaults() -> None:
    opts = options_from(WidgetOptions, {"widget_width": 3.0, "unrelated": 1})
    assert opts == WidgetOptions(width=3.0)
    with pytest.raises(ValueError, match="widget_width: got -1.0"):
        options_from(WidgetOptions, {"widget_width": -1.0})


def test_build_method_passes_options_and_only_the_context_the_constructor_takes() -> None:
    threat = ThreatModel(num_clients=5, gamma=0.2)
    widget = build_method(Widget, {"widget_count": 2}, threat=threat, settings="ignored")
    assert widget.options == WidgetOptions(count=2) and widget.threat is threat
    assert build_method(Plain, {}, threat=threat).built


def test_a_shared_key_is_one_field_a_core_key_stays_the_cores() -> None:
    specs = merged_specs([WidgetOptions, GadgetOptions], reserved=ExperimentCore.model_fields)
    assert set(specs) == {"widget_width", "widget_mode", "widget_count"}
    with pytest.raises(TypeError, match="widget_width.*ClashOptions.*WidgetOptions"):
        merged_specs([WidgetOptions, ClashOptions])


def test_generated_fields_are_typed_strictly_with_defaults_and_descriptions() -> None:
    cfg = Model(widget_width=2, widget_mode="b")
    assert (cfg.widget_width, cfg.widget_mode, cfg.widget_count) == (2, "b", None)  # type: ignore[attr-defined]
    assert Model.model_fields["widget_width"].description == "widget width in metres, > 0"
    for bad in ({"widget_width": "2"}, {"widget_mode": "c"}, {"widget_count": True}, {"widget_width": float("nan")}):
        with pytest.raises(ValueError):
            Model(**bad)


def test_the_options_own_checks_run_in_validation_with_one_line_per_problem() -> None:
    with pytest.raises(ValueError) as err:
        Model(widget_width=-1.0, widget_count=-2)
    text = str(err.value)
    assert "widget_width: got -1.0; must be > 0" in text
    assert "widget_count: got -2; must be >= 0 or None" not in text  # the first failing check of one class
    with pytest.raises(ValueError, match="widget_count: got -2"):
        Model(widget_count=-2)


def test_a_clashing_options_class_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model = experiment_model([WidgetOptions, ClashOptions], name="ClashExperiment")
    assert model.option_types == (WidgetOptions,)
    assert model.model_fields["widget_width"].default == 1.5
    assert "options of ClashOptions are ignored" in caplog.text


def test_every_registered_method_option_is_a_field_of_the_experiment() -> None:
    for options_type in method_option_types():
        for spec in option_specs(options_type):
            field = Experiment.model_fields[spec.key]
            assert field.default == spec.default, spec.key
    assert set(Experiment.option_types) == set(method_option_types())  # none skipped


def test_list_options_filters_by_name_and_every_option_is_described(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from spmc import cli

    monkeypatch.setattr(cli, "console", Console(width=400))
    assert cli.main(["list", "--options", "spmc_"]) == 0
    out = capsys.readouterr().out
    names = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert names and all("spmc_" in n for n in names) and "spmc_temperature" in names and "krum_f" not in names
    assert cli.main(["list", "--options", "no_such_thing"]) == 2
    assert "--options: no option name contains 'no_such_thing'" in capsys.readouterr().err
    undescribed = [n for n, f in Experiment.model_fields.items() if not f.description]
    assert undescribed == []


#: Where an option comes from: a section of the spec (ALGORITHMS.md §x, Dn; ATTACKS.md §Ax), a published paper
#: (venue or year), a page of docs/, or "not in the spec" for the options of this implementation alone.
SOURCE = re.compile(
    r"§|\bD\d+\b|ATTACKS\.md|ALGORITHMS\.md|docs/|not in the spec|\b(19|20)\d\d\b|'\d\d\b|"
    r"NDSS|ICML|KDD|ICCV|ICLR|NeurIPS|AAAI|RAID|ICDCS|USENIX|UAI"
)
#: A unit, a range or the allowed values of a number or a name.
ALLOWED = re.compile(r">=|<=|>|<|≥|≤|…|\bin [\[(]|integer|%|one of|registry|free text|None|true|false")


def option_problems(name: str, field: Any) -> list[str]:
    """What the ``spmc list --options`` line of one option lacks: one line; a source; for a Literal every
    allowed value; for a number or a name its unit, range or allowed values (a bool's are true/false)."""
    text = field.description or ""
    problems = []
    if not text.strip() or "\n" in text:
        problems.append("not one non-empty line")
    if not SOURCE.search(text):
        problems.append("no source (spec section, paper, docs/ page or 'not in the spec')")
    literals = [
        v for a in (field.annotation, *get_args(field.annotation)) if get_origin(a) is Literal for v in get_args(a)
    ]
    missing = [str(v) for v in literals if str(v) not in text]
    if missing:
        problems.append(f"allowed values not named: {', '.join(missing)}")
    if not literals and field.annotation is not bool and not ALLOWED.search(text):
        problems.append("no unit, range or allowed values")
    return [f"{name}: {p} — {text!r}" for p in problems]


def test_every_option_has_one_line_with_its_allowed_values_and_its_source() -> None:
    """Every field of the configuration, core and method options alike (a plug-in's included, when one is
    installed): the rule of ``option_problems``."""
    assert len(Experiment.model_fields) > 100
    problems = [p for name, field in Experiment.model_fields.items() for p in option_problems(name, field)]
    assert problems == []


def test_the_rule_catches_an_option_that_shows_only_a_default() -> None:
    model = experiment_model([WidgetOptions], name="RuleExperiment")
    assert option_problems("widget_mode", model.model_fields["widget_mode"]) == [
        "widget_mode: no source (spec section, paper, docs/ page or 'not in the spec') — 'a or b'"
    ]
    bare = Field(1.0, description="")
    assert len(option_problems("bare", FieldInfo.merge_field_infos(bare, annotation=float))) == 3


def test_list_options_prints_each_description_and_default_on_one_row(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from spmc import cli

    monkeypatch.setattr(cli, "console", Console(width=1000))
    assert cli.main(["list", "--options"]) == 0
    rows = [line.split("│")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    listed = {name.strip(): desc.strip() for name, desc in rows}
    assert set(listed) == set(Experiment.model_fields)
    for name, field in Experiment.model_fields.items():
        assert listed[name] == f"{field.description} (default {field.default!r})", name


def test_an_unknown_option_names_the_closest_one_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from spmc import cli

    assert cli.main(["run", "--preset", "smoke", "--set", "spmc_temprature=0.1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "spmc_temprature: unknown option (value 0.1); did you mean 'spmc_temperature'?" in err
    assert cli.main(["run", "--preset", "smoke", "--set", "zzqqxx=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "zzqqxx: unknown option" in err and "did you mean" not in err
