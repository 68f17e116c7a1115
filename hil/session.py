"""One rig run from start to end: the lock, the virtual rig (on a virtual rig), the instruments,
the rig's CAN monitor and the board, opened in that order and closed in reverse.

On a virtual rig with ``[can] channel = "auto"`` each run has a CAN bus of its own: a
multicast group and a UDP port picked at random (python-can's udp_multicast delivers every
group's datagrams to every socket bound to a port, so the port is what keeps parallel runs
apart), with a hop limit of 0 so no frame leaves this machine. The BMS and the virtual rig get
the port and the hop limit through python-can's ``CAN_CONFIG`` environment variable, so the
BMS runs with its config's ``[can]`` as written (interface and channel) and nothing else
changed. A virtual rig may name a real bus instead (``socketcan`` on ``vcan0`` in the qemu
guest of tests/kernel).
"""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bms.config import BmsConfig, ConfigError, load_config
from hil.board import Board, derive_virtual_board_config
from hil.canbus import BusMonitor
from hil.config import AUTO, RigConfig, RigConfigError, check_against_board, load_rig_config
from hil.lock import RigLock
from hil.report import Report
from hil.rig import Rig, VirtualRigProcess


class RigSetupError(Exception):
    """The run cannot start: a config, the lock, the virtual rig or an instrument."""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def pick_multicast_group() -> str:
    """A group in 239.192.0.0/14, IPv4's organisation-local scope (RFC 2365)."""
    r = random.SystemRandom()
    return f"239.{r.randint(192, 195)}.{r.randint(0, 255)}.{r.randint(1, 254)}"


@dataclass
class RigSession:
    rig_config_path: Path
    kind: str
    run_dir: Path

    def open(self) -> RigSession:
        self._resources = ExitStack()
        try:
            self._open()
        except BaseException:
            self._resources.close()
            raise
        return self

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            config = load_rig_config(self.rig_config_path)
        except RigConfigError as exc:
            raise RigSetupError("\n".join(exc.problems)) from None
        if config.rig.kind != self.kind:
            raise RigSetupError(
                f"{self.rig_config_path}: [rig] kind is {config.rig.kind!r}, but the run asked "
                f"for --rig={self.kind}"
            )
        self.report = Report(self.run_dir, config.rig.name)
        lock_path = config.rig.lock_file or (
            self.run_dir / "rig.lock"
            if config.rig.kind == "virtual"
            else Path(tempfile.gettempdir()) / f"pybms-hil-{config.rig.name}.lock"
        )
        lock = RigLock(lock_path, config.rig.name)
        lock.acquire()  # RigBusy
        self._resources.callback(lock.release)

        board_env: dict[str, str] = {}
        monitor_can = {"interface": config.can.interface, "channel": config.can.channel}
        if config.can.port is not None:
            monitor_can["port"] = config.can.port
        if config.rig.kind == "virtual":
            if config.can.channel == AUTO:
                port = config.can.port or free_udp_port()
                monitor_can.update(channel=pick_multicast_group(), port=port, hop_limit=0)
                board_env["CAN_CONFIG"] = json.dumps({"port": port, "hop_limit": 0})
            board_config_path = derive_virtual_board_config(
                config.board.config,
                self.run_dir,
                config.can.interface,
                monitor_can["channel"],
                config.contactor_box.deadman_hold_s,
            )
            virtual = VirtualRigProcess(
                self.rig_config_path,
                board_config_path,
                {**os.environ, **board_env},
                self.run_dir / "virtual-rig.log",
            )
            self._resources.callback(virtual.stop)
            config = config.with_addresses(virtual.addresses)
            self.virtual: VirtualRigProcess | None = virtual
        else:
            board_config_path = config.board.config
            self.virtual = None
        self.config: RigConfig = config
        self.bms_config: BmsConfig = self._board_config(board_config_path)
        if self.virtual is not None:
            self._resources.callback(self._remove_socket_files)

        rig = Rig(config)
        self._resources.callback(rig.close)
        rig.connect()
        self._resources.callback(rig.shut_down)
        rig.set_up()
        self.rig = rig
        assert self.bms_config.can is not None
        self.monitor = BusMonitor(monitor_can, self.bms_config.can.dbc_file)
        self._resources.callback(self.monitor.close)
        self.board = Board(
            config,
            board_config_path,
            self.bms_config.service.control_socket,
            board_env,
            self.run_dir,
        )

    def _board_config(self, path: Path) -> BmsConfig:
        try:
            bms_config = load_config(path)
        except ConfigError as exc:
            raise RigSetupError("\n".join(exc.problems)) from None
        problems = check_against_board(self.config, bms_config)
        if bms_config.can is None:
            problems.append(f"{path}: the board talks CAN; its config has no [can] section")
        if bms_config.service.control_socket is None:
            problems.append(
                f"{path}: [service] control_socket is not set: the rig reads the BMS's status "
                "through `bms status`"
            )
        if problems:
            raise RigSetupError("\n".join(f"{self.rig_config_path}: {p}" for p in problems))
        return bms_config

    def _remove_socket_files(self) -> None:
        """The control socket a virtual run put in /tmp, and the lock file beside it, once
        every BMS of the run has stopped (a killed one leaves its socket behind)."""
        sock = self.bms_config.service.control_socket
        assert sock is not None
        for path in (sock, sock.with_name(sock.name + ".lock")):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._resources.close()
