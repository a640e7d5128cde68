"""Stopping long jobs cleanly on SIGTERM, the notice SLURM, Kubernetes and torchrun send before they kill.

A job records the signal instead of dying on it (`StopSignal`), finishes the unit of work it is in (a work
shard; a training step up to the next logged one), makes it durable (commit, checkpoint) and raises `Stopped`;
the CLIs print its one line and exit 128 + the signal number, as a process ended by the signal would. Its
DataLoader workers ignore the signal (`ignore_sigterm`), so a signal sent to every process of the job (what
SLURM does) does not break the unit of work in flight; such workers are iterated inside `worker_batches`,
which ends them however the block ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stopped(Exception):
    """The job stopped on a signal after making its work durable; re-running it with its resume flag
    continues where it stopped."""

    def __init__(self, signum: int, what: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {what}")
        self.signum = signum


class StopSignal:
    """Records a SIGTERM while the `with` block runs (main thread only: Python delivers signals there)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def checkpointed(self, where: str, checkpoint) -> Stopped:
        """The Stopped to raise once `checkpoint` holds the training up to `where` (e.g. "at step 40")."""
        return Stopped(
            self.signum or signal.SIGTERM, f"{where}: {checkpoint} holds it; run again with --resume auto"
        )


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave a SIGTERM sent to the whole job to the main process, which makes its
    work durable first; the workers end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def worker_batches(loader) -> Iterator[Iterator]:
    """iter(loader), its worker processes shut down when the block ends, also when it raises. Workers that
    ignore SIGTERM (`ignore_sigterm`) outlive the terminate() multiprocessing sends them at interpreter exit:
    an iterator kept alive past the job (by the traceback of an error raised in a worker) would leave the
    process waiting for its workers forever after printing the error."""
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator; idempotent
        if shutdown is not None:
            shutdown()
