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
import json
import logging
import os
import pwd
import shutil
import tempfile
import threading
import time
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


def _keep_owner_and_mode(descriptor: int, path: Path) -> None:
    """A replacement written by another user (``sudo bms faults clear``) keeps the owner and
    mode of the file it replaces, so the service can still read and write it; a new file is
    readable by its group."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        os.fchmod(descriptor, 0o640)
        return
    os.fchmod(descriptor, old.st_mode & 0o777)
    if os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
        os.fchown(descriptor, old.st_uid, old.st_gid)


def person() -> str:
    """Who runs this, by the process's real uid (not $USER, which anyone can set), and who
    they were before sudo."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid {os.getuid()}"
    sudo_user = os.environ.get("SUDO_USER")
    return f"{name} (sudo by {sudo_user})" if sudo_user and sudo_user != name else name


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
            try:
                descriptor, aside = tempfile.mkstemp(
                    prefix=f"{self.path.name}.unreadable-", dir=self.path.parent
                )
                os.close(descriptor)
                shutil.copyfile(self.path, aside)
                kept = f"kept a copy as {aside}"
            except OSError as exc:  # e.g. a file root left unreadable: keep going, latched
                kept = f"no copy could be kept ({exc})"
            log.error(
                "%s; %s; contactors stay open until `bms faults clear`",
                latched[UNREADABLE].description,
                kept,
            )
            with contextlib.suppress(OSError):  # the write is retried by the loop's keeper
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
            _keep_owner_and_mode(descriptor, self.path)
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
            self.remove(ids, person())
            return ids

    def remove(self, fault_ids: list[str], cleared_by: str) -> None:
        """Drop ``fault_ids`` from the file, recording who cleared them; the caller holds the
        lock (:meth:`locked`)."""
        latched = self.load()
        when = utc_now_iso()
        cleared = [
            {"fault_id": f, "cleared_at_utc": when, "cleared_by": cleared_by} for f in fault_ids
        ]
        self.save({f: r for f, r in latched.items() if f not in fault_ids}, cleared)

    @contextlib.contextmanager
    def locked(self):
        """Hold the exclusive lock for the duration; LatchStoreBusy if someone else has it."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        """Take the lock on ``<file>.lock``: opened read-only (flock needs no more), so a lock
        file that root created by ``sudo bms faults`` still serves the service's user."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(
            self.path.with_name(f"{self.path.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o644
        )
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise LatchStoreBusy(f"{self.path} is held by a running BMS") from None
        self._lock_file = descriptor

    def release(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


class LatchKeeper:
    """The latched set of one run: kept in memory, written to the latch file by a thread of
    its own as soon as it changes (the loop never waits for the disk; a write takes a few
    milliseconds and two fsyncs), a failed write retried every ``RETRY_S`` and reported in
    ``write_failed`` (the loop forbids closing meanwhile), and copied to the state store,
    whose copy is merged in at start (the union of both copies holds)."""

    RETRY_S = 1.0

    def __init__(self, store: LatchStore | None = None, recorder=None):
        """``store``: the latch file (None: memory only, for tests); ``recorder``: the
        state store's recorder (bms/store/recorder.py) or None."""
        self.store = store
        self.recorder = recorder
        self.records: dict[str, LatchRecord] = {}
        self.write_failed = False
        self.writes = 0
        self._pending: tuple[dict[str, LatchRecord], list[dict]] | None = None
        self._writing = False
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        if store is not None:
            self.records = store.open_for_run()
        changed = self._merge(recorder) if recorder is not None else False
        if (
            recorder is not None
            and recorder.moved_aside
            and store is not None
            and not (store.path.exists())
        ):
            # Both copies gone: what was latched before is unknown, so treat it as latched.
            self.records[UNREADABLE] = LatchRecord(
                fault_id=UNREADABLE,
                latched_at_utc=utc_now_iso(),
                description="the state store was unusable and the latch file is missing: "
                "what was latched before this start is unknown",
            )
            changed = True
        if self.records:
            log.warning(
                "latched before this start, contactors stay open until cleared "
                "(bms faults clear): %s",
                ", ".join(self.records),
            )
        if store is not None:
            self._thread = threading.Thread(target=self._run, name="latch-writer", daemon=True)
            self._thread.start()
            if changed:
                self._submit([])

    def _merge(self, recorder) -> bool:
        """Union with the store's copy; True if that added latches the file lacks."""
        copy = recorder.latched_copy
        added = False
        for fault_id, (when, text) in copy.items():
            if fault_id not in self.records:
                self.records[fault_id] = LatchRecord(
                    fault_id=fault_id, latched_at_utc=when, description=text
                )
                added = True
        recorder.copy_latched(
            {f: (r.latched_at_utc, r.description) for f, r in self.records.items() if f not in copy}
        )
        return added

    def latch(self, fault_id: str, description: str, sample: dict) -> None:
        """A fault latched now; ``sample`` is what the cycle saw (for the fault log)."""
        if fault_id in self.records:
            return
        record = LatchRecord(
            fault_id=fault_id, latched_at_utc=utc_now_iso(), description=description
        )
        self.records[fault_id] = record
        self._submit([])
        if self.recorder is not None:
            self.recorder.on_latched(fault_id, record.latched_at_utc, description, sample)

    def clear(self, fault_id: str, cleared_by: str) -> None:
        """A person cleared ``fault_id`` (the caller checked that its cause is gone)."""
        del self.records[fault_id]
        when = utc_now_iso()
        self._submit([{"fault_id": fault_id, "cleared_at_utc": when, "cleared_by": cleared_by}])
        if self.recorder is not None:
            self.recorder.on_cleared(fault_id, when, cleared_by)

    def _submit(self, cleared: list[dict]) -> None:
        if self.store is None:
            return
        with self._wake:
            earlier = self._pending[1] if self._pending is not None else []
            self._pending = (dict(self.records), earlier + cleared)
            self._wake.notify()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until what was submitted is on disk; False if that did not happen in time."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._pending is not None or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._wake.wait(left)
        return not self.write_failed

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending (for at most ``timeout_s``), then stop the thread."""
        if self._thread is None:
            return
        if not self.flush(timeout_s):
            log.error("the latch file could not be written before the end: %s", self.store.path)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        logged_s = -float("inf")
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                if self._pending is None:
                    return
                records, cleared = self._pending
                self._pending = None
                self._writing = True
            try:
                self.store.save(records, cleared)
                failed = False
            except Exception as exc:
                failed = True
                now_s = time.monotonic()
                if now_s - logged_s >= 10.0:
                    log.error(
                        "writing the latch file %s failed (retrying): %s", self.store.path, exc
                    )
                    logged_s = now_s
            with self._wake:
                self._writing = False
                self.write_failed = failed
                if failed:
                    if self._pending is None:  # nothing newer: try this one again
                        self._pending = (records, cleared)
                    else:  # a newer set replaces this one; its clear records must not be lost
                        self._pending = (self._pending[0], cleared + self._pending[1])
                    if not self._closing:
                        self._wake.wait(self.RETRY_S)
                    else:
                        self._pending = None
                        return
                else:
                    self.writes += 1
                self._wake.notify_all()
