"""The control socket: how ``bms status`` and ``bms faults`` talk to the running service.

A Unix stream socket, mode 0660 (owner and group only), one JSON request per line and one JSON
answer per line: ``{"cmd": "status"}``, ``{"cmd": "faults"}``, ``{"cmd": "clear", "faults":
[ids] or null}``. The server runs on a thread of its own and answers one client at a time, each
with a short timeout, so a client that connects and says nothing cannot hold it, and nothing
here ever waits on the loop for long: a clear is handed to the loop, which decides it between
two cycles and answers within ``CLEAR_TIMEOUT_S``.

Who asks is known from the socket itself (SO_PEERCRED): clearing a latched fault needs root or
membership of the configured admin group, and the name of who cleared it is recorded. The
server holds an flock on ``<socket>.lock`` while it runs: a second instance finds it taken and
refuses to start (they would fight over the bus); a socket file left by a killed one is stale
once the lock is free and is replaced, but nothing that is not a socket is ever removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import threading
import time
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
        self._lock: int | None = None
        self._inode: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control-socket", daemon=True)

    def start(self) -> None:
        """Take the lock, bind (replacing a stale socket) and serve. ControlSocketBusy if a
        running BMS holds the lock; OSError if the socket cannot be made, or the path holds
        something other than a socket."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f"{self.path.name}.lock")
        lock = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ControlSocketBusy(
                f"another BMS is running (it holds {lock_path}); stop it first"
            ) from None
        try:
            self._sock = self._bind()
        except BaseException:
            os.close(lock)
            raise
        self._lock = lock
        self._thread.start()

    def _bind(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket; not replacing it")
            self.path.unlink()  # stale: whoever made it no longer holds the lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o117)  # born 0660: no window where others may connect
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            self._inode = os.lstat(self.path).st_ino
            sock.listen(8)
            sock.settimeout(0.2)  # so the thread sees a stop request
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.path).st_ino == self._inode:  # only our own socket
                    self.path.unlink()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

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
                except OSError as exc:  # a client that hung up or stalled: its problem
                    log.warning("control client dropped: %s", exc)
                except Exception:
                    log.exception("control request failed")

    def _answer(self, connection: socket.socket) -> None:
        peer = Peer(
            *struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        )
        try:
            line = _read_line(connection, time.monotonic() + CLIENT_TIMEOUT_S)
        except TimeoutError:
            log.warning("control client (pid %d) sent no whole request in time", peer.pid)
            return
        if not line.strip():
            return  # connected and said nothing (a probe): nothing to answer
        try:
            request = json.loads(line)
            command = request["cmd"]
        except (ValueError, KeyError, TypeError) as exc:
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


def _read_line(connection: socket.socket, deadline_s: float) -> bytes:
    """One line, within ``deadline_s`` (monotonic) in all: a client that trickles bytes
    gets no more time than one that says nothing (TimeoutError)."""
    data = b""
    while not data.endswith(b"\n"):
        left_s = deadline_s - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("request not complete in time")
        connection.settimeout(left_s)
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too long")
    return data


def _send(connection: socket.socket, answer: dict[str, Any]) -> None:
    connection.sendall(json.dumps(answer).encode() + b"\n")


def request(path: Path, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request to the service at ``path`` and return its answer (the client side).
    ControlError if no service answers there in ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        while True:
            try:
                sock.connect(str(path))
                break
            except FileNotFoundError:
                raise ControlError(f"no BMS is running ({path} does not exist)") from None
            except ConnectionRefusedError:
                raise ControlError(f"no BMS is running (nothing answers on {path})") from None
            except PermissionError:
                raise ControlError(
                    f"not allowed to talk to the BMS on {path} (owner and group only)"
                ) from None
            except BlockingIOError:  # its backlog is full: a Unix socket says so at once
                if time.monotonic() >= deadline_s:
                    raise ControlError(f"the BMS on {path} is too busy to answer") from None
                time.sleep(0.05)
            except OSError as exc:
                raise ControlError(f"cannot reach the BMS on {path}: {exc}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            return json.loads(_read_line(sock, deadline_s))
        except (ValueError, OSError) as exc:
            raise ControlError(f"the BMS on {path} did not answer properly: {exc}") from None
