"""sd_notify and the journal's native protocol, against real datagram sockets."""

from __future__ import annotations

import logging
import os
import socket
import tempfile

import pytest

from bms.service.journal import JournalHandler, encode_fields, journal_wanted
from bms.service.notify import Notifier


@pytest.fixture
def listener():
    """A datagram socket bound where systemd's would be (a short path under /tmp)."""
    directory = tempfile.mkdtemp(prefix="pybms-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(65536).decode()
    return dict(line.split("=", 1) for line in data.split("\n") if line)


def test_ready_status_and_stopping_arrive_as_systemd_reads_them(listener):
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("closed, SOC 80 %")
    assert received(sock) == {"READY": "1", "STATUS": "closed, SOC 80 %"}
    notifier.status("open")
    assert received(sock) == {"STATUS": "open"}
    notifier.stopping()
    assert received(sock)["STOPPING"] == "1"


def test_abstract_namespace_addresses_work():
    name = f"pybms-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).ready("up")
        assert received(sock)["READY"] == "1"
    finally:
        sock.close()


def test_the_watchdog_is_kicked_at_half_its_interval(listener):
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval_s == 1.0
    kicks = [t for t in (0.0, 0.5, 0.99, 1.0, 1.5, 2.2) if notifier.watchdog(t)]
    assert kicks == [0.0, 1.0, 2.2]
    assert [received(sock) for _ in kicks] == [{"WATCHDOG": "1"}] * 3


def test_a_watchdog_meant_for_another_process_is_ignored(listener):
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval_s is None


def test_without_systemd_everything_is_a_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("up") and not notifier.watchdog(0.0) and not notifier.stopping()


def test_a_vanished_socket_is_counted_not_raised(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.ready("up")
    assert notifier.failures == 1


def test_fields_are_encoded_as_the_native_protocol_specifies():
    assert encode_fields({"MESSAGE": "hi", "PRIORITY": "3"}) == b"MESSAGE=hi\nPRIORITY=3\n"
    two_lines = "a\nbcd"
    expected = b"MESSAGE\n" + bytes([5, 0, 0, 0, 0, 0, 0, 0]) + b"a\nbcd\n"
    assert encode_fields({"MESSAGE": two_lines}) == expected


def test_journal_records_carry_fault_id_and_cell(listener):
    path, sock = listener
    handler = JournalHandler(path)
    logger = logging.getLogger("pybms-journal-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("fault latched: %s", "short_circuit", extra={"fault_id": "short_circuit"})
        fields = received(sock)
        assert fields["MESSAGE"] == "fault latched: short_circuit"
        assert fields["PRIORITY"] == "3"
        assert fields["FAULT_ID"] == "short_circuit"
        assert fields["SYSLOG_IDENTIFIER"] == "pybms"
        assert "CELL" not in fields
        logger.warning("cell %d high", 3, extra={"cell": 3})
        assert received(sock)["CELL"] == "3"
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_the_journal_is_used_only_where_stderr_goes_to_it(tmp_path):
    existing = tmp_path / "socket"
    existing.touch()
    stream = tmp_path / "stream"
    with open(stream, "w") as f:
        st = os.fstat(f.fileno())
        ours = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_wanted(ours, str(existing), stderr_fd=f.fileno())
        assert not journal_wanted({}, str(existing), stderr_fd=f.fileno())
        assert not journal_wanted(ours, str(tmp_path / "none"), stderr_fd=f.fileno())
        # inherited from a parent whose stderr was the journal, but ours is not
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert not journal_wanted(other, str(existing), stderr_fd=f.fileno())
