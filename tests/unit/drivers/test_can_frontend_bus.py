"""Bus-level "CAN valid": error frames (linux/can/error.h classes, as SocketCAN delivers them),
failing receives and sends, the interface's own bus state, re-opening with back-off without
ever blocking the loop, and a 5,000-frame burst absorbed without loss (python-can virtual bus)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import can
import numpy as np
import pytest
from can.interfaces.virtual import VirtualBus

from bms.backends import FrontEndError
from bms.comms.dbc import DbcCodec
from bms.config import load_config
from bms.types import RelayStates
from drivers.can import frontend as frontend_module
from drivers.can import link as link_module
from drivers.can.contactors import CanContactors, relay_signals
from drivers.can.frontend import CanFrontEnd
from tests.unit.drivers.test_can_backends import PACK, Peer, cell_group, send_all, temp_group

# error classes (the error frame's can_id) and controller status bits, from linux/can/error.h
CAN_ERR_CRTL = 0x004
CAN_ERR_BUSOFF = 0x040
CAN_ERR_RESTARTED = 0x100
CAN_ERR_CNT = 0x200
CAN_ERR_CRTL_TX_PASSIVE = 0x20
CAN_ERR_CRTL_ACTIVE = 0x40
RECOVERY_S = 1.0  # bus_recovery_s's default


def error_frame(error_class: int, data: bytes = bytes(8)) -> can.Message:
    return can.Message(
        arbitration_id=error_class, data=data, is_error_frame=True, is_extended_id=False
    )


def crtl(status: int) -> bytes:
    return bytes([0, status, 0, 0, 0, 0, 0, 0])


def counters(tx: int, rx: int) -> bytes:
    return bytes([0, 0, 0, 0, 0, 0, tx, rx])


@pytest.fixture
def config(make_config):
    return load_config(make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}}))


@pytest.fixture
def bus(config):
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    yield bus
    bus.shutdown()


@pytest.fixture
def peer(bus, config):
    return Peer(bus, DbcCodec(config.can.dbc_file))


@pytest.fixture
def frontend(config):
    backend = CanFrontEnd(config, config.frontend.options)
    yield backend
    backend.close()


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def reopened(frontend: CanFrontEnd, times: int = 1) -> bool:
    """Poll as the loop does (the link adopts a re-opened bus in a poll); True once it has."""
    frontend.read(time.monotonic())
    return frontend.link.reopens >= times


def test_bus_off_is_reported_until_the_controller_restarted_and_recovery_passed(frontend, bus):
    t0 = time.monotonic()
    assert frontend.read(t0).frontend_faults == ()
    bus.send(error_frame(CAN_ERR_BUSOFF))
    assert frontend.read(t0 + 0.1).frontend_faults == ("can_bus_off",)
    bus.send(error_frame(CAN_ERR_RESTARTED))
    assert frontend.read(t0 + 0.1 + RECOVERY_S - 0.05).frontend_faults == ("can_bus_off",)
    assert frontend.read(t0 + 0.1 + RECOVERY_S + 0.05).frontend_faults == ()


def test_a_data_frame_proves_the_controller_is_back_on_the_bus(frontend, bus, peer):
    t0 = time.monotonic()
    bus.send(error_frame(CAN_ERR_BUSOFF))
    assert frontend.read(t0).frontend_faults == ("can_bus_off",)
    send_all(peer)  # a bus-off controller receives nothing: this one is back
    frontend.read(t0 + 0.1)
    assert frontend.read(t0 + 0.1 + RECOVERY_S + 0.05).frontend_faults == ()


PASSIVE_FRAMES = [
    error_frame(CAN_ERR_CRTL, crtl(CAN_ERR_CRTL_TX_PASSIVE)),
    error_frame(CAN_ERR_CNT, counters(130, 0)),  # transmit error counter past 127
]


@pytest.mark.parametrize("passive", PASSIVE_FRAMES, ids=["controller status", "error counters"])
def test_error_passive_is_a_warning_that_ends_when_the_controller_is_active(frontend, bus, passive):
    t0 = time.monotonic()
    bus.send(passive)
    assert frontend.read(t0).frontend_faults == ("can_error_passive",)
    bus.send(error_frame(CAN_ERR_CRTL, crtl(CAN_ERR_CRTL_ACTIVE)))
    frontend.read(t0 + 0.1)
    assert frontend.read(t0 + 0.1 + RECOVERY_S + 0.05).frontend_faults == ()


def test_error_passive_ends_after_a_quiet_time_without_error_frames(frontend, bus):
    t0 = time.monotonic()
    bus.send(error_frame(CAN_ERR_CRTL, crtl(CAN_ERR_CRTL_TX_PASSIVE)))
    quiet_s = frontend.link.health.policy.error_passive_quiet_s
    assert frontend.read(t0 + quiet_s - 0.1).frontend_faults == ("can_error_passive",)
    frontend.read(t0 + quiet_s + 0.1)  # no error frame since: the counters went down
    assert frontend.read(t0 + quiet_s + 0.2 + RECOVERY_S).frontend_faults == ()


def test_a_lasting_bus_off_reopens_the_bus_and_frames_flow_again(frontend, bus, peer):
    t0 = time.monotonic()
    bus.send(error_frame(CAN_ERR_BUSOFF))
    frontend.read(t0)
    reopen_s = frontend.link.health.policy.bus_off_reopen_s
    m = frontend.read(t0 + reopen_s + 0.1)  # still bus-off: shut down, re-opened on a thread
    assert m.frontend_faults == ("can_bus_off",)
    assert wait_for(lambda: reopened(frontend))
    time.sleep(max(0.0, t0 + reopen_s + 0.15 - time.monotonic()))  # real time catches up
    send_all(peer)  # the re-opened bus hears the pack again
    t1 = time.monotonic()
    m = frontend.read(t1)
    assert not np.isnan(m.cell_voltage_v).any()
    assert frontend.read(t1 + RECOVERY_S + 0.05).frontend_faults == ()


OPENED: list[FaultyBus] = []
"""The FaultyBus instances the link opened in this test, in order."""


class FaultyBus(VirtualBus):
    """A virtual bus whose receive and send fail with a chosen errno, and that reports a bus
    state of its own (as the PCAN, IXXAT and ETAS interfaces do)."""

    def __init__(self, channel):
        super().__init__(channel=channel)
        self.recv_errno: int | None = None
        self.send_errno: int | None = None
        self.reported = can.BusState.ACTIVE
        self.adapter_clock_s: float | None = None
        """Stamp received frames with this clock (seconds since the adapter started, as gs_usb
        and Kvaser hardware timestamps are), not the wall clock."""
        OPENED.append(self)

    def recv(self, timeout=None):
        if self.recv_errno is not None:
            raise can.CanOperationError("Failed to receive", self.recv_errno)
        frame = super().recv(timeout)
        if frame is not None and self.adapter_clock_s is not None:
            frame.timestamp = self.adapter_clock_s
        return frame

    def send(self, msg, timeout=None):
        if self.send_errno is not None:
            raise can.CanOperationError("Failed to transmit", self.send_errno)
        super().send(msg, timeout)

    @property
    def state(self):
        return self.reported


@pytest.fixture
def faulty(monkeypatch, config):
    """Every bus the link opens is a FaultyBus; ``gate`` (set by default) holds re-opens."""
    OPENED.clear()
    gate = threading.Event()
    gate.set()
    attempts = []
    failing = {"count": 0}

    def fake_open(can_config):
        attempts.append(time.monotonic())
        if OPENED:  # a re-open, not the first open
            gate.wait()
            if failing["count"] > 0:
                failing["count"] -= 1
                raise failing.get("error", FrontEndError("adapter not there yet"))
        return FaultyBus(channel=can_config.channel)

    monkeypatch.setattr(link_module, "open_bus", fake_open)
    frontend = CanFrontEnd(config, config.frontend.options)
    yield frontend, gate, attempts, failing
    gate.set()
    frontend.close()


def test_a_failing_receive_reopens_with_back_off_and_never_raises(faulty, peer):
    frontend, _, attempts, failing = faulty
    failing["count"] = 2  # the adapter comes back on the third attempt
    OPENED[0].recv_errno = errno.ENETDOWN
    t0 = time.monotonic()
    m = frontend.read(t0)  # no exception: the fault is reported instead
    assert m.frontend_faults == ("can_bus_off",)
    assert wait_for(lambda: reopened(frontend))
    assert len(OPENED) == 2 and len(attempts) == 1 + 3
    gaps_s = np.diff(attempts[1:])
    policy = frontend.link.health.policy
    # first retry after reopen_min_s, the next after twice that
    assert gaps_s[0] >= policy.reopen_min_s - 0.01 and gaps_s[1] >= 2 * policy.reopen_min_s - 0.01
    send_all(peer)
    t1 = time.monotonic()
    assert not np.isnan(frontend.read(t1).cell_voltage_v).any()
    assert frontend.read(t1 + RECOVERY_S + 0.05).frontend_faults == ()


def test_read_and_command_never_wait_for_a_reopen(faulty, config):
    frontend, gate, attempts, _ = faulty
    contactors = CanContactors(config, config.contactors.options)
    gate.clear()  # the adapter hangs while being re-opened
    OPENED[0].recv_errno = errno.ENODEV
    calls_done = threading.Event()

    def loop_calls():
        for k in range(20):
            frontend.read(time.monotonic())
            contactors.command(RelayStates())
            contactors.feedback(time.monotonic())
            frontend.balance(np.zeros(5, dtype=bool))
            del k
        calls_done.set()

    worker = threading.Thread(target=loop_calls, daemon=True)
    worker.start()
    try:
        assert calls_done.wait(timeout=5.0), "the loop's calls waited for the re-open"
        assert wait_for(lambda: len(attempts) == 2)  # the re-open hangs on its own thread
        assert frontend.read(time.monotonic()).frontend_faults == ("can_bus_off",)
        assert frontend.link.send_failures >= 40  # nothing went out meanwhile
    finally:
        gate.set()
        worker.join(timeout=5.0)
        contactors.close()
    assert wait_for(lambda: reopened(frontend))


def test_sends_that_keep_failing_are_a_fault_and_enobufs_does_not_reopen(faulty):
    frontend, _, attempts, _ = faulty
    bus = OPENED[0]
    bus.send_errno = errno.ENOBUFS  # the transmit queue is full: nobody acknowledges
    t0 = time.monotonic()
    frontend.balance(np.zeros(5, dtype=bool))
    fail_s = frontend.link.health.policy.transmit_fail_s
    assert frontend.read(t0 + fail_s - 0.05).frontend_faults == ()  # one full queue is no fault
    frontend.balance(np.zeros(5, dtype=bool))
    assert frontend.read(t0 + fail_s + 0.05).frontend_faults == ("can_transmit_failed",)
    assert len(attempts) == 1 and frontend.link.send_failures == 2
    bus.send_errno = None
    frontend.balance(np.zeros(5, dtype=bool))
    assert frontend.read(t0 + fail_s + 0.1).frontend_faults == ("can_transmit_failed",)
    assert frontend.read(t0 + fail_s + 0.15 + RECOVERY_S).frontend_faults == ()


def test_a_send_that_finds_the_interface_down_reopens_it(faulty):
    frontend, _, attempts, _ = faulty
    OPENED[0].send_errno = errno.ENETDOWN
    frontend.balance(np.zeros(5, dtype=bool))
    assert frontend.read(time.monotonic()).frontend_faults == ("can_bus_off",)
    assert wait_for(lambda: reopened(frontend))
    assert len(attempts) == 2


def test_the_interfaces_own_bus_state_counts(faulty):
    frontend, *_ = faulty
    bus = OPENED[0]
    t0 = time.monotonic()
    bus.reported = can.BusState.PASSIVE
    assert frontend.read(t0).frontend_faults == ("can_error_passive",)
    bus.reported = can.BusState.ERROR
    assert frontend.read(t0 + 0.1).frontend_faults == ("can_bus_off",)


def test_a_burst_of_5000_frames_is_absorbed_without_loss(make_config):
    """The per-poll drain limit only delays: every frame is read, none dropped or skipped."""
    slow = {"cell_voltage_timeout_s": 30.0, "temperature_timeout_s": 30.0, "pack_timeout_s": 30.0}
    config = load_config(
        make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}, "frontend": slow})
    )  # so values read at the end of a slow drain are not stale yet
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    peer = Peer(bus, DbcCodec(config.can.dbc_file))
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        _burst(frontend, peer)
    finally:
        frontend.close()
        bus.shutdown()


def _burst(frontend, peer):
    n_frames = 5000
    kinds = 5  # two cell groups, two temperature groups, the pack message
    for k in range(n_frames // kinds):
        volts = 3.0 + 0.001 * (k % 1000)
        peer.send("CMU_CellVoltages", cell_group(0, [volts] * 3))
        peer.send("CMU_CellVoltages", cell_group(1, [volts, volts, 0]))
        peer.send("CMU_CellTemperatures", temp_group(0, [k % 100] * 5))
        peer.send("CMU_CellTemperatures", temp_group(1, [k % 100] * 5))
        peer.send("CMU_PackMeasurements", {**PACK, "PackCurrent": float(k % 1000)})
    polls = 0
    while frontend.link.frames_received < n_frames and polls < 100_000:
        m = frontend.read(time.monotonic())
        polls += 1
    link, stats = frontend.link, frontend.stats
    assert link.frames_received == n_frames and link.unknown_frames == 0
    assert stats.dropped == 0 and stats.counter_jumps == 0
    last = n_frames // kinds - 1
    assert m.cell_voltage_v == pytest.approx([3.0 + 0.001 * (last % 1000)] * 5)
    assert m.cell_temp_c.tolist() == [last % 100] * 7
    assert m.current_a == pytest.approx(float(last % 1000))


# ------------------------------------------------------------------ bus-off needs evidence


def test_a_reopen_alone_does_not_end_a_bus_off(frontend, bus):
    """SocketCAN: closing and re-opening a raw socket does not restart a bus-off controller
    (only restart-ms or `ip link set ... type can restart` do), so a re-open proves nothing."""
    t0 = time.monotonic()
    bus.send(error_frame(CAN_ERR_BUSOFF))
    assert frontend.read(t0).frontend_faults == ("can_bus_off",)
    reopen_s = frontend.link.health.policy.bus_off_reopen_s
    frontend.read(t0 + reopen_s + 0.1)  # still bus-off: shut down, re-opened on a thread
    deadline_s = time.monotonic() + 10.0
    t_s = t0 + reopen_s + 0.1
    while frontend.link.reopens < 1:
        assert time.monotonic() < deadline_s, "the bus was not re-opened"
        t_s += 0.01
        frontend.read(t_s)
        time.sleep(0.01)
    # nothing on the bus since: no CAN_ERR_RESTARTED, no data frame
    for k in range(1, 5):
        assert frontend.read(t_s + k * RECOVERY_S).frontend_faults == ("can_bus_off",)
    bus.send(error_frame(CAN_ERR_RESTARTED))  # restart-ms restarted the controller
    deadline_s = time.monotonic() + 10.0
    t_s += 5 * RECOVERY_S
    while frontend.link.bus is None:  # a re-open may be under way: wait for its bus
        assert time.monotonic() < deadline_s
        t_s += 0.01
        frontend.read(t_s)
        time.sleep(0.01)
    bus.send(error_frame(CAN_ERR_RESTARTED))
    frontend.read(t_s + 0.01)
    assert frontend.read(t_s + 0.02 + RECOVERY_S).frontend_faults == ()


def test_a_bus_off_the_interface_reports_ends_when_it_reports_otherwise(faulty):
    frontend, *_ = faulty
    bus = OPENED[0]
    t0 = time.monotonic()
    bus.reported = can.BusState.ERROR
    assert frontend.read(t0).frontend_faults == ("can_bus_off",)
    bus.reported = can.BusState.ACTIVE  # the controller's own state: back on the bus
    frontend.read(t0 + 0.1)
    assert frontend.read(t0 + 0.15 + RECOVERY_S).frontend_faults == ()


# ------------------------------------------------------------------ one poll per cycle


def test_the_link_is_drained_once_per_cycle_time(config, peer):
    """The loop polls through the front-end's read() and the contactors' feedback() with the
    same cycle time: the second call must not spend another drain budget."""
    frontend = CanFrontEnd(config, config.frontend.options)
    contactors = CanContactors(config, config.contactors.options)
    try:
        send_all(peer)
        frontend.read(10.0)
        received = frontend.link.frames_received
        assert received == 6
        send_all(peer)
        contactors.feedback(10.0)  # the same cycle
        assert frontend.link.frames_received == received
        contactors.feedback(10.1)  # the next cycle
        assert frontend.link.frames_received == 2 * received
    finally:
        contactors.close()
        frontend.close()


def test_a_flooded_queue_is_drained_in_slices_of_a_short_period(make_config):
    """With a 10 ms loop a poll may take only a tenth of it; a queue of frames that takes far
    longer to decode is read over many polls, none lost."""
    slow = {"cell_voltage_timeout_s": 30.0, "temperature_timeout_s": 30.0, "pack_timeout_s": 30.0}
    config = load_config(
        make_config(
            {
                "pack": {"n_cells": 5, "n_temp_sensors": 7},
                "loop": {"period_s": 0.01},
                "frontend": slow,
            }
        )
    )
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    peer = Peer(bus, DbcCodec(config.can.dbc_file))
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        assert frontend.link.poll_budget_s <= 0.1 * config.loop.period_s
        n_frames = 5000  # tens of microseconds each to decode: far more than a millisecond
        for k in range(n_frames):
            peer.send("CMU_CellVoltages", cell_group(k % 2, [3.6, 3.6, 3.6]))
        frontend.read(time.monotonic())
        assert 0 < frontend.link.frames_received < n_frames
        for _ in range(100_000):
            if frontend.link.frames_received == n_frames:
                break
            frontend.read(time.monotonic())
        assert frontend.link.frames_received == n_frames and frontend.stats.dropped == 0
    finally:
        frontend.close()
        bus.shutdown()


# ------------------------------------------------------------------ a failing handler


def test_a_raising_handler_is_counted_and_the_poll_goes_on(config, peer, caplog, monkeypatch):
    """A front-end frame whose handling fails must neither escape into the contactors'
    feedback() (the backend that happened to poll) nor stop the rest of the queue."""
    frontend = CanFrontEnd(config, config.frontend.options)
    contactors = CanContactors(config, config.contactors.options)

    def broken(binding, decoded, t_s):
        raise KeyError(binding.signal)

    try:
        monkeypatch.setattr(frontend_module, "_apply", broken)
        send_all(peer)
        peer.send(
            "PDU_ContactorFeedback", {**relay_signals(RelayStates(), 0), "InterlockClosed": 1}
        )
        with caplog.at_level(logging.ERROR, logger="drivers.can.link"):
            feedback = contactors.feedback(10.0)  # polls first: the front-end's frames too
        assert feedback.valid  # the frame after the failing ones was still handled
        link = frontend.link
        assert link.handler_failures == 6 and link.frames_received == 7
        m = frontend.read(10.05)
        assert np.isnan(m.cell_voltage_v).all() and m.frame_errors == 6  # nothing refreshed
        # logged once per subscriber (with its traceback), not once per frame
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 4 and all(r.exc_info for r in errors)  # 4 messages, 6 frames
        monkeypatch.undo()
        send_all(peer)
        m = frontend.read(10.1)
        assert m.cell_voltage_v == pytest.approx([3.6, 3.601, 3.602, 3.603, 3.604])
    finally:
        contactors.close()
        frontend.close()


# ------------------------------------------------------------------ opening and re-opening


class ShakySocket(socket.socket):
    """A CAN socket whose buffer cannot be enlarged (``error``), as without CAP_NET_ADMIN and
    above net.core.rmem_max, or through something unexpected."""

    def __init__(self, error: BaseException):
        super().__init__(socket.AF_INET, socket.SOCK_DGRAM)
        self.error = error

    def setsockopt(self, *args):
        raise self.error


class SocketBus(VirtualBus):
    def __init__(self, channel, error: BaseException):
        super().__init__(channel=channel)
        self.socket = ShakySocket(error)
        self.shut = False

    def shutdown(self):
        self.shut = True
        self.socket.close()
        super().shutdown()


@pytest.fixture
def socket_buses(monkeypatch):
    opened: list[SocketBus] = []

    def open_with(error):
        def bus(interface, channel):
            opened.append(SocketBus(channel, error))
            return opened[-1]

        monkeypatch.setattr(can, "Bus", bus)
        return opened

    yield open_with
    for bus in opened:
        if not bus.shut:
            bus.shutdown()


def test_a_receive_buffer_that_cannot_grow_is_logged_not_fatal(config, socket_buses, caplog):
    opened = socket_buses(OSError(errno.EPERM, "Operation not permitted"))
    with caplog.at_level(logging.WARNING, logger="drivers.can.link"):
        bus = link_module.open_bus(config.can)
    assert bus is opened[0] and not bus.shut
    assert "receive buffer not enlarged" in caplog.text


def test_a_bus_whose_set_up_fails_is_shut_down_not_leaked(config, socket_buses):
    opened = socket_buses(RuntimeError("something unexpected"))
    with pytest.raises(RuntimeError):
        link_module.open_bus(config.can)
    assert opened[0].shut


def test_the_reopen_thread_survives_any_failure_and_retries(faulty, caplog):
    frontend, _, attempts, failing = faulty
    failing["count"] = 2
    failing["error"] = RuntimeError("the adapter's driver raised something unexpected")
    OPENED[0].recv_errno = errno.ENODEV
    with caplog.at_level(logging.WARNING, logger="drivers.can.link"):
        frontend.read(time.monotonic())
        assert wait_for(lambda: reopened(frontend))
    assert frontend.link.reopen_failures == 2 and len(attempts) == 1 + 3
    assert "re-opening CAN failed (attempt 1)" in caplog.text


# ------------------------------------------------------------------ timestamps


def test_frames_stamped_by_an_adapter_clock_are_not_stale_forever(faulty, peer, caplog):
    """gs_usb and Kvaser stamp frames with the adapter's clock (seconds since it started):
    taken for wall-clock time, every frame would be decades old."""
    frontend, *_ = faulty
    OPENED[0].adapter_clock_s = 1234.5
    with caplog.at_level(logging.WARNING, logger="drivers.can.link"):
        for k in range(3):
            send_all(peer)
            m = frontend.read(time.monotonic())
            assert m.stale_groups == () and not np.isnan(m.cell_voltage_v).any(), k
    assert frontend.link.foreign_timestamps == 3 * 6
    assert caplog.text.count("away from the wall clock") == 1  # said once, not per frame
