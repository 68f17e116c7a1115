"""systemd's notify protocol (sd_notify), written out: datagrams of ``KEY=value`` lines to the
socket named by ``$NOTIFY_SOCKET``, so no library and no libsystemd is needed.

``READY=1`` once the BMS is really running (config valid, backends open, kernels warm, first
good sample in), ``WATCHDOG=1`` at half the interval systemd asks for (``$WATCHDOG_USEC``), and
only after a healthy cycle, so a hung or failing loop gets the service killed and restarted;
``STATUS=`` a one-line summary for ``systemctl status``; ``STOPPING=1`` on the way out.
Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing. A send never blocks and
never raises: systemd being away must not stop the loop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends to ``$NOTIFY_SOCKET``; read once, at construction, from ``environ``."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        self.address: str | bytes | None = None
        self.watchdog_interval_s: float | None = None
        self.failures = 0
        self._last_kick_s = -float("inf")
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # Linux abstract namespace
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one datagram (from a socket of its own, as libsystemd does); True if it went
        out."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            self.failures += 1
            if self.failures == 1:
                log.warning("systemd notification failed: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self, status: str = "stopping: opening the contactors") -> bool:
        return self.send(STOPPING="1", STATUS=status)

    def watchdog(self, now_s: float) -> bool:
        """Kick the watchdog if half its interval has passed since the last kick; call this
        only after a healthy cycle."""
        if self.watchdog_interval_s is None or now_s - self._last_kick_s < self.watchdog_interval_s:
            return False
        self._last_kick_s = now_s
        return self.send(WATCHDOG="1")
