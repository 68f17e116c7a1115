"""Cell parameter sets: the cell type a pack is built from (``models/ecm/NAME/``).

A parameter set is a directory: ``params.toml`` (capacity, voltage limits, the EKF's noise
tuning, provenance) and two CSV tables over SOC × temperature, ``ocv.csv`` (columns
``temp_c,soc,ocv_v``) and ``impedance.csv`` (``temp_c,soc,r0_ohm,r1_ohm,c1_f,r2_ohm,c2_f``).
Each table is a full grid: every temperature has the same SOC points. A set may also have a
power map, ``power.csv`` (``temp_c,soc,current_a,duration_s,overpotential_v``, current signed
as everywhere: positive charging), from a power test: the state of power then comes from it
(bms/estimation/power.py). `bms identify` writes such a directory; this module reads and
checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import Field, model_validator

from bms.csvio import CsvError, read_columns
from bms.estimation import ecm
from bms.estimation.ecm import EcmTables
from bms.estimation.power import PowerMap, no_power_map
from bms.schema import SchemaError, StrictModel, load_model
from bms.types import POWER_DURATIONS_S

IMPEDANCE_COLUMNS = ("r0_ohm", "r1_ohm", "c1_f", "r2_ohm", "c2_f")
POWER_COLUMNS = ("temp_c", "soc", "current_a", "duration_s", "overpotential_v")


class CellParamsError(SchemaError):
    """A parameter set that is missing or inconsistent."""


class EkfTuning(NamedTuple):
    """Noise model of the EKF (all standard deviations), in the order the kernel takes it."""

    voltage_noise_v: float
    current_noise_a: float
    soc_random_walk_per_sqrt_h: float
    polarisation_error_v: float
    initial_soc_std: float
    impedance_error_ratio: float


class EkfSection(StrictModel):
    voltage_noise_v: float = Field(
        gt=0.0, le=0.5, description="cell voltage measurement plus model error (1 sigma)"
    )
    current_noise_a: float = Field(
        ge=0.0, le=100.0, description="cell current error incl. offset (1 sigma)"
    )
    soc_random_walk_per_sqrt_h: float = Field(
        ge=0.0, le=1.0, description="unmodelled SOC drift (capacity error), per sqrt(hour)"
    )
    polarisation_error_v: float = Field(
        ge=0.0,
        le=1.0,
        description="how far each RC branch's voltage may be from the model's (1 sigma); the "
        "error fades with the branch's time constant",
    )
    initial_soc_std: float = Field(gt=0.0, le=1.0, description="SOC uncertainty at start")
    impedance_error_ratio: float = Field(
        ge=0.0, le=1.0, description="relative error of the impedance tables (1 sigma)"
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_options(cls, data: Any) -> Any:
        """A set written before the polarisation's error became a fading one says so."""
        if isinstance(data, dict) and "rc_random_walk_v_per_sqrt_s" in data:
            raise ValueError(
                "rc_random_walk_v_per_sqrt_s is replaced by polarisation_error_v (V, 1 sigma, "
                "fading with each RC branch's time constant; 0.002 is a starting point)"
            )
        return data


class ParamsFile(StrictModel):
    name: str
    capacity_ah: float = Field(gt=0.0, le=10000.0)
    voltage_max_v: float = Field(gt=0.0, le=6.0)
    voltage_min_v: float = Field(gt=0.0, le=6.0)
    ocv_table: str = "ocv.csv"
    impedance_table: str = "impedance.csv"
    power_table: str | None = None
    ekf: EkfSection
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ordered_limits(self) -> ParamsFile:
        if self.voltage_min_v >= self.voltage_max_v:
            raise ValueError("voltage_min_v must be below voltage_max_v")
        return self


@dataclass(frozen=True)
class CellParams:
    """One cell type: capacity (Ah) and voltage limits, the ECM tables and the EKF tuning."""

    name: str
    capacity_ah: float
    voltage_max_v: float
    voltage_min_v: float
    tables: EcmTables
    tuning: EkfTuning
    provenance: dict[str, Any]
    power_map: PowerMap
    """From a power test, or :func:`no_power_map` (the ECM's closed form then)."""

    @property
    def has_power_map(self) -> bool:
        return self.power_map.current_a.size > 0

    def ocv_at(self, soc: np.ndarray, temp_c: float | np.ndarray = 25.0) -> np.ndarray:
        """Open-circuit voltage (V), same shape as ``soc``, clamped to the table's ends."""
        return _elementwise(ecm.ocvs, self.tables, soc, temp_c)

    def soc_at_ocv(self, ocv_v: np.ndarray, temp_c: float | np.ndarray = 25.0) -> np.ndarray:
        """SOC of a rested cell at ``ocv_v`` (inverse of :meth:`ocv_at`), clamped to [0, 1]."""
        return _elementwise(ecm.socs_from_ocv, self.tables, ocv_v, temp_c)

    def impedance_at(self, soc: float, temp_c: float) -> dict[str, float]:
        """``r0_ohm, r1_ohm, c1_f, r2_ohm, c2_f`` at one operating point."""
        out = np.empty(5)
        ecm.impedance(self.tables, float(soc), float(temp_c), out)
        return dict(zip(IMPEDANCE_COLUMNS, out.tolist(), strict=True))


def _elementwise(kernel, tables: EcmTables, values, temp_c) -> np.ndarray:
    """Apply a (tables, values (n,), temp_c (n,), out (n,)) kernel to arrays of any shape."""
    values_b, temp_b = np.broadcast_arrays(np.asarray(values, float), np.asarray(temp_c, float))
    out = np.empty(values_b.size)
    kernel(tables, np.array(values_b).ravel(), np.array(temp_b).ravel(), out)
    return out.reshape(values_b.shape)


def load_cell_params(directory: Path) -> CellParams:
    """Load the parameter set in ``directory``; raise CellParamsError saying what is wrong."""
    directory = Path(directory)
    try:
        head = load_model(directory / "params.toml", ParamsFile)
    except SchemaError as exc:
        raise CellParamsError(exc.problems) from None
    try:
        ocv_soc, ocv_temp_c, (ocv_v,) = _read_grid(directory / head.ocv_table, ("ocv_v",))
        imp_soc, imp_temp_c, columns = _read_grid(
            directory / head.impedance_table, IMPEDANCE_COLUMNS
        )
    except CsvError as exc:
        raise CellParamsError([str(exc)]) from None
    ocv_file = directory / head.ocv_table
    if ocv_soc[0] != 0.0 or ocv_soc[-1] != 1.0:
        raise CellParamsError([f"{ocv_file}: soc must run from 0 to 1"])
    falling = np.flatnonzero(np.any(np.diff(ocv_v, axis=1) <= 0.0, axis=1))
    if falling.size:
        raise CellParamsError(
            [f"{ocv_file}: ocv_v must rise strictly with soc (not at {ocv_temp_c[falling[0]]} C)"]
        )
    impedance = np.stack(columns, axis=-1)
    if np.any(impedance <= 0.0):
        raise CellParamsError(
            [f"{directory / head.impedance_table}: every resistance and capacitance must be > 0"]
        )
    if head.power_table is None:
        power_map = no_power_map(len(POWER_DURATIONS_S))
    else:
        try:
            power_map = read_power_map(directory / head.power_table)
        except CsvError as exc:
            raise CellParamsError([str(exc)]) from None
    return CellParams(
        name=head.name,
        capacity_ah=head.capacity_ah,
        voltage_max_v=head.voltage_max_v,
        voltage_min_v=head.voltage_min_v,
        tables=EcmTables(ocv_soc, ocv_temp_c, ocv_v, imp_soc, imp_temp_c, impedance),
        tuning=EkfTuning(**head.ekf.model_dump()),
        provenance=head.provenance,
        power_map=power_map,
    )


def read_power_map(path: Path) -> PowerMap:
    """Read ``power.csv`` (see the module); CsvError unless it is a full grid over
    temperature, SOC in [0, 1], the same current magnitudes each way and exactly the
    durations of POWER_DURATIONS_S, with every overpotential finite and > 0."""
    data = read_columns(path, POWER_COLUMNS)
    axes = [np.unique(data[name]) for name in POWER_COLUMNS[:4]]
    temps, socs, signed_a, durations = axes
    if np.prod([axis.size for axis in axes]) != data["soc"].size:
        raise CsvError(
            f"{path}: not a full grid: every (temp_c, soc) needs the same currents and "
            f"durations ({' x '.join(str(a.size) for a in axes)} != {data['soc'].size} rows)"
        )
    ladder_a = signed_a[signed_a > 0.0]
    if (
        not np.array_equal(-signed_a[signed_a < 0.0][::-1], ladder_a)
        or signed_a.size != 2 * ladder_a.size
        or ladder_a.size < 2
    ):
        raise CsvError(
            f"{path}: current_a must hold the same magnitudes charging (+) and discharging (-),"
            " at least two, and no zero"
        )
    if tuple(durations) != POWER_DURATIONS_S:
        raise CsvError(f"{path}: duration_s must be exactly {POWER_DURATIONS_S}")
    if socs[0] < 0.0 or socs[-1] > 1.0:
        raise CsvError(f"{path}: soc values must lie in [0, 1]")
    eta = data["overpotential_v"]
    if not np.all(np.isfinite(eta)) or np.any(eta <= 0.0):
        raise CsvError(f"{path}: every overpotential_v must be a number > 0")
    index = [
        np.searchsorted(axis, data[name]) for axis, name in zip(axes, POWER_COLUMNS, strict=False)
    ]
    grid = np.full([axis.size for axis in axes], np.nan)
    grid[tuple(index)] = eta
    if np.isnan(grid).any():
        raise CsvError(f"{path}: not a full grid: a row is repeated")
    n_ladder = ladder_a.size
    overpotential_v = np.stack(
        (grid[:, :, :n_ladder][:, :, ::-1], grid[:, :, n_ladder:]), axis=2
    )  # (temp, soc, direction, current magnitude, duration)
    if np.any(np.diff(overpotential_v, axis=3) < 0.0):
        raise CsvError(f"{path}: overpotential_v must not fall as the current grows")
    return PowerMap(socs, temps, ladder_a, np.ascontiguousarray(overpotential_v))


def _read_grid(
    path: Path, value_columns: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Read a long-form ``temp_c,soc,...`` table as a grid: soc (n_soc,), temp_c (n_temp,)
    and one (n_temp, n_soc) array per value column. Raises CsvError unless the rows form a
    full grid with SOC in [0, 1]."""
    data = read_columns(path, ("temp_c", "soc", *value_columns))
    temps = np.unique(data["temp_c"])
    socs = np.unique(data["soc"])
    if temps.size * socs.size != data["soc"].size:
        raise CsvError(
            f"{path}: not a full grid: every temperature needs the same SOC points "
            f"({temps.size} temperatures x {socs.size} SOC points != {data['soc'].size} rows)"
        )
    if socs[0] < 0.0 or socs[-1] > 1.0 or socs.size < 2:
        raise CsvError(f"{path}: soc values must lie in [0, 1], at least two of them")
    order = np.lexsort((data["soc"], data["temp_c"]))
    grid_temp = data["temp_c"][order].reshape(temps.size, socs.size)
    grid_soc = data["soc"][order].reshape(temps.size, socs.size)
    if np.any(grid_temp != temps[:, None]) or np.any(grid_soc != socs[None, :]):
        raise CsvError(f"{path}: not a full grid: a (temp_c, soc) pair is repeated")
    return socs, temps, [data[name][order].reshape(temps.size, socs.size) for name in value_columns]
