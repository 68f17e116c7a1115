"""The loop runner and systemd, the offline tools, the latch file's owner, the store's writer and
what a start does with a store it cannot use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bms.app import LineWriter, LoopRunner, Reloader, StopRequest
from bms.config import load_config
from bms.service import tools
from bms.service.endpoint import ServiceEndpoint
from bms.store.latches import LatchStore
from bms.store.state import PackState, StateStore
from bms.store.writer import StoreWriter
from tests.cycles import write_config


class NeverCompleteCycle:
    """A cycle whose front-end never delivers a complete sample (READY must never go out)."""

    sample_complete = False
    last_cycle_healthy = True
    recorder = None

    def wait_for_first_sample(self, clock, timeout_s):
        return False

    def run(self, t_s, dt_s, lagging, stalled=False):
        return None

    def reconfigure(self, new):
        return []

    def open_and_wait(self, clock, timeout_s):
        return True


def test_ready_is_not_sent_by_a_reload_before_the_first_complete_sample(tmp_path, monkeypatch):
    """READY=1 means the BMS is running on a complete sample; a reload (SIGHUP) while it still
    waits for one must not send it."""
    config = load_config(write_config(tmp_path, {"loop": {"status_interval_s": 100.0}}))
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    import bms.app

    monkeypatch.setattr(bms.app, "_short_status", lambda s: "x")
    monkeypatch.setattr(bms.app, "status_record", lambda *a: {})
    runner = LoopRunner(
        config,
        NeverCompleteCycle(),
        LineWriter(open(os.devnull, "w")),  # noqa: SIM115 (closed with the writer)
        lambda r: "",
        ServiceEndpoint("c"),
    )
    runner.endpoint.publish = lambda *a: None
    stop = StopRequest()
    stop.reload.set()  # SIGHUP during start-up
    runner.run(stop, duration_s=0.5)
    messages = []
    while True:
        try:
            messages.append(listener.recv(4096).decode())
        except TimeoutError:
            break
    listener.close()
    assert not any("READY=1" in m for m in messages), messages
    reloading = [m for m in messages if "RELOADING=1" in m]
    assert all("MONOTONIC_USEC=" in m for m in reloading), reloading


class RecordingNotifier:
    def __init__(self):
        self.sent: list[dict] = []

    def send(self, **fields):
        self.sent.append(fields)
        return True


def test_a_refused_reload_sends_ready_again_and_an_applied_one_leaves_it_to_the_loop(tmp_path):
    """After RELOADING=1 systemd holds the unit in "reloading" (and `systemctl reload` blocks)
    until READY=1: a refused reload must send it, or the unit hangs there until its timeout
    (found against systemd in the qemu guest)."""
    path = write_config(tmp_path, {})
    good = path.read_text()
    requested = threading.Event()
    notifier = RecordingNotifier()
    reloader = Reloader(path, requested, notifier, is_ready=lambda: True)
    try:
        path.write_text(good + "\n[bogus_section]\nvalue = 1\n")
        requested.set()
        deadline_s = time.monotonic() + 10.0
        while len(notifier.sent) < 2 and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert [list(m) for m in notifier.sent] == [["RELOADING", "MONOTONIC_USEC"], ["READY"]]
        assert reloader.take() is None
        notifier.sent.clear()
        path.write_text(good)
        requested.set()
        while (config := reloader.take()) is None and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert config is not None
        assert [list(m) for m in notifier.sent] == [["RELOADING", "MONOTONIC_USEC"]]
    finally:
        reloader.close()


def test_offline_clear_does_not_edit_the_store_under_a_running_bms(tmp_path, capsys):
    """`bms faults clear` with no control socket (the default) takes the offline path; with a BMS
    running (holding the latch lock) it must refuse, and leave even a latch that only the
    store's copy holds."""
    config = load_config(write_config(tmp_path, {"service": {"control_socket": None}}))
    store = StateStore.open(config.store.path)
    store.log_fault("short_circuit", "2026-12-01T00:00:00+00:00", "short", {})
    store.close()
    running = LatchStore(config.protection.latch_file)
    running.acquire()  # a BMS runs on these files
    try:
        code = tools.faults(config, "clear", [])
    finally:
        running.release()
    out = capsys.readouterr()
    left = StateStore.open(config.store.path).latched()
    assert code == tools.EXIT_REFUSED, out
    assert "short_circuit" in left


def as_nobody(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, '/work/main')\n" + code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play root and the service user")
def test_sudo_bms_faults_clear_offline_does_not_lock_the_service_out(request):
    """The service runs as its own user (pybms; here nobody). `sudo bms faults clear` with the
    service stopped rewrites the latch file: it must keep the service's owner and mode, or the
    next start could not read it and would stay latched (and restart) until someone chowns it.
    Needs root, as sudo does."""
    import shutil
    import tempfile

    # not under tmp_path, whose parents are 0700: the service user must reach it
    parent = Path(tempfile.mkdtemp(prefix="pybms-test-"))
    request.addfinalizer(lambda: shutil.rmtree(parent, ignore_errors=True))
    state = parent / "state"
    state.mkdir()
    os.chmod(parent, 0o755)
    os.chown(state, 65534, 65534)
    latch = state / "latched.json"
    made = as_nobody(
        "from bms.store.latches import LatchStore, LatchRecord\n"
        f"s = LatchStore('{latch}'); s.acquire()\n"  # the service ran: it made the lock file
        "s.save({'short_circuit': LatchRecord(fault_id='short_circuit',"
        " latched_at_utc='t', description='d')}); s.release()\n"
    )
    assert made.returncode == 0, made.stderr
    LatchStore(latch).clear()  # root, with the service stopped
    start = as_nobody(
        "from bms.store.latches import LatchStore\n"
        f"s = LatchStore('{latch}'); s.acquire(); print(sorted(s.open_for_run()))\n"
    )
    assert start.returncode == 0 and start.stdout.strip() == "[]", (
        oct(latch.stat().st_mode),
        latch.stat().st_uid,
        start.stderr[-300:],
    )


def test_the_writer_thread_survives_a_record_that_raises_something_unexpected(tmp_path):
    """A record that raises something other than StoreError is dropped and counted; the thread
    lives on and writes what comes next."""
    store = StateStore.open(tmp_path / "s.sqlite")
    writer = StoreWriter(store)
    writer.start()
    writer.submit(lambda s: (_ for _ in ()).throw(ValueError("bad record")))
    time.sleep(0.3)
    writer.submit_state(PackState(soc=[0.5], soc_std=[0.01], soh=[1.0]))
    time.sleep(0.3)
    alive, failed = writer._thread.is_alive(), writer.failed
    writer.close()
    assert alive or failed, "writer thread died and nobody knows"


def test_both_copies_lost_is_not_a_silent_fresh_start(tmp_path):
    """Issue 7: a corrupt store is moved aside and the latched set comes from a second copy, or
    the BMS refuses to close until a person acknowledges. When the latch file is gone too,
    the start must hold the contactors open (latch_store_unreadable), not start fresh."""
    from bms.store.recorder import PackRecorder
    from tests.cycles import make_cycle

    store_path = tmp_path / "store.sqlite"
    store = StateStore.open(store_path)
    store.write_state(PackState(soc=[0.5] * 4, soc_std=[0.01] * 4, soh=[1.0] * 4))
    store.log_fault("short_circuit", "2026-12-01T00:00:00+00:00", "short", {})
    store.close()
    raw = bytearray(store_path.read_bytes())
    raw[100:4000] = b"\xa5" * 3900
    store_path.write_bytes(bytes(raw))  # and there is no latched.json
    recorder = PackRecorder(StateStore.open(store_path), 10.0, 5.0)
    cycle = make_cycle(tmp_path, recorder=recorder)
    assert cycle.latches.records, "both copies lost: started with nothing latched"


def test_a_front_end_reporting_an_unknown_fault_id_does_not_starve_the_watchdog(tmp_path):
    """A front-end reporting an id the table lacks is a front-end error (latched, contactors
    open), not an unhealthy loop: the watchdog is still kicked, so systemd does not restart
    a service that is doing its job."""
    from tests.cycles import make_cycle, run

    cycle = make_cycle(tmp_path)
    cycle.frontend.frontend_faults = ("a_fault_from_a_newer_driver",)
    healthy = []
    for n in range(50):
        run(cycle, 1, t0_s=n * 0.1)
        healthy.append(cycle.last_cycle_healthy)
    assert "frontend_error" in cycle.diagnosis.update({}, 0.0).latched
    assert any(healthy[10:]), "not one healthy cycle in 5 s: the watchdog is never kicked"


@pytest.mark.parametrize(
    "state_json",
    [
        '{"soc": [0.5, 0.5, 0.5, 0.5], "soc_std": [0.01, 0.01, 0.01, 0.01],'
        ' "soh": [1, 1, 1, 1], "written_utc": "2026-13-45"}',
        '{"soc": [0.5], "soc_std": [0.01], "soh": [1.0], "a_field_from_a_newer_pybms": 1}',
        '{"soc": [0.5], "soc_std": [0.01], "so',
    ],
)
def test_an_unreadable_snapshot_gives_way_to_the_ocv_instead_of_stopping_the_start(
    tmp_path, state_json
):
    """quick_check does not look inside the JSON text: a snapshot with a flipped byte, a bad
    timestamp or a field of a newer pybms must give way to an OCV start, not stop the start."""
    from bms.store.recorder import PackRecorder
    from tests.cycles import make_cycle

    store = StateStore.open(tmp_path / "store.sqlite")
    store._db.execute(
        "INSERT INTO snapshots (written_utc, state_json) VALUES ('x', ?)", (state_json,)
    )
    recorder = PackRecorder(store, 10.0, 5.0)
    cycle = make_cycle(tmp_path, recorder=recorder)
    assert cycle.estimate is not None
