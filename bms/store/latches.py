"""Latched faults that survive a restart: a small JSON file written atomically.

A fault that opened the contactors stays latched across restarts and power cuts (DESIGN.md:
"A restart never closes contactors by itself into a latched fault"). The loop writes the file
synchronously in the cycle that latches, right after commanding the contactors open, so a
latch is on disk before the next cycle; the file is replaced atomically (temporary file, fsync,
rename, directory fsync), so a power cut leaves the old or the new set, never a torn one.

Reading never changes anything. A file that cannot be read (torn, hand-edited, wrong types)
reads as one latched fault, ``latch_store_unreadable``; a starting BMS copies it aside and
writes that latch back, so it also survives the next restart until a person clears it.
While a BMS runs it holds an exclusive lock on ``<file>.lock``, so ``bms faults clear`` can
refuse to edit the file under a running loop. The SQLite store (bms/store/state.py) keeps a
second copy of the latched set; a starting BMS holds the union of both.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from bms.store import utc_now_iso

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNREADABLE = "latch_store_unreadable"


class LatchStoreBusy(Exception):
    """Another process (a running BMS) holds the latch file."""


class LatchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    fault_id: str
    latched_at_utc: str
    description: str


class _ClearRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    fault_id: str
    cleared_at_utc: str
    cleared_by: str


class _LatchFile(BaseModel):
    """The file's schema: anything else in it makes the file unreadable."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: int
    latched: list[LatchRecord]
    cleared: list[_ClearRecord]


class LatchStore:
    """Reads and writes the latch file at ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_file = None

    def _read(self) -> _LatchFile | None:
        """The parsed file, None if there is none; raises ValueError if it is unusable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(str(exc)) from None
        try:
            document = _LatchFile.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]["msg"]
            raise ValueError(f"{exc.error_count()} problem(s), first: {first}") from None
        if document.version != FORMAT_VERSION:
            raise ValueError(f"unknown format version {document.version}")
        return document

    def load(self) -> dict[str, LatchRecord]:
        """The latched faults, by id; an unusable file reads as ``latch_store_unreadable``.
        Changes nothing on disk."""
        try:
            document = self._read()
        except ValueError as exc:
            return {
                UNREADABLE: LatchRecord(
                    fault_id=UNREADABLE,
                    latched_at_utc=utc_now_iso(),
                    description=f"{self.path} could not be read: {exc}",
                )
            }
        if document is None:
            return {}
        return {record.fault_id: record for record in document.latched}

    def open_for_run(self) -> dict[str, LatchRecord]:
        """At a BMS start, under the lock: load, and if the file is unusable, copy it aside
        and write the unreadable latch in its place so it survives the next restart too."""
        latched = self.load()
        if UNREADABLE in latched and self.path.exists():
            aside = Path(
                tempfile.mkstemp(prefix=f"{self.path.name}.unreadable-", dir=self.path.parent)[1]
            )
            shutil.copyfile(self.path, aside)
            log.error(
                "%s; kept a copy as %s; contactors stay open until `bms faults clear`",
                latched[UNREADABLE].description,
                aside,
            )
            self.save(latched)
        return latched

    def save(self, latched: dict[str, LatchRecord], cleared: list[dict] | None = None) -> None:
        """Replace the file atomically with ``latched`` (and the clearing history)."""
        history: list[dict] = []
        with contextlib.suppress(ValueError):
            previous = self._read()
            if previous is not None:
                history = [record.model_dump() for record in previous.cleared]
        document = {
            "version": FORMAT_VERSION,
            "latched": [record.model_dump() for record in latched.values()],
            "cleared": history + (cleared or []),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def clear(self, fault_ids: list[str] | None = None) -> list[str]:
        """Clear the given latched faults (all when None); return the ids cleared.

        Refuses (LatchStoreBusy) while a BMS holds the lock: the loop owns the file then;
        refuses (KeyError) an id that is not latched, so a typo never passes for a clear.
        """
        with self.locked():
            latched = self.load()
            unknown = [f for f in fault_ids or () if f not in latched]
            if unknown:
                raise KeyError(f"not latched: {', '.join(unknown)}")
            ids = list(latched) if fault_ids is None else list(fault_ids)
            user = getpass.getuser()
            cleared = [
                {"fault_id": f, "cleared_at_utc": utc_now_iso(), "cleared_by": user} for f in ids
            ]
            self.save({f: r for f, r in latched.items() if f not in ids}, cleared)
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


class LatchKeeper:
    """The latched set of one run: kept in memory, written to the latch file in the cycle
    that changes it (a failed write is retried every ``RETRY_S`` and reported), and copied to
    the state store, whose copy is merged in at start (the union of both copies holds)."""

    RETRY_S = 1.0

    def __init__(self, store: LatchStore | None = None, recorder=None):
        """``store``: the latch file (None: memory only, for tests); ``recorder``: the
        state store's recorder (bms/store/recorder.py) or None."""
        self.store = store
        self.recorder = recorder
        self.records: dict[str, LatchRecord] = {}
        self.write_failed = False
        self._unsaved = False
        self._tried_s = -float("inf")
        self._cleared: list[dict] = []
        if store is not None:
            self.records = store.open_for_run()
        if recorder is not None:
            self._merge(recorder)
        if self.records:
            log.warning(
                "latched before this start, contactors stay open until cleared "
                "(bms faults clear): %s",
                ", ".join(self.records),
            )

    def _merge(self, recorder) -> None:
        copy = recorder.latched_copy
        for fault_id, (when, text) in copy.items():
            if fault_id not in self.records:
                self.records[fault_id] = LatchRecord(
                    fault_id=fault_id, latched_at_utc=when, description=text
                )
                self._unsaved = True
        recorder.copy_latched(
            {f: (r.latched_at_utc, r.description) for f, r in self.records.items() if f not in copy}
        )

    def latch(self, fault_id: str, description: str, sample: dict) -> None:
        """A fault latched now; ``sample`` is what the cycle saw (for the fault log)."""
        if fault_id in self.records:
            return
        record = LatchRecord(
            fault_id=fault_id, latched_at_utc=utc_now_iso(), description=description
        )
        self.records[fault_id] = record
        self._unsaved = True
        self._tried_s = -float("inf")  # write at once
        if self.recorder is not None:
            self.recorder.on_latched(fault_id, record.latched_at_utc, description, sample)

    def clear(self, fault_id: str, cleared_by: str) -> None:
        """A person cleared ``fault_id`` (the caller checked that its cause is gone)."""
        del self.records[fault_id]
        self._unsaved = True
        self._tried_s = -float("inf")
        self._cleared.append(
            {"fault_id": fault_id, "cleared_at_utc": utc_now_iso(), "cleared_by": cleared_by}
        )
        if self.recorder is not None:
            self.recorder.on_cleared(fault_id, self._cleared[-1]["cleared_at_utc"], cleared_by)

    def save(self, t_s: float) -> None:
        """Write the file if anything changed (at most every RETRY_S after a failure, which
        raises for the caller to report and leaves ``write_failed`` set)."""
        if not self._unsaved or self.store is None or t_s - self._tried_s < self.RETRY_S:
            return
        self._tried_s = t_s
        try:
            self.store.save(self.records, self._cleared)
        except Exception:
            self.write_failed = True
            raise
        self._cleared = []
        self._unsaved = False
        self.write_failed = False
