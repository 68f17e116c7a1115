"""The virtual instruments' SCPI, as IEEE 488.2 and SCPI-99 define it and instruments of each
kind accept it (hil/README.md): keyword forms, optional nodes, parameters, channel lists, the
error queue and its codes, ``*RST``; and what each instrument does at its terminals."""

from __future__ import annotations

import pytest

from hil.virtual.instruments import (
    VirtualCellEmulator,
    VirtualElectronicLoad,
    VirtualPowerSupply,
    VirtualRelayBox,
    VirtualThermistorEmulator,
)
from hil.virtual.scpi import ERROR_QUEUE_LENGTH, compile_header


def errors(device) -> list[str]:
    found = []
    while (answer := device.handle_line("SYST:ERR?")) != '0,"No error"':
        found.append(answer)
    return found


@pytest.mark.parametrize(
    "line",
    [
        "SOUR:VOLT 3.7,(@2)",
        "SOURCE:VOLTAGE:LEVEL:IMMEDIATE:AMPLITUDE 3.7,(@2)",
        "volt 3.7,(@2)",
        ":Volt:Lev 3.7,(@2)",
        "VOLT 3.700E+00,(@2)",
        "VOLT 3.7 , (@2)",
    ],
)
def test_short_and_long_forms_and_optional_nodes(line):
    cells = VirtualCellEmulator(4)
    cells.handle_line(line)
    assert errors(cells) == []
    assert cells.setpoint_v.tolist() == [0.0, 3.7, 0.0, 0.0]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("VOL 3.7,(@1)", "-113"),  # neither the short form (VOLT) nor the long (VOLTAGE)
        ("VOLTA 3.7,(@1)", "-113"),
        ("SOUR:LEV:VOLT 3.7,(@1)", "-113"),  # nodes in the wrong order
        ("*FOO", "-113"),
        ("VOLT", "-109"),  # no parameters
        ("VOLT 3.7", "-109"),  # no channel list
        ("VOLT 3.7,(@1),5", "-108"),
        ("*IDN? 1", "-108"),
        ("VOLT three,(@1)", "-104"),
        ("VOLT nan,(@1)", "-104"),
        ("VOLT 7,(@1)", "-222"),  # 0..6 V
        ("VOLT 3.7,(@5)", "-222"),  # a 4-channel unit
        ("VOLT 3.7,(@0)", "-222"),
        ("VOLT 3.7,(@3:1)", "-222"),
        ("VOLT 3.7,(1)", "-102"),
        ("VOLT 3.7,(@1", "-102"),
        ("OUTP MAYBE,(@1)", "-224"),
        ("VO#LT 3.7,(@1)", "-102"),
    ],
)
def test_a_bad_command_queues_its_scpi_error_and_changes_nothing(line, code):
    cells = VirtualCellEmulator(4)
    assert cells.handle_line(line) is None
    (error,) = errors(cells)
    assert error.startswith(code + ",")
    assert not cells.setpoint_v.any() and not cells.on.any()


def test_the_error_queue_is_oldest_first_bounded_and_cleared_by_cls():
    load = VirtualElectronicLoad(60.0)
    load.handle_line("CURR 100")  # -222
    load.handle_line("BOGUS")  # -113
    assert load.handle_line("SYST:ERR?") == '-222,"Data out of range"'
    assert load.handle_line("SYSTEM:ERROR:NEXT?") == '-113,"Undefined header"'
    assert load.handle_line("SYST:ERR?") == '0,"No error"'
    for _ in range(ERROR_QUEUE_LENGTH + 5):
        load.handle_line("BOGUS")
    queued = errors(load)
    assert len(queued) == ERROR_QUEUE_LENGTH
    assert queued[-1] == '-350,"Queue overflow"'
    load.handle_line("BOGUS")
    load.handle_line("*CLS")
    assert errors(load) == []


def test_common_commands_and_several_commands_on_a_line():
    supply = VirtualPowerSupply(80.0, 20.0)
    assert supply.handle_line("*IDN?") == "pybms,VPS-80,0,1.0"
    assert supply.handle_line("*OPC?") == "1"
    assert supply.handle_line("VOLT 75;CURR 5;OUTP ON;VOLT?;CURR?;OUTP?") == (
        "+7.500000E+01;+5.000000E+00;1"
    )
    assert supply.handle_line("VOLT 90;CURR 6") is None  # the error stops the line
    assert errors(supply) == ['-222,"Data out of range"']
    assert supply.current_a == 5.0
    supply.handle_line("*RST")
    assert (supply.voltage_v, supply.current_a, supply.on) == (0.0, 0.0, False)


def test_cell_emulator_channels_and_their_current_limit():
    cells = VirtualCellEmulator(4)
    cells.handle_line("VOLT 3.6,(@1:4);VOLT 4.0,(@3);CURR 5,(@1:4);OUTP ON,(@1,2,3)")
    assert cells.handle_line("VOLT? (@1:4)") == (
        "+3.600000E+00,+3.600000E+00,+4.000000E+00,+3.600000E+00"
    )
    assert cells.handle_line("OUTP? (@3:4)") == "1,0"
    assert cells.output_v().tolist() == [3.6, 3.6, 4.0, 0.0]  # channel 4 is off
    cells.channel_current_a[:] = 10.0  # twice the limit: constant current, voltage folds back
    assert cells.output_v() == pytest.approx([1.8, 1.8, 2.0, 0.0])
    assert cells.handle_line("MEAS:CURR? (@1,4)") == "+1.000000E+01,+0.000000E+00"
    cells.handle_line("*RST")
    assert not cells.on.any() and not cells.setpoint_v.any()


def test_supply_pushes_its_current_only_below_its_voltage_setting():
    supply = VirtualPowerSupply(80.0, 20.0)
    supply.handle_line("VOLT 70;CURR 5")
    assert supply.sourced_a(60.0) == 0.0  # off
    supply.handle_line("OUTP ON")
    assert supply.sourced_a(60.0) == 5.0
    assert supply.sourced_a(70.0) == 0.0  # the pack is at its setting: it cannot push


def test_load_in_constant_current_only():
    load = VirtualElectronicLoad(60.0)
    load.handle_line("FUNC CURR;CURR 12.5")
    assert load.handle_line("FUNC?") == "CURR"
    assert load.sunk_a() == 0.0
    load.handle_line("INP ON")
    assert load.handle_line("INP?") == "1" and load.sunk_a() == 12.5
    load.handle_line("SOUR:INP:STAT OFF")  # the Rigol spelling
    assert load.sunk_a() == 0.0
    load.handle_line("FUNC VOLT")
    assert errors(load) == ['-224,"Illegal parameter value"']


def test_relay_box_opens_everything_at_reset():
    relays = VirtualRelayBox(32)
    relays.handle_line("ROUT:CLOS (@1:3,18)")
    assert relays.handle_line("ROUT:CLOS? (@1:4,18)") == "1,1,1,0,1"
    relays.handle_line("ROUTE:OPEN (@2)")
    assert relays.handle_line("ROUT:OPEN? (@1:3)") == "0,1,0"
    relays.handle_line("*RST")
    assert not relays.closed.any()


def test_thermistor_emulator_starts_open_and_holds_a_resistance_per_channel():
    therm = VirtualThermistorEmulator(4)
    assert therm.handle_line("RES? (@1)") == "+1.000000E+07"
    therm.handle_line("RES 10000,(@1:2);SOUR:RES 5320.5,(@4)")
    assert therm.handle_line("RES? (@1:4)") == (
        "+1.000000E+04,+1.000000E+04,+1.000000E+07,+5.320500E+03"
    )
    therm.handle_line("RES 0.1,(@1)")
    assert errors(therm) == ['-222,"Data out of range"']


def test_header_patterns():
    keywords = compile_header("[SOURce:]VOLTage[:LEVel]")
    assert [(k.short, k.long, k.optional) for k in keywords] == [
        ("SOUR", "SOURCE", True),
        ("VOLT", "VOLTAGE", False),
        ("LEV", "LEVEL", True),
    ]
    with pytest.raises(ValueError):
        compile_header("VOLT age")
