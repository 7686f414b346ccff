"""The classifier, defined once. Train builds it from params; later stages rebuild it from the
config stored beside the weights, so they never depend on params they do not own."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # bias=False: BatchNorm's shift makes it redundant, and conv+bn+relu is the pattern FX QAT fuses.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Module):
    """VGG-style CNN: per stage conv-bn-relu (twice after the first stage), then 2x2 max-pool;
    global average pooling and one linear layer on top.

    Width is what makes int8 pay off on CPU: with 64/128-channel convolutions the quantized
    kernels run ~3x faster than fp32, while a 16/32-channel net gains nothing.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage, width in enumerate(widths):
            layers += conv_bn_relu(c_in, width)
            if stage > 0:
                layers += conv_bn_relu(width, width)
            layers.append(nn.MaxPool2d(2))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def model_config(input_shape: list[int], num_classes: int, widths: list[int], dropout: float) -> dict:
    return {
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "widths": list(widths),
        "dropout": dropout,
    }


def build_model(config: dict[str, Any]) -> ConvNet:
    return ConvNet(config["input_shape"][0], config["num_classes"], config["widths"], config["dropout"])


def save_checkpoint(f, model: nn.Module, config: dict[str, Any]) -> None:
    torch.save({"config": config, "state_dict": model.state_dict()}, f)


def load_checkpoint(path) -> tuple[ConvNet, dict[str, Any]]:
    """Rebuild the fp32 model from a train-stage checkpoint (weights only: no pickle of code)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint["config"]
