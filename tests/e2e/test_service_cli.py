"""End to end as a service: `bms sim` as a process, talked to as systemd and a person would.

systemd's side is a real NOTIFY_SOCKET datagram socket this test binds; a person's side is
`bms status` and `bms faults` over the control socket; reloads are SIGHUP; persistence is the
state store across restarts.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import BMS, LIMITS, parse_json_lines, run_bms, run_sim

pytestmark = pytest.mark.e2e


class Notifications:
    """A NOTIFY_SOCKET for the process under test, as systemd binds one."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pybms-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    def first(self, key: str) -> float | None:
        return next((t for t, fields in self.messages if key in fields), None)

    def close(self):
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


class Bms:
    """`bms sim` running in the background with JSON status lines."""

    def __init__(self, config: Path, *args: str, env: dict | None = None, duration_s=60):
        self.config = config
        self.proc = subprocess.Popen(
            [
                str(BMS),
                "sim",
                "--config",
                str(config),
                "--status-format",
                "json",
                "--duration-s",
                str(duration_s),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def status(self) -> dict | None:
        answer = run_bms("status", "--json", "--config", str(self.config))
        return json.loads(answer.stdout) if answer.returncode == 0 else None

    def wait_for(self, predicate, timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and predicate(status):
                return status
            assert self.proc.poll() is None, self.proc.communicate()[1]
            time.sleep(0.2)
        raise AssertionError(f"timed out; last status: {self.status()}")

    def stop(self) -> tuple[int, list[dict], dict | None, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        stdout, stderr = self.proc.communicate(timeout=20)
        records, summary = parse_json_lines(stdout)
        return self.proc.returncode, records, summary, stderr


@pytest.fixture
def notifications():
    listener = Notifications()
    yield listener
    listener.close()


def test_systemd_hears_ready_watchdog_status_and_stopping(make_config, notifications):
    config = make_config()
    env = {"NOTIFY_SOCKET": notifications.path, "WATCHDOG_USEC": "1000000"}
    bms = Bms(config, env=env)
    started = time.monotonic()
    notifications.collect(timeout_s=8.0)
    bms.proc.send_signal(signal.SIGTERM)
    notifications.collect(timeout_s=5.0)
    returncode, _, _, stderr = bms.stop()
    assert returncode == 0, stderr
    ready_s = notifications.first("READY")
    assert ready_s is not None, notifications.messages
    ready = next(fields for _, fields in notifications.messages if "READY" in fields)
    assert ready["STATUS"].startswith("contactors ")
    kicks = [t for t, fields in notifications.messages if "WATCHDOG" in fields]
    assert kicks and kicks[0] >= ready_s  # never before READY
    # kicked at half the 1 s interval: about every 0.5 s (within a few loop periods)
    gaps = [b - a for a, b in itertools.pairwise(kicks)]
    assert len(kicks) >= 8 and max(gaps) < 0.9, gaps
    assert any("STATUS" in f and "READY" not in f for _, f in notifications.messages)
    stopping_s = notifications.first("STOPPING")
    assert stopping_s is not None and stopping_s > kicks[-1] - 0.6
    assert ready_s - started < 30.0


def test_status_talks_to_the_running_service_and_a_second_instance_refuses(make_config):
    config = make_config()
    bms = Bms(config)
    try:
        status = bms.wait_for(lambda s: s["contactors"] == "closed")
        assert status["soc_mean"] > 0.5 and len(status["soc"]) == 16
        text = run_bms("status", "--config", str(config))
        assert text.returncode == 0
        assert "contactors   closed" in text.stdout and "SOC" in text.stdout
        second = run_bms("sim", "--config", str(config), "--duration-s", "2")
        assert second.returncode == 3
        assert "another BMS is running" in second.stderr
        assert bms.proc.poll() is None  # the first one runs on, undisturbed
        assert bms.wait_for(lambda s: s["contactors"] == "closed")
    finally:
        returncode, _, _, stderr = bms.stop()
    assert returncode == 0, stderr
    after = run_bms("status", "--config", str(config))
    assert after.returncode == 1 and "no BMS is running" in after.stderr


def write_limits(path: Path, msl_v: float) -> None:
    limits = tomllib.loads(LIMITS.read_text())
    limits["cell_voltage_high_v"] = {"mol": msl_v - 0.1, "rsl": msl_v - 0.05, "msl": msl_v}
    path.write_text(tomli_w.dumps(limits))


def test_a_latch_is_cleared_live_only_once_its_cause_is_gone(make_config, tmp_path):
    """The pack sits at about 4.0-4.05 V a cell; a limit set with its MSL at 4.0 V latches
    over-voltage. While the cells stay above it a clear is refused; a reload (SIGHUP) with the
    real limits removes the cause, and then the clear goes through and the contactors close."""
    limits = tmp_path / "limits.toml"
    write_limits(limits, msl_v=4.0)
    config = make_config({"protection": {"limits": str(limits)}})
    bms = Bms(config)
    try:
        bms.wait_for(lambda s: "cell_voltage_high_msl" in s["latched"])
        refused = run_bms("faults", "clear", "--config", str(config))
        assert refused.returncode == 3
        assert "cell_voltage_high_msl: its cause is still present" in refused.stderr
        write_limits(limits, msl_v=4.25)
        bms.proc.send_signal(signal.SIGHUP)
        status = bms.wait_for(lambda s: "cell_voltage_high_rsl" not in s["faults"])
        assert status["contactors"] == "fault"  # still latched: a reload clears nothing
        time.sleep(1.0)  # the counters drain
        cleared = run_bms("faults", "clear", "cell_voltage_high_msl", "--config", str(config))
        assert cleared.returncode == 0, cleared.stderr
        assert "cleared: cell_voltage_high_msl" in cleared.stdout
        bms.wait_for(lambda s: s["contactors"] == "closed" and s["latched"] == [])
        listed = run_bms("faults", "--config", str(config))
        assert "cell_voltage_high_msl  cleared " in listed.stdout
        assert f" by {getpass.getuser()}" in listed.stdout
    finally:
        returncode, _, _, stderr = bms.stop()
    assert returncode == 0, stderr
    assert "reloaded" in stderr and "latched faults cleared by" in stderr


def test_a_reload_that_is_invalid_or_needs_a_restart_keeps_the_old_config(make_config):
    config = make_config()
    original = config.read_text()
    bms = Bms(config)
    try:
        bms.wait_for(lambda s: s["contactors"] == "closed")
        config.write_text(original.replace("[protection]", "[protection]\nbogus_option = 1"))
        bms.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        data = tomllib.loads(original)
        data["pack"]["n_cells"] = 8
        config.write_text(tomli_w.dumps(data))
        bms.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert bms.wait_for(lambda s: s["contactors"] == "closed")
    finally:
        config.write_text(original)
        returncode, _, _, stderr = bms.stop()
    assert returncode == 0, stderr
    assert "reload of" in stderr and "bogus_option" in stderr
    assert "[pack] changed, which needs a restart" in stderr


def test_the_soc_survives_a_restart_and_an_old_one_gives_way_to_the_ocv(make_config, tmp_path):
    config = make_config({"loop": {"status_interval_s": 0.5}})
    first = run_sim(config, duration_s=4)
    assert first.returncode == 0
    last_soc = first.records[-1]["soc_mean"]
    second = run_sim(config, duration_s=2)
    assert "starting from the SOC stored" in second.stderr
    assert second.records[0]["soc_mean"] == pytest.approx(last_soc, abs=0.003)
    # a restored start is as sure as the last run was; an OCV start says 5 % (initial_soc_std)
    assert second.records[0]["soc_std_max"] < 0.04
    rested = make_config(
        {"loop": {"status_interval_s": 0.5}, "soc": {"rest_time_s": 1.0}},
    )
    run_sim(rested, duration_s=2)
    time.sleep(1.5)
    third = run_sim(rested, duration_s=2)
    assert "starting from the OCV" in third.stderr


def in_mount_namespace(script: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """Run a shell script as root of a mount namespace of its own (works unprivileged too), so
    it can mount the small or read-only file systems a test needs without touching the host."""
    return subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", "set -e\n" + script],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_a_full_disk_is_reported_and_protection_runs_on(make_config, tmp_path):
    """The store lives on an 8 MiB tmpfs (room for SQLite's WAL of up to 4 MiB): filled up
    while the BMS runs, the writes fail (store_write_failed, a warning) and the contactors stay
    closed; with room again the fault goes. The latch file is on the normal disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    store = {"path": str(mount / "state.sqlite"), "interval_s": 0.2}
    config = make_config({"loop": {"status_interval_s": 0.5}, "store": store})
    out, err = tmp_path / "out.jsonl", tmp_path / "err"
    proc = in_mount_namespace(
        f"""
mount -t tmpfs -o size=8m tmpfs {mount}
{BMS} sim --config {config} --status-format json --duration-s 40 > {out} 2> {err} &
pid=$!
until grep -q '"contactors":"closed"' {out}; do sleep 0.2; done
sleep 3
dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null || true
sleep 5
rm {mount}/filler
sleep 5
kill -TERM $pid
wait $pid
"""
    )
    assert proc.returncode == 0, proc.stderr + err.read_text()
    records, summary = parse_json_lines(out.read_text())
    assert summary is not None and summary["contactors"] == "open"
    closed = [r for r in records if r["contactors"] == "closed"]
    failed = ["store_write_failed" in r["faults"] for r in closed]
    # closed throughout; healthy, then failing while full, then healthy again
    assert len(closed) == len(records[records.index(closed[0]) :]), "opened meanwhile"
    first, last = failed.index(True), len(failed) - 1 - failed[::-1].index(True)
    assert first >= 4 and not any(failed[:first])
    assert all(failed[first : last + 1]) and last - first >= 6  # about 5 s full
    assert len(failed) - last > 4 and not any(failed[last + 1 :])
    stderr = err.read_text()
    assert "store write failed" in stderr and "store writes succeed again" in stderr


@pytest.mark.parametrize("on_read_only", ["store", "latch_file"])
def test_a_read_only_file_system_at_start_is_a_clear_refusal(make_config, tmp_path, on_read_only):
    mount = tmp_path / "ro"
    mount.mkdir()
    changes = (
        {"store": {"path": str(mount / "state.sqlite")}}
        if on_read_only == "store"
        else {"protection": {"latch_file": str(mount / "latched.json")}}
    )
    config = make_config(changes)
    proc = in_mount_namespace(
        f"""
mount -t tmpfs -o ro,size=64k tmpfs {mount}
{BMS} sim --config {config} --duration-s 2 || echo "exit $?"
"""
    )
    assert "exit 3" in proc.stdout, proc.stderr
    assert "cannot start" in proc.stderr and "Read-only file system" in proc.stderr
    assert "Traceback" not in proc.stderr
