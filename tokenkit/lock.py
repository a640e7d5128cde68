"""One writer per output: an advisory lock held for as long as a job writes a store, a codebook or a run.

`OutputLock(out)` takes an exclusive `flock` on the hidden lock file beside `out` (`.NAME.lock` in its
folder, created if missing) and writes the holder's pid into it; a second process asking for the same lock gets one line naming the holder,
exit status 2. The kernel drops the lock when the holder dies, kill -9 included, so a crash never leaves an
output locked. The file is removed on release; a process that opened it just before is told to try again
(it checks, once locked, that the path still names the file it locked).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from tokenkit.errors import TokenkitError


class OutputLocked(TokenkitError):
    """Another process is writing the same output."""


class OutputLock:
    def __init__(self, out: Path):
        """out: the output (a folder or a file) this process is about to write."""
        self.what = Path(out)
        self.path, self.fd = self.what.parent / f".{self.what.name}.lock", None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputLocked(
                f"{self.what}: {holder} is writing it; wait for it to finish (or stop it), or write elsewhere"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released and removed it between our open and our lock
            os.close(fd)
            raise OutputLocked(f"{self.what}: its previous writer just finished; run the command again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # releases the lock
            self.fd = None
