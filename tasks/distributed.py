"""Data-parallel training with PyTorch DDP under torchrun, for train and qat.

`processes(nproc, module, threads)` is each stage's entry: with nproc 1 and no torchrun around it,
it does nothing and the stage runs the single-process path it always had. With nproc > 1 it runs
the stage again under torchrun, as `python -m tasks.distributed --standalone --nproc-per-node N -m
<module>` (torchrun's own main, agent() below), so `dvc repro` and the Prefect flow run the same
command as ever. Under torchrun (launched that way, or by hand on several nodes) it joins the
process group and hands fit() a DataParallel.

A failed worker ends the stage with one line, `<stage>: error: DDP rank R (pid P) ...`, naming the
rank that failed first and why; --debug (QATFLOW_DEBUG=1) shows every traceback and torchrun's
failure summary instead.

What every rank holds stays identical: DDP broadcasts rank 0's weights at the start and averages
gradients; BatchNorm buffers are broadcast from rank 0 before each validation, so every rank
validates the same model on the whole validation set and takes the same best-epoch and early-stop
decisions without exchanging them. Each rank draws its own dropout and augmentation (seed + rank).
Rank 0 alone writes TensorBoard, checkpoints, metrics and models; a resumed run gets rank 0's
checkpoint through a broadcast, so nodes need no shared filesystem.

BatchNorm: torch's SyncBatchNorm refuses CPU tensors (torch/nn/modules/batchnorm.py: "expected
input tensor to be on GPU"), so on CPU each rank normalizes with its own slice of the global batch
and evaluation uses rank 0's running statistics. The backend is gloo: these stages train on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from tasks.cli import debugging
from tasks.errors import QatflowError
from tasks.lifeline import die_with_parent, pdeathsig_preexec

# Set by torchrun for every worker it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# In torchrun's --log-dir: agent() writes the failed worker's line there for the launcher.
FAILURE_FILE = "failure.txt"


class RanksDiverged(QatflowError):
    pass


class NoWriter:
    """The SummaryWriter of ranks other than 0: it writes nothing."""

    def __enter__(self) -> NoWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def die_with_torchrun() -> None:
    """A worker dies with the torchrun that started it, which cannot stop its workers when it is
    killed itself; one whose torchrun died already (while it was importing) would wait for a
    rendezvous that never comes, so it ends at once."""
    die_with_parent()
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        launcher = b""
    if not any(name in launcher for name in (b"tasks.distributed", b"torch.distributed.run", b"torchrun")):
        os.kill(os.getpid(), signal.SIGKILL)


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def torchrun_command(nproc: int, module: str, args: list[str], log_dir: str) -> list[str]:
    """One machine, `nproc` workers, a free rendezvous port (--standalone), under agent()."""
    return [sys.executable, "-m", "tasks.distributed", "--standalone",
            f"--nproc-per-node={nproc}", f"--log-dir={log_dir}", "-m", module, *args]


def agent(argv: list[str]) -> None:
    """torchrun with the command-line `argv`; a failed worker ends it with the failure's line in
    FAILURE_FILE in its --log-dir and exit status 1, instead of torchrun's log and tracebacks."""
    args = torchrun.parse_args(argv)
    if not debugging():
        # torchrun logs each failed or stopped worker as it goes; failure_line() says it once.
        logging.disable(logging.CRITICAL)
    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        if debugging():
            print(failed, file=sys.stderr)
        Path(args.log_dir, FAILURE_FILE).write_text(failure_line(failed))
        sys.exit(1)


def failure_line(failed: ChildFailedError) -> str:
    """The failed worker that tells why, of those torchrun reports: it reports the ones it stopped
    with SIGTERM too, and a rank that loses a peer raises an error of its own a moment later. So a
    worker killed by another signal comes first, then one that exited without an error file, then
    the first to write one (torchrun orders them by whole seconds), then the stopped ones."""
    def order(item: tuple[int, ProcessFailure]) -> tuple[int, int]:
        failure = item[1]
        if failure.exitcode == -signal.SIGTERM:
            return 3, 0
        if failure.exitcode < 0:
            return 0, 0
        if not os.path.isfile(failure.error_file):
            return 1, 0
        return 2, os.stat(failure.error_file).st_mtime_ns

    rank, failure = min(failed.failures.items(), key=order)
    if failure.exitcode < 0:
        cause = f"died: {failure.signal_name()}"
    elif os.path.isfile(failure.error_file):
        cause = f"failed: {failure.message}"
    else:
        cause = f"exited with status {failure.exitcode}"
    return f"DDP rank {rank} (pid {failure.pid}) {cause}"


def report_to_agent(exc: Exception) -> None:
    """The worker's error file (torchrun sets its path), in the string form torchrun reads: the
    message a QatflowError gives users, otherwise the exception's type and message."""
    message = str(exc) if isinstance(exc, QatflowError) else f"{type(exc).__name__}: {exc}"
    Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(
        json.dumps({"message": message, "timestamp": int(time.time())}))


@contextmanager
def processes(nproc: int, module: str, threads: int, device: str = "cpu") -> Iterator[DataParallel | None]:
    """The stage's place in a DDP job: None for a single process; run again under torchrun
    when `nproc` > 1 and not under it yet (this process then exits with torchrun's status, or raises
    a QatflowError that names the failed worker). `threads` is each process's intra-op thread count
    (the stage's `threads`). `device` is the stage's: on CUDA the ranks talk over NCCL, one GPU each
    (torchrun's LOCAL_RANK), as gloo's CPU collectives would copy every gradient off the GPU."""
    if not under_torchrun():
        if nproc > 1:
            sys.stdout.flush()
            # torchrun would set 1 and say so; the stage sets its own count anyway.
            env = {"OMP_NUM_THREADS": str(threads), **os.environ}
            # DVC runs this process, not the workers: they die with torchrun (die_with_torchrun),
            # which dies with this process. DVC's lifeline would kill them at once, for torchrun
            # starts them in sessions of their own, which it reads as orphaned.
            env.pop("DVC_STAGE", None)
            # A child, not an exec: this process keeps dying with DVC (tasks/lifeline.py, which an
            # exec would lose behind a forking shell), and torchrun and its workers die with it.
            # torchrun keeps the workers' error files in its log dir, and without one makes a
            # torchelastic_* folder in the temp dir that nothing ever removes.
            with tempfile.TemporaryDirectory(prefix="qatflow-torchrun-") as log_dir:
                launched = subprocess.run(torchrun_command(nproc, module, sys.argv[1:], log_dir),
                                          env=env, preexec_fn=pdeathsig_preexec())
                if launched.returncode and (failure := Path(log_dir, FAILURE_FILE)).exists():
                    raise QatflowError(failure.read_text())
            sys.exit(launched.returncode)
        yield None
        return
    die_with_torchrun()
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    try:
        yield DataParallel(dist.get_rank(), dist.get_world_size(),
                           torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu"))
    except Exception as exc:
        if debugging() or "TORCHELASTIC_ERROR_FILE" not in os.environ:
            raise
        # The launcher says it in one line, once for the job; the ranks that lose this one as a
        # peer fail too, and would each print a traceback.
        report_to_agent(exc)
        sys.exit(1)
    finally:
        dist.destroy_process_group()


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: every rank takes the same number of batch_size / world_size
    slices of its shard (DistributedSampler pads the shards to equal length)."""
    shard = -(-samples // world_size)
    return -(-shard // (batch_size // world_size))


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.world_size} processes (DDP, {dist.get_backend()})"

    def rank_batch(self, batch_size: int) -> int:
        # The params check this against their own nproc; a torchrun started by hand may differ.
        if batch_size % self.world_size:
            raise QatflowError(f"batch_size {batch_size} does not split over {self.world_size} DDP "
                               "processes: make it a multiple of torchrun's world size")
        return batch_size // self.world_size

    def seed_rank(self, seed: int) -> torch.Generator:
        """After the model is built (same weights everywhere): dropout and augmentation draws of
        this rank's own."""
        torch.manual_seed(seed + self.rank)
        return torch.Generator().manual_seed(seed + self.rank)

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(model)

    def epoch_order(self, samples: int, epoch: int, seed: int) -> torch.Tensor:
        """This rank's shard of the epoch's shuffled indices."""
        sampler = DistributedSampler(range(samples), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))

    def sum(self, *values: float) -> list[float]:
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics (and observer ranges) on every rank: each rank's last
        training step moved its own."""
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)

    def from_main(self, value: object) -> object:
        """Rank 0's `value` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def gather(self, value: object) -> list[object]:
        """Every rank's `value`, in rank order, on every rank."""
        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def writes_outputs(self, stage: str, state: dict[str, torch.Tensor]) -> bool:
        """The end of training: check that every rank holds the same `state` bytes (RanksDiverged
        otherwise), then whether this rank is the one that goes on to write the outputs."""
        digest = hashlib.sha256()
        for name, tensor in state.items():
            digest.update(name.encode() + b"\0" + tensor.detach().contiguous().numpy().tobytes())
        digests = self.gather(digest.hexdigest())
        if len(set(digests)) != 1:
            raise RanksDiverged(f"{stage}: the {self.world_size} ranks ended with different weights: "
                                f"{', '.join(d[:12] for d in digests)}")
        if self.is_main:
            print(f"{stage}: {self.describe()}, weights identical on every rank (sha256 {digests[0][:16]})")
        return self.is_main


if __name__ == "__main__":
    agent(sys.argv[1:])
