"""A front-end of one or more BQ76952 cell monitors on an I2C bus, with an optional INA228
shunt monitor for the pack current.

All I2C traffic runs on the front-end's own poller thread (a poll of one chip takes a few
milliseconds at 100 kHz); :meth:`Bq76952FrontEnd.read` only copies out the newest values. Every
value keeps the time it was last read successfully: one older than its group's timeout is
NaN and its group is named in ``stale_groups``. A transfer that fails (a NACK, a CRC error, a
bad checksum) makes its values NaN at once, without refreshing their time, so a device that
keeps failing goes stale; failures are counted in ``frame_errors`` and logged once when they
start, then once every ``FAILURE_LOG_INTERVAL_S`` while they last, and once more on recovery.

Chips are listed bottom of the stack first; the cells of the pack are the chips' cell inputs
in that order. The pack voltage is the sum of the chips' stack voltages; the DC-link voltage
(precharge) is one chip's PACK or LD pin, taken against that chip's VSS and so raised by the
stacks of the chips below it, or the INA228's bus voltage. Pack current is the CC2 current of
one chip, or the INA228's, in which case CC2 (if any) is ``redundant_current_a``.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from bms.backends import FrontEnd, FrontEndError
from bms.config import BmsConfig
from bms.schema import StrictModel
from bms.types import CELL_VOLTAGE_GROUP, PACK_GROUP, TEMPERATURE_GROUP, Measurement
from drivers.i2c import bq76952
from drivers.i2c.bq76952 import TEMPERATURE_INPUTS, Bq76952
from drivers.i2c.bus import I2cDevice, I2cError, SMBusLike, open_bus
from drivers.i2c.ina228 import Ina228, Ina228Alerts

log = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_S = 10.0
RECOVERY_LOG_S = 1.0

SAFETY_FAULT_IDS = {
    "COV": "frontend_cell_overvoltage",
    "COVL": "frontend_cell_overvoltage",
    "CUV": "frontend_cell_undervoltage",
    "OCC": "frontend_overcurrent_charge",
    "OCD1": "frontend_overcurrent_discharge",
    "OCD2": "frontend_overcurrent_discharge",
    "OCD3": "frontend_overcurrent_discharge",
    "OCDL": "frontend_overcurrent_discharge",
    "SCD": "frontend_short_circuit",
    "SCDL": "frontend_short_circuit",
    "OTC": "frontend_overtemperature",
    "OTD": "frontend_overtemperature",
    "OTINT": "frontend_overtemperature",
    "OTF": "frontend_overtemperature",
    "UTC": "frontend_undertemperature",
    "UTD": "frontend_undertemperature",
    "UTINT": "frontend_undertemperature",
    "HWDF": "frontend_host_watchdog",
    "PTO": "frontend_precharge_timeout",
}
"""Diagnosis-table fault ids for the BQ76952's Safety Status bits (TRM names)."""
PERMANENT_FAIL_ID = "frontend_permanent_fail"
"""Battery Status PF: the chip has latched a permanent failure."""
INA228_ERROR_IDS = {Ina228Alerts.MEMORY_ERROR: "frontend_current_sensor_fault"}

Thermistor = Literal[tuple(TEMPERATURE_INPUTS)]  # type: ignore[valid-type]


class ChipOptions(StrictModel):
    """One BQ76952 (``[[frontend.chips]]``)."""

    address: int = Field(bq76952.DEFAULT_ADDRESS, ge=0x08, le=0x77, description="7-bit")
    cell_inputs: list[int] = Field(
        default_factory=lambda: list(range(1, 17)),
        min_length=bq76952.MIN_CELLS,
        max_length=bq76952.N_CELL_INPUTS,
        description="the inputs (1..16, VCn - VCn-1) that carry a cell, bottom first",
    )
    thermistors: list[Thermistor] = Field(
        default_factory=list, description="the temperatures that are cell temperatures, in order"
    )
    sense_resistance_mohm: float | None = Field(
        None, gt=0.01, le=100.0, description="write CC Gain for it at start; none: keep it"
    )

    @field_validator("cell_inputs")
    @classmethod
    def _inputs_in_order(cls, inputs: list[int]) -> list[int]:
        if any(not 1 <= n <= bq76952.N_CELL_INPUTS for n in inputs):
            raise ValueError("cell inputs are numbered 1..16")
        if any(b <= a for a, b in itertools.pairwise(inputs)):
            raise ValueError("list each cell input once, bottom (1) first")
        return inputs

    @field_validator("thermistors")
    @classmethod
    def _thermistors_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("each temperature input can be listed once")
        return names


class Ina228Options(StrictModel):
    """The INA228 shunt monitor (``[frontend.ina228]``), the pack current when present."""

    address: int = Field(0x40, ge=0x40, le=0x4F, description="7-bit, set by A0/A1")
    shunt_resistance_ohm: float = Field(gt=0.0, le=10.0)
    max_current_a: float = Field(gt=0.0, le=100000.0, description="its calibration's range")
    invert_current: bool = Field(False, description="charging current flows IN- to IN+")
    averages: Literal[1, 4, 16, 64, 128, 256, 512, 1024] = 4


class Bq76952Options(StrictModel):
    """The ``[frontend]`` section. Cross-checks live in field validators (each sees the
    fields above it), so an error names the option it is about."""

    bus: int = Field(1, ge=0, le=255, description="the N of /dev/i2c-N")
    chips: list[ChipOptions] = Field(min_length=1, max_length=16, description="bottom first")
    crc: bool = Field(False, description="switch the chips to I2C CRC mode at start")
    cc2: bool = Field(True, description="chip cc2_chip measures current on its sense resistor")
    cc2_chip: int = Field(0, ge=0)
    ina228: Ina228Options | None = Field(None, validate_default=True)
    link_voltage: Literal["pack_pin", "ld_pin", "ina228_bus"] = Field(
        "pack_pin", validate_default=True
    )
    link_voltage_chip: int = Field(
        0, ge=0, validate_default=True, description="the chip whose pin sees the DC link"
    )
    fets: Literal["leave", "autonomous"] = Field(
        "leave", description="autonomous: the chips switch their FETs; all off on close"
    )
    balance_adjacent_cells: bool = Field(
        False, description="false: never bleed two neighbouring cells at once (pin current)"
    )
    poll_period_s: float = Field(0.05, ge=0.005, le=10.0)
    cell_voltage_timeout_s: float = Field(0.5, gt=0.0, le=60.0, validate_default=True)
    temperature_timeout_s: float = Field(1.0, gt=0.0, le=60.0, validate_default=True)
    pack_timeout_s: float = Field(0.5, gt=0.0, le=60.0, validate_default=True)
    balancing_timeout_s: float = Field(
        1.0, gt=0.0, le=60.0, description="bleeding stops when balancing commands stop"
    )

    @field_validator("chips")
    @classmethod
    def _chips_fit_the_pack(cls, chips: list[ChipOptions], info: ValidationInfo):
        context = info.context or {}
        n_cells = sum(len(chip.cell_inputs) for chip in chips)
        if context.get("n_cells") not in (None, n_cells):
            raise ValueError(
                f"the chips' cell_inputs list {n_cells} cells, but [pack] n_cells is "
                f"{context['n_cells']}"
            )
        n_temps = sum(len(chip.thermistors) for chip in chips)
        if context.get("n_temp_sensors") not in (None, n_temps):
            raise ValueError(
                f"the chips' thermistors list {n_temps} temperatures, but [pack] "
                f"n_temp_sensors is {context['n_temp_sensors']}"
            )
        addresses = [chip.address for chip in chips]
        if len(set(addresses)) != len(addresses):
            raise ValueError("two chips cannot share an I2C address")
        return chips

    @field_validator("cc2_chip")
    @classmethod
    def _cc2_chip_exists(cls, index: int, info: ValidationInfo) -> int:
        chips = info.data.get("chips")
        if chips is not None and info.data.get("cc2") and index >= len(chips):
            raise ValueError(f"cc2_chip {index} is not a chip (0..{len(chips) - 1})")
        return index

    @field_validator("ina228")
    @classmethod
    def _a_current_source(cls, ina228: Ina228Options | None, info: ValidationInfo):
        if ina228 is None and info.data.get("cc2") is False:
            raise ValueError("no pack current: add [frontend.ina228] or set cc2 = true")
        chips = info.data.get("chips") or []
        if ina228 is not None and ina228.address in {chip.address for chip in chips}:
            raise ValueError("the INA228 and a BQ76952 cannot share an I2C address")
        return ina228

    @field_validator("link_voltage")
    @classmethod
    def _link_source(cls, source: str, info: ValidationInfo) -> str:
        if source == "ina228_bus" and "ina228" in info.data and info.data["ina228"] is None:
            raise ValueError("link_voltage 'ina228_bus' needs [frontend.ina228]")
        return source

    @field_validator("link_voltage_chip")
    @classmethod
    def _link_chip_exists(cls, index: int, info: ValidationInfo) -> int:
        chips = info.data.get("chips")
        pin = info.data.get("link_voltage") != "ina228_bus"
        if chips is not None and pin and index >= len(chips):
            raise ValueError(f"link_voltage_chip {index} is not a chip")
        return index

    @field_validator("cell_voltage_timeout_s", "temperature_timeout_s", "pack_timeout_s")
    @classmethod
    def _longer_than_a_poll(cls, timeout_s: float, info: ValidationInfo) -> float:
        period_s = info.data.get("poll_period_s")
        if period_s is not None and timeout_s <= period_s:
            raise ValueError(f"must be longer than poll_period_s ({period_s:g} s)")
        return timeout_s

    @property
    def cc2_redundant(self) -> bool:
        """CC2 is the second current sensor beside the INA228."""
        return self.cc2 and self.ina228 is not None


class _Signals:
    """Values with the time each was last read successfully (monotonic s)."""

    def __init__(self, n: int):
        self.values = np.full(n, np.nan)
        self.rx_t_s = np.full(n, -np.inf)

    def put(self, index, values, t_s: float) -> None:
        self.values[index] = values
        self.rx_t_s[index] = t_s

    def invalidate(self, index) -> None:
        """A failed read: the values are unknown now, and no fresher than before."""
        self.values[index] = np.nan

    def read(self, t_s: float, timeout_s: float) -> tuple[np.ndarray, bool]:
        stale = (t_s - self.rx_t_s) > timeout_s
        return np.where(stale, np.nan, self.values), bool(stale.any())


class _Failures:
    """Counts failed transfers per device and logs them without flooding: a failure is
    logged at once, later ones at most every FAILURE_LOG_INTERVAL_S with their count, and a
    device that has been clean for RECOVERY_LOG_S is logged as answering again."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.total = 0
        self._unreported: dict[str, int] = {}
        self._logged_s: dict[str, float] = {}
        self._failed_s: dict[str, float] = {}

    def failed(self, source: str, what: str, exc: Exception) -> None:
        self.total += 1
        now_s = self.clock()
        self._unreported[source] = self._unreported.get(source, 0) + 1
        self._failed_s[source] = now_s
        logged_s = self._logged_s.get(source)
        if logged_s is None or now_s - logged_s >= FAILURE_LOG_INTERVAL_S:
            count = self._unreported.pop(source)
            since = "" if logged_s is None else f" ({count} failures in {now_s - logged_s:.0f} s)"
            log.warning("%s: %s failed%s: %s", source, what, since, exc)
            self._logged_s[source] = now_s

    def ok(self, source: str) -> None:
        failed_s = self._failed_s.get(source)
        if failed_s is not None and self.clock() - failed_s >= RECOVERY_LOG_S:
            count = self._unreported.pop(source, 0)
            log.info(
                "%s answers again%s",
                source,
                f" ({count} failures since the last report)" if count else "",
            )
            del self._failed_s[source]
            self._logged_s.pop(source, None)


class _Chip:
    """One BQ76952 and where its values go in the pack."""

    def __init__(self, driver: Bq76952, options: ChipOptions, first_cell: int, first_temp: int):
        self.driver = driver
        self.inputs = np.array(options.cell_inputs) - 1
        self.cells = slice(first_cell, first_cell + len(options.cell_inputs))
        self.temp_inputs = [TEMPERATURE_INPUTS.index(name) for name in options.thermistors]
        self.temps = slice(first_temp, first_temp + len(options.thermistors))
        self.name = str(driver)
        self.applied_mask: int | None = None
        self.faults: tuple[str, ...] = ()
        self.pack: bq76952.PackReading | None = None


class Bq76952FrontEnd(FrontEnd):
    """Cell voltages, temperatures, pack voltage and current from BQ76952 chips (and an
    INA228), polled on a thread; cell balancing through CB_ACTIVE_CELLS.

    ``bus_factory`` opens the bus from its number (smbus2 by default; tests pass an
    emulator). ``clock`` is the monotonic clock the samples are stamped with.
    """

    Options = Bq76952Options
    supports_balancing = True

    def __init__(
        self,
        config: BmsConfig,
        options: Bq76952Options,
        *,
        bus_factory: Callable[[int], SMBusLike] = open_bus,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.options = options
        self.clock = clock
        self.n_cells = config.pack.n_cells
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failures = _Failures(clock)
        self.chips: list[_Chip] = []
        self.bus = bus_factory(options.bus)
        try:
            self._open(config)
        except BaseException:
            self._switch_off()
            self.bus.close()
            raise
        self._thread = threading.Thread(target=self._run, name="bq76952-poller", daemon=True)
        self._thread.start()

    # -- start-up ------------------------------------------------------------------------

    def _open(self, config: BmsConfig) -> None:
        options = self.options
        first_cell = first_temp = 0
        for chip_options in options.chips:
            driver = Bq76952(I2cDevice(self.bus, chip_options.address, options.bus))
            chip = _Chip(driver, chip_options, first_cell, first_temp)
            self._start_chip(chip, chip_options, config)
            self.chips.append(chip)
            first_cell, first_temp = chip.cells.stop, chip.temps.stop
        self.ina228: Ina228 | None = None
        if options.ina228 is not None:
            self.ina228 = self._start_ina228(options.ina228, config)
        self._pack_names = ["pack_voltage_v", "current_a"]
        if options.cc2_redundant:
            self._pack_names.append("redundant_current_a")
        if options.link_voltage != "ina228_bus" or options.ina228 is not None:
            self._pack_names.append("link_voltage_v")
        self._pack_names += [f"status{k}" for k in range(len(self.chips))]
        self._pack_index = {name: i for i, name in enumerate(self._pack_names)}
        self._cells = _Signals(self.n_cells)
        self._temps = _Signals(config.pack.n_temp_sensors)
        self._pack = _Signals(len(self._pack_names))
        self._ina_faults: tuple[str, ...] = ()
        self._balance_cells = np.zeros(self.n_cells, dtype=bool)
        self._balance_t_s = -math.inf
        self._balancing_timed_out = True

    def _start_chip(self, chip: _Chip, chip_options: ChipOptions, config: BmsConfig) -> None:
        driver = chip.driver
        if driver.detect_crc() and not self.options.crc:
            log.info("%s is in I2C CRC mode; using it", driver)
        driver.check_identity()
        _, firmware, build = driver.firmware_version()
        log.info(
            "%s: firmware 0x%04x build 0x%04x, hardware 0x%04x",
            driver,
            firmware,
            build,
            driver.hardware_version(),
        )
        units = driver.read_units()
        limits = config.limits
        top_v = len(chip_options.cell_inputs) * limits.cell_voltage_high_v.msl
        if top_v >= units.voltage_full_scale_v:
            raise FrontEndError(
                f"{driver}: its stack of up to {top_v:g} V does not fit userV "
                f"({units.voltage_v * 1000:g} mV, up to {units.voltage_full_scale_v:g} V); "
                "set DA Configuration USER_VOLTS_CV"
            )
        if self.options.cc2 and len(self.chips) == self.options.cc2_chip:
            self._check_cc2_range(driver, units, config)
        driver.configure(
            chip_options.cell_inputs,
            crc=self.options.crc,
            sense_resistance_mohm=chip_options.sense_resistance_mohm,
        )
        driver.set_active_cells(0)
        chip.applied_mask = 0
        if self.options.fets == "autonomous":
            driver.set_autonomous_fets(True)
            driver.all_fets_on()

    def _check_cc2_range(
        self, driver: Bq76952, units: bq76952.UserUnits, config: BmsConfig
    ) -> None:
        """CC2 as the pack current must reach the short-circuit current, or a short could
        never trip; as the redundant current, the limit set's highest, or every large
        current would look like a sensor mismatch."""
        full_scale_a = units.current_full_scale_a
        if self.options.ina228 is None:
            needed_a, what = config.protection.short_circuit_current_a, "short_circuit_current_a"
            consequence = "could never trip"
        else:
            limits = config.limits
            highest_a = max(limits.charge_current_a.msl, limits.discharge_current_a.msl)
            needed_a, what = highest_a * config.pack.n_parallel, "the limit set's highest current"
            consequence = "would saturate the redundant current"
        if needed_a >= full_scale_a:
            raise FrontEndError(
                f"{driver}: CC2 reads up to {full_scale_a:g} A in userA of "
                f"{units.current_a * 1000:g} mA, so {what} {needed_a:g} A {consequence}; "
                "set DA Configuration USER_AMPS to a larger unit"
            )

    def _start_ina228(self, options: Ina228Options, config: BmsConfig) -> Ina228:
        short_a = config.protection.short_circuit_current_a
        if options.max_current_a <= short_a:
            raise FrontEndError(
                f"[frontend.ina228] max_current_a {options.max_current_a:g} A must be above "
                f"short_circuit_current_a {short_a:g} A, or a short could never be seen"
            )
        try:
            ina = Ina228(
                self.bus,
                options.address,
                options.shunt_resistance_ohm,
                options.max_current_a,
                options.invert_current,
                averages=options.averages,
                bus_number=self.options.bus,
            )
        except ValueError as exc:
            raise FrontEndError(f"[frontend.ina228]: {exc}") from None
        ina.check_identity()
        ina.configure()
        ina.set_alert_limits(current_high_a=short_a, current_low_a=-short_a)
        return ina

    # -- the poller ----------------------------------------------------------------------

    def _run(self) -> None:
        next_s = self.clock()
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception:
                # A bug, not a bus fault: the values go stale, which the loop sees.
                self.failures.total += 1
                log.exception("BQ76952 poller failed")
            next_s += self.options.poll_period_s
            delay_s = next_s - self.clock()
            if delay_s < 0.0:
                next_s, delay_s = self.clock(), 0.0
            self._stop.wait(delay_s)

    def _attempt(self, source: str, what: str, read: Callable[[], object]) -> object | None:
        """``read()``, or None when it fails (counted and logged for ``source``)."""
        try:
            value = read()
        except I2cError as exc:
            self.failures.failed(source, what, exc)
            return None
        self.failures.ok(source)
        return value

    def _poll(self) -> None:
        stacks: list[float] = []
        for k, chip in enumerate(self.chips):
            driver = chip.driver
            cells = self._attempt(chip.name, "cell voltages", driver.read_cell_voltages_v)
            temps = None
            if chip.temp_inputs:
                temps = self._attempt(chip.name, "temperatures", driver.read_temperatures_c)
            pack = self._attempt(chip.name, "stack and current", driver.read_pack)
            safety = self._attempt(chip.name, "safety status", driver.read_safety)
            status = None
            if safety is not None:
                status = self._attempt(chip.name, "battery status", driver.battery_status)
            now_s = self.clock()
            with self._lock:
                if cells is None:
                    self._cells.invalidate(chip.cells)
                else:
                    self._cells.put(chip.cells, cells[chip.inputs], now_s)
                if chip.temp_inputs:
                    if temps is None:
                        self._temps.invalidate(chip.temps)
                    else:
                        self._temps.put(chip.temps, temps[chip.temp_inputs], now_s)
                chip.pack = pack
                status_index = self._pack_index[f"status{k}"]
                if status is None:
                    self._pack.invalidate(status_index)
                    chip.faults = ()
                else:
                    self._pack.put(status_index, 0.0, now_s)
                    faults = [SAFETY_FAULT_IDS[name] for name in safety.faults]
                    if status & bq76952.BS_PF:
                        faults.append(PERMANENT_FAIL_ID)
                    chip.faults = tuple(dict.fromkeys(faults))
            stacks.append(math.nan if pack is None else pack.stack_v)
        ina = None
        if self.ina228 is not None:
            ina = self._attempt(str(self.ina228), "current", self.ina228.read)
        self._put_pack(stacks, ina)
        self._balance()

    def _put_pack(self, stacks: list[float], ina) -> None:
        options = self.options
        values: dict[str, float] = {"pack_voltage_v": float(np.sum(stacks))}
        cc2_a = math.nan
        if options.cc2:
            pack = self.chips[options.cc2_chip].pack
            cc2_a = math.nan if pack is None else pack.cc2_current_a
        ina_a = ina_bus_v = math.nan
        ina_faults: tuple[str, ...] = ()
        if ina is not None:
            ina_a, ina_bus_v = ina.current_a, ina.bus_voltage_v
            ina_faults = tuple(name for flag, name in INA228_ERROR_IDS.items() if ina.alerts & flag)
            if ina_faults:
                ina_a = math.nan
        if self.ina228 is not None:
            values["current_a"] = ina_a
            values["redundant_current_a"] = cc2_a
        else:
            values["current_a"] = cc2_a
        if options.link_voltage == "ina228_bus":
            values["link_voltage_v"] = ina_bus_v
        else:
            pack = self.chips[options.link_voltage_chip].pack
            pin_v = math.nan
            if pack is not None:
                pin_v = pack.pack_pin_v if options.link_voltage == "pack_pin" else pack.ld_pin_v
            values["link_voltage_v"] = pin_v + float(np.sum(stacks[: options.link_voltage_chip]))
        now_s = self.clock()
        with self._lock:
            self._ina_faults = ina_faults
            for name, value in values.items():
                index = self._pack_index.get(name)
                if index is None:
                    continue
                if math.isnan(value):
                    self._pack.invalidate(index)
                else:
                    self._pack.put(index, value, now_s)

    def _chip_mask(self, chip: _Chip, wanted: np.ndarray) -> int:
        """CB_ACTIVE_CELLS for the chip's cells in ``wanted`` (pack order, bottom first)."""
        mask = 0
        previous = False
        for cell_input, bleed in zip(chip.inputs, wanted[chip.cells], strict=True):
            bleed = bool(bleed) and (self.options.balance_adjacent_cells or not previous)
            if bleed:
                mask |= 1 << int(cell_input)
            previous = bleed
        return mask

    def _balance(self) -> None:
        with self._lock:
            wanted = self._balance_cells.copy()
            age_s = self.clock() - self._balance_t_s
        timed_out = age_s > self.options.balancing_timeout_s
        if timed_out:
            if not self._balancing_timed_out and wanted.any():
                log.warning("no balancing command for %.1f s: bleeding stopped", age_s)
            wanted[:] = False
        self._balancing_timed_out = timed_out
        for chip in self.chips:
            mask = self._chip_mask(chip, wanted)
            if mask == chip.applied_mask:
                continue
            chip.applied_mask = None  # unknown until the device confirms it

            def apply(driver: Bq76952 = chip.driver, mask: int = mask) -> bool:
                driver.set_active_cells(mask)  # reads it back
                return True

            if self._attempt(chip.name, "balancing", apply):
                chip.applied_mask = mask

    # -- the loop's side -------------------------------------------------------------------

    def balance(self, cells: np.ndarray) -> None:
        with self._lock:
            self._balance_cells = np.asarray(cells, dtype=bool).copy()
            self._balance_t_s = self.clock()

    def read(self, t_s: float) -> Measurement:
        options = self.options
        with self._lock:
            cells, cells_stale = self._cells.read(t_s, options.cell_voltage_timeout_s)
            temps, temps_stale = self._temps.read(t_s, options.temperature_timeout_s)
            pack, pack_stale = self._pack.read(t_s, options.pack_timeout_s)
            faults = [
                fault
                for k, chip in enumerate(self.chips)
                if not math.isnan(pack[self._pack_index[f"status{k}"]])
                for fault in chip.faults
            ]
            faults += self._ina_faults
            errors = self.failures.total

        def signal(name: str) -> float:
            index = self._pack_index.get(name)
            return math.nan if index is None else float(pack[index])

        stale = tuple(
            name
            for name, is_stale in (
                (CELL_VOLTAGE_GROUP, cells_stale),
                (TEMPERATURE_GROUP, temps_stale),
                (PACK_GROUP, pack_stale),
            )
            if is_stale
        )
        return Measurement(
            t_s=t_s,
            cell_voltage_v=cells,
            cell_temp_c=temps,
            current_a=signal("current_a"),
            pack_voltage_v=signal("pack_voltage_v"),
            link_voltage_v=signal("link_voltage_v"),
            redundant_current_a=signal("redundant_current_a"),
            stale_groups=stale,
            frame_errors=errors,
            frontend_faults=tuple(dict.fromkeys(faults)),
        )

    def close(self) -> None:
        """Stop the poller, switch balancing off (and the FETs, when the chips drive them),
        close the bus. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._switch_off()
        self.bus.close()

    def _switch_off(self) -> None:
        for chip in self.chips:
            try:
                chip.driver.set_active_cells(0)
                if self.options.fets == "autonomous":
                    chip.driver.all_fets_off()
            except I2cError as exc:
                log.warning("%s: could not switch off: %s", chip.name, exc)
