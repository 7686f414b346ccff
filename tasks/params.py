"""The one schema for params.yaml. Every stage loads its section through `load_params`.

Values live in one place, params.yaml: this schema holds types, bounds and what each key means,
and no defaults. Every field is required, so every knob a stage reads is a key of params.yaml,
which dvc.yaml can list for the stages that read it (DVC sees params.yaml only: a default kept
here would change what a stage does without re-running it). A key missing from the file is a
ParamsError naming it. Code that wants "the defaults with a change" starts from params.yaml
(bench/scratch.py's default_params)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from tasks.contracts import NET_REFERENCE
from tasks.errors import ParamsError, quoted

Threads = Annotated[int, Field(ge=1, le=256)]
# Upper bounds are typo guards, generous for real use: an extra digit or three is refused by name
# before a stage starts, instead of running for days or asking for terabytes.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's and most tools' seed range
Epochs = Annotated[int, Field(gt=0, le=10_000)]  # days of training for the smallest net here
BatchSize = Annotated[int, Field(gt=0, le=65_536)]  # far past what fits in memory for an image net
Fraction = Annotated[float, Field(gt=0, lt=1)]
BUILTIN_FAMILIES = ("mlp", "cnn1d", "cnn2d")  # tasks/model.py


class Section(BaseModel):
    # strict: "3" for an int or 1 for a bool is a mistake in a config file, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    # builtin:mnist5k, builtin:digits, or a path (relative to the project root) to an .npz file,
    # a .csv file or a folder with one sub-folder of images per class.
    source: Annotated[str, Field(min_length=1)]
    max_samples: Annotated[int, Field(gt=0, le=1_000_000_000)] | None  # a billion samples
    # How samples are read: (N, F) vectors, (N, C, L) sequences or (N, C, H, W) images; the model
    # family follows from it. "auto" decides from the array's shape and, for 2-D x (N, F), from
    # whether its columns are an ordered signal (neighbouring columns correlate more than the rest)
    # or tabular features (tasks/layout.py); meta.json's layout_reason says why. Set one to override.
    layout: Literal["auto", "vectors", "sequences", "images"]
    label_column: Annotated[str, Field(min_length=1)]  # CSV sources
    # Folders: [H, W], each at most 8192 (a 67 MP input, far past any classifier's); prepare also
    # refuses a size whose float32 images would not fit in the memory available (tasks/readers.py).
    image_size: Annotated[list[Annotated[int, Field(gt=0, le=8192)]], Field(min_length=2, max_length=2)]
    image_mode: Literal["grayscale", "rgb"]  # folders
    # Folders: an image with more pixels (width * height, read from its header before decoding)
    # is refused; see DEFAULT_MAX_IMAGE_PIXELS in tasks/readers.py for why params.yaml's value. At most
    # 1,000 MP, a typo guard: above PIL's own decompression-bomb refusal (2 x 89 MP), which then
    # refuses first (tests/test_hardening_inputs.py raises the cap to check that it does).
    max_image_pixels: Annotated[int, Field(gt=0, le=1_000_000_000)]


class SplitFractions(Section):
    train: Fraction
    val: Fraction
    test: Fraction

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class PrepareParams(Section):
    seed: Seed
    split: SplitFractions


def _family(value: str) -> str:
    if value != "auto" and value not in BUILTIN_FAMILIES and not re.fullmatch(NET_REFERENCE, value):
        raise ValueError(f"must be auto, {', '.join(BUILTIN_FAMILIES)}, or your own net as "
                         "module:callable, e.g. nets.resnet:build for nets/resnet.py")
    return value


class ModelParams(Section):
    # auto | mlp | cnn1d | cnn2d (auto: mlp for vectors, cnn1d for sequences, cnn2d for images), or
    # your own net as `module:callable`, e.g. nets.resnet:build for nets/resnet.py (tasks/model.py).
    family: Annotated[str, AfterValidator(_family)]
    # The built-in families' shape: channels per conv stage (CNNs) or units per hidden layer (MLP);
    # null: the family's default.
    widths: Annotated[list[Annotated[int, Field(gt=0, le=4096)]], Field(min_length=1, max_length=6)] | None
    convs_per_stage: Annotated[int, Field(ge=1, le=4)]  # CNNs; the first stage has one
    dropout: Annotated[float, Field(ge=0, lt=1)]
    # Keyword arguments for the callable (plain YAML values); for a built-in family they override
    # the three above.
    kwargs: dict[str, JsonValue]
    # A local state_dict to fine-tune from, under data/raw/ or nets/ (both are train's DVC deps).
    weights: Annotated[str, Field(pattern=r"^(data/raw|nets)/")] | None

    @model_validator(mode="after")
    def _weights_stay_inside(self) -> ModelParams:
        if self.weights is not None and ".." in Path(self.weights).parts:
            raise ValueError(f"weights must lie under data/raw/ or nets/, got {self.weights!r}")
        return self


class DistributedParams(Section):
    # DDP processes on this machine: > 1 re-runs the stage under `torchrun --standalone` (gloo).
    # Several machines: start the stage under torchrun on each (docs/scaling-out.md).
    nproc: Annotated[int, Field(ge=1, le=256)]


def _check_batch_split(batch_size: int, nproc: int) -> None:
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} must be a multiple of distributed.nproc {nproc}: "
                         "each DDP process takes an equal slice of every batch")


class TrainParams(Section):
    seed: Seed
    threads: Threads
    epochs: Epochs
    batch_size: BatchSize
    optimizer: Literal["adamw", "sgd"]
    lr: Annotated[float, Field(gt=0, le=10)]
    weight_decay: Annotated[float, Field(ge=0, le=1)]
    scheduler: Literal["onecycle", "cosine", "constant"]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    augment_shift: Annotated[int, Field(ge=0, le=8)]
    patience: Epochs
    # Where training runs (auto: CUDA when available) and in what precision (torch.autocast; fp16
    # with a GradScaler, CUDA only); channels_last memory format for 2-D convolutional nets.
    # Conversion, export, parity and evaluation always run on CPU. docs/your-hardware.md.
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["fp32", "bf16", "fp16"]
    # make bench-train's choice: the fastest mode that repeats bitwise within 0.5 pp of fp32's
    # accuracy, on both CPUs measured (docs/your-hardware.md).
    channels_last: bool
    model: ModelParams
    distributed: DistributedParams

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> TrainParams:
        _check_batch_split(self.batch_size, self.distributed.nproc)
        return self


def _qat_precision(value: str) -> str:
    if value != "fp32":
        raise ValueError("must be fp32: fake-quant kernels take float32 only (bf16 and fp16 "
                         "autocast fail in QAT's first forward pass); train.precision may be bf16")
    return value


class QatParams(Section):
    seed: Seed
    threads: Threads
    backend: Literal["x86", "qnnpack"]
    epochs: Epochs
    batch_size: BatchSize
    lr: Annotated[float, Field(gt=0, le=10)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    freeze_bn_epoch: Annotated[int, Field(ge=0, le=10_000)]
    # Observers must see at least one epoch of data before they freeze, or int8 conversion has
    # no ranges to work with.
    freeze_observers_epoch: Epochs
    ptq_calibration_batches: Annotated[int, Field(gt=0, le=10_000)]  # 10,000 batches: far past converged ranges
    # Where fake-quant fine-tuning runs (auto: CUDA when available), and channels_last as train's.
    # Precision stays fp32: torch 2.13's fake-quant kernels take float32 only, and bf16/fp16
    # autocast hands them bf16/fp16 activations ("expected scalar type Float but found BFloat16").
    device: Literal["auto", "cpu", "cuda"]
    precision: Annotated[str, AfterValidator(_qat_precision)]
    channels_last: bool
    distributed: DistributedParams  # both engines, qat and qat_pt2e

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> QatParams:
        _check_batch_split(self.batch_size, self.distributed.nproc)
        return self


class ExportParams(Section):
    # 2+: the .pt2 export needs a batch > 1; at most 1,000,000, more than any test split here.
    parity_samples: Annotated[int, Field(ge=2, le=1_000_000)]
    fp32_tolerance: Annotated[float, Field(gt=0, le=1)]
    # Another runtime's int8 kernels round differently from the reference's, so a near-tie may flip
    # its argmax: 0.999 of 500 samples allowed no flip at all. 0.995 allows 2 in 500, and still
    # refuses the input faults measured in docs/your-model.md down to a 2x scale.
    int8_min_agreement: Annotated[float, Field(gt=0, le=1)]
    # Deployment gate, checked before any model is published: int8 QAT may lose at most this many
    # percentage points of test accuracy against fp32.
    max_accuracy_drop: Annotated[float, Field(ge=0, le=100)]


class EvaluateParams(Section):
    threads: Threads
    # At most 16 sizes of at most 65,536 samples each, and 10,000 timed calls per size: a
    # latency table, not a load test.
    latency_batch_sizes: Annotated[list[BatchSize], Field(min_length=1, max_length=16)]
    latency_repeats: Annotated[int, Field(ge=3, le=10_000)]
    misclassified_shown: Annotated[int, Field(ge=1, le=100)]


class Params(Section):
    data: DataParams
    prepare: PrepareParams
    train: TrainParams
    qat: QatParams
    export: ExportParams
    evaluate: EvaluateParams


def parse_params(raw: object, origin: str = "params") -> Params:
    """Validate a params mapping; the error names every bad key by its dotted path."""
    if raw is None:
        raw = {}
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif err["type"] == "missing":
                message = "missing: every key needs a value in the params file (the schema has no defaults)"
            elif "input" in err and err["type"] != "missing":
                message += f" (got {quoted(err['input'])})"
            problems.append(f"  {key}: {message}")
        raise ParamsError(f"{origin} is invalid:\n" + "\n".join(problems)) from None


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases while composing, before anything is
    constructed: a "billion laughs" file (aliases of aliases) is refused at its first alias
    instead of being expanded into gigabytes. Params never need them."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _AliasRefused(event, f"YAML aliases (*{event.anchor}) are not allowed in params")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _AliasRefused(event, f"YAML anchors (&{anchor}) and aliases are not allowed in params")
        return super().compose_node(parent, index)


# YAML 1.2 floats without a dot (1e-3, 5E+4): PyYAML implements YAML 1.1, which reads them as
# strings that the strict schema then refuses; ruamel, DVC's reader of params.yaml, reads floats.
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


class _AliasRefused(Exception):
    def __init__(self, event: yaml.Event, message: str) -> None:
        super().__init__(message)
        self.line = event.start_mark.line + 1 if event.start_mark else None


def safe_yaml(text: str, origin: str) -> object:
    """Parse YAML text from `origin` (a file, or e.g. "--set train.lr") as params are parsed:
    safe types only, no anchors or aliases; ParamsError naming `origin` and the line otherwise."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: safe types only
    except _AliasRefused as exc:
        where = f"line {exc.line}: " if exc.line else ""
        raise ParamsError(f"{origin}: {where}{exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{origin}: not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    return parse_params(safe_yaml(text, str(path)), origin=str(path))


def _check(args) -> None:
    """Check a params file with qatflow's own reader and schema: `make run` and the flows do, before
    DVC, which parses params.yaml itself and has no guard against a YAML alias bomb."""
    load_params(args.check)
    print(f"{args.check}: valid")


if __name__ == "__main__":
    from tasks.cli import run_command

    run_command("params", _check, lambda parser: parser.add_argument(
        "--check", type=Path, default=Path("params.yaml"), metavar="FILE",
        help="the params file to check (default: %(default)s)"))
