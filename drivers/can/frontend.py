"""A cell-monitoring front-end on CAN, mapped onto the DBC by its options.

Every quantity is bound to DBC signals by name, written ``Message.Signal``: the cell voltages
and temperatures (each with an optional invalid flag), the pack current, the pack voltage, the
DC-link voltage and the insulation monitor. A per-cell option is either a list of names, one per
cell (or sensor), or one template filled in for each: ``{n}`` is the cell's number counting from
1, and with ``cells_per_module`` (``sensors_per_module``) ``{module}`` and ``{slot}`` are its
module and its place in the module, both counting from 1. So one multiplexed message
(``CMU_CellVoltages.Cell{n}_Voltage``, the default) and one plain message per module
(``CMU{module}_Voltages.Cell{slot}``) are both one line. Every name is checked against the DBC
when the backend opens, with the nearest name the DBC has as a suggestion.

Per message (opendbc's parser does the same): its period is the DBC's ``GenMsgCycleTime`` where
it has one, else ``period_s``; a value older than ``timeout_periods`` periods (or its group's
``*_timeout_s``) is NaN and its group is reported stale. A frame of the wrong length, with a
wrong checksum (the signal the DBC's ``ChecksumAlgorithm`` attribute marks), one cantools cannot
decode, or one that repeats the previous rolling counter (the signal named ``counter_signal``,
in every frame of its message and counted separately for each multiplexer value) or carries
none (its code is outside the counter's range) is dropped and counted, never decoded into
values.
The bus itself is judged by the link (:class:`drivers.can.link.BusHealth`): its faults are
listed in ``Measurement.frontend_faults``.
"""

from __future__ import annotations

import logging
import math
import string
from dataclasses import dataclass, field

import numpy as np
from cantools.database.can import Message
from pydantic import Field, ValidationInfo, field_validator

from bms.backends import FrontEnd
from bms.comms.dbc import DbcCodec, DbcError
from bms.config import BmsConfig
from bms.schema import StrictModel, suggest
from bms.types import (
    CELL_VOLTAGE_GROUP,
    INSULATION_GROUP,
    PACK_GROUP,
    TEMPERATURE_GROUP,
    Measurement,
)
from drivers.can.link import CanBackend, CanLink, FrameChecksum, HealthPolicy, RollingCounter

log = logging.getLogger(__name__)

SignalList = str | list[str]
"""One ``Message.Signal`` template for every cell (or sensor), or an explicit list of names.
In a list of flags, ``""`` is a value without a flag; an optional option set to ``""`` is off
(TOML has no null)."""

TEMPLATE_FIELDS = frozenset({"n", "module", "slot"})


def expand(spec: SignalList, count: int, per_module: int | None) -> list[str | None]:
    """The ``count`` signal names of ``spec``: the list itself (``""`` as None), or the
    template filled in."""
    if isinstance(spec, list):
        return [name or None for name in spec]
    per_module = per_module or 1
    return [
        spec.format(n=i + 1, module=i // per_module + 1, slot=i % per_module + 1)
        for i in range(count)
    ]


def _check_spec(
    spec: SignalList, count: int | None, module_option: str, per_module: int | None, flags: bool
) -> None:
    """A template's fields must be known (and {module}/{slot} need the module size); a list
    must name one signal per cell (a list of ``flags`` may leave some out with ``""``); every
    name is ``Message.Signal``."""
    if isinstance(spec, list):
        if count is not None and len(spec) != count:
            raise ValueError(f"lists {len(spec)} signals for {count}")
        names = [name for name in spec if name or not flags]
    else:
        fields = {name for _, name, _, _ in string.Formatter().parse(spec) if name is not None}
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"unknown template field {{{sorted(unknown)[0]}}} (known: {{n}}, {{module}}, "
                "{slot})"
            )
        if fields & {"module", "slot"} and per_module is None:
            raise ValueError(f"uses {{module}} or {{slot}}: set {module_option}")
        names = expand(spec, 1, per_module)
    for name in names:
        _split(name)


def _split(name: str) -> tuple[str, str]:
    message, dot, signal = name.partition(".")
    if not (dot and message and signal) or "." in signal:
        raise ValueError(f"{name!r} is not Message.Signal")
    return message, signal


PER_CELL_OPTIONS = {
    # option: (count in the validation context, its module-size option, a list of flags?)
    "cell_voltage_signals": ("n_cells", "cells_per_module", False),
    "cell_invalid_signals": ("n_cells", "cells_per_module", True),
    "balancing_signals": ("n_cells", "cells_per_module", False),
    "temperature_signals": ("n_temp_sensors", "sensors_per_module", False),
    "temperature_invalid_signals": ("n_temp_sensors", "sensors_per_module", True),
}


class CanFrontEndOptions(StrictModel):
    """The ``[frontend]`` options of the CAN front-end. Signal names are ``Message.Signal``;
    an optional one set to ``""`` is off."""

    # the module sizes come first: the per-cell options are checked against them
    cells_per_module: int | None = Field(
        None, ge=1, le=1024, description="cells per module, for {module} and {slot}"
    )
    sensors_per_module: int | None = Field(None, ge=1, le=1024)
    cell_voltage_signals: SignalList = "CMU_CellVoltages.Cell{n}_Voltage"
    cell_invalid_signals: SignalList | None = Field(
        "CMU_CellVoltages.Cell{n}_VoltageInvalid",
        description="1 = the cell's voltage is not valid; each in its voltage's frames",
    )
    temperature_signals: SignalList = "CMU_CellTemperatures.Temp{n}"
    temperature_invalid_signals: SignalList | None = "CMU_CellTemperatures.Temp{n}_Invalid"
    pack_current_signal: str = "CMU_PackMeasurements.PackCurrent"
    pack_voltage_signal: str = "CMU_PackMeasurements.PackVoltage"
    link_voltage_signal: str | None = Field(
        "CMU_PackMeasurements.LinkVoltage",
        description='"": not measured (NaN), so a precharge cannot complete',
    )
    insulation_signal: str = Field(
        "IMD_Info.InsulationResistance",
        description="read when [protection] sets insulation thresholds",
    )
    insulation_valid_signal: str | None = Field(
        "IMD_Info.MeasurementValid", description="1 = the reading is valid (not still measuring)"
    )
    counter_signal: str | None = Field(
        "Counter", description="the rolling counter's name, in every message that has one"
    )
    period_s: float = Field(
        0.1, gt=0.0, le=60.0, description="period of a message without GenMsgCycleTime in the DBC"
    )
    timeout_periods: float = Field(
        5.0, ge=1.5, le=1000.0, description="a value older than this many periods is stale"
    )
    cell_voltage_timeout_s: float | None = Field(
        None, gt=0.0, le=60.0, description="none: timeout_periods of each message's period"
    )
    temperature_timeout_s: float | None = Field(None, gt=0.0, le=60.0)
    pack_timeout_s: float | None = Field(None, gt=0.0, le=60.0)
    insulation_timeout_s: float | None = Field(None, gt=0.0, le=60.0)
    balancing_signals: SignalList | None = Field(
        "BMS_BalancingCommand.Balance{n}", description='"": the front-end cannot balance'
    )
    bus_recovery_s: float = Field(
        1.0,
        gt=0.0,
        le=60.0,
        description="a bus fault stays reported until its cause has been gone this long",
    )

    @field_validator(
        "cell_invalid_signals",
        "temperature_invalid_signals",
        "link_voltage_signal",
        "insulation_valid_signal",
        "counter_signal",
        "balancing_signals",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value

    @field_validator(*PER_CELL_OPTIONS)
    @classmethod
    def _per_cell_names(cls, spec: SignalList | None, info: ValidationInfo):
        """Checked against the pack's size from the validation context, where it has one."""
        count_key, module_option, flags = PER_CELL_OPTIONS[info.field_name]
        if spec is not None:
            count = (info.context or {}).get(count_key)
            _check_spec(spec, count, module_option, info.data.get(module_option), flags)
        return spec

    @field_validator(
        "pack_current_signal",
        "pack_voltage_signal",
        "link_voltage_signal",
        "insulation_signal",
        "insulation_valid_signal",
    )
    @classmethod
    def _one_name(cls, name: str | None):
        if name is not None:
            _split(name)
        return name


@dataclass(frozen=True, slots=True)
class _Binding:
    """One signal decoded into slot ``index`` of ``group``; a ``flag`` signal in the same
    frame makes the value NaN unless it reads ``1`` (``flag_means_valid``) or ``0``."""

    signal: str
    group: _Group
    index: int
    flag: str | None = None
    flag_means_valid: bool = False


class _Group:
    """Values of one signal group (``name`` as in ``Measurement.stale_groups``), each with the
    time it was last received and its timeout."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.values = np.full(size, np.nan)
        self.rx_t_s = np.full(size, -np.inf)
        self.timeout_s = np.full(size, np.inf)

    def read(self, t_s: float) -> tuple[np.ndarray, bool]:
        """Return (values with stale ones as NaN, whether any is stale)."""
        stale = (t_s - self.rx_t_s) > self.timeout_s
        return np.where(stale, np.nan, self.values), bool(stale.any())


@dataclass
class FrameStats:
    """Frames the front-end dropped, by reason, and counter jumps (frames lost on the way)."""

    malformed: int = 0
    """Wrong length, or not decodable (an unknown multiplexer value, say)."""
    checksum_errors: int = 0
    counter_repeats: int = 0
    counter_invalid: int = 0
    """The counter's code is "not available" (outside its range): no proof of a new frame."""
    counter_jumps: int = 0

    @property
    def dropped(self) -> int:
        return self.malformed + self.checksum_errors + self.counter_repeats + self.counter_invalid


@dataclass
class _Reader:
    """Everything the front-end takes from one DBC message, and how it checks its frames."""

    message: Message
    checksum: FrameChecksum | None
    counter: str | None
    counter_modulus: int
    mux: str | None
    common: list[_Binding] = field(default_factory=list)
    by_mux: dict[int, list[_Binding]] = field(default_factory=dict)
    counters: dict[int | None, RollingCounter] = field(default_factory=dict)

    def add(self, binding: _Binding) -> None:
        mux_ids = self.message.get_signal_by_name(binding.signal).multiplexer_ids
        if not mux_ids:
            self.common.append(binding)
        for mux_id in mux_ids or ():
            self.by_mux.setdefault(mux_id, []).append(binding)


@dataclass
class _Outgoing:
    """A message the front-end sends: the signal of each cell (by index), its counter."""

    message: Message
    counter: str | None
    counter_modulus: int
    signals: dict[int, str] = field(default_factory=dict)
    count: int = 0


def _names(what: str, spec: SignalList | None, count: int, per_module: int | None):
    """``count`` names from ``spec`` (None for each where there is no spec)."""
    if spec is None:
        return [None] * count
    names = expand(spec, count, per_module)
    if len(names) != count:
        raise DbcError(f"[frontend] {len(names)} signals listed for {count} {what}s")
    return names


def _period_s(message: Message, default_s: float) -> float:
    cycle_time_ms = message.cycle_time
    return cycle_time_ms / 1000.0 if cycle_time_ms else default_s


class CanFrontEnd(CanBackend, FrontEnd):
    """Reads cell voltages, temperatures, pack and insulation measurements from CAN frames as
    the options map them onto the DBC, and commands the cells' bleed resistors."""

    Options = CanFrontEndOptions
    supports_balancing = True

    def __init__(self, config: BmsConfig, options: CanFrontEndOptions):
        self.options = options
        self.stats = FrameStats()
        n_cells = config.pack.n_cells
        n_temps = config.pack.n_temp_sensors
        self.cells = _Group(CELL_VOLTAGE_GROUP, n_cells)
        self.temps = _Group(TEMPERATURE_GROUP, n_temps)
        self.pack = _Group(PACK_GROUP, 3)  # current, pack voltage, link voltage
        self.insulation: _Group | None = None
        if config.protection.insulation_error_kohm is not None:
            self.insulation = _Group(INSULATION_GROUP, 1)
        self._readers: dict[int, _Reader] = {}
        self._bound: list[tuple[_Group, int, Message, str]] = []
        self.link = CanLink.acquire(config)
        with self.link.released_on_error() as link:
            link.health.policy = HealthPolicy(recovery_s=options.bus_recovery_s)
            self._bind_all(link.codec, options)
            self._check_limits_fit(config)
            self._balancing = self._balancing_messages(link.codec, options, n_cells)
        self.supports_balancing = bool(self._balancing)
        self._subscriptions = [
            self.link.subscribe(
                frame_id, self._handler(reader), f"front-end ({reader.message.name})"
            )
            for frame_id, reader in self._readers.items()
        ]

    # ---------------------------------------------------------------- binding to the DBC
    def _bind_all(self, codec: DbcCodec, o: CanFrontEndOptions) -> None:
        per_cell = (
            ("cell", "cell_voltage_signals", o.cell_voltage_signals, "cell_invalid_signals",
             o.cell_invalid_signals, o.cells_per_module, self.cells, o.cell_voltage_timeout_s),
            ("sensor", "temperature_signals", o.temperature_signals,
             "temperature_invalid_signals", o.temperature_invalid_signals, o.sensors_per_module,
             self.temps, o.temperature_timeout_s),
        )  # fmt: skip
        for what, option, spec, flag_option, flag_spec, per_module, group, timeout_s in per_cell:
            count = group.values.size
            names = _names(what, spec, count, per_module)
            flags = _names(what, flag_spec, count, per_module)
            for index, (name, flag) in enumerate(zip(names, flags, strict=True)):
                which = f" ({what} {index + 1})"
                self._bind(
                    codec, option + which, name, group, index, timeout_s, flag_option + which, flag
                )
        pack = (
            ("pack_current_signal", o.pack_current_signal),
            ("pack_voltage_signal", o.pack_voltage_signal),
            ("link_voltage_signal", o.link_voltage_signal),
        )
        for index, (option, name) in enumerate(pack):
            if name is None:  # not measured: NaN, and never stale
                self.pack.rx_t_s[index] = np.inf
                continue
            self._bind(codec, option, name, self.pack, index, o.pack_timeout_s)
        if self.insulation is not None:
            self._bind(
                codec,
                "insulation_signal",
                o.insulation_signal,
                self.insulation,
                0,
                o.insulation_timeout_s,
                "insulation_valid_signal",
                o.insulation_valid_signal,
                flag_means_valid=True,
            )

    def _bind(
        self,
        codec: DbcCodec,
        option: str,
        name: str,
        group: _Group,
        index: int,
        timeout_s: float | None,
        flag_option: str = "",
        flag_name: str | None = None,
        flag_means_valid: bool = False,
    ) -> None:
        """Decode signal ``name`` into slot ``index`` of ``group``; its flag must travel in
        the same frames. Errors name the option (``option``, ``flag_option``)."""
        message, signal = _lookup(codec, option, name)
        flag = None
        if flag_name is not None:
            flag_message, flag = _lookup(codec, flag_option, flag_name)
            flag_mux = flag_message.get_signal_by_name(flag).multiplexer_ids
            value_mux = message.get_signal_by_name(signal).multiplexer_ids
            if flag_message is not message or (flag_mux and flag_mux != value_mux):
                raise DbcError(
                    f"{codec.path}: [frontend] {flag_option}: {flag_name} is not sent in the "
                    f"frames of {name}"
                )
        period_s = _period_s(message, self.options.period_s)
        if timeout_s is not None and timeout_s <= period_s:
            raise DbcError(
                f"[frontend] {option}: the timeout ({timeout_s:g} s) must be longer than "
                f"{message.name}'s period ({period_s:g} s)"
            )
        group.timeout_s[index] = (
            self.options.timeout_periods * period_s if timeout_s is None else timeout_s
        )
        self._reader(message).add(_Binding(signal, group, index, flag, flag_means_valid))
        self._bound.append((group, index, message, signal))

    def _reader(self, message: Message) -> _Reader:
        reader = self._readers.get(message.frame_id)
        if reader is None:
            counter = self.options.counter_signal
            counter_signal = next((s for s in message.signals if s.name == counter), None)
            if counter_signal is not None and counter_signal.multiplexer_ids:
                raise DbcError(
                    f"{self.link.codec.path}: {message.name}.{counter} is multiplexed; a rolling "
                    "counter must be in every frame of its message ([frontend] counter_signal)"
                )
            mux = next((s.name for s in message.signals if s.is_multiplexer), None)
            reader = self._readers[message.frame_id] = _Reader(
                message=message,
                checksum=self.link.encoder.checksum(message),
                counter=None if counter_signal is None else counter,
                counter_modulus=0 if counter_signal is None else 1 << counter_signal.length,
                mux=mux,
            )
        return reader

    def _check_limits_fit(self, config: BmsConfig) -> None:
        """A protection limit at or beyond what a DBC signal can carry could never trip."""
        limits = config.limits
        low_temp = min(limits.temp_low_charge_c.msl, limits.temp_low_discharge_c.msl)
        high_temp = max(limits.temp_high_charge_c.msl, limits.temp_high_discharge_c.msl)
        short_a = config.protection.short_circuit_current_a
        for group, index, message, signal in self._bound:
            if group is self.cells:
                low, high = limits.cell_voltage_low_v.msl, limits.cell_voltage_high_v.msl
            elif group is self.temps:
                low, high = low_temp, high_temp
            elif group is self.pack and index == 0:
                low, high = -short_a, short_a
            else:
                continue
            _check_measurable(message, signal, low, high)

    @staticmethod
    def _balancing_messages(
        codec: DbcCodec, o: CanFrontEndOptions, n_cells: int
    ) -> list[_Outgoing]:
        """Each balancing message with the signal of each cell it carries (none: the
        front-end cannot balance)."""
        names = _names("cell", o.balancing_signals, n_cells, o.cells_per_module)
        messages: dict[str, _Outgoing] = {}
        for index, name in enumerate(names):
            if name is None:
                continue
            message, signal = _lookup(codec, f"balancing_signals (cell {index + 1})", name)
            if message.name not in messages:
                counter = next((s for s in message.signals if s.name == o.counter_signal), None)
                messages[message.name] = _Outgoing(
                    message,
                    None if counter is None else counter.name,
                    0 if counter is None else 1 << counter.length,
                )
            messages[message.name].signals[index] = signal
        return list(messages.values())

    # ---------------------------------------------------------------- frames
    def _handler(self, reader: _Reader):
        codec = self.link.codec
        stats = self.stats
        length = reader.message.length

        def handle(t_s: float, data: bytes) -> None:
            if len(data) != length:
                stats.malformed += 1
                self._log_drop(reader, data, "wrong length", stats.malformed)
                return
            if reader.checksum is not None and not reader.checksum.verify(data):
                stats.checksum_errors += 1
                self._log_drop(reader, data, "wrong checksum", stats.checksum_errors)
                return
            try:
                decoded = codec.decode(reader.message, data)
            except Exception as exc:  # cantools raises several types for malformed frames
                stats.malformed += 1
                self._log_drop(reader, data, str(exc), stats.malformed)
                return
            mux_id = None if reader.mux is None else decoded[reader.mux]
            if reader.counter is not None:
                counter = reader.counters.get(mux_id)
                if counter is None:
                    counter = reader.counters[mux_id] = RollingCounter(reader.counter_modulus)
                jumps, invalid = counter.jumps, counter.invalid
                if not counter.advanced(decoded[reader.counter]):
                    if counter.invalid > invalid:
                        stats.counter_invalid += 1
                        self._log_drop(reader, data, "counter not available", stats.counter_invalid)
                    else:
                        stats.counter_repeats += 1
                        self._log_drop(reader, data, "repeated counter", stats.counter_repeats)
                    return
                stats.counter_jumps += counter.jumps - jumps
            for binding in reader.common:
                _apply(binding, decoded, t_s)
            for binding in reader.by_mux.get(mux_id, ()):
                _apply(binding, decoded, t_s)

        return handle

    @staticmethod
    def _log_drop(reader: _Reader, data: bytes, reason: str, count: int) -> None:
        if count == 1 or count % 1000 == 0:
            name = reader.message.name
            log.warning("dropped %s frame %s: %s (%d so far)", name, data.hex(), reason, count)

    # ---------------------------------------------------------------- FrontEnd
    def balance(self, cells: np.ndarray) -> None:
        for out in self._balancing:
            values: dict[str, float] = {signal.name: 0 for signal in out.message.signals}
            for index, signal in out.signals.items():
                values[signal] = int(bool(cells[index]))
            if out.counter is not None:
                out.count = (out.count + 1) % out.counter_modulus
                values[out.counter] = out.count
            self.link.send(out.message, values)

    def read(self, t_s: float) -> Measurement:
        self.link.poll(t_s)
        cell_voltage_v, cells_stale = self.cells.read(t_s)
        cell_temp_c, temps_stale = self.temps.read(t_s)
        (current_a, pack_voltage_v, link_voltage_v), pack_stale = self.pack.read(t_s)
        insulation_kohm, insulation_stale = math.nan, False
        if self.insulation is not None:
            (insulation_kohm,), insulation_stale = self.insulation.read(t_s)
        stale = tuple(
            name
            for name, is_stale in (
                (CELL_VOLTAGE_GROUP, cells_stale),
                (TEMPERATURE_GROUP, temps_stale),
                (PACK_GROUP, pack_stale),
                (INSULATION_GROUP, insulation_stale),
            )
            if is_stale
        )
        return Measurement(
            t_s=t_s,
            cell_voltage_v=cell_voltage_v,
            cell_temp_c=cell_temp_c,
            current_a=float(current_a),
            pack_voltage_v=float(pack_voltage_v),
            link_voltage_v=float(link_voltage_v),
            insulation_kohm=float(insulation_kohm),
            stale_groups=stale,
            frame_errors=self.stats.dropped + sum(s.failures for s in self._subscriptions),
            frontend_faults=self.link.health.faults(t_s),
        )


def _apply(binding: _Binding, decoded: dict[str, float], t_s: float) -> None:
    value = decoded[binding.signal]
    if binding.flag is not None:
        flag = decoded.get(binding.flag)
        if (flag == 1) != binding.flag_means_valid:
            value = math.nan
    binding.group.values[binding.index] = value
    binding.group.rx_t_s[binding.index] = t_s


def _lookup(codec: DbcCodec, option: str, name: str) -> tuple[Message, str]:
    """The message and signal ``name`` (``Message.Signal``) refers to; a DbcError naming the
    option, the missing name and the nearest one the DBC has if it is not there."""
    message_name, _, signal_name = name.partition(".")
    try:
        message = codec.db.get_message_by_name(message_name)
    except KeyError:
        known = [m.name for m in codec.db.messages]
        raise DbcError(
            f"{codec.path}: [frontend] {option}: no message {message_name!r}"
            f"{suggest(message_name, known)}"
        ) from None
    known = [s.name for s in message.signals]
    if signal_name not in known:
        raise DbcError(
            f"{codec.path}: [frontend] {option}: message {message_name!r} has no signal "
            f"{signal_name!r}{suggest(signal_name, known)}"
        )
    return message, signal_name


def _check_measurable(message, signal_name: str, low_limit: float, high_limit: float) -> None:
    """A protection limit at or beyond what the DBC signal can carry could never trip."""
    signal = message.get_signal_by_name(signal_name)
    if not (signal.minimum < low_limit and high_limit < signal.maximum):
        raise DbcError(
            f"{message.name}.{signal_name} carries {signal.minimum:g}..{signal.maximum:g} "
            f"{signal.unit}: the protection limits {low_limit:g}..{high_limit:g} must lie "
            "strictly inside it, or they could never trip"
        )
