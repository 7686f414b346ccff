"""The classifier families, defined once. Train resolves a config from the prepared data's layout
and params; later stages rebuild the model from the config stored beside the weights, so they never
depend on params they do not own.

vectors (N, F) -> mlp, sequences (N, C, L) -> cnn1d, images (N, C, H, W) -> cnn2d. Each family is
made of the patterns FX QAT fuses into int8 kernels: Linear-ReLU and Conv-BN-ReLU (1-D and 2-D).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.contracts import ModelConfig, parse
from tasks.errors import ParamsError
from tasks.params import ModelParams

FAMILY_OF_LAYOUT = {"vectors": "mlp", "sequences": "cnn1d", "images": "cnn2d"}
READS = {  # the layouts each family can take; cnn1d reads a vector as a one-channel signal
    "mlp": ("vectors", "sequences", "images"),
    "cnn1d": ("vectors", "sequences"),
    "cnn2d": ("images",),
}
DEFAULT_WIDTHS = {"mlp": [256, 128], "cnn1d": [32, 64, 128], "cnn2d": [32, 64, 128]}


class MLP(nn.Module):
    """Flatten, Linear-ReLU-dropout per hidden layer, then a linear classifier.

    No BatchNorm: FX fuses Linear-BN but not Linear-BN-ReLU, so it would cost an unfused int8 op,
    and standardized features train well without it.
    """

    def __init__(self, in_features: int, num_classes: int, widths: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
            in_features = width
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(x.flatten(1)))


class ConvNet(nn.Module):
    """VGG-style CNN over signals (dims=1) or images (dims=2): per stage conv-bn-relu (once in the
    first stage, `convs_per_stage` times after), then a 2x max-pool while the input is still at
    least 2 long; global average pooling and one linear layer on top.

    Width is what makes int8 pay off on CPU: with 64/128-channel convolutions the quantized
    kernels run ~3x faster than fp32, while a 16/32-channel net gains nothing.
    """

    def __init__(self, dims: int, input_shape: list[int], num_classes: int, widths: list[int],
                 convs_per_stage: int, dropout: float):
        super().__init__()
        conv, norm, pool, global_pool = (
            (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d) if dims == 1
            else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)
        )
        # A plain bool, decided here: FX tracing cannot branch on the input's shape.
        self.add_channel = len(input_shape) == dims
        c_in, *size = [1, *input_shape] if self.add_channel else input_shape
        layers: list[nn.Module] = []
        for stage, width in enumerate(widths):
            for _ in range(1 if stage == 0 else convs_per_stage):
                # bias=False: BatchNorm's shift makes it redundant.
                layers += [conv(c_in, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
                c_in = width
            if min(size) >= 2:  # 8x8 digits or short signals would otherwise pool down to nothing
                layers.append(pool(2))
                size = [s // 2 for s in size]
        self.features = nn.Sequential(*layers)
        self.pool = global_pool(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def model_config(layout: str, input_shape: list[int], num_classes: int, model: ModelParams) -> ModelConfig:
    """The plain-data description of the model train builds, stored in its checkpoint."""
    family = FAMILY_OF_LAYOUT[layout] if model.family == "auto" else model.family
    if layout not in READS[family]:
        fits = [f for f, layouts in READS.items() if layout in layouts]
        raise ParamsError(
            f"train.model.family: {family} cannot read the prepared data, which is {layout} with "
            f"sample shape {list(input_shape)} (data/prepared/meta.json); {family} needs "
            f"{' or '.join(READS[family])}. Use auto or one of: {', '.join(fits)}"
        )
    return ModelConfig(
        family=family,
        input_shape=list(input_shape),
        num_classes=num_classes,
        widths=list(model.widths or DEFAULT_WIDTHS[family]),
        convs_per_stage=model.convs_per_stage,
        dropout=model.dropout,
    )


def build_model(config: ModelConfig) -> nn.Module:
    if config.family == "mlp":
        return MLP(math.prod(config.input_shape), config.num_classes, config.widths, config.dropout)
    return ConvNet(1 if config.family == "cnn1d" else 2, config.input_shape, config.num_classes,
                   config.widths, config.convs_per_stage, config.dropout)


def stored_config(saved: dict, path) -> ModelConfig:
    """The ModelConfig saved beside weights (plain data, so that the file loads weights_only)."""
    return parse(ModelConfig, saved.get("config"), f"{path}: config", "re-run the stage that wrote it")


def save_checkpoint(f, model: nn.Module, config: ModelConfig) -> None:
    torch.save({"config": config.model_dump(), "state_dict": model.state_dict()}, f)


def load_checkpoint(path) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the fp32 model from a train-stage checkpoint (weights only: no pickle of code)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = stored_config(checkpoint, path)
    model = build_model(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), config
