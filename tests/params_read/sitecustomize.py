"""Records which params keys a stage reads, for tests/test_dvc_params.py. conftest puts this folder
on PYTHONPATH, with QATFLOW_PARAMS_READ naming a file, for the session's one real `dvc repro` only:
every Python process it starts imports this module first. Once tasks.params is imported, each
params model that parse_params returns remembers its dotted place, and reading one of its values
(an attribute) is recorded; at exit the process appends {"stage": ..., "read": [...]} as a line.
model_dump (TensorBoard's hparams, a checkpoint's resume key) is not a read here: it changes no
output. Nothing in the stages knows of it."""

from __future__ import annotations

import os
import sys

READ_LOG = os.environ.get("QATFLOW_PARAMS_READ")


def _record_reads(params) -> None:  # the tasks.params module, just executed
    import atexit
    import json
    from pathlib import Path

    read: set[str] = set()
    places: dict[int, str] = {}
    keep = []  # the registered models stay alive, so their ids stay theirs
    section = params.Section
    get = section.__getattribute__

    def register(model, prefix: str) -> None:
        keep.append(model)
        places[id(model)] = prefix
        for name in type(model).model_fields:
            value = get(model, name)
            if isinstance(value, section):
                register(value, f"{prefix}{name}.")

    def getattribute(self, name: str):
        value = get(self, name)
        prefix = places.get(id(self))
        if prefix is not None and name in type(self).model_fields and not isinstance(value, section):
            read.add(prefix + name)
        return value

    parse = params.parse_params

    def parse_params(raw, origin="params"):
        parsed = parse(raw, origin)
        register(parsed, "")
        return parsed

    def write() -> None:
        if read:
            with open(READ_LOG, "a") as log:
                log.write(json.dumps({"stage": Path(sys.argv[0]).stem, "read": sorted(read)}) + "\n")

    section.__getattribute__ = getattribute
    params.parse_params = parse_params
    atexit.register(write)


if READ_LOG:
    import importlib.abc
    import importlib.machinery

    class _AfterParamsImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "tasks.params":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module

                def exec_module(module):
                    execute(module)
                    _record_reads(module)

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterParamsImport())
