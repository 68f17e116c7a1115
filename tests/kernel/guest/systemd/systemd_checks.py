"""bms.service under systemd itself, PID 1 of the qemu guest, checked with systemctl and
journalctl: the start (active only after READY=1, STATUS= in StatusText), a reload (SIGHUP),
the watchdog (a stopped process is killed with SIGABRT, the fail-safe runs, systemd restarts
it), a latched fault found by its journal field, a refused reload, and the stop.

Runs only in the tests' guest boot (tests/kernel/systemd_guest.py; the pybms-systemd-checks
service runs this file with pytest once the guest tests are done; it is named so that no other
run collects it). The tests run in file order and share one service: each starts where the one
before left it.

- ``bms.service`` is systemd/bms.service unchanged plus the drop-in ``bms-guest.conf``;
  ``bms-plant.service`` is the simulated pack on vcan0 that ``bms run`` reads.
- The plant runs without a fault until the watchdog phase; while systemd restarts the service
  it is restarted with an open wire on cell 3, so the restarted service latches
  ``cell_voltage_invalid`` (its contactors stay open from then on).

Everything here runs 15-40 times slower than on the host, and more when the host is busy: a
start of the service takes 30 s to minutes. Hence the long waits; what is checked depends on
none of them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.kernel.guest.conftest import LOGS

UNIT = "bms.service"
PLANT = "bms-plant.service"
PLANT_ENV = Path("/run/bms-plant.env")
"""Read by bms-plant.service (EnvironmentFile=): PLANT_ARGS, extra arguments of `bms plant`."""
CONFIG = Path("/etc/pybms/pack.toml")
FAULT = "cell_voltage_invalid"
INJECTION = "open_wire@10:cell=3"
"""An open sense wire: the front-end flags the cell invalid, the BMS latches FAULT."""
INITIAL_SOC = 0.8
"""config/sim.toml's [sim] initial_soc, which the guest's config keeps."""

START_TIMEOUT_S = 630.0
"""bms-guest.conf's TimeoutStartSec (600 s) and a margin: systemd's own limit comes first."""
CLOSE_TIMEOUT_S = 120.0
"""From READY=1 to the contactors closed: precharge (a few seconds) on a slow guest."""
STOP_TIMEOUT_S = 300.0
"""`systemctl stop`: the service's own stop, then ExecStopPost= (a new Python process)."""
JOURNAL_TIMEOUT_S = 120.0
PROPERTIES = (
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "NRestarts",
    "StatusText",
    "ExecMainStartTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
    "WatchdogUSec",
    "WatchdogTimestampMonotonic",
    "ExecReload",
)


def run(args: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)


def systemctl(*args: str, timeout_s: float = 120.0) -> str:
    proc = run(["systemctl", *args], timeout_s)
    assert proc.returncode == 0, f"systemctl {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def show(unit: str = UNIT) -> dict[str, str]:
    out = systemctl("show", unit, *(f"--property={name}" for name in PROPERTIES))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def usec_s(value: str) -> float:
    """A ``...TimestampMonotonic`` property (CLOCK_MONOTONIC in microseconds) in seconds."""
    return int(value) / 1e6


TIMESPAN_UNITS_S = {"min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def timespan_s(text: str) -> float:
    """systemctl's rendering of a time span ("5s", "1min 30s", "500ms") in seconds."""
    parts = re.findall(r"([0-9.]+)(min|ms|us|s)", text)
    assert parts, f"not a time span: {text!r}"
    return sum(float(number) * TIMESPAN_UNITS_S[unit] for number, unit in parts)


def exec_exited_0(exec_property: str) -> bool:
    """Whether an Exec*= property says its last command exited with status 0: systemctl shows
    the status as "0" or as "0/SUCCESS", depending on its version."""
    return re.search(r"code=exited ; status=0(/SUCCESS)? ", exec_property) is not None


def message(entry: dict) -> str:
    """MESSAGE of a journal entry (journalctl's JSON gives non-UTF-8 text as a byte list)."""
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return value


def entry_s(entry: dict) -> float:
    """When journald received the entry, on CLOCK_MONOTONIC (time.monotonic())."""
    return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6


def entry_pid(entry: dict) -> int:
    return int(entry.get("_PID", 0))


def journal(*matches: str) -> list[dict]:
    """This boot's journal entries for ``matches`` (journalctl's), oldest first."""
    proc = run(["journalctl", "-b", "--no-pager", "-o", "json", *matches])
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def from_systemd(entry: dict) -> bool:
    return entry_pid(entry) == 1


@dataclass
class Journal:
    """The unit's journal (its own lines and systemd's about it), read as it grows."""

    entries: list[dict] = field(default_factory=list)

    def read(self) -> list[dict]:
        cursor = ["--after-cursor", self.entries[-1]["__CURSOR"]] if self.entries else []
        new = journal("-u", UNIT, *cursor)
        self.entries.extend(new)
        return self.entries

    def find(self, predicate, since_s: float = 0.0) -> list[dict]:
        return [e for e in self.read() if entry_s(e) >= since_s and predicate(e)]

    def wait_for(self, predicate, what: str, since_s: float, timeout_s: float) -> dict:
        deadline_s = time.monotonic() + timeout_s
        while True:
            found = self.find(predicate, since_s)
            if found:
                return found[0]
            if time.monotonic() > deadline_s:
                raise AssertionError(f"not in the journal within {timeout_s:.0f} s: {what}")
            time.sleep(1.0)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"{entry_s(e):10.3f} [{entry_pid(e)}] {message(e)}" for e in self.read()[-lines:]
        )


def wait_for_state(predicate, what: str, timeout_s: float, poll_s: float = 1.0) -> dict:
    """Poll the unit's properties until ``predicate(properties)``; the last ones on timeout."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        properties = show()
        if predicate(properties):
            return properties
        if time.monotonic() > deadline_s:
            state = {k: properties[k] for k in ("ActiveState", "SubState", "Result", "MainPID")}
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s; now {state}")
        time.sleep(poll_s)


def status_says(text: str):
    return lambda p: p["ActiveState"] == "active" and text in p["StatusText"]


def restart_plant(args: str = "") -> None:
    PLANT_ENV.write_text(f"PLANT_ARGS={args}\n")
    systemctl("restart", PLANT)


@pytest.fixture(scope="module")
def unit_journal():
    log = Journal()
    yield log
    (LOGS / "bms-service-journal.txt").write_text(log.tail(100000) + "\n")


@pytest.fixture
def manager_debug():
    """systemd logs every notification it gets (`Got notification message from PID ...`) at
    debug level only: raised for one test."""
    systemctl("log-level", "debug")
    yield
    systemctl("log-level", "info")


def notifications(log: Journal, pid: int, since_s: float = 0.0) -> list[dict]:
    """systemd's debug lines about each sd_notify datagram from ``pid``."""
    prefix = f"Got notification message from PID {pid} ("
    return log.find(lambda e: from_systemd(e) and prefix in message(e), since_s)


def test_start_goes_active_only_after_ready_and_shows_the_status(
    unit_journal, manager_debug, metrics
):
    restart_plant()
    start_s = time.monotonic()
    systemctl("start", "--no-block", UNIT)
    seen: list[dict] = []

    def settled(properties: dict) -> bool:
        seen.append(properties)
        return properties["ActiveState"] in ("active", "failed") or (
            properties["ActiveState"] == "inactive" and time.monotonic() - start_s > 30.0
        )

    properties = wait_for_state(settled, "bms.service settled", START_TIMEOUT_S, poll_s=2.0)
    assert properties["ActiveState"] == "active", f"{properties}\n{unit_journal.tail()}"
    pid = int(properties["MainPID"])
    # systemd held the unit in "activating" while the process ran: warming up, waiting for
    # the plant's first frames
    activating = [p for p in seen if p["ActiveState"] == "activating" and int(p["MainPID"]) == pid]
    assert activating and all(p["SubState"] == "start" for p in activating), seen
    started_s = usec_s(properties["ExecMainStartTimestampMonotonic"])
    active_s = usec_s(properties["ActiveEnterTimestampMonotonic"])
    metrics["start_to_active_s"] = active_s - started_s
    # What made it active: the READY=1 datagram from the main process (NotifyAccess=main),
    # with the service's status line in it; systemd went from "start" to "running" after it
    # (the two lines of PID 1 are in the order it handled them), never before.
    ready = [e for e in notifications(unit_journal, pid) if "READY=1" in message(e)]
    assert ready, f"systemd logged no READY=1 from PID {pid}\n{unit_journal.tail()}"
    assert "STATUS=contactors " in message(ready[0]), message(ready[0])
    lines = unit_journal.read()
    running = [
        i
        for i, e in enumerate(lines)
        if from_systemd(e) and "Changed start -> running" in message(e)
    ]
    assert running, unit_journal.tail()
    assert lines.index(ready[0]) < running[0], "running before READY=1"
    earlier = [e for e in notifications(unit_journal, pid) if lines.index(e) < running[0]]
    assert earlier and "READY=1" in message(earlier[-1]) and earlier[0] is ready[0]
    # StatusText is the service's STATUS= line and follows it: the contactors close
    closed = wait_for_state(status_says("contactors closed"), "contactors closed", CLOSE_TIMEOUT_S)
    soc = re.search(r"SOC ([0-9.]+) %", closed["StatusText"])
    assert soc, closed["StatusText"]
    assert abs(float(soc[1]) / 100.0 - INITIAL_SOC) < 0.05, closed["StatusText"]
    metrics["start_to_closed_s"] = time.monotonic() - start_s


def test_reload_sends_hup_and_the_service_stays_active(unit_journal, metrics):
    before = show()
    pid = int(before["MainPID"])
    start_s = time.monotonic()
    # With Type=notify, the reload job ends at the READY=1 that follows the service's
    # RELOADING=1, i.e. once the new config is applied.
    systemctl("reload", UNIT, timeout_s=START_TIMEOUT_S)
    metrics["reload_s"] = time.monotonic() - start_s
    reloaded = unit_journal.wait_for(
        lambda e: entry_pid(e) == pid and message(e) == f"bms.app: reloaded {CONFIG}",
        "the service's 'reloaded' line",
        start_s,
        JOURNAL_TIMEOUT_S,
    )
    assert reloaded
    after = show()
    assert after["ActiveState"] == "active", after
    assert int(after["MainPID"]) == pid and after["NRestarts"] == before["NRestarts"]
    # ExecReload= ran /bin/kill -HUP $MAINPID and it succeeded
    assert "argv[]=/bin/kill -HUP" in after["ExecReload"], after["ExecReload"]
    assert exec_exited_0(after["ExecReload"]), after["ExecReload"]


def test_watchdog_kills_a_stopped_service_runs_the_failsafe_and_restarts_it(unit_journal, metrics):
    before = wait_for_state(status_says("contactors closed"), "closed", CLOSE_TIMEOUT_S)
    pid = int(before["MainPID"])
    restarts = int(before["NRestarts"])
    watchdog_s = timespan_s(before["WatchdogUSec"])
    assert watchdog_s == 5.0, before["WatchdogUSec"]  # WatchdogSec=5s as shipped
    # the pings arrive: the last one's time moves on
    ping_s = usec_s(before["WatchdogTimestampMonotonic"])
    wait_for_state(
        lambda p: usec_s(p["WatchdogTimestampMonotonic"]) > ping_s, "a WATCHDOG=1", 2 * watchdog_s
    )

    os.kill(pid, signal.SIGSTOP)
    stop_s = time.monotonic()
    last_ping_s = usec_s(show()["WatchdogTimestampMonotonic"])
    timeout = unit_journal.wait_for(
        lambda e: from_systemd(e) and "Watchdog timeout" in message(e),
        "systemd's watchdog timeout",
        stop_s,
        watchdog_s + 60.0,
    )
    timeout_s = entry_s(timeout)
    metrics["watchdog_kill_after_sigstop_s"] = timeout_s - stop_s
    metrics["watchdog_kill_after_last_ping_s"] = timeout_s - last_ping_s
    # not before WatchdogSec has passed since the last ping (journald stamps the line a little
    # after systemd acted, so the lower bound is firm and the upper one has a margin)
    assert watchdog_s <= timeout_s - last_ping_s < watchdog_s + 10.0, metrics
    unit_journal.wait_for(
        lambda e: (
            from_systemd(e)
            and f"Killing process {pid} " in message(e)
            and "signal SIGABRT" in message(e)
        ),
        "the kill with SIGABRT (WatchdogSignal=)",
        stop_s,
        JOURNAL_TIMEOUT_S,
    )
    # Killed by that signal: 6/ABRT, or 11/SEGV when faulthandler, dumping the threads' stacks
    # on the SIGABRT, crashes in the middle of it (seen on a CI run: "Fatal Python error:
    # Segmentation fault" inside the dump), which is the same end by another name.
    unit_journal.wait_for(
        lambda e: (
            from_systemd(e)
            and "Main process exited, code=killed" in message(e)
            and ("status=6/ABRT" in message(e) or "status=11/SEGV" in message(e))
        ),
        "the main process's end by SIGABRT",
        stop_s,
        JOURNAL_TIMEOUT_S,
    )
    unit_journal.wait_for(
        lambda e: from_systemd(e) and "Failed with result 'watchdog'" in message(e),
        "the result 'watchdog'",
        stop_s,
        JOURNAL_TIMEOUT_S,
    )
    # PYTHONFAULTHANDLER=1: the killed process wrote its threads' stacks into the journal
    unit_journal.wait_for(
        lambda e: entry_pid(e) == pid and "Fatal Python error: Aborted" in message(e),
        "faulthandler's report of the killed process",
        stop_s,
        JOURNAL_TIMEOUT_S,
    )
    failsafe = unit_journal.wait_for(
        lambda e: (
            entry_pid(e) not in (0, 1, pid)
            and e.get("_SYSTEMD_UNIT") == UNIT
            and "failsafe: contactors confirmed open" in message(e)
        ),
        "ExecStopPost='s bms failsafe confirming the contactors open",
        timeout_s,
        STOP_TIMEOUT_S,
    )
    metrics["watchdog_kill_to_failsafe_done_s"] = entry_s(failsafe) - timeout_s
    # The pack the restarted service finds has an open wire (the next test's fault).
    restart_plant(f"--inject {INJECTION}")
    after = wait_for_state(
        lambda p: p["ActiveState"] == "active" and int(p["MainPID"]) not in (0, pid),
        "active again, with a new main process",
        START_TIMEOUT_S + 60.0,
        poll_s=2.0,
    )
    assert int(after["NRestarts"]) == restarts + 1, after
    unit_journal.wait_for(
        lambda e: (
            from_systemd(e)
            and f"Scheduled restart job, restart counter is at {restarts + 1}" in message(e)
        ),
        "the restart scheduled by Restart=on-failure",
        stop_s,
        JOURNAL_TIMEOUT_S,
    )
    restarted_s = usec_s(after["ExecMainStartTimestampMonotonic"])
    active_s = usec_s(after["ActiveEnterTimestampMonotonic"])
    metrics["watchdog_kill_to_restart_s"] = restarted_s - timeout_s
    metrics["restart_to_active_s"] = active_s - restarted_s
    metrics["watchdog_kill_to_active_s"] = active_s - timeout_s


def test_a_latched_fault_is_found_by_its_journal_field(unit_journal):
    pid = int(show()["MainPID"])
    deadline_s = time.monotonic() + JOURNAL_TIMEOUT_S
    while not (entries := journal(f"FAULT_ID={FAULT}")):
        assert time.monotonic() < deadline_s, f"no FAULT_ID={FAULT} line\n{unit_journal.tail()}"
        time.sleep(2.0)
    entry = entries[0]
    assert message(entry).startswith(f"bms.loop: fault latched: {FAULT} ("), entry
    assert entry.get("_SYSTEMD_UNIT") == UNIT and entry_pid(entry) == pid, entry
    assert entry.get("SYSLOG_IDENTIFIER") == "pybms" and entry.get("PRIORITY") == "3", entry
    assert entry.get("LOGGER") == "bms.loop", entry
    # the field selects: another fault id finds nothing
    assert journal("FAULT_ID=short_circuit") == []
    wait_for_state(status_says(f"latched: {FAULT}"), "the latch in StatusText", 30.0)


def test_a_refused_reload_keeps_the_service_active(unit_journal, metrics):
    pid = int(show()["MainPID"])
    good = CONFIG.read_text()
    try:
        CONFIG.write_text(good + "\n[bogus_section]\nvalue = 1\n")
        start_s = time.monotonic()
        systemctl("reload", "--no-block", UNIT)
        refused = unit_journal.wait_for(
            lambda e: entry_pid(e) == pid and f"reload of {CONFIG} refused" in message(e),
            "the service's 'refused' line",
            start_s,
            JOURNAL_TIMEOUT_S,
        )
        # systemd got RELOADING=1 and waits for READY=1 before the unit is "active" again (up
        # to TimeoutStartSec=, with `systemctl reload` blocked); the service must send it after
        # a refused reload as after an applied one.
        after = wait_for_state(
            lambda p: p["ActiveState"] != "reloading",
            f"'reloading' ended after the refusal (at {entry_s(refused) - start_s:.1f} s)",
            30.0,
        )
        metrics["refused_reload_s"] = time.monotonic() - start_s
        assert after["ActiveState"] == "active" and int(after["MainPID"]) == pid, after
    finally:
        CONFIG.write_text(good)


def test_stop_opens_the_contactors_exits_0_and_runs_the_failsafe(
    unit_journal, manager_debug, metrics
):
    pid = int(show()["MainPID"])
    start_s = time.monotonic()
    systemctl("stop", UNIT, timeout_s=STOP_TIMEOUT_S)
    metrics["stop_s"] = time.monotonic() - start_s
    after = show()
    assert after["ActiveState"] == "inactive" and after["Result"] == "success", after

    # Nothing else holds the unit, so systemd unloads it once inactive and its Exec* properties
    # read as a fresh unit's: how each process ended is in systemd's own (debug) lines.
    def exited_0(process: str):
        return lambda e: (
            from_systemd(e)
            and f"{process} process exited, code=exited, status=0/SUCCESS" in message(e)
        )

    assert unit_journal.find(exited_0("Main"), start_s), unit_journal.tail()
    stopping = [e for e in notifications(unit_journal, pid, start_s) if "STOPPING=1" in message(e)]
    assert stopping, f"no STOPPING=1 from PID {pid}\n{unit_journal.tail()}"
    summary = unit_journal.find(
        lambda e: entry_pid(e) == pid and message(e).startswith("stopped (SIGTERM)"), start_s
    )
    assert summary and "contactors open" in message(summary[-1]), unit_journal.tail()
    failsafe = unit_journal.find(
        lambda e: (
            entry_pid(e) not in (0, 1, pid)
            and e.get("_SYSTEMD_UNIT") == UNIT
            and "failsafe: contactors confirmed open" in message(e)
        ),
        start_s,
    )
    assert failsafe, unit_journal.tail()
    assert unit_journal.find(exited_0("Control"), start_s), unit_journal.tail()  # ExecStopPost=
