"""End to end: `bms sim` as a separate process, judged by what it prints.

The simulated pack and the BMS share a python-can virtual bus inside that process; these tests
see only the CLI's JSON status lines, its summary, its exit code and its log, as a user would.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.conftest import BMS, merge, parse_json_lines, run_bms, run_sim

pytestmark = pytest.mark.e2e

REQUIRED_FIELDS = {
    "t_s",
    "contactors",
    "soc_min",
    "soc_mean",
    "soc_max",
    "cell_voltage_min_v",
    "cell_voltage_max_v",
    "current_a",
    "temp_max_c",
    "faults",
    "latched",
    "cycle_time_max_s",
    "missed_cycles",
}
OPENED = {"opening", "fault"}

# Test pack: a steady 10 A discharge (so current flows for the stuck-sensor check) and a status
# line every 0.1 s, so reaction times are seen to 0.1 s.
STEADY_DISCHARGE = {
    "loop": {"status_interval_s": 0.1},
    "protection": {"stuck_time_s": 2.0},
    "sim": {"load": {"profile": "constant", "current_a": -10.0}},
}
INJECT_AT_S = 2.5


def first_time(records: list[dict], states: set[str]) -> float | None:
    return next((r["t_s"] for r in records if r["contactors"] in states), None)


def test_contactors_close_after_precharge_and_status_lines_carry_the_contract(make_config):
    run = run_sim(make_config({"loop": {"status_interval_s": 0.1}}), duration_s=3)
    assert run.returncode == 0, run.stderr
    for record in run.records:
        assert record.keys() >= REQUIRED_FIELDS
    states = [r["contactors"] for r in run.records]
    assert "precharge" in states and "closed" in states
    assert states.index("precharge") < states.index("closed")
    assert states[-1] == "closed"
    closed = [r for r in run.records if r["contactors"] == "closed"]
    assert all(r["link_voltage_v"] >= 0.95 * r["pack_voltage_v"] for r in closed)
    assert all(r["latched"] == [] for r in run.records)
    # the insulation monitor reports "still measuring" for its first 0.5 s: no close till then
    before_close = run.records[: states.index("precharge")]
    assert all(set(r["faults"]) <= {"insulation_invalid"} for r in before_close)
    assert all(r["faults"] == [] for r in run.records[states.index("precharge") :])
    assert run.summary is not None and run.summary["contactors"] == "open"
    # limits only while closed, ramping up (10 A/s) to the limit set's MOL (10 A / 20 A)
    assert all(r["charge_limit_a"] == 0 for r in run.records if r["contactors"] != "closed")
    assert 0 < closed[-1]["charge_limit_a"] <= 10.0 and 0 < closed[-1]["discharge_limit_a"] <= 20.0


def test_soc_falls_while_discharging(make_config):
    config = make_config({"sim": {"load": {"profile": "constant", "current_a": -20.0}}})
    run = run_sim(config, duration_s=22)
    assert run.returncode == 0, run.stderr
    closed = [r for r in run.records if r["contactors"] == "closed"]
    assert len(closed) >= 18
    assert all(-20.5 < r["current_a"] < -19.5 for r in closed[1:])
    # 20 A for the closed seconds on a 5 Ah cell: about 0.11 % of SOC a second. Counted from
    # 8 s after the close: across the 4C load step the SOC falls faster (0.13-0.19 % a second,
    # measured) for several seconds, while the polarisation builds and the EKF settles onto
    # the voltages of cells whose resistance is 5 % off its model.
    settled = [r for r in closed if r["t_s"] >= closed[0]["t_s"] + 8.0]
    elapsed_s = settled[-1]["t_s"] - settled[0]["t_s"]
    drop = settled[0]["soc_mean"] - settled[-1]["soc_mean"]
    assert drop == pytest.approx(20.0 * elapsed_s / 3600 / 5.0, rel=0.2)
    assert closed[-1]["soc_min"] <= closed[-1]["soc_mean"] <= closed[-1]["soc_max"]


# fault injected, fault id expected to latch, time it needs beyond the common detection budget
# For the over-temperature case the discharge temperature limits come down to 28/30/32 degC.
LOW_TEMP_LIMITS = {"temp_high_discharge_c": {"mol": 28.0, "rsl": 30.0, "msl": 32.0}}
INJECTED_FAULTS = [
    ("open_wire@{t}:cell=3", "cell_voltage_invalid", 0.0, None),
    ("nan@{t}:cell=16", "cell_voltage_invalid", 0.0, None),
    ("stuck@{t}:cell=7", "cell_voltage_stuck", 2.0, None),  # stuck_time_s
    # heating 25 -> 32 degC at about 3 K/s
    ("overtemp@{t}:cell=5", "temp_high_discharge_msl", 2.5, LOW_TEMP_LIMITS),
    ("short@{t}", "short_circuit", 0.0, None),
    ("silence@{t}", "frontend_timeout", 0.5, None),  # cell_voltage_timeout_s
    ("insulation@{t}", "insulation_error", 0.0, None),
    ("interlock@{t}", "interlock_open", 0.0, None),
]


@pytest.mark.parametrize(
    ("inject", "fault_id", "extra_s", "limit_changes"),
    INJECTED_FAULTS,
    ids=[case[1] for case in INJECTED_FAULTS],
)
def test_injected_fault_opens_contactors_within_its_delay_and_latches(
    make_config, make_limits, inject, fault_id, extra_s, limit_changes
):
    changes = STEADY_DISCHARGE
    if limit_changes:
        changes = merge(changes, {"protection": {"limits": str(make_limits(limit_changes))}})
    config = make_config(changes)
    run = run_sim(config, "--inject", inject.format(t=INJECT_AT_S), duration_s=INJECT_AT_S + 5)
    assert run.returncode == 0, run.stderr
    before = [r for r in run.records if r["t_s"] < INJECT_AT_S - 0.2]
    assert before[-1]["contactors"] == "closed", "the pack must be closed when the fault hits"
    opened_at = first_time(run.records, OPENED)
    assert opened_at is not None, f"contactors never opened; last: {run.records[-1]}"
    # front-end period + debounce (3 cycles) + open_delay_s + status resolution + CI jitter
    budget_s = 0.1 + 0.3 + 0.5 + 0.1 + extra_s + 0.6
    assert INJECT_AT_S <= opened_at + 0.15 <= INJECT_AT_S + budget_s + 0.15
    assert fault_id in run.records[-1]["latched"]
    assert run.records[-1]["contactors"] == "fault"
    assert fault_id in run.summary["latched"]
    assert run.summary["contactors"] == "open"
    assert f"fault latched: {fault_id}" in run.stderr


def test_short_circuit_opens_without_the_open_delay(make_config):
    config = make_config(merge(STEADY_DISCHARGE, {"diagnosis": {"open_delay_s": 5.0}}))
    run = run_sim(config, "--inject", f"short@{INJECT_AT_S}", duration_s=INJECT_AT_S + 2)
    assert run.returncode == 0, run.stderr
    before = [r for r in run.records if r["t_s"] < INJECT_AT_S - 0.2]
    assert before[-1]["contactors"] == "closed"
    opened_at = first_time(run.records, OPENED)
    assert opened_at is not None and INJECT_AT_S - 0.3 < opened_at < INJECT_AT_S + 1.0
    assert "short_circuit" in run.records[-1]["latched"]


def test_short_on_the_link_before_closing_fails_the_precharge(make_config):
    run = run_sim(make_config(STEADY_DISCHARGE), "--inject", "short@0", duration_s=5)
    assert all(r["contactors"] != "closed" for r in run.records)
    assert "precharge_failed" in run.records[-1]["latched"]
    assert run.records[-1]["contactors"] == "fault"
    assert run.summary["contactors"] == "open" and run.returncode == 0


def test_welded_contactor_is_latched_and_exit_code_says_open_is_unconfirmed(make_config):
    config = make_config(STEADY_DISCHARGE)
    run = run_sim(
        config,
        "--inject",
        "weld@1",
        "--inject",
        f"open_wire@{INJECT_AT_S}:cell=1",
        duration_s=INJECT_AT_S + 3,
    )
    latched = run.records[-1]["latched"]
    assert "cell_voltage_invalid" in latched and "contactor_weld" in latched
    assert run.records[-1]["contactors"] == "fault"
    assert run.summary["contactors"] == "unconfirmed"
    assert run.returncode == 1


def test_faults_scheduled_in_the_config_are_injected(make_config):
    faults = [{"kind": "open_wire", "at_s": INJECT_AT_S, "cell": 2}]
    config = make_config(merge(STEADY_DISCHARGE, {"sim": {"faults": faults}}))
    run = run_sim(config, duration_s=INJECT_AT_S + 2.5)
    assert run.returncode == 0, run.stderr
    assert [r for r in run.records if r["t_s"] < INJECT_AT_S - 0.2][-1]["contactors"] == "closed"
    opened_at = first_time(run.records, OPENED)
    assert opened_at is not None and INJECT_AT_S - 0.3 < opened_at < INJECT_AT_S + 1.6
    assert "cell_voltage_invalid" in run.records[-1]["latched"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_with_contactors_open(make_config, sig):
    config = make_config({"loop": {"status_interval_s": 0.2}})
    proc = subprocess.Popen(  # bounded, so a test that never sees "closed" fails, not hangs
        [str(BMS), "sim", "--config", str(config), "--status-format", "json", "--duration-s", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(json.loads(line))
            if seen[-1]["contactors"] == "closed":
                break
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    records, summary = parse_json_lines(stdout)
    assert seen[-1]["contactors"] == "closed", "the signal must find the contactors closed"
    assert all(r["latched"] == [] for r in seen + records)
    assert proc.returncode == 0, stderr
    assert summary["stopped_by"] == sig.name
    assert summary["contactors"] == "open"
    assert "Traceback" not in stderr


def test_text_status_line_and_summary(make_config):
    proc = run_bms("sim", "--config", str(make_config()), "--duration-s", "2.5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("closed" in line and "SOC" in line and "missed" in line for line in lines)
    assert lines[-1].startswith("stopped (duration reached)")
    assert " INFO bms.app: control loop running at 10 Hz" in proc.stderr  # formatted once
    assert "contactors open" in lines[-1]


def test_bad_injection_is_a_usage_error(make_config):
    proc = run_bms("sim", "--config", str(make_config()), "--inject", "melt@3", "--duration-s", "1")
    assert proc.returncode == 2
    assert "unknown fault kind 'melt'" in proc.stderr
    proc = run_bms(
        "sim",
        "--config",
        str(make_config()),
        "--inject",
        "open_wire@3:cell=17",
        "--duration-s",
        "1",
    )
    assert proc.returncode == 2
    assert "cell 17 is not in the pack (1..16)" in proc.stderr


def test_help_lists_every_fault_kind():
    proc = run_bms("sim", "--help")
    assert proc.returncode == 0
    for kind in (
        "open_wire",
        "stuck",
        "nan",
        "overtemp",
        "short",
        "weld",
        "silence",
        "insulation",
        "interlock",
    ):
        assert f"  {kind} " in proc.stdout


def test_run_without_a_pack_waits_then_latches_and_never_closes(make_config):
    config = make_config({"loop": {"startup_timeout_s": 1.0}})
    proc = run_bms("run", "--config", str(config), "--status-format", "json", "--duration-s", "2")
    records, summary = parse_json_lines(proc.stdout)
    assert "no complete sample from the front-end" in proc.stderr
    assert all(r["contactors"] in ("open", "fault") for r in records)
    assert {"frontend_timeout", "contactor_feedback_invalid"} <= set(records[-1]["latched"])
    assert summary["contactors"] == "unconfirmed" and proc.returncode == 1


def test_broken_files_named_by_the_config_are_clear_errors(make_config, tmp_path):
    bad_dbc = tmp_path / "bad.dbc"
    bad_dbc.write_text("BO_ this is not a DBC\n")
    proc = run_bms(
        "sim",
        "--config",
        str(make_config({"can": {"dbc_file": str(bad_dbc)}})),
        "--duration-s",
        "1",
    )
    assert proc.returncode == 3
    assert f"{bad_dbc}: cannot load DBC" in proc.stderr
    assert "Traceback" not in proc.stderr
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    (cell_dir / "params.toml").write_text("name = 'x'\ncapacity_ah = -1\n")
    proc = run_bms(
        "sim",
        "--config",
        str(make_config({"pack": {"cell_params": str(cell_dir)}})),
        "--duration-s",
        "1",
    )
    assert proc.returncode == 3
    assert "capacity_ah" in proc.stderr and "Traceback" not in proc.stderr


def test_a_latched_fault_survives_a_restart_until_a_person_clears_it(make_config):
    config = make_config(merge(STEADY_DISCHARGE, {"loop": {"status_interval_s": 0.5}}))
    first = run_sim(config, "--inject", "short@2", duration_s=3.5)
    assert "short_circuit" in first.summary["latched"]

    listed = run_bms("faults", "--config", str(config))
    assert listed.returncode == 0 and "\n  short_circuit  since " in listed.stdout
    assert "short_circuit  not cleared" in listed.stdout  # the store's fault log

    second = run_sim(config, duration_s=3)  # the short is gone, but the latch is not
    assert all(r["contactors"] in ("open", "fault") for r in second.records)
    assert all("short_circuit" in r["latched"] for r in second.records)
    assert "latched before this start" in second.stderr

    cleared = run_bms("faults", "clear", "--config", str(config))
    assert cleared.returncode == 0 and "cleared: short_circuit" in cleared.stdout
    assert "short_circuit  cleared " in run_bms("faults", "--config", str(config)).stdout
    third = run_sim(config, duration_s=3)
    assert third.records[-1]["contactors"] == "closed" and third.records[-1]["latched"] == []


def test_an_unreadable_latch_file_keeps_the_contactors_open(make_config, tmp_path):
    latch_file = tmp_path / "broken.json"
    latch_file.write_text("{ torn by a power cut")
    config = make_config({"protection": {"latch_file": str(latch_file)}})
    for _ in range(2):  # and again after a restart: the latch was written back
        run = run_sim(config, duration_s=2)
        assert all(r["contactors"] != "closed" for r in run.records)
        assert "latch_store_unreadable" in run.records[-1]["latched"]
    assert "could not be read" in run.stderr
    listed = run_bms("faults", "--config", str(config))
    assert "latch_store_unreadable" in listed.stdout
    assert list(tmp_path.glob("broken.json.unreadable-*"))


def test_cells_bleed_at_rest_but_not_while_discharging(make_config):
    at_rest = {
        "loop": {"status_interval_s": 0.5},
        "balancing": {"max_duty": 1.0},  # no off-phase of the duty cycle in a 3 s run
        "sim": {"load": {"profile": "constant", "current_a": 0.0}},
    }
    run = run_sim(make_config(at_rest), duration_s=3)
    # 16 cells, 1 % SOC spread (50 mAh): every cell but the lowest holds > 10 mAh more
    assert any(len(r["balancing"]) >= 8 for r in run.records)
    assert all(1 <= cell <= 16 for r in run.records for cell in r["balancing"])
    run = run_sim(make_config(STEADY_DISCHARGE), duration_s=3)
    closed = [r for r in run.records if r["contactors"] == "closed"]
    assert closed and all(r["balancing"] == [] for r in closed)
