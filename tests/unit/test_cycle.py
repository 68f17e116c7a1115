"""The cycle with fake backends: stage order, fail-safe on a raising stage, publish isolation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from bms.backends import FrontEndError
from bms.config import load_config
from bms.estimation.cell_params import load_cell_params
from bms.loop import ControlCycle
from bms.types import ALL_OPEN, ContactorState
from tests.fakes import FakeBox, FakeFrontEnd, FakePublisher

PERIOD_S = 0.1


@pytest.fixture
def cycle(make_config):
    config = load_config(make_config({"pack": {"n_cells": 4, "n_temp_sensors": 2}}))
    frontend = FakeFrontEnd(4)
    box = FakeBox(frontend.calls)
    publisher = FakePublisher(frontend.calls)
    return ControlCycle(config, load_cell_params(config.pack.cell_params), frontend, box, publisher)


def run(cycle, cycles, t0_s=0.0):
    status = None
    for n in range(cycles):
        status = cycle.run(t0_s + n * PERIOD_S, PERIOD_S, lagging=False)
    return status


def test_healthy_pack_closes_and_stages_run_in_order(cycle):
    status = run(cycle, 10)
    assert status.contactors is ContactorState.CLOSED
    assert cycle.frontend.calls[:3] == ["read", "command", "publish"]
    assert status.charge_limit_a > 0 and status.discharge_limit_a > 0
    # Every cell started from the OCV of 3.7 V plus the 20 mOhm R0 drop of the 1 A it carries,
    # and stays near it for the second it has run.
    expected = cycle.estimator.cell.soc_at_ocv(3.7 + 0.020 * 1.0)
    assert status.soc == pytest.approx(np.full(4, expected), abs=2e-3)
    assert np.all(status.estimate.soc_std < 0.06)


def test_raising_front_end_becomes_a_fault_and_opens(cycle):
    run(cycle, 10)
    cycle.frontend.error = FrontEndError("bus off")
    status = run(cycle, 12, t0_s=1.0)
    assert "frontend_error" in status.latched_faults
    assert status.contactors in (ContactorState.OPENING, ContactorState.FAULT)
    assert cycle.contactors.relays == ALL_OPEN
    assert status.charge_limit_a == 0.0 and math.isnan(status.measurement.current_a)


def test_failing_publisher_does_not_stop_protection(cycle):
    cycle.publisher.error = OSError("telemetry down")
    status = run(cycle, 10)
    assert status.contactors is ContactorState.CLOSED
    cycle.frontend.voltage_v = 4.4  # beyond the MSL
    status = run(cycle, 12, t0_s=1.0)
    assert "cell_voltage_high_msl" in status.latched_faults
    assert cycle.contactors.relays == ALL_OPEN


def test_lag_is_a_fault_like_any_other(cycle):
    run(cycle, 10)
    status = None
    for n in range(12):
        status = cycle.run(1.0 + n * PERIOD_S, PERIOD_S, lagging=True)
    assert "loop_lag" in status.latched_faults


def test_no_close_request_keeps_contactors_open(cycle):
    cycle.close_requested = False
    assert run(cycle, 10).contactors is ContactorState.OPEN
    assert cycle.contactors.relays == ALL_OPEN


def test_start_up_into_an_active_fault_never_closes(cycle):
    cycle.frontend.voltage_v = 4.4
    for n in range(30):
        status = cycle.run(n * PERIOD_S, PERIOD_S, lagging=False)
        assert not cycle.contactors.relays.any_closed, f"closed at cycle {n}"
    assert "cell_voltage_high_msl" in status.latched_faults


def test_a_fault_that_comes_and_goes_with_invalid_readings_still_opens(cycle):
    run(cycle, 10)
    for n in range(60):
        cycle.frontend.voltage_v = 4.4 if n % 2 else math.nan
        status = cycle.run(1.0 + n * PERIOD_S, PERIOD_S, lagging=False)
    assert {"cell_voltage_high_msl", "cell_voltage_invalid"} <= set(status.latched_faults)
    assert cycle.contactors.relays == ALL_OPEN


def test_a_stalled_loop_opens_at_once(cycle):
    run(cycle, 10)
    status = cycle.run(1.0, PERIOD_S, lagging=False, stalled=True)
    assert "loop_stalled" in status.latched_faults
    assert cycle.contactors.relays == ALL_OPEN


def test_protection_that_raises_opens_for_good(cycle, monkeypatch):
    run(cycle, 10)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(cycle.fsm, "step", broken)
    status = run(cycle, 1, t0_s=1.0)
    assert status.contactors is ContactorState.FAULT
    assert status.latched_faults == ("internal_error",)
    assert cycle.contactors.relays == ALL_OPEN
    monkeypatch.undo()
    assert run(cycle, 5, t0_s=1.1).contactors is ContactorState.FAULT  # until restart


def test_holding_open_survives_a_failing_driver(cycle):
    def failing(t_s):
        raise OSError("bus off")

    cycle.contactors.feedback = failing
    clock = iter(float(n) for n in range(100))
    assert cycle.open_and_wait(lambda: next(clock), timeout_s=3.0) is False
    assert cycle.contactors.relays == ALL_OPEN


def test_repeated_failures_are_logged_once_then_counted(cycle, caplog):
    cycle.frontend.error = FrontEndError("bus off")
    run(cycle, 50)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert cycle.errors.counts["front-end read"] == 50


def test_no_close_without_a_valid_insulation_reading(cycle):
    cycle.frontend.insulation_kohm = math.nan  # the monitor is still measuring
    status = run(cycle, 10)
    assert status.contactors is ContactorState.OPEN
    assert "insulation_invalid" in status.active_faults and status.latched_faults == ()
    cycle.frontend.insulation_kohm = 5000.0
    assert run(cycle, 10, t0_s=1.0).contactors is ContactorState.CLOSED


def test_insulation_breakdown_warns_then_opens(cycle):
    run(cycle, 10)
    cycle.frontend.insulation_kohm = 20.0  # below the warning, above the error threshold
    status = run(cycle, 20, t0_s=1.0)
    assert status.active_faults == ("insulation_warning",)
    assert status.contactors is ContactorState.CLOSED
    cycle.frontend.insulation_kohm = 3.0
    status = run(cycle, 12, t0_s=3.0)
    assert "insulation_error" in status.latched_faults
    assert cycle.contactors.relays == ALL_OPEN


def test_an_open_interlock_loop_opens(cycle):
    run(cycle, 10)
    cycle.contactors.interlock_closed = False
    status = run(cycle, 12, t0_s=1.0)
    assert "interlock_open" in status.latched_faults
    assert cycle.contactors.relays == ALL_OPEN


def test_every_fault_the_state_machine_reports_is_a_table_row():
    import inspect
    import re

    from bms.protection import contactors
    from bms.protection.diagnosis import FAULTS

    source = inspect.getsource(contactors)
    reported = set(re.findall(r'"(contactor_\w+|precharge_\w+)"', source))
    assert reported and reported <= set(FAULTS)


def make_store_cycle(make_config, tmp_path):
    from bms.config import load_config
    from bms.estimation.cell_params import load_cell_params
    from bms.store.latches import LatchStore

    config = load_config(make_config({"pack": {"n_cells": 4, "n_temp_sensors": 2}}))
    store = LatchStore(tmp_path / "latched.json")
    frontend = FakeFrontEnd(4)
    return (
        ControlCycle(
            config,
            load_cell_params(config.pack.cell_params),
            frontend,
            FakeBox(frontend.calls),
            FakePublisher(frontend.calls),
            store,
        ),
        store,
    )


def test_a_latch_goes_to_disk_from_the_cycle_that_latched_it(make_config, tmp_path):
    """Handed to the latch file's own thread in that cycle (the loop does not wait for the
    disk) and written within moments."""
    cycle, store = make_store_cycle(make_config, tmp_path)
    run(cycle, 10)
    cycle.frontend.current_a = -150.0  # short circuit: latches at once
    for n in range(10):
        status = cycle.run(1.0 + n * PERIOD_S, PERIOD_S, lagging=False)
        if status.latched_faults:
            assert cycle.latches.flush(timeout_s=2.0)
            assert "short_circuit" in store.load()
            break
    else:
        raise AssertionError("never latched")


def test_a_failure_of_protection_itself_is_persisted(make_config, tmp_path, monkeypatch):
    cycle, store = make_store_cycle(make_config, tmp_path)
    run(cycle, 10)
    monkeypatch.setattr(cycle.diagnosis, "update", lambda *a: 1 / 0)
    run(cycle, 1, t0_s=1.0)
    assert cycle.latches.flush(timeout_s=2.0)
    assert list(store.load()) == ["internal_error"]


def test_a_latch_that_cannot_be_written_forbids_closing_and_is_retried(
    make_config, tmp_path, monkeypatch
):
    cycle, store = make_store_cycle(make_config, tmp_path)
    run(cycle, 10)
    real_save = store.save

    def failing_save(*args):
        raise OSError("read-only file system")

    monkeypatch.setattr(store, "save", failing_save)
    monkeypatch.setattr(cycle.latches, "RETRY_S", 0.05)
    cycle.frontend.current_a = -150.0
    run(cycle, 5, t0_s=1.0)
    deadline = time.monotonic() + 5.0
    while not cycle.latches.write_failed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status = run(cycle, 1, t0_s=1.5)
    assert "latch_store_write_failed" in status.active_faults
    monkeypatch.setattr(store, "save", real_save)
    assert cycle.latches.flush(timeout_s=2.0)  # the thread retried
    assert "short_circuit" in store.load()
    assert "latch_store_write_failed" not in run(cycle, 12, t0_s=1.6).active_faults


def test_valid_feedback_without_the_interlock_bit_counts_as_open(cycle):
    run(cycle, 10)
    cycle.contactors.interlock_closed = None
    status = run(cycle, 12, t0_s=1.0)
    assert "interlock_open" in status.latched_faults


def test_an_insulation_monitor_that_stays_invalid_opens_after_its_row_delay(cycle):
    cycle.frontend.current_a = 0.0  # at rest, so the fake's flat voltages are not "stuck"
    run(cycle, 10)
    cycle.frontend.insulation_kohm = math.nan
    status = run(cycle, 90, t0_s=1.0)  # 9 s: still closed, no close would be allowed
    assert status.contactors is ContactorState.CLOSED and status.latched_faults == ()
    status = run(cycle, 15, t0_s=10.0)  # past the 10 s delay of config/sim.toml
    assert "insulation_invalid" in status.latched_faults
    assert cycle.contactors.relays == ALL_OPEN


def test_an_estimator_that_raises_publishes_no_stale_estimate(cycle, monkeypatch):
    healthy = run(cycle, 10)
    assert not np.isnan(healthy.soc).any()

    def broken(*args, **kwargs):
        raise FloatingPointError("bug")

    monkeypatch.setattr(cycle.estimator, "step", broken)
    status = run(cycle, 1, t0_s=1.0)
    assert np.isnan(status.soc).all() and np.isnan(status.estimate.soc_std).all()
    assert "internal_error" in status.latched_faults
    assert status.charge_limit_a == 0.0 and status.discharge_limit_a == 0.0


def test_faults_the_front_end_reports_are_table_conditions(cycle, caplog):
    run(cycle, 10)
    cycle.frontend.frontend_faults = ("internal_error",)  # any row the table has
    status = run(cycle, 2, t0_s=1.0)
    assert "internal_error" in status.latched_faults
    assert cycle.contactors.relays == ALL_OPEN


def test_a_front_end_fault_the_table_lacks_is_a_front_end_error(cycle, caplog):
    run(cycle, 10)
    cycle.frontend.frontend_faults = ("flux_capacitor_low",)
    status = run(cycle, 12, t0_s=1.0)
    assert "frontend_error" in status.latched_faults
    assert "flux_capacitor_low" in caplog.text
    assert caplog.text.count("flux_capacitor_low") == 1  # logged once, then counted


def test_a_current_sensor_that_reads_wrong_is_found_against_the_soc(make_config):
    """The cells sit at one voltage while the sensor says 2 A flow out: the EKF keeps
    pulling the SOC back up, by the charge the sensor claims and, while it settles, by the
    drop over the cells' resistance it expects and does not see. So the apparent error is
    near the real 2 A (above it, this early), and far above the 1 A tolerance."""
    config = load_config(
        make_config(
            {
                "pack": {"n_cells": 4, "n_temp_sensors": 2},
                "protection": {"charge_check_window_s": 60.0, "charge_check_tolerance_a": 1.0},
            }
        )
    )
    frontend = FakeFrontEnd(4)
    frontend.current_a = -2.0
    cycle = ControlCycle(
        config, load_cell_params(config.pack.cell_params), frontend, FakeBox(frontend.calls), None
    )
    noise = np.random.default_rng(1)
    statuses = []
    for n in range(400):
        frontend.cell_voltage_v = 3.7 + 0.001 * noise.standard_normal(4)  # alive, not stuck
        statuses.append(cycle.run(n * 1.0, 1.0, lagging=False))
    assert "current_soc_mismatch" in statuses[-1].active_faults
    assert 1.5 < cycle.charge_check.apparent_error_a < 3.0
    assert statuses[-1].contactors is ContactorState.CLOSED  # a warning, not an opening


def test_health_for_the_watchdog_is_protection_and_the_contactor_command(cycle):
    """A failing peripheral is a diagnosis condition, not a reason for systemd to kill and
    restart the service (which would only open the contactors again); a contactor command
    that fails, or protection that failed, is."""
    run(cycle, 10)
    assert cycle.last_cycle_healthy and cycle.sample_complete
    cycle.publisher.error = OSError("telemetry down")
    cycle.frontend.frontend_faults = ("flux_capacitor_low",)  # logged as an error every cycle
    run(cycle, 2, t0_s=1.0)
    assert cycle.last_cycle_healthy
    cycle.contactors.command = lambda relays: 1 / 0
    run(cycle, 1, t0_s=1.2)
    assert not cycle.last_cycle_healthy
    del cycle.contactors.command  # the class's own again
    run(cycle, 1, t0_s=1.3)
    assert cycle.last_cycle_healthy
    cycle.run(1.4, PERIOD_S, lagging=False, stalled=True)
    assert not cycle.last_cycle_healthy


def test_clear_requests_are_decided_by_the_loop_between_cycles(cycle):
    from concurrent.futures import Future

    cycle.frontend.current_a = 0.0  # at rest: the fake's flat voltages are not "stuck"
    run(cycle, 10)
    cycle.frontend.voltage_v = 4.4  # beyond the MSL
    run(cycle, 12, t0_s=1.0)
    assert "cell_voltage_high_msl" in cycle.latches.records
    refused = cycle.clear_latched(["cell_voltage_high_msl", "short_circuit"], "alice")
    assert refused == {
        "ok": False,
        "cleared": [],
        "refused": {
            "cell_voltage_high_msl": "its cause is still present (or was in the last cycles)",
            "short_circuit": "not latched",
        },
    }
    cycle.frontend.voltage_v = 3.7
    run(cycle, 30, t0_s=2.2)  # the counter drains
    reply = Future()
    cycle.requests.put((None, "alice", reply))  # all of them, as the control socket asks
    status = run(cycle, 1, t0_s=5.2)
    assert reply.result(timeout=0) == {
        "ok": True,
        "cleared": ["cell_voltage_high_msl"],
        "refused": {},
    }
    assert status.latched_faults == () or run(cycle, 1, t0_s=5.3).latched_faults == ()
    assert run(cycle, 30, t0_s=5.4).contactors is ContactorState.CLOSED


def test_a_failure_of_protection_itself_cannot_be_cleared_live(cycle, monkeypatch):
    run(cycle, 5)
    monkeypatch.setattr(cycle.diagnosis, "update", lambda *a: 1 / 0)
    run(cycle, 2, t0_s=0.5)
    answer = cycle.clear_latched(["internal_error"], "alice")
    assert answer["refused"] == {
        "internal_error": "protection itself failed in this run: restart the service"
    }


def test_the_health_service_is_fed_and_its_disagreement_is_a_warning(make_config):
    """The cycle offers each sample to the state-of-health service and publishes its newest
    result; an ML and an online capacity that disagree warn (nothing opens)."""
    from types import SimpleNamespace

    class Health:
        def __init__(self):
            self.offers = []
            self.latest = None

        def offer(self, t_s, current_a, cell_voltage_v, cell_temp_c, soc, soc_std):
            self.offers.append((t_s, current_a, cell_voltage_v.size, soc.size))

    config = load_config(make_config({"pack": {"n_cells": 4, "n_temp_sensors": 2}}))
    frontend, health = FakeFrontEnd(4), Health()
    cycle = ControlCycle(
        config,
        load_cell_params(config.pack.cell_params),
        frontend,
        FakeBox(frontend.calls),
        None,
        health=health,
    )
    run(cycle, 10)
    assert health.offers[-1] == (0.9, -1.0, 4, 4)
    health.latest = SimpleNamespace(
        disagree=np.array([False, True, False, False]),
        soh=np.array([0.95, 0.9, 0.97, np.nan]),
        resistance_growth=np.array([1.1, 1.3, 1.0, np.nan]),
    )
    status = run(cycle, 2, t0_s=1.0)
    assert "soh_disagreement" in status.active_faults
    assert status.contactors is ContactorState.CLOSED
    assert status.health is health.latest


class BalancingFrontEnd(FakeFrontEnd):
    supports_balancing = True

    def __init__(self, n_cells: int):
        super().__init__(n_cells)
        self.commands: list[np.ndarray] = []

    def balance(self, cells):
        self.commands.append(cells.copy())


def test_the_estimator_is_told_what_the_cells_it_had_bled_drew(make_config, monkeypatch):
    """The bleed of the cells commanded in one cycle flows until the next, inside the pack:
    the estimator gets it with that next cycle's sample, V / bleed_resistance_ohm per cell."""
    config = load_config(
        make_config(
            {
                "pack": {"n_cells": 4, "n_temp_sensors": 2},
                "balancing": {"bleed_resistance_ohm": 40.0, "max_duty": 1.0},
            }
        )
    )
    frontend = BalancingFrontEnd(4)
    frontend.current_a = 0.0  # at rest, so balancing may run
    frontend.cell_voltage_v = np.array([3.90, 3.90, 4.00, 3.90])  # cell 2 well above
    cycle = ControlCycle(
        config, load_cell_params(config.pack.cell_params), frontend, FakeBox(frontend.calls), None
    )
    given = []
    step = cycle.estimator.step
    monkeypatch.setattr(cycle.estimator, "step", lambda *args: given.append(args[4]) or step(*args))
    run(cycle, 20)
    assert given[0] is None  # nothing bled before the first command
    bled = [k for k, cells in enumerate(frontend.commands[:-1]) if cells.any()]
    assert bled, "the test needs a cycle that bled"
    for k in bled:
        expected = np.where(frontend.commands[k], frontend.cell_voltage_v, 0.0) / 40.0
        assert given[k + 1] == pytest.approx(expected)
    assert frontend.commands[bled[0]].tolist() == [False, False, True, False]
