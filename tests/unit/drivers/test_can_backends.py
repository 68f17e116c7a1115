"""CAN backends on a python-can virtual bus, with a test peer encoding frames from the DBC."""

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


@pytest.fixture
def config(make_config):
    return load_config(make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}}))


@pytest.fixture
def peer(config):
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    yield bus
    bus.shutdown()


@pytest.fixture
def codec(config):
    return DbcCodec(config.can.dbc_file)


@pytest.fixture
def frontend(config):
    backend = CanFrontEnd(config, config.frontend.options)
    yield backend
    backend.close()


def send(peer, codec, name, values):
    message = codec.message(name)
    peer.send(
        can.Message(
            arbitration_id=message.frame_id,
            data=codec.encode(message, values),
            is_extended_id=False,
        )
    )


def cell_group(group, volts, invalid=(0, 0, 0, 0)):
    values = {"CellVoltageGroup": group}
    for k in range(4):
        values[f"Cell{4 * group + k + 1}_Voltage"] = volts[k]
        values[f"Cell{4 * group + k + 1}_VoltageInvalid"] = invalid[k]
    return values


def temp_group(group, temps):
    values = {"TemperatureGroup": group}
    for k in range(6):
        values[f"Temp{6 * group + k + 1}"] = temps[k]
        values[f"Temp{6 * group + k + 1}_Invalid"] = 0
    return values


def send_all(peer, codec, current_a=-12.5, counter=1):
    send(peer, codec, "CMU_CellVoltages", cell_group(0, [3.6, 3.601, 3.602, 3.603]))
    send(peer, codec, "CMU_CellVoltages", cell_group(1, [3.604, 0, 0, 0]))
    send(peer, codec, "CMU_CellTemperatures", temp_group(0, [20, 21, 22, 23, 24, 25]))
    send(peer, codec, "CMU_CellTemperatures", temp_group(1, [-5, 0, 0, 0, 0, 0]))
    send(
        peer,
        codec,
        "CMU_PackMeasurements",
        {"PackCurrent": current_a, "PackVoltage": 18.01, "LinkVoltage": 17.5, "Counter": counter},
    )
    send(
        peer,
        codec,
        "IMD_Info",
        {"InsulationResistance": 1234, "MeasurementValid": 1, "Counter": counter},
    )


def test_frontend_decodes_every_signal_in_units(frontend, peer, codec):
    send_all(peer, codec)
    m = frontend.read(10.0)
    assert m.cell_voltage_v == pytest.approx([3.6, 3.601, 3.602, 3.603, 3.604])
    assert m.cell_temp_c.tolist() == [20, 21, 22, 23, 24, 25, -5]
    assert m.current_a == pytest.approx(-12.5)
    assert (m.pack_voltage_v, m.link_voltage_v) == pytest.approx((18.01, 17.5))
    assert m.stale_groups == () and m.frame_errors == 0


def test_invalid_flag_and_not_available_code_read_as_nan(frontend, peer, codec):
    send_all(peer, codec, current_a=math.nan)
    send(
        peer,
        codec,
        "CMU_CellVoltages",
        cell_group(0, [3.6, math.nan, 3.602, 3.603], invalid=(0, 0, 1, 0)),
    )
    m = frontend.read(10.0)
    assert np.isnan(m.cell_voltage_v).tolist() == [False, True, True, False, False]
    assert math.isnan(m.current_a)


def test_values_go_stale_after_their_timeout(frontend, peer, codec, config):
    send_all(peer, codec)
    frontend.read(10.0)
    timeout_s = config.frontend.options.cell_voltage_timeout_s
    m = frontend.read(10.0 + timeout_s + 0.01)
    assert np.isnan(m.cell_voltage_v).all() and math.isnan(m.current_a)
    assert set(m.stale_groups) == {"cell_voltage", "pack"}  # temperatures allow 1 s
    send(peer, codec, "CMU_CellVoltages", cell_group(0, [3.6, 3.6, 3.6, 3.6]))
    m = frontend.read(10.6)
    assert np.isnan(m.cell_voltage_v).tolist() == [False, False, False, False, True]


def test_malformed_and_unknown_frames_are_counted_not_raised(frontend, peer, codec):
    send_all(peer, codec)
    cells = codec.message("CMU_CellVoltages")
    peer.send(can.Message(arbitration_id=cells.frame_id, data=b"\x00\x01", is_extended_id=False))
    peer.send(
        can.Message(
            arbitration_id=cells.frame_id,
            data=bytes([200, 0, 0, 0, 0, 0, 0, 0]),
            is_extended_id=False,
        )
    )  # a multiplexer value the DBC does not know
    peer.send(can.Message(arbitration_id=0x7AB, data=b"\x01", is_extended_id=False))
    m = frontend.read(10.0)
    assert m.frame_errors == 2
    assert frontend.link.unknown_frames == 1
    assert not np.isnan(m.cell_voltage_v).any()  # the good frames still count


def test_a_dbc_without_the_pack_cells_is_refused(make_config):
    config = load_config(make_config({"pack": {"n_cells": 60}}))
    with pytest.raises(DbcError, match="lacks signals Cell49_Voltage"):
        CanFrontEnd(config, config.frontend.options)
    # the shared bus was released: a later backend opens it afresh
    assert CanLink._links == {}


def test_contactor_driver_commands_and_reads_feedback(config, peer, codec):
    driver = CanContactors(config, config.contactors.options)
    try:
        driver.command(RelayStates(True, True, False))
        frame = peer.recv(timeout=1.0)
        values = codec.decode(codec.message("BMS_ContactorCommand"), frame.data)
        assert (values["Negative"], values["Precharge"], values["Positive"]) == (1, 1, 0)
        assert not driver.feedback(5.0).valid  # nothing heard yet
        send(
            peer,
            codec,
            "PDU_ContactorFeedback",
            {"Negative": 1, "Precharge": 0, "Positive": 1, "Counter": 3, "InterlockClosed": 0},
        )
        feedback = driver.feedback(5.0)
        assert feedback.valid and feedback.relays == RelayStates(True, False, True)
        assert feedback.interlock_closed is False
        timeout_s = config.contactors.options.frame_timeout_s
        assert not driver.feedback(5.0 + timeout_s + 0.01).valid
        feedback_id = codec.message("PDU_ContactorFeedback").frame_id
        peer.send(can.Message(arbitration_id=feedback_id, data=b"", is_extended_id=False))
        assert not driver.feedback(5.1).valid  # a malformed frame proves nothing
    finally:
        driver.close()


def test_publisher_frames_decode_back_to_the_status(config, peer, codec):
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
        while (frame := peer.recv(timeout=0.2)) is not None:
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
    data = codec.encode(cells, cell_group(0, [-1.0, 9.5, math.nan, 3.7]))
    values = codec.decode(cells, data)
    assert values["Cell1_Voltage"] == 0.0
    assert values["Cell2_Voltage"] == pytest.approx(8.19)
    assert math.isnan(values["Cell3_Voltage"])
    assert values["Cell4_Voltage"] == pytest.approx(3.7)


def test_unreadable_dbc_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.dbc"
    bad.write_text("this is not a DBC file\n")
    with pytest.raises(DbcError, match="cannot load DBC"):
        DbcCodec(bad)


def test_a_pack_frame_that_repeats_its_counter_is_a_frozen_sender(frontend, peer, codec, config):
    send_all(peer, codec, counter=5)
    frontend.read(10.0)
    timeout_s = config.frontend.options.pack_timeout_s
    # the sender froze: same frame, same counter, again and again
    send(
        peer,
        codec,
        "CMU_PackMeasurements",
        {"PackCurrent": -12.5, "PackVoltage": 18.01, "LinkVoltage": 17.5, "Counter": 5},
    )
    m = frontend.read(10.0 + timeout_s + 0.01)
    assert "pack" in m.stale_groups and math.isnan(m.current_a)
    assert frontend.pack_counter.repeats == 1


def test_frames_that_waited_in_the_queue_keep_their_age(frontend, peer, codec, config):
    import time

    send_all(peer, codec)
    timeout_s = config.frontend.options.cell_voltage_timeout_s
    time.sleep(timeout_s + 0.1)  # the loop stalled; the frames sat in the receive queue
    m = frontend.read(time.monotonic())
    assert "cell_voltage" in m.stale_groups and np.isnan(m.cell_voltage_v).all()


def test_limits_the_dbc_cannot_carry_are_refused(make_config, make_limits):
    limits = make_limits({"temp_high_discharge_c": {"msl": 120.0}})
    config = load_config(make_config({"protection": {"limits": str(limits)}}))
    CanFrontEnd(config, config.frontend.options).close()  # 120 degC fits in -127..127
    config = load_config(make_config({"protection": {"short_circuit_current_a": 9000.0}}))
    with pytest.raises(DbcError, match=r"PackCurrent carries -8000\.\.8000 A"):
        CanFrontEnd(config, config.frontend.options)


def test_feedback_that_repeats_its_counter_goes_stale(config, peer, codec):
    driver = CanContactors(config, config.contactors.options)
    try:
        closed = {"Negative": 1, "Precharge": 0, "Positive": 1, "Counter": 7, "InterlockClosed": 1}
        send(peer, codec, "PDU_ContactorFeedback", closed)
        assert driver.feedback(5.0).valid
        send(peer, codec, "PDU_ContactorFeedback", closed)  # frozen box
        timeout_s = config.contactors.options.frame_timeout_s
        assert not driver.feedback(5.0 + timeout_s + 0.01).valid
    finally:
        driver.close()


def test_insulation_reading_is_nan_until_the_monitor_says_it_is_valid(frontend, peer, codec):
    send_all(peer, codec)
    assert frontend.read(10.0).insulation_kohm == 1234
    send(
        peer, codec, "IMD_Info", {"InsulationResistance": 900, "MeasurementValid": 0, "Counter": 2}
    )
    m = frontend.read(10.1)
    assert math.isnan(m.insulation_kohm) and "insulation" not in m.stale_groups
    m = frontend.read(10.1 + 2.1)  # insulation_timeout_s
    assert "insulation" in m.stale_groups


def test_a_pack_without_insulation_monitor_does_not_wait_for_one(make_config):
    no_monitor = {"insulation_warning_kohm": None, "insulation_error_kohm": None}
    config = load_config(make_config({"protection": no_monitor}))
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        m = frontend.read(100.0)
        assert "insulation" not in m.stale_groups and math.isnan(m.insulation_kohm)
    finally:
        frontend.close()


def test_balancing_command_carries_the_cells_and_a_counter(frontend, peer, codec):
    frontend.balance(np.array([False, True, False, False, True]))
    frontend.balance(np.array([False, False, False, False, False]))
    message = codec.message("BMS_BalancingCommand")
    first = codec.decode(message, peer.recv(timeout=1.0).data)
    second = codec.decode(message, peer.recv(timeout=1.0).data)
    assert [first[f"Balance{i}"] for i in range(1, 7)] == [0, 1, 0, 0, 1, 0]
    assert second["Balance2"] == 0 and second["Counter"] != first["Counter"]
