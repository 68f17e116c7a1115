"""The rig config: which instruments at which addresses and how they are wired to the board
under test, the board and its BMS config, the CAN bus, tolerances and budgets.

Validated like the BMS config (bms/schema.py): TOML, every option typed with its unit in its
name and a range, unknown options refused with the nearest valid name, each problem one line
naming the file, the section and the option. Cells and sensors count from 1 here, since a
person writes this file; channels are the instruments' own numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from bms.config import BmsConfig
from bms.schema import (
    ExistingPath,
    RelativePath,
    SchemaError,
    StrictModel,
    load_model,
    read_toml,
)
from hil.instruments.transport import Address

PTY = "pty"
"""A virtual rig's instrument served on a pseudo-terminal, as a serial instrument would be."""

AUTO = "auto"
"""A virtual rig's CAN channel: a multicast group picked for each run."""


class RigConfigError(SchemaError):
    """A rig config that cannot be used; ``problems`` holds one line per problem."""


def _address(text: str, info: ValidationInfo) -> str:
    kind = (info.context or {}).get("kind")
    if text == PTY:
        if kind == "bench":
            raise ValueError("'pty' is for a virtual rig's instruments; a bench names a device")
        return text
    address = Address.parse(text)  # ValueError with the reason
    if kind == "bench" and address.scheme == "tcp" and address.port == 0:
        raise ValueError("port 0 (any free port) is for a virtual rig; name the instrument's port")
    return text


InstrumentAddress = Annotated[str, AfterValidator(_address)]
Channel = Annotated[int, Field(ge=0, le=9999)]


class RigSection(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["virtual", "bench"]
    lock_file: RelativePath | None = Field(
        None,
        description="held for the whole run so two runs never share the rig; none: "
        "/tmp/pybms-hil-NAME.lock on a bench, a file of the run's own on a virtual rig",
    )
    test_timeout_s: float = Field(120.0, gt=0.0, le=3600.0, description="per test phase")
    io_timeout_s: float = Field(2.0, gt=0.0, le=60.0, description="per instrument answer")


class BoardSection(StrictModel):
    config: ExistingPath = Field(
        description="the BMS config the board runs (for an ssh board, a copy of it here)"
    )
    launch: Literal["local", "ssh"] = Field(
        "local", description="local: `bms run` on this machine; ssh: on ssh_target"
    )
    ssh_target: str | None = Field(None, min_length=1, description="user@host of the board")
    remote_config: str | None = Field(
        None, min_length=1, description="the config's path on the board (default: config)"
    )
    bms_command: list[str] | None = Field(
        None, min_length=1, description="how to run bms there (default: this venv's, or 'bms')"
    )
    boot_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="start to closed")

    @model_validator(mode="after")
    def _ssh_needs_a_target(self) -> BoardSection:
        if self.launch == "ssh" and self.ssh_target is None:
            raise ValueError("launch = 'ssh' needs ssh_target")
        if self.launch == "local" and self.ssh_target is not None:
            raise ValueError("ssh_target is only for launch = 'ssh'")
        return self


class ContactorBoxSection(StrictModel):
    deadman_hold_s: float = Field(
        gt=0.0, le=60.0, description="it opens every relay when commands stop this long"
    )
    response_s: float = Field(
        0.1, ge=0.0, le=10.0, description="from its decision to the feedback frame showing it"
    )


class CanSection(StrictModel):
    interface: str = Field(min_length=1, description="python-can interface")
    channel: str = Field(min_length=1, description="'auto': a udp_multicast group per run")
    port: int | None = Field(
        None, ge=1, le=65535, description="udp_multicast only; none: a free port per run"
    )

    @model_validator(mode="after")
    def _auto_is_multicast(self) -> CanSection:
        multicast = self.interface == "udp_multicast"
        if self.channel == AUTO and not multicast:
            raise ValueError("channel 'auto' is for interface 'udp_multicast'")
        if self.port is not None and not multicast:
            raise ValueError("port is for interface 'udp_multicast'")
        return self


class InstrumentSection(StrictModel):
    address: InstrumentAddress = Field(
        description="tcp://HOST:PORT or serial:///dev/NAME?baudrate=N (virtual: port 0, pty)"
    )
    identity: str = Field(
        min_length=1, description="what its *IDN? starts with: manufacturer,model"
    )


class CellEmulatorSection(InstrumentSection):
    channels: list[Channel] = Field(
        min_length=1, description="the channel of cell 1, cell 2, ... in order"
    )
    current_limit_a: float = Field(gt=0.0, le=10000.0, description="set on every channel")
    nominal_voltage_v: float = Field(
        3.7, gt=0.0, le=6.0, description="held whenever a test sets nothing else"
    )


class PowerSupplySection(InstrumentSection):
    voltage_v: float = Field(
        gt=0.0, le=2000.0, description="its voltage setting: above the pack, so it charges"
    )
    max_current_a: float = Field(gt=0.0, le=10000.0)


class ElectronicLoadSection(InstrumentSection):
    max_current_a: float = Field(gt=0.0, le=10000.0)
    link_discharge_current_a: float = Field(
        1.0, gt=0.0, le=1000.0, description="drawn from the DC link before each start"
    )
    link_discharged_v: float = Field(
        2.0, gt=0.0, le=1000.0, description="the link counts as discharged below this"
    )


class RelayBoxSection(InstrumentSection):
    sense_wire_channels: dict[Annotated[int, Field(ge=1)], Channel] = Field(
        default_factory=dict,
        description="cell number -> relay in series with its sense wire (closed = connected)",
    )
    sensor_short_channels: dict[Annotated[int, Field(ge=1)], Channel] = Field(
        default_factory=dict,
        description="sensor number -> relay across the sensor (closed = shorted)",
    )

    @model_validator(mode="after")
    def _one_use_per_relay(self) -> RelayBoxSection:
        used = list(self.sense_wire_channels.values()) + list(self.sensor_short_channels.values())
        twice = sorted({c for c in used if used.count(c) > 1})
        if twice:
            raise ValueError(f"relay channel(s) {twice} wired twice")
        return self


class ThermistorEmulatorSection(InstrumentSection):
    channels: list[Channel] = Field(
        min_length=1, description="the channel of sensor 1, sensor 2, ... in order"
    )
    r25_ohm: float = Field(gt=0.0, le=1e7, description="the board's NTC at 25 degC")
    beta_k: float = Field(gt=100.0, le=20000.0, description="its B constant (25/85 or 25/50)")
    nominal_temp_c: float = Field(25.0, ge=-40.0, le=125.0)


class TolerancesSection(StrictModel):
    """How far the BMS's readings may be from the instruments' readbacks."""

    cell_voltage_v: float = Field(0.005, gt=0.0, le=1.0)
    current_a: float = Field(0.25, gt=0.0, le=100.0)
    temp_c: float = Field(1.5, gt=0.0, le=20.0)


class BudgetsSection(StrictModel):
    missed_cycles: int = Field(0, ge=0, le=100000, description="per test, in the BMS")
    frames_lost: int = Field(0, ge=0, le=100000, description="per test, counted by the rig")
    reaction_margin_s: float = Field(
        0.4, ge=0.0, le=60.0, description="allowed above a reaction's configured chain"
    )
    round_trip_s: float = Field(0.5, gt=0.0, le=60.0, description="instrument to BMS frame")


class EnduranceSection(StrictModel):
    duration_s: float = Field(30.0, gt=0.0, le=7 * 86400.0)
    discharge_current_a: float = Field(15.0, gt=0.0, le=10000.0)
    charge_current_a: float = Field(5.0, gt=0.0, le=10000.0)
    step_period_s: float = Field(3.0, gt=0.0, le=3600.0, description="the current steps this often")


class RigConfig(StrictModel):
    rig: RigSection
    board: BoardSection
    contactor_box: ContactorBoxSection
    can: CanSection
    cell_emulator: CellEmulatorSection
    power_supply: PowerSupplySection | None = None
    electronic_load: ElectronicLoadSection
    relay_box: RelayBoxSection
    thermistor_emulator: ThermistorEmulatorSection
    tolerances: TolerancesSection = TolerancesSection()
    budgets: BudgetsSection = BudgetsSection()
    endurance: EnduranceSection = EnduranceSection()

    @model_validator(mode="after")
    def _wiring_fits(self) -> RigConfig:
        problems = []
        n_cells = len(self.cell_emulator.channels)
        n_sensors = len(self.thermistor_emulator.channels)
        for name, channels in (
            ("cell_emulator", self.cell_emulator.channels),
            ("thermistor_emulator", self.thermistor_emulator.channels),
        ):
            if len(set(channels)) != len(channels):
                problems.append(f"[{name}] channels: a channel is listed twice")
        for cell in self.relay_box.sense_wire_channels:
            if cell > n_cells:
                problems.append(f"[relay_box] sense_wire_channels: no cell {cell} (1..{n_cells})")
        for sensor in self.relay_box.sensor_short_channels:
            if sensor > n_sensors:
                problems.append(
                    f"[relay_box] sensor_short_channels: no sensor {sensor} (1..{n_sensors})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def instruments(self) -> dict[str, InstrumentSection]:
        """Every instrument section present, by section name."""
        names = ("cell_emulator", "power_supply", "electronic_load", "relay_box")
        found = {name: getattr(self, name) for name in (*names, "thermistor_emulator")}
        return {name: section for name, section in found.items() if section is not None}

    def with_addresses(self, addresses: dict[str, str]) -> RigConfig:
        """This config with the instruments at the addresses a virtual rig bound."""
        data: dict[str, Any] = self.model_dump(mode="json")
        for name, address in addresses.items():
            data[name]["address"] = address
        return RigConfig.model_validate(data, context={"kind": self.rig.kind})


def check_against_board(rig: RigConfig, board: BmsConfig) -> list[str]:
    """What does not fit between the rig's wiring and the board's pack, one line each."""
    problems = []
    for section, channels, count, what in (
        ("cell_emulator", rig.cell_emulator.channels, board.pack.n_cells, "cells"),
        ("thermistor_emulator", rig.thermistor_emulator.channels, board.pack.n_temp_sensors,
         "temperature sensors"),
    ):  # fmt: skip
        if len(channels) != count:
            problems.append(
                f"[{section}] channels: {len(channels)} listed, but the board's pack has "
                f"{count} {what} ({board.source})"
            )
    return problems


def load_rig_config(path: str | Path) -> RigConfig:
    """Read and validate a rig config; raise RigConfigError listing every problem."""
    path = Path(path)
    try:
        raw = read_toml(path)
    except SchemaError as exc:
        raise RigConfigError(exc.problems) from None
    rig = raw.get("rig")
    # the addresses are checked against the kind; a bad kind is reported by the model itself
    kind = rig.get("kind") if isinstance(rig, dict) else None
    context = {"base_dir": path.parent.resolve(), "kind": kind}
    try:
        return load_model(path, RigConfig, context)
    except SchemaError as exc:
        raise RigConfigError(exc.problems) from None
