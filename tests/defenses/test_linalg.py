"""defenses/linalg.py: the blocked float64 Gram matrix and row norms, against the plain float64 products."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.defenses.linalg import column_slices, gram, row_sq_norms


def test_gram_and_norms_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    expected = torch.tensor([[5.0, -2.0], [-2.0, 10.0]], dtype=torch.float64)
    for block in (1, 2, 3, 1 << 16):
        assert torch.equal(gram(x, block), expected)
        assert torch.equal(row_sq_norms(x, block), torch.tensor([5.0, 10.0], dtype=torch.float64))


def test_column_slices_cover_the_width_in_order() -> None:
    assert list(column_slices(5, 2)) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert list(column_slices(0, 2)) == []
    with pytest.raises(ValueError, match=r"^block: got 0; must be an integer >= 1$"):
        list(column_slices(5, 0))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(0, 40), block=st.integers(1, 50), seed=st.integers(0, 10_000))
def test_blocked_products_match_the_plain_float64_ones(n: int, d: int, block: int, seed: int) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1e3
    plain = x.double() @ x.double().T
    g = gram(x, block)
    assert g.dtype == torch.float64 and g.shape == (n, n)
    torch.testing.assert_close(g, plain, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(row_sq_norms(x, block), plain.diagonal(), rtol=1e-12, atol=1e-9)


def test_gram_refuses_a_vector() -> None:
    with pytest.raises(ValueError, match=r"vectors must be \[n, d\]; got shape \(3,\)"):
        gram(torch.ones(3))
    with pytest.raises(ValueError, match=r"vectors must be \[n, d\]; got shape \(3,\)"):
        row_sq_norms(torch.ones(3))
