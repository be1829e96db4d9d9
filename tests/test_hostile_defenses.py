"""Issue 11 part 2: every registered defense, fed hostile but finite client states, returns a finite global state of
the right shape and dtype or raises one ``ValueError``; never another exception, never inf or NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.defenses import DEFENSES, RoundInputs
from spmc.defenses.server_data import ServerData
from tests.defenses._helpers import BN

NAMES = sorted(DEFENSES)
MAX = {torch.float32: float(torch.finfo(torch.float32).max), torch.float64: float(torch.finfo(torch.float64).max)}


def _server_data() -> ServerData:
    """Eight clean points for the BN layout's model (Linear(2, 2) + BatchNorm1d(2), two classes), one batch."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return ServerData(
        x=torch.randn(8, 2, generator=g),
        y=torch.randint(0, 2, (8,), generator=g),
        transform=lambda x, gen: x,
        model=nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        layout=BN,
        batch_size=8,
    )


@st.composite
def hostile_states(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(global state, [n, d] client states): rows that are random at any scale, huge, tiny, zero or repeated; the
    global state is an ordinary small vector or one more such row."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(1, 8))
    d = BN.dim
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    big = MAX[dtype]
    rows = []
    for _ in range(n + 1):
        kind = draw(st.sampled_from(["random", "random", "max", "tiny", "zero", "repeat", "floats"]))
        if kind == "random":
            exponent = draw(st.integers(-40, 38 if dtype == torch.float32 else 300))
            rows.append(torch.randn(d, generator=g, dtype=torch.float64) * 10.0**exponent)
        elif kind == "max":
            signs = torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1
            rows.append(signs * big)
        elif kind == "tiny":
            value = float(torch.finfo(dtype).tiny) * draw(st.sampled_from([1e-6, 1.0]))
            rows.append(torch.full((d,), value, dtype=torch.float64))
        elif kind == "zero" or (kind == "repeat" and not rows):
            rows.append(torch.zeros(d, dtype=torch.float64))
        elif kind == "repeat":
            rows.append(rows[-1].clone())
        else:
            width = 32 if dtype == torch.float32 else 64
            element = st.floats(allow_nan=False, allow_infinity=False, width=width)
            values = draw(st.lists(element, min_size=d, max_size=d))
            rows.append(torch.tensor(values, dtype=torch.float64))
    states = torch.stack(rows).clamp(-big, big).to(dtype)
    hostile_global = draw(st.booleans())
    glob = states[0] if hostile_global else (0.1 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)
    states = states[1:]
    return glob, states


def _inputs(glob: torch.Tensor, states: torch.Tensor, name: str) -> RoundInputs:
    n = states.shape[0]
    return RoundInputs(
        global_state=glob,
        client_states=states,
        client_ids=tuple(range(100, 100 + n)),
        num_samples=torch.full((n,), 64.0, dtype=torch.float64),
        layout=BN,
        round=2,
        server_data=_server_data() if DEFENSES[name].needs_server_data else None,
    )


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=[Phase.generate])
@given(case=hostile_states())
def test_defense_gives_finite_global_or_value_error(name: str, case: tuple[torch.Tensor, torch.Tensor]) -> None:
    glob, states = case
    try:
        agg = DEFENSES[name]().aggregate(_inputs(glob, states, name))
    except ValueError as err:
        assert "\n" not in str(err).strip(), f"{name}: the error is not one line: {err}"
        return
    assert agg.global_state.shape == glob.shape
    assert agg.global_state.dtype == states.dtype
    assert bool(torch.isfinite(agg.global_state).all()), f"{name}: non-finite global state"
    if agg.weights is not None:
        assert bool(torch.isfinite(agg.weights).all()), f"{name}: non-finite weights"


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5), ()])
def test_round_inputs_reject_states_that_are_not_a_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="client_states"):
        RoundInputs(torch.zeros(5), torch.zeros(shape), (0,), torch.ones(1), BN, 0)


@pytest.mark.parametrize(("states", "glob"), [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_round_inputs_reject_mixed_dtypes(states: torch.dtype, glob: torch.dtype) -> None:
    # RSA raised a raw "Index put requires the source and destination dtypes match" on such inputs.
    with pytest.raises(ValueError, match="dtype"):
        RoundInputs(torch.zeros(BN.dim, dtype=glob), torch.zeros(2, BN.dim, dtype=states), (0, 1), torch.ones(2), BN, 0)
    with pytest.raises(ValueError, match="floating-point"):
        RoundInputs(torch.zeros(BN.dim), torch.zeros(2, BN.dim, dtype=torch.long), (0, 1), torch.ones(2), BN, 0)


def test_weighted_average_at_the_float64_limit_with_weights_summing_to_one_plus_rounding() -> None:
    """SPMC's softmax weights can sum to 1 + 2⁻⁵²; on columns at ±the largest float64 the convex combination must
    stay finite (hypothesis found ±inf here), while a true overflow (weights summing to 2) still shows as inf."""
    from spmc.defenses.base import weighted_average

    big = torch.finfo(torch.float64).max
    f64 = torch.float64
    states = torch.tensor([[-big, big, 1.0], [-big, big, 2.0], [-big, big, 3.0], [-big, big, 4.0]], dtype=f64)
    w = torch.tensor([0.25, 0.25, 0.25, 0.25 + 2.0**-50], dtype=f64)
    assert float(w.sum()) > 1.0  # rounding of the kind that overflowed
    out = weighted_average(states, w)
    assert out.tolist() == [-big, big, pytest.approx(float(w @ states[:, 2]))]
    assert not bool(torch.isfinite(weighted_average(states, w * 2)).all())
