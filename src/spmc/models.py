"""The two backbones of the paper (spec §1.3): SimpleCNN (MNIST, Fashion-MNIST) and ResNet10 (CIFAR-10)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spmc.plugins import MODEL, load_entry_points


class SimpleCNN(nn.Module):
    """LeNet-style CNN of spec §1.3: 92,626 parameters in 14 tensors, no buffers, input 3×32×32.

    conv(3→6,k5) → ReLU → pool → conv(6→16,k5) → ReLU → pool → fc 400→120→84 (ReLU) → l1 84→84 (ReLU)
    → l2 84→256 (no activation) → cls 256→10. ``flatten(1)`` replaces the repo's ``squeeze()`` (batch of 1).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.l1 = nn.Linear(84, 84)
        self.l2 = nn.Linear(84, 256)
        self.cls = nn.Linear(256, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.l1(x))
        features: torch.Tensor = self.l2(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.cls(self.features(x))
        return logits


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus identity or a 1×1 conv + BN shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet10(nn.Module):
    """CIFAR-style ResNet with BasicBlocks [1, 1, 1, 1], width 64, no max-pool (spec §1.3).

    4,903,242 parameters in 38 tensors, 12 BN layers; implemented without the repo's aliased submodules (D32).
    """

    def __init__(self, num_classes: int = 10, nf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.layer1 = BasicBlock(nf, nf, 1)
        self.layer2 = BasicBlock(nf, 2 * nf, 2)
        self.layer3 = BasicBlock(2 * nf, 4 * nf, 2)
        self.layer4 = BasicBlock(4 * nf, 8 * nf, 2)
        self.linear = nn.Linear(8 * nf, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear(self.features(x))
        return logits


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "simplecnn": SimpleCNN,
    "resnet10": ResNet10,
}
load_entry_points("spmc.models", MODELS, MODEL)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate a backbone by registry name with PyTorch's default initialisation."""
    if name not in MODELS:
        raise ValueError(f"model: unknown value {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes)
