"""The control socket: how ``bms status`` and ``bms faults`` talk to the running service.

A Unix stream socket, mode 0660 (owner and group only), one JSON request per line and one JSON
answer per line: ``{"cmd": "status"}``, ``{"cmd": "faults"}``, ``{"cmd": "clear", "faults":
[ids] or null}``. The server runs on a thread of its own and answers one client at a time, each
with a short timeout, so a client that connects and says nothing cannot hold it, and nothing
here ever waits on the loop for long: a clear is handed to the loop, which decides it between
two cycles and answers within ``CLEAR_TIMEOUT_S``.

Who asks is known from the socket itself (SO_PEERCRED): clearing a latched fault needs root or
membership of the configured admin group, and the name of who cleared it is recorded. A socket
file that a live BMS answers on means another instance runs: the second one refuses to start
(they would fight over the bus); a stale file left by a killed one is replaced.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 2.0
CLEAR_TIMEOUT_S = 2.0
MAX_REQUEST_BYTES = 65536


class ControlSocketBusy(Exception):
    """Another BMS answers on the control socket: this one must not start."""


class ControlError(Exception):
    """The service could not be reached, or answered with an error."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection."""

    pid: int
    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    def in_group(self, group: str) -> bool:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            return False
        try:
            groups = os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid)
        except KeyError:
            groups = [self.gid]
        return gid in groups


def may_clear(peer: Peer, admin_group: str | None) -> str | None:
    """None if ``peer`` may clear latched faults, else why not."""
    if admin_group is None or peer.uid == 0 or peer.in_group(admin_group):
        return None
    return f"clearing latched faults needs root or membership of the group {admin_group!r}"


class ControlServer:
    """Serves ``handlers`` (``status``, ``faults``: () -> dict; ``clear``: (ids, peer) -> dict)
    on the socket at ``path``."""

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Callable[..., dict[str, Any]]],
        admin_group: str | None = None,
    ):
        self.path = Path(path)
        self.handlers = handlers
        self.admin_group = admin_group
        self.requests = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control-socket", daemon=True)

    def start(self) -> None:
        """Bind (replacing a stale socket file) and serve; ControlSocketBusy if a live BMS
        answers there, OSError if the socket cannot be made."""
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise ControlSocketBusy(
                    f"another BMS is running and answers on {self.path}; stop it first"
                )
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o117)  # born 0660: no window where others may connect
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            sock.listen(8)
            sock.settimeout(0.2)  # so the thread sees a stop request
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("control socket accept failed")
                continue
            with connection:
                try:
                    self._answer(connection)
                except Exception:
                    log.exception("control request failed")

    def _answer(self, connection: socket.socket) -> None:
        connection.settimeout(CLIENT_TIMEOUT_S)
        peer = Peer(
            *struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        )
        try:
            request = json.loads(_read_line(connection))
            command = request["cmd"]
        except (ValueError, KeyError, TypeError, OSError) as exc:
            _send(connection, {"ok": False, "error": f"bad request: {exc}"})
            return
        self.requests += 1
        if command == "clear":
            refusal = may_clear(peer, self.admin_group)
            if refusal is not None:
                log.warning("refused to clear faults for %s: %s", peer.name, refusal)
                _send(connection, {"ok": False, "error": refusal})
                return
            answer = self.handlers["clear"](request.get("faults"), peer)
        elif command in ("status", "faults"):
            answer = self.handlers[command]()
        else:
            answer = {"ok": False, "error": f"unknown command {command!r}"}
        _send(connection, answer)


def _read_line(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too long")
    return data


def _send(connection: socket.socket, answer: dict[str, Any]) -> None:
    connection.sendall(json.dumps(answer).encode() + b"\n")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def request(path: Path, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request to the service at ``path`` and return its answer (the client side).
    ControlError if no service answers there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no BMS is running ({path} does not exist)") from None
        except ConnectionRefusedError:
            raise ControlError(f"no BMS is running (nothing answers on {path})") from None
        except PermissionError:
            raise ControlError(
                f"not allowed to talk to the BMS on {path} (owner and group only)"
            ) from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        try:
            return json.loads(_read_line(sock))
        except (ValueError, OSError) as exc:
            raise ControlError(f"the BMS on {path} did not answer properly: {exc}") from None
