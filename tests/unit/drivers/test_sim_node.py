"""The simulated pack as CAN nodes: dead-man, commands, silence; injections and load profiles."""

from __future__ import annotations

import re

import can
import numpy as np
import pytest

from bms.backends import InjectionError
from bms.comms.dbc import DbcCodec
from bms.config import load_config
from bms.types import RelayStates
from drivers.can.contactors import relay_signals
from drivers.can.frontend import CanFrontEnd
from drivers.sim import load
from drivers.sim.faults import parse_injection
from drivers.sim.node import SimulatedPack
from tests.unit.drivers.test_can_backends import crc8_sae_j1850


@pytest.fixture
def setup(make_config):
    config = load_config(make_config({"sim": {"load": {"profile": "constant", "current_a": -5.0}}}))
    sim = SimulatedPack(config, config.sim.options, [])
    sim.attach()
    bms_side = can.Bus(interface="virtual", channel=config.can.channel)
    yield sim, bms_side, DbcCodec(config.can.dbc_file)
    bms_side.shutdown()
    sim.stop()


def drain(bus) -> dict[int, list[bytes]]:
    frames: dict[int, list[bytes]] = {}
    while (frame := bus.recv(timeout=0.05)) is not None:
        frames.setdefault(frame.arbitration_id, []).append(bytes(frame.data))
    return frames


def command(bus, codec, relays):
    message = codec.message("BMS_ContactorCommand")
    bus.send(
        can.Message(
            arbitration_id=message.frame_id,
            data=codec.encode(message, relay_signals(relays, 1)),
            is_extended_id=False,
        )
    )


def test_relays_follow_commands_and_the_dead_man_opens_them(setup):
    sim, bms_side, codec = setup
    closed = RelayStates(True, False, True)
    command(bms_side, codec, closed)
    sim.tick(1.0, 0.1)
    assert sim.plant.relays == closed
    assert sim.plant.current_a == pytest.approx(-5.0)
    sim.tick(1.0 + sim.options.deadman_timeout_s - 0.05, 0.1)
    assert sim.plant.relays == closed
    sim.tick(1.0 + sim.options.deadman_timeout_s + 0.05, 0.1)  # commands stopped
    assert not sim.plant.relays.any_closed
    assert sim.plant.current_a == 0.0


def test_every_tick_sends_measurements_and_feedback_until_silenced(setup):
    sim, bms_side, codec = setup
    sim.tick(0.1, 0.1)
    frames = drain(bms_side)
    ids = {
        name: codec.message(name).frame_id
        for name in (
            "CMU_CellVoltages",
            "CMU_CellTemperatures",
            "CMU_PackMeasurements",
            "PDU_ContactorFeedback",
        )
    }
    assert len(frames[ids["CMU_CellVoltages"]]) == 6  # 16 cells, 3 per group
    assert len(frames[ids["CMU_CellTemperatures"]]) == 4  # 16 sensors, 5 per group
    assert len(frames[ids["CMU_PackMeasurements"]]) == 1
    sim.inject(parse_injection("silence@0", 16))
    sim.tick(0.2, 0.1)
    # the contactor box and the insulation monitor are other devices: they keep talking
    assert set(drain(bms_side)) == {
        ids["PDU_ContactorFeedback"],
        codec.message("IMD_Info").frame_id,
    }


def test_stuck_injection_freezes_the_reading_at_its_value(setup):
    sim, _, _ = setup
    sim.inject(parse_injection("stuck@0:cell=2", 16))
    frozen = sim.plant.faults.stuck[1]
    assert 3.0 < frozen < 4.3
    assert sim.plant.readings().cell_voltage_v[1] == frozen


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("melt@3", "unknown fault kind 'melt'"),
        ("open_wire@3", "needs a cell"),
        ("open_wire@3:cell=0", "cell 0 is not in the pack (1..16)"),
        ("short@3:cell=2", "takes no cell"),
        ("short3", "expected KIND@T_S[:cell=N]"),
        ("short@-1", "expected KIND@T_S[:cell=N]"),
    ],
)
def test_bad_injections_are_refused_with_the_reason(text, message):
    with pytest.raises(InjectionError, match=re.escape(message)):
        parse_injection(text, 16)


def test_injection_cells_count_from_one():
    injection = parse_injection("open_wire@12.5:cell=16", 16)
    assert (injection.kind, injection.at_s, injection.cell) == ("open_wire", 12.5, 15)


def test_load_profiles():
    assert load.constant(-3.0)(123.0) == -3.0
    pulse = load.pulse(-10.0, period_s=10.0, duty=0.3)
    assert [pulse(t) for t in (0.0, 2.9, 3.1, 9.9, 10.5)] == [-10.0, -10.0, 0.0, 0.0, -10.0]


def test_drive_cycle_is_interpolated_scaled_and_repeated(tmp_path):
    path = tmp_path / "cycle.csv"
    path.write_text("# a comment\ntime_s,current_a\n0,0\n10,-10\n20,0\n")
    cycle = load.drive_cycle(path, scale=2.0)
    assert cycle(5.0) == pytest.approx(-10.0)
    assert cycle(10.0) == pytest.approx(-20.0)
    assert cycle(25.0) == pytest.approx(-10.0)  # repeats after 20 s


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time_s,amps\n0,1\n1,2\n", "lacks column 'current_a'"),
        ("time_s,current_a\n0,1\n", "at least two rows"),
        ("time_s,current_a\n0,1\n0,2\n", "rising time_s"),
        ("time_s,current_a\n0,x\n1,2\n", "cannot read drive cycle"),
    ],
)
def test_broken_drive_cycle_files_are_named(tmp_path, text, message):
    path = tmp_path / "cycle.csv"
    path.write_text(text)
    with pytest.raises(load.LoadProfileError, match=message):
        load.drive_cycle(path, 1.0)


def test_a_command_frame_repeated_with_the_same_counter_is_no_refresh(setup):
    sim, bms_side, codec = setup
    closed = RelayStates(True, False, True)
    command(bms_side, codec, closed)  # counter 1
    sim.tick(1.0, 0.1)
    assert sim.plant.relays == closed
    command(bms_side, codec, closed)  # counter 1 again: a frozen BMS resending its last frame
    sim.tick(1.0 + sim.options.deadman_timeout_s + 0.05, 0.1)
    assert not sim.plant.relays.any_closed


def test_a_short_during_precharge_keeps_the_link_down(setup):
    sim, _, _ = setup
    sim.inject(parse_injection("short@0", 16))
    for _ in range(30):
        sim.plant.step(0.1, 0.0, RelayStates(True, True, False))
    assert sim.plant.link_voltage_v < 1.0
    assert sim.plant.current_a < -1.0  # the pack feeds the short through the resistor


def test_the_front_end_bleeds_commanded_cells_until_the_commands_stop(setup):
    sim, bms_side, codec = setup
    message = codec.message("BMS_BalancingCommand")
    values = {signal.name: 0 for signal in message.signals}
    values.update({"Balance3": 1, "Counter": 1})
    bms_side.send(
        can.Message(
            arbitration_id=message.frame_id,
            data=codec.encode(message, values),
            is_extended_id=False,
        )
    )
    sim.tick(1.0, 0.1)
    assert np.flatnonzero(sim.plant.bleeding).tolist() == [2]
    sim.tick(1.0 + sim.options.balancing_timeout_s + 0.05, 0.1)
    assert not sim.plant.bleeding.any()


def test_cmu_frames_carry_the_dbc_checksum_and_a_counter_per_group(setup):
    sim, bms_side, codec = setup
    cmu = [codec.message(name) for name in ("CMU_CellVoltages", "CMU_PackMeasurements")]
    counters: dict[tuple[int, int], list[int]] = {}
    for tick in range(3):
        sim.tick(0.1 * (tick + 1), 0.1)
        frames = drain(bms_side)
        for message in cmu:
            for data in frames[message.frame_id]:
                # byte 0 is the CRC-8 SAE J1850 of the id's two low bytes and bytes 1..7
                id_bytes = bytes([message.frame_id & 0xFF, message.frame_id >> 8])
                assert data[0] == crc8_sae_j1850(id_bytes + data[1:])
                values = codec.decode(message, data)
                group = int(values.get("CellVoltageGroup", -1))
                counters.setdefault((message.frame_id, group), []).append(int(values["Counter"]))
    assert len(counters) == 6 + 1  # six voltage groups, one pack message
    for seen in counters.values():
        assert [(seen[1] - seen[0]) % 16, (seen[2] - seen[1]) % 16] == [1, 1]


def test_the_front_end_reads_what_the_simulated_cmu_sends(make_config):
    config = load_config(make_config({"sim": {"load": {"profile": "constant", "current_a": -5.0}}}))
    sim = SimulatedPack(config, config.sim.options, [])
    sim.attach()
    frontend = CanFrontEnd(config, config.frontend.options)
    sent = []
    plant_readings = sim.plant.readings
    sim.plant.readings = lambda: sent.append(plant_readings()) or sent[-1]  # what goes out
    try:
        sim.tick(0.1, 0.1)
        (readings,) = sent
        m = frontend.read(1.0)
        assert m.cell_voltage_v == pytest.approx(readings.cell_voltage_v, abs=0.001)
        assert m.cell_temp_c == pytest.approx(np.round(readings.cell_temp_c))
        assert m.current_a == pytest.approx(readings.current_a, abs=0.006)
        assert m.pack_voltage_v == pytest.approx(readings.pack_voltage_v, abs=0.006)
        assert m.frame_errors == 0 and m.stale_groups == ()
    finally:
        frontend.close()
        sim.stop()
