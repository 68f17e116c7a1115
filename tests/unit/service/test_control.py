"""The control socket server and its endpoint: the lock, stale and foreign files, slow
clients, clears the loop applied."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from bms.loop import ControlCycle
from bms.service import control
from bms.service.control import ControlError, ControlServer, ControlSocketBusy, request
from bms.service.endpoint import ServiceEndpoint
from tests.conftest import control_socket_path


def handlers():
    return {
        "status": lambda: {"ok": True, "status": "fine"},
        "faults": lambda: {"ok": True},
        "clear": lambda ids, peer: {"ok": True, "cleared": [], "refused": {}},
    }


@pytest.fixture
def sock_path():
    return control_socket_path()


def test_a_regular_file_at_the_socket_path_is_not_deleted(tmp_path):
    """control_socket pointing at a file that is not a socket (a typo) is an error at start;
    the file is left alone."""
    precious = tmp_path / "pack.toml"
    precious.write_text("[pack]\nn_cells = 16\n")
    server = ControlServer(precious, handlers())
    try:
        with pytest.raises((OSError, ControlSocketBusy)):
            server.start()
    finally:
        server.close()
    assert precious.exists(), "start() deleted a regular file"


def test_a_busy_first_instance_is_not_replaced_by_a_second(sock_path):
    """With the first instance's backlog full of idle clients, a second instance still finds
    the first one's lock and refuses; the first keeps its socket and answers once free."""
    first = ControlServer(sock_path, handlers())
    first.start()
    idle = []
    try:
        for _ in range(12):  # one being served, eight in the backlog, more refused
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError, OSError):
                s.connect(str(sock_path))
            idle.append(s)
        time.sleep(0.3)
        second = ControlServer(sock_path, handlers())
        try:
            with pytest.raises(ControlSocketBusy):
                second.start()
        finally:
            second.close()
    finally:
        for s in idle:
            s.close()
        answered = True
        try:
            request(sock_path, {"cmd": "status"}, timeout_s=10.0)
        except ControlError:
            answered = False
        first.close()
    assert answered, "the first BMS lost its control socket"


def test_a_client_that_trickles_bytes_cannot_hold_the_server(sock_path):
    """A request must arrive whole within CLIENT_TIMEOUT_S: a client that sends one byte every
    1.5 s cannot hold the only server thread; the next client is answered."""
    server = ControlServer(sock_path, handlers())
    server.start()
    stop = threading.Event()

    def trickle():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            while not stop.is_set():
                s.send(b" ")
                stop.wait(1.5)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    time.sleep(0.3)
    try:
        answer = request(sock_path, {"cmd": "status"}, timeout_s=6.0)  # 3x CLIENT_TIMEOUT_S
    except ControlError as exc:
        answer = exc
    finally:
        stop.set()
        thread.join()
        server.close()
    assert isinstance(answer, dict) and answer["ok"], answer


def test_a_clear_that_the_loop_applied_is_not_reported_as_unanswered():
    """A clear the loop picked up just before the endpoint's wait ran out is applied and
    recorded in the asker's name, so the asker must be told it was cleared. Here the loop
    picks it up 1.9 s in and takes 0.3 s (a latch write with two fsyncs on an SD card)."""
    applied = []

    def slow_clear(ids, who):
        time.sleep(0.3)
        applied.append((ids, who))
        return {"ok": True, "cleared": ids, "refused": {}}

    fake = SimpleNamespace(
        requests=queue.SimpleQueue(),
        clear_latched=slow_clear,
        errors=SimpleNamespace(report=lambda *a: None),
    )
    endpoint = ServiceEndpoint("c.toml")
    endpoint.cycle = fake

    def loop():
        time.sleep(control.CLEAR_TIMEOUT_S - 0.1)
        ControlCycle._serve_requests(fake)

    thread = threading.Thread(target=loop)
    thread.start()
    answer = endpoint.clear(["short_circuit"], SimpleNamespace(name="alice"))
    thread.join()
    assert applied, "the loop did not apply it"
    assert answer.get("cleared") == ["short_circuit"], answer
