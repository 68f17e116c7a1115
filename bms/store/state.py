"""The persistent state of the pack: SQLite in WAL mode, written off the control loop.

What survives a restart or a power cut: each cell's SOC and its uncertainty, its state of
health, the charge and energy throughput and equivalent full cycles, the fault log (when each
fault latched, a snapshot of the sample that tripped it, when it was cleared and by whom), a
copy of the latched faults (the JSON latch file, written inside the cycle, is the other), and
the hash of the last config that ran healthy.

Durability: every write is one transaction with ``synchronous=FULL`` in WAL mode, so a kill or
a power cut leaves the last committed state, never a torn one; snapshots are numbered and the
newest few kept. A store that is corrupt, or was written by a newer pybms (its schema version is
above ours), is moved aside with a log line and a fresh one is started: the BMS then starts
from the cells' OCV, and its latched faults come from the JSON copy. Older schemas are migrated
in numbered steps (``MIGRATIONS``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bms.store import utc_now_iso

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
KEPT_SNAPSHOTS = 10
BUSY_TIMEOUT_S = 0.2
"""How long a write waits for a lock another process holds before it fails (and is retried
by the writer); never the loop's time, the writer runs on its own thread."""

MIGRATIONS: dict[int, tuple[str, ...]] = {
    # version N: the statements that take a store from N - 1 to N (0 is an empty file)
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE snapshots (seq INTEGER PRIMARY KEY, written_utc TEXT NOT NULL,"
        " state_json TEXT NOT NULL)",
        "CREATE TABLE fault_log (id INTEGER PRIMARY KEY AUTOINCREMENT, fault_id TEXT NOT NULL,"
        " latched_utc TEXT NOT NULL, description TEXT NOT NULL, sample_json TEXT NOT NULL,"
        " cleared_utc TEXT, cleared_by TEXT)",
        "CREATE TABLE latched (fault_id TEXT PRIMARY KEY, latched_utc TEXT NOT NULL,"
        " description TEXT NOT NULL)",
    ),
}


class StoreError(Exception):
    """The store cannot be opened or written."""


@dataclass(frozen=True)
class PackState:
    """One snapshot of what the BMS knows about the pack: arrays as lists, one per cell."""

    soc: list[float]
    soc_std: list[float]
    soh: list[float]
    charged_ah: float = 0.0
    discharged_ah: float = 0.0
    charged_wh: float = 0.0
    discharged_wh: float = 0.0
    equivalent_full_cycles: float = 0.0
    written_utc: str = field(default_factory=utc_now_iso)


@dataclass(frozen=True)
class FaultEntry:
    """A row of the fault log."""

    id: int
    fault_id: str
    latched_utc: str
    description: str
    sample: dict
    cleared_utc: str | None
    cleared_by: str | None


class StateStore:
    """The SQLite file at ``path``; open it with :meth:`open` (moves a broken one aside)."""

    def __init__(self, connection: sqlite3.Connection, path: Path, moved_aside: bool = False):
        self._db = connection
        self.path = path
        self.moved_aside = moved_aside
        """A broken or newer store was moved aside at this open: what it held is gone."""

    @classmethod
    def open(cls, path: Path) -> StateStore:
        """Open or create the store; a corrupt or newer one is moved aside first."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc}") from None
        problem = _unusable(path)
        moved_aside = problem is not None
        if problem is not None:
            stamp = utc_now_iso().replace("-", "").replace(":", "").replace("+0000", "Z")
            aside = path.with_name(f"{path.name}.{problem[0]}-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
            log.error(
                "store %s %s; moved aside as %s and starting a new one: SOC restarts from "
                "the cells' OCV, latched faults come from the latch file",
                path,
                problem[1],
                aside,
            )
        try:
            with open(path, "ab"):  # SQLite only says "unable to open": let the OS say why
                pass
        except OSError as exc:
            raise StoreError(f"cannot open the store {path}: {exc.strerror or exc}") from None
        try:
            connection = _connect(path)
            _migrate(connection)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from None
        return cls(connection, path, moved_aside)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes
    def write_state(self, state: PackState) -> None:
        """Commit a snapshot and drop all but the newest ``KEPT_SNAPSHOTS``."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO snapshots (written_utc, state_json) VALUES (?, ?)",
                (state.written_utc, json.dumps(asdict(state))),
            )
            db.execute(
                "DELETE FROM snapshots WHERE seq <= (SELECT MAX(seq) FROM snapshots) - ?",
                (KEPT_SNAPSHOTS,),
            )

    def log_fault(self, fault_id: str, latched_utc: str, description: str, sample: dict) -> None:
        """A fault latched: one row in the log, and the fault in the latched set."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO fault_log (fault_id, latched_utc, description, sample_json)"
                " VALUES (?, ?, ?, ?)",
                (fault_id, latched_utc, description, json.dumps(sample)),
            )
            db.execute(
                "INSERT OR REPLACE INTO latched VALUES (?, ?, ?)",
                (fault_id, latched_utc, description),
            )

    def copy_latched(self, fault_id: str, latched_utc: str, description: str) -> None:
        """Put a latch into the latched set's copy without a log row (it was logged when it
        latched, or came back from the JSON latch file)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO latched VALUES (?, ?, ?)",
                (fault_id, latched_utc, description),
            )

    def log_clear(self, fault_id: str, cleared_utc: str, cleared_by: str) -> None:
        """A person cleared a latched fault: record who and when on its open log rows."""
        with self._transaction() as db:
            db.execute(
                "UPDATE fault_log SET cleared_utc = ?, cleared_by = ?"
                " WHERE fault_id = ? AND cleared_utc IS NULL",
                (cleared_utc, cleared_by, fault_id),
            )
            db.execute("DELETE FROM latched WHERE fault_id = ?", (fault_id,))

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------- reads
    def latest_state(self) -> PackState | None:
        """The newest snapshot; StoreError if it cannot be read back as a PackState."""
        row = self._db.execute(
            "SELECT state_json FROM snapshots ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        try:
            return PackState(**json.loads(row[0]))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{self.path}: the newest snapshot cannot be read: {exc}") from None

    def latched(self) -> dict[str, tuple[str, str]]:
        """The latched set's copy: fault id -> (latched_utc, description)."""
        rows = self._db.execute("SELECT fault_id, latched_utc, description FROM latched")
        return {fault_id: (when, text) for fault_id, when, text in rows}

    def fault_log(self, limit: int = 100) -> list[FaultEntry]:
        """The newest ``limit`` rows, newest first."""
        rows = self._db.execute(
            "SELECT id, fault_id, latched_utc, description, sample_json, cleared_utc,"
            " cleared_by FROM fault_log ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            FaultEntry(id_, fault, when, text, json.loads(sample), cleared, by)
            for id_, fault, when, text, sample, cleared, by in rows
        ]

    @staticmethod
    def read_fault_log(path: Path, limit: int = 100) -> list[FaultEntry]:
        """The fault log read through a connection of its own, read-only: for the control
        socket's thread and for ``bms faults`` while the writer owns the store."""
        try:
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {path}: {exc}") from None
        try:
            return StateStore(connection, Path(path)).fault_log(limit)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the fault log in {path}: {exc}") from None
        finally:
            connection.close()

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @contextlib.contextmanager
    def _transaction(self):
        try:
            with _transaction(self._db) as db:
                yield db
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (DDL included: the
    connection is in autocommit mode, so nothing is committed behind our back)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def _unusable(path: Path) -> tuple[str, str] | None:
    """(tag, reason) if the file at ``path`` must be moved aside, else None."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            check = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return "corrupt", f"is corrupt ({exc})"
        # locked, unreadable for this user, I/O: not broken, so never moved aside
        raise StoreError(f"cannot open the store {path}: {exc}") from None
    if check != "ok":
        return "corrupt", f"failed its integrity check ({check})"
    if version > SCHEMA_VERSION:
        return "newer", f"has schema {version}, newer than this pybms knows ({SCHEMA_VERSION})"
    return None


def _migrate(connection: sqlite3.Connection) -> None:
    """Bring the schema up to SCHEMA_VERSION, one numbered step per transaction."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    for step in range(version + 1, SCHEMA_VERSION + 1):
        with _transaction(connection):
            for statement in MIGRATIONS[step]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {step}")
        log.info("store schema migrated to version %d", step)
