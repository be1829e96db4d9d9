"""DeepSight (ATTACKS.md §A6): NEUPs and threshold exceedings by hand, a backdoor-like client (output energy on one
class) is labelled suspicious and its cluster dropped, DDifs on a tiny linear model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spmc.defenses.base import RoundInputs
from spmc.defenses.deepsight import (
    DeepSight,
    DeepSightOptions,
    cocluster_distances,
    ddifs,
    neups,
    output_layer,
    suspicious_labels,
    threshold_exceedings,
)
from spmc.defenses.server_data import ServerData
from spmc.params import ParamLayout

MODEL = nn.Linear(4, 5)  # 5 classes; weight [5, 4] then bias [5]
LAYOUT = ParamLayout.from_module(MODEL)


def _server() -> ServerData:
    return ServerData(
        x=torch.zeros(8, 4), y=torch.zeros(8, dtype=torch.long), transform=lambda x, g: x, model=MODEL, layout=LAYOUT
    )


def _inputs(states: torch.Tensor, glob: torch.Tensor, ids: tuple[int, ...]) -> RoundInputs:
    n = states.shape[0]
    return RoundInputs(glob, states, ids, torch.ones(n, dtype=torch.float64), LAYOUT, 1, _server())


def test_neups_and_threshold_exceedings_by_hand() -> None:
    # client 0: energies (|Δb| + Σ|ΔW|) = (2, 1, 1, 0, 0) → NEUP = (4, 1, 1, 0, 0)/6; ξ = max(0.01, 1/5) = 0.2,
    # threshold 0.2·4/6: classes 0, 1, 2 exceed → TE 3. Client 1: all energy on class 4 → TE 1.
    dw = torch.zeros(2, 5, 4)
    db = torch.zeros(2, 5)
    dw[0, 0, :2] = 1.0
    dw[0, 1, 0] = -1.0
    db[0, 2] = 1.0
    dw[1, 4] = 3.0
    neup = neups(dw, db)
    assert neup[0].tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6, 0, 0])
    assert neup[1].tolist() == pytest.approx([0, 0, 0, 0, 1])
    assert threshold_exceedings(neup).tolist() == [3, 1]
    assert neups(torch.zeros(1, 5, 4), None).tolist() == [[0.2] * 5]  # no energy: uniform
    assert suspicious_labels(torch.tensor([5, 5, 4, 2, 1])) == [False, False, False, True, True]  # median 4 → ≤ 2
    assert cocluster_distances([0, 0, -1, -1]).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]
    weight, bias = output_layer(LAYOUT)
    assert weight.name == "weight" and bias is not None and bias.name == "bias"


def test_ddifs_are_one_for_the_global_model_and_seeded() -> None:
    glob = LAYOUT.flatten(MODEL)
    other = glob + torch.randn(LAYOUT.dim, generator=torch.Generator().manual_seed(1))
    d = ddifs(_server(), torch.stack([glob, other]), glob, seeds=2, samples=16, seed=0)
    assert d.shape == (2, 2, 5)
    assert torch.allclose(d[:, 0], torch.ones(2, 5, dtype=torch.float64))
    assert not torch.allclose(d[:, 1], torch.ones(2, 5, dtype=torch.float64))
    assert torch.equal(d, ddifs(_server(), torch.stack([glob, other]), glob, seeds=2, samples=16, seed=0))


def test_backdoor_like_clients_are_suspicious_and_their_cluster_dropped() -> None:
    gen = torch.Generator().manual_seed(0)
    glob = LAYOUT.flatten(MODEL)
    benign = 0.1 * torch.randn(6, LAYOUT.dim, generator=gen)
    backdoor = 1e-4 * torch.randn(2, LAYOUT.dim, generator=gen)
    w = backdoor[:, :20].view(2, 5, 4)
    w[:, 3] += 0.5  # all output-layer energy on class 3, alike for both attackers
    backdoor[:, 20 + 3] += 0.5
    states = glob + torch.cat([benign, backdoor])
    ids = (0, 1, 2, 3, 4, 5, 8, 9)
    agg = DeepSight().aggregate(_inputs(states, glob, ids))
    te = agg.diagnostics["threshold_exceedings"]
    assert te["8"] == te["9"] == 1 and all(te[str(k)] >= 3 for k in range(6))
    assert agg.diagnostics["suspicious"] == [8, 9]
    labels = agg.diagnostics["labels"]
    assert labels["8"] == labels["9"] != -1  # the two attackers form a cluster of their own
    assert agg.accepted == (0, 1, 2, 3, 4, 5) and agg.diagnostics["removed"] == [8, 9]
    norms = (states - glob).norm(dim=1)
    s = float(norms.median() + norms.sort().values[4]) / 2  # even n: mean of the two middle norms
    clipped = (states[:6] - glob) * (s / norms[:6]).clamp(max=1.0).unsqueeze(1)
    assert torch.allclose(agg.global_state, glob + clipped.mean(dim=0), atol=1e-6)


def test_options_are_checked() -> None:
    for kwargs, key in (
        ({"tau": 0.0}, "deepsight_tau"),
        ({"seeds": 0}, "deepsight_seeds"),
        ({"samples": -1}, "deepsight_samples"),
        ({"threshold": 2.0}, "deepsight_threshold"),
    ):
        with pytest.raises(ValueError, match=key):
            DeepSightOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server_data"):
        glob = LAYOUT.flatten(MODEL)
        DeepSight().aggregate(RoundInputs(glob, glob.repeat(2, 1), (0, 1), torch.ones(2), LAYOUT, 0))
