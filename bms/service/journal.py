"""Logging to the systemd journal with structured fields, over journald's native protocol.

Each record is one datagram to ``/run/systemd/journal/socket``: ``KEY=value`` lines, or for a
value with a newline in it ``KEY``, a newline, its length as 64-bit little-endian and the value.
Besides ``MESSAGE`` and ``PRIORITY`` a record carries ``FAULT_ID`` and ``CELL`` when the code
logs them (``log.error(..., extra={"fault_id": f, "cell": n})``), so ``journalctl
FAULT_ID=short_circuit`` finds every line about one fault. Used when stderr is the journal
(systemd sets ``$JOURNAL_STREAM``); anywhere else the log goes to stderr as before.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "pybms"
STRUCTURED_FIELDS = {"fault_id": "FAULT_ID", "cell": "CELL"}
"""Record attributes (passed with ``extra=``) that become journal fields."""
MAX_MESSAGE_BYTES = 48 * 1024
"""A datagram must fit the socket's buffer; longer messages are cut (journald would need a
memfd for more, which a log line of ours never needs)."""

_PRIORITY = {  # syslog levels
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def journal_wanted(
    environ: Mapping[str, str] = os.environ, path: str = JOURNAL_SOCKET, stderr_fd: int = 2
) -> bool:
    """stderr is the journal's stream (systemd names it in ``$JOURNAL_STREAM`` as
    ``device:inode``, compared with stderr itself, as systemd.exec(5) says to) and the
    journal's socket is there."""
    stream = environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()) or not os.path.exists(path):
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def encode_fields(fields: Mapping[str, str]) -> bytes:
    """The native protocol's serialisation of one entry."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalHandler(logging.Handler):
    """A logging handler that writes each record to the journal; never raises into the
    logger (a record that cannot be sent is counted in ``failures``)."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = IDENTIFIER):
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.failures = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = self.format(record)
        if len(message) > MAX_MESSAGE_BYTES:
            message = message[:MAX_MESSAGE_BYTES] + " [cut]"
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName or "",
        }
        for attribute, key in STRUCTURED_FIELDS.items():
            value = getattr(record, attribute, None)
            if value is not None:
                fields[key] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sock.sendto(encode_fields(self.fields(record)), self.path)
        except Exception:
            self.failures += 1

    def close(self) -> None:
        self._sock.close()
        super().close()
