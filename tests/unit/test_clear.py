"""Clearing latched faults live: never while the cause is present, after a restart too;
reloads that change a check under a running loop."""

from __future__ import annotations

import json
from concurrent.futures import Future

import numpy as np

from bms.store.latches import LatchRecord, LatchStore
from bms.types import ContactorFeedback, ContactorState, RelayStates
from tests.cycles import PERIOD_S, make_cycle, run


def latch_file_with(tmp_path, *fault_ids):
    LatchStore(tmp_path / "latched.json").save(
        {
            f: LatchRecord(
                fault_id=f,
                latched_at_utc="2026-12-01T00:00:00+00:00",
                description="from the last run",
            )
            for f in fault_ids
        }
    )


def clear_through_the_queue(cycle, fault_ids, t_s):
    """As the control socket does it: a request queued, answered at the start of a cycle."""
    reply = Future()
    cycle.requests.put((fault_ids, "alice", reply))
    cycle.run(t_s, PERIOD_S, lagging=False)
    return reply.result(timeout=0)


def test_link_voltage_held_is_not_cleared_while_the_link_is_still_held(tmp_path):
    """link_voltage_held: the link stayed up after an opening (a weld the feedback hides, or a
    source on the link). The feedback shows every relay open by definition, so only the link
    voltage says whether the cause is gone: while it stays up, no clear."""
    cycle = make_cycle(tmp_path, {"control": {"link_decay_s": 1.0}})
    assert run(cycle, 10).contactors is ContactorState.CLOSED
    cycle.close_requested = False  # open; the link (= pack voltage) never decays
    status = run(cycle, 30, t0_s=1.0)
    assert "link_voltage_held" in status.latched_faults
    pack_v = status.measurement.pack_voltage_v
    assert status.measurement.link_voltage_v > 0.5 * pack_v  # the cause is present now
    answer = clear_through_the_queue(cycle, ["link_voltage_held"], 4.0)
    assert answer["cleared"] == [], answer


def test_a_restored_latch_is_not_cleared_in_the_first_cycle_while_its_cause_is_present(tmp_path):
    """A latch restored at start holds its row's counter full: a clear in the first cycle,
    before this run has judged anything, is refused while the cause is there."""
    latch_file_with(tmp_path, "cell_voltage_high_msl")
    cycle = make_cycle(tmp_path)
    cycle.frontend.voltage_v = 4.4  # beyond the MSL: the cause is present
    answer = clear_through_the_queue(cycle, ["cell_voltage_high_msl"], 0.0)
    assert answer["cleared"] == [], answer


def test_a_restored_latch_whose_cause_cannot_be_judged_is_not_cleared(tmp_path):
    """Cell voltages NaN (open sense wire): cell_voltage_high_* are unknown and hold their
    counter; a restored latch must then stay, since nobody can see that the over-voltage is
    gone."""
    latch_file_with(tmp_path, "cell_voltage_high_msl")
    cycle = make_cycle(tmp_path)
    cycle.frontend.cell_voltage_v = np.full(4, np.nan)
    run(cycle, 20)
    answer = clear_through_the_queue(cycle, ["cell_voltage_high_msl"], 2.0)
    assert answer["cleared"] == [], answer


def test_a_restored_weld_is_not_cleared_while_the_feedback_shows_a_closed_relay(tmp_path):
    latch_file_with(tmp_path, "contactor_weld")
    cycle = make_cycle(tmp_path)
    cycle.contactors.relays = RelayStates(positive=True)  # welded: feedback shows it closed
    answer = clear_through_the_queue(cycle, ["contactor_weld"], 0.0)
    assert answer["cleared"] == [], answer


def test_a_restored_open_unconfirmed_is_not_cleared_while_the_feedback_is_invalid(tmp_path):
    """contactor_open_unconfirmed, restored from the last run, is cleared only once the
    feedback is valid and shows every relay open, as in the run that found it."""
    latch_file_with(tmp_path, "contactor_open_unconfirmed")
    cycle = make_cycle(tmp_path)
    cycle.contactors.feedback = lambda t_s: ContactorFeedback(RelayStates(), valid=False)
    run(cycle, 10)
    answer = clear_through_the_queue(cycle, ["contactor_open_unconfirmed"], 1.0)
    assert answer["cleared"] == [], answer


def test_a_clear_whose_latch_file_write_failed_is_retried(tmp_path, monkeypatch):
    """A clear whose write fails (disk full) is written again by the latch file's thread, and
    the no-close it caused meanwhile goes away."""
    cycle = make_cycle(tmp_path, {"protection": {"stuck_min_current_a": 1000.0}})
    monkeypatch.setattr(cycle.latches, "RETRY_S", 0.05)
    run(cycle, 10)
    cycle.frontend.current_a = -150.0  # short circuit: latches at once
    run(cycle, 3, t0_s=1.0)
    cycle.frontend.current_a = -1.0
    status = run(cycle, 20, t0_s=1.3)
    assert "short_circuit" in status.latched_faults
    assert cycle.latches.flush(timeout_s=2.0)
    real_save = LatchStore.save
    calls = {"n": 0}

    def failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(LatchStore, "save", failing_once)
    answer = clear_through_the_queue(cycle, ["short_circuit"], 3.3)
    assert answer["cleared"] == ["short_circuit"]
    assert cycle.latches.flush(timeout_s=2.0)
    assert calls["n"] == 2  # failed once, then written
    on_disk = json.loads((tmp_path / "latched.json").read_text())
    assert [r["fault_id"] for r in on_disk["latched"]] == []
    assert [r["fault_id"] for r in on_disk["cleared"]] == ["short_circuit"]
    status = run(cycle, 5, t0_s=3.4)
    assert "latch_store_write_failed" not in status.active_faults


def test_a_reload_that_turns_link_decay_off_does_not_break_protection(tmp_path):
    """A reload (SIGHUP) that removes link_decay_s while the state machine watches a decay
    stops the watch; protection runs on (no internal_error from a valid config change)."""
    from bms.config import load_config
    from tests.cycles import write_config

    cycle = make_cycle(tmp_path, {"control": {"link_decay_s": 5.0}})
    assert run(cycle, 10).contactors is ContactorState.CLOSED
    cycle.close_requested = False
    run(cycle, 5, t0_s=1.0)  # opened: the decay watch runs
    new = load_config(write_config(tmp_path, {"control": {"link_decay_s": None}}, "new.toml"))
    # the reload would refuse a changed [store]/[service]/[can]: keep those as they were
    import dataclasses

    new = dataclasses.replace(
        new, store=cycle.config.store, service=cycle.config.service, can=cycle.config.can
    )
    restart = cycle.reconfigure(new)
    assert restart == [], restart
    status = run(cycle, 5, t0_s=1.5)
    assert not cycle.protection_failed, status.latched_faults
    assert "internal_error" not in status.latched_faults


def test_a_reload_does_not_accept_a_latch_file_it_does_not_use(tmp_path):
    """The latch file cannot change under a running loop (its keeper holds the old one): a
    reload that changes it is refused as needing a restart."""
    from bms.config import load_config
    from tests.cycles import write_config

    cycle = make_cycle(tmp_path)
    other = tmp_path / "moved" / "latched.json"
    new = load_config(write_config(tmp_path, {"protection": {"latch_file": str(other)}}, "n.toml"))
    import dataclasses

    new = dataclasses.replace(
        new, store=cycle.config.store, service=cycle.config.service, can=cycle.config.can
    )
    restart = cycle.reconfigure(new)
    assert restart != [], "a latch_file change was accepted but is not used"


def test_after_clearing_a_held_link_the_next_close_does_not_skip_every_check(tmp_path):
    """After link_voltage_held the contactors must not close onto whatever holds the link up
    (the row names a welded contact as one cause): no clear while it is held, so no close."""
    cycle = make_cycle(tmp_path, {"control": {"link_decay_s": 1.0}})
    run(cycle, 10)
    cycle.close_requested = False
    run(cycle, 30, t0_s=1.0)
    clear_through_the_queue(cycle, ["link_voltage_held"], 4.0)
    cycle.close_requested = True
    states = [run(cycle, 1, t0_s=4.1 + n * PERIOD_S).contactors for n in range(20)]
    assert ContactorState.CLOSED not in states, states
