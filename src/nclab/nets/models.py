"""Networks for collapse experiments: ResNet18 (two stems, optional classifier bias) and an MLP.

Every model exposes the same three things the probe needs (:mod:`nclab.nets.probe`):

* ``model.stages``: an ordered dict name -> module whose outputs are feature levels
  (4-D outputs (B, C, H, W) are global-average-pooled to (B, C));
* ``model.fc``: the classifier ``nn.Linear(d, K, bias=...)``; its *input* is the
  penultimate feature h (B, d) and its weights are W (K, d), b (K,);
* ``model(x)``: logits (B, K).

ResNet18 (He et al. 2016): stem -> 4 residual stages of 2 BasicBlocks each with
64·w, 128·w, 256·w, 512·w channels (w = ``width``), the last three with stride 2 ->
global average pooling -> fc. Stems:

* ``"small"``: 3x3 conv, stride 1, no max-pool (CIFAR-style; for 8-32 px images);
* ``"imagenet"``: 7x7 conv, stride 2, and 3x3 max-pool with stride 2 (torchvision's).

Module names and initialisation follow torchvision (conv1, bn1, layer1..layer4, fc;
Kaiming-normal fan-out convs, BN weight 1 and bias 0, fc as nn.Linear), and
``torchvision.models.resnet18`` itself is used when it is installed and equivalent
(imagenet stem, width 1, 3 input channels). torchvision is never required.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from nclab.nets.settings import MODELS, STEMS


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet18 with a ``small`` or ``imagenet`` stem; logits (B, K) from images (B, C, H, W).

    Args:
        num_classes: K. in_channels: C. stem: "small" or "imagenet".
        width: channel multiplier (1.0 = 64..512 channels; 0.125 = 8..64 for quick CPU runs).
        bias: whether the classifier has a bias b (the paper's MSE runs have none).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "small",
                 width: float = 1.0, bias: bool = True):
        super().__init__()
        c = [max(1, round(64 * width * 2 ** i)) for i in range(4)]
        if stem == "small":
            self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, c[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(c[0], c[0]), BasicBlock(c[0], c[0]))
        self.layer2 = nn.Sequential(BasicBlock(c[0], c[1], 2), BasicBlock(c[1], c[1]))
        self.layer3 = nn.Sequential(BasicBlock(c[1], c[2], 2), BasicBlock(c[2], c[2]))
        self.layer4 = nn.Sequential(BasicBlock(c[2], c[3], 2), BasicBlock(c[3], c[3]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[3], num_classes, bias=bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MLP(nn.Module):
    """Flatten -> ``depth`` x (Linear -> BatchNorm1d -> ReLU) of ``hidden`` units -> fc.

    ``stages`` lists ``hidden1``..``hidden{depth-1}``: the last hidden layer's output (B,
    hidden) is the classifier's input, which the probe records as ``penultimate``, so it
    is not listed twice.
    """

    def __init__(self, num_classes: int, in_features: int, hidden: int = 128, depth: int = 3,
                 bias: bool = True):
        super().__init__()
        layers, d = OrderedDict(), in_features
        for i in range(depth):
            layers[f"hidden{i + 1}"] = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
            d = hidden
        self.body = nn.Sequential(layers)
        self.fc = nn.Linear(d, num_classes, bias=bias)
        self.stages = OrderedDict(list(layers.items())[:-1])

    def forward(self, x):
        return self.fc(self.body(torch.flatten(x, 1)))


def stage_modules(model: nn.Module) -> OrderedDict:
    """Name -> module whose forward output is a feature level (for forward hooks).

    For a (torchvision or nclab) ResNet: ``stem`` (the output of ``maxpool``, an Identity
    for the small stem) and ``layer1``..``layer3``. Stage 4's pooled output *is* the
    penultimate feature (the fc input), which the probe records as ``penultimate``
    together with W and b, so it is not listed twice. Other models: ``model.stages``.
    """
    stages = getattr(model, "stages", None)
    if stages is not None:
        return OrderedDict(stages)
    if all(hasattr(model, k) for k in ("maxpool", "layer1", "layer2", "layer3", "fc")):
        return OrderedDict(stem=model.maxpool, layer1=model.layer1, layer2=model.layer2, layer3=model.layer3)
    raise ValueError("model: give the feature levels explicitly (layers=...); this model has "
                     "no .stages and is not a ResNet")


def resnet18(num_classes: int, in_channels: int = 3, stem: str = "small", width: float = 1.0,
             bias: bool = True, use_torchvision: bool = True) -> nn.Module:
    """ResNet18 (see the module docstring); torchvision's when installed and equivalent."""
    if stem not in STEMS:
        raise ValueError(f"stem: expected one of {STEMS}, got {stem!r}")
    if not width > 0:
        raise ValueError(f"width: expected a positive channel multiplier, got {width!r}")
    if in_channels < 1 or num_classes < 2:
        raise ValueError("in_channels/num_classes: need >= 1 input channel and >= 2 classes")
    if use_torchvision and stem == "imagenet" and width == 1.0 and in_channels == 3:
        try:
            from torchvision.models import resnet18 as tv_resnet18
        except ImportError:
            pass
        else:
            model = tv_resnet18(num_classes=num_classes)
            if not bias:
                fc = nn.Linear(model.fc.in_features, num_classes, bias=False)
                fc.weight.data.copy_(model.fc.weight.data)
                model.fc = fc
            return model
    return ResNet18(num_classes, in_channels, stem, width, bias)


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], *, stem: str = "small",
                width: float = 1.0, bias: bool = True, hidden: int = 128, depth: int = 3) -> nn.Module:
    """A model by name for inputs of shape (C, H, W): "resnet18" or "mlp"."""
    if name == "resnet18":
        return resnet18(num_classes, input_shape[0], stem, width, bias)
    if name == "mlp":
        in_features = 1
        for s in input_shape:
            in_features *= s
        return MLP(num_classes, in_features, max(1, round(hidden * width)), depth, bias)
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
