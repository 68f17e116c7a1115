"""The virtual rig's wiring: the plant's hooks (drivers/sim), the instruments in the place of
the cells and sensors as the rig config wires them, and the rig's CAN monitor; over
python-can's in-process virtual bus."""

from __future__ import annotations

import math
import time
import tomllib
import uuid
from pathlib import Path

import can
import numpy as np
import pytest
import tomli_w

from bms.comms.dbc import DbcCodec
from bms.config import load_config
from bms.types import ALL_OPEN, RelayStates
from drivers.can.contactors import relay_signals
from drivers.can.frontend import CanFrontEnd
from drivers.can.link import FrameEncoder
from drivers.sim.node import SimulatedPack
from hil.board import derive_virtual_board_config
from hil.canbus import BusMonitor, all_open
from hil.config import load_rig_config
from hil.ntc import Ntc
from hil.virtual.rig import VirtualRig

REPO = Path(__file__).resolve().parent.parent.parent
SIM_CONFIG = REPO / "config" / "sim.toml"
VIRTUAL_RIG = REPO / "hil" / "rigs" / "virtual.toml"
CLOSED = RelayStates(negative=True, precharge=False, positive=True)


@pytest.fixture
def board(tmp_path):
    """The sim pack's config on a virtual bus of the test's own."""
    channel = f"hil-test-{uuid.uuid4().hex[:8]}"
    return load_config(derive_virtual_board_config(SIM_CONFIG, tmp_path, "virtual", channel, 0.5))


@pytest.fixture
def virtual(board, tmp_path):
    """The virtual rig with its cell channels wired in reverse (cell 1 on channel 16), so a
    mapping that ignored the rig config would show."""
    data = tomllib.loads(VIRTUAL_RIG.read_text())
    data["board"]["config"] = str(SIM_CONFIG)
    data["cell_emulator"]["channels"] = list(range(16, 0, -1))
    path = tmp_path / "rig.toml"
    path.write_text(tomli_w.dumps(data))
    rig = VirtualRig(load_rig_config(path), board)
    yield rig
    rig.pack.stop()


def test_the_cell_emulator_channels_are_the_cells(virtual):
    cells = virtual.cells
    cells.handle_line("VOLT 3.6,(@1:16);VOLT 4.1,(@16);OUTP ON,(@1:16);CURR 50,(@1:16)")
    virtual.relays.handle_line("ROUT:CLOS (@3)")  # cell 3's sense wire: open at *RST
    virtual._connect(0.0)
    emulated = virtual.pack.plant.external.cell_voltage_v
    assert emulated[0] == 4.1 and (emulated[1:] == 3.6).all()  # cell 1 is channel 16
    readings = virtual.pack.plant.readings()
    assert readings.cell_voltage_v == pytest.approx(emulated, abs=0.006)  # offset and noise
    assert readings.pack_voltage_v == pytest.approx(emulated.sum(), abs=0.05)


def test_emulated_cells_hold_their_voltage_under_current_until_the_limit(virtual):
    plant = virtual.pack.plant
    virtual.cells.handle_line("VOLT 3.7,(@1:16);OUTP ON,(@1:16);CURR 20,(@1:16)")
    virtual.load.handle_line("CURR 15;INP ON")
    virtual._connect(0.0)
    plant.step(0.1, virtual._pack_current_a, CLOSED)
    assert plant.current_a == -15.0
    assert plant.terminal_voltage_v(plant.current_a) == pytest.approx(np.full(16, 3.7))
    virtual._connect(0.1)
    assert virtual.load.measured_current_a == 15.0
    assert virtual.cells.handle_line("MEAS:CURR? (@1)") == "+1.500000E+01"
    virtual.load.handle_line("CURR 40")  # twice the channels' 20 A limit: they fold back
    virtual._connect(0.2)
    plant.step(0.1, virtual._pack_current_a, CLOSED)
    virtual._connect(0.3)
    assert plant.external.cell_voltage_v == pytest.approx(np.full(16, 3.7 * 20 / 40))


def test_sensor_temperatures_through_the_boards_ntc_and_the_relay_box(virtual):
    ntc = Ntc(10000.0, 3435.0)
    virtual._connect(0.0)  # at *RST the emulator is at 10 Mohm: every sensor reads open
    assert np.isnan(virtual.pack.plant.external.sensor_temp_c).all()
    virtual.thermistors.handle_line(f"RES {ntc.resistance_ohm(40.0):.7g},(@1:16)")
    virtual.relays.handle_line("ROUT:CLOS (@18)")  # the relay across sensor 2
    virtual._connect(0.1)
    temps = virtual.pack.plant.external.sensor_temp_c
    assert math.isnan(temps[1])
    assert temps[[0, *range(2, 16)]] == pytest.approx(40.0, abs=1e-3)
    readings = virtual.pack.plant.readings()
    assert readings.cell_temp_invalid.tolist() == [i == 1 for i in range(16)]
    assert readings.cell_temp_c[1] == 0.0


def test_an_open_sense_wire_relay_is_an_open_wire(virtual):
    virtual._connect(0.0)
    assert virtual.pack.plant.faults.open_wire == {2}  # relays open at *RST: cell 3's too
    virtual.relays.handle_line("ROUT:CLOS (@3)")
    virtual._connect(0.1)
    assert virtual.pack.plant.faults.open_wire == set()
    readings = virtual.pack.plant.readings()
    assert not readings.cell_voltage_invalid.any()


def test_the_load_empties_the_dc_link_once_the_contactors_are_open(virtual):
    plant = virtual.pack.plant
    plant.link_voltage_v = 60.0
    virtual.load.handle_line("CURR 1;INP ON")
    for tick in range(10):
        virtual._connect(0.1 * tick)
        plant.step(0.1, virtual._pack_current_a, ALL_OPEN)
    # 1 A out of 4 mF: 25 V per 0.1 s; empty after three ticks, never below zero
    assert plant.link_voltage_v == 0.0
    virtual._connect(1.0)
    assert virtual.load.measured_current_a == 0.0  # a CC load drops out with nothing left


def test_the_dc_link_bleeds_only_through_its_resistor_without_a_load(board):
    plant = SimulatedPack(board, board.sim.options, []).plant
    plant.link_voltage_v = 60.0
    plant.step(1.0, -5.0, ALL_OPEN)  # a load profile never reaches an open link
    assert plant.link_voltage_v == pytest.approx(60.0 * math.exp(-1.0 / (10000.0 * 0.004)))


def test_the_supply_charges_through_closed_contactors(virtual):
    virtual.cells.handle_line("VOLT 3.7,(@1:16);OUTP ON,(@1:16);CURR 50,(@1:16)")
    virtual.supply.handle_line("VOLT 75;CURR 5;OUTP ON")
    virtual._connect(0.0)
    assert virtual._pack_current_a == 5.0
    virtual.supply.handle_line("VOLT 50")  # below the pack's 59.2 V: it cannot push
    virtual._connect(0.1)
    assert virtual._pack_current_a == 0.0


def test_a_hook_runs_at_the_start_of_every_tick(board):
    pack = SimulatedPack(board, board.sim.options, [])
    seen = []
    pack.before_tick = lambda t_s: seen.append((t_s, pack.plant.relays))
    pack.attach()
    bms_side = can.Bus(interface="virtual", channel=board.can.channel)
    codec = DbcCodec(board.can.dbc_file)
    try:
        message = codec.message("BMS_ContactorCommand")
        data = codec.encode(message, relay_signals(CLOSED, 1))
        bms_side.send(can.Message(arbitration_id=message.frame_id, data=data, is_extended_id=False))
        pack.tick(1.0, 0.1)
        pack.tick(1.1, 0.1)
        assert seen == [(1.0, ALL_OPEN), (1.1, CLOSED)]  # before the command is obeyed
    finally:
        bms_side.shutdown()
        pack.stop()


def test_the_front_end_reads_an_invalid_sensor_as_not_available(board, virtual):
    ntc = Ntc(10000.0, 3435.0)
    virtual.thermistors.handle_line(f"RES {ntc.resistance_ohm(30.0):.7g},(@1:16)")
    virtual.relays.handle_line("ROUT:CLOS (@18)")
    virtual.pack.attach()
    frontend = CanFrontEnd(board, board.frontend.options)
    try:
        virtual.pack.tick(0.1, 0.1)
        measured = frontend.read(time.monotonic()).cell_temp_c
        assert math.isnan(measured[1])
        assert measured[[0, *range(2, 16)]] == pytest.approx(30.0, abs=1.0)
    finally:
        frontend.close()


# ---------------------------------------------------------------- the rig's CAN monitor
def test_the_monitor_counts_lost_frames_and_finds_what_it_waits_for(board):
    codec = DbcCodec(board.can.dbc_file)
    encoder = FrameEncoder(codec)
    feedback = codec.message("PDU_ContactorFeedback")
    monitor = BusMonitor({"interface": "virtual", "channel": board.can.channel}, board.can.dbc_file)
    sender = can.Bus(interface="virtual", channel=board.can.channel)

    def send(relays: RelayStates, counter: int) -> None:
        values = {**relay_signals(relays, counter), "InterlockClosed": 1}
        data = encoder.encode(feedback, values)
        sender.send(can.Message(arbitration_id=feedback.frame_id, data=data, is_extended_id=False))

    try:
        start_s = time.monotonic()
        for counter in (14, 15, 0, 0, 3):  # 0 repeats (no loss); 1 and 2 are missing
            send(CLOSED, counter)
        opened_s = time.monotonic()
        send(ALL_OPEN, 4)
        frame = monitor.wait_for("PDU_ContactorFeedback", all_open, start_s, 2.0)
        assert frame is not None and frame.t_s >= opened_s - 0.05
        assert frame.values["Counter"] == 4
        assert monitor.lost == {"PDU_ContactorFeedback": 2}
        assert len(monitor.frames("PDU_ContactorFeedback", start_s)) == 6
        assert monitor.wait_for("PDU_ContactorFeedback", all_open, frame.t_s, 0.2) is None
        monitor.restart_counters()  # a sender that starts again begins anywhere
        send(ALL_OPEN, 9)
        assert monitor.wait_for("PDU_ContactorFeedback", lambda v: v["Counter"] == 9, 0, 2.0)
        assert monitor.total_lost() == 2
    finally:
        sender.shutdown()
        monitor.close()
