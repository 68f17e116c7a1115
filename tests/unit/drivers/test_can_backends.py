"""CAN backends on a python-can virtual bus, with a test peer encoding frames from the DBC.

The peer fills in each frame's checksum itself, from the definition in the DBC's comment (CRC-8
SAE J1850 over the frame id's two low bytes and the data bytes after the checksum byte 0), with
a bit-by-bit CRC written from the algorithm's parameters, not with the code under test.
"""

from __future__ import annotations

import math

import can
import numpy as np
import pytest

from bms.comms.dbc import DbcCodec, DbcError
from bms.config import load_config
from bms.types import ContactorState, Measurement, PackStatus, RelayStates
from drivers.can.contactors import CanContactors
from drivers.can.frontend import CanFrontEnd
from drivers.can.link import CanLink
from drivers.can.publisher import CanPublisher
from tests.fakes import estimate_of

CELLS_PER_GROUP = 3  # CMU_CellVoltages: group g carries cells 3g+1..3g+3
SENSORS_PER_GROUP = 5  # CMU_CellTemperatures: group g carries sensors 5g+1..5g+5


def crc8_sae_j1850(data: bytes) -> int:
    """Polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x1D), initial value 0xFF, final XOR 0xFF,
    most significant bit first."""
    crc = 0xFF
    for byte in data:
        for bit in range(7, -1, -1):
            top = ((crc >> 7) ^ (byte >> bit)) & 1
            crc = (crc << 1) & 0xFF
            if top:
                crc ^= 0x1D
    return crc ^ 0xFF


def with_crc(frame_id: int, data: bytes) -> bytes:
    """``data`` with byte 0 (the Crc signal of the CMU messages) set as the DBC defines it."""
    crc = crc8_sae_j1850(bytes([frame_id & 0xFF, frame_id >> 8]) + data[1:])
    return bytes([crc]) + data[1:]


class Peer:
    """The far end of the bus: a CMU (or IMD, PDU) encoding frames from the DBC, with a rolling
    counter per message and multiplexer group advancing by one per frame, unless given."""

    def __init__(self, bus, codec):
        self.bus = bus
        self.codec = codec
        self.counters: dict[tuple[str, int | None], int] = {}
        self.mux = {
            "CMU_CellVoltages": "CellVoltageGroup",
            "CMU_CellTemperatures": "TemperatureGroup",
        }

    def frame(self, name: str, values: dict, counter: int | None = None) -> bytes:
        message = self.codec.message(name)
        values = dict(values)
        signals = {signal.name for signal in message.signals}
        if "Counter" in signals and "Counter" not in values:
            key = (name, values.get(self.mux.get(name)))
            values["Counter"] = (
                counter if counter is not None else (self.counters.get(key, -1) + 1) % 16
            )
            self.counters[key] = values["Counter"]
        if "Crc" in signals:
            values["Crc"] = 0
            return with_crc(message.frame_id, self.codec.encode(message, values))
        return self.codec.encode(message, values)

    def send(self, name: str, values: dict, counter: int | None = None) -> None:
        self.send_raw(name, self.frame(name, values, counter))

    def send_raw(self, name: str, data: bytes) -> None:
        frame_id = self.codec.message(name).frame_id
        self.bus.send(can.Message(arbitration_id=frame_id, data=data, is_extended_id=False))


@pytest.fixture
def config(make_config):
    return load_config(make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}}))


@pytest.fixture
def bus(config):
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    yield bus
    bus.shutdown()


@pytest.fixture
def codec(config):
    return DbcCodec(config.can.dbc_file)


@pytest.fixture
def peer(bus, codec):
    return Peer(bus, codec)


@pytest.fixture
def frontend(config):
    backend = CanFrontEnd(config, config.frontend.options)
    yield backend
    backend.close()


def cell_group(group, volts, invalid=(0, 0, 0)):
    values = {"CellVoltageGroup": group}
    for k in range(CELLS_PER_GROUP):
        values[f"Cell{CELLS_PER_GROUP * group + k + 1}_Voltage"] = volts[k]
        values[f"Cell{CELLS_PER_GROUP * group + k + 1}_VoltageInvalid"] = invalid[k]
    return values


def temp_group(group, temps):
    values = {"TemperatureGroup": group}
    for k in range(SENSORS_PER_GROUP):
        values[f"Temp{SENSORS_PER_GROUP * group + k + 1}"] = temps[k]
        values[f"Temp{SENSORS_PER_GROUP * group + k + 1}_Invalid"] = 0
    return values


PACK = {"PackCurrent": -12.5, "PackVoltage": 18.01, "LinkVoltage": 17.5}


def send_all(peer, current_a=-12.5):
    peer.send("CMU_CellVoltages", cell_group(0, [3.6, 3.601, 3.602]))
    peer.send("CMU_CellVoltages", cell_group(1, [3.603, 3.604, 0]))
    peer.send("CMU_CellTemperatures", temp_group(0, [20, 21, 22, 23, 24]))
    peer.send("CMU_CellTemperatures", temp_group(1, [25, -5, 0, 0, 0]))
    peer.send("CMU_PackMeasurements", {**PACK, "PackCurrent": current_a})
    peer.send("IMD_Info", {"InsulationResistance": 1234, "MeasurementValid": 1})


def test_crc_matches_the_catalogue_check_value():
    # CRC-8/SAE-J1850 in the catalogue of parametrised CRC algorithms: check = 0x4B
    assert crc8_sae_j1850(b"123456789") == 0x4B


def test_frontend_decodes_every_signal_in_units(frontend, peer):
    send_all(peer)
    m = frontend.read(10.0)
    assert m.cell_voltage_v == pytest.approx([3.6, 3.601, 3.602, 3.603, 3.604])
    assert m.cell_temp_c.tolist() == [20, 21, 22, 23, 24, 25, -5]
    assert m.current_a == pytest.approx(-12.5)
    assert (m.pack_voltage_v, m.link_voltage_v) == pytest.approx((18.01, 17.5))
    assert m.insulation_kohm == 1234
    assert m.stale_groups == () and m.frame_errors == 0 and m.frontend_faults == ()


def test_invalid_flag_and_not_available_code_read_as_nan(frontend, peer):
    send_all(peer, current_a=math.nan)
    peer.send("CMU_CellVoltages", cell_group(0, [3.6, math.nan, 3.602], invalid=(0, 0, 1)))
    m = frontend.read(10.0)
    assert np.isnan(m.cell_voltage_v).tolist() == [False, True, True, False, False]
    assert math.isnan(m.current_a)


def test_values_go_stale_after_their_timeout(frontend, peer, config):
    send_all(peer)
    frontend.read(10.0)
    timeout_s = config.frontend.options.cell_voltage_timeout_s  # 0.5 s in config/sim.toml
    m = frontend.read(10.0 + timeout_s + 0.01)
    assert np.isnan(m.cell_voltage_v).all() and math.isnan(m.current_a)
    assert set(m.stale_groups) == {"cell_voltage", "pack"}  # temperatures allow 1 s
    peer.send("CMU_CellVoltages", cell_group(0, [3.6, 3.6, 3.6]))
    m = frontend.read(10.6)
    assert np.isnan(m.cell_voltage_v).tolist() == [False, False, False, True, True]


def test_malformed_and_unknown_frames_are_counted_not_raised(frontend, peer, codec):
    send_all(peer)
    peer.send_raw("CMU_CellVoltages", b"\x00\x01")  # short
    # a multiplexer value the DBC does not know (temperature groups end at 9), checksum right
    temps = codec.message("CMU_CellTemperatures")
    data = bytearray(peer.frame("CMU_CellTemperatures", temp_group(0, [20] * 5)))
    data[1] = (data[1] & 0xF0) | 12
    peer.send_raw("CMU_CellTemperatures", with_crc(temps.frame_id, bytes(data)))
    peer.bus.send(can.Message(arbitration_id=0x7AB, data=b"\x01", is_extended_id=False))
    m = frontend.read(10.0)
    assert m.frame_errors == 2 and frontend.stats.malformed == 2
    assert frontend.link.unknown_frames == 1
    assert not np.isnan(m.cell_voltage_v).any()  # the good frames still count


def test_a_dbc_without_the_pack_cells_is_refused(make_config):
    config = load_config(make_config({"pack": {"n_cells": 60}}))
    with pytest.raises(DbcError, match="has no signal 'Cell49_Voltage'"):
        CanFrontEnd(config, config.frontend.options)
    # the shared bus was released: a later backend opens it afresh
    assert CanLink._links == {}


def test_contactor_driver_commands_and_reads_feedback(config, peer, bus, codec):
    driver = CanContactors(config, config.contactors.options)
    try:
        driver.command(RelayStates(True, True, False))
        frame = bus.recv(timeout=1.0)
        values = codec.decode(codec.message("BMS_ContactorCommand"), frame.data)
        assert (values["Negative"], values["Precharge"], values["Positive"]) == (1, 1, 0)
        assert not driver.feedback(5.0).valid  # nothing heard yet
        closed = {"Negative": 1, "Precharge": 0, "Positive": 1, "InterlockClosed": 0}
        peer.send("PDU_ContactorFeedback", closed)
        feedback = driver.feedback(5.1)  # the next cycle (the link polls once per cycle time)
        assert feedback.valid and feedback.relays == RelayStates(True, False, True)
        assert feedback.interlock_closed is False
        timeout_s = config.contactors.options.frame_timeout_s
        assert not driver.feedback(5.1 + timeout_s + 0.01).valid
        peer.send("PDU_ContactorFeedback", closed)
        assert driver.feedback(6.0).valid
        peer.send_raw("PDU_ContactorFeedback", b"")
        assert not driver.feedback(6.1).valid  # a malformed frame proves nothing
    finally:
        driver.close()


def test_publisher_frames_decode_back_to_the_status(config, bus, codec):
    publisher = CanPublisher(config, config.publisher.options)
    try:
        status = PackStatus(
            t_s=1.0,
            contactors=ContactorState.CLOSED,
            estimate=estimate_of([0.5, 0.6, 0.7, 0.8, 0.9]),
            measurement=Measurement(
                1.0, np.array([3.6, 3.5, 3.9, 3.7, 3.8]), np.full(7, 30.4), -7.25, 18.5, 18.4
            ),
            active_faults=("overtemperature",),
            latched_faults=(),
            charge_limit_a=15.0,
            discharge_limit_a=29.99,  # the 0.1 A signal must round this down, not up
        )
        publisher.publish(status)
        frames = {}
        while (frame := bus.recv(timeout=0.2)) is not None:
            frames[frame.arbitration_id] = frame.data
        decoded = {
            name: codec.decode(codec.message(name), frames[codec.message(name).frame_id])
            for name in ("BMS_Status", "BMS_Limits", "BMS_CellStats")
        }
        assert decoded["BMS_Status"]["ContactorState"] == 2
        assert decoded["BMS_Status"]["ActiveFaultCount"] == 1
        assert decoded["BMS_Status"]["SocMean"] == pytest.approx(0.7)
        assert decoded["BMS_Status"]["TempMax"] == 30
        assert decoded["BMS_Limits"]["DischargeLimit"] == pytest.approx(29.9)
        assert decoded["BMS_Limits"]["ChargeLimit"] == pytest.approx(15.0)
        assert decoded["BMS_Limits"]["PackCurrent"] == pytest.approx(-7.25)
        assert decoded["BMS_CellStats"]["CellVoltageMin"] == pytest.approx(3.5)
        assert decoded["BMS_CellStats"]["CellVoltageMinCell"] == 2
        assert decoded["BMS_CellStats"]["CellVoltageMaxCell"] == 3
    finally:
        publisher.close()


def test_codec_saturates_out_of_range_and_marks_nan_not_available(codec):
    cells = codec.message("CMU_CellVoltages")
    data = codec.encode(cells, {**cell_group(1, [-1.0, 9.5, math.nan]), "Crc": 0, "Counter": 0})
    values = codec.decode(cells, data)
    assert values["Cell4_Voltage"] == 0.0
    assert values["Cell5_Voltage"] == pytest.approx(8.19)
    assert math.isnan(values["Cell6_Voltage"])


def test_unreadable_dbc_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.dbc"
    bad.write_text("this is not a DBC file\n")
    with pytest.raises(DbcError, match="cannot load DBC"):
        DbcCodec(bad)


def test_a_pack_frame_that_repeats_its_counter_is_a_frozen_sender(frontend, peer, config):
    send_all(peer)
    peer.send("CMU_PackMeasurements", PACK, counter=5)
    frontend.read(10.0)
    timeout_s = config.frontend.options.pack_timeout_s
    # the sender froze: same frame, same counter, again and again
    peer.send("CMU_PackMeasurements", {**PACK, "PackCurrent": -99.0}, counter=5)
    m = frontend.read(10.0 + timeout_s + 0.01)
    assert "pack" in m.stale_groups and math.isnan(m.current_a)
    assert frontend.stats.counter_repeats == 1 and m.frame_errors == 1


def test_frames_that_waited_in_the_queue_keep_their_age(frontend, peer, config):
    import time

    send_all(peer)
    timeout_s = config.frontend.options.cell_voltage_timeout_s
    time.sleep(timeout_s + 0.1)  # the loop stalled; the frames sat in the receive queue
    m = frontend.read(time.monotonic())
    assert "cell_voltage" in m.stale_groups and np.isnan(m.cell_voltage_v).all()


def test_limits_the_dbc_cannot_carry_are_refused(make_config, make_limits):
    limits = make_limits({"temp_high_discharge_c": {"msl": 120.0}})
    config = load_config(make_config({"protection": {"limits": str(limits)}}))
    CanFrontEnd(config, config.frontend.options).close()  # 120 degC fits in -127..127
    config = load_config(make_config({"protection": {"short_circuit_current_a": 6000.0}}))
    with pytest.raises(DbcError, match=r"PackCurrent carries -5000\.\.5000 A"):
        CanFrontEnd(config, config.frontend.options)


def test_feedback_that_repeats_its_counter_goes_stale(config, peer):
    driver = CanContactors(config, config.contactors.options)
    try:
        closed = {"Negative": 1, "Precharge": 0, "Positive": 1, "InterlockClosed": 1}
        peer.send("PDU_ContactorFeedback", closed, counter=7)
        assert driver.feedback(5.0).valid
        peer.send("PDU_ContactorFeedback", closed, counter=7)  # frozen box
        timeout_s = config.contactors.options.frame_timeout_s
        assert not driver.feedback(5.0 + timeout_s + 0.01).valid
    finally:
        driver.close()


def test_insulation_reading_is_nan_until_the_monitor_says_it_is_valid(frontend, peer):
    send_all(peer)
    assert frontend.read(10.0).insulation_kohm == 1234
    peer.send("IMD_Info", {"InsulationResistance": 900, "MeasurementValid": 0})
    m = frontend.read(10.1)
    assert math.isnan(m.insulation_kohm) and "insulation" not in m.stale_groups
    # IMD_Info's GenMsgCycleTime is 400 ms: timeout_periods (5) of it is 2 s
    assert "insulation" not in frontend.read(10.1 + 1.9).stale_groups
    assert "insulation" in frontend.read(10.1 + 2.1).stale_groups


def test_a_pack_without_insulation_monitor_does_not_wait_for_one(make_config):
    no_monitor = {"insulation_warning_kohm": None, "insulation_error_kohm": None}
    config = load_config(make_config({"protection": no_monitor}))
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        m = frontend.read(100.0)
        assert "insulation" not in m.stale_groups and math.isnan(m.insulation_kohm)
    finally:
        frontend.close()


def test_balancing_command_carries_the_cells_and_a_counter(frontend, bus, codec):
    frontend.balance(np.array([False, True, False, False, True]))
    frontend.balance(np.array([False, False, False, False, False]))
    message = codec.message("BMS_BalancingCommand")
    first = codec.decode(message, bus.recv(timeout=1.0).data)
    second = codec.decode(message, bus.recv(timeout=1.0).data)
    assert [first[f"Balance{i}"] for i in range(1, 7)] == [0, 1, 0, 0, 1, 0]
    assert second["Balance2"] == 0 and second["Counter"] != first["Counter"]
