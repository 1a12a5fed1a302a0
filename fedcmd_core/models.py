"""Models with named top-level layers.

Every model here is an ``nn.Sequential``-like module whose named children are its *layers*
(``conv1``, ``conv2``, ``fc1``, ``fc2``, ``classifier`` for LeNet-5). Algorithms talk about layers by
these names: a state-dict key ``fc2.0.weight`` belongs to layer ``fc2``. ``forward(x, return_all=True)``
returns every layer's output in order, which FedCMD's layer vote needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LayeredModel(nn.Module):
    """A stack of named layers applied in order; the last one is called ``classifier``."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, layer in layers:
            self.add_module(name, layer)

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def forward(self, x: torch.Tensor, return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for layer in self.children():
            x = layer(x)
            if return_all:
                outputs.append(x)
        return outputs if return_all else x


def layer_of(key: str) -> str:
    """The layer a state-dict key belongs to (its first dotted component)."""
    return key.split(".", 1)[0]


def is_bn_statistic(key: str) -> bool:
    """BatchNorm running statistics: buffers that are never trained and, in FedCMD, never leave a device."""
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _conv_block(c_in: int, c_out: int, kernel: int, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
    )


def _conv_out(layers: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(layers(torch.zeros(1, *input_shape)).numel())


def lenet5(input_shape: tuple[int, ...], num_classes: int) -> LayeredModel:
    """LeNet-5 as in the paper (REFERENCE.md §1): two conv blocks with BN, three linear layers."""
    # Inputs smaller than 16x16 (8x8 digits) cannot take two unpadded 5x5 convs + pools: pad them.
    padding = 2 if input_shape[-1] < 16 else 0
    conv1 = _conv_block(input_shape[0], 6, 5, padding)
    conv2 = _conv_block(6, 16, 5, padding)
    features = _conv_out(nn.Sequential(conv1, conv2), input_shape)
    return LayeredModel(
        [
            ("conv1", conv1),
            ("conv2", conv2),
            ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(features, 120), nn.ReLU())),
            ("fc2", nn.Sequential(nn.Linear(120, 84), nn.ReLU())),
            ("classifier", nn.Linear(84, num_classes)),
        ]
    )


def two_nn(input_shape: tuple[int, ...], num_classes: int) -> LayeredModel:
    """The FedAvg paper's 2NN: two hidden layers of 200 units."""
    features = 1
    for d in input_shape:
        features *= d
    return LayeredModel(
        [
            ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(features, 200), nn.ReLU())),
            ("fc2", nn.Sequential(nn.Linear(200, 200), nn.ReLU())),
            ("classifier", nn.Linear(200, num_classes)),
        ]
    )


def avg_cnn(input_shape: tuple[int, ...], num_classes: int) -> LayeredModel:
    """The FedAvg paper's CNN: two 5x5 conv layers (32, 64 channels), a 512-unit layer."""
    conv1 = nn.Sequential(nn.Conv2d(input_shape[0], 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
    conv2 = nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
    features = _conv_out(nn.Sequential(conv1, conv2), input_shape)
    return LayeredModel(
        [
            ("conv1", conv1),
            ("conv2", conv2),
            ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(features, 512), nn.ReLU())),
            ("classifier", nn.Linear(512, num_classes)),
        ]
    )


def _stem_for(input_shape: tuple[int, ...], conv: nn.Conv2d) -> nn.Conv2d:
    """Replace a torchvision stem conv so it accepts the dataset's channel count."""
    if input_shape[0] == conv.in_channels:
        return conv
    return nn.Conv2d(
        input_shape[0], conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )


def mobilenet_v2(input_shape: tuple[int, ...], num_classes: int) -> LayeredModel:
    """torchvision MobileNetV2 (random init), split into stem, four feature stages, pool, classifier."""
    import torchvision  # lazily: importing it costs ~180 MB and seconds that LeNet runs do not need

    net = torchvision.models.mobilenet_v2(weights=None)
    feats = list(net.features)
    feats[0][0] = _stem_for(input_shape, feats[0][0])
    return LayeredModel(
        [
            ("stem", nn.Sequential(*feats[:2])),
            ("stage1", nn.Sequential(*feats[2:4])),
            ("stage2", nn.Sequential(*feats[4:7])),
            ("stage3", nn.Sequential(*feats[7:14])),
            ("stage4", nn.Sequential(*feats[14:])),
            ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))),
            ("classifier", nn.Linear(net.last_channel, num_classes)),
        ]
    )


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> LayeredModel:
    """torchvision ResNet-18 (random init), split into stem, its four residual stages, pool, classifier."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    return LayeredModel(
        [
            ("stem", nn.Sequential(_stem_for(input_shape, net.conv1), net.bn1, net.relu, net.maxpool)),
            ("layer1", net.layer1),
            ("layer2", net.layer2),
            ("layer3", net.layer3),
            ("layer4", net.layer4),
            ("pool", nn.Sequential(net.avgpool, nn.Flatten())),
            ("classifier", nn.Linear(net.fc.in_features, num_classes)),
        ]
    )


MODELS: dict[str, Callable[[tuple[int, ...], int], LayeredModel]] = {
    "lenet5": lenet5,
    "2nn": two_nn,
    "avgcnn": avg_cnn,
    "mobile": mobilenet_v2,
    "res18": resnet18,
}
# The released code calls its LeNet-5 "ModifiedLeNet5"; accept that spelling for parity commands.
MODEL_ALIASES = {"modifiedlenet5": "lenet5", "mobilenetv2": "mobile", "resnet18": "res18"}


def model_name(name: str) -> str:
    """Canonical model name, or ValueError listing the known ones."""
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return key


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None) -> LayeredModel:
    """Build a model; with ``seed`` its initial weights are the same in every process."""
    factory = MODELS[model_name(name)]
    if seed is None:
        return factory(input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(input_shape, num_classes)
