"""One python-can bus per (interface, channel), shared by the CAN backends of a process.

The front-end, the contactor driver and the publisher talk over the same bus, as the nodes of a
real pack do. Sharing one bus object (instead of one socket each) means every received frame is
read once and handed to whoever subscribed to its id; frames nobody wants are counted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

from cantools.database.can import Message

from bms.backends import FrontEndError
from bms.comms.dbc import DbcCodec
from bms.config import BmsConfig, CanConfig

log = logging.getLogger(__name__)

MAX_POLL_S = 0.005
"""Time one poll may spend draining frames, so a flooded (babbling) bus cannot stall the loop;
what is left is read by the next poll, and the values it carries go stale meanwhile."""

FrameHandler = Callable[[float, bytes], None]


def open_bus(can: CanConfig):
    """Open a python-can bus from the config; enlarge the SocketCAN receive buffer."""
    import can as python_can  # hardware library: imported only when a CAN backend is used

    try:
        bus = python_can.Bus(interface=can.interface, channel=can.channel)
    except (python_can.CanError, OSError, ValueError, ImportError) as exc:
        raise FrontEndError(
            f"cannot open CAN interface {can.interface!r} channel {can.channel!r}: {exc}"
        ) from None
    sock = getattr(bus, "socket", None)
    if isinstance(sock, socket.socket):
        # SocketCAN drops frames in bursts with the default buffer (notes/kernel-can-i2c-in-ci.md).
        # SO_RCVBUFFORCE needs CAP_NET_ADMIN; SO_RCVBUF is capped by net.core.rmem_max.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, can.receive_buffer_bytes)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, can.receive_buffer_bytes)
    return bus


class CanLink:
    """A shared bus, its DBC, and the subscribers of each frame id."""

    _links: ClassVar[dict[tuple[str, str], CanLink]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, can: CanConfig):
        self.key = (can.interface, can.channel)
        self.codec = DbcCodec(can.dbc_file)
        self.bus = open_bus(can)
        self.users = 0
        self.handlers: dict[int, list[FrameHandler]] = {}
        self.unknown_frames = 0
        self.errors = 0

    @classmethod
    def acquire(cls, config: BmsConfig) -> CanLink:
        """Return the process's link for the config's bus, opening it on first use."""
        if config.can is None:
            raise FrontEndError(f"{config.source}: a CAN backend needs a [can] section")
        key = (config.can.interface, config.can.channel)
        with cls._lock:
            link = cls._links.get(key)
            if link is None:
                link = cls._links[key] = cls(config.can)
            link.users += 1
            return link

    def release(self) -> None:
        """Drop one user; the last one shuts the bus down."""
        with self._lock:
            self.users -= 1
            if self.users == 0:
                self._links.pop(self.key, None)
                self.bus.shutdown()

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[CanLink]:
        """Release this user's hold if setting up the backend fails."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def subscribe(self, frame_id: int, handler: FrameHandler) -> None:
        self.handlers.setdefault(frame_id, []).append(handler)

    def poll(self, t_s: float) -> None:
        """Drain the receive queue without blocking and hand each frame to its subscribers,
        stamped with its arrival on the monotonic clock.

        python-can stamps frames on the wall clock (SocketCAN: in the kernel, on arrival), so a
        frame that waited in the queue while the loop was stalled keeps its age instead of
        looking fresh; one offset per poll maps wall to monotonic time.
        """
        import can as python_can

        wall_to_monotonic_s = time.monotonic() - time.time()
        budget_end_s = time.monotonic() + MAX_POLL_S
        while time.monotonic() < budget_end_s:
            try:
                frame = self.bus.recv(timeout=0.0)
            except python_can.CanError as exc:
                raise FrontEndError(f"CAN receive failed: {exc}") from None
            if frame is None:
                return
            if frame.is_error_frame or frame.is_remote_frame:
                self.errors += 1
                continue
            handlers = self.handlers.get(frame.arbitration_id)
            if handlers is None:
                self.unknown_frames += 1
                continue
            rx_t_s = t_s
            if frame.timestamp > 0.0:
                rx_t_s = min(t_s, frame.timestamp + wall_to_monotonic_s)
            data = bytes(frame.data)
            for handler in handlers:
                handler(rx_t_s, data)

    def send(self, message: Message, values: Mapping[str, float]) -> None:
        """Encode and send without waiting; a failed send is counted, never waited on."""
        if not send_message(self.bus, self.codec, message, values):
            self.errors += 1


def send_message(bus, codec: DbcCodec, message: Message, values: Mapping[str, float]) -> bool:
    """Encode ``values`` as ``message`` and send it without waiting; False if it failed."""
    import can as python_can

    frame = python_can.Message(
        arbitration_id=message.frame_id,
        data=codec.encode(message, values),
        is_extended_id=message.is_extended_frame,
    )
    try:
        bus.send(frame, timeout=0.0)
    except python_can.CanError as exc:
        log.debug("CAN send of %s failed: %s", message.name, exc)
        return False
    return True


class CanBackend:
    """Shared life cycle of the CAN backends: acquire the link in ``__init__`` inside
    ``link.released_on_error()``, and ``close()`` releases it exactly once."""

    link: CanLink | None

    def close(self) -> None:
        if self.link is not None:
            self.link.release()
            self.link = None


class RollingCounter:
    """Checks a frame's rolling counter: a frame that repeats the previous value is a frozen
    sender resending its last frame, so it proves nothing new (opendbc's counter check)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.repeats = 0

    def advanced(self, counter: float) -> bool:
        fresh = counter != self.last
        if not fresh:
            self.repeats += 1
        self.last = counter
        return fresh
