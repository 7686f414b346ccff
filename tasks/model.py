"""The model registry: every model, built-in or the user's own, is a reference `module:callable`
plus keyword arguments, built by one function (build_model). Train resolves the reference from its
params and the prepared data; the resolved ModelConfig is stored beside the weights, so later
stages rebuild the model from it and never depend on params they do not own.

The callable is called with num_classes=K, with input_shape=[...] (the prepared sample shape)
when its signature takes it, and with the kwargs; it returns an nn.Module that maps
(N, *input_shape) float32 to (N, K) logits. The built-in families below are entries of the same
registry: `family: cnn2d` is `tasks.model:cnn2d` with widths, convs_per_stage and dropout as its
kwargs. vectors (N, F) -> mlp, sequences (N, C, L) -> cnn1d, images (N, C, H, W) -> cnn2d. Each is
made of the patterns FX QAT fuses into int8 kernels: Linear-ReLU and Conv-BN-ReLU (1-D and 2-D).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tasks.contracts import ModelConfig, parse
from tasks.errors import ModelError, ParamsError
from tasks.params import ModelParams

FAMILY_OF_LAYOUT = {"vectors": "mlp", "sequences": "cnn1d", "images": "cnn2d"}
READS = {  # the layouts each family can take; cnn1d reads a vector as a one-channel signal
    "mlp": ("vectors", "sequences", "images"),
    "cnn1d": ("vectors", "sequences"),
    "cnn2d": ("images",),
}
DEFAULT_WIDTHS = {"mlp": [256, 128], "cnn1d": [32, 64, 128], "cnn2d": [32, 64, 128]}
BUILTIN = {family: f"{__name__}:{family}" for family in READS}


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


def mlp(num_classes: int, input_shape: list[int], widths: list[int] = DEFAULT_WIDTHS["mlp"],
        dropout: float = 0.2) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes, widths, dropout)


def cnn1d(num_classes: int, input_shape: list[int], widths: list[int] = DEFAULT_WIDTHS["cnn1d"],
          convs_per_stage: int = 2, dropout: float = 0.2) -> nn.Module:
    return ConvNet(1, input_shape, num_classes, widths, convs_per_stage, dropout)


def cnn2d(num_classes: int, input_shape: list[int], widths: list[int] = DEFAULT_WIDTHS["cnn2d"],
          convs_per_stage: int = 2, dropout: float = 0.2) -> nn.Module:
    return ConvNet(2, input_shape, num_classes, widths, convs_per_stage, dropout)


def model_config(layout: str, input_shape: list[int], num_classes: int, model: ModelParams) -> ModelConfig:
    """The plain-data description of the model train builds for the prepared data (its layout,
    sample shape and classes), stored in its checkpoint: the callable's reference and the keyword
    arguments it is called with."""
    if ":" in model.family:
        return ModelConfig(net=model.family, input_shape=list(input_shape), num_classes=num_classes,
                           kwargs=dict(model.kwargs))
    family = FAMILY_OF_LAYOUT[layout] if model.family == "auto" else model.family
    if layout not in READS[family]:
        fits = [f for f, layouts in READS.items() if layout in layouts]
        raise ParamsError(
            f"train.model.family: {family} cannot read the prepared data, which is {layout} "
            f"with sample shape {list(input_shape)} (data/prepared/meta.json); {family} needs "
            f"{' or '.join(READS[family])}. Use auto or one of: {', '.join(fits)}"
        )
    kwargs = {"widths": list(model.widths or DEFAULT_WIDTHS[family]), "dropout": model.dropout}
    if family != "mlp":
        kwargs["convs_per_stage"] = model.convs_per_stage
    return ModelConfig(net=BUILTIN[family], input_shape=list(input_shape), num_classes=num_classes,
                       kwargs=kwargs | dict(model.kwargs))


def builder(reference: str) -> Callable[..., nn.Module]:
    """The callable `module:callable` names, imported (nets/ is on the path: stages run from the
    project root)."""
    module_name, _, name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user's file may fail to import in any way: say which and why
        where = f" (nets/ is read from the project root: {Path.cwd() / 'nets'})" if module_name.startswith("nets") else ""
        raise ModelError(f"{reference}: cannot import {module_name}: {type(exc).__name__}: {exc}{where}") from None
    build = getattr(module, name, None)
    if not callable(build):
        raise ModelError(f"{reference}: {module_name} has no callable named {name!r}")
    return build


def build_model(config: ModelConfig) -> nn.Module:
    build = builder(config.net)
    kwargs = dict(config.kwargs)
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):
        signature = None
    takes = signature.parameters if signature else {}
    if "input_shape" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        kwargs["input_shape"] = list(config.input_shape)
    if signature is not None:
        try:
            signature.bind(num_classes=config.num_classes, **kwargs)
        except TypeError as exc:
            raise ModelError(f"{config.net}: cannot be called with num_classes and train.model.kwargs "
                             f"{sorted(config.kwargs)}: {exc}") from None
    try:
        model = build(num_classes=config.num_classes, **kwargs)
    except Exception as exc:  # the user's code: its own words, one line, naming the net
        raise ModelError(f"{config.net}: building the model failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{config.net}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path, reference: str) -> None:
    """Fine-tune from a local state_dict (or a checkpoint holding one under "state_dict"): the
    keys and shapes must match the model's exactly, and a mismatch names the first few."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ParamsError(f"train.model.weights: {path}: file not found") from None
    except Exception as exc:
        raise ParamsError(f"train.model.weights: {path}: not a torch state_dict file ({exc})") from None
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ParamsError(f"train.model.weights: {path}: holds no state_dict of tensors")
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} is {list(state[k].shape)}, the model's {list(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ParamsError(f"train.model.weights: {path} does not fit {reference}: "
                          f"{'; '.join(problems[:3])}{more}")
    model.load_state_dict(state)


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
