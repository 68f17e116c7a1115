"""The rig lock: one run at a time on one rig.

An exclusive ``flock`` on the rig's lock file, held for the whole run. The kernel releases it
when the holder exits however it exits (a crash, a kill -9), so a dead run never leaves the
rig locked; who holds it (pid, host, since when, which rig) is written into the file, so the
second run says who to wait for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path


class RigBusy(Exception):
    """Another run holds the rig."""


class RigLock:
    def __init__(self, path: Path, rig_name: str):
        self.path = path
        self.rig_name = rig_name
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RigBusy naming its holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RigBusy(
                f"rig {self.rig_name!r} is in use (lock {self.path} held by {holder}); wait for "
                "that run to end"
            ) from None
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RigLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
