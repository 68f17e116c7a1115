"""Cell parameter sets: the nominal cell a pack is built from (``models/ecm/NAME/params.toml``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from bms.schema import SchemaError, StrictModel, load_model


class CellParamsError(SchemaError):
    """A parameter set that is missing or inconsistent."""


class CellParams(StrictModel):
    """OCV table and second-order Thevenin impedance of one cell (see the file's header)."""

    name: str
    capacity_ah: float = Field(gt=0.0, le=10000.0)
    voltage_max_v: float = Field(gt=0.0, le=6.0)
    voltage_min_v: float = Field(gt=0.0, le=6.0)
    soc: list[float] = Field(min_length=2)
    ocv_v: list[float] = Field(min_length=2)
    r0_ohm: float = Field(gt=0.0, le=10.0)
    r1_ohm: float = Field(gt=0.0, le=10.0)
    c1_f: float = Field(gt=0.0)
    r2_ohm: float = Field(gt=0.0, le=10.0)
    c2_f: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _monotonic_tables(self) -> CellParams:
        if len(self.soc) != len(self.ocv_v):
            raise ValueError("soc and ocv_v must have the same length")
        if self.soc[0] != 0.0 or self.soc[-1] != 1.0 or np.any(np.diff(self.soc) <= 0):
            raise ValueError("soc must rise strictly from 0 to 1")
        if np.any(np.diff(self.ocv_v) <= 0):
            raise ValueError("ocv_v must rise strictly with soc")
        return self

    def ocv_at(self, soc: np.ndarray) -> np.ndarray:
        """Open-circuit voltage (V) at ``soc`` (any shape), clamped to the table's ends."""
        return np.interp(soc, self.soc, self.ocv_v)

    def soc_at_ocv(self, ocv_v: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`ocv_at`: the SOC of a rested cell at ``ocv_v``, clamped to [0, 1]."""
        return np.interp(ocv_v, self.ocv_v, self.soc)


def load_cell_params(directory: Path) -> CellParams:
    """Load ``directory/params.toml``; raise CellParamsError saying what is wrong."""
    try:
        return load_model(Path(directory) / "params.toml", CellParams)
    except SchemaError as exc:
        raise CellParamsError(exc.problems) from None
