"""The files stages hand to each other, each with one pydantic model and one reader and writer:

  data/prepared/meta.json        PreparedMeta   written by prepare, read by every later stage
  the model config in a .pt      ModelConfig    stored beside the weights by train and qat
  meta.json inside a model file  ExportedMeta   embedded by export, read by evaluate and predict
                                                (in an .onnx file: its metadata_props
                                                "qatflow.meta", read by tasks/runtimes/)

No stage digs in a raw dict: a stale or hand-edited file is refused with its path and the field
at fault. (deploy/cpp and tasks/runtimes/isolated.py read exported meta.json without this module on
purpose: they prove a deployment needs nothing of qatflow.)
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from tasks.errors import DataError

if TYPE_CHECKING:
    import torch

SampleLayout = Literal["vectors", "sequences", "images"]
# `package.module:callable`, e.g. nets.resnet:build or tasks.model:cnn2d
NET_REFERENCE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
PositiveInt = Annotated[int, Field(gt=0)]


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Normalization(Contract):
    """x -> (x / scale - mean[c]) / std[c] per channel c (axis 1), in float32: prepare applies it
    to the training data, predict to new inputs, deployments to theirs (it is in every export)."""

    scale: Annotated[float, Field(gt=0)]
    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        shape = channel_shape(x.ndim)
        out = to_unit(x, self.scale)
        out -= np.asarray(self.mean, np.float32).reshape(shape)
        out /= np.asarray(self.std, np.float32).reshape(shape)
        return out


def to_unit(x: np.ndarray, scale: float) -> np.ndarray:
    out = x.astype(np.float32)
    out /= np.float32(scale)
    return out


def channel_shape(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (ndim - 2)


class PreparedMeta(Contract):
    source: str
    layout: SampleLayout
    layout_reason: str  # why prepare chose the layout (auto's evidence, or "set in params")
    class_names: list[str] = Field(min_length=2)
    input_shape: list[PositiveInt] = Field(min_length=1, max_length=3)
    normalization: Normalization
    samples: dict[str, int]


class ModelConfig(Contract):
    """What rebuilds a model (tasks/model.py): the `module:callable` that builds it and the
    arguments it is called with. train resolves it from the prepared data and its params, and
    every later stage rebuilds the model from the copy stored beside the weights."""

    net: Annotated[str, Field(pattern=NET_REFERENCE)]
    input_shape: list[PositiveInt] = Field(min_length=1, max_length=3)
    num_classes: Annotated[int, Field(ge=2)]
    kwargs: dict[str, JsonValue]


class ExportedMeta(Contract):
    """meta.json inside every exported file: enough to feed the model and read its output."""

    variant: str
    class_names: list[str] = Field(min_length=2)
    input_shape: list[PositiveInt] = Field(min_length=1, max_length=3)
    normalization: Normalization
    backend: str | None  # the quantized engine int8 weights were packed for; None for fp32
    torch_version: str
    model: ModelConfig


C = TypeVar("C", bound=Contract)
PREPARED_META = "meta.json"


def parse(contract: type[C], raw: object, origin: str, remedy: str) -> C:
    """Validate `raw` as `contract`; DataError naming `origin` and every field at fault."""
    try:
        return contract.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(top level)'}: "
            f"{'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}"
            for err in exc.errors()
        )
        raise DataError(f"{origin}: {problems}; {remedy}") from None


def parse_json(contract: type[C], text: str | bytes, origin: str, remedy: str) -> C:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{origin}: not valid JSON ({exc}); {remedy}") from None
    return parse(contract, raw, origin, remedy)


def read_prepared_meta(prepared: Path) -> PreparedMeta:
    path = prepared / PREPARED_META
    if not path.is_file():
        raise DataError(f"{path}: missing; run the stages before this one (dvc repro)")
    return parse_json(PreparedMeta, path.read_bytes(), str(path), "re-run prepare (dvc repro)")


@dataclass(frozen=True)
class TestSplit:
    """data/prepared/test.npz in memory: normalized samples, labels, and the source values (the
    parity checks feed exported files raw inputs, as a deployment would)."""

    x: torch.Tensor
    y: torch.Tensor
    x_raw: np.ndarray


def read_test_split(prepared: Path) -> TestSplit:
    path = prepared / "test.npz"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the stages before this one (dvc repro)")
    import torch  # not at the top: params.py and the flows read this module, and need no torch

    with np.load(path, allow_pickle=False) as test:
        return TestSplit(torch.from_numpy(test["x"]), torch.from_numpy(test["y"]), test["x_raw"])


def prepared_meta_text(meta: PreparedMeta) -> str:
    return meta.model_dump_json(indent=2) + "\n"


def exported_meta_text(meta: ExportedMeta) -> str:
    return meta.model_dump_json()


def read_exported_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    """meta.json embedded by export, read from the archive (TorchScript or torch.export) without
    loading the model: int8 weights must be loaded after the quantized engine is set. `data`: the
    file's bytes when the caller already holds them (predict verifies exactly what it loads)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/extra/meta.json")), None)
            if name is None:
                raise DataError(f"{path}: no meta.json inside; not a qatflow export")
            text = archive.read(name)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a model file qatflow exported ({exc})") from None
    return parse_json(ExportedMeta, text, f"{path}: meta.json", "re-run export (dvc repro)")


# The reports the export stages, evaluate and the flow hand on. Their files keep the flat layout
# `dvc metrics show` and `dvc exp show` display (one column per variant and field): fixed fields,
# plus one typed entry per variant name (pydantic's typed extras).


class FileCheck(Contract):
    """One published model file in its stage's report (metrics/<stage>.json): its runtime, what
    its outputs were compared with in the isolated parity check, and the exact bytes published
    (predict refuses a file whose sha256 is not listed)."""

    runtime: str
    runtime_version: str
    against: str  # the eager model, or the file, its outputs were compared with
    max_abs_diff: float
    argmax_agreement: float
    allclose: bool | None = None  # fp32 files: within export.fp32_tolerance
    passed: bool
    size_bytes: int
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    float_ops: dict[str, int] | None = None  # int8 files: ops the runtime runs in float ({}: none)


class Gate(Contract):
    """The deployment gate on one int8 file: its test accuracy drop against the eager fp32 model."""

    variant: str
    accuracy_drop: float  # percentage points
    max_accuracy_drop: float
    passed: bool


class ExportReport(Contract):
    """metrics/export.json, export_onnx.json, export_executorch.json: {variant: FileCheck, gate}."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    __pydantic_extra__: dict[str, FileCheck] = Field(init=False)
    gate: Gate | None = None  # on the stage's deployable int8 file, where it has one

    @property
    def files(self) -> dict[str, FileCheck]:
        return dict(self.__pydantic_extra__ or {})


class Timing(Contract):
    median_ms: float
    p90_ms: float


class LatencyReport(Contract):
    """metrics/latency.json: each variant's call time per batch size ("batch_1": Timing)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    __pydantic_extra__: dict[str, dict[str, Timing]] = Field(init=False)
    threads: int
    threads_per_batch: dict[str, int]  # what serving uses per batch size (tasks/serving.py)
    repeats: int
    torch_version: str
    cpu: str
    int8_speedup_vs_fp32_ts: dict[str, float]

    @property
    def variants(self) -> dict[str, dict[str, Timing]]:
        return dict(self.__pydantic_extra__ or {})


class RunSummary(Contract):
    """plots/latency/summary.json: the run report's table and headline, which the flow publishes."""

    gate: Gate
    rows: list[dict[str, str | int | float]]  # one per variant: the flow's table artifact
    headline: dict[str, float]  # int8_accuracy, fp32_accuracy, size_ratio


R = TypeVar("R", bound=BaseModel)


def read_report(contract: type[R], path: Path) -> R:
    """A stage's report, validated: a missing, stale or hand-edited one is refused by name."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run the stages before this one (dvc repro)")
    return parse_json(contract, path.read_bytes(), str(path), "re-run the stage that writes it (dvc repro)")


def report_dict(report: BaseModel) -> dict:
    """As written to JSON: the fixed fields, then each variant's entry; unset optional fields
    (None) left out, as the stages wrote them before they were typed."""
    return report.model_dump(mode="json", exclude_none=True)
