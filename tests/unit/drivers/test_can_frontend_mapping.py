"""The CAN front-end's mapping onto the DBC: templates and lists, per-module messages, periods
and timeouts per message, checksum and counter checks, and the errors a wrong name gets."""

from __future__ import annotations

import math

import can
import numpy as np
import pytest

from bms.comms.dbc import DbcCodec, DbcError
from bms.config import ConfigError, load_config
from drivers.can.frontend import CanFrontEnd
from tests.conftest import REPO
from tests.unit.drivers.test_can_backends import (
    PACK,
    Peer,
    cell_group,
    send_all,
    temp_group,
    with_crc,
)

# A pack of two modules, each with its own plain (not multiplexed) messages, no checksums, a
# current sensor of its own, and cycle times on some messages only.
MODULE_DBC = """VERSION ""

NS_ :

BS_:

BU_: BMS CMU1 CMU2 SHUNT

BO_ 1024 CMU1_Voltages: 8 CMU1
 SG_ Counter : 0|4@1+ (1,0) [0|15] "" BMS
 SG_ Cell1 : 8|16@1+ (0.0001,0) [0|6.5534] "V" BMS
 SG_ Cell2 : 24|16@1+ (0.0001,0) [0|6.5534] "V" BMS
 SG_ Cell3 : 40|16@1+ (0.0001,0) [0|6.5534] "V" BMS

BO_ 1025 CMU2_Voltages: 8 CMU2
 SG_ Counter : 0|4@1+ (1,0) [0|15] "" BMS
 SG_ Cell1 : 8|16@1+ (0.0001,0) [0|6.5534] "V" BMS
 SG_ Cell2 : 24|16@1+ (0.0001,0) [0|6.5534] "V" BMS
 SG_ Cell3 : 40|16@1+ (0.0001,0) [0|6.5534] "V" BMS

BO_ 1040 CMU1_Temps: 3 CMU1
 SG_ Sensor1 : 0|8@1- (1,0) [-127|127] "degC" BMS
 SG_ Sensor2 : 8|8@1- (1,0) [-127|127] "degC" BMS
 SG_ Sensor2Fault : 16|1@1+ (1,0) [0|1] "" BMS

BO_ 1041 CMU2_Temps: 3 CMU2
 SG_ Sensor1 : 0|8@1- (1,0) [-127|127] "degC" BMS
 SG_ Sensor2 : 8|8@1- (1,0) [-127|127] "degC" BMS
 SG_ Sensor2Fault : 16|1@1+ (1,0) [0|1] "" BMS

BO_ 1056 Shunt_Current: 4 SHUNT
 SG_ Current : 0|32@1- (0.001,0) [-2000|2000] "A" BMS

BO_ 1057 CMU1_Stack: 2 CMU1
 SG_ StackVoltage : 0|16@1+ (0.01,0) [0|655.34] "V" BMS

BA_DEF_ BO_ "GenMsgCycleTime" INT 0 65535;
BA_DEF_DEF_ "GenMsgCycleTime" 0;
BA_ "GenMsgCycleTime" BO_ 1040 1000;
BA_ "GenMsgCycleTime" BO_ 1041 1000;
"""

MODULE_FRONTEND = {
    "cell_voltage_signals": "CMU{module}_Voltages.Cell{slot}",
    "cells_per_module": 3,
    "cell_invalid_signals": "",
    "temperature_signals": "CMU{module}_Temps.Sensor{slot}",
    "sensors_per_module": 2,
    "temperature_invalid_signals": [
        "",
        "CMU1_Temps.Sensor2Fault",
        "",
        "CMU2_Temps.Sensor2Fault",
    ],
    "pack_current_signal": "Shunt_Current.Current",
    "pack_voltage_signal": "CMU1_Stack.StackVoltage",
    "link_voltage_signal": "",
    "balancing_signals": "",
    "cell_voltage_timeout_s": None,  # drop config/sim.toml's, so the periods count
    "temperature_timeout_s": None,
    "pack_timeout_s": None,
}
NO_IMD = {"insulation_warning_kohm": None, "insulation_error_kohm": None}


@pytest.fixture
def module_config(make_config, tmp_path):
    dbc = tmp_path / "modules.dbc"
    dbc.write_text(MODULE_DBC)

    def make(frontend_changes: dict | None = None):
        return load_config(
            make_config(
                {
                    "pack": {"n_cells": 6, "n_temp_sensors": 4},
                    "can": {"dbc_file": str(dbc)},
                    "protection": {**NO_IMD, "short_circuit_current_a": 1000.0},
                    "frontend": {**MODULE_FRONTEND, **(frontend_changes or {})},
                }
            )
        )

    return make


@pytest.fixture
def module_peer(module_config):
    config = module_config()
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    yield config, Peer(bus, DbcCodec(config.can.dbc_file))
    bus.shutdown()


def send_modules(peer: Peer) -> None:
    peer.send("CMU1_Voltages", {"Cell1": 3.301, "Cell2": 3.302, "Cell3": 3.303})
    peer.send("CMU2_Voltages", {"Cell1": 3.304, "Cell2": 3.305, "Cell3": 3.306})
    peer.send("CMU1_Temps", {"Sensor1": 21, "Sensor2": 22, "Sensor2Fault": 0})
    peer.send("CMU2_Temps", {"Sensor1": 23, "Sensor2": 24, "Sensor2Fault": 1})
    peer.send("Shunt_Current", {"Current": 42.125})
    peer.send("CMU1_Stack", {"StackVoltage": 19.83})


def test_plain_per_module_messages_map_by_template(module_peer):
    config, peer = module_peer
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        assert frontend.supports_balancing is False  # no balancing signals configured
        send_modules(peer)
        m = frontend.read(10.0)
        assert m.cell_voltage_v == pytest.approx([3.301, 3.302, 3.303, 3.304, 3.305, 3.306])
        # sensor 4 (module 2, slot 2) is flagged faulty by its module
        assert m.cell_temp_c[:3].tolist() == [21, 22, 23] and math.isnan(m.cell_temp_c[3])
        assert m.current_a == pytest.approx(42.125)
        assert m.pack_voltage_v == pytest.approx(19.83)
        assert math.isnan(m.link_voltage_v)  # not measured: NaN, and never stale
        assert m.stale_groups == () and m.frame_errors == 0
    finally:
        frontend.close()


def test_each_message_times_out_after_its_own_periods(module_peer):
    config, peer = module_peer
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        send_modules(peer)
        frontend.read(10.0)
        # no GenMsgCycleTime: period_s (0.1 s) x timeout_periods (5) = 0.5 s
        m = frontend.read(10.45)
        assert m.stale_groups == ()
        m = frontend.read(10.55)
        assert set(m.stale_groups) == {"cell_voltage", "pack"}
        # the temperature messages declare 1000 ms: stale after 5 s, not before
        assert not np.isnan(frontend.read(14.9).cell_temp_c[:3]).any()
        assert "temperature" in frontend.read(15.1).stale_groups
    finally:
        frontend.close()


def test_timeout_periods_and_a_group_timeout_override_the_default(module_config):
    config = module_config({"timeout_periods": 2.0, "temperature_timeout_s": 1.5})
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        send_modules(Peer(bus, DbcCodec(config.can.dbc_file)))
        frontend.read(10.0)
        assert frontend.read(10.19).stale_groups == ()
        assert set(frontend.read(10.21).stale_groups) == {"cell_voltage", "pack"}
        assert "temperature" not in frontend.read(11.49).stale_groups
        assert "temperature" in frontend.read(11.51).stale_groups
    finally:
        frontend.close()
        bus.shutdown()


def test_an_explicit_list_maps_each_cell_to_its_signal(module_config):
    cells = [f"CMU{m}_Voltages.Cell{s}" for m in (2, 1) for s in (3, 2, 1)]  # reversed wiring
    config = module_config({"cell_voltage_signals": cells, "cells_per_module": None})
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        send_modules(Peer(bus, DbcCodec(config.can.dbc_file)))
        m = frontend.read(10.0)
        assert m.cell_voltage_v == pytest.approx([3.306, 3.305, 3.304, 3.303, 3.302, 3.301])
    finally:
        frontend.close()
        bus.shutdown()


def test_a_message_without_counter_or_checksum_is_taken_as_it_comes(module_peer):
    config, peer = module_peer
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        send_modules(peer)
        peer.send("Shunt_Current", {"Current": -3.5})  # no counter: a repeat is no repeat
        assert frontend.read(10.0).current_a == pytest.approx(-3.5)
        peer.send("CMU1_Voltages", {"Cell1": 3.9, "Cell2": 3.9, "Cell3": 3.9}, counter=7)
        peer.send("CMU1_Voltages", {"Cell1": 3.1, "Cell2": 3.1, "Cell3": 3.1}, counter=7)
        m = frontend.read(10.1)
        assert m.cell_voltage_v[0] == pytest.approx(3.9)  # the repeated counter was dropped
        assert frontend.stats.counter_repeats == 1
    finally:
        frontend.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"pack_current_signal": "Shunt_Curent.Current"},
            "pack_current_signal: no message 'Shunt_Curent' (did you mean 'Shunt_Current'?)",
        ),
        (
            {"pack_voltage_signal": "CMU1_Stack.StackVoltag"},
            "pack_voltage_signal: message 'CMU1_Stack' has no signal 'StackVoltag' "
            "(did you mean 'StackVoltage'?)",
        ),
        (
            {"temperature_signals": "CMU{module}_Temps.Sensr{slot}"},
            "temperature_signals (sensor 1): message 'CMU1_Temps' has no signal 'Sensr1' "
            "(did you mean 'Sensor1'?)",
        ),
        (
            {"temperature_invalid_signals": "CMU1_Temps.Sensor2Fault"},
            "temperature_invalid_signals (sensor 3): CMU1_Temps.Sensor2Fault is not sent in the "
            "frames of CMU2_Temps.Sensor1",
        ),
        (
            {"cell_voltage_timeout_s": 0.05},
            "cell_voltage_signals (cell 1): the timeout (0.05 s) must be longer than "
            "CMU1_Voltages's period (0.1 s)",
        ),
    ],
    ids=["message", "signal", "template", "flag elsewhere", "timeout below period"],
)
def test_names_and_timeouts_are_checked_against_the_dbc_when_opening(
    module_config, changes, message
):
    config = module_config(changes)
    with pytest.raises(DbcError) as excinfo:
        CanFrontEnd(config, config.frontend.options)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cell_voltage_signals": "CMU_CellVoltages.Cell{cell}_Voltage"}, "unknown template"),
        ({"cell_voltage_signals": "CMU{module}_Voltages.Cell{slot}"}, "set cells_per_module"),
        ({"cell_voltage_signals": ["CMU_CellVoltages.Cell1_Voltage"]}, "lists 1 signals for 16"),
        ({"pack_current_signal": "PackCurrent"}, "'PackCurrent' is not Message.Signal"),
        ({"timeout_periods": 1.0}, "timeout_periods"),
    ],
)
def test_malformed_mapping_options_are_refused_when_loading(make_config, changes, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config(make_config({"frontend": changes}))
    assert "[frontend]" in str(excinfo.value) and message in str(excinfo.value)


# ------------------------------------------------------------------ the default DBC


@pytest.fixture
def config(make_config):
    return load_config(make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}}))


@pytest.fixture
def peer(config):
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    yield Peer(bus, DbcCodec(config.can.dbc_file))
    bus.shutdown()


@pytest.fixture
def frontend(config):
    backend = CanFrontEnd(config, config.frontend.options)
    yield backend
    backend.close()


def test_a_frame_with_a_wrong_checksum_is_dropped_never_decoded(frontend, peer):
    send_all(peer)
    assert frontend.read(10.0).current_a == pytest.approx(-12.5)
    good = peer.frame("CMU_PackMeasurements", {**PACK, "PackCurrent": 80.0})
    for bit in (0, 13, 63):  # the checksum byte itself, the current, the link voltage
        corrupt = bytearray(good)
        corrupt[bit // 8] ^= 1 << (bit % 8)
        peer.send_raw("CMU_PackMeasurements", bytes(corrupt))
    m = frontend.read(10.1)
    assert m.current_a == pytest.approx(-12.5)  # none of the corrupt frames was believed
    assert frontend.stats.checksum_errors == 3 and m.frame_errors == 3
    peer.send_raw("CMU_PackMeasurements", good)
    assert frontend.read(10.2).current_a == pytest.approx(80.0)


def test_the_checksum_covers_the_frame_id(frontend, peer):
    """A frame with a checksum that is right for another message's id is wrong for this one."""
    send_all(peer)
    frontend.read(10.0)
    temps = peer.frame("CMU_CellTemperatures", temp_group(0, [90] * 5))
    peer.send_raw("CMU_CellVoltages", temps)  # same length, same checksum position, wrong id
    m = frontend.read(10.1)
    assert frontend.stats.checksum_errors == 1
    assert m.cell_voltage_v[0] == pytest.approx(3.6)


def test_counters_are_checked_per_multiplexer_group(frontend, peer):
    send_all(peer)
    frontend.read(10.0)
    peer.send("CMU_CellVoltages", cell_group(0, [3.7, 3.7, 3.7]), counter=9)
    peer.send("CMU_CellVoltages", cell_group(1, [3.8, 3.8, 0]), counter=9)  # other group: fresh
    peer.send("CMU_CellVoltages", cell_group(0, [3.1, 3.1, 3.1]), counter=9)  # repeat: dropped
    m = frontend.read(10.1)
    assert m.cell_voltage_v == pytest.approx([3.7, 3.7, 3.7, 3.8, 3.8])
    assert frontend.stats.counter_repeats == 1
    # group 0 went from 0 to 9 and group 1 from 0 to 9: both skipped eight frames
    assert frontend.stats.counter_jumps == 2


def test_a_balancing_frame_goes_out_with_its_counter_advancing(frontend, config):
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    codec = DbcCodec(config.can.dbc_file)
    message = codec.message("BMS_BalancingCommand")
    try:
        for _ in range(17):
            frontend.balance(np.zeros(5, dtype=bool))
        counters = [codec.decode(message, bus.recv(timeout=1.0).data)["Counter"] for _ in range(17)]
        assert counters == [(1 + k) % 16 for k in range(17)]
    finally:
        bus.shutdown()


def dbc_with(tmp_path, old: str, new: str):
    """config/can/pybms.dbc with one line changed, written to ``tmp_path``."""
    text = (REPO / "config" / "can" / "pybms.dbc").read_text()
    assert old in text
    path = tmp_path / "changed.dbc"
    path.write_text(text.replace(old, new))
    return path


def test_a_multiplexed_counter_is_refused_when_opening(make_config, tmp_path):
    # a Counter sent in the group-0 frames only cannot prove that a group-1 frame is new
    dbc = dbc_with(
        tmp_path,
        ' SG_ Counter : 12|4@1+ (1,0) [0|15] "" BMS\n SG_ Cell1_Voltage m0',
        ' SG_ Counter m0 : 60|4@1+ (1,0) [0|15] "" BMS\n SG_ Cell1_Voltage m0',
    )
    config = load_config(
        make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}, "can": {"dbc_file": str(dbc)}})
    )
    with pytest.raises(DbcError, match=r"CMU_CellVoltages\.Counter is multiplexed"):
        CanFrontEnd(config, config.frontend.options)


def test_a_counter_that_is_not_available_proves_nothing(make_config, tmp_path):
    """A count outside the counter's declared range reads as NaN ("not available", the DBC's
    rule); NaN differs from every earlier count, but it is no evidence of a new frame."""
    dbc = dbc_with(
        tmp_path,
        ' SG_ Counter : 8|4@1+ (1,0) [0|15] "" BMS\n SG_ PackCurrent',
        ' SG_ Counter : 8|4@1+ (1,0) [0|14] "" BMS\n SG_ PackCurrent',
    )
    config = load_config(
        make_config({"pack": {"n_cells": 5, "n_temp_sensors": 7}, "can": {"dbc_file": str(dbc)}})
    )
    bus = can.Bus(interface="virtual", channel=config.can.channel)
    peer = Peer(bus, DbcCodec(dbc))
    frontend = CanFrontEnd(config, config.frontend.options)
    try:
        send_all(peer)
        assert frontend.read(10.0).current_a == pytest.approx(-12.5)
        frame = bytearray(peer.frame("CMU_PackMeasurements", {**PACK, "PackCurrent": 80.0}, 3))
        frame[1] |= 0x0F  # Counter (bits 8..11) = 15: outside [0, 14]
        frame = with_crc(0x302, bytes(frame))  # CMU_PackMeasurements is 770 = 0x302
        for _ in range(3):  # a sender stuck on a not-available count, frame after frame
            peer.send_raw("CMU_PackMeasurements", frame)
        timeout_s = config.frontend.options.pack_timeout_s
        m = frontend.read(10.0 + timeout_s + 0.01)
        assert "pack" in m.stale_groups and math.isnan(m.current_a)
        assert frontend.stats.counter_invalid == 3 and frontend.stats.counter_repeats == 0
        assert m.frame_errors == 3
    finally:
        frontend.close()
        bus.shutdown()
