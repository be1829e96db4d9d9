"""``dba`` (ATTACKS.md §A3): four local triggers, attacker rank i writes part i mod 4, ASR on the global trigger."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from spmc import make_experiment
from spmc.attacks import ATTACKS, TRIGGER_COLS, TRIGGER_ROWS, AttackSettings
from spmc.attacks.dba import DBA, SPLITS, DBAOptions, local_trigger
from spmc.federation import Federation
from spmc.threat import ThreatModel

from ._helpers import SMALL, asr_on, run

GLOBAL = {(r, c) for r in TRIGGER_ROWS for c in TRIGGER_COLS}


def test_the_four_parts_cover_the_global_trigger_exactly_once() -> None:
    parts = SPLITS[4]
    assert parts == (
        ((0, 0), (0, 1), (0, 2)),
        ((0, 4), (0, 5), (0, 6)),
        ((2, 0), (2, 1), (2, 2)),
        ((2, 4), (2, 5), (2, 6)),
    )
    counts = Counter(e for part in parts for e in part)
    assert set(counts) == GLOBAL and set(counts.values()) == {1}
    for n in SPLITS:
        assert Counter(e for part in SPLITS[n] for e in part) == Counter(GLOBAL)


@pytest.mark.parametrize("rank", range(9))
def test_attacker_rank_i_writes_part_i_mod_4(rank: int) -> None:
    attack = ATTACKS["dba"](AttackSettings(target=2, values=((0, 7.0),)), None, ThreatModel())
    x = torch.zeros(2, 3, 4, 8)
    xb, yb = attack.poison_for(rank, x, torch.tensor([0, 1]), torch.tensor([True, False]))
    written = {(int(r), int(c)) for r, c in (xb[0, 0] == 7.0).nonzero()}
    assert written == set(local_trigger(4, rank)) == set(SPLITS[4][rank % 4])
    assert float(xb[0, 1:].abs().sum()) == 0.0 and float(xb[1].abs().sum()) == 0.0
    assert yb.tolist() == [2, 1]


def test_test_set_uses_the_global_trigger() -> None:
    attack = DBA(AttackSettings(target=0, values=((1, 3.0),)), DBAOptions())
    x = torch.zeros(3, 3, 4, 8)
    xb, yb, not_target = attack.test_set(x, torch.tensor([0, 4, 5]))
    assert {(int(r), int(c)) for r, c in (xb[0, 1] == 3.0).nonzero()} == GLOBAL
    assert float(x.abs().sum()) == 0.0 and yb.tolist() == [0, 0, 0] and not_target.tolist() == [False, True, True]


def test_dba_parts_is_validated() -> None:
    with pytest.raises(ValueError, match="dba_parts: got 3; allowed: 1, 2, 4"):
        DBAOptions(parts=3)


def test_the_federation_gives_each_attacker_its_rank() -> None:
    fed = Federation.build(make_experiment(**{**SMALL, "attack": "dba", "num_clients": 8, "poison_rate": 1.0}))
    assert fed.data.malicious == (4, 5, 6, 7)
    value = fed.attack.data.settings.trigger[0]
    for rank, k in enumerate(fed.data.malicious):
        x = fed.data.clients[k].x  # static augmentation: the poisoned inputs, triggered at part rank
        r, c = zip(*SPLITS[4][rank])
        assert bool((x[:, 0, list(r), list(c)] == value).all())
        others = [e for e in GLOBAL if e not in SPLITS[4][rank]]
        ro, co = zip(*others)
        assert not bool((x[:, 0, list(ro), list(co)] == value).all(dim=1).any())


def test_a_run_learns_the_global_trigger() -> None:
    attacked, _ = run("dba")
    clean, _ = run("none")
    assert asr_on(attacked, attacked) > asr_on(clean, attacked) + 20.0
