"""Bucketing (Karimireddy et al., ICLR 2022; ATTACKS.md §A6): s = 1 is the base rule, bucket means by hand, weights
and accepted ids mapped back to the clients, the base's state and checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses import Defense, Stateful
from spmc.defenses.base import round_generator
from spmc.defenses.bucketing import Bucketing, BucketingOptions, bucket_inputs, make_buckets
from spmc.defenses.centered_clip import CenteredClip, CenteredClipOptions
from spmc.defenses.krum import Krum, KrumOptions
from spmc.defenses.median import Median

from ._helpers import BN, LINEAR, make_inputs

BASES: dict[str, Callable[[], Defense]] = {
    "median": Median,
    "krum": lambda: Krum(KrumOptions(f=1)),
    "centered_clip": lambda: CenteredClip(CenteredClipOptions(tau=0.5)),
}


def _states(n: int, seed: int = 0, dim: int = LINEAR.dim) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(BASES))
def test_bucket_size_one_is_the_base_rule_on_the_clients_in_id_order(name: str) -> None:
    ids = (3, 8, 11, 20, 21, 40)
    states = _states(6, 1, BN.dim)
    perm = [4, 0, 5, 2, 1, 3]
    bucketed = Bucketing(BucketingOptions(size=1, base=name), base=BASES[name]())
    reference = BASES[name]()
    for _ in range(2):  # twice: a stateful base (centered_clip) carries its centre into the second round
        a = bucketed.aggregate(make_inputs(states[perm], tuple(ids[i] for i in perm), layout=BN))
        b = reference.aggregate(make_inputs(states, ids, layout=BN))
        assert torch.equal(a.global_state, b.global_state)
        assert a.accepted is not None and b.accepted is not None
        assert sorted(a.accepted) == sorted(b.accepted)
        if b.weights is not None:
            assert a.weights is not None
            assert dict(zip([ids[i] for i in perm], a.weights.tolist())) == dict(zip(ids, b.weights.tolist()))


def test_buckets_are_pinned_and_ignore_the_client_order() -> None:
    # seed 0, round 0: the permutation of the ids (10, …, 14) gives the buckets {10, 14}, {11, 13}, {12}
    for ids in [(10, 11, 12, 13, 14), (13, 10, 12, 11, 14)]:
        buckets = make_buckets(ids, 2, round_generator(0, 0))
        assert [sorted(ids[i] for i in b) for b in buckets] == [[10, 14], [11, 13], [12]]
    other_round = make_buckets((10, 11, 12, 13, 14), 2, round_generator(0, 1))
    assert sorted(len(b) for b in other_round) == [1, 2, 2]


def test_bucket_means_by_hand() -> None:
    states = torch.tensor([[0.0, 0, 0], [2, 4, 6], [1, 1, 1], [3, 5, 7]])
    inputs = make_inputs(states, (5, 6, 7, 8), global_state=torch.zeros(3))
    pseudo = bucket_inputs(inputs, [[1, 3], [0, 2]])
    assert pseudo.client_ids == (6, 5)
    assert pseudo.client_states.tolist() == [[2.5, 4.5, 6.5], [0.5, 0.5, 0.5]]
    assert pseudo.num_samples.tolist() == [2.0, 2.0]


def test_size_two_with_krum_maps_weights_and_accepted_back_to_clients() -> None:
    # six clients: four near 0, two far apart (4 and 5)
    states = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1], [50, 0, 0], [0, -80, 0]])
    ids = (0, 1, 2, 3, 4, 5)
    buckets = make_buckets(ids, 2, round_generator(0, 0))
    agg = Bucketing(BucketingOptions(size=2, base="krum"), base=Krum(KrumOptions(f=0))).aggregate(
        make_inputs(states, ids)
    )
    members = {min(b): sorted(b) for b in buckets}
    chosen = agg.diagnostics["base"]["removed"]
    (kept_pseudo,) = [p for p in members if p not in chosen]
    kept = members[kept_pseudo]
    assert kept == [0, 3]  # the buckets are {0, 3}, {1, 4}, {2, 5}: the only one without a far client
    assert agg.accepted == tuple(kept)
    assert agg.weights is not None
    assert agg.weights.tolist() == [0.5 if k in kept else 0.0 for k in ids]
    assert torch.allclose(agg.global_state, states[kept].mean(0))
    assert agg.diagnostics["buckets"] == {str(p): m for p, m in members.items()}
    assert agg.diagnostics["removed"] == [k for k in ids if k not in kept]


def test_stateful_base_state_is_bucketings() -> None:
    bucketed = Bucketing(BucketingOptions(base="centered_clip"))
    assert isinstance(bucketed, Stateful) and bucketed.state_dict() == {}
    bucketed.aggregate(make_inputs(_states(6)))
    state = bucketed.state_dict()
    assert list(state) == [-1]
    again = Bucketing(BucketingOptions(base="centered_clip"))
    again.load_state_dict({str(k): v for k, v in state.items()})
    assert torch.equal(again.state_dict()[-1], state[-1])
    with pytest.raises(ValueError, match="keeps no state"):
        Bucketing().load_state_dict({-1: torch.zeros(3)})
    Bucketing().load_state_dict({})


def test_options_base_and_client_checks() -> None:
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="bucket_size"):
            BucketingOptions(size=bad)
    for bad_base in ("bucketing", "fltrust", "nope"):
        with pytest.raises(ValueError, match="bucketing_base"):
            BucketingOptions(base=bad_base)
    with pytest.raises(ValueError, match="bucketing_base"):
        Bucketing(BucketingOptions(base="median"), base=Krum())
    bucketed = Bucketing(BucketingOptions(size=2, base="krum"), base=Krum(KrumOptions(f=1)))
    bucketed.check_clients(10)  # 5 buckets > 2f + 2
    with pytest.raises(ValueError, match="n = 3"):
        bucketed.check_clients(6)  # 3 buckets


def test_config_builds_bucketing_with_its_base() -> None:
    defense = build_defense(make_experiment(defense="bucketing", bucket_size=3, bucketing_base="rfa"))
    assert isinstance(defense, Bucketing)
    assert defense.options.size == 3 and defense.base.defense.name == "rfa"
    assert build_defense(make_experiment(defense="bucketing")).base.defense.name == "median"


def test_the_base_rule_reads_its_options_from_the_configuration_values() -> None:
    bucketed = Bucketing(BucketingOptions(base="centered_clip"), config={"cc_tau": 3.0, "cc_iters": 2})
    base = bucketed.base.defense
    assert isinstance(base, CenteredClip) and (base.options.tau, base.options.iters) == (3.0, 2)
    cfg = make_experiment(defense="bucketing", bucketing_base="centered_clip", cc_tau=0.25)
    from_cfg = Bucketing(BucketingOptions(base="centered_clip"), config=cfg).base.defense
    assert isinstance(from_cfg, CenteredClip) and from_cfg.options.tau == 0.25
