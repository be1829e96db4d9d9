"""Backbones (spec §1.3) and the flat-state layout."""

from __future__ import annotations

import pytest
import torch

from spmc.models import ResNet10, SimpleCNN, build_model
from spmc.params import EntryKind, ParamLayout


def test_simplecnn_size_and_order() -> None:
    layout = ParamLayout.from_module(SimpleCNN())
    assert layout.num_params == 92_626
    assert len(layout.params) == 14 and layout.dim == 92_626
    assert [e.name for e in layout.params][:4] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    assert [e.name for e in layout.params][-2:] == ["cls.weight", "cls.bias"]
    assert SimpleCNN()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # batch of 1 works (flatten, not squeeze)


def test_resnet10_size_and_buffers() -> None:
    model = ResNet10()
    layout = ParamLayout.from_module(model)
    assert layout.num_params == 4_903_242
    assert len(layout.params) == 38
    floats = sum(e.numel for e in layout.entries if e.kind is EntryKind.FLOAT_BUFFER)
    ints = [e for e in layout.entries if e.kind is EntryKind.INT_BUFFER]
    assert floats == 5_760 and len(ints) == 12
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_names_the_field() -> None:
    with pytest.raises(ValueError, match="model: unknown value 'vgg'"):
        build_model("vgg")


def test_flatten_load_round_trip_with_int_buffers() -> None:
    torch.manual_seed(0)
    a, b = ResNet10(), ResNet10()
    a.train()
    a(torch.randn(4, 3, 32, 32))  # moves running stats and the counters
    layout = ParamLayout.from_module(a)
    vec = layout.flatten(a)
    layout.load(b, vec)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert b.bn1.num_batches_tracked.dtype == torch.int64 and int(b.bn1.num_batches_tracked) == 1
    masks = layout.param_mask().sum() + layout.mask(EntryKind.FLOAT_BUFFER).sum() + layout.int_mask().sum()
    assert int(masks) == layout.dim
    assert int(layout.stat_mask().sum()) == layout.dim - 12


def test_views_and_size_check() -> None:
    layout = ParamLayout.from_module(SimpleCNN())
    mat = torch.arange(2 * layout.dim, dtype=torch.float32).reshape(2, layout.dim)
    (entry, view), *_ = layout.views(mat, EntryKind.PARAM)
    assert entry.name == "conv1.weight" and view.shape == (2, 450)
    with pytest.raises(ValueError, match="92626"):
        layout.load(SimpleCNN(), torch.zeros(5))
