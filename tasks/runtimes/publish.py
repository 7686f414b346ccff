"""The sequence every export stage shares: write each variant's file in its runtime, run the files
in isolation against their references, gate, and publish files and report together.

Nothing reaches models/ or metrics/ unless every file passes its parity check and the stage's
accuracy gate: the checks run on copies in a scratch folder, and the outputs are published at once
(tasks/atomic.py), so a failure leaves the previous good ones in place.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.atomic import staged_outputs
from tasks.contracts import (
    ExportedMeta,
    ExportReport,
    FileCheck,
    Gate,
    ModelConfig,
    PreparedMeta,
    report_dict,
)
from tasks.errors import GateFailed
from tasks.params import ExportParams
from tasks.quant.coverage import counted, say_float_ops
from tasks.runtimes import RUNTIMES
from tasks.runtimes.gates import parity, run_isolated
from tasks.runtimes.interface import ExportedFile
from tasks.variants import Variant
from tasks.workspace import Workspace


def exported_meta(variant: str, prepared: PreparedMeta, backend: str | None, config: ModelConfig) -> ExportedMeta:
    """What every exported file carries: enough to feed the model and read its output."""
    return ExportedMeta(variant=variant, class_names=prepared.class_names, input_shape=prepared.input_shape,
                        normalization=prepared.normalization, backend=backend,
                        torch_version=str(torch.__version__), model=config)


@dataclass(frozen=True)
class Reference:
    """What an exported file's outputs must match: logits computed here from the model it was made
    from, or a published file, run in the same isolated process."""

    against: str  # as the report names it
    logits: np.ndarray | None = None
    file: Path | None = None


def export_variant(variant: Variant, model, example: torch.Tensor, backend: str | None,
                   prepared: PreparedMeta, config: ModelConfig) -> ExportedFile:
    if backend:  # int8 runs on the engine its weights were packed for
        torch.backends.quantized.engine = backend
    meta = exported_meta(variant.name, prepared, backend, config)
    return RUNTIMES[variant.runtime].export(model, example, meta)


def check_and_publish(stage: str, variants: dict[str, Variant], exported: dict[str, ExportedFile],
                      references: dict[str, Reference], x_raw: np.ndarray, params: ExportParams,
                      workspace: Workspace, gate: Callable[[dict[str, bytes]], Gate] | None = None) -> ExportReport:
    """Parity-check every exported file in isolation, then the gate (given the payloads), then
    publish the files and metrics/<stage>.json together. GateFailed, with nothing written, if any
    check fails."""
    checks: dict[str, FileCheck] = {}
    with tempfile.TemporaryDirectory(prefix=f"qatflow-{stage}-") as tmp:
        workdir = Path(tmp)
        inputs = workdir / "inputs.npz"
        np.savez(inputs, x_raw=x_raw)
        files = {name: workdir / Path(v.file).name for name, v in variants.items()}
        for name, path in files.items():
            path.write_bytes(exported[name].payload)
        others = [r.file for r in references.values() if r.file is not None]
        loaded = run_isolated([*files.values(), *others], inputs, workdir)
        for name, variant in variants.items():
            reference = references[name]
            expected = reference.logits if reference.file is None else loaded[reference.file.name]
            payload = exported[name].payload
            float_ops = exported[name].float_ops
            checks[name] = FileCheck(
                **RUNTIMES[variant.runtime].describe() | {"against": reference.against},
                **parity(variant.precision, expected, loaded[files[name].name], params),
                size_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                float_ops=None if float_ops is None else counted(float_ops))

    failed = {name: c for name, c in checks.items() if not c.passed}
    if failed:
        details = "; ".join(f"{name} vs {c.against}: max |diff| {c.max_abs_diff:g}, argmax agreement "
                            f"{c.argmax_agreement:.4f}" for name, c in failed.items())
        raise GateFailed(f"{stage}: parity check failed ({details}); previous models left in place")
    verdict = gate({name: e.payload for name, e in exported.items()}) if gate else None
    report = ExportReport(gate=verdict, **checks)

    with staged_outputs() as out:
        for name, variant in variants.items():
            out.write_with(variant.path(workspace), lambda f, b=exported[name].payload: f.write(b))
        out.write_json(workspace.metrics(stage), report_dict(report))

    figures = ", ".join(f"{name} {c.size_bytes / 1024:.0f} KiB" for name, c in checks.items())
    drop = f"; int8 accuracy drop {verdict.accuracy_drop:g} pp (limit {verdict.max_accuracy_drop:g})" if verdict else ""
    print(f"{stage}: parity passed for {figures}{drop}")
    for name, check in checks.items():
        if check.float_ops is not None:
            say_float_ops(stage, {name: check.float_ops}, RUNTIMES[variants[name].runtime].LABEL)
    return report
