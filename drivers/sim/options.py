"""Options of the simulated pack: the ``[sim]`` section of a config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from bms.schema import ExistingPath, StrictModel
from drivers.sim.faults import FAULT_KINDS, make_injection


class LoadOptions(StrictModel):
    profile: Literal["constant", "pulse", "drive_cycle"] = "drive_cycle"
    current_a: float = Field(-5.0, ge=-10000.0, le=10000.0)
    pulse_period_s: float = Field(10.0, gt=0.0, le=86400.0)
    pulse_duty: float = Field(0.5, ge=0.0, le=1.0)
    drive_cycle_file: ExistingPath | None = None
    drive_cycle_scale: float = Field(1.0, ge=-1000.0, le=1000.0)

    @model_validator(mode="after")
    def _file_for_drive_cycle(self) -> LoadOptions:
        if self.profile == "drive_cycle" and self.drive_cycle_file is None:
            raise ValueError("profile 'drive_cycle' needs drive_cycle_file")
        return self


class FaultOptions(StrictModel):
    kind: Literal[tuple(FAULT_KINDS)]  # type: ignore[valid-type]
    at_s: float = Field(ge=0.0)
    cell: int | None = Field(None, ge=1, description="cell number, counting from 1")

    @model_validator(mode="after")
    def _fits_the_pack(self, info: ValidationInfo) -> FaultOptions:
        n_cells = (info.context or {}).get("n_cells")
        if n_cells is not None:
            make_injection(self.kind, self.at_s, self.cell, n_cells)
        return self


class SimOptions(StrictModel):
    seed: int = 1
    tx_period_s: float = Field(0.1, ge=0.001, le=10.0)
    deadman_timeout_s: float = Field(0.5, gt=0.0, le=60.0)
    ambient_temp_c: float = Field(25.0, ge=-60.0, le=100.0)
    initial_soc: float = Field(0.6, ge=0.0, le=1.0)
    initial_soc_spread: float = Field(0.01, ge=0.0, le=0.5)
    capacity_spread: float = Field(0.02, ge=0.0, le=0.5)
    resistance_spread: float = Field(0.05, ge=0.0, le=0.5)
    voltage_noise_v: float = Field(0.0005, ge=0.0, le=1.0)
    voltage_offset_v: float = Field(0.001, ge=0.0, le=1.0)
    current_noise_a: float = Field(0.02, ge=0.0, le=100.0)
    current_offset_a: float = Field(0.05, ge=0.0, le=100.0)
    temp_noise_c: float = Field(0.2, ge=0.0, le=10.0)
    heat_capacity_j_per_k: float = Field(70.0, gt=0.0, le=1e6)
    cooling_w_per_k: float = Field(0.1, ge=0.0, le=1e4)
    overtemp_heat_w: float = Field(200.0, ge=0.0, le=1e6)
    precharge_resistance_ohm: float = Field(50.0, gt=0.0, le=1e6)
    link_capacitance_f: float = Field(0.004, gt=0.0, le=10.0)
    short_resistance_ohm: float = Field(0.02, gt=0.0, le=1e3)
    bleed_resistance_ohm: float = Field(33.0, gt=0.0, le=1e6)
    balancing_timeout_s: float = Field(
        1.0, gt=0.0, le=60.0, description="the front-end stops bleeding when commands stop"
    )
    insulation_kohm: float = Field(5000.0, gt=0.0, le=65000.0)
    insulation_fault_kohm: float = Field(5.0, gt=0.0, le=65000.0)
    imd_startup_s: float = Field(
        0.5, ge=0.0, le=60.0, description="the monitor reports 'not valid yet' this long"
    )
    load: LoadOptions = LoadOptions(profile="constant")
    faults: list[FaultOptions] = Field(default_factory=list)
