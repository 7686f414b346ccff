"""How a deployed model uses threads on a shared host: how many per batch size, and how they wait.

Measured (2026-12-07, 2-core AMD EPYC, int8.pt / int8.onnx at batch 1, two busy-loop processes
beside it; docs/benchmarks.md has the bench's own figures): TorchScript int8 at 2 threads had p50
0.44 ms but p99 220 ms, against 9.5 ms at 1 thread. The cause is the OpenMP barrier: libgomp's
default wait policy spins, so at the end of every parallel region the thread that finished first
burns its time slice waiting for a peer the scheduler has descheduled, and takes that CPU from the
peer and from everyone else. With OMP_WAIT_POLICY=PASSIVE the same run had p99 9.8 ms (1 thread:
4.7 ms); at batch 64 under the other agents' load, p50 73 ms against 192 ms spinning. ONNX
Runtime's own thread pool spins too: at 2 threads p99 22.8 ms spinning, 4.9 ms with
session.intra_op.allow_spinning=0 (1 thread: 4.5 ms).

So a deployment:
- serves a batch of one on one thread (no barrier at all: its p99 is one preemption, the floor
  the scheduler sets; quiet, 2 passive threads are no faster than one at batch 1), and larger
  batches on all the threads it has (`serving_threads`);
- runs OpenMP passive (`use_serving_wait_policy`, before torch is imported: libgomp reads the
  variable once, when it is loaded) and ONNX Runtime without spinning (`ort_session_config`).
Training is left as it is: the wait policy is set only by the serving entry points (evaluate,
predict, the bench's latency workers, the C++ runner), never for the whole project.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Batches up to this size run on one thread: measured at batch 1 (above); batch 64 gains ~1.8x
# from 2 threads. Sizes in between were not measured.
SINGLE_THREAD_MAX_BATCH = 1
SERVING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
ORT_NO_SPIN = {"session.intra_op.allow_spinning": "0"}


def serving_threads(batch_size: int, available: int) -> int:
    """Intra-op threads for a call on `batch_size` samples with `available` threads to use."""
    return 1 if batch_size <= SINGLE_THREAD_MAX_BATCH else max(1, available)


def openmp_loaded() -> bool:
    """Whether this process has loaded an OpenMP runtime already (then its wait policy is fixed)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "torch" in sys.modules
    return any(lib in maps for lib in ("libgomp", "libiomp", "libomp."))


def use_serving_wait_policy() -> bool:
    """Put SERVING_ENV into this process's environment (a value the user set wins) and into the
    processes it starts; True if it takes effect here, False if OpenMP had started already."""
    for key, value in SERVING_ENV.items():
        os.environ.setdefault(key, value)
    return not openmp_loaded()


def ort_session_config(threads: int) -> dict[str, str]:
    """ONNX Runtime session config entries on `threads` intra-op threads: ONNX Runtime's pool
    follows the process's OpenMP wait policy, so one variable says how every runtime waits
    (spinning helps a quiet host: 0.31 against 0.53 ms at batch 1 on 2 threads)."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    return dict(ORT_NO_SPIN) if threads > 1 and passive else {}

