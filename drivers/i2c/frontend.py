"""A front-end of one or more BQ76952 cell monitors on an I2C bus, with an optional INA228
shunt monitor for the pack current.

All I2C traffic runs on the front-end's own poller thread (a poll of one chip takes a few
milliseconds at 100 kHz); :meth:`Bq76952FrontEnd.read` only copies out the newest values. Every
value keeps the time it was last read successfully: one older than its group's timeout is
NaN and its group is named in ``stale_groups``. A transfer that fails (a NACK, a CRC error, a
bad checksum) makes its values NaN at once, without refreshing their time, so a device that
keeps failing goes stale; failures are counted in ``frame_errors`` and logged once when they
start, then once every ``FAILURE_LOG_INTERVAL_S`` while they last, and once more on recovery.

Every poll of a chip starts with its status (Safety Status and Battery Status, one transfer),
which says whether the codes that follow are this poll's measurements (BQ76952 TRM):

- CONFIG_UPDATE (measurements and protections stopped) or POR (a reset: Vcell Mode and the CC
  gain back at their defaults): the chip's values are NaN, ``frontend_device_error`` is
  listed, and the chip is configured again (taken out of CONFIG_UPDATE, its settings written,
  SLEEP disallowed) until that succeeds;
- SLEEP (measurements only every few seconds): the chip's values are not refreshed, so they
  age to stale; SLEEP allowed again (a partial reset) is disallowed again.

The status has a freshness of its own: the chip's own faults (Safety Status, Battery Status
PF) stay listed while the status that reported them is younger than ``status_timeout_s``, and a
chip whose status is older is ``frontend_device_error``, never a silent "no faults". The INA228
reads back its calibration with every reading: a chip that lost it (a reset) gives no current
and ``frontend_current_sensor_fault`` until it is configured again; its shunt-voltage limits
(at the short-circuit current) are ``frontend_short_circuit``.

Chips are listed bottom of the stack first; the cells of the pack are the chips' cell inputs
in that order. The pack voltage is the sum of the chips' stack voltages; the DC-link voltage
(precharge) is one chip's PACK or LD pin, taken against that chip's VSS and so raised by the
stacks of the chips below it, or the INA228's bus voltage. Pack current is the CC2 current of
one chip, or the INA228's, in which case CC2 (if any) is ``redundant_current_a``.
"""

from __future__ import annotations

import functools
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
DEVICE_ERROR_ID = "frontend_device_error"
"""A chip whose measurements cannot be trusted: in CONFIG_UPDATE, reset and not yet configured
again, or its status unread for longer than ``status_timeout_s``."""
CURRENT_SENSOR_FAULT_ID = "frontend_current_sensor_fault"
INA228_ALERT_IDS = {
    Ina228Alerts.MEMORY_ERROR: CURRENT_SENSOR_FAULT_ID,
    Ina228Alerts.SHUNT_OVER: "frontend_short_circuit",  # the limits are the short circuit's
    Ina228Alerts.SHUNT_UNDER: "frontend_short_circuit",
}

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
    status_timeout_s: float = Field(
        0.5,
        gt=0.0,
        le=60.0,
        validate_default=True,
        description="a chip's faults last this long after its status was read; an older "
        "status is a device error",
    )
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

    @field_validator(
        "cell_voltage_timeout_s", "temperature_timeout_s", "pack_timeout_s", "status_timeout_s"
    )
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

    def failed(self, source: str, what: str, exc: Exception, traceback: bool = False) -> None:
        """Count a failure; ``traceback`` (a bug rather than the bus) logs it as an error,
        with its traceback the first time."""
        self.total += 1
        now_s = self.clock()
        self._unreported[source] = self._unreported.get(source, 0) + 1
        self._failed_s[source] = now_s
        logged_s = self._logged_s.get(source)
        if logged_s is None or now_s - logged_s >= FAILURE_LOG_INTERVAL_S:
            count = self._unreported.pop(source)
            since = "" if logged_s is None else f" ({count} failures in {now_s - logged_s:.0f} s)"
            level = logging.ERROR if traceback else logging.WARNING
            first = traceback and logged_s is None
            log.log(level, "%s: %s failed%s: %s", source, what, since, exc, exc_info=first)
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
    """One BQ76952, where its values go in the pack, and what the poller knows of it."""

    def __init__(
        self,
        driver: Bq76952,
        options: ChipOptions,
        index: int,
        first_cell: int,
        first_temp: int,
    ):
        self.driver = driver
        self.options = options
        self.index = index
        self.inputs = np.array(options.cell_inputs) - 1
        self.cells = slice(first_cell, first_cell + len(options.cell_inputs))
        self.temp_inputs = [TEMPERATURE_INPUTS.index(name) for name in options.thermistors]
        self.temps = slice(first_temp, first_temp + len(options.thermistors))
        self.name = str(driver)
        self.applied_mask: int | None = None
        self.configured = False
        """Its settings hold (set at start, lost with CONFIG_UPDATE or POR until restored)."""
        self.answering = False
        """Its status was read in this poll: commands may be sent to it."""
        self.faults: tuple[str, ...] = ()
        """Its own faults, from the last status read (at ``status_t_s``)."""
        self.status_t_s = -math.inf
        self.pack: bq76952.PackReading | None = None
        self.pack_t_s = -math.inf
        self.reconfigurations = 0


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
        self.config = config
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
        for index, chip_options in enumerate(options.chips):
            driver = Bq76952(I2cDevice(self.bus, chip_options.address, options.bus))
            chip = _Chip(driver, chip_options, index, first_cell, first_temp)
            self._start_chip(chip)
            self.chips.append(chip)
            first_cell, first_temp = chip.cells.stop, chip.temps.stop
        self.ina228: Ina228 | None = None
        self._ina_status_t_s = -math.inf
        self._ina_faults: tuple[str, ...] = ()
        self._ina_lost = False
        if options.ina228 is not None:
            self.ina228 = self._start_ina228(options.ina228, config)
        self._pack_names = ["pack_voltage_v", "current_a", "link_voltage_v"]
        if options.cc2_redundant:
            self._pack_names.append("redundant_current_a")
        self._pack_index = {name: i for i, name in enumerate(self._pack_names)}
        self._cells = _Signals(self.n_cells)
        self._temps = _Signals(config.pack.n_temp_sensors)
        self._pack = _Signals(len(self._pack_names))
        self._balance_cells = np.zeros(self.n_cells, dtype=bool)
        self._balance_t_s = -math.inf
        self._balancing_timed_out = True

    def _start_chip(self, chip: _Chip) -> None:
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
        if driver.battery_status() & bq76952.BS_CFGUPDATE:
            log.warning(
                "%s was left in CONFIG_UPDATE mode (a host stopped while configuring it), with "
                "its measurements and protections stopped: leaving it",
                driver,
            )
        self._configure_chip(chip)

    def _configure_chip(self, chip: _Chip) -> None:
        """Bring a chip into the state the poller relies on, at start and after it lost it:
        out of CONFIG_UPDATE, its user units checked, its settings written (which clears POR),
        SLEEP disallowed, no bleeding, and its FETs as configured."""
        driver = chip.driver
        if driver.battery_status() & bq76952.BS_CFGUPDATE:
            driver.exit_config_update()
        units = driver.read_units()
        limits = self.config.limits
        top_v = len(chip.options.cell_inputs) * limits.cell_voltage_high_v.msl
        if top_v >= units.voltage_full_scale_v:
            raise FrontEndError(
                f"{driver}: its stack of up to {top_v:g} V does not fit userV "
                f"({units.voltage_v * 1000:g} mV, up to {units.voltage_full_scale_v:g} V); "
                "set DA Configuration USER_VOLTS_CV"
            )
        if self.options.cc2 and chip.index == self.options.cc2_chip:
            self._check_cc2_range(driver, units, self.config)
        driver.configure(
            chip.options.cell_inputs,
            crc=self.options.crc,
            sense_resistance_mohm=chip.options.sense_resistance_mohm,
        )
        driver.disable_sleep()
        chip.applied_mask = None  # unknown until the device confirms it
        driver.set_active_cells(0)
        chip.applied_mask = 0
        if self.options.fets == "autonomous":
            driver.set_autonomous_fets(True)
            driver.all_fets_on()
        chip.configured = True

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
        self._configure_ina228(ina)
        return ina

    def _configure_ina228(self, ina: Ina228) -> None:
        """Calibration and the shunt limits at +-short_circuit_current_a (at start and after
        a reset lost them)."""
        short_a = self.config.protection.short_circuit_current_a
        ina.configure()
        ina.set_alert_limits(current_high_a=short_a, current_low_a=-short_a)

    # -- the poller ----------------------------------------------------------------------

    def _run(self) -> None:
        next_s = self.clock()
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception as exc:
                # A bug, not a bus fault: the values go stale, which the loop sees.
                self.failures.failed("BQ76952 poller", "a poll", exc, traceback=True)
            next_s += self.options.poll_period_s
            delay_s = next_s - self.clock()
            if delay_s < 0.0:
                next_s, delay_s = self.clock(), 0.0
            self._stop.wait(delay_s)

    def _attempt(self, source: str, what: str, read: Callable[[], object]) -> object | None:
        """``read()``, or None when it fails (counted and logged for ``source``): a transfer
        or device error, or a chip found unfit for the pack (FrontEndError)."""
        try:
            value = read()
        except FrontEndError as exc:
            self.failures.failed(source, what, exc)
            return None
        self.failures.ok(source)
        return value

    def _done(self, source: str, what: str, action: Callable[[], None]) -> bool:
        """``action()``; False when it fails (counted and logged as :meth:`_attempt` does)."""

        def run() -> bool:
            action()
            return True

        return self._attempt(source, what, run) is True

    def _poll(self) -> None:
        for chip in self.chips:
            self._poll_chip(chip)
        ina = None
        ina_t_s = -math.inf
        if self.ina228 is not None:
            ina = self._poll_ina228()
            if ina is not None:
                ina_t_s = self.clock()
        self._put_pack(ina, ina_t_s)
        self._balance()

    def _poll_chip(self, chip: _Chip) -> None:
        """Status first; then the measurements, if the status says they are this poll's."""
        driver = chip.driver
        status = self._attempt(chip.name, "status", driver.read_status)
        chip.answering = status is not None
        if status is None:
            self._drop(chip)  # unknown: the chip may be reset, asleep or in CONFIG_UPDATE
            return
        with self._lock:
            faults = [SAFETY_FAULT_IDS[name] for name in status.safety.faults]
            if status.battery & bq76952.BS_PF:
                faults.append(PERMANENT_FAIL_ID)
            chip.faults = tuple(dict.fromkeys(faults))
            chip.status_t_s = self.clock()
        lost = status.battery & (bq76952.BS_CFGUPDATE | bq76952.BS_POR)
        if lost or not chip.configured:
            if chip.configured:
                what = "is in CONFIG_UPDATE mode" if lost & bq76952.BS_CFGUPDATE else "was reset"
                log.warning(
                    "%s %s: its values are invalid until it is configured again", chip.name, what
                )
            chip.configured = False
            self._drop(chip)
            if self._done(chip.name, "configuration", lambda: self._configure_chip(chip)):
                chip.reconfigurations += 1
                log.warning("%s configured again", chip.name)
            return  # the measurements resume after this poll
        sleep_allowed = status.battery & bq76952.BS_SLEEP_EN  # a reset we missed, a glitch
        if sleep_allowed and self._done(chip.name, "SLEEP_DISABLE", driver.disable_sleep):
            log.info("%s: SLEEP was allowed again; disallowed", chip.name)
        if status.battery & bq76952.BS_SLEEP:
            return  # the codes are those of its last measurement, seconds ago: not refreshed
        cells = self._attempt(chip.name, "cell voltages", driver.read_cell_voltages_v)
        temps = None
        if chip.temp_inputs:
            temps = self._attempt(chip.name, "temperatures", driver.read_temperatures_c)
        pack = self._attempt(chip.name, "stack and current", driver.read_pack)
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
            chip.pack_t_s = now_s

    def _drop(self, chip: _Chip) -> None:
        """The chip's measurements are not to be believed: NaN at once, not refreshed."""
        with self._lock:
            self._cells.invalidate(chip.cells)
            if chip.temp_inputs:
                self._temps.invalidate(chip.temps)
            chip.pack = None

    def _poll_ina228(self):
        """One INA228 reading; a chip that lost its calibration gives no current and is
        configured again."""
        ina = self.ina228
        reading = self._attempt(str(ina), "current", ina.read)
        if reading is None:
            return None
        faults = [name for flag, name in INA228_ALERT_IDS.items() if reading.alerts & flag]
        if reading.configuration_lost:
            faults.append(CURRENT_SENSOR_FAULT_ID)
            if not self._ina_lost:
                log.warning("%s lost its configuration (a reset): configuring it again", ina)
            self._ina_lost = True
            self._done(str(ina), "configuration", lambda: self._configure_ina228(ina))
        elif self._ina_lost:
            self._ina_lost = False
            log.warning("%s configured again", ina)
        with self._lock:
            self._ina_faults = tuple(dict.fromkeys(faults))
            self._ina_status_t_s = self.clock()
        return reading

    def _put_pack(self, ina, ina_t_s: float) -> None:
        """The pack values from the chips' last readings, each stamped with the oldest of the
        readings it comes from (a sleeping chip's value ages). Where a reading is missing the
        value is NaN and keeps its old time (it goes stale); a reading that holds no valid
        value (out of range, saturated) gives a NaN of its own time."""
        options = self.options
        chips = self.chips
        pack_v, pack_t_s = _combined(chips, lambda p: p.stack_v)
        values: dict[str, tuple[float, float]] = {"pack_voltage_v": (pack_v, pack_t_s)}
        cc2 = (math.nan, -math.inf)
        if options.cc2:
            cc2 = _combined(
                chips[options.cc2_chip : options.cc2_chip + 1], lambda p: p.cc2_current_a
            )
        ina_a = ina_bus_v = math.nan
        if ina is not None:
            ina_a, ina_bus_v = ina.current_a, ina.bus_voltage_v
            if CURRENT_SENSOR_FAULT_ID in self._ina_faults:
                ina_a = math.nan
        if self.ina228 is not None:
            values["current_a"] = (ina_a, ina_t_s)
            values["redundant_current_a"] = cc2
        else:
            values["current_a"] = cc2
        if options.link_voltage == "ina228_bus":
            values["link_voltage_v"] = (ina_bus_v, ina_t_s)
        else:
            k = options.link_voltage_chip
            pin = "pack_pin_v" if options.link_voltage == "pack_pin" else "ld_pin_v"
            pin_v, pin_t_s = _combined(chips[k : k + 1], lambda p: getattr(p, pin))
            below_v, below_t_s = _combined(chips[:k], lambda p: p.stack_v)
            values["link_voltage_v"] = (pin_v + below_v, min(pin_t_s, below_t_s))
        with self._lock:
            for name, (value, t_s) in values.items():
                index = self._pack_index.get(name)
                if index is None:
                    continue
                if t_s == -math.inf:
                    self._pack.invalidate(index)
                else:
                    self._pack.put(index, value, t_s)

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
            # nothing is written to a chip that did not answer this poll, or whose state is
            # unknown: in another I2C mode than ours, a write's bytes are other commands
            if not (chip.answering and chip.configured):
                continue
            mask = self._chip_mask(chip, wanted)
            if mask == chip.applied_mask:
                continue
            chip.applied_mask = None  # unknown until the device confirms it
            apply = functools.partial(chip.driver.set_active_cells, mask)  # reads it back
            if self._done(chip.name, "balancing", apply):
                chip.applied_mask = mask

    # -- the loop's side -------------------------------------------------------------------

    def balance(self, cells: np.ndarray) -> None:
        with self._lock:
            self._balance_cells = np.asarray(cells, dtype=bool).copy()
            self._balance_t_s = self.clock()

    def read(self, t_s: float) -> Measurement:
        options = self.options
        status_timeout_s = options.status_timeout_s
        with self._lock:
            cells, cells_stale = self._cells.read(t_s, options.cell_voltage_timeout_s)
            temps, temps_stale = self._temps.read(t_s, options.temperature_timeout_s)
            pack, pack_stale = self._pack.read(t_s, options.pack_timeout_s)
            faults: list[str] = []
            for chip in self.chips:
                if t_s - chip.status_t_s > status_timeout_s:
                    faults.append(DEVICE_ERROR_ID)  # its faults are unknown
                    continue
                faults += chip.faults
                if not chip.configured:
                    faults.append(DEVICE_ERROR_ID)
            if self.ina228 is not None:
                if t_s - self._ina_status_t_s > status_timeout_s:
                    faults.append(CURRENT_SENSOR_FAULT_ID)
                else:
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


def _combined(chips: list[_Chip], value: Callable[[bq76952.PackReading], float]):
    """(sum of ``value`` over the chips' last pack readings, the oldest reading's time); NaN
    if a chip has none. No chips: (0, inf), nothing to add and never stale."""
    total, t_s = 0.0, math.inf
    for chip in chips:
        if chip.pack is None:
            return math.nan, -math.inf
        total += value(chip.pack)
        t_s = min(t_s, chip.pack_t_s)
    return total, t_s
