"""The JBD smart-BMS protocol against frames taken from its public descriptions, and the
front-end over a pty to the emulated BMS (tests/emulators/jbd.py), with its faults."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pytest

from bms.backends import FrontEndError
from bms.config import ConfigError, load_config
from drivers.serial import jbd as jbd_module
from drivers.serial.jbd import (
    FrameReader,
    JbdFrontEnd,
    JbdProtocolError,
    Response,
    decode_basic_info,
    decode_cell_voltages,
    faults_of,
    read_request,
)
from tests.emulators.jbd import BASIC_INFO, CELL_VOLTAGES, JbdEmulator, PackState

# Frames as JBD's protocol document and public captures show them.
# "Host send: DD A5 03 00 FF FD 77 / BMS response: DD 03 00 1B 17 00 ... 0B 82 FB FF 77"
DOC_REQUEST_03 = bytes.fromhex("DD A5 03 00 FF FD 77")
DOC_REQUEST_04 = bytes.fromhex("DD A5 04 00 FF FC 77")
DOC_BASIC_INFO = bytes.fromhex(
    "DD 03 00 1B 17 00 00 00 02 D0 03 E8 00 00 20 78 00 00 00 00 00 00 10 48 03 0F 02 "
    "0B 76 0B 82 FB FF 77"
)
# A capture from a 12-cell pack (BatteryMonitor wiki; its decimal list has typos, the hex is
# what the BMS sent: u16 big-endian mV each; checksum FC74 over 00 18 and the data).
CAPTURED_CELLS = bytes.fromhex(
    "DD 04 00 18 10 39 10 3A 10 38 10 3A 10 3C 10 39 10 37 10 39 10 3B 10 3F 10 36 10 3A FC 74 77"
)
CAPTURED_CELLS_MV = [
    *(0x1039, 0x103A, 0x1038, 0x103A, 0x103C, 0x1039),
    *(0x1037, 0x1039, 0x103B, 0x103F, 0x1036, 0x103A),
]


def frame(register: int, data: bytes, status: int = 0) -> bytes:
    """A response built here by hand from the definition: 0x10000 minus the byte sum of
    status, length and data, high byte first."""
    covered = bytes([status, len(data)]) + data
    total = (0x10000 - sum(covered)) & 0xFFFF
    return bytes([0xDD, register]) + covered + bytes([total >> 8, total & 0xFF, 0x77])


def test_read_requests_are_the_documented_bytes():
    assert read_request(0x03) == DOC_REQUEST_03
    assert read_request(0x04) == DOC_REQUEST_04


def test_the_documented_basic_information_decodes_field_by_field():
    (response,) = FrameReader().feed(DOC_BASIC_INFO)
    assert (response.register, response.status, len(response.data)) == (0x03, 0x00, 0x1B)
    info = decode_basic_info(response.data)
    assert info.pack_voltage_v == pytest.approx(58.88)  # 0x1700 x 10 mV
    assert info.current_a == 0.0
    assert info.remaining_capacity_ah == pytest.approx(7.2)  # 0x02D0 x 10 mAh
    assert info.nominal_capacity_ah == pytest.approx(10.0)  # 0x03E8 x 10 mAh
    assert (info.cycles, info.balancing, info.protection) == (0, 0, 0)
    assert info.software_version == 0x10 and info.soc == pytest.approx(0.72)  # 0x48 = 72 %
    assert info.charge_fet_on and info.discharge_fet_on  # 0x03
    assert info.n_cells == 15
    assert info.temps_c == pytest.approx((20.3, 21.5))  # (2934 - 2731) / 10, (2946 - 2731) / 10


def test_captured_cell_voltages_decode_in_volts():
    (response,) = FrameReader().feed(CAPTURED_CELLS)
    assert response.register == 0x04
    assert decode_cell_voltages(response.data) * 1000 == pytest.approx(CAPTURED_CELLS_MV)


@pytest.mark.parametrize(
    ("current_bytes", "current_a"),
    [(b"\x03\xe8", 10.0), (b"\xfc\x18", -10.0), (b"\x80\x01", -327.67)],
    ids=["charging", "discharging", "most negative unsaturated"],
)
def test_current_is_signed_and_positive_while_charging(current_bytes, current_a):
    data = bytearray(DOC_BASIC_INFO[4:-3])
    data[2:4] = current_bytes  # current: the second u16, 10 mA
    (response,) = FrameReader().feed(frame(0x03, bytes(data)))
    assert decode_basic_info(response.data).current_a == pytest.approx(current_a)


@pytest.mark.parametrize("current_bytes", [b"\x80\x00", b"\x7f\xff"], ids=["-327.68", "327.67"])
def test_a_current_at_full_scale_is_saturated_not_a_measurement(current_bytes):
    # an s16 of 10 mA ends at +-327.68 A: the true current may be anywhere beyond
    data = bytearray(DOC_BASIC_INFO[4:-3])
    data[2:4] = current_bytes
    assert math.isnan(decode_basic_info(bytes(data)).current_a)


def test_readings_no_pack_can_give_are_nan():
    data = bytearray(DOC_BASIC_INFO[4:-3])  # 15 cells, two NTCs at 2934 and 2946 (0.1 K)
    data[0:2] = b"\xff\xff"  # pack voltage 655.35 V: beyond 15 cells at 5 V each
    data[23:25] = (0).to_bytes(2, "big")  # NTC 1: 0 K, a shorted or missing NTC
    data[25:27] = (2731 + 2000).to_bytes(2, "big")  # NTC 2: 200 degC, no cell survives it
    info = decode_basic_info(bytes(data))
    assert math.isnan(info.pack_voltage_v)
    assert math.isnan(info.temps_c[0]) and math.isnan(info.temps_c[1])
    data[23:25] = (2731 - 400).to_bytes(2, "big")  # -40 degC and 120 degC are readings
    data[25:27] = (2731 + 1200).to_bytes(2, "big")
    assert decode_basic_info(bytes(data)).temps_c == pytest.approx((-40.0, 120.0))


def test_a_failed_cell_channel_is_nan_not_65_volts():
    # 0xFFFF, what many front-ends send for a channel they could not measure, is 65.535 V
    volts = decode_cell_voltages(bytes.fromhex("0CE4 FFFF 1194 0000"))
    assert volts[0] == pytest.approx(3.3) and math.isnan(volts[1])
    assert volts[2] == pytest.approx(4.5)  # an overcharged cell still reads, and trips
    assert volts[3] == 0.0  # a dead cell reads 0 V: under-voltage, not "no reading"


def test_protection_and_fet_bits_become_fault_ids_in_the_documented_order():
    data = bytearray(DOC_BASIC_INFO[4:-3])
    data[16:18] = (1 << 0 | 1 << 10 | 1 << 12).to_bytes(2, "big")  # protection status
    data[20] = 0x02  # charge FET off, discharge FET on
    info = decode_basic_info(bytes(data))
    assert faults_of(info) == (
        "frontend_cell_overvoltage",
        "frontend_short_circuit",
        "frontend_fets_locked",
        "frontend_charge_fet_off",
    )


def test_frames_split_over_reads_complete_when_their_last_byte_arrives():
    reader = FrameReader()
    assert reader.feed(DOC_BASIC_INFO[:5]) == []
    assert reader.feed(DOC_BASIC_INFO[5:-1]) == []
    (response,) = reader.feed(DOC_BASIC_INFO[-1:])
    assert response.register == 0x03 and reader.garbage_bytes == 0


def test_the_reader_resyncs_after_garbage_and_false_starts():
    reader = FrameReader()
    noise = bytes([0x12, 0x77, 0xDD, 0x03, 0x00, 0xF0, 0x99])  # a start byte with a huge length
    responses = reader.feed(noise + CAPTURED_CELLS + b"\x00\xdd" + DOC_BASIC_INFO)
    assert [r.register for r in responses] == [0x04, 0x03]
    assert reader.garbage_bytes == len(noise) + 2


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda f: f[:-3] + bytes([f[-3], (f[-2] + 1) & 0xFF]) + f[-1:],  # checksum off by one
        lambda f: f[:-1] + b"\x78",  # wrong end byte
        lambda f: f[:10] + bytes([f[10] ^ 0x01]) + f[11:],  # a data bit flipped
    ],
    ids=["checksum", "end byte", "bit flip"],
)
def test_a_corrupt_frame_is_counted_and_never_returned(corrupt):
    reader = FrameReader()
    assert reader.feed(corrupt(DOC_BASIC_INFO)) == []
    assert reader.bad_frames == 1
    # the next good frame is read as if nothing happened
    assert [r.register for r in reader.feed(CAPTURED_CELLS)] == [0x04]


def test_an_answer_whose_length_byte_lies_is_no_frame():
    too_long = DOC_BASIC_INFO[:3] + bytes([0x1D]) + DOC_BASIC_INFO[4:]
    reader = FrameReader()
    assert reader.feed(too_long) == []  # waits for two bytes that are not coming
    reader.reset()
    assert reader.feed(CAPTURED_CELLS)[0].register == 0x04


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DOC_BASIC_INFO[4:20], "basic information of 16 bytes"),
        (DOC_BASIC_INFO[4:-5], "for 2 NTCs"),  # the second NTC cut off
    ],
)
def test_basic_information_too_short_for_its_fields_is_refused(data, message):
    with pytest.raises(JbdProtocolError, match=message):
        decode_basic_info(data)


def test_cell_voltages_need_two_bytes_per_cell():
    with pytest.raises(JbdProtocolError, match="two per cell"):
        decode_cell_voltages(b"\x10\x39\x10")
    with pytest.raises(JbdProtocolError):
        decode_cell_voltages(b"")


def test_newer_firmware_extra_bytes_are_ignored():
    (response,) = FrameReader().feed(frame(0x03, DOC_BASIC_INFO[4:-3] + b"\x00\x01\x02\x03"))
    assert decode_basic_info(response.data).temps_c == pytest.approx((20.3, 21.5))


def test_responses_keep_their_register_and_status():
    (response,) = FrameReader().feed(frame(0x05, b"", status=0x80))
    assert response == Response(0x05, 0x80, b"")


# ------------------------------------------------------------------ over a pty

CELLS_V = [3.301, 3.302, 3.303, 3.304]
TEMPS_C = [20.5, 21.0]
TIMEOUT_S = 0.6


@pytest.fixture
def emulator():
    with JbdEmulator(PackState(cell_voltages_v=list(CELLS_V), temps_c=list(TEMPS_C))) as emu:
        yield emu


def jbd_config(make_config, port: str, **options):
    frontend = {
        "backend": "jbd",
        "port": port,
        "poll_period_s": 0.05,
        "response_timeout_s": 0.1,
        "timeout_s": TIMEOUT_S,
        # config/sim.toml's CAN options, which a JBD does not have
        "cell_voltage_timeout_s": None,
        "temperature_timeout_s": None,
        "pack_timeout_s": None,
        **options,
    }
    return load_config(
        make_config({"pack": {"n_cells": 4, "n_temp_sensors": 2}, "frontend": frontend})
    )


@pytest.fixture
def frontend(make_config, emulator):
    config = jbd_config(make_config, emulator.port)
    backend = JbdFrontEnd(config, config.frontend.options)
    yield backend
    backend.close()


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def polls(emulator, register: int) -> int:
    with emulator.lock:
        return emulator.requests.get(register, 0)


def after_polls(emulator, n: int = 3) -> bool:
    """Wait until the front-end has asked for both registers ``n`` more times."""
    start = (polls(emulator, BASIC_INFO), polls(emulator, CELL_VOLTAGES))
    return wait_for(
        lambda: (
            polls(emulator, BASIC_INFO) >= start[0] + n
            and polls(emulator, CELL_VOLTAGES) >= start[1] + n
        )
    )


def all_stale(frontend) -> bool:
    return len(frontend.read(time.monotonic()).stale_groups) == 3


def fresh(frontend):
    m = frontend.read(time.monotonic())
    return m if not m.stale_groups else None


def test_values_arrive_in_units(frontend, emulator):
    assert wait_for(lambda: fresh(frontend) is not None)
    m = frontend.read(time.monotonic())
    assert m.cell_voltage_v == pytest.approx(CELLS_V)
    assert m.cell_temp_c == pytest.approx(TEMPS_C)
    assert m.pack_voltage_v == pytest.approx(sum(CELLS_V), abs=0.006)  # 10 mV resolution
    assert m.current_a == 0.0
    assert math.isnan(m.link_voltage_v) and math.isnan(m.insulation_kohm)
    assert m.frame_errors == 0 and m.frontend_faults == ()
    assert frontend.supports_balancing is False


@pytest.mark.parametrize("current_a", [12.34, -56.78])
def test_current_is_positive_while_charging(frontend, emulator, current_a):
    with emulator.lock:
        emulator.state.current_a = current_a
    assert after_polls(emulator)
    assert frontend.read(time.monotonic()).current_a == pytest.approx(current_a)


def test_silence_makes_every_value_stale(frontend, emulator):
    assert wait_for(lambda: fresh(frontend) is not None)
    emulator.set_fault("silence")
    t_s = time.monotonic()
    assert wait_for(lambda: all_stale(frontend))
    m = frontend.read(time.monotonic())
    assert time.monotonic() - t_s > TIMEOUT_S * 0.9  # values lasted their timeout, not less
    assert set(m.stale_groups) == {"cell_voltage", "temperature", "pack"}
    assert np.isnan(m.cell_voltage_v).all() and np.isnan(m.cell_temp_c).all()
    assert math.isnan(m.current_a) and math.isnan(m.pack_voltage_v)
    assert m.frame_errors == 0 and frontend.stats.timeouts > 0


@pytest.mark.parametrize(
    "fault", ["bad_checksum", "partial", "wrong_length", "short_data", "error_status"]
)
def test_a_bad_answer_never_refreshes_a_value_and_recovery_is_immediate(frontend, emulator, fault):
    assert wait_for(lambda: fresh(frontend) is not None)
    emulator.set_fault(fault)
    with emulator.lock:
        emulator.state.cell_voltages_v = [3.9] * 4  # what the bad answers carry
        emulator.state.current_a = 77.0
    assert wait_for(lambda: all_stale(frontend))
    for _ in range(3):  # the new values never show, and the old ones are not passed off
        m = frontend.read(time.monotonic())
        assert np.isnan(m.cell_voltage_v).all() and math.isnan(m.current_a)
        assert after_polls(emulator, 1)
    assert m.frame_errors > 0
    emulator.set_fault(None)
    assert wait_for(lambda: fresh(frontend) is not None)
    m = frontend.read(time.monotonic())
    assert m.cell_voltage_v == pytest.approx([3.9] * 4) and m.current_a == pytest.approx(77.0)


def test_garbage_before_the_answer_is_skipped(frontend, emulator):
    emulator.set_fault("garbage")
    with emulator.lock:
        emulator.state.cell_voltages_v = [3.6, 3.61, 3.62, 3.63]
    assert after_polls(emulator)
    m = frontend.read(time.monotonic())
    assert m.stale_groups == () and m.cell_voltage_v == pytest.approx([3.6, 3.61, 3.62, 3.63])
    assert frontend.reader.garbage_bytes > 0 and m.frame_errors == 0


def test_one_bad_register_leaves_the_other_fresh(frontend, emulator):
    assert wait_for(lambda: fresh(frontend) is not None)
    emulator.set_fault("bad_checksum", registers={CELL_VOLTAGES})
    assert wait_for(lambda: frontend.read(time.monotonic()).stale_groups)
    assert frontend.read(time.monotonic()).stale_groups == ("cell_voltage",)


def test_a_wrong_cell_count_is_refused_and_reported(frontend, emulator):
    emulator.set_fault("wrong_cell_count")
    assert wait_for(
        lambda: "frontend_config_mismatch" in frontend.read(time.monotonic()).frontend_faults
    )
    assert wait_for(lambda: all_stale(frontend))
    m = frontend.read(time.monotonic())
    assert np.isnan(m.cell_voltage_v).all() and m.frame_errors > 0
    emulator.set_fault(None)
    assert wait_for(lambda: fresh(frontend) is not None)
    assert wait_for(lambda: frontend.read(time.monotonic()).frontend_faults == ())


def test_the_bms_protection_bits_are_reported_while_fresh(frontend, emulator):
    with emulator.lock:
        emulator.state.protection = 1 << 0 | 1 << 9  # cell over-voltage, discharge over-current
        emulator.state.discharge_fet_on = False
    assert after_polls(emulator)
    assert frontend.read(time.monotonic()).frontend_faults == (
        "frontend_cell_overvoltage",
        "frontend_overcurrent_discharge",
        "frontend_discharge_fet_off",
    )
    emulator.set_fault("silence")
    assert wait_for(lambda: frontend.read(time.monotonic()).frontend_faults == ())


def test_impossible_cell_and_ntc_codes_arrive_as_nan(frontend, emulator):
    with emulator.lock:
        emulator.state.cell_voltages_v = [3.3, 65.535, 3.3, 3.3]  # a failed channel: 0xFFFF
        emulator.state.temps_c = [25.0, -273.1]  # a shorted NTC: code 0
    assert after_polls(emulator)
    m = frontend.read(time.monotonic())
    assert m.stale_groups == ()  # the frames were good; the values are not readings
    assert math.isnan(m.cell_voltage_v[1]) and m.cell_voltage_v[0] == pytest.approx(3.3)
    assert math.isnan(m.cell_temp_c[1]) and m.cell_temp_c[0] == pytest.approx(25.0)


def test_a_port_that_vanishes_goes_stale_without_a_crash(frontend, emulator):
    assert wait_for(lambda: fresh(frontend) is not None)
    emulator.close()  # the USB adapter was pulled
    assert wait_for(lambda: frontend.stats.port_errors >= 1)
    assert wait_for(lambda: all_stale(frontend))
    m = frontend.read(time.monotonic())
    assert np.isnan(m.cell_voltage_v).all() and math.isnan(m.current_a)


def test_a_pulled_and_replugged_adapter_is_used_again(make_config, tmp_path):
    """Pulled while the poller waits between polls: its next request starts by flushing the
    input, which on a hung-up tty fails in termios (EIO), not as an OSError. The poller must
    live on, count it, and re-open the port once the adapter is back (udev's stable name, a
    symlink here, then points at the new tty)."""
    port = tmp_path / "ttyJBD"
    first = JbdEmulator(PackState(cell_voltages_v=list(CELLS_V), temps_c=list(TEMPS_C)))
    port.symlink_to(first.port)
    config = jbd_config(make_config, str(port), poll_period_s=0.5, timeout_s=1.0, reopen_max_s=0.5)
    frontend = JbdFrontEnd(config, config.frontend.options)
    second = None
    try:
        assert wait_for(lambda: fresh(frontend) is not None)
        time.sleep(0.2)  # the poll is done; the poller waits for the next one
        first.close()  # the adapter is pulled
        assert wait_for(lambda: frontend.stats.port_errors >= 1)
        time.sleep(0.6)  # a re-open or two fail: nothing there yet
        assert frontend._thread.is_alive()
        second = JbdEmulator(PackState(cell_voltages_v=[3.5] * 4, temps_c=list(TEMPS_C)))
        port.unlink()
        port.symlink_to(second.port)  # plugged in again
        assert wait_for(lambda: (m := fresh(frontend)) is not None and m.cell_voltage_v[0] == 3.5)
        assert frontend._thread.is_alive()
    finally:
        frontend.close()
        first.close()
        if second is not None:
            second.close()


def test_an_unexpected_failure_is_logged_once_and_the_poller_goes_on(
    frontend, emulator, monkeypatch, caplog
):
    assert wait_for(lambda: fresh(frontend) is not None)

    def broken(data):
        raise RuntimeError("a bug in the decoder")

    with caplog.at_level(logging.ERROR, logger="drivers.serial.jbd"):
        monkeypatch.setattr(jbd_module, "decode_basic_info", broken)
        assert wait_for(lambda: frontend.stats.poller_errors >= 5)
        assert frontend._thread.is_alive()
        monkeypatch.undo()
        assert wait_for(lambda: fresh(frontend) is not None)  # re-opened and polling again
    failures = [r for r in caplog.records if "JBD poller failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info  # with its traceback, once
    assert frontend._thread.is_alive()


def test_read_never_waits_for_the_line(frontend, emulator):
    emulator.set_fault("silence")  # the poller now waits out every response timeout
    done = threading.Event()

    def loop():
        for _ in range(200):
            frontend.read(time.monotonic())
        done.set()

    threading.Thread(target=loop, daemon=True).start()
    assert done.wait(timeout=2.0)  # 200 response timeouts would be 20 s


def test_an_absent_port_is_a_clear_error_at_start(make_config, tmp_path):
    config = jbd_config(make_config, str(tmp_path / "ttyUSB9"))
    with pytest.raises(FrontEndError, match="cannot open JBD serial port"):
        JbdFrontEnd(config, config.frontend.options)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timeout_s": 0.2}, "timeout_s must be longer than poll_period_s"),
        ({"baud_rate": 300}, "baud_rate"),
        ({"port": ""}, "port"),
        ({"pack_timeout_s": 0.5}, "unknown option"),
    ],
)
def test_bad_options_are_refused_when_loading(make_config, changes, message):
    port = changes.pop("port", "/dev/ttyUSB0")
    with pytest.raises(ConfigError, match=message):
        jbd_config(make_config, port, **changes)


def test_more_cells_than_a_jbd_carries_are_refused(make_config):
    with pytest.raises(ConfigError, match="at most 32 cells"):
        load_config(
            make_config(
                {
                    "pack": {"n_cells": 33},
                    "frontend": {
                        "backend": "jbd",
                        "port": "/dev/ttyUSB0",
                        "cell_voltage_timeout_s": None,
                        "temperature_timeout_s": None,
                        "pack_timeout_s": None,
                    },
                }
            )
        )
