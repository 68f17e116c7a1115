"""The board under test: ``bms run`` in a process of its own, on this machine or over ssh,
judged by what it prints (one JSON status line per interval), by ``bms status --json`` and by
its exit code, exactly as a person or a tool would see it.

The BMS is started through ``sh -c 'echo $$; exec env ... bms run ...'``: its first line is
its own process id (``exec`` keeps it), so the rig can stop, hang (SIGSTOP) or kill it on a
board it reaches only over ssh as on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from bms.service.control import ControlError, request
from hil.config import RigConfig

STATUS_TIMEOUT_S = 20.0
"""For one ``bms status`` / ``bms faults`` call (a Python start on a slow board included)."""

BOARD_PATH_OPTIONS = (
    ("pack", "cell_params"),
    ("can", "dbc_file"),
    ("protection", "limits"),
    ("sim", "load", "drive_cycle_file"),
)
"""The board config's options that name existing files relative to it (bms/config.py,
drivers/sim/options.py): made absolute when a virtual rig writes its copy elsewhere."""


class BoardError(Exception):
    """The board under test cannot be started, reached or stopped as the rig needs."""


def derive_virtual_board_config(
    source: Path, run_dir: Path, can_interface: str, can_channel: str, deadman_hold_s: float
) -> Path:
    """A copy of the board config for one virtual-rig run: on the run's CAN bus, with its
    latch file, state store and control socket the run's own, and the virtual contactor box's
    dead-man at the rig config's hold time. Everything else is the board's config as written."""
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    for keys in BOARD_PATH_OPTIONS:
        section = data
        for key in keys[:-1]:
            section = section.get(key, {})
        if keys[-1] in section:
            section[keys[-1]] = str((source.parent / section[keys[-1]]).resolve())
    data.setdefault("can", {}).update(interface=can_interface, channel=can_channel)
    data["protection"]["latch_file"] = str(run_dir / "latched.json")
    if "store" in data:
        data["store"]["path"] = str(run_dir / "state.sqlite")
    # a Unix socket path must be short: /tmp, not the run directory
    sock = Path(tempfile.gettempdir()) / f"pybms-hil-{uuid.uuid4().hex[:12]}.sock"
    data.setdefault("service", {})["control_socket"] = str(sock)
    data.setdefault("sim", {})["deadman_timeout_s"] = deadman_hold_s
    path = run_dir / "board.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


@dataclass
class StatusLine:
    t_s: float
    """Arrival on the rig's monotonic clock."""
    record: dict


class NotifyListener:
    """A NOTIFY_SOCKET as systemd binds one, to hear the BMS's READY and watchdog kicks."""

    def __init__(self, directory: Path):
        self.path = directory / f"notify-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rig-notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536).decode(errors="replace")
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def kicks(self, after_s: float = -float("inf"), until_s: float = float("inf")) -> list[float]:
        return [t for t, f in self.messages if "WATCHDOG" in f and after_s < t <= until_s]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


@dataclass
class BmsProcess:
    """One ``bms run`` of the board."""

    board: Board
    proc: subprocess.Popen
    started_s: float
    log_path: Path
    notify: NotifyListener | None
    pid: int | None = None
    lines: list[StatusLine] = field(default_factory=list)
    summary: dict | None = None
    killed: bool = False
    """The test killed it on purpose: its exit code and summary are not judged."""
    _pid_known: threading.Event = field(default_factory=threading.Event)

    def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.strip()
            if self.pid is None and line.isdigit():
                self.pid = int(line)
                self._pid_known.set()
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a status line: ssh's banner, say
            if record.get("summary"):
                self.summary = record
            else:
                self.lines.append(StatusLine(time.monotonic(), record))
        self.proc.stdout.close()
        self._pid_known.set()

    def wait_for_pid(self, timeout_s: float) -> int:
        if not self._pid_known.wait(timeout_s) or self.pid is None:
            raise BoardError(
                f"the board did not start bms (no process id within {timeout_s:g} s): "
                f"{self.stderr_tail()}"
            )
        return self.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: signal.Signals) -> None:
        self.board.signal(self.wait_for_pid(5.0), sig)

    def status(self) -> dict:
        """``bms status --json`` of this run."""
        return self.board.status()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; the exit code (0: contactors confirmed open)."""
        if self.alive():
            with contextlib.suppress(BoardError):
                self.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BoardError(f"bms did not stop within {timeout_s:g} s of SIGTERM") from None
        finally:
            if self.notify is not None:
                self.notify.close()

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Board:
    """How the rig reaches the board: a command prefix (none, or ssh) and its bms."""

    def __init__(
        self,
        rig: RigConfig,
        config_path: Path,
        control_socket: Path | None,
        env: dict[str, str],
        log_dir: Path,
    ):
        board = rig.board
        self.local = board.launch == "local"
        self.config_path = config_path
        self.control_socket = control_socket
        self.remote_config = board.remote_config or str(config_path)
        self.env = env
        self.log_dir = log_dir
        self.prefix = [] if self.local else ["ssh", "-o", "BatchMode=yes", board.ssh_target]
        default_bms = [str(Path(sys.executable).with_name("bms"))] if self.local else ["bms"]
        self.bms = board.bms_command or default_bms
        self.runs = 0

    def _argv(self, argv: list[str]) -> list[str]:
        """``argv`` as run on the board (ssh passes the remote shell one string)."""
        return argv if self.local else [*self.prefix, shlex.join(argv)]

    def start(self, watchdog_usec: int | None = None) -> BmsProcess:
        """``bms run`` with JSON status lines; with ``watchdog_usec`` (a local board) systemd's
        watchdog environment and a NOTIFY_SOCKET the rig listens on."""
        self.runs += 1
        env = dict(self.env)
        notify = None
        if watchdog_usec is not None:
            if not self.local:
                raise BoardError("the watchdog is only observable on a local board")
            notify = NotifyListener(Path(tempfile.gettempdir()))
            env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
        run = [*self.bms, "run", "--config", self.remote_config, "--status-format", "json"]
        assignments = [f"{key}={value}" for key, value in env.items()]
        script = "echo $$; exec " + shlex.join(["env", *assignments, *run])
        log_path = self.log_dir / f"bms-{self.runs}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                self._argv(["sh", "-c", script]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
        process = BmsProcess(self, proc, time.monotonic(), log_path, notify)
        threading.Thread(target=process.read_stdout, name="bms-stdout", daemon=True).start()
        return process

    def signal(self, pid: int, sig: signal.Signals) -> None:
        if self.local:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                raise BoardError(f"bms (pid {pid}) is not running") from None
            return
        done = self.run(["kill", "-s", sig.name.removeprefix("SIG"), str(pid)], bms=False)
        if done.returncode != 0:
            raise BoardError(f"kill -{sig.name} {pid} on the board failed: {done.stderr.strip()}")

    def run(self, args: list[str], bms: bool = True) -> subprocess.CompletedProcess:
        """A short command on the board (``bms ARGS`` by default)."""
        argv = [*self.bms, *args] if bms else args
        try:
            return subprocess.run(
                self._argv(argv), capture_output=True, text=True, timeout=STATUS_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise BoardError(
                f"{shlex.join(argv)} took longer than {STATUS_TIMEOUT_S:g} s"
            ) from None

    def status(self) -> dict:
        """What ``bms status --json`` prints of the running BMS. On a local board it is asked
        on its control socket directly (the request ``bms status`` makes): a Python start per
        status would take a core from the BMS on a small or busy machine."""
        if self.local and self.control_socket is not None:
            try:
                answer = request(self.control_socket, {"cmd": "status"})
            except ControlError as exc:
                raise BoardError(f"bms status: {exc}") from None
            if not answer.get("ok"):
                raise BoardError(f"bms status: {answer.get('error')}")
            return answer["status"]
        done = self.run(["status", "--json", "--config", self.remote_config])
        if done.returncode != 0:
            raise BoardError(f"bms status failed ({done.returncode}): {done.stderr.strip()}")
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            raise BoardError(f"bms status printed no JSON: {done.stdout[:200]!r}") from None

    def clear_faults(self) -> list[str]:
        """``bms faults clear`` with no BMS running (it clears the files directly): the ids it
        cleared."""
        done = self.run(["faults", "clear", "--config", self.remote_config])
        if done.returncode != 0:
            raise BoardError(f"bms faults clear failed ({done.returncode}): {done.stderr.strip()}")
        cleared = done.stdout.strip().removeprefix("cleared:").strip()
        return [] if cleared == "nothing was latched" else [f.strip() for f in cleared.split(",")]
