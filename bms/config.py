"""TOML configuration: strict loading and validation.

Every option has a type, a range and its unit in its name. Unknown and missing keys are errors
that name the file, the section and the option, with the nearest valid name as a suggestion
(Klipper's ``check_unused_options``, PyBaMM's fuzzy dict). Backend sections (``[frontend]``,
``[contactors]``, ``[publisher]``, ``[sim]``) are validated by the options model of the backend
they name, so a typo in a driver option is caught at load time like any other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bms import backends
from bms.protection.balancing import BalancingConfig
from bms.protection.derating import DeratingConfig
from bms.protection.diagnosis import DiagnosisConfig
from bms.protection.limits import LimitSet
from bms.schema import (
    ExistingPath,
    RelativePath,
    SchemaError,
    StrictModel,
    describe_errors,
    load_model,
    read_toml,
    suggest,
)


class ConfigError(SchemaError):
    """A configuration that cannot be used; ``problems`` holds one line per problem."""


class LimitSetError(SchemaError):
    """A limit set that cannot be read or is inconsistent."""


def load_limit_set(path: Path) -> LimitSet:
    """Read and validate a limit set (config/limits/*.toml)."""
    try:
        return load_model(path, LimitSet)
    except SchemaError as exc:
        raise LimitSetError(exc.problems) from None


class PackConfig(StrictModel):
    n_cells: int = Field(ge=1, le=1024, description="cells in series")
    n_parallel: int = Field(1, ge=1, le=1000, description="cells in parallel in each group")
    n_temp_sensors: int = Field(ge=1, le=1024)
    cell_params: ExistingPath = Field(description="directory of the cell's parameter set")


class LoopConfig(StrictModel):
    period_s: float = Field(0.1, ge=0.001, le=10.0)
    lag_limit_s: float = Field(
        0.05, gt=0.0, le=10.0, description="mean wake-up lateness above which the loop lags"
    )
    status_interval_s: float = Field(1.0, gt=0.0, le=3600.0)
    startup_timeout_s: float = Field(
        5.0, ge=0.0, le=600.0, description="wait this long for the first complete sample"
    )
    stall_limit_s: float = Field(
        0.5, gt=0.0, le=60.0, description="one wake-up later than this opens the contactors"
    )

    @model_validator(mode="after")
    def _stall_above_period(self) -> LoopConfig:
        if self.stall_limit_s <= self.period_s:
            raise ValueError("stall_limit_s must be longer than period_s")
        return self


class CanConfig(StrictModel):
    interface: str = Field("virtual", min_length=1)
    channel: str = Field("pybms0", min_length=1)
    dbc_file: ExistingPath
    receive_buffer_bytes: int = Field(4 * 1024 * 1024, ge=65536, le=256 * 1024 * 1024)


class ControlConfig(StrictModel):
    close_on_start: bool = Field(description="close the contactors as soon as all is healthy")
    precharge_ratio: float = Field(0.95, ge=0.9, lt=1.0)
    precharge_timeout_s: float = Field(3.0, gt=0.0, le=60.0)
    relay_settle_s: float = Field(
        0.5, gt=0.0, le=10.0, description="time a relay's feedback gets to follow its command"
    )
    precharge_min_s: float | None = Field(
        None,
        gt=0.0,
        le=60.0,
        description="a link that charges faster has no precharge resistor in its path (a "
        "hidden weld) or no capacitance (disconnected); none: not checked",
    )
    link_decay_s: float | None = Field(
        None,
        gt=0.0,
        le=3600.0,
        description="after an opening the link must fall below link_decay_ratio of the pack "
        "voltage within this time; none: not checked (a charger may hold the link up)",
    )
    link_decay_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    precharge_time_s: float | None = Field(
        None,
        gt=0.0,
        le=60.0,
        description="for a front-end without a DC-link voltage (a JBD): precharge this long "
        "(at least 5 time constants of the precharge resistor and the link capacitance), then "
        "close; none: precharge until the link voltage reaches precharge_ratio",
    )

    @model_validator(mode="after")
    def _timed_precharge_fits(self) -> ControlConfig:
        if self.precharge_time_s is not None:
            if self.precharge_time_s >= self.precharge_timeout_s:
                raise ValueError("precharge_time_s must be below precharge_timeout_s")
            if self.precharge_min_s is not None:
                raise ValueError(
                    "precharge_min_s needs a link voltage; it cannot go with precharge_time_s"
                )
        return self


class SocConfig(StrictModel):
    rest_current_a: float = Field(0.5, ge=0.0, le=1000.0)
    rest_time_s: float = Field(1800.0, gt=0.0, le=86400.0)


class ProtectionConfig(StrictModel):
    """Pack-level protection; the per-cell graded limits come from the ``limits`` file."""

    limits: ExistingPath = Field(description="limit set of the cell chemistry (TOML)")
    latch_file: RelativePath = Field(
        description="where latched faults persist across restarts (created if missing)"
    )
    short_circuit_current_a: float = Field(gt=0.0, le=100000.0)
    pack_voltage_tolerance_v: float = Field(gt=0.0, le=100.0)
    stuck_time_s: float = Field(5.0, gt=0.0, le=3600.0)
    stuck_min_current_a: float = Field(
        1.0, gt=0.0, le=10000.0, description="at rest a flat reading is normal, not stuck"
    )
    insulation_warning_kohm: float | None = Field(
        None, gt=0.0, le=100000.0, description="none: the pack has no insulation monitor"
    )
    insulation_error_kohm: float | None = Field(None, gt=0.0, le=100000.0)
    interlock: bool = Field(False, description="the contactor box reports an HV interlock loop")
    innovation_limit_sigma: float = Field(
        6.0, gt=0.0, le=100.0, description="cell_model_mismatch beyond this many sigma"
    )
    redundant_current_tolerance_a: float | None = Field(
        None,
        gt=0.0,
        le=10000.0,
        description="none: the front-end has no second current sensor to check against",
    )
    redundant_current_tolerance_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="plus this fraction of the measured current"
    )
    charge_check_window_s: float = Field(
        600.0, ge=10.0, le=86400.0, description="window of the current-against-SOC check"
    )
    charge_check_tolerance_a: float | None = Field(
        None,
        gt=0.0,
        le=10000.0,
        description="current_soc_mismatch when the SOC the cell voltages show implies a current "
        "this far from the measured one, on average over the window; none: off",
    )

    @model_validator(mode="after")
    def _insulation_thresholds(self) -> ProtectionConfig:
        warning, error = self.insulation_warning_kohm, self.insulation_error_kohm
        if (warning is None) != (error is None):
            raise ValueError("set both insulation_warning_kohm and insulation_error_kohm, or none")
        if warning is not None and error >= warning:
            raise ValueError("insulation_error_kohm must be below insulation_warning_kohm")
        return self


UNIX_SOCKET_PATH_MAX = 107
"""sun_path holds 108 bytes with its terminating NUL."""


class ServiceConfig(StrictModel):
    """How the process runs as a service: its control socket and real-time set-up."""

    control_socket: RelativePath | None = Field(
        None, description="Unix socket for bms status / bms faults; none: no socket"
    )
    admin_group: str | None = Field(
        None,
        min_length=1,
        description="members (and root) may clear latched faults; none: whoever may connect",
    )
    realtime_priority: int = Field(0, ge=0, le=99, description="SCHED_FIFO priority; 0: off")
    cpu_affinity: list[Annotated[int, Field(ge=0, le=4095)]] = Field(
        default_factory=list, description="CPUs the loop may run on; empty: any"
    )
    freeze_gc: bool = Field(True, description="gc.freeze() after warm-up")

    @model_validator(mode="after")
    def _socket_path_fits(self) -> ServiceConfig:
        path = self.control_socket
        if path is not None and len(str(path).encode()) > UNIX_SOCKET_PATH_MAX:
            raise ValueError(
                f"control_socket path is {len(str(path).encode())} bytes, more than a Unix "
                f"socket takes ({UNIX_SOCKET_PATH_MAX}): {path}"
            )
        return self


class HealthConfig(StrictModel):
    """State of health beside the loop (bms/health/service.py)."""

    enabled: bool = True
    model: ExistingPath | None = Field(
        None,
        description="the int8 SOH model (.tflite, its .json sidecar beside it), trained for "
        "this cell type; none: the online estimate only",
    )
    sample_period_s: float = Field(1.0, ge=0.1, le=60.0, description="one sample this often")


class StoreConfig(StrictModel):
    """Where the pack's state and the fault log persist (SQLite)."""

    path: RelativePath
    interval_s: float = Field(10.0, ge=0.1, le=3600.0, description="state written this often")


class BackendSection(BaseModel):
    """A section that names its backend; the rest is checked by that backend's options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    backend: str = Field(min_length=1)


class FileConfig(StrictModel):
    """The schema of a config file, before the backend sections are resolved."""

    pack: PackConfig
    loop: LoopConfig = LoopConfig()
    can: CanConfig | None = None
    frontend: BackendSection
    contactors: BackendSection
    publisher: BackendSection | None = None
    control: ControlConfig
    soc: SocConfig = SocConfig()
    protection: ProtectionConfig
    diagnosis: DiagnosisConfig = DiagnosisConfig()
    derating: DeratingConfig = DeratingConfig()
    balancing: BalancingConfig = BalancingConfig()
    service: ServiceConfig = ServiceConfig()
    store: StoreConfig | None = None
    health: HealthConfig = HealthConfig()
    sim: dict[str, Any] | None = None


@dataclass(frozen=True)
class BackendChoice:
    """A backend picked by name, with its validated options."""

    name: str
    cls: type
    options: BaseModel


@dataclass(frozen=True)
class BmsConfig:
    """A validated configuration, with each backend resolved to its class."""

    source: Path
    pack: PackConfig
    loop: LoopConfig
    can: CanConfig | None
    control: ControlConfig
    soc: SocConfig
    protection: ProtectionConfig
    limits: LimitSet
    diagnosis: DiagnosisConfig
    derating: DeratingConfig
    balancing: BalancingConfig
    service: ServiceConfig
    store: StoreConfig | None
    health: HealthConfig
    frontend: BackendChoice
    contactors: BackendChoice
    publisher: BackendChoice | None
    sim: BackendChoice | None
    sha256: str = ""
    """Of the config file's bytes, for the store's record of the last config that ran."""

    def summary(self) -> dict[str, Any]:
        """The resolved config as plain data, for ``bms check-config``."""
        resolved: dict[str, Any] = {"source": str(self.source)}
        for name in (
            "balancing",
            "pack",
            "loop",
            "can",
            "control",
            "soc",
            "protection",
            "limits",
            "diagnosis",
            "derating",
            "service",
            "store",
            "health",
        ):
            section = getattr(self, name)
            if section is not None:
                resolved[name] = section.model_dump(mode="json")
        for name in ("frontend", "contactors", "publisher", "sim"):
            choice = getattr(self, name)
            if choice is not None:
                resolved[name] = {"backend": choice.name, **choice.options.model_dump(mode="json")}
        return resolved


DEFAULT_CONFIG_PATHS = ("/etc/pybms/pack.toml", "config/sim.toml")
"""Where the tools look for a config when none is named: the installed service's, then the
simulated pack's (relative to the working directory)."""

SIM_BACKEND = "pack"
"""The one simulator registered in ``bms.simulators``; ``[sim]`` configures it."""


def load_config(path: str | Path) -> BmsConfig:
    """Read, validate and resolve a config file; raise ConfigError listing every problem."""
    path = Path(path)
    context: dict[str, Any] = {"base_dir": path.parent.resolve()}
    try:
        parsed = load_model(path, FileConfig, context)
    except SchemaError as exc:
        raise ConfigError(exc.problems) from None
    # backends may check their options against the pack
    context["n_cells"] = parsed.pack.n_cells
    context["n_temp_sensors"] = parsed.pack.n_temp_sensors

    problems: list[str] = []
    limits = _load_limits(path, parsed, problems)
    choices: dict[str, BackendChoice | None] = {}
    sections = {
        "frontend": ("bms.frontends", parsed.frontend),
        "contactors": ("bms.contactors", parsed.contactors),
        "publisher": ("bms.publishers", parsed.publisher),
    }
    for section, (group, raw_section) in sections.items():
        if raw_section is None:
            choices[section] = None
            continue
        options = dict(raw_section.model_extra or {})
        choices[section] = _choose(
            path, section, group, raw_section.backend, options, context, problems
        )
    choices["sim"] = None
    if parsed.sim is not None:
        choices["sim"] = _choose(
            path, "sim", "bms.simulators", SIM_BACKEND, dict(parsed.sim), context, problems
        )
    if problems:
        raise ConfigError(problems)
    return BmsConfig(
        source=path.resolve(),
        pack=parsed.pack,
        loop=parsed.loop,
        can=parsed.can,
        control=parsed.control,
        soc=parsed.soc,
        protection=parsed.protection,
        limits=limits,
        diagnosis=parsed.diagnosis,
        derating=parsed.derating,
        balancing=parsed.balancing,
        service=parsed.service,
        store=parsed.store,
        health=parsed.health,
        frontend=choices["frontend"],
        contactors=choices["contactors"],
        publisher=choices["publisher"],
        sim=choices["sim"],
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


class _ContactorFile(BaseModel):
    """What the contactor driver needs of a config file; everything else is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    pack: PackConfig
    loop: LoopConfig = LoopConfig()
    can: CanConfig | None = None
    contactors: BackendSection
    control: ControlConfig
    protection: ProtectionConfig


def load_contactor_config(path: str | Path) -> BmsConfig:
    """The config as far as the contactor driver needs it, for ``bms failsafe``: a typo in
    an unrelated section (balancing, a front-end option) must not keep the fail-safe from
    opening the contactors. The other sections are their defaults, or None."""
    path = Path(path)
    context: dict[str, Any] = {"base_dir": path.parent.resolve()}
    try:
        parsed = load_model(path, _ContactorFile, context)
    except SchemaError as exc:
        raise ConfigError(exc.problems) from None
    problems: list[str] = []
    contactors = _choose(
        path,
        "contactors",
        "bms.contactors",
        parsed.contactors.backend,
        dict(parsed.contactors.model_extra or {}),
        context | {"n_cells": parsed.pack.n_cells, "n_temp_sensors": parsed.pack.n_temp_sensors},
        problems,
    )
    if problems:
        raise ConfigError(problems)
    return BmsConfig(
        source=path.resolve(),
        pack=parsed.pack,
        loop=parsed.loop,
        can=parsed.can,
        control=parsed.control,
        soc=SocConfig(),
        protection=parsed.protection,
        limits=None,
        diagnosis=DiagnosisConfig(),
        derating=DeratingConfig(),
        balancing=BalancingConfig(),
        service=ServiceConfig(),
        store=None,
        health=HealthConfig(enabled=False),
        frontend=None,
        contactors=contactors,
        publisher=None,
        sim=None,
    )


class ToolConfig(BaseModel):
    """What ``bms status`` and ``bms faults`` need of a config file: where the service listens
    and where it keeps its latches and its store. Read without the backends, so the tools start
    in a fraction of a second; everything else in the file is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    source: Path
    protection: ProtectionConfig
    service: ServiceConfig = ServiceConfig()
    store: StoreConfig | None = None


def load_tool_config(path: str | Path) -> ToolConfig:
    path = Path(path)
    try:
        raw = read_toml(path)
    except SchemaError as exc:
        raise ConfigError(exc.problems) from None
    context: dict[str, Any] = {"base_dir": path.parent.resolve()}
    try:
        return ToolConfig.model_validate({**raw, "source": path.resolve()}, context=context)
    except ValidationError as exc:
        raise ConfigError(describe_errors(path, ToolConfig, exc, ())) from None


def _load_limits(path: Path, parsed: FileConfig, problems: list[str]) -> LimitSet | None:
    """Load the limit set the config names and check the pack-level limits against it."""
    try:
        limits = load_limit_set(parsed.protection.limits)
    except SchemaError as exc:
        problems.extend(exc.problems)
        return None
    n_parallel = parsed.pack.n_parallel
    highest_a = max(limits.charge_current_a.msl, limits.discharge_current_a.msl) * n_parallel
    if parsed.protection.short_circuit_current_a <= highest_a:
        problems.append(
            f"{path}: [protection] short_circuit_current_a: must be above the limit set's "
            f"highest current ({highest_a:g} A for {n_parallel} cell(s) in parallel)"
        )
    return limits


def _choose(
    path: Path,
    section: str,
    group: str,
    name: str,
    options: dict[str, Any],
    context: dict[str, Any],
    problems: list[str],
) -> BackendChoice | None:
    try:
        cls = backends.load(group, name)
    except backends.UnknownBackendError as exc:
        hint = suggest(name, exc.known)
        problems.append(
            f"{path}: [{section}] backend: unknown backend {name!r}{hint}; "
            f"known: {', '.join(exc.known) or 'none installed'}"
        )
        return None
    try:
        validated = cls.Options.model_validate(options, context=context)
    except ValidationError as exc:
        problems.extend(describe_errors(path, cls.Options, exc, (section,)))
        return None
    return BackendChoice(name=name, cls=cls, options=validated)
