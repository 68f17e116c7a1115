"""CAN over a real SocketCAN bus (vcan0 in the guest's kernel), between separate processes.

- ``bms plant`` (the simulated pack alone) and ``bms run`` (the BMS alone, on socketcan/vcan0)
  as two processes: the contactors close, the SOC, cell voltages and current come through,
  and an open wire injected into the plant latches ``cell_voltage_invalid`` and opens them.
- A 5,000-frame burst from another process into the CAN front-end, while the front-end is not
  reading (the worst case: everything waits in the socket's receive buffer): nothing lost,
  nothing out of order, nothing dropped by the front-end's own checks.
- Request/response with a contactor box in another process: round trips per second.

Everything here runs 15-40 times slower than on the host (software emulation), so the
configs' timeouts are scaled up and the waits are generous.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cantools
import pytest

from bms.config import load_config
from bms.types import RelayStates
from tests.conftest import BMS, REPO, merge
from tests.kernel.guest.can_peer import burst_frame, cell_groups
from tests.kernel.guest.conftest import LOGS
from tests.kernel.slow_guest import SLOW_GUEST_CONFIG

VCAN = "vcan0"
PEER = Path(__file__).with_name("can_peer.py")
DBC = REPO / "config" / "can" / "pybms.dbc"
SOCKETCAN = {"can": {"interface": "socketcan", "channel": VCAN}}

OPENED = {"opening", "fault"}
INJECT_AT_S = 30.0
"""Plant time of the open wire. The plant starts once the BMS waits for it; its clock starts
before its first step, which loads the compiled kernels (seconds here), and the BMS closes
within a few seconds of the first frames."""


class Process:
    """A child process whose stdout lines are collected by a thread, stderr into a file."""

    def __init__(self, args: list[str], name: str, stdin: int | None = None):
        self.log_path = log_path = LOGS / f"{name}.log"
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            args,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()  # None: stdout closed
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout_s: float) -> str:
        """The next line of stdout; an AssertionError if none comes in time or it closed."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
            problem = f"no output within {timeout_s:.0f} s"
        else:
            problem = "stdout closed"
        if line is None:
            try:
                exit_code = self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                exit_code = None
            raise AssertionError(
                f"{' '.join(self.proc.args[:2])}: {problem} (exit code {exit_code}); "
                f"stderr:\n{self.stderr()}"
            )
        return line

    def output(self) -> list[str]:
        """Every stdout line still unread (after the process ended)."""
        lines = []
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                lines.append(line)
        return lines

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-4000:]

    def wait(self, timeout_s: float = 60.0) -> int:
        """Wait for the process to end by itself; return the exit code."""
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        """End the process if it still runs: SIGABRT first, so that faulthandler writes every
        thread's traceback into its log (where was it stuck?), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


@pytest.fixture
def processes():
    """Processes started by a test; whatever is still running at its end is killed."""
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def watch_commands(stop: threading.Event, seen: list[tuple[float, RelayStates]]) -> None:
    """Record every BMS_ContactorCommand on vcan0 (kernel-filtered), with its arrival time."""
    import can

    db = cantools.database.load_file(DBC)
    command = db.get_message_by_name("BMS_ContactorCommand")
    with can.Bus(
        interface="socketcan",
        channel=VCAN,
        can_filters=[{"can_id": command.frame_id, "can_mask": 0x7FF, "extended": False}],
    ) as bus:
        while not stop.is_set():
            frame = bus.recv(timeout=0.1)
            if frame is not None:
                values = command.decode(frame.data)
                relays = RelayStates(
                    negative=values["Negative"] == 1,
                    precharge=values["Precharge"] == 1,
                    positive=values["Positive"] == 1,
                )
                seen.append((time.monotonic(), relays))


def wait_for_record(
    bms: Process, done, timeout_s: float, records: list[dict], fail=lambda record: False
) -> dict:
    """Read ``bms run``'s JSON status lines into ``records`` until ``done(record)``; an
    AssertionError if ``fail(record)`` comes first or nothing matches in time."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        left_s = deadline_s - time.monotonic()
        if left_s <= 0:
            last = records[-1] if records else None
            raise AssertionError(
                f"no matching status within {timeout_s:.0f} s; last: {last}\n{bms.stderr()}"
            )
        record = json.loads(bms.next_line(left_s))
        records.append(record)
        if done(record):
            return record
        if fail(record):
            raise AssertionError(f"unexpected status: {record}\n{bms.stderr()}")


def test_plant_and_bms_as_two_processes_over_vcan(make_config, processes, metrics):
    # `bms run` starts first and waits for the plant
    waits = {"loop": {"status_interval_s": 0.2, "startup_timeout_s": 300.0}}
    config = make_config(merge(merge(SOCKETCAN, SLOW_GUEST_CONFIG), waits))
    stop_watching = threading.Event()
    commands: list[tuple[float, RelayStates]] = []
    watcher = threading.Thread(target=watch_commands, args=(stop_watching, commands))
    watcher.start()
    records: list[dict] = []
    try:
        start_s = time.monotonic()
        bms = Process(
            [str(BMS), "run", "--config", str(config), "--status-format", "json"], "bms-run"
        )
        processes.append(bms)
        # The BMS holds the contactors open (refreshing its command) while it waits for its
        # first complete sample: then it is ready for the plant.
        while not commands:
            assert bms.proc.poll() is None, f"bms run exited early:\n{bms.stderr()}"
            assert time.monotonic() - start_s < 300.0, (
                "bms run was not up within 300 s (a log of Numba compiling means the kernel "
                f"cache missed: was a source changed after the host warmed it?)\n{bms.stderr()}"
            )
            time.sleep(0.2)
        metrics["bms_run_start_s"] = time.monotonic() - start_s
        plant_start_s = time.monotonic()
        plant = Process(
            [
                str(BMS),
                "plant",
                "--config",
                str(config),
                "--inject",
                f"open_wire@{INJECT_AT_S}:cell=3",
            ],
            "bms-plant",
        )
        processes.append(plant)
        closed = wait_for_record(
            bms, lambda r: r["contactors"] == "closed", 300.0, records, lambda r: r["latched"]
        )
        metrics["plant_start_to_closed_s"] = time.monotonic() - plant_start_s
        # While it waited for the plant the BMS held every relay open; it closed through the
        # precharge relay first, as seen on the bus.
        waiting = [relays for t_s, relays in commands if t_s < plant_start_s]
        assert waiting and not any(relays.any_closed for relays in waiting)
        first_closing = next(relays for _, relays in commands if relays.any_closed)
        assert first_closing == RelayStates(negative=True, precharge=True, positive=False)
        closed_records = [closed]
        while len(closed_records) < 5:
            record = wait_for_record(bms, lambda r: True, 30.0, records)
            assert record["contactors"] == "closed", (
                f"opened before the fault: {record}\n{bms.stderr()}"
            )
            closed_records.append(record)
        for record in closed_records:
            assert record["latched"] == [] and record["faults"] == [], record
            # initial_soc 0.8 with a 1 % spread, a 1 A discharge for seconds of a 5 Ah cell
            assert 0.75 < record["soc_min"] <= record["soc_mean"] <= record["soc_max"] < 0.85
            # an NMC cell near 80 % SOC rests near 4.0 V; the cells agree
            assert 3.8 < record["cell_voltage_min_v"] <= record["cell_voltage_max_v"] < 4.2
            assert record["cell_voltage_max_v"] - record["cell_voltage_min_v"] < 0.05
            assert record["current_a"] == pytest.approx(-1.0, abs=0.3)
        assert any(relays.positive for _, relays in commands), "no close command on vcan0"

        latched = wait_for_record(
            bms,
            lambda r: "cell_voltage_invalid" in r["latched"] and r["contactors"] in OPENED,
            INJECT_AT_S + 120.0,
            records,
            lambda r: any(fault != "cell_voltage_invalid" for fault in r["latched"]),
        )
        latched_s = time.monotonic()
        assert latched["latched"] == ["cell_voltage_invalid"], latched
        # from then on the commands on the bus open every relay
        time.sleep(2.0)
        after = [relays for t_s, relays in commands if t_s > latched_s]
        assert after and not any(relays.any_closed for relays in after), after[-5:]

        assert bms.stop() == 0, bms.stderr()
        summary = json.loads(bms.output()[-1])
        assert summary["summary"] and summary["contactors"] == "open", summary
        assert summary["latched"] == ["cell_voltage_invalid"]
        assert "fault latched: cell_voltage_invalid" in bms.stderr()
        assert plant.stop() == 0, plant.stderr()
    finally:
        stop_watching.set()
        watcher.join(timeout=10.0)
        (LOGS / "bms-run-status.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def open_backend(make_config, section: str, changes: dict):
    """The backend of ``[section]`` in a socketcan config, built the way the app builds it."""
    config = load_config(make_config(merge({**SOCKETCAN, "sim": None}, changes)))
    choice = getattr(config, section)
    return choice.cls(config, choice.options)


N_BURST = 5000
N_CELLS = 16


def test_a_5000_frame_burst_reaches_the_frontend_whole(make_config, processes, metrics):
    # values must stay fresh while the guest drains the burst (seconds)
    frontend = open_backend(make_config, "frontend", {"frontend": {"cell_voltage_timeout_s": 60}})
    try:
        db = cantools.database.load_file(DBC)
        message = db.get_message_by_name("CMU_CellVoltages")
        groups = cell_groups(message, N_CELLS)
        received: list[bytes] = []
        # sees every frame the front-end's link hands out (decoded after the drain, so the
        # drain rate is the front-end's own)
        frontend.link.subscribe(message.frame_id, lambda t_s, data: received.append(data))
        sender = Process(
            [
                sys.executable,
                str(PEER),
                "burst",
                "--dbc",
                str(DBC),
                "--count",
                str(N_BURST),
                "--cells",
                str(N_CELLS),
            ],
            "burst-sender",
            stdin=subprocess.PIPE,
        )
        processes.append(sender)
        assert sender.next_line(120.0) == "READY"
        sender.proc.stdin.write("GO\n")
        sender.proc.stdin.flush()
        sent = json.loads(sender.next_line(120.0))
        assert sent["sent"] == N_BURST
        # Only now does the front-end read: the whole burst waited in the receive buffer.
        # It drains until every frame is in, or until nothing more came for a few seconds.
        drain_start_s = last_progress_s = time.monotonic()
        while len(received) < N_BURST:
            before = len(received)
            measurement = frontend.read(time.monotonic())
            now_s = time.monotonic()
            if len(received) > before:
                last_progress_s = now_s
            elif now_s - last_progress_s > 5.0:
                break
        drain_s = last_progress_s - drain_start_s
        measurement = frontend.read(time.monotonic())
        expected = [burst_frame(k, groups) for k in range(N_BURST)]
        got = []
        for data in received:
            decoded = message.decode(data, decode_choices=False)
            mux = int(decoded["CellVoltageGroup"])
            got.append((mux, round(decoded[f"Cell{groups[mux][0]}_Voltage"], 3)))
        lost = N_BURST - len(got)
        metrics["burst_frames"] = N_BURST
        metrics["burst_lost"] = lost
        metrics["burst_send_frames_per_s"] = N_BURST / sent["send_s"]
        metrics["burst_frontend_drain_frames_per_s"] = len(got) / drain_s
        assert lost == 0, f"{lost} of {N_BURST} frames lost"
        assert got == [(mux, round(v, 3)) for mux, v in expected], "frames out of order"
        assert measurement.frame_errors == 0
        # the newest frame of every group is what the front-end now reports
        last_voltage_v = {}
        for mux, voltage_v in expected:
            last_voltage_v[mux] = voltage_v
        for mux, cells in groups.items():
            for cell in cells:
                assert measurement.cell_voltage_v[cell - 1] == pytest.approx(
                    last_voltage_v[mux], abs=1e-9
                )
        assert sender.wait() == 0, sender.stderr()
    finally:
        frontend.close()


N_ROUND_TRIPS = 500
# Gray code: each command differs from the one before, so each answer is told apart.
PATTERNS = [
    RelayStates(negative=bool(g & 1), precharge=bool(g & 2), positive=bool(g & 4))
    for g in (i ^ (i >> 1) for i in range(8))
]


def test_request_response_round_trips_with_a_box_in_another_process(
    make_config, processes, metrics
):
    contactors = open_backend(make_config, "contactors", {})
    try:
        box = Process(
            [sys.executable, str(PEER), "box", "--dbc", str(DBC)],
            "contactor-box",
            stdin=subprocess.PIPE,
        )
        processes.append(box)
        assert box.next_line(120.0) == "READY"
        lost = 0
        start_s = time.monotonic()
        for i in range(N_ROUND_TRIPS):
            relays = PATTERNS[i % len(PATTERNS)]
            sent_s = time.monotonic()
            contactors.command(relays)
            while True:
                now_s = time.monotonic()
                feedback = contactors.feedback(now_s)
                if feedback.valid and feedback.relays == relays:
                    break
                if now_s - sent_s > 1.0:
                    lost += 1
                    break
        elapsed_s = time.monotonic() - start_s
        box.proc.stdin.close()
        answered = json.loads(box.next_line(30.0))["answered"]
        metrics["round_trips"] = N_ROUND_TRIPS
        metrics["round_trips_lost"] = lost
        metrics["round_trips_per_s"] = N_ROUND_TRIPS / elapsed_s
        metrics["round_trip_mean_ms"] = 1e3 * elapsed_s / N_ROUND_TRIPS
        assert lost == 0, f"{lost} of {N_ROUND_TRIPS} requests got no answer within 1 s"
        assert answered == N_ROUND_TRIPS
        assert feedback.interlock_closed is True
        assert box.wait() == 0, box.stderr()
    finally:
        contactors.close()
