"""Fake backends for driving the cycle without a bus: exact, instant and inspectable."""

from __future__ import annotations

import numpy as np

from bms.backends import ContactorDriver, FrontEnd, Publisher
from bms.types import (
    ALL_OPEN,
    POWER_DURATIONS_S,
    ContactorFeedback,
    Estimate,
    Measurement,
    RelayStates,
)


class FakeFrontEnd(FrontEnd):
    """Every cell at ``voltage_v`` (or the ``cell_voltage_v`` array), temperatures at
    ``temp_c``; raises ``error`` when set. Records the call order in ``calls``."""

    def __init__(self, n_cells: int, voltage_v: float = 3.7, n_temps: int = 2):
        self.n_cells = n_cells
        self.voltage_v = voltage_v
        self.cell_voltage_v: np.ndarray | None = None
        self.temp_c = 25.0
        self.n_temps = n_temps
        self.current_a = -1.0
        self.insulation_kohm = 5000.0
        self.frontend_faults: tuple[str, ...] = ()
        self.error: Exception | None = None
        self.calls: list[str] = []

    def read(self, t_s):
        self.calls.append("read")
        if self.error is not None:
            raise self.error
        v = (
            self.cell_voltage_v
            if self.cell_voltage_v is not None
            else np.full(self.n_cells, self.voltage_v)
        )
        pack_v = float(v.sum())
        return Measurement(
            t_s,
            v.copy(),
            np.full(self.n_temps, self.temp_c),
            self.current_a,
            pack_v,
            pack_v,
            insulation_kohm=self.insulation_kohm,
            frontend_faults=self.frontend_faults,
        )

    def close(self):
        pass


class FakeBox(ContactorDriver):
    """Relays follow the last command at once, with valid feedback; the interlock loop is
    ``interlock_closed``."""

    def __init__(self, calls: list[str]):
        self.relays = ALL_OPEN
        self.calls = calls
        self.interlock_closed = True

    def command(self, relays: RelayStates) -> None:
        self.calls.append("command")
        self.relays = relays

    def feedback(self, t_s):
        return ContactorFeedback(self.relays, valid=True, interlock_closed=self.interlock_closed)

    def close(self):
        pass


class FakePublisher(Publisher):
    def __init__(self, calls: list[str]):
        self.calls = calls
        self.error: Exception | None = None

    def publish(self, status):
        self.calls.append("publish")
        if self.error is not None:
            raise self.error

    def close(self):
        pass


def estimate_of(soc, soc_std: float = 0.01, limit_a: float = 100.0) -> Estimate:
    """An estimate with the given SOC per cell, ``soc_std`` everywhere, no innovation, and
    state-of-power limits of ``limit_a`` for every duration."""
    soc = np.asarray(soc, dtype=float)
    limits = np.full((soc.size, len(POWER_DURATIONS_S)), limit_a)
    nothing = np.full(soc.size, np.nan)
    return Estimate(
        soc,
        np.full(soc.size, soc_std),
        nothing,
        nothing.copy(),
        limits,
        limits.copy(),
        np.zeros(soc.size, dtype=bool),
        np.zeros(soc.size, dtype=bool),
    )
