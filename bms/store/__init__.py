"""Persistence: what must survive a restart."""

import datetime as dt


def utc_now_iso() -> str:
    """Wall-clock UTC, for persisted records only (the loop runs on the monotonic clock)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
