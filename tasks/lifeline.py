"""A stage's process dies with the DVC process that runs it (`dvc repro`, or the Prefect flow that
runs DVC in-process), so that no orphan keeps running and publishes outputs dvc.lock does not
record; and a helper that gives any subprocess the same fate (the flow's temporary server)."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

# Our parent as early as this module can see it: a stage that finds another one later was orphaned.
_PARENT_AT_IMPORT = os.getppid()
PR_SET_PDEATHSIG = 1
# What DVC may run a stage's cmd with ($SHELL, else /bin/sh). bash and zsh exec a lone command, so
# the stage's parent is DVC; dash (Debian's /bin/sh) and fish fork, and the shell outlives DVC.
SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh", "mksh", "ash", "busybox", "tcsh", "csh"}


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:  # "pid (comm) state ppid pgrp session ...": comm may
        return stat.read().rsplit(")", 1)[1].split()  # hold spaces and parentheses


def _parent_of(pid: int) -> int:
    return int(_stat(pid)[1])


def _orphaned(watched: int) -> bool:
    """Whether `watched` (the stage's parent, or the shell's) is not DVC but what an orphan is
    reparented to: init, or a subreaper, which is in another session. DVC, the shell and the stage
    share one: none of them starts a session of its own."""
    try:
        return watched <= 1 or int(_stat(watched)[3]) != os.getsid(0)
    except (OSError, ValueError, IndexError):
        return True


def _is_shell(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) in SHELLS
    except OSError:
        return False


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A subprocess.Popen preexec_fn that makes the child get SIGKILL when the thread that starts
    it (and so this process) dies; None where prctl is missing (not Linux)."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies: a DDP worker with the torchrun that started it,
    which cannot stop its workers when it is killed itself."""
    if (prctl := _libc_prctl()) is None:
        return
    parent = os.getppid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        _kill_self()


def _watch(ancestor: int, shell: int) -> None:
    """SIGKILL this process once `ancestor` (the process that ran `shell`) exits."""
    try:
        pidfd = os.pidfd_open(ancestor)
    except ProcessLookupError:
        _kill_self()
    except OSError:  # no pidfd_open (Linux < 5.3): poll instead
        pidfd = None
    try:
        if _parent_of(shell) != ancestor:  # it died (and the shell was reparented) before we looked
            _kill_self()
    except (OSError, ValueError):
        _kill_self()

    def wait() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _parent_of(shell) == ancestor:  # a dead ancestor's shell gets a new parent
                threading.Event().wait(0.2)
        _kill_self()

    threading.Thread(target=wait, name="die-with-dvc", daemon=True).start()


def die_with_dvc() -> None:
    """Make a stage that DVC runs die (SIGKILL) when the DVC process (`dvc repro`, or the flow that
    runs DVC in-process) dies, so that no orphan keeps running and publishes outputs that dvc.lock
    does not record. Only under DVC (it sets DVC_STAGE): a stage started by hand, say with nohup,
    keeps running when its shell exits.
    """
    if "DVC_STAGE" not in os.environ or (prctl := _libc_prctl()) is None:
        return
    parent = os.getppid()
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this stage "
              "would outlive DVC", file=sys.stderr)
        return
    # Already orphaned, before prctl could take effect (reparented to init or a subreaper)?
    if os.getppid() != parent or parent != _PARENT_AT_IMPORT or _orphaned(parent):
        _kill_self()
    # Run through a shell that forked: the shell survives DVC, so also watch the shell's parent.
    if _is_shell(parent):
        try:
            ancestor = _parent_of(parent)
        except (OSError, ValueError, IndexError):
            ancestor = 0
        if _orphaned(ancestor):
            _kill_self()
        _watch(ancestor, parent)
