"""End to end: `bms sim` as a separate process whose front-end is a JBD smart BMS, emulated on
the far end of a pty (tests/emulators/jbd.py) in this process; the simulated pack still provides
the contactor box on the virtual CAN bus. Judged by the CLI's JSON status lines."""

from __future__ import annotations

import json
import subprocess
import tomllib

import pytest
import tomli_w

from tests.conftest import BMS, parse_json_lines
from tests.emulators.jbd import JbdEmulator, PackState

pytestmark = pytest.mark.e2e

CELLS_V = [3.70 + 0.002 * (i % 5) for i in range(16)]
TEMPS_C = [24.5, 25.0, 25.5]
OVER_VOLTAGE_AT_S = 2.5
OVER_VOLTAGE_CELL = 3  # counting from 1
OVER_VOLTAGE_V = 4.30  # above config/limits/nmc.toml's cell_voltage_high_v.msl (4.25 V)


def jbd_config(make_config, port: str):
    path = make_config(
        {
            "pack": {"n_cells": len(CELLS_V), "n_temp_sensors": len(TEMPS_C)},
            "loop": {"status_interval_s": 0.1},
            # a JBD has no DC-link voltage: a timed precharge (config/jbd.toml)
            "control": {"precharge_time_s": 0.5, "precharge_min_s": None},
            "protection": {"insulation_warning_kohm": None, "insulation_error_kohm": None},
            "balancing": {"enabled": False},
            "frontend": None,
        }
    )
    data = tomllib.loads(path.read_text())
    data["frontend"] = {
        "backend": "jbd",
        "port": port,
        "poll_period_s": 0.1,
        "response_timeout_s": 0.1,
        "timeout_s": 1.0,
    }
    path.write_text(tomli_w.dumps(data))
    return path


def test_jbd_cells_arrive_and_an_over_voltage_latches_and_opens(make_config):
    state = PackState(cell_voltages_v=list(CELLS_V), temps_c=list(TEMPS_C), current_a=0.5)
    with JbdEmulator(state) as emulator:
        config = jbd_config(make_config, emulator.port)
        proc = subprocess.Popen(
            [str(BMS), "sim", "--config", str(config), "--status-format", "json",
             "--duration-s", str(OVER_VOLTAGE_AT_S + 4)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            lines = []
            for line in proc.stdout:  # bounded by --duration-s
                lines.append(line)
                if json.loads(line).get("t_s", 0.0) >= OVER_VOLTAGE_AT_S:
                    # the JBD's own over-voltage threshold is higher: no protection bit yet
                    with emulator.lock:
                        emulator.state.cell_voltages_v[OVER_VOLTAGE_CELL - 1] = OVER_VOLTAGE_V
                    break
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        requests = dict(emulator.requests)
    records, summary = parse_json_lines("".join(lines) + stdout)
    assert proc.returncode == 0, stderr
    assert requests.get(0x03, 0) > 10 and requests.get(0x04, 0) > 10

    before = [r for r in records if r["t_s"] < OVER_VOLTAGE_AT_S]
    assert before, stderr
    for r in before:
        assert r["cell_voltage_min_v"] == pytest.approx(min(CELLS_V), abs=1e-6)
        assert r["cell_voltage_max_v"] == pytest.approx(max(CELLS_V), abs=1e-6)
        assert r["temp_max_c"] == pytest.approx(max(TEMPS_C))
        assert r["current_a"] == pytest.approx(0.5)  # charging, as the JBD reports it
        assert r["pack_voltage_v"] == pytest.approx(sum(CELLS_V), abs=0.006)
        assert r["link_voltage_v"] is None and r["stale"] == [] and r["latched"] == []
    assert before[-1]["contactors"] == "closed"  # after the timed precharge

    after = [r for r in records if r["t_s"] >= OVER_VOLTAGE_AT_S]
    high = [r for r in after if r["cell_voltage_max_v"] == pytest.approx(OVER_VOLTAGE_V)]
    assert high and high[0]["cell_voltage_max_cell"] == OVER_VOLTAGE_CELL
    opened = [r for r in after if r["contactors"] in ("opening", "fault")]
    assert opened, f"contactors never opened; last: {records[-1]}"
    # one JBD poll + debounce (3 cycles) + open_delay_s + status resolution + CI jitter
    assert opened[0]["t_s"] - high[0]["t_s"] <= 0.3 + 0.5 + 0.1 + 1.0
    assert "cell_voltage_high_msl" in records[-1]["latched"]
    assert records[-1]["contactors"] == "fault"
    assert summary is not None and summary["contactors"] == "open"
    assert "fault latched: cell_voltage_high_msl" in stderr
