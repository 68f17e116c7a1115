"""The ordered rig tests: the same file against the virtual rig (CI) and a bench rig.

Run with ``pytest hil --rig=virtual`` or ``pytest hil --rig=bench --rig-config RIG.toml``;
they run in the order their numbers give. Each test starts the board's BMS afresh (``bms run``
with the board's config) on a pack at rest and judges it only from outside: the instruments'
readbacks, the frames the rig hears on CAN (the contactor box's feedback above all), the BMS's
JSON status lines and ``bms status --json``. The teardown checks the board's health (no bus
fault, no missed cycles beyond the budget, contactors confirmed open, no latched fault the test
did not cause) and returns the rig to rest.

Limits come from the board's config (its limit set, its diagnosis delays, its loop period) and
the rig config (tolerances, budgets); a figure's window is derived from the chain of delays
the configuration promises, never from a run of the code.
"""

from __future__ import annotations

import signal
import statistics
import time
from dataclasses import dataclass

import pytest

from hil.canbus import all_open, main_closed
from hil.conftest import BmsUnderTest, Figures, finish_bms, start_bms
from hil.report import Reaction
from hil.session import RigSession

FEEDBACK = "PDU_ContactorFeedback"
BMS_PERIODIC = ("BMS_Status", "BMS_Limits", "BMS_CellStats", "BMS_ContactorCommand")
SETTLE_PERIODS = 5
"""Loop periods (and front-end frame periods) a new setting gets before it is read back."""


def frame_period_s(session: RigSession, message: str) -> float:
    """The DBC's period of a front-end message (GenMsgCycleTime), else the loop period."""
    cycle_ms = session.monitor.codec.message(message).cycle_time
    return cycle_ms / 1000.0 if cycle_ms else session.bms_config.loop.period_s


def loop_period_s(session: RigSession) -> float:
    return session.bms_config.loop.period_s


def settle(session: RigSession) -> None:
    period_s = max(session.bms_config.loop.period_s, frame_period_s(session, "CMU_CellVoltages"))
    time.sleep(SETTLE_PERIODS * period_s)


def status_when(bms: BmsUnderTest, predicate, timeout_s: float) -> dict:
    """The BMS's status once ``predicate`` holds for it, or the last one after ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    while not predicate(status := bms.status()) and time.monotonic() < deadline_s:
        time.sleep(bms.session.bms_config.loop.period_s)
    return status


# ---------------------------------------------------------------- 1. boot and identify
def test_01_boot_and_identify(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    session, rig = rig_session, rig_session.rig
    for name, instrument in rig.instruments.items():
        identity = instrument.expect(session.config.instruments[name].identity)
        assert identity == rig.identities[name], f"{name} answers as another instrument now"
    process = bms.process
    status_frames = session.monitor.frames("BMS_Status", process.started_s)
    first_s = status_frames[0].t_s - process.started_s if status_frames else float("nan")
    timeout_s = session.config.board.boot_timeout_s
    figures.measure("first_status_frame_s", first_s, "s", 0, timeout_s)
    figures.measure("start_to_closed_s", bms.closed_s - process.started_s, "s", 0, timeout_s)
    status = bms.status()
    assert status["contactors"] == "closed"
    assert len(status["cell_voltage_v"]) == rig.n_cells
    assert len(status["cell_temp_c"]) == rig.n_sensors
    assert None not in status["cell_voltage_v"] and None not in status["cell_temp_c"]
    assert status["faults"] == [] and status["latched"] == [], status
    assert status["stale"] == []
    figures.verify()


# ---------------------------------------------------------------- 2. CAN round trip
def test_02_can_round_trip(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    """Every periodic frame of the BMS and its contactor box at its period with no gap in its
    counter; then a cell voltage set on the emulator comes back in the BMS's BMS_CellStats."""
    session, rig, monitor = rig_session, rig_session.rig, rig_session.monitor
    period_s = session.bms_config.loop.period_s
    window_s = 30 * period_s
    start_s = time.monotonic()
    lost_before = dict(monitor.lost)
    time.sleep(window_s)
    for name in (*BMS_PERIODIC, FEEDBACK):
        rate_hz = len(monitor.frames(name, start_s, start_s + window_s)) / window_s
        expected_hz = 1.0 / (frame_period_s(session, name) if name == FEEDBACK else period_s)
        figures.measure(f"{name}_rate_hz", rate_hz, "Hz", 0.8 * expected_hz, 1.2 * expected_hz)
    lost = sum(monitor.lost.values()) - sum(lost_before.values())
    figures.measure("frames_lost", lost, "frames", 0, session.config.budgets.frames_lost)

    cell = rig.n_cells // 2
    nominal_v = session.config.cell_emulator.nominal_voltage_v
    raised_v = nominal_v + 0.08
    tolerance_v = session.config.tolerances.cell_voltage_v
    set_s = rig.set_cell(cell, raised_v)

    def shows_raised(values: dict) -> bool:
        return (
            values["CellVoltageMaxCell"] == cell + 1
            and abs(values["CellVoltageMax"] - raised_v) <= tolerance_v
        )

    budget_s = session.config.budgets.round_trip_s
    seen = monitor.wait_for("BMS_CellStats", shows_raised, set_s, 10 * budget_s)
    latency_s = (seen.t_s - set_s) if seen is not None else float("nan")
    figures.measure("round_trip_s", latency_s, "s", 0, budget_s)
    back_s = rig.set_cell(cell, nominal_v)
    seen = monitor.wait_for(
        "BMS_CellStats", lambda v: v["CellVoltageMax"] < raised_v - 0.04, back_s, 10 * budget_s
    )
    figures.measure(
        "round_trip_back_s", (seen.t_s - back_s) if seen else float("nan"), "s", 0, budget_s
    )
    figures.verify()


# ---------------------------------------------------------------- 3. front-end accuracy
def test_03_front_end_accuracy(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    """Cell voltages, pack current and temperatures set on the instruments, read back through
    the BMS, against the instruments' own readbacks, within the rig config's tolerances."""
    session, rig = rig_session, rig_session.rig
    tolerances = session.config.tolerances
    limits = session.bms_config.limits
    # two levels inside the operating limits, the cells 5 mV apart (a spread below its MOL)
    spread_v = min(0.005 * (rig.n_cells - 1), 0.5 * limits.cell_voltage_spread_v.mol)
    steps_v = [spread_v * i / max(rig.n_cells - 1, 1) for i in range(rig.n_cells)]
    for level, base_v in (
        ("low", limits.cell_voltage_low_v.mol + 0.25),
        ("high", limits.cell_voltage_high_v.mol - 0.25 - spread_v),
    ):
        rig.set_cells([base_v + step for step in steps_v])
        settle(session)
        reference = rig.cell_voltages()
        measured = bms.status()["cell_voltage_v"]
        errors = [abs(m - r) for m, r in zip(measured, reference, strict=True)]
        figures.measure(
            f"cell_voltage_error_{level}_v", max(errors), "V", 0, tolerances.cell_voltage_v
        )
    rig.set_cells(session.config.cell_emulator.nominal_voltage_v)

    currents = [-0.5 * limits.discharge_current_a.mol * session.bms_config.pack.n_parallel]
    if rig.supply is not None:
        currents.append(0.5 * limits.charge_current_a.mol * session.bms_config.pack.n_parallel)
    for current_a in currents:
        rig.set_pack_current(current_a)
        settle(session)
        reference_a = rig.measured_pack_current()
        measured_a = bms.status()["current_a"]
        label = "charge" if current_a > 0 else "discharge"
        figures.measure(
            f"current_error_{label}_a", abs(measured_a - reference_a), "A", 0, tolerances.current_a
        )
        figures.measure(
            f"current_reference_{label}_a",
            reference_a,
            "A",
            current_a - tolerances.current_a,
            current_a + tolerances.current_a,
        )
    rig.set_pack_current(0.0)

    for label, temp_c in (
        ("cold", limits.temp_low_charge_c.mol + 5.0),
        ("warm", limits.temp_high_charge_c.mol - 5.0),
    ):
        rig.set_temperatures(temp_c)
        settle(session)
        reference = rig.sensor_temps()
        measured = bms.status()["cell_temp_c"]
        errors = [abs(m - r) for m, r in zip(measured, reference, strict=True)]
        figures.measure(f"temp_error_{label}_c", max(errors), "degC", 0, tolerances.temp_c)
    rig.set_temperatures(session.config.thermistor_emulator.nominal_temp_c)
    figures.verify()


# ---------------------------------------------------------------- 4-9. protection trips
@dataclass(frozen=True)
class Trip:
    fault_id: str
    cause: str
    message: str
    """The front-end message that carries the quantity (its period is in the chain)."""


def reaction_window(session: RigSession, trip: Trip) -> tuple[float, float, float]:
    """(configured, lowest, highest) time from the cause to the box's open feedback.

    Configured: the diagnosis row's debounce (cycles x loop period) plus its open delay. The
    table counts the debounce from the first cycle that sees the cause and the delay from the
    cycle it becomes active, so the opening comes no sooner than (debounce - 1) periods plus
    the delay (less half a period: the cycles' own jitter); and no later than the configured
    delay plus one front-end frame period (the cause reaches the bus), one loop period (the
    cycle reads it), the box's response and the rig's margin."""
    config = session.bms_config
    row = config.diagnosis.row(trip.fault_id)
    period_s = config.loop.period_s
    configured_s = row.debounce_cycles * period_s + row.open_delay_s
    low_s = (row.debounce_cycles - 1) * period_s + row.open_delay_s - 0.5 * period_s
    high_s = (
        configured_s
        + frame_period_s(session, trip.message)
        + period_s
        + session.config.contactor_box.response_s
        + session.config.budgets.reaction_margin_s
    )
    return configured_s, low_s, high_s


def measure_trip(
    session: RigSession, bms: BmsUnderTest, figures: Figures, trip: Trip, cause_s: float
) -> None:
    configured_s, low_s, high_s = reaction_window(session, trip)
    opened = session.monitor.wait_for(FEEDBACK, all_open, cause_s, high_s + 5.0)
    measured_s = opened.t_s - cause_s if opened is not None else float("nan")
    figures.measure(f"{trip.fault_id}_reaction_s", measured_s, "s", low_s, high_s)
    session.report.reactions.append(
        Reaction(trip.fault_id, trip.cause, measured_s, configured_s, low_s, high_s)
    )
    bms.expect_latched(trip.fault_id)
    # it saw its feedback confirm the opening a cycle or two after the rig did
    settle_s = session.config.contactor_box.response_s + SETTLE_PERIODS * loop_period_s(session)
    status = status_when(bms, lambda s: s["contactors"] == "fault", settle_s)
    assert trip.fault_id in status["latched"], status
    assert status["contactors"] == "fault", status
    # the box keeps them open: no close into a latched fault
    assert (
        session.monitor.wait_for(FEEDBACK, main_closed, opened.t_s if opened else cause_s, 1.0)
        is None
    )


def test_04_over_voltage_trip(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    session = rig_session
    trip = Trip("cell_voltage_high_msl", "every cell 50 mV above its MSL", "CMU_CellVoltages")
    cause_s = session.rig.set_cells(session.bms_config.limits.cell_voltage_high_v.msl + 0.05)
    measure_trip(session, bms, figures, trip, cause_s)
    figures.verify()


def test_05_under_voltage_trip(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    session = rig_session
    trip = Trip("cell_voltage_low_msl", "every cell 50 mV below its MSL", "CMU_CellVoltages")
    cause_s = session.rig.set_cells(session.bms_config.limits.cell_voltage_low_v.msl - 0.05)
    measure_trip(session, bms, figures, trip, cause_s)
    figures.verify()


def test_06_over_temperature_trip(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    session = rig_session
    trip = Trip(
        "temp_high_discharge_msl", "every sensor 5 degC above its MSL", "CMU_CellTemperatures"
    )
    cause_s = session.rig.set_temperatures(
        session.bms_config.limits.temp_high_discharge_c.msl + 5.0
    )
    measure_trip(session, bms, figures, trip, cause_s)
    figures.verify()


def test_07_over_current_trip(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    session = rig_session
    config = session.bms_config
    msl_a = config.limits.discharge_current_a.msl * config.pack.n_parallel
    short_a = config.protection.short_circuit_current_a
    current_a = msl_a + min(5.0, 0.5 * (short_a - msl_a))  # past the MSL, short of a short
    trip = Trip("discharge_current_msl", f"a {current_a:g} A discharge", "CMU_PackMeasurements")
    cause_s = session.rig.set_pack_current(-current_a)
    measure_trip(session, bms, figures, trip, cause_s)
    settle(session)
    # the contactors broke the current: the load carries none
    figures.measure(
        "current_after_open_a",
        session.rig.measured_pack_current(),
        "A",
        -session.config.tolerances.current_a,
        session.config.tolerances.current_a,
    )
    figures.verify()


def test_08_open_sense_wire_trip(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    session = rig_session
    wired = sorted(session.config.relay_box.sense_wire_channels)
    if not wired:
        pytest.fail("the rig config wires no sense-wire relay ([relay_box] sense_wire_channels)")
    cell = wired[0] - 1
    trip = Trip("cell_voltage_invalid", f"cell {cell + 1}'s sense wire opened", "CMU_CellVoltages")
    cause_s = session.rig.open_sense_wire(cell)
    measure_trip(session, bms, figures, trip, cause_s)
    assert bms.status()["cell_voltage_v"][cell] is None  # reported invalid, not a stale value
    figures.verify()


def test_09_shorted_temperature_sensor_trip(
    rig_session: RigSession, bms: BmsUnderTest, figures: Figures
):
    session = rig_session
    wired = sorted(session.config.relay_box.sensor_short_channels)
    if not wired:
        pytest.fail(
            "the rig config wires no sensor-short relay ([relay_box] sensor_short_channels)"
        )
    sensor = wired[0] - 1
    trip = Trip("temperature_invalid", f"sensor {sensor + 1} shorted", "CMU_CellTemperatures")
    cause_s = session.rig.short_sensor(sensor, True)
    measure_trip(session, bms, figures, trip, cause_s)
    assert bms.status()["cell_temp_c"][sensor] is None
    figures.verify()


# ---------------------------------------------------------------- 10-11. dead-man and watchdog
def deadman_window(session: RigSession) -> tuple[float, float]:
    """The box opens once commands have stopped for its hold time; the last command left up to
    a loop period before the process died, and the box acts on its next tick."""
    hold_s = session.config.contactor_box.deadman_hold_s
    period_s = session.bms_config.loop.period_s
    low_s = hold_s - period_s - 0.05
    high_s = (
        hold_s + session.config.contactor_box.response_s + session.config.budgets.reaction_margin_s
    )
    return low_s, high_s


def test_10_dead_man_opens_when_the_bms_is_killed(
    rig_session: RigSession, bms: BmsUnderTest, figures: Figures
):
    """kill -9: nothing of the BMS runs any more; the box's dead-man alone opens the relays."""
    session = rig_session
    discharge_a = -0.25 * session.bms_config.limits.discharge_current_a.mol
    session.rig.set_pack_current(discharge_a)
    settle(session)
    figures.measure(
        "current_before_kill_a",
        session.rig.measured_pack_current(),
        "A",
        discharge_a - session.config.tolerances.current_a,
        discharge_a + session.config.tolerances.current_a,
    )
    low_s, high_s = deadman_window(session)
    bms.process.killed = True
    killed_s = time.monotonic()
    bms.process.send_signal(signal.SIGKILL)
    opened = session.monitor.wait_for(FEEDBACK, all_open, killed_s, high_s + 5.0)
    measured_s = opened.t_s - killed_s if opened is not None else float("nan")
    figures.measure("deadman_reaction_s", measured_s, "s", low_s, high_s)
    session.report.reactions.append(
        Reaction(
            "(dead-man)",
            "bms killed (SIGKILL)",
            measured_s,
            session.config.contactor_box.deadman_hold_s,
            low_s,
            high_s,
        )
    )
    settle(session)
    tolerance_a = session.config.tolerances.current_a
    figures.measure(
        "current_after_open_a", session.rig.measured_pack_current(), "A", -tolerance_a, tolerance_a
    )
    assert (
        session.monitor.wait_for(FEEDBACK, main_closed, opened.t_s if opened else killed_s, 1.0)
        is None
    )
    assert bms.process.proc.wait(timeout=5.0) == -signal.SIGKILL
    figures.verify()


def test_11_watchdog_and_dead_man_when_the_bms_hangs(rig_session: RigSession, figures: Figures):
    """SIGSTOP (a hung process): the systemd watchdog stops being kicked and the box's
    dead-man opens the relays; SIGCONT: the BMS sees its own stall, latches it and does not
    close again by itself."""
    session = rig_session
    if not session.board.local:
        pytest.fail("the watchdog's notifications are only observable on a local board")
    watchdog_s = 4 * session.config.contactor_box.deadman_hold_s
    bms = start_bms(session, watchdog_usec=int(watchdog_s * 1e6))
    problems: list[str] = []
    try:
        notify = bms.process.notify
        assert notify is not None
        time.sleep(watchdog_s)
        kicks = notify.kicks(after_s=bms.closed_s)
        # systemd's advice, which the BMS follows: kick at half the watchdog interval
        figures.measure("watchdog_kicks_while_healthy", len(kicks), "kicks", 1, None)
        low_s, high_s = deadman_window(session)
        stopped_s = time.monotonic()
        bms.process.send_signal(signal.SIGSTOP)
        try:
            opened = session.monitor.wait_for(FEEDBACK, all_open, stopped_s, high_s + 5.0)
            measured_s = opened.t_s - stopped_s if opened is not None else float("nan")
            figures.measure("hang_deadman_reaction_s", measured_s, "s", low_s, high_s)
            session.report.reactions.append(
                Reaction(
                    "(dead-man)",
                    "bms hung (SIGSTOP)",
                    measured_s,
                    session.config.contactor_box.deadman_hold_s,
                    low_s,
                    high_s,
                )
            )
            time.sleep(watchdog_s)
            silent = notify.kicks(after_s=stopped_s + 0.05, until_s=time.monotonic())
            figures.measure("watchdog_kicks_while_hung", len(silent), "kicks", 0, 0)
        finally:
            resumed_s = time.monotonic()
            bms.process.send_signal(signal.SIGCONT)
        # every cycle of the hang is missed; the stall latches (at once), and so may the lag it
        # leaves in the lateness average and the relays found open under a close command
        bms.expect_missed(int((resumed_s - stopped_s) / session.bms_config.loop.period_s) + 1)
        bms.expect_latched("loop_stalled", "loop_lag", "contactor_feedback_mismatch")
        reclosed = session.monitor.wait_for(FEEDBACK, main_closed, resumed_s, 3.0)
        assert reclosed is None, "the BMS closed the contactors again after its stall"
        status = status_when(bms, lambda s: s["contactors"] == "fault", 1.0)
        assert "loop_stalled" in status["latched"], status
        assert status["contactors"] == "fault", status
        figures.verify()
    finally:
        problems = finish_bms(bms)
    assert not problems, "the board's health at the end of the test:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------- 12. endurance
def test_12_bounded_endurance(rig_session: RigSession, bms: BmsUnderTest, figures: Figures):
    """Charge and discharge steps and drifting cell voltages for [endurance] duration_s: the
    contactors stay closed, nothing latches, the current the BMS reports follows the rig's,
    and the loop keeps its time."""
    session, rig, monitor = rig_session, rig_session.rig, rig_session.monitor
    endurance = session.config.endurance
    tolerance_a = session.config.tolerances.current_a
    nominal_v = session.config.cell_emulator.nominal_voltage_v
    profile = [-endurance.discharge_current_a, 0.0]
    if rig.supply is not None:
        profile += [endurance.charge_current_a, 0.0]
    settle_s = SETTLE_PERIODS * session.bms_config.loop.period_s + 1.0
    start_s = time.monotonic()
    lines_before = len(bms.process.lines)
    steps: list[tuple[float, float]] = []  # (from, commanded current)
    rss_start_kib = _rss_kib(session, bms)
    step = 0
    while (now_s := time.monotonic()) - start_s < endurance.duration_s:
        current_a = profile[step % len(profile)]
        rig.set_cells(nominal_v + 0.01 * ((step % 5) - 2))
        steps.append((rig.set_pack_current(current_a), current_a))
        step += 1
        time.sleep(min(endurance.step_period_s, max(0.0, start_s + endurance.duration_s - now_s)))
    end_s = time.monotonic()
    rig.set_pack_current(0.0)
    rig.set_cells(nominal_v)

    lines = bms.process.lines[lines_before:]
    figures.measure("endurance_s", end_s - start_s, "s", endurance.duration_s, None)
    figures.measure(
        "status_lines",
        len(lines),
        "lines",
        0.8 * (end_s - start_s) / session.bms_config.loop.status_interval_s,
        None,
    )
    not_closed = [line.record["t_s"] for line in lines if line.record["contactors"] != "closed"]
    figures.measure("status_lines_not_closed", len(not_closed), "lines", 0, 0)
    latched = sorted({f for line in lines for f in line.record["latched"]})
    assert latched == [], f"latched during the run: {latched}"
    opened = [f for f in monitor.frames(FEEDBACK, start_s, end_s) if not main_closed(f.values)]
    figures.measure("feedback_frames_open", len(opened), "frames", 0, 0)
    errors = []
    for line in lines:
        # the commanded current of the step this line reports, once it has settled
        current = [c for t, c in steps if t <= line.t_s - settle_s]
        recent = [t for t, _ in steps if line.t_s - settle_s < t <= line.t_s]
        if current and not recent and line.record["current_a"] is not None:
            errors.append(abs(line.record["current_a"] - current[-1]))
    figures.measure("current_samples", len(errors), "samples", 1, None)
    figures.measure("current_error_max_a", max(errors, default=float("nan")), "A", 0, tolerance_a)
    if errors:
        figures.measure("current_error_mean_a", statistics.fmean(errors), "A")
    worst_cycle_s = max(line.record["cycle_time_max_s"] for line in lines)
    figures.measure("worst_cycle_s", worst_cycle_s, "s", 0, session.bms_config.loop.period_s)
    missed = lines[-1].record["missed_cycles"] - bms.missed_at_start
    figures.measure("missed_cycles", missed, "cycles", 0, session.config.budgets.missed_cycles)
    figures.measure(
        "frames_lost",
        monitor.total_lost() - bms.lost_at_start,
        "frames",
        0,
        session.config.budgets.frames_lost,
    )
    rss_end_kib = _rss_kib(session, bms)
    if rss_start_kib is not None and rss_end_kib is not None:
        figures.measure("bms_rss_growth_kib", rss_end_kib - rss_start_kib, "KiB")
    figures.verify()


def _rss_kib(session: RigSession, bms: BmsUnderTest) -> int | None:
    """The BMS's resident memory (a local board's /proc), for a leak over the run."""
    if not session.board.local or bms.process.pid is None:
        return None
    try:
        with open(f"/proc/{bms.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None
