"""The store's writer thread: the loop hands work over and never waits for the disk.

Two kinds of work: the pack's state (only the newest matters, so a new one replaces one not yet
written) and records that must not be lost (a fault latched, a fault cleared), kept in order in
a bounded queue. A write that fails (disk full, read-only file system, a lock held by another
process) is retried with a growing back-off; the records wait meanwhile, and ``failed`` tells
the loop, which reports it as a diagnosis condition. Only when the queue overflows are the
oldest records dropped, counted and logged.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from bms.store.state import PackState, StateStore, StoreError

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
MAX_RECORDS = 1000


class StoreWriter:
    """Owns ``store`` from :meth:`start` until :meth:`close`."""

    def __init__(self, store: StateStore, max_records: int = MAX_RECORDS):
        self.store = store
        self.failed = False
        """The last write attempt failed (it is being retried)."""
        self.dropped_records = 0
        self.writes = 0
        self._state: PackState | None = None
        self._records: collections.deque[Callable[[StateStore], None]] = collections.deque()
        self._max_records = max_records
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit_state(self, state: PackState) -> None:
        with self._wake:
            self._state = state
            self._wake.notify()

    def submit(self, record: Callable[[StateStore], None]) -> None:
        """Queue a write that must not be lost, e.g. ``lambda s: s.log_fault(...)``."""
        with self._wake:
            if len(self._records) >= self._max_records:
                self._records.popleft()
                self.dropped_records += 1
                log.error("store writer queue full: dropped the oldest record")
            self._records.append(record)
            self._wake.notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (trying for at most ``timeout_s``), then close the store."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("store writer did not finish in %.1f s; unwritten work is lost", timeout_s)
            return
        self.store.close()

    def _run(self) -> None:
        backoff_s = RETRY_FIRST_S
        while True:
            with self._wake:
                while not self._closing and self._state is None and not self._records:
                    self._wake.wait()
                if self._closing and self._state is None and not self._records:
                    return
                state, self._state = self._state, None
                records = list(self._records)
                self._records.clear()
            written = 0
            try:
                for record in records:
                    try:
                        record(self.store)
                    except StoreError:
                        raise
                    except Exception:  # a bad record must not stop the thread or the rest
                        log.exception("store record dropped")
                        self.dropped_records += 1
                    written += 1
                if state is not None:
                    self.store.write_state(state)
            except StoreError as exc:
                if not self.failed:
                    log.error("store write failed (retrying): %s", exc)
                self.failed = True
                with self._wake:
                    unwritten = records[written:]
                    room = max(0, self._max_records - len(self._records))
                    self.dropped_records += max(0, len(unwritten) - room)
                    self._records.extendleft(reversed(unwritten[len(unwritten) - room :]))
                    if state is not None and self._state is None:
                        self._state = state  # keep it unless a newer one came meanwhile
                    if self._closing:
                        log.error(
                            "store writer closing with %d record(s) unwritten: %s",
                            len(self._records),
                            exc,
                        )
                        return
                    self._wake.wait(backoff_s)
                backoff_s = min(2 * backoff_s, RETRY_MAX_S)
                continue
            self.writes += 1
            if self.failed:
                log.info("store writes succeed again")
            self.failed = False
            backoff_s = RETRY_FIRST_S
