"""The rig's small parts: the lock, the NTC curve, the figures report, the virtual board
config, and the board under test as a process (with a stand-in for bms)."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from bms.config import load_config
from hil.board import Board, BoardError, derive_virtual_board_config
from hil.config import load_rig_config
from hil.conftest import RigTimeout, _time_limit
from hil.lock import RigBusy, RigLock
from hil.ntc import Ntc
from hil.report import Figure, Report

RIGS = Path(__file__).resolve().parent.parent / "rigs"
SIM_CONFIG = RIGS.parent.parent / "config" / "sim.toml"


# ---------------------------------------------------------------- the lock
HOLD_LOCK = """
import sys, time
from pathlib import Path
from hil.lock import RigLock
RigLock(Path(sys.argv[1]), "bench-1").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_is_refused_while_the_first_holds_the_rig(tmp_path):
    path = tmp_path / "rig.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=RIGS.parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RigBusy) as busy:
            RigLock(path, "bench-1").acquire()
        assert f"rig 'bench-1' is in use (lock {path} held by pid {holder.pid} on " in str(
            busy.value
        )
    finally:
        holder.kill()  # a killed holder releases the lock: the kernel drops its flock
        holder.wait()
        holder.stdout.close()
    with RigLock(path, "bench-1"):
        assert f"pid {os.getpid()} " in path.read_text()
    with RigLock(path, "bench-1"):  # and released again
        pass


def test_the_same_process_cannot_take_the_rig_twice(tmp_path):
    with RigLock(tmp_path / "rig.lock", "virtual"), pytest.raises(RigBusy):
        RigLock(tmp_path / "rig.lock", "virtual").acquire()


# ---------------------------------------------------------------- the NTC
def test_the_beta_curve():
    ntc = Ntc(10000.0, 3435.0)
    assert ntc.resistance_ohm(25.0) == pytest.approx(10000.0)
    # 10 kOhm * exp(3435 K * (1/273.15 K - 1/298.15 K)) = 10 kOhm * exp(1.05445) = 28.704 kOhm
    assert ntc.resistance_ohm(0.0) == pytest.approx(28704.0, rel=2e-4)
    # at 85 degC: exp(3435 * (1/358.15 - 1/298.15)) = exp(-1.93011) = 0.14513
    assert ntc.resistance_ohm(85.0) == pytest.approx(1451.3, rel=2e-4)
    for temp_c in (-40.0, -5.5, 25.0, 60.0, 124.0):
        assert ntc.temp_c(ntc.resistance_ohm(temp_c)) == pytest.approx(temp_c, abs=1e-9)
    assert math.isnan(ntc.temp_c(0.0)) and math.isnan(ntc.temp_c(-5.0))


# ---------------------------------------------------------------- the report
def test_figures_pass_inside_their_limits_and_nan_never_passes_a_limit(tmp_path):
    assert Figure("t", "x", 1.0, "s", 0.5, 1.5).passed
    assert not Figure("t", "x", 1.6, "s", 0.5, 1.5).passed
    assert not Figure("t", "x", 0.4, "s", 0.5, None).passed
    assert not Figure("t", "x", math.nan, "s", None, 1.5).passed
    assert Figure("t", "x", math.nan, "s", None, None).passed  # recorded, not judged
    report = Report(tmp_path, "virtual")
    report.add(Figure("test_04", "reaction_s", 0.912345678, "s", 0.65, 1.5))
    report.add(Figure("test_04", "late_s", 2.0, "s", None, 1.5))
    with open(report.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["figure"], r["value"], r["low"], r["high"], r["passed"]) for r in rows] == [
        ("reaction_s", "0.912346", "0.65", "1.5", "1"),
        ("late_s", "2", "", "1.5", "0"),
    ]
    assert all(r["rig"] == "virtual" for r in rows)


# ---------------------------------------------------------------- the virtual board config
def test_a_virtual_run_gets_its_own_bus_files_and_socket(tmp_path):
    path = derive_virtual_board_config(SIM_CONFIG, tmp_path, "udp_multicast", "239.192.7.9", 0.7)
    config = load_config(path)  # the paths relative to config/sim.toml still resolve
    assert (config.can.interface, config.can.channel) == ("udp_multicast", "239.192.7.9")
    assert config.protection.latch_file == tmp_path / "latched.json"
    assert config.store.path == tmp_path / "state.sqlite"
    assert len(str(config.service.control_socket)) < 100
    assert config.sim.options.deadman_timeout_s == 0.7
    original = tomllib.loads(SIM_CONFIG.read_text())
    derived = tomllib.loads(path.read_text())
    for section in ("loop", "frontend", "diagnosis", "control"):  # the board's own, as written
        assert derived[section] == original[section]


# ---------------------------------------------------------------- the board under test
FAKE_BMS = """
import json, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print(json.dumps({"args": sys.argv[1:], "t_s": 0.1}), flush=True)
while not stop:
    time.sleep(0.01)
print(json.dumps({"summary": True, "stopped_by": "SIGTERM"}), flush=True)
"""


def test_the_board_runs_bms_and_reads_its_pid_and_status_lines(tmp_path):
    fake = tmp_path / "fake_bms.py"
    fake.write_text(textwrap.dedent(FAKE_BMS))
    rig = load_rig_config(RIGS / "virtual.toml")
    rig = rig.model_copy(
        update={"board": rig.board.model_copy(update={"bms_command": [sys.executable, str(fake)]})}
    )
    board = Board(rig, Path("/x/board.toml"), None, {"CAN_CONFIG": '{"port": 1}'}, tmp_path)
    process = board.start()
    pid = process.wait_for_pid(10.0)
    deadline_s = time.monotonic() + 10.0
    while not process.lines and time.monotonic() < deadline_s:
        time.sleep(0.01)
    assert process.lines[0].record["args"] == [
        "run",
        "--config",
        "/x/board.toml",
        "--status-format",
        "json",
    ]
    assert pid == process.proc.pid  # exec: the pid it printed is bms's own
    assert process.stop() == 0
    assert process.summary == {"summary": True, "stopped_by": "SIGTERM"}


def test_an_ssh_board_gets_one_quoted_command_line(tmp_path):
    rig = load_rig_config(RIGS / "bench.example.toml")
    board = Board(rig, rig.board.config, None, {}, tmp_path)
    assert board._argv(["bms", "status", "--json", "--config", "/etc/my pack.toml"]) == [
        "ssh",
        "-o",
        "BatchMode=yes",
        "pi@bms-board.local",
        "bms status --json --config '/etc/my pack.toml'",
    ]
    assert board.remote_config == "/etc/pybms/pack.toml"


def test_a_signal_to_a_process_that_is_gone_is_a_board_error(tmp_path):
    rig = load_rig_config(RIGS / "virtual.toml")
    board = Board(rig, Path("/x.toml"), None, {}, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    with pytest.raises(BoardError, match="is not running"):
        board.signal(int(done.stdout), signal.SIGTERM)


# ---------------------------------------------------------------- the per-phase time limit
def test_a_phase_that_runs_too_long_is_stopped_with_the_reason():
    started_s = time.monotonic()
    expired = pytest.raises(RigTimeout, match=r"test_x \(test\) took longer than 0.2 s")
    with expired, _time_limit(0.2, "test_x (test)"):
        time.sleep(5.0)
    assert time.monotonic() - started_s < 2.0
    with _time_limit(1.0, "quick"):  # one that ends in time leaves no alarm behind
        pass
    time.sleep(1.2)
