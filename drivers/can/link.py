"""One python-can bus per (interface, channel), shared by the CAN backends of a process.

The front-end, the contactor driver and the publisher talk over the same bus, as the nodes of a
real pack do. Sharing one bus object (instead of one socket each) means every received frame is
read once and handed to whoever subscribed to its id; frames nobody wants are counted.

The link also judges the bus itself ("CAN valid", :class:`BusHealth`): bus-off and error-passive
from the controller's error frames (SocketCAN delivers them to every raw socket that asks, and
python-can asks for all classes) or from ``bus.state`` where an interface reports it, and failing
receives and sends. A bus that is gone (interface down, adapter unplugged) or stays bus-off is
shut down and re-opened on a thread of its own with exponential back-off, so neither
:meth:`CanLink.poll` nor :meth:`CanLink.send` ever waits for it; meanwhile nothing is received
(values go stale) and nothing is sent (the contactor box's dead-man opens the relays).

**Bus-off on SocketCAN.** Closing and re-opening a raw socket does not touch the controller: a
bus-off SocketCAN controller restarts only when the interface is configured to restart by
itself (``ip link set can0 type can bitrate 500000 restart-ms 100``) or is restarted by hand
(``ip link set can0 type can restart``). So the link keeps ``can_bus_off`` until the controller
proves it is back (a ``CAN_ERR_RESTARTED`` error frame, or any data frame, which a bus-off
controller cannot receive), however often it re-opens; set ``restart-ms`` on every interface
pybms uses, or a bus-off lasts until someone restarts it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

from cantools.database.can import Message

from bms.backends import FrontEndError
from bms.comms.dbc import DbcCodec, DbcError
from bms.config import BmsConfig, CanConfig

log = logging.getLogger(__name__)

POLL_BUDGET_FRACTION = 0.1
"""Share of the loop's period one poll may spend draining frames, so a flooded (babbling) bus
cannot stall the loop (the link is polled once per cycle). What is left waits in the socket's
receive queue for the next poll, and the values it carries keep their arrival time meanwhile, so
they age as they should. The kernel drops frames only when that queue (``receive_buffer_bytes``)
is full; those drops are not counted here: the kernel counts them with SO_RXQ_OVFL as ancillary
data, which python-can's receive (it accepts its timestamp alone) cannot take. They show as
counter jumps on messages with a rolling counter."""

PLAUSIBLE_TIMESTAMP_S = 3600.0
"""A frame timestamp further than this from the wall clock is not wall-clock time (gs_usb and
Kvaser adapters stamp frames with their own clock, seconds since they started): the arrival time
of the poll is used instead. Far longer than a frame can wait in the receive queue."""

FrameHandler = Callable[[float, bytes], None]

# Error classes (the error frame's id) and controller status bits (data[1] of a CAN_ERR_CRTL
# frame), from linux/can/error.h.
CAN_ERR_CRTL = 0x004
CAN_ERR_BUSOFF = 0x040
CAN_ERR_RESTARTED = 0x100
CAN_ERR_CNT = 0x200
CAN_ERR_CRTL_RX_PASSIVE = 0x10
CAN_ERR_CRTL_TX_PASSIVE = 0x20
CAN_ERR_CRTL_ACTIVE = 0x40
ERROR_PASSIVE_COUNT = 128
"""An error counter (TEC or REC, data[6] and data[7] of a CAN_ERR_CNT frame) at or above this
puts the controller in error-passive (ISO 11898-1)."""

GONE_ERRNOS = frozenset({errno.ENETDOWN, errno.ENODEV, errno.ENXIO, errno.EBADF, errno.EPIPE})
"""A send failing with one of these means the interface is down or gone: re-open it. ENOBUFS
(transmit queue full: nobody acknowledges, or the controller is bus-off) is only counted."""

BUS_OFF = "can_bus_off"
ERROR_PASSIVE = "can_error_passive"
TRANSMIT_FAILED = "can_transmit_failed"
"""Diagnosis-table fault ids of the bus, listed in ``Measurement.frontend_faults``."""


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """How the bus is judged and recovered (the front-end's options set these)."""

    recovery_s: float = 1.0
    """A bus fault stays reported until its cause has been gone this long (debounce)."""
    error_passive_quiet_s: float = 5.0
    """Error-passive ends when the controller says so, or after this long without an error
    frame (not every driver reports the way back to error-active)."""
    transmit_fail_s: float = 0.25
    """Every send failing for this long is a fault (a single full queue is not)."""
    bus_off_reopen_s: float = 1.0
    """A bus-off lasting this long re-opens the bus (and again this long after each re-open,
    with the back-off below): re-initialising the controller is how most adapters leave bus-off.
    A SocketCAN controller restarts only by itself, with ``restart-ms`` (module docstring)."""
    reopen_min_s: float = 0.1
    reopen_max_s: float = 5.0
    """Back-off between re-open attempts: doubling from the first to the second."""


class BusHealth:
    """Bus-level "CAN valid": bus-off, error-passive and transmit failure, each debounced so a
    fault is listed from the first sign of it until ``recovery_s`` after its cause went away."""

    def __init__(self, policy: HealthPolicy):
        self.policy = policy
        self.bus_off = False
        self.bus_off_since_s = math.inf
        self._bus_off_by_state = False
        """The bus-off came from ``bus.state``, which also says when it is over."""
        self.down = False
        """The bus is shut down and being re-opened."""
        self.error_passive = False
        self._last_error_frame_s = -math.inf
        self._tx_failing_since_s: float | None = None
        self._last_seen_s = dict.fromkeys((BUS_OFF, ERROR_PASSIVE, TRANSMIT_FAILED), -math.inf)

    def on_error_frame(self, t_s: float, error_class: int, data: bytes) -> None:
        """Read one error frame (its id is the error class, linux/can/error.h)."""
        self._last_error_frame_s = t_s
        if error_class & CAN_ERR_BUSOFF:
            self._set_bus_off(t_s)
        if error_class & CAN_ERR_RESTARTED:
            self.bus_off = self._bus_off_by_state = False
        if error_class & CAN_ERR_CRTL and len(data) > 1:
            status = data[1]
            if status & (CAN_ERR_CRTL_RX_PASSIVE | CAN_ERR_CRTL_TX_PASSIVE):
                self._set_error_passive(t_s)
            elif status & CAN_ERR_CRTL_ACTIVE:
                self.error_passive = False
        if error_class & CAN_ERR_CNT and len(data) > 7:
            if max(data[6], data[7]) >= ERROR_PASSIVE_COUNT:
                self._set_error_passive(t_s)
            else:
                self.error_passive = False

    def on_state(self, t_s: float, state_name: str) -> None:
        """Read ``bus.state`` of an interface that reports it (``ERROR`` is bus-off)."""
        if state_name == "ERROR":
            self._set_bus_off(t_s)
            self._bus_off_by_state = True
            return
        if self._bus_off_by_state:  # the controller itself says it left bus-off
            self.bus_off = self._bus_off_by_state = False
        if state_name == "PASSIVE":
            self._last_error_frame_s = t_s
            self._set_error_passive(t_s)

    def on_frame(self) -> None:
        """A data frame arrived: a bus-off controller receives nothing, so it is back."""
        self.bus_off = self._bus_off_by_state = False

    def on_send(self, t_s: float, ok: bool) -> None:
        if ok:
            self._tx_failing_since_s = None
        elif self._tx_failing_since_s is None:
            self._tx_failing_since_s = t_s

    def on_lost(self, t_s: float) -> None:
        """The bus was shut down to be re-opened: no communication until it is."""
        self.down = True
        self._last_seen_s[BUS_OFF] = t_s

    def on_reopened(self, t_s: float) -> None:
        """The bus is open again. A bus-off stays until the controller proves it is back (a
        re-open restarts some adapters' controllers, never a SocketCAN one); the next re-open
        for it comes ``bus_off_reopen_s`` from now."""
        self.down = False
        self.error_passive = False
        self._tx_failing_since_s = None
        if self.bus_off:
            self.bus_off_since_s = t_s

    def _set_bus_off(self, t_s: float) -> None:
        if not self.bus_off:
            self.bus_off_since_s = t_s
        self.bus_off = True
        self._last_seen_s[BUS_OFF] = t_s

    def _set_error_passive(self, t_s: float) -> None:
        self.error_passive = True
        self._last_seen_s[ERROR_PASSIVE] = t_s

    def faults(self, t_s: float) -> tuple[str, ...]:
        """The bus faults at ``t_s``, each from its first sign (even one that came and went
        between two calls) until ``recovery_s`` after its cause went away; empty means CAN is
        valid. A bus-off hides the error-passive that led to it."""
        policy = self.policy
        if self.error_passive and t_s - self._last_error_frame_s > policy.error_passive_quiet_s:
            self.error_passive = False
        failing_since_s = self._tx_failing_since_s
        present = {
            BUS_OFF: self.bus_off or self.down,
            ERROR_PASSIVE: self.error_passive and not self.bus_off,
            TRANSMIT_FAILED: (
                failing_since_s is not None and t_s - failing_since_s >= policy.transmit_fail_s
            ),
        }
        listed = []
        for fault_id, is_present in present.items():
            if is_present:
                self._last_seen_s[fault_id] = max(self._last_seen_s[fault_id], t_s)
            if is_present or t_s - self._last_seen_s[fault_id] < policy.recovery_s:
                listed.append(fault_id)
        if BUS_OFF in listed and ERROR_PASSIVE in listed:
            listed.remove(ERROR_PASSIVE)
        return tuple(listed)


class Crc8SaeJ1850:
    """CRC-8 of SAE J1850: polynomial 0x1D, initial value 0xFF, final XOR 0xFF, not reflected
    (the CRC of AUTOSAR's E2E profile 1)."""

    def __init__(self) -> None:
        table = []
        for byte in range(256):
            crc = byte
            for _ in range(8):
                crc = ((crc << 1) ^ 0x1D) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
            table.append(crc)
        self._table = bytes(table)

    def __call__(self, data: bytes) -> int:
        crc = 0xFF
        table = self._table
        for byte in data:
            crc = table[crc ^ byte]
        return crc ^ 0xFF


CRC8_SAE_J1850 = Crc8SaeJ1850()
CHECKSUM_ATTRIBUTE = "ChecksumAlgorithm"
"""The DBC signal attribute that marks a message's checksum signal (see config/can/pybms.dbc)."""


class FrameChecksum:
    """The checksum byte of one message, as its DBC defines it: the CRC-8 SAE J1850 over the
    two low bytes of the frame id (low byte first) and every other data byte, in order."""

    def __init__(self, message: Message, signal_name: str):
        signal = message.get_signal_by_name(signal_name)
        aligned = signal.start % 8 == (0 if signal.byte_order == "little_endian" else 7)
        if signal.length != 8 or not aligned or signal.multiplexer_ids:
            raise DbcError(
                f"{message.name}.{signal_name}: a checksum must be one whole byte in every "
                "frame of the message (8 bits, byte-aligned, not multiplexed)"
            )
        self.signal_name = signal_name
        self.byte = signal.start // 8
        self._id_bytes = bytes((message.frame_id & 0xFF, (message.frame_id >> 8) & 0xFF))

    def compute(self, data: bytes) -> int:
        covered = self._id_bytes + data[: self.byte] + data[self.byte + 1 :]
        return CRC8_SAE_J1850(covered)

    def fill(self, data: bytes) -> bytes:
        out = bytearray(data)
        out[self.byte] = self.compute(data)
        return bytes(out)

    def verify(self, data: bytes) -> bool:
        return len(data) > self.byte and data[self.byte] == self.compute(data)


def checksum_of(message: Message) -> FrameChecksum | None:
    """The message's checksum, from the ``ChecksumAlgorithm`` attribute of its signals; None if
    the DBC defines none. An algorithm we do not implement is an error, not a silent skip."""
    found = None
    for signal in message.signals:
        attribute = (signal.dbc.attributes if signal.dbc else {}).get(CHECKSUM_ATTRIBUTE)
        if attribute is None:
            continue
        choices = attribute.definition.choices
        value = attribute.value
        algorithm = choices[value] if isinstance(value, int) and choices else str(value)
        if algorithm == "None":
            continue
        if algorithm != "CRC8_SAE_J1850":
            raise DbcError(f"{message.name}.{signal.name}: unknown checksum {algorithm!r}")
        if found is not None:
            raise DbcError(f"{message.name}: more than one checksum signal")
        found = FrameChecksum(message, signal.name)
    return found


def open_bus(can: CanConfig):
    """Open a python-can bus from the config and enlarge the SocketCAN receive buffer; a bus
    whose set-up fails after it opened is shut down, never leaked."""
    import can as python_can  # hardware library: imported only when a CAN backend is used

    try:
        bus = python_can.Bus(interface=can.interface, channel=can.channel)
    except (python_can.CanError, OSError, ValueError, ImportError) as exc:
        raise FrontEndError(
            f"cannot open CAN interface {can.interface!r} channel {can.channel!r}: {exc}"
        ) from None
    try:
        _enlarge_receive_buffer(bus, can)
    except BaseException:
        _shut_down(bus)
        raise
    return bus


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
"""Linux's value (asm-generic/socket.h, which ARM and x86 use); Python's socket module exports
the name only from 3.12 on."""


def _enlarge_receive_buffer(bus, can: CanConfig) -> None:
    """SocketCAN drops frames in bursts with the default buffer (notes/kernel-can-i2c-in-ci.md).
    SO_RCVBUFFORCE needs CAP_NET_ADMIN; SO_RCVBUF is capped by net.core.rmem_max. A buffer that
    cannot be enlarged is logged, not fatal: the bus works, bursts may overflow it."""
    sock = getattr(bus, "socket", None)
    if not isinstance(sock, socket.socket):
        return
    size = can.receive_buffer_bytes
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as exc:
            log.warning(
                "CAN %s: receive buffer not enlarged to %d bytes: %s", can.channel, size, exc
            )


def _shut_down(bus) -> None:
    """Shut a bus down that is being given up; a dying adapter may fail in any way."""
    try:
        bus.shutdown()
    except Exception as exc:
        log.debug("shutting a CAN bus down failed: %s", exc)


def _reports_state(bus) -> bool:
    """Whether the interface overrides ``BusABC.state`` (the base always says ACTIVE)."""
    import can as python_can

    return type(bus).state is not python_can.BusABC.state


@dataclass(eq=False)
class Subscription:
    """One subscriber's handler of one frame id; ``failures`` counts the frames its handler
    raised on (each such frame refreshes nothing of the subscriber's, so its values go stale)."""

    frame_id: int
    handler: FrameHandler
    subscriber: str
    failures: int = 0


class CanLink:
    """A shared bus, its DBC, the subscribers of each frame id, and the bus's health."""

    _links: ClassVar[dict[tuple[str, str], CanLink]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, can: CanConfig, period_s: float):
        """``period_s``: the control loop's period; a poll drains frames for at most
        :data:`POLL_BUDGET_FRACTION` of it."""
        self.key = (can.interface, can.channel)
        self.can_config = can
        self.poll_budget_s = POLL_BUDGET_FRACTION * period_s
        self.codec = DbcCodec(can.dbc_file)
        self.bus = open_bus(can)
        self._reports_state = _reports_state(self.bus)
        self.users = 0
        self.handlers: dict[int, list[Subscription]] = {}
        self.frames_received = 0
        self.unknown_frames = 0
        self.error_frames = 0
        self.send_failures = 0
        self.handler_failures = 0
        self.reopens = 0
        self.reopen_failures = 0
        self.foreign_timestamps = 0
        """Frames whose timestamp was not wall-clock time (stamped with their arrival instead)."""
        self.health = BusHealth(HealthPolicy())
        self.encoder = FrameEncoder(self.codec)
        self._polled_t_s: float | None = None
        self._reopen_lock = threading.Lock()
        self._reopened_bus = None
        self._reopen_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._reopen_delay_s = 0.0
        self._healthy_since_s = math.inf

    @classmethod
    def acquire(cls, config: BmsConfig) -> CanLink:
        """Return the process's link for the config's bus, opening it on first use."""
        if config.can is None:
            raise FrontEndError(f"{config.source}: a CAN backend needs a [can] section")
        key = (config.can.interface, config.can.channel)
        with cls._lock:
            link = cls._links.get(key)
            if link is None:
                link = cls._links[key] = cls(config.can, config.loop.period_s)
            link.users += 1
            return link

    def release(self) -> None:
        """Drop one user; the last one shuts the bus down (and stops a re-open under way)."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            self._links.pop(self.key, None)
        self._closing.set()
        thread = self._reopen_thread
        if thread is not None:
            thread.join(timeout=5.0)
        with self._reopen_lock:
            buses = [self.bus, self._reopened_bus]
            self.bus = self._reopened_bus = None
        for bus in buses:
            if bus is not None:
                bus.shutdown()

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[CanLink]:
        """Release this user's hold if setting up the backend fails."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def subscribe(
        self, frame_id: int, handler: FrameHandler, subscriber: str | None = None
    ) -> Subscription:
        """Hand every frame with ``frame_id`` to ``handler`` (named ``subscriber`` in logs)."""
        name = subscriber or getattr(handler, "__qualname__", repr(handler))
        subscription = Subscription(frame_id, handler, name)
        self.handlers.setdefault(frame_id, []).append(subscription)
        return subscription

    def poll(self, t_s: float) -> None:
        """Drain the receive queue without blocking and hand each frame to its subscribers,
        stamped with its arrival on the monotonic clock. Called by every backend that reads
        (the front-end's read, the contactors' feedback), it polls once per cycle time
        ``t_s``. Never raises: a failing receive shuts the bus down and starts re-opening it
        (:attr:`health` says so), and a handler that raises is counted against its subscriber.

        python-can stamps frames on the wall clock (SocketCAN: in the kernel, on arrival), so a
        frame that waited in the queue while the loop was stalled keeps its age instead of
        looking fresh; one offset per poll maps wall to monotonic time.
        """
        import can as python_can

        if t_s == self._polled_t_s:
            return
        self._polled_t_s = t_s
        if self.bus is None and not self._adopt_reopened_bus(t_s):
            return
        if self._reports_state:
            self._read_state(t_s)
        now_s = time.monotonic()
        wall_s = time.time()
        wall_to_monotonic_s = now_s - wall_s
        budget_end_s = now_s + self.poll_budget_s
        while time.monotonic() < budget_end_s:
            try:
                frame = self.bus.recv(timeout=0.0)
            except python_can.CanError as exc:
                self._lost(t_s, f"CAN receive failed: {exc}")
                return
            if frame is None:
                break
            rx_t_s = t_s
            stamp_s = frame.timestamp
            if stamp_s > 0.0:
                if abs(stamp_s - wall_s) <= PLAUSIBLE_TIMESTAMP_S:
                    rx_t_s = min(t_s, stamp_s + wall_to_monotonic_s)
                else:
                    self._foreign_timestamp(stamp_s - wall_s)
            if frame.is_error_frame:
                self.error_frames += 1
                self.health.on_error_frame(rx_t_s, frame.arbitration_id, bytes(frame.data))
                continue
            self.frames_received += 1
            self.health.on_frame()
            if frame.is_remote_frame:
                self.unknown_frames += 1
                continue
            subscriptions = self.handlers.get(frame.arbitration_id)
            if subscriptions is None:
                self.unknown_frames += 1
                continue
            data = bytes(frame.data)
            for subscription in subscriptions:
                try:
                    subscription.handler(rx_t_s, data)
                except Exception:
                    self._handler_failed(subscription, data)
        self._judge(t_s)

    def _handler_failed(self, subscription: Subscription, data: bytes) -> None:
        """Call from the ``except`` block: count, and log the first failure with its traceback,
        then every 1000th."""
        subscription.failures += 1
        self.handler_failures += 1
        count = subscription.failures
        if count == 1 or count % 1000 == 0:
            log.error(
                "%s failed on frame 0x%x %s (%d so far); its values are not refreshed",
                subscription.subscriber,
                subscription.frame_id,
                data.hex(),
                count,
                exc_info=count == 1,
            )

    def _foreign_timestamp(self, offset_s: float) -> None:
        self.foreign_timestamps += 1
        if self.foreign_timestamps == 1:
            log.warning(
                "CAN %s %s stamps frames %.0f s away from the wall clock (an adapter clock, "
                "not wall-clock time): the poll that reads a frame stamps it instead, so a "
                "frame that waited in the receive queue looks fresh",
                *self.key,
                offset_s,
            )

    def _read_state(self, t_s: float) -> None:
        import can as python_can

        try:
            state = self.bus.state
        except (python_can.CanError, NotImplementedError, OSError) as exc:
            log.debug("reading the CAN bus state failed: %s", exc)
            return
        if state is not None:
            self.health.on_state(t_s, state.name)

    def _judge(self, t_s: float) -> None:
        """Re-open a bus that stays bus-off; forget the back-off once the bus is healthy."""
        health = self.health
        if health.bus_off and t_s - health.bus_off_since_s >= health.policy.bus_off_reopen_s:
            self._lost(t_s, "the CAN controller stays bus-off")
            return
        if health.faults(t_s):
            self._healthy_since_s = math.inf
        elif self._healthy_since_s == math.inf:
            self._healthy_since_s = t_s
        elif t_s - self._healthy_since_s >= 10 * health.policy.recovery_s:
            self._reopen_delay_s = 0.0

    def send(self, message: Message, values: Mapping[str, float]) -> bool:
        """Encode and send without waiting; a failed send is counted (and judged), never waited
        on. False if the frame did not go out."""
        import can as python_can

        t_s = time.monotonic()
        if self.bus is None and not self._adopt_reopened_bus(t_s):
            self.send_failures += 1
            return False
        try:
            transmit(self.bus, message, self.encoder.encode(message, values))
        except python_can.CanError as exc:
            self.send_failures += 1
            self.health.on_send(t_s, ok=False)
            if self.send_failures == 1 or self.send_failures % 1000 == 0:
                failures = self.send_failures
                log.warning("CAN send of %s failed (%d so far): %s", message.name, failures, exc)
            if getattr(exc, "error_code", None) in GONE_ERRNOS:
                self._lost(t_s, f"CAN send failed: {exc}")
            return False
        self.health.on_send(t_s, ok=True)
        return True

    # ------------------------------------------------------------ re-open with back-off
    def _lost(self, t_s: float, reason: str) -> None:
        """Shut the bus down and re-open it on a thread of its own (never in the caller's)."""
        bus, self.bus = self.bus, None
        self.health.on_lost(t_s)
        log.error("%s: re-opening %s %s in the background", reason, *self.key)
        thread = threading.Thread(
            target=self._reopen, args=(bus, self._reopen_delay_s), name="can-reopen", daemon=True
        )
        self._reopen_thread = thread
        thread.start()

    def _reopen(self, old_bus, delay_s: float) -> None:
        """Retry until a bus opens or the link closes: any failure (not only the typed one an
        absent interface gives) is counted, logged now and then, and retried."""
        if old_bus is not None:
            _shut_down(old_bus)
        attempts = 0
        policy = self.health.policy
        while not self._closing.wait(delay_s):
            attempts += 1
            delay_s = min(max(2 * delay_s, policy.reopen_min_s), policy.reopen_max_s)
            try:
                bus = open_bus(self.can_config)
            except Exception as exc:
                self.reopen_failures += 1
                if attempts == 1 or attempts % 10 == 0:
                    log.warning(
                        "re-opening CAN failed (attempt %d): %s",
                        attempts,
                        exc,
                        exc_info=not isinstance(exc, FrontEndError),
                    )
                continue
            with self._reopen_lock:
                if self._closing.is_set():
                    _shut_down(bus)
                else:
                    self._reopened_bus = bus
                    self._reopen_delay_s = delay_s
            return

    def _adopt_reopened_bus(self, t_s: float) -> bool:
        with self._reopen_lock:
            bus, self._reopened_bus = self._reopened_bus, None
        if bus is None:
            return False
        self.bus = bus
        self._reports_state = _reports_state(bus)
        self.reopens += 1
        self.health.on_reopened(t_s)
        log.warning("CAN %s %s re-opened", *self.key)
        return True


class FrameEncoder:
    """Encodes the messages of one DBC with their checksums filled in where the DBC defines
    one (each message's checksum is looked up once)."""

    def __init__(self, codec: DbcCodec):
        self.codec = codec
        self._checksums: dict[str, FrameChecksum | None] = {}

    def checksum(self, message: Message) -> FrameChecksum | None:
        if message.name not in self._checksums:
            self._checksums[message.name] = checksum_of(message)
        return self._checksums[message.name]

    def encode(self, message: Message, values: Mapping[str, float]) -> bytes:
        checksum = self.checksum(message)
        if checksum is None:
            return self.codec.encode(message, values)
        return checksum.fill(self.codec.encode(message, {**values, checksum.signal_name: 0}))


def transmit(bus, message: Message, data: bytes) -> None:
    """Send ``data`` as ``message`` without waiting; raises python-can's CanError on failure."""
    import can as python_can

    frame = python_can.Message(
        arbitration_id=message.frame_id, data=data, is_extended_id=message.is_extended_frame
    )
    bus.send(frame, timeout=0.0)


def send_message(bus, encoder: FrameEncoder, message: Message, values: Mapping[str, float]) -> bool:
    """Encode ``values`` as ``message`` and send it without waiting; False if it failed. For a
    node with a bus handle of its own (the simulated pack)."""
    import can as python_can

    try:
        transmit(bus, message, encoder.encode(message, values))
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
    sender resending its last frame, so it proves nothing new (opendbc's counter check). With
    the counter's ``modulus``, a count that skips values is counted as lost frames. A counter
    that is not available (NaN: a code outside its range) proves nothing either."""

    def __init__(self, modulus: int | None = None) -> None:
        self.modulus = modulus
        self.last: float | None = None
        self.repeats = 0
        self.jumps = 0
        self.invalid = 0

    def advanced(self, counter: float) -> bool:
        if math.isnan(counter):
            self.invalid += 1
            return False
        fresh = counter != self.last
        if not fresh:
            self.repeats += 1
        elif self.modulus and self.last is not None and counter != (self.last + 1) % self.modulus:
            self.jumps += 1
        self.last = counter
        return fresh
