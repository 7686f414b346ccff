"""A MobileNetV3-style net for small images: `train.model.family: nets.mobilenet:build`.

Inverted residual blocks (1x1 expand, depthwise conv, optional squeeze-and-excitation, 1x1
project, the input added back where shapes allow), Hardswish in the later blocks, and a head that
concatenates the last block's features with its own wider ones. The default table is
MobileNetV3-Small cut down for 28x28 inputs (two stride-2 blocks instead of four).

Written for int8: every piece has an int8 kernel in FX x86 (Conv-BN-ReLU, Conv-BN, Hardswish,
Hardsigmoid, add, mul, cat, average pooling); SiLU, Swish's usual form, has none there and would
run in float. Elsewhere two pieces do run in float between int8 neighbours (tasks/quant/coverage.py
finds them): ONNX Runtime has no int8 HardSwish or HardSigmoid, and XNNPACK runs hardswish in
fp32 while PT2E leaves the Hardsigmoid gate unquantized. Both are elementwise on small tensors;
every convolution, add, mul, cat and pooling stays int8 on all three runtimes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# kernel, expanded width, output width, squeeze-and-excitation, Hardswish (else ReLU), stride
Block = tuple[int, int, int, bool, bool, int]
DEFAULT_BLOCKS: list[Block] = [
    (3, 16, 16, True, False, 2),
    (3, 64, 24, False, False, 1),
    (3, 72, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
]


def conv_bn_act(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    # bias=False: BatchNorm's shift makes it redundant, and quantization folds BN into the conv.
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, *([act()] if act else []))


class SqueezeExcite(nn.Module):
    """Scales each channel by a gate in [0, 1] computed from the whole image's average of all
    channels: cheap global context for a net whose convolutions see a few pixels each."""

    def __init__(self, channels: int):
        super().__init__()
        squeezed = max(8, channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        # Hardsigmoid, not sigmoid: its output range is fixed, so int8 needs no learned scale.
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand with a 1x1 conv, filter each channel with a depthwise conv, project back down with
    a linear 1x1 conv (no activation: ReLU would destroy information in the narrow output)."""

    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool,
                 hardswish: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(conv_bn_act(c_in, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(conv_bn_act(expanded, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)
        # Decided here, from the shapes: FX tracing and torch.export cannot branch on the input.
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNet(nn.Module):
    """Stem, inverted residual blocks, a 1x1 Hardswish head conv widening the last block's
    output; the classifier reads both, concatenated (DenseNet's feature reuse: the narrow block
    output reaches it unchanged, the head only adds to it), after global average pooling.

    Concatenated before pooling, where both are convolution outputs: int8 concatenation needs its
    inputs on one scale, which FX can give a convolution's output but not a pooling's (pooling
    keeps its input's scale), so pooled inputs would be joined on two scales."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], blocks: Sequence[Block] = DEFAULT_BLOCKS,
                 stem_width: int = 16, head_width: int = 128):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"nets.mobilenet takes images, input_shape [channels, height, width]; "
                             f"got {list(input_shape)}")
        self.stem = conv_bn_act(input_shape[0], stem_width, 3, act=nn.Hardswish)
        layers, c_in = [], stem_width
        for kernel, expanded, c_out, se, hardswish, stride in blocks:
            layers.append(InvertedResidual(c_in, kernel, expanded, c_out, se, hardswish, stride))
            c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.head = conv_bn_act(c_in, head_width, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in + head_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        features = self.pool(torch.cat([x, self.head(x)], dim=1))
        # torch.flatten, not the .flatten method: FX flattens int8 tensors as they are, but
        # dequantizes for the method and quantizes again after it.
        return self.classifier(torch.flatten(features, 1))


def build(num_classes: int, input_shape: Sequence[int], blocks: Sequence[Block] = DEFAULT_BLOCKS,
          stem_width: int = 16, head_width: int = 128) -> MobileNet:
    """The registry's entry point; train.model.kwargs may set blocks (a list of [kernel, expanded,
    out, se, hardswish, stride]), stem_width and head_width."""
    return MobileNet(num_classes, input_shape, [tuple(block) for block in blocks], stem_width, head_width)
