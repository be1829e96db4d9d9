"""Every defense declares its options next to it (issue 12 §2): the flat keys and defaults of today's configuration,
precise types, and a ``__post_init__`` that refuses what the configuration refuses, naming the key."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from spmc.cli import main
from spmc.config import Experiment, build_defense, resolve, threat_model
from spmc.defenses import DEFENSES
from spmc.options import build_method, merged_specs, option_specs, options_from
from spmc.threat import ThreatModel

X = "exclude_int_buffers"

#: Each built-in defense's configuration keys and defaults, as the configuration had them before issue 12.
EXPECTED: dict[str, dict[str, Any]] = {
    "fedavg": {"fedavg_weighting": "uniform"},
    "spmc": {
        "spmc_temperature": 1.0,
        "spmc_weight_fn": "softmax",
        "spmc_score_ref": "loo",
        "spmc_score_space": "params",
        "spmc_loo_prior": "uniform",
        "spmc_score_eps": 1e-5,
    },
    "dnc": {
        "dnc_filter_frac": 0.5,
        "dnc_niters": 1,
        "dnc_subdim": 10_000,
        "dnc_normalize": True,
        "dnc_combine": "union",
        X: True,
    },
    "sageflow": {"sageflow_eth": 2.0, "sageflow_delta": 1.0, "sageflow_size_weight": False},
    "bulyan": {"bulyan_f": 1, X: True},
    "rfa": {"rfa_layerwise": True, "rfa_maxiter": 3, "rfa_eps": 1e-5, "rfa_ftol": 1e-6, X: True},
    "rlr": {"rlr_threshold": 4.0, "rlr_server_lr": 1.0},
    "crfl": {
        "rounds": 50,
        "crfl_clip_cap": 100.0,
        "crfl_clip_slope": 5.0,
        "crfl_clip_bias": 30.0,
        "crfl_sigma": 1e-4,
        "crfl_scale": 1.0,
    },
    "foolsgold": {"foolsgold_norm_eps": 0.1, "foolsgold_kappa": 1.0, "foolsgold_normalize_weights": True},
    "rsa": {"rsa_alpha": 0.05, "rsa_lambda": 0.1, "rsa_wd": 0.001, "rsa_clip": 3.0, "rsa_update_bn_buffers": True},
    "finetuning": {"finetune_epochs": 1, "finetune_broadcast": False},
    "krum": {"krum_f": None, X: True},
    "multikrum": {"krum_f": None, "multikrum_select": None, X: True},
    "trimmed_mean": {"trimmed_mean_k": None, "tm_mode": "trim_extremes", X: True},
    "median": {X: True},
    "fltrust": {"fltrust_public_epochs": 10, X: True},
    "fedcpa": {"fedcpa_top_rate": 0.5},
}

#: (defense, key, a value the configuration refused before issue 12): every ge/gt/le bound of its Field, every
#: Literal, and the checks that hold for every field (strict types, finite floats, integers within a C int).
BAD: list[tuple[str, str, Any]] = [
    ("fedavg", "fedavg_weighting", "size"),
    ("spmc", "spmc_temperature", 0.0),  # gt 0
    ("spmc", "spmc_temperature", -1.0),
    ("spmc", "spmc_score_eps", -1e-9),  # ge 0
    ("spmc", "spmc_weight_fn", "relu"),
    ("spmc", "spmc_score_ref", "best"),
    ("spmc", "spmc_score_space", "grads"),
    ("spmc", "spmc_loo_prior", "none"),
    ("dnc", "dnc_filter_frac", -0.1),  # ge 0
    ("dnc", "dnc_niters", 0),  # ge 1
    ("dnc", "dnc_subdim", 0),  # ge 1
    ("dnc", "dnc_combine", "both"),
    ("sageflow", "sageflow_eth", 0.0),  # gt 0
    ("sageflow", "sageflow_delta", -1.0),  # ge 0
    ("bulyan", "bulyan_f", -1),  # ge 0
    ("rfa", "rfa_maxiter", 0),  # ge 1
    ("rfa", "rfa_eps", 0.0),  # gt 0
    ("rfa", "rfa_ftol", -1e-9),  # ge 0
    ("rlr", "rlr_threshold", -0.5),  # ge 0
    ("rlr", "rlr_server_lr", 0.0),  # gt 0
    ("crfl", "rounds", 0),  # gt 0
    ("crfl", "crfl_clip_cap", 0.0),  # gt 0
    ("crfl", "crfl_clip_slope", -1.0),  # ge 0
    ("crfl", "crfl_clip_bias", 0.0),  # gt 0
    ("crfl", "crfl_sigma", -1e-4),  # ge 0
    ("crfl", "crfl_scale", 0.0),  # gt 0
    ("foolsgold", "foolsgold_norm_eps", -0.1),  # ge 0
    ("foolsgold", "foolsgold_kappa", 0.0),  # gt 0
    ("rsa", "rsa_alpha", 0.0),  # gt 0
    ("rsa", "rsa_lambda", -0.1),  # ge 0
    ("rsa", "rsa_wd", -0.001),  # ge 0
    ("rsa", "rsa_clip", 0.0),  # gt 0
    ("finetuning", "finetune_epochs", -1),  # ge 0
    ("krum", "krum_f", -1),  # ge 0
    ("multikrum", "krum_f", -1),  # ge 0
    ("multikrum", "multikrum_select", 0),  # ge 1
    ("trimmed_mean", "trimmed_mean_k", -1),  # ge 0
    ("trimmed_mean", "tm_mode", "winsorize"),
    ("fltrust", "fltrust_public_epochs", 0),  # ge 1
    ("fedcpa", "fedcpa_top_rate", 0.0),  # gt 0
    ("fedcpa", "fedcpa_top_rate", 1.5),  # le 1
    # every field: strict types, finite floats, integers within a C int, None only where allowed
    ("krum", "krum_f", 2**31),
    ("dnc", "dnc_subdim", 2**31),
    ("bulyan", "bulyan_f", True),
    ("dnc", "dnc_niters", 1.0),
    ("rlr", "rlr_threshold", "4"),
    ("rlr", "rlr_server_lr", math.inf),
    ("crfl", "crfl_sigma", math.nan),
    ("spmc", "spmc_temperature", math.nan),
    ("spmc", "spmc_score_eps", math.inf),
    ("sageflow", "sageflow_eth", None),
    ("fedcpa", "fedcpa_top_rate", True),
    ("dnc", "dnc_normalize", 1),
    ("rsa", "rsa_update_bn_buffers", "yes"),
    ("median", X, "false"),
    ("krum", X, None),
]


def _options_type(name: str) -> type[Any]:
    options_type = getattr(DEFENSES[name], "options_type", None)
    assert options_type is not None, f"{name} declares no options_type"
    return typing.cast("type[Any]", options_type)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_option_specs_are_todays_keys_and_defaults(name: str) -> None:
    specs = option_specs(_options_type(name))
    assert {s.key: s.default for s in specs} == EXPECTED[name]
    for s in specs:
        assert s.help and "\n" not in s.help and "ALGORITHMS.md" in s.help, s


def test_every_registered_builtin_is_covered() -> None:
    builtin = {name for name, cls in DEFENSES.items() if cls.__module__.startswith("spmc.defenses.")}
    assert builtin == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_type_hints_resolve_and_match_the_configuration(name: str) -> None:
    options_type = _options_type(name)
    typing.get_type_hints(options_type)
    for s in option_specs(options_type):
        assert s.annotation == Experiment.model_fields[s.key].annotation, s.key
        assert s.default == Experiment.model_fields[s.key].default, s.key


def test_shared_keys_are_consistent() -> None:
    types = [_options_type(name) for name in sorted(EXPECTED)]
    merged = merged_specs(types, reserved={X, "rounds"})
    expected_keys = {k for keys in EXPECTED.values() for k in keys} - {X, "rounds"}
    assert set(merged) == expected_keys
    # krum_f: one declaration, same help, in Krum and Multi-Krum
    krum = {s.key: s for s in option_specs(_options_type("krum"))}
    multikrum = {s.key: s for s in option_specs(_options_type("multikrum"))}
    assert (krum["krum_f"].annotation, krum["krum_f"].default, krum["krum_f"].help) == (
        multikrum["krum_f"].annotation,
        multikrum["krum_f"].default,
        multikrum["krum_f"].help,
    )
    helps = {s.help for t in types for s in option_specs(t) if s.key == X}
    assert len(helps) == 1


@pytest.mark.parametrize(("name", "key", "bad"), BAD, ids=[f"{n}-{k}-{v!r}" for n, k, v in BAD])
def test_bad_value_is_refused_naming_the_key(name: str, key: str, bad: Any) -> None:
    with pytest.raises(ValueError) as err:
        options_from(_options_type(name), {key: bad})
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    assert repr(bad) in message


@pytest.mark.parametrize(("name", "key", "bad"), BAD, ids=[f"{n}-{k}-{v!r}" for n, k, v in BAD])
def test_bad_values_are_also_refused_by_the_configuration(name: str, key: str, bad: Any) -> None:
    # guards the BAD list itself: each pair is a value the configuration refuses
    with pytest.raises(ValidationError):
        Experiment(**{key: bad})


def test_spmc_global_score_needs_params() -> None:
    with pytest.raises(ValueError, match="spmc_score_ref.*spmc_score_space"):
        options_from(_options_type("spmc"), {"spmc_score_ref": "global", "spmc_score_space": "updates"})
    assert options_from(_options_type("spmc"), {"spmc_score_ref": "global"}).score_ref == "global"


#: Boundary values the configuration accepts: the options accept them too.
GOOD: list[tuple[str, str, Any]] = [
    ("spmc", "spmc_score_eps", 0.0),
    ("dnc", "dnc_filter_frac", 0),
    ("dnc", "dnc_subdim", 1),
    ("sageflow", "sageflow_delta", 0.0),
    ("bulyan", "bulyan_f", 0),
    ("rfa", "rfa_ftol", 0.0),
    ("rlr", "rlr_threshold", 0.0),
    ("crfl", "rounds", 1),
    ("crfl", "crfl_sigma", 0.0),
    ("finetuning", "finetune_epochs", 0),
    ("krum", "krum_f", 2**31 - 1),
    ("multikrum", "multikrum_select", 1),
    ("trimmed_mean", "trimmed_mean_k", 0),
    ("fltrust", "fltrust_public_epochs", 1),
    ("fedcpa", "fedcpa_top_rate", 1.0),
    ("fedcpa", "fedcpa_top_rate", 1),
]


@pytest.mark.parametrize(("name", "key", "good"), GOOD, ids=[f"{n}-{k}-{v!r}" for n, k, v in GOOD])
def test_boundary_values_are_accepted(name: str, key: str, good: Any) -> None:
    options = options_from(_options_type(name), {key: good})
    spec = next(s for s in option_specs(_options_type(name)) if s.key == key)
    assert getattr(options, spec.name) == good
    Experiment(**{key: good})


NUMERIC_KEYS = sorted(
    {(name, s.key) for name in EXPECTED for s in option_specs(_options_type(name)) if s.key != X}
    - {(name, k) for name, keys in EXPECTED.items() for k, v in keys.items() if isinstance(v, (bool, str))}
)
VALUES = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(-1e6, 1e6),
    st.sampled_from([math.nan, math.inf, -math.inf, None, True, False, "1", 2**31 - 1, 2**31, -(2**31)]),
)


@settings(max_examples=200, deadline=None)
@given(pair=st.sampled_from(NUMERIC_KEYS), value=VALUES)
def test_options_refuse_exactly_what_the_configuration_refuses(pair: tuple[str, str], value: Any) -> None:
    name, key = pair
    try:
        Experiment(**{key: value})
        config_ok = True
    except ValidationError:
        config_ok = False
    try:
        options_from(_options_type(name), {key: value})
        options_ok = True
    except ValueError as err:
        assert str(err).startswith(f"{key}: ")
        options_ok = False
    assert options_ok == config_ok, (key, value)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_method_builds_each_defense(name: str) -> None:
    cls = DEFENSES[name]
    defense = build_method(cls, {}, threat=ThreatModel(num_clients=10, gamma=0.3))
    assert isinstance(defense, cls)
    assert defense.options == _options_type(name)()


def test_build_method_equals_build_defense_with_non_default_values() -> None:
    values: dict[str, Any] = {
        "exclude_int_buffers": False,
        "rounds": 7,
        "fedavg_weighting": "samples",
        "dnc_filter_frac": 0.7,
        "dnc_niters": 2,
        "dnc_combine": "intersection",
        "sageflow_size_weight": True,
        "bulyan_f": 0,
        "rfa_maxiter": 4,
        "rlr_threshold": 2.0,
        "crfl_sigma": 0.0,
        "foolsgold_kappa": 2.0,
        "rsa_lambda": 0.2,
        "finetune_epochs": 3,
        "krum_f": 1,
        "multikrum_select": 2,
        "trimmed_mean_k": 1,
        "tm_mode": "closest_to_median",
        "fltrust_public_epochs": 2,
        "fedcpa_top_rate": 0.3,
        "spmc_temperature": 0.5,
        "spmc_score_space": "updates",
    }
    for name in sorted(EXPECTED):
        cfg = Experiment(defense=name, **values)
        built = build_method(DEFENSES[name], cfg, threat=threat_model(cfg))
        assert built.options == build_defense(cfg).options, name
        for key, value in EXPECTED[name].items():
            spec = next(s for s in option_specs(_options_type(name)) if s.key == key)
            assert getattr(built.options, spec.name) == values.get(key, value), (name, key)


#: ``--set KEY=VALUE`` pairs the command line refuses (exit 2, before a run directory exists), naming the key.
CLI_BAD = [
    ("krum", "krum_f=-1"),
    ("multikrum", "multikrum_select=0"),
    ("dnc", "dnc_subdim=0"),
    ("dnc", 'dnc_combine="both"'),
    ("fedcpa", "fedcpa_top_rate=1.5"),
    ("spmc", "spmc_temperature=NaN"),
    ("rlr", "rlr_server_lr=Infinity"),
    ("crfl", "crfl_sigma=-0.1"),
    ("bulyan", "bulyan_f=true"),
    ("trimmed_mean", "tm_mode=winsorize"),
]


@pytest.mark.parametrize(("defense", "item"), CLI_BAD)
def test_cli_refuses_a_bad_defense_option_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], defense: str, item: str
) -> None:
    out = tmp_path / "run"
    code = main(["run", "-q", "--preset", "smoke", "--defense", defense, "--out", str(out), "--set", item])
    assert code == 2
    printed = capsys.readouterr()
    key = item.partition("=")[0]
    assert f"{key}: got" in printed.out + printed.err
    assert not out.exists()


def test_toml_keys_of_today_still_configure_the_defenses(tmp_path: Path) -> None:
    f = tmp_path / "exp.toml"
    f.write_text(
        'defense = "multikrum"\nnum_clients = 8\nkrum_f = 1\nmultikrum_select = 2\nexclude_int_buffers = false\n'
        'tm_mode = "closest_to_median"\ndnc_combine = "intersection"\nrounds = 3\ncrfl_sigma = 0.0\n'
    )
    cfg = resolve("smoke", f)
    multikrum = build_defense(cfg)
    assert multikrum.options == _options_type("multikrum")(f=1, select=2, exclude_int_buffers=False)
    threat = threat_model(cfg)
    assert build_method(DEFENSES["trimmed_mean"], cfg, threat=threat).options.mode == "closest_to_median"
    assert build_method(DEFENSES["dnc"], cfg, threat=threat).options.combine == "intersection"
    crfl = build_method(DEFENSES["crfl"], cfg, threat=threat).options
    assert (crfl.rounds, crfl.sigma) == (3, 0.0)
