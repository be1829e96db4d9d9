"""The threat model (spmc/threat.py): the one ⌊γK⌋ rule, used alike by the configuration, the attacks and DnC."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spmc.attacks import malicious_ids
from spmc.config import make_experiment, threat_model
from spmc.defenses.dnc import num_removed
from spmc.threat import ThreatModel, num_attackers, resolve_count


def test_num_attackers_by_hand() -> None:
    assert [num_attackers(g, 10) for g in (0.0, 0.1, 0.2, 0.29, 0.3, 0.5, 0.99)] == [0, 1, 2, 2, 3, 5, 9]
    assert num_attackers(0.25, 4) == 1 and num_attackers(0.1, 9) == 0 and num_attackers(0.7, 10) == 7


@given(percent=st.integers(0, 99), clients=st.integers(1, 500))
def test_num_attackers_is_the_exact_floor_of_a_decimal_gamma(percent: int, clients: int) -> None:
    """γ = percent/100 in floating point: ⌊γK⌋ equals the exact integer floor (0.29·100 = 28.999… gives 29)."""
    assert num_attackers(percent / 100, clients) == percent * clients // 100


@given(percent=st.integers(0, 99), clients=st.integers(1, 60), attack=st.sampled_from(["base", "semantic", "none"]))
def test_config_attacks_and_threat_model_agree(percent: int, clients: int, attack: str) -> None:
    gamma = percent / 100
    cfg = make_experiment(
        dataset="synthetic", num_clients=clients, gamma=gamma, attack=attack, min_client_size=0, drop_last=False
    )
    threat = threat_model(cfg)
    m = 0 if attack == "none" else percent * clients // 100
    assert cfg.num_malicious == threat.expected_attackers == m
    assert cfg.malicious_ids == threat.malicious_ids == (malicious_ids(clients, gamma) if m else ())
    assert num_removed(clients, gamma, 1.0) == percent * clients // 100  # DnC's m̂ = ⌊γn⌋, attack or not


def test_threat_model_defaults_are_the_default_experiment() -> None:
    assert threat_model(make_experiment()) == ThreatModel()
    assert ThreatModel().expected_attackers == 3 and ThreatModel(attack_active=False).expected_attackers == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients: got 0; must be an integer >= 1"),
        ({"num_clients": True}, "num_clients: got True; must be an integer >= 1"),
        ({"gamma": 1.0}, r"gamma: got 1.0; must be a fraction in \[0, 1\)"),
        ({"gamma": float("nan")}, r"gamma: got nan; must be a fraction in \[0, 1\)"),
        ({"seed": -1}, "seed: got -1; must be an integer >= 0"),
    ],
)
def test_threat_model_refuses_bad_values_in_one_line(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        ThreatModel(**kwargs)  # type: ignore[arg-type]


def test_resolve_count() -> None:
    assert resolve_count(2, ThreatModel(gamma=0.5)) == 2
    assert resolve_count(None, ThreatModel(gamma=0.5)) == 5
    assert resolve_count(None, ThreatModel(gamma=0.5, attack_active=False)) == 0
    assert resolve_count(None, None) == 3
