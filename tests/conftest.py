"""Shared test helpers: configs derived from config/sim.toml, and the bms CLI as a process."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

REPO = Path(__file__).resolve().parent.parent
SIM_CONFIG = REPO / "config" / "sim.toml"
LIMITS = REPO / "config" / "limits" / "nmc.toml"
BMS = Path(sys.executable).with_name("bms")
SOCKET_DIR = Path(tempfile.mkdtemp(prefix="pybms-test-", dir="/tmp"))
"""The tests' control sockets: a Unix socket's path must be under 108 bytes, which tmp_path
is not always. Removed at the end of the session with the lock files a BMS leaves beside
its socket (by design: removing a lock file another process may be opening races it)."""


def control_socket_path() -> Path:
    """A fresh control-socket path under SOCKET_DIR."""
    return SOCKET_DIR / f"{uuid.uuid4().hex[:12]}.sock"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SOCKET_DIR, ignore_errors=True)


def sim_config_data() -> dict:
    """config/sim.toml as data, with its relative paths made absolute."""
    data = tomllib.loads(SIM_CONFIG.read_text())
    base = SIM_CONFIG.parent
    data["pack"]["cell_params"] = str((base / data["pack"]["cell_params"]).resolve())
    data["can"]["dbc_file"] = str((base / data["can"]["dbc_file"]).resolve())
    data["protection"]["limits"] = str((base / data["protection"]["limits"]).resolve())
    load = data["sim"]["load"]
    if "drive_cycle_file" in load:
        load["drive_cycle_file"] = str((base / load["drive_cycle_file"]).resolve())
    return data


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in section by section; None deletes a key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_config(tmp_path):
    """Write a config derived from config/sim.toml with ``changes``; return its path.

    Each config gets its own virtual CAN channel, latch file, store and control socket, so
    tests never hear each other.
    """
    counter = iter(range(1000))

    def make(changes: dict | None = None, name: str | None = None) -> Path:
        n = next(counter)
        data = merge(
            sim_config_data(),
            {
                "can": {"channel": f"test-{os.getpid()}-{n}"},
                "protection": {"latch_file": str(tmp_path / f"latched{n}.json")},
                "store": {"path": str(tmp_path / f"store{n}.sqlite")},
                "service": {"control_socket": str(control_socket_path())},
            },
        )
        data = merge(data, changes or {})
        path = tmp_path / (name or f"config{n}.toml")
        path.write_text(tomli_w.dumps(data))
        return path

    return make


@pytest.fixture
def make_limits(tmp_path):
    """Write a copy of config/limits/nmc.toml with ``changes`` merged in; return its path."""
    counter = iter(range(1000))

    def make(changes: dict) -> Path:
        data = merge(tomllib.loads(LIMITS.read_text()), changes)
        path = tmp_path / f"limits{next(counter)}.toml"
        path.write_text(tomli_w.dumps(data))
        return path

    return make


@dataclass
class SimRun:
    returncode: int
    records: list[dict]
    summary: dict | None
    stderr: str


def run_bms(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(BMS), *args], capture_output=True, text=True, timeout=timeout_s)


def run_identify(
    out: Path, ocv: Path, hppc: list[Path], power: list[Path] = (), *extra: str
) -> subprocess.CompletedProcess:
    """``bms identify`` from an OCV test and pulse tests (and power tests) into ``out``."""
    args = ["identify", "--ocv", str(ocv)]
    args += [arg for path in hppc for arg in ("--hppc", str(path))]
    args += [arg for path in power for arg in ("--power", str(path))]
    return run_bms(*args, "--out", str(out), *extra)


def parse_json_lines(stdout: str) -> tuple[list[dict], dict | None]:
    records, summary = [], None
    for line in stdout.splitlines():
        obj = json.loads(line)
        if obj.get("summary"):
            summary = obj
        else:
            records.append(obj)
    return records, summary


def run_sim(config: Path, *args: str, duration_s: float, timeout_s: float = 60.0) -> SimRun:
    """Run ``bms sim`` as a separate process for ``duration_s`` and parse its JSON lines."""
    proc = run_bms(
        "sim",
        "--config",
        str(config),
        "--status-format",
        "json",
        "--duration-s",
        str(duration_s),
        *args,
        timeout_s=timeout_s,
    )
    records, summary = parse_json_lines(proc.stdout)
    return SimRun(proc.returncode, records, summary, proc.stderr)
