"""``python -m hil.virtual --rig-config RIG.toml --board-config BOARD.toml``: the virtual rig
as a process of its own.

It serves every instrument of the rig config on loopback (``tcp://127.0.0.1:0`` binds a free
port, ``pty`` a pseudo-terminal), runs the board config's simulated pack on the board's CAN bus
(python-can's own configuration applies: ``CAN_CONFIG`` in the environment carries a
udp_multicast port), prints one JSON line ``{"ready": true, "addresses": {...}}`` and runs
until SIGTERM, SIGINT or the end of its standard input (the harness that started it is gone).
Exit codes: 0 stopped, 2 a config that cannot be used, 3 the bus or a port cannot be opened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading

from bms.backends import FrontEndError
from bms.config import ConfigError, load_config
from hil.config import PTY, RigConfigError, load_rig_config
from hil.instruments.transport import Address
from hil.virtual.rig import VirtualRig
from hil.virtual.scpi import PtyServer, TcpServer

log = logging.getLogger("hil.virtual")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.virtual", description=__doc__)
    parser.add_argument("--rig-config", required=True)
    parser.add_argument("--board-config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        rig = load_rig_config(args.rig_config)
        board = load_config(args.board_config)
        virtual = VirtualRig(rig, board)
    except (RigConfigError, ConfigError) as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{args.rig_config}: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    servers = []
    try:
        for name, device in virtual.devices.items():
            address = rig.instruments[name].address
            if address == PTY:
                server: TcpServer | PtyServer = PtyServer(device, name)
            else:
                server = TcpServer(device, name, Address.parse(address).port)
            servers.append(server)
            server.start()
        virtual.pack.start()
    except (OSError, FrontEndError) as exc:
        log.error("cannot start the virtual rig: %s", exc)
        for server in servers:
            server.close()
        return 3
    addresses = {server.name: server.address for server in servers}
    print(json.dumps({"ready": True, "addresses": addresses}), flush=True)
    log.info("virtual rig %r running: %s", rig.rig.name, addresses)

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.read(4096):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    stop.wait()
    virtual.pack.stop()
    for server in servers:
        server.close()
    log.info("virtual rig stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
