"""A small ResNet for images: `train.model.family: nets.resnet:build`.

Three stages of basic residual blocks over 32/64/128 channels (wide enough for int8 kernels to beat
fp32 on CPU, small enough to train on 28x28 MNIST in a minute or two). Every block is made of the
patterns FX quantization fuses into int8 kernels on x86 (Conv-BN-ReLU, Conv-BN, add followed by
ReLU), and that the XNNPACK quantizer annotates for PT2E, so no part of it falls back to float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    # bias=False: BatchNorm's shift makes it redundant, and quantization folds BN into the conv.
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN with the input added back before the last ReLU. Where the block changes
    width or resolution, the input goes through a strided 1x1 Conv-BN so that the shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2 = conv_bn(c_out, c_out, 3)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        # Its own module, after `+`: FX fuses add+ReLU into one int8 kernel (quantized::add_relu).
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem Conv-BN-ReLU, then one stage per width (the first at full resolution, each later one
    halving it in its first block), global average pooling and a linear classifier."""

    def __init__(self, num_classes: int, input_shape: Sequence[int],
                 widths: Sequence[int] = (32, 64, 128), blocks: Sequence[int] = (1, 1, 1)):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"nets.resnet takes images, input_shape [channels, height, width]; "
                             f"got {list(input_shape)}")
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"nets.resnet: widths {list(widths)} and blocks {list(blocks)} must "
                             "name the same, non-zero number of stages")
        self.stem = nn.Sequential(conv_bn(input_shape[0], widths[0], 3), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                layers.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.flatten, not the .flatten method: FX flattens int8 tensors as they are, but
        # dequantizes for the method and quantizes again after it.
        return self.classifier(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build(num_classes: int, input_shape: Sequence[int], widths: Sequence[int] = (32, 64, 128),
          blocks: Sequence[int] = (1, 1, 1)) -> ResNet:
    """The registry's entry point; train.model.kwargs may set widths and blocks (per stage)."""
    return ResNet(num_classes, input_shape, widths, blocks)
