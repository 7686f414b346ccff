"""Atomic output writes: a stage that dies mid-write never leaves a truncated file that looks valid.

Everything goes to a temporary file in the destination's folder (same filesystem), is fsynced, and
is renamed over the destination only when complete. A stage writes all its outputs through
`staged_outputs()`, which publishes them together once the stage has succeeded; dvc.yaml marks
them `persist: true` so that DVC does not delete the previous ones before the stage runs.

A destination folder the stage may not write (permissions, a read-only or immutable folder) is a
QatflowError naming the folder, raised before anything is replaced.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tasks.errors import QatflowError

# What a folder the user (or the system) made read-only answers: not a bug, nothing to trace back.
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class NotWritable(QatflowError):
    pass


def _shown(path: Path) -> Path:
    """Relative to the working directory when inside it, as the user would name the folder."""
    try:
        return path.absolute().relative_to(Path.cwd())
    except ValueError:
        return path


@contextmanager
def _writing_into(folder: Path) -> Iterator[None]:
    """Turn "this folder may not be written" into one line naming the folder."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        # The folder the failed call wrote into: the one given, or a missing one above it.
        where = Path(exc.filename).parent if exc.filename else folder
        raise NotWritable(f"{_shown(where)}: not writable ({exc.strerror}); previous outputs left "
                          "in place") from None


def _check_replaceable(directory: Path) -> None:
    """Publishing a folder moves the old one aside and deletes it: that needs every folder in it
    to be writable. Checked (by making and removing an empty folder in each) before anything moves."""
    folders = [directory, *(p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink())]
    for folder in folders:
        probe = folder / f".qatflow-probe.{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            if exc.errno not in UNWRITABLE:
                raise
            raise NotWritable(f"{_shown(folder)}: not writable ({exc.strerror}); previous outputs "
                              "left in place") from None


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    path = Path(path)
    with _writing_into(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Atomically write whatever `writer(fileobj)` produces.

    torch.save / torch.jit.save get a file object rather than a path on purpose: given a path they
    name the archive after the file, so a temp name would change the bytes.
    """
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


class StagedOutputs:
    """A stage's outputs, written beside their destinations and moved into place together only
    once the stage has succeeded: a failed or killed stage leaves every previous output as it was.

    Each output is staged as `.<name>.<pid>.staged` in its destination's folder (same filesystem,
    so publishing is a rename). Leftovers of a killed run are removed the next time that output is
    staged; a directory caught between its two publishing renames is put back.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}

    def path(self, destination: str | Path, *, directory: bool = False) -> Path:
        """Where to write `destination` for now (a fresh empty folder when `directory`)."""
        destination = Path(destination)
        if destination in self._staged:
            return self._staged[destination]
        with _writing_into(destination.parent):
            destination.parent.mkdir(parents=True, exist_ok=True)
            recover_leftovers(destination)
            staged = _sibling(destination, "staged")
            staged.mkdir()
            if not directory:  # a file: found out now, not at the end of a long stage, that
                staged.rmdir()  # the folder takes new entries
        self._staged[destination] = staged
        return staged

    @contextmanager
    def open(self, destination: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
        # The staged name is private to this process: no temp-and-rename needed inside it.
        staged = self.path(destination)
        with _writing_into(staged.parent):
            f = open(staged, mode)  # noqa: SIM115 - only opening may fail as "not writable"
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def write_with(self, destination: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
        """See the module's write_with: `writer` gets a file object, never a path."""
        with self.open(destination, "wb") as f:
            writer(f)
        return Path(destination)

    def write_json(self, destination: str | Path, data: Any) -> Path:
        with self.open(destination, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        return Path(destination)

    def write_text(self, destination: str | Path, text: str) -> Path:
        with self.open(destination, "w") as f:
            f.write(text)
        return Path(destination)

    def publish(self) -> None:
        for destination, staged in self._staged.items():
            if not staged.exists():
                raise FileNotFoundError(f"{destination}: staged but never written")
            if staged.is_dir():
                # Stages write plain files inside a staged folder; make them durable before the
                # rename publishes them, or a power cut could publish empty files.
                for path in (p for p in staged.rglob("*") if p.is_file()):
                    _fsync_file(path)
                _fsync_dir(staged)
                if destination.is_dir():
                    _check_replaceable(destination)
        for destination, staged in self._staged.items():
            old = None
            with _writing_into(destination.parent):
                if staged.is_dir() and destination.is_dir():
                    # A directory cannot be renamed over a non-empty one: swap via a side name.
                    old = _sibling(destination, "old")
                    os.replace(destination, old)
                    os.replace(staged, destination)
                else:
                    os.replace(staged, destination)
            if old is not None:
                shutil.rmtree(old)  # _check_replaceable found every folder in it writable
            _fsync_dir(destination.parent)
        self._staged.clear()

    def discard(self) -> None:
        for staged in self._staged.values():
            _remove(staged)
        self._staged.clear()


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """`with staged_outputs() as out: out.write_json(dest, ...)`: all or nothing."""
    outputs = StagedOutputs()
    try:
        yield outputs
        outputs.publish()
    except BaseException:
        outputs.discard()  # whatever publish had not moved yet (a refused folder: all of it)
        raise


def recover_leftovers(destination: Path) -> None:
    """Clear what a killed run left beside `destination`; restore it if it was mid-swap."""
    for leftover in sorted(destination.parent.glob(f".{destination.name}.*.*")):
        pid, _, kind = leftover.name[len(destination.name) + 2 :].partition(".")
        if kind not in ("staged", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not destination.exists():
            os.replace(leftover, destination)
        else:
            _remove(leftover)


def _sibling(destination: Path, kind: str) -> Path:
    path = destination.parent / f".{destination.name}.{os.getpid()}.{kind}"
    _remove(path)  # our own pid: a leftover of this very process
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
