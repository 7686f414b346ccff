"""The preflight: before any epoch is spent, take the net (tasks/model.py's ModelConfig) through
every target the pipeline builds, on random weights and a random batch of 2, and refuse a net that
cannot go with one line per target saying why. Nothing is written: every artifact stays in memory.

    model                 built, and maps (2, *input_shape) to float (2, num_classes)
    fx → torchscript      FX QAT prepare, a train-mode forward, convert, trace + freeze, run (qat, export)
    torch.export → pt2e   torch.export with a dynamic batch + PT2E QAT prepare, forward
                          (qat_pt2e; export's fp32.pt2 is a torch.export program too)
    onnx                  fp32 and FX int8 (QDQ) to ONNX, each run once by ONNX Runtime (export_onnx)

train calls preflight(); `python -m tasks.preflight` (make check-model) runs it alone and prints
a table of target x ok / why not.
"""

from __future__ import annotations

import io
import linecache
import logging
import os
import re
import sys
import sysconfig
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch
from rich.console import Console
from rich.table import Table

from tasks.cli import run_command
from tasks.contracts import PREPARED_META, ExportedMeta, ModelConfig, Normalization, read_prepared_meta
from tasks.errors import DataError, ModelError
from tasks.model import build_model, model_config
from tasks.params import load_params
from tasks.quant import fx, pt2e
from tasks.runtimes import onnx
from tasks.runtimes.torchscript import to_torchscript
from tasks.workspace import project_workspace

TARGETS = {"fx": "fx → torchscript", "pt2e": "torch.export → pt2e", "onnx": "onnx"}
BATCH = 2  # the smallest batch BatchNorm trains on, and a non-1 size so a baked-in batch shows
SEED = 0
# A reason stays one readable line: ~200 characters with the user's source line.
MESSAGE_CHARS = 160
CODE_CHARS = 60
# Library code (stdlib, site-packages, qatflow's own tasks/): a failure's "where" is the last
# frame outside these, i.e. the line of the user's net that made it.
LIBRARY_DIRS = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep
                      for k in ("stdlib", "platstdlib", "purelib", "platlib")}
                     | {os.path.realpath(Path(__file__).parent) + os.sep})
# torch's symbolic-shape errors append the solver's state to their first line.
SYMBOLIC_NOISE = re.compile(r"\s+\((?:unhinted|Size-like symbols):.*$")
ABSOLUTE_PATH = re.compile(r"(?:/[^\s/:'\"()]+)+/([^\s/:'\"()]+)")


@dataclass(frozen=True)
class TargetCheck:
    target: str
    ok: bool
    reason: str  # "" when ok
    seconds: float


def check(config: ModelConfig, backend: str = "x86", targets: Iterable[str] = TARGETS) -> list[TargetCheck]:
    """The model check, then each target (keys of TARGETS) on a fresh copy of the net. The targets
    are not tried when the model check fails; a net that cannot be imported or built raises
    ModelError (build_model's one line)."""
    wanted = set(targets)
    engine = torch.backends.quantized.engine  # FX prepare sets it process-wide
    # Seeded for repeatable random weights, without moving the caller's RNG (train draws next).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        example = torch.randn(BATCH, *config.input_shape)
        try:
            results = [_timed("model", lambda: _check_output(config, example))]
            if results[0].ok:
                made: dict[str, torch.nn.Module] = {}
                steps: dict[str, Callable[[], None]] = {
                    "fx": lambda: _fx_torchscript(config, backend, example, made),
                    "pt2e": lambda: _pt2e(config, example),
                    "onnx": lambda: _onnx(config, backend, example, made),
                }
                results += [_timed(TARGETS[key], steps[key]) for key in TARGETS if key in wanted]
        finally:
            torch.backends.quantized.engine = engine
    return results


def preflight(config: ModelConfig, backend: str = "x86",
              targets: Iterable[str] = TARGETS) -> list[TargetCheck]:
    """check(), then one short line on success; ModelError with one line per failed target (and
    what to do) otherwise."""
    started = time.perf_counter()
    results = check(config, backend, targets)
    refusal = refusal_message(config, results)
    if refusal:
        raise ModelError(refusal)
    passed = ", ".join(r.target.replace(" → ", "→") for r in results if r.target != "model")
    print(f"preflight: {config.net} ok on {passed} ({time.perf_counter() - started:.1f} s)")
    return results


def refusal_message(config: ModelConfig, results: list[TargetCheck]) -> str | None:
    failed = [r for r in results if not r.ok]
    if not failed:
        return None
    lines = [f"{config.net} fails the model check: {r.reason}" if r.target == "model"
             else f"{config.net} cannot go through {r.target}: {r.reason}" for r in failed]
    lines.append(
        "What to do: make forward traceable (docs/your-model.md: When a target refuses) and "
        "re-check with `make check-model`; train checks every target, since `dvc repro` builds them "
        "all: TorchScript (qat → export, whose fp32.pt2 is torch.export's), ONNX (export_onnx), "
        "ExecuTorch (qat_pt2e → export_executorch)."
    )
    return "\n".join(lines)


def _timed(target: str, step: Callable[[], None]) -> TargetCheck:
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            step()
    except ModelError:  # not importable or not buildable: no target can say more than that
        raise
    except Exception as exc:  # the user's net may fail in any way: each target says its own
        return TargetCheck(target, False, one_line(exc), time.perf_counter() - started)
    baked = _traced_branch(seen)
    return TargetCheck(target, not baked, baked, time.perf_counter() - started)


def _traced_branch(seen: list[warnings.WarningMessage]) -> str:
    """A trace that meets Python control flow on a tensor's value in the user's code bakes in the
    branch it saw and says so only in a TracerWarning: the exported file would be wrong for other
    inputs. The same warning from torch's own code (a quantized op reading its scale as a float)
    is about constants and harmless."""
    for warning in seen:
        if (issubclass(warning.category, torch.jit.TracerWarning)
                and not os.path.realpath(warning.filename).startswith(LIBRARY_DIRS)):
            message = str(warning.message).split(". ")[0]
            path = Path(warning.filename)
            shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path.name
            code = linecache.getline(warning.filename, warning.lineno).strip()[:CODE_CHARS]
            return f"TracerWarning: {message} ({shown}:{warning.lineno}: {code})"
    return ""


def _check_output(config: ModelConfig, example: torch.Tensor) -> None:
    model = build_model(config).eval()
    with torch.no_grad():
        out = model(example)
    expected = [BATCH, config.num_classes]
    if not isinstance(out, torch.Tensor):
        raise _Refused(f"forward returned {type(out).__name__}, expected a float tensor of shape {expected}")
    if not out.is_floating_point() or list(out.shape) != expected:
        raise _Refused(f"output is {out.dtype} of shape {list(out.shape)}, expected float of shape "
                       f"{expected} (batch {BATCH}, num_classes {config.num_classes}) for input "
                       f"{[BATCH, *config.input_shape]}")


def _fx_int8(config: ModelConfig, backend: str, example: torch.Tensor) -> torch.nn.Module:
    prepared = fx.prepare(build_model(config), "qat", backend, example)
    with torch.no_grad():
        prepared(example)
    return fx.convert(prepared)


def _fx_torchscript(config: ModelConfig, backend: str, example: torch.Tensor, made: dict) -> None:
    made["fx int8"] = _fx_int8(config, backend, example)
    to_torchscript(made["fx int8"], example[:1])(example)


def _pt2e(config: ModelConfig, example: torch.Tensor) -> None:
    # No convert_pt2e: it folds BatchNorm by tracing torchao's 24 conv-BN pattern graphs with
    # torch.export whatever the net's size (for the default CNN 4-5 s of CPU, 9-12 s wall on 2 busy
    # cores: more than all the rest), and it only swaps the fake-quant nodes prepare placed, so a
    # net that captures and prepares has met what torch.export and PT2E demand of it.
    with _quiet_torch_export():
        prepared = pt2e.prepare(build_model(config), example)
    with torch.no_grad():
        prepared(example)
        prepared.eval()(example)


def _onnx(config: ModelConfig, backend: str, example: torch.Tensor, made: dict) -> None:
    meta = dict(class_names=[f"class {i}" for i in range(config.num_classes)],
                input_shape=config.input_shape, normalization=Normalization(scale=1, mean=[0], std=[1]),
                torch_version=str(torch.__version__), model=config)
    for variant in ("fp32", "int8"):
        try:
            if variant == "fp32":
                module = build_model(config)
            else:
                # The FX int8 model in QDQ form, as export_onnx makes it: the one fx → torchscript
                # converted, if that target ran.
                module = made.pop("fx int8", None)
                if module is None:
                    module = _fx_int8(config, backend, example)
                torch.backends.quantized.engine = backend
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", torch.jit.TracerWarning)
                payload = onnx.export(module, example, ExportedMeta(
                    variant=variant, backend=None if variant == "fp32" else backend, **meta)).payload
            if baked := _traced_branch(seen):
                raise _Refused(baked)
            session = onnxruntime.InferenceSession(payload, providers=["CPUExecutionProvider"])
            (logits,) = session.run(None, {"input": example.numpy()})
            expected = [BATCH, config.num_classes]
            if list(logits.shape) != expected:
                raise _Refused(f"ONNX Runtime gave shape {list(logits.shape)}, expected {expected}")
        except Exception as exc:
            raise _Refused(f"{variant}: {one_line(exc)}") from exc


@contextmanager
def _quiet_torch_export():
    # torch.export prints the partial graph of a failed capture to stderr (a screenful per
    # failure, twice) and logs warnings about it; the failure itself is reported in one line.
    logging.disable(logging.WARNING)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Refused(Exception):
    """A reason already in its final words."""


def one_line(exc: BaseException) -> str:
    """`Type: first meaningful line (where in the user's code)`, without tracebacks, absolute
    paths or torch's symbolic-shape dumps."""
    if isinstance(exc, _Refused):
        return str(exc)
    where = _user_line(exc)
    # A warning turned error inside a C++ call surfaces as "SystemError: <method ...> returned a
    # result with an exception set", the warning as its cause.
    while isinstance(exc, SystemError) and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = ABSOLUTE_PATH.sub(r"\1", SYMBOLIC_NOISE.sub("", " ".join(lines[0].split()) if lines else ""))
    if len(message) > MESSAGE_CHARS and ". " in message[:MESSAGE_CHARS]:
        message = message[: message.rindex(". ", 0, MESSAGE_CHARS) + 1]  # whole sentences only
    elif len(message) > MESSAGE_CHARS:
        message = message[: MESSAGE_CHARS - 1] + "…"
    return f"{type(exc).__name__}: {message}" + (f" ({where})" if where else "")


def _user_line(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and not os.path.realpath(f.filename).startswith(LIBRARY_DIRS)]
    if not frames:
        return ""
    frame = frames[-1]
    path = Path(frame.filename)
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path.name
    code = (linecache.getline(frame.filename, frame.lineno).strip() or frame.line or "")[:CODE_CHARS]
    return f"{shown}:{frame.lineno}" + (f": {code}" if code else "")


def table(config: ModelConfig, results: list[TargetCheck]) -> Table:
    view = Table(title=f"{config.net}, input {[BATCH, *config.input_shape]}")
    view.add_column("target", no_wrap=True)
    view.add_column("ok / why not", overflow="fold")
    view.add_column("seconds", justify="right")
    for r in results:
        view.add_row(r.target, "ok" if r.ok else f"[red]{r.reason}[/red]", f"{r.seconds:.1f}")
    return view


def main(args) -> None:
    """Take train.model's net through every target the pipeline builds (FX QAT → TorchScript,
    torch.export → PT2E, ONNX) on random weights, and print which it passes and why not."""
    # A check leaves the project as it found it, nets/__pycache__ included.
    sys.dont_write_bytecode = True
    params = load_params(args.params)
    workspace = project_workspace()
    if not (workspace.prepared / PREPARED_META).is_file():
        raise DataError(f"{(workspace.prepared / PREPARED_META).relative_to(workspace.root)}: missing; "
                        "the preflight reads the sample shape and the classes from it: run "
                        "`dvc repro prepare` first")
    meta = read_prepared_meta(workspace.prepared)
    config = model_config(meta.layout, meta.input_shape, len(meta.class_names), params.train.model)
    started = time.perf_counter()
    results = check(config, params.qat.backend, args.target or TARGETS)
    Console().print(table(config, results))
    refusal = refusal_message(config, results)
    if refusal:
        raise ModelError(refusal)
    print(f"preflight: {config.net} ok ({time.perf_counter() - started:.1f} s)")


def _arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--target", action="append", choices=list(TARGETS),
                        help="check only this target (repeatable; default: all)")


if __name__ == "__main__":
    run_command("preflight", main, _arguments)
