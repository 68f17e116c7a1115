"""Latched faults that survive a restart: a small JSON file written atomically.

A fault that opened the contactors stays latched across restarts and power cuts (DESIGN.md:
"A restart never closes contactors by itself into a latched fault"). The file is replaced
atomically (write a temporary file, fsync, rename, fsync the directory), so a power cut leaves
either the old or the new set, never a torn one. A file that cannot be read is moved aside
and read as one latched fault, ``latch_store_unreadable``: when in doubt, the contactors stay
open until a person clears it. The SQLite store of the service work replaces this file.

While a BMS runs it holds an exclusive lock on ``<file>.lock``, so ``bms faults clear`` can
refuse to edit the file under a running loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import json
import logging
import os
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNREADABLE = "latch_store_unreadable"


class LatchStoreBusy(Exception):
    """Another process (a running BMS) holds the latch file."""


@dataclass(frozen=True, slots=True)
class LatchRecord:
    fault_id: str
    latched_at_utc: str
    description: str


def utc_now_iso() -> str:
    """Wall-clock UTC, for persisted records only (the loop runs on the monotonic clock)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class LatchStore:
    """Reads and writes the latch file at ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_file = None

    def load(self) -> dict[str, LatchRecord]:
        """The latched faults; an unreadable file is moved aside and reads as one fault."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {raw.get('version')!r}")
            records = [LatchRecord(**entry) for entry in raw["latched"]]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{utc_now_iso()}")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            log.error(
                "latch file %s cannot be read (%s); moved to %s, contactors stay open "
                "until `bms faults clear`",
                self.path,
                exc,
                aside,
            )
            record = LatchRecord(UNREADABLE, utc_now_iso(), f"{self.path} could not be read: {exc}")
            return {UNREADABLE: record}
        return {record.fault_id: record for record in records}

    def save(self, latched: dict[str, LatchRecord], cleared: list[dict] | None = None) -> None:
        """Replace the file atomically with ``latched`` (and append ``cleared`` history)."""
        history = []
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            history = json.loads(self.path.read_text(encoding="utf-8"))["cleared"]
        document = {
            "version": FORMAT_VERSION,
            "latched": [asdict(record) for record in latched.values()],
            "cleared": history + (cleared or []),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def clear(self, fault_ids: list[str] | None = None) -> list[str]:
        """Clear the given latched faults (all when None); return the ids cleared.

        Refuses (LatchStoreBusy) while a BMS holds the lock: the loop owns the file then.
        """
        with self.locked():
            latched = self.load()
            ids = list(latched) if fault_ids is None else [f for f in fault_ids if f in latched]
            user = getpass.getuser()
            cleared = [
                {"fault_id": f, "cleared_at_utc": utc_now_iso(), "cleared_by": user} for f in ids
            ]
            remaining = {f: r for f, r in latched.items() if f not in ids}
            self.save(remaining, cleared)
            return ids

    @contextlib.contextmanager
    def locked(self):
        """Hold the exclusive lock for the duration; LatchStoreBusy if someone else has it."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.path.with_name(f"{self.path.name}.lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise LatchStoreBusy(f"{self.path} is held by a running BMS") from None
        self._lock_file = lock_file

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


class LatchWriter:
    """Persists the latched set from a thread of its own: the loop hands over the newest set
    and never waits for the disk. Only the newest pending set is written."""

    def __init__(self, store: LatchStore):
        self.store = store
        self.failures = 0
        self._pending: queue.Queue[dict[str, LatchRecord] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="latch-writer", daemon=True)
        self._thread.start()

    def submit(self, latched: dict[str, LatchRecord]) -> None:
        while True:
            try:
                self._pending.put_nowait(dict(latched))
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._pending.get_nowait()  # drop the older set; the newer one wins

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending, then stop."""
        self._pending.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (latched := self._pending.get()) is not None:
            try:
                self.store.save(latched)
            except OSError as exc:
                self.failures += 1
                log.error("could not persist latched faults to %s: %s", self.store.path, exc)
